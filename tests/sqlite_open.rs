//! Opening the L2 database file: option limits, files of other applications, damaged files,
//! schema migrations, and the file disappearing under a running cache. No network, no sleeps.

mod support;

use std::path::{Path, PathBuf};
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

// ------------------------------------------------------------------ files tiercache must not touch

/// The file's bytes, and whether a `-wal` or `-shm` file lies beside it.
fn snapshot(path: &Path) -> std::io::Result<(Vec<u8>, bool)> {
    let beside = ["-wal", "-shm"].iter().any(|s| sibling(path, s).exists());
    Ok((std::fs::read(path)?, beside))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Creates a SQLite database at `path` by running `sql` (journal mode as given), and closes it.
fn make_db(path: &Path, journal: &str, sql: &str) -> rusqlite::Result<()> {
    let conn = rusqlite::Connection::open(path)?;
    conn.query_row(&format!("PRAGMA journal_mode={journal}"), [], |_| Ok(()))?;
    conn.execute_batch(sql)?;
    conn.close().map_err(|(_, e)| e)
}

/// tiercache's schema of version 1, as it was created before `application_id`.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS entries (
    key         TEXT PRIMARY KEY NOT NULL,
    value       BLOB,
    validator   TEXT,
    stored_at   INTEGER NOT NULL,
    fresh_until INTEGER NOT NULL,
    stale_until INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    last_access INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY,
    key          TEXT NOT NULL,
    op           TEXT NOT NULL CHECK (op IN ('put', 'delete')),
    value        BLOB,
    created_at   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    dead         INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
";

#[tokio::test]
async fn a_database_of_another_application_is_refused_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    let v1_plus = format!("{SCHEMA_V1} CREATE TABLE users (id INTEGER); PRAGMA user_version=1;");
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "plain",
            "DELETE",
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
             INSERT INTO users (name) VALUES ('ada'), ('grace');"
                .into(),
        ),
        (
            "wal",
            "WAL",
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
             INSERT INTO users (name) VALUES ('ada');"
                .into(),
        ),
        (
            "app-id",
            "DELETE",
            "PRAGMA application_id=1234; CREATE TABLE t (x);".into(),
        ),
        ("app-id-only", "DELETE", "PRAGMA application_id=99;".into()),
        (
            "versioned",
            "DELETE",
            "CREATE TABLE t (x); PRAGMA user_version=7;".into(),
        ),
        // tiercache v1's tables and version, plus a table of someone else's.
        ("v1-plus", "DELETE", v1_plus),
    ];
    for (name, journal, sql) in cases {
        let path = dir.path().join(format!("{name}.db"));
        make_db(&path, journal, &sql)?;
        let before = snapshot(&path)?;
        assert!(!before.1, "{name}: closed cleanly");
        for on_corrupt in [tiercache::OnCorrupt::Fail, tiercache::OnCorrupt::MoveAside] {
            let result = TieredCache::builder()
                .sqlite_path(&path)
                .on_corrupt(on_corrupt)
                .build();
            match result {
                Err(Error::ForeignDatabase { path: p, message }) => {
                    assert_eq!(p, path);
                    assert!(message.contains("application_id"), "{name}: {message}");
                }
                other => panic!("{name}: expected ForeignDatabase, got {other:?}"),
            }
            assert_eq!(
                snapshot(&path)?,
                before,
                "{name}: the file was left as it was"
            );
        }
    }
    let moved = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
    assert!(!moved, "MoveAside never moves a valid database");
    Ok(())
}

