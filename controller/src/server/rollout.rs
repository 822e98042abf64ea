//! The rollout engine.
//!
//! A deploy: plan the targets (environment, labels, order) and the batches
//! (strategy) → pre-stage the artifact on every target in parallel
//! (bounded) → activate batch by batch, baking between canary stages →
//! done. When more hosts fail than the failure budget allows, the rollout
//! halts and, unless told otherwise, the hosts it moved go back to their
//! previous release in parallel, without replaying any stage.
//!
//! A manual rollback switches hosts to a release they still hold, all at
//! once; it is refused before anything changes if one of them does not.
//!
//! A rollout runs as its own task; callers only watch its event stream, so
//! an operator's CLI going away does not stop or corrupt it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use convoy_common::identity::PeerIdentity;
use convoy_common::ops::{ActivateCommand, OpReport, Outcome, RollbackCommand};
use convoy_common::rollout::{Amount, Strategy};
use convoy_common::{AppName, HostName, Version};
use convoy_proto::{
    controller_message, rollout_event, Batch, ControllerMessage, DeployRequest, HostEvent, HostResult, RollbackRequest,
    RolloutDone, RolloutEvent, RolloutNote, RolloutPlan,
};
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Semaphore};
use tonic::Status;

use super::operator::load_spec;
use super::registry::{HostEntry, Update};
use super::{internal, Shared};
use crate::db::NewRollout;

#[derive(Clone, Serialize, Deserialize)]
enum Kind {
    Deploy {
        cmd: Box<ActivateCommand>,
        strategy: Strategy,
        budget: usize,
        rollback_on_halt: bool,
        /// The first `group` targets are a canary group, a stage of their own.
        #[serde(default)]
        group: usize,
        /// Wait for `convoy promote` after each stage but the last.
        #[serde(default)]
        manual_promote: bool,
        #[serde(default)]
        vanish: Vanish,
    },
    Rollback {
        to: Option<Version>,
    },
}

struct Rollout {
    id: String,
    /// Who started it, as their certificate says.
    operator: String,
    app: AppName,
    env: String,
    kind: Kind,
    targets: Vec<HostName>,
    /// What each target ran before this rollout, to roll it back to.
    before: HashMap<HostName, Option<Version>>,
    /// Results already recorded for operation ids (when resuming).
    recorded: HashMap<String, HostOutcome>,
    tx: broadcast::Sender<RolloutEvent>,
    control: watch::Sender<Control>,
}

/// What a rollout does about a host that drops away mid-operation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Vanish {
    /// Wait for the host to come back, however long it takes (an operator
    /// can still abort).
    wait: bool,
    /// Otherwise: how long it may be away before it counts as failed.
    deadline: Duration,
}

impl Default for Vanish {
    fn default() -> Self {
        Vanish {
            wait: false,
            deadline: DEFAULT_VANISH_DEADLINE,
        }
    }
}

const DEFAULT_VANISH_DEADLINE: Duration = Duration::from_secs(60);

/// What an operator asked of a running rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Waiting for an operator other than the requester to approve.
    AwaitApproval(String),
    Run,
    /// Wait before the next batch; the string says who asked.
    Pause(String),
    /// Halt before the next batch and roll back what moved.
    Abort(String),
    /// A canary stage (numbered from 1) is done; waiting for `convoy promote`.
    AwaitPromote(usize),
}

/// A running rollout as others reach it: to watch it or to control it.
pub struct Live {
    pub events: broadcast::Sender<RolloutEvent>,
    pub control: watch::Sender<Control>,
}

/// What the store keeps of a rollout so a restarted controller can finish it.
#[derive(Serialize, Deserialize)]
struct SavedPlan {
    kind: Kind,
    targets: Vec<HostName>,
    before: Vec<(HostName, Option<Version>)>,
}

/// How one operation on one host ended.
#[derive(Debug, Clone)]
struct HostOutcome {
    outcome: Outcome,
    reason: String,
    restore_detail: String,
}

impl From<&OpReport> for HostOutcome {
    fn from(r: &OpReport) -> Self {
        HostOutcome {
            outcome: r.outcome,
            reason: r.reason.clone(),
            restore_detail: r.restore_detail.clone(),
        }
    }
}

/// How long a restarted controller waits for a resumed rollout's hosts to
/// reconnect before it carries on (hosts still away then count as failed).
const RECONNECT_GRACE: Duration = Duration::from_secs(60);

fn invalid(e: impl ToString) -> Status {
    Status::invalid_argument(e.to_string())
}

fn parse_budget(s: &str, n: usize) -> Result<usize, Status> {
    if s.is_empty() {
        return Ok(0);
    }
    match Amount::parse(s).map_err(|e| invalid(format!("--failure-budget: {e}")))? {
        Amount::Percent(p) => Ok(n * p as usize / 100),
        Amount::Count(c) => Ok(c),
    }
}

/// Hosts of `env` that match the spec's and the request's labels; returns
/// (connected, not connected), sorted by name.
fn hosts_in(
    shared: &Shared,
    env: &str,
    selector: &std::collections::BTreeMap<String, String>,
    select: &HashMap<String, String>,
) -> (Vec<HostEntry>, Vec<HostEntry>) {
    shared
        .registry
        .hosts()
        .into_iter()
        .filter(|h| h.labels.get("env").map(String::as_str) == Some(env))
        .filter(|h| {
            selector
                .iter()
                .chain(select.iter())
                .all(|(k, v)| h.labels.get(k) == Some(v))
        })
        .partition(|h| h.session.is_some())
}

