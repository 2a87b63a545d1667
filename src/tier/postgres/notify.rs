//! What a write publishes: the `NOTIFY` payloads (origin and keys, each payload under
//! PostgreSQL's 8,000-byte limit) and the channel they go to; and how a listener reads them.
//!
//! A payload is a header line, then one key per line:
//! * `{origin} k\n{key}\n{key}…`: these keys changed;
//! * `{origin} r {first} {last}`: the keys are in the invalidation log, rows `first..=last`
//!   (for a key too long for a payload, or holding a line break, which keys of the cache never
//!   do but a store called directly may be given).

/// PostgreSQL refuses a payload of 8,000 bytes or more (the default build).
pub(super) const PAYLOAD_LIMIT: usize = 8000;

/// The channel of `schema`: `tc.{schema}`, or for a name too long for an identifier (63
/// bytes), a prefix of it and a hash of the whole.
pub(super) fn channel(schema: &str) -> String {
    let name = format!("tc.{schema}");
    if name.len() <= 63 {
        return name;
    }
    // FNV-1a: stable across processes and builds (the fleet must agree on it).
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    // Schema names are ASCII (checked): any byte is a char boundary.
    format!("tc.{}.{hash:016x}", &schema[..43])
}

/// The header of a payload naming its keys.
fn keys_header(origin: &str) -> String {
    format!("{origin} k")
}

/// The header of a payload naming a range of the log; the publishing statement appends
/// ` {first} {last}` to the payload equal to it.
pub(super) fn range_header(origin: &str) -> String {
    format!("{origin} r")
}

/// The payloads announcing that `keys` changed, in as few payloads under
/// [`PAYLOAD_LIMIT`] as fit; keys that cannot be named in one are announced by one range
/// payload ([`range_header`]) for the whole write.
pub(super) fn payloads(origin: &str, keys: &[&str]) -> Vec<String> {
    let header = keys_header(origin);
    let (mut out, mut current, mut ranged) = (Vec::new(), header.clone(), false);
    for key in keys {
        if key.contains('\n') || header.len() + 1 + key.len() >= PAYLOAD_LIMIT {
            ranged = true;
            continue;
        }
        if current.len() + 1 + key.len() >= PAYLOAD_LIMIT {
            out.push(std::mem::replace(&mut current, header.clone()));
        }
        current.push('\n');
        current.push_str(key);
    }
    if current.len() > header.len() {
        out.push(current);
    }
    if ranged {
        out.push(range_header(origin));
    }
    out
}

/// What a received payload says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Payload<'a> {
    /// These keys changed.
    Keys(Vec<String>),
    /// The keys of the log's rows `first..=last` changed.
    Range(i64, i64),
    /// Not a payload of this tiercache: the listener cannot know what changed.
    Unknown(&'a str),
}

/// Reads a payload: its origin and what it says.
pub(super) fn parse(payload: &str) -> (&str, Payload<'_>) {
    let (head, body) = payload.split_once('\n').unwrap_or((payload, ""));
    let mut words = head.split(' ');
    let origin = words.next().unwrap_or("");
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("k"), None, None, None) => (
            origin,
            Payload::Keys(body.split('\n').map(str::to_owned).collect()),
        ),
        (Some("r"), Some(first), Some(last), None) if body.is_empty() => {
            match (first.parse(), last.parse()) {
                (Ok(first), Ok(last)) => (origin, Payload::Range(first, last)),
                _ => (origin, Payload::Unknown(payload)),
            }
        }
        _ => (origin, Payload::Unknown(payload)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn many_keys_are_split_under_the_limit_and_read_back() {
        let keys: Vec<String> = (0..500)
            .map(|i| format!("owner/repo/{i:05}/{}", "x".repeat(40)))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let payloads = payloads(ORIGIN, &refs);
        assert!(payloads.len() >= 3, "{}", payloads.len());
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() < PAYLOAD_LIMIT, "{}", p.len());
            match parse(p) {
                (o, Payload::Keys(k)) if o == ORIGIN => back.extend(k),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, keys);
    }

    #[test]
    fn a_key_too_long_or_with_a_line_break_goes_by_the_log() {
        let long = "k".repeat(PAYLOAD_LIMIT);
        let payloads = payloads(ORIGIN, &["a", &long, "b\nc"]);
        assert_eq!(payloads, [format!("{ORIGIN} k\na"), format!("{ORIGIN} r")]);
        assert_eq!(
            parse(&format!("{ORIGIN} r 7 9")),
            (ORIGIN, Payload::Range(7, 9))
        );
        assert!(matches!(parse("junk"), (_, Payload::Unknown(_))));
        assert!(matches!(
            parse(&format!("{ORIGIN} r x 9")),
            (_, Payload::Unknown(_))
        ));
        assert!(super::payloads(ORIGIN, &[]).is_empty());
    }

    #[test]
    fn channels_fit_an_identifier() {
        assert_eq!(channel("tiercache"), "tc.tiercache");
        let long = "a".repeat(63);
        let c = channel(&long);
        assert!(c.len() <= 63, "{c}");
        assert_ne!(c, channel(&format!("{}b", "a".repeat(62))));
    }
}
