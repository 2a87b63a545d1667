//! Each tier's operations, each beside the raw operation of the dependency it wraps, in the same
//! run: moka `future::Cache` for L1, a rusqlite connection with L2's schema and pragmas for L2,
//! a bare octocrab GET to the same loopback fake GitHub for L3.
//!
//! ```text
//! cargo bench --bench tiers
//! cargo bench --bench tiers -- --quick          # while developing
//! cargo bench --bench tiers -- l2_hit           # one group
//! ```

mod common;

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use moka::future::Cache as Moka;
use tiercache::source::github::GitHubSource;
use tiercache::{Strategy, Tier, TieredCache};

use common::{SlowSource, Zipf};

/// Keys held in L1 for the L1-hit bench.
const L1_KEYS: usize = 10_000;
/// Keys held in L2 for the L2 benches. Cycled in order with a 4 KiB L1 (about three 1 KiB
/// entries), a key comes back 10,000 reads after it was promoted, long evicted: every read is an
/// L1 miss and an L2 hit. Checked with `lookup` in the setup.
const L2_KEYS: usize = 10_000;
const MIB: u64 = 1024 * 1024;

/// moka as tiercache builds it, minus the per-entry expiry: bounded by bytes with a weigher.
async fn raw_moka(keys: &[String], v: &Bytes) -> Moka<String, Bytes> {
    let m = Moka::builder()
        .max_capacity(64 * MIB)
        .weigher(|k: &String, v: &Bytes| (k.len() + v.len() + 160) as u32)
        .build();
    for k in keys {
        // Each key its own buffer, as `common::fill` gives tiercache.
        m.insert(k.clone(), Bytes::copy_from_slice(v)).await;
    }
    m
}

fn l1_hit(c: &mut Criterion) {
    let rt = common::current_thread();
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keys(L1_KEYS);
    let v = common::value();
    let source = SlowSource::new(Duration::ZERO);
    let cache = rt.block_on(async {
        let cache = common::cache(
            Strategy::CacheAside,
            source,
            &dir.path().join("l1.db"),
            64 * MIB,
            true,
        );
        common::fill(&cache, &keys).await;
        let l = cache.lookup(&keys[0]).await.unwrap().unwrap();
        assert_eq!(l.tier, Tier::L1, "the L1 bench must hit L1");
        cache
    });
    let moka = rt.block_on(raw_moka(&keys, &v));
    let trace = Zipf::new(L1_KEYS, 1.0).trace(1 << 16, 7);

    let mut g = c.benchmark_group("l1_hit");
    g.throughput(Throughput::Elements(1));
    let i = Cell::new(0usize);
    let next = || {
        let n = i.get();
        i.set(n + 1);
        &keys[trace[n & 0xffff]]
    };
    g.bench_function("tiercache_get", |b| {
        b.to_async(&rt).iter(|| {
            let k = next();
            let cache = &cache;
            async move { black_box(cache.get(k).await.unwrap()) }
        })
    });
    g.bench_function("moka_get", |b| {
        b.to_async(&rt).iter(|| {
            let k = next();
            let moka = &moka;
            async move { black_box(moka.get(k).await) }
        })
    });
    g.finish();
}

/// A file-backed cache over `L2_KEYS` keys with a 4 KiB L1, and a raw connection on its file.
/// A 4 KiB L1 (about three entries) over reads that cycle through 10,000 keys in order: every
/// read misses L1 and is served by L2, promotion (and the eviction it causes) included.
fn l2_fixture(rt: &tokio::runtime::Runtime) -> common::L2Fixture {
    common::l2_fixture(rt, L2_KEYS, 4096)
}

