//! The L3 circuit breaker as the cache uses it: every source call asks it first, and its whole
//! state lives in L2 too, so processes sharing a database file trip and respect one breaker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::breaker::{
    BreakerPolicy, BreakerState, BreakerStatus, CircuitBreaker, Outcome, Permit, Rejected,
    Transition,
};
use crate::clock::{to_millis, Clock};
use crate::event::Events;
use crate::lookup::Tier;
use crate::source::{Source, SourceError};
use crate::tier::StateStore;

/// The meta row holding the persisted L3 breaker.
const META_KEY: &str = "breaker.l3";

/// The key of the last source failure's text in the persisted breaker row (beside the
/// [`BreakerState`] fields, which ignore it), so a health check in another process can say what
/// failed.
const LAST_ERROR: &str = "last_error";

/// The persisted row's last error, if any.
fn persisted_last_error(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get(LAST_ERROR)?.as_str().map(str::to_owned)
}

/// How a source call ended, for the breaker.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CallEnd<'a> {
    /// The source answered (a value, 304, 404, or a refusal that is not an outage).
    Answered(Duration),
    /// The source failed (5xx, connect, timeout, garbage).
    Failed(&'a SourceError),
    /// The source's budget is spent until then (ms).
    RateLimited(u64),
    /// The call was not sent after all (offline, closed).
    NotSent,
}

/// The error of a call [`guarded`] did not send.
pub(crate) fn not_sent() -> SourceError {
    SourceError::Unavailable {
        status: None,
        message: NOT_SENT.into(),
    }
}

const NOT_SENT: &str = "offline mode is on (or the cache is closed): the source was not contacted";

/// Whether `e` is [`not_sent`]'s: the call never left (as opposed to an answer that came back
/// after offline mode was switched on, which must be recorded like any other).
pub(crate) fn is_not_sent(e: &SourceError) -> bool {
    matches!(e, SourceError::Unavailable { status: None, message } if message == NOT_SENT)
}

#[derive(Debug)]
pub(crate) struct SourceGuard {
    breaker: CircuitBreaker,
    /// Asked for its budget after every answer: a spent one opens the breaker until its reset.
    source: Arc<dyn Source>,
    store: Option<Arc<dyn StateStore>>,
    clock: Arc<dyn Clock>,
    events: Events,
    last_error: Mutex<Option<String>>,
    /// Whether `last_error` was set by a failure not yet written to the persisted row (else
    /// the row's own last error, maybe another process's newer one, is kept).
    error_fresh: AtomicBool,
    /// When the persisted row was last read and found clean (ms; 0: not since the last change
    /// this process made). Within [`PERSISTED_REFRESH_MS`] of that, a healthy call reads nothing.
    persisted_clean_at: AtomicU64,
}

/// How long a clean persisted breaker is trusted without reading it again: another process's
/// trip (or rate limit) is seen by this one within this time.
const PERSISTED_REFRESH_MS: u64 = 1_000;

impl SourceGuard {
    /// `store`: where to persist the state (`None`: memory only).
    pub(crate) fn new(
        policy: BreakerPolicy,
        source: Arc<dyn Source>,
        clock: Arc<dyn Clock>,
        store: Option<Arc<dyn StateStore>>,
        events: Events,
    ) -> Self {
        Self {
            breaker: CircuitBreaker::new(policy, clock.clone()).named("l3"),
            source,
            store,
            clock,
            events,
            last_error: Mutex::new(None),
            error_fresh: AtomicBool::new(false),
            persisted_clean_at: AtomicU64::new(0),
        }
    }

