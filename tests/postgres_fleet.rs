//! A fleet on one PostgreSQL schema (feature `postgres`, issue #14 items 2 to 5): caches in one
//! test process, each with its own L1 and its own `PostgresStore`, see each other's writes
//! through the invalidation log and `NOTIFY`; a killed listener reconnects and catches up; a
//! pruned log clears L1; fills and renewals publish nothing; many keys are split under 8,000
//! bytes; the outbox is drained by the fleet; one breaker and one spent budget stop the fleet
//! and one probe is sent; a cold key is loaded once for the fleet (fill leases). Each
//! test runs on its own fresh schema; without a server it says on stderr that it is skipped
//! (see `support/pg.rs`). Waits are bounded polls of a condition (at most [`WAIT`]), never
//! fixed sleeps.
#![cfg(feature = "postgres")]

#[path = "support/github_fake.rs"]
mod github_fake;
#[path = "support/pg.rs"]
mod pg;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use pg::eventually;
use support::FakeSource;
use tiercache::source::SourceError;
use tiercache::tier::postgres::PostgresStore;
use tiercache::tier::{
    EntryStore, FillLease, Invalidation, Merged, OutboxOp, OutboxStore, StoredEntry,
};
use tiercache::{Clock, MockClock, Strategy, Tier, TieredCache, TieredCacheBuilder};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(60);
/// The longest any condition is waited for.
const WAIT: Duration = Duration::from_secs(10);
/// The heartbeat of the fleets' stores: long, so a listener's horizon stays where its
/// connection put it (the tests that depend on it say so).
const SLOW_HEARTBEAT: Duration = Duration::from_secs(60);

macro_rules! pg_or_skip {
    ($name:expr) => {
        match pg::start($name).await {
            Some(t) => t,
            None => return Ok(()),
        }
    };
}

