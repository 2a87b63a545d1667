//! `mget`: the read pipeline for many keys at once (one pass over L1, one L2 statement).

use std::collections::HashMap;
use std::sync::Arc;

use super::load::{fetch_batches, BatchItem};
use super::read::{Probe, Seen};
use super::warm::revalidate_batches;
use super::*;
use crate::tier::Observed;

impl TieredCache {
    /// Looks up many keys at once: one pass over L1, one SQL statement for all L1 misses, and
    /// the source for what is left. Keys held with a validator are revalidated one conditional
    /// call each (with bounded concurrency), or in bulk through
    /// [`Source::revalidate_many`](crate::source::Source::revalidate_many) when the source
    /// [revalidates in bulk](crate::source::Source::revalidates_in_bulk); cold keys go in batches of
    /// [`Source::max_batch`](crate::source::Source::max_batch) through
    /// [`Source::fetch_many`](crate::source::Source::fetch_many) when the source batches (one
    /// call per key otherwise). Every key stays single-flight with concurrent reads.
    ///
    /// The results are in the order of `keys`; a failed key does not fail the others.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use tiercache::{Strategy, TieredCache};
    ///
    /// let cache = TieredCache::builder().strategy(Strategy::CacheAside).build()?;
    /// cache.set("a", "1").await?;
    /// let results = cache.mget(&["a", "b", "a"]).await;
    /// assert_eq!(results[0].as_ref().unwrap().as_ref().unwrap().value, "1");
    /// assert!(results[1].as_ref().unwrap().is_none());
    /// # Ok(()) }
    /// ```
    pub async fn mget<K: AsRef<str>>(&self, keys: &[K]) -> Vec<Result<Option<Lookup>>> {
        self.mget_with(keys, &ReadOptions::default()).await
    }

    /// [`mget`](Self::mget) with per-call options.
    pub async fn mget_with<K: AsRef<str>>(
        &self,
        keys: &[K],
        options: &ReadOptions,
    ) -> Vec<Result<Option<Lookup>>> {
        let span = tracing::debug_span!("tiercache.mget", keys = keys.len());
        let max_age = options.max_age.map(millis);
        in_span!(span, self.mget_inner(keys, max_age))
    }

