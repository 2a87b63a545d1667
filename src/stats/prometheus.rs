//! The Prometheus text exposition of a [`StatsSnapshot`], encoded by the official
//! `prometheus-client` crate (a [`Collector`] over the snapshot; its text encoder writes the
//! lines, escapes labels and appends the `_total` and unit suffixes).

use std::collections::HashMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{StatsSnapshot, TierStats, LATENCY_BUCKETS_SECONDS};
use crate::clock::to_millis;

/// The states a breaker reports, each exported as its own 0/1 series.
const BREAKER_STATES: [&str; 3] = ["closed", "open", "half_open"];

/// The `Content-Type` of what [`StatsSnapshot::to_prometheus`] returns (text format 0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl StatsSnapshot {
    /// The snapshot in the Prometheus text exposition format (version 0.0.4; serve it with
    /// [`PROMETHEUS_CONTENT_TYPE`](crate::stats::PROMETHEUS_CONTENT_TYPE)), encoded by the
    /// `prometheus-client` crate. Names are prefixed `tiercache_`; durations are in seconds.
    ///
    /// | metric | type | labels |
    /// |---|---|---|
    /// | `tiercache_hits_total`, `_misses_total`, `_errors_total` | counter | `tier` |
    /// | `tiercache_latency_seconds` (`_bucket`, `_sum`, `_count`) | histogram | `tier`, `op` |
    /// | `tiercache_stale_served_total` | counter | `reason` |
    /// | `tiercache_negative_hits_total`, `_coalesced_waiters_total`, `_decode_errors_total` | counter | |
    /// | `tiercache_source_calls_total` (calls sent) | counter | `outcome` |
    /// | `tiercache_source_calls_refused_total` (never sent) | counter | |
    /// | `tiercache_requests_sent_total`, `_budget_spent_total` | counter | `kind` |
    /// | `tiercache_requests_saved_total` | counter | `kind`, `reason` (`not_modified`, `budget`, `deduplicated`) |
    /// | `tiercache_rate_limit_limit`, `_remaining`, `_reset_timestamp_seconds` | gauge | |
    /// | `tiercache_breaker_state` (1 for the current state, else 0) | gauge | `name`, `state` |
    /// | `tiercache_breaker_transitions_total` | counter | `name` |
    /// | `tiercache_breaker_consecutive_failures` | gauge | `name` |
    /// | `tiercache_outbox_depth`, `_oldest_pending_age_seconds`, `_dead_letters` | gauge | |
    /// | `tiercache_outbox_delivered_total`, `_retries_total` | counter | |
    ///
    /// The latency histogram is each tier's own work (see [`TierStats::latency`]); its buckets
    /// are [`LATENCY_BUCKETS_SECONDS`](crate::stats::LATENCY_BUCKETS_SECONDS), filled from the
    /// recorder's HdrHistogram (so a sample within 1% of a bound may land in the next bucket);
    /// `_sum` and `_count` are exact.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// let cache = tiercache::TieredCache::builder().build()?;
    /// let text = cache.stats().await.to_prometheus();
    /// assert!(text.contains("# TYPE tiercache_hits_total counter"));
    /// assert!(text.contains("tiercache_hits_total{tier=\"l1\"} 0"));
    /// # Ok(()) }
    /// ```
    pub fn to_prometheus(&self) -> String {
        let mut registry = Registry::with_prefix("tiercache");
        registry.register_collector(Box::new(Exposition(self.clone())));
        let mut out = String::new();
        // Writing into a `String` cannot fail, and the collector's own encoding returns only
        // the writer's errors.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// The snapshot as a collector: encoded once, when the registry is.
#[derive(Debug)]
struct Exposition(StatsSnapshot);

type Fmt = Result<(), std::fmt::Error>;

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Fmt {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: f64,
) -> Fmt {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

/// One counter family: a series per label value.
fn counters<'a>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'a str, u64)>,
) -> Fmt {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in series {
        ConstCounter::new(n).encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Fmt {
        let s = &self.0;
        let tiers = s.tiers();
        for (name, help, get) in [
            (
                "hits",
                "Reads the tier answered fresh (for L3: values and 304s).",
                (|t| t.hits) as fn(&TierStats) -> u64,
            ),
            (
                "misses",
                "Reads the tier was asked and did not have fresh.",
                |t| t.misses,
            ),
            ("errors", "Times the tier failed to answer.", |t| t.errors),
        ] {
            let series = tiers.iter().map(|(tier, t)| (tier.as_str(), get(t)));
            counters(&mut enc, name, help, "tier", series)?;
        }

        let mut family = enc.encode_descriptor(
            "latency",
            "Latency of each tier's own work, by operation (L1 get hits sampled).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (tier, t) in tiers {
            for (op, l) in &t.latency {
                let mut buckets = Vec::with_capacity(LATENCY_BUCKETS_SECONDS.len());
                for (bound, n) in LATENCY_BUCKETS_SECONDS.iter().zip(l.buckets) {
                    buckets.push((*bound, n));
                }
                let labels = [("tier", tier.as_str()), ("op", op.as_str())];
                family.encode_family(&labels)?.encode_histogram(
                    l.sum / 1e6,
                    l.count,
                    &buckets,
                    None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
                )?;
            }
        }

        let series = s.stale_served.iter().map(|(r, n)| (*r, *n));
        counters(
            &mut enc,
            "stale_served",
            "Stale copies served, by reason.",
            "reason",
            series,
        )?;
        counter(
            &mut enc,
            "negative_hits",
            "Reads answered from L1 or L2 by a cached not-found.",
            s.negative_hits,
        )?;
        counter(
            &mut enc,
            "coalesced_waiters",
            "Reads that waited on another caller's source call.",
            s.coalesced_waiters,
        )?;
        counter(
            &mut enc,
            "decode_errors",
            "Stored entries that could not be decoded.",
            s.decode_errors,
        )?;
        let series = s.source_calls.iter().map(|(o, n)| (o.as_str(), *n));
        counters(
            &mut enc,
            "source_calls",
            "Calls sent to the source, by outcome.",
            "outcome",
            series,
        )?;
        counter(
            &mut enc,
            "source_calls_refused",
            "Source calls refused before they were sent (breaker open, budget spent).",
            s.source_calls_refused,
        )?;

        let series = s.requests.iter().map(|(k, r)| (k.as_str(), r.sent));
        counters(
            &mut enc,
            "requests_sent",
            "Requests sent to the source, by why they were made.",
            "kind",
            series,
        )?;
        let mut family = enc.encode_descriptor(
            "requests_saved",
            "Requests saved: answered 304, skipped at the budget reserve, or deduplicated.",
            None,
            MetricType::Counter,
        )?;
        for (kind, r) in &s.requests {
            for (reason, n) in [
                ("not_modified", r.not_modified),
                ("budget", r.skipped_budget),
                ("deduplicated", r.deduplicated),
            ] {
                let labels = [("kind", kind.as_str()), ("reason", reason)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        let series = s.requests.iter().map(|(k, r)| (k.as_str(), r.budget_spent));
        counters(
            &mut enc,
            "budget_spent",
            "Rate-limit budget spent, by request kind (the drop of the reported remaining).",
            "kind",
            series,
        )?;

        if let Some(rl) = &s.rate_limit {
            gauge(
                &mut enc,
                "rate_limit_limit",
                "Source requests allowed per rate-limit window.",
                None,
                rl.limit as f64,
            )?;
            gauge(
                &mut enc,
                "rate_limit_remaining",
                "Source requests left in the rate-limit window.",
                None,
                rl.remaining as f64,
            )?;
            let reset = to_millis(rl.reset) as f64 / 1_000.0;
            gauge(
                &mut enc,
                "rate_limit_reset_timestamp",
                "When the rate-limit window resets, seconds since the UNIX epoch.",
                Some(&Unit::Seconds),
                reset,
            )?;
        }

        if !s.breakers.is_empty() {
            let mut family = enc.encode_descriptor(
                "breaker_state",
                "Circuit breaker state: 1 for the current state, 0 for the others.",
                None,
                MetricType::Gauge,
            )?;
            for b in &s.breakers {
                let known = BREAKER_STATES.contains(&b.state.as_str());
                let extra = (!known).then_some(b.state.as_str());
                for state in BREAKER_STATES.iter().copied().chain(extra) {
                    let v = i64::from(state == b.state);
                    let labels = [("name", b.name.as_str()), ("state", state)];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
            let series = s.breakers.iter().map(|b| (b.name.as_str(), b.transitions));
            counters(
                &mut enc,
                "breaker_transitions",
                "Circuit breaker state changes.",
                "name",
                series,
            )?;
            let mut family = enc.encode_descriptor(
                "breaker_consecutive_failures",
                "Failures since the breaker's last success.",
                None,
                MetricType::Gauge,
            )?;
            for b in &s.breakers {
                let g = ConstGauge::new(i64::from(b.consecutive_failures));
                g.encode(family.encode_family(&[("name", b.name.as_str())])?)?;
            }
        }

        let o = &s.outbox;
        gauge(
            &mut enc,
            "outbox_depth",
            "Writes waiting to be pushed to the source.",
            None,
            o.depth as f64,
        )?;
        if let Some(age) = o.oldest_pending_age_ms {
            gauge(
                &mut enc,
                "outbox_oldest_pending_age",
                "Age of the oldest waiting write.",
                Some(&Unit::Seconds),
                age as f64 / 1_000.0,
            )?;
        }
        counter(
            &mut enc,
            "outbox_delivered",
            "Writes the source accepted.",
            o.delivered,
        )?;
        counter(
            &mut enc,
            "outbox_retries",
            "Outbox pushes retried after a failure.",
            o.retries,
        )?;
        gauge(
            &mut enc,
            "outbox_dead_letters",
            "Writes parked after repeated failures.",
            None,
            o.dead_letters as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::stats::sample_snapshot;

    /// The value of the sample line `series value` (`series` being `name{labels}`).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn exposition_has_the_documented_names_in_seconds() {
        let text = sample_snapshot().to_prometheus();
        let v = |s: &str| value(&text, s);
        assert_eq!(v("tiercache_hits_total{tier=\"l1\"}"), Some(9.0), "{text}");
        assert_eq!(v("tiercache_errors_total{tier=\"l3\"}"), Some(1.0));
        assert!(
            text.contains("# TYPE tiercache_latency_seconds histogram"),
            "{text}"
        );
        // 120 ms of L3 get: in the 0.5 s bucket, not the 0.1 s one; sum in seconds.
        let l3 = "tiercache_latency_seconds_bucket{tier=\"l3\",op=\"get\",le=";
        assert_eq!(v(&format!("{l3}\"0.1\"}}")), Some(0.0), "{text}");
        assert_eq!(v(&format!("{l3}\"0.5\"}}")), Some(1.0));
        assert_eq!(v(&format!("{l3}\"+Inf\"}}")), Some(1.0));
        let sum = v("tiercache_latency_seconds_sum{tier=\"l3\",op=\"get\"}").unwrap_or(0.0);
        assert!((sum - 0.12).abs() < 1e-9, "{sum}");
        assert_eq!(
            v("tiercache_stale_served_total{reason=\"rate_limited\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tiercache_source_calls_total{outcome=\"not_modified\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tiercache_requests_sent_total{kind=\"refresh_ahead\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tiercache_requests_saved_total{kind=\"warm\",reason=\"budget\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tiercache_requests_saved_total{kind=\"refresh_ahead\",reason=\"not_modified\"}"),
            Some(1.0)
        );
        assert_eq!(v("tiercache_budget_spent_total{kind=\"read\"}"), Some(2.0));
        assert_eq!(v("tiercache_rate_limit_remaining"), Some(4990.0));
        assert_eq!(
            v("tiercache_rate_limit_reset_timestamp_seconds"),
            Some(1_767_225_600.0)
        );
        assert_eq!(
            v("tiercache_breaker_state{name=\"l3\",state=\"half_open\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tiercache_breaker_state{name=\"l3\",state=\"open\"}"),
            Some(0.0)
        );
        assert_eq!(v("tiercache_outbox_oldest_pending_age_seconds"), Some(1.5));
        assert_eq!(v("tiercache_outbox_dead_letters"), Some(1.0));
        assert!(!text.contains("microseconds"));
    }
}
