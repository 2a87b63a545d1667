//! The public L2 seam (`tiercache::tier::store`, issue #12): an in-memory store written against
//! the documented contract only, with injected faults, plugged in with
//! `TieredCacheBuilder::store`. The cache works on it (read-through fills, write-behind writes,
//! deliveries and dead letters), and its faults degrade the cache (health, fallbacks to L1 and
//! the source) without a wrong value ever being served.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use support::{outage, FakeSource};
use tiercache::breaker::BreakerPolicy;
use tiercache::source::SourceError;
use tiercache::tier::store::{
    EntryStore, FillGuard, Found, MetaUpdate, OutboxOp, OutboxRow, OutboxStore, Resolved,
    StateStore, StoreSummary, StoredEntry,
};
use tiercache::{
    Error, Freshness, HealthStatus, MockClock, Result, Strategy, Tier, TieredCache,
    TieredCacheBuilder,
};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(60);
const RECOVERY: Duration = Duration::from_secs(5);

/// What the store holds, and the faults still to inject.
#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, StoredEntry>,
    /// In id order (ids only grow).
    outbox: Vec<OutboxRow>,
    last_id: i64,
    meta: HashMap<String, String>,
    fail_reads: u32,
    fail_writes: u32,
}

/// An in-memory L2: one mutex makes every method one step.
#[derive(Debug, Clone, Default)]
struct MemStore {
    state: Arc<Mutex<State>>,
    /// Fills wait for a read lock: a test holding the write lock holds every fill.
    fills: Arc<tokio::sync::RwLock<()>>,
    /// Told when a fill (`put_fill`) begins.
    fill_begun: Arc<tokio::sync::Notify>,
    /// Plain puts wait for a read lock too: a test holding the write lock holds them.
    puts: Arc<tokio::sync::RwLock<()>>,
    /// Told when a plain put begins.
    put_begun: Arc<tokio::sync::Notify>,
    /// Removals of delivered rows wait for a read lock: a test holding the write lock holds
    /// them.
    completes: Arc<tokio::sync::RwLock<()>>,
}

fn fault(what: &str) -> Error {
    Error::Storage {
        message: format!("injected {what} fault"),
        source: None,
    }
}

impl MemStore {
    /// The next `n` reads fail.
    fn fail_reads(&self, n: u32) {
        self.lock().fail_reads = n;
    }

    /// The next `n` writes fail (and change nothing).
    fn fail_writes(&self, n: u32) {
        self.lock().fail_writes = n;
    }

    fn heal(&self) {
        let mut s = self.lock();
        (s.fail_reads, s.fail_writes) = (0, 0);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> Result<MutexGuard<'_, State>> {
        let mut s = self.lock();
        if s.fail_reads > 0 {
            s.fail_reads -= 1;
            return Err(fault("read"));
        }
        Ok(s)
    }

    fn write(&self) -> Result<MutexGuard<'_, State>> {
        let mut s = self.lock();
        if s.fail_writes > 0 {
            s.fail_writes -= 1;
            return Err(fault("write"));
        }
        Ok(s)
    }

    /// The value held for `key` (for assertions; no fault).
    fn value(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.lock()
            .entries
            .get(key)
            .map(|e| e.value.as_ref().map(|v| v.to_vec()))
    }

    fn outbox_len(&self) -> usize {
        self.lock().outbox.len()
    }
}

impl State {
    fn pending_after(&self, key: &str, id: i64) -> bool {
        self.outbox
            .iter()
            .any(|r| r.key == key && !r.dead && r.id > id)
    }

    fn newest_pending(&self, key: &str) -> Option<OutboxOp> {
        self.outbox
            .iter()
            .rev()
            .find(|r| r.key == key && !r.dead)
            .map(|r| r.op.clone())
    }
}

