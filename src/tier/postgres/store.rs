//! The storage traits ([`EntryStore`], [`OutboxStore`], [`StateStore`]) over the pool: reads as
//! single statements, writes of a key in a transaction under the key's advisory lock.

use std::collections::HashSet;

use async_trait::async_trait;
use deadpool_postgres::{Object, Transaction};
use tokio_postgres::Statement;

use super::notify;
use super::rows::{op_of, row_to_entry, row_to_outbox};
use super::schema::{storage, LOCK};
use super::{to_i64, to_u64, PostgresStore};
use crate::error::{Error, Result};
use crate::tier::{
    EntryStore, FillGuard, FillLease, Found, MetaUpdate, Observed, OutboxOp, OutboxRow,
    OutboxStore, Resolved, StateStore, StoreSummary, StoredEntry,
};

pub(super) type Pg = tokio_postgres::Error;

impl PostgresStore {
    /// A connection from the pool.
    pub(super) async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(|e| Error::Storage {
            message: format!(
                "no connection to PostgreSQL at {}: {}",
                self.server,
                crate::error::chain_text(&e)
            ),
            source: Some(std::sync::Arc::new(e)),
        })
    }
}

/// Takes the advisory locks `names` for the transaction (in hash order).
pub(super) async fn lock(tx: &Transaction<'_>, names: &[String]) -> Result<(), Pg> {
    let st = tx.prepare_cached(LOCK).await?;
    tx.execute(&st, &[&names]).await.map(drop)
}

/// Runs `write` under the advisory lock of `name`, sent right behind the lock (pipelined: one
/// round trip). The server runs them in order, so `write` runs only once the lock is held.
/// `write` must send its first statement when first polled (its statements prepared before).
async fn under_lock<T>(
    tx: &Transaction<'_>,
    name: String,
    write: impl std::future::Future<Output = Result<T, Pg>>,
) -> Result<T, Pg> {
    let st = tx.prepare_cached(LOCK).await?;
    let names = [name];
    let lock = async { tx.execute(&st, &[&names.as_slice()]).await };
    let (_, out) = tokio::try_join!(lock, write)?;
    Ok(out)
}

pub(super) async fn put_entry(
    tx: &Transaction<'_>,
    st: &Statement,
    key: &str,
    e: &StoredEntry,
) -> Result<(), Pg> {
    tx.execute(
        st,
        &[
            &key,
            &e.value.as_deref(),
            &e.validator,
            &to_i64(e.stored_at),
            &to_i64(e.fresh_until),
            &to_i64(e.stale_until),
            &to_i64(e.size() as u64),
        ],
    )
    .await
    .map(drop)
}

impl PostgresStore {
    /// Logs `keys` as changed and notifies the other instances, in `tx` (the write's own
    /// transaction: the log row and the `NOTIFY` exist if and only if the write commits).
    /// `st` is [`Sql::publish`](super::schema::Sql) prepared; sends its statement when first
    /// polled.
    pub(super) async fn publish(
        &self,
        tx: &Transaction<'_>,
        st: &Statement,
        keys: &[&str],
    ) -> Result<(), Pg> {
        let f = &self.fleet;
        let payloads = notify::payloads(&f.origin, keys);
        tx.execute(
            st,
            &[&f.origin, &keys, &f.channel, &payloads, &f.range_header],
        )
        .await
        .map(drop)
    }

    /// Whether a fill may write `key`, checked under the key's lock: no write began in this
    /// process since the fill started, and the row is the one it observed.
    async fn fill_allowed(
        &self,
        tx: &Transaction<'_>,
        key: &str,
        guard: &FillGuard,
    ) -> Result<bool, Pg> {
        if !guard.still_valid() {
            return Ok(false);
        }
        if guard.observed() == Observed::Unknown {
            return Ok(true);
        }
        let st = tx.prepare_cached(&self.sql.stored_at).await?;
        let held: Option<i64> = tx.query_opt(&st, &[&key]).await?.map(|r| r.get(0));
        Ok(guard.allows(held.map(to_u64)))
    }

