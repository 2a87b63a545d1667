//! [`TieredCacheBuilder`]: every knob, its default, and the checks `build()` makes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::BreakerPolicy;
use crate::clock::{Clock, SystemClock};
#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::outbox::OutboxMode;
use crate::source::{NoSource, Source};
use crate::tier::sqlite::{Location, OnCorrupt, SqliteOptions, Synchronous};
use crate::tier::Store;

use super::{Strategy, TieredCache};

pub(super) const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
pub(super) const TIB: u64 = 1024 * GIB;
/// Longer than any sensible cache lifetime; a larger TTL is taken for a unit mistake.
pub(super) const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Builds a [`TieredCache`]. Get one from [`TieredCache::builder`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
/// use std::time::Duration;
/// use tiercache::{Strategy, TieredCache};
///
/// let cache = TieredCache::builder()
///     .memory_capacity(16 * 1024 * 1024)
///     .sqlite_in_memory()
///     .strategy(Strategy::CacheAside)
///     .ttl(Duration::from_secs(60))
///     .build()?;
/// cache.set("greeting", "hello").await?;
/// assert_eq!(cache.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
/// # Ok(()) }
/// ```
#[must_use]
#[derive(Debug, Clone)]
pub struct TieredCacheBuilder {
    pub(crate) memory_capacity: u64,
    pub(crate) sqlite_location: Location,
    pub(crate) sqlite_capacity: u64,
    pub(crate) outbox_capacity: Option<u64>,
    pub(crate) synchronous: Synchronous,
    pub(crate) on_corrupt: OnCorrupt,
    pub(crate) sqlite_readers: usize,
    pub(crate) source: Option<Arc<dyn Source>>,
    pub(crate) strategy: Strategy,
    pub(crate) ttl: Duration,
    pub(crate) stale_ttl: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) timeout: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) fetch_concurrency: usize,
    pub(crate) refresh_ahead: Option<f64>,
    pub(crate) get_batch_window: Option<Duration>,
    pub(crate) budget_reserve: Option<u64>,
    pub(crate) offline: bool,
    pub(crate) stats: bool,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) retry_base: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) source_breaker: BreakerPolicy,
    pub(crate) storage_breaker: BreakerPolicy,
    pub(crate) persist_breaker: bool,
    pub(crate) outbox_mode: OutboxMode,
    pub(crate) background_flush: bool,
    pub(crate) pragmas: Vec<(String, String)>,
    pub(crate) busy_timeout: Duration,
    /// L2 given by the caller instead of SQLite.
    pub(crate) store: Option<Arc<dyn Store>>,
    /// `None`: the default ([`DEFAULT_MAX_L1_AGE`] when L2 publishes invalidations, else off);
    /// `Some(None)`: off.
    pub(crate) max_l1_age: Option<Option<Duration>>,
}

impl Default for TieredCacheBuilder {
    fn default() -> Self {
        Self {
            memory_capacity: 64 * MIB,
            sqlite_location: Location::Memory,
            sqlite_capacity: GIB,
            outbox_capacity: None,
            synchronous: Synchronous::Normal,
            on_corrupt: OnCorrupt::Fail,
            sqlite_readers: 2,
            source: None,
            strategy: Strategy::ReadThrough,
            ttl: Duration::from_secs(300),
            stale_ttl: Duration::from_secs(24 * 3600),
            negative_ttl: Duration::from_secs(60),
            timeout: Duration::from_secs(15),
            soft_timeout: None,
            fetch_concurrency: 8,
            refresh_ahead: None,
            get_batch_window: None,
            budget_reserve: None,
            offline: false,
            stats: true,
            clock: Arc::new(SystemClock),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            close_timeout: Duration::from_secs(10),
            source_breaker: BreakerPolicy::default(),
            storage_breaker: default_storage_breaker(),
            persist_breaker: true,
            outbox_mode: OutboxMode::Durable,
            background_flush: true,
            pragmas: Vec::new(),
            busy_timeout: Duration::from_secs(5),
            store: None,
            max_l1_age: None,
        }
    }
}

