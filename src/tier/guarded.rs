//! L2 behind circuit breakers: a [`Store`] that wraps any [`Store`] (the SQLite tier, or one
//! given to [`TieredCacheBuilder::store`](crate::TieredCacheBuilder::store)). When the database fails
//! (disk full, I/O error, locked too long, corrupt), a breaker opens and calls fail at once, so
//! the cache carries on through L1 and L3; after the recovery timeout one call probes the
//! database and a success closes the breaker again.
//!
//! Reads and writes have a breaker each: a full disk refuses writes but still serves reads, and
//! read successes must not hide a run of failed writes.
//!
//! While both breakers are closed with no failure counted, calls bypass them (an L2 hit is a few
//! microseconds; two breaker locks per call were a measurable part of it). The first failure
//! switches back to the breakers, which then count consecutive failures as usual. The
//! failure-rate rule sees only calls made while unhealthy, so the L2 policy relies on
//! consecutive failures.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;

use super::{
    EntrySink, EntryStore, FillGuard, FillLease, Found, Merged, MetaUpdate, OutboxOp, OutboxRow,
    OutboxStore, Resolved, StateStore, Store, StoreSummary, StoredEntry,
};
use crate::breaker::{BreakerPolicy, BreakerStatus, CircuitBreaker, Outcome};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::event::Events;
use crate::lookup::Tier;

#[derive(Debug)]
pub(crate) struct Guarded {
    inner: Arc<dyn Store>,
    reads: CircuitBreaker,
    writes: CircuitBreaker,
    /// Both breakers closed with no failure counted: calls skip the breakers (their locks) until
    /// a call fails.
    healthy: AtomicBool,
    events: Events,
    last_error: Mutex<Option<String>>,
}

impl Guarded {
    pub(crate) fn new(
        inner: Arc<dyn Store>,
        policy: BreakerPolicy,
        clock: Arc<dyn Clock>,
        events: Events,
    ) -> Self {
        Self {
            inner,
            reads: CircuitBreaker::new(policy.clone(), clock.clone()).named("l2-read"),
            writes: CircuitBreaker::new(policy, clock).named("l2-write"),
            healthy: AtomicBool::new(true),
            events,
            last_error: Mutex::new(None),
        }
    }

    /// The read and write breakers' status.
    pub(crate) fn status(&self) -> (BreakerStatus, BreakerStatus) {
        (self.reads.status(), self.writes.status())
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn read<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        self.call(&self.reads, op).await
    }

    async fn write<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        self.call(&self.writes, op).await
    }

    async fn call<T>(
        &self,
        breaker: &CircuitBreaker,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        if self.healthy.load(Ordering::Relaxed) {
            let result = op.await;
            self.after_healthy_call(breaker, &result);
            return result;
        }
        let permit = breaker.try_acquire().map_err(|r| Error::Storage {
            message: format!("L2 is bypassed after repeated failures ({r})"),
            source: None,
        })?;
        self.events.transition(Tier::L2, permit.transition(), None);
        let started = Instant::now();
        let result = op.await;
        let outcome = match &result {
            Ok(_) => Outcome::success(started.elapsed()),
            Err(e) if e.is_storage() => {
                let msg = e.to_string();
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
                Outcome::Failure
            }
            Err(_) => Outcome::Cancelled,
        };
        let mut t = breaker.complete(permit, outcome);
        if matches!(&result, Err(e) if e.is_disk_full()) {
            // A full disk does not pass in the next few calls: stop writing now.
            t = breaker.trip().or(t);
        }
        let error = self.last_error();
        self.events.transition(Tier::L2, t, error.as_deref());
        if result.is_ok() && self.reads.is_clean() && self.writes.is_clean() {
            self.healthy.store(true, Ordering::Relaxed);
        }
        result
    }

    /// Counts a failure outside a permit (a healthy-path call that failed).
    /// The outcome of a call made on the healthy fast path: the first storage failure after a
    /// healthy run is counted, and calls go through the breakers from then on.
    fn after_healthy_call<T>(&self, breaker: &CircuitBreaker, result: &Result<T>) {
        if let Err(e) = result {
            if e.is_storage() {
                self.healthy.store(false, Ordering::Relaxed);
                self.record_failure(breaker, e);
            }
        }
    }

    fn record_failure(&self, breaker: &CircuitBreaker, e: &Error) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        let mut t = breaker.record_failure();
        if e.is_disk_full() {
            t = breaker.trip().or(t);
        }
        let error = self.last_error();
        self.events.transition(Tier::L2, t, error.as_deref());
    }
}

#[async_trait]
impl EntryStore for Guarded {
    fn invalidations(&self) -> Option<crate::tier::Invalidations> {
        self.inner.invalidations()
    }

    async fn get(&self, key: &str) -> Result<Option<StoredEntry>> {
        self.read(self.inner.get(key)).await
    }

