//! Files through the contents API: a read (raw media type, conditional on the stored ETag), and
//! a write or delete as a commit, after looking up the file's current blob `sha`.

use http::header::{HeaderValue, ETAG, IF_NONE_MATCH};
use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::codec;
use super::key::GitHubKey;
use super::transport::{Answer, JSON, OBJECT, RAW};
use super::{GitHubSource, LOG_TARGET};
use crate::source::{Fetched, SourceError};

/// The file being written or deleted, as it is now.
enum Current {
    Missing,
    File { sha: String },
}

impl GitHubSource {
    fn commit_message(&self, op: &str, key: &GitHubKey) -> String {
        self.commit_message
            .replace("{op}", op)
            .replace("{path}", &key.path)
            .replace("{key}", &key.to_string())
    }

    pub(super) async fn fetch_inner(
        &self,
        key: &GitHubKey,
        validator: Option<&str>,
    ) -> Result<Fetched, SourceError> {
        let pq = format!("{}{}", key.contents_path(), key.ref_query());
        // A validator that cannot be a header value cannot match anything: send none.
        let extra = validator
            .and_then(|v| HeaderValue::from_str(v).ok())
            .map(|v| (IF_NONE_MATCH, v));
        let sent_validator = extra.is_some();
        let a = self.send(Method::GET, &pq, RAW, extra, None).await?;
        match a.status {
            StatusCode::OK => {
                if let Some(kind) = not_a_file(&a) {
                    return Err(SourceError::Rejected {
                        status: Some(200),
                        message: format!("{key} is a {kind}, not a file"),
                    });
                }
                Ok(Fetched::Value {
                    validator: a.header(ETAG).map(str::to_owned),
                    value: a.body,
                    ttl: None,
                })
            }
            StatusCode::NOT_MODIFIED if sent_validator => Ok(Fetched::NotModified { ttl: None }),
            StatusCode::NOT_MODIFIED => Err(SourceError::InvalidResponse {
                message: "GitHub answered 304 Not Modified to an unconditional request".into(),
            }),
            StatusCode::NOT_FOUND => Ok(Fetched::NotFound),
            _ => Err(self.error_for(&a)),
        }
    }

    /// What is at the key's path now (object media type: one JSON object whatever it is).
    async fn current(&self, key: &GitHubKey) -> Result<Current, SourceError> {
        let pq = format!("{}{}", key.contents_path(), key.ref_query());
        let a = self.send(Method::GET, &pq, OBJECT, None, None).await?;
        match a.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Current::Missing),
            _ => return Err(self.error_for(&a)),
        }
        let what = "a contents look-up";
        let v = a.json().ok_or_else(|| Self::invalid_json(&a, what))?;
        if v.is_array() {
            return Err(SourceError::Rejected {
                status: Some(200),
                message: format!("{key} is a directory, not a file"),
            });
        }
        match v.get("type").and_then(Value::as_str) {
            Some("file") => {}
            Some(kind) => {
                let kind = if kind == "dir" { "directory" } else { kind };
                return Err(SourceError::Rejected {
                    status: Some(200),
                    message: format!("{key} is a {kind}, not a file"),
                });
            }
            None => return Err(Self::invalid_json(&a, what)),
        }
        let sha = v
            .get("sha")
            .and_then(Value::as_str)
            .ok_or_else(|| Self::invalid_json(&a, what))?;
        Ok(Current::File {
            sha: sha.to_owned(),
        })
    }

    pub(super) async fn put_inner(&self, key: &GitHubKey, value: &[u8]) -> Result<(), SourceError> {
        let current = self.current(key).await?;
        let (op, sha) = match current {
            Current::File { sha } => {
                if sha.eq_ignore_ascii_case(&codec::git_blob_sha(value)) {
                    tracing::debug!(
                        target: LOG_TARGET,
                        %key,
                        "GitHub already holds these bytes; no commit"
                    );
                    return Ok(());
                }
                ("update", Some(sha))
            }
            Current::Missing => ("create", None),
        };
        let mut body = json!({
            "message": self.commit_message(op, key),
            "content": codec::base64(value),
        });
        if let Some(sha) = sha {
            body["sha"] = Value::String(sha);
        }
        if let Some(r) = &key.reference {
            body["branch"] = Value::String(r.clone());
        }
        let a = self
            .send(Method::PUT, &key.contents_path(), JSON, None, Some(&body))
            .await?;
        match a.status {
            StatusCode::OK | StatusCode::CREATED => Ok(()),
            _ => Err(self.error_for(&a)),
        }
    }

    pub(super) async fn delete_inner(&self, key: &GitHubKey) -> Result<(), SourceError> {
        let sha = match self.current(key).await? {
            Current::Missing => return Ok(()),
            Current::File { sha } => sha,
        };
        let mut body = json!({
            "message": self.commit_message("delete", key),
            "sha": sha,
        });
        if let Some(r) = &key.reference {
            body["branch"] = Value::String(r.clone());
        }
        let a = self
            .send(
                Method::DELETE,
                &key.contents_path(),
                JSON,
                None,
                Some(&body),
            )
            .await?;
        match a.status {
            StatusCode::OK | StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.error_for(&a)),
        }
    }
}

/// With the raw media type a file comes as its bytes (content type `application/vnd.github.raw`
/// or similar), but a directory comes as GitHub's JSON array of entries and a submodule as a JSON
/// object: `Some(kind)` for those. A JSON *file* is not mistaken for them: only an
/// `application/json` content type is looked into.
fn not_a_file(a: &Answer) -> Option<&'static str> {
    if !a.is_json() {
        return None;
    }
    match a.json()? {
        Value::Array(entries)
            if entries
                .iter()
                .all(|e| e.get("type").is_some_and(Value::is_string)) =>
        {
            Some("directory")
        }
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("submodule") => Some("submodule"),
            Some("dir") => Some("directory"),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_messages() {
        let s = GitHubSource::builder()
            .anonymous()
            .commit_message("[{op}] {path} ({key})")
            .build()
            .unwrap();
        let k = GitHubKey::parse("o/r/a/b.txt@dev").unwrap();
        assert_eq!(
            s.commit_message("update", &k),
            "[update] a/b.txt (o/r/a/b.txt@dev)"
        );
        let d = GitHubSource::builder().anonymous().build().unwrap();
        assert_eq!(d.commit_message("create", &k), "tiercache: create a/b.txt");
    }
}
