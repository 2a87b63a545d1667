//! Refresh-ahead inside the budget: a read in the last part of an entry's TTL refreshes it in
//! the background (once, conditional, fenced against writes), only while the source's budget is
//! above the reserve; readers are never held back; stats count requests by kind.
//!
//! Time is a mock clock; a background refresh is awaited through `background_idle` (each
//! refresh holds a permit from the read that starts it until its fill is written) or through
//! the fake's own signals, never by sleeping.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use support::FakeSource;
use tiercache::source::{Fetched, RateLimit, Source, SourceError};
use tiercache::stats::{RequestKind, RequestStats};
use tiercache::{Clock, Error, Freshness, MockClock, StaleReason, Strategy, Tier, TieredCache};
use tokio::sync::{Notify, Semaphore};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(100);
const LIMIT: u64 = 1000;

/// [`FakeSource`] with a rate-limit budget (a new value costs one request, a 304 none, as
/// GitHub counts conditional requests) and, when held, fetches that wait for a release.
#[derive(Debug, Clone)]
struct Budgeted {
    fake: FakeSource,
    remaining: Arc<AtomicU64>,
    reset: SystemTime,
    /// `Some`: each fetch takes a permit first (none are given until the test releases).
    hold: Arc<Mutex<Option<Arc<Semaphore>>>>,
    /// Fetches started, and their signal.
    starts: Arc<AtomicU64>,
    started: Arc<Notify>,
}

impl Budgeted {
    fn new(clock: &MockClock) -> Self {
        Self {
            fake: FakeSource::new(),
            remaining: Arc::new(AtomicU64::new(LIMIT)),
            reset: clock.now() + Duration::from_secs(3600),
            hold: Arc::default(),
            starts: Arc::default(),
            started: Arc::default(),
        }
    }

    fn set_remaining(&self, n: u64) {
        self.remaining.store(n, Ordering::SeqCst);
    }

    /// Waits until `n` fetches have started in all.
    async fn started(&self, n: u64) {
        loop {
            let notified = self.started.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.starts.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }

    /// Makes the next fetches wait; returns the gate to release them with.
    fn hold(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.hold.lock().unwrap() = Some(gate.clone());
        gate
    }
}

#[async_trait]
impl Source for Budgeted {
    async fn fetch(&self, key: &str, validator: Option<&str>) -> Result<Fetched, SourceError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.started.notify_waiters();
        let gate = self.hold.lock().unwrap().clone();
        if let Some(gate) = gate {
            let _permit = gate.acquire().await;
        }
        let answer = self.fake.fetch(key, validator).await;
        if matches!(answer, Ok(Fetched::Value { .. } | Fetched::NotFound)) {
            let _ = self
                .remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
        answer
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        self.fake.list(prefix).await
    }

    fn rate_limit(&self) -> Option<RateLimit> {
        Some(RateLimit::new(
            LIMIT,
            self.remaining.load(Ordering::SeqCst),
            self.reset,
        ))
    }
}

fn builder(source: &Budgeted, clock: &MockClock) -> tiercache::TieredCacheBuilder {
    TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(3600))
        .refresh_ahead(0.8)
        .budget_reserve(50)
}

fn setup() -> (Budgeted, MockClock) {
    let clock = MockClock::new();
    let source = Budgeted::new(&clock);
    source.fake.insert("a", "alpha");
    (source, clock)
}

async fn requests(cache: &TieredCache, kind: RequestKind) -> RequestStats {
    cache.stats().await.requests_for(kind)
}

