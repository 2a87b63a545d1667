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

/// The JSON object for a key that could not be served: `key`, `error` (the message), `kind`
/// (stable: [`tiercache::Error::kind`]'s names) and, for compatibility, `not_found: true` when
/// the kind is `not_found`.
pub(crate) fn error_json(key: &str, message: &str, kind: &str) -> Value {
    let mut v = json!({ "key": key, "error": message, "kind": kind });
    if kind == "not_found" {
        v["not_found"] = Value::Bool(true);
    }
    v
}

/// Writes `text` to stdout. A reader that went away (`tiercache get X | head -c1`) ends the
/// command quietly, as coreutils and `gh` do.
pub(crate) fn print(text: impl AsRef<[u8]>) -> Result<(), crate::Failure> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_ref())
        .and_then(|()| out.flush())
        .map_err(crate::Failure::stdout)
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
    /// Why the GitHub breaker is not closed, and until when (`None` when closed).
    pub(crate) l3_breaker_detail: Option<String>,
    /// When the GitHub breaker lets the next call through (RFC 3339), if it is open.
    pub(crate) l3_breaker_until: Option<String>,
    pub(crate) l2_breaker: String,
    /// GitHub's rate-limit budget, when this process saw one (`health --probe KEY` makes a
    /// request).
    pub(crate) rate_limit: Option<RateLimitReport>,
}

/// The rate-limit budget in `stats`.
#[derive(Debug, Serialize)]
pub(crate) struct RateLimitReport {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// RFC 3339.
    pub(crate) reset: String,
    /// "in 42s (at 14:03:12 UTC)".
    #[serde(skip)]
    pub(crate) reset_text: String,
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
        write!(f, "GitHub breaker  {}", self.l3_breaker)?;
        if let Some(d) = &self.l3_breaker_detail {
            write!(f, ": {d}")?;
        }
        writeln!(f)?;
        writeln!(f, "L2 breaker      {}", self.l2_breaker)?;
        match &self.rate_limit {
            Some(r) => writeln!(
                f,
                "rate limit      {}/{} remaining; resets {}",
                r.remaining, r.limit, r.reset_text
            ),
            None => writeln!(
                f,
                "rate limit      unknown: no GitHub answer seen by this command \
                 (`tiercache health --probe KEY` asks)"
            ),
        }
    }
}
