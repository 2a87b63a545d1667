//! The fill: one load from the source, run by single-flight, written into L2 and L1 behind the key's fence.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio::sync::oneshot;

use super::fleet;
use super::flight::{Early, Flight};
use super::read::Seen;
use super::*;
use crate::source::guard::{is_not_sent, not_sent};
use crate::source::RateLimit;
use crate::stats::{RequestEvent, RequestKind};
use crate::tier::{FillGuard, Observed};

/// Classifies a source error into the cache's error.
pub(super) fn source_failure(key: &str, e: SourceError) -> Error {
    let reason = match &e {
        SourceError::RateLimited { .. } => Some(StaleReason::RateLimited),
        SourceError::Timeout { .. } => Some(StaleReason::Timeout),
        SourceError::CircuitOpen { .. } => Some(StaleReason::CircuitOpen),
        e if e.counts_as_failure() => Some(StaleReason::SourceError),
        _ => None,
    };
    match reason {
        Some(reason) => Error::Unavailable {
            key: key.to_owned(),
            reason,
            source: e,
        },
        None => Error::Source {
            key: key.to_owned(),
            source: e,
        },
    }
}

/// Where a load's answer comes from.
pub(super) enum Via {
    /// Its own call to [`Source::fetch`].
    Fetch,
    /// A batch (one [`Source::fetch_many`] call for many cold keys) that the caller sends; a
    /// dropped sender reads as "not sent".
    Batch(oneshot::Receiver<Answer>),
}

/// The source's answer for one key, and how the call went.
pub(super) struct Answer {
    pub(super) fetched: std::result::Result<Fetched, SourceError>,
    /// Whether the call left at all (the breaker and the rate-limit gate may refuse it).
    pub(super) sent: bool,
    /// When the source answered (ms; 0: it did not, e.g. timed out).
    pub(super) answered_at: u64,
}

/// Joins (or starts) the load of `key` for background work (a refresh ahead, a warm) that
/// read L2 and checked the outbox under the fence `token`, `prev` the copy it holds.
pub(super) fn join_background(
    inner: &Arc<Inner>,
    key: &str,
    (token, observed, kind): (u64, Observed, RequestKind),
    prev: Option<Arc<Entry>>,
    via: Via,
) -> Flight<(Arc<Entry>, Loaded)> {
    let seen = Seen {
        token,
        observed,
        outbox_checked: true,
        kind,
    };
    inner.flights.join(key, token, |early| {
        load(inner.clone(), key.to_owned(), prev, None, seen, early, via)
    })
}

/// One load from the source, run as its own task by single-flight.
pub(super) async fn load(
    inner: Arc<Inner>,
    key: String,
    prev: Option<Arc<Entry>>,
    max_age: Option<u64>,
    seen: Seen,
    early: Early<(Arc<Entry>, Loaded)>,
    via: Via,
) -> LoadResult {
    let clock = inner.clock.clone();
    let now = clock.now_millis();
    let kind = match seen.kind {
        RequestKind::Read if prev.as_ref().is_some_and(|p| p.revalidator().is_some()) => {
            RequestKind::Revalidate
        }
        kind => kind,
    };
    // A load that finished just before this one started has already filled L1.
    if let Some(e) = inner.l1.get(&key, now).await {
        let same = prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, &e));
        if !same && e.is_fresh(now, max_age) {
            inner.stats.request(kind, RequestEvent::Deduplicated);
            return Ok((e, Loaded::AlreadyCached));
        }
    }
    // In a fleet sharing L2: one instance loads the key, the others wait for its fill.
    let lease = match via {
        Via::Fetch => match fleet::turn(&inner, &key, max_age).await {
            fleet::Turn::Load(lease) => lease,
            fleet::Turn::Filled(e) => return fleet::adopt(&inner, &key, e, &seen, &early).await,
            fleet::Turn::TimedOut(e) => return Err(e),
        },
        Via::Batch(_) => None,
    };
    let result = answer_and_fill(&inner, &key, prev, seen, early, via, kind).await;
    if let Some(token) = lease {
        fleet::release(&inner, &key, token).await;
    }
    result
}

