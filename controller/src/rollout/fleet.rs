//! The fleet as the engine sees it: which hosts there are, which are
//! connected, and a way to send one host one operation and wait for its
//! end. The controller's session registry is the real fleet
//! (`server::registry`); tests use an in-process one.

use std::collections::{BTreeMap, HashMap};

use convoy_common::ops::{
    ActivateCommand, AppStatus, OpId, OpReport, PreflightCheck, PreflightCommand, RollbackCommand, StepEvent,
};
use convoy_common::slots::PromoteCommand;
use convoy_common::{AppName, HostName};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

/// One host as the fleet knows it.
#[derive(Debug, Clone)]
pub struct FleetHost {
    pub name: HostName,
    pub labels: BTreeMap<String, String>,
    pub apps: HashMap<AppName, AppStatus>,
    pub connected: bool,
    /// The agent protocol revision it speaks (`ops::PROTOCOL`).
    pub protocol: u32,
}

/// What the engine asks of one host.
#[derive(Debug, Clone)]
pub enum Command {
    /// Fetch and unpack, nothing goes live.
    Stage(ActivateCommand),
    Activate(ActivateCommand),
    /// Switch to a release the host holds.
    Rollback(RollbackCommand),
    /// Blue-green: make a slot live once traffic switched to it.
    Promote(PromoteCommand),
}

/// What the one waiting for an operation holds: its progress events,
/// which a slow reader may miss (bounded, dropped when full), and its
/// result, which travels alone and arrives exactly once.
pub struct OpWait {
    pub events: mpsc::Receiver<StepEvent>,
    pub result: oneshot::Receiver<OpReport>,
}

pub trait Fleet: Send + Sync {
    /// Every host known, connected or not.
    fn hosts(&self) -> Vec<FleetHost>;

    /// One host, without copying the whole fleet.
    fn host(&self, name: &HostName) -> Option<FleetHost> {
        self.hosts().into_iter().find(|h| &h.name == name)
    }

    /// Artifact bytes the controller has streamed to a host (egress).
    fn bytes_sent(&self, _host: &HostName) -> u64 {
        0
    }

    fn connected(&self, host: &HostName) -> bool;

    /// Registers interest in operation `op` and sends `command` to the
    /// host `op` names. A host that is away gets the command when it comes
    /// back; the wait lasts until `forget`.
    fn dispatch<'a>(&'a self, op: &'a OpId, command: Command) -> BoxFuture<'a, OpWait>;

    /// Ends the wait for `op`: its result, if it still comes, is late.
    fn forget(&self, op: &OpId);

    /// Asks a connected host whether it can take a release; nothing
    /// changes on it. `Err`: it could not be asked or did not answer.
    fn preflight<'a>(
        &'a self,
        host: &'a HostName,
        cmd: PreflightCommand,
    ) -> BoxFuture<'a, Result<Vec<PreflightCheck>, String>>;
}
