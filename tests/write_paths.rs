//! The write paths against the cache's contract (I1–I5 in the crate docs): each test is one of
//! the wrong answers seen in issue #12, replayed against a scripted fake source.

mod support;

use std::time::Duration;

use std::sync::Arc;

use support::{outage, FakeSource};
use tiercache::breaker::BreakerPolicy;
use tiercache::source::{Fetched, Source, SourceError};
use tiercache::{Error, MockClock, OutboxMode, Strategy, TieredCache};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(60);

fn builder(source: &FakeSource, clock: &MockClock) -> tiercache::TieredCacheBuilder {
    TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .strategy(Strategy::WriteBehind)
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(3600))
        .negative_ttl(Duration::from_secs(30))
}

fn refused() -> SourceError {
    SourceError::Rejected {
        status: Some(422),
        message: "Invalid request".into(),
    }
}

/// Item 1: with the memory outbox, an older L2 entry (or a cached "not found") must not shadow
/// a pending write once L1 dropped it, nor the delivered write afterwards.
#[tokio::test]
async fn the_memory_outbox_is_not_shadowed_by_an_older_l2_entry() -> TestResult {
    for (key, before) in [("held", Some("old")), ("absent", None)] {
        let (source, clock) = (FakeSource::new(), MockClock::new());
        if let Some(v) = before {
            source.insert(key, v);
        }
        let cache = builder(&source, &clock)
            .outbox(OutboxMode::Memory)
            .build()?;
        assert_eq!(cache.get(key).await?.as_deref(), before.map(str::as_bytes));
        source.fail_writes(Some(outage()));
        cache.set(key, "new").await?;
        cache.clear_memory().await;
        assert_eq!(
            cache.get(key).await?.as_deref(),
            Some(&b"new"[..]),
            "{key}: while pending"
        );
        source.fail_writes(None);
        assert!(cache.flush().await?.is_complete());
        cache.clear_memory().await;
        let l = cache.lookup(key).await?.expect("a value");
        assert_eq!(l.value, "new", "{key}: after delivery");
        assert_eq!(source.value(key).as_deref(), Some(&b"new"[..]));
    }
    Ok(())
}

/// Item 2: many concurrent writes of a few keys while deliveries run. Once `flush` reports
/// nothing pending, no key may still count as pending: a later change at the source is seen
/// once the copy expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_stays_pending_after_its_writes_were_delivered() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let dir = tempfile::tempdir()?;
    let cache = builder(&source, &clock)
        .sqlite_path(dir.path().join("cache.db"))
        .build()?;
    let keys = ["a", "b", "c"];
    let mut tasks = Vec::new();
    for t in 0..8 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..60 {
                let key = keys[(t + i) % keys.len()];
                cache.set(key, format!("{t}-{i}")).await?;
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let report = cache.flush().await?;
    assert_eq!(report.pending, 0, "{report:?}");
    for key in keys {
        source.insert(key, format!("changed-{key}"));
    }
    clock.advance(TTL + Duration::from_secs(1));
    for key in keys {
        assert_eq!(
            cache.get(key).await?.as_deref(),
            Some(format!("changed-{key}").as_bytes()),
            "{key} was served from its local copy as if still pending"
        );
    }
    Ok(())
}

/// Item 3: retrying an old dead letter after a newer write of its key was delivered must not
/// roll the source back (I4): it is refused, and the dead letter stays.
#[tokio::test]
async fn retrying_a_superseded_dead_letter_does_not_roll_the_source_back() -> TestResult {
    for mode in [OutboxMode::Durable, OutboxMode::Memory] {
        let (source, clock) = (FakeSource::new(), MockClock::new());
        let cache = builder(&source, &clock).outbox(mode).build()?;
        source.fail_writes(Some(refused()));
        cache.set("k", "v1").await?;
        cache.flush().await?;
        let dead = cache.dead_letters().await?;
        assert_eq!(dead.len(), 1, "{mode:?}");
        assert!(!dead[0].superseded);
        source.fail_writes(None);
        cache.set("k", "v2").await?;
        assert!(cache.flush().await?.is_complete());
        let dead = cache.dead_letters().await?;
        assert!(dead[0].superseded, "{mode:?}: {dead:?}");
        match cache.retry_dead_letter(dead[0].id).await {
            Err(Error::Superseded { id, key }) => assert_eq!((id, key.as_str()), (dead[0].id, "k")),
            other => panic!("{mode:?}: expected Superseded, got {other:?}"),
        }
        cache.flush().await?;
        assert_eq!(source.value("k").as_deref(), Some(&b"v2"[..]), "{mode:?}");
        assert_eq!(cache.get("k").await?.as_deref(), Some(&b"v2"[..]));
        assert_eq!(cache.dead_letters().await?.len(), 1, "kept, not dropped");
        assert!(cache.discard_dead_letter(dead[0].id).await?);
    }
    Ok(())
}

