//! Behaviour of the cache's read and write paths, against a scripted fake source.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::{outage, FakeSource};
use tiercache::source::SourceError;
use tiercache::{
    Clock, Error, Freshness, KeyError, MockClock, OnCorrupt, StaleReason, Strategy, Tier,
    TieredCache,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(60);

fn builder(source: &FakeSource, clock: &MockClock) -> tiercache::TieredCacheBuilder {
    TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(3600))
        .negative_ttl(Duration::from_secs(10))
}

#[tokio::test]
async fn read_through_fills_l2_and_l1() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;

    let first = cache.lookup("a").await?.expect("present");
    assert_eq!(
        (first.value.as_ref(), first.tier),
        (&b"alpha"[..], Tier::L3)
    );
    assert_eq!(first.freshness, Freshness::Fresh);
    assert_eq!(first.validator.as_deref(), Some("\"v1\""));

    clock.advance(Duration::from_secs(5));
    let second = cache.lookup("a").await?.expect("present");
    assert_eq!(second.tier, Tier::L1);
    assert_eq!(second.age, Duration::from_secs(5));
    assert_eq!(source.fetch_count(), 1);
    assert_eq!(
        cache.store_summary().await?.entries,
        1,
        "filled into L2 too"
    );
    Ok(())
}

#[tokio::test]
async fn restart_serves_from_l2_then_promotes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    {
        let cache = builder(&source, &clock).sqlite_path(&path).build()?;
        cache.get("a").await?;
        cache
            .set_json("typed", &serde_json::json!({"n": 1}))
            .await?;
        cache.close().await?;
    }
    let cache = builder(&source, &clock).sqlite_path(&path).build()?;
    let l = cache.lookup("a").await?.expect("persisted");
    assert_eq!((l.tier, l.value), (Tier::L2, Bytes::from("alpha")));
    assert_eq!(cache.lookup("a").await?.expect("promoted").tier, Tier::L1);
    let typed: serde_json::Value = cache.get_json("typed").await?.expect("persisted");
    assert_eq!(typed["n"], 1);
    assert_eq!(source.fetch_count(), 1, "the restart cost no source call");
    Ok(())
}

#[tokio::test]
async fn promotion_keeps_remaining_lifetime() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    builder(&source, &clock)
        .sqlite_path(&path)
        .build()?
        .get("a")
        .await?;
    clock.advance(Duration::from_secs(50));
    let cache = builder(&source, &clock).sqlite_path(&path).build()?;
    assert_eq!(cache.lookup("a").await?.unwrap().tier, Tier::L2);
    // 10 s of freshness were left when it was promoted; after 11 s it must be revalidated.
    clock.advance(Duration::from_secs(11));
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!(l.tier, Tier::L3);
    assert_eq!(
        source.fetches().last().unwrap().1.as_deref(),
        Some("\"v1\"")
    );
    Ok(())
}

#[tokio::test]
async fn expired_entry_is_revalidated_with_its_etag() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    clock.advance(TTL + Duration::from_secs(1));
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!(
        (l.tier, l.freshness, l.age),
        (Tier::L3, Freshness::Fresh, Duration::ZERO)
    );
    assert_eq!(
        source.fetches(),
        vec![("a".into(), None), ("a".into(), Some("\"v1\"".into()))]
    );
    // Renewed: fresh again for a full TTL without another call.
    clock.advance(TTL - Duration::from_secs(1));
    assert_eq!(cache.lookup("a").await?.unwrap().tier, Tier::L1);
    assert_eq!(source.fetch_count(), 2);
    // A changed value comes back whole.
    source.insert("a", "alpha2");
    clock.advance(Duration::from_secs(2));
    assert_eq!(cache.get("a").await?.unwrap(), "alpha2");
    Ok(())
}

#[tokio::test]
async fn max_age_per_read_forces_revalidation() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    clock.advance(Duration::from_secs(1));
    let opts = tiercache::ReadOptions::new().max_age(Duration::ZERO);
    let l = cache.lookup_with("a", &opts).await?.unwrap();
    assert_eq!(l.tier, Tier::L3);
    assert_eq!(source.fetches()[1].1.as_deref(), Some("\"v1\""));
    // A failing source with max-age 0 still gets the stale-able copy.
    source.fail_fetches(Some(outage()));
    clock.advance(Duration::from_secs(1));
    let l = cache.lookup_with("a", &opts).await?.unwrap();
    assert_eq!(l.value, "alpha");
    Ok(())
}

