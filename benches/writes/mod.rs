//! The rows of write-behind throughput: 128 setter tasks on a 2-worker runtime, 1 KiB values,
//! 10,000 keys; memory mode against raw moka inserts, and durable mode in sets per second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use moka::future::Cache as Moka;
use tiercache::{Strategy, TieredCache};

use super::common::{self, SlowSource};
use super::{l1_moka, median, side_by_side, spread, Row, Target, L2_KEYS, MIB, SETS_EACH, SETTERS};

/// What the setter tasks write into: the cache (an acknowledged `set`) or raw moka (an insert).
pub(crate) trait Setter: Clone + Send + Sync + 'static {
    fn put(&self, key: &str, value: Bytes) -> impl std::future::Future<Output = ()> + Send;
}

// The calls' own futures, mapped: no state machine of the bench's around either side.
impl Setter for TieredCache {
    fn put(&self, key: &str, value: Bytes) -> impl std::future::Future<Output = ()> + Send {
        self.set(key, value).map(|done| done.expect("set"))
    }
}

impl Setter for Moka<String, Bytes> {
    fn put(&self, key: &str, value: Bytes) -> impl std::future::Future<Output = ()> + Send {
        self.insert(key.to_owned(), value)
    }
}

/// `SETTERS` tasks on `rt`, task `s` putting `each` times the bench's value under key
/// `(s * stride + j) % keys.len()` for `j` in `0..each`. The time until all are done.
fn run_setters<S: Setter>(
    rt: &tokio::runtime::Runtime,
    target: &S,
    keys: &Arc<Vec<String>>,
    stride: usize,
    each: usize,
) -> Duration {
    let v = common::value();
    rt.block_on(async {
        let t = Instant::now();
        let tasks: Vec<_> = (0..SETTERS)
            .map(|s| {
                let (target, keys, v) = (target.clone(), keys.clone(), v.clone());
                tokio::spawn(profile_setter_task(target, keys, v, s * stride, each))
            })
            .collect();
        for task in tasks {
            task.await.expect("a setter");
        }
        t.elapsed()
    })
}

/// One setter task: `each` puts from key `first` on. Named `profile_…` so that
/// `--toggle-collect='*profile_*'` counts what the tasks do on the runtime's threads when a
/// write scenario is profiled.
async fn profile_setter_task<S: Setter>(
    target: S,
    keys: Arc<Vec<String>>,
    value: Bytes,
    first: usize,
    each: usize,
) {
    for j in 0..each {
        target
            .put(&keys[(first + j) % keys.len()], value.clone())
            .await;
    }
}

/// Sets/s with `SETTERS` tasks each making `SETS_EACH` acknowledged sets, on `rt`.
pub(crate) fn sets_per_sec(
    rt: &tokio::runtime::Runtime,
    cache: &TieredCache,
    keys: &Arc<Vec<String>>,
) -> f64 {
    let took = run_setters(rt, cache, keys, SETS_EACH, SETS_EACH);
    (SETTERS * SETS_EACH) as f64 / took.as_secs_f64()
}

/// Raw moka inserts/s, same tasks, keys and values.
pub(crate) fn moka_inserts_per_sec(
    rt: &tokio::runtime::Runtime,
    moka: &Moka<String, Bytes>,
    keys: &Arc<Vec<String>>,
) -> f64 {
    let took = run_setters(rt, moka, keys, SETS_EACH, SETS_EACH);
    (SETTERS * SETS_EACH) as f64 / took.as_secs_f64()
}

/// A durable write-behind cache: the outbox row and the L2 entry committed (group commit) before
/// a set is acknowledged. Zero-latency source, so the background flusher keeps up.
pub(crate) fn durable_write_behind(
    rt: &tokio::runtime::Runtime,
    db: &std::path::Path,
    latency: Duration,
    synchronous: tiercache::Synchronous,
) -> TieredCache {
    let _guard = rt.enter();
    TieredCache::builder()
        .strategy(Strategy::WriteBehind)
        .source_arc(SlowSource::new(latency))
        .sqlite_path(db)
        .synchronous(synchronous)
        .memory_capacity(64 * MIB)
        .build()
        .expect("the cache builds")
}

/// A memory-mode write-behind cache: the outbox in memory, L2 written in the background. A set
/// is acknowledged once it is in L1 and the in-memory outbox.
pub(crate) fn memory_write_behind(
    rt: &tokio::runtime::Runtime,
    db: &std::path::Path,
    latency: Duration,
) -> TieredCache {
    let _guard = rt.enter();
    TieredCache::builder()
        .strategy(Strategy::WriteBehind)
        .outbox(tiercache::OutboxMode::Memory)
        .source_arc(SlowSource::new(latency))
        .sqlite_path(db)
        .memory_capacity(64 * MIB)
        .build()
        .expect("the cache builds")
}

#[inline(never)]
pub(crate) fn profile_write_behind(rt: &tokio::runtime::Runtime, cache: &TieredCache, n: usize) {
    run_setters(rt, cache, &Arc::new(common::keys(L2_KEYS)), 64, n / SETTERS);
}

