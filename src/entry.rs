//! The unit every tier stores: bytes (or "not found") with a validator and three deadlines.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// A cached answer of the source. Deadlines are milliseconds since the UNIX epoch.
#[derive(Debug, Clone)]
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
    /// The value decoded by a typed view ([`Typed`](crate::Typed)), kept with the bytes it came
    /// from: every write replaces the whole entry, so a decoded value can never outlive its
    /// bytes. One type per entry; a second type decodes on every read.
    pub(crate) decoded: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.value,
            &self.validator,
            self.stored_at,
            self.fresh_until,
            self.stale_until,
        ) == (
            &other.value,
            &other.validator,
            other.stored_at,
            other.fresh_until,
            other.stale_until,
        )
    }
}

impl Eq for Entry {}

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
            decoded: OnceLock::new(),
        }
    }

    /// The value decoded as `T` by an earlier typed read, if that is the type it holds.
    #[inline]
    pub(crate) fn decoded<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.decoded.get()?.clone().downcast::<T>().ok()
    }

    /// The validator a conditional request may send for this entry: its ETag, when it holds a
    /// value (a negative entry is never revalidated). `None`: a fetch of the key is cold, which
    /// a batch can carry.
    #[inline]
    pub(crate) fn revalidator(&self) -> Option<&str> {
        self.value.as_ref().and(self.validator.as_deref())
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
