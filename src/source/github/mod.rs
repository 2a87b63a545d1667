//! The GitHub REST API as a [`Source`]: files in repositories, read with the contents API (raw
//! media type, conditional requests with the stored ETag), written with commits, listed with the
//! git trees API.
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
//! * the `x-ratelimit-limit/remaining/reset` headers of every answer are kept
//!   ([`Source::rate_limit`]). While the last budget seen is spent (remaining 0, reset in the
//!   future by the configured [`Clock`]), or a secondary rate limit's `Retry-After` has not passed,
//!   calls send nothing and fail with [`SourceError::RateLimited`] at once.

mod codec;
mod key;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, ETAG, IF_NONE_MATCH, USER_AGENT,
};
use http::{HeaderMap, Method, StatusCode, Uri};
use octocrab::Octocrab;
use serde_json::{json, Value};

pub use key::GitHubKey;
use key::{encode, repo_path, GitHubPrefix};

use super::{Fetched, RateLimit, Source, SourceError};
use crate::clock::{Clock, SystemClock};
use crate::key::KeyError;

/// The public GitHub API.
pub const DEFAULT_BASE_URL: &str = "https://api.github.com";
/// The environment variable a token is read from when none is configured.
pub const TOKEN_ENV: &str = "GITHUB_TOKEN";
/// The default commit message template.
pub const DEFAULT_COMMIT_MESSAGE: &str = "tiercache: {op} {path}";

const RAW: &str = "application/vnd.github.raw+json";
const OBJECT: &str = "application/vnd.github.object+json";
const JSON: &str = "application/vnd.github+json";
const API_VERSION: &str = "2022-11-28";
/// How long to hold off after a secondary rate limit that gave no `Retry-After` (GitHub's docs:
/// "wait for at least one minute").
const SECONDARY_DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// A token, never printed.
#[derive(Clone)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

#[derive(Debug, Clone)]
enum TokenSetting {
    FromEnv,
    Given(Secret),
    Anonymous,
}

/// Configures a [`GitHubSource`]. Made by [`GitHubSource::builder`].
#[must_use = "a builder does nothing until .build() is called"]
#[derive(Debug, Clone)]
pub struct GitHubSourceBuilder {
    base_url: String,
    token: TokenSetting,
    user_agent: String,
    timeout: Duration,
    connect_timeout: Duration,
    commit_message: String,
    clock: Arc<dyn Clock>,
}

impl Default for GitHubSourceBuilder {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            token: TokenSetting::FromEnv,
            user_agent: concat!("tiercache/", env!("CARGO_PKG_VERSION")).to_owned(),
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            commit_message: DEFAULT_COMMIT_MESSAGE.to_owned(),
            clock: Arc::new(SystemClock),
        }
    }
}

