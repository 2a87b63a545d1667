//! The snapshot: plain, serializable data, printable as a table.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::{Op, RequestKind, SourceOutcome};
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
    /// The share of reads answered from the cache, fresh or stale, without a fresh answer from
    /// the source: `(L1 hits + L2 hits + stale served) / (L1 hits + L1 misses)` (every read
    /// consults L1 first, so the denominator is the number of reads; a stale copy is served only
    /// after both tiers missed). A pending write-behind write served counts as an L2 hit. 0 when
    /// there were no reads.
    pub overall_hit_ratio: f64,
    /// Stale copies served, by reason (`"source_error"`, `"timeout"`, `"rate_limited"`,
    /// `"circuit_open"`, `"offline"`); every reason is present.
    pub stale_served: BTreeMap<&'static str, u64>,
    /// Reads answered from L1 or L2 by a negative entry (a "not found" the source gave
    /// earlier, cached for the negative TTL). The source's own "not found" is not one of them:
    /// it is an L3 miss and a `not_found` source call.
    pub negative_hits: u64,
    /// Reads that waited on another caller's source call instead of making their own.
    pub coalesced_waiters: u64,
    /// Stored entries that could not be decoded.
    pub decode_errors: u64,
    /// Calls sent to the source by reads (and `warm`), by outcome (`"ok"`, `"not_modified"`,
    /// `"not_found"`, `"rate_limited"`, `"failed"`); every outcome is present. Calls the
    /// breaker or the rate-limit gate refused were never sent and are not here (see
    /// [`source_calls_refused`](Self::source_calls_refused)); write-behind deliveries are
    /// counted in [`outbox`](Self::outbox). A batched fetch
    /// ([`Source::fetch_many`](crate::source::Source::fetch_many)) counts one per key, by that
    /// key's answer.
    pub source_calls: BTreeMap<SourceOutcome, u64>,
    /// Reads whose source call was refused before it was sent: the L3 breaker was open, or the
    /// rate-limit budget was known to be spent.
    pub source_calls_refused: u64,
    /// Requests to the source by why they were made (`"read"`, `"revalidate"`,
    /// `"refresh_ahead"`, `"warm"`): sent, and saved (answered 304, skipped at the budget
    /// reserve, deduplicated), with the budget they spent. Every kind is present.
    pub requests: BTreeMap<RequestKind, RequestStats>,
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

    /// The requests of one kind.
    pub fn requests_for(&self, kind: RequestKind) -> RequestStats {
        self.requests.get(&kind).copied().unwrap_or_default()
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
    /// Reads this tier answered fresh. For L3: values and "not modified" (HTTP 304) answers,
    /// one per source call however many reads waited on it (see
    /// [`coalesced_waiters`](StatsSnapshot::coalesced_waiters)). An `mget` counts each distinct
    /// key once.
    pub hits: u64,
    /// Reads this tier was asked and did not have fresh (a stale copy found there is a miss).
    /// For L3: "not found" answers.
    pub misses: u64,
    /// Times this tier failed to answer (for L3: calls sent that failed; refused calls are in
    /// [`StatsSnapshot::source_calls_refused`]).
    pub errors: u64,
    /// `hits / (hits + misses)`; 0 when there was no traffic. Errors are not counted.
    pub hit_ratio: f64,
    /// Latency of this tier's own work, by operation; only operations with at least one sample
    /// are present. L1: the memory probe of `get` hits (sampled, see
    /// [`L1_SAMPLE_EVERY`](super::L1_SAMPLE_EVERY)) and of `mget`'s L1 pass; L2: the read (one
    /// statement for an `mget`); L3: each source call, under `get` (also for `mget`'s keys).
    pub latency: BTreeMap<Op, LatencyStats>,
}

