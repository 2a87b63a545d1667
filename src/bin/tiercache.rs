//! `tiercache`: the tiered cache from the command line — files on GitHub, cached in memory and in
//! a SQLite file, served stale when GitHub fails.
//!
//! ```text
//! tiercache [--db PATH] [--api-url URL] [--strategy read-through|cache-aside|write-through|write-behind]
//!           [--ttl DUR] [--stale-ttl DUR] [--timeout DUR] [--offline] [--config FILE] COMMAND
//!   get KEY [--json]            the file's bytes on stdout
//!   mget KEY... [--json]        with --json: one JSON object per line, in input order
//!   put KEY FILE                write KEY per --strategy (FILE `-` is stdin)
//!   flush                       deliver the write-behind outbox; exit 1 if anything is left
//!   warm OWNER/REPO[/DIR][@REF] fetch every file under DIR into the cache
//!   stats [--json]              what the database holds, outbox depth, dead letters, breaker state
//!   health [--json]
//!   dead-letters [--retry ID | --discard ID | --retry-all | --discard-all] [--json]
//!   export FILE [--prefix P] [--force] [--json]   a snapshot of the cache in one bundle file
//!   import FILE [--json]        load a bundle into the database (then --offline serves it)
//! ```
//!
//! Exit codes: 0 success (a stale answer too; stderr says so and why), 1 unavailable or another
//! runtime error, 2 not found, 64 usage error (bad flag, key, duration or config file).
//!
//! The config file (`--config FILE` or `$TIERCACHE_CONFIG`) is described in [`config`].
//! The token is read from `GITHUB_TOKEN` only and is never printed.
//!
//! This file holds the command line, settings, exit codes and error printing; the commands live
//! in [`read`] (`get`, `mget`, `warm`), [`write`](mod@write) (`put`, `delete`), [`outbox`]
//! (`flush`, `dead-letters`), [`status`] (`stats`, `health`), [`bundle`] (`export`, `import`)
//! and `serve` (feature `serve`).

#[path = "tiercache/bundle.rs"]
mod bundle;
#[path = "tiercache/config.rs"]
mod config;
#[path = "tiercache/duration.rs"]
mod duration;
#[path = "tiercache/keys.rs"]
mod keys;
#[path = "tiercache/outbox.rs"]
mod outbox;
#[path = "tiercache/output.rs"]
mod output;
#[path = "tiercache/read.rs"]
mod read;
#[cfg(feature = "serve")]
#[path = "tiercache/serve.rs"]
mod serve;
#[path = "tiercache/status.rs"]
mod status;
#[path = "tiercache/write.rs"]
mod write;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use tiercache::source::github::GitHubSource;
use tiercache::{Error, Strategy, TieredCache, TieredCacheBuilder};

use config::{Flags, Settings};
use outbox::DeadLetterAction;

const AFTER_HELP: &str = "\
Keys name files on GitHub: OWNER/REPO/PATH[@REF], e.g. octo/app/config/prod.toml@main
(no REF, or a bare trailing @: the default branch). A file's URL is accepted too and stands for
that key: https://github.com/OWNER/REPO/blob/REF/PATH or
https://raw.githubusercontent.com/OWNER/REPO/REF/PATH (REF is one path segment there; for a
branch with a '/', write the key).
DUR is a whole number and a unit: 500ms, 30s, 10m, 2h, 7d.