/// Validates and starts a deploy; returns its event stream.
pub fn start_deploy(
    shared: &Arc<Shared>,
    who: PeerIdentity,
    app: AppName,
    version: Version,
    r: DeployRequest,
) -> Result<broadcast::Receiver<RolloutEvent>, Status> {
    let env = r.environment.clone();
    let spec = load_spec(shared, &app)?;
    let Some(pos) = spec.environments.iter().position(|e| *e == env) else {
        return Err(invalid(format!(
            "environment {env:?} is not one of {app}'s environments ({})",
            spec.environments.join(", ")
        )));
    };
    let release = shared.db.release(&app, &version).map_err(internal)?.ok_or_else(|| {
        Status::not_found(format!(
            "{app} {version} has not been pushed; run `convoy release push {app} {version} FILE`"
        ))
    })?;
    // Promotion: a version enters an environment only after it completed
    // in the one before, unless this is a recorded hotfix.
    if r.hotfix && r.reason.trim().is_empty() {
        return Err(invalid(
            "--hotfix needs --reason TEXT, which is kept in the audit trail",
        ));
    }
    if spec.promotion && pos > 0 && !r.hotfix {
        let before = &spec.environments[pos - 1];
        if !shared.db.completed_in(&app, &version, before).map_err(internal)? {
            return Err(Status::failed_precondition(format!(
                "{app} {version} has not completed in {before}, which comes before {env}; deploy it there first, \
                 or pass --hotfix --reason TEXT"
            )));
        }
    }
    let strategy = Strategy::from_flags(
        if r.strategy.is_empty() { "rolling" } else { &r.strategy },
        Some(r.batch_size.as_str()).filter(|s| !s.is_empty()),
        Some(r.stages.as_str()).filter(|s| !s.is_empty()),
        (r.bake_ms > 0).then(|| Duration::from_millis(r.bake_ms)),
    )
    .map_err(invalid)?;

    if r.manual_promote && !matches!(strategy, Strategy::Stages { .. }) {
        return Err(invalid("--promote manual needs --strategy canary"));
    }
    let (connected, missing) = hosts_in(shared, &env, &spec.selector, &r.select);
    if connected.is_empty() {
        return Err(Status::failed_precondition(format!(
            "no connected host has label env={env}{}",
            spec.selector
                .iter()
                .chain(r.select.iter())
                .map(|(k, v)| format!(", {k}={v}"))
                .collect::<String>()
        )));
    }
    // Explicit order first, then the rest by name.
    let mut targets: Vec<HostEntry> = Vec::new();
    let mut rest = connected;
    for name in &r.order {
        let Some(i) = rest.iter().position(|h| h.name.as_str() == name) else {
            return Err(invalid(format!(
                "--order names {name}, which is not a connected target of this rollout"
            )));
        };
        targets.push(rest.remove(i));
    }
    targets.extend(rest);
    // A labelled canary group goes first, in the order so far.
    let group = if r.canary_group.is_empty() {
        0
    } else {
        let in_group = |h: &HostEntry| r.canary_group.iter().all(|(k, v)| h.labels.get(k) == Some(v));
        let (mut first, rest): (Vec<HostEntry>, Vec<HostEntry>) = targets.into_iter().partition(in_group);
        if first.is_empty() {
            let mut labels: Vec<String> = r.canary_group.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            return Err(Status::failed_precondition(format!(
                "--canary-group {}: no connected target has these labels",
                labels.join(",")
            )));
        }
        let n = first.len();
        first.extend(rest);
        targets = first;
        n
    };
    let vanish = Vanish {
        wait: r.wait_for_vanished,
        deadline: match r.vanish_deadline_ms {
            0 => DEFAULT_VANISH_DEADLINE,
            ms => Duration::from_millis(ms),
        },
    };
    let budget = parse_budget(&r.failure_budget, targets.len())?;

    // Each host's command gets its own operation id when it is sent.
    let cmd = ActivateCommand {
        op_id: String::new(),
        spec: spec.install.clone(),
        version: version.clone(),
        digest: release.digest,
        size: release.size,
        signature: release.signature.clone(),
    };
    let kind = Kind::Deploy {
        cmd: Box::new(cmd),
        strategy: strategy.clone(),
        budget,
        rollback_on_halt: !r.no_rollback,
        group,
        manual_promote: r.manual_promote,
        vanish,
    };
    let rollout = Rollout::new(shared, &who, &app, &env, kind, targets)?;
    if spec.approval.contains(&env) {
        rollout.control.send_replace(Control::AwaitApproval(who.to_string()));
    }
    shared
        .db
        .start_rollout(&NewRollout {
            id: &rollout.id,
            app: &app,
            version: version.as_str(),
            env: &env,
            kind: "deploy",
            strategy: &describe(&strategy, group, r.manual_promote, vanish),
            hotfix_reason: if r.hotfix { r.reason.trim() } else { "" },
            operator: &who.to_string(),
            plan: &rollout.saved_plan(),
        })
        .map_err(|e| rollout.release_slot(shared, internal(e)))?;
    let plan = RolloutPlan {
        hosts: rollout.targets.iter().map(|h| h.to_string()).collect(),
        digest: release.digest.to_hex(),
        skipped_hosts: missing.iter().map(|h| h.name.to_string()).collect(),
        batches: strategy
            .batches_after_group(rollout.targets.len(), group)
            .into_iter()
            .map(|(range, bake)| Batch {
                hosts: rollout.targets[range].iter().map(|h| h.to_string()).collect(),
                bake_ms: bake.as_millis() as u64,
            })
            .collect(),
        strategy: describe(&strategy, group, r.manual_promote, vanish),
        failure_budget: budget as u32,
    };
    tracing::info!(rollout = %rollout.id, %app, %version, %env, by = %who, hotfix = r.hotfix, "deploy started");
    Ok(rollout.spawn(shared, plan))
}

