//! Warm and refresh: loading every key under a prefix (listed by the source), and revalidating
//! every key the cache holds under a prefix.
//!
//! Cold keys travel in batches of [`Source::max_batch`] through [`Source::fetch_many`]. Keys held
//! with a validator are revalidated through [`Source::revalidate_many`] in batches of
//! `REVALIDATE_BATCH` (1000) when the source says that is cheaper
//! ([`Source::revalidates_in_bulk`]: for GitHub, one conditional request per repository and ref),
//! else one conditional call each, concurrently. Every answer goes through the load's fill (the
//! key's fence and the L2 row the read saw), so a write acknowledged meanwhile is never
//! overwritten (I1).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::flight::Flight;
use super::load::{fetch_batches, in_batches, Answer, BatchItem, Via};
use super::*;
use crate::error::BundleFault;
use crate::stats::{RequestEvent, RequestKind};
use crate::tier::{EntrySink, EntryStore, Observed};

/// Keys per [`Source::revalidate_many`] call.
pub(super) const REVALIDATE_BATCH: usize = 1000;

/// Where a key's load takes its answer from, when batches are sent.
struct Batches<'a> {
    /// Cold keys, for [`Source::fetch_many`].
    cold: Option<&'a mut Vec<(String, oneshot::Sender<Answer>)>>,
    /// Keys held with a validator, for [`Source::revalidate_many`].
    held: Option<&'a mut Vec<BatchItem>>,
}

impl TieredCache {
    /// Fetches every key the source lists under `prefix` into the cache (conditional requests
    /// for what is already held; the others in batches when the source batches, as in
    /// [`mget`](Self::mget)), with bounded concurrency, calling `progress` after each key.
    /// This is what makes a folder of components available offline. Keys already fresh are
    /// left alone; [`refresh`](Self::refresh) revalidates them too.
    ///
    /// # Errors
    /// [`Error::Source`] / [`Error::Unavailable`] when the listing fails. Per-key failures are in
    /// the summary.
    pub async fn warm(
        &self,
        prefix: &str,
        progress: impl Fn(WarmProgress) + Send + Sync,
    ) -> Result<WarmSummary> {
        self.may_warm(prefix)?;
        let inner = &*self.inner;
        let offline = inner.offline.clone();
        let keys = guarded(
            &inner.guard,
            inner.settings.timeout,
            || !offline.load(Ordering::SeqCst),
            inner.source.list(prefix),
        )
        .await
        .map_err(|e| source_failure(prefix, e))?;
        self.warm_keys(keys, false, progress).await
    }

    /// Revalidates every entry L2 holds whose key starts with `prefix` (a string prefix:
    /// `octo/app/config/` covers every ref; `DIR@REF`, as `warm` takes it, covers the keys under
    /// `DIR` that end in `@REF`), fresh or not, **without listing the source again**:
    /// the keys come from L2 (its [`snapshot`](crate::tier::EntryStore::snapshot); a store that
    /// cannot list its keys falls back to the source's listing). Entries held with a validator
    /// are revalidated, fresh or not (in bulk when [`Source::revalidates_in_bulk`]: for a GitHub source with
    /// [`revalidate_by_commit`](crate::source::github::GitHubSourceBuilder::revalidate_by_commit),
    /// one free conditional request per repository and ref when nothing changed); the others
    /// are fetched again once expired (a fresh value without a validator may be a local
    /// write, which is left alone). Keys with an undelivered write, and entries past their stale window,
    /// are left alone. This is `tiercache warm --refresh PREFIX`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use tiercache::{Strategy, TieredCache};
    ///
    /// let cache = TieredCache::builder().strategy(Strategy::CacheAside).build()?;
    /// let summary = cache.refresh("octo/app/", |_| {}).await?;
    /// assert_eq!(summary.listed, 0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`warm`](Self::warm); [`Error::Storage`] when L2 cannot be read.
    pub async fn refresh(
        &self,
        prefix: &str,
        progress: impl Fn(WarmProgress) + Send + Sync,
    ) -> Result<WarmSummary> {
        self.may_warm(prefix)?;
        let keys = Arc::new(Mutex::new(Vec::new()));
        let sink: EntrySink = {
            let keys = keys.clone();
            Box::new(move |key, _| {
                keys.lock().unwrap_or_else(|p| p.into_inner()).push(key);
                Ok(())
            })
        };
        // `DIR@REF` (a GitHub-style prefix with a ref): the keys under `DIR` ending in `@REF`.
        let (dir, at_ref) = match prefix.rsplit_once('@') {
            Some((dir, r)) => (dir.trim_end_matches('/'), Some(format!("@{r}"))),
            _ => (prefix, None),
        };
        let keys = match self.inner.l2_guard.snapshot(dir, sink).await {
            Ok(()) => {
                let mut keys = std::mem::take(&mut *keys.lock().unwrap_or_else(|p| p.into_inner()));
                if let Some(at_ref) = &at_ref {
                    keys.retain(|k| k.ends_with(at_ref.as_str()));
                }
                keys
            }
            Err(Error::Bundle {
                fault: BundleFault::Unsupported,
                ..
            }) => {
                let inner = &*self.inner;
                let offline = inner.offline.clone();
                guarded(
                    &inner.guard,
                    inner.settings.timeout,
                    || !offline.load(Ordering::SeqCst),
                    inner.source.list(prefix),
                )
                .await
                .map_err(|e| source_failure(prefix, e))?
            }
            Err(e) => return Err(e),
        };
        self.warm_keys(keys, true, progress).await
    }

