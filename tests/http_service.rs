//! The `http_service` example's routes, served on loopback over the example's fake GitHub:
//! `If-None-Match` gets a 304, the content type follows the extension, a 503 has `Retry-After`.

#[path = "../examples/http_service.rs"]
#[allow(dead_code, unreachable_pub)]
mod http_service;

use std::future::IntoFuture;
use std::time::Duration;

use http_service::common::FakeGitHub;
use tiercache::source::github::GitHubSource;
use tiercache::TieredCache;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn etag_304_content_type_and_retry_after() -> TestResult {
    let github = FakeGitHub::start().await;
    github.put_file("octo/app/ui/button.json", "{\"color\": \"teal\"}\n");
    let cache = TieredCache::builder()
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
    let server = tokio::spawn(axum::serve(listener, http_service::app(cache)).into_future());

    let path = "/components/octo/app/ui/button.json";
    let (status, headers, body) = http_service::fetch(addr, path, &[]).await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains(&"content-type: application/json".to_owned()),
        "{headers:?}"
    );
    assert_eq!(body, "{\"color\": \"teal\"}\n");
    let etag = headers
        .iter()
        .find_map(|h| h.strip_prefix("etag: "))
        .expect("an ETag")
        .to_owned();

    let inm = format!("If-None-Match: {etag}");
    let (status, headers, body) = http_service::fetch(addr, path, &[&inm]).await?;
    assert_eq!(status, "HTTP/1.1 304 Not Modified");
    assert!(body.is_empty());
    assert!(headers.contains(&format!("etag: {etag}")), "{headers:?}");
    let (status, ..) = http_service::fetch(addr, path, &["If-None-Match: \"other\""]).await?;
    assert_eq!(status, "HTTP/1.1 200 OK");

    github.set_down(true);
    let (status, headers, _) =
        http_service::fetch(addr, "/components/octo/app/never-cached.txt", &[]).await?;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(
        headers.iter().any(|h| h.starts_with("retry-after: ")),
        "{headers:?}"
    );
    server.abort();
    Ok(())
}

#[test]
fn content_types_follow_the_extension() {
    use http_service::content_type;
    assert_eq!(content_type("o/r/a.toml@main", b"x"), "application/toml");
    assert_eq!(
        content_type("o/r/README.md", b"x"),
        "text/markdown; charset=utf-8"
    );
    assert_eq!(
        content_type("o/r/LICENSE", b"text"),
        "text/plain; charset=utf-8"
    );
    assert_eq!(
        content_type("o/r/blob", &[0xff, 0xfe]),
        "application/octet-stream"
    );
}