fn l2_hit(c: &mut Criterion) {
    let rt = common::current_thread();
    let f = l2_fixture(&rt);
    let mut g = c.benchmark_group("l2_hit_cold_l1");
    g.throughput(Throughput::Elements(1));
    let i = Cell::new(0usize);
    let next = || {
        let n = i.get();
        i.set(n + 1);
        &f.keys[n % L2_KEYS]
    };
    g.bench_function("tiercache_get", |b| {
        b.to_async(&rt).iter(|| {
            let k = next();
            let cache = &f.cache;
            async move { black_box(cache.get(k).await.unwrap()) }
        })
    });
    g.bench_function("rusqlite_prepared_select", |b| {
        b.iter(|| black_box(common::raw_get(&f.raw, next())))
    });
    g.finish();

    let mut g = c.benchmark_group("mget100_l2");
    g.throughput(Throughput::Elements(100));
    let window = Cell::new(0usize);
    let next_window = || {
        let w = window.get();
        window.set((w + 100) % L2_KEYS);
        f.keys[w..w + 100]
            .iter()
            .map(String::as_str)
            .collect::<Vec<&str>>()
    };
    g.bench_function("tiercache_mget", |b| {
        b.to_async(&rt).iter(|| {
            let ks = next_window();
            let cache = &f.cache;
            async move { black_box(cache.mget(&ks).await) }
        })
    });
    g.bench_function("tiercache_100_gets", |b| {
        b.to_async(&rt).iter(|| {
            let ks = next_window();
            let cache = &f.cache;
            async move {
                for k in ks {
                    black_box(cache.get(k).await.unwrap());
                }
            }
        })
    });
    g.bench_function("rusqlite_rarray_select", |b| {
        b.iter(|| {
            let ks = next_window();
            let array: std::rc::Rc<Vec<rusqlite::types::Value>> = std::rc::Rc::new(
                ks.iter()
                    .map(|k| rusqlite::types::Value::from((*k).to_owned()))
                    .collect(),
            );
            let mut stmt = f
                .raw
                .prepare_cached(
                    "SELECT key, value, validator, stored_at, fresh_until, stale_until
                     FROM entries WHERE key IN rarray(?1)",
                )
                .unwrap();
            let rows: Vec<(String, Vec<u8>)> = stmt
                .query_map([array], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            black_box(rows)
        })
    });
    g.bench_function("rusqlite_100_selects", |b| {
        b.iter(|| {
            for k in next_window() {
                black_box(common::raw_get(&f.raw, k));
            }
        })
    });
    g.finish();
}

fn miss_to_source(c: &mut Criterion) {
    let rt = common::current_thread();
    let dir = tempfile::tempdir().unwrap();
    let (server, cache, octo) = rt.block_on(async {
        let server = common::fake_github().await;
        let gh = GitHubSource::builder()
            .base_url(server.uri())
            .anonymous()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let cache = TieredCache::builder()
            .source(gh)
            .sqlite_path(dir.path().join("l3.db"))
            .build()
            .unwrap();
        let l = cache.lookup(&common::gh_key(0)).await.unwrap().unwrap();
        assert_eq!(l.tier, Tier::L3);
        assert_eq!(l.value.len(), common::VALUE_LEN);
        let octo = octocrab::Octocrab::builder()
            .base_uri(server.uri())
            .unwrap()
            .build()
            .unwrap();
        (server, cache, octo)
    });
    let base = server.uri();
    let mut g = c.benchmark_group("miss_to_source");
    g.sample_size(10).throughput(Throughput::Elements(1));
    // A new key every time: an L1 miss, an L2 miss, a GitHub fetch, an L2 write, an L1 insert.
    let n = Cell::new(1usize);
    let fresh_key = || {
        let i = n.get();
        n.set(i + 1);
        common::gh_key(i)
    };
    g.bench_function("tiercache_github_get", |b| {
        b.to_async(&rt).iter(|| {
            let k = fresh_key();
            let cache = &cache;
            async move { black_box(cache.get(&k).await.unwrap().unwrap()) }
        })
    });
    g.bench_function("octocrab_raw_get", |b| {
        b.to_async(&rt).iter(|| {
            let url = format!("{base}/repos/octo/app/contents/files/{:08}.txt", n.get());
            let octo = &octo;
            async move {
                let resp = octo._get(url).await.unwrap();
                black_box(octo.body_to_string(resp).await.unwrap())
            }
        })
    });
    g.finish();
    drop(rt);
}

/// A cold key read by two callers at once, the source taking 1 ms: the one that started the
/// load returns once L2 holds the answer, the other (a waiter) when the source answered.
/// `loader` is what a waiter paid before waiters got the answer early.
fn coalesced_miss(c: &mut Criterion) {
    let rt = common::current_thread();
    let dir = tempfile::tempdir().unwrap();
    let source = SlowSource::new(Duration::from_millis(1));
    let cache = common::cache(
        Strategy::ReadThrough,
        source.clone(),
        &dir.path().join("coalesced.db"),
        64 * MIB,
        false,
    );
    let mut g = c.benchmark_group("coalesced_miss");
    g.sample_size(10).throughput(Throughput::Elements(1));
    let n = Cell::new(0usize);
    // Times one cold get by two callers; `waiter` picks whose time is reported.
    let timed = |waiter: bool, iters: u64| {
        let (cache, n) = (&cache, &n);
        async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n.set(n.get() + 1);
                let k = common::key(n.get());
                let start = std::time::Instant::now();
                let time = |k: String| async move {
                    black_box(cache.get(&k).await.unwrap().unwrap());
                    start.elapsed()
                };
                let (loader, other) = tokio::join!(time(k.clone()), time(k));
                total += if waiter { other } else { loader };
            }
            total
        }
    };
    g.bench_function("waiter", |b| {
        b.to_async(&rt).iter_custom(|i| timed(true, i))
    });
    g.bench_function("loader", |b| {
        b.to_async(&rt).iter_custom(|i| timed(false, i))
    });
    g.finish();
    assert_eq!(source.fetches(), n.get(), "one source call per cold key");
}