/// The requests of one [`RequestKind`].
///
/// `sent` counts requests that left (a batched fetch counts one per key, as
/// [`source_calls`](StatsSnapshot::source_calls) does); `not_modified` those of them answered
/// 304 (no body moved; free of budget for GitHub). `skipped_budget` and `deduplicated` were
/// never sent, and are counted per caller that would have sent one: each read in the
/// refresh-ahead window while a refresh of the key runs, or while the budget is at the
/// reserve, counts once. [`saved`](Self::saved) adds the three.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RequestStats {
    /// Requests sent to the source.
    pub sent: u64,
    /// Sent requests answered "not modified" (a conditional request confirmed the copy).
    pub not_modified: u64,
    /// Background requests not sent because the budget was at or below the reserve (the stale
    /// window carries the load instead).
    pub skipped_budget: u64,
    /// Requests not sent because a request of the same key was already under way
    /// (single-flight), or had just renewed the entry.
    pub deduplicated: u64,
    /// Rate-limit budget spent, as the source reports it: the drop of
    /// [`RateLimit::remaining`] across each call within one window. An approximation: calls
    /// running at once may see each other's spending, and a call that starts a new window
    /// (or the first call, before any budget is known) is not counted.
    pub budget_spent: u64,
}

impl RequestStats {
    /// Requests saved: `not_modified + skipped_budget + deduplicated`.
    pub fn saved(&self) -> u64 {
        self.not_modified
            .saturating_add(self.skipped_budget)
            .saturating_add(self.deduplicated)
    }
}

