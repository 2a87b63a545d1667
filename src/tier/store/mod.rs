//! The L2 storage seam: what a backend under the cache must do, split by concern.
//!
//! * [`EntryStore`]: the cached entries (read, write, fill behind a [`FillGuard`], remove,
//!   least-recently-used touches, a summary).
//! * [`OutboxStore`]: the write-behind outbox (rows in id order, their failures, dead letters).
//! * [`StateStore`]: a few named strings shared by the processes of one database (the source's
//!   persisted circuit breaker).
//! * [`Store`]: all three, implemented for every type that implements them; what
//!   [`TieredCacheBuilder::store`](crate::TieredCacheBuilder::store) takes.
//!
//! The SQLite tier is the reference implementation. The cache wraps any store in circuit
//! breakers (a read and a write breaker): a store need not protect itself from being called
//! while it is down.
//!
//! # What every method owes the cache
//! * Failures are [`Error::Storage`]. The cache treats them as "L2 could
//!   not answer" (it goes on with L1 and the source), never as "not there"; a store must never
//!   answer `Ok(None)` for a read it could not make.
//! * A method that returns `Ok` has happened: it is visible to every later call on the store
//!   (from this process and from any other process sharing the backend), and it survives a
//!   crash of the process if the backend is durable.
//! * A method that returns `Err` has not happened, or has happened entirely: a step documented
//!   as one step (a transaction) is never left half done.
//! * The entries and the outbox live in one backend: some steps change both at once
//!   ([`OutboxStore::enqueue`], [`OutboxStore::outbox_failed`]) and some read both at once
//!   ([`EntryStore::get_many`]). This is what keeps the cache's invariants (I1 to I5, see the
//!   crate docs) across processes and crashes.
//! * Outbox row ids are assigned by the store: each [`OutboxStore::enqueue`] (from any process)
//!   gets an id higher than that of every row the outbox holds at that moment (SQLite's
//!   `INTEGER PRIMARY KEY`; a sequence does too). The outbox is ordered by id, and "newer" means
//!   a higher id.
//! * Times are milliseconds since the UNIX epoch, as given by the cache's clock; the store keeps
//!   them as given and compares them only where documented.
//! * A backend shared by several processes tells each cache what the others changed, or says
//!   nothing ([`EntryStore::invalidations`]): without it, a cache sees another process's write
//!   when its L1 copy is no longer fresh.

use async_trait::async_trait;

use crate::error::{BundleFault, Error, Result};

mod fleet;
mod rows;

pub use fleet::*;
pub use rows::*;

/// How many keys [`EntryStore::merge`]'s default implementation reads per
/// [`get_many`](EntryStore::get_many).
const MERGE_CHUNK: usize = 500;