impl GitHubSourceBuilder {
    /// The API's base URL. Default [`DEFAULT_BASE_URL`] (`https://api.github.com`). For GitHub
    /// Enterprise Server give `https://HOST/api/v3`; a trailing `/` is ignored. `http://` is
    /// accepted (a loopback fake in tests).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// The token to authenticate with (sent as `Authorization: Bearer …`). Default: none given,
    /// so the `GITHUB_TOKEN` environment variable is read at [`build`](Self::build) (see
    /// [`token_from_env`](Self::token_from_env)). Surrounding whitespace is trimmed.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = TokenSetting::Given(Secret(token.into()));
        self
    }

    /// Reads the token from the `GITHUB_TOKEN` environment variable at [`build`](Self::build);
    /// unset or blank means anonymous. This is the default; it undoes [`token`](Self::token) and
    /// [`anonymous`](Self::anonymous).
    pub fn token_from_env(mut self) -> Self {
        self.token = TokenSetting::FromEnv;
        self
    }

    /// Sends no token, whatever the environment says. Default: off (the environment is read).
    pub fn anonymous(mut self) -> Self {
        self.token = TokenSetting::Anonymous;
        self
    }

    /// The `User-Agent` sent (GitHub requires one). Default `tiercache/{version}`. Note that
    /// octocrab always adds its own `User-Agent: octocrab` header too.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// The overall deadline of one call (`fetch`, `put`, `delete`, `list`, including every
    /// request and body it needs). Default 10 s. Past it: [`SourceError::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The deadline for opening a TCP connection. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The commit message template for `put` and `delete`. `{op}` becomes `create`, `update` or
    /// `delete`, `{path}` the file's path, `{key}` the whole key. Default
    /// [`DEFAULT_COMMIT_MESSAGE`] (`tiercache: {op} {path}`).
    pub fn commit_message(mut self, template: impl Into<String>) -> Self {
        self.commit_message = template.into();
        self
    }

    /// The clock the rate-limit reset instants are compared with. Default [`SystemClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the source.
    ///
    /// The HTTP client is made now when called inside a tokio runtime, else on the first call
    /// (octocrab spawns a worker task on the runtime current when it is made, so the source
    /// should be used on that runtime).
    ///
    /// # Errors
    /// [`crate::Error::Config`] for a base URL that is not an absolute `http(s)` URL without query
    /// or fragment, a token that cannot go in an HTTP header, a user agent that cannot, or a
    /// zero timeout.
    pub fn build(self) -> crate::Result<GitHubSource> {
        let config_err = |m: String| crate::Error::Config(m);
        let base = self.base_url.trim().trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|e| config_err(format!("GitHub base URL {base:?} is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(config_err(format!(
                    "GitHub base URL {base:?} must start with https:// or http://"
                )))
            }
        }
        if uri.authority().is_none() {
            return Err(config_err(format!("GitHub base URL {base:?} has no host")));
        }
        if base.contains('?') || base.contains('#') {
            return Err(config_err(format!(
                "GitHub base URL {base:?} must not have a query or fragment"
            )));
        }
        let token = match self.token {
            TokenSetting::Given(Secret(t)) => Some(t),
            TokenSetting::FromEnv => std::env::var(TOKEN_ENV).ok(),
            TokenSetting::Anonymous => None,
        }
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
        if let Some(t) = &token {
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(config_err(
                    "the GitHub token holds characters that cannot go in an HTTP header \
                     (the token itself is not shown)"
                        .to_owned(),
                ));
            }
        }
        let user_agent = HeaderValue::from_str(&self.user_agent).map_err(|_| {
            config_err(format!(
                "the user agent {:?} cannot go in an HTTP header",
                self.user_agent
            ))
        })?;
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(config_err("GitHub timeouts must be above zero".to_owned()));
        }
        let source = GitHubSource {
            base,
            token: token.map(Secret),
            user_agent,
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            commit_message: self.commit_message,
            clock: self.clock,
            client: OnceLock::new(),
            limits: Mutex::new(Limits::default()),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            let client = source.make_client().map_err(config_err)?;
            let _ = source.client.set(client);
        }
        Ok(source)
    }
}

#[derive(Debug, Default)]
struct Limits {
    /// The last budget seen in `x-ratelimit-*` headers.
    budget: Option<RateLimit>,
    /// A rate-limited answer (primary or secondary) holds calls off until then.
    blocked_until: Option<SystemTime>,
    /// GitHub's text from the last rate-limited answer.
    last_message: Option<String>,
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
    timeout: Duration,
    connect_timeout: Duration,
    commit_message: String,
    clock: Arc<dyn Clock>,
    client: OnceLock<Octocrab>,
    limits: Mutex<Limits>,
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
            .finish_non_exhaustive()
    }
}