/// The raw side of `write_behind_vs_moka_insert` in `profile_write_behind`'s pattern: the same
/// tasks, keys and values inserted into raw moka.
#[inline(never)]
pub(crate) fn profile_moka_insert(
    rt: &tokio::runtime::Runtime,
    moka: &Moka<String, Bytes>,
    n: usize,
) {
    run_setters(rt, moka, &Arc::new(common::keys(L2_KEYS)), 64, n / SETTERS);
}

#[inline(never)]
pub(crate) fn profile_write_behind_floor(db: &std::path::Path, n: usize) {
    raw_durable_floor(db, n, 64, false);
}

/// The write rows: `write_behind_vs_moka_insert`, `write_behind_durable_sets_per_sec`.
pub(crate) fn rows(mt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().expect("a tempdir");
    let w_keys = Arc::new(common::keys(L2_KEYS));
    // Memory mode against the bench's standard 5 ms fake source (deliveries run behind the
    // writes, as against a real remote); an instant source beside it.
    let memory_mode =
        memory_write_behind(mt, &dir.path().join("memory.db"), Duration::from_millis(5));
    let moka = mt.block_on(l1_moka(&[]));
    let (r, a, b, (lo, hi)) = side_by_side(
        5,
        || sets_per_sec(mt, &memory_mode, &w_keys),
        || moka_inserts_per_sec(mt, &moka, &w_keys),
    );
    drop(memory_mode);
    let instant = memory_write_behind(mt, &dir.path().join("instant-memory.db"), Duration::ZERO);
    let (instant_r, _, _, _) = side_by_side(
        5,
        || sets_per_sec(mt, &instant, &w_keys),
        || moka_inserts_per_sec(mt, &moka, &w_keys),
    );
    drop(instant);
    rows.push(Row {
        name: "write_behind_vs_moka_insert",
        value: r,
        target: Target::AtLeast(0.8),
        detail: format!(
            "{:.0} k sets/s vs {:.0} k inserts/s, 5 ms source; rounds {lo:.3}..{hi:.3}; \
             instant source {instant_r:.3}",
            a / 1e3,
            b / 1e3
        ),
        note: None,
    });
    // Durable: the bench's standard fake source (5 ms per call, so deliveries run behind the
    // writes as against a real remote), synchronous=NORMAL; beside it, an instant source (every
    // write delivered and removed at once: the worst case for the writer thread) and FULL.
    let durable_rate = |name: &str, latency: Duration, sync: tiercache::Synchronous| {
        let cache = durable_write_behind(mt, &dir.path().join(name), latency, sync);
        let rates: Vec<f64> = (0..5).map(|_| sets_per_sec(mt, &cache, &w_keys)).collect();
        let (lo, hi) = spread(&rates);
        (median(rates), lo, hi)
    };
    let (rate, lo, hi) = durable_rate("durable.db", Duration::from_millis(5), Default::default());
    let (instant, instant_lo, instant_hi) =
        durable_rate("instant.db", Duration::ZERO, Default::default());
    let (full, _, _) = durable_rate(
        "full.db",
        Duration::from_millis(5),
        tiercache::Synchronous::Full,
    );
    // The floor: the same statements, the same keys in the same order, on a raw connection in
    // commits of 64 (the writer's batches measured 63 sets on average), with the delivery's
    // deletes in the next commit and checkpoints on a thread of their own; beside it, the least
    // any durable write-behind on SQLite writes.
    let floor_rate = |name: &str, minimal: bool| {
        let rates: Vec<f64> = (0..5)
            .map(|i| {
                let db = dir.path().join(format!("{name}-{i}.db"));
                let rate = raw_durable_floor(&db, 40_000, 64, minimal);
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
                }
                rate
            })
            .collect();
        median(rates)
    };
    let floor = floor_rate("floor", false);
    let minimal = floor_rate("minimal", true);
    rows.push(Row {
        name: "write_behind_durable_sets_per_sec",
        value: instant,
        target: Target::AtLeast(50_000.0),
        detail: format!(
            "{SETTERS} setters, acknowledged after commit, instant source; rounds {:.0}k..{:.0}k; \
             5 ms source {:.0}k/s (rounds {:.0}k..{:.0}k); synchronous=FULL, 5 ms source {:.0}k/s; \
             raw floor {:.0}k/s (key and value alone {:.0}k/s)",
            instant_lo / 1e3,
            instant_hi / 1e3,
            rate / 1e3,
            lo / 1e3,
            hi / 1e3,
            full / 1e3,
            floor / 1e3,
            minimal / 1e3
        ),
        note: None,
    });
    rows.push(Row {
        name: "write_behind_durable_vs_floor",
        value: instant / floor,
        target: Target::AtLeast(0.9),
        detail: format!(
            "{:.0}k sets/s vs {:.0}k/s: tiercache's statements for each set on one raw \
             connection, commits of 64, no threads; the least a durable write-behind on SQLite \
             writes (an upsert of key and value, an outbox row and its delete, no other index) \
             {:.0}k/s",
            instant / 1e3,
            floor / 1e3,
            minimal / 1e3
        ),
        note: None,
    });
}

