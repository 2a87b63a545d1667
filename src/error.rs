//! The crate's one error type.

use std::path::PathBuf;
use std::sync::Arc;

use crate::key::KeyError;
use crate::lookup::StaleReason;
use crate::source::SourceError;

/// A boxed, shareable underlying error.
pub(crate) type BoxError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in tiercache.
///
/// Errors are `Clone`: single-flight hands one error to every waiter of a key.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key was refused before any tier was touched.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key, shortened and escaped for display.
        key: String,
        /// What is wrong with it.
        reason: KeyError,
    },
    /// The builder was given a configuration that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The SQLite tier failed (I/O, disk full, locked, corrupt).
    #[error("L2 storage error: {message}")]
    Storage {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The database file is not a SQLite database or is corrupt.
    #[error("the database file {path:?} is not a usable SQLite database: {message}")]
    CorruptDatabase {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        message: String,
    },
    /// The database file is a valid SQLite database of another application (its
    /// `application_id`, schema version or tables are not tiercache's). It was refused before
    /// anything was written to it, and [`OnCorrupt::MoveAside`](crate::OnCorrupt::MoveAside)
    /// never moves it: point `sqlite_path` at another file.
    #[error(
        "the database file {path:?} is not a tiercache database; it was left untouched: {message}"
    )]
    ForeignDatabase {
        /// The file.
        path: PathBuf,
        /// What was found in it.
        message: String,
    },
    /// The source failed and no stale copy could stand in for it.
    #[error("{key:?} is unavailable ({reason}): {source}")]
    Unavailable {
        /// The key.
        key: String,
        /// Why the source could not answer.
        reason: StaleReason,
        /// The source's error.
        #[source]
        source: SourceError,
    },
    /// The source refused a write or a read for a reason that is not an outage (401, a conflict,
    /// an unsupported operation, a key the source cannot parse).
    #[error("{key:?}: {source}")]
    Source {
        /// The key.
        key: String,
        /// The source's error.
        #[source]
        source: SourceError,
    },
    /// A cached or fetched value could not be decoded as the requested type. The bad entry was
    /// dropped from the caches.
    #[error("{key:?}: the value could not be decoded: {message}")]
    Decode {
        /// The key.
        key: String,
        /// What the decoder said.
        message: String,
    },
    /// A value could not be encoded.
    #[error("{key:?}: the value could not be encoded: {message}")]
    Encode {
        /// The key.
        key: String,
        /// What the encoder said.
        message: String,
    },
    /// The key does not exist at the source (returned by calls that need a value).
    #[error("{key:?} was not found")]
    NotFound {
        /// The key.
        key: String,
    },
    /// The cache has been closed.
    #[error("the cache is closed")]
    Closed,
}

impl Error {
    /// The source could not be reached, failed, or is rate-limited or circuit-broken, and no
    /// stale copy was available.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// The key was refused.
    pub fn is_invalid_key(&self) -> bool {
        matches!(self, Error::InvalidKey { .. })
    }

    /// The key does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// The L2 tier failed.
    pub fn is_storage(&self) -> bool {
        matches!(self, Error::Storage { .. } | Error::CorruptDatabase { .. })
    }

    /// The source's error, where one caused this.
    pub fn source_error(&self) -> Option<&SourceError> {
        match self {
            Error::Unavailable { source, .. } | Error::Source { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The database is full (the disk, or its `max_page_count`): retrying soon will not help.
    pub(crate) fn is_disk_full(&self) -> bool {
        let Error::Storage {
            source: Some(source),
            ..
        } = self
        else {
            return false;
        };
        source
            .downcast_ref::<rusqlite::Error>()
            .and_then(rusqlite::Error::sqlite_error_code)
            == Some(rusqlite::ErrorCode::DiskFull)
    }

    pub(crate) fn invalid_key(key: &str, reason: KeyError) -> Self {
        Error::InvalidKey {
            key: crate::key::display_key(key),
            reason,
        }
    }

    pub(crate) fn storage(what: &str, source: rusqlite::Error) -> Self {
        Error::Storage {
            message: format!("{what}: {source}"),
            source: Some(Arc::new(source)),
        }
    }
}

/// `Result<T, tiercache::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
