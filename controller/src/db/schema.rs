//! The schema on each engine, and how a database gets to this convoy's.
//!
//! SQLite keeps its version in `PRAGMA user_version` and steps through
//! every migration since the first release, so a database of any older
//! convoy opens. PostgreSQL support began at SQLite's version 8: its first
//! migration is that schema whole, and `convoy_schema` records each version
//! applied, by which controller and when. Several controllers starting at
//! once migrate one at a time: the first takes a transaction-scoped lock,
//! the others wait for it and then find nothing left to do.

use super::sql::Conn;
use super::DbError;
use crate::params;

/// The schema as the first convoy release made it. Every database starts
/// here; databases made before versioned migrations (user_version 0) hold
/// it already, perhaps with columns of later versions too.
const SCHEMA_1: &str = r#"
CREATE TABLE IF NOT EXISTS releases (
    app TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL,
    pushed_by TEXT NOT NULL, pushed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, version));
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, app TEXT NOT NULL, version TEXT NOT NULL, environment TEXT NOT NULL,
    operator TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    started_at_ms INTEGER NOT NULL, finished_at_ms INTEGER);
CREATE TABLE IF NOT EXISTS rollout_hosts (
    rollout_id TEXT NOT NULL, host TEXT NOT NULL, op_id TEXT NOT NULL, outcome TEXT NOT NULL,
    reason TEXT NOT NULL, restore_detail TEXT NOT NULL, finished_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, rollout_id TEXT NOT NULL, host TEXT NOT NULL, op_id TEXT NOT NULL,
    step TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL, at_ms INTEGER NOT NULL);
"#;

/// Columns added to the first schema before migrations were versioned:
/// (table, column, definition). Added only where missing.
const COLUMNS_2: &[(&str, &str, &str)] = &[
    ("releases", "signature", "BLOB"),
    ("rollouts", "kind", "TEXT NOT NULL DEFAULT 'deploy'"),
    ("rollouts", "strategy", "TEXT NOT NULL DEFAULT ''"),
    ("rollouts", "hotfix_reason", "TEXT NOT NULL DEFAULT ''"),
    ("rollouts", "plan", "TEXT NOT NULL DEFAULT ''"),
    ("rollouts", "approved_by", "TEXT NOT NULL DEFAULT ''"),
];

const TABLES_2: &str = r#"
CREATE INDEX IF NOT EXISTS rollouts_by_app ON rollouts (app, started_at_ms);
CREATE TABLE IF NOT EXISTS enroll_tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL, expires_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL, created_at_ms INTEGER NOT NULL, used_at_ms INTEGER, used_by TEXT);
CREATE TABLE IF NOT EXISTS host_labels (host TEXT PRIMARY KEY, labels TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_hosts (host TEXT PRIMARY KEY, revoked_at_ms INTEGER NOT NULL, revoked_by TEXT NOT NULL);
"#;

/// Indexes for the queries every result and every event runs.
const INDEXES_3: &str = r#"
CREATE INDEX IF NOT EXISTS rollout_hosts_by_op ON rollout_hosts (rollout_id, op_id);
CREATE INDEX IF NOT EXISTS events_by_rollout ON events (rollout_id);
CREATE INDEX IF NOT EXISTS rollouts_by_state ON rollouts (state);
"#;

/// One step of the schema; a database at `user_version` N has had the
/// first N applied.
pub(super) struct Migration {
    what: &'static str,
    apply: fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
}

pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        what: "the first schema",
        apply: |tx| tx.execute_batch(SCHEMA_1),
    },
    Migration {
        what: "signatures, strategies, approvals, enrollment and revocation",
        apply: |tx| {
            for (table, column, def) in COLUMNS_2 {
                let has: bool = tx
                    .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
                    .exists([column])?;
                if !has {
                    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
                }
            }
            tx.execute_batch(TABLES_2)
        },
    },
    Migration {
        what: "indexes for results, events and running rollouts",
        apply: |tx| tx.execute_batch(INDEXES_3),
    },
    Migration {
        what: "what each release unpacks to",
        apply: |tx| {
            tx.execute_batch("ALTER TABLE releases ADD COLUMN unpacked_bytes INTEGER; ALTER TABLE releases ADD COLUMN entries INTEGER;")
        },
    },
    Migration {
        what: "metric gate measurements",
        apply: |tx| tx.execute_batch(MEASUREMENTS_5),
    },
    Migration {
        what: "freezes and the audit of environment actions",
        apply: |tx| tx.execute_batch(FREEZES_6),
    },
    Migration {
        what: "the unit files each release ships",
        apply: |tx| tx.execute_batch("ALTER TABLE releases ADD COLUMN units TEXT;"),
    },
    Migration {
        what: "configuration revisions, their values (secrets sealed) and each release's schema",
        apply: |tx| tx.execute_batch(CONFIG_8),
    },
    Migration {
        what: "rollout leases, controllers, host sessions, the relay between controllers, shared artifacts",
        apply: |tx| {
            tx.execute_batch(
                &CLUSTER_9
                    .replace(
                        "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                        "INTEGER PRIMARY KEY AUTOINCREMENT",
                    )
                    .replace("BYTEA", "BLOB"),
            )
        },
    },
    Migration {
        what: "the bounds each metric gate measurement was judged against",
        apply: |tx| tx.execute_batch(BOUNDS_10),
    },
];

