//! L3, the source of truth: the [`Source`] trait any app can implement, and the answers and errors
//! it speaks in. [`GitHubSource`](crate::source::github::GitHubSource) is the shipped one.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::key::KeyError;

#[cfg(feature = "github")]
pub mod github;
pub(crate) mod guard;

/// The answer of a successful [`Source::fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fetched {
    /// A new value.
    Value {
        /// The bytes.
        value: Bytes,
        /// A validator (an HTTP ETag, exactly as received) to send back on the next fetch.
        validator: Option<String>,
        /// How long the source says the value stays fresh, overriding the cache's TTL.
        ttl: Option<Duration>,
    },
    /// The value held under the validator that was sent is still current.
    NotModified {
        /// How long the source says the value stays fresh.
        ttl: Option<Duration>,
    },
    /// The key does not exist at the source.
    NotFound,
}

impl Fetched {
    /// A new value with no validator and no TTL hint.
    pub fn value(value: impl Into<Bytes>) -> Self {
        Fetched::Value {
            value: value.into(),
            validator: None,
            ttl: None,
        }
    }

    /// A new value with a validator.
    pub fn value_with_validator(value: impl Into<Bytes>, validator: impl Into<String>) -> Self {
        Fetched::Value {
            value: value.into(),
            validator: Some(validator.into()),
            ttl: None,
        }
    }

    /// "Not modified", with no TTL hint.
    pub fn not_modified() -> Self {
        Fetched::NotModified { ttl: None }
    }
}

/// The last rate-limit budget a source reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RateLimit {
    /// Requests allowed per window.
    pub limit: u64,
    /// Requests left in this window.
    pub remaining: u64,
    /// When the window resets.
    pub reset: SystemTime,
}

impl RateLimit {
    /// A budget.
    pub fn new(limit: u64, remaining: u64, reset: SystemTime) -> Self {
        Self {
            limit,
            remaining,
            reset,
        }
    }
}

/// A failed call to a source, classified for the circuit breaker.
///
/// A source built by an app makes these with the constructors ([`unavailable`](Self::unavailable),
/// [`rejected`](Self::rejected), [`other`](Self::other), ...), adding an HTTP status with
/// [`with_status`](Self::with_status) where there was one. Only [`Other`](Self::Other) has a
/// [`source()`](std::error::Error::source); no variant repeats it in its own text.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SourceError {
    /// The source is down or unreachable: a 5xx, a refused or reset connection. Counts against
    /// the breaker.
    Unavailable {
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// What went wrong, with the source's own text where it gave one.
        message: String,
    },
    /// The call did not finish within its deadline. Counts against the breaker.
    Timeout {
        /// The deadline that passed.
        after: Duration,
    },
    /// The source's budget is spent until `until` (a primary or secondary rate limit).
    RateLimited {
        /// When calls may be made again.
        until: SystemTime,
        /// HTTP status (403 or 429).
        status: Option<u16>,
        /// The source's own text.
        message: String,
    },
    /// Credentials were refused (401). A configuration problem, not an outage.
    Unauthorized {
        /// HTTP status.
        status: Option<u16>,
        /// The source's own text.
        message: String,
    },
    /// A write conflicted with the source's current state (409, 422: a stale sha, a conflict).
    Conflict {
        /// HTTP status.
        status: Option<u16>,
        /// The source's own text.
        message: String,
    },
    /// The key does not exist at the source (for writes and deletes; reads answer
    /// [`Fetched::NotFound`]).
    NotFound {
        /// The source's own text.
        message: String,
    },
    /// The request was refused for good (another 4xx, a directory where a file was expected).
    Rejected {
        /// HTTP status.
        status: Option<u16>,
        /// The source's own text.
        message: String,
    },
    /// The source refused the key's shape; nothing was sent.
    InvalidKey(KeyError),
    /// The source answered something that could not be understood. Counts against the breaker.
    InvalidResponse {
        /// What was wrong with the answer.
        message: String,
    },
    /// The call was not sent: the source's circuit breaker is open (it failed recently, or its
    /// rate-limit budget is spent) until `until`.
    CircuitOpen {
        /// When a call may be tried again (none when the breaker was forced open).
        until: Option<SystemTime>,
    },
    /// The source does not support the operation (a read-only source asked to write).
    Unsupported {
        /// The operation.
        operation: &'static str,
    },
    /// Any other failure, kept whole: it is this error's
    /// [`source()`](std::error::Error::source), and its own text is only "source error". Counts
    /// against the breaker (an error nobody classified is taken for an outage, and a write that
    /// fails with it is retried); use [`rejected`](Self::rejected) for a request that can never
    /// succeed.
    Other(Arc<dyn std::error::Error + Send + Sync + 'static>),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Unavailable { status, message } => {
                write!(f, "source unavailable{}: {message}", status_suffix(status))
            }
            SourceError::Timeout { after } => write!(f, "source timed out after {after:?}"),
            SourceError::RateLimited {
                until,
                status,
                message,
            } => write!(
                f,
                "source rate limited until {}{}: {message}",
                fmt_time(until),
                status_suffix(status)
            ),
            SourceError::Unauthorized { status, message } => write!(
                f,
                "source refused the credentials{}: {message}",
                status_suffix(status)
            ),
            SourceError::Conflict { status, message } => write!(
                f,
                "source reported a conflict{}: {message}",
                status_suffix(status)
            ),
            SourceError::NotFound { message } => write!(f, "not found at the source: {message}"),
            SourceError::Rejected { status, message } => write!(
                f,
                "source rejected the request{}: {message}",
                status_suffix(status)
            ),
            SourceError::InvalidKey(reason) => write!(f, "invalid key for this source: {reason}"),
            SourceError::InvalidResponse { message } => {
                write!(f, "source answered garbage: {message}")
            }
            SourceError::CircuitOpen { until } => {
                f.write_str("not sent: the source's circuit breaker is open")?;
                match until {
                    Some(t) => write!(f, " until {}", fmt_time(t)),
                    None => Ok(()),
                }
            }
            SourceError::Unsupported { operation } => {
                write!(f, "the source does not support {operation}")
            }
            // The error itself is the source(): saying it here too would print it twice.
            SourceError::Other(_) => f.write_str("source error"),
        }
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SourceError::Other(e) => Some(&**e),
            _ => None,
        }
    }
}

