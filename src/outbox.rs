//! Write-behind delivery: a background flusher that pushes the durable outbox (rows in the L2
//! database) to the source, in per-key order, coalescing pending writes of one key into the last,
//! retrying transient failures with exponential backoff and jitter, and keeping writes the source
//! refuses for good as dead letters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::cache::guard::{guarded, SourceGuard};
use crate::clock::{from_millis, millis, Clock};
use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::event::{Event, Events};
use crate::source::{Source, SourceError};
use crate::tier::{OutboxOp, OutboxRow, Store};

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

/// What a key's undelivered writes leave it as: the cache must not fetch such a key from the
/// source (it would read its own write back as the source's older value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pending {
    /// The last undelivered write sets a value.
    Put,
    /// The last undelivered write deletes the key.
    Delete,
}

/// The outbox's storage: the L2 database, or memory.
#[async_trait]
pub(crate) trait Queue: Send + Sync + std::fmt::Debug + 'static {
    /// Adds a write (`entry`: the L2 entry written with it, for the durable outbox).
    async fn enqueue(&self, key: &str, entry: Option<Entry>, op: OutboxOp, now: u64) -> Result<()>;
    /// Whether `key` has undelivered writes, and what the last one does.
    fn pending_for(&self, key: &str) -> Option<Pending>;
    /// Pending (not dead) rows, oldest first.
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>>;
    /// How many rows are pending, and the keys whose last attempt failed with that error
    /// (each key once, oldest first), without copying any value.
    async fn summary(&self) -> Result<(u64, Vec<(String, String)>)>;
    /// The bytes of `key`'s newest undelivered write, when it is a put: what a read of `key`
    /// must answer while the source still holds the old value.
    async fn pending_value(&self, key: &str) -> Result<Option<Bytes>>;
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
    /// Moves a dead letter back to pending (`retry`) or deletes it.
    async fn resolve(&self, id: i64, retry: bool) -> Result<bool>;
}

/// The durable outbox: rows in the L2 database, and in memory which keys have undelivered rows
/// (loaded on open, kept up to date by every change made through this queue).
#[derive(Debug)]
pub(crate) struct DurableQueue {
    store: Arc<dyn Store>,
    keys: Mutex<PendingKeys>,
}

/// Undelivered rows by key (how many, and what the newest does), and each row's key.
#[derive(Debug, Default)]
struct PendingKeys {
    by_key: HashMap<Arc<str>, (usize, i64, Pending)>,
    key_of: IdMap<Arc<str>>,
}

impl PendingKeys {
    fn add(&mut self, id: i64, key: &str, op: Pending) {
        let shared = match self.by_key.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        let (rows, newest, last) = self.by_key.entry(shared.clone()).or_insert((0, id, op));
        *rows += 1;
        if id >= *newest {
            *newest = id;
            *last = op;
        }
        self.key_of.insert(id, shared);
    }

    fn remove(&mut self, id: i64) {
        let Some(key) = self.key_of.remove(&id) else {
            return;
        };
        if let Some((rows, _, _)) = self.by_key.get_mut(&key) {
            *rows -= 1;
            if *rows == 0 {
                self.by_key.remove(&key);
            }
        }
    }
}

fn pending_kind(op: &OutboxOp) -> Pending {
    match op {
        OutboxOp::Put(_) => Pending::Put,
        OutboxOp::Delete => Pending::Delete,
    }
}