    /// Asks the breaker for a call.
    ///
    /// While the breaker is clean (closed, no failure counted) here and in the database, a call
    /// reads the persisted state at most once a second ([`PERSISTED_REFRESH_MS`]) and writes
    /// nothing: writes happen only on transitions and once something failed, so a healthy
    /// source is not slowed by bookkeeping. (The failure-rate window shared between processes
    /// therefore counts calls only from the first failure on.)
    pub(crate) async fn acquire(&self) -> Result<Permit, Rejected> {
        if let Some(store) = &self.store {
            let now = self.clock.now_millis();
            let clean_at = self.persisted_clean_at.load(Ordering::Relaxed);
            if clean_at != 0
                && now.saturating_sub(clean_at) < PERSISTED_REFRESH_MS
                && self.breaker.is_clean()
            {
                return self.breaker.try_acquire();
            }
            // L2 unreadable (or no row): the memory copy decides.
            let persisted = store.load_meta(META_KEY).await.ok().flatten();
            let persisted = persisted.and_then(|s| serde_json::from_str::<BreakerState>(&s).ok());
            if persisted.as_ref().is_none_or(BreakerState::is_clean) && self.breaker.is_clean() {
                // The fleet's clean row replaces the memory copy, so a permit names the row's
                // state (its epoch): this call's failure counts in the shared breaker even if
                // this process missed the row's last opening and closing.
                if let Some(st) = persisted {
                    self.breaker.update(|mine, _, _| {
                        if mine.is_clean() {
                            *mine = st;
                        }
                    });
                }
                self.persisted_clean_at.store(now.max(1), Ordering::Relaxed);
                return self.breaker.try_acquire();
            }
            self.persisted_clean_at.store(0, Ordering::Relaxed);
        }
        let result = self
            .persisted(|st, now, policy| st.try_acquire(now, policy))
            .await
            .unwrap_or_else(|| self.breaker.try_acquire());
        if let Ok(p) = &result {
            self.events.transition(Tier::L3, p.transition(), None);
        }
        result
    }

    /// When the source's last budget is spent (remaining 0, its reset ahead): its reset (ms).
    fn budget_spent_until(&self) -> Option<u64> {
        let budget = self.source.rate_limit()?;
        let reset = to_millis(budget.reset);
        (budget.remaining == 0 && reset > self.clock.now_millis()).then_some(reset)
    }

    /// Reports how the call made under `permit` ended.
    ///
    /// The breaker is the one gate in front of the source: a rate-limited answer opens it until
    /// the limit passes, and so does an answer that spent the last of the source's budget
    /// ([`Source::rate_limit`]), so the next call is not sent to be refused. Persisted, this
    /// holds every process sharing the database.
    pub(crate) async fn complete(&self, permit: Permit, end: CallEnd<'_>) {
        let spent_until = match end {
            CallEnd::Answered(_) => self.budget_spent_until(),
            _ => None,
        };
        if let CallEnd::Answered(latency) = end {
            if spent_until.is_none() && self.breaker.is_clean() {
                // A success that leaves a clean breaker clean: nothing worth a write.
                let t = self.breaker.complete(permit, Outcome::success(latency));
                self.events.transition(Tier::L3, t, None);
                return;
            }
        }
        let (outcome, until) = match end {
            CallEnd::Answered(latency) => (Outcome::success(latency), spent_until),
            CallEnd::Failed(e) => {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(crate::error::chain_text(e));
                self.error_fresh.store(true, Ordering::Relaxed);
                (Outcome::Failure, None)
            }
            CallEnd::RateLimited(until) => (Outcome::Cancelled, Some(until)),
            CallEnd::NotSent => (Outcome::Cancelled, None),
        };
        let t = self
            .persisted(move |st, now, policy| {
                let mut t = st.complete(permit, outcome, now, policy);
                if let Some(until) = until {
                    t = st.open_until(now, until).or(t);
                }
                t
            })
            .await
            .unwrap_or_else(|| {
                let mut t = self.breaker.complete(permit, outcome);
                if let Some(until) = until {
                    t = self
                        .breaker
                        .open_until(crate::clock::from_millis(until))
                        .or(t);
                }
                t
            });
        let error = self.last_error();
        self.events.transition(Tier::L3, t, error.as_deref());
    }

