//! [`EntryStore::merge`](crate::tier::EntryStore::merge) on PostgreSQL: entries from an offline
//! bundle written where they are newer, checked and written under the keys' locks, and
//! published to the fleet as the writes they are.

use std::collections::{HashMap, HashSet};

use super::schema::storage;
use super::store::{lock, put_entry};
use super::{to_u64, PostgresStore};
use crate::error::Result;
use crate::tier::{Merged, StoredEntry};

/// Entries per transaction: the keys' advisory locks are held to its end, and PostgreSQL's
/// lock table is shared and bounded (`max_locks_per_transaction`).
const CHUNK: usize = 500;

impl PostgresStore {
    /// Each chunk of entries in one transaction: the keys locked (in hash order), their entries
    /// and pending outbox rows read (the `get_many` statement), the newer entries written
    /// ([`Merged::Written`]), the others left ([`Merged::KeptPending`], [`Merged::KeptNewer`]),
    /// the written keys published. A failure part-way leaves the chunks before it written.
    pub(super) async fn merge_entries(
        &self,
        entries: Vec<(String, StoredEntry)>,
    ) -> Result<Vec<Merged>> {
        let mut merged = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(CHUNK) {
            merged.extend(self.merge_chunk(chunk).await?);
        }
        Ok(merged)
    }

    async fn merge_chunk(&self, chunk: &[(String, StoredEntry)]) -> Result<Vec<Merged>> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            let locks: Vec<String> = chunk.iter().map(|(k, _)| self.sql.key_lock(k)).collect();
            lock(&tx, &locks).await?;
            let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
            let st = tx.prepare_cached(&self.sql.get_many).await?;
            let (mut held, mut pending) = (HashMap::new(), HashSet::new());
            for r in tx.query(&st, &[&keys]).await? {
                let key: String = r.try_get(0)?;
                // `kind` 0: the entry (its `stored_at`); otherwise a pending write.
                if r.try_get::<_, i32>(6)? == 0 {
                    held.insert(key, to_u64(r.try_get(3)?));
                } else {
                    pending.insert(key);
                }
            }
            let upsert = tx.prepare_cached(&self.sql.upsert).await?;
            let (mut outcomes, mut written) = (Vec::with_capacity(chunk.len()), Vec::new());
            for (key, entry) in chunk {
                let outcome = if pending.contains(key) {
                    Merged::KeptPending
                } else if held.get(key).is_some_and(|&t| t >= entry.stored_at) {
                    Merged::KeptNewer
                } else {
                    put_entry(&tx, &upsert, key, entry).await?;
                    written.push(key.as_str());
                    Merged::Written
                };
                outcomes.push(outcome);
            }
            if !written.is_empty() {
                let st = tx.prepare_cached(&self.sql.publish).await?;
                self.publish(&tx, &st, &written).await?;
            }
            tx.commit().await.map(|()| outcomes)
        };
        run.await.map_err(|e| storage("merge entries", e))
    }
}
