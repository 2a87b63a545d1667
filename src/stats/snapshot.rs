//! The snapshot: plain, serializable data, printable as a table.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::{Op, SourceOutcome};
use crate::source::RateLimit;
use crate::{StaleReason, Tier};

/// What the cache did since it started (or since the last reset), merged from every thread.
///
/// Serialized with serde, the field names below are the JSON keys, e.g.
/// `{"l1": {"hits": 10, "misses": 2, "errors": 0, "hit_ratio": 0.83, "latency": {"get": {"count":
/// 1, "sum": 0.2, "p50": 0.2, ...}}}, "overall_hit_ratio": 0.9, "stale_served": {"timeout": 0, ...},
/// "source_calls": {"ok": 1, "not_modified": 0, ...}, ...}`.
///
/// Latencies are in **microseconds** (fractional: they are recorded in nanoseconds).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Whether stats were recorded at all; when `false` every counter is 0.
    pub enabled: bool,
    /// The memory tier.
    pub l1: TierStats,
    /// The SQLite tier.
    pub l2: TierStats,
    /// The source.
    pub l3: TierStats,
    /// The share of reads answered from the cache, fresh or stale, without the source: `(L1 hits +
    /// L2 hits) / (L1 hits + L1 misses)` (every read consults L1 first, so the denominator is the
    /// number of reads). 0 when there were no reads.
    pub overall_hit_ratio: f64,
    /// Stale copies served, by reason (`"source_error"`, `"timeout"`, `"rate_limited"`,
    /// `"circuit_open"`, `"offline"`); every reason is present.
    pub stale_served: BTreeMap<&'static str, u64>,
    /// Reads answered by a negative entry (a recent "not found" from the source).
    pub negative_hits: u64,
    /// Reads that waited on another caller's source call instead of making their own.
    pub coalesced_waiters: u64,
    /// Stored entries that could not be decoded.
    pub decode_errors: u64,
    /// Calls to the source, by outcome (`"ok"`, `"not_modified"`, `"not_found"`,
    /// `"rate_limited"`, `"failed"`); every outcome is present.
    pub source_calls: BTreeMap<SourceOutcome, u64>,
    /// The source's last reported rate-limit budget, if it reported one.
    pub rate_limit: Option<RateLimit>,
    /// The circuit breakers.
    pub breakers: Vec<BreakerStats>,
    /// The write-behind outbox.
    pub outbox: OutboxStats,
}

impl StatsSnapshot {
    /// The stats of one tier.
    pub fn tier(&self, tier: Tier) -> &TierStats {
        match tier {
            Tier::L1 => &self.l1,
            Tier::L2 => &self.l2,
            Tier::L3 => &self.l3,
        }
    }

    /// Stale copies served for `reason`.
    pub fn stale_served_for(&self, reason: StaleReason) -> u64 {
        self.stale_served.get(reason.as_str()).copied().unwrap_or(0)
    }

    /// Calls to the source that ended with `outcome`.
    pub fn source_calls_for(&self, outcome: SourceOutcome) -> u64 {
        self.source_calls.get(&outcome).copied().unwrap_or(0)
    }

    pub(super) fn tiers(&self) -> [(Tier, &TierStats); 3] {
        [
            (Tier::L1, &self.l1),
            (Tier::L2, &self.l2),
            (Tier::L3, &self.l3),
        ]
    }
}

/// Counters and latencies of one tier.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TierStats {
    /// Reads this tier answered.
    pub hits: u64,
    /// Reads this tier was asked and did not have.
    pub misses: u64,
    /// Times this tier failed to answer.
    pub errors: u64,
    /// `hits / (hits + misses)`; 0 when there was no traffic. Errors are not counted.
    pub hit_ratio: f64,
    /// Latency of the operations this tier served, by operation; only operations with at least one
    /// sample are present. L1 `get`s are sampled (see [`L1_SAMPLE_EVERY`](super::L1_SAMPLE_EVERY)).
    pub latency: BTreeMap<Op, LatencyStats>,
}

