//! Offline bundles: [`TieredCache::export`] and [`TieredCache::import`] over the file format of
//! [`crate::bundle`] and the store's [`snapshot`](EntryStore::snapshot) and
//! [`merge`](EntryStore::merge).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::*;
use crate::bundle::{fault, read_bundle, BundleWriter, ExportOptions, ExportReport, ImportReport};
use crate::error::BundleFault;
use crate::tier::{EntrySink, EntryStore, Merged};

/// What the export's sink shares with the export: the writer and the counts of what it left out.
#[derive(Debug, Default)]
struct Collected {
    writer: Option<BundleWriter>,
    negative: u64,
    expired: u64,
    pending: u64,
}

/// A blocking task of the bundle's that did not finish (it panicked or was cancelled).
fn stopped(path: &Path) -> impl FnOnce(tokio::task::JoinError) -> Error + '_ {
    move |e| {
        fault(
            path,
            BundleFault::Io,
            format!("the bundle's work stopped: {e}"),
        )
    }
}

impl TieredCache {
    /// Writes every entry L2 holds into an offline bundle at `path`: a consistent snapshot (one
    /// read transaction) of the values, ETags and deadlines, in one file written under a
    /// temporary name and renamed into place. A file already at `path` is left alone (see
    /// [`export_with`](Self::export_with) to overwrite it). What a bundle holds and leaves out
    /// (pending write-behind writes, dead letters, "not found" markers, expired entries) and
    /// why: [`crate::bundle`].
    ///
    /// # Errors
    /// [`Error::Bundle`]: [`BundleFault::Exists`] (a file is at `path`), [`BundleFault::Io`]
    /// (the file could not be written), [`BundleFault::Unsupported`] (a store given to the
    /// builder that cannot list its entries); [`Error::Storage`] when L2 cannot be read;
    /// [`Error::Closed`]. On an error no file is left at `path` (nor under a temporary name).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use tiercache::TieredCache;
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let ci = TieredCache::builder().build()?;
    /// ci.set("octo/app/config.toml", "port = 1").await?;
    /// let report = ci.export(dir.path().join("components.bundle")).await?;
    /// assert_eq!(report.entries, 1);
    /// # Ok(()) }
    /// ```
    pub async fn export(&self, path: impl AsRef<Path>) -> Result<ExportReport> {
        self.export_with(path, &ExportOptions::default()).await
    }