/// Prints the median, 99th percentile and maximum of `took` (a measurement run on demand).
fn print_quantiles(what: &str, over: &str, mut took: Vec<Duration>) {
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!(
        "{what}, over {} {over}: p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

fn builder(store: &PostgresStore, source: &FakeSource, clock: &MockClock) -> TieredCacheBuilder {
    TieredCache::builder()
        .store(store.clone())
        .source(source.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(3600))
        .persist_breaker(false)
}

/// `n` stores on the test's schema, each listening (one cache subscribed to each).
struct Fleet {
    stores: Vec<PostgresStore>,
    caches: Vec<TieredCache>,
}

async fn fleet(
    t: &pg::PgTest,
    n: usize,
    source: &FakeSource,
    clock: &MockClock,
    strategy: Strategy,
) -> Result<Fleet, Box<dyn std::error::Error>> {
    let mut fleet = Fleet {
        stores: Vec::new(),
        caches: Vec::new(),
    };
    for _ in 0..n {
        let store = t.store().heartbeat(SLOW_HEARTBEAT).connect().await?;
        let cache = builder(&store, source, clock)
            .strategy(strategy)
            .background_flush(false)
            .build()?;
        fleet.stores.push(store);
        fleet.caches.push(cache);
    }
    for store in &fleet.stores {
        eventually(
            "every listener connected",
            || async move { store.listening() },
        )
        .await;
    }
    Ok(fleet)
}

async fn get(cache: &TieredCache, key: &str) -> Option<String> {
    cache
        .get(key)
        .await
        .expect("a read")
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Waits until `cache` reads `key` as `want`.
async fn reads(cache: &TieredCache, key: &str, want: Option<&str>) {
    eventually(&format!("{key} reads as {want:?}"), || async move {
        get(cache, key).await.as_deref() == want
    })
    .await;
}

/// Waits until `cache` serves `key` as `want` from its L1 (read until promoted).
async fn in_l1(cache: &TieredCache, key: &str, want: &str) {
    eventually(&format!("{key} = {want} in L1"), || async move {
        let l = cache.lookup(key).await.expect("a read").expect("a value");
        l.tier == Tier::L1 && l.value == want.as_bytes()
    })
    .await;
}

/// A connection of the test's own `LISTEN`ing on `channel`: every payload, in order.
struct Notes {
    rx: mpsc::UnboundedReceiver<String>,
    _client: tokio_postgres::Client,
}

async fn listen(channel: &str) -> Result<Notes, Box<dyn std::error::Error>> {
    let (client, mut conn) = tokio_postgres::connect(&pg::url(), NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await?;
    Ok(Notes {
        rx,
        _client: client,
    })
}

impl Notes {
    /// The next payload (within [`WAIT`]).
    async fn next(&mut self) -> String {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a NOTIFY within the wait")
            .expect("the test's listener is up")
    }
}

/// A payload's origin and keys (`{origin} k\n{key}…`).
fn keys_of(payload: &str) -> (String, Vec<String>) {
    let mut lines = payload.split('\n');
    let head = lines.next().unwrap_or("");
    let origin = head.split(' ').next().unwrap_or("").to_owned();
    (origin, lines.map(str::to_owned).collect())
}

/// Terminates the listener connection of `store` (found by its `application_name`).
async fn kill_listener(t: &pg::PgTest, store: &PostgresStore) {
    let killed: i64 = t
        .one(&format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = '{}') AS k",
            store.listener_application_name()
        ))
        .await;
    assert_eq!(killed, 1, "one listener connection per store");
}

fn refused() -> SourceError {
    SourceError::Rejected {
        status: Some(422),
        message: "Invalid request".into(),
    }
}

#[tokio::test]
async fn set_delete_and_invalidate_on_one_are_read_on_all_others() -> TestResult {
    let t = pg_or_skip!("set_delete_and_invalidate_on_one_are_read_on_all_others");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("k", "v0");
    let f = fleet(&t, 4, &source, &clock, Strategy::ReadThrough).await?;
    for c in &f.caches {
        in_l1(c, "k", "v0").await;
        let health = c.health().await;
        assert_eq!(health.invalidations, Some(true), "{health}");
        assert!(health.to_string().contains("invalidations: listening"));
    }
    // SQLite publishes nothing: no listener to report.
    assert_eq!(
        TieredCache::builder().build()?.health().await.invalidations,
        None
    );

    // A set on one: every other L1 (fresh for another minute of the clock) drops its copy.
    f.caches[0].set("k", "v1").await?;
    for c in &f.caches[1..] {
        reads(c, "k", Some("v1")).await;
    }
    for c in &f.caches {
        in_l1(c, "k", "v1").await;
    }

    // A delete on another: nobody serves v1 again (the next read asks the source).
    f.caches[1].delete("k").await?;
    for (i, c) in f.caches.iter().enumerate().filter(|(i, _)| *i != 1) {
        eventually(&format!("cache {i} no longer serves v1"), || async move {
            get(c, "k").await.as_deref() == Some("v0")
        })
        .await;
    }

    // The source changed behind the fleet; an invalidate on one reaches every L1.
    for c in &f.caches {
        in_l1(c, "k", "v0").await;
    }
    source.insert("k", "v2");
    f.caches[2].invalidate("k").await?;
    for c in &f.caches {
        reads(c, "k", Some("v2")).await;
    }
    // The listeners keep up: the server's notification queue stays (near) empty.
    let usage: f64 = t.one("SELECT pg_notification_queue_usage()").await;
    assert!(usage < 0.001, "{usage}");
    Ok(())
}

#[tokio::test]
async fn write_behind_writes_enqueued_delivered_and_refused_reach_the_fleet() -> TestResult {
    let t = pg_or_skip!("write_behind_writes_enqueued_delivered_and_refused_reach_the_fleet");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("w", "old");
    let f = fleet(&t, 4, &source, &clock, Strategy::WriteBehind).await?;
    let mut notes = listen(f.stores[0].channel()).await?;
    for c in &f.caches {
        in_l1(c, "w", "old").await;
    }

    // Enqueued on one: the others read the pending write.
    f.caches[0].set("w", "new").await?;
    assert_eq!(
        keys_of(&notes.next().await),
        (f.stores[0].origin().to_owned(), vec!["w".to_owned()])
    );
    for c in &f.caches[1..] {
        reads(c, "w", Some("new")).await;
    }

    // Delivered: the durable outbox wrote the entry with the row, nothing changes.
    assert_eq!(f.caches[0].flush().await?.delivered, 1);
    assert_eq!(source.value("w").as_deref(), Some(&b"new"[..]));

    // A delete on another: pending, then delivered (its entry removed once settled: that
    // publishes too).
    f.caches[2].delete("w").await?;
    let from_2 = (f.stores[2].origin().to_owned(), vec!["w".to_owned()]);
    assert_eq!(keys_of(&notes.next().await), from_2);
    for c in &f.caches {
        reads(c, "w", None).await;
    }
    assert_eq!(f.caches[2].flush().await?.delivered, 1);
    assert_eq!(source.value("w"), None);
    assert_eq!(keys_of(&notes.next().await), from_2);

    // Refused for good: a dead letter; every L1 drops the refused value, the source's stands.
    source.insert("w", "at the source");
    source.fail_writes(Some(refused()));
    f.caches[1].set("w", "refused").await?;
    for c in &f.caches {
        reads(c, "w", Some("refused")).await;
    }
    assert_eq!(f.caches[1].flush().await?.dead_lettered, 1);
    for c in &f.caches {
        reads(c, "w", Some("at the source")).await;
    }
    let logged: i64 = t
        .one("SELECT count(*) FROM {s}.invalidations WHERE key = 'w'")
        .await;
    assert_eq!(
        logged, 5,
        "set and delete enqueued, the delete settled, set enqueued, dead-lettered"
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_listener_reconnects_and_catches_up_from_the_log() -> TestResult {
    let t = pg_or_skip!("a_killed_listener_reconnects_and_catches_up_from_the_log");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "a0");
    source.insert("b", "b0");
    let f = fleet(&t, 4, &source, &clock, Strategy::ReadThrough).await?;
    let (writer, reader) = (&f.caches[0], &f.caches[3]);
    for key in ["a", "b"] {
        in_l1(reader, key, &format!("{key}0")).await;
    }
    let reader_store = &f.stores[3];
    assert_eq!(reader_store.listener_connections(), 1);

    // A write whose NOTIFY the reader never gets (as if made while it was down): the entry and
    // a log row of another origin, committed without `pg_notify`. Then the reader's listener
    // is killed, and another instance writes while it reconnects.
    t.exec(
        "BEGIN;
         UPDATE {s}.entries SET value = 'b1', stored_at = stored_at + 1 WHERE key = 'b';
         INSERT INTO {s}.invalidations (origin, key) VALUES ('elsewhere', 'b');
         COMMIT",
    )
    .await;
    kill_listener(&t, &f.stores[3]).await;
    writer.set("a", "a1").await?;

    eventually("the listener reconnected", || async move {
        reader_store.listener_connections() >= 2 && reader_store.listening()
    })
    .await;
    assert_eq!(reader.health().await.invalidations, Some(true));
    // Whether the reconnect came before the write (its NOTIFY) or after it (the log), and the
    // silent write only from the log: the reader serves neither old value.
    reads(reader, "a", Some("a1")).await;
    reads(reader, "b", Some("b1")).await;
    for c in &f.caches {
        in_l1(c, "a", "a1").await;
    }
    Ok(())
}

#[tokio::test]
async fn a_log_pruned_past_a_listener_clears_its_l1() -> TestResult {
    let t = pg_or_skip!("a_log_pruned_past_a_listener_clears_its_l1");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("k", "v0");
    source.insert("other", "o0");
    let f = fleet(&t, 2, &source, &clock, Strategy::ReadThrough).await?;
    let (reader, reader_store) = (&f.caches[1], &f.stores[1]);
    in_l1(reader, "other", "o0").await;

    // A write after the reader's listener connected, then the log pruned past it (what the
    // fleet's pruning does to rows older than the retention): the reader's next reconnect
    // cannot replay what it may have missed. (The slow heartbeat keeps its horizon at its
    // connection.)
    f.caches[0].set("k", "v1").await?;
    reads(reader, "k", Some("v1")).await;
    t.exec(
        "WITH d AS (DELETE FROM {s}.invalidations RETURNING xid)
         UPDATE {s}.invalidations_pruned SET through = greatest(through, (SELECT max(xid) FROM d))",
    )
    .await;
    in_l1(reader, "other", "o0").await;
    kill_listener(&t, reader_store).await;
    eventually("the listener reconnected", || async move {
        reader_store.listener_connections() >= 2
    })
    .await;
    // "other" was never written, yet L1 was cleared: the next read goes to L2.
    eventually("L1 cleared", || async move {
        reader
            .lookup("other")
            .await
            .expect("a read")
            .expect("a value")
            .tier
            != Tier::L1
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn fills_misses_and_renewals_publish_nothing() -> TestResult {
    let t = pg_or_skip!("fills_misses_and_renewals_publish_nothing");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    for i in 0..20 {
        source.insert(&format!("k{i}"), format!("v{i}"));
    }
    let f = fleet(&t, 4, &source, &clock, Strategy::ReadThrough).await?;
    let mut notes = listen(f.stores[0].channel()).await?;
    // Fills (L3), misses ("not found"), promotions (L2), then 304 renewals past the TTL.
    for c in &f.caches {
        for i in 0..20 {
            assert!(get(c, &format!("k{i}")).await.is_some());
        }
        assert_eq!(get(c, "missing").await, None);
    }
    clock.advance(TTL + Duration::from_secs(1));
    for c in &f.caches {
        for i in 0..20 {
            assert!(get(c, &format!("k{i}")).await.is_some());
        }
    }
    assert!(
        source
            .fetches()
            .iter()
            .any(|(_, validator)| validator.is_some()),
        "renewals were conditional requests"
    );
    let logged: i64 = t.one("SELECT count(*) FROM {s}.invalidations").await;
    assert_eq!(logged, 0, "no log row from reads");
    // One write as a sentinel: it is the first NOTIFY the test's listener gets.
    f.caches[1].set("sentinel", "x").await?;
    assert_eq!(
        keys_of(&notes.next().await),
        (f.stores[1].origin().to_owned(), vec!["sentinel".to_owned()])
    );
    Ok(())
}

#[tokio::test]
async fn many_keys_are_split_under_8000_bytes_and_a_long_key_goes_by_the_log() -> TestResult {
    let t = pg_or_skip!("many_keys_are_split_under_8000_bytes_and_a_long_key_goes_by_the_log");
    let a = t.store().heartbeat(SLOW_HEARTBEAT).connect().await?;
    let b = t.store().heartbeat(SLOW_HEARTBEAT).connect().await?;
    let mut events = b.invalidations().expect("PostgreSQL publishes");
    let listener = &b;
    eventually("listening", || async move { listener.listening() }).await;
    let mut notes = listen(a.channel()).await?;

    // 300 write-behind writes refused in one step: one transaction publishes 300 keys.
    let keys: Vec<String> = (0..300)
        .map(|i| format!("owner/repo/{i:04}/{}", "p".repeat(80)))
        .collect();
    let mut ids = Vec::new();
    for key in &keys {
        ids.push(a.enqueue(key, None, OutboxOp::Delete, 1).await?);
    }
    for _ in &keys {
        notes.next().await; // one per enqueue
    }
    a.outbox_failed(ids, 0, "refused".into(), true).await?;
    let (mut seen, mut payloads) = (HashSet::new(), 0);
    while seen.len() < keys.len() {
        let payload = notes.next().await;
        assert!(payload.len() < 8000, "{} bytes", payload.len());
        let (origin, batch) = keys_of(&payload);
        assert_eq!(origin, a.origin());
        payloads += 1;
        seen.extend(batch);
    }
    assert_eq!(seen, keys.iter().cloned().collect::<HashSet<_>>());
    assert!(payloads >= 4, "{payloads} payloads for ~30 KB of keys");

    // A key longer than a payload (a store called directly; the cache's keys are shorter):
    // the payload names the log's rows, and the listener reads the key from there.
    let long = "l".repeat(9000);
    a.put(
        &long,
        StoredEntry::new(Some(Bytes::from_static(b"v")), None, 1, 2, 3),
    )
    .await?;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(Invalidation::Keys(k)) if k.contains(&long) => return k,
                Some(_) => continue,
                None => panic!("the subscription ended"),
            }
        }
    })
    .await?;
    assert_eq!(got, vec![long]);
    Ok(())
}

#[tokio::test]
async fn the_listener_ends_with_the_last_cache_on_its_store() -> TestResult {
    let t = pg_or_skip!("the_listener_ends_with_the_last_cache_on_its_store");
    let store = t
        .store()
        .heartbeat(Duration::from_millis(50))
        .connect()
        .await?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&store, &source, &clock).build()?;
    let s = &store;
    eventually("listening", || async move { s.listening() }).await;
    let listeners = &format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{}'",
        store.listener_application_name()
    );
    assert_eq!(t.one::<i64>(listeners).await, 1);
    cache.close().await?;
    drop(cache);
    let (t, store) = (&t, &store);
    eventually(
        "the listener stopped and closed its connection",
        || async move { !store.listening() && t.one::<i64>(listeners).await == 0 },
    )
    .await;
    // A new cache on the same store starts a new one.
    let again = builder(store, &source, &clock).build()?;
    eventually("listening again", || async move { store.listening() }).await;
    drop(again);
    Ok(())
}

