//! L2 on a PostgreSQL server, shared by a fleet of caches (feature `postgres`).
//!
//! [`PostgresStore`] implements the storage traits of [`tier::store`](crate::tier::store)
//! (entries, outbox, shared state) over a pool of `tokio-postgres` connections
//! (`deadpool-postgres`); give it to
//! [`TieredCacheBuilder::store`](crate::TieredCacheBuilder::store). Every cache pointed at the
//! same schema of the same database shares one L2: entries, pending write-behind writes, dead
//! letters and the source's persisted breaker.
//!
//! ```no_run
//! # async fn f() -> tiercache::Result<()> {
//! use tiercache::tier::postgres::PostgresStore;
//! use tiercache::TieredCache;
//!
//! let store = PostgresStore::builder("postgres://app@db.internal/cache")
//!     .schema("components")
//!     .connect()
//!     .await?;
//! let cache = TieredCache::builder().store(store).build()?;
//! # Ok(()) }
//! ```
//!
//! # The schema
//! Everything lives in one PostgreSQL schema (default [`DEFAULT_SCHEMA`], set with
//! [`PostgresStoreBuilder::schema`]), so several caches share one database, each in its own
//! schema. [`connect`](PostgresStoreBuilder::connect) creates it, or migrates it, under an
//! advisory lock (a fleet starting at once migrates once). A schema made beforehand by an
//! administrator is used as it is, so the store's role needs no `CREATE` on the database:
//!
//! | table | what | logged |
//! |---|---|---|
//! | `entries` | one row per key: value (`bytea`, NULL for "not found"), validator, the three deadlines, size, last access | yes, unless [`entries_unlogged`](PostgresStoreBuilder::entries_unlogged) |
//! | `outbox` | write-behind writes and dead letters, `id` from an identity column, the claim (`claimed_by`, `claim_expires`) of the instance delivering them; indexed by `(key, id)` and, for dead letters, by key | always |
//! | `meta` | named strings shared by the fleet (the source's breaker and its spent budget) | always |
//! | `schema_version` | one row: the schema's version ([`SCHEMA_VERSION`]) | always |
//! | `invalidations` | the invalidation log: one row per key a write changed (`seq` from an identity column, the writing transaction's id `xid`, `at`, `origin`, `key`); indexed by `xid` and `at` | always |
//! | `invalidations_pruned` | one row: the highest `xid` pruned from the log so far | always |
//! | `fill_leases` | one row per key being loaded from the source: holder (`origin`), fencing `token` (from the sequence `fill_lease_tokens`), `expires_at` | always |
//!
//! A schema whose version row is newer than this tiercache's, or that holds tables but no
//! version row (another application's), is refused before anything is written to it
//! ([`Error::IncompatibleSchema`]).
//!
//! ## What is UNLOGGED, and why
//! By default nothing is. The invalidation log never is: a lost log would have to be detected
//! (its sequence restarts after a crash) to clear every L1; a logged one needs no such case,
//! and only writes (not fills) add to it. An UNLOGGED table writes no WAL (fills, the bulk of L2 writes, get
//! cheaper, large values most of all), but PostgreSQL empties it after a server crash and
//! never copies it to a replica. The outbox and the shared state can never be UNLOGGED: a
//! lost outbox row is a lost acknowledged write (I5), a lost breaker row lets a fleet hammer a
//! failing source. The entries *may* be ([`PostgresStoreBuilder::entries_unlogged`]): a fill
//! lost in a crash is fetched again, a write-behind write still pending reads from its outbox
//! row, a write-through write is at the source. What is lost is a
//! [`ReadThrough`](crate::Strategy::ReadThrough) or [`CacheAside`](crate::Strategy::CacheAside)
//! `set`, which lives only in the cache: after a server crash the source's value is read again
//! (I1 holds across process crashes, not across a crash of the server). Hence off by default.
//! The choice is made when the schema is created; an existing schema keeps it
//! ([`PostgresStore::entries_unlogged`] reports it).
//!
//! # How each step maps to SQL
//! All statements are prepared once per connection (`prepare_cached`) with bound parameters;
//! only the schema name (validated: lowercase letters, digits, `_`) is part of the SQL text.
//! Reads are single statements (one snapshot each). Writes of a key run in one transaction
//! that first takes a transaction-scoped advisory lock on the key
//! (`pg_advisory_xact_lock(hashtextextended('<schema>/e/<key>', 0))`): that lock orders every
//! write of a key across the fleet, so a fill's [`FillGuard`](crate::tier::FillGuard) is
//! checked under the lock, in the same step as its write, as the contract asks. Where nothing
//! depends on an answer (`put`, `remove`, `remove_settled`, `enqueue`), the statements are sent
//! right behind the lock in one round trip (pipelined; the server runs them in order), so such a
//! write costs three round trips: `BEGIN`, the batch, `COMMIT`.
//!
//! | method | SQL |
//! |---|---|
//! | `get` | `SELECT … FROM entries WHERE key = $1` |
//! | `get_many` | one statement: `… entries WHERE key = ANY($1) UNION ALL (SELECT DISTINCT ON (key) … FROM outbox WHERE key = ANY($1) AND NOT dead ORDER BY key, id DESC)` |
//! | `put` | lock; `INSERT … ON CONFLICT (key) DO UPDATE`; publish |
//! | `put_fill`, `renew_fill` | lock; guard checked (and `SELECT stored_at` when it observed a row or none); upsert / `UPDATE` (nothing published) |
//! | `remove` | lock; `DELETE`; publish |
//! | `remove_settled` | lock; `DELETE … WHERE NOT EXISTS (a pending outbox row of the key with a higher id)`; publish |
//! | `enqueue` | lock; entry upsert or `DELETE`; dead letters of the key superseded; `INSERT INTO outbox … RETURNING id`; publish |
//! | `outbox_pending` | one transaction: the oldest keys with pending rows and no other instance's live claim (`GROUP BY key HAVING …`); their locks tried (`pg_try_advisory_xact_lock`, never waited for); `UPDATE … SET claimed_by, claim_expires … RETURNING` every pending row of the locked keys, unless another instance's claim appeared |
//! | `dead_letters` | `SELECT … ORDER BY id` |
//! | `outbox_complete` | `DELETE … WHERE id = ANY($1) AND NOT dead` |
//! | `outbox_failed` | lock every key of the rows (in hash order: no deadlock between two of them); `UPDATE` (the claim released); when dead, supersede and remove entries, as the contract says, and publish the keys |
//! | `resolve_dead_letter` | `SELECT … FOR UPDATE`, then `UPDATE` (a retry: the entry removed, published) or `DELETE` |
//! | `update_meta` | lock the name; `SELECT`; upsert or `DELETE` |
//! | `fill_lease` | `INSERT … ON CONFLICT (key) DO UPDATE … WHERE expires_at <= clock_timestamp() RETURNING token` (one statement) |
//! | `release_fill_lease` | `DELETE … WHERE key = $1 AND token = $2` |
//! | `summary` | one statement of aggregates over both tables |
//! | `merge` | per 500 entries, one transaction: lock the keys; the `get_many` statement; upsert the entries that are newer and have no pending write; publish them |
//! | `snapshot` | one `REPEATABLE READ, READ ONLY` transaction: `DECLARE … CURSOR FOR SELECT … FROM entries WHERE starts_with(key, $1) AND NOT EXISTS (a pending outbox row of the key) ORDER BY key COLLATE "C"`, then `FETCH 500` until done (an export; see below) |
//! | *publish* | one statement in the write's transaction, pipelined with it: `WITH i AS (INSERT INTO invalidations … RETURNING seq) SELECT pg_notify(channel, payload) FROM unnest($payloads)` |
//! | `invalidations` | the store's listener (below) |
//!
//! Outbox ids come from an identity column (a sequence): a row gets a higher id than every
//! row of its key committed before it, because writes of one key are serialized by the key's
//! lock and the id is drawn under it. Across keys, two transactions may commit out of id order;
//! nothing in the cache depends on an order across keys (delivery is per key).
//!
//! # Faults
//! An unreachable server at [`connect`](PostgresStoreBuilder::connect) is an
//! [`Error::Storage`] that names the server as
//! `postgres://user@host:port/db`: the URL is never shown as given, so a password in it never
//! reaches an error, a log or a `Debug` output. While running, a lost connection, a restart or
//! a killed backend makes the calls fail with [`Error::Storage`]; the
//! cache's L2 breakers open, L1 and the source carry on, and the pool opens new connections
//! when the server is back.
//!
//! # A fleet: cross-instance L1 invalidation
//! Every cache keeps an L1 of its own; a write by one instance reaches the others' L1 so:
//! * **Published with the write.** Every write that changes what a key reads as (`put`,
//!   `remove`, `remove_settled`, `enqueue`, the dead-lettering of `outbox_failed`, the retry
//!   of `resolve_dead_letter`, the entries `merge` writes) adds a row per key to `invalidations` and calls
//!   `pg_notify('tc.<schema>', payload)` in its own transaction: both exist if and only if the
//!   write commits, and the `NOTIFY` is delivered at commit. Fills, misses and 304 renewals
//!   (`put_fill`, `renew_fill`) publish nothing, so reads cause no broadcast. A delivered
//!   write-behind put publishes nothing either: its entry was written (and published) when it
//!   was enqueued; a delivered delete's `remove_settled` does.
//! * **Payloads** carry the store's [`origin`](PostgresStore::origin) and the keys, one per
//!   line, split into as many payloads as needed to stay under PostgreSQL's 8,000-byte limit;
//!   a key that fits in none (or holds a line break, which the cache's keys never do) is sent
//!   as the range of log rows (`seq`) to read instead.
//! * **One listener per store**: a dedicated connection (not from the pool; its
//!   `application_name` is [`listener_application_name`](PostgresStore::listener_application_name)),
//!   started by the first cache built on the store ([`EntryStore::invalidations`](crate::tier::EntryStore::invalidations)) and ended
//!   at the next heartbeat after the last such cache is closed or dropped. It skips its own
//!   origin's payloads (unless several caches share the store: then one's write must reach
//!   the others). Each cache applies what it gets by bumping the key's write fence, then
//!   dropping the key from its L1 (not from L2, which the writer changed): a fill or a
//!   promotion racing the write is refused by its fence (in L1) and its
//!   [`FillGuard`](crate::tier::FillGuard) (in L2), so an older value never comes back.
//! * **Reconnects** with jittered backoff (50 ms doubling to 5 s), `LISTEN` again, then catch
//!   up from the log: every row written by a transaction at or above the listener's
//!   *horizon*, a transaction id below which every write's `NOTIFY` had reached it
//!   (sequence numbers alone would miss a write that drew a lower number and committed
//!   later). If the log was pruned at or above the horizon, the cache's whole L1 is
//!   cleared. [`listening`](PostgresStore::listening) and
//!   [`listener_connections`](PostgresStore::listener_connections) report its state.
//! * **A heartbeat** ([`heartbeat`](PostgresStoreBuilder::heartbeat), 5 s) checks the
//!   connection with a query that must answer within one interval (a silent connection is
//!   dropped and made again), moves the horizon, and prunes log rows older than
//!   [`invalidation_retention`](PostgresStoreBuilder::invalidation_retention) (1 hour),
//!   by one instance at a time (`pg_try_advisory_xact_lock`).
//!
//! * **A maximum L1 age** is the last backstop: on a store that publishes, a cache serves an
//!   L1 copy for at most [`DEFAULT_MAX_L1_AGE`](crate::DEFAULT_MAX_L1_AGE) (60 s) after it put
//!   it there, then re-reads L2
//!   ([`max_l1_age`](crate::TieredCacheBuilder::max_l1_age) sets another, or none). A message
//!   lost without the listener noticing (or a bug) leaves a copy older than a write in an L1
//!   for at most that long, not until its fresh deadline.
//!
//! What it guarantees: once a write has committed, and the other instances' listeners are
//! connected, their L1s drop the key as soon as the `NOTIFY` arrives (a read in between may
//! still be served from L1: the invalidation is asynchronous, not part of the write's
//! acknowledgement). While a listener is disconnected its cache's L1 may serve copies older
//! than a write until it reconnects and catches up (at most the maximum L1 age); L2 reads are never stale (they read the
//! shared tables).
//!
//! # An outbox drained by the fleet
//! Every instance may deliver (background flush on all of them is safe). A delivery round's
//! [`outbox_pending`](crate::tier::OutboxStore::outbox_pending) claims whole keys for this
//! store ([`origin`](PostgresStore::origin)) for a lease
//! ([`outbox_lease`](PostgresStoreBuilder::outbox_lease), 60 s) in one short transaction, and
//! returns only the rows it claimed; the source is called after that transaction committed,
//! never inside one. A key is claimed only when no row of it is under another instance's live
//! claim, and under its advisory lock (tried, so two claimers of one key never both win and
//! never wait on each other; an enqueue of the key waits for the claim, which then covers or
//! precedes its row): a newer row of a key is never delivered while an older one is another
//! instance's to deliver (per-key order, I5). A round claims its own rows again, renewing the
//! lease; delivered rows are deleted, a failed attempt releases its rows' claim. When an
//! instance dies mid-delivery, its claims run out after the lease and another instance
//! delivers the rows (a write the dead instance had sent but not yet completed is sent again:
//! delivery is idempotent, as after a crash on SQLite).
//!
//! # One breaker and one budget for the fleet
//! The source's breaker ([`BreakerState`](crate::breaker::BreakerState) as JSON, with the
//! last error) is one `meta` row, `breaker.l3`, changed only by
//! [`update_meta`](crate::tier::StateStore::update_meta): the name's advisory lock, `SELECT`,
//! upsert, in one transaction, so every change is a compare-and-set on the row as it is. A
//! cache persists it when [`persist_breaker`](crate::TieredCacheBuilder::persist_breaker) is
//! on (the default). The source's budget lives in the same row as far as it stops calls: a
//! rate-limited answer (429, or 403 with a reset) and an answer that leaves the budget at 0
//! ([`Source::rate_limit`](crate::source::Source::rate_limit)) hold the row open until the
//! reset, so an instance that never called knows the budget is spent.
//! * **How fast the fleet stops.** While its own copy is clean (closed, nothing failed) an
//!   instance re-reads the row at most once per second of its clock (one primary-key
//!   `SELECT`, not one per call) and adopts it; from the first read after another instance
//!   tripped it, it sends nothing until the reset. So a fleet stops within 1 s of the
//!   trip; in that second, an instance that calls gets the limit from the source itself.
//!   Once anything failed, or the row is open, every permit is taken in the row itself.
//! * **How many probes.** After the open window, the probe's permit is a lease in the row
//!   (taken under its lock): one instance wins it (`half_open_probes`, default 1, for the
//!   whole fleet), the others stay open until the winner records the outcome, or the
//!   lease runs out (the policy's `probe_timeout`, 30 s) because the winner died.
//!
//! # Cross-instance single-flight
//! Within a process, concurrent loads of a key share one (single-flight). Across the fleet,
//! a load first takes the key's lease in `fill_leases` for the source timeout plus 1 s
//! ([`EntryStore::fill_lease`](crate::tier::EntryStore::fill_lease)), reads L2 once more (a
//! holder may have just filled it), calls the source, fills L2 and L1, and releases the lease
//! by its token. An instance that finds the lease held does not call: it polls L2 (2 ms,
//! doubling to 50 ms, for at most one lease duration) and serves the holder's fill as soon
//! as it is committed; the lease gone with no fill (the holder failed, or died and its lease
//! ran out), it takes the lease and loads itself.
//!
//! Measured (loopback, debug build): 200 cold reads over 4 instances make 1 source call; the
//! last waiter answered 10 to 55 ms after the source over 10 runs (the poll interval, 50 ms
//! once a waiter has waited a while, dominates). A cold miss costs three more statements
//! (take, re-read, release); take and release together: p50 0.5 ms, p99 0.75 ms (`cargo test
//! --features postgres --test postgres_fleet -- --ignored --nocapture fill_lease_cost`).
//!
//! The **fencing token** (from a sequence: a lease taken over gets a higher one) fences the
//! lease: only its holder releases it, a late holder cannot free its successor's. The *fill*
//! is fenced by its [`FillGuard`](crate::tier::FillGuard): it is written only over the row the
//! load observed (checked under the key's lock), so a late holder's fill never overwrites a
//! newer holder's. If the late holder commits first, the newer holder's fill is refused in
//! turn and the late holder's answer stays (both are the source's answers; no acknowledged
//! write is involved, so I1 holds).
//!
//! Not leased: keys fetched in a batch (`mget`'s cold keys) and `get_with` loaders. A negative
//! answer with `negative_ttl` 0 is not stored, so waiters load it again one at a time; so do
//! waiters after a holder's failed call (the shared breaker then bounds the calls). Leases of
//! dead holders are deleted by the heartbeat's pruning.
//!
//! # Offline bundles
//! [`TieredCache::export`](crate::TieredCache::export) and
//! [`TieredCache::import`](crate::TieredCache::import) work on a PostgreSQL L2 as on SQLite
//! (the bundle file is the same; see [`crate::bundle`]), so a bundle exported from a fleet's
//! shared L2 is imported into a runner's SQLite cache, or the other way round.
//! * **Export** ([`EntryStore::snapshot`](crate::tier::EntryStore::snapshot)): one
//!   `REPEATABLE READ, READ ONLY` transaction on a pooled connection, so every row comes from
//!   one moment whatever the fleet writes meanwhile; a cursor ordered by key in byte order
//!   (`COLLATE "C"`: the order of SQLite's keys), fetched 500 rows at a time (an export of any
//!   size holds one page in memory). The prefix is matched with `starts_with`, so `%` and `_`
//!   are plain characters. Left out as on SQLite: keys with a pending write-behind write (in
//!   the query); "not found" markers and expired entries (counted by the export).
//! * **Import** ([`EntryStore::merge`](crate::tier::EntryStore::merge)): per 500 entries one
//!   transaction under the keys' locks; the entries written are published, so every other
//!   instance drops its L1 copy.
//!
//! # Limits today
//! * **No size bound.** Entries past their stale deadline stay until overwritten or removed;
//!   [`touch`](crate::tier::EntryStore::touch) records nothing (there is no eviction to feed).
//! * **The running budget** (remaining calls) is each instance's own; only a spent one is
//!   shared (above).

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::error::{Error, Result};

