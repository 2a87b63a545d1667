//! Revalidation pinned to a commit, against a stateful loopback fake of GitHub: "Get a commit"
//! with `application/vnd.github.sha` (the bare sha, its ETag the quoted sha, 304 free of
//! budget), "Compare two commits" (`status`, `files[]` with `filename`, `status`,
//! `previous_filename`), the contents API at `ref=<sha>` and GraphQL `"<sha>:path"`. Requests
//! are counted from the fake's log; the budget from its `x-ratelimit-remaining`.

#[path = "support/github_fake.rs"]
mod github_fake;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use github_fake::{oid, Fake, LIMIT};
use serde_json::{json, Value};
use tiercache::source::{Fetched, Source};
use tiercache::{Freshness, Strategy, TieredCache};
use wiremock::matchers::any;
use wiremock::{Mock, Request, Respond, ResponseTemplate};

const TTL: Duration = Duration::from_secs(60);
const N: usize = 200;

/// How the fake answers compare.
#[derive(Clone, Copy, PartialEq)]
enum CompareMode {
    AsGitHub,
    /// 300 files: at compare's limit.
    TooMany,
    /// A 500.
    Fails,
    /// A force-push: `status: diverged`, the merge-base diff listing nothing.
    Diverged,
}

struct State {
    /// Commits, oldest first: sha → path → bytes.
    commits: Vec<(String, BTreeMap<String, Vec<u8>>)>,
    core_remaining: u64,
    graphql_remaining: u64,
    compare: CompareMode,
}

/// The fake repository `octo/app`, default branch `main`.
#[derive(Clone)]
struct Repo(Arc<Mutex<State>>);

fn sha_of(n: usize) -> String {
    format!("{n:040x}")
}

impl Repo {
    fn new(files: BTreeMap<String, Vec<u8>>) -> Self {
        Repo(Arc::new(Mutex::new(State {
            commits: vec![(sha_of(1), files)],
            core_remaining: LIMIT,
            graphql_remaining: LIMIT,
            compare: CompareMode::AsGitHub,
        })))
    }

    /// A new commit on `main`: `change` applied to the head's files.
    fn push(&self, change: impl FnOnce(&mut BTreeMap<String, Vec<u8>>)) -> String {
        let mut s = self.0.lock().unwrap();
        let mut files = s.commits.last().unwrap().1.clone();
        change(&mut files);
        let sha = sha_of(s.commits.len() + 1);
        s.commits.push((sha.clone(), files));
        sha
    }

    fn core_remaining(&self) -> u64 {
        self.0.lock().unwrap().core_remaining
    }

    fn compare_mode(&self, mode: CompareMode) {
        self.0.lock().unwrap().compare = mode;
    }
}

fn headers(t: ResponseTemplate, remaining: u64, resource: &str) -> ResponseTemplate {
    t.insert_header("x-ratelimit-limit", LIMIT.to_string().as_str())
        .insert_header("x-ratelimit-remaining", remaining.to_string().as_str())
        .insert_header("x-ratelimit-used", (LIMIT - remaining).to_string().as_str())
        .insert_header("x-ratelimit-reset", "4000000000")
        .insert_header("x-ratelimit-resource", resource)
}

fn json_body(t: ResponseTemplate, v: &Value) -> ResponseTemplate {
    t.set_body_raw(
        serde_json::to_vec(v).unwrap(),
        "application/json; charset=utf-8",
    )
}

impl State {
    fn at(&self, r: &str) -> Option<usize> {
        match r {
            "main" | "HEAD" => Some(self.commits.len() - 1),
            sha => self.commits.iter().position(|(s, _)| s == sha),
        }
    }

    /// A REST answer that costs one point of budget (every REST answer but a 304).
    fn core(&mut self, t: ResponseTemplate) -> ResponseTemplate {
        self.core_remaining -= 1;
        headers(t, self.core_remaining, "core")
    }

    fn not_found(&mut self) -> ResponseTemplate {
        let body = json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"});
        self.core(json_body(ResponseTemplate::new(404), &body))
    }
}

