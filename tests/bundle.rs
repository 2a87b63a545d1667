//! Offline bundles: export → import into a fresh database → every exported key served offline,
//! byte-exact with its ETag; import into an existing database (newer entries and pending writes
//! win); refused bundles (missing, not SQLite, foreign, a cache database, newer, damaged, bad
//! rows) change neither the target nor the bundle; export never overwrites unless asked. The
//! clock is a mock; no network, no sleeps.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rusqlite::Connection;
use support::FakeSource;
use tiercache::bundle::{ExportOptions, BUNDLE_APPLICATION_ID, BUNDLE_VERSION};
use tiercache::{
    BundleFault, Error, Freshness, MockClock, StaleReason, Strategy, Tier, TieredCache,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const MINUTE: Duration = Duration::from_secs(60);

fn clock() -> MockClock {
    MockClock::at(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
}

/// Every byte value, a NUL in the middle, and an empty file.
fn binary() -> Vec<u8> {
    (0..=255u8).chain([0, 0, 255]).collect()
}

fn contents() -> Vec<(&'static str, Bytes)> {
    vec![
        (
            "octo/app/config/prod.toml",
            Bytes::from_static(b"port = 8080\n"),
        ),
        ("octo/app/logo.png", Bytes::from(binary())),
        ("octo/app/empty.txt", Bytes::new()),
        ("octo/lib/README.md", Bytes::from("# lib\n".repeat(1000))),
    ]
}

/// A cache on `db` over `source`, on `clock`.
fn cache(db: &Path, source: &FakeSource, clock: &MockClock) -> tiercache::Result<TieredCache> {
    TieredCache::builder()
        .source(source.clone())
        .sqlite_path(db)
        .clock(clock.clone())
        .ttl(5 * MINUTE)
        .stale_ttl(7 * 24 * 60 * MINUTE)
        .build()
}

/// A warmed cache (every key of `contents` read through from its source) and its source.
async fn warmed(db: &Path, clock: &MockClock) -> tiercache::Result<(TieredCache, FakeSource)> {
    let source = FakeSource::new();
    for (k, v) in contents() {
        source.insert(k, v);
    }
    let cache = cache(db, &source, clock)?;
    for (k, _) in contents() {
        assert!(cache.get(k).await?.is_some());
    }
    Ok((cache, source))
}

/// The rows of a database's (or a bundle's) `entries`, and its outbox, read with a connection
/// of its own.
fn rows(db: &Path) -> rusqlite::Result<Vec<String>> {
    let conn = Connection::open(db)?;
    let mut out: Vec<String> = conn
        .prepare(
            "SELECT key, hex(value), validator, stored_at, fresh_until, stale_until
             FROM entries ORDER BY key",
        )?
        .query_map([], |r| {
            Ok(format!(
                "{}|{:?}|{:?}|{}|{}|{}",
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if let Ok(mut stmt) = conn.prepare("SELECT id, key, op, dead FROM outbox ORDER BY id") {
        let outbox = stmt.query_map([], |r| {
            Ok(format!(
                "outbox {}|{}|{}|{}",
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?
            ))
        })?;
        for row in outbox {
            out.push(row?);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn export_then_import_into_a_fresh_database_serves_every_key_offline() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let (ci, source) = warmed(&dir.path().join("ci.db"), &clock).await?;
    let bundle = dir.path().join("components.bundle");
    let exported = ci.export(&bundle).await?;
    assert_eq!(exported.entries, contents().len() as u64);
    assert_eq!(exported.path, bundle);
    let content_bytes: usize = contents().iter().map(|(_, v)| v.len()).sum();
    assert!(exported.bytes >= content_bytes as u64, "{exported:?}");
    assert_eq!(
        exported.file_bytes,
        std::fs::metadata(&bundle)?.len(),
        "the report gives the file's size"
    );

    // The file: a bundle's application_id and version, and the ETags of the source.
    let conn = Connection::open(&bundle)?;
    let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!((app_id, version), (BUNDLE_APPLICATION_ID, BUNDLE_VERSION));
    let validators: Vec<Option<String>> = conn
        .prepare("SELECT validator FROM entries ORDER BY key")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    assert!(validators
        .iter()
        .all(|v| v.as_deref().is_some_and(|v| v.starts_with("\"v"))));
    drop(conn);

    // A runner: a fresh database, offline, its source never asked.
    let runner_source = FakeSource::new();
    let runner = TieredCache::builder()
        .source(runner_source.clone())
        .sqlite_path(dir.path().join("runner.db"))
        .clock(clock.clone())
        .offline(true)
        .build()?;
    let imported = runner.import(&bundle).await?;
    assert_eq!(imported.entries, contents().len() as u64);
    assert_eq!(imported.imported, contents().len() as u64);
    assert_eq!(
        (imported.kept_newer, imported.kept_pending, imported.expired),
        (0, 0, 0)
    );
    assert_eq!(imported.bytes, exported.bytes);
    for (key, value) in contents() {
        let hit = runner.lookup(key).await?.expect("imported");
        assert_eq!(hit.value, value, "{key} byte-exact");
        assert_eq!(hit.tier, Tier::L2, "{key}");
        assert_eq!(hit.freshness, Freshness::Fresh, "{key}");
        let fetched = ci.lookup(key).await?.expect("cached");
        assert_eq!(hit.validator, fetched.validator, "{key}: the source's ETag");
        assert!(hit.validator.is_some());
    }

    // Past the fresh deadline, offline: served stale, marked why.
    clock.advance(6 * MINUTE);
    runner.clear_memory().await;
    for (key, value) in contents() {
        let hit = runner.lookup(key).await?.expect("stale copy");
        assert_eq!(hit.value, value);
        assert_eq!(
            hit.freshness,
            Freshness::Stale {
                reason: StaleReason::Offline
            }
        );
    }
    assert_eq!(
        runner_source.fetch_count(),
        0,
        "offline: the source was never asked"
    );
    assert_eq!(
        source.fetch_count(),
        contents().len(),
        "one fetch per key, by the CI cache"
    );
    Ok(())
}

#[tokio::test]
async fn a_prefix_exports_only_its_keys_and_the_import_is_idempotent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let (ci, _) = warmed(&dir.path().join("ci.db"), &clock).await?;
    let bundle = dir.path().join("app.bundle");
    let exported = ci
        .export_with(&bundle, &ExportOptions::new().prefix("octo/app/"))
        .await?;
    assert_eq!(exported.entries, 3);
    assert_eq!(exported.prefix, "octo/app/");

    let runner = cache(&dir.path().join("runner.db"), &FakeSource::new(), &clock)?;
    assert_eq!(runner.import(&bundle).await?.imported, 3);
    let again = runner.import(&bundle).await?;
    assert_eq!(
        (again.imported, again.kept_newer),
        (0, 3),
        "same stored_at: kept"
    );
    runner.set_offline(true);
    assert!(
        runner.get("octo/lib/README.md").await.is_err(),
        "not exported"
    );
    Ok(())
}

#[tokio::test]
async fn export_leaves_out_pending_writes_and_not_found_markers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let source = FakeSource::new();
    source.insert("octo/app/kept.toml", "kept");
    let cache = TieredCache::builder()
        .source(source.clone())
        .sqlite_path(dir.path().join("ci.db"))
        .clock(clock.clone())
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    assert!(cache.get("octo/app/kept.toml").await?.is_some());
    assert!(
        cache.get("octo/app/missing.toml").await?.is_none(),
        "a 404: a negative entry"
    );
    cache
        .set("octo/app/pending.toml", "not delivered yet")
        .await?;
    assert_eq!(cache.store_summary().await?.outbox_depth, 1);

    let bundle = dir.path().join("b.bundle");
    let report = cache.export(&bundle).await?;
    assert_eq!(report.entries, 1, "{report:?}");
    assert_eq!(report.skipped_negative, 1);
    let keys: Vec<String> = rows(&bundle)?
        .iter()
        .map(|r| r.split('|').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(keys, ["octo/app/kept.toml"]);
    Ok(())
}

#[tokio::test]
async fn import_into_an_existing_database_keeps_newer_entries_and_pending_writes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let keys = [
        "octo/app/newer.toml",
        "octo/app/pending.toml",
        "octo/app/older.toml",
    ];

    // The target at t0: an old copy of `older` (read into L1 too), a pending write of
    // `pending` (older than the bundle's copy, and still it wins).
    let target_source = FakeSource::new();
    for k in keys {
        target_source.insert(k, format!("old {k}"));
    }
    let target = TieredCache::builder()
        .source(target_source.clone())
        .sqlite_path(dir.path().join("target.db"))
        .clock(clock.clone())
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    assert_eq!(
        target.get("octo/app/older.toml").await?.as_deref(),
        Some(&b"old octo/app/older.toml"[..])
    );
    target
        .set("octo/app/pending.toml", "my pending write")
        .await?;

    // The bundle at t0 + 1 min.
    clock.advance(MINUTE);
    let ci_source = FakeSource::new();
    for k in keys {
        ci_source.insert(k, format!("bundled {k}"));
    }
    let ci = cache(&dir.path().join("ci.db"), &ci_source, &clock)?;
    for k in keys {
        assert!(ci.get(k).await?.is_some());
    }
    let bundle = dir.path().join("b.bundle");
    ci.export(&bundle).await?;

    // The target reads `newer` from its source at t0 + 2 min: newer than the bundle.
    clock.advance(MINUTE);
    assert!(target.get("octo/app/newer.toml").await?.is_some());

    let report = target.import(&bundle).await?;
    assert_eq!(report.entries, 3);
    assert_eq!(
        (report.imported, report.kept_newer, report.kept_pending),
        (1, 1, 1),
        "{report:?}"
    );
    let read = |k: &'static str| {
        let target = target.clone();
        async move { target.get(k).await.map(|v| v.unwrap_or_default()) }
    };
    assert_eq!(
        read("octo/app/older.toml").await?,
        "bundled octo/app/older.toml",
        "L1's older copy was dropped"
    );
    assert_eq!(
        read("octo/app/newer.toml").await?,
        "old octo/app/newer.toml",
        "the newer copy stays"
    );
    assert_eq!(
        read("octo/app/pending.toml").await?,
        "my pending write",
        "I1: the pending write wins"
    );
    assert_eq!(
        target.store_summary().await?.outbox_depth,
        1,
        "the outbox is untouched"
    );
    assert_eq!(target.flush().await?.delivered, 1);
    assert_eq!(
        target_source.value("octo/app/pending.toml").as_deref(),
        Some(&b"my pending write"[..])
    );
    Ok(())
}

#[tokio::test]
async fn a_column_added_later_is_ignored_by_this_version() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let (ci, _) = warmed(&dir.path().join("ci.db"), &clock).await?;
    let bundle = dir.path().join("b.bundle");
    ci.export(&bundle).await?;
    // What a later version adds (the commit each file was read at), in the same format version.
    Connection::open(&bundle)?.execute_batch(
        "ALTER TABLE entries ADD COLUMN commit_sha TEXT;
         UPDATE entries SET commit_sha = '0123456789abcdef0123456789abcdef01234567';",
    )?;
    let runner = TieredCache::builder()
        .sqlite_path(dir.path().join("runner.db"))
        .clock(clock.clone())
        .offline(true)
        .build()?;
    assert_eq!(
        runner.import(&bundle).await?.imported,
        contents().len() as u64
    );
    for (key, value) in contents() {
        assert_eq!(runner.get(key).await?, Some(value));
    }
    Ok(())
}

#[tokio::test]
async fn entries_past_their_stale_deadline_are_not_imported() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let (ci, _) = warmed(&dir.path().join("ci.db"), &clock).await?;
    let bundle = dir.path().join("b.bundle");
    ci.export(&bundle).await?;
    clock.advance(8 * 24 * 60 * MINUTE);
    let runner = cache(&dir.path().join("runner.db"), &FakeSource::new(), &clock)?;
    let report = runner.import(&bundle).await?;
    assert_eq!(
        (report.imported, report.expired),
        (0, contents().len() as u64)
    );
    assert_eq!(runner.store_summary().await?.entries, 0);
    Ok(())
}

// ------------------------------------------------------------------ refused bundles

/// A target database with a few rows, and a good bundle to damage.
struct Refusal {
    dir: tempfile::TempDir,
    target: TieredCache,
    db: PathBuf,
}

impl Refusal {
    async fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let clock = clock();
        let db = dir.path().join("target.db");
        let target = TieredCache::builder()
            .sqlite_path(&db)
            .clock(clock.clone())
            .build()?;
        target.set("octo/app/mine.toml", "mine").await?;
        let (ci, _) = warmed(&dir.path().join("ci.db"), &clock).await?;
        ci.export(dir.path().join("good.bundle")).await?;
        Ok(Self { dir, target, db })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A copy of the good bundle, changed by `f`.
    fn bundle(
        &self,
        name: &str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<()>,
    ) -> Result<PathBuf, Box<dyn std::error::Error>> {
        let path = self.path(name);
        std::fs::copy(self.path("good.bundle"), &path)?;
        f(&Connection::open(&path)?)?;
        Ok(path)
    }

    /// Imports `bundle`: refused with `fault`, the target's rows and the bundle's bytes as
    /// they were.
    async fn refused(&self, bundle: &Path, fault: BundleFault) -> TestResult {
        let before = rows(&self.db)?;
        let bytes = std::fs::read(bundle).ok();
        match self.target.import(bundle).await {
            Err(e @ Error::Bundle { .. }) => {
                assert_eq!(e.bundle_fault(), Some(fault), "{e}");
                assert_eq!(e.kind(), "bundle");
                let name = bundle.file_name().unwrap_or_default().to_string_lossy();
                assert!(e.to_string().contains(&*name), "names the file: {e}");
            }
            other => panic!("{}: expected {fault:?}, got {other:?}", bundle.display()),
        }
        assert_eq!(rows(&self.db)?, before, "the target is unchanged");
        assert_eq!(std::fs::read(bundle).ok(), bytes, "the bundle is unchanged");
        assert_eq!(
            self.target.get("octo/app/mine.toml").await?.as_deref(),
            Some(&b"mine"[..])
        );
        Ok(())
    }
}

#[tokio::test]
async fn a_missing_file_or_a_folder_is_refused() -> TestResult {
    let r = Refusal::new().await?;
    r.refused(&r.path("nothing.bundle"), BundleFault::Missing)
        .await?;
    r.refused(r.dir.path(), BundleFault::Missing).await
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_refused() -> TestResult {
    let r = Refusal::new().await?;
    let text = r.path("notes.txt");
    std::fs::write(&text, "these are not the bytes you are looking for")?;
    r.refused(&text, BundleFault::NotSqlite).await?;
    let empty = r.path("empty.bundle");
    std::fs::write(&empty, "")?;
    r.refused(&empty, BundleFault::NotSqlite).await
}

#[tokio::test]
async fn another_applications_database_and_a_cache_database_are_foreign() -> TestResult {
    let r = Refusal::new().await?;
    let other = r.path("other.sqlite");
    let conn = Connection::open(&other)?;
    conn.execute_batch("PRAGMA application_id = 42; CREATE TABLE entries (key TEXT);")?;
    drop(conn);
    r.refused(&other, BundleFault::Foreign).await?;
    let plain = r.path("plain.sqlite");
    Connection::open(&plain)?.execute_batch("CREATE TABLE t (x);")?;
    r.refused(&plain, BundleFault::Foreign).await?;
    // A cache database (tiercache's own application_id): not a bundle.
    let cache_db = r.path("cache.db");
    Connection::open(&cache_db)?.execute_batch(&format!(
        "PRAGMA application_id = {}; CREATE TABLE entries (key TEXT);",
        tiercache::tier::sqlite::APPLICATION_ID
    ))?;
    r.refused(&cache_db, BundleFault::Foreign).await
}

#[tokio::test]
async fn a_newer_bundle_format_is_refused() -> TestResult {
    let r = Refusal::new().await?;
    let newer = r.bundle("newer.bundle", |c| {
        c.execute_batch(&format!("PRAGMA user_version = {};", BUNDLE_VERSION + 1))
    })?;
    r.refused(&newer, BundleFault::Newer).await
}

#[tokio::test]
async fn a_damaged_bundle_is_refused() -> TestResult {
    let r = Refusal::new().await?;
    // Garbage over every page after the first (the header and schema stay readable).
    let damaged = r.path("damaged.bundle");
    let mut bytes = std::fs::read(r.path("good.bundle"))?;
    let page = 4096.min(bytes.len() / 2);
    for (i, b) in bytes.iter_mut().enumerate().skip(page) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&damaged, &bytes)?;
    r.refused(&damaged, BundleFault::Corrupt).await?;
    // Rows missing: the count it records does not match.
    let short = r.bundle("short.bundle", |c| {
        c.execute_batch("DELETE FROM entries WHERE key = 'octo/app/empty.txt';")
    })?;
    r.refused(&short, BundleFault::Corrupt).await?;
    // Tables that are not a bundle's.
    let wrong = r.bundle("wrong.bundle", |c| {
        c.execute_batch("ALTER TABLE entries DROP COLUMN validator;")
    })?;
    r.refused(&wrong, BundleFault::Corrupt).await
}

#[tokio::test]
async fn an_undecodable_row_refuses_the_whole_bundle() -> TestResult {
    let r = Refusal::new().await?;
    let cases: [(&str, &str); 4] = [
        (
            "text.bundle",
            "UPDATE entries SET value = 'text, not a blob' WHERE key = 'octo/app/logo.png'",
        ),
        (
            "negative.bundle",
            "UPDATE entries SET stale_until = -1 WHERE key = 'octo/app/logo.png'",
        ),
        (
            "real.bundle",
            "UPDATE entries SET stored_at = 1.5 WHERE key = 'octo/app/logo.png'",
        ),
        (
            "key.bundle",
            "UPDATE entries SET key = '' WHERE key = 'octo/app/logo.png'",
        ),
    ];
    for (name, sql) in cases {
        let bad = r.bundle(name, |c| c.execute_batch(sql))?;
        r.refused(&bad, BundleFault::InvalidRow).await?;
    }
    // Nothing of the good rows before the bad one was written either.
    assert_eq!(r.target.store_summary().await?.entries, 1);
    Ok(())
}

// ------------------------------------------------------------------ export's file

#[tokio::test]
async fn export_never_overwrites_unless_asked_and_leaves_no_temporary_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let (ci, _) = warmed(&dir.path().join("ci.db"), &clock).await?;
    let path = dir.path().join("precious.txt");
    std::fs::write(&path, "do not touch")?;
    let listing = || -> std::io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        Ok(names)
    };
    let before = listing()?;
    match ci.export(&path).await {
        Err(e) => assert_eq!(e.bundle_fault(), Some(BundleFault::Exists), "{e}"),
        Ok(r) => panic!("overwrote {r:?}"),
    }
    assert_eq!(std::fs::read(&path)?, b"do not touch");
    assert_eq!(listing()?, before, "no temporary file left");

    let report = ci
        .export_with(&path, &ExportOptions::new().overwrite(true))
        .await?;
    assert_eq!(report.entries, contents().len() as u64);
    assert_eq!(
        listing()?,
        before,
        "replaced in place, no temporary file left"
    );
    let elsewhere = tempfile::tempdir()?;
    let runner = cache(
        &elsewhere.path().join("runner.db"),
        &FakeSource::new(),
        &clock,
    )?;
    assert_eq!(
        runner.import(&path).await?.imported,
        contents().len() as u64
    );

    // Never over the cache's own database, even when asked.
    let own = ci
        .export_with(
            dir.path().join("ci.db"),
            &ExportOptions::new().overwrite(true),
        )
        .await;
    assert_eq!(
        own.err().and_then(|e| e.bundle_fault()),
        Some(BundleFault::Exists)
    );
    assert!(
        ci.get("octo/app/empty.txt").await?.is_some(),
        "the cache still works"
    );
    assert_eq!(listing()?, before);

    // A folder that does not exist: an I/O error, nothing created.
    match ci.export(dir.path().join("no/such/dir/b.bundle")).await {
        Err(e) => assert_eq!(e.bundle_fault(), Some(BundleFault::Io), "{e}"),
        Ok(r) => panic!("{r:?}"),
    }
    assert_eq!(listing()?, before);
    Ok(())
}

#[tokio::test]
async fn a_closed_cache_neither_exports_nor_imports() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = TieredCache::builder()
        .sqlite_path(dir.path().join("c.db"))
        .build()?;
    cache.close().await?;
    assert!(matches!(
        cache.export(dir.path().join("b")).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        cache.import(dir.path().join("b")).await,
        Err(Error::Closed)
    ));
    assert!(!dir.path().join("b").exists());
    Ok(())
}

#[tokio::test]
async fn an_import_reaches_the_l1_of_every_cache_of_the_process_on_the_database() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let key = "octo/app/config/prod.toml";
    let old = FakeSource::new();
    old.insert(key, "old");
    let db = dir.path().join("target.db");
    let (a, b) = (cache(&db, &old, &clock)?, cache(&db, &old, &clock)?);
    assert_eq!(b.get(key).await?.as_deref(), Some(&b"old"[..]), "in b's L1");
    clock.advance(MINUTE);
    let (ci, _) = warmed(&dir.path().join("ci.db"), &clock).await?;
    let bundle = dir.path().join("b.bundle");
    ci.export(&bundle).await?;
    assert_eq!(a.import(&bundle).await?.imported, contents().len() as u64);
    assert_eq!(b.get(key).await?.as_deref(), Some(&b"port = 8080\n"[..]));
    assert_eq!(old.fetch_count(), 1);
    Ok(())
}