#[async_trait]
impl EntryStore for MemStore {
    async fn get(&self, key: &str) -> Result<Option<StoredEntry>> {
        Ok(self.read()?.entries.get(key).cloned())
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Found> {
        let s = self.read()?;
        let mut found = Found::default();
        for &key in keys {
            if let Some(e) = s.entries.get(key) {
                found.entries.push((key.to_owned(), e.clone()));
            }
            if let Some(op) = s.newest_pending(key) {
                found.pending.push((key.to_owned(), op));
            }
        }
        Ok(found)
    }

    async fn put(&self, key: &str, entry: StoredEntry) -> Result<()> {
        self.put_begun.notify_one();
        let _held = self.puts.read().await;
        self.write()?.entries.insert(key.to_owned(), entry);
        Ok(())
    }

    async fn put_fill(&self, key: &str, entry: StoredEntry, guard: FillGuard) -> Result<bool> {
        self.fill_begun.notify_one();
        let _held = self.fills.read().await;
        let mut s = self.write()?;
        // Checked under the lock that orders every write: the same step as the write.
        if !guard.allows(s.entries.get(key).map(|e| e.stored_at)) {
            return Ok(false);
        }
        s.entries.insert(key.to_owned(), entry);
        Ok(true)
    }

    async fn renew_fill(
        &self,
        key: &str,
        (stored_at, fresh_until, stale_until): (u64, u64, u64),
        guard: FillGuard,
    ) -> Result<bool> {
        let mut s = self.write()?;
        if !guard.allows(s.entries.get(key).map(|e| e.stored_at)) {
            return Ok(false);
        }
        Ok(match s.entries.get_mut(key) {
            Some(e) => {
                (e.stored_at, e.fresh_until, e.stale_until) = (stored_at, fresh_until, stale_until);
                true
            }
            None => false,
        })
    }

    async fn remove(&self, key: &str) -> Result<()> {
        self.write()?.entries.remove(key);
        Ok(())
    }

    async fn remove_settled(&self, key: &str, settled_id: i64) -> Result<()> {
        let mut s = self.write()?;
        if !s.pending_after(key, settled_id) {
            s.entries.remove(key);
        }
        Ok(())
    }

    fn touch(&self, _key: &str, _now: u64) {}

    async fn summary(&self, now: u64) -> Result<StoreSummary> {
        let s = self.read()?;
        let mut summary = StoreSummary::default();
        summary.entries = s.entries.len() as u64;
        summary.bytes = s.entries.values().map(|e| e.size() as u64).sum();
        summary.stale_entries = s.entries.values().filter(|e| e.fresh_until <= now).count() as u64;
        summary.negative_entries = s.entries.values().filter(|e| e.value.is_none()).count() as u64;
        let pending = s.outbox.iter().filter(|r| !r.dead);
        summary.outbox_depth = pending.clone().count() as u64;
        summary.oldest_pending_ms = pending.map(|r| r.created_at).min();
        summary.dead_letters = s.outbox.iter().filter(|r| r.dead).count() as u64;
        Ok(summary)
    }
}

#[async_trait]
impl OutboxStore for MemStore {
    async fn enqueue(
        &self,
        key: &str,
        entry: Option<StoredEntry>,
        op: OutboxOp,
        now: u64,
    ) -> Result<i64> {
        let mut s = self.write()?;
        match entry {
            Some(e) => s.entries.insert(key.to_owned(), e),
            None => s.entries.remove(key),
        };
        for r in s.outbox.iter_mut().filter(|r| r.key == key && r.dead) {
            r.superseded = true;
        }
        s.last_id += 1;
        let id = s.last_id;
        s.outbox.push(OutboxRow::new(id, key, op, now));
        Ok(id)
    }

    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let s = self.read()?;
        Ok(s.outbox
            .iter()
            .filter(|r| !r.dead)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn outbox_newest(&self, key: &str) -> Result<Option<OutboxOp>> {
        Ok(self.read()?.newest_pending(key))
    }

    async fn outbox_summary(&self) -> Result<(u64, Vec<(String, String)>)> {
        let s = self.read()?;
        let (mut pending, mut stuck) = (0, Vec::<(String, String)>::new());
        for r in s.outbox.iter().filter(|r| !r.dead) {
            pending += 1;
            if let Some(error) = &r.last_error {
                if !stuck.iter().any(|(k, _)| *k == r.key) {
                    stuck.push((r.key.clone(), error.clone()));
                }
            }
        }
        Ok((pending, stuck))
    }

    async fn outbox_complete(&self, ids: Vec<i64>) -> Result<()> {
        let _open = self.completes.read().await;
        self.write()?
            .outbox
            .retain(|r| r.dead || !ids.contains(&r.id));
        Ok(())
    }

    async fn outbox_failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()> {
        let mut s = self.write()?;
        for r in s
            .outbox
            .iter_mut()
            .filter(|r| !r.dead && ids.contains(&r.id))
        {
            r.attempts += 1;
            r.next_attempt = next_attempt;
            r.last_error = Some(error.clone());
            r.dead = dead;
        }
        if dead {
            let newest = ids.iter().copied().max().unwrap_or(0);
            let rows: Vec<(i64, String)> = s
                .outbox
                .iter()
                .filter(|r| ids.contains(&r.id))
                .map(|r| (r.id, r.key.clone()))
                .collect();
            for (id, key) in &rows {
                let newer = s.outbox.iter().any(|o| o.key == *key && o.id > *id);
                if let Some(r) = s.outbox.iter_mut().find(|r| r.id == *id && r.dead) {
                    r.superseded |= newer;
                }
            }
            for (_, key) in rows {
                if !s.pending_after(&key, newest) {
                    s.entries.remove(&key);
                }
            }
        }
        Ok(())
    }

    async fn dead_letters(&self) -> Result<Vec<OutboxRow>> {
        Ok(self
            .read()?
            .outbox
            .iter()
            .filter(|r| r.dead)
            .cloned()
            .collect())
    }

    async fn resolve_dead_letter(&self, id: i64, retry: bool) -> Result<Resolved> {
        let mut s = self.write()?;
        let Some(i) = s.outbox.iter().position(|r| r.id == id && r.dead) else {
            return Ok(Resolved::Missing);
        };
        let row = &mut s.outbox[i];
        if retry && row.superseded {
            return Ok(Resolved::Superseded(row.key.clone()));
        }
        if retry {
            (row.dead, row.attempts, row.next_attempt) = (false, 0, 0);
            // Pending again: the key's entry (the source's answer) goes with it.
            let key = row.key.clone();
            s.entries.remove(&key);
        } else {
            s.outbox.remove(i);
        }
        Ok(Resolved::Done)
    }

    async fn supersede_dead(&self, key: &str) -> Result<()> {
        let mut s = self.write()?;
        for r in s.outbox.iter_mut().filter(|r| r.key == key && r.dead) {
            r.superseded = true;
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for MemStore {
    async fn load_meta(&self, name: &str) -> Result<Option<String>> {
        Ok(self.read()?.meta.get(name).cloned())
    }

    async fn update_meta(&self, name: &str, update: MetaUpdate) -> Result<Option<String>> {
        let mut s = self.write()?;
        let new = update(s.meta.get(name).cloned());
        match &new {
            Some(v) => s.meta.insert(name.to_owned(), v.clone()),
            None => s.meta.remove(name),
        };
        Ok(new)
    }
}

/// One failure opens an L2 breaker (faults show at once); probed again after [`RECOVERY`].
fn builder(store: &MemStore, source: &FakeSource, clock: &MockClock) -> TieredCacheBuilder {
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
        // The persisted source breaker has its own test: here, no meta reads take a fault.
        .persist_breaker(false)
}

/// [`builder`] for write-behind, its outbox delivered only by the test's `flush` calls.
fn write_behind(store: &MemStore, source: &FakeSource, clock: &MockClock) -> TieredCacheBuilder {
    builder(store, source, clock)
        .strategy(Strategy::WriteBehind)
        .background_flush(false)
}

fn refused() -> SourceError {
    SourceError::Rejected {
        status: Some(422),
        message: "Invalid request".into(),
    }
}

async fn get(cache: &TieredCache, key: &str) -> Result<Option<String>> {
    Ok(cache
        .get(key)
        .await?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

#[tokio::test]
async fn read_through_fills_the_custom_store_and_reads_it_back() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    source.insert("a", "1");
    let cache = builder(&store, &source, &clock).build()?;
    assert_eq!(cache.lookup("a").await?.expect("a value").tier, Tier::L3);
    assert_eq!(store.value("a"), Some(Some(b"1".to_vec())));
    assert!(cache.get("missing").await?.is_none());
    assert_eq!(store.value("missing"), Some(None), "a negative entry");
    cache.clear_memory().await;
    let l = cache.lookup("a").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"1"[..], Tier::L2));
    // The batch read goes through `get_many`.
    cache.clear_memory().await;
    let batch = cache.mget(&["a", "missing"]).await;
    assert_eq!(
        batch[0]
            .as_ref()
            .map_err(|e| e.to_string())?
            .as_ref()
            .map(|l| l.tier),
        Some(Tier::L2)
    );
    assert!(batch[1].as_ref().map_err(|e| e.to_string())?.is_none());
    assert_eq!(source.fetch_count(), 2, "nothing was fetched twice");
    let summary = cache.store_summary().await?;
    assert_eq!((summary.entries, summary.negative_entries), (2, 1));
    assert_eq!(cache.l2_read_statements(), 0, "no SQLite under the cache");
    assert_eq!(cache.health().await.status, HealthStatus::Healthy);
    Ok(())
}

#[tokio::test]
async fn write_behind_writes_deliver_and_dead_letter_through_the_custom_store() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    let cache = write_behind(&store, &source, &clock).build()?;
    cache.set("k", "v1").await?;
    assert_eq!(
        (store.outbox_len(), store.value("k")),
        (1, Some(Some(b"v1".to_vec())))
    );
    cache.clear_memory().await;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v1"), "pending");
    assert_eq!(cache.flush().await?.delivered, 1);
    assert_eq!(source.value("k").as_deref(), Some(&b"v1"[..]));
    assert_eq!(store.outbox_len(), 0);

    // Refused for good: a dead letter, and the local copy goes with it (the source's value
    // stands).
    source.fail_writes(Some(refused()));
    cache.set("k", "v2").await?;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v2"), "pending");
    assert_eq!(cache.flush().await?.dead_lettered, 1);
    assert_eq!(store.value("k"), None);
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v1"));
    let dead = cache.dead_letters().await?;
    assert_eq!((dead.len(), dead[0].superseded), (1, false));

    // A newer write supersedes it: its retry is refused; it is kept until discarded.
    source.fail_writes(None);
    cache.set("k", "v3").await?;
    assert!(cache.flush().await?.is_complete());
    assert!(matches!(
        cache.retry_dead_letter(dead[0].id).await,
        Err(Error::Superseded { .. })
    ));
    assert!(cache.discard_dead_letter(dead[0].id).await?);
    assert!(cache.dead_letters().await?.is_empty());

    // A delete.
    cache.delete("k").await?;
    assert!(cache.get("k").await?.is_none(), "pending delete");
    assert_eq!(cache.flush().await?.delivered, 1);
    assert_eq!(source.value("k"), None);
    cache.clear_memory().await;
    assert!(cache.get("k").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn deliveries_go_on_while_delivered_rows_wait_to_be_removed() -> TestResult {
    // Removing a batch of delivered rows waits for a commit (behind the callers' writes); the
    // deliveries after it must not wait with it, or the outbox drains no faster than commits.
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    let cache = write_behind(&store, &source, &clock).build()?;
    const WRITES: usize = 200;
    for i in 0..WRITES {
        cache.set(&format!("k{i}"), format!("v{i}")).await?;
    }
    let held = store.completes.write().await;
    let flush = tokio::spawn({
        let cache = cache.clone();
        async move { cache.flush().await }
    });
    // Current-thread runtime: each yield lets the flush run until it waits.
    for _ in 0..10_000 {
        if source.writes_started() == WRITES {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        (source.writes_started(), store.outbox_len()),
        (WRITES, WRITES),
        "every write sent while no delivered row could be removed yet"
    );
    drop(held);
    let report = flush.await??;
    assert_eq!(report.delivered, WRITES as u64);
    assert_eq!(store.outbox_len(), 0);
    assert_eq!(source.value("k199").as_deref(), Some(&b"v199"[..]));
    Ok(())
}

#[tokio::test]
async fn a_failed_durable_set_is_refused_and_never_served() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    source.insert("k", "old");
    let cache = write_behind(&store, &source, &clock).build()?;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("old"));
    store.fail_writes(1);
    assert!(matches!(
        cache.set("k", "new").await,
        Err(Error::Storage { .. })
    ));
    assert_ne!(cache.health().await.l2.status, HealthStatus::Healthy);
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("old"), "from L1");
    assert_eq!(store.outbox_len(), 0);
    assert_eq!(store.value("k"), Some(Some(b"old".to_vec())));
    clock.advance(RECOVERY);
    cache.clear_memory().await;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("old"), "from L2");
    let report = cache.flush().await?;
    assert_eq!((report.delivered, report.pending), (0, 0));
    assert_eq!(source.value("k").as_deref(), Some(&b"old"[..]));
    assert!(source.writes().is_empty(), "nothing was delivered");
    // Healed: the next set is made durable and delivered.
    cache.set("k", "newer").await?;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("newer"));
    assert_eq!(cache.flush().await?.delivered, 1);
    assert_eq!(source.value("k").as_deref(), Some(&b"newer"[..]));
    Ok(())
}

#[tokio::test]
async fn a_failed_fill_does_not_leave_the_old_value() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    source.insert("k", "v1");
    let cache = builder(&store, &source, &clock).build()?;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v1"));
    source.insert("k", "v2");
    clock.advance(TTL + Duration::from_secs(1));
    store.fail_writes(u32::MAX);
    let l = cache.lookup("k").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"v2"[..], Tier::L3));
    assert_eq!(
        store.value("k"),
        Some(Some(b"v1".to_vec())),
        "the fill was not written"
    );
    assert_ne!(cache.health().await.l2.status, HealthStatus::Healthy);
    // L1 holds the new value; without it, the old one in L2 is stale and not served fresh.
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v2"));
    cache.clear_memory().await;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v2"));
    store.heal();
    clock.advance(RECOVERY);
    cache.clear_memory().await;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("v2"));
    assert_eq!(
        store.value("k"),
        Some(Some(b"v2".to_vec())),
        "filled once healed"
    );
    assert_eq!(cache.health().await.status, HealthStatus::Healthy);
    Ok(())
}

