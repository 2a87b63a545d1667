//! L2: one SQLite database file (WAL), bounded by bytes, that also holds the write-behind outbox
//! and a small meta table (the persisted L3 breaker).
//!
//! Threads: one dedicated writer thread owns the write connection and commits everything queued
//! since its last commit in one transaction (group commit); reads run on the caller's thread
//! over a small pool of read connections, each a WAL snapshot that never waits for the writer.
//! A read of a cached page is a few microseconds, cheaper than any hop to another thread.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{
    FillGuard, Found, MetaUpdate, Observed, OutboxOp, OutboxRow, Resolved, Store, StoreSummary,
};
use crate::entry::Entry;
use crate::error::{Error, Result};

/// The longest [`sqlite_busy_timeout`](crate::TieredCacheBuilder::sqlite_busy_timeout) SQLite
/// accepts: `i32::MAX` milliseconds (about 24.8 days); `build()` refuses a longer one.
pub const MAX_BUSY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// The `PRAGMA application_id` of a tiercache database: the ASCII bytes `tier`
/// (`0x74696572`, 1953064306). A database file with another non-zero id belongs to another
/// application and is refused untouched ([`Error::ForeignDatabase`]).
pub const APPLICATION_ID: i32 = 0x7469_6572;

/// The schema version written to `PRAGMA user_version`.
///
/// History: 1, the first (no `application_id`); 2, `outbox.superseded` and the outbox indexes,
/// and `application_id` set to [`APPLICATION_ID`].
pub const SCHEMA_VERSION: i64 = 2;

/// The database schema of version [`SCHEMA_VERSION`], as a new database is created. An older
/// database is brought to it by the migrations, one version at a time.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    key         TEXT PRIMARY KEY NOT NULL,
    value       BLOB,
    validator   TEXT,
    stored_at   INTEGER NOT NULL,
    fresh_until INTEGER NOT NULL,
    stale_until INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    last_access INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY,
    key          TEXT NOT NULL,
    op           TEXT NOT NULL CHECK (op IN ('put', 'delete')),
    value        BLOB,
    created_at   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    dead         INTEGER NOT NULL DEFAULT 0,
    superseded   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox(key, id);
CREATE INDEX IF NOT EXISTS outbox_by_dead ON outbox(dead, id);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
";

/// The tables of a version 1 database (which had no `application_id`): a file with exactly
/// these, `user_version` 1 and `application_id` 0 is an older tiercache's, and is migrated.
const TABLES_V1: [&str; 3] = ["entries", "meta", "outbox"];

/// One step of the schema's history: the SQL that takes a database of version `to - 1` to
/// version `to`. Run in one transaction with the version bump.
struct Migration {
    to: i64,
    sql: &'static str,
}

/// Every step, oldest first; the last one's `to` is [`SCHEMA_VERSION`].
const MIGRATIONS: &[Migration] = &[Migration {
    to: 2,
    // `superseded`: 1 on a dead letter a newer write of its key came after.
    // `outbox_by_key`: the newest pending write of a key; `outbox_by_dead`: the pending scan.
    sql: "
        ALTER TABLE outbox ADD COLUMN superseded INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox(key, id);
        CREATE INDEX IF NOT EXISTS outbox_by_dead ON outbox(dead, id);
    ",
}];

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
    pub(crate) synchronous: Synchronous,
    pub(crate) on_corrupt: OnCorrupt,
    pub(crate) readers: usize,
    pub(crate) busy_timeout: Duration,
    /// Extra `PRAGMA name=value` run on every connection after the defaults (validated by the
    /// builder: names and values are plain words).
    pub(crate) pragmas: Vec<(String, String)>,
}

type Completion = Box<dyn FnOnce(Result<()>) + Send>;
/// A write: run inside the batch's transaction (`Some`), or told the batch could not begin (`None`).
type Job = Box<dyn FnOnce(Option<(&Connection, &mut WriterState)>) -> Completion + Send>;