Environment:
  GITHUB_TOKEN       the token sent to GitHub (never printed)
  TIERCACHE_DB       the database file when --db is not given
                     (default: <platform cache dir>/tiercache/cache.db)
  GITHUB_API_URL     the API base URL when --api-url is not given (default: https://api.github.com)
  TIERCACHE_CONFIG   the config file when --config is not given
  TIERCACHE_LOG      log tiercache's own events to stderr at this level: error, warn, info,
                     debug or trace (default: no log)

Config file (TOML; every key optional; unknown keys are an error):
  db = \"/path/cache.db\"      api_url = \"https://github.example.com/api/v3\"
  strategy = \"write-behind\"  ttl = \"10m\"   stale_ttl = \"7d\"   timeout = \"5s\"   offline = false
Precedence: a flag, then the environment, then the config file (as `gh` does);
--online undoes `offline = true` of the config file.

Exit codes: 0 success (also when a stale copy was served: stderr says so and why),
1 unavailable or another runtime error, 2 not found, 64 usage error.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "tiercache",
    version,
    about = "A tiered cache (memory, SQLite, GitHub) from the command line",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// The SQLite database file (L2) [default: $TIERCACHE_DB, else the platform cache dir]
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,
    /// The GitHub API base URL [default: $GITHUB_API_URL, else https://api.github.com]
    #[arg(long, global = true, value_name = "URL")]
    api_url: Option<String>,
    /// How reads and writes move between the tiers [default: read-through]
    #[arg(long, global = true, value_name = "STRATEGY", value_parser = parse_strategy)]
    strategy: Option<Strategy>,
    /// The maximum age at which a cached copy is served as fresh; `0s` revalidates every
    /// cached copy [default: 5m]
    #[arg(long, global = true, value_name = "DUR", value_parser = duration::parse)]
    ttl: Option<Duration>,
    /// How long past --ttl a copy may still be served, stale, when GitHub fails [default: 1d]
    #[arg(long, global = true, value_name = "DUR", value_parser = duration::parse)]
    stale_ttl: Option<Duration>,
    /// The deadline of one GitHub call [default: 10s]
    #[arg(long, global = true, value_name = "DUR", value_parser = duration::parse)]
    timeout: Option<Duration>,
    /// Never contact GitHub; serve what the cache holds, stale included (write-behind writes
    /// are queued for a later `flush`)
    #[arg(long, global = true, conflicts_with = "online")]
    offline: bool,
    /// Contact GitHub even if the config file says `offline = true`
    #[arg(long, global = true, visible_alias = "no-offline")]
    online: bool,
    /// The config file [default: $TIERCACHE_CONFIG; none]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// L2 on this PostgreSQL server instead of the SQLite file, shared by every instance
    /// pointed at it (feature `postgres`); the password is never printed
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "TIERCACHE_POSTGRES_URL",
        hide_env_values = true
    )]
    postgres: Option<String>,
    /// The schema of --postgres: instances sharing one are one cache [default: tiercache]
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        env = "TIERCACHE_POSTGRES_SCHEMA"
    )]
    postgres_schema: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a file's bytes
    #[command(
        after_help = "Examples:\n  tiercache get octo/app/config/prod.toml\n  \
        tiercache get octo/app/config/prod.toml@v1.2.0 --json\n  \
        tiercache --offline get octo/app/config/prod.toml   # only what is cached\n\n\
        A directory is fetched with `tiercache warm OWNER/REPO/DIR`.\n\n\
        With --json, the text of a UTF-8 file is in \"content\"; any other file is in \
        \"content_base64\". An error is {\"key\", \"error\", \"kind\"} (kinds: see the README)."
    )]
    Get {
        /// OWNER/REPO/PATH[@REF], or the file's URL on github.com
        key: String,
        /// Print one JSON object: key, tier, freshness, stale_reason, age_ms, etag, size, content
        #[arg(long)]
        json: bool,
    },
    /// Print many files (with --json: one JSON object per line, in input order)
    #[command(
        after_help = "Examples:\n  tiercache mget octo/app/a.toml octo/app/b.toml\n  \
        tiercache mget --json octo/app/a.toml octo/app/b.toml | jq .kind"
    )]
    Mget {
        /// OWNER/REPO/PATH[@REF] ...
        #[arg(required = true)]
        keys: Vec<String>,
        /// One JSON object per key and line; a failed key has "error" instead of content
        #[arg(long)]
        json: bool,
    },
    /// Write a file per --strategy (write-through: GitHub first; write-behind: the outbox;
    /// read-through, cache-aside: the local cache only)
    #[command(after_help = "Examples:\n  \
        tiercache --strategy write-through put octo/app/config/prod.toml prod.toml\n  \
        echo 'port = 1' | tiercache --strategy write-behind put octo/app/config/prod.toml -\n  \
        tiercache --offline --strategy write-behind put octo/app/a.toml a.toml   # queued")]
    Put {
        /// OWNER/REPO/PATH[@REF]
        key: String,
        /// The file to read the bytes from; `-` for stdin
        file: PathBuf,
    },
    /// Delete a file per --strategy (write-through: GitHub first; write-behind: the outbox;
    /// read-through, cache-aside: the local cache only)
    Delete {
        /// OWNER/REPO/PATH[@REF]
        key: String,
    },
    /// Deliver the write-behind outbox to GitHub; exit 1 if anything is left
    Flush,
    /// Fetch every file under a directory into the cache (for offline use)
    #[command(after_help = "Examples:\n  tiercache warm octo/app\n  \
        tiercache warm octo/app/config@main\n  tiercache warm --refresh octo/app/config")]
    Warm {
        /// OWNER/REPO[/DIR][@REF]
        prefix: String,
        /// Revalidate every file the cache holds under the prefix (fresh or not) without
        /// listing GitHub again: one free conditional request per repository and ref when
        /// nothing changed
        #[arg(long)]
        refresh: bool,
    },
    /// What the database holds, the write-behind outbox, the GitHub breaker (why and until when
    /// it is open) and rate limit
    #[command(
        after_help = "Examples:\n  tiercache stats\n  tiercache stats --json | jq .l3_breaker"
    )]
    Stats {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Whether each tier works (exit 1 when unhealthy, or when the probe failed)
    #[command(
        after_help = "Examples:\n  tiercache health\n  tiercache health --json\n  \
        tiercache health --probe octo/app/README.md   # one real request to GitHub"
    )]
    Health {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        /// Also send one real request for KEY to GitHub (past the cache and the breaker) and
        /// report how it went; exit 1 if it failed. The probe's outcome is reported on its own
        /// `probe:` line and does not change the breaker
        #[arg(long, value_name = "KEY")]
        probe: Option<String>,
    },
    /// List the writes GitHub refused for good; move them back to the outbox or discard them
    #[command(after_help = "Examples:\n  tiercache dead-letters\n  \
        tiercache dead-letters --retry 3 && tiercache flush\n  tiercache dead-letters --discard-all")]
    DeadLetters {
        /// Move this dead letter back to the outbox (then `flush` delivers it)
        #[arg(long, value_name = "ID", conflicts_with_all = ["discard", "retry_all", "discard_all"])]
        retry: Option<i64>,
        /// Delete this dead letter for good
        #[arg(long, value_name = "ID", conflicts_with_all = ["retry_all", "discard_all"])]
        discard: Option<i64>,
        /// Move every dead letter back to the outbox
        #[arg(long, conflicts_with = "discard_all")]
        retry_all: bool,
        /// Delete every dead letter for good
        #[arg(long)]
        discard_all: bool,
        /// Print one JSON object per dead letter and line
        #[arg(long)]
        json: bool,
    },
    /// Write what the cache holds into one bundle file (values, ETags, deadlines), to import
    /// on machines that work offline
    #[command(
        after_help = "Examples:\n  tiercache warm octo/app && tiercache export app.bundle\n  \
        tiercache export app.bundle --prefix octo/app/config/ --force\n\n\
        The file is written under a temporary name and renamed into place; an existing file is \
        refused (exit 64) unless --force. Left out: pending write-behind writes, dead letters, \
        not-found markers and expired entries. Deadlines are kept: the --stale-ttl of the cache \
        that fetched the files is how long the bundle serves offline."
    )]
    Export {
        /// The bundle file to write
        file: PathBuf,
        /// Only keys starting with this (e.g. octo/app/config/)
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<String>,
        /// Replace a file already at FILE
        #[arg(long)]
        force: bool,
        /// Print one JSON object (the report)
        #[arg(long)]
        json: bool,
    },
    /// Load a bundle made by `export` into the database; `--offline get` then serves it
    #[command(after_help = "Examples:\n  tiercache import app.bundle\n  \
        tiercache import app.bundle && tiercache --offline get octo/app/config/prod.toml\n\n\
        An entry is written unless the database holds the key as new or newer, or a write-behind \
        write of the key is pending. The bundle is checked whole first: a missing file exits 64; \
        a foreign, newer or damaged one exits 1, and the database is left unchanged.")]
    Import {
        /// The bundle file to read (never modified)
        file: PathBuf,
        /// Print one JSON object (the report)
        #[arg(long)]
        json: bool,
    },
    /// Serve the cache over HTTP: GET, PUT and DELETE /components/KEY, GET /health and
    /// GET /metrics (feature `serve`)
    #[cfg(feature = "serve")]
    #[command(after_help = "Examples:\n  tiercache serve\n  \
        tiercache --strategy write-behind serve --listen 0.0.0.0:8080\n  \
        curl -i localhost:8080/components/octo/app/config/prod.toml\n  \
        curl -X PUT --data-binary @prod.toml localhost:8080/components/octo/app/config/prod.toml\n\n\
        GET answers with ETag (If-None-Match gets 304), x-tiercache-tier, x-tiercache-freshness \
        and x-tiercache-stale-reason; errors are JSON {\"key\", \"error\", \"kind\"}; 503 carries \
        Retry-After when the reset is known. Ctrl-C (or SIGTERM) stops, flushing the outbox.")]
    Serve {
        /// The address to listen on (port 0: any free port, printed on the first line)
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    s.parse().map_err(|_| {
        format!(
            "{s:?} is not a strategy; use read-through, cache-aside, write-through or write-behind"
        )
    })
}

