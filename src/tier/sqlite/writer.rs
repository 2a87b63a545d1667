//! The writer thread: it owns the write connection and commits every job queued since its last
//! commit in one transaction (group commit), with the reads' last-access times riding along, and
//! evicts down to the byte bound.

use std::sync::{mpsc, Arc, Mutex};

use rusqlite::{params, Connection, TransactionBehavior};
use tokio::sync::oneshot;

use super::open::FileWatch;
use super::{to_i64, to_u64, SqliteTier};
use crate::error::{Error, Result};

type Completion = Box<dyn FnOnce(Result<()>) + Send>;
/// A write: run inside the batch's transaction (`Some`), or told the batch could not begin (`None`).
type Job = Box<dyn FnOnce(Option<(&Connection, &mut WriterState)>) -> Completion + Send>;

/// Reads' last-access times, waiting for the writer's next transaction. Kept beside the
/// channel, not sent through it: a read must not wake the writer thread (a system call on the
/// reader's side, a context switch on the writer's) for a hint.
pub(super) type Touches = Arc<Mutex<Vec<(String, u64)>>>;

pub(super) enum Msg {
    Job(Job),
}

/// State only the writer thread touches.
pub(super) struct WriterState {
    /// The SQLite error of the last job that failed (names the cause when SQLite rolls a whole
    /// batch back).
    pub(super) last_failure: Option<rusqlite::ffi::Error>,
    pub(super) now_hint: u64,
    pub(super) total_bytes: u64,
    pub(super) max_bytes: u64,
    /// The database file, checked before each commit (`None`: a memory database).
    pub(super) file: Option<FileWatch>,
    /// Whether the outbox holds dead letters (`None`: not known; asked when needed). Every
    /// write-behind write marks its key's dead letters superseded; with none, that statement is
    /// skipped. Forgotten whenever another connection (process) committed: `data_version`.
    pub(super) has_dead_letters: Option<bool>,
    /// `PRAGMA data_version` as this connection last saw it.
    pub(super) data_version: i64,
}

impl WriterState {
    /// Whether the outbox may hold dead letters (asked of the database when not known).
    pub(super) fn has_dead_letters(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        if let Some(known) = self.has_dead_letters {
            return Ok(known);
        }
        let any: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM outbox WHERE dead = 1)")?
            .query_row([], |r| r.get(0))?;
        self.has_dead_letters = Some(any);
        Ok(any)
    }
}

impl SqliteTier {
    /// Runs `f`, which makes at most one change (one modifying statement: SQLite undoes a
    /// failed statement by itself), in the writer thread's next transaction, and waits for the
    /// commit.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut WriterState) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_job(false, f).await
    }

    /// [`write`](Self::write) for a job of several changes: they are undone together if one
    /// fails (a savepoint), leaving the rest of the batch alone.
    pub(super) async fn write_atomic<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut WriterState) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_job(true, f).await
    }

    async fn write_job<T: Send + 'static>(
        &self,
        savepoint: bool,
        f: impl FnOnce(&Connection, &mut WriterState) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |ctx| {
            let out = ctx.map(|(conn, state)| {
                let out = if savepoint {
                    run_in_savepoint(conn, |c| f(c, &mut *state))
                } else {
                    f(conn, &mut *state)
                };
                if let Err(rusqlite::Error::SqliteFailure(e, _)) = &out {
                    state.last_failure = Some(*e);
                }
                out
            });
            Box::new(move |commit: Result<()>| {
                let result = match (commit, out) {
                    (Ok(()), Some(Ok(v))) => Ok(v),
                    (Err(e), _) => Err(e),
                    (Ok(()), Some(Err(e))) => Err(Error::storage("write", e)),
                    (Ok(()), None) => Err(Error::Closed),
                };
                let _ = tx.send(result);
            })
        });
        self.send(Msg::Job(job))?;
        rx.await.map_err(|_| Error::Closed)?
    }

    fn send(&self, msg: Msg) -> Result<()> {
        self.writer.send(msg).map_err(|_| Error::Closed)
    }
}

