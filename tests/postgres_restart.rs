//! A PostgreSQL server restart under a fleet of two caches (feature `postgres`, issue #14): no
//! cache panics or serves the old value once it is back; the write made after the restart is
//! read on the other instance, whose listener reconnects and catches up by itself.
//!
//! Restarting the server cuts every other test's connections, so this test runs only when asked
//! (`TIERCACHE_POSTGRES_RESTART=1`, set by `.ci/run` for its own step, run alone, after the other
//! PostgreSQL tests) and says on stderr that it is skipped otherwise. It restarts the server with
//! the machine's documented command (`pg_ctlcluster … main restart`, which waits until the server
//! accepts connections again). Waits are bounded polls of a condition, never fixed sleeps.
#![cfg(feature = "postgres")]

#[path = "support/pg.rs"]
mod pg;
mod support;

use std::time::Duration;

use support::FakeSource;
use tiercache::breaker::BreakerPolicy;
use tiercache::{MockClock, Strategy, TieredCache};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

const WAIT: Duration = Duration::from_secs(30);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);
const RECOVERY: Duration = Duration::from_secs(5);

/// Restarts the local server with the machine's command; `Err` names what failed.
fn restart_server() -> Result<(), String> {
    let versions = std::fs::read_dir("/etc/postgresql")
        .map_err(|e| format!("no /etc/postgresql: {e}"))?
        .filter_map(|d| d.ok().map(|d| d.file_name().to_string_lossy().into_owned()))
        .collect::<Vec<_>>();
    let version = versions.first().ok_or("no cluster in /etc/postgresql")?;
    let out = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", "restart"])
        .output()
        .map_err(|e| format!("pg_ctlcluster: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "pg_ctlcluster restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

async fn get(cache: &TieredCache, key: &str) -> Option<String> {
    match cache.get(key).await {
        Ok(v) => v.map(|b| String::from_utf8_lossy(&b).into_owned()),
        Err(e) => panic!("a read failed instead of falling back: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_loses_no_write_and_the_fleet_recovers_by_itself() -> TestResult {
    const NAME: &str = "a_server_restart_loses_no_write_and_the_fleet_recovers_by_itself";
    if std::env::var_os("TIERCACHE_POSTGRES_RESTART").is_none() {
        pg::skip(
            NAME,
            "restarting the server cuts every other test's connections: set \
             TIERCACHE_POSTGRES_RESTART=1 to run it alone (.ci/run does)",
        );
        return Ok(());
    }
    let Some(t) = pg::start(NAME).await else {
        return Ok(());
    };
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let l2_breaker = BreakerPolicy::builder()
        .failure_threshold(1)
        .base_recovery(RECOVERY)
        .max_recovery(RECOVERY)
        .jitter(0.0)
        .build()?;
    let mut caches = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let store = t
            .store()
            .heartbeat(Duration::from_secs(1))
            .connect()
            .await?;
        // Write-through: the source holds every acknowledged write, so a read that cannot
        // reach L2 during the restart still answers the truth.
        let cache = TieredCache::builder()
            .store(store.clone())
            .source(source.clone())
            .clock(clock.clone())
            .strategy(Strategy::WriteThrough)
            .ttl(Duration::from_secs(3600))
            .storage_breaker(l2_breaker.clone())
            .persist_breaker(false)
            .build()?;
        stores.push(store);
        caches.push(cache);
    }
    for store in &stores {
        pg::eventually_within(WAIT, POLL, "both listeners connected", || async move {
            store.listening()
        })
        .await;
    }
    let (a, b) = (&caches[0], &caches[1]);
    a.set("k", "v1").await?;
    assert_eq!(get(b, "k").await.as_deref(), Some("v1"));

    restart_server()?;

    // The first calls after the restart may find dead connections: the write is retried until
    // it is acknowledged (each failure is a typed error, and nothing is half done).
    let mut attempts = 0;
    loop {
        attempts += 1;
        match a.set("k", "v2").await {
            Ok(()) => break,
            Err(e) => {
                assert!(attempts < 20, "the write never went through: {e}");
                clock.advance(RECOVERY + Duration::from_millis(1));
            }
        }
    }
    assert_eq!(source.value("k").as_deref(), Some(&b"v2"[..]));
    // Both listeners reconnect by themselves; once they listen, no cache serves the old value.
    for store in &stores {
        pg::eventually_within(WAIT, POLL, "both listeners back", || async move {
            store.listening()
        })
        .await;
    }
    pg::eventually_within(
        WAIT,
        POLL,
        "the other instance reads the new value",
        || async {
            clock.advance(RECOVERY + Duration::from_millis(1));
            get(b, "k").await.as_deref() == Some("v2")
        },
    )
    .await;
    assert_eq!(get(a, "k").await.as_deref(), Some("v2"));
    // L2 works again: a write after recovery is in the shared table and read on the other.
    a.set("k2", "w").await?;
    pg::eventually_within(WAIT, POLL, "L2 holds the write after recovery", || async {
        clock.advance(RECOVERY + Duration::from_millis(1));
        b.lookup("k2")
            .await
            .ok()
            .flatten()
            .is_some_and(|l| l.value == "w" && l.tier != tiercache::Tier::L3)
    })
    .await;
    Ok(())
}