#[tokio::test]
async fn read_faults_fall_back_to_l1_and_the_source() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    source.insert("a", "1");
    source.insert("b", "2");
    let cache = builder(&store, &source, &clock).build()?;
    assert_eq!(get(&cache, "a").await?.as_deref(), Some("1"));
    store.fail_reads(u32::MAX);
    store.fail_writes(u32::MAX);
    // L1 answers without L2.
    assert_eq!(cache.lookup("a").await?.expect("a value").tier, Tier::L1);
    // A miss goes to the source.
    let l = cache.lookup("b").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"2"[..], Tier::L3));
    let health = cache.health().await;
    assert_ne!(health.l2.status, HealthStatus::Healthy, "{health:?}");
    assert_ne!(health.status, HealthStatus::Healthy);
    // Source down too: the stale L1 copy, marked so.
    clock.advance(TTL + Duration::from_secs(1));
    source.fail_fetches(Some(outage()));
    let l = cache.lookup("a").await?.expect("a stale value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"1"[..], Tier::L1));
    assert!(
        matches!(l.freshness, Freshness::Stale { .. }),
        "{:?}",
        l.freshness
    );
    // Nothing anywhere: an error, not "not found".
    assert!(matches!(
        cache.get("c").await,
        Err(Error::Unavailable { .. })
    ));
    // Healed: the breaker probes after its recovery time and L2 is back.
    store.heal();
    source.fail_fetches(None);
    clock.advance(RECOVERY);
    cache.clear_memory().await;
    assert_eq!(get(&cache, "a").await?.as_deref(), Some("1"));
    assert_eq!(cache.health().await.status, HealthStatus::Healthy);
    Ok(())
}

