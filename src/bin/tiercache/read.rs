//! The commands that read: `get`, `mget`, and `warm` (which reads a whole directory from GitHub
//! into the cache).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use tiercache::{ReadOptions, Strategy};

use crate::config::Settings;
use crate::output::{self, Served};
use crate::{open, read_strategy, Failure, EXIT_NOT_FOUND, EXIT_RUNTIME, EXIT_USAGE};

/// `--ttl` applies at read time too, to copies already cached (like HTTP's `max-age`).
fn read_options(s: &Settings) -> ReadOptions {
    match s.ttl {
        Some(ttl) => ReadOptions::new().max_age(ttl),
        None => ReadOptions::new(),
    }
}

pub(crate) async fn get(s: &Settings, key: &str, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s)).await?;
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
                .map_err(Failure::stdout)?;
            Ok(0)
        }
        Ok(None) => {
            let message = not_found_message(s, key);
            if json {
                println!("{}", output::error_json(key, &message, "not_found"));
            }
            Err(Failure {
                code: EXIT_NOT_FOUND,
                message,
            })
        }
        Err(e) => {
            let mut f = Failure::from_error(&e);
            // GitHub's answer for a directory: say what reads one.
            if f.message.contains("is a directory, not a file") {
                f.message.push_str(&format!(
                    "; to fetch every file under it: tiercache warm {key}"
                ));
            }
            if json {
                println!("{}", output::error_json(key, &f.message, e.kind()));
            }
            Err(f)
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

pub(crate) async fn mget(s: &Settings, keys: &[String], json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s)).await?;
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
                    writeln!(out, "{}", output::error_json(key, &message, "not_found"))
                } else {
                    Ok(())
                }
            }
            Err(e) => {
                let f = Failure::from_error(&e);
                eprintln!("tiercache: error: {}", f.message);
                code = worse(code, f.code);
                if json {
                    writeln!(out, "{}", output::error_json(key, &e.report(), e.kind()))
                } else {
                    Ok(())
                }
            }
        };
        written.map_err(Failure::stdout)?;
    }
    out.flush().map_err(Failure::stdout)?;
    Ok(code)
}

/// What `warm` takes.
const WARM_SYNTAX: &str = "OWNER/REPO[/DIR][@REF]";

pub(crate) async fn warm(s: &Settings, prefix: &str, refresh: bool) -> Result<u8, Failure> {
    if s.offline {
        return Err(Failure::usage(
            "warm fetches from GitHub; it cannot run with --offline",
        ));
    }
    let cache = open(s, read_strategy(s)).await?;
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
    let result = if refresh {
        cache.refresh(prefix, progress).await
    } else {
        cache.warm(prefix, progress).await
    };
    bar.finish_and_clear();
    let summary = result.map_err(|e| {
        let mut f = Failure::from_error(&e);
        if e.is_invalid_key() {
            f.message.push_str(&format!(
                "; usage: tiercache warm {WARM_SYNTAX} (e.g. tiercache warm octo/app/config@main)"
            ));
        }
        f
    })?;
    if summary.listed == 0 && refresh {
        return Err(Failure {
            code: EXIT_NOT_FOUND,
            message: format!(
                "nothing to refresh: the cache holds no files under {prefix} \
                 (warm it first: tiercache warm {prefix})"
            ),
        });
    }
    if summary.listed == 0 {
        return Err(Failure {
            code: EXIT_NOT_FOUND,
            message: format!(
                "nothing to warm: GitHub lists no files under {prefix} \
                 (expected {WARM_SYNTAX}, a directory that holds files)"
            ),
        });
    }
    let (verb, what) = if refresh {
        ("refreshed", "held")
    } else {
        ("warmed", "listed")
    };
    println!(
        "{verb} {prefix}: {} {what}, {} fetched, {} unchanged (304), {} already fresh, {} failed",
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
