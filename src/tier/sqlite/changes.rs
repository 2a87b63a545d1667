//! Every change the writer makes to `entries` and `outbox`, each with its bookkeeping: the
//! entry's `recency` row and the counters.
//!
//! Schema 4 has no triggers. A statement that fires a trigger makes SQLite open a statement
//! journal and copy every page before its first change: 40% of the writer's instructions went
//! there (callgrind, durable write-behind sets). SQLite runs `RETURNING` as a trigger too, so no
//! statement here uses it: what a change will remove or replace (the old row's size, whether it
//! was negative, the rowid of its recency row) is read first in the same transaction, then the
//! rows are changed by rowid (see [`put_entry`], [`remove_entries`], [`delete_outbox`]). The
//! change goes into [`WriterState::counts`] at once, and the commit writes the sum into the
//! `counters` row in the same transaction. A batch rolled back (by SQLite, or because a job
//! failed half done: see `SqliteTier::write`), or a failed commit, drops the sum. The counters
//! therefore move with exactly the statements that took effect, job by job, whatever fails.

use std::rc::Rc;

use std::path::Path;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::schema::SCANNED;
use super::writer::WriterState;
use super::{to_i64, to_u64};
use crate::error::{Error, Result};
use crate::tier::StoredEntry;

/// The `counters` row, for [`Counts::read`].
const ROW: &str =
    "SELECT entries, bytes, negative, pending, dead, outbox_bytes FROM counters WHERE id = 1";

/// Changes of the `counters` row made by the open transaction, not yet written to it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) entries: i64,
    pub(super) bytes: i64,
    pub(super) negative: i64,
    pub(super) pending: i64,
    pub(super) dead: i64,
    pub(super) outbox_bytes: i64,
}

impl Counts {
    /// Adds these changes to the `counters` row (nothing when there are none).
    pub(super) fn write(&self, conn: &Connection) -> rusqlite::Result<()> {
        if *self == Counts::default() {
            return Ok(());
        }
        conn.prepare_cached(
            "UPDATE counters SET entries = entries + ?1, bytes = bytes + ?2,
               negative = negative + ?3, pending = pending + ?4, dead = dead + ?5,
               outbox_bytes = outbox_bytes + ?6 WHERE id = 1",
        )?
        .execute(params![
            self.entries,
            self.bytes,
            self.negative,
            self.pending,
            self.dead,
            self.outbox_bytes
        ])?;
        Ok(())
    }

    /// The six counts `sql` selects, in the order of the fields.
    fn read(conn: &Connection, sql: &str) -> rusqlite::Result<Counts> {
        conn.prepare_cached(sql)?.query_row([], |r| {
            Ok(Counts {
                entries: r.get(0)?,
                bytes: r.get(1)?,
                negative: r.get(2)?,
                pending: r.get(3)?,
                dead: r.get(4)?,
                outbox_bytes: r.get(5)?,
            })
        })
    }

    /// These counts with `d` added.
    pub(super) fn plus(self, d: Counts) -> Counts {
        Counts {
            entries: self.entries + d.entries,
            bytes: self.bytes + d.bytes,
            negative: self.negative + d.negative,
            pending: self.pending + d.pending,
            dead: self.dead + d.dead,
            outbox_bytes: self.outbox_bytes + d.outbox_bytes,
        }
    }

    /// An entry of `size` bytes (negative: no value) came (`sign` 1) or went (-1).
    fn entry(&mut self, sign: i64, size: i64, negative: bool) {
        self.entries += sign;
        self.bytes += sign * size;
        self.negative += sign * i64::from(negative);
    }
}

/// Writes `key`'s entry (its last access: `stored_at`).
pub(super) fn put_entry(
    conn: &Connection,
    state: &mut WriterState,
    key: &str,
    e: &StoredEntry,
) -> rusqlite::Result<()> {
    let size = to_i64(e.size() as u64);
    let at = to_i64(e.stored_at);
    let held: Option<(i64, i64, bool)> = conn
        .prepare_cached("SELECT rowid, size, value IS NULL FROM entries WHERE key = ?1")?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let (value, validator) = (e.value.as_deref(), &e.validator);
    let (fresh, stale) = (to_i64(e.fresh_until), to_i64(e.stale_until));
    match held {
        Some((rowid, old_size, old_negative)) => {
            conn.prepare_cached(
                "UPDATE entries SET value = ?2, validator = ?3, stored_at = ?4, fresh_until = ?5,
                   stale_until = ?6, size = ?7, last_access = ?4 WHERE rowid = ?1",
            )?
            .execute(params![rowid, value, validator, at, fresh, stale, size])?;
            state.counts.entry(-1, old_size, old_negative);
            state.counts.entry(1, size, e.value.is_none());
            conn.prepare_cached("UPDATE recency SET at = ?2 WHERE id = ?1")?
                .execute([rowid, at])?;
        }
        None => {
            conn.prepare_cached(
                "INSERT INTO entries (key, value, validator, stored_at, fresh_until, stale_until, size, last_access)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?4)",
            )?
            .execute(params![key, value, validator, at, fresh, stale, size])?;
            state.counts.entry(1, size, e.value.is_none());
            conn.prepare_cached("INSERT OR REPLACE INTO recency (id, at) VALUES (?1, ?2)")?
                .execute([conn.last_insert_rowid(), at])?;
        }
    }
    state.now_hint = state.now_hint.max(e.stored_at);
    Ok(())
}