#[tokio::test]
async fn a_failed_dead_lettering_keeps_the_write_pending_until_it_is_recorded() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    source.insert("k", "old");
    let cache = write_behind(&store, &source, &clock).build()?;
    cache.set("k", "new").await?;
    source.fail_writes(Some(refused()));
    // The refusal cannot be recorded: the row stays pending, and reads as itself.
    store.fail_writes(u32::MAX);
    let _ = cache.flush().await;
    assert_eq!(store.outbox_len(), 1);
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("new"));
    // Recorded: a dead letter, and the source's value is read again.
    store.heal();
    clock.advance(RECOVERY);
    let report = cache.flush().await?;
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("old"));
    cache.clear_memory().await;
    assert_eq!(get(&cache, "k").await?.as_deref(), Some("old"));
    assert_eq!(cache.dead_letters().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn the_source_breaker_is_persisted_in_the_custom_store() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    let cache = builder(&store, &source, &clock)
        .persist_breaker(true)
        .build()?;
    source.fail_fetches(Some(outage()));
    assert!(cache.get("k").await.is_err());
    let meta = store.lock().meta.clone();
    assert_eq!(meta.len(), 1, "{meta:?}");
    assert!(
        meta.values()
            .all(|v| v.contains("\"consecutive_failures\":1")),
        "the failure is recorded: {meta:?}"
    );
    Ok(())
}

