//! Write-behind delivery: a background flusher that pushes the durable outbox (rows in the L2
//! database) to the source, in per-key order, coalescing pending writes of one key into the last,
//! retrying transient failures with exponential backoff and jitter, and keeping writes the source
//! refuses for good as dead letters.
//!
//! Where pending writes wait is the `queue` module's (the durable queue in the L2 database, or
//! the memory one); delivery rounds, backoff and the background loop are the `deliver` module's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::clock::{from_millis, Clock};
use crate::error::{Error, Result};
use crate::event::Events;
use crate::source::guard::SourceGuard;
use crate::source::Source;
use crate::tier::fence::Fences;
use crate::tier::l2::L2;
use crate::tier::memory::MemoryTier;
use crate::tier::OutboxRow;

mod deliver;
mod queue;

use deliver::{run, Deliverer};
pub(crate) use queue::{DurableQueue, MemoryQueue, Queue};

/// Where pending writes wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OutboxMode {
    /// In the L2 database, in the same transaction as the entry: an acknowledged write survives
    /// a crash (`kill -9`) and is replayed on the next open. The default.
    #[default]
    Durable,
    /// In memory: a `set` costs about a moka insert, but writes not yet delivered are lost if
    /// the process dies, and they are not written to L2 (after delivery, L2 gets the value from
    /// the source on the next read that misses L1). Writes to one key coalesce in memory, so the
    /// backlog holds at most one write per key. For data that can be rebuilt, where write
    /// throughput matters more than safety.
    Memory,
}

/// Rounds one `flush` makes at most (new writes may keep arriving while it works; each round
/// must make progress for the next to run).
const FLUSH_ROUNDS: usize = 64;

/// A write the source refused for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id, for [`retry_dead_letter`](crate::TieredCache::retry_dead_letter) and
    /// [`discard_dead_letter`](crate::TieredCache::discard_dead_letter).
    pub id: i64,
    /// The key.
    pub key: String,
    /// `"put"` or `"delete"`.
    pub op: &'static str,
    /// Delivery attempts made.
    pub attempts: u32,
    /// The source's last error.
    pub error: Option<String>,
    /// When the write was made (RFC 3339 in JSON).
    #[serde(serialize_with = "crate::time::serde_rfc3339::serialize")]
    pub created_at: SystemTime,
    /// A newer write of the key came after this one: retrying it would roll the source back,
    /// so [`retry_dead_letter`](crate::TieredCache::retry_dead_letter) refuses it with
    /// [`Error::Superseded`]; discard it.
    pub superseded: bool,
}

impl From<OutboxRow> for DeadLetter {
    fn from(r: OutboxRow) -> Self {
        Self {
            id: r.id,
            key: r.key,
            op: r.op.name(),
            attempts: r.attempts,
            error: r.last_error,
            created_at: from_millis(r.created_at),
            superseded: r.superseded,
        }
    }
}

/// What a [`flush`](crate::TieredCache::flush) did and what is left.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FlushReport {
    /// Outbox rows delivered (coalesced writes count each).
    pub delivered: u64,
    /// Rows still waiting for delivery.
    pub pending: u64,
    /// Rows moved to the dead letters by this flush.
    pub dead_lettered: u64,
    /// Keys still pending, each with the error of its last attempt.
    pub stuck: Vec<(String, String)>,
}

impl FlushReport {
    /// Whether nothing is left to deliver.
    pub fn is_complete(&self) -> bool {
        self.pending == 0
    }
}

/// The cache's own tiers as the flusher sees them: a settled write changes what its key reads
/// as, so the flusher updates them (behind the key's fence) before it removes the rows.
#[derive(Debug, Clone)]
pub(crate) struct LocalTiers {
    pub(crate) l1: MemoryTier,
    pub(crate) l2: L2,
    pub(crate) fences: Arc<Fences>,
    /// This cache's id among the caches sharing `fences`.
    pub(crate) peer_id: u64,
    /// The memory outbox never wrote L2: a delivered put writes it there.
    pub(crate) memory_mode: bool,
    /// Lifetimes of an entry written for a delivered put (ms).
    pub(crate) ttl: u64,
    pub(crate) stale_ttl: u64,
}

