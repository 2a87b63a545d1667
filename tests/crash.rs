//! Crash consistency of the write-behind outbox.
//!
//! The test binary re-runs itself as a child process (`child_entry`, inert unless
//! `TIERCACHE_CRASH_CHILD=1`). The child makes acknowledged `set`s and `delete`s through a
//! write-behind cache on a database file, against a source that is down, flaky or slow, and logs
//! each acknowledgement (and each delivery its source accepted) to a file. The parent SIGKILLs it
//! at a seed-dependent point, then checks the database directly and replays the outbox into a
//! counting fake source.
//!
//! Every op of the child is generated from the seed, so the parent knows the exact sequence; the
//! ack log tells it how far each writer got. A writer has at most one op in flight, so the ops
//! committed are the acknowledged ones, plus perhaps the next one (committed, killed before the
//! ack was logged). Both hypotheses are tried; the database must match one exactly.
//!
//! Logs are written with one `write` call each and no fsync: a SIGKILL loses nothing the kernel
//! has accepted, which is the same guarantee SQLite's WAL gives a committed transaction under
//! `synchronous=NORMAL`. (Power loss is not simulated.)

mod support;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use rusqlite::Connection;
use support::FakeSource;
use tiercache::source::{Fetched, Source, SourceError};
use tiercache::{Strategy, Synchronous, TieredCache};

const CHILD_ENV: &str = "TIERCACHE_CRASH_CHILD";
const SEED_ENV: &str = "TIERCACHE_CRASH_SEED";
const DIR_ENV: &str = "TIERCACHE_CRASH_DIR";
/// `TIERCACHE_CRASH_SEEDS=N` or `A..B` runs other seeds (a longer soak).
const SEEDS_ENV: &str = "TIERCACHE_CRASH_SEEDS";
const DEFAULT_SEEDS: u64 = 48;
/// A writer stops after this many ops (and idles until killed), bounding the outbox.
const MAX_OPS_PER_TASK: usize = 1500;
/// Outbox rows one delivery round reads (`ROUND_ROWS` in src/outbox.rs): with no more pending than
/// this, replay delivers each key exactly once.
const ROUND_ROWS: usize = 4096;

const DB: &str = "cache.db";
const ACKS: &str = "acks.log";
const DELIVERED: &str = "delivered.log";

// ------------------------------------------------------------------ the plan of one seed

/// What the child's source does with writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every write fails (transiently): nothing is delivered, everything stays in the outbox.
    Outage,
    /// About 40% of writes fail transiently (503, timeout, rate limit); the rest succeed.
    Flaky,
    /// Every write succeeds after up to 15 ms.
    Slow,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    mode: Mode,
    full_sync: bool,
    /// Concurrent writers; each owns its own keys, so per-key order is one writer's order.
    tasks: usize,
    keys_per_task: usize,
    /// The kill comes once this many ops are acknowledged (0: possibly while the database opens) ...
    min_acks: usize,
    /// ... plus this long.
    extra_delay: Duration,
}

impl Plan {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xC0DE);
        let mode = match seed % 3 {
            0 => Mode::Outage,
            1 => Mode::Flaky,
            _ => Mode::Slow,
        };
        Self {
            seed,
            mode,
            full_sync: seed % 4 == 3,
            tasks: rng.usize(1..=4),
            keys_per_task: rng.usize(1..=6),
            min_acks: if seed % 8 == 5 { 0 } else { rng.usize(1..400) },
            // With no acks to wait for, a wider window: the kill may land while the database is
            // being created, or among the first writes.
            extra_delay: Duration::from_micros(if seed % 8 == 5 {
                rng.u64(0..12_000)
            } else {
                rng.u64(0..20_000)
            }),
        }
    }

    fn ops(&self, task: usize) -> OpGen {
        OpGen {
            rng: fastrand::Rng::with_seed(self.seed.wrapping_mul(1_000_003) + task as u64),
            task,
            keys: self.keys_per_task,
            next: 0,
        }
    }

    fn keys(&self) -> impl Iterator<Item = (usize, String)> + '_ {
        (0..self.tasks).flat_map(move |t| (0..self.keys_per_task).map(move |k| (t, key(t, k))))
    }
}

