//! L2: one SQLite database file (WAL), bounded by bytes, that also holds the write-behind outbox
//! and a small meta table (the persisted L3 breaker).
//!
//! Threads: one write connection. A write made while no other is under way commits on the
//! caller's thread (one small transaction; never under `synchronous=FULL`); otherwise a
//! dedicated writer thread commits everything queued since its last commit in one transaction
//! (group commit). Reads run on the caller's thread over a small pool of read connections,
//! each a WAL snapshot that never waits for the writer. A read of a cached page is a few
//! microseconds, cheaper than any hop to another thread.
//!
//! The module's parts: `open` (the file looked at before any write, foreign and corrupt files,
//! the integrity policy, the watch on the file's identity), `schema` (tables, indexes,
//! migrations), `changes` (every change of `entries` and `outbox` with its bookkeeping: the
//! counters and the recency rows), `writer` (the write connection and its thread: group
//! commit, jobs, last-access touches, bounded eviction) and `store` (reads, and the write jobs
//! of the tier's implementation of the storage traits, `tier::store`).
//!
//! # Costs that do not grow with the table
//! The counts and byte totals live in a one-row table the writer keeps in the same transaction
//! as every change (no triggers: see `changes`), so a summary, `stats()` and `health()` read
//! one row, and opening reads no total. Eviction walks two indexes (expired first, then least recently used) a small batch per
//! commit. A read's last access is a row of a narrow table, applied after the writer has
//! acknowledged its jobs, never inside a caller's write.
//!
//! # Integrity policy
//! Opening checks what is cheap: the header and schema (SQLite refuses a file that is not a
//! database), then the first and last row of every table (a damaged root or edge page). A file
//! that fails is refused or moved aside ([`OnCorrupt`]). The full `PRAGMA quick_check`, which
//! reads the whole file, runs on demand
//! ([`TieredCache::check_integrity`](crate::TieredCache::check_integrity)); damage deeper in the
//! file that a read meets before then is an [`Error::Storage`] for that read.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod bundle;
mod changes;
mod open;
mod schema;
mod store;
#[cfg(test)]
mod tests;
mod writer;

pub use schema::{RECOUNT, SCHEMA, SCHEMA_VERSION};

use open::FileWatch;
pub(crate) use writer::in_background;
use writer::{Touches, Writer};

/// The longest [`sqlite_busy_timeout`](crate::TieredCacheBuilder::sqlite_busy_timeout) SQLite
/// accepts: `i32::MAX` milliseconds (about 24.8 days); `build()` refuses a longer one.
pub const MAX_BUSY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// The `PRAGMA application_id` of a tiercache database: the ASCII bytes `tier`
/// (`0x74696572`, 1953064306). A database file with another non-zero id belongs to another
/// application and is refused untouched ([`Error::ForeignDatabase`]).
pub const APPLICATION_ID: i32 = 0x7469_6572;

/// The outbox's bound in bytes (keys and values of its rows, dead letters included) never falls
/// below this, whatever L2's bound: a write-behind cache with a small L2 still rides out an
/// outage of a few thousand writes.
pub const OUTBOX_MIN_BYTES: u64 = 64 * 1024 * 1024;

/// The write-behind outbox's default bound for an L2 bound of `l2_bytes`: the larger of the two
/// and [`OUTBOX_MIN_BYTES`] (set another with
/// [`outbox_capacity`](crate::TieredCacheBuilder::outbox_capacity)). A write-behind `set` or `delete` that would take the outbox past it is
/// refused with [`Error::OutboxFull`] (nothing is written; what the outbox holds stays).
/// The outbox's bytes also count against L2's bound: entries are evicted to make room for them.
pub fn outbox_bound(l2_bytes: u64) -> u64 {
    l2_bytes.max(OUTBOX_MIN_BYTES)
}

/// Page cache of each read connection, in KiB (change it with
/// [`sqlite_pragma`](crate::TieredCacheBuilder::sqlite_pragma)`("cache_size", ..)`).
pub const READER_CACHE_KIB: u64 = 16 * 1024;

