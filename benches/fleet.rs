//! Fleet figures on a real PostgreSQL server (feature `postgres`): a plain-main report in the
//! style of `benches/ratios.rs`, written to `target/tiercache-fleet.json`.
//!
//! ```text
//! cargo bench --features postgres --bench fleet
//! ```
//!
//! * `pg_l2_hit_vs_select`: an L2-hit `get` on a `PostgresStore`-backed cache (L1 cleared
//!   before each sample, untimed) ÷ a raw prepared `SELECT` of the same row on a
//!   `tokio-postgres` connection, same keys, same run; median of the per-round ratios.
//! * `invalidation_p99_ms`: `set` on instance A → instance B's L1 copy dropped (B polls its
//!   own `lookup` until the key no longer comes from L1), p50 and p99 over 500 writes, each
//!   key first loaded into B's L1 by a read-through fill (which publishes nothing).
//! * `fleet_sets_per_sec`: 4 instances (each its own store, pool and listener) on one schema,
//!   32 setter tasks each, read-through `set`s of distinct keys (each an upsert, a log row and
//!   a `NOTIFY` heard by the 3 others); median of the rounds.
//!
//! The server: `TIERCACHE_POSTGRES_URL`, else `postgres://root@127.0.0.1:5432/test`. When none
//! answers, the bench says so and exits successfully (nothing to measure). Each run uses a
//! fresh schema, dropped at the end.

mod common;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::report::{median, spread, Target};
use common::SlowSource;
use tiercache::tier::postgres::PostgresStore;
use tiercache::tier::EntryStore;
use tiercache::{Tier, TieredCache};
use tokio_postgres::NoTls;

/// Rounds per ratio; each round measures both sides back to back (order alternating).
const ROUNDS: usize = 7;
/// Keys in L2 for the L2-hit ratio.
const L2_KEYS: usize = 2_000;
/// Reads per sample (each sample reads keys it has not read since L1 was cleared).
const L2_GETS: usize = 500;
/// Writes timed for the invalidation latency.
const WRITES: usize = 500;
/// Instances and setters per instance for the write throughput.
const INSTANCES: usize = 4;
const SETTERS: usize = 32;
/// Sets per setter per round.
const SETS_EACH: usize = 25;
/// Rounds of the write throughput.
const SET_ROUNDS: usize = 3;
/// The longest a single invalidation is waited for.
const WAIT: Duration = Duration::from_secs(10);

struct Row {
    name: &'static str,
    value: f64,
    target: Target,
    /// The raw figures behind the value, and the spread of the rounds.
    detail: String,
    /// Extra figures for the JSON report.
    extra: serde_json::Value,
}

/// The server's URL, as the tests take it.
fn url() -> String {
    std::env::var("TIERCACHE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
}

/// A connection of the bench's own (the raw side, and administration).
async fn raw_client() -> Result<tokio_postgres::Client, String> {
    let mut config: tokio_postgres::Config = url().parse().map_err(|e| format!("{e}"))?;
    config.connect_timeout(Duration::from_secs(3));
    let (client, conn) = config.connect(NoTls).await.map_err(|e| {
        let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
        format!("{e}{cause}")
    })?;
    tokio::spawn(conn);
    Ok(client)
}

async fn store(schema: &str) -> PostgresStore {
    PostgresStore::builder(url())
        .schema(schema)
        .connect()
        .await
        .expect("the store connects")
}

fn cache(store: &PostgresStore, source: &Arc<SlowSource>) -> TieredCache {
    TieredCache::builder()
        .store(store.clone())
        .source_arc(source.clone())
        .persist_breaker(false)
        .build()
        .expect("the cache builds")
}

/// Waits until `store`'s listener is connected.
async fn listening(store: &PostgresStore) {
    let deadline = Instant::now() + WAIT;
    while !store.listening() {
        assert!(Instant::now() < deadline, "the listener did not connect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn main() {
    let started = Instant::now();
    let rt = common::multi_thread(2);
    let rows = rt.block_on(async {
        let admin = match raw_client().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "SKIPPED fleet bench: no PostgreSQL server answers at {} \
                     (set TIERCACHE_POSTGRES_URL): {e}",
                    redacted(&url())
                );
                return None;
            }
        };
        let schema = format!("tc_bench_{:016x}", fastrand::u64(..));
        let mut rows = Vec::new();
        rows.push(l2_hit_vs_select(&schema).await);
        rows.push(invalidation(&format!("{schema}_inv")).await);
        rows.push(fleet_sets(&format!("{schema}_sets")).await);
        for s in [
            schema.clone(),
            format!("{schema}_inv"),
            format!("{schema}_sets"),
        ] {
            let _ = admin
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE"))
                .await;
        }
        Some(rows)
    });
    if let Some(rows) = rows {
        report(&rows, started.elapsed());
    }
}

