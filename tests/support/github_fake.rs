//! A wiremock fake of the GitHub REST API, answering the way GitHub documents: quoted ETags,
//! bodiless 304s, `x-ratelimit-*` headers on every answer, JSON errors with `message` and
//! `documentation_url`, HTML bodies on 5xx. Loopback only.
//!
//! GraphQL (`POST /graphql`) is answered by [`Graphql`], which reads the request's variables and
//! answers each aliased `repository { object(expression:) }` field as GitHub documents: `data`
//! per alias, `errors` with a `path` naming the alias, `x-ratelimit-resource: graphql`, and the
//! primary rate limit as a 200 with a `RATE_LIMITED` error.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tiercache::source::github::GitHubSource;
use tiercache::MockClock;
use wiremock::{MockServer, Request, Respond, ResponseTemplate};

/// The token the authenticated sources send.
pub const TOKEN: &str = "ghp_FAKEgraphqlTOKEN0123456789SECRET";

/// The fake's budget.
pub const LIMIT: u64 = 5000;

/// Unix seconds of `t`.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The instant of unix second `s`.
pub fn at(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

/// A fake GitHub: the server, and a clock the source under test reads.
pub struct Fake {
    pub server: MockServer,
    pub clock: MockClock,
}

impl Fake {
    pub async fn start() -> Self {
        Fake {
            server: MockServer::start().await,
            clock: MockClock::new(),
        }
    }

    /// Unix seconds of the fake's "now".
    pub fn now(&self) -> u64 {
        use tiercache::Clock;
        unix(self.clock.now())
    }

    /// When the fake's budget window resets: an hour from "now".
    pub fn reset(&self) -> u64 {
        self.now() + 3600
    }

    /// A source pointed at the fake, anonymous, on the fake's clock, 5 s deadline.
    pub fn source(&self) -> GitHubSource {
        GitHubSource::builder()
            .base_url(self.server.uri())
            .anonymous()
            .clock(Arc::new(self.clock.clone()))
            .timeout(Duration::from_secs(5))
            .build()
            .expect("source builds")
    }

    /// A source with [`TOKEN`] (so `fetch_many` uses GraphQL), on the fake's clock.
    pub fn authed_source(&self) -> GitHubSource {
        self.authed_builder().build().expect("source builds")
    }

    /// The builder of [`authed_source`](Self::authed_source), to change more settings.
    pub fn authed_builder(&self) -> tiercache::source::github::GitHubSourceBuilder {
        GitHubSource::builder()
            .base_url(self.server.uri())
            .token(TOKEN)
            .clock(Arc::new(self.clock.clone()))
            .timeout(Duration::from_secs(5))
    }

    /// GraphQL's answer headers: its own budget, `x-ratelimit-resource: graphql`.
    pub fn graphql_answer(&self, status: u16, remaining: u64) -> ResponseTemplate {
        ResponseTemplate::new(status)
            .insert_header("x-ratelimit-limit", LIMIT.to_string().as_str())
            .insert_header("x-ratelimit-remaining", remaining.to_string().as_str())
            .insert_header("x-ratelimit-used", (LIMIT - remaining).to_string().as_str())
            .insert_header("x-ratelimit-reset", self.reset().to_string().as_str())
            .insert_header("x-ratelimit-resource", "graphql")
            .insert_header("x-github-request-id", "CAFE:BEEF:5678")
    }

    /// GraphQL's primary rate limit as GitHub reports it: HTTP 200, no `data`, an error of
    /// type `type_` (`RATE_LIMITED`; some answers say `RATE_LIMIT`), budget headers with
    /// `remaining` (0, or not: GitHub's is not always 0 on such an answer).
    pub fn graphql_rate_limited(&self, type_: &str, remaining: u64) -> ResponseTemplate {
        self.graphql_answer(200, remaining).set_body_raw(
            serde_json::to_vec(&json!({
                "errors": [{
                    "type": type_,
                    "code": "graphql_rate_limit",
                    "message": "API rate limit exceeded for user ID 1."
                }]
            }))
            .unwrap(),
            "application/json; charset=utf-8",
        )
    }

    /// A GraphQL responder over `repo`'s files.
    pub fn graphql(&self, repo: FakeRepo) -> Graphql {
        Graphql {
            repo,
            headers: self.graphql_answer(200, 4990),
        }
    }

    /// Any answer, with the rate-limit headers GitHub sends on every answer.
    pub fn answer(&self, status: u16, remaining: u64) -> ResponseTemplate {
        ResponseTemplate::new(status)
            .insert_header("x-ratelimit-limit", LIMIT.to_string().as_str())
            .insert_header("x-ratelimit-remaining", remaining.to_string().as_str())
            .insert_header("x-ratelimit-used", (LIMIT - remaining).to_string().as_str())
            .insert_header("x-ratelimit-reset", self.reset().to_string().as_str())
            .insert_header("x-ratelimit-resource", "core")
            .insert_header("x-github-request-id", "CAFE:BEEF:1234")
    }

    /// A JSON answer (`application/json; charset=utf-8`, as GitHub labels its JSON).
    pub fn json(&self, status: u16, body: Value) -> ResponseTemplate {
        self.answer(status, 4999).set_body_raw(
            serde_json::to_vec(&body).unwrap(),
            "application/json; charset=utf-8",
        )
    }

    /// A file's bytes with the raw media type, and its quoted ETag.
    pub fn raw_file(&self, bytes: &[u8], etag: &str) -> ResponseTemplate {
        self.answer(200, 4999)
            .insert_header("etag", etag)
            .set_body_raw(bytes.to_vec(), "application/vnd.github.raw")
    }

    /// `304 Not Modified`: no body, the ETag again.
    pub fn not_modified(&self, etag: &str) -> ResponseTemplate {
        self.answer(304, 4999).insert_header("etag", etag)
    }

    /// GitHub's error body.
    pub fn error(&self, status: u16, message: &str) -> ResponseTemplate {
        self.json(
            status,
            json!({
                "message": message,
                "documentation_url": "https://docs.github.com/rest",
                "status": status.to_string(),
            }),
        )
    }

    pub fn not_found(&self) -> ResponseTemplate {
        self.error(404, "Not Found")
    }

    /// A primary rate limit: 403, remaining 0, reset at `reset` (unix seconds).
    pub fn primary_limit(&self, reset: u64) -> ResponseTemplate {
        ResponseTemplate::new(403)
            .insert_header("x-ratelimit-limit", "60")
            .insert_header("x-ratelimit-remaining", "0")
            .insert_header("x-ratelimit-used", "60")
            .insert_header("x-ratelimit-reset", reset.to_string().as_str())
            .set_body_raw(
                serde_json::to_vec(&json!({
                    "message": "API rate limit exceeded for 127.0.0.1. (But here's the good news: \
                                Authenticated requests get a higher rate limit.)",
                    "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
                }))
                .unwrap(),
                "application/json; charset=utf-8",
            )
    }

    /// A secondary rate limit (`status`, 403 or 429), with `retry_after` if given.
    pub fn secondary_limit(&self, status: u16, retry_after: Option<&str>) -> ResponseTemplate {
        let t = self.error(
            status,
            "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
        );
        match retry_after {
            Some(r) => t.insert_header("retry-after", r),
            None => t,
        }
    }

    /// A 5xx from the edge: an HTML body.
    pub fn html_error(&self, status: u16) -> ResponseTemplate {
        self.answer(status, 4999).set_body_raw(
            "<!DOCTYPE html><html><head><title>Unicorn! · GitHub</title></head>\
             <body><h1>We had issues producing the response to your request.</h1></body></html>",
            "text/html; charset=utf-8",
        )
    }

    /// A contents answer in the object media type for a file.
    pub fn file_object(&self, path: &str, sha: &str) -> ResponseTemplate {
        self.json(
            200,
            json!({
                "type": "file", "encoding": "base64", "size": 5,
                "name": path.rsplit('/').next().unwrap(), "path": path,
                "content": "", "sha": sha,
            }),
        )
    }

    /// A directory in the raw media type: GitHub answers its JSON array of entries.
    pub fn directory(&self, dir: &str) -> ResponseTemplate {
        self.json(
            200,
            json!([
                {"type": "file", "name": "a.txt", "path": format!("{dir}/a.txt"), "sha": "1", "size": 1},
                {"type": "dir", "name": "sub", "path": format!("{dir}/sub"), "sha": "2", "size": 0}
            ]),
        )
    }
}

/// A loopback port nothing listens on: bound, its address taken, then closed. (Not a dropped
/// `MockServer::start()`: wiremock pools those, and a pooled server keeps listening and answers
/// 404 to everything.)
pub async fn refused_uri() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// What is at an expression (`REF:PATH`) in the GraphQL fake.
#[derive(Debug, Clone)]
pub enum Object {
    /// A file: GitHub gives `text` for a text file, `null` for a binary one.
    Blob {
        bytes: Vec<u8>,
        binary: bool,
        truncated: bool,
    },
    /// A directory.
    Tree,
}

impl Object {
    pub fn text(s: &str) -> Self {
        Object::Blob {
            bytes: s.as_bytes().to_vec(),
            binary: false,
            truncated: false,
        }
    }
}

/// The repositories and objects the GraphQL fake knows: `(owner, name)` → expression → object.
#[derive(Debug, Clone, Default)]
pub struct FakeRepo {
    pub repos: HashMap<(String, String), HashMap<String, Object>>,
}

impl FakeRepo {
    pub fn with(mut self, owner: &str, name: &str, expression: &str, object: Object) -> Self {
        self.repos
            .entry((owner.to_owned(), name.to_owned()))
            .or_default()
            .insert(expression.to_owned(), object);
        self
    }

    /// A repository that exists, with nothing in it yet.
    pub fn repo(mut self, owner: &str, name: &str) -> Self {
        self.repos
            .entry((owner.to_owned(), name.to_owned()))
            .or_default();
        self
    }
}

/// The git blob id of `bytes`, as GitHub reports a blob's `oid`.
pub fn oid(bytes: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Answers `POST /graphql` from the request's variables: for alias `f{i}`, `$o{i}`/`$n{i}` name
/// the repository and `$e{i}` is the object's expression.
pub struct Graphql {
    repo: FakeRepo,
    headers: ResponseTemplate,
}

impl Respond for Graphql {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let Ok(body) = request.body_json::<Value>() else {
            return self.headers.clone().set_body_json(json!({
                "message": "Problems parsing JSON",
                "documentation_url": "https://docs.github.com/graphql"
            }));
        };
        let query = body["query"].as_str().unwrap_or_default();
        let vars = &body["variables"];
        let mut data = serde_json::Map::new();
        let mut errors = Vec::new();
        let mut i = 0;
        while let (Some(owner), Some(name), Some(expr)) = (
            vars[format!("o{i}")].as_str(),
            vars[format!("n{i}")].as_str(),
            vars[format!("e{i}")].as_str(),
        ) {
            let alias = format!("f{i}");
            assert!(
                query.contains(&format!("{alias}: repository(owner: $o{i}, name: $n{i})")),
                "alias {alias} is in the query: {query}"
            );
            match self.repo.repos.get(&(owner.to_owned(), name.to_owned())) {
                None => {
                    data.insert(alias.clone(), Value::Null);
                    errors.push(json!({
                        "type": "NOT_FOUND",
                        "path": [alias],
                        "locations": [{"line": 1, "column": 1}],
                        "message": format!(
                            "Could not resolve to a Repository with the name '{owner}/{name}'."
                        ),
                    }));
                }
                Some(objects) => {
                    let object = match objects.get(expr) {
                        None => Value::Null,
                        Some(Object::Tree) => json!({"__typename": "Tree"}),
                        Some(Object::Blob {
                            bytes,
                            binary,
                            truncated,
                        }) => {
                            let text = if *binary {
                                Value::Null
                            } else if *truncated {
                                // GitHub cuts the text of a large blob short.
                                let cut = &bytes[..bytes.len() / 2];
                                Value::String(String::from_utf8_lossy(cut).into_owned())
                            } else {
                                Value::String(String::from_utf8_lossy(bytes).into_owned())
                            };
                            json!({
                                "__typename": "Blob",
                                "oid": oid(bytes),
                                "text": text,
                                "byteSize": bytes.len(),
                                "isBinary": binary,
                                "isTruncated": truncated,
                            })
                        }
                    };
                    data.insert(alias, json!({ "object": object }));
                }
            }
            i += 1;
        }
        let mut answer = json!({ "data": data });
        if !errors.is_empty() {
            answer["errors"] = Value::Array(errors);
        }
        self.headers.clone().set_body_raw(
            serde_json::to_vec(&answer).unwrap(),
            "application/json; charset=utf-8",
        )
    }
}
