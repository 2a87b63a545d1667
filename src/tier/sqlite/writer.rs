//! The writer: one write connection, used by a dedicated thread that commits every job queued
//! since its last commit in one transaction (group commit), or by a lone writer on its own
//! thread (see [`Writer`]); it evicts towards the byte bound a bounded batch per commit, and
//! the thread applies the reads' last-access times once its queue is empty.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use rusqlite::{params, Connection, TransactionBehavior};
use tokio::sync::oneshot;

use super::changes::{self, remove_entries, Counts};
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
    /// A caller committed on its own thread (see [`Writer`]): the writer thread looks after the
    /// waiting last-access times as after a batch of its own.
    Nudge,
    /// Apply the waiting last-access times now (at most `TOUCHES_PER_COMMIT`), then answer.
    #[cfg_attr(not(test), allow(dead_code))]
    Touches(oneshot::Sender<()>),
}

/// State only the writer thread touches.
pub(super) struct WriterState {
    /// The SQLite error of the last job that failed (names the cause when SQLite rolls a whole
    /// batch back).
    pub(super) last_failure: Option<rusqlite::ffi::Error>,
    /// The latest time seen (of writes and reads): "now" for expiry in eviction.
    pub(super) now_hint: u64,
    /// L2's bound in bytes (entries and outbox).
    pub(super) max_bytes: u64,
    /// The outbox's bound in bytes.
    pub(super) outbox_max_bytes: u64,
    /// Past the bound and not yet back under 90% of it: each commit evicts a batch.
    pub(super) evicting: bool,
    /// The database file, checked before each commit (`None`: a memory database).
    pub(super) file: Option<FileWatch>,
    /// The `counters` row as last committed, when known (`None`: read it when needed).
    /// Forgotten whenever another connection (process) committed: `data_version`.
    pub(super) row: Option<Counts>,
    /// `PRAGMA data_version` as this connection last saw it.
    pub(super) data_version: i64,
    /// Asks the checkpointer thread for a checkpoint (`None`: a memory database).
    pub(super) checkpoints: Option<mpsc::SyncSender<()>>,
    /// Commits since the last checkpoint was asked for.
    pub(super) commits: u32,
    /// What the open transaction's statements changed of the counters, written with its commit
    /// (see `changes`).
    pub(super) counts: Counts,
    /// A job of the open batch failed after changing rows: the batch is rolled back.
    pub(super) part_done: bool,
}

/// Commits between two checkpoints asked of the checkpointer (each commit of a lone set adds a
/// handful of pages to the WAL).
const COMMITS_PER_CHECKPOINT: u32 = 64;

impl WriterState {
    /// Counts a commit; every `COMMITS_PER_CHECKPOINT`, asks the checkpointer for a checkpoint
    /// (without waiting: one already asked for and not yet begun covers this one).
    fn committed(&mut self) {
        self.commits += 1;
        if self.commits >= COMMITS_PER_CHECKPOINT {
            self.commits = 0;
            if let Some(tx) = &self.checkpoints {
                let _ = tx.try_send(());
            }
        }
    }
}

impl WriterState {
    /// Whether the outbox holds dead letters (every write-behind write marks its key's dead
    /// letters superseded; with none, that statement is skipped).
    pub(super) fn has_dead_letters(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        Ok(changes::current(conn, self)?.dead > 0)
    }
}

tokio::task_local! {
    /// Set for the cache's background work: see [`in_background`].
    static BACKGROUND: ();
}

/// Runs `f` (the cache's background work: deliveries, refreshes ahead) with every SQLite write
/// it makes committed by the writer thread, never on the task's own thread: a commit there
/// would hold up the callers' tasks sharing that worker thread, and nobody waits on the
/// background work's latency.
pub(crate) async fn in_background<F: std::future::Future>(f: F) -> F::Output {
    BACKGROUND.scope((), f).await
}

/// The write connection and the writer's state.
pub(super) struct Core {
    conn: Connection,
    state: WriterState,
}