/// Renews `key`'s entry in place (a 304): its times change, and its last access. Whether it was
/// there.
pub(super) fn renew_entry(
    conn: &Connection,
    key: &str,
    (stored_at, fresh_until, stale_until): (u64, u64, u64),
) -> rusqlite::Result<bool> {
    // The rowid read first, not `RETURNING`ed (see `remove_entries`).
    let rowid: Option<i64> = conn
        .prepare_cached("SELECT rowid FROM entries WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    let Some(rowid) = rowid else {
        return Ok(false);
    };
    conn.prepare_cached(
        "UPDATE entries SET stored_at = ?2, fresh_until = ?3, stale_until = ?4, last_access = ?2
         WHERE rowid = ?1",
    )?
    .execute(params![
        rowid,
        to_i64(stored_at),
        to_i64(fresh_until),
        to_i64(stale_until)
    ])?;
    conn.prepare_cached("UPDATE recency SET at = ?2 WHERE id = ?1")?
        .execute([rowid, to_i64(stored_at)])?;
    Ok(true)
}

/// Removes `key`'s entry, if any.
pub(super) fn remove_entry(
    conn: &Connection,
    state: &mut WriterState,
    key: &str,
) -> rusqlite::Result<()> {
    remove_entries(
        conn,
        state,
        "SELECT rowid, size, value IS NULL FROM entries WHERE key = ?1",
        [key],
    )
    .map(drop)
}

/// Removes the entries `select` names (a `SELECT rowid, size, value IS NULL FROM entries …`)
/// with their recency rows. How many went.
///
/// Read first, then deleted by rowid: a `DELETE … RETURNING` would make SQLite run `RETURNING`
/// as a trigger, with a statement journal of every page the statement changes (see
/// [`delete_outbox`]).
pub(super) fn remove_entries(
    conn: &Connection,
    state: &mut WriterState,
    select: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    let mut ids = Vec::new();
    {
        let mut stmt = conn.prepare_cached(select)?;
        let mut rows = stmt.query(args)?;
        while let Some(r) = rows.next()? {
            ids.push(Value::from(r.get::<_, i64>(0)?));
            state.counts.entry(-1, r.get(1)?, r.get(2)?);
        }
    }
    let n = ids.len();
    match ids.as_slice() {
        [] => return Ok(0),
        [Value::Integer(id)] => {
            conn.prepare_cached("DELETE FROM entries WHERE rowid = ?1")?
                .execute([id])?;
            conn.prepare_cached("DELETE FROM recency WHERE id = ?1")?
                .execute([id])?;
        }
        _ => {
            let ids = Rc::new(ids);
            conn.prepare_cached("DELETE FROM entries WHERE rowid IN rarray(?1)")?
                .execute([ids.clone()])?;
            conn.prepare_cached("DELETE FROM recency WHERE id IN rarray(?1)")?
                .execute([ids])?;
        }
    }
    Ok(n)
}

/// Adds a pending write of `key` to the outbox (its value: `value`). Its id.
pub(super) fn insert_outbox(
    conn: &Connection,
    state: &mut WriterState,
    key: &str,
    op: &str,
    value: Option<&[u8]>,
    now: u64,
) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO outbox (key, op, value, created_at, next_attempt) VALUES (?1, ?2, ?3, ?4, 0)",
    )?
    .execute(params![key, op, value, to_i64(now)])?;
    state.counts.pending += 1;
    state.counts.outbox_bytes += to_i64((key.len() + value.map_or(0, <[u8]>::len)) as u64);
    Ok(conn.last_insert_rowid())
}

/// Which outbox rows [`delete_outbox`] removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutboxRemoval {
    /// The delivered rows of the ids in `?1` (an array).
    Delivered,
    /// The dead letter `?1`.
    DeadLetter,
}

