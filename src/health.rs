//! [`HealthReport`]: whether each tier is working, in a form for a `/health` endpoint.

use std::fmt;
use std::time::SystemTime;

use serde::Serialize;

use crate::breaker::{BreakerStatus, CircuitState};

/// Healthy, degraded or unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Working normally.
    Healthy,
    /// Working, with something failing, bypassed or pending: a tier whose last calls failed
    /// (even before its breaker opens), a breaker not closed, dead letters, offline.
    Degraded,
    /// Only memory is left: L2 and the source are both unavailable.
    Unhealthy,
}

impl HealthStatus {
    /// `"healthy"`, `"degraded"` or `"unhealthy"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health of one tier.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TierHealth {
    /// The tier's own status.
    pub status: HealthStatus,
    /// Its circuit breaker (L2 and L3 have one).
    pub breaker: Option<BreakerStatus>,
    /// The last error seen.
    pub last_error: Option<String>,
    /// Consecutive failures counted by its breaker.
    pub consecutive_failures: u32,
    /// When the breaker lets the next call through, if it is open (RFC 3339 in JSON).
    #[serde(serialize_with = "crate::time::serde_rfc3339::option")]
    pub next_attempt: Option<SystemTime>,
}

impl TierHealth {
    pub(crate) fn healthy() -> Self {
        Self {
            status: HealthStatus::Healthy,
            breaker: None,
            last_error: None,
            consecutive_failures: 0,
            next_attempt: None,
        }
    }

    /// From the worse of several breakers of one tier (L2 has one for reads, one for writes).
    pub(crate) fn from_breakers(
        breakers: impl IntoIterator<Item = BreakerStatus>,
        last_error: Option<String>,
    ) -> Self {
        let worst = breakers.into_iter().max_by_key(|b| match b.state {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        });
        match worst {
            Some(b) => Self::from_breaker(b, last_error),
            None => Self::healthy(),
        }
    }

    pub(crate) fn from_breaker(breaker: BreakerStatus, last_error: Option<String>) -> Self {
        // Degraded as soon as a call failed: a closed breaker still counting failures is a
        // tier that is failing now, not only one whose breaker has tripped.
        let status = match breaker.state {
            CircuitState::Closed if breaker.consecutive_failures == 0 => HealthStatus::Healthy,
            _ => HealthStatus::Degraded,
        };
        let next_attempt = (breaker.state != CircuitState::Closed)
            .then_some(breaker.next_attempt)
            .flatten();
        Self {
            status,
            consecutive_failures: breaker.consecutive_failures,
            next_attempt,
            breaker: Some(breaker),
            last_error,
        }
    }
}

/// The write-behind backlog.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BacklogHealth {
    /// Writes waiting for delivery.
    pub pending: u64,
    /// Writes the source refused for good.
    pub dead_letters: u64,
    /// Age of the oldest pending write, in milliseconds.
    pub oldest_pending_age_ms: Option<u64>,
}

/// What [`TieredCache::health`](crate::TieredCache::health) reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// The overall status: unhealthy when L2 and L3 are both unavailable, degraded when any
    /// tier is, or dead letters are waiting, or the cache is offline.
    pub status: HealthStatus,
    /// Memory.
    pub l1: TierHealth,
    /// L2 (SQLite, or the store given to
    /// [`TieredCacheBuilder::store`](crate::TieredCacheBuilder::store)).
    pub l2: TierHealth,
    /// The source.
    pub l3: TierHealth,
    /// Whether offline mode is on.
    pub offline: bool,
    /// The write-behind backlog (none under other strategies).
    pub backlog: Option<BacklogHealth>,
    /// Whether this cache hears of other instances' writes now (L2's listener is connected):
    /// `None` for an L2 that does not publish them (SQLite); `false` (degraded) while it is
    /// disconnected, when L1 may serve a copy older than a write made elsewhere.
    pub invalidations: Option<bool>,
}

impl HealthReport {
    pub(crate) fn overall(
        l2: TierHealth,
        l3: TierHealth,
        offline: bool,
        backlog: Option<BacklogHealth>,
    ) -> Self {
        let l2_down = l2.status != HealthStatus::Healthy;
        let l3_down = l3.status != HealthStatus::Healthy || offline;
        let dead = backlog.as_ref().is_some_and(|b| b.dead_letters > 0);
        let status = if l2_down && l3_down {
            HealthStatus::Unhealthy
        } else if l2_down || l3_down || dead {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        Self {
            status,
            l1: TierHealth::healthy(),
            l2,
            l3,
            offline,
            backlog,
            invalidations: None,
        }
    }

    /// With the state of the invalidation listener; a disconnected one degrades a healthy
    /// report.
    pub(crate) fn with_invalidations(mut self, listening: Option<bool>) -> Self {
        self.invalidations = listening;
        if listening == Some(false) && self.status == HealthStatus::Healthy {
            self.status = HealthStatus::Degraded;
        }
        self
    }
}

impl fmt::Display for HealthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "status: {}", self.status)?;
        for (name, t) in [("l1", &self.l1), ("l2", &self.l2), ("l3", &self.l3)] {
            write!(f, "{name}: {}", t.status)?;
            if let Some(b) = &t.breaker {
                write!(f, " (breaker {}", b.state)?;
                if t.consecutive_failures > 0 {
                    write!(f, ", {} consecutive failures", t.consecutive_failures)?;
                }
                f.write_str(")")?;
            }
            if let Some(e) = &t.last_error {
                write!(f, " last error: {e}")?;
            }
            writeln!(f)?;
        }
        if self.offline {
            writeln!(f, "offline mode: on")?;
        }
        match self.invalidations {
            Some(true) => writeln!(f, "invalidations: listening")?,
            Some(false) => writeln!(f, "invalidations: not listening (reconnecting)")?,
            None => {}
        }
        if let Some(b) = &self.backlog {
            writeln!(
                f,
                "write-behind: {} pending, {} dead letters",
                b.pending, b.dead_letters
            )?;
        }
        Ok(())
    }
}