/// Exit codes.
const EXIT_RUNTIME: u8 = 1;
const EXIT_NOT_FOUND: u8 = 2;
const EXIT_USAGE: u8 = 64;

/// Why the command failed, and the exit code that says so.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    /// A failed write to stdout; a closed pipe is a quiet, successful end.
    pub(crate) fn stdout(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Self {
                code: 0,
                message: String::new(),
            };
        }
        Self::runtime(format!("cannot write to stdout: {e}"))
    }

    fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_RUNTIME,
            message: message.into(),
        }
    }

    /// The exit code and message for a library error.
    fn from_error(e: &Error) -> Self {
        let code = exit_code(e);
        let mut message = e.report();
        if e.is_unavailable() {
            message.push_str(" (and no cached copy could stand in)");
        }
        Self { code, message }
    }
}

fn exit_code(e: &Error) -> u8 {
    if e.is_invalid_key() || matches!(e, Error::Config(_)) {
        EXIT_USAGE
    } else if e.is_not_found() {
        EXIT_NOT_FOUND
    } else {
        EXIT_RUNTIME
    }
}

/// `TIERCACHE_LOG=<level>`: tiercache's own events on stderr. Only this crate's: the HTTP
/// stack's debug output would carry request headers, and with them the token.
fn init_log() -> Result<(), Failure> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let Ok(level) = std::env::var("TIERCACHE_LOG") else {
        return Ok(());
    };
    let level: tracing::Level = level.trim().parse().map_err(|_| {
        Failure::usage(format!(
            "TIERCACHE_LOG={level:?}: expected error, warn, info, debug or trace"
        ))
    })?;
    let ours = tracing_subscriber::filter::filter_fn(move |m| {
        m.target().starts_with("tiercache") && *m.level() <= level
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(ours),
        )
        .try_init()
        .map_err(|e| Failure::runtime(format!("cannot start the log: {e}")))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    if let Err(f) = init_log() {
        eprintln!("tiercache: error: {}", f.message);
        return ExitCode::from(f.code);
    }
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("tiercache: error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    let g = cli.global;
    let settings = config::resolve(Flags {
        db: g.db,
        api_url: g.api_url,
        strategy: g.strategy,
        ttl: g.ttl,
        stale_ttl: g.stale_ttl,
        timeout: g.timeout,
        offline: match (g.offline, g.online) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        config: g.config,
        postgres: g.postgres,
        postgres_schema: g.postgres_schema,
    })?;
    // A service uses every core; a one-shot command needs one thread.
    let mut rt = match cli.command {
        #[cfg(feature = "serve")]
        Command::Serve { .. } => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let rt = rt
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        match cli.command {
            Command::Get { key, json } => read::get(&settings, &keys::canonical(&key)?, json).await,
            Command::Mget { keys, json } => {
                let keys = keys
                    .iter()
                    .map(|k| keys::canonical(k))
                    .collect::<Result<Vec<_>, _>>()?;
                read::mget(&settings, &keys, json).await
            }
            Command::Put { key, file } => {
                write::put(&settings, &keys::canonical(&key)?, &file).await
            }
            Command::Delete { key } => write::delete(&settings, &keys::canonical(&key)?).await,
            Command::Flush => outbox::flush(&settings).await,
            Command::Warm { prefix, refresh } => read::warm(&settings, &prefix, refresh).await,
            Command::Stats { json } => status::stats(&settings, json).await,
            Command::Health { json, probe } => {
                let probe = probe.as_deref().map(keys::canonical).transpose()?;
                status::health(&settings, json, probe.as_deref()).await
            }
            Command::DeadLetters {
                retry,
                discard,
                retry_all,
                discard_all,
                json,
            } => {
                let action = match (retry, discard) {
                    (Some(id), _) => DeadLetterAction::Retry(Some(id)),
                    (_, Some(id)) => DeadLetterAction::Discard(Some(id)),
                    _ if retry_all => DeadLetterAction::Retry(None),
                    _ if discard_all => DeadLetterAction::Discard(None),
                    _ => DeadLetterAction::List,
                };
                outbox::dead_letters(&settings, action, json).await
            }
            Command::Export {
                file,
                prefix,
                force,
                json,
            } => bundle::export(&settings, &file, prefix.as_deref(), force, json).await,
            Command::Import { file, json } => bundle::import(&settings, &file, json).await,
            #[cfg(feature = "serve")]
            Command::Serve { listen } => serve::serve(&settings, listen).await,
        }
    })
}