/// Written once for both engines (SQLite reads DOUBLE PRECISION as REAL).
const BOUNDS_10: &str = "ALTER TABLE measurements ADD COLUMN max_bound DOUBLE PRECISION; \
                         ALTER TABLE measurements ADD COLUMN min_bound DOUBLE PRECISION;";

/// What several controllers on one database share (SQLite has them too,
/// for its one controller's leases). Written in PostgreSQL's spelling;
/// SQLite's migration respells the two types that differ.
const CLUSTER_9: &str = r#"
CREATE TABLE leases (
    rollout_id TEXT PRIMARY KEY, owner TEXT NOT NULL, epoch BIGINT NOT NULL, expires_at_ms BIGINT NOT NULL);
CREATE TABLE controllers (
    name TEXT PRIMARY KEY, address TEXT NOT NULL, started_at_ms BIGINT NOT NULL,
    seen_at_ms BIGINT NOT NULL, sessions BIGINT NOT NULL);
CREATE TABLE host_sessions (
    host TEXT PRIMARY KEY, controller TEXT NOT NULL, labels TEXT NOT NULL, apps TEXT NOT NULL,
    protocol BIGINT NOT NULL, connected BIGINT NOT NULL, seen_at_ms BIGINT NOT NULL);
CREATE INDEX host_sessions_by_time ON host_sessions (seen_at_ms);
CREATE TABLE relay (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL, op_id TEXT NOT NULL, host TEXT NOT NULL, target TEXT NOT NULL,
    payload BYTEA NOT NULL, at_ms BIGINT NOT NULL);
CREATE INDEX relay_by_target ON relay (kind, target, id);
CREATE INDEX relay_by_host ON relay (kind, host, id);
CREATE TABLE artifact_chunks (
    digest TEXT NOT NULL, n BIGINT NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (digest, n));
"#;

const CONFIG_8: &str = r#"
CREATE TABLE config_revisions (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    revision INTEGER NOT NULL,
    author TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    change TEXT NOT NULL,
    PRIMARY KEY (app, environment, revision)
);
CREATE TABLE config_values (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    revision INTEGER NOT NULL,
    key TEXT NOT NULL,
    secret INTEGER NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (app, environment, revision, key)
);
ALTER TABLE releases ADD COLUMN config_schema TEXT;
"#;

