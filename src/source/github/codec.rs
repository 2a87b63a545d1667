//! The encodings the GitHub source needs, from well-kept crates: base64 (the contents API's
//! `content`), git blob ids (SHA-1: an identical write is detected without a commit) and HTTP
//! dates (`Retry-After`).

use std::time::SystemTime;

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Standard base64 with padding (RFC 4648 §4), as GitHub's contents API expects.
pub(crate) fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The git blob id of `content`: `sha1("blob {len}\0" + content)`, lowercase hex, as GitHub
/// reports a file's `sha`.
pub(crate) fn git_blob_sha(content: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", content.len()).as_bytes());
    h.update(content);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// An HTTP date (IMF-fixdate, RFC 850 or asctime form), as `Retry-After` may carry.
pub(crate) fn parse_http_date(s: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(s.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn vectors() {
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"fo"), "Zm8=");
        // `git hash-object` of an empty file and of "hello\n".
        assert_eq!(
            git_blob_sha(b""),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
        assert_eq!(
            git_blob_sha(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(parse_http_date("not a date"), None);
    }
}
