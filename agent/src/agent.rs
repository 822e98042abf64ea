//! The agent's shared state: store, systemd connection, the per-app
//! operation lock and the reporter that streams events to the controller.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_common::ops::{AppStatus, Health, OpReport, StepEvent};
use convoy_common::AppName;
use convoy_proto::{agent_message, AgentMessage};
use tokio::sync::mpsc;

use crate::store::Store;
use crate::systemd::Systemd;

pub struct Agent {
    pub store: Store,
    pub systemd: Systemd,
    pub reporter: Reporter,
    pub labels: BTreeMap<String, String>,
    pub unit_timeout: Duration,
    /// app → id of the operation running for it.
    running: Mutex<HashMap<AppName, String>>,
}

/// Held while an operation runs for an app; dropping it frees the app.
pub struct OpGuard {
    agent: Arc<Agent>,
    app: AppName,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.agent.running.lock().unwrap().remove(&self.app);
    }
}

impl Agent {
    pub fn new(store: Store, systemd: Systemd, labels: BTreeMap<String, String>, unit_timeout: Duration) -> Self {
        Self {
            reporter: Reporter::new(store.clone()),
            store,
            systemd,
            labels,
            unit_timeout,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Claims the app for one operation, or names the one already running.
    pub fn try_begin(self: &Arc<Self>, app: &AppName, op_id: &str) -> Result<OpGuard, String> {
        let mut running = self.running.lock().unwrap();
        if let Some(other) = running.get(app) {
            return Err(other.clone());
        }
        running.insert(app.clone(), op_id.to_owned());
        Ok(OpGuard {
            agent: self.clone(),
            app: app.clone(),
        })
    }
}

pub fn empty_status(app: &AppName) -> AppStatus {
    AppStatus {
        app: app.clone(),
        current: None,
        previous: None,
        last_known_good: None,
        releases: vec![],
        health: Health::Unknown,
        health_reason: String::new(),
        inflight_op: None,
    }
}

/// Sends events and results to the controller session, when there is one.
/// Events are best effort; every result is also kept on disk and repeated
/// in the next hello, so a result is never lost to a dropped connection.
pub struct Reporter {
    tx: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    store: Store,
}

impl Reporter {
    fn new(store: Store) -> Self {
        Self {
            tx: Mutex::new(None),
            store,
        }
    }

    pub fn attach(&self, tx: mpsc::Sender<AgentMessage>) {
        *self.tx.lock().unwrap() = Some(tx);
    }

    pub fn detach(&self) {
        *self.tx.lock().unwrap() = None;
    }

    fn send(&self, body: agent_message::Body) -> bool {
        match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.try_send(AgentMessage { body: Some(body) }).is_ok(),
            None => false,
        }
    }

    pub fn event(&self, e: StepEvent) {
        tracing::info!(app = %e.app, op_id = %e.op_id, step = %e.step, kind = ?e.kind, "{}", e.message);
        if !self.send(agent_message::Body::Event((&e).into())) {
            tracing::debug!("event not sent: no controller session");
        }
    }

    pub fn result(&self, r: &OpReport) {
        tracing::info!(app = %r.app, op_id = %r.op_id, version = %r.version, outcome = %r.outcome, reason = %r.reason, "operation finished");
        if let Err(e) = self.store.push_unreported(r) {
            tracing::error!(error = %e, "could not record result on disk");
        }
        self.send(agent_message::Body::Result(r.into()));
    }
}
