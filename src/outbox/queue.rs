//! The outbox's storage: the [`Queue`] trait, the durable queue (rows in the L2 database) and
//! the memory queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::entry::Entry;
use crate::error::Result;
use crate::tier::{OutboxOp, OutboxRow, OutboxStore, Resolved};

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
    store: Arc<dyn OutboxStore>,
}

impl DurableQueue {
    pub(crate) fn new(store: Arc<dyn OutboxStore>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl Queue for DurableQueue {
    async fn enqueue(&self, key: &str, entry: Option<Entry>, op: OutboxOp, now: u64) -> Result<()> {
        self.store
            .enqueue(key, entry.map(Into::into), op, now)
            .await
            .map(drop)
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

/// The memory outbox's maps hash with foldhash (randomly seeded per map), not SipHash: SipHash
/// of the key and of the id cost more than the rest of a push (callgrind, memory-mode
/// write-behind sets), and a read that misses L1 looks its key up here too.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct MemoryRows {
    next_id: i64,
    /// The pending row of each key.
    by_key: FastMap<Arc<str>, OutboxRow>,
    /// The key of each pending row's id (ids of superseded rows are gone from here).
    key_of: FastMap<i64, Arc<str>>,
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
