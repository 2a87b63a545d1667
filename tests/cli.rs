//! End-to-end tests of the `tiercache` binary against a wiremock fake of GitHub on loopback.
//!
//! # How the binary gets built
//! `Cargo.toml` has a dev-dependency on this crate itself with the `cli` feature. Dev-dependencies
//! take part in feature resolution whenever tests, examples or benches are built, so a plain
//! `cargo test` builds the library once, with `cli`, in the same dependency graph as every other
//! test; the binary's `required-features = ["cli"]` is then met, cargo builds it along with the
//! tests and hands its path over in `CARGO_BIN_EXE_tiercache`. The cost in CI is compiling clap,
//! indicatif, toml and dirs (a few seconds) and linking one more executable.
//!
//! The alternative — running `cargo build --features cli --bin tiercache` from the test — needs
//! a second dependency graph (without the dev-dependencies, tokio, hyper and octocrab resolve to
//! other features and are all compiled again: about a minute on two cores) and a nested cargo
//! that can deadlock on the build lock in some setups. It is kept only as a fallback, used when
//! `CARGO_BIN_EXE_tiercache` is missing (the dev-dependency was removed).
//!
//! Every run gets `--db` in a temporary folder, `--api-url` of the fake and a fake
//! `GITHUB_TOKEN`, and every run checks that the token appears in neither stdout nor stderr.

#[path = "support/cli.rs"]
mod cli_support;
#[path = "support/github_fake.rs"]
mod github_fake;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cli_support::{binary, run_binary, Run, TOKEN};
use github_fake::Fake;
use serde_json::Value;
use tempfile::TempDir;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, Request};

const KEY: &str = "octo/app/config/prod.toml";
const CONTENTS: &str = "/repos/octo/app/contents/config/prod.toml";

/// A fake GitHub and a temporary folder for the database.
struct Env {
    fake: Fake,
    dir: TempDir,
}