impl DurableQueue {
    /// `pending`: the undelivered rows found on open (id, key, whether a delete).
    pub(crate) fn new(store: Arc<dyn Store>, pending: Vec<(i64, String, bool)>) -> Self {
        let mut keys = PendingKeys::default();
        for (id, key, delete) in pending {
            keys.add(
                id,
                &key,
                if delete {
                    Pending::Delete
                } else {
                    Pending::Put
                },
            );
        }
        Self {
            store,
            keys: Mutex::new(keys),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, PendingKeys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Queue for DurableQueue {
    async fn enqueue(&self, key: &str, entry: Option<Entry>, op: OutboxOp, now: u64) -> Result<()> {
        let kind = pending_kind(&op);
        let id = self.store.enqueue(key, entry, op, now).await?;
        self.keys().add(id, key, kind);
        Ok(())
    }
    fn pending_for(&self, key: &str) -> Option<Pending> {
        self.keys().by_key.get(key).map(|&(_, _, last)| last)
    }
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        self.store.outbox_pending(limit).await
    }
    async fn summary(&self) -> Result<(u64, Vec<(String, String)>)> {
        self.store.outbox_summary().await
    }
    async fn pending_value(&self, key: &str) -> Result<Option<Bytes>> {
        self.store.outbox_value(key).await
    }
    async fn complete(&self, ids: Vec<i64>) -> Result<()> {
        self.store.outbox_complete(ids.clone()).await?;
        let mut keys = self.keys();
        for id in ids {
            keys.remove(id);
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
        self.store
            .outbox_failed(ids.clone(), next_attempt, error, dead)
            .await?;
        if dead {
            // Refused for good: the source's value stands; the write waits as a dead letter.
            let mut keys = self.keys();
            for id in ids {
                keys.remove(id);
            }
        }
        Ok(())
    }
    async fn dead_letters(&self) -> Result<Vec<OutboxRow>> {
        self.store.dead_letters().await
    }
    async fn resolve(&self, id: i64, retry: bool) -> Result<bool> {
        let row = if retry {
            self.store
                .dead_letters()
                .await?
                .into_iter()
                .find(|r| r.id == id)
        } else {
            None
        };
        let found = self.store.resolve_dead_letter(id, retry).await?;
        if let (true, Some(row)) = (found, row) {
            self.keys().add(row.id, &row.key, pending_kind(&row.op));
        }
        Ok(found)
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
    fn pending_for(&self, key: &str) -> Option<Pending> {
        self.lock().by_key.get(key).map(|r| pending_kind(&r.op))
    }
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        Ok(self.lock().in_order().take(limit).cloned().collect())
    }

    async fn pending_value(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(match self.lock().by_key.get(key).map(|r| &r.op) {
            Some(OutboxOp::Put(value)) => Some(value.clone()),
            _ => None,
        })
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

    async fn resolve(&self, id: i64, retry: bool) -> Result<bool> {
        let mut rows = self.lock();
        let Some(row) = rows.dead.remove(&id) else {
            return Ok(false);
        };
        // Back in line, unless a newer write of the key is already pending.
        if retry && !rows.by_key.contains_key(row.key.as_str()) {
            rows.push(&row.key, row.op, row.created_at);
        }
        Ok(true)
    }
}

/// Rows read per delivery round.
const ROUND_ROWS: usize = 4096;
/// Keys delivered at once.
const DELIVERY_CONCURRENCY: usize = 8;
/// Rounds one `flush` makes at most (new writes may keep arriving while it works).
const FLUSH_ROUNDS: usize = 16;
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
    /// Serializes rounds so a flush and the background task never deliver one key twice at once.
    round: tokio::sync::Mutex<()>,
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

    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }

    /// One attempt for every pending key, ignoring retry delays; repeated while new writes
    /// arrive and everything goes through.
    pub(crate) async fn flush(&self) -> Result<FlushReport> {
        let mut report = FlushReport::default();
        for _ in 0..FLUSH_ROUNDS {
            let round = self.deliverer.round(true).await?;
            report.delivered += round.delivered;
            report.dead_lettered += round.dead_lettered;
            if !round.stuck.is_empty() || round.attempted == 0 {
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
        if self.offline.load(Ordering::Relaxed) {
            return Ok(Delivery::Held("offline mode is on: not sent".into()));
        }
        let attempts = rows.iter().map(|r| r.attempts).max().unwrap_or(0) + 1;
        let call = async {
            match &last.op {
                OutboxOp::Put(v) => self.source.put(key, v).await,
                OutboxOp::Delete => match self.source.delete(key).await {
                    Err(SourceError::NotFound { .. }) => Ok(()),
                    other => other,
                },
            }
        };
        let result = guarded(&self.guard, self.timeout, call).await;
        let now = self.clock.now_millis();
        match result {
            Ok(()) => Ok(Delivery::Delivered(ids(&rows))),
            // Not sent: the breaker is open. Nothing to record; the key waits its turn.
            Err(e @ SourceError::CircuitOpen { .. }) => Ok(Delivery::Held(e.to_string())),
            Err(e) if e.is_transient() => {
                let mut next = now + self.backoff(attempts);
                if let Some(until) = e.rate_limited_until() {
                    next = next.max(crate::clock::to_millis(until));
                }
                let msg = e.to_string();
                self.retries.fetch_add(1, Ordering::Relaxed);
                self.queue
                    .failed(ids(&rows), next, msg.clone(), false)
                    .await?;
                Ok(Delivery::Retry(msg))
            }
            Err(e) => {
                let msg = e.to_string();
                self.queue
                    .failed(ids(&rows), now, msg.clone(), true)
                    .await?;
                self.events.emit(Event::DeadLetter {
                    key: key.to_owned(),
                    error: msg.clone(),
                });
                Ok(Delivery::Dead(msg))
            }
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
        assert_eq!(q.pending_for("k"), Some(Pending::Put));
        let left: Vec<_> = q
            .pending(10)
            .await?
            .into_iter()
            .map(|r| (r.key, r.op))
            .collect();
        assert!(left.contains(&("k".to_owned(), put("3"))), "{left:?}");
        assert!(q.dead_letters().await?.is_empty());
        q.push("k", OutboxOp::Delete, 14);
        assert_eq!(q.pending_for("k"), Some(Pending::Delete));
        assert_eq!(q.depth().0, 2);
        Ok(())
    }

    #[test]
    fn durable_pending_keys_follow_the_newest_row() {
        let mut keys = PendingKeys::default();
        keys.add(1, "k", Pending::Put);
        keys.add(3, "k", Pending::Delete);
        keys.add(2, "k", Pending::Put);
        assert_eq!(keys.by_key.get("k").map(|e| e.2), Some(Pending::Delete));
        for id in [1, 2] {
            keys.remove(id);
        }
        assert!(keys.by_key.contains_key("k"));
        keys.remove(3);
        keys.remove(3);
        assert!(keys.by_key.is_empty() && keys.key_of.is_empty());
    }
}