/// A retried dead letter is a pending write again: the "not found" that a read cached while
/// the write was dead must not be served over it, neither while it is pending nor after it was
/// delivered (I1). Found by the model test's background configuration (seed 455).
#[tokio::test]
async fn a_retried_dead_letter_is_served_not_the_answer_cached_while_it_was_dead() -> TestResult {
    for mode in [OutboxMode::Durable, OutboxMode::Memory] {
        let (source, clock) = (FakeSource::new(), MockClock::new());
        let cache = builder(&source, &clock).outbox(mode).build()?;
        source.fail_writes(Some(refused()));
        cache.set("k", "v1").await?;
        cache.flush().await?;
        let dead = cache.dead_letters().await?;
        assert_eq!(dead.len(), 1, "{mode:?}");
        // The refused write is not served: the source has nothing, and that is cached.
        assert_eq!(cache.get("k").await?, None, "{mode:?}");
        source.fail_writes(None);
        assert!(cache.retry_dead_letter(dead[0].id).await?, "{mode:?}");
        let pending = cache.lookup("k").await?;
        assert_eq!(
            pending.map(|l| l.value).as_deref(),
            Some(&b"v1"[..]),
            "{mode:?}: while pending"
        );
        assert!(cache.flush().await?.is_complete(), "{mode:?}");
        assert_eq!(source.value("k").as_deref(), Some(&b"v1"[..]), "{mode:?}");
        let after = cache.lookup("k").await?;
        assert_eq!(
            after.map(|l| l.value).as_deref(),
            Some(&b"v1"[..]),
            "{mode:?}: after delivery"
        );
        cache.clear_memory().await;
        let from_l2 = cache.lookup("k").await?;
        assert_eq!(
            from_l2.map(|l| l.value).as_deref(),
            Some(&b"v1"[..]),
            "{mode:?}: without L1"
        );
    }
    Ok(())
}

/// Item 4: offline switched on while a delivery waits for the breaker's permit: nothing is sent
/// after the switch (I3).
#[tokio::test]
async fn offline_switched_on_during_a_delivery_round_sends_nothing_more() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (source, clock) = (FakeSource::new(), MockClock::new());
    // One failure leaves the persisted breaker unclean, so a delivery's permit is taken through
    // the database (the writer thread): the round waits there after its first checks. (Under
    // `synchronous=FULL` every write goes through the writer thread; under `NORMAL` a write
    // that finds the writer idle commits on the caller's thread, without waiting.)
    let cache = builder(&source, &clock)
        .sqlite_path(dir.path().join("cache.db"))
        .synchronous(tiercache::Synchronous::Full)
        .build()?;
    source.fail_writes(Some(outage()));
    cache.set("k", "v").await?;
    cache.flush().await?;
    source.fail_writes(None);
    let mut raced = 0;
    for attempt in 0..20 {
        let before = source.writes().len();
        let flusher = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.flush().await })
        };
        tokio::task::yield_now().await;
        if flusher.is_finished() {
            // The round got through before the switch: nothing to conclude; try again.
            cache.set("k", format!("v{attempt}")).await?;
            continue;
        }
        cache.set_offline(true);
        let at_switch = source.writes().len();
        flusher.await??;
        assert_eq!(
            source.writes().len(),
            at_switch,
            "a write left after offline was switched on (before the round: {before})"
        );
        raced += 1;
        cache.set_offline(false);
        cache.set("k", format!("v{attempt}")).await?;
    }
    assert!(raced > 0, "the switch never landed inside a round");
    Ok(())
}

