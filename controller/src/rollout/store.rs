//! What the engine keeps of rollouts, behind one interface (`crate::db`
//! runs it on SQLite or PostgreSQL). Every
//! rollout, host result, event, approval and end is recorded here as it
//! happens; a restarted controller resumes from it.

use convoy_common::ops::{OpReport, Outcome, StepEvent};
use convoy_common::{AppName, HostName, Version};

pub use crate::db::{Freeze, HostRow, NewRollout, Release, ReleaseContents, RolloutRow};

use convoy_common::analysis::Measurement;

/// A store that failed; the engine logs it or refuses the request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(#[from] Box<dyn std::error::Error + Send + Sync>);

impl From<crate::db::DbError> for StoreError {
    fn from(e: crate::db::DbError) -> Self {
        StoreError(Box::new(e))
    }
}

impl StoreError {
    /// Whether the database could not be reached (worth waiting for).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.0.downcast_ref::<crate::db::DbError>(),
            Some(crate::db::DbError::Unavailable(_))
        )
    }

    /// Whether another controller took the rollout over: this controller
    /// must not act on it any more.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self.0.downcast_ref::<crate::db::DbError>(),
            Some(crate::db::DbError::Fenced { .. })
        )
    }

    /// Whether the store refused because another controller runs a
    /// rollout there.
    pub fn is_busy(&self) -> bool {
        matches!(
            self.0.downcast_ref::<crate::db::DbError>(),
            Some(crate::db::DbError::Busy(_))
        )
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[async_trait::async_trait]
pub trait RolloutStore: Send + Sync {
    async fn release(&self, app: &AppName, version: &Version) -> Result<Option<Release>>;
    /// What a release unpacks to and the units it ships, when recorded.
    async fn release_contents(&self, app: &AppName, version: &Version) -> Result<Option<ReleaseContents>>;
    /// Whether `version` of `app` completed a deploy in `env`.
    async fn completed_in(&self, app: &AppName, version: &Version, env: &str) -> Result<bool>;
    async fn start_rollout(&self, r: &NewRollout<'_>) -> Result<()>;
    async fn set_rollout_state(&self, id: &str, state: &str) -> Result<()>;
    async fn approve(&self, id: &str, by: &str) -> Result<()>;
    async fn finish_rollout(&self, id: &str, state: &str, reason: &str) -> Result<()>;
    async fn record_event(&self, rollout: &str, host: &HostName, e: &StepEvent) -> Result<()>;
    /// Records a host's result once: a repeat of the same operation is ignored.
    async fn record_host_result(&self, rollout: &str, host: &HostName, r: &OpReport) -> Result<()>;
    async fn host_outcome(&self, rollout: &str, op_id: &str) -> Result<Option<Outcome>>;
    async fn rollout(&self, id: &str) -> Result<Option<RolloutRow>>;
    /// A rollout with its saved plan (JSON).
    async fn rollout_with_plan(&self, id: &str) -> Result<Option<(RolloutRow, String)>>;
    async fn rollout_hosts(&self, id: &str) -> Result<Vec<HostRow>>;
    async fn record_measurement(&self, rollout: &str, m: &Measurement) -> Result<()>;
    /// A rollout's measurements, oldest first.
    async fn measurements(&self, rollout: &str) -> Result<Vec<Measurement>>;
    /// Freezes an environment and audits it.
    async fn set_freeze(&self, f: &Freeze) -> Result<()>;
    /// Lifts a freeze and audits it; `None` when there was none.
    async fn clear_freeze(&self, env: &str, who: &str) -> Result<Option<Freeze>>;
    async fn freezes(&self) -> Result<Vec<Freeze>>;
    async fn audit(&self, who: &str, action: &str, env: &str, detail: &str) -> Result<()>;
    /// Renews the leases of the rollouts this controller drives; returns
    /// those another controller took over (no longer held).
    async fn renew_leases(&self) -> Result<Vec<String>>;
    /// Unfinished rollouts no controller is driving (`db::Takeable`).
    async fn takeable(&self) -> Result<Vec<crate::db::Takeable>>;
    /// Takes a rollout's lease over; the new epoch when won.
    async fn take_over(&self, id: &str, seen: Option<i64>) -> Result<Option<i64>>;
    /// Whether this controller still holds the lease of a rollout it
    /// drives (`Fenced` once another took it over).
    async fn check_lease(&self, id: &str) -> Result<()>;
    /// Stops fencing a rollout whose task ended.
    fn let_go(&self, id: &str);
}

#[async_trait::async_trait]
impl RolloutStore for crate::db::Db {
    async fn release(&self, app: &AppName, version: &Version) -> Result<Option<Release>> {
        Ok(crate::db::Db::release(self, app, version).await?)
    }
    async fn release_contents(&self, app: &AppName, version: &Version) -> Result<Option<ReleaseContents>> {
        Ok(crate::db::Db::release_contents(self, app, version).await?)
    }
    async fn completed_in(&self, app: &AppName, version: &Version, env: &str) -> Result<bool> {
        Ok(crate::db::Db::completed_in(self, app, version, env).await?)
    }
    async fn start_rollout(&self, r: &NewRollout<'_>) -> Result<()> {
        Ok(crate::db::Db::start_rollout(self, r).await?)
    }
    async fn set_rollout_state(&self, id: &str, state: &str) -> Result<()> {
        Ok(crate::db::Db::set_rollout_state(self, id, state).await?)
    }
    async fn approve(&self, id: &str, by: &str) -> Result<()> {
        Ok(crate::db::Db::approve(self, id, by).await?)
    }
    async fn finish_rollout(&self, id: &str, state: &str, reason: &str) -> Result<()> {
        Ok(crate::db::Db::finish_rollout(self, id, state, reason).await?)
    }
    async fn record_event(&self, rollout: &str, host: &HostName, e: &StepEvent) -> Result<()> {
        Ok(crate::db::Db::record_event(self, rollout, host, e).await?)
    }
    async fn record_host_result(&self, rollout: &str, host: &HostName, r: &OpReport) -> Result<()> {
        Ok(crate::db::Db::record_host_result(self, rollout, host, r).await?)
    }
    async fn host_outcome(&self, rollout: &str, op_id: &str) -> Result<Option<Outcome>> {
        Ok(crate::db::Db::host_outcome(self, rollout, op_id).await?)
    }
    async fn rollout(&self, id: &str) -> Result<Option<RolloutRow>> {
        Ok(crate::db::Db::rollout(self, id).await?)
    }
    async fn rollout_with_plan(&self, id: &str) -> Result<Option<(RolloutRow, String)>> {
        Ok(crate::db::Db::rollout_with_plan(self, id).await?)
    }
    async fn rollout_hosts(&self, id: &str) -> Result<Vec<HostRow>> {
        Ok(crate::db::Db::rollout_hosts(self, id).await?)
    }
    async fn record_measurement(&self, rollout: &str, m: &Measurement) -> Result<()> {
        Ok(crate::db::Db::record_measurement(self, rollout, m).await?)
    }
    async fn measurements(&self, rollout: &str) -> Result<Vec<Measurement>> {
        Ok(crate::db::Db::measurements(self, rollout).await?)
    }
    async fn set_freeze(&self, f: &Freeze) -> Result<()> {
        Ok(crate::db::Db::set_freeze(self, f).await?)
    }
    async fn clear_freeze(&self, env: &str, who: &str) -> Result<Option<Freeze>> {
        Ok(crate::db::Db::clear_freeze(self, env, who).await?)
    }
    async fn freezes(&self) -> Result<Vec<Freeze>> {
        Ok(crate::db::Db::freezes(self).await?)
    }
    async fn audit(&self, who: &str, action: &str, env: &str, detail: &str) -> Result<()> {
        Ok(crate::db::Db::audit(self, who, action, env, detail).await?)
    }
    async fn renew_leases(&self) -> Result<Vec<String>> {
        Ok(crate::db::Db::renew_leases(self).await?)
    }
    async fn takeable(&self) -> Result<Vec<crate::db::Takeable>> {
        Ok(crate::db::Db::takeable(self).await?)
    }
    async fn take_over(&self, id: &str, seen: Option<i64>) -> Result<Option<i64>> {
        Ok(crate::db::Db::take_over(self, id, seen).await?)
    }
    async fn check_lease(&self, id: &str) -> Result<()> {
        Ok(crate::db::Db::check_lease(self, id).await?)
    }
    fn let_go(&self, id: &str) {
        crate::db::Db::let_go(self, id)
    }
}
