//! The recorder: sharded, mostly thread-owned counters and histograms, merged at snapshot time.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::snapshot::{
    BreakerStats, LatencyStats, OutboxStats, RequestStats, StatsSnapshot, TierStats,
};
use super::{Op, RequestEvent, RequestKind, SourceOutcome};
use crate::source::RateLimit;
use crate::{StaleReason, Tier};

/// `Stats::start_sampled` (the L1-hit latency timer) times one call in this many, per thread.
pub const L1_SAMPLE_EVERY: u32 = 64;

const TIERS: usize = 3;
const OPS: usize = Op::ALL.len();
const REASONS: usize = StaleReason::ALL.len();
const OUTCOMES: usize = SourceOutcome::ALL.len();
const KINDS: usize = RequestKind::ALL.len();
/// Per kind: sent, not modified, skipped (budget), deduplicated, budget spent.
const KIND_COUNTERS: usize = 5;

/// Latencies are recorded in nanoseconds and clamped to one hour.
const MAX_LATENCY_NS: u64 = 3_600 * 1_000_000_000;
/// HdrHistogram precision: 2 significant digits, i.e. within 1%.
const SIGFIG: u8 = 2;

/// Threads are numbered round-robin the first time they record; the number picks a shard.
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

/// Per-thread recorder state. `const`-initialized and without a destructor, so access is a plain
/// TLS read with no lazy-init or teardown check.
struct ThreadSlot {
    /// The thread's number, `usize::MAX` until first use.
    index: Cell<usize>,
    /// Calls to [`Stats::start_sampled`] on this thread, for 1-in-N sampling.
    tick: Cell<u32>,
}

thread_local! {
    static THREAD: ThreadSlot = const {
        ThreadSlot { index: Cell::new(usize::MAX), tick: Cell::new(0) }
    };
}

#[inline]
fn thread_index() -> usize {
    THREAD
        .try_with(|t| {
            let i = t.index.get();
            if i != usize::MAX {
                return i;
            }
            let i = NEXT_THREAD.fetch_add(1, Relaxed) & (usize::MAX >> 1);
            t.index.set(i);
            i
        })
        // The thread is being torn down: share shard 0.
        .unwrap_or(0)
}

/// A histogram and the exact sum and maximum of what went into it, in nanoseconds.
#[derive(Clone)]
struct Latency {
    hist: Histogram<u64>,
    sum_ns: u64,
    max_ns: u64,
}

impl Latency {
    fn new() -> Option<Self> {
        Some(Self {
            hist: Histogram::new(SIGFIG).ok()?,
            sum_ns: 0,
            max_ns: 0,
        })
    }
}

/// One shard: padded to its own cache lines so threads recording into neighbouring shards do not
/// false-share.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    hits: [AtomicU64; TIERS],
    misses: [AtomicU64; TIERS],
    errors: [AtomicU64; TIERS],
    negative_hits: AtomicU64,
    coalesced_waiters: AtomicU64,
    decode_errors: AtomicU64,
    source_refused: AtomicU64,
    stale_served: [AtomicU64; REASONS],
    source_calls: [AtomicU64; OUTCOMES],
    /// Indexed by `kind * KIND_COUNTERS + counter` (see [`KIND_COUNTERS`]).
    requests: [AtomicU64; KINDS * KIND_COUNTERS],
    /// Indexed by `tier * OPS + op`; created on first use (an unused pair costs nothing).
    latency: Mutex<[Option<Box<Latency>>; TIERS * OPS]>,
}

impl Shard {
    fn latency(&self) -> MutexGuard<'_, [Option<Box<Latency>>; TIERS * OPS]> {
        self.latency.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reset(&self) {
        let counters = self
            .hits
            .iter()
            .chain(&self.misses)
            .chain(&self.errors)
            .chain(&self.stale_served)
            .chain(&self.source_calls)
            .chain(&self.requests)
            .chain([
                &self.negative_hits,
                &self.coalesced_waiters,
                &self.decode_errors,
                &self.source_refused,
            ]);
        for c in counters {
            c.store(0, Relaxed);
        }
        for slot in self.latency().iter_mut() {
            *slot = None;
        }
    }
}

