//! The scenarios trusted caches test: a failing, flapping, slow or rate-limited source, a failing
//! disk, and breakers shared through the database file. Time is a mock clock (and paused Tokio
//! time where calls overlap); nothing sleeps.

mod support;

use std::time::Duration;

use support::{outage, FakeSource};
use tiercache::breaker::{BreakerPolicy, CircuitState};
use tiercache::source::SourceError;
use tiercache::{
    Clock, Event, Freshness, HealthStatus, MockClock, OutboxMode, StaleReason, Strategy, Tier,
    TieredCache,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(60);

fn policy() -> tiercache::breaker::BreakerPolicyBuilder {
    BreakerPolicy::builder()
        .failure_threshold(3)
        .minimum_calls(u32::MAX)
        .base_recovery(Duration::from_secs(10))
        .max_recovery(Duration::from_secs(80))
        .jitter(0.0)
}

fn builder(source: &FakeSource, clock: &MockClock) -> tiercache::TieredCacheBuilder {
    TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(24 * 3600))
        .source_breaker(policy().build().unwrap())
}

fn stale(reason: StaleReason) -> Freshness {
    Freshness::Stale { reason }
}

/// Caches `keys` from a healthy source, then lets them go stale.
async fn warm_then_expire(cache: &TieredCache, clock: &MockClock, keys: &[&str]) -> TestResult {
    for k in keys {
        cache.get(k).await?;
    }
    clock.advance(TTL + Duration::from_secs(1));
    Ok(())
}

#[tokio::test]
async fn breaker_opens_at_the_threshold_and_stale_is_served() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    let mut events = cache.subscribe();
    warm_then_expire(&cache, &clock, &["a"]).await?;
    source.fail_fetches(Some(outage()));
    for _ in 0..3 {
        let l = cache.lookup("a").await?.unwrap();
        assert_eq!(l.freshness, stale(StaleReason::SourceError));
    }
    assert_eq!(source.fetch_count(), 4, "1 warm-up + 3 failures");
    assert_eq!(cache.source_breaker_status().state, CircuitState::Open);

    // Open: served stale at once, the source is not called.
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!(
        (l.freshness, l.value.as_ref()),
        (stale(StaleReason::CircuitOpen), &b"alpha"[..])
    );
    assert_eq!(source.fetch_count(), 4);
    // No stale copy: a typed error naming the open circuit.
    let err = cache.get("b").await.unwrap_err();
    assert!(err.is_unavailable());
    assert!(err.to_string().contains("circuit"), "{err}");

    let health = cache.health().await;
    assert_eq!(health.status, HealthStatus::Degraded);
    assert_eq!(health.l3.consecutive_failures, 3);
    assert!(health
        .l3
        .last_error
        .as_deref()
        .unwrap()
        .contains("Service Unavailable"));
    assert!(health.l3.next_attempt.is_some());
    let json = serde_json::to_value(&health)?;
    assert_eq!(json["status"], "degraded");

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(seen
        .iter()
        .any(|e| matches!(e, Event::TierDegraded { tier: Tier::L3, .. })));
    assert!(seen.iter().any(|e| matches!(
        e,
        Event::StaleServed {
            reason: StaleReason::CircuitOpen,
            ..
        }
    )));
    Ok(())
}

