//! Significant events, broadcast to subscribers (and logged with `tracing` where they happen).

use serde::Serialize;
use tokio::sync::broadcast;

use crate::breaker::{CircuitState, TransitionCause};
use crate::lookup::{StaleReason, Tier};

/// Something an operator may want to know about, from [`TieredCache::subscribe`].
///
/// [`TieredCache::subscribe`]: crate::TieredCache::subscribe
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A tier's circuit breaker changed state.
    BreakerTransition {
        /// L2 or L3.
        tier: Tier,
        /// The state left.
        from: CircuitState,
        /// The state entered.
        to: CircuitState,
        /// Why.
        cause: TransitionCause,
    },
    /// A stale copy was served because the source could not answer.
    StaleServed {
        /// The key.
        key: String,
        /// The tier the copy came from.
        tier: Tier,
        /// Why the source could not answer.
        reason: StaleReason,
    },
    /// A tier failed and is now bypassed (its breaker opened).
    TierDegraded {
        /// The tier.
        tier: Tier,
        /// The error that tipped it.
        error: String,
    },
    /// A tier recovered (its breaker closed).
    TierRecovered {
        /// The tier.
        tier: Tier,
    },
    /// The source refused a write-behind write for good; it is kept as a dead letter.
    DeadLetter {
        /// The key.
        key: String,
        /// The source's error.
        error: String,
    },
}

/// The sending side, shared by everything that emits.
#[derive(Debug, Clone)]
pub(crate) struct Events {
    tx: broadcast::Sender<Event>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            tx: broadcast::channel(256).0,
        }
    }

    /// Sends `event` to current subscribers; with none, it is dropped at once.
    pub(crate) fn emit(&self, event: Event) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(event);
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Emits a breaker transition and, for opening and closing, the tier's degraded/recovered
    /// event.
    pub(crate) fn transition(
        &self,
        tier: Tier,
        t: Option<crate::breaker::Transition>,
        error: Option<&str>,
    ) {
        let Some(t) = t else { return };
        self.emit(Event::BreakerTransition {
            tier,
            from: t.from,
            to: t.to,
            cause: t.cause,
        });
        match t.to {
            CircuitState::Open if t.from == CircuitState::Closed => {
                let error = error.unwrap_or("").to_owned();
                tracing::warn!(%tier, %error, "tier degraded: its circuit breaker opened");
                self.emit(Event::TierDegraded { tier, error });
            }
            CircuitState::Closed => {
                tracing::info!(%tier, "tier recovered: its circuit breaker closed");
                self.emit(Event::TierRecovered { tier });
            }
            _ => {}
        }
    }
}
