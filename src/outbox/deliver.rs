//! Delivery: rounds over the pending rows, one delivery per key (the last of its writes), the
//! local tiers brought in line with what settled, retry backoff, and the background loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::sync::{watch, Notify};

use super::{LocalTiers, Queue};
use crate::clock::{millis, Clock};
use crate::entry::Entry;
use crate::error::Result;
use crate::event::{Event, Events};
use crate::source::guard::{guarded, is_not_sent, SourceGuard};
use crate::source::{Source, SourceError};
use crate::tier::{OutboxOp, OutboxRow};

/// Why a delivery was held back without being sent.
const NOT_SENT: &str = "offline mode is on (or the cache is closed): not sent";

/// Rows read per delivery round.
const ROUND_ROWS: usize = 4096;
/// Keys delivered at once.
const DELIVERY_CONCURRENCY: usize = 8;
/// Delivered rows removed per statement.
const COMPLETE_BATCH: usize = 64;

/// The outcome of delivering one key.
enum Delivery {
    /// The ids of the rows settled by the delivery.
    Delivered(Vec<i64>),
    Retry(String),
    Dead(String),
    /// The source was not called (breaker open, rate limited until later).
    Held(String),
}

pub(super) struct Deliverer {
    pub(super) queue: Arc<dyn Queue>,
    pub(super) source: Arc<dyn Source>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) retry_base: Duration,
    pub(super) retry_max: Duration,
    pub(super) guard: Arc<SourceGuard>,
    pub(super) events: Events,
    pub(super) timeout: Duration,
    pub(super) delivered: AtomicU64,
    pub(super) retries: AtomicU64,
    /// Offline mode: nothing is sent.
    pub(super) offline: Arc<AtomicBool>,
    /// Set when the cache is dropped or closed: nothing more is sent.
    pub(super) stopped: AtomicBool,
    /// The cache's tiers, kept in step with what delivery settles.
    pub(super) tiers: LocalTiers,
    /// Serializes rounds so a flush and the background task never deliver one key twice at once.
    pub(super) round: tokio::sync::Mutex<()>,
}

#[derive(Default)]
pub(super) struct Round {
    pub(super) attempted: usize,
    pub(super) delivered: u64,
    pub(super) dead_lettered: u64,
    pub(super) stuck: Vec<(String, String)>,
    /// The earliest time a key held back by its retry delay becomes due (ms).
    pub(super) next_due: Option<u64>,
}

impl Deliverer {
    pub(super) async fn round(&self, ignore_delays: bool) -> Result<Round> {
        let _one_at_a_time = self.round.lock().await;
        let rows = self.queue.pending(ROUND_ROWS).await?;
        let now = self.clock.now_millis();
        // Group by key, in order of each key's oldest row.
        let mut order: Vec<String> = Vec::new();
        let mut by_key: HashMap<String, Vec<OutboxRow>> = HashMap::new();
        for r in rows {
            if !by_key.contains_key(&r.key) {
                order.push(r.key.clone());
            }
            by_key.entry(r.key.clone()).or_default().push(r);
        }
        let mut round = Round::default();
        let mut due = Vec::new();
        for key in order {
            let rows = by_key.remove(&key).unwrap_or_default();
            let next = rows.iter().map(|r| r.next_attempt).max().unwrap_or(0);
            if !ignore_delays && next > now {
                round.next_due = Some(round.next_due.map_or(next, |d| d.min(next)));
                continue;
            }
            due.push((key, rows));
        }
        round.attempted = due.len();
        let mut outcomes = std::pin::pin!(stream::iter(due)
            .map(|(key, rows)| async move {
                let d = self.deliver(&key, rows).await;
                (key, d)
            })
            .buffer_unordered(DELIVERY_CONCURRENCY));
        // Delivered rows are removed in batches: one statement per batch, not one per key. A
        // crash before a batch is removed only means those writes are sent again (delivery is
        // idempotent). A batch's removal runs beside the deliveries that follow (it waits for
        // a commit of the writer, behind the callers' writes): awaited in line, it held every
        // delivery up for a commit each 64 rows, and under a steady load of writes the outbox
        // grew faster than it drained. The round ends once every removal is done.
        let mut delivered: Vec<i64> = Vec::new();
        let mut completing = stream::FuturesUnordered::new();
        loop {
            let (key, outcome) = tokio::select! {
                Some(done) = completing.next(), if !completing.is_empty() => {
                    done?;
                    continue;
                }
                next = outcomes.next() => match next {
                    Some(next) => next,
                    None => break,
                },
            };
            match outcome? {
                Delivery::Delivered(ids) => {
                    round.delivered += ids.len() as u64;
                    delivered.extend(ids);
                    if delivered.len() >= COMPLETE_BATCH {
                        completing.push(self.complete(std::mem::take(&mut delivered)));
                    }
                }
                Delivery::Dead(e) => {
                    round.dead_lettered += 1;
                    tracing::error!(key, error = %e, "write-behind: the source refused a write for good; kept as a dead letter");
                }
                Delivery::Retry(e) | Delivery::Held(e) => {
                    tracing::warn!(key, error = %e, "write-behind: delivery failed; will retry");
                    round.stuck.push((key, e));
                }
            }
        }
        completing.push(self.complete(delivered));
        while let Some(done) = completing.next().await {
            done?;
        }
        round.stuck.sort();
        Ok(round)
    }