impl Respond for Repo {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let path = req.url.path().to_owned();
        let inm = req
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let accept = req
            .headers
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if req.method.as_str() == "POST" && path == "/graphql" {
            let body: Value = req.body_json().unwrap();
            let vars = &body["variables"];
            let mut data = serde_json::Map::new();
            let mut i = 0;
            while let Some(expr) = vars[format!("e{i}")].as_str() {
                let (r, p) = expr.split_once(':').unwrap();
                let object = match s.at(r).and_then(|c| s.commits[c].1.get(p)) {
                    Some(bytes) => json!({
                        "__typename": "Blob", "oid": oid(bytes),
                        "text": String::from_utf8_lossy(bytes), "byteSize": bytes.len(),
                        "isBinary": false, "isTruncated": false,
                    }),
                    None => Value::Null,
                };
                data.insert(format!("f{i}"), json!({ "object": object }));
                i += 1;
            }
            s.graphql_remaining -= 1;
            return json_body(
                headers(ResponseTemplate::new(200), s.graphql_remaining, "graphql"),
                &json!({ "data": data }),
            );
        }
        if path == "/repos/octo/app" {
            let body = json!({"default_branch": "main", "full_name": "octo/app"});
            return s.core(json_body(ResponseTemplate::new(200), &body));
        }
        if let Some(r) = path.strip_prefix("/repos/octo/app/commits/") {
            assert_eq!(accept, "application/vnd.github.sha", "the sha media type");
            let Some(c) = s.at(r) else {
                let body = json!({"message": "No commit found for SHA: x", "status": "422"});
                return s.core(json_body(ResponseTemplate::new(422), &body));
            };
            let sha = s.commits[c].0.clone();
            let etag = format!("\"{sha}\"");
            if inm.as_deref() == Some(etag.as_str()) {
                // Free: a 304 does not count against the rate limit.
                let remaining = s.core_remaining;
                return headers(ResponseTemplate::new(304), remaining, "core")
                    .insert_header("etag", etag.as_str());
            }
            return s.core(
                ResponseTemplate::new(200)
                    .insert_header("etag", etag.as_str())
                    .set_body_raw(
                        sha.into_bytes(),
                        "application/vnd.github.sha; charset=utf-8",
                    ),
            );
        }
        if let Some(range) = path.strip_prefix("/repos/octo/app/compare/") {
            let (b, h) = range.split_once("...").unwrap();
            match s.compare {
                CompareMode::Fails => {
                    return s.core(
                        ResponseTemplate::new(500)
                            .set_body_raw("<html>Unicorn</html>", "text/html"),
                    )
                }
                CompareMode::TooMany => {
                    let files: Vec<Value> = (0..300)
                        .map(|i| json!({"filename": format!("gen/{i}"), "status": "added"}))
                        .collect();
                    let body = json!({"status": "ahead", "ahead_by": 1, "files": files});
                    return s.core(json_body(ResponseTemplate::new(200), &body));
                }
                CompareMode::Diverged => {
                    let body =
                        json!({"status": "diverged", "ahead_by": 1, "behind_by": 1, "files": []});
                    return s.core(json_body(ResponseTemplate::new(200), &body));
                }
                CompareMode::AsGitHub => {}
            }
            let (Some(bi), Some(hi)) = (s.at(b), s.at(h)) else {
                return s.not_found();
            };
            let (old, new) = (&s.commits[bi].1, &s.commits[hi].1);
            let mut files = Vec::new();
            for (p, bytes) in new {
                match old.get(p) {
                    None => files.push(json!({"filename": p, "status": "added"})),
                    Some(o) if o != bytes => {
                        files.push(json!({"filename": p, "status": "modified"}))
                    }
                    _ => {}
                }
            }
            for p in old.keys().filter(|p| !new.contains_key(*p)) {
                // The same bytes added under another name: GitHub reports a rename.
                let renamed = files.iter_mut().find(|f| {
                    f["status"] == "added" && new.get(f["filename"].as_str().unwrap()) == old.get(p)
                });
                match renamed {
                    Some(f) => {
                        f["status"] = json!("renamed");
                        f["previous_filename"] = json!(p);
                    }
                    None => files.push(json!({"filename": p, "status": "removed"})),
                }
            }
            let status = match bi.cmp(&hi) {
                std::cmp::Ordering::Less => "ahead",
                std::cmp::Ordering::Equal => "identical",
                std::cmp::Ordering::Greater => "behind",
            };
            let body = json!({"status": status, "ahead_by": hi.saturating_sub(bi), "behind_by": 0,
                              "total_commits": hi.saturating_sub(bi), "commits": [], "files": files});
            return s.core(json_body(ResponseTemplate::new(200), &body));
        }
        if let Some(p) = path.strip_prefix("/repos/octo/app/contents/") {
            let r = req
                .url
                .query_pairs()
                .find(|(k, _)| k == "ref")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_else(|| "main".into());
            let Some(bytes) = s.at(&r).and_then(|c| s.commits[c].1.get(p)).cloned() else {
                return s.not_found();
            };
            let etag = format!("\"{}\"", oid(&bytes));
            if inm.as_deref() == Some(etag.as_str()) {
                let remaining = s.core_remaining;
                return headers(ResponseTemplate::new(304), remaining, "core")
                    .insert_header("etag", etag.as_str());
            }
            return s.core(
                ResponseTemplate::new(200)
                    .insert_header("etag", etag.as_str())
                    .set_body_raw(bytes, "application/vnd.github.raw"),
            );
        }
        if let Some(r) = path.strip_prefix("/repos/octo/app/git/trees/") {
            let Some(c) = s.at(r) else {
                return s.not_found();
            };
            let tree: Vec<Value> = s.commits[c]
                .1
                .keys()
                .map(|p| json!({"path": p, "type": "blob", "mode": "100644"}))
                .collect();
            let body = json!({"sha": "t", "tree": tree, "truncated": false});
            return s.core(json_body(ResponseTemplate::new(200), &body));
        }
        s.not_found()
    }
}

