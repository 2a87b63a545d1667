//! The SQLite tier's part of offline bundles ([`crate::bundle`]): the snapshot an export reads
//! (one read transaction on a connection of its own) and the merge an import writes (one
//! transaction of the writer).

use std::path::Path;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags};

use super::changes::put_entry;
use super::{storage, to_i64, to_u64, Location, SqliteTier};
use crate::error::{Error, Result};
use crate::tier::{EntrySink, Merged, StoredEntry};

/// The entries of keys starting with `prefix` (a range of the primary key's index, then a
/// check of the prefix), without a pending outbox row, in key order.
const SNAPSHOT: &str = "SELECT key, value, validator, stored_at, fresh_until, stale_until
     FROM entries
     WHERE key >= ?1
       AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.key = entries.key AND outbox.dead = 0)
     ORDER BY key";

/// Reads the snapshot on `conn` inside one read transaction, giving each entry to `sink`.
fn snapshot_on(conn: &Connection, prefix: &str, sink: &mut EntrySink) -> Result<()> {
    let fail = |e| Error::storage("read the entries for a bundle", e);
    // One read transaction: every row comes from the same moment, whatever the writer does.
    conn.execute_batch("BEGIN").map_err(&fail)?;
    let out = (|| -> Result<()> {
        let mut stmt = conn.prepare(SNAPSHOT).map_err(&fail)?;
        let mut rows = stmt.query([prefix]).map_err(&fail)?;
        while let Some(r) = rows.next().map_err(&fail)? {
            let key: String = r.get(0).map_err(&fail)?;
            if !key.starts_with(prefix) {
                break;
            }
            let value: Option<Vec<u8>> = r.get(1).map_err(&fail)?;
            let entry = StoredEntry::new(
                value.map(Bytes::from),
                r.get(2).map_err(&fail)?,
                to_u64(r.get(3).map_err(&fail)?),
                to_u64(r.get(4).map_err(&fail)?),
                to_u64(r.get(5).map_err(&fail)?),
            );
            sink(key, entry)?;
        }
        Ok(())
    })();
    // Only a read: ending it cannot lose anything.
    let _ = conn.execute_batch("COMMIT");
    out
}

/// A read-only connection of its own to the database file, for the snapshot.
fn open_snapshot_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(storage("open a connection for the bundle's snapshot"))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(storage("configure the snapshot's connection"))?;
    Ok(conn)
}

impl SqliteTier {
    /// [`EntryStore::snapshot`](crate::tier::EntryStore::snapshot): for a database file, on a
    /// blocking thread with a read-only connection of its own (WAL: the writer and the readers
    /// go on meanwhile); for a memory database (tests), on a read connection of the pool on
    /// this thread (a shared-cache memory database reads without isolation).
    pub(super) async fn snapshot_entries(&self, prefix: &str, mut sink: EntrySink) -> Result<()> {
        match &self.location {
            Location::File(path) => {
                let (path, prefix) = (path.clone(), prefix.to_owned());
                tokio::task::spawn_blocking(move || {
                    let conn = open_snapshot_connection(&path)?;
                    snapshot_on(&conn, &prefix, &mut sink)
                })
                .await
                .map_err(Error::stopped("the bundle's snapshot"))?
            }
            Location::Memory => {
                let mut out = Ok(());
                self.read(|conn| {
                    out = snapshot_on(conn, prefix, &mut sink);
                    Ok(())
                })
                .map_err(storage("read the entries for a bundle"))?;
                out
            }
        }
    }

    /// [`EntryStore::merge`](crate::tier::EntryStore::merge) in one job of the writer,
    /// every entry is decided and written, or (on an error) none is.
    pub(super) async fn merge_entries(
        &self,
        entries: Vec<(String, StoredEntry)>,
    ) -> Result<Vec<Merged>> {
        self.write(move |conn, state| {
            let mut merged = Vec::with_capacity(entries.len());
            for (key, entry) in &entries {
                let pending: bool = conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM outbox WHERE key = ?1 AND dead = 0)",
                    )?
                    .query_row([key], |r| r.get(0))?;
                if pending {
                    merged.push(Merged::KeptPending);
                    continue;
                }
                let held: Option<i64> = rusqlite::OptionalExtension::optional(
                    conn.prepare_cached("SELECT stored_at FROM entries WHERE key = ?1")?
                        .query_row([key], |r| r.get(0)),
                )?;
                if held.is_some_and(|t| t >= to_i64(entry.stored_at)) {
                    merged.push(Merged::KeptNewer);
                    continue;
                }
                put_entry(conn, state, key, entry)?;
                merged.push(Merged::Written);
            }
            Ok(merged)
        })
        .await
    }
}