    /// Whether warm (background work) may start: open, online, budget above the reserve.
    fn may_warm(&self, prefix: &str) -> Result<()> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        if self.is_offline() {
            return Err(Self::offline_error(prefix));
        }
        let inner = &*self.inner;
        // Warm is background work: below the budget reserve, not even the listing is sent.
        if let Some(budget) = inner.source.rate_limit() {
            if !inner
                .background
                .admits(RequestKind::Warm, Some(budget), self.now())
            {
                inner
                    .stats
                    .request(RequestKind::Warm, RequestEvent::SkippedBudget);
                return Err(Error::Unavailable {
                    key: prefix.to_owned(),
                    reason: StaleReason::RateLimited,
                    source: SourceError::RateLimited {
                        until: budget.reset,
                        status: None,
                        message: format!(
                            "{} requests left, at or below the budget reserve: warm is background work and waits for the reset",
                            budget.remaining
                        ),
                    },
                });
            }
        }
        Ok(())
    }

    /// Loads `keys` (with `force`, revalidating fresh ones too).
    async fn warm_keys(
        &self,
        keys: Vec<String>,
        force: bool,
        progress: impl Fn(WarmProgress) + Send + Sync,
    ) -> Result<WarmSummary> {
        let inner = &*self.inner;
        let total = keys.len();
        let mut summary = WarmSummary {
            listed: total,
            ..WarmSummary::default()
        };
        let done = std::sync::atomic::AtomicUsize::new(0);
        let tick = || {
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(WarmProgress { done: n, total });
        };
        // A source that batches gets the cold keys (nothing held to revalidate) in batches, and
        // one that revalidates in bulk the held ones; the others go one conditional request
        // each, below.
        let batches = inner.source.max_batch() > 1;
        let bulk = inner.source.revalidates_in_bulk();
        let (mut results, keys) = if batches || bulk {
            let mut cold = Vec::new();
            let mut held = Vec::new();
            let mut turns = Vec::new();
            let mut later = Vec::new();
            for k in keys {
                let to = Batches {
                    cold: batches.then_some(&mut cold),
                    held: bulk.then_some(&mut held),
                };
                match self.warm_turn(&k, force, to).await {
                    Ok(WarmTurn::Later) => later.push(k),
                    turn => turns.push((k, turn)),
                }
            }
            let waited = futures_util::future::join_all(turns.into_iter().map(|(k, turn)| {
                let tick = &tick;
                async move {
                    let r = match turn {
                        Ok(turn) => turn.wait().await,
                        Err(e) => Err(e),
                    };
                    tick();
                    (k, r)
                }
            }));
            let (_, _, results) = tokio::join!(
                fetch_batches(inner, cold, RequestKind::Warm),
                revalidate_batches(inner, held, RequestKind::Warm),
                waited
            );
            (results, later)
        } else {
            (Vec::new(), keys)
        };
        let one_by_one: Vec<(String, Result<Loaded>)> = stream::iter(keys)
            .map(|k| {
                let tick = &tick;
                async move {
                    let none = Batches {
                        cold: None,
                        held: None,
                    };
                    let r = match self.warm_turn(&k, force, none).await {
                        Ok(turn) => turn.wait().await,
                        Err(e) => Err(e),
                    };
                    tick();
                    (k, r)
                }
            })
            .buffer_unordered(self.inner.settings.fetch_concurrency)
            .collect()
            .await;
        results.extend(one_by_one);
        for (k, r) in results {
            match r {
                Ok(Loaded::Fetched) => summary.fetched += 1,
                Ok(Loaded::NotModified) => summary.not_modified += 1,
                Ok(Loaded::AlreadyCached) => summary.cached += 1,
                Ok(Loaded::SkippedBudget) => summary.skipped_budget += 1,
                Err(e) => summary.failed.push((k, crate::error::chain_text(&e))),
            }
        }
        summary.failed.sort();
        Ok(summary)
    }

    /// One key of [`warm`](Self::warm) up to its load. A cold key's load gets its answer from
    /// `to.cold` when given, a key held with a validator from `to.held` when given (the caller
    /// sends both); a key that would go to a batch not given is left for [`WarmTurn::Later`]
    /// when the other one is. With `force`, a fresh entry is revalidated too.
    async fn warm_turn(&self, key: &str, force: bool, to: Batches<'_>) -> Result<WarmTurn> {
        self.check(key)?;
        let inner = &*self.inner;
        let now = self.now();
        let token = inner.fences.token(key);
        let (held, observed) = match inner.l2.get(key).await {
            Ok(e) => {
                let observed = Observed::of(&e);
                (e.filter(|e| e.is_servable(now)).map(Arc::new), observed)
            }
            Err(_) => (inner.l1.get(key, now).await, Observed::Unknown),
        };
        // Forced, a fresh entry is revalidated only when it came from the source with a
        // validator: a fresh value without one may be a local write (`set`), which the
        // source's older value must not replace before its TTL (I1).
        if held
            .as_ref()
            .is_some_and(|e| e.is_fresh(now, None) && (!force || e.revalidator().is_none()))
        {
            return Ok(WarmTurn::Done(Loaded::AlreadyCached));
        }
        // An undelivered write of the key is newer than anything the source could say.
        if let Some(outbox) = &inner.outbox {
            if outbox.queue().newest(key).await?.is_some() {
                return Ok(WarmTurn::Done(Loaded::AlreadyCached));
            }
        }
        // Checked per key: the budget may run down to the reserve during the warm.
        let kind = RequestKind::Warm;
        if !inner
            .background
            .admits(kind, inner.source.rate_limit(), now)
        {
            inner.stats.request(kind, RequestEvent::SkippedBudget);
            return Ok(WarmTurn::Done(Loaded::SkippedBudget));
        }
        let validator = held
            .as_ref()
            .and_then(|e| e.revalidator())
            .map(str::to_owned);
        let batching = to.cold.is_some() || to.held.is_some();
        let via = match (validator, to.cold, to.held) {
            (None, Some(cold), _) => {
                let (tx, rx) = oneshot::channel();
                cold.push((key.to_owned(), tx));
                Via::Batch(rx)
            }
            (Some(v), _, Some(held)) => {
                let (tx, rx) = oneshot::channel();
                held.push((key.to_owned(), Some(v), tx));
                Via::Batch(rx)
            }
            _ if batching => return Ok(WarmTurn::Later),
            _ => Via::Fetch,
        };
        let seen = super::read::Seen {
            token,
            observed,
            outbox_checked: true,
            kind,
        };
        // Forced: an entry stored before now is not fresh enough to skip the source.
        let max_age = force.then_some(0);
        let flight = inner.flights.join(key, token, |early| {
            load(
                self.inner.clone(),
                key.to_owned(),
                held,
                max_age,
                seen,
                early,
                via,
            )
        });
        if !flight.leader {
            inner.stats.request(kind, RequestEvent::Deduplicated);
        }
        Ok(WarmTurn::Waiting(flight))
    }
}

/// Revalidates keys held with a validator in batches of `REVALIDATE_BATCH` (1000), each batch one
/// [`Source::revalidate_many`] call under one breaker permit, and hands each key's answer to its
/// load ([`Via::Batch`]).
pub(super) async fn revalidate_batches(inner: &Inner, items: Vec<BatchItem>, kind: RequestKind) {
    in_batches(inner, items, REVALIDATE_BATCH, kind).await;
}

/// One key of [`TieredCache::warm`] at its load.
enum WarmTurn {
    /// Nothing to load.
    Done(Loaded),
    /// Its load, joined.
    Waiting(Flight<(Arc<Entry>, Loaded)>),
    /// Left for the one-by-one pass, after the batches.
    Later,
}

impl WarmTurn {
    async fn wait(self) -> Result<Loaded> {
        match self {
            Self::Done(how) => Ok(how),
            Self::Waiting(flight) => flight.wait().await.map(|(_, how)| how),
            Self::Later => Ok(Loaded::AlreadyCached),
        }
    }
}