#[test]
fn a_store_and_a_sqlite_path_are_refused_together() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let built = TieredCache::builder()
        .store(MemStore::default())
        .sqlite_path(dir.path().join("cache.db"))
        .build();
    assert!(matches!(built, Err(Error::Config(_))), "{built:?}");
    assert!(!dir.path().join("cache.db").exists());
    // The outbox's bound is the SQLite L2's; a store keeps its own.
    let built = TieredCache::builder()
        .store(MemStore::default())
        .outbox_capacity(1024 * 1024)
        .build();
    assert!(
        matches!(&built, Err(Error::Config(m)) if m.contains("outbox_capacity")),
        "{built:?}"
    );
}

/// A load's waiters get the source's answer when it arrives (it is in L1 then); the caller that
/// started the load returns once L2 holds it too, so a close or a look at L2 right after it
/// finds the fill.
#[tokio::test(start_paused = true)]
async fn waiters_get_the_answer_before_the_l2_fill_and_the_loader_after() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    source.insert("k", "v");
    source.set_latency(Duration::from_millis(50));
    let cache = builder(&store, &source, &clock).build()?;
    let held = store.fills.write().await;
    let leader = tokio::spawn({
        let cache = cache.clone();
        async move { get(&cache, "k").await }
    });
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { get(&cache, "k").await }
    });
    // (Paused time: if the waiter waited for the held fill, this deadline would pass at once.)
    let answered = tokio::time::timeout(Duration::from_secs(10), waiter).await;
    let answered = answered.map_err(|_| "the waiter waited for the L2 fill")??;
    assert_eq!(answered?.as_deref(), Some("v"), "while the fill is held");
    assert_eq!(
        cache.stats().await.coalesced_waiters,
        1,
        "the waiter joined the load"
    );
    assert!(!leader.is_finished(), "the loader waits for its fill");
    assert_eq!(store.value("k"), None);
    drop(held);
    assert_eq!(leader.await??.as_deref(), Some("v"));
    assert_eq!(store.value("k"), Some(Some(b"v".to_vec())));
    assert_eq!(source.fetch_count(), 1);
    Ok(())
}