#[tokio::test]
async fn a_database_of_a_newer_tiercache_is_refused_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("newer.db");
    make_db(
        &path,
        "DELETE",
        &format!(
            "{} PRAGMA application_id={}; PRAGMA user_version=99;",
            tiercache::tier::sqlite::SCHEMA,
            tiercache::tier::sqlite::APPLICATION_ID
        ),
    )?;
    let before = snapshot(&path)?;
    match TieredCache::builder().sqlite_path(&path).build() {
        Err(Error::Config(msg)) => assert!(msg.contains("newer"), "{msg}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    assert_eq!(snapshot(&path)?, before);
    Ok(())
}

#[tokio::test]
async fn a_file_that_cannot_be_opened_keeps_the_cause_as_source() -> TestResult {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory")?;
    // The parent is a file: the open fails (ENOTDIR), with the SQLite error as the cause.
    let err = TieredCache::builder()
        .sqlite_path(file.join("cache.db"))
        .build()
        .expect_err("cannot open");
    assert!(err.is_storage(), "{err:?}");
    assert!(err.to_string().contains("cannot open"), "{err}");
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_refused_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    for (name, bytes) in [
        ("garbage.db", vec![0x42u8; 8192]),
        ("text.db", b"hello, I am a text file\n".to_vec()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes)?;
        match TieredCache::builder().sqlite_path(&path).build() {
            Err(e @ Error::CorruptDatabase { .. }) => assert!(e.is_storage()),
            other => panic!("{name}: expected CorruptDatabase, got {other:?}"),
        }
        assert_eq!(snapshot(&path)?, (bytes, false), "{name}: untouched");
    }
    Ok(())
}

#[tokio::test]
async fn a_damaged_tiercache_file_is_refused_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("damaged.db");
    let mut sql = format!(
        "PRAGMA page_size=4096; {} PRAGMA application_id={}; PRAGMA user_version={};",
        tiercache::tier::sqlite::SCHEMA,
        tiercache::tier::sqlite::APPLICATION_ID,
        tiercache::tier::sqlite::SCHEMA_VERSION
    );
    sql.push_str("BEGIN;");
    for i in 0..200 {
        sql.push_str(&format!(
            "INSERT INTO entries VALUES ('k{i}', zeroblob(1000), NULL, 1, 2, 3, 1000, 1);"
        ));
    }
    sql.push_str("COMMIT;");
    make_db(&path, "DELETE", &sql)?;
    let mut bytes = std::fs::read(&path)?;
    assert!(bytes.len() > 10 * 4096);
    // Pages 2 to 6 (the first tables' roots and some of their pages) become garbage; page 1,
    // with the header and the schema, is left valid.
    bytes[4096..6 * 4096].fill(0xA5);
    std::fs::write(&path, &bytes)?;
    match TieredCache::builder().sqlite_path(&path).build() {
        Err(Error::CorruptDatabase { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected CorruptDatabase, got {other:?}"),
    }
    assert_eq!(snapshot(&path)?, (bytes, false), "untouched");
    Ok(())
}

#[tokio::test]
async fn an_empty_file_becomes_a_tiercache_database() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("empty.db");
    std::fs::write(&path, b"")?;
    let cache = TieredCache::builder()
        .sqlite_path(&path)
        .strategy(tiercache::Strategy::CacheAside)
        .build()?;
    cache.set("a", "alpha").await?;
    let conn = rusqlite::Connection::open(&path)?;
    let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    assert_eq!(app_id, tiercache::tier::sqlite::APPLICATION_ID);
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!(version, tiercache::tier::sqlite::SCHEMA_VERSION);
    Ok(())
}

// ------------------------------------------------------------------ migrations

#[tokio::test]
async fn a_version_1_database_is_migrated_and_its_data_kept() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("v1.db");
    // As tiercache 1 made it: WAL, the schema, user_version 1, no application_id.
    make_db(
        &path,
        "WAL",
        &format!(
            "{SCHEMA_V1} PRAGMA user_version=1;
             INSERT INTO entries VALUES ('a', CAST('alpha' AS BLOB), '\"e1\"', 1, 4000000000000, 4000000000000, 5, 1);
             INSERT INTO outbox (key, op, value, created_at) VALUES ('b', 'put', CAST('beta' AS BLOB), 1);
             INSERT INTO meta VALUES ('note', 'kept');"
        ),
    )?;
    let cache = TieredCache::builder()
        .sqlite_path(&path)
        .strategy(tiercache::Strategy::CacheAside)
        .build()?;
    let hit = cache.lookup("a").await?.expect("the entry survived");
    assert_eq!(hit.value.as_ref(), b"alpha");
    assert_eq!(hit.tier, tiercache::Tier::L2);
    assert_eq!(hit.validator.as_deref(), Some("\"e1\""));

    let conn = rusqlite::Connection::open(&path)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!(version, tiercache::tier::sqlite::SCHEMA_VERSION);
    let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    assert_eq!(app_id, tiercache::tier::sqlite::APPLICATION_ID);
    let (key, superseded): (String, i64) =
        conn.query_row("SELECT key, superseded FROM outbox", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    assert_eq!((key.as_str(), superseded), ("b", 0));
    let indexes: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox' AND sql IS NOT NULL ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    assert_eq!(
        indexes,
        ["outbox_by_key", "outbox_dead_by_key", "outbox_failing"]
    );
    let note: String = conn.query_row("SELECT value FROM meta WHERE name = 'note'", [], |r| {
        r.get(0)
    })?;
    assert_eq!(note, "kept");
    drop(conn);

    // Opened again: already current, nothing to do.
    drop(cache);
    let again = TieredCache::builder()
        .sqlite_path(&path)
        .strategy(tiercache::Strategy::CacheAside)
        .build()?;
    assert!(again.lookup("a").await?.is_some());
    Ok(())
}

