//! Connected agents and the operations waiting on them.
//!
//! A host stays known after its session ends (shown as disconnected); a
//! newer session for the same name replaces an older one, and the older
//! one's cleanup never removes its successor.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use convoy_common::ops::{
    now_unix_ms, ActivateCommand, AppStatus, OpId, OpReport, PreflightCheck, PreflightCommand, StepEvent,
};
use convoy_common::{AppName, HostName};
use convoy_proto::{controller_message, ControllerMessage};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::rollout::fleet::{Command, Fleet, FleetHost, OpWait};

pub type CommandTx = mpsc::Sender<Result<ControllerMessage, Status>>;

/// What became of a result a host sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Handed to the rollout waiting for it.
    Delivered,
    /// Nobody waits for this operation (any more): a late result.
    NotAwaited,
    /// The operation belongs to another host, or the id is not one a
    /// rollout makes; ignored.
    Refused,
}

#[derive(Clone)]
pub struct HostEntry {
    pub name: HostName,
    pub labels: BTreeMap<String, String>,
    pub apps: HashMap<AppName, AppStatus>,
    pub session: Option<(u64, CommandTx)>,
    pub last_seen_ms: i64,
    /// The agent protocol revision its hello said.
    pub protocol: u32,
    /// The controller holding its session, when another one does.
    pub via: Option<String>,
    /// When the certificate of its session here became valid (unix ms).
    pub not_before_ms: i64,
}

/// Someone waiting for an operation's end, and the command that started
/// it, re-sent if the host comes back without having heard it.
struct Waiter {
    events: mpsc::Sender<StepEvent>,
    /// Taken when the result arrives; a second result for the same
    /// operation (a hello repeating it) finds it gone.
    result: Option<oneshot::Sender<OpReport>>,
    command: ControllerMessage,
}

/// Progress events an operation's waiter may hold before newer ones are
/// dropped.
const EVENT_BACKLOG: usize = 256;

#[derive(Default)]
pub struct Registry {
    hosts: Mutex<BTreeMap<HostName, HostEntry>>,
    waiters: Mutex<HashMap<OpId, Waiter>>,
    /// Pre-flight checks asked for, by id: the host asked, and who waits.
    preflights: Mutex<HashMap<String, PreflightAsked>>,
    next_session: AtomicU64,
    /// Artifact bytes streamed to each host since the controller started.
    sent: Mutex<HashMap<HostName, u64>>,
    /// Other controllers on the same database (PostgreSQL only).
    relay: std::sync::OnceLock<std::sync::Arc<super::relay::Relay>>,
    /// The store, for the lease epochs commands carry.
    db: std::sync::OnceLock<std::sync::Arc<crate::db::Db>>,
    /// Artifacts, for the manifest digest staging commands carry.
    artifacts: std::sync::OnceLock<std::sync::Arc<crate::artifacts::Artifacts>>,
}

/// A pre-flight asked of a host, and who waits for its answer.
type PreflightAsked = (HostName, oneshot::Sender<Vec<PreflightCheck>>);

