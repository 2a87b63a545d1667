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
//! ```
//!
//! Exit codes: 0 success (a stale answer too; stderr says so and why), 1 unavailable or another
//! runtime error, 2 not found, 64 usage error (bad flag, key, duration or config file).
//!
//! The config file (`--config FILE` or `$TIERCACHE_CONFIG`) is described in [`config`].
//! The token is read from `GITHUB_TOKEN` only and is never printed.

#[path = "tiercache/config.rs"]
mod config;
#[path = "tiercache/duration.rs"]
mod duration;
#[path = "tiercache/output.rs"]
mod output;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use tiercache::source::github::GitHubSource;
use tiercache::{Error, ReadOptions, Strategy, TieredCache};

use config::{Flags, Settings};
use output::Served;

const AFTER_HELP: &str = "\
Keys name files on GitHub: OWNER/REPO/PATH[@REF], e.g. octo/app/config/prod.toml@main.
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
Flags win over the file; the file wins over the environment.

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
    /// Never contact GitHub; serve what the cache holds, stale included
    #[arg(long, global = true)]
    offline: bool,
    /// The config file [default: $TIERCACHE_CONFIG; none]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a file's bytes
    Get {
        /// OWNER/REPO/PATH[@REF]
        key: String,
        /// Print one JSON object: key, tier, freshness, stale_reason, age_ms, etag, size, content
        #[arg(long)]
        json: bool,
    },
    /// Print many files (with --json: one JSON object per line, in input order)
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
    Warm {
        /// OWNER/REPO[/DIR][@REF]
        prefix: String,
    },
    /// What the database holds, the write-behind outbox, and the GitHub breaker
    Stats {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Whether each tier works (exit 1 when unhealthy)
    Health {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// List the writes GitHub refused for good; move them back to the outbox or discard them
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

    fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_RUNTIME,
            message: message.into(),
        }
    }

    /// The exit code and message for a library error.
    fn from_error(e: &Error) -> Self {
        let code = exit_code(e);
        let mut message = chain(e);
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

/// An error and its causes, each said once: `error: cause: root cause`. A cause whose text the
/// error already quotes is not repeated.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let link = cause.to_string();
        if !text.contains(&link) {
            text.push_str(": ");
            text.push_str(&link);
        }
        next = cause.source();
    }
    text
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
            eprintln!("tiercache: error: {}", f.message);
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
        offline: g.offline,
        config: g.config,
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        match cli.command {
            Command::Get { key, json } => get(&settings, &key, json).await,
            Command::Mget { keys, json } => mget(&settings, &keys, json).await,
            Command::Put { key, file } => put(&settings, &key, &file).await,
            Command::Delete { key } => delete(&settings, &key).await,
            Command::Flush => flush(&settings).await,
            Command::Warm { prefix } => warm(&settings, &prefix).await,
            Command::Stats { json } => stats(&settings, json).await,
            Command::Health { json } => health(&settings, json).await,
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
                dead_letters(&settings, action, json).await
            }
        }
    })
}

/// Opens the cache on the settings. `strategy` overrides the configured one.
fn open(s: &Settings, strategy: Strategy) -> Result<TieredCache, Failure> {
    if s.db_is_default {
        if let Some(dir) = s.db.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Failure::runtime(format!("cannot create the folder {}: {e}", dir.display()))
            })?;
        }
    }
    let mut gh = GitHubSource::builder()
        .base_url(s.api_url.as_str())
        .token_from_env();
    if let Some(t) = s.timeout {
        gh = gh.timeout(t);
    }
    let source = gh.build().map_err(|e| Failure::from_error(&e))?;
    let mut b = TieredCache::builder()
        .sqlite_path(&s.db)
        .source(source)
        .strategy(strategy)
        .offline(s.offline);
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
        if e.is_storage() {
            f.message = format!("{} (database {})", f.message, s.db.display());
        }
        f
    })
}

/// The strategy for commands that only read: write-behind reads like read-through, and opening
/// it would start the outbox flusher (a `get` should not deliver writes as a side effect).
fn read_strategy(s: &Settings) -> Strategy {
    match s.strategy {
        Strategy::CacheAside => Strategy::CacheAside,
        _ => Strategy::ReadThrough,
    }
}

/// `--ttl` applies at read time too, to copies already cached (like HTTP's `max-age`).
fn read_options(s: &Settings) -> ReadOptions {
    match s.ttl {
        Some(ttl) => ReadOptions::new().max_age(ttl),
        None => ReadOptions::new(),
    }
}

