//! A fast, persistent, failure-tolerant cache in front of a slow, rate-limited source of truth.
//!
//! ```text
//!              get / mget / lookup                       set / delete
//!                     │                                       │
//!           ┌─────────▼───────────────────────────────────────▼─────────┐
//!           │ TieredCache: strategy, single-flight, freshness, stats    │
//!           └──┬──────────────────┬────────────────────────┬────────────┘
//!    L1        │ moka (memory)    │ L2 SQLite (rusqlite)   │ L3 Source (GitHub via octocrab)
//!    ns–µs     │ bounded by bytes │ WAL, persistent,       │ behind a circuit breaker,
//!              │                  │ bounded, outbox table  │ ETag revalidation, rate-limit aware
//! ```
//!
//! # The contract
//! What the cache serves is held to five invariants, by every strategy, every command (the CLI's
//! included), across restarts, crashes and outages, and between processes sharing one database:
//!
//! * **I1** A read never returns a value older than the newest write acknowledged (a `set` or
//!   `delete` that returned `Ok`) by any process sharing the database, unless the source refused
//!   that write: then the source's value is the truth, and the refused write is a dead letter,
//!   never served.
//! * **I2** An acknowledged delete reads as "not found" everywhere sharing the database; a
//!   delivered delete is never served from any tier.
//! * **I3** Offline ([`set_offline`](TieredCache::set_offline)) means no request leaves,
//!   deliveries already under way included: the switch is checked right before each call is
//!   sent.
//! * **I4** Dead letters are never dropped silently and never overwrite a newer delivered write:
//!   a dead letter a newer write of its key came after is
//!   [`superseded`](DeadLetter::superseded), and retrying it fails with
//!   [`Error::Superseded`].
//! * **I5** Every acknowledged write-behind write is delivered (coalescing allowed: the last
//!   write of a key stands for the ones before it), in per-key order, across restarts and
//!   crashes. Pending state lives in one place (the outbox), changed in the same step as the
//!   write that creates it. ([`OutboxMode::Memory`] trades crash safety away, as documented
//!   there.)
//!
//! Between processes the database is shared exactly (entries, pending writes, dead letters,
//! the breaker), and caches of one process on one file share their write fences, so a write by
//! one drops the others' L1 copies. What no database can reach is another *operating-system
//! process's* memory: a long-running process may serve its own L1 copy, fresh by its TTL, for up
//! to that TTL after a different process wrote the key, or for at most
//! [`max_l1_age`](TieredCacheBuilder::max_l1_age) when one is set (cross-process invalidation
//! is the PostgreSQL fleet's job; there the maximum L1 age, 60 s by default, bounds what a lost
//! message can cost). Short-lived processes, such as the `tiercache` command, start with an
//! empty L1 and are not affected.
//!
//! How they are held: every write bumps its key's *write fence* before it touches a tier, and a
//! fill from the source (or a promotion from L2) is written only while the fence has not moved
//! and L2 still holds the row the read saw, so a slow fill never brings an old value back; a
//! write-behind write and its L2 entry commit in one transaction, and a pending write is read
//! back from the outbox whatever the strategy of the reader; a refusal removes the local copy in
//! the same transaction as it records the dead letter. `tests/model.rs` checks all five against
//! a reference model over random operation lists (seeded, shrunk on failure), with restarts,
//! crashes, outages, offline spells, evictions and a second writer changing the source.
//!
//! # A `get`'s path through the modules
//! ```text
//! cache::read      get ─ L1 hit, fresh? ──────────────────────────────────────────▶ value
//!   (tier::memory)      │ miss or stale (a stale copy is kept as the candidate)
//! cache::read      lookup_slow ─ memory outbox pending? ─▶ its write (outbox::queue)
//!   (tier::sqlite)      │ L2 (one statement) fresh? ─▶ promoted into L1 behind the fence
//! cache::read      ask_source ─ durable outbox pending? ─▶ its write (any strategy)
//!                       │ offline? ─▶ stale candidate or Error::Unavailable
//! cache::flight         │ single-flight: one load per key, run as its own task
//! cache::load      load ─ source::guard (breaker permit, offline check, timeout) ─▶ Source
//!                       │ 200 / 304 / 404 ─▶ fill: L1, then L2 behind tier::fence
//! cache::read      fallback ─ the source failed ─▶ stale candidate (marked why) or error
//! ```
//! [`mget`](TieredCache::mget) (`cache::batch`) runs the same steps for many keys, with one L2
//! statement for all of them (entries and pending writes together).
//!
//! # Read path
//! 1. L1 hit and fresh → returned. L1 keeps an entry until its *stale* deadline, so it can also
//!    serve stale.
//! 2. L1 miss → a pending write-behind write of the key is the answer; else L2 (SQLite). An L2
//!    hit is **promoted** into L1 with its remaining lifetimes.
//! 3. No fresh copy → the [`Source`](source::Source), unless the strategy is
//!    [`CacheAside`](Strategy::CacheAside) (or a per-call loader:
//!    [`get_with`](TieredCache::get_with)). Concurrent misses of one key make **one** source
//!    call (single-flight), across [`get`](TieredCache::get) and [`mget`](TieredCache::mget)
//!    alike. The callers that joined the load get the answer as soon as L1 holds it; the one
//!    that started it returns once L2 holds it too.
//! 4. An expired entry with a validator (ETag) is **revalidated** with a conditional request; "not
//!    modified" renews it without moving its bytes.
//! 5. The source fails, times out, is rate-limited or its breaker is open → the **stale** copy is
//!    served if one is within its stale window, marked [`Freshness::Stale`] with the
//!    [`StaleReason`]. No stale copy → [`Error::Unavailable`]. Never a panic.
//! 6. "Not found" is remembered (a negative entry with its own short TTL).
//!
//! Every value comes back with where it came from ([`Lookup`]): the [`Tier`], fresh or stale and
//! why, its age. Callers that only want the bytes use [`get`](TieredCache::get); typed values,
//! decoded once per entry, come from [`typed`](TieredCache::typed).
//!
//! # Strategies
//! | strategy | `get` on a miss | `set` |
//! |---|---|---|
//! | [`ReadThrough`](Strategy::ReadThrough) (default) | loads from L3, fills L2 and L1 | L1 + L2 only; the source is read-only |
//! | [`CacheAside`](Strategy::CacheAside) | returns "miss"; the app loads and calls `set` | L1 + L2 only |
//! | [`WriteThrough`](Strategy::WriteThrough) | as read-through | L3 first; only when it accepted, L2 and L1 |
//! | [`WriteBehind`](Strategy::WriteBehind) | as read-through | L1, plus the L2 entry and a durable outbox row in one transaction; delivered in the background |
//!
//! # TTL and stale windows
//! An entry is fresh for [`ttl`](TieredCacheBuilder::ttl) (default 5 minutes) after the source
//! gave or confirmed it, then servable as stale for [`stale_ttl`](TieredCacheBuilder::stale_ttl)
//! (default 24 hours) — only when the source cannot answer, marked
//! [`Freshness::Stale`] with its [`StaleReason`]. Past that it is never served. "Not found" is
//! kept for [`negative_ttl`](TieredCacheBuilder::negative_ttl). L2 is an in-memory database
//! unless [`sqlite_path`](TieredCacheBuilder::sqlite_path) names a file: the default cache does
//! not survive a restart.
//! With [`refresh_ahead`](TieredCacheBuilder::refresh_ahead) (off by default), a read in the last
//! part of an entry's TTL refreshes it in the background, conditionally, while the source's
//! budget is above [`budget_reserve`](TieredCacheBuilder::budget_reserve); readers, then
//! revalidations, go first (see [`stats::RequestKind`]).
//!
//! # Stats, health and errors
//! * [`stats`](TieredCache::stats) → [`stats::StatsSnapshot`]: per-tier hits, misses, errors
//!   and the latency of each tier's own work; source calls actually sent (refused ones apart);
//!   requests sent and saved, and budget spent, by [`RequestKind`](stats::RequestKind);
//!   a table (`Display`), JSON (serde), or Prometheus text
//!   ([`to_prometheus`](stats::StatsSnapshot::to_prometheus), seconds, via `prometheus-client`).
//! * [`health`](TieredCache::health) → [`HealthReport`]: a tier whose last calls failed is
//!   degraded with its last error, in every process sharing the database.
//! * Errors: one [`Error`] enum with predicates ([`is_unavailable`](Error::is_unavailable):
//!   retry later; [`is_not_found`](Error::is_not_found), [`is_invalid_key`](Error::is_invalid_key):
//!   do not) and a stable [`kind`](Error::kind) for logs and JSON. A stale answer is not an
//!   error. Times in JSON are RFC 3339.
//!
//! # Your own source
//! Implement [`source::Source`] (only `fetch` is required) and classify failures with
//! [`source::SourceError`], so the breaker can tell an outage from a bad request; the example
//! below is a whole one.
//!
//! # Features
//! | feature | default | what it adds |
//! |---|---|---|
//! | `github` | yes | [`source::github::GitHubSource`], the GitHub REST API over octocrab |
//! | `cli` | no | the `tiercache` command-line binary |
//! | `serve` | no | `serve`: the cache as an HTTP service (axum routes), and `tiercache serve` |
//! | `postgres` | no | [`tier::postgres::PostgresStore`], L2 on a PostgreSQL server shared by a fleet (needs Rust 1.85) |
//!
//! # Modules
//! * `cache`: the facade [`TieredCache`] over `read` (the one read pipeline), `batch` (`mget`),
//!   `write` (the strategies), `load` (fills from the source), `loader` (`get_with`), `typed`
//!   ([`Typed`]), `admin` (flush, dead letters, warm, stats, health), `bundle` (export,
//!   import), `flight` (single-flight).
//! * [`source`]: the [`Source`](source::Source) trait, its protections (`source::guard`: breaker,
//!   timeout, offline switch) and the GitHub source.
//! * [`tier`]: L1 (`tier::memory`), the L2 storage traits ([`tier::store`]: entries, outbox,
//!   shared state; SQLite implements them, and
//!   [`TieredCacheBuilder::store`] takes another backend), the SQLite tier's settings, L2 behind
//!   its breakers (`tier::guarded`), write fences (`tier::fence`).
//! * [`outbox`]: the write-behind outbox, its delivery, reports and dead letters.
//! * [`bundle`]: offline bundles, one file holding a snapshot of the cache
//!   ([`export`](TieredCache::export)) to load elsewhere ([`import`](TieredCache::import)) and
//!   serve offline.
//! * [`breaker`]: the circuit breaker, usable on its own.
//! * [`stats`], [`health`], [`event`]: what the cache is doing.
//!
//! # Example
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
//! use async_trait::async_trait;
//! use tiercache::source::{Fetched, Source, SourceError};
//! use tiercache::{Tier, TieredCache};
//!
//! #[derive(Debug)]
//! struct Catalog;
//!
//! #[async_trait]
//! impl Source for Catalog {
//!     async fn fetch(&self, key: &str, _etag: Option<&str>) -> Result<Fetched, SourceError> {
//!         match key {
//!             "parts/bolt" => Ok(Fetched::value_with_validator("M8 bolt", "\"v1\"")),
//!             _ => Ok(Fetched::NotFound),
//!         }
//!     }
//! }
//!
//! let cache = TieredCache::builder().source(Catalog).build()?;
//! assert_eq!(cache.lookup("parts/bolt").await?.unwrap().tier, Tier::L3);
//! assert_eq!(cache.lookup("parts/bolt").await?.unwrap().tier, Tier::L1);
//! assert!(cache.get("parts/nut").await?.is_none());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod breaker;
pub mod bundle;
mod cache;
mod clock;
mod entry;
mod error;
pub mod event;
pub mod health;
mod key;
mod lookup;
pub mod outbox;
#[cfg(feature = "serve")]
pub mod serve;
pub mod source;
pub mod stats;
pub mod tier;
mod time;

pub use cache::{
    ReadOptions, Strategy, TieredCache, TieredCacheBuilder, Typed, WarmProgress, WarmSummary,
    DEFAULT_MAX_L1_AGE,
};
pub use clock::{Clock, MockClock, SystemClock};
pub use error::{BundleFault, Error, Result};
pub use event::Event;
pub use health::{HealthReport, HealthStatus};
pub use key::{KeyError, MAX_KEY_LEN};
pub use lookup::{Freshness, Lookup, StaleReason, Tier};
pub use outbox::{DeadLetter, FlushReport, OutboxMode};
#[cfg(feature = "postgres")]
pub use tier::postgres::PostgresStore;
pub use tier::sqlite::{OnCorrupt, Synchronous};
pub use tier::StoreSummary;
pub use time::describe_at;

/// The README's code, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