#[tokio::test]
async fn caches_sharing_one_store_see_each_others_writes() -> TestResult {
    let t = pg_or_skip!("caches_sharing_one_store_see_each_others_writes");
    let store = t.store().heartbeat(SLOW_HEARTBEAT).connect().await?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("k", "v0");
    let (a, b) = (
        builder(&store, &source, &clock).build()?,
        builder(&store, &source, &clock).build()?,
    );
    let store = &store;
    eventually("listening", || async move { store.listening() }).await;
    in_l1(&b, "k", "v0").await;
    a.set("k", "v1").await?;
    reads(&b, "k", Some("v1")).await;
    Ok(())
}

#[tokio::test]
async fn a_version_1_schema_is_migrated_to_the_invalidation_log_and_claims() -> TestResult {
    let t = pg_or_skip!("a_version_1_schema_is_migrated_to_the_invalidation_log_and_claims");
    let store = t.store().connect().await?;
    store
        .put(
            "k",
            StoredEntry::new(Some(Bytes::from_static(b"v")), None, 1, 2, 3),
        )
        .await?;
    drop(store);
    // What the first tiercache with PostgreSQL made: no log, no claims, no fill leases.
    t.exec(
        "DROP TABLE {s}.invalidations, {s}.invalidations_pruned, {s}.fill_leases;
         DROP SEQUENCE {s}.fill_lease_tokens;
         ALTER TABLE {s}.outbox DROP COLUMN claimed_by, DROP COLUMN claim_expires;
         UPDATE {s}.schema_version SET version = 1",
    )
    .await;
    let store = t.store().connect().await?;
    assert_eq!(
        t.one::<i64>("SELECT version FROM {s}.schema_version").await,
        tiercache::tier::postgres::SCHEMA_VERSION
    );
    assert_eq!(
        store.get("k").await?.and_then(|e| e.value),
        Some(Bytes::from_static(b"v")),
        "the entries are kept"
    );
    store.remove("k").await?;
    assert_eq!(
        t.one::<i64>("SELECT count(*) FROM {s}.invalidations").await,
        1
    );
    store.enqueue("k", None, OutboxOp::Delete, 1).await?;
    assert_eq!(store.outbox_pending(10).await?.len(), 1, "claimed");
    assert!(matches!(
        store.fill_lease("k", Duration::from_secs(1)).await?,
        FillLease::Held(_)
    ));
    Ok(())
}