#[tokio::test]
async fn a_bundle_imports_through_the_default_merge_and_export_says_unsupported() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = MockClock::new();
    // The bundle: three keys from a SQLite cache at t0 + 1 s.
    let (ci_source, target_source) = (FakeSource::new(), FakeSource::new());
    for k in ["newer", "pending", "older"] {
        ci_source.insert(k, format!("bundled {k}"));
        target_source.insert(k, format!("old {k}"));
    }
    let store = MemStore::default();
    let target = write_behind(&store, &target_source, &clock).build()?;
    assert_eq!(get(&target, "older").await?.as_deref(), Some("old older"));
    target.set("pending", "mine").await?;
    clock.advance(Duration::from_secs(1));
    let ci = TieredCache::builder()
        .source(ci_source.clone())
        .sqlite_path(dir.path().join("ci.db"))
        .clock(clock.clone())
        .ttl(TTL)
        .build()?;
    for k in ["newer", "pending", "older"] {
        assert!(ci.get(k).await?.is_some());
    }
    let bundle = dir.path().join("b.bundle");
    ci.export(&bundle).await?;
    clock.advance(Duration::from_secs(1));
    assert_eq!(get(&target, "newer").await?.as_deref(), Some("old newer"));

    let report = target.import(&bundle).await?;
    assert_eq!(
        (report.imported, report.kept_newer, report.kept_pending),
        (1, 1, 1),
        "{report:?}"
    );
    assert_eq!(
        get(&target, "older").await?.as_deref(),
        Some("bundled older")
    );
    assert_eq!(get(&target, "newer").await?.as_deref(), Some("old newer"));
    assert_eq!(get(&target, "pending").await?.as_deref(), Some("mine"));
    assert_eq!(store.value("older"), Some(Some(b"bundled older".to_vec())));

    // This store cannot list its keys: export is refused, and no file is left.
    let out = dir.path().join("out.bundle");
    match target.export(&out).await {
        Err(e) => assert_eq!(
            e.bundle_fault(),
            Some(tiercache::BundleFault::Unsupported),
            "{e}"
        ),
        Ok(r) => panic!("{r:?}"),
    }
    assert!(!out.exists());
    assert_eq!(
        target.health().await.status,
        HealthStatus::Healthy,
        "not an L2 failure"
    );
    Ok(())
}