/// Opens the cache on the settings. `strategy` overrides the configured one.
async fn open(s: &Settings, strategy: Strategy) -> Result<TieredCache, Failure> {
    if s.db_is_default {
        if let Some(dir) = s.db.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Failure::runtime(format!("cannot create the folder {}: {e}", dir.display()))
            })?;
        }
    }
    // One deadline per source call: the cache's (`--timeout`), not a second one in the source.
    let source = GitHubSource::builder()
        .base_url(s.api_url.as_str())
        .token_from_env()
        .revalidate_by_commit(true)
        .build()
        .map_err(|e| Failure::from_error(&e))?;
    let mut b = TieredCache::builder()
        .source(source)
        .strategy(strategy)
        .offline(s.offline);
    b = match &s.postgres {
        Some(url) => on_postgres(b, url.expose(), s.postgres_schema.as_deref()).await?,
        None => b.sqlite_path(&s.db),
    };
    if let Some(ttl) = s.ttl {
        b = b.ttl(ttl);
    }
    if let Some(stale) = s.stale_ttl {
        b = b.stale_ttl(stale);
    }
    if let Some(t) = s.timeout {
        b = b.timeout(t);
    }
    b.build().map_err(|e| {
        let mut f = Failure::from_error(&e);
        if e.is_storage() && s.postgres.is_none() {
            f.message = format!("{} (database {})", f.message, s.db.display());
        }
        f
    })
}

