//! The controller's SQLite store: releases, rollouts, per-host results and
//! every step event, kept append-only as the audit trail.

use std::path::Path;
use std::sync::Mutex;

use convoy_common::ops::{OpReport, StepEvent};
use convoy_common::{AppName, Digest, HostName, Version};
use rusqlite::{params, Connection, OptionalExtension};

pub struct Db {
    conn: Mutex<Connection>,
}

#[derive(Debug, Clone)]
pub struct Release {
    pub digest: Digest,
    pub size: u64,
}

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
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
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn: Mutex::new(conn) })
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
            "INSERT INTO releases (app, version, digest, size, pushed_by, pushed_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![app.as_str(), version.as_str(), rel.digest.to_hex(), rel.size as i64, by, convoy_common::ops::now_unix_ms()],
        )?;
        Ok(true)
    }

    pub fn release(&self, app: &AppName, version: &Version) -> Result<Option<Release>, DbError> {
        get_release(&self.conn.lock().unwrap(), app, version)
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

    pub fn start_rollout(
        &self,
        id: &str,
        app: &AppName,
        version: &Version,
        env: &str,
        operator: &str,
    ) -> Result<(), DbError> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO rollouts (id, app, version, environment, operator, state, started_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)",
            params![id, app.as_str(), version.as_str(), env, operator, convoy_common::ops::now_unix_ms()],
        )?;
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
            "INSERT INTO rollout_hosts (rollout_id, host, op_id, outcome, reason, restore_detail, finished_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![rollout, host.as_str(), r.op_id, serde_json::to_string(&r.outcome).unwrap_or_default(), r.reason, r.restore_detail, convoy_common::ops::now_unix_ms()],
        )?;
        Ok(())
    }
}

fn get_release(conn: &Connection, app: &AppName, version: &Version) -> Result<Option<Release>, DbError> {
    let row: Option<(String, i64)> = conn
        .query_row(
            "SELECT digest, size FROM releases WHERE app = ?1 AND version = ?2",
            params![app.as_str(), version.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(d, size)| {
        Ok(Release {
            digest: Digest::parse(&d).map_err(|e| DbError::Corrupt(e.to_string()))?,
            size: size as u64,
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_immutable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("c.db")).unwrap();
        let (app, v) = (AppName::new("demo").unwrap(), Version::new("1").unwrap());
        let rel = Release {
            digest: Digest::of_bytes(b"a"),
            size: 1,
        };
        assert!(db.add_release(&app, &v, &rel, "op").unwrap());
        assert!(!db.add_release(&app, &v, &rel, "op").unwrap());
        let other = Release {
            digest: Digest::of_bytes(b"b"),
            size: 1,
        };
        let err = db.add_release(&app, &v, &other, "op").unwrap_err();
        assert!(matches!(err, DbError::VersionTaken { .. }), "{err}");
        assert_eq!(db.release(&app, &v).unwrap().unwrap().digest, rel.digest);
    }
}