/// Longest a host may take to answer a pre-flight.
const PREFLIGHT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Registry {
    /// Works with other controllers through `relay` from now on.
    pub fn set_relay(&self, relay: std::sync::Arc<super::relay::Relay>) {
        let _ = self.relay.set(relay);
    }

    /// Takes lease epochs for commands from `db`.
    pub fn set_artifacts(&self, a: std::sync::Arc<crate::artifacts::Artifacts>) {
        let _ = self.artifacts.set(a);
    }

    /// `c` with its release's manifest digest, so the host can stage by
    /// delta (the manifest is made now if this controller has none yet;
    /// without one the host stages the whole artifact).
    async fn with_manifest(&self, c: &ActivateCommand) -> ActivateCommand {
        let mut c = c.clone();
        if let (None, Some(a)) = (c.manifest, self.artifacts.get()) {
            match a.manifest(&c.digest).await {
                Ok(Some((_, d))) => c.manifest = Some(d),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(digest = %c.digest, error = %e, "no manifest for the release; hosts stage the whole artifact")
                }
            }
        }
        c
    }

    pub fn set_db(&self, db: std::sync::Arc<crate::db::Db>) {
        let _ = self.db.set(db);
    }

    pub fn relay(&self) -> Option<&std::sync::Arc<super::relay::Relay>> {
        self.relay.get()
    }

    fn changed(&self, host: &HostName) {
        if let Some(r) = self.relay() {
            r.mark_dirty(host);
        }
    }

    /// The id of `host`'s session here, if it has one.
    pub fn session_of(&self, host: &HostName) -> Option<u64> {
        self.hosts
            .lock()
            .unwrap()
            .get(host)
            .and_then(|h| h.session.as_ref().map(|(id, _)| *id))
    }

    /// Sends `msg` down `host`'s session `session`, if it is still the one.
    pub async fn send_on(&self, host: &HostName, session: u64, msg: ControllerMessage) {
        let tx = self.hosts.lock().unwrap().get(host).and_then(|h| match &h.session {
            Some((id, tx)) if *id == session => Some(tx.clone()),
            _ => None,
        });
        if let Some(tx) = tx {
            let _ = tx.send(Ok(msg)).await;
        }
    }

    /// What this controller publishes of a host it knows.
    pub fn published(&self, host: &HostName) -> Option<super::relay::Published> {
        self.hosts.lock().unwrap().get(host).map(|h| {
            (
                h.labels.clone(),
                h.apps.values().cloned().collect(),
                h.protocol,
                h.session.is_some(),
            )
        })
    }

    /// Counts bytes streamed to `host` (artifacts, manifests, contents),
    /// for its egress and the controller's metric.
    pub fn count_sent(&self, host: &HostName, bytes: u64) {
        crate::metrics::get().bytes_streamed.inc_by(bytes);
        *self.sent.lock().unwrap().entry(host.clone()).or_default() += bytes;
    }

    /// Records a new session for `name`; returns its id.
    pub fn connect(
        &self,
        name: &HostName,
        labels: BTreeMap<String, String>,
        apps: Vec<AppStatus>,
        protocol: u32,
        tx: CommandTx,
    ) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = HostEntry {
            name: name.clone(),
            labels,
            apps: apps.into_iter().map(|a| (a.app.clone(), a)).collect(),
            session: Some((id, tx)),
            last_seen_ms: now_unix_ms(),
            protocol,
            via: None,
            not_before_ms: 0,
        };
        let replaced = self.hosts.lock().unwrap().insert(name.clone(), entry);
        self.changed(name);
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
        self.changed(name);
    }

    /// Records when the certificate of `name`'s session `session` became valid.
    pub fn set_not_before(&self, name: &HostName, session: u64, not_before_ms: i64) {
        if let Some(h) = self.hosts.lock().unwrap().get_mut(name) {
            if h.session.as_ref().map(|(id, _)| *id) == Some(session) {
                h.not_before_ms = not_before_ms;
            }
        }
    }

    /// Ends the sessions here whose certificates were revoked (through
    /// any controller): `revoked` is (host, revoked at unix ms).
    pub fn kick_revoked(&self, revoked: &[(String, i64)]) {
        let stale: Vec<HostName> = {
            let hosts = self.hosts.lock().unwrap();
            revoked
                .iter()
                .filter_map(|(h, at)| {
                    let e = hosts.get(&HostName::new(h.as_str()).ok()?)?;
                    (e.session.is_some() && e.not_before_ms <= *at).then(|| e.name.clone())
                })
                .collect()
        };
        for h in stale {
            if self.kick(&h, "this host's certificate was revoked") {
                tracing::warn!(host = %h, "session of a revoked certificate ended");
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
        let mut changed = false;
        if let Some(h) = self.hosts.lock().unwrap().get_mut(name) {
            for a in apps.into_iter().filter(|a| !a.says_nothing()) {
                changed |= h.apps.get(&a.app) != Some(&a);
                h.apps.insert(a.app.clone(), a);
            }
            h.last_seen_ms = now_unix_ms();
        }
        if changed {
            self.changed(name);
        }
    }

    /// Hands a host's pre-flight answer to whoever asked it for one.
    /// `false` when nobody here asked (another controller may have).
    pub fn deliver_preflight(&self, host: &HostName, op_id: &str, checks: Vec<PreflightCheck>) -> bool {
        let mut asked = self.preflights.lock().unwrap();
        match asked.get(op_id) {
            Some((h, _)) if h == host => {
                if let Some((_, tx)) = asked.remove(op_id) {
                    let _ = tx.send(checks);
                }
                true
            }
            Some(_) => {
                tracing::warn!(%host, %op_id, "pre-flight answer for another host's check ignored");
                true
            }
            None => false,
        }
    }

    /// Every host: those with a session here, and those other controllers
    /// hold (`via`).
    pub fn hosts(&self) -> Vec<HostEntry> {
        let mut all = self.hosts.lock().unwrap().clone();
        if let Some(r) = self.relay() {
            for (name, h) in r.remote() {
                if all.get(&name).is_some_and(|l| l.session.is_some()) {
                    continue;
                }
                all.insert(name.clone(), remote_entry(name, h));
            }
        }
        all.into_values().collect()
    }

    /// Agent sessions this controller holds.
    pub fn session_count(&self) -> usize {
        self.hosts
            .lock()
            .unwrap()
            .values()
            .filter(|h| h.session.is_some())
            .count()
    }

    fn entry(&self, name: &HostName) -> Option<HostEntry> {
        let local = self.hosts.lock().unwrap().get(name).cloned();
        if local.as_ref().is_some_and(|l| l.session.is_some()) {
            return local;
        }
        match self.relay().and_then(|r| r.remote_host(name)) {
            Some(h) if h.connected || local.is_none() => Some(remote_entry(name.clone(), h)),
            _ => local,
        }
    }

    pub fn command_tx(&self, name: &HostName) -> Option<CommandTx> {
        self.hosts
            .lock()
            .unwrap()
            .get(name)
            .and_then(|h| h.session.as_ref().map(|(_, tx)| tx.clone()))
    }

    /// Registers interest in an operation's events and result. The host
    /// it is for is the one its id names.
    fn wait_for(&self, op: &OpId, command: ControllerMessage) -> OpWait {
        let (events_tx, events) = mpsc::channel(EVENT_BACKLOG);
        let (result_tx, result) = oneshot::channel();
        let w = Waiter {
            events: events_tx,
            result: Some(result_tx),
            command,
        };
        self.waiters.lock().unwrap().insert(op.clone(), w);
        OpWait { events, result }
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
            .filter(|(op, w)| op.host() == host && w.result.is_some() && !answered.contains(&op.to_string()))
            .map(|(_, w)| w.command.clone())
            .collect()
    }

    pub fn forget(&self, op: &OpId) {
        self.waiters.lock().unwrap().remove(op);
    }

    /// The operation `op_id` names, when `host` may speak for it: a host
    /// only ever speaks for its own operations.
    fn owned_by(host: &HostName, op_id: &str) -> Option<OpId> {
        match OpId::parse(op_id) {
            Ok(op) if op.host() == host => Some(op),
            Ok(op) => {
                tracing::warn!(%host, %op, owner = %op.host(), "message for another host's operation ignored");
                None
            }
            Err(e) => {
                tracing::warn!(%host, error = %e, "message for an operation no rollout made ignored");
                None
            }
        }
    }

    /// Passes a progress event to its operation's waiter, if it has room;
    /// `false` when nobody here waits for the operation.
    pub fn deliver_event(&self, host: &HostName, ev: StepEvent) -> bool {
        let Some(op) = Self::owned_by(host, &ev.op_id) else {
            return true;
        };
        match self.waiters.lock().unwrap().get(&op) {
            Some(w) => {
                if w.events.try_send(ev).is_err() {
                    tracing::debug!(%host, %op, "waiter's event backlog is full; event dropped");
                }
                true
            }
            None => false,
        }
    }

    /// Whether a rollout here waits for `op_id`'s result from `host`.
    pub fn awaits(&self, host: &HostName, op_id: &str) -> Delivery {
        let Some(op) = Self::owned_by(host, op_id) else {
            return Delivery::Refused;
        };
        match self
            .waiters
            .lock()
            .unwrap()
            .get(&op)
            .is_some_and(|w| w.result.is_some())
        {
            true => Delivery::Delivered,
            false => Delivery::NotAwaited,
        }
    }

    /// Hands a result from `host` to the rollout waiting for it, exactly
    /// once. It leaves the host's app state alone: a result repeated in a
    /// hello describes the host as it was then, older than the hello's own
    /// state (the session updates the state from live results).
    pub fn deliver_result(&self, host: &HostName, report: OpReport) -> Delivery {
        let Some(op) = Self::owned_by(host, &report.op_id) else {
            return Delivery::Refused;
        };
        // Sent under the lock, so that once `forget` returns no result can
        // still be on its way to the waiter: it has it, or it is late.
        let mut waiters = self.waiters.lock().unwrap();
        match waiters.get_mut(&op).and_then(|w| w.result.take()) {
            Some(tx) => match tx.send(report) {
                Ok(()) => Delivery::Delivered,
                Err(_) => Delivery::NotAwaited,
            },
            None => Delivery::NotAwaited,
        }
    }
}

/// The registry is the engine's fleet: its hosts are the ones that have
/// connected, and commands go down their sessions.
impl HostEntry {
    fn fleet_host(&self) -> FleetHost {
        FleetHost {
            name: self.name.clone(),
            labels: self.labels.clone(),
            apps: self.apps.clone(),
            connected: self.connected(),
            protocol: self.protocol,
        }
    }

    /// Connected here, or to another controller that is up.
    pub fn connected(&self) -> bool {
        self.session.is_some() || self.via.is_some()
    }
}

fn remote_entry(name: HostName, h: super::relay::RemoteHost) -> HostEntry {
    HostEntry {
        name,
        labels: h.labels,
        apps: h.apps.into_iter().map(|a| (a.app.clone(), a)).collect(),
        session: None,
        last_seen_ms: now_unix_ms(),
        protocol: h.protocol,
        via: h.connected.then_some(h.controller),
        not_before_ms: 0,
    }
}

impl Fleet for Registry {
    fn bytes_sent(&self, host: &HostName) -> u64 {
        self.sent.lock().unwrap().get(host).copied().unwrap_or(0)
    }

    fn hosts(&self) -> Vec<FleetHost> {
        Registry::hosts(self).iter().map(HostEntry::fleet_host).collect()
    }

    fn host(&self, name: &HostName) -> Option<FleetHost> {
        self.entry(name).as_ref().map(HostEntry::fleet_host)
    }

    fn connected(&self, host: &HostName) -> bool {
        self.entry(host).is_some_and(|h| h.connected())
    }

    fn dispatch<'a>(&'a self, op: &'a OpId, command: Command) -> BoxFuture<'a, OpWait> {
        Box::pin(async move {
            let body = match &command {
                Command::Stage(c) => controller_message::Body::Stage((&self.with_manifest(c).await).into()),
                Command::Activate(c) => controller_message::Body::Activate((&self.with_manifest(c).await).into()),
                Command::Rollback(c) => controller_message::Body::Rollback(c.into()),
                Command::Promote(c) => controller_message::Body::Promote(c.into()),
            };
            // The epoch this controller holds the rollout's lease at:
            // agents refuse it once another controller took over.
            let epoch = self.db.get().and_then(|db| db.epoch_of(op.rollout())).unwrap_or(0);
            let msg = ControllerMessage {
                body: Some(body),
                epoch: epoch as u64,
            };
            let wait = self.wait_for(op, msg.clone());
            // With other controllers, the command is also left for
            // whichever holds the host's session, now or later.
            if let Some(r) = self.relay() {
                if let Err(e) = r.leave("command", &op.to_string(), op.host(), &msg).await {
                    tracing::warn!(%op, error = %e, "could not leave the command for other controllers");
                }
            }
            // A host that is away gets the command again when it comes
            // back (`pending_for`), so a failed send is not an error.
            if let Some(session) = self.session_of(op.host()) {
                if let Some(r) = self.relay() {
                    r.mark_sent(session, &op.to_string());
                }
                self.send_on(op.host(), session, msg).await;
            }
            wait
        })
    }

    fn forget(&self, op: &OpId) {
        Registry::forget(self, op)
    }

    fn preflight<'a>(
        &'a self,
        host: &'a HostName,
        cmd: PreflightCommand,
    ) -> BoxFuture<'a, Result<Vec<PreflightCheck>, String>> {
        Box::pin(async move {
            let local = self.command_tx(host);
            let relay = self.relay().filter(|_| local.is_none());
            if local.is_none() && (relay.is_none() || !Fleet::connected(self, host)) {
                return Err(format!("{host} is not connected"));
            }
            let (answer_tx, answer) = oneshot::channel();
            let id = cmd.op_id.clone();
            self.preflights
                .lock()
                .unwrap()
                .insert(id.clone(), (host.clone(), answer_tx));
            let msg = ControllerMessage {
                body: Some(controller_message::Body::Preflight((&cmd).into())),
                epoch: 0,
            };
            let sent = match (local, relay) {
                (Some(tx), _) => tx.send(Ok(msg)).await.is_ok(),
                (None, Some(r)) => r.leave("preflight", &id, host, &msg).await.is_ok(),
                (None, None) => false,
            };
            let r = match sent {
                false => Err(format!("{host} went away before it was asked")),
                true => match tokio::time::timeout(PREFLIGHT_TIMEOUT, answer).await {
                    Ok(Ok(checks)) => Ok(checks),
                    Ok(Err(_)) => Err(format!("{host} did not answer")),
                    Err(_) => Err(format!(
                        "{host} did not answer within {}",
                        humantime::format_duration(PREFLIGHT_TIMEOUT)
                    )),
                },
            };
            self.preflights.lock().unwrap().remove(&id);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_common::ops::{EventKind, OpKind, Outcome, Step};
    use convoy_common::Version;

    fn host(s: &str) -> HostName {
        HostName::new(s).unwrap()
    }

    fn report(op: &OpId) -> OpReport {
        let app = AppName::new("demo").unwrap();
        OpReport {
            op_id: op.to_string(),
            app: app.clone(),
            version: Version::new("1.0.0").unwrap(),
            outcome: Outcome::Succeeded,
            reason: String::new(),
            restore_detail: String::new(),
            state: AppStatus::empty(&app),
        }
    }

    fn event(op: &OpId, n: usize) -> StepEvent {
        StepEvent {
            op_id: op.to_string(),
            app: AppName::new("demo").unwrap(),
            step: Step::Stage,
            kind: EventKind::Info,
            message: format!("event {n}"),
            at_unix_ms: 0,
        }
    }

    #[tokio::test]
    async fn a_result_arrives_however_many_events_came_before_it() {
        let reg = Registry::default();
        let op = OpId::new("r1", OpKind::Activate, &host("web1"));
        let mut wait = reg.wait_for(&op, ControllerMessage { body: None, epoch: 0 });
        // A waiter that reads nothing while a host floods it with events.
        for n in 0..EVENT_BACKLOG * 4 {
            reg.deliver_event(&host("web1"), event(&op, n));
        }
        assert_eq!(reg.deliver_result(&host("web1"), report(&op)), Delivery::Delivered);
        let got = wait.result.try_recv().expect("the result is there");
        assert_eq!(got.op_id, op.to_string());
        // Events beyond the backlog were dropped, the oldest kept.
        let mut n = 0;
        while let Ok(e) = wait.events.try_recv() {
            assert_eq!(e.message, format!("event {n}"));
            n += 1;
        }
        assert_eq!(n, EVENT_BACKLOG);
        // A hello repeating the result does not deliver it twice.
        assert_eq!(reg.deliver_result(&host("web1"), report(&op)), Delivery::NotAwaited);
        assert!(
            reg.pending_for(&host("web1"), &[]).is_empty(),
            "answered: nothing to re-send"
        );
    }

    #[tokio::test]
    async fn a_host_cannot_answer_for_another_hosts_operation() {
        let reg = Registry::default();
        let theirs = OpId::new("r1", OpKind::Activate, &host("eu-web1"));
        let mut wait = reg.wait_for(&theirs, ControllerMessage { body: None, epoch: 0 });
        let mut forged = report(&theirs);
        assert_eq!(reg.deliver_result(&host("web1"), forged.clone()), Delivery::Refused);
        // Ids in the old ROLLOUT-HOST form are not ones a rollout makes.
        forged.op_id = "r1-eu-web1".into();
        assert_eq!(reg.deliver_result(&host("web1"), forged), Delivery::Refused);
        reg.deliver_event(&host("web1"), event(&theirs, 0));
        assert!(wait.result.try_recv().is_err());
        assert!(wait.events.try_recv().is_err());
        assert_eq!(reg.pending_for(&host("eu-web1"), &[]).len(), 1);
        assert!(reg.pending_for(&host("web1"), &[]).is_empty());
        assert_eq!(
            reg.deliver_result(&host("eu-web1"), report(&theirs)),
            Delivery::Delivered
        );
    }

    #[tokio::test]
    async fn results_repeated_in_a_hello_do_not_roll_the_app_state_back() {
        let reg = Registry::default();
        let (tx, _rx) = mpsc::channel(1);
        let mut now = report(&OpId::new("r2", OpKind::Activate, &host("web1"))).state;
        now.current = Some(Version::new("2.0.0").unwrap());
        reg.connect(&host("web1"), BTreeMap::new(), vec![now], 1, tx);
        // An older result (its state says 1.0.0), repeated by the hello.
        let mut old = report(&OpId::new("r1", OpKind::Stage, &host("web1")));
        old.state.current = Some(Version::new("1.0.0").unwrap());
        assert_eq!(reg.deliver_result(&host("web1"), old), Delivery::NotAwaited);
        let apps = &reg.hosts()[0].apps;
        assert_eq!(
            apps.values().next().unwrap().current.as_ref().unwrap().as_str(),
            "2.0.0"
        );
    }

    #[tokio::test]
    async fn a_result_without_the_apps_state_leaves_what_is_known() {
        let reg = Registry::default();
        let (tx, _rx) = mpsc::channel(1);
        let op = OpId::new("r1", OpKind::Activate, &host("web1"));
        let mut known = report(&op).state;
        known.current = Some(Version::new("2.0.0").unwrap());
        reg.connect(&host("web1"), BTreeMap::new(), vec![known.clone()], 1, tx);
        let silent = AppStatus::empty(&known.app);
        assert!(silent.says_nothing() && !known.says_nothing());
        reg.update_apps(&host("web1"), vec![silent]);
        assert_eq!(reg.hosts()[0].apps[&known.app], known);
    }

    #[tokio::test]
    async fn a_result_after_the_wait_ended_is_late_and_one_before_is_kept() {
        let reg = Registry::default();
        let op = OpId::new("r1", OpKind::Activate, &host("web1"));
        // Delivered just before the waiter gives up: still in its hands.
        let mut wait = reg.wait_for(&op, ControllerMessage { body: None, epoch: 0 });
        assert_eq!(reg.deliver_result(&host("web1"), report(&op)), Delivery::Delivered);
        Registry::forget(&reg, &op);
        assert!(wait.result.try_recv().is_ok(), "kept for the rollout");
        // After the wait ended: late, for reconciling.
        assert_eq!(reg.deliver_result(&host("web1"), report(&op)), Delivery::NotAwaited);
    }
}
