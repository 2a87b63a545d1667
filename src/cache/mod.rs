//! [`TieredCache`]: the strategy, single-flight, freshness and stats over the three tiers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::breaker::BreakerState;
use crate::clock::{millis, Clock};
use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::event::{Event, Events};
use crate::health::{BacklogHealth, HealthReport, TierHealth};
use crate::key;
use crate::lookup::{Freshness, Lookup, StaleReason, Tier};
use crate::outbox::{
    DeadLetter, DurableQueue, FlushReport, MemoryQueue, Outbox, OutboxMode, Pending, Queue,
};
use crate::source::{Fetched, Source, SourceError};
use crate::stats::{Op, SnapshotExtras, SourceOutcome, Stats, StatsSnapshot};
use crate::tier::guarded::Guarded;
use crate::tier::memory::MemoryTier;
use crate::tier::sqlite::{Location, SqliteOptions, SqliteTier};
use crate::tier::{OutboxOp, Store, StoreSummary};

mod builder;
mod flight;
pub(crate) mod guard;
mod options;

pub use builder::TieredCacheBuilder;
pub use options::{ReadOptions, Strategy};

use flight::Flights;
use guard::{guarded, SourceGuard};

/// How a load from the source ended, for `warm` and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loaded {
    /// A new value (or "not found") came from the source.
    Fetched,
    /// The source confirmed the cached copy (304).
    NotModified,
    /// Another load had just filled L1; the source was not called.
    AlreadyCached,
}

/// Awaits a future inside a tracing span. Wrapping a future in a span moves it (a few hundred
/// bytes for a read): that is done only when a subscriber listens.
macro_rules! in_span {
    ($span:expr, $future:expr) => {{
        let span: tracing::Span = $span;
        let future = $future;
        if span.is_disabled() {
            future.await
        } else {
            tracing::Instrument::instrument(future, span).await
        }
    }};
}

type LoadResult = Result<(Arc<Entry>, Loaded)>;

/// Settings fixed at build time.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) strategy: Strategy,
    pub(crate) ttl: u64,
    pub(crate) stale_ttl: u64,
    pub(crate) negative_ttl: u64,
    pub(crate) timeout: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) fetch_concurrency: usize,
    pub(crate) close_timeout: Duration,
}

pub(crate) struct Inner {
    l1: MemoryTier,
    l2: Arc<dyn Store>,
    l2_guard: Arc<Guarded>,
    sqlite: Arc<SqliteTier>,
    guard: Arc<SourceGuard>,
    events: Events,
    source: Arc<dyn Source>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    offline: Arc<AtomicBool>,
    closed: AtomicBool,
    flights: Flights<(Arc<Entry>, Loaded)>,
    stats: Arc<Stats>,
    outbox: Option<Outbox>,
    /// The outbox's storage in [`OutboxMode::Memory`].
    memory_queue: Option<Arc<MemoryQueue>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredCache")
            .field("strategy", &self.settings.strategy)
            .field("l1", &self.l1)
            .field("l2", &self.sqlite)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(outbox) = &self.outbox {
            outbox.stop();
        }
    }
}

/// A three-tier cache: memory (moka), SQLite, and a [`Source`] behind them.
///
/// Cheap to clone; clones share one cache. Dropping the last clone stops the background tasks
/// without blocking; [`close`](Self::close) first delivers what the write-behind outbox holds.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
/// use async_trait::async_trait;
/// use tiercache::source::{Fetched, Source, SourceError};
/// use tiercache::{Tier, TieredCache};
///
/// #[derive(Debug)]
/// struct Shout;
///
/// #[async_trait]
/// impl Source for Shout {
///     async fn fetch(&self, key: &str, _: Option<&str>) -> Result<Fetched, SourceError> {
///         Ok(Fetched::value(key.to_uppercase()))
///     }
/// }
///
/// let cache = TieredCache::builder().source(Shout).build()?;
/// let first = cache.lookup("hello").await?.unwrap();
/// assert_eq!((first.value.as_ref(), first.tier), (&b"HELLO"[..], Tier::L3));
/// let again = cache.lookup("hello").await?.unwrap();
/// assert_eq!(again.tier, Tier::L1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TieredCache {
    inner: Arc<Inner>,
}

/// The result of [`TieredCache::warm`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WarmSummary {
    /// Keys listed under the prefix.
    pub listed: usize,
    /// Fetched with a new value.
    pub fetched: usize,
    /// Confirmed unchanged by the source (no bytes moved).
    pub not_modified: usize,
    /// Already fresh in the cache; the source was not asked.
    pub cached: usize,
    /// Failed, with the error of each.
    pub failed: Vec<(String, String)>,
}

/// Progress of [`TieredCache::warm`], passed to its callback after each key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmProgress {
    /// Keys done.
    pub done: usize,
    /// Keys in all.
    pub total: usize,
}

fn add(a: u64, b: u64) -> u64 {
    a.saturating_add(b)
}

impl TieredCache {
    /// A builder with the documented defaults.
    pub fn builder() -> TieredCacheBuilder {
        TieredCacheBuilder::default()
    }

