//! What a read returns: the value, which tier served it, and whether it is fresh.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

/// A tier of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Memory (moka).
    L1,
    /// The SQLite database.
    L2,
    /// The source of truth.
    L3,
}

impl Tier {
    /// `"l1"`, `"l2"` or `"l3"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
            Tier::L3 => "l3",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a stale copy was served instead of a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StaleReason {
    /// The source answered with an error.
    SourceError,
    /// The source did not answer in time.
    Timeout,
    /// The source's rate-limit budget is spent.
    RateLimited,
    /// The source's circuit breaker is open.
    CircuitOpen,
    /// The cache is in offline mode.
    Offline,
}

impl StaleReason {
    /// All reasons, in a fixed order (for stats).
    pub const ALL: [StaleReason; 5] = [
        StaleReason::SourceError,
        StaleReason::Timeout,
        StaleReason::RateLimited,
        StaleReason::CircuitOpen,
        StaleReason::Offline,
    ];

    /// `"source_error"`, `"timeout"`, `"rate_limited"`, `"circuit_open"` or `"offline"`.
    pub fn as_str(self) -> &'static str {
        match self {
            StaleReason::SourceError => "source_error",
            StaleReason::Timeout => "timeout",
            StaleReason::RateLimited => "rate_limited",
            StaleReason::CircuitOpen => "circuit_open",
            StaleReason::Offline => "offline",
        }
    }
}

impl fmt::Display for StaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a served value is within its freshness TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "freshness")]
pub enum Freshness {
    /// Within its TTL, or just fetched or revalidated.
    Fresh,
    /// Past its TTL but within its stale window, served because the source could not answer.
    Stale {
        /// Why the source could not answer.
        reason: StaleReason,
    },
}

impl Freshness {
    /// Whether this is [`Freshness::Stale`].
    pub fn is_stale(self) -> bool {
        matches!(self, Freshness::Stale { .. })
    }
}

/// A value and where it came from, as returned by [`TieredCache::lookup`](crate::TieredCache::lookup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Lookup {
    /// The bytes.
    #[serde(skip)]
    pub value: Bytes,
    /// The tier that served it.
    pub tier: Tier,
    /// Fresh, or stale and why.
    pub freshness: Freshness,
    /// Time since the source last gave or confirmed this value.
    pub age: Duration,
    /// The validator (ETag) stored with it.
    pub validator: Option<String>,
}