/// L2 on the PostgreSQL server of `--postgres` (its errors name the server without the
/// password).
#[cfg(feature = "postgres")]
async fn on_postgres(
    b: TieredCacheBuilder,
    url: &str,
    schema: Option<&str>,
) -> Result<TieredCacheBuilder, Failure> {
    let mut store = tiercache::PostgresStore::builder(url);
    if let Some(schema) = schema {
        store = store.schema(schema);
    }
    let store = store.connect().await.map_err(|e| Failure::from_error(&e))?;
    Ok(b.store(store))
}

#[cfg(not(feature = "postgres"))]
async fn on_postgres(
    _: TieredCacheBuilder,
    _: &str,
    _: Option<&str>,
) -> Result<TieredCacheBuilder, Failure> {
    Err(Failure::usage(
        "--postgres needs the `postgres` feature: build tiercache with --features cli,postgres"
            .to_owned(),
    ))
}

/// The strategy for commands that only read: write-behind reads like read-through, and opening
/// it would start the outbox flusher (a `get` should not deliver writes as a side effect).
fn read_strategy(s: &Settings) -> Strategy {
    match s.strategy {
        Strategy::CacheAside => Strategy::CacheAside,
        _ => Strategy::ReadThrough,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiercache::source::SourceError;

    #[test]
    fn chain_says_every_cause_once() {
        let e = Error::Source {
            key: "o/r/README.md".into(),
            source: SourceError::unauthorized("Bad credentials").with_status(401),
        };
        assert_eq!(
            e.report(),
            "the source refused \"o/r/README.md\": \
             source refused the credentials (HTTP 401): Bad credentials"
        );
    }

    #[test]
    fn exit_codes_follow_the_sources_answers() {
        let source = |source| Error::Source {
            key: "k".into(),
            source,
        };
        assert_eq!(
            exit_code(&source(SourceError::not_found("gone"))),
            EXIT_NOT_FOUND
        );
        assert_eq!(
            exit_code(&source(SourceError::InvalidKey(tiercache::KeyError::Empty))),
            EXIT_USAGE
        );
        assert_eq!(
            exit_code(&source(SourceError::rejected("no"))),
            EXIT_RUNTIME
        );
    }
}
