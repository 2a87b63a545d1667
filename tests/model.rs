//! A model-based random test of the cache's consistency contract.
//!
//! Random operation lists (generated and shrunk by proptest, from a fixed seed) run against a real
//! [`TieredCache`] on a SQLite file in a temporary directory, an in-process fake [`Source`] and a
//! [`MockClock`]. Every answer is checked against the *set of admissible answers* a reference model
//! allows, rather than against one predicted answer: L1 is bounded, moka evicts as it likes, and
//! the write-behind flusher delivers in the background whenever the test task yields, so the model
//! must accept every legal interleaving.
//!
//! # The contract checked
//! * **I1** A read never returns a value older than the newest acknowledged write (set/delete
//!   returned `Ok`), by this process or another one sharing the database, unless the source
//!   refused that write (then the source's value is the truth and the refused write is never
//!   served).
//! * **I2** An acknowledged delete reads as "not found" everywhere sharing the database.
//! * **I3** Offline means no request leaves: the fake source sees no call while offline.
//! * **I4** Dead letters are never dropped silently and never roll the source back.
//! * **I5** Every acknowledged write-behind write is delivered (only the last write of a key needs
//!   to arrive), in per-key order, across restarts (`close` + reopen, and drop-without-close for
//!   the durable outbox).
//!
//! # How answers are judged
//! The fake source records a history of every value each key held, with a global sequence number
//! (`seq`, shared by the fake and the model: every source call, source change and model event
//! takes the next one) and the mock-clock time of each change, plus a log of every call with its
//! outcome. A read is judged at every `seq` inside its own window (a background delivery may land
//! in the middle of a read: the answer is admissible if it is admissible at some point of the
//! window). For the key's newest acknowledged write `W`:
//! 1. Write-behind, `W` not yet delivered (nor refused): the answer must be exactly `W`, or
//!    "not found" for a delete (I1, I2). Strict on the value: the outbox holds it (its freshness
//!    label is not checked: another process may serve it marked stale).
//! 2. `W` is a put whose local copy is guaranteed to be held (L2 holds it: read-through,
//!    cache-aside, write-through, durable write-behind once delivered), it is within its TTL, and
//!    nothing invalidated it: the answer must be exactly `W`, fresh.
//! 3. Cache-aside otherwise: "not found" (it never asks the source and never serves stale).
//! 4. Otherwise any value the source held at some point after the *floor* (the ack of `W`; its
//!    delivery for write-behind; a later `invalidate`), judged by freshness: served fresh only if
//!    the source held it less than a TTL ago, stale only within TTL + stale TTL and only while the
//!    source is unavailable with the matching reason (offline → `Offline`, outage →
//!    `SourceError`). "Not found" likewise with the negative TTL. `Unavailable` errors are allowed
//!    only while the source is unavailable, with the matching reason.
//!
//! Latitude, on purpose:
//! * A value the source held recently is admissible as fresh even when the model cannot prove the
//!   cache ever fetched it (the model does not track what the cache fetched).
//! * An `Unavailable` error is accepted during an outage or offline even if the cache might have
//!   had a copy to serve (outside rules 1 and 2).
//! * The memory outbox loses, by design, what `close` could not deliver (outage, offline) and its
//!   dead letters; such writes are marked lost, and the source's value becomes the truth.
//! * Retrying a dead letter of the key's newest write makes both that write and the source's value
//!   admissible until the retry is delivered or refused again (dead letters carry no value, so the
//!   model matches them by key and operation only).
//! * A delete the source receives is attributed to the newest acknowledged delete of the key.
//! * A refusal the cache has not recorded yet: the refused newest write stays admissible until
//!   its dead letter is listed (one of the key that is not superseded and has the write's
//!   operation: an older, superseded dead letter of the key says nothing), or until a flush or
//!   close that began after the refusal (both wait for the flusher's round in progress; not
//!   across a crash, whose dropped flusher finishes its round unwaited for).
//! * A delivery the cache has not recorded yet: the flusher removes a key's rows only when its
//!   whole round is done, and until then reads serve the write as pending (fresh, and held in
//!   L1 again). So the delivered newest write stays admissible (any freshness label) until a
//!   flush or close that began after the delivery, and a put for a TTL after that one began
//!   (the copy read back meanwhile) unless the key was invalidated since.
//!
//! # Reproducing
//! `cargo test --test model` runs a short configuration. `TIERCACHE_MODEL_CASES`,
//! `TIERCACHE_MODEL_OPS` and `TIERCACHE_MODEL_SEED` change the number of cases, the longest op list
//! and the seed; `TIERCACHE_MODEL_SHRINK_SECS` bounds shrinking; `TIERCACHE_MODEL_ALLOW` lets
//! known violations pass so a run can look for others (see [`allowed`]). A failure prints the seed, the
//! shrunk op list and the trace of its last run (each op with what the cache answered); a failed
//! read also prints what the model knew of its key (its newest writes and their status, its last
//! source calls and values, the dead letters listed before the read).
//! `TIERCACHE_MODEL_REPLAY='[Set(k3), Mget(["k4", "k1"]), ...]'` runs such a list again instead
//! of generating cases, `TIERCACHE_MODEL_REPLAY_RUNS` times (default 1, 50 for a background
//! configuration, whose runs differ with the flusher's timing); pick the configuration by the
//! test's name, e.g. `cargo test --test model write_behind_memory_background_model`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::{any, prop_oneof, Just};
use proptest::strategy::Strategy as _;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use tiercache::breaker::BreakerPolicy;
use tiercache::source::{Fetched, Source, SourceError};
use tiercache::{
    Clock, Error, Freshness, MockClock, OutboxMode, StaleReason, Strategy, TieredCache,
    TieredCacheBuilder,
};

const KEYS: [&str; 5] = ["k0", "k1", "k2", "k3", "k4"];
const TTL_MS: u64 = 60_000;
const STALE_MS: u64 = 300_000;
const NEGATIVE_MS: u64 = 60_000;

// ------------------------------------------------------------------------------ the fake source

#[derive(Debug, Clone, PartialEq, Eq)]
enum CallKind {
    Fetch,
    Put(Bytes),
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Unavailable,
    Rejected,
}

#[derive(Debug, Clone)]
struct Call {
    seq: u64,
    key: String,
    kind: CallKind,
    outcome: Outcome,
}

/// One value a key held at the source, from `start` to `end` (seq and clock ms), `None` = absent.
#[derive(Debug, Clone)]
struct Version {
    value: Option<Bytes>,
    start: u64,
    end: Option<(u64, u64)>,
    /// Written by the "second writer", not by the cache.
    external: bool,
}

#[derive(Debug, Default)]
struct FakeState {
    seq: u64,
    etag: u64,
    data: HashMap<String, (Bytes, u64)>,
    outage: bool,
    refused: BTreeSet<String>,
    calls: Vec<Call>,
    history: HashMap<String, Vec<Version>>,
}

impl FakeState {
    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn change(&mut self, key: &str, value: Option<Bytes>, now: u64, external: bool) {
        let current = self.data.get(key).map(|(v, _)| v.clone());
        if current == value {
            return;
        }
        let seq = self.tick();
        let history = self
            .history
            .entry(key.to_owned())
            .or_insert_with(|| vec![initial()]);
        if let Some(last) = history.last_mut() {
            last.end = Some((seq, now));
        }
        history.push(Version {
            value: value.clone(),
            start: seq,
            end: None,
            external,
        });
        match value {
            Some(v) => {
                self.etag += 1;
                self.data.insert(key.to_owned(), (v, self.etag));
            }
            None => {
                self.data.remove(key);
            }
        }
    }

