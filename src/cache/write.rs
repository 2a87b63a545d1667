//! Writes: the strategies (`set`, `delete`, `invalidate`), one write path for the library and the CLI.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;

impl TieredCache {
    // ---------------------------------------------------------------- writes

    /// Writes `value` under `key` with the default TTL, following the strategy.
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; under write-through, the source's refusal (the caches are left
    /// untouched); under write-behind, [`Error::Storage`] when the write could not be made
    /// durable (it is then not acknowledged).
    pub async fn set(&self, key: &str, value: impl Into<Bytes>) -> Result<()> {
        self.set_entry(key, value.into(), None).await
    }

    /// [`set`](Self::set) with its own TTL.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_with_ttl(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<()> {
        self.set_entry(key, value.into(), Some(millis(ttl))).await
    }

    /// Encodes `value` as JSON and [`set`](Self::set)s it.
    ///
    /// # Errors
    /// As [`set`](Self::set), and [`Error::Encode`].
    pub async fn set_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Encode {
            key: key.to_owned(),
            message: e.to_string(),
        })?;
        self.set(key, bytes).await
    }

    pub(super) async fn set_entry(&self, key: &str, value: Bytes, ttl: Option<u64>) -> Result<()> {
        self.check(key)?;
        let span = tracing::debug_span!(
            "tiercache.set",
            key,
            strategy = self.inner.settings.strategy.as_str()
        );
        in_span!(span, self.set_checked(key, value, ttl))
    }

    pub(super) async fn set_checked(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<u64>,
    ) -> Result<()> {
        let inner = &*self.inner;
        // Sampled, like L1 hits: a memory-mode set costs about a moka insert.
        let timer = inner.stats.start_sampled();
        let now = self.now();
        let fresh_until = add(now, ttl.unwrap_or(inner.settings.ttl));
        let entry = Entry::new(
            Some(value.clone()),
            None,
            now,
            fresh_until,
            add(fresh_until, inner.settings.stale_ttl),
        );
        if inner.settings.strategy == Strategy::WriteThrough {
            // L3 first; refused → error, the caches untouched.
            self.write_source(key, Some(&value)).await?;
        }
        // Before any tier changes: a fill or promotion that raced this write stays out (I1).
        let token = inner.fences.bump(key);
        match inner.settings.strategy {
            Strategy::ReadThrough | Strategy::CacheAside | Strategy::WriteThrough => {
                self.put_l2(key, entry.clone()).await
            }
            // The memory outbox is a plain push: no boxed future, no copy of the entry.
            Strategy::WriteBehind => match &inner.memory_queue {
                Some(queue) => queue.push(key, OutboxOp::Put(value), now),
                None => {
                    self.outbox()?
                        .queue()
                        .enqueue(key, Some(entry.clone()), OutboxOp::Put(value), now)
                        .await?;
                }
            },
        }
        // L2 holds the write: a fill that began while it was under way stays out too (I1).
        let token = inner.fences.bump_again(key, token);
        inner.l1.insert(key, Arc::new(entry)).await;
        // The flusher may have settled this write already (it is in the outbox from the enqueue
        // on): a refusal cleared L1 before this insert, so the copy must go (a refused write is
        // never served: I1). Any write of the key since the first bump moved the fence.
        if inner.settings.strategy == Strategy::WriteBehind
            && !token.is_some_and(|t| inner.fences.unchanged(key, t))
        {
            inner.l1.remove(key).await;
        }
        if let Some(outbox) = &inner.outbox {
            outbox.notify();
        }
        // This process's other caches on the file drop their older copy (I1).
        inner.fences.spread(inner.peer_id, key).await;
        inner.stats.record(Tier::L1, Op::Set, timer);
        Ok(())
    }

    /// Deletes `key`, following the strategy.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.check(key)?;
        let inner = &*self.inner;
        let timer = inner.stats.start();
        if inner.settings.strategy == Strategy::WriteThrough {
            self.write_source(key, None).await?;
        }
        inner.fences.bump(key);
        match inner.settings.strategy {
            Strategy::ReadThrough | Strategy::CacheAside | Strategy::WriteThrough => {
                self.remove_l2(key).await
            }
            Strategy::WriteBehind => {
                let now = self.now();
                self.outbox()?
                    .queue()
                    .enqueue(key, None, OutboxOp::Delete, now)
                    .await?;
                if inner.memory_queue.is_some() {
                    // The memory outbox does not write L2: drop the old copy here.
                    self.remove_l2(key).await;
                }
            }
        }
        // L2 holds the delete: a fill that began while it was under way stays out too (I1).
        inner.fences.bump(key);
        inner.l1.remove(key).await;
        if let Some(outbox) = &inner.outbox {
            outbox.notify();
        }
        inner.fences.spread(inner.peer_id, key).await;
        inner.stats.record(Tier::L1, Op::Delete, timer);
        Ok(())
    }

    /// Drops `key` from L1 and L2 without telling the source.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], [`Error::Storage`].
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        self.check(key)?;
        self.inner.forget(key).await
    }

    pub(super) async fn remove_l2(&self, key: &str) {
        if let Err(e) = self.inner.l2.remove(key).await {
            self.inner.stats.error(Tier::L2);
            tracing::warn!(key, error = %e, "L2 delete failed");
        }
    }

    pub(super) async fn put_l2(&self, key: &str, entry: Entry) {
        if let Err(e) = self.inner.l2.put(key, entry).await {
            self.inner.stats.error(Tier::L2);
            tracing::warn!(key, error = %e, "L2 write failed; the value is held in L1 only");
        }
    }

    pub(super) fn outbox(&self) -> Result<&Outbox> {
        self.inner.outbox.as_ref().ok_or(Error::Closed)
    }

    /// Write-through: the source first.
    pub(super) async fn write_source(&self, key: &str, value: Option<&Bytes>) -> Result<()> {
        let inner = &*self.inner;
        if self.is_offline() {
            return Err(Self::offline_error(key));
        }
        let call = async {
            match value {
                Some(v) => inner.source.put(key, v).await,
                None => inner.source.delete(key).await,
            }
        };
        let offline = inner.offline.clone();
        guarded(
            &inner.guard,
            inner.settings.timeout,
            || !offline.load(Ordering::SeqCst),
            call,
        )
        .await
        .map_err(|e| source_failure(key, e))?;
        // The source took a newer write: older dead letters of the key must not be retried.
        if let Some(outbox) = &inner.outbox {
            if let Err(e) = outbox.queue().supersede(key).await {
                tracing::warn!(key, error = %e, "could not mark the key's dead letters superseded");
            }
        }
        Ok(())
    }
}

impl Inner {
    /// Drops every local copy of `key`: the fence first (a fill or promotion that raced this
    /// stays out), L1, L2, and this process's other caches on the file (I1).
    pub(super) async fn forget(&self, key: &str) -> Result<()> {
        self.fences.bump(key);
        self.l1.remove(key).await;
        let removed = self.l2.remove(key).await;
        // And again once L2 is changed: a fill that began meanwhile may have read the old row.
        self.fences.bump(key);
        self.l1.remove(key).await;
        self.fences.spread(self.peer_id, key).await;
        removed
    }
}
