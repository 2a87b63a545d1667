//! Fleet-wide single-flight: a lease per key on loading it from the source, with a fencing
//! token (see the [module docs](super), "Cross-instance single-flight").
//!
//! `fill_leases` holds one row per key being loaded: the holder (the store's
//! [`origin`](PostgresStore::origin)), its token (from the sequence `fill_lease_tokens`, so a
//! lease taken over after it ran out always has a higher token than the one it replaces) and
//! when it runs out (server time: the instances' clocks play no part). Taking a lease is one
//! statement (an upsert that replaces only a lease that ran out), releasing it another (a
//! `DELETE` of the row only while it still holds the releaser's token); neither holds a
//! transaction open.

use std::time::Duration;

use super::schema::storage;
use super::{to_i64, PostgresStore};
use crate::error::Result;
use crate::tier::FillLease;

/// Takes the lease, or finds it live and held by another: no row, or a row that ran out, is
/// replaced (under the row's lock, so two takers never both win); a live one is left.
const TAKE: &str = "INSERT INTO {s}.fill_leases AS l (key, token, holder, expires_at)
    VALUES ($1, nextval('{s}.fill_lease_tokens'), $2, clock_timestamp() + make_interval(secs => $3))
    ON CONFLICT (key) DO UPDATE
        SET token = EXCLUDED.token, holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
        WHERE l.expires_at <= clock_timestamp()
    RETURNING token";

/// Releases the lease of the given token only.
const RELEASE: &str = "DELETE FROM {s}.fill_leases WHERE key = $1 AND token = $2";

impl PostgresStore {
    /// [`EntryStore::fill_lease`](crate::tier::EntryStore::fill_lease): one statement.
    pub(super) async fn take_fill_lease(&self, key: &str, lease: Duration) -> Result<FillLease> {
        let client = self.client().await?;
        let sql = TAKE.replace("{s}", &format!("\"{}\"", self.schema));
        let run = async {
            let st = client.prepare_cached(&sql).await?;
            let row = client
                .query_opt(&st, &[&key, &self.fleet.origin, &lease.as_secs_f64()])
                .await?;
            Ok(match row {
                Some(r) => FillLease::Held(super::to_u64(r.try_get(0)?)),
                None => FillLease::Busy,
            })
        };
        run.await.map_err(|e| storage("take a fill lease", e))
    }

    /// [`EntryStore::release_fill_lease`](crate::tier::EntryStore::release_fill_lease).
    pub(super) async fn drop_fill_lease(&self, key: &str, token: u64) -> Result<()> {
        let client = self.client().await?;
        let sql = RELEASE.replace("{s}", &format!("\"{}\"", self.schema));
        let run = async {
            let st = client.prepare_cached(&sql).await?;
            client.execute(&st, &[&key, &to_i64(token)]).await.map(drop)
        };
        run.await.map_err(|e| storage("release a fill lease", e))
    }
}