fn sets(c: &mut Criterion) {
    let rt = common::current_thread();
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keys(L2_KEYS);
    let v = common::value();
    let mut g = c.benchmark_group("set");
    g.throughput(Throughput::Elements(1));
    let i = Cell::new(0usize);
    let next = || {
        let n = i.get();
        i.set(n + 1);
        &keys[n % L2_KEYS]
    };
    // The source takes no time: what is measured is tiercache's own work (write-through's source
    // call is one `async_trait` call; write-behind's background flusher delivers in the
    // meantime, on the same thread).
    for strategy in Strategy::ALL {
        let cache = rt.block_on(async {
            common::cache(
                strategy,
                SlowSource::new(Duration::ZERO),
                &dir.path().join(format!("{strategy}.db")),
                64 * MIB,
                true,
            )
        });
        g.bench_function(BenchmarkId::new("tiercache_set", strategy), |b| {
            b.to_async(&rt).iter(|| {
                let k = next();
                let (cache, v) = (&cache, v.clone());
                async move { cache.set(k, v).await.unwrap() }
            })
        });
    }
    let moka = rt.block_on(raw_moka(&[], &v));
    g.bench_function("moka_insert", |b| {
        b.to_async(&rt).iter(|| {
            let k = next();
            let (moka, v) = (&moka, v.clone());
            async move { moka.insert(k.to_owned(), v).await }
        })
    });
    let raw = common::raw_db(&dir.path().join("raw.db"));
    g.bench_function("rusqlite_prepared_upsert", |b| {
        b.iter(|| common::raw_put(&raw, next(), &v, common::now_ms()))
    });
    g.finish();

    // Group commit: 64 concurrent write-behind sets share transactions.
    let mt = common::multi_thread(2);
    let cache = mt.block_on(async {
        common::cache(
            Strategy::WriteBehind,
            SlowSource::new(Duration::ZERO),
            &dir.path().join("concurrent.db"),
            64 * MIB,
            true,
        )
    });
    let cache = Arc::new(cache);
    let mut g = c.benchmark_group("set_concurrent");
    g.throughput(Throughput::Elements(64));
    g.bench_function("tiercache_write_behind_64_tasks", |b| {
        b.to_async(&mt).iter(|| {
            let base = i.get();
            i.set(base + 64);
            let handles: Vec<_> = (0..64)
                .map(|j| {
                    let cache = cache.clone();
                    let k = keys[(base + j) % L2_KEYS].clone();
                    let v = v.clone();
                    tokio::spawn(async move { cache.set(&k, v).await.unwrap() })
                })
                .collect();
            async move {
                for r in join_all(handles).await {
                    r.unwrap();
                }
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = l1_hit, l2_hit, miss_to_source, coalesced_miss, sets
}
criterion_main!(benches);