mod lease;
mod listen;
mod merge;
mod names;
mod notify;
mod rows;
mod schema;
mod snapshot;
mod store;

use names::{redacted, server_name, validate_schema_name};
use schema::Sql;

/// The version of the schema this tiercache creates and reads, kept in the schema's
/// `schema_version` table. History: 1, the first; 2 adds the invalidation log
/// (`invalidations`, `invalidations_pruned`); 3 adds the fill leases (`fill_leases`,
/// `fill_lease_tokens`). A schema of an older version is migrated on open.
pub const SCHEMA_VERSION: i64 = 3;

/// The PostgreSQL schema used when none is set: `tiercache`.
pub const DEFAULT_SCHEMA: &str = "tiercache";

const DEFAULT_POOL_SIZE: usize = 8;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);
const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// Settings for a [`PostgresStore`]; made by [`PostgresStore::builder`].
#[must_use = "a builder does nothing until `connect` is called"]
pub struct PostgresStoreBuilder {
    url: String,
    schema: String,
    pool_size: usize,
    connect_timeout: Duration,
    entries_unlogged: bool,
    heartbeat: Duration,
    retention: Duration,
    lease: Duration,
}

impl std::fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStoreBuilder")
            .field("server", &redacted(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("entries_unlogged", &self.entries_unlogged)
            .field("heartbeat", &self.heartbeat)
            .field("invalidation_retention", &self.retention)
            .field("outbox_lease", &self.lease)
            .finish()
    }
}