/// The strategy as history and the plan show it.
fn describe(strategy: &Strategy, group: usize, manual_promote: bool, vanish: Vanish) -> String {
    let mut s = strategy.describe();
    if group > 0 {
        s = format!("canary group of {group} first, then {s}");
    }
    if manual_promote {
        s.push_str(", promoted by hand");
    }
    if vanish.wait {
        s.push_str(", waiting for vanished hosts");
    }
    s
}

/// Validates and starts a manual rollback; returns its event stream.
pub fn start_rollback(
    shared: &Arc<Shared>,
    who: PeerIdentity,
    app: AppName,
    r: RollbackRequest,
) -> Result<broadcast::Receiver<RolloutEvent>, Status> {
    let env = r.environment.clone();
    let spec = load_spec(shared, &app)?;
    if !spec.environments.contains(&env) {
        return Err(invalid(format!(
            "environment {env:?} is not one of {app}'s environments"
        )));
    }
    let to = Some(r.to_version.as_str())
        .filter(|v| !v.is_empty())
        .map(Version::new)
        .transpose()
        .map_err(|e| invalid(format!("--to: {e}")))?;
    let (connected, missing) = hosts_in(shared, &env, &spec.selector, &HashMap::new());
    let mut targets: Vec<HostEntry> = connected;
    if !r.hosts.is_empty() {
        for h in &r.hosts {
            if !targets.iter().any(|t| t.name.as_str() == h) && !missing.iter().any(|t| t.name.as_str() == h) {
                return Err(invalid(format!(
                    "--hosts names {h}, which is not a host of {app} in {env}"
                )));
            }
        }
        targets.retain(|t| r.hosts.iter().any(|h| h == t.name.as_str()));
    }
    // Every host must hold its target: checked for all before any is touched.
    let mut problems: Vec<String> = missing
        .iter()
        .filter(|h| r.hosts.is_empty() || r.hosts.iter().any(|n| n == h.name.as_str()))
        .map(|h| format!("{} is not connected", h.name))
        .collect();
    for h in &targets {
        let state = h.apps.get(&app);
        let want = to.clone().or_else(|| state.and_then(|s| s.previous.clone()));
        match (want, state) {
            (None, _) => problems.push(format!("{} has no previous release of {app}", h.name)),
            (Some(v), Some(s)) if s.releases.contains(&v) || s.current.as_ref() == Some(&v) => {}
            (Some(v), _) => problems.push(format!("{} no longer holds {app} {v}", h.name)),
        }
    }
    if targets.is_empty() && problems.is_empty() {
        problems.push(format!("no host of {app} in {env}"));
    }
    if !problems.is_empty() {
        return Err(Status::failed_precondition(format!(
            "rollback refused, nothing was changed: {}",
            problems.join("; ")
        )));
    }
    let targets_n = targets.len();
    let rollout = Rollout::new(shared, &who, &app, &env, Kind::Rollback { to: to.clone() }, targets)?;
    let version = to.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "previous".into());
    shared
        .db
        .start_rollout(&NewRollout {
            id: &rollout.id,
            app: &app,
            version: &version,
            env: &env,
            kind: "rollback",
            strategy: "all at once",
            hotfix_reason: "",
            operator: &who.to_string(),
            plan: &rollout.saved_plan(),
        })
        .map_err(|e| rollout.release_slot(shared, internal(e)))?;
    let hosts: Vec<String> = rollout.targets.iter().map(|h| h.to_string()).collect();
    let plan = RolloutPlan {
        hosts: hosts.clone(),
        digest: String::new(),
        skipped_hosts: vec![],
        batches: vec![Batch { hosts, bake_ms: 0 }],
        strategy: format!("rollback to {version}, all at once"),
        failure_budget: targets_n as u32,
    };
    tracing::info!(rollout = %rollout.id, %app, %env, to = %version, by = %who, "rollback started");
    Ok(rollout.spawn(shared, plan))
}

