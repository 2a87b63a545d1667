//! Times as people and programs read them: RFC 3339 in JSON (through `humantime`), and
//! "in 42s (at 14:03:12 UTC)" in messages.

use std::time::{Duration, SystemTime};

/// `2026-11-29T14:03:12Z`: a time in RFC 3339, UTC, to the second.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `"in 42s (at 14:03:12 UTC)"`, or `"42s ago (at 14:03:12 UTC)"` for a time past; `now` is
/// passed in so tests (and a mock clock) decide it.
pub fn describe_at(t: SystemTime, now: SystemTime) -> String {
    let stamp = rfc3339(t);
    // `YYYY-MM-DDTHH:MM:SSZ`: the clock time is characters 11..19.
    let clock = stamp.get(11..19).unwrap_or(&stamp);
    let whole =
        |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    match t.duration_since(now) {
        Ok(ahead) => format!("in {} (at {clock} UTC)", whole(ahead)),
        Err(e) => format!("{} ago (at {clock} UTC)", whole(e.duration())),
    }
}

/// `#[serde(serialize_with = "...")]` helpers: RFC 3339 strings instead of serde's
/// `{"secs_since_epoch": …, "nanos_since_epoch": …}`.
pub(crate) mod serde_rfc3339 {
    use std::time::SystemTime;

    use serde::Serializer;

    /// A time as an RFC 3339 string.
    pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*t))
    }

    /// An optional time as an RFC 3339 string or `null`.
    pub(crate) fn option<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => serialize(t, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn rfc3339_and_descriptions() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_952_138);
        assert_eq!(rfc3339(t), "2026-11-29T11:35:38Z");
        let now = t - Duration::from_millis(42_500);
        assert_eq!(describe_at(t, now), "in 42s (at 11:35:38 UTC)");
        assert_eq!(
            describe_at(t, t + Duration::from_secs(125)),
            "2m 5s ago (at 11:35:38 UTC)"
        );
    }

    #[test]
    fn serde_writes_strings() {
        #[derive(serde::Serialize)]
        struct T {
            #[serde(serialize_with = "serde_rfc3339::serialize")]
            at: SystemTime,
            #[serde(serialize_with = "serde_rfc3339::option")]
            next: Option<SystemTime>,
        }
        let v = serde_json::to_value(T {
            at: UNIX_EPOCH,
            next: None,
        })
        .ok();
        assert_eq!(
            v,
            Some(serde_json::json!({"at": "1970-01-01T00:00:00Z", "next": null}))
        );
    }
}