/// SQLite's `synchronous` setting for the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Synchronous {
    /// `NORMAL`: with WAL, a committed transaction survives a crash of the process; a power loss
    /// may roll back the last transactions. The default.
    #[default]
    Normal,
    /// `FULL`: every commit is synced to disk; survives power loss, costs an fsync per commit.
    Full,
}

/// What to do with a database file that is not SQLite or is corrupt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnCorrupt {
    /// `build()` fails with [`Error::CorruptDatabase`]. The default.
    #[default]
    Fail,
    /// The file is renamed to `<name>.corrupt-<unix ms>` (kept, never deleted) and a fresh
    /// database is created in its place. Only for a file that is not SQLite or is damaged: a
    /// valid database of another application is refused ([`Error::ForeignDatabase`]), never
    /// moved.
    MoveAside,
}

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    File(PathBuf),
    Memory,
}

/// Options for opening the SQLite tier.
#[derive(Debug, Clone)]
pub(crate) struct SqliteOptions {
    pub(crate) location: Location,
    pub(crate) max_bytes: u64,
    /// The outbox's bound in bytes (see [`outbox_bound`]).
    pub(crate) outbox_max_bytes: u64,
    pub(crate) synchronous: Synchronous,
    pub(crate) on_corrupt: OnCorrupt,
    pub(crate) readers: usize,
    pub(crate) busy_timeout: Duration,
    /// Extra `PRAGMA name=value` run on every connection after the defaults (validated by the
    /// builder: names and values are plain words).
    pub(crate) pragmas: Vec<(String, String)>,
}

/// The SQLite tier.
pub(crate) struct SqliteTier {
    writer: Writer,
    touches: Touches,
    readers: Arc<Readers>,
    read_statements: AtomicU64,
    location: Location,
    file: Option<FileWatch>,
    /// How long a connection of its own (the full check) waits for the write lock.
    busy_timeout: Duration,
}

impl std::fmt::Debug for SqliteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteTier")
            .field("location", &self.location)
            .field("readers", &self.readers.conns.len())
            .finish()
    }
}

/// The read connections (shared with the blocking threads that run the long reads).
pub(super) struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    pub(super) fn new(conns: Vec<Mutex<Connection>>) -> Self {
        Self {
            conns,
            next: AtomicUsize::new(0),
        }
    }
}

fn storage(what: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |e| Error::storage(what, e)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteTier {
    /// `Err` ([`Error::Storage`]) when the database file was deleted or replaced since it was
    /// opened (one `stat`; always `Ok` for a memory database). The writer makes the same check
    /// before each commit; this lets health report it without a write.
    pub(crate) fn check_file(&self) -> Result<()> {
        self.file.as_ref().map_or(Ok(()), FileWatch::check)
    }

    /// The full integrity check (`PRAGMA quick_check`, which reads the whole file), then the
    /// counters against a count of every row (recounted, with a warning, when they differ),
    /// on a connection of its own on a blocking thread: reads and writes go on meanwhile (a
    /// recount holds the write lock while it reads the tables).
    ///
    /// # Errors
    /// [`Error::CorruptDatabase`] naming what SQLite found; [`Error::Storage`] when the check
    /// could not run.
    pub(crate) async fn check_integrity(&self) -> Result<()> {
        match &self.location {
            Location::File(path) => {
                let (path, busy) = (path.clone(), self.busy_timeout);
                let wrong = tokio::task::spawn_blocking(move || {
                    open::quick_check(&path)?;
                    changes::verify(&path, busy)
                })
                .await
                .map_err(Error::stopped("the integrity check"))??;
                if let Some(wrong) = wrong {
                    tracing::warn!(%wrong, "L2's counters did not match its rows; recounted");
                }
                Ok(())
            }
            Location::Memory => Ok(()),
        }
    }

    /// The database file (`None`: a memory database).
    pub(crate) fn path(&self) -> Option<&std::path::Path> {
        match &self.location {
            Location::File(path) => Some(path),
            Location::Memory => None,
        }
    }

    /// Statements run on read connections so far (lets tests prove `get_many` is one statement).
    pub(crate) fn read_statements(&self) -> u64 {
        self.read_statements.load(Ordering::Relaxed)
    }
}
