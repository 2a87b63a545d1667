//! The Prometheus exposition, parsed line by line, against the operations done.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::FakeSource;
use tiercache::{MockClock, TieredCache};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A parsed exposition: every sample by its series (`name{labels}`), and each family's type.
#[derive(Debug, Default)]
struct Parsed {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

/// A small parser of the text format (0.0.4): `# HELP`/`# TYPE` lines, then `series value`.
/// Panics on any line it does not understand, so a malformed exposition fails the test.
fn parse(text: &str) -> Parsed {
    let mut p = Parsed::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            p.types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() || line == "# EOF" {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            name.starts_with("tiercache_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| p.types.get(*f).is_some_and(|t| t == "histogram"))
            .unwrap_or(name);
        assert!(p.types.contains_key(family), "no # TYPE before {line:?}");
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(
            p.samples.insert(series.to_owned(), value).is_none(),
            "duplicate series {series}"
        );
    }
    p
}

#[tokio::test]
async fn metrics_match_the_operations_done() -> TestResult {
    let (source, clock) = (FakeSource::new(), MockClock::new());
    source.insert("a", "alpha");
    let cache = TieredCache::builder()
        .source(source.clone())
        .clock(clock.clone())
        .ttl(Duration::from_secs(60))
        .negative_ttl(Duration::from_secs(600))
        .build()?;
    cache.get("a").await?; // L1 miss, L2 miss, source ok
    cache.get("a").await?; // L1 hit
    cache.get("missing").await?; // L1 miss, L2 miss, source 404
    clock.advance(Duration::from_secs(61));
    cache.get("a").await?; // stale everywhere: 304
    cache.mget(&["a", "missing"]).await; // L1 hit, and the cached not-found

    let p = parse(&cache.stats().await.to_prometheus());
    let v = |series: &str| {
        *p.samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing: {p:#?}"))
    };
    assert_eq!(p.types["tiercache_hits_total"], "counter");
    assert_eq!(p.types["tiercache_latency_seconds"], "histogram");
    assert_eq!(v(r#"tiercache_hits_total{tier="l1"}"#), 3.0);
    assert_eq!(v(r#"tiercache_misses_total{tier="l1"}"#), 3.0);
    assert_eq!(v(r#"tiercache_misses_total{tier="l2"}"#), 3.0);
    assert_eq!(
        v(r#"tiercache_hits_total{tier="l3"}"#),
        2.0,
        "a value and a 304"
    );
    assert_eq!(v(r#"tiercache_misses_total{tier="l3"}"#), 1.0, "the 404");
    assert_eq!(v(r#"tiercache_source_calls_total{outcome="ok"}"#), 1.0);
    assert_eq!(
        v(r#"tiercache_source_calls_total{outcome="not_modified"}"#),
        1.0
    );
    assert_eq!(
        v(r#"tiercache_source_calls_total{outcome="not_found"}"#),
        1.0
    );
    assert_eq!(v("tiercache_source_calls_refused_total"), 0.0);
    assert_eq!(v("tiercache_negative_hits_total"), 1.0);
    // Three source calls timed under L3, three L2 reads under L2, one mget pass under L1.
    let count = |tier: &str, op: &str| {
        v(&format!(
            r#"tiercache_latency_seconds_count{{tier="{tier}",op="{op}"}}"#
        ))
    };
    assert_eq!(count("l3", "get"), 3.0);
    assert_eq!(count("l2", "get"), 3.0);
    assert_eq!(count("l1", "mget"), 1.0);
    assert!(
        !p.samples
            .keys()
            .any(|k| k.contains(r#"tier="l2",op="mget""#)),
        "mget had no L1 miss"
    );
    // Buckets are cumulative and end at the count; the sum is in seconds (well under a minute).
    let buckets: Vec<f64> = p
        .samples
        .iter()
        .filter(|(k, _)| k.starts_with(r#"tiercache_latency_seconds_bucket{tier="l3",op="get","#))
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(
        buckets.len(),
        tiercache::stats::LATENCY_BUCKETS_SECONDS.len() + 1
    );
    assert_eq!(
        v(r#"tiercache_latency_seconds_bucket{tier="l3",op="get",le="+Inf"}"#),
        3.0
    );
    assert!(v(r#"tiercache_latency_seconds_sum{tier="l3",op="get"}"#) < 60.0);
    assert_eq!(
        v(r#"tiercache_breaker_state{name="l3",state="closed"}"#),
        1.0
    );
    assert_eq!(v("tiercache_outbox_depth"), 0.0);
    Ok(())
}
