//! The Prometheus text exposition format (version 0.0.4).

use std::fmt::Write;

use super::snapshot::StatsSnapshot;
use crate::clock::to_millis;

/// The states a breaker reports, each exported as a 0/1 gauge.
const BREAKER_STATES: [&str; 3] = ["closed", "open", "half_open"];

/// Quantiles exported for each latency summary.
const QUANTILES: [&str; 4] = ["0.5", "0.9", "0.99", "0.999"];

impl StatsSnapshot {
    /// The snapshot in the [Prometheus text exposition
    /// format](https://prometheus.io/docs/instrumenting/exposition_formats/), every metric with
    /// `# HELP` and `# TYPE` lines, names prefixed `tiercache_`:
    ///
    /// | metric | type | labels |
    /// |---|---|---|
    /// | `tiercache_hits_total`, `_misses_total`, `_errors_total` | counter | `tier` |
    /// | `tiercache_latency_microseconds` (+ `_sum`, `_count`) | summary | `tier`, `op`, `quantile` |
    /// | `tiercache_stale_served_total` | counter | `reason` |
    /// | `tiercache_negative_hits_total`, `_coalesced_waiters_total`, `_decode_errors_total` | counter | |
    /// | `tiercache_source_calls_total` | counter | `outcome` |
    /// | `tiercache_rate_limit_limit`, `_remaining`, `_reset_timestamp_seconds` | gauge | |
    /// | `tiercache_breaker_state` (1 for the current state, else 0) | gauge | `name`, `state` |
    /// | `tiercache_breaker_transitions_total` | counter | `name` |
    /// | `tiercache_breaker_consecutive_failures` | gauge | `name` |
    /// | `tiercache_outbox_depth`, `_oldest_pending_age_seconds`, `_dead_letters` | gauge | |
    /// | `tiercache_outbox_delivered_total`, `_retries_total` | counter | |
    ///
    /// Latency quantiles are 0.5, 0.9, 0.99 and 0.999, since the last reset (not a sliding
    /// window), in microseconds. Rate-limit gauges appear only once the source reported a budget,
    /// the outbox age only while something waits.
    pub fn to_prometheus(&self) -> String {
        let mut out = Exposition::default();

        for (name, help, get) in [
            (
                "tiercache_hits_total",
                "Reads answered by the tier.",
                (|t| t.hits) as fn(&super::TierStats) -> u64,
            ),
            (
                "tiercache_misses_total",
                "Reads the tier was asked and did not have.",
                |t| t.misses,
            ),
            (
                "tiercache_errors_total",
                "Times the tier failed to answer.",
                |t| t.errors,
            ),
        ] {
            out.header(name, help, "counter");
            for (tier, t) in self.tiers() {
                out.sample(name, &[("tier", tier.as_str())], get(t) as f64);
            }
        }

        let name = "tiercache_latency_microseconds";
        out.header(
            name,
            "Latency of operations, by the tier that served them, in microseconds (L1 gets sampled).",
            "summary",
        );
        for (tier, t) in self.tiers() {
            for (op, l) in &t.latency {
                let labels = [("tier", tier.as_str()), ("op", op.as_str())];
                for (q, v) in QUANTILES.iter().zip([l.p50, l.p90, l.p99, l.p999]) {
                    out.sample(name, &[labels[0], labels[1], ("quantile", q)], v);
                }
                out.sample(&format!("{name}_sum"), &labels, l.sum);
                out.sample(&format!("{name}_count"), &labels, l.count as f64);
            }
        }

        let name = "tiercache_stale_served_total";
        out.header(name, "Stale copies served, by reason.", "counter");
        for (reason, n) in &self.stale_served {
            out.sample(name, &[("reason", reason)], *n as f64);
        }

        for (name, help, v) in [
            (
                "tiercache_negative_hits_total",
                "Reads answered by a cached not-found.",
                self.negative_hits,
            ),
            (
                "tiercache_coalesced_waiters_total",
                "Reads that waited on another caller's source call.",
                self.coalesced_waiters,
            ),
            (
                "tiercache_decode_errors_total",
                "Stored entries that could not be decoded.",
                self.decode_errors,
            ),
        ] {
            out.header(name, help, "counter");
            out.sample(name, &[], v as f64);
        }

        let name = "tiercache_source_calls_total";
        out.header(name, "Calls to the source, by outcome.", "counter");
        for (outcome, n) in &self.source_calls {
            out.sample(name, &[("outcome", outcome.as_str())], *n as f64);
        }

        if let Some(rl) = &self.rate_limit {
            for (name, help, v) in [
                (
                    "tiercache_rate_limit_limit",
                    "Source requests allowed per rate-limit window.",
                    rl.limit as f64,
                ),
                (
                    "tiercache_rate_limit_remaining",
                    "Source requests left in the rate-limit window.",
                    rl.remaining as f64,
                ),
                (
                    "tiercache_rate_limit_reset_timestamp_seconds",
                    "When the rate-limit window resets, seconds since the UNIX epoch.",
                    to_millis(rl.reset) as f64 / 1_000.0,
                ),
            ] {
                out.header(name, help, "gauge");
                out.sample(name, &[], v);
            }
        }

        if !self.breakers.is_empty() {
            let name = "tiercache_breaker_state";
            out.header(
                name,
                "Circuit breaker state: 1 for the current state, 0 for the others.",
                "gauge",
            );
            for b in &self.breakers {
                let known = BREAKER_STATES.contains(&b.state.as_str());
                let extra = (!known).then_some(b.state.as_str());
                for state in BREAKER_STATES.iter().copied().chain(extra) {
                    let v = if state == b.state { 1.0 } else { 0.0 };
                    out.sample(name, &[("name", &b.name), ("state", state)], v);
                }
            }
            let name = "tiercache_breaker_transitions_total";
            out.header(name, "Circuit breaker state changes.", "counter");
            for b in &self.breakers {
                out.sample(name, &[("name", &b.name)], b.transitions as f64);
            }
            let name = "tiercache_breaker_consecutive_failures";
            out.header(name, "Failures since the breaker's last success.", "gauge");
            for b in &self.breakers {
                out.sample(
                    name,
                    &[("name", &b.name)],
                    f64::from(b.consecutive_failures),
                );
            }
        }

        let o = &self.outbox;
        out.header(
            "tiercache_outbox_depth",
            "Writes waiting to be pushed to the source.",
            "gauge",
        );
        out.sample("tiercache_outbox_depth", &[], o.depth as f64);
        if let Some(age) = o.oldest_pending_age_ms {
            let name = "tiercache_outbox_oldest_pending_age_seconds";
            out.header(name, "Age of the oldest waiting write, seconds.", "gauge");
            out.sample(name, &[], age as f64 / 1_000.0);
        }
        for (name, help, kind, v) in [
            (
                "tiercache_outbox_delivered_total",
                "Writes the source accepted.",
                "counter",
                o.delivered,
            ),
            (
                "tiercache_outbox_retries_total",
                "Outbox pushes retried after a failure.",
                "counter",
                o.retries,
            ),
            (
                "tiercache_outbox_dead_letters",
                "Writes parked after repeated failures.",
                "gauge",
                o.dead_letters,
            ),
        ] {
            out.header(name, help, kind);
            out.sample(name, &[], v as f64);
        }

        out.0
    }
}