/// A latency distribution, in **microseconds**.
///
/// Percentiles come from an HdrHistogram with 2 significant digits (within 1%); `sum` is exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct LatencyStats {
    /// Timed samples (for sampled operations, fewer than the operations).
    pub count: u64,
    /// Sum of the samples, µs.
    pub sum: f64,
    /// Median, µs.
    pub p50: f64,
    /// 90th percentile, µs.
    pub p90: f64,
    /// 99th percentile, µs.
    pub p99: f64,
    /// 99.9th percentile, µs.
    pub p999: f64,
    /// Largest sample, µs.
    pub max: f64,
}

impl LatencyStats {
    /// The mean, µs (0 without samples).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// The state of one circuit breaker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BreakerStats {
    /// Which breaker: `"l2"` or `"l3"`.
    pub name: String,
    /// `"closed"`, `"open"` or `"half_open"`.
    pub state: String,
    /// State changes since the breaker was created.
    pub transitions: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
}

/// The state of the write-behind outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Writes waiting to be pushed to the source.
    pub depth: u64,
    /// Age of the oldest waiting write, ms; `None` when nothing waits.
    pub oldest_pending_age_ms: Option<u64>,
    /// Writes the source accepted.
    pub delivered: u64,
    /// Pushes retried after a failure.
    pub retries: u64,
    /// Writes that kept failing and are parked, reported, never dropped.
    pub dead_letters: u64,
}

/// A latency in µs, human-sized: `850ns`, `12.3µs`, `4.5ms`, `1.20s`.
struct Human(f64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0;
        if us < 1.0 {
            write!(f, "{:.0}ns", us * 1_000.0)
        } else if us < 1_000.0 {
            write!(f, "{us:.1}µs")
        } else if us < 1_000_000.0 {
            write!(f, "{:.1}ms", us / 1_000.0)
        } else {
            write!(f, "{:.2}s", us / 1_000_000.0)
        }
    }
}

fn percentiles(l: Option<&LatencyStats>) -> String {
    match l {
        Some(l) => format!("{}/{}", Human(l.p50), Human(l.p99)),
        None => "-".to_owned(),
    }
}

/// A compact table, one row per tier, then one line per topic:
///
/// ```text
/// tier        hits    misses    errors    hit%   get p50/p99      set p50/p99
/// l1           900       100         0   90.0%   130ns/410ns      -
/// ...
/// overall hit ratio 95.0%; negative hits 3; coalesced waiters 7; decode errors 0
/// ```
impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<4} {:>10} {:>10} {:>8} {:>7}   {:<17} {:<17}",
            "tier", "hits", "misses", "errors", "hit%", "get p50/p99", "set p50/p99"
        )?;
        for (tier, t) in self.tiers() {
            writeln!(
                f,
                "{:<4} {:>10} {:>10} {:>8} {:>6.1}%   {:<17} {:<17}",
                tier.as_str(),
                t.hits,
                t.misses,
                t.errors,
                t.hit_ratio * 100.0,
                percentiles(t.latency.get(&Op::Get)),
                percentiles(t.latency.get(&Op::Set)),
            )?;
        }
        writeln!(
            f,
            "overall hit ratio {:.1}%; negative hits {}; coalesced waiters {}; decode errors {}",
            self.overall_hit_ratio * 100.0,
            self.negative_hits,
            self.coalesced_waiters,
            self.decode_errors
        )?;
        f.write_str("stale served:")?;
        for (reason, n) in &self.stale_served {
            write!(f, " {reason}={n}")?;
        }
        f.write_str("\nsource calls:")?;
        for (outcome, n) in &self.source_calls {
            write!(f, " {outcome}={n}")?;
        }
        f.write_str("\n")?;
        if let Some(rl) = &self.rate_limit {
            writeln!(f, "rate limit: {}/{} remaining", rl.remaining, rl.limit)?;
        }
        for b in &self.breakers {
            writeln!(
                f,
                "breaker {}: {} ({} transitions, {} consecutive failures)",
                b.name, b.state, b.transitions, b.consecutive_failures
            )?;
        }
        let o = &self.outbox;
        write!(f, "outbox: depth {}", o.depth)?;
        if let Some(age) = o.oldest_pending_age_ms {
            write!(f, " (oldest {age}ms)")?;
        }
        write!(
            f,
            ", delivered {}, retries {}, dead letters {}",
            o.delivered, o.retries, o.dead_letters
        )
    }
}
