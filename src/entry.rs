//! The unit every tier stores: bytes (or "not found") with a validator and three deadlines.

use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};

use crate::clock::from_millis;

/// A cached answer of the source. Deadlines are milliseconds since the UNIX epoch.
///
/// The value and its validator share one buffer (`value ++ validator`), so cloning an entry
/// (what moka does on every L1 hit) costs one reference-count increment, and handing out the
/// value costs none: the clone's buffer is truncated to the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The value followed by the validator's bytes; `None` for a negative entry (the source
    /// said "not found").
    data: Option<Bytes>,
    /// Where the value ends (and the validator starts) in `data`.
    value_len: usize,
    /// When the source last gave or confirmed this value.
    pub(crate) stored_at: u64,
    /// Served as fresh until then.
    pub(crate) fresh_until: u64,
    /// Served as stale (when the source cannot answer) until then; dropped after.
    pub(crate) stale_until: u64,
    /// `fresh_until` as a wall-clock time: the L1-hit check compares it with the clock's reading
    /// directly, without converting that reading to milliseconds.
    fresh_at: SystemTime,
}

impl Entry {
    /// An entry of `value` (none: "not found") and its validator (ignored without a value).
    pub(crate) fn new(
        value: Option<Bytes>,
        validator: Option<&str>,
        stored_at: u64,
        fresh_until: u64,
        stale_until: u64,
    ) -> Self {
        let value_len = value.as_ref().map_or(0, Bytes::len);
        let data = match (value, validator) {
            (Some(v), Some(etag)) if !etag.is_empty() => {
                let mut buf = BytesMut::with_capacity(v.len() + etag.len());
                buf.put_slice(&v);
                buf.put_slice(etag.as_bytes());
                Some(buf.freeze())
            }
            (v, _) => v,
        };
        Self {
            data,
            value_len,
            stored_at,
            fresh_until,
            stale_until,
            fresh_at: from_millis(fresh_until),
        }
    }

    /// An entry built straight from borrowed bytes (an L2 row): value and validator are copied
    /// once, into one buffer.
    pub(crate) fn from_slices(
        value: Option<&[u8]>,
        validator: Option<&str>,
        stored_at: u64,
        fresh_until: u64,
        stale_until: u64,
    ) -> Self {
        let value_len = value.map_or(0, <[u8]>::len);
        let data = value.map(|v| {
            let etag = validator.unwrap_or("");
            let mut buf = BytesMut::with_capacity(v.len() + etag.len());
            buf.put_slice(v);
            buf.put_slice(etag.as_bytes());
            buf.freeze()
        });
        Self {
            data,
            value_len,
            stored_at,
            fresh_until,
            stale_until,
            fresh_at: from_millis(fresh_until),
        }
    }

    /// Whether this entry holds a value (not "not found").
    #[inline]
    pub(crate) fn has_value(&self) -> bool {
        self.data.is_some()
    }

    /// The value, sharing this entry's buffer.
    #[inline]
    pub(crate) fn value(&self) -> Option<Bytes> {
        self.clone().into_value()
    }

    /// The value, taking this entry's buffer: no reference count is touched.
    #[inline]
    pub(crate) fn into_value(self) -> Option<Bytes> {
        self.data.map(|mut b| {
            b.truncate(self.value_len);
            b
        })
    }

    /// The value's bytes.
    pub(crate) fn value_bytes(&self) -> Option<&[u8]> {
        self.data.as_ref().map(|b| &b[..self.value_len])
    }

    /// The validator (ETag), exactly as received.
    pub(crate) fn validator(&self) -> Option<&str> {
        let rest = &self.data.as_ref()?[self.value_len..];
        // Written from a `&str` in `new`, so always UTF-8; `None` rather than a panic if not.
        (!rest.is_empty())
            .then(|| std::str::from_utf8(rest).ok())
            .flatten()
    }

    /// Whether `other` is this very version (same buffer, same confirmation time), without
    /// comparing the bytes.
    pub(crate) fn same_version(&self, other: &Entry) -> bool {
        self.stored_at == other.stored_at
            && self.fresh_until == other.fresh_until
            && self.data.as_ref().map(|b| b.as_ptr()) == other.data.as_ref().map(|b| b.as_ptr())
    }

    /// [`is_fresh`](Self::is_fresh) with no maximum age, against a clock reading.
    #[inline]
    pub(crate) fn is_fresh_at(&self, now: SystemTime) -> bool {
        now < self.fresh_at
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

    /// Bytes held (value and validator), for the size bounds of the tiers.
    pub(crate) fn size(&self) -> usize {
        self.data.as_ref().map_or(0, Bytes::len)
    }

    /// The same bytes, confirmed by the source at `now` with new deadlines.
    pub(crate) fn renewed(&self, now: u64, fresh_until: u64, stale_until: u64) -> Entry {
        Entry {
            data: self.data.clone(),
            value_len: self.value_len,
            stored_at: now,
            fresh_until,
            stale_until,
            fresh_at: from_millis(fresh_until),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_and_validator_share_a_buffer() {
        let e = Entry::new(Some(Bytes::from("hello")), Some("\"v1\""), 0, 10, 20);
        assert_eq!(e.value().unwrap(), "hello");
        assert_eq!(e.value_bytes().unwrap(), b"hello");
        assert_eq!(e.validator(), Some("\"v1\""));
        assert_eq!(e.size(), 9);
        let plain = Entry::new(Some(Bytes::from("x")), None, 0, 10, 20);
        assert_eq!(
            (plain.validator(), plain.value().unwrap()),
            (None, Bytes::from("x"))
        );
        let negative = Entry::new(None, Some("\"ignored\""), 0, 10, 10);
        assert!(!negative.has_value() && negative.validator().is_none());
        let renewed = e.renewed(5, 15, 25);
        assert!(renewed.same_version(&renewed.clone()) && !renewed.same_version(&e));
        assert_eq!(renewed.into_value().unwrap(), "hello");
    }
}
