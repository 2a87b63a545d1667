//! What the storage seam carries for a fleet of instances sharing one backend: other
//! instances' writes to drop from L1, and fill leases.

#[cfg(doc)]
use super::EntryStore;

/// What a cache must drop from its L1 because another instance sharing the backend changed it
/// ([`EntryStore::invalidations`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// These keys changed in the backend (a write by another instance, already committed):
    /// their L1 copies must go.
    Keys(Vec<String>),
    /// Some changes may have been missed (a lost connection whose gap cannot be replayed, a
    /// subscriber that fell behind): every L1 copy must go.
    All,
}

/// A subscription to a backend's [`Invalidation`]s, made by [`EntryStore::invalidations`].
///
/// Ends ([`recv`](Self::recv) gives `None`) when the backend stops publishing. A subscriber
/// that falls too far behind gets [`Invalidation::All`] in place of what it missed.
#[derive(Debug)]
pub struct Invalidations {
    rx: tokio::sync::broadcast::Receiver<Invalidation>,
    listening: Option<Listening>,
}

/// Whether a backend currently hears the other instances' writes (its listener is connected
/// and caught up), shared by the backend and the caches it tells; reported in the cache's
/// [`health`](crate::TieredCache::health).
#[derive(Debug, Clone, Default)]
pub struct Listening(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Listening {
    /// Not listening yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records whether the backend listens now.
    pub fn set(&self, listening: bool) {
        self.0
            .store(listening, std::sync::atomic::Ordering::Release);
    }

    /// Whether the backend listens now.
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Invalidations {
    /// A subscription fed by a broadcast channel.
    pub fn new(rx: tokio::sync::broadcast::Receiver<Invalidation>) -> Self {
        Self {
            rx,
            listening: None,
        }
    }

    /// With the backend's [`Listening`] state, for the cache's health.
    pub fn with_listening(mut self, listening: Listening) -> Self {
        self.listening = Some(listening);
        self
    }

    /// The backend's [`Listening`] state, if it keeps one.
    pub fn listening(&self) -> Option<Listening> {
        self.listening.clone()
    }

    /// The next invalidation; `None` once the sender is gone.
    pub async fn recv(&mut self) -> Option<Invalidation> {
        use tokio::sync::broadcast::error::RecvError;
        match self.rx.recv().await {
            Ok(inv) => Some(inv),
            Err(RecvError::Lagged(_)) => Some(Invalidation::All),
            Err(RecvError::Closed) => None,
        }
    }
}

/// What [`EntryStore::fill_lease`] answered: whether this instance may load a key from the
/// source now, or another instance is loading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FillLease {
    /// The store keeps no leases (the default): single-flight is per process only.
    Unsupported,
    /// This instance holds the key's lease, until it releases it or the lease runs out. The
    /// fencing token is higher than that of every lease granted before on the key: only its
    /// holder can release it ([`EntryStore::release_fill_lease`]).
    Held(u64),
    /// Another instance holds a live lease on the key: it is loading it.
    Busy,
}
