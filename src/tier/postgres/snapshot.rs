//! [`EntryStore::snapshot`](crate::tier::EntryStore::snapshot) on PostgreSQL: what
//! [`TieredCache::export`](crate::TieredCache::export) writes into an offline bundle.
//!
//! One `REPEATABLE READ, READ ONLY` transaction on a pooled connection: every page comes from
//! the snapshot taken by its first statement, whatever the fleet writes meanwhile. The rows
//! are read through a cursor ordered by key in byte order (`COLLATE "C"`, the order SQLite's
//! `BINARY` collation gives, whatever the database's collation), [`PAGE`] rows per `FETCH`,
//! so an export of any size holds one page in memory. Each page is handed to the sink on a
//! blocking thread (the sink writes the bundle file).
//!
//! Left out, as on SQLite (`src/tier/sqlite/bundle.rs`): the entries of keys with a pending
//! (not dead) outbox row. Negative entries and entries past their stale deadline are given to
//! the sink, which counts and skips them (the export's report says how many). The prefix is
//! matched with `starts_with(key, $1)`: no `LIKE` pattern, so `%` and `_` in a prefix are
//! plain characters.

use super::schema::storage;
use super::store::Pg;
use super::{rows::row_to_entry, PostgresStore};
use crate::error::{Error, Result};
use crate::tier::{EntrySink, StoredEntry};

/// Rows per `FETCH`.
const PAGE: usize = 500;

/// The cursor's query (`{s}`: the quoted schema): the entries of keys starting with `$1`
/// without a pending outbox row, in byte order of the key.
const DECLARE: &str = "DECLARE tiercache_snapshot NO SCROLL CURSOR FOR
    SELECT key, value, validator, stored_at, fresh_until, stale_until
    FROM {s}.entries AS e
    WHERE starts_with(e.key, $1::text)
      AND NOT EXISTS (SELECT 1 FROM {s}.outbox AS o WHERE o.key = e.key AND NOT o.dead)
    ORDER BY e.key COLLATE \"C\"";

impl PostgresStore {
    /// Streams the snapshot to `sink`, one page at a time (see the module docs).
    pub(super) async fn snapshot_entries(&self, prefix: &str, sink: EntrySink) -> Result<()> {
        let mut client = self.client().await?;
        let declare = DECLARE.replace("{s}", &format!("\"{}\"", self.schema));
        let fetch = format!("FETCH {PAGE} FROM tiercache_snapshot");
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| storage("begin the bundle's snapshot", e))?;
        tx.execute(declare.as_str(), &[&prefix])
            .await
            .map_err(|e| storage("open the bundle's snapshot", e))?;
        let mut sink = Some(sink);
        loop {
            let rows = tx
                .query(fetch.as_str(), &[])
                .await
                .map_err(|e| storage("read the entries for a bundle", e))?;
            if rows.is_empty() {
                break;
            }
            let page = rows
                .iter()
                .map(|r| Ok((r.try_get::<_, String>(0)?, row_to_entry(r, 1)?)))
                .collect::<Result<Vec<(String, StoredEntry)>, Pg>>()
                .map_err(|e| storage("decode the entries for a bundle", e))?;
            let Some(mut give) = sink.take() else {
                break;
            };
            // The sink writes a file: off the runtime's threads.
            let done = tokio::task::spawn_blocking(move || {
                let out = page.into_iter().try_for_each(|(k, e)| give(k, e));
                (give, out)
            })
            .await
            .map_err(Error::stopped("the bundle's snapshot"))?;
            sink = Some(done.0);
            done.1?;
            if rows.len() < PAGE {
                break;
            }
        }
        // Only a read: ending it cannot lose anything (dropping `tx` rolls it back).
        tx.commit()
            .await
            .map_err(|e| storage("end the bundle's snapshot", e))
    }
}
