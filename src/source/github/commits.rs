//! Revalidation pinned to a commit: one conditional "Get a commit" request decides for every
//! cached file of a repository and ref, and "Compare two commits" names what changed.
//!
//! # The validator
//! A value read at a known commit carries the validator `<etag> @commit=<40 hex>` (or
//! `@commit=<40 hex>` alone when there is no ETag, as for a value read through GraphQL). Only
//! this source reads it; a validator without the suffix is a plain ETag, as before. The ETag
//! part alone is ever sent as `If-None-Match`.
//!
//! To know exactly which commit a file was read at, a batch resolves the ref first (one
//! `GET /repos/{owner}/{repo}/commits/{ref}` with `Accept: application/vnd.github.sha`, which
//! answers the bare 40-hex sha), then reads the files **at that sha** (`ref=<sha>` in REST,
//! `"<sha>:path"` in GraphQL), never "the branch now": a branch may move between two requests.
//!
//! # One request for a whole (repository, ref)
//! [`revalidate_many`](crate::source::Source::revalidate_many) groups the entries by
//! (owner, repository, ref) and sends, per group, one "Get a commit" request with
//! `If-None-Match: "<sha>"` of the commit most entries were read at:
//! * **304** (GitHub's answer when the sha is unchanged; it does not count against the rate
//!   limit when authenticated): every entry read at that sha is [`Fetched::NotModified`];
//! * **200** with a new sha: `GET /repos/{owner}/{repo}/compare/{base}...{head}?per_page=1`
//!   (the changed files are listed on the first page only, up to 300 of them) names the changed
//!   files (`filename`, and `previous_filename` of a rename); the cached entries among them are
//!   read again at the new sha in one batch ([`Source::fetch_many`]'s path: one GraphQL request
//!   with a token), the others are "not modified". A removed file reads as "not found".
//! * Past compare's limits (300 files or more), a comparison that is not a plain fast-forward
//!   (`status` other than `ahead` or `identical`: the three-dot diff starts at the merge base,
//!   so a force-push could hide a change), or a compare that fails: each entry of that group is
//!   revalidated on its own, one conditional request at the new sha (correct, only dearer).
//! * A ref that no longer resolves (404/422): each entry is read again on its own.
//!
//! Entries whose validator has no commit get today's per-file conditional request. Keys pinned
//! to a full sha are never sent (what a commit holds never changes).
//!
//! # Entries renewed after a move
//! The cache renews an entry answered "not modified" without rewriting its validator, so an
//! entry keeps the commit it was *read* at. This source remembers (in memory, bounded) each move
//! it verified: `(repository, ref, base)` → `(head, changed paths)`; an entry read at `base`
//! whose path is not among the changed ones is known to be current at `head`, so the next
//! conditional request is sent with `head` and answered 304. After a restart that memory is
//! gone: the first revalidation of such entries costs one "Get a commit" (200) and one compare
//! again, and still re-reads only the changed files.
//!
//! # Single reads
//! [`fetch`](crate::source::Source::fetch) of one key keeps the per-file conditional request
//! when the validator holds an ETag: one request, a free 304, where the commit route could cost
//! three. A validator with a commit and no ETag (a value read through GraphQL) goes the commit
//! route for that one key: a free 304 when the ref has not moved. (A per-file read answered 200
//! was read at "the branch now", so its new validator is a plain ETag: that entry takes the
//! per-file route in bulk too until a batch reads it again at a known commit.)

use std::collections::{BTreeMap, HashMap, HashSet};

use http::header::{HeaderValue, IF_NONE_MATCH};
use http::{Method, StatusCode};
use serde_json::Value;

use super::key::{encode, repo_path, GitHubKey};
use super::transport::JSON;
use super::{pin, GitHubSource, LOG_TARGET};
use crate::clock::Clock;
use crate::key::KeyError;
use crate::source::{Fetched, SourceError};

