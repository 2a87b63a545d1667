//! The optional config file and how settings are resolved.
//!
//! # `tiercache.toml`
//! Read from `--config FILE`, else from the file named by `$TIERCACHE_CONFIG`; there is no
//! implicit location. Every key is optional; an unknown key is an error (exit 64).
//!
//! ```toml
//! db = "/var/cache/myapp/tiercache.db"   # the SQLite file (L2)
//! api_url = "https://github.example.com/api/v3"
//! strategy = "write-behind"              # read-through | cache-aside | write-through | write-behind
//! ttl = "10m"                            # max age served as fresh (also applied to cached copies)
//! stale_ttl = "7d"                       # how long past that a copy may stand in for a failed source
//! timeout = "5s"                         # deadline of one GitHub call
//! offline = false                        # never contact GitHub
//! ```
//!
//! # Precedence
//! A command-line flag wins over the file; the file wins over the environment (`TIERCACHE_DB`,
//! `GITHUB_API_URL`), which wins over the built-in defaults. The token is only ever read from
//! `GITHUB_TOKEN`; the file has no key for it, so it never lands in a file by accident.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tiercache::Strategy;

use crate::{duration, Failure};

/// The public GitHub API.
pub(crate) const DEFAULT_API_URL: &str = "https://api.github.com";

/// What the config file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    db: Option<PathBuf>,
    api_url: Option<String>,
    strategy: Option<String>,
    ttl: Option<String>,
    stale_ttl: Option<String>,
    timeout: Option<String>,
    offline: Option<bool>,
}

impl FileConfig {
    /// Reads and checks the file.
    ///
    /// # Errors
    /// A usage failure (exit 64) naming the file and the problem (unknown key, bad value).
    pub(crate) fn load(path: &Path) -> Result<Self, Failure> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Failure::usage(format!(
                "cannot read the config file {}: {e}",
                path.display()
            ))
        })?;
        toml::from_str(&text).map_err(|e| {
            Failure::usage(format!(
                "the config file {} is invalid: {}",
                path.display(),
                e.to_string().trim_end()
            ))
        })
    }
}

/// What the command line gives (each `None` when the flag was not passed).
#[derive(Debug, Default)]
pub(crate) struct Flags {
    pub(crate) db: Option<PathBuf>,
    pub(crate) api_url: Option<String>,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) stale_ttl: Option<Duration>,
    pub(crate) timeout: Option<Duration>,
    /// `--offline` (`Some(true)`), `--online` (`Some(false)`), or neither.
    pub(crate) offline: Option<bool>,
    pub(crate) config: Option<PathBuf>,
    /// `--postgres URL` (or `TIERCACHE_POSTGRES_URL`, read by clap).
    pub(crate) postgres: Option<String>,
    /// `--postgres-schema NAME` (or `TIERCACHE_POSTGRES_SCHEMA`).
    pub(crate) postgres_schema: Option<String>,
}

/// A database URL, which may hold a password: never printed.
#[derive(Clone)]
pub(crate) struct DatabaseUrl(String);

impl DatabaseUrl {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// The settings in force.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) db: PathBuf,
    /// Whether `db` is the built-in default (its folder is created).
    pub(crate) db_is_default: bool,
    pub(crate) api_url: String,
    pub(crate) strategy: Strategy,
    pub(crate) ttl: Option<Duration>,
    pub(crate) stale_ttl: Option<Duration>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) offline: bool,
    /// L2 on this PostgreSQL server instead of `db`, in this schema (else the default).
    pub(crate) postgres: Option<DatabaseUrl>,
    pub(crate) postgres_schema: Option<String>,
}

fn file_duration(name: &str, value: Option<String>) -> Result<Option<Duration>, Failure> {
    value
        .map(|v| duration::parse(&v))
        .transpose()
        .map_err(|e| Failure::usage(format!("config file: {name}: {e}")))
}

/// Flags, then the file, then the environment, then the defaults.
///
/// # Errors
/// A usage failure for a bad config file, or when no database location can be found.
pub(crate) fn resolve(flags: Flags) -> Result<Settings, Failure> {
    let config_path = flags
        .config
        .clone()
        .or_else(|| env_nonempty("TIERCACHE_CONFIG").map(PathBuf::from));
    let file = match &config_path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let strategy = match (flags.strategy, file.strategy) {
        (Some(s), _) => s,
        (None, Some(s)) => s
            .parse()
            .map_err(|e: tiercache::Error| Failure::usage(format!("config file: {e}")))?,
        (None, None) => Strategy::default(),
    };
    let ttl = flags.ttl.or(file_duration("ttl", file.ttl)?);
    let stale_ttl = flags
        .stale_ttl
        .or(file_duration("stale_ttl", file.stale_ttl)?);
    let timeout = flags.timeout.or(file_duration("timeout", file.timeout)?);
    // Flag, then environment, then the config file (as `gh` does).
    let (db, db_is_default) = match flags
        .db
        .or_else(|| env_nonempty("TIERCACHE_DB").map(PathBuf::from))
        .or(file.db)
    {
        Some(p) => (p, false),
        None => {
            let dir = dirs::cache_dir().ok_or_else(|| {
                Failure::usage(
                    "no cache directory is known on this platform; pass --db PATH or set TIERCACHE_DB",
                )
            })?;
            (dir.join("tiercache").join("cache.db"), true)
        }
    };
    let api_url = flags
        .api_url
        .or_else(|| env_nonempty("GITHUB_API_URL"))
        .or(file.api_url)
        .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
    Ok(Settings {
        db,
        db_is_default,
        api_url,
        strategy,
        ttl,
        stale_ttl,
        timeout,
        offline: flags.offline.or(file.offline).unwrap_or(false),
        postgres: flags
            .postgres
            .filter(|u| !u.trim().is_empty())
            .map(DatabaseUrl),
        postgres_schema: flags.postgres_schema.filter(|n| !n.trim().is_empty()),
    })
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let e = toml::from_str::<FileConfig>("ttl = \"5m\"\nttll = \"1h\"\n").unwrap_err();
        assert!(e.to_string().contains("ttll"), "{e}");
    }

    #[test]
    fn every_documented_key_parses() {
        let c: FileConfig = toml::from_str(
            "db = \"/tmp/x.db\"\napi_url = \"http://127.0.0.1:1\"\nstrategy = \"write-behind\"\n\
             ttl = \"10m\"\nstale_ttl = \"7d\"\ntimeout = \"5s\"\noffline = true\n",
        )
        .unwrap();
        assert_eq!(c.offline, Some(true));
        assert_eq!(c.strategy.as_deref(), Some("write-behind"));
    }
}
