//! The controller's SQLite store: releases, rollouts, per-host results and
//! every step event, kept append-only as the audit trail.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use convoy_common::analysis::{Judgement, Measurement};
use convoy_common::ops::{OpReport, StepEvent};
use convoy_common::{AppName, Digest, HostName, Version};
use rusqlite::{params, Connection, OptionalExtension};

pub struct Db {
    conn: Mutex<Connection>,
}

impl Db {
    /// Runs `f` in one transaction (for stores of their own, such as
    /// `appconfig`, that keep their SQL beside their logic).
    pub fn transaction<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct Release {
    pub digest: Digest,
    pub size: u64,
    /// ed25519 signature pushed with the release, if any.
    pub signature: Option<Vec<u8>>,
}

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
struct Migration {
    what: &'static str,
    apply: fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
}

const MIGRATIONS: &[Migration] = &[
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
];

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

/// What a release holds, recorded at push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseContents {
    pub unpacked_bytes: u64,
    /// Unit files in its `systemd/` folder.
    pub units: Vec<String>,
}

/// An environment frozen by an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    pub env: String,
    pub reason: String,
    pub by: String,
    pub at_ms: i64,
    /// `None`: until someone unfreezes it.
    pub until_ms: Option<i64>,
}

/// One entry of the audit of environment actions (freeze, unfreeze,
/// a hotfix through a freeze or outside the windows).
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub at_ms: i64,
    pub who: String,
    pub action: String,
    pub env: String,
    pub detail: String,
}

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

/// Brings the database's schema up to this convoy's, one migration at a
/// time, each in its own transaction with the version it reaches.
fn migrate(conn: &mut Connection) -> Result<(), DbError> {
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
            source: e,
        })?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema migrated: {}", m.what);
    }
    Ok(())
}

/// An enrollment token as stored: name, labels, expiry, used at, used by.
type TokenRow = (String, String, i64, Option<i64>, Option<String>);

