//! The state machine: consecutive and rate rules, the window, probes, backoff and jitter,
//! rate-limit holds, forcing, stale permits.

use super::*;

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
    assert_eq!(s.open_until_ms(), reset);
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