impl PostgresStoreBuilder {
    /// How often the invalidation listener checks its connection (a query that must answer
    /// within this long, or the connection is given up and made again) and prunes the log
    /// (by one instance of the fleet at a time). Also how long a `NOTIFY` is given to arrive
    /// before a reconnect no longer replays it from the log (see the [module docs](self)).
    /// Between 10 ms and 1 hour. Default: 5 s.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// How long this instance's claim on write-behind rows lasts (renewed each delivery round
    /// that reads them): past it, an instance that died mid-delivery has its rows delivered
    /// by the others. Longer than a delivery round takes (a source call with its timeout and
    /// retries of one round); a claim that runs out mid-delivery may see a write sent twice.
    /// At least 100 ms. Default: 60 s.
    pub fn outbox_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long rows of the invalidation log are kept: a listener disconnected for longer
    /// than this clears its cache's L1 when it reconnects, instead of replaying the log. At
    /// least 1 s. Default: 1 hour.
    pub fn invalidation_retention(mut self, keep: Duration) -> Self {
        self.retention = keep;
        self
    }

    /// The PostgreSQL schema holding the tables; caches sharing a database but not an L2 use
    /// different ones. Lowercase ASCII letters, digits and `_`, starting with a letter or `_`,
    /// at most 63 bytes, not starting with `pg_`. Default: [`DEFAULT_SCHEMA`].
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.schema = name.into();
        self
    }

    /// Connections kept open at most (1 to 1024). Default: 8.
    pub fn pool_size(mut self, connections: usize) -> Self {
        self.pool_size = connections;
        self
    }

    /// How long opening a connection (and waiting for a free one) may take before the call
    /// fails with [`Error::Storage`]; a `connect_timeout` in the URL wins for the former.
    /// Default: 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Creates the `entries` table UNLOGGED (see the [module docs](self) for what that trades
    /// away). Applies when the schema is created; an existing schema keeps what it has.
    /// Default: `false`.
    pub fn entries_unlogged(mut self, unlogged: bool) -> Self {
        self.entries_unlogged = unlogged;
        self
    }

    /// Connects, then creates or migrates the schema.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that cannot be parsed (the URL is not quoted) or a bad
    /// setting; [`Error::Storage`] when the server cannot be reached or the schema cannot be
    /// set up (the server is named without its password); [`Error::IncompatibleSchema`] for
    /// a schema of a newer tiercache or of another application (left untouched).
    pub async fn connect(self) -> Result<PostgresStore> {
        validate_schema_name(&self.schema)?;
        if self.pool_size == 0 || self.pool_size > 1024 {
            return Err(Error::Config(format!(
                "pool_size is {}; it must be between 1 and 1024",
                self.pool_size
            )));
        }
        if self.heartbeat < Duration::from_millis(10) || self.heartbeat > Duration::from_secs(3600)
        {
            return Err(Error::Config(format!(
                "heartbeat is {:?}; it must be between 10 ms and 1 hour",
                self.heartbeat
            )));
        }
        if self.lease < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "outbox_lease is {:?}; it must be at least 100 ms",
                self.lease
            )));
        }
        if self.retention < Duration::from_secs(1) {
            return Err(Error::Config(format!(
                "invalidation_retention is {:?}; it must be at least 1 s",
                self.retention
            )));
        }
        let mut config = tokio_postgres::Config::from_str(&self.url).map_err(|e| {
            Error::Config(format!(
                "the PostgreSQL URL cannot be parsed (not shown: it may hold a password): {e}"
            ))
        })?;
        let server = server_name(&config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("tiercache");
        }
        let fleet =
            listen::Fleet::new(config.clone(), &self.schema, self.heartbeat, self.retention);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // LIFO: a sequential caller keeps reusing the connection it just returned (a warm
        // backend) instead of cycling through every idle one (`benches/fleet.rs`).
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(self.connect_timeout))
            .wait_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| Error::Config(format!("the PostgreSQL pool cannot be built: {e}")))?;
        let location = format!("\"{}\" at {server}", self.schema);
        let mut client = pool.get().await.map_err(|e| Error::Storage {
            message: format!(
                "could not connect to PostgreSQL at {server}: {}",
                crate::error::chain_text(&e)
            ),
            source: Some(std::sync::Arc::new(e)),
        })?;
        let entries_unlogged =
            schema::open(&mut client, &self.schema, &location, self.entries_unlogged).await?;
        // The listener's first horizon: no cache on this store has anything in L1 yet, so
        // every write it must hear of comes from a transaction at or above this one.
        let horizon: i64 = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| schema::storage(&format!("read the server's horizon at {server}"), e))?;
        drop(client);
        fleet.set_horizon(horizon);
        Ok(PostgresStore {
            pool,
            sql: std::sync::Arc::new(Sql::new(&self.schema)),
            schema: self.schema,
            server,
            entries_unlogged,
            fleet: std::sync::Arc::new(fleet),
            lease: self.lease,
        })
    }
}

