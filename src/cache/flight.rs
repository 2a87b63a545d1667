//! Single-flight: concurrent loads of one key share one source call and its result (or error).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::{Error, Result};

type Slot<T> = watch::Receiver<Option<Result<T>>>;

/// The loads in progress, by key.
#[derive(Debug)]
pub(crate) struct Flights<T> {
    map: Arc<Mutex<HashMap<String, Slot<T>>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Self {
            map: Arc::default(),
        }
    }
}

/// A joined load: wait on it for the shared result.
pub(crate) struct Flight<T> {
    rx: Slot<T>,
    /// Whether this caller started the load.
    pub(crate) leader: bool,
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Joins the load of `key`, starting it with `start` if none is in progress. The load runs as
    /// its own task, so it finishes (and fills the caches) even if every waiter gives up.
    pub(crate) fn join<F, Fut>(&self, key: &str, start: F) -> Flight<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = map.get(key) {
            return Flight {
                rx: rx.clone(),
                leader: false,
            };
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_owned(), rx.clone());
        drop(map);
        let fut = start();
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
            let _ = tx.send(Some(result));
        });
        Flight { rx, leader: true }
    }
}

impl<T: Clone> Flight<T> {
    /// Waits for the load's result.
    pub(crate) async fn wait(mut self) -> Result<T> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.as_ref().cloned().unwrap_or(Err(Error::Closed)),
            Err(_) => Err(Error::Closed),
        }
    }
}

/// Unregisters a load when its task ends, however it ends (a panic, a runtime shutdown).
struct Remove<T> {
    map: Arc<Mutex<HashMap<String, Slot<T>>>>,
    key: String,
    rx: Slot<T>,
}

impl<T> Drop for Remove<T> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            map.remove(&self.key);
        }
    }
}
