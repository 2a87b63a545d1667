//! What crosses the storage seam: entries, outbox rows, summaries, the fill guard, and the
//! answers of the stores' methods.

use bytes::Bytes;
use serde::Serialize;

#[cfg(doc)]
use super::{EntryStore, OutboxStore, StateStore};
use crate::entry::Entry;
use crate::error::Result;

/// One cached answer of the source, as a store holds it: the bytes (or "not found"), the
/// source's validator and three deadlines (ms since the UNIX epoch).
///
/// A store keeps all five fields exactly as given and gives them back unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredEntry {
    /// The bytes; `None` for a negative entry (the source said "not found"), which is not the
    /// same as an empty value.
    pub value: Option<Bytes>,
    /// The source's validator (ETag), exactly as received.
    pub validator: Option<String>,
    /// When the source last gave or confirmed this value. A fill's [`Observed`] names the row
    /// it may replace by this field.
    pub stored_at: u64,
    /// Served as fresh until then.
    pub fresh_until: u64,
    /// Served as stale (when the source cannot answer) until then. A store may drop an entry
    /// after this deadline (or to stay within its size bound: least recently used first).
    pub stale_until: u64,
}

impl StoredEntry {
    /// An entry with these fields.
    pub fn new(
        value: Option<Bytes>,
        validator: Option<String>,
        stored_at: u64,
        fresh_until: u64,
        stale_until: u64,
    ) -> Self {
        Self {
            value,
            validator,
            stored_at,
            fresh_until,
            stale_until,
        }
    }

    /// Bytes held (the value and the validator), for a store's size bound.
    pub fn size(&self) -> usize {
        self.value.as_ref().map_or(0, Bytes::len) + self.validator.as_ref().map_or(0, String::len)
    }
}

impl From<Entry> for StoredEntry {
    fn from(e: Entry) -> Self {
        Self::new(
            e.value,
            e.validator,
            e.stored_at,
            e.fresh_until,
            e.stale_until,
        )
    }
}

impl From<StoredEntry> for Entry {
    fn from(e: StoredEntry) -> Self {
        Entry::new(
            e.value,
            e.validator,
            e.stored_at,
            e.fresh_until,
            e.stale_until,
        )
    }
}

/// A write waiting in the write-behind outbox.
///
/// Not `#[non_exhaustive]`: a store must persist every kind of write, so a new kind is a
/// breaking change for stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxOp {
    /// Write these bytes to the source.
    Put(Bytes),
    /// Delete the key at the source (a tombstone).
    Delete,
}

impl OutboxOp {
    /// `"put"` or `"delete"`: a stable name, for a store's `op` column.
    pub fn name(&self) -> &'static str {
        match self {
            OutboxOp::Put(_) => "put",
            OutboxOp::Delete => "delete",
        }
    }
}

/// One row of the outbox: a pending write, or (`dead`) a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxRow {
    /// Assigned by [`OutboxStore::enqueue`]; orders the outbox (higher is newer).
    pub id: i64,
    /// The key written.
    pub key: String,
    /// The write.
    pub op: OutboxOp,
    /// When the write was made (the `now` given to [`OutboxStore::enqueue`]).
    pub created_at: u64,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    /// Not to be attempted before then (set by [`OutboxStore::outbox_failed`]; 0 at first).
    pub next_attempt: u64,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// Refused by the source for good: a dead letter, no longer pending.
    pub dead: bool,
    /// A dead letter a newer write of its key came after: retrying it would roll the source
    /// back (I4), so [`OutboxStore::resolve_dead_letter`] refuses to.
    pub superseded: bool,
}

impl OutboxRow {
    /// A new pending row: no attempt made, not dead, not superseded.
    pub fn new(id: i64, key: impl Into<String>, op: OutboxOp, created_at: u64) -> Self {
        Self {
            id,
            key: key.into(),
            op,
            created_at,
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            dead: false,
            superseded: false,
        }
    }
}

/// What became of a dead letter asked to be retried or discarded
/// ([`OutboxStore::resolve_dead_letter`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resolved {
    /// No dead letter has this id (never was, already resolved, or not dead).
    Missing,
    /// Retried (back in the outbox, pending) or discarded (deleted).
    Done,
    /// Not retried: it is [`superseded`](OutboxRow::superseded), a newer write of this key
    /// came after it. It stays a dead letter. Carries the key.
    Superseded(String),
}

