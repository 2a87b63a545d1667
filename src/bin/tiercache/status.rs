//! What the cache holds and whether it works: `stats` and `health`.

use crate::config::Settings;
use crate::output;
use crate::{open, read_strategy, Failure, EXIT_RUNTIME};

pub(crate) async fn stats(s: &Settings, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s))?;
    let summary = cache
        .store_summary()
        .await
        .map_err(|e| Failure::from_error(&e))?;
    let health = cache.health().await;
    let breaker = |t: &tiercache::health::TierHealth| {
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
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now.saturating_sub(t)
        }),
        l3_breaker: breaker(&health.l3),
        l2_breaker: breaker(&health.l2),
    };
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print!("{report}");
    }
    Ok(0)
}

pub(crate) async fn health(s: &Settings, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s))?;
    let report = cache.health().await;
    if json {
        println!("{}", serde_json::to_value(&report).unwrap_or_default());
    } else {
        print!("{report}");
    }
    let unhealthy = report.status == tiercache::HealthStatus::Unhealthy;
    Ok(if unhealthy { EXIT_RUNTIME } else { 0 })
}