/// Reads' last-access times, waiting for the writer's next transaction. Kept beside the
/// channel, not sent through it: a read must not wake the writer thread (a system call on the
/// reader's side, a context switch on the writer's) for a hint.
type Touches = Arc<Mutex<Vec<(String, u64)>>>;

enum Msg {
    Job(Job),
}

/// State only the writer thread touches.
struct WriterState {
    /// The SQLite error of the last job that failed (names the cause when SQLite rolls a whole
    /// batch back).
    last_failure: Option<rusqlite::ffi::Error>,
    now_hint: u64,
    total_bytes: u64,
    max_bytes: u64,
    /// The database file, checked before each commit (`None`: a memory database).
    file: Option<FileWatch>,
}

/// The identity of the database file as it was opened: on unix its device and inode, elsewhere
/// only its existence.
#[cfg(unix)]
type FileId = (u64, u64);
#[cfg(not(unix))]
type FileId = ();

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> FileId {}

/// The database file at its path, as it was opened. A file deleted or replaced under a running
/// cache would take every later write with it (SQLite keeps writing to the unlinked file, lost
/// at the next open): checked with one `stat` per commit, such writes fail instead.
#[derive(Debug, Clone)]
struct FileWatch {
    path: PathBuf,
    id: FileId,
}

impl FileWatch {
    fn new(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::Storage {
            message: format!(
                "cannot read the metadata of the database file {}: {e}",
                path.display()
            ),
            source: Some(Arc::new(e)),
        })?;
        Ok(Self {
            path: path.to_owned(),
            id: file_id(&meta),
        })
    }

    /// `Err` when the file at the path is gone or is another file. Other `stat` failures pass:
    /// they prove neither, and SQLite reports a file it cannot use.
    fn check(&self) -> Result<()> {
        let gone = |how: &str, source: Option<crate::error::BoxError>| {
            Error::Storage {
            message: format!(
                "the database file {} was deleted or replaced while the cache was running ({how}); \
                 writes are refused rather than lost (reopen the cache to use the file now at that path)",
                self.path.display()
            ),
            source,
        }
        };
        match std::fs::metadata(&self.path) {
            Ok(meta) if file_id(&meta) == self.id => Ok(()),
            Ok(_) => Err(gone("another file is at its path", None)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(gone("it is gone", Some(Arc::new(e))))
            }
            Err(_) => Ok(()),
        }
    }
}

/// The SQLite tier.
pub(crate) struct SqliteTier {
    writer: mpsc::Sender<Msg>,
    touches: Touches,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    read_statements: AtomicU64,
    location: Location,
    file: Option<FileWatch>,
}

impl std::fmt::Debug for SqliteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteTier")
            .field("location", &self.location)
            .field("readers", &self.readers.len())
            .finish()
    }
}