#[tokio::test]
async fn not_found_is_cached_negatively() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock).build()?;
    assert_eq!(cache.get("missing").await?, None);
    assert_eq!(cache.get("missing").await?, None);
    assert_eq!(
        source.fetch_count(),
        1,
        "the second miss was answered by the negative entry"
    );
    clock.advance(Duration::from_secs(11));
    source.insert("missing", "now here");
    assert_eq!(cache.get("missing").await?.unwrap(), "now here");
    assert_eq!(source.fetch_count(), 2);
    Ok(())
}

#[tokio::test]
async fn stale_copy_served_when_source_fails() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    source.fail_fetches(Some(outage()));
    clock.advance(TTL + Duration::from_secs(30));
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!(l.value, "alpha");
    assert_eq!(
        l.freshness,
        Freshness::Stale {
            reason: StaleReason::SourceError
        }
    );
    assert_eq!(l.tier, Tier::L1);
    assert_eq!(l.age, TTL + Duration::from_secs(30));

    source.fail_fetches(Some(SourceError::RateLimited {
        until: clock.now() + Duration::from_secs(60),
        status: Some(403),
        message: "API rate limit exceeded".into(),
    }));
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!(
        l.freshness,
        Freshness::Stale {
            reason: StaleReason::RateLimited
        }
    );

    // Past the stale window: nothing to fall back on.
    clock.advance(Duration::from_secs(3600));
    let err = cache.get("a").await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    Ok(())
}

#[tokio::test]
async fn no_stale_copy_is_a_typed_error() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.fail_fetches(Some(outage()));
    let cache = builder(&source, &clock).build()?;
    match cache.get("a").await {
        Err(Error::Unavailable { reason, source, .. }) => {
            assert_eq!(reason, StaleReason::SourceError);
            assert!(source.to_string().contains("Service Unavailable"));
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn refusals_that_are_not_outages_pass_through() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.fail_fetches(Some(SourceError::Unauthorized {
        status: Some(401),
        message: "Bad credentials".into(),
    }));
    let cache = builder(&source, &clock).build()?;
    let err = cache.get("a").await.unwrap_err();
    assert!(matches!(err, Error::Source { .. }), "{err:?}");
    // The error names the key; the source's own words are its source.
    let source_text = err.source_error().map(ToString::to_string);
    assert!(
        source_text.is_some_and(|t| t.contains("Bad credentials")),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn thousand_concurrent_gets_make_one_source_call() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("hot", "value");
    source.set_latency(Duration::from_millis(50));
    let cache = builder(&source, &clock).build()?;
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get("hot").await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await??.unwrap(), "value");
    }
    assert_eq!(source.fetch_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn waiters_share_the_error() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.set_latency(Duration::from_millis(50));
    source.fail_fetches(Some(outage()));
    let cache = builder(&source, &clock).build()?;
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get("k").await })
        })
        .collect();
    for t in tasks {
        assert!(t.await?.unwrap_err().is_unavailable());
    }
    assert_eq!(source.fetch_count(), 1);
    Ok(())
}