/// The cached entries.
///
/// An entry is keyed by the cache key (a string of at most [`MAX_KEY_LEN`](crate::MAX_KEY_LEN)
/// bytes). Every write replaces the whole entry: a reader sees the old entry or the new one,
/// never a mix.
#[async_trait]
pub trait EntryStore: Send + Sync + std::fmt::Debug + 'static {
    /// The entry of `key`, or `None` when there is none. A store may leave out an entry past
    /// its [`stale_until`](StoredEntry::stale_until) (the cache ignores those).
    async fn get(&self, key: &str) -> Result<Option<StoredEntry>>;

    /// [`get`](Self::get) answered on the calling thread, for a backend that reads without
    /// waiting on anything (an embedded database): no boxed future on the L2-hit path. `None`
    /// (the default) when the read must go through `get` (a remote backend). When `Some`, it
    /// must be exactly what `get` would answer.
    fn get_now(&self, _key: &str) -> Option<Result<Option<StoredEntry>>> {
        None
    }

    /// For many keys at once, from one consistent view (one statement or snapshot): the entry
    /// of each of `keys` that has one, and for each key with pending (not dead) outbox rows,
    /// the op of its newest one ([`OutboxStore::outbox_newest`] for every key). A pending
    /// write is what its key reads as, whatever the entry says, so the two must not come from
    /// different moments. `keys` has no duplicates; it may be empty.
    async fn get_many(&self, keys: &[&str]) -> Result<Found>;

    /// Writes `key`'s entry, replacing any (a `set`, or the value of a delivered write).
    async fn put(&self, key: &str, entry: StoredEntry) -> Result<()>;

    /// A fill from the source: [`put`](Self::put), but only if `guard`
    /// [`allows`](FillGuard::allows) it, checked **in the same step as the write** against the
    /// entry held at that moment. Returns whether it was written (`Ok(false)`: the guard
    /// refused, nothing changed).
    async fn put_fill(&self, key: &str, entry: StoredEntry, guard: FillGuard) -> Result<bool>;

    /// A "not modified" answer from the source: new deadlines `(stored_at, fresh_until,
    /// stale_until)` for the entry held (its value and validator are kept), but only if `guard`
    /// [`allows`](FillGuard::allows) it, checked in the same step as the write. Returns whether
    /// an entry was renewed (`Ok(false)`: the guard refused, or there is no entry).
    async fn renew_fill(
        &self,
        key: &str,
        deadlines: (u64, u64, u64),
        guard: FillGuard,
    ) -> Result<bool>;

    /// Removes `key`'s entry, if any.
    async fn remove(&self, key: &str) -> Result<()>;

    /// Removes `key`'s entry after its outbox rows up to `settled_id` were settled (a delivered
    /// delete), unless a newer write of the key is pending (a not-dead outbox row of the key
    /// with an id above `settled_id`): checked **in the same step** as the removal, so a write
    /// that arrived meanwhile keeps its entry.
    async fn remove_settled(&self, key: &str, settled_id: i64) -> Result<()>;

    /// Records that `key` was read at `now`, for a least-recently-used size bound. Best effort:
    /// it must not wait (no I/O on the caller's thread), may be batched, dropped or ignored,
    /// and must not fail.
    fn touch(&self, key: &str, now: u64);

    /// What the store holds, counted at `now` (entries past their fresh deadline at `now` are
    /// stale), outbox included.
    async fn summary(&self, now: u64) -> Result<StoreSummary>;

    /// For a backend shared by several processes: a subscription to what *other* instances
    /// changed, which the cache applies to its L1 (it bumps each key's write fence, so a fill
    /// racing the change is refused, then drops the key; L2 is not touched, the writer changed
    /// it). `None` (the default): the backend does not publish (SQLite; a cache then sees
    /// another process's write once its L1 copy is no longer fresh).
    ///
    /// A store that returns `Some` owes the cache:
    /// * an [`Invalidation::Keys`] for every committed write of another instance that changes
    ///   what a key reads as (`put`, `remove`, `remove_settled`, `enqueue`, the dead-lettering
    ///   of `outbox_failed`, the retry of `resolve_dead_letter`, the entries `merge` writes),
    ///   sent after it committed;
    ///   fills and renewals (`put_fill`, `renew_fill`) need none (they never replace a write);
    /// * [`Invalidation::All`] whenever it cannot vouch that nothing was missed since the
    ///   store was made (a lost connection whose gap it cannot replay);
    /// * the subscription ends when the store is dropped or stops publishing for good.
    ///
    /// Called once by each cache built on the store, from within a Tokio runtime.
    fn invalidations(&self) -> Option<Invalidations> {
        None
    }

    /// For a backend shared by several processes: takes the lease on loading `key` from the
    /// source for `lease` (fleet-wide single-flight), unless another instance holds a live
    /// one ([`FillLease::Busy`]), decided atomically: two instances asking at once never
    /// both hold it. A lease that runs out (its holder died or hangs) may be taken by anyone,
    /// with a new, higher token. The cache holds it around the source call
    /// and the fill, then releases it; instances that found it busy wait for the fill in L2.
    /// Default: [`FillLease::Unsupported`] (no lease; single-flight within the process only).
    async fn fill_lease(&self, key: &str, lease: std::time::Duration) -> Result<FillLease> {
        let _ = (key, lease);
        Ok(FillLease::Unsupported)
    }

    /// Releases `key`'s lease if it is still the one granted with `token` (a lease that ran
    /// out and was taken by another instance is left alone). Default: nothing.
    async fn release_fill_lease(&self, key: &str, token: u64) -> Result<()> {
        let _ = (key, token);
        Ok(())
    }

    /// Every entry whose key starts with `prefix` (`""`: all) and has **no pending** (not
    /// dead) outbox row, in key order, from **one consistent view** (one read transaction or
    /// snapshot), each given to `sink`; an entry past its stale deadline may be left out. What
    /// [`TieredCache::export`](crate::TieredCache::export) writes into an offline bundle.
    ///
    /// The default fails with [`Error::Bundle`] ([`BundleFault::Unsupported`]): the other
    /// methods cannot list a store's keys. The SQLite tier implements it with one read
    /// transaction on a connection of its own, on a blocking thread; the PostgreSQL store with
    /// one `REPEATABLE READ, READ ONLY` transaction and a cursor in key byte order.
    async fn snapshot(&self, prefix: &str, sink: EntrySink) -> Result<()> {
        let _ = (prefix, sink);
        Err(Error::Bundle {
            path: std::path::PathBuf::new(),
            fault: BundleFault::Unsupported,
            message: format!(
                "this L2 store ({}) cannot list its entries: it does not implement EntryStore::snapshot",
                std::any::type_name::<Self>()
            ),
            source: None,
        })
    }

    /// Writes entries from an offline bundle
    /// ([`TieredCache::import`](crate::TieredCache::import)), each only where it is newer than
    /// what the store holds: an entry is written when its key has **no pending** (not dead)
    /// outbox row ([`Merged::KeptPending`]) and holds no entry with a `stored_at` as high or
    /// higher ([`Merged::KeptNewer`]). Returns what became of each entry, in order. `entries`
    /// has no key twice.
    ///
    /// A store should make the whole merge **one step** (one transaction: all of it or none);
    /// the SQLite tier does. The default reads the keys in chunks with
    /// [`get_many`](Self::get_many) and writes each entry with [`put_fill`](Self::put_fill)
    /// behind the entry it saw (a compare-and-set per key): a write that came meanwhile wins,
    /// but a failure part-way leaves the entries before it written, and a write-behind
    /// *delete* of a key with no entry, enqueued by another process between the read and the
    /// write, is not seen (a store sharing its outbox between processes should override this).
    /// A store that tells other instances about writes (invalidations) should announce merged
    /// entries as writes: the default writes them with `put_fill`, which such a store may
    /// treat as a fill and not announce, leaving other instances' L1 copies until their TTL.
    async fn merge(&self, entries: Vec<(String, StoredEntry)>) -> Result<Vec<Merged>> {
        let mut merged = Vec::with_capacity(entries.len());
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<(String, StoredEntry)> = entries.by_ref().take(MERGE_CHUNK).collect();
            let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
            let found = self.get_many(&keys).await?;
            let pending: std::collections::HashSet<&str> =
                found.pending.iter().map(|(k, _)| k.as_str()).collect();
            let held: std::collections::HashMap<&str, u64> = found
                .entries
                .iter()
                .map(|(k, e)| (k.as_str(), e.stored_at))
                .collect();
            for (key, entry) in &chunk {
                let held_at = held.get(key.as_str()).copied();
                let outcome = if pending.contains(key.as_str()) {
                    Merged::KeptPending
                } else if held_at.is_some_and(|t| t >= entry.stored_at) {
                    Merged::KeptNewer
                } else {
                    let guard = FillGuard {
                        observed: held_at.map_or(Observed::Absent, Observed::StoredAt),
                        still_valid: Box::new(|| true),
                    };
                    match self.put_fill(key, entry.clone(), guard).await? {
                        true => Merged::Written,
                        false => Merged::KeptNewer,
                    }
                };
                merged.push(outcome);
            }
        }
        Ok(merged)
    }
}

