//! The counters, eviction and the outbox's bound, against the tier itself (the writer's
//! touches applied on demand, so every step is deterministic).

use std::time::Duration;

use bytes::Bytes;

use super::writer::EVICT_PER_COMMIT;
use super::{storage, Location, OnCorrupt, SqliteOptions, SqliteTier, Synchronous};
use crate::error::{Error, Result};
use crate::tier::{EntryStore, OutboxOp, OutboxStore, StoreSummary, StoredEntry};

/// The options of a memory database bounded at `max_bytes`.
pub(super) fn options(max_bytes: u64) -> SqliteOptions {
    SqliteOptions {
        location: Location::Memory,
        max_bytes,
        outbox_max_bytes: super::outbox_bound(max_bytes),
        synchronous: Synchronous::default(),
        on_corrupt: OnCorrupt::default(),
        readers: 1,
        busy_timeout: Duration::from_secs(1),
        pragmas: Vec::new(),
    }
}

/// A memory database bounded at `max_bytes`.
pub(super) fn tier(max_bytes: u64) -> SqliteTier {
    SqliteTier::open(options(max_bytes)).expect("a memory database")
}

fn entry(len: usize, at: u64, stale_until: u64) -> StoredEntry {
    StoredEntry::new(
        Some(Bytes::from(vec![b'v'; len])),
        None,
        at,
        at + 10,
        stale_until,
    )
}

