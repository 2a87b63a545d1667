//! The listener: one dedicated connection per store (not from the pool) that `LISTEN`s on the
//! schema's channel and turns other instances' payloads into [`Invalidation`]s for the caches
//! subscribed to the store; after a lost connection it reconnects with backoff, `LISTEN`s
//! again and catches up from the invalidation log; a heartbeat finds a silent connection and
//! prunes the log.
//!
//! # Catching up without missing a write
//! Log rows carry the writing transaction's id (`xid8`, as a `bigint`). Sequence numbers are
//! drawn before commit, so they commit out of order: "everything after the last sequence
//! seen" could miss a transaction that drew a lower number and committed later. The listener
//! therefore keeps a *horizon*: a transaction id such that every write of a lower one was
//! committed while it listened, so its `NOTIFY` reached it. At each connection, the horizon is
//! the oldest transaction still running just before `LISTEN` (`pg_snapshot_xmin`; before the
//! first connection, when the store opened, before any cache on it filled its L1); at each
//! heartbeat it moves to the value taken at the previous heartbeat (a whole heartbeat interval
//! for those notifications to arrive). After a reconnect it reads every log row with a
//! transaction id at or above the horizon (some again: dropping a key twice costs a read).
//! If the log was pruned at or above the horizon, it cannot vouch: every L1 is cleared.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::notify::{self, Payload};
use crate::tier::{Invalidation, Invalidations, Listening};

/// How many invalidations a subscriber may fall behind before it gets [`Invalidation::All`].
const CHANNEL_CAPACITY: usize = 1024;
/// The first delay before a reconnect, doubled up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The least time a connection's `LISTEN` and catch-up are given (else the heartbeat's).
const SET_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys per [`Invalidation::Keys`] sent while catching up.
const CATCH_UP_BATCH: usize = 1000;

/// What the store's clones share to publish and to listen: one listener per store.
pub(super) struct Fleet {
    /// This store's id in payloads and log rows (32 hex digits).
    pub(super) origin: String,
    /// `pg_notify`'s channel ([`notify::channel`]).
    pub(super) channel: String,
    /// [`notify::range_header`] of `origin`.
    pub(super) range_header: String,
    /// The listener's connection settings: the store's, with its own `application_name`.
    config: tokio_postgres::Config,
    schema: String,
    heartbeat: Duration,
    retention: Duration,
    /// The subscribers' channel while a listener runs (taken away, under the lock, by a
    /// listener that finds no subscriber left and stops).
    sender: Mutex<Option<broadcast::Sender<Invalidation>>>,
    connected: Listening,
    connections: AtomicU64,
    /// Where the next catch-up starts (see the module docs): set when the store opens, moved
    /// by the listener; kept across listeners (a new one after the last stopped).
    horizon: AtomicI64,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("origin", &self.origin)
            .field("channel", &self.channel)
            .field("listening", &self.connected.get())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    pub(super) fn new(
        mut config: tokio_postgres::Config,
        schema: &str,
        heartbeat: Duration,
        retention: Duration,
    ) -> Self {
        let origin = format!("{:032x}", fastrand::u128(..));
        config.application_name(listener_name(&origin));
        Self {
            channel: notify::channel(schema),
            range_header: notify::range_header(&origin),
            origin,
            config,
            schema: schema.to_owned(),
            heartbeat,
            retention,
            sender: Mutex::new(None),
            connected: Listening::new(),
            connections: AtomicU64::new(0),
            horizon: AtomicI64::new(0),
        }
    }

    /// The horizon before any listener ran: the oldest transaction running when the store
    /// opened, before any cache on it could fill its L1.
    pub(super) fn set_horizon(&self, xid: i64) {
        self.horizon.store(xid, Ordering::Release);
    }

    /// Whether the listener is connected and caught up.
    pub(super) fn listening(&self) -> bool {
        self.connected.get()
    }