/// An answer, read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: impl http::header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn is_json(&self) -> bool {
        self.header(CONTENT_TYPE).is_some_and(|ct| {
            let mime = ct.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json")
        })
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// GitHub's own `message` (and any `errors[].message`), or a description of a non-JSON body.
    fn message(&self) -> String {
        if let Some(Value::Object(o)) = self.json() {
            if let Some(m) = o.get("message").and_then(Value::as_str) {
                let details: Vec<&str> = o
                    .get("errors")
                    .and_then(Value::as_array)
                    .map(|errs| {
                        errs.iter()
                            .filter_map(|e| e.get("message").and_then(Value::as_str))
                            .collect()
                    })
                    .unwrap_or_default();
                return if details.is_empty() {
                    m.to_owned()
                } else {
                    format!("{m} ({})", details.join("; "))
                };
            }
        }
        let reason = self.status.canonical_reason().unwrap_or("no reason");
        if self.body.is_empty() {
            reason.to_owned()
        } else {
            format!(
                "{reason} (a {} byte {} body, not GitHub's JSON)",
                self.body.len(),
                self.header(CONTENT_TYPE).unwrap_or("untyped")
            )
        }
    }
}

/// The file being written or deleted, as it is now.
enum Current {
    Missing,
    File { sha: String },
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

    /// Parses a key the way this source does (same as [`GitHubKey::parse`]).
    ///
    /// # Errors
    /// [`KeyError::Malformed`] naming the problem.
    pub fn parse_key(key: &str) -> Result<GitHubKey, KeyError> {
        GitHubKey::parse(key)
    }

    fn make_client(&self) -> Result<Octocrab, String> {
        // No `retry` feature: no retry layer exists. No HTTP cache layer exists in octocrab 0.47.
        let mut b = Octocrab::builder()
            .base_uri(self.base.as_str())
            .map_err(|_| format!("GitHub base URL {:?} is not a URI", self.base))?
            .set_connect_timeout(Some(self.connect_timeout));
        if let Some(Secret(t)) = &self.token {
            b = b.personal_token(t.clone());
        }
        // The error's text cannot hold the token: it comes from TLS root loading.
        b.build()
            .map_err(|e| format!("cannot build the GitHub HTTP client: {}", describe(&e)))
    }