    async fn remove_unless_pending(&self, key: &str, settled_id: Option<i64>) -> Result<()> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            let lock = self.sql.key_lock(key);
            let publish = tx.prepare_cached(&self.sql.publish).await?;
            let keys = [key];
            let published = self.publish(&tx, &publish, &keys);
            match settled_id {
                Some(id) => {
                    let st = tx.prepare_cached(&self.sql.remove_unless_pending).await?;
                    let remove = async { tx.execute(&st, &[&key, &id]).await };
                    let both = async { tokio::try_join!(remove, published) };
                    under_lock(&tx, lock, both).await?;
                }
                None => {
                    let st = tx.prepare_cached(&self.sql.remove).await?;
                    let remove = async { tx.execute(&st, &[&key]).await };
                    let both = async { tokio::try_join!(remove, published) };
                    under_lock(&tx, lock, both).await?;
                }
            }
            tx.commit().await
        };
        run.await.map_err(|e| storage("remove an entry", e))
    }
}

#[async_trait]
impl EntryStore for PostgresStore {
    async fn get(&self, key: &str) -> Result<Option<StoredEntry>> {
        let client = self.client().await?;
        let run = async {
            let st = client.prepare_cached(&self.sql.get).await?;
            match client.query_opt(&st, &[&key]).await? {
                Some(r) => row_to_entry(&r, 0).map(Some),
                None => Ok(None),
            }
        };
        run.await.map_err(|e| storage("read an entry", e))
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Found> {
        if keys.is_empty() {
            return Ok(Found::default());
        }
        let client = self.client().await?;
        let run = async {
            // One statement: entries and the newest pending write of each key, one snapshot
            // (`kind` 0: entry, 1: pending put, 2: pending delete).
            let st = client.prepare_cached(&self.sql.get_many).await?;
            let mut found = Found::default();
            for r in client.query(&st, &[&keys]).await? {
                let key: String = r.try_get(0)?;
                match r.try_get::<_, i32>(6)? {
                    0 => found.entries.push((key, row_to_entry(&r, 1)?)),
                    1 => found.pending.push((key, op_of("put", r.try_get(1)?))),
                    _ => found.pending.push((key, OutboxOp::Delete)),
                }
            }
            Ok(found)
        };
        run.await.map_err(|e| storage("read a batch of entries", e))
    }

    async fn put(&self, key: &str, entry: StoredEntry) -> Result<()> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            let st = tx.prepare_cached(&self.sql.upsert).await?;
            let publish = tx.prepare_cached(&self.sql.publish).await?;
            let keys = [key];
            let write = async {
                tokio::try_join!(
                    put_entry(&tx, &st, key, &entry),
                    self.publish(&tx, &publish, &keys)
                )
            };
            under_lock(&tx, self.sql.key_lock(key), write).await?;
            tx.commit().await
        };
        run.await.map_err(|e| storage("write an entry", e))
    }

    async fn put_fill(&self, key: &str, entry: StoredEntry, guard: FillGuard) -> Result<bool> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            lock(&tx, &[self.sql.key_lock(key)]).await?;
            if !self.fill_allowed(&tx, key, &guard).await? {
                return Ok(false);
            }
            let st = tx.prepare_cached(&self.sql.upsert).await?;
            put_entry(&tx, &st, key, &entry).await?;
            tx.commit().await.map(|()| true)
        };
        run.await.map_err(|e| storage("fill an entry", e))
    }

    async fn renew_fill(
        &self,
        key: &str,
        (stored_at, fresh_until, stale_until): (u64, u64, u64),
        guard: FillGuard,
    ) -> Result<bool> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            lock(&tx, &[self.sql.key_lock(key)]).await?;
            if !self.fill_allowed(&tx, key, &guard).await? {
                return Ok(false);
            }
            let st = tx.prepare_cached(&self.sql.renew).await?;
            let n = tx
                .execute(
                    &st,
                    &[
                        &key,
                        &to_i64(stored_at),
                        &to_i64(fresh_until),
                        &to_i64(stale_until),
                    ],
                )
                .await?;
            tx.commit().await.map(|()| n > 0)
        };
        run.await.map_err(|e| storage("renew an entry", e))
    }

    async fn remove(&self, key: &str) -> Result<()> {
        self.remove_unless_pending(key, None).await
    }

    async fn remove_settled(&self, key: &str, settled_id: i64) -> Result<()> {
        self.remove_unless_pending(key, Some(settled_id)).await
    }

    /// One transaction per chunk of entries (see `merge.rs`): the written keys published.
    async fn merge(&self, entries: Vec<(String, StoredEntry)>) -> Result<Vec<crate::tier::Merged>> {
        self.merge_entries(entries).await
    }

    /// One `REPEATABLE READ, READ ONLY` transaction, paged through a cursor (see `snapshot.rs`).
    async fn snapshot(&self, prefix: &str, sink: crate::tier::EntrySink) -> Result<()> {
        self.snapshot_entries(prefix, sink).await
    }

    /// Fleet-wide single-flight: one upsert (see `lease.rs`).
    async fn fill_lease(&self, key: &str, lease: std::time::Duration) -> Result<FillLease> {
        self.take_fill_lease(key, lease).await
    }

    async fn release_fill_lease(&self, key: &str, token: u64) -> Result<()> {
        self.drop_fill_lease(key, token).await
    }

    /// The other instances' writes, from this store's listener (one per store, started by the
    /// first subscription; see the [module docs](super)).
    fn invalidations(&self) -> Option<crate::tier::Invalidations> {
        Some(self.fleet.subscribe())
    }

    /// Recency is not recorded: this store has no size bound yet (no eviction), so a touch
    /// would be a write for nothing. Never waits, never fails.
    fn touch(&self, _key: &str, _now: u64) {}

    async fn summary(&self, now: u64) -> Result<StoreSummary> {
        let client = self.client().await?;
        let run = async {
            let st = client.prepare_cached(&self.sql.summary).await?;
            let r = client.query_one(&st, &[&to_i64(now)]).await?;
            let count = |i: usize| r.try_get::<_, i64>(i).map(to_u64);
            Ok(StoreSummary {
                entries: count(0)?,
                bytes: count(1)?,
                stale_entries: count(2)?,
                negative_entries: count(3)?,
                outbox_depth: count(4)?,
                dead_letters: count(5)?,
                oldest_pending_ms: r.try_get::<_, Option<i64>>(6)?.map(to_u64),
                outbox_bytes: count(7)?,
            })
        };
        run.await.map_err(|e| storage("summarize the store", e))
    }
}

