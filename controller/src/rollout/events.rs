//! What a rollout tells those watching it. The gRPC edge turns these into
//! wire events (`server::operator`); the webhooks and the store see the
//! same facts.

use std::time::Duration;

use convoy_common::ops::{OpReport, StepEvent};
use convoy_common::HostName;

#[derive(Debug, Clone)]
pub struct Event {
    pub rollout_id: String,
    pub body: EventBody,
}

#[derive(Debug, Clone)]
pub enum EventBody {
    Plan(Plan),
    Note(String),
    /// A step of one host's operation.
    Host {
        host: HostName,
        event: StepEvent,
    },
    /// How one host's operation ended.
    Result {
        host: HostName,
        report: Box<OpReport>,
    },
    /// Pre-flight refused the rollout: every target's checks.
    Preflight(Vec<super::preflight::HostPreflight>),
    /// A metric gate measured once.
    Measurement(convoy_common::analysis::Measurement),
    Done(Done),
}

/// What a rollout will do, sent first.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub hosts: Vec<HostName>,
    /// sha256 of the artifact, hex (empty for a rollback).
    pub digest: String,
    /// Hosts of the environment that are not connected, left out.
    pub skipped_hosts: Vec<HostName>,
    pub batches: Vec<PlannedBatch>,
    pub strategy: String,
    pub failure_budget: usize,
    /// Said right after the plan (e.g. a hotfix passing a freeze).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PlannedBatch {
    pub hosts: Vec<HostName>,
    /// Wait after the batch (canary stages).
    pub bake: Duration,
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Succeeded,
    /// Halted; nothing moved needed rolling back, or rolling back was off.
    Failed,
    /// Halted, and the hosts it moved were rolled back.
    RolledBack,
    /// Aborted before any host was sent anything (e.g. while awaiting
    /// approval): not a change that failed.
    Cancelled,
}

pub use crate::db::LIVE_STATES;
/// Every state a rollout can be in: the live ones, then how it ended
/// (`Verdict::state`).
pub const STATES: [&str; 9] = [
    "running",
    "paused",
    "awaiting_approval",
    "awaiting_promotion",
    "frozen",
    "succeeded",
    "failed",
    "rolled_back",
    "cancelled",
];

impl Verdict {
    /// The state the store and history show.
    pub fn state(self) -> &'static str {
        match self {
            Verdict::Succeeded => "succeeded",
            Verdict::Failed => "failed",
            Verdict::RolledBack => "rolled_back",
            Verdict::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Done {
    pub verdict: Verdict,
    /// The first host that failed, when a host's failure halted it.
    pub failed_host: Option<HostName>,
    pub reason: String,
    /// Targets never reached.
    pub untouched_hosts: Vec<HostName>,
    pub failed_hosts: Vec<HostName>,
    pub rolled_back_hosts: Vec<HostName>,
    /// A failing host could not restore its previous release, or a
    /// rollback failed: a host needs attention.
    pub rollback_failed: bool,
    /// It stopped before any host was switched: no host runs, or ran,
    /// anything new (refused at pre-staging, aborted before its first batch).
    pub nothing_changed: bool,
}

impl Done {
    /// A rollout that ended before any host was sent anything.
    pub fn untouched(verdict: Verdict, reason: String, targets: &[HostName]) -> Self {
        Done {
            verdict,
            failed_host: None,
            reason,
            untouched_hosts: targets.to_vec(),
            failed_hosts: vec![],
            rolled_back_hosts: vec![],
            rollback_failed: false,
            nothing_changed: true,
        }
    }

    pub fn succeeded(reason: String, failed_hosts: Vec<HostName>, rollback_failed: bool) -> Self {
        Done {
            verdict: Verdict::Succeeded,
            failed_host: None,
            reason,
            untouched_hosts: vec![],
            failed_hosts,
            rolled_back_hosts: vec![],
            rollback_failed,
            nothing_changed: false,
        }
    }
}
