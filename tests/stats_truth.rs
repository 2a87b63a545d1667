//! Every counter of `stats()` against the operations done: per-tier hits, misses and errors,
//! source calls actually sent (and refused ones apart), 304s as L3 hits, negative hits, the
//! overall hit ratio, and latency recorded under the tier that did the work.

mod support;

use std::time::Duration;

use support::{outage, FakeSource};
use tiercache::breaker::{BreakerPolicy, CircuitState};
use tiercache::stats::{Op, SourceOutcome, StatsSnapshot};
use tiercache::{MockClock, StaleReason, TieredCache};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(60);

fn builder(source: &FakeSource, clock: &MockClock) -> tiercache::TieredCacheBuilder {
    TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(3600))
        .negative_ttl(Duration::from_secs(10))
        .source_breaker(
            BreakerPolicy::builder()
                .failure_threshold(3)
                .minimum_calls(u32::MAX)
                .base_recovery(Duration::from_secs(600))
                .max_recovery(Duration::from_secs(600))
                .jitter(0.0)
                .build()
                .expect("valid policy"),
        )
}

/// Timed samples of `op` under each tier (L1, L2, L3).
fn samples(s: &StatsSnapshot, op: Op) -> [u64; 3] {
    [&s.l1, &s.l2, &s.l3].map(|t| t.latency.get(&op).map_or(0, |l| l.count))
}

fn calls(s: &StatsSnapshot) -> [u64; 5] {
    SourceOutcome::ALL.map(|o| s.source_calls_for(o))
}

#[tokio::test]
async fn a_read_through_miss_then_hit_counts_each_tier_once() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;

    cache.get("a").await?; // L1 miss, L2 miss, source: value
    cache.get("a").await?; // L1 hit
    let s = cache.stats().await;
    assert_eq!((s.l1.hits, s.l1.misses, s.l1.errors), (1, 1, 0));
    assert_eq!((s.l2.hits, s.l2.misses, s.l2.errors), (0, 1, 0));
    assert_eq!((s.l3.hits, s.l3.misses, s.l3.errors), (1, 0, 0));
    // ok, not_modified, not_found, rate_limited, failed
    assert_eq!(calls(&s), [1, 0, 0, 0, 0]);
    assert_eq!(s.source_calls_refused, 0);
    assert_eq!(s.overall_hit_ratio, 0.5);
    // The L2 read and the source call are each timed under their own tier; the slow path is
    // not timed under L1 (L1 hits are sampled, 1 in 64, so at most one sample here).
    let [l1, l2, l3] = samples(&s, Op::Get);
    assert!(l1 <= 1, "L1 has only its own (sampled) hits: {l1}");
    assert_eq!((l2, l3), (1, 1));
    Ok(())
}

#[tokio::test]
async fn a_304_is_an_l3_hit_and_an_expired_copy_a_miss_below() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    cache.reset_stats();

    clock.advance(TTL + Duration::from_secs(1));
    cache.get("a").await?; // stale in L1 and L2: revalidated, 304
    let s = cache.stats().await;
    assert_eq!(
        source.fetches().last().and_then(|f| f.1.clone()).as_deref(),
        Some("\"v1\"")
    );
    assert_eq!((s.l1.hits, s.l1.misses), (0, 1));
    assert_eq!((s.l2.hits, s.l2.misses), (0, 1));
    assert_eq!((s.l3.hits, s.l3.misses, s.l3.errors), (1, 0, 0));
    assert_eq!(calls(&s), [0, 1, 0, 0, 0]);
    assert_eq!(s.overall_hit_ratio, 0.0, "the source answered");
    Ok(())
}

#[tokio::test]
async fn the_sources_404_is_an_l3_miss_and_only_a_cached_one_a_negative_hit() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock).build()?;

    assert_eq!(cache.get("missing").await?, None); // the source says 404
    let s = cache.stats().await;
    assert_eq!((s.l3.hits, s.l3.misses), (0, 1));
    assert_eq!(calls(&s), [0, 0, 1, 0, 0]);
    assert_eq!(
        s.negative_hits, 0,
        "the source's own answer is no negative hit"
    );

    assert_eq!(cache.get("missing").await?, None); // the negative entry in L1
    assert_eq!(cache.lookup("missing").await?, None); // again, through lookup
    let s = cache.stats().await;
    assert_eq!(s.negative_hits, 2);
    assert_eq!(s.l1.hits, 2);
    assert_eq!(source.fetch_count(), 1);
    Ok(())
}