/// Item 5: after an outage, a close and a restart, one `flush` delivers everything once the
/// source is back, although the breaker starts open (persisted) and half-open admits one probe.
#[tokio::test]
async fn one_flush_after_a_restart_delivers_everything() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let policy = BreakerPolicy::builder()
        .failure_threshold(3)
        .base_recovery(Duration::from_secs(30))
        .jitter(0.0)
        .half_open_probes(1)
        .success_threshold(2)
        .build()?;
    {
        let cache = builder(&source, &clock)
            .sqlite_path(&path)
            .source_breaker(policy.clone())
            .build()?;
        source.fail_writes(Some(outage()));
        for i in 0..20 {
            cache.set(&format!("k{i}"), format!("v{i}")).await?;
        }
        cache.flush().await?;
        assert_eq!(cache.close().await?.pending, 20);
    }
    source.fail_writes(None);
    clock.advance(Duration::from_secs(31));
    let cache = builder(&source, &clock)
        .sqlite_path(&path)
        .source_breaker(policy)
        .build()?;
    let report = cache.flush().await?;
    assert!(report.is_complete(), "{report:?}");
    assert!(report.stuck.is_empty(), "{report:?}");
    for i in 0..20 {
        assert_eq!(
            source.value(&format!("k{i}")).as_deref(),
            Some(format!("v{i}").as_bytes())
        );
    }
    Ok(())
}

/// A source whose writes wait at a gate the test opens, and tell when one has begun.
#[derive(Debug, Clone)]
struct Gated {
    inner: FakeSource,
    gate: Arc<tokio::sync::Semaphore>,
    /// Writes begun so far.
    started: Arc<tokio::sync::watch::Sender<usize>>,
}

#[async_trait::async_trait]
impl Source for Gated {
    async fn fetch(&self, key: &str, etag: Option<&str>) -> Result<Fetched, SourceError> {
        self.inner.fetch(key, etag).await
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        self.started.send_modify(|n| *n += 1);
        let _pass = self.gate.acquire().await;
        self.inner.put(key, value).await
    }
}

/// Item 8: a dropped cache's flusher takes no new action, and a delivery it had on the wire is
/// completed (its breaker permit handed back), so a cache reopened on the file delivers at once
/// (before, the aborted flusher kept the half-open probe slot until its lease ran out).
#[tokio::test]
async fn a_dropped_cache_leaves_no_probe_slot_taken() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let clock = MockClock::new();
    let source = Gated {
        inner: FakeSource::new(),
        gate: Arc::new(tokio::sync::Semaphore::new(1000)),
        started: Arc::new(tokio::sync::watch::channel(0).0),
    };
    let policy = BreakerPolicy::builder()
        .failure_threshold(1)
        .base_recovery(Duration::from_secs(5))
        .jitter(0.0)
        .half_open_probes(1)
        .success_threshold(1)
        .probe_timeout(Duration::from_secs(30))
        .build()?;
    let open = |background: bool| {
        TieredCache::builder()
            .source(source.clone())
            .clock(clock.clone())
            .strategy(Strategy::WriteBehind)
            .sqlite_path(&path)
            .source_breaker(policy.clone())
            .retry_base(Duration::from_secs(300))
            .background_flush(background)
            .build()
    };
    {
        // The breaker opens (persisted) on a failed delivery.
        let setup = open(false)?;
        source.inner.fail_writes(Some(outage()));
        setup.set("k", "v").await?;
        setup.flush().await?;
        setup.close().await?;
    }
    source.inner.fail_writes(None);
    clock.advance(Duration::from_secs(6));
    // Writes now wait at the gate. The first cache's background flusher sends the half-open
    // probe and waits there; the cache is dropped meanwhile.
    let gate = source.gate.clone();
    let held = gate.acquire_many(1000).await?;
    let mut started = source.started.subscribe();
    let before = *started.borrow();
    let first = open(true)?;
    // (A key of its own: `k`'s row waits out its retry delay.)
    first.set("k1", "v1").await?;
    started.wait_for(|n| *n > before).await?;

    drop(first);
    // The probe is answered: the dropped cache's flusher records it, which closes the breaker.
    drop(held);
    let second = open(false)?;
    let mut closed = false;
    for _ in 0..100_000 {
        second.health().await; // re-reads the persisted breaker
        if second.source_breaker_status().state == tiercache::breaker::CircuitState::Closed {
            closed = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        closed,
        "the probe's outcome was never recorded: {:?} {:?}",
        second.source_breaker_status(),
        source.inner.writes()
    );
    second.set("k2", "v2").await?;
    let report = second.flush().await?;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(source.inner.value("k2").as_deref(), Some(&b"v2"[..]));
    Ok(())
}

