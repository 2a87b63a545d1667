//! The cache over GitHubSource, against a wiremock fake of the GitHub REST API on loopback: what
//! reaches GitHub, proved with the fake's request log.

#[path = "support/github_fake.rs"]
mod github_fake;

use std::time::Duration;

use github_fake::Fake;
use tiercache::{Freshness, StaleReason, Tier, TieredCache};
use wiremock::matchers::{header, header_exists, method, path};
use wiremock::{Mock, Request};

const KEY: &str = "octo/app/config/prod.toml";
const CONTENTS: &str = "/repos/octo/app/contents/config/prod.toml";
const TTL: Duration = Duration::from_secs(60);

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn requests(f: &Fake) -> Vec<Request> {
    f.server.received_requests().await.unwrap_or_default()
}

fn cache(f: &Fake) -> TieredCache {
    TieredCache::builder()
        .source(f.source())
        .clock(f.clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(24 * 3600))
        .build()
        .expect("the cache builds")
}

#[tokio::test]
async fn a_fresh_key_is_read_from_github_once() -> TestResult {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(f.raw_file(b"port = 8080\n", "\"v1\""))
        .mount(&f.server)
        .await;
    let cache = cache(&f);
    let first = cache.lookup(KEY).await?.expect("exists");
    assert_eq!(
        (first.tier, first.validator.as_deref()),
        (Tier::L3, Some("\"v1\""))
    );
    let second = cache.lookup(KEY).await?.expect("exists");
    assert_eq!((second.tier, second.value), (Tier::L1, first.value));
    assert_eq!(requests(&f).await.len(), 1, "the second read sent nothing");
    Ok(())
}