async fn get(s: &Settings, key: &str, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s))?;
    let result = cache.lookup_with(key, &read_options(s)).await;
    match result {
        Ok(Some(l)) => {
            let served = Served::new(key, l);
            served.warn_if_stale();
            let mut out = std::io::stdout().lock();
            let written = if json {
                writeln!(out, "{}", served.to_json())
            } else {
                out.write_all(&served.lookup.value)
            };
            written
                .and_then(|()| out.flush())
                .map_err(|e| Failure::runtime(format!("cannot write to stdout: {e}")))?;
            Ok(0)
        }
        Ok(None) => {
            let message = not_found_message(s, key);
            if json {
                println!("{}", output::error_json(key, &message, true));
            }
            Err(Failure {
                code: EXIT_NOT_FOUND,
                message,
            })
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    output::error_json(key, &chain(&e), exit_code(&e) == EXIT_NOT_FOUND)
                );
            }
            Err(Failure::from_error(&e))
        }
    }
}

fn not_found_message(s: &Settings, key: &str) -> String {
    if s.strategy == Strategy::CacheAside {
        format!("{key:?} is not in the cache (cache-aside never asks GitHub)")
    } else {
        format!("{key:?} was not found on GitHub")
    }
}

async fn mget(s: &Settings, keys: &[String], json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s))?;
    let results = cache.mget_with(keys, &read_options(s)).await;
    let mut code = 0u8;
    let worse = |code: u8, new: u8| -> u8 {
        let rank = |c: u8| match c {
            EXIT_USAGE => 3,
            EXIT_RUNTIME => 2,
            EXIT_NOT_FOUND => 1,
            _ => 0,
        };
        if rank(new) > rank(code) {
            new
        } else {
            code
        }
    };
    let mut out = std::io::stdout().lock();
    let many = keys.len() > 1;
    for (i, (key, result)) in keys.iter().zip(results).enumerate() {
        let written = match result {
            Ok(Some(l)) => {
                let served = Served::new(key, l);
                served.warn_if_stale();
                if json {
                    writeln!(out, "{}", served.to_json())
                } else {
                    let sep = if i > 0 { "\n" } else { "" };
                    let head = if many {
                        format!("{sep}==> {key} <==\n")
                    } else {
                        String::new()
                    };
                    out.write_all(head.as_bytes())
                        .and_then(|()| out.write_all(&served.lookup.value))
                }
            }
            Ok(None) => {
                let message = not_found_message(s, key);
                eprintln!("tiercache: {message}");
                code = worse(code, EXIT_NOT_FOUND);
                if json {
                    writeln!(out, "{}", output::error_json(key, &message, true))
                } else {
                    Ok(())
                }
            }
            Err(e) => {
                let f = Failure::from_error(&e);
                eprintln!("tiercache: error: {}", f.message);
                code = worse(code, f.code);
                if json {
                    writeln!(
                        out,
                        "{}",
                        output::error_json(key, &chain(&e), f.code == EXIT_NOT_FOUND)
                    )
                } else {
                    Ok(())
                }
            }
        };
        written.map_err(|e| Failure::runtime(format!("cannot write to stdout: {e}")))?;
    }
    out.flush()
        .map_err(|e| Failure::runtime(format!("cannot write to stdout: {e}")))?;
    Ok(code)
}

async fn put(s: &Settings, key: &str, file: &std::path::Path) -> Result<u8, Failure> {
    let bytes = if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| Failure::runtime(format!("cannot read stdin: {e}")))?;
        buf
    } else {
        std::fs::read(file)
            .map_err(|e| Failure::usage(format!("cannot read the file {}: {e}", file.display())))?
    };
    let what = format!("the write of {key} ({} bytes)", bytes.len());
    write(
        s,
        key,
        &what,
        |cache| async move { cache.set(key, bytes).await },
    )
    .await
}

async fn delete(s: &Settings, key: &str) -> Result<u8, Failure> {
    let what = format!("the deletion of {key}");
    write(
        s,
        key,
        &what,
        |cache| async move { cache.delete(key).await },
    )
    .await
}

