//! The breaker through its public API only: randomized operations checked against invariants,
//! and concurrent use from several threads.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tiercache::breaker::{
    BreakerPolicy, BreakerState, CircuitBreaker, CircuitState, Outcome, RejectReason,
};
use tiercache::{Clock, MockClock};

fn policy() -> BreakerPolicy {
    BreakerPolicy::builder()
        .failure_threshold(3)
        .minimum_calls(6)
        .failure_rate_threshold(0.6)
        .window(Duration::from_secs(10))
        .base_recovery(Duration::from_millis(500))
        .max_recovery(Duration::from_secs(4))
        .half_open_probes(2)
        .success_threshold(2)
        .probe_timeout(Duration::from_secs(2))
        .slow_call_threshold(Duration::from_millis(300))
        .build()
        .expect("valid policy")
}

#[test]
fn random_operations_keep_the_invariants() {
    let p = policy();
    for seed in 0..20u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let clock = MockClock::new();
        let b = CircuitBreaker::new(p.clone(), Arc::new(clock.clone()));
        let mut permits = Vec::new();
        let mut forced = false;
        for _ in 0..2_000 {
            match rng.u8(0..100) {
                0..=34 => match b.try_acquire() {
                    Ok(permit) => permits.push(permit),
                    Err(r) => {
                        let now = clock.now();
                        match r.reason() {
                            RejectReason::ForcedOpen => assert!(forced && r.until().is_none()),
                            _ => assert!(r.until().is_some_and(|u| u > now), "{r}"),
                        }
                    }
                },
                35..=64 if !permits.is_empty() => {
                    let permit = permits.swap_remove(rng.usize(..permits.len()));
                    let outcome = match rng.u8(0..10) {
                        0..=4 => Outcome::Failure,
                        5 => Outcome::Cancelled,
                        _ => Outcome::success(Duration::from_millis(rng.u64(0..400))),
                    };
                    b.complete(permit, outcome);
                }
                65..=74 => {
                    b.record_failure();
                }
                75..=84 => {
                    b.record_success(Duration::from_millis(rng.u64(0..400)));
                }
                85..=86 => {
                    let until = clock.now() + Duration::from_millis(rng.u64(0..5_000));
                    b.open_until(until);
                    if !forced && until > clock.now() {
                        let st = b.status();
                        assert_eq!(st.state, CircuitState::Open);
                        assert!(st.next_attempt.is_some_and(|t| t >= until));
                    }
                }
                87 => {
                    forced = true;
                    b.force_open();
                }
                88 => {
                    forced = true;
                    b.force_close();
                }
                89 => {
                    forced = false;
                    b.reset();
                }
                _ => clock.advance(Duration::from_millis(rng.u64(0..700))),
            }
            // Invariants.
            let st = b.status();
            assert!(st.probes_in_flight <= p.half_open_probes());
            assert!(st.failures_in_window <= st.calls_in_window);
            if st.state != CircuitState::Open || st.forced.is_some() {
                assert!(st.next_attempt.is_none());
            } else {
                let next = st.next_attempt.expect("open breakers say when");
                assert!(
                    next <= clock.now() + p.max_recovery() || st.open_until.is_some(),
                    "backoff beyond max_recovery without a rate-limit hold"
                );
            }
            if st.state == CircuitState::Closed && st.forced.is_none() {
                assert!(st.consecutive_failures < p.failure_threshold());
            }
            let snapshot = b.state_snapshot();
            assert!(snapshot.probes().len() <= p.half_open_probes() as usize);
            let json = serde_json::to_string(&snapshot).expect("serializes");
            let back: BreakerState = serde_json::from_str(&json).expect("deserializes");
            assert_eq!(back, snapshot);
        }
    }
}

#[test]
fn threads_share_one_breaker_and_respect_the_probe_limit() {
    let clock = MockClock::new();
    let b = Arc::new(CircuitBreaker::new(policy(), Arc::new(clock.clone())));
    for _ in 0..3 {
        b.record_failure();
    }
    assert_eq!(b.status().state, CircuitState::Open);
    clock.advance(Duration::from_secs(5));

    // Eight threads race for the two probe slots.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || b.try_acquire().ok())
        })
        .collect();
    let probes: Vec<_> = handles
        .into_iter()
        .filter_map(|h| h.join().expect("no panic"))
        .collect();
    assert_eq!(probes.len(), 2);
    assert_eq!(
        probes.iter().filter(|p| p.transition().is_some()).count(),
        1,
        "exactly one caller saw Open -> HalfOpen"
    );
    for probe in probes {
        b.complete(probe, Outcome::success(Duration::from_millis(10)));
    }
    assert_eq!(b.status().state, CircuitState::Closed);
}

#[test]
fn a_rate_limit_reset_is_shared_through_the_persisted_state() {
    let clock = MockClock::new();
    let reset: SystemTime = clock.now() + Duration::from_secs(600);
    let first = CircuitBreaker::new(policy(), Arc::new(clock.clone()));
    first.open_until(reset);
    let saved = serde_json::to_string(&first.state_snapshot()).expect("serializes");
    drop(first);

    // A second, short-lived process loads the state and sends nothing until the reset.
    let second = CircuitBreaker::with_state(
        policy(),
        Arc::new(clock.clone()),
        serde_json::from_str(&saved).expect("deserializes"),
    );
    let rejected = second.try_acquire().expect_err("held open");
    assert!(rejected.is_rate_limited());
    assert_eq!(rejected.until(), Some(reset));
    clock.set(reset);
    assert!(second.try_acquire().expect("probe").is_probe());
}
