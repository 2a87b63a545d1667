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

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::clock::Clock;

mod call;
mod policy;
mod state;
#[cfg(test)]
mod tests;

pub use call::{Outcome, Permit, RejectReason, Rejected, Transition, TransitionCause};
pub use policy::{BreakerPolicy, BreakerPolicyBuilder, MAX_HALF_OPEN_PROBES};
pub use state::{
    BreakerState, BreakerStatus, CircuitState, Forced, ProbeLease, WindowBucket, WINDOW_BUCKETS,
};

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
        let from = guard.state();
        let to = state.state();
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
