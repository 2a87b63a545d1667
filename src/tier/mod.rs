//! The tiers below the strategy: `memory` (L1, moka) is a concrete type on the hot path; L2 sits
//! behind the `Store` trait so a second backend (PostgreSQL, Redis) can follow the SQLite one.

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::entry::Entry;
use crate::error::Result;

pub(crate) mod fence;
pub(crate) mod guarded;
pub(crate) mod memory;
pub mod sqlite;

/// A write waiting in the write-behind outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OutboxOp {
    /// Write these bytes.
    Put(Bytes),
    /// Delete the key (a tombstone).
    Delete,
}

impl OutboxOp {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            OutboxOp::Put(_) => "put",
            OutboxOp::Delete => "delete",
        }
    }
}

/// One row of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxRow {
    pub(crate) id: i64,
    pub(crate) key: String,
    pub(crate) op: OutboxOp,
    pub(crate) created_at: u64,
    pub(crate) attempts: u32,
    pub(crate) next_attempt: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) dead: bool,
    /// A dead letter a newer write of its key came after: retrying it would roll the source
    /// back (I4).
    pub(crate) superseded: bool,
}

/// What became of a dead letter asked to be retried or discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// No dead letter has this id.
    Missing,
    /// Retried (back in the outbox) or discarded.
    Done,
    /// Not retried: a newer write of this key came after it. It stays a dead letter.
    Superseded(String),
}

/// What the L2 database holds, as counted by one query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StoreSummary {
    /// Entries held (negative entries included).
    pub entries: u64,
    /// Bytes of values and validators held.
    pub bytes: u64,
    /// Entries past their fresh deadline.
    pub stale_entries: u64,
    /// Entries recording "not found".
    pub negative_entries: u64,
    /// Writes waiting for delivery (not dead).
    pub outbox_depth: u64,
    /// Writes the source refused for good, kept until retried or discarded.
    pub dead_letters: u64,
    /// When the oldest pending write was made (ms since the UNIX epoch).
    pub oldest_pending_ms: Option<u64>,
}

/// What [`Store::get_many`] found: the entries held, and the keys' pending outbox writes.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub(crate) entries: Vec<(String, Entry)>,
    pub(crate) pending: Vec<(String, OutboxOp)>,
}

/// What a fill saw of its key's L2 row when it started: the row it may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observed {
    /// L2 could not be read: only the fence decides.
    Unknown,
    /// No row.
    Absent,
    /// A row with this `stored_at`.
    StoredAt(u64),
}

impl Observed {
    pub(crate) fn of(found: &Option<Entry>) -> Self {
        match found {
            Some(e) => Observed::StoredAt(e.stored_at),
            None => Observed::Absent,
        }
    }

    /// Whether the row now held (its `stored_at`, or `None`) is still the one observed.
    pub(crate) fn matches(self, now_held: Option<u64>) -> bool {
        match self {
            Observed::Unknown => true,
            Observed::Absent => now_held.is_none(),
            Observed::StoredAt(t) => now_held == Some(t),
        }
    }
}

/// The condition under which a fill is written: no write of the key began since the fill
/// started (checked by the writer when it runs the statement), and the row is still the one the
/// fill observed. See [`fence`].
pub(crate) struct FillGuard {
    pub(crate) observed: Observed,
    pub(crate) still_valid: Box<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for FillGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillGuard")
            .field("observed", &self.observed)
            .finish_non_exhaustive()
    }
}

/// A read-modify-write of one meta value, run inside the store's write transaction.
pub(crate) type MetaUpdate = Box<dyn FnOnce(Option<String>) -> Option<String> + Send>;

/// The L2 contract. All methods may fail with [`Error::Storage`](crate::Error::Storage); the cache
/// treats such failures as "L2 could not answer", never as "not there".
#[async_trait]
pub(crate) trait Store: Send + Sync + std::fmt::Debug + 'static {
    async fn get(&self, key: &str) -> Result<Option<Entry>>;
    /// [`get`](Self::get) answered on the calling thread, for a backend that reads without
    /// waiting on anything (an embedded database): no boxed future on the L2-hit path. `None`
    /// when the read must go through `get` (a remote backend, or a guard that must take a
    /// breaker permit first).
    fn get_now(&self, _key: &str) -> Option<Result<Option<Entry>>> {
        None
    }
    /// All of `keys` that are held, and the newest pending outbox write of each that has one,
    /// in one statement.
    async fn get_many(&self, keys: &[&str]) -> Result<Found>;
    async fn put(&self, key: &str, entry: Entry) -> Result<()>;
    /// A fill from the source: `put`, but only while `guard` holds. Returns whether it was
    /// written.
    async fn put_fill(&self, key: &str, entry: Entry, guard: FillGuard) -> Result<bool>;
    /// A 304 from the source: new deadlines for the bytes already held (the bytes are not
    /// rewritten), but only while `guard` holds. Returns whether it was
    /// written.
    async fn renew_fill(
        &self,
        key: &str,
        deadlines: (u64, u64, u64),
        guard: FillGuard,
    ) -> Result<bool>;
    async fn remove(&self, key: &str) -> Result<()>;
    /// Removes `key`'s entry after its outbox rows up to `settled_id` were settled (a delivered
    /// delete, a refused write), unless a newer write of the key is pending: checked in the same
    /// step as the removal, so a write that arrived meanwhile keeps its entry.
    async fn remove_settled(&self, key: &str, settled_id: i64) -> Result<()>;
    /// Records a read for the least-recently-used bound; best effort, never waits.
    fn touch(&self, key: &str, now: u64);
    /// Write-behind: the entry (or its removal) and an outbox row, in one transaction.
    async fn enqueue(&self, key: &str, entry: Option<Entry>, op: OutboxOp, now: u64)
        -> Result<i64>;
    /// Pending (not dead) outbox rows, oldest first.
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>>;
    /// The newest pending (not dead) outbox write of `key`: what `key` reads as until it is
    /// delivered.
    async fn outbox_newest(&self, key: &str) -> Result<Option<OutboxOp>>;
    /// How many outbox rows are pending, and the keys whose last attempt failed with that
    /// error (each key once, oldest first), without reading any value.
    async fn outbox_summary(&self) -> Result<(u64, Vec<(String, String)>)>;
    /// Removes these outbox rows: delivered (or superseded), in one statement.
    async fn outbox_complete(&self, ids: Vec<i64>) -> Result<()>;
    /// Records a failed attempt on these rows. `dead`: refused for good; in the same step,
    /// the entry of each of their keys is removed unless a newer write of it is pending (the
    /// source's value stands: I1).
    async fn outbox_failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()>;
    /// The dead letters.
    async fn dead_letters(&self) -> Result<Vec<OutboxRow>>;
    /// Moves a dead letter back to pending (`retry`; refused when superseded) or deletes it.
    async fn resolve_dead_letter(&self, id: i64, retry: bool) -> Result<Resolved>;
    /// Marks `key`'s dead letters superseded: a newer write of the key reached the source.
    async fn supersede_dead(&self, key: &str) -> Result<()>;
    async fn summary(&self, now: u64) -> Result<StoreSummary>;
    async fn load_meta(&self, name: &str) -> Result<Option<String>>;
    /// Atomically replaces a meta value; returns the value written.
    async fn update_meta(&self, name: &str, update: MetaUpdate) -> Result<Option<String>>;
}
