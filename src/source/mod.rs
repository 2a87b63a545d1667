//! L3, the source of truth: the [`Source`] trait any app can implement, and the answers and errors
//! it speaks in. [`GitHubSource`](crate::source::github::GitHubSource) is the shipped one.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::key::KeyError;

mod error;
#[cfg(feature = "github")]
pub mod github;
pub(crate) mod guard;

pub use error::SourceError;

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
    /// When the window resets (RFC 3339 in JSON).
    #[serde(serialize_with = "crate::time::serde_rfc3339::serialize")]
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

    /// Fetches many keys unconditionally (cold misses: no validator) in as few requests as the
    /// source can, at most [`max_batch`](Self::max_batch) keys a call. The cache calls it for
    /// the cold misses of [`mget`](crate::TieredCache::mget) and
    /// [`warm`](crate::TieredCache::warm), under one breaker permit.
    ///
    /// `Ok` holds one answer per key, in the order of `keys`: a key can fail on its own (an
    /// invalid key, "not a file") without failing the others. `Err` means the batch as a whole
    /// failed (the request could not be sent, the source is down or rate-limited): the breaker
    /// counts it like a failed [`fetch`](Self::fetch); a key's own answer that says the source
    /// failed ([`SourceError::counts_as_failure`]) is reported to the breaker too, while every
    /// key keeps its answer. The default fetches the keys one by one; it fails the batch when
    /// the source is rate-limited ([`SourceError::rate_limited_until`]), or when the first key
    /// already finds it down (the rest would only wait for the same failure).
    ///
    /// # Errors
    /// A classified [`SourceError`] for the whole batch.
    async fn fetch_many(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        let mut answers = Vec::with_capacity(keys.len());
        for key in keys {
            match self.fetch(key, None).await {
                Err(e) if e.rate_limited_until().is_some() => return Err(e),
                Err(e) if e.counts_as_failure() && answers.is_empty() => return Err(e),
                answer => answers.push(answer),
            }
        }
        Ok(answers)
    }

    /// Revalidates many cached values at once: `items` are `(key, validator)` pairs, the
    /// validator the one stored with the cached copy. The answers are those of
    /// [`fetch`](Self::fetch) with that validator ([`Fetched::NotModified`] when the copy is
    /// still current), one per item in order; `Err` fails the batch as a whole, as in
    /// [`fetch_many`](Self::fetch_many). The cache calls it only when
    /// [`revalidates_in_bulk`](Self::revalidates_in_bulk) says so. The default revalidates the
    /// items one by one, with the same early exits as `fetch_many`'s default.
    ///
    /// # Errors
    /// A classified [`SourceError`] for the whole batch.
    async fn revalidate_many(
        &self,
        items: &[(&str, &str)],
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        let mut answers = Vec::with_capacity(items.len());
        for (key, validator) in items {
            match self.fetch(key, Some(validator)).await {
                Err(e) if e.rate_limited_until().is_some() => return Err(e),
                Err(e) if e.counts_as_failure() && answers.is_empty() => return Err(e),
                answer => answers.push(answer),
            }
        }
        Ok(answers)
    }

    /// Whether [`revalidate_many`](Self::revalidate_many) costs less than one
    /// [`fetch`](Self::fetch) per key. Default `false`: the cache then revalidates held
    /// entries one conditional call per key, concurrently.
    fn revalidates_in_bulk(&self) -> bool {
        false
    }

    /// How many keys one [`fetch_many`](Self::fetch_many) call may carry. The default, 1, says
    /// the source does not batch: the cache then fetches cold misses one call per key,
    /// concurrently.
    fn max_batch(&self) -> usize {
        1
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