#[tokio::test]
async fn calls_refused_by_the_open_breaker_are_not_source_calls() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    clock.advance(TTL + Duration::from_secs(1));
    cache.reset_stats();
    source.fail_fetches(Some(outage()));

    // 8 reads: 3 calls sent and failed (the breaker opens at 3), 5 refused; all served stale.
    for _ in 0..8 {
        let l = cache.lookup("a").await?.expect("a stale copy");
        assert!(l.freshness.is_stale());
    }
    assert_eq!(cache.source_breaker_status().state, CircuitState::Open);
    assert_eq!(source.fetch_count(), 1 + 3);
    let s = cache.stats().await;
    assert_eq!(calls(&s), [0, 0, 0, 0, 3], "only the calls sent");
    assert_eq!(s.source_calls_refused, 5);
    assert_eq!((s.l3.hits, s.l3.misses, s.l3.errors), (0, 0, 3));
    assert_eq!(s.stale_served_for(StaleReason::SourceError), 3);
    assert_eq!(s.stale_served_for(StaleReason::CircuitOpen), 5);
    assert_eq!(samples(&s, Op::Get)[2], 3, "L3 latency: the calls sent");
    // Every read was answered from the cache (stale): the documented ratio counts them.
    assert_eq!((s.l1.misses, s.l2.misses), (8, 8));
    assert_eq!(s.overall_hit_ratio, 1.0);
    Ok(())
}

#[tokio::test]
async fn a_read_with_no_copy_and_a_failing_source_is_no_hit() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock).build()?;
    source.fail_fetches(Some(outage()));
    assert!(cache.get("a").await.unwrap_err().is_unavailable());
    let s = cache.stats().await;
    assert_eq!(calls(&s), [0, 0, 0, 0, 1]);
    assert_eq!((s.l3.hits, s.l3.misses, s.l3.errors), (0, 0, 1));
    assert_eq!(s.overall_hit_ratio, 0.0);
    Ok(())
}

#[tokio::test]
async fn mget_latency_goes_under_the_tiers_that_answered() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    for k in ["a", "b", "c"] {
        source.insert(k, k);
    }
    let cache = builder(&source, &clock).build()?;
    cache.mget(&["a", "b"]).await; // L1 pass, one L2 statement, two source calls
    let s = cache.stats().await;
    assert_eq!(samples(&s, Op::Mget), [1, 1, 0]);
    assert_eq!(samples(&s, Op::Get)[2], 2, "each source call under L3");
    assert_eq!((s.l1.misses, s.l2.misses, s.l3.hits), (2, 2, 2));
    cache.reset_stats();

    // Every key in L1: no L2 statement, nothing timed under L2.
    for r in cache.mget(&["a", "b", "a"]).await {
        assert!(r?.is_some());
    }
    let s = cache.stats().await;
    assert_eq!(samples(&s, Op::Mget), [1, 0, 0]);
    assert_eq!((s.l1.hits, s.l1.misses), (2, 0), "distinct keys");
    assert_eq!(s.overall_hit_ratio, 1.0);
    Ok(())
}

#[tokio::test]
async fn a_fresh_l2_hit_after_a_restart_counts_under_l2() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    {
        let cache = builder(&source, &clock).sqlite_path(&path).build()?;
        cache.get("a").await?;
        cache.close().await?;
    }
    let cache = builder(&source, &clock).sqlite_path(&path).build()?;
    cache.get("a").await?;
    let s = cache.stats().await;
    assert_eq!((s.l1.misses, s.l2.hits, s.l3.hits), (1, 1, 0));
    assert_eq!(samples(&s, Op::Get)[1..], [1, 0]);
    assert_eq!(s.overall_hit_ratio, 1.0);
    Ok(())
}

#[tokio::test]
async fn get_with_counts_its_loader_as_l3() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock)
        .strategy(tiercache::Strategy::CacheAside)
        .build()?;
    let v = cache.get_with("k", || async { "v" }).await?;
    assert!(v.is_some());
    let s = cache.stats().await;
    assert_eq!((s.l3.hits, s.l3.misses), (1, 0));
    assert_eq!(calls(&s), [0; 5], "the loader is not the source");
    Ok(())
}
