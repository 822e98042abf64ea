//! What several controllers on one database share: who owns each running
//! rollout (a lease with an epoch), which controllers are up, which
//! controller holds each host's session, and the relay that carries
//! commands and results between them.
//!
//! Lease times are the database's clock, so controllers' clocks need not
//! agree.

use super::{Conn, Db, DbError, Row};
use crate::params;

/// The database's clock in unix milliseconds, in each engine's spelling.
fn now_sql(conn: &Conn) -> &'static str {
    if conn.is_postgres() {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    } else {
        "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
    }
}

/// A rollout's lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub rollout: String,
    pub owner: String,
    pub epoch: i64,
    /// Milliseconds until it expires (negative: expired), by the
    /// database's clock.
    pub expires_in_ms: i64,
}

/// A controller as it last said it was.
#[derive(Debug, Clone)]
pub struct ControllerRow {
    pub name: String,
    pub address: String,
    pub started_at_ms: i64,
    /// Milliseconds since it last said so, by the database's clock.
    pub seen_ago_ms: i64,
    pub sessions: i64,
}

/// The lease this controller took for a rollout it drives. Once it
/// learns another controller took the rollout over it stops renewing
/// (`held` false) but keeps the epoch until the rollout's task has
/// ended, so whatever that task still tries is fenced at the old epoch:
/// refused by the database and by any agent that saw the new one.
#[derive(Debug, Clone, Copy)]
pub struct Fence {
    epoch: i64,
    held: bool,
}

/// A rollout that may be taken over: its lease epoch (`None`: it has no
/// lease, e.g. it was started by a convoy before leases).
pub type Takeable = (String, Option<i64>);

/// Test builds only: `FAILPOINTS=stop-in-write=1*return` stops this
/// controller (SIGSTOP, as a frozen VM) in its first fenced write, with
/// the lease row locked, to prove that no takeover waits for it.
pub(super) fn stop_in_write() {
    fail::fail_point!("stop-in-write", |_| {
        tracing::warn!("failpoint: stopping the controller inside a write");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    });
}

impl Db {
    /// Checks, inside `conn`'s transaction, that this controller still
    /// holds `rollout`'s lease at the epoch it took it with; on
    /// PostgreSQL the lease row stays locked until the transaction ends,
    /// so no takeover can slip between the check and the write.
    pub(super) async fn fence(&self, conn: &mut Conn, rollout: &str) -> Result<(), DbError> {
        let Some(Fence { epoch, .. }) = self.fences.lock().unwrap().get(rollout).copied() else {
            return Ok(());
        };
        let lock = if conn.is_postgres() { " FOR SHARE" } else { "" };
        let now: Option<i64> = conn
            .query_opt(
                &format!("SELECT epoch FROM leases WHERE rollout_id = ?1{lock}"),
                params![rollout],
            )
            .await?
            .map(|r| r.get(0))
            .transpose()?;
        if now == Some(epoch) {
            return Ok(());
        }
        Err(DbError::Fenced {
            rollout: rollout.to_owned(),
            epoch,
            now,
        })
    }

    /// Remembers that this controller drives `rollout` under `epoch`:
    /// its writes for the rollout are fenced from now on.
    pub fn hold(&self, rollout: &str, epoch: i64) {
        self.fences
            .lock()
            .unwrap()
            .insert(rollout.to_owned(), Fence { epoch, held: true });
    }

    /// The epoch this controller took `rollout`'s lease at, while its
    /// task for the rollout lives (also after the lease was lost).
    pub fn epoch_of(&self, rollout: &str) -> Option<i64> {
        self.fences.lock().unwrap().get(rollout).map(|f| f.epoch)
    }

    /// Checks that this controller still holds `rollout`'s lease (`Ok`
    /// for a rollout it does not drive): `Fenced` once another
    /// controller took it over. Asked before each command is sent.
    pub async fn check_lease(&self, rollout: &str) -> Result<(), DbError> {
        if !self.fences.lock().unwrap().contains_key(rollout) {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        self.fence(&mut conn, rollout).await
    }

    /// Forgets a rollout whose task ended (finished, or stopped after
    /// its lease was lost).
    pub fn let_go(&self, rollout: &str) {
        self.fences.lock().unwrap().remove(rollout);
    }

    /// The rollouts this controller holds, with their epochs.
    pub fn held(&self) -> Vec<(String, i64)> {
        self.fences
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| f.held)
            .map(|(k, f)| (k.clone(), f.epoch))
            .collect()
    }