/// A source that answers `old` to every fetch, once let through, and says when a fetch began.
#[derive(Debug)]
struct HeldSource {
    begun: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

#[async_trait]
impl tiercache::source::Source for HeldSource {
    async fn fetch(
        &self,
        _key: &str,
        _validator: Option<&str>,
    ) -> std::result::Result<tiercache::source::Fetched, SourceError> {
        self.begun.notify_one();
        let permit = self.release.acquire().await;
        drop(permit);
        Ok(tiercache::source::Fetched::value("old"))
    }
}

/// I1 against a fill that began while a `set` was under way: its token taken after the set's
/// fence bump, its L2 read made before the set's row was written, the source's older answer
/// arriving after the set returned. That answer must not reach L1 (nor L2): a read after the
/// acknowledged set serves the set's value. (Before the second fence bump, the fill put `old`
/// into L1 and a read served it until the fill's refused L2 write removed it.)
#[tokio::test]
async fn a_fill_begun_during_a_set_never_serves_its_older_answer_after_the_set() -> TestResult {
    let store = MemStore::default();
    let source = Arc::new(HeldSource {
        begun: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let cache = TieredCache::builder()
        .store(store.clone())
        .source_arc(source.clone())
        .clock(MockClock::new())
        .ttl(TTL)
        .build()?;
    // The set stops inside its L2 put, after its fence bump.
    let puts = store.puts.clone().write_owned().await;
    let set = tokio::spawn({
        let cache = cache.clone();
        async move { cache.set("k", "new").await }
    });
    store.put_begun.notified().await;
    // A read now misses L1 and L2 (the set's row is not there yet) and asks the source.
    let read = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get("k").await }
    });
    source.begun.notified().await;
    // The set completes and is acknowledged.
    drop(puts);
    set.await??;
    // Fills stop before their L2 write; the source answers the read its older value.
    let fills = store.fills.clone().write_owned().await;
    source.release.add_permits(1);
    let mut read = read;
    let read = tokio::select! {
        () = store.fill_begun.notified() => Some(read),
        r = &mut read => {
            assert_eq!(r??.as_deref(), Some(&b"old"[..]), "the read began before the set returned");
            None
        }
    };
    // Whether the fill reached L2 or was refused before it: a read now serves the set.
    assert_eq!(
        cache.get("k").await?.as_deref(),
        Some(&b"new"[..]),
        "the acknowledged set is served, not the fill's older answer"
    );
    drop(fills);
    if let Some(read) = read {
        read.await??;
    }
    assert_eq!(cache.get("k").await?.as_deref(), Some(&b"new"[..]));
    assert_eq!(store.value("k"), Some(Some(b"new".to_vec())));
    Ok(())
}

/// A source whose fetch reads its value when called and answers it once let through; `delete`
/// removes the value.
#[derive(Debug)]
struct SlowReadSource {
    value: Mutex<Option<bytes::Bytes>>,
    fetches: std::sync::atomic::AtomicUsize,
    release: tokio::sync::Semaphore,
}

#[async_trait]
impl tiercache::source::Source for SlowReadSource {
    async fn fetch(
        &self,
        _key: &str,
        _validator: Option<&str>,
    ) -> std::result::Result<tiercache::source::Fetched, SourceError> {
        let read = self.value.lock().unwrap().clone();
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let permit = self.release.acquire().await;
        drop(permit);
        Ok(read.map_or(tiercache::source::Fetched::NotFound, |v| {
            tiercache::source::Fetched::value(v)
        }))
    }

    async fn delete(&self, _key: &str) -> std::result::Result<(), SourceError> {
        *self.value.lock().unwrap() = None;
        Ok(())
    }
}

