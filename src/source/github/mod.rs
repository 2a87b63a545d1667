//! The GitHub REST API as a [`Source`]: files in repositories, read with the contents API (raw
//! media type, conditional requests with the stored ETag), written with commits, listed with the
//! git trees API. Cold misses in bulk ([`Source::fetch_many`]) travel in one GraphQL request per
//! up to [`GitHubSourceBuilder::graphql_batch`] keys when a token is set (GitHub's GraphQL API
//! needs one), with a REST fallback for what GraphQL cannot give byte-exact (binary or
//! truncated blobs); see `graphql.rs` for the details, and why those values carry no validator.
//!
//! With [`GitHubSourceBuilder::revalidate_by_commit`], revalidation is pinned to a commit: a
//! batch resolves the ref once ("Get a commit", `application/vnd.github.sha`) and reads the files
//! at that sha, each value's validator records it (`<etag> @commit=<sha>`), and
//! [`Source::revalidate_many`] decides for every entry of one repository and ref with one
//! conditional request (a free 304 when the ref has not moved), then "Compare two commits" for
//! what changed; see `commits.rs` for the details and the fallbacks. A single `fetch` with an
//! ETag keeps its per-file conditional request (as cheap for one key).
//!
//! Keys are `owner/repo/path/to/file[@ref]`; see [`GitHubKey`] for the exact rules (notably: the
//! **last** `@` starts the ref).
//!
//! # HTTP
//! Requests go through [octocrab](https://docs.rs/octocrab)'s raw methods (`execute` on a request
//! built here), so every status, header and body is seen as GitHub sent it:
//! * octocrab is built without its `retry` feature, so there is no retry layer at all (the
//!   circuit breaker owns retrying), and octocrab 0.47 has no HTTP cache layer (L2 owns caching);
//!   redirects are not followed either (`follow-redirect` is off): a 3xx is a
//!   [`SourceError::Rejected`].
//! * every call, including the extra look-ups a `put`, `delete` or `list` needs, runs under one
//!   overall deadline ([`GitHubSourceBuilder::timeout`]) enforced with `tokio::time::timeout`;
//! * the `x-ratelimit-limit/remaining/reset` headers of every answer are kept, REST's budget
//!   ([`Source::rate_limit`]) apart from GraphQL's ([`GitHubSource::graphql_rate_limit`]), as
//!   `x-ratelimit-resource` tells them apart: a spent GraphQL budget holds off GraphQL only. While the last budget seen is spent (remaining 0, reset in the
//!   future by the configured [`Clock`]), or a secondary rate limit's `Retry-After` has not passed,
//!   calls send nothing and fail with [`SourceError::RateLimited`] at once. That is for a source
//!   used on its own: under a [`TieredCache`](crate::TieredCache), the cache's L3 circuit
//!   breaker is the gate. It opens on a rate-limited answer and on the answer that spent the
//!   budget, until the limit passes, and it is persisted, so it holds every cache sharing the
//!   database, whose own sources never saw the budget.

// Layout: `builder.rs` checks the settings; `transport.rs` sends one request and classifies a
// failed answer; `rate_limit.rs` keeps the budget and holds calls off; `contents.rs` reads,
// writes and deletes files; `trees.rs` lists them; `key.rs` parses keys; `codec.rs` holds the
// encodings; `graphql.rs` fetches many files in one GraphQL request; `commits.rs` resolves refs
// to commits and revalidates by commit. `GitHubSource` and its
// `Source` impl stay here.

mod builder;
mod codec;
mod commits;
mod contents;
mod graphql;
mod key;
mod rate_limit;
mod transport;
mod trees;

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use http::header::HeaderValue;
use octocrab::Octocrab;

pub use builder::GitHubSourceBuilder;
pub use key::GitHubKey;
use key::GitHubPrefix;
use rate_limit::Limits;

use super::{Fetched, RateLimit, Source, SourceError};
use crate::clock::Clock;
use crate::key::KeyError;

