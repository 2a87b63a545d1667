//! What a call gets from a breaker and gives back: the [`Permit`] that admits it or the
//! [`Rejected`] that refuses it, the [`Outcome`] it ends with, and the [`Transition`] it causes.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::state::{CircuitState, ProbeLease};
use crate::clock::from_millis;

/// Why a breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TransitionCause {
    /// `failure_threshold` calls in a row failed.
    ConsecutiveFailures,
    /// The failure rate over the window reached `failure_rate_threshold`.
    FailureRate,
    /// The recovery deadline passed and a probe was admitted.
    RecoveryElapsed,
    /// A half-open probe failed.
    ProbeFailed,
    /// `success_threshold` probes succeeded.
    ProbesSucceeded,
    /// Opened until an instant (a rate-limit reset).
    RateLimited,
    /// Forced open or closed by an operator.
    Forced,
    /// Reset by an operator.
    Reset,
    /// A saved state was restored in place of the current one.
    Restored,
    /// Tripped at once by a failure that will not pass within the next calls (a full disk).
    Tripped,
}

impl TransitionCause {
    /// The cause in snake case, e.g. `"consecutive_failures"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionCause::ConsecutiveFailures => "consecutive_failures",
            TransitionCause::FailureRate => "failure_rate",
            TransitionCause::RecoveryElapsed => "recovery_elapsed",
            TransitionCause::ProbeFailed => "probe_failed",
            TransitionCause::ProbesSucceeded => "probes_succeeded",
            TransitionCause::RateLimited => "rate_limited",
            TransitionCause::Forced => "forced",
            TransitionCause::Reset => "reset",
            TransitionCause::Restored => "restored",
            TransitionCause::Tripped => "tripped",
        }
    }
}

impl fmt::Display for TransitionCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of state, returned by the call that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Transition {
    /// The state before.
    pub from: CircuitState,
    /// The state after.
    pub to: CircuitState,
    /// Why.
    pub cause: TransitionCause,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.from, self.to, self.cause)
    }
}

/// Why a call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RejectReason {
    /// The breaker is open until its recovery deadline.
    Open,
    /// The breaker is held open until a rate-limit reset.
    RateLimited,
    /// The breaker is half-open and all its probe slots are taken.
    HalfOpenFull,
    /// The breaker was forced open.
    ForcedOpen,
}

impl RejectReason {
    /// `"open"`, `"rate_limited"`, `"half_open_full"` or `"forced_open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Open => "open",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::HalfOpenFull => "half_open_full",
            RejectReason::ForcedOpen => "forced_open",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call the breaker did not admit: why, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("circuit breaker rejected the call ({reason}){}", until_suffix(.until_ms))]
pub struct Rejected {
    pub(super) reason: RejectReason,
    pub(super) until_ms: Option<u64>,
}

fn until_suffix(until_ms: &Option<u64>) -> String {
    until_ms
        .map(|ms| format!(" until unix ms {ms}"))
        .unwrap_or_default()
}

impl Rejected {
    /// Why.
    pub fn reason(&self) -> RejectReason {
        self.reason
    }

    /// The earliest instant a call may be admitted: the recovery deadline or rate-limit reset
    /// when open, the first probe lease to expire when half-open and full (a slot may free up
    /// sooner, when a probe reports). `None` when forced open.
    pub fn until(&self) -> Option<SystemTime> {
        self.until_ms.map(from_millis)
    }

    /// [`until`](Self::until) in milliseconds since the UNIX epoch.
    pub fn until_ms(&self) -> Option<u64> {
        self.until_ms
    }

    /// Whether the breaker is held open by a rate limit.
    pub fn is_rate_limited(&self) -> bool {
        self.reason == RejectReason::RateLimited
    }
}

/// An admitted call. Hand it back with its [`Outcome`] to
/// [`CircuitBreaker::complete`](super::CircuitBreaker::complete) /
/// [`BreakerState::complete`](super::BreakerState::complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permit {
    pub(super) epoch: u64,
    pub(super) lease: Option<ProbeLease>,
    pub(super) transition: Option<Transition>,
}

impl Permit {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.lease.is_some()
    }

    /// When a probe's lease expires (its slot is handed out again); `None` for ordinary calls.
    pub fn lease_expires(&self) -> Option<SystemTime> {
        self.lease.map(|l| from_millis(l.expires_ms))
    }

    /// The transition admitting this call caused: `Open → HalfOpen` for the first probe.
    pub fn transition(&self) -> Option<Transition> {
        self.transition
    }
}

/// How an admitted call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// The tier answered (a value, "not modified", "not found" — anything that is not an
    /// outage). Counts as a failure if slower than the policy's `slow_call_threshold`.
    Success {
        /// How long the call took.
        latency: Duration,
    },
    /// The tier failed in a way that counts against it (5xx, timeout, connect error).
    Failure,
    /// The call ended without a verdict (cancelled, or an error that says nothing about the
    /// tier). A probe's lease is released; nothing is counted.
    Cancelled,
}

impl Outcome {
    /// [`Outcome::Success`].
    pub fn success(latency: Duration) -> Self {
        Outcome::Success { latency }
    }
}
