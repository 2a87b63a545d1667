//! What the cache holds and whether it works: `stats` and `health`.

use std::time::SystemTime;

use serde_json::json;
use tiercache::breaker::{CircuitState, Forced};
use tiercache::health::TierHealth;
use tiercache::{describe_at, TieredCache};

use crate::config::Settings;
use crate::output::{self, RateLimitReport};
use crate::{open, read_strategy, Failure, EXIT_RUNTIME};

/// Why a tier's breaker is not closed, and until when: `"5 consecutive failures, last error:
/// …; next try in 42s (at 14:03:12 UTC)"`. `None` when closed.
fn breaker_detail(t: &TierHealth, now: SystemTime) -> Option<String> {
    let b = t.breaker.as_ref()?;
    if b.state == CircuitState::Closed {
        return None;
    }
    let mut why = match (b.forced, b.open_until) {
        (Some(Forced::Open), _) => "forced open (`reset` closes it)".to_owned(),
        (_, Some(until)) => format!(
            "the rate limit is spent; resets {}",
            describe_at(until, now)
        ),
        _ => format!("{} consecutive failure(s)", b.consecutive_failures),
    };
    if b.open_until.is_none() {
        if let Some(e) = &t.last_error {
            why.push_str(&format!(", last error: {e}"));
        }
        if let Some(next) = b.next_attempt {
            why.push_str(&format!("; next try {}", describe_at(next, now)));
        }
    }
    Some(why)
}

fn rate_limit(cache: &TieredCache, now: SystemTime) -> Option<RateLimitReport> {
    cache.rate_limit().map(|r| RateLimitReport {
        limit: r.limit,
        remaining: r.remaining,
        reset: humantime::format_rfc3339_seconds(r.reset).to_string(),
        reset_text: describe_at(r.reset, now),
    })
}

pub(crate) async fn stats(s: &Settings, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s)).await?;
    let summary = cache
        .store_summary()
        .await
        .map_err(|e| Failure::from_error(&e))?;
    let health = cache.health().await;
    let now = SystemTime::now();
    let breaker = |t: &TierHealth| {
        t.breaker
            .as_ref()
            .map_or("unknown", |b| b.state.as_str())
            .to_owned()
    };
    let report = output::StatsReport {
        db: s.db.display().to_string(),
        entries: summary.entries,
        bytes: summary.bytes,
        stale_entries: summary.stale_entries,
        negative_entries: summary.negative_entries,
        outbox_depth: summary.outbox_depth,
        dead_letters: summary.dead_letters,
        oldest_pending_age_ms: summary.oldest_pending_ms.map(|t| {
            let now = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now.saturating_sub(t)
        }),
        l3_breaker: breaker(&health.l3),
        l3_breaker_detail: breaker_detail(&health.l3, now),
        l3_breaker_until: health
            .l3
            .next_attempt
            .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        l2_breaker: breaker(&health.l2),
        rate_limit: rate_limit(&cache, now),
    };
    if json {
        output::print(format!(
            "{}\n",
            serde_json::to_string(&report).unwrap_or_default()
        ))
    } else {
        output::print(report.to_string())
    }?;
    Ok(0)
}

pub(crate) async fn health(s: &Settings, json: bool, probe: Option<&str>) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s)).await?;
    let probed = match probe {
        Some(key) => Some(cache.probe_source(key).await),
        None => None,
    };
    let report = cache.health().await;
    let unhealthy = report.status == tiercache::HealthStatus::Unhealthy;
    let probe_failed = matches!(probed, Some(Err(_)));
    if json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        if let Some(p) = &probed {
            v["probe"] = match p {
                Ok(took) => json!({
                    "ok": true,
                    "key": probe,
                    "latency_ms": took.as_secs_f64() * 1e3,
                }),
                Err(e) => json!({
                    "ok": false,
                    "key": probe,
                    "error": e.report(),
                    "kind": e.kind(),
                }),
            };
        }
        if let Some(r) = rate_limit(&cache, SystemTime::now()) {
            v["rate_limit"] = serde_json::to_value(&r).unwrap_or_default();
        }
        output::print(format!("{v}\n"))?;
    } else {
        let mut text = report.to_string();
        match &probed {
            Some(Ok(took)) => text.push_str(&format!(
                "probe: GitHub answered in {}ms\n",
                took.as_millis()
            )),
            Some(Err(e)) => {
                text.push_str(&format!("probe: failed ({}): {}\n", e.kind(), e.report()))
            }
            None => {}
        }
        if let Some(r) = rate_limit(&cache, SystemTime::now()) {
            text.push_str(&format!(
                "rate limit: {}/{} remaining; resets {}\n",
                r.remaining, r.limit, r.reset_text
            ));
        }
        output::print(text)?;
    }
    Ok(if unhealthy || probe_failed {
        EXIT_RUNTIME
    } else {
        0
    })
}
