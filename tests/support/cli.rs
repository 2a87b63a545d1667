//! Running the `tiercache` binary in tests: how it is found (see `tests/cli.rs` for how cargo
//! builds it), one run's exit code and output, and the fake token every run checks never leaks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// The fake `GITHUB_TOKEN` every run gets.
pub const TOKEN: &str = "ghp_FAKEtoken0123456789abcdefSECRET";

/// The binary: cargo's, or built once here.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = option_env!("CARGO_BIN_EXE_tiercache") {
            return PathBuf::from(p);
        }
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "--features",
                "cli",
                "--bin",
                "tiercache",
                "--message-format=json",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("cargo runs");
        assert!(out.status.success(), "cargo build --features cli failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"]["name"] == "tiercache")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported the tiercache executable")
    })
}

/// One run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {}", self.out()))
    }

    pub fn json_lines(&self) -> Vec<Value> {
        self.out()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[track_caller]
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            code,
            "exit code; stdout: {}\nstderr: {}",
            self.out(),
            self.stderr
        );
        self
    }
}

/// Runs the binary in `cwd` with exactly `args`, the fake token, `env` on top of an environment
/// cleared of tiercache's own variables, and `stdin` (or none); checks the token never leaks.
pub async fn run_binary(
    cwd: &Path,
    args: &[String],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> Run {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(args)
        .env("GITHUB_TOKEN", TOKEN)
        .env_remove("TIERCACHE_DB")
        .env_remove("TIERCACHE_CONFIG")
        .env_remove("GITHUB_API_URL")
        .env_remove("TIERCACHE_POSTGRES_URL")
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("the binary starts");
    let mut pipe = child.stdin.take().expect("a stdin pipe");
    if let Some(bytes) = stdin {
        pipe.write_all(bytes).await.expect("stdin written");
    }
    drop(pipe);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the binary finishes within 30 s")
        .expect("the binary runs");
    let run = Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.out().contains(TOKEN) && !run.stderr.contains(TOKEN),
        "the token leaked: {run:?}"
    );
    run
}