    fn get_now(&self, key: &str) -> Option<Result<Option<StoredEntry>>> {
        // Only on the healthy fast path of `call`, with its failure handling; a tripped or
        // probing breaker goes through `get` and its permit.
        if !self.healthy.load(Ordering::Relaxed) {
            return None;
        }
        let result = self.inner.get_now(key)?;
        self.after_healthy_call(&self.reads, &result);
        Some(result)
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Found> {
        self.read(self.inner.get_many(keys)).await
    }

    async fn put(&self, key: &str, entry: StoredEntry) -> Result<()> {
        self.write(self.inner.put(key, entry)).await
    }

    async fn put_fill(&self, key: &str, entry: StoredEntry, guard: FillGuard) -> Result<bool> {
        self.write(self.inner.put_fill(key, entry, guard)).await
    }

    async fn renew_fill(
        &self,
        key: &str,
        deadlines: (u64, u64, u64),
        guard: FillGuard,
    ) -> Result<bool> {
        self.write(self.inner.renew_fill(key, deadlines, guard))
            .await
    }

    async fn remove_settled(&self, key: &str, settled_id: i64) -> Result<()> {
        self.write(self.inner.remove_settled(key, settled_id)).await
    }

    async fn remove(&self, key: &str) -> Result<()> {
        self.write(self.inner.remove(key)).await
    }

    fn touch(&self, key: &str, now: u64) {
        if self.healthy.load(Ordering::Relaxed) || self.writes.allows_request() {
            self.inner.touch(key, now);
        }
    }

    async fn summary(&self, now: u64) -> Result<StoreSummary> {
        self.read(self.inner.summary(now)).await
    }

    async fn snapshot(&self, prefix: &str, sink: EntrySink) -> Result<()> {
        self.read(self.inner.snapshot(prefix, sink)).await
    }

    async fn merge(&self, entries: Vec<(String, StoredEntry)>) -> Result<Vec<Merged>> {
        self.write(self.inner.merge(entries)).await
    }

    /// Only while L2 is healthy, never through a breaker's permit: a lease is an optimization,
    /// so it must not be a breaker's probe (the no-op answer of a store without leases would
    /// close it), and an unhealthy L2 is not waited on (loads go on with the process's own
    /// single-flight). A failure counts as on the healthy path of any call.
    async fn fill_lease(&self, key: &str, lease: std::time::Duration) -> Result<FillLease> {
        if !self.healthy.load(Ordering::Relaxed) {
            return Ok(FillLease::Unsupported);
        }
        let result = self.inner.fill_lease(key, lease).await;
        self.after_healthy_call(&self.writes, &result);
        result
    }

    /// As `fill_lease`: skipped while L2 is unhealthy (the lease then runs out).
    async fn release_fill_lease(&self, key: &str, token: u64) -> Result<()> {
        if !self.healthy.load(Ordering::Relaxed) {
            return Ok(());
        }
        let result = self.inner.release_fill_lease(key, token).await;
        self.after_healthy_call(&self.writes, &result);
        result
    }
}

#[async_trait]
impl OutboxStore for Guarded {
    async fn enqueue(
        &self,
        key: &str,
        entry: Option<StoredEntry>,
        op: OutboxOp,
        now: u64,
    ) -> Result<i64> {
        self.write(self.inner.enqueue(key, entry, op, now)).await
    }

    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        self.read(self.inner.outbox_pending(limit)).await
    }

    async fn outbox_newest(&self, key: &str) -> Result<Option<OutboxOp>> {
        self.read(self.inner.outbox_newest(key)).await
    }

    async fn outbox_summary(&self) -> Result<(u64, Vec<(String, String)>)> {
        self.read(self.inner.outbox_summary()).await
    }

    async fn outbox_complete(&self, ids: Vec<i64>) -> Result<()> {
        self.write(self.inner.outbox_complete(ids)).await
    }

    async fn outbox_failed(
        &self,
        ids: Vec<i64>,
        next_attempt: u64,
        error: String,
        dead: bool,
    ) -> Result<()> {
        self.write(self.inner.outbox_failed(ids, next_attempt, error, dead))
            .await
    }

    async fn dead_letters(&self) -> Result<Vec<OutboxRow>> {
        self.read(self.inner.dead_letters()).await
    }

    async fn resolve_dead_letter(&self, id: i64, retry: bool) -> Result<Resolved> {
        self.write(self.inner.resolve_dead_letter(id, retry)).await
    }

    async fn supersede_dead(&self, key: &str) -> Result<()> {
        self.write(self.inner.supersede_dead(key)).await
    }
}

#[async_trait]
impl StateStore for Guarded {
    async fn load_meta(&self, name: &str) -> Result<Option<String>> {
        self.read(self.inner.load_meta(name)).await
    }

    async fn update_meta(&self, name: &str, update: MetaUpdate) -> Result<Option<String>> {
        self.write(self.inner.update_meta(name, update)).await
    }
}