    /// Removes delivered rows.
    async fn complete(&self, ids: Vec<i64>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let n = ids.len() as u64;
        self.queue.complete(ids).await?;
        self.delivered.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Delivers the last of `rows` (all of one key, oldest first); on success the caller removes
    /// them all.
    async fn deliver(&self, key: &str, rows: Vec<OutboxRow>) -> Result<Delivery> {
        let Some(last) = rows.last() else {
            return Ok(Delivery::Delivered(Vec::new()));
        };
        if !self.may_send() {
            return Ok(Delivery::Held(NOT_SENT.into()));
        }
        let attempts = rows.iter().map(|r| r.attempts).max().unwrap_or(0) + 1;
        let call = async {
            let r = match &last.op {
                OutboxOp::Put(v) => self.source.put(key, v).await,
                OutboxOp::Delete => match self.source.delete(key).await {
                    Err(SourceError::NotFound { .. }) => Ok(()),
                    other => other,
                },
            };
            // Dated when the source took it, not after the breaker's bookkeeping.
            r.map(|()| self.clock.now_millis())
        };
        // The offline and stop switches are checked again right before the call is sent
        // (waiting for the breaker's permit takes time): I3.
        let result = guarded(&self.guard, self.timeout, || self.may_send(), call).await;
        let now = self.clock.now_millis();
        match result {
            Ok(accepted_at) => {
                self.settled(key, last.id, Some(&last.op), accepted_at)
                    .await;
                Ok(Delivery::Delivered(ids(&rows)))
            }
            // Not sent after all (offline or closed at the last moment). An answer that did come
            // back (a refusal, say) is recorded below whatever the switches say now.
            Err(e) if is_not_sent(&e) => Ok(Delivery::Held(NOT_SENT.into())),
            // Not sent: the breaker is open. Nothing to record; the key waits its turn.
            Err(e @ SourceError::CircuitOpen { .. }) => Ok(Delivery::Held(e.to_string())),
            Err(e) if e.is_transient() => {
                let mut next = now + self.backoff(attempts);
                if let Some(until) = e.rate_limited_until() {
                    next = next.max(crate::clock::to_millis(until));
                }
                let msg = crate::error::chain_text(&e);
                self.retries.fetch_add(1, Ordering::Relaxed);
                self.queue
                    .failed(ids(&rows), next, msg.clone(), false)
                    .await?;
                Ok(Delivery::Retry(msg))
            }
            Err(e) => {
                let msg = crate::error::chain_text(&e);
                // Refused: the source's value stands (I1). Unless a newer write of the key is
                // pending, the local copy of the refused write goes: L1 now and again after
                // (a read racing this may have promoted it), L2 with the dead letter in one step.
                // Until the last L1 drop, no read puts the key into any L1 (the settling mark).
                let _settling = self.tiers.fences.settling(key);
                self.tiers.fences.bump(key);
                self.tiers.l1.remove(key).await;
                if self.tiers.memory_mode {
                    // The memory outbox's dead letter ends the pending write's shadow over L2 at
                    // once (no transaction binds them): L2's older copy goes first.
                    if let Err(e) = self.tiers.l2.remove(key).await {
                        tracing::warn!(key, error = %e, "write-behind: could not drop the L2 copy of a refused write's key");
                    }
                }
                self.queue
                    .failed(ids(&rows), now, msg.clone(), true)
                    .await?;
                self.settled(key, last.id, None, now).await;
                self.events.emit(Event::DeadLetter {
                    key: key.to_owned(),
                    error: msg.clone(),
                });
                Ok(Delivery::Dead(msg))
            }
        }
    }

    fn may_send(&self) -> bool {
        !self.offline.load(Ordering::SeqCst) && !self.stopped.load(Ordering::SeqCst)
    }

    /// Brings the local tiers in line with a settled write (`id`: its newest row): `Some(op)`
    /// delivered, `None` refused (the local copy goes unless a newer write of the key is
    /// pending; the next read asks the source). A delivered delete runs before its rows are
    /// removed, so a read never finds neither the row nor the settled state.
    async fn settled(&self, key: &str, id: i64, delivered: Option<&OutboxOp>, now: u64) {
        let t = &self.tiers;
        let written = match delivered {
            Some(OutboxOp::Put(value)) if t.memory_mode => {
                t.fences.bump(key);
                let fresh_until = now.saturating_add(t.ttl);
                let entry = Entry::new(
                    Some(value.clone()),
                    None,
                    now,
                    fresh_until,
                    fresh_until.saturating_add(t.stale_ttl),
                );
                t.l2.put(key, entry).await
            }
            // The durable outbox wrote the entry with the row.
            Some(OutboxOp::Put(_)) => return,
            Some(OutboxOp::Delete) | None => {
                t.fences.bump(key);
                t.l1.remove(key).await;
                let removed = match (t.memory_mode, delivered) {
                    // A newer write in the memory outbox shadows L2 until it is delivered.
                    (true, _) => t.l2.remove(key).await,
                    // The refusal removed the entry with the dead letter.
                    (false, None) => Ok(()),
                    (false, Some(_)) => t.l2.remove_settled(key, id).await,
                };
                // And again once L2 is changed: a fill that began meanwhile may have read the
                // old row (see `tier::fence`).
                t.fences.bump(key);
                t.l1.remove(key).await;
                removed
            }
        };
        if let Err(e) = written {
            tracing::warn!(key, error = %e, "write-behind: could not update L2 after a delivery");
        }
        // The other caches of this process on the file drop their copy too.
        t.fences.spread(t.peer_id, key).await;
    }

    /// Exponential backoff with full jitter in the upper half: base·2^(n-1), capped, times a
    /// random factor in [0.5, 1.0].
    fn backoff(&self, attempts: u32) -> u64 {
        let base = millis(self.retry_base);
        let max = millis(self.retry_max);
        let exp = base.saturating_mul(1u64 << attempts.saturating_sub(1).min(32));
        let capped = exp.min(max);
        capped / 2 + fastrand::u64(0..=capped / 2)
    }
}

fn ids(rows: &[OutboxRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

pub(super) async fn run(
    deliverer: Arc<Deliverer>,
    notify: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if *stop.borrow() {
            return;
        }
        wait = match deliverer.round(false).await {
            Ok(round) => {
                let now = deliverer.clock.now_millis();
                match (round.next_due, round.stuck.is_empty()) {
                    (Some(due), _) => {
                        Duration::from_millis(due.saturating_sub(now).clamp(10, 60_000))
                    }
                    (None, false) => deliverer.retry_base,
                    (None, true) => Duration::from_secs(3600),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "write-behind: could not read the outbox");
                deliverer.retry_base
            }
        };
    }
}
