//! Write-behind delivery: a background flusher that pushes the durable outbox (rows in the L2
//! database) to the source, in per-key order, coalescing pending writes of one key into the last,
//! retrying transient failures with exponential backoff and jitter, and keeping writes the source
//! refuses for good as dead letters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::clock::{from_millis, millis, Clock};
use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::event::{Event, Events};
use crate::source::guard::{guarded, SourceGuard};
use crate::source::{Source, SourceError};
use crate::tier::fence::Fences;
use crate::tier::memory::MemoryTier;
use crate::tier::{OutboxOp, OutboxRow, Resolved, Store};

/// Where pending writes wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OutboxMode {
    /// In the L2 database, in the same transaction as the entry: an acknowledged write survives
    /// a crash (`kill -9`) and is replayed on the next open. The default.
    #[default]
    Durable,
    /// In memory: a `set` costs about a moka insert, but writes not yet delivered are lost if
    /// the process dies, and they are not written to L2 (after delivery, L2 gets the value from
    /// the source on the next read that misses L1). Writes to one key coalesce in memory, so the
    /// backlog holds at most one write per key. For data that can be rebuilt, where write
    /// throughput matters more than safety.
    Memory,
}

/// The outbox's storage: the L2 database, or memory.
#[async_trait]
pub(crate) trait Queue: Send + Sync + std::fmt::Debug + 'static {
    /// Adds a write (`entry`: the L2 entry written with it, for the durable outbox).
    async fn enqueue(&self, key: &str, entry: Option<Entry>, op: OutboxOp, now: u64) -> Result<()>;
    /// Pending (not dead) rows, oldest first.
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>>;
    /// How many rows are pending, and the keys whose last attempt failed with that error
    /// (each key once, oldest first), without copying any value.
    async fn summary(&self) -> Result<(u64, Vec<(String, String)>)>;
    /// `key`'s newest undelivered write: what a read of `key` must answer while the source
    /// still holds the old value. This is the one place pending state lives (the durable
    /// outbox asks the database every time; nothing is mirrored in memory).
    async fn newest(&self, key: &str) -> Result<Option<OutboxOp>>;
    /// Removes delivered rows.
    async fn complete(&self, ids: Vec<i64>) -> Result<()>;
    /// Records a failed attempt on these rows.
    async fn failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()>;
    /// The dead letters.
    async fn dead_letters(&self) -> Result<Vec<OutboxRow>>;
    /// Moves a dead letter back to pending (`retry`; not when superseded) or deletes it.
    async fn resolve(&self, id: i64, retry: bool) -> Result<Resolved>;
    /// A newer write of `key` reached the source (write-through): its dead letters are
    /// superseded.
    async fn supersede(&self, key: &str) -> Result<()>;
}

/// The durable outbox: rows in the L2 database. Every question about pending writes is asked
/// of the database, so no copy in memory can disagree with it (another process's writes
/// included).
#[derive(Debug)]
pub(crate) struct DurableQueue {
    store: Arc<dyn Store>,
}

impl DurableQueue {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl Queue for DurableQueue {
    async fn enqueue(&self, key: &str, entry: Option<Entry>, op: OutboxOp, now: u64) -> Result<()> {
        self.store.enqueue(key, entry, op, now).await.map(drop)
    }
    async fn newest(&self, key: &str) -> Result<Option<OutboxOp>> {
        self.store.outbox_newest(key).await
    }
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        self.store.outbox_pending(limit).await
    }
    async fn summary(&self) -> Result<(u64, Vec<(String, String)>)> {
        self.store.outbox_summary().await
    }
    async fn complete(&self, ids: Vec<i64>) -> Result<()> {
        self.store.outbox_complete(ids).await
    }
    async fn failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()> {
        self.store
            .outbox_failed(ids, next_attempt, error, dead)
            .await
    }
    async fn dead_letters(&self) -> Result<Vec<OutboxRow>> {
        self.store.dead_letters().await
    }
    async fn resolve(&self, id: i64, retry: bool) -> Result<Resolved> {
        self.store.resolve_dead_letter(id, retry).await
    }
    async fn supersede(&self, key: &str) -> Result<()> {
        self.store.supersede_dead(key).await
    }
}

