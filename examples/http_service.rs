//! A small HTTP service embedding the cache (axum):
//!
//! * `GET /components/{*key}` — the file's bytes, with `x-tiercache-tier` and
//!   `x-tiercache-freshness` headers (`x-tiercache-stale-reason` when stale); 404 when GitHub
//!   says it does not exist, 400 for a bad key, 503 when GitHub is unavailable and no copy is
//!   cached;
//! * `GET /health` — the health report as JSON; 503 when unhealthy;
//! * `GET /metrics` — the stats in the Prometheus text format.
//!
//! GitHub is a loopback fake. The service listens on 127.0.0.1 (a free port) and prints its
//! address; it then makes a few requests to itself and exits — unless `--serve` is given, in
//! which case it serves until Ctrl-C.
//!
//! ```text
//! cargo run --example http_service
//! cargo run --example http_service -- --serve
//! ```

mod common;

use std::future::IntoFuture;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::FakeGitHub;
use tiercache::source::github::GitHubSource;
use tiercache::{Error, Freshness, HealthStatus, TieredCache};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn component(State(cache): State<TieredCache>, Path(key): Path<String>) -> Response {
    match cache.lookup(&key).await {
        Ok(Some(l)) => {
            let mut res = l.value.clone().into_response();
            let h = res.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
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
            if let Some(etag) = l
                .validator
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
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
            (status, format!("{e}\n")).into_response()
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

fn app(cache: TieredCache) -> Router {
    Router::new()
        .route("/components/{*key}", get(component))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(cache)
}

/// A bare HTTP/1.1 GET: status line, the `x-tiercache-*` headers, and the body.
async fn fetch(
    addr: std::net::SocketAddr,
    path: &str,
) -> std::io::Result<(String, Vec<String>, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
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
            l.starts_with("x-tiercache") || l.starts_with("content-type")
        })
        .map(str::to_owned)
        .collect();
    Ok((status, headers, body.to_owned()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve = std::env::args().any(|a| a == "--serve");
    let github = FakeGitHub::start().await;
    github.put_file("octo/app/config/prod.toml", "port = 8080\n");
    github.put_file("octo/app/ui/button.json", "{\"color\": \"teal\"}\n");
    let dir = tempfile::tempdir()?;
    let cache = TieredCache::builder()
        .sqlite_path(dir.path().join("cache.db"))
        .source(
            GitHubSource::builder()
                .base_url(github.uri())
                .anonymous()
                .timeout(Duration::from_secs(5))
                .build()?,
        )
        .build()?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!(
        "listening on http://{addr} (fake GitHub at {})",
        github.uri()
    );
    let server = tokio::spawn(axum::serve(listener, app(cache.clone())).into_future());

    if serve {
        println!("try: curl -i http://{addr}/components/octo/app/config/prod.toml");
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }

    for path in [
        "/components/octo/app/config/prod.toml",
        "/components/octo/app/config/prod.toml",
        "/components/octo/app/ui/button.json",
        "/components/octo/app/missing.txt",
        "/components/not%20a%20key",
    ] {
        let (status, headers, body) = fetch(addr, path).await?;
        println!(
            "GET {path}\n  {status}  {}\n  {}",
            headers.join("  "),
            body.trim_end()
        );
    }
    github.set_down(true);
    let (status, _, body) = fetch(addr, "/components/octo/app/never-cached.txt").await?;
    println!(
        "GitHub down, GET an uncached file\n  {status}\n  {}",
        body.trim_end()
    );
    github.set_down(false);

    let (status, _, body) = fetch(addr, "/health").await?;
    println!("GET /health\n  {status}\n  {}", body.trim_end());
    let (status, _, body) = fetch(addr, "/metrics").await?;
    println!("GET /metrics\n  {status}");
    for line in body
        .lines()
        .filter(|l| l.starts_with("tiercache_hits") || l.starts_with("tiercache_source"))
        .take(8)
    {
        println!("  {line}");
    }
    server.abort();
    Ok(())
}