/// Sets/s of a durable write-behind made of tiercache's own statements on one raw connection,
/// no threads: per set the entry (read its rowid, update it), its recency row and an outbox row
/// with the value; per `batch` sets one commit, which also deletes the previous batch's outbox
/// rows (their delivery to an instant source) and writes the counters. Checkpoints as the
/// writer has them made. `n` sets after a fill of `L2_KEYS` entries. `minimal`: the least any
/// durable write-behind on SQLite writes instead: an upsert into a table of key and value, an
/// outbox row, its delete; no recency, counters or secondary indexes.
pub(crate) fn raw_durable_floor(
    db: &std::path::Path,
    n: usize,
    batch: usize,
    minimal: bool,
) -> f64 {
    use rusqlite::params;
    let conn = if minimal {
        let conn = rusqlite::Connection::open(db).expect("open");
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE entries (key TEXT PRIMARY KEY NOT NULL, value BLOB);
             CREATE TABLE outbox (id INTEGER PRIMARY KEY, key TEXT NOT NULL, value BLOB);",
        )
        .expect("schema");
        rusqlite::vtab::array::load_module(&conn).expect("array");
        conn
    } else {
        common::raw_db(db)
    };
    let keys = common::keys(L2_KEYS);
    let v = common::value();
    let now = common::now_ms();
    {
        let tx = conn.unchecked_transaction().expect("begin");
        for k in &keys {
            if minimal {
                tx.execute(
                    "INSERT INTO entries (key, value) VALUES (?1, ?2)",
                    params![k, &v[..]],
                )
                .expect("fill");
            } else {
                common::raw_put(&tx, k, &v, now);
            }
        }
        if !minimal {
            tx.execute_batch(tiercache::tier::sqlite::RECOUNT)
                .expect("recount");
        }
        tx.commit().expect("commit");
    }
    // Checkpoints as tiercache makes them: never on the writing connection, on a thread of
    // their own asked every 64 commits.
    conn.execute_batch("PRAGMA wal_autocheckpoint=0")
        .expect("autocheckpoint");
    let (ask, asked) = std::sync::mpsc::sync_channel::<()>(1);
    let checkpointer = {
        let c = rusqlite::Connection::open(db).expect("open the checkpointer's connection");
        std::thread::spawn(move || {
            while asked.recv().is_ok() {
                let _ = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        })
    };
    let mut commits = 0;
    let t = Instant::now();
    let mut i = 0;
    let mut delivered = Vec::new();
    while i < n {
        let tx = conn.unchecked_transaction().expect("begin");
        let mut ids = Vec::with_capacity(batch);
        let mut counts = (0, 0);
        for _ in 0..batch {
            // The keys in the order the bench's setters make them: each setter its own run,
            // the setters side by side.
            let (s, j) = (i % SETTERS, (i / SETTERS) % SETS_EACH);
            let k = &keys[(s * SETS_EACH + j) % keys.len()];
            i += 1;
            let now = common::now_ms();
            if minimal {
                tx.prepare_cached(
                    "INSERT INTO entries (key, value) VALUES (?1, ?2)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                )
                .expect("prepare")
                .execute(params![k, &v[..]])
                .expect("upsert");
                tx.prepare_cached("INSERT INTO outbox (key, value) VALUES (?1, ?2)")
                    .expect("prepare")
                    .execute(params![k, &v[..]])
                    .expect("outbox");
            } else {
                let (entries, bytes) = common::raw_write_entry(&tx, k, &v, now);
                counts = (counts.0 + entries, counts.1 + bytes);
                tx.prepare_cached(
                    "INSERT INTO outbox (key, op, value, created_at, next_attempt)
                     VALUES (?1, 'put', ?2, ?3, 0)",
                )
                .expect("prepare")
                .execute(params![k, &v[..], now])
                .expect("outbox");
            }
            ids.push(rusqlite::types::Value::from(tx.last_insert_rowid()));
        }
        // The delivery of the previous batch's rows, in this commit.
        let gone = delivered.len() as i64;
        tx.prepare_cached("DELETE FROM outbox WHERE id IN rarray(?1)")
            .expect("prepare")
            .execute([std::rc::Rc::new(std::mem::replace(&mut delivered, ids))])
            .expect("delete");
        // The counters once per commit, as the writer writes their sum.
        if !minimal {
            tx.prepare_cached(
                "UPDATE counters SET entries = entries + ?1, bytes = bytes + ?2,
                   pending = pending + ?3 WHERE id = 1",
            )
            .expect("prepare")
            .execute(params![counts.0, counts.1, batch as i64 - gone])
            .expect("counters");
        }
        tx.commit().expect("commit");
        commits += 1;
        if commits % 64 == 0 {
            let _ = ask.try_send(());
        }
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    drop(ask);
    checkpointer.join().expect("the checkpointer");
    rate
}