#[tokio::test]
async fn recovery_probes_then_closes() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    let mut events = cache.subscribe();
    warm_then_expire(&cache, &clock, &["a"]).await?;
    source.fail_fetches(Some(outage()));
    for _ in 0..3 {
        cache.get("a").await?;
    }
    // Before the recovery timeout: nothing is sent.
    clock.advance(Duration::from_millis(9_999));
    cache.get("a").await?;
    assert_eq!(source.fetch_count(), 4);
    // The probe fails: open again, for twice as long.
    clock.advance(Duration::from_millis(1));
    cache.get("a").await?;
    assert_eq!(source.fetch_count(), 5);
    assert_eq!(cache.source_breaker_status().state, CircuitState::Open);
    clock.advance(Duration::from_secs(19));
    cache.get("a").await?;
    assert_eq!(source.fetch_count(), 5, "the second open window is 20 s");
    // The source is back: the next probe closes the breaker and the value is fresh again.
    source.fail_fetches(None);
    clock.advance(Duration::from_secs(1));
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!((l.tier, l.freshness), (Tier::L3, Freshness::Fresh));
    assert_eq!(cache.source_breaker_status().state, CircuitState::Closed);
    assert_eq!(cache.health().await.status, HealthStatus::Healthy);
    let mut recovered = false;
    while let Ok(e) = events.try_recv() {
        recovered |= matches!(e, Event::TierRecovered { tier: Tier::L3 });
    }
    assert!(recovered);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_exactly_the_configured_probes_through() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    for k in &keys {
        source.insert(k, "v");
    }
    let cache = builder(&source, &clock)
        .source_breaker(policy().half_open_probes(2).success_threshold(2).build()?)
        .build()?;
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    warm_then_expire(&cache, &clock, &refs).await?;
    source.fail_fetches(Some(outage()));
    for _ in 0..3 {
        cache.get("k0").await?;
    }
    let before = source.fetch_count();
    clock.advance(Duration::from_secs(10));
    source.fail_fetches(None);
    source.set_latency(Duration::from_millis(50));
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { cache.lookup(&k).await })
        })
        .collect();
    let mut fresh = 0;
    for t in tasks {
        let l = t.await??.unwrap();
        if l.freshness == Freshness::Fresh {
            fresh += 1;
        } else {
            assert_eq!(l.freshness, stale(StaleReason::CircuitOpen));
        }
    }
    assert_eq!(source.fetch_count() - before, 2, "two probes");
    assert_eq!(fresh, 2);
    assert_eq!(cache.source_breaker_status().state, CircuitState::Closed);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_reads_during_an_outage_make_one_call_per_open_window() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    for k in &keys {
        source.insert(k, "v");
    }
    let cache = builder(&source, &clock).build()?;
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    warm_then_expire(&cache, &clock, &refs).await?;
    source.fail_fetches(Some(outage()));
    source.set_latency(Duration::from_millis(20));
    for _ in 0..3 {
        cache.get("k0").await?;
    }
    for window in 0..3 {
        clock.advance(Duration::from_secs(80));
        let before = source.fetch_count();
        let tasks: Vec<_> = keys
            .iter()
            .map(|k| {
                let (cache, k) = (cache.clone(), k.clone());
                tokio::spawn(async move { cache.lookup(&k).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await??.unwrap().freshness.is_stale());
        }
        assert_eq!(source.fetch_count() - before, 1, "window {window}");
    }
    Ok(())
}

#[tokio::test]
async fn a_flapping_source_trips_the_rate_rule_not_the_consecutive_one() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let consecutive_only = builder(&source, &clock).build()?;
    let by_rate = builder(&source, &clock)
        .source_breaker(
            policy()
                .failure_threshold(100)
                .window(Duration::from_secs(3600))
                .minimum_calls(6)
                .failure_rate_threshold(0.5)
                .build()?,
        )
        .build()?;
    let (mut quiet, mut tripped) = (consecutive_only.subscribe(), by_rate.subscribe());
    for cache in [&consecutive_only, &by_rate] {
        warm_then_expire(cache, &clock, &["a"]).await?;
    }
    for i in 0..8 {
        source.fail_fetches((i % 2 == 0).then(outage));
        for cache in [&consecutive_only, &by_rate] {
            // Keep the copy stale so every read asks the source.
            cache.lookup("a").await?;
        }
        clock.advance(TTL + Duration::from_secs(1));
    }
    while let Ok(e) = quiet.try_recv() {
        assert!(
            !matches!(e, Event::BreakerTransition { .. }),
            "the consecutive rule never trips: {e:?}"
        );
    }
    let mut opened_by_rate = false;
    while let Ok(e) = tripped.try_recv() {
        opened_by_rate |= matches!(
            e,
            Event::BreakerTransition {
                to: CircuitState::Open,
                cause: tiercache::breaker::TransitionCause::FailureRate,
                ..
            }
        );
    }
    assert!(opened_by_rate);
    Ok(())
}