impl Rollout {
    /// Claims the (app, environment) slot: one rollout at a time there.
    fn new(
        shared: &Shared,
        who: &PeerIdentity,
        app: &AppName,
        env: &str,
        kind: Kind,
        targets: Vec<HostEntry>,
    ) -> Result<Self, Status> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        {
            let mut running = shared.running.lock().unwrap();
            let key = (app.to_string(), env.to_owned());
            if let Some(other) = running.get(&key) {
                return Err(Status::aborted(format!(
                    "rollout {other} of {app} to {env} is still running"
                )));
            }
            running.insert(key, id.clone());
        }
        let before = targets
            .iter()
            .map(|h| (h.name.clone(), h.apps.get(app).and_then(|s| s.current.clone())))
            .collect();
        let (tx, _) = broadcast::channel(4096);
        Ok(Rollout {
            id,
            operator: who.to_string(),
            app: app.clone(),
            env: env.to_owned(),
            kind,
            targets: targets.into_iter().map(|h| h.name).collect(),
            before,
            recorded: HashMap::new(),
            control: watch::channel(Control::Run).0,
            tx,
        })
    }

    /// A rollout as the store recorded it.
    fn restored(
        row: &crate::db::RolloutRow,
        app: AppName,
        plan: SavedPlan,
        recorded: HashMap<String, HostOutcome>,
        control: Control,
    ) -> Self {
        Rollout {
            id: row.id.clone(),
            operator: row.operator.clone(),
            app,
            env: row.env.clone(),
            kind: plan.kind,
            targets: plan.targets,
            before: plan.before.into_iter().collect(),
            recorded,
            tx: broadcast::channel(4096).0,
            control: watch::channel(control).0,
        }
    }

    fn release_slot(&self, shared: &Shared, e: Status) -> Status {
        shared
            .running
            .lock()
            .unwrap()
            .remove(&(self.app.to_string(), self.env.clone()));
        e
    }

    fn saved_plan(&self) -> String {
        let plan = SavedPlan {
            kind: self.kind.clone(),
            targets: self.targets.clone(),
            before: self.before.iter().map(|(h, v)| (h.clone(), v.clone())).collect(),
        };
        serde_json::to_string(&plan).expect("plan serialises")
    }

    fn spawn(self, shared: &Arc<Shared>, plan: RolloutPlan) -> broadcast::Receiver<RolloutEvent> {
        let rx = self.tx.subscribe();
        self.emit(rollout_event::Body::Plan(plan));
        self.launch(shared, false);
        rx
    }

    /// Runs the rollout to its end in its own task. A resumed rollout first
    /// gives its hosts time to reconnect to the restarted controller.
    fn launch(self, shared: &Arc<Shared>, resumed: bool) {
        let shared = shared.clone();
        shared.live.lock().unwrap().insert(
            self.id.clone(),
            Live {
                events: self.tx.clone(),
                control: self.control.clone(),
            },
        );
        tokio::spawn(async move {
            if resumed {
                self.await_hosts(&shared).await;
            } else {
                shared.notifier.send(self.payload("rollout_started", None));
            }
            let done = match &self.kind {
                Kind::Deploy { .. } => self.run_deploy(&shared).await,
                Kind::Rollback { .. } => self.run_rollback(&shared).await,
            };
            let state = match (done.succeeded, done.rolled_back_hosts.is_empty()) {
                (true, _) => "succeeded",
                (false, true) => "failed",
                (false, false) => "rolled_back",
            };
            let kind = match &self.kind {
                Kind::Deploy { .. } => "deploy",
                Kind::Rollback { .. } => "rollback",
            };
            crate::metrics::get().rollout(kind, state);
            if let Err(e) = shared.db.finish_rollout(&self.id, state, &done.reason) {
                tracing::error!(rollout = %self.id, error = %e, "could not record rollout end");
            }
            shared
                .running
                .lock()
                .unwrap()
                .remove(&(self.app.to_string(), self.env.clone()));
            shared.live.lock().unwrap().remove(&self.id);
            tracing::info!(rollout = %self.id, state, reason = %done.reason, "rollout finished");
            let event = match state {
                "succeeded" => "rollout_succeeded",
                "rolled_back" => "rollout_rolled_back",
                _ => "rollout_failed",
            };
            shared.notifier.send(self.payload(event, Some(&done)));
            self.emit(rollout_event::Body::Done(done));
        });
    }

    /// The webhook payload for `event`.
    fn payload(&self, event: &'static str, done: Option<&RolloutDone>) -> crate::webhooks::Payload {
        let (kind, version) = match &self.kind {
            Kind::Deploy { cmd, .. } => ("deploy", cmd.version.to_string()),
            Kind::Rollback { to } => ("rollback", to.as_ref().map_or("previous".into(), |v| v.to_string())),
        };
        let what = format!("{kind} of {} {version} to {} (rollout {})", self.app, self.env, self.id);
        let text = match (event, done) {
            ("rollout_started", _) => format!("convoy: {what} started by {}", self.operator),
            ("rollout_succeeded", _) => format!("convoy: {what} succeeded"),
            (_, Some(d)) => {
                let mut t = format!("convoy: {what} failed: {}", d.reason);
                if !d.rolled_back_hosts.is_empty() {
                    t.push_str(&format!("; rolled back {}", d.rolled_back_hosts.join(", ")));
                }
                t
            }
            _ => format!("convoy: {what}: {event}"),
        };
        crate::webhooks::Payload {
            event,
            rollout_id: self.id.clone(),
            app: self.app.to_string(),
            version,
            environment: self.env.clone(),
            kind,
            operator: self.operator.clone(),
            reason: done.map(|d| d.reason.clone()).unwrap_or_default(),
            failed_hosts: done.map(|d| d.failed_hosts.clone()).unwrap_or_default(),
            rolled_back_hosts: done.map(|d| d.rolled_back_hosts.clone()).unwrap_or_default(),
            at_unix_ms: convoy_common::ops::now_unix_ms(),
            text,
        }
    }

    /// Before a batch: waits while paused; says why when aborted.
    async fn gate(&self, shared: &Shared) -> Result<(), String> {
        let mut control = self.control.subscribe();
        loop {
            let now = control.borrow_and_update().clone();
            match now {
                Control::Run => return Ok(()),
                Control::AwaitApproval(requester) => {
                    self.note(format!(
                        "{} needs approval: waiting for an operator other than {requester} to run `convoy approve {}`",
                        self.env, self.id
                    ));
                    let _ = shared.db.set_rollout_state(&self.id, "awaiting_approval");
                    if control.changed().await.is_err() {
                        return Err("the rollout's control went away".into());
                    }
                    if *control.borrow() == Control::Run {
                        let _ = shared.db.set_rollout_state(&self.id, "running");
                    }
                }
                Control::Abort(who) => return Err(format!("aborted by {who}")),
                Control::AwaitPromote(stage) => {
                    self.note(format!(
                        "stage {stage} is done; waiting for `convoy promote {}` (or abort)",
                        self.id
                    ));
                    let _ = shared.db.set_rollout_state(&self.id, "awaiting_promotion");
                    if control.changed().await.is_err() {
                        return Err("the rollout's control went away".into());
                    }
                    if *control.borrow() == Control::Run {
                        let _ = shared.db.set_rollout_state(&self.id, "running");
                        self.note(format!("stage {stage} promoted"));
                    }
                }
                Control::Pause(who) => {
                    self.note(format!("paused by {who}; waiting for resume or abort"));
                    let _ = shared.db.set_rollout_state(&self.id, "paused");
                    if control.changed().await.is_err() {
                        return Err("the rollout's control went away".into());
                    }
                    if *control.borrow() == Control::Run {
                        let _ = shared.db.set_rollout_state(&self.id, "running");
                        self.note("resumed".into());
                    }
                }
            }
        }
    }

    async fn await_hosts(&self, shared: &Shared) {
        let deadline = tokio::time::Instant::now() + RECONNECT_GRACE;
        loop {
            let missing: Vec<&HostName> = self
                .targets
                .iter()
                .filter(|h| shared.registry.command_tx(h).is_none())
                .collect();
            if missing.is_empty() {
                self.note("every host of the resumed rollout is connected".into());
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let names: Vec<&str> = missing.iter().map(|h| h.as_str()).collect();
                self.note(format!("carrying on without {} (not reconnected)", names.join(", ")));
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn emit(&self, body: rollout_event::Body) {
        // No receiver is fine: nobody is watching.
        let _ = self.tx.send(RolloutEvent {
            rollout_id: self.id.clone(),
            body: Some(body),
        });
    }

    fn note(&self, message: String) {
        tracing::info!(rollout = %self.id, "{message}");
        self.emit(rollout_event::Body::Note(RolloutNote { message }));
    }

    async fn run_deploy(&self, shared: &Shared) -> RolloutDone {
        let Kind::Deploy {
            cmd,
            strategy,
            budget,
            rollback_on_halt,
            group,
            manual_promote,
            ..
        } = &self.kind
        else {
            unreachable!("run_deploy runs deploys")
        };
        let mut failed: Vec<(HostName, String)> = Vec::new();
        let mut restore_failed = false;
        // Approval comes before anything is sent to any host.
        if let Err(cause) = self.gate(shared).await {
            return self.halt(shared, Some(cause), failed, vec![], 0, false, false).await;
        }

        // ── pre-stage everywhere, bounded ──
        self.note(format!("pre-staging {} on {} host(s)", cmd.version, self.targets.len()));
        let gate = &Semaphore::new(shared.cfg.prestage_parallel);
        let staged = join_all(self.targets.iter().map(|h| async move {
            let _permit = gate.acquire().await.expect("semaphore open");
            let mut c = ActivateCommand::clone(cmd);
            c.op_id = convoy_common::ops::op_id(&self.id, h.as_str(), true);
            let msg = controller_message::Body::Stage((&c).into());
            (h.clone(), self.run_op(shared, h, &c.op_id, msg).await)
        }))
        .await;
        for (h, r) in staged {
            if let Err(reason) = verdict(r) {
                failed.push((h, format!("pre-staging: {reason}")));
            }
        }
        if failed.len() > *budget {
            return self
                .halt(shared, None, failed, vec![], 0, false, *rollback_on_halt)
                .await;
        }
        self.note(format!("pre-staged on {} host(s)", self.targets.len() - failed.len()));

        // ── batches ──
        let batches = strategy.batches_after_group(self.targets.len(), *group);
        let mut moved: Vec<HostName> = Vec::new();
        for (i, (range, bake)) in batches.iter().enumerate() {
            if let Err(cause) = self.gate(shared).await {
                return self
                    .halt(
                        shared,
                        Some(cause),
                        failed,
                        moved,
                        range.start,
                        restore_failed,
                        *rollback_on_halt,
                    )
                    .await;
            }
            let hosts: Vec<&HostName> = self.targets[range.clone()]
                .iter()
                .filter(|h| !failed.iter().any(|(f, _)| f == *h))
                .collect();
            let names: Vec<&str> = hosts.iter().map(|h| h.as_str()).collect();
            self.note(format!("batch {}/{}: {}", i + 1, batches.len(), names.join(", ")));
            let results = join_all(hosts.iter().map(|h| async move {
                let mut c = ActivateCommand::clone(cmd);
                c.op_id = convoy_common::ops::op_id(&self.id, h.as_str(), false);
                let msg = controller_message::Body::Activate((&c).into());
                ((*h).clone(), self.run_op(shared, h, &c.op_id, msg).await)
            }))
            .await;
            for (h, r) in results {
                if could_not_restore(&r) {
                    restore_failed = true;
                }
                match verdict(r) {
                    Ok(()) => moved.push(h),
                    Err(reason) => failed.push((h, reason)),
                }
            }
            if failed.len() > *budget {
                return self
                    .halt(
                        shared,
                        None,
                        failed,
                        moved,
                        range.end,
                        restore_failed,
                        *rollback_on_halt,
                    )
                    .await;
            }
            // A resumed rollout whose next batch already started has baked
            // and been promoted before the controller restarted.
            let next_started = batches.get(i + 1).is_some_and(|(next, _)| {
                self.targets[next.clone()].iter().any(|h| {
                    self.recorded
                        .contains_key(&convoy_common::ops::op_id(&self.id, h.as_str(), false))
                })
            });
            if !bake.is_zero() && !next_started {
                self.note(format!("baking for {}", humantime::format_duration(*bake)));
                // An abort does not wait for the bake to end.
                let mut control = self.control.subscribe();
                let bake_end = tokio::time::sleep(*bake);
                tokio::pin!(bake_end);
                loop {
                    tokio::select! {
                        _ = &mut bake_end => break,
                        changed = control.changed() => {
                            if changed.is_err() || matches!(*control.borrow(), Control::Abort(_)) {
                                break;
                            }
                        }
                    }
                }
            }
            if *manual_promote && i + 1 < batches.len() && !next_started {
                // An abort stands; a pause is folded into the wait.
                self.control.send_if_modified(|c| {
                    let wait = !matches!(c, Control::Abort(_));
                    if wait {
                        *c = Control::AwaitPromote(i + 1);
                    }
                    wait
                });
            }
        }
        RolloutDone {
            succeeded: true,
            reason: if failed.is_empty() {
                String::new()
            } else {
                format!("{} host(s) failed within the failure budget of {budget}", failed.len())
            },
            failed_hosts: failed.iter().map(|(h, _)| h.to_string()).collect(),
            rollback_failed: restore_failed,
            ..Default::default()
        }
    }

    /// Stops a deploy that went over its failure budget and, unless told
    /// not to, rolls the hosts it moved back to their previous release.
    #[allow(clippy::too_many_arguments)]
    async fn halt(
        &self,
        shared: &Shared,
        cause: Option<String>,
        failed: Vec<(HostName, String)>,
        moved: Vec<HostName>,
        reached: usize,
        mut rollback_failed: bool,
        rollback: bool,
    ) -> RolloutDone {
        let (first, reason) = match (&cause, failed.first()) {
            (Some(c), _) => (String::new(), c.clone()),
            (None, Some((h, r))) => (h.to_string(), r.clone()),
            (None, None) => (String::new(), "halted".into()),
        };
        // A host counted as failed because it vanished may have come back
        // since and reported that it did activate: it moved too.
        let mut moved = moved;
        for (h, _) in &failed {
            let op = convoy_common::ops::op_id(&self.id, h.as_str(), false);
            if matches!(shared.db.host_outcome(&self.id, &op), Ok(Some(o)) if o.is_success()) {
                moved.push(h.clone());
            }
        }
        let mut rolled_back = Vec::new();
        if rollback && !moved.is_empty() {
            let why = if cause.is_some() {
                "aborted"
            } else {
                "failure budget exceeded"
            };
            self.note(format!("{why}; rolling back {} moved host(s) in parallel", moved.len()));
            let results = join_all(moved.iter().map(|h| async move {
                let r = match self.before.get(h).cloned().flatten() {
                    Some(to) => {
                        self.rollback_host(shared, h, format!("{}-rollback-{h}", self.id), Some(to))
                            .await
                    }
                    None => Err("no previous release to go back to".to_owned()),
                };
                (h.clone(), r)
            }))
            .await;
            for (h, r) in results {
                match verdict(r) {
                    Ok(()) => rolled_back.push(h.to_string()),
                    Err(e) => {
                        rollback_failed = true;
                        tracing::error!(rollout = %self.id, host = %h, error = %e, "rollback failed");
                    }
                }
            }
        }
        RolloutDone {
            succeeded: false,
            failed_host: first,
            reason,
            untouched_hosts: self.targets[reached..]
                .iter()
                .filter(|h| !failed.iter().any(|(f, _)| f == *h))
                .map(|h| h.to_string())
                .collect(),
            failed_hosts: failed.iter().map(|(h, _)| h.to_string()).collect(),
            rolled_back_hosts: rolled_back,
            rollback_failed,
        }
    }

    async fn run_rollback(&self, shared: &Shared) -> RolloutDone {
        let Kind::Rollback { to } = &self.kind else {
            unreachable!("run_rollback runs rollbacks")
        };
        let results = join_all(self.targets.iter().map(|h| async move {
            (
                h.clone(),
                self.rollback_host(
                    shared,
                    h,
                    convoy_common::ops::op_id(&self.id, h.as_str(), false),
                    to.clone(),
                )
                .await,
            )
        }))
        .await;
        let mut failed = Vec::new();
        let mut restore_failed = false;
        for (h, r) in results {
            if could_not_restore(&r) {
                restore_failed = true;
            }
            if let Err(e) = verdict(r) {
                failed.push((h, e));
            }
        }
        match failed.first() {
            None => RolloutDone {
                succeeded: true,
                ..Default::default()
            },
            Some((h, reason)) => RolloutDone {
                succeeded: false,
                failed_host: h.to_string(),
                reason: reason.clone(),
                failed_hosts: failed.iter().map(|(h, _)| h.to_string()).collect(),
                rollback_failed: restore_failed,
                ..Default::default()
            },
        }
    }

    fn vanish(&self) -> Vanish {
        match &self.kind {
            Kind::Deploy { vanish, .. } => *vanish,
            Kind::Rollback { .. } => Vanish::default(),
        }
    }

    /// Switches `host` back to `to` (its previous release when `None`).
    async fn rollback_host(
        &self,
        shared: &Shared,
        host: &HostName,
        op_id: String,
        to: Option<Version>,
    ) -> Result<HostOutcome, String> {
        let c = RollbackCommand {
            op_id: op_id.clone(),
            app: self.app.clone(),
            to,
        };
        self.run_op(shared, host, &op_id, controller_message::Body::Rollback((&c).into()))
            .await
    }

    /// Sends one command to `host` and waits for its report, forwarding
    /// and recording its events.
    async fn run_op(
        &self,
        shared: &Shared,
        host: &HostName,
        op_id: &str,
        body: controller_message::Body,
    ) -> Result<HostOutcome, String> {
        if let Some(done) = self.recorded.get(op_id) {
            return Ok(done.clone());
        }
        let msg = ControllerMessage { body: Some(body) };
        let mut updates = shared.registry.wait_for(op_id, host, msg.clone());
        let _forget = Forget(&shared.registry, op_id.to_owned());
        // A host that is away gets the command again when it comes back
        // (see `Registry::pending_for`), so a failed send is not an error.
        if let Some(tx) = shared.registry.command_tx(host) {
            let _ = tx.send(Ok(msg)).await;
        }

        let vanish = self.vanish();
        let mut control = self.control.subscribe();
        let mut deadline = tokio::time::Instant::now() + shared.cfg.host_timeout;
        // While the host is away: since when, and how much of its time was left.
        let mut away: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let now = tokio::time::Instant::now();
            if shared.registry.command_tx(host).is_none() {
                let (since, left) = *away.get_or_insert_with(|| {
                    self.note(if vanish.wait {
                        format!("{host} is away; waiting for it to come back (--on-vanish wait)")
                    } else {
                        format!(
                            "{host} is away; it counts as failed if not back within {}",
                            humantime::format_duration(vanish.deadline)
                        )
                    });
                    (now, deadline.saturating_duration_since(now))
                });
                if vanish.wait {
                    // Time away does not count against the host's timeout.
                    deadline = now + left;
                } else if now.duration_since(since) >= vanish.deadline {
                    return Err(format!(
                        "{host} vanished: away for more than {}",
                        humantime::format_duration(vanish.deadline)
                    ));
                }
                if let Control::Abort(by) = &*control.borrow_and_update() {
                    return Err(format!("aborted by {by} while waiting for {host} to come back"));
                }
            } else if away.take().is_some() {
                self.note(format!("{host} is back"));
            }
            if now >= deadline {
                return Err(format!("{host} did not finish within {:?}", shared.cfg.host_timeout));
            }
            let update = match tokio::time::timeout(Duration::from_millis(500), updates.recv()).await {
                Err(_) => continue,
                Ok(None) => return Err("update channel closed".to_owned()),
                Ok(Some(u)) => u,
            };
            if away.take().is_some() {
                self.note(format!("{host} is back"));
            }
            match update {
                Update::Event(ev) => {
                    if let Err(e) = shared.db.record_event(&self.id, host, &ev) {
                        tracing::error!(error = %e, "could not record event");
                    }
                    self.emit(rollout_event::Body::HostEvent(HostEvent {
                        host: host.to_string(),
                        event: Some((&ev).into()),
                    }));
                }
                Update::Result(r) => {
                    crate::metrics::get().host_result(r.outcome);
                    if let Err(e) = shared.db.record_host_result(&self.id, host, &r) {
                        tracing::error!(error = %e, "could not record host result");
                    }
                    self.emit(rollout_event::Body::HostResult(HostResult {
                        host: host.to_string(),
                        result: Some(r.as_ref().into()),
                    }));
                    return Ok(HostOutcome::from(r.as_ref()));
                }
            }
        }
    }
}

/// Whether a host failed and could not put its previous release back.
fn could_not_restore(r: &Result<HostOutcome, String>) -> bool {
    matches!(r, Ok(rep) if rep.outcome == Outcome::FailedRestoreFailed)
}

/// A host's result as success or the reason it failed.
fn verdict(r: Result<HostOutcome, String>) -> Result<(), String> {
    match r {
        Ok(rep) if rep.outcome.is_success() => Ok(()),
        Ok(rep) => {
            let mut s = format!("{}: {}", rep.outcome, rep.reason);
            if !rep.restore_detail.is_empty() {
                s.push_str(&format!("; {}", rep.restore_detail));
            }
            Err(s)
        }
        Err(e) => Err(e),
    }
}

struct Forget<'a>(&'a super::registry::Registry, String);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(&self.1);
    }
}

