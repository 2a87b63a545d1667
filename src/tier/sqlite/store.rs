//! Reads, on the caller's thread over the pool of read connections, and the write jobs of the
//! tier's implementation of the storage traits ([`EntryStore`], [`OutboxStore`], [`StateStore`]:
//! the entries, the outbox, the meta table).

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::changes::{
    self, delete_outbox, insert_outbox, outbox_moved, put_entry, remove_entry, OutboxRemoval,
};
use super::writer::{WriterState, MAX_TOUCHES};
use super::{storage, to_i64, to_u64, Readers, SqliteTier};
use crate::error::{Error, Result};
use crate::tier::{
    EntrySink, EntryStore, FillGuard, Found, Merged, MetaUpdate, Observed, OutboxOp, OutboxRow,
    OutboxStore, Resolved, StateStore, StoreSummary, StoredEntry,
};

impl Readers {
    /// Runs `f` on a free read connection (on this thread).
    /// The first free connection is taken, so a lone reader always uses the first (its page
    /// cache stays warm) and concurrent readers spread over the others.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        for reader in &self.conns {
            if let Ok(conn) = reader.try_lock() {
                return f(&conn);
            }
        }
        let pick = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let conn = self.conns[pick].lock().unwrap_or_else(|e| e.into_inner());
        f(&conn)
    }
}

impl SqliteTier {
    /// Runs `f` on a free read connection, on this thread: for point reads and reads bounded
    /// by their keys (an `mget`'s batch), where a hand-off to another thread would cost more
    /// than the read.
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.readers.read(f)
    }

    /// Runs `f` on a free read connection on tokio's blocking pool: for reads whose size the
    /// caller does not bound by keys (a delivery round's rows and their values, the dead
    /// letters, the failing rows), which would otherwise hold up an async worker that callers
    /// share. On this thread when there is no runtime to hand it to.
    async fn read_blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.readers.read(f).map_err(storage(what));
        }
        let readers = Arc::clone(&self.readers);
        match tokio::task::spawn_blocking(move || readers.read(f)).await {
            Ok(read) => read.map_err(storage(what)),
            Err(e) => Err(Error::stopped(&format!("{what}: its blocking task"))(e)),
        }
    }

    /// One entry, read on this thread (reads never wait on the writer: WAL).
    fn read_entry(&self, key: &str) -> Result<Option<StoredEntry>> {
        self.read_statements.fetch_add(1, Ordering::Relaxed);
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT value, validator, stored_at, fresh_until, stale_until FROM entries WHERE key = ?1",
            )?
            .query_row([key], |r| row_to_entry(r, 0))
            .optional()
        })
        .map_err(storage("read an entry"))
    }
}

fn row_to_entry(r: &rusqlite::Row<'_>, offset: usize) -> rusqlite::Result<StoredEntry> {
    let value: Option<Vec<u8>> = r.get(offset)?;
    Ok(StoredEntry::new(
        value.map(Bytes::from),
        r.get(offset + 1)?,
        to_u64(r.get(offset + 2)?),
        to_u64(r.get(offset + 3)?),
        to_u64(r.get(offset + 4)?),
    ))
}

/// Whether a fill may replace `key`'s row: no write began since it started, and the row is the
/// one it observed (another process's write changes it).
fn fill_allowed(conn: &Connection, key: &str, guard: &FillGuard) -> rusqlite::Result<bool> {
    if !guard.still_valid() {
        return Ok(false);
    }
    if guard.observed() == Observed::Unknown {
        return Ok(true);
    }
    let held: Option<i64> = conn
        .prepare_cached("SELECT stored_at FROM entries WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(guard.allows(held.map(to_u64)))
}

/// Removes `key`'s entry unless a write of it newer than `settled_id` is pending.
fn remove_unless_pending(
    conn: &Connection,
    state: &mut WriterState,
    key: &str,
    settled_id: i64,
) -> rusqlite::Result<()> {
    let newer: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE key = ?1 AND dead = 0 AND id > ?2)",
        )?
        .query_row(params![key, settled_id], |r| r.get(0))?;
    if newer {
        return Ok(());
    }
    remove_entry(conn, state, key)
}

