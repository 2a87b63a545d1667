//! The strategy and per-call options.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The maximum L1 age when L2 publishes other instances' writes (PostgreSQL) and none was set:
/// 60 seconds. See [`TieredCacheBuilder::max_l1_age`](crate::TieredCacheBuilder::max_l1_age).
pub const DEFAULT_MAX_L1_AGE: Duration = Duration::from_secs(60);

/// How reads and writes move between the tiers.
///
/// | strategy | `get` on a miss | `set` |
/// |---|---|---|
/// | [`ReadThrough`](Strategy::ReadThrough) (default) | loads from the source, fills L2 and L1 | L1 + L2 only |
/// | [`CacheAside`](Strategy::CacheAside) | returns "miss"; the app loads and calls `set` | L1 + L2 only |
/// | [`WriteThrough`](Strategy::WriteThrough) | as read-through | the source first; only when it accepted, L2 and L1 |
/// | [`WriteBehind`](Strategy::WriteBehind) | as read-through | L1, plus L2 and a durable outbox row in one transaction; delivered in the background |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Strategy {
    /// Misses load from the source; writes stay local (the source is read-only).
    #[default]
    ReadThrough,
    /// The cache never calls the source; the app fills it.
    CacheAside,
    /// Writes go to the source before the caches.
    WriteThrough,
    /// Writes are acknowledged once durable in L2 and delivered to the source later.
    WriteBehind,
}

impl Strategy {
    /// All strategies.
    pub const ALL: [Strategy; 4] = [
        Strategy::ReadThrough,
        Strategy::CacheAside,
        Strategy::WriteThrough,
        Strategy::WriteBehind,
    ];

    /// `"read-through"`, `"cache-aside"`, `"write-through"` or `"write-behind"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::ReadThrough => "read-through",
            Strategy::CacheAside => "cache-aside",
            Strategy::WriteThrough => "write-through",
            Strategy::WriteBehind => "write-behind",
        }
    }

    /// Whether a read miss goes to the source.
    pub fn reads_through(self) -> bool {
        self != Strategy::CacheAside
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                crate::Error::Config(format!(
                    "unknown strategy {s:?}; expected read-through, cache-aside, write-through or write-behind"
                ))
            })
    }
}

/// Options for one read.
///
/// ```
/// use std::time::Duration;
/// use tiercache::ReadOptions;
///
/// // Serve a cached copy as fresh only if the source confirmed it in the last 30 seconds.
/// let opts = ReadOptions::new().max_age(Duration::from_secs(30));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadOptions {
    /// The maximum age at which a cached copy is served as fresh, applied on top of its own
    /// deadline (like an HTTP request's `max-age`). `Some(ZERO)` revalidates every cached copy.
    /// Default: none.
    pub max_age: Option<Duration>,
}

impl ReadOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`max_age`](Self::max_age).
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }
}
