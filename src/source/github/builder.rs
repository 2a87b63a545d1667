//! [`GitHubSourceBuilder`]: the settings of a [`GitHubSource`], checked when it is built.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::header::HeaderValue;
use http::Uri;

use super::graphql::DEFAULT_BATCH;
use super::rate_limit::Limits;
use super::{GitHubSource, Secret, DEFAULT_BASE_URL, DEFAULT_COMMIT_MESSAGE, TOKEN_ENV};
use crate::clock::{Clock, SystemClock};

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
    timeout: Option<Duration>,
    connect_timeout: Duration,
    commit_message: String,
    clock: Arc<dyn Clock>,
    graphql_batch: usize,
    by_commit: bool,
}

impl Default for GitHubSourceBuilder {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            token: TokenSetting::FromEnv,
            user_agent: concat!("tiercache/", env!("CARGO_PKG_VERSION")).to_owned(),
            timeout: None,
            connect_timeout: Duration::from_secs(5),
            commit_message: DEFAULT_COMMIT_MESSAGE.to_owned(),
            clock: Arc::new(SystemClock),
            graphql_batch: DEFAULT_BATCH,
            by_commit: false,
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

    /// An overall deadline of one call (`fetch`, `fetch_many`, `put`, `delete`, `list`,
    /// including every request and body it needs: a `fetch_many`'s GraphQL requests and REST
    /// fallbacks all run under one), for using the source on its own. Past it:
    /// [`SourceError::Timeout`]. Default: none. Under a [`TieredCache`](crate::TieredCache)
    /// leave it unset: the cache puts one deadline around every source call
    /// ([`TieredCacheBuilder::timeout`](crate::TieredCacheBuilder::timeout)), and two deadlines
    /// on one call only make the shorter one win unannounced.
    ///
    /// [`SourceError::Timeout`]: crate::source::SourceError::Timeout
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
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
    ///
    /// Takes `impl Clock`, as [`TieredCacheBuilder::clock`](crate::TieredCacheBuilder::clock)
    /// does: pass the same `MockClock` (a clone) to both. An `Arc<dyn Clock>` is a clock too.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How many keys one GraphQL request of
    /// [`fetch_many`](crate::source::Source::fetch_many) carries (and what
    /// [`max_batch`](crate::source::Source::max_batch) reports). Default 100, the most allowed;
    /// 1 turns GraphQL off (one REST request per key). Without a token GraphQL is never used:
    /// GitHub's GraphQL API does not answer anonymous requests.
    pub fn graphql_batch(mut self, keys: usize) -> Self {
        self.graphql_batch = keys;
        self
    }

    /// Revalidation pinned to a commit (see the module documentation, "Revalidation by
    /// commit"): batches read files at the ref's resolved commit and record it in each value's
    /// validator, and [`revalidate_many`](crate::source::Source::revalidate_many) decides for
    /// all the entries of one repository and ref with one conditional "Get a commit" request
    /// (free when GitHub answers 304), then "Compare two commits" when the ref moved. Default:
    /// off (a batch is one GraphQL request, with no extra request to resolve the ref, and every
    /// revalidation is one conditional request per file).
    pub fn revalidate_by_commit(mut self, on: bool) -> Self {
        self.by_commit = on;
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
    /// or fragment, a token that cannot go in an HTTP header, a user agent that cannot, a
    /// zero timeout, or a GraphQL batch size outside 1–100.
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
        if self.timeout.is_some_and(|t| t.is_zero()) || self.connect_timeout.is_zero() {
            return Err(config_err("GitHub timeouts must be above zero".to_owned()));
        }
        if !(1..=DEFAULT_BATCH).contains(&self.graphql_batch) {
            return Err(config_err(format!(
                "the GraphQL batch size {} is outside 1–{DEFAULT_BATCH}",
                self.graphql_batch
            )));
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
            graphql_batch: self.graphql_batch,
            graphql_missing: Default::default(),
            by_commit: self.by_commit,
            moves: Mutex::new(Default::default()),
            resolving: tokio::sync::Mutex::new(()),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            let client = source.make_client().map_err(config_err)?;
            let _ = source.client.set(client);
        }
        Ok(source)
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
        assert!(e(GitHubSource::builder().graphql_batch(0)).contains("batch size"));
        assert!(e(GitHubSource::builder().graphql_batch(101)).contains("1–100"));
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
}
