//! GitHub keys: `owner/repo/path/to/file[@ref]`, parsed strictly before anything is sent.

use std::fmt;
use std::str::FromStr;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::key::KeyError;

/// Characters left as they are in a URL path segment or query value: RFC 3986 "unreserved".
/// Everything else (spaces, `#`, `?`, `%`, `/` inside a ref, non-ASCII) is percent-encoded.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A parsed GitHub key: a file at an optional ref of a repository.
///
/// # Syntax
/// `owner/repo/path/to/file` or `owner/repo/path/to/file@ref`.
///
/// * `owner` is 1–100 ASCII letters, digits, `-` or `_`; `repo` is 1–100 ASCII letters, digits,
///   `-`, `_` or `.` (not `.` or `..`).
/// * The path has at least one segment; no segment is empty, `.` or `..`; no backslash, NUL or
///   other control character anywhere in the key. Any other character (spaces, unicode, `#`, `?`,
///   `%`) is allowed and percent-encoded on the wire.
/// * **Where the ref starts:** at the **last** `@` in the key, wherever it is, so a ref may hold
///   `/` (`feature/x`, `release/1.0`). A consequence: a key whose *path* holds an `@`
///   (`icon@2x.png`, `node_modules/@types/x`) must end with an explicit ref — `...@main` — or with
///   a bare `@`, which means "the default branch": `owner/repo/icon@2x.png@`. A ref therefore
///   cannot contain `@` itself. Refs are checked against git's ref-name rules (no `..`, `@{`,
///   spaces, `~^:?*[\`, no empty component, no trailing `.`, `/` or `.lock`).
/// * No ref (or a bare trailing `@`): the repository's default branch.
///
/// [`Display`](fmt::Display) prints the canonical key back (adding the bare `@` when the path
/// holds an `@` and there is no ref, dropping it otherwise), so `key.to_string().parse()` gives
/// the same key, and `owner/repo/a.txt@` and `owner/repo/a.txt` print alike: use the printed
/// form as the cache key so one file is one cache entry.
///
/// A file's URL as GitHub shows it is read by [`from_url`](Self::from_url), not by
/// [`parse`](Self::parse) (a cache key is never a URL).
///
/// ```
/// use tiercache::source::github::GitHubKey;
///
/// let k: GitHubKey = "rust-lang/rust/src/doc/a b.md@release/1.80".parse().unwrap();
/// assert_eq!(k.owner, "rust-lang");
/// assert_eq!(k.path, "src/doc/a b.md");
/// assert_eq!(k.reference.as_deref(), Some("release/1.80"));
/// let k: GitHubKey = "o/r/icons/logo@2x.png@".parse().unwrap();
/// assert_eq!((k.path.as_str(), k.reference), ("icons/logo@2x.png", None));
/// assert!("o/r".parse::<GitHubKey>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GitHubKey {
    /// The repository owner (user or organisation).
    pub owner: String,
    /// The repository name.
    pub repo: String,
    /// The file's path in the repository, `/`-separated, not encoded.
    pub path: String,
    /// Branch, tag or commit sha; `None` for the default branch.
    pub reference: Option<String>,
}

