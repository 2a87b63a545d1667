//! `PostgresStore` (feature `postgres`, issue #14) against the real server: the schema's life
//! (created, reopened, newer or foreign refused untouched), the secret in the URL, the storage
//! contract called directly, and `TieredCache`s built on it (read-through, write-behind with
//! dead letters, two caches sharing one schema, the shared source breaker, a server that goes
//! away and comes back). Each test runs on its own fresh schema, dropped at the end; without a
//! server each test says on stderr that it is skipped (see `support/pg.rs`).
#![cfg(feature = "postgres")]

#[path = "support/pg.rs"]
mod pg;
mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pg::eventually;
use support::{outage, FakeSource};
use tiercache::breaker::BreakerPolicy;
use tiercache::source::{Fetched, Source, SourceError};
use tiercache::tier::postgres::{PostgresStore, SCHEMA_VERSION};
use tiercache::tier::{EntryStore, OutboxOp, OutboxStore, Resolved, StateStore, StoredEntry};
use tiercache::{Error, HealthStatus, MockClock, Strategy, Tier, TieredCache, TieredCacheBuilder};
use tokio::sync::Notify;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(60);
const RECOVERY: Duration = Duration::from_secs(5);

macro_rules! pg_or_skip {
    ($name:expr) => {
        match pg::start($name).await {
            Some(t) => t,
            None => return Ok(()),
        }
    };
}

fn entry(value: &str, stored_at: u64) -> StoredEntry {
    StoredEntry::new(
        Some(Bytes::copy_from_slice(value.as_bytes())),
        Some(format!("\"{value}\"")),
        stored_at,
        stored_at + 1_000,
        stored_at + 10_000,
    )
}

/// One failure opens an L2 breaker (faults show at once); probed again after [`RECOVERY`].
fn builder(store: &PostgresStore, source: &FakeSource, clock: &MockClock) -> TieredCacheBuilder {
    let l2_breaker = BreakerPolicy::builder()
        .failure_threshold(1)
        .base_recovery(RECOVERY)
        .max_recovery(RECOVERY)
        .jitter(0.0)
        .build()
        .expect("a valid policy");
    TieredCache::builder()
        .store(store.clone())
        .source(source.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(3600))
        .storage_breaker(l2_breaker)
        .persist_breaker(false)
}