// ------------------------------------------------------------------ the file going away

fn remove_db(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(sibling(path, suffix));
    }
    Ok(())
}

fn is_gone_error(e: &Error, path: &Path) -> bool {
    let msg = e.to_string();
    e.is_storage()
        && msg.contains("deleted or replaced")
        && msg.contains(&path.display().to_string())
}

#[tokio::test]
async fn a_deleted_database_file_fails_the_writes_and_shows_in_health() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let cache = TieredCache::builder()
        .sqlite_path(&path)
        .strategy(tiercache::Strategy::CacheAside)
        .build()?;
    cache.set("a", "alpha").await?;
    assert_eq!(
        cache.health().await.status,
        tiercache::HealthStatus::Healthy
    );
    remove_db(&path)?;

    // Cache-aside keeps a value L2 could not take in L1 (the set succeeds); the L2 write fails,
    // and after three failures L2's write breaker opens.
    for i in 0..3 {
        cache.set(&format!("k{i}"), "v").await?;
    }
    let health = cache.health().await;
    assert_ne!(health.status, tiercache::HealthStatus::Healthy, "{health}");
    assert_ne!(
        health.l2.status,
        tiercache::HealthStatus::Healthy,
        "{health}"
    );
    let last = health.l2.last_error.clone().unwrap_or_default();
    assert!(last.contains("deleted or replaced"), "{health}");
    assert!(
        !path.exists(),
        "nothing written to a new file at the path either"
    );
    Ok(())
}

#[tokio::test]
async fn a_write_behind_set_on_a_deleted_or_replaced_file_is_a_storage_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    for replace in [false, true] {
        let path = dir.path().join(format!("cache-{replace}.db"));
        let cache = TieredCache::builder()
            .sqlite_path(&path)
            .source(support::FakeSource::new())
            .strategy(tiercache::Strategy::WriteBehind)
            .build()?;
        cache.set("a", "alpha").await?;
        if replace {
            // Another file (another cache's database) renamed over it.
            let other = dir.path().join("other.db");
            drop(
                TieredCache::builder()
                    .sqlite_path(&other)
                    .strategy(tiercache::Strategy::CacheAside)
                    .build()?,
            );
            std::fs::rename(&other, &path)?;
        } else {
            remove_db(&path)?;
        }
        let err = cache.set("b", "beta").await.expect_err("not durable");
        assert!(is_gone_error(&err, &path), "{err:?}");
        assert_eq!(
            cache.get("b").await?,
            None,
            "a refused write is not acknowledged anywhere"
        );
    }
    Ok(())
}