impl Env {
    async fn new() -> Self {
        Env {
            fake: Fake::start().await,
            dir: TempDir::new().unwrap(),
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("cache.db")
    }

    /// Runs `tiercache --db … --api-url … ARGS`.
    async fn run(&self, args: &[&str]) -> Run {
        let db = self.db();
        let mut all = vec![
            "--db",
            db.to_str().unwrap(),
            "--api-url",
            &self.fake.server.uri(),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        self.run_raw(&all, &[], None).await
    }

    /// Writes `content` to a file and runs `--strategy STRATEGY put KEY FILE`.
    async fn put(&self, strategy: &str, content: &str) -> Run {
        let file = self.dir.path().join("prod.toml");
        std::fs::write(&file, content).unwrap();
        self.run(&["--strategy", strategy, "put", KEY, file.to_str().unwrap()])
            .await
    }

    /// Runs the binary with exactly `args`, extra environment and optional stdin.
    async fn run_raw(&self, args: &[String], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Run {
        run_binary(self.dir.path(), args, env, stdin).await
    }

    async fn requests(&self) -> Vec<Request> {
        self.fake.server.received_requests().await.unwrap()
    }

    /// `GET CONTENTS` answers `body` with ETag `etag`.
    async fn serve(&self, contents: &str, body: &[u8], etag: &str) {
        Mock::given(method("GET"))
            .and(path(contents))
            .respond_with(self.fake.raw_file(body, etag))
            .mount(&self.fake.server)
            .await;
    }

    /// Forgets every mock and every recorded request.
    async fn reset(&self) {
        self.fake.server.reset().await;
    }

    /// Every request answers 503 with GitHub's HTML error page.
    async fn outage(&self) {
        self.reset().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(self.fake.html_error(503))
            .mount(&self.fake.server)
            .await;
    }
}

fn hdr<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn get_prints_the_bytes_and_the_second_get_is_served_from_the_database() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    let first = env.run(&["get", KEY]).await;
    first.expect(0);
    assert_eq!(first.stdout, b"port = 8080\n");
    let second = env.run(&["get", KEY]).await;
    second.expect(0);
    assert_eq!(second.stdout, b"port = 8080\n");
    let reqs = env.requests().await;
    assert_eq!(reqs.len(), 1, "the second process read the database");
    let auth = hdr(&reqs[0], "authorization").expect("the token is sent");
    assert!(auth.ends_with(TOKEN), "{auth}");
}

#[tokio::test]
async fn get_json_has_every_field() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    let bin = "/repos/octo/app/contents/logo.png";
    env.serve(bin, &[0x89, b'P', b'N', b'G', 0xff, 0x00], "\"b1\"")
        .await;
    let v = env.run(&["get", KEY, "--json"]).await.expect(0).json();
    assert_eq!(v["key"], KEY);
    assert_eq!(v["tier"], "l3");
    assert_eq!(v["freshness"], "fresh");
    assert_eq!(v["stale_reason"], Value::Null);
    assert!(v["age_ms"].as_u64().is_some());
    assert_eq!(v["etag"], "\"v1\"");
    assert_eq!(v["size"], 12);
    assert_eq!(v["content"], "port = 8080\n");
    let again = env.run(&["get", KEY, "--json"]).await.expect(0).json();
    assert_eq!(again["tier"], "l2");
    assert_eq!(again["freshness"], "fresh");

    let b = env
        .run(&["get", "octo/app/logo.png", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(b["content_base64"], "iVBOR/8A");
    assert!(b.get("content").is_none());
    assert_eq!(b["size"], 6);
}

#[tokio::test]
async fn ttl_zero_sends_a_conditional_request_and_a_304_renews_the_copy() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    env.run(&["get", KEY]).await.expect(0);
    env.reset().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .and(header("if-none-match", "\"v1\""))
        .respond_with(env.fake.not_modified("\"v1\""))
        .expect(1)
        .mount(&env.fake.server)
        .await;
    let run = env.run(&["--ttl", "0s", "get", KEY, "--json"]).await;
    let v = run.expect(0).json();
    assert_eq!(v["content"], "port = 8080\n");
    assert_eq!(v["freshness"], "fresh");
    assert!(v["age_ms"].as_u64().unwrap() < 5_000, "renewed: {v}");
    let reqs = env.requests().await;
    assert_eq!(reqs.len(), 1);
    assert_eq!(hdr(&reqs[0], "if-none-match"), Some("\"v1\""));
}

#[tokio::test]
async fn tiercache_log_prints_the_crates_own_events_and_never_the_token() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    let args: Vec<String> = [
        "--db",
        env.db().to_str().unwrap(),
        "--api-url",
        &env.fake.server.uri(),
        "get",
        KEY,
    ]
    .map(str::to_owned)
    .to_vec();
    // `run_raw` fails the test if the token shows up anywhere in the output.
    let run = env
        .run_raw(&args, &[("TIERCACHE_LOG", "trace")], None)
        .await;
    run.expect(0);
    assert!(
        run.stderr.contains("tiercache::source::github") && run.stderr.contains("GitHub request"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("hyper") && !run.stderr.contains("octocrab"),
        "only tiercache's own events: {}",
        run.stderr
    );
    let bad = env.run_raw(&args, &[("TIERCACHE_LOG", "loud")], None).await;
    bad.expect(64);
    assert!(bad.stderr.contains("TIERCACHE_LOG"), "{}", bad.stderr);
}

#[tokio::test]
async fn an_outage_with_a_cached_copy_serves_it_stale_and_exits_0() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    env.run(&["get", KEY]).await.expect(0);
    env.outage().await;
    let run = env.run(&["--ttl", "0s", "get", KEY, "--json"]).await;
    run.expect(0);
    assert!(run.stderr.contains("stale"), "{}", run.stderr);
    assert!(run.stderr.contains("source_error"), "{}", run.stderr);
    let v = run.json();
    assert_eq!(v["freshness"], "stale");
    assert_eq!(v["stale_reason"], "source_error");
    assert_eq!(v["tier"], "l2");
    assert_eq!(v["content"], "port = 8080\n");
    assert_eq!(env.requests().await.len(), 1, "GitHub was asked");

    // Plain output: the bytes, and the warning on stderr.
    let plain = env.run(&["--ttl", "0s", "get", KEY]).await;
    plain.expect(0);
    assert_eq!(plain.stdout, b"port = 8080\n");
    assert!(plain.stderr.contains("stale"), "{}", plain.stderr);
}

#[tokio::test]
async fn an_outage_without_a_copy_exits_1_naming_the_cause() {
    let env = Env::new().await;
    env.outage().await;
    let run = env.run(&["get", KEY]).await;
    run.expect(1);
    assert!(run.stdout.is_empty());
    assert!(run.stderr.contains("unavailable"), "{}", run.stderr);
    assert!(run.stderr.contains("503"), "{}", run.stderr);
}

#[tokio::test]
async fn not_found_exits_2() {
    let env = Env::new().await;
    Mock::given(method("GET"))
        .respond_with(env.fake.not_found())
        .mount(&env.fake.server)
        .await;
    let run = env.run(&["get", KEY]).await;
    run.expect(2);
    assert!(run.stderr.contains("not found"), "{}", run.stderr);
    let json = env.run(&["get", "octo/app/missing.txt", "--json"]).await;
    json.expect(2);
    assert_eq!(json.json()["not_found"], true);
}

#[tokio::test]
async fn usage_errors_exit_64() {
    let env = Env::new().await;
    let bad_key = env.run(&["get", "not a key"]).await;
    bad_key.expect(64);
    assert!(bad_key.stderr.contains("invalid key"), "{}", bad_key.stderr);
    let bad_ttl = env.run(&["--ttl", "5 minutes", "get", KEY]).await;
    bad_ttl.expect(64);
    assert!(bad_ttl.stderr.contains("duration"), "{}", bad_ttl.stderr);
    env.run(&["--timeout", "10x", "stats"]).await.expect(64);
    env.run(&["--frobnicate", "get", KEY]).await.expect(64);
    env.run(&["--strategy", "write-sideways", "stats"])
        .await
        .expect(64);
    env.run(&["get"]).await.expect(64);
    env.run(&["teleport"]).await.expect(64);
    env.run(&["warm", "octo"]).await.expect(64);
    env.run(&["--offline", "warm", "octo/app"]).await.expect(64);
    env.run(&["--offline", "--strategy", "write-through", "put", KEY, "-"])
        .await
        .expect(64);
    env.run(&["--offline", "--online", "stats"])
        .await
        .expect(64);
    env.run(&["--offline", "flush"]).await.expect(64);
    assert!(env.requests().await.is_empty(), "nothing was sent");

    let help = env.run(&["--help"]).await;
    help.expect(0);
    assert!(help.out().contains("TIERCACHE_CONFIG"), "{}", help.out());
    assert!(help.out().contains("stale_ttl"), "the config file keys");
    for cmd in [
        "get",
        "mget",
        "put",
        "warm",
        "stats",
        "health",
        "dead-letters",
    ] {
        let help = env.run(&[cmd, "--help"]).await;
        assert!(
            help.expect(0).out().contains("Examples:\n  tiercache"),
            "{cmd}: {}",
            help.out()
        );
    }
    let version = env.run(&["--version"]).await;
    version.expect(0);
    assert!(version.out().starts_with("tiercache "));
}

#[tokio::test]
async fn mget_json_keeps_the_input_order_with_per_key_errors() {
    let env = Env::new().await;
    env.serve("/repos/octo/app/contents/a.txt", b"A", "\"a\"")
        .await;
    env.serve("/repos/octo/app/contents/b.txt", b"B", "\"b\"")
        .await;
    Mock::given(path("/repos/octo/app/contents/down.txt"))
        .respond_with(env.fake.html_error(502))
        .mount(&env.fake.server)
        .await;
    Mock::given(path("/repos/octo/app/contents/gone.txt"))
        .respond_with(env.fake.not_found())
        .mount(&env.fake.server)
        .await;
    let keys = [
        "octo/app/b.txt",
        "octo/app/gone.txt",
        "octo/app/a.txt",
        "octo/app/down.txt",
        "octo/app/b.txt",
    ];
    let mut args = vec!["mget", "--json"];
    args.extend(keys);
    let run = env.run(&args).await;
    run.expect(1);
    let lines = run.json_lines();
    assert_eq!(lines.len(), keys.len(), "{}", run.out());
    for (line, key) in lines.iter().zip(keys) {
        assert_eq!(line["key"], key);
    }
    assert_eq!(lines[0]["content"], "B");
    assert_eq!(lines[0]["tier"], "l3");
    assert_eq!(lines[1]["not_found"], true);
    assert!(lines[1]["error"].is_string());
    assert_eq!(lines[2]["content"], "A");
    assert!(lines[3]["error"].as_str().unwrap().contains("502"));
    assert!(lines[3].get("not_found").is_none());
    assert_eq!(lines[4]["content"], "B");

    // All served (from the database now): exit 0; a bad key among them: exit 64.
    let ok = env
        .run(&["mget", "--json", "octo/app/a.txt", "octo/app/b.txt"])
        .await;
    let lines = ok.expect(0).json_lines();
    assert_eq!(lines[0]["tier"], "l2");
    env.run(&["mget", "octo/app/a.txt", "no good"])
        .await
        .expect(64);
    let plain = env.run(&["mget", "octo/app/a.txt", "octo/app/b.txt"]).await;
    assert_eq!(
        plain.expect(0).out(),
        "==> octo/app/a.txt <==\nA\n==> octo/app/b.txt <==\nB"
    );
}

/// GitHub's answers to a write of a new file: the contents look-up says 404, the PUT creates.
async fn accept_writes(env: &Env, contents: &str) {
    Mock::given(method("GET"))
        .and(path(contents))
        .respond_with(env.fake.not_found())
        .mount(&env.fake.server)
        .await;
    Mock::given(method("PUT"))
        .and(path(contents))
        .respond_with(env.fake.json(
            201,
            serde_json::json!({"content": {"sha": "abc"}, "commit": {"sha": "def"}}),
        ))
        .mount(&env.fake.server)
        .await;
}

/// GitHub refuses a write of `CONTENTS` for good: the look-up says 404, the PUT a 422.
async fn refuse_writes(env: &Env) {
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(env.fake.not_found())
        .mount(&env.fake.server)
        .await;
    Mock::given(method("PUT"))
        .and(path(CONTENTS))
        .respond_with(env.fake.error(422, "Invalid request: content is not valid"))
        .mount(&env.fake.server)
        .await;
}

/// The JSON bodies of the requests made with `method`.
fn bodies(reqs: &[Request], method: &str) -> Vec<Value> {
    reqs.iter()
        .filter(|r| r.method.as_str() == method)
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

fn puts(reqs: &[Request]) -> Vec<Value> {
    bodies(reqs, "PUT")
}

#[tokio::test]
async fn put_under_write_through_sends_a_put_before_returning() {
    let env = Env::new().await;
    accept_writes(&env, CONTENTS).await;
    let run = env.put("write-through", "port = 9090\n").await;
    run.expect(0);
    let sent = puts(&env.requests().await);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["content"], "cG9ydCA9IDkwOTAK");
    // The cache holds it: a read needs no request.
    env.reset().await;
    let v = env.run(&["get", KEY, "--json"]).await.expect(0).json();
    assert_eq!(v["content"], "port = 9090\n");
    assert_eq!(v["tier"], "l2");
    assert!(env.requests().await.is_empty());

    // GitHub refuses: exit 1, the cache keeps the old bytes.
    env.outage().await;
    let refused = env.put("write-through", "port = 1\n").await;
    refused.expect(1);
    let v = env
        .run(&["--offline", "get", KEY, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(v["content"], "port = 9090\n");
}

#[tokio::test]
async fn delete_under_write_through_deletes_on_github_and_in_the_cache() {
    let env = Env::new().await;
    accept_writes(&env, CONTENTS).await;
    env.put("write-through", "port = 9090\n").await.expect(0);
    env.reset().await;
    // GitHub now holds the file: the delete reads its sha, then sends it.
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(env.fake.file_object("config/prod.toml", "abc"))
        .mount(&env.fake.server)
        .await;
    Mock::given(method("DELETE"))
        .and(path(CONTENTS))
        .respond_with(env.fake.json(
            200,
            serde_json::json!({"content": null, "commit": {"sha": "def"}}),
        ))
        .expect(1)
        .mount(&env.fake.server)
        .await;
    let run = env
        .run(&["--strategy", "write-through", "delete", KEY])
        .await;
    run.expect(0);
    assert!(run.stderr.contains("GitHub"), "{}", run.stderr);
    let deletes = bodies(&env.requests().await, "DELETE");
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0]["sha"], "abc");
    // The cache no longer holds the old bytes.
    let gone = env.run(&["--offline", "get", KEY]).await;
    assert_ne!(gone.code, 0, "{}", gone.out());
    assert!(!gone.out().contains("port = 9090"), "{}", gone.out());
}

#[tokio::test]
async fn put_under_read_through_writes_only_the_local_cache() {
    let env = Env::new().await;
    let args: Vec<String> = [
        "--db",
        env.db().to_str().unwrap(),
        "--api-url",
        &env.fake.server.uri(),
        "put",
        KEY,
        "-",
    ]
    .map(str::to_owned)
    .to_vec();
    let run = env.run_raw(&args, &[], Some(b"local\n")).await;
    run.expect(0);
    assert!(run.stderr.contains("local cache only"), "{}", run.stderr);
    let got = env.run(&["get", KEY]).await;
    assert_eq!(got.expect(0).stdout, b"local\n");
    assert!(env.requests().await.is_empty(), "GitHub was not contacted");
}

#[tokio::test]
async fn write_behind_keeps_the_write_through_an_outage_and_flush_delivers_it_later() {
    let env = Env::new().await;
    env.outage().await;
    let put = env.put("write-behind", "port = 7070\n").await;
    put.expect(0);
    assert!(put.stderr.contains("queued"), "{}", put.stderr);
    assert!(put.stderr.contains("flush"), "{}", put.stderr);
    let stats = env.run(&["stats", "--json"]).await.expect(0).json();
    assert_eq!(stats["outbox_depth"], 1);

    // Still down: exit 1, nothing lost.
    let still_down = env.run(&["flush"]).await;
    still_down.expect(1);
    assert!(
        still_down.stderr.contains("pending"),
        "{}",
        still_down.stderr
    );
    // The write is readable meanwhile (offline: straight from the database).
    let v = env
        .run(&["--offline", "get", KEY, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(v["content"], "port = 7070\n");

    // GitHub is back: flush delivers and exits 0.
    env.reset().await;
    accept_writes(&env, CONTENTS).await;
    let flushed = env.run(&["flush"]).await;
    flushed.expect(0);
    assert!(flushed.out().contains("delivered 1"), "{}", flushed.out());
    let sent = puts(&env.requests().await);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["content"], "cG9ydCA9IDcwNzAK");
    let stats = env.run(&["stats", "--json"]).await.expect(0).json();
    assert_eq!(stats["outbox_depth"], 0);
    assert_eq!(stats["dead_letters"], 0);
}

#[tokio::test]
async fn put_under_write_behind_with_github_up_is_delivered_before_exit() {
    let env = Env::new().await;
    accept_writes(&env, CONTENTS).await;
    let put = env.put("write-behind", "port = 6060\n").await;
    put.expect(0);
    assert!(put.stderr.contains("delivered"), "{}", put.stderr);
    assert_eq!(puts(&env.requests().await).len(), 1);
    env.run(&["flush"]).await.expect(0);
}

#[tokio::test]
async fn warm_fetches_a_directory_for_offline_use() {
    let env = Env::new().await;
    let f = &env.fake;
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
                    {"path": "conf", "type": "tree"},
                    {"path": "conf/a.toml", "type": "blob"},
                    {"path": "conf/deep/b.toml", "type": "blob"},
                    {"path": "other/c.toml", "type": "blob"}
                ]
            }),
        ))
        .mount(&f.server)
        .await;
    env.serve("/repos/octo/app/contents/conf/a.toml", b"a = 1\n", "\"a\"")
        .await;
    env.serve(
        "/repos/octo/app/contents/conf/deep/b.toml",
        b"b = 2\n",
        "\"b\"",
    )
    .await;
    let run = env.run(&["warm", "octo/app/conf"]).await;
    run.expect(0);
    assert!(
        run.out().contains("2 listed, 2 fetched"),
        "{}\n{}",
        run.out(),
        run.stderr
    );

    env.reset().await;
    let a = env.run(&["--offline", "get", "octo/app/conf/a.toml"]).await;
    assert_eq!(a.expect(0).stdout, b"a = 1\n");
    let b = env
        .run(&["--offline", "get", "octo/app/conf/deep/b.toml"])
        .await;
    assert_eq!(b.expect(0).stdout, b"b = 2\n");
    let c = env
        .run(&["--offline", "get", "octo/app/other/c.toml"])
        .await;
    c.expect(1);
    assert!(c.stderr.contains("offline"), "{}", c.stderr);
    assert!(env.requests().await.is_empty(), "offline sends nothing");
}

