//! The offline-bundle commands: `export FILE` (a snapshot of the cache in one file) and
//! `import FILE` (load one into the database, for `--offline` reads).

use std::path::Path;

use tiercache::bundle::{ExportOptions, ExportReport, ImportReport};
use tiercache::{BundleFault, Error};

use crate::config::Settings;
use crate::output::{self, print};
use crate::{open, read_strategy, Failure, EXIT_RUNTIME, EXIT_USAGE};

/// A refused bundle: a path the user must change (a file in the way, none to read) is a usage
/// error; a file that cannot be used, or the disk, a runtime error.
fn failure(e: &Error, json: bool, path: &Path) -> Failure {
    let mut f = Failure::from_error(e);
    f.code = match e.bundle_fault() {
        Some(BundleFault::Exists | BundleFault::Missing) => EXIT_USAGE,
        Some(_) => EXIT_RUNTIME,
        None => f.code,
    };
    if json {
        let mut v = output::error_json(&path.display().to_string(), &f.message, e.kind());
        v["path"] = serde_json::Value::String(path.display().to_string());
        if let Some(fault) = e.bundle_fault() {
            v["fault"] = serde_json::Value::String(fault.as_str().to_owned());
        }
        println!("{v}");
    }
    f
}

pub(crate) async fn export(
    s: &Settings,
    file: &Path,
    prefix: Option<&str>,
    force: bool,
    json: bool,
) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s)).await?;
    let options = ExportOptions::new()
        .prefix(prefix.unwrap_or_default())
        .overwrite(force);
    let report = cache
        .export_with(file, &options)
        .await
        .map_err(|e| failure(&e, json, file))?;
    if json {
        print(format!("{}\n", to_json(&report)?))?;
    } else {
        print(export_text(&report))?;
    }
    Ok(0)
}

pub(crate) async fn import(s: &Settings, file: &Path, json: bool) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s)).await?;
    let report = cache
        .import(file)
        .await
        .map_err(|e| failure(&e, json, file))?;
    if json {
        print(format!("{}\n", to_json(&report)?))?;
    } else {
        let target = match &s.postgres {
            Some(_) => "the PostgreSQL store (--postgres)".to_owned(),
            None => s.db.display().to_string(),
        };
        print(import_text(&report, &target))?;
    }
    Ok(0)
}

fn to_json(v: &impl serde::Serialize) -> Result<String, Failure> {
    serde_json::to_string(v).map_err(|e| Failure::runtime(format!("cannot print JSON: {e}")))
}

/// "1 entry", "2 entries".
fn entries(n: u64) -> String {
    match n {
        1 => "1 entry".to_owned(),
        n => format!("{n} entries"),
    }
}

fn export_text(r: &ExportReport) -> String {
    let under = if r.prefix.is_empty() {
        String::new()
    } else {
        format!(" under {}", r.prefix)
    };
    let mut text = format!(
        "exported {}{under} ({} bytes of content) to {} ({} bytes)\n",
        entries(r.entries),
        r.bytes,
        r.path.display(),
        r.file_bytes
    );
    let left_out = [
        (r.skipped_negative, "not-found markers"),
        (r.skipped_expired, "expired"),
        (r.skipped_pending, "pending write-behind writes"),
    ];
    let left_out: Vec<String> = left_out
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if !left_out.is_empty() {
        text.push_str(&format!("left out: {}\n", left_out.join(", ")));
    }
    text
}

fn import_text(r: &ImportReport, target: &str) -> String {
    let mut text = format!(
        "imported {} of {} ({} bytes) from {} into {}\n",
        r.imported,
        entries(r.entries),
        r.bytes,
        r.path.display(),
        target
    );
    let kept = [
        (r.kept_newer, "the cache held a newer copy"),
        (r.kept_pending, "a write-behind write of the key is pending"),
        (r.expired, "past their stale deadline"),
    ];
    for (n, why) in kept.iter().filter(|(n, _)| *n > 0) {
        text.push_str(&format!("not imported: {n} ({why})\n"));
    }
    text
}
