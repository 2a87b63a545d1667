//! Reads: one resolve pipeline (L1 → L2 → pending writes → the source → stale fallback) behind `get`, `lookup` and `get_json`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::flight::Flight;
use super::load::{load_custom, BatchItem, CustomLoad, Via};
use super::*;
use crate::source::guard::not_sent;
use crate::stats::{RequestEvent, RequestKind};
use crate::tier::Observed;

/// What a read saw before it asked the source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    /// The key's fence token, taken before L2 was read.
    pub(crate) token: u64,
    /// The L2 row seen.
    pub(crate) observed: Observed,
    /// Whether the outbox was already asked for a pending write of the key.
    pub(crate) outbox_checked: bool,
    /// Why the load would be made: [`RequestKind::Read`] for reads (a load with a validator
    /// counts as [`RequestKind::Revalidate`]).
    pub(crate) kind: RequestKind,
}

/// A read at the source's turn ([`TieredCache::source_turn`]).
pub(super) enum Turn {
    /// Answered without the source.
    Done(Result<Option<Lookup>>),
    /// Waiting for a load; the stale candidate is the fallback.
    Waiting {
        flight: Flight<(Arc<Entry>, Loaded)>,
        candidate: Option<(Arc<Entry>, Tier)>,
    },
}

impl Turn {
    /// The read's answer: at once, or when its load is done.
    pub(super) async fn answer(
        self,
        cache: &TieredCache,
        key: &str,
        now: u64,
    ) -> Result<Option<Lookup>> {
        match self {
            Self::Done(answer) => answer,
            Self::Waiting { flight, candidate } => {
                cache.await_load(key, flight, candidate, now).await
            }
        }
    }
}

/// What one tier's probe found for a key.
#[derive(Debug)]
pub(super) enum Probe {
    /// A fresh answer: a value, or `None` for a fresh "not found".
    Fresh(Option<Lookup>),
    /// Nothing fresh here (a stale copy, if any, became the candidate).
    Miss,
}

impl TieredCache {
    // ---------------------------------------------------------------- reads

