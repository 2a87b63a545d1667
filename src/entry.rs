//! The unit every tier stores: bytes (or "not found") with a validator and three deadlines.

use bytes::Bytes;

/// A cached answer of the source. Deadlines are milliseconds since the UNIX epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The bytes; `None` for a negative entry (the source said "not found").
    pub(crate) value: Option<Bytes>,
    /// The source's validator (ETag), exactly as received.
    pub(crate) validator: Option<String>,
    /// When the source last gave or confirmed this value.
    pub(crate) stored_at: u64,
    /// Served as fresh until then.
    pub(crate) fresh_until: u64,
    /// Served as stale (when the source cannot answer) until then; dropped after.
    pub(crate) stale_until: u64,
}

impl Entry {
    pub(crate) fn new(
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

    /// Whether the entry is fresh at `now`, given a per-read maximum age.
    #[inline]
    pub(crate) fn is_fresh(&self, now: u64, max_age: Option<u64>) -> bool {
        now < self.fresh_until
            && match max_age {
                None => true,
                Some(max) => now.saturating_sub(self.stored_at) <= max,
            }
    }

    /// Whether the entry may still be served, stale or not.
    #[inline]
    pub(crate) fn is_servable(&self, now: u64) -> bool {
        now < self.stale_until
    }

    /// Bytes held, for the size bounds of the tiers.
    pub(crate) fn size(&self) -> usize {
        self.value.as_ref().map_or(0, Bytes::len) + self.validator.as_ref().map_or(0, String::len)
    }

    /// The same bytes, confirmed by the source at `now` with new deadlines.
    pub(crate) fn renewed(&self, now: u64, fresh_until: u64, stale_until: u64) -> Entry {
        Entry::new(
            self.value.clone(),
            self.validator.clone(),
            now,
            fresh_until,
            stale_until,
        )
    }
}
