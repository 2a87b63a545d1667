//! The rows of L2 reads: an L2-hit `get` and an `mget` of 100 keys against raw rusqlite and
//! against their floor (the same work done by raw moka and raw rusqlite calls alone), on a file
//! database of 10,000 keys, L1 emptied before each round.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use moka::future::Cache as Moka;
use tiercache::TieredCache;

use super::common;
use super::{l1_moka, per_op, side_by_side, Row, Target, L2_GETS, L2_KEYS, MIB, ROUNDS};

pub(crate) struct L2 {
    _dir: tempfile::TempDir,
    keys: Vec<String>,
    pub(crate) cache: TieredCache,
    raw: rusqlite::Connection,
    /// Where the next read starts: reads cycle in order over `L2_KEYS` keys.
    cursor: AtomicUsize,
}

impl L2 {
    fn next(&self) -> &str {
        &self.keys[self.cursor.fetch_add(1, Ordering::Relaxed) % L2_KEYS]
    }

    fn window(&self) -> Vec<&str> {
        (0..100).map(|_| self.next()).collect()
    }
}

pub(crate) fn l2_setup(rt: &tokio::runtime::Runtime) -> L2 {
    let f = common::l2_fixture(rt, L2_KEYS, 64 * MIB);
    L2 {
        _dir: f.dir,
        keys: f.keys,
        cache: f.cache,
        raw: f.raw,
        cursor: AtomicUsize::new(100),
    }
}

/// ns per L2-hit `get` (cold L1, promotion included).
pub(crate) async fn l2_gets(l2: &L2, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        black_box(l2.cache.get(l2.next()).await.unwrap());
    }
    per_op(t, n)
}

/// ns per raw prepared SELECT (decoded into the same owned values).
pub(crate) fn sqlite_gets(l2: &L2, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        black_box(common::raw_get(&l2.raw, l2.next()));
    }
    per_op(t, n)
}

/// ns per key of `mget` over windows of 100 keys.
pub(crate) async fn mgets(l2: &L2, windows: usize) -> f64 {
    let ks: Vec<Vec<&str>> = (0..windows).map(|_| l2.window()).collect();
    let t = Instant::now();
    for w in &ks {
        black_box(l2.cache.mget(w).await);
    }
    per_op(t, windows * 100)
}

/// ns per key of 100 single `get`s over windows of 100 keys.
pub(crate) async fn hundred_gets(l2: &L2, windows: usize) -> f64 {
    let ks: Vec<Vec<&str>> = (0..windows).map(|_| l2.window()).collect();
    let t = Instant::now();
    for w in &ks {
        for k in w {
            black_box(l2.cache.get(k).await.unwrap());
        }
    }
    per_op(t, windows * 100)
}

/// ns per L2 hit made of the raw parts alone: a moka get that misses, the prepared SELECT, a
/// moka insert of the value (the promotion). What any moka-over-SQLite cache pays before a line
/// of its own code runs: the floor under `l2_hit_vs_sqlite`.
pub(crate) async fn floor_gets(l2: &L2, moka: &Moka<String, Bytes>, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        let k = l2.next();
        if moka.get(k).await.is_none() {
            if let Some((Some(v), ..)) = common::raw_get(&l2.raw, k) {
                moka.insert(k.to_owned(), v.clone()).await;
                black_box(v);
            }
        }
    }
    per_op(t, n)
}

/// ns per key of the raw parts of an `mget` of 100 keys: 100 moka gets that miss, one `rarray`
/// SELECT, 100 moka inserts. The floor under `mget100_vs_100_gets`.
pub(crate) async fn floor_mgets(l2: &L2, moka: &Moka<String, Bytes>, windows: usize) -> f64 {
    let ks: Vec<Vec<&str>> = (0..windows).map(|_| l2.window()).collect();
    let t = Instant::now();
    for w in &ks {
        let mut missing = Vec::with_capacity(w.len());
        for k in w {
            if moka.get(*k).await.is_none() {
                missing.push(*k);
            }
        }
        for (k, (v, ..)) in common::raw_get_many(&l2.raw, &missing) {
            if let Some(v) = v {
                moka.insert(k, v.clone()).await;
                black_box(v);
            }
        }
    }
    per_op(t, windows * 100)
}

pub(crate) async fn clear_moka(moka: &Moka<String, Bytes>) {
    moka.invalidate_all();
    moka.run_pending_tasks().await;
}

#[inline(never)]
pub(crate) fn profile_l2_tiercache(rt: &tokio::runtime::Runtime, l2: &L2, n: usize) {
    rt.block_on(l2_gets(l2, n));
}

#[inline(never)]
pub(crate) fn profile_l2_sqlite(l2: &L2, n: usize) {
    sqlite_gets(l2, n);
}

#[inline(never)]
pub(crate) fn profile_mget100(rt: &tokio::runtime::Runtime, l2: &L2, n: usize) {
    rt.block_on(mgets(l2, n / 100));
}

#[inline(never)]
pub(crate) fn profile_gets100(rt: &tokio::runtime::Runtime, l2: &L2, n: usize) {
    rt.block_on(hundred_gets(l2, n / 100));
}