    /// The value of `key`, or `None` when it does not exist (or, under
    /// [`Strategy::CacheAside`], is not cached).
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; [`Error::Unavailable`] when the source failed and no stale copy
    /// could stand in; [`Error::Source`] when the source refused the request.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        // The L1 hit, without building a `Lookup` (no validator copy). The key rules are checked
        // after an L1 miss, before L2 or the source is touched: nothing enters L1 without
        // passing them, so an invalid key can only miss here.
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let timer = inner.stats.start_sampled();
        let now = self.now();
        let e = inner.l1.get(key, now).await;
        if let Some(e) = &e {
            if now < e.fresh_until {
                inner.stats.hit(Tier::L1);
                inner.stats.record(Tier::L1, Op::Get, timer);
                if e.value.is_none() {
                    inner.stats.negative_hit();
                }
                self.consider_refresh(key, e, now);
                return Ok(e.value.clone());
            }
        }
        self.check_basic(key)?;
        let candidate = self.servable_l1(key, e, now).await;
        Ok(self
            .lookup_after_l1(key, None, candidate, now, None)
            .await?
            .map(|l| l.value))
    }

    /// The value of `key` with where it came from: the tier, fresh or stale (and why), its age.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn lookup(&self, key: &str) -> Result<Option<Lookup>> {
        self.lookup_inner(key, None, None).await
    }

    /// [`lookup`](Self::lookup) with per-call options.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn lookup_with(&self, key: &str, options: &ReadOptions) -> Result<Option<Lookup>> {
        self.lookup_inner(key, options.max_age.map(millis), None)
            .await
    }

    /// `lookup`'s pipeline; `custom` (from `get_with`) stands in for the source after an L1
    /// miss.
    pub(super) async fn lookup_inner(
        &self,
        key: &str,
        max_age: Option<u64>,
        custom: Option<CustomLoad>,
    ) -> Result<Option<Lookup>> {
        self.check_basic(key)?;
        let inner = &*self.inner;
        let timer = inner.stats.start_sampled();
        let now = self.now();
        let e = inner.l1.get(key, now).await;
        if let Some(e) = &e {
            if e.is_fresh(now, max_age) {
                inner.stats.hit(Tier::L1);
                inner.stats.record(Tier::L1, Op::Get, timer);
                self.consider_refresh(key, e, now);
                return Ok(self.served(e, Tier::L1, Freshness::Fresh, now));
            }
        }
        let candidate = self.servable_l1(key, e, now).await;
        self.lookup_after_l1(key, max_age, candidate, now, custom)
            .await
    }

    /// The L1 copy that may still stand in as stale; one past its stale deadline is dropped
    /// (L1 has no expiry of its own: see `MemoryTier::new`).
    pub(super) async fn servable_l1(
        &self,
        key: &str,
        e: Option<Arc<Entry>>,
        now: u64,
    ) -> Option<(Arc<Entry>, Tier)> {
        match e {
            Some(e) if e.is_servable(now) => Some((e, Tier::L1)),
            Some(_) => {
                self.inner.l1.remove(key).await;
                None
            }
            None => None,
        }
    }

    /// Everything after L1 could not answer fresh. Not boxed: the box (about 1.8 KB, past
    /// malloc's small-size cache) and the copy into it cost an L2 hit about 2% (callgrind),
    /// while the bigger future costs an L1 hit nothing measurable (it is built in place). The
    /// source's part is boxed where it is reached (`lookup_slow`). `get`'s future is about
    /// 2 KB instead of 1.1 KB.
    pub(super) async fn lookup_after_l1(
        &self,
        key: &str,
        max_age: Option<u64>,
        candidate: Option<(Arc<Entry>, Tier)>,
        now: u64,
        custom: Option<CustomLoad>,
    ) -> Result<Option<Lookup>> {
        let inner = &*self.inner;
        inner.stats.miss(Tier::L1);
        self.check_source(key)?;
        let span = tracing::debug_span!(
            "tiercache.get",
            key,
            tier = tracing::field::Empty,
            freshness = tracing::field::Empty
        );
        // Latency is recorded where each tier does its own work (L2's read here in
        // `lookup_slow`, the source's call in `load`), not for the whole slow path.
        if span.is_disabled() {
            // Nothing to record into: the future is awaited where it is built, not moved
            // into an `Instrumented` (a copy of a few kilobytes per L2 hit).
            return self.lookup_slow(key, max_age, candidate, now, custom).await;
        }
        let result = tracing::Instrument::instrument(
            self.lookup_slow(key, max_age, candidate, now, custom),
            span.clone(),
        )
        .await;
        if let Ok(Some(l)) = &result {
            span.record("tier", l.tier.as_str());
            span.record(
                "freshness",
                match l.freshness {
                    Freshness::Fresh => "fresh",
                    Freshness::Stale { reason } => reason.as_str(),
                },
            );
        }
        result
    }

    /// Everything after an L1 miss: pending writes of the memory outbox, L2, pending writes of
    /// the durable outbox, then the source.
    pub(super) async fn lookup_slow(
        &self,
        key: &str,
        max_age: Option<u64>,
        mut candidate: Option<(Arc<Entry>, Tier)>,
        now: u64,
        custom: Option<CustomLoad>,
    ) -> Result<Option<Lookup>> {
        let inner = &*self.inner;
        // Taken before L2 is read: a write that lands after this keeps this read's promotion
        // and fill out of the tiers.
        let token = inner.fences.token(key);
        // The memory outbox writes L2 only on delivery: its pending write shadows L2.
        if let Some(queue) = &inner.memory_queue {
            if let Some(op) = queue.newest_now(key) {
                return Ok(self.serve_pending(key, op, token, now).await);
            }
        }
        let timer = inner.stats.start();
        let found = match inner.l2.get_now(key) {
            Some(found) => found,
            None => inner.l2.get(key).await,
        };
        inner.stats.record(Tier::L2, Op::Get, timer);
        let observed = match &found {
            Ok(found) => Observed::of(found),
            Err(_) => Observed::Unknown,
        };
        match found {
            Ok(found) => {
                if let Probe::Fresh(served) = self
                    .consider_l2(key, None, found, max_age, &mut candidate, now, token)
                    .await
                {
                    return Ok(served);
                }
            }
            Err(e) => {
                inner.stats.error(Tier::L2);
                tracing::warn!(key, error = %e, "L2 read failed; going on without it");
            }
        }
        let seen = Seen {
            token,
            observed,
            outbox_checked: false,
            kind: RequestKind::Read,
        };
        // Boxed: the source's part of the pipeline is most of this future's size, and an L2
        // hit (which never gets here) would otherwise pay to move it.
        Box::pin(self.ask_source(key, max_age, candidate, now, seen, custom)).await
    }

    /// What L2 answered for `key`: a fresh entry is promoted into L1 and served
    /// ([`Probe::Fresh`]); a stale one becomes the `candidate` if it is newer than the one L1
    /// had. `row_key`: the key as the L2 row returned it, if the read has it (L1 keeps that
    /// string instead of a copy).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn consider_l2(
        &self,
        key: &str,
        row_key: Option<String>,
        found: Option<Entry>,
        max_age: Option<u64>,
        candidate: &mut Option<(Arc<Entry>, Tier)>,
        now: u64,
        token: u64,
    ) -> Probe {
        let inner = &*self.inner;
        let Some(e) = found.filter(|e| e.is_servable(now)) else {
            inner.stats.miss(Tier::L2);
            return Probe::Miss;
        };
        let e = Arc::new(e);
        if e.is_fresh(now, max_age) {
            inner.stats.hit(Tier::L2);
            self.promote(key, row_key, e.clone(), token).await;
            inner.l2.touch(key, now);
            self.consider_refresh(key, &e, now);
            return Probe::Fresh(self.served(&e, Tier::L2, Freshness::Fresh, now));
        }
        inner.stats.miss(Tier::L2);
        if candidate
            .as_ref()
            .is_none_or(|(c, _)| e.stored_at > c.stored_at)
        {
            *candidate = Some((e, Tier::L2));
        }
        Probe::Miss
    }

    /// Puts what a read found into L1, unless a write of the key began since `token` was taken
    /// (then the write's value, or its absence, stands: see `tier::fence`). `l1_key`: `key` as
    /// an owned string the caller no longer needs, if it has one (else L1 copies `key`).
    pub(super) async fn promote(
        &self,
        key: &str,
        l1_key: Option<String>,
        e: Arc<Entry>,
        token: u64,
    ) {
        let inner = &*self.inner;
        if !inner.fences.may_cache(key, token) {
            return;
        }
        debug_assert!(l1_key.as_deref().is_none_or(|k| k == key));
        inner
            .l1
            .insert(l1_key.unwrap_or_else(|| key.to_owned()), e)
            .await;
        if !inner.fences.may_cache(key, token) {
            inner.l1.remove(key).await;
        }
    }

    /// The source's turn: pending writes first, then load (single-flight), or fall back to the
    /// stale candidate.
    pub(super) async fn ask_source(
        &self,
        key: &str,
        max_age: Option<u64>,
        candidate: Option<(Arc<Entry>, Tier)>,
        now: u64,
        seen: Seen,
        custom: Option<CustomLoad>,
    ) -> Result<Option<Lookup>> {
        self.source_turn(key, max_age, candidate, now, seen, custom, None)
            .await
            .answer(self, key, now)
            .await
    }

    /// [`ask_source`](Self::ask_source) up to the load: answered at once (a pending write,
    /// offline, a cache-aside miss), or a load joined. With `batch`, a cold key's load (no
    /// validator to revalidate with) gets its answer from the batch, which the caller sends
    /// ([`fetch_batches`](super::load::fetch_batches)); so does a key held with a validator
    /// when the source revalidates in bulk (the item then carries the validator: the caller
    /// sends those through `revalidate_batches`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn source_turn(
        &self,
        key: &str,
        max_age: Option<u64>,
        candidate: Option<(Arc<Entry>, Tier)>,
        now: u64,
        seen: Seen,
        custom: Option<CustomLoad>,
        batch: Option<&mut Vec<BatchItem>>,
    ) -> Turn {
        let inner = &*self.inner;
        // A per-call loader stands in for the source under every strategy.
        if custom.is_none() && !inner.settings.strategy.reads_through() {
            return Turn::Done(Ok(None));
        }
        // A key with an undelivered write-behind write (of this process or of any other one
        // sharing the database, whatever its strategy): the source still has the old value, so
        // the write is the answer (I1, I2).
        if inner.memory_queue.is_none() && !seen.outbox_checked {
            if let Some(outbox) = &inner.outbox {
                match outbox.queue().newest(key).await {
                    Ok(Some(op)) => {
                        return Turn::Done(Ok(self.serve_pending(key, op, seen.token, now).await))
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(key, error = %e, "could not read the outbox; asking the source");
                    }
                }
            }
        }
        // Offline concerns the source; a per-call loader is the application's own business.
        if custom.is_none() && self.is_offline() {
            return Turn::Done(self.fallback(
                key,
                candidate,
                StaleReason::Offline,
                not_sent(),
                now,
            ));
        }
        let prev = candidate.as_ref().map(|(e, _)| e.clone());
        // Nothing to revalidate with: a cold key, which a batch can carry.
        let cold = prev.as_ref().is_none_or(|p| p.revalidator().is_none());
        let flight =
            inner
                .flights
                .join(key, seen.token, |early| -> BoxFuture<'static, LoadResult> {
                    let inner = self.inner.clone();
                    let key = key.to_owned();
                    let via = match batch {
                        Some(batch) if cold => {
                            let (tx, rx) = oneshot::channel();
                            batch.push((key.clone(), None, tx));
                            Via::Batch(rx)
                        }
                        Some(batch) if inner.source.revalidates_in_bulk() => {
                            let (tx, rx) = oneshot::channel();
                            let validator = prev
                                .as_ref()
                                .and_then(|p| p.revalidator())
                                .map(str::to_owned);
                            batch.push((key.clone(), validator, tx));
                            Via::Batch(rx)
                        }
                        // A lone read's cold miss: into the window, if one is configured
                        // and the source batches.
                        None if cold && custom.is_none() && inner.source.max_batch() > 1 => {
                            match &inner.get_window {
                                Some(window) => {
                                    let (tx, rx) = oneshot::channel();
                                    window.push(&inner, key.clone(), tx);
                                    Via::Batch(rx)
                                }
                                None => Via::Fetch,
                            }
                        }
                        _ => Via::Fetch,
                    };
                    match custom {
                        Some(loader) => Box::pin(load_custom(inner, key, loader, seen, early)),
                        None => Box::pin(load(inner, key, prev, max_age, seen, early, via)),
                    }
                });
        if !flight.leader {
            inner.stats.coalesced_waiter();
            let kind = if cold {
                RequestKind::Read
            } else {
                RequestKind::Revalidate
            };
            inner.stats.request(kind, RequestEvent::Deduplicated);
        }
        Turn::Waiting { flight, candidate }
    }

    /// Waits for the load a read joined and serves its answer, or the stale candidate when the
    /// source could not answer.
    pub(super) async fn await_load(
        &self,
        key: &str,
        flight: Flight<(Arc<Entry>, Loaded)>,
        candidate: Option<(Arc<Entry>, Tier)>,
        now: u64,
    ) -> Result<Option<Lookup>> {
        let inner = &*self.inner;
        let result = match (inner.settings.soft_timeout, &candidate) {
            (Some(soft), Some(_)) => match tokio::time::timeout(soft, flight.wait()).await {
                Ok(r) => r,
                Err(_) => Err(Error::Unavailable {
                    key: key.to_owned(),
                    reason: StaleReason::Timeout,
                    source: SourceError::Timeout { after: soft },
                }),
            },
            _ => flight.wait().await,
        };
        match result {
            Ok((entry, _)) => Ok(self.served(&entry, Tier::L3, Freshness::Fresh, self.now())),
            Err(Error::Unavailable { reason, source, .. }) => {
                // Offline switched on while the call waited for its turn: it was not sent.
                let reason = if self.is_offline() {
                    StaleReason::Offline
                } else {
                    reason
                };
                self.fallback(key, candidate, reason, source, now)
            }
            Err(e) => Err(e),
        }
    }

    /// Serves the stale candidate, or says the key is unavailable.
    pub(super) fn fallback(
        &self,
        key: &str,
        candidate: Option<(Arc<Entry>, Tier)>,
        reason: StaleReason,
        source: SourceError,
        now: u64,
    ) -> Result<Option<Lookup>> {
        match candidate {
            Some((e, tier)) if e.is_servable(now) => {
                self.inner.stats.stale_served(reason);
                tracing::info!(key, %tier, %reason, "serving a stale copy");
                self.inner.events.emit(Event::StaleServed {
                    key: key.to_owned(),
                    tier,
                    reason,
                });
                // A candidate is never fresh for this read (else it would have been served).
                Ok(self.served(&e, tier, Freshness::Stale { reason }, now))
            }
            _ => Err(Error::Unavailable {
                key: key.to_owned(),
                reason,
                source,
            }),
        }
    }

    /// A key's undelivered write-behind write, read back from the outbox: a put is served (and
    /// held in L1 again), a delete reads as "not found".
    pub(super) async fn serve_pending(
        &self,
        key: &str,
        op: OutboxOp,
        token: u64,
        now: u64,
    ) -> Option<Lookup> {
        let inner = &*self.inner;
        let tier = if inner.memory_queue.is_some() {
            Tier::L1
        } else {
            Tier::L2
        };
        // Counted as the L2 step's hit whichever outbox held it: the read's L1 miss is already
        // counted, and a pending write stands in for L2 (the memory outbox shadows it).
        inner.stats.hit(Tier::L2);
        let OutboxOp::Put(value) = op else {
            return None;
        };
        let fresh_until = add(now, inner.settings.ttl);
        let entry = Arc::new(Entry::new(
            Some(value),
            None,
            now,
            fresh_until,
            add(fresh_until, inner.settings.stale_ttl),
        ));
        let served = self.served(&entry, tier, Freshness::Fresh, now);
        self.promote(key, None, entry, token).await;
        served
    }

    #[inline]
    pub(super) fn served(
        &self,
        e: &Entry,
        tier: Tier,
        freshness: Freshness,
        now: u64,
    ) -> Option<Lookup> {
        match &e.value {
            Some(value) => Some(Lookup {
                value: value.clone(),
                tier,
                freshness,
                age: Duration::from_millis(now.saturating_sub(e.stored_at)),
                validator: e.validator.clone(),
            }),
            None => {
                // A cached "not found" answered the read; the source's own 404 is an L3 miss.
                if tier != Tier::L3 {
                    self.inner.stats.negative_hit();
                }
                None
            }
        }
    }

    /// Reads `key` and decodes it from JSON. A value that fails to decode is an error for this
    /// call and is counted; the entry stays cached (a type mismatch is the caller's error, and
    /// another reader may expect another type).
    ///
    /// # Errors
    /// As [`get`](Self::get), and [`Error::Decode`].
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let Some(bytes) = self.get(key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            // The caller asked for a type the value is not: the caller's error, and the entry
            // stays (it may be right for another reader).
            self.inner.stats.decode_error();
            Error::Decode {
                key: key.to_owned(),
                message: e.to_string(),
            }
        })
    }
}