const FREEZES_6: &str = r#"
CREATE TABLE freezes (
    environment TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    frozen_by TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    until_ms INTEGER
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    environment TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#;

const MEASUREMENTS_5: &str = r#"
CREATE TABLE measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    hosts TEXT NOT NULL,
    query TEXT NOT NULL,
    value REAL,
    baseline REAL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX measurements_by_rollout ON measurements (rollout_id, id);
"#;

/// Brings a SQLite database's schema up to this convoy's, one migration
/// at a time, each in its own transaction with the version it reaches.
pub(super) fn migrate_sqlite(conn: &mut rusqlite::Connection) -> Result<(), DbError> {
    let at: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if at > MIGRATIONS.len() {
        return Err(DbError::TooNew {
            found: at,
            known: MIGRATIONS.len(),
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(at) {
        let tx = conn.transaction()?;
        (m.apply)(&tx).map_err(|e| DbError::Migration {
            version: i + 1,
            what: m.what,
            cause: e.to_string(),
        })?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema migrated: {}", m.what);
    }
    Ok(())
}

/// The schema version SQLite databases of this convoy are at.
#[cfg(test)]
pub(super) const SQLITE_VERSION: usize = MIGRATIONS.len();

/// PostgreSQL's migrations: (what, SQL texts). A database at version N has had
/// the first N applied.
const POSTGRES: &[(&str, &[&str])] = &[
    (
        "the schema of SQLite version 8: releases, rollouts, results, events, enrollment, \
         revocation, measurements, freezes, audit, configuration",
        &[POSTGRES_1],
    ),
    (
        "rollout leases, controllers, host sessions, the relay between controllers, shared artifacts",
        &[CLUSTER_9, ONE_RUNNING],
    ),
    (
        "the bounds each metric gate measurement was judged against",
        &[BOUNDS_10],
    ),
];

/// One running rollout per app and environment, whichever controller
/// starts it (SQLite has one controller, which checks).
const ONE_RUNNING: &str =
    "CREATE UNIQUE INDEX one_running_rollout ON rollouts (app, environment) WHERE finished_at_ms IS NULL;";

/// Every table, as SQLite's eight migrations leave it. `rowid` columns
/// stand for SQLite's implicit ones, which queries order by.
const POSTGRES_1: &str = r#"
CREATE TABLE releases (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    app TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL, size BIGINT NOT NULL,
    pushed_by TEXT NOT NULL, pushed_at_ms BIGINT NOT NULL, signature BYTEA,
    unpacked_bytes BIGINT, entries BIGINT, units TEXT, config_schema TEXT,
    PRIMARY KEY (app, version));
CREATE INDEX releases_by_digest ON releases (digest);
CREATE TABLE rollouts (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    id TEXT PRIMARY KEY, app TEXT NOT NULL, version TEXT NOT NULL, environment TEXT NOT NULL,
    operator TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    started_at_ms BIGINT NOT NULL, finished_at_ms BIGINT,
    kind TEXT NOT NULL DEFAULT 'deploy', strategy TEXT NOT NULL DEFAULT '',
    hotfix_reason TEXT NOT NULL DEFAULT '', plan TEXT NOT NULL DEFAULT '',
    approved_by TEXT NOT NULL DEFAULT '');
CREATE INDEX rollouts_by_app ON rollouts (app, started_at_ms);
CREATE INDEX rollouts_by_state ON rollouts (state);
CREATE TABLE rollout_hosts (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    rollout_id TEXT NOT NULL, host TEXT NOT NULL, op_id TEXT NOT NULL, outcome TEXT NOT NULL,
    reason TEXT NOT NULL, restore_detail TEXT NOT NULL, finished_at_ms BIGINT NOT NULL);
CREATE INDEX rollout_hosts_by_op ON rollout_hosts (rollout_id, op_id);
CREATE TABLE events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollout_id TEXT NOT NULL, host TEXT NOT NULL, op_id TEXT NOT NULL,
    step TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL, at_ms BIGINT NOT NULL);
CREATE INDEX events_by_rollout ON events (rollout_id, id);
CREATE TABLE enroll_tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL, expires_at_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL, created_at_ms BIGINT NOT NULL, used_at_ms BIGINT, used_by TEXT);
CREATE TABLE host_labels (host TEXT PRIMARY KEY, labels TEXT NOT NULL);
CREATE TABLE revoked_hosts (host TEXT PRIMARY KEY, revoked_at_ms BIGINT NOT NULL, revoked_by TEXT NOT NULL);
CREATE TABLE measurements (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollout_id TEXT NOT NULL, metric TEXT NOT NULL, hosts TEXT NOT NULL, query TEXT NOT NULL,
    value DOUBLE PRECISION, baseline DOUBLE PRECISION, verdict TEXT NOT NULL, reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL);
CREATE INDEX measurements_by_rollout ON measurements (rollout_id, id);
CREATE TABLE freezes (
    environment TEXT PRIMARY KEY, reason TEXT NOT NULL, frozen_by TEXT NOT NULL,
    at_ms BIGINT NOT NULL, until_ms BIGINT);
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms BIGINT NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL,
    environment TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE config_revisions (
    app TEXT NOT NULL, environment TEXT NOT NULL, revision BIGINT NOT NULL, author TEXT NOT NULL,
    at_ms BIGINT NOT NULL, change TEXT NOT NULL, PRIMARY KEY (app, environment, revision));
CREATE TABLE config_values (
    app TEXT NOT NULL, environment TEXT NOT NULL, revision BIGINT NOT NULL, key TEXT NOT NULL,
    secret BIGINT NOT NULL, value BYTEA NOT NULL, PRIMARY KEY (app, environment, revision, key));
"#;

/// Any number, the same in every convoy: the lock migrations hold.
const MIGRATION_LOCK: i64 = 0x636f_6e76_6f79;

/// Brings a PostgreSQL database's schema up to this convoy's in one
/// transaction; `by` names the controller in `convoy_schema`. Returns the
/// versions it applied (none when another controller got there first).
pub(super) async fn migrate_postgres(conn: Conn, by: &str) -> Result<Vec<usize>, DbError> {
    let mut tx = conn.begin().await?;
    tx.execute("SELECT pg_advisory_xact_lock(?1)", params![MIGRATION_LOCK])
        .await?;
    tx.batch(
        "CREATE TABLE IF NOT EXISTS convoy_schema (
            version BIGINT PRIMARY KEY, what TEXT NOT NULL, by_controller TEXT NOT NULL, at_ms BIGINT NOT NULL)",
    )
    .await?;
    let at = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM convoy_schema", &[])
        .await?
        .get::<i64>(0)? as usize;
    if at > POSTGRES.len() {
        return Err(DbError::TooNew {
            found: at,
            known: POSTGRES.len(),
        });
    }
    let mut applied = Vec::new();
    for (i, (what, sqls)) in POSTGRES.iter().enumerate().skip(at) {
        for sql in *sqls {
            tx.batch(sql).await.map_err(|e| DbError::Migration {
                version: i + 1,
                what,
                cause: e.to_string(),
            })?;
        }
        tx.execute(
            "INSERT INTO convoy_schema (version, what, by_controller, at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![(i + 1) as i64, *what, by, convoy_common::ops::now_unix_ms()],
        )
        .await?;
        applied.push(i + 1);
    }
    tx.commit().await?;
    for v in &applied {
        tracing::info!(version = v, "database schema migrated: {}", POSTGRES[v - 1].0);
    }
    Ok(applied)
}

/// The schema version PostgreSQL databases of this convoy are at.
#[cfg(test)]
pub(super) const POSTGRES_VERSION: usize = POSTGRES.len();