/// Equal variants with equal fields; two [`SourceError::Other`] are equal when they share one
/// underlying error (clones of one `SourceError`).
impl PartialEq for SourceError {
    fn eq(&self, other: &Self) -> bool {
        use SourceError as E;
        match (self, other) {
            (
                E::Unavailable { status, message },
                E::Unavailable {
                    status: s,
                    message: m,
                },
            )
            | (
                E::Unauthorized { status, message },
                E::Unauthorized {
                    status: s,
                    message: m,
                },
            )
            | (
                E::Conflict { status, message },
                E::Conflict {
                    status: s,
                    message: m,
                },
            )
            | (
                E::Rejected { status, message },
                E::Rejected {
                    status: s,
                    message: m,
                },
            ) => status == s && message == m,
            (E::Timeout { after }, E::Timeout { after: a }) => after == a,
            (
                E::RateLimited {
                    until,
                    status,
                    message,
                },
                E::RateLimited {
                    until: u,
                    status: s,
                    message: m,
                },
            ) => until == u && status == s && message == m,
            (E::NotFound { message }, E::NotFound { message: m })
            | (E::InvalidResponse { message }, E::InvalidResponse { message: m }) => message == m,
            (E::InvalidKey(a), E::InvalidKey(b)) => a == b,
            (E::CircuitOpen { until }, E::CircuitOpen { until: u }) => until == u,
            (E::Unsupported { operation }, E::Unsupported { operation: o }) => operation == o,
            (E::Other(a), E::Other(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for SourceError {}

fn status_suffix(status: &Option<u16>) -> String {
    status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
}

fn fmt_time(t: &SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!("unix time {}", d.as_secs()),
        Err(_) => "the past".to_owned(),
    }
}

impl SourceError {
    /// [`SourceError::Unavailable`]: the source is down or unreachable.
    ///
    /// ```
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::unavailable("connection refused");
    /// assert!(e.counts_as_failure() && e.is_transient());
    /// assert_eq!(e.to_string(), "source unavailable: connection refused");
    /// ```
    pub fn unavailable(message: impl Into<String>) -> Self {
        SourceError::Unavailable {
            status: None,
            message: message.into(),
        }
    }

    /// [`SourceError::Timeout`]: the call did not finish within `after`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::timeout(Duration::from_secs(3));
    /// assert!(e.counts_as_failure());
    /// ```
    pub fn timeout(after: Duration) -> Self {
        SourceError::Timeout { after }
    }

    /// [`SourceError::RateLimited`]: no calls until `until`.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tiercache::source::SourceError;
    ///
    /// let reset = SystemTime::now() + Duration::from_secs(60);
    /// let e = SourceError::rate_limited(reset, "quota spent").with_status(429);
    /// assert_eq!(e.rate_limited_until(), Some(reset));
    /// assert!(!e.counts_as_failure() && e.is_transient());
    /// ```
    pub fn rate_limited(until: SystemTime, message: impl Into<String>) -> Self {
        SourceError::RateLimited {
            until,
            status: None,
            message: message.into(),
        }
    }

    /// [`SourceError::Unauthorized`]: the credentials were refused.
    ///
    /// ```
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::unauthorized("bad token").with_status(401);
    /// assert!(!e.is_transient());
    /// ```
    pub fn unauthorized(message: impl Into<String>) -> Self {
        SourceError::Unauthorized {
            status: None,
            message: message.into(),
        }
    }

    /// [`SourceError::Conflict`]: a write conflicted with the source's current state.
    ///
    /// ```
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::conflict("version 7 is not the latest").with_status(409);
    /// assert!(!e.counts_as_failure() && !e.is_transient());
    /// ```
    pub fn conflict(message: impl Into<String>) -> Self {
        SourceError::Conflict {
            status: None,
            message: message.into(),
        }
    }

    /// [`SourceError::NotFound`]: the key of a write or delete does not exist at the source.
    ///
    /// ```
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::not_found("no such row");
    /// assert_eq!(e.to_string(), "not found at the source: no such row");
    /// ```
    pub fn not_found(message: impl Into<String>) -> Self {
        SourceError::NotFound {
            message: message.into(),
        }
    }

    /// [`SourceError::Rejected`]: the request was refused for good; retrying cannot help.
    ///
    /// ```
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::rejected("values must be UTF-8").with_status(400);
    /// assert_eq!(e.to_string(), "source rejected the request (HTTP 400): values must be UTF-8");
    /// assert!(!e.is_transient());
    /// ```
    pub fn rejected(message: impl Into<String>) -> Self {
        SourceError::Rejected {
            status: None,
            message: message.into(),
        }
    }

    /// [`SourceError::InvalidResponse`]: the source answered something that could not be
    /// understood.
    ///
    /// ```
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::invalid_response("expected JSON");
    /// assert!(e.counts_as_failure());
    /// ```
    pub fn invalid_response(message: impl Into<String>) -> Self {
        SourceError::InvalidResponse {
            message: message.into(),
        }
    }

    /// [`SourceError::Unsupported`]: the source does not do `operation` (`"put"`, `"list"`, ...).
    ///
    /// ```
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::unsupported("list");
    /// assert_eq!(e.to_string(), "the source does not support list");
    /// ```
    pub fn unsupported(operation: &'static str) -> Self {
        SourceError::Unsupported { operation }
    }

    /// [`SourceError::Other`]: any other error, kept whole as this error's
    /// [`source()`](std::error::Error::source) (a string works too).
    ///
    /// ```
    /// use std::error::Error as _;
    /// use tiercache::source::SourceError;
    ///
    /// let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe closed");
    /// let e = SourceError::other(io);
    /// assert_eq!(e.to_string(), "source error");
    /// let cause = e.source().expect("the io error");
    /// assert_eq!(cause.to_string(), "pipe closed");
    /// assert!(cause.downcast_ref::<std::io::Error>().is_some());
    /// assert!(e.counts_as_failure());
    /// ```
    pub fn other(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        SourceError::Other(Arc::from(error.into()))
    }

    /// The same error with HTTP status `status`, on the variants that carry one
    /// ([`Unavailable`](Self::Unavailable), [`RateLimited`](Self::RateLimited),
    /// [`Unauthorized`](Self::Unauthorized), [`Conflict`](Self::Conflict),
    /// [`Rejected`](Self::Rejected)); the others are returned unchanged.
    ///
    /// ```
    /// use tiercache::source::SourceError;
    ///
    /// let e = SourceError::unavailable("Bad Gateway").with_status(502);
    /// assert_eq!(e.to_string(), "source unavailable (HTTP 502): Bad Gateway");
    /// ```
    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        match &mut self {
            SourceError::Unavailable { status: s, .. }
            | SourceError::RateLimited { status: s, .. }
            | SourceError::Unauthorized { status: s, .. }
            | SourceError::Conflict { status: s, .. }
            | SourceError::Rejected { status: s, .. } => *s = Some(status),
            _ => {}
        }
        self
    }

    /// Whether this error is evidence the source is failing (5xx, connect error, timeout,
    /// garbage, an unclassified [`Other`](Self::Other)), so it counts against the circuit
    /// breaker. Bad keys, 401, 404 and conflicts are not.
    pub fn counts_as_failure(&self) -> bool {
        matches!(
            self,
            SourceError::Unavailable { .. }
                | SourceError::Timeout { .. }
                | SourceError::InvalidResponse { .. }
                | SourceError::Other(_)
        )
    }

    /// `Some(instant)` when the source is out of budget until then.
    pub fn rate_limited_until(&self) -> Option<SystemTime> {
        match self {
            SourceError::RateLimited { until, .. } => Some(*until),
            _ => None,
        }
    }

    /// Whether retrying the same call later can succeed (an outage, a timeout, a rate limit).
    /// A write that fails with a non-transient error goes to the dead letters.
    pub fn is_transient(&self) -> bool {
        self.counts_as_failure()
            || matches!(
                self,
                SourceError::RateLimited { .. } | SourceError::CircuitOpen { .. }
            )
    }
}

/// The source of truth behind the cache (L3).
///
/// Implementations classify their failures with [`SourceError`] so the breaker can tell an outage
/// from a bad request. The trait is object safe; the cache holds an `Arc<dyn Source>`.
///
/// ```
/// use async_trait::async_trait;
/// use tiercache::source::{Fetched, Source, SourceError};
///
/// #[derive(Debug)]
/// struct Upper;
///
/// #[async_trait]
/// impl Source for Upper {
///     async fn fetch(&self, key: &str, _validator: Option<&str>) -> Result<Fetched, SourceError> {
///         Ok(Fetched::value(key.to_uppercase()))
///     }
/// }
/// ```
#[async_trait]
pub trait Source: Send + Sync + fmt::Debug + 'static {
    /// Fetches `key`. `validator` is the one stored with the cached copy, if any; a source that
    /// supports conditional requests answers [`Fetched::NotModified`] when it still matches.
    ///
    /// # Errors
    /// A classified [`SourceError`].
    async fn fetch(&self, key: &str, validator: Option<&str>) -> Result<Fetched, SourceError>;

    /// Writes `value` under `key` (write-through and write-behind). Must be idempotent: writing
    /// what is already there succeeds. The default refuses: the source is read-only.
    ///
    /// # Errors
    /// A classified [`SourceError`]; [`SourceError::Unsupported`] by default.
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        let _ = (key, value);
        Err(SourceError::Unsupported { operation: "put" })
    }

    /// Deletes `key`. Deleting what is not there succeeds. The default refuses.
    ///
    /// # Errors
    /// A classified [`SourceError`]; [`SourceError::Unsupported`] by default.
    async fn delete(&self, key: &str) -> Result<(), SourceError> {
        let _ = key;
        Err(SourceError::Unsupported {
            operation: "delete",
        })
    }

    /// Lists the keys under `prefix` (used by [`warm`](crate::TieredCache::warm)). The default
    /// refuses.
    ///
    /// # Errors
    /// A classified [`SourceError`]; [`SourceError::Unsupported`] by default.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        let _ = prefix;
        Err(SourceError::Unsupported { operation: "list" })
    }