/// Runs one write (`op`) under --strategy and reports where it went: GitHub, the outbox
/// (delivered before exit when GitHub answers), or the local cache only.
async fn write<F, Fut>(s: &Settings, key: &str, what: &str, op: F) -> Result<u8, Failure>
where
    F: FnOnce(TieredCache) -> Fut,
    Fut: std::future::Future<Output = tiercache::Result<()>>,
{
    if s.offline && matches!(s.strategy, Strategy::WriteThrough | Strategy::WriteBehind) {
        // The library's write paths do not consult offline mode; refuse rather than contact GitHub.
        return Err(Failure::usage(format!(
            "--offline cannot be combined with this command under {}: that strategy writes to \
             GitHub",
            s.strategy
        )));
    }
    let cache = open(s, s.strategy)?;
    // The newest dead letter of this key before the write: one after it is this write's. The
    // flush report alone cannot tell, as the background flusher may deliver (or dead-letter)
    // the write before `flush` runs.
    let newest_dead = |letters: Vec<tiercache::DeadLetter>| {
        letters
            .into_iter()
            .filter(|d| d.key == key)
            .max_by_key(|d| d.id)
    };
    let dead_before = match s.strategy {
        Strategy::WriteBehind => newest_dead(
            cache
                .dead_letters()
                .await
                .map_err(|e| Failure::from_error(&e))?,
        )
        .map(|d| d.id),
        _ => None,
    };
    op(cache.clone())
        .await
        .map_err(|e| Failure::from_error(&e))?;
    match s.strategy {
        Strategy::WriteThrough => {
            eprintln!("tiercache: {what} went to GitHub and the cache");
            Ok(0)
        }
        Strategy::WriteBehind => {
            let report = cache.flush().await.map_err(|e| Failure::from_error(&e))?;
            let refused = newest_dead(
                cache
                    .dead_letters()
                    .await
                    .map_err(|e| Failure::from_error(&e))?,
            )
            .filter(|d| Some(d.id) > dead_before);
            if let Some(d) = refused {
                let why = d.error.unwrap_or_else(|| "see `tiercache stats`".into());
                return Err(Failure::runtime(format!(
                    "GitHub refused {what} for good; it is kept as a dead letter: {why}"
                )));
            }
            if report.pending > 0 {
                let why = report
                    .stuck
                    .iter()
                    .find(|(k, _)| k == key)
                    .or(report.stuck.first())
                    .map(|(_, e)| format!(": {e}"))
                    .unwrap_or_default();
                eprintln!(
                    "tiercache: queued {what}: it is durable in {} but not delivered yet{why}; \
                     {} write(s) pending, run `tiercache flush` later",
                    s.db.display(),
                    report.pending
                );
            } else {
                eprintln!("tiercache: {what} went to GitHub (write-behind, delivered)");
            }
            Ok(0)
        }
        _ => {
            eprintln!(
                "tiercache: {what} went to the local cache only: the {} strategy does not write \
                 to GitHub (use --strategy write-through or write-behind)",
                s.strategy
            );
            Ok(0)
        }
    }
}

async fn flush(s: &Settings) -> Result<u8, Failure> {
    // The outbox exists whatever --strategy says; only the write-behind cache delivers it.
    if s.offline {
        return Err(Failure::usage(
            "flush delivers writes to GitHub; it cannot run with --offline",
        ));
    }
    let cache = open(s, Strategy::WriteBehind)?;
    let report = cache.flush().await.map_err(|e| Failure::from_error(&e))?;
    let summary = cache
        .store_summary()
        .await
        .map_err(|e| Failure::from_error(&e))?;
    println!(
        "delivered {}, pending {}, dead letters {}",
        report.delivered, report.pending, summary.dead_letters
    );
    for (key, err) in &report.stuck {
        eprintln!("tiercache: {key}: {err}");
    }
    if report.pending > 0 || summary.dead_letters > 0 {
        let mut parts = Vec::new();
        if report.pending > 0 {
            parts.push(format!("{} write(s) still pending", report.pending));
        }
        if summary.dead_letters > 0 {
            parts.push(format!(
                "{} dead letter(s) GitHub refused for good",
                summary.dead_letters
            ));
        }
        return Err(Failure::runtime(format!(
            "the outbox is not empty: {}",
            parts.join(", ")
        )));
    }
    Ok(0)
}

async fn warm(s: &Settings, prefix: &str) -> Result<u8, Failure> {
    if s.offline {
        return Err(Failure::usage(
            "warm fetches from GitHub; it cannot run with --offline",
        ));
    }
    let cache = open(s, read_strategy(s))?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("warming {prefix}"));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let progress = {
        let bar = bar.clone();
        move |p: tiercache::WarmProgress| {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
        }
    };
    let result = cache.warm(prefix, progress).await;
    bar.finish_and_clear();
    let summary = result.map_err(|e| Failure::from_error(&e))?;
    println!(
        "warmed {prefix}: {} listed, {} fetched, {} unchanged (304), {} already fresh, {} failed",
        summary.listed,
        summary.fetched,
        summary.not_modified,
        summary.cached,
        summary.failed.len()
    );
    for (key, err) in &summary.failed {
        eprintln!("tiercache: {key}: {err}");
    }
    if summary.failed.is_empty() {
        Ok(0)
    } else {
        Err(Failure::runtime(format!(
            "{} of {} files could not be fetched",
            summary.failed.len(),
            summary.listed
        )))
    }
}