    fn log(&mut self, key: &str, kind: CallKind, outcome: Outcome) -> u64 {
        let seq = self.tick();
        self.calls.push(Call {
            seq,
            key: key.to_owned(),
            kind,
            outcome,
        });
        seq
    }
}

fn initial() -> Version {
    Version {
        value: None,
        start: 0,
        end: None,
        external: false,
    }
}

/// The source of truth: shared state behind a mutex, an outage switch, per-key refusals, a call
/// log and a value history.
#[derive(Debug, Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    clock: MockClock,
    /// Keys a `fetch_many` call carries (1: the source does not batch).
    batch: usize,
}

fn outage_error() -> SourceError {
    SourceError::Unavailable {
        status: Some(503),
        message: "Service Unavailable".into(),
    }
}

impl Fake {
    fn new(clock: MockClock, batch: usize) -> Self {
        Self {
            state: Arc::default(),
            clock,
            batch,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tick(&self) -> u64 {
        self.lock().tick()
    }

    /// The "second writer": changes the source directly.
    fn external(&self, key: &str, value: Option<Bytes>) {
        let now = self.clock.now_millis();
        self.lock().change(key, value, now, true);
    }

    fn write(&self, key: &str, value: Option<&[u8]>) -> Result<(), SourceError> {
        let now = self.clock.now_millis();
        let mut s = self.lock();
        let kind = match value {
            Some(v) => CallKind::Put(Bytes::copy_from_slice(v)),
            None => CallKind::Delete,
        };
        if s.outage {
            s.log(key, kind, Outcome::Unavailable);
            return Err(outage_error());
        }
        if s.refused.contains(key) {
            s.log(key, kind, Outcome::Rejected);
            return Err(SourceError::Rejected {
                status: Some(422),
                message: "refused by the model".into(),
            });
        }
        s.log(key, kind, Outcome::Ok);
        s.change(key, value.map(Bytes::copy_from_slice), now, false);
        Ok(())
    }
}

#[async_trait]
impl Source for Fake {
    async fn fetch(&self, key: &str, validator: Option<&str>) -> Result<Fetched, SourceError> {
        let mut s = self.lock();
        if s.outage {
            s.log(key, CallKind::Fetch, Outcome::Unavailable);
            return Err(outage_error());
        }
        s.log(key, CallKind::Fetch, Outcome::Ok);
        Ok(match s.data.get(key) {
            Some((_, etag)) if validator == Some(format!("\"v{etag}\"").as_str()) => {
                Fetched::not_modified()
            }
            Some((v, etag)) => Fetched::value_with_validator(v.clone(), format!("\"v{etag}\"")),
            None => Fetched::NotFound,
        })
    }

    /// As GitHub's GraphQL batch: an outage fails the whole request.
    async fn fetch_many(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<Fetched, SourceError>>, SourceError> {
        if self.lock().outage {
            let mut s = self.lock();
            for key in keys {
                s.log(key, CallKind::Fetch, Outcome::Unavailable);
            }
            return Err(outage_error());
        }
        let mut answers = Vec::with_capacity(keys.len());
        for key in keys {
            answers.push(self.fetch(key, None).await);
        }
        Ok(answers)
    }

    fn max_batch(&self) -> usize {
        self.batch
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        self.write(key, Some(value))
    }

    async fn delete(&self, key: &str) -> Result<(), SourceError> {
        self.write(key, None)
    }
}

// ------------------------------------------------------------------------------ operations

#[derive(Debug, Clone, Copy)]
enum Advance {
    Secs(u64),
    PastTtl,
    PastStale,
}

#[derive(Clone)]
enum Op {
    Get(usize),
    Lookup(usize),
    Mget(Vec<usize>),
    Set(usize),
    Delete(usize),
    Invalidate(usize),
    ClearMemory,
    Flush,
    Advance(Advance),
    Outage(bool),
    Offline(bool),
    /// The second writer: a new value, or a delete when `true`.
    External(usize, bool),
    Refuse(usize, bool),
    Restart,
    Crash,
    RetryDead(usize),
    DiscardDead(usize),
    /// Another process (read-through, or the same strategy) opens the same file and reads.
    SecondReader(usize),
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Get(k) => write!(f, "Get({})", KEYS[*k]),
            Op::Lookup(k) => write!(f, "Lookup({})", KEYS[*k]),
            Op::Mget(ks) => {
                let ks: Vec<&str> = ks.iter().map(|k| KEYS[*k]).collect();
                write!(f, "Mget({ks:?})")
            }
            Op::Set(k) => write!(f, "Set({})", KEYS[*k]),
            Op::Delete(k) => write!(f, "Delete({})", KEYS[*k]),
            Op::Invalidate(k) => write!(f, "Invalidate({})", KEYS[*k]),
            Op::ClearMemory => write!(f, "ClearMemory"),
            Op::Flush => write!(f, "Flush"),
            Op::Advance(a) => write!(f, "Advance({a:?})"),
            Op::Outage(on) => write!(f, "Outage({on})"),
            Op::Offline(on) => write!(f, "Offline({on})"),
            Op::External(k, del) => {
                write!(
                    f,
                    "External({}, {})",
                    KEYS[*k],
                    if *del { "delete" } else { "set" }
                )
            }
            Op::Refuse(k, on) => write!(f, "Refuse({}, {on})", KEYS[*k]),
            Op::Restart => write!(f, "Restart"),
            Op::Crash => write!(f, "Crash"),
            Op::RetryDead(i) => write!(f, "RetryDead({i})"),
            Op::DiscardDead(i) => write!(f, "DiscardDead({i})"),
            Op::SecondReader(k) => write!(f, "SecondReader({})", KEYS[*k]),
        }
    }
}

fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
    let k = || 0..KEYS.len();
    let advance = prop_oneof![
        3 => (1u64..30).prop_map(Advance::Secs),
        2 => Just(Advance::PastTtl),
        1 => Just(Advance::PastStale),
    ];
    prop_oneof![
        6 => k().prop_map(Op::Get),
        6 => k().prop_map(Op::Lookup),
        2 => vec(k(), 1..4).prop_map(Op::Mget),
        8 => k().prop_map(Op::Set),
        3 => k().prop_map(Op::Delete),
        2 => k().prop_map(Op::Invalidate),
        2 => Just(Op::ClearMemory),
        2 => Just(Op::Flush),
        4 => advance.prop_map(Op::Advance),
        2 => any::<bool>().prop_map(Op::Outage),
        2 => any::<bool>().prop_map(Op::Offline),
        3 => (k(), any::<bool>()).prop_map(|(k, d)| Op::External(k, d)),
        2 => (k(), any::<bool>()).prop_map(|(k, on)| Op::Refuse(k, on)),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
        1 => (0usize..8).prop_map(Op::RetryDead),
        1 => (0usize..8).prop_map(Op::DiscardDead),
        1 => k().prop_map(Op::SecondReader),
    ]
}

// ------------------------------------------------------------------------------ the model

#[derive(Debug, Clone, Copy)]
struct Setup {
    strategy: Strategy,
    mode: OutboxMode,
    /// Write-behind delivers in the background too (runs then differ with thread timing, so
    /// shrinking is weaker); without it, deliveries happen at `Flush`, `Restart` and the end,
    /// and a seed replays exactly.
    background: bool,
    /// The source batches cold misses (`Source::fetch_many`, 3 keys a call).
    batched: bool,
    /// Reads in the last half of a TTL refresh the entry in the background
    /// (`refresh_ahead(0.5)`).
    refresh_ahead: bool,
}

