//! What the commands print: JSON objects for lookups and errors, the stats report.

use std::fmt;

use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};
use tiercache::{Freshness, Lookup, StaleReason};

use crate::duration::human;

/// A value served for a key, with its effective freshness.
#[derive(Debug)]
pub(crate) struct Served<'a> {
    pub(crate) key: &'a str,
    pub(crate) lookup: Lookup,
    pub(crate) stale: Option<StaleReason>,
}

impl<'a> Served<'a> {
    /// `event_stale` is the reason from a stale-serve event for this key, if one came.
    pub(crate) fn new(key: &'a str, lookup: Lookup) -> Self {
        let stale = match lookup.freshness {
            Freshness::Stale { reason } => Some(reason),
            Freshness::Fresh => None,
        };
        Self { key, lookup, stale }
    }

    /// Tells stderr that the copy is stale, and why.
    pub(crate) fn warn_if_stale(&self) {
        if let Some(reason) = self.stale {
            eprintln!(
                "tiercache: warning: served a stale copy of {} from {} (age {}): {} ({reason})",
                self.key,
                self.lookup.tier,
                human(self.lookup.age),
                explain(reason)
            );
        }
    }

    /// The JSON object for this value.
    pub(crate) fn to_json(&self) -> Value {
        let l = &self.lookup;
        let mut v = json!({
            "key": self.key,
            "tier": l.tier.as_str(),
            "freshness": if self.stale.is_some() { "stale" } else { "fresh" },
            "stale_reason": self.stale.map(StaleReason::as_str),
            "age_ms": u64::try_from(l.age.as_millis()).unwrap_or(u64::MAX),
            "etag": l.validator,
            "size": l.value.len(),
        });
        match std::str::from_utf8(&l.value) {
            Ok(text) => v["content"] = Value::String(text.to_owned()),
            Err(_) => {
                v["content_base64"] =
                    Value::String(base64::engine::general_purpose::STANDARD.encode(&l.value))
            }
        }
        v
    }
}

/// Why the source could not answer, in words.
fn explain(reason: StaleReason) -> &'static str {
    match reason {
        StaleReason::SourceError => "GitHub answered with an error",
        StaleReason::Timeout => "GitHub did not answer in time",
        StaleReason::RateLimited => "the GitHub rate limit is spent",
        StaleReason::CircuitOpen => "GitHub failed recently and is not being called (breaker open)",
        StaleReason::Offline => "offline mode is on",
        _ => "GitHub could not answer",
    }
}

/// The JSON object for a key that could not be served.
pub(crate) fn error_json(key: &str, message: &str, not_found: bool) -> Value {
    let mut v = json!({ "key": key, "error": message });
    if not_found {
        v["not_found"] = Value::Bool(true);
    }
    v
}

/// `tiercache stats`.
#[derive(Debug, Serialize)]
pub(crate) struct StatsReport {
    pub(crate) db: String,
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
    pub(crate) stale_entries: u64,
    pub(crate) negative_entries: u64,
    pub(crate) outbox_depth: u64,
    pub(crate) dead_letters: u64,
    pub(crate) oldest_pending_age_ms: Option<u64>,
    pub(crate) l3_breaker: String,
    pub(crate) l2_breaker: String,
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for StatsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "database        {}", self.db)?;
        writeln!(
            f,
            "entries         {} ({} stale, {} not-found markers)",
            self.entries, self.stale_entries, self.negative_entries
        )?;
        writeln!(f, "bytes           {}", bytes(self.bytes))?;
        write!(f, "outbox          {} pending", self.outbox_depth)?;
        if let Some(age) = self.oldest_pending_age_ms {
            write!(
                f,
                " (oldest {})",
                human(std::time::Duration::from_millis(age))
            )?;
        }
        writeln!(f)?;
        writeln!(f, "dead letters    {}", self.dead_letters)?;
        writeln!(f, "GitHub breaker  {}", self.l3_breaker)?;
        writeln!(f, "L2 breaker      {}", self.l2_breaker)
    }
}