#[tokio::test]
async fn stats_and_health_print_json() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    env.run(&["get", KEY]).await.expect(0);
    let stats = env.run(&["stats", "--json"]).await.expect(0).json();
    assert_eq!(stats["entries"], 1);
    assert!(stats["bytes"].as_u64().unwrap() >= 12);
    assert_eq!(stats["stale_entries"], 0);
    assert_eq!(stats["outbox_depth"], 0);
    assert_eq!(stats["dead_letters"], 0);
    assert_eq!(stats["l3_breaker"], "closed");
    let text = env.run(&["stats"]).await;
    assert!(text.expect(0).out().contains("GitHub breaker  closed"));

    let health = env.run(&["health", "--json"]).await.expect(0).json();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["l3"]["status"], "healthy");
    assert_eq!(health["backlog"]["pending"], 0);
    let offline = env.run(&["--offline", "health"]).await;
    assert!(offline.expect(0).out().contains("offline mode: on"));
}

#[tokio::test]
async fn cache_aside_never_asks_github() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    let run = env.run(&["--strategy", "cache-aside", "get", KEY]).await;
    run.expect(2);
    assert!(run.stderr.contains("cache-aside"), "{}", run.stderr);
    assert!(env.requests().await.is_empty());
}

#[tokio::test]
async fn flags_win_over_the_environment_which_wins_over_the_config_file() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    let from_file = env.dir.path().join("from-file.db");
    let config = env.dir.path().join("tiercache.toml");
    std::fs::write(
        &config,
        format!(
            "db = {:?}\napi_url = {:?}\nstrategy = \"read-through\"\nttl = \"10m\"\nstale_ttl = \"7d\"\ntimeout = \"5s\"\noffline = false\n",
            from_file.to_str().unwrap(),
            env.fake.server.uri()
        ),
    )
    .unwrap();
    let from_env = env.dir.path().join("from-env.db");
    let uri = env.fake.server.uri();
    let envs = [
        ("TIERCACHE_DB", from_env.to_str().unwrap()),
        ("GITHUB_API_URL", uri.as_str()),
    ];
    // The file (named by --config) alone.
    let args = ["--config", config.to_str().unwrap(), "get", KEY].map(str::to_owned);
    env.run_raw(&args, &[], None).await.expect(0);
    assert!(from_file.exists() && !from_env.exists());
    std::fs::remove_file(&from_file).unwrap();
    // The environment wins over the file (as with `gh`).
    std::fs::write(
        &config,
        format!(
            "db = {:?}\napi_url = \"http://127.0.0.1:9\"\n",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    env.run_raw(&args, &envs, None).await.expect(0);
    assert!(from_env.exists() && !from_file.exists());
    std::fs::remove_file(&from_env).unwrap();
    // $TIERCACHE_CONFIG names it too; a flag wins over it.
    let flag_db = env.dir.path().join("flag.db");
    let args = ["--db", flag_db.to_str().unwrap(), "stats", "--json"].map(str::to_owned);
    let mut envs_cfg = envs.to_vec();
    envs_cfg.push(("TIERCACHE_CONFIG", config.to_str().unwrap()));
    let stats = env.run_raw(&args, &envs_cfg, None).await.expect(0).json();
    assert_eq!(stats["entries"], 0);
    assert!(flag_db.exists());
    // No flag, no file: the environment.
    let args = ["stats", "--json"].map(str::to_owned);
    env.run_raw(&args, &envs, None).await.expect(0);
    assert!(from_env.exists());

    // An unknown key: exit 64, named.
    std::fs::write(&config, "ttl = \"5m\"\nttll = \"1h\"\n").unwrap();
    let args = ["--config", config.to_str().unwrap(), "stats"].map(str::to_owned);
    let bad = env.run_raw(&args, &envs, None).await;
    bad.expect(64);
    assert!(bad.stderr.contains("ttll"), "{}", bad.stderr);
    // A bad duration in the file: 64.
    std::fs::write(&config, "ttl = \"soon\"\n").unwrap();
    env.run_raw(&args, &envs, None).await.expect(64);
    // A missing file: 64.
    let args = ["--config", "/nonexistent/tiercache.toml", "stats"].map(str::to_owned);
    env.run_raw(&args, &envs, None).await.expect(64);
}

#[tokio::test]
async fn dead_letters_are_listed_retried_and_discarded() {
    let env = Env::new().await;
    refuse_writes(&env).await;
    env.put("write-behind", "port = 5050\n").await.expect(1);
    let listed = env
        .run(&["dead-letters", "--json"])
        .await
        .expect(0)
        .json_lines();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["key"], KEY);
    assert!(listed[0]["error"]
        .as_str()
        .unwrap()
        .contains("Invalid request"));
    let id = listed[0]["id"].as_i64().unwrap();
    env.run(&["flush"]).await.expect(1);

    // Retry: back in the outbox; GitHub now accepts it, so flush delivers it.
    env.reset().await;
    accept_writes(&env, CONTENTS).await;
    env.run(&["dead-letters", "--retry", &id.to_string()])
        .await
        .expect(0);
    let flushed = env.run(&["flush"]).await;
    flushed.expect(0);
    assert!(flushed.out().contains("delivered 1"), "{}", flushed.out());
    assert!(env
        .run(&["dead-letters", "--json"])
        .await
        .expect(0)
        .json_lines()
        .is_empty());
    // A missing id is "not found".
    env.run(&["dead-letters", "--discard", "999"])
        .await
        .expect(2);
}

