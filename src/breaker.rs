//! The circuit breaker: stop calling a tier that is failing, probe it now and then, and resume
//! when it answers again.
//!
//! tiercache wraps one breaker around L3 (the source) and one around L2 (SQLite). The L3 breaker's
//! whole state is persisted in L2, so several short-lived processes share one breaker and a
//! restarted process does not hammer a source that is known to be down or out of budget.
//!
//! # States
//!
//! ```text
//!            N consecutive failures, or failure rate ≥ R
//!            over the window (with ≥ minimum calls)
//!   ┌────────┐ ──────────────────────────────────────▶ ┌──────┐
//!   │ Closed │                                          │ Open │ ◀─┐ rejects every call until
//!   └────────┘ ◀──────────┐                             └──────┘   │ its recovery timeout (and
//!                         │ M successes                     │      │ any rate-limit reset) passed
//!                         │                first call after │      │
//!                    ┌──────────┐           the timeout     │      │ a probe fails: reopen with
//!                    │ HalfOpen │ ◀─────────────────────────┘      │ a longer timeout
//!                    └──────────┘ ─────────────────────────────────┘
//! ```
//!
//! - **Closed**: every call is admitted. The breaker opens when
//!   [`failure_threshold`](BreakerPolicy::failure_threshold) calls in a row fail, or when, over the
//!   sliding [`window`](BreakerPolicy::window), at least
//!   [`minimum_calls`](BreakerPolicy::minimum_calls) were made and the share of failures is at least
//!   [`failure_rate_threshold`](BreakerPolicy::failure_rate_threshold). Both rules are evaluated
//!   when a failure is recorded. A success slower than
//!   [`slow_call_threshold`](BreakerPolicy::slow_call_threshold) counts as a failure.
//! - **Open**: every call is rejected with a [`Rejected`] that says until when. The recovery
//!   timeout of the n-th opening in a row is `base_recovery × recovery_multiplier^(n-1)`, capped
//!   at `max_recovery`, then multiplied by a random factor in `[1 - jitter, 1 + jitter]` (and
//!   capped at `max_recovery` again, so that is a hard ceiling). [`BreakerState::open_until`]
//!   keeps the breaker open until at least a given instant, whatever the timeout says: this is how
//!   a rate-limit reset is honoured ("send nothing until the reset").
//! - **HalfOpen**: entered lazily, by the first [`try_acquire`](BreakerState::try_acquire) at or
//!   after the recovery deadline. At most
//!   [`half_open_probes`](BreakerPolicy::half_open_probes) probe calls run at once; each holds a
//!   *lease* that expires after [`probe_timeout`](BreakerPolicy::probe_timeout), so a probe whose
//!   process crashed does not block the breaker forever.
//!   [`success_threshold`](BreakerPolicy::success_threshold) successful probes close the breaker
//!   (and reset the backoff); one failed probe reopens it with the next, longer timeout.
//!
//! An operator can also [force it open](CircuitBreaker::force_open) or
//! [closed](CircuitBreaker::force_close) until [`reset`](CircuitBreaker::reset).
//!
//! # Two layers
//!
//! - [`BreakerState`] is the whole state as plain, serializable data, with wall-clock times in
//!   milliseconds since the UNIX epoch, and the state machine as methods that take the time and
//!   the [`BreakerPolicy`] explicitly: no clock, no lock. Store it anywhere (tiercache stores it as
//!   JSON in SQLite), load it in another process, carry on.
//! - [`CircuitBreaker`] wraps a state in a mutex with a policy and a [`Clock`], logs every
//!   [`Transition`] as a `tracing` event, and is what most code uses.
//!
//! Every mutating call returns the [`Transition`] it caused, if any, so the caller can publish
//! events.
//!
//! # Reporting results
//!
//! The precise way is [`CircuitBreaker::complete`] with the [`Permit`] that admitted the call: a
//! result that arrives after the breaker changed state (a slow call admitted while closed that
//! fails after the breaker already went half-open) is then ignored, and a probe releases exactly
//! its own lease. [`record_success`](CircuitBreaker::record_success) and
//! [`record_failure`](CircuitBreaker::record_failure) are the permit-less shorthand: the result is
//! taken to belong to the current state.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::clock::{from_millis, millis, Clock};
use crate::error::{Error, Result};

/// Number of time buckets in the sliding failure-rate window. Each covers `window / BUCKETS`.
pub const WINDOW_BUCKETS: usize = 10;

/// The largest accepted [`BreakerPolicy::half_open_probes`], so a persisted state stays small.
pub const MAX_HALF_OPEN_PROBES: u32 = 1024;

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

/// When a breaker opens, how long it stays open, and how it probes its way back.
///
/// Built with [`BreakerPolicy::builder`], which validates; [`Default`] gives the documented
/// defaults. Serialized with durations as whole milliseconds (`window_ms`, `base_recovery_ms`,
/// ...); deserializing validates too, and missing fields take their defaults.
///
/// ```
/// use std::time::Duration;
/// use tiercache::breaker::BreakerPolicy;
///
/// let policy = BreakerPolicy::builder()
///     .failure_threshold(3)
///     .base_recovery(Duration::from_secs(1))
///     .jitter(0.0)
///     .build()?;
/// assert_eq!(policy.failure_threshold(), 3);
/// assert_eq!(policy.recovery_timeout(3), Duration::from_secs(4));
/// # Ok::<(), tiercache::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicyRepr", into = "PolicyRepr")]
#[non_exhaustive]
pub struct BreakerPolicy {
    failure_threshold: u32,
    failure_rate_threshold: f64,
    window: Duration,
    minimum_calls: u32,
    slow_call_threshold: Option<Duration>,
    base_recovery: Duration,
    recovery_multiplier: f64,
    max_recovery: Duration,
    jitter: f64,
    half_open_probes: u32,
    success_threshold: u32,
    probe_timeout: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_rate_threshold: 0.5,
            window: Duration::from_secs(60),
            minimum_calls: 10,
            slow_call_threshold: None,
            base_recovery: Duration::from_secs(5),
            recovery_multiplier: 2.0,
            max_recovery: Duration::from_secs(300),
            jitter: 0.2,
            half_open_probes: 1,
            success_threshold: 1,
            probe_timeout: Duration::from_secs(30),
        }
    }
}

impl BreakerPolicy {
    /// A builder starting from the defaults.
    pub fn builder() -> BreakerPolicyBuilder {
        BreakerPolicyBuilder {
            policy: Self::default(),
        }
    }

    /// A builder starting from this policy.
    pub fn to_builder(&self) -> BreakerPolicyBuilder {
        BreakerPolicyBuilder {
            policy: self.clone(),
        }
    }