/// The memory outbox. Writes to one key coalesce as they arrive (only the last is delivered,
/// as the flusher does anyway), so it holds at most one pending row per key: its size is
/// bounded by the keys written, not by the writes.
#[derive(Debug, Default)]
pub(crate) struct MemoryQueue {
    inner: Mutex<MemoryRows>,
}

/// A map keyed by the outbox's own row ids: sequential integers no caller chooses, so one
/// multiply spreads them and SipHash (which would cost more than the rest of a push) is not
/// needed.
type IdMap<V> = HashMap<i64, V, std::hash::BuildHasherDefault<IdHasher>>;

#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Debug, Default)]
struct MemoryRows {
    next_id: i64,
    /// The pending row of each key.
    by_key: HashMap<Arc<str>, OutboxRow>,
    /// The key of each pending row's id (ids of superseded rows are gone from here).
    key_of: IdMap<Arc<str>>,
    /// Ids in arrival order; superseded ones are skipped, and swept out now and then.
    order: std::collections::VecDeque<i64>,
    /// Rows the source refused for good, by id.
    dead: std::collections::BTreeMap<i64, OutboxRow>,
}

impl MemoryRows {
    /// The pending row with this id, if it is still the pending row of its key.
    fn pending_mut(&mut self, id: i64) -> Option<&mut OutboxRow> {
        let key = self.key_of.get(&id)?;
        self.by_key.get_mut(key)
    }

    /// Adds a write under a new id; a pending write of the same key is superseded (coalesced:
    /// only the last write of a key is delivered), keeping the time of the oldest.
    fn push(&mut self, key: &str, op: OutboxOp, now: u64) {
        self.supersede(key);
        self.next_id += 1;
        let id = self.next_id;
        // One lookup for a key already pending (the common case when writes coalesce).
        let shared = match self.by_key.get_mut(key) {
            Some(row) => {
                let shared = self.key_of.remove(&row.id);
                row.id = id;
                row.op = op;
                row.attempts = 0;
                row.next_attempt = 0;
                row.last_error = None;
                shared.unwrap_or_else(|| Arc::from(key))
            }
            None => {
                let shared: Arc<str> = Arc::from(key);
                self.by_key.insert(
                    shared.clone(),
                    OutboxRow {
                        id,
                        key: key.to_owned(),
                        op,
                        created_at: now,
                        attempts: 0,
                        next_attempt: 0,
                        last_error: None,
                        dead: false,
                        superseded: false,
                    },
                );
                shared
            }
        };
        self.key_of.insert(id, shared);
        self.order.push_back(id);
        if self.order.len() > 2 * self.key_of.len() + 1024 {
            let live = &self.key_of;
            self.order.retain(|id| live.contains_key(id));
        }
    }

    /// Marks `key`'s dead letters superseded (a newer write came).
    fn supersede(&mut self, key: &str) {
        for row in self.dead.values_mut().filter(|r| r.key == key) {
            row.superseded = true;
        }
    }

    /// The pending rows, oldest first.
    fn in_order(&self) -> impl Iterator<Item = &OutboxRow> {
        self.order
            .iter()
            .filter_map(|id| self.key_of.get(id))
            .filter_map(|k| self.by_key.get(k))
    }

    /// Takes the pending row with this id out.
    fn take(&mut self, id: i64) -> Option<OutboxRow> {
        let key = self.key_of.remove(&id)?;
        self.by_key.remove(&key)
    }
}