/// How deliveries are timed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retry {
    /// The first retry delay.
    pub(crate) base: Duration,
    /// The longest retry delay.
    pub(crate) max: Duration,
    /// The deadline of one delivery.
    pub(crate) timeout: Duration,
}

/// The write-behind outbox's background flusher.
pub(crate) struct Outbox {
    deliverer: Arc<Deliverer>,
    notify: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    /// Starts the flusher (when `background`), which first replays what an earlier process left pending.
    #[allow(clippy::too_many_arguments)] // Internal; called from one place.
    pub(crate) fn start(
        queue: Arc<dyn Queue>,
        source: Arc<dyn Source>,
        clock: Arc<dyn Clock>,
        guard: Arc<SourceGuard>,
        events: Events,
        retry: Retry,
        offline: Arc<AtomicBool>,
        tiers: LocalTiers,
        background: bool,
    ) -> Result<Self> {
        let handle = if background {
            Some(tokio::runtime::Handle::try_current().map_err(|_| {
                Error::Config(
                    "the write-behind strategy needs a Tokio runtime to run its flusher".into(),
                )
            })?)
        } else {
            None
        };
        let deliverer = Arc::new(Deliverer {
            queue,
            source,
            clock,
            retry_base: retry.base,
            retry_max: retry.max,
            guard,
            events,
            timeout: retry.timeout,
            delivered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            offline,
            stopped: AtomicBool::new(false),
            tiers,
            round: tokio::sync::Mutex::new(()),
        });
        let notify = Arc::new(Notify::new());
        let (stop, stopped) = watch::channel(false);
        let task = handle.map(|h| {
            h.spawn(crate::tier::sqlite::in_background(run(
                deliverer.clone(),
                notify.clone(),
                stopped,
            )))
        });
        Ok(Self {
            deliverer,
            notify,
            stop,
            task: Mutex::new(task),
        })
    }

    /// The outbox's storage.
    pub(crate) fn queue(&self) -> &Arc<dyn Queue> {
        &self.deliverer.queue
    }

    /// Rows delivered and failed attempts since this process started.
    pub(crate) fn counters(&self) -> (u64, u64) {
        (
            self.deliverer.delivered.load(Ordering::Relaxed),
            self.deliverer.retries.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn notify(&self) {
        self.notify.notify_one();
    }

    /// Stops the flusher: from now on nothing is sent (a delivery already on the wire finishes
    /// and is recorded, so no breaker probe slot or row is left half done), and the background
    /// task ends after its current round.
    pub(crate) fn stop(&self) {
        self.deliverer.stopped.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
        self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// One attempt for every pending key, ignoring retry delays; repeated while new writes
    /// arrive and everything goes through.
    pub(crate) async fn flush(&self) -> Result<FlushReport> {
        let mut report = FlushReport::default();
        // Rounds go on while they make progress: after an outage the breaker is half-open and
        // admits a few probes per round, and every success lets more through.
        for _ in 0..FLUSH_ROUNDS {
            let round = self.deliverer.round(true).await?;
            report.delivered += round.delivered;
            report.dead_lettered += round.dead_lettered;
            let progress = round.delivered + round.dead_lettered > 0;
            if round.attempted == 0 || round.stuck.is_empty() && !progress {
                break;
            }
            if !round.stuck.is_empty() && !progress {
                report.stuck = round.stuck;
                break;
            }
        }
        let pending = self.report_pending().await?;
        report.pending = pending.pending;
        if report.stuck.is_empty() {
            report.stuck = pending.stuck;
        }
        Ok(report)
    }

    /// What is pending now, without delivering.
    pub(crate) async fn report_pending(&self) -> Result<FlushReport> {
        let (pending, stuck) = self.deliverer.queue.summary().await?;
        Ok(FlushReport {
            pending,
            stuck,
            ..FlushReport::default()
        })
    }
}
