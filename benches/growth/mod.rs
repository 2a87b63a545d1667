//! How L2's costs grow with the table (issue #13): the same operations on a 10,000-entry and a
//! 1,000,000-entry database file, 1 KiB values, each file built with one raw bulk insert
//! (through the schema's triggers, as tiercache's own writes go) so that the bench stays short.
//! Also the costs of single writes: a read-through set against a raw upsert, a durable
//! write-behind set against a read-through set, and a set after thousands of reads.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tiercache::{Strategy, TieredCache};

use super::common::{self, SlowSource};
use super::{median, side_by_side, spread, Row, Target, MIB};

/// Entries of the small and the large file.
const SMALL: usize = 10_000;
const LARGE: usize = 1_000_000;
/// L2-hit gets and sets per sample.
const GETS: usize = 2_000;
const SETS: usize = 500;
/// Rounds of the growth ratios.
const ROUNDS: usize = 5;
/// L2's bound for the growth figures: far above what the files hold (no eviction).
const ROOMY: u64 = 64 * 1024 * MIB;

/// A database file of `n` entries.
struct Db {
    _dir: tempfile::TempDir,
    path: PathBuf,
    n: usize,
}

/// `n` entries keyed as [`common::key`], 1 KiB values, fresh for a day, each with its own last
/// access (older keys first): one transaction of one `INSERT … SELECT`.
fn build(n: usize) -> Db {
    let dir = tempfile::tempdir().expect("a tempdir");
    let path = dir.path().join(format!("growth-{n}.db"));
    let conn = common::raw_db(&path);
    let now = common::now_ms();
    conn.execute_batch("PRAGMA synchronous=OFF; PRAGMA cache_size=-262144;")
        .expect("pragmas");
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 - 1)
         INSERT INTO entries (key, value, validator, stored_at, fresh_until, stale_until, size, last_access)
         SELECT printf('bench/keys/%06d.json', i), zeroblob(1024), NULL, ?2, ?2 + 86400000,
                ?2 + 172800000, 1024, ?2 - ?1 + i FROM n",
        rusqlite::params![n as i64, now],
    )
    .expect("the bulk insert");
    // Raw statements: the counters and the recency rows follow by a recount.
    conn.execute_batch(tiercache::tier::sqlite::RECOUNT)
        .expect("the recount");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(conn);
    Db { _dir: dir, path, n }
}

fn open(path: &Path, strategy: Strategy, capacity: u64) -> TieredCache {
    TieredCache::builder()
        .strategy(strategy)
        .source_arc(SlowSource::new(Duration::ZERO))
        .sqlite_path(path)
        .sqlite_capacity(capacity)
        .memory_capacity(64 * MIB)
        .build()
        .expect("the cache builds")
}

/// ns per L2-hit `get` of random keys (L1 emptied first, untimed).
fn l2_gets(
    rt: &tokio::runtime::Runtime,
    cache: &TieredCache,
    n: usize,
    rng: &mut fastrand::Rng,
) -> f64 {
    let keys: Vec<String> = (0..GETS).map(|_| common::key(rng.usize(0..n))).collect();
    rt.block_on(async {
        cache.clear_memory().await;
        let t = Instant::now();
        for k in &keys {
            black_box(cache.get(k).await.expect("get"));
        }
        t.elapsed().as_nanos() as f64 / GETS as f64
    })
}

/// ns per prepared SELECT of random keys on a raw connection (the floor of an L2 hit).
fn raw_selects(conn: &rusqlite::Connection, n: usize, rng: &mut fastrand::Rng) -> f64 {
    let keys: Vec<String> = (0..GETS).map(|_| common::key(rng.usize(0..n))).collect();
    let t = Instant::now();
    for k in &keys {
        black_box(common::raw_get(conn, k));
    }
    t.elapsed().as_nanos() as f64 / GETS as f64
}

/// One set as tiercache's writer makes it (`src/tier/sqlite/changes.rs`), on a raw connection
/// in a transaction of its own: the entry, its recency row, the counters.
fn raw_set(conn: &rusqlite::Connection, key: &str, value: &[u8], now: i64) {
    let tx = conn.unchecked_transaction().expect("begin");
    let (entries, bytes) = common::raw_write_entry(&tx, key, value, now);
    tx.prepare_cached(
        "UPDATE counters SET entries = entries + ?1, bytes = bytes + ?2 WHERE id = 1",
    )
    .expect("prepare")
    .execute([entries, bytes])
    .expect("counters");
    tx.commit().expect("commit");
}