impl MemoryQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryRows> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push(&self, key: &str, op: OutboxOp, now: u64) {
        self.lock().push(key, op, now);
    }

    /// The keys with a pending write.
    pub(crate) fn keys(&self) -> Vec<String> {
        self.lock().by_key.keys().map(|k| k.to_string()).collect()
    }

    /// `key`'s pending write, without waiting.
    pub(crate) fn newest_now(&self, key: &str) -> Option<OutboxOp> {
        self.lock().by_key.get(key).map(|r| r.op.clone())
    }

    /// Pending rows, dead letters and the oldest pending write's time.
    pub(crate) fn depth(&self) -> (u64, u64, Option<u64>) {
        let rows = self.lock();
        let oldest = rows.by_key.values().map(|r| r.created_at).min();
        (rows.by_key.len() as u64, rows.dead.len() as u64, oldest)
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(
        &self,
        key: &str,
        _entry: Option<Entry>,
        op: OutboxOp,
        now: u64,
    ) -> Result<()> {
        self.push(key, op, now);
        Ok(())
    }
    async fn newest(&self, key: &str) -> Result<Option<OutboxOp>> {
        Ok(self.newest_now(key))
    }
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        Ok(self.lock().in_order().take(limit).cloned().collect())
    }

    async fn summary(&self) -> Result<(u64, Vec<(String, String)>)> {
        let rows = self.lock();
        // One row per key: no key can appear twice.
        let stuck = rows
            .in_order()
            .filter_map(|r| Some((r.key.clone(), r.last_error.clone()?)))
            .collect();
        Ok((rows.by_key.len() as u64, stuck))
    }

    async fn complete(&self, ids: Vec<i64>) -> Result<()> {
        let mut rows = self.lock();
        for id in ids {
            rows.take(id);
        }
        Ok(())
    }

    async fn failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()> {
        let mut rows = self.lock();
        for id in ids {
            let Some(r) = rows.pending_mut(id) else {
                continue;
            };
            r.attempts += 1;
            r.next_attempt = next_attempt;
            r.last_error = Some(error.clone());
            if dead {
                if let Some(mut row) = rows.take(id) {
                    row.dead = true;
                    rows.dead.insert(id, row);
                }
            }
        }
        Ok(())
    }

    async fn dead_letters(&self) -> Result<Vec<OutboxRow>> {
        Ok(self.lock().dead.values().cloned().collect())
    }

    async fn resolve(&self, id: i64, retry: bool) -> Result<Resolved> {
        let mut rows = self.lock();
        match rows.dead.get(&id) {
            None => return Ok(Resolved::Missing),
            Some(row) if retry && row.superseded => {
                return Ok(Resolved::Superseded(row.key.clone()));
            }
            Some(_) => {}
        }
        if let Some(row) = rows.dead.remove(&id) {
            if retry {
                // Not superseded: no newer write of the key exists, pending or delivered.
                rows.push(&row.key, row.op, row.created_at);
            }
        }
        Ok(Resolved::Done)
    }

    async fn supersede(&self, key: &str) -> Result<()> {
        self.lock().supersede(key);
        Ok(())
    }
}

/// Why a delivery was held back without being sent.
const NOT_SENT: &str = "offline mode is on (or the cache is closed): not sent";

/// Rows read per delivery round.
const ROUND_ROWS: usize = 4096;
/// Keys delivered at once.
const DELIVERY_CONCURRENCY: usize = 8;
/// Rounds one `flush` makes at most (new writes may keep arriving while it works; each round
/// must make progress for the next to run).
const FLUSH_ROUNDS: usize = 64;
/// Delivered rows removed per statement.
const COMPLETE_BATCH: usize = 64;

/// A write the source refused for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id, for [`retry_dead_letter`](crate::TieredCache::retry_dead_letter) and
    /// [`discard_dead_letter`](crate::TieredCache::discard_dead_letter).
    pub id: i64,
    /// The key.
    pub key: String,
    /// `"put"` or `"delete"`.
    pub op: &'static str,
    /// Delivery attempts made.
    pub attempts: u32,
    /// The source's last error.
    pub error: Option<String>,
    /// When the write was made.
    pub created_at: SystemTime,
    /// A newer write of the key came after this one: retrying it would roll the source back,
    /// so [`retry_dead_letter`](crate::TieredCache::retry_dead_letter) refuses it with
    /// [`Error::Superseded`]; discard it.
    pub superseded: bool,
}

impl From<OutboxRow> for DeadLetter {
    fn from(r: OutboxRow) -> Self {
        Self {
            id: r.id,
            key: r.key,
            op: r.op.name(),
            attempts: r.attempts,
            error: r.last_error,
            created_at: from_millis(r.created_at),
            superseded: r.superseded,
        }
    }
}

