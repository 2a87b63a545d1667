//! `tiercache export FILE` / `tiercache import FILE` end to end, against a wiremock fake of
//! GitHub on loopback (see `tests/cli.rs` for how the binary gets built): files read through
//! from the fake, exported, imported into a fresh `--db`, then served by `--offline get` with
//! no request sent. Refusals and their exit codes.

#[path = "support/cli.rs"]
mod cli_support;
#[path = "support/github_fake.rs"]
mod github_fake;

use std::path::{Path, PathBuf};

use cli_support::{run_binary, Run};
use github_fake::Fake;
use tempfile::TempDir;
use wiremock::matchers::{method, path};
use wiremock::Mock;

/// Two files: text, and binary (every byte value).
fn files() -> Vec<(&'static str, &'static str, Vec<u8>, &'static str)> {
    vec![
        (
            "octo/app/config/prod.toml",
            "/repos/octo/app/contents/config/prod.toml",
            b"port = 8080\n".to_vec(),
            "\"etag-prod\"",
        ),
        (
            "octo/app/img/logo.png",
            "/repos/octo/app/contents/img/logo.png",
            (0..=255u8).chain([0, 137, 80]).collect(),
            "\"etag-logo\"",
        ),
    ]
}

struct Env {
    fake: Fake,
    dir: TempDir,
}

impl Env {
    async fn new() -> Self {
        let env = Env {
            fake: Fake::start().await,
            dir: TempDir::new().expect("a temporary folder"),
        };
        for (_, contents, body, etag) in files() {
            Mock::given(method("GET"))
                .and(path(contents))
                .respond_with(env.fake.raw_file(&body, etag))
                .mount(&env.fake.server)
                .await;
        }
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `tiercache --db DB --api-url FAKE ARGS`.
    async fn run(&self, db: &Path, args: &[&str]) -> Run {
        let mut all: Vec<String> = vec![
            "--db".into(),
            db.to_str().expect("a UTF-8 path").into(),
            "--api-url".into(),
            self.fake.server.uri(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        run_binary(self.dir.path(), &all, &[], None).await
    }

    /// Reads every file through the CI database (one request each) and exports it.
    async fn exported(&self, bundle: &Path) -> Run {
        let ci = self.path("ci.db");
        for (key, _, body, _) in files() {
            let got = self.run(&ci, &["get", key]).await;
            assert_eq!(got.expect(0).stdout, body);
        }
        let run = self
            .run(&ci, &["export", bundle.to_str().expect("utf-8")])
            .await;
        run.expect(0);
        run
    }

    async fn requests(&self) -> usize {
        self.fake
            .server
            .received_requests()
            .await
            .map_or(0, |r| r.len())
    }
}

#[tokio::test]
async fn export_then_import_into_a_fresh_db_then_offline_get_serves_every_key() {
    let env = Env::new().await;
    let bundle = env.path("components.bundle");
    let export = env.exported(&bundle).await;
    assert!(
        export.out().contains("exported 2 entries ("),
        "{}",
        export.out()
    );
    assert_eq!(env.requests().await, files().len(), "one request per file");

    let runner = env.path("runner.db");
    let import = env
        .run(&runner, &["import", bundle.to_str().expect("utf-8")])
        .await;
    import.expect(0);
    assert!(
        import.out().contains("imported 2 of 2 entries"),
        "{}",
        import.out()
    );
    for (key, _, body, etag) in files() {
        let got = env.run(&runner, &["--offline", "get", key]).await;
        assert_eq!(got.expect(0).stdout, body, "{key} byte-exact");
        let json = env.run(&runner, &["--offline", "get", key, "--json"]).await;
        let v = json.expect(0).json();
        assert_eq!(v["etag"], etag, "{key}: the ETag came along");
        assert_eq!(v["tier"], "l2");
    }
    assert_eq!(
        env.requests().await,
        files().len(),
        "import and --offline get sent nothing"
    );
}

#[tokio::test]
async fn export_and_import_print_json_reports() {
    let env = Env::new().await;
    let ci = env.path("ci.db");
    for (key, ..) in files() {
        env.run(&ci, &["get", key]).await.expect(0);
    }
    let bundle = env.path("app.bundle");
    let b = bundle.to_str().expect("utf-8");
    let export = env
        .run(
            &ci,
            &["export", b, "--prefix", "octo/app/config/", "--json"],
        )
        .await;
    let v = export.expect(0).json();
    assert_eq!(v["entries"], 1, "{v}");
    assert_eq!(v["prefix"], "octo/app/config/");
    assert_eq!(v["path"], b);

    let runner = env.path("runner.db");
    let import = env.run(&runner, &["import", b, "--json"]).await;
    let v = import.expect(0).json();
    assert_eq!(
        (v["entries"].clone(), v["imported"].clone()),
        (1.into(), 1.into()),
        "{v}"
    );
    let again = env.run(&runner, &["import", b, "--json"]).await;
    let v = again.expect(0).json();
    assert_eq!(
        (v["imported"].clone(), v["kept_newer"].clone()),
        (0.into(), 1.into()),
        "{v}"
    );
}

#[tokio::test]
async fn export_refuses_an_existing_file_unless_forced() {
    let env = Env::new().await;
    let bundle = env.path("precious.bundle");
    std::fs::write(&bundle, "do not touch").expect("written");
    let ci = env.path("ci.db");
    env.run(&ci, &["get", files()[0].0]).await.expect(0);
    let b = bundle.to_str().expect("utf-8");
    let refused = env.run(&ci, &["export", b]).await;
    refused.expect(64);
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    assert_eq!(std::fs::read(&bundle).expect("read"), b"do not touch");
    let json = env.run(&ci, &["export", b, "--json"]).await;
    let v = json.expect(64).json();
    assert_eq!(
        (v["kind"].as_str(), v["fault"].as_str()),
        (Some("bundle"), Some("exists"))
    );

    env.run(&ci, &["export", b, "--force"]).await.expect(0);
    let runner = env.path("runner.db");
    env.run(&runner, &["import", b]).await.expect(0);
}

#[tokio::test]
async fn import_of_a_missing_or_foreign_file_fails_and_changes_nothing() {
    let env = Env::new().await;
    let runner = env.path("runner.db");
    let missing = env.run(&runner, &["import", "no-such.bundle"]).await;
    missing.expect(64);
    assert!(
        missing.stderr.contains("no such file"),
        "{}",
        missing.stderr
    );

    // The runner's own database is not a bundle: refused, exit 1, nothing changed.
    env.run(&runner, &["get", files()[0].0]).await.expect(0);
    let before = env.run(&runner, &["stats", "--json"]).await.json()["entries"].clone();
    let foreign = env
        .run(
            &runner,
            &["import", runner.to_str().expect("utf-8"), "--json"],
        )
        .await;
    let v = foreign.expect(1).json();
    assert_eq!(
        (v["kind"].as_str(), v["fault"].as_str()),
        (Some("bundle"), Some("foreign")),
        "{v}"
    );
    let after = env.run(&runner, &["stats", "--json"]).await.json()["entries"].clone();
    assert_eq!(before, after);

    let text = env.path("notes.txt");
    std::fs::write(&text, "not a bundle").expect("written");
    let not_sqlite = env
        .run(&runner, &["import", text.to_str().expect("utf-8")])
        .await;
    not_sqlite.expect(1);
    assert!(
        not_sqlite.stderr.contains("not a SQLite database"),
        "{}",
        not_sqlite.stderr
    );
    assert_eq!(std::fs::read(&text).expect("read"), b"not a bundle");
}