fn files(n: usize) -> BTreeMap<String, Vec<u8>> {
    (0..n)
        .map(|i| (format!("conf/{i}.txt"), format!("file {i}\n").into_bytes()))
        .collect()
}

fn key(i: usize) -> String {
    format!("octo/app/conf/{i}.txt")
}

struct Env {
    f: Fake,
    repo: Repo,
    cache: TieredCache,
}

async fn env(n: usize) -> Env {
    let f = Fake::start().await;
    let repo = Repo::new(files(n));
    Mock::given(any())
        .respond_with(repo.clone())
        .mount(&f.server)
        .await;
    let source = f
        .authed_builder()
        .revalidate_by_commit(true)
        .build()
        .unwrap();
    let cache = TieredCache::builder()
        .source(source)
        .clock(f.clock.clone())
        .ttl(TTL)
        .stale_ttl(Duration::from_secs(3600))
        .build()
        .unwrap();
    Env { f, repo, cache }
}

impl Env {
    async fn requests(&self) -> Vec<Request> {
        self.f.server.received_requests().await.unwrap()
    }

    async fn count(&self) -> usize {
        self.requests().await.len()
    }

    /// Requests after the first `from`, as `METHOD path`.
    async fn since(&self, from: usize) -> Vec<String> {
        self.requests().await[from..]
            .iter()
            .map(|r| format!("{} {}", r.method, r.url.path()))
            .collect()
    }

    async fn value(&self, i: usize) -> Option<String> {
        self.cache
            .get(&key(i))
            .await
            .unwrap()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    }
}

/// Warm on an empty cache: the ref resolved once, the tree listed at that commit, two GraphQL
/// requests reading the files at it; the values carry the commit they were read at.
async fn warmed(n: usize) -> Env {
    let e = env(n).await;
    let summary = e.cache.warm("octo/app/conf", |_| {}).await.unwrap();
    assert_eq!(summary.fetched, n, "{summary:?}");
    let sent = e.since(0).await;
    let graphql = sent.iter().filter(|r| *r == "POST /graphql").count();
    assert_eq!(graphql, n.div_ceil(100), "{sent:?}");
    assert!(
        sent.contains(&"GET /repos/octo/app/commits/HEAD".to_owned()),
        "the ref is resolved once: {sent:?}"
    );
    // Issue #15's count: at most 1 tree + the GraphQL requests + 1 to resolve the ref (the
    // commit, which also stands for the default branch's look-up: the tree is listed at it).
    assert_eq!(
        sent,
        [
            vec![
                "GET /repos/octo/app/commits/HEAD".to_owned(),
                format!("GET /repos/octo/app/git/trees/{}", sha_of(1)),
            ],
            vec!["POST /graphql".to_owned(); graphql],
        ]
        .concat(),
        "commit + tree at it + GraphQL"
    );
    let l = e.cache.lookup(&key(0)).await.unwrap().unwrap();
    assert_eq!(
        l.validator.as_deref(),
        Some(format!("@commit={}", sha_of(1)).as_str()),
        "read at the resolved commit"
    );
    e
}