impl Setup {
    fn write_behind(self) -> bool {
        self.strategy == Strategy::WriteBehind
    }

    fn memory(self) -> bool {
        self.write_behind() && self.mode == OutboxMode::Memory
    }
}

/// An acknowledged write (or one in flight: `ack` is `None` until it returns).
#[derive(Debug, Clone)]
struct Write {
    /// The value, `None` for a delete.
    op: Option<Bytes>,
    start: u64,
    ack: Option<u64>,
    time: u64,
    /// Seqs at which a dead letter of this write was retried.
    retried: Vec<u64>,
    /// The memory outbox lost it at this seq (a close that could not deliver it).
    lost: Option<u64>,
}

impl Write {
    fn matches(&self, kind: &CallKind) -> bool {
        match (&self.op, kind) {
            (Some(v), CallKind::Put(x)) => v == x,
            (None, CallKind::Delete) => true,
            _ => false,
        }
    }

    fn op_name(&self) -> &'static str {
        if self.op.is_some() {
            "put"
        } else {
            "delete"
        }
    }

    fn describe(&self) -> String {
        match &self.op {
            Some(v) => format!("set {}", String::from_utf8_lossy(v)),
            None => "delete".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Local only (read-through, cache-aside) or written through.
    Local,
    Pending,
    /// Delivered by the source call at this seq.
    Delivered(u64),
    /// Refused for good at this seq.
    Refused(u64),
    /// A dead letter retried, not yet delivered or refused again.
    Retried,
    Lost,
}

#[derive(Debug, Default)]
struct KeyModel {
    writes: Vec<Write>,
    /// Seq of the last `invalidate` (or other loss of the local copies).
    invalidated: u64,
    /// Whether the newest write's local copy is certainly held (rule 2).
    local_valid: bool,
    /// The newest write delivered so far (index into `writes`), for the per-key order check.
    max_delivered: Option<usize>,
    /// Seqs of dead-letter discards of this key.
    discarded: Vec<u64>,
}

#[derive(Debug)]
enum Answer {
    Value(Bytes, Option<Freshness>),
    NotFound,
    Unavailable(StaleReason),
    Other(String),
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Value(v, fr) => {
                let fr = match fr {
                    None => String::new(),
                    Some(Freshness::Fresh) => " fresh".into(),
                    Some(Freshness::Stale { reason }) => format!(" stale({reason})"),
                };
                write!(f, "{}{fr}", String::from_utf8_lossy(v))
            }
            Answer::NotFound => write!(f, "not found"),
            Answer::Unavailable(r) => write!(f, "unavailable({r})"),
            Answer::Other(e) => write!(f, "error: {e}"),
        }
    }
}

fn classify<T>(r: Result<T, Error>, ok: impl FnOnce(T) -> Answer) -> Answer {
    match r {
        Ok(t) => ok(t),
        Err(Error::Unavailable { reason, .. }) => Answer::Unavailable(reason),
        Err(e) => Answer::Other(e.to_string()),
    }
}

type Check = Result<(), String>;

struct World {
    setup: Setup,
    _dir: tempfile::TempDir,
    path: PathBuf,
    clock: MockClock,
    fake: Fake,
    cache: Option<TieredCache>,
    keys: Vec<KeyModel>,
    outage: bool,
    offline: bool,
    /// Offline intervals in seqs (`None` end: still offline).
    offline_spans: Vec<(u64, Option<u64>)>,
    /// Seq of the last close of a memory-outbox cache (its dead letters went with it).
    memory_closed: u64,
    /// Seq and clock (ms) taken just before each `flush` or `close` began: both wait for the
    /// background delivery round in progress, so every delivery or refusal the source answered
    /// before it is recorded by the cache when it returns (unless a crash came in between: a
    /// dropped cache's flusher finishes its round on its own, unwaited for).
    quiesces: Vec<(u64, u64)>,
    /// Seqs of the crashes (drops without close).
    crashes: Vec<u64>,
    next_value: u64,
    scanned: usize,
    trace: Vec<String>,
    /// The dead letters (key, operation) the cache listed just before the current read began,
    /// superseded ones left out: a refusal the cache has not processed yet (the source said no,
    /// the dead letter is not yet recorded) leaves the refused write admissible, as if still
    /// pending. Only a dead letter that is not superseded can be the newest write's: an older
    /// dead letter of the key (superseded by the newest write) says nothing about it.
    dead_before_read: BTreeSet<(String, &'static str)>,
}

fn never_open() -> BreakerPolicy {
    // The breaker is covered by tests/breaker.rs and tests/resilience.rs; here it never opens so
    // the model need not predict its timing (an outage is always `SourceError`).
    BreakerPolicy::builder()
        .failure_threshold(u32::MAX)
        .minimum_calls(u32::MAX)
        .build()
        .expect("a valid policy")
}

impl World {
    fn new(setup: Setup) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("cache.db");
        let clock = MockClock::new();
        let fake = Fake::new(clock.clone(), if setup.batched { 3 } else { 1 });
        Ok(Self {
            setup,
            _dir: dir,
            path,
            clock,
            fake,
            cache: None,
            keys: KEYS.iter().map(|_| KeyModel::default()).collect(),
            outage: false,
            offline: false,
            offline_spans: Vec::new(),
            memory_closed: 0,
            quiesces: Vec::new(),
            crashes: Vec::new(),
            next_value: 0,
            scanned: 0,
            trace: Vec::new(),
            dead_before_read: BTreeSet::new(),
        })
    }

    fn builder(&self, strategy: Strategy) -> TieredCacheBuilder {
        TieredCache::builder()
            .source(self.fake.clone())
            .clock(self.clock.clone())
            .sqlite_path(&self.path)
            .strategy(strategy)
            .outbox(self.setup.mode)
            .background_flush(self.setup.background)
            .ttl(Duration::from_millis(TTL_MS))
            .stale_ttl(Duration::from_millis(STALE_MS))
            .negative_ttl(Duration::from_millis(NEGATIVE_MS))
            // Retries are timed by the mock clock; the flusher's real-time sleeps stay long, so
            // background deliveries follow writes (notify) rather than wall time.
            .retry_base(Duration::from_secs(30))
            .retry_max(Duration::from_secs(120))
            .close_timeout(Duration::from_secs(30))
            .source_breaker(never_open())
            .offline(self.offline)
    }

    fn open(&mut self) -> Check {
        let mut builder = self.builder(self.setup.strategy);
        if self.setup.refresh_ahead {
            builder = builder.refresh_ahead(0.5);
        }
        let cache = builder.build().map_err(|e| format!("build failed: {e}"))?;
        self.cache = Some(cache);
        Ok(())
    }

    fn cache(&self) -> Result<&TieredCache, String> {
        self.cache
            .as_ref()
            .ok_or_else(|| "no cache open".to_owned())
    }

    fn now(&self) -> u64 {
        self.clock.now_millis()
    }

    fn calls(&self) -> Vec<Call> {
        self.fake.lock().calls.clone()
    }

    fn history(&self, key: usize) -> Vec<Version> {
        self.fake
            .lock()
            .history
            .get(KEYS[key])
            .cloned()
            .unwrap_or_else(|| vec![initial()])
    }

    fn source_unavailable(&self) -> Option<StaleReason> {
        if self.offline {
            Some(StaleReason::Offline)
        } else if self.outage {
            Some(StaleReason::SourceError)
        } else {
            None
        }
    }

    /// The newest acknowledged write of `key`.
    fn newest(&self, key: usize) -> Option<&Write> {
        self.keys[key].writes.iter().rev().find(|w| w.ack.is_some())
    }