    pub(crate) fn from_builder(mut b: TieredCacheBuilder, sqlite: SqliteOptions) -> Result<Self> {
        let source = b.take_source();
        let file_backed = matches!(sqlite.location, Location::File(_));
        let sqlite = Arc::new(SqliteTier::open(sqlite)?);
        let events = Events::new();
        let l2_guard = Arc::new(Guarded::new(
            sqlite.clone(),
            b.storage_breaker.clone(),
            b.clock.clone(),
            events.clone(),
        ));
        let l2: Arc<dyn Store> = l2_guard.clone();
        let guard = Arc::new(SourceGuard::new(
            b.source_breaker.clone(),
            b.clock.clone(),
            (b.persist_breaker && file_backed).then(|| l2.clone()),
            events.clone(),
        ));
        let stats = Arc::new(Stats::with_enabled(b.stats));
        let settings = Settings {
            strategy: b.strategy,
            ttl: millis(b.ttl),
            stale_ttl: millis(b.stale_ttl),
            negative_ttl: millis(b.negative_ttl),
            timeout: b.timeout,
            soft_timeout: b.soft_timeout,
            fetch_concurrency: b.fetch_concurrency,
            close_timeout: b.close_timeout,
        };
        let memory_queue = (b.strategy == Strategy::WriteBehind
            && b.outbox_mode == OutboxMode::Memory)
            .then(|| Arc::new(MemoryQueue::default()));
        let queue: Arc<dyn Queue> = match &memory_queue {
            Some(q) => q.clone(),
            None => Arc::new(DurableQueue::new(l2.clone(), sqlite.pending_keys()?)),
        };
        let offline = Arc::new(AtomicBool::new(b.offline));
        // Every cache can deliver an outbox (one an earlier write-behind process left, say);
        // only write-behind runs the background flusher.
        let outbox = Some(Outbox::start(
            queue,
            source.clone(),
            b.clock.clone(),
            guard.clone(),
            events.clone(),
            crate::outbox::Retry {
                base: b.retry_base,
                max: b.retry_max,
                timeout: b.timeout,
            },
            offline.clone(),
            b.strategy == Strategy::WriteBehind,
        )?);
        Ok(Self {
            inner: Arc::new(Inner {
                l1: MemoryTier::new(b.memory_capacity),
                l2,
                l2_guard,
                sqlite,
                guard,
                events,
                source,
                clock: b.clock,
                settings,
                offline,
                closed: AtomicBool::new(false),
                flights: Flights::default(),
                stats,
                outbox,
                memory_queue,
            }),
        })
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.inner.settings.strategy
    }

    /// Switches offline mode: when on, the source is never contacted and whatever L1 and L2
    /// hold is served, stale included.
    pub fn set_offline(&self, offline: bool) {
        self.inner.offline.store(offline, Ordering::Relaxed);
    }

    /// Whether offline mode is on.
    pub fn is_offline(&self) -> bool {
        self.inner.offline.load(Ordering::Relaxed)
    }