    /// Consecutive failures (in the closed state) that open the breaker. Default: 5.
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold
    }

    /// Share of failed calls over the window, in `0.0..=1.0`, that opens the breaker once
    /// [`minimum_calls`](Self::minimum_calls) were made in it. At least one failure is always
    /// needed. Default: 0.5.
    pub fn failure_rate_threshold(&self) -> f64 {
        self.failure_rate_threshold
    }

    /// Length of the sliding window of the failure-rate rule. Default: 60 s.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Calls needed in the window before the failure-rate rule applies. Default: 10.
    pub fn minimum_calls(&self) -> u32 {
        self.minimum_calls
    }

    /// A successful call slower than this counts as a failure. Default: `None` (off).
    pub fn slow_call_threshold(&self) -> Option<Duration> {
        self.slow_call_threshold
    }

    /// Recovery timeout of the first opening. Default: 5 s.
    pub fn base_recovery(&self) -> Duration {
        self.base_recovery
    }

    /// Factor applied to the recovery timeout for each further opening in a row. Default: 2.0.
    pub fn recovery_multiplier(&self) -> f64 {
        self.recovery_multiplier
    }

    /// Ceiling of the recovery timeout, jitter included. Default: 5 min.
    pub fn max_recovery(&self) -> Duration {
        self.max_recovery
    }

    /// Random spread of the recovery timeout: it is multiplied by a factor drawn uniformly from
    /// `[1 - jitter, 1 + jitter]` (then capped at [`max_recovery`](Self::max_recovery)), so
    /// clients that failed together do not probe together. Default: 0.2.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Probe calls admitted at once in the half-open state. Default: 1.
    pub fn half_open_probes(&self) -> u32 {
        self.half_open_probes
    }

    /// Successful probes that close the breaker. Default: 1.
    pub fn success_threshold(&self) -> u32 {
        self.success_threshold
    }

    /// How long a half-open probe's lease lasts: if its result never comes (the process crashed,
    /// the future was dropped), its slot is free again after this. Default: 30 s.
    pub fn probe_timeout(&self) -> Duration {
        self.probe_timeout
    }

    /// The recovery timeout of the `opening`-th opening in a row (1-based), before jitter:
    /// `base_recovery × recovery_multiplier^(opening-1)`, capped at `max_recovery`.
    pub fn recovery_timeout(&self, opening: u32) -> Duration {
        Duration::from_millis(self.recovery_ms(opening))
    }

    fn recovery_ms(&self, opening: u32) -> u64 {
        let base = millis(self.base_recovery) as f64;
        let max = millis(self.max_recovery);
        let exp = i32::try_from(opening.saturating_sub(1)).unwrap_or(i32::MAX);
        let raw = base * self.recovery_multiplier.powi(exp);
        if raw.is_finite() && raw < max as f64 {
            raw.round() as u64
        } else {
            max
        }
    }

    /// The jittered recovery timeout in milliseconds; `unit` is a random number in `[0, 1)`.
    fn jittered_recovery_ms(&self, opening: u32, unit: f64) -> u64 {
        let capped = self.recovery_ms(opening);
        if self.jitter <= 0.0 {
            return capped.max(1);
        }
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        let jittered = (capped as f64 * factor).round();
        let max = millis(self.max_recovery);
        if jittered.is_finite() && jittered < max as f64 {
            (jittered as u64).max(1)
        } else {
            max.max(1)
        }
    }

    fn bucket_ms(&self) -> u64 {
        (millis(self.window) / WINDOW_BUCKETS as u64).max(1)
    }

    fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(format!("breaker policy: {msg}")));
        if self.failure_threshold == 0 {
            return fail("failure_threshold must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.failure_rate_threshold) {
            return fail(format!(
                "failure_rate_threshold must be within 0.0..=1.0, got {}",
                self.failure_rate_threshold
            ));
        }
        if millis(self.window) < WINDOW_BUCKETS as u64 {
            return fail(format!(
                "window must be at least {WINDOW_BUCKETS} ms, got {:?}",
                self.window
            ));
        }
        if self.minimum_calls == 0 {
            return fail("minimum_calls must be at least 1".into());
        }
        if let Some(slow) = self.slow_call_threshold {
            if millis(slow) == 0 {
                return fail("slow_call_threshold must be at least 1 ms (or None)".into());
            }
        }
        if millis(self.base_recovery) == 0 {
            return fail("base_recovery must be at least 1 ms".into());
        }
        if !(self.recovery_multiplier.is_finite() && self.recovery_multiplier >= 1.0) {
            return fail(format!(
                "recovery_multiplier must be a finite number >= 1.0, got {}",
                self.recovery_multiplier
            ));
        }
        if self.max_recovery < self.base_recovery {
            return fail(format!(
                "max_recovery ({:?}) must not be shorter than base_recovery ({:?})",
                self.max_recovery, self.base_recovery
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return fail(format!(
                "jitter must be within 0.0..=1.0, got {}",
                self.jitter
            ));
        }
        if self.half_open_probes == 0 || self.half_open_probes > MAX_HALF_OPEN_PROBES {
            return fail(format!(
                "half_open_probes must be within 1..={MAX_HALF_OPEN_PROBES}, got {}",
                self.half_open_probes
            ));
        }
        if self.success_threshold == 0 {
            return fail("success_threshold must be at least 1".into());
        }
        if millis(self.probe_timeout) == 0 {
            return fail("probe_timeout must be at least 1 ms".into());
        }
        Ok(())
    }
}

/// Builds a validated [`BreakerPolicy`]. Every setter documents its default.
#[derive(Debug, Clone)]
#[must_use]
pub struct BreakerPolicyBuilder {
    policy: BreakerPolicy,
}

impl BreakerPolicyBuilder {
    /// Consecutive failures (in the closed state) that open the breaker; at least 1. Default: 5.
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.policy.failure_threshold = n;
        self
    }

    /// Share of failed calls over the window that opens the breaker, in `0.0..=1.0`. At least
    /// one failure is always needed, so `0.0` means "any failure once `minimum_calls` were made".
    /// Default: 0.5.
    pub fn failure_rate_threshold(mut self, rate: f64) -> Self {
        self.policy.failure_rate_threshold = rate;
        self
    }

    /// Length of the sliding window of the failure-rate rule, at least 10 ms. It is kept as
    /// [`WINDOW_BUCKETS`] buckets, so it effectively slides by a tenth of its length. Default: 60 s.
    pub fn window(mut self, window: Duration) -> Self {
        self.policy.window = window;
        self
    }

    /// Calls needed in the window before the failure-rate rule applies; at least 1. Set it to
    /// `u32::MAX` to turn the rule off. Default: 10.
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.policy.minimum_calls = n;
        self
    }

    /// A successful call slower than this counts as a failure. Default: `None` (off).
    pub fn slow_call_threshold(mut self, threshold: impl Into<Option<Duration>>) -> Self {
        self.policy.slow_call_threshold = threshold.into();
        self
    }

    /// Recovery timeout of the first opening, at least 1 ms. Default: 5 s.
    pub fn base_recovery(mut self, d: Duration) -> Self {
        self.policy.base_recovery = d;
        self
    }

    /// Factor applied to the recovery timeout for each further opening in a row, at least 1.0.
    /// Default: 2.0.
    pub fn recovery_multiplier(mut self, m: f64) -> Self {
        self.policy.recovery_multiplier = m;
        self
    }

    /// Ceiling of the recovery timeout, jitter included; not shorter than `base_recovery`.
    /// Default: 5 min.
    pub fn max_recovery(mut self, d: Duration) -> Self {
        self.policy.max_recovery = d;
        self
    }

    /// Random spread of the recovery timeout, in `0.0..=1.0`: the timeout is multiplied by a
    /// factor drawn uniformly from `[1 - jitter, 1 + jitter]`, then capped at `max_recovery`.
    /// `0.0` makes timeouts exact. Default: 0.2.
    pub fn jitter(mut self, j: f64) -> Self {
        self.policy.jitter = j;
        self
    }

    /// Probe calls admitted at once in the half-open state, within
    /// `1..=`[`MAX_HALF_OPEN_PROBES`]. Default: 1.
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.policy.half_open_probes = n;
        self
    }

    /// Successful probes that close the breaker; at least 1. Default: 1.
    pub fn success_threshold(mut self, n: u32) -> Self {
        self.policy.success_threshold = n;
        self
    }

    /// How long a half-open probe's lease lasts before its slot is handed out again, at least
    /// 1 ms. Default: 30 s.
    pub fn probe_timeout(mut self, d: Duration) -> Self {
        self.policy.probe_timeout = d;
        self
    }

    /// The policy.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when a value is out of range: a zero threshold or count, a rate or jitter
    /// outside `0.0..=1.0`, a multiplier below 1, `max_recovery` shorter than `base_recovery`, a
    /// zero duration, a window shorter than 10 ms.
    pub fn build(self) -> Result<BreakerPolicy> {
        self.policy.validate()?;
        Ok(self.policy)
    }
}

/// The serialized form of a [`BreakerPolicy`]: durations in whole milliseconds.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PolicyRepr {
    failure_threshold: u32,
    failure_rate_threshold: f64,
    window_ms: u64,
    minimum_calls: u32,
    slow_call_threshold_ms: Option<u64>,
    base_recovery_ms: u64,
    recovery_multiplier: f64,
    max_recovery_ms: u64,
    jitter: f64,
    half_open_probes: u32,
    success_threshold: u32,
    probe_timeout_ms: u64,
}

impl Default for PolicyRepr {
    fn default() -> Self {
        BreakerPolicy::default().into()
    }
}

impl From<BreakerPolicy> for PolicyRepr {
    fn from(p: BreakerPolicy) -> Self {
        Self {
            failure_threshold: p.failure_threshold,
            failure_rate_threshold: p.failure_rate_threshold,
            window_ms: millis(p.window),
            minimum_calls: p.minimum_calls,
            slow_call_threshold_ms: p.slow_call_threshold.map(millis),
            base_recovery_ms: millis(p.base_recovery),
            recovery_multiplier: p.recovery_multiplier,
            max_recovery_ms: millis(p.max_recovery),
            jitter: p.jitter,
            half_open_probes: p.half_open_probes,
            success_threshold: p.success_threshold,
            probe_timeout_ms: millis(p.probe_timeout),
        }
    }
}

impl TryFrom<PolicyRepr> for BreakerPolicy {
    type Error = Error;

    fn try_from(r: PolicyRepr) -> Result<Self> {
        let policy = BreakerPolicy {
            failure_threshold: r.failure_threshold,
            failure_rate_threshold: r.failure_rate_threshold,
            window: Duration::from_millis(r.window_ms),
            minimum_calls: r.minimum_calls,
            slow_call_threshold: r.slow_call_threshold_ms.map(Duration::from_millis),
            base_recovery: Duration::from_millis(r.base_recovery_ms),
            recovery_multiplier: r.recovery_multiplier,
            max_recovery: Duration::from_millis(r.max_recovery_ms),
            jitter: r.jitter,
            half_open_probes: r.half_open_probes,
            success_threshold: r.success_threshold,
            probe_timeout: Duration::from_millis(r.probe_timeout_ms),
        };
        policy.validate()?;
        Ok(policy)
    }
}

// ---------------------------------------------------------------------------------------------
// Small types
// ---------------------------------------------------------------------------------------------

/// The three states of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls are admitted; failures are counted.
    #[default]
    Closed,
    /// Calls are rejected until the recovery deadline.
    Open,
    /// A limited number of probe calls decide between closing and reopening.
    HalfOpen,
}

