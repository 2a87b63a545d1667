//! `CircuitBreaker` and `BreakerState` as shared: JSON round trips, a mock clock, a poisoned
//! lock, `Send + Sync`, readable rejections.

use super::*;

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