static MEMORY_DB_COUNTER: AtomicU64 = AtomicU64::new(0);

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt)
    )
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
    /// Opens (creating if needed) the database and starts the writer thread.
    pub(crate) fn open(opts: SqliteOptions) -> Result<Self> {
        let uri = match &opts.location {
            Location::File(path) => path.to_string_lossy().into_owned(),
            Location::Memory => format!(
                "file:tiercache-mem-{}-{}?mode=memory&cache=shared",
                std::process::id(),
                MEMORY_DB_COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let writer = match Self::open_writer(&uri, &opts) {
            Ok(conn) => conn,
            Err(e) => match (&opts.location, opts.on_corrupt) {
                (Location::File(path), OnCorrupt::MoveAside)
                    if matches!(e, Error::CorruptDatabase { .. }) =>
                {
                    let aside = move_aside(path)?;
                    tracing::warn!(path = %path.display(), moved_to = %aside.display(), "corrupt database moved aside; starting a fresh one");
                    Self::open_writer(&uri, &opts)?
                }
                _ => return Err(e),
            },
        };
        let readers = (0..opts.readers.max(1))
            .map(|_| Self::open_reader(&uri, &opts).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        let total_bytes: i64 = writer
            .query_row("SELECT total(size) FROM entries", [], |r| {
                r.get::<_, f64>(0)
            })
            .map(|v| v as i64)
            .map_err(storage("count the bytes held"))?;
        let file = match &opts.location {
            Location::File(path) => Some(FileWatch::new(path)?),
            Location::Memory => None,
        };
        let (tx, rx) = mpsc::channel();
        let touches = Touches::default();
        let writer_touches = touches.clone();
        let state = WriterState {
            last_failure: None,
            now_hint: 0,
            total_bytes: to_u64(total_bytes),
            max_bytes: opts.max_bytes,
            file: file.clone(),
        };
        thread::Builder::new()
            .name("tiercache-sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx, writer_touches, state))
            .map_err(|e| Error::Storage {
                message: format!("could not start the writer thread: {e}"),
                source: Some(Arc::new(e)),
            })?;
        Ok(Self {
            writer: tx,
            touches,
            readers,
            next_reader: AtomicUsize::new(0),
            read_statements: AtomicU64::new(0),
            location: opts.location,
            file,
        })
    }

    /// `Err` ([`Error::Storage`]) when the database file was deleted or replaced since it was
    /// opened (one `stat`; always `Ok` for a memory database). The writer makes the same check
    /// before each commit; this lets health report it without a write.
    pub(crate) fn check_file(&self) -> Result<()> {
        self.file.as_ref().map_or(Ok(()), FileWatch::check)
    }

    fn flags() -> OpenFlags {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    }

    /// Opens the write connection. The file is looked at first, without writing anything: a
    /// file of another application, a newer schema or a damaged file is refused as it was
    /// found. Only then is it switched to WAL and its schema created or migrated.
    fn open_writer(uri: &str, opts: &SqliteOptions) -> Result<Connection> {
        let path = match &opts.location {
            Location::File(p) => p.clone(),
            Location::Memory => PathBuf::from(":memory:"),
        };
        let conn = Connection::open_with_flags(uri, Self::flags()).map_err(|e| Error::Storage {
            message: format!("cannot open the database file {}: {e}", path.display()),
            source: Some(Arc::new(e)),
        })?;
        let fail = open_error(&path);
        conn.busy_timeout(busy_timeout(opts)).map_err(&fail)?;
        // Reads only, up to the WAL switch.
        let found = inspect(&conn).map_err(&fail)?;
        refuse(&found, &path)?;
        if opts.location != Location::Memory && found != FileKind::Empty {
            // Catch a damaged file now rather than on the first read of a damaged page.
            let check: String = conn
                .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
                .map_err(&fail)?;
            if check != "ok" {
                return Err(Error::CorruptDatabase {
                    path: path.clone(),
                    message: check,
                });
            }
        }
        if opts.location != Location::Memory {
            let mode: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(&fail)?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(%mode, "SQLite refused WAL mode");
            }
        }
        let sync = match opts.synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.execute_batch(&format!("PRAGMA synchronous={sync};"))
            .map_err(&fail)?;
        create_or_migrate(&conn, &path)?;
        apply_pragmas(&conn, &opts.pragmas).map_err(&fail)?;
        rusqlite::vtab::array::load_module(&conn).map_err(&fail)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }

    fn open_reader(uri: &str, opts: &SqliteOptions) -> Result<Connection> {
        let conn = Connection::open_with_flags(uri, Self::flags())
            .map_err(storage("open a read connection"))?;
        conn.busy_timeout(busy_timeout(opts))
            .map_err(storage("configure a read connection"))?;
        if opts.location == Location::Memory {
            // A shared-cache memory database locks tables; readers that read uncommitted data
            // never wait for the writer. (Memory databases are for tests.)
            conn.execute_batch("PRAGMA read_uncommitted=1;")
                .map_err(storage("configure a read connection"))?;
        }
        rusqlite::vtab::array::load_module(&conn).map_err(storage("load the array module"))?;
        // Readers keep their own page cache; SQLite's default (2 MiB) makes an L2 read of a
        // database a few times larger go to the file system on most reads.
        conn.execute_batch(&format!("PRAGMA cache_size=-{READER_CACHE_KIB};"))
            .map_err(storage("configure a read connection"))?;
        apply_pragmas(&conn, &opts.pragmas).map_err(storage("configure a read connection"))?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }

    /// Runs `f` on a free read connection (on this thread).
    /// The first free connection is taken, so a lone reader always uses the first (its page
    /// cache stays warm) and concurrent readers spread over the others.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        for reader in &self.readers {
            if let Ok(conn) = reader.try_lock() {
                return f(&conn);
            }
        }
        let n = self.readers.len();
        let pick = self.next_reader.fetch_add(1, Ordering::Relaxed) % n;
        let conn = self.readers[pick].lock().unwrap_or_else(|e| e.into_inner());
        f(&conn)
    }

    /// One entry, read on this thread (reads never wait on the writer: WAL).
    fn read_entry(&self, key: &str) -> Result<Option<Entry>> {
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

    /// Runs `f`, which makes at most one change (one modifying statement: SQLite undoes a
    /// failed statement by itself), in the writer thread's next transaction, and waits for the
    /// commit.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut WriterState) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_job(false, f).await
    }

    /// [`write`](Self::write) for a job of several changes: they are undone together if one
    /// fails (a savepoint), leaving the rest of the batch alone.
    async fn write_atomic<T: Send + 'static>(
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

    /// Statements run on read connections so far (lets tests prove `get_many` is one statement).
    pub(crate) fn read_statements(&self) -> u64 {
        self.read_statements.load(Ordering::Relaxed)
    }
}

