//! Cold misses in one request: [`Source::fetch_many`](crate::source::Source::fetch_many) through
//! GitHub's GraphQL API, one aliased `repository { object(expression: "REF:PATH") }` field per
//! key, falling back to the REST contents API key by key where GraphQL cannot give the exact bytes.
//!
//! # What each key's field becomes
//! * a `Blob` whose `text` is there, not binary, not truncated, and hashes (as a git blob) to its
//!   `oid`: [`Fetched::Value`], with **no validator** (see below);
//! * `object: null` (no such path or ref), or `repository: null` with a `NOT_FOUND` error for
//!   the field: [`Fetched::NotFound`];
//! * a `Tree`: the REST refusal, "is a directory, not a file" (a `Commit`, a submodule: "is a
//!   submodule, not a file");
//! * anything else — a binary blob (`text` null), a truncated one, text that does not hash to
//!   the `oid` (GitHub's text is UTF-8; a file in another encoding would not come back
//!   byte-exact), any other error on the field, a shape not understood — is fetched again
//!   through the REST contents API (raw media type), byte-exact, with its ETag.
//!
//! **Known difference: symbolic links.** For a symlink whose target is a file in the repository,
//! the contents API answers the target's bytes; GraphQL answers the link's own blob (the target
//! path as text), and nothing in a `Blob` tells a link from a file. A batch therefore reads such
//! a key as the link text, where a single `fetch` reads the target.
//!
//! # Validators
//! GraphQL gives a blob's `oid` (its git object id), not the ETag the contents API would send:
//! that ETag is GitHub's own value, and one made up here would never match, so a later
//! conditional request would cost as much as an unconditional one while claiming otherwise.
//! A value read through GraphQL therefore carries no validator: its first revalidation after
//! expiry is a full REST read (one request, one point of REST budget, the bytes again), which
//! brings the ETag, and later revalidations are the usual free 304s. Values read through the
//! REST fallback keep their ETag. With revalidation pinned to a commit (`commits.rs`) the keys
//! are read at a resolved sha (`"<sha>:path"`) and every value's validator records that commit,
//! so no full read is needed.
//!
//! # Whole-batch failures
//! The request could not be sent, a 5xx (whatever its body), 401, an answer that is not
//! GraphQL's JSON, errors and no data: the call fails as a whole. GraphQL's own budget spent
//! (a 200 with a `RATE_LIMITED` or `RATE_LIMIT` error, or a 403/429 for the `graphql` resource)
//! holds GraphQL off until its reset, and meanwhile the keys are read by REST, one request
//! each: GraphQL's budget is not REST's, so it never fails the call by itself. The call fails
//! as a whole when a REST read meets a rate limit (REST's budget, or a secondary limit, which
//! holds both APIs): nothing more would be answered until it passes. Any other failure of
//! a REST fallback (a 502 for one file) is that key's own answer: the others keep theirs, and the
//! cache tells its breaker of the outage all the same. A 404 from the GraphQL endpoint (a server
//! that has none) makes this source use REST for every later batch too.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Map, Value};

use super::codec;
use super::key::GitHubKey;
use super::{GitHubSource, LOG_TARGET};
use crate::key::KeyError;
use crate::source::{Fetched, SourceError};

/// Keys per GraphQL request, by default and at most.
pub(super) const DEFAULT_BATCH: usize = 100;

/// The fields read of each key's object.
const FRAGMENT: &str = "fragment F on GitObject { __typename \
                        ... on Blob { oid text byteSize isBinary isTruncated } }";

/// What the GraphQL answer says about one key.
enum Field {
    /// The answer for the key.
    Answer(Result<Fetched, SourceError>),
    /// GraphQL cannot give the exact bytes: ask REST (why, for the log).
    Rest(&'static str),
}

/// The GraphQL endpoint for a REST base URL: `https://api.github.com/graphql`; for GitHub
/// Enterprise Server (`https://HOST/api/v3`), `https://HOST/api/graphql`.
pub(super) fn graphql_url(base: &str) -> String {
    match base.strip_suffix("/api/v3") {
        Some(host) => format!("{host}/api/graphql"),
        None => format!("{base}/graphql"),
    }
}

impl GitHubSource {
    /// Whether `fetch_many` uses GraphQL: only with a token (GitHub's GraphQL API does not
    /// answer anonymous requests), a batch size above 1, and an endpoint that exists.
    pub(super) fn batches(&self) -> bool {
        self.token.is_some()
            && self.graphql_batch > 1
            && !self.graphql_missing.load(Ordering::Relaxed)
    }

