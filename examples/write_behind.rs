//! Write-behind through an outage: writes are acknowledged while the source is down (durable in
//! the SQLite outbox), survive a restart, and are delivered — nothing lost — once it is back.
//!
//! The source is an in-process map with an outage switch (no network).
//!
//! ```text
//! cargo run --example write_behind
//! ```

mod common;

use std::time::Duration;

use common::CountingSource;
use tiercache::breaker::BreakerPolicy;
use tiercache::{Strategy, TieredCache};

fn open(db: &std::path::Path, source: &CountingSource) -> tiercache::Result<TieredCache> {
    TieredCache::builder()
        .sqlite_path(db)
        .source(source.clone())
        .strategy(Strategy::WriteBehind)
        .retry_base(Duration::from_millis(50))
        .retry_max(Duration::from_secs(1))
        // This demo delivers with explicit `flush` calls, so what each step prints is what that
        // step did (a service keeps the default: a background flusher delivers on its own).
        .background_flush(false)
        // Keep the breaker closed through this short demo's failed deliveries.
        .source_breaker(BreakerPolicy::builder().failure_threshold(50).build()?)
        .build()
}

async fn depth(cache: &TieredCache) -> tiercache::Result<u64> {
    Ok(cache.store_summary().await?.outbox_depth)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("cache.db");
    let source = CountingSource::with(&[("settings/theme", "light")]);

    println!("1. the source goes down");
    source.set_down(true);
    let cache = open(&db, &source)?;
    for (key, value) in [
        ("settings/theme", "dark"),
        ("settings/lang", "en"),
        ("settings/lang", "fr"), // a second write to one key: delivered after the first
        ("settings/tz", "UTC"),
    ] {
        cache.set(key, value).await?;
        println!("   set {key} = {value}: acknowledged");
    }
    println!("   outbox depth: {}", depth(&cache).await?);
    let report = cache.flush().await?;
    println!(
        "   flush during the outage: delivered {}, pending {} ({} keys stuck)",
        report.delivered,
        report.pending,
        report.stuck.len(),
    );
    if let Some((key, error)) = report.stuck.first() {
        println!("   e.g. {key}: {error}");
    }
    let lang = cache.get("settings/lang").await?.unwrap_or_default();
    println!(
        "   reads see the new values meanwhile: settings/lang = {}",
        String::from_utf8_lossy(&lang)
    );

    println!("\n2. the process restarts (the outbox is in the database file)");
    drop(cache);
    let cache = open(&db, &source)?;
    println!("   outbox depth after reopening: {}", depth(&cache).await?);

    println!("\n3. the source recovers; flush delivers");
    source.set_down(false);
    let report = cache.flush().await?;
    println!(
        "   delivered {} queued writes, pending {}, dead letters {}",
        report.delivered,
        report.pending,
        cache.dead_letters().await?.len()
    );
    println!("   outbox depth: {}", depth(&cache).await?);
    for key in ["settings/theme", "settings/lang", "settings/tz"] {
        println!(
            "   the source has {key} = {}",
            source.value(key).unwrap_or_default()
        );
    }
    assert_eq!(source.value("settings/lang").as_deref(), Some("fr"));
    assert_eq!(depth(&cache).await?, 0, "nothing lost, nothing left");
    cache.close().await?;
    Ok(())
}
