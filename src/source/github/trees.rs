//! Listing a directory with the git trees API (recursive), at the prefix's ref or the
//! repository's default branch.

use http::{Method, StatusCode};
use serde_json::Value;

use super::key::{encode, repo_path, GitHubKey, GitHubPrefix};
use super::transport::JSON;
use super::{GitHubSource, LOG_TARGET};
use crate::source::SourceError;

impl GitHubSource {
    async fn default_branch(&self, p: &GitHubPrefix) -> Result<String, SourceError> {
        let a = self
            .send(Method::GET, &repo_path(&p.owner, &p.repo), JSON, None, None)
            .await?;
        if a.status != StatusCode::OK {
            return Err(self.error_for(&a));
        }
        a.json()
            .as_ref()
            .and_then(|v| v.get("default_branch"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Self::invalid_json(&a, "a repository look-up"))
    }

    pub(super) async fn list_inner(&self, p: &GitHubPrefix) -> Result<Vec<String>, SourceError> {
        // Revalidating by commit: the ref is resolved to its commit first ("Get a commit"; the
        // default branch as `HEAD`), the tree listed at that commit, and the batches that read
        // the listed files within the next second read them at it without resolving again.
        let resolved = if self.by_commit {
            let g = (p.owner.clone(), p.repo.clone(), p.reference.clone());
            self.resolve_for_listing(&g).await?
        } else {
            None
        };
        let reference = match (resolved, &p.reference) {
            (Some(sha), _) => sha,
            (None, Some(r)) => r.clone(),
            (None, None) => self.default_branch(p).await?,
        };
        // The ref is one path segment: its '/'s are encoded too ('feature%2Fx'), as clients of
        // this endpoint commonly send them; left bare, they would split the segment.
        let pq = format!(
            "{}/git/trees/{}?recursive=1",
            repo_path(&p.owner, &p.repo),
            encode(&reference)
        );
        let a = self.send(Method::GET, &pq, JSON, None, None).await?;
        if a.status != StatusCode::OK {
            return Err(self.error_for(&a));
        }
        let what = "a git trees request";
        let v = a.json().ok_or_else(|| Self::invalid_json(&a, what))?;
        let tree = v
            .get("tree")
            .and_then(Value::as_array)
            .ok_or_else(|| Self::invalid_json(&a, what))?;
        if v.get("truncated").and_then(Value::as_bool) == Some(true) {
            tracing::warn!(
                target: LOG_TARGET,
                owner = %p.owner,
                repo = %p.repo,
                reference = %reference,
                entries = tree.len(),
                "GitHub truncated the recursive tree; the listing is incomplete"
            );
        }
        Ok(tree
            .iter()
            .filter(|e| e.get("type").and_then(Value::as_str) == Some("blob"))
            .filter_map(|e| e.get("path").and_then(Value::as_str))
            .filter(|path| p.contains(path))
            // A path the key syntax cannot express (e.g. a '..' segment) is left out.
            .map(|path| p.key_for(path))
            .filter(|k| GitHubKey::parse(k).is_ok())
            .collect())
    }
}
