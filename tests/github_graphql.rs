//! `GitHubSource::fetch_many` through GitHub's GraphQL API, against the loopback wiremock fake:
//! request counts, per-key answers, the REST fallback, whole-batch failures and the separate
//! GraphQL budget.

#[path = "support/github_fake.rs"]
mod github_fake;

use github_fake::{at, oid, Fake, FakeRepo, Object, TOKEN};
use serde_json::Value;
use tiercache::source::{Fetched, Source, SourceError};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request};

async fn received(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.expect("recording is on")
}

fn posts(reqs: &[Request]) -> Vec<&Request> {
    reqs.iter()
        .filter(|r| r.method.as_str() == "POST")
        .collect()
}

fn gets(reqs: &[Request]) -> Vec<&Request> {
    reqs.iter().filter(|r| r.method.as_str() == "GET").collect()
}

/// How many keys a GraphQL request carried (its `$e{i}` variables).
fn keys_in(r: &Request) -> usize {
    let body: Value = r.body_json().unwrap();
    body["variables"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with('e'))
        .count()
}

/// `n` text files `octo/app/f/{i}.txt` holding `file {i}`, at the default branch.
fn text_files(n: usize) -> (FakeRepo, Vec<String>) {
    let mut repo = FakeRepo::default();
    let mut keys = Vec::new();
    for i in 0..n {
        repo = repo.with(
            "octo",
            "app",
            &format!("HEAD:f/{i}.txt"),
            Object::text(&format!("file {i}\n")),
        );
        keys.push(format!("octo/app/f/{i}.txt"));
    }
    (repo, keys)
}

async fn mount_graphql(f: &Fake, repo: FakeRepo) {
    Mock::given(method("POST"))
        .and(path("/graphql"))
        .respond_with(f.graphql(repo))
        .mount(&f.server)
        .await;
}

fn refs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

fn value(a: &Result<Fetched, SourceError>) -> (&[u8], Option<&str>) {
    match a {
        Ok(Fetched::Value {
            value, validator, ..
        }) => (&value[..], validator.as_deref()),
        other => panic!("not a value: {other:?}"),
    }
}

#[tokio::test]
async fn a_hundred_cold_keys_travel_in_one_post() {
    let f = Fake::start().await;
    let (repo, keys) = text_files(100);
    mount_graphql(&f, repo).await;
    let gh = f.authed_source();
    assert_eq!(gh.max_batch(), 100);
    let answers = gh.fetch_many(&refs(&keys)).await.unwrap();
    assert_eq!(answers.len(), 100);
    for (i, a) in answers.iter().enumerate() {
        let expected = format!("file {i}\n");
        // No validator: GraphQL gives the blob's oid, not the ETag REST would send.
        assert_eq!(value(a), (expected.as_bytes(), None), "key {i}");
    }
    let reqs = received(&f.server).await;
    assert_eq!(reqs.len(), 1, "one request for 100 keys");
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.url.path()), ("POST", "/graphql"));
    assert_eq!(keys_in(r), 100);
    let auth = r.headers.get("authorization").unwrap().to_str().unwrap();
    assert!(auth.ends_with(TOKEN), "GraphQL is sent with the token");
    let body: Value = r.body_json().unwrap();
    let query = body["query"].as_str().unwrap();
    assert!(
        !query.contains("octo") && !query.contains("HEAD") && !query.contains("f/7.txt"),
        "values travel as variables, never in the query text: {query}"
    );
    assert_eq!(body["variables"]["e7"], "HEAD:f/7.txt", "no ref: HEAD");
    assert_eq!(body["variables"]["o7"], "octo");
    assert_eq!(body["variables"]["n7"], "app");
    let g = gh.graphql_rate_limit().expect("GraphQL's budget was read");
    assert_eq!(g.remaining, 4990);
    assert_eq!(gh.rate_limit(), None, "no REST answer yet: no REST budget");
}