async fn get(cache: &TieredCache, key: &str) -> tiercache::Result<Option<String>> {
    Ok(cache
        .get(key)
        .await?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

#[tokio::test]
async fn the_schema_is_created_with_its_version_and_reopened() -> TestResult {
    let t = pg_or_skip!("the_schema_is_created_with_its_version_and_reopened");
    let store = t.store().connect().await?;
    assert_eq!(store.schema(), t.schema);
    assert_eq!(
        t.one::<i64>("SELECT version FROM {s}.schema_version").await,
        SCHEMA_VERSION
    );
    // Logged by default; reopening (as a second instance would) changes nothing.
    assert!(!store.entries_unlogged());
    store.put("k", entry("v", 10)).await?;
    let again = t.store().entries_unlogged(true).connect().await?;
    assert!(
        !again.entries_unlogged(),
        "an existing schema keeps its choice"
    );
    assert_eq!(again.get("k").await?, Some(entry("v", 10)));
    let tables: i64 = t
        .one(&format!(
            "SELECT count(*) FROM pg_tables WHERE schemaname = '{}'",
            t.schema
        ))
        .await;
    assert_eq!(
        tables, 7,
        "entries, outbox, meta, schema_version, invalidations, invalidations_pruned, fill_leases"
    );
    Ok(())
}

#[tokio::test]
async fn unlogged_entries_never_make_the_outbox_or_the_state_unlogged() -> TestResult {
    let t = pg_or_skip!("unlogged_entries_never_make_the_outbox_or_the_state_unlogged");
    let store = t.store().entries_unlogged(true).connect().await?;
    assert!(store.entries_unlogged());
    let persistence = |table: &'static str| {
        format!(
            "SELECT c.relpersistence::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = '{}' AND c.relname = '{table}'",
            t.schema
        )
    };
    assert_eq!(t.one::<String>(&persistence("entries")).await, "u");
    for table in ["outbox", "meta", "schema_version", "fill_leases"] {
        assert_eq!(t.one::<String>(&persistence(table)).await, "p", "{table}");
    }
    Ok(())
}

#[tokio::test]
async fn a_newer_or_foreign_schema_is_refused_untouched() -> TestResult {
    let t = pg_or_skip!("a_newer_or_foreign_schema_is_refused_untouched");
    drop(t.store().connect().await?);
    t.exec("UPDATE {s}.schema_version SET version = 99; INSERT INTO {s}.meta VALUES ('mine', 'x')")
        .await;
    let refused = t.store().connect().await;
    match &refused {
        Err(Error::IncompatibleSchema {
            found: Some(99),
            location,
            ..
        }) => assert!(location.contains(&t.schema), "{location}"),
        other => panic!("expected IncompatibleSchema, got {other:?}"),
    }
    assert_eq!(
        t.one::<i64>("SELECT version FROM {s}.schema_version").await,
        99
    );
    assert_eq!(t.one::<String>("SELECT value FROM {s}.meta").await, "x");
    // A version table without its row is not guessed at either.
    t.exec("DELETE FROM {s}.schema_version").await;
    let refused = t.store().connect().await;
    assert!(
        matches!(refused, Err(Error::IncompatibleSchema { found: None, .. })),
        "{refused:?}"
    );

    // Another application's schema: tables, no version row. Nothing is created in it.
    t.exec("DROP SCHEMA {s} CASCADE; CREATE SCHEMA {s}; CREATE TABLE {s}.entries (id int)")
        .await;
    let refused = t.store().connect().await;
    assert!(
        matches!(refused, Err(Error::IncompatibleSchema { found: None, .. })),
        "{refused:?}"
    );
    let tables: i64 = t
        .one(&format!(
            "SELECT count(*) FROM pg_tables WHERE schemaname = '{}'",
            t.schema
        ))
        .await;
    assert_eq!(tables, 1, "only the other application's table");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_server_is_named_without_its_password() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let err = PostgresStore::builder("postgres://alice:hunter2@127.0.0.1:1/cache")
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_storage(), "{err:?}");
    let report = err.report();
    assert!(
        report.contains("could not connect to PostgreSQL at postgres://alice@127.0.0.1:1/cache"),
        "{report}"
    );
    for shown in [report, err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("hunter2"), "{shown}");
    }
    let bad = PostgresStore::connect("postgres://alice:hunter2@127.0.0.1:notaport/x").await;
    match bad {
        Err(Error::Config(m)) => assert!(!m.contains("hunter2"), "{m}"),
        other => panic!("expected a Config error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connected_store_never_shows_its_password() -> TestResult {
    let t = pg_or_skip!("a_connected_store_never_shows_its_password");
    // Trust authentication ignores the password: it is only carried, and must not be shown.
    let user = t.user();
    let url = format!("{} password=hunter2", t.url_as(&user));
    let store = match PostgresStore::builder(url)
        .schema(t.schema.clone())
        .connect()
        .await
    {
        Ok(s) => s,
        Err(e) => {
            pg::skip(
                "a_connected_store_never_shows_its_password",
                &format!("the server wants a real password: {e}"),
            );
            return Ok(());
        }
    };
    let shown = format!("{store:?} {}", store.server());
    assert!(shown.contains(&format!("{user}@")), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    Ok(())
}

#[tokio::test]
async fn the_store_keeps_the_storage_contract() -> TestResult {
    let t = pg_or_skip!("the_store_keeps_the_storage_contract");
    let store = t.store().connect().await?;
    // Entries: written whole, read back exactly; a negative entry is not an empty value.
    store.put("a", entry("1", 10)).await?;
    store
        .put("neg", StoredEntry::new(None, None, 10, 20, 30))
        .await?;
    store
        .put(
            "empty",
            StoredEntry::new(Some(Bytes::new()), None, 10, 20, 30),
        )
        .await?;
    assert_eq!(store.get("a").await?, Some(entry("1", 10)));
    assert_eq!(store.get("neg").await?.and_then(|e| e.value), None);
    assert_eq!(
        store.get("empty").await?.and_then(|e| e.value),
        Some(Bytes::new())
    );
    assert_eq!(store.get("nothing").await?, None);

    // The outbox: ids grow; the newest pending op is what a key reads as, in get_many too.
    let id1 = store
        .enqueue(
            "b",
            Some(entry("2", 11)),
            OutboxOp::Put(Bytes::from("2")),
            11,
        )
        .await?;
    let id2 = store.enqueue("b", None, OutboxOp::Delete, 12).await?;
    let id3 = store
        .enqueue(
            "c",
            Some(entry("3", 13)),
            OutboxOp::Put(Bytes::from("3")),
            13,
        )
        .await?;
    assert!(id1 < id2 && id2 < id3, "{id1} {id2} {id3}");
    assert_eq!(store.get("b").await?, None, "the delete removed the entry");
    assert_eq!(store.outbox_newest("b").await?, Some(OutboxOp::Delete));
    let mut found = store.get_many(&["a", "b", "c", "nothing"]).await?;
    found.entries.sort_by(|x, y| x.0.cmp(&y.0));
    found.pending.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        found.entries,
        vec![("a".into(), entry("1", 10)), ("c".into(), entry("3", 13))]
    );
    assert_eq!(
        found.pending,
        vec![
            ("b".into(), OutboxOp::Delete),
            ("c".into(), OutboxOp::Put(Bytes::from("3")))
        ]
    );
    assert!(store.get_many(&[]).await?.entries.is_empty());
    let pending = store.outbox_pending(10).await?;
    assert_eq!(
        pending.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![id1, id2, id3]
    );
    assert_eq!(store.outbox_pending(1).await?.len(), 1);

    // A delivered delete of b settles up to id2: b's entry stays removed; c's entry stays
    // while a newer write of c is pending.
    store.outbox_complete(vec![id1, id2]).await?;
    store.remove_settled("c", id3 - 1).await?;
    assert_eq!(store.get("c").await?, Some(entry("3", 13)), "c is pending");

    // Refused for good: a dead letter; c's entry goes (nothing newer is pending).
    store
        .outbox_failed(vec![id3], 99, "HTTP 422".into(), true)
        .await?;
    assert_eq!(store.get("c").await?, None);
    assert_eq!(store.outbox_pending(10).await?, vec![]);
    let dead = store.dead_letters().await?;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (d.id, d.attempts, d.next_attempt, d.dead, d.superseded),
        (id3, 1, 99, true, false)
    );
    assert_eq!(d.last_error.as_deref(), Some("HTTP 422"));
    // A transient failure of a pending row: counted, not dead.
    let id4 = store
        .enqueue(
            "d",
            Some(entry("4", 14)),
            OutboxOp::Put(Bytes::from("4")),
            14,
        )
        .await?;
    store
        .outbox_failed(vec![id4], 50, "HTTP 503".into(), false)
        .await?;
    assert_eq!(
        store.outbox_summary().await?,
        (1, vec![("d".to_owned(), "HTTP 503".to_owned())])
    );
    // A newer write of c supersedes its dead letter: not retried, kept until discarded.
    store.enqueue("c", None, OutboxOp::Delete, 15).await?;
    assert_eq!(
        store.resolve_dead_letter(id3, true).await?,
        Resolved::Superseded("c".into())
    );
    assert_eq!(store.resolve_dead_letter(id3, false).await?, Resolved::Done);
    assert_eq!(
        store.resolve_dead_letter(id3, false).await?,
        Resolved::Missing
    );

    // The summary counts both tables at `now`.
    let s = store.summary(25).await?;
    assert_eq!(
        (
            s.entries,
            s.negative_entries,
            s.outbox_depth,
            s.dead_letters
        ),
        (4, 1, 2, 0),
        "{s:?}"
    );
    assert_eq!(s.stale_entries, 2, "neg and empty are past fresh_until 20");
    assert_eq!(s.oldest_pending_ms, Some(14));

    // Shared state: read-modify-write in one step.
    assert_eq!(store.load_meta("x").await?, None);
    let v = store
        .update_meta(
            "x",
            Box::new(|old| Some(format!("{}+1", old.unwrap_or_default()))),
        )
        .await?;
    assert_eq!(v.as_deref(), Some("+1"));
    store
        .update_meta("x", Box::new(|old| old.map(|o| o + "+1")))
        .await?;
    assert_eq!(store.load_meta("x").await?.as_deref(), Some("+1+1"));
    store.update_meta("x", Box::new(|_| None)).await?;
    assert_eq!(store.load_meta("x").await?, None);
    Ok(())
}