    /// The checks every call makes: the cache is open and the key meets the general rules.
    #[inline]
    fn check_basic(&self, key: &str) -> Result<()> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        key::validate(key).map_err(|r| Error::invalid_key(key, r))
    }

    /// The source's rules too. Reads skip this on an L1 hit: nothing enters L1 without passing
    /// it, so an L1 hit is a key the source accepts.
    fn check_source(&self, key: &str) -> Result<()> {
        self.inner
            .source
            .check_key(key)
            .map_err(|r| Error::invalid_key(key, r))
    }

    fn check(&self, key: &str) -> Result<()> {
        self.check_basic(key)?;
        self.check_source(key)
    }

    #[inline]
    fn now(&self) -> u64 {
        self.inner.clock.now_millis()
    }

    // ---------------------------------------------------------------- reads

    /// The value of `key`, or `None` when it does not exist (or, under
    /// [`Strategy::CacheAside`], is not cached).
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; [`Error::Unavailable`] when the source failed and no stale copy
    /// could stand in; [`Error::Source`] when the source refused the request.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        // The L1 hit, without building a `Lookup` (no validator copy). The key rules are checked
        // after an L1 miss, before L2 or the source is touched: nothing enters L1 without
        // passing them, so an invalid key can only miss here.
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let timer = inner.stats.start_sampled();
        let now = self.now();
        let e = inner.l1.get(key).await;
        if let Some(e) = &e {
            if now < e.fresh_until {
                inner.stats.hit(Tier::L1);
                inner.stats.record(Tier::L1, Op::Get, timer);
                if e.value.is_none() {
                    inner.stats.negative_hit();
                }
                return Ok(e.value.clone());
            }
        }
        self.check_basic(key)?;
        let candidate = self.servable_l1(key, e, now).await;
        Ok(self
            .lookup_after_l1(key, None, candidate, now)
            .await?
            .map(|l| l.value))
    }

    /// The value of `key` with where it came from: the tier, fresh or stale (and why), its age.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn lookup(&self, key: &str) -> Result<Option<Lookup>> {
        self.lookup_inner(key, None).await
    }

    /// [`lookup`](Self::lookup) with per-call options.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn lookup_with(&self, key: &str, options: &ReadOptions) -> Result<Option<Lookup>> {
        self.lookup_inner(key, options.max_age.map(millis)).await
    }

    async fn lookup_inner(&self, key: &str, max_age: Option<u64>) -> Result<Option<Lookup>> {
        self.check_basic(key)?;
        let inner = &*self.inner;
        let timer = inner.stats.start_sampled();
        let e = inner.l1.get(key).await;
        let now = self.now();
        if let Some(e) = &e {
            if e.is_fresh(now, max_age) {
                inner.stats.hit(Tier::L1);
                inner.stats.record(Tier::L1, Op::Get, timer);
                return Ok(self.served(e, Tier::L1, Freshness::Fresh, now));
            }
        }
        let candidate = self.servable_l1(key, e, now).await;
        self.lookup_after_l1(key, max_age, candidate, now).await
    }

    /// The L1 copy that may still stand in as stale; one past its stale deadline is dropped
    /// (L1 has no expiry of its own: see `MemoryTier::new`).
    async fn servable_l1(
        &self,
        key: &str,
        e: Option<Arc<Entry>>,
        now: u64,
    ) -> Option<(Arc<Entry>, Tier)> {
        match e {
            Some(e) if e.is_servable(now) => Some((e, Tier::L1)),
            Some(_) => {
                self.inner.l1.remove(key).await;
                None
            }
            None => None,
        }
    }

    /// Everything after L1 could not answer fresh, boxed so the L1-hit future stays small.
    fn lookup_after_l1<'a>(
        &'a self,
        key: &'a str,
        max_age: Option<u64>,
        candidate: Option<(Arc<Entry>, Tier)>,
        now: u64,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<Lookup>>> {
        Box::pin(async move {
            let inner = &*self.inner;
            inner.stats.miss(Tier::L1);
            self.check_source(key)?;
            let timer = inner.stats.start();
            let span = tracing::debug_span!(
                "tiercache.get",
                key,
                tier = tracing::field::Empty,
                freshness = tracing::field::Empty
            );
            let result = in_span!(span.clone(), self.lookup_slow(key, max_age, candidate, now));
            let tier = match &result {
                Ok(Some(l)) => {
                    span.record("tier", l.tier.as_str());
                    span.record(
                        "freshness",
                        match l.freshness {
                            Freshness::Fresh => "fresh",
                            Freshness::Stale { reason } => reason.as_str(),
                        },
                    );
                    l.tier
                }
                _ => Tier::L3,
            };
            inner.stats.record(tier, Op::Get, timer);
            result
        })
    }

    /// Everything after an L1 miss: L2, then the source.
    async fn lookup_slow(
        &self,
        key: &str,
        max_age: Option<u64>,
        mut candidate: Option<(Arc<Entry>, Tier)>,
        now: u64,
    ) -> Result<Option<Lookup>> {
        let inner = &*self.inner;
        let found = match inner.l2.get_now(key) {
            Some(found) => found,
            None => inner.l2.get(key).await,
        };
        match found {
            Ok(found) => {
                if let Some(served) = self
                    .consider_l2(key, found, max_age, &mut candidate, now)
                    .await
                {
                    return Ok(served);
                }
            }
            Err(e) => {
                inner.stats.error(Tier::L2);
                tracing::warn!(key, error = %e, "L2 read failed; going on without it");
            }
        }
        self.ask_source(key, max_age, candidate, now).await
    }

    /// What L2 answered for `key`: a fresh entry is promoted into L1 and served (`Some`); a
    /// stale one becomes the `candidate` if it is newer than the one L1 had.
    async fn consider_l2(
        &self,
        key: &str,
        found: Option<Entry>,
        max_age: Option<u64>,
        candidate: &mut Option<(Arc<Entry>, Tier)>,
        now: u64,
    ) -> Option<Option<Lookup>> {
        let inner = &*self.inner;
        let Some(e) = found.filter(|e| e.is_servable(now)) else {
            inner.stats.miss(Tier::L2);
            return None;
        };
        let e = Arc::new(e);
        if e.is_fresh(now, max_age) {
            inner.stats.hit(Tier::L2);
            inner.l1.insert(key, e.clone()).await;
            inner.l2.touch(key, now);
            return Some(self.served(&e, Tier::L2, Freshness::Fresh, now));
        }
        inner.stats.miss(Tier::L2);
        if candidate
            .as_ref()
            .is_none_or(|(c, _)| e.stored_at > c.stored_at)
        {
            *candidate = Some((e, Tier::L2));
        }
        None
    }

    /// The source's turn: load (single-flight), or fall back to the stale candidate.
    async fn ask_source(
        &self,
        key: &str,
        max_age: Option<u64>,
        candidate: Option<(Arc<Entry>, Tier)>,
        now: u64,
    ) -> Result<Option<Lookup>> {
        let inner = &*self.inner;
        if !inner.settings.strategy.reads_through() {
            return Ok(None);
        }
        // A key with undelivered write-behind writes: the source still has the old value, so
        // the local copy (or the pending delete) is the answer.
        if inner.settings.strategy == Strategy::WriteBehind {
            let pending = inner
                .outbox
                .as_ref()
                .and_then(|o| o.queue().pending_for(key));
            match (pending, &candidate) {
                (Some(Pending::Delete), _) => return Ok(None),
                (Some(Pending::Put), Some((e, tier))) => {
                    return Ok(self.served(e, *tier, Freshness::Fresh, now));
                }
                // Both tiers dropped the copy (evicted, or a memory outbox that never wrote
                // L2): the outbox still holds the bytes.
                (Some(Pending::Put), None) => {
                    if let Some(served) = self.pending_write(key, now).await {
                        return Ok(served);
                    }
                }
                _ => {}
            }
        }
        if self.is_offline() {
            let err = SourceError::Unavailable {
                status: None,
                message: "offline mode is on".into(),
            };
            return self.fallback(key, candidate, StaleReason::Offline, err, now);
        }
        let prev = candidate.as_ref().map(|(e, _)| e.clone());
        let flight = inner.flights.join(key, || {
            load(self.inner.clone(), key.to_owned(), prev, max_age)
        });
        if !flight.leader {
            inner.stats.coalesced_waiter();
        }
        let result = match (inner.settings.soft_timeout, &candidate) {
            (Some(soft), Some(_)) => match tokio::time::timeout(soft, flight.wait()).await {
                Ok(r) => r,
                Err(_) => Err(Error::Unavailable {
                    key: key.to_owned(),
                    reason: StaleReason::Timeout,
                    source: SourceError::Timeout { after: soft },
                }),
            },
            _ => flight.wait().await,
        };
        match result {
            Ok((entry, _)) => Ok(self.served(&entry, Tier::L3, Freshness::Fresh, self.now())),
            Err(Error::Unavailable { reason, source, .. }) => {
                self.fallback(key, candidate, reason, source, now)
            }
            Err(e) => Err(e),
        }
    }

    /// Serves the stale candidate, or says the key is unavailable.
    fn fallback(
        &self,
        key: &str,
        candidate: Option<(Arc<Entry>, Tier)>,
        reason: StaleReason,
        source: SourceError,
        now: u64,
    ) -> Result<Option<Lookup>> {
        match candidate {
            Some((e, tier)) if e.is_servable(now) => {
                self.inner.stats.stale_served(reason);
                tracing::info!(key, %tier, %reason, "serving a stale copy");
                self.inner.events.emit(Event::StaleServed {
                    key: key.to_owned(),
                    tier,
                    reason,
                });
                // A candidate is never fresh for this read (else it would have been served).
                Ok(self.served(&e, tier, Freshness::Stale { reason }, now))
            }
            _ => Err(Error::Unavailable {
                key: key.to_owned(),
                reason,
                source,
            }),
        }
    }

    /// A write-behind key's undelivered put, read back from the outbox and held in L1 again.
    /// `None` when the outbox no longer has it (delivered meanwhile) or cannot be read: the
    /// source answers then.
    async fn pending_write(&self, key: &str, now: u64) -> Option<Option<Lookup>> {
        let inner = &*self.inner;
        let outbox = inner.outbox.as_ref()?;
        let value = match outbox.queue().pending_value(key).await {
            Ok(value) => value?,
            Err(e) => {
                tracing::warn!(key, error = %e, "could not read a pending write back from the outbox");
                return None;
            }
        };
        let fresh_until = add(now, inner.settings.ttl);
        let entry = Entry::new(
            Some(value),
            None,
            now,
            fresh_until,
            add(fresh_until, inner.settings.stale_ttl),
        );
        let tier = if inner.memory_queue.is_some() {
            Tier::L1
        } else {
            Tier::L2
        };
        inner.stats.hit(tier);
        let served = self.served(&entry, tier, Freshness::Fresh, now);
        inner.l1.insert(key, Arc::new(entry)).await;
        Some(served)
    }

    #[inline]
    fn served(&self, e: &Entry, tier: Tier, freshness: Freshness, now: u64) -> Option<Lookup> {
        match &e.value {
            Some(value) => Some(Lookup {
                value: value.clone(),
                tier,
                freshness,
                age: Duration::from_millis(now.saturating_sub(e.stored_at)),
                validator: e.validator.clone(),
            }),
            None => {
                self.inner.stats.negative_hit();
                None
            }
        }
    }

    /// Looks up many keys at once: one pass over L1, one SQL statement for all L1 misses, and
    /// the source (with bounded concurrency, one call per distinct key) for what is left.
    ///
    /// The results are in the order of `keys`; a failed key does not fail the others.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use tiercache::{Strategy, TieredCache};
    ///
    /// let cache = TieredCache::builder().strategy(Strategy::CacheAside).build()?;
    /// cache.set("a", "1").await?;
    /// let results = cache.mget(&["a", "b", "a"]).await;
    /// assert_eq!(results[0].as_ref().unwrap().as_ref().unwrap().value, "1");
    /// assert!(results[1].as_ref().unwrap().is_none());
    /// # Ok(()) }
    /// ```
    pub async fn mget<K: AsRef<str>>(&self, keys: &[K]) -> Vec<Result<Option<Lookup>>> {
        self.mget_with(keys, &ReadOptions::default()).await
    }

    /// [`mget`](Self::mget) with per-call options.
    pub async fn mget_with<K: AsRef<str>>(
        &self,
        keys: &[K],
        options: &ReadOptions,
    ) -> Vec<Result<Option<Lookup>>> {
        let span = tracing::debug_span!("tiercache.mget", keys = keys.len());
        let max_age = options.max_age.map(millis);
        in_span!(span, self.mget_inner(keys, max_age))
    }

    async fn mget_inner<K: AsRef<str>>(
        &self,
        keys: &[K],
        max_age: Option<u64>,
    ) -> Vec<Result<Option<Lookup>>> {
        let inner = &*self.inner;
        let timer = inner.stats.start();
        let now = self.now();
        let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        let mut slots: Vec<Option<Result<Option<Lookup>>>> = vec![None; keys.len()];
        // Distinct valid keys, each with the input positions it answers.
        let mut distinct: Vec<(&str, Vec<usize>)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for (i, &k) in keys.iter().enumerate() {
            if let Err(e) = self.check(k) {
                slots[i] = Some(Err(e));
                continue;
            }
            match index.get(k) {
                Some(&d) => {
                    let entry: &mut (&str, Vec<usize>) = &mut distinct[d];
                    entry.1.push(i);
                }
                None => {
                    index.insert(k, distinct.len());
                    distinct.push((k, vec![i]));
                }
            }
        }
        let mut answers: Vec<Option<Result<Option<Lookup>>>> = vec![None; distinct.len()];
        let mut candidates: Vec<Option<(Arc<Entry>, Tier)>> = vec![None; distinct.len()];
        // L1.
        let mut l1_misses = Vec::new();
        for (d, (k, _)) in distinct.iter().enumerate() {
            match inner.l1.get(k).await {
                Some(e) if e.is_fresh(now, max_age) => {
                    inner.stats.hit(Tier::L1);
                    answers[d] = Some(Ok(self.served(&e, Tier::L1, Freshness::Fresh, now)));
                }
                other => {
                    inner.stats.miss(Tier::L1);
                    candidates[d] = self.servable_l1(k, other, now).await;
                    l1_misses.push(d);
                }
            }
        }
        // L2: one statement for all L1 misses.
        let mut to_source = Vec::new();
        if !l1_misses.is_empty() {
            let wanted: Vec<&str> = l1_misses.iter().map(|&d| distinct[d].0).collect();
            match inner.l2.get_many(&wanted).await {
                Ok(found) => {
                    let mut found: std::collections::HashMap<String, Entry> =
                        found.into_iter().collect();
                    for d in l1_misses {
                        let k = distinct[d].0;
                        let answer = self
                            .consider_l2(k, found.remove(k), max_age, &mut candidates[d], now)
                            .await;
                        match answer {
                            Some(served) => answers[d] = Some(Ok(served)),
                            None => to_source.push(d),
                        }
                    }
                }
                Err(e) => {
                    inner.stats.error(Tier::L2);
                    tracing::warn!(error = %e, "L2 batch read failed; going on without it");
                    to_source = l1_misses;
                }
            }
        }
        // The source, for what is left.
        let distinct_ref = &distinct;
        let fetched: Vec<(usize, Result<Option<Lookup>>)> = stream::iter(to_source)
            .map(|d| {
                let candidate = candidates[d].take();
                async move {
                    let key = distinct_ref[d].0;
                    (d, self.ask_source(key, max_age, candidate, now).await)
                }
            })
            .buffer_unordered(inner.settings.fetch_concurrency)
            .collect()
            .await;
        for (d, r) in fetched {
            answers[d] = Some(r);
        }
        for (d, (_, positions)) in distinct.iter().enumerate() {
            let answer = answers[d].take().unwrap_or(Ok(None));
            for &i in positions {
                slots[i] = Some(answer.clone());
            }
        }
        inner.stats.record(Tier::L2, Op::Mget, timer);
        slots.into_iter().map(|s| s.unwrap_or(Ok(None))).collect()
    }

    /// Reads `key` and decodes it from JSON. A value that fails to decode is an error for this
    /// call, counted, and dropped from the caches.
    ///
    /// # Errors
    /// As [`get`](Self::get), and [`Error::Decode`].
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let Some(bytes) = self.get(key).await? else {
            return Ok(None);
        };
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                self.inner.stats.decode_error();
                self.inner.l1.remove(key).await;
                if let Err(e) = self.inner.l2.remove(key).await {
                    tracing::warn!(key, error = %e, "could not drop an undecodable entry from L2");
                }
                Err(Error::Decode {
                    key: key.to_owned(),
                    message: e.to_string(),
                })
            }
        }
    }

    // ---------------------------------------------------------------- writes

    /// Writes `value` under `key` with the default TTL, following the strategy.
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; under write-through, the source's refusal (the caches are left
    /// untouched); under write-behind, [`Error::Storage`] when the write could not be made
    /// durable (it is then not acknowledged).
    pub async fn set(&self, key: &str, value: impl Into<Bytes>) -> Result<()> {
        self.set_entry(key, value.into(), None).await
    }

    /// [`set`](Self::set) with its own TTL.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_with_ttl(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<()> {
        self.set_entry(key, value.into(), Some(millis(ttl))).await
    }

    /// Encodes `value` as JSON and [`set`](Self::set)s it.
    ///
    /// # Errors
    /// As [`set`](Self::set), and [`Error::Encode`].
    pub async fn set_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Encode {
            key: key.to_owned(),
            message: e.to_string(),
        })?;
        self.set(key, bytes).await
    }

    async fn set_entry(&self, key: &str, value: Bytes, ttl: Option<u64>) -> Result<()> {
        self.check(key)?;
        let span = tracing::debug_span!(
            "tiercache.set",
            key,
            strategy = self.inner.settings.strategy.as_str()
        );
        in_span!(span, self.set_checked(key, value, ttl))
    }

    async fn set_checked(&self, key: &str, value: Bytes, ttl: Option<u64>) -> Result<()> {
        let inner = &*self.inner;
        // Sampled, like L1 hits: a memory-mode set costs about a moka insert.
        let timer = inner.stats.start_sampled();
        let now = self.now();
        let fresh_until = add(now, ttl.unwrap_or(inner.settings.ttl));
        let entry = Entry::new(
            Some(value.clone()),
            None,
            now,
            fresh_until,
            add(fresh_until, inner.settings.stale_ttl),
        );
        match inner.settings.strategy {
            Strategy::ReadThrough | Strategy::CacheAside => self.put_l2(key, entry.clone()).await,
            Strategy::WriteThrough => {
                self.write_source(key, Some(&value)).await?;
                self.put_l2(key, entry.clone()).await;
            }
            // The memory outbox is a plain push: no boxed future, no copy of the entry.
            Strategy::WriteBehind => match &inner.memory_queue {
                Some(queue) => queue.push(key, OutboxOp::Put(value), now),
                None => {
                    self.outbox()?
                        .queue()
                        .enqueue(key, Some(entry.clone()), OutboxOp::Put(value), now)
                        .await?;
                }
            },
        }
        inner.l1.insert(key, Arc::new(entry)).await;
        if let Some(outbox) = &inner.outbox {
            outbox.notify();
        }
        inner.stats.record(Tier::L1, Op::Set, timer);
        Ok(())
    }

    /// Deletes `key`, following the strategy.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.check(key)?;
        let inner = &*self.inner;
        let timer = inner.stats.start();
        match inner.settings.strategy {
            Strategy::ReadThrough | Strategy::CacheAside => self.remove_l2(key).await,
            Strategy::WriteThrough => {
                self.write_source(key, None).await?;
                self.remove_l2(key).await;
            }
            Strategy::WriteBehind => {
                let now = self.now();
                self.outbox()?
                    .queue()
                    .enqueue(key, None, OutboxOp::Delete, now)
                    .await?;
                if inner.memory_queue.is_some() {
                    // The memory outbox does not write L2: drop the old copy here.
                    self.remove_l2(key).await;
                }
            }
        }
        inner.l1.remove(key).await;
        if let Some(outbox) = &inner.outbox {
            outbox.notify();
        }
        inner.stats.record(Tier::L1, Op::Delete, timer);
        Ok(())
    }

    /// Drops `key` from L1 and L2 without telling the source.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], [`Error::Storage`].
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        self.check(key)?;
        self.inner.l1.remove(key).await;
        self.inner.l2.remove(key).await
    }

    async fn remove_l2(&self, key: &str) {
        if let Err(e) = self.inner.l2.remove(key).await {
            self.inner.stats.error(Tier::L2);
            tracing::warn!(key, error = %e, "L2 delete failed");
        }
    }

    async fn put_l2(&self, key: &str, entry: Entry) {
        if let Err(e) = self.inner.l2.put(key, entry).await {
            self.inner.stats.error(Tier::L2);
            tracing::warn!(key, error = %e, "L2 write failed; the value is held in L1 only");
        }
    }

    fn outbox(&self) -> Result<&Outbox> {
        self.inner.outbox.as_ref().ok_or(Error::Closed)
    }

    /// Write-through: the source first.
    async fn write_source(&self, key: &str, value: Option<&Bytes>) -> Result<()> {
        let inner = &*self.inner;
        if self.is_offline() {
            return Err(Error::Unavailable {
                key: key.to_owned(),
                reason: StaleReason::Offline,
                source: SourceError::Unavailable {
                    status: None,
                    message: "offline mode is on: the source was not contacted".into(),
                },
            });
        }
        let call = async {
            match value {
                Some(v) => inner.source.put(key, v).await,
                None => inner.source.delete(key).await,
            }
        };
        guarded(&inner.guard, inner.settings.timeout, call)
            .await
            .map_err(|e| source_failure(key, e))
    }

    // ---------------------------------------------------------------- write-behind

    /// Delivers the write-behind outbox now: one attempt for every pending key, ignoring retry
    /// delays. Returns what was delivered and what is stuck, and why.
    ///
    /// Under other strategies there is no outbox and the report is empty.
    ///
    /// # Errors
    /// [`Error::Storage`] when the outbox cannot be read.
    pub async fn flush(&self) -> Result<FlushReport> {
        match &self.inner.outbox {
            Some(outbox) => outbox.flush().await,
            None => Ok(FlushReport::default()),
        }
    }

    /// Writes the source refused for good, kept until retried or discarded.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        let Some(outbox) = &self.inner.outbox else {
            return Ok(Vec::new());
        };
        Ok(outbox
            .queue()
            .dead_letters()
            .await?
            .into_iter()
            .map(DeadLetter::from)
            .collect())
    }

    /// Moves a dead letter back into the outbox for another attempt. Returns whether it existed.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn retry_dead_letter(&self, id: i64) -> Result<bool> {
        let Some(outbox) = &self.inner.outbox else {
            return Ok(false);
        };
        let found = outbox.queue().resolve(id, true).await?;
        outbox.notify();
        Ok(found)
    }

    /// Deletes a dead letter for good. Returns whether it existed.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn discard_dead_letter(&self, id: i64) -> Result<bool> {
        match &self.inner.outbox {
            Some(outbox) => outbox.queue().resolve(id, false).await,
            None => Ok(false),
        }
    }

    /// The write-behind backlog: pending writes, dead letters, and the oldest pending write's
    /// age in ms. `None` under other strategies (or when L2 cannot be read).
    async fn backlog(&self) -> Option<BacklogHealth> {
        let inner = &*self.inner;
        inner.outbox.as_ref()?;
        let now = self.now();
        let (pending, dead_letters, oldest) = match &inner.memory_queue {
            Some(q) => q.depth(),
            None => {
                let s = inner.l2.summary(now).await.ok()?;
                (s.outbox_depth, s.dead_letters, s.oldest_pending_ms)
            }
        };
        Some(BacklogHealth {
            pending,
            dead_letters,
            oldest_pending_age_ms: oldest.map(|t| now.saturating_sub(t)),
        })
    }

    /// Flushes the outbox (within the close timeout), then stops the background tasks. What is
    /// left stays in the database for the next open. Later calls fail with [`Error::Closed`].
    ///
    /// # Errors
    /// [`Error::Storage`] when the outbox cannot be read.
    pub async fn close(&self) -> Result<FlushReport> {
        let write_behind = self.inner.settings.strategy == Strategy::WriteBehind;
        let report = match &self.inner.outbox {
            Some(outbox) if write_behind => {
                let flushed =
                    tokio::time::timeout(self.inner.settings.close_timeout, outbox.flush()).await;
                outbox.stop();
                match flushed {
                    Ok(r) => r?,
                    Err(_) => outbox.report_pending().await?,
                }
            }
            _ => FlushReport::default(),
        };
        self.inner.closed.store(true, Ordering::Relaxed);
        Ok(report)
    }

    // ---------------------------------------------------------------- warm

    /// Fetches every key the source lists under `prefix` into the cache (conditional requests
    /// for what is already held), with bounded concurrency, calling `progress` after each key.
    /// This is what makes a folder of components available offline.
    ///
    /// # Errors
    /// [`Error::Source`] / [`Error::Unavailable`] when the listing fails. Per-key failures are in
    /// the summary.
    pub async fn warm(
        &self,
        prefix: &str,
        progress: impl Fn(WarmProgress) + Send + Sync,
    ) -> Result<WarmSummary> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        if self.is_offline() {
            return Err(Error::Unavailable {
                key: prefix.to_owned(),
                reason: StaleReason::Offline,
                source: SourceError::Unavailable {
                    status: None,
                    message: "offline mode is on: the source was not contacted".into(),
                },
            });
        }
        let inner = &*self.inner;
        let keys = guarded(
            &inner.guard,
            inner.settings.timeout,
            inner.source.list(prefix),
        )
        .await
        .map_err(|e| source_failure(prefix, e))?;
        let total = keys.len();
        let mut summary = WarmSummary {
            listed: total,
            ..WarmSummary::default()
        };
        let done = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<(String, Result<Loaded>)> = stream::iter(keys)
            .map(|k| {
                let done = &done;
                let progress = &progress;
                async move {
                    let r = self.warm_one(&k).await;
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    progress(WarmProgress { done: n, total });
                    (k, r)
                }
            })
            .buffer_unordered(self.inner.settings.fetch_concurrency)
            .collect()
            .await;
        for (k, r) in results {
            match r {
                Ok(Loaded::Fetched) => summary.fetched += 1,
                Ok(Loaded::NotModified) => summary.not_modified += 1,
                Ok(Loaded::AlreadyCached) => summary.cached += 1,
                Err(e) => summary.failed.push((k, crate::error::chain_text(&e))),
            }
        }
        summary.failed.sort();
        Ok(summary)
    }

    async fn warm_one(&self, key: &str) -> Result<Loaded> {
        self.check(key)?;
        let now = self.now();
        let held = match self.inner.l2.get(key).await {
            Ok(e) => e.filter(|e| e.is_servable(now)).map(Arc::new),
            Err(_) => self.inner.l1.get(key).await,
        };
        if held.as_ref().is_some_and(|e| e.is_fresh(now, None)) {
            return Ok(Loaded::AlreadyCached);
        }
        let flight = self
            .inner
            .flights
            .join(key, || load(self.inner.clone(), key.to_owned(), held, None));
        flight.wait().await.map(|(_, how)| how)
    }

    // ---------------------------------------------------------------- introspection

    /// A snapshot of the stats: per-tier hits, misses, errors and latency percentiles, stale
    /// serves by reason, source calls by outcome, the rate-limit budget, the breakers and the
    /// write-behind backlog.
    pub async fn stats(&self) -> StatsSnapshot {
        let inner = &*self.inner;
        let breaker = |name: &str, s: crate::breaker::BreakerStatus| crate::stats::BreakerStats {
            name: name.to_owned(),
            state: s.state.as_str().to_owned(),
            transitions: s.transitions,
            consecutive_failures: s.consecutive_failures,
        };
        let mut outbox = crate::stats::OutboxStats::default();
        if let Some(o) = &inner.outbox {
            (outbox.delivered, outbox.retries) = o.counters();
        }
        if let Some(b) = self.backlog().await {
            outbox.depth = b.pending;
            outbox.dead_letters = b.dead_letters;
            outbox.oldest_pending_age_ms = b.oldest_pending_age_ms;
        }
        inner.stats.snapshot(SnapshotExtras {
            rate_limit: inner.source.rate_limit(),
            breakers: vec![
                breaker("l2_read", inner.l2_guard.status().0),
                breaker("l2_write", inner.l2_guard.status().1),
                breaker("l3", inner.guard.status()),
            ],
            outbox,
        })
    }

    /// Whether each tier is working: breaker states, last errors, the write-behind backlog.
    /// The L3 breaker is re-read from the database first, so another process's trip shows.
    pub async fn health(&self) -> HealthReport {
        let inner = &*self.inner;
        inner.guard.refresh().await;
        let (reads, writes) = inner.l2_guard.status();
        let l2 = TierHealth::from_breakers([reads, writes], inner.l2_guard.last_error());
        let l3 = TierHealth::from_breaker(inner.guard.status(), inner.guard.last_error());
        let backlog = self.backlog().await;
        HealthReport::overall(l2, l3, self.is_offline(), backlog)
    }

    /// Subscribes to significant events: breaker transitions, stale serves, tiers degraded and
    /// recovered, dead letters. A subscriber that falls more than 256 events behind loses the
    /// oldest (see [`tokio::sync::broadcast`]).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::event::Event> {
        self.inner.events.subscribe()
    }

    /// The source breaker's status.
    pub fn source_breaker_status(&self) -> crate::breaker::BreakerStatus {
        self.inner.guard.status()
    }

    /// Forces the source's breaker open: no source calls until [`reset_source_breaker`]
    /// (persisted, so other processes on the same database respect it too).
    ///
    /// [`reset_source_breaker`]: Self::reset_source_breaker
    pub async fn force_source_open(&self) {
        self.inner.guard.apply(BreakerState::force_open).await;
    }

    /// Forces the source's breaker closed: failures are counted but never open it.
    pub async fn force_source_closed(&self) {
        self.inner.guard.apply(BreakerState::force_close).await;
    }

    /// Resets the source's breaker to closed, forgetting failures and rate-limit holds.
    pub async fn reset_source_breaker(&self) {
        self.inner.guard.apply(BreakerState::reset).await;
    }

    /// Zeroes the stats.
    pub fn reset_stats(&self) {
        self.inner.stats.reset();
    }

    /// What the L2 database holds: entries, bytes, stale entries, outbox depth, dead letters.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn store_summary(&self) -> Result<StoreSummary> {
        self.inner.l2.summary(self.now()).await
    }

    /// The source's last seen rate-limit budget.
    pub fn rate_limit(&self) -> Option<crate::source::RateLimit> {
        self.inner.source.rate_limit()
    }

    /// Drops everything L1 holds (L2 and the source are untouched): frees memory, or makes the
    /// next reads come from L2.
    pub async fn clear_memory(&self) {
        self.inner.l1.clear().await;
    }

    /// Entries and weighted bytes in L1 (after pending maintenance).
    pub async fn memory_usage(&self) -> (u64, u64) {
        self.inner.l1.run_pending_tasks().await;
        (self.inner.l1.entry_count(), self.inner.l1.weighted_size())
    }

    #[doc(hidden)]
    /// Statements run on L2's read connections so far (tests prove `mget` makes one).
    pub fn l2_read_statements(&self) -> u64 {
        self.inner.sqlite.read_statements()
    }
}