/// What a [`flush`](crate::TieredCache::flush) did and what is left.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FlushReport {
    /// Outbox rows delivered (coalesced writes count each).
    pub delivered: u64,
    /// Rows still waiting for delivery.
    pub pending: u64,
    /// Rows moved to the dead letters by this flush.
    pub dead_lettered: u64,
    /// Keys still pending, each with the error of its last attempt.
    pub stuck: Vec<(String, String)>,
}

impl FlushReport {
    /// Whether nothing is left to deliver.
    pub fn is_complete(&self) -> bool {
        self.pending == 0
    }
}

/// The outcome of delivering one key.
enum Delivery {
    /// The ids of the rows settled by the delivery.
    Delivered(Vec<i64>),
    Retry(String),
    Dead(String),
    /// The source was not called (breaker open, rate limited until later).
    Held(String),
}

struct Deliverer {
    queue: Arc<dyn Queue>,
    source: Arc<dyn Source>,
    clock: Arc<dyn Clock>,
    retry_base: Duration,
    retry_max: Duration,
    guard: Arc<SourceGuard>,
    events: Events,
    timeout: Duration,
    delivered: AtomicU64,
    retries: AtomicU64,
    /// Offline mode: nothing is sent.
    offline: Arc<AtomicBool>,
    /// Set when the cache is dropped or closed: nothing more is sent.
    stopped: AtomicBool,
    /// The cache's tiers, kept in step with what delivery settles.
    tiers: LocalTiers,
    /// Serializes rounds so a flush and the background task never deliver one key twice at once.
    round: tokio::sync::Mutex<()>,
}

/// The cache's own tiers as the flusher sees them: a settled write changes what its key reads
/// as, so the flusher updates them (behind the key's fence) before it removes the rows.
#[derive(Debug, Clone)]
pub(crate) struct LocalTiers {
    pub(crate) l1: MemoryTier,
    pub(crate) l2: Arc<dyn Store>,
    pub(crate) fences: Arc<Fences>,
    /// The memory outbox never wrote L2: a delivered put writes it there.
    pub(crate) memory_mode: bool,
    /// Lifetimes of an entry written for a delivered put (ms).
    pub(crate) ttl: u64,
    pub(crate) stale_ttl: u64,
}

/// How deliveries are timed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retry {
    /// The first retry delay.
    pub(crate) base: Duration,
    /// The longest retry delay.
    pub(crate) max: Duration,
    /// The deadline of one delivery.
    pub(crate) timeout: Duration,
}

/// The write-behind outbox's background flusher.
pub(crate) struct Outbox {
    deliverer: Arc<Deliverer>,
    notify: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    /// Starts the flusher (when `background`), which first replays what an earlier process left pending.
    #[allow(clippy::too_many_arguments)] // Internal; called from one place.
    pub(crate) fn start(
        queue: Arc<dyn Queue>,
        source: Arc<dyn Source>,
        clock: Arc<dyn Clock>,
        guard: Arc<SourceGuard>,
        events: Events,
        retry: Retry,
        offline: Arc<AtomicBool>,
        tiers: LocalTiers,
        background: bool,
    ) -> Result<Self> {
        let handle = if background {
            Some(tokio::runtime::Handle::try_current().map_err(|_| {
                Error::Config(
                    "the write-behind strategy needs a Tokio runtime to run its flusher".into(),
                )
            })?)
        } else {
            None
        };
        let deliverer = Arc::new(Deliverer {
            queue,
            source,
            clock,
            retry_base: retry.base,
            retry_max: retry.max,
            guard,
            events,
            timeout: retry.timeout,
            delivered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            offline,
            stopped: AtomicBool::new(false),
            tiers,
            round: tokio::sync::Mutex::new(()),
        });
        let notify = Arc::new(Notify::new());
        let (stop, stopped) = watch::channel(false);
        let task = handle.map(|h| h.spawn(run(deliverer.clone(), notify.clone(), stopped)));
        Ok(Self {
            deliverer,
            notify,
            stop,
            task: Mutex::new(task),
        })
    }