#[tokio::test]
async fn concurrent_meta_updates_from_two_stores_lose_none() -> TestResult {
    let t = pg_or_skip!("concurrent_meta_updates_from_two_stores_lose_none");
    let (a, b) = (t.store().connect().await?, t.store().connect().await?);
    let bump = |s: PostgresStore| async move {
        for _ in 0..25 {
            s.update_meta(
                "n",
                Box::new(|old| {
                    let n: u32 = old.and_then(|o| o.parse().ok()).unwrap_or(0);
                    Some((n + 1).to_string())
                }),
            )
            .await?;
        }
        Ok::<_, Error>(())
    };
    let (ra, rb) = tokio::join!(tokio::spawn(bump(a.clone())), tokio::spawn(bump(b)));
    ra??;
    rb??;
    assert_eq!(a.load_meta("n").await?.as_deref(), Some("50"));
    Ok(())
}

#[tokio::test]
async fn a_cache_on_postgres_reads_through_and_serves_from_l2() -> TestResult {
    let t = pg_or_skip!("a_cache_on_postgres_reads_through_and_serves_from_l2");
    let store = t.store().connect().await?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "1");
    let cache = builder(&store, &source, &clock).build()?;
    assert_eq!(cache.lookup("a").await?.expect("a value").tier, Tier::L3);
    assert_eq!(
        store.get("a").await?.and_then(|e| e.value),
        Some(Bytes::from("1"))
    );
    assert!(cache.get("missing").await?.is_none());
    let negative = store.get("missing").await?.expect("a negative entry");
    assert_eq!(negative.value, None);
    cache.clear_memory().await;
    let l = cache.lookup("a").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"1"[..], Tier::L2));
    cache.clear_memory().await;
    let batch = cache.mget(&["a", "missing"]).await;
    let first = batch[0].as_ref().map_err(|e| e.to_string())?;
    assert_eq!(first.as_ref().map(|l| l.tier), Some(Tier::L2));
    assert!(batch[1].as_ref().map_err(|e| e.to_string())?.is_none());
    assert_eq!(source.fetch_count(), 2, "nothing was fetched twice");
    // set and delete (read-through: L1 + L2 only).
    cache.set("b", "x").await?;
    assert_eq!(
        store.get("b").await?.and_then(|e| e.value),
        Some(Bytes::from("x"))
    );
    cache.delete("b").await?;
    assert_eq!(store.get("b").await?, None);
    // Expired in L1 and L2: revalidated with the stored validator (a 304 renews).
    clock.advance(TTL + Duration::from_secs(1));
    assert_eq!(get(&cache, "a").await?.as_deref(), Some("1"));
    assert_eq!(source.fetches().last().map(|f| f.1.is_some()), Some(true));
    let summary = cache.store_summary().await?;
    assert_eq!((summary.entries, summary.negative_entries), (2, 1));
    assert_eq!(cache.health().await.status, HealthStatus::Healthy);
    Ok(())
}

