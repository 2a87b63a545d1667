//! Reading a bundle: every check made before anything is written (type, version, integrity,
//! tables, every row decoded), on a read-only connection.

use std::path::Path;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags};

use super::{fault, io, sql, BUNDLE_APPLICATION_ID, BUNDLE_VERSION, ENTRY_COLUMNS};
use crate::error::{BundleFault, Result};
use crate::tier::StoredEntry;

/// A bundle read and checked whole.
#[derive(Debug)]
pub(crate) struct Bundle {
    /// Its entries in key order, each key once.
    pub(crate) entries: Vec<(String, StoredEntry)>,
}

/// Reads and checks the bundle at `path`, opened read-only (never changed). Blocking.
///
/// # Errors
/// [`Error::Bundle`]: [`BundleFault::Missing`], [`NotSqlite`](BundleFault::NotSqlite),
/// [`Foreign`](BundleFault::Foreign), [`Newer`](BundleFault::Newer),
/// [`Corrupt`](BundleFault::Corrupt), [`InvalidRow`](BundleFault::InvalidRow),
/// [`Io`](BundleFault::Io).
pub(crate) fn read_bundle(path: &Path) -> Result<Bundle> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(fault(path, BundleFault::Missing, "not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fault(path, BundleFault::Missing, "no such file"))
        }
        Err(e) => return Err(io(path, "cannot read the bundle")(e)),
    }
    let mut header = Vec::with_capacity(16);
    {
        use std::io::Read as _;
        let f = std::fs::File::open(path).map_err(io(path, "cannot read the bundle"))?;
        f.take(16)
            .read_to_end(&mut header)
            .map_err(io(path, "cannot read the bundle"))?;
    }
    if header != b"SQLite format 3\0" {
        return Err(fault(
            path,
            BundleFault::NotSqlite,
            "not a SQLite database, so not a tiercache bundle",
        ));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(path, "cannot open the bundle"))?;
    let fail = sql(path, "cannot read the bundle");
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(&fail)?;
    if app_id == crate::tier::sqlite::APPLICATION_ID {
        return Err(fault(
            path,
            BundleFault::Foreign,
            "this is a tiercache cache database, not a bundle (`tiercache export FILE` makes a bundle of one)",
        ));
    }
    if app_id != BUNDLE_APPLICATION_ID {
        return Err(fault(
            path,
            BundleFault::Foreign,
            format!(
                "a SQLite database of another application (application_id {app_id:#x}; a bundle's is {BUNDLE_APPLICATION_ID:#x})"
            ),
        ));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&fail)?;
    if version > BUNDLE_VERSION {
        return Err(fault(
            path,
            BundleFault::Newer,
            format!("bundle format {version}, newer than this tiercache reads ({BUNDLE_VERSION}): upgrade tiercache"),
        ));
    }
    if version < 1 {
        return Err(fault(
            path,
            BundleFault::Corrupt,
            format!("bundle format {version} does not exist"),
        ));
    }
    check_integrity(&conn, path)?;
    check_columns(&conn, path)?;
    let entries = read_entries(&conn, path)?;
    let counted: Option<String> = rusqlite::OptionalExtension::optional(conn.query_row(
        "SELECT value FROM bundle WHERE name = 'entries'",
        [],
        |r| r.get(0),
    ))
    .map_err(&fail)?;
    if let Some(counted) = counted {
        if counted.parse::<usize>().ok() != Some(entries.len()) {
            return Err(fault(
                path,
                BundleFault::Corrupt,
                format!(
                    "it says it holds {counted} entries but holds {}",
                    entries.len()
                ),
            ));
        }
    }
    Ok(Bundle { entries })
}

fn check_integrity(conn: &Connection, path: &Path) -> Result<()> {
    let found: Vec<String> = conn
        .prepare("PRAGMA quick_check(10)")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(sql(path, "cannot check the bundle"))?;
    if found.len() == 1 && found[0] == "ok" {
        return Ok(());
    }
    Err(fault(
        path,
        BundleFault::Corrupt,
        format!("damaged: {}", found.join("; ")),
    ))
}

fn check_columns(conn: &Connection, path: &Path) -> Result<()> {
    let columns = |table: &str| -> Result<Vec<String>> {
        conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(sql(path, "cannot read the bundle's tables"))
    };
    let entries = columns("entries")?;
    let missing: Vec<&str> = ENTRY_COLUMNS
        .iter()
        .copied()
        .filter(|c| !entries.iter().any(|e| e == c))
        .collect();
    if !missing.is_empty() || columns("bundle")?.is_empty() {
        return Err(fault(
            path,
            BundleFault::Corrupt,
            format!(
                "its tables are not a bundle's (entries lacks [{}], or there is no bundle table)",
                missing.join(", ")
            ),
        ));
    }
    Ok(())
}

fn read_entries(conn: &Connection, path: &Path) -> Result<Vec<(String, StoredEntry)>> {
    let fail = sql(path, "cannot read the bundle's entries");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {} FROM entries ORDER BY key COLLATE BINARY",
            ENTRY_COLUMNS.join(", ")
        ))
        .map_err(&fail)?;
    let mut rows = stmt.query([]).map_err(&fail)?;
    let mut entries: Vec<(String, StoredEntry)> = Vec::new();
    let mut n = 0usize;
    while let Some(r) = rows.next().map_err(&fail)? {
        n += 1;
        let bad = |what: String| fault(path, BundleFault::InvalidRow, format!("row {n}: {what}"));
        let decoded = (|| -> rusqlite::Result<_> {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?,
                r.get::<_, Option<String>>(2)?,
                [
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ],
            ))
        })();
        let (key, value, validator, times) = decoded.map_err(|e| bad(e.to_string()))?;
        crate::key::validate(&key).map_err(|e| bad(format!("key {key:?}: {e}")))?;
        let times: Vec<u64> = times
            .iter()
            .map(|t| u64::try_from(*t))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("key {key:?}: a negative deadline")))?;
        // In key order: a key twice would be next to itself.
        if entries.last().is_some_and(|(k, _)| *k == key) {
            return Err(bad(format!("key {key:?} appears twice")));
        }
        entries.push((
            key,
            StoredEntry::new(
                value.map(Bytes::from),
                validator,
                times[0],
                times[1],
                times[2],
            ),
        ));
    }
    Ok(entries)
}
