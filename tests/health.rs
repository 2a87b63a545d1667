//! Health that notices: a source failing now makes L3 degraded with its last error, before the
//! breaker opens, in this process and in another one sharing the database file.

mod support;

use std::time::Duration;

use support::{outage, FakeSource};
use tiercache::breaker::{BreakerPolicy, CircuitState};
use tiercache::{HealthStatus, MockClock, TieredCache};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn builder(source: &FakeSource, clock: &MockClock) -> tiercache::TieredCacheBuilder {
    TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .source_breaker(
            BreakerPolicy::builder()
                .failure_threshold(5)
                .minimum_calls(u32::MAX)
                .base_recovery(Duration::from_secs(60))
                .max_recovery(Duration::from_secs(60))
                .jitter(0.0)
                .build()
                .expect("valid policy"),
        )
}

#[tokio::test]
async fn failing_reads_degrade_l3_before_the_breaker_opens() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock).build()?;
    assert_eq!(cache.health().await.status, HealthStatus::Healthy);

    source.fail_fetches(Some(outage()));
    assert!(cache.get("a").await.is_err());
    let h = cache.health().await;
    assert_eq!(cache.source_breaker_status().state, CircuitState::Closed);
    assert_eq!(h.l3.status, HealthStatus::Degraded);
    assert_eq!(h.status, HealthStatus::Degraded);
    assert_eq!(h.l3.consecutive_failures, 1);
    let e = h.l3.last_error.expect("the last error");
    assert!(e.contains("503"), "{e}");

    // The source recovers: the next success makes it healthy again.
    source.fail_fetches(None);
    source.insert("a", "alpha");
    cache.get("a").await?;
    assert_eq!(cache.health().await.l3.status, HealthStatus::Healthy);
    Ok(())
}

#[tokio::test]
async fn another_process_sees_the_failures_and_the_last_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let first = builder(&source, &clock).sqlite_path(&path).build()?;
    source.fail_fetches(Some(outage()));
    for _ in 0..2 {
        assert!(first.get("a").await.is_err());
    }
    // A second cache on the same file (another process, as the CLI's `health` is) that never
    // called the source itself.
    let second = builder(&FakeSource::new(), &clock)
        .sqlite_path(&path)
        .build()?;
    let h = second.health().await;
    assert_eq!(h.l3.status, HealthStatus::Degraded, "{h}");
    assert_eq!(h.l3.consecutive_failures, 2);
    let e = h.l3.last_error.clone().expect("persisted with the breaker");
    assert!(e.contains("Service Unavailable"), "{e}");
    assert!(h.to_string().contains("last error"), "{h}");
    Ok(())
}

#[tokio::test]
async fn an_open_breaker_says_until_when_in_rfc3339() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock).build()?;
    source.fail_fetches(Some(outage()));
    for _ in 0..5 {
        assert!(cache.get("a").await.is_err());
    }
    let h = serde_json::to_value(cache.health().await)?;
    assert_eq!(h["l3"]["breaker"]["state"], "open", "{h}");
    for path in ["/l3/next_attempt", "/l3/breaker/next_attempt"] {
        let at = h.pointer(path).and_then(|v| v.as_str()).unwrap_or_default();
        assert!(humantime::parse_rfc3339(at).is_ok(), "{path}: {h}");
    }
    let stats = cache.stats().await;
    let l3 = serde_json::to_value(&stats.breakers)?;
    let next = l3[2]["next_attempt"].as_str().unwrap_or_default();
    assert!(humantime::parse_rfc3339(next).is_ok(), "{l3}");
    let text = stats.to_string();
    assert!(
        text.contains("breaker l3: open") && text.contains("; next try "),
        "{text}"
    );
    Ok(())
}
