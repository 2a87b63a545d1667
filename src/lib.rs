//! tiercache (being written).
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod breaker;
mod clock;
mod error;
mod key;
mod lookup;
pub mod source;
pub mod stats;

pub use clock::{Clock, MockClock, SystemClock};
pub use error::{Error, Result};
pub use key::{KeyError, MAX_KEY_LEN};
pub use lookup::{Freshness, Lookup, StaleReason, Tier};