#[tokio::test]
async fn mget_uses_one_statement_and_fetches_each_missing_key_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    for i in 0..50 {
        source.insert(&format!("k{i}"), format!("v{i}"));
    }
    {
        // Fill L2 with k0..k39 in a first process.
        let cache = builder(&source, &clock).sqlite_path(&path).build()?;
        let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        for r in cache.mget(&keys).await {
            assert!(r?.is_some());
        }
    }
    let calls_before = source.fetch_count();
    let cache = builder(&source, &clock).sqlite_path(&path).build()?;
    cache.get("k0").await?; // one single read: k0 is now in L1
    let statements_before = cache.l2_read_statements();
    let mut keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    keys.push("k45".into()); // a duplicate of a key only the source has
    keys.push("k1".into()); // a duplicate of an L2 key
    keys.push("".into()); // an invalid key
    keys.push("nope".into()); // a key the source does not have
    let results = cache.mget(&keys).await;
    assert_eq!(results.len(), keys.len());
    assert_eq!(
        cache.l2_read_statements() - statements_before,
        1,
        "one SQL statement"
    );
    assert_eq!(
        results[0].as_ref().unwrap().as_ref().unwrap().tier,
        Tier::L1
    );
    assert_eq!(
        results[1].as_ref().unwrap().as_ref().unwrap().tier,
        Tier::L2
    );
    assert_eq!(
        results[45].as_ref().unwrap().as_ref().unwrap().tier,
        Tier::L3
    );
    for (i, k) in keys.iter().enumerate().take(52) {
        let l = results[i].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(l.value, format!("v{}", &k[1..]));
    }
    assert!(results[52].as_ref().unwrap_err().is_invalid_key());
    assert!(results[53].as_ref().unwrap().is_none());
    // k40..k49 and "nope": one call each, duplicates included once.
    assert_eq!(source.fetch_count() - calls_before, 11);
    Ok(())
}

#[tokio::test]
async fn mget_past_the_parameter_limit_is_still_one_statement() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock)
        .strategy(Strategy::CacheAside)
        .build()?;
    let keys: Vec<String> = (0..40_000).map(|i| format!("key-{i}")).collect();
    for k in keys.iter().step_by(1000) {
        cache.set(k, "x").await?;
    }
    // Cold L1: a fresh cache over the same L2 is not possible in memory, so drop L1 copies.
    let before = cache.l2_read_statements();
    let results = cache.mget(&keys).await;
    assert_eq!(cache.l2_read_statements() - before, 1);
    assert_eq!(
        results.iter().filter(|r| matches!(r, Ok(Some(_)))).count(),
        40
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn overlapping_mgets_share_source_calls() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    for k in ["a", "b", "c"] {
        source.insert(k, k);
    }
    source.set_latency(Duration::from_millis(20));
    let cache = builder(&source, &clock).build()?;
    let (c1, c2) = (cache.clone(), cache.clone());
    let t1 = tokio::spawn(async move { c1.mget(&["a", "b"]).await });
    let t2 = tokio::spawn(async move { c2.mget(&["b", "c"]).await });
    let g = cache.get("a");
    let (r1, r2, r3) = tokio::join!(t1, t2, g);
    assert!(r1?
        .iter()
        .chain(r2?.iter())
        .all(|r| matches!(r, Ok(Some(_)))));
    assert_eq!(r3?.unwrap(), "a");
    assert_eq!(source.fetch_count(), 3);
    Ok(())
}

#[tokio::test]
async fn cache_aside_never_calls_the_source() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "from source");
    let cache = builder(&source, &clock)
        .strategy(Strategy::CacheAside)
        .build()?;
    assert_eq!(cache.get("a").await?, None);
    cache.set("a", "from app").await?;
    assert_eq!(cache.get("a").await?.unwrap(), "from app");
    clock.advance(TTL + Duration::from_secs(1));
    assert_eq!(cache.get("a").await?, None, "expired entries are misses");
    assert_eq!(source.fetch_count(), 0);
    assert!(source.writes().is_empty());
    Ok(())
}

#[tokio::test]
async fn read_through_set_stays_local() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock).build()?;
    cache.set("a", "local").await?;
    assert_eq!(cache.lookup("a").await?.unwrap().tier, Tier::L1);
    assert!(source.writes().is_empty());
    cache.delete("a").await?;
    assert_eq!(cache.store_summary().await?.entries, 0);
    Ok(())
}

#[tokio::test]
async fn write_through_writes_the_source_first() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock)
        .strategy(Strategy::WriteThrough)
        .build()?;
    cache.set("a", "one").await?;
    assert_eq!(source.value("a").unwrap(), "one");
    assert_eq!(cache.lookup("a").await?.unwrap().tier, Tier::L1);

    source.fail_writes(Some(SourceError::Conflict {
        status: Some(409),
        message: "sha does not match".into(),
    }));
    let err = cache.set("a", "two").await.unwrap_err();
    let source_text = err.source_error().map(ToString::to_string);
    assert!(
        source_text.is_some_and(|t| t.contains("sha does not match")),
        "{err:?}"
    );
    assert_eq!(cache.get("a").await?.unwrap(), "one", "caches untouched");
    assert_eq!(cache.store_summary().await?.entries, 1);

    source.fail_writes(None);
    cache.delete("a").await?;
    assert_eq!(source.value("a"), None);
    Ok(())
}