    /// [`export`](Self::export) with options: only keys under a prefix, or over an existing
    /// file.
    ///
    /// # Errors
    /// As [`export`](Self::export).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use tiercache::bundle::ExportOptions;
    /// use tiercache::TieredCache;
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("app.bundle");
    /// let ci = TieredCache::builder().build()?;
    /// ci.set("octo/app/a.toml", "a").await?;
    /// ci.set("octo/lib/b.toml", "b").await?;
    /// let options = ExportOptions::new().prefix("octo/app/").overwrite(true);
    /// assert_eq!(ci.export_with(&path, &options).await?.entries, 1);
    /// assert_eq!(ci.export_with(&path, &options).await?.entries, 1); // replaced
    /// # Ok(()) }
    /// ```
    pub async fn export_with(
        &self,
        path: impl AsRef<Path>,
        options: &ExportOptions,
    ) -> Result<ExportReport> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let path = path.as_ref().to_owned();
        let now = self.now();
        let overwrite = options.overwrite;
        // Even with `overwrite`, never over the database the cache is using.
        if let Some(db) = self.inner.sqlite.as_ref().and_then(|s| s.path()) {
            let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            if same(db, &path) {
                return Err(fault(
                    &path,
                    BundleFault::Exists,
                    "this is the cache's own database file; choose another path",
                ));
            }
        }
        let writer = {
            let target = path.clone();
            tokio::task::spawn_blocking(move || BundleWriter::create(&target, overwrite))
                .await
                .map_err(stopped(&path))??
        };
        let pending: HashSet<String> = self
            .inner
            .memory_queue
            .as_ref()
            .map(|q| q.keys().into_iter().collect())
            .unwrap_or_default();
        let shared = Arc::new(Mutex::new(Collected {
            writer: Some(writer),
            ..Collected::default()
        }));
        let sink: EntrySink = {
            let shared = shared.clone();
            Box::new(move |key, entry| {
                let mut c = shared.lock().unwrap_or_else(|e| e.into_inner());
                if entry.value.is_none() {
                    c.negative += 1;
                } else if entry.stale_until <= now {
                    c.expired += 1;
                } else if pending.contains(&key) {
                    c.pending += 1;
                } else if let Some(w) = c.writer.as_mut() {
                    w.add(&key, &entry)?;
                }
                Ok(())
            })
        };
        let snapshot = self.inner.l2_guard.snapshot(&options.prefix, sink).await;
        let collected = std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()));
        // On an error the writer is dropped here, and its temporary file with it.
        snapshot.map_err(|e| match e {
            Error::Bundle {
                fault: BundleFault::Unsupported,
                message,
                source,
                ..
            } => Error::Bundle {
                path: path.clone(),
                fault: BundleFault::Unsupported,
                message,
                source,
            },
            e => e,
        })?;
        let writer = collected
            .writer
            .ok_or_else(|| fault(&path, BundleFault::Io, "the bundle was lost"))?;
        let (entries, bytes) = (writer.entries, writer.bytes);
        let meta = vec![
            ("created_at_ms", now.to_string()),
            ("tiercache_version", env!("CARGO_PKG_VERSION").to_owned()),
            ("prefix", options.prefix.clone()),
        ];
        let file_bytes = tokio::task::spawn_blocking(move || writer.finish(&meta))
            .await
            .map_err(stopped(&path))??;
        Ok(ExportReport {
            path,
            prefix: options.prefix.clone(),
            entries,
            bytes,
            file_bytes,
            skipped_negative: collected.negative,
            skipped_expired: collected.expired,
            skipped_pending: collected.pending,
        })
    }

    /// Loads an offline bundle made by [`export`](Self::export) into this cache's L2, into a
    /// fresh or an existing database: an entry is written unless the key has a pending
    /// write-behind write or holds an entry as new or newer; entries past their stale deadline
    /// are skipped. Imported keys are dropped from L1 (of every cache of this process on the
    /// database), so every later read sees them. The bundle is read and checked whole before
    /// anything is written, and merged in one transaction (SQLite): a refused bundle changes
    /// nothing. The file is opened read-only. The details: [`crate::bundle`].
    ///
    /// # Errors
    /// [`Error::Bundle`]: [`BundleFault::Missing`], [`NotSqlite`](BundleFault::NotSqlite),
    /// [`Foreign`](BundleFault::Foreign) (another application's SQLite file, or a cache
    /// database), [`Newer`](BundleFault::Newer) (a newer bundle format),
    /// [`Corrupt`](BundleFault::Corrupt), [`InvalidRow`](BundleFault::InvalidRow),
    /// [`Io`](BundleFault::Io); [`Error::Storage`] when L2 cannot be written (nothing of the
    /// bundle is then); [`Error::Closed`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use tiercache::{Freshness, Tier, TieredCache};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let bundle = dir.path().join("components.bundle");
    /// let ci = TieredCache::builder().build()?;
    /// ci.set("octo/app/config.toml", "port = 1").await?;
    /// ci.export(&bundle).await?;
    ///
    /// // On a runner with no network.
    /// let runner = TieredCache::builder().offline(true).build()?;
    /// assert_eq!(runner.import(&bundle).await?.imported, 1);
    /// let hit = runner.lookup("octo/app/config.toml").await?.unwrap();
    /// assert_eq!((hit.value.as_ref(), hit.tier), (&b"port = 1"[..], Tier::L2));
    /// assert_eq!(hit.freshness, Freshness::Fresh);
    /// # Ok(()) }
    /// ```
    pub async fn import(&self, path: impl AsRef<Path>) -> Result<ImportReport> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let inner = &*self.inner;
        let path = path.as_ref().to_owned();
        let bundle = {
            let source = path.clone();
            tokio::task::spawn_blocking(move || read_bundle(&source))
                .await
                .map_err(stopped(&path))??
        };
        let now = self.now();
        let mut report = ImportReport {
            path,
            entries: bundle.entries.len() as u64,
            ..ImportReport::default()
        };
        let mut wanted = Vec::with_capacity(bundle.entries.len());
        for (key, entry) in bundle.entries {
            if entry.stale_until <= now {
                report.expired += 1;
            } else if inner
                .memory_queue
                .as_ref()
                .is_some_and(|q| q.newest_now(&key).is_some())
            {
                report.kept_pending += 1;
            } else {
                wanted.push((key, entry));
            }
        }
        // Fills and promotions that read an older copy before the merge stay out of L1.
        for (key, _) in &wanted {
            inner.fences.bump(key);
        }
        let sizes: Vec<(String, u64)> = wanted
            .iter()
            .map(|(k, e)| (k.clone(), e.size() as u64))
            .collect();
        let merged = inner.l2_guard.merge(wanted).await?;
        for ((key, size), outcome) in sizes.iter().zip(merged) {
            match outcome {
                Merged::Written => {
                    report.imported += 1;
                    report.bytes += size;
                    inner.l1.remove(key).await;
                    inner.fences.spread(inner.peer_id, key).await;
                }
                Merged::KeptPending => report.kept_pending += 1,
                Merged::KeptNewer => report.kept_newer += 1,
            }
        }
        Ok(report)
    }
}