#[inline]
fn bump(counter: Option<&AtomicU64>) {
    if let Some(c) = counter {
        c.fetch_add(1, Relaxed);
    }
}

#[inline]
fn sum(shards: &[Shard], f: impl Fn(&Shard) -> &AtomicU64) -> u64 {
    shards
        .iter()
        .fold(0u64, |acc, s| acc.saturating_add(f(s).load(Relaxed)))
}

/// A latency measurement in progress, from [`Stats::start`] or [`Stats::start_sampled`].
///
/// Holds no time when stats are disabled or the call was not sampled; recording such a timer does
/// nothing.
#[derive(Debug, Clone, Copy)]
#[must_use = "pass the timer to `Stats::record`"]
pub(crate) struct Timer(Option<Instant>);

impl Timer {
    /// A timer that records nothing.
    pub(crate) const OFF: Timer = Timer(None);

    /// Whether this timer will record.
    #[cfg(test)]
    pub(crate) fn is_running(&self) -> bool {
        self.0.is_some()
    }
}

/// What other modules own and the cache passes in at snapshot time.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapshotExtras {
    /// The source's last reported rate-limit budget.
    pub(crate) rate_limit: Option<RateLimit>,
    /// The circuit breakers, e.g. `"l2"` and `"l3"`.
    pub(crate) breakers: Vec<BreakerStats>,
    /// The write-behind outbox.
    pub(crate) outbox: OutboxStats,
}