#[async_trait]
impl OutboxStore for PostgresStore {
    async fn enqueue(
        &self,
        key: &str,
        entry: Option<StoredEntry>,
        op: OutboxOp,
        now: u64,
    ) -> Result<i64> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            let write_st = tx
                .prepare_cached(match entry {
                    Some(_) => &self.sql.upsert,
                    None => &self.sql.remove,
                })
                .await?;
            let supersede_st = tx.prepare_cached(&self.sql.supersede_key).await?;
            let insert_st = tx.prepare_cached(&self.sql.enqueue).await?;
            let publish_st = tx.prepare_cached(&self.sql.publish).await?;
            let (value, now) = (
                match &op {
                    OutboxOp::Put(v) => Some(v.as_ref()),
                    OutboxOp::Delete => None,
                },
                to_i64(now),
            );
            let keys = [key];
            // Under the key's lock, in one round trip: the entry, the key's dead letters
            // superseded (a newer write: they may no longer be retried, I4), the row.
            let write_entry = async {
                match &entry {
                    Some(e) => put_entry(&tx, &write_st, key, e).await,
                    None => tx.execute(&write_st, &[&key]).await.map(drop),
                }
            };
            let steps = async {
                let supersede = async { tx.execute(&supersede_st, &[&key]).await };
                let insert = async {
                    tx.query_one(&insert_st, &[&key, &op.name(), &value, &now])
                        .await
                };
                let publish = self.publish(&tx, &publish_st, &keys);
                tokio::try_join!(write_entry, supersede, insert, publish)
            };
            let (_, _, row, _) = under_lock(&tx, self.sql.key_lock(key), steps).await?;
            let id: i64 = row.try_get(0)?;
            tx.commit().await.map(|()| id)
        };
        run.await.map_err(|e| storage("enqueue a write", e))
    }

    /// Claims, then returns, the rows this instance may deliver (see the module docs): every
    /// pending row of the oldest keys no other instance holds a live claim on, whose advisory
    /// lock was free, claimed for the lease; rows it claimed before are claimed again. In id
    /// order, at most `limit`. One short transaction; none is held across a delivery.
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let max = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            let st = tx.prepare_cached(&self.sql.claimable).await?;
            let keys: Vec<String> = tx
                .query(&st, &[&self.fleet.origin, &max])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, Pg>>()?;
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            // A key another instance is claiming (or a writer is writing) right now is left
            // for the next round: its lock is tried, never waited for.
            let st = tx.prepare_cached(&self.sql.try_lock_keys).await?;
            let prefix = self.sql.key_lock("");
            let keys: Vec<String> = tx
                .query(&st, &[&keys, &prefix])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, Pg>>()?;
            // A statement after the locks: it sees every claim committed before them.
            let st = tx.prepare_cached(&self.sql.claim).await?;
            let mut rows = tx
                .query(&st, &[&keys, &self.fleet.origin, &self.lease.as_secs_f64()])
                .await?
                .iter()
                .map(row_to_outbox)
                .collect::<Result<Vec<_>, Pg>>()?;
            tx.commit().await?;
            rows.sort_by_key(|r| r.id);
            rows.truncate(limit);
            Ok(rows)
        };
        run.await.map_err(|e| storage("claim outbox rows", e))
    }

    async fn outbox_newest(&self, key: &str) -> Result<Option<OutboxOp>> {
        let client = self.client().await?;
        let run = async {
            let st = client.prepare_cached(&self.sql.newest).await?;
            match client.query_opt(&st, &[&key]).await? {
                Some(r) => Ok(Some(op_of(&r.try_get::<_, String>(0)?, r.try_get(1)?))),
                None => Ok(None),
            }
        };
        run.await.map_err(|e| storage("read the outbox", e))
    }

    async fn outbox_summary(&self) -> Result<(u64, Vec<(String, String)>)> {
        let client = self.client().await?;
        let run = async {
            let st = client.prepare_cached(&self.sql.outbox_errors).await?;
            let (mut pending, mut stuck, mut seen) = (0u64, Vec::new(), HashSet::new());
            for r in client.query(&st, &[]).await? {
                pending += 1;
                if let Some(error) = r.try_get::<_, Option<String>>(1)? {
                    let key: String = r.try_get(0)?;
                    if seen.insert(key.clone()) {
                        stuck.push((key, error));
                    }
                }
            }
            Ok((pending, stuck))
        };
        run.await.map_err(|e| storage("read the outbox", e))
    }

    async fn outbox_complete(&self, ids: Vec<i64>) -> Result<()> {
        let client = self.client().await?;
        let run = async {
            let st = client.prepare_cached(&self.sql.complete).await?;
            client.execute(&st, &[&ids]).await.map(drop)
        };
        run.await.map_err(|e| storage("complete outbox rows", e))
    }

    async fn outbox_failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()> {
        let newest = ids.iter().copied().max().unwrap_or(0);
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            // A row's key never changes: read them first, then lock them all.
            let st = tx.prepare_cached(&self.sql.keys_of).await?;
            let keys: Vec<String> = tx
                .query(&st, &[&ids])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, Pg>>()?;
            let locks: Vec<String> = keys.iter().map(|k| self.sql.key_lock(k)).collect();
            lock(&tx, &locks).await?;
            let st = tx.prepare_cached(&self.sql.failed).await?;
            tx.execute(&st, &[&ids, &to_i64(next_attempt), &error, &dead])
                .await?;
            if dead {
                // A dead letter with a newer row of its key is superseded from the start (I4);
                // the entries of the keys go, unless a newer write is pending (I1).
                let st = tx.prepare_cached(&self.sql.supersede_newer).await?;
                tx.execute(&st, &[&ids]).await?;
                let st = tx
                    .prepare_cached(&self.sql.remove_many_unless_pending)
                    .await?;
                tx.execute(&st, &[&keys, &newest]).await?;
                // The keys read as the source's value now: the fleet drops its copies.
                let st = tx.prepare_cached(&self.sql.publish).await?;
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                self.publish(&tx, &st, &keys).await?;
            }
            tx.commit().await
        };
        run.await
            .map_err(|e| storage("record a failed delivery", e))
    }

    async fn dead_letters(&self) -> Result<Vec<OutboxRow>> {
        let client = self.client().await?;
        let run = async {
            let st = client.prepare_cached(&self.sql.dead).await?;
            client
                .query(&st, &[])
                .await?
                .iter()
                .map(row_to_outbox)
                .collect::<Result<Vec<_>, Pg>>()
        };
        run.await.map_err(|e| storage("read the dead letters", e))
    }

    async fn resolve_dead_letter(&self, id: i64, retry: bool) -> Result<Resolved> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            // The key's lock first, as every write of the key takes it (then the row's): this
            // orders the change against a write superseding it, without a lock-order deadlock.
            let st = tx.prepare_cached(&self.sql.dead_key).await?;
            let Some(key) = tx.query_opt(&st, &[&id]).await? else {
                return Ok(Resolved::Missing);
            };
            let key: String = key.try_get(0)?;
            lock(&tx, &[self.sql.key_lock(&key)]).await?;
            let st = tx.prepare_cached(&self.sql.dead_for_update).await?;
            let row = tx.query_opt(&st, &[&id]).await?;
            let sql = match row {
                None => return Ok(Resolved::Missing),
                Some(r) if retry && r.try_get::<_, bool>(1)? => {
                    return Ok(Resolved::Superseded(r.try_get(0)?));
                }
                Some(_) if retry => {
                    // Pending again: the key's entry (the source's answer, cached while the
                    // write was dead) goes with it.
                    let st = tx.prepare_cached(&self.sql.remove).await?;
                    tx.execute(&st, &[&key]).await?;
                    // The key reads as the pending write again: the fleet drops its copies.
                    let st = tx.prepare_cached(&self.sql.publish).await?;
                    self.publish(&tx, &st, &[key.as_str()]).await?;
                    &self.sql.retry_dead
                }
                Some(_) => &self.sql.discard_dead,
            };
            let st = tx.prepare_cached(sql).await?;
            tx.execute(&st, &[&id]).await?;
            tx.commit().await.map(|()| Resolved::Done)
        };
        run.await.map_err(|e| storage("resolve a dead letter", e))
    }

    async fn supersede_dead(&self, key: &str) -> Result<()> {
        let client = self.client().await?;
        let run = async {
            let st = client.prepare_cached(&self.sql.supersede_key).await?;
            client.execute(&st, &[&key]).await.map(drop)
        };
        run.await.map_err(|e| storage("supersede dead letters", e))
    }
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn load_meta(&self, name: &str) -> Result<Option<String>> {
        let client = self.client().await?;
        let run = async {
            let st = client.prepare_cached(&self.sql.load_meta).await?;
            match client.query_opt(&st, &[&name]).await? {
                Some(r) => r.try_get(0).map(Some),
                None => Ok(None),
            }
        };
        run.await.map_err(|e| storage("read a meta value", e))
    }

    async fn update_meta(&self, name: &str, update: MetaUpdate) -> Result<Option<String>> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            lock(&tx, &[self.sql.meta_lock(name)]).await?;
            let st = tx.prepare_cached(&self.sql.load_meta).await?;
            let old: Option<String> = match tx.query_opt(&st, &[&name]).await? {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            };
            let new = update(old);
            match &new {
                Some(v) => {
                    let st = tx.prepare_cached(&self.sql.upsert_meta).await?;
                    tx.execute(&st, &[&name, v]).await?;
                }
                None => {
                    let st = tx.prepare_cached(&self.sql.delete_meta).await?;
                    tx.execute(&st, &[&name]).await?;
                }
            }
            tx.commit().await.map(|()| new)
        };
        run.await.map_err(|e| storage("update a meta value", e))
    }
}