    fn client(&self) -> Result<&Octocrab, SourceError> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        let c = self
            .make_client()
            .map_err(|message| SourceError::Unavailable {
                status: None,
                message,
            })?;
        Ok(self.client.get_or_init(|| c))
    }

    /// Runs `f` under the overall deadline.
    async fn within<T>(
        &self,
        f: impl Future<Output = Result<T, SourceError>>,
    ) -> Result<T, SourceError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(SourceError::Timeout {
                after: self.timeout,
            }),
        }
    }

    /// Refuses at once while a rate limit is known to be in force.
    fn gate(&self) -> Result<(), SourceError> {
        let now = self.clock.now();
        let l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let said = l
            .last_message
            .as_deref()
            .map(|m| format!("{m}; "))
            .unwrap_or_default();
        if let Some(b) = l.budget {
            if b.remaining == 0 && b.reset > now {
                return Err(SourceError::RateLimited {
                    until: b.reset,
                    status: None,
                    message: format!(
                        "{said}the rate-limit budget of {} requests is spent until its reset; \
                         nothing was sent",
                        b.limit
                    ),
                });
            }
        }
        if let Some(until) = l.blocked_until {
            if until > now {
                return Err(SourceError::RateLimited {
                    until,
                    status: None,
                    message: format!(
                        "{said}holding off after a rate-limited answer; nothing was sent"
                    ),
                });
            }
        }
        Ok(())
    }

    fn record_budget(&self, headers: &HeaderMap) {
        let num = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(limit), Some(remaining), Some(reset)) = (
            num("x-ratelimit-limit"),
            num("x-ratelimit-remaining"),
            num("x-ratelimit-reset"),
        ) {
            let reset = UNIX_EPOCH + Duration::from_secs(reset);
            let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
            l.budget = Some(RateLimit::new(limit, remaining, reset));
        }
    }

    /// Sends one request and reads the whole answer.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        accept: &'static str,
        extra: Option<(HeaderName, HeaderValue)>,
        body: Option<&Value>,
    ) -> Result<Answer, SourceError> {
        self.gate()?;
        let client = self.client()?;
        let url = format!("{}{}", self.base, path_and_query);
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .header(ACCEPT, accept)
            .header(USER_AGENT, self.user_agent.clone())
            .header("x-github-api-version", API_VERSION);
        if let Some((name, value)) = extra {
            req = req.header(name, value);
        }
        let req = client
            .build_request(req, body)
            .map_err(|e| SourceError::Rejected {
                status: None,
                message: format!("cannot build the request for {url}: {}", describe(&e)),
            })?;
        tracing::debug!(%method, %url, "GitHub request");
        let resp = client
            .execute(req)
            .await
            .map_err(|e| self.transport_error(&e, &url))?;
        let (parts, body) = resp.into_parts();
        self.record_budget(&parts.headers);
        // octocrab exposes no byte-collecting helper for a raw answer (short of adding
        // http-body-util as a dependency), but `body_to_string` hands the bytes back inside its
        // UTF-8 error, so binary files cost nothing extra.
        let body = match client.body_to_string(http::Response::new(body)).await {
            Ok(s) => Bytes::from(s.into_bytes()),
            Err(octocrab::Error::InvalidUtf8 { source, .. }) => Bytes::from(source.into_bytes()),
            Err(e) => {
                return Err(self.transport_error(&e, &url));
            }
        };
        tracing::debug!(%method, %url, status = parts.status.as_u16(), "GitHub answer");
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    fn transport_error(&self, e: &octocrab::Error, url: &str) -> SourceError {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cur {
            let timed_out = c
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
                || c.to_string().contains("timed out");
            if timed_out {
                return SourceError::Timeout {
                    after: self.connect_timeout,
                };
            }
            cur = c.source();
        }
        SourceError::Unavailable {
            status: None,
            message: format!("{url}: {}", describe(e)),
        }
    }

    /// Classifies an answer that is not a success of the call at hand.
    fn error_for(&self, a: &Answer) -> SourceError {
        let status = Some(a.status.as_u16());
        let message = a.message();
        match a.status.as_u16() {
            401 => SourceError::Unauthorized { status, message },
            403 | 429 => match self.rate_limit_until(a, &message) {
                Some(until) => {
                    let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
                    l.last_message = Some(message.clone());
                    SourceError::RateLimited {
                        until,
                        status,
                        message,
                    }
                }
                None => SourceError::Rejected { status, message },
            },
            404 => SourceError::NotFound {
                message: format!("{message} (HTTP 404)"),
            },
            409 | 422 => SourceError::Conflict { status, message },
            500..=599 => SourceError::Unavailable { status, message },
            300..=399 => SourceError::Rejected {
                status,
                message: format!(
                    "{message}; redirected to {} (not followed)",
                    a.header(http::header::LOCATION).unwrap_or("nowhere")
                ),
            },
            _ => SourceError::Rejected { status, message },
        }
    }

    /// GitHub's rules for a 403/429: `Retry-After` first; else a spent budget waits for its
    /// reset; else a secondary limit (or any 429) waits a minute. `None`: a plain 403
    /// (permissions).
    fn rate_limit_until(&self, a: &Answer, message: &str) -> Option<SystemTime> {
        let now = self.clock.now();
        let retry_after = a.header(http::header::RETRY_AFTER).and_then(|v| {
            v.trim()
                .parse::<u64>()
                .ok()
                .map(|s| now + Duration::from_secs(s))
                .or_else(|| codec::parse_http_date(v))
        });
        let spent = a
            .header("x-ratelimit-remaining")
            .is_some_and(|r| r.trim() == "0");
        let reset = a
            .header("x-ratelimit-reset")
            .and_then(|r| r.trim().parse::<u64>().ok())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));
        let lower = message.to_ascii_lowercase();
        let secondary = lower.contains("secondary rate limit") || lower.contains("abuse");
        let until = if let Some(t) = retry_after {
            Some(t)
        } else if spent && reset.is_some() {
            reset
        } else if secondary
            || a.status == StatusCode::TOO_MANY_REQUESTS
            || lower.contains("rate limit")
        {
            Some(now + SECONDARY_DEFAULT_WAIT)
        } else {
            None
        }?;
        let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        l.blocked_until = Some(l.blocked_until.map_or(until, |u| u.max(until)));
        Some(until)
    }

    fn commit_message(&self, op: &str, key: &GitHubKey) -> String {
        self.commit_message
            .replace("{op}", op)
            .replace("{path}", &key.path)
            .replace("{key}", &key.to_string())
    }

    fn invalid_json(a: &Answer, what: &str) -> SourceError {
        SourceError::InvalidResponse {
            message: format!(
                "GitHub answered HTTP {} to {what} with a body that is not the expected JSON \
                 ({} bytes of {})",
                a.status.as_u16(),
                a.body.len(),
                a.header(CONTENT_TYPE).unwrap_or("untyped content")
            ),
        }
    }

    async fn fetch_inner(
        &self,
        key: &GitHubKey,
        validator: Option<&str>,
    ) -> Result<Fetched, SourceError> {
        let pq = format!("{}{}", key.contents_path(), key.ref_query());
        // A validator that cannot be a header value cannot match anything: send none.
        let extra = validator
            .and_then(|v| HeaderValue::from_str(v).ok())
            .map(|v| (IF_NONE_MATCH, v));
        let sent_validator = extra.is_some();
        let a = self.send(Method::GET, &pq, RAW, extra, None).await?;
        match a.status {
            StatusCode::OK => {
                if let Some(kind) = not_a_file(&a) {
                    return Err(SourceError::Rejected {
                        status: Some(200),
                        message: format!("{key} is a {kind}, not a file"),
                    });
                }
                Ok(Fetched::Value {
                    validator: a.header(ETAG).map(str::to_owned),
                    value: a.body,
                    ttl: None,
                })
            }
            StatusCode::NOT_MODIFIED if sent_validator => Ok(Fetched::NotModified { ttl: None }),
            StatusCode::NOT_MODIFIED => Err(SourceError::InvalidResponse {
                message: "GitHub answered 304 Not Modified to an unconditional request".into(),
            }),
            StatusCode::NOT_FOUND => Ok(Fetched::NotFound),
            _ => Err(self.error_for(&a)),
        }
    }

    /// What is at the key's path now (object media type: one JSON object whatever it is).
    async fn current(&self, key: &GitHubKey) -> Result<Current, SourceError> {
        let pq = format!("{}{}", key.contents_path(), key.ref_query());
        let a = self.send(Method::GET, &pq, OBJECT, None, None).await?;
        match a.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Current::Missing),
            _ => return Err(self.error_for(&a)),
        }
        let what = "a contents look-up";
        let v = a.json().ok_or_else(|| Self::invalid_json(&a, what))?;
        if v.is_array() {
            return Err(SourceError::Rejected {
                status: Some(200),
                message: format!("{key} is a directory, not a file"),
            });
        }
        match v.get("type").and_then(Value::as_str) {
            Some("file") => {}
            Some(kind) => {
                let kind = if kind == "dir" { "directory" } else { kind };
                return Err(SourceError::Rejected {
                    status: Some(200),
                    message: format!("{key} is a {kind}, not a file"),
                });
            }
            None => return Err(Self::invalid_json(&a, what)),
        }
        let sha = v
            .get("sha")
            .and_then(Value::as_str)
            .ok_or_else(|| Self::invalid_json(&a, what))?;
        Ok(Current::File {
            sha: sha.to_owned(),
        })
    }

    async fn put_inner(&self, key: &GitHubKey, value: &[u8]) -> Result<(), SourceError> {
        let current = self.current(key).await?;
        let (op, sha) = match current {
            Current::File { sha } => {
                if sha.eq_ignore_ascii_case(&codec::git_blob_sha(value)) {
                    tracing::debug!(%key, "GitHub already holds these bytes; no commit");
                    return Ok(());
                }
                ("update", Some(sha))
            }
            Current::Missing => ("create", None),
        };
        let mut body = json!({
            "message": self.commit_message(op, key),
            "content": codec::base64(value),
        });
        if let Some(sha) = sha {
            body["sha"] = Value::String(sha);
        }
        if let Some(r) = &key.reference {
            body["branch"] = Value::String(r.clone());
        }
        let a = self
            .send(Method::PUT, &key.contents_path(), JSON, None, Some(&body))
            .await?;
        match a.status {
            StatusCode::OK | StatusCode::CREATED => Ok(()),
            _ => Err(self.error_for(&a)),
        }
    }

    async fn delete_inner(&self, key: &GitHubKey) -> Result<(), SourceError> {
        let sha = match self.current(key).await? {
            Current::Missing => return Ok(()),
            Current::File { sha } => sha,
        };
        let mut body = json!({
            "message": self.commit_message("delete", key),
            "sha": sha,
        });
        if let Some(r) = &key.reference {
            body["branch"] = Value::String(r.clone());
        }
        let a = self
            .send(
                Method::DELETE,
                &key.contents_path(),
                JSON,
                None,
                Some(&body),
            )
            .await?;
        match a.status {
            StatusCode::OK | StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.error_for(&a)),
        }
    }

    async fn default_branch(&self, p: &GitHubPrefix) -> Result<String, SourceError> {
        let a = self
            .send(Method::GET, &repo_path(&p.owner, &p.repo), JSON, None, None)
            .await?;
        if a.status != StatusCode::OK {
            return Err(self.error_for(&a));
        }
        a.json()
            .as_ref()
            .and_then(|v| v.get("default_branch"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Self::invalid_json(&a, "a repository look-up"))
    }

    async fn list_inner(&self, p: &GitHubPrefix) -> Result<Vec<String>, SourceError> {
        let reference = match &p.reference {
            Some(r) => r.clone(),
            None => self.default_branch(p).await?,
        };
        // The ref is one path segment: its '/'s are encoded too ('feature%2Fx'), as clients of
        // this endpoint commonly send them; left bare, they would split the segment.
        let pq = format!(
            "{}/git/trees/{}?recursive=1",
            repo_path(&p.owner, &p.repo),
            encode(&reference)
        );
        let a = self.send(Method::GET, &pq, JSON, None, None).await?;
        if a.status != StatusCode::OK {
            return Err(self.error_for(&a));
        }
        let what = "a git trees request";
        let v = a.json().ok_or_else(|| Self::invalid_json(&a, what))?;
        let tree = v
            .get("tree")
            .and_then(Value::as_array)
            .ok_or_else(|| Self::invalid_json(&a, what))?;
        if v.get("truncated").and_then(Value::as_bool) == Some(true) {
            tracing::warn!(
                owner = %p.owner,
                repo = %p.repo,
                reference = %reference,
                entries = tree.len(),
                "GitHub truncated the recursive tree; the listing is incomplete"
            );
        }
        Ok(tree
            .iter()
            .filter(|e| e.get("type").and_then(Value::as_str) == Some("blob"))
            .filter_map(|e| e.get("path").and_then(Value::as_str))
            .filter(|path| p.contains(path))
            // A path the key syntax cannot express (e.g. a '..' segment) is left out.
            .map(|path| p.key_for(path))
            .filter(|k| GitHubKey::parse(k).is_ok())
            .collect())
    }
}

