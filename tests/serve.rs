//! The HTTP service (`tiercache::serve`, `tiercache serve`) over a loopback fake GitHub: two
//! replicas on one database see each other's writes, a conditional GET gets 304, errors are
//! JSON with their kind, and the binary serves until SIGTERM, then exits 0.

#[path = "support/github_fake.rs"]
mod github_fake;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use github_fake::Fake;
use tiercache::TieredCache;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use wiremock::matchers::{method, path};
use wiremock::Mock;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const KEY: &str = "octo/app/config/prod.toml";
const CONTENTS: &str = "/repos/octo/app/contents/config/prod.toml";

/// One HTTP/1.1 request: the status code, the headers (lower-case names) and the body.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> std::io::Result<(u16, Vec<(String, String)>, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw.get(split + 4..).unwrap_or_default().to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

async fn start(cache: TieredCache) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(axum::serve(listener, tiercache::serve::router(cache)).into_future());
    Ok(addr)
}

#[tokio::test]
async fn two_replicas_on_one_database_serve_each_others_writes() -> TestResult {
    let github = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(github.raw_file(b"port = 8080\n", "\"v1\""))
        .mount(&github.server)
        .await;
    Mock::given(method("GET"))
        .respond_with(github.not_found())
        .mount(&github.server)
        .await;
    let dir = tempfile::tempdir()?;
    let replica = || {
        TieredCache::builder()
            .source(github.source())
            .sqlite_path(dir.path().join("cache.db"))
            .build()
    };
    let (a, b) = (start(replica()?).await?, start(replica()?).await?);
    let url = format!("/components/{KEY}");

    let (status, headers, body) = request(a, "GET", &url, &[], b"").await?;
    assert_eq!((status, body.as_slice()), (200, &b"port = 8080\n"[..]));
    assert_eq!(header(&headers, "etag"), Some("\"v1\""));
    assert_eq!(header(&headers, "content-type"), Some("application/toml"));
    assert_eq!(header(&headers, "x-tiercache-tier"), Some("l3"));
    assert_eq!(header(&headers, "x-tiercache-freshness"), Some("fresh"));
    // The other replica has it from the shared L2; a conditional GET gets 304, no body.
    let (status, headers, body) = request(b, "GET", &url, &["If-None-Match: \"v1\""], b"").await?;
    assert_eq!((status, body.len()), (304, 0));
    assert_eq!(header(&headers, "x-tiercache-tier"), Some("l2"));

    // A PUT through one (read-through: the shared cache only), a GET through the other.
    let (status, ..) = request(b, "PUT", &url, &[], b"port = 9090\n").await?;
    assert_eq!(status, 204);
    let (status, _, body) = request(a, "GET", &url, &[], b"").await?;
    assert_eq!((status, body.as_slice()), (200, &b"port = 9090\n"[..]));
    // A DELETE through one: the other asks GitHub again.
    let (status, ..) = request(a, "DELETE", &url, &[], b"").await?;
    assert_eq!(status, 204);
    let (status, headers, _) = request(b, "GET", &url, &[], b"").await?;
    assert_eq!(
        (status, header(&headers, "x-tiercache-tier")),
        (200, Some("l3"))
    );

    let (status, headers, body) =
        request(a, "GET", "/components/octo/app/gone.txt", &[], b"").await?;
    assert_eq!(status, 404);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(json["kind"], "not_found");
    let (status, _, body) = request(a, "GET", "/components/not%20a%20key", &[], b"").await?;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body)?["kind"],
        "invalid_key"
    );
    let (status, _, body) = request(a, "GET", "/health", &[], b"").await?;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body)?["status"],
        "healthy"
    );
    let (status, headers, body) = request(a, "GET", "/metrics", &[], b"").await?;
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").is_some_and(|c| c
        .starts_with("application/openmetrics-text")
        || c.starts_with("text/plain")));
    assert!(String::from_utf8(body)?.contains("tiercache_"));
    Ok(())
}

#[tokio::test]
async fn a_rate_limited_github_gets_503_with_retry_after_until_its_reset() -> TestResult {
    let github = Fake::start().await;
    let reset = github.now() + 120;
    Mock::given(method("GET"))
        .respond_with(github.primary_limit(reset))
        .mount(&github.server)
        .await;
    let cache = TieredCache::builder()
        .source(github.source())
        .clock(github.clock.clone())
        .build()?;
    let addr = start(cache).await?;
    let url = format!("/components/{KEY}");
    let (status, headers, body) = request(addr, "GET", &url, &[], b"").await?;
    assert_eq!(status, 503);
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(json["kind"], "rate_limited");
    assert_eq!(header(&headers, "retry-after"), Some("120"));
    // Held by the breaker (nothing sent): the wait counts down on the cache's clock.
    github.clock.advance(Duration::from_secs(100));
    let (status, headers, _) = request(addr, "GET", &url, &[], b"").await?;
    assert_eq!((status, header(&headers, "retry-after")), (503, Some("20")));
    let sent = github.server.received_requests().await.unwrap_or_default();
    assert_eq!(sent.len(), 1);
    Ok(())
}

/// `tiercache serve --listen 127.0.0.1:0`: the first line names the address; it serves; SIGTERM
/// stops it cleanly (exit 0).
#[cfg(unix)]
#[tokio::test]
async fn the_binary_serves_until_sigterm() -> TestResult {
    let github = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(github.raw_file(b"port = 8080\n", "\"v1\""))
        .mount(&github.server)
        .await;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("cache.db");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tiercache"))
        .args([
            "--db",
            db.to_str().ok_or("path")?,
            "--api-url",
            &github.server.uri(),
        ])
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("GITHUB_TOKEN", "ghp_servetesttoken")
        .env_remove("TIERCACHE_DB")
        .env_remove("TIERCACHE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let mut first = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut first),
    )
    .await??;
    let addr: SocketAddr = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| format!("no address in {first:?}"))?
        .parse()?;
    let (status, _, body) = request(addr, "GET", &format!("/components/{KEY}"), &[], b"").await?;
    assert_eq!((status, body.as_slice()), (200, &b"port = 8080\n"[..]));
    let pid = child.id().ok_or("pid")?.to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await?;
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).await?;
    }
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("ghp_servetesttoken"));
    Ok(())
}
