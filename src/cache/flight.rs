//! Single-flight: concurrent loads of one key share one source call and its result (or error).
//!
//! Only loads that took the same fence token share (see `tier::fence`): a read that took its
//! token after a write of the key began must not be handed the answer of a load that began
//! before it (the source's value from before the write, I1). Such a read starts a load of its
//! own, which replaces the older one as the key's flight.
//!
//! The load may publish its value [`Early`]: the waiters that joined it get it then (when the
//! source answered and L1 holds it), while the caller that started it waits until the load is
//! done (L2 written too), so what it does next (a close, a restart, a look at L2) finds the fill.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::{Error, Result};

/// The load's result once there is one, and whether the load is done.
type Stage<T> = Option<(Result<T>, bool)>;
type Slot<T> = watch::Receiver<Stage<T>>;
/// The loads in progress by key, each with the fence token its leader took.
type Map<T> = Arc<Mutex<HashMap<String, (u64, Slot<T>)>>>;

/// The loads in progress, by key: the fence token their leader took, and their result.
#[derive(Debug)]
pub(crate) struct Flights<T> {
    map: Map<T>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Self {
            map: Arc::default(),
        }
    }
}

/// Lets a load hand its value to the waiters before it is done.
pub(crate) struct Early<T>(Arc<watch::Sender<Stage<T>>>);

impl<T: Clone> Early<T> {
    /// Gives the waiters `value` now; the load goes on (its final result reaches the caller
    /// that started it).
    pub(crate) fn publish(&self, value: &T) {
        self.0.send_if_modified(|slot| match slot {
            None => {
                *slot = Some((Ok(value.clone()), false));
                true
            }
            Some(_) => false,
        });
    }
}

/// A joined load: wait on it for the shared result.
pub(crate) struct Flight<T> {
    rx: Slot<T>,
    /// Whether this caller started the load.
    pub(crate) leader: bool,
}

impl<T> Flights<T> {
    /// Whether a load of `key` is in progress.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Joins the load of `key` started under the same fence `token`, starting it with `start`
    /// if none is in progress (or the one in progress began before a write of the key: this
    /// one then takes its place). The load runs as its own task, so it finishes (and fills the
    /// caches) even if every waiter gives up.
    pub(crate) fn join<F, Fut>(&self, key: &str, token: u64, start: F) -> Flight<T>
    where
        F: FnOnce(Early<T>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, rx)) = map.get(key).filter(|(t, _)| *t == token) {
            return Flight {
                rx: rx.clone(),
                leader: false,
            };
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_owned(), (token, rx.clone()));
        drop(map);
        let tx = Arc::new(tx);
        let fut = start(Early(tx.clone()));
        let guard = Remove {
            map: Arc::clone(&self.map),
            key: key.to_owned(),
            rx: rx.clone(),
        };
        tokio::spawn(async move {
            let result = fut.await;
            // Unregister first: a caller arriving after this starts a new load (which first
            // re-checks L1, where this one's result now is).
            drop(guard);
            tx.send_replace(Some((result, true)));
        });
        Flight { rx, leader: true }
    }
}

impl<T: Clone> Flight<T> {
    /// Waits for the load's result: a waiter until it is published, the caller that started
    /// the load until the load is done.
    pub(crate) async fn wait(mut self) -> Result<T> {
        let leader = self.leader;
        match self
            .rx
            .wait_for(|slot| slot.as_ref().is_some_and(|(_, done)| *done || !leader))
            .await
        {
            Ok(v) => v
                .as_ref()
                .map_or(Err(Error::Closed), |(result, _)| result.clone()),
            Err(_) => Err(Error::Closed),
        }
    }
}

/// Unregisters a load when its task ends, however it ends (a panic, a runtime shutdown).
struct Remove<T> {
    map: Map<T>,
    key: String,
    rx: Slot<T>,
}

impl<T> Drop for Remove<T> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|(_, rx)| rx.same_channel(&self.rx))
        {
            map.remove(&self.key);
        }
    }
}