/// Through the cache: `mget` of 100 cold keys is one request; the same `mget` again, none.
#[tokio::test]
async fn a_caches_mget_of_a_hundred_cold_keys_is_one_request() {
    let f = Fake::start().await;
    let (repo, keys) = text_files(100);
    mount_graphql(&f, repo).await;
    let cache = tiercache::TieredCache::builder()
        .source(f.authed_source())
        .clock(f.clock.clone())
        .build()
        .unwrap();
    let results = cache.mget(&keys).await;
    for (i, r) in results.iter().enumerate() {
        let l = r.as_ref().unwrap().as_ref().expect("exists");
        assert_eq!(l.value, format!("file {i}\n"), "key {i}");
    }
    assert_eq!(received(&f.server).await.len(), 1, "one GraphQL request");
    assert!(cache.mget(&keys).await.iter().all(|r| r.is_ok()));
    assert_eq!(received(&f.server).await.len(), 1, "then L1");
}

#[tokio::test]
async fn two_hundred_fifty_keys_in_batches_of_a_hundred_take_three_posts() {
    let f = Fake::start().await;
    let (repo, keys) = text_files(250);
    mount_graphql(&f, repo).await;
    let gh = f.authed_source();
    let answers = gh.fetch_many(&refs(&keys)).await.unwrap();
    assert_eq!(value(&answers[249]).0, b"file 249\n");
    assert!(answers.iter().all(|a| a.is_ok()));
    let reqs = received(&f.server).await;
    let sizes: Vec<usize> = posts(&reqs).into_iter().map(keys_in).collect();
    assert_eq!(sizes, [100, 100, 50]);
    assert_eq!(reqs.len(), 3, "and nothing else");

    // A smaller batch size is honoured and reported.
    let f = Fake::start().await;
    let (repo, keys) = text_files(5);
    mount_graphql(&f, repo).await;
    let gh = f.authed_builder().graphql_batch(2).build().unwrap();
    assert_eq!(gh.max_batch(), 2);
    gh.fetch_many(&refs(&keys)).await.unwrap();
    let sizes: Vec<usize> = posts(&received(&f.server).await)
        .into_iter()
        .map(keys_in)
        .collect();
    assert_eq!(sizes, [2, 2, 1]);
}

#[tokio::test]
async fn binary_and_truncated_files_come_back_byte_exact_through_rest() {
    let f = Fake::start().await;
    let png: Vec<u8> = (0..=255u8).chain([0, 0xff, 0xfe]).collect();
    let big: Vec<u8> = "x".repeat(3000).into_bytes();
    // Latin-1: not binary to git, but its text is not the file's bytes.
    let latin1: Vec<u8> = b"caf\xe9\n".to_vec();
    let repo = FakeRepo::default()
        .with("o", "r", "main:a.txt", Object::text("plain\n"))
        .with(
            "o",
            "r",
            "main:logo.png",
            Object::Blob {
                bytes: png.clone(),
                binary: true,
                truncated: false,
            },
        )
        .with(
            "o",
            "r",
            "main:big.txt",
            Object::Blob {
                bytes: big.clone(),
                binary: false,
                truncated: true,
            },
        )
        .with(
            "o",
            "r",
            "main:latin1.txt",
            Object::Blob {
                bytes: latin1.clone(),
                binary: false,
                truncated: false,
            },
        );
    mount_graphql(&f, repo).await;
    for (file, bytes) in [
        ("logo.png", &png),
        ("big.txt", &big),
        ("latin1.txt", &latin1),
    ] {
        Mock::given(method("GET"))
            .and(path(format!("/repos/o/r/contents/{file}")))
            .respond_with(f.raw_file(bytes, &format!("\"{}\"", oid(bytes))))
            .expect(1)
            .mount(&f.server)
            .await;
    }
    let gh = f.authed_source();
    let keys = [
        "o/r/a.txt@main",
        "o/r/logo.png@main",
        "o/r/big.txt@main",
        "o/r/latin1.txt@main",
    ];
    let answers = gh.fetch_many(&keys).await.unwrap();
    assert_eq!(value(&answers[0]), (&b"plain\n"[..], None));
    let etag = |b: &[u8]| format!("\"{}\"", oid(b));
    assert_eq!(
        value(&answers[1]),
        (&png[..], Some(etag(&png).as_str())),
        "byte-exact, with REST's ETag"
    );
    assert_eq!(value(&answers[2]), (&big[..], Some(etag(&big).as_str())));
    assert_eq!(
        value(&answers[3]),
        (&latin1[..], Some(etag(&latin1).as_str()))
    );
    let reqs = received(&f.server).await;
    assert_eq!(posts(&reqs).len(), 1);
    let fallbacks = gets(&reqs);
    assert_eq!(
        fallbacks.len(),
        3,
        "one REST read per file GraphQL cannot give"
    );
    assert!(fallbacks.iter().all(|r| r.url.query() == Some("ref=main")));
}