/// The public GitHub API.
pub const DEFAULT_BASE_URL: &str = "https://api.github.com";
/// The environment variable a token is read from when none is configured.
pub const TOKEN_ENV: &str = "GITHUB_TOKEN";
/// The default commit message template.
pub const DEFAULT_COMMIT_MESSAGE: &str = "tiercache: {op} {path}";
/// The target of this source's log events, in whichever file they are raised.
const LOG_TARGET: &str = module_path!();

/// A token, never printed.
#[derive(Clone)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// The GitHub REST API as an L3 [`Source`]. See the [module documentation](self).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tiercache::source::{Source, github::GitHubSource};
///
/// let gh = GitHubSource::builder()
///     .base_url("https://github.example.com/api/v3")
///     .timeout(Duration::from_secs(5))
///     .build()?;
/// let answer = gh.fetch("octo/app/config/prod.toml@main", None).await?;
/// # Ok(()) }
/// ```
pub struct GitHubSource {
    base: String,
    token: Option<Secret>,
    user_agent: HeaderValue,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    commit_message: String,
    clock: Arc<dyn Clock>,
    client: OnceLock<Octocrab>,
    limits: Mutex<Limits>,
    /// Keys per GraphQL request.
    graphql_batch: usize,
    /// The GraphQL endpoint answered 404: batches go through REST.
    graphql_missing: AtomicBool,
    /// Revalidation pinned to a commit (`commits.rs`).
    by_commit: bool,
    /// The refs' last commits and the moves verified (`commits.rs`).
    moves: Mutex<commits::Moves>,
    /// Held while a batch resolves a ref (`commits.rs`).
    resolving: tokio::sync::Mutex<()>,
}

impl fmt::Debug for GitHubSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubSource")
            .field("base_url", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("user_agent", &self.user_agent)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("commit_message", &self.commit_message)
            .field("rate_limit", &self.rate_limit())
            .field("graphql_batch", &self.graphql_batch)
            .field("graphql_rate_limit", &self.graphql_rate_limit())
            .finish_non_exhaustive()
    }
}

impl GitHubSource {
    /// A builder with every default (see each setter).
    pub fn builder() -> GitHubSourceBuilder {
        GitHubSourceBuilder::default()
    }

    /// The base URL requests go to, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The last GraphQL budget seen (GitHub keeps it apart from REST's, which
    /// [`Source::rate_limit`] reports), if a GraphQL request was answered.
    pub fn graphql_rate_limit(&self) -> Option<RateLimit> {
        self.graphql_budget()
    }

    /// Parses a key the way this source does (same as [`GitHubKey::parse`]).
    ///
    /// # Errors
    /// [`KeyError::Malformed`] naming the problem.
    pub fn parse_key(key: &str) -> Result<GitHubKey, KeyError> {
        GitHubKey::parse(key)
    }

    /// Runs `f` under the overall deadline, when one was set (see
    /// [`GitHubSourceBuilder::timeout`]).
    async fn within<T>(
        &self,
        f: impl Future<Output = Result<T, SourceError>>,
    ) -> Result<T, SourceError> {
        let Some(after) = self.timeout else {
            return f.await;
        };
        match tokio::time::timeout(after, f).await {
            Ok(r) => r,
            Err(_) => Err(SourceError::Timeout { after }),
        }
    }
}

/// The TTL of a value read at a full commit sha (a key `OWNER/REPO/PATH@<40 hex digits>`):
/// a century, so it is fresh for as long as it is cached, whatever the cache's TTL.
pub const PINNED_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `fetched` with the pinned TTL when `key` is pinned to a commit: a value or a "not modified"
/// (a "not found" keeps the cache's negative TTL: the commit may not be pushed yet).
fn pin(key: &GitHubKey, fetched: Fetched) -> Fetched {
    if !key.pinned_to_commit() {
        return fetched;
    }
    match fetched {
        Fetched::Value {
            value, validator, ..
        } => Fetched::Value {
            value,
            validator,
            ttl: Some(PINNED_TTL),
        },
        Fetched::NotModified { .. } => Fetched::NotModified {
            ttl: Some(PINNED_TTL),
        },
        other => other,
    }
}