fn key(task: usize, k: usize) -> String {
    format!("t{task}/k{k}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// The value is `<key>#<index>`: unique, and names its op.
    Put(String),
    Delete,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Put(v) => write!(f, "put {v}"),
            Op::Delete => f.write_str("delete"),
        }
    }
}

#[derive(Debug, Clone)]
struct Step {
    key: String,
    op: Op,
}

/// The op sequence of one writer, the same in child and parent.
struct OpGen {
    rng: fastrand::Rng,
    task: usize,
    keys: usize,
    next: usize,
}

impl Iterator for OpGen {
    type Item = Step;

    fn next(&mut self) -> Option<Step> {
        if self.next >= MAX_OPS_PER_TASK {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let key = key(self.task, self.rng.usize(0..self.keys));
        let op = if self.rng.u8(0..5) == 0 {
            Op::Delete
        } else {
            Op::Put(format!("{key}#{index}"))
        };
        Some(Step { key, op })
    }
}

// ------------------------------------------------------------------ the child

/// The source of the child: down, flaky or slow, logging each write it accepts before accepting.
#[derive(Debug)]
struct CrashSource {
    mode: Mode,
    rng: Mutex<fastrand::Rng>,
    log: File,
}

impl CrashSource {
    async fn write(&self, line: String) -> Result<(), SourceError> {
        let (delay, fail) = {
            let mut rng = self.rng.lock().unwrap();
            let (delay, fail) = match self.mode {
                Mode::Outage => (rng.u64(0..500), true),
                Mode::Flaky => (rng.u64(0..3_000), rng.u8(0..5) < 2),
                Mode::Slow => (rng.u64(0..15_000), false),
            };
            let error = match rng.u8(0..3) {
                0 => SourceError::Unavailable {
                    status: Some(503),
                    message: "Service Unavailable".into(),
                },
                1 => SourceError::Timeout {
                    after: Duration::from_millis(5),
                },
                _ => SourceError::RateLimited {
                    until: SystemTime::now() + Duration::from_millis(5),
                    status: Some(429),
                    message: "slow down".into(),
                },
            };
            (Duration::from_micros(delay), fail.then_some(error))
        };
        tokio::time::sleep(delay).await;
        if let Some(e) = fail {
            return Err(e);
        }
        (&self.log)
            .write_all(line.as_bytes())
            .expect("log a delivery");
        Ok(())
    }
}

#[async_trait]
impl Source for CrashSource {
    async fn fetch(&self, _key: &str, _validator: Option<&str>) -> Result<Fetched, SourceError> {
        Ok(Fetched::NotFound)
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), SourceError> {
        let value = std::str::from_utf8(value).expect("utf-8 value");
        self.write(format!("{key} P {value}\n")).await
    }