fn row_to_outbox(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
    let op: String = r.get(2)?;
    let value: Option<Vec<u8>> = r.get(3)?;
    let op = match (op.as_str(), value) {
        ("put", Some(v)) => OutboxOp::Put(Bytes::from(v)),
        ("put", None) => OutboxOp::Put(Bytes::new()),
        _ => OutboxOp::Delete,
    };
    Ok(OutboxRow {
        id: r.get(0)?,
        key: r.get(1)?,
        op,
        created_at: to_u64(r.get(4)?),
        attempts: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX),
        next_attempt: to_u64(r.get(6)?),
        last_error: r.get(7)?,
        dead: r.get::<_, i64>(8)? != 0,
        superseded: r.get::<_, i64>(9)? != 0,
    })
}

/// Bytes a write adds to the outbox besides its key.
fn op_len(op: &OutboxOp) -> usize {
    match op {
        OutboxOp::Put(v) => v.len(),
        OutboxOp::Delete => 0,
    }
}

const OUTBOX_COLUMNS: &str =
    "id, key, op, value, created_at, attempts, next_attempt, last_error, dead, superseded";

#[async_trait]
impl EntryStore for SqliteTier {
    async fn get(&self, key: &str) -> Result<Option<StoredEntry>> {
        self.read_entry(key)
    }

    fn get_now(&self, key: &str) -> Option<Result<Option<StoredEntry>>> {
        Some(self.read_entry(key))
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Found> {
        if keys.is_empty() {
            return Ok(Found::default());
        }
        self.read_statements.fetch_add(1, Ordering::Relaxed);
        // One statement for the whole batch: the keys travel as one array parameter, so there
        // is no parameter limit to chunk around. The entries and the newest pending outbox row
        // of each key come back together (`kind` 0: entry, 1: pending put, 2: pending delete).
        // With no pending row at all (the counters say so, read in the same snapshot: one read
        // transaction), the outbox half is left out: a tenth of a batch read's cost. The
        // entries are found by walking the array and seeking each key (`CROSS JOIN` keeps the
        // array outside; the keys are distinct): `key IN rarray(..)` built a temporary index of
        // the keys first.
        let array: Rc<Vec<Value>> =
            Rc::new(keys.iter().map(|k| Value::from((*k).to_owned())).collect());
        self.read(|conn| {
            let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Deferred)?;
            let pending: i64 = tx
                .prepare_cached("SELECT pending FROM counters WHERE id = 1")?
                .query_row([], |r| r.get(0))?;
            let mut stmt = tx.prepare_cached(if pending > 0 {
                "SELECT e.key, e.value, e.validator, e.stored_at, e.fresh_until, e.stale_until, 0
                 FROM rarray(?1) AS r CROSS JOIN entries AS e ON e.key = r.value
                 UNION ALL
                 SELECT key, value, NULL, 0, 0, 0, CASE op WHEN 'put' THEN 1 ELSE 2 END
                 FROM outbox WHERE id IN (
                   SELECT max(id) FROM outbox WHERE key IN rarray(?1) AND dead = 0 GROUP BY key)"
            } else {
                "SELECT e.key, e.value, e.validator, e.stored_at, e.fresh_until, e.stale_until, 0
                 FROM rarray(?1) AS r CROSS JOIN entries AS e ON e.key = r.value"
            })?;
            let mut rows = stmt.query([array])?;
            let mut found = Found::default();
            while let Some(r) = rows.next()? {
                let key: String = r.get(0)?;
                match r.get::<_, i64>(6)? {
                    0 => found.entries.push((key, row_to_entry(r, 1)?)),
                    1 => {
                        let v: Option<Vec<u8>> = r.get(1)?;
                        let op = OutboxOp::Put(v.map(Bytes::from).unwrap_or_default());
                        found.pending.push((key, op));
                    }
                    _ => found.pending.push((key, OutboxOp::Delete)),
                }
            }
            drop(rows);
            drop(stmt);
            tx.commit()?;
            Ok(found)
        })
        .map_err(storage("read a batch of entries"))
    }