#[tokio::test]
async fn a_version_2_schema_is_migrated_to_the_fill_leases() -> TestResult {
    let t = pg_or_skip!("a_version_2_schema_is_migrated_to_the_fill_leases");
    drop(t.store().connect().await?);
    t.exec(
        "DROP TABLE {s}.fill_leases; DROP SEQUENCE {s}.fill_lease_tokens;
         UPDATE {s}.schema_version SET version = 2",
    )
    .await;
    let store = t.store().connect().await?;
    assert_eq!(
        t.one::<i64>("SELECT version FROM {s}.schema_version").await,
        tiercache::tier::postgres::SCHEMA_VERSION
    );
    let lease = Duration::from_secs(30);
    let FillLease::Held(first) = store.fill_lease("k", lease).await? else {
        panic!("the first taker holds the lease");
    };
    let other = t.store().connect().await?;
    assert_eq!(other.fill_lease("k", lease).await?, FillLease::Busy);
    // A late holder's release (an older token) leaves the live lease alone.
    other.release_fill_lease("k", first + 1_000).await?;
    assert_eq!(other.fill_lease("k", lease).await?, FillLease::Busy);
    store.release_fill_lease("k", first).await?;
    let FillLease::Held(second) = other.fill_lease("k", lease).await? else {
        panic!("released: the next taker holds it");
    };
    assert!(second > first, "a newer lease has a higher fencing token");
    Ok(())
}

/// The values delivered to `source` for `key`, in order (`None`: a delete).
fn delivered(source: &FakeSource, key: &str) -> Vec<Option<String>> {
    source
        .writes()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_flushing_at_once_deliver_each_key_in_order_and_once() -> TestResult {
    let t = pg_or_skip!("four_instances_flushing_at_once_deliver_each_key_in_order_and_once");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.set_latency(Duration::from_millis(2));
    let f = fleet(&t, 4, &source, &clock, Strategy::WriteBehind).await?;
    const KEYS: usize = 8;
    const VERSIONS: usize = 6;
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Every instance flushes in a loop while the writes go on, spread over the instances (a
    // key's writes come from several of them, one after the other).
    let mut flushers = Vec::new();
    for c in &f.caches {
        let (c, writing) = (c.clone(), writing.clone());
        flushers.push(tokio::spawn(async move {
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                c.flush().await?;
                tokio::task::yield_now().await;
            }
            Ok::<_, tiercache::Error>(())
        }));
    }
    for v in 0..VERSIONS {
        for k in 0..KEYS {
            f.caches[(v + k) % 4]
                .set(&format!("k{k}"), format!("{v}"))
                .await?;
        }
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    for flusher in flushers {
        flusher.await??;
    }
    for c in &f.caches {
        assert!(c.flush().await?.is_complete());
    }
    assert_eq!(t.one::<i64>("SELECT count(*) FROM {s}.outbox").await, 0);
    for k in 0..KEYS {
        let sent: Vec<usize> = delivered(&source, &format!("k{k}"))
            .into_iter()
            .map(|v| v.and_then(|v| v.parse().ok()).expect("a put of a version"))
            .collect();
        assert!(
            sent.windows(2).all(|w| w[0] < w[1]),
            "k{k}: in order, each once: {sent:?}"
        );
        assert_eq!(sent.last(), Some(&(VERSIONS - 1)), "k{k}: the final value");
    }
    Ok(())
}

#[tokio::test]
async fn a_dead_instances_claimed_rows_are_delivered_by_another_after_its_lease() -> TestResult {
    let t = pg_or_skip!("a_dead_instances_claimed_rows_are_delivered_by_another_after_its_lease");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let lease = Duration::from_secs(2);
    let dead_store = t
        .store()
        .heartbeat(SLOW_HEARTBEAT)
        .outbox_lease(lease)
        .connect()
        .await?;
    let dead = builder(&dead_store, &source, &clock)
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    let store = t.store().heartbeat(SLOW_HEARTBEAT).connect().await?;
    let live = builder(&store, &source, &clock)
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    dead.set("k", "1").await?;
    dead.set("k", "2").await?;
    dead.set("j", "1").await?;
    // A delivery round starts (its rows claimed), then the instance dies before sending.
    assert_eq!(dead_store.outbox_pending(100).await?.len(), 3);
    drop(dead);
    drop(dead_store);
    // A newer write of k on the live instance: it must not go before the dead one's rows.
    live.set("k", "3").await?;
    let first = live.flush().await?;
    assert_eq!(
        first.delivered, 0,
        "k and j are claimed by the dead instance"
    );
    assert!(source.writes().is_empty());

    // Once the lease ran out, the live instance takes them over: each key once, the newest.
    let (live, total) = (&live, &std::sync::atomic::AtomicU64::new(0));
    eventually("the dead instance's rows delivered", || async move {
        let report = live.flush().await.expect("a flush");
        total.fetch_add(report.delivered, std::sync::atomic::Ordering::SeqCst);
        total.load(std::sync::atomic::Ordering::SeqCst) == 4
    })
    .await;
    assert_eq!(delivered(&source, "k"), vec![Some("3".to_owned())]);
    assert_eq!(delivered(&source, "j"), vec![Some("1".to_owned())]);
    assert_eq!(t.one::<i64>("SELECT count(*) FROM {s}.outbox").await, 0);
    Ok(())
}

/// A TCP proxy to the test's server whose connections can be frozen: bytes stop flowing both
/// ways, the sockets stay open (a silent connection, as behind a dead network path).
struct Proxy {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn proxy(target: String) -> Result<Proxy, Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let freeze = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            // A connection made while frozen flows (a new path); the old ones stay silent.
            let born_frozen = freeze.load(std::sync::atomic::Ordering::SeqCst);
            let freeze = freeze.clone();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let pipe =
                |mut from: tokio::net::tcp::OwnedReadHalf,
                 mut to: tokio::net::tcp::OwnedWriteHalf,
                 freeze: std::sync::Arc<std::sync::atomic::AtomicBool>| async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if !born_frozen && freeze.load(std::sync::atomic::Ordering::SeqCst) {
                            // Silent: swallow everything, never close.
                            std::future::pending::<()>().await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
            tokio::spawn(pipe(cr, sw, freeze.clone()));
            tokio::spawn(pipe(sr, cw, freeze));
        }
    });
    Ok(Proxy { port, frozen })
}

