//! The four strategies under three workloads: read-heavy (95% get / 5% set), mixed (50/50) and
//! write-heavy (5/95). Zipf(1.0) keys over 100,000 keys, 1 KiB values, an in-process source
//! that takes 5 ms per call (a tokio sleep).
//!
//! One criterion iteration is a batch of 64 operations run concurrently on one current-thread
//! runtime, so criterion's throughput figure (elements/s) is operations/s with 64 callers. Each
//! operation's latency also goes into a histogram, printed after each benchmark as p50/p99/max:
//! the mean time criterion reports is per batch, not per operation.
//!
//! The cache is not pre-filled: it starts empty and is warmed by criterion's warm-up with the
//! same workload, as an application's cache is warmed by its traffic. Under cache-aside the
//! workload does what the application would: on a miss it asks the source itself and `set`s.
//!
//! ```text
//! cargo bench --bench strategies
//! ```

mod common;

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use tiercache::source::Source;
use tiercache::{Strategy, TieredCache};

use common::{SlowSource, Zipf};

const KEYS: usize = 100_000;
const BATCH: usize = 64;
const LATENCY: Duration = Duration::from_millis(5);
const MIB: u64 = 1024 * 1024;

/// (name, percent of operations that are gets).
const WORKLOADS: [(&str, u32); 3] = [("read_heavy", 95), ("mixed", 50), ("write_heavy", 5)];

async fn op(cache: &TieredCache, source: &SlowSource, key: &str, get: bool, v: &bytes::Bytes) {
    if get {
        let got = cache.get(key).await.expect("get");
        if got.is_none() && cache.strategy() == Strategy::CacheAside {
            // The application's side of cache-aside: load, then fill the cache.
            if let Ok(tiercache::source::Fetched::Value { value, .. }) =
                source.fetch(key, None).await
            {
                cache.set(key, value).await.expect("set");
            }
        }
    } else {
        cache.set(key, v.clone()).await.expect("set");
    }
}

fn strategies(c: &mut Criterion) {
    let rt = common::current_thread();
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keys(KEYS);
    let trace = Zipf::new(KEYS, 1.0).trace(1 << 18, 42);
    let v = common::value();
    for (workload, get_pct) in WORKLOADS {
        let mut g = c.benchmark_group(format!("strategies_{workload}"));
        g.throughput(Throughput::Elements(BATCH as u64));
        for strategy in Strategy::ALL {
            let source = SlowSource::new(LATENCY);
            let cache = rt.block_on(async {
                common::cache(
                    strategy,
                    source.clone(),
                    &dir.path().join(format!("{workload}-{strategy}.db")),
                    64 * MIB,
                    true,
                )
            });
            let hist = RefCell::new(Histogram::<u64>::new(2).unwrap());
            let mut rng = fastrand::Rng::with_seed(7);
            let mut cursor = 0usize;
            g.bench_function(BenchmarkId::new(strategy.as_str(), workload), |b| {
                b.to_async(&rt).iter(|| {
                    let ops: Vec<(&str, bool)> = (0..BATCH)
                        .map(|j| {
                            let k = &keys[trace[(cursor + j) & ((1 << 18) - 1)]];
                            (k.as_str(), rng.u32(0..100) < get_pct)
                        })
                        .collect();
                    cursor += BATCH;
                    let (cache, source, v, hist) = (&cache, &source, &v, &hist);
                    async move {
                        let timed = ops.into_iter().map(|(k, get)| async move {
                            let t = Instant::now();
                            op(cache, source, k, get, v).await;
                            t.elapsed()
                        });
                        let done = join_all(timed).await;
                        let mut h = hist.borrow_mut();
                        for d in done {
                            let _ = h.record(d.as_nanos() as u64);
                        }
                    }
                })
            });
            let h = hist.borrow();
            println!(
                "    {strategy}/{workload}: per-op latency p50 {:.1} us, p99 {:.1} us, max {:.1} ms \
                 ({} ops incl. warm-up; {} source fetches, {} source writes)",
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
                h.max() as f64 / 1e6,
                h.len(),
                source.fetches(),
                source.writes(),
            );
            // Dropped, not closed: closing would deliver the write-behind outbox at 5 ms a key.
            drop(cache);
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = strategies
}
criterion_main!(benches);