#[tokio::test]
async fn write_behind_delivers_on_flush_coalesced_and_in_order() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.fail_writes(Some(outage()));
    let cache = builder(&source, &clock)
        .strategy(Strategy::WriteBehind)
        .build()?;
    cache.set("a", "1").await?;
    cache.set("a", "2").await?;
    cache.set("b", "x").await?;
    cache.delete("b").await?;
    cache.set("a", "3").await?;
    assert_eq!(cache.get("a").await?.unwrap(), "3");
    let report = cache.flush().await?;
    assert!(!report.is_complete());
    assert_eq!(report.pending, 5);
    assert!(report
        .stuck
        .iter()
        .any(|(_, e)| e.contains("Service Unavailable")));

    source.fail_writes(None);
    let before = source.writes().len();
    let report = cache.flush().await?;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.delivered, 5);
    let delivered = &source.writes()[before..];
    assert_eq!(delivered.len(), 2, "one write per key: {delivered:?}");
    assert!(delivered.contains(&("a".into(), Some(Bytes::from("3")))));
    assert!(delivered.contains(&("b".into(), None)));
    assert_eq!(source.value("a").unwrap(), "3");
    assert_eq!(cache.store_summary().await?.outbox_depth, 0);
    Ok(())
}

#[tokio::test]
async fn write_behind_rejected_write_becomes_a_dead_letter() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.fail_writes(Some(SourceError::Conflict {
        status: Some(422),
        message: "Invalid request".into(),
    }));
    let cache = builder(&source, &clock)
        .strategy(Strategy::WriteBehind)
        .build()?;
    cache.set("a", "1").await?;
    // The background flusher or this flush: either way the refused write ends as a dead letter.
    let report = cache.flush().await?;
    assert!(
        report.is_complete(),
        "dead letters are not pending: {report:?}"
    );
    let dead = cache.dead_letters().await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key, "a");
    assert!(dead[0]
        .error
        .as_deref()
        .unwrap()
        .contains("Invalid request"));
    assert_eq!(cache.store_summary().await?.dead_letters, 1);

    source.fail_writes(None);
    assert!(cache.retry_dead_letter(dead[0].id).await?);
    assert!(cache.flush().await?.is_complete());
    assert_eq!(source.value("a").unwrap(), "1");
    assert!(cache.dead_letters().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn write_behind_pending_writes_replay_after_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.fail_writes(Some(outage()));
    {
        let cache = builder(&source, &clock)
            .strategy(Strategy::WriteBehind)
            .close_timeout(Duration::from_millis(100))
            .sqlite_path(&path)
            .build()?;
        cache.set("a", "kept").await?;
        let report = cache.close().await?;
        assert_eq!(report.pending, 1);
    }
    source.fail_writes(None);
    let cache = builder(&source, &clock)
        .strategy(Strategy::WriteBehind)
        .sqlite_path(&path)
        .build()?;
    assert!(cache.flush().await?.is_complete());
    assert_eq!(source.value("a").unwrap(), "kept");
    Ok(())
}

#[tokio::test]
async fn bad_keys_touch_no_tier() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock).build()?;
    let long = "k".repeat(1025);
    for (key, expected) in [
        ("", KeyError::Empty),
        (long.as_str(), KeyError::TooLong { len: 1025 }),
        ("a\0b", KeyError::ControlCharacter { at: 1 }),
        ("a\u{7}b", KeyError::ControlCharacter { at: 1 }),
    ] {
        match cache.get(key).await {
            Err(Error::InvalidKey { reason, .. }) => assert_eq!(reason, expected),
            other => panic!("{key:?}: {other:?}"),
        }
        assert!(cache.set(key, "v").await.unwrap_err().is_invalid_key());
    }
    let msg = cache.get(&long).await.unwrap_err().to_string();
    assert!(
        msg.len() < 200,
        "the message does not carry the whole key: {msg}"
    );
    assert_eq!(source.fetch_count(), 0);
    assert_eq!(cache.store_summary().await?.entries, 0);
    Ok(())
}