impl GitHubKey {
    /// Whether the key names a full commit sha as its ref (40 hexadecimal digits): its content
    /// can never change, so the cache keeps it fresh for good
    /// ([`PINNED_TTL`](super::PINNED_TTL)) and never revalidates it. A branch or tag, or an
    /// abbreviated sha, can move (an abbreviation may become ambiguous): those are revalidated.
    ///
    /// ```
    /// use tiercache::source::github::GitHubKey;
    ///
    /// let sha = "0123456789abcdef0123456789abcdef01234567";
    /// assert!(GitHubKey::parse(&format!("octo/app/a.toml@{sha}")).unwrap().pinned_to_commit());
    /// assert!(!GitHubKey::parse("octo/app/a.toml@v1.2.0").unwrap().pinned_to_commit());
    /// assert!(!GitHubKey::parse("octo/app/a.toml@0123456").unwrap().pinned_to_commit());
    /// ```
    pub fn pinned_to_commit(&self) -> bool {
        self.reference
            .as_deref()
            .is_some_and(|r| r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// Parses a key; see the [type's documentation](GitHubKey) for the syntax.
    ///
    /// # Errors
    /// [`KeyError::Malformed`] naming the problem.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        let (owner, repo, path, reference) = split(key, KEY_SYNTAX)?;
        Ok(GitHubKey {
            owner,
            repo,
            path: path.unwrap_or_default(),
            reference,
        })
    }

    /// Reads a file's URL as GitHub shows it:
    /// * `https://github.com/OWNER/REPO/blob/REF/PATH` (or `/raw/` in place of `/blob/`),
    /// * `https://raw.githubusercontent.com/OWNER/REPO/REF/PATH`,
    ///
    /// where REF may also be spelled `refs/heads/BRANCH` or `refs/tags/TAG` (it becomes `BRANCH`
    /// or `TAG`). A query or fragment (`?plain=1`, `#L10`) is ignored and percent-encoded
    /// characters are decoded. `http://` and `www.github.com` are accepted too.
    ///
    /// **The ref is one path segment.** A URL cannot tell the branch `feature/x` with the file
    /// `a.txt` from the branch `feature` with the file `x/a.txt` (GitHub's own pages tell them
    /// apart by knowing the repository's branches); for a ref holding a `/`, write the key
    /// itself: `OWNER/REPO/PATH@feature/x`. GitHub Enterprise URLs are not recognised.
    ///
    /// ```
    /// use tiercache::source::github::GitHubKey;
    ///
    /// let k = GitHubKey::from_url("https://github.com/octo/app/blob/main/config/a%20b.toml#L3")
    ///     .unwrap();
    /// assert_eq!(k.to_string(), "octo/app/config/a b.toml@main");
    /// let raw = "https://raw.githubusercontent.com/octo/app/refs/heads/main/config/a%20b.toml";
    /// assert_eq!(GitHubKey::from_url(raw).unwrap(), k);
    /// assert!(GitHubKey::from_url("https://gitlab.com/octo/app/-/blob/main/a").is_err());
    /// ```
    ///
    /// # Errors
    /// [`KeyError::Malformed`] naming the problem: not an `http(s)` URL, another host, not a
    /// file's URL, or a key the result would not be (see [`parse`](Self::parse)).
    pub fn from_url(url: &str) -> Result<Self, KeyError> {
        const SHAPES: &str = "expected https://github.com/OWNER/REPO/blob/REF/PATH or \
                              https://raw.githubusercontent.com/OWNER/REPO/REF/PATH";
        let trimmed = url.trim();
        let rest = trimmed
            .strip_prefix("https://")
            .or_else(|| trimmed.strip_prefix("http://"))
            .ok_or_else(|| malformed(format!("{url:?} is not an http(s) URL; {SHAPES}")))?;
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let segments = path
            .split('/')
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map_err(|_| malformed(format!("{url:?} holds a %-escape that is not UTF-8")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let segments: Vec<&str> = segments.iter().map(|s| s.as_ref()).collect();
        let not_a_file = || malformed(format!("{url:?} is not a file's URL; {SHAPES}"));
        let (owner, repo, rest) = match host.to_ascii_lowercase().as_str() {
            "github.com" | "www.github.com" => match segments.as_slice() {
                [owner, repo, "blob" | "raw", rest @ ..] => (*owner, *repo, rest),
                _ => return Err(not_a_file()),
            },
            "raw.githubusercontent.com" => match segments.as_slice() {
                [owner, repo, rest @ ..] => (*owner, *repo, rest),
                _ => return Err(not_a_file()),
            },
            _ => {
                return Err(malformed(format!(
                    "{url:?} is not a github.com or raw.githubusercontent.com URL; {SHAPES}"
                )))
            }
        };
        let (reference, path) = match rest {
            ["refs", "heads" | "tags", r, path @ ..] => (*r, path),
            [r, path @ ..] => (*r, path),
            [] => return Err(not_a_file()),
        };
        if reference.is_empty() || path.is_empty() {
            return Err(not_a_file());
        }
        GitHubKey::parse(&format!("{owner}/{repo}/{}@{reference}", path.join("/")))
    }

    /// The contents API path, encoded: `/repos/{owner}/{repo}/contents/{path}`.
    pub(crate) fn contents_path(&self) -> String {
        format!(
            "{}/contents/{}",
            repo_path(&self.owner, &self.repo),
            encode_path(&self.path)
        )
    }

    /// `?ref=...` (encoded) or nothing.
    pub(crate) fn ref_query(&self) -> String {
        self.reference
            .as_deref()
            .map(|r| format!("?ref={}", encode(r)))
            .unwrap_or_default()
    }
}

impl FromStr for GitHubKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GitHubKey::parse(s)
    }
}

impl fmt::Display for GitHubKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.owner, self.repo, self.path)?;
        format_ref(f, &self.path, self.reference.as_deref())
    }
}