#[tokio::test]
async fn a_read_late_in_the_ttl_refreshes_once_with_a_304_and_moves_the_deadline() -> TestResult {
    let (source, clock) = setup();
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    assert_eq!(source.fake.fetch_count(), 1);

    clock.advance(Duration::from_secs(85));
    // Answered at once from the entry it found, as it was.
    let l = cache.lookup("a").await?.expect("cached");
    assert_eq!((l.tier, l.freshness), (Tier::L1, Freshness::Fresh));
    assert_eq!(
        (l.value.as_ref(), l.age),
        (&b"alpha"[..], Duration::from_secs(85))
    );
    cache.background_idle().await;

    // One conditional request: the 304 renewed the deadlines without a body.
    let fetches = source.fake.fetches();
    assert_eq!(fetches.len(), 2);
    assert_eq!(fetches[1], ("a".to_owned(), Some("\"v1\"".to_owned())));
    let r = requests(&cache, RequestKind::RefreshAhead).await;
    assert_eq!((r.sent, r.not_modified, r.budget_spent), (1, 1, 0));

    // Past the first deadline (100 s), within the renewed one (85 + 100 s): fresh, in L1 and
    // in L2, with no further call.
    clock.advance(Duration::from_secs(30));
    let l = cache.lookup("a").await?.expect("cached");
    assert_eq!((l.tier, l.freshness), (Tier::L1, Freshness::Fresh));
    assert_eq!(l.age, Duration::from_secs(30));
    cache.clear_memory().await;
    let l = cache.lookup("a").await?.expect("cached");
    assert_eq!((l.tier, l.freshness), (Tier::L2, Freshness::Fresh));
    assert_eq!(l.age, Duration::from_secs(30));
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 2);
    Ok(())
}

#[tokio::test]
async fn a_read_early_in_the_ttl_refreshes_nothing() -> TestResult {
    let (source, clock) = setup();
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    for _ in 0..79 {
        clock.advance(Duration::from_secs(1));
        assert_eq!(cache.get("a").await?.as_deref(), Some(&b"alpha"[..]));
    }
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 1);
    assert_eq!(
        requests(&cache, RequestKind::RefreshAhead).await,
        RequestStats::default()
    );
    // The 80th second is the first of the last 20%.
    clock.advance(Duration::from_secs(1));
    cache.get("a").await?;
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 2);
    Ok(())
}

#[tokio::test]
async fn a_written_value_is_not_refreshed_ahead() -> TestResult {
    let (source, clock) = setup();
    let cache = builder(&source, &clock).build()?;
    cache.set("a", "mine").await?; // no validator: it stands for its whole TTL
    clock.advance(Duration::from_secs(90));
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"mine"[..]));
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 0);
    assert_eq!(
        requests(&cache, RequestKind::RefreshAhead).await,
        RequestStats::default()
    );
    Ok(())
}

#[tokio::test]
async fn refresh_ahead_is_off_by_default() -> TestResult {
    let (source, clock) = setup();
    let cache = TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .build()?;
    cache.get("a").await?;
    clock.advance(Duration::from_secs(99));
    cache.get("a").await?;
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_reads_in_the_window_make_one_call() -> TestResult {
    let (source, clock) = setup();
    source.fake.insert("a", "beta"); // the refresh brings a new value
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    clock.advance(Duration::from_secs(90));
    let reads: Vec<_> = (0..1000)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get("a").await })
        })
        .collect();
    for read in reads {
        let value = read.await??.expect("cached");
        // Each read is answered fresh: the old value or, once the refresh filled L1, the new.
        assert!(value == "beta" || value == "alpha", "{value:?}");
    }
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 2);
    let r = requests(&cache, RequestKind::RefreshAhead).await;
    assert_eq!(r.sent, 1);
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"beta"[..]));
    Ok(())
}