#[tokio::test]
async fn refresh_of_200_unchanged_files_is_one_free_request() {
    let e = warmed(N).await;
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let before = (e.count().await, e.repo.core_remaining());
    let summary = e.cache.refresh("octo/app/conf", |_| {}).await.unwrap();
    assert_eq!(summary.listed, N, "the keys come from L2, no listing");
    assert_eq!(summary.not_modified, N, "{summary:?}");
    let sent = e.since(before.0).await;
    assert_eq!(sent, ["GET /repos/octo/app/commits/HEAD"], "one request");
    assert_eq!(
        e.repo.core_remaining(),
        before.1,
        "0 REST budget: a 304 is free"
    );
    let r = &e.requests().await[before.0];
    assert_eq!(
        r.headers.get("if-none-match").unwrap().to_str().unwrap(),
        format!("\"{}\"", sha_of(1))
    );
    // Renewed: fresh again, served without the source.
    let l = e.cache.lookup(&key(7)).await.unwrap().unwrap();
    assert_eq!(l.freshness, Freshness::Fresh);
    assert_eq!(l.value, "file 7\n");
    assert_eq!(e.count().await, before.0 + 1);
}

#[tokio::test]
async fn after_three_files_change_one_commit_request_one_compare_one_batched_fetch() {
    let e = warmed(N).await;
    let head = e.repo.push(|f| {
        for i in [3, 50, 199] {
            f.insert(format!("conf/{i}.txt"), format!("new {i}\n").into_bytes());
        }
    });
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let from = e.count().await;
    let summary = e.cache.refresh("octo/app/conf", |_| {}).await.unwrap();
    assert_eq!(
        (summary.fetched, summary.not_modified),
        (3, N - 3),
        "{summary:?}"
    );
    let sent = e.since(from).await;
    assert_eq!(
        sent,
        [
            "GET /repos/octo/app/commits/HEAD".to_owned(),
            format!("GET /repos/octo/app/compare/{}...{head}", sha_of(1)),
            "POST /graphql".to_owned(),
        ]
    );
    let gql: Value = e.requests().await[from + 2].body_json().unwrap();
    let mut read: Vec<&str> = (0..3)
        .map(|i| gql["variables"][format!("e{i}")].as_str().unwrap())
        .collect();
    read.sort();
    let expected: Vec<String> = ["199", "3", "50"]
        .iter()
        .map(|i| format!("{head}:conf/{i}.txt"))
        .collect();
    assert_eq!(
        read, expected,
        "only the changed files, read at the new sha"
    );
    assert_eq!(e.value(3).await.as_deref(), Some("new 3\n"));
    assert_eq!(e.value(199).await.as_deref(), Some("new 199\n"));
    assert_eq!(e.value(4).await.as_deref(), Some("file 4\n"));
    let l = e.cache.lookup(&key(4)).await.unwrap().unwrap();
    assert_eq!(l.freshness, Freshness::Fresh, "renewed");
    let l = e.cache.lookup(&key(3)).await.unwrap().unwrap();
    assert_eq!(l.validator, Some(format!("@commit={head}")));
    assert_eq!(e.count().await, from + 3, "all served from the cache");

    // Next time, nothing changed: one free request again (the renewed entries still name the
    // old commit, but the source remembers the move it verified).
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let (from, budget) = (e.count().await, e.repo.core_remaining());
    let summary = e.cache.refresh("octo/app/conf", |_| {}).await.unwrap();
    assert_eq!(summary.not_modified, N, "{summary:?}");
    assert_eq!(e.since(from).await, ["GET /repos/octo/app/commits/HEAD"]);
    assert_eq!(e.repo.core_remaining(), budget);
}

#[tokio::test]
async fn a_file_removed_upstream_reads_as_not_found() {
    let e = warmed(10).await;
    e.repo.push(|f| {
        f.remove("conf/2.txt");
    });
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let summary = e.cache.refresh("octo/app/conf", |_| {}).await.unwrap();
    assert_eq!(summary.not_modified, 9, "{summary:?}");
    let from = e.count().await;
    assert_eq!(e.value(2).await, None, "removed: not found");
    assert_eq!(e.value(1).await.as_deref(), Some("file 1\n"));
    assert_eq!(e.count().await, from, "served from the cache");
}