#[tokio::test]
async fn not_found_directories_and_invalid_keys_answer_per_key() {
    let f = Fake::start().await;
    let repo = FakeRepo::default()
        .with("o", "r", "HEAD:ok.txt", Object::text("ok"))
        .with("o", "r", "HEAD:conf", Object::Tree);
    mount_graphql(&f, repo).await;
    let gh = f.authed_source();
    let keys = [
        "o/r/ok.txt",
        "o/nope/a.txt", // no such repository: NOT_FOUND error on the alias
        "o/r/gone.txt", // no such path: object null
        "o/r/conf",     // a directory
        "o/r/../x.txt", // invalid: never sent
        "o/r/ok.txt@",  // a bare '@' is the default branch
    ];
    let answers = gh.fetch_many(&keys).await.unwrap();
    assert_eq!(value(&answers[0]).0, b"ok");
    assert_eq!(answers[1], Ok(Fetched::NotFound));
    assert_eq!(answers[2], Ok(Fetched::NotFound));
    match &answers[3] {
        Err(e @ SourceError::Rejected { .. }) => {
            assert!(
                e.to_string()
                    .contains("o/r/conf is a directory, not a file"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(answers[4], Err(SourceError::InvalidKey(_))));
    assert_eq!(value(&answers[5]).0, b"ok");
    let reqs = received(&f.server).await;
    assert_eq!(reqs.len(), 1, "not found and directories need no REST read");
    assert_eq!(keys_in(&reqs[0]), 5, "the invalid key was not sent");
    let body: Value = reqs[0].body_json().unwrap();
    assert_eq!(body["variables"]["e4"], "HEAD:ok.txt");
}

#[tokio::test]
async fn garbage_outages_and_refused_credentials_fail_the_whole_batch() {
    let keys = ["o/r/a.txt", "o/r/b.txt"];
    let f = Fake::start().await;
    let gh = f.authed_source();
    let answer = |t| async {
        f.server.reset().await;
        Mock::given(method("POST"))
            .respond_with(t)
            .mount(&f.server)
            .await;
        gh.fetch_many(&keys).await.unwrap_err()
    };
    let bad_json = f
        .graphql_answer(200, 4990)
        .set_body_raw("{\"data\": {\"f0\": ", "application/json");
    let e = answer(bad_json).await;
    assert!(matches!(e, SourceError::InvalidResponse { .. }), "{e:?}");
    assert!(e.counts_as_failure());

    let e = answer(
        f.graphql_answer(200, 4990)
            .set_body_raw("[1, 2]", "application/json"),
    )
    .await;
    assert!(matches!(e, SourceError::InvalidResponse { .. }), "{e:?}");

    let e = answer(f.html_error(502)).await;
    assert!(
        matches!(
            e,
            SourceError::Unavailable {
                status: Some(502),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("text/html"), "{e}");

    let e = answer(f.error(401, "Bad credentials")).await;
    assert!(
        matches!(
            e,
            SourceError::Unauthorized {
                status: Some(401),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.to_string().contains(TOKEN) && !format!("{e:?}").contains(TOKEN));

    let no_data = f
        .graphql_answer(200, 4990)
        .set_body_json(serde_json::json!({
            "data": null,
            "errors": [{"message": "Something went wrong while executing your query."}]
        }));
    let e = answer(no_data).await;
    assert!(
        matches!(
            e,
            SourceError::Unavailable {
                status: Some(200),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("Something went wrong"), "{e}");

    let dbg = format!("{gh:?}");
    assert!(!dbg.contains(TOKEN) && dbg.contains("<redacted>"), "{dbg}");
}

#[tokio::test]
async fn a_rest_outage_during_the_fallback_is_that_keys_answer() {
    let f = Fake::start().await;
    let repo = FakeRepo::default()
        .with("o", "r", "HEAD:a.txt", Object::text("a"))
        .with(
            "o",
            "r",
            "HEAD:b.bin",
            Object::Blob {
                bytes: vec![0, 1, 2],
                binary: true,
                truncated: false,
            },
        );
    mount_graphql(&f, repo).await;
    Mock::given(method("GET"))
        .respond_with(f.html_error(502))
        .mount(&f.server)
        .await;
    let answers = f
        .authed_source()
        .fetch_many(&["o/r/a.txt", "o/r/b.bin"])
        .await
        .expect("the GraphQL request answered");
    assert!(
        matches!(&answers[0], Ok(Fetched::Value { value, .. }) if value.as_ref() == b"a"),
        "{:?}",
        answers[0]
    );
    let e = answers[1].as_ref().expect_err("REST is down");
    assert!(
        matches!(
            e,
            SourceError::Unavailable {
                status: Some(502),
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn graphqls_rate_limit_holds_graphql_only_and_the_keys_go_by_rest() {
    let f = Fake::start().await;
    Mock::given(method("POST"))
        .and(path("/graphql"))
        .respond_with(f.graphql_rate_limited("RATE_LIMITED", 0))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/o/r/contents/a.txt"))
        .respond_with(f.raw_file(b"a", "\"a\""))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .respond_with(f.not_found())
        .mount(&f.server)
        .await;
    let gh = f.authed_source();
    let answers = gh
        .fetch_many(&["o/r/a.txt", "o/r/b.txt"])
        .await
        .expect("read by REST");
    assert_eq!(
        answers[0].as_ref().ok(),
        Some(&Fetched::value_with_validator("a", "\"a\""))
    );
    assert_eq!(answers[1].as_ref().ok(), Some(&Fetched::NotFound));
    let g = gh.graphql_rate_limit().unwrap();
    assert_eq!((g.remaining, g.reset), (0, at(f.reset())));
    // The cache's breaker opens when `rate_limit()` says 0: GraphQL's budget is not REST's.
    assert_eq!(gh.rate_limit().unwrap().remaining, 4999);
    // GraphQL is held off until the reset: no POST, the key goes by REST.
    let posts = |log: &[Request]| log.iter().filter(|r| r.method.as_str() == "POST").count();
    let before = received(&f.server).await;
    let again = gh.fetch_many(&["o/r/a.txt"]).await.unwrap();
    assert!(again[0].is_ok());
    let after = received(&f.server).await;
    assert_eq!(
        posts(&after),
        posts(&before),
        "no GraphQL request while held"
    );
    assert_eq!(after.len(), before.len() + 1, "one REST request");
}

#[tokio::test]
async fn rate_limit_type_and_a_nonzero_remaining_are_a_rate_limit_too() {
    let f = Fake::start().await;
    Mock::given(method("POST"))
        .respond_with(f.graphql_rate_limited("RATE_LIMIT", 12))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .respond_with(f.not_found())
        .mount(&f.server)
        .await;
    let gh = f.authed_source();
    let answers = gh.fetch_many(&["o/r/a.txt"]).await.unwrap();
    assert_eq!(
        answers[0].as_ref().ok(),
        Some(&Fetched::NotFound),
        "by REST"
    );
    assert_eq!(
        gh.graphql_rate_limit().map(|g| g.reset),
        Some(at(f.reset()))
    );
    // Held off until then, though the headers said 12 were left: no second POST.
    gh.fetch_many(&["o/r/a.txt"]).await.unwrap();
    let log = received(&f.server).await;
    let posts = log.iter().filter(|r| r.method.as_str() == "POST").count();
    assert_eq!(posts, 1);
}

#[tokio::test]
async fn a_secondary_limit_holds_off_rest_and_graphql_alike() {
    let f = Fake::start().await;
    Mock::given(method("POST"))
        .respond_with(f.secondary_limit(403, Some("30")))
        .mount(&f.server)
        .await;
    let gh = f.authed_source();
    let e = gh.fetch_many(&["o/r/a.txt"]).await.unwrap_err();
    let until = e.rate_limited_until().expect("a rate limit");
    assert_eq!(
        until,
        tiercache::Clock::now(&f.clock) + std::time::Duration::from_secs(30)
    );
    let rest = gh.fetch("o/r/a.txt", None).await.unwrap_err();
    assert_eq!(rest.rate_limited_until(), Some(until));
    assert_eq!(received(&f.server).await.len(), 1, "the REST read was held");
}

#[tokio::test]
async fn an_anonymous_source_sends_no_graphql() {
    let f = Fake::start().await;
    for file in ["a.txt", "b.txt"] {
        Mock::given(method("GET"))
            .and(path(format!("/repos/o/r/contents/{file}")))
            .respond_with(f.raw_file(file.as_bytes(), "\"e\""))
            .mount(&f.server)
            .await;
    }
    let gh = f.source();
    assert_eq!(gh.max_batch(), 1, "GitHub's GraphQL needs a token");
    let answers = gh.fetch_many(&["o/r/a.txt", "o/r/b.txt"]).await.unwrap();
    assert_eq!(value(&answers[1]), (&b"b.txt"[..], Some("\"e\"")));
    let reqs = received(&f.server).await;
    assert_eq!(gets(&reqs).len(), 2);
    assert!(posts(&reqs).is_empty(), "no GraphQL");
    assert!(reqs
        .iter()
        .all(|r| r.headers.get("authorization").is_none()));

    // A batch size of 1 turns GraphQL off with a token too.
    let gh = f.authed_builder().graphql_batch(1).build().unwrap();
    assert_eq!(gh.max_batch(), 1);
    gh.fetch_many(&["o/r/a.txt"]).await.unwrap();
    assert!(posts(&received(&f.server).await).is_empty());
}

#[tokio::test]
async fn github_enterprise_asks_api_graphql_and_falls_back_under_api_v3() {
    let f = Fake::start().await;
    let repo = FakeRepo::default()
        .with("o", "r", "HEAD:a.txt", Object::text("a"))
        .with(
            "o",
            "r",
            "HEAD:b.bin",
            Object::Blob {
                bytes: b"\0b".to_vec(),
                binary: true,
                truncated: false,
            },
        );
    Mock::given(method("POST"))
        .and(path("/api/graphql"))
        .respond_with(f.graphql(repo))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v3/repos/o/r/contents/b.bin"))
        .respond_with(f.raw_file(b"\0b", "\"b\""))
        .mount(&f.server)
        .await;
    let gh = f
        .authed_builder()
        .base_url(format!("{}/api/v3", f.server.uri()))
        .build()
        .unwrap();
    let answers = gh.fetch_many(&["o/r/a.txt", "o/r/b.bin"]).await.unwrap();
    assert_eq!(value(&answers[0]).0, b"a");
    assert_eq!(value(&answers[1]), (&b"\0b"[..], Some("\"b\"")));
    let paths: Vec<String> = received(&f.server)
        .await
        .iter()
        .map(|r| r.url.path().to_owned())
        .collect();
    assert_eq!(paths, ["/api/graphql", "/api/v3/repos/o/r/contents/b.bin"]);
}

#[tokio::test]
async fn a_server_without_graphql_is_read_through_rest_from_then_on() {
    let f = Fake::start().await;
    Mock::given(method("POST"))
        .respond_with(f.not_found())
        .expect(1)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .respond_with(f.raw_file(b"x", "\"x\""))
        .mount(&f.server)
        .await;
    let gh = f.authed_source();
    let answers = gh.fetch_many(&["o/r/a.txt", "o/r/b.txt"]).await.unwrap();
    assert!(answers.iter().all(|a| value(a).0 == b"x"));
    assert_eq!(gh.max_batch(), 1, "batching is off from now on");
    gh.fetch_many(&["o/r/c.txt"]).await.unwrap();
    let reqs = received(&f.server).await;
    assert_eq!((posts(&reqs).len(), gets(&reqs).len()), (1, 3));
}

#[tokio::test]
async fn a_403_for_a_spent_graphql_budget_holds_graphql_but_not_rest() {
    let f = Fake::start().await;
    Mock::given(method("POST"))
        .respond_with(f.graphql_answer(403, 0).set_body_json(serde_json::json!({
            "message": "API rate limit exceeded for user ID 1.",
            "documentation_url": "https://docs.github.com/graphql/overview/rate-limits-and-node-limits-for-the-graphql-api"
        })))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .respond_with(f.raw_file(b"a", "\"a\""))
        .mount(&f.server)
        .await;
    let gh = f.authed_source();
    // GraphQL refused: the key is read by REST in the same call.
    let answers = gh.fetch_many(&["o/r/a.txt"]).await.unwrap();
    assert!(answers[0].is_ok(), "{answers:?}");
    assert_eq!(
        gh.graphql_rate_limit().map(|g| (g.remaining, g.reset)),
        Some((0, at(f.reset())))
    );
    assert_eq!(
        gh.rate_limit().map(|r| r.remaining),
        Some(4999),
        "GraphQL's budget is not reported as REST's"
    );
    assert!(
        gh.fetch("o/r/a.txt", None).await.is_ok(),
        "REST is not held"
    );
    gh.fetch_many(&["o/r/a.txt"]).await.unwrap();
    let log = received(&f.server).await;
    let posts = log.iter().filter(|r| r.method.as_str() == "POST").count();
    assert_eq!(posts, 1, "GraphQL is held");
}

#[tokio::test]
async fn a_field_error_other_than_not_found_is_read_through_rest() {
    let f = Fake::start().await;
    Mock::given(method("POST"))
        .respond_with(
            f.graphql_answer(200, 4990)
                .set_body_json(serde_json::json!({
                    "data": {"f0": null, "f1": {"object": null}},
                    "errors": [{
                        "type": "FORBIDDEN",
                        "path": ["f0"],
                        "message": "Resource not accessible by personal access token"
                    }]
                })),
        )
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/o/secret/contents/a.txt"))
        .respond_with(f.raw_file(b"s", "\"s\""))
        .expect(1)
        .mount(&f.server)
        .await;
    let gh = f.authed_source();
    let answers = gh
        .fetch_many(&["o/secret/a.txt", "o/r/gone.txt"])
        .await
        .unwrap();
    assert_eq!(value(&answers[0]), (&b"s"[..], Some("\"s\"")));
    assert_eq!(answers[1], Ok(Fetched::NotFound));
    assert_eq!(received(&f.server).await.len(), 2);
    assert!(gh.fetch_many(&[]).await.unwrap().is_empty());
    assert_eq!(received(&f.server).await.len(), 2, "no keys, no request");
}

/// Issue #15's count for `warm`: a 200-file directory on an empty cache costs one request to
/// resolve the default branch, one recursive tree and two GraphQL posts (100 keys each), and
/// every file is then served offline, byte-exact.
#[tokio::test]
async fn warming_two_hundred_files_takes_a_ref_a_tree_and_two_posts() {
    let f = Fake::start().await;
    let (repo, keys) = text_files(200);
    mount_graphql(&f, repo).await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app"))
        .respond_with(f.json(200, serde_json::json!({"default_branch": "main"})))
        .mount(&f.server)
        .await;
    let mut tree: Vec<Value> = vec![serde_json::json!({"path": "f", "type": "tree", "sha": "d"})];
    for i in 0..200 {
        tree.push(serde_json::json!({
            "path": format!("f/{i}.txt"), "type": "blob", "sha": oid(format!("file {i}\n").as_bytes()), "size": 8
        }));
    }
    tree.push(serde_json::json!({"path": "other/x.txt", "type": "blob", "sha": "x", "size": 1}));
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/git/trees/main"))
        .respond_with(f.json(
            200,
            serde_json::json!({"sha": "t", "truncated": false, "tree": tree}),
        ))
        .mount(&f.server)
        .await;
    let cache = tiercache::TieredCache::builder()
        .source(f.authed_source())
        .clock(f.clock.clone())
        .build()
        .unwrap();
    let summary = cache.warm("octo/app/f", |_| {}).await.unwrap();
    assert_eq!((summary.listed, summary.fetched), (200, 200), "{summary:?}");
    let reqs = received(&f.server).await;
    let paths: Vec<&str> = gets(&reqs).iter().map(|r| r.url.path()).collect();
    assert_eq!(paths, ["/repos/octo/app", "/repos/octo/app/git/trees/main"]);
    let posts = posts(&reqs);
    assert_eq!(posts.len(), 2, "two GraphQL posts");
    assert_eq!(posts.iter().map(|r| keys_in(r)).sum::<usize>(), 200);
    cache.set_offline(true);
    for (i, k) in keys.iter().enumerate() {
        let v = cache.get(k).await.unwrap().expect("warmed");
        assert_eq!(v, format!("file {i}\n"), "{k}");
    }
    assert_eq!(
        received(&f.server).await.len(),
        4,
        "offline: nothing more sent"
    );
}

/// Keys pinned to a commit sha read through GraphQL are immutable too: no request on re-reads,
/// however long after.
#[tokio::test]
async fn pinned_keys_read_through_graphql_are_never_asked_again() {
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
    let f = Fake::start().await;
    let mut repo = FakeRepo::default();
    let mut keys = Vec::new();
    for i in 0..3 {
        repo = repo.with(
            "octo",
            "app",
            &format!("{SHA}:f/{i}.txt"),
            Object::text(&format!("file {i}\n")),
        );
        keys.push(format!("octo/app/f/{i}.txt@{SHA}"));
    }
    mount_graphql(&f, repo).await;
    let cache = tiercache::TieredCache::builder()
        .source(f.authed_source())
        .clock(f.clock.clone())
        .build()
        .unwrap();
    assert!(cache.mget(&keys).await.iter().all(|r| r.is_ok()));
    assert_eq!(received(&f.server).await.len(), 1, "one GraphQL post");
    f.clock
        .advance(std::time::Duration::from_secs(10 * 365 * 24 * 3600));
    cache.clear_memory().await;
    for (i, r) in cache.mget(&keys).await.iter().enumerate() {
        let l = r.as_ref().unwrap().as_ref().expect("cached");
        assert_eq!(l.value, format!("file {i}\n"));
        assert_eq!(l.freshness, tiercache::Freshness::Fresh);
    }
    assert_eq!(received(&f.server).await.len(), 1, "nothing more sent");
}

/// Concurrent `get`s of cold keys through a cache with a batch window: one GraphQL request.
/// (The batch is full at 20 keys, so it leaves at once, however the window falls.)
#[tokio::test]
async fn concurrent_cold_gets_in_a_window_are_one_graphql_request() {
    let f = Fake::start().await;
    let (repo, keys) = text_files(20);
    mount_graphql(&f, repo).await;
    let source = f.authed_builder().graphql_batch(20).build().unwrap();
    let cache = tiercache::TieredCache::builder()
        .source(source)
        .clock(f.clock.clone())
        .get_batch_window(std::time::Duration::from_secs(1))
        .build()
        .unwrap();
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { cache.get(&k).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let v = t.await.unwrap().unwrap().expect("exists");
        assert_eq!(v, format!("file {i}\n"));
    }
    let reqs = received(&f.server).await;
    assert_eq!(reqs.len(), 1, "one request for 20 concurrent gets");
    assert_eq!(keys_in(&reqs[0]), 20);
}