async fn stats(s: &Settings, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s))?;
    let summary = cache
        .store_summary()
        .await
        .map_err(|e| Failure::from_error(&e))?;
    let health = cache.health().await;
    let breaker = |t: &tiercache::health::TierHealth| {
        t.breaker
            .as_ref()
            .map_or("unknown", |b| b.state.as_str())
            .to_owned()
    };
    let report = output::StatsReport {
        db: s.db.display().to_string(),
        entries: summary.entries,
        bytes: summary.bytes,
        stale_entries: summary.stale_entries,
        negative_entries: summary.negative_entries,
        outbox_depth: summary.outbox_depth,
        dead_letters: summary.dead_letters,
        oldest_pending_age_ms: summary.oldest_pending_ms.map(|t| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now.saturating_sub(t)
        }),
        l3_breaker: breaker(&health.l3),
        l2_breaker: breaker(&health.l2),
    };
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print!("{report}");
    }
    Ok(0)
}

async fn health(s: &Settings, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s))?;
    let report = cache.health().await;
    if json {
        println!("{}", serde_json::to_value(&report).unwrap_or_default());
    } else {
        print!("{report}");
    }
    let unhealthy = report.status == tiercache::HealthStatus::Unhealthy;
    Ok(if unhealthy { EXIT_RUNTIME } else { 0 })
}

/// What `dead-letters` does: list, or retry / discard one (`Some(id)`) or all (`None`).
enum DeadLetterAction {
    List,
    Retry(Option<i64>),
    Discard(Option<i64>),
}

async fn dead_letters(s: &Settings, action: DeadLetterAction, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s))?;
    let letters = cache
        .dead_letters()
        .await
        .map_err(|e| Failure::from_error(&e))?;
    let (retry, only) = match action {
        DeadLetterAction::List => {
            for d in &letters {
                if json {
                    println!("{}", serde_json::to_value(d).unwrap_or_default());
                } else {
                    println!(
                        "{}\t{}\t{}\t{} attempt(s)\t{}",
                        d.id,
                        d.op,
                        d.key,
                        d.attempts,
                        d.error.as_deref().unwrap_or("")
                    );
                }
            }
            return Ok(0);
        }
        DeadLetterAction::Retry(only) => (true, only),
        DeadLetterAction::Discard(only) => (false, only),
    };
    let ids: Vec<i64> = match only {
        Some(id) => vec![id],
        None => letters.iter().map(|d| d.id).collect(),
    };
    let (mut done, mut superseded) = (0, 0);
    for id in &ids {
        let found = if retry {
            cache.retry_dead_letter(*id).await
        } else {
            cache.discard_dead_letter(*id).await
        };
        let found = match found {
            // `--retry-all` goes on past a letter a newer write superseded; it is reported.
            Err(e @ tiercache::Error::Superseded { .. }) if only.is_none() => {
                eprintln!("{e}");
                superseded += 1;
                continue;
            }
            other => other.map_err(|e| Failure::from_error(&e))?,
        };
        if found {
            done += 1;
        } else if only.is_some() {
            return Err(Failure {
                code: EXIT_NOT_FOUND,
                message: format!("there is no dead letter {id}"),
            });
        }
    }
    if retry {
        println!("{done} dead letter(s) moved back to the outbox; `tiercache flush` delivers them");
        if superseded > 0 {
            println!(
                "{superseded} dead letter(s) left: superseded by a newer write of their key (`--discard ID` removes one)"
            );
        }
    } else {
        println!("{done} dead letter(s) discarded");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiercache::source::SourceError;

    /// A wrapper that quotes its cause in its own text, as some storage errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("could not write: disk full")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn chain_says_every_cause_once() {
        let e = Error::Source {
            key: "o/r/README.md".into(),
            source: SourceError::unauthorized("Bad credentials").with_status(401),
        };
        assert_eq!(
            chain(&e),
            "the source refused \"o/r/README.md\": \
             source refused the credentials (HTTP 401): Bad credentials"
        );
        let quoting = Quoting(std::io::Error::other("disk full"));
        assert_eq!(chain(&quoting), "could not write: disk full");
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
