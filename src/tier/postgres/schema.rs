//! The schema: created or migrated on open (under an advisory lock), refused untouched when it
//! is newer or another application's; and the statements of the store, with the schema's
//! name written in once.

use std::sync::Arc;

use deadpool_postgres::Object;

use super::SCHEMA_VERSION;
use crate::error::{Error, Result};

/// The schema of version [`SCHEMA_VERSION`], as a new one is created (`{s}`: the quoted
/// schema name; `{unlogged}`: `UNLOGGED` or nothing).
const CREATE: &str = "
CREATE {unlogged} TABLE {s}.entries (
    key         text PRIMARY KEY,
    value       bytea,
    validator   text,
    stored_at   bigint NOT NULL,
    fresh_until bigint NOT NULL,
    stale_until bigint NOT NULL,
    size        bigint NOT NULL,
    last_access bigint NOT NULL
);
CREATE TABLE {s}.outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key          text NOT NULL,
    op           text NOT NULL CHECK (op IN ('put', 'delete')),
    value        bytea,
    created_at   bigint NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    next_attempt bigint NOT NULL DEFAULT 0,
    last_error   text,
    dead         boolean NOT NULL DEFAULT false,
    superseded   boolean NOT NULL DEFAULT false
);
CREATE INDEX outbox_by_key ON {s}.outbox (key, id);
CREATE INDEX outbox_dead_by_key ON {s}.outbox (key) WHERE dead;
CREATE TABLE {s}.meta (
    name  text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE {s}.schema_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint NOT NULL
);
";

/// What version 2 adds to version 1 (and a new schema has too): the outbox's claims (which
/// instance delivers a row, until when), the invalidation log, and how far it was pruned (the
/// `xid8` of the newest row deleted, as a `bigint`).
const VERSION_2: &str = "
ALTER TABLE {s}.outbox ADD COLUMN claimed_by text, ADD COLUMN claim_expires timestamptz;
CREATE TABLE {s}.invalidations (
    seq    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid    bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    at     timestamptz NOT NULL DEFAULT now(),
    origin text NOT NULL,
    key    text NOT NULL
);
CREATE INDEX invalidations_by_xid ON {s}.invalidations (xid);
CREATE INDEX invalidations_by_at ON {s}.invalidations (at);
CREATE TABLE {s}.invalidations_pruned (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    through bigint NOT NULL
);
INSERT INTO {s}.invalidations_pruned (through) VALUES (0);
";

/// What version 3 adds to version 2 (and a new schema has too): the leases of fleet-wide
/// single-flight (`lease.rs`) and the sequence of their fencing tokens.
const VERSION_3: &str = "
CREATE SEQUENCE {s}.fill_lease_tokens;
CREATE TABLE {s}.fill_leases (
    key        text PRIMARY KEY,
    token      bigint NOT NULL,
    holder     text NOT NULL,
    expires_at timestamptz NOT NULL
);
";

