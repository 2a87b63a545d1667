//! Time, injected: every deadline in tiercache is read from a [`Clock`], so tests move time by hand
//! instead of sleeping.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
///
/// Deadlines are wall-clock instants because they are persisted in L2 and shared between processes
/// (a rate-limit reset, a breaker's next attempt). The default is [`SystemClock`]; tests use
/// [`MockClock`].
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;

    /// The current time in milliseconds since the UNIX epoch (0 before it), the unit deadlines
    /// are kept in. Provided from [`now`](Self::now); a clock that can read it more cheaply
    /// overrides it, as [`SystemClock`] does (every L1 hit reads it).
    #[inline]
    fn now_millis(&self) -> u64 {
        to_millis(self.now())
    }
}

/// A shared clock is a clock: builders take `impl Clock`, so an `Arc<dyn Clock>` (or an
/// `Arc<MockClock>`) fits wherever a clock does.
impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    #[inline]
    fn now(&self) -> SystemTime {
        (**self).now()
    }

    #[inline]
    fn now_millis(&self) -> u64 {
        (**self).now_millis()
    }
}

/// The operating system's wall clock, read coarsely where the system offers it.
///
/// On Linux, Android and FreeBSD this reads `CLOCK_REALTIME_COARSE`: the time of the last
/// scheduler tick (at most a few milliseconds old), from the vDSO without reading the hardware
/// counter, about a quarter of the cost of [`SystemTime::now`]. Every L1 hit reads the clock once,
/// and the deadlines it is compared with are whole milliseconds, so the precision given up is
/// never seen. Elsewhere it is [`SystemTime::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> SystemTime {
        match coarse() {
            Some((secs, nanos)) => UNIX_EPOCH + Duration::new(secs, nanos),
            None => SystemTime::now(),
        }
    }

    #[inline]
    fn now_millis(&self) -> u64 {
        match coarse() {
            Some((secs, nanos)) => secs
                .saturating_mul(1000)
                .saturating_add(u64::from(nanos / 1_000_000)),
            None => to_millis(SystemTime::now()),
        }
    }
}

/// `CLOCK_REALTIME_COARSE` as seconds and nanoseconds since the UNIX epoch; `None` before
/// 1970 or for a value the kernel does not give (the precise clock decides then).
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
#[inline]
fn coarse() -> Option<(u64, u32)> {
    use rustix::time::{clock_gettime, ClockId};
    let ts = clock_gettime(ClockId::RealtimeCoarse);
    match (u64::try_from(ts.tv_sec), u32::try_from(ts.tv_nsec)) {
        (Ok(secs), Ok(nanos)) if nanos < 1_000_000_000 => Some((secs, nanos)),
        _ => None,
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
#[inline]
fn coarse() -> Option<(u64, u32)> {
    None
}

/// A clock that only moves when told to. Clones share one time.
///
/// ```
/// use std::time::Duration;
/// use tiercache::{Clock, MockClock};
///
/// let clock = MockClock::new();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(clock.now().duration_since(t0).unwrap(), Duration::from_secs(90));
/// ```
#[derive(Debug, Clone)]
pub struct MockClock {
    millis: Arc<AtomicU64>,
}

impl Default for MockClock {
    fn default() -> Self {
        Self::new()
    }
}

impl MockClock {
    /// A mock clock starting at 2026-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self::at(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    }

    /// A mock clock starting at `t`.
    pub fn at(t: SystemTime) -> Self {
        Self {
            millis: Arc::new(AtomicU64::new(to_millis(t))),
        }
    }

    /// Moves time forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.millis
            .fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Sets the time to `t`.
    pub fn set(&self, t: SystemTime) {
        self.millis.store(to_millis(t), Ordering::SeqCst);
    }
}

impl Clock for MockClock {
    fn now(&self) -> SystemTime {
        from_millis(self.millis.load(Ordering::SeqCst))
    }

    fn now_millis(&self) -> u64 {
        self.millis.load(Ordering::SeqCst)
    }
}

/// Milliseconds since the UNIX epoch (0 for times before it), the unit deadlines are stored in.
#[inline]
pub(crate) fn to_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The inverse of [`to_millis`].
#[inline]
pub(crate) fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A duration in whole milliseconds, saturating.
#[inline]
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_reads_the_wall_clock() {
        // The coarse reading lags the precise one by at most a scheduler tick; a wrong clock
        // (a monotonic one, say) would be off by days or years.
        let precise = SystemTime::now();
        let coarse = SystemClock.now();
        let gap = match coarse.duration_since(precise) {
            Ok(ahead) => ahead,
            Err(behind) => behind.duration(),
        };
        assert!(gap < Duration::from_secs(1), "coarse clock off by {gap:?}");
        assert!(to_millis(coarse) > 1_700_000_000_000);
        let ms = SystemClock.now_millis();
        assert!(
            ms.abs_diff(to_millis(precise)) < 1000,
            "{ms} vs {precise:?}"
        );
    }
}
