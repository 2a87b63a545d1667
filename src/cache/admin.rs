//! Administration: write-behind flush and dead letters, close, stats, health, breakers (warm
//! and refresh: `warm.rs`).

use std::sync::atomic::Ordering;

use super::*;

use crate::tier::Resolved;

impl TieredCache {
    // ---------------------------------------------------------------- write-behind

    /// Delivers the write-behind outbox now: one attempt for every pending key, ignoring retry
    /// delays. Returns what was delivered and what is stuck, and why.
    ///
    /// Under other strategies there is no outbox and the report is empty.
    ///
    /// # Errors
    /// [`Error::Storage`] when the outbox cannot be read.
    pub async fn flush(&self) -> Result<FlushReport> {
        match &self.inner.outbox {
            Some(outbox) => outbox.flush().await,
            None => Ok(FlushReport::default()),
        }
    }

    /// Writes the source refused for good, kept until retried or discarded.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        let Some(outbox) = &self.inner.outbox else {
            return Ok(Vec::new());
        };
        Ok(outbox
            .queue()
            .dead_letters()
            .await?
            .into_iter()
            .map(DeadLetter::from)
            .collect())
    }

    /// Moves a dead letter back into the outbox for another attempt. Returns whether it existed.
    /// Until it is delivered (or refused again) the key reads as the retried write.
    ///
    /// # Errors
    /// [`Error::Superseded`] when a newer write of the key came after it (delivering it would
    /// roll the source back; it stays a dead letter: discard it); [`Error::Storage`].
    pub async fn retry_dead_letter(&self, id: i64) -> Result<bool> {
        let Some(outbox) = &self.inner.outbox else {
            return Ok(false);
        };
        let queue = outbox.queue();
        let dead = queue.dead_letters().await?;
        let Some(key) = dead.into_iter().find(|r| r.id == id).map(|r| r.key) else {
            return Ok(false);
        };
        match queue.resolve(id, true).await? {
            Resolved::Missing => Ok(false),
            Resolved::Done => {
                // Pending again: what was cached while it was dead (the source's answer) must
                // not be served over it (I1). The durable store removed the L2 entry with the
                // row's change; the local copies go now, and the fence bump keeps out a fill
                // that read them before.
                if let Err(e) = self.inner.forget(&key).await {
                    tracing::warn!(key, error = %e, "could not drop the L2 copy of a retried write's key");
                }
                outbox.notify();
                Ok(true)
            }
            Resolved::Superseded(key) => Err(Error::Superseded { id, key }),
        }
    }

    /// Deletes a dead letter for good. Returns whether it existed.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn discard_dead_letter(&self, id: i64) -> Result<bool> {
        match &self.inner.outbox {
            Some(outbox) => Ok(outbox.queue().resolve(id, false).await? == Resolved::Done),
            None => Ok(false),
        }
    }

    /// The write-behind backlog: pending writes, dead letters, and the oldest pending write's
    /// age in ms. `None` under other strategies (or when L2 cannot be read).
    pub(super) async fn backlog(&self) -> Option<BacklogHealth> {
        let inner = &*self.inner;
        inner.outbox.as_ref()?;
        let now = self.now();
        let (pending, dead_letters, oldest) = match &inner.memory_queue {
            Some(q) => q.depth(),
            None => {
                let s = inner.l2.summary(now).await.ok()?;
                (s.outbox_depth, s.dead_letters, s.oldest_pending_ms)
            }
        };
        Some(BacklogHealth {
            pending,
            dead_letters,
            oldest_pending_age_ms: oldest.map(|t| now.saturating_sub(t)),
        })
    }

    /// Flushes the outbox (within the close timeout), then stops the background tasks (and
    /// waits, within the close timeout, for background refreshes under way to end). What is
    /// left stays in the database for the next open. Later calls fail with [`Error::Closed`].
    ///
    /// # Errors
    /// [`Error::Storage`] when the outbox cannot be read.
    pub async fn close(&self) -> Result<FlushReport> {
        let write_behind = self.inner.settings.strategy == Strategy::WriteBehind;
        let report = match &self.inner.outbox {
            Some(outbox) if write_behind => {
                let flushed =
                    tokio::time::timeout(self.inner.settings.close_timeout, outbox.flush()).await;
                outbox.stop();
                let report = match flushed {
                    Ok(r) => r?,
                    Err(_) => outbox.report_pending().await?,
                };
                self.forget_lost_writes().await;
                report
            }
            _ => FlushReport::default(),
        };
        self.inner.closed.store(true, Ordering::Relaxed);
        // Ends the task applying other instances' writes to L1.
        drop(
            self.inner
                .stop_invalidations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        // Refreshes not yet sent see the cache closed and stop; those under way finish (each
        // within the source timeout).
        let _ =
            tokio::time::timeout(self.inner.settings.close_timeout, self.background_idle()).await;
        Ok(report)
    }

    /// The memory outbox loses what `close` could not deliver. Its keys' L2 copies predate
    /// those writes (the memory outbox writes L2 only on delivery) and may be older than what
    /// the source holds now: they go, so the next open asks the source (I1).
    async fn forget_lost_writes(&self) {
        let inner = &*self.inner;
        let Some(queue) = &inner.memory_queue else {
            return;
        };
        for key in queue.keys() {
            if let Err(e) = inner.forget(&key).await {
                tracing::warn!(key, error = %e, "could not drop the L2 copy of an undelivered write");
            }
        }
    }

    // ---------------------------------------------------------------- introspection

    /// A snapshot of the stats: per-tier hits, misses, errors and latency percentiles, stale
    /// serves by reason, source calls by outcome, the rate-limit budget, the breakers and the
    /// write-behind backlog.
    pub async fn stats(&self) -> StatsSnapshot {
        let inner = &*self.inner;
        let breaker = |name: &str, s: crate::breaker::BreakerStatus| crate::stats::BreakerStats {
            name: name.to_owned(),
            state: s.state.as_str().to_owned(),
            transitions: s.transitions,
            consecutive_failures: s.consecutive_failures,
            next_attempt: s.next_attempt,
            open_until: s.open_until,
        };
        let mut outbox = crate::stats::OutboxStats::default();
        if let Some(o) = &inner.outbox {
            (outbox.delivered, outbox.retries) = o.counters();
        }
        if let Some(b) = self.backlog().await {
            outbox.depth = b.pending;
            outbox.dead_letters = b.dead_letters;
            outbox.oldest_pending_age_ms = b.oldest_pending_age_ms;
        }
        inner.stats.snapshot(SnapshotExtras {
            rate_limit: inner.source.rate_limit(),
            breakers: vec![
                breaker("l2_read", inner.l2_guard.status().0),
                breaker("l2_write", inner.l2_guard.status().1),
                breaker("l3", inner.guard.status()),
            ],
            outbox,
        })
    }

    /// Whether each tier is working: breaker states, last errors, the write-behind backlog.
    /// The L3 breaker is re-read from the database first, so another process's trip shows.
    pub async fn health(&self) -> HealthReport {
        let inner = &*self.inner;
        inner.guard.refresh().await;
        let (reads, writes) = inner.l2_guard.status();
        let mut l2 = TierHealth::from_breakers([reads, writes], inner.l2_guard.last_error());
        // The file deleted or replaced under the cache: every write will fail.
        if let Some(Err(e)) = inner.sqlite.as_ref().map(|s| s.check_file()) {
            l2.status = HealthStatus::Unhealthy;
            l2.last_error = Some(e.to_string());
        }
        let l3 = TierHealth::from_breaker(inner.guard.status(), inner.guard.last_error());
        let backlog = self.backlog().await;
        let listening = inner.listening.as_ref().map(crate::tier::Listening::get);
        HealthReport::overall(l2, l3, self.is_offline(), backlog).with_invalidations(listening)
    }

    /// Sends one real request for `key` to the source, past the caches and the breaker, within
    /// the source timeout, and says how long the source took to answer (a "not found" is an
    /// answer). Nothing is cached, and the breaker is neither consulted nor updated: this is a
    /// health check (`tiercache health --probe KEY`), not a read. Afterwards
    /// [`rate_limit`](Self::rate_limit) holds the budget the source reported, if it reports one.
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; [`Error::Unavailable`] when the source failed, timed out, is
    /// rate-limited or offline mode is on (nothing is sent then); [`Error::Source`] when it
    /// refused the request (e.g. bad credentials: [`Error::kind`] is `unauthorized`).
    pub async fn probe_source(&self, key: &str) -> Result<std::time::Duration> {
        self.check(key)?;
        if self.is_offline() {
            return Err(Self::offline_error(key));
        }
        let inner = &*self.inner;
        let timeout = inner.settings.timeout;
        let started = std::time::Instant::now();
        match tokio::time::timeout(timeout, inner.source.fetch(key, None)).await {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(source_failure(key, e)),
            Err(_) => Err(source_failure(key, SourceError::Timeout { after: timeout })),
        }
    }

    /// Subscribes to significant events: breaker transitions, stale serves, tiers degraded and
    /// recovered, dead letters. A subscriber that falls more than 256 events behind loses the
    /// oldest (see [`tokio::sync::broadcast`](https://docs.rs/tokio/1/tokio/sync/broadcast/index.html)).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::event::Event> {
        self.inner.events.subscribe()
    }

    /// The source breaker's status.
    pub fn source_breaker_status(&self) -> crate::breaker::BreakerStatus {
        self.inner.guard.status()
    }

    /// Forces the source's breaker open: no source calls until [`reset_source_breaker`]
    /// (persisted, so other processes on the same database respect it too).
    ///
    /// [`reset_source_breaker`]: Self::reset_source_breaker
    pub async fn force_source_open(&self) {
        self.inner.guard.apply(BreakerState::force_open).await;
    }

    /// Forces the source's breaker closed: failures are counted but never open it.
    pub async fn force_source_closed(&self) {
        self.inner.guard.apply(BreakerState::force_close).await;
    }

    /// Resets the source's breaker to closed, forgetting failures and rate-limit holds.
    pub async fn reset_source_breaker(&self) {
        self.inner.guard.apply(BreakerState::reset).await;
    }

    /// Zeroes the stats.
    pub fn reset_stats(&self) {
        self.inner.stats.reset();
    }

    /// The full integrity check of the SQLite file (`PRAGMA quick_check`: it reads the whole
    /// file, so it is not made on open, which checks only the header, the schema and each
    /// table's first and last rows). Then the counters behind [`stats`](Self::stats),
    /// [`health`](Self::health) and the byte bound are compared with a count of every row;
    /// if they differ (rows written into the file by other means) they are recounted, with a
    /// warning logged, and the check passes. Runs on a blocking thread with a connection of
    /// its own; the cache goes on serving (writes wait while a recount runs). `Ok` for an
    /// in-memory database or a store given to
    /// [`TieredCacheBuilder::store`](crate::TieredCacheBuilder::store).
    ///
    /// A damaged file is reported, not moved (it is in use): close the cache, then reopen with
    /// [`OnCorrupt::MoveAside`](crate::OnCorrupt::MoveAside) or move it yourself.
    ///
    /// # Errors
    /// [`Error::CorruptDatabase`] with what SQLite found; [`Error::Storage`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache = tiercache::TieredCache::builder().build()?;
    /// cache.check_integrity().await?;
    /// # Ok::<(), tiercache::Error>(()) }).unwrap();
    /// ```
    pub async fn check_integrity(&self) -> Result<()> {
        match &self.inner.sqlite {
            Some(sqlite) => sqlite.check_integrity().await,
            None => Ok(()),
        }
    }

    /// What the L2 database holds: entries, bytes, stale entries, outbox depth, dead letters.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn store_summary(&self) -> Result<StoreSummary> {
        self.inner.l2.summary(self.now()).await
    }

    /// The source's last seen rate-limit budget.
    pub fn rate_limit(&self) -> Option<crate::source::RateLimit> {
        self.inner.source.rate_limit()
    }

    /// Drops everything L1 holds (L2 and the source are untouched): frees memory, or makes the
    /// next reads come from L2.
    pub async fn clear_memory(&self) {
        self.inner.l1.clear().await;
    }

    /// Entries and weighted bytes in L1 (after pending maintenance).
    pub async fn memory_usage(&self) -> (u64, u64) {
        self.inner.l1.run_pending_tasks().await;
        (self.inner.l1.entry_count(), self.inner.l1.weighted_size())
    }

    #[doc(hidden)]
    /// Statements run on L2's read connections so far (tests prove `mget` makes one); 0 for a
    /// store given to the builder.
    pub fn l2_read_statements(&self) -> u64 {
        self.inner
            .sqlite
            .as_ref()
            .map_or(0, |s| s.read_statements())
    }
}