    async fn delete(&self, key: &str) -> Result<(), SourceError> {
        self.write(format!("{key} D\n")).await
    }
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The child: writes until killed. Does nothing in an ordinary test run.
#[test]
fn child_entry() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let dir = PathBuf::from(std::env::var_os(DIR_ENV).unwrap());
    let plan = Plan::new(seed);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(child_main(plan, dir));
}

async fn child_main(plan: Plan, dir: PathBuf) {
    let source = CrashSource {
        mode: plan.mode,
        rng: Mutex::new(fastrand::Rng::with_seed(plan.seed)),
        log: append(&dir.join(DELIVERED)),
    };
    let cache = TieredCache::builder()
        .strategy(Strategy::WriteBehind)
        .sqlite_path(dir.join(DB))
        .synchronous(if plan.full_sync {
            Synchronous::Full
        } else {
            Synchronous::Normal
        })
        .source(source)
        .retry_base(Duration::from_millis(2))
        .retry_max(Duration::from_millis(20))
        .build()
        .expect("open the cache");
    let acks = Arc::new(append(&dir.join(ACKS)));
    let writers: Vec<_> = (0..plan.tasks)
        .map(|task| {
            let (cache, acks) = (cache.clone(), acks.clone());
            tokio::spawn(async move {
                for (index, step) in plan.ops(task).enumerate() {
                    let done = match &step.op {
                        Op::Put(v) => cache.set(&step.key, v.clone()).await,
                        Op::Delete => cache.delete(&step.key).await,
                    };
                    done.unwrap_or_else(|e| panic!("{} {}: {e}", step.key, step.op));
                    // Acknowledged: one write call, so the line is whole or absent.
                    (&*acks)
                        .write_all(format!("{task} {index}\n").as_bytes())
                        .expect("log an ack");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    // Out of ops: wait for the kill.
    std::future::pending::<()>().await;
}

// ------------------------------------------------------------------ the parent

/// Complete lines of a log (a line cut by the kill is ignored).
fn lines(path: &Path) -> Vec<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete.lines().map(str::to_owned).collect()
}

/// Acknowledged ops per writer, checked to be in the writer's order.
fn read_acks(path: &Path, tasks: usize) -> Vec<usize> {
    let mut acked = vec![0; tasks];
    for line in lines(path) {
        let (t, i) = line.split_once(' ').expect("ack line");
        let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, acked[t], "acks of writer {t} out of order");
        acked[t] += 1;
    }
    acked
}

/// Writes the child's source accepted, per key, in order.
fn read_deliveries(path: &Path) -> HashMap<String, Vec<Op>> {
    let mut out: HashMap<String, Vec<Op>> = HashMap::new();
    for line in lines(path) {
        let mut parts = line.splitn(3, ' ');
        let (key, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let op = match kind {
            "P" => Op::Put(parts.next().unwrap().to_owned()),
            _ => Op::Delete,
        };
        out.entry(key.to_owned()).or_default().push(op);
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
struct DbState {
    entries: BTreeMap<String, String>,
    /// Pending outbox rows per key, by id.
    outbox: BTreeMap<String, Vec<Op>>,
    rows: usize,
    /// Whether the tables existed (the kill may come while the database is being created).
    created: bool,
}

fn quick_check(conn: &Connection) {
    let check: Vec<String> = conn
        .prepare("PRAGMA quick_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(check, ["ok"], "PRAGMA quick_check");
}

/// Opens the database as SQLite itself would after the crash and reads it all.
fn read_db(path: &Path, anything_acked: bool) -> DbState {
    let conn = Connection::open(path).unwrap();
    quick_check(&conn);
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let mut state = DbState {
        entries: BTreeMap::new(),
        outbox: BTreeMap::new(),
        rows: 0,
        created: false,
    };
    if !(tables.iter().any(|t| t == "entries") && tables.iter().any(|t| t == "outbox")) {
        // Killed while the database was being created; only possible before any ack.
        assert!(
            !anything_acked,
            "acknowledged writes, but tables {tables:?}"
        );
        return state;
    }
    state.created = true;
    let utf8 = |v: Vec<u8>| String::from_utf8(v).unwrap();
    let mut stmt = conn.prepare("SELECT key, value FROM entries").unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let value: Option<Vec<u8>> = r.get(1).unwrap();
        let value = value.expect("write-behind stores no negative entries");
        state.entries.insert(r.get(0).unwrap(), utf8(value));
    }
    let mut stmt = conn
        .prepare("SELECT key, op, value, dead FROM outbox ORDER BY id")
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let (key, op, value, dead): (String, String, Option<Vec<u8>>, i64) = (
            r.get(0).unwrap(),
            r.get(1).unwrap(),
            r.get(2).unwrap(),
            r.get(3).unwrap(),
        );
        assert_eq!(dead, 0, "{key}: only transient failures, yet a dead letter");
        let op = match (op.as_str(), value) {
            ("put", Some(v)) => Op::Put(utf8(v)),
            ("delete", None) => Op::Delete,
            other => panic!("{key}: bad outbox row {other:?}"),
        };
        state.outbox.entry(key).or_default().push(op);
        state.rows += 1;
    }
    state
}

/// Maps each delivered op of a key to the index of a committed op it can be: puts by their
/// (unique) value, deletes to the first delete after the previous match. Fails when a delivery
/// matches nothing committed or is out of order.
fn match_ops(committed: &[Op], delivered: &[Op]) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(delivered.len());
    let mut after: Option<usize> = None;
    for d in delivered {
        let from = after.map_or(0, |a| a + 1);
        let found = committed[from.min(committed.len())..]
            .iter()
            .position(|c| c == d)
            .map(|p| p + from);
        match found {
            Some(i) => {
                out.push(i);
                after = Some(i);
            }
            None => {
                return Err(format!(
                    "delivered {d} matches no committed op after index {after:?} (committed {}, delivered {})",
                    brief(committed),
                    brief(delivered)
                ))
            }
        }
    }
    Ok(out)
}

/// The last few of `ops`, for messages.
fn brief(ops: &[Op]) -> String {
    const SHOWN: usize = 6;
    let tail: Vec<String> = ops
        .iter()
        .rev()
        .take(SHOWN)
        .rev()
        .map(Op::to_string)
        .collect();
    match ops.len().saturating_sub(SHOWN) {
        0 => format!("[{}]", tail.join(", ")),
        n => format!("[({n} before), {}]", tail.join(", ")),
    }
}

/// What one key must look like after the crash, and what replay must do with it.
#[derive(Debug)]
struct KeyExpect {
    /// The ops still pending (a suffix of the committed ops); replay delivers their last.
    pending: Vec<Op>,
    /// The source's value once everything is delivered.
    final_value: Option<String>,
    /// The last write the child's source accepted.
    last_delivered: Option<Op>,
}

/// Checks the keys of one writer against the hypothesis that exactly `committed` were committed.
fn check_writer(
    plan: &Plan,
    task: usize,
    committed: &[Step],
    db: &DbState,
    deliveries: &HashMap<String, Vec<Op>>,
) -> Result<BTreeMap<String, KeyExpect>, String> {
    let mut out = BTreeMap::new();
    for k in 0..plan.keys_per_task {
        let key = key(task, k);
        let ops: Vec<Op> = committed
            .iter()
            .filter(|s| s.key == key)
            .map(|s| s.op.clone())
            .collect();
        // L2 holds the last committed op.
        let final_value = match ops.last() {
            Some(Op::Put(v)) => Some(v.clone()),
            _ => None,
        };
        if db.entries.get(&key) != final_value.as_ref() {
            return Err(format!(
                "{key}: L2 holds {:?}, the last committed op is {:?}",
                db.entries.get(&key),
                ops.last()
            ));
        }
        // The outbox holds a suffix of the committed ops, exactly.
        let rows = db.outbox.get(&key).map_or(&[][..], Vec::as_slice);
        let removed = ops.len().checked_sub(rows.len()).ok_or_else(|| {
            format!(
                "{key}: {} outbox rows for {} committed ops",
                rows.len(),
                ops.len()
            )
        })?;
        if rows != &ops[removed..] {
            return Err(format!(
                "{key}: the outbox holds {}, not the tail of the committed {}",
                brief(rows),
                brief(&ops)
            ));
        }
        // What left the outbox was delivered: the last op removed (which stands for those
        // before it, coalesced) is in the delivery log; deliveries are committed ops, in order;
        // only the very last may still be in the outbox (killed before the row was removed).
        let delivered = deliveries.get(&key).map_or(&[][..], Vec::as_slice);
        if plan.mode == Mode::Outage && !delivered.is_empty() {
            return Err(format!(
                "{key}: delivered {} during an outage",
                brief(delivered)
            ));
        }
        let matched = match_ops(&ops, delivered).map_err(|e| format!("{key}: {e}"))?;
        if let Some(pos) = matched.iter().position(|&i| i >= removed) {
            if pos + 1 != matched.len() {
                return Err(format!(
                    "{key}: delivered {} while it was still pending, then delivered more: {}",
                    delivered[pos],
                    brief(delivered)
                ));
            }
        }
        if removed > 0 {
            let last_removed = removed - 1;
            let ok = match &ops[last_removed] {
                put @ Op::Put(_) => delivered.contains(put),
                Op::Delete => {
                    // A delete delivery between the puts delivered before and after it.
                    let put_index = |d: &Op| match d {
                        Op::Put(_) => ops.iter().position(|o| o == d),
                        Op::Delete => None,
                    };
                    let lo = delivered
                        .iter()
                        .rposition(|d| put_index(d).is_some_and(|i| i < last_removed));
                    let hi = delivered
                        .iter()
                        .position(|d| put_index(d).is_some_and(|i| i > last_removed))
                        .unwrap_or(delivered.len());
                    let lo = lo.map_or(0, |p| p + 1);
                    lo < hi && delivered[lo..hi].contains(&Op::Delete)
                }
            };
            if !ok {
                return Err(format!(
                    "{key}: {} left the outbox but was never delivered (delivered {})",
                    ops[last_removed],
                    brief(delivered)
                ));
            }
        }
        out.insert(
            key,
            KeyExpect {
                pending: ops[removed..].to_vec(),
                final_value,
                last_delivered: delivered.last().cloned(),
            },
        );
    }
    Ok(out)
}

#[derive(Debug)]
struct SeedReport {
    created: bool,
    acked: usize,
    unacked_committed: usize,
    pending_rows: usize,
    child_deliveries: usize,
    replay_writes: usize,
}

/// Kills and reaps the child however the parent leaves (a failed assertion included).
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the child of `plan` in `path` and SIGKILLs it at the plan's point.
fn run_and_kill_child(exe: &Path, plan: &Plan, path: &Path) {
    let seed = plan.seed;
    let mut child = Reap(
        Command::new(exe)
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env(SEED_ENV, seed.to_string())
            .env(DIR_ENV, path)
            .stdin(Stdio::null())
            .stdout(File::create(path.join("child.out")).unwrap())
            .stderr(File::create(path.join("child.err")).unwrap())
            .spawn()
            .expect("spawn the child"),
    );
    let child_output = || {
        std::fs::read_to_string(path.join("child.err")).unwrap_or_default()
            + &std::fs::read_to_string(path.join("child.out")).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut exited = None;
    while lines(&path.join(ACKS)).len() < plan.min_acks {
        if let Some(status) = child.0.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "seed {seed}: the child made no progress\n{}",
                child_output()
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    if exited.is_none() {
        std::thread::sleep(plan.extra_delay);
        exited = child.0.try_wait().unwrap();
    }
    if let Some(status) = exited {
        panic!(
            "seed {seed}: the child exited by itself ({status})\n{}",
            child_output()
        );
    }
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "seed {seed}: {status}");
}

/// Reopens the crashed database with the library, in write-behind mode against a counting
/// source, and flushes: returns the writes the source received, per key, in order.
fn replay(db_path: &Path, seed: u64) -> (usize, HashMap<String, Vec<Op>>) {
    let source = FakeSource::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cache = TieredCache::builder()
            .strategy(Strategy::WriteBehind)
            .sqlite_path(db_path)
            .source(source.clone())
            .build()
            .unwrap_or_else(|e| panic!("seed {seed}: reopen: {e}"));
        // The child's failing source may have opened the persisted breaker, which a reopened
        // cache respects; the source is healthy now, as an operator would tell it.
        cache.reset_source_breaker().await;
        let report = cache.flush().await.unwrap();
        assert!(report.is_complete(), "seed {seed}: {report:?}");
        let summary = cache.store_summary().await.unwrap();
        assert_eq!(
            (summary.outbox_depth, summary.dead_letters),
            (0, 0),
            "seed {seed}"
        );
        assert!(cache.close().await.unwrap().is_complete());
    });
    let mut writes: HashMap<String, Vec<Op>> = HashMap::new();
    let all_writes = source.writes();
    for (key, value) in &all_writes {
        let op = match value {
            Some(v) => Op::Put(String::from_utf8(v.to_vec()).unwrap()),
            None => Op::Delete,
        };
        writes.entry(key.clone()).or_default().push(op);
    }
    (all_writes.len(), writes)
}

fn run_seed(exe: &Path, seed: u64) -> SeedReport {
    let plan = Plan::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    run_and_kill_child(exe, &plan, path);

    // ---- the state the crash left
    let acked = read_acks(&path.join(ACKS), plan.tasks);
    let deliveries = read_deliveries(&path.join(DELIVERED));
    // The raw checks read a copy (opening it makes SQLite recover the WAL), so that the replay
    // below opens the files exactly as the crash left them and the library recovers them itself.
    let db_path = path.join(DB);
    let copy = path.join("copy.db");
    for suffix in ["", "-wal"] {
        let from = PathBuf::from(format!("{}{suffix}", db_path.display()));
        if from.exists() {
            std::fs::copy(&from, format!("{}{suffix}", copy.display())).unwrap();
        }
    }
    let db = read_db(&copy, acked.iter().any(|&a| a > 0));
    for key in db.entries.keys().chain(db.outbox.keys()) {
        assert!(
            plan.keys().any(|(_, k)| &k == key),
            "seed {seed}: unknown key {key}"
        );
    }
    let mut expect: BTreeMap<String, KeyExpect> = BTreeMap::new();
    let mut unacked_committed = 0;
    for (task, &a) in acked.iter().enumerate() {
        let steps: Vec<Step> = plan.ops(task).take(a + 1).collect();
        // Committed: the acknowledged ops, or those and the one in flight.
        let mut errors = Vec::new();
        let found = [a + 1, a]
            .into_iter()
            .filter(|&n| n <= steps.len())
            .find_map(
                |n| match check_writer(&plan, task, &steps[..n], &db, &deliveries) {
                    Ok(e) => Some((n, e)),
                    Err(e) => {
                        errors.push(format!("with {n} ops committed: {e}"));
                        None
                    }
                },
            );
        let Some((n, e)) = found else {
            panic!(
                "seed {seed} ({plan:?}), writer {task}, {a} acked:\n  {}",
                errors.join("\n  ")
            );
        };
        unacked_committed += n - a;
        expect.extend(e);
    }

    // ---- replay into a counting source
    let (replay_writes, mut writes) = replay(&db_path, seed);
    for (key, e) in &expect {
        let got = writes.remove(key).unwrap_or_default();
        let context = || {
            format!(
                "seed {seed}: {key}: pending {}, replayed {}",
                brief(&e.pending),
                brief(&got)
            )
        };
        if e.pending.is_empty() {
            assert!(got.is_empty(), "{}", context());
        } else {
            // Replay delivers pending ops in order and ends with the last; all in one write
            // when one round reads the whole outbox.
            assert_eq!(got.last(), e.pending.last(), "{}", context());
            match_ops(&e.pending, &got).unwrap_or_else(|m| panic!("{}: {m}", context()));
            if db.rows <= ROUND_ROWS {
                assert_eq!(got.len(), 1, "{}", context());
            }
        }
        // End to end: what the source ends up holding is the last committed op.
        let held = match got.last().or(e.last_delivered.as_ref()) {
            Some(Op::Put(v)) => Some(v),
            _ => None,
        };
        assert_eq!(
            held,
            e.final_value.as_ref(),
            "seed {seed}: {key}: final value"
        );
    }
    assert!(writes.is_empty(), "seed {seed}: stray writes {writes:?}");

    // ---- the database after replay: sound, outbox empty, entries untouched
    let after = read_db(&db_path, true);
    assert_eq!(after.rows, 0, "seed {seed}");
    assert_eq!(after.entries, db.entries, "seed {seed}: replay changed L2");

    SeedReport {
        created: db.created,
        acked: acked.iter().sum(),
        unacked_committed,
        pending_rows: db.rows,
        child_deliveries: deliveries.values().map(Vec::len).sum(),
        replay_writes,
    }
}

fn seeds() -> std::ops::Range<u64> {
    match std::env::var(SEEDS_ENV) {
        Ok(s) => match s.split_once("..") {
            Some((a, b)) => a.parse().unwrap()..b.parse().unwrap(),
            None => 0..s.parse().unwrap(),
        },
        Err(_) => 0..DEFAULT_SEEDS,
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let seeds = seeds();
    let count = seeds.end - seeds.start;
    for seed in seeds {
        let t = Instant::now();
        let r = run_seed(&exe, seed);
        let plan = Plan::new(seed);
        eprintln!(
            "seed {seed:>3} {:<6} {} writers={} keys={:<2} db={:<4} acked={:<4} +unacked={} pending_rows={:<4} child_delivered={:<4} replayed={:<3} {:?}",
            format!("{:?}", plan.mode),
            if plan.full_sync { "FULL  " } else { "NORMAL" },
            plan.tasks,
            plan.tasks * plan.keys_per_task,
            if r.created { "ok" } else { "none" },
            r.acked,
            r.unacked_committed,
            r.pending_rows,
            r.child_deliveries,
            r.replay_writes,
            t.elapsed(),
        );
    }
    eprintln!("{count} seeds in {:?}", start.elapsed());
}
