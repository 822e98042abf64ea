//! One rollout, run to its end in a task of its own: approval, pre-stage
//! everywhere (bounded), then batch by batch with the host steps around
//! each activation and the gates after each batch and bake; on a failure
//! over the budget, a failing gate or an abort, halt and roll the moved
//! hosts back in parallel, without replaying any stage.
//!
//! A manual rollback switches its hosts to a release they hold, all at
//! once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use convoy_common::analysis::AnalysisSpec;
use convoy_common::ops::{
    ActivateCommand, EventKind, OpId, OpKind, OpReport, Outcome, PreflightCommand, RollbackCommand, Step, StepEvent,
};
use convoy_common::rollout::Strategy;
use convoy_common::slots::{BlueGreen, PromoteCommand, SlotState, SlotStatus};
use convoy_common::traffic::TrafficSpec;
use convoy_common::{AppName, HostName, Version};
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Semaphore};

use super::analysis::{Analyzer, Running, Sides, Sink, Subject};
use super::control::Control;
use super::events::{Done, Event, EventBody, Plan, Verdict};
use super::fleet::{Command, OpWait};
use super::order::Vanish;
use super::seams::{RolloutRef, SlotAction};
use super::Engine;

/// What a rollout does, as its saved plan keeps it.
#[derive(Clone, Serialize, Deserialize)]
pub(super) enum Kind {
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
        /// Metric gates, from the app spec when the rollout started.
        #[serde(default)]
        analysis: Option<Box<AnalysisSpec>>,
        /// An admin's hotfix passed a freeze: later batches do not wait for one.
        #[serde(default)]
        passes_freeze: bool,
        /// What every target is asked before anything moves.
        #[serde(default)]
        preflight: Option<Box<PreflightCommand>>,
        /// How requests reach the hosts, from the app spec.
        #[serde(default)]
        traffic: Option<Box<TrafficSpec>>,
        /// The configuration revision rendered into the release (0: its
        /// defaults); `None`: it declares none.
        #[serde(default)]
        config_revision: Option<u64>,
    },
    Rollback {
        to: Option<Version>,
        /// Rollouts saved before rollbacks had a strategy went all at once.
        #[serde(default = "all_at_once")]
        strategy: Strategy,
        #[serde(default)]
        budget: usize,
        /// How requests reach the hosts, from the app spec.
        #[serde(default)]
        traffic: Option<Box<TrafficSpec>>,
        /// Blue-green hosts switch traffic back to a slot.
        #[serde(default)]
        blue_green: Option<BlueGreen>,
    },
}

fn all_at_once() -> Strategy {
    Strategy::AllAtOnce
}

impl Kind {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Kind::Deploy { .. } => "deploy",
            Kind::Rollback { .. } => "rollback",
        }
    }
}

/// What the store keeps of a rollout so a restarted controller can finish it.
#[derive(Serialize, Deserialize)]
pub(super) struct SavedPlan {
    pub kind: Kind,
    pub targets: Vec<HostName>,
    pub before: Vec<(HostName, Option<Version>)>,
}

/// How one operation on one host ended.
#[derive(Debug, Clone)]
pub(super) struct HostOutcome {
    pub outcome: Outcome,
    pub reason: String,
    pub restore_detail: String,
    /// Blue-green: the host's slots after the operation (empty when the
    /// outcome was read back from the store).
    pub slots: Vec<SlotStatus>,
}

impl From<&OpReport> for HostOutcome {
    fn from(r: &OpReport) -> Self {
        HostOutcome {
            outcome: r.outcome,
            reason: r.reason.clone(),
            restore_detail: r.restore_detail.clone(),
            slots: r.state.slots.clone(),
        }
    }
}

pub(super) struct Rollout {
    pub id: String,
    /// Who started it, as their certificate says.
    pub operator: String,
    pub app: AppName,
    pub env: String,
    pub kind: Kind,
    pub targets: Vec<HostName>,
    /// What each target ran before this rollout, to roll it back to.
    pub before: HashMap<HostName, Option<Version>>,
    /// Results already recorded (when resuming).
    pub recorded: HashMap<OpId, HostOutcome>,
    pub tx: broadcast::Sender<Event>,
    pub control: watch::Sender<Control>,
}

/// Events a watcher may fall behind by before it misses some.
const EVENT_BACKLOG: usize = 4096;

/// Who started a rollout, of what, where.
pub(super) struct Head {
    pub id: String,
    pub operator: String,
    pub app: AppName,
    pub env: String,
}

impl Rollout {
    pub fn new(head: Head, plan: SavedPlan, recorded: HashMap<OpId, HostOutcome>, control: Control) -> Self {
        Rollout {
            id: head.id,
            operator: head.operator,
            app: head.app,
            env: head.env,
            kind: plan.kind,
            targets: plan.targets,
            before: plan.before.into_iter().collect(),
            recorded,
            tx: broadcast::channel(EVENT_BACKLOG).0,
            control: watch::channel(control).0,
        }
    }