#[tokio::test]
async fn a_compare_past_its_limit_or_failing_falls_back_to_per_file_requests() {
    for mode in [
        CompareMode::TooMany,
        CompareMode::Fails,
        CompareMode::Diverged,
    ] {
        let e = warmed(5).await;
        let head = e.repo.push(|f| {
            f.insert("conf/1.txt".into(), b"changed\n".to_vec());
        });
        e.repo.compare_mode(mode);
        e.f.clock.advance(TTL + Duration::from_secs(1));
        let from = e.count().await;
        let summary = e.cache.refresh("octo/app/conf", |_| {}).await.unwrap();
        assert!(summary.failed.is_empty(), "{summary:?}");
        assert_eq!(summary.fetched, 5, "every file read again at the new sha");
        let sent = e.since(from).await;
        assert_eq!(
            sent.len(),
            2 + 5,
            "commit + compare + one per file: {sent:?}"
        );
        let per_file = &e.requests().await[from + 2];
        assert_eq!(per_file.url.query(), Some(format!("ref={head}").as_str()));
        assert_eq!(e.value(1).await.as_deref(), Some("changed\n"));
        assert_eq!(e.value(2).await.as_deref(), Some("file 2\n"));
        let l = e.cache.lookup(&key(2)).await.unwrap().unwrap();
        let v = l.validator.unwrap();
        assert!(v.ends_with(&format!("@commit={head}")), "{v}");
    }
}

#[tokio::test]
async fn an_entry_without_a_commit_is_revalidated_by_its_own_conditional_request() {
    let e = env(3).await;
    // A single get reads through REST, with the ETag and no commit.
    assert_eq!(e.value(0).await.as_deref(), Some("file 0\n"));
    let l = e.cache.lookup(&key(0)).await.unwrap().unwrap();
    let etag = format!("\"{}\"", oid(b"file 0\n"));
    assert_eq!(l.validator.as_deref(), Some(etag.as_str()));
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let (from, budget) = (e.count().await, e.repo.core_remaining());
    let summary = e.cache.refresh("octo/app/conf", |_| {}).await.unwrap();
    assert_eq!(summary.not_modified, 1, "{summary:?}");
    assert_eq!(
        e.since(from).await,
        ["GET /repos/octo/app/contents/conf/0.txt"]
    );
    let r = &e.requests().await[from];
    assert_eq!(
        r.headers.get("if-none-match").unwrap().to_str().unwrap(),
        etag
    );
    assert_eq!(e.repo.core_remaining(), budget, "a 304: free");
}

#[tokio::test]
async fn mget_of_expired_keys_revalidates_them_with_one_request() {
    let e = warmed(20).await;
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let from = e.count().await;
    let keys: Vec<String> = (0..20).map(key).collect();
    let got = e.cache.mget(&keys).await;
    assert!(got.iter().all(|r| r.as_ref().unwrap().is_some()));
    assert_eq!(e.since(from).await, ["GET /repos/octo/app/commits/HEAD"]);
}

#[tokio::test]
async fn a_single_get_of_a_value_read_through_graphql_takes_the_commit_route() {
    let e = warmed(3).await;
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let (from, budget) = (e.count().await, e.repo.core_remaining());
    assert_eq!(e.value(1).await.as_deref(), Some("file 1\n"));
    assert_eq!(e.since(from).await, ["GET /repos/octo/app/commits/HEAD"]);
    assert_eq!(e.repo.core_remaining(), budget);
}

#[tokio::test]
async fn a_key_pinned_to_a_commit_is_never_sent() {
    let f = Fake::start().await;
    let gh = f
        .authed_builder()
        .revalidate_by_commit(true)
        .build()
        .unwrap();
    let pinned = format!("octo/app/a.txt@{}", sha_of(9));
    let v = format!("\"e\" @commit={}", sha_of(9));
    let answers = gh
        .revalidate_many(&[(pinned.as_str(), v.as_str())])
        .await
        .unwrap();
    assert!(matches!(
        answers[0],
        Ok(Fetched::NotModified { ttl: Some(_) })
    ));
    assert!(f.server.received_requests().await.unwrap().is_empty());
}