/// I1 and I2 between two caches of one process on one database file: a write by one is never
/// answered with the other's older L1 copy.
#[tokio::test]
async fn a_write_by_one_cache_is_seen_by_another_on_the_same_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("k", "v1");
    for strategy in [
        Strategy::ReadThrough,
        Strategy::WriteThrough,
        Strategy::WriteBehind,
    ] {
        let reader = builder(&source, &clock)
            .strategy(Strategy::ReadThrough)
            .sqlite_path(&path)
            .build()?;
        let writer = builder(&source, &clock)
            .strategy(strategy)
            .sqlite_path(&path)
            .build()?;
        let before = reader.get("k").await?; // now in the reader's L1
        assert!(before.is_some(), "{strategy:?}");
        writer.set("k", format!("{strategy:?}")).await?;
        assert_eq!(
            reader.get("k").await?.as_deref(),
            Some(format!("{strategy:?}").as_bytes()),
            "{strategy:?}: the reader served its older L1 copy"
        );
        writer.delete("k").await?;
        // Read-through's delete is local (the source is read-only): both then read the
        // source's value; the others' delete reaches the source and reads as "not found".
        let expect = (strategy == Strategy::ReadThrough).then(|| bytes::Bytes::from("v1"));
        assert_eq!(
            reader.get("k").await?,
            expect,
            "{strategy:?}: after the delete"
        );
        assert_eq!(
            writer.get("k").await?,
            expect,
            "{strategy:?}: the writer agrees"
        );
        writer.flush().await?;
        source.insert("k", "v1");
        writer.invalidate("k").await?;
        reader.invalidate("k").await?;
    }
    Ok(())
}

/// I4 across writers of one file: a write by one cache supersedes a dead letter another cache
/// recorded (each writer connection learns of the other's commits through `data_version`).
#[tokio::test]
async fn a_write_by_another_writer_supersedes_a_dead_letter() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cache.db");
    let (source, clock) = (FakeSource::new(), MockClock::new());
    let b = builder(&source, &clock).sqlite_path(&path).build()?;
    b.set("other", "x").await?; // b's writer has looked: no dead letters yet
    b.flush().await?;
    let a = builder(&source, &clock).sqlite_path(&path).build()?;
    source.fail_writes(Some(refused()));
    a.set("k", "v1").await?;
    a.flush().await?;
    assert!(!a.dead_letters().await?[0].superseded);
    source.fail_writes(None);
    b.set("k", "v2").await?;
    let dead = a.dead_letters().await?;
    assert!(dead[0].superseded, "{dead:?}");
    assert!(matches!(
        a.retry_dead_letter(dead[0].id).await,
        Err(Error::Superseded { .. })
    ));
    Ok(())
}

/// A refusal that comes back after offline mode was switched on is still recorded (a dead
/// letter, the local copy gone), not held and sent again later.
#[tokio::test]
async fn an_answer_that_arrives_after_offline_is_switched_on_is_recorded() -> TestResult {
    let clock = MockClock::new();
    let source = Gated {
        inner: FakeSource::new(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        started: Arc::new(tokio::sync::watch::channel(0).0),
    };
    source.inner.insert("k", "old");
    source.inner.fail_writes(Some(refused()));
    let cache = TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
        .build()?;
    cache.set("k", "refused").await?;
    let mut started = source.started.subscribe();
    let flusher = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.flush().await })
    };
    started.wait_for(|n| *n > 0).await?; // the put is on the wire
    cache.set_offline(true);
    source.gate.add_permits(1); // and GitHub says no
    let report = flusher.await??;
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(cache.dead_letters().await?.len(), 1);
    cache.set_offline(false);
    assert_eq!(cache.get("k").await?.as_deref(), Some(&b"old"[..]));
    Ok(())
}