/// `Accept` of "Get a commit" answering the bare commit sha.
pub(super) const SHA: &str = "application/vnd.github.sha";
/// What separates a validator's ETag from the commit it was read at.
pub(super) const COMMIT_MARK: &str = "@commit=";
/// Compare lists at most this many files; at this many the list may be cut short.
pub(super) const COMPARE_FILE_LIMIT: usize = 300;
/// Moves remembered before the memory is cleared.
const MAX_MOVES: usize = 4096;
/// Moves followed from the commit an entry was read at.
const MAX_HOPS: usize = 64;
/// A ref resolved this recently (by the source's clock) is not resolved again by the batches
/// of one `fetch_many` round (a warm of 200 keys is two GraphQL requests, one resolution).
const RESOLVED_REUSE_MS: u64 = 1000;

/// Owner, repository and ref (`None`: the default branch).
pub(super) type Group = (String, String, Option<String>);

/// What this source learnt of refs: the last commit seen, and the moves it verified.
#[derive(Debug, Default)]
pub(super) struct Moves {
    /// The last commit seen of each ref, and when (ms by the source's clock).
    last: HashMap<Group, (String, u64)>,
    moved: HashMap<(Group, String), (String, HashSet<String>)>,
}

impl Moves {
    /// The newest commit `path`, read at `commit`, is known to be current at.
    fn effective(&self, g: &Group, path: &str, commit: &str) -> String {
        let mut c = commit.to_owned();
        for _ in 0..MAX_HOPS {
            match self.moved.get(&(g.clone(), c.clone())) {
                Some((head, changed)) if !changed.contains(path) && *head != c => c = head.clone(),
                _ => break,
            }
        }
        c
    }

    fn record(&mut self, g: &Group, base: &str, head: &str, changed: HashSet<String>) {
        if self.moved.len() >= MAX_MOVES {
            self.moved.clear();
        }
        self.moved
            .insert((g.clone(), base.to_owned()), (head.to_owned(), changed));
    }
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A validator's ETag and commit: `("\"abc\"", Some(sha))` of `"abc" @commit=<sha>`.
pub(super) fn split_validator(v: &str) -> (Option<&str>, Option<&str>) {
    if let Some(i) = v.rfind(COMMIT_MARK) {
        let sha = &v[i + COMMIT_MARK.len()..];
        if is_sha(sha) {
            let etag = v[..i].trim_end();
            return ((!etag.is_empty()).then_some(etag), Some(sha));
        }
    }
    ((!v.is_empty()).then_some(v), None)
}

/// The validator of a value read at `sha`.
pub(super) fn with_commit(etag: Option<&str>, sha: &str) -> String {
    match etag {
        Some(e) => format!("{e} {COMMIT_MARK}{sha}"),
        None => format!("{COMMIT_MARK}{sha}"),
    }
}

/// `fetched` as read at `sha`: a value's validator records it.
fn at_commit(fetched: Fetched, sha: &str) -> Fetched {
    match fetched {
        Fetched::Value {
            value,
            validator,
            ttl,
        } => Fetched::Value {
            value,
            validator: Some(with_commit(validator.as_deref(), sha)),
            ttl,
        },
        other => other,
    }
}

fn group_of(k: &GitHubKey) -> Group {
    (k.owner.clone(), k.repo.clone(), k.reference.clone())
}

fn key_at(k: &GitHubKey, sha: &str) -> GitHubKey {
    GitHubKey {
        reference: Some(sha.to_owned()),
        ..k.clone()
    }
}

/// What "Get a commit" said of a ref.
enum Head {
    /// The sha sent is still the ref's commit (304).
    Unchanged,
    /// The ref's commit.
    At(String),
}

/// An entry to revalidate through its group's commit.
struct Item {
    index: usize,
    key: GitHubKey,
    etag: Option<String>,
    commit: String,
}

/// An entry revalidated on its own: conditional on its ETag, at a commit when known.
type PerFile = (usize, GitHubKey, Option<String>, Option<String>);

type Answers = Vec<Option<Result<Fetched, SourceError>>>;

impl GitHubSource {
    fn moves(&self) -> std::sync::MutexGuard<'_, Moves> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One "Get a commit" request for the group's ref, conditional on `known`. `None`: the ref
    /// does not resolve.
    async fn head(&self, g: &Group, known: Option<&str>) -> Result<Option<Head>, SourceError> {
        let pq = format!(
            "{}/commits/{}",
            repo_path(&g.0, &g.1),
            encode(g.2.as_deref().unwrap_or("HEAD"))
        );
        let extra = known
            .and_then(|k| HeaderValue::from_str(&format!("\"{k}\"")).ok())
            .map(|v| (IF_NONE_MATCH, v));
        let conditional = extra.is_some();
        let a = self.send(Method::GET, &pq, SHA, extra, None).await?;
        match a.status {
            StatusCode::OK => {
                let body = std::str::from_utf8(&a.body).unwrap_or("").trim();
                if is_sha(body) {
                    let sha = body.to_ascii_lowercase();
                    let now = self.clock.now_millis();
                    self.moves().last.insert(g.clone(), (sha.clone(), now));
                    Ok(Some(Head::At(sha)))
                } else {
                    Err(SourceError::InvalidResponse {
                        message: format!(
                            "GitHub answered a commit request for {SHA} with {} bytes that are not a sha",
                            a.body.len()
                        ),
                    })
                }
            }
            StatusCode::NOT_MODIFIED if conditional => Ok(Some(Head::Unchanged)),
            StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY => Ok(None),
            _ => Err(self.error_for(&a)),
        }
    }