/// The busy timeout, capped at what SQLite takes (the builder refuses a longer one; the cap
/// keeps rusqlite from panicking should options come from elsewhere).
fn busy_timeout(opts: &SqliteOptions) -> Duration {
    opts.busy_timeout.min(MAX_BUSY_TIMEOUT)
}

/// What an existing database file holds, as seen before anything is written to it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileKind {
    /// No schema, no ids: a new or empty file.
    Empty,
    /// A tiercache database of this schema version ([`APPLICATION_ID`] set).
    Ours(i64),
    /// A version 1 tiercache database (from before `application_id`).
    OursV1,
    /// Something else: what was found, for the error.
    Foreign(String),
}

/// Reads the file's `application_id`, `user_version` and tables (no writes).
fn inspect(conn: &Connection) -> rusqlite::Result<FileKind> {
    let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let mut stmt = conn.prepare("SELECT type, name FROM sqlite_master ORDER BY name")?;
    let objects = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let tables: Vec<&str> = objects
        .iter()
        .filter(|(kind, name)| kind == "table" && !name.starts_with("sqlite_"))
        .map(|(_, name)| name.as_str())
        .collect();
    Ok(if app_id == APPLICATION_ID {
        FileKind::Ours(version)
    } else if app_id == 0 && version == 0 && objects.is_empty() {
        FileKind::Empty
    } else if app_id == 0 && version == 1 && tables == TABLES_V1 {
        FileKind::OursV1
    } else {
        const SHOWN: usize = 8;
        let mut listed = tables[..tables.len().min(SHOWN)].join(", ");
        if tables.len() > SHOWN {
            listed.push_str(&format!(", and {} more", tables.len() - SHOWN));
        }
        FileKind::Foreign(format!(
            "application_id {app_id:#x} (tiercache's is {APPLICATION_ID:#x}), user_version {version}, tables [{listed}]"
        ))
    })
}