    pub fn saved_plan(&self) -> String {
        let mut before: Vec<_> = self.before.iter().map(|(h, v)| (h.clone(), v.clone())).collect();
        before.sort();
        let plan = SavedPlan {
            kind: self.kind.clone(),
            targets: self.targets.clone(),
            before,
        };
        serde_json::to_string(&plan).expect("plan serialises")
    }

    pub(super) fn reference(&self) -> RolloutRef {
        RolloutRef {
            id: self.id.clone(),
            app: self.app.clone(),
            env: self.env.clone(),
            traffic: match &self.kind {
                Kind::Deploy { traffic, .. } | Kind::Rollback { traffic, .. } => traffic.as_deref().cloned(),
            },
            blue_green: match &self.kind {
                Kind::Deploy { cmd, .. } => cmd.spec.blue_green.clone(),
                Kind::Rollback { blue_green, .. } => blue_green.clone(),
            },
        }
    }

    pub fn emit(&self, body: EventBody) {
        // No receiver is fine: nobody is watching.
        let _ = self.tx.send(Event {
            rollout_id: self.id.clone(),
            body,
        });
    }

    pub fn note(&self, message: String) {
        tracing::info!(rollout = %self.id, "{message}");
        self.emit(EventBody::Note(message));
    }

    /// Runs the rollout to its end and records how it ended.
    pub async fn run(self, engine: Arc<Engine>, resumed: bool, plan: Option<Plan>) {
        if let Some(plan) = plan {
            let notes = plan.notes.clone();
            self.emit(EventBody::Plan(plan));
            for n in notes {
                self.note(n);
            }
        }
        if resumed {
            self.await_hosts(&engine).await;
        } else {
            engine.notifier.send(self.payload("rollout_started", None));
        }
        let done = match &self.kind {
            Kind::Deploy { .. } => self.run_deploy(&engine).await,
            Kind::Rollback { .. } => self.run_rollback(&engine).await,
        };
        let state = done.verdict.state();
        crate::metrics::get().rollout(self.kind.name(), state);
        let reason = done.reason.clone();
        persist(&engine, &self.id, "record the rollout's end", || {
            engine.store.finish_rollout(&self.id, state, &reason)
        })
        .await;
        engine.release_slot(&self.app, &self.env);
        engine.live.lock().unwrap().remove(&self.id);
        tracing::info!(rollout = %self.id, state, reason = %done.reason, "rollout finished");
        let event = match done.verdict {
            Verdict::Succeeded => "rollout_succeeded",
            Verdict::RolledBack => "rollout_rolled_back",
            Verdict::Cancelled => "rollout_cancelled",
            Verdict::Failed => "rollout_failed",
        };
        engine.notifier.send(self.payload(event, Some(&done)));
        self.emit(EventBody::Done(done));
    }

