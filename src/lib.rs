//! tiercache (being written).
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod breaker;
mod cache;
mod clock;
mod entry;
mod error;
pub mod event;
pub mod health;
mod key;
mod lookup;
pub mod outbox;
pub mod source;
pub mod stats;
pub mod tier;

pub use cache::{
    ReadOptions, Strategy, TieredCache, TieredCacheBuilder, WarmProgress, WarmSummary,
};
pub use clock::{Clock, MockClock, SystemClock};
pub use error::{Error, Result};
pub use event::Event;
pub use health::{HealthReport, HealthStatus};
pub use key::{KeyError, MAX_KEY_LEN};
pub use lookup::{Freshness, Lookup, StaleReason, Tier};
pub use outbox::{DeadLetter, FlushReport, OutboxMode};
pub use tier::sqlite::{OnCorrupt, Synchronous};
pub use tier::StoreSummary;