/// Classifies a source error into the cache's error.
fn source_failure(key: &str, e: SourceError) -> Error {
    let reason = match &e {
        SourceError::RateLimited { .. } => Some(StaleReason::RateLimited),
        SourceError::Timeout { .. } => Some(StaleReason::Timeout),
        SourceError::CircuitOpen { .. } => Some(StaleReason::CircuitOpen),
        e if e.counts_as_failure() => Some(StaleReason::SourceError),
        _ => None,
    };
    match reason {
        Some(reason) => Error::Unavailable {
            key: key.to_owned(),
            reason,
            source: e,
        },
        None => Error::Source {
            key: key.to_owned(),
            source: e,
        },
    }
}

/// One load from the source, run as its own task by single-flight.
async fn load(
    inner: Arc<Inner>,
    key: String,
    prev: Option<Arc<Entry>>,
    max_age: Option<u64>,
) -> LoadResult {
    let clock = inner.clock.clone();
    let now = clock.now_millis();
    // A load that finished just before this one started has already filled L1.
    if let Some(e) = inner.l1.get(&key).await {
        let same = prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, &e));
        if !same && e.is_fresh(now, max_age) {
            return Ok((e, Loaded::AlreadyCached));
        }
    }
    let validator = prev
        .as_ref()
        .filter(|p| p.value.is_some())
        .and_then(|p| p.validator.clone());
    let settings = &inner.settings;
    let fetched = guarded(
        &inner.guard,
        settings.timeout,
        inner.source.fetch(&key, validator.as_deref()),
    )
    .await;
    let now = clock.now_millis();
    let deadlines = |ttl: Option<Duration>, base: u64| {
        let fresh_until = add(now, ttl.map_or(base, millis));
        (fresh_until, add(fresh_until, settings.stale_ttl))
    };
    let (entry, how) = match fetched {
        Ok(Fetched::Value {
            value,
            validator,
            ttl,
        }) => {
            inner.stats.source_call(SourceOutcome::Ok);
            let (fresh_until, stale_until) = deadlines(ttl, settings.ttl);
            let entry = Entry::new(Some(value), validator, now, fresh_until, stale_until);
            (entry, Loaded::Fetched)
        }
        Ok(Fetched::NotModified { ttl }) => {
            inner.stats.source_call(SourceOutcome::NotModified);
            let Some(prev) = prev.filter(|p| p.value.is_some()) else {
                inner.stats.source_call(SourceOutcome::Failed);
                return Err(source_failure(
                    &key,
                    SourceError::InvalidResponse {
                        message: "the source answered \"not modified\" to an unconditional request"
                            .into(),
                    },
                ));
            };
            let (fresh_until, stale_until) = deadlines(ttl, settings.ttl);
            (
                prev.renewed(now, fresh_until, stale_until),
                Loaded::NotModified,
            )
        }
        Ok(Fetched::NotFound) => {
            inner.stats.source_call(SourceOutcome::NotFound);
            let fresh_until = add(now, settings.negative_ttl);
            let entry = Entry::new(None, None, now, fresh_until, fresh_until);
            (entry, Loaded::Fetched)
        }
        Err(e) => {
            inner
                .stats
                .source_call(if e.rate_limited_until().is_some() {
                    SourceOutcome::RateLimited
                } else {
                    SourceOutcome::Failed
                });
            if !matches!(e, SourceError::CircuitOpen { .. }) {
                inner.stats.error(Tier::L3);
            }
            return Err(source_failure(&key, e));
        }
    };
    // L1 first: readers see the answer at once; L2 follows (a bytes-free renewal for a 304).
    let entry = Arc::new(entry);
    let remember = settings.negative_ttl > 0 || entry.value.is_some();
    if remember {
        inner.l1.insert(&key, entry.clone()).await;
    }
    let written = match how {
        Loaded::NotModified => {
            inner
                .l2
                .renew(&key, entry.stored_at, entry.fresh_until, entry.stale_until)
                .await
        }
        _ if remember => inner.l2.put(&key, (*entry).clone()).await,
        _ => Ok(()),
    };
    if let Err(e) = written {
        inner.stats.error(Tier::L2);
        tracing::warn!(key, error = %e, "L2 write failed; the value is held in L1 only");
    }
    Ok((entry, how))
}