#[tokio::test]
async fn a_rate_limit_reset_is_honored_to_the_millisecond() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    warm_then_expire(&cache, &clock, &["a"]).await?;
    let reset = clock.now() + Duration::from_secs(30);
    source.fail_fetches(Some(SourceError::RateLimited {
        until: reset,
        status: Some(403),
        message: "API rate limit exceeded".into(),
    }));
    assert_eq!(
        cache.lookup("a").await?.unwrap().freshness,
        stale(StaleReason::RateLimited)
    );
    assert_eq!(source.fetch_count(), 2);
    source.fail_fetches(None);
    clock.advance(Duration::from_millis(29_999));
    assert_eq!(
        cache.lookup("a").await?.unwrap().freshness,
        stale(StaleReason::RateLimited)
    );
    assert_eq!(source.fetch_count(), 2, "nothing sent before the reset");
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        cache.lookup("a").await?.unwrap().freshness,
        Freshness::Fresh
    );
    assert_eq!(source.fetch_count(), 3);
    Ok(())
}

#[tokio::test]
async fn a_second_cache_on_the_same_file_respects_the_open_breaker() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let clock = MockClock::new();
    let first_source = FakeSource::new();
    first_source.fail_fetches(Some(outage()));
    let first = builder(&first_source, &clock).sqlite_path(&path).build()?;
    for k in ["x", "y", "z"] {
        assert!(first.get(k).await.unwrap_err().is_unavailable());
    }
    assert_eq!(first.source_breaker_status().state, CircuitState::Open);

    let second_source = FakeSource::new();
    second_source.insert("x", "fine here");
    let second = builder(&second_source, &clock).sqlite_path(&path).build()?;
    let err = second.get("x").await.unwrap_err();
    assert!(err.to_string().contains("circuit"), "{err}");
    assert_eq!(second_source.fetch_count(), 0, "known down: not called");
    assert_eq!(
        second.health().await.l3.breaker.unwrap().state,
        CircuitState::Open
    );

    clock.advance(Duration::from_secs(10));
    assert_eq!(second.get("x").await?.unwrap(), "fine here");
    assert_eq!(second_source.fetch_count(), 1);
    Ok(())
}

#[tokio::test]
async fn ten_short_lived_processes_trip_one_shared_breaker() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let clock = MockClock::new();
    let mut calls = Vec::new();
    for _ in 0..10 {
        // Each "process": its own cache, its own source, one read, then gone.
        let source = FakeSource::new();
        source.fail_fetches(Some(outage()));
        let cache = builder(&source, &clock).sqlite_path(&path).build()?;
        assert!(cache.get("component").await.unwrap_err().is_unavailable());
        cache.close().await?;
        calls.push(source.fetch_count());
    }
    assert_eq!(calls, vec![1, 1, 1, 0, 0, 0, 0, 0, 0, 0]);
    Ok(())
}

#[tokio::test]
async fn a_full_disk_degrades_l2_and_the_cache_carries_on() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    for i in 0..40 {
        source.insert(&format!("k{i}"), vec![b'x'; 8 * 1024]);
    }
    let cache = builder(&source, &clock)
        .sqlite_path(dir.path().join("cache.db"))
        .sqlite_pragma("max_page_count", 40)
        .build()?;
    let mut events = cache.subscribe();
    for i in 0..40 {
        let l = cache.lookup(&format!("k{i}")).await?.unwrap();
        assert_eq!(l.value.len(), 8 * 1024);
    }
    let health = cache.health().await;
    assert_eq!(health.l2.status, HealthStatus::Degraded);
    assert!(
        health.l2.last_error.as_deref().unwrap().contains("full"),
        "{health:?}"
    );
    // Reads go on from L1 (and writes to L1) while L2 is bypassed.
    assert_eq!(cache.lookup("k39").await?.unwrap().tier, Tier::L1);
    cache.set("local", "still works").await?;
    assert_eq!(cache.get("local").await?.unwrap(), "still works");
    let mut degraded = false;
    while let Ok(e) = events.try_recv() {
        degraded |= matches!(e, Event::TierDegraded { tier: Tier::L2, .. });
    }
    assert!(degraded);
    Ok(())
}

