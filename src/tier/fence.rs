//! Write fences: how a slow fill from the source is kept from bringing back a value older than a
//! write that raced it (invariant I1).
//!
//! Every write that changes what a key reads as (set, delete, invalidate, a delivered or refused
//! write-behind write) bumps the key's fence **before** it touches L2 and L1. A fill (a load from
//! the source writing its answer into L2 and L1) takes the fence's token when it starts and:
//! 1. writes L2 only if the token is unchanged when the writer thread runs its statement (and the
//!    row is still the one it read, which also catches another process's write);
//! 2. writes L1 only if that L2 write was applied, then re-checks the token and drops its L1
//!    entry if a write bumped the fence meanwhile (the next read then goes to L2, which holds
//!    the write).
//!
//! Fences are striped: keys that share a stripe only cost each other a skipped fill (the value
//! is still returned to the reader; it is just not cached), never a wrong answer.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

const STRIPES: usize = 1024;

/// The write fences of one cache.
pub(crate) struct Fences {
    stripes: Box<[AtomicU64]>,
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for Fences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fences")
            .field("stripes", &self.stripes.len())
            .finish()
    }
}

impl Default for Fences {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl Fences {
    fn stripe(&self, key: &str) -> &AtomicU64 {
        // `STRIPES` is a power of two.
        &self.stripes[(self.hasher.hash_one(key) as usize) & (STRIPES - 1)]
    }

    /// The token a fill holds from its start.
    pub(crate) fn token(&self, key: &str) -> u64 {
        self.stripe(key).load(Ordering::Acquire)
    }

    /// Called by every write before it touches a tier.
    pub(crate) fn bump(&self, key: &str) {
        self.stripe(key).fetch_add(1, Ordering::AcqRel);
    }

    /// Whether no write of `key` (or of a key on its stripe) began since `token` was taken.
    pub(crate) fn unchanged(&self, key: &str, token: u64) -> bool {
        self.token(key) == token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_invalidates_earlier_tokens_only() {
        let f = Fences::default();
        let t = f.token("k");
        assert!(f.unchanged("k", t));
        f.bump("k");
        assert!(!f.unchanged("k", t));
        let t2 = f.token("k");
        assert!(f.unchanged("k", t2));
    }
}