/// The source's answer (its own call or a batch's) for the load, filled into the tiers.
async fn answer_and_fill(
    inner: &Inner,
    key: &str,
    prev: Option<Arc<Entry>>,
    seen: Seen,
    early: Early<(Arc<Entry>, Loaded)>,
    via: Via,
    kind: RequestKind,
) -> LoadResult {
    let clock = inner.clock.clone();
    let settings = &inner.settings;
    let Answer {
        fetched,
        sent,
        answered_at,
    } = match via {
        Via::Fetch => fetch(inner, key, prev.as_deref(), kind).await,
        Via::Batch(rx) => rx.await.unwrap_or_else(|_| Answer {
            fetched: Err(not_sent()),
            sent: false,
            answered_at: 0,
        }),
    };
    if sent && !matches!(&fetched, Err(e) if is_not_sent(e)) {
        inner.stats.request(kind, RequestEvent::Sent);
    }
    // The answer is dated when the source gave it, not after the breaker's bookkeeping.
    let now = match answered_at {
        0 => clock.now_millis(),
        at => at,
    };
    let deadlines = |ttl: Option<Duration>, base: u64| {
        let fresh_until = add(now, ttl.map_or(base, millis));
        (fresh_until, add(fresh_until, settings.stale_ttl))
    };
    let (entry, how) = match fetched {
        Ok(Fetched::Value {
            value,
            validator,
            ttl,
        }) => {
            inner.stats.source_call(SourceOutcome::Ok);
            inner.stats.hit(Tier::L3);
            let (fresh_until, stale_until) = deadlines(ttl, settings.ttl);
            let entry = Entry::new(Some(value), validator, now, fresh_until, stale_until);
            (entry, Loaded::Fetched)
        }
        Ok(Fetched::NotModified { ttl }) => {
            let Some(prev) = prev.filter(|p| p.value.is_some()) else {
                inner.stats.source_call(SourceOutcome::Failed);
                inner.stats.error(Tier::L3);
                return Err(source_failure(
                    key,
                    SourceError::InvalidResponse {
                        message: "the source answered \"not modified\" to an unconditional request"
                            .into(),
                    },
                ));
            };
            // A 304 is an L3 hit: the source confirmed the copy.
            inner.stats.source_call(SourceOutcome::NotModified);
            inner.stats.request(kind, RequestEvent::NotModified);
            inner.stats.hit(Tier::L3);
            let (fresh_until, stale_until) = deadlines(ttl, settings.ttl);
            (
                prev.renewed(now, fresh_until, stale_until),
                Loaded::NotModified,
            )
        }
        Ok(Fetched::NotFound) => {
            inner.stats.source_call(SourceOutcome::NotFound);
            inner.stats.miss(Tier::L3);
            let fresh_until = add(now, settings.negative_ttl);
            let entry = Entry::new(None, None, now, fresh_until, fresh_until);
            (entry, Loaded::Fetched)
        }
        Err(e) if is_not_sent(&e) => {
            // Offline switched on while the call waited for its permit: nothing was sent (and
            // nothing is counted as a source call).
            return Err(source_failure(key, e));
        }
        Err(e) if !sent => {
            // The breaker or the rate-limit gate refused the call: nothing was sent, so it is
            // no source call and no L3 error, only a refusal.
            inner.stats.source_refused();
            return Err(source_failure(key, e));
        }
        Err(e) => {
            inner
                .stats
                .source_call(if e.rate_limited_until().is_some() {
                    SourceOutcome::RateLimited
                } else {
                    SourceOutcome::Failed
                });
            inner.stats.error(Tier::L3);
            return Err(source_failure(key, e));
        }
    };
    fill(inner, key, entry, how, seen, early).await
}

/// One call to [`Source::fetch`] under the guard, conditional on `prev`'s validator.
async fn fetch(inner: &Inner, key: &str, prev: Option<&Entry>, kind: RequestKind) -> Answer {
    let validator = prev.and_then(Entry::revalidator);
    let before = inner.source.rate_limit();
    let (fetched, sent, answered_at) =
        call_source(inner, Op::Get, inner.source.fetch(key, validator)).await;
    if sent {
        record_budget(inner, kind, before);
    }
    Answer {
        fetched,
        sent,
        answered_at,
    }
}

/// Records the budget a call of `kind` spent: the drop of the source's `remaining` since
/// `before`, within one window (see [`RequestStats::budget_spent`](crate::stats::RequestStats)).
fn record_budget(inner: &Inner, kind: RequestKind, before: Option<RateLimit>) {
    if let (Some(b), Some(a)) = (before, inner.source.rate_limit()) {
        if a.reset == b.reset && a.limit == b.limit && a.remaining < b.remaining {
            inner.stats.budget_spent(kind, b.remaining - a.remaining);
        }
    }
}

