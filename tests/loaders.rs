//! Per-call loaders (`get_with`, `try_get_with`) and the typed view (`Typed`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiercache::{Error, MockClock, Strategy, TieredCache};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn cache(clock: &MockClock) -> tiercache::Result<TieredCache> {
    TieredCache::builder()
        .strategy(Strategy::CacheAside)
        .clock(clock.clone())
        .ttl(Duration::from_secs(60))
        .stale_ttl(Duration::from_secs(600))
        .build()
}

#[tokio::test]
async fn concurrent_get_with_runs_one_loader() -> TestResult {
    let cache = cache(&MockClock::new())?;
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut readers = Vec::new();
    for _ in 0..10 {
        let (cache, calls, gate) = (cache.clone(), calls.clone(), gate.clone());
        readers.push(tokio::spawn(async move {
            cache
                .get_with("k", move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let _pass = gate.acquire().await;
                    "loaded"
                })
                .await
        }));
    }
    // Every reader is waiting on the one load before it may finish.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    for r in readers {
        assert_eq!(r.await??.unwrap(), "loaded");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn a_failing_loader_falls_back_to_the_stale_copy() -> TestResult {
    let clock = MockClock::new();
    let cache = cache(&clock)?;
    cache.get_with("k", || async { "v1" }).await?;
    clock.advance(Duration::from_secs(61));
    let l = cache.try_get_with("k", || async {
        Err::<Option<&str>, _>(std::io::Error::other("backend down"))
    });
    assert_eq!(l.await?.unwrap(), "v1", "stale copy served");
    clock.advance(Duration::from_secs(600));
    let gone = cache
        .try_get_with("k", || async {
            Err::<Option<&str>, _>(std::io::Error::other("backend down"))
        })
        .await;
    let err = gone.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let cause = std::error::Error::source(&err).and_then(std::error::Error::source);
    assert_eq!(
        cause.map(ToString::to_string).as_deref(),
        Some("backend down")
    );
    // A loader that answers again refreshes the value.
    let v = cache.get_with("k", || async { "v2" }).await?;
    assert_eq!(v.unwrap(), "v2");
    Ok(())
}

#[tokio::test]
async fn a_loader_saying_not_found_is_remembered() -> TestResult {
    let cache = cache(&MockClock::new())?;
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let calls = calls.clone();
        let v = cache
            .try_get_with("missing", move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<Option<&str>, std::io::Error>(None)
            })
            .await?;
        assert!(v.is_none());
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the negative entry answered"
    );
    Ok(())
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Config {
    port: u16,
}

#[tokio::test]
async fn a_typed_hit_is_decoded_once_and_a_write_replaces_it() -> TestResult {
    let cache = cache(&MockClock::new())?;
    let configs = cache.typed::<Config>();
    configs.set("prod", &Config { port: 1 }).await?;
    let a = configs.get("prod").await?.unwrap();
    let b = configs.get("prod").await?.unwrap();
    assert!(
        Arc::ptr_eq(&a, &b),
        "the second hit reused the decoded value"
    );
    // A write through the bytes API replaces the entry, decoded value included.
    cache.set("prod", r#"{"port":2}"#).await?;
    assert_eq!(configs.get("prod").await?.unwrap().port, 2);
    // From L2 too (after L1 is dropped).
    cache.clear_memory().await;
    assert_eq!(configs.get("prod").await?.unwrap().port, 2);
    // The wrong type is the caller's error; the entry stays.
    match cache.typed::<Vec<u8>>().get("prod").await {
        Err(Error::Decode { key, .. }) => assert_eq!(key, "prod"),
        other => panic!("expected a decode error, got {other:?}"),
    }
    assert_eq!(configs.get("prod").await?.unwrap().port, 2);
    let loaded = configs
        .try_get_with("dev", || async {
            Ok::<_, std::io::Error>(Some(Config { port: 3 }))
        })
        .await?;
    assert_eq!(loaded.unwrap().port, 3);
    assert_eq!(cache.get("dev").await?.unwrap(), r#"{"port":3}"#);
    Ok(())
}