/// Issue #12, item 6: a write GitHub refuses is a dead letter and is never served, neither as
/// fresh from the database nor after the dead letter is discarded; GitHub's answer stands.
#[tokio::test]
async fn a_refused_write_behind_put_is_never_served() {
    let env = Env::new().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(env.fake.not_found())
        .mount(&env.fake.server)
        .await;
    Mock::given(method("PUT"))
        .and(path(CONTENTS))
        .respond_with(env.fake.error(422, "Invalid request: content is not valid"))
        .mount(&env.fake.server)
        .await;
    env.put("write-behind", "port = 5050\n").await.expect(1);
    for round in ["before", "after"] {
        let got = env.run(&["get", KEY, "--json"]).await;
        assert!(
            !got.out().contains("5050"),
            "{round} the discard: the refused content was served: {}",
            got.out()
        );
        got.expect(2);
        env.run(&["dead-letters", "--discard-all"]).await.expect(0);
    }
}

/// Issue #12, item 7: a delete queued by a write-behind process reads as "not found" in every
/// later process, whatever its strategy, before and after delivery; GitHub is not asked for the
/// old file meanwhile.
#[tokio::test]
async fn a_pending_write_behind_delete_reads_as_not_found_in_every_strategy() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    env.run(&["get", KEY]).await.expect(0);
    env.outage().await;
    env.run(&["--strategy", "write-behind", "delete", KEY])
        .await
        .expect(0);
    // GitHub is back and still has the file.
    env.reset().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    for strategy in [
        "read-through",
        "write-through",
        "cache-aside",
        "write-behind",
    ] {
        let got = env.run(&["--strategy", strategy, "get", KEY]).await;
        assert!(!got.out().contains("8080"), "{strategy}: {}", got.out());
        got.expect(2);
    }
    assert!(
        env.requests()
            .await
            .iter()
            .all(|r| r.method.as_str() != "GET" || r.url.path() != CONTENTS),
        "the old file was not fetched while its delete was pending"
    );
    // The delete is delivered (GitHub's sha look-up, then the DELETE); GitHub then says 404.
    env.reset().await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(env.fake.file_object("config/prod.toml", "abc"))
        .up_to_n_times(1)
        .mount(&env.fake.server)
        .await;
    Mock::given(method("DELETE"))
        .and(path(CONTENTS))
        .respond_with(env.fake.json(
            200,
            serde_json::json!({"content": null, "commit": {"sha": "def"}}),
        ))
        .mount(&env.fake.server)
        .await;
    Mock::given(method("GET"))
        .and(path(CONTENTS))
        .respond_with(env.fake.not_found())
        .mount(&env.fake.server)
        .await;
    env.run(&["flush"]).await.expect(0);
    assert_eq!(bodies(&env.requests().await, "DELETE").len(), 1);
    let got = env.run(&["get", KEY]).await;
    assert!(!got.out().contains("8080"), "{}", got.out());
    got.expect(2);
}