#[tokio::test]
async fn at_the_reserve_background_work_stops_and_readers_still_go() -> TestResult {
    let (source, clock) = setup();
    source.fake.insert("b", "bravo");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    source.set_remaining(50); // the reserve

    // No refresh: the entry is served fresh until its deadline, nothing is sent.
    clock.advance(Duration::from_secs(90));
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"alpha"[..]));
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 1);
    let r = requests(&cache, RequestKind::RefreshAhead).await;
    assert_eq!((r.sent, r.skipped_budget), (0, 1));

    // Warm is background work too: not even the listing goes.
    let err = cache.warm("", |_| {}).await.expect_err("held back");
    assert!(
        matches!(
            err,
            Error::Unavailable {
                reason: StaleReason::RateLimited,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(requests(&cache, RequestKind::Warm).await.skipped_budget, 1);

    // Readers go: an expired entry is revalidated, a miss is loaded.
    clock.advance(Duration::from_secs(20));
    let l = cache.lookup("a").await?.expect("revalidated");
    assert_eq!((l.tier, l.freshness), (Tier::L3, Freshness::Fresh));
    assert_eq!(cache.get("b").await?.as_deref(), Some(&b"bravo"[..]));
    assert_eq!(source.fake.fetch_count(), 3);
    let s = cache.stats().await;
    assert_eq!(s.requests_for(RequestKind::Revalidate).sent, 1);
    assert_eq!(s.requests_for(RequestKind::Read).sent, 2);

    // Above the reserve again: the next read in the window refreshes.
    source.set_remaining(51);
    clock.advance(Duration::from_secs(85));
    cache.get("a").await?;
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 4);
    Ok(())
}

#[tokio::test]
async fn a_spent_budget_leaves_the_load_to_the_stale_window() -> TestResult {
    let (source, clock) = setup();
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    // The next answer spends the last request: the breaker holds every call until the reset.
    source.set_remaining(1);
    source.fake.insert("a", "alpha2");
    clock.advance(TTL);
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"alpha2"[..]));
    assert_eq!(source.rate_limit().map(|b| b.remaining), Some(0));

    clock.advance(Duration::from_secs(90)); // in the window: no refresh
    cache.get("a").await?;
    clock.advance(Duration::from_secs(20)); // expired: served stale, nothing sent
    let l = cache.lookup("a").await?.expect("stale");
    assert_eq!(l.value, "alpha2");
    assert_eq!(
        l.freshness,
        Freshness::Stale {
            reason: StaleReason::RateLimited
        }
    );
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 2);
    let s = cache.stats().await;
    assert_eq!(s.requests_for(RequestKind::RefreshAhead).skipped_budget, 1);
    assert_eq!(s.source_calls_refused, 1);
    Ok(())
}

#[tokio::test]
async fn a_set_racing_a_refresh_is_not_overwritten() -> TestResult {
    let (source, clock) = setup();
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    source.fake.insert("a", "from the source");
    clock.advance(Duration::from_secs(85));
    let gate = source.hold();

    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"alpha"[..]));
    source.started(2).await; // the refresh is at the source
    cache.set("a", "mine").await?;
    gate.add_permits(1);
    cache.background_idle().await;
    assert_eq!(source.fake.fetch_count(), 2);

    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"mine"[..]));
    cache.clear_memory().await;
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"mine"[..]));
    Ok(())
}

#[tokio::test]
async fn a_write_right_after_the_read_that_starts_a_refresh_wins() -> TestResult {
    let (source, clock) = setup();
    source.fake.insert("a", "from the source");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    clock.advance(Duration::from_secs(85));
    // The read starts the refresh task; the write begins before that task runs (one thread)
    // and the task runs while the write waits for L2: whether the refresh is sent or not
    // depends on that interleaving, but its value never replaces the write's.
    cache.get("a").await?;
    cache.set("a", "mine").await?;
    cache.background_idle().await;
    assert!(source.fake.fetch_count() <= 2);
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"mine"[..]));
    cache.clear_memory().await;
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"mine"[..]));
    Ok(())
}

