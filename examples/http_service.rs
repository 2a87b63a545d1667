//! A small HTTP service embedding the cache (axum):
//!
//! * `GET /components/{*key}` — the file's bytes, with its `ETag` (a request whose
//!   `If-None-Match` names it gets `304 Not Modified`, no body), a `Content-Type` from the file's
//!   extension, and `x-tiercache-tier` and `x-tiercache-freshness` headers
//!   (`x-tiercache-stale-reason` when stale); 404 when GitHub says it does not exist, 400 for a
//!   bad key, 503 with `Retry-After` when GitHub is unavailable and no copy is cached;
//! * `GET /health` — the health report as JSON: 200 when healthy or degraded (still serving;
//!   the body's `status` says which, with each tier's last error), 503 when unhealthy;
//! * `GET /metrics` — the stats in the Prometheus text format.
//!
//! By default GitHub is a loopback fake: the service listens on 127.0.0.1 (a free port), prints
//! its address, makes a few requests to itself and exits. With `--serve` it serves until
//! Ctrl-C; `--api-url URL` (or `GITHUB_API_URL`) points it at a real GitHub API instead of the
//! fake (with the token of `GITHUB_TOKEN`, if set).
//!
//! ```text
//! cargo run --example http_service
//! cargo run --example http_service -- --serve
//! GITHUB_TOKEN=... cargo run --example http_service -- --serve --api-url https://api.github.com
//! ```

pub mod common;

use std::future::IntoFuture;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::FakeGitHub;
use tiercache::source::github::GitHubSource;
use tiercache::source::SourceError;
use tiercache::{Error, Freshness, HealthStatus, TieredCache};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The media type of a component, from its extension; text without a known extension is
/// `text/plain`, anything else `application/octet-stream`.
pub fn content_type(key: &str, bytes: &[u8]) -> &'static str {
    let path = key.rsplit_once('@').map_or(key, |(p, _)| p);
    let ext = path
        .rsplit_once('/')
        .map_or(path, |(_, name)| name)
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("json") => "application/json",
        Some("toml") => "application/toml",
        Some("yaml" | "yml") => "application/yaml",
        Some("md") => "text/markdown; charset=utf-8",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        _ if std::str::from_utf8(bytes).is_ok() => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Seconds until GitHub may answer again: the rate limit's reset, the breaker's next try, or
/// a few seconds for any other outage.
pub fn retry_after(e: &Error) -> u64 {
    let until = match e.source_error() {
        Some(SourceError::RateLimited { until, .. }) => Some(*until),
        Some(SourceError::CircuitOpen { until }) => *until,
        _ => None,
    };
    until
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .map_or(5, |d| d.as_secs().max(1))
}

/// Whether an `If-None-Match` header value names `etag` (a list, weak tags and `*` allowed).
fn matches(if_none_match: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    if_none_match
        .split(',')
        .any(|t| t.trim() == "*" || bare(t) == bare(etag))
}

async fn component(
    State(cache): State<TieredCache>,
    Path(key): Path<String>,
    request: HeaderMap,
) -> Response {
    match cache.lookup(&key).await {
        Ok(Some(l)) => {
            let etag = l.validator.as_deref();
            let not_modified = match (request.get(header::IF_NONE_MATCH), etag) {
                (Some(inm), Some(etag)) => inm.to_str().is_ok_and(|inm| matches(inm, etag)),
                _ => false,
            };
            let mut res = if not_modified {
                StatusCode::NOT_MODIFIED.into_response()
            } else {
                let mut res = l.value.clone().into_response();
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type(&key, &l.value)),
                );
                res
            };
            let h = res.headers_mut();
            h.insert(
                "x-tiercache-tier",
                HeaderValue::from_static(l.tier.as_str()),
            );
            match l.freshness {
                Freshness::Stale { reason } => {
                    h.insert("x-tiercache-freshness", HeaderValue::from_static("stale"));
                    h.insert(
                        "x-tiercache-stale-reason",
                        HeaderValue::from_static(reason.as_str()),
                    );
                }
                _ => {
                    h.insert("x-tiercache-freshness", HeaderValue::from_static("fresh"));
                }
            }
            if let Some(etag) = etag.and_then(|v| HeaderValue::from_str(v).ok()) {
                h.insert(header::ETAG, etag);
            }
            res
        }
        Ok(None) => (StatusCode::NOT_FOUND, format!("{key} not found\n")).into_response(),
        Err(e) => {
            let status = match &e {
                Error::InvalidKey { .. } => StatusCode::BAD_REQUEST,
                e if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
                Error::NotFound { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_GATEWAY,
            };
            let mut res = (status, format!("{}\n", e.report())).into_response();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after(&e)));
            }
            res
        }
    }
}