    /// The ref's commit for a listing: "Get a commit", conditional on the commit last seen (a
    /// 304 is free), remembered so that the batches reading the listed files within the next
    /// second read them at it. `None`: the ref does not resolve.
    pub(super) async fn resolve_for_listing(
        &self,
        g: &Group,
    ) -> Result<Option<String>, SourceError> {
        let known = self.moves().last.get(g).map(|(sha, _)| sha.clone());
        match self.head(g, known.as_deref()).await? {
            Some(Head::At(sha)) => Ok(Some(sha)),
            Some(Head::Unchanged) => {
                let now = self.clock.now_millis();
                if let Some(sha) = &known {
                    self.moves().last.insert(g.clone(), (sha.clone(), now));
                }
                Ok(known)
            }
            None => Ok(None),
        }
    }

    /// The paths that differ between `base` and `head` (both names of a rename), or `None`
    /// when compare cannot say for sure (too many files, not a fast-forward, base unknown).
    async fn changed_paths(
        &self,
        g: &Group,
        base: &str,
        head: &str,
    ) -> Result<Option<HashSet<String>>, SourceError> {
        let pq = format!(
            "{}/compare/{base}...{head}?per_page=1",
            repo_path(&g.0, &g.1)
        );
        let a = self.send(Method::GET, &pq, JSON, None, None).await?;
        match a.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY => return Ok(None),
            _ => return Err(self.error_for(&a)),
        }
        let what = "a compare request";
        let v = a.json().ok_or_else(|| Self::invalid_json(&a, what))?;
        match v.get("status").and_then(Value::as_str) {
            Some("ahead" | "identical") => {}
            _ => return Ok(None),
        }
        let files = match v.get("files") {
            Some(Value::Array(files)) => files.as_slice(),
            None | Some(Value::Null) => &[],
            Some(_) => return Err(Self::invalid_json(&a, what)),
        };
        if files.len() >= COMPARE_FILE_LIMIT {
            return Ok(None);
        }
        let mut changed = HashSet::new();
        for f in files {
            let name = f
                .get("filename")
                .and_then(Value::as_str)
                .ok_or_else(|| Self::invalid_json(&a, what))?;
            changed.insert(name.to_owned());
            if let Some(prev) = f.get("previous_filename").and_then(Value::as_str) {
                changed.insert(prev.to_owned());
            }
        }
        Ok(Some(changed))
    }

    /// `fetch` of one key: per-file conditional on the ETag when there is one; the commit
    /// route when the validator holds a commit and no ETag.
    pub(super) async fn fetch_validated(
        &self,
        key: &GitHubKey,
        validator: Option<&str>,
    ) -> Result<Fetched, SourceError> {
        let Some(v) = validator else {
            return self.fetch_inner(key, None).await;
        };
        match split_validator(v) {
            (None, Some(_)) if !key.pinned_to_commit() => {
                let shown = key.to_string();
                let mut answers = self.revalidate_inner(&[(shown.as_str(), v)]).await?;
                answers.pop().unwrap_or_else(|| {
                    Err(SourceError::InvalidResponse {
                        message: "no answer was read for this key".into(),
                    })
                })
            }
            (etag, _) => self.fetch_inner(key, etag).await,
        }
    }