/// Picks up the rollouts a previous controller left running: each goes on
/// from its recorded host results. Operations without a recorded result
/// are sent again under the same id, and an agent answers a repeated id
/// with what it already did, so no host is activated twice.
pub async fn resume_all(shared: Arc<Shared>) {
    let rows = match shared.db.running_rollouts() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read running rollouts");
            return;
        }
    };
    for (row, plan) in rows {
        let fail = |why: String| {
            tracing::error!(rollout = %row.id, "{why}");
            let _ = shared.db.finish_rollout(&row.id, "failed", &why);
        };
        let (Ok(plan), Ok(app)) = (serde_json::from_str::<SavedPlan>(&plan), AppName::new(row.app.clone())) else {
            fail("the controller restarted and this rollout's plan could not be read".into());
            continue;
        };
        let recorded: HashMap<String, HostOutcome> = match shared.db.rollout_hosts(&row.id) {
            Ok(hosts) => hosts
                .into_iter()
                .filter_map(|h| {
                    let outcome = crate::db::outcome_from_name(&h.outcome)?;
                    Some((
                        h.op_id,
                        HostOutcome {
                            outcome,
                            reason: h.reason,
                            restore_detail: h.restore_detail,
                        },
                    ))
                })
                .collect(),
            Err(e) => {
                fail(format!("cannot read recorded results: {e}"));
                continue;
            }
        };
        shared
            .running
            .lock()
            .unwrap()
            .insert((row.app.clone(), row.env.clone()), row.id.clone());
        let control = match row.state.as_str() {
            "paused" => Control::Pause("an operator, before the controller restarted".into()),
            "awaiting_approval" => Control::AwaitApproval(row.operator.clone()),
            _ => Control::Run,
        };
        let rollout = Rollout::restored(&row, app, plan, recorded, control);
        tracing::warn!(
            rollout = %rollout.id,
            recorded = rollout.recorded.len(),
            "resuming a rollout interrupted by a controller restart"
        );
        rollout.launch(&shared, true);
    }
}