/// With the raw media type a file comes as its bytes (content type `application/vnd.github.raw`
/// or similar), but a directory comes as GitHub's JSON array of entries and a submodule as a JSON
/// object: `Some(kind)` for those. A JSON *file* is not mistaken for them: only an
/// `application/json` content type is looked into.
fn not_a_file(a: &Answer) -> Option<&'static str> {
    if !a.is_json() {
        return None;
    }
    match a.json()? {
        Value::Array(entries)
            if entries
                .iter()
                .all(|e| e.get("type").is_some_and(Value::is_string)) =>
        {
            Some("directory")
        }
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("submodule") => Some("submodule"),
            Some("dir") => Some("directory"),
            _ => None,
        },
        _ => None,
    }
}

/// An error and its sources, one line, without octocrab's backtrace text.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let s = c.to_string();
        let s = s.split("\n\nFound at").next().unwrap_or("").trim();
        let s = s
            .strip_prefix("Service Error: ")
            .or_else(|| s.strip_prefix("Hyper Error: "))
            .unwrap_or(s)
            .to_owned();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}

#[async_trait]
impl Source for GitHubSource {
    async fn fetch(&self, key: &str, validator: Option<&str>) -> Result<Fetched, SourceError> {
        let key = GitHubKey::parse(key).map_err(SourceError::InvalidKey)?;
        self.within(self.fetch_inner(&key, validator)).await
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        let key = GitHubKey::parse(key).map_err(SourceError::InvalidKey)?;
        self.within(self.put_inner(&key, value)).await
    }