/// A latency distribution, in **microseconds**.
///
/// Percentiles come from an HdrHistogram with 2 significant digits (each is the middle of a
/// bucket less than 1% wide, capped at `max`); `sum` and `max` are exact.
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
    /// Samples per bucket of [`LATENCY_BUCKETS_SECONDS`](super::LATENCY_BUCKETS_SECONDS) (not
    /// cumulative), for the Prometheus histogram.
    #[serde(skip)]
    pub(crate) buckets: [u64; super::LATENCY_BUCKETS_SECONDS.len()],
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
    /// When an open breaker lets the next call through (RFC 3339 in JSON); `None` when closed
    /// or forced open.
    #[serde(serialize_with = "crate::time::serde_rfc3339::option")]
    pub next_attempt: Option<std::time::SystemTime>,
    /// The rate-limit reset an open breaker is held until, if that is why it is open.
    #[serde(serialize_with = "crate::time::serde_rfc3339::option")]
    pub open_until: Option<std::time::SystemTime>,
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
            "{:<4} {:>10} {:>10} {:>8} {:>7}   {:<17} set p50/p99",
            "tier", "hits", "misses", "errors", "hit%", "get p50/p99"
        )?;
        for (tier, t) in self.tiers() {
            writeln!(
                f,
                "{:<4} {:>10} {:>10} {:>8} {:>6.1}%   {:<17} {}",
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
        if self.source_calls_refused > 0 {
            write!(f, "; refused (not sent) {}", self.source_calls_refused)?;
        }
        f.write_str("\nrequests:")?;
        for (kind, r) in &self.requests {
            write!(
                f,
                " {kind} sent={} saved={} budget={}",
                r.sent,
                r.saved(),
                r.budget_spent
            )?;
            if kind != &RequestKind::Warm {
                f.write_str(";")?;
            }
        }
        f.write_str("\n")?;
        if let Some(rl) = &self.rate_limit {
            writeln!(
                f,
                "rate limit: {}/{} remaining, resets {}",
                rl.remaining,
                rl.limit,
                crate::time::describe_at(rl.reset, std::time::SystemTime::now())
            )?;
        }
        for b in &self.breakers {
            write!(
                f,
                "breaker {}: {} ({} transitions, {} consecutive failures",
                b.name, b.state, b.transitions, b.consecutive_failures
            )?;
            let now = std::time::SystemTime::now();
            match (b.open_until, b.next_attempt) {
                (Some(t), _) => write!(
                    f,
                    "; the rate limit is spent, resets {}",
                    crate::time::describe_at(t, now)
                )?,
                (None, Some(t)) => write!(f, "; next try {}", crate::time::describe_at(t, now))?,
                (None, None) => {}
            }
            writeln!(f, ")")?;
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

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::stats::sample_snapshot;

    #[test]
    fn json_field_names() {
        let json = serde_json::to_value(sample_snapshot()).expect("serializable");
        let at = |path: &str| json.pointer(path).cloned().unwrap_or(Value::Null);
        assert_eq!(at("/enabled"), Value::Bool(true));
        assert_eq!(at("/l1/hits"), json!(9));
        assert_eq!(at("/l1/misses"), json!(1));
        assert_eq!(at("/l1/hit_ratio"), json!(0.9));
        assert_eq!(at("/l3/errors"), json!(1));
        assert_eq!(at("/overall_hit_ratio"), json!(1.0));
        assert_eq!(at("/l2/latency/set/count"), json!(1));
        for field in ["count", "sum", "p50", "p90", "p99", "p999", "max"] {
            assert!(
                at(&format!("/l2/latency/get/{field}")).is_number(),
                "{field}"
            );
        }
        assert_eq!(
            at("/l1/latency/set"),
            Value::Null,
            "ops without samples are absent"
        );
        assert_eq!(at("/stale_served/rate_limited"), json!(1));
        assert_eq!(at("/stale_served/circuit_open"), json!(0));
        assert_eq!(at("/source_calls/ok"), json!(1));
        assert_eq!(at("/source_calls/not_modified"), json!(1));
        assert_eq!(at("/source_calls/failed"), json!(0));
        assert_eq!(at("/requests/refresh_ahead/sent"), json!(1));
        assert_eq!(at("/requests/refresh_ahead/not_modified"), json!(1));
        assert_eq!(at("/requests/warm/skipped_budget"), json!(1));
        assert_eq!(at("/requests/read/budget_spent"), json!(2));
        assert_eq!(at("/negative_hits"), json!(1));
        assert_eq!(at("/coalesced_waiters"), json!(0));
        assert_eq!(at("/decode_errors"), json!(0));
        assert_eq!(at("/rate_limit/remaining"), json!(4990));
        assert_eq!(at("/breakers/1/name"), json!("l3"));
        assert_eq!(at("/breakers/1/state"), json!("half_open"));
        assert_eq!(at("/breakers/1/transitions"), json!(2));
        assert_eq!(at("/breakers/1/consecutive_failures"), json!(0));
        assert_eq!(at("/outbox/depth"), json!(3));
        assert_eq!(at("/outbox/oldest_pending_age_ms"), json!(1500));
        assert_eq!(at("/outbox/dead_letters"), json!(1));
    }

    #[test]
    fn display_has_a_row_per_tier_and_the_rest() {
        let text = sample_snapshot().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("tier"), "{text}");
        assert!(lines[0].contains("hit%") && lines[0].contains("get p50/p99"));
        for (line, tier) in lines[1..4].iter().zip(["l1", "l2", "l3"]) {
            assert!(line.starts_with(tier), "{text}");
        }
        assert!(lines[1].contains("90.0%"), "{text}");
        assert!(lines[1].contains("ns/"), "L1 latency in ns: {text}");
        assert!(lines[2].contains("µs/"), "{text}");
        assert!(lines[3].contains("ms/"), "{text}");
        for needle in [
            "overall hit ratio 100.0%",
            "rate_limited=1",
            "not_modified=1",
            "rate limit: 4990/5000 remaining",
            "breaker l3: half_open",
            "outbox: depth 3 (oldest 1500ms)",
            "dead letters 1",
            "refresh_ahead sent=1 saved=1 budget=0",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
    }

    #[test]
    fn human_latencies() {
        let h = |us: f64| Human(us).to_string();
        assert_eq!(h(0.15), "150ns");
        assert_eq!(h(12.34), "12.3µs");
        assert_eq!(h(4_500.0), "4.5ms");
        assert_eq!(h(1_200_000.0), "1.20s");
    }
}