impl CircuitState {
    /// `"closed"`, `"open"` or `"half_open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator's override, set by `force_open` / `force_close` and cleared by `reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forced {
    /// Every call is rejected; results change nothing.
    Open,
    /// Every call is admitted; results are counted but never open the breaker.
    Closed,
}

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
    reason: RejectReason,
    until_ms: Option<u64>,
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
/// [`CircuitBreaker::complete`] / [`BreakerState::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permit {
    epoch: u64,
    lease: Option<ProbeLease>,
    transition: Option<Transition>,
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

/// A half-open probe's claim on one of the probe slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeLease {
    /// Unique within one breaker state.
    pub id: u64,
    /// When the slot is free again if no result came, in ms since the UNIX epoch.
    pub expires_ms: u64,
}

/// One time slice of the sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WindowBucket {
    /// Start of the slice, in ms since the UNIX epoch; the slice lasts `window / WINDOW_BUCKETS`.
    pub start_ms: u64,
    /// Calls recorded in it.
    pub calls: u64,
    /// Failures recorded in it.
    pub failures: u64,
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// The whole state of a breaker as plain data, and the state machine as methods that take the
/// time (`now_ms`, milliseconds since the UNIX epoch) and the policy explicitly.
///
/// It round-trips through serde (tiercache stores it as JSON in SQLite); fields missing from a
/// stored state take their defaults. Its size is bounded: [`WINDOW_BUCKETS`] buckets and at most
/// `half_open_probes` leases.
///
/// ```
/// use std::time::Duration;
/// use tiercache::breaker::{BreakerPolicy, BreakerState, CircuitState};
///
/// let policy = BreakerPolicy::builder().failure_threshold(2).jitter(0.0).build()?;
/// let mut state = BreakerState::new();
/// let now = 1_000_000;
/// state.on_failure(now, &policy);
/// let t = state.on_failure(now, &policy).expect("opened");
/// assert_eq!(t.to, CircuitState::Open);
///
/// let json = serde_json::to_string(&state).unwrap();
/// let mut again: BreakerState = serde_json::from_str(&json).unwrap();
/// assert!(again.try_acquire(now + 4_999, &policy).is_err());
/// assert!(again.try_acquire(now + 5_000, &policy)?.is_probe());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakerState {
    state: CircuitState,
    forced: Option<Forced>,
    consecutive_failures: u32,
    buckets: [WindowBucket; WINDOW_BUCKETS],
    openings: u32,
    next_attempt_ms: u64,
    open_until_ms: u64,
    probes: Vec<ProbeLease>,
    next_probe_id: u64,
    half_open_successes: u32,
    transitions: u64,
}

impl BreakerState {
    /// A closed breaker with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Closed, open or half-open.
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// The operator's override, if any.
    pub fn forced(&self) -> Option<Forced> {
        self.forced
    }

    /// Failures in a row while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Openings in a row since the breaker last closed; drives the backoff.
    pub fn openings(&self) -> u32 {
        self.openings
    }

    /// When an open breaker may go half-open (ms since the UNIX epoch; 0 when not set).
    pub fn next_attempt_ms(&self) -> u64 {
        self.next_attempt_ms
    }

    /// The instant the breaker is held open until by [`open_until`](Self::open_until) (ms since
    /// the UNIX epoch; 0 when not set).
    pub fn open_until_ms(&self) -> u64 {
        self.open_until_ms
    }

    /// The leases of the half-open probes in flight (expired ones included until the next
    /// [`try_acquire`](Self::try_acquire)).
    pub fn probes(&self) -> &[ProbeLease] {
        &self.probes
    }

    /// Successful probes since the breaker went half-open.
    pub fn half_open_successes(&self) -> u32 {
        self.half_open_successes
    }

    /// State changes since this state was created.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// The buckets of the sliding window, raw (stale ones included).
    pub fn buckets(&self) -> &[WindowBucket; WINDOW_BUCKETS] {
        &self.buckets
    }

    /// Calls and failures recorded over the window ending at `now_ms`.
    pub fn window_counts(&self, now_ms: u64, policy: &BreakerPolicy) -> (u64, u64) {
        let window_ms = policy.bucket_ms() * WINDOW_BUCKETS as u64;
        self.buckets
            .iter()
            .filter(|b| b.calls > 0 && b.start_ms.saturating_add(window_ms) > now_ms)
            .fold((0u64, 0u64), |(c, f), b| {
                (c.saturating_add(b.calls), f.saturating_add(b.failures))
            })
    }

    /// The share of failed calls over the window ending at `now_ms`; `None` when there were none.
    pub fn failure_rate(&self, now_ms: u64, policy: &BreakerPolicy) -> Option<f64> {
        let (calls, failures) = self.window_counts(now_ms, policy);
        (calls > 0).then(|| failures as f64 / calls as f64)
    }

    /// The instant an open breaker may go half-open: the later of the recovery deadline and
    /// the rate-limit reset.
    fn reopen_at(&self) -> u64 {
        self.next_attempt_ms.max(self.open_until_ms)
    }

    /// Whether a call would be admitted at `now_ms`, changing nothing.
    ///
    /// # Errors
    ///
    /// The [`Rejected`] that [`try_acquire`](Self::try_acquire) would return.
    pub fn check(&self, now_ms: u64, policy: &BreakerPolicy) -> Result<(), Rejected> {
        match self.forced {
            Some(Forced::Open) => {
                return Err(Rejected {
                    reason: RejectReason::ForcedOpen,
                    until_ms: None,
                })
            }
            Some(Forced::Closed) => return Ok(()),
            None => {}
        }
        match self.state {
            CircuitState::Closed => Ok(()),
            CircuitState::Open => {
                let until = self.reopen_at();
                if now_ms >= until {
                    Ok(())
                } else {
                    let reason = if self.open_until_ms > now_ms
                        && self.open_until_ms >= self.next_attempt_ms
                    {
                        RejectReason::RateLimited
                    } else {
                        RejectReason::Open
                    };
                    Err(Rejected {
                        reason,
                        until_ms: Some(until),
                    })
                }
            }
            CircuitState::HalfOpen => {
                let live = self.probes.iter().filter(|p| p.expires_ms > now_ms);
                let (count, earliest) =
                    live.fold((0usize, u64::MAX), |(n, e), p| (n + 1, e.min(p.expires_ms)));
                if count < policy.half_open_probes as usize {
                    Ok(())
                } else {
                    Err(Rejected {
                        reason: RejectReason::HalfOpenFull,
                        until_ms: Some(earliest),
                    })
                }
            }
        }
    }

    /// Asks to make a call at `now_ms`. An open breaker whose deadline passed goes half-open
    /// here (the permit carries that [`Transition`]); a half-open breaker hands out a probe
    /// lease if a slot is free, reclaiming expired leases first.
    ///
    /// # Errors
    ///
    /// [`Rejected`] when open (until the deadline or rate-limit reset), forced open, or
    /// half-open with every probe slot taken.
    pub fn try_acquire(&mut self, now_ms: u64, policy: &BreakerPolicy) -> Result<Permit, Rejected> {
        self.check(now_ms, policy)?;
        if self.forced == Some(Forced::Closed) || self.state == CircuitState::Closed {
            return Ok(Permit {
                epoch: self.transitions,
                lease: None,
                transition: None,
            });
        }
        let transition = if self.state == CircuitState::Open {
            self.half_open_successes = 0;
            self.transition(CircuitState::HalfOpen, TransitionCause::RecoveryElapsed)
        } else {
            None
        };
        self.probes.retain(|p| p.expires_ms > now_ms);
        let lease = ProbeLease {
            id: self.next_probe_id,
            expires_ms: now_ms.saturating_add(millis(policy.probe_timeout)),
        };
        self.next_probe_id = self.next_probe_id.wrapping_add(1);
        self.probes.push(lease);
        Ok(Permit {
            epoch: self.transitions,
            lease: Some(lease),
            transition,
        })
    }

    /// Reports how the call admitted by `permit` ended. A permit issued before the breaker last
    /// changed state is ignored (its call says nothing about the current state); a probe
    /// releases its own lease.
    pub fn complete(
        &mut self,
        permit: Permit,
        outcome: Outcome,
        now_ms: u64,
        policy: &BreakerPolicy,
    ) -> Option<Transition> {
        if permit.epoch != self.transitions {
            return None;
        }
        if let Some(lease) = permit.lease {
            self.probes.retain(|p| p.id != lease.id);
        }
        self.record(outcome, now_ms, policy)
    }

    /// Records a successful call without its permit: it is taken to belong to the current
    /// state (in half-open, it releases the oldest probe lease). A call slower than the policy's
    /// `slow_call_threshold` counts as a failure.
    pub fn on_success(
        &mut self,
        now_ms: u64,
        latency: Duration,
        policy: &BreakerPolicy,
    ) -> Option<Transition> {
        self.release_oldest_probe();
        self.record(Outcome::Success { latency }, now_ms, policy)
    }

    /// Records a failed call without its permit: it is taken to belong to the current state
    /// (in half-open, it reopens the breaker).
    pub fn on_failure(&mut self, now_ms: u64, policy: &BreakerPolicy) -> Option<Transition> {
        self.release_oldest_probe();
        self.record(Outcome::Failure, now_ms, policy)
    }