fn refused() -> SourceError {
    SourceError::Rejected {
        status: Some(422),
        message: "Invalid request".into(),
    }
}

#[tokio::test]
async fn write_behind_enqueues_delivers_and_dead_letters_on_postgres() -> TestResult {
    let t = pg_or_skip!("write_behind_enqueues_delivers_and_dead_letters_on_postgres");
    let store = t.store().connect().await?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let cache = builder(&store, &source, &clock)
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    cache.set("k", "v1").await?;
    assert_eq!(store.outbox_pending(10).await?.len(), 1);
    cache.clear_memory().await;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v1"), "pending");
    assert_eq!(cache.flush().await?.delivered, 1);
    assert_eq!(source.value("k").as_deref(), Some(&b"v1"[..]));
    assert!(store.outbox_pending(10).await?.is_empty());

    // Refused: a dead letter; the local copy goes, the source's value stands.
    source.fail_writes(Some(refused()));
    cache.set("k", "v2").await?;
    assert_eq!(cache.flush().await?.dead_lettered, 1);
    assert_eq!(store.get("k").await?, None);
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v1"));
    let dead = cache.dead_letters().await?;
    assert_eq!((dead.len(), dead[0].superseded), (1, false));

    // A newer write supersedes it.
    source.fail_writes(None);
    cache.set("k", "v3").await?;
    assert!(cache.flush().await?.is_complete());
    assert!(matches!(
        cache.retry_dead_letter(dead[0].id).await,
        Err(Error::Superseded { .. })
    ));
    assert!(cache.discard_dead_letter(dead[0].id).await?);
    assert!(cache.dead_letters().await?.is_empty());

    // A delete, delivered; nothing left pending.
    cache.delete("k").await?;
    assert!(cache.get("k").await?.is_none(), "pending delete");
    assert_eq!(cache.flush().await?.delivered, 1);
    assert_eq!(source.value("k"), None);
    cache.clear_memory().await;
    assert!(cache.get("k").await?.is_none());
    let summary = cache.store_summary().await?;
    assert_eq!((summary.outbox_depth, summary.dead_letters), (0, 0));

    // A retried dead letter is pending again: the answer cached while it was dead goes.
    source.fail_writes(Some(refused()));
    cache.set("r", "refused once").await?;
    assert_eq!(cache.flush().await?.dead_lettered, 1);
    assert_eq!(get(&cache, "r").await?, None, "the source's answer, cached");
    assert!(store.get("r").await?.is_some(), "a negative entry");
    source.fail_writes(None);
    let dead = cache.dead_letters().await?;
    assert!(cache.retry_dead_letter(dead[0].id).await?);
    assert_eq!(store.get("r").await?, None, "removed with the retry");
    assert_eq!(get(&cache, "r").await?.as_deref(), Some("refused once"));
    assert_eq!(cache.flush().await?.delivered, 1);
    assert_eq!(get(&cache, "r").await?.as_deref(), Some("refused once"));
    Ok(())
}

#[tokio::test]
async fn two_caches_on_one_schema_share_entries_and_the_outbox() -> TestResult {
    let t = pg_or_skip!("two_caches_on_one_schema_share_entries_and_the_outbox");
    let (sa, sb) = (t.store().connect().await?, t.store().connect().await?);
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let a = builder(&sa, &source, &clock).build()?;
    let b = builder(&sb, &source, &clock).build()?;
    // A's write is B's L2 hit.
    a.set("k", "from a").await?;
    let l = b.lookup("k").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"from a"[..], Tier::L2));
    // B's delete is gone from L2 for A (A's own L1 copy is dropped first: no cross-instance
    // invalidation yet, see the module docs).
    b.delete("k").await?;
    a.clear_memory().await;
    assert!(a.get("k").await?.is_none());
    assert_eq!(
        source.fetch_count(),
        1,
        "A found no entry and asked the source"
    );

    // Write-behind: A's write is pending for B, and B's flush delivers it (one outbox).
    let wa = builder(&sa, &source, &clock)
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    let wb = builder(&sb, &source, &clock)
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    wa.set("w", "pending").await?;
    assert_eq!(get(&wb, "w").await?.as_deref(), Some("pending"));
    assert_eq!(wb.flush().await?.delivered, 1);
    assert_eq!(source.value("w").as_deref(), Some(&b"pending"[..]));
    assert_eq!(wa.flush().await?.delivered, 0, "delivered once");
    Ok(())
}

#[tokio::test]
async fn the_source_breaker_is_shared_through_the_schema() -> TestResult {
    let t = pg_or_skip!("the_source_breaker_is_shared_through_the_schema");
    let (sa, sb) = (t.store().connect().await?, t.store().connect().await?);
    let clock = MockClock::new();
    let (source_a, source_b) = (FakeSource::new(), FakeSource::new());
    source_b.insert("k", "v");
    let open_at_once = || {
        BreakerPolicy::builder()
            .failure_threshold(1)
            .base_recovery(Duration::from_secs(60))
            .max_recovery(Duration::from_secs(60))
            .jitter(0.0)
            .build()
            .expect("a valid policy")
    };
    let a = builder(&sa, &source_a, &clock)
        .persist_breaker(true)
        .source_breaker(open_at_once())
        .build()?;
    let b = builder(&sb, &source_b, &clock)
        .persist_breaker(true)
        .source_breaker(open_at_once())
        .build()?;
    source_a.fail_fetches(Some(outage()));
    assert!(a.get("k").await.is_err());
    let persisted: String = t.one("SELECT value FROM {s}.meta").await;
    assert!(persisted.contains("open"), "{persisted}");
    // B never saw a failure of its own, yet its source is not called: the breaker is shared.
    assert!(matches!(b.get("k").await, Err(Error::Unavailable { .. })));
    assert_eq!(source_b.fetch_count(), 0);
    Ok(())
}

