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
//! What the target keeps no record of, an import cannot respect: a key deleted in the target
//! (or at the source) after the bundle's copy was fetched has no entry to compare with, so the
//! import brings that copy back, served until its deadlines pass or a revalidation finds the
//! delete, as restoring a backup would (I2 holds only for deletes newer than the import). The
//! intended target is a fresh runner's database, or one the bundle is newer than. `stored_at`
//! is the exporting machine's clock: clocks far apart skew the "newer" test.
//!
//! Entries past their stale deadline at import time are skipped ([`ImportReport::expired`]).
//! A refused bundle ([`Error::Bundle`]) changes nothing; the bundle file is opened read-only and
//! never changed. An import larger than L2's bound is cut back by the usual eviction (expired,
//! then least recently used: imported entries count as last used when they were stored).

mod read;
mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{BundleFault, Error};

pub(crate) use read::read_bundle;
pub(crate) use write::BundleWriter;

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