    async fn put(&self, key: &str, entry: StoredEntry) -> Result<()> {
        let key = key.to_owned();
        self.write(move |conn, state| put_entry(conn, state, &key, &entry))
            .await
    }

    async fn put_fill(&self, key: &str, entry: StoredEntry, guard: FillGuard) -> Result<bool> {
        let key = key.to_owned();
        self.write(move |conn, state| {
            if !fill_allowed(conn, &key, &guard)? {
                return Ok(false);
            }
            put_entry(conn, state, &key, &entry).map(|()| true)
        })
        .await
    }

    async fn renew_fill(
        &self,
        key: &str,
        (stored_at, fresh_until, stale_until): (u64, u64, u64),
        guard: FillGuard,
    ) -> Result<bool> {
        let key = key.to_owned();
        self.write(move |conn, _| {
            if !fill_allowed(conn, &key, &guard)? {
                return Ok(false);
            }
            changes::renew_entry(conn, &key, (stored_at, fresh_until, stale_until))
        })
        .await
    }

    async fn remove_settled(&self, key: &str, settled_id: i64) -> Result<()> {
        let key = key.to_owned();
        self.write(move |conn, state| remove_unless_pending(conn, state, &key, settled_id))
            .await
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let key = key.to_owned();
        self.write(move |conn, state| remove_entry(conn, state, &key))
            .await
    }

    fn touch(&self, key: &str, now: u64) {
        let mut touches = self.touches.lock().unwrap_or_else(|e| e.into_inner());
        if touches.len() < MAX_TOUCHES {
            touches.push((key.to_owned(), now));
        }
    }

    async fn summary(&self, now: u64) -> Result<StoreSummary> {
        self.read(|conn| {
            let mut s = conn
                .prepare_cached(
                    "SELECT entries, bytes, negative, pending, dead, outbox_bytes
                     FROM counters WHERE id = 1",
                )?
                .query_row([], |r| {
                    Ok(StoreSummary {
                        entries: to_u64(r.get(0)?),
                        bytes: to_u64(r.get(1)?),
                        negative_entries: to_u64(r.get(2)?),
                        outbox_depth: to_u64(r.get(3)?),
                        dead_letters: to_u64(r.get(4)?),
                        outbox_bytes: to_u64(r.get(5)?),
                        ..StoreSummary::default()
                    })
                })?;
            // The stale range of an index (never the values): empty when everything is fresh.
            s.stale_entries = conn
                .prepare_cached("SELECT count(*) FROM entries WHERE fresh_until <= ?1")?
                .query_row([to_i64(now)], |r| r.get::<_, i64>(0))
                .map(to_u64)?;
            // The first pending row by id is the oldest write (dead letters ahead of it are
            // skipped: as many as there are).
            if s.outbox_depth > 0 {
                s.oldest_pending_ms = conn
                    .prepare_cached(
                        "SELECT created_at FROM outbox WHERE dead = 0 ORDER BY id LIMIT 1",
                    )?
                    .query_row([], |r| r.get::<_, i64>(0))
                    .optional()?
                    .map(to_u64);
            }
            Ok(s)
        })
        .map_err(storage("summarize the database"))
    }

    // Offline bundles: see `bundle`.
    async fn snapshot(&self, prefix: &str, sink: EntrySink) -> Result<()> {
        self.snapshot_entries(prefix, sink).await
    }

    async fn merge(&self, entries: Vec<(String, StoredEntry)>) -> Result<Vec<Merged>> {
        self.merge_entries(entries).await
    }
}

