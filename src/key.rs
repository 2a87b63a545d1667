//! Key validation, done before any tier is touched.

use std::fmt;

use serde::Serialize;

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is the empty string.
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
    /// The key holds a NUL or other control character.
    ControlCharacter {
        /// Byte offset of the first offending character.
        at: usize,
    },
    /// The source refused the key's shape (for example a GitHub key without a path).
    Malformed(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Empty => f.write_str("the key is empty"),
            KeyError::TooLong { len } => {
                write!(f, "the key is {len} bytes long; the limit is {MAX_KEY_LEN}")
            }
            KeyError::ControlCharacter { at } => {
                write!(f, "the key holds a NUL or control character at byte {at}")
            }
            KeyError::Malformed(why) => f.write_str(why),
        }
    }
}

/// Checks the rules every key must meet, whatever the source.
#[inline]
pub(crate) fn validate(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong { len: key.len() });
    }
    // ASCII keys (the usual case) are checked byte by byte; others char by char, since C1
    // controls (U+0080..U+009F) are two bytes long.
    let bytes = key.as_bytes();
    if is_printable_ascii(bytes) {
        return Ok(());
    }
    match bytes.iter().position(|&b| !(0x20..0x7f).contains(&b)) {
        None => Ok(()),
        Some(at) if bytes[at] != 0x7f && bytes[at] < 0x80 => Err(KeyError::ControlCharacter { at }),
        Some(_) => match key.char_indices().find(|(_, c)| c.is_control()) {
            Some((at, _)) => Err(KeyError::ControlCharacter { at }),
            None => Ok(()),
        },
    }
}

/// Whether every byte is printable ASCII (0x20..0x7e): eight bytes at a time, without branches
/// per byte (this runs on every L1 hit).
#[inline]
fn is_printable_ascii(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The last, partial word is padded with a printable byte.
    let word = |chunk: &[u8]| {
        let mut w = [b'a'; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        u64::from_le_bytes(w)
    };
    // A byte below 0x20 borrows into its high bit; 0x7f and above carry into (or already have)
    // it. A carry can only mark a neighbour of a byte that is already odd.
    let odd = |w: u64| (w.wrapping_sub(0x20 * ONES) & !w) | w.wrapping_add(ONES) | w;
    let mut words = bytes.chunks_exact(8);
    let mut acc = 0u64;
    for w in &mut words {
        acc |= odd(word(w));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        acc |= odd(word(rest));
    }
    acc & HIGH == 0
}

/// A key shortened for messages: errors name the key, but never carry a kilobyte of it.
pub(crate) fn display_key(key: &str) -> String {
    const SHOWN: usize = 80;
    if key.len() <= SHOWN {
        return key.escape_debug().to_string();
    }
    let mut end = SHOWN;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", key[..end].escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert_eq!(validate(""), Err(KeyError::Empty));
        assert_eq!(
            validate(&"a".repeat(1025)),
            Err(KeyError::TooLong { len: 1025 })
        );
        assert!(validate(&"a".repeat(1024)).is_ok());
        assert_eq!(validate("a\0b"), Err(KeyError::ControlCharacter { at: 1 }));
        assert_eq!(validate("ab\n"), Err(KeyError::ControlCharacter { at: 2 }));
        assert!(validate("owner/repo/dir/ünïcode file.txt@main").is_ok());
        assert_eq!(
            validate("a\u{7f}"),
            Err(KeyError::ControlCharacter { at: 1 })
        );
        assert_eq!(
            validate("é\u{85}"),
            Err(KeyError::ControlCharacter { at: 2 })
        );
    }

    #[test]
    fn word_check_matches_byte_check() {
        for b in 0..=255u8 {
            for at in 0..17 {
                let mut key = vec![b'a'; 17];
                key[at] = b;
                let expected = key.iter().all(|&c| (0x20..0x7f).contains(&c));
                assert_eq!(is_printable_ascii(&key), expected, "byte {b:#x} at {at}");
            }
        }
    }

    #[test]
    fn display_is_bounded() {
        let long = "é".repeat(600);
        assert!(display_key(&long).len() < 100);
        assert_eq!(display_key("a\tb"), "a\\tb");
    }
}
