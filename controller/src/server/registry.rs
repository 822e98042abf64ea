//! Connected agents and the operations waiting on them.
//!
//! A host stays known after its session ends (shown as disconnected); a
//! newer session for the same name replaces an older one, and the older
//! one's cleanup never removes its successor.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use convoy_common::ops::{now_unix_ms, AppStatus, OpReport, StepEvent};
use convoy_common::{AppName, HostName};
use convoy_proto::ControllerMessage;
use tokio::sync::mpsc;
use tonic::Status;

pub type CommandTx = mpsc::Sender<Result<ControllerMessage, Status>>;

/// What an operation's waiter hears.
#[derive(Debug, Clone)]
pub enum Update {
    Event(StepEvent),
    Result(Box<OpReport>),
}

#[derive(Clone)]
pub struct HostEntry {
    pub name: HostName,
    pub labels: BTreeMap<String, String>,
    pub apps: HashMap<AppName, AppStatus>,
    pub session: Option<(u64, CommandTx)>,
    pub last_seen_ms: i64,
}

/// Someone waiting for an operation's end, and the command that started
/// it, re-sent if the host comes back without having heard it.
struct Waiter {
    host: HostName,
    tx: mpsc::Sender<Update>,
    command: ControllerMessage,
}

#[derive(Default)]
pub struct Registry {
    hosts: Mutex<BTreeMap<HostName, HostEntry>>,
    waiters: Mutex<HashMap<String, Waiter>>,
    next_session: AtomicU64,
}

impl Registry {
    /// Records a new session for `name`; returns its id.
    pub fn connect(
        &self,
        name: &HostName,
        labels: BTreeMap<String, String>,
        apps: Vec<AppStatus>,
        tx: CommandTx,
    ) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = HostEntry {
            name: name.clone(),
            labels,
            apps: apps.into_iter().map(|a| (a.app.clone(), a)).collect(),
            session: Some((id, tx)),
            last_seen_ms: now_unix_ms(),
        };
        let replaced = self.hosts.lock().unwrap().insert(name.clone(), entry);
        // A new session that replaces a live one is still one host.
        if replaced.is_none_or(|old| old.session.is_none()) {
            crate::metrics::get().connected_hosts.inc();
        }
        id
    }

    pub fn disconnect(&self, name: &HostName, session: u64) {
        if let Some(h) = self.hosts.lock().unwrap().get_mut(name) {
            if h.session.as_ref().map(|(id, _)| *id) == Some(session) {
                h.session = None;
                crate::metrics::get().connected_hosts.dec();
            }
        }
    }

    /// Ends `name`'s session, telling the agent why; returns whether it had one.
    pub fn kick(&self, name: &HostName, why: &str) -> bool {
        let session = self.hosts.lock().unwrap().get_mut(name).and_then(|h| h.session.take());
        match session {
            Some((_, tx)) => {
                crate::metrics::get().connected_hosts.dec();
                let _ = tx.try_send(Err(Status::permission_denied(why.to_owned())));
                true
            }
            None => false,
        }
    }

    /// Updates what a host says it runs.
    pub fn update_apps(&self, name: &HostName, apps: Vec<AppStatus>) {
        if let Some(h) = self.hosts.lock().unwrap().get_mut(name) {
            for a in apps {
                h.apps.insert(a.app.clone(), a);
            }
            h.last_seen_ms = now_unix_ms();
        }
    }

    pub fn hosts(&self) -> Vec<HostEntry> {
        self.hosts.lock().unwrap().values().cloned().collect()
    }

    pub fn command_tx(&self, name: &HostName) -> Option<CommandTx> {
        self.hosts
            .lock()
            .unwrap()
            .get(name)
            .and_then(|h| h.session.as_ref().map(|(_, tx)| tx.clone()))
    }

    /// Registers interest in an operation's events and result.
    pub fn wait_for(&self, op_id: &str, host: &HostName, command: ControllerMessage) -> mpsc::Receiver<Update> {
        let (tx, rx) = mpsc::channel(256);
        let w = Waiter {
            host: host.clone(),
            tx,
            command,
        };
        self.waiters.lock().unwrap().insert(op_id.to_owned(), w);
        rx
    }

    /// Commands for `host` still waiting for a result, except those in
    /// `answered`. Sent again when the host opens a new session: an agent
    /// killed before it journaled a command never heard it, and the agent
    /// answers a repeated operation id with its recorded result.
    pub fn pending_for(&self, host: &HostName, answered: &[String]) -> Vec<ControllerMessage> {
        self.waiters
            .lock()
            .unwrap()
            .iter()
            .filter(|(op, w)| w.host == *host && !answered.contains(op))
            .map(|(_, w)| w.command.clone())
            .collect()
    }

    pub fn forget(&self, op_id: &str) {
        self.waiters.lock().unwrap().remove(op_id);
    }

    /// Routes an update from `host` to its waiter; returns whether there was
    /// one. An update for an operation that belongs to another host is
    /// dropped: a host can only speak for itself.
    pub fn deliver(&self, host: &HostName, op_id: &str, update: Update) -> bool {
        if let Update::Result(r) = &update {
            self.update_apps(host, vec![r.state.clone()]);
        }
        let waiters = self.waiters.lock().unwrap();
        if let Some(Waiter { host: owner, tx, .. }) = waiters.get(op_id) {
            if owner == host {
                if tx.try_send(update).is_err() {
                    tracing::warn!(%host, op_id, "waiter is full or gone; update dropped");
                }
            } else {
                tracing::warn!(%host, op_id, %owner, "update for another host's operation ignored");
            }
            return true;
        }
        false
    }
}