#[tokio::test]
async fn bad_configuration_is_a_clear_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cases: Vec<(tiercache::TieredCacheBuilder, &str)> = vec![
        (TieredCache::builder().memory_capacity(0), "memory_capacity"),
        (
            TieredCache::builder().memory_capacity(u64::MAX),
            "memory_capacity",
        ),
        (
            TieredCache::builder().sqlite_capacity(10),
            "sqlite_capacity",
        ),
        (
            TieredCache::builder()
                .ttl(Duration::ZERO)
                .stale_ttl(Duration::ZERO),
            "both zero",
        ),
        (
            TieredCache::builder().stale_ttl(Duration::from_secs(u64::MAX / 2)),
            "stale_ttl",
        ),
        (
            TieredCache::builder()
                .timeout(Duration::from_secs(1))
                .soft_timeout(Duration::from_secs(2)),
            "soft_timeout",
        ),
        (
            TieredCache::builder().fetch_concurrency(0),
            "fetch_concurrency",
        ),
        (
            TieredCache::builder().strategy(Strategy::WriteThrough),
            "no source",
        ),
        (TieredCache::builder().sqlite_path(dir.path()), "directory"),
        (
            TieredCache::builder().sqlite_path(dir.path().join("no/such/dir/cache.db")),
            "cannot open",
        ),
    ];
    for (b, needle) in cases {
        match b.build() {
            Err(Error::Config(msg)) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
            other => panic!("expected a config error mentioning {needle:?}, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn corrupt_file_fails_or_is_moved_aside() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    std::fs::write(&path, vec![0x42u8; 8192])?;
    match TieredCache::builder().sqlite_path(&path).build() {
        Err(e @ Error::CorruptDatabase { .. }) => assert!(e.is_storage()),
        other => panic!("expected CorruptDatabase, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path)?,
        vec![0x42u8; 8192],
        "the file was left alone"
    );

    let cache = TieredCache::builder()
        .sqlite_path(&path)
        .on_corrupt(OnCorrupt::MoveAside)
        .strategy(Strategy::CacheAside)
        .build()?;
    cache.set("a", "fresh start").await?;
    let aside: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path())?,
        vec![0x42u8; 8192],
        "kept, not deleted"
    );
    Ok(())
}

#[tokio::test]
async fn undecodable_value_is_an_error_and_the_entry_is_kept() -> TestResult {
    #[derive(serde::Deserialize, Debug)]
    struct Config {
        #[allow(dead_code)]
        port: u16,
    }
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock)
        .strategy(Strategy::CacheAside)
        .build()?;
    cache.set("cfg", "{not json").await?;
    match cache.get_json::<Config>("cfg").await {
        Err(Error::Decode { key, .. }) => assert_eq!(key, "cfg"),
        other => panic!("expected a decode error, got {other:?}"),
    }
    // A type mismatch is the caller's error: the entry stays, in L1 and in L2 (issue #12).
    assert_eq!(cache.get("cfg").await?.as_deref(), Some(&b"{not json"[..]));
    cache.clear_memory().await;
    assert_eq!(
        cache.lookup("cfg").await?.map(|l| (l.value, l.tier)),
        Some((bytes::Bytes::from_static(b"{not json"), Tier::L2)),
        "kept in L2"
    );
    cache
        .set_json("cfg", &serde_json::json!({"port": 8080}))
        .await?;
    assert_eq!(cache.get_json::<Config>("cfg").await?.unwrap().port, 8080);
    Ok(())
}

#[tokio::test]
async fn l2_stays_within_its_byte_bound() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock)
        .strategy(Strategy::CacheAside)
        .sqlite_capacity(64 * 1024)
        .build()?;
    for i in 0..300 {
        clock.advance(Duration::from_millis(1));
        cache.set(&format!("k{i}"), vec![7u8; 1024]).await?;
    }
    let summary = cache.store_summary().await?;
    assert!(summary.bytes <= 64 * 1024, "{summary:?}");
    assert!(summary.entries >= 50, "{summary:?}");
    Ok(())
}