    pub(super) async fn fetch_many_inner(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        let parsed: Vec<Result<GitHubKey, KeyError>> =
            keys.iter().map(|k| GitHubKey::parse(k)).collect();
        if self.by_commit {
            return self.fetch_at_commits(parsed).await;
        }
        self.fetch_parsed(parsed).await
    }

    /// [`fetch_many_inner`](Self::fetch_many_inner) of keys already parsed, read at their
    /// refs as given.
    pub(super) async fn fetch_parsed(
        &self,
        keys: Vec<Result<GitHubKey, KeyError>>,
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        let mut answers: Vec<Option<Result<Fetched, SourceError>>> = vec![None; keys.len()];
        let mut valid: Vec<(usize, GitHubKey)> = Vec::with_capacity(keys.len());
        for (i, k) in keys.into_iter().enumerate() {
            match k {
                Ok(k) => valid.push((i, k)),
                Err(e) => answers[i] = Some(Err(SourceError::InvalidKey(e))),
            }
        }
        let mut rest: Vec<(usize, &GitHubKey)> = Vec::new();
        if self.batches() {
            for chunk in valid.chunks(self.graphql_batch) {
                let fields = match self.query(chunk).await {
                    // GraphQL's own budget is spent (or a secondary limit holds both APIs):
                    // these keys go by REST, whose gate decides (the cache's breaker must not
                    // hold REST for GraphQL's budget).
                    Err(e) if e.rate_limited_until().is_some() => None,
                    other => other?,
                };
                match fields {
                    Some(fields) => {
                        for ((i, key), field) in chunk.iter().zip(fields) {
                            match field {
                                Field::Answer(a) => answers[*i] = Some(a),
                                Field::Rest(why) => {
                                    tracing::debug!(
                                        target: LOG_TARGET,
                                        %key,
                                        why,
                                        "GraphQL cannot give the exact bytes; asking REST"
                                    );
                                    rest.push((*i, key));
                                }
                            }
                        }
                    }
                    None => rest.extend(chunk.iter().map(|(i, k)| (*i, k))),
                }
            }
        } else {
            rest.extend(valid.iter().map(|(i, k)| (*i, k)));
        }
        // One at a time: GitHub asks for serial requests (secondary rate limits).
        for (i, key) in rest {
            let answer = self.fetch_inner(key, None).await;
            rate_limit_stops_the_batch(&answer)?;
            answers[i] = Some(answer);
        }
        Ok(every_key_answered(answers))
    }

    /// One GraphQL request for `keys`: one field per key, in order; `None` when the server has
    /// no GraphQL endpoint.
    async fn query(&self, keys: &[(usize, GitHubKey)]) -> Result<Option<Vec<Field>>, SourceError> {
        let body = request_body(keys.iter().map(|(_, k)| k));
        let url = graphql_url(&self.base);
        let a = self.send_graphql(&url, &body).await?;
        match a.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                tracing::warn!(
                    target: LOG_TARGET,
                    %url,
                    "no GraphQL endpoint (404); fetching by REST from now on"
                );
                self.graphql_missing.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            _ => return Err(self.error_for(&a)),
        }
        let what = "a GraphQL query";
        let v = a.json().ok_or_else(|| Self::invalid_json(&a, what))?;
        let top = v.as_object().ok_or_else(|| Self::invalid_json(&a, what))?;
        let errors: &[Value] = match top.get("errors") {
            None | Some(Value::Null) => &[],
            Some(Value::Array(errors)) => errors,
            Some(_) => return Err(Self::invalid_json(&a, what)),
        };
        if let Some(e) = errors
            .iter()
            .find(|e| matches!(error_type(e), Some("RATE_LIMITED" | "RATE_LIMIT")))
        {
            let message = error_message(e).unwrap_or("GraphQL rate limit exceeded");
            let until = self.hold_graphql(&a, message);
            return Err(SourceError::RateLimited {
                until,
                status: Some(200),
                message: message.to_owned(),
            });
        }
        let empty = Map::new();
        let data = match top.get("data") {
            Some(Value::Object(d)) => d,
            // Every error names its field: each key is decided on its own below.
            None | Some(Value::Null)
                if !errors.is_empty() && errors.iter().all(|e| alias_of(e).is_some()) =>
            {
                &empty
            }
            None | Some(Value::Null) if !errors.is_empty() => {
                let said: Vec<&str> = errors.iter().filter_map(error_message).collect();
                return Err(SourceError::Unavailable {
                    status: Some(200),
                    message: format!("GraphQL answered no data: {}", said.join("; ")),
                });
            }
            _ => return Err(Self::invalid_json(&a, what)),
        };
        Ok(Some(
            keys.iter()
                .enumerate()
                .map(|(n, (_, key))| {
                    let alias = format!("f{n}");
                    let errs: Vec<&Value> = errors
                        .iter()
                        .filter(|e| alias_of(e) == Some(alias.as_str()))
                        .collect();
                    field(key, data.get(&alias), &errs)
                })
                .collect(),
        ))
    }
}