/// What the counters say, counted the slow way: every row read.
fn scan(tier: &SqliteTier, now: u64) -> Result<StoreSummary> {
    tier.read(|c| {
        let mut s = StoreSummary::default();
        let (n, bytes, stale, negative): (i64, i64, i64, i64) = c.query_row(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(fresh_until <= ?1), 0),
                    coalesce(sum(value IS NULL), 0) FROM entries",
            [now as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        let (pending, dead, obytes, oldest): (i64, i64, i64, Option<i64>) = c.query_row(
            "SELECT coalesce(sum(dead = 0), 0), coalesce(sum(dead = 1), 0),
                    coalesce(sum(length(CAST(key AS BLOB)) + coalesce(length(value), 0)), 0),
                    min(CASE WHEN dead = 0 THEN created_at END) FROM outbox",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        s.entries = n as u64;
        s.bytes = bytes as u64;
        s.stale_entries = stale as u64;
        s.negative_entries = negative as u64;
        s.outbox_depth = pending as u64;
        s.dead_letters = dead as u64;
        s.outbox_bytes = obytes as u64;
        s.oldest_pending_ms = oldest.map(|t| t as u64);
        Ok(s)
    })
    .map_err(storage("scan"))
}

fn keys_held(tier: &SqliteTier) -> Result<Vec<String>> {
    tier.read(|c| {
        c.prepare("SELECT key FROM entries ORDER BY key")?
            .query_map([], |r| r.get(0))?
            .collect()
    })
    .map_err(storage("list"))
}

#[tokio::test]
async fn the_counters_match_a_scan_after_random_operations() -> Result<()> {
    for seed in [1, 7, 42] {
        let mut rng = fastrand::Rng::with_seed(seed);
        // A bound small enough that eviction runs often.
        let tier = tier(40_000);
        let mut now = 1_000;
        let mut ids: Vec<i64> = Vec::new();
        for step in 0..400 {
            now += rng.u64(0..50);
            let key = format!("k{}", rng.usize(0..60));
            match rng.u8(0..14) {
                0..=2 => {
                    let e = entry(rng.usize(0..3000), now, now + rng.u64(0..400));
                    tier.put(&key, e).await?;
                }
                3 => {
                    let neg = StoredEntry::new(None, Some("\"e\"".into()), now, now + 5, now + 50);
                    tier.put(&key, neg).await?;
                }
                4 => tier.remove(&key).await?,
                5 => {
                    let v = Bytes::from(vec![b'o'; rng.usize(0..500)]);
                    let e = entry(v.len(), now, now + 100);
                    ids.push(tier.enqueue(&key, Some(e), OutboxOp::Put(v), now).await?);
                }
                6 => ids.push(tier.enqueue(&key, None, OutboxOp::Delete, now).await?),
                7 if !ids.is_empty() => {
                    let id = ids.swap_remove(rng.usize(0..ids.len()));
                    tier.outbox_complete(vec![id]).await?;
                }
                8 if !ids.is_empty() => {
                    let id = ids[rng.usize(0..ids.len())];
                    let dead = rng.bool();
                    tier.outbox_failed(vec![id], now, "no".into(), dead).await?;
                }
                9 if !ids.is_empty() => {
                    let id = ids[rng.usize(0..ids.len())];
                    tier.resolve_dead_letter(id, rng.bool()).await?;
                }
                10 => {
                    let e = entry(rng.usize(0..2000), now, now + 300);
                    tier.merge(vec![(key.clone(), e)]).await?;
                }
                11 => tier.remove_settled(&key, rng.i64(0..50)).await?,
                12 => {
                    // A job that changes rows, then fails: its batch is rolled back, rows and
                    // what it counted.
                    let e = entry(rng.usize(0..2000), now, now + 300);
                    let before = (tier.get(&key).await?, tier.get("k0").await?);
                    let k = key.clone();
                    let failed = tier
                        .write(move |c, state| {
                            super::changes::put_entry(c, state, &k, &e)?;
                            super::changes::remove_entry(c, state, "k0")?;
                            Err::<(), _>(rusqlite::Error::QueryReturnedNoRows)
                        })
                        .await;
                    assert!(failed.is_err());
                    let after = (tier.get(&key).await?, tier.get("k0").await?);
                    assert_eq!(before, after, "a failed job changes nothing");
                }
                _ => {
                    tier.touch(&key, now);
                    tier.apply_touches().await?;
                }
            }
            let (entries, recency): (i64, i64) = tier
                .read(|c| {
                    c.query_row(
                        "SELECT (SELECT count(*) FROM entries),
                                (SELECT count(*) FROM recency JOIN entries ON entries.rowid = recency.id)",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                })
                .map_err(storage("recency"))?;
            let orphans: i64 = tier
                .read(|c| c.query_row("SELECT count(*) FROM recency", [], |r| r.get(0)))
                .map_err(storage("recency"))?;
            assert_eq!(
                (recency, orphans),
                (entries, entries),
                "one recency row per entry"
            );
            let at = now + rng.u64(0..100);
            assert_eq!(
                tier.summary(at).await?,
                scan(&tier, at)?,
                "seed {seed}, step {step}"
            );
        }
        let s = tier.summary(now).await?;
        assert!(
            s.entries > 0 && s.outbox_depth + s.dead_letters > 0,
            "{s:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn eviction_takes_expired_entries_first_then_the_least_recently_used() -> Result<()> {
    // Room for ten 1,000-byte entries; past it, eviction goes down to 9,000 bytes.
    let tier = tier(10_000);
    for (i, key) in ["a", "b", "c", "d", "e", "f", "g", "h"].iter().enumerate() {
        let at = 100 + i as u64;
        // "f" and "c" expire at 150 and 140; the others live on.
        let stale_until = match *key {
            "c" => 140,
            "f" => 150,
            _ => 10_000,
        };
        tier.put(key, entry(1000, at, stale_until)).await?;
    }
    // Read at 200: "a" and "b", the oldest writes, become the most recently used.
    tier.touch("a", 200);
    tier.touch("b", 201);
    tier.apply_touches().await?;
    // 11,000 bytes: 2,000 to go. The expired "c" and "f" go, although "d" is older than "f".
    tier.put("i", entry(1000, 202, 10_000)).await?;
    tier.put("j", entry(1000, 203, 10_000)).await?;
    tier.put("k", entry(1000, 204, 10_000)).await?;
    assert_eq!(
        keys_held(&tier)?,
        ["a", "b", "d", "e", "g", "h", "i", "j", "k"]
    );
    // Nothing has expired now: the least recently used go, "d" then "e" (not "a", "b": read).
    tier.put("l", entry(1000, 205, 10_000)).await?;
    tier.put("m", entry(1000, 206, 10_000)).await?;
    assert_eq!(
        keys_held(&tier)?,
        ["a", "b", "g", "h", "i", "j", "k", "l", "m"]
    );
    assert_eq!(tier.summary(0).await?.bytes, 9_000);
    Ok(())
}

#[tokio::test]
async fn one_commit_evicts_a_bounded_batch_and_the_next_commits_go_on() -> Result<()> {
    let tier = tier(64 * 1024);
    // 2,000 entries of 100 bytes in one job (as a bulk load would): 200 KB, three times the
    // bound. The commit evicts at most its budget; each later commit another batch.
    tier.write(|c, _| {
        c.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 1999)
             INSERT INTO entries (key, value, validator, stored_at, fresh_until, stale_until, size, last_access)
             SELECT 'k' || i, zeroblob(100), NULL, i, i, 100000, 100, i FROM n;",
        )?;
        // Raw statements: the counters and recency follow by a recount.
        c.execute_batch(crate::tier::sqlite::RECOUNT)
    })
    .await?;
    let held = |s: StoreSummary| s.entries;
    assert_eq!(
        held(tier.summary(0).await?),
        2000 - (EVICT_PER_COMMIT as u64 + 1)
    );
    tier.put("x", entry(100, 5000, 100_000)).await?;
    assert_eq!(
        held(tier.summary(0).await?),
        2001 - 2 * (EVICT_PER_COMMIT as u64 + 1)
    );
    // Least recently used first: the lowest `at` went.
    assert!(!keys_held(&tier)?.contains(&"k0".to_owned()));
    assert!(keys_held(&tier)?.contains(&"k1999".to_owned()));
    // Each later commit evicts another batch, until 90% of the bound (and no lower: 589
    // entries of 100 bytes); then none.
    let mut held_before = held(tier.summary(0).await?);
    for i in 0.. {
        tier.put(&format!("y{i}"), entry(100, 6000, 100_000))
            .await?;
        let now_held = held(tier.summary(0).await?);
        assert_eq!(
            now_held,
            (held_before + 1 - (EVICT_PER_COMMIT as u64 + 1)).max(589),
            "commit {i}"
        );
        held_before = now_held;
        if now_held == 589 {
            break;
        }
    }
    tier.put("z", entry(100, 7000, 100_000)).await?;
    let s = tier.summary(0).await?;
    assert_eq!((s.entries, s.bytes), (590, 59_000), "{s:?}");
    Ok(())
}

#[tokio::test]
async fn a_full_outbox_refuses_the_write_and_keeps_what_it_holds() -> Result<()> {
    let tier = tier(64 * 1024);
    let limit = super::outbox_bound(64 * 1024);
    let big = Bytes::from(vec![b'x'; (limit / 4) as usize]);
    let mut acked = Vec::new();
    for i in 0..3 {
        let key = format!("w{i}");
        let e = entry(big.len(), 1, 100);
        acked.push(
            tier.enqueue(&key, Some(e), OutboxOp::Put(big.clone()), 1)
                .await?,
        );
    }
    let e = entry(big.len(), 2, 100);
    let before = tier.summary(0).await?;
    let refused = tier
        .enqueue("w3", Some(e.clone()), OutboxOp::Put(big.clone()), 2)
        .await;
    match &refused {
        Err(Error::OutboxFull {
            key,
            held,
            limit: l,
            ..
        }) => {
            assert_eq!((key.as_str(), *l), ("w3", limit));
            assert_eq!(*held, before.outbox_bytes);
        }
        other => panic!("expected OutboxFull, got {other:?}"),
    }
    assert!(refused.is_err_and(|e| e.is_outbox_full() && !e.is_storage()));
    // Nothing of the refused write happened; everything acknowledged is still there.
    assert_eq!(tier.get("w3").await?, None);
    assert_eq!(tier.summary(0).await?, before);
    let pending: Vec<i64> = tier
        .outbox_pending(10)
        .await?
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(pending, acked);
    // A small write still fits; once one is delivered, the big one does too.
    tier.enqueue("small", None, OutboxOp::Delete, 3).await?;
    tier.outbox_complete(vec![acked[0]]).await?;
    tier.enqueue("w3", Some(e), OutboxOp::Put(big), 4).await?;
    Ok(())
}

#[tokio::test]
async fn two_writers_on_one_file_keep_the_counters_true() -> Result<()> {
    // Each writer knows the counters row as it last committed it; the other's commits make it
    // read the row again (`data_version`), so neither decides on a stale total (the bound,
    // eviction, whether any dead letter is there to supersede).
    let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
    let open = || {
        SqliteTier::open(SqliteOptions {
            location: Location::File(dir.path().join("shared.db")),
            busy_timeout: Duration::from_secs(5),
            ..options(1 << 30)
        })
    };
    let (a, b) = (open()?, open()?);
    // `a` knows the row (no dead letter); `b` makes one; `a`'s next write of the key must
    // supersede it.
    let put = || OutboxOp::Put(Bytes::from_static(b"v"));
    let first = a.enqueue("d", None, put(), 1).await?;
    b.outbox_failed(vec![first], 2, "refused".into(), true)
        .await?;
    a.enqueue("d", None, put(), 3).await?;
    let dead = a.dead_letters().await?;
    assert!(dead.len() == 1 && dead[0].superseded, "{dead:?}");
    let mut rng = fastrand::Rng::with_seed(3);
    for step in 0..200u64 {
        let tier = if rng.bool() { &a } else { &b };
        let key = format!("k{}", rng.usize(0..20));
        match rng.u8(0..4) {
            0 => {
                tier.put(&key, entry(rng.usize(0..500), step, step + 50))
                    .await?
            }
            1 => tier.remove(&key).await?,
            2 => {
                let v = Bytes::from(vec![b'o'; rng.usize(0..100)]);
                tier.enqueue(&key, None, OutboxOp::Put(v), step).await?;
            }
            _ => {
                let pending = tier.outbox_pending(1).await?;
                if let Some(row) = pending.first() {
                    tier.outbox_failed(vec![row.id], step, "no".into(), true)
                        .await?;
                }
            }
        }
        for tier in [&a, &b] {
            assert_eq!(tier.summary(step).await?, scan(tier, step)?, "step {step}");
        }
        // A write after a dead letter of its key supersedes it (I4), whichever writer made
        // the dead letter: none is left retryable with a newer write of its key behind it.
        let retryable_over_newer: i64 = a
            .read(|c| {
                c.query_row(
                    "SELECT count(*) FROM outbox AS d WHERE d.dead = 1 AND d.superseded = 0
                       AND EXISTS (SELECT 1 FROM outbox AS o WHERE o.key = d.key AND o.id > d.id)",
                    [],
                    |r| r.get(0),
                )
            })
            .map_err(storage("dead letters"))?;
        assert_eq!(retryable_over_newer, 0, "step {step}");
    }
    Ok(())
}