    /// `fetch_many` with [`revalidate_by_commit`](super::GitHubSourceBuilder::revalidate_by_commit):
    /// each (repository, ref) resolved once, its keys read at that commit.
    pub(super) async fn fetch_at_commits(
        &self,
        keys: Vec<Result<GitHubKey, KeyError>>,
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        let mut heads: HashMap<Group, Option<String>> = HashMap::new();
        let mut at: Vec<Option<String>> = vec![None; keys.len()];
        let mut rewritten = Vec::with_capacity(keys.len());
        for (i, k) in keys.into_iter().enumerate() {
            let k = match k {
                Ok(k) if !k.pinned_to_commit() => k,
                other => {
                    rewritten.push(other);
                    continue;
                }
            };
            let g = group_of(&k);
            if !heads.contains_key(&g) {
                // One resolution at a time: concurrent batches of one round share it.
                let _turn = self.resolving.lock().await;
                let now = self.clock.now_millis();
                let known = self.moves().last.get(&g).cloned();
                let head = match &known {
                    Some((sha, at)) if now.saturating_sub(*at) < RESOLVED_REUSE_MS => {
                        Ok(Some(Head::At(sha.clone())))
                    }
                    _ => self.head(&g, known.as_ref().map(|(k, _)| k.as_str())).await,
                };
                let known = known.map(|(k, _)| k);
                let head = match head {
                    Ok(Some(Head::Unchanged)) => {
                        if let Some(k) = &known {
                            self.moves().last.insert(g.clone(), (k.clone(), now));
                        }
                        known
                    }
                    Ok(Some(Head::At(sha))) => Some(sha),
                    Ok(None) => None,
                    Err(e) if e.rate_limited_until().is_some() || e.counts_as_failure() => {
                        return Err(e)
                    }
                    Err(e) => {
                        tracing::debug!(target: LOG_TARGET, error = %e, "cannot resolve the ref; reading at the ref");
                        None
                    }
                };
                heads.insert(g.clone(), head);
            }
            match heads.get(&g).cloned().flatten() {
                Some(sha) => {
                    rewritten.push(Ok(key_at(&k, &sha)));
                    at[i] = Some(sha);
                }
                None => rewritten.push(Ok(k)),
            }
        }
        let answers = self.fetch_parsed(rewritten).await?;
        Ok(answers
            .into_iter()
            .zip(at)
            .map(|(a, sha)| match sha {
                Some(sha) => a.map(|f| at_commit(f, &sha)),
                None => a,
            })
            .collect())
    }

    /// [`Source::revalidate_many`](crate::source::Source::revalidate_many); see the module
    /// documentation.
    pub(super) async fn revalidate_inner(
        &self,
        items: &[(&str, &str)],
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        let mut answers: Answers = vec![None; items.len()];
        let mut groups: BTreeMap<Group, Vec<Item>> = BTreeMap::new();
        let mut per_file: Vec<PerFile> = Vec::new();
        for (index, (k, v)) in items.iter().enumerate() {
            let key = match GitHubKey::parse(k) {
                Ok(key) => key,
                Err(e) => {
                    answers[index] = Some(Err(SourceError::InvalidKey(e)));
                    continue;
                }
            };
            if key.pinned_to_commit() {
                answers[index] = Some(Ok(pin(&key, Fetched::NotModified { ttl: None })));
                continue;
            }
            match split_validator(v) {
                (etag, Some(commit)) => groups.entry(group_of(&key)).or_default().push(Item {
                    index,
                    etag: etag.map(str::to_owned),
                    commit: commit.to_ascii_lowercase(),
                    key,
                }),
                (etag, None) => per_file.push((index, key, etag.map(str::to_owned), None)),
            }
        }
        for (g, group) in groups {
            self.revalidate_group(&g, group, &mut answers, &mut per_file)
                .await?;
        }
        // One at a time: GitHub asks for serial requests (secondary rate limits).
        for (index, key, etag, sha) in per_file {
            let answer = match &sha {
                Some(sha) => self
                    .fetch_inner(&key_at(&key, sha), etag.as_deref())
                    .await
                    .map(|f| at_commit(f, sha)),
                None => self.fetch_inner(&key, etag.as_deref()).await,
            };
            super::graphql::rate_limit_stops_the_batch(&answer)?;
            answers[index] = Some(answer);
        }
        Ok(super::graphql::every_key_answered(answers))
    }