#[tokio::test]
async fn a_silent_listener_connection_is_found_by_the_heartbeat_and_replaced() -> TestResult {
    let t = pg_or_skip!("a_silent_listener_connection_is_found_by_the_heartbeat_and_replaced");
    let (host, port, user, db) = t.server_parts();
    let p = proxy(format!("{host}:{port}")).await?;
    let store = PostgresStore::builder(format!(
        "host=127.0.0.1 port={} user={user} dbname={db}",
        p.port
    ))
    .schema(t.schema.clone())
    .heartbeat(Duration::from_millis(200))
    .connect()
    .await?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&store, &source, &clock).build()?;
    let s = &store;
    eventually("listening", || async move { s.listening() }).await;
    assert_eq!(store.listener_connections(), 1);

    // Every open connection through the proxy goes silent (nothing is closed): only the
    // heartbeat's unanswered query can tell. New connections flow again.
    p.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually("a new listener connection", || async move {
        s.listener_connections() >= 2 && s.listening()
    })
    .await;
    drop(cache);
    Ok(())
}

/// Not a check: prints how long another instance takes to hear of a write (from the call to
/// `set`, its commit included, to the other store's listener handing the key to its
/// subscribers; the key leaves that cache's L1 right after). Run with
/// `cargo test --features postgres --test postgres_fleet -- --ignored --nocapture
/// invalidation_latency`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn invalidation_latency() -> TestResult {
    let t = pg_or_skip!("invalidation_latency");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let f = fleet(&t, 2, &source, &clock, Strategy::ReadThrough).await?;
    let mut heard = f.stores[1].invalidations().expect("PostgreSQL publishes");
    let mut took = Vec::new();
    for i in 0..500 {
        let key = format!("k{i}");
        let written = std::time::Instant::now();
        f.caches[0].set(&key, "v").await?;
        loop {
            match tokio::time::timeout(WAIT, heard.recv()).await? {
                Some(Invalidation::Keys(k)) if k.contains(&key) => break,
                Some(_) => continue,
                None => panic!("the subscription ended"),
            }
        }
        took.push(written.elapsed());
    }
    print_quantiles("from set() called to heard elsewhere", "writes", took);
    Ok(())
}

#[tokio::test]
async fn entries_merged_from_a_bundle_on_one_are_read_on_the_others() -> TestResult {
    let t = pg_or_skip!("entries_merged_from_a_bundle_on_one_are_read_on_the_others");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("k", "v0");
    source.insert("old", "o0");
    let f = fleet(&t, 2, &source, &clock, Strategy::ReadThrough).await?;
    for (key, value) in [("k", "v0"), ("old", "o0")] {
        in_l1(&f.caches[1], key, value).await;
    }
    f.stores[0].enqueue("p", None, OutboxOp::Delete, 1).await?;
    let held = |key: &'static str| {
        let store = f.stores[0].clone();
        async move { store.get(key).await.map(|e| e.expect("an entry")) }
    };
    let (k, old) = (held("k").await?, held("old").await?);
    let newer = |e: &StoredEntry, v: &'static str| {
        StoredEntry::new(
            Some(Bytes::from_static(v.as_bytes())),
            None,
            e.stored_at + 1,
            e.fresh_until + 1,
            e.stale_until + 1,
        )
    };
    let older = StoredEntry::new(
        Some(Bytes::from_static(b"stale")),
        None,
        old.stored_at - 1,
        old.fresh_until,
        old.stale_until,
    );
    let merged = f.stores[0]
        .merge(vec![
            ("k".to_owned(), newer(&k, "bundled")),
            ("old".to_owned(), older),
            ("p".to_owned(), newer(&k, "bundled")),
        ])
        .await?;
    assert_eq!(
        merged,
        vec![Merged::Written, Merged::KeptNewer, Merged::KeptPending]
    );
    // The written entry is announced: the other instance drops its copy.
    reads(&f.caches[1], "k", Some("bundled")).await;
    in_l1(&f.caches[1], "old", "o0").await;
    let logged: i64 = t
        .one("SELECT count(*) FROM {s}.invalidations WHERE key = 'k'")
        .await;
    assert_eq!(logged, 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Issue #14 items 3 and 4: one breaker and one budget for the fleet, cross-instance single-flight.
// ---------------------------------------------------------------------------------------------

/// What every instance's [`FleetSource`] shares: the calls made, a gate holding calls until the
/// test opens it, and scripted answers.
#[derive(Debug)]
struct FleetShared {
    calls: std::sync::atomic::AtomicUsize,
    /// When each call was made (real time), in order.
    called_at: std::sync::Mutex<Vec<std::time::Instant>>,
    /// Calls wait here until it holds `true`.
    open: tokio::sync::watch::Sender<bool>,
    /// The next call answers 429 until then (taken by that call).
    limit_next: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// The next call never answers (its instance "dies" mid-call).
    hang_next: std::sync::atomic::AtomicBool,
    /// Calls fail (503) while set.
    failing: std::sync::atomic::AtomicBool,
}

/// A source counting calls across the fleet, one per instance (each its own rate-limit budget,
/// as separate processes' GitHub clients would have), answering `v:<key>`.
#[derive(Debug, Clone)]
struct FleetSource {
    shared: std::sync::Arc<FleetShared>,
    /// This instance's last known budget ([`Source::rate_limit`]).
    budget: std::sync::Arc<std::sync::Mutex<Option<tiercache::source::RateLimit>>>,
    /// The budget the next answer of this instance leaves.
    budget_after_call: std::sync::Arc<std::sync::Mutex<Option<tiercache::source::RateLimit>>>,
}

impl FleetSource {
    fn new(open: bool) -> Self {
        Self {
            shared: std::sync::Arc::new(FleetShared {
                calls: Default::default(),
                called_at: Default::default(),
                open: tokio::sync::watch::channel(open).0,
                limit_next: Default::default(),
                hang_next: Default::default(),
                failing: Default::default(),
            }),
            budget: Default::default(),
            budget_after_call: Default::default(),
        }
    }

    /// Another instance's client of the same source: calls counted together, its own budget.
    fn instance(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            budget: Default::default(),
            budget_after_call: Default::default(),
        }
    }

    fn calls(&self) -> usize {
        self.shared.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn open(&self) {
        self.shared.open.send_replace(true);
    }
}

#[async_trait::async_trait]
impl tiercache::source::Source for FleetSource {
    async fn fetch(
        &self,
        key: &str,
        _validator: Option<&str>,
    ) -> Result<tiercache::source::Fetched, SourceError> {
        self.shared
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.shared
            .called_at
            .lock()
            .unwrap()
            .push(std::time::Instant::now());
        if self
            .shared
            .hang_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            std::future::pending::<()>().await;
        }
        if self
            .shared
            .failing
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(support::outage());
        }
        if let Some(until) = self.shared.limit_next.lock().unwrap().take() {
            return Err(SourceError::RateLimited {
                until,
                status: Some(429),
                message: "API rate limit exceeded".into(),
            });
        }
        let mut open = self.shared.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
        if let Some(b) = self.budget_after_call.lock().unwrap().take() {
            *self.budget.lock().unwrap() = Some(b);
        }
        Ok(tiercache::source::Fetched::value(format!("v:{key}")))
    }

    fn rate_limit(&self) -> Option<tiercache::source::RateLimit> {
        *self.budget.lock().unwrap()
    }
}

