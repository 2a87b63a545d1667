//! A small HTTP service embedding the cache: the routes of [`tiercache::serve`] (feature
//! `serve`), the same that `tiercache serve` runs:
//!
//! * `GET /components/{*key}` — the file's bytes (`PUT` and `DELETE` write per the strategy), with its `ETag` (a request whose
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
use std::time::Duration;

use axum::Router;
use common::FakeGitHub;
use tiercache::source::github::GitHubSource;
use tiercache::TieredCache;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use tiercache::serve::content_type;

/// The service's routes over `cache`: the library's [`tiercache::serve::router`] (what
/// `tiercache serve` runs).
pub fn app(cache: TieredCache) -> Router {
    tiercache::serve::router(cache)
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
