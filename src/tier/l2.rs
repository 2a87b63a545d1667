//! The cache's handle on L2: the guarded store ([`Guarded`] over any [`Store`]), spoken to in
//! the crate's own [`Entry`] (which carries the decoded-value slot L1 needs) instead of the
//! public [`StoredEntry`]. The conversions only move fields.

use std::sync::Arc;

use super::guarded::Guarded;
use super::{EntryStore, FillGuard, OutboxOp, StoreSummary, StoredEntry};
use crate::entry::Entry;
use crate::error::Result;

/// What [`L2::get_many`] found, as the crate's entries.
#[derive(Debug, Default)]
pub(crate) struct FoundEntries {
    pub(crate) entries: Vec<(String, Entry)>,
    pub(crate) pending: Vec<(String, OutboxOp)>,
}

/// L2 as the cache reads and writes entries (the outbox goes through `DurableQueue`, the shared
/// state through the source guard).
#[derive(Debug, Clone)]
pub(crate) struct L2 {
    store: Arc<Guarded>,
}

impl L2 {
    pub(crate) fn new(store: Arc<Guarded>) -> Self {
        Self { store }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Entry>> {
        Ok(self.store.get(key).await?.map(Entry::from))
    }

    #[inline]
    pub(crate) fn get_now(&self, key: &str) -> Option<Result<Option<Entry>>> {
        self.store
            .get_now(key)
            .map(|found| found.map(|e| e.map(Entry::from)))
    }

    pub(crate) async fn get_many(&self, keys: &[&str]) -> Result<FoundEntries> {
        let found = self.store.get_many(keys).await?;
        Ok(FoundEntries {
            entries: found
                .entries
                .into_iter()
                .map(|(k, e)| (k, Entry::from(e)))
                .collect(),
            pending: found.pending,
        })
    }

    pub(crate) async fn put(&self, key: &str, entry: Entry) -> Result<()> {
        self.store.put(key, StoredEntry::from(entry)).await
    }

    pub(crate) async fn put_fill(&self, key: &str, entry: Entry, guard: FillGuard) -> Result<bool> {
        self.store
            .put_fill(key, StoredEntry::from(entry), guard)
            .await
    }

    pub(crate) async fn renew_fill(
        &self,
        key: &str,
        deadlines: (u64, u64, u64),
        guard: FillGuard,
    ) -> Result<bool> {
        self.store.renew_fill(key, deadlines, guard).await
    }

    pub(crate) async fn fill_lease(
        &self,
        key: &str,
        lease: std::time::Duration,
    ) -> Result<super::FillLease> {
        self.store.fill_lease(key, lease).await
    }

    pub(crate) async fn release_fill_lease(&self, key: &str, token: u64) -> Result<()> {
        self.store.release_fill_lease(key, token).await
    }

    pub(crate) async fn remove(&self, key: &str) -> Result<()> {
        self.store.remove(key).await
    }

    pub(crate) async fn remove_settled(&self, key: &str, settled_id: i64) -> Result<()> {
        self.store.remove_settled(key, settled_id).await
    }

    #[inline]
    pub(crate) fn touch(&self, key: &str, now: u64) {
        self.store.touch(key, now);
    }

    pub(crate) async fn summary(&self, now: u64) -> Result<StoreSummary> {
        self.store.summary(now).await
    }
}
