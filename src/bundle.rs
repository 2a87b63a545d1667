//! Offline bundles: a snapshot of the cache's entries in one file, made by
//! [`TieredCache::export`](crate::TieredCache::export) and loaded into another database by
//! [`TieredCache::import`](crate::TieredCache::import) (`tiercache export FILE` /
//! `tiercache import FILE`). A CI job warms a cache once, exports it, ships the file; runners
//! import it and read with [`offline`](crate::TieredCacheBuilder::offline) mode on, with no
//! network.
//!
//! # The file
//! A SQLite database (any SQLite tool reads it), written to a temporary name beside the target
//! and renamed into place once complete and synced: a reader never sees half a bundle, and an
//! existing file is never replaced unless asked ([`ExportOptions::overwrite`]).
//!
//! * `PRAGMA application_id` = [`BUNDLE_APPLICATION_ID`] (ASCII `tcbn`), distinct from a cache
//!   database's, so neither is mistaken for the other.
//! * `PRAGMA user_version` = the format version, [`BUNDLE_VERSION`] (1).
//! * `entries(key TEXT PRIMARY KEY, value BLOB, validator TEXT, stored_at INTEGER,
//!   fresh_until INTEGER, stale_until INTEGER)`: the bytes, the source's validator (ETag) and
//!   the three deadlines (ms since the UNIX epoch) of each entry, exactly as L2 held them.
//!   `value` NULL is a "not found" marker (an export writes none today; an import takes them).
//! * `bundle(name TEXT PRIMARY KEY, value TEXT)`: `format_version`, `created_at_ms`,
//!   `tiercache_version`, `prefix`, `entries` (the row count, checked on import) and `bytes`.
//!
//! # Versions
//! Readers select the columns they know by name. A column an older reader may ignore is added
//! without changing the version: the commit SHA each entry was read at (issue #15's
//! revalidation pinned to a commit) will be a nullable `commit_sha TEXT` column, which a
//! version 1 reader skips and a newer reader treats as unknown when absent. A change an older
//! reader must not ignore raises [`BUNDLE_VERSION`]; an older tiercache refuses such a bundle
//! ([`BundleFault::Newer`]) rather than misread it.
//!
//! # What a bundle holds, and what it does not
//! * Entries with a value, within their stale window at the time of export.
//! * **Not** "not found" markers: they record an absence for a short time
//!   ([`negative_ttl`](crate::TieredCacheBuilder::negative_ttl), 60 s by default) and a bundle
//!   carries content. An offline runner asking for such a key gets
//!   [`Error::Unavailable`] (`offline`) instead of "not found".
//! * **Not** the entries of keys with a pending write-behind write, nor the outbox or its dead
//!   letters. A pending write is not yet the source's: the source may refuse it, and then the
//!   source's value is the truth (I1). Shipped in a bundle, it would be served elsewhere as a
//!   cached answer of the source, with no outbox row left to deliver or refuse it. Dead letters
//!   are this database's undelivered writes, waiting for a decision made here.
//! * The deadlines as they were: an imported entry is fresh, stale or gone exactly when it
//!   would have been in the exporting cache. With offline mode on, a copy past its fresh
//!   deadline is served within its stale window, marked
//!   [`Freshness::Stale`](crate::Freshness::Stale) (`offline`); past its stale deadline it is
//!   not served. So the exporting cache's
//!   [`stale_ttl`](crate::TieredCacheBuilder::stale_ttl) is how long a bundle is good for
//!   offline: export from a cache with a stale window as long as the bundle must last (the
//!   import does not extend deadlines: it cannot know the entries are still the source's).
//!
//! # Import into an existing database
//! All or nothing: the bundle is read and checked whole first (type, version,
//! `PRAGMA quick_check`, every row decoded), then merged in one transaction
//! ([`EntryStore::merge`](crate::tier::EntryStore::merge)). For each entry:
//! * its key has a pending write-behind write → kept as it is ([`ImportReport::kept_pending`]):
//!   an acknowledged write not yet delivered is newer than anything the bundle holds (I1);
//! * its key holds an entry as new or newer (the source gave or confirmed it at the same time
//!   or later: `stored_at`) → kept ([`ImportReport::kept_newer`]);
//! * else written, and the key's copy in L1 (of every cache of this process on that database)
//!   dropped, so the next read sees the imported entry.
//!
//! Entries past their stale deadline at import time are skipped ([`ImportReport::expired`]).
//! A refused bundle ([`Error::Bundle`]) changes nothing; the bundle file is opened read-only and
//! never changed. An import larger than L2's bound is cut back by the usual eviction (expired,
//! then least recently used: imported entries count as last used when they were stored).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;