impl OutboxRemoval {
    /// The rows' count and bytes, then their deletion: the same rows (one writer, one
    /// transaction).
    fn statements(self) -> (&'static str, &'static str) {
        match self {
            // The count walks the array and finds each row by id (`CROSS JOIN` keeps the array
            // outside): `id IN rarray(..)` would build a temporary index of the ids, as the
            // `DELETE` does, a second time. The ids are distinct (see `outbox_complete`), so
            // the join counts each row the `DELETE` removes once.
            Self::Delivered => (
                "SELECT count(*), coalesce(sum(length(CAST(o.key AS BLOB)) + coalesce(length(o.value), 0)), 0)
                 FROM rarray(?1) AS r CROSS JOIN outbox AS o ON o.id = r.value WHERE o.dead = 0",
                "DELETE FROM outbox WHERE id IN rarray(?1) AND dead = 0",
            ),
            Self::DeadLetter => (
                "SELECT count(*), coalesce(sum(length(CAST(key AS BLOB)) + coalesce(length(value), 0)), 0)
                 FROM outbox WHERE id = ?1 AND dead = 1",
                "DELETE FROM outbox WHERE id = ?1 AND dead = 1",
            ),
        }
    }
}

/// Deletes the outbox rows `which` names by `arg` and takes them off the counters. How many
/// rows went.
///
/// Their count and bytes are read first and a plain `DELETE` follows, not one `DELETE …
/// RETURNING`: SQLite runs `RETURNING` as a trigger, so the statement kept a statement journal
/// of every page it changed, as the triggers of schema 3 did: 1,600 more instructions on the
/// writer thread per durable write-behind set (callgrind; see the README's Performance
/// section).
pub(super) fn delete_outbox(
    conn: &Connection,
    state: &mut WriterState,
    which: OutboxRemoval,
    arg: &dyn rusqlite::ToSql,
) -> rusqlite::Result<usize> {
    let (sum, delete) = which.statements();
    let (n, bytes): (i64, i64) = conn
        .prepare_cached(sum)?
        .query_row([arg], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if n > 0 {
        conn.prepare_cached(delete)?.execute([arg])?;
    }
    match which {
        OutboxRemoval::Delivered => state.counts.pending -= n,
        OutboxRemoval::DeadLetter => state.counts.dead -= n,
    }
    state.counts.outbox_bytes -= bytes;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Rows moved between pending and dead: `n` rows became dead (`to_dead`) or pending again.
pub(super) fn outbox_moved(state: &mut WriterState, n: usize, to_dead: bool) {
    let n = to_i64(n as u64);
    let sign = if to_dead { 1 } else { -1 };
    state.counts.dead += sign * n;
    state.counts.pending -= sign * n;
}

/// The counters as the open transaction sees them: the row (read once, then known: see
/// [`WriterState::row`]) plus the changes not yet written.
pub(super) fn current(conn: &Connection, state: &mut WriterState) -> rusqlite::Result<Counts> {
    let row = match state.row {
        Some(row) => row,
        None => *state.row.insert(Counts::read(conn, ROW)?),
    };
    Ok(row.plus(state.counts))
}

/// Bytes L2 holds, entries and outbox, as the open transaction sees them.
pub(super) fn held_bytes(conn: &Connection, state: &mut WriterState) -> rusqlite::Result<u64> {
    current(conn, state).map(|c| to_u64(c.bytes.saturating_add(c.outbox_bytes)))
}

/// Compares the `counters` row with a scan of every row, in one read snapshot, on a connection
/// of its own (blocking: run it off the async threads). When they differ (a bug, or rows
/// written by raw statements), recounts under the write lock ([`RECOUNT`](super::RECOUNT), which
/// also restores missing recency rows) and returns the counts it found wrong, else `None`.
pub(super) fn verify(path: &Path, busy: Duration) -> Result<Option<String>> {
    let fail = |e| Error::storage("verify the counters", e);
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    conn.busy_timeout(busy).map_err(fail)?;
    let (kept, scanned) = {
        let tx = conn.transaction().map_err(fail)?;
        let kept = Counts::read(&tx, ROW).map_err(fail)?;
        (kept, Counts::read(&tx, SCANNED).map_err(fail)?)
    };
    if kept == scanned {
        return Ok(None);
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail)?;
    tx.execute_batch(super::RECOUNT).map_err(fail)?;
    tx.commit().map_err(fail)?;
    Ok(Some(format!("kept {kept:?}, counted {scanned:?}")))
}