    pub(super) async fn mget_inner<K: AsRef<str>>(
        &self,
        keys: &[K],
        max_age: Option<u64>,
    ) -> Vec<Result<Option<Lookup>>> {
        let inner = &*self.inner;
        let now = self.now();
        let n = keys.len();
        // Distinct valid keys; each input position's distinct key (or why the key is
        // invalid), and each distinct key's last position (its answer moves there, earlier
        // positions get a clone). No list per key: a batch allocates a few vectors, not one
        // per key.
        let mut distinct: Vec<&str> = Vec::with_capacity(n);
        let mut position: Vec<Result<usize>> = Vec::with_capacity(n);
        let mut last: Vec<usize> = Vec::with_capacity(n);
        // foldhash, not SipHash (about 150 instructions per key, twice per key of a batch): the
        // index holds one call's keys for that call only.
        let mut index: HashMap<&str, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(n, Default::default());
        for (i, k) in keys.iter().enumerate() {
            let k = k.as_ref();
            if let Err(e) = self.check(k) {
                position.push(Err(e));
                continue;
            }
            let d = *index.entry(k).or_insert(distinct.len());
            if d == distinct.len() {
                distinct.push(k);
                last.push(i);
            } else {
                last[d] = i;
            }
            position.push(Ok(d));
        }
        let mut answers: Vec<Option<Result<Option<Lookup>>>> = vec![None; distinct.len()];
        let mut candidates: Vec<Option<(Arc<Entry>, Tier)>> = vec![None; distinct.len()];
        // Each key's fence token, taken before L2 is read, and the L2 row seen.
        let mut tokens: Vec<u64> = vec![0; distinct.len()];
        let mut observed: Vec<Observed> = vec![Observed::Unknown; distinct.len()];
        // L1.
        let l1_timer = inner.stats.start();
        let mut l1_misses = Vec::new();
        for (d, &k) in distinct.iter().enumerate() {
            match inner.l1.get(k, now).await {
                Some(e) if e.is_fresh(now, max_age) => {
                    inner.stats.hit(Tier::L1);
                    answers[d] = Some(Ok(self.served(&e, Tier::L1, Freshness::Fresh, now)));
                }
                other => {
                    inner.stats.miss(Tier::L1);
                    tokens[d] = inner.fences.token(k);
                    // A pending write of the memory outbox shadows L2 (as in `lookup_slow`).
                    let pending = inner.memory_queue.as_ref().and_then(|q| q.newest_now(k));
                    if let Some(op) = pending {
                        answers[d] = Some(Ok(self.serve_pending(k, op, tokens[d], now).await));
                        continue;
                    }
                    candidates[d] = self.servable_l1(k, other, now).await;
                    l1_misses.push(d);
                }
            }
        }
        // Each tier's latency is its own work: the L1 pass, the one L2 statement; the source's
        // calls are timed in `load`.
        inner.stats.record(Tier::L1, Op::Mget, l1_timer);
        // L2: one statement for all L1 misses.
        let mut to_source = Vec::new();
        let mut outbox_checked = false;
        if !l1_misses.is_empty() {
            let wanted: Vec<&str> = l1_misses.iter().map(|&d| distinct[d]).collect();
            let l2_timer = inner.stats.start();
            let found = inner.l2.get_many(&wanted).await;
            inner.stats.record(Tier::L2, Op::Mget, l2_timer);
            match found {
                Ok(found) => {
                    // Rows placed by the distinct index already built (no map of their own).
                    let mut rows: Vec<Option<(String, Entry)>> = vec![None; distinct.len()];
                    let mut pending: Vec<Option<OutboxOp>> = vec![None; distinct.len()];
                    for (k, e) in found.entries {
                        if let Some(&d) = index.get(k.as_str()) {
                            rows[d] = Some((k, e));
                        }
                    }
                    for (k, op) in found.pending {
                        if let Some(&d) = index.get(k.as_str()) {
                            pending[d] = Some(op);
                        }
                    }
                    outbox_checked = true;
                    for d in l1_misses {
                        let k = distinct[d];
                        // The row's own key string goes into L1 with its entry (no copy).
                        let (row_key, entry) = rows[d].take().unzip();
                        observed[d] = Observed::of(&entry);
                        // An undelivered write is the answer, whatever L2 holds (I1, I2).
                        if let Some(op) = pending[d].take() {
                            answers[d] = Some(Ok(self.serve_pending(k, op, tokens[d], now).await));
                            continue;
                        }
                        let probe = self
                            .consider_l2(
                                k,
                                row_key,
                                entry,
                                max_age,
                                &mut candidates[d],
                                now,
                                tokens[d],
                            )
                            .await;
                        match probe {
                            Probe::Fresh(served) => answers[d] = Some(Ok(served)),
                            Probe::Miss => to_source.push(d),
                        }
                    }
                }
                Err(e) => {
                    inner.stats.error(Tier::L2);
                    tracing::warn!(error = %e, "L2 batch read failed; going on without it");
                    to_source = l1_misses;
                }
            }
        }
        // The source, for what is left: the cold keys (nothing to revalidate with) in batches
        // when the source batches, the others one call each.
        let distinct_ref = &distinct;
        let reads_through = inner.settings.strategy.reads_through();
        let batches = inner.source.max_batch() > 1 && reads_through;
        let bulk = inner.source.revalidates_in_bulk() && reads_through;
        let (cold, to_source): (Vec<usize>, Vec<usize>) = to_source.into_iter().partition(|&d| {
            let cold = candidates[d]
                .as_ref()
                .is_none_or(|(e, _)| e.revalidator().is_none());
            (batches && cold) || (bulk && !cold)
        });
        let mut batch = Vec::new();
        let mut turns = Vec::with_capacity(cold.len());
        for d in cold {
            let seen = Seen {
                token: tokens[d],
                observed: observed[d],
                outbox_checked,
                kind: crate::stats::RequestKind::Read,
            };
            let (key, candidate) = (distinct[d], candidates[d].take());
            let turn = self
                .source_turn(key, max_age, candidate, now, seen, None, Some(&mut batch))
                .await;
            turns.push((d, turn));
        }
        let waited = async {
            let waits = turns
                .into_iter()
                .map(|(d, turn)| async move { (d, turn.answer(self, distinct_ref[d], now).await) });
            futures_util::future::join_all(waits).await
        };
        let (cold, held): (Vec<BatchItem>, Vec<BatchItem>) =
            batch.into_iter().partition(|(_, v, _)| v.is_none());
        let cold = cold.into_iter().map(|(k, _, tx)| (k, tx)).collect();
        let (_, _, batched) = tokio::join!(
            fetch_batches(inner, cold, crate::stats::RequestKind::Read),
            revalidate_batches(inner, held, crate::stats::RequestKind::Revalidate),
            waited
        );
        for (d, r) in batched {
            answers[d] = Some(r);
        }
        let fetched: Vec<(usize, Result<Option<Lookup>>)> = stream::iter(to_source)
            .map(|d| {
                let candidate = candidates[d].take();
                let seen = Seen {
                    token: tokens[d],
                    observed: observed[d],
                    outbox_checked,
                    kind: crate::stats::RequestKind::Read,
                };
                async move {
                    let key = distinct_ref[d];
                    (
                        d,
                        self.ask_source(key, max_age, candidate, now, seen, None)
                            .await,
                    )
                }
            })
            .buffer_unordered(inner.settings.fetch_concurrency)
            .collect()
            .await;
        for (d, r) in fetched {
            answers[d] = Some(r);
        }
        position
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let d = d?;
                let answer = if last[d] == i {
                    answers[d].take()
                } else {
                    answers[d].clone()
                };
                answer.unwrap_or(Ok(None))
            })
            .collect()
    }
}