    /// Connections the listener made and caught up on so far.
    pub(super) fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    /// A new subscription; starts the listener if none runs.
    pub(super) fn subscribe(self: &Arc<Self>) -> Invalidations {
        let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = sender.as_ref() {
            return Invalidations::new(tx.subscribe()).with_listening(self.connected.clone());
        }
        let (tx, rx) = broadcast::channel(CHANNEL_CAPACITY);
        // Without a runtime the channel is closed at once: the caller sees the subscription
        // end (the cache refuses to build) rather than one that never delivers.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            *sender = Some(tx);
            runtime.spawn(run(self.clone()));
        }
        Invalidations::new(rx).with_listening(self.connected.clone())
    }

    fn send(&self, inv: Invalidation) {
        if let Some(tx) = self
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(inv);
        }
    }

    /// Whether messages of this store's own origin must be passed on: when several caches
    /// share the store, one's write must reach the others' L1.
    fn own_matters(&self) -> bool {
        self.sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.receiver_count() > 1)
    }

    /// Stops publishing if no subscriber is left: the listener ends. Under the lock, so a new
    /// subscriber either came first (the listener goes on) or starts a new listener.
    fn stop_if_unsubscribed(&self) -> bool {
        let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if sender.as_ref().is_none_or(|tx| tx.receiver_count() == 0) {
            *sender = None;
            self.connected.set(false);
            return true;
        }
        false
    }
}

/// The `application_name` of the listener of the store whose origin is `origin`.
pub(super) fn listener_name(origin: &str) -> String {
    format!("tiercache-listen-{origin}")
}

/// Why a connection of the listener ended.
enum Ended {
    /// No subscriber left: the listener stops.
    Unsubscribed,
    /// Lost (after catching up, when `up`): reconnect.
    Lost { up: bool, why: String },
}

async fn run(fleet: Arc<Fleet>) {
    let mut backoff = BASE_BACKOFF;
    loop {
        match connection(&fleet).await {
            Ended::Unsubscribed => return,
            Ended::Lost { up, why } => {
                fleet.connected.set(false);
                tracing::warn!(schema = %fleet.schema, error = %why,
                    "the invalidation listener lost its connection; reconnecting");
                if up {
                    backoff = BASE_BACKOFF;
                }
            }
        }
        // Jittered, so a fleet that lost the server does not come back all at once.
        let delay = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if fleet.stop_if_unsubscribed() {
            return;
        }
    }
}

fn lost(up: bool) -> impl Fn(tokio_postgres::Error) -> Ended {
    move |e| Ended::Lost {
        up,
        why: crate::error::chain_text(&e),
    }
}

/// One connection of the listener: `LISTEN`, catch up, then serve payloads and heartbeats
/// until it is lost or unsubscribed.
async fn connection(fleet: &Arc<Fleet>) -> Ended {
    let (mut client, mut conn) = match fleet.config.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => return lost(false)(e),
    };
    let (payloads, mut received) = mpsc::unbounded_channel::<String>();
    let pump = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                if payloads.send(n.payload().to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    let _pump = AbortOnDrop(pump);
    // A connection that goes silent while being set up is given up too.
    let set_up = async {
        let before_listen = xmin(&client).await?;
        client
            .batch_execute(&format!("LISTEN \"{}\"", fleet.channel))
            .await?;
        catch_up(fleet, &client, fleet.horizon.load(Ordering::Acquire)).await?;
        Ok(before_listen)
    };
    let limit = fleet.heartbeat.max(SET_UP_TIMEOUT);
    let before_listen = match tokio::time::timeout(limit, set_up).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return lost(false)(e),
        Err(_) => {
            return Ended::Lost {
                up: false,
                why: format!("LISTEN and the catch-up took longer than {limit:?}"),
            }
        }
    };
    // Every write of a transaction at or above `before_listen` is in the log read above or
    // comes as a `NOTIFY` from now on.
    fleet.horizon.store(before_listen, Ordering::Release);
    let mut previous = before_listen;
    fleet.connections.fetch_add(1, Ordering::AcqRel);
    fleet.connected.set(true);
    let mut beat = tokio::time::interval(fleet.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    loop {
        tokio::select! {
            payload = received.recv() => {
                let Some(payload) = payload else {
                    return Ended::Lost { up: true, why: "the connection closed".to_owned() };
                };
                if let Err(e) = receive(fleet, &client, &payload).await {
                    return lost(true)(e);
                }
            }
            _ = beat.tick() => {
                if fleet.stop_if_unsubscribed() {
                    return Ended::Unsubscribed;
                }
                match tokio::time::timeout(fleet.heartbeat, xmin(&client)).await {
                    Ok(Ok(now)) => {
                        fleet.horizon.store(previous, Ordering::Release);
                        previous = now;
                    }
                    Ok(Err(e)) => return lost(true)(e),
                    Err(_) => {
                        return Ended::Lost {
                            up: true,
                            why: format!("no answer to the heartbeat within {:?}", fleet.heartbeat),
                        }
                    }
                }
                if let Err(e) = prune(fleet, &mut client).await {
                    return lost(true)(e);
                }
            }
        }
    }
}