/// The request: `query(...) { f0: repository(owner: $o0, name: $n0) { object(expression: $e0)
/// { ...F } } ... }`, every owner, name and expression a variable (never in the query text).
fn request_body<'a>(keys: impl Iterator<Item = &'a GitHubKey>) -> Value {
    let mut params = String::new();
    let mut fields = String::new();
    let mut vars = Map::new();
    for (i, k) in keys.enumerate() {
        let _ = write!(params, "$o{i}: String!, $n{i}: String!, $e{i}: String!, ");
        let _ = write!(
            fields,
            "f{i}: repository(owner: $o{i}, name: $n{i}) {{ object(expression: $e{i}) {{ ...F }} }} "
        );
        vars.insert(format!("o{i}"), Value::String(k.owner.clone()));
        vars.insert(format!("n{i}"), Value::String(k.repo.clone()));
        vars.insert(format!("e{i}"), Value::String(expression(k)));
    }
    let query = format!(
        "query({}) {{ {}}} {FRAGMENT}",
        params.trim_end_matches([',', ' ']),
        fields
    );
    json!({ "query": query, "variables": vars })
}

/// `REF:PATH`; `HEAD:PATH` for the default branch.
fn expression(k: &GitHubKey) -> String {
    format!("{}:{}", k.reference.as_deref().unwrap_or("HEAD"), k.path)
}

fn error_type(e: &Value) -> Option<&str> {
    e.get("type").and_then(Value::as_str)
}

fn error_message(e: &Value) -> Option<&str> {
    e.get("message").and_then(Value::as_str)
}

/// The alias an error's `path` starts with.
fn alias_of(e: &Value) -> Option<&str> {
    e.get("path")?.as_array()?.first()?.as_str()
}

/// One key's field (`repository`, or null) and the errors naming it.
fn field(key: &GitHubKey, repo: Option<&Value>, errors: &[&Value]) -> Field {
    let not_found = errors.iter().any(|e| error_type(e) == Some("NOT_FOUND"));
    if errors.iter().any(|e| error_type(e) != Some("NOT_FOUND")) {
        return Field::Rest("an error on the field");
    }
    let repo = match repo {
        Some(Value::Object(r)) => r,
        Some(Value::Null) | None if not_found => return Field::Answer(Ok(Fetched::NotFound)),
        Some(Value::Null) | None => return Field::Rest("no repository and no NOT_FOUND error"),
        Some(_) => return Field::Rest("a repository field of an unexpected shape"),
    };
    let object = match repo.get("object") {
        Some(Value::Object(o)) => o,
        Some(Value::Null) => return Field::Answer(Ok(Fetched::NotFound)),
        _ => return Field::Rest("no object field"),
    };
    let refuse = |kind: &str| {
        Field::Answer(Err(SourceError::Rejected {
            status: Some(200),
            message: format!("{key} is a {kind}, not a file"),
        }))
    };
    match object.get("__typename").and_then(Value::as_str) {
        Some("Blob") => {}
        Some("Tree") => return refuse("directory"),
        Some("Commit") => return refuse("submodule"),
        _ => return Field::Rest("an object that is not a blob"),
    }
    let flag = |name: &str| object.get(name).and_then(Value::as_bool);
    if flag("isBinary") != Some(false) {
        return Field::Rest("a binary blob");
    }
    if flag("isTruncated") != Some(false) {
        return Field::Rest("a truncated blob");
    }
    let (Some(text), Some(oid)) = (
        object.get("text").and_then(Value::as_str),
        object.get("oid").and_then(Value::as_str),
    ) else {
        return Field::Rest("a blob without text or oid");
    };
    if !codec::git_blob_sha(text.as_bytes()).eq_ignore_ascii_case(oid) {
        return Field::Rest("text that does not hash to the blob's oid");
    }
    Field::Answer(Ok(Fetched::Value {
        value: Bytes::from(text.to_owned()),
        validator: None,
        ttl: None,
    }))
}

