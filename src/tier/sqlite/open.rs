//! Opening the database: the file is looked at before anything is written to it (another
//! application's file, a newer schema or a damaged file is refused as found, or a damaged one
//! moved aside), then switched to WAL and its schema created or migrated; and the watch on the
//! file's identity that keeps writes from going to a file no longer at its path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::schema::{MIGRATIONS, SCHEMA, SCHEMA_VERSION};
use super::writer::{Touches, Writer, WriterState};
use super::{
    storage, Location, OnCorrupt, Readers, SqliteOptions, SqliteTier, Synchronous, APPLICATION_ID,
    MAX_BUSY_TIMEOUT, READER_CACHE_KIB,
};
use crate::error::{Error, Result};

/// The tables of a version 1 database (which had no `application_id`): a file with exactly
/// these, `user_version` 1 and `application_id` 0 is an older tiercache's, and is migrated.
const TABLES_V1: [&str; 3] = ["entries", "meta", "outbox"];

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
pub(super) struct FileWatch {
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
    pub(super) fn check(&self) -> Result<()> {
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

static MEMORY_DB_COUNTER: AtomicU64 = AtomicU64::new(0);

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt)
    )
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
        let file = match &opts.location {
            Location::File(path) => Some(FileWatch::new(path)?),
            Location::Memory => None,
        };
        let checkpoints = match &opts.location {
            Location::File(_) => Some(spawn_checkpointer(Self::open_reader(&uri, &opts)?)?),
            Location::Memory => None,
        };
        let touches = Touches::default();
        let state = WriterState {
            last_failure: None,
            now_hint: 0,
            max_bytes: opts.max_bytes,
            outbox_max_bytes: opts.outbox_max_bytes,
            evicting: false,
            file: file.clone(),
            row: None,
            data_version: 0,
            checkpoints,
            commits: 0,
            counts: Default::default(),
            part_done: false,
        };
        let inline = opts.synchronous == Synchronous::Normal;
        let writer =
            Writer::spawn(writer, state, touches.clone(), inline).map_err(|e| Error::Storage {
                message: format!("could not start the writer thread: {e}"),
                source: Some(Arc::new(e)),
            })?;
        Ok(Self {
            writer,
            touches,
            readers: Arc::new(Readers::new(readers)),
            read_statements: AtomicU64::new(0),
            busy_timeout: busy_timeout(&opts),
            location: opts.location,
            file,
        })
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
            // A damaged root or edge page is caught now; the full check reads the whole file
            // and runs on demand (see the module's integrity policy).
            probe(&conn).map_err(&fail)?;
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
        // The writer walks indexes (eviction, last-access updates) as the readers do: the same
        // page cache size. Checkpoints are the checkpointer thread's (see `spawn_checkpointer`).
        // A statement's sub-journal (the prior contents of the pages a multi-row statement
        // changes, to undo it alone) stays in memory: SQLite otherwise spills it to a temporary
        // file past 64 KiB.
        conn.execute_batch(&format!(
            "PRAGMA cache_size=-{READER_CACHE_KIB}; PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT};
             PRAGMA temp_store=MEMORY;"
        ))
        .map_err(&fail)?;
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
}

/// WAL frames past which the writer's own connection would checkpoint: never (0). A checkpoint
/// in the writer lands inside whichever commit crosses the threshold: at a million entries,
/// commits of one set took 30 to 430 ms that way (`evict_stall_1m_ms` 53 to 75 ms; 12 ms
/// without). The checkpointer thread is the only one that checkpoints: asked every
/// `COMMITS_PER_CHECKPOINT` commits, it runs back to back while the writer outpaces it, so the
/// WAL grows only while a checkpoint is running, or while a reader holds an old snapshot (which
/// would stop the writer's own passive checkpoint just the same).
const WRITER_AUTOCHECKPOINT: u32 = 0;

/// Starts the checkpointer: a thread with a connection of its own that copies the WAL back
/// into the database file (`PRAGMA wal_checkpoint(PASSIVE)`) when the writer asks. A
/// checkpoint reads and writes pages all over the file and syncs it (milliseconds at a million
/// entries, more on a slow disk); in the committing connection it would land on whichever
/// write crossed the WAL's threshold. A passive checkpoint runs beside the writer and readers,
/// never waiting for them. The thread ends when the writer drops its end of the channel.
fn spawn_checkpointer(conn: Connection) -> Result<mpsc::SyncSender<()>> {
    let (tx, rx) = mpsc::sync_channel::<()>(1);
    thread::Builder::new()
        .name("tiercache-sqlite-checkpointer".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(error = %e, "WAL checkpoint failed");
                }
            }
        })
        .map_err(|e| Error::Storage {
            message: format!("could not start the checkpointer thread: {e}"),
            source: Some(Arc::new(e)),
        })?;
    Ok(tx)
}

/// The fast check made on open: the first and the last row of every table (by rowid), which
/// walks each table's root page and its edges. Reads a few pages per table, whatever the size.
fn probe(conn: &Connection) -> rusqlite::Result<()> {
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for table in tables {
        let quoted = table.replace('"', "\"\"");
        for order in ["ASC", "DESC"] {
            let mut stmt = conn.prepare(&format!(
                "SELECT * FROM \"{quoted}\" ORDER BY rowid {order} LIMIT 1"
            ))?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
        }
    }
    Ok(())
}

/// The full `PRAGMA quick_check` of the database file at `path`, on a connection of its own
/// (blocking: run it off the async threads). `Err(`[`Error::CorruptDatabase`]`)` names what
/// SQLite found.
pub(crate) fn quick_check(path: &Path) -> Result<()> {
    let fail = open_error(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&fail)?;
    let mut stmt = conn.prepare("PRAGMA quick_check(10)").map_err(&fail)?;
    let found: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(&fail)?;
    if found.len() == 1 && found[0] == "ok" {
        return Ok(());
    }
    Err(Error::CorruptDatabase {
        path: path.to_owned(),
        message: found.join("; "),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::types::Value;

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
        // Version 1: version 2 without what its migration adds.
        let v1 = super::super::schema::SCHEMA_V2
            .replace(",\n    superseded   INTEGER NOT NULL DEFAULT 0", "")
            .replace(
                "CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox(key, id);",
                "",
            )
            .replace(
                "CREATE INDEX IF NOT EXISTS outbox_dead_by_key ON outbox(key) WHERE dead = 1;",
                "",
            );
        assert!(!v1.contains("superseded") && !v1.contains("INDEX"), "{v1}");
        old.execute_batch(&v1).expect("v1");
        for m in MIGRATIONS {
            old.execute_batch(m.sql).expect("migration");
        }
        assert!(shape(&new).iter().any(|l| l.contains("superseded")));
        assert!(shape(&new).iter().any(|l| l.contains("recency_by_at")));
        assert_eq!(shape(&old), shape(&new));
        let triggers = |c: &Connection| -> Vec<String> {
            c.prepare("SELECT sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .expect("triggers")
        };
        // Version 4 has none: the writer keeps the counters.
        assert_eq!(triggers(&old), Vec::<String>::new());
        assert_eq!(triggers(&new), Vec::<String>::new());
    }
}