/// Runs one source call under the guard (breaker permit, offline check, timeout), timing the
/// source's own work under L3 `op`. Returns the result, whether the call left at all (the
/// breaker and the rate-limit gate may refuse it) and when the source answered (ms; 0: it did
/// not).
async fn call_source<T>(
    inner: &Inner,
    op: Op,
    call: impl std::future::Future<Output = std::result::Result<T, SourceError>>,
) -> (std::result::Result<T, SourceError>, bool, u64) {
    let offline = inner.offline.clone();
    let answered_at = AtomicU64::new(0);
    let sent = AtomicBool::new(false);
    let result = guarded(
        &inner.guard,
        inner.settings.timeout,
        || !offline.load(Ordering::SeqCst),
        async {
            sent.store(true, Ordering::Relaxed);
            let timer = inner.stats.start();
            let r = call.await;
            inner.stats.record(Tier::L3, op, timer);
            answered_at.store(inner.clock.now_millis(), Ordering::Relaxed);
            r
        },
    )
    .await;
    let (sent, answered_at) = (sent.into_inner(), answered_at.into_inner());
    if sent && answered_at == 0 {
        // Timed out: the call took (at least) the whole timeout.
        inner
            .stats
            .record_latency(Tier::L3, op, inner.settings.timeout);
    }
    (result, sent, answered_at)
}

/// Fetches cold keys (no validator) in batches of the source's [`Source::max_batch`], each
/// batch one [`Source::fetch_many`] call under one breaker permit, and hands each key's answer
/// to its load ([`Via::Batch`]).
pub(super) async fn fetch_batches(
    inner: &Inner,
    keys: Vec<(String, oneshot::Sender<Answer>)>,
    kind: RequestKind,
) {
    let max = inner.source.max_batch().max(1);
    let items = keys.into_iter().map(|(k, tx)| (k, None, tx)).collect();
    in_batches(inner, items, max, kind).await;
}

/// Sends `items` in batches of at most `size`, [`one_batch`] each, up to `fetch_concurrency`
/// batches at a time.
pub(super) async fn in_batches(
    inner: &Inner,
    mut items: Vec<BatchItem>,
    size: usize,
    kind: RequestKind,
) {
    let mut batches = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(items.len().min(size.max(1)));
        batches.push(std::mem::replace(&mut items, rest));
    }
    stream::iter(batches)
        .for_each_concurrent(inner.settings.fetch_concurrency, |batch| {
            one_batch(inner, batch, kind)
        })
        .await;
}

/// A key of a batch: its name, the validator to revalidate with (`None`: a cold fetch), and
/// where its load waits for the answer.
pub(super) type BatchItem = (String, Option<String>, oneshot::Sender<Answer>);

/// One batch under one breaker permit: [`Source::fetch_many`] when no key has a validator,
/// else [`Source::revalidate_many`] (every key must then have one); each key's answer is
/// handed to its load.
async fn one_batch(inner: &Inner, batch: Vec<BatchItem>, kind: RequestKind) {
    let names: Vec<&str> = batch.iter().map(|(k, _, _)| k.as_str()).collect();
    let pairs: Option<Vec<(&str, &str)>> = batch
        .iter()
        .map(|(k, v, _)| v.as_deref().map(|v| (k.as_str(), v)))
        .collect();
    let revalidate = batch.iter().any(|(_, v, _)| v.is_some());
    // A key whose own answer says the source failed: the breaker hears of it (the call
    // reads as failed), and every key keeps its own answer.
    let partial = std::sync::Mutex::new(None);
    let call = async {
        let answers = match (&pairs, revalidate) {
            (Some(pairs), true) => inner.source.revalidate_many(pairs).await?,
            (None, true) => {
                return Err(SourceError::InvalidResponse {
                    message: "a revalidation batch holds a key without a validator".into(),
                })
            }
            (_, false) => inner.source.fetch_many(&names).await?,
        };
        let failed = answers
            .iter()
            .find_map(|a| a.as_ref().err().filter(|e| e.counts_as_failure()).cloned());
        match failed {
            Some(e) => {
                *partial.lock().unwrap_or_else(|p| p.into_inner()) = Some(answers);
                Err(e)
            }
            None => Ok(answers),
        }
    };
    let before = inner.source.rate_limit();
    let (fetched, sent, answered_at) = call_source(inner, Op::Mget, call).await;
    if sent {
        record_budget(inner, kind, before);
    }
    let partial = partial.into_inner().unwrap_or_else(|p| p.into_inner());
    let fetched = match (fetched, partial) {
        (Err(_), Some(answers)) => Ok(answers),
        (fetched, _) => fetched,
    };
    let mut answers = match fetched {
        Ok(answers) if answers.len() == batch.len() => answers,
        Ok(answers) => {
            let e = SourceError::InvalidResponse {
                message: format!(
                    "the source answered {} of a batch of {} keys",
                    answers.len(),
                    batch.len()
                ),
            };
            vec![Err(e); batch.len()]
        }
        Err(e) => vec![Err(e); batch.len()],
    }
    .into_iter();
    for (_, _, tx) in batch {
        let fetched = answers.next().unwrap_or_else(|| Err(not_sent()));
        // A load that found its key in L1 meanwhile has stopped listening.
        let _ = tx.send(Answer {
            fetched,
            sent,
            answered_at,
        });
    }
}