/// The write-behind outbox: writes acknowledged to the caller, waiting to be delivered to the
/// source, and the dead letters (writes the source refused for good).
///
/// Rows are ordered by id ([`OutboxRow::id`]); a row is *pending* while not
/// [`dead`](OutboxRow::dead). The entries it changes are the [`EntryStore`]'s of the same
/// backend.
#[async_trait]
pub trait OutboxStore: Send + Sync + std::fmt::Debug + 'static {
    /// A write-behind write, **in one step** (one transaction): writes `key`'s entry (`Some`)
    /// or removes it (`None`); marks every dead letter of `key`
    /// [`superseded`](OutboxRow::superseded) (this write is newer); and appends a pending row
    /// ([`OutboxRow::new`]`(id, key, op, now)`) with a new id, higher than that of every row
    /// the outbox holds.
    /// Returns that id. If this returns `Err`, none of it happened: the write is refused, and
    /// nothing of it may be read or delivered later.
    async fn enqueue(
        &self,
        key: &str,
        entry: Option<StoredEntry>,
        op: OutboxOp,
        now: u64,
    ) -> Result<i64>;

    /// Pending (not dead) rows, oldest (lowest id) first, at most `limit` of them, whatever
    /// their `next_attempt` (the cache decides when to attempt): the rows this cache may
    /// deliver now. A backend drained by several processes at once may return only the rows
    /// it claimed for this one (for a lease), and then must never return a row of a key while
    /// an older pending row of that key is another process's to deliver (per-key order, I5).
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>>;

    /// The op of `key`'s newest (highest id) pending row: what `key` reads as until it is
    /// delivered. `None` when the key has no pending row.
    async fn outbox_newest(&self, key: &str) -> Result<Option<OutboxOp>>;

    /// How many rows are pending, and the keys of the pending rows that have a
    /// [`last_error`](OutboxRow::last_error), each with that error: in id order, each key once
    /// (its oldest such row). Made without reading any value.
    async fn outbox_summary(&self) -> Result<(u64, Vec<(String, String)>)>;

    /// Deletes these rows (delivered, or coalesced into a delivered newer row of their key), if
    /// they are still pending: a row that became a dead letter meanwhile stays. Ids that do not
    /// exist are ignored.
    async fn outbox_complete(&self, ids: Vec<i64>) -> Result<()>;

    /// Records a failed attempt on those of these rows still pending: `attempts` + 1,
    /// `next_attempt`, `last_error` = `error`, and `dead` if `dead`. With `dead` (the source
    /// refused for good), **in the same step**:
    /// * each of these rows that has a newer row of its key (any row, dead or not, with a
    ///   higher id) is marked [`superseded`](OutboxRow::superseded);
    /// * the entry of each of their keys is removed, unless that key has a pending row newer
    ///   than the highest of `ids` (the source's value stands: I1; a newer write keeps its
    ///   entry).
    async fn outbox_failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()>;

    /// The dead letters, oldest (lowest id) first.
    async fn dead_letters(&self) -> Result<Vec<OutboxRow>>;

    /// The dead letter `id`: with `retry`, back to pending (`dead` cleared, `attempts` and
    /// `next_attempt` reset to 0, its id kept) and its key's entry removed (what was cached
    /// while the write was dead is the source's answer, which the pending write overrides: I1),
    /// unless it is superseded ([`Resolved::Superseded`], unchanged); without, deleted. Checked
    /// and changed in one step. [`Resolved::Missing`] when no dead letter has this id.
    async fn resolve_dead_letter(&self, id: i64, retry: bool) -> Result<Resolved>;

    /// Marks every dead letter of `key` [`superseded`](OutboxRow::superseded): a newer write
    /// of the key reached the source (a write-through write).
    async fn supersede_dead(&self, key: &str) -> Result<()>;
}

/// A few named strings shared by every process of one backend (today: the source's circuit
/// breaker, as JSON, so processes sharing the store share one breaker).
#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug + 'static {
    /// The value named `name`, or `None`.
    async fn load_meta(&self, name: &str) -> Result<Option<String>>;

    /// Replaces the value named `name` with `update(old)` **atomically**: no other update of
    /// `name` (from any process) runs between the read of `old` and the write. `update` is
    /// called exactly once when this returns `Ok` (at most once otherwise) and must not block;
    /// `None` removes the value. Returns the value written.
    async fn update_meta(&self, name: &str, update: MetaUpdate) -> Result<Option<String>>;
}

/// An L2 backend: entries, outbox and shared state in one place. Implemented for every type
/// that implements the three traits; give one to
/// [`TieredCacheBuilder::store`](crate::TieredCacheBuilder::store).
pub trait Store: EntryStore + OutboxStore + StateStore {}

impl<T: EntryStore + OutboxStore + StateStore + ?Sized> Store for T {}
