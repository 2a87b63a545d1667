//! Shared test support: a scripted in-process source.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tiercache::source::{Fetched, Source, SourceError};

/// What the fake source does on its next calls.
#[derive(Debug, Default)]
struct Script {
    data: HashMap<String, (Bytes, String)>,
    version: u64,
    fetch_error: Option<SourceError>,
    write_error: Option<SourceError>,
    latency: Duration,
}

/// A log of calls: key and validator (fetches) or key and value (writes; `None` = delete).
type Log<T> = Arc<Mutex<Vec<(String, Option<T>)>>>;

/// A fake source: a map of values with ETags, scripted latency and failures, and a log of calls.
#[derive(Debug, Clone, Default)]
pub struct FakeSource {
    script: Arc<Mutex<Script>>,
    fetches: Log<String>,
    writes: Log<Bytes>,
    fetch_count: Arc<AtomicUsize>,
    /// Writes (puts and deletes) begun, counted before any scripted latency.
    writes_started: Arc<AtomicUsize>,
}

impl FakeSource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value` under `key` with a new ETag.
    pub fn insert(&self, key: &str, value: impl Into<Bytes>) {
        let mut s = self.script.lock().unwrap();
        s.version += 1;
        let etag = format!("\"v{}\"", s.version);
        s.data.insert(key.to_owned(), (value.into(), etag));
    }

    pub fn value(&self, key: &str) -> Option<Bytes> {
        self.script
            .lock()
            .unwrap()
            .data
            .get(key)
            .map(|(v, _)| v.clone())
    }

    pub fn fail_fetches(&self, error: Option<SourceError>) {
        self.script.lock().unwrap().fetch_error = error;
    }

    pub fn fail_writes(&self, error: Option<SourceError>) {
        self.script.lock().unwrap().write_error = error;
    }

    pub fn set_latency(&self, latency: Duration) {
        self.script.lock().unwrap().latency = latency;
    }

    /// Writes begun (counted before the scripted latency; `writes` logs them after it).
    pub fn writes_started(&self) -> usize {
        self.writes_started.load(Ordering::SeqCst)
    }

    pub fn fetch_count(&self) -> usize {
        self.fetch_count.load(Ordering::SeqCst)
    }

    pub fn fetches(&self) -> Vec<(String, Option<String>)> {
        self.fetches.lock().unwrap().clone()
    }

    pub fn writes(&self) -> Vec<(String, Option<Bytes>)> {
        self.writes.lock().unwrap().clone()
    }
}

pub fn outage() -> SourceError {
    SourceError::Unavailable {
        status: Some(503),
        message: "Service Unavailable".into(),
    }
}

#[async_trait]
impl Source for FakeSource {
    async fn fetch(&self, key: &str, validator: Option<&str>) -> Result<Fetched, SourceError> {
        self.fetch_count.fetch_add(1, Ordering::SeqCst);
        self.fetches
            .lock()
            .unwrap()
            .push((key.to_owned(), validator.map(str::to_owned)));
        let latency = self.script.lock().unwrap().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let s = self.script.lock().unwrap();
        if let Some(e) = &s.fetch_error {
            return Err(e.clone());
        }
        Ok(match s.data.get(key) {
            Some((_, etag)) if Some(etag.as_str()) == validator => Fetched::not_modified(),
            Some((v, etag)) => Fetched::value_with_validator(v.clone(), etag.clone()),
            None => Fetched::NotFound,
        })
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        let latency = self.script.lock().unwrap().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        self.writes
            .lock()
            .unwrap()
            .push((key.to_owned(), Some(Bytes::copy_from_slice(value))));
        if let Some(e) = self.script.lock().unwrap().write_error.clone() {
            return Err(e);
        }
        self.insert(key, Bytes::copy_from_slice(value));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), SourceError> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        self.writes.lock().unwrap().push((key.to_owned(), None));
        let mut s = self.script.lock().unwrap();
        if let Some(e) = s.write_error.clone() {
            return Err(e);
        }
        s.data.remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        let s = self.script.lock().unwrap();
        let mut keys: Vec<String> = s
            .data
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        Ok(keys)
    }
}