#[tokio::test]
async fn stats_by_kind_are_exact() -> TestResult {
    let (source, clock) = setup();
    source.fake.insert("w", "warmed");
    let cache = builder(&source, &clock).build()?;

    cache.get("a").await?; // read: sent, 1 budget
    cache.get("a").await?; // L1 hit: nothing

    // A refresh held at the source; a second read in the window finds it under way.
    clock.advance(Duration::from_secs(85));
    let gate = source.hold();
    cache.get("a").await?;
    source.started(2).await;
    cache.get("a").await?; // deduplicated
    gate.add_permits(1);
    cache.background_idle().await;
    *source.hold.lock().unwrap() = None;
    // refresh: sent, 304 (no budget)

    // Changed upstream, expired: revalidated with a new value (1 budget).
    source.fake.insert("a", "alpha2");
    clock.advance(TTL + Duration::from_secs(1));
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"alpha2"[..]));

    // Warm: "a" is fresh (not asked), "w" is loaded (1 budget).
    let summary = cache.warm("", |_| {}).await?;
    assert_eq!((summary.listed, summary.fetched, summary.cached), (2, 1, 1));

    // At the reserve, a read in the window skips its refresh.
    source.set_remaining(50);
    clock.advance(Duration::from_secs(85));
    cache.get("a").await?;
    cache.background_idle().await;

    let s = cache.stats().await;
    let kinds = |k| s.requests_for(k);
    let r = kinds(RequestKind::Read);
    assert_eq!(
        (
            r.sent,
            r.not_modified,
            r.skipped_budget,
            r.deduplicated,
            r.budget_spent
        ),
        (1, 0, 0, 0, 1)
    );
    let r = kinds(RequestKind::Revalidate);
    assert_eq!(
        (
            r.sent,
            r.not_modified,
            r.skipped_budget,
            r.deduplicated,
            r.budget_spent
        ),
        (1, 0, 0, 0, 1)
    );
    let r = kinds(RequestKind::RefreshAhead);
    assert_eq!(
        (
            r.sent,
            r.not_modified,
            r.skipped_budget,
            r.deduplicated,
            r.budget_spent
        ),
        (1, 1, 1, 1, 0)
    );
    assert_eq!(r.saved(), 3);
    let r = kinds(RequestKind::Warm);
    assert_eq!(
        (
            r.sent,
            r.not_modified,
            r.skipped_budget,
            r.deduplicated,
            r.budget_spent
        ),
        (1, 0, 0, 0, 1)
    );
    assert_eq!(source.fake.fetch_count(), 4);

    let text = s.to_prometheus();
    for line in [
        "tiercache_requests_sent_total{kind=\"refresh_ahead\"} 1",
        "tiercache_requests_saved_total{kind=\"refresh_ahead\",reason=\"not_modified\"} 1",
        "tiercache_requests_saved_total{kind=\"refresh_ahead\",reason=\"budget\"} 1",
        "tiercache_requests_saved_total{kind=\"refresh_ahead\",reason=\"deduplicated\"} 1",
        "tiercache_budget_spent_total{kind=\"warm\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from\n{text}"
        );
    }
    let json = serde_json::to_value(&s)?;
    assert_eq!(json["requests"]["refresh_ahead"]["deduplicated"], 1);
    Ok(())
}

#[tokio::test]
async fn close_stops_a_refresh_not_yet_sent() -> TestResult {
    let (source, clock) = setup();
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    clock.advance(Duration::from_secs(85));
    cache.get("a").await?; // starts the task, which has not run yet (one thread)
    cache.close().await?;
    assert_eq!(source.fake.fetch_count(), 1);
    assert!(matches!(cache.get("a").await, Err(Error::Closed)));
    Ok(())
}

#[tokio::test]
async fn a_dropped_cache_ends_its_refresh_unsent() -> TestResult {
    let (source, clock) = setup();
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    clock.advance(Duration::from_secs(85));
    cache.get("a").await?; // starts the task, which has not run yet (one thread)
    drop(cache);
    // The task holds the cache weakly: it finds it gone and ends without a call.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(source.fake.fetch_count(), 1);
    Ok(())
}

#[tokio::test]
async fn close_waits_for_a_refresh_under_way() -> TestResult {
    let (source, clock) = setup();
    source.fake.insert("a", "alpha2");
    let cache = builder(&source, &clock).build()?;
    cache.get("a").await?;
    clock.advance(Duration::from_secs(85));
    let gate = source.hold();
    cache.get("a").await?;
    source.started(2).await;
    let closing = tokio::spawn({
        let cache = cache.clone();
        async move { cache.close().await }
    });
    gate.add_permits(1);
    closing.await??;
    // The refresh ended before close returned: nothing runs any more.
    assert!(futures_util::FutureExt::now_or_never(cache.background_idle()).is_some());
    assert_eq!(requests(&cache, RequestKind::RefreshAhead).await.sent, 1);
    assert_eq!(source.fake.fetch_count(), 2);
    Ok(())
}

#[test]
fn the_options_are_validated() {
    let config_error =
        |b: tiercache::TieredCacheBuilder| matches!(b.build(), Err(Error::Config(_)));
    for fraction in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        assert!(
            config_error(TieredCache::builder().refresh_ahead(fraction)),
            "{fraction}"
        );
    }
    assert!(config_error(
        TieredCache::builder()
            .strategy(Strategy::CacheAside)
            .refresh_ahead(0.8)
    ));
}