/// Reconciles a result no one was waiting for: a host that vanished
/// mid-rollout (and was counted as failed) reports how its operation really
/// ended when it comes back. The result goes into the rollout's history;
/// and when that rollout has since halted and rolled back the hosts it
/// moved, a host that did activate is rolled back too, so the fleet ends
/// where the rollout says it is.
pub fn late_result(shared: &Arc<Shared>, host: &HostName, r: &OpReport) {
    if !r.op_id.ends_with(&format!("-{host}")) {
        return;
    }
    let id = convoy_common::ops::rollout_of(&r.op_id);
    let Ok(Some((row, plan))) = shared.db.rollout_with_plan(id) else {
        return;
    };
    if !matches!(shared.db.host_outcome(id, &r.op_id), Ok(None)) {
        return; // already recorded: every hello repeats recent results
    }
    crate::metrics::get().host_result(r.outcome);
    if let Err(e) = shared.db.record_host_result(id, host, r) {
        tracing::error!(rollout = %id, %host, error = %e, "could not record a late result");
        return;
    }
    tracing::warn!(rollout = %id, %host, op = %r.op_id, outcome = %r.outcome, "late result reconciled into its rollout");
    let (Ok(plan), Ok(app)) = (serde_json::from_str::<SavedPlan>(&plan), AppName::new(row.app.clone())) else {
        return;
    };
    let halted = matches!(row.state.as_str(), "failed" | "rolled_back");
    let undo = matches!(
        plan.kind,
        Kind::Deploy {
            rollback_on_halt: true,
            ..
        }
    ) && halted
        && r.outcome.is_success()
        && r.op_id == convoy_common::ops::op_id(id, host.as_str(), false);
    let to = plan.before.iter().find(|(h, _)| h == host).and_then(|(_, v)| v.clone());
    let (true, Some(to)) = (undo, to) else {
        return;
    };
    let rollback_op = format!("{id}-rollback-{host}");
    if !matches!(shared.db.host_outcome(id, &rollback_op), Ok(None)) {
        return;
    }
    let rollout = Rollout::restored(&row, app, plan, HashMap::new(), Control::Run);
    let shared = shared.clone();
    let host = host.clone();
    tokio::spawn(async move {
        tracing::warn!(rollout = %rollout.id, %host, %to, "rolling back a host that activated after its rollout halted");
        let r = rollout.rollback_host(&shared, &host, rollback_op, Some(to)).await;
        match verdict(r) {
            Ok(()) => tracing::info!(rollout = %rollout.id, %host, "late host rolled back"),
            Err(e) => tracing::error!(rollout = %rollout.id, %host, error = %e, "late host could not be rolled back"),
        }
    });
}

