//! Background work inside the source's budget: refresh-ahead of hot entries, and the admission
//! rule every request kind passes before it is sent.
//!
//! # Priorities
//!
//! Requests are admitted by kind ([`RequestKind`]), highest priority first:
//!
//! | kind | sent while |
//! |---|---|
//! | `read` (a reader waits: a miss) | the breaker lets it through (budget not spent) |
//! | `revalidate` (a reader waits: an expired entry) | the breaker lets it through |
//! | `refresh_ahead` (nobody waits) | the budget's `remaining` is above the reserve |
//! | `warm` (nobody waits) | the budget's `remaining` is above the reserve |
//!
//! The reserve is [`budget_reserve`](super::TieredCacheBuilder::budget_reserve) (default: 10%
//! of the reported limit). A budget whose reset has passed is taken as refilled; a source that
//! reports none admits everything. The breaker's own gate (a spent budget, `remaining == 0`,
//! holds every call until the reset) stays in front of all kinds. Background refreshes are
//! further bounded to `fetch_concurrency` at once, and a read never waits for one: it only
//! starts it, and never joins a refresh that has not yet decided to call the source.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Semaphore;

use super::*;
use crate::clock::to_millis;
use crate::source::RateLimit;
use crate::stats::{RequestEvent, RequestKind};
use crate::tier::Observed;

/// Parts per million: the unit of the refresh-ahead fraction.
const PPM: u64 = 1_000_000;

/// The budget reserve and the refresh-ahead state of one cache.
#[derive(Debug)]
pub(crate) struct Background {
    /// Where in an entry's TTL refresh-ahead starts, in parts per million (0: off).
    refresh_ppm: u64,
    /// The fixed reserve; `None`: 10% of the reported limit.
    reserve: Option<u64>,
    /// Bounds the refreshes running at once.
    permits: Arc<Semaphore>,
    /// The permits in all.
    concurrency: usize,
    /// Keys with a refresh task under way.
    pending: Arc<Mutex<HashSet<String>>>,
}

impl Background {
    pub(crate) fn new(
        refresh_ahead: Option<f64>,
        reserve: Option<u64>,
        concurrency: usize,
    ) -> Self {
        // Validated by the builder: 0 < fraction < 1.
        let refresh_ppm = refresh_ahead.map_or(0, |f| ((f * PPM as f64).round() as u64).max(1));
        Self {
            refresh_ppm,
            reserve,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            concurrency: concurrency.max(1),
            pending: Arc::default(),
        }
    }

    /// Waits until no refresh runs.
    pub(crate) async fn idle(&self) {
        let n = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        // The semaphore is never closed: `Err` cannot happen, and would mean "nothing runs".
        let _ = self.permits.acquire_many(n).await;
    }

    /// The reserve for a source whose limit is `limit`.
    fn reserve(&self, limit: u64) -> u64 {
        self.reserve.unwrap_or_else(|| limit.div_ceil(10))
    }

    /// Whether a request of `kind` may be sent now, given the source's last budget (see the
    /// module docs for the rule).
    pub(crate) fn admits(&self, kind: RequestKind, budget: Option<RateLimit>, now: u64) -> bool {
        if !kind.is_background() {
            return true;
        }
        match budget {
            Some(b) if to_millis(b.reset) > now => b.remaining > self.reserve(b.limit),
            _ => true,
        }
    }

    /// Whether a read of `e` at `now` should start a refresh-ahead.
    #[inline]
    pub(crate) fn due(&self, e: &Entry, now: u64) -> bool {
        // Only what the source gave with a validator: a refresh is always conditional, and a
        // value written with `set` (which has none) stands for its whole TTL.
        if self.refresh_ppm == 0 || e.revalidator().is_none() || now >= e.fresh_until {
            return false;
        }
        let ttl = e.fresh_until.saturating_sub(e.stored_at);
        let from = e.stored_at.saturating_add(
            (u128::from(ttl) * u128::from(self.refresh_ppm) / u128::from(PPM)) as u64,
        );
        now >= from
    }
}

/// Takes a key out of [`Background::pending`] when its refresh task ends, however it ends.
struct Pending {
    set: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

impl TieredCache {
    /// Waits until no background refresh ([`refresh_ahead`]) is running: each holds one of
    /// [`fetch_concurrency`] permits from the read that starts it until its fill is written,
    /// so when this returns, every refresh started before it has ended. For tests (a
    /// deterministic point after a refresh) and orderly shutdowns; [`close`](Self::close)
    /// calls it.
    ///
    /// [`refresh_ahead`]: super::TieredCacheBuilder::refresh_ahead
    /// [`fetch_concurrency`]: super::TieredCacheBuilder::fetch_concurrency
    pub async fn background_idle(&self) {
        self.inner.background.idle().await;
    }

    /// A read found `e` fresh for `key`: starts a refresh-ahead if the entry is in the last
    /// part of its TTL. Costs one branch when refresh-ahead is off.
    #[inline]
    pub(super) fn consider_refresh(&self, key: &str, e: &Arc<Entry>, now: u64) {
        if self.inner.background.due(e, now) {
            self.start_refresh(key, e, now);
        }
    }