/// L2's breaker: three failures in a row bypass the database; it is probed again after 5 s,
/// backing off to a minute.
fn default_storage_breaker() -> BreakerPolicy {
    BreakerPolicy::builder()
        .failure_threshold(3)
        .base_recovery(Duration::from_secs(5))
        .max_recovery(Duration::from_secs(60))
        .build()
        .unwrap_or_default()
}

impl TieredCacheBuilder {
    /// L1's bound in bytes (keys, values and a per-entry overhead). Default: 64 MiB.
    pub fn memory_capacity(mut self, bytes: u64) -> Self {
        self.memory_capacity = bytes;
        self
    }

    /// Keeps L2 in the database file at `path` (created if missing; WAL mode). Default: an
    /// in-memory database, which does not survive the process.
    pub fn sqlite_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.sqlite_location = Location::File(path.into());
        self
    }

    /// Puts `store` under the cache as L2 instead of SQLite: a backend that implements the
    /// [`tier::store`](crate::tier::store) traits (entries, outbox, shared state), held to the
    /// contract documented there. The cache wraps it in L2's circuit breakers
    /// ([`storage_breaker`](Self::storage_breaker)) as it does SQLite; the source's breaker is
    /// kept in it when [`persist_breaker`](Self::persist_breaker) is on. The `sqlite_*`
    /// settings do not apply; `build()` refuses a [`sqlite_path`](Self::sqlite_path) with it.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Keeps L2 in an in-memory SQLite database (for tests). This is the default.
    pub fn sqlite_in_memory(mut self) -> Self {
        self.sqlite_location = Location::Memory;
        self
    }

    /// L2's bound in bytes of values held, the write-behind outbox's included; past it,
    /// expired entries go first, then the least recently used (a bounded batch per commit).
    /// The outbox has a bound of its own ([`outbox_capacity`](Self::outbox_capacity)).
    /// Default: 1 GiB.
    pub fn sqlite_capacity(mut self, bytes: u64) -> Self {
        self.sqlite_capacity = bytes;
        self
    }

    /// The SQLite write-behind outbox's bound in bytes (the keys and values of its rows, dead
    /// letters included). A write-behind `set` or `delete` that would take it past the bound is
    /// refused with [`Error::OutboxFull`](crate::Error::OutboxFull): nothing of that write
    /// happens, and nothing already acknowledged is lost. The outbox's bytes also count
    /// against [`sqlite_capacity`](Self::sqlite_capacity) (entries are evicted to make room).
    /// Between 64 KiB and 64 TiB; only with the SQLite L2 (not with [`store`](Self::store)).
    /// Default: [`outbox_bound`](crate::tier::sqlite::outbox_bound)`(sqlite_capacity)`, the
    /// larger of L2's bound and 64 MiB.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// let cache = tiercache::TieredCache::builder()
    ///     .sqlite_capacity(256 * 1024 * 1024)
    ///     .outbox_capacity(16 * 1024 * 1024)
    ///     .build()?;
    /// # cache.close().await?; Ok(()) }
    /// ```
    pub fn outbox_capacity(mut self, bytes: u64) -> Self {
        self.outbox_capacity = Some(bytes);
        self
    }

    /// Runs `PRAGMA name=value` on every database connection after tiercache's own settings
    /// (for example `cache_size`, `mmap_size`, `max_page_count`). Names and values must be plain
    /// words (letters, digits, `_`, `-`). Default: none.
    pub fn sqlite_pragma(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.pragmas.push((name.to_owned(), value.to_string()));
        self
    }

    /// How long a database call waits for a lock another process holds before it fails (and
    /// counts against L2's breaker). Default: 5 s. At most
    /// [`MAX_BUSY_TIMEOUT`](crate::tier::sqlite::MAX_BUSY_TIMEOUT) (`i32::MAX` ms, about 24.8
    /// days, SQLite's limit); `build()` refuses a longer one.
    pub fn sqlite_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// SQLite's `synchronous` setting. Default: [`Synchronous::Normal`].
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// What to do with a database file that is not SQLite or is corrupt. Default:
    /// [`OnCorrupt::Fail`].
    pub fn on_corrupt(mut self, on_corrupt: OnCorrupt) -> Self {
        self.on_corrupt = on_corrupt;
        self
    }

    /// Read connections to the database. Default: 2.
    pub fn sqlite_readers(mut self, readers: usize) -> Self {
        self.sqlite_readers = readers;
        self
    }

    /// The source of truth (L3). Default: none ([`NoSource`]: every miss is "not found"),
    /// which suits [`Strategy::CacheAside`] and [`Strategy::ReadThrough`] only.
    pub fn source(mut self, source: impl Source) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The source of truth, already shared.
    pub fn source_arc(mut self, source: Arc<dyn Source>) -> Self {
        self.source = Some(source);
        self
    }

    /// The strategy. Default: [`Strategy::ReadThrough`].
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// How long a value stays fresh after the source gave or confirmed it. Default: 5 minutes.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long after its fresh deadline a value may still be served stale when the source
    /// cannot answer. Default: 24 hours.
    pub fn stale_ttl(mut self, stale_ttl: Duration) -> Self {
        self.stale_ttl = stale_ttl;
        self
    }

    /// The last backstop against a missed invalidation: a copy in L1 for this long (on the
    /// cache's [`clock`](Self::clock)) is not served from L1; the read re-reads L2, as after a
    /// miss, and puts what it finds back. `None`: no maximum (served from L1 while fresh).
    /// Default: [`DEFAULT_MAX_L1_AGE`](crate::DEFAULT_MAX_L1_AGE) (60 s) on an L2 that
    /// publishes other instances' writes ([`EntryStore::invalidations`](crate::tier::EntryStore::invalidations):
    /// PostgreSQL), where a lost message would otherwise leave a copy older than a write in L1
    /// until its fresh deadline; off on one that does not (SQLite; set one to bound how long
    /// another process's write goes unseen). Costs one L2 read per key per period.
    /// [`Error::Config`] at [`build`](Self::build) for zero or more than ten years.
    pub fn max_l1_age(mut self, max_age: impl Into<Option<Duration>>) -> Self {
        self.max_l1_age = Some(max_age.into());
        self
    }

    /// How long "not found" is remembered. Default: 60 seconds. Zero: not remembered.
    pub fn negative_ttl(mut self, negative_ttl: Duration) -> Self {
        self.negative_ttl = negative_ttl;
        self
    }

    /// The hard deadline of one source call; past it the call counts as a timeout. Default: 15 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// When a stale copy exists and the source has not answered within this, the stale copy is
    /// served at once and the fetch finishes in the background. Default: none (wait up to the
    /// hard timeout).
    pub fn soft_timeout(mut self, soft_timeout: Duration) -> Self {
        self.soft_timeout = Some(soft_timeout);
        self
    }

    /// Source calls in flight at once for one `mget` or `warm`. Default: 8.
    pub fn fetch_concurrency(mut self, n: usize) -> Self {
        self.fetch_concurrency = n;
        self
    }

    /// Batches the cold misses of concurrent `get`s (and `lookup`s): the first opens a window
    /// of `window`; the cold misses of other keys arriving meanwhile join it, and they go to
    /// the source together when it closes, or at once when they fill a batch
    /// ([`Source::max_batch`](crate::source::Source::max_batch)), through
    /// [`Source::fetch_many`](crate::source::Source::fetch_many). `GitHubSource` with a token
    /// sends such a batch as one GraphQL request. Default: off (a lone `get` would wait out the
    /// window). Only keys with nothing to revalidate with are batched; a source that does not
    /// batch (`max_batch` 1) is asked key by key as without it. At most one second.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = tiercache::TieredCache::builder().get_batch_window(Duration::from_millis(2));
    /// ```
    pub fn get_batch_window(mut self, window: Duration) -> Self {
        self.get_batch_window = Some(window);
        self
    }

    /// Refreshes hot entries in the background before they expire: a read that finds a fresh
    /// entry whose age is past `fraction` of its TTL (0.8: the last 20%) starts one background
    /// request for the key, and is answered from the entry at once; it never waits. Only
    /// entries the source gave with a validator (an ETag) are refreshed, always with a
    /// conditional request (a 304 renews the deadlines without moving bytes); a value written
    /// with `set`, loaded by `get_with`, or from a source that sends no validator stands until
    /// it expires. The refresh fills like a read's load, so a write that races it is never
    /// overwritten. One per key: nothing starts while a load of the key is under way
    /// (single-flight), and at most [`fetch_concurrency`](Self::fetch_concurrency) refreshes
    /// run at once (a read that finds them all busy starts none; a later read in the window
    /// will). It is background work: not sent while the budget is at or below the
    /// [`budget_reserve`](Self::budget_reserve). Reads of `get`, `lookup` and L2 hits trigger
    /// it; `mget` does not.
    ///
    /// Default: off, because it spends requests (budget) on keys that might not be read again
    /// before they expire; turn it on for hot keys whose expiry would otherwise make readers
    /// wait for the source. `fraction` must be above 0 and below 1; `build()` refuses
    /// anything else, and refresh-ahead under [`Strategy::CacheAside`] (nothing to refresh
    /// from).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use std::time::Duration;
    /// use tiercache::TieredCache;
    ///
    /// // Entries live 5 minutes; one read in the last minute refreshes them in the background,
    /// // unless the source's budget is down to its last 100 requests.
    /// let cache = TieredCache::builder()
    ///     .ttl(Duration::from_secs(300))
    ///     .refresh_ahead(0.8)
    ///     .budget_reserve(100)
    ///     .build()?;
    /// # drop(cache);
    /// # Ok(()) }
    /// ```
    pub fn refresh_ahead(mut self, fraction: f64) -> Self {
        self.refresh_ahead = Some(fraction);
        self
    }

    /// The rate-limit budget kept for readers: background work (refresh-ahead, then
    /// [`warm`](TieredCache::warm)) is not sent while the source reports (through
    /// [`Source::rate_limit`]) `remaining <= reserve` before its reset; the stale windows
    /// carry the load instead. Readers (a miss, an expired entry's revalidation) still go,
    /// until the budget is spent (then the breaker holds every call until the reset). A source
    /// that reports no budget never holds background work back.
    ///
    /// Default: 10% of the limit the source reports (rounded up: 500 of GitHub's 5000 an
    /// hour).
    pub fn budget_reserve(mut self, requests: u64) -> Self {
        self.budget_reserve = Some(requests);
        self
    }

    /// Never contact the source; serve whatever L1 and L2 hold, stale included. Default: off.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Record stats. Default: on.
    pub fn stats(mut self, enabled: bool) -> Self {
        self.stats = enabled;
        self
    }

    /// The clock deadlines are read from. Default: [`SystemClock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Write-behind: the first retry delay after a failed delivery, doubled (with jitter) on each
    /// further failure up to [`retry_max`](Self::retry_max). Default: 1 s.
    pub fn retry_base(mut self, delay: Duration) -> Self {
        self.retry_base = delay;
        self
    }

    /// Write-behind: the longest retry delay. Default: 5 minutes.
    pub fn retry_max(mut self, delay: Duration) -> Self {
        self.retry_max = delay;
        self
    }

    /// How long [`TieredCache::close`] tries to deliver the outbox before stopping. Default: 10 s.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The policy of the source's (L3's) circuit breaker. Default: [`BreakerPolicy::default`]
    /// (opens after 5 consecutive failures or a 50% failure rate over 60 s; probes after 5 s,
    /// backing off to 5 minutes).
    pub fn source_breaker(mut self, policy: BreakerPolicy) -> Self {
        self.source_breaker = policy;
        self
    }

    /// The policy of L2's circuit breaker. Default: opens after 3 consecutive failures; probes
    /// after 5 s, backing off to 60 s.
    pub fn storage_breaker(mut self, policy: BreakerPolicy) -> Self {
        self.storage_breaker = policy;
        self
    }

    /// Keep the source's breaker state in the database file too, so processes sharing the file
    /// share one breaker (a source known to be down or out of budget is not called by the next
    /// process either). Only for file databases. Default: on.
    pub fn persist_breaker(mut self, persist: bool) -> Self {
        self.persist_breaker = persist;
        self
    }

    /// Where write-behind keeps pending writes. Default: [`OutboxMode::Durable`] (in the L2
    /// database; an acknowledged write survives a crash). [`OutboxMode::Memory`] trades that
    /// safety for a `set` that costs about a moka insert.
    pub fn outbox(mut self, mode: OutboxMode) -> Self {
        self.outbox_mode = mode;
        self
    }

    /// Whether write-behind delivers in the background (default `true`). With `false`, writes
    /// wait in the outbox until [`flush`](crate::TieredCache::flush) or
    /// [`close`](crate::TieredCache::close): for batch jobs that deliver at the end, and for
    /// tests that need every delivery at a known point. Reads are unaffected: a pending write
    /// reads back as itself.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use async_trait::async_trait;
    /// use tiercache::source::{Fetched, Source, SourceError};
    /// use tiercache::{Strategy, TieredCache};
    ///
    /// #[derive(Debug)]
    /// struct Sink;
    ///
    /// #[async_trait]
    /// impl Source for Sink {
    ///     async fn fetch(&self, _: &str, _: Option<&str>) -> Result<Fetched, SourceError> {
    ///         Ok(Fetched::NotFound)
    ///     }
    ///     async fn put(&self, _: &str, _: &[u8]) -> Result<(), SourceError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let cache = TieredCache::builder()
    ///     .source(Sink)
    ///     .strategy(Strategy::WriteBehind)
    ///     .background_flush(false)
    ///     .build()?;
    /// cache.set("k", "v").await?;
    /// assert_eq!(cache.stats().await.outbox.depth, 1); // nothing ran in the background
    /// assert_eq!(cache.get("k").await?.unwrap(), "v"); // a pending write reads back as itself
    /// assert_eq!(cache.flush().await?.delivered, 1);
    /// # Ok(()) }
    /// ```
    pub fn background_flush(mut self, on: bool) -> Self {
        self.background_flush = on;
        self
    }

    /// Checks the configuration, opens L2 and starts the background tasks.
    ///
    /// Must be called within a Tokio runtime when the strategy is
    /// [`WriteBehind`](Strategy::WriteBehind) (the outbox flusher is a task).
    ///
    /// # Errors
    /// [`Error::Config`] for a configuration that cannot work (zero or absurd sizes, a path that
    /// is a directory or in a directory that does not exist, a stale window or timeout that makes
    /// no sense, a write strategy without a source), or a database of a newer tiercache;
    /// [`Error::Storage`] when the database file cannot be opened or set up (the SQLite error is
    /// its [`source`](std::error::Error::source)); [`Error::ForeignDatabase`] for a SQLite
    /// database of another application (left untouched); [`Error::CorruptDatabase`] for a file
    /// that is not SQLite or is damaged (left untouched, unless [`OnCorrupt::MoveAside`]).
    pub fn build(self) -> Result<TieredCache> {
        self.validate()?;
        let sqlite = SqliteOptions {
            location: self.sqlite_location.clone(),
            max_bytes: self.sqlite_capacity,
            outbox_max_bytes: self
                .outbox_capacity
                .unwrap_or_else(|| crate::tier::sqlite::outbox_bound(self.sqlite_capacity)),
            synchronous: self.synchronous,
            on_corrupt: self.on_corrupt,
            readers: self.sqlite_readers,
            busy_timeout: self.busy_timeout,
            pragmas: self.pragmas.clone(),
        };
        TieredCache::from_builder(self, sqlite)
    }

    pub(crate) fn take_source(&mut self) -> Arc<dyn Source> {
        self.source.take().unwrap_or_else(|| Arc::new(NoSource))
    }
}
