//! Operations an agent performs for the controller, the events it streams
//! while doing them, and the reports it ends them with.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::{AppName, HostName, Version};
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
    /// ed25519 over app, version, digest and manifest, when the release
    /// was signed.
    pub signature: Option<Vec<u8>>,
    /// The sha256 of the release's manifest, when the controller has one:
    /// a host that holds some of its contents stages from it (delta).
    #[serde(default)]
    pub manifest: Option<Digest>,
    /// The environment's configuration rendered for this release: written
    /// into the staged tree before the switch. Never stored (it may hold
    /// secrets): the controller renders it when it sends the command.
    #[serde(skip)]
    pub config: Option<RenderedConfig>,
}

/// A configuration revision rendered into files of a release tree.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RenderedConfig {
    pub revision: u64,
    pub files: Vec<ConfigFile>,
}

/// One rendered file: where in the release tree, its mode, its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: String,
    pub mode: u32,
    pub content: Vec<u8>,
}

impl std::fmt::Debug for RenderedConfig {
    /// Paths and sizes only: the contents may be secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|c| format!("{} ({} bytes, mode {:o})", c.path, c.content.len(), c.mode))
            .collect();
        write!(f, "RenderedConfig {{ revision: {}, files: {files:?} }}", self.revision)
    }
}

impl std::fmt::Debug for ConfigFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfigFile({}, {} bytes)", self.path, self.content.len())
    }
}

/// Switch an app back to a release the host already holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackCommand {
    pub op_id: String,
    pub app: AppName,
    /// `None`: the host's previous release.
    pub to: Option<Version>,
}

/// The revision of the agent protocol this build speaks. Agents send it
/// in their hello; 0 is an agent from before pre-flight checks.
pub const PROTOCOL: u32 = 1;

/// What a host must have before a release may move to it: checked on
/// the host, nothing changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightCommand {
    pub op_id: String,
    pub app: AppName,
    /// Free space needed on the state directory's file system.
    pub needed_bytes: u64,
    /// 0: not checked.
    pub min_memory_bytes: u64,
    /// Each must exist on the host unless listed in `units_in_release`.
    pub units: Vec<String>,
    pub units_in_release: Vec<String>,
    /// Dependency checks, run once each.
    pub checks: Vec<crate::spec::HealthCheck>,
    /// Command checks run here when it exists.
    pub install_path: std::path::PathBuf,
}

/// One pre-flight check on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightCheck {
    pub name: String,
    pub passed: bool,
    pub detail: String,
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
    /// The configuration revision the current release was activated with.
    #[serde(default)]
    pub config_revision: Option<u64>,
    /// Blue-green apps: both slots (empty otherwise).
    #[serde(default)]
    pub slots: Vec<crate::slots::SlotStatus>,
}

impl AppStatus {
    /// An app of which nothing is installed or known yet.
    pub fn empty(app: &AppName) -> Self {
        AppStatus {
            app: app.clone(),
            current: None,
            previous: None,
            last_known_good: None,
            releases: vec![],
            health: Health::Unknown,
            health_reason: String::new(),
            inflight_op: None,
            config_revision: None,
            slots: vec![],
        }
    }

    /// Whether this tells nothing about the app: a result that carries no
    /// state (an older agent's answer to a repeated command) is not news
    /// that the host holds nothing.
    pub fn says_nothing(&self) -> bool {
        *self == AppStatus::empty(&self.app)
    }
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
    /// Taking the host out of the load balancer and putting it back
    /// (the controller's step, around the agent's).
    Traffic,
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
            Step::Traffic => "traffic",
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
            "traffic" => Step::Traffic,
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

/// What a rollout asks of a host with one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Pre-staging: fetch and unpack, nothing goes live.
    Stage,
    /// Activation of a release (a deploy).
    Activate,
    /// A switch to a release the host holds: a manual rollback, or putting
    /// back what a halted deploy moved.
    Rollback,
    /// Blue-green: making the slot an activation readied the live one,
    /// once traffic switched to it.
    Switch,
    /// The same after a rollback readied a slot.
    SwitchBack,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Stage => "stage",
            OpKind::Activate => "activate",
            OpKind::Rollback => "rollback",
            OpKind::Switch => "switch",
            OpKind::SwitchBack => "switch-back",
        }
    }
}

/// The id of one operation a rollout sends one host:
/// `ROLLOUT:KIND:HOST`. No name may hold a `:`, so an id reads back into
/// exactly the parts it was made of, and two ids are equal only when
/// rollout, kind and host all are: a host named `web1` cannot answer for
/// `eu-web1`'s operation, nor `stage-web1` for `web1`'s pre-staging.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId {
    rollout: String,
    kind: OpKind,
    host: HostName,
}

