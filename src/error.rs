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
    /// The L2 store failed (I/O, disk full, locked, corrupt; for a store given to
    /// [`TieredCacheBuilder::store`](crate::TieredCacheBuilder::store), whatever it reports).
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
    /// A PostgreSQL schema this tiercache does not open: its version row is newer than this
    /// tiercache supports, or it holds tables that are not tiercache's. It was refused before
    /// anything was written to it: upgrade tiercache, or point the store at another schema.
    #[error("the PostgreSQL schema {location} was left untouched: {message}")]
    IncompatibleSchema {
        /// The schema and the server, as `"name" at postgres://user@host:port/db` (never a
        /// password).
        location: String,
        /// The schema version found, if any.
        found: Option<i64>,
        /// What was found in it.
        message: String,
    },
    /// The source failed and no stale copy could stand in for it. Its text names the key and
    /// the reason; the source's error is its [`source()`](std::error::Error::source).
    #[error("{key:?} is unavailable ({reason})")]
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
    /// an unsupported operation, a key the source cannot parse). Its text names the key; the
    /// source's error is its [`source()`](std::error::Error::source).
    #[error("the source refused {key:?}")]
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
    /// A dead letter was not retried: a newer write of its key came after it, and delivering
    /// the old write would roll the source back (I4). It stays a dead letter; discard it.
    #[error("dead letter {id} of {key:?} was superseded by a newer write of the key; retrying it would roll the source back (discard it instead)")]
    Superseded {
        /// The dead letter's id.
        id: i64,
        /// Its key.
        key: String,
    },
    /// A write-behind write was refused because the outbox is full: it holds `held` bytes of
    /// writes not yet delivered (and dead letters), and this write of `needed` bytes would take
    /// it past its bound of `limit` bytes
    /// ([`outbox_bound`](crate::tier::sqlite::outbox_bound)). Nothing of this write happened
    /// (L1, L2 and the outbox are as they were); every write acknowledged before it is kept and
    /// will be delivered. Retry once deliveries have caught up (or dead letters were resolved).
    #[error("the write-behind outbox is full ({held} of {limit} bytes held); the write of {key:?} ({needed} bytes) was refused")]
    OutboxFull {
        /// The key of the refused write.
        key: String,
        /// Bytes the write would have added (its key and value).
        needed: u64,
        /// Bytes the outbox holds.
        held: u64,
        /// The outbox's bound.
        limit: u64,
    },
    /// An offline bundle could not be written or read ([`TieredCache::export`] /
    /// [`TieredCache::import`]); [`fault`](BundleFault) says why. An import refused for any of
    /// these reasons changed nothing: the database and the bundle file are as they were.
    ///
    /// [`TieredCache::export`]: crate::TieredCache::export
    /// [`TieredCache::import`]: crate::TieredCache::import
    #[error("bundle {path:?}: {message}")]
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// Why, as a value to match on.
        fault: BundleFault,
        /// Why, in words.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The cache has been closed.
    #[error("the cache is closed")]
    Closed,
}

/// Why an offline bundle was refused ([`Error::Bundle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BundleFault {
    /// Export: a file is already at the path, and overwriting was not asked for.
    Exists,
    /// Import: no file at the path (or it is not a regular file).
    Missing,
    /// Import: the file is not a SQLite database.
    NotSqlite,
    /// Import: a SQLite database that is not a tiercache bundle (another `application_id`; a
    /// tiercache cache database is one of these too: export one to get a bundle).
    Foreign,
    /// Import: a bundle of a newer format than this tiercache reads.
    Newer,
    /// Import: the file is damaged (`PRAGMA quick_check`), or its tables are not a bundle's.
    Corrupt,
    /// Import: a row could not be decoded (a bad key, a value of the wrong type, deadlines out
    /// of order, a key twice).
    InvalidRow,
    /// The bundle file could not be read or written (I/O).
    Io,
    /// Export: the L2 store cannot list its entries
    /// ([`EntryStore::snapshot`](crate::tier::EntryStore::snapshot) is not implemented).
    Unsupported,
}