    /// Renews the leases this controller holds; returns those it no
    /// longer holds (taken over). It stops renewing those, and fences
    /// them at their old epoch until their task ends (`let_go`).
    pub async fn renew_leases(&self) -> Result<Vec<String>, DbError> {
        let (owner, ttl_ms) = (self.owner.as_str(), super::LEASE_TTL_MS);
        let mut lost = Vec::new();
        let mut conn = self.conn().await?;
        let now = now_sql(&conn);
        for (rollout, epoch) in self.held() {
            let n = conn
                .execute(
                    &format!(
                        "UPDATE leases SET expires_at_ms = {now} + ?4 WHERE rollout_id = ?1 AND owner = ?2 AND epoch = ?3"
                    ),
                    params![&rollout, owner, epoch, ttl_ms],
                )
                .await?;
            if n == 0 {
                if let Some(f) = self.fences.lock().unwrap().get_mut(&rollout) {
                    f.held = false;
                }
                lost.push(rollout);
            }
        }
        Ok(lost)
    }

    /// Unfinished rollouts another controller may no longer be driving:
    /// their lease expired, or it is `owner`'s own from before a restart,
    /// or they have none. Rollouts this controller drives are left out.
    pub async fn takeable(&self) -> Result<Vec<Takeable>, DbError> {
        let owner = self.owner.as_str();
        let mut conn = self.conn().await?;
        let now = now_sql(&conn);
        let rows = conn
            .query(
                &format!(
                    "SELECT r.id, l.owner, l.epoch, l.expires_at_ms - {now} FROM rollouts r
                     LEFT JOIN leases l ON l.rollout_id = r.id
                     WHERE r.state IN ({}) ORDER BY r.started_at_ms",
                    super::live_states_sql()
                ),
                &[],
            )
            .await?;
        let held = self.fences.lock().unwrap().clone();
        let mut out = Vec::new();
        for r in rows {
            let id: String = r.get(0)?;
            if held.contains_key(&id) {
                continue;
            }
            let lease: Option<(String, i64, i64)> = match r.get::<Option<String>>(1)? {
                Some(o) => Some((o, r.get(2)?, r.get(3)?)),
                None => None,
            };
            match lease {
                None => out.push((id, None)),
                Some((o, epoch, left)) if o == owner || left < 0 => out.push((id, Some(epoch))),
                Some(_) => {}
            }
        }
        Ok(out)
    }

    /// Takes `rollout`'s lease for `owner` if it is still as `takeable`
    /// saw it; returns the new epoch when won (another controller may have
    /// won instead).
    pub async fn take_over(&self, rollout: &str, seen: Option<i64>) -> Result<Option<i64>, DbError> {
        let (owner, ttl_ms) = (self.owner.as_str(), super::LEASE_TTL_MS);
        let mut conn = self.conn().await?;
        let now = now_sql(&conn);
        let won = match seen {
            None => {
                conn.execute(
                    &format!(
                        "INSERT INTO leases (rollout_id, owner, epoch, expires_at_ms) VALUES (?1, ?2, 1, {now} + ?3)
                         ON CONFLICT (rollout_id) DO NOTHING"
                    ),
                    params![rollout, owner, ttl_ms],
                )
                .await?
                    == 1
            }
            Some(epoch) => {
                conn.execute(
                    &format!(
                        "UPDATE leases SET owner = ?2, epoch = epoch + 1, expires_at_ms = {now} + ?4
                         WHERE rollout_id = ?1 AND epoch = ?3 AND (expires_at_ms < {now} OR owner = ?2)"
                    ),
                    params![rollout, owner, epoch, ttl_ms],
                )
                .await?
                    == 1
            }
        };
        let epoch = seen.map_or(1, |e| e + 1);
        if won {
            self.hold(rollout, epoch);
        }
        Ok(won.then_some(epoch))
    }