#[tokio::test]
async fn online_undoes_offline_of_the_config_file() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 8080\n", "\"v1\"").await;
    let config = env.dir.path().join("tiercache.toml");
    std::fs::write(&config, "offline = true\n").unwrap();
    let cfg = config.to_str().unwrap();
    let offline = env.run(&["--config", cfg, "get", KEY]).await;
    offline.expect(1);
    assert!(offline.stderr.contains("offline"), "{}", offline.stderr);
    assert!(env.requests().await.is_empty());
    for flag in ["--online", "--no-offline"] {
        let online = env
            .run(&["--config", cfg, flag, "get", KEY, "--ttl", "0s"])
            .await;
        assert_eq!(online.expect(0).stdout, b"port = 8080\n");
    }
    assert_eq!(env.requests().await.len(), 2);
}

#[tokio::test]
async fn an_offline_write_behind_put_is_queued_and_flushed_later() {
    let env = Env::new().await;
    let args = ["--offline", "--strategy", "write-behind", "put", KEY, "-"];
    let mut all = vec!["--db".to_owned(), env.db().to_str().unwrap().to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let put = env.run_raw(&all, &[], Some(b"port = 1\n")).await;
    put.expect(0);
    assert!(put.stderr.contains("queued"), "{}", put.stderr);
    assert!(put.stderr.contains("1 write(s) pending"), "{}", put.stderr);
    assert!(env.requests().await.is_empty(), "offline: nothing sent");
    accept_writes(&env, CONTENTS).await;
    env.run(&["flush"]).await.expect(0);
    assert_eq!(puts(&env.requests().await).len(), 1);
}

#[tokio::test]
async fn json_errors_carry_a_stable_kind() {
    let env = Env::new().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/contents/missing.txt"))
        .respond_with(env.fake.not_found())
        .mount(&env.fake.server)
        .await;
    let missing = env.run(&["get", "octo/app/missing.txt", "--json"]).await;
    let v = missing.expect(2).json();
    assert_eq!(
        (v["kind"].as_str(), v["not_found"].as_bool()),
        (Some("not_found"), Some(true))
    );
    env.outage().await;
    let down = env.run(&["get", KEY, "--json"]).await;
    let v = down.expect(1).json();
    assert_eq!(v["kind"], "unavailable", "{v}");
    assert!(v["error"].as_str().unwrap().contains("503"), "{v}");
    let lines = env
        .run(&["mget", "--json", KEY, "not a key"])
        .await
        .expect(64)
        .json_lines();
    assert_eq!(lines[0]["kind"], "unavailable");
    assert_eq!(lines[1]["kind"], "invalid_key");
}

#[tokio::test]
async fn get_of_a_directory_hints_at_warm() {
    let env = Env::new().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/contents/conf"))
        .respond_with(env.fake.directory("conf"))
        .mount(&env.fake.server)
        .await;
    let run = env.run(&["get", "octo/app/conf"]).await;
    run.expect(1);
    assert!(
        run.stderr.contains("tiercache warm octo/app/conf"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_closed_pipe_ends_quietly() {
    let env = Env::new().await;
    // Far more than a pipe holds, so the binary is still writing when the reader goes.
    let big = vec![b'x'; 4 << 20];
    env.serve(CONTENTS, &big, "\"v1\"").await;
    env.run(&["get", KEY]).await.expect(0);
    let db = env.db();
    let mut child = tokio::process::Command::new(binary())
        .args(["--db", db.to_str().unwrap(), "--offline", "get", KEY])
        .env("GITHUB_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    drop(child.stdout.take()); // the reader goes away at once, like `| head -c1`
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("finishes")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "quiet: {stderr}");
}

#[tokio::test]
async fn dead_letters_has_a_header_and_says_when_there_are_none() {
    let env = Env::new().await;
    let none = env.run(&["dead-letters"]).await;
    assert_eq!(none.expect(0).out(), "no dead letters\n");
    assert_eq!(
        env.run(&["dead-letters", "--json"]).await.expect(0).out(),
        ""
    );
    refuse_writes(&env).await;
    env.put("write-behind", "port = 1\n").await.expect(1);
    let text = env.run(&["dead-letters"]).await.expect(0).out();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "ID\tOP\tKEY\tATTEMPTS\tCREATED\tERROR");
    assert!(lines[1].contains(KEY), "{text}");
    let json = env
        .run(&["dead-letters", "--json"])
        .await
        .expect(0)
        .json_lines();
    let created = json[0]["created_at"].as_str().expect("an RFC 3339 string");
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
}

#[tokio::test]
async fn health_notices_failures_across_processes_and_probes() {
    let env = Env::new().await;
    env.outage().await;
    env.run(&["get", KEY]).await.expect(1);
    // A new process: the failure and its text are in the database.
    let h = env.run(&["health", "--json"]).await.expect(0).json();
    assert_eq!(h["l3"]["status"], "degraded", "{h}");
    assert_eq!(h["l3"]["consecutive_failures"], 1);
    assert!(
        h["l3"]["last_error"].as_str().unwrap_or("").contains("503"),
        "{h}"
    );
    // The probe makes one real request, past the breaker.
    let before = env.requests().await.len();
    let probed = env.run(&["health", "--probe", KEY]).await;
    probed.expect(1);
    assert!(
        probed.out().contains("probe: failed (unavailable)"),
        "{}",
        probed.out()
    );
    assert_eq!(env.requests().await.len(), before + 1);
    env.reset().await;
    env.serve(CONTENTS, b"ok\n", "\"v1\"").await;
    let h = env
        .run(&["health", "--json", "--probe", KEY])
        .await
        .expect(0)
        .json();
    assert_eq!(h["probe"]["ok"], true, "{h}");
}

#[tokio::test]
async fn stats_says_why_and_until_when_the_breaker_is_open() {
    let env = Env::new().await;
    env.outage().await;
    // The default breaker opens after 5 consecutive failures.
    for _ in 0..5 {
        env.run(&["get", KEY]).await.expect(1);
    }
    let text = env.run(&["stats"]).await.expect(0).out();
    let line = text
        .lines()
        .find(|l| l.starts_with("GitHub breaker"))
        .unwrap_or_default();
    assert!(
        line.contains("open: 5 consecutive failure(s), last error:"),
        "{text}"
    );
    assert!(
        line.contains("; next try in ") && line.contains(" UTC)"),
        "{text}"
    );
    assert!(text.contains("rate limit      unknown"), "{text}");
    let json = env.run(&["stats", "--json"]).await.expect(0).json();
    assert_eq!(json["l3_breaker"], "open");
    let until = json["l3_breaker_until"].as_str().expect("RFC 3339");
    assert!(humantime::parse_rfc3339(until).is_ok(), "{until}");
}

#[tokio::test]
async fn a_bare_at_and_a_pasted_url_name_the_same_cache_entry_as_the_key() {
    let env = Env::new().await;
    env.serve(CONTENTS, b"port = 1\n", "\"p\"").await;
    let gets = |reqs: Vec<Request>| reqs.iter().filter(|r| r.method.as_str() == "GET").count();

    let at = env
        .run(&["get", "octo/app/config/prod.toml@", "--json"])
        .await;
    assert_eq!(at.expect(0).json()["key"], KEY, "KEY@ is printed as KEY");
    env.run(&["get", KEY]).await.expect(0);
    assert_eq!(gets(env.requests().await), 1, "KEY@ and KEY: one entry");

    for url in [
        "https://github.com/octo/app/blob/main/config/prod.toml",
        "https://raw.githubusercontent.com/octo/app/main/config/prod.toml#L1",
        "octo/app/config/prod.toml@main",
    ] {
        let run = env.run(&["get", url, "--json"]).await;
        assert_eq!(
            run.expect(0).json()["key"],
            "octo/app/config/prod.toml@main"
        );
        assert_eq!(run.json()["content"], "port = 1\n");
    }
    let reqs = env.requests().await;
    assert_eq!(
        gets(reqs.clone()),
        2,
        "the URLs and the key: one more entry"
    );
    assert_eq!(reqs.last().unwrap().url.query(), Some("ref=main"));

    let mget = env
        .run(&[
            "mget",
            "--json",
            "https://github.com/octo/app/blob/main/config/prod.toml",
            "octo/app/config/prod.toml@",
        ])
        .await;
    let keys: Vec<Value> = mget
        .expect(0)
        .json_lines()
        .iter()
        .map(|l| l["key"].clone())
        .collect();
    assert_eq!(keys, ["octo/app/config/prod.toml@main", KEY]);
    assert_eq!(gets(env.requests().await), 2, "both were cached");

    let bad = env
        .run(&["get", "https://gitlab.com/octo/app/-/blob/main/a.toml"])
        .await;
    bad.expect(64);
    assert!(
        bad.stderr.contains("invalid key") && bad.stderr.contains("github.com/OWNER/REPO/blob"),
        "{}",
        bad.stderr
    );
}

#[tokio::test]
async fn warm_of_a_prefix_with_no_files_exits_2_and_warm_owner_names_warms_syntax() {
    let env = Env::new().await;
    let f = &env.fake;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/git/trees/main"))
        .respond_with(f.json(
            200,
            serde_json::json!({
                "sha": "t", "truncated": false,
                "tree": [{"path": "conf", "type": "tree"}, {"path": "conf/a.toml", "type": "blob"}]
            }),
        ))
        .mount(&f.server)
        .await;
    let empty = env.run(&["warm", "octo/app/nothing@main"]).await;
    empty.expect(2);
    assert!(
        empty.stderr.contains("nothing to warm") && empty.stderr.contains("octo/app/nothing@main"),
        "{}",
        empty.stderr
    );
    // The ref resolved to its commit first (this fake has no commits: a 404, so the tree is
    // listed at the ref itself), then the one listing: nothing is fetched.
    let sent: Vec<String> = env
        .requests()
        .await
        .iter()
        .map(|r| r.url.path().to_owned())
        .collect();
    assert_eq!(
        sent,
        [
            "/repos/octo/app/commits/main",
            "/repos/octo/app/git/trees/main"
        ],
        "only the ref and the listing"
    );

    let owner = env.run(&["warm", "octo"]).await;
    owner.expect(64);
    assert!(
        owner.stderr.contains("expected owner/repo[/dir][@ref]")
            && owner
                .stderr
                .contains("usage: tiercache warm OWNER/REPO[/DIR][@REF]")
            && !owner.stderr.contains("owner/repo/path"),
        "{}",
        owner.stderr
    );
}

/// Built without the `postgres` feature, `--postgres` is a usage error that says what to do.
#[cfg(not(feature = "postgres"))]
#[tokio::test]
async fn postgres_without_its_feature_is_a_usage_error() {
    let env = Env::new().await;
    let run = env
        .run(&[
            "--postgres",
            "postgres://app:pw@127.0.0.1/cache",
            "get",
            KEY,
        ])
        .await;
    run.expect(64);
    assert!(run.stderr.contains("postgres` feature"), "{}", run.stderr);
    assert!(!run.stderr.contains("pw@"), "{}", run.stderr);
}

/// `warm --refresh`: what the cache holds under the prefix, revalidated without listing GitHub
/// again: one "Get a commit" request, answered 304 (free).
#[tokio::test]
async fn warm_refresh_revalidates_the_held_files_with_one_commit_request() {
    let env = Env::new().await;
    let f = &env.fake;
    let sha = "0123456789abcdef0123456789abcdef01234567";
    Mock::given(method("GET"))
        .and(path("/repos/octo/app"))
        .respond_with(f.json(200, serde_json::json!({"default_branch": "main"})))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/repos/octo/app/git/trees/{sha}").as_str()))
        .respond_with(f.json(
            200,
            serde_json::json!({"sha": "t", "truncated": false, "tree": [
                {"path": "conf/a.toml", "type": "blob"},
                {"path": "conf/b.toml", "type": "blob"}
            ]}),
        ))
        .mount(&f.server)
        .await;
    let quoted = format!("\"{sha}\"");
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/HEAD"))
        .and(header("accept", "application/vnd.github.sha"))
        .and(header("if-none-match", quoted.as_str()))
        .respond_with(f.not_modified(&quoted))
        .with_priority(1)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/HEAD"))
        .and(header("accept", "application/vnd.github.sha"))
        .respond_with(
            f.answer(200, 4998)
                .insert_header("etag", quoted.as_str())
                .set_body_raw(sha, "application/vnd.github.sha; charset=utf-8"),
        )
        .mount(&f.server)
        .await;
    let repo = github_fake::FakeRepo::default()
        .with(
            "octo",
            "app",
            &format!("{sha}:conf/a.toml"),
            github_fake::Object::text("a = 1\n"),
        )
        .with(
            "octo",
            "app",
            &format!("{sha}:conf/b.toml"),
            github_fake::Object::text("b = 2\n"),
        );
    Mock::given(method("POST"))
        .and(path("/graphql"))
        .respond_with(f.graphql(repo))
        .mount(&f.server)
        .await;
    let run = env.run(&["warm", "octo/app/conf"]).await;
    assert!(
        run.expect(0).out().contains("2 listed, 2 fetched"),
        "{}",
        run.out()
    );
    let before = env.requests().await.len();
    let run = env.run(&["warm", "--refresh", "octo/app/conf"]).await;
    let out = run.expect(0).out();
    assert!(
        out.contains("refreshed octo/app/conf: 2 held, 0 fetched, 2 unchanged (304)"),
        "{out}"
    );
    let after = env.requests().await;
    let sent: Vec<String> = after[before..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.url.path()))
        .collect();
    assert_eq!(sent, ["GET /repos/octo/app/commits/HEAD"], "one request");
    let a = env.run(&["--offline", "get", "octo/app/conf/a.toml"]).await;
    assert_eq!(a.expect(0).stdout, b"a = 1\n");
    let none = env.run(&["warm", "--refresh", "octo/other"]).await;
    none.expect(2);
    assert!(
        none.stderr.contains("nothing to refresh"),
        "{}",
        none.stderr
    );
}