#[tokio::test]
async fn an_expired_key_costs_one_conditional_request_renewed_by_a_304() -> TestResult {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .and(header("if-none-match", "\"v1\""))
        .respond_with(f.not_modified("\"v1\""))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(f.raw_file(b"port = 8080\n", "\"v1\""))
        .mount(&f.server)
        .await;
    let cache = cache(&f);
    cache.get(KEY).await?;
    f.clock.advance(TTL + Duration::from_secs(1));
    let renewed = cache.lookup(KEY).await?.expect("exists");
    assert_eq!(
        (renewed.tier, renewed.freshness),
        (Tier::L3, Freshness::Fresh)
    );
    assert_eq!(renewed.value, "port = 8080\n");
    let log = requests(&f).await;
    assert_eq!(log.len(), 2);
    assert_eq!(
        log[1]
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok()),
        Some("\"v1\"")
    );
    // Renewed for a whole TTL: no request until it runs out again.
    f.clock.advance(TTL - Duration::from_secs(1));
    assert_eq!(cache.lookup(KEY).await?.expect("exists").tier, Tier::L1);
    assert_eq!(requests(&f).await.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_rate_limited_github_receives_nothing_until_its_reset() -> TestResult {
    let f = Fake::start().await;
    let reset = f.now() + 600;
    Mock::given(method("GET"))
        .and(header_exists("if-none-match"))
        .respond_with(f.primary_limit(reset))
        .up_to_n_times(1)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .respond_with(f.raw_file(b"v", "\"v1\""))
        .mount(&f.server)
        .await;
    let cache = cache(&f);
    cache.get(KEY).await?;
    f.clock.advance(TTL + Duration::from_secs(1));
    let l = cache.lookup(KEY).await?.expect("a stale copy");
    assert_eq!(
        l.freshness,
        Freshness::Stale {
            reason: StaleReason::RateLimited
        }
    );
    assert_eq!(requests(&f).await.len(), 2);
    // Another key, and the same one, while the budget is spent: nothing is sent.
    assert!(cache
        .get("octo/app/other.txt")
        .await
        .unwrap_err()
        .is_unavailable());
    f.clock.advance(Duration::from_secs(500));
    assert!(cache
        .lookup(KEY)
        .await?
        .expect("stale")
        .freshness
        .is_stale());
    assert_eq!(requests(&f).await.len(), 2, "nothing sent before the reset");
    f.clock.advance(Duration::from_secs(100));
    assert_eq!(
        cache.lookup(KEY).await?.expect("fresh").freshness,
        Freshness::Fresh
    );
    assert_eq!(requests(&f).await.len(), 3);
    Ok(())
}

#[tokio::test]
async fn an_html_5xx_serves_the_stale_copy() -> TestResult {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .respond_with(f.raw_file(b"v", "\"v1\""))
        .up_to_n_times(1)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .respond_with(f.html_error(502))
        .mount(&f.server)
        .await;
    let cache = cache(&f);
    cache.get(KEY).await?;
    f.clock.advance(TTL + Duration::from_secs(1));
    let l = cache.lookup(KEY).await?.expect("a stale copy");
    assert_eq!(
        (l.value.as_ref(), l.freshness),
        (
            &b"v"[..],
            Freshness::Stale {
                reason: StaleReason::SourceError
            }
        )
    );
    let health = cache.health().await;
    assert!(
        health
            .l3
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("502"),
        "{health}"
    );
    Ok(())
}

#[tokio::test]
async fn a_bad_key_touches_nothing_and_sends_nothing() -> TestResult {
    let f = Fake::start().await;
    let cache = cache(&f);
    for key in [
        "octo/app",
        "octo/app/../secret",
        "octo/app//x",
        "octo\\app/x",
    ] {
        let err = cache.get(key).await.unwrap_err();
        assert!(err.is_invalid_key(), "{key}: {err}");
    }
    assert!(requests(&f).await.is_empty());
    assert_eq!(cache.store_summary().await?.entries, 0);
    Ok(())
}

#[tokio::test]
async fn a_warmed_directory_is_available_offline() -> TestResult {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app"))
        .respond_with(f.json(200, serde_json::json!({"default_branch": "main"})))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/git/trees/main"))
        .respond_with(f.json(
            200,
            serde_json::json!({
                "sha": "t", "truncated": false,
                "tree": [
                    {"path": "config", "type": "tree", "sha": "d"},
                    {"path": "config/a.toml", "type": "blob", "sha": "a", "size": 1},
                    {"path": "config/b.toml", "type": "blob", "sha": "b", "size": 1},
                    {"path": "docs/readme.md", "type": "blob", "sha": "c", "size": 1}
                ]
            }),
        ))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/contents/config/a.toml"))
        .respond_with(f.raw_file(b"a", "\"a\""))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/contents/config/b.toml"))
        .respond_with(f.raw_file(b"b", "\"b\""))
        .mount(&f.server)
        .await;
    let cache = cache(&f);
    let summary = cache.warm("octo/app/config", |_| {}).await?;
    assert_eq!((summary.listed, summary.fetched), (2, 2), "{summary:?}");
    cache.set_offline(true);
    let before = requests(&f).await.len();
    f.clock.advance(TTL * 2);
    let l = cache
        .lookup("octo/app/config/b.toml")
        .await?
        .expect("warmed");
    assert_eq!(
        (l.value.as_ref(), l.freshness),
        (
            &b"b"[..],
            Freshness::Stale {
                reason: StaleReason::Offline
            }
        )
    );
    assert_eq!(requests(&f).await.len(), before, "offline sends nothing");
    Ok(())
}

/// An answer that spends the last of the budget (200, `x-ratelimit-remaining: 0`) opens the
/// breaker until the reset: the one gate in front of GitHub. Persisted, it holds another cache
/// on the same file too, whose own source never saw the budget: nothing is sent until the
/// reset, then one request.
#[tokio::test]
async fn the_last_of_the_budget_spent_holds_every_cache_on_the_file_until_the_reset() -> TestResult
{
    let f = Fake::start().await;
    let dir = tempfile::tempdir()?;
    Mock::given(method("GET"))
        .respond_with(
            f.answer(200, 0)
                .insert_header("etag", "\"v1\"")
                .set_body_raw(b"v".to_vec(), "application/vnd.github.raw"),
        )
        .mount(&f.server)
        .await;
    let on_file = || {
        TieredCache::builder()
            .source(f.source())
            .clock(f.clock.clone())
            .ttl(TTL)
            .sqlite_path(dir.path().join("cache.db"))
            .build()
    };
    let (first, second) = (on_file()?, on_file()?);
    assert_eq!(first.get(KEY).await?.as_deref(), Some(&b"v"[..]));
    for cache in [&second, &first] {
        let err = cache.get("octo/app/other.txt").await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
    assert_eq!(
        requests(&f).await.len(),
        1,
        "nothing sent while the budget is spent"
    );
    f.clock.advance(Duration::from_secs(3601));
    assert_eq!(
        second.get("octo/app/other.txt").await?.as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(requests(&f).await.len(), 2);
    Ok(())
}

/// A key pinned to a full commit sha is immutable: read once, then never asked again, whatever
/// the TTL, from L1 or (after L1 is emptied) from L2. A branch key beside it is revalidated.
#[tokio::test]
async fn a_key_pinned_to_a_commit_sha_is_never_revalidated() -> TestResult {
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .and(wiremock::matchers::query_param("ref", SHA))
        .respond_with(f.raw_file(b"port = 8080\n", "\"v1\""))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .and(wiremock::matchers::query_param("ref", "main"))
        .respond_with(f.raw_file(b"port = 9090\n", "\"v2\""))
        .mount(&f.server)
        .await;
    let cache = cache(&f);
    let pinned = format!("{KEY}@{SHA}");
    let branch = format!("{KEY}@main");
    assert_eq!(
        cache.get(&pinned).await?.as_deref(),
        Some(&b"port = 8080\n"[..])
    );
    assert_eq!(
        cache.get(&branch).await?.as_deref(),
        Some(&b"port = 9090\n"[..])
    );
    assert_eq!(requests(&f).await.len(), 2);
    // A year on, far past the TTL and the stale window.
    f.clock.advance(Duration::from_secs(365 * 24 * 3600));
    let l = cache.lookup(&pinned).await?.expect("cached");
    assert_eq!((l.tier, l.freshness), (Tier::L1, Freshness::Fresh));
    cache.clear_memory().await;
    let l = cache.lookup(&pinned).await?.expect("cached");
    assert_eq!((l.tier, l.freshness), (Tier::L2, Freshness::Fresh));
    assert_eq!(
        requests(&f).await.len(),
        2,
        "the pinned key sent nothing more"
    );
    cache.get(&branch).await?;
    assert_eq!(
        requests(&f).await.len(),
        3,
        "the branch key was asked again"
    );
    Ok(())
}
