//! Batching the cold misses of concurrent single reads ([`get_batch_window`]): the first cold
//! `get` opens a window; the cold misses of other keys that arrive while it is open join it, and
//! when it closes (or fills a batch) they go to the source together, through
//! [`Source::fetch_many`](crate::source::Source::fetch_many) (for `GitHubSource` with a token,
//! one GraphQL request). Off by default: a lone `get` would wait out the window for nothing.
//!
//! [`get_batch_window`]: super::TieredCacheBuilder::get_batch_window

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::load::{fetch_batches, Answer};
use super::Inner;
use crate::stats::RequestKind;

/// The open window's keys, each with where its answer goes.
pub(crate) struct GetWindow {
    window: Duration,
    pending: Mutex<Vec<(String, tokio::sync::oneshot::Sender<Answer>)>>,
}

impl std::fmt::Debug for GetWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetWindow")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl GetWindow {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Adds a cold key to the open window (opening one if none is): its answer comes through
    /// `tx` when the window's batch is answered. A window that holds a full batch is sent at
    /// once.
    pub(crate) fn push(
        &self,
        inner: &Arc<Inner>,
        key: String,
        tx: tokio::sync::oneshot::Sender<Answer>,
    ) {
        let max = inner.source.max_batch().max(1);
        let (opened, full) = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.push((key, tx));
            let full = (pending.len() >= max).then(|| std::mem::take(&mut *pending));
            (pending.len() == 1, full)
        };
        if let Some(batch) = full {
            let inner = inner.clone();
            tokio::spawn(async move { fetch_batches(&inner, batch, RequestKind::Read).await });
        } else if opened {
            let (inner, window) = (inner.clone(), self.window);
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                let batch = match &inner.get_window {
                    Some(w) => {
                        std::mem::take(&mut *w.pending.lock().unwrap_or_else(|e| e.into_inner()))
                    }
                    None => return,
                };
                if !batch.is_empty() {
                    fetch_batches(&inner, batch, RequestKind::Read).await;
                }
            });
        }
    }
}
