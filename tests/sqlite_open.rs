//! Opening the L2 database file: option limits, files of other applications, damaged files,
//! schema migrations, and the file disappearing under a running cache. No network, no sleeps.

mod support;

use std::time::Duration;

use tiercache::{Error, TieredCache};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const DAY: Duration = Duration::from_secs(24 * 3600);

// ------------------------------------------------------------------ busy timeout

#[tokio::test]
async fn a_busy_timeout_past_sqlites_limit_is_a_config_error_not_a_panic() -> TestResult {
    let dir = tempfile::tempdir()?;
    for (timeout, path) in [
        (Duration::MAX, None),
        (30 * DAY, None),
        (30 * DAY, Some(dir.path().join("cache.db"))),
    ] {
        let mut b = TieredCache::builder().sqlite_busy_timeout(timeout);
        if let Some(p) = &path {
            b = b.sqlite_path(p);
        }
        match b.build() {
            Err(Error::Config(msg)) => {
                assert!(msg.contains("sqlite_busy_timeout"), "{msg}");
                assert!(msg.contains("24.8 days"), "names the maximum: {msg}");
            }
            other => panic!("expected a config error for {timeout:?}, got {other:?}"),
        }
        if let Some(p) = &path {
            assert!(!p.exists(), "refused before the file was created");
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_busy_timeout_of_24_days_is_accepted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = TieredCache::builder()
        .sqlite_path(dir.path().join("cache.db"))
        .sqlite_busy_timeout(24 * DAY)
        .strategy(tiercache::Strategy::CacheAside)
        .build()?;
    cache.set("a", "alpha").await?;
    assert_eq!(cache.get("a").await?.as_deref(), Some(&b"alpha"[..]));
    assert_eq!(
        tiercache::tier::sqlite::MAX_BUSY_TIMEOUT,
        Duration::from_millis(i32::MAX as u64)
    );
    Ok(())
}