impl BundleFault {
    /// A stable name: `exists`, `missing`, `not_sqlite`, `foreign`, `newer`, `corrupt`,
    /// `invalid_row`, `io`, `unsupported`.
    pub fn as_str(self) -> &'static str {
        match self {
            BundleFault::Exists => "exists",
            BundleFault::Missing => "missing",
            BundleFault::NotSqlite => "not_sqlite",
            BundleFault::Foreign => "foreign",
            BundleFault::Newer => "newer",
            BundleFault::Corrupt => "corrupt",
            BundleFault::InvalidRow => "invalid_row",
            BundleFault::Io => "io",
            BundleFault::Unsupported => "unsupported",
        }
    }
}

impl std::fmt::Display for BundleFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// The source could not be reached, failed, or is rate-limited or circuit-broken, and no
    /// stale copy was available.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// A write-behind write was refused because the outbox is full ([`Error::OutboxFull`]):
    /// nothing of it happened, and what was acknowledged before is kept.
    pub fn is_outbox_full(&self) -> bool {
        matches!(self, Error::OutboxFull { .. })
    }

    /// The key was refused: by the cache ([`Error::InvalidKey`]) or by the source
    /// ([`SourceError::InvalidKey`]).
    pub fn is_invalid_key(&self) -> bool {
        matches!(self, Error::InvalidKey { .. })
            || matches!(self.source_error(), Some(SourceError::InvalidKey(_)))
    }

    /// The key does not exist: [`Error::NotFound`], or the source said so
    /// ([`SourceError::NotFound`], the answer of a write or delete).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
            || matches!(self.source_error(), Some(SourceError::NotFound { .. }))
    }

    /// An offline bundle was refused ([`Error::Bundle`]), with why.
    pub fn bundle_fault(&self) -> Option<BundleFault> {
        match self {
            Error::Bundle { fault, .. } => Some(*fault),
            _ => None,
        }
    }

    /// The L2 tier failed.
    pub fn is_storage(&self) -> bool {
        matches!(self, Error::Storage { .. } | Error::CorruptDatabase { .. })
    }

    /// This error and its causes, each said once (`error: cause: root cause`); a cause whose
    /// text the error already quotes is not repeated. What the `tiercache` command prints.
    ///
    /// ```
    /// use tiercache::source::SourceError;
    /// use tiercache::Error;
    ///
    /// let e = Error::Source {
    ///     key: "o/r/README.md".into(),
    ///     source: SourceError::unauthorized("Bad credentials").with_status(401),
    /// };
    /// assert_eq!(
    ///     e.report(),
    ///     "the source refused \"o/r/README.md\": source refused the credentials (HTTP 401): Bad credentials"
    /// );
    /// ```
    pub fn report(&self) -> String {
        chain_text(self)
    }

    /// A stable, machine-readable name for what went wrong, for logs, metrics and JSON (the
    /// `tiercache` command's `"kind"`). The set is part of the API: a name is never changed,
    /// and new ones may be added.
    ///
    /// | kind | when | retry? |
    /// |---|---|---|
    /// | `unavailable` | the source failed or timed out, no stale copy | yes, with backoff |
    /// | `rate_limited` | the source's budget is spent, no stale copy | after the reset |
    /// | `circuit_open` | the source failed recently and is not called, no stale copy | after the breaker's recovery |
    /// | `offline` | offline mode is on and nothing is cached | when back online |
    /// | `not_found` | the key does not exist | no |
    /// | `invalid_key` | the key was refused (by the cache or the source) | no |
    /// | `unauthorized` | the source refused the credentials | after fixing them |
    /// | `conflict` | the source refused a write (it changed meanwhile) | after re-reading |
    /// | `rejected` | the source refused the request for another reason | no |
    /// | `unsupported` | the source cannot do this (e.g. write) | no |
    /// | `config` | the builder's configuration cannot work | no |
    /// | `storage` | L2 failed: I/O, disk full, corrupt or foreign database file | depends |
    /// | `decode`, `encode` | a value did not (de)serialize as the type asked | no |
    /// | `superseded` | a dead letter was not retried: a newer write came after it | no: discard it |
    /// | `bundle` | an offline bundle could not be written or read ([`Error::Bundle`]) | no |
    /// | `closed` | the cache was closed | no |
    /// | `other` | anything else | |
    ///
    /// ```
    /// use tiercache::Error;
    ///
    /// assert_eq!(Error::NotFound { key: "o/r/x".into() }.kind(), "not_found");
    /// assert_eq!(Error::Closed.kind(), "closed");
    /// ```
    pub fn kind(&self) -> &'static str {
        use crate::lookup::StaleReason as R;
        #[allow(unreachable_patterns)] // Variants added later fall to `other` until named.
        match self {
            Error::InvalidKey { .. } => "invalid_key",
            Error::Config(_) => "config",
            Error::Storage { .. }
            | Error::CorruptDatabase { .. }
            | Error::ForeignDatabase { .. } => "storage",
            Error::Unavailable { reason, source, .. } => match (reason, source) {
                (R::RateLimited, _) | (_, SourceError::RateLimited { .. }) => "rate_limited",
                (R::CircuitOpen, _) | (_, SourceError::CircuitOpen { .. }) => "circuit_open",
                (R::Offline, _) => "offline",
                _ => "unavailable",
            },
            Error::Source { source, .. } => match source {
                SourceError::Unauthorized { .. } => "unauthorized",
                SourceError::Conflict { .. } => "conflict",
                SourceError::NotFound { .. } => "not_found",
                SourceError::InvalidKey(_) => "invalid_key",
                SourceError::Unsupported { .. } => "unsupported",
                SourceError::RateLimited { .. } => "rate_limited",
                SourceError::CircuitOpen { .. } => "circuit_open",
                SourceError::Rejected { .. } => "rejected",
                _ => "unavailable",
            },
            Error::Decode { .. } => "decode",
            Error::Encode { .. } => "encode",
            Error::NotFound { .. } => "not_found",
            Error::Superseded { .. } => "superseded",
            Error::Bundle { .. } => "bundle",
            Error::Closed => "closed",
            _ => "other",
        }
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

    /// A storage task on a blocking thread that did not finish (it panicked or was cancelled):
    /// "`what` stopped: …".
    pub(crate) fn stopped(what: &str) -> impl FnOnce(tokio::task::JoinError) -> Self + '_ {
        move |e| Error::Storage {
            message: format!("{what} stopped: {e}"),
            source: None,
        }
    }
}