    async fn delete(&self, key: &str) -> Result<(), SourceError> {
        let key = GitHubKey::parse(key).map_err(SourceError::InvalidKey)?;
        self.within(self.delete_inner(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        let prefix = GitHubPrefix::parse(prefix).map_err(SourceError::InvalidKey)?;
        self.within(self.list_inner(&prefix)).await
    }

    fn check_key(&self, key: &str) -> Result<(), KeyError> {
        GitHubKey::parse(key).map(|_| ())
    }

    fn rate_limit(&self) -> Option<RateLimit> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner()).budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_checks() {
        let e = |b: GitHubSourceBuilder| b.anonymous().build().unwrap_err().to_string();
        assert!(e(GitHubSource::builder().base_url("ftp://x")).contains("https://"));
        assert!(e(GitHubSource::builder().base_url("not a url")).contains("not a URL"));
        assert!(e(GitHubSource::builder().base_url("https://h/api?x=1")).contains("query"));
        assert!(e(GitHubSource::builder().timeout(Duration::ZERO)).contains("zero"));
        let m = GitHubSource::builder()
            .token("sec\nret")
            .build()
            .unwrap_err()
            .to_string();
        assert!(m.contains("token") && !m.contains("sec"), "{m}");
        // Outside a runtime, the client is made lazily.
        let s = GitHubSource::builder()
            .base_url("https://ghe.example.com/api/v3///")
            .token("ghp_topsecret")
            .build()
            .unwrap();
        assert_eq!(s.base_url(), "https://ghe.example.com/api/v3");
        let dbg = format!("{s:?} {:?}", GitHubSource::builder().token("ghp_topsecret"));
        assert!(
            !dbg.contains("topsecret") && dbg.contains("<redacted>"),
            "{dbg}"
        );
    }

    #[test]
    fn commit_messages() {
        let s = GitHubSource::builder()
            .anonymous()
            .commit_message("[{op}] {path} ({key})")
            .build()
            .unwrap();
        let k = GitHubKey::parse("o/r/a/b.txt@dev").unwrap();
        assert_eq!(
            s.commit_message("update", &k),
            "[update] a/b.txt (o/r/a/b.txt@dev)"
        );
        let d = GitHubSource::builder().anonymous().build().unwrap();
        assert_eq!(d.commit_message("create", &k), "tiercache: create a/b.txt");
    }
}
