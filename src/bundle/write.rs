//! Writing a bundle: a temporary file beside the target, synced, then moved into place.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{params, Connection, OpenFlags};

use super::{fault, io, sql, BUNDLE_APPLICATION_ID, BUNDLE_SCHEMA, BUNDLE_VERSION};
use crate::error::{BundleFault, Error, Result};
use crate::tier::StoredEntry;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A bundle being written: a temporary file beside the target, removed unless
/// [`finish`](Self::finish)ed.
#[derive(Debug)]
pub(crate) struct BundleWriter {
    conn: Option<Connection>,
    tmp: PathBuf,
    path: PathBuf,
    overwrite: bool,
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
}

impl BundleWriter {
    /// Starts a bundle for `path`. Blocking (file system and SQLite).
    ///
    /// # Errors
    /// [`BundleFault::Exists`] when a file is at `path` and not `overwrite`;
    /// [`BundleFault::Io`].
    pub(crate) fn create(path: &Path, overwrite: bool) -> Result<Self> {
        if !overwrite && path.symlink_metadata().is_ok() {
            return Err(exists(path));
        }
        let name = path
            .file_name()
            .ok_or_else(|| fault(path, BundleFault::Io, "the path names no file"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = path.with_file_name(tmp_name);
        let conn = Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(path, "cannot create the bundle's temporary file"))?;
        let writer = Self {
            conn: Some(conn),
            tmp,
            path: path.to_owned(),
            overwrite,
            entries: 0,
            bytes: 0,
        };
        // A temporary file: no journal (a failed export deletes it); synced once at the end.
        writer
            .conn()?
            .execute_batch(&format!(
                "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
                 PRAGMA application_id={BUNDLE_APPLICATION_ID}; PRAGMA user_version={BUNDLE_VERSION};
                 {BUNDLE_SCHEMA} BEGIN;"
            ))
            .map_err(sql(path, "cannot write the bundle"))?;
        Ok(writer)
    }

    fn conn(&self) -> Result<&Connection> {
        self.conn.as_ref().ok_or_else(|| {
            fault(
                &self.path,
                BundleFault::Io,
                "the bundle was already finished",
            )
        })
    }

    /// Adds one entry. Blocking.
    pub(crate) fn add(&mut self, key: &str, e: &StoredEntry) -> Result<()> {
        self.conn()?
            .prepare_cached(
                "INSERT INTO entries (key, value, validator, stored_at, fresh_until, stale_until)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key,
                    e.value.as_deref(),
                    e.validator,
                    to_i64(e.stored_at),
                    to_i64(e.fresh_until),
                    to_i64(e.stale_until),
                ])
            })
            .map_err(sql(&self.path, "cannot write the bundle"))?;
        self.entries += 1;
        self.bytes += e.size() as u64;
        Ok(())
    }

    /// Writes the `bundle` rows, commits, syncs and moves the file into place (never over an
    /// existing file unless `overwrite`). Returns the file's size. Blocking.
    pub(crate) fn finish(mut self, meta: &[(&str, String)]) -> Result<u64> {
        let path = self.path.clone();
        {
            let conn = self.conn()?;
            let fail = sql(&path, "cannot write the bundle");
            let mut stmt = conn
                .prepare("INSERT INTO bundle (name, value) VALUES (?1, ?2)")
                .map_err(&fail)?;
            let counts = [
                ("format_version", BUNDLE_VERSION.to_string()),
                ("entries", self.entries.to_string()),
                ("bytes", self.bytes.to_string()),
            ];
            for (name, value) in counts
                .iter()
                .map(|(n, v)| (*n, v))
                .chain(meta.iter().map(|(n, v)| (*n, v)))
            {
                stmt.execute(params![name, value]).map_err(&fail)?;
            }
            drop(stmt);
            conn.execute_batch("COMMIT").map_err(&fail)?;
        }
        if let Some(conn) = self.conn.take() {
            conn.close()
                .map_err(|(_, e)| sql(&path, "cannot close the bundle")(e))?;
        }
        let file = std::fs::File::open(&self.tmp).map_err(io(&path, "cannot sync the bundle"))?;
        file.sync_all()
            .map_err(io(&path, "cannot sync the bundle"))?;
        let size = file
            .metadata()
            .map_err(io(&path, "cannot read the bundle's size"))?
            .len();
        drop(file);
        self.place()?;
        Ok(size)
    }

    /// Moves the finished temporary file to the path: a rename when overwriting; else a hard
    /// link, which fails if a file appeared at the path meanwhile (then the temporary name
    /// goes). Where hard links are not supported: a check, then a rename.
    fn place(&mut self) -> Result<()> {
        let path = self.path.clone();
        if self.overwrite {
            std::fs::rename(&self.tmp, &path)
                .map_err(io(&path, "cannot move the bundle into place"))?;
        } else {
            match std::fs::hard_link(&self.tmp, &path) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.tmp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(exists(&path));
                }
                Err(_) if path.symlink_metadata().is_ok() => return Err(exists(&path)),
                Err(_) => std::fs::rename(&self.tmp, &path)
                    .map_err(io(&path, "cannot move the bundle into place"))?,
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename's durability (best effort: not every platform opens directories).
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        drop(self.conn.take());
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn exists(path: &Path) -> Error {
    fault(
        path,
        BundleFault::Exists,
        "a file is already there; choose another path, or overwrite it (--force)",
    )
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("listed")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn entry() -> StoredEntry {
        StoredEntry::new(Some(bytes::Bytes::from_static(b"v")), None, 1, 2, 3)
    }

    #[test]
    fn an_unfinished_bundle_leaves_no_file() {
        let dir = tempfile::tempdir().expect("dir");
        let mut w = BundleWriter::create(&dir.path().join("b.bundle"), false).expect("created");
        w.add("k", &entry()).expect("added");
        assert_eq!(names(dir.path()).len(), 1, "the temporary file");
        drop(w);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn a_file_that_appears_while_writing_is_never_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("b.bundle");
        let mut w = BundleWriter::create(&path, false).expect("created");
        w.add("k", &entry()).expect("added");
        std::fs::write(&path, "someone else's").expect("written");
        let e = w.finish(&[]).expect_err("refused");
        assert_eq!(e.bundle_fault(), Some(BundleFault::Exists));
        assert_eq!(std::fs::read(&path).expect("read"), b"someone else's");
        assert_eq!(
            names(dir.path()),
            ["b.bundle"],
            "the temporary file is gone"
        );
    }

    #[test]
    fn overwrite_replaces_the_file_in_one_rename() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("b.bundle");
        std::fs::write(&path, "old").expect("written");
        let mut w = BundleWriter::create(&path, true).expect("created");
        w.add("k", &entry()).expect("added");
        let size = w.finish(&[("prefix", String::new())]).expect("finished");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), size);
        assert_eq!(names(dir.path()), ["b.bundle"]);
        let read = super::super::read_bundle(&path).expect("a bundle");
        assert_eq!(read.entries, vec![("k".to_owned(), entry())]);
    }
}