    /// Runs `f` on the persisted state in one L2 transaction and adopts the result in memory.
    /// `None` when there is no store or it failed (the caller then uses the memory state).
    async fn persisted<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut BreakerState, u64, &BreakerPolicy) -> R + Send + 'static,
    ) -> Option<R> {
        let store = self.store.as_ref()?;
        self.persisted_clean_at.store(0, Ordering::Relaxed);
        let now = self.clock.now_millis();
        let policy = self.breaker.policy().clone();
        let fallback = self.breaker.state_snapshot();
        let mine = self
            .error_fresh
            .swap(false, Ordering::Relaxed)
            .then(|| self.last_error())
            .flatten();
        let slot: Arc<Mutex<Option<(R, BreakerState)>>> = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let update = store
            .update_meta(
                META_KEY,
                Box::new(move |old| {
                    // A missing or unreadable row starts from what this process knows.
                    let mut st = old
                        .as_deref()
                        .and_then(|s| serde_json::from_str::<BreakerState>(s).ok())
                        .unwrap_or(fallback);
                    let r = f(&mut st, now, &policy);
                    // A failure of this call's, else the error already stored, kept beside.
                    let last_error = mine.or_else(|| old.as_deref().and_then(persisted_last_error));
                    let json = serde_json::to_value(&st)
                        .ok()
                        .map(|mut v| {
                            if let (Some(e), Some(map)) = (last_error, v.as_object_mut()) {
                                map.insert(LAST_ERROR.into(), e.into());
                            }
                            v.to_string()
                        })
                        .or(old);
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = Some((r, st));
                    json
                }),
            )
            .await;
        if let Err(e) = update {
            tracing::debug!(error = %e, "could not persist the L3 breaker; using the memory copy");
            return None;
        }
        let (r, st) = slot.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        self.breaker.update(|mine, _, _| *mine = st);
        Some(r)
    }

    /// Re-reads the persisted state (another process may have changed it).
    pub(crate) async fn refresh(&self) {
        let Some(store) = &self.store else { return };
        if let Ok(Some(json)) = store.load_meta(META_KEY).await {
            if let Ok(st) = serde_json::from_str::<BreakerState>(&json) {
                self.breaker.update(|mine, _, _| *mine = st);
            }
            if let Some(e) = persisted_last_error(&json) {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    }

    pub(crate) fn status(&self) -> BreakerStatus {
        self.breaker.status()
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forces or resets the breaker (persisted too).
    pub(crate) async fn apply(
        &self,
        f: impl Fn(&mut BreakerState) -> Option<Transition> + Send + Sync + Clone + 'static,
    ) {
        let g = f.clone();
        let t = self
            .persisted(move |st, _, _| g(st))
            .await
            .unwrap_or_else(|| self.breaker.update(|st, _, _| f(st)));
        self.events.transition(Tier::L3, t, None);
    }
}

/// Runs one source call under the guard: refused calls are never sent, and the outcome is
/// reported.
///
/// `may_send` is asked after the permit is granted, right before the call is polled: when it
/// says no (offline mode switched on while the permit was awaited, the cache closed), nothing is
/// sent, the permit is handed back, and the call fails with [`not_sent`].
pub(crate) async fn guarded<T>(
    guard: &SourceGuard,
    timeout: Duration,
    may_send: impl Fn() -> bool,
    call: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    let permit = guard
        .acquire()
        .await
        .map_err(|r| match (r.is_rate_limited(), r.until()) {
            (true, Some(until)) => SourceError::RateLimited {
                until,
                status: None,
                message: "the source's rate-limit budget is spent; not sent".into(),
            },
            _ => SourceError::CircuitOpen { until: r.until() },
        })?;
    if !may_send() {
        guard.complete(permit, CallEnd::NotSent).await;
        return Err(not_sent());
    }
    let started = Instant::now();
    let result = match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(SourceError::Timeout { after: timeout }),
    };
    let end = match &result {
        Ok(_) => CallEnd::Answered(started.elapsed()),
        Err(e) => match e.rate_limited_until() {
            Some(until) => CallEnd::RateLimited(to_millis(until)),
            None if e.counts_as_failure() => CallEnd::Failed(e),
            None => CallEnd::Answered(started.elapsed()),
        },
    };
    guard.complete(permit, end).await;
    result
}