/// ns per [`raw_set`] of random existing keys on a raw connection.
fn raw_sets(conn: &rusqlite::Connection, n: usize, rng: &mut fastrand::Rng) -> f64 {
    let keys: Vec<String> = (0..SETS).map(|_| common::key(rng.usize(0..n))).collect();
    let v = common::value();
    let t = Instant::now();
    for k in &keys {
        raw_set(conn, k, &v, common::now_ms());
    }
    t.elapsed().as_nanos() as f64 / SETS as f64
}

/// ns per `set` of random existing keys, one after another.
fn sets(
    rt: &tokio::runtime::Runtime,
    cache: &TieredCache,
    n: usize,
    rng: &mut fastrand::Rng,
) -> f64 {
    let keys: Vec<String> = (0..SETS).map(|_| common::key(rng.usize(0..n))).collect();
    let v = common::value();
    rt.block_on(async {
        let t = Instant::now();
        for k in &keys {
            cache.set(k, v.clone()).await.expect("set");
        }
        t.elapsed().as_nanos() as f64 / SETS as f64
    })
}

/// ms of `f`, median of 21 calls.
fn ms_of(mut f: impl FnMut()) -> f64 {
    median(
        (0..21)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

/// µs of each of `n` sets of new keys, one after another.
fn set_latencies(
    rt: &tokio::runtime::Runtime,
    cache: &TieredCache,
    prefix: &str,
    n: usize,
) -> Vec<f64> {
    let v = common::value();
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let k = format!("{prefix}/{i:06}");
            let t = Instant::now();
            cache.set(&k, v.clone()).await.expect("set");
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
        out
    })
}