/// What the L2 store holds. The SQLite tier answers from counters kept in the database (and
/// the stale count from an index's stale range), never by reading the entries.
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
    /// Bytes of the outbox's rows (keys and values, dead letters included), counted against
    /// the outbox's bound. 0 for a store that does not count them.
    pub outbox_bytes: u64,
}

/// What [`EntryStore::get_many`] found: the entries held, and the keys' pending outbox writes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Found {
    /// Each asked key that has an entry, with it (any order; each key at most once).
    pub entries: Vec<(String, StoredEntry)>,
    /// Each asked key that has a pending (not dead) outbox row, with the op of its newest such
    /// row (any order; each key at most once).
    pub pending: Vec<(String, OutboxOp)>,
}

/// What a fill saw of its key's entry when it started: the entry it may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Observed {
    /// The store could not be read: only the write fence decides
    /// ([`FillGuard::still_valid`]).
    Unknown,
    /// No entry.
    Absent,
    /// An entry with this [`stored_at`](StoredEntry::stored_at).
    StoredAt(u64),
}

impl Observed {
    pub(crate) fn of(found: &Option<Entry>) -> Self {
        match found {
            Some(e) => Observed::StoredAt(e.stored_at),
            None => Observed::Absent,
        }
    }

    /// Whether the entry now held (its `stored_at`, or `None` for no entry) is still the one
    /// observed. Always `true` for [`Observed::Unknown`].
    pub fn matches(self, now_held: Option<u64>) -> bool {
        match self {
            Observed::Unknown => true,
            Observed::Absent => now_held.is_none(),
            Observed::StoredAt(t) => now_held == Some(t),
        }
    }
}

/// The condition under which a fill (an answer of the source, or its "not modified") may be
/// written: no write of the key began in this process since the fill started
/// ([`still_valid`](Self::still_valid)), and the key's entry is still the one the fill
/// [`observed`](Self::observed) (another process's write changes it).
///
/// Made by the cache only. A store checks it with [`allows`](Self::allows) **in the same step
/// as the write** (inside the transaction, under the lock that orders writes of the key): a
/// check made before the write leaves a window in which a racing `set` is overwritten by an
/// older value from the source (I1).
pub struct FillGuard {
    pub(crate) observed: Observed,
    pub(crate) still_valid: Box<dyn Fn() -> bool + Send + Sync>,
}

impl FillGuard {
    /// Whether no write of the key began in this process since the fill started (the key's
    /// write fence has not moved). Cheap (one atomic load); may turn `false` at any moment,
    /// never back to `true`.
    pub fn still_valid(&self) -> bool {
        (self.still_valid)()
    }

    /// The entry the fill saw when it started.
    pub fn observed(&self) -> Observed {
        self.observed
    }

    /// Both conditions: [`still_valid`](Self::still_valid), and `now_held` (the `stored_at` of
    /// the entry the key holds now, `None` for no entry) [`matches`](Observed::matches) what was
    /// observed.
    pub fn allows(&self, now_held: Option<u64>) -> bool {
        self.still_valid() && self.observed.matches(now_held)
    }
}

impl std::fmt::Debug for FillGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillGuard")
            .field("observed", &self.observed)
            .finish_non_exhaustive()
    }
}

/// A read-modify-write of one named value ([`StateStore::update_meta`]): given the value held
/// (`None`: none), returns the value to hold (`None`: remove it).
pub type MetaUpdate = Box<dyn FnOnce(Option<String>) -> Option<String> + Send>;

/// Receives the entries of an [`EntryStore::snapshot`], one call per entry, in key order. An
/// `Err` stops the snapshot, which then returns that error.
pub type EntrySink = Box<dyn FnMut(String, StoredEntry) -> Result<()> + Send>;

/// What [`EntryStore::merge`] did with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Merged {
    /// Written: the key had no entry, or an older one (a lower `stored_at`).
    Written,
    /// Not written: the key holds an entry as new or newer (its `stored_at` is not lower).
    KeptNewer,
    /// Not written: the key has a pending (not dead) outbox row. An acknowledged write not yet
    /// delivered is newer than anything a bundle holds (I1).
    KeptPending,
}
