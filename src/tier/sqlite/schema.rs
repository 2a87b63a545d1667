//! The schema: tables and indexes, and its history (the migrations that bring an older database
//! to the current version).
//!
//! Version 3 makes every cost the cache pays at run time independent of the table's size:
//! * `counters`, one row kept in the same transaction as every change of `entries` and
//!   `outbox`: entries, bytes, negative entries, pending writes, dead letters and outbox
//!   bytes. Version 3 kept it by triggers; from version 4 the writer keeps it (see `changes`). `stats()`, `health()`, the flush reports and the eviction's byte total read it;
//!   every process sharing the file sees the same figures.
//! * `recency`, a narrow table (the entry's rowid, its last access) indexed by time: a read's
//!   last-access update rewrites 16 bytes there, never the entry's value; eviction takes the
//!   least recently used from the index's head.
//! * `entries_by_stale` (expired entries first, in eviction) and `entries_by_fresh` (the stale
//!   count of a summary walks only the stale range of an index, never the values).
//! * `outbox_failing`: the pending rows with an error, for the flush and close reports.

/// The schema of version 2 (the tables; the indexes of the outbox).
macro_rules! schema_v2 {
    () => {
        "
CREATE TABLE IF NOT EXISTS entries (
    key         TEXT PRIMARY KEY NOT NULL,
    value       BLOB,
    validator   TEXT,
    stored_at   INTEGER NOT NULL,
    fresh_until INTEGER NOT NULL,
    stale_until INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    last_access INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY,
    key          TEXT NOT NULL,
    op           TEXT NOT NULL CHECK (op IN ('put', 'delete')),
    value        BLOB,
    created_at   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    dead         INTEGER NOT NULL DEFAULT 0,
    superseded   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox(key, id);
CREATE INDEX IF NOT EXISTS outbox_dead_by_key ON outbox(key) WHERE dead = 1;
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
"
    };
}

/// What version 3 adds to version 2 (see the module's docs). `entries.last_access` stays (the
/// time of the last write); a read's access goes to `recency` only.
macro_rules! schema_v3_additions {
    () => {
        "
CREATE INDEX IF NOT EXISTS entries_by_stale ON entries(stale_until);
CREATE INDEX IF NOT EXISTS entries_by_fresh ON entries(fresh_until);
CREATE INDEX IF NOT EXISTS outbox_failing ON outbox(id) WHERE dead = 0 AND last_error IS NOT NULL;
CREATE TABLE IF NOT EXISTS recency (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS recency_by_at ON recency(at);
CREATE TABLE IF NOT EXISTS counters (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    entries      INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    negative     INTEGER NOT NULL,
    pending      INTEGER NOT NULL,
    dead         INTEGER NOT NULL,
    outbox_bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters VALUES (1, 0, 0, 0, 0, 0, 0);
"
    };
}

/// Version 3's triggers, which kept the counters and `recency` (version 4 drops them: the writer
/// keeps both, see `changes`).
macro_rules! schema_v3_triggers {
    () => {
        "
CREATE TRIGGER IF NOT EXISTS entries_insert AFTER INSERT ON entries BEGIN
    UPDATE counters SET entries = entries + 1, bytes = bytes + new.size,
        negative = negative + (new.value IS NULL) WHERE id = 1;
    INSERT OR REPLACE INTO recency (id, at) VALUES (new.rowid, new.last_access);
END;
CREATE TRIGGER IF NOT EXISTS entries_delete AFTER DELETE ON entries BEGIN
    UPDATE counters SET entries = entries - 1, bytes = bytes - old.size,
        negative = negative - (old.value IS NULL) WHERE id = 1;
    DELETE FROM recency WHERE id = old.rowid;
END;
CREATE TRIGGER IF NOT EXISTS entries_update AFTER UPDATE OF value, size, last_access ON entries BEGIN
    UPDATE counters SET bytes = bytes - old.size + new.size,
        negative = negative - (old.value IS NULL) + (new.value IS NULL) WHERE id = 1;
    UPDATE recency SET at = new.last_access WHERE id = new.rowid;
END;
CREATE TRIGGER IF NOT EXISTS outbox_insert AFTER INSERT ON outbox BEGIN
    UPDATE counters SET pending = pending + (new.dead = 0), dead = dead + (new.dead <> 0),
        outbox_bytes = outbox_bytes + length(CAST(new.key AS BLOB)) + coalesce(length(new.value), 0)
        WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS outbox_delete AFTER DELETE ON outbox BEGIN
    UPDATE counters SET pending = pending - (old.dead = 0), dead = dead - (old.dead <> 0),
        outbox_bytes = outbox_bytes - length(CAST(old.key AS BLOB)) - coalesce(length(old.value), 0)
        WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS outbox_update AFTER UPDATE OF dead ON outbox BEGIN
    UPDATE counters SET pending = pending - (old.dead = 0) + (new.dead = 0),
        dead = dead - (old.dead <> 0) + (new.dead <> 0) WHERE id = 1;
END;
"
    };
}

/// The counters as a count of every row makes them: entries, bytes, negative entries, pending
/// writes, dead letters, outbox bytes.
macro_rules! scanned {
    () => {
        "
SELECT e.n, e.bytes, e.negative, o.pending, o.dead, o.bytes
FROM (SELECT count(*) AS n, coalesce(sum(size), 0) AS bytes,
             coalesce(sum(value IS NULL), 0) AS negative FROM entries) AS e,
     (SELECT coalesce(sum(dead = 0), 0) AS pending, coalesce(sum(dead <> 0), 0) AS dead,
             coalesce(sum(length(CAST(key AS BLOB)) + coalesce(length(value), 0)), 0) AS bytes
      FROM outbox) AS o"
    };
}

/// The SELECT of `scanned!`, for a check of the counters.
pub(super) const SCANNED: &str = scanned!();

/// Recomputes the counters and the `recency` rows from the tables (reads every row).
macro_rules! recount {
    () => {
        concat!(
            "
INSERT OR REPLACE INTO counters (id, entries, bytes, negative, pending, dead, outbox_bytes)
SELECT 1, * FROM (",
            scanned!(),
            ");
DELETE FROM recency WHERE id NOT IN (SELECT rowid FROM entries);
INSERT OR IGNORE INTO recency (id, at) SELECT rowid, last_access FROM entries;
"
        )
    };
}

/// The SQL that recomputes the `counters` row and the `recency` rows from the tables, in one
/// pass over every row. The writer keeps both with every change it makes; a database filled by
/// raw statements (a bulk load of `entries`) needs this once afterwards, in the same
/// transaction, or its counters and eviction order do not see those rows.
pub const RECOUNT: &str = recount!();

/// The database schema of version [`SCHEMA_VERSION`], as a new database is created. An older
/// database is brought to it by the migrations, one version at a time.
pub const SCHEMA: &str = concat!(schema_v2!(), schema_v3_additions!());

/// The schema version written to `PRAGMA user_version`.
///
/// History: 1, the first (no `application_id`); 2, `outbox.superseded` and the outbox indexes,
/// and `application_id` set to [`APPLICATION_ID`](super::APPLICATION_ID); 3, the `counters` and
/// `recency` tables, their triggers, and the eviction and outbox indexes; 4, no triggers (the
/// writer keeps the counters and `recency` in the transaction of each change).
pub const SCHEMA_VERSION: i64 = 4;

/// One step of the schema's history: the SQL that takes a database of version `to - 1` to
/// version `to`. Run in one transaction with the version bump.
pub(super) struct Migration {
    pub(super) to: i64,
    pub(super) sql: &'static str,
}

/// Every step, oldest first; the last one's `to` is [`SCHEMA_VERSION`].
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        to: 2,
        // `superseded`: 1 on a dead letter a newer write of its key came after.
        // `outbox_by_key`: the newest pending write of a key (the pending scan walks the rowid:
        // an index on `dead` cost every set and delivery more than it saved);
        // `outbox_dead_by_key`: a key's dead letters (marked superseded by every write of the
        // key: without it, each write-behind set scanned the key's pending rows).
        sql: "
        ALTER TABLE outbox ADD COLUMN superseded INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox(key, id);
        CREATE INDEX IF NOT EXISTS outbox_dead_by_key ON outbox(key) WHERE dead = 1;
    ",
    },
    Migration {
        to: 3,
        // The one full read of the file a migration makes: the counters and the recency table
        // are filled from what the database holds, once.
        sql: concat!(schema_v3_additions!(), schema_v3_triggers!(), recount!()),
    },
    Migration {
        to: 4,
        // The counters and `recency` are kept by the writer from here on (see `changes`): a
        // statement that fires a trigger journals every page it changes.
        sql: "
        DROP TRIGGER IF EXISTS entries_insert;
        DROP TRIGGER IF EXISTS entries_delete;
        DROP TRIGGER IF EXISTS entries_update;
        DROP TRIGGER IF EXISTS outbox_insert;
        DROP TRIGGER IF EXISTS outbox_delete;
        DROP TRIGGER IF EXISTS outbox_update;
    ",
    },
];

/// Version 2's schema, for the migration tests.
#[cfg(test)]
pub(super) const SCHEMA_V2: &str = schema_v2!();
