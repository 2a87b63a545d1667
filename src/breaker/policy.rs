//! [`BreakerPolicy`]: its builder, its validation and its serialized form.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::state::WINDOW_BUCKETS;
use crate::clock::millis;
use crate::error::{Error, Result};

/// The largest accepted [`BreakerPolicy::half_open_probes`], so a persisted state stays small.
pub const MAX_HALF_OPEN_PROBES: u32 = 1024;

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

    /// A builder starting from this policy, to derive a variant of it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tiercache::breaker::BreakerPolicy;
    ///
    /// let base = BreakerPolicy::builder().failure_threshold(3).build()?;
    /// let patient = base.to_builder().max_recovery(Duration::from_secs(600)).build()?;
    /// assert_eq!(patient.failure_threshold(), 3);
    /// assert_eq!(patient.max_recovery(), Duration::from_secs(600));
    /// # Ok::<(), tiercache::Error>(())
    /// ```
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

    pub(super) fn recovery_ms(&self, opening: u32) -> u64 {
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
    pub(super) fn jittered_recovery_ms(&self, opening: u32, unit: f64) -> u64 {
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

    pub(super) fn bucket_ms(&self) -> u64 {
        (millis(self.window) / WINDOW_BUCKETS as u64).max(1)
    }

    pub(super) fn validate(&self) -> Result<()> {
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
