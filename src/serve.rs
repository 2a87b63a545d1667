//! The cache as an HTTP service (feature `serve`): axum routes over a [`TieredCache`], what
//! `tiercache serve` runs.
//!
//! | route | answer |
//! |---|---|
//! | `GET /components/{key}` | the bytes, `ETag` (an `If-None-Match` naming it gets `304 Not Modified`, no body), `Content-Type` from the extension, `x-tiercache-tier`, `x-tiercache-freshness` and `x-tiercache-stale-reason` (when stale); 404 when the source has no such file |
//! | `PUT /components/{key}` | the body becomes the new content, per the cache's strategy; 204 |
//! | `DELETE /components/{key}` | deleted per the strategy; 204 |
//! | `GET /health` | the [`HealthReport`](crate::HealthReport) as JSON; 503 when unhealthy, else 200 |
//! | `GET /metrics` | [`StatsSnapshot::to_prometheus`](crate::stats::StatsSnapshot::to_prometheus) |
//!
//! Errors are JSON, `{"key", "error", "kind"}` with [`Error::kind`]: 400 for an invalid key,
//! 404 not found, 409 a conflicting write, 503 when the source is unavailable (with
//! `Retry-After` in seconds: until the rate limit's reset or the breaker's next try when known,
//! else [`DEFAULT_RETRY_AFTER`]), 502 for any other refusal of the source, 500 for storage.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = tiercache::TieredCache::builder().sqlite_path("cache.db").build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, tiercache::serve::router(cache)).await?;
//! # Ok(()) }
//! ```

use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::source::SourceError;
use crate::{Error, Freshness, HealthStatus, TieredCache};

/// The service's routes over `cache` (see the [module docs](self)).
pub fn router(cache: TieredCache) -> Router {
    Router::new()
        .route(
            "/components/{*key}",
            get(component).put(put_component).delete(delete_component),
        )
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(cache)
}

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

/// How long a client should wait before asking again, in seconds, from `now`: until the rate
/// limit's reset or the breaker's next try when known (at least 1), else
/// [`DEFAULT_RETRY_AFTER`].
pub fn retry_after(e: &Error, now: SystemTime) -> u64 {
    let until = match e.source_error() {
        Some(SourceError::RateLimited { until, .. }) => Some(*until),
        Some(SourceError::CircuitOpen { until }) => *until,
        _ => None,
    };
    until
        .and_then(|t| t.duration_since(now).ok())
        .map_or(DEFAULT_RETRY_AFTER, |d| d.as_secs().max(1))
}

/// `Retry-After` of a 503 whose end is not known (seconds).
pub const DEFAULT_RETRY_AFTER: u64 = 5;

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
    let l = match cache.lookup(&key).await {
        Ok(Some(l)) => l,
        Ok(None) => return failure(&cache, &key, &Error::NotFound { key: key.clone() }),
        Err(e) => return failure(&cache, &key, &e),
    };
    let etag = l.validator.as_deref();
    let not_modified = match (request.get(header::IF_NONE_MATCH), etag) {
        (Some(inm), Some(etag)) => inm.to_str().is_ok_and(|inm| matches(inm, etag)),
        _ => false,
    };
    let mut res = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let ct = HeaderValue::from_static(content_type(&key, &l.value));
        let mut res = l.value.clone().into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, ct);
        res
    };
    let h = res.headers_mut();
    h.insert(
        "x-tiercache-tier",
        HeaderValue::from_static(l.tier.as_str()),
    );
    let freshness = match l.freshness {
        Freshness::Stale { reason } => {
            let reason = HeaderValue::from_static(reason.as_str());
            h.insert("x-tiercache-stale-reason", reason);
            "stale"
        }
        _ => "fresh",
    };
    h.insert("x-tiercache-freshness", HeaderValue::from_static(freshness));
    if let Some(etag) = etag.and_then(|v| HeaderValue::from_str(v).ok()) {
        h.insert(header::ETAG, etag);
    }
    res
}

async fn put_component(
    State(cache): State<TieredCache>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    match cache.set(&key, body).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failure(&cache, &key, &e),
    }
}

async fn delete_component(State(cache): State<TieredCache>, Path(key): Path<String>) -> Response {
    match cache.delete(&key).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failure(&cache, &key, &e),
    }
}

/// An error as JSON, with the status its kind calls for.
fn failure(cache: &TieredCache, key: &str, e: &Error) -> Response {
    let status = match e.kind() {
        "invalid_key" => StatusCode::BAD_REQUEST,
        "not_found" => StatusCode::NOT_FOUND,
        "conflict" | "superseded" => StatusCode::CONFLICT,
        "storage" | "config" | "encode" | "decode" | "other" => StatusCode::INTERNAL_SERVER_ERROR,
        "unavailable" | "rate_limited" | "circuit_open" | "offline" | "closed" => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    let body = serde_json::json!({ "key": key, "error": e.report(), "kind": e.kind() });
    let mut res = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after(e, cache.clock().now())),
        );
    }
    res
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
    let ct = [(header::CONTENT_TYPE, crate::stats::PROMETHEUS_CONTENT_TYPE)];
    (ct, cache.stats().await.to_prometheus()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_lists_and_weak_tags() {
        assert!(matches("\"a\"", "\"a\""));
        assert!(matches("W/\"a\", \"b\"", "\"a\""));
        assert!(matches("*", "\"x\""));
        assert!(!matches("\"b\"", "\"a\""));
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type("o/r/a.json@v1", b"{}"), "application/json");
        assert_eq!(
            content_type("o/r/notes", b"hi"),
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            content_type("o/r/blob", &[0xff, 0xfe]),
            "application/octet-stream"
        );
    }
}