fn format_ref(f: &mut fmt::Formatter<'_>, path: &str, reference: Option<&str>) -> fmt::Result {
    match reference {
        Some(r) => write!(f, "@{r}"),
        None if path.contains('@') => f.write_str("@"),
        None => Ok(()),
    }
}

/// A `list` prefix: `owner/repo[/dir][@ref]`, same rules as [`GitHubKey`] but the path is
/// optional.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct GitHubPrefix {
    pub(crate) owner: String,
    pub(crate) repo: String,
    /// The directory, without a trailing `/`; empty for the whole repository.
    pub(crate) dir: String,
    pub(crate) reference: Option<String>,
}

impl GitHubPrefix {
    pub(crate) fn parse(prefix: &str) -> Result<Self, KeyError> {
        // A trailing '/' on a directory prefix is accepted: `owner/repo/dir/`.
        let trimmed = match prefix.rfind('@') {
            Some(at) => {
                let (head, tail) = prefix.split_at(at);
                let head = head.strip_suffix('/').unwrap_or(head);
                format!("{head}{tail}")
            }
            None => prefix.strip_suffix('/').unwrap_or(prefix).to_owned(),
        };
        let (owner, repo, path, reference) = split(&trimmed, PREFIX_SYNTAX)?;
        Ok(GitHubPrefix {
            owner,
            repo,
            dir: path.unwrap_or_default(),
            reference,
        })
    }