#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        self.0.push(' ');
        push_value(&mut self.0, value);
        self.0.push('\n');
    }
}

/// A sample value: integers without a fraction, `+Inf`/`-Inf`/`NaN` spelled as Prometheus does.
fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Label values escape `\`, `"` and newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text escapes `\` and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::stats::sample_snapshot;

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// Parses `{k="v",...}` (with escapes), or `None` when malformed.
    fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
        let mut labels = BTreeMap::new();
        let mut rest = s.strip_prefix('{')?.strip_suffix('}')?;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"")?;
            if !is_name(key) {
                return None;
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()? {
                        (_, 'n') => value.push('\n'),
                        (_, c @ ('\\' | '"')) => value.push(c),
                        _ => return None,
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.to_owned(), value);
            rest = &after[end + 1..];
            rest = match rest.strip_prefix(',') {
                Some(r) => r,
                None if rest.is_empty() => rest,
                None => return None,
            };
        }
        Some(labels)
    }

    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// Checks every line is a HELP, a TYPE or a sample of a declared metric, and returns the samples.
    fn parse(text: &str) -> Vec<Sample> {
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = BTreeSet::new();
        let mut samples = Vec::new();
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has text");
                assert!(is_name(name) && !help.is_empty(), "{line}");
                assert!(helped.insert(name.to_owned()), "HELP twice: {line}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a type");
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                assert!(["counter", "gauge", "summary"].contains(&kind), "{line}");
                assert!(
                    typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "{line}"
                );
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
                let (series, value) = line.rsplit_once(' ').expect("name and value");
                let (name, labels) = match series.find('{') {
                    Some(i) => (&series[..i], parse_labels(&series[i..]).expect(line)),
                    None => (series, BTreeMap::new()),
                };
                assert!(is_name(name), "{line}");
                let family = ["_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| typed.get(*f).is_some_and(|k| k == "summary"))
                    })
                    .unwrap_or(name);
                assert!(typed.contains_key(family), "sample before TYPE: {line}");
                let value: f64 = value.parse().expect(line);
                samples.push(Sample {
                    name: name.to_owned(),
                    labels,
                    value,
                });
            }
        }
        samples
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn exposition_is_well_formed_and_complete() {
        let text = sample_snapshot().to_prometheus();
        let samples = parse(&text);
        let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);

        assert_eq!(v("tiercache_hits_total", &[("tier", "l1")]), Some(9.0));
        assert_eq!(v("tiercache_misses_total", &[("tier", "l1")]), Some(1.0));
        assert_eq!(v("tiercache_errors_total", &[("tier", "l3")]), Some(1.0));
        let lat = "tiercache_latency_microseconds";
        for q in QUANTILES {
            let got = v(lat, &[("tier", "l2"), ("op", "get"), ("quantile", q)]);
            assert!(got.is_some_and(|x| (x - 80.0).abs() < 1.0), "{q}: {got:?}");
        }
        assert_eq!(
            v(&format!("{lat}_count"), &[("tier", "l2"), ("op", "get")]),
            Some(1.0)
        );
        assert_eq!(
            v(&format!("{lat}_sum"), &[("tier", "l2"), ("op", "get")]),
            Some(80.0)
        );
        assert_eq!(
            v(&format!("{lat}_count"), &[("tier", "l1"), ("op", "set")]),
            None
        );
        assert_eq!(
            v(
                "tiercache_stale_served_total",
                &[("reason", "rate_limited")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v("tiercache_stale_served_total", &[("reason", "offline")]),
            Some(0.0)
        );
        assert_eq!(
            v(
                "tiercache_source_calls_total",
                &[("outcome", "not_modified")]
            ),
            Some(1.0)
        );
        assert_eq!(v("tiercache_negative_hits_total", &[]), Some(1.0));
        assert_eq!(v("tiercache_rate_limit_remaining", &[]), Some(4990.0));
        assert_eq!(
            v("tiercache_rate_limit_reset_timestamp_seconds", &[]),
            Some(1_767_225_600.0)
        );
        assert_eq!(
            v(
                "tiercache_breaker_state",
                &[("name", "l3"), ("state", "half_open")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "tiercache_breaker_state",
                &[("name", "l3"), ("state", "open")]
            ),
            Some(0.0)
        );
        assert_eq!(
            v(
                "tiercache_breaker_state",
                &[("name", "l2"), ("state", "closed")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v("tiercache_breaker_transitions_total", &[("name", "l3")]),
            Some(2.0)
        );
        assert_eq!(v("tiercache_outbox_depth", &[]), Some(3.0));
        assert_eq!(
            v("tiercache_outbox_oldest_pending_age_seconds", &[]),
            Some(1.5)
        );
        assert_eq!(v("tiercache_outbox_dead_letters", &[]), Some(1.0));
        assert_eq!(v("tiercache_outbox_retries_total", &[]), Some(4.0));
        assert!(text.contains("# TYPE tiercache_latency_microseconds summary\n"));
        assert!(text.contains("# TYPE tiercache_hits_total counter\n"));
    }

    #[test]
    fn an_empty_snapshot_is_well_formed() {
        let snap = crate::stats::Stats::disabled().snapshot(Default::default());
        let samples = parse(&snap.to_prometheus());
        assert!(samples.iter().all(|s| s.value == 0.0));
        assert!(!samples
            .iter()
            .any(|s| s.name.starts_with("tiercache_rate_limit")));
        assert!(!samples
            .iter()
            .any(|s| s.name.starts_with("tiercache_breaker")));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut snap = sample_snapshot();
        snap.breakers[0].name = "a\"b\\c\nd".into();
        snap.breakers[0].state = "weird".into();
        let text = snap.to_prometheus();
        assert!(text.contains(r#"name="a\"b\\c\nd""#), "{text}");
        let samples = parse(&text);
        let name = "a\"b\\c\nd";
        assert_eq!(
            value(
                &samples,
                "tiercache_breaker_state",
                &[("name", name), ("state", "weird")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &samples,
                "tiercache_breaker_state",
                &[("name", name), ("state", "closed")]
            ),
            Some(0.0)
        );
    }

    #[test]
    fn values_are_spelled_as_prometheus_expects() {
        let s = |v: f64| {
            let mut out = String::new();
            push_value(&mut out, v);
            out
        };
        assert_eq!(s(3.0), "3");
        assert_eq!(s(0.25), "0.25");
        assert_eq!(s(f64::INFINITY), "+Inf");
        assert_eq!(s(f64::NEG_INFINITY), "-Inf");
        assert_eq!(s(f64::NAN), "NaN");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }
}
