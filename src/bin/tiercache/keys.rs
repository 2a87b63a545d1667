//! Keys as typed or pasted: canonicalised before they reach the cache, so one file is one cache
//! entry whichever way it was named.

use tiercache::source::github::GitHubKey;

use crate::Failure;

/// The canonical key for `input`: a file's URL on github.com or raw.githubusercontent.com
/// becomes `OWNER/REPO/PATH@REF` ([`GitHubKey::from_url`]); a key is printed back in its
/// canonical form (`KEY@` is `KEY`). A key that does not parse is passed on unchanged, for the
/// cache to refuse with its usual message.
pub(crate) fn canonical(input: &str) -> Result<String, Failure> {
    if input.starts_with("https://") || input.starts_with("http://") {
        return GitHubKey::from_url(input)
            .map(|k| k.to_string())
            .map_err(|e| Failure::usage(format!("invalid key {input:?}: {e}")));
    }
    Ok(GitHubKey::parse(input).map_or_else(|_| input.to_owned(), |k| k.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_one_key() {
        let c = |s: &str| canonical(s).unwrap_or_else(|f| panic!("{s}: {}", f.message));
        assert_eq!(c("octo/app/a.toml@"), "octo/app/a.toml");
        assert_eq!(c("octo/app/a.toml"), "octo/app/a.toml");
        assert_eq!(c("octo/app/a@2x.png@"), "octo/app/a@2x.png@");
        assert_eq!(
            c("https://github.com/octo/app/blob/main/a.toml"),
            "octo/app/a.toml@main"
        );
        assert_eq!(
            c("https://raw.githubusercontent.com/octo/app/main/a.toml"),
            "octo/app/a.toml@main"
        );
        assert_eq!(c("not a key"), "not a key", "left for the cache to refuse");
        let f = canonical("https://example.com/octo/app/blob/main/a").unwrap_err();
        assert!(f.message.starts_with("invalid key"), "{}", f.message);
    }
}
