//! The controller's store: releases, rollouts, per-host results and every
//! step event, kept append-only as the audit trail. One interface, two
//! engines: SQLite (the embedded default, one controller) and PostgreSQL
//! (several controllers on one database); every query runs on both.

mod cluster;
mod schema;
mod sql;
#[cfg(test)]
pub mod testing;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use convoy_common::analysis::{Judgement, Measurement};
use convoy_common::ops::{OpReport, StepEvent};
use convoy_common::{AppName, Digest, HostName, Version};

use crate::params;
pub use cluster::Takeable;
pub use sql::{Conn, Row, Tx, Value};

/// How long a rollout's lease lasts unless renewed: a controller that
/// stops renewing loses its rollouts to another this long after.
pub const LEASE_TTL_MS: i64 = 10_000;

/// How long PostgreSQL keeps a transaction whose controller stopped
/// talking in the middle of it (paused, or cut off): after this the
/// server rolls it back and frees its locks, the lease row's among them,
/// so a takeover never waits on a controller that is not running.
/// Transactions here last milliseconds.
pub const IDLE_IN_TRANSACTION: std::time::Duration = std::time::Duration::from_secs(5);

/// The states of a rollout that has not ended: the controller holding its
/// lease drives it, and another takes it over when that one stops.
pub const LIVE_STATES: [&str; 5] = ["running", "paused", "awaiting_approval", "awaiting_promotion", "frozen"];

/// `LIVE_STATES` as an SQL list, for `state IN (...)`.
fn live_states_sql() -> String {
    LIVE_STATES.map(|s| format!("'{s}'")).join(", ")
}

pub struct Db {
    engine: sql::Engine,
    /// This controller's name: the owner of the leases it takes.
    owner: String,
    /// Rollouts this controller drives, or drove until it learnt another
    /// took them over, → the lease epoch it took; their writes are
    /// fenced (`cluster::fence`).
    fences: std::sync::Mutex<std::collections::HashMap<String, cluster::Fence>>,
}

/// Where a PostgreSQL store is and how to reach it (`database` and the
/// `database_*` keys of controller.toml).
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://user@host:port/db?sslmode=…`; a password may be in it,
    /// and is never logged.
    pub url: String,
    /// CA (PEM) the server's certificate must chain to, besides the
    /// system's roots; with `sslmode=require` the certificate and the host
    /// name are always verified.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that require one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Connections this controller keeps at most.
    pub pool: usize,
}

impl Db {
    /// Takes a connection for statements of its own (stores that keep
    /// their SQL beside their logic, such as `appconfig`).
    pub async fn conn(&self) -> Result<Conn, DbError> {
        self.engine.conn().await
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        self.engine.conn().await?.begin().await
    }

    /// Runs one statement on a connection of its own.
    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        self.conn().await?.execute(sql, params).await
    }

    /// Runs one query on a connection of its own.
    pub async fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        self.conn().await?.query(sql, params).await
    }

    pub async fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        self.conn().await?.query_opt(sql, params).await
    }

    /// "sqlite" or "postgres".
    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            sql::Engine::Sqlite(_) => "sqlite",
            sql::Engine::Postgres(_) => "postgres",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Release {
    pub digest: Digest,
    pub size: u64,
    /// ed25519 signature pushed with the release, if any.
    pub signature: Option<Vec<u8>>,
}

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

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Postgres(String),
    #[error("database unreachable: {0}")]
    Unavailable(String),
    #[error("version {version} of {app} was already pushed with sha256 {existing}; versions are immutable, push a new version")]
    VersionTaken {
        app: AppName,
        version: Version,
        existing: Digest,
    },
    #[error("database holds a bad value: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Busy(String),
    #[error("rollout {rollout} was taken over by another controller (its lease is at epoch {now:?}, this controller held {epoch}); this controller stopped driving it")]
    Fenced {
        rollout: String,
        epoch: i64,
        now: Option<i64>,
    },
    #[error("database schema version {found} is newer than this convoy knows ({known}); run the convoy that made it, or a newer one")]
    TooNew { found: usize, known: usize },
    #[error("database migration to schema version {version} ({what}) failed: {cause}")]
    Migration {
        version: usize,
        what: &'static str,
        cause: String,
    },
}

impl DbError {
    /// A PostgreSQL error with the server's own message and detail (the
    /// driver's display says only "db error").
    pub(crate) fn postgres(e: tokio_postgres::Error) -> DbError {
        match e.as_db_error() {
            // Connection exceptions (08) and operator intervention (57:
            // the server shutting down, restarting): the database is away.
            // A transaction the server ended after `IDLE_IN_TRANSACTION`
            // (this controller was stopped in it) is rolled back: it is
            // retried whole, as after a restart.
            Some(db)
                if matches!(&db.code().code()[..2], "08" | "57")
                    || *db.code() == tokio_postgres::error::SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT =>
            {
                DbError::Unavailable(db.message().to_owned())
            }
            Some(db) => DbError::Postgres(match db.detail() {
                Some(d) => format!("{} ({d})", db.message()),
                None => db.message().to_owned(),
            }),
            None if e.is_closed() => DbError::Unavailable(e.to_string()),
            None => DbError::Unavailable(with_causes(&e)),
        }
    }

    /// Whether the statement broke a uniqueness rule (another writer got
    /// there first).
    pub fn is_conflict(&self) -> bool {
        match self {
            DbError::Sql(rusqlite::Error::SqliteFailure(e, _)) => e.code == rusqlite::ErrorCode::ConstraintViolation,
            DbError::Postgres(m) => m.starts_with("duplicate key value"),
            _ => false,
        }
    }
}

/// An error and the errors that caused it, outermost first (the
/// driver's own says only "error connecting to server").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !out.contains(&c_text) {
            out = format!("{out}: {c_text}");
        }
        cause = c.source();
    }
    out
}

/// TLS for a PostgreSQL connection: the configured CA besides the
/// system's roots, and a client certificate when one is configured.
fn postgres_tls(o: &PostgresOptions) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(base_roots(o)?);
    let (Some(cert), Some(key)) = (&o.cert, &o.key) else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = std::fs::read(cert).map_err(|e| format!("database_cert: {}: {e}", cert.display()))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("database_key: {}: {e}", key.display()))?;
    let certs = rustls_pemfile::certs(&mut chain.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("database_cert: {e}"))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("database_key: {e}"))?
        .ok_or("database_key: no private key in it")?;
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("database_cert/database_key: {e}"))
}

fn base_roots(o: &PostgresOptions) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = &o.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("database_ca: {}: {e}", ca.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots
                .add(cert.map_err(|e| format!("database_ca: {e}"))?)
                .map_err(|e| format!("database_ca: {e}"))?;
        }
    }
    Ok(roots)
}