#[tokio::test]
async fn l2_and_source_both_failing_l1_still_serves() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock)
        .sqlite_path(&path)
        .sqlite_pragma("cache_size", 0)
        .build()?;
    warm_then_expire(&cache, &clock, &["a"]).await?;
    // Corrupt the database under the running cache, and take the source down.
    let len = std::fs::metadata(&path)?.len() as usize;
    std::fs::write(&path, vec![0xA5u8; len.max(4096)])?;
    let wal = dir.path().join("cache.db-wal");
    if wal.exists() {
        std::fs::write(&wal, vec![0xA5u8; 4096])?;
    }
    source.fail_fetches(Some(outage()));
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!(
        (l.tier, l.freshness),
        (Tier::L1, stale(StaleReason::SourceError))
    );
    for k in ["b", "c", "d"] {
        assert!(cache.get(k).await.is_err());
    }
    let health = cache.health().await;
    assert_eq!(health.status, HealthStatus::Unhealthy, "{health}");
    assert_eq!(cache.get("a").await?.unwrap(), "alpha");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn soft_timeout_serves_stale_and_refreshes_in_the_background() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "old");
    let cache = builder(&source, &clock)
        .soft_timeout(Duration::from_millis(100))
        .timeout(Duration::from_secs(10))
        .build()?;
    warm_then_expire(&cache, &clock, &["a"]).await?;
    source.insert("a", "new");
    source.set_latency(Duration::from_secs(2));
    let started = tokio::time::Instant::now();
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!(
        (l.value.as_ref(), l.freshness),
        (&b"old"[..], stale(StaleReason::Timeout))
    );
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    // A second reader during the slow fetch joins it (single flight), then also gets stale.
    assert_eq!(cache.lookup("a").await?.unwrap().value, "old");
    tokio::time::sleep(Duration::from_secs(3)).await; // paused time: advances instantly
    let l = cache.lookup("a").await?.unwrap();
    assert_eq!((l.value.as_ref(), l.tier), (&b"new"[..], Tier::L1));
    assert_eq!(
        source.fetch_count(),
        2,
        "one warm-up, one background refresh"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn hard_timeout_without_a_stale_copy_is_unavailable() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "slow");
    source.set_latency(Duration::from_secs(30));
    let cache = builder(&source, &clock)
        .timeout(Duration::from_secs(2))
        .build()?;
    match cache.get("a").await {
        Err(tiercache::Error::Unavailable { reason, .. }) => {
            assert_eq!(reason, StaleReason::Timeout)
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn write_behind_waits_while_the_breaker_is_open() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock)
        .strategy(Strategy::WriteBehind)
        .build()?;
    cache.force_source_open().await;
    cache.set("a", "1").await?;
    let report = cache.flush().await?;
    assert_eq!(report.pending, 1);
    assert!(report.stuck[0].1.contains("circuit"), "{report:?}");
    assert!(source.writes().is_empty(), "nothing sent while open");
    cache.reset_source_breaker().await;
    assert!(cache.flush().await?.is_complete());
    assert_eq!(source.value("a").unwrap(), "1");
    Ok(())
}

#[tokio::test]
async fn a_flush_report_counts_every_pending_row_and_names_each_stuck_key_once() -> TestResult {
    for mode in [OutboxMode::Durable, OutboxMode::Memory] {
        let memory = mode == OutboxMode::Memory;
        let (source, clock) = (FakeSource::new(), MockClock::new());
        let cache = builder(&source, &clock)
            .strategy(Strategy::WriteBehind)
            .outbox(mode)
            .build()?;
        cache.force_source_open().await;
        cache.set("a", "1").await?;
        cache.set("b", "1").await?;
        cache.set("a", "2").await?;
        let report = cache.flush().await?;
        // The durable outbox keeps a row per write; the memory one coalesces per key.
        assert_eq!(report.pending, if memory { 2 } else { 3 }, "{report:?}");
        let keys: Vec<&str> = report.stuck.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b"], "{mode:?}: {report:?}");
        assert!(report.stuck.iter().all(|(_, e)| e.contains("circuit")));
    }
    Ok(())
}

