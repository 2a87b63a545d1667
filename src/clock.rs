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
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
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

/// `clock.now()` in milliseconds since the UNIX epoch.
#[inline]
pub(crate) fn now_millis(clock: &dyn Clock) -> u64 {
    to_millis(clock.now())
}

/// A duration in whole milliseconds, saturating.
#[inline]
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