impl Db {
    /// Opens (or creates) a SQLite store and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut conn = rusqlite::Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
        schema::migrate_sqlite(&mut conn)?;
        Ok(Self {
            engine: sql::Engine::Sqlite(Arc::new(tokio::sync::Mutex::new(conn))),
            owner: "controller".into(),
            fences: Default::default(),
        })
    }

    /// Names this controller as the owner of the leases it takes.
    pub fn owned_by(mut self, name: &str) -> Self {
        self.owner = name.to_owned();
        self
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Runs a write for `rollout`, fenced when this controller drives it:
    /// refused once another controller took its lease over.
    async fn fenced_execute(&self, rollout: &str, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        if !self.fences.lock().unwrap().contains_key(rollout) {
            return self.execute(sql, params).await;
        }
        let mut tx = self.begin().await?;
        self.fence(&mut tx, rollout).await?;
        cluster::stop_in_write();
        let n = tx.execute(sql, params).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Connects to a PostgreSQL store and brings its schema up to date
    /// (one controller at a time); `by` names this controller in the
    /// schema's record. Returns the store and the versions it applied.
    pub async fn connect(o: &PostgresOptions, by: &str) -> Result<(Self, Vec<usize>), DbError> {
        let mut pg: tokio_postgres::Config = o
            .url
            .parse()
            .map_err(|e| DbError::Unavailable(format!("database: not a postgres:// URL ({e})")))?;
        pg.connect_timeout(Duration::from_secs(5));
        pg.keepalives_idle(Duration::from_secs(10));
        pg.application_name(format!("convoy {by}"));
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
            deadpool_postgres::Manager::from_config(pg, tokio_postgres::NoTls, manager_config)
        } else {
            let tls = postgres_tls(o).map_err(DbError::Unavailable)?;
            deadpool_postgres::Manager::from_config(
                pg,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                manager_config,
            )
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(o.pool)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        let db = Self {
            engine: sql::Engine::Postgres(pool),
            owner: by.to_owned(),
            fences: Default::default(),
        };
        let applied = schema::migrate_postgres(db.conn().await?, by).await?;
        Ok((db, applied))
    }

    /// Writes SQLite's write-ahead log back into the database file, so a
    /// stopped controller leaves one self-contained file. Every write was
    /// already durable (synchronous = FULL); this only tidies.
    pub async fn close(&self) {
        match &self.engine {
            sql::Engine::Sqlite(c) => {
                if let Err(e) = c.lock().await.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                    tracing::warn!(error = %e, "could not checkpoint the database at stop");
                }
            }
            sql::Engine::Postgres(pool) => pool.close(),
        }
    }

    /// Stores a new enrollment token by its hash (the token itself is never kept).
    pub async fn add_token(
        &self,
        hash: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        expires_at_ms: i64,
        by: &str,
    ) -> Result<(), DbError> {
        self.execute(
            "INSERT INTO enroll_tokens (hash, name, labels, expires_at_ms, created_by, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![hash, name, serde_json::to_string(labels).expect("labels serialise"), expires_at_ms, by, convoy_common::ops::now_unix_ms()],
        )
        .await?;
        Ok(())
    }

    /// Spends the token with `hash` for host `name`; returns the labels it
    /// carries. A token works once, before it expires, for its own name (or
    /// for a name no host has yet when it names none).
    pub async fn spend_token(
        &self,
        hash: &str,
        name: &str,
        known: bool,
        now_ms: i64,
    ) -> Result<BTreeMap<String, String>, TokenError> {
        let mut tx = self.begin().await?;
        // FOR UPDATE on PostgreSQL: two controllers spending one token at
        // once take turns, and the second sees it used.
        let lock = if tx.is_postgres() { " FOR UPDATE" } else { "" };
        let row = tx
            .query_opt(
                &format!(
                    "SELECT name, labels, expires_at_ms, used_at_ms, used_by FROM enroll_tokens WHERE hash = ?1{lock}"
                ),
                params![hash],
            )
            .await?;
        let Some(row) = row else {
            return Err(TokenError::Unknown);
        };
        let (for_name, labels, expires): (String, String, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
        if let Some(at) = row.get::<Option<i64>>(3)? {
            return Err(TokenError::Used {
                by: row.get::<Option<String>>(4)?.unwrap_or_default(),
                at_ms: at,
            });
        }
        if now_ms >= expires {
            return Err(TokenError::Expired { at_ms: expires });
        }
        if for_name.is_empty() {
            let enrolled = tx
                .query_opt("SELECT 1 FROM host_labels WHERE host = ?1", params![name])
                .await?
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
        )
        .await?;
        tx.execute(
            "INSERT INTO host_labels (host, labels) VALUES (?1, ?2) ON CONFLICT (host) DO UPDATE SET labels = ?2",
            params![name, &labels],
        )
        .await?;
        tx.commit().await?;
        Ok(serde_json::from_str(&labels).unwrap_or_default())
    }

    /// Labels a host enrolled with, which its own config cannot override.
    pub async fn host_labels(&self, host: &str) -> Result<BTreeMap<String, String>, DbError> {
        let labels: Option<String> = match self
            .query_opt("SELECT labels FROM host_labels WHERE host = ?1", params![host])
            .await?
        {
            Some(r) => r.get(0)?,
            None => None,
        };
        Ok(labels.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default())
    }

    pub async fn revoke_host(&self, host: &str, at_ms: i64, by: &str) -> Result<(), DbError> {
        self.execute(
            "INSERT INTO revoked_hosts (host, revoked_at_ms, revoked_by) VALUES (?1, ?2, ?3)
             ON CONFLICT (host) DO UPDATE SET revoked_at_ms = ?2, revoked_by = ?3",
            params![host, at_ms, by],
        )
        .await?;
        Ok(())
    }

    /// Every revocation: (host, revoked at unix ms).
    pub async fn revocations(&self) -> Result<Vec<(String, i64)>, DbError> {
        self.query("SELECT host, revoked_at_ms FROM revoked_hosts", &[])
            .await?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect()
    }

    /// When `host` was last revoked: its certificates issued until then are refused.
    pub async fn revoked_at(&self, host: &str) -> Result<Option<i64>, DbError> {
        self.query_opt("SELECT revoked_at_ms FROM revoked_hosts WHERE host = ?1", params![host])
            .await?
            .map(|r| r.get(0))
            .transpose()
    }

    /// Records a pushed release; `Ok(false)` when it was already there with
    /// the same digest.
    pub async fn add_release(
        &self,
        app: &AppName,
        version: &Version,
        rel: &Release,
        by: &str,
    ) -> Result<bool, DbError> {
        let mut conn = self.conn().await?;
        loop {
            if let Some(existing) = get_release(&mut conn, app, version).await? {
                if existing.digest == rel.digest {
                    return Ok(false);
                }
                return Err(DbError::VersionTaken {
                    app: app.clone(),
                    version: version.clone(),
                    existing: existing.digest,
                });
            }
            let inserted = conn
                .execute(
                    "INSERT INTO releases (app, version, digest, size, signature, pushed_by, pushed_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        app.as_str(),
                        version.as_str(),
                        rel.digest.to_hex(),
                        rel.size,
                        rel.signature.clone(),
                        by,
                        convoy_common::ops::now_unix_ms()
                    ],
                )
                .await;
            match inserted {
                Ok(_) => return Ok(true),
                // Pushed through another controller meanwhile: compare again.
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Records what a release unpacks to, as measured at push.
    pub async fn set_release_contents(
        &self,
        app: &AppName,
        version: &Version,
        bytes: u64,
        entries: u64,
        units: &[String],
    ) -> Result<(), DbError> {
        self.execute(
            "UPDATE releases SET unpacked_bytes = ?3, entries = ?4, units = ?5 WHERE app = ?1 AND version = ?2",
            params![app.as_str(), version.as_str(), bytes, entries, units.join(",")],
        )
        .await?;
        Ok(())
    }

    /// What a release unpacks to and the unit files it ships, as recorded
    /// at push (`None` for releases pushed before convoy recorded them).
    pub async fn release_contents(&self, app: &AppName, version: &Version) -> Result<Option<ReleaseContents>, DbError> {
        let Some(r) = self
            .query_opt(
                "SELECT unpacked_bytes, units FROM releases WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version.as_str()],
            )
            .await?
        else {
            return Ok(None);
        };
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
    }

    pub async fn release(&self, app: &AppName, version: &Version) -> Result<Option<Release>, DbError> {
        get_release(&mut self.conn().await?, app, version).await
    }

    /// Every pushed release of `app`, newest first.
    pub async fn releases(&self, app: &AppName) -> Result<Vec<ReleaseRow>, DbError> {
        self.query(
            "SELECT version, digest, size, signature IS NOT NULL, pushed_by, pushed_at_ms, unpacked_bytes, entries
             FROM releases WHERE app = ?1 ORDER BY pushed_at_ms DESC, rowid DESC",
            params![app.as_str()],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(ReleaseRow {
                version: r.get(0)?,
                digest: r.get(1)?,
                size: r.get::<i64>(2)? as u64,
                signed: r.get(3)?,
                pushed_by: r.get(4)?,
                pushed_at_ms: r.get(5)?,
                unpacked_bytes: r.get::<Option<i64>>(6)?.map(|n| n as u64),
                entries: r.get::<Option<i64>>(7)?.map(|n| n as u64),
            })
        })
        .collect()
    }

    pub async fn digest_known(&self, digest: &Digest) -> Result<bool, DbError> {
        Ok(self
            .query_opt(
                "SELECT 1 FROM releases WHERE digest = ?1 LIMIT 1",
                params![digest.to_hex()],
            )
            .await?
            .is_some())
    }

    /// Records a new rollout and takes its lease (epoch 1) for this
    /// controller, in one transaction.
    pub async fn start_rollout(&self, r: &NewRollout<'_>) -> Result<(), DbError> {
        let mut tx = self.begin().await?;
        let inserted = tx.execute(
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
        )
        .await;
        match inserted {
            // PostgreSQL: one unfinished rollout per app and environment.
            Err(e) if e.is_conflict() => {
                return Err(DbError::Busy(format!(
                "another rollout of {} in {} is running (started through another controller); see `convoy controllers`",
                r.app, r.env
            )))
            }
            r => r?,
        };
        tx.execute(
            "INSERT INTO leases (rollout_id, owner, epoch, expires_at_ms) VALUES (?1, ?2, 1, ?3)",
            params![r.id, &self.owner, convoy_common::ops::now_unix_ms() + LEASE_TTL_MS],
        )
        .await?;
        tx.commit().await?;
        self.hold(r.id, 1);
        Ok(())
    }

    /// Whether `version` of `app` completed a deploy in `env`.
    pub async fn completed_in(&self, app: &AppName, version: &Version, env: &str) -> Result<bool, DbError> {
        Ok(self
            .query_opt(
                "SELECT 1 FROM rollouts WHERE app = ?1 AND version = ?2 AND environment = ?3
                 AND kind = 'deploy' AND state = 'succeeded' LIMIT 1",
                params![app.as_str(), version.as_str(), env],
            )
            .await?
            .is_some())
    }

    /// Rollouts still marked running, with their saved plans, oldest first.
    #[cfg(test)]
    pub async fn running_rollouts(&self) -> Result<Vec<(RolloutRow, String)>, DbError> {
        self.query(
            &format!(
                "SELECT {ROLLOUT_COLUMNS}, plan FROM rollouts WHERE state IN ({}) ORDER BY started_at_ms",
                live_states_sql()
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| Ok((rollout_row(r)?, r.get(13)?)))
        .collect()
    }

    /// Delivery figures for `app` from its finished rollouts since `since_ms`.
    /// What the delivery report counts: the rollouts of `app` that ended
    /// since `since_ms`, as (environment, kind, state, finished_at_ms),
    /// oldest first.
    pub async fn report_rows(&self, app: &AppName, since_ms: i64) -> Result<Vec<ReportRow>, DbError> {
        self.query(
            "SELECT environment, kind, state, finished_at_ms FROM rollouts
                 WHERE app = ?1 AND finished_at_ms IS NOT NULL AND finished_at_ms >= ?2 ORDER BY finished_at_ms",
            params![app.as_str(), since_ms],
        )
        .await?
        .iter()
        .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .collect()
    }

    #[cfg(test)]
    pub async fn report(&self, app: &AppName, since_ms: i64, now_ms: i64) -> Result<Report, DbError> {
        Ok(Report::from_rows(
            &self.report_rows(app, since_ms).await?,
            since_ms,
            now_ms,
        ))
    }

    /// Rollouts of `app`, newest first.
    pub async fn history(&self, app: &AppName, filter: &HistoryFilter, limit: u32) -> Result<Vec<RolloutRow>, DbError> {
        self.query(
            &format!(
                "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE app = ?1
                 AND (CAST(?2 AS TEXT) IS NULL OR environment = ?2) AND (CAST(?3 AS TEXT) IS NULL OR state = ?3)
                 ORDER BY started_at_ms DESC, rowid DESC LIMIT ?4"
            ),
            params![
                app.as_str(),
                filter.environment.as_deref(),
                filter.state.as_deref(),
                limit
            ],
        )
        .await?
        .iter()
        .map(rollout_row)
        .collect()
    }

    /// The newest rollout of each app into each environment.
    pub async fn last_rollouts(&self) -> Result<Vec<RolloutRow>, DbError> {
        self.query(
            &format!(
                "SELECT {ROLLOUT_COLUMNS} FROM rollouts r WHERE NOT EXISTS (
                   SELECT 1 FROM rollouts n WHERE n.app = r.app AND n.environment = r.environment
                   AND (n.started_at_ms > r.started_at_ms OR (n.started_at_ms = r.started_at_ms AND n.rowid > r.rowid)))
                 ORDER BY app, environment"
            ),
            params![],
        )
        .await?
        .iter()
        .map(rollout_row)
        .collect()
    }

    pub async fn rollout(&self, id: &str) -> Result<Option<RolloutRow>, DbError> {
        self.query_opt(
            &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"),
            params![id],
        )
        .await?
        .as_ref()
        .map(rollout_row)
        .transpose()
    }

    /// A rollout with its saved plan.
    pub async fn rollout_with_plan(&self, id: &str) -> Result<Option<(RolloutRow, String)>, DbError> {
        self.query_opt(
            &format!("SELECT {ROLLOUT_COLUMNS}, plan FROM rollouts WHERE id = ?1"),
            params![id],
        )
        .await?
        .map(|r| Ok((rollout_row(&r)?, r.get(13)?)))
        .transpose()
    }

    /// The recorded outcome of operation `op_id` of rollout `id`, if any.
    pub async fn host_outcome(&self, id: &str, op_id: &str) -> Result<Option<convoy_common::ops::Outcome>, DbError> {
        let name: Option<String> = self
            .query_opt(
                "SELECT outcome FROM rollout_hosts WHERE rollout_id = ?1 AND op_id = ?2",
                params![id, op_id],
            )
            .await?
            .map(|r| r.get(0))
            .transpose()?;
        Ok(name.as_deref().and_then(outcome_from_name))
    }

    /// Freezes an environment (replacing its freeze, if any) and audits it.
    pub async fn set_freeze(&self, f: &Freeze) -> Result<(), DbError> {
        let mut tx = self.begin().await?;
        tx.execute(
            "INSERT INTO freezes (environment, reason, frozen_by, at_ms, until_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (environment) DO UPDATE SET reason = ?2, frozen_by = ?3, at_ms = ?4, until_ms = ?5",
            params![&f.env, &f.reason, &f.by, f.at_ms, f.until_ms],
        )
        .await?;
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
            params![f.at_ms, &f.by, &f.env, detail],
        )
        .await?;
        tx.commit().await
    }

    /// Lifts an environment's freeze and audits it; `None` if none was set.
    pub async fn clear_freeze(&self, env: &str, who: &str) -> Result<Option<Freeze>, DbError> {
        let mut tx = self.begin().await?;
        let Some(f) = freeze_of(&mut tx, env).await? else {
            return Ok(None);
        };
        tx.execute("DELETE FROM freezes WHERE environment = ?1", params![env])
            .await?;
        tx.execute(
            "INSERT INTO audit (at_ms, who, action, environment, detail) VALUES (?1, ?2, 'unfreeze', ?3, ?4)",
            params![
                convoy_common::ops::now_unix_ms(),
                who,
                env,
                format!("lifted the freeze by {}: {}", f.by, f.reason)
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(f))
    }

    pub async fn freezes(&self) -> Result<Vec<Freeze>, DbError> {
        self.query(
            "SELECT environment, reason, frozen_by, at_ms, until_ms FROM freezes ORDER BY environment",
            &[],
        )
        .await?
        .iter()
        .map(freeze_row)
        .collect()
    }

    pub async fn audit(&self, who: &str, action: &str, env: &str, detail: &str) -> Result<(), DbError> {
        self.execute(
            "INSERT INTO audit (at_ms, who, action, environment, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![convoy_common::ops::now_unix_ms(), who, action, env, detail],
        )
        .await?;
        Ok(())
    }

    /// The newest `limit` audit entries, newest first.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>, DbError> {
        self.query(
            "SELECT at_ms, who, action, environment, detail FROM audit ORDER BY id DESC LIMIT ?1",
            params![limit],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(AuditRow {
                at_ms: r.get(0)?,
                who: r.get(1)?,
                action: r.get(2)?,
                env: r.get(3)?,
                detail: r.get(4)?,
            })
        })
        .collect()
    }

    pub async fn record_measurement(&self, rollout: &str, m: &Measurement) -> Result<(), DbError> {
        let hosts: Vec<&str> = m.hosts.iter().map(|h| h.as_str()).collect();
        self.fenced_execute(
            rollout,
            "INSERT INTO measurements (rollout_id, metric, hosts, query, value, baseline, verdict, reason, at_ms,
                                       max_bound, min_bound)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                rollout,
                &m.metric,
                hosts.join(","),
                &m.query,
                m.value,
                m.baseline,
                m.judgement.as_str(),
                &m.reason,
                m.at_ms,
                m.max,
                m.min
            ],
        )
        .await?;
        Ok(())
    }

    pub async fn measurements(&self, rollout: &str) -> Result<Vec<Measurement>, DbError> {
        self.query(
            "SELECT metric, hosts, query, value, baseline, verdict, reason, at_ms, max_bound, min_bound
             FROM measurements WHERE rollout_id = ?1 ORDER BY id",
            params![rollout],
        )
        .await?
        .iter()
        .map(|r| {
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
                max: r.get(8)?,
                min: r.get(9)?,
            })
        })
        .collect()
    }

    pub async fn rollout_hosts(&self, id: &str) -> Result<Vec<HostRow>, DbError> {
        self.query(
            "SELECT host, op_id, outcome, reason, restore_detail, finished_at_ms FROM rollout_hosts
             WHERE rollout_id = ?1 ORDER BY rowid",
            params![id],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(HostRow {
                host: r.get(0)?,
                op_id: r.get(1)?,
                outcome: r.get(2)?,
                reason: r.get(3)?,
                restore_detail: r.get(4)?,
                finished_at_ms: r.get(5)?,
            })
        })
        .collect()
    }

    pub async fn rollout_events(&self, id: &str) -> Result<Vec<EventRow>, DbError> {
        self.query(
            "SELECT host, step, kind, message, at_ms FROM events WHERE rollout_id = ?1 ORDER BY id",
            params![id],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(EventRow {
                host: r.get(0)?,
                step: r.get(1)?,
                kind: r.get(2)?,
                message: r.get(3)?,
                at_ms: r.get(4)?,
            })
        })
        .collect()
    }

    /// Records who approved a rollout.
    pub async fn approve(&self, id: &str, by: &str) -> Result<(), DbError> {
        self.fenced_execute(
            id,
            "UPDATE rollouts SET approved_by = ?2 WHERE id = ?1",
            params![id, by],
        )
        .await?;
        Ok(())
    }

    /// Marks a rollout paused or running again.
    pub async fn set_rollout_state(&self, id: &str, state: &str) -> Result<(), DbError> {
        self.fenced_execute(id, "UPDATE rollouts SET state = ?2 WHERE id = ?1", params![id, state])
            .await?;
        Ok(())
    }

    /// Records a rollout's end and gives its lease up.
    pub async fn finish_rollout(&self, id: &str, state: &str, reason: &str) -> Result<(), DbError> {
        let mut tx = self.begin().await?;
        self.fence(&mut tx, id).await?;
        tx.execute(
            "UPDATE rollouts SET state = ?2, reason = ?3, finished_at_ms = ?4 WHERE id = ?1",
            params![id, state, reason, convoy_common::ops::now_unix_ms()],
        )
        .await?;
        tx.execute("DELETE FROM leases WHERE rollout_id = ?1", params![id])
            .await?;
        tx.commit().await?;
        self.let_go(id);
        Ok(())
    }

    pub async fn record_event(&self, rollout: &str, host: &HostName, e: &StepEvent) -> Result<(), DbError> {
        self.fenced_execute(
            rollout,
            "INSERT INTO events (rollout_id, host, op_id, step, kind, message, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![rollout, host.as_str(), &e.op_id, e.step.as_str(), format!("{:?}", e.kind).to_lowercase(), &e.message, e.at_unix_ms],
        )
        .await?;
        Ok(())
    }

    pub async fn record_host_result(&self, rollout: &str, host: &HostName, r: &OpReport) -> Result<(), DbError> {
        self.fenced_execute(
            rollout,
            "INSERT INTO rollout_hosts (rollout_id, host, op_id, outcome, reason, restore_detail, finished_at_ms)
             SELECT CAST(?1 AS TEXT), CAST(?2 AS TEXT), CAST(?3 AS TEXT), CAST(?4 AS TEXT), CAST(?5 AS TEXT),
                    CAST(?6 AS TEXT), CAST(?7 AS BIGINT)
             WHERE NOT EXISTS (SELECT 1 FROM rollout_hosts WHERE rollout_id = ?1 AND op_id = ?3)",
            params![
                rollout,
                host.as_str(),
                &r.op_id,
                outcome_name(r.outcome),
                &r.reason,
                &r.restore_detail,
                convoy_common::ops::now_unix_ms()
            ],
        )
        .await?;
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

/// A rollout as the delivery report counts it: (environment, kind, state,
/// finished_at_ms).
pub type ReportRow = (String, String, String, i64);

/// Which rollouts `history` answers, besides the app.
#[derive(Debug, Default)]
pub struct HistoryFilter {
    pub environment: Option<String>,
    pub state: Option<String>,
}

impl Report {
    /// The report of each `bucket_ms` from `since_ms` on, with its start:
    /// a failed deploy's restore is looked for after it in all of `rows`.
    pub fn buckets(rows: &[ReportRow], since_ms: i64, now_ms: i64, bucket_ms: i64) -> Vec<(i64, Report)> {
        let mut out = Vec::new();
        let mut start = since_ms;
        while start < now_ms {
            let end = (start + bucket_ms).min(now_ms);
            let first = rows.partition_point(|r| r.3 < start);
            let last = rows.partition_point(|r| r.3 < end);
            let mut rep = Report::from_rows(&rows[first..last], start, end);
            let restores: Vec<f64> = rows[first..last]
                .iter()
                .filter(|r| r.1 == "deploy" && (r.2 == "failed" || r.2 == "rolled_back"))
                .filter_map(|f| restore_secs(&rows[first..], f))
                .collect();
            rep.restores_measured = restores.len() as u32;
            rep.mean_time_to_restore_secs =
                (!restores.is_empty()).then(|| restores.iter().sum::<f64>() / restores.len() as f64);
            out.push((start, rep));
            start = end;
        }
        out
    }

    /// `rows`: (environment, kind, state, finished_at_ms), oldest first.
    pub fn from_rows(rows: &[ReportRow], since_ms: i64, now_ms: i64) -> Report {
        let deploys: Vec<_> = rows.iter().filter(|r| r.1 == "deploy").collect();
        let succeeded = deploys.iter().filter(|r| r.2 == "succeeded").count() as u32;
        let failed = deploys
            .iter()
            .filter(|r| r.2 == "failed" || r.2 == "rolled_back")
            .count() as u32;
        let days = ((now_ms - since_ms).max(1) as f64) / 86_400_000.0;
        let mut restores = Vec::new();
        for f in deploys.iter().filter(|r| r.2 != "succeeded") {
            restores.extend(restore_secs(rows, f));
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

/// How long after the failed rollout `f` its environment next had a
/// successful one, if it had.
fn restore_secs(rows: &[ReportRow], f: &ReportRow) -> Option<f64> {
    rows.iter()
        .find(|r| r.0 == f.0 && r.2 == "succeeded" && r.3 >= f.3)
        .map(|next| (next.3 - f.3) as f64 / 1000.0)
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

fn freeze_row(r: &Row) -> Result<Freeze, DbError> {
    Ok(Freeze {
        env: r.get(0)?,
        reason: r.get(1)?,
        by: r.get(2)?,
        at_ms: r.get(3)?,
        until_ms: r.get(4)?,
    })
}

async fn freeze_of(conn: &mut Conn, env: &str) -> Result<Option<Freeze>, DbError> {
    conn.query_opt(
        "SELECT environment, reason, frozen_by, at_ms, until_ms FROM freezes WHERE environment = ?1",
        params![env],
    )
    .await?
    .as_ref()
    .map(freeze_row)
    .transpose()
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

fn rollout_row(r: &Row) -> Result<RolloutRow, DbError> {
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

async fn get_release(conn: &mut Conn, app: &AppName, version: &Version) -> Result<Option<Release>, DbError> {
    let Some(r) = conn
        .query_opt(
            "SELECT digest, size, signature FROM releases WHERE app = ?1 AND version = ?2",
            params![app.as_str(), version.as_str()],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(Release {
        digest: Digest::parse(&r.get::<String>(0)?).map_err(|e| DbError::Corrupt(e.to_string()))?,
        size: r.get::<i64>(1)? as u64,
        signature: r.get(2)?,
    }))
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
        rusqlite::Connection::open(&path).unwrap().execute_batch(sql).unwrap();
        (dir, path)
    }

    fn user_version(path: &Path) -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn a_database_of_the_first_release_is_migrated_and_keeps_its_records() {
        let (_dir, path) = made_by(include_str!("../../testdata/schema-first-release.sql"));
        assert_eq!(user_version(&path), 0);
        let db = Db::open(&path).expect("migrates");
        assert_eq!(user_version(&path) as usize, schema::SQLITE_VERSION);
        let app = AppName::new("demo").unwrap();
        // Old rows read back through today's queries, new columns defaulted.
        let rel = db
            .release(&app, &Version::new("1.0.0").unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rel.size, 1234);
        assert_eq!(rel.signature, None);
        let row = db.rollout("0123456789ab").await.unwrap().unwrap();
        assert_eq!((row.state.as_str(), row.kind.as_str()), ("succeeded", "deploy"));
        assert_eq!(db.rollout_hosts("0123456789ab").await.unwrap().len(), 1);
        assert_eq!(db.rollout_events("0123456789ab").await.unwrap().len(), 1);
        assert!(db
            .completed_in(&app, &Version::new("1.0.0").unwrap(), "staging")
            .await
            .unwrap());
        let rows = db.releases(&app).await.unwrap();
        assert_eq!(
            (rows[0].unpacked_bytes, rows[0].entries),
            (None, None),
            "not measured then"
        );
        let v1 = Version::new("1.0.0").unwrap();
        assert_eq!(db.release_contents(&app, &v1).await.unwrap(), None);
        db.set_release_contents(&app, &v1, 4096, 3, &["web.service".into()])
            .await
            .unwrap();
        let rows = db.releases(&app).await.unwrap();
        assert_eq!((rows[0].unpacked_bytes, rows[0].entries), (Some(4096), Some(3)));
        let contents = db.release_contents(&app, &v1).await.unwrap().unwrap();
        assert_eq!(contents.units, ["web.service"]);
        // And new records go in, into columns the first schema lacked..
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
        .await
        .unwrap();
        db.approve("0123456789ac", "operator:carol").await.unwrap();
        assert_eq!(db.running_rollouts().await.unwrap().len(), 1);
        db.add_token("h1", "", &BTreeMap::new(), 1_000, "admin").await.unwrap();
        drop(db);
        // Opening again is a no-op.
        Db::open(&path).expect("opens again");
        assert_eq!(user_version(&path) as usize, schema::SQLITE_VERSION);
    }

    #[tokio::test]
    async fn a_database_made_just_before_versioned_migrations_is_migrated() {
        // Every column already there: the migration must not add them twice.
        let (_dir, path) = made_by(include_str!("../../testdata/schema-before-migrations.sql"));
        let db = Db::open(&path).expect("migrates");
        let app = AppName::new("demo").unwrap();
        assert!(db
            .release(&app, &Version::new("1.0.0").unwrap())
            .await
            .unwrap()
            .is_some());
        assert_eq!(user_version(&path) as usize, schema::SQLITE_VERSION);
    }

    #[test]
    fn the_hot_queries_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("i.db")).unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("i.db")).unwrap();
        drop(db);
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
                schema::SQLITE_VERSION
            )),
            "{e}"
        );
        assert_eq!(user_version(&path), 99);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn tokens_work_once_in_time_for_their_name() {
        for (what, db, _keep) in testing::both("tokens").await {
            let labels: BTreeMap<String, String> = [("env".to_owned(), "staging".to_owned())].into();
            db.add_token("h1", "", &labels, 1_000, "admin").await.unwrap();
            db.add_token("h2", "web2", &labels, 1_000, "admin").await.unwrap();
            let err = |r: Result<BTreeMap<String, String>, TokenError>| r.unwrap_err().to_string();
            assert_eq!(
                err(db.spend_token("nope", "web1", false, 0).await),
                "unknown enrollment token",
                "{what}"
            );
            assert!(err(db.spend_token("h1", "web1", false, 1_000).await).contains("expired"));
            assert!(err(db.spend_token("h1", "web1", true, 0).await).contains("a host named web1 is already enrolled"));
            assert_eq!(db.spend_token("h1", "web1", false, 0).await.unwrap(), labels, "{what}");
            assert_eq!(db.host_labels("web1").await.unwrap(), labels, "{what}");
            assert!(err(db.spend_token("h1", "web3", false, 0).await).contains("already used (by web1"));
            assert!(
                err(db.spend_token("h2", "web3", false, 0).await).contains("this enrollment token is for host web2")
            );
            // A named token re-enrolls a known host.
            assert!(db.spend_token("h2", "web2", true, 0).await.is_ok(), "{what}");
            db.add_token("h3", "", &labels, 1_000, "admin").await.unwrap();
            assert!(err(db.spend_token("h3", "web2", false, 0).await).contains("already enrolled"));
            // A refused spend changed nothing: the token still works.
            assert!(db.spend_token("h3", "web4", false, 0).await.is_ok(), "{what}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_token_spent_at_once_through_two_connections_enrolls_one_host() {
        for (what, db, _keep) in testing::both("token_race").await {
            let db = Arc::new(db);
            db.add_token("h1", "", &BTreeMap::new(), i64::MAX, "admin")
                .await
                .unwrap();
            let (a, b) = tokio::join!(
                db.spend_token("h1", "web1", false, 0),
                db.spend_token("h1", "web2", false, 0)
            );
            assert_eq!(
                [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
                1,
                "{what}: {a:?} {b:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_query_round_trips_on_both_engines() {
        for (what, db, _keep) in testing::both("queries").await {
            let app = AppName::new("demo").unwrap();
            let v1 = Version::new("1.0.0").unwrap();
            let rel = Release {
                digest: Digest::of_bytes(b"a"),
                size: 5_000_000_000,
                signature: Some(vec![7; 64]),
            };
            assert!(db.add_release(&app, &v1, &rel, "operator:alice").await.unwrap());
            db.set_release_contents(&app, &v1, 6_000_000_000, 12, &["a.service".into(), "b.service".into()])
                .await
                .unwrap();
            let rows = db.releases(&app).await.unwrap();
            assert_eq!(rows.len(), 1, "{what}");
            assert!(rows[0].signed && rows[0].size == 5_000_000_000, "{what}");
            assert_eq!(rows[0].unpacked_bytes, Some(6_000_000_000), "{what}");
            assert_eq!(
                db.release_contents(&app, &v1).await.unwrap().unwrap().units,
                ["a.service", "b.service"]
            );
            assert!(db.digest_known(&rel.digest).await.unwrap(), "{what}");
            assert!(!db.digest_known(&Digest::of_bytes(b"b")).await.unwrap(), "{what}");
            for (id, started, env) in [("r1", 0, "staging"), ("r2", 1, "production")] {
                db.start_rollout(&NewRollout {
                    plan: &format!("{{\"n\":{started}}}"),
                    ..testing::deploy(id, &app, env)
                })
                .await
                .unwrap();
            }
            assert_eq!(db.running_rollouts().await.unwrap().len(), 2, "{what}");
            let host = HostName::new("web1".to_owned()).unwrap();
            let ev = StepEvent {
                op_id: "r1-activate-web1".into(),
                app: app.clone(),
                step: convoy_common::ops::Step::Switch,
                kind: convoy_common::ops::EventKind::Started,
                message: "ünïcode ✓".into(),
                at_unix_ms: 42,
            };
            db.record_event("r1", &host, &ev).await.unwrap();
            let report = OpReport {
                op_id: "r1-activate-web1".into(),
                app: app.clone(),
                version: v1.clone(),
                outcome: convoy_common::ops::Outcome::Succeeded,
                reason: String::new(),
                restore_detail: String::new(),
                state: convoy_common::ops::AppStatus {
                    current: Some(v1.clone()),
                    health: convoy_common::ops::Health::Healthy,
                    ..convoy_common::ops::AppStatus::empty(&app)
                },
            };
            db.record_host_result("r1", &host, &report).await.unwrap();
            db.record_host_result("r1", &host, &report).await.unwrap();
            assert_eq!(db.rollout_hosts("r1").await.unwrap().len(), 1, "{what}: recorded once");
            assert_eq!(
                db.host_outcome("r1", "r1-activate-web1").await.unwrap(),
                Some(convoy_common::ops::Outcome::Succeeded)
            );
            assert_eq!(db.rollout_events("r1").await.unwrap()[0].message, "ünïcode ✓", "{what}");
            let m = Measurement {
                metric: "errors".into(),
                hosts: vec![host.clone()],
                query: "q".into(),
                value: None,
                baseline: Some(0.25),
                judgement: Judgement::Pass,
                reason: "r".into(),
                at_ms: 9,
                max: Some(0.5),
                min: None,
            };
            db.record_measurement("r1", &m).await.unwrap();
            let got = db.measurements("r1").await.unwrap();
            assert_eq!((got[0].value, got[0].baseline), (None, Some(0.25)), "{what}");
            assert_eq!((got[0].max, got[0].min), (Some(0.5), None), "{what}");
            db.approve("r1", "operator:carol").await.unwrap();
            db.set_rollout_state("r1", "paused").await.unwrap();
            assert_eq!(db.rollout("r1").await.unwrap().unwrap().state, "paused");
            db.finish_rollout("r1", "succeeded", "").await.unwrap();
            let (row, plan) = db.rollout_with_plan("r1").await.unwrap().unwrap();
            assert_eq!(
                (row.approved_by.as_str(), plan.as_str()),
                ("operator:carol", "{\"n\":0}")
            );
            assert!(row.finished_at_ms.is_some(), "{what}");
            assert_eq!(db.running_rollouts().await.unwrap().len(), 1, "{what}");
            let ids: Vec<String> = db
                .history(&app, &Default::default(), 10)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect();
            assert_eq!(ids.len(), 2, "{what}");
            let only = |environment: Option<&str>, state: Option<&str>| HistoryFilter {
                environment: environment.map(str::to_owned),
                state: state.map(str::to_owned),
            };
            for (filter, want) in [
                (only(Some("staging"), None), vec!["r1"]),
                (only(None, Some("running")), vec!["r2"]),
                (only(Some("staging"), Some("running")), vec![]),
            ] {
                let got: Vec<String> = db
                    .history(&app, &filter, 10)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| r.id)
                    .collect();
                assert_eq!(got, want, "{what}: {filter:?}");
            }
            db.start_rollout(&testing::deploy("r3", &app, "staging")).await.unwrap();
            let last: Vec<(String, String)> = db
                .last_rollouts()
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.env, r.id))
                .collect();
            assert_eq!(
                last,
                [("production".into(), "r2".into()), ("staging".into(), "r3".into())],
                "{what}: the newest of each environment"
            );
            assert!(db.completed_in(&app, &v1, "staging").await.unwrap(), "{what}");
            assert!(!db.completed_in(&app, &v1, "production").await.unwrap(), "{what}");
            assert_eq!(
                db.report(&app, 0, convoy_common::ops::now_unix_ms())
                    .await
                    .unwrap()
                    .deploys,
                1
            );
            for reason in ["incident 1", "incident 2"] {
                db.set_freeze(&Freeze {
                    env: "production".into(),
                    reason: reason.into(),
                    by: "operator:root".into(),
                    at_ms: 1,
                    until_ms: Some(2),
                })
                .await
                .unwrap();
            }
            assert_eq!(db.freezes().await.unwrap()[0].reason, "incident 2", "{what}: replaced");
            assert!(db.clear_freeze("production", "operator:root").await.unwrap().is_some());
            assert!(db.clear_freeze("production", "operator:root").await.unwrap().is_none());
            db.audit("operator:root", "hotfix_pass", "production", "x")
                .await
                .unwrap();
            let audit = db.audit_log(2).await.unwrap();
            assert_eq!(audit.len(), 2, "{what}");
            assert_eq!(audit[0].action, "hotfix_pass", "{what}: newest first");
            db.revoke_host("web1", 5, "admin").await.unwrap();
            db.revoke_host("web1", 6, "admin").await.unwrap();
            assert_eq!(db.revoked_at("web1").await.unwrap(), Some(6), "{what}");
            assert_eq!(db.revoked_at("web2").await.unwrap(), None, "{what}");
        }
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
    fn report_buckets_count_each_day_and_find_restores_after_it() {
        const DAY: i64 = 86_400;
        let rows = [
            row("prod", "deploy", "succeeded", 100),
            row("prod", "deploy", "failed", DAY - 10),
            row("prod", "deploy", "succeeded", DAY + 50), // restores 60 s after, the next day
            row("prod", "deploy", "rolled_back", 2 * DAY + 5),
        ];
        let b = Report::buckets(&rows, 0, 3 * DAY * 1000, DAY * 1000);
        let starts: Vec<i64> = b.iter().map(|(s, _)| *s).collect();
        assert_eq!(starts, [0, DAY * 1000, 2 * DAY * 1000]);
        let figures: Vec<(u32, u32, Option<f64>)> = b
            .iter()
            .map(|(_, r)| (r.deploys, r.failed_deploys, r.mean_time_to_restore_secs))
            .collect();
        assert_eq!(figures, [(2, 1, Some(60.0)), (1, 0, None), (1, 1, None)]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn versions_are_immutable() {
        for (what, db, _keep) in testing::both("versions").await {
            let (app, v) = (AppName::new("demo").unwrap(), Version::new("1").unwrap());
            let rel = Release {
                digest: Digest::of_bytes(b"a"),
                size: 1,
                signature: Some(vec![1; 64]),
            };
            assert!(db.add_release(&app, &v, &rel, "op").await.unwrap(), "{what}");
            assert!(!db.add_release(&app, &v, &rel, "op").await.unwrap(), "{what}");
            let other = Release {
                digest: Digest::of_bytes(b"b"),
                size: 1,
                signature: None,
            };
            let err = db.add_release(&app, &v, &other, "op").await.unwrap_err();
            assert!(matches!(err, DbError::VersionTaken { .. }), "{what}: {err}");
            let stored = db.release(&app, &v).await.unwrap().unwrap();
            assert_eq!((stored.digest, stored.signature), (rel.digest, rel.signature));
        }
    }

    /// Two controllers (two stores on one database): the one that took a
    /// rollout over fences the other's writes out.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_taken_over_rollout_refuses_its_old_owners_writes() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = dir.path().join("leases.db");
        let pg = testing::postgres();
        pg.create_database("leases").unwrap();
        let o = testing::options(&pg.url("leases"));
        let pairs = [
            (
                "sqlite",
                Db::open(&sqlite).unwrap().owned_by("a"),
                Db::open(&sqlite).unwrap().owned_by("b"),
            ),
            (
                "postgres",
                Db::connect(&o, "a").await.unwrap().0,
                Db::connect(&o, "b").await.unwrap().0,
            ),
        ];
        for (what, a, b) in pairs {
            let app = AppName::new("demo").unwrap();
            a.start_rollout(&testing::deploy("r1", &app, "staging")).await.unwrap();
            assert!(b.takeable().await.unwrap().is_empty(), "{what}: a holds it");
            assert!(a.renew_leases().await.unwrap().is_empty(), "{what}: a renews");
            // a stops renewing; its lease runs out.
            a.execute("UPDATE leases SET expires_at_ms = 0", &[]).await.unwrap();
            assert_eq!(b.takeable().await.unwrap(), [("r1".to_owned(), Some(1))], "{what}");
            let (t1, t2) = tokio::join!(b.take_over("r1", Some(1)), b.take_over("r1", Some(1)));
            let won: Vec<i64> = [t1.unwrap(), t2.unwrap()].into_iter().flatten().collect();
            assert_eq!(won, [2], "{what}: taken once, at the next epoch");
            let e = a.set_rollout_state("r1", "paused").await.unwrap_err();
            assert!(
                matches!(
                    e,
                    DbError::Fenced {
                        epoch: 1,
                        now: Some(2),
                        ..
                    }
                ),
                "{what}: {e}"
            );
            assert_eq!(a.renew_leases().await.unwrap(), ["r1"], "{what}: a learns it lost r1");
            // Until a's task for r1 ends, what it still tries is fenced at
            // epoch 1: its writes, its lease check, its commands' epoch.
            assert!(a.held().is_empty(), "{what}: a no longer renews r1");
            assert_eq!(a.epoch_of("r1"), Some(1), "{what}");
            let e = a.set_rollout_state("r1", "paused").await;
            assert!(matches!(e, Err(DbError::Fenced { .. })), "{what}: still refused: {e:?}");
            assert!(
                matches!(a.check_lease("r1").await, Err(DbError::Fenced { .. })),
                "{what}"
            );
            assert!(b.check_lease("r1").await.is_ok(), "{what}: b holds it");
            a.let_go("r1");
            assert_eq!(a.epoch_of("r1"), None, "{what}");
            assert_eq!(b.rollout("r1").await.unwrap().unwrap().state, "running", "{what}");
            b.finish_rollout("r1", "succeeded", "").await.unwrap();
            assert!(b.held().is_empty() && b.leases().await.unwrap().is_empty(), "{what}");
        }
    }

    /// A controller stopped (SIGSTOP, a VM paused) in the middle of a
    /// fenced write holds the lease row's lock: its transaction is ended
    /// by the database after `IDLE_IN_TRANSACTION`, so the takeover goes
    /// through instead of waiting for it for ever, and the stopped
    /// controller's write fails when it runs again.
    #[tokio::test]
    async fn a_controller_stopped_inside_a_transaction_does_not_hold_its_lease_hostage() {
        let pg = testing::postgres();
        pg.create_database("hostage").unwrap();
        let o = testing::options(&pg.url("hostage"));
        let (a, b) = (
            Db::connect(&o, "a").await.unwrap().0,
            Db::connect(&o, "b").await.unwrap().0,
        );
        let app = AppName::new("demo").unwrap();
        a.start_rollout(&testing::deploy("r1", &app, "staging")).await.unwrap();
        // a's write has locked the lease row; then a stops.
        let mut stopped = a.begin().await.unwrap();
        a.fence(&mut stopped, "r1").await.unwrap();
        let expired = "UPDATE leases SET expires_at_ms = 0 WHERE rollout_id = 'r1'";
        let started = std::time::Instant::now();
        // Without the bound, this waits as long as a is stopped.
        tokio::time::timeout(IDLE_IN_TRANSACTION * 3, b.execute(expired, &[]))
            .await
            .expect("the stopped transaction is ended")
            .unwrap();
        assert!(started.elapsed() >= IDLE_IN_TRANSACTION / 2);
        assert_eq!(b.take_over("r1", Some(1)).await.unwrap(), Some(2));
        // a runs again: its transaction is gone, and its write with it.
        let e = stopped
            .execute("UPDATE rollouts SET state = 'paused' WHERE id = 'r1'", &[])
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::Unavailable(_)), "a write to retry: {e}");
        assert_eq!(b.rollout("r1").await.unwrap().unwrap().state, "running");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn controllers_starting_at_once_migrate_a_postgres_database_once() {
        let pg = testing::postgres();
        pg.create_database("migrate_once").unwrap();
        let o = testing::options(&pg.url("migrate_once"));
        let (a, b, c) = tokio::join!(
            Db::connect(&o, "controller-a"),
            Db::connect(&o, "controller-b"),
            Db::connect(&o, "controller-c")
        );
        let applied: Vec<Vec<usize>> = [a, b, c].into_iter().map(|r| r.unwrap().1).collect();
        let all: Vec<usize> = applied.iter().flatten().copied().collect();
        assert_eq!(all, (1..=schema::POSTGRES_VERSION).collect::<Vec<_>>(), "{applied:?}");
        let rows = pg
            .psql(
                "migrate_once",
                "SELECT version, by_controller FROM convoy_schema ORDER BY version",
            )
            .unwrap();
        assert_eq!(rows.lines().count(), schema::POSTGRES_VERSION, "{rows}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_postgres_database_from_a_newer_convoy_is_refused_untouched() {
        let pg = testing::postgres();
        pg.create_database("too_new").unwrap();
        let o = testing::options(&pg.url("too_new"));
        Db::connect(&o, "a").await.unwrap();
        pg.psql("too_new", "INSERT INTO convoy_schema VALUES (99, 'future', 'b', 0)")
            .unwrap();
        let e = Db::connect(&o, "a").await.err().expect("refused").to_string();
        assert!(e.contains("schema version 99 is newer than this convoy knows"), "{e}");
        assert_eq!(
            pg.psql("too_new", "SELECT MAX(version) FROM convoy_schema")
                .unwrap()
                .trim(),
            "99"
        );
    }

    /// A CA and a certificate it signed for 127.0.0.1: (CA PEM, cert PEM, key PEM).
    fn server_identity() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "db CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "db");
        let cert = p.signed_by(&key, &issuer).unwrap();
        (ca_cert.pem(), cert.pem(), key.serialize_pem())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_over_tls_verifies_the_servers_certificate() {
        let (ca, cert, key) = server_identity();
        let pg = convoy_nspawn::postgres::Postgres::start_tls(&cert, &key).unwrap();
        pg.create_database("tls").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
        std::fs::write(dir.path().join("other.pem"), server_identity().0).unwrap();
        let url = format!("postgres://convoy@127.0.0.1:{}/tls?sslmode=require", pg.port());
        let with = |ca: Option<&str>| PostgresOptions {
            ca: ca.map(|c| dir.path().join(c)),
            ..testing::options(&url)
        };
        let (db, _) = Db::connect(&with(Some("ca.pem")), "a")
            .await
            .expect("verified by its CA");
        let row = db
            .query_opt("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .unwrap()
            .unwrap();
        assert!(row.get::<bool>(0).unwrap(), "the session is encrypted");
        for ca in [Some("other.pem"), None] {
            let e = Db::connect(&with(ca), "a").await.err().expect("refused").to_string();
            assert!(e.contains("certificate"), "{ca:?}: {e}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unreachable_postgres_is_named() {
        let o = testing::options("postgres://convoy@127.0.0.1:1/x?sslmode=disable&connect_timeout=2");
        let e = Db::connect(&o, "a").await.err().expect("refused").to_string();
        assert!(e.starts_with("database unreachable:"), "{e}");
        assert!(e.contains("onnection refused"), "the cause is named: {e}");
    }
}
