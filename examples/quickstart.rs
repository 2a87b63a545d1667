//! The main job in one run: a file fetched from GitHub once, then served from memory, from the
//! database after a restart, stale through a GitHub outage, and revalidated (304) on recovery.
//!
//! Runs against a loopback fake of GitHub; time is a `MockClock`, so "five minutes later" takes
//! no time.
//!
//! ```text
//! cargo run --example quickstart
//! ```

mod common;

use std::time::Duration;

use common::FakeGitHub;
use tiercache::source::github::GitHubSource;
use tiercache::{Lookup, MockClock, TieredCache};

const KEY: &str = "octo/app/config/prod.toml";
const TTL: Duration = Duration::from_secs(300);

/// A cache on the database file, reading GitHub at `base_url`, on `clock`.
fn open(db: &std::path::Path, base_url: &str, clock: &MockClock) -> tiercache::Result<TieredCache> {
    let github = GitHubSource::builder()
        .base_url(base_url)
        .anonymous()
        .clock(clock.clone())
        .timeout(Duration::from_secs(5))
        .build()?;
    TieredCache::builder()
        .sqlite_path(db)
        .source(github)
        .clock(clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(24 * 3600))
        .build()
}

fn show(step: &str, l: &Lookup, github: &FakeGitHub) {
    println!(
        "{step:<34} tier={:<2} freshness={:<28} age={:>5}s  GitHub requests so far: {}",
        l.tier,
        match l.freshness {
            tiercache::Freshness::Fresh => "fresh".to_owned(),
            tiercache::Freshness::Stale { reason } => format!("stale ({reason})"),
        },
        l.age.as_secs(),
        github.requests()
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let github = FakeGitHub::start().await;
    github.put_file(KEY, "port = 8080\nworkers = 4\n");
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("cache.db");
    let clock = MockClock::new();
    println!(
        "fake GitHub at {}, database {}\n",
        github.uri(),
        db.display()
    );

    let cache = open(&db, &github.uri(), &clock)?;
    let l = cache.lookup(KEY).await?.expect("the file exists");
    show("1. cold read: fetched from GitHub", &l, &github);
    println!("   {:?}", String::from_utf8_lossy(&l.value));
    let l = cache.lookup(KEY).await?.expect("cached");
    show("2. again: from memory", &l, &github);

    drop(cache);
    clock.advance(Duration::from_secs(60));
    let cache = open(&db, &github.uri(), &clock)?;
    let l = cache.lookup(KEY).await?.expect("cached");
    show("3. after a restart: from SQLite", &l, &github);

    github.set_down(true);
    clock.advance(TTL);
    let l = cache.lookup(KEY).await?.expect("served stale");
    show("4. GitHub down, TTL passed: stale", &l, &github);

    github.set_down(false);
    let before = github.not_modified();
    let l = cache.lookup(KEY).await?.expect("revalidated");
    show("5. GitHub back: revalidated", &l, &github);
    println!(
        "   GitHub answered {} x 304 Not Modified: the bytes did not move",
        github.not_modified() - before
    );

    println!(
        "\nstats of the cache opened after the restart:\n{}",
        cache.stats().await
    );
    Ok(())
}