#[tokio::test]
async fn a_server_that_goes_away_degrades_l2_and_recovers() -> TestResult {
    let mut t = pg_or_skip!("a_server_that_goes_away_degrades_l2_and_recovers");
    // The store logs in as a role of its own, so its connections can be killed and refused
    // without touching anyone else's.
    let Some(role) = t
        .role("a_server_that_goes_away_degrades_l2_and_recovers")
        .await
    else {
        return Ok(());
    };
    let store = PostgresStore::builder(t.url_as(&role))
        .schema(t.schema.clone())
        .pool_size(2)
        .connect()
        .await?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "1");
    source.insert("b", "2");
    let cache = builder(&store, &source, &clock).build()?;
    assert_eq!(get(&cache, "a").await?.as_deref(), Some("1"));

    // The server goes away: every connection of the role is killed (waiting, up to 5 s each,
    // until the backend is gone) and new ones are refused.
    t.exec(&format!(
        "ALTER ROLE {role} NOLOGIN;
         SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = '{role}';"
    ))
    .await;
    match store.get("a").await {
        Err(Error::Storage { .. }) => {}
        other => panic!("expected a storage error, got {other:?}"),
    }
    // The cache carries on: L1 answers, a miss goes to the source, a durable write is refused.
    assert_eq!(cache.lookup("a").await?.expect("a value").tier, Tier::L1);
    let l = cache.lookup("b").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"2"[..], Tier::L3));
    assert_ne!(cache.health().await.l2.status, HealthStatus::Healthy);
    let wb = builder(&store, &source, &clock)
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    assert!(matches!(wb.set("c", "3").await, Err(Error::Storage { .. })));

    // Back: after the breaker's recovery time L2 answers again, on new connections.
    t.exec(&format!("ALTER ROLE {role} LOGIN")).await;
    clock.advance(RECOVERY);
    cache.clear_memory().await;
    let l = cache.lookup("a").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"1"[..], Tier::L2));
    // The write breaker is probed by the next write, which lands.
    cache.set("c", "3").await?;
    assert_eq!(
        store.get("c").await?.and_then(|e| e.value),
        Some(Bytes::from("3"))
    );
    let health = cache.health().await;
    assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
    assert_eq!(source.fetch_count(), 2, "a once, b once");
    Ok(())
}

/// A source whose fetch says when it was reached, then waits to be released: a fill held at a
/// known point while another cache writes.
#[derive(Debug, Clone, Default)]
struct GatedSource {
    reached: Arc<Notify>,
    release: Arc<Notify>,
}

#[async_trait]
impl Source for GatedSource {
    async fn fetch(&self, _key: &str, _validator: Option<&str>) -> Result<Fetched, SourceError> {
        self.reached.notify_one();
        self.release.notified().await;
        Ok(Fetched::value_with_validator("old", "\"old\""))
    }
}

#[tokio::test]
async fn a_fill_never_overwrites_another_caches_newer_write() -> TestResult {
    let t = pg_or_skip!("a_fill_never_overwrites_another_caches_newer_write");
    let (sa, sb) = (t.store().connect().await?, t.store().connect().await?);
    let (gate, clock) = (GatedSource::default(), MockClock::new());
    let a = TieredCache::builder()
        .store(sa.clone())
        .source(gate.clone())
        .clock(clock.clone())
        .ttl(TTL)
        .persist_breaker(false)
        .build()?;
    let b = builder(&sb, &FakeSource::new(), &clock).build()?;
    // A misses everywhere and asks the source; while the answer is on its way, B writes.
    let race = async {
        gate.reached.notified().await;
        b.set("k", "new").await?;
        gate.release.notify_one();
        Ok::<_, Error>(())
    };
    let (read, raced) = tokio::join!(get(&a, "k"), race);
    raced?;
    assert_eq!(
        read?.as_deref(),
        Some("old"),
        "the read began before the write"
    );
    // The fill saw no row, and found B's at its write: refused, in L2 and A's L1 alike.
    assert_eq!(
        sa.get("k").await?.and_then(|e| e.value),
        Some(Bytes::from("new"))
    );
    let l = a.lookup("k").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"new"[..], Tier::L2));
    Ok(())
}