/// The cache's recorder. All methods take `&self` and are cheap; see the [module docs](super) for
/// where the cost goes.
///
/// Contract with the caller (it makes the ratios in [`StatsSnapshot`] mean what they say):
/// every read records exactly one L1 `hit` or `miss`; an L1 miss that consults L2 records one L2
/// `hit` or `miss` (a pending write-behind write served counts as the L2 hit); a source call
/// that was sent records one L3 `hit` (value or not-modified) or `miss` (not found) or `error`,
/// and one `source_call`; a call the breaker or the rate-limit gate refused records only
/// `source_refused`. A stale copy served records `stale_served`. Latency is each tier's own
/// work: the L1 probe (sampled on hits), the L2 read, the source call.
pub(crate) struct Stats {
    /// Empty when disabled.
    shards: Box<[Shard]>,
    /// `shards.len() - 1`; the length is a power of two.
    mask: usize,
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats")
            .field("enabled", &self.is_enabled())
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg_attr(not(test), allow(dead_code))] // Until the cache calls every recorder method.
impl Stats {
    /// An enabled recorder with two shards per available core (at least 4, at most 64).
    pub(crate) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_shards(cores.saturating_mul(2))
    }

    /// An enabled recorder with `n` shards, rounded up to a power of two within `1..=1024`.
    pub(crate) fn with_shards(n: usize) -> Self {
        let n = n.clamp(1, 1024).next_power_of_two();
        Self {
            shards: (0..n).map(|_| Shard::default()).collect(),
            mask: n - 1,
        }
    }

    /// [`new`](Self::new) when `enabled`, else [`disabled`](Self::disabled).
    pub(crate) fn with_enabled(enabled: bool) -> Self {
        if enabled {
            Self::new()
        } else {
            Self::disabled()
        }
    }

    /// A recorder that records nothing: every call is one branch. Its snapshots are all zeros.
    pub(crate) fn disabled() -> Self {
        Self {
            shards: Box::new([]),
            mask: 0,
        }
    }

    /// Whether this recorder records.
    #[inline]
    pub(crate) fn is_enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    /// This thread's shard, or `None` when disabled.
    #[inline]
    fn shard(&self) -> Option<&Shard> {
        if self.shards.is_empty() {
            return None;
        }
        self.shards.get(thread_index() & self.mask)
    }

    /// A read was answered by `tier`.
    #[inline]
    pub(crate) fn hit(&self, tier: Tier) {
        bump(self.shard().and_then(|s| s.hits.get(tier as usize)));
    }

    /// `tier` did not have the key.
    #[inline]
    pub(crate) fn miss(&self, tier: Tier) {
        bump(self.shard().and_then(|s| s.misses.get(tier as usize)));
    }

    /// `tier` failed to answer.
    #[inline]
    pub(crate) fn error(&self, tier: Tier) {
        bump(self.shard().and_then(|s| s.errors.get(tier as usize)));
    }

    /// A read was answered by a negative entry (the source said "not found" recently).
    #[inline]
    pub(crate) fn negative_hit(&self) {
        bump(self.shard().map(|s| &s.negative_hits));
    }

    /// A read waited on another caller's in-flight source call (a single-flight follower).
    #[inline]
    pub(crate) fn coalesced_waiter(&self) {
        bump(self.shard().map(|s| &s.coalesced_waiters));
    }

    /// A stale copy was served, and why.
    #[inline]
    pub(crate) fn stale_served(&self, reason: StaleReason) {
        bump(
            self.shard()
                .and_then(|s| s.stale_served.get(reason as usize)),
        );
    }

    /// A stored entry could not be decoded.
    #[inline]
    pub(crate) fn decode_error(&self) {
        bump(self.shard().map(|s| &s.decode_errors));
    }

    /// A read's source call was refused before it was sent (breaker open, budget spent).
    #[inline]
    pub(crate) fn source_refused(&self) {
        bump(self.shard().map(|s| &s.source_refused));
    }

    /// A call to the source was sent and ended with `outcome`.
    #[inline]
    pub(crate) fn source_call(&self, outcome: SourceOutcome) {
        bump(
            self.shard()
                .and_then(|s| s.source_calls.get(outcome as usize)),
        );
    }

    /// A request of `kind` was sent, answered 304, skipped or deduplicated.
    #[inline]
    pub(crate) fn request(&self, kind: RequestKind, event: RequestEvent) {
        let counter = match event {
            RequestEvent::Sent => 0,
            RequestEvent::NotModified => 1,
            RequestEvent::SkippedBudget => 2,
            RequestEvent::Deduplicated => 3,
        };
        bump(
            self.shard()
                .and_then(|s| s.requests.get(kind as usize * KIND_COUNTERS + counter)),
        );
    }

    /// A request of `kind` spent `n` of the source's rate-limit budget.
    pub(crate) fn budget_spent(&self, kind: RequestKind, n: u64) {
        if let Some(c) = self
            .shard()
            .and_then(|s| s.requests.get(kind as usize * KIND_COUNTERS + 4))
        {
            c.fetch_add(n, Relaxed);
        }
    }

    /// Starts timing an operation (reads the clock unless disabled).
    #[inline]
    pub(crate) fn start(&self) -> Timer {
        if self.is_enabled() {
            Timer(Some(Instant::now()))
        } else {
            Timer::OFF
        }
    }

    /// Starts timing one call in [`L1_SAMPLE_EVERY`] on this thread; the others get a timer that
    /// records nothing, without reading the clock. For the L1-hit path: count every hit with
    /// [`hit`](Self::hit), time a sample of them with this.
    #[inline]
    pub(crate) fn start_sampled(&self) -> Timer {
        if !self.is_enabled() {
            return Timer::OFF;
        }
        let sampled = THREAD
            .try_with(|t| {
                let n = t.tick.get().wrapping_add(1);
                t.tick.set(n);
                n % L1_SAMPLE_EVERY == 0
            })
            .unwrap_or(false);
        if sampled {
            Timer(Some(Instant::now()))
        } else {
            Timer::OFF
        }
    }

    /// Records the time since `timer` started as the latency of `op` served by `tier`.
    #[inline]
    pub(crate) fn record(&self, tier: Tier, op: Op, timer: Timer) {
        if let Some(start) = timer.0 {
            self.record_latency(tier, op, start.elapsed());
        }
    }

    /// Records `latency` for `op` served by `tier` (for callers that measured it themselves).
    pub(crate) fn record_latency(&self, tier: Tier, op: Op, latency: Duration) {
        let Some(shard) = self.shard() else { return };
        let ns = u64::try_from(latency.as_nanos())
            .unwrap_or(u64::MAX)
            .min(MAX_LATENCY_NS);
        let mut slots = shard.latency();
        let Some(slot) = slots.get_mut(tier as usize * OPS + op as usize) else {
            return;
        };
        if slot.is_none() {
            *slot = Latency::new().map(Box::new);
        }
        if let Some(l) = slot {
            // An auto-resizing histogram accepts any value up to far beyond the clamp.
            let _ = l.hist.record(ns);
            l.sum_ns = l.sum_ns.saturating_add(ns);
            l.max_ns = l.max_ns.max(ns);
        }
    }

    /// Zeroes every counter and histogram. Not atomic with respect to concurrent recording: a call
    /// racing with `reset` may land before or after it.
    pub(crate) fn reset(&self) {
        for s in self.shards.iter() {
            s.reset();
        }
    }

    /// Merges the shards into a snapshot, adding what other modules own.
    pub(crate) fn snapshot(&self, extra: SnapshotExtras) -> StatsSnapshot {
        let shards = &self.shards[..];
        let tier_stats = |tier: Tier| {
            let t = tier as usize;
            let hits = sum(shards, |s| &s.hits[t]);
            let misses = sum(shards, |s| &s.misses[t]);
            let errors = sum(shards, |s| &s.errors[t]);
            let mut latency = BTreeMap::new();
            for op in Op::ALL {
                if let Some(l) = self.merged_latency(t * OPS + op as usize) {
                    latency.insert(op, l);
                }
            }
            TierStats {
                hits,
                misses,
                errors,
                hit_ratio: ratio(hits, hits.saturating_add(misses)),
                latency,
            }
        };
        let l1 = tier_stats(Tier::L1);
        let l2 = tier_stats(Tier::L2);
        let l3 = tier_stats(Tier::L3);
        let stale_served: BTreeMap<&'static str, u64> = StaleReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| (r.as_str(), sum(shards, |s| &s.stale_served[i])))
            .collect();
        let stale_total = stale_served
            .values()
            .fold(0u64, |a, n| a.saturating_add(*n));
        let overall_hit_ratio = ratio(
            l1.hits.saturating_add(l2.hits).saturating_add(stale_total),
            l1.hits.saturating_add(l1.misses),
        );
        StatsSnapshot {
            enabled: self.is_enabled(),
            l1,
            l2,
            l3,
            overall_hit_ratio,
            stale_served,
            negative_hits: sum(shards, |s| &s.negative_hits),
            coalesced_waiters: sum(shards, |s| &s.coalesced_waiters),
            decode_errors: sum(shards, |s| &s.decode_errors),
            source_calls: SourceOutcome::ALL
                .iter()
                .enumerate()
                .map(|(i, o)| (*o, sum(shards, |s| &s.source_calls[i])))
                .collect(),
            source_calls_refused: sum(shards, |s| &s.source_refused),
            requests: RequestKind::ALL
                .iter()
                .map(|k| {
                    let at =
                        |c: usize| sum(shards, |s| &s.requests[*k as usize * KIND_COUNTERS + c]);
                    let stats = RequestStats {
                        sent: at(0),
                        not_modified: at(1),
                        skipped_budget: at(2),
                        deduplicated: at(3),
                        budget_spent: at(4),
                    };
                    (*k, stats)
                })
                .collect(),
            rate_limit: extra.rate_limit,
            breakers: extra.breakers,
            outbox: extra.outbox,
        }
    }

    fn merged_latency(&self, slot: usize) -> Option<LatencyStats> {
        let mut merged: Option<Latency> = None;
        for shard in self.shards.iter() {
            let slots = shard.latency();
            let Some(Some(l)) = slots.get(slot) else {
                continue;
            };
            match &mut merged {
                None => merged = Some(Latency::clone(l)),
                Some(m) => {
                    let _ = m.hist.add(&l.hist);
                    m.sum_ns = m.sum_ns.saturating_add(l.sum_ns);
                    m.max_ns = m.max_ns.max(l.max_ns);
                }
            }
        }
        let m = merged?;
        if m.hist.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        // The middle of the quantile's bucket rather than its top, and never above the true max.
        let q = |q: f64| {
            let ns = m.hist.median_equivalent(m.hist.value_at_quantile(q));
            us(ns.min(m.max_ns))
        };
        let mut buckets = [0u64; super::LATENCY_BUCKETS_SECONDS.len()];
        let mut below = 0u64;
        for (b, bound) in buckets.iter_mut().zip(super::LATENCY_BUCKETS_SECONDS) {
            let upto = m.hist.count_between(0, (bound * 1e9) as u64);
            *b = upto.saturating_sub(below);
            below = below.max(upto);
        }
        Some(LatencyStats {
            buckets,
            count: m.hist.len(),
            sum: us(m.sum_ns),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: us(m.max_ns),
        })
    }
}

