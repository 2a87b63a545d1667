//! One HTTP exchange with GitHub: the octocrab client, a request sent (after the rate-limit
//! gate) and its answer read whole, and what a failed answer or transport error means.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, Method, StatusCode};
use octocrab::Octocrab;
use serde_json::Value;

use super::rate_limit::{self, Api};
use super::{GitHubSource, Secret, LOG_TARGET};
use crate::source::SourceError;

/// `Accept`: a file as its bytes.
pub(super) const RAW: &str = "application/vnd.github.raw+json";
/// `Accept`: whatever is at a path, as one JSON object.
pub(super) const OBJECT: &str = "application/vnd.github.object+json";
/// `Accept`: GitHub's JSON.
pub(super) const JSON: &str = "application/vnd.github+json";
/// The `x-github-api-version` sent.
const API_VERSION: &str = "2022-11-28";

/// An answer, read whole.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Answer {
    pub(super) fn header(&self, name: impl http::header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(super) fn is_json(&self) -> bool {
        self.header(CONTENT_TYPE).is_some_and(|ct| {
            let mime = ct.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json")
        })
    }

    /// Whether the answer counted against GraphQL's budget (`x-ratelimit-resource: graphql`).
    pub(super) fn is_graphql(&self) -> bool {
        rate_limit::is_graphql(&self.headers)
    }

    pub(super) fn json(&self) -> Option<Value> {
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

impl GitHubSource {
    pub(super) fn make_client(&self) -> Result<Octocrab, String> {
        // No `retry` feature: no retry layer exists. No HTTP cache layer exists in octocrab 0.47.
        // Every request is sent with its whole URL; octocrab's base URI is the origin only, as
        // it would put its own path in front of any path that does not start with it (GitHub
        // Enterprise's `/api/graphql` beside a `/api/v3` base).
        let uri: http::Uri = self
            .base
            .parse()
            .map_err(|_| format!("GitHub base URL {:?} is not a URI", self.base))?;
        let origin = match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
            _ => return Err(format!("GitHub base URL {:?} has no host", self.base)),
        };
        let mut b = Octocrab::builder()
            .base_uri(origin.as_str())
            .map_err(|_| format!("GitHub base URL {:?} is not a URI", self.base))?
            .set_connect_timeout(Some(self.connect_timeout));
        if let Some(Secret(t)) = &self.token {
            b = b.personal_token(t.clone());
        }
        // The error's text cannot hold the token: it comes from TLS root loading.
        b.build()
            .map_err(|e| format!("cannot build the GitHub HTTP client: {}", describe(&e)))
    }

    pub(super) fn client(&self) -> Result<&Octocrab, SourceError> {
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

    /// Sends one REST request (`path_and_query` under the base URL) and reads the whole answer.
    pub(super) async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        accept: &'static str,
        extra: Option<(HeaderName, HeaderValue)>,
        body: Option<&Value>,
    ) -> Result<Answer, SourceError> {
        self.gate(Api::Rest)?;
        let url = format!("{}{}", self.base, path_and_query);
        self.exchange(method, &url, accept, extra, body).await
    }

    /// Sends one GraphQL request (`POST` of `body` to `url`) and reads the whole answer.
    pub(super) async fn send_graphql(
        &self,
        url: &str,
        body: &Value,
    ) -> Result<Answer, SourceError> {
        self.gate(Api::Graphql)?;
        self.exchange(Method::POST, url, JSON, None, Some(body))
            .await
    }

    /// Sends one request to `url` (after the gate) and reads the whole answer.
    async fn exchange(
        &self,
        method: Method,
        url: &str,
        accept: &'static str,
        extra: Option<(HeaderName, HeaderValue)>,
        body: Option<&Value>,
    ) -> Result<Answer, SourceError> {
        let client = self.client()?;
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(url)
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
        tracing::debug!(target: LOG_TARGET, %method, %url, "GitHub request");
        let resp = client
            .execute(req)
            .await
            .map_err(|e| self.transport_error(&e, url))?;
        let (parts, body) = resp.into_parts();
        self.record_budget(&parts.headers);
        // octocrab exposes no byte-collecting helper for a raw answer (short of adding
        // http-body-util as a dependency), but `body_to_string` hands the bytes back inside its
        // UTF-8 error, so binary files cost nothing extra.
        let body = match client.body_to_string(http::Response::new(body)).await {
            Ok(s) => Bytes::from(s.into_bytes()),
            Err(octocrab::Error::InvalidUtf8 { source, .. }) => Bytes::from(source.into_bytes()),
            Err(e) => {
                return Err(self.transport_error(&e, url));
            }
        };
        tracing::debug!(
            target: LOG_TARGET,
            %method,
            %url,
            status = parts.status.as_u16(),
            "GitHub answer"
        );
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
    pub(super) fn error_for(&self, a: &Answer) -> SourceError {
        let status = Some(a.status.as_u16());
        let message = a.message();
        match a.status.as_u16() {
            401 => SourceError::Unauthorized { status, message },
            403 | 429 => self.refusal(a, status, message),
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

    pub(super) fn invalid_json(a: &Answer, what: &str) -> SourceError {
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