#[async_trait]
impl OutboxStore for SqliteTier {
    async fn enqueue(
        &self,
        key: &str,
        entry: Option<StoredEntry>,
        op: OutboxOp,
        now: u64,
    ) -> Result<i64> {
        let key = key.to_owned();
        let needed = (key.len() + op_len(&op)) as u64;
        let outcome = self
            .write(move |conn, state| {
                // The outbox's bound, checked in the transaction that would pass it: refused, the
                // write changes nothing.
                let held = to_u64(changes::current(conn, state)?.outbox_bytes);
                let limit = state.outbox_max_bytes;
                if held.saturating_add(needed) > limit {
                    return Ok(Err(Error::OutboxFull {
                        key,
                        needed,
                        held,
                        limit,
                    }));
                }
                match &entry {
                    Some(e) => put_entry(conn, state, &key, e)?,
                    None => remove_entry(conn, state, &key)?,
                }
                let value = match &op {
                    OutboxOp::Put(v) => Some(v.as_ref()),
                    OutboxOp::Delete => None,
                };
                // A newer write: the key's dead letters may no longer be retried (I4). (Skipped
                // when the outbox holds none, as the writer knows: see `WriterState`.)
                if state.has_dead_letters(conn)? {
                    conn.prepare_cached(
                        "UPDATE outbox SET superseded = 1 WHERE key = ?1 AND dead = 1",
                    )?
                    .execute([&key])?;
                }
                insert_outbox(conn, state, &key, op.name(), value, now).map(Ok)
            })
            .await?;
        outcome
    }

    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_blocking("read the outbox", move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE dead = 0 ORDER BY id LIMIT ?1"
            ))?;
            let rows = stmt.query_map([limit], row_to_outbox)?;
            rows.collect()
        })
        .await
    }

    async fn outbox_newest(&self, key: &str) -> Result<Option<OutboxOp>> {
        self.read_statements.fetch_add(1, Ordering::Relaxed);
        self.read(|conn| {
            let newest: Option<(String, Option<Vec<u8>>)> = conn
                .prepare_cached(
                    "SELECT op, value FROM outbox WHERE key = ?1 AND dead = 0
                     ORDER BY id DESC LIMIT 1",
                )?
                .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(newest.map(|(op, value)| match (op.as_str(), value) {
                ("put", v) => OutboxOp::Put(v.map(Bytes::from).unwrap_or_default()),
                _ => OutboxOp::Delete,
            }))
        })
        .map_err(storage("read the outbox"))
    }

    async fn outbox_summary(&self) -> Result<(u64, Vec<(String, String)>)> {
        self.read_blocking("read the outbox", |conn| {
            let pending: i64 = conn
                .prepare_cached("SELECT pending FROM counters WHERE id = 1")?
                .query_row([], |r| r.get(0))?;
            // Only the rows with an error (`outbox_failing`): none while deliveries succeed.
            let mut stmt = conn.prepare_cached(
                "SELECT key, last_error FROM outbox INDEXED BY outbox_failing
                 WHERE dead = 0 AND last_error IS NOT NULL ORDER BY id",
            )?;
            let mut rows = stmt.query([])?;
            let (mut stuck, mut seen) = (Vec::new(), std::collections::HashSet::new());
            while let Some(r) = rows.next()? {
                let key: String = r.get(0)?;
                if !seen.contains(&key) {
                    seen.insert(key.clone());
                    stuck.push((key, r.get(1)?));
                }
            }
            Ok((to_u64(pending), stuck))
        })
        .await
    }

    async fn outbox_complete(&self, mut ids: Vec<i64>) -> Result<()> {
        // Distinct: the removal counts the rows it deletes by walking the ids.
        ids.sort_unstable();
        ids.dedup();
        self.write(move |conn, state| {
            // One statement for the batch; the array (an `Rc`) is built on the writer thread.
            let ids: Rc<Vec<Value>> = Rc::new(ids.into_iter().map(Value::from).collect());
            delete_outbox(conn, state, OutboxRemoval::Delivered, &ids).map(drop)
        })
        .await
    }

    async fn outbox_failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()> {
        self.write(move |conn, state| {
            let newest = ids.iter().copied().max().unwrap_or(0);
            let ids: Rc<Vec<Value>> = Rc::new(ids.into_iter().map(Value::from).collect());
            let n = conn
                .prepare_cached(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt = ?2, last_error = ?3, dead = ?4
                     WHERE id IN rarray(?1) AND dead = 0",
                )?
                .execute(params![ids.clone(), to_i64(next_attempt), error, dead as i64])?;
            if dead {
                outbox_moved(state, n, true);
                // A dead letter with a newer row of its key (the group's older rows, coalesced
                // into the refused newest one; or a write that arrived during the attempt) is
                // superseded from the start: never to be retried over the newer write (I4).
                conn.prepare_cached(
                    "UPDATE outbox SET superseded = 1
                     WHERE id IN rarray(?1) AND dead = 1
                       AND EXISTS (SELECT 1 FROM outbox AS o WHERE o.key = outbox.key AND o.id > outbox.id)",
                )?
                .execute([ids.clone()])?;
                let keys: Vec<String> = conn
                    .prepare_cached("SELECT DISTINCT key FROM outbox WHERE id IN rarray(?1)")?
                    .query_map([ids], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                for key in keys {
                    remove_unless_pending(conn, state, &key, newest)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn dead_letters(&self) -> Result<Vec<OutboxRow>> {
        self.read_blocking("read the dead letters", |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE dead = 1 ORDER BY id"
            ))?;
            let rows = stmt.query_map([], row_to_outbox)?;
            rows.collect()
        })
        .await
    }

    async fn resolve_dead_letter(&self, id: i64, retry: bool) -> Result<Resolved> {
        self.write(move |conn, state| {
            let row: Option<(String, bool)> = conn
                .prepare_cached("SELECT key, superseded FROM outbox WHERE id = ?1 AND dead = 1")?
                .query_row([id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))
                .optional()?;
            match row {
                None => return Ok(Resolved::Missing),
                Some((key, true)) if retry => return Ok(Resolved::Superseded(key)),
                Some((key, false)) if retry => {
                    // Pending again: what was cached while it was dead (the source's answer)
                    // must not be served over it (I1). Reads find the row, then the source.
                    remove_entry(conn, state, &key)?;
                    let n = conn
                        .prepare_cached(
                            "UPDATE outbox SET dead = 0, attempts = 0, next_attempt = 0
                             WHERE id = ?1 AND dead = 1",
                        )?
                        .execute([id])?;
                    outbox_moved(state, n, false);
                }
                Some(_) => {
                    delete_outbox(conn, state, OutboxRemoval::DeadLetter, &id)?;
                }
            }
            Ok(Resolved::Done)
        })
        .await
    }

    async fn supersede_dead(&self, key: &str) -> Result<()> {
        let key = key.to_owned();
        self.write(move |conn, state| {
            if !state.has_dead_letters(conn)? {
                return Ok(());
            }
            conn.prepare_cached("UPDATE outbox SET superseded = 1 WHERE key = ?1 AND dead = 1")?
                .execute([&key])
                .map(drop)
        })
        .await
    }
}

#[async_trait]
impl StateStore for SqliteTier {
    async fn load_meta(&self, name: &str) -> Result<Option<String>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
                .query_row([name], |r| r.get(0))
                .optional()
        })
        .map_err(storage("read a meta value"))
    }

    async fn update_meta(&self, name: &str, update: MetaUpdate) -> Result<Option<String>> {
        let name = name.to_owned();
        self.write(move |conn, _| {
            let old: Option<String> = conn
                .prepare_cached("SELECT value FROM meta WHERE name = ?1")?
                .query_row([&name], |r| r.get(0))
                .optional()?;
            let new = update(old);
            match &new {
                Some(v) => conn
                    .prepare_cached(
                        "INSERT INTO meta (name, value) VALUES (?1, ?2)
                         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    )?
                    .execute(params![name, v])?,
                None => conn
                    .prepare_cached("DELETE FROM meta WHERE name = ?1")?
                    .execute([&name])?,
            };
            Ok(new)
        })
        .await
    }
}
