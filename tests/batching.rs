//! Cold misses in batches: a source that batches ([`Source::max_batch`] > 1) gets the cold
//! misses of `mget` as [`Source::fetch_many`] calls, each under one breaker permit, and the
//! keys stay single-flight with concurrent `get`s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tiercache::source::{Fetched, Source, SourceError};
use tiercache::{Freshness, MockClock, StaleReason, Tier, TieredCache};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(60);

/// A source that batches up to `max` keys a call, with a log of every call.
#[derive(Debug, Clone, Default)]
struct BatchSource {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    values: HashMap<String, (Bytes, Option<String>)>,
    max: usize,
    /// `("fetch", [key])` or `("fetch_many", keys)`.
    calls: Vec<(&'static str, Vec<String>)>,
    /// The whole batch fails with this.
    fail: Option<SourceError>,
    /// This key's own answer is this error.
    fail_key: Option<(String, SourceError)>,
}

impl BatchSource {
    fn new(max: usize) -> Self {
        let s = Self::default();
        s.state.lock().unwrap().max = max;
        s
    }

    fn insert(&self, key: &str, value: &str, etag: Option<&str>) {
        self.state.lock().unwrap().values.insert(
            key.to_owned(),
            (Bytes::from(value.to_owned()), etag.map(str::to_owned)),
        );
    }

    fn calls(&self) -> Vec<(&'static str, Vec<String>)> {
        self.state.lock().unwrap().calls.clone()
    }

    fn fail(&self, e: Option<SourceError>) {
        self.state.lock().unwrap().fail = e;
    }

    fn answer(&self, key: &str, validator: Option<&str>) -> Fetched {
        let s = self.state.lock().unwrap();
        match s.values.get(key) {
            None => Fetched::NotFound,
            Some((_, Some(etag))) if validator == Some(etag.as_str()) => {
                Fetched::NotModified { ttl: None }
            }
            Some((v, Some(etag))) => Fetched::value_with_validator(v.clone(), etag.clone()),
            Some((v, None)) => Fetched::value(v.clone()),
        }
    }
}

#[async_trait]
impl Source for BatchSource {
    async fn fetch(&self, key: &str, validator: Option<&str>) -> Result<Fetched, SourceError> {
        self.state
            .lock()
            .unwrap()
            .calls
            .push(("fetch", vec![key.to_owned()]));
        // One turn of the scheduler, as a network call would take.
        tokio::task::yield_now().await;
        Ok(self.answer(key, validator))
    }

    async fn fetch_many(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        let fail = {
            let mut s = self.state.lock().unwrap();
            s.calls
                .push(("fetch_many", keys.iter().map(|k| (*k).to_owned()).collect()));
            s.fail.clone()
        };
        tokio::task::yield_now().await;
        if let Some(e) = fail {
            return Err(e);
        }
        let fail_key = self.state.lock().unwrap().fail_key.clone();
        Ok(keys
            .iter()
            .map(|k| match &fail_key {
                Some((f, e)) if f == k => Err(e.clone()),
                _ => Ok(self.answer(k, None)),
            })
            .collect())
    }

    fn max_batch(&self) -> usize {
        self.state.lock().unwrap().max
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        let s = self.state.lock().unwrap();
        let mut keys: Vec<String> = s
            .values
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        Ok(keys)
    }
}

fn cache(source: &BatchSource, clock: &MockClock) -> TieredCache {
    TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(3600))
        .build()
        .expect("the cache builds")
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("k{i:03}")).collect()
}

#[tokio::test]
async fn cold_misses_travel_in_batches_of_the_sources_size() -> TestResult {
    let (source, clock) = (BatchSource::new(50), MockClock::new());
    let keys = keys(120);
    for k in &keys[..110] {
        source.insert(k, &format!("v-{k}"), Some(&format!("\"{k}\"")));
    }
    let cache = cache(&source, &clock);
    let results = cache.mget(&keys).await;
    for (k, r) in keys.iter().zip(&results) {
        let l = r.as_ref().map_err(|e| format!("{k}: {e}"))?;
        match l {
            Some(l) => {
                assert_eq!(l.value, format!("v-{k}"), "{k}");
                assert_eq!((l.tier, l.freshness), (Tier::L3, Freshness::Fresh));
            }
            None => assert!(k.as_str() >= "k110", "{k} exists"),
        }
    }
    let calls = source.calls();
    let sizes: Vec<(&str, usize)> = calls.iter().map(|(op, k)| (*op, k.len())).collect();
    assert_eq!(
        sizes,
        [("fetch_many", 50), ("fetch_many", 50), ("fetch_many", 20)]
    );
    // Filled like single fetches: the next read is an L1 hit (and the "not found"s are
    // remembered), with no call.
    let again = cache.mget(&keys).await;
    assert!(again.iter().all(Result::is_ok));
    assert_eq!(source.calls().len(), 3);
    cache.clear_memory().await;
    let l = cache.lookup("k007").await?.expect("cached");
    assert_eq!(
        (l.tier, l.validator.as_deref()),
        (Tier::L2, Some("\"k007\""))
    );
    Ok(())
}