/// Aborts the notification pump when its connection is given up.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The oldest transaction still running (every lower one has ended), as a `bigint`.
async fn xmin(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?;
    row.try_get(0)
}

fn table(fleet: &Fleet, name: &str) -> String {
    format!("\"{}\".{name}", fleet.schema)
}

/// One payload: other instances' keys go to the subscribers.
async fn receive(
    fleet: &Fleet,
    client: &Client,
    payload: &str,
) -> Result<(), tokio_postgres::Error> {
    let (origin, what) = notify::parse(payload);
    if origin == fleet.origin && !fleet.own_matters() {
        return Ok(());
    }
    match what {
        Payload::Keys(keys) => fleet.send(Invalidation::Keys(keys)),
        Payload::Range(first, last) => {
            let sql = format!(
                "SELECT key FROM {} WHERE seq BETWEEN $1 AND $2",
                table(fleet, "invalidations")
            );
            let keys: Vec<String> = client
                .query(&sql, &[&first, &last])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            // Rows already pruned: what changed is unknown.
            if keys.is_empty() {
                fleet.send(Invalidation::All);
            } else {
                fleet.send(Invalidation::Keys(keys));
            }
        }
        Payload::Unknown(p) => {
            tracing::warn!(schema = %fleet.schema, payload = %p.chars().take(100).collect::<String>(),
                "an invalidation payload this tiercache cannot read; clearing L1");
            fleet.send(Invalidation::All);
        }
    }
    Ok(())
}

/// After a reconnect: the keys of every log row at or above `horizon` (other instances'), or
/// [`Invalidation::All`] when the log no longer reaches back that far.
async fn catch_up(
    fleet: &Fleet,
    client: &Client,
    horizon: i64,
) -> Result<(), tokio_postgres::Error> {
    let own = fleet.own_matters();
    let sql = format!(
        "SELECT DISTINCT key FROM {} WHERE xid >= $1 AND ($2 OR origin <> $3)",
        table(fleet, "invalidations")
    );
    let keys: Vec<String> = client
        .query(&sql, &[&horizon, &own, &fleet.origin])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    // Read after the rows: a prune that removed any of them has committed its mark by now.
    let pruned: i64 = client
        .query_one(
            &format!(
                "SELECT through FROM {}",
                table(fleet, "invalidations_pruned")
            ),
            &[],
        )
        .await?
        .try_get(0)?;
    if pruned >= horizon {
        tracing::info!(schema = %fleet.schema,
            "the invalidation log no longer reaches back to the last message seen; clearing L1");
        fleet.send(Invalidation::All);
        return Ok(());
    }
    for batch in keys.chunks(CATCH_UP_BATCH) {
        fleet.send(Invalidation::Keys(batch.to_vec()));
    }
    Ok(())
}

/// Deletes the log rows older than the retention, by one listener of the fleet at a time (an
/// advisory lock tried, not waited for), recording how far it went; and the fill leases that
/// ran out.
async fn prune(fleet: &Fleet, client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let got: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!("{}/prune", fleet.schema)],
        )
        .await?
        .try_get(0)?;
    if got {
        let sql = format!(
            "WITH d AS (DELETE FROM {log} WHERE at < now() - make_interval(secs => $1)
                        RETURNING xid)
             UPDATE {mark} SET through = greatest(through, (SELECT max(xid) FROM d))
             WHERE EXISTS (SELECT 1 FROM d)",
            log = table(fleet, "invalidations"),
            mark = table(fleet, "invalidations_pruned"),
        );
        tx.execute(&sql, &[&fleet.retention.as_secs_f64()]).await?;
        // Fill leases that ran out (their holders died): free to take anyway, so deleting
        // them changes nothing but the table's size.
        let sql = format!(
            "DELETE FROM {} WHERE expires_at < clock_timestamp()",
            table(fleet, "fill_leases")
        );
        tx.execute(&sql, &[]).await?;
    }
    tx.commit().await
}
