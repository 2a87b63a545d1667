//! The commands that write: `put` and `delete`, each under --strategy.

use std::io::Read;

use tiercache::{Strategy, TieredCache};

use crate::config::Settings;
use crate::{open, Failure};

pub(crate) async fn put(s: &Settings, key: &str, file: &std::path::Path) -> Result<u8, Failure> {
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

pub(crate) async fn delete(s: &Settings, key: &str) -> Result<u8, Failure> {
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
    if s.offline && s.strategy == Strategy::WriteThrough {
        // Write-through writes to GitHub before anything else: offline, it cannot write at all.
        return Err(Failure::usage(
            "--offline cannot be combined with this command under write-through: that strategy \
             writes to GitHub first (write-behind queues the write for a later `flush`)",
        ));
    }
    let cache = open(s, s.strategy).await?;
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
        Strategy::WriteBehind if s.offline => {
            // Offline: nothing leaves (deliveries included); the write waits in the outbox.
            let pending = cache
                .store_summary()
                .await
                .map_err(|e| Failure::from_error(&e))?
                .outbox_depth;
            eprintln!(
                "tiercache: queued {what} (offline): it is durable in {}; {pending} write(s) \
                 pending, run `tiercache flush` when online",
                s.db.display()
            );
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
