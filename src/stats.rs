//! Stats (temporary shim; replaced by the stats module).
#![allow(dead_code, missing_docs, unreachable_pub)]
use crate::lookup::{StaleReason, Tier};
#[derive(Debug, Default)]
pub struct Stats;
#[derive(Debug, Clone, Copy)]
pub enum SourceOutcome {
    Ok,
    NotModified,
    NotFound,
    RateLimited,
    Failed,
}
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Get,
    Set,
    Mget,
    Delete,
}
#[derive(Debug)]
pub struct Timer;
#[derive(Debug, Default)]
pub struct SnapshotExtras;
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsSnapshot;
impl Stats {
    pub fn new(_enabled: bool) -> Self {
        Stats
    }
    pub fn hit(&self, _t: Tier) {}
    pub fn miss(&self, _t: Tier) {}
    pub fn error(&self, _t: Tier) {}
    pub fn negative_hit(&self) {}
    pub fn coalesced_waiter(&self) {}
    pub fn stale_served(&self, _r: StaleReason) {}
    pub fn decode_error(&self) {}
    pub fn source_call(&self, _o: SourceOutcome) {}
    pub fn start(&self) -> Timer {
        Timer
    }
    pub fn start_sampled(&self) -> Timer {
        Timer
    }
    pub fn record(&self, _t: Tier, _o: Op, _timer: Timer) {}
    pub fn reset(&self) {}
    pub fn snapshot(&self, _e: SnapshotExtras) -> StatsSnapshot {
        StatsSnapshot
    }
}
