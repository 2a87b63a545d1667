//! L1: memory, a `moka::future::Cache` bounded by bytes, with an optional maximum age.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moka::future::Cache;

use crate::clock::Clock;
use crate::entry::Entry;

/// Per-entry overhead counted against the byte bound besides key and value: moka's node, the
/// `Arc<Entry>` and its fields.
const ENTRY_OVERHEAD: usize = 160;

/// An entry in L1 and when it was put there (ms of the cache's clock; 0 when no maximum age
/// was set then).
#[derive(Clone)]
struct Slot {
    entry: Arc<Entry>,
    since: u64,
}

/// The maximum L1 age: a copy put into L1 longer ago than this is not served from L1 (a read
/// goes on to L2, as after a miss). Checked against the cache's clock, so tests inject it.
#[derive(Debug)]
struct MaxAge {
    /// Milliseconds; 0: off.
    ms: AtomicU64,
    clock: Arc<dyn Clock>,
}

/// The memory tier.
#[derive(Clone)]
pub(crate) struct MemoryTier {
    cache: Cache<String, Slot, foldhash::fast::RandomState>,
    max_age: Arc<MaxAge>,
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
    ///
    /// The maximum L1 age ([`set_max_age`](Self::set_max_age)) is checked on read too, against
    /// `clock` (moka's own clock cannot be injected): off until set.
    ///
    /// moka hashes keys with foldhash, randomly seeded per cache, not its default SipHash: a
    /// hit hashes its key once, and SipHash cost about 200 of an L1 hit's 1,620 instructions
    /// against foldhash's 50 (callgrind, 22-byte keys). Keys chosen to collide in moka's table
    /// would need the seed.
    pub(crate) fn new(max_bytes: u64, clock: Arc<dyn Clock>) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, slot: &Slot| -> u32 {
                u32::try_from(key.len() + slot.entry.size() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        let max_age = Arc::new(MaxAge {
            ms: AtomicU64::new(0),
            clock,
        });
        Self { cache, max_age }
    }

    /// Sets the maximum L1 age (`None`: off) for this tier and all its clones. A copy put into
    /// L1 while it was off counts as put there at time 0 (too old once it is on).
    pub(crate) fn set_max_age(&self, max_age: Option<std::time::Duration>) {
        let ms = max_age.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.max_age.ms.store(ms, Ordering::Relaxed);
    }

    /// The copy of `key`, unless it is older in L1 than the maximum age at `now` (the caller's
    /// reading of the cache's clock; then `None`, as a miss: the read goes on to L2). The hot
    /// path: one relaxed load when no maximum is set, and no second clock read when one is.
    #[inline]
    pub(crate) async fn get(&self, key: &str, now: u64) -> Option<Arc<Entry>> {
        let slot = self.cache.get(key).await?;
        let max = self.max_age.ms.load(Ordering::Relaxed);
        if max != 0 && now.saturating_sub(slot.since) >= max {
            return None;
        }
        Some(slot.entry)
    }

    /// Puts `entry` in as `key`'s copy. `key` as a `String` is kept as is; as a `&str` it is
    /// copied.
    pub(crate) async fn insert(&self, key: impl Into<String>, entry: Arc<Entry>) {
        let since = match self.max_age.ms.load(Ordering::Relaxed) {
            0 => 0,
            _ => self.max_age.clock.now_millis(),
        };
        self.cache.insert(key.into(), Slot { entry, since }).await;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::MockClock;

    fn entry() -> Arc<Entry> {
        Arc::new(Entry::new(Some("v".into()), None, 0, u64::MAX, u64::MAX))
    }

    #[tokio::test]
    async fn a_copy_older_in_l1_than_the_maximum_age_is_not_served() {
        let clock = MockClock::new();
        let l1 = MemoryTier::new(1 << 20, Arc::new(clock.clone()));
        l1.set_max_age(Some(Duration::from_secs(60)));
        l1.insert("k", entry()).await;
        clock.advance(Duration::from_millis(59_999));
        assert!(
            l1.get("k", clock.now_millis()).await.is_some(),
            "younger than the maximum age"
        );
        clock.advance(Duration::from_millis(1));
        assert!(
            l1.get("k", clock.now_millis()).await.is_none(),
            "60 s in L1: not served"
        );
        // Put in again (a re-read of L2): served again, for another 60 s.
        l1.insert("k", entry()).await;
        assert!(l1.get("k", clock.now_millis()).await.is_some());
    }

    #[tokio::test]
    async fn without_a_maximum_age_a_copy_is_served_whatever_its_age() {
        let clock = MockClock::new();
        let l1 = MemoryTier::new(1 << 20, Arc::new(clock.clone()));
        l1.insert("k", entry()).await;
        clock.advance(Duration::from_secs(365 * 24 * 3600));
        assert!(l1.get("k", clock.now_millis()).await.is_some());
        // Turned on later: a copy put in while it was off counts as too old.
        l1.set_max_age(Some(Duration::from_secs(60)));
        assert!(l1.get("k", clock.now_millis()).await.is_none());
    }
}
