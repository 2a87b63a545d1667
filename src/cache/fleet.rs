//! Fleet-wide single-flight: before a load calls the source, it takes the key's lease in L2
//! ([`EntryStore::fill_lease`](crate::tier::EntryStore::fill_lease)); when another instance
//! holds it, the load waits for that instance's fill to reach L2 and serves it.
//!
//! * **The holder** calls the source, fills L2 and L1 as any load does, then releases the lease
//!   (by its token). A lease lasts the source timeout plus [`FILL_GRACE`]: the holder's call
//!   is over by then (it timed out at worst), so a lease still live means a load in progress,
//!   and a holder that died (or hangs) holds the key up at most that long.
//! * **A waiter** polls L2 with a backoff from [`FIRST_POLL`] doubling to [`MAX_POLL`], for at
//!   most one lease duration. A fresh entry in L2 is its answer (put into L1 behind the key's
//!   fence, like a promotion). The lease gone (released or run out) with no fresh entry (the
//!   holder failed or died): it takes the lease itself and loads. Still busy at the end: the
//!   read fails as a timeout (the stale copy, if any, is served).
//! * After taking a lease, the load reads L2 once more: a holder that filled and released
//!   between this load's first L2 read and its lease has already answered.
//!
//! A store without leases (SQLite, the default of the trait) answers
//! [`FillLease::Unsupported`]; an L2 that fails, or is unhealthy (its breakers are not clean:
//! no lease is asked for then), is treated alike: the load goes on with the process's own
//! single-flight (never blocked by L2 trouble).
//!
//! Polling, not a `NOTIFY` on release: only one load per instance waits (the others join it in
//! the process), so a fleet of N instances polls with at most N - 1 loads, each a primary-key
//! read every 50 ms at most; a notification would save that at the cost of a message on every
//! fill, which the listener design avoids (fills publish nothing).

use std::sync::Arc;
use std::time::Duration;

use super::flight::Early;
use super::read::Seen;
use super::*;
use crate::tier::FillLease;

/// What a lease adds to the source timeout: the fill into L2 and the release after the call.
pub(super) const FILL_GRACE: Duration = Duration::from_secs(1);
/// A waiter's first poll of L2.
const FIRST_POLL: Duration = Duration::from_millis(2);
/// A waiter's longest pause between polls.
const MAX_POLL: Duration = Duration::from_millis(50);

/// What a load does about the fleet before calling the source.
pub(super) enum Turn {
    /// Call the source; release the lease of this token afterwards (`None`: no lease).
    Load(Option<u64>),
    /// Another instance loaded the key: its entry, from L2.
    Filled(Arc<Entry>),
    /// Another instance held the key for as long as this load may wait.
    TimedOut(Error),
}

/// Takes the key's lease, or waits for the instance holding it (see the module docs).
pub(super) async fn turn(inner: &Inner, key: &str, max_age: Option<u64>) -> Turn {
    let lease = inner.settings.timeout.saturating_add(FILL_GRACE);
    let deadline = tokio::time::Instant::now() + lease;
    let mut pause = FIRST_POLL;
    loop {
        match inner.l2.fill_lease(key, lease).await {
            Ok(FillLease::Held(token)) => {
                if let Some(e) = fresh(inner, key, max_age).await {
                    release(inner, key, token).await;
                    return Turn::Filled(e);
                }
                return Turn::Load(Some(token));
            }
            Ok(FillLease::Busy) => {}
            Ok(_) => return Turn::Load(None),
            Err(e) => {
                tracing::debug!(key, error = %e, "no fill lease; loading without one");
                return Turn::Load(None);
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Turn::TimedOut(Error::Unavailable {
                key: key.to_owned(),
                reason: StaleReason::Timeout,
                source: SourceError::Timeout { after: lease },
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL);
        if let Some(e) = fresh(inner, key, max_age).await {
            return Turn::Filled(e);
        }
    }
}

/// The key's entry in L2 if it is fresh now.
async fn fresh(inner: &Inner, key: &str, max_age: Option<u64>) -> Option<Arc<Entry>> {
    let e = inner.l2.get(key).await.ok()??;
    let now = inner.clock.now_millis();
    (e.is_servable(now) && e.is_fresh(now, max_age)).then(|| Arc::new(e))
}

/// Releases the lease of `token` (a failure leaves it to run out).
pub(super) async fn release(inner: &Inner, key: &str, token: u64) {
    if let Err(e) = inner.l2.release_fill_lease(key, token).await {
        tracing::debug!(key, error = %e, "could not release a fill lease; it runs out");
    }
}

/// Serves what another instance filled: into L1 behind the key's fence (as a promotion), and
/// to this load's waiters.
pub(super) async fn adopt(
    inner: &Inner,
    key: &str,
    entry: Arc<Entry>,
    seen: &Seen,
    early: &Early<(Arc<Entry>, Loaded)>,
) -> LoadResult {
    if inner.fences.may_cache(key, seen.token) {
        inner.l1.insert(key, entry.clone()).await;
        if !inner.fences.may_cache(key, seen.token) {
            inner.l1.remove(key).await;
        }
    }
    early.publish(&(entry.clone(), Loaded::AlreadyCached));
    Ok((entry, Loaded::AlreadyCached))
}