async fn health(State(cache): State<TieredCache>) -> Response {
    let report = cache.health().await;
    let status = if report.status == HealthStatus::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, axum::Json(report)).into_response()
}

async fn metrics(State(cache): State<TieredCache>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            tiercache::stats::PROMETHEUS_CONTENT_TYPE,
        )],
        cache.stats().await.to_prometheus(),
    )
        .into_response()
}

/// The service's routes over `cache`.
pub fn app(cache: TieredCache) -> Router {
    Router::new()
        .route("/components/{*key}", get(component))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(cache)
}

/// A bare HTTP/1.1 GET with `extra` header lines: status line, the `x-tiercache-*`,
/// `content-type`, `etag` and `retry-after` headers, and the body.
pub async fn fetch(
    addr: std::net::SocketAddr,
    path: &str,
    extra: &[&str],
) -> std::io::Result<(String, Vec<String>, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let extra: String = extra.iter().map(|h| format!("{h}\r\n")).collect();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            ["x-tiercache", "content-type", "etag", "retry-after"]
                .iter()
                .any(|h| l.starts_with(h))
        })
        .map(str::to_owned)
        .collect();
    Ok((status, headers, body.to_owned()))
}

/// `--api-url URL` from the command line, else `GITHUB_API_URL`.
fn api_url() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--api-url")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            std::env::var("GITHUB_API_URL")
                .ok()
                .filter(|u| !u.is_empty())
        })
}

#[allow(dead_code)] // Also compiled as a module of tests/http_service.rs, which has its own.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve = std::env::args().any(|a| a == "--serve");
    let github = FakeGitHub::start().await;
    github.put_file("octo/app/config/prod.toml", "port = 8080\n");
    github.put_file("octo/app/ui/button.json", "{\"color\": \"teal\"}\n");
    let real = api_url().filter(|_| serve);
    let source = match &real {
        Some(url) => GitHubSource::builder()
            .base_url(url.as_str())
            .token_from_env(),
        None => GitHubSource::builder().base_url(github.uri()).anonymous(),
    };
    let dir = tempfile::tempdir()?;
    let cache = TieredCache::builder()
        .sqlite_path(dir.path().join("cache.db"))
        .source(source.timeout(Duration::from_secs(5)).build()?)
        .build()?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let upstream = real.unwrap_or_else(|| format!("fake GitHub at {}", github.uri()));
    println!("listening on http://{addr} ({upstream})");
    let server = tokio::spawn(axum::serve(listener, app(cache.clone())).into_future());

    if serve {
        println!("try: curl -i http://{addr}/components/octo/app/config/prod.toml");
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }

    let mut etag = String::new();
    for path in [
        "/components/octo/app/config/prod.toml",
        "/components/octo/app/config/prod.toml",
        "/components/octo/app/ui/button.json",
        "/components/octo/app/missing.txt",
        "/components/not%20a%20key",
    ] {
        let (status, headers, body) = fetch(addr, path, &[]).await?;
        if let Some(e) = headers.iter().find_map(|h| h.strip_prefix("etag: ")) {
            etag = e.to_owned();
        }
        println!(
            "GET {path}\n  {status}  {}\n  {}",
            headers.join("  "),
            body.trim_end()
        );
    }
    let path = "/components/octo/app/ui/button.json";
    let inm = format!("If-None-Match: {etag}");
    let (status, headers, _) = fetch(addr, path, &[&inm]).await?;
    println!("GET {path} with {inm}\n  {status}  {}", headers.join("  "));
    github.set_down(true);
    let (status, headers, body) = fetch(addr, "/components/octo/app/never-cached.txt", &[]).await?;
    println!(
        "GitHub down, GET an uncached file\n  {status}  {}\n  {}",
        headers.join("  "),
        body.trim_end()
    );
    github.set_down(false);

    let (status, _, body) = fetch(addr, "/health", &[]).await?;
    println!("GET /health\n  {status}\n  {}", body.trim_end());
    let (status, _, body) = fetch(addr, "/metrics", &[]).await?;
    println!("GET /metrics\n  {status}");
    for line in body
        .lines()
        .filter(|l| {
            [
                "tiercache_hits",
                "tiercache_source_calls",
                "tiercache_latency_seconds_sum",
            ]
            .iter()
            .any(|m| l.starts_with(m))
        })
        .take(14)
    {
        println!("  {line}");
    }
    server.abort();
    Ok(())
}
