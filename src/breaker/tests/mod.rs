//! Unit tests of the breaker: the policy here, the state machine in `state`, the shared
//! `CircuitBreaker` handle in `handle`.

mod handle;
mod state;

use super::*;
use crate::clock::from_millis;
use crate::Error;
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