/// `part / whole`, 0 when `whole` is 0, at most 1.
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= expected * tolerance,
            "{actual} is not within {tolerance} of {expected}"
        );
    }

    #[test]
    fn counters_merge_across_threads() {
        const N: u64 = 10_000;
        // 2 shards for 4 threads (+ this one): shards are shared, counts must still be exact.
        for stats in [Stats::new(), Stats::with_shards(2)] {
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..N {
                            stats.hit(Tier::L1);
                            stats.miss(Tier::L2);
                            stats.source_call(SourceOutcome::NotModified);
                        }
                        stats.record_latency(Tier::L3, Op::Get, Duration::from_millis(5));
                    });
                }
            });
            let snap = stats.snapshot(SnapshotExtras::default());
            assert_eq!(snap.l1.hits, 4 * N);
            assert_eq!(snap.l2.misses, 4 * N);
            assert_eq!(snap.source_calls_for(SourceOutcome::NotModified), 4 * N);
            assert_eq!(snap.l3.latency[&Op::Get].count, 4);
        }
    }

    #[test]
    fn hit_ratios() {
        let stats = Stats::with_shards(4);
        let snap = stats.snapshot(SnapshotExtras::default());
        assert_eq!(snap.l1.hit_ratio, 0.0);
        assert_eq!(snap.overall_hit_ratio, 0.0);

        // 10 reads: 6 L1 hits; 4 L1 misses -> 3 L2 hits, 1 L2 miss -> 1 L3 hit.
        for _ in 0..6 {
            stats.hit(Tier::L1);
        }
        for _ in 0..4 {
            stats.miss(Tier::L1);
        }
        for _ in 0..3 {
            stats.hit(Tier::L2);
        }
        stats.miss(Tier::L2);
        stats.hit(Tier::L3);
        stats.error(Tier::L3);
        let snap = stats.snapshot(SnapshotExtras::default());
        assert_eq!(snap.l1.hit_ratio, 0.6);
        assert_eq!(snap.l2.hit_ratio, 0.75);
        assert_eq!(snap.l3.hit_ratio, 1.0, "errors are not misses");
        assert_eq!(snap.l3.errors, 1);
        assert_eq!(snap.overall_hit_ratio, 0.9);
    }

    #[test]
    fn latency_percentiles() {
        let stats = Stats::with_shards(1);
        // 1..=1000 µs.
        for us in 1..=1000 {
            stats.record_latency(Tier::L2, Op::Get, Duration::from_micros(us));
        }
        stats.record_latency(Tier::L2, Op::Set, Duration::from_nanos(250));
        let snap = stats.snapshot(SnapshotExtras::default());
        let get = snap.l2.latency[&Op::Get];
        assert_eq!(get.count, 1000);
        assert_eq!(get.sum, 500_500.0);
        assert_close(get.mean(), 500.5, 1e-9);
        assert_close(get.p50, 500.0, 0.01);
        assert_close(get.p90, 900.0, 0.01);
        assert_close(get.p99, 990.0, 0.01);
        assert_close(get.p999, 999.0, 0.01);
        assert_eq!(get.max, 1000.0);
        let set = snap.l2.latency[&Op::Set];
        assert_eq!(set.count, 1);
        assert_close(set.p50, 0.25, 0.01);
        // Only ops and tiers with samples appear.
        assert_eq!(snap.l2.latency.len(), 2);
        assert!(snap.l1.latency.is_empty() && snap.l3.latency.is_empty());
    }

    #[test]
    fn latency_is_merged_across_shards_and_clamped() {
        let stats = Stats::with_shards(8);
        std::thread::scope(|s| {
            for i in 1..=4u64 {
                let stats = &stats;
                s.spawn(move || stats.record_latency(Tier::L3, Op::Mget, Duration::from_millis(i)));
            }
        });
        stats.record_latency(Tier::L3, Op::Delete, Duration::MAX);
        let snap = stats.snapshot(SnapshotExtras::default());
        let mget = snap.l3.latency[&Op::Mget];
        assert_eq!(mget.count, 4);
        assert_eq!(mget.sum, 10_000.0);
        assert_eq!(mget.max, 4_000.0);
        assert_eq!(snap.l3.latency[&Op::Delete].max, 3_600e6);
    }

    #[test]
    fn timers_record_elapsed_time() {
        let stats = Stats::with_shards(1);
        let t = stats.start();
        assert!(t.is_running());
        stats.record(Tier::L1, Op::Set, t);
        stats.record(Tier::L1, Op::Set, Timer::OFF);
        let snap = stats.snapshot(SnapshotExtras::default());
        assert_eq!(snap.l1.latency[&Op::Set].count, 1);
    }

    #[test]
    fn l1_hits_are_all_counted_but_sampled_for_latency() {
        let stats = Stats::with_shards(1);
        let rounds = 100 * L1_SAMPLE_EVERY as usize;
        let mut timed = 0;
        for _ in 0..rounds {
            let t = stats.start_sampled();
            timed += usize::from(t.is_running());
            stats.hit(Tier::L1);
            stats.record(Tier::L1, Op::Get, t);
        }
        // Per-thread tick, so any run of `L1_SAMPLE_EVERY * k` calls has exactly `k` samples.
        assert_eq!(timed, 100);
        let snap = stats.snapshot(SnapshotExtras::default());
        assert_eq!(snap.l1.hits, rounds as u64);
        assert_eq!(snap.l1.latency[&Op::Get].count, 100);
    }

    #[test]
    fn disabled_records_nothing() {
        assert!(Stats::with_enabled(true).is_enabled());
        let stats = Stats::with_enabled(false);
        assert!(!stats.is_enabled());
        for tier in [Tier::L1, Tier::L2, Tier::L3] {
            stats.hit(tier);
            stats.miss(tier);
            stats.error(tier);
            stats.record_latency(tier, Op::Get, Duration::from_millis(1));
        }
        stats.negative_hit();
        stats.coalesced_waiter();
        stats.decode_error();
        stats.stale_served(StaleReason::Offline);
        stats.source_call(SourceOutcome::Ok);
        assert!(!stats.start().is_running());
        assert!((0..1000).all(|_| !stats.start_sampled().is_running()));
        stats.reset();

        let snap = stats.snapshot(SnapshotExtras::default());
        assert!(!snap.enabled);
        for (_, t) in snap.tiers() {
            assert_eq!(*t, TierStats::default());
        }
        assert_eq!(
            snap.negative_hits + snap.coalesced_waiters + snap.decode_errors,
            0
        );
        assert!(snap.stale_served.values().all(|n| *n == 0));
        assert!(snap.source_calls.values().all(|n| *n == 0));
    }

    #[test]
    fn reset_zeroes_everything() {
        let stats = Stats::with_shards(4);
        for tier in [Tier::L1, Tier::L2, Tier::L3] {
            stats.hit(tier);
            stats.miss(tier);
            stats.error(tier);
            stats.record_latency(tier, Op::Get, Duration::from_millis(1));
        }
        stats.negative_hit();
        stats.coalesced_waiter();
        stats.decode_error();
        for r in StaleReason::ALL {
            stats.stale_served(r);
        }
        for o in SourceOutcome::ALL {
            stats.source_call(o);
        }
        stats.reset();
        let snap = stats.snapshot(SnapshotExtras::default());
        assert!(snap.enabled);
        for (_, t) in snap.tiers() {
            assert_eq!(*t, TierStats::default());
        }
        assert_eq!(
            snap.negative_hits + snap.coalesced_waiters + snap.decode_errors,
            0
        );
        assert!(snap.stale_served.values().all(|n| *n == 0));
        assert!(snap.source_calls.values().all(|n| *n == 0));

        // And it keeps recording afterwards.
        stats.hit(Tier::L1);
        assert_eq!(stats.snapshot(SnapshotExtras::default()).l1.hits, 1);
    }

    #[test]
    fn every_reason_and_outcome_is_reported() {
        let stats = Stats::with_shards(2);
        stats.stale_served(StaleReason::CircuitOpen);
        stats.stale_served(StaleReason::CircuitOpen);
        stats.source_call(SourceOutcome::RateLimited);
        stats.negative_hit();
        stats.coalesced_waiter();
        stats.coalesced_waiter();
        stats.decode_error();
        let snap = stats.snapshot(SnapshotExtras::default());
        assert_eq!(snap.stale_served.len(), StaleReason::ALL.len());
        assert_eq!(snap.source_calls.len(), SourceOutcome::ALL.len());
        assert_eq!(snap.stale_served_for(StaleReason::CircuitOpen), 2);
        assert_eq!(snap.stale_served_for(StaleReason::Timeout), 0);
        assert_eq!(snap.source_calls_for(SourceOutcome::RateLimited), 1);
        assert_eq!(
            (
                snap.negative_hits,
                snap.coalesced_waiters,
                snap.decode_errors
            ),
            (1, 2, 1)
        );
    }

    #[test]
    fn extras_pass_through() {
        let stats = Stats::with_shards(1);
        let reset = std::time::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let snap = stats.snapshot(SnapshotExtras {
            rate_limit: Some(RateLimit::new(5000, 4321, reset)),
            breakers: vec![BreakerStats {
                name: "l3".into(),
                state: "open".into(),
                transitions: 3,
                consecutive_failures: 5,
                ..BreakerStats::default()
            }],
            outbox: OutboxStats {
                depth: 2,
                ..OutboxStats::default()
            },
        });
        assert_eq!(snap.rate_limit.map(|r| r.remaining), Some(4321));
        assert_eq!(snap.breakers[0].state, "open");
        assert_eq!(snap.outbox.depth, 2);
    }

    #[test]
    fn shard_count_is_a_power_of_two() {
        assert_eq!(Stats::with_shards(0).shards.len(), 1);
        assert_eq!(Stats::with_shards(5).shards.len(), 8);
        assert_eq!(Stats::with_shards(1 << 20).shards.len(), 1024);
        let n = Stats::new().shards.len();
        assert!(n.is_power_of_two());
        assert_eq!(std::mem::align_of::<Shard>(), 128);
    }

    #[test]
    fn stats_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Stats>();
        assert_send_sync::<StatsSnapshot>();
    }
}