    /// Starts one background refresh of `key` (whose entry `e` a read just served), unless
    /// one is under way, the budget is at the reserve, or every refresh permit is taken.
    #[cold]
    fn start_refresh(&self, key: &str, e: &Arc<Entry>, now: u64) {
        let inner = &*self.inner;
        let bg = &inner.background;
        if inner.closed.load(Ordering::Relaxed) || self.is_offline() {
            return;
        }
        let kind = RequestKind::RefreshAhead;
        if inner.flights.contains(key) {
            inner.stats.request(kind, RequestEvent::Deduplicated);
            return;
        }
        if !bg.admits(kind, inner.source.rate_limit(), now) {
            inner.stats.request(kind, RequestEvent::SkippedBudget);
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(permit) = bg.permits.clone().try_acquire_owned() else {
            // Every permit busy: a later read in the window will try again.
            return;
        };
        if !bg
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned())
        {
            inner.stats.request(kind, RequestEvent::Deduplicated);
            return;
        }
        let pending = Pending {
            set: bg.pending.clone(),
            key: key.to_owned(),
        };
        let weak = Arc::downgrade(&self.inner);
        let prev = e.clone();
        handle.spawn(crate::tier::sqlite::in_background(async move {
            let _permit = permit;
            let _pending = pending;
            refresh(weak, prev, &_pending.key).await;
        }));
    }
}

/// One refresh-ahead of `key`, whose entry was `prev` when a read started it. Holds the cache
/// only while it works: a dropped cache ends it at its next step.
async fn refresh(inner: Weak<Inner>, prev: Arc<Entry>, key: &str) {
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let kind = RequestKind::RefreshAhead;
    let dedup = || inner.stats.request(kind, RequestEvent::Deduplicated);
    // As a read does: the token before L2 is read, so a write that lands after it keeps this
    // refresh's fill out of the tiers (I1).
    let token = inner.fences.token(key);
    let found = inner.l2.get(key).await;
    // Only the entry the read saw is refreshed. Another one in L2 (a write, another load, an
    // eviction, an unreadable L2): that is what the next read finds; nothing is sent.
    let observed = match &found {
        Ok(Some(e)) if *e == *prev => Observed::StoredAt(e.stored_at),
        _ => return dedup(),
    };
    // A key with an undelivered write-behind write: the source has the older value.
    if let Some(queue) = &inner.memory_queue {
        if queue.newest_now(key).is_some() {
            return dedup();
        }
    } else if let Some(outbox) = &inner.outbox {
        if !matches!(outbox.queue().newest(key).await, Ok(None)) {
            return dedup();
        }
    }
    if inner.closed.load(Ordering::Relaxed) || inner.offline.load(Ordering::Relaxed) {
        return;
    }
    let now = inner.clock.now_millis();
    if !inner
        .background
        .admits(kind, inner.source.rate_limit(), now)
    {
        inner.stats.request(kind, RequestEvent::SkippedBudget);
        return;
    }
    let flight = super::load::join_background(
        &inner,
        key,
        (token, observed, kind),
        Some(prev),
        super::load::Via::Fetch,
    );
    if !flight.leader {
        return dedup();
    }
    drop(inner);
    // Held until the load is done, so the permit bounds the calls in flight. Its outcome is in
    // the stats; the entry is renewed (or not) in the tiers.
    let _ = flight.wait().await;
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const NOW: u64 = 1_000_000;

    fn budget(remaining: u64, reset_in_ms: i64) -> Option<RateLimit> {
        let reset = UNIX_EPOCH + Duration::from_millis(NOW.saturating_add_signed(reset_in_ms));
        Some(RateLimit::new(1000, remaining, reset))
    }

    #[test]
    fn background_kinds_stop_at_the_reserve_readers_never_do() {
        let fixed = Background::new(None, Some(50), 4);
        let default = Background::new(None, None, 4);
        for kind in [RequestKind::RefreshAhead, RequestKind::Warm] {
            assert!(fixed.admits(kind, budget(51, 1000), NOW));
            assert!(!fixed.admits(kind, budget(50, 1000), NOW));
            // Default: 10% of the limit (1000).
            assert!(default.admits(kind, budget(101, 1000), NOW));
            assert!(!default.admits(kind, budget(100, 1000), NOW));
            // A reset that has passed: the budget is refilled. No budget: nothing holds back.
            assert!(fixed.admits(kind, budget(0, 0), NOW));
            assert!(fixed.admits(kind, None, NOW));
        }
        for kind in [RequestKind::Read, RequestKind::Revalidate] {
            assert!(fixed.admits(kind, budget(0, 1000), NOW));
        }
        // The default reserve is rounded up.
        assert_eq!(default.reserve(5), 1);
        assert_eq!(default.reserve(0), 0);
    }

    #[test]
    fn due_in_the_last_part_of_the_ttl_with_a_validator_only() {
        let bg = Background::new(Some(0.8), None, 1);
        let e = |validator: Option<&str>| {
            Entry::new(
                Some(bytes::Bytes::from_static(b"v")),
                validator.map(str::to_owned),
                0,
                100_000,
                200_000,
            )
        };
        let tagged = e(Some("\"v1\""));
        assert!(!bg.due(&tagged, 79_999));
        assert!(bg.due(&tagged, 80_000));
        assert!(bg.due(&tagged, 99_999));
        assert!(!bg.due(&tagged, 100_000), "expired: a reader revalidates");
        assert!(
            !bg.due(&e(None), 90_000),
            "no validator: not refreshed ahead"
        );
        let negative = Entry::new(None, Some("\"v1\"".into()), 0, 100_000, 100_000);
        assert!(!bg.due(&negative, 90_000));
        assert!(!Background::new(None, None, 1).due(&tagged, 90_000), "off");
    }
}
