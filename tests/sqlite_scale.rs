//! L2 at scale (issue #13), through the public API on a database file: the counters every
//! process sharing the file reads, the migration that fills them on an existing file, and the
//! write-behind outbox's bound. (Speed goals are rows of `cargo bench --bench ratios`.)

mod support;

use std::path::Path;
use std::time::Duration;

use support::FakeSource;
use tiercache::tier::store::StoreSummary;
use tiercache::{Clock, Error, MockClock, Strategy, TieredCache};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn builder(source: &FakeSource, clock: &MockClock, path: &Path) -> tiercache::TieredCacheBuilder {
    TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .ttl(Duration::from_secs(60))
        .stale_ttl(Duration::from_secs(3600))
        .sqlite_path(path)
}

/// What the file holds, counted by reading every row on a connection of its own.
fn scan(path: &Path, now: u64) -> rusqlite::Result<StoreSummary> {
    let conn = rusqlite::Connection::open(path)?;
    let mut s = StoreSummary::default();
    let (n, bytes, stale, negative): (u64, u64, u64, u64) = conn.query_row(
        "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(fresh_until <= ?1), 0),
                coalesce(sum(value IS NULL), 0) FROM entries",
        [now as i64],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    let (pending, dead, obytes, oldest): (u64, u64, u64, Option<u64>) = conn.query_row(
        "SELECT coalesce(sum(dead = 0), 0), coalesce(sum(dead = 1), 0),
                coalesce(sum(length(CAST(key AS BLOB)) + coalesce(length(value), 0)), 0),
                min(CASE WHEN dead = 0 THEN created_at END) FROM outbox",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    (s.entries, s.bytes, s.stale_entries, s.negative_entries) = (n, bytes, stale, negative);
    (s.outbox_depth, s.dead_letters, s.outbox_bytes) = (pending, dead, obytes);
    s.oldest_pending_ms = oldest;
    Ok(s)
}

#[tokio::test]
async fn the_counters_match_a_scan_and_another_cache_on_the_file_reads_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("l2.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let writer = builder(&source, &clock, &path)
        .strategy(Strategy::WriteBehind)
        .sqlite_capacity(192 * 1024)
        .build()?;
    let other = builder(&source, &clock, &path)
        .strategy(Strategy::CacheAside)
        .build()?;
    // Pending writes: the source is down for writes.
    source.fail_writes(Some(support::outage()));
    let mut rng = fastrand::Rng::with_seed(13);
    for i in 0..300 {
        clock.advance(Duration::from_millis(rng.u64(0..2_000)));
        let key = format!("k{}", rng.usize(0..80));
        match rng.u8(0..6) {
            0 => writer.delete(&key).await?,
            1 => other.set(&key, vec![b'o'; rng.usize(0..2_000)]).await?,
            2 => other.invalidate(&key).await?,
            _ => writer.set(&key, vec![b'w'; rng.usize(0..2_000)]).await?,
        }
        if i % 50 == 49 {
            let now = clock.now_millis();
            let (a, b) = (writer.store_summary().await?, other.store_summary().await?);
            assert_eq!(a, b, "step {i}: both caches read the same counters");
            assert_eq!(a, scan(&path, now)?, "step {i}");
        }
    }
    let s = writer.store_summary().await?;
    assert!(s.entries > 0 && s.outbox_depth > 0, "{s:?}");
    // Delivered: the outbox empties, and the counters follow.
    source.fail_writes(None);
    writer.reset_source_breaker().await;
    assert!(writer.flush().await?.is_complete());
    let s = other.store_summary().await?;
    assert_eq!((s.outbox_depth, s.outbox_bytes), (0, 0));
    assert_eq!(s, scan(&path, clock.now_millis())?);
    Ok(())
}

/// tiercache's schema of version 2 (before the counters).
const SCHEMA_V2: &str = "
CREATE TABLE entries (
    key TEXT PRIMARY KEY NOT NULL, value BLOB, validator TEXT, stored_at INTEGER NOT NULL,
    fresh_until INTEGER NOT NULL, stale_until INTEGER NOT NULL, size INTEGER NOT NULL,
    last_access INTEGER NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, op TEXT NOT NULL CHECK (op IN ('put', 'delete')),
    value BLOB, created_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0, last_error TEXT, dead INTEGER NOT NULL DEFAULT 0,
    superseded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_by_key ON outbox(key, id);
CREATE INDEX outbox_dead_by_key ON outbox(key) WHERE dead = 1;
CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
";

#[tokio::test]
async fn a_version_2_file_is_migrated_with_its_counters_filled() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("v2.db");
    {
        let conn = rusqlite::Connection::open(&path)?;
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
        conn.execute_batch(&format!(
            "{SCHEMA_V2} PRAGMA application_id={}; PRAGMA user_version=2;
             WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 499)
             INSERT INTO entries SELECT 'k' || i, CASE WHEN i % 10 = 0 THEN NULL ELSE zeroblob(100) END,
               NULL, 1000 + i, 4000000000000, 4000000000000, CASE WHEN i % 10 = 0 THEN 0 ELSE 100 END,
               1000 + i FROM n;
             INSERT INTO outbox (key, op, value, created_at) VALUES ('k1', 'put', zeroblob(7), 5);
             INSERT INTO outbox (key, op, created_at, dead) VALUES ('k2', 'delete', 6, 1);",
            tiercache::tier::sqlite::APPLICATION_ID
        ))?;
    }
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock, &path)
        .strategy(Strategy::CacheAside)
        .build()?;
    let s = cache.store_summary().await?;
    assert_eq!(s, scan(&path, clock.now_millis())?);
    assert_eq!(
        (
            s.entries,
            s.bytes,
            s.negative_entries,
            s.outbox_depth,
            s.dead_letters
        ),
        (500, 45_000, 50, 1, 1)
    );
    assert_eq!((s.outbox_bytes, s.oldest_pending_ms), (2 + 7 + 2, Some(5)));
    let conn = rusqlite::Connection::open(&path)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!(version, tiercache::tier::sqlite::SCHEMA_VERSION);
    // Every entry has its recency row, with its last access.
    let (rows, oldest): (i64, i64) =
        conn.query_row("SELECT count(*), min(at) FROM recency", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    assert_eq!((rows, oldest), (500, 1000));
    // And the counters go on from there.
    cache.set("new", "value").await?;
    cache.invalidate("k3").await?;
    assert_eq!(
        cache.store_summary().await?,
        scan(&path, clock.now_millis())?
    );
    Ok(())
}

#[tokio::test]
async fn a_write_behind_set_past_the_outbox_bound_is_refused_and_nothing_acknowledged_is_lost(
) -> TestResult {
    // The default bound: the larger of L2's bound and 64 MiB.
    let limit = tiercache::tier::sqlite::outbox_bound(64 * 1024);
    assert_eq!(limit, tiercache::tier::sqlite::OUTBOX_MIN_BYTES);
    fill_the_outbox(|b| b.sqlite_capacity(64 * 1024), limit).await
}

#[tokio::test]
async fn the_outbox_capacity_set_on_the_builder_is_its_bound() -> TestResult {
    fill_the_outbox(
        |b| b.sqlite_capacity(1024 * 1024).outbox_capacity(128 * 1024),
        128 * 1024,
    )
    .await?;
    // Refused: out of range.
    for bytes in [0, 1024, 65 * 1024 * 1024 * 1024 * 1024] {
        let err = TieredCache::builder().outbox_capacity(bytes).build().err();
        assert!(
            matches!(&err, Some(Error::Config(m)) if m.contains("outbox_capacity")),
            "{err:?}"
        );
    }
    Ok(())
}

/// Write-behind sets of a 16th of `limit` each during an outage: the 16th is refused with
/// `OutboxFull` naming `limit`, and the 15 acknowledged are delivered once the source is back.
async fn fill_the_outbox(
    configure: impl FnOnce(tiercache::TieredCacheBuilder) -> tiercache::TieredCacheBuilder,
    limit: u64,
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("full.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache =
        configure(builder(&source, &clock, &path).strategy(Strategy::WriteBehind)).build()?;
    // An outage: every write stays in the outbox. Values of a 16th of the bound.
    cache.force_source_open().await;
    let chunk = (limit / 16) as usize;
    let mut acked = Vec::new();
    let refused = loop {
        let key = format!("w{}", acked.len());
        match cache.set(&key, vec![b'x'; chunk]).await {
            Ok(()) => acked.push(key),
            Err(e) => break (key, e),
        }
        assert!(acked.len() <= 16, "the bound was never reached");
    };
    assert_eq!(acked.len(), 15);
    let (key, err) = refused;
    assert!(err.is_outbox_full() && !err.is_storage(), "{err:?}");
    assert!(
        matches!(&err, Error::OutboxFull { limit: l, .. } if *l == limit),
        "{err:?}"
    );
    assert!(err.to_string().contains("outbox is full"), "{err}");
    // The refused write is not served (nothing local holds the key: the read goes to the
    // source, which is down); L2's breaker did not count it as a failure.
    let read = cache.get(&key).await;
    assert!(read.as_ref().is_err_and(|e| e.is_unavailable()), "{read:?}");
    assert!(cache.health().await.l2.last_error.is_none());
    let s = cache.store_summary().await?;
    assert_eq!(s.outbox_depth, 15);
    assert!(s.outbox_bytes <= limit, "{s:?}");
    // Everything acknowledged is delivered once the source is back.
    cache.reset_source_breaker().await;
    assert!(cache.flush().await?.is_complete());
    for k in &acked {
        assert_eq!(source.value(k).map(|v| v.len()), Some(chunk), "{k}");
    }
    assert_eq!(source.value(&key), None);
    // With the outbox drained, the same write goes through.
    cache.set(&key, vec![b'x'; chunk]).await?;
    Ok(())
}

#[tokio::test]
async fn opening_checks_the_edges_and_check_integrity_reads_the_whole_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("deep.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    {
        let cache = builder(&source, &clock, &path)
            .strategy(Strategy::CacheAside)
            .build()?;
        for i in 0..400 {
            cache.set(&format!("k{i:04}"), vec![b'v'; 1000]).await?;
        }
        cache.check_integrity().await?;
    }
    // Checkpointed into the file, then a page in the middle of the entries becomes garbage
    // (the header, the schema and every table's first and last pages are left as they were).
    {
        let conn = rusqlite::Connection::open(&path)?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        assert!(pages > 100, "{pages} pages");
        drop(conn);
        let mut bytes = std::fs::read(&path)?;
        let at = (page * (pages / 3)) as usize;
        bytes[at..at + page as usize].fill(0xA5);
        std::fs::write(&path, &bytes)?;
    }
    // Opening reads no whole file, so it does not see the damage; the full check does.
    let cache = builder(&source, &clock, &path)
        .strategy(Strategy::CacheAside)
        .build()?;
    match cache.check_integrity().await {
        Err(tiercache::Error::CorruptDatabase { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected CorruptDatabase, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn check_integrity_recounts_counters_that_rows_written_by_other_means_left_behind(
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raw.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&source, &clock, &path)
        .strategy(Strategy::CacheAside)
        .build()?;
    for i in 0..20 {
        cache.set(&format!("k{i}"), vec![b'v'; 100]).await?;
    }
    // Rows written into the file by another program's raw statements: the counters (and the
    // eviction order) do not see them.
    {
        let conn = rusqlite::Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "DELETE FROM entries WHERE key IN ('k1', 'k2');
             INSERT INTO entries (key, value, validator, stored_at, fresh_until, stale_until, size, last_access)
             VALUES ('raw', zeroblob(500), NULL, 1, 9000000000000, 9000000000000, 500, 1);",
        )?;
    }
    let now = clock.now_millis();
    assert_ne!(cache.store_summary().await?, scan(&path, now)?);
    cache.check_integrity().await?;
    let s = cache.store_summary().await?;
    assert_eq!(s, scan(&path, now)?);
    assert_eq!((s.entries, s.bytes), (19, 18 * 100 + 500));
    // Every entry has its recency row again, the raw one included (eviction can choose it).
    let conn = rusqlite::Connection::open(&path)?;
    let orphans: i64 = conn.query_row(
        "SELECT (SELECT count(*) FROM entries WHERE rowid NOT IN (SELECT id FROM recency))
              + (SELECT count(*) FROM recency WHERE id NOT IN (SELECT rowid FROM entries))",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(orphans, 0);
    // And the writer goes on from the recounted row (it saw another connection commit).
    cache.set("k1", vec![b'v'; 100]).await?;
    assert_eq!(cache.store_summary().await?, scan(&path, now)?);
    Ok(())
}
