//! The rows of write-behind throughput: 128 setter tasks on a 2-worker runtime, 1 KiB values,
//! 10,000 keys; memory mode against raw moka inserts, and durable mode in sets per second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache as Moka;
use tiercache::{Strategy, TieredCache};

use super::common::{self, SlowSource};
use super::{l1_moka, median, side_by_side, spread, Row, Target, L2_KEYS, MIB, SETS_EACH, SETTERS};

/// Sets/s with `SETTERS` tasks each making `SETS_EACH` acknowledged sets, on `rt`.
pub(crate) fn sets_per_sec(
    rt: &tokio::runtime::Runtime,
    cache: &TieredCache,
    keys: &Arc<Vec<String>>,
) -> f64 {
    let v = common::value();
    rt.block_on(async {
        let t = Instant::now();
        let tasks: Vec<_> = (0..SETTERS)
            .map(|s| {
                let (cache, keys, v) = (cache.clone(), keys.clone(), v.clone());
                tokio::spawn(async move {
                    for j in 0..SETS_EACH {
                        let k = &keys[(s * SETS_EACH + j) % keys.len()];
                        cache.set(k, v.clone()).await.expect("set");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a setter");
        }
        (SETTERS * SETS_EACH) as f64 / t.elapsed().as_secs_f64()
    })
}

/// Raw moka inserts/s, same tasks, keys and values.
pub(crate) fn moka_inserts_per_sec(
    rt: &tokio::runtime::Runtime,
    moka: &Moka<String, Bytes>,
    keys: &Arc<Vec<String>>,
) -> f64 {
    let v = common::value();
    rt.block_on(async {
        let t = Instant::now();
        let tasks: Vec<_> = (0..SETTERS)
            .map(|s| {
                let (moka, keys, v) = (moka.clone(), keys.clone(), v.clone());
                tokio::spawn(async move {
                    for j in 0..SETS_EACH {
                        let k = &keys[(s * SETS_EACH + j) % keys.len()];
                        moka.insert(k.clone(), v.clone()).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("an inserter");
        }
        (SETTERS * SETS_EACH) as f64 / t.elapsed().as_secs_f64()
    })
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
    let keys = Arc::new(common::keys(L2_KEYS));
    let v = common::value();
    rt.block_on(async {
        let tasks: Vec<_> = (0..SETTERS)
            .map(|s| {
                let (cache, keys, v) = (cache.clone(), keys.clone(), v.clone());
                tokio::spawn(async move {
                    for j in 0..n / SETTERS {
                        let k = &keys[(s * 64 + j) % keys.len()];
                        cache.set(k, v.clone()).await.expect("set");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a setter");
        }
    });
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
    rows.push(Row {
        name: "write_behind_durable_sets_per_sec",
        value: instant,
        target: Target::AtLeast(50_000.0),
        detail: format!(
            "{SETTERS} setters, acknowledged after commit, instant source; rounds {:.0}k..{:.0}k; \
             5 ms source {:.0}k/s (rounds {:.0}k..{:.0}k); synchronous=FULL, 5 ms source {:.0}k/s",
            instant_lo / 1e3,
            instant_hi / 1e3,
            rate / 1e3,
            lo / 1e3,
            hi / 1e3,
            full / 1e3
        ),
        note: None,
    });
}
