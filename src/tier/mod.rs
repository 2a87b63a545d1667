//! The tiers below the strategy: `memory` (L1, moka) is a concrete type on the hot path; L2 sits
//! behind the public storage traits of [`store`] ([`EntryStore`], [`OutboxStore`],
//! [`StateStore`], together [`Store`]) so a second backend (PostgreSQL, Redis) can follow the
//! SQLite one ([`TieredCacheBuilder::store`](crate::TieredCacheBuilder::store)).

pub(crate) mod fence;
pub(crate) mod guarded;
pub(crate) mod l2;
pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;
pub mod store;

pub use store::{
    EntrySink, EntryStore, FillGuard, FillLease, Found, Invalidation, Invalidations, Listening,
    Merged, MetaUpdate, Observed, OutboxOp, OutboxRow, OutboxStore, Resolved, StateStore, Store,
    StoreSummary, StoredEntry,
};
