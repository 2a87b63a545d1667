//! Applies what other instances sharing L2 changed ([`EntryStore::invalidations`]) to this
//! cache's L1: one task per cache, ended by [`close`](super::TieredCache::close) or the drop of
//! the cache.
//!
//! [`EntryStore::invalidations`]: crate::tier::EntryStore::invalidations

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::tier::fence::Fences;
use crate::tier::memory::MemoryTier;
use crate::tier::{Invalidation, Listening, Store};

/// What [`start`] made: the sender whose drop ends the task, and the store's listening state.
pub(super) type Started = Option<(oneshot::Sender<()>, Option<Listening>)>;

/// Subscribes to `store`'s invalidations, if it publishes any, and spawns the task applying
/// them (`None`: nothing to apply).
///
/// # Errors
/// [`Error::Config`] when the store publishes but no Tokio runtime is running.
pub(super) fn start(
    store: &Arc<dyn Store>,
    l1: &MemoryTier,
    fences: &Arc<Fences>,
) -> Result<Started> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Asked only to learn whether it publishes: a store that would needs the runtime.
        return match store.invalidations() {
            None => Ok(None),
            Some(_) => Err(Error::Config(
                "this L2 store publishes other instances' writes: build the cache within a \
                 Tokio runtime"
                    .to_owned(),
            )),
        };
    };
    let Some(mut subscription) = store.invalidations() else {
        return Ok(None);
    };
    let listening = subscription.listening();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let (l1, fences) = (l1.clone(), fences.clone());
    runtime.spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                _ = &mut stopped => break,
                next = subscription.recv() => next,
            };
            match next {
                // The fence first: a fill or promotion of the key that raced the write sees
                // the fence moved and keeps its (older) value out of L1 (see `tier::fence`).
                Some(Invalidation::Keys(keys)) => {
                    for key in keys {
                        fences.bump(&key);
                        l1.remove(&key).await;
                    }
                }
                Some(_) => {
                    fences.bump_all();
                    l1.clear().await;
                }
                None => break,
            }
        }
    });
    Ok(Some((stop, listening)))
}