    /// The key of the file at `path` (a full repository path) under this prefix's ref.
    pub(crate) fn key_for(&self, path: &str) -> String {
        struct K<'a>(&'a GitHubPrefix, &'a str);
        impl fmt::Display for K<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}/{}/{}", self.0.owner, self.0.repo, self.1)?;
                format_ref(f, self.1, self.0.reference.as_deref())
            }
        }
        K(self, path).to_string()
    }

    /// Whether the repository path `path` lies under this prefix's directory.
    pub(crate) fn contains(&self, path: &str) -> bool {
        self.dir.is_empty()
            || path
                .strip_prefix(self.dir.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

type Parts = (String, String, Option<String>, Option<String>);

/// What is being parsed, and its syntax, for the error messages.
struct Syntax {
    what: &'static str,
    expected: &'static str,
    path_required: bool,
}

const KEY_SYNTAX: Syntax = Syntax {
    what: "a GitHub key",
    expected: "owner/repo/path[@ref]",
    path_required: true,
};

const PREFIX_SYNTAX: Syntax = Syntax {
    what: "a GitHub prefix",
    expected: "owner/repo[/dir][@ref]",
    path_required: false,
};

fn malformed(msg: impl Into<String>) -> KeyError {
    KeyError::Malformed(msg.into())
}

fn split(key: &str, syntax: Syntax) -> Result<Parts, KeyError> {
    let Syntax {
        what,
        expected,
        path_required,
    } = syntax;
    if key.is_empty() {
        return Err(malformed(format!("{what} is empty; expected {expected}")));
    }
    if let Some((at, _)) = key.char_indices().find(|(_, c)| c.is_control()) {
        return Err(malformed(format!(
            "a GitHub key holds a NUL or control character at byte {at}"
        )));
    }
    if key.contains('\\') {
        return Err(malformed(
            "a GitHub key holds a backslash; path segments are separated by '/'",
        ));
    }
    let (body, reference) = match key.rfind('@') {
        Some(at) => {
            let r = &key[at + 1..];
            if r.is_empty() {
                (&key[..at], None)
            } else {
                check_ref(r)?;
                (&key[..at], Some(r.to_owned()))
            }
        }
        None => (key, None),
    };
    let mut parts = body.splitn(3, '/');
    let owner = parts.next().unwrap_or_default();
    let repo = parts.next();
    let path = parts.next();
    if owner.is_empty() {
        return Err(malformed(format!(
            "{what} has no owner; expected {expected}"
        )));
    }
    check_owner(owner)?;
    let repo = match repo {
        Some(r) if !r.is_empty() => r,
        _ => {
            return Err(malformed(format!(
                "{what} has no repository; expected {expected}"
            )))
        }
    };
    check_repo(repo)?;
    let path = match path {
        None if path_required => {
            return Err(malformed(format!(
                "{what} has no file path; expected {expected}"
            )))
        }
        None => None,
        Some(p) => {
            check_path(p, reference.is_some())?;
            Some(p.to_owned())
        }
    };
    Ok((owner.to_owned(), repo.to_owned(), path, reference))
}

fn check_owner(owner: &str) -> Result<(), KeyError> {
    if owner.len() > 100
        || !owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(malformed(format!(
            "the GitHub owner {:?} is not a valid user or organisation name \
             (ASCII letters, digits, '-', '_'; at most 100)",
            owner
        )));
    }
    Ok(())
}

fn check_repo(repo: &str) -> Result<(), KeyError> {
    if repo == "." || repo == ".." {
        return Err(malformed(format!(
            "the GitHub repository name {repo:?} is a '.' or '..' segment"
        )));
    }
    if repo.len() > 100
        || !repo
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(malformed(format!(
            "the GitHub repository name {repo:?} is not valid \
             (ASCII letters, digits, '-', '_', '.'; at most 100)"
        )));
    }
    Ok(())
}