    fn release_oldest_probe(&mut self) {
        if self.state != CircuitState::HalfOpen {
            return;
        }
        let oldest = self
            .probes
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| (p.expires_ms, p.id))
            .map(|(i, _)| i);
        if let Some(i) = oldest {
            self.probes.remove(i);
        }
    }

    fn record(
        &mut self,
        outcome: Outcome,
        now_ms: u64,
        policy: &BreakerPolicy,
    ) -> Option<Transition> {
        let failed = match outcome {
            Outcome::Cancelled => return None,
            Outcome::Failure => true,
            Outcome::Success { latency } => policy.slow_call_threshold.is_some_and(|t| latency > t),
        };
        match self.forced {
            Some(Forced::Open) => return None,
            Some(Forced::Closed) => {
                self.count(now_ms, failed, policy);
                return None;
            }
            None => {}
        }
        match self.state {
            CircuitState::Open => None,
            CircuitState::Closed => {
                self.count(now_ms, failed, policy);
                if !failed {
                    return None;
                }
                if self.consecutive_failures >= policy.failure_threshold {
                    return self.open(now_ms, policy, TransitionCause::ConsecutiveFailures);
                }
                let (calls, failures) = self.window_counts(now_ms, policy);
                if failures > 0
                    && calls >= u64::from(policy.minimum_calls)
                    && failures as f64 >= policy.failure_rate_threshold * calls as f64
                {
                    return self.open(now_ms, policy, TransitionCause::FailureRate);
                }
                None
            }
            CircuitState::HalfOpen => {
                if failed {
                    return self.open(now_ms, policy, TransitionCause::ProbeFailed);
                }
                self.half_open_successes = self.half_open_successes.saturating_add(1);
                if self.half_open_successes >= policy.success_threshold {
                    self.clear_counts();
                    return self.transition(CircuitState::Closed, TransitionCause::ProbesSucceeded);
                }
                None
            }
        }
    }

    /// Counts one call in the window and in the consecutive-failure count.
    fn count(&mut self, now_ms: u64, failed: bool, policy: &BreakerPolicy) {
        let width = policy.bucket_ms();
        let start = now_ms - now_ms % width;
        let slot = ((now_ms / width) % WINDOW_BUCKETS as u64) as usize;
        if let Some(bucket) = self.buckets.get_mut(slot) {
            if bucket.start_ms != start {
                *bucket = WindowBucket {
                    start_ms: start,
                    calls: 0,
                    failures: 0,
                };
            }
            bucket.calls = bucket.calls.saturating_add(1);
            if failed {
                bucket.failures = bucket.failures.saturating_add(1);
            }
        }
        self.consecutive_failures = if failed {
            self.consecutive_failures.saturating_add(1)
        } else {
            0
        };
    }

    /// Forgets failures, window, backoff and probes (on closing).
    fn clear_counts(&mut self) {
        self.consecutive_failures = 0;
        self.buckets = Default::default();
        self.openings = 0;
        self.next_attempt_ms = 0;
        self.probes.clear();
        self.half_open_successes = 0;
    }

    /// Opens with the next recovery timeout.
    fn open(
        &mut self,
        now_ms: u64,
        policy: &BreakerPolicy,
        cause: TransitionCause,
    ) -> Option<Transition> {
        self.openings = self.openings.saturating_add(1);
        let unit = if policy.jitter > 0.0 {
            fastrand::f64()
        } else {
            0.5
        };
        let timeout = policy.jittered_recovery_ms(self.openings, unit);
        self.next_attempt_ms = now_ms.saturating_add(timeout);
        // The consecutive failures stay visible while open (health reports them); closing
        // clears them.
        self.probes.clear();
        self.half_open_successes = 0;
        self.transition(CircuitState::Open, cause)
    }

    /// Moves to `to`, counting the transition when the state changes.
    fn transition(&mut self, to: CircuitState, cause: TransitionCause) -> Option<Transition> {
        let from = self.state;
        if from == to {
            return None;
        }
        self.state = to;
        self.transitions = self.transitions.wrapping_add(1);
        Some(Transition { from, to, cause })
    }

    /// Holds the breaker open until at least `until_ms` (a rate-limit reset: "send nothing until
    /// then"). A later, shorter call never shortens it. When it passes, the breaker goes
    /// half-open and probes as usual; the backoff is not lengthened. Does nothing when
    /// `until_ms` is not after `now_ms`, or while forced closed.
    pub fn open_until(&mut self, now_ms: u64, until_ms: u64) -> Option<Transition> {
        if until_ms <= now_ms || self.forced == Some(Forced::Closed) {
            return None;
        }
        self.open_until_ms = self.open_until_ms.max(until_ms);
        if self.state == CircuitState::Open {
            return None;
        }
        self.consecutive_failures = 0;
        self.probes.clear();
        self.half_open_successes = 0;
        self.transition(CircuitState::Open, TransitionCause::RateLimited)
    }

    /// Closed, no failure counted, not forced: the state of a healthy dependency, where a
    /// success changes nothing worth recording.
    pub fn is_clean(&self) -> bool {
        self.state == CircuitState::Closed
            && self.consecutive_failures == 0
            && self.forced.is_none()
    }

    /// Opens at once (from closed or half-open) with the next recovery timeout, for a failure
    /// that will not pass within the next calls, such as a full disk. Does nothing while forced
    /// or already open.
    pub fn trip(&mut self, now_ms: u64, policy: &BreakerPolicy) -> Option<Transition> {
        if self.forced.is_some() || self.state == CircuitState::Open {
            return None;
        }
        self.open(now_ms, policy, TransitionCause::Tripped)
    }

    /// Forces the breaker open: every call is rejected until [`reset`](Self::reset) or
    /// [`force_close`](Self::force_close).
    pub fn force_open(&mut self) -> Option<Transition> {
        self.forced = Some(Forced::Open);
        self.probes.clear();
        self.half_open_successes = 0;
        self.transition(CircuitState::Open, TransitionCause::Forced)
    }

    /// Forces the breaker closed: every call is admitted and results never open it, until
    /// [`reset`](Self::reset) or [`force_open`](Self::force_open). Counts, backoff and any
    /// rate-limit hold are cleared.
    pub fn force_close(&mut self) -> Option<Transition> {
        self.forced = Some(Forced::Closed);
        self.clear_counts();
        self.open_until_ms = 0;
        self.transition(CircuitState::Closed, TransitionCause::Forced)
    }

    /// Back to a closed breaker with nothing recorded: clears any override, counts, backoff and
    /// rate-limit hold. Only the transition count (and the lease numbering) survive.
    pub fn reset(&mut self) -> Option<Transition> {
        self.forced = None;
        self.clear_counts();
        self.open_until_ms = 0;
        self.transition(CircuitState::Closed, TransitionCause::Reset)
    }

    /// A serializable summary at `now_ms`.
    pub fn status(&self, now_ms: u64, policy: &BreakerPolicy) -> BreakerStatus {
        let (calls, failures) = self.window_counts(now_ms, policy);
        let next_attempt = (self.state == CircuitState::Open && self.forced.is_none())
            .then(|| from_millis(self.reopen_at()));
        BreakerStatus {
            state: self.state,
            forced: self.forced,
            consecutive_failures: self.consecutive_failures,
            calls_in_window: calls,
            failures_in_window: failures,
            failure_rate: (calls > 0).then(|| failures as f64 / calls as f64),
            openings: self.openings,
            next_attempt,
            open_until: (self.open_until_ms > now_ms).then(|| from_millis(self.open_until_ms)),
            probes_in_flight: self.probes.iter().filter(|p| p.expires_ms > now_ms).count() as u32,
            transitions: self.transitions,
        }
    }
}

/// A breaker's state at one instant, for stats and health reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct BreakerStatus {
    /// Closed, open or half-open.
    pub state: CircuitState,
    /// The operator's override, if any.
    pub forced: Option<Forced>,
    /// Failures in a row while closed.
    pub consecutive_failures: u32,
    /// Calls recorded over the window.
    pub calls_in_window: u64,
    /// Failures recorded over the window.
    pub failures_in_window: u64,
    /// `failures_in_window / calls_in_window`; `None` when there were no calls.
    pub failure_rate: Option<f64>,
    /// Openings in a row since the breaker last closed.
    pub openings: u32,
    /// When open (and not forced): the earliest instant a probe will be admitted.
    pub next_attempt: Option<SystemTime>,
    /// The rate-limit reset the breaker is held open until, if still ahead.
    pub open_until: Option<SystemTime>,
    /// Half-open probes in flight with a live lease.
    pub probes_in_flight: u32,
    /// State changes so far.
    pub transitions: u64,
}

// ---------------------------------------------------------------------------------------------
// CircuitBreaker
// ---------------------------------------------------------------------------------------------

