//! Stats: what the cache did, cheaply counted, read as a [`StatsSnapshot`].
//!
//! # Recording
//!
//! The cache owns one `Stats` recorder and calls it on every operation (hits, misses, errors per
//! tier; stale serves by reason; source calls by outcome; latencies per tier and [`Op`]). The hot
//! path is an L1 hit (~100–200 ns in moka), so recording is built to cost a few nanoseconds:
//!
//! * **No global lock, no shared hot atomics.** The recorder is a fixed array of cache-line-padded
//!   *shards*. Each thread is given a shard index round-robin the first time it records (a
//!   `const` thread-local, so the lookup is a TLS read), and records into "its" shard with relaxed
//!   `fetch_add`s. With at least as many shards as busy threads, each shard's cache lines stay in
//!   one core's cache and the atomics are uncontended. Shards are merged only at snapshot time.
//! * **Latency** goes into HdrHistograms (2 significant digits, values in **nanoseconds**, clamped
//!   to one hour), one per (tier, op) per shard, created on first use and kept behind a per-shard
//!   `Mutex` that, like the counters, is normally only taken by the shard's own thread (an
//!   uncontended lock is ~20 ns) — and by snapshots.
//! * **L1-hit latency is sampled**: `Stats::start_sampled` reads the clock for 1 in
//!   [`L1_SAMPLE_EVERY`] calls per thread, so the clock reads, lock and histogram update are paid
//!   once per 64 hits. Hits themselves are all counted. Sampling is uniform, so the percentiles are
//!   unbiased; the latency `count` is the number of *timed* samples, not of operations.
//! * **Disabled stats** (`Stats::disabled()`) cost one predictable branch per call.
//!
//! Counters are monotonic between resets and are read with relaxed loads: a snapshot taken while
//! other threads record is not a single instant, but every counter in it is exact up to the moment
//! it was read.
//!
//! # Reading
//!
//! [`StatsSnapshot`] is plain data: serializable with serde (field names documented on the type),
//! printable as a compact table with `Display`, and exportable in the Prometheus text format with
//! [`StatsSnapshot::to_prometheus`] (encoded by the `prometheus-client` crate, in seconds).

use std::fmt;

use serde::Serialize;

mod prometheus;
mod recorder;
mod snapshot;

pub use prometheus::PROMETHEUS_CONTENT_TYPE;
pub use recorder::L1_SAMPLE_EVERY;

/// The upper bounds, in seconds, of the buckets of the Prometheus latency histogram
/// (`tiercache_latency_seconds`): from 1 µs (an L1 hit) to 10 s (a slow source call).
pub const LATENCY_BUCKETS_SECONDS: [f64; 15] = [
    1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];
pub(crate) use recorder::{SnapshotExtras, Stats};
pub use snapshot::{
    BreakerStats, LatencyStats, OutboxStats, RequestStats, StatsSnapshot, TierStats,
};

/// An operation whose latency is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A single-key read (`get` or `lookup`).
    Get,
    /// A single-key write.
    Set,
    /// A batched read.
    Mget,
    /// A delete.
    Delete,
}

impl Op {
    /// All operations, in a fixed order.
    pub const ALL: [Op; 4] = [Op::Get, Op::Set, Op::Mget, Op::Delete];

    /// `"get"`, `"set"`, `"mget"` or `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Mget => "mget",
            Op::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a call to the source (L3) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceOutcome {
    /// A new value.
    Ok,
    /// The cached copy is still current (HTTP 304).
    NotModified,
    /// The key does not exist at the source (HTTP 404).
    NotFound,
    /// The source refused the call: rate-limit budget spent.
    RateLimited,
    /// Any other failure: unavailable, timed out, rejected.
    Failed,
}

impl SourceOutcome {
    /// All outcomes, in a fixed order.
    pub const ALL: [SourceOutcome; 5] = [
        SourceOutcome::Ok,
        SourceOutcome::NotModified,
        SourceOutcome::NotFound,
        SourceOutcome::RateLimited,
        SourceOutcome::Failed,
    ];

    /// `"ok"`, `"not_modified"`, `"not_found"`, `"rate_limited"` or `"failed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceOutcome::Ok => "ok",
            SourceOutcome::NotModified => "not_modified",
            SourceOutcome::NotFound => "not_found",
            SourceOutcome::RateLimited => "rate_limited",
            SourceOutcome::Failed => "failed",
        }
    }
}