#[tokio::test]
async fn offline_mode_serves_what_is_held() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    cache.set_offline(true);
    clock.advance(TTL * 2);
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!(
        l.freshness,
        Freshness::Stale {
            reason: StaleReason::Offline
        }
    );
    assert!(cache.get("b").await.unwrap_err().is_unavailable());
    assert_eq!(source.fetch_count(), 1);
    Ok(())
}

#[tokio::test]
async fn warm_fetches_everything_listed() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    for k in ["o/r/dir/a", "o/r/dir/b", "o/r/other"] {
        source.insert(k, k);
    }
    let cache = builder(&source, &clock).build()?;
    let seen = std::sync::atomic::AtomicUsize::new(0);
    let summary = cache
        .warm("o/r/dir/", |p| {
            seen.fetch_max(p.done, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(p.total, 2);
        })
        .await?;
    assert_eq!((summary.listed, summary.fetched), (2, 2));
    assert_eq!(seen.into_inner(), 2);
    clock.advance(TTL * 2);
    let again = cache.warm("o/r/dir/", |_| {}).await?;
    assert_eq!(again.not_modified, 2);
    Ok(())
}

#[tokio::test]
async fn closed_cache_refuses_calls_and_drop_does_not_block() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock)
        .strategy(Strategy::WriteBehind)
        .build()?;
    cache.set("a", "1").await?;
    let report = cache.close().await?;
    assert!(report.is_complete());
    assert!(matches!(cache.get("a").await, Err(Error::Closed)));
    drop(cache);
    // A write-behind cache dropped without close: its pending write stays in the outbox.
    let other = builder(&source, &clock)
        .strategy(Strategy::WriteBehind)
        .build()?;
    drop(other);
    Ok(())
}

#[test]
fn public_types_are_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<TieredCache>();
    is::<Error>();
    is::<tiercache::Lookup>();
    is::<tiercache::FlushReport>();
    is::<tiercache::DeadLetter>();
    is::<tiercache::stats::StatsSnapshot>();
    is::<tiercache::TieredCacheBuilder>();
}

#[test]
fn futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let cache = TieredCache::builder().build().unwrap();
    is_send(&cache.get("k"));
    is_send(&cache.lookup("k"));
    is_send(&cache.mget(&["k"]));
    is_send(&cache.set("k", "v"));
    is_send(&cache.delete("k"));
    is_send(&cache.flush());
    is_send(&cache.warm("p", |_| {}));
}

#[tokio::test]
async fn write_behind_reads_its_own_undelivered_writes() -> TestResult {
    for mode in [
        tiercache::OutboxMode::Durable,
        tiercache::OutboxMode::Memory,
    ] {
        let (source, clock) = (FakeSource::new(), MockClock::new());
        source.insert("a", "old");
        source.insert("b", "old");
        source.fail_writes(Some(outage()));
        let cache = builder(&source, &clock)
            .strategy(Strategy::WriteBehind)
            .outbox(mode)
            .build()?;
        cache.set("a", "new").await?;
        cache.get("b").await?;
        cache.delete("b").await?;
        // Past the TTL, the source (still holding "old") must not replace the undelivered writes.
        clock.advance(TTL + Duration::from_secs(1));
        assert_eq!(cache.get("a").await?.unwrap(), "new", "{mode:?}");
        assert_eq!(cache.get("b").await?, None, "{mode:?}");
        assert_eq!(
            source.fetch_count(),
            1,
            "{mode:?}: only the first read of b"
        );
        // Delivered: the source is the truth again.
        source.fail_writes(None);
        assert!(cache.flush().await?.is_complete());
        clock.advance(TTL + Duration::from_secs(1));
        assert_eq!(cache.get("a").await?.unwrap(), "new");
        assert_eq!(cache.get("b").await?, None);
        assert!(
            source.fetch_count() > 1,
            "{mode:?}: fetched again after delivery"
        );
    }
    Ok(())
}