fn run_in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    match f(conn) {
        Ok(v) => {
            conn.prepare_cached("RELEASE job")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

const MAX_BATCH: usize = 1024;
/// Last-access updates kept waiting for a write; past this, later reads are not recorded.
pub(super) const MAX_TOUCHES: usize = 16 * 1024;
/// Last-access updates applied with one commit, at most.
const TOUCHES_PER_COMMIT: usize = 1024;

pub(super) fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Msg>,
    shared_touches: Touches,
    mut state: WriterState,
) {
    while let Ok(Msg::Job(first)) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(j)) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Reads' last-access times are a hint for eviction: they ride along with the next
        // write and never commit on their own (a commit makes every read connection drop its
        // page cache, so a read-only workload must not cause one).
        // At most `TOUCHES_PER_COMMIT` of them per commit, oldest first, so that the write
        // after a long read-only stretch does not wait for thousands of updates.
        let mut touches = {
            let mut shared = shared_touches.lock().unwrap_or_else(|e| e.into_inner());
            if shared.len() > TOUCHES_PER_COMMIT {
                let rest = shared.split_off(TOUCHES_PER_COMMIT);
                std::mem::replace(&mut *shared, rest)
            } else {
                std::mem::take(&mut *shared)
            }
        };
        let completions = commit_batch(&mut conn, jobs, &mut touches, &mut state);
        for (done, result) in completions {
            done(result);
        }
    }
    tracing::debug!("sqlite writer stopped");
}

fn commit_batch(
    conn: &mut Connection,
    jobs: Vec<Job>,
    touches: &mut Vec<(String, u64)>,
    state: &mut WriterState,
) -> Vec<(Completion, Result<()>)> {
    // Nothing is committed to a file no longer at its path: the writes would be lost.
    if let Some(Err(err)) = state.file.as_ref().map(FileWatch::check) {
        touches.clear();
        return jobs
            .into_iter()
            .map(|job| (job(None), Err(err.clone())))
            .collect();
    }
    let bytes_before = state.total_bytes;
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let err = Error::storage("begin a transaction", e);
            return jobs
                .into_iter()
                .map(|job| (job(None), Err(err.clone())))
                .collect();
        }
    };
    // Another connection committed since this one last looked: what it knows of the outbox may
    // be stale (the write lock is held from here to the commit, so this holds for the batch).
    match tx.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0)) {
        Ok(v) if v == state.data_version => {}
        Ok(v) => {
            state.data_version = v;
            state.has_dead_letters = None;
        }
        Err(_) => state.has_dead_letters = None,
    }
    let mut completions: Vec<Completion> = Vec::with_capacity(jobs.len());
    let mut aborted = false;
    for job in jobs {
        if aborted {
            completions.push(job(None));
            continue;
        }
        completions.push(job(Some((&tx, &mut *state))));
        // Some errors (a full disk, I/O) make SQLite roll the whole transaction back: the jobs
        // after it must not run in autocommit mode, and none of the batch is committed.
        aborted = tx.is_autocommit();
    }
    if aborted {
        state.total_bytes = bytes_before;
        state.has_dead_letters = None;
        touches.clear();
        let cause = state.last_failure.take();
        let err = Error::Storage {
            message: format!(
                "SQLite rolled the transaction back: {}",
                cause.map_or_else(|| "unknown error".to_owned(), |e| e.to_string())
            ),
            source: cause.map(|e| {
                Arc::new(rusqlite::Error::SqliteFailure(e, None)) as crate::error::BoxError
            }),
        };
        return completions
            .into_iter()
            .map(|c| (c, Err(err.clone())))
            .collect();
    }
    if !touches.is_empty() {
        if let Ok(mut stmt) = tx.prepare_cached(
            "UPDATE entries SET last_access = ?2 WHERE key = ?1 AND last_access < ?2",
        ) {
            for (key, at) in touches.drain(..) {
                let _ = stmt.execute(params![key, to_i64(at)]);
                state.now_hint = state.now_hint.max(at);
            }
        }
        touches.clear();
    }
    if state.total_bytes > state.max_bytes {
        if let Err(e) = evict(&tx, state) {
            tracing::warn!(error = %e, "L2 eviction failed");
        }
    }
    let result = tx.commit().map_err(|e| Error::storage("commit", e));
    if result.is_err() {
        state.total_bytes = bytes_before;
    }
    completions
        .into_iter()
        .map(|c| (c, result.clone()))
        .collect()
}