/// Creates the schema `name`, or checks and migrates it; returns whether `entries` is
/// UNLOGGED. One transaction, under an advisory lock on the schema's name: instances starting
/// together set it up once. A newer or foreign schema is refused before any write (the
/// transaction is rolled back).
pub(super) async fn open(
    client: &mut Object,
    name: &str,
    location: &str,
    unlogged: bool,
) -> Result<bool> {
    let fail = |what: &'static str| {
        move |e: tokio_postgres::Error| storage(&format!("{what} of the schema {location}"), e)
    };
    let tx = client
        .transaction()
        .await
        .map_err(fail("begin the set-up"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("tiercache migrate {name}")],
    )
    .await
    .map_err(fail("lock the set-up"))?;
    let tables: Vec<String> = tx
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
             ORDER BY 1",
            &[&name],
        )
        .await
        .map_err(fail("list the tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let quoted = format!("\"{name}\"");
    if tables.iter().any(|t| t == "schema_version") {
        let found: Option<i64> = tx
            .query_opt(&format!("SELECT version FROM {quoted}.schema_version"), &[])
            .await
            .map_err(fail("read the version"))?
            .map(|r| r.get(0));
        match found {
            Some(v) if v == SCHEMA_VERSION => {}
            // Version 1 (no invalidation log), 2 (no leases): migrated in this transaction.
            Some(v @ (1 | 2)) => {
                let steps = if v == 1 {
                    [VERSION_2, VERSION_3].concat()
                } else {
                    VERSION_3.to_owned()
                };
                tx.batch_execute(&steps.replace("{s}", &quoted))
                    .await
                    .map_err(fail("migrate to the current version"))?;
                tx.execute(
                    &format!("UPDATE {quoted}.schema_version SET version = $1"),
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(fail("write the version"))?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(Error::IncompatibleSchema {
                    location: location.to_owned(),
                    found: Some(v),
                    message: format!(
                        "its schema version is {v}, newer than this tiercache's ({SCHEMA_VERSION})"
                    ),
                });
            }
            other => {
                return Err(Error::IncompatibleSchema {
                    location: location.to_owned(),
                    found: other,
                    message: match other {
                        Some(v) => format!("its schema version is {v}, which no tiercache wrote"),
                        None => "its schema_version table is empty".to_owned(),
                    },
                });
            }
        }
    } else if !tables.is_empty() {
        return Err(Error::IncompatibleSchema {
            location: location.to_owned(),
            found: None,
            message: format!(
                "it holds tables [{}] but no tiercache schema_version",
                tables.join(", ")
            ),
        });
    } else {
        // A schema made beforehand (by an administrator, for a role that may not create
        // schemas) is used as it is: CREATE SCHEMA would need that privilege even when the
        // schema exists.
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&name],
            )
            .await
            .map_err(fail("look for the schema"))?
            .get(0);
        let mut ddl = if exists {
            String::new()
        } else {
            format!("CREATE SCHEMA {quoted};")
        };
        ddl.push_str(
            &CREATE
                .replace("{s}", &quoted)
                .replace("{unlogged}", if unlogged { "UNLOGGED" } else { "" }),
        );
        ddl.push_str(&VERSION_2.replace("{s}", &quoted));
        ddl.push_str(&VERSION_3.replace("{s}", &quoted));
        tx.batch_execute(&ddl)
            .await
            .map_err(fail("create the tables"))?;
        tx.execute(
            &format!("INSERT INTO {quoted}.schema_version (version) VALUES ($1)"),
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(fail("write the version"))?;
    }
    let persistence: i8 = tx
        .query_one(
            "SELECT c.relpersistence::\"char\" FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = 'entries'",
            &[&name],
        )
        .await
        .map_err(fail("read the entries table"))?
        .get(0);
    tx.commit().await.map_err(fail("commit the set-up"))?;
    Ok(persistence == b'u' as i8)
}

/// A storage error: `what` failed, with PostgreSQL's error as the source.
pub(super) fn storage(what: &str, e: tokio_postgres::Error) -> Error {
    Error::Storage {
        message: format!("{what}: {}", crate::error::chain_text(&e)),
        source: Some(Arc::new(e)),
    }
}

/// The store's statements, with the schema's name in them.
#[derive(Debug)]
pub(super) struct Sql {
    pub(super) get: String,
    pub(super) get_many: String,
    pub(super) stored_at: String,
    pub(super) upsert: String,
    pub(super) renew: String,
    pub(super) remove: String,
    pub(super) remove_unless_pending: String,
    pub(super) remove_many_unless_pending: String,
    pub(super) supersede_key: String,
    pub(super) enqueue: String,
    pub(super) newest: String,
    pub(super) outbox_errors: String,
    pub(super) complete: String,
    pub(super) keys_of: String,
    pub(super) failed: String,
    pub(super) supersede_newer: String,
    pub(super) dead: String,
    pub(super) dead_key: String,
    pub(super) dead_for_update: String,
    pub(super) retry_dead: String,
    pub(super) discard_dead: String,
    pub(super) load_meta: String,
    pub(super) upsert_meta: String,
    pub(super) delete_meta: String,
    pub(super) summary: String,
    /// Logs keys as changed and notifies the fleet: `$1` origin, `$2` keys, `$3` channel,
    /// `$4` payloads, `$5` the range header (that payload gets the rows' range appended).
    pub(super) publish: String,
    /// Keys whose pending rows no other instance holds a live claim on, oldest first: `$1`
    /// this instance, `$2` how many.
    pub(super) claimable: String,
    /// Of the keys `$1`, those whose advisory lock (`$2` the prefix) is free: taken.
    pub(super) try_lock_keys: String,
    /// Claims every pending row of the keys `$1` for `$2` for `$3` seconds, unless another
    /// instance holds a live claim on one of them.
    pub(super) claim: String,
    /// The prefix of the advisory-lock names of this schema's keys.
    pub(super) lock_prefix: String,
}