    /// Checks a key's shape for this source before any tier is touched. The default accepts every
    /// key that passed the cache's own rules.
    ///
    /// # Errors
    /// [`KeyError::Malformed`] naming the problem.
    fn check_key(&self, key: &str) -> Result<(), KeyError> {
        let _ = key;
        Ok(())
    }

    /// The last rate-limit budget seen, if the source has one.
    fn rate_limit(&self) -> Option<RateLimit> {
        None
    }
}

/// A source with nothing behind it: every fetch is "not found", every write is refused. The
/// source of a cache used purely as a persistent two-tier store with [`Strategy::CacheAside`].
///
/// [`Strategy::CacheAside`]: crate::Strategy::CacheAside
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSource;

#[async_trait]
impl Source for NoSource {
    async fn fetch(&self, _key: &str, _validator: Option<&str>) -> Result<Fetched, SourceError> {
        Ok(Fetched::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_safe_and_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<std::sync::Arc<dyn Source>>();
        assert_send_sync::<SourceError>();
        let s: Box<dyn Source> = Box::new(NoSource);
        assert!(format!("{s:?}").contains("NoSource"));
    }

    #[test]
    fn classification() {
        let e = SourceError::Unavailable {
            status: Some(502),
            message: "Bad Gateway".into(),
        };
        assert!(e.counts_as_failure() && e.is_transient());
        assert_eq!(e.to_string(), "source unavailable (HTTP 502): Bad Gateway");
        let r = SourceError::RateLimited {
            until: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            status: Some(403),
            message: "API rate limit exceeded".into(),
        };
        assert!(!r.counts_as_failure() && r.is_transient());
        assert!(r.rate_limited_until().is_some());
        let c = SourceError::Conflict {
            status: Some(409),
            message: "sha mismatch".into(),
        };
        assert!(!c.counts_as_failure() && !c.is_transient());
    }
}