/// Prints a measured figure on the process's stderr (not captured by the harness).
fn measured(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "MEASURED {what}");
}

/// `n` caches on the test's schema, each with its own store and its own client of `source`,
/// the L3 breaker persisted (shared by the fleet).
async fn fleet_on(
    t: &pg::PgTest,
    n: usize,
    source: &FleetSource,
    clock: &MockClock,
    timeout: Duration,
    configure: impl Fn(TieredCacheBuilder) -> TieredCacheBuilder,
) -> Result<(Vec<PostgresStore>, Vec<TieredCache>, Vec<FleetSource>), Box<dyn std::error::Error>> {
    let (mut stores, mut caches, mut sources) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let store = t.store().heartbeat(SLOW_HEARTBEAT).connect().await?;
        let instance = source.instance();
        let cache = configure(
            TieredCache::builder()
                .store(store.clone())
                .source(instance.clone())
                .clock(clock.clone())
                .ttl(TTL)
                .timeout(timeout)
                .persist_breaker(true),
        )
        .build()?;
        stores.push(store);
        caches.push(cache);
        sources.push(instance);
    }
    Ok((stores, caches, sources))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cold_reads_over_four_instances_make_one_source_call() -> TestResult {
    let t = pg_or_skip!("two_hundred_cold_reads_over_four_instances_make_one_source_call");
    let (source, clock) = (FleetSource::new(false), MockClock::new());
    let (_stores, caches, _) =
        fleet_on(&t, 4, &source, &clock, Duration::from_secs(10), |b| b).await?;
    let mut reads = Vec::new();
    for i in 0..200 {
        let cache = caches[i % 4].clone();
        reads.push(tokio::spawn(async move {
            let value = cache.get("cold").await;
            (value, std::time::Instant::now())
        }));
    }
    // One load is at the source (held there); on every instance, 49 reads joined its load.
    let (s, cs) = (&source, &caches);
    eventually(
        "one call at the source, every read joined a load",
        || async move {
            let mut joined = true;
            for c in cs {
                joined &= c.stats().await.coalesced_waiters == 49;
            }
            s.calls() >= 1 && joined
        },
    )
    .await;
    let opened = std::time::Instant::now();
    source.open();
    let mut slowest = Duration::ZERO;
    for read in reads {
        let (value, at) = read.await?;
        assert_eq!(value?, Some(Bytes::from_static(b"v:cold")));
        slowest = slowest.max(at.saturating_duration_since(opened));
    }
    assert_eq!(source.calls(), 1, "one source call for the whole fleet");
    assert_eq!(
        t.one::<i64>("SELECT count(*) FROM {s}.fill_leases").await,
        0,
        "the lease was released"
    );
    measured(&format!(
        "200 cold reads over 4 instances: the last answered {slowest:?} after the source did"
    ));
    Ok(())
}

#[tokio::test]
async fn a_dead_lease_holders_key_is_loaded_by_another_after_its_lease() -> TestResult {
    let t = pg_or_skip!("a_dead_lease_holders_key_is_loaded_by_another_after_its_lease");
    let (source, clock) = (FleetSource::new(true), MockClock::new());
    // The holder runs on a runtime of its own, shut down mid-call: a process that died.
    source
        .shared
        .hang_next
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (dead_source, dead_schema, dead_clock) =
        (source.instance(), t.schema.clone(), clock.clone());
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let dead = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let store = PostgresStore::builder(pg::url())
                .schema(dead_schema)
                .heartbeat(SLOW_HEARTBEAT)
                .connect()
                .await
                .expect("a store");
            let cache = TieredCache::builder()
                .store(store)
                .source(dead_source)
                .clock(dead_clock)
                .ttl(TTL)
                .timeout(Duration::from_millis(500))
                .build()
                .expect("a cache");
            tokio::spawn(async move { cache.get("k").await });
            let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
        });
        rt.shutdown_background();
    });
    let s = &source;
    eventually(
        "the holder called the source",
        || async move { s.calls() == 1 },
    )
    .await;
    let remaining: f64 = t
        .one("SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM {s}.fill_leases WHERE key = 'k'")
        .await;
    let expires = std::time::Instant::now() + Duration::from_secs_f64(remaining.max(0.0));
    tx.send(())?;
    let _ = dead.join();

    let store = t.store().heartbeat(SLOW_HEARTBEAT).connect().await?;
    let live = TieredCache::builder()
        .store(store)
        .source(source.instance())
        .clock(clock.clone())
        .ttl(TTL)
        .timeout(Duration::from_secs(5))
        .build()?;
    assert_eq!(live.get("k").await?, Some(Bytes::from_static(b"v:k")));
    assert_eq!(
        source.calls(),
        2,
        "the dead holder's call, then the taker's"
    );
    let second = source.shared.called_at.lock().unwrap()[1];
    assert!(
        second + Duration::from_millis(50) >= expires,
        "the second call waited for the dead holder's lease to run out"
    );
    Ok(())
}