/// An operation id that is not of the form `ROLLOUT:KIND:HOST`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("operation id {id:?} is not ROLLOUT:KIND:HOST: {why}")]
pub struct InvalidOpId {
    pub id: String,
    pub why: String,
}

impl OpId {
    /// `rollout` is a rollout id: ASCII letters and digits.
    pub fn new(rollout: &str, kind: OpKind, host: &HostName) -> Self {
        debug_assert!(!rollout.is_empty() && rollout.bytes().all(|b| b.is_ascii_alphanumeric()));
        OpId {
            rollout: rollout.to_owned(),
            kind,
            host: host.clone(),
        }
    }

    pub fn parse(id: &str) -> Result<Self, InvalidOpId> {
        let bad = |why: &str| InvalidOpId {
            id: id.to_owned(),
            why: why.to_owned(),
        };
        let mut parts = id.splitn(3, ':');
        let (Some(rollout), Some(kind), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("it has fewer than three parts"));
        };
        if rollout.is_empty() || !rollout.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad("the rollout id must be letters and digits"));
        }
        let kind = match kind {
            "stage" => OpKind::Stage,
            "activate" => OpKind::Activate,
            "rollback" => OpKind::Rollback,
            "switch" => OpKind::Switch,
            "switch-back" => OpKind::SwitchBack,
            _ => return Err(bad("the kind must be stage, activate, rollback, switch or switch-back")),
        };
        let host = HostName::new(host).map_err(|e| bad(&e.to_string()))?;
        Ok(OpId {
            rollout: rollout.to_owned(),
            kind,
            host,
        })
    }

    pub fn rollout(&self) -> &str {
        &self.rollout
    }

    pub fn kind(&self) -> OpKind {
        self.kind
    }

    pub fn host(&self) -> &HostName {
        &self.host
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.rollout, self.kind.as_str(), self.host)
    }
}

/// The rollout an operation id names, for logs; the whole id when it is
/// not one a rollout made.
pub fn rollout_of(op_id: &str) -> &str {
    match OpId::parse(op_id) {
        Ok(_) => op_id.split(':').next().unwrap_or(op_id),
        Err(_) => op_id,
    }
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

    fn host(s: &str) -> HostName {
        HostName::new(s).unwrap()
    }

    #[test]
    fn operation_ids_read_back_into_their_parts() {
        let id = OpId::new("5e7ca08efb36", OpKind::Stage, &host("web-1"));
        assert_eq!(id.to_string(), "5e7ca08efb36:stage:web-1");
        assert_eq!(OpId::parse(&id.to_string()), Ok(id.clone()));
        assert_eq!(rollout_of(&id.to_string()), "5e7ca08efb36");
        assert_eq!(rollout_of("by-hand"), "by-hand");
    }

    #[test]
    fn hosts_whose_names_overlap_get_different_ids() {
        // Each pair would have collided with ids of the form ROLLOUT-HOST
        // and ROLLOUT-stage-HOST.
        let r = "5e7ca08efb36";
        let pairs = [
            (
                OpId::new(r, OpKind::Activate, &host("eu-web1")),
                OpId::new(r, OpKind::Activate, &host("web1")),
            ),
            (
                OpId::new(r, OpKind::Activate, &host("stage-web1")),
                OpId::new(r, OpKind::Stage, &host("web1")),
            ),
            (
                OpId::new(r, OpKind::Activate, &host("rollback-web1")),
                OpId::new(r, OpKind::Rollback, &host("web1")),
            ),
        ];
        for (a, b) in pairs {
            assert_ne!(a.to_string(), b.to_string());
            assert_eq!(OpId::parse(&a.to_string()).unwrap().host(), a.host());
            assert_eq!(OpId::parse(&b.to_string()).unwrap().host(), b.host());
        }
    }

    #[test]
    fn malformed_operation_ids_are_refused_with_the_reason() {
        for (id, why) in [
            ("5e7ca08efb36-web1", "fewer than three parts"),
            ("5e7c-a08:stage:web1", "letters and digits"),
            (":stage:web1", "letters and digits"),
            (
                "5e7ca08efb36:deploy:web1",
                "stage, activate, rollback, switch or switch-back",
            ),
            ("5e7ca08efb36:stage:web1:x", "host name"),
            ("5e7ca08efb36:stage:", "host name"),
        ] {
            let e = OpId::parse(id).unwrap_err();
            assert!(e.to_string().contains(why), "{id}: {e}");
        }
    }
}