/// L2 on PostgreSQL: the storage traits over a connection pool, in one schema. See the
/// [module docs](self).
///
/// Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    sql: std::sync::Arc<Sql>,
    schema: String,
    /// `postgres://user@host:port/db`: never the password.
    server: String,
    entries_unlogged: bool,
    /// Publishing and listening (see `listen`).
    fleet: std::sync::Arc<listen::Fleet>,
    /// How long a claim on outbox rows lasts.
    lease: Duration,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresStore")
            .field("server", &self.server)
            .field("schema", &self.schema)
            .field("connections", &status.size)
            .field("entries_unlogged", &self.entries_unlogged)
            .field("fleet", &self.fleet)
            .finish()
    }
}

impl PostgresStore {
    /// Settings for a store on the server at `url` (`postgres://user:password@host:port/db`,
    /// or the `key=value` form); see [`PostgresStoreBuilder`].
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            url: url.into(),
            schema: DEFAULT_SCHEMA.to_owned(),
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            entries_unlogged: false,
            heartbeat: DEFAULT_HEARTBEAT,
            retention: DEFAULT_RETENTION,
            lease: DEFAULT_LEASE,
        }
    }

    /// A store with the default settings: `PostgresStore::builder(url).connect()`.
    ///
    /// # Errors
    /// As [`PostgresStoreBuilder::connect`].
    pub async fn connect(url: impl Into<String>) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The server, as `postgres://user@host:port/db` (no password).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Whether the `entries` table is UNLOGGED (as found in the schema, whatever the builder
    /// asked for an existing one).
    pub fn entries_unlogged(&self) -> bool {
        self.entries_unlogged
    }

    /// This store's id among the instances sharing the schema (32 hex digits): it tags the
    /// store's invalidation log rows and `NOTIFY` payloads, so its listener skips its own.
    pub fn origin(&self) -> &str {
        &self.fleet.origin
    }

    /// The `NOTIFY` channel of the schema: `tc.<schema>` (a longer schema name is shortened
    /// with a hash).
    pub fn channel(&self) -> &str {
        &self.fleet.channel
    }

    /// The `application_name` of the listener's connection (`tiercache-listen-<origin>`), to
    /// find it in `pg_stat_activity`. The pool's connections are `tiercache`, unless the URL
    /// names one.
    pub fn listener_application_name(&self) -> String {
        listen::listener_name(&self.fleet.origin)
    }

    /// Whether the invalidation listener is connected and caught up (`false` before a cache
    /// subscribed, while it reconnects, and after the last cache on the store is gone).
    pub fn listening(&self) -> bool {
        self.fleet.listening()
    }

    /// How many times the listener connected and caught up so far (1 after the first
    /// connection; each reconnect adds one).
    pub fn listener_connections(&self) -> u64 {
        self.fleet.connections()
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