#[tokio::test]
async fn concurrent_writes_of_a_key_from_two_stores_keep_entry_and_outbox_in_step() -> TestResult {
    let t = pg_or_skip!("concurrent_writes_of_a_key_from_two_stores_keep_entry_and_outbox_in_step");
    let (a, b) = (t.store().connect().await?, t.store().connect().await?);
    // Puts and deletes of one key from two stores at once: whatever the interleaving, the key's
    // entry is what its newest outbox row says (the row's id is drawn under the key's lock).
    let writer = |s: PostgresStore, tag: &'static str| async move {
        for i in 0..30u64 {
            if i % 3 == 2 {
                s.enqueue("k", None, OutboxOp::Delete, i).await?;
            } else {
                let v = format!("{tag}{i}");
                let e = entry(&v, i);
                s.enqueue("k", Some(e), OutboxOp::Put(Bytes::from(v)), i)
                    .await?;
            }
        }
        Ok::<_, Error>(())
    };
    let (ra, rb) = tokio::join!(
        tokio::spawn(writer(a.clone(), "a")),
        tokio::spawn(writer(b, "b"))
    );
    ra??;
    rb??;
    let rows = a.outbox_pending(100).await?;
    assert_eq!(rows.len(), 60);
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
    let held = a.get("k").await?.map(|e| e.value);
    match a.outbox_newest("k").await? {
        Some(OutboxOp::Put(v)) => assert_eq!(held, Some(Some(v))),
        Some(OutboxOp::Delete) => assert_eq!(held, None),
        None => panic!("60 rows are pending"),
    }
    Ok(())
}

#[tokio::test]
async fn a_schema_made_by_an_administrator_serves_a_role_that_may_not_create_schemas() -> TestResult
{
    let test = "a_schema_made_by_an_administrator_serves_a_role_that_may_not_create_schemas";
    let mut t = pg_or_skip!(test);
    let Some(role) = t.role(test).await else {
        return Ok(());
    };
    let db: String = t.one("SELECT current_database()::text").await;
    t.exec(&format!(
        "REVOKE CREATE ON DATABASE \"{db}\" FROM {role}; CREATE SCHEMA {{s}} AUTHORIZATION {role}"
    ))
    .await;
    let store = PostgresStore::builder(t.url_as(&role))
        .schema(t.schema.clone())
        .connect()
        .await?;
    store.put("k", entry("v", 1)).await?;
    assert_eq!(store.get("k").await?, Some(entry("v", 1)));
    Ok(())
}

#[tokio::test]
async fn a_write_sent_behind_the_keys_lock_waits_for_it() -> TestResult {
    let t = pg_or_skip!("a_write_sent_behind_the_keys_lock_waits_for_it");
    let store = t.store().connect().await?;
    // Another session holds the key's lock (its documented name: `<schema>/e/<key>`).
    let lock = format!("{}/e/k", t.schema);
    t.admin
        .execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&lock])
        .await?;
    let writer = tokio::spawn({
        let store = store.clone();
        async move { store.put("k", entry("v", 1)).await }
    });
    // Polled with a deadline (the server's state, not a timer): the store's session is seen
    // waiting for that lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = t
            .one(&format!(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND ((classid::bigint << 32) | objid::bigint) = hashtextextended('{lock}', 0)"
            ))
            .await;
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the put never waited for the lock"
        );
        tokio::task::yield_now().await;
    }
    // The upsert, sent in the same round trip, has not run: had it, this insert of the same
    // key would wait for the store's transaction (and fail after the lock timeout).
    t.exec(
        "SET lock_timeout = '5s';
         INSERT INTO {s}.entries VALUES ('k', NULL, NULL, 0, 0, 0, 0, 0);
         RESET lock_timeout",
    )
    .await;
    assert!(!writer.is_finished());
    t.admin
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&lock],
        )
        .await?;
    writer.await??;
    assert_eq!(store.get("k").await?, Some(entry("v", 1)));
    Ok(())
}

/// `tiercache --postgres URL --postgres-schema S`: a `put` by one process is a `get` (an L2
/// hit, GitHub never asked) by another, and no SQLite file is made.
#[tokio::test]
async fn the_command_line_puts_and_gets_through_postgres() -> TestResult {
    let t = pg_or_skip!("the_command_line_puts_and_gets_through_postgres");
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("never.db");
    let file = dir.path().join("prod.toml");
    std::fs::write(&file, "port = 9090\n")?;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tiercache"))
            .args(["--postgres", &pg::url(), "--postgres-schema", &t.schema])
            // Nothing listens there: any request to GitHub would fail.
            .args([
                "--api-url",
                "http://127.0.0.1:9",
                "--db",
                db.to_str().unwrap(),
            ])
            .args(args)
            .env_remove("TIERCACHE_CONFIG")
            .output()
    };
    let put = run(&["put", "octo/app/prod.toml", file.to_str().unwrap()])?;
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = run(&["get", "--json", "octo/app/prod.toml"])?;
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&get.stdout)?;
    assert_eq!(
        (json["content"].as_str(), json["tier"].as_str()),
        (Some("port = 9090\n"), Some("l2"))
    );
    assert!(!db.exists(), "L2 was PostgreSQL, not the SQLite file");
    Ok(())
}

