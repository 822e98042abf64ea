//! What the engine keeps of rollouts, behind one interface so that a
//! second database engine can stand beside SQLite (`crate::db`). Every
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

pub type Result<T> = std::result::Result<T, StoreError>;

pub trait RolloutStore: Send + Sync {
    fn release(&self, app: &AppName, version: &Version) -> Result<Option<Release>>;
    /// What a release unpacks to and the units it ships, when recorded.
    fn release_contents(&self, app: &AppName, version: &Version) -> Result<Option<ReleaseContents>>;
    /// Whether `version` of `app` completed a deploy in `env`.
    fn completed_in(&self, app: &AppName, version: &Version, env: &str) -> Result<bool>;
    fn start_rollout(&self, r: &NewRollout<'_>) -> Result<()>;
    fn set_rollout_state(&self, id: &str, state: &str) -> Result<()>;
    fn approve(&self, id: &str, by: &str) -> Result<()>;
    fn finish_rollout(&self, id: &str, state: &str, reason: &str) -> Result<()>;
    fn record_event(&self, rollout: &str, host: &HostName, e: &StepEvent) -> Result<()>;
    /// Records a host's result once: a repeat of the same operation is ignored.
    fn record_host_result(&self, rollout: &str, host: &HostName, r: &OpReport) -> Result<()>;
    fn host_outcome(&self, rollout: &str, op_id: &str) -> Result<Option<Outcome>>;
    fn rollout(&self, id: &str) -> Result<Option<RolloutRow>>;
    /// A rollout with its saved plan (JSON).
    fn rollout_with_plan(&self, id: &str) -> Result<Option<(RolloutRow, String)>>;
    /// Rollouts not yet finished, with their plans, oldest first.
    fn running_rollouts(&self) -> Result<Vec<(RolloutRow, String)>>;
    fn rollout_hosts(&self, id: &str) -> Result<Vec<HostRow>>;
    fn record_measurement(&self, rollout: &str, m: &Measurement) -> Result<()>;
    /// A rollout's measurements, oldest first.
    fn measurements(&self, rollout: &str) -> Result<Vec<Measurement>>;
    /// Freezes an environment and audits it.
    fn set_freeze(&self, f: &Freeze) -> Result<()>;
    /// Lifts a freeze and audits it; `None` when there was none.
    fn clear_freeze(&self, env: &str, who: &str) -> Result<Option<Freeze>>;
    fn freezes(&self) -> Result<Vec<Freeze>>;
    fn audit(&self, who: &str, action: &str, env: &str, detail: &str) -> Result<()>;
}

impl RolloutStore for crate::db::Db {
    fn release(&self, app: &AppName, version: &Version) -> Result<Option<Release>> {
        Ok(crate::db::Db::release(self, app, version)?)
    }
    fn release_contents(&self, app: &AppName, version: &Version) -> Result<Option<ReleaseContents>> {
        Ok(crate::db::Db::release_contents(self, app, version)?)
    }
    fn completed_in(&self, app: &AppName, version: &Version, env: &str) -> Result<bool> {
        Ok(crate::db::Db::completed_in(self, app, version, env)?)
    }
    fn start_rollout(&self, r: &NewRollout<'_>) -> Result<()> {
        Ok(crate::db::Db::start_rollout(self, r)?)
    }
    fn set_rollout_state(&self, id: &str, state: &str) -> Result<()> {
        Ok(crate::db::Db::set_rollout_state(self, id, state)?)
    }
    fn approve(&self, id: &str, by: &str) -> Result<()> {
        Ok(crate::db::Db::approve(self, id, by)?)
    }
    fn finish_rollout(&self, id: &str, state: &str, reason: &str) -> Result<()> {
        Ok(crate::db::Db::finish_rollout(self, id, state, reason)?)
    }
    fn record_event(&self, rollout: &str, host: &HostName, e: &StepEvent) -> Result<()> {
        Ok(crate::db::Db::record_event(self, rollout, host, e)?)
    }
    fn record_host_result(&self, rollout: &str, host: &HostName, r: &OpReport) -> Result<()> {
        Ok(crate::db::Db::record_host_result(self, rollout, host, r)?)
    }
    fn host_outcome(&self, rollout: &str, op_id: &str) -> Result<Option<Outcome>> {
        Ok(crate::db::Db::host_outcome(self, rollout, op_id)?)
    }
    fn rollout(&self, id: &str) -> Result<Option<RolloutRow>> {
        Ok(crate::db::Db::rollout(self, id)?)
    }
    fn rollout_with_plan(&self, id: &str) -> Result<Option<(RolloutRow, String)>> {
        Ok(crate::db::Db::rollout_with_plan(self, id)?)
    }
    fn running_rollouts(&self) -> Result<Vec<(RolloutRow, String)>> {
        Ok(crate::db::Db::running_rollouts(self)?)
    }
    fn rollout_hosts(&self, id: &str) -> Result<Vec<HostRow>> {
        Ok(crate::db::Db::rollout_hosts(self, id)?)
    }
    fn record_measurement(&self, rollout: &str, m: &Measurement) -> Result<()> {
        Ok(crate::db::Db::record_measurement(self, rollout, m)?)
    }
    fn measurements(&self, rollout: &str) -> Result<Vec<Measurement>> {
        Ok(crate::db::Db::measurements(self, rollout)?)
    }
    fn set_freeze(&self, f: &Freeze) -> Result<()> {
        Ok(crate::db::Db::set_freeze(self, f)?)
    }
    fn clear_freeze(&self, env: &str, who: &str) -> Result<Option<Freeze>> {
        Ok(crate::db::Db::clear_freeze(self, env, who)?)
    }
    fn freezes(&self) -> Result<Vec<Freeze>> {
        Ok(crate::db::Db::freezes(self)?)
    }
    fn audit(&self, who: &str, action: &str, env: &str, detail: &str) -> Result<()> {
        Ok(crate::db::Db::audit(self, who, action, env, detail)?)
    }
}