use crate::error::{BundleFault, Error, Result};
use crate::tier::StoredEntry;

/// The `PRAGMA application_id` of a bundle file: the ASCII bytes `tcbn` (`0x7463626e`).
pub const BUNDLE_APPLICATION_ID: i32 = 0x7463_626e;

/// The bundle format this tiercache writes, and the newest it reads (`PRAGMA user_version`).
pub const BUNDLE_VERSION: i64 = 1;

/// The tables of a bundle (see the module docs).
const BUNDLE_SCHEMA: &str = "
CREATE TABLE bundle (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE entries (
    key         TEXT PRIMARY KEY NOT NULL,
    value       BLOB,
    validator   TEXT,
    stored_at   INTEGER NOT NULL,
    fresh_until INTEGER NOT NULL,
    stale_until INTEGER NOT NULL
);
";

/// The columns an import reads (others are ignored: see "Versions" in the module docs).
const ENTRY_COLUMNS: [&str; 6] = [
    "key",
    "value",
    "validator",
    "stored_at",
    "fresh_until",
    "stale_until",
];

/// Options of [`TieredCache::export_with`](crate::TieredCache::export_with).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExportOptions {
    /// Only keys starting with this. Default: `""`, every key.
    pub prefix: String,
    /// Replace a file already at the path. Default: `false` (refused with
    /// [`BundleFault::Exists`]).
    pub overwrite: bool,
}

impl ExportOptions {
    /// The defaults: every key, never overwrite.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only keys starting with `prefix` (e.g. `"octo/app/"`). Default: every key.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Whether to replace a file already at the path. Default: `false`.
    #[must_use]
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }
}

/// What [`TieredCache::export`](crate::TieredCache::export) wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExportReport {
    /// The bundle file.
    pub path: PathBuf,
    /// The key prefix exported (`""`: every key).
    pub prefix: String,
    /// Entries written into the bundle.
    pub entries: u64,
    /// Bytes of their values and validators.
    pub bytes: u64,
    /// The bundle file's size in bytes.
    pub file_bytes: u64,
    /// "Not found" markers left out.
    pub skipped_negative: u64,
    /// Entries past their stale deadline left out (never servable again).
    pub skipped_expired: u64,
    /// Entries of keys with a pending write-behind write left out (in the memory outbox; the
    /// store leaves out those of its own outbox and does not count them).
    pub skipped_pending: u64,
}

/// What [`TieredCache::import`](crate::TieredCache::import) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ImportReport {
    /// The bundle file.
    pub path: PathBuf,
    /// Entries the bundle holds.
    pub entries: u64,
    /// Entries written into the cache.
    pub imported: u64,
    /// Bytes of their values and validators.
    pub bytes: u64,
    /// Entries not written: the cache held the key as new or newer.
    pub kept_newer: u64,
    /// Entries not written: the key has a pending write-behind write.
    pub kept_pending: u64,
    /// Entries not written: past their stale deadline.
    pub expired: u64,
}

