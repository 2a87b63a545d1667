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
//! # Read path
//! 1. L1 hit and fresh → returned. L1 keeps an entry until its *stale* deadline, so it can also
//!    serve stale.
//! 2. L1 miss → L2 (SQLite). An L2 hit is **promoted** into L1 with its remaining lifetimes.
//! 3. No fresh copy → the [`Source`](source::Source), unless the strategy is
//!    [`CacheAside`](Strategy::CacheAside). Concurrent misses of one key make **one** source call
//!    (single-flight), across [`get`](TieredCache::get) and [`mget`](TieredCache::mget) alike.
//! 4. An expired entry with a validator (ETag) is **revalidated** with a conditional request; "not
//!    modified" renews it without moving its bytes.
//! 5. The source fails, times out, is rate-limited or its breaker is open → the **stale** copy is
//!    served if one is within its stale window, marked [`Freshness::Stale`] with the
//!    [`StaleReason`]. No stale copy → [`Error::Unavailable`]. Never a panic.
//! 6. "Not found" is remembered (a negative entry with its own short TTL).
//!
//! Every value comes back with where it came from ([`Lookup`]): the [`Tier`], fresh or stale and
//! why, its age. Callers that only want the bytes use [`get`](TieredCache::get).
//!
//! # Strategies
//! | strategy | `get` on a miss | `set` |
//! |---|---|---|
//! | [`ReadThrough`](Strategy::ReadThrough) (default) | loads from L3, fills L2 and L1 | L1 + L2 only; the source is read-only |
//! | [`CacheAside`](Strategy::CacheAside) | returns "miss"; the app loads and calls `set` | L1 + L2 only |
//! | [`WriteThrough`](Strategy::WriteThrough) | as read-through | L3 first; only when it accepted, L2 and L1 |
//! | [`WriteBehind`](Strategy::WriteBehind) | as read-through | L1, plus the L2 entry and a durable outbox row in one transaction; delivered in the background |
//!
//! # Features
//! | feature | default | what it adds |
//! |---|---|---|
//! | `github` | yes | [`source::github::GitHubSource`], the GitHub REST API over octocrab |
//! | `cli` | no | the `tiercache` command-line binary |
//!
//! # Modules
//! * [`source`]: the [`Source`](source::Source) trait and the GitHub source.
//! * [`tier`]: the SQLite tier's settings and what it holds ([`StoreSummary`]).
//! * [`breaker`]: the circuit breaker, usable on its own.
//! * [`outbox`]: write-behind delivery reports and dead letters.
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
mod cache;
mod clock;
mod entry;
mod error;
pub mod event;
pub mod health;
mod key;
mod lookup;
pub mod outbox;
pub mod source;
pub mod stats;
pub mod tier;

pub use cache::{
    ReadOptions, Strategy, TieredCache, TieredCacheBuilder, Typed, WarmProgress, WarmSummary,
};
pub use clock::{Clock, MockClock, SystemClock};
pub use error::{Error, Result};
pub use event::Event;
pub use health::{HealthReport, HealthStatus};
pub use key::{KeyError, MAX_KEY_LEN};
pub use lookup::{Freshness, Lookup, StaleReason, Tier};
pub use outbox::{DeadLetter, FlushReport, OutboxMode};
pub use tier::sqlite::{OnCorrupt, Synchronous};
pub use tier::StoreSummary;

/// The README's code, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