/// Why an enrollment token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("this enrollment token was already used (by {by}, at unix ms {at_ms}); tokens work once")]
    Used { by: String, at_ms: i64 },
    #[error("this enrollment token expired (at unix ms {at_ms}); create a new one")]
    Expired { at_ms: i64 },
    #[error("this enrollment token is for host {0}")]
    OtherName(String),
    #[error("a host named {0} is already enrolled; re-enrolling it takes a token created with --name {0}")]
    NameTaken(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for TokenError {
    fn from(e: rusqlite::Error) -> Self {
        TokenError::Db(DbError::Sql(e))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("version {version} of {app} was already pushed with sha256 {existing}; versions are immutable, push a new version")]
    VersionTaken {
        app: AppName,
        version: Version,
        existing: Digest,
    },
    #[error("database holds a bad value: {0}")]
    Corrupt(String),
    #[error("database schema version {found} is newer than this convoy knows ({known}); run the convoy that made it, or a newer one")]
    TooNew { found: usize, known: usize },
    #[error("database migration to schema version {version} ({what}) failed: {source}")]
    Migration {
        version: usize,
        what: &'static str,
        source: rusqlite::Error,
    },
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
        migrate(&mut conn)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    /// Writes the write-ahead log back into the database file, so a
    /// stopped controller leaves one self-contained file. Every write was
    /// already durable (synchronous = FULL); this only tidies.
    pub fn close(&self) {
        if let Err(e) = self
            .conn
            .lock()
            .unwrap()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        {
            tracing::warn!(error = %e, "could not checkpoint the database at stop");
        }
    }

    /// Stores a new enrollment token by its hash (the token itself is never kept).
    pub fn add_token(
        &self,
        hash: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        expires_at_ms: i64,
        by: &str,
    ) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO enroll_tokens (hash, name, labels, expires_at_ms, created_by, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![hash, name, serde_json::to_string(labels).expect("labels serialise"), expires_at_ms, by, convoy_common::ops::now_unix_ms()],
        )?;
        Ok(())
    }

    /// Spends the token with `hash` for host `name`; returns the labels it
    /// carries. A token works once, before it expires, for its own name (or
    /// for a name no host has yet when it names none).
    pub fn spend_token(
        &self,
        hash: &str,
        name: &str,
        known: bool,
        now_ms: i64,
    ) -> Result<BTreeMap<String, String>, TokenError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        let row: Option<TokenRow> = tx
            .query_row(
                "SELECT name, labels, expires_at_ms, used_at_ms, used_by FROM enroll_tokens WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((for_name, labels, expires, used_at, used_by)) = row else {
            return Err(TokenError::Unknown);
        };
        if let Some(at) = used_at {
            return Err(TokenError::Used {
                by: used_by.unwrap_or_default(),
                at_ms: at,
            });
        }
        if now_ms >= expires {
            return Err(TokenError::Expired { at_ms: expires });
        }
        if for_name.is_empty() {
            let enrolled: bool = tx
                .query_row("SELECT 1 FROM host_labels WHERE host = ?1", [name], |_| Ok(()))
                .optional()?
                .is_some();
            if known || enrolled {
                return Err(TokenError::NameTaken(name.to_owned()));
            }
        } else if for_name != name {
            return Err(TokenError::OtherName(for_name));
        }
        tx.execute(
            "UPDATE enroll_tokens SET used_at_ms = ?2, used_by = ?3 WHERE hash = ?1",
            params![hash, now_ms, name],
        )?;
        tx.execute(
            "INSERT INTO host_labels (host, labels) VALUES (?1, ?2) ON CONFLICT (host) DO UPDATE SET labels = ?2",
            params![name, labels],
        )?;
        tx.commit()?;
        Ok(serde_json::from_str(&labels).unwrap_or_default())
    }

    /// Labels a host enrolled with, which its own config cannot override.
    pub fn host_labels(&self, host: &str) -> Result<BTreeMap<String, String>, DbError> {
        let conn = self.conn.lock().unwrap();
        let labels: Option<String> = conn
            .query_row("SELECT labels FROM host_labels WHERE host = ?1", [host], |r| r.get(0))
            .optional()?;
        Ok(labels.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default())
    }

    pub fn revoke_host(&self, host: &str, at_ms: i64, by: &str) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO revoked_hosts (host, revoked_at_ms, revoked_by) VALUES (?1, ?2, ?3)
             ON CONFLICT (host) DO UPDATE SET revoked_at_ms = ?2, revoked_by = ?3",
            params![host, at_ms, by],
        )?;
        Ok(())
    }

    /// When `host` was last revoked: its certificates issued until then are refused.
    pub fn revoked_at(&self, host: &str) -> Result<Option<i64>, DbError> {
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .query_row("SELECT revoked_at_ms FROM revoked_hosts WHERE host = ?1", [host], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Records a pushed release; `Ok(false)` when it was already there with
    /// the same digest.
    pub fn add_release(&self, app: &AppName, version: &Version, rel: &Release, by: &str) -> Result<bool, DbError> {
        let conn = self.conn.lock().unwrap();
        if let Some(existing) = get_release(&conn, app, version)? {
            if existing.digest == rel.digest {
                return Ok(false);
            }
            return Err(DbError::VersionTaken {
                app: app.clone(),
                version: version.clone(),
                existing: existing.digest,
            });
        }
        conn.execute(
            "INSERT INTO releases (app, version, digest, size, signature, pushed_by, pushed_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                app.as_str(),
                version.as_str(),
                rel.digest.to_hex(),
                rel.size as i64,
                rel.signature,
                by,
                convoy_common::ops::now_unix_ms()
            ],
        )?;
        Ok(true)
    }

    /// Records what a release unpacks to, as measured at push.
    pub fn set_release_contents(
        &self,
        app: &AppName,
        version: &Version,
        bytes: u64,
        entries: u64,
        units: &[String],
    ) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "UPDATE releases SET unpacked_bytes = ?3, entries = ?4, units = ?5 WHERE app = ?1 AND version = ?2",
            params![
                app.as_str(),
                version.as_str(),
                bytes as i64,
                entries as i64,
                units.join(",")
            ],
        )?;
        Ok(())
    }

    /// What a release unpacks to and the unit files it ships, as recorded
    /// at push (`None` for releases pushed before convoy recorded them).
    pub fn release_contents(&self, app: &AppName, version: &Version) -> Result<Option<ReleaseContents>, DbError> {
        Ok(self
            .conn
            .lock()
            .unwrap()
            .query_row(
                "SELECT unpacked_bytes, units FROM releases WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version.as_str()],
                |r| {
                    let bytes: Option<i64> = r.get(0)?;
                    let units: Option<String> = r.get(1)?;
                    Ok(bytes.map(|b| ReleaseContents {
                        unpacked_bytes: b as u64,
                        units: units
                            .unwrap_or_default()
                            .split(',')
                            .filter(|u| !u.is_empty())
                            .map(String::from)
                            .collect(),
                    }))
                },
            )
            .optional()?
            .flatten())
    }

    pub fn release(&self, app: &AppName, version: &Version) -> Result<Option<Release>, DbError> {
        get_release(&self.conn.lock().unwrap(), app, version)
    }

    /// Every pushed release of `app`, newest first.
    pub fn releases(&self, app: &AppName) -> Result<Vec<ReleaseRow>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT version, digest, size, signature IS NOT NULL, pushed_by, pushed_at_ms, unpacked_bytes, entries
             FROM releases WHERE app = ?1 ORDER BY pushed_at_ms DESC, rowid DESC",
        )?;
        let rows = stmt.query_map([app.as_str()], |r| {
            Ok(ReleaseRow {
                version: r.get(0)?,
                digest: r.get(1)?,
                size: r.get::<_, i64>(2)? as u64,
                signed: r.get(3)?,
                pushed_by: r.get(4)?,
                pushed_at_ms: r.get(5)?,
                unpacked_bytes: r.get::<_, Option<i64>>(6)?.map(|n| n as u64),
                entries: r.get::<_, Option<i64>>(7)?.map(|n| n as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn digest_known(&self, digest: &Digest) -> Result<bool, DbError> {
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .query_row(
                "SELECT 1 FROM releases WHERE digest = ?1 LIMIT 1",
                [digest.to_hex()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn start_rollout(&self, r: &NewRollout<'_>) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO rollouts (id, app, version, environment, kind, strategy, hotfix_reason, operator, state, started_at_ms, plan)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'running', ?9, ?10)",
            params![
                r.id,
                r.app.as_str(),
                r.version,
                r.env,
                r.kind,
                r.strategy,
                r.hotfix_reason,
                r.operator,
                convoy_common::ops::now_unix_ms(),
                r.plan
            ],
        )?;
        Ok(())
    }

    /// Whether `version` of `app` completed a deploy in `env`.
    pub fn completed_in(&self, app: &AppName, version: &Version, env: &str) -> Result<bool, DbError> {
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .query_row(
                "SELECT 1 FROM rollouts WHERE app = ?1 AND version = ?2 AND environment = ?3
                 AND kind = 'deploy' AND state = 'succeeded' LIMIT 1",
                params![app.as_str(), version.as_str(), env],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Rollouts still marked running, with their saved plans, oldest first.
    pub fn running_rollouts(&self) -> Result<Vec<(RolloutRow, String)>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ROLLOUT_COLUMNS}, plan FROM rollouts WHERE state IN ('running', 'paused', 'awaiting_approval', 'awaiting_promotion') ORDER BY started_at_ms"
        ))?;
        let rows = stmt.query_map([], |r| Ok((rollout_row(r)?, r.get(13)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Delivery figures for `app` from its finished rollouts since `since_ms`.
    pub fn report(&self, app: &AppName, since_ms: i64, now_ms: i64) -> Result<Report, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT environment, kind, state, finished_at_ms FROM rollouts
             WHERE app = ?1 AND finished_at_ms IS NOT NULL AND finished_at_ms >= ?2 ORDER BY finished_at_ms",
        )?;
        let rows = stmt.query_map(params![app.as_str(), since_ms], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let rows: Vec<(String, String, String, i64)> = rows.collect::<Result<_, _>>()?;
        Ok(Report::from_rows(&rows, since_ms, now_ms))
    }

    /// Rollouts of `app`, newest first.
    pub fn history(&self, app: &AppName, limit: u32) -> Result<Vec<RolloutRow>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE app = ?1 ORDER BY started_at_ms DESC, rowid DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![app.as_str(), limit], rollout_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn rollout(&self, id: &str) -> Result<Option<RolloutRow>, DbError> {
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .query_row(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"),
                [id],
                rollout_row,
            )
            .optional()?)
    }

    /// A rollout with its saved plan.
    pub fn rollout_with_plan(&self, id: &str) -> Result<Option<(RolloutRow, String)>, DbError> {
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .query_row(
                &format!("SELECT {ROLLOUT_COLUMNS}, plan FROM rollouts WHERE id = ?1"),
                [id],
                |r| Ok((rollout_row(r)?, r.get(13)?)),
            )
            .optional()?)
    }

    /// The recorded outcome of operation `op_id` of rollout `id`, if any.
    pub fn host_outcome(&self, id: &str, op_id: &str) -> Result<Option<convoy_common::ops::Outcome>, DbError> {
        let conn = self.conn.lock().unwrap();
        let name: Option<String> = conn
            .query_row(
                "SELECT outcome FROM rollout_hosts WHERE rollout_id = ?1 AND op_id = ?2",
                [id, op_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(name.as_deref().and_then(outcome_from_name))
    }

    /// Freezes an environment (replacing its freeze, if any) and audits it.
    pub fn set_freeze(&self, f: &Freeze) -> Result<(), DbError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO freezes (environment, reason, frozen_by, at_ms, until_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![f.env, f.reason, f.by, f.at_ms, f.until_ms],
        )?;
        let detail = match f.until_ms {
            Some(u) => format!(
                "{} (until {})",
                f.reason,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(u.max(0) as u64)
                )
            ),
            None => f.reason.clone(),
        };
        tx.execute(
            "INSERT INTO audit (at_ms, who, action, environment, detail) VALUES (?1, ?2, 'freeze', ?3, ?4)",
            params![f.at_ms, f.by, f.env, detail],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Lifts an environment's freeze and audits it; `None` if none was set.
    pub fn clear_freeze(&self, env: &str, who: &str) -> Result<Option<Freeze>, DbError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        let Some(f) = freeze_of(&tx, env)? else {
            return Ok(None);
        };
        tx.execute("DELETE FROM freezes WHERE environment = ?1", [env])?;
        tx.execute(
            "INSERT INTO audit (at_ms, who, action, environment, detail) VALUES (?1, ?2, 'unfreeze', ?3, ?4)",
            params![
                convoy_common::ops::now_unix_ms(),
                who,
                env,
                format!("lifted the freeze by {}: {}", f.by, f.reason)
            ],
        )?;
        tx.commit()?;
        Ok(Some(f))
    }

    pub fn freezes(&self) -> Result<Vec<Freeze>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt =
            conn.prepare("SELECT environment, reason, frozen_by, at_ms, until_ms FROM freezes ORDER BY environment")?;
        let rows = stmt.query_map([], freeze_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn audit(&self, who: &str, action: &str, env: &str, detail: &str) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO audit (at_ms, who, action, environment, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![convoy_common::ops::now_unix_ms(), who, action, env, detail],
        )?;
        Ok(())
    }

    /// The newest `limit` audit entries, newest first.
    pub fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt =
            conn.prepare("SELECT at_ms, who, action, environment, detail FROM audit ORDER BY id DESC LIMIT ?1")?;
        let rows = stmt.query_map([limit], |r| {
            Ok(AuditRow {
                at_ms: r.get(0)?,
                who: r.get(1)?,
                action: r.get(2)?,
                env: r.get(3)?,
                detail: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn record_measurement(&self, rollout: &str, m: &Measurement) -> Result<(), DbError> {
        let hosts: Vec<&str> = m.hosts.iter().map(|h| h.as_str()).collect();
        self.conn.lock().unwrap().execute(
            "INSERT INTO measurements (rollout_id, metric, hosts, query, value, baseline, verdict, reason, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                rollout,
                m.metric,
                hosts.join(","),
                m.query,
                m.value,
                m.baseline,
                m.judgement.as_str(),
                m.reason,
                m.at_ms
            ],
        )?;
        Ok(())
    }

    pub fn measurements(&self, rollout: &str) -> Result<Vec<Measurement>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT metric, hosts, query, value, baseline, verdict, reason, at_ms FROM measurements
             WHERE rollout_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([rollout], |r| {
            let hosts: String = r.get(1)?;
            let verdict: String = r.get(5)?;
            Ok(Measurement {
                metric: r.get(0)?,
                hosts: hosts
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .filter_map(|h| HostName::new(h.to_owned()).ok())
                    .collect(),
                query: r.get(2)?,
                value: r.get(3)?,
                baseline: r.get(4)?,
                judgement: Judgement::parse(&verdict).unwrap_or(Judgement::Fail),
                reason: r.get(6)?,
                at_ms: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn rollout_hosts(&self, id: &str) -> Result<Vec<HostRow>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT host, op_id, outcome, reason, restore_detail, finished_at_ms FROM rollout_hosts
             WHERE rollout_id = ?1 ORDER BY rowid",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(HostRow {
                host: r.get(0)?,
                op_id: r.get(1)?,
                outcome: r.get(2)?,
                reason: r.get(3)?,
                restore_detail: r.get(4)?,
                finished_at_ms: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn rollout_events(&self, id: &str) -> Result<Vec<EventRow>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt =
            conn.prepare("SELECT host, step, kind, message, at_ms FROM events WHERE rollout_id = ?1 ORDER BY id")?;
        let rows = stmt.query_map([id], |r| {
            Ok(EventRow {
                host: r.get(0)?,
                step: r.get(1)?,
                kind: r.get(2)?,
                message: r.get(3)?,
                at_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records who approved a rollout.
    pub fn approve(&self, id: &str, by: &str) -> Result<(), DbError> {
        self.conn
            .lock()
            .unwrap()
            .execute("UPDATE rollouts SET approved_by = ?2 WHERE id = ?1", params![id, by])?;
        Ok(())
    }

    /// Marks a rollout paused or running again.
    pub fn set_rollout_state(&self, id: &str, state: &str) -> Result<(), DbError> {
        self.conn
            .lock()
            .unwrap()
            .execute("UPDATE rollouts SET state = ?2 WHERE id = ?1", params![id, state])?;
        Ok(())
    }

    pub fn finish_rollout(&self, id: &str, state: &str, reason: &str) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "UPDATE rollouts SET state = ?2, reason = ?3, finished_at_ms = ?4 WHERE id = ?1",
            params![id, state, reason, convoy_common::ops::now_unix_ms()],
        )?;
        Ok(())
    }

    pub fn record_event(&self, rollout: &str, host: &HostName, e: &StepEvent) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO events (rollout_id, host, op_id, step, kind, message, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![rollout, host.as_str(), e.op_id, e.step.as_str(), format!("{:?}", e.kind).to_lowercase(), e.message, e.at_unix_ms],
        )?;
        Ok(())
    }

    pub fn record_host_result(&self, rollout: &str, host: &HostName, r: &OpReport) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO rollout_hosts (rollout_id, host, op_id, outcome, reason, restore_detail, finished_at_ms)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
             WHERE NOT EXISTS (SELECT 1 FROM rollout_hosts WHERE rollout_id = ?1 AND op_id = ?3)",
            params![
                rollout,
                host.as_str(),
                r.op_id,
                outcome_name(r.outcome),
                r.reason,
                r.restore_detail,
                convoy_common::ops::now_unix_ms()
            ],
        )?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ReleaseRow {
    pub version: String,
    pub digest: String,
    pub size: u64,
    pub signed: bool,
    pub pushed_by: String,
    pub pushed_at_ms: i64,
    /// What the archive unpacks to (bytes, entries), measured at push;
    /// `None` for releases pushed before convoy measured it.
    pub unpacked_bytes: Option<u64>,
    pub entries: Option<u64>,
}

/// Delivery figures (the DORA metrics convoy can know).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub deploys: u32,
    pub failed_deploys: u32,
    /// Successful deploys per day over the window.
    pub deploys_per_day: f64,
    /// Failed or rolled-back deploys over all finished deploys.
    pub change_failure_rate: Option<f64>,
    /// From a failed deploy's end to the next successful rollout (deploy or
    /// rollback) in the same environment, averaged.
    pub mean_time_to_restore_secs: Option<f64>,
    pub restores_measured: u32,
}

impl Report {
    /// `rows`: (environment, kind, state, finished_at_ms), oldest first.
    pub fn from_rows(rows: &[(String, String, String, i64)], since_ms: i64, now_ms: i64) -> Report {
        let deploys: Vec<_> = rows.iter().filter(|r| r.1 == "deploy").collect();
        let succeeded = deploys.iter().filter(|r| r.2 == "succeeded").count() as u32;
        let failed = deploys
            .iter()
            .filter(|r| r.2 == "failed" || r.2 == "rolled_back")
            .count() as u32;
        let days = ((now_ms - since_ms).max(1) as f64) / 86_400_000.0;
        let mut restores = Vec::new();
        for f in deploys.iter().filter(|r| r.2 != "succeeded") {
            if let Some(next) = rows.iter().find(|r| r.0 == f.0 && r.2 == "succeeded" && r.3 >= f.3) {
                restores.push((next.3 - f.3) as f64 / 1000.0);
            }
        }
        Report {
            deploys: succeeded + failed,
            failed_deploys: failed,
            deploys_per_day: succeeded as f64 / days,
            change_failure_rate: (succeeded + failed > 0).then(|| failed as f64 / (succeeded + failed) as f64),
            mean_time_to_restore_secs: (!restores.is_empty())
                .then(|| restores.iter().sum::<f64>() / restores.len() as f64),
            restores_measured: restores.len() as u32,
        }
    }
}

/// A rollout about to start.
pub struct NewRollout<'a> {
    pub id: &'a str,
    pub app: &'a AppName,
    /// The version deployed, or rolled back to ("previous" when each host
    /// goes back to its own previous release).
    pub version: &'a str,
    pub env: &'a str,
    /// "deploy" or "rollback".
    pub kind: &'a str,
    pub strategy: &'a str,
    pub hotfix_reason: &'a str,
    pub operator: &'a str,
    /// What a restarted controller needs to finish the rollout (JSON).
    pub plan: &'a str,
}

fn freeze_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Freeze> {
    Ok(Freeze {
        env: r.get(0)?,
        reason: r.get(1)?,
        by: r.get(2)?,
        at_ms: r.get(3)?,
        until_ms: r.get(4)?,
    })
}

fn freeze_of(conn: &Connection, env: &str) -> rusqlite::Result<Option<Freeze>> {
    conn.query_row(
        "SELECT environment, reason, frozen_by, at_ms, until_ms FROM freezes WHERE environment = ?1",
        [env],
        freeze_row,
    )
    .optional()
}

#[derive(Debug, Clone)]
pub struct RolloutRow {
    pub id: String,
    pub app: String,
    pub version: String,
    pub env: String,
    pub kind: String,
    pub strategy: String,
    pub hotfix_reason: String,
    pub operator: String,
    pub state: String,
    pub reason: String,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub approved_by: String,
}

const ROLLOUT_COLUMNS: &str = "id, app, version, environment, kind, strategy, hotfix_reason, operator, state, reason, \
                               started_at_ms, finished_at_ms, approved_by";

fn rollout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.get(0)?,
        app: r.get(1)?,
        version: r.get(2)?,
        env: r.get(3)?,
        kind: r.get(4)?,
        strategy: r.get(5)?,
        hotfix_reason: r.get(6)?,
        operator: r.get(7)?,
        state: r.get(8)?,
        reason: r.get(9)?,
        started_at_ms: r.get(10)?,
        finished_at_ms: r.get(11)?,
        approved_by: r.get(12)?,
    })
}

#[derive(Debug, Clone)]
pub struct HostRow {
    pub host: String,
    pub op_id: String,
    pub outcome: String,
    pub reason: String,
    pub restore_detail: String,
    pub finished_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub host: String,
    pub step: String,
    pub kind: String,
    pub message: String,
    pub at_ms: i64,
}

fn get_release(conn: &Connection, app: &AppName, version: &Version) -> Result<Option<Release>, DbError> {
    let row: Option<(String, i64, Option<Vec<u8>>)> = conn
        .query_row(
            "SELECT digest, size, signature FROM releases WHERE app = ?1 AND version = ?2",
            params![app.as_str(), version.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    row.map(|(d, size, signature)| {
        Ok(Release {
            digest: Digest::parse(&d).map_err(|e| DbError::Corrupt(e.to_string()))?,
            size: size as u64,
            signature,
        })
    })
    .transpose()
}

/// The outcome a stored name stands for (the reverse of `outcome_name`).
pub fn outcome_from_name(name: &str) -> Option<convoy_common::ops::Outcome> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

fn outcome_name(o: convoy_common::ops::Outcome) -> String {
    o.label().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database file made by `sql` (an older convoy's schema and rows).
    fn made_by(sql: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        Connection::open(&path).unwrap().execute_batch(sql).unwrap();
        (dir, path)
    }

    fn user_version(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_database_of_the_first_release_is_migrated_and_keeps_its_records() {
        let (_dir, path) = made_by(include_str!("../testdata/schema-first-release.sql"));
        assert_eq!(user_version(&path), 0);
        let db = Db::open(&path).expect("migrates");
        assert_eq!(user_version(&path) as usize, MIGRATIONS.len());
        let app = AppName::new("demo").unwrap();
        // Old rows read back through today's queries, new columns defaulted.
        let rel = db.release(&app, &Version::new("1.0.0").unwrap()).unwrap().unwrap();
        assert_eq!(rel.size, 1234);
        assert_eq!(rel.signature, None);
        let row = db.rollout("0123456789ab").unwrap().unwrap();
        assert_eq!((row.state.as_str(), row.kind.as_str()), ("succeeded", "deploy"));
        assert_eq!(db.rollout_hosts("0123456789ab").unwrap().len(), 1);
        assert_eq!(db.rollout_events("0123456789ab").unwrap().len(), 1);
        assert!(db
            .completed_in(&app, &Version::new("1.0.0").unwrap(), "staging")
            .unwrap());
        let rows = db.releases(&app).unwrap();
        assert_eq!(
            (rows[0].unpacked_bytes, rows[0].entries),
            (None, None),
            "not measured then"
        );
        let v1 = Version::new("1.0.0").unwrap();
        assert_eq!(db.release_contents(&app, &v1).unwrap(), None);
        db.set_release_contents(&app, &v1, 4096, 3, &["web.service".into()])
            .unwrap();
        let rows = db.releases(&app).unwrap();
        assert_eq!((rows[0].unpacked_bytes, rows[0].entries), (Some(4096), Some(3)));
        let contents = db.release_contents(&app, &v1).unwrap().unwrap();
        assert_eq!(contents.units, ["web.service"]);
        // And new records go in, into columns the first schema lacked.
        db.start_rollout(&NewRollout {
            id: "0123456789ac",
            app: &app,
            version: "1.0.0",
            env: "production",
            kind: "deploy",
            strategy: "rolling, 1 at a time",
            hotfix_reason: "",
            operator: "operator:bob",
            plan: "{}",
        })
        .unwrap();
        db.approve("0123456789ac", "operator:carol").unwrap();
        assert_eq!(db.running_rollouts().unwrap().len(), 1);
        db.add_token("h1", "", &BTreeMap::new(), 1_000, "admin").unwrap();
        drop(db);
        // Opening again is a no-op.
        Db::open(&path).expect("opens again");
        assert_eq!(user_version(&path) as usize, MIGRATIONS.len());
    }

    #[test]
    fn a_database_made_just_before_versioned_migrations_is_migrated() {
        // Every column already there: the migration must not add them twice.
        let (_dir, path) = made_by(include_str!("../testdata/schema-before-migrations.sql"));
        let db = Db::open(&path).expect("migrates");
        let app = AppName::new("demo").unwrap();
        assert!(db.release(&app, &Version::new("1.0.0").unwrap()).unwrap().is_some());
        assert_eq!(user_version(&path) as usize, MIGRATIONS.len());
    }

    #[test]
    fn the_hot_queries_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("i.db")).unwrap();
        let conn = db.conn.lock().unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt.query_map([], |r| r.get::<_, String>(3)).unwrap();
            rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
        };
        for (sql, index) in [
            (
                "SELECT outcome FROM rollout_hosts WHERE rollout_id = 'a' AND op_id = 'b'",
                "rollout_hosts_by_op",
            ),
            (
                "SELECT host FROM rollout_hosts WHERE rollout_id = 'a'",
                "rollout_hosts_by_op",
            ),
            (
                "SELECT host FROM events WHERE rollout_id = 'a' ORDER BY id",
                "events_by_rollout",
            ),
            (
                "SELECT id FROM rollouts WHERE state IN ('running', 'paused')",
                "rollouts_by_state",
            ),
        ] {
            let p = plan(sql);
            assert!(p.contains(index), "{sql}: {p}");
        }
    }

    #[test]
    fn a_database_from_a_newer_convoy_is_refused_untouched() {
        let (_dir, path) = made_by("CREATE TABLE future (x); PRAGMA user_version = 99;");
        let e = Db::open(&path).err().expect("refused").to_string();
        assert!(
            e.contains(&format!(
                "schema version 99 is newer than this convoy knows ({})",
                MIGRATIONS.len()
            )),
            "{e}"
        );
        assert_eq!(user_version(&path), 99);
    }

    #[test]
    fn tokens_work_once_in_time_for_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        let labels: BTreeMap<String, String> = [("env".to_owned(), "staging".to_owned())].into();
        db.add_token("h1", "", &labels, 1_000, "admin").unwrap();
        db.add_token("h2", "web2", &labels, 1_000, "admin").unwrap();
        let err = |r: Result<BTreeMap<String, String>, TokenError>| r.unwrap_err().to_string();
        assert_eq!(
            err(db.spend_token("nope", "web1", false, 0)),
            "unknown enrollment token"
        );
        assert!(err(db.spend_token("h1", "web1", false, 1_000)).contains("expired"));
        assert!(err(db.spend_token("h1", "web1", true, 0)).contains("a host named web1 is already enrolled"));
        assert_eq!(db.spend_token("h1", "web1", false, 0).unwrap(), labels);
        assert_eq!(db.host_labels("web1").unwrap(), labels);
        assert!(err(db.spend_token("h1", "web3", false, 0)).contains("already used (by web1"));
        assert!(err(db.spend_token("h2", "web3", false, 0)).contains("this enrollment token is for host web2"));
        // A named token re-enrolls a known host.
        assert!(db.spend_token("h2", "web2", true, 0).is_ok());
        db.add_token("h3", "", &labels, 1_000, "admin").unwrap();
        assert!(err(db.spend_token("h3", "web2", false, 0)).contains("already enrolled"));
    }

    fn row(env: &str, kind: &str, state: &str, at_s: i64) -> (String, String, String, i64) {
        (env.into(), kind.into(), state.into(), at_s * 1000)
    }

    #[test]
    fn report_figures() {
        const DAY: i64 = 86_400;
        let rows = [
            row("prod", "deploy", "succeeded", 100),
            row("prod", "deploy", "rolled_back", 200),
            row("staging", "deploy", "succeeded", 250),
            row("prod", "rollback", "succeeded", 260), // restores prod 60 s after
            row("prod", "deploy", "failed", 300),
            row("prod", "deploy", "succeeded", 420), // restores prod 120 s after
        ];
        let r = Report::from_rows(&rows, 0, 2 * DAY * 1000);
        assert_eq!((r.deploys, r.failed_deploys, r.restores_measured), (5, 2, 2));
        assert_eq!(r.deploys_per_day, 1.5);
        assert_eq!(r.change_failure_rate, Some(0.4));
        assert_eq!(r.mean_time_to_restore_secs, Some(90.0));
        let empty = Report::from_rows(&[], 0, DAY * 1000);
        assert_eq!(
            (empty.change_failure_rate, empty.mean_time_to_restore_secs),
            (None, None)
        );
    }

    #[test]
    fn versions_are_immutable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("c.db")).unwrap();
        let (app, v) = (AppName::new("demo").unwrap(), Version::new("1").unwrap());
        let rel = Release {
            digest: Digest::of_bytes(b"a"),
            size: 1,
            signature: Some(vec![1; 64]),
        };
        assert!(db.add_release(&app, &v, &rel, "op").unwrap());
        assert!(!db.add_release(&app, &v, &rel, "op").unwrap());
        let other = Release {
            digest: Digest::of_bytes(b"b"),
            size: 1,
            signature: None,
        };
        let err = db.add_release(&app, &v, &other, "op").unwrap_err();
        assert!(matches!(err, DbError::VersionTaken { .. }), "{err}");
        let stored = db.release(&app, &v).unwrap().unwrap();
        assert_eq!((stored.digest, stored.signature), (rel.digest, rel.signature));
    }
}