#[async_trait]
impl Source for GitHubSource {
    /// A key pinned to a full commit sha ([`GitHubKey::pinned_to_commit`]) is answered with a
    /// TTL of [`PINNED_TTL`]: what a commit holds never changes, so it is never asked again.
    async fn fetch(&self, key: &str, validator: Option<&str>) -> Result<Fetched, SourceError> {
        let key = GitHubKey::parse(key).map_err(SourceError::InvalidKey)?;
        let fetched = self.within(self.fetch_validated(&key, validator)).await?;
        Ok(pin(&key, fetched))
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        let key = GitHubKey::parse(key).map_err(SourceError::InvalidKey)?;
        self.within(self.put_inner(&key, value)).await
    }

    async fn delete(&self, key: &str) -> Result<(), SourceError> {
        let key = GitHubKey::parse(key).map_err(SourceError::InvalidKey)?;
        self.within(self.delete_inner(&key)).await
    }

    /// One GraphQL request per up to [`GitHubSourceBuilder::graphql_batch`] keys (with a token;
    /// anonymous, or with a batch size of 1, one REST request per key), falling back to REST
    /// for the keys GraphQL cannot give byte-exact (one at a time, as GitHub asks of clients).
    /// All of it runs under the one deadline. GraphQL's own budget spent (its separate budget:
    /// [`GitHubSource::graphql_rate_limit`]) holds GraphQL off until its reset and sends the keys
    /// by REST meanwhile. A REST rate limit (or a secondary limit) fails the whole call, and so
    /// does an outage of the GraphQL request; a REST read's own failure is that key's answer.
    /// Values read through GraphQL carry no validator (GraphQL gives the blob's id, not the
    /// ETag): their first revalidation is a full read, which brings the ETag. With
    /// [`GitHubSourceBuilder::revalidate_by_commit`], each (repository, ref) is first resolved
    /// to its commit (one "Get a commit" request, conditional on the last sha seen; shared by
    /// the batches of one round) and the keys are read at that sha: every value's validator
    /// then records the commit (`@commit=<sha>`, after the ETag when REST gave one).
    async fn fetch_many(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        let mut answers = self.within(self.fetch_many_inner(keys)).await?;
        for (key, answer) in keys.iter().zip(answers.iter_mut()) {
            if let (Ok(key), Ok(fetched)) = (GitHubKey::parse(key), answer.as_mut()) {
                *fetched = pin(&key, std::mem::replace(fetched, Fetched::NotFound));
            }
        }
        Ok(answers)
    }

    /// With [`GitHubSourceBuilder::revalidate_by_commit`]: one conditional "Get a commit"
    /// request per (repository, ref) decides for all its entries, "Compare two commits" names
    /// what changed, and only the changed files are read again, in one batch (see `commits.rs`
    /// and the module documentation). Without it: one conditional request per key.
    async fn revalidate_many(
        &self,
        items: &[(&str, &str)],
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        self.within(self.revalidate_inner(items)).await
    }

    /// [`GitHubSourceBuilder::revalidate_by_commit`].
    fn revalidates_in_bulk(&self) -> bool {
        self.by_commit
    }

    /// [`GitHubSourceBuilder::graphql_batch`] when a token is set, else 1 (no batching).
    fn max_batch(&self) -> usize {
        if self.batches() {
            self.graphql_batch
        } else {
            1
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        let prefix = GitHubPrefix::parse(prefix).map_err(SourceError::InvalidKey)?;
        self.within(self.list_inner(&prefix)).await
    }

    fn check_key(&self, key: &str) -> Result<(), KeyError> {
        GitHubKey::parse(key).map(|_| ())
    }

    fn rate_limit(&self) -> Option<RateLimit> {
        self.budget()
    }
}
