//! L1: memory, a `moka::future::Cache` bounded by bytes.

use std::sync::Arc;

use moka::future::Cache;

use crate::entry::Entry;

/// Per-entry overhead counted against the byte bound besides key and value: moka's node, the
/// `Arc<Entry>` and its fields.
const ENTRY_OVERHEAD: usize = 160;

/// The memory tier.
#[derive(Clone)]
pub(crate) struct MemoryTier {
    cache: Cache<String, Arc<Entry>>,
}

impl std::fmt::Debug for MemoryTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTier")
            .field("entries", &self.cache.entry_count())
            .field("weighted_size", &self.cache.weighted_size())
            .finish()
    }
}

impl MemoryTier {
    /// A memory tier of `max_bytes`.
    ///
    /// No expiry: every read checks the entry's own deadlines against the cache's clock, and
    /// drops an entry found past its stale deadline; the byte bound evicts the rest. A per-entry
    /// expiry policy in moka cost about a fifth of an L1 hit, and even one time-to-live for all
    /// entries a few percent (callgrind), for nothing the deadline checks do not already do.
    pub(crate) fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, entry: &Arc<Entry>| -> u32 {
                u32::try_from(key.len() + entry.size() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .build();
        Self { cache }
    }

    /// moka's own future, not wrapped in another: this is the hot path.
    #[inline]
    pub(crate) fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> impl std::future::Future<Output = Option<Arc<Entry>>> + 'a {
        self.cache.get(key)
    }

    pub(crate) async fn insert(&self, key: &str, entry: Arc<Entry>) {
        self.cache.insert(key.to_owned(), entry).await;
    }

    pub(crate) async fn remove(&self, key: &str) {
        self.cache.invalidate(key).await;
    }

    /// Drops every entry. moka invalidates at once (reads miss) and removes lazily; this also
    /// runs its maintenance until the entries are gone, so their memory is returned now.
    pub(crate) async fn clear(&self) {
        self.cache.invalidate_all();
        for _ in 0..64 {
            self.cache.run_pending_tasks().await;
            if self.cache.entry_count() == 0 {
                break;
            }
        }
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    pub(crate) fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub(crate) async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }
}
