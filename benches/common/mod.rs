//! Shared bench helpers: keys, values, a Zipf sampler, an in-process source with latency, the raw
//! SQLite connection tiercache's L2 is compared with, and the loopback fake GitHub.
//!
//! Each bench uses a different subset of these.
#![allow(dead_code)]

pub mod report;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::Connection;
use tiercache::source::{Fetched, Source, SourceError};
use tiercache::{Strategy, TieredCache};

/// The size of every value: 1 KiB.
pub const VALUE_LEN: usize = 1024;

/// A 1 KiB value. Built from a `Vec` like values that arrive from SQLite or the network, so
/// tiercache's values and the raw dependencies' values are the same kind of `Bytes`.
pub fn value() -> Bytes {
    Bytes::from(
        (0..VALUE_LEN)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// The `i`-th key: short, ASCII, like a file path.
pub fn key(i: usize) -> String {
    format!("bench/keys/{i:06}.json")
}

/// `n` keys.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(key).collect()
}

/// The `i`-th GitHub key, `owner/repo/path`.
pub fn gh_key(i: usize) -> String {
    format!("octo/app/files/{i:08}.txt")
}

/// A single-threaded runtime with time and I/O.
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A multi-threaded runtime with `workers` workers.
pub fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The directory benchmark reports go to: `$CARGO_TARGET_DIR`, else `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

// ------------------------------------------------------------------ Zipf

/// Zipf(s) over `0..n`: a precomputed CDF and a binary search. Rank 0 is the hottest key.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        assert!(n > 0, "Zipf over no keys");
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 1..=n {
            total += 1.0 / (k as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Self { cdf }
    }

    /// A rank in `0..n`.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        let u = rng.f64();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }

    /// `len` ranks, precomputed so that sampling is not part of what is measured.
    pub fn trace(&self, len: usize, seed: u64) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..len).map(|_| self.sample(&mut rng)).collect()
    }
}

// ------------------------------------------------------------------ a source with latency

/// An in-process source: every key exists (a 1 KiB value), every write is accepted, each call
/// takes `latency` (a tokio sleep; zero means no sleep at all), and calls are counted.
#[derive(Debug)]
pub struct SlowSource {
    latency: Duration,
    value: Bytes,
    fetches: AtomicUsize,
    writes: AtomicUsize,
}

impl SlowSource {
    pub fn new(latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            latency,
            value: value(),
            fetches: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
        })
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::Relaxed)
    }

    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::Relaxed)
    }

    async fn wait(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

#[async_trait]
impl Source for SlowSource {
    async fn fetch(&self, _key: &str, _validator: Option<&str>) -> Result<Fetched, SourceError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        Ok(Fetched::value(self.value.clone()))
    }

    async fn put(&self, _key: &str, _value: &[u8]) -> Result<(), SourceError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        Ok(())
    }

    async fn delete(&self, _key: &str) -> Result<(), SourceError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        Ok(())
    }
}

/// A cache with `strategy` over `source`, L2 in the file `db`, L1 bounded to `memory` bytes.
/// Retries are slow so that a bench never spins on them. Call within a runtime (write-behind
/// starts a task).
pub fn cache(
    strategy: Strategy,
    source: Arc<SlowSource>,
    db: &Path,
    memory: u64,
    stats: bool,
) -> TieredCache {
    TieredCache::builder()
        .strategy(strategy)
        .source_arc(source)
        .sqlite_path(db)
        .memory_capacity(memory)
        .stats(stats)
        .build()
        .expect("the cache builds")
}

/// Sets `keys` to `value()` with up to 256 sets in flight, so group commit fills L2 quickly.
pub async fn fill(cache: &TieredCache, keys: &[String]) {
    use futures_util::stream::{self, StreamExt};
    let v = value();
    stream::iter(keys)
        .map(|k| {
            // Each key its own buffer, as values are in a real cache.
            let v = Bytes::copy_from_slice(&v);
            async move { cache.set(k, v).await.expect("set") }
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
}

// ------------------------------------------------------------------ raw SQLite

/// tiercache's L2 schema, copied from `src/tier/sqlite.rs` (schema version 1), so the raw side
/// reads and writes the same table layout and indexes.
pub use tiercache::tier::sqlite::SCHEMA;

/// The columns tiercache reads for one entry.
pub const SELECT_ONE: &str =
    "SELECT value, validator, stored_at, fresh_until, stale_until FROM entries WHERE key = ?1";

/// The upsert tiercache writes one entry with.
pub const UPSERT: &str = "INSERT INTO entries (key, value, validator, stored_at, fresh_until, stale_until, size, last_access)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?4)
 ON CONFLICT(key) DO UPDATE SET value = excluded.value, validator = excluded.validator,
   stored_at = excluded.stored_at, fresh_until = excluded.fresh_until,
   stale_until = excluded.stale_until, size = excluded.size, last_access = excluded.last_access";

/// A connection with tiercache's pragmas (WAL, `synchronous=NORMAL`, 5 s busy timeout, a
/// 32-statement cache) and schema.
pub fn raw_db(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open the raw database");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy_timeout");
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .expect("WAL");
    assert!(mode.eq_ignore_ascii_case("wal"));
    conn.execute_batch(&format!(
        "PRAGMA synchronous=NORMAL; PRAGMA cache_size=-{};",
        tiercache::tier::sqlite::READER_CACHE_KIB
    ))
    .expect("synchronous, cache_size");
    conn.execute_batch(SCHEMA).expect("schema");
    conn.execute_batch(&format!(
        "PRAGMA user_version={}; PRAGMA application_id={};",
        tiercache::tier::sqlite::SCHEMA_VERSION,
        tiercache::tier::sqlite::APPLICATION_ID
    ))
    .expect("user_version");
    conn.set_prepared_statement_cache_capacity(32);
    rusqlite::vtab::array::load_module(&conn).expect("the array module");
    conn
}

/// What the raw side builds from a row: the same owned value tiercache builds.
pub type RawEntry = (Option<Bytes>, Option<String>, i64, i64, i64);

/// One prepared SELECT of an entry, decoded like tiercache decodes it.
pub fn raw_get(conn: &Connection, key: &str) -> Option<RawEntry> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached(SELECT_ONE)
        .expect("prepare")
        .query_row([key], |r| {
            Ok((
                r.get::<_, Option<Vec<u8>>>(0)?.map(Bytes::from),
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            ))
        })
        .optional()
        .expect("select")
}

/// One prepared `rarray` SELECT of many keys, decoded as [`raw_get`] decodes one row.
pub fn raw_get_many(conn: &Connection, keys: &[&str]) -> Vec<(String, RawEntry)> {
    let array: std::rc::Rc<Vec<rusqlite::types::Value>> = std::rc::Rc::new(
        keys.iter()
            .map(|k| rusqlite::types::Value::from((*k).to_owned()))
            .collect(),
    );
    let mut stmt = conn
        .prepare_cached(
            "SELECT e.key, e.value, e.validator, e.stored_at, e.fresh_until, e.stale_until
             FROM rarray(?1) AS r CROSS JOIN entries AS e ON e.key = r.value",
        )
        .expect("prepare");
    stmt.query_map([array], |r| {
        Ok((
            r.get(0)?,
            (
                r.get::<_, Option<Vec<u8>>>(1)?.map(Bytes::from),
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ),
        ))
    })
    .expect("query")
    .collect::<rusqlite::Result<_>>()
    .expect("rows")
}

/// One prepared upsert of an entry (its own transaction, as each lone `set` is).
pub fn raw_put(conn: &Connection, key: &str, value: &[u8], now: i64) {
    conn.prepare_cached(UPSERT)
        .expect("prepare")
        .execute(rusqlite::params![
            key,
            value,
            Option::<String>::None,
            now,
            now + 300_000,
            now + 86_700_000,
            value.len() as i64,
        ])
        .expect("upsert");
}

/// The entry statements of one set as tiercache's writer makes them
/// (`src/tier/sqlite/changes.rs`), on a raw connection inside the caller's transaction: the
/// held row's rowid and size read, the row updated (or inserted), its recency row written.
/// What the counters change by: (entries, bytes).
pub fn raw_write_entry(conn: &Connection, key: &str, value: &[u8], now: i64) -> (i64, i64) {
    use rusqlite::{params, OptionalExtension};
    let held: Option<(i64, i64)> = conn
        .prepare_cached("SELECT rowid, size, value IS NULL FROM entries WHERE key = ?1")
        .expect("prepare")
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .expect("select");
    let size = value.len() as i64;
    match held {
        Some((rowid, old)) => {
            conn.prepare_cached(
                "UPDATE entries SET value = ?2, validator = NULL, stored_at = ?3,
                   fresh_until = ?3 + 300000, stale_until = ?3 + 86700000, size = ?4,
                   last_access = ?3 WHERE rowid = ?1",
            )
            .expect("prepare")
            .execute(params![rowid, value, now, size])
            .expect("update");
            conn.prepare_cached("UPDATE recency SET at = ?2 WHERE id = ?1")
                .expect("prepare")
                .execute([rowid, now])
                .expect("recency");
            (0, size - old)
        }
        None => {
            raw_put(conn, key, value, now);
            conn.prepare_cached("INSERT OR REPLACE INTO recency (id, at) VALUES (?1, ?2)")
                .expect("prepare")
                .execute([conn.last_insert_rowid(), now])
                .expect("recency");
            (1, size)
        }
    }
}

/// Milliseconds since the UNIX epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ------------------------------------------------------------------ the loopback fake GitHub

/// A wiremock fake GitHub answering every contents request under `octo/app` with a 1 KiB raw
/// file, an ETag and rate-limit headers that never run out. Request recording is off so a long
/// run does not grow memory. Its server runs on wiremock's own thread.
pub async fn fake_github() -> wiremock::MockServer {
    use wiremock::matchers::{method, path_regex};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::builder()
        .disable_request_recording()
        .start()
        .await;
    let reset = (now_ms() / 1000 + 3600).to_string();
    Mock::given(method("GET"))
        .and(path_regex(r"^/repos/octo/app/contents/"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-ratelimit-limit", "5000")
                .insert_header("x-ratelimit-remaining", "4999")
                .insert_header("x-ratelimit-reset", reset.as_str())
                .insert_header("etag", "\"0123456789abcdef\"")
                .set_body_raw(value().to_vec(), "application/vnd.github.raw"),
        )
        .mount(&server)
        .await;
    server
}

/// A file database holding `n` keys, a cache over it with an L1 of `memory` bytes (cleared, so
/// reads start cold), and a raw connection to the same file with the same pragmas.
pub struct L2Fixture {
    pub dir: tempfile::TempDir,
    pub keys: Vec<String>,
    pub cache: TieredCache,
    pub raw: Connection,
}

pub fn l2_fixture(rt: &tokio::runtime::Runtime, n: usize, memory: u64) -> L2Fixture {
    let dir = tempfile::tempdir().expect("a tempdir");
    let db = dir.path().join("l2.db");
    let keys = keys(n);
    let cache = rt.block_on(async {
        let cache = cache(
            tiercache::Strategy::CacheAside,
            SlowSource::new(Duration::ZERO),
            &db,
            memory,
            true,
        );
        fill(&cache, &keys).await;
        // One pass in order from L2 (as the benches read: it warms the read connection's page
        // cache, as the raw side's pass below warms the raw connection's), then check where
        // reads are served from.
        cache.clear_memory().await;
        for k in &keys {
            cache.get(k).await.expect("get");
        }
        cache.clear_memory().await;
        let mut from_l2 = 0;
        for k in &keys[..100] {
            if cache.lookup(k).await.expect("get").expect("held").tier == tiercache::Tier::L2 {
                from_l2 += 1;
            }
        }
        assert!(from_l2 >= 95, "only {from_l2}/100 reads were L2 hits");
        cache
    });
    let raw = raw_db(&db);
    // One pass in order on the raw connection too: both sides start with a warm page cache.
    for k in &keys {
        assert!(raw_get(&raw, k).is_some());
    }
    L2Fixture {
        dir,
        keys,
        cache,
        raw,
    }
}