    /// What became of `w` as of `upto`.
    fn status(&self, key: usize, w: &Write, calls: &[Call], upto: u64) -> Status {
        if !self.setup.write_behind() {
            return Status::Local;
        }
        let mut events: Vec<(u64, Option<Outcome>)> = calls
            .iter()
            .filter(|c| {
                c.key == KEYS[key] && c.seq > w.start && c.seq <= upto && w.matches(&c.kind)
            })
            .map(|c| (c.seq, Some(c.outcome)))
            .collect();
        events.extend(w.retried.iter().filter(|r| **r <= upto).map(|r| (*r, None)));
        events.sort_by_key(|e| e.0);
        let mut status = Status::Pending;
        for (seq, e) in events {
            status = match (status, e) {
                (Status::Pending | Status::Retried, Some(Outcome::Ok)) => Status::Delivered(seq),
                (Status::Pending | Status::Retried, Some(Outcome::Rejected)) => {
                    Status::Refused(seq)
                }
                (Status::Refused(_), None) => Status::Retried,
                (s, _) => s,
            };
        }
        match (status, w.lost) {
            (Status::Pending | Status::Retried, Some(l)) if l <= upto => Status::Lost,
            (s, _) => s,
        }
    }

    /// Whether `answer` to a read of `key` is admissible at some seq of `[start, end]`.
    fn check_read(&self, key: usize, answer: &Answer, start: u64, end: u64, who: &str) -> Check {
        let calls = self.calls();
        let history = self.history(key);
        let mut cutoffs = vec![start];
        cutoffs.extend(
            calls
                .iter()
                .map(|c| c.seq)
                .chain(history.iter().map(|v| v.start))
                .filter(|s| *s > start && *s < end),
        );
        cutoffs.push(end);
        let mut first_err = None;
        for s in cutoffs {
            match self.admissible_at(key, answer, s, &calls, &history) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(format!(
            "{who} read of {} answered {answer}: {}\n  {}",
            KEYS[key],
            first_err.unwrap_or_default(),
            self.explain(key, start, end, &calls, &history)
        ))
    }

    /// What the model knew of `key` when a read of it in `[start, end]` was judged.
    fn explain(
        &self,
        key: usize,
        start: u64,
        end: u64,
        calls: &[Call],
        history: &[Version],
    ) -> String {
        let km = &self.keys[key];
        let writes: Vec<String> = km
            .writes
            .iter()
            .rev()
            .take(3)
            .map(|w| {
                format!(
                    "{} (start {}, ack {:?}, {:?} at the read's end)",
                    w.describe(),
                    w.start,
                    w.ack,
                    self.status(key, w, calls, end)
                )
            })
            .collect();
        let key_calls: Vec<String> = calls
            .iter()
            .filter(|c| c.key == KEYS[key])
            .rev()
            .take(6)
            .map(|c| format!("{}: {:?} {:?}", c.seq, c.kind, c.outcome))
            .collect();
        let versions: Vec<String> = history
            .iter()
            .rev()
            .take(4)
            .map(|v| format!("{:?} from {} to {:?}", v.value, v.start, v.end))
            .collect();
        format!(
            "the read ran in seqs [{start}, {end}]; newest writes first: [{}]; invalidated at {}; \
             local copy held: {}; the key's last source calls: [{}]; its last source values: [{}]; \
             dead letters listed before the read: {:?}",
            writes.join("; "),
            km.invalidated,
            km.local_valid,
            key_calls.join("; "),
            versions.join("; "),
            self.dead_before_read
        )
    }

    fn admissible_at(
        &self,
        key: usize,
        answer: &Answer,
        s: u64,
        calls: &[Call],
        history: &[Version],
    ) -> Check {
        let setup = self.setup;
        let km = &self.keys[key];
        let now = self.now();
        let w = self.newest(key);
        let status = w.map(|w| self.status(key, w, calls, s));
        let is_fresh_or_unknown =
            |f: &Option<Freshness>| !matches!(f, Some(Freshness::Stale { .. }));

        // Rule 1: an undelivered write-behind write is the answer.
        if let (Some(w), Some(Status::Pending)) = (w, status) {
            return match (&w.op, answer) {
                // The value is what I1 is about; a second process may label it stale.
                (Some(v), Answer::Value(x, _)) if v == x => Ok(()),
                (None, Answer::NotFound) => Ok(()),
                _ => Err(format!(
                    "I1/I2: the newest acknowledged write ({}) is undelivered and must be read back",
                    w.describe()
                )),
            };
        }

        // Latitude: a delivery the cache has not recorded yet.
        if let (Some(w), Some(Status::Delivered(at))) = (w, status) {
            if self.delivered_read_as_pending(key, w, at, answer) {
                return Ok(());
            }
        }

        // Rule 2: a local copy that is certainly held and fresh.
        if let Some(w) = w {
            let held = match (setup.strategy, status) {
                (Strategy::ReadThrough | Strategy::CacheAside | Strategy::WriteThrough, _) => true,
                (Strategy::WriteBehind, Some(Status::Delivered(_))) => !setup.memory(),
                _ => false,
            };
            if let Some(v) = &w.op {
                if held && km.local_valid && now < w.time + TTL_MS {
                    return match answer {
                        Answer::Value(x, f) if x == v && is_fresh_or_unknown(f) => Ok(()),
                        _ => Err(format!(
                            "I1: the acknowledged write ({}) is held in L2 and fresh",
                            w.describe()
                        )),
                    };
                }
            }
        }

        // Rule 3: cache-aside never asks the source and never serves stale.
        if setup.strategy == Strategy::CacheAside {
            return match answer {
                Answer::NotFound => Ok(()),
                _ => {
                    Err("cache-aside: nothing fresh is held, so the answer is \"not found\"".into())
                }
            };
        }

        // Rule 4: the source's values since the floor, by freshness.
        let mut floor = km.invalidated;
        if let Some(w) = w {
            floor = floor.max(w.ack.unwrap_or(w.start));
            if let Some(Status::Delivered(at)) = status {
                floor = floor.max(at);
            }
        }
        let unavailable = self.source_unavailable();
        let stale_ok = |basis: u64, f: &Option<Freshness>| -> bool {
            let window = basis + TTL_MS + STALE_MS > now;
            match f {
                Some(Freshness::Stale { reason }) => window && unavailable == Some(*reason),
                Some(Freshness::Fresh) => false,
                None => window && unavailable.is_some(),
            }
        };
        match answer {
            Answer::Other(e) => Err(format!("an error that is not an outage: {e}")),
            Answer::Unavailable(reason) => {
                if unavailable == Some(*reason) {
                    Ok(())
                } else {
                    Err(format!(
                        "unavailable({reason}) while the source is {}",
                        match unavailable {
                            Some(r) => format!("unavailable ({r})"),
                            None => "healthy".into(),
                        }
                    ))
                }
            }
            Answer::Value(x, f) => {
                // Read-through: its own local write, expired, may stand in as stale.
                if let (Strategy::ReadThrough, Some(w)) = (setup.strategy, w) {
                    if w.op.as_ref() == Some(x) && km.local_valid && stale_ok(w.time, f) {
                        return Ok(());
                    }
                }
                // A retried dead letter may or may not be read back.
                let retried = matches!(status, Some(Status::Retried))
                    || match (w, status) {
                        (Some(w), Some(Status::Refused(at))) => self.refusal_unrecorded(key, w, at),
                        _ => false,
                    };
                if let (Some(w), true) = (w, retried) {
                    if w.op.as_ref() == Some(x) {
                        return Ok(());
                    }
                }
                for v in history {
                    if v.value.as_ref() != Some(x) || v.start > s {
                        continue;
                    }
                    let (current, basis) = match v.end {
                        Some((e, t)) if e <= s => (false, t),
                        _ => (true, now),
                    };
                    if !current && v.end.is_some_and(|(e, _)| e <= floor) {
                        continue;
                    }
                    let fresh = basis + TTL_MS > now;
                    let ok = match f {
                        Some(Freshness::Fresh) => fresh,
                        _ => (f.is_none() && fresh) || stale_ok(basis, f),
                    };
                    if ok {
                        return Ok(());
                    }
                }
                Err(format!(
                    "I1: not the newest write nor a value the source held since seq {floor} \
                     within its freshness window (now {now}, source {})",
                    match unavailable {
                        Some(r) => format!("unavailable ({r})"),
                        None => "healthy".into(),
                    }
                ))
            }
            Answer::NotFound => {
                let retried = matches!(status, Some(Status::Retried))
                    || match (w, status) {
                        (Some(w), Some(Status::Refused(at))) => self.refusal_unrecorded(key, w, at),
                        _ => false,
                    };
                if let (Some(w), true) = (w, retried) {
                    if w.op.is_none() {
                        return Ok(());
                    }
                }
                for v in history {
                    if v.value.is_some() || v.start > s {
                        continue;
                    }
                    match v.end {
                        Some((e, _)) if e <= floor => continue,
                        Some((e, t)) if e <= s => {
                            if t + NEGATIVE_MS > now {
                                return Ok(());
                            }
                        }
                        _ => return Ok(()),
                    }
                }
                Err(format!(
                    "I1/I2: \"not found\", but the source has held a value since seq {floor}"
                ))
            }
        }
    }

    /// Checks the source calls made since the last scan: I3 (offline), the strategies' call rules
    /// and, for write-behind, per-key delivery order (I4, I5).
    fn scan_calls(&mut self) -> Check {
        let calls = self.calls();
        let new: Vec<Call> = calls[self.scanned..].to_vec();
        self.scanned = calls.len();
        for c in new {
            for (from, to) in self
                .offline_spans
                .iter()
                .filter(|_| !allowed("offline-calls"))
            {
                if c.seq > *from && to.is_none_or(|t| c.seq < t) {
                    return Err(format!(
                        "I3: a {:?} call for {} reached the source while offline",
                        c.kind, c.key
                    ));
                }
            }
            let writes = !matches!(c.kind, CallKind::Fetch);
            match self.setup.strategy {
                Strategy::CacheAside => {
                    return Err(format!("cache-aside called the source: {c:?}"));
                }
                Strategy::ReadThrough if writes => {
                    return Err(format!("read-through wrote to the source: {c:?}"));
                }
                Strategy::WriteBehind if writes && c.outcome == Outcome::Ok => {
                    let key = KEYS.iter().position(|k| *k == c.key).ok_or("unknown key")?;
                    let km = &mut self.keys[key];
                    let idx = match &c.kind {
                        CallKind::Put(_) => km.writes.iter().position(|w| w.matches(&c.kind)),
                        _ => km
                            .writes
                            .iter()
                            .rposition(|w| w.op.is_none() && w.start < c.seq),
                    };
                    let Some(idx) = idx else {
                        return Err(format!("the source received a write never made: {c:?}"));
                    };
                    if let Some(m) = km.max_delivered {
                        if idx < m {
                            return Err(format!(
                                "I4/I5: the source was rolled back: write #{idx} ({}) of {} \
                                 delivered after the newer write #{m} ({})",
                                km.writes[idx].describe(),
                                c.key,
                                km.writes[m].describe()
                            ));
                        }
                    }
                    km.max_delivered = Some(km.max_delivered.map_or(idx, |m| m.max(idx)));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// After a flush (or close) on a healthy, online source: nothing left pending (I5).
    fn check_settled(&self, pending: u64, what: &str) -> Check {
        if !self.setup.write_behind() || self.outage || self.offline {
            return Ok(());
        }
        if pending != 0 {
            return Err(format!(
                "I5: {what} on a healthy source left {pending} write(s) pending"
            ));
        }
        let calls = self.calls();
        let now_seq = self.fake.lock().seq;
        for (key, name) in KEYS.iter().enumerate() {
            if let Some(w) = self.newest(key) {
                let st = self.status(key, w, &calls, now_seq);
                if matches!(st, Status::Pending | Status::Retried) {
                    return Err(format!(
                        "I5: after {what} on a healthy source, the newest write of {} ({}) was \
                         neither delivered nor dead-lettered",
                        name,
                        w.describe()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Which dead letters, not superseded, the cache lists now (taken before a read; see
    /// `dead_before_read`).
    async fn snapshot_dead(&mut self, cache: &TieredCache) {
        self.dead_before_read = cache
            .dead_letters()
            .await
            .map(|d| {
                d.into_iter()
                    .filter(|d| !d.superseded)
                    .map(|d| (d.key, d.op))
                    .collect()
            })
            .unwrap_or_default();
    }

    /// Notes that a `flush` or `close` begins (see `quiesces`).
    fn quiesce(&mut self) {
        let seq = self.fake.tick();
        self.quiesces.push((seq, self.now()));
    }

    /// The first `flush` or `close` after the source answered a delivery at `at` that is sure to
    /// have waited for the cache to record it (seq and clock ms); `None`: maybe not recorded yet.
    fn recorded_by(&self, at: u64) -> Option<(u64, u64)> {
        let (q, time) = *self.quiesces.iter().find(|(q, _)| *q > at)?;
        if self.crashes.iter().any(|c| *c > at && *c < q) {
            return None;
        }
        Some((q, time))
    }

    /// Whether the source refused `w` (the key's newest write) at `at` but the cache had not
    /// recorded the dead letter when the current read began: the refusal is still being
    /// processed, and the read may have found the write pending. Not after a flush or close
    /// that began after the refusal (see `quiesces`).
    fn refusal_unrecorded(&self, key: usize, w: &Write, at: u64) -> bool {
        allowed("refused-served")
            || self.recorded_by(at).is_none()
                && !self
                    .dead_before_read
                    .contains(&(KEYS[key].to_owned(), w.op_name()))
    }

    /// Whether `answer` is `w` (the key's newest write, delivered at `at`) read back as still
    /// pending: the flusher removes a write's rows only after its round's other deliveries, and
    /// until then reads serve it as pending (fresh, held in L1 again for a TTL). The model
    /// cannot see when that happens; a flush or close that began after the delivery bounds it.
    fn delivered_read_as_pending(&self, key: usize, w: &Write, at: u64, answer: &Answer) -> bool {
        let matches = match (&w.op, answer) {
            (Some(v), Answer::Value(x, _)) => v == x,
            (None, Answer::NotFound) => true,
            _ => false,
        };
        if !matches {
            return false;
        }
        if self.may_be_an_older_delivery(key, w, at) {
            return true;
        }
        match self.recorded_by(at) {
            None => true,
            // A copy read back before the delivery was recorded may stay in L1 until its TTL
            // (a delete's is not held: it reads as "not found" from the outbox only).
            Some((q, time)) => {
                w.op.is_some() && self.keys[key].invalidated < q && self.now() < time + TTL_MS
            }
        }
    }

    /// Whether the source call at `at`, which the model credits to `w` (the first matching
    /// call after `w` began), may have delivered an older write of the key with the same op
    /// instead: the delivery round read the rows before `w`'s was committed, so `w`'s row is
    /// still pending (and will be sent again). The model cannot tell the two apart from the
    /// source's log, so it admits both.
    fn may_be_an_older_delivery(&self, key: usize, w: &Write, at: u64) -> bool {
        let calls = self.calls();
        let writes = &self.keys[key].writes;
        let Some(i) = writes.iter().position(|o| std::ptr::eq(o, w)) else {
            return false;
        };
        writes[..i].iter().any(|older| {
            older.op == w.op
                && older.ack.is_some()
                && matches!(
                    self.status(key, older, &calls, at - 1),
                    Status::Pending | Status::Retried
                )
        })
    }

    async fn read_one(&mut self, key: usize, lookup: bool) -> Check {
        let cache = self.cache()?.clone();
        self.snapshot_dead(&cache).await;
        let start = self.fake.tick();
        let answer = if lookup {
            classify(cache.lookup(KEYS[key]).await, |l| match l {
                Some(l) => Answer::Value(l.value, Some(l.freshness)),
                None => Answer::NotFound,
            })
        } else {
            classify(cache.get(KEYS[key]).await, |v| match v {
                Some(v) => Answer::Value(v, None),
                None => Answer::NotFound,
            })
        };
        let end = self.fake.tick();
        self.note(format!("    -> {answer}"));
        self.check_read(
            key,
            &answer,
            start,
            end,
            if lookup { "lookup" } else { "get" },
        )
    }

    fn note(&mut self, s: String) {
        self.trace.push(s);
    }

    async fn write(&mut self, key: usize, value: Option<Bytes>) -> Check {
        let cache = self.cache()?.clone();
        let start = self.fake.tick();
        let time = self.now();
        self.keys[key].writes.push(Write {
            op: value.clone(),
            start,
            ack: None,
            time,
            retried: Vec::new(),
            lost: None,
        });
        let r = match &value {
            Some(v) => cache.set(KEYS[key], v.clone()).await,
            None => cache.delete(KEYS[key]).await,
        };
        let end = self.fake.tick();
        let refused = self.fake.lock().refused.contains(KEYS[key]);
        match r {
            Ok(()) => {
                self.note("    -> ok".into());
                let km = &mut self.keys[key];
                if let Some(w) = km.writes.last_mut() {
                    w.ack = Some(end);
                }
                km.local_valid = value.is_some();
                if self.setup.strategy == Strategy::WriteThrough {
                    let w = km.writes.last().cloned().ok_or("no write")?;
                    let delivered = self.calls().iter().any(|c| {
                        c.key == KEYS[key]
                            && c.seq > start
                            && c.outcome == Outcome::Ok
                            && w.matches(&c.kind)
                    });
                    if !delivered {
                        return Err(
                            "write-through acknowledged a write the source did not take".into()
                        );
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.note(format!("    -> error: {e}"));
                self.keys[key].writes.pop();
                let excused = self.setup.strategy == Strategy::WriteThrough
                    && (self.offline || self.outage || refused);
                if excused {
                    Ok(())
                } else {
                    Err(format!("the write failed: {e}"))
                }
            }
        }
    }

    /// Closes the cache (or drops it: a crash) and opens it again on the same file.
    async fn restart(&mut self, crash: bool) -> Check {
        let cache = self.cache.take().ok_or("no cache open")?;
        if crash {
            drop(cache);
            let seq = self.fake.tick();
            self.crashes.push(seq);
            self.note("    -> dropped without close".into());
        } else {
            self.quiesce();
            let report = cache
                .close()
                .await
                .map_err(|e| format!("close failed: {e}"))?;
            self.note(format!("    -> {report:?}"));
            drop(cache);
            self.scan_calls()?;
            self.check_settled(report.pending, "close")?;
            if self.setup.memory() {
                // Documented: the memory outbox keeps nothing across a process; what close
                // could not deliver, and its dead letters, are gone.
                let seq = self.fake.tick();
                let calls = self.calls();
                for key in 0..KEYS.len() {
                    let Some(i) = self.keys[key].writes.iter().rposition(|w| w.ack.is_some())
                    else {
                        continue;
                    };
                    let w = self.keys[key].writes[i].clone();
                    if matches!(
                        self.status(key, &w, &calls, seq),
                        Status::Pending | Status::Retried
                    ) {
                        self.keys[key].writes[i].lost = Some(seq);
                    }
                }
                self.memory_closed = seq;
            }
        }
        if self.setup.memory() {
            for km in &mut self.keys {
                km.local_valid = false;
            }
        }
        self.open()
    }

    async fn step(&mut self, op: &Op) -> Check {
        match op {
            Op::Get(k) => self.read_one(*k, false).await?,
            Op::Lookup(k) => self.read_one(*k, true).await?,
            Op::Mget(ks) => {
                let cache = self.cache()?.clone();
                let names: Vec<&str> = ks.iter().map(|k| KEYS[*k]).collect();
                self.snapshot_dead(&cache).await;
                let start = self.fake.tick();
                let results = cache.mget(&names).await;
                let end = self.fake.tick();
                for (k, r) in ks.iter().zip(results) {
                    let answer = classify(r, |l| match l {
                        Some(l) => Answer::Value(l.value, Some(l.freshness)),
                        None => Answer::NotFound,
                    });
                    self.note(format!("    -> {}: {answer}", KEYS[*k]));
                    self.check_read(*k, &answer, start, end, "mget")?;
                }
            }
            Op::Set(k) => {
                self.next_value += 1;
                let v = Bytes::from(format!("w{}", self.next_value));
                self.note(format!("    value {}", String::from_utf8_lossy(&v)));
                self.write(*k, Some(v)).await?;
            }
            Op::Delete(k) => self.write(*k, None).await?,
            Op::Invalidate(k) => {
                let cache = self.cache()?.clone();
                cache
                    .invalidate(KEYS[*k])
                    .await
                    .map_err(|e| format!("invalidate failed: {e}"))?;
                let seq = self.fake.tick();
                self.keys[*k].invalidated = seq;
                self.keys[*k].local_valid = false;
            }
            Op::ClearMemory => {
                self.cache()?.clone().clear_memory().await;
                if self.setup.memory() {
                    // The memory outbox does not write L2: after delivery only L1 held the copy.
                    for km in &mut self.keys {
                        km.local_valid = false;
                    }
                }
            }
            Op::Flush => {
                let cache = self.cache()?.clone();
                self.quiesce();
                let report = cache
                    .flush()
                    .await
                    .map_err(|e| format!("flush failed: {e}"))?;
                self.note(format!("    -> {report:?}"));
                self.scan_calls()?;
                self.check_settled(report.pending, "flush")?;
            }
            Op::Advance(a) => {
                let d = match a {
                    Advance::Secs(s) => Duration::from_secs(*s),
                    Advance::PastTtl => Duration::from_millis(TTL_MS + 1_000),
                    Advance::PastStale => Duration::from_millis(TTL_MS + STALE_MS + 1_000),
                };
                self.clock.advance(d);
            }
            Op::Outage(on) => {
                self.fake.lock().outage = *on;
                self.outage = *on;
            }
            Op::Offline(on) => {
                self.cache()?.set_offline(*on);
                let seq = self.fake.tick();
                if *on && !self.offline {
                    self.offline_spans.push((seq, None));
                } else if !*on && self.offline {
                    if let Some(span) = self.offline_spans.last_mut() {
                        span.1 = Some(seq);
                    }
                }
                self.offline = *on;
            }
            Op::External(k, delete) => {
                let value = if *delete {
                    None
                } else {
                    self.next_value += 1;
                    Some(Bytes::from(format!("x{}", self.next_value)))
                };
                self.note(format!("    source {} := {:?}", KEYS[*k], value));
                self.fake.external(KEYS[*k], value);
            }
            Op::Refuse(k, on) => {
                let mut s = self.fake.lock();
                if *on {
                    s.refused.insert(KEYS[*k].to_owned());
                } else {
                    s.refused.remove(KEYS[*k]);
                }
            }
            Op::Restart => self.restart(false).await?,
            Op::Crash => self.restart(!self.setup.memory()).await?,
            Op::RetryDead(i) | Op::DiscardDead(i) => {
                let retry = matches!(op, Op::RetryDead(_));
                let cache = self.cache()?.clone();
                let dead = cache
                    .dead_letters()
                    .await
                    .map_err(|e| format!("dead_letters failed: {e}"))?;
                if let Some(d) = dead.get(i % dead.len().max(1)) {
                    let key = KEYS.iter().position(|k| *k == d.key).ok_or("unknown key")?;
                    let seq = self.fake.tick();
                    self.note(format!("    dead letter {} {} {}", d.id, d.key, d.op));
                    let found = if retry {
                        let calls = self.calls();
                        // Only a dead letter of the key's newest write may be retried (I4): an
                        // older one is superseded, and retrying it is refused.
                        let newest = self.keys[key]
                            .writes
                            .iter()
                            .rposition(|w| w.ack.is_some())
                            .map(|wi| (wi, self.keys[key].writes[wi].clone()))
                            .filter(|(_, w)| {
                                matches!(self.status(key, w, &calls, seq), Status::Refused(_))
                                    && w.op_name() == d.op
                            });
                        if d.superseded {
                            match cache.retry_dead_letter(d.id).await {
                                Err(Error::Superseded { id, .. }) if id == d.id => {
                                    self.note("    -> superseded: not retried".into());
                                    return Ok(());
                                }
                                other => {
                                    return Err(format!(
                                        "I4: retrying a superseded dead letter answered {other:?}"
                                    ))
                                }
                            }
                        }
                        match newest {
                            Some((wi, _)) => self.keys[key].writes[wi].retried.push(seq),
                            None => {
                                return Err(format!(
                                    "I4: dead letter {} of {} is not marked superseded, but it is \
                                     not the key's newest write",
                                    d.id, d.key
                                ))
                            }
                        }
                        cache.retry_dead_letter(d.id).await
                    } else {
                        self.keys[key].discarded.push(seq);
                        cache.discard_dead_letter(d.id).await
                    };
                    match found {
                        Ok(true) => {}
                        other => return Err(format!("a listed dead letter: {other:?}")),
                    }
                }
            }
            Op::SecondReader(k) => {
                if self.setup.memory() || allowed("second-reader") {
                    // The memory outbox is not in the database: another process cannot see it.
                    return Ok(());
                }
                let strategy = match self.setup.strategy {
                    Strategy::WriteBehind => Strategy::ReadThrough,
                    s => s,
                };
                let other = self
                    .builder(strategy)
                    .build()
                    .map_err(|e| format!("second process: build failed: {e}"))?;
                self.snapshot_dead(&other).await;
                let start = self.fake.tick();
                let answer = classify(other.lookup(KEYS[*k]).await, |l| match l {
                    Some(l) => Answer::Value(l.value, Some(l.freshness)),
                    None => Answer::NotFound,
                });
                let end = self.fake.tick();
                self.note(format!("    -> {answer}"));
                let _ = other.close().await;
                drop(other);
                self.check_read(*k, &answer, start, end, "second process's")?;
            }
        }
        Ok(())
    }

    /// The strict end: the source back, online, everything flushed; then once more after a
    /// restart.
    async fn finish(&mut self) -> Check {
        self.note("finish: outage off, offline off, flush".into());
        self.fake.lock().outage = false;
        self.outage = false;
        self.step(&Op::Offline(false)).await?;
        for round in 0..2 {
            let cache = self.cache()?.clone();
            self.quiesce();
            let report = cache
                .flush()
                .await
                .map_err(|e| format!("flush failed: {e}"))?;
            self.note(format!("    -> {report:?}"));
            self.scan_calls()?;
            self.check_settled(report.pending, "the final flush")?;
            self.check_final_source(round).await?;
            for (k, name) in KEYS.iter().enumerate() {
                self.note(format!("  final Lookup({})", name));
                self.read_one(k, true).await?;
                self.scan_calls()?;
            }
            if round == 0 {
                self.note("  final Restart".into());
                self.restart(false).await?;
            }
        }
        let cache = self.cache.take().ok_or("no cache open")?;
        cache
            .close()
            .await
            .map_err(|e| format!("close failed: {e}"))?;
        Ok(())
    }

    /// I4, I5: the source holds the newest delivered write of each key (unless the second
    /// writer changed it later); a refused newest write is a dead letter.
    async fn check_final_source(&self, round: usize) -> Check {
        let setup = self.setup;
        if !matches!(
            setup.strategy,
            Strategy::WriteBehind | Strategy::WriteThrough
        ) {
            return Ok(());
        }
        let calls = self.calls();
        let now_seq = self.fake.lock().seq;
        let dead = self
            .cache()?
            .dead_letters()
            .await
            .map_err(|e| format!("dead_letters failed: {e}"))?;
        for (key, name) in KEYS.iter().enumerate() {
            let Some(w) = self.newest(key) else { continue };
            let history = self.history(key);
            let last = history.last().cloned().unwrap_or_else(initial);
            match self.status(key, w, &calls, now_seq) {
                Status::Local | Status::Delivered(_) => {
                    if !last.external && last.value != w.op {
                        return Err(format!(
                            "I5: the source holds {:?} for {}, not the newest acknowledged \
                             write ({}) and no second writer changed it since",
                            last.value,
                            name,
                            w.describe()
                        ));
                    }
                }
                Status::Refused(at) => {
                    let excused = self.keys[key].discarded.iter().any(|d| *d > at)
                        || (setup.memory() && self.memory_closed > at)
                        || round > 0 && setup.memory();
                    let listed = dead.iter().any(|d| d.key == *name && d.op == w.op_name());
                    if !excused && !listed {
                        return Err(format!(
                            "I4: the refused write ({}) of {} is not among the dead letters",
                            w.describe(),
                            name
                        ));
                    }
                }
                Status::Lost | Status::Pending | Status::Retried => {}
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------ the runner

fn run_case(setup: Setup, ops: &[Op]) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut world = World::new(setup)?;
    let result = rt.block_on(async {
        world.open()?;
        for (i, op) in ops.iter().enumerate() {
            world.note(format!("#{i} {op:?}"));
            world.step(op).await?;
            world.scan_calls()?;
        }
        world.finish().await
    });
    // Stop background tasks before the runtime goes.
    world.cache = None;
    drop(rt);
    result.map_err(|e| {
        let tail: Vec<&String> = world.trace.iter().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
        format!("{e}\n  trace (last 60 lines):\n    {}", tail.join("\n    "))
    })
}

/// Known violations to let pass, so a run can look for others: `TIERCACHE_MODEL_ALLOW` is a
/// comma-separated list of `refused-served` (a refused write-behind write may be read back),
/// `offline-calls` (no I3 check), `second-reader` (no second process).
fn allowed(what: &str) -> bool {
    std::env::var("TIERCACHE_MODEL_ALLOW").is_ok_and(|v| v.split(',').any(|a| a.trim() == what))
}

/// Parses an op list as a failure prints it (`[Set(k3), Mget(["k4", "k1"]), ...]`, the brackets
/// optional), for `TIERCACHE_MODEL_REPLAY`.
fn parse_ops(text: &str) -> Result<Vec<Op>, String> {
    let text = text.trim();
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    // Split at the commas outside parentheses and brackets.
    let mut items = Vec::new();
    let (mut depth, mut from) = (0i32, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&text[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[from..]);
    let key = |k: &str| {
        let k = k.trim().trim_matches('"');
        KEYS.iter()
            .position(|n| *n == k)
            .ok_or_else(|| format!("unknown key {k:?}"))
    };
    let flag = |b: &str| match b.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("not a bool: {other:?}")),
    };
    let number = |n: &str| {
        n.trim()
            .parse::<u64>()
            .map_err(|e| format!("not a number {n:?}: {e}"))
    };
    items
        .into_iter()
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (name, arg) = match item.split_once('(') {
                Some((name, rest)) => (
                    name,
                    rest.strip_suffix(')')
                        .ok_or_else(|| format!("unbalanced: {item}"))?,
                ),
                None => (item, ""),
            };
            let two = || {
                arg.split_once(',')
                    .ok_or_else(|| format!("two arguments expected: {item}"))
            };
            Ok(match name {
                "Get" => Op::Get(key(arg)?),
                "Lookup" => Op::Lookup(key(arg)?),
                "Mget" => Op::Mget(
                    arg.trim_matches(|c| c == '[' || c == ']')
                        .split(',')
                        .map(key)
                        .collect::<Result<_, _>>()?,
                ),
                "Set" => Op::Set(key(arg)?),
                "Delete" => Op::Delete(key(arg)?),
                "Invalidate" => Op::Invalidate(key(arg)?),
                "ClearMemory" => Op::ClearMemory,
                "Flush" => Op::Flush,
                "Advance" => Op::Advance(match arg {
                    "PastTtl" => Advance::PastTtl,
                    "PastStale" => Advance::PastStale,
                    secs => Advance::Secs(number(
                        secs.strip_prefix("Secs(")
                            .and_then(|s| s.strip_suffix(')'))
                            .ok_or_else(|| format!("unknown advance: {item}"))?,
                    )?),
                }),
                "Outage" => Op::Outage(flag(arg)?),
                "Offline" => Op::Offline(flag(arg)?),
                "External" => {
                    let (k, what) = two()?;
                    Op::External(key(k)?, what.trim() == "delete")
                }
                "Refuse" => {
                    let (k, on) = two()?;
                    Op::Refuse(key(k)?, flag(on)?)
                }
                "Restart" => Op::Restart,
                "Crash" => Op::Crash,
                "RetryDead" => Op::RetryDead(number(arg)? as usize),
                "DiscardDead" => Op::DiscardDead(number(arg)? as usize),
                "SecondReader" => Op::SecondReader(key(arg)?),
                other => return Err(format!("unknown op {other:?}")),
            })
        })
        .collect()
}

/// `TIERCACHE_MODEL_REPLAY`: runs the given op list (as a failure prints it)
/// `TIERCACHE_MODEL_REPLAY_RUNS` times (default 1, or 50 for a background configuration, whose
/// runs differ with the flusher's timing) instead of generating cases; the first failure panics
/// with its trace. Select one configuration by the test's name.
fn replay(setup: Setup, list: &str) {
    let ops = parse_ops(list).unwrap_or_else(|e| panic!("TIERCACHE_MODEL_REPLAY: {e}"));
    let runs = env_u64(
        "TIERCACHE_MODEL_REPLAY_RUNS",
        if setup.background { 50 } else { 1 },
    );
    for run in 0..runs {
        if let Err(e) = run_case(setup, &ops) {
            panic!(
                "{setup:?}: the replayed list ({} ops) failed on run {}:\n{e}",
                ops.len(),
                run + 1
            );
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn model(setup: Setup, salt: u8) {
    if let Ok(list) = std::env::var("TIERCACHE_MODEL_REPLAY") {
        return replay(setup, &list);
    }
    let cases = env_u64("TIERCACHE_MODEL_CASES", 12) as u32;
    let max_ops = env_u64("TIERCACHE_MODEL_OPS", 60) as usize;
    let seed = env_u64("TIERCACHE_MODEL_SEED", 0x7133_CAC4E);
    let shrink_secs = env_u64("TIERCACHE_MODEL_SHRINK_SECS", 6);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_time: (shrink_secs * 1000) as u32,
        max_shrink_iters: 4096,
        rng_algorithm: RngAlgorithm::ChaCha,
        ..Config::default()
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = salt;
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let result = runner.run(&vec(op_strategy(), 1..=max_ops.max(1)), |ops| {
        run_case(setup, &ops).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => {
            let listing: Vec<String> = ops.iter().map(|o| format!("{o:?}")).collect();
            // The background flusher makes runs differ: replay the shrunk list for its own trace.
            let reason = (0..5)
                .find_map(|_| run_case(setup, &ops).err())
                .map(|r| format!("replayed: {r}"))
                .unwrap_or_else(|| format!("(did not fail again in 5 replays) {reason}"));
            panic!(
                "{setup:?} broke the contract (TIERCACHE_MODEL_SEED={seed}).\n\
                 shrunk ops ({}): [{}]\n{reason}",
                ops.len(),
                listing.join(", ")
            );
        }
        Err(e) => panic!("{setup:?}: {e}"),
    }
}

#[test]
fn read_through_model() {
    model(
        Setup {
            strategy: Strategy::ReadThrough,
            mode: OutboxMode::Durable,
            background: false,
            batched: false,
            refresh_ahead: false,
        },
        1,
    );
}

#[test]
fn cache_aside_model() {
    model(
        Setup {
            strategy: Strategy::CacheAside,
            mode: OutboxMode::Durable,
            background: false,
            batched: false,
            refresh_ahead: false,
        },
        2,
    );
}

#[test]
fn write_through_model() {
    model(
        Setup {
            strategy: Strategy::WriteThrough,
            mode: OutboxMode::Durable,
            background: false,
            batched: false,
            refresh_ahead: false,
        },
        3,
    );
}

#[test]
fn write_behind_durable_model() {
    model(
        Setup {
            strategy: Strategy::WriteBehind,
            mode: OutboxMode::Durable,
            background: false,
            batched: false,
            refresh_ahead: false,
        },
        4,
    );
}

#[test]
fn write_behind_memory_model() {
    model(
        Setup {
            strategy: Strategy::WriteBehind,
            mode: OutboxMode::Memory,
            background: false,
            batched: false,
            refresh_ahead: false,
        },
        5,
    );
}

#[test]
fn write_behind_durable_background_model() {
    model(
        Setup {
            strategy: Strategy::WriteBehind,
            mode: OutboxMode::Durable,
            background: true,
            batched: false,
            refresh_ahead: false,
        },
        6,
    );
}

#[test]
fn write_behind_memory_background_model() {
    model(
        Setup {
            strategy: Strategy::WriteBehind,
            mode: OutboxMode::Memory,
            background: true,
            batched: false,
            refresh_ahead: false,
        },
        7,
    );
}

#[test]
fn read_through_batched_model() {
    model(
        Setup {
            strategy: Strategy::ReadThrough,
            mode: OutboxMode::Durable,
            background: false,
            batched: true,
            refresh_ahead: false,
        },
        8,
    );
}

#[test]
fn write_behind_durable_batched_model() {
    model(
        Setup {
            strategy: Strategy::WriteBehind,
            mode: OutboxMode::Durable,
            background: false,
            batched: true,
            refresh_ahead: false,
        },
        9,
    );
}

#[test]
fn read_through_refresh_ahead_model() {
    model(
        Setup {
            strategy: Strategy::ReadThrough,
            mode: OutboxMode::Durable,
            background: false,
            batched: false,
            refresh_ahead: true,
        },
        10,
    );
}