/// An error and its causes, each said once: `error: cause: root cause`, for the texts the cache
/// keeps (a warm-up's failures). A cause whose text the error already quotes is not repeated.
pub(crate) fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let link = cause.to_string();
        if !text.contains(&link) {
            text.push_str(": ");
            text.push_str(&link);
        }
        next = cause.source();
    }
    text
}

/// `Result<T, tiercache::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    /// A wrapper that quotes its cause in its own text, as some storage errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("could not write: disk full")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn a_cause_the_error_quotes_is_not_repeated() {
        let quoting = Quoting(std::io::Error::other("disk full"));
        assert_eq!(chain_text(&quoting), "could not write: disk full");
    }

    /// An app's own error with a cause of its own, for a chain three links deep under the source.
    #[derive(Debug, thiserror::Error)]
    #[error("could not reach the catalog")]
    struct CatalogDown(#[source] std::io::Error);

    /// The text of every link of `e`'s chain, outermost first.
    fn links(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut next = e.source();
        while let Some(cause) = next {
            out.push(cause.to_string());
            next = cause.source();
        }
        out
    }

    fn every_source_error() -> Vec<SourceError> {
        let reset = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        vec![
            SourceError::unavailable("Bad Gateway").with_status(502),
            SourceError::timeout(Duration::from_secs(3)),
            SourceError::rate_limited(reset, "API rate limit exceeded").with_status(403),
            SourceError::unauthorized("Bad credentials").with_status(401),
            SourceError::conflict("sha mismatch").with_status(409),
            SourceError::not_found("Not Found"),
            SourceError::rejected("a directory, not a file").with_status(400),
            SourceError::InvalidKey(KeyError::Malformed("no path".into())),
            SourceError::invalid_response("expected JSON"),
            SourceError::CircuitOpen { until: Some(reset) },
            SourceError::unsupported("put"),
            SourceError::other("a plain message"),
            SourceError::other(CatalogDown(io)),
        ]
    }

    #[test]
    fn no_link_of_a_chain_repeats_the_next() {
        for source in every_source_error() {
            let wrapped = [
                Error::Unavailable {
                    key: "k/1".into(),
                    reason: StaleReason::SourceError,
                    source: source.clone(),
                },
                Error::Source {
                    key: "k/1".into(),
                    source: source.clone(),
                },
            ];
            for e in wrapped {
                let chain = links(&e);
                assert!(chain.len() >= 2, "{e:?} hides its source");
                assert_eq!(chain[1], source.to_string());
                for pair in chain.windows(2) {
                    assert!(
                        !pair[0].contains(&pair[1]),
                        "{:?} repeats its cause {:?}",
                        pair[0],
                        pair[1]
                    );
                }
            }
        }
    }

    #[test]
    fn the_chain_reaches_an_apps_own_error() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let e = Error::Unavailable {
            key: "parts/bolt".into(),
            reason: StaleReason::SourceError,
            source: SourceError::other(CatalogDown(io)),
        };
        assert_eq!(
            links(&e).join(": "),
            "\"parts/bolt\" is unavailable (source_error): source error: \
             could not reach the catalog: connection reset"
        );
        let cause = std::error::Error::source(&e)
            .and_then(std::error::Error::source)
            .expect("the app's error");
        assert!(cause.downcast_ref::<CatalogDown>().is_some());
    }

    #[test]
    fn invalid_key_and_not_found_include_the_sources_answers() {
        let key_error = || KeyError::Malformed("no path".into());
        let by_source = |source: SourceError| {
            [
                Error::Source {
                    key: "k".into(),
                    source: source.clone(),
                },
                Error::Unavailable {
                    key: "k".into(),
                    reason: StaleReason::SourceError,
                    source,
                },
            ]
        };

        assert!(Error::invalid_key("k", key_error()).is_invalid_key());
        for e in by_source(SourceError::InvalidKey(key_error())) {
            assert!(e.is_invalid_key() && !e.is_not_found(), "{e:?}");
        }

        assert!(Error::NotFound { key: "k".into() }.is_not_found());
        for e in by_source(SourceError::not_found("Not Found")) {
            assert!(e.is_not_found() && !e.is_invalid_key(), "{e:?}");
        }

        for e in by_source(SourceError::rejected("no")) {
            assert!(!e.is_not_found() && !e.is_invalid_key(), "{e:?}");
        }
    }

    #[test]
    fn other_source_errors_are_equal_only_to_their_clones() {
        let a = SourceError::other("boom");
        assert_eq!(a, a.clone());
        assert_ne!(a, SourceError::other("boom"));
        assert_eq!(
            SourceError::rejected("x").with_status(400),
            SourceError::Rejected {
                status: Some(400),
                message: "x".into()
            }
        );
        assert_ne!(SourceError::rejected("x"), SourceError::conflict("x"));
    }

    #[test]
    fn kinds_are_stable_names() {
        use std::time::{Duration, SystemTime};
        let unavailable = |reason, source| Error::Unavailable {
            key: "k".into(),
            reason,
            source,
        };
        let refused = |source| Error::Source {
            key: "k".into(),
            source,
        };
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(60);
        let cases = [
            (
                unavailable(StaleReason::SourceError, SourceError::unavailable("x")),
                "unavailable",
            ),
            (
                unavailable(
                    StaleReason::Timeout,
                    SourceError::Timeout {
                        after: Duration::from_secs(1),
                    },
                ),
                "unavailable",
            ),
            (
                unavailable(
                    StaleReason::RateLimited,
                    SourceError::rate_limited(until, "x"),
                ),
                "rate_limited",
            ),
            (
                unavailable(
                    StaleReason::CircuitOpen,
                    SourceError::CircuitOpen { until: None },
                ),
                "circuit_open",
            ),
            (
                unavailable(StaleReason::Offline, SourceError::unavailable("x")),
                "offline",
            ),
            (refused(SourceError::unauthorized("x")), "unauthorized"),
            (refused(SourceError::not_found("x")), "not_found"),
            (refused(SourceError::rejected("x")), "rejected"),
            (
                refused(SourceError::InvalidKey(KeyError::Empty)),
                "invalid_key",
            ),
            (Error::invalid_key("", KeyError::Empty), "invalid_key"),
            (Error::Config("x".into()), "config"),
            (
                Error::Storage {
                    message: "x".into(),
                    source: None,
                },
                "storage",
            ),
            (Error::NotFound { key: "k".into() }, "not_found"),
            (
                Error::Superseded {
                    id: 1,
                    key: "k".into(),
                },
                "superseded",
            ),
            (Error::Closed, "closed"),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e:?}");
        }
    }
}