fn check_path(path: &str, had_ref: bool) -> Result<(), KeyError> {
    if path.is_empty() {
        return Err(malformed("a GitHub key has an empty file path"));
    }
    for seg in path.split('/') {
        match seg {
            "" => {
                let hint = if !had_ref {
                    ""
                } else {
                    " (if the path holds an '@', end the key with '@' or '@ref': the last '@' \
                     starts the ref)"
                };
                return Err(malformed(format!(
                    "the path {path:?} of a GitHub key has an empty segment{hint}"
                )));
            }
            "." | ".." => {
                return Err(malformed(format!(
                    "the path {path:?} of a GitHub key has a {seg:?} segment"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// git's ref-name rules (git check-ref-format), plus "no '@'" (the last '@' starts the ref).
fn check_ref(r: &str) -> Result<(), KeyError> {
    let bad = |why: &str| Err(malformed(format!("the ref {r:?} of a GitHub key {why}")));
    if r.len() > 255 {
        return bad("is longer than 255 bytes");
    }
    if r.contains("..") {
        return bad("holds '..'");
    }
    if let Some(c) = r
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return bad(&format!("holds {c:?}, which git refs cannot"));
    }
    if r.starts_with('/') || r.ends_with('/') || r.contains("//") {
        return bad("has an empty component");
    }
    if r.ends_with('.') || r.ends_with(".lock") {
        return bad("ends with '.' or '.lock'");
    }
    if r.split('/').any(|c| c.starts_with('.')) {
        return bad("has a component starting with '.'");
    }
    Ok(())
}

/// Percent-encodes one path segment or query value.
pub(crate) fn encode(s: &str) -> String {
    utf8_percent_encode(s, ENCODE).to_string()
}

/// Percent-encodes each segment of a `/`-separated path.
pub(crate) fn encode_path(path: &str) -> String {
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// `/repos/{owner}/{repo}`, encoded.
pub(crate) fn repo_path(owner: &str, repo: &str) -> String {
    format!("/repos/{}/{}", encode(owner), encode(repo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> GitHubKey {
        GitHubKey::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match GitHubKey::parse(s) {
            Err(KeyError::Malformed(m)) => m,
            other => panic!("{s:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn plain_and_with_ref() {
        let a = k("octo/hello/docs/readme.md");
        assert_eq!(
            (a.owner.as_str(), a.repo.as_str(), a.path.as_str()),
            ("octo", "hello", "docs/readme.md")
        );
        assert_eq!(a.reference, None);
        let b = k("octo/hello.rs/a.txt@v1.2.3");
        assert_eq!(b.repo, "hello.rs");
        assert_eq!(b.reference.as_deref(), Some("v1.2.3"));
        let c = k("octo/hello/a.txt@feature/new-thing");
        assert_eq!(c.reference.as_deref(), Some("feature/new-thing"));
        let d = k("octo/hello/a.txt@0123456789abcdef0123456789abcdef01234567");
        assert_eq!(d.reference.unwrap().len(), 40);
    }

    #[test]
    fn at_sign_rule() {
        // The last '@' starts the ref.
        let a = k("o/r/icons/logo@2x.png@main");
        assert_eq!(
            (a.path.as_str(), a.reference.as_deref()),
            ("icons/logo@2x.png", Some("main"))
        );
        let b = k("o/r/node_modules/@types/x/index.d.ts@");
        assert_eq!(
            (b.path.as_str(), b.reference),
            ("node_modules/@types/x/index.d.ts", None)
        );
        // Without the trailing '@', the '@' would start a ref and leave an empty segment.
        let m = err("o/r/node_modules/@types/x/index.d.ts");
        assert!(m.contains("empty segment") && m.contains("'@'"), "{m}");
        // Round trip through Display.
        for s in [
            "o/r/a@b/c.txt@",
            "o/r/a.txt",
            "o/r/a.txt@v1",
            "o/r/a b/ü#?%.txt@x/y",
        ] {
            assert_eq!(k(s).to_string(), s);
            assert_eq!(k(&k(s).to_string()), k(s));
        }
        assert_eq!(k("o/r/a.txt@").to_string(), "o/r/a.txt");
    }

    #[test]
    fn refused() {
        for (key, needle) in [
            ("", "empty"),
            ("octo", "no repository"),
            ("octo/", "no repository"),
            ("octo/repo", "no file path"),
            ("octo/repo/", "empty file path"),
            ("/repo/a", "no owner"),
            ("o//a", "no repository"),
            ("o/r/a//b", "empty segment"),
            ("o/r/a/", "empty segment"),
            ("o/r/./a", "\".\" segment"),
            ("o/r/a/../b", "\"..\" segment"),
            ("o/../a", "'.' or '..'"),
            ("o/r/a\\b", "backslash"),
            ("o/r/a\0b", "control"),
            ("o/r/a\nb", "control"),
            ("o w/r/a", "owner"),
            ("o/r!/a", "repository name"),
            ("o/r/a@ma..in", "'..'"),
            ("o/r/a@ma in", "' '"),
            ("o/r/a@x*y", "'*'"),
            ("o/r/a@x/", "empty component"),
            ("o/r/a@x.lock", ".lock"),
            ("o/r/a@main:x", "':'"),
        ] {
            let m = match GitHubKey::parse(key) {
                Err(KeyError::Malformed(m)) => m,
                other => panic!("{key:?} gave {other:?}"),
            };
            assert!(m.contains(needle), "{key:?}: {m:?} lacks {needle:?}");
        }
    }

    #[test]
    fn urls() {
        let url = |u: &str| {
            GitHubKey::from_url(u)
                .unwrap_or_else(|e| panic!("{u:?}: {e}"))
                .to_string()
        };
        for (u, key) in [
            (
                "https://github.com/o/r/blob/main/a/b.txt",
                "o/r/a/b.txt@main",
            ),
            (
                "http://www.github.com/o/r/raw/v1.2/a.txt?raw=true",
                "o/r/a.txt@v1.2",
            ),
            (
                "https://GitHub.com/o/r/blob/main/a.md#L10-L12",
                "o/r/a.md@main",
            ),
            (
                "https://github.com/o/r/blob/refs/heads/dev/a.txt",
                "o/r/a.txt@dev",
            ),
            (
                "https://raw.githubusercontent.com/o/r/main/a/b.txt",
                "o/r/a/b.txt@main",
            ),
            (
                "https://raw.githubusercontent.com/o/r/refs/tags/v1/a.txt",
                "o/r/a.txt@v1",
            ),
            (
                "https://github.com/o/r/blob/main/icons/a%402x.png",
                "o/r/icons/a@2x.png@main",
            ),
            (
                "https://github.com/o/r/blob/main/d/%C3%BC%20x.txt",
                "o/r/d/ü x.txt@main",
            ),
            (
                "https://raw.githubusercontent.com/o/r/0123456789abcdef0123456789abcdef01234567/a",
                "o/r/a@0123456789abcdef0123456789abcdef01234567",
            ),
        ] {
            assert_eq!(url(u), key, "{u}");
        }
        for (u, needle) in [
            ("ftp://github.com/o/r/blob/main/a", "not an http(s) URL"),
            ("https://gitlab.com/o/r/blob/main/a", "not a github.com"),
            ("https://github.com/o/r", "not a file's URL"),
            ("https://github.com/o/r/tree/main/dir", "not a file's URL"),
            ("https://github.com/o/r/blob/main", "not a file's URL"),
            ("https://github.com/o/r/blob/main/", "empty file path"),
            (
                "https://raw.githubusercontent.com/o/r/main",
                "not a file's URL",
            ),
            ("https://github.com/o/r/blob/main/a%FF", "not UTF-8"),
            ("https://github.com/o/r/blob/main/../x", "\"..\" segment"),
        ] {
            match GitHubKey::from_url(u) {
                Err(KeyError::Malformed(m)) => assert!(m.contains(needle), "{u}: {m}"),
                other => panic!("{u:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn encoding() {
        let a = k("o/r/dir/a b#c?d%e ü.txt@rel/1");
        assert_eq!(
            a.contents_path(),
            "/repos/o/r/contents/dir/a%20b%23c%3Fd%25e%20%C3%BC.txt"
        );
        assert_eq!(a.ref_query(), "?ref=rel%2F1");
        assert_eq!(
            k("o/r/a-b_c.~d").contents_path(),
            "/repos/o/r/contents/a-b_c.~d"
        );
    }

    #[test]
    fn prefixes() {
        let p = GitHubPrefix::parse("o/r").unwrap();
        assert_eq!((p.dir.as_str(), p.reference.as_deref()), ("", None));
        assert!(p.contains("anything/at/all"));
        let p = GitHubPrefix::parse("o/r/docs/@v2").unwrap();
        assert_eq!(
            (p.dir.as_str(), p.reference.as_deref()),
            ("docs", Some("v2"))
        );
        assert!(p.contains("docs/a.md") && p.contains("docs/x/y.md"));
        assert!(!p.contains("docs") && !p.contains("docsy/a.md"));
        assert_eq!(p.key_for("docs/a.md"), "o/r/docs/a.md@v2");
        let p = GitHubPrefix::parse("o/r/docs").unwrap();
        assert_eq!(p.key_for("docs/a.md"), "o/r/docs/a.md");
        assert_eq!(p.key_for("docs/a@2x.png"), "o/r/docs/a@2x.png@");
        match GitHubPrefix::parse("o") {
            Err(KeyError::Malformed(m)) => assert_eq!(
                m,
                "a GitHub prefix has no repository; expected owner/repo[/dir][@ref]"
            ),
            other => panic!("{other:?}"),
        }
        assert!(GitHubPrefix::parse("o/r/../x").is_err());
    }
}
