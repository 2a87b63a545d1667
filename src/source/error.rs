//! [`SourceError`]: how a call to a source failed, classified for the circuit breaker, with the
//! constructors an app's own source builds them with.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::key::KeyError;

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
    /// [`Fetched::NotFound`](super::Fetched::NotFound)).
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
                "source rate limited; resets {}{}: {message}",
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
                    Some(t) => write!(f, "; next try {}", fmt_time(t)),
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

/// `in 42s (at 14:03:12 UTC)`, against the wall clock.
fn fmt_time(t: &SystemTime) -> String {
    crate::time::describe_at(*t, SystemTime::now())
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
