//! [`TieredCache`]: the strategy, single-flight, freshness and stats over the three tiers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::breaker::BreakerState;
use crate::clock::{millis, Clock};
use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::event::{Event, Events};
use crate::health::{BacklogHealth, HealthReport, HealthStatus, TierHealth};
use crate::key;
use crate::lookup::{Freshness, Lookup, StaleReason, Tier};
use crate::outbox::{
    DeadLetter, DurableQueue, FlushReport, LocalTiers, MemoryQueue, Outbox, OutboxMode, Queue,
};
use crate::source::{Fetched, Source, SourceError};
use crate::stats::{Op, SnapshotExtras, SourceOutcome, Stats, StatsSnapshot};
use crate::tier::guarded::Guarded;
use crate::tier::l2::L2;
use crate::tier::memory::MemoryTier;
use crate::tier::sqlite::{Location, SqliteOptions, SqliteTier};
use crate::tier::{OutboxOp, Store, StoreSummary};

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

mod admin;
mod batch;
mod builder;
mod bundle;
mod fleet;
mod flight;
mod invalidate;
mod load;
mod loader;
mod options;
mod read;
mod refresh;
mod typed;
mod validate;
mod warm;
mod window;
mod write;

pub use builder::TieredCacheBuilder;
pub use options::{ReadOptions, Strategy, DEFAULT_MAX_L1_AGE};
pub use typed::Typed;

use crate::source::guard::{guarded, SourceGuard};
use crate::tier::fence::Fences;
use flight::Flights;
use load::{load, source_failure};