/// The writer: the write connection (taken by the writer thread for each batch, or by a lone
/// caller), the channel to the thread, and the count of callers writing.
///
/// A write made while no other write is under way, with the connection free, commits on the
/// caller's thread: the thread's round trip (two wake-ups) was half of a lone write's time.
/// With other writes under way the job queues and the thread commits the queue together (group
/// commit): committing on callers' threads then measured 25-35% fewer durable write-behind
/// sets per second with 128 setters. Never under `synchronous=FULL` (a commit's fsync would
/// block the caller's thread), nor while eviction runs (a batch of deletes per commit), nor
/// for the cache's background work ([`in_background`]).
pub(super) struct Writer {
    sender: mpsc::Sender<Msg>,
    core: Arc<Mutex<Core>>,
    /// Callers inside [`SqliteTier::write`] (from its start to its answer), background work
    /// not counted.
    writing: AtomicUsize,
    /// A nudge is in the channel, not yet taken by the thread.
    nudged: Arc<AtomicBool>,
    inline: bool,
}

/// A caller inside [`SqliteTier::write`]: counted in [`Writer::writing`] while it lives.
struct Writing<'a>(&'a AtomicUsize);

impl<'a> Writing<'a> {
    fn enter(writing: &'a AtomicUsize) -> Self {
        writing.fetch_add(1, Ordering::AcqRel);
        Self(writing)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Writer {
    /// Starts the writer thread over `conn`.
    pub(super) fn spawn(
        conn: Connection,
        state: WriterState,
        touches: Touches,
        inline: bool,
    ) -> std::io::Result<Self> {
        let (sender, rx) = mpsc::channel();
        let core = Arc::new(Mutex::new(Core { conn, state }));
        let nudged = Arc::new(AtomicBool::new(false));
        let (thread_core, thread_nudged) = (core.clone(), nudged.clone());
        std::thread::Builder::new()
            .name("tiercache-sqlite-writer".into())
            .spawn(move || writer_loop(&thread_core, &rx, &touches, &thread_nudged))?;
        Ok(Self {
            sender,
            core,
            writing: AtomicUsize::new(0),
            nudged,
            inline,
        })
    }

    /// Commits `job` on this thread when no other write is under way and the connection is
    /// free; otherwise gives the job back.
    fn commit_here(&self, job: Job, touches: &Touches) -> Option<Job> {
        if !self.inline || self.writing.load(Ordering::Acquire) > 1 {
            return Some(job);
        }
        let Ok(mut core) = self.core.try_lock() else {
            return Some(job);
        };
        let Core { conn, state } = &mut *core;
        if state.evicting {
            return Some(job);
        }
        let completions = commit_batch(conn, vec![job], state);
        drop(core);
        for (done, result) in completions {
            done(result);
        }
        // One nudge waits in the channel at most: the thread takes the flag down when it
        // takes the nudge (each inline write would otherwise wake it).
        if !touches.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
            && !self.nudged.swap(true, Ordering::AcqRel)
        {
            let _ = self.sender.send(Msg::Nudge);
        }
        None
    }

    fn send(&self, msg: Msg) -> Result<()> {
        self.sender.send(msg).map_err(|_| Error::Closed)
    }
}

impl SqliteTier {
    /// Runs `f` in the writer thread's next transaction, and waits for the commit.
    ///
    /// A job is all or nothing without a savepoint of its own (a savepoint copies every page
    /// before its first change: a quarter of the writer's instructions): a job that fails
    /// having changed rows rolls its whole batch back, and every job of the batch is told;
    /// one that fails before changing anything fails alone (SQLite undid its failed statement).
    pub(super) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut WriterState) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |ctx| {
            let out = ctx.map(|(conn, state)| {
                let (changes, counts) = (conn.total_changes(), state.counts);
                let out = f(conn, &mut *state);
                if let Err(e) = &out {
                    if let rusqlite::Error::SqliteFailure(e, _) = e {
                        state.last_failure = Some(*e);
                    }
                    state.part_done |= conn.total_changes() != changes || state.counts != counts;
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
        // Background work is queued, and not counted as a caller writing (a caller's write
        // beside it still commits on its own thread when the connection is free).
        let background = BACKGROUND.try_with(|()| ()).is_ok();
        let _writing = (!background).then(|| Writing::enter(&self.writer.writing));
        let queued = if background {
            Some(job)
        } else {
            self.writer.commit_here(job, &self.touches)
        };
        if let Some(job) = queued {
            self.writer.send(Msg::Job(job))?;
        }
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Applies the reads' waiting last-access times now (at most `TOUCHES_PER_COMMIT` of them,
    /// oldest first) in a commit of their own, and returns once they are.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) async fn apply_touches(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(Msg::Touches(tx))?;
        rx.await.map_err(|_| Error::Closed)
    }
}

const MAX_BATCH: usize = 1024;
/// Last-access updates kept waiting for a write; past this, later reads are not recorded.
pub(super) const MAX_TOUCHES: usize = 16 * 1024;
/// Last-access updates applied with one commit, at most (a write that arrives meanwhile waits
/// for at most these: a few milliseconds at a million entries, each a random page). A burst
/// of reads is recorded over the writes that follow it, this many per write; reads beyond
/// `MAX_TOUCHES` waiting are not recorded (recency is approximate, as a sample of the reads).
pub(super) const TOUCHES_PER_COMMIT: usize = 64;
/// How long the writer waits for another job before it applies waiting last-access times.
const TOUCH_IDLE: std::time::Duration = std::time::Duration::from_millis(2);
/// Under a queue that never empties, the touches get a commit of their own after this many
/// batches of jobs.
const BATCHES_PER_TOUCH_COMMIT: usize = 16;
/// Entries removed by one eviction statement.
const EVICT_STEP: usize = 32;
/// Entries one commit evicts at most, besides one per job of the batch: the bound on what a
/// write waits for eviction, whatever the table's size.
pub(super) const EVICT_PER_COMMIT: usize = 64;

fn writer_loop(
    core: &Mutex<Core>,
    rx: &mpsc::Receiver<Msg>,
    shared_touches: &Touches,
    nudged: &AtomicBool,
) {
    let lock = || core.lock().unwrap_or_else(|e| e.into_inner());
    let mut next: Option<Msg> = None;
    let mut batches_since_touches = 0;
    loop {
        match next.take().map_or_else(|| rx.recv().ok(), Some) {
            Some(Msg::Job(first)) => {
                let mut jobs = vec![first];
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Msg::Job(j)) => jobs.push(j),
                        Ok(msg) => {
                            next = Some(msg);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let completions = {
                    let mut core = lock();
                    let Core { conn, state } = &mut *core;
                    commit_batch(conn, jobs, state)
                };
                for (done, result) in completions {
                    done(result);
                }
            }
            Some(Msg::Nudge) => nudged.store(false, Ordering::Release),
            Some(Msg::Touches(done)) => {
                let mut core = lock();
                let Core { conn, state } = &mut *core;
                apply_touches(conn, shared_touches, state);
                let _ = done.send(());
                continue;
            }
            None => break,
        }
        // Reads' last-access times are a hint for eviction. They are applied once the writer
        // has acknowledged its jobs and then found no job for `TOUCH_IDLE` (or, under a queue
        // that never empties, every few batches), a small chunk at a time: a caller's write
        // never waits for them, nor for more than one chunk, and a read-only workload causes
        // no commit (a commit makes every read connection drop its page cache).
        batches_since_touches += 1;
        if next.is_none() {
            match rx.recv_timeout(TOUCH_IDLE) {
                Ok(msg) => next = Some(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    batches_since_touches = BATCHES_PER_TOUCH_COMMIT;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
        }
        if batches_since_touches >= BATCHES_PER_TOUCH_COMMIT {
            batches_since_touches = 0;
            let mut core = lock();
            let Core { conn, state } = &mut *core;
            apply_touches(conn, shared_touches, state);
        }
    }
    tracing::debug!("sqlite writer stopped");
}

/// Applies at most `TOUCHES_PER_COMMIT` waiting last-access times (oldest first; a key read
/// several times is written once) to `recency`, in a transaction of their own.
fn apply_touches(conn: &mut Connection, shared: &Touches, state: &mut WriterState) {
    let mut touches = {
        let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared.len() > TOUCHES_PER_COMMIT {
            let rest = shared.split_off(TOUCHES_PER_COMMIT);
            std::mem::replace(&mut *shared, rest)
        } else {
            std::mem::take(&mut *shared)
        }
    };
    if touches.is_empty() || state.file.as_ref().is_some_and(|f| f.check().is_err()) {
        return;
    }
    touches.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    touches.dedup_by(|later, first| later.0 == first.0);
    let applied = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE recency SET at = ?2
                 WHERE id = (SELECT rowid FROM entries WHERE key = ?1) AND at < ?2",
            )?;
            for (key, at) in &touches {
                stmt.execute(params![key, to_i64(*at)])?;
                state.now_hint = state.now_hint.max(*at);
            }
        }
        tx.commit()
    })();
    state.committed();
    if let Err(e) = applied {
        tracing::debug!(error = %e, "last-access times not recorded");
    }
}

fn commit_batch(
    conn: &mut Connection,
    jobs: Vec<Job>,
    state: &mut WriterState,
) -> Vec<(Completion, Result<()>)> {
    // Nothing is committed to a file no longer at its path: the writes would be lost.
    if let Some(Err(err)) = state.file.as_ref().map(FileWatch::check) {
        return jobs
            .into_iter()
            .map(|job| (job(None), Err(err.clone())))
            .collect();
    }
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
            state.row = None;
        }
        Err(_) => state.row = None,
    }
    let written = jobs.len();
    let mut completions: Vec<Completion> = Vec::with_capacity(written);
    let mut aborted = false;
    for job in jobs {
        if aborted {
            completions.push(job(None));
            continue;
        }
        completions.push(job(Some((&tx, &mut *state))));
        // Some errors (a full disk, I/O) make SQLite roll the whole transaction back: the jobs
        // after it must not run in autocommit mode, and none of the batch is committed. A job
        // that failed half done is undone with its batch (dropping `tx` rolls it back).
        aborted = tx.is_autocommit() || state.part_done;
    }
    if aborted {
        state.counts = Counts::default();
        state.part_done = false;
        let cause = state.last_failure.take();
        let err = Error::Storage {
            message: format!(
                "a write failed, and its batch of {written} was rolled back: {}",
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
    if let Err(e) = evict(&tx, state, EVICT_PER_COMMIT + written) {
        tracing::warn!(error = %e, "L2 eviction failed");
    }
    // The counters move with the statements that took effect; written last, in this
    // transaction. Unwritten, the batch is not committed: the jobs are told.
    let counts = std::mem::take(&mut state.counts);
    let result = match counts.write(&tx) {
        Ok(()) => tx.commit().map_err(|e| Error::storage("commit", e)),
        Err(e) => Err(Error::storage("update the counters", e)),
    };
    match (&result, &mut state.row) {
        (Ok(()), Some(row)) => *row = row.plus(counts),
        (Ok(()), None) => {}
        (Err(_), row) => *row = None,
    }
    state.committed();
    completions
        .into_iter()
        .map(|c| (c, result.clone()))
        .collect()
}

/// Removes the least recently used entries, at most `step` of them, whose sizes, added up in
/// that order, first cover `excess` bytes (no over-eviction). Returns how many went.
fn evict_least_recent(
    conn: &Connection,
    state: &mut WriterState,
    step: usize,
    excess: u64,
) -> rusqlite::Result<usize> {
    let mut ids = Vec::with_capacity(step);
    let mut freed = 0;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT r.id, e.size FROM recency AS r JOIN entries AS e ON e.rowid = r.id
             ORDER BY r.at LIMIT ?1",
        )?;
        let mut rows = stmt.query([to_i64(step as u64)])?;
        while let Some(r) = rows.next()? {
            if freed >= excess {
                break;
            }
            ids.push(rusqlite::types::Value::from(r.get::<_, i64>(0)?));
            freed += to_u64(r.get(1)?);
        }
    }
    if ids.is_empty() {
        return Ok(0);
    }
    remove_entries(
        conn,
        state,
        // Walks the (distinct) ids rather than building a temporary index of them.
        "SELECT e.rowid, e.size, e.value IS NULL FROM rarray(?1) AS r
         CROSS JOIN entries AS e ON e.rowid = r.value",
        [std::rc::Rc::new(ids)],
    )
}

/// Brings the bytes held towards the bound, removing at most `budget` entries: once past the
/// bound, down to 90% of it (over as many commits as that takes), expired entries first
/// (oldest deadline first), then the least recently used. Every step walks the head of an
/// index, so its cost does not grow with the table.
fn evict(conn: &Connection, state: &mut WriterState, budget: usize) -> rusqlite::Result<()> {
    let mut held = changes::held_bytes(conn, state)?;
    if held > state.max_bytes {
        state.evicting = true;
    }
    if !state.evicting {
        return Ok(());
    }
    let target = state.max_bytes - state.max_bytes / 10;
    let (mut removed, mut any_expired) = (0, true);
    while held > target && removed < budget {
        let step = EVICT_STEP.min(budget - removed);
        let mut n = 0;
        if any_expired {
            n = remove_entries(
                conn,
                state,
                "SELECT rowid, size, value IS NULL FROM entries
                 WHERE stale_until <= ?1 ORDER BY stale_until LIMIT ?2",
                params![to_i64(state.now_hint), to_i64(step as u64)],
            )?;
            any_expired = n > 0;
        }
        if n == 0 {
            n = evict_least_recent(conn, state, step, held - target)?;
        }
        if n == 0 {
            break;
        }
        removed += n;
        held = changes::held_bytes(conn, state)?;
    }
    // Still over 90% with the budget spent: the next commit goes on. (Nothing left to evict,
    // the outbox holding the bytes: the next commit past the bound looks again.)
    state.evicting = held > target && removed >= budget;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;

    use crate::tier::{EntryStore, StoredEntry};

    fn memory_tier() -> SqliteTier {
        crate::tier::sqlite::tests::tier(1 << 30)
    }

    fn last_access(tier: &SqliteTier, key: &str) -> i64 {
        tier.read(|c| {
            c.query_row(
                "SELECT at FROM recency WHERE id = (SELECT rowid FROM entries WHERE key = ?1)",
                [key],
                |r| r.get(0),
            )
        })
        .expect("the entry")
    }

    /// The thread a write's job ran on: its id and name.
    async fn thread_of(tier: &SqliteTier) -> Result<(std::thread::ThreadId, Option<String>)> {
        tier.write(|_, _| {
            let t = std::thread::current();
            Ok((t.id(), t.name().map(str::to_owned)))
        })
        .await
    }

    #[tokio::test]
    async fn a_lone_write_commits_on_the_callers_thread_and_others_on_the_writers() -> Result<()> {
        let tier = memory_tier();
        let here = std::thread::current().id();
        assert_eq!(thread_of(&tier).await?.0, here);
        // Another write under way: the job goes to the writer thread.
        tier.writer.writing.fetch_add(1, Ordering::AcqRel);
        let (id, name) = thread_of(&tier).await?;
        assert_ne!(id, here);
        assert_eq!(name.as_deref(), Some("tiercache-sqlite-writer"));
        tier.writer.writing.fetch_sub(1, Ordering::AcqRel);
        assert_eq!(thread_of(&tier).await?.0, here);
        // The cache's background work: always the writer thread.
        assert_ne!(in_background(thread_of(&tier)).await?.0, here);
        // Under synchronous=FULL, never on the caller's thread.
        let full = SqliteTier::open(crate::tier::sqlite::SqliteOptions {
            synchronous: crate::tier::sqlite::Synchronous::Full,
            ..crate::tier::sqlite::tests::options(1 << 30)
        })?;
        assert_ne!(thread_of(&full).await?.0, here);
        Ok(())
    }

    #[tokio::test]
    async fn touches_commit_on_their_own_a_bounded_number_oldest_first() -> Result<()> {
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
        // A key read twice is written once, with its latest time.
        tier.touch(&keys[0], 60);
        // The first `TOUCHES_PER_COMMIT` go in one commit; the rest wait for the next.
        tier.apply_touches().await?;
        assert_eq!(last_access(&tier, &keys[0]), 50);
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT - 1]), 50);
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT]), 1);
        tier.apply_touches().await?;
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT + 9]), 50);
        assert_eq!(last_access(&tier, &keys[0]), 60);
        // A touch never moves an entry back in time, nor rewrites the entry's row.
        tier.touch(&keys[1], 10);
        tier.apply_touches().await?;
        assert_eq!(last_access(&tier, &keys[1]), 50);
        let written: i64 = tier
            .read(|c| {
                c.query_row(
                    "SELECT last_access FROM entries WHERE key = 'k1'",
                    [],
                    |r| r.get(0),
                )
            })
            .map_err(crate::tier::sqlite::storage("read"))?;
        assert_eq!(written, 1);
        Ok(())
    }
}