/// Writes what a load got into L1, then L2. L1 first (readers see the answer at once, and the
/// load's waiters get it: [`Early`]), then L2; both behind the key's fence, and L2 only over the
/// row the read saw: a write that raced the load wins (I1). When L2 refuses the fill (a write,
/// maybe another process's, got there first), the L1 copy goes too.
async fn fill(
    inner: &Inner,
    key: &str,
    entry: Entry,
    how: Loaded,
    seen: Seen,
    early: Early<(Arc<Entry>, Loaded)>,
) -> LoadResult {
    let Seen {
        token, observed, ..
    } = seen;
    let settings = &inner.settings;
    let entry = Arc::new(entry);
    let remember = settings.negative_ttl > 0 || entry.value.is_some();
    if remember && inner.fences.may_cache(key, token) {
        inner.l1.insert(key, entry.clone()).await;
        if !inner.fences.may_cache(key, token) {
            inner.l1.remove(key).await;
        }
        early.publish(&(entry.clone(), how));
        let fences = inner.fences.clone();
        let fenced_key = key.to_owned();
        let guard = FillGuard {
            observed,
            still_valid: Box::new(move || fences.unchanged(&fenced_key, token)),
        };
        let written = match how {
            Loaded::NotModified => {
                let deadlines = (entry.stored_at, entry.fresh_until, entry.stale_until);
                inner.l2.renew_fill(key, deadlines, guard).await
            }
            _ => inner.l2.put_fill(key, (*entry).clone(), guard).await,
        };
        match written {
            Ok(true) => {}
            Ok(false) => inner.l1.remove(key).await,
            Err(e) => {
                inner.stats.error(Tier::L2);
                tracing::warn!(key, error = %e, "L2 write failed; the value is held in L1 only");
            }
        }
    }
    Ok((entry, how))
}

/// A per-call loader (`get_with`): `Some` bytes, `None` for "does not exist", or its error.
pub(super) type CustomLoad = Box<
    dyn FnOnce() -> futures_util::future::BoxFuture<
            'static,
            std::result::Result<Option<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
        > + Send,
>;

/// One load through a per-call loader instead of the source, filled like a source's answer
/// (no validator: it is never revalidated, only reloaded). A failure becomes
/// [`Error::Unavailable`] (reason: source error), so the stale fallback applies.
pub(super) async fn load_custom(
    inner: Arc<Inner>,
    key: String,
    loader: CustomLoad,
    seen: Seen,
    early: Early<(Arc<Entry>, Loaded)>,
) -> LoadResult {
    let timer = inner.stats.start();
    let loaded = loader().await;
    inner.stats.record(Tier::L3, Op::Get, timer);
    let now = inner.clock.now_millis();
    let settings = &inner.settings;
    // The loader stands in for the source: its answers are L3's hits and misses.
    match &loaded {
        Ok(Some(_)) => inner.stats.hit(Tier::L3),
        Ok(None) => inner.stats.miss(Tier::L3),
        Err(_) => {}
    }
    let entry = match loaded {
        Ok(Some(value)) => {
            let fresh_until = add(now, settings.ttl);
            Entry::new(
                Some(value),
                None,
                now,
                fresh_until,
                add(fresh_until, settings.stale_ttl),
            )
        }
        Ok(None) => {
            let fresh_until = add(now, settings.negative_ttl);
            Entry::new(None, None, now, fresh_until, fresh_until)
        }
        Err(e) => {
            inner.stats.error(Tier::L3);
            return Err(Error::Unavailable {
                key,
                reason: StaleReason::SourceError,
                source: SourceError::Other(Arc::from(e)),
            });
        }
    };
    fill(&inner, &key, entry, Loaded::Fetched, seen, early).await
}