    /// The outbox's storage.
    pub(crate) fn queue(&self) -> &Arc<dyn Queue> {
        &self.deliverer.queue
    }

    /// Rows delivered and failed attempts since this process started.
    pub(crate) fn counters(&self) -> (u64, u64) {
        (
            self.deliverer.delivered.load(Ordering::Relaxed),
            self.deliverer.retries.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn notify(&self) {
        self.notify.notify_one();
    }

    /// Stops the flusher: from now on nothing is sent (a delivery already on the wire finishes
    /// and is recorded, so no breaker probe slot or row is left half done), and the background
    /// task ends after its current round.
    pub(crate) fn stop(&self) {
        self.deliverer.stopped.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
        self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// One attempt for every pending key, ignoring retry delays; repeated while new writes
    /// arrive and everything goes through.
    pub(crate) async fn flush(&self) -> Result<FlushReport> {
        let mut report = FlushReport::default();
        // Rounds go on while they make progress: after an outage the breaker is half-open and
        // admits a few probes per round, and every success lets more through.
        for _ in 0..FLUSH_ROUNDS {
            let round = self.deliverer.round(true).await?;
            report.delivered += round.delivered;
            report.dead_lettered += round.dead_lettered;
            let progress = round.delivered + round.dead_lettered > 0;
            if round.attempted == 0 || round.stuck.is_empty() && !progress {
                break;
            }
            if !round.stuck.is_empty() && !progress {
                report.stuck = round.stuck;
                break;
            }
        }
        let pending = self.report_pending().await?;
        report.pending = pending.pending;
        if report.stuck.is_empty() {
            report.stuck = pending.stuck;
        }
        Ok(report)
    }

    /// What is pending now, without delivering.
    pub(crate) async fn report_pending(&self) -> Result<FlushReport> {
        let (pending, stuck) = self.deliverer.queue.summary().await?;
        Ok(FlushReport {
            pending,
            stuck,
            ..FlushReport::default()
        })
    }
}

#[derive(Default)]
struct Round {
    attempted: usize,
    delivered: u64,
    dead_lettered: u64,
    stuck: Vec<(String, String)>,
    /// The earliest time a key held back by its retry delay becomes due (ms).
    next_due: Option<u64>,
}

impl Deliverer {
    async fn round(&self, ignore_delays: bool) -> Result<Round> {
        let _one_at_a_time = self.round.lock().await;
        let rows = self.queue.pending(ROUND_ROWS).await?;
        let now = self.clock.now_millis();
        // Group by key, in order of each key's oldest row.
        let mut order: Vec<String> = Vec::new();
        let mut by_key: HashMap<String, Vec<OutboxRow>> = HashMap::new();
        for r in rows {
            if !by_key.contains_key(&r.key) {
                order.push(r.key.clone());
            }
            by_key.entry(r.key.clone()).or_default().push(r);
        }
        let mut round = Round::default();
        let mut due = Vec::new();
        for key in order {
            let rows = by_key.remove(&key).unwrap_or_default();
            let next = rows.iter().map(|r| r.next_attempt).max().unwrap_or(0);
            if !ignore_delays && next > now {
                round.next_due = Some(round.next_due.map_or(next, |d| d.min(next)));
                continue;
            }
            due.push((key, rows));
        }
        round.attempted = due.len();
        let mut outcomes = std::pin::pin!(stream::iter(due)
            .map(|(key, rows)| async move {
                let d = self.deliver(&key, rows).await;
                (key, d)
            })
            .buffer_unordered(DELIVERY_CONCURRENCY));
        // Delivered rows are removed in batches: one statement per batch, not one per key. A
        // crash before a batch is removed only means those writes are sent again (delivery is
        // idempotent).
        let mut delivered: Vec<i64> = Vec::new();
        while let Some((key, outcome)) = outcomes.next().await {
            match outcome? {
                Delivery::Delivered(ids) => {
                    round.delivered += ids.len() as u64;
                    delivered.extend(ids);
                    if delivered.len() >= COMPLETE_BATCH {
                        self.complete(std::mem::take(&mut delivered)).await?;
                    }
                }
                Delivery::Dead(e) => {
                    round.dead_lettered += 1;
                    tracing::error!(key, error = %e, "write-behind: the source refused a write for good; kept as a dead letter");
                }
                Delivery::Retry(e) | Delivery::Held(e) => {
                    tracing::warn!(key, error = %e, "write-behind: delivery failed; will retry");
                    round.stuck.push((key, e));
                }
            }
        }
        self.complete(delivered).await?;
        round.stuck.sort();
        Ok(round)
    }

    /// Removes delivered rows.
    async fn complete(&self, ids: Vec<i64>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let n = ids.len() as u64;
        self.queue.complete(ids).await?;
        self.delivered.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Delivers the last of `rows` (all of one key, oldest first); on success the caller removes
    /// them all.
    async fn deliver(&self, key: &str, rows: Vec<OutboxRow>) -> Result<Delivery> {
        let Some(last) = rows.last() else {
            return Ok(Delivery::Delivered(Vec::new()));
        };
        if !self.may_send() {
            return Ok(Delivery::Held(NOT_SENT.into()));
        }
        let attempts = rows.iter().map(|r| r.attempts).max().unwrap_or(0) + 1;
        let call = async {
            let r = match &last.op {
                OutboxOp::Put(v) => self.source.put(key, v).await,
                OutboxOp::Delete => match self.source.delete(key).await {
                    Err(SourceError::NotFound { .. }) => Ok(()),
                    other => other,
                },
            };
            // Dated when the source took it, not after the breaker's bookkeeping.
            r.map(|()| self.clock.now_millis())
        };
        // The offline and stop switches are checked again right before the call is sent
        // (waiting for the breaker's permit takes time): I3.
        let result = guarded(&self.guard, self.timeout, || self.may_send(), call).await;
        let now = self.clock.now_millis();
        match result {
            Ok(accepted_at) => {
                self.settled(key, last.id, Some(&last.op), accepted_at)
                    .await;
                Ok(Delivery::Delivered(ids(&rows)))
            }
            Err(_) if !self.may_send() => Ok(Delivery::Held(NOT_SENT.into())),
            // Not sent: the breaker is open. Nothing to record; the key waits its turn.
            Err(e @ SourceError::CircuitOpen { .. }) => Ok(Delivery::Held(e.to_string())),
            Err(e) if e.is_transient() => {
                let mut next = now + self.backoff(attempts);
                if let Some(until) = e.rate_limited_until() {
                    next = next.max(crate::clock::to_millis(until));
                }
                let msg = crate::error::chain_text(&e);
                self.retries.fetch_add(1, Ordering::Relaxed);
                self.queue
                    .failed(ids(&rows), next, msg.clone(), false)
                    .await?;
                Ok(Delivery::Retry(msg))
            }
            Err(e) => {
                let msg = crate::error::chain_text(&e);
                // Refused: the source's value stands (I1). Unless a newer write of the key is
                // pending, the local copy of the refused write goes: L1 now and again after
                // (a read racing this may have promoted it), L2 with the dead letter in one step.
                self.tiers.fences.bump(key);
                self.tiers.l1.remove(key).await;
                if self.tiers.memory_mode {
                    // The memory outbox's dead letter ends the pending write's shadow over L2 at
                    // once (no transaction binds them): L2's older copy goes first.
                    if let Err(e) = self.tiers.l2.remove(key).await {
                        tracing::warn!(key, error = %e, "write-behind: could not drop the L2 copy of a refused write's key");
                    }
                }
                self.queue
                    .failed(ids(&rows), now, msg.clone(), true)
                    .await?;
                self.settled(key, last.id, None, now).await;
                self.events.emit(Event::DeadLetter {
                    key: key.to_owned(),
                    error: msg.clone(),
                });
                Ok(Delivery::Dead(msg))
            }
        }
    }

    fn may_send(&self) -> bool {
        !self.offline.load(Ordering::SeqCst) && !self.stopped.load(Ordering::SeqCst)
    }

    /// Brings the local tiers in line with a settled write (`id`: its newest row): `Some(op)`
    /// delivered, `None` refused (the local copy goes unless a newer write of the key is
    /// pending; the next read asks the source). A delivered delete runs before its rows are
    /// removed, so a read never finds neither the row nor the settled state.
    async fn settled(&self, key: &str, id: i64, delivered: Option<&OutboxOp>, now: u64) {
        let t = &self.tiers;
        let written = match delivered {
            Some(OutboxOp::Put(value)) if t.memory_mode => {
                t.fences.bump(key);
                let fresh_until = now.saturating_add(t.ttl);
                let entry = Entry::new(
                    Some(value.clone()),
                    None,
                    now,
                    fresh_until,
                    fresh_until.saturating_add(t.stale_ttl),
                );
                t.l2.put(key, entry).await
            }
            // The durable outbox wrote the entry with the row.
            Some(OutboxOp::Put(_)) => return,
            Some(OutboxOp::Delete) | None => {
                t.fences.bump(key);
                t.l1.remove(key).await;
                match (t.memory_mode, delivered) {
                    // A newer write in the memory outbox shadows L2 until it is delivered.
                    (true, _) => t.l2.remove(key).await,
                    // The refusal removed the entry with the dead letter.
                    (false, None) => return,
                    (false, Some(_)) => t.l2.remove_settled(key, id).await,
                }
            }
        };
        if let Err(e) = written {
            tracing::warn!(key, error = %e, "write-behind: could not update L2 after a delivery");
        }
    }

    /// Exponential backoff with full jitter in the upper half: base·2^(n-1), capped, times a
    /// random factor in [0.5, 1.0].
    fn backoff(&self, attempts: u32) -> u64 {
        let base = millis(self.retry_base);
        let max = millis(self.retry_max);
        let exp = base.saturating_mul(1u64 << attempts.saturating_sub(1).min(32));
        let capped = exp.min(max);
        capped / 2 + fastrand::u64(0..=capped / 2)
    }
}

fn ids(rows: &[OutboxRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

async fn run(deliverer: Arc<Deliverer>, notify: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if *stop.borrow() {
            return;
        }
        wait = match deliverer.round(false).await {
            Ok(round) => {
                let now = deliverer.clock.now_millis();
                match (round.next_due, round.stuck.is_empty()) {
                    (Some(due), _) => {
                        Duration::from_millis(due.saturating_sub(now).clamp(10, 60_000))
                    }
                    (None, false) => deliverer.retry_base,
                    (None, true) => Duration::from_secs(3600),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "write-behind: could not read the outbox");
                deliverer.retry_base
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn put(v: &str) -> OutboxOp {
        OutboxOp::Put(Bytes::copy_from_slice(v.as_bytes()))
    }

    #[tokio::test]
    async fn memory_queue_coalesces_and_a_late_completion_keeps_the_newer_write() -> Result<()> {
        let q = MemoryQueue::default();
        q.push("k", put("1"), 10);
        q.push("other", put("x"), 11);
        q.push("k", put("2"), 12);
        let pending = q.pending(10).await?;
        assert_eq!(pending.len(), 2, "one row per key");
        let k = pending
            .iter()
            .find(|r| r.key == "k")
            .cloned()
            .expect("k is pending");
        assert_eq!(
            (k.op.clone(), k.created_at),
            (put("2"), 10),
            "last write, oldest time"
        );
        // A write arrives while `k` is being delivered: completing the delivered id must not
        // drop it, and neither must a failure report for the old id.
        q.push("k", put("3"), 13);
        q.failed(vec![k.id], 99, "late".into(), true).await?;
        q.complete(vec![k.id]).await?;
        assert!(matches!(q.newest_now("k"), Some(OutboxOp::Put(_))));
        let left: Vec<_> = q
            .pending(10)
            .await?
            .into_iter()
            .map(|r| (r.key, r.op))
            .collect();
        assert!(left.contains(&("k".to_owned(), put("3"))), "{left:?}");
        assert!(q.dead_letters().await?.is_empty());
        q.push("k", OutboxOp::Delete, 14);
        assert_eq!(q.newest_now("k"), Some(OutboxOp::Delete));
        assert_eq!(q.depth().0, 2);
        Ok(())
    }
}