/// How a load from the source ended, for `warm` and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loaded {
    /// A new value (or "not found") came from the source.
    Fetched,
    /// The source confirmed the cached copy (304).
    NotModified,
    /// Another load had just filled L1; the source was not called.
    AlreadyCached,
    /// `warm` only: not sent, the budget is at or below the reserve.
    SkippedBudget,
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
    l2: L2,
    l2_guard: Arc<Guarded>,
    /// The SQLite tier under `l2_guard`; `None` for a store given to the builder.
    sqlite: Option<Arc<SqliteTier>>,
    /// The L2 store under `l2_guard`, for Debug.
    l2_store: Arc<dyn Store>,
    guard: Arc<SourceGuard>,
    events: Events,
    source: Arc<dyn Source>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    offline: Arc<AtomicBool>,
    closed: AtomicBool,
    flights: Flights<(Arc<Entry>, Loaded)>,
    /// Refresh-ahead and the budget reserve.
    background: refresh::Background,
    /// The cold misses of concurrent `get`s, batched ([`TieredCacheBuilder::get_batch_window`]).
    get_window: Option<window::GetWindow>,
    stats: Arc<Stats>,
    outbox: Option<Outbox>,
    /// The outbox's storage in [`OutboxMode::Memory`].
    memory_queue: Option<Arc<MemoryQueue>>,
    /// Keeps fills from overwriting the writes they raced (see `tier::fence`).
    fences: Arc<Fences>,
    /// This cache's id among the caches sharing `fences`.
    peer_id: u64,
    /// Dropped (by `close` or with the cache) to end the task applying other instances'
    /// writes to L1 (see `invalidate`).
    stop_invalidations: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Whether L2 tells this cache of other instances' writes now (`None`: it never does).
    listening: Option<crate::tier::Listening>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredCache")
            .field("strategy", &self.settings.strategy)
            .field("l1", &self.l1)
            .field("l2", &self.l2_store)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(outbox) = &self.outbox {
            outbox.stop();
        }
        self.fences.leave(self.peer_id);
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
    /// Not sent: the source's budget was at or below the reserve
    /// ([`budget_reserve`](TieredCacheBuilder::budget_reserve)); warm is background work.
    pub skipped_budget: usize,
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
        let db_path = match (&sqlite.location, &b.store) {
            (Location::File(p), None) => Some(p.clone()),
            _ => None,
        };
        // A store given to the builder is shared state (a database server): the breaker is
        // persisted there as in a database file; a memory database is this process's alone.
        let (sqlite, l2_store, shared): (_, Arc<dyn Store>, _) = match b.store.take() {
            Some(store) => (None, store, true),
            None => {
                let file_backed = matches!(sqlite.location, Location::File(_));
                let tier = Arc::new(SqliteTier::open(sqlite)?);
                (Some(tier.clone()), tier, file_backed)
            }
        };
        let events = Events::new();
        let l2_guard = Arc::new(Guarded::new(
            l2_store.clone(),
            b.storage_breaker.clone(),
            b.clock.clone(),
            events.clone(),
        ));
        let l2 = L2::new(l2_guard.clone());
        let guard = Arc::new(SourceGuard::new(
            b.source_breaker.clone(),
            source.clone(),
            b.clock.clone(),
            (b.persist_breaker && shared)
                .then(|| l2_guard.clone() as Arc<dyn crate::tier::StateStore>),
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
            None => Arc::new(DurableQueue::new(l2_guard.clone())),
        };
        let l1 = MemoryTier::new(b.memory_capacity, b.clock.clone());
        // Shared with this process's other caches on the same file (see `tier::fence`).
        let (fences, peer_id) = Fences::for_file(db_path.as_deref(), &l1);
        // Other instances' writes to this L1 (a store shared by processes); dropping the sender
        // (an error below, `close`, or the cache) ends the task.
        let (stop_invalidations, listening) = match invalidate::start(&l2_store, &l1, &fences)
            .inspect_err(|_| fences.leave(peer_id))?
        {
            Some((stop, listening)) => (Some(stop), listening),
            None => (None, None),
        };
        // The maximum L1 age: as set, else on when L2 publishes (see `max_l1_age`).
        l1.set_max_age(b.max_l1_age.unwrap_or_else(|| {
            stop_invalidations
                .is_some()
                .then_some(options::DEFAULT_MAX_L1_AGE)
        }));
        let offline = Arc::new(AtomicBool::new(b.offline));
        // Every cache can deliver an outbox (one an earlier write-behind process left, say);
        // only write-behind runs the background flusher.
        let outbox = Some(
            Outbox::start(
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
                LocalTiers {
                    l1: l1.clone(),
                    l2: l2.clone(),
                    fences: fences.clone(),
                    peer_id,
                    memory_mode: memory_queue.is_some(),
                    ttl: settings.ttl,
                    stale_ttl: settings.stale_ttl,
                },
                b.strategy == Strategy::WriteBehind && b.background_flush,
            )
            .inspect_err(|_| fences.leave(peer_id))?,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                l1,
                l2,
                l2_guard,
                sqlite,
                l2_store,
                guard,
                events,
                source,
                clock: b.clock,
                settings,
                offline,
                closed: AtomicBool::new(false),
                flights: Flights::default(),
                background: refresh::Background::new(
                    b.refresh_ahead,
                    b.budget_reserve,
                    b.fetch_concurrency,
                ),
                get_window: b.get_batch_window.map(window::GetWindow::new),
                stats,
                outbox,
                memory_queue,
                fences,
                peer_id,
                stop_invalidations: std::sync::Mutex::new(stop_invalidations),
                listening,
            }),
        })
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.inner.settings.strategy
    }

    /// The clock the cache reads time from (the builder's [`clock`](TieredCacheBuilder::clock),
    /// else the system's): deadlines such as a rate limit's reset compare against it.
    pub fn clock(&self) -> &dyn Clock {
        &*self.inner.clock
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

    /// The error of a call that needs the source while offline mode is on (nothing was sent).
    fn offline_error(key: &str) -> Error {
        Error::Unavailable {
            key: key.to_owned(),
            reason: StaleReason::Offline,
            source: crate::source::guard::not_sent(),
        }
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
}