/// Brings the bytes held under the bound: expired entries first, then the least recently used.
fn evict(conn: &Connection, state: &mut WriterState) -> rusqlite::Result<()> {
    let target = state.max_bytes - state.max_bytes / 10;
    let freed: f64 = conn.query_row(
        "SELECT total(size) FROM entries WHERE stale_until <= ?1",
        [to_i64(state.now_hint)],
        |r| r.get(0),
    )?;
    conn.execute(
        "DELETE FROM entries WHERE stale_until <= ?1",
        [to_i64(state.now_hint)],
    )?;
    state.total_bytes = state.total_bytes.saturating_sub(freed as u64);
    if state.total_bytes > target {
        // The least recently used entries whose sizes, added up in that order, first cover the
        // excess: one statement, no over-eviction.
        let excess = to_i64(state.total_bytes - target);
        let mut stmt = conn.prepare_cached(
            "DELETE FROM entries WHERE key IN (
               SELECT key FROM (
                 SELECT key, size, sum(size) OVER (ORDER BY last_access, key) AS running
                 FROM entries)
               WHERE running - size < ?1)
             RETURNING size",
        )?;
        let freed: i64 = stmt
            .query_map([excess], |r| r.get::<_, i64>(0))?
            .sum::<rusqlite::Result<i64>>()?;
        state.total_bytes = state.total_bytes.saturating_sub(to_u64(freed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::tier::sqlite::{Location, OnCorrupt, SqliteOptions, Synchronous};
    use crate::tier::{EntryStore, StoredEntry};

    fn memory_tier() -> SqliteTier {
        SqliteTier::open(SqliteOptions {
            location: Location::Memory,
            max_bytes: 1 << 30,
            synchronous: Synchronous::default(),
            on_corrupt: OnCorrupt::default(),
            readers: 1,
            busy_timeout: Duration::from_secs(1),
            pragmas: Vec::new(),
        })
        .expect("a memory database")
    }

    fn last_access(tier: &SqliteTier, key: &str) -> i64 {
        tier.read(|c| {
            c.query_row(
                "SELECT last_access FROM entries WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
        })
        .expect("the entry")
    }

    #[tokio::test]
    async fn a_commit_applies_a_bounded_number_of_touches_oldest_first() -> Result<()> {
        let tier = memory_tier();
        let keys: Vec<String> = (0..TOUCHES_PER_COMMIT + 10)
            .map(|i| format!("k{i}"))
            .collect();
        for k in &keys {
            tier.put(
                k,
                StoredEntry::new(Some(Bytes::from_static(b"v")), None, 1, 2, 3),
            )
            .await?;
        }
        for k in &keys {
            tier.touch(k, 50);
        }
        // The next write carries the first `TOUCHES_PER_COMMIT`; the rest wait for the one after.
        tier.put("other", StoredEntry::new(None, None, 1, 2, 2))
            .await?;
        assert_eq!(last_access(&tier, &keys[0]), 50);
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT - 1]), 50);
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT]), 1);
        tier.put("other", StoredEntry::new(None, None, 1, 2, 2))
            .await?;
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT + 9]), 50);
        Ok(())
    }
}