/// Reads `n` distinct cold keys (named `prefix…`) on each cache at once; how many answered Ok.
async fn read_all(caches: &[TieredCache], prefix: &str, n: usize) -> usize {
    let reads = caches.iter().enumerate().flat_map(|(c, cache)| {
        (0..n).map(move |i| {
            let cache = cache.clone();
            let key = format!("{prefix}{c}-{i}");
            async move { cache.get(&key).await.is_ok() }
        })
    });
    futures_util::future::join_all(reads)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_one_instance_stops_the_fleet_until_the_reset_then_one_probe() -> TestResult {
    let t = pg_or_skip!("a_429_on_one_instance_stops_the_fleet_until_the_reset_then_one_probe");
    let (source, clock) = (FleetSource::new(true), MockClock::new());
    let (_stores, caches, _) =
        fleet_on(&t, 4, &source, &clock, Duration::from_secs(10), |b| b).await?;
    // Every instance has called (and found the shared breaker clean) just now.
    assert_eq!(read_all(&caches, "warm", 1).await, 4);
    assert_eq!(source.calls(), 4);

    // A sees a 429 with a reset a minute ahead.
    let reset = clock.now() + Duration::from_secs(60);
    *source.shared.limit_next.lock().unwrap() = Some(reset);
    assert!(caches[0].get("limited").await.is_err());
    assert_eq!(source.calls(), 5);

    // Within a second (the documented bound) no instance sends anything, until the reset.
    clock.advance(Duration::from_secs(1));
    for step in [
        Duration::ZERO,
        Duration::from_secs(30),
        Duration::from_millis(28_999),
    ] {
        clock.advance(step);
        assert_eq!(read_all(&caches, "during", 5).await, 0);
        assert_eq!(source.calls(), 5, "nothing sent before the reset");
    }
    assert!(clock.now() < reset);

    // Past the reset: reads on all four at once send exactly one probe (held at the source).
    source.shared.open.send_replace(false);
    clock.advance(Duration::from_secs(1));
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut reads = Vec::new();
    for (c, cache) in caches.iter().enumerate() {
        for i in 0..10 {
            let (cache, finished) = (cache.clone(), finished.clone());
            reads.push(tokio::spawn(async move {
                let ok = cache.get(&format!("after{c}-{i}")).await.is_ok();
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                ok
            }));
        }
    }
    // Every read but the probe's is refused while the probe is out.
    let (s, f) = (&source, &finished);
    eventually("39 reads refused, the probe at the source", || async move {
        s.calls() == 6 && f.load(std::sync::atomic::Ordering::SeqCst) == 39
    })
    .await;
    assert_eq!(source.calls(), 6, "exactly one probe fleet-wide");
    source.open();
    let mut answered = 0;
    for read in reads {
        answered += usize::from(read.await?);
    }
    assert_eq!(answered, 1, "only the probe's read was answered");
    assert_eq!(source.calls(), 6);

    // The probe closed the shared breaker: every instance calls again.
    assert_eq!(read_all(&caches, "closed", 1).await, 4);
    assert_eq!(source.calls(), 10);
    Ok(())
}

#[tokio::test]
async fn a_budget_spent_on_one_instance_stops_those_that_never_called() -> TestResult {
    let t = pg_or_skip!("a_budget_spent_on_one_instance_stops_those_that_never_called");
    let (source, clock) = (FleetSource::new(true), MockClock::new());
    let (_stores, caches, sources) =
        fleet_on(&t, 4, &source, &clock, Duration::from_secs(10), |b| b).await?;
    let reset = clock.now() + Duration::from_secs(60);
    *sources[0].budget_after_call.lock().unwrap() =
        Some(tiercache::source::RateLimit::new(5000, 0, reset));
    // A's answer spends the last of the budget: A has its value, and nobody calls again.
    assert!(caches[0].get("last").await?.is_some());
    assert_eq!(source.calls(), 1);
    assert_eq!(read_all(&caches[1..], "never", 5).await, 0);
    assert_eq!(
        source.calls(),
        1,
        "B, C, D never called: the shared row says spent"
    );
    clock.advance(Duration::from_secs(61));
    assert!(caches[1].get("after").await?.is_some(), "the probe");
    assert_eq!(source.calls(), 2);
    Ok(())
}

#[tokio::test]
async fn failures_on_instances_that_missed_an_opening_count_in_the_shared_breaker() -> TestResult {
    let t = pg_or_skip!("failures_on_instances_that_missed_an_opening_count_in_the_shared_breaker");
    let (source, clock) = (FleetSource::new(true), MockClock::new());
    let policy = tiercache::breaker::BreakerPolicy::builder()
        .failure_threshold(2)
        .jitter(0.0)
        .build()?;
    let (_stores, caches, _) = fleet_on(&t, 3, &source, &clock, Duration::from_secs(10), |b| {
        b.source_breaker(policy.clone())
    })
    .await?;
    // The shared breaker opens (a 429 on A) and closes again (A's probe), while B and C are idle.
    *source.shared.limit_next.lock().unwrap() = Some(clock.now() + Duration::from_secs(10));
    assert!(caches[0].get("limited").await.is_err());
    clock.advance(Duration::from_secs(11));
    assert!(caches[0].get("probe").await?.is_some());
    assert_eq!(source.calls(), 2);

    // The source fails once on B and once on C: two failures in a row for the fleet's breaker.
    source
        .shared
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(caches[1].get("b").await.is_err());
    assert!(caches[2].get("c").await.is_err());
    assert_eq!(source.calls(), 4);
    clock.advance(Duration::from_secs(1));
    assert!(caches[0].get("a").await.is_err());
    assert_eq!(
        source.calls(),
        4,
        "the shared breaker opened on B's and C's failures"
    );
    Ok(())
}

/// The same against GitHub's answers (a wiremock fake): each instance has its own
/// `GitHubSource`; a 429 with `Retry-After: 60` seen by the first stops the three others, which
/// never called, until the reset; then one request, and the fleet calls again.
#[tokio::test]
async fn a_github_429_on_one_instance_holds_the_fleet_until_retry_after() -> TestResult {
    use wiremock::matchers::method;
    use wiremock::Mock;
    let t = pg_or_skip!("a_github_429_on_one_instance_holds_the_fleet_until_retry_after");
    let f = github_fake::Fake::start().await;
    Mock::given(method("GET"))
        .respond_with(f.secondary_limit(429, Some("60")))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .respond_with(
            f.answer(200, 4000)
                .insert_header("etag", "\"v1\"")
                .set_body_raw(b"v".to_vec(), "application/vnd.github.raw"),
        )
        .with_priority(2)
        .mount(&f.server)
        .await;
    let mut caches = Vec::new();
    for _ in 0..4 {
        let store = t.store().heartbeat(SLOW_HEARTBEAT).connect().await?;
        caches.push(
            TieredCache::builder()
                .store(store)
                .source(f.source())
                .clock(f.clock.clone())
                .ttl(TTL)
                .build()?,
        );
    }
    let sent = || async { f.server.received_requests().await.unwrap_or_default().len() };
    let err = caches[0].get("octo/app/a.txt").await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(sent().await, 1);
    for step in [Duration::ZERO, Duration::from_secs(59)] {
        f.clock.advance(step);
        for (i, cache) in caches.iter().enumerate() {
            let err = cache.get(&format!("octo/app/{i}.txt")).await.unwrap_err();
            assert!(err.is_unavailable(), "{err}");
        }
        assert_eq!(sent().await, 1, "nothing sent before the reset");
    }
    f.clock.advance(Duration::from_secs(2));
    assert_eq!(
        caches[2].get("octo/app/probe.txt").await?.as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(sent().await, 2, "one probe");
    for (i, cache) in caches.iter().enumerate() {
        assert!(cache
            .get(&format!("octo/app/after{i}.txt"))
            .await?
            .is_some());
    }
    assert_eq!(sent().await, 6, "closed again: every instance calls");
    Ok(())
}

/// What a fill lease adds to a cold miss on PostgreSQL: a take and a release, timed over 500
/// keys (the third statement, the re-read of L2, is a `get`). Run with `cargo test --features
/// postgres --test postgres_fleet -- --ignored --nocapture fill_lease_cost`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn fill_lease_cost() -> TestResult {
    let t = pg_or_skip!("fill_lease_cost");
    let store = t.store().connect().await?;
    let lease = Duration::from_secs(16);
    let mut took = Vec::new();
    for i in 0..500 {
        let key = format!("k{i}");
        let started = std::time::Instant::now();
        let FillLease::Held(token) = store.fill_lease(&key, lease).await? else {
            panic!("a free key's lease is taken");
        };
        store.release_fill_lease(&key, token).await?;
        took.push(started.elapsed());
    }
    print_quantiles("take + release of a fill lease", "keys", took);
    Ok(())
}

#[tokio::test]
async fn leases_that_ran_out_are_pruned_by_the_heartbeat() -> TestResult {
    let t = pg_or_skip!("leases_that_ran_out_are_pruned_by_the_heartbeat");
    let store = t
        .store()
        .heartbeat(Duration::from_millis(50))
        .connect()
        .await?;
    let FillLease::Held(_) = store.fill_lease("dead", Duration::from_millis(1)).await? else {
        panic!("a free key's lease is taken");
    };
    let FillLease::Held(live) = store.fill_lease("live", Duration::from_secs(600)).await? else {
        panic!("a free key's lease is taken");
    };
    // A cache on the store starts its listener, whose heartbeat prunes.
    let _cache = TieredCache::builder()
        .store(store.clone())
        .source(FakeSource::new())
        .build()?;
    let t = &t;
    eventually("the lease that ran out is deleted", || async move {
        t.one::<i64>("SELECT count(*) FROM {s}.fill_leases WHERE key = 'dead'")
            .await
            == 0
    })
    .await;
    assert_eq!(
        t.one::<i64>("SELECT token FROM {s}.fill_leases WHERE key = 'live'")
            .await,
        i64::try_from(live)?,
        "a live lease is kept"
    );
    Ok(())
}

#[tokio::test]
async fn a_waiter_gives_up_after_its_own_lease_duration_without_calling() -> TestResult {
    let t = pg_or_skip!("a_waiter_gives_up_after_its_own_lease_duration_without_calling");
    let (source, clock) = (FleetSource::new(false), MockClock::new());
    let (_s, holder, _) = fleet_on(&t, 1, &source, &clock, Duration::from_secs(30), |b| b).await?;
    let (_s, waiter, _) =
        fleet_on(&t, 1, &source, &clock, Duration::from_millis(200), |b| b).await?;
    let held = tokio::spawn({
        let holder = holder[0].clone();
        async move { holder.get("k").await }
    });
    let s = &source;
    eventually(
        "the holder is at the source",
        || async move { s.calls() == 1 },
    )
    .await;
    let started = std::time::Instant::now();
    let err = waiter[0].get("k").await.unwrap_err();
    let waited = started.elapsed();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(source.calls(), 1, "the waiter never called");
    assert!(
        waited >= Duration::from_millis(1_200),
        "waited its timeout plus the grace: {waited:?}"
    );
    source.open();
    assert_eq!(held.await??, Some(Bytes::from_static(b"v:k")));
    assert_eq!(
        waiter[0].get("k").await?,
        Some(Bytes::from_static(b"v:k")),
        "then served from L2"
    );
    assert_eq!(source.calls(), 1);
    Ok(())
}