/// I1 against single-flight: a read that begins after an acknowledged write-through delete
/// must not join a load that began before it (and read the source before the delete): it gets
/// a load of its own.
#[tokio::test]
async fn a_read_after_a_write_never_joins_a_load_begun_before_it() -> TestResult {
    let source = Arc::new(SlowReadSource {
        value: Mutex::new(Some(bytes::Bytes::from_static(b"old"))),
        fetches: std::sync::atomic::AtomicUsize::new(0),
        release: tokio::sync::Semaphore::new(0),
    });
    let cache = TieredCache::builder()
        .store(MemStore::default())
        .source_arc(source.clone())
        .strategy(Strategy::WriteThrough)
        .clock(MockClock::new())
        .build()?;
    let fetches = || source.fetches.load(std::sync::atomic::Ordering::SeqCst);
    let before = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get("k").await }
    });
    while fetches() < 1 {
        tokio::task::yield_now().await;
    }
    cache.delete("k").await?;
    let after = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get("k").await }
    });
    // The later read either joins the earlier load (a coalesced waiter) or starts its own.
    let mut spins = 0;
    while fetches() < 2 && cache.stats().await.coalesced_waiters == 0 {
        tokio::task::yield_now().await;
        spins += 1;
        assert!(spins < 100_000, "the later read neither joined nor fetched");
    }
    source.release.add_permits(2);
    assert_eq!(
        before.await??.as_deref(),
        Some(&b"old"[..]),
        "began before the delete"
    );
    assert_eq!(after.await??, None, "began after the acknowledged delete");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The maximum L1 age (issue #14 item 2): the last backstop against a missed invalidation.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_copy_older_in_l1_than_max_l1_age_is_read_again_from_l2() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    source.insert("k", "old");
    let long_ttl = Duration::from_secs(3600);
    let reader = builder(&store, &source, &clock)
        .ttl(long_ttl)
        .max_l1_age(Duration::from_secs(30))
        .build()?;
    let writer = builder(&store, &source, &clock).ttl(long_ttl).build()?;
    assert_eq!(get(&reader, "k").await?.as_deref(), Some("old"));
    assert_eq!(reader.lookup("k").await?.expect("a value").tier, Tier::L1);
    // Another instance writes L2; this store publishes nothing (as if the message was lost).
    writer.set("k", "new").await?;
    clock.advance(Duration::from_millis(29_999));
    let l = reader.lookup("k").await?.expect("a value");
    assert_eq!(
        (l.value.as_ref(), l.tier),
        (&b"old"[..], Tier::L1),
        "within the age"
    );
    clock.advance(Duration::from_millis(1));
    let l = reader.lookup("k").await?.expect("a value");
    assert_eq!(
        (l.value.as_ref(), l.tier),
        (&b"new"[..], Tier::L2),
        "re-read from L2"
    );
    // Put back into L1 for another period.
    let l = reader.lookup("k").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"new"[..], Tier::L1));
    assert_eq!(source.fetch_count(), 1);
    Ok(())
}

#[tokio::test]
async fn without_max_l1_age_a_store_that_does_not_publish_serves_l1_while_fresh() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    source.insert("k", "old");
    let reader = builder(&store, &source, &clock).build()?;
    let writer = builder(&store, &source, &clock).build()?;
    assert_eq!(get(&reader, "k").await?.as_deref(), Some("old"));
    writer.set("k", "new").await?;
    // The default is off here: the L1 copy is served until its fresh deadline (TTL).
    clock.advance(TTL - Duration::from_millis(1));
    let l = reader.lookup("k").await?.expect("a value");
    assert_eq!((l.value.as_ref(), l.tier), (&b"old"[..], Tier::L1));
    Ok(())
}

#[tokio::test]
async fn a_zero_or_absurd_max_l1_age_is_refused_and_none_turns_it_off() -> TestResult {
    let (store, source, clock) = (MemStore::default(), FakeSource::new(), MockClock::new());
    for age in [Duration::ZERO, Duration::from_secs(20 * 365 * 24 * 3600)] {
        match builder(&store, &source, &clock).max_l1_age(age).build() {
            Err(Error::Config(m)) => assert!(m.contains("max_l1_age"), "{m}"),
            other => panic!("{age:?}: {other:?}"),
        }
    }
    builder(&store, &source, &clock).max_l1_age(None).build()?;
    assert_eq!(tiercache::DEFAULT_MAX_L1_AGE, Duration::from_secs(60));
    Ok(())
}
