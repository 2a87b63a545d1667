//! GitHubSource against a wiremock fake of the GitHub REST API, on loopback only.

#[path = "support/github_fake.rs"]
mod github_fake;

use std::sync::Arc;
use std::time::Duration;

use github_fake::{at, refused_uri, Fake};
use serde_json::{json, Value};
use tiercache::source::github::{GitHubKey, GitHubSource};
use tiercache::source::{Fetched, Source, SourceError};
use tiercache::KeyError;
use wiremock::matchers::{any, body_partial_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const CONTENTS: &str = "/repos/octo/app/contents/config/prod.toml";

async fn received(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.expect("recording is on")
}

fn hdr<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_200_carries_the_etag_and_the_budget() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(f.raw_file(b"port = 8080\n", "\"5f3c\""))
        .expect(1)
        .mount(&f.server)
        .await;
    let gh = f.source();
    let got = gh.fetch("octo/app/config/prod.toml", None).await.unwrap();
    assert_eq!(
        got,
        Fetched::Value {
            value: "port = 8080\n".into(),
            validator: Some("\"5f3c\"".into()),
            ttl: None
        }
    );
    let reqs = received(&f.server).await;
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.url.path(), CONTENTS);
    assert_eq!(r.url.query(), None, "no ref: the default branch");
    assert_eq!(hdr(r, "accept"), Some("application/vnd.github.raw+json"));
    assert!(hdr(r, "if-none-match").is_none());
    assert!(hdr(r, "authorization").is_none(), "anonymous");
    assert!(r
        .headers
        .get_all("user-agent")
        .iter()
        .any(|v| v.to_str().unwrap().starts_with("tiercache/")));
    let budget = gh.rate_limit().expect("budget read from the answer");
    assert_eq!((budget.limit, budget.remaining), (5000, 4999));
    assert_eq!(budget.reset, at(f.reset()));
}