    /// Every lease, for `convoy controllers`.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, DbError> {
        let mut conn = self.conn().await?;
        let now = now_sql(&conn);
        conn.query(
            &format!(
                "SELECT l.rollout_id, l.owner, l.epoch, l.expires_at_ms - {now} FROM leases l
                 JOIN rollouts r ON r.id = l.rollout_id WHERE r.finished_at_ms IS NULL ORDER BY l.rollout_id"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(LeaseRow {
                rollout: r.get(0)?,
                owner: r.get(1)?,
                epoch: r.get(2)?,
                expires_in_ms: r.get(3)?,
            })
        })
        .collect()
    }

    /// Says that controller `name` (at `address`) is up, with `sessions`
    /// agent sessions.
    pub async fn controller_alive(
        &self,
        name: &str,
        address: &str,
        started_at_ms: i64,
        sessions: i64,
    ) -> Result<(), DbError> {
        let mut conn = self.conn().await?;
        let now = now_sql(&conn);
        conn.execute(
            &format!(
                "INSERT INTO controllers (name, address, started_at_ms, seen_at_ms, sessions) VALUES (?1, ?2, ?3, {now}, ?4)
                 ON CONFLICT (name) DO UPDATE SET address = ?2, started_at_ms = ?3, seen_at_ms = {now}, sessions = ?4"
            ),
            params![name, address, started_at_ms, sessions],
        )
        .await?;
        Ok(())
    }

    /// Every controller that ever said it was up, most recently seen first.
    pub async fn controllers(&self) -> Result<Vec<ControllerRow>, DbError> {
        let mut conn = self.conn().await?;
        let now = now_sql(&conn);
        conn.query(
            &format!(
                "SELECT name, address, started_at_ms, {now} - seen_at_ms, sessions FROM controllers ORDER BY name"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r: &Row| {
            Ok(ControllerRow {
                name: r.get(0)?,
                address: r.get(1)?,
                started_at_ms: r.get(2)?,
                seen_ago_ms: r.get(3)?,
                sessions: r.get(4)?,
            })
        })
        .collect()
    }

    /// Shares an artifact with the other controllers (PostgreSQL): its
    /// bytes go into `artifact_chunks` in one transaction, unless they are
    /// there already. Nothing to do on SQLite (one controller).
    pub async fn share_artifact(&self, digest: &convoy_common::Digest, path: &std::path::Path) -> Result<(), DbError> {
        use tokio::io::AsyncReadExt;
        if !matches!(self.engine, super::sql::Engine::Postgres(_)) {
            return Ok(());
        }
        let hex = digest.to_hex();
        let mut tx = self.begin().await?;
        if tx
            .query_opt(
                "SELECT 1 FROM artifact_chunks WHERE digest = ?1 AND n = 0",
                params![&hex],
            )
            .await?
            .is_some()
        {
            return Ok(());
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| DbError::Corrupt(format!("{}: {e}", path.display())))?;
        let mut n: i64 = 0;
        loop {
            let mut chunk = Vec::with_capacity(ARTIFACT_CHUNK);
            let read = (&mut file)
                .take(ARTIFACT_CHUNK as u64)
                .read_to_end(&mut chunk)
                .await
                .map_err(|e| DbError::Corrupt(format!("{}: {e}", path.display())))?;
            if read == 0 && n > 0 {
                break;
            }
            tx.execute(
                "INSERT INTO artifact_chunks (digest, n, data) VALUES (?1, ?2, ?3)",
                params![&hex, n, chunk],
            )
            .await?;
            n += 1;
            if read < ARTIFACT_CHUNK {
                break;
            }
        }
        tx.commit().await
    }

    /// Chunk `n` of a shared artifact, if there is one.
    pub async fn artifact_chunk(&self, digest: &convoy_common::Digest, n: i64) -> Result<Option<Vec<u8>>, DbError> {
        self.query_opt(
            "SELECT data FROM artifact_chunks WHERE digest = ?1 AND n = ?2",
            params![digest.to_hex(), n],
        )
        .await?
        .map(|r| r.get(0))
        .transpose()
    }
}

/// Bytes per row of a shared artifact.
const ARTIFACT_CHUNK: usize = 4 << 20;