/// An unreachable `--postgres` server: a clear error, the password never printed.
#[test]
fn the_command_line_names_an_unreachable_server_without_its_password() -> TestResult {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiercache"))
        .args(["--postgres", "postgres://app:s3cr3t-pw@127.0.0.1:1/cache"])
        .args([
            "--api-url",
            "http://127.0.0.1:9",
            "get",
            "octo/app/prod.toml",
        ])
        .env_remove("TIERCACHE_CONFIG")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("s3cr3t-pw"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cr3t-pw"));
    Ok(())
}

/// Two `tiercache::serve` replicas on one schema (what `tiercache serve --postgres` runs): a PUT
/// through one is a GET through the other, and a conditional GET gets 304.
#[tokio::test]
async fn two_http_replicas_on_one_schema_serve_each_others_writes() -> TestResult {
    use std::future::IntoFuture;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let t = pg_or_skip!("two_http_replicas_on_one_schema_serve_each_others_writes");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("octo/app/a.toml", "v1");
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let store = t.store().connect().await?;
        let cache = builder(&store, &source, &clock).build()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        tokio::spawn(axum::serve(listener, tiercache::serve::router(cache)).into_future());
    }
    // One request: the raw answer (hyper writes header names in lower case).
    let request = |addr: std::net::SocketAddr, head: String, body: &'static [u8]| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{head}\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let path = "/components/octo/app/a.toml";
    let first = request(addrs[0], format!("GET {path} HTTP/1.1"), b"").await?;
    assert!(
        first.starts_with("HTTP/1.1 200") && first.ends_with("v1"),
        "{first}"
    );
    let put = request(addrs[0], format!("PUT {path} HTTP/1.1"), b"v2").await?;
    assert!(put.starts_with("HTTP/1.1 204"), "{put}");
    let other = request(addrs[1], format!("GET {path} HTTP/1.1"), b"").await?;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    assert!(
        other.contains("x-tiercache-tier: l2") && other.ends_with("v2"),
        "{other}"
    );
    assert_eq!(
        source.fetch_count(),
        1,
        "the second replica read PostgreSQL, not the source"
    );
    // The value fetched from the source has an ETag; a conditional GET of it gets 304.
    source.insert("octo/app/b.toml", "b");
    let b = request(
        addrs[1],
        "GET /components/octo/app/b.toml HTTP/1.1".into(),
        b"",
    )
    .await?;
    let etag = b
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .ok_or("an etag")?
        .trim()
        .to_owned();
    let again = format!("GET /components/octo/app/b.toml HTTP/1.1\r\nIf-None-Match: {etag}");
    let not_modified = request(addrs[0], again, b"").await?;
    assert!(not_modified.starts_with("HTTP/1.1 304"), "{not_modified}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Offline bundles on PostgreSQL: `EntryStore::snapshot` (export) and `merge` (import).
// ---------------------------------------------------------------------------------------------

/// A value holding every byte, then `key`'s bytes: byte-exactness shows.
fn binary(key: &str) -> Bytes {
    let mut v: Vec<u8> = (0..=255u8).collect();
    v.extend_from_slice(key.as_bytes());
    Bytes::from(v)
}

#[tokio::test]
async fn an_export_from_postgres_imported_into_sqlite_serves_every_key_offline() -> TestResult {
    let t = pg_or_skip!("an_export_from_postgres_imported_into_sqlite_serves_every_key_offline");
    let store = t.store().connect().await?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let now = tiercache::Clock::now_millis(&clock);
    // More than one page of the cursor (500 rows), keys whose bytes sort differently under a
    // language collation (upper/lower case, `_`, `%`), values of every byte.
    let mut keys: Vec<String> = (0..1_203).map(|i| format!("bulk/{i:05}")).collect();
    keys.extend(["a_%/x", "a_%/Y", "aX%/z", "a_b/c", "B/upper", "b/lower"].map(str::to_owned));
    let fresh = |key: &str| {
        StoredEntry::new(
            Some(binary(key)),
            Some(format!("\"etag-{key}\"")),
            now,
            now + 60_000,
            now + 3_600_000,
        )
    };
    store
        .merge(keys.iter().map(|k| (k.clone(), fresh(k))).collect())
        .await?;
    // Left out: a negative entry, an expired one, one with a pending write-behind write.
    let mut negative = fresh("neg");
    negative.value = None;
    store.put("neg", negative).await?;
    store
        .put(
            "expired",
            StoredEntry::new(Some(binary("e")), None, 1, 2, 3),
        )
        .await?;
    store.put("pending", fresh("pending")).await?;
    store
        .enqueue(
            "pending",
            Some(fresh("pending")),
            OutboxOp::Put(binary("pending")),
            now,
        )
        .await?;
    let pg_cache = builder(&store, &source, &clock).build()?;

    let dir = tempfile::tempdir()?;
    let bundle = dir.path().join("pg.bundle");
    let exported = pg_cache.export(&bundle).await?;
    assert_eq!(exported.entries, keys.len() as u64, "{exported:?}");
    assert_eq!(
        (exported.skipped_negative, exported.skipped_expired),
        (1, 1),
        "{exported:?}"
    );

    let runner_source = FakeSource::new();
    let runner = TieredCache::builder()
        .source(runner_source.clone())
        .sqlite_path(dir.path().join("runner.db"))
        .clock(clock.clone())
        .offline(true)
        .build()?;
    let imported = runner.import(&bundle).await?;
    assert_eq!(imported.imported, keys.len() as u64, "{imported:?}");
    for key in &keys {
        let hit = runner.lookup(key).await?.expect("imported");
        assert_eq!(hit.value, binary(key), "{key} byte-exact");
        assert_eq!(hit.validator, Some(format!("\"etag-{key}\"")), "{key}");
    }
    for key in ["neg", "expired", "pending"] {
        assert!(
            runner.lookup(key).await.is_err(),
            "{key}: not in the bundle"
        );
    }
    assert_eq!(runner_source.fetch_count(), 0, "offline");

    // A prefix is a prefix: `_` and `%` are plain characters, not `LIKE` wildcards.
    let part = dir.path().join("part.bundle");
    let options = tiercache::bundle::ExportOptions::new().prefix("a_%/");
    assert_eq!(pg_cache.export_with(&part, &options).await?.entries, 2);
    Ok(())
}

#[tokio::test]
async fn a_bundle_imported_on_one_postgres_instance_drops_the_others_l1_copy() -> TestResult {
    let t = pg_or_skip!("a_bundle_imported_on_one_postgres_instance_drops_the_others_l1_copy");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("k", "old");
    let (a, b) = (t.store().connect().await?, t.store().connect().await?);
    let cache_a = builder(&a, &source, &clock).build()?;
    let cache_b = builder(&b, &source, &clock).build()?;
    for s in [&a, &b] {
        eventually("the listener connected", || async move { s.listening() }).await;
    }
    // B holds "old" in its L1.
    assert_eq!(get(&cache_b, "k").await?.as_deref(), Some("old"));
    eventually("k in B's L1", || async {
        let l = cache_b.lookup("k").await.expect("a read").expect("a value");
        l.tier == Tier::L1
    })
    .await;

    // A bundle from a PostgreSQL cache on another schema, made later (a newer `stored_at`).
    let other = t
        .store()
        .schema(format!("{}_src", t.schema))
        .connect()
        .await?;
    let later = MockClock::new();
    later.advance(Duration::from_secs(5));
    let exporter = builder(&other, &FakeSource::new(), &later)
        .strategy(Strategy::CacheAside)
        .build()?;
    exporter.set("k", "new").await?;
    let dir = tempfile::tempdir()?;
    let bundle = dir.path().join("k.bundle");
    assert_eq!(exporter.export(&bundle).await?.entries, 1);
    t.admin
        .batch_execute(&format!("DROP SCHEMA \"{}_src\" CASCADE", t.schema))
        .await?;

    assert_eq!(cache_a.import(&bundle).await?.imported, 1);
    // The import is published: B drops its copy and reads the imported entry from L2.
    eventually("B reads the imported value", || async {
        get(&cache_b, "k").await.expect("a read").as_deref() == Some("new")
    })
    .await;
    assert_eq!(
        source.fetch_count(),
        1,
        "only B's first read asked the source"
    );
    Ok(())
}

#[tokio::test]
async fn on_postgres_a_missed_invalidation_lasts_at_most_the_default_max_l1_age() -> TestResult {
    let t = pg_or_skip!("on_postgres_a_missed_invalidation_lasts_at_most_the_default_max_l1_age");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("k", "old");
    let store = t.store().connect().await?;
    let cache = builder(&store, &source, &clock)
        .ttl(Duration::from_secs(3600))
        .build()?;
    eventually("the listener connected", || async { store.listening() }).await;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("old"));
    assert_eq!(cache.lookup("k").await?.expect("a value").tier, Tier::L1);
    // A write whose invalidation never arrives: the row changed behind the store's back.
    t.admin
        .execute(
            &format!(
                "UPDATE \"{}\".entries SET value = 'new'::bytea WHERE key = 'k'",
                t.schema
            ),
            &[],
        )
        .await?;
    clock.advance(tiercache::DEFAULT_MAX_L1_AGE - Duration::from_millis(1));
    let l = cache.lookup("k").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"old"[..], Tier::L1));
    clock.advance(Duration::from_millis(1));
    let l = cache.lookup("k").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"new"[..], Tier::L2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_reads_one_moment_whatever_is_written_while_it_pages() -> TestResult {
    let t = pg_or_skip!("a_snapshot_reads_one_moment_whatever_is_written_while_it_pages");
    let store = t.store().connect().await?;
    let keys: Vec<String> = (0..1_200).map(|i| format!("k/{i:05}")).collect();
    store
        .merge(keys.iter().map(|k| (k.clone(), entry(k, 1_000))).collect())
        .await?;
    let (writer, handle) = (store.clone(), tokio::runtime::Handle::current());
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink: tiercache::tier::EntrySink = {
        let seen = seen.clone();
        Box::new(move |key, e| {
            if key == "k/00900" {
                assert_eq!(
                    e.value.as_deref(),
                    Some(&b"k/00900"[..]),
                    "the value as it was"
                );
            }
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.is_empty() {
                // While the first page is handed over (on a blocking thread), other writes
                // commit: a key of a later page removed, a new one added, one changed.
                handle.block_on(async {
                    writer.remove("k/01100").await?;
                    writer.put("k/01199x", entry("new", 2_000)).await?;
                    writer.put("k/00900", entry("changed", 2_000)).await
                })?;
            }
            seen.push(key);
            Ok(())
        })
    };
    store.snapshot("", sink).await?;
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(
        seen, keys,
        "every key as at the start, in order, nothing added"
    );
    assert!(
        store.get("k/01100").await?.is_none(),
        "the writes did commit"
    );
    Ok(())
}