/// I1: a write acknowledged while a refresh is on its way is not overwritten by it.
#[tokio::test]
async fn a_write_is_never_overwritten_by_a_refresh() {
    let f = Fake::start().await;
    let repo = Repo::new(files(3));
    Mock::given(any())
        .respond_with(repo.clone())
        .mount(&f.server)
        .await;
    let source = f
        .authed_builder()
        .revalidate_by_commit(true)
        .build()
        .unwrap();
    let cache = TieredCache::builder()
        .source(source)
        .strategy(Strategy::ReadThrough)
        .clock(f.clock.clone())
        .ttl(TTL)
        .build()
        .unwrap();
    cache.warm("octo/app/conf", |_| {}).await.unwrap();
    repo.push(|f| {
        f.insert("conf/0.txt".into(), b"upstream\n".to_vec());
    });
    f.clock.advance(TTL + Duration::from_secs(1));
    cache.set(&key(0), "local write").await.unwrap();
    f.clock.advance(Duration::from_secs(1));
    cache.refresh("octo/app/conf", |_| {}).await.unwrap();
    let got = cache.get(&key(0)).await.unwrap().unwrap();
    assert_eq!(got, "local write", "the acknowledged write stands");
}

#[tokio::test]
async fn warm_again_after_expiry_lists_then_revalidates_with_one_commit_request() {
    let e = warmed(N).await;
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let from = e.count().await;
    let seen = e.cache.rate_limit().expect("a budget was read").remaining;
    let summary = e.cache.warm("octo/app/conf", |_| {}).await.unwrap();
    assert_eq!(summary.not_modified, N, "{summary:?}");
    assert_eq!(
        e.since(from).await,
        [
            "GET /repos/octo/app/commits/HEAD".to_owned(),
            format!("GET /repos/octo/app/git/trees/{}", sha_of(1)),
            "GET /repos/octo/app/commits/HEAD".to_owned(),
        ]
    );
    // Both commit checks were answered 304 (free): only the tree spent budget.
    assert_eq!(e.cache.rate_limit().unwrap().remaining, seen - 1);
}

/// Holds the first "Get a commit" request until the test lets it go.
struct Gated {
    repo: Repo,
    arrived: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl Respond for Gated {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if req.url.path().starts_with("/repos/octo/app/commits/") {
            if let Some(arrived) = self.arrived.lock().unwrap().take() {
                arrived.send(()).unwrap();
                if let Some(release) = self.release.lock().unwrap().take() {
                    release.recv().unwrap();
                }
            }
        }
        self.repo.respond(req)
    }
}

/// I1 with the revalidation in flight: a write acknowledged after the batch took its fence
/// tokens, before GitHub answered, is not overwritten by the changed file the batch reads.
#[tokio::test]
async fn a_write_acknowledged_while_a_revalidation_is_in_flight_stands() {
    let e = warmed(3).await;
    e.repo.push(|f| {
        f.insert("conf/0.txt".into(), b"upstream\n".to_vec());
    });
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let (arrived_tx, arrived_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    e.f.server.reset().await;
    Mock::given(any())
        .respond_with(Gated {
            repo: e.repo.clone(),
            arrived: Mutex::new(Some(arrived_tx)),
            release: Mutex::new(Some(release_rx)),
        })
        .mount(&e.f.server)
        .await;
    let cache = e.cache.clone();
    let refresh =
        tokio::spawn(async move { cache.refresh("octo/app/conf", |_| {}).await.unwrap() });
    tokio::task::spawn_blocking(move || arrived_rx.recv().unwrap())
        .await
        .unwrap();
    e.cache.set(&key(0), "local write").await.unwrap();
    release_tx.send(()).unwrap();
    let summary = refresh.await.unwrap();
    assert_eq!(summary.not_modified, 2, "{summary:?}");
    let sent = e.since(0).await;
    assert_eq!(sent.len(), 3, "commit + compare + GraphQL: {sent:?}");
    assert_eq!(e.value(0).await.as_deref(), Some("local write"), "I1");
    assert_eq!(e.value(1).await.as_deref(), Some("file 1\n"));
}

#[tokio::test]
async fn a_file_renamed_upstream_reads_as_not_found_under_its_old_name() {
    let e = warmed(4).await;
    e.repo.push(|f| {
        let bytes = f.remove("conf/2.txt").unwrap();
        f.insert("conf/moved.txt".into(), bytes);
    });
    e.f.clock.advance(TTL + Duration::from_secs(1));
    let from = e.count().await;
    let summary = e.cache.refresh("octo/app/conf", |_| {}).await.unwrap();
    assert_eq!(summary.not_modified, 3, "{summary:?}");
    let compare = &e.requests().await[from + 1];
    assert!(compare.url.path().contains("/compare/"));
    assert_eq!(e.value(2).await, None, "the old name is gone");
    assert_eq!(e.value(3).await.as_deref(), Some("file 3\n"));
}