    async fn revalidate_group(
        &self,
        g: &Group,
        items: Vec<Item>,
        answers: &mut Answers,
        per_file: &mut Vec<PerFile>,
    ) -> Result<(), SourceError> {
        // Each entry's commit, moved forward over the moves verified since it was read.
        let effective: Vec<String> = {
            let moves = self.moves();
            items
                .iter()
                .map(|it| moves.effective(g, &it.key.path, &it.commit))
                .collect()
        };
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &effective {
            *counts.entry(c.as_str()).or_default() += 1;
        }
        let known = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(c, _)| (*c).to_owned())
            .unwrap_or_default();
        let head = match self.head(g, Some(&known)).await {
            Ok(Some(Head::Unchanged)) => known,
            Ok(Some(Head::At(sha))) => sha,
            Ok(None) => {
                per_file.extend(
                    items
                        .into_iter()
                        .map(|it| (it.index, it.key, it.etag, None)),
                );
                return Ok(());
            }
            Err(e) if e.rate_limited_until().is_some() || e.counts_as_failure() => return Err(e),
            Err(e) => {
                for it in items {
                    answers[it.index] = Some(Err(e.clone()));
                }
                return Ok(());
            }
        };
        let mut by_base: BTreeMap<String, Vec<Item>> = BTreeMap::new();
        for (it, eff) in items.into_iter().zip(effective) {
            if eff == head {
                answers[it.index] = Some(Ok(Fetched::NotModified { ttl: None }));
            } else {
                by_base.entry(eff).or_default().push(it);
            }
        }
        let mut to_read: Vec<Item> = Vec::new();
        for (base, items) in by_base {
            let changed = match self.changed_paths(g, &base, &head).await {
                Ok(changed) => changed,
                Err(e) if e.rate_limited_until().is_some() => return Err(e),
                Err(e) => {
                    tracing::debug!(target: LOG_TARGET, error = %e, "compare failed; revalidating file by file");
                    None
                }
            };
            match changed {
                Some(changed) => {
                    for it in items {
                        if changed.contains(&it.key.path) {
                            to_read.push(it);
                        } else {
                            answers[it.index] = Some(Ok(Fetched::NotModified { ttl: None }));
                        }
                    }
                    self.moves().record(g, &base, &head, changed);
                }
                None => per_file.extend(
                    items
                        .into_iter()
                        .map(|it| (it.index, it.key, it.etag, Some(head.clone()))),
                ),
            }
        }
        if to_read.is_empty() {
            return Ok(());
        }
        let keys = to_read
            .iter()
            .map(|it| Ok(key_at(&it.key, &head)))
            .collect();
        let read = self.fetch_parsed(keys).await?;
        for (it, answer) in to_read.into_iter().zip(read) {
            answers[it.index] = Some(answer.map(|f| at_commit(f, &head)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef01234567";
    const B: &str = "89abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn validators() {
        assert_eq!(split_validator("\"e1\""), (Some("\"e1\""), None));
        let v = with_commit(Some("\"e1\""), A);
        assert_eq!(v, format!("\"e1\" @commit={A}"));
        assert_eq!(split_validator(&v), (Some("\"e1\""), Some(A)));
        let v = with_commit(None, A);
        assert_eq!(split_validator(&v), (None, Some(A)));
        assert_eq!(
            split_validator("W/\"x\" @commit=12"),
            (Some("W/\"x\" @commit=12"), None)
        );
    }

    #[test]
    fn moves_are_followed_for_unchanged_paths_only() {
        let g: Group = ("o".into(), "r".into(), None);
        let mut m = Moves::default();
        m.record(&g, A, B, HashSet::from(["a.txt".to_owned()]));
        assert_eq!(m.effective(&g, "b.txt", A), B);
        assert_eq!(m.effective(&g, "a.txt", A), A);
        m.record(&g, B, A, HashSet::new());
        // A cycle stops after the hop limit, never loops.
        let _ = m.effective(&g, "b.txt", A);
    }
}