/// The growth rows, and the rows of single writes.
pub(crate) fn rows(rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    let started = Instant::now();
    let (small, large) = (build(SMALL), build(LARGE));
    let built = started.elapsed().as_secs_f64();
    let mut rng = fastrand::Rng::with_seed(13);

    // Opening: `build()` on each file (each already in the OS page cache).
    let open_ms = |db: &Db| {
        ms_of(|| {
            let _guard = rt.enter();
            drop(black_box(open(&db.path, Strategy::CacheAside, ROOMY)));
        })
    };
    let (small_open, large_open) = (open_ms(&small), open_ms(&large));
    rows.push(Row {
        name: "open_1m_vs_10k",
        value: large_open / small_open,
        target: Target::AtMost(3.0),
        detail: format!("build() {large_open:.2} ms on 1M entries vs {small_open:.2} ms on 10k"),
        note: None,
    });

    let (cs, cl) = {
        let _guard = rt.enter();
        (
            open(&small.path, Strategy::CacheAside, ROOMY),
            open(&large.path, Strategy::CacheAside, ROOMY),
        )
    };
    // One pass of random reads on each, untimed: both read connections warm.
    l2_gets(rt, &cs, small.n, &mut rng);
    l2_gets(rt, &cl, large.n, &mut rng);
    let (mut r1, mut r2) = (rng.clone(), rng.clone());
    let (r, a, b, (lo, hi)) = side_by_side(
        ROUNDS,
        || l2_gets(rt, &cl, large.n, &mut r1),
        || l2_gets(rt, &cs, small.n, &mut r2),
    );
    // The floor: the same SELECT on raw connections with the readers' page cache, each warmed
    // by a pass first (as the caches' readers were).
    let (raw_small, raw_large) = (common::raw_db(&small.path), common::raw_db(&large.path));
    raw_selects(&raw_small, small.n, &mut rng);
    raw_selects(&raw_large, large.n, &mut rng);
    let (raw, raw_l, raw_s, _) = side_by_side(
        ROUNDS,
        || raw_selects(&raw_large, large.n, &mut r1),
        || raw_selects(&raw_small, small.n, &mut r2),
    );
    drop((raw_small, raw_large));
    rows.push(Row {
        name: "growth_l2_hit_1m_vs_10k",
        value: r,
        target: Target::AtMost(1.5),
        detail: format!(
            "L2-hit get of random keys {:.1} us at 1M vs {:.1} us at 10k; rounds {lo:.2}..{hi:.2}; \
             raw prepared SELECT {:.1} vs {:.1} us ({raw:.2})",
            a / 1e3,
            b / 1e3,
            raw_l / 1e3,
            raw_s / 1e3,
        ),
        note: None,
    });
    let (r, a, b, (lo, hi)) = side_by_side(
        ROUNDS,
        || sets(rt, &cl, large.n, &mut r1),
        || sets(rt, &cs, small.n, &mut r2),
    );
    // The floor: the writer's statements for a set (`raw_set`), each in its own transaction,
    // on raw connections (no checkpoint in a commit, as in the cache's writer: its
    // checkpointer runs beside it).
    let (raw_small, raw_large) = (common::raw_db(&small.path), common::raw_db(&large.path));
    for conn in [&raw_small, &raw_large] {
        conn.execute_batch("PRAGMA wal_autocheckpoint=0;")
            .expect("no checkpoint in a commit");
    }
    let (raw, raw_l, raw_s, _) = side_by_side(
        ROUNDS,
        || raw_sets(&raw_large, large.n, &mut r1),
        || raw_sets(&raw_small, small.n, &mut r2),
    );
    drop((raw_small, raw_large));
    rows.push(Row {
        name: "growth_set_1m_vs_10k",
        value: r,
        target: Target::AtMost(1.5),
        detail: format!(
            "read-through set of random keys {:.1} us at 1M vs {:.1} us at 10k; rounds {lo:.2}..{hi:.2}; \
             raw set statements {:.1} vs {:.1} us ({raw:.2})",
            a / 1e3,
            b / 1e3,
            raw_l / 1e3,
            raw_s / 1e3,
        ),
        note: None,
    });

    // A set after 4,000 L2-hit reads (their last-access times waiting) against a set with
    // none waiting, on the 1M file.
    let (mut after, mut plain, mut next_slowest, mut upkeep) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let v = common::value();
    for round in 0..ROUNDS {
        rt.block_on(async {
            // Let the last round's touches drain (their commits run once the writer is idle).
            for i in 0..20 {
                cl.set(&format!("drain/{round}/{i}"), v.clone())
                    .await
                    .expect("set");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            cl.memory_usage().await;
            let t = Instant::now();
            cl.set(&format!("plain/{round}"), v.clone())
                .await
                .expect("set");
            plain.push(t.elapsed().as_secs_f64() * 1e6);
            cl.clear_memory().await;
            for _ in 0..4000 {
                black_box(
                    cl.get(&common::key(rng.usize(0..LARGE)))
                        .await
                        .expect("get"),
                );
            }
            // moka's own upkeep after 4,000 promotions (it runs on the next L1 write), paid
            // here, untimed: this row measures what the reads left for L2.
            let t = Instant::now();
            cl.memory_usage().await;
            upkeep.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            cl.set(&format!("after/{round}"), v.clone())
                .await
                .expect("set");
            after.push(t.elapsed().as_secs_f64() * 1e6);
            let mut slowest: f64 = 0.0;
            for i in 0..20 {
                let t = Instant::now();
                cl.set(&format!("next/{round}/{i}"), v.clone())
                    .await
                    .expect("set");
                slowest = slowest.max(t.elapsed().as_secs_f64() * 1e6);
            }
            next_slowest.push(slowest);
        });
    }
    let ratios: Vec<f64> = after.iter().zip(&plain).map(|(a, p)| a / p).collect();
    let (lo, hi) = spread(&ratios);
    rows.push(Row {
        name: "set_after_4k_reads_vs_set",
        value: median(ratios),
        target: Target::AtMost(2.0),
        detail: format!(
            "{:.0} us vs {:.0} us (1M entries); rounds {lo:.2}..{hi:.2}; slowest of the next 20 sets {:.0} us; \
             L1 upkeep after the reads (moka, untimed above) {:.0} us",
            median(after),
            median(plain),
            median(next_slowest),
            median(upkeep)
        ),
        note: None,
    });
    drop(cs);

    // Counters: stats() and health() of a write-behind cache (their backlog reads the store).
    let wb = {
        let _guard = rt.enter();
        open(&large.path, Strategy::WriteBehind, ROOMY)
    };
    let stats = ms_of(|| drop(black_box(rt.block_on(wb.stats()))));
    let health = ms_of(|| drop(black_box(rt.block_on(wb.health()))));
    let summary = ms_of(|| drop(black_box(rt.block_on(wb.store_summary()))));
    for (name, ms) in [("stats_1m_ms", stats), ("health_1m_ms", health)] {
        rows.push(Row {
            name,
            value: ms,
            target: Target::AtMost(2.0),
            detail: format!(
                "write-behind cache on 1M entries, median of 21; store_summary() {summary:.3} ms"
            ),
            note: None,
        });
    }
    drop(wb);

    // Eviction: L2 at its bound with 1M entries; the slowest of 5,000 sets of new keys.
    let held = rt.block_on(cl.store_summary()).expect("summary").bytes;
    drop(cl);
    let at_bound = {
        let _guard = rt.enter();
        open(&large.path, Strategy::CacheAside, held)
    };
    let mut lat = set_latencies(rt, &at_bound, "evict", 5_000);
    lat.sort_by(f64::total_cmp);
    let summary = rt.block_on(at_bound.store_summary()).expect("summary");
    rows.push(Row {
        name: "evict_stall_1m_ms",
        value: lat[lat.len() - 1] / 1e3,
        target: Target::AtMost(20.0),
        detail: format!(
            "slowest of 5,000 sets at the bound; p50 {:.0} us, p99 {:.0} us; {} entries after \
             (bulk build of 10k + 1M entries took {built:.1} s)",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            summary.entries
        ),
        note: None,
    });
    drop(at_bound);
    drop(large);
    single_writes(rt, rows, &small);
}

/// A read-through set against the same upsert on a raw connection, and a durable write-behind
/// set against a read-through set: one caller, one set at a time, on the 10k file.
fn single_writes(rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>, small: &Db) {
    let mt = common::multi_thread(2);
    // Each side on its own copy of the 10k file: on one file they shared one WAL, and its
    // checkpoints landed on whichever side crossed a threshold (the raw side's autocheckpoint,
    // or the cache's checkpointer), which decided the ratio more than either side's writes.
    let copies = tempfile::tempdir().expect("a tempdir");
    let (cache_path, raw_path) = (copies.path().join("cache.db"), copies.path().join("raw.db"));
    for path in [&cache_path, &raw_path] {
        common::raw_db(&small.path)
            .execute("VACUUM INTO ?1", [path.to_str().expect("a UTF-8 path")])
            .expect("a copy of the 10k file");
    }
    let cache = {
        let _guard = rt.enter();
        open(&cache_path, Strategy::CacheAside, ROOMY)
    };
    let raw = common::raw_db(&raw_path);
    // No checkpoint inside a commit, as in the cache's writer (its checkpointer thread runs
    // beside it): with SQLite's default, one commit in ~300 copied the WAL back.
    raw.execute_batch("PRAGMA wal_autocheckpoint=0;")
        .expect("no checkpoint in a commit");
    let v = common::value();
    // Both sides write the same keys, in turn.
    let next = std::cell::Cell::new(0usize);
    let key = || {
        next.set(next.get() + 1);
        common::key(next.get() % SMALL)
    };
    let (r, a, b, (lo, hi)) = side_by_side(
        ROUNDS,
        || {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..SETS {
                    cache.set(&key(), v.clone()).await.expect("set");
                }
                t.elapsed().as_nanos() as f64 / SETS as f64
            })
        },
        || {
            let t = Instant::now();
            for _ in 0..SETS {
                raw_set(&raw, &key(), &v, common::now_ms());
            }
            t.elapsed().as_nanos() as f64 / SETS as f64
        },
    );
    // The bare upsert alone (no counters, no recency), for scale.
    let bare = median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..SETS {
                    common::raw_put(&raw, &key(), &v, common::now_ms());
                }
                t.elapsed().as_nanos() as f64 / SETS as f64
            })
            .collect(),
    );
    rows.push(Row {
        name: "set_vs_raw_upsert",
        value: r,
        target: Target::AtMost(1.5),
        detail: format!(
            "read-through set {:.1} us vs the same statements on a raw connection (own \
             transaction: the upsert, its recency row, the counters) {:.1} us, 10k entries; \
             rounds {lo:.2}..{hi:.2}; the bare upsert alone {:.1} us",
            a / 1e3,
            b / 1e3,
            bare / 1e3
        ),
        note: None,
    });
    drop(raw);
    let dir = tempfile::tempdir().expect("a tempdir");
    let (wb, rt_cache) = {
        let _guard = mt.enter();
        (
            open(&dir.path().join("wb.db"), Strategy::WriteBehind, ROOMY),
            open(&dir.path().join("rt.db"), Strategy::ReadThrough, ROOMY),
        )
    };
    let one_by_one = |c: &TieredCache| {
        let c = c.clone();
        let v = v.clone();
        mt.block_on(async move {
            tokio::spawn(async move {
                let t = Instant::now();
                for j in 0..SETS {
                    c.set(&common::key(j), v.clone()).await.expect("set");
                }
                t.elapsed().as_nanos() as f64 / SETS as f64
            })
            .await
            .expect("the setter")
        })
    };
    let (r, a, b, (lo, hi)) = side_by_side(ROUNDS, || one_by_one(&wb), || one_by_one(&rt_cache));
    rows.push(Row {
        name: "write_behind_set_vs_set",
        value: r,
        target: Target::AtMost(2.0),
        detail: format!(
            "durable write-behind set {:.1} us vs read-through set {:.1} us, one caller, instant source; rounds {lo:.2}..{hi:.2}",
            a / 1e3,
            b / 1e3
        ),
        note: None,
    });
}