#[tokio::test]
async fn expired_keys_with_a_validator_are_revalidated_one_by_one() -> TestResult {
    let (source, clock) = (BatchSource::new(100), MockClock::new());
    for k in ["a", "b", "c"] {
        source.insert(k, k, Some(&format!("\"{k}\"")));
    }
    let cache = cache(&source, &clock);
    cache.mget(&["a", "b"]).await;
    clock.advance(TTL + Duration::from_secs(1));
    let results = cache.mget(&["a", "b", "c"]).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(Option::is_some)));
    let mut calls = source.calls();
    calls.sort();
    assert_eq!(
        calls,
        [
            ("fetch", vec!["a".to_owned()]),
            ("fetch", vec!["b".to_owned()]),
            ("fetch_many", vec!["a".to_owned(), "b".to_owned()]),
            ("fetch_many", vec!["c".to_owned()]),
        ],
        "the cold key in a batch, the expired ones conditional"
    );
    Ok(())
}

#[tokio::test]
async fn a_get_during_a_batch_joins_its_load() -> TestResult {
    let (source, clock) = (BatchSource::new(100), MockClock::new());
    for k in keys(10) {
        source.insert(&k, "v", None);
    }
    let cache = cache(&source, &clock);
    let keys = keys(10);
    let (batch, single) = tokio::join!(cache.mget(&keys), cache.get("k004"));
    assert!(batch.iter().all(|r| r.as_ref().is_ok_and(Option::is_some)));
    assert_eq!(single?.as_deref(), Some(&b"v"[..]));
    let fetched: usize = source.calls().iter().map(|(_, k)| k.len()).sum();
    assert_eq!(
        fetched,
        10,
        "one source answer per key: {:?}",
        source.calls()
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_batch_serves_stale_copies_and_counts_once_for_the_breaker() -> TestResult {
    let (source, clock) = (BatchSource::new(100), MockClock::new());
    source.insert("a", "old", None);
    let cache = cache(&source, &clock);
    cache.mget(&["a"]).await;
    clock.advance(TTL + Duration::from_secs(1));
    source.fail(Some(SourceError::Unavailable {
        status: Some(502),
        message: "Bad Gateway".into(),
    }));
    let results = cache.mget(&["a", "b"]).await;
    let a = results[0].as_ref().map_err(|e| e.to_string())?.clone();
    let a = a.expect("a stale copy");
    assert_eq!(
        (a.value.as_ref(), a.freshness),
        (
            &b"old"[..],
            Freshness::Stale {
                reason: StaleReason::SourceError
            }
        )
    );
    let b = results[1].as_ref().expect_err("no copy of b");
    assert!(b.is_unavailable(), "{b}");
    let health = cache.health().await;
    assert_eq!(health.l3.consecutive_failures, 1, "one batch, one call");
    Ok(())
}

#[tokio::test]
async fn warm_fetches_cold_keys_in_batches_and_revalidates_held_ones_one_by_one() -> TestResult {
    let (source, clock) = (BatchSource::new(100), MockClock::new());
    let keys = keys(150);
    for (i, k) in keys.iter().enumerate() {
        // Every third key has a validator.
        let etag = (i % 3 == 0).then(|| format!("\"{k}\""));
        source.insert(k, "v", etag.as_deref());
    }
    let cache = cache(&source, &clock);
    let ticks = std::sync::atomic::AtomicUsize::new(0);
    let tick = |_| {
        ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let summary = cache.warm("k", tick).await?;
    assert_eq!((summary.listed, summary.fetched), (150, 150));
    assert_eq!(ticks.load(std::sync::atomic::Ordering::Relaxed), 150);
    let sizes: Vec<(&str, usize)> = source
        .calls()
        .iter()
        .map(|(op, k)| (*op, k.len()))
        .collect();
    assert_eq!(sizes, [("fetch_many", 100), ("fetch_many", 50)]);
    // Expired: the 50 with a validator are revalidated (304s), the 100 without are refetched
    // in one batch.
    clock.advance(TTL + Duration::from_secs(1));
    let summary = cache.warm("k", |_| {}).await?;
    assert_eq!((summary.fetched, summary.not_modified), (100, 50));
    let calls = source.calls();
    let (batches, singles): (Vec<_>, Vec<_>) =
        calls[2..].iter().partition(|(op, _)| *op == "fetch_many");
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].1.len(), 100);
    assert_eq!(singles.len(), 50);
    Ok(())
}

#[tokio::test]
async fn a_keys_own_outage_reaches_the_breaker_and_the_other_keys_keep_their_answers() -> TestResult
{
    let (source, clock) = (BatchSource::new(100), MockClock::new());
    source.insert("a", "A", None);
    source.insert("b", "B", None);
    source.state.lock().unwrap().fail_key = Some((
        "b".into(),
        SourceError::Unavailable {
            status: Some(502),
            message: "Bad Gateway".into(),
        },
    ));
    let cache = cache(&source, &clock);
    let results = cache.mget(&["a", "b", "c"]).await;
    let a = results[0].as_ref().map_err(|e| e.to_string())?.clone();
    assert_eq!(a.map(|l| l.value), Some(Bytes::from("A")));
    assert!(results[1].as_ref().is_err_and(|e| e.is_unavailable()));
    assert!(
        results[2].as_ref().is_ok_and(Option::is_none),
        "c: not found"
    );
    assert_eq!(cache.health().await.l3.consecutive_failures, 1);
    Ok(())
}

/// `get_batch_window`: the cold misses of concurrent `get`s of different keys go to the source
/// as one batch (a full batch at once, the rest when the window closes); a lone `get` waits out
/// the window and is a batch of one; without the option, each `get` is its own call.
#[tokio::test(start_paused = true)]
async fn concurrent_gets_within_the_window_are_one_batch() -> TestResult {
    let source = BatchSource::new(100);
    for i in 0..150 {
        source.insert(&format!("k{i}"), &format!("v{i}"), None);
    }
    let cache = TieredCache::builder()
        .source(source.clone())
        .get_batch_window(Duration::from_millis(5))
        .build()?;
    let tasks: Vec<_> = (0..150)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&format!("k{i}")).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await??, Some(Bytes::from(format!("v{i}"))), "k{i}");
    }
    let calls = source.calls();
    assert!(calls.iter().all(|(op, _)| *op == "fetch_many"), "{calls:?}");
    let mut sizes: Vec<usize> = calls.iter().map(|(_, keys)| keys.len()).collect();
    sizes.sort_unstable();
    assert_eq!(
        sizes,
        [50, 100],
        "a full batch at once, the rest at the window's end"
    );
    // Read again: L1, nothing sent.
    assert_eq!(cache.get("k7").await?, Some(Bytes::from("v7")));
    assert_eq!(source.calls().len(), 2);

    // A lone get: a batch of one, after the window.
    let lone = source.clone();
    lone.insert("solo", "s", None);
    let started = tokio::time::Instant::now();
    assert_eq!(cache.get("solo").await?, Some(Bytes::from("s")));
    assert!(started.elapsed() >= Duration::from_millis(5));
    assert_eq!(source.calls().last().unwrap().1, ["solo"]);

    // Without the window: one call per key.
    let plain_source = BatchSource::new(100);
    for i in 0..3 {
        plain_source.insert(&format!("p{i}"), "x", None);
    }
    let plain = TieredCache::builder()
        .source(plain_source.clone())
        .build()?;
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let plain = plain.clone();
            tokio::spawn(async move { plain.get(&format!("p{i}")).await })
        })
        .collect();
    for t in tasks {
        assert!(t.await??.is_some());
    }
    assert_eq!(plain_source.calls().len(), 3);
    assert!(plain_source.calls().iter().all(|(op, _)| *op == "fetch"));
    Ok(())
}

#[test]
fn a_get_batch_window_of_zero_or_past_a_second_is_refused() {
    for w in [Duration::ZERO, Duration::from_millis(1001)] {
        let e = TieredCache::builder()
            .get_batch_window(w)
            .build()
            .expect_err("refused");
        assert!(matches!(e, tiercache::Error::Config(_)), "{e}");
    }
}
