//! Operations an agent performs for the controller, the events it streams
//! while doing them, and the reports it ends them with.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::{AppName, Version};
use crate::spec::InstallSpec;

/// Activate `version` of an app: stage, back up, switch, restart, check,
/// then commit or restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateCommand {
    pub op_id: String,
    pub spec: InstallSpec,
    pub version: Version,
    pub digest: Digest,
    pub size: u64,
    /// ed25519 over app, version and digest, when the release was signed.
    pub signature: Option<Vec<u8>>,
}

/// Switch an app back to a release the host already holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackCommand {
    pub op_id: String,
    pub app: AppName,
    /// `None`: the host's previous release.
    pub to: Option<Version>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Unknown,
    Healthy,
    Unhealthy,
}

/// One app's state on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    pub app: AppName,
    pub current: Option<Version>,
    pub previous: Option<Version>,
    pub last_known_good: Option<Version>,
    pub releases: Vec<Version>,
    pub health: Health,
    pub health_reason: String,
    pub inflight_op: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Succeeded,
    Failed,
    Info,
}

/// The steps of an activation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Stage,
    Hook,
    Backup,
    Switch,
    Restart,
    Check,
    Commit,
    Restore,
    Recover,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Stage => "stage",
            Step::Hook => "hook",
            Step::Backup => "backup",
            Step::Switch => "switch",
            Step::Restart => "restart",
            Step::Check => "check",
            Step::Commit => "commit",
            Step::Restore => "restore",
            Step::Recover => "recover",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Step {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "stage" => Step::Stage,
            "hook" => Step::Hook,
            "backup" => Step::Backup,
            "switch" => Step::Switch,
            "restart" => Step::Restart,
            "check" => Step::Check,
            "commit" => Step::Commit,
            "restore" => Step::Restore,
            "recover" => Step::Recover,
            other => return Err(format!("unknown step {other:?}")),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEvent {
    pub op_id: String,
    pub app: AppName,
    pub step: Step,
    pub kind: EventKind,
    pub message: String,
    pub at_unix_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    /// Failed; the previous release runs (never switched away, or restored
    /// and healthy again).
    FailedRestored,
    /// Failed, and the restore failed too: the host needs attention.
    FailedRestoreFailed,
    /// Refused before anything was touched (busy, bad input, digest).
    Refused,
}

impl Outcome {
    pub fn is_success(self) -> bool {
        self == Outcome::Succeeded
    }

    /// The outcome's machine name, as JSON, the database and metrics spell it.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::FailedRestored => "failed_restored",
            Outcome::FailedRestoreFailed => "failed_restore_failed",
            Outcome::Refused => "refused",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Succeeded => "succeeded",
            Outcome::FailedRestored => "failed; the previous release runs",
            Outcome::FailedRestoreFailed => "failed, and restoring the previous release failed",
            Outcome::Refused => "refused",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpReport {
    pub op_id: String,
    pub app: AppName,
    pub version: Version,
    pub outcome: Outcome,
    pub reason: String,
    pub restore_detail: String,
    pub state: AppStatus,
}

/// The id of the operation a rollout sends `host`: `ROLLOUT-HOST` for an
/// activation or rollback, `ROLLOUT-stage-HOST` for pre-staging.
pub fn op_id(rollout: &str, host: &str, stage: bool) -> String {
    if stage {
        format!("{rollout}-stage-{host}")
    } else {
        format!("{rollout}-{host}")
    }
}

/// The rollout an operation id belongs to (rollout ids hold no `-`).
pub fn rollout_of(op_id: &str) -> &str {
    op_id.split('-').next().unwrap_or(op_id)
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_name_their_rollout() {
        let activate = op_id("5e7ca08efb36", "web-1", false);
        let stage = op_id("5e7ca08efb36", "web-1", true);
        assert_eq!(activate, "5e7ca08efb36-web-1");
        assert_eq!(stage, "5e7ca08efb36-stage-web-1");
        assert_eq!(rollout_of(&activate), "5e7ca08efb36");
        assert_eq!(rollout_of(&stage), "5e7ca08efb36");
        assert_eq!(rollout_of("by-hand"), "by");
    }
}
