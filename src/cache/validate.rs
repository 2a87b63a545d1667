//! The builder's configuration checks: every setting that cannot work is refused with
//! [`Error::Config`] before anything is opened.

use crate::error::{Error, Result};
use crate::tier::sqlite::{Location, MAX_BUSY_TIMEOUT};

use super::builder::{KIB, MAX_TTL, TIB};
use super::{Strategy, TieredCacheBuilder};

impl TieredCacheBuilder {
    pub(super) fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        if self.store.is_some() && matches!(self.sqlite_location, Location::File(_)) {
            return fail(
                "both a store and a sqlite_path were given; L2 is one or the other".to_owned(),
            );
        }
        if self.memory_capacity < 4 * KIB || self.memory_capacity > TIB {
            return fail(format!(
                "memory_capacity is {} bytes; it must be between 4 KiB and 1 TiB",
                self.memory_capacity
            ));
        }
        if self.sqlite_capacity < 64 * KIB || self.sqlite_capacity > 64 * TIB {
            return fail(format!(
                "sqlite_capacity is {} bytes; it must be between 64 KiB and 64 TiB",
                self.sqlite_capacity
            ));
        }
        if let Some(bytes) = self.outbox_capacity {
            if self.store.is_some() {
                return fail(
                    "outbox_capacity bounds the SQLite L2's outbox; a store given with store() \
                     keeps its own"
                        .to_owned(),
                );
            }
            if !(64 * KIB..=64 * TIB).contains(&bytes) {
                return fail(format!(
                    "outbox_capacity is {bytes} bytes; it must be between 64 KiB and 64 TiB"
                ));
            }
        }
        if self.sqlite_readers == 0 || self.sqlite_readers > 64 {
            return fail(format!(
                "sqlite_readers is {}; it must be between 1 and 64",
                self.sqlite_readers
            ));
        }
        for (name, d) in [
            ("ttl", self.ttl),
            ("stale_ttl", self.stale_ttl),
            ("negative_ttl", self.negative_ttl),
        ] {
            if d > MAX_TTL {
                return fail(format!(
                    "{name} is {d:?}, more than ten years; was a unit mistaken?"
                ));
            }
        }
        if let Some(Some(age)) = self.max_l1_age {
            if age.is_zero() || age > MAX_TTL {
                return fail(format!(
                    "max_l1_age is {age:?}; it must be above zero and at most ten years \
                     (None turns it off)"
                ));
            }
        }
        if self.ttl.is_zero() && self.stale_ttl.is_zero() {
            return fail(
                "ttl and stale_ttl are both zero: nothing could ever be served from the cache"
                    .into(),
            );
        }
        if self.timeout.is_zero() {
            return fail("timeout is zero: no source call could succeed".into());
        }
        if let Some(soft) = self.soft_timeout {
            if soft.is_zero() || soft >= self.timeout {
                return fail(format!(
                    "soft_timeout ({soft:?}) must be above zero and below timeout ({:?})",
                    self.timeout
                ));
            }
        }
        if self.fetch_concurrency == 0 || self.fetch_concurrency > 1024 {
            return fail(format!(
                "fetch_concurrency is {}; it must be between 1 and 1024",
                self.fetch_concurrency
            ));
        }
        if let Some(window) = self.get_batch_window {
            if window.is_zero() || window > std::time::Duration::from_secs(1) {
                return fail(format!(
                    "get_batch_window is {window:?}; it must be above zero and at most 1 s"
                ));
            }
        }
        if let Some(fraction) = self.refresh_ahead {
            if !(fraction > 0.0 && fraction < 1.0) {
                return fail(format!(
                    "refresh_ahead is {fraction}; it must be a fraction of the TTL above 0 and below 1"
                ));
            }
            if !self.strategy.reads_through() {
                return fail(format!(
                    "refresh_ahead needs a strategy that reads through the source; {} never calls it",
                    self.strategy
                ));
            }
        }
        if self.retry_base.is_zero() || self.retry_max < self.retry_base {
            return fail(format!(
                "retry_base ({:?}) must be above zero and at most retry_max ({:?})",
                self.retry_base, self.retry_max
            ));
        }
        if matches!(
            self.strategy,
            Strategy::WriteThrough | Strategy::WriteBehind
        ) && self.source.is_none()
        {
            return fail(format!(
                "the {} strategy writes to the source, but no source was given",
                self.strategy
            ));
        }
        if self.busy_timeout.as_millis() > MAX_BUSY_TIMEOUT.as_millis() {
            return fail(format!(
                "sqlite_busy_timeout is {:?}; SQLite takes at most i32::MAX milliseconds ({:?}, about 24.8 days)",
                self.busy_timeout, MAX_BUSY_TIMEOUT
            ));
        }
        let word = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        for (name, value) in &self.pragmas {
            if !word(name) || !word(value) || name.starts_with('-') {
                return fail(format!(
                    "sqlite_pragma {name:?} = {value:?}: names and values must be plain words"
                ));
            }
        }
        if let Location::File(path) = &self.sqlite_location {
            if path.as_os_str().is_empty() {
                return fail("sqlite_path is empty".into());
            }
            if path.is_dir() {
                return fail(format!(
                    "sqlite_path {} is a directory, not a database file",
                    path.display()
                ));
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dir.exists() {
                    return fail(format!(
                        "cannot open the database file {}: its directory {} does not exist",
                        path.display(),
                        dir.display()
                    ));
                }
            }
        }
        Ok(())
    }
}