/// A thread-safe circuit breaker: a [`BreakerState`] behind a mutex, a [`BreakerPolicy`] and a
/// [`Clock`]. Share it with an `Arc`. Every transition is logged as a `tracing` event (target
/// `tiercache::breaker`; `warn` when opening, `info` otherwise) and returned to the caller.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tiercache::breaker::{BreakerPolicy, CircuitBreaker, CircuitState, Outcome};
/// use tiercache::{Clock, MockClock};
///
/// let clock = MockClock::new();
/// let t0 = clock.now();
/// let policy = BreakerPolicy::builder()
///     .failure_threshold(3)
///     .base_recovery(Duration::from_secs(10))
///     .jitter(0.0)
///     .build()?;
/// let breaker = CircuitBreaker::new(policy, Arc::new(clock.clone())).named("github");
///
/// // Three failures in a row open it.
/// for _ in 0..3 {
///     let permit = breaker.try_acquire()?;
///     breaker.complete(permit, Outcome::Failure);
/// }
/// assert_eq!(breaker.status().state, CircuitState::Open);
/// let rejected = breaker.try_acquire().unwrap_err();
/// assert_eq!(rejected.until(), Some(t0 + Duration::from_secs(10)));
///
/// // After the recovery timeout one probe goes through; its success closes the breaker.
/// clock.advance(Duration::from_secs(10));
/// let probe = breaker.try_acquire()?;
/// assert!(probe.is_probe());
/// assert!(!breaker.allows_request()); // the only probe slot is taken
/// breaker.complete(probe, Outcome::success(Duration::from_millis(80)));
/// assert_eq!(breaker.status().state, CircuitState::Closed);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct CircuitBreaker {
    name: String,
    policy: BreakerPolicy,
    clock: Arc<dyn Clock>,
    state: Mutex<BreakerState>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy, clock: Arc<dyn Clock>) -> Self {
        Self::with_state(policy, clock, BreakerState::new())
    }

    /// A breaker starting from a saved state.
    pub fn with_state(policy: BreakerPolicy, clock: Arc<dyn Clock>, state: BreakerState) -> Self {
        Self {
            name: "breaker".to_owned(),
            policy,
            clock,
            state: Mutex::new(state),
        }
    }

    /// Names the breaker in its `tracing` events (e.g. `"l3"`). Default: `"breaker"`.
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The name in its `tracing` events.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The policy.
    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    fn lock(&self) -> MutexGuard<'_, BreakerState> {
        // The state is plain data updated in place; a panic elsewhere cannot leave it torn in a
        // way that matters more than refusing to work, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_millis()
    }

    fn emit(&self, transition: Option<Transition>) -> Option<Transition> {
        if let Some(t) = transition {
            if t.to == CircuitState::Open {
                tracing::warn!(
                    target: "tiercache::breaker",
                    breaker = %self.name, from = %t.from, to = %t.to, cause = %t.cause,
                    "circuit breaker opened"
                );
            } else {
                tracing::info!(
                    target: "tiercache::breaker",
                    breaker = %self.name, from = %t.from, to = %t.to, cause = %t.cause,
                    "circuit breaker {}", if t.to == CircuitState::Closed { "closed" } else { "half-open" }
                );
            }
        }
        transition
    }

    /// Whether a call would be admitted now. Changes nothing: a later
    /// [`try_acquire`](Self::try_acquire) may still be rejected if another caller took the
    /// last probe slot meanwhile.
    pub fn allows_request(&self) -> bool {
        let now = self.now_ms();
        self.lock().check(now, &self.policy).is_ok()
    }

    /// Asks to make a call. See [`BreakerState::try_acquire`].
    ///
    /// # Errors
    ///
    /// [`Rejected`] when open (until the recovery deadline or a rate-limit reset), forced open,
    /// or half-open with every probe slot taken.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let now = self.now_ms();
        let result = self.lock().try_acquire(now, &self.policy);
        if let Ok(permit) = &result {
            self.emit(permit.transition());
        }
        result
    }

    /// Reports how the call admitted by `permit` ended. See [`BreakerState::complete`].
    pub fn complete(&self, permit: Permit, outcome: Outcome) -> Option<Transition> {
        let now = self.now_ms();
        let t = self.lock().complete(permit, outcome, now, &self.policy);
        self.emit(t)
    }

    /// Records a successful call without its permit. See [`BreakerState::on_success`].
    pub fn record_success(&self, latency: Duration) -> Option<Transition> {
        let now = self.now_ms();
        let t = self.lock().on_success(now, latency, &self.policy);
        self.emit(t)
    }

    /// Records a failed call without its permit. See [`BreakerState::on_failure`].
    pub fn record_failure(&self) -> Option<Transition> {
        let now = self.now_ms();
        let t = self.lock().on_failure(now, &self.policy);
        self.emit(t)
    }

    /// Holds the breaker open until at least `until` (a rate-limit reset). See
    /// [`BreakerState::open_until`].
    pub fn open_until(&self, until: SystemTime) -> Option<Transition> {
        let now = self.now_ms();
        let t = self.lock().open_until(now, crate::clock::to_millis(until));
        self.emit(t)
    }

    /// Whether the breaker is clean (see [`BreakerState::is_clean`]).
    pub fn is_clean(&self) -> bool {
        self.lock().is_clean()
    }

    /// Opens at once with the next recovery timeout (see [`BreakerState::trip`]).
    pub fn trip(&self) -> Option<Transition> {
        let now = self.now_ms();
        let t = self.lock().trip(now, &self.policy);
        self.emit(t)
    }

    /// Forces the breaker open until [`reset`](Self::reset) or [`force_close`](Self::force_close).
    pub fn force_open(&self) -> Option<Transition> {
        let t = self.lock().force_open();
        self.emit(t)
    }

    /// Forces the breaker closed until [`reset`](Self::reset) or [`force_open`](Self::force_open).
    pub fn force_close(&self) -> Option<Transition> {
        let t = self.lock().force_close();
        self.emit(t)
    }

    /// Back to a closed breaker with nothing recorded. See [`BreakerState::reset`].
    pub fn reset(&self) -> Option<Transition> {
        let t = self.lock().reset();
        self.emit(t)
    }

    /// A serializable summary, now.
    pub fn status(&self) -> BreakerStatus {
        let now = self.now_ms();
        self.lock().status(now, &self.policy)
    }

    /// A copy of the whole state, to persist.
    pub fn state_snapshot(&self) -> BreakerState {
        self.lock().clone()
    }

    /// Replaces the whole state with a saved one (from another process, say). Returns a
    /// transition with cause [`TransitionCause::Restored`] when that changes the state.
    pub fn restore(&self, state: BreakerState) -> Option<Transition> {
        let mut guard = self.lock();
        let from = guard.state;
        let to = state.state;
        *guard = state;
        drop(guard);
        let t = (from != to).then_some(Transition {
            from,
            to,
            cause: TransitionCause::Restored,
        });
        self.emit(t)
    }

    /// Runs `f` on the state under the lock, with the current time and the policy: for a
    /// caller that loads, updates and stores the state in one step. Transitions `f` causes are
    /// not logged; log them with the return value if needed.
    pub fn update<R>(&self, f: impl FnOnce(&mut BreakerState, u64, &BreakerPolicy) -> R) -> R {
        let now = self.now_ms();
        let mut guard = self.lock();
        f(&mut guard, now, &self.policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MockClock;

    const T0: u64 = 1_767_225_600_000;

    /// Exact timeouts: 3 consecutive failures, rate rule off, 1 s base doubling up to 8 s.
    fn policy() -> BreakerPolicyBuilder {
        BreakerPolicy::builder()
            .failure_threshold(3)
            .minimum_calls(u32::MAX)
            .base_recovery(Duration::from_secs(1))
            .recovery_multiplier(2.0)
            .max_recovery(Duration::from_secs(8))
            .jitter(0.0)
            .probe_timeout(Duration::from_secs(30))
    }

    fn exact() -> BreakerPolicy {
        policy().build().unwrap()
    }

    fn fail_n(s: &mut BreakerState, n: u32, now: u64, p: &BreakerPolicy) -> Option<Transition> {
        let mut last = None;
        for _ in 0..n {
            last = s.on_failure(now, p).or(last);
        }
        last
    }

    fn ok(latency_ms: u64) -> Outcome {
        Outcome::success(Duration::from_millis(latency_ms))
    }

    #[test]
    fn defaults_match_docs() {
        let p = BreakerPolicy::default();
        assert_eq!(p.failure_threshold(), 5);
        assert_eq!(p.failure_rate_threshold(), 0.5);
        assert_eq!(p.window(), Duration::from_secs(60));
        assert_eq!(p.minimum_calls(), 10);
        assert_eq!(p.slow_call_threshold(), None);
        assert_eq!(p.base_recovery(), Duration::from_secs(5));
        assert_eq!(p.recovery_multiplier(), 2.0);
        assert_eq!(p.max_recovery(), Duration::from_secs(300));
        assert_eq!(p.jitter(), 0.2);
        assert_eq!(p.half_open_probes(), 1);
        assert_eq!(p.success_threshold(), 1);
        assert_eq!(p.probe_timeout(), Duration::from_secs(30));
        assert_eq!(BreakerPolicy::builder().build().unwrap(), p);
        assert!(p.validate().is_ok());
    }

    #[test]
    fn builder_rejects_bad_values() {
        let b = BreakerPolicy::builder;
        let cases = [
            (b().failure_threshold(0), "failure_threshold"),
            (b().failure_rate_threshold(1.5), "failure_rate_threshold"),
            (b().failure_rate_threshold(-0.1), "failure_rate_threshold"),
            (
                b().failure_rate_threshold(f64::NAN),
                "failure_rate_threshold",
            ),
            (b().window(Duration::from_millis(9)), "window"),
            (b().minimum_calls(0), "minimum_calls"),
            (
                b().slow_call_threshold(Duration::ZERO),
                "slow_call_threshold",
            ),
            (b().base_recovery(Duration::ZERO), "base_recovery"),
            (b().recovery_multiplier(0.5), "recovery_multiplier"),
            (
                b().recovery_multiplier(f64::INFINITY),
                "recovery_multiplier",
            ),
            (
                b().base_recovery(Duration::from_secs(10))
                    .max_recovery(Duration::from_secs(5)),
                "max_recovery",
            ),
            (b().jitter(1.01), "jitter"),
            (b().half_open_probes(0), "half_open_probes"),
            (
                b().half_open_probes(MAX_HALF_OPEN_PROBES + 1),
                "half_open_probes",
            ),
            (b().success_threshold(0), "success_threshold"),
            (b().probe_timeout(Duration::ZERO), "probe_timeout"),
        ];
        for (builder, field) in cases {
            match builder.build() {
                Err(Error::Config(msg)) => {
                    assert!(msg.contains(field), "{msg} should name {field}")
                }
                other => panic!("{field}: expected a config error, got {other:?}"),
            }
        }
        // Edges that are fine.
        assert!(b().failure_rate_threshold(0.0).jitter(1.0).build().is_ok());
        assert!(b()
            .base_recovery(Duration::from_secs(7))
            .max_recovery(Duration::from_secs(7))
            .recovery_multiplier(1.0)
            .build()
            .is_ok());
    }

    #[test]
    fn policy_serde_uses_millis_defaults_and_validates() {
        let p = exact();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["base_recovery_ms"], 1000);
        assert_eq!(json["slow_call_threshold_ms"], serde_json::Value::Null);
        let back: BreakerPolicy = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);

        let partial: BreakerPolicy =
            serde_json::from_str(r#"{"failure_threshold": 2, "window_ms": 1000}"#).unwrap();
        assert_eq!(partial.failure_threshold(), 2);
        assert_eq!(partial.window(), Duration::from_secs(1));
        assert_eq!(partial.max_recovery(), Duration::from_secs(300));

        let bad = serde_json::from_str::<BreakerPolicy>(r#"{"jitter": 3.0}"#).unwrap_err();
        assert!(bad.to_string().contains("jitter"), "{bad}");
        assert!(serde_json::from_str::<BreakerPolicy>(r#"{"treshold": 3}"#).is_err());
    }

    #[test]
    fn recovery_timeout_grows_and_caps() {
        let p = exact();
        let secs: Vec<u64> = (1..=6).map(|n| p.recovery_timeout(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 8, 8]);
        assert_eq!(p.recovery_timeout(u32::MAX), Duration::from_secs(8));
    }

    #[test]
    fn opens_at_exactly_n_consecutive_failures() {
        let p = exact();
        let mut s = BreakerState::new();
        assert_eq!(fail_n(&mut s, 2, T0, &p), None);
        assert_eq!(s.state(), CircuitState::Closed);
        assert_eq!(s.consecutive_failures(), 2);
        let t = s.on_failure(T0, &p).unwrap();
        assert_eq!(
            t,
            Transition {
                from: CircuitState::Closed,
                to: CircuitState::Open,
                cause: TransitionCause::ConsecutiveFailures
            }
        );
        assert_eq!(s.openings(), 1);
        assert_eq!(s.next_attempt_ms(), T0 + 1000);
        assert_eq!(s.transitions(), 1);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let p = exact();
        let mut s = BreakerState::new();
        fail_n(&mut s, 2, T0, &p);
        assert_eq!(s.on_success(T0, Duration::from_millis(5), &p), None);
        assert_eq!(s.consecutive_failures(), 0);
        assert_eq!(fail_n(&mut s, 2, T0, &p), None);
        assert_eq!(s.state(), CircuitState::Closed);
        assert!(s.on_failure(T0, &p).is_some());
    }

    #[test]
    fn failure_rate_rule_waits_for_minimum_calls() {
        let p = policy()
            .failure_threshold(100)
            .minimum_calls(10)
            .failure_rate_threshold(0.5)
            .build()
            .unwrap();
        let mut s = BreakerState::new();
        // 4 failures in 4 calls: 100% but below the minimum.
        assert_eq!(fail_n(&mut s, 4, T0, &p), None);
        for _ in 0..5 {
            assert_eq!(s.on_success(T0, Duration::ZERO, &p), None);
        }
        // 9 calls, 4 failures; the 10th call is a failure: 5/10 = 0.5 opens.
        assert_eq!(s.window_counts(T0, &p), (9, 4));
        let t = s.on_failure(T0, &p).unwrap();
        assert_eq!(t.cause, TransitionCause::FailureRate);
        assert_eq!(s.status(T0, &p).failure_rate, Some(0.5));
    }

    #[test]
    fn failure_rate_below_threshold_stays_closed() {
        let p = policy()
            .failure_threshold(100)
            .minimum_calls(10)
            .failure_rate_threshold(0.5)
            .build()
            .unwrap();
        let mut s = BreakerState::new();
        for i in 0..100 {
            // One failure in three: 33%.
            let t = if i % 3 == 0 {
                s.on_failure(T0 + i, &p)
            } else {
                s.on_success(T0 + i, Duration::ZERO, &p)
            };
            assert_eq!(t, None);
        }
        assert_eq!(s.state(), CircuitState::Closed);
    }

    #[test]
    fn window_buckets_expire() {
        let p = policy()
            .failure_threshold(100)
            .minimum_calls(4)
            .failure_rate_threshold(0.5)
            .window(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        assert_eq!(s.window_counts(T0, &p), (3, 3));
        // Still inside the window (buckets are 1 s wide; T0 is bucket-aligned).
        assert_eq!(s.window_counts(T0 + 9_999, &p), (3, 3));
        // The bucket has slid out.
        assert_eq!(s.window_counts(T0 + 10_000, &p), (0, 0));
        // So a failure 10 s later is 1 of 1 call: below minimum_calls, stays closed.
        assert_eq!(s.on_failure(T0 + 10_000, &p), None);
        assert_eq!(s.window_counts(T0 + 10_000, &p), (1, 1));
        // Slots are reused round-robin; the window never holds more than WINDOW_BUCKETS buckets.
        for i in 0..1000u64 {
            s.on_success(T0 + 20_000 + i * 137, Duration::ZERO, &p);
        }
        assert_eq!(s.buckets().len(), WINDOW_BUCKETS);
        let (calls, _) = s.window_counts(T0 + 20_000 + 999 * 137, &p);
        assert!(
            (65..=80).contains(&calls),
            "{calls} calls in a 10 s window of 137 ms steps"
        );
    }

    #[test]
    fn slow_successes_count_as_failures() {
        let p = policy()
            .slow_call_threshold(Duration::from_millis(500))
            .build()
            .unwrap();
        let mut s = BreakerState::new();
        assert_eq!(s.on_success(T0, Duration::from_millis(500), &p), None);
        assert_eq!(
            s.consecutive_failures(),
            0,
            "exactly the threshold is not slow"
        );
        s.on_success(T0, Duration::from_millis(501), &p);
        s.on_success(T0, Duration::from_secs(2), &p);
        assert_eq!(s.consecutive_failures(), 2);
        assert_eq!(s.window_counts(T0, &p), (3, 2));
        let t = s.on_success(T0, Duration::from_secs(3), &p).unwrap();
        assert_eq!(t.to, CircuitState::Open);

        // A slow probe reopens.
        let probe = s.try_acquire(T0 + 1000, &p).unwrap();
        let t = s.complete(probe, ok(900), T0 + 1900, &p).unwrap();
        assert_eq!(t.cause, TransitionCause::ProbeFailed);
    }

    #[test]
    fn open_rejects_until_next_attempt_then_admits_exactly_the_probes() {
        let p = policy().half_open_probes(2).build().unwrap();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        let r = s.try_acquire(T0 + 999, &p).unwrap_err();
        assert_eq!(r.reason(), RejectReason::Open);
        assert_eq!(r.until_ms(), Some(T0 + 1000));
        assert_eq!(r.until(), Some(from_millis(T0 + 1000)));
        assert!(s.check(T0 + 999, &p).is_err());
        assert!(s.check(T0 + 1000, &p).is_ok());
        assert_eq!(s.state(), CircuitState::Open, "check changes nothing");

        let first = s.try_acquire(T0 + 1000, &p).unwrap();
        assert!(first.is_probe());
        assert_eq!(
            first.transition(),
            Some(Transition {
                from: CircuitState::Open,
                to: CircuitState::HalfOpen,
                cause: TransitionCause::RecoveryElapsed
            })
        );
        let second = s.try_acquire(T0 + 1001, &p).unwrap();
        assert!(second.is_probe());
        assert_eq!(second.transition(), None);
        for _ in 0..5 {
            let r = s.try_acquire(T0 + 1002, &p).unwrap_err();
            assert_eq!(r.reason(), RejectReason::HalfOpenFull);
            assert_eq!(r.until_ms(), Some(T0 + 1000 + 30_000));
        }
        assert_eq!(s.probes().len(), 2);
    }

    #[test]
    fn probe_lease_expires() {
        let p = exact();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        let lost = s.try_acquire(T0 + 1000, &p).unwrap();
        assert_eq!(lost.lease_expires(), Some(from_millis(T0 + 31_000)));
        assert!(s.try_acquire(T0 + 30_999, &p).is_err());
        // The probe's process died; its lease lapses and the slot is handed out again.
        let next = s.try_acquire(T0 + 31_000, &p).unwrap();
        assert!(next.is_probe());
        assert_eq!(s.probes().len(), 1);
        // The lost probe's late result still counts (same state), and releases nothing else.
        assert_eq!(
            s.complete(lost, ok(1), T0 + 31_001, &p).map(|t| t.to),
            Some(CircuitState::Closed)
        );
    }

    #[test]
    fn m_successes_close_and_reset_the_backoff() {
        let p = policy().success_threshold(3).build().unwrap();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        // Fail one probe so the backoff has grown.
        let probe = s.try_acquire(T0 + 1000, &p).unwrap();
        s.complete(probe, Outcome::Failure, T0 + 1000, &p);
        assert_eq!(s.openings(), 2);
        assert_eq!(s.next_attempt_ms(), T0 + 3000);

        let mut now = T0 + 3000;
        for i in 0..3 {
            let probe = s.try_acquire(now, &p).unwrap();
            let t = s.complete(probe, ok(10), now, &p);
            if i < 2 {
                assert_eq!(t, None);
                assert_eq!(s.state(), CircuitState::HalfOpen);
                assert_eq!(s.half_open_successes(), i + 1);
            } else {
                assert_eq!(t.unwrap().cause, TransitionCause::ProbesSucceeded);
            }
            now += 10;
        }
        assert_eq!(s.state(), CircuitState::Closed);
        assert_eq!(s.openings(), 0);
        assert_eq!(s.window_counts(now, &p), (0, 0));
        // Opening again starts from the base timeout.
        fail_n(&mut s, 3, now, &p);
        assert_eq!(s.next_attempt_ms(), now + 1000);
    }

    #[test]
    fn half_open_failure_reopens_longer_up_to_the_cap() {
        let p = exact();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        let mut now = T0;
        let mut timeouts = vec![s.next_attempt_ms() - now];
        for _ in 0..5 {
            now = s.next_attempt_ms();
            let probe = s.try_acquire(now, &p).unwrap();
            let t = s.complete(probe, Outcome::Failure, now, &p).unwrap();
            assert_eq!((t.from, t.to), (CircuitState::HalfOpen, CircuitState::Open));
            timeouts.push(s.next_attempt_ms() - now);
        }
        assert_eq!(timeouts, [1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(s.openings(), 6);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        fastrand::seed(7);
        let p = policy().jitter(0.25).build().unwrap();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        let mut now = T0;
        let mut below = false;
        for _ in 0..500 {
            let timeout = s.next_attempt_ms() - now;
            let nominal = p.recovery_ms(s.openings());
            let lo = (nominal as f64 * 0.75).floor() as u64;
            let hi = ((nominal as f64 * 1.25).ceil() as u64).min(8000);
            assert!((lo..=hi).contains(&timeout), "{timeout} not in {lo}..={hi}");
            below |= timeout < nominal;
            now = s.next_attempt_ms();
            let probe = s.try_acquire(now, &p).unwrap();
            s.complete(probe, Outcome::Failure, now, &p);
        }
        assert!(below, "jitter never shortened a timeout");
        // Timeouts below the cap are jittered both ways.
        let mut s = BreakerState::new();
        let seen: Vec<u64> = (0..200)
            .map(|_| {
                s.reset();
                fail_n(&mut s, 3, T0, &p);
                s.next_attempt_ms() - T0
            })
            .collect();
        assert!(seen.iter().all(|t| (750..=1250).contains(t)));
        assert!(seen.iter().any(|&t| t < 1000) && seen.iter().any(|&t| t > 1000));
    }

    #[test]
    fn full_jitter_never_gives_zero() {
        fastrand::seed(11);
        let p = policy()
            .jitter(1.0)
            .base_recovery(Duration::from_millis(1))
            .build()
            .unwrap();
        let mut s = BreakerState::new();
        for _ in 0..200 {
            s.reset();
            fail_n(&mut s, 3, T0, &p);
            assert!(s.next_attempt_ms() > T0);
        }
    }

    #[test]
    fn open_until_is_honoured_to_the_millisecond_and_never_shortened() {
        let p = exact();
        let mut s = BreakerState::new();
        let reset = T0 + 60_000;
        let t = s.open_until(T0, reset).unwrap();
        assert_eq!(
            (t.to, t.cause),
            (CircuitState::Open, TransitionCause::RateLimited)
        );
        // A shorter hold later does not shorten it.
        assert_eq!(s.open_until(T0 + 10, T0 + 5_000), None);
        let r = s.try_acquire(reset - 1, &p).unwrap_err();
        assert_eq!(r.reason(), RejectReason::RateLimited);
        assert!(r.is_rate_limited());
        assert_eq!(r.until_ms(), Some(reset));
        let probe = s.try_acquire(reset, &p).unwrap();
        assert!(probe.is_probe());
        // The rate limit did not lengthen the backoff.
        assert_eq!(s.openings(), 0);
        s.complete(probe, Outcome::Failure, reset, &p);
        assert_eq!(s.next_attempt_ms(), reset + 1000);
    }

    #[test]
    fn open_until_extends_an_open_breaker_and_ignores_the_past() {
        let p = exact();
        let mut s = BreakerState::new();
        assert_eq!(
            s.open_until(T0, T0),
            None,
            "a reset in the past is no reason to open"
        );
        assert_eq!(s.state(), CircuitState::Closed);
        fail_n(&mut s, 3, T0, &p); // open until T0 + 1000
        assert_eq!(
            s.open_until(T0, T0 + 5_000),
            None,
            "already open: no transition"
        );
        let r = s.try_acquire(T0 + 4_999, &p).unwrap_err();
        assert_eq!(r.reason(), RejectReason::RateLimited);
        assert!(s.try_acquire(T0 + 5_000, &p).is_ok());
        // A backoff longer than the hold reports Open with its own deadline.
        let mut s = BreakerState::new();
        s.open_until(T0, T0 + 500);
        fail_n(&mut s, 3, T0, &p);
        assert_eq!(s.state(), CircuitState::Open);
    }

    #[test]
    fn open_until_from_half_open_reopens() {
        let p = exact();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        let probe = s.try_acquire(T0 + 1000, &p).unwrap();
        let t = s.open_until(T0 + 1001, T0 + 9_000).unwrap();
        assert_eq!((t.from, t.to), (CircuitState::HalfOpen, CircuitState::Open));
        assert!(s.probes().is_empty());
        // The probe's late success belongs to an older state: ignored.
        assert_eq!(s.complete(probe, ok(1), T0 + 1002, &p), None);
        assert_eq!(
            s.try_acquire(T0 + 8_999, &p).unwrap_err().until_ms(),
            Some(T0 + 9_000)
        );
    }

    #[test]
    fn force_open_force_close_and_reset() {
        let p = exact();
        let mut s = BreakerState::new();
        let t = s.force_open().unwrap();
        assert_eq!(
            (t.to, t.cause),
            (CircuitState::Open, TransitionCause::Forced)
        );
        let r = s.try_acquire(T0 + 1_000_000, &p).unwrap_err();
        assert_eq!((r.reason(), r.until()), (RejectReason::ForcedOpen, None));
        assert_eq!(s.on_success(T0, Duration::ZERO, &p), None);
        assert_eq!(s.forced(), Some(Forced::Open));
        assert_eq!(s.status(T0, &p).next_attempt, None);

        let t = s.force_close().unwrap();
        assert_eq!((t.from, t.to), (CircuitState::Open, CircuitState::Closed));
        assert_eq!(
            fail_n(&mut s, 50, T0, &p),
            None,
            "forced closed never opens"
        );
        assert!(s.try_acquire(T0, &p).is_ok());
        assert_eq!(s.open_until(T0, T0 + 10_000), None);
        assert!(s.try_acquire(T0 + 1, &p).is_ok());
        assert_eq!(s.consecutive_failures(), 50, "results are still counted");

        assert_eq!(s.reset(), None, "already closed");
        assert_eq!(s.forced(), None);
        assert_eq!(s.consecutive_failures(), 0);
        assert!(fail_n(&mut s, 3, T0, &p).is_some());
        let t = s.reset().unwrap();
        assert_eq!(
            (t.to, t.cause),
            (CircuitState::Closed, TransitionCause::Reset)
        );
        assert_eq!(s.openings(), 0);
        assert!(s.try_acquire(T0, &p).is_ok());

        s.open_until(T0, T0 + 60_000);
        s.reset();
        assert!(
            s.try_acquire(T0 + 1, &p).is_ok(),
            "reset forgets the rate-limit hold"
        );
    }

    #[test]
    fn stale_permits_and_cancelled_probes() {
        let p = exact();
        let mut s = BreakerState::new();
        let slow = s.try_acquire(T0, &p).unwrap();
        fail_n(&mut s, 3, T0, &p);
        let probe = s.try_acquire(T0 + 1000, &p).unwrap();
        // A call admitted while closed fails late: it says nothing about the half-open state.
        assert_eq!(s.complete(slow, Outcome::Failure, T0 + 1001, &p), None);
        assert_eq!(s.state(), CircuitState::HalfOpen);
        // A cancelled probe frees its slot without a verdict.
        assert_eq!(s.complete(probe, Outcome::Cancelled, T0 + 1002, &p), None);
        assert!(s.probes().is_empty());
        assert_eq!(s.state(), CircuitState::HalfOpen);
        let probe = s.try_acquire(T0 + 1003, &p).unwrap();
        assert_eq!(
            s.complete(probe, ok(1), T0 + 1004, &p).map(|t| t.to),
            Some(CircuitState::Closed)
        );
    }

    #[test]
    fn permit_less_results_release_the_oldest_probe() {
        let p = policy()
            .half_open_probes(2)
            .success_threshold(2)
            .build()
            .unwrap();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        let _a = s.try_acquire(T0 + 1000, &p).unwrap();
        let _b = s.try_acquire(T0 + 1005, &p).unwrap();
        assert_eq!(s.on_success(T0 + 1010, Duration::ZERO, &p), None);
        assert_eq!(s.probes().len(), 1);
        assert_eq!(s.probes()[0].expires_ms, T0 + 31_005);
        assert!(s.try_acquire(T0 + 1011, &p).is_ok());
        assert_eq!(
            s.on_success(T0 + 1012, Duration::ZERO, &p).map(|t| t.to),
            Some(CircuitState::Closed)
        );
        // Results while open change nothing.
        fail_n(&mut s, 3, T0 + 2000, &p);
        assert_eq!(s.on_success(T0 + 2001, Duration::ZERO, &p), None);
        assert_eq!(s.on_failure(T0 + 2001, &p), None);
        assert_eq!(s.openings(), 1);
    }

    #[test]
    fn flapping_source_trips_the_rate_rule_only() {
        // Alternating success/failure never reaches 3 in a row.
        let p = exact();
        let mut s = BreakerState::new();
        for i in 0..1000 {
            let now = T0 + i * 50;
            if i % 2 == 0 {
                s.on_failure(now, &p);
            } else {
                s.on_success(now, Duration::ZERO, &p);
            }
        }
        assert_eq!(s.state(), CircuitState::Closed);

        // With the rate rule on (50% over ≥ 10 calls) it opens on the 10th call... or the first
        // failure after it.
        let p = policy()
            .minimum_calls(10)
            .failure_rate_threshold(0.5)
            .build()
            .unwrap();
        let mut s = BreakerState::new();
        let mut opened_at = None;
        for i in 0..1000u64 {
            let now = T0 + i * 50;
            let t = if i % 2 == 0 {
                s.on_failure(now, &p)
            } else {
                s.on_success(now, Duration::ZERO, &p)
            };
            if let Some(t) = t {
                assert_eq!(t.cause, TransitionCause::FailureRate);
                opened_at = Some(i);
                break;
            }
        }
        // Calls 0..=9 hold 5 failures in 10; the 10th call (i = 10) is the next failure.
        assert_eq!(opened_at, Some(10));
    }

    #[test]
    fn state_round_trips_through_json_and_keeps_behaving() {
        let p = policy().half_open_probes(2).build().unwrap();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        let probe = s.try_acquire(T0 + 1000, &p).unwrap();
        s.complete(probe, Outcome::Failure, T0 + 1000, &p); // openings = 2
        s.on_success(T0 + 1000, Duration::ZERO, &p); // ignored while open
        s.open_until(T0 + 1000, T0 + 4000); // rate-limited beyond the 2 s backoff
        assert_eq!(s.openings(), 2);

        let json = serde_json::to_string(&s).unwrap();
        let back: BreakerState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);

        // Continue in a fresh breaker, driven by a mock clock.
        let clock = MockClock::at(from_millis(T0 + 3000));
        let b = CircuitBreaker::new(p.clone(), Arc::new(clock.clone()));
        assert_eq!(
            b.restore(back).map(|t| (t.to, t.cause)),
            Some((CircuitState::Open, TransitionCause::Restored))
        );
        assert!(!b.allows_request());
        assert!(b.try_acquire().unwrap_err().is_rate_limited());
        clock.advance(Duration::from_millis(1000));
        let probe = b.try_acquire().unwrap();
        assert!(probe.is_probe());
        // Snapshot mid-probe, restore elsewhere: the lease travels with the state.
        let mid = b.state_snapshot();
        let json = serde_json::to_string(&mid).unwrap();
        let other = CircuitBreaker::with_state(
            p,
            Arc::new(clock.clone()),
            serde_json::from_str(&json).unwrap(),
        );
        assert!(other.try_acquire().is_ok(), "second of two probe slots");
        assert!(other.try_acquire().is_err(), "both slots taken");
        assert_eq!(
            other.complete(probe, ok(3)).map(|t| t.to),
            Some(CircuitState::Closed),
            "a permit issued by one process completes in another that shares the state"
        );
        // Unknown future fields are tolerated and missing ones default.
        let old: BreakerState =
            serde_json::from_str(r#"{"state":"open","openings":2,"from_the_future":1}"#).unwrap();
        assert_eq!(old.state(), CircuitState::Open);
        assert_eq!(old.openings(), 2);
    }

    #[test]
    fn circuit_breaker_with_a_mock_clock() {
        let clock = MockClock::new();
        let t0 = clock.now_millis();
        let b = CircuitBreaker::new(exact(), Arc::new(clock.clone())).named("l3");
        assert_eq!(b.name(), "l3");
        assert!(b.allows_request());
        assert_eq!(b.record_failure(), None);
        assert_eq!(b.record_failure(), None);
        let t = b.record_failure().unwrap();
        assert_eq!(t.to, CircuitState::Open);
        let st = b.status();
        assert_eq!(st.state, CircuitState::Open);
        assert_eq!(st.failure_rate, Some(1.0));
        assert_eq!(st.next_attempt, Some(from_millis(t0 + 1000)));
        assert_eq!(st.transitions, 1);
        assert!(!b.allows_request());
        clock.advance(Duration::from_millis(999));
        assert!(b.try_acquire().is_err());
        clock.advance(Duration::from_millis(1));
        assert!(b.allows_request());
        let probe = b.try_acquire().unwrap();
        assert_eq!(
            probe.transition().map(|t| t.to),
            Some(CircuitState::HalfOpen)
        );
        assert_eq!(b.status().probes_in_flight, 1);
        assert_eq!(
            b.record_success(Duration::from_millis(2)).map(|t| t.to),
            Some(CircuitState::Closed)
        );

        let reset = clock.now() + Duration::from_secs(3600);
        assert!(b.open_until(reset).is_some());
        assert_eq!(b.status().open_until, Some(reset));
        assert_eq!(b.try_acquire().unwrap_err().until(), Some(reset));
        assert!(b.force_close().is_some());
        assert!(b.allows_request());
        assert!(b.force_open().is_some());
        assert!(!b.allows_request());
        assert!(b.reset().is_some());
        assert!(b.allows_request());
        assert_eq!(
            b.update(|s, now, _| (s.state(), now)),
            (CircuitState::Closed, t0 + 1000)
        );
        assert_eq!(b.status().transitions, 7);
    }

    #[test]
    fn a_poisoned_lock_does_not_break_the_breaker() {
        let b = Arc::new(CircuitBreaker::new(exact(), Arc::new(MockClock::new())));
        let b2 = Arc::clone(&b);
        let joined = std::thread::spawn(move || {
            b2.update(|_, _, _| panic!("boom"));
        })
        .join();
        assert!(joined.is_err());
        assert!(b.allows_request());
        b.record_failure();
        assert_eq!(b.status().consecutive_failures, 1);
    }

    #[test]
    fn breaker_is_send_sync_and_shareable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<CircuitBreaker>();
        assert_send_sync::<BreakerState>();
        assert_send_sync::<Permit>();
        assert_send_sync::<Rejected>();
    }

    #[test]
    fn rejected_is_a_readable_error() {
        let p = exact();
        let mut s = BreakerState::new();
        fail_n(&mut s, 3, T0, &p);
        let r = s.try_acquire(T0, &p).unwrap_err();
        assert_eq!(
            r.to_string(),
            format!(
                "circuit breaker rejected the call (open) until unix ms {}",
                T0 + 1000
            )
        );
        let e: Box<dyn std::error::Error + Send + Sync> = Box::new(r);
        assert!(e.to_string().contains("open"));
    }
}