/// The URL without a password, for the skip message.
fn redacted(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => format!(
            "{:?} port {:?} db {:?}",
            c.get_hosts(),
            c.get_ports(),
            c.get_dbname()
        ),
        Err(_) => "(an unparsable URL)".to_owned(),
    }
}

/// `pg_l2_hit_vs_select`.
async fn l2_hit_vs_select(schema: &str) -> Row {
    let store = store(schema).await;
    let source = SlowSource::new(Duration::ZERO);
    let c = cache(&store, &source);
    let keys = common::keys(L2_KEYS);
    for chunk in keys.chunks(100) {
        futures_util::future::join_all(chunk.iter().map(|k| c.set(k, common::value()))).await;
    }
    let raw = raw_client().await.expect("a raw connection");
    let select = raw
        .prepare(&format!(
            "SELECT value, validator, stored_at, fresh_until, stale_until \
             FROM \"{schema}\".entries WHERE key = $1"
        ))
        .await
        .expect("prepared");
    let (mut xs, mut ys, mut zs, mut rs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut at = 0usize;
    for round in 0..=ROUNDS {
        let sample: Vec<&String> = (0..L2_GETS).map(|i| &keys[(at + i) % L2_KEYS]).collect();
        at += L2_GETS;
        c.clear_memory().await;
        let tiercache = async {
            let t = Instant::now();
            for k in &sample {
                let l = c.lookup(k).await.expect("a read").expect("a value");
                debug_assert_eq!(l.tier, Tier::L2);
            }
            t.elapsed().as_nanos() as f64 / L2_GETS as f64
        };
        let select = async {
            let t = Instant::now();
            for k in &sample {
                let row = raw.query_opt(&select, &[k]).await.expect("a row");
                std::hint::black_box(row.expect("a row").get::<_, Vec<u8>>(0));
            }
            t.elapsed().as_nanos() as f64 / L2_GETS as f64
        };
        let (x, y) = if round % 2 == 0 {
            let x = tiercache.await;
            (x, select.await)
        } else {
            let y = select.await;
            (tiercache.await, y)
        };
        // The store alone (`EntryStore::get`, no cache around it): where the difference lies.
        let t = Instant::now();
        for k in &sample {
            std::hint::black_box(store.get(k).await.expect("a read"));
        }
        let z = t.elapsed().as_nanos() as f64 / L2_GETS as f64;
        if round == 0 {
            continue; // a warm-up round
        }
        zs.push(z);
        xs.push(x);
        ys.push(y);
        rs.push(x / y);
    }
    let (lo, hi) = spread(&rs);
    let (x, y, z) = (median(xs), median(ys), median(zs));
    Row {
        name: "pg_l2_hit_vs_select",
        value: median(rs),
        target: Target::AtMost(1.3),
        detail: format!(
            "L2-hit lookup {:.1} µs vs raw prepared SELECT {:.1} µs (PostgresStore::get alone \
             {:.1} µs; 1 KiB values, {L2_GETS} reads per sample, L1 cleared); rounds \
             {lo:.2}..{hi:.2}",
            x / 1000.0,
            y / 1000.0,
            z / 1000.0
        ),
        extra: serde_json::json!({
            "tiercache_us": x / 1000.0,
            "select_us": y / 1000.0,
            "store_get_us": z / 1000.0,
        }),
    }
}

/// `invalidation_p99_ms`.
async fn invalidation(schema: &str) -> Row {
    let (a, b) = (store(schema).await, store(schema).await);
    let source = SlowSource::new(Duration::ZERO);
    let (ca, cb) = (cache(&a, &source), cache(&b, &source));
    listening(&a).await;
    listening(&b).await;
    let mut took = Vec::with_capacity(WRITES);
    for i in 0..WRITES {
        let key = format!("inv/{i:05}");
        // Into B's L1 by a read-through fill: nothing published.
        cb.get(&key).await.expect("a read").expect("a value");
        let held = cb.lookup(&key).await.expect("a read").expect("a value");
        assert_eq!(held.tier, Tier::L1, "{key} in B's L1");
        let written = Instant::now();
        ca.set(&key, "new").await.expect("a set");
        loop {
            let l = cb.lookup(&key).await.expect("a read").expect("a value");
            if l.tier != Tier::L1 || l.value == "new" {
                break;
            }
            assert!(
                written.elapsed() < WAIT,
                "{key} still in B's L1 after {WAIT:?}"
            );
            tokio::task::yield_now().await;
        }
        took.push(written.elapsed().as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    let (p50, p99, max) = (at(0.5), at(0.99), at(1.0));
    Row {
        name: "invalidation_p99_ms",
        value: p99,
        target: Target::AtMost(50.0),
        detail: format!(
            "set() on A called → B's L1 copy gone, {WRITES} writes: p50 {p50:.2} ms, p99 \
             {p99:.2} ms, max {max:.2} ms"
        ),
        extra: serde_json::json!({ "p50_ms": p50, "p99_ms": p99, "max_ms": max }),
    }
}

/// `fleet_sets_per_sec`.
async fn fleet_sets(schema: &str) -> Row {
    let source = SlowSource::new(Duration::ZERO);
    let mut caches = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..INSTANCES {
        let s = store(schema).await;
        caches.push(cache(&s, &source));
        stores.push(s);
    }
    for s in &stores {
        listening(s).await;
    }
    let value = common::value();
    let mut rates = Vec::new();
    for round in 0..=SET_ROUNDS {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for (n, c) in caches.iter().enumerate() {
            for s in 0..SETTERS {
                let (c, value) = (c.clone(), value.clone());
                tasks.push(tokio::spawn(async move {
                    for i in 0..SETS_EACH {
                        let key = format!("sets/{round}/{n}/{s}/{i}");
                        c.set(&key, value.clone()).await.expect("a set");
                    }
                }));
            }
        }
        for task in tasks {
            task.await.expect("a setter");
        }
        let total = INSTANCES * SETTERS * SETS_EACH;
        if round > 0 {
            rates.push(total as f64 / t.elapsed().as_secs_f64());
        }
    }
    let (lo, hi) = spread(&rates);
    Row {
        name: "fleet_sets_per_sec",
        value: median(rates),
        target: Target::AtLeast(1000.0),
        detail: format!(
            "{INSTANCES} instances × {SETTERS} setters × {SETS_EACH} read-through sets of 1 KiB, \
             each published to 3 listeners; {SET_ROUNDS} rounds {lo:.0}..{hi:.0}/s"
        ),
        extra: serde_json::json!({ "instances": INSTANCES, "setters_each": SETTERS }),
    }
}

fn report(rows: &[Row], took: Duration) {
    let mut json = serde_json::Map::new();
    common::report::print_header("figure", 24);
    let mut misses = Vec::new();
    for row in rows {
        let (mut entry, pass) =
            common::report::print_row(row.name, 24, row.value, row.target, &row.detail);
        if !pass {
            misses.push(row.name);
        }
        entry["detail"] = row.extra.clone();
        json.insert(row.name.to_owned(), entry);
    }
    let written = common::report::write_json("tiercache-fleet.json", &json);
    let mut summary = String::new();
    if misses.is_empty() {
        let _ = write!(summary, "all {} targets met", rows.len());
    } else {
        let _ = write!(
            summary,
            "{} of {} targets MISSED: {}",
            misses.len(),
            rows.len(),
            misses.join(", ")
        );
    }
    println!("\n{summary} in {:.1} s; {written}", took.as_secs_f64());
}
