//! [`BreakerState`], the state machine as plain data, and the small types it is made of.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::call::{Outcome, Permit, RejectReason, Rejected, Transition, TransitionCause};
use super::policy::BreakerPolicy;
use crate::clock::{from_millis, millis};

/// Number of time buckets in the sliding failure-rate window. Each covers `window / BUCKETS`.
pub const WINDOW_BUCKETS: usize = 10;

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
                if count < policy.half_open_probes() as usize {
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
            expires_ms: now_ms.saturating_add(millis(policy.probe_timeout())),
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
            Outcome::Success { latency } => {
                policy.slow_call_threshold().is_some_and(|t| latency > t)
            }
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
                if self.consecutive_failures >= policy.failure_threshold() {
                    return self.open(now_ms, policy, TransitionCause::ConsecutiveFailures);
                }
                let (calls, failures) = self.window_counts(now_ms, policy);
                if failures > 0
                    && calls >= u64::from(policy.minimum_calls())
                    && failures as f64 >= policy.failure_rate_threshold() * calls as f64
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
                if self.half_open_successes >= policy.success_threshold() {
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
        let unit = if policy.jitter() > 0.0 {
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
    /// When open (and not forced): the earliest instant a probe will be admitted (RFC 3339
    /// in JSON).
    #[serde(serialize_with = "crate::time::serde_rfc3339::option")]
    pub next_attempt: Option<SystemTime>,
    /// The rate-limit reset the breaker is held open until, if still ahead (RFC 3339 in JSON).
    #[serde(serialize_with = "crate::time::serde_rfc3339::option")]
    pub open_until: Option<SystemTime>,
    /// Half-open probes in flight with a live lease.
    pub probes_in_flight: u32,
    /// State changes so far.
    pub transitions: u64,
}
