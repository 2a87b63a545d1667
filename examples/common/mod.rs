//! Shared helpers for the examples: a loopback fake of the GitHub REST API (wiremock) and an
//! in-process source that counts its calls. Nothing here touches the internet.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use tiercache::source::{Fetched, Source, SourceError};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// What the fake GitHub holds and how it behaves.
#[derive(Debug, Default)]
struct State {
    /// `owner/repo/path` → (bytes, ETag).
    files: BTreeMap<String, (Bytes, String)>,
    version: u64,
    down: bool,
    requests: usize,
    not_modified: usize,
    writes: usize,
}

/// A fake GitHub on 127.0.0.1: the contents API (raw, conditional GETs with ETags, PUT,
/// DELETE), repository look-ups and recursive trees, and an outage switch (every answer becomes
/// GitHub's 503 HTML page).
#[derive(Debug, Clone)]
pub struct FakeGitHub {
    state: Arc<Mutex<State>>,
    server: Arc<MockServer>,
}

impl FakeGitHub {
    /// Starts the fake on a loopback port.
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        Mock::given(any())
            .respond_with(Responder(state.clone()))
            .mount(&server)
            .await;
        Self {
            state,
            server: Arc::new(server),
        }
    }

    /// The base URL to give `GitHubSource::builder().base_url(..)`.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Puts a file at `owner/repo/path` with a new ETag.
    pub fn put_file(&self, key: &str, bytes: impl Into<Bytes>) {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        let etag = format!("\"etag-{}\"", s.version);
        s.files.insert(key.to_owned(), (bytes.into(), etag));
    }

    /// The bytes at `owner/repo/path`.
    pub fn file(&self, key: &str) -> Option<Bytes> {
        self.state
            .lock()
            .unwrap()
            .files
            .get(key)
            .map(|f| f.0.clone())
    }

    /// Switches the outage on or off.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// `304 Not Modified` answers given so far.
    pub fn not_modified(&self) -> usize {
        self.state.lock().unwrap().not_modified
    }

    /// Files written (PUT) so far.
    pub fn writes(&self) -> usize {
        self.state.lock().unwrap().writes
    }
}

struct Responder(Arc<Mutex<State>>);

/// GitHub's headers on every answer (the budget resets within the hour, as GitHub's does).
fn answer(status: u16) -> ResponseTemplate {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let reset = (now / 3600 + 1) * 3600;
    ResponseTemplate::new(status)
        .insert_header("x-ratelimit-limit", "5000")
        .insert_header("x-ratelimit-remaining", "4990")
        .insert_header("x-ratelimit-reset", reset.to_string().as_str())
}

fn json_answer(status: u16, body: Value) -> ResponseTemplate {
    answer(status).set_body_raw(
        serde_json::to_vec(&body).unwrap(),
        "application/json; charset=utf-8",
    )
}

fn not_found() -> ResponseTemplate {
    json_answer(
        404,
        json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest"}),
    )
}

impl Respond for Responder {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        s.requests += 1;
        if s.down {
            return answer(503).set_body_raw(
                "<!DOCTYPE html><html><body><h1>Unicorn!</h1></body></html>",
                "text/html; charset=utf-8",
            );
        }
        let path = req.url.path();
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        match parts.as_slice() {
            ["repos", owner, repo] => json_answer(
                200,
                json!({"full_name": format!("{owner}/{repo}"), "default_branch": "main"}),
            ),
            ["repos", owner, repo, "git", rest] if rest.starts_with("trees/") => {
                let prefix = format!("{owner}/{repo}/");
                let tree: Vec<Value> = s
                    .files
                    .keys()
                    .filter_map(|k| k.strip_prefix(&prefix))
                    .map(|p| json!({"path": p, "type": "blob"}))
                    .collect();
                json_answer(
                    200,
                    json!({"sha": "tree", "truncated": false, "tree": tree}),
                )
            }
            ["repos", owner, repo, "contents", file] => {
                let key = format!("{owner}/{repo}/{file}");
                let accept = req
                    .headers
                    .get("accept")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                match req.method.as_str() {
                    "GET" if accept.contains("object") => match s.files.get(&key) {
                        Some((bytes, etag)) => json_answer(
                            200,
                            json!({"type": "file", "path": file, "sha": etag.trim_matches('"'), "size": bytes.len()}),
                        ),
                        None => not_found(),
                    },
                    "GET" => match s.files.get(&key).cloned() {
                        Some((_, etag))
                            if req
                                .headers
                                .get("if-none-match")
                                .is_some_and(|v| v.as_bytes() == etag.as_bytes()) =>
                        {
                            s.not_modified += 1;
                            answer(304).insert_header("etag", etag.as_str())
                        }
                        Some((bytes, etag)) => answer(200)
                            .insert_header("etag", etag.as_str())
                            .set_body_raw(bytes.to_vec(), "application/vnd.github.raw"),
                        None => not_found(),
                    },
                    "PUT" => {
                        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
                        let content = body["content"].as_str().unwrap_or_default();
                        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(content)
                        else {
                            return json_answer(422, json!({"message": "content is not base64"}));
                        };
                        s.version += 1;
                        let etag = format!("\"etag-{}\"", s.version);
                        s.files.insert(key, (Bytes::from(bytes), etag));
                        s.writes += 1;
                        json_answer(
                            201,
                            json!({"content": {"path": file}, "commit": {"sha": "c0ffee"}}),
                        )
                    }
                    "DELETE" => {
                        s.files.remove(&key);
                        s.writes += 1;
                        json_answer(200, json!({"commit": {"sha": "c0ffee"}}))
                    }
                    _ => answer(405),
                }
            }
            _ => not_found(),
        }
    }
}

/// An in-process source of truth: a map, call counters, and an outage switch.
#[derive(Debug, Clone, Default)]
pub struct CountingSource {
    data: Arc<Mutex<BTreeMap<String, Bytes>>>,
    fetches: Arc<AtomicUsize>,
    puts: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl CountingSource {
    /// A source holding `entries`.
    pub fn with(entries: &[(&str, &str)]) -> Self {
        let s = Self::default();
        for (k, v) in entries {
            s.data
                .lock()
                .unwrap()
                .insert((*k).to_owned(), Bytes::copy_from_slice(v.as_bytes()));
        }
        s
    }

    /// Fetches so far.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Successful and failed writes so far.
    pub fn puts(&self) -> usize {
        self.puts.load(Ordering::SeqCst)
    }

    /// What the source holds for `key`.
    pub fn value(&self, key: &str) -> Option<String> {
        self.data
            .lock()
            .unwrap()
            .get(key)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// Switches the outage on or off.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check_up(&self) -> Result<(), SourceError> {
        if self.down.load(Ordering::SeqCst) {
            Err(SourceError::Unavailable {
                status: Some(503),
                message: "Service Unavailable".into(),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Source for CountingSource {
    async fn fetch(&self, key: &str, _validator: Option<&str>) -> Result<Fetched, SourceError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.check_up()?;
        Ok(match self.data.lock().unwrap().get(key) {
            Some(v) => Fetched::value(v.clone()),
            None => Fetched::NotFound,
        })
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.check_up()?;
        self.data
            .lock()
            .unwrap()
            .insert(key.to_owned(), Bytes::copy_from_slice(value));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), SourceError> {
        self.check_up()?;
        self.data.lock().unwrap().remove(key);
        Ok(())
    }
}