/// The files tiercache does not open: another application's, or a newer tiercache's.
fn refuse(found: &FileKind, path: &Path) -> Result<()> {
    match found {
        FileKind::Foreign(what) => Err(Error::ForeignDatabase {
            path: path.to_owned(),
            message: what.clone(),
        }),
        FileKind::Ours(version) if *version > SCHEMA_VERSION => Err(Error::Config(format!(
            "the database {} has schema version {version}, newer than this tiercache ({SCHEMA_VERSION})",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// A SQLite error while opening: [`Error::CorruptDatabase`] for a damaged or non-SQLite file,
/// else [`Error::Storage`] with the SQLite error as its source.
fn open_error(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| {
        if is_corruption(&e) {
            Error::CorruptDatabase {
                path: path.to_owned(),
                message: e.to_string(),
            }
        } else {
            Error::Storage {
                message: format!("cannot use the database file {}: {e}", path.display()),
                source: Some(Arc::new(e)),
            }
        }
    }
}

/// Brings the database to [`SCHEMA_VERSION`]: creates the schema in an empty database, or runs
/// the migrations after the version found, each step in its own transaction with its version
/// bump. Each transaction looks at the file again under the write lock, so that processes
/// opening one file at once neither create nor migrate it twice.
fn create_or_migrate(conn: &Connection, path: &Path) -> Result<()> {
    let fail = open_error(path);
    loop {
        conn.execute_batch("BEGIN IMMEDIATE").map_err(&fail)?;
        let step = (|| -> Result<bool> {
            let found = inspect(conn).map_err(&fail)?;
            refuse(&found, path)?;
            let (sql, to) = match found {
                FileKind::Empty | FileKind::Ours(0) => (SCHEMA, SCHEMA_VERSION),
                FileKind::Ours(v) if v >= SCHEMA_VERSION => return Ok(true),
                FileKind::Ours(from) => migration_from(from, path)?,
                FileKind::OursV1 => migration_from(1, path)?,
                // Refused above.
                FileKind::Foreign(_) => return Ok(true),
            };
            conn.execute_batch(&format!(
                "{sql}; PRAGMA application_id={APPLICATION_ID}; PRAGMA user_version={to};"
            ))
            .map_err(&fail)?;
            Ok(to >= SCHEMA_VERSION)
        })();
        match step {
            Ok(done) => {
                conn.execute_batch("COMMIT").map_err(&fail)?;
                if done {
                    return Ok(());
                }
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
}

/// The step that migrates a database of version `from`, and the version it makes.
fn migration_from(from: i64, path: &Path) -> Result<(&'static str, i64)> {
    MIGRATIONS
        .iter()
        .find(|m| m.to == from + 1)
        .map(|m| (m.sql, m.to))
        .ok_or_else(|| {
            Error::Config(format!(
                "the database {} has schema version {from}, which this tiercache cannot migrate",
                path.display()
            ))
        })
}

fn apply_pragmas(conn: &Connection, pragmas: &[(String, String)]) -> rusqlite::Result<()> {
    for (name, value) in pragmas {
        // Some pragmas answer with a row, some do not; either way is fine.
        let mut stmt = conn.prepare(&format!("PRAGMA {name}={value}"))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
    }
    Ok(())
}

fn move_aside(path: &Path) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{stamp}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside).map_err(|e| Error::Storage {
        message: format!(
            "could not move the corrupt database {} aside: {e}",
            path.display()
        ),
        source: Some(Arc::new(e)),
    })?;
    for suffix in ["-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let mut to = aside.as_os_str().to_owned();
        to.push(suffix);
        let _ = std::fs::rename(&from, &to);
    }
    Ok(aside)
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
/// Page cache of each read connection, in KiB (change it with
/// [`sqlite_pragma`](crate::TieredCacheBuilder::sqlite_pragma)`("cache_size", ..)`).
pub const READER_CACHE_KIB: u64 = 16 * 1024;
/// Last-access updates kept waiting for a write; past this, later reads are not recorded.
const MAX_TOUCHES: usize = 16 * 1024;
/// Last-access updates applied with one commit, at most.
const TOUCHES_PER_COMMIT: usize = 1024;

fn writer_loop(
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

fn row_to_entry(r: &rusqlite::Row<'_>, offset: usize) -> rusqlite::Result<Entry> {
    let value: Option<Vec<u8>> = r.get(offset)?;
    Ok(Entry::new(
        value.map(Bytes::from),
        r.get(offset + 1)?,
        to_u64(r.get(offset + 2)?),
        to_u64(r.get(offset + 3)?),
        to_u64(r.get(offset + 4)?),
    ))
}

fn put_entry(
    conn: &Connection,
    state: &mut WriterState,
    key: &str,
    e: &Entry,
) -> rusqlite::Result<()> {
    let old: Option<i64> = conn
        .prepare_cached("SELECT size FROM entries WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    let size = e.size() as u64;
    conn.prepare_cached(
        "INSERT INTO entries (key, value, validator, stored_at, fresh_until, stale_until, size, last_access)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?4)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value, validator = excluded.validator,
           stored_at = excluded.stored_at, fresh_until = excluded.fresh_until,
           stale_until = excluded.stale_until, size = excluded.size, last_access = excluded.last_access",
    )?
    .execute(params![
        key,
        e.value.as_deref(),
        e.validator,
        to_i64(e.stored_at),
        to_i64(e.fresh_until),
        to_i64(e.stale_until),
        to_i64(size),
    ])?;
    state.total_bytes = state.total_bytes.saturating_sub(old.map_or(0, to_u64)) + size;
    state.now_hint = state.now_hint.max(e.stored_at);
    Ok(())
}

/// Whether a fill may replace `key`'s row: no write began since it started, and the row is the
/// one it observed (another process's write changes it).
fn fill_allowed(conn: &Connection, key: &str, guard: &FillGuard) -> rusqlite::Result<bool> {
    if !(guard.still_valid)() {
        return Ok(false);
    }
    if guard.observed == Observed::Unknown {
        return Ok(true);
    }
    let held: Option<i64> = conn
        .prepare_cached("SELECT stored_at FROM entries WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(guard.observed.matches(held.map(to_u64)))
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

fn remove_entry(conn: &Connection, state: &mut WriterState, key: &str) -> rusqlite::Result<()> {
    let old: Option<i64> = conn
        .prepare_cached("DELETE FROM entries WHERE key = ?1 RETURNING size")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    state.total_bytes = state.total_bytes.saturating_sub(old.map_or(0, to_u64));
    Ok(())
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

const OUTBOX_COLUMNS: &str =
    "id, key, op, value, created_at, attempts, next_attempt, last_error, dead, superseded";

#[async_trait]
impl Store for SqliteTier {
    async fn get(&self, key: &str) -> Result<Option<Entry>> {
        self.read_entry(key)
    }

    fn get_now(&self, key: &str) -> Option<Result<Option<Entry>>> {
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
        let array: Rc<Vec<Value>> =
            Rc::new(keys.iter().map(|k| Value::from((*k).to_owned())).collect());
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key, value, validator, stored_at, fresh_until, stale_until, 0
                 FROM entries WHERE key IN rarray(?1)
                 UNION ALL
                 SELECT key, value, NULL, 0, 0, 0, CASE op WHEN 'put' THEN 1 ELSE 2 END
                 FROM outbox WHERE id IN (
                   SELECT max(id) FROM outbox WHERE key IN rarray(?1) AND dead = 0 GROUP BY key)",
            )?;
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
            Ok(found)
        })
        .map_err(storage("read a batch of entries"))
    }

    async fn put(&self, key: &str, entry: Entry) -> Result<()> {
        let key = key.to_owned();
        self.write(move |conn, state| put_entry(conn, state, &key, &entry))
            .await
    }

    async fn put_fill(&self, key: &str, entry: Entry, guard: FillGuard) -> Result<bool> {
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
            conn.prepare_cached(
                "UPDATE entries SET stored_at = ?2, fresh_until = ?3, stale_until = ?4, last_access = ?2
                 WHERE key = ?1",
            )?
            .execute(params![key, to_i64(stored_at), to_i64(fresh_until), to_i64(stale_until)])
            .map(|n| n > 0)
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

    async fn enqueue(
        &self,
        key: &str,
        entry: Option<Entry>,
        op: OutboxOp,
        now: u64,
    ) -> Result<i64> {
        let key = key.to_owned();
        self.write_atomic(move |conn, state| {
            match &entry {
                Some(e) => put_entry(conn, state, &key, e)?,
                None => remove_entry(conn, state, &key)?,
            }
            let value = match &op {
                OutboxOp::Put(v) => Some(v.as_ref()),
                OutboxOp::Delete => None,
            };
            // A newer write: the key's dead letters may no longer be retried (I4).
            conn.prepare_cached("UPDATE outbox SET superseded = 1 WHERE key = ?1 AND dead = 1")?
                .execute([&key])?;
            conn.prepare_cached(
                "INSERT INTO outbox (key, op, value, created_at, next_attempt) VALUES (?1, ?2, ?3, ?4, 0)",
            )?
            .execute(params![key, op.name(), value, to_i64(now)])?;
            Ok(conn.last_insert_rowid())
        })
        .await
    }

    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE dead = 0 ORDER BY id LIMIT ?1"
            ))?;
            let rows = stmt.query_map([limit], row_to_outbox)?;
            rows.collect()
        })
        .map_err(storage("read the outbox"))
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
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT key, last_error FROM outbox WHERE dead = 0 ORDER BY id")?;
            let mut rows = stmt.query([])?;
            let (mut pending, mut stuck, mut seen) =
                (0u64, Vec::new(), std::collections::HashSet::new());
            while let Some(r) = rows.next()? {
                pending += 1;
                if let Some(error) = r.get::<_, Option<String>>(1)? {
                    let key: String = r.get(0)?;
                    if seen.insert(key.clone()) {
                        stuck.push((key, error));
                    }
                }
            }
            Ok((pending, stuck))
        })
        .map_err(storage("read the outbox"))
    }

    async fn outbox_complete(&self, ids: Vec<i64>) -> Result<()> {
        self.write(move |conn, _| {
            // One statement for the batch; the array (an `Rc`) is built on the writer thread.
            let ids: Rc<Vec<Value>> = Rc::new(ids.into_iter().map(Value::from).collect());
            conn.prepare_cached("DELETE FROM outbox WHERE id IN rarray(?1) AND dead = 0")?
                .execute([ids])
                .map(drop)
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
        self.write_atomic(move |conn, state| {
            let newest = ids.iter().copied().max().unwrap_or(0);
            let ids: Rc<Vec<Value>> = Rc::new(ids.into_iter().map(Value::from).collect());
            conn.prepare_cached(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt = ?2, last_error = ?3, dead = ?4
                 WHERE id IN rarray(?1) AND dead = 0",
            )?
            .execute(params![ids.clone(), to_i64(next_attempt), error, dead as i64])?;
            if dead {
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
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE dead = 1 ORDER BY id"
            ))?;
            let rows = stmt.query_map([], row_to_outbox)?;
            rows.collect()
        })
        .map_err(storage("read the dead letters"))
    }

    async fn resolve_dead_letter(&self, id: i64, retry: bool) -> Result<Resolved> {
        self.write(move |conn, _| {
            let row: Option<(String, bool)> = conn
                .prepare_cached("SELECT key, superseded FROM outbox WHERE id = ?1 AND dead = 1")?
                .query_row([id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))
                .optional()?;
            let sql = match row {
                None => return Ok(Resolved::Missing),
                Some((key, true)) if retry => return Ok(Resolved::Superseded(key)),
                Some(_) if retry => {
                    "UPDATE outbox SET dead = 0, attempts = 0, next_attempt = 0 WHERE id = ?1 AND dead = 1"
                }
                Some(_) => "DELETE FROM outbox WHERE id = ?1 AND dead = 1",
            };
            conn.prepare_cached(sql)?.execute([id])?;
            Ok(Resolved::Done)
        })
        .await
    }

    async fn supersede_dead(&self, key: &str) -> Result<()> {
        let key = key.to_owned();
        self.write(move |conn, _| {
            conn.prepare_cached("UPDATE outbox SET superseded = 1 WHERE key = ?1 AND dead = 1")?
                .execute([&key])
                .map(drop)
        })
        .await
    }

    async fn summary(&self, now: u64) -> Result<StoreSummary> {
        self.read(|conn| {
            let (entries, bytes, stale, negative) = conn.query_row(
                "SELECT count(*), total(size), total(fresh_until <= ?1), total(value IS NULL) FROM entries",
                [to_i64(now)],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?, r.get::<_, f64>(2)?, r.get::<_, f64>(3)?)),
            )?;
            let (depth, dead, oldest) = conn.query_row(
                "SELECT total(dead = 0), total(dead = 1), min(CASE WHEN dead = 0 THEN created_at END) FROM outbox",
                [],
                |r| Ok((r.get::<_, f64>(0)?, r.get::<_, f64>(1)?, r.get::<_, Option<i64>>(2)?)),
            )?;
            Ok(StoreSummary {
                entries: to_u64(entries),
                bytes: bytes as u64,
                stale_entries: stale as u64,
                negative_entries: negative as u64,
                outbox_depth: depth as u64,
                dead_letters: dead as u64,
                oldest_pending_ms: oldest.map(to_u64),
            })
        })
        .map_err(storage("summarize the database"))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The columns and indexes of every table, as SQLite describes them.
    fn shape(conn: &Connection) -> Vec<String> {
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("tables");
        let mut shape = Vec::new();
        for t in tables {
            for pragma in ["table_info", "index_list"] {
                let mut stmt = conn
                    .prepare(&format!("SELECT * FROM pragma_{pragma}('{t}') ORDER BY 2"))
                    .expect("pragma");
                let n = stmt.column_count();
                let rows = stmt
                    .query_map([], |r| {
                        (0..n)
                            .map(|i| r.get::<_, Value>(i).map(|v| format!("{v:?}")))
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .expect("rows");
                for row in rows {
                    shape.push(format!("{t} {pragma} {}", row.expect("row").join(" ")));
                }
            }
        }
        shape
    }

    #[test]
    fn a_migrated_database_has_the_shape_of_a_new_one() {
        assert_eq!(MIGRATIONS.last().map(|m| m.to), Some(SCHEMA_VERSION));
        let new = Connection::open_in_memory().expect("db");
        new.execute_batch(SCHEMA).expect("schema");
        let old = Connection::open_in_memory().expect("db");
        // Version 1: the current schema without what the migrations add.
        let v1 = SCHEMA
            .replace(",\n    superseded   INTEGER NOT NULL DEFAULT 0", "")
            .replace(
                "CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox(key, id);",
                "",
            )
            .replace(
                "CREATE INDEX IF NOT EXISTS outbox_by_dead ON outbox(dead, id);",
                "",
            );
        assert!(!v1.contains("superseded") && !v1.contains("INDEX"), "{v1}");
        old.execute_batch(&v1).expect("v1");
        for m in MIGRATIONS {
            old.execute_batch(m.sql).expect("migration");
        }
        assert!(shape(&new).iter().any(|l| l.contains("superseded")));
        assert_eq!(shape(&old), shape(&new));
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
            tier.put(k, Entry::new(Some(Bytes::from_static(b"v")), None, 1, 2, 3))
                .await?;
        }
        for k in &keys {
            tier.touch(k, 50);
        }
        // The next write carries the first `TOUCHES_PER_COMMIT`; the rest wait for the one after.
        tier.put("other", Entry::new(None, None, 1, 2, 2)).await?;
        assert_eq!(last_access(&tier, &keys[0]), 50);
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT - 1]), 50);
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT]), 1);
        tier.put("other", Entry::new(None, None, 1, 2, 2)).await?;
        assert_eq!(last_access(&tier, &keys[TOUCHES_PER_COMMIT + 9]), 50);
        Ok(())
    }
}