    /// The webhook payload for `event`.
    fn payload(&self, event: &'static str, done: Option<&Done>) -> crate::webhooks::Payload {
        let version = match &self.kind {
            Kind::Deploy { cmd, .. } => cmd.version.to_string(),
            Kind::Rollback { to, .. } => to.as_ref().map_or("previous".into(), |v| v.to_string()),
        };
        let kind = self.kind.name();
        let what = format!("{kind} of {} {version} to {} (rollout {})", self.app, self.env, self.id);
        let names = |hosts: &[HostName]| hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        let text = match (event, done) {
            ("rollout_started", _) => format!("convoy: {what} started by {}", self.operator),
            ("rollout_succeeded", _) => format!("convoy: {what} succeeded"),
            ("rollout_cancelled", Some(d)) => format!("convoy: {what} cancelled: {}", d.reason),
            (_, Some(d)) => {
                let mut t = format!("convoy: {what} failed: {}", d.reason);
                if !d.rolled_back_hosts.is_empty() {
                    t.push_str(&format!("; rolled back {}", names(&d.rolled_back_hosts).join(", ")));
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
            failed_hosts: done.map(|d| names(&d.failed_hosts)).unwrap_or_default(),
            rolled_back_hosts: done.map(|d| names(&d.rolled_back_hosts)).unwrap_or_default(),
            at_unix_ms: convoy_common::ops::now_unix_ms(),
            text,
        }
    }

    /// Records a state an operator sees in history while the rollout waits.
    async fn set_state(&self, engine: &Engine, state: &str) {
        persist(engine, &self.id, "record the rollout's state", || {
            engine.store.set_rollout_state(&self.id, state)
        })
        .await;
    }

    /// Before a batch: waits while paused, awaiting approval or
    /// promotion, or while its environment is frozen; says why when aborted.
    async fn wait_for_go(&self, engine: &Engine) -> Result<(), String> {
        let mut control = self.control.subscribe();
        let mut freezes = engine.freeze_changes();
        // What it waited for last, to say once what it waits for.
        let mut waited: Option<(&'static str, String)> = None;
        loop {
            let now = control.borrow_and_update().clone();
            freezes.borrow_and_update();
            let mut expiry = None;
            let (state, note) = match now {
                Control::Run => match self.held_by_freeze(engine) {
                    None => {
                        if let Some((was, _)) = waited {
                            self.set_state(engine, "running").await;
                            match was {
                                "paused" => self.note("resumed".into()),
                                "awaiting_promotion" => self.note("promoted".into()),
                                "frozen" => self.note(format!("{} is no longer frozen; going on", self.env)),
                                _ => {}
                            }
                        }
                        return Ok(());
                    }
                    Some(f) => {
                        expiry = f.until_ms;
                        (
                            "frozen",
                            format!(
                                "{}; waiting before the next batch (`convoy abort {}` stops here)",
                                super::freeze::describe(&f),
                                self.id
                            ),
                        )
                    }
                },
                Control::Abort(who) => return Err(format!("aborted by {who}")),
                Control::AwaitApproval(requester) => (
                    "awaiting_approval",
                    format!(
                        "{} needs approval: waiting for an operator other than {requester} to run `convoy approve {}`",
                        self.env, self.id
                    ),
                ),
                Control::AwaitPromote(stage) => (
                    "awaiting_promotion",
                    format!(
                        "stage {stage} is done; waiting for `convoy promote {}` (or abort)",
                        self.id
                    ),
                ),
                Control::Pause(who) => ("paused", format!("paused by {who}; waiting for resume or abort")),
            };
            if waited.as_ref().is_none_or(|(s, n)| *s != state || *n != note) {
                self.note(note.clone());
                self.set_state(engine, state).await;
                waited = Some((state, note));
            }
            let until_expiry = async {
                match expiry {
                    Some(ms) => {
                        let left = ms - convoy_common::ops::now_unix_ms();
                        tokio::time::sleep(Duration::from_millis(left.max(0) as u64)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = control.changed() => {
                    if changed.is_err() {
                        return Err("the rollout's control went away".into());
                    }
                }
                _ = freezes.changed() => {}
                () = until_expiry => {}
            }
        }
    }

    /// The freeze that holds this rollout before its next batch: deploys
    /// wait (unless an admin's hotfix passed it); rollbacks never do.
    fn held_by_freeze(&self, engine: &Engine) -> Option<super::store::Freeze> {
        match &self.kind {
            Kind::Deploy {
                passes_freeze: false, ..
            } => engine.frozen(&self.env),
            _ => None,
        }
    }

    async fn await_hosts(&self, engine: &Engine) {
        let deadline = tokio::time::Instant::now() + engine.cfg.reconnect_grace;
        loop {
            let missing: Vec<&HostName> = self.targets.iter().filter(|h| !engine.fleet.connected(h)).collect();
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

    fn vanish(&self) -> Vanish {
        match &self.kind {
            Kind::Deploy { vanish, .. } => *vanish,
            Kind::Rollback { .. } => Vanish::default(),
        }
    }

    async fn run_deploy(&self, engine: &Engine) -> Done {
        let Kind::Deploy {
            cmd,
            strategy,
            budget,
            rollback_on_halt,
            group,
            manual_promote,
            analysis,
            preflight,
            ..
        } = &self.kind
        else {
            unreachable!("run_deploy runs deploys")
        };
        let mut halt = Halt {
            failed: vec![],
            moved: vec![],
            reached: 0,
            restore_failed: false,
            activated_any: false,
        };
        // Approval comes before anything is sent to any host.
        if let Err(cause) = self.wait_for_go(engine).await {
            return Done::untouched(
                Verdict::Cancelled,
                format!("{cause} before it started; no host was touched"),
                &self.targets,
            );
        }

        // Pre-flight: every target must be able to take the release (a
        // resumed rollout did this before it first moved).
        if let Some(cmd) = preflight.as_ref().filter(|_| self.recorded.is_empty()) {
            self.note(format!("pre-flight on {} host(s)", self.targets.len()));
            let results = engine.preflight(&self.reference(), cmd, &self.targets).await;
            if let Some(reason) = super::preflight::refusal(&results) {
                self.emit(EventBody::Preflight(results));
                return Done::untouched(Verdict::Failed, reason, &self.targets);
            }
            self.note(format!("pre-flight passed on {} host(s)", results.len()));
        }

        // Metric gates: every query is checked, and its value before the
        // rollout recorded, before any byte moves.
        let mut gates = match analysis {
            Some(spec) => match self.start_analysis(engine, spec, &cmd.version).await {
                Ok(running) => Some(running),
                Err(why) => {
                    let reason = format!("refused before any host was touched: analysis: {why}");
                    return Done::untouched(Verdict::Failed, reason, &self.targets);
                }
            },
            None => None,
        };

        // ── pre-stage everywhere, bounded ──
        let sent_before: Vec<u64> = self.targets.iter().map(|h| engine.fleet.bytes_sent(h)).collect();
        self.note(format!("pre-staging {} on {} host(s)", cmd.version, self.targets.len()));
        let permits = &Semaphore::new(engine.cfg.prestage_parallel);
        let staged = join_all(self.targets.iter().map(|h| async move {
            let _permit = permits.acquire().await.expect("semaphore open");
            let op = OpId::new(&self.id, OpKind::Stage, h);
            let mut c = ActivateCommand::clone(cmd);
            c.op_id = op.to_string();
            (h.clone(), self.run_op(engine, &op, Command::Stage(c)).await)
        }))
        .await;
        for (h, r) in staged {
            if let Err(reason) = verdict(r) {
                halt.failed.push((h, format!("pre-staging: {reason}")));
            }
        }
        if halt.failed.len() > *budget {
            return self.halt(engine, None, halt, *rollback_on_halt).await;
        }
        // Egress: what the controller streamed to the targets meanwhile.
        let sent: Vec<u64> = self
            .targets
            .iter()
            .zip(&sent_before)
            .map(|(h, before)| engine.fleet.bytes_sent(h).saturating_sub(*before))
            .collect();
        let total: u64 = sent.iter().sum();
        for (h, bytes) in self.targets.iter().zip(&sent) {
            if !halt.failed.iter().any(|(f, _)| f == h) {
                crate::metrics::get().stage_egress.observe(*bytes as f64);
            }
        }
        let egress = match (sent.iter().min(), sent.iter().max()) {
            (Some(lo), Some(hi)) if total > 0 && lo == hi => {
                format!("; the controller sent them {} ({} each)", mib(total), mib(*lo))
            }
            (Some(lo), Some(hi)) if total > 0 => format!(
                "; the controller sent them {} ({} to {} per host)",
                mib(total),
                mib(*lo),
                mib(*hi)
            ),
            _ => String::new(),
        };
        self.note(format!(
            "pre-staged on {} host(s){egress}",
            self.targets.len() - halt.failed.len()
        ));

        // ── batches ──
        let batches = strategy.batches_after_group(self.targets.len(), *group);
        let rollout = self.reference();
        for (i, (range, bake)) in batches.iter().enumerate() {
            halt.reached = range.start;
            if let Err(cause) = self.wait_for_go(engine).await {
                return self.halt(engine, Some(cause), halt, *rollback_on_halt).await;
            }
            let hosts: Vec<&HostName> = self.targets[range.clone()]
                .iter()
                .filter(|h| !halt.failed.iter().any(|(f, _)| f == *h))
                .collect();
            let names: Vec<&str> = hosts.iter().map(|h| h.as_str()).collect();
            self.note(format!("batch {}/{}: {}", i + 1, batches.len(), names.join(", ")));
            halt.activated_any |= !hosts.is_empty();
            if let Some(g) = &gates {
                // Measured from their activation on: the health window counts.
                let mut moved = halt.moved.clone();
                moved.extend(hosts.iter().map(|h| (*h).clone()));
                g.set_sides(self.sides(moved, &halt));
            }
            let rollout = &rollout;
            let results = join_all(hosts.iter().map(|h| async move {
                let op = OpId::new(&self.id, OpKind::Activate, h);
                let r = self.activate_host(engine, rollout, &op, cmd).await;
                ((*h).clone(), r)
            }))
            .await;
            halt.reached = range.end;
            for (h, r) in results {
                if could_not_restore(&r) {
                    halt.restore_failed = true;
                }
                match verdict(r) {
                    Ok(()) => halt.moved.push(h),
                    Err(reason) => halt.failed.push((h, reason)),
                }
            }
            if halt.failed.len() > *budget {
                return self.halt(engine, None, halt, *rollback_on_halt).await;
            }
            if let Some(g) = &mut gates {
                g.set_sides(self.sides(halt.moved.clone(), &halt));
                self.note(format!(
                    "batch {}: waiting for a passing round of metric gates (every {})",
                    i + 1,
                    humantime::format_duration(g.interval)
                ));
                if let Err(why) = g.passed().await {
                    let cause = format!("metric gates after batch {}: {why}", i + 1);
                    return self.halt(engine, Some(cause), halt, *rollback_on_halt).await;
                }
                self.note(format!("batch {}: metric gates passed", i + 1));
            }
            // A resumed rollout whose next batch already started has baked
            // and been promoted before the controller restarted.
            let next_started = batches.get(i + 1).is_some_and(|(next, _)| {
                self.targets[next.clone()]
                    .iter()
                    .any(|h| self.recorded.contains_key(&OpId::new(&self.id, OpKind::Activate, h)))
            });
            if !bake.is_zero() && !next_started {
                if let Err(why) = self.bake(*bake, gates.as_mut()).await {
                    let cause = format!("metric gates during the bake of batch {}: {why}", i + 1);
                    return self.halt(engine, Some(cause), halt, *rollback_on_halt).await;
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
        if let Some(g) = gates.as_mut().filter(|g| !g.watch_after.is_zero()) {
            self.note(format!(
                "every batch is done; watching the metric gates for {}",
                humantime::format_duration(g.watch_after)
            ));
            let watch = g.watch_after;
            if let Err(why) = self.bake_for(watch, Some(g)).await {
                let cause = format!("metric gates while watching after the last batch: {why}");
                return self.halt(engine, Some(cause), halt, *rollback_on_halt).await;
            }
        }
        let reason = if halt.failed.is_empty() {
            String::new()
        } else {
            format!(
                "{} host(s) failed within the failure budget of {budget}",
                halt.failed.len()
            )
        };
        Done::succeeded(
            reason,
            halt.failed.into_iter().map(|(h, _)| h).collect(),
            halt.restore_failed,
        )
    }

    /// Waits `bake`; an abort does not wait for it to end, and a breach of
    /// the metric gates ends it with the reason.
    async fn bake(&self, bake: Duration, gates: Option<&mut Running>) -> Result<(), String> {
        self.note(format!("baking for {}", humantime::format_duration(bake)));
        self.bake_for(bake, gates).await
    }

    async fn bake_for(&self, bake: Duration, gates: Option<&mut Running>) -> Result<(), String> {
        let mut control = self.control.subscribe();
        let bake_end = tokio::time::sleep(bake);
        tokio::pin!(bake_end);
        let breach = async {
            match gates {
                Some(g) => g.breached().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(breach);
        loop {
            tokio::select! {
                _ = &mut bake_end => return Ok(()),
                why = &mut breach => return Err(why),
                changed = control.changed() => {
                    if changed.is_err() || matches!(*control.borrow(), Control::Abort(_)) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Which targets are measured as moved, and which are the baseline:
    /// those neither moved nor failed.
    fn sides(&self, moved: Vec<HostName>, halt: &Halt) -> Sides {
        let baseline = self
            .targets
            .iter()
            .filter(|h| !moved.contains(h) && !halt.failed.iter().any(|(f, _)| f == *h))
            .cloned()
            .collect();
        Sides { moved, baseline }
    }

    /// Checks the gates' queries, records their values before the
    /// rollout (or takes back those recorded, when resuming) and starts
    /// measuring.
    async fn start_analysis(&self, engine: &Engine, spec: &AnalysisSpec, version: &Version) -> Result<Running, String> {
        let Some(source) = engine.metrics.clone() else {
            return Err("the controller has no prometheus_url to measure the app's metric gates on".into());
        };
        let subject = Subject {
            app: self.app.to_string(),
            env: self.env.clone(),
            version: version.to_string(),
        };
        let mut analyzer = Analyzer::new(spec.clone(), subject, source);
        let sink = Sink {
            store: engine.store.clone(),
            events: self.tx.clone(),
            rollout_id: self.id.clone(),
        };
        let recorded = engine.store.measurements(&self.id).await.map_err(|e| e.to_string())?;
        if recorded
            .iter()
            .any(|m| m.judgement == convoy_common::analysis::Judgement::Before)
        {
            analyzer.restore_before(&recorded);
        } else {
            for m in analyzer.prepare(&self.targets).await? {
                sink.record(&m).await;
            }
        }
        let names: Vec<&str> = spec.metrics.iter().map(|m| m.name.as_str()).collect();
        self.note(format!(
            "metric gates {} measured every {}",
            names.join(", "),
            humantime::format_duration(spec.interval)
        ));
        Ok(Running::start(analyzer, sink))
    }

    /// One host's activation with the host steps around it.
    async fn activate_host(
        &self,
        engine: &Engine,
        rollout: &RolloutRef,
        op: &OpId,
        cmd: &ActivateCommand,
    ) -> Result<HostOutcome, String> {
        let host = op.host();
        let mut c = ActivateCommand::clone(cmd);
        c.op_id = op.to_string();
        if let Kind::Deploy {
            config_revision: Some(rev),
            ..
        } = &self.kind
        {
            if !self.recorded.contains_key(op) {
                c.config = Some(
                    engine
                        .render_config(&self.app, &self.env, &cmd.version, *rev, host)
                        .await
                        .map_err(|e| format!("configuration of {host}: {e}"))?,
                );
            }
        }
        if let Some(bg) = &rollout.blue_green {
            let switch = OpId::new(&self.id, OpKind::Switch, host);
            return self
                .slot_host(engine, rollout, bg, op, Command::Activate(c), &switch, &cmd.version)
                .await;
        }
        // A resumed rollout reuses what it recorded, steps included.
        if let Some(done) = self.recorded.get(op) {
            return Ok(done.clone());
        }
        self.traffic_step(engine, op, engine.steps.before_activate(rollout, host).await)
            .await
            .map_err(|e| format!("before activating {host}: {e}"))?;
        let r = self.run_op(engine, op, Command::Activate(c)).await;
        let succeeded = matches!(&r, Ok(o) if o.outcome.is_success());
        let after = engine.steps.after_activate(rollout, host, succeeded).await;
        if let Err(e) = self.traffic_step(engine, op, after).await {
            return Err(format!("after activating {host}: {e}"));
        }
        r
    }

    /// Blue-green on one host: the host readies a slot with `version`
    /// (`prepare`: an activation, or a rollback that finds its release
    /// still warm), traffic switches to that slot, and the host makes it
    /// live (`switch`). Traffic that cannot switch stays on the live slot,
    /// and the readied one stops.
    #[allow(clippy::too_many_arguments)]
    async fn slot_host(
        &self,
        engine: &Engine,
        rollout: &RolloutRef,
        bg: &BlueGreen,
        op: &OpId,
        prepare: Command,
        switch: &OpId,
        version: &Version,
    ) -> Result<HostOutcome, String> {
        let host = op.host();
        if let Some(done) = self.recorded.get(switch) {
            return Ok(done.clone());
        }
        let slots = match self.recorded.get(op) {
            Some(done) => done.slots.clone(),
            None => engine.fleet_slots(host, &self.app),
        };
        if slots.iter().all(|s| s.state != SlotState::Live) {
            // Nothing is live yet: no slot takes traffic before a switch.
            self.traffic_step(engine, op, engine.steps.slots(rollout, host, SlotAction::Isolate).await)
                .await
                .map_err(|e| format!("before activating {host}: {e}"))?;
        }
        let readied = self.run_op(engine, op, prepare).await?;
        if !readied.outcome.is_success() {
            return Ok(readied);
        }
        let slots = if readied.slots.is_empty() {
            engine.fleet_slots(host, &self.app)
        } else {
            readied.slots.clone()
        };
        let live = slots.iter().find(|s| s.state == SlotState::Live);
        let to = match live {
            // Already live there: traffic is made sure of all the same.
            Some(l) if &l.version == version => l.slot,
            _ => match slots
                .iter()
                .find(|s| &s.version == version && s.state == SlotState::Ready)
            {
                Some(r) => r.slot,
                None => return Err(format!("{host} reports no slot ready with {version}")),
            },
        };
        // The other slot, whatever it does: a switch leaves it without
        // traffic (made sure of again when `to` was live already).
        let from = slots.iter().map(|s| s.slot).find(|s| *s != to);
        let promote = |op: &OpId, slot| {
            Command::Promote(PromoteCommand {
                op_id: op.to_string(),
                app: self.app.clone(),
                slot,
                keep_warm: bg.keep_warm,
            })
        };
        // Keeping the live slot is recorded apart from the switch: a host
        // whose switch op succeeded is a host that moved.
        let keep = OpId::new(&self.id, OpKind::SwitchBack, host);
        let moved = engine.steps.slots(rollout, host, SlotAction::Switch { from, to }).await;
        match self.traffic_step(engine, switch, moved).await {
            Ok(()) => {
                let promoted = self.run_op(engine, switch, promote(switch, to)).await?;
                Ok(if promoted.outcome.is_success() {
                    readied
                } else {
                    promoted
                })
            }
            Err(e) => {
                let kept = match live.map(|l| l.slot).filter(|l| *l != to) {
                    Some(live) => match verdict(self.run_op(engine, &keep, promote(&keep, live)).await) {
                        Ok(()) => format!("traffic stays on slot {live}; slot {to} stopped"),
                        Err(why) => format!("traffic stays on slot {live}; stopping slot {to}: {why}"),
                    },
                    None => "no slot takes traffic".to_owned(),
                };
                Err(format!("switching {host} to slot {to}: {e}; {kept}"))
            }
        }
    }

    /// Records what a host step did as a `traffic` event of the host.
    async fn traffic_step(&self, engine: &Engine, op: &OpId, done: Result<String, String>) -> Result<(), String> {
        let (kind, message) = match &done {
            Ok(m) if m.is_empty() => return Ok(()),
            Ok(m) => (EventKind::Succeeded, m.clone()),
            Err(e) => (EventKind::Failed, e.clone()),
        };
        self.record_event(
            engine,
            op.host(),
            StepEvent {
                op_id: op.to_string(),
                app: self.app.clone(),
                step: Step::Traffic,
                kind,
                message,
                at_unix_ms: convoy_common::ops::now_unix_ms(),
            },
        )
        .await;
        done.map(drop)
    }

    /// Stops a deploy and, unless told not to, rolls the hosts it moved
    /// back to their previous release.
    async fn halt(&self, engine: &Engine, cause: Option<String>, halt: Halt, rollback: bool) -> Done {
        let Halt {
            failed,
            mut moved,
            reached,
            restore_failed,
            activated_any,
        } = halt;
        let mut rollback_failed = restore_failed;
        let (first, reason) = match (&cause, failed.first()) {
            (Some(c), _) => (None, c.clone()),
            (None, Some((h, r))) => (Some(h.clone()), r.clone()),
            (None, None) => (None, "halted".into()),
        };
        // A host counted as failed because it vanished may have come back
        // since and reported that it did activate: it moved too.
        // (A blue-green host moved once its traffic switched.)
        let moved_by = match self.reference().blue_green {
            Some(_) => OpKind::Switch,
            None => OpKind::Activate,
        };
        for (h, _) in &failed {
            let op = OpId::new(&self.id, moved_by, h);
            if matches!(engine.store.host_outcome(&self.id, &op.to_string()).await, Ok(Some(o)) if o.is_success()) {
                moved.push(h.clone());
            }
        }
        let mut rolled_back = Vec::new();
        if rollback && !moved.is_empty() {
            let why = if cause.is_some() {
                "halted"
            } else {
                "failure budget exceeded"
            };
            self.note(format!("{why}; rolling back {} moved host(s) in parallel", moved.len()));
            let results = join_all(moved.iter().map(|h| async move {
                let r = match self.before.get(h).cloned().flatten() {
                    Some(to) => {
                        self.rollback_host(engine, &OpId::new(&self.id, OpKind::Rollback, h), Some(to))
                            .await
                    }
                    None => Err("no previous release to go back to".to_owned()),
                };
                (h.clone(), r)
            }))
            .await;
            for (h, r) in results {
                match verdict(r) {
                    Ok(()) => rolled_back.push(h),
                    Err(e) => {
                        rollback_failed = true;
                        tracing::error!(rollout = %self.id, host = %h, error = %e, "rollback failed");
                    }
                }
            }
        }
        Done {
            verdict: if rolled_back.is_empty() {
                Verdict::Failed
            } else {
                Verdict::RolledBack
            },
            failed_host: first,
            reason,
            untouched_hosts: self.targets[reached.min(self.targets.len())..]
                .iter()
                .filter(|h| !failed.iter().any(|(f, _)| f == *h))
                .cloned()
                .collect(),
            failed_hosts: failed.into_iter().map(|(h, _)| h).collect(),
            rolled_back_hosts: rolled_back,
            rollback_failed,
            nothing_changed: !activated_any,
        }
    }

    /// A manual rollback, batch by batch as its strategy says (all at once
    /// by default); past its failure budget it halts, and the hosts it did
    /// not reach stay as they are.
    async fn run_rollback(&self, engine: &Engine) -> Done {
        let Kind::Rollback {
            to, strategy, budget, ..
        } = &self.kind
        else {
            unreachable!("run_rollback runs rollbacks")
        };
        let mut failed: Vec<(HostName, String)> = Vec::new();
        let mut restore_failed = false;
        let batches = strategy.batches(self.targets.len());
        for (i, (range, bake)) in batches.iter().enumerate() {
            let halt = |failed: Vec<(HostName, String)>, cause: Option<String>, restore_failed: bool| {
                let first = failed.first().map(|(h, _)| h.clone());
                let reason = cause.unwrap_or_else(|| failed.first().map(|(_, r)| r.clone()).unwrap_or_default());
                Done {
                    verdict: Verdict::Failed,
                    failed_host: first,
                    reason,
                    untouched_hosts: self.targets[range.end.min(self.targets.len())..].to_vec(),
                    failed_hosts: failed.into_iter().map(|(h, _)| h).collect(),
                    rolled_back_hosts: vec![],
                    rollback_failed: restore_failed,
                    nothing_changed: false,
                }
            };
            if let Err(cause) = self.wait_for_go(engine).await {
                let mut done = halt(failed, Some(cause), restore_failed);
                done.untouched_hosts = self.targets[range.start..].to_vec();
                done.nothing_changed = i == 0;
                return done;
            }
            if batches.len() > 1 {
                let names: Vec<&str> = self.targets[range.clone()].iter().map(|h| h.as_str()).collect();
                self.note(format!("batch {}/{}: {}", i + 1, batches.len(), names.join(", ")));
            }
            let results = join_all(self.targets[range.clone()].iter().map(|h| async move {
                let op = OpId::new(&self.id, OpKind::Rollback, h);
                (h.clone(), self.rollback_host(engine, &op, to.clone()).await)
            }))
            .await;
            for (h, r) in results {
                if could_not_restore(&r) {
                    restore_failed = true;
                }
                if let Err(e) = verdict(r) {
                    failed.push((h, e));
                }
            }
            if failed.len() > *budget {
                return halt(failed, None, restore_failed);
            }
            if !bake.is_zero() && i + 1 < batches.len() {
                // Without gates a bake only ends.
                let _ = self.bake(*bake, None).await;
            }
        }
        let reason = if failed.is_empty() {
            String::new()
        } else {
            format!("{} host(s) failed within the failure budget of {budget}", failed.len())
        };
        Done::succeeded(reason, failed.into_iter().map(|(h, _)| h).collect(), restore_failed)
    }

    /// Switches the host `op` names back to `to` (its previous release
    /// when `None`).
    pub async fn rollback_host(&self, engine: &Engine, op: &OpId, to: Option<Version>) -> Result<HostOutcome, String> {
        let rollout = self.reference();
        let bg_to = match (&rollout.blue_green, &to) {
            (Some(bg), Some(v)) => Some((bg.clone(), v.clone())),
            // Without a named release, the previous one: the other slot's.
            (Some(bg), None) => engine
                .fleet_slots(op.host(), &self.app)
                .iter()
                .find(|s| s.state != SlotState::Live)
                .map(|s| (bg.clone(), s.version.clone())),
            (None, _) => None,
        };
        let c = RollbackCommand {
            op_id: op.to_string(),
            app: self.app.clone(),
            to,
        };
        match bg_to {
            Some((bg, version)) => {
                let switch = OpId::new(&self.id, OpKind::SwitchBack, op.host());
                self.slot_host(engine, &rollout, &bg, op, Command::Rollback(c), &switch, &version)
                    .await
            }
            None => self.run_op(engine, op, Command::Rollback(c)).await,
        }
    }

    /// Sends one command to the host `op` names and waits for its result,
    /// recording and forwarding its events; the host's timeout and what
    /// happens while it is away follow the rollout's vanish policy.
    async fn run_op(&self, engine: &Engine, op: &OpId, command: Command) -> Result<HostOutcome, String> {
        if let Some(done) = self.recorded.get(op) {
            return Ok(done.clone());
        }
        // Nothing is sent for a rollout another controller took over (a
        // controller paused past its lease comes back here).
        persist(engine, &self.id, "check the rollout's lease before a command", || {
            engine.store.check_lease(&self.id)
        })
        .await;
        let OpWait { mut events, mut result } = engine.fleet.dispatch(op, command).await;
        let ended = self.wait_op(engine, op, &mut events, &mut result).await;
        // No result reaches this operation's waiter after this: one that
        // comes later is a late result, reconciled by `late_result`. One
        // that came while the wait gave up (a timeout, a vanish deadline,
        // an abort) is taken here: it is this operation's outcome and must
        // not be lost.
        engine.fleet.forget(op);
        match (ended, result.try_recv()) {
            (Ok(r), _) | (Err(_), Ok(r)) => Ok(self.accept(engine, op.host(), r, &mut events).await),
            (Err(why), Err(_)) => Err(why),
        }
    }

    /// Records a host's result (after the events it sent before it).
    async fn accept(
        &self,
        engine: &Engine,
        host: &HostName,
        r: OpReport,
        events: &mut tokio::sync::mpsc::Receiver<StepEvent>,
    ) -> HostOutcome {
        while let Ok(ev) = events.try_recv() {
            self.record_event(engine, host, ev).await;
        }
        crate::metrics::get().host_result(r.outcome);
        persist(engine, &self.id, "record a host's result", || {
            engine.store.record_host_result(&self.id, host, &r)
        })
        .await;
        let outcome = HostOutcome::from(&r);
        self.emit(EventBody::Result {
            host: host.clone(),
            report: Box::new(r),
        });
        outcome
    }

    /// Waits for the result of `op`, forwarding its events; gives up after
    /// the host's timeout, or as the vanish policy and an abort say.
    async fn wait_op(
        &self,
        engine: &Engine,
        op: &OpId,
        events: &mut tokio::sync::mpsc::Receiver<StepEvent>,
        result: &mut tokio::sync::oneshot::Receiver<OpReport>,
    ) -> Result<OpReport, String> {
        let host = op.host();
        let vanish = self.vanish();
        let mut control = self.control.subscribe();
        let host_timeout = engine.cfg.host_timeout;
        let mut deadline = tokio::time::Instant::now() + host_timeout;
        // While the host is away: since when, and how much of its time was left.
        let mut away: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let now = tokio::time::Instant::now();
            if !engine.fleet.connected(host) {
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
                return Err(format!(
                    "{host} did not finish within {}",
                    humantime::format_duration(host_timeout)
                ));
            }
            // Wakes at least twice a second to notice a host going away.
            let tick = tokio::time::sleep(Duration::from_millis(500).min(deadline - now));
            tokio::select! {
                biased;
                r = &mut *result => {
                    if away.take().is_some() {
                        self.note(format!("{host} is back"));
                    }
                    return r.map_err(|_| "the controller stopped waiting for this operation".to_owned());
                }
                Some(ev) = events.recv() => {
                    if away.take().is_some() {
                        self.note(format!("{host} is back"));
                    }
                    self.record_event(engine, host, ev).await;
                }
                _ = tick => {}
            }
        }
    }

    async fn record_event(&self, engine: &Engine, host: &HostName, ev: StepEvent) {
        persist(engine, &self.id, "record an event", || {
            engine.store.record_event(&self.id, host, &ev)
        })
        .await;
        self.emit(EventBody::Host {
            host: host.clone(),
            event: ev,
        });
    }
}

/// Writes a rollout's record (or checks its lease), waiting while the
/// database is unreachable (a restart, a failover): the rollout holds at
/// this step and goes on when it is back, so nothing it did goes
/// unrecorded. A write refused because another controller took the
/// rollout over stops the rollout's task right here: this controller
/// acts on it no more. Other failures are logged and not retried.
async fn persist<'a, F, Fut>(engine: &Engine, rollout: &str, what: &str, write: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = super::store::Result<()>> + 'a,
{
    let mut waited = false;
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match write().await {
            Ok(()) => {
                if waited {
                    tracing::warn!(%rollout, "database reachable again; the rollout goes on ({what})");
                }
                return;
            }
            Err(e) if e.is_transient() => {
                if !waited {
                    tracing::warn!(%rollout, error = %e, "cannot {what}: the rollout waits for the database");
                }
                waited = true;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) if e.is_fenced() => {
                tracing::warn!(%rollout, error = %e, "could not {what}");
                // The task is cancelled (now, or already by the lease
                // round): it ends at this await, before any further step.
                engine.lost(rollout);
                std::future::pending::<()>().await;
            }
            Err(e) => {
                tracing::error!(%rollout, error = %e, "could not {what}");
                return;
            }
        }
    }
}

/// Where a deploy stands when it halts.
struct Halt {
    failed: Vec<(HostName, String)>,
    moved: Vec<HostName>,
    /// Targets before this index were reached.
    reached: usize,
    restore_failed: bool,
    /// Some host was sent its activation.
    activated_any: bool,
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

/// Bytes as MiB with one decimal.
/// Bytes in MiB, or KiB below one MiB (a delta is often that small).
fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    }
}
