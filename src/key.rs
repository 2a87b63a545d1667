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
    if let Some((at, _)) = key.char_indices().find(|(_, c)| c.is_control()) {
        return Err(KeyError::ControlCharacter { at });
    }
    Ok(())
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
    }

    #[test]
    fn display_is_bounded() {
        let long = "é".repeat(600);
        assert!(display_key(&long).len() < 100);
        assert_eq!(display_key("a\tb"), "a\\tb");
    }
}