/// Locks every name of the text array `$1` for the transaction, in the order of their hashes
/// (two transactions locking several keys never wait on each other in a cycle).
pub(super) const LOCK: &str = "SELECT pg_advisory_xact_lock(h) FROM (
    SELECT DISTINCT hashtextextended(n, 0) AS h FROM unnest($1::text[]) AS n ORDER BY h) AS l";

pub(super) const OUTBOX_COLUMNS: &str =
    "id, key, op, value, created_at, attempts, next_attempt, last_error, dead, superseded";

impl Sql {
    pub(super) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        let q = |sql: &str| sql.replace("{s}", &s).replace("{cols}", OUTBOX_COLUMNS);
        Self {
            get: q(
                "SELECT value, validator, stored_at, fresh_until, stale_until
                    FROM {s}.entries WHERE key = $1",
            ),
            get_many: q(
                "SELECT key, value, validator, stored_at, fresh_until, stale_until, 0 AS kind
                 FROM {s}.entries WHERE key = ANY($1)
                 UNION ALL
                 (SELECT DISTINCT ON (key) key, value, NULL, 0, 0, 0,
                         CASE op WHEN 'put' THEN 1 ELSE 2 END
                  FROM {s}.outbox WHERE key = ANY($1) AND NOT dead
                  ORDER BY key, id DESC)",
            ),
            stored_at: q("SELECT stored_at FROM {s}.entries WHERE key = $1"),
            upsert: q("INSERT INTO {s}.entries
                   (key, value, validator, stored_at, fresh_until, stale_until, size, last_access)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $4)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                   validator = excluded.validator, stored_at = excluded.stored_at,
                   fresh_until = excluded.fresh_until, stale_until = excluded.stale_until,
                   size = excluded.size, last_access = excluded.last_access"),
            renew: q(
                "UPDATE {s}.entries SET stored_at = $2, fresh_until = $3, stale_until = $4,
                   last_access = $2
                 WHERE key = $1",
            ),
            remove: q("DELETE FROM {s}.entries WHERE key = $1"),
            remove_unless_pending: q("DELETE FROM {s}.entries WHERE key = $1 AND NOT EXISTS (
                   SELECT 1 FROM {s}.outbox WHERE key = $1 AND NOT dead AND id > $2)"),
            remove_many_unless_pending: q(
                "DELETE FROM {s}.entries e WHERE e.key = ANY($1) AND NOT EXISTS (
                   SELECT 1 FROM {s}.outbox o WHERE o.key = e.key AND NOT o.dead AND o.id > $2)",
            ),
            supersede_key: q("UPDATE {s}.outbox SET superseded = true WHERE key = $1 AND dead"),
            enqueue: q(
                "INSERT INTO {s}.outbox (key, op, value, created_at) VALUES ($1, $2, $3, $4)
                 RETURNING id",
            ),
            newest: q(
                "SELECT op, value FROM {s}.outbox WHERE key = $1 AND NOT dead
                       ORDER BY id DESC LIMIT 1",
            ),
            outbox_errors: q("SELECT key, last_error FROM {s}.outbox WHERE NOT dead ORDER BY id"),
            complete: q("DELETE FROM {s}.outbox WHERE id = ANY($1) AND NOT dead"),
            keys_of: q("SELECT DISTINCT key FROM {s}.outbox WHERE id = ANY($1)"),
            failed: q(
                "UPDATE {s}.outbox SET attempts = attempts + 1, next_attempt = $2,
                   last_error = $3, dead = $4, claimed_by = NULL, claim_expires = NULL
                 WHERE id = ANY($1) AND NOT dead",
            ),
            supersede_newer: q("UPDATE {s}.outbox AS d SET superseded = true
                 WHERE d.id = ANY($1) AND d.dead AND EXISTS (
                   SELECT 1 FROM {s}.outbox AS o WHERE o.key = d.key AND o.id > d.id)"),
            dead: q("SELECT {cols} FROM {s}.outbox WHERE dead ORDER BY id"),
            dead_key: q("SELECT key FROM {s}.outbox WHERE id = $1 AND dead"),
            dead_for_update: q(
                "SELECT key, superseded FROM {s}.outbox WHERE id = $1 AND dead FOR UPDATE",
            ),
            retry_dead: q(
                "UPDATE {s}.outbox SET dead = false, attempts = 0, next_attempt = 0,
                   claimed_by = NULL, claim_expires = NULL
                 WHERE id = $1 AND dead",
            ),
            discard_dead: q("DELETE FROM {s}.outbox WHERE id = $1 AND dead"),
            load_meta: q("SELECT value FROM {s}.meta WHERE name = $1"),
            upsert_meta: q("INSERT INTO {s}.meta (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value"),
            delete_meta: q("DELETE FROM {s}.meta WHERE name = $1"),
            summary: q(
                "SELECT e.n, e.bytes, e.stale, e.negative, o.depth, o.dead, o.oldest, o.bytes FROM
                   (SELECT count(*) AS n, coalesce(sum(size), 0)::bigint AS bytes,
                           count(*) FILTER (WHERE fresh_until <= $1) AS stale,
                           count(*) FILTER (WHERE value IS NULL) AS negative
                    FROM {s}.entries) AS e,
                   (SELECT count(*) FILTER (WHERE NOT dead) AS depth,
                           count(*) FILTER (WHERE dead) AS dead,
                           min(created_at) FILTER (WHERE NOT dead) AS oldest,
                           coalesce(sum(octet_length(key) + coalesce(octet_length(value), 0)), 0)::bigint
                             AS bytes
                    FROM {s}.outbox) AS o",
            ),
            publish: q(
                "WITH i AS (INSERT INTO {s}.invalidations (origin, key)
                            SELECT $1::text, k FROM unnest($2::text[]) AS k RETURNING seq)
                 SELECT pg_notify($3::text, CASE WHEN p = $5::text
                   THEN p || ' ' || (SELECT min(seq) || ' ' || max(seq) FROM i) ELSE p END)
                 FROM unnest($4::text[]) AS p",
            ),
            claimable: q("SELECT key FROM {s}.outbox WHERE NOT dead GROUP BY key
                 HAVING NOT bool_or(claimed_by IS NOT NULL AND claimed_by <> $1
                                    AND claim_expires > now())
                 ORDER BY min(id) LIMIT $2"),
            try_lock_keys: "SELECT k FROM unnest($1::text[]) AS k
                 WHERE pg_try_advisory_xact_lock(hashtextextended($2 || k, 0))"
                .to_owned(),
            claim: q(
                "UPDATE {s}.outbox AS r SET claimed_by = $2,
                   claim_expires = now() + make_interval(secs => $3)
                 WHERE r.key = ANY($1) AND NOT r.dead AND NOT EXISTS (
                   SELECT 1 FROM {s}.outbox o WHERE o.key = r.key AND NOT o.dead
                     AND o.claimed_by <> $2 AND o.claim_expires > now())
                 RETURNING {cols}",
            ),
            lock_prefix: format!("{schema}/"),
        }
    }

    /// The advisory-lock name of `key`'s entry and outbox rows.
    pub(super) fn key_lock(&self, key: &str) -> String {
        format!("{}e/{key}", self.lock_prefix)
    }

    /// The advisory-lock name of the meta value `name`.
    pub(super) fn meta_lock(&self, name: &str) -> String {
        format!("{}m/{name}", self.lock_prefix)
    }
}