#[tokio::test]
async fn an_undelivered_write_is_read_back_after_both_tiers_dropped_it() -> TestResult {
    for mode in [OutboxMode::Durable, OutboxMode::Memory] {
        let (source, clock) = (FakeSource::new(), MockClock::new());
        source.insert("a", "old");
        let cache = builder(&source, &clock)
            .strategy(Strategy::WriteBehind)
            .outbox(mode)
            // Room in L2 for about 60 1 KiB entries: later writes evict the first.
            .sqlite_capacity(64 * 1024)
            .build()?;
        cache.force_source_open().await;
        cache.set("a", "new").await?;
        for i in 0..160 {
            cache.set(&format!("filler/{i}"), vec![b'x'; 1024]).await?;
        }
        cache.clear_memory().await;
        let l = cache.lookup("a").await?.expect("the pending write");
        assert_eq!(
            (l.value.as_ref(), l.freshness),
            (&b"new"[..], Freshness::Fresh),
            "{mode:?}"
        );
        cache.clear_memory().await;
        let batch = cache.mget(&["a"]).await;
        let l = batch[0].as_ref().expect("no error").as_ref().expect("held");
        assert_eq!(l.value, "new", "{mode:?}: mget reads it back too");
        assert_eq!(
            source.fetch_count(),
            0,
            "the source's old value is not asked for"
        );
        // Delivered once the source is back; the source then holds it.
        cache.reset_source_breaker().await;
        assert!(cache.flush().await?.is_complete());
        assert_eq!(source.value("a").unwrap(), "new");
    }
    Ok(())
}

#[tokio::test]
async fn memory_outbox_delivers_and_reports_its_backlog() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.fail_writes(Some(outage()));
    let cache = builder(&source, &clock)
        .strategy(Strategy::WriteBehind)
        .outbox(OutboxMode::Memory)
        .build()?;
    cache.set("a", "1").await?;
    cache.set("a", "2").await?;
    cache.set("b", "x").await?;
    assert!(!cache.flush().await?.is_complete());
    // Two writes to "a" coalesced in memory: one row per key.
    let stats = cache.stats().await;
    assert_eq!(stats.outbox.depth, 2);
    assert_eq!(cache.health().await.backlog.unwrap().pending, 2);
    source.fail_writes(None);
    assert!(cache.flush().await?.is_complete());
    assert_eq!(source.value("a").unwrap(), "2");
    assert_eq!(source.value("b").unwrap(), "x");
    assert_eq!(cache.stats().await.outbox.depth, 0);

    // A write refused for good is kept as a dead letter, listable and retriable.
    source.fail_writes(Some(SourceError::Conflict {
        status: Some(422),
        message: "Invalid request".into(),
    }));
    cache.set("c", "refused").await?;
    cache.flush().await?;
    let dead = cache.dead_letters().await?;
    assert_eq!((dead.len(), dead[0].key.as_str()), (1, "c"));
    source.fail_writes(None);
    assert!(cache.retry_dead_letter(dead[0].id).await?);
    assert!(cache.flush().await?.is_complete());
    assert_eq!(source.value("c").unwrap(), "refused");
    assert!(cache.dead_letters().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_database_locked_too_long_degrades_l2_which_recovers_by_itself() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock)
        .strategy(Strategy::CacheAside)
        .sqlite_path(&path)
        .sqlite_busy_timeout(Duration::from_millis(20))
        .build()?;
    let mut events = cache.subscribe();
    cache.set("before", "1").await?;

    // Another process holds the write lock.
    let other = rusqlite::Connection::open(&path)?;
    other.execute_batch("BEGIN IMMEDIATE; INSERT INTO meta (name, value) VALUES ('lock', 'x');")?;
    for i in 0..3 {
        // Each write waits 20 ms for the lock, fails, and is served from L1 anyway.
        cache.set(&format!("k{i}"), "v").await?;
    }
    let health = cache.health().await;
    assert_eq!(health.l2.status, HealthStatus::Degraded, "{health}");
    assert!(
        health.l2.last_error.as_deref().unwrap().contains("locked"),
        "{health}"
    );
    assert_eq!(cache.get("k2").await?.unwrap(), "v", "L1 still serves");
    assert_eq!(cache.get("before").await?.unwrap(), "1");

    // The lock is released; after the recovery timeout one write probes L2 and closes it.
    other.execute_batch("COMMIT;")?;
    // The default L2 recovery timeout: 5 s, jittered by up to 20%.
    clock.advance(Duration::from_secs(7));
    cache.set("after", "2").await?;
    assert_eq!(cache.health().await.l2.status, HealthStatus::Healthy);
    assert_eq!(
        cache.store_summary().await?.entries,
        2,
        "before + after reached L2"
    );
    let (mut degraded, mut recovered) = (false, false);
    while let Ok(e) = events.try_recv() {
        degraded |= matches!(e, Event::TierDegraded { tier: Tier::L2, .. });
        recovered |= matches!(e, Event::TierRecovered { tier: Tier::L2 });
    }
    assert!(degraded && recovered);
    Ok(())
}
