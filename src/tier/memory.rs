//! L1: memory, a `moka::future::Cache` bounded by bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

use crate::clock::{now_millis, Clock};
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

/// Expires an entry at its stale deadline, read from the injected clock when it is inserted.
/// Correctness never depends on this (reads check deadlines against the clock); it only returns
/// memory.
struct StaleDeadline {
    clock: Arc<dyn Clock>,
}

impl StaleDeadline {
    fn remaining(&self, entry: &Entry) -> Option<Duration> {
        let now = now_millis(self.clock.as_ref());
        Some(Duration::from_millis(entry.stale_until.saturating_sub(now)))
    }
}

impl Expiry<String, Arc<Entry>> for StaleDeadline {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        self.remaining(value)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.remaining(value)
    }
}

impl MemoryTier {
    pub(crate) fn new(max_bytes: u64, clock: Arc<dyn Clock>) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, entry: &Arc<Entry>| -> u32 {
                u32::try_from(key.len() + entry.size() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(StaleDeadline { clock })
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