#[inline(never)]
pub(crate) fn profile_l2_floor(
    rt: &tokio::runtime::Runtime,
    l2: &L2,
    moka: &Moka<String, Bytes>,
    n: usize,
) {
    rt.block_on(floor_gets(l2, moka, n));
}

#[inline(never)]
pub(crate) fn profile_mget100_floor(
    rt: &tokio::runtime::Runtime,
    l2: &L2,
    moka: &Moka<String, Bytes>,
    n: usize,
) {
    rt.block_on(floor_mgets(l2, moka, n / 100));
}

/// The L2 rows: `l2_hit_vs_sqlite`, `l2_hit_vs_floor`, `mget100_vs_100_gets`, `mget100_vs_floor`.
pub(crate) fn rows(rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    // L2: a file database, reads cycling over 10,000 keys, L1 emptied before each round (every
    // read an L2 hit, promoted). Beside each figure, its floor: the same work done by raw moka
    // and raw rusqlite calls alone, measured in this run.
    let l2 = l2_setup(rt);
    let floor_l1 = rt.block_on(l1_moka(&[]));
    let (r, a, b, (lo, hi)) = side_by_side(
        ROUNDS,
        || {
            rt.block_on(l2.cache.clear_memory());
            rt.block_on(l2_gets(&l2, L2_GETS))
        },
        || sqlite_gets(&l2, L2_GETS),
    );
    let (floor, f, _, _) = side_by_side(
        ROUNDS,
        || {
            rt.block_on(clear_moka(&floor_l1));
            rt.block_on(floor_gets(&l2, &floor_l1, L2_GETS))
        },
        || sqlite_gets(&l2, L2_GETS),
    );
    rows.push(Row {
        name: "l2_hit_vs_sqlite",
        value: r,
        target: Target::AtMost(1.5),
        detail: format!(
            "{a:.0} ns vs {b:.0} ns per get; rounds {lo:.2}..{hi:.2}; floor {floor:.2} \
             (raw moka miss + SELECT + moka insert, {f:.0} ns)"
        ),
        note: None,
    });
    // The same L2 hits against their floor directly, alternating round by round.
    let (r, a, b, (lo, hi)) = side_by_side(
        ROUNDS,
        || {
            rt.block_on(l2.cache.clear_memory());
            rt.block_on(l2_gets(&l2, L2_GETS))
        },
        || {
            rt.block_on(clear_moka(&floor_l1));
            rt.block_on(floor_gets(&l2, &floor_l1, L2_GETS))
        },
    );
    rows.push(Row {
        name: "l2_hit_vs_floor",
        value: r,
        target: Target::AtMost(1.10),
        detail: format!(
            "{a:.0} ns vs {b:.0} ns per get (raw moka miss + prepared SELECT + moka insert); \
             rounds {lo:.2}..{hi:.2}"
        ),
        note: None,
    });
    let windows = L2_GETS / 100;
    // `mget` of `windows` batches of 100, and its floor, each from an empty L1.
    let our_mgets = || {
        rt.block_on(l2.cache.clear_memory());
        rt.block_on(mgets(&l2, windows))
    };
    let floor_of_mgets = || {
        rt.block_on(clear_moka(&floor_l1));
        rt.block_on(floor_mgets(&l2, &floor_l1, windows))
    };
    let (r, a, b, (lo, hi)) = side_by_side(ROUNDS, our_mgets, || {
        rt.block_on(l2.cache.clear_memory());
        rt.block_on(hundred_gets(&l2, windows))
    });
    let (floor, _, _, _) = side_by_side(ROUNDS, floor_of_mgets, || {
        rt.block_on(clear_moka(&floor_l1));
        rt.block_on(floor_gets(&l2, &floor_l1, windows * 100))
    });
    let (sql_only, _, _, _) = side_by_side(
        ROUNDS,
        || {
            let t = Instant::now();
            for _ in 0..windows {
                black_box(common::raw_get_many(&l2.raw, &l2.window()));
            }
            per_op(t, windows * 100)
        },
        || sqlite_gets(&l2, windows * 100),
    );
    rows.push(Row {
        name: "mget100_vs_100_gets",
        value: r,
        target: Target::AtMost(0.2),
        detail: format!(
            "{:.1} us vs {:.1} us per 100 keys; rounds {lo:.2}..{hi:.2}; floor {floor:.2} \
             (raw moka + rarray vs raw moka + 100 SELECTs); rarray alone vs 100 SELECTs {sql_only:.2}",
            a / 10.0,
            b / 10.0
        ),
        note: None,
    });
    let (r, a, b, (lo, hi)) = side_by_side(ROUNDS, our_mgets, floor_of_mgets);
    rows.push(Row {
        name: "mget100_vs_floor",
        value: r,
        target: Target::AtMost(1.05),
        detail: format!(
            "{:.1} us vs {:.1} us per 100 keys (100 raw moka misses + one rarray SELECT + \
             100 moka inserts); rounds {lo:.2}..{hi:.2}",
            a / 10.0,
            b / 10.0
        ),
        note: None,
    });
    drop(l2);
}