/// A REST read of a batch that met a rate limit: nothing more will be answered until the limit
/// passes, so the whole batch fails with it.
pub(super) fn rate_limit_stops_the_batch(
    answer: &Result<Fetched, SourceError>,
) -> Result<(), SourceError> {
    match answer {
        Err(e) if e.rate_limited_until().is_some() => Err(e.clone()),
        _ => Ok(()),
    }
}

/// The answers of a batch, one per key; a key nothing was read for is an invalid response.
pub(super) fn every_key_answered(
    answers: Vec<Option<Result<Fetched, SourceError>>>,
) -> Vec<Result<Fetched, SourceError>> {
    answers
        .into_iter()
        .map(|a| {
            a.unwrap_or_else(|| {
                Err(SourceError::InvalidResponse {
                    message: "no answer was read for this key".into(),
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> GitHubKey {
        GitHubKey::parse(s).unwrap()
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            graphql_url("https://api.github.com"),
            "https://api.github.com/graphql"
        );
        assert_eq!(
            graphql_url("https://ghe.example.com/api/v3"),
            "https://ghe.example.com/api/graphql"
        );
        assert_eq!(
            graphql_url("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/graphql"
        );
    }

    #[test]
    fn values_travel_as_variables_never_in_the_query() {
        let keys = [k("o/r/a\"b} c.txt@feature/x"), k("o/r2/d.txt")];
        let body = request_body(keys.iter());
        let q = body["query"].as_str().unwrap();
        assert!(!q.contains("a\\\"b") && !q.contains("feature"), "{q}");
        assert!(q.contains("f1: repository(owner: $o1, name: $n1)"), "{q}");
        assert!(q.starts_with("query($o0: String!, $n0: String!, $e0: String!, $o1"));
        assert_eq!(body["variables"]["e0"], "feature/x:a\"b} c.txt");
        assert_eq!(body["variables"]["e1"], "HEAD:d.txt");
        assert_eq!(body["variables"]["n1"], "r2");
    }

    #[test]
    fn fields() {
        let key = k("o/r/a.txt");
        let is_rest = |f: Field| matches!(f, Field::Rest(_));
        let blob = |text: &str, oid: &str| {
            json!({"object": {"__typename": "Blob", "oid": oid, "text": text,
                   "byteSize": text.len(), "isBinary": false, "isTruncated": false}})
        };
        let hi = "hello\n";
        let oid = codec::git_blob_sha(hi.as_bytes());
        match field(&key, Some(&blob(hi, &oid)), &[]) {
            Field::Answer(Ok(Fetched::Value {
                value, validator, ..
            })) => assert_eq!((&value[..], validator), (hi.as_bytes(), None)),
            _ => panic!("a text blob is a value"),
        }
        assert!(is_rest(field(&key, Some(&blob(hi, "0000")), &[])));
        let nf = json!({"type": "NOT_FOUND", "path": ["f0"], "message": "Could not resolve"});
        assert!(matches!(
            field(&key, Some(&Value::Null), &[&nf]),
            Field::Answer(Ok(Fetched::NotFound))
        ));
        assert!(is_rest(field(&key, Some(&Value::Null), &[])));
        let forbidden = json!({"type": "FORBIDDEN", "path": ["f0"], "message": "no"});
        assert!(is_rest(field(&key, Some(&Value::Null), &[&forbidden])));
        assert!(matches!(
            field(&key, Some(&json!({"object": null})), &[]),
            Field::Answer(Ok(Fetched::NotFound))
        ));
        let tree = json!({"object": {"__typename": "Tree"}});
        match field(&key, Some(&tree), &[]) {
            Field::Answer(Err(e)) => assert!(e.to_string().contains("is a directory, not a file")),
            _ => panic!("a tree is refused"),
        }
        let binary = json!({"object": {"__typename": "Blob", "oid": oid, "text": null,
                            "isBinary": true, "isTruncated": false}});
        assert!(is_rest(field(&key, Some(&binary), &[])));
        assert!(is_rest(field(&key, Some(&json!([1])), &[])));
    }
}