impl fmt::Display for SourceOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request to the source was made, highest priority first. Background kinds
/// ([`RefreshAhead`](Self::RefreshAhead), [`Warm`](Self::Warm)) are held back when the source's
/// rate-limit budget is at or below the reserve
/// ([`budget_reserve`](crate::TieredCacheBuilder::budget_reserve)); a reader's kinds go until
/// the breaker's gate (the budget spent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RequestKind {
    /// A reader waits for it: a miss with nothing to revalidate with.
    Read,
    /// A reader waits for it: an expired entry revalidated with its validator.
    Revalidate,
    /// A hot entry refreshed in the background before it expires (nobody waits).
    RefreshAhead,
    /// [`warm`](crate::TieredCache::warm) loading or revalidating a listed key.
    Warm,
}

impl RequestKind {
    /// All kinds, highest priority first.
    pub const ALL: [RequestKind; 4] = [
        RequestKind::Read,
        RequestKind::Revalidate,
        RequestKind::RefreshAhead,
        RequestKind::Warm,
    ];

    /// `"read"`, `"revalidate"`, `"refresh_ahead"` or `"warm"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Read => "read",
            RequestKind::Revalidate => "revalidate",
            RequestKind::RefreshAhead => "refresh_ahead",
            RequestKind::Warm => "warm",
        }
    }

    /// Whether the kind is background work, held back at the budget reserve.
    pub fn is_background(self) -> bool {
        matches!(self, RequestKind::RefreshAhead | RequestKind::Warm)
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a request of one [`RequestKind`] went, for the recorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestEvent {
    /// Sent to the source.
    Sent,
    /// Sent, and answered "not modified" (no body moved).
    NotModified,
    /// Not sent: the budget was at or below the reserve.
    SkippedBudget,
    /// Not sent: another request of the key was already under way (single-flight).
    Deduplicated,
}

/// A snapshot with some of everything, for the snapshot and Prometheus tests.
#[cfg(test)]
fn sample_snapshot() -> StatsSnapshot {
    use std::time::{Duration, UNIX_EPOCH};

    use crate::source::RateLimit;
    use crate::{StaleReason, Tier};

    let stats = Stats::with_shards(2);
    for _ in 0..9 {
        stats.hit(Tier::L1);
    }
    stats.miss(Tier::L1);
    stats.hit(Tier::L2);
    stats.error(Tier::L3);
    stats.record_latency(Tier::L1, Op::Get, Duration::from_nanos(150));
    stats.record_latency(Tier::L2, Op::Get, Duration::from_micros(80));
    stats.record_latency(Tier::L2, Op::Set, Duration::from_micros(900));
    stats.record_latency(Tier::L3, Op::Get, Duration::from_millis(120));
    stats.stale_served(StaleReason::RateLimited);
    stats.source_call(SourceOutcome::Ok);
    stats.source_call(SourceOutcome::NotModified);
    stats.negative_hit();
    stats.request(RequestKind::RefreshAhead, RequestEvent::Sent);
    stats.request(RequestKind::RefreshAhead, RequestEvent::NotModified);
    stats.request(RequestKind::Warm, RequestEvent::SkippedBudget);
    stats.budget_spent(RequestKind::Read, 2);
    stats.snapshot(SnapshotExtras {
        rate_limit: Some(RateLimit::new(
            5000,
            4990,
            UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        )),
        breakers: vec![
            BreakerStats {
                name: "l2".into(),
                state: "closed".into(),
                ..BreakerStats::default()
            },
            BreakerStats {
                name: "l3".into(),
                state: "half_open".into(),
                transitions: 2,
                ..BreakerStats::default()
            },
        ],
        outbox: OutboxStats {
            depth: 3,
            oldest_pending_age_ms: Some(1500),
            delivered: 10,
            retries: 4,
            dead_letters: 1,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{StaleReason, Tier};

    #[test]
    fn enum_discriminants_match_their_all_order() {
        // The recorder indexes counter arrays with `x as usize`; this keeps that sound.
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        for (i, o) in SourceOutcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        for (i, k) in RequestKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        for (i, r) in StaleReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, t) in [Tier::L1, Tier::L2, Tier::L3].iter().enumerate() {
            assert_eq!(*t as usize, i);
        }
    }

    #[test]
    fn names_match_serde() {
        for op in Op::ALL {
            assert_eq!(serde_json::to_value(op).ok(), Some(op.as_str().into()));
        }
        for o in SourceOutcome::ALL {
            assert_eq!(serde_json::to_value(o).ok(), Some(o.as_str().into()));
        }
        for k in RequestKind::ALL {
            assert_eq!(serde_json::to_value(k).ok(), Some(k.as_str().into()));
        }
    }
}