#[tokio::test]
async fn binary_files_come_back_byte_for_byte() {
    let f = Fake::start().await;
    let bytes: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    Mock::given(path("/repos/o/r/contents/logo.png"))
        .respond_with(f.raw_file(&bytes, "\"bin\""))
        .mount(&f.server)
        .await;
    match f.source().fetch("o/r/logo.png", None).await.unwrap() {
        Fetched::Value { value, .. } => assert_eq!(&value[..], &bytes[..]),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_conditional_request_sends_the_validator_exactly_and_304_is_not_modified() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .and(query_param("ref", "v1.2"))
        .respond_with(f.not_modified("W/\"5f3c\""))
        .expect(2)
        .mount(&f.server)
        .await;
    let gh = f.source();
    for validator in ["W/\"5f3c\"", "\"5f3c\""] {
        let got = gh
            .fetch("octo/app/config/prod.toml@v1.2", Some(validator))
            .await
            .unwrap();
        assert_eq!(got, Fetched::NotModified { ttl: None });
    }
    let reqs = received(&f.server).await;
    assert_eq!(hdr(&reqs[0], "if-none-match"), Some("W/\"5f3c\""));
    assert_eq!(hdr(&reqs[1], "if-none-match"), Some("\"5f3c\""));
}

#[tokio::test]
async fn a_404_is_not_found_and_its_budget_is_kept() {
    let f = Fake::start().await;
    Mock::given(any())
        .respond_with(f.answer(404, 4321).set_body_raw(
            r#"{"message":"Not Found","documentation_url":"https://docs.github.com/rest/repos/contents#get-repository-content","status":"404"}"#,
            "application/json; charset=utf-8",
        ))
        .mount(&f.server)
        .await;
    let gh = f.source();
    assert_eq!(
        gh.fetch("o/r/missing.txt", None).await.unwrap(),
        Fetched::NotFound
    );
    assert_eq!(gh.rate_limit().unwrap().remaining, 4321);
}

#[tokio::test]
async fn a_directory_is_rejected_but_a_json_file_is_a_file() {
    let f = Fake::start().await;
    Mock::given(path("/repos/o/r/contents/docs"))
        .respond_with(f.directory("docs"))
        .mount(&f.server)
        .await;
    // A JSON file that looks exactly like a directory listing, served raw.
    let lookalike = br#"[{"type":"file","name":"a.txt","path":"docs/a.txt"}]"#;
    Mock::given(path("/repos/o/r/contents/listing.json"))
        .respond_with(f.raw_file(lookalike, "\"j1\""))
        .mount(&f.server)
        .await;
    let gh = f.source();
    match gh.fetch("o/r/docs", None).await {
        Err(SourceError::Rejected { status, message }) => {
            assert_eq!(status, Some(200));
            assert!(message.contains("directory"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match gh.fetch("o/r/listing.json", None).await.unwrap() {
        Fetched::Value { value, .. } => assert_eq!(&value[..], lookalike),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_primary_rate_limit_stops_all_calls_until_the_reset() {
    let f = Fake::start().await;
    let reset = f.now() + 60;
    Mock::given(any())
        .respond_with(f.primary_limit(reset))
        .up_to_n_times(1)
        .mount(&f.server)
        .await;
    Mock::given(any())
        .respond_with(f.raw_file(b"ok", "\"e\""))
        .mount(&f.server)
        .await;
    let gh = f.source();
    let err = gh.fetch("o/r/a.txt", None).await.unwrap_err();
    match &err {
        SourceError::RateLimited {
            until,
            status,
            message,
        } => {
            assert_eq!(*until, at(reset));
            assert_eq!(*status, Some(403));
            assert!(message.contains("API rate limit exceeded"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("HTTP 403"), "{err}");
    assert_eq!(gh.rate_limit().unwrap().remaining, 0);
    // Spent budget: nothing is sent, whatever the call.
    f.clock.advance(Duration::from_secs(30));
    for r in [
        gh.fetch("o/r/a.txt", None).await.map(|_| ()),
        gh.put("o/r/a.txt", b"x").await,
        gh.delete("o/r/a.txt").await,
        gh.list("o/r").await.map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().rate_limited_until(), Some(at(reset)));
    }
    assert_eq!(
        received(&f.server).await.len(),
        1,
        "nothing sent until the reset"
    );
    // Past the reset: it sends again.
    f.clock.advance(Duration::from_secs(31));
    assert!(matches!(
        gh.fetch("o/r/a.txt", None).await.unwrap(),
        Fetched::Value { .. }
    ));
    assert_eq!(received(&f.server).await.len(), 2);
}

#[tokio::test]
async fn a_secondary_rate_limit_waits_for_retry_after() {
    let f = Fake::start().await;
    let now = f.now();
    // Seconds, an HTTP date, and none at all (GitHub: wait at least a minute).
    let date = "Thu, 01 Jan 2026 00:05:00 GMT"; // the mock clock starts at 2026-01-01T00:00:00Z
    assert_eq!(now, 1_767_225_600);
    for (status, retry_after, wait) in [
        (403, Some("120"), 120),
        (429, Some(date), 300),
        (403, None, 60),
    ] {
        f.server.reset().await;
        Mock::given(any())
            .respond_with(f.secondary_limit(status, retry_after))
            .mount(&f.server)
            .await;
        let gh = f.source();
        match gh.fetch("o/r/a.txt", None).await {
            Err(SourceError::RateLimited {
                until,
                status: s,
                message,
            }) => {
                assert_eq!(until, at(now + wait), "{retry_after:?}");
                assert_eq!(s, Some(status));
                assert!(message.contains("secondary rate limit"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Held off: the next call sends nothing.
        let again = gh.fetch("o/r/a.txt", None).await.unwrap_err();
        assert_eq!(again.rate_limited_until(), Some(at(now + wait)));
        assert_eq!(received(&f.server).await.len(), 1);
    }
}

#[tokio::test]
async fn errors_are_classified_with_githubs_message_and_status() {
    let f = Fake::start().await;
    Mock::given(path("/repos/o/r/contents/502"))
        .respond_with(f.html_error(502))
        .mount(&f.server)
        .await;
    Mock::given(path("/repos/o/r/contents/401"))
        .respond_with(f.error(401, "Bad credentials"))
        .mount(&f.server)
        .await;
    Mock::given(path("/repos/o/r/contents/403"))
        .respond_with(f.error(403, "Resource not accessible by integration"))
        .mount(&f.server)
        .await;
    Mock::given(path("/repos/o/r/contents/451"))
        .respond_with(f.error(451, "Repository access blocked"))
        .mount(&f.server)
        .await;
    let gh = f.source();
    let e = gh.fetch("o/r/502", None).await.unwrap_err();
    assert!(
        matches!(&e, SourceError::Unavailable { status: Some(502), message } if !message.contains("<html")),
        "{e:?}"
    );
    assert!(e.counts_as_failure());
    let e = gh.fetch("o/r/401", None).await.unwrap_err();
    assert_eq!(
        e,
        SourceError::Unauthorized {
            status: Some(401),
            message: "Bad credentials".into()
        }
    );
    assert!(!e.counts_as_failure());
    let e = gh.fetch("o/r/403", None).await.unwrap_err();
    assert_eq!(
        e,
        SourceError::Rejected {
            status: Some(403),
            message: "Resource not accessible by integration".into()
        }
    );
    let e = gh.fetch("o/r/451", None).await.unwrap_err();
    assert!(
        e.to_string().contains("HTTP 451") && e.to_string().contains("Repository access blocked")
    );
    // None of these were rate limits: the next call goes out.
    gh.fetch("o/r/401", None).await.unwrap_err();
    assert_eq!(received(&f.server).await.len(), 5);
}

#[tokio::test]
async fn garbage_where_json_was_needed_is_an_invalid_response() {
    let f = Fake::start().await;
    Mock::given(path("/repos/o/r/git/trees/main"))
        .respond_with(
            f.answer(200, 4999)
                .set_body_raw("{\"tree\": [oops", "application/json"),
        )
        .mount(&f.server)
        .await;
    let e = f.source().list("o/r@main").await.unwrap_err();
    assert!(matches!(e, SourceError::InvalidResponse { .. }), "{e:?}");
    assert!(e.counts_as_failure());
}

#[tokio::test]
async fn a_refused_connection_is_unavailable() {
    let uri = refused_uri().await;
    let gh = GitHubSource::builder()
        .base_url(uri)
        .anonymous()
        .build()
        .unwrap();
    let e = gh.fetch("o/r/a.txt", None).await.unwrap_err();
    assert!(
        matches!(&e, SourceError::Unavailable { status: None, .. }),
        "{e:?}"
    );
    assert!(e.counts_as_failure());
    let text = e.to_string();
    eprintln!("{text}");
    assert!(
        text.contains("refused") && !text.contains("Found at"),
        "{text}"
    );
}

#[tokio::test]
async fn a_slow_answer_times_out_at_the_call_deadline() {
    let f = Fake::start().await;
    Mock::given(any())
        .respond_with(
            f.raw_file(b"late", "\"l\"")
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&f.server)
        .await;
    let gh = GitHubSource::builder()
        .base_url(f.server.uri())
        .anonymous()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let e = gh.fetch("o/r/a.txt", None).await.unwrap_err();
    assert_eq!(
        e,
        SourceError::Timeout {
            after: Duration::from_millis(200)
        }
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_bad_key_sends_nothing() {
    let f = Fake::start().await;
    Mock::given(any())
        .respond_with(f.raw_file(b"x", "\"x\""))
        .mount(&f.server)
        .await;
    let gh = f.source();
    for key in [
        "octo",
        "octo/app",
        "octo/app/",
        "octo/app/a//b",
        "octo/app/../secrets",
        "octo/app/./a",
        "octo/app/a\\b",
        "octo/app/a\0b",
        "octo/app/a@bad..ref",
    ] {
        let by_check = gh.check_key(key).unwrap_err();
        assert!(matches!(by_check, KeyError::Malformed(_)), "{key:?}");
        assert_eq!(
            gh.fetch(key, None).await.unwrap_err(),
            SourceError::InvalidKey(by_check.clone()),
            "{key:?}"
        );
        assert!(matches!(
            gh.put(key, b"x").await,
            Err(SourceError::InvalidKey(_))
        ));
        assert!(matches!(
            gh.delete(key).await,
            Err(SourceError::InvalidKey(_))
        ));
    }
    assert!(matches!(
        gh.list("octo").await,
        Err(SourceError::InvalidKey(_))
    ));
    assert!(matches!(
        gh.list("o/r/../x").await,
        Err(SourceError::InvalidKey(_))
    ));
    assert!(received(&f.server).await.is_empty());
}

#[tokio::test]
async fn odd_characters_are_percent_encoded_and_round_trip() {
    let f = Fake::start().await;
    Mock::given(any())
        .respond_with(f.raw_file(b"odd", "\"o\""))
        .mount(&f.server)
        .await;
    let gh = f.source();
    let key = "o/r/dir name/ünï cödé #1?%20.txt@feature/x";
    let parsed: GitHubKey = key.parse().unwrap();
    gh.fetch(key, None).await.unwrap();
    let reqs = received(&f.server).await;
    let r = &reqs[0];
    assert_eq!(
        r.url.path(),
        "/repos/o/r/contents/dir%20name/%C3%BCn%C3%AF%20c%C3%B6d%C3%A9%20%231%3F%2520.txt"
    );
    assert_eq!(r.url.query(), Some("ref=feature%2Fx"));
    let decoded = percent_encoding::percent_decode_str(
        r.url.path().strip_prefix("/repos/o/r/contents/").unwrap(),
    )
    .decode_utf8()
    .unwrap();
    assert_eq!(decoded, parsed.path);
    let refs: Vec<_> = r.url.query_pairs().collect();
    assert_eq!(refs[0].1, "feature/x");
}

#[tokio::test]
async fn put_looks_up_the_sha_then_commits_base64_content_on_the_branch() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .and(query_param("ref", "dev"))
        .and(header("accept", "application/vnd.github.object+json"))
        .respond_with(f.file_object(
            "config/prod.toml",
            "3b18e512dba79e4c8300dd08aeb37f8e728b8dad",
        ))
        .expect(1)
        .mount(&f.server)
        .await;
    Mock::given(method("PUT"))
        .and(path(CONTENTS))
        .respond_with(f.json(
            200,
            json!({"content": {"sha": "new"}, "commit": {"sha": "c1"}}),
        ))
        .expect(1)
        .mount(&f.server)
        .await;
    let gh = GitHubSource::builder()
        .base_url(f.server.uri())
        .anonymous()
        .commit_message("cache wrote {path} ({op})")
        .build()
        .unwrap();
    gh.put("octo/app/config/prod.toml@dev", b"port = 9090\n")
        .await
        .unwrap();
    let reqs = received(&f.server).await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].method.as_str(), "GET");
    let put = &reqs[1];
    assert_eq!(put.method.as_str(), "PUT");
    assert_eq!(put.url.query(), None);
    let body: Value = put.body_json().unwrap();
    assert_eq!(
        body,
        json!({
            "message": "cache wrote config/prod.toml (update)",
            "content": "cG9ydCA9IDkwOTAK",
            "sha": "3b18e512dba79e4c8300dd08aeb37f8e728b8dad",
            "branch": "dev",
        })
    );
}

#[tokio::test]
async fn put_of_a_new_file_sends_no_sha_and_the_default_message_names_the_path() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .respond_with(f.not_found())
        .expect(1)
        .mount(&f.server)
        .await;
    Mock::given(method("PUT"))
        .and(body_partial_json(json!({"content": "aGk="})))
        .respond_with(f.json(201, json!({"content": {"sha": "n"}})))
        .expect(1)
        .mount(&f.server)
        .await;
    f.source().put("o/r/new/file.txt", b"hi").await.unwrap();
    let reqs = received(&f.server).await;
    let body: Value = reqs[1].body_json().unwrap();
    assert!(
        body.get("sha").is_none() && body.get("branch").is_none(),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("new/file.txt"));
}

#[tokio::test]
async fn put_of_identical_content_makes_no_commit() {
    let f = Fake::start().await;
    // `printf 'hello\n' | git hash-object --stdin`
    Mock::given(method("GET"))
        .respond_with(f.file_object("a.txt", "ce013625030ba8dba906f756967f9e9ca394464a"))
        .expect(1)
        .mount(&f.server)
        .await;
    Mock::given(method("PUT"))
        .respond_with(f.json(200, json!({})))
        .expect(0)
        .mount(&f.server)
        .await;
    f.source().put("o/r/a.txt", b"hello\n").await.unwrap();
    assert_eq!(received(&f.server).await.len(), 1);
}

#[tokio::test]
async fn conflicts_carry_githubs_message() {
    for (status, message) in [
        (409, "is at 1e2f but expected 3b18"),
        (422, "Invalid request.\n\n\"sha\" wasn't supplied."),
    ] {
        let f = Fake::start().await;
        Mock::given(method("GET"))
            .respond_with(f.file_object("a.txt", "3b18"))
            .mount(&f.server)
            .await;
        Mock::given(method("PUT"))
            .respond_with(f.error(status, message))
            .mount(&f.server)
            .await;
        let e = f.source().put("o/r/a.txt", b"new").await.unwrap_err();
        assert_eq!(
            e,
            SourceError::Conflict {
                status: Some(status),
                message: message.into()
            }
        );
        assert!(!e.is_transient());
    }
}

#[tokio::test]
async fn put_onto_a_directory_is_rejected_without_a_commit() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .respond_with(f.json(200, json!({"type": "dir", "sha": "d", "entries": []})))
        .mount(&f.server)
        .await;
    let e = f.source().put("o/r/docs", b"x").await.unwrap_err();
    assert!(matches!(&e, SourceError::Rejected { message, .. } if message.contains("directory")));
    assert_eq!(received(&f.server).await.len(), 1);
}

#[tokio::test]
async fn delete_sends_the_sha_and_a_missing_file_is_fine() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/o/r/contents/old.txt"))
        .respond_with(f.file_object("old.txt", "abc123"))
        .mount(&f.server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/repos/o/r/contents/old.txt"))
        .respond_with(f.json(200, json!({"content": null, "commit": {"sha": "c"}})))
        .expect(1)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/o/r/contents/gone.txt"))
        .respond_with(f.not_found())
        .mount(&f.server)
        .await;
    let gh = f.source();
    gh.delete("o/r/old.txt@main").await.unwrap();
    gh.delete("o/r/gone.txt").await.unwrap();
    let reqs = received(&f.server).await;
    assert_eq!(reqs.len(), 3, "no DELETE for the missing file");
    let body: Value = reqs[1].body_json().unwrap();
    assert_eq!(body["sha"], "abc123");
    assert_eq!(body["branch"], "main");
    assert!(body["message"].as_str().unwrap().contains("old.txt"));
}

fn tree(f: &Fake, truncated: bool) -> ResponseTemplate {
    f.json(
        200,
        json!({
            "sha": "t0", "url": "…", "truncated": truncated,
            "tree": [
                {"path": "README.md", "mode": "100644", "type": "blob", "sha": "1", "size": 10},
                {"path": "docs", "mode": "040000", "type": "tree", "sha": "2"},
                {"path": "docs/a.md", "mode": "100644", "type": "blob", "sha": "3", "size": 1},
                {"path": "docs/img/logo@2x.png", "mode": "100644", "type": "blob", "sha": "4", "size": 1},
                {"path": "docsite/x.md", "mode": "100644", "type": "blob", "sha": "5", "size": 1},
                {"path": "vendor/lib", "mode": "160000", "type": "commit", "sha": "6"}
            ]
        }),
    )
}

#[tokio::test]
async fn list_walks_the_tree_of_the_given_ref_under_a_directory() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/o/r/git/trees/release%2F2.0"))
        .and(query_param("recursive", "1"))
        .respond_with(tree(&f, false))
        .expect(1)
        .mount(&f.server)
        .await;
    let keys = f.source().list("o/r/docs@release/2.0").await.unwrap();
    assert_eq!(
        keys,
        [
            "o/r/docs/a.md@release/2.0",
            "o/r/docs/img/logo@2x.png@release/2.0"
        ]
    );
    for k in &keys {
        assert!(k.parse::<GitHubKey>().is_ok());
    }
}

#[tokio::test]
async fn list_without_a_ref_uses_the_default_branch_and_survives_truncation() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/o/r"))
        .respond_with(f.json(200, json!({"full_name": "o/r", "default_branch": "trunk"})))
        .expect(1)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/o/r/git/trees/trunk"))
        .respond_with(tree(&f, true))
        .expect(1)
        .mount(&f.server)
        .await;
    let keys = f.source().list("o/r").await.unwrap();
    assert_eq!(
        keys,
        [
            "o/r/README.md",
            "o/r/docs/a.md",
            "o/r/docs/img/logo@2x.png@",
            "o/r/docsite/x.md"
        ]
    );
    // The '@' in a path gets the bare '@' so the key parses back to the same file.
    let k: GitHubKey = keys[2].parse().unwrap();
    assert_eq!(
        (k.path.as_str(), k.reference),
        ("docs/img/logo@2x.png", None)
    );
}

#[tokio::test]
async fn list_of_a_missing_repo_is_not_found() {
    let f = Fake::start().await;
    Mock::given(any())
        .respond_with(f.not_found())
        .mount(&f.server)
        .await;
    let e = f.source().list("o/nope").await.unwrap_err();
    assert!(matches!(&e, SourceError::NotFound { message } if message.contains("Not Found")));
}

#[tokio::test]
async fn the_token_is_sent_but_never_shown() {
    const TOKEN: &str = "ghp_S3cretT0kenValue1234567890";
    let f = Fake::start().await;
    Mock::given(any())
        .respond_with(f.error(401, "Bad credentials"))
        .mount(&f.server)
        .await;
    let builder = GitHubSource::builder()
        .base_url(f.server.uri())
        .token(TOKEN);
    let builder_dbg = format!("{builder:?} {builder:#?}");
    let gh = builder.build().unwrap();
    let mut shown = format!("{builder_dbg} {gh:?} {gh:#?}");
    let e = gh.fetch("o/r/a.txt", None).await.unwrap_err();
    assert!(matches!(e, SourceError::Unauthorized { .. }));
    shown += &format!("{e} {e:?}");
    shown += &format!("{:?}", gh.put("o/r/a.txt", b"x").await.unwrap_err());
    let refused = GitHubSource::builder()
        .base_url(refused_uri().await)
        .token(TOKEN)
        .build()
        .unwrap();
    let e = refused.fetch("o/r/a.txt", None).await.unwrap_err();
    shown += &format!("{e} {e:?} {refused:?}");
    assert!(
        !shown.contains(TOKEN) && !shown.contains("S3cret"),
        "{shown}"
    );
    assert!(shown.contains("<redacted>"));
    // It was sent, to the configured (non-github.com) host.
    let reqs = received(&f.server).await;
    assert_eq!(
        hdr(&reqs[0], "authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test]
async fn an_enterprise_base_url_with_a_path_prefix_works() {
    let f = Fake::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v3/repos/octo/app/contents/config/prod.toml"))
        .respond_with(f.raw_file(b"ghe", "\"g\""))
        .expect(1)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v3/repos/octo/app"))
        .respond_with(f.json(200, json!({"default_branch": "main"})))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v3/repos/octo/app/git/trees/main"))
        .respond_with(tree(&f, false))
        .mount(&f.server)
        .await;
    let gh = GitHubSource::builder()
        .base_url(format!("{}/api/v3/", f.server.uri()))
        .token("t")
        .clock(Arc::new(f.clock.clone()))
        .build()
        .unwrap();
    assert_eq!(gh.base_url(), format!("{}/api/v3", f.server.uri()));
    assert!(matches!(
        gh.fetch("octo/app/config/prod.toml", None).await.unwrap(),
        Fetched::Value { .. }
    ));
    assert_eq!(gh.list("octo/app/docs").await.unwrap().len(), 2);
    let reqs = received(&f.server).await;
    assert!(reqs
        .iter()
        .all(|r| r.url.path().starts_with("/api/v3/repos/")));
    assert!(reqs
        .iter()
        .all(|r| hdr(r, "authorization") == Some("Bearer t")));
}

#[tokio::test]
async fn a_bad_base_url_is_a_config_error() {
    for url in ["", "api.github.com", "ftp://example.com", "https://h/x?y"] {
        match GitHubSource::builder().base_url(url).anonymous().build() {
            Err(tiercache::Error::Config(m)) => assert!(m.contains("base URL"), "{m}"),
            other => panic!("{url:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn by_default_the_token_comes_from_github_token() {
    // The only test that builds a source reading the environment (the others say
    // `.anonymous()` or `.token(..)`), so setting the variable here races with nothing.
    let f = Fake::start().await;
    Mock::given(any())
        .respond_with(f.raw_file(b"x", "\"x\""))
        .mount(&f.server)
        .await;
    std::env::set_var("GITHUB_TOKEN", "  ghp_fromenv\n");
    let gh = GitHubSource::builder()
        .base_url(f.server.uri())
        .build()
        .unwrap();
    let anon = GitHubSource::builder()
        .base_url(f.server.uri())
        .token("explicit")
        .anonymous()
        .build()
        .unwrap();
    std::env::remove_var("GITHUB_TOKEN");
    assert!(!format!("{gh:?}").contains("fromenv"));
    gh.fetch("o/r/a.txt", None).await.unwrap();
    anon.fetch("o/r/a.txt", None).await.unwrap();
    let reqs = received(&f.server).await;
    assert_eq!(hdr(&reqs[0], "authorization"), Some("Bearer ghp_fromenv"));
    assert_eq!(hdr(&reqs[1], "authorization"), None);
}