/// Applies an operator's pause, resume or abort to a running rollout;
/// returns its state afterwards.
pub fn control(shared: &Shared, id: &str, action: &str, who: &PeerIdentity) -> Result<String, Status> {
    let live = shared.live.lock().unwrap();
    let Some(l) = live.get(id) else {
        return Err(match shared.db.rollout(id).map_err(internal)? {
            Some(row) => Status::failed_precondition(format!("rollout {id} is not running (state: {})", row.state)),
            None => Status::not_found(format!("no rollout {id}")),
        });
    };
    let now = l.control.borrow().clone();
    if let Control::AwaitApproval(requester) = &now {
        return match action {
            "approve" if *requester == who.to_string() => Err(Status::permission_denied(format!(
                "{who} started rollout {id} and cannot approve it; another operator must"
            ))),
            "approve" => {
                shared.db.approve(id, &who.to_string()).map_err(internal)?;
                tracing::info!(rollout = %id, by = %who, "rollout approved");
                l.control.send_replace(Control::Run);
                Ok("approved; running".into())
            }
            "abort" => {
                l.control.send_replace(Control::Abort(who.to_string()));
                Ok("aborted before it started".into())
            }
            _ => Err(Status::failed_precondition(format!(
                "rollout {id} is awaiting approval"
            ))),
        };
    }
    let next = match (action, &now) {
        ("approve", _) => return Err(Status::failed_precondition(format!("rollout {id} needs no approval"))),
        ("promote", Control::AwaitPromote(stage)) => {
            tracing::info!(rollout = %id, by = %who, stage, "stage promoted");
            l.control.send_replace(Control::Run);
            return Ok(format!("stage {stage} promoted; running"));
        }
        ("promote", _) => {
            return Err(Status::failed_precondition(format!(
                "rollout {id} is not waiting for promotion"
            )))
        }
        ("pause", Control::AwaitPromote(_)) => return Ok("awaiting promotion".into()),
        ("resume", Control::AwaitPromote(stage)) => {
            return Err(Status::failed_precondition(format!(
                "rollout {id} is waiting for stage {stage} to be promoted: run `convoy promote {id}`"
            )))
        }
        ("pause" | "resume" | "abort", Control::Abort(by)) => {
            return Err(Status::failed_precondition(format!(
                "rollout {id} is being aborted by {by}"
            )))
        }
        ("pause", Control::Pause(_)) => return Ok("paused".into()),
        ("pause", _) => Control::Pause(who.to_string()),
        ("resume", Control::Run) => return Ok("running".into()),
        ("resume", _) => Control::Run,
        ("abort", _) => Control::Abort(who.to_string()),
        (other, _) => {
            return Err(invalid(format!(
                "unknown action {other:?} (pause, resume, abort, promote or approve)"
            )))
        }
    };
    let state = match &next {
        Control::AwaitApproval(_) | Control::AwaitPromote(_) | Control::Run => "running",
        Control::Pause(_) => "pausing before its next batch",
        Control::Abort(_) => "aborting before its next batch",
    };
    tracing::info!(rollout = %id, by = %who, action, "rollout control");
    l.control.send_replace(next);
    Ok(state.into())
}

/// A running rollout's event stream, from now until it ends.
pub fn watch(shared: &Shared, id: &str) -> Result<broadcast::Receiver<RolloutEvent>, Status> {
    if let Some(l) = shared.live.lock().unwrap().get(id) {
        return Ok(l.events.subscribe());
    }
    Err(match shared.db.rollout(id).map_err(internal)? {
        Some(row) => Status::failed_precondition(format!(
            "rollout {id} has ended (state: {}); see `convoy history --rollout {id}`",
            row.state
        )),
        None => Status::not_found(format!("no rollout {id}")),
    })
}