pub(crate) fn fault(path: &Path, fault: BundleFault, message: impl Into<String>) -> Error {
    Error::Bundle {
        path: path.to_owned(),
        fault,
        message: message.into(),
        source: None,
    }
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::Bundle {
        path: path.to_owned(),
        fault: BundleFault::Io,
        message: format!("{what}: {e}"),
        source: Some(Arc::new(e)),
    }
}

fn sql<'a>(path: &'a Path, what: &'static str) -> impl Fn(rusqlite::Error) -> Error + 'a {
    move |e| {
        let fault = match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseCorrupt) => BundleFault::Corrupt,
            Some(rusqlite::ErrorCode::NotADatabase) => BundleFault::NotSqlite,
            _ => BundleFault::Io,
        };
        Error::Bundle {
            path: path.to_owned(),
            fault,
            message: format!("{what}: {e}"),
            source: Some(Arc::new(e)),
        }
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A bundle being written: a temporary file beside the target, removed unless
/// [`finish`](Self::finish)ed.
#[derive(Debug)]
pub(crate) struct BundleWriter {
    conn: Option<Connection>,
    tmp: PathBuf,
    path: PathBuf,
    overwrite: bool,
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
}

impl BundleWriter {
    /// Starts a bundle for `path`. Blocking (file system and SQLite).
    ///
    /// # Errors
    /// [`BundleFault::Exists`] when a file is at `path` and not `overwrite`;
    /// [`BundleFault::Io`].
    pub(crate) fn create(path: &Path, overwrite: bool) -> Result<Self> {
        if !overwrite && path.symlink_metadata().is_ok() {
            return Err(exists(path));
        }
        let name = path
            .file_name()
            .ok_or_else(|| fault(path, BundleFault::Io, "the path names no file"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = path.with_file_name(tmp_name);
        let conn = Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(path, "cannot create the bundle's temporary file"))?;
        let writer = Self {
            conn: Some(conn),
            tmp,
            path: path.to_owned(),
            overwrite,
            entries: 0,
            bytes: 0,
        };
        // A temporary file: no journal (a failed export deletes it); synced once at the end.
        writer
            .conn()?
            .execute_batch(&format!(
                "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
                 PRAGMA application_id={BUNDLE_APPLICATION_ID}; PRAGMA user_version={BUNDLE_VERSION};
                 {BUNDLE_SCHEMA} BEGIN;"
            ))
            .map_err(sql(path, "cannot write the bundle"))?;
        Ok(writer)
    }

    fn conn(&self) -> Result<&Connection> {
        self.conn.as_ref().ok_or_else(|| {
            fault(
                &self.path,
                BundleFault::Io,
                "the bundle was already finished",
            )
        })
    }

    /// Adds one entry. Blocking.
    pub(crate) fn add(&mut self, key: &str, e: &StoredEntry) -> Result<()> {
        self.conn()?
            .prepare_cached(
                "INSERT INTO entries (key, value, validator, stored_at, fresh_until, stale_until)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key,
                    e.value.as_deref(),
                    e.validator,
                    to_i64(e.stored_at),
                    to_i64(e.fresh_until),
                    to_i64(e.stale_until),
                ])
            })
            .map_err(sql(&self.path, "cannot write the bundle"))?;
        self.entries += 1;
        self.bytes += e.size() as u64;
        Ok(())
    }

    /// Writes the `bundle` rows, commits, syncs and moves the file into place (never over an
    /// existing file unless `overwrite`). Returns the file's size. Blocking.
    pub(crate) fn finish(mut self, meta: &[(&str, String)]) -> Result<u64> {
        let path = self.path.clone();
        {
            let conn = self.conn()?;
            let fail = sql(&path, "cannot write the bundle");
            let mut stmt = conn
                .prepare("INSERT INTO bundle (name, value) VALUES (?1, ?2)")
                .map_err(&fail)?;
            let counts = [
                ("format_version", BUNDLE_VERSION.to_string()),
                ("entries", self.entries.to_string()),
                ("bytes", self.bytes.to_string()),
            ];
            for (name, value) in counts
                .iter()
                .map(|(n, v)| (*n, v))
                .chain(meta.iter().map(|(n, v)| (*n, v)))
            {
                stmt.execute(params![name, value]).map_err(&fail)?;
            }
            drop(stmt);
            conn.execute_batch("COMMIT").map_err(&fail)?;
        }
        if let Some(conn) = self.conn.take() {
            conn.close()
                .map_err(|(_, e)| sql(&path, "cannot close the bundle")(e))?;
        }
        let file = std::fs::File::open(&self.tmp).map_err(io(&path, "cannot sync the bundle"))?;
        file.sync_all()
            .map_err(io(&path, "cannot sync the bundle"))?;
        let size = file
            .metadata()
            .map_err(io(&path, "cannot read the bundle's size"))?
            .len();
        drop(file);
        self.place()?;
        Ok(size)
    }

    /// Moves the finished temporary file to the path: a rename when overwriting; else a hard
    /// link, which fails if a file appeared at the path meanwhile (then the temporary name
    /// goes). Where hard links are not supported: a check, then a rename.
    fn place(&mut self) -> Result<()> {
        let path = self.path.clone();
        if self.overwrite {
            std::fs::rename(&self.tmp, &path)
                .map_err(io(&path, "cannot move the bundle into place"))?;
        } else {
            match std::fs::hard_link(&self.tmp, &path) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.tmp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(exists(&path));
                }
                Err(_) if path.symlink_metadata().is_ok() => return Err(exists(&path)),
                Err(_) => std::fs::rename(&self.tmp, &path)
                    .map_err(io(&path, "cannot move the bundle into place"))?,
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename's durability (best effort: not every platform opens directories).
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        drop(self.conn.take());
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn exists(path: &Path) -> Error {
    fault(
        path,
        BundleFault::Exists,
        "a file is already there; choose another path, or overwrite it (--force)",
    )
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A bundle read and checked whole.
#[derive(Debug)]
pub(crate) struct Bundle {
    /// Its entries in key order, each key once.
    pub(crate) entries: Vec<(String, StoredEntry)>,
}

/// Reads and checks the bundle at `path`, opened read-only (never changed). Blocking.
///
/// # Errors
/// [`Error::Bundle`]: [`BundleFault::Missing`], [`NotSqlite`](BundleFault::NotSqlite),
/// [`Foreign`](BundleFault::Foreign), [`Newer`](BundleFault::Newer),
/// [`Corrupt`](BundleFault::Corrupt), [`InvalidRow`](BundleFault::InvalidRow),
/// [`Io`](BundleFault::Io).
pub(crate) fn read_bundle(path: &Path) -> Result<Bundle> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(fault(path, BundleFault::Missing, "not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fault(path, BundleFault::Missing, "no such file"))
        }
        Err(e) => return Err(io(path, "cannot read the bundle")(e)),
    }
    let mut header = [0u8; 16];
    let read = {
        use std::io::Read as _;
        let mut f = std::fs::File::open(path).map_err(io(path, "cannot read the bundle"))?;
        f.read(&mut header)
            .map_err(io(path, "cannot read the bundle"))?
    };
    if read < header.len() || &header != b"SQLite format 3\0" {
        return Err(fault(
            path,
            BundleFault::NotSqlite,
            "not a SQLite database, so not a tiercache bundle",
        ));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(path, "cannot open the bundle"))?;
    let fail = sql(path, "cannot read the bundle");
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(&fail)?;
    if app_id == crate::tier::sqlite::APPLICATION_ID {
        return Err(fault(
            path,
            BundleFault::Foreign,
            "this is a tiercache cache database, not a bundle (`tiercache export FILE` makes a bundle of one)",
        ));
    }
    if app_id != BUNDLE_APPLICATION_ID {
        return Err(fault(
            path,
            BundleFault::Foreign,
            format!(
                "a SQLite database of another application (application_id {app_id:#x}; a bundle's is {BUNDLE_APPLICATION_ID:#x})"
            ),
        ));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&fail)?;
    if version > BUNDLE_VERSION {
        return Err(fault(
            path,
            BundleFault::Newer,
            format!("bundle format {version}, newer than this tiercache reads ({BUNDLE_VERSION}): upgrade tiercache"),
        ));
    }
    if version < 1 {
        return Err(fault(
            path,
            BundleFault::Corrupt,
            format!("bundle format {version} does not exist"),
        ));
    }
    check_integrity(&conn, path)?;
    check_columns(&conn, path)?;
    let entries = read_entries(&conn, path)?;
    let counted: Option<String> = rusqlite::OptionalExtension::optional(conn.query_row(
        "SELECT value FROM bundle WHERE name = 'entries'",
        [],
        |r| r.get(0),
    ))
    .map_err(&fail)?;
    if let Some(counted) = counted {
        if counted.parse::<usize>().ok() != Some(entries.len()) {
            return Err(fault(
                path,
                BundleFault::Corrupt,
                format!(
                    "it says it holds {counted} entries but holds {}",
                    entries.len()
                ),
            ));
        }
    }
    Ok(Bundle { entries })
}

fn check_integrity(conn: &Connection, path: &Path) -> Result<()> {
    let found: Vec<String> = conn
        .prepare("PRAGMA quick_check(10)")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(sql(path, "cannot check the bundle"))?;
    if found.len() == 1 && found[0] == "ok" {
        return Ok(());
    }
    Err(fault(
        path,
        BundleFault::Corrupt,
        format!("damaged: {}", found.join("; ")),
    ))
}

fn check_columns(conn: &Connection, path: &Path) -> Result<()> {
    let columns = |table: &str| -> Result<Vec<String>> {
        conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(sql(path, "cannot read the bundle's tables"))
    };
    let entries = columns("entries")?;
    let missing: Vec<&str> = ENTRY_COLUMNS
        .iter()
        .copied()
        .filter(|c| !entries.iter().any(|e| e == c))
        .collect();
    if !missing.is_empty() || columns("bundle")?.is_empty() {
        return Err(fault(
            path,
            BundleFault::Corrupt,
            format!(
                "its tables are not a bundle's (entries lacks [{}], or there is no bundle table)",
                missing.join(", ")
            ),
        ));
    }
    Ok(())
}

fn read_entries(conn: &Connection, path: &Path) -> Result<Vec<(String, StoredEntry)>> {
    let fail = sql(path, "cannot read the bundle's entries");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {} FROM entries ORDER BY key COLLATE BINARY",
            ENTRY_COLUMNS.join(", ")
        ))
        .map_err(&fail)?;
    let mut rows = stmt.query([]).map_err(&fail)?;
    let mut entries: Vec<(String, StoredEntry)> = Vec::new();
    let mut n = 0usize;
    while let Some(r) = rows.next().map_err(&fail)? {
        n += 1;
        let bad = |what: String| fault(path, BundleFault::InvalidRow, format!("row {n}: {what}"));
        let decoded = (|| -> rusqlite::Result<_> {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?,
                r.get::<_, Option<String>>(2)?,
                [
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ],
            ))
        })();
        let (key, value, validator, times) = decoded.map_err(|e| bad(e.to_string()))?;
        crate::key::validate(&key).map_err(|e| bad(format!("key {key:?}: {e}")))?;
        let times: Vec<u64> = times
            .iter()
            .map(|t| u64::try_from(*t))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("key {key:?}: a negative deadline")))?;
        // In key order: a key twice would be next to itself.
        if entries.last().is_some_and(|(k, _)| *k == key) {
            return Err(bad(format!("key {key:?} appears twice")));
        }
        entries.push((
            key,
            StoredEntry::new(
                value.map(Bytes::from),
                validator,
                times[0],
                times[1],
                times[2],
            ),
        ));
    }
    Ok(entries)
}
