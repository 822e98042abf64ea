//! The activation state machine:
//!
//! stage → before_install → backup → switch → unit files → after_install →
//! before_activate → restart → after_activate → check → validate → commit
//!
//! and, on any failure after the switch, restore: before_rollback, switch
//! back, unit files and backup put back, restart, check the old release.
//!
//! The journal is saved (fsync) before every step that changes what runs,
//! so `recover_all` can always bring an interrupted activation back to a
//! whole release: the old one, restarted and checked.
//!
//! Here: the activation and what it shares; `stage.rs`: fetch, verify and
//! unpack; `restore.rs`: putting the previous release back, and recovery
//! at start.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use convoy_common::archive::{self, Limits};
use convoy_common::fsutil;
use convoy_common::ops::{
    ActivateCommand, AppStatus, EventKind, Health, OpReport, Outcome, RollbackCommand, Step, StepEvent,
};
use convoy_common::spec::{HookPoint, InstallSpec};
use convoy_common::{AppName, Version};
use tonic::transport::Channel;

use crate::agent::Agent;
use crate::crash::crash_point;
use crate::fetch::{self, FetchError};
use crate::store::{AppDirs, Inflight, Journal, Phase, ReleaseMeta};
use crate::{backup, delta, health, hooks, switch, units};

mod configure;
mod restore;
mod slots;
mod stage;

pub use restore::recover_all;
use restore::restore;
pub use slots::{keep_warm, promote, HOUSEKEEPING};
use stage::clean_staging;
pub use stage::stage_only;

/// Emits step events for one operation.
struct Op<'a> {
    agent: &'a Agent,
    op_id: String,
    app: AppName,
}

impl Op<'_> {
    fn event(&self, step: Step, kind: EventKind, message: impl Into<String>) {
        self.agent.reporter.event(StepEvent {
            op_id: self.op_id.clone(),
            app: self.app.clone(),
            step,
            kind,
            message: message.into(),
            at_unix_ms: convoy_common::ops::now_unix_ms(),
        });
    }
}

/// Runs one activation to its end and returns the report (also stored in
/// the journal as `last_op`). The caller holds the app's operation lock.
pub async fn activate(agent: Arc<Agent>, channel: Channel, base: ActivateCommand) -> OpReport {
    // With a configuration, the activation goes to the tree of the release
    // and that revision (`store::tree_version`); `base` stages the release.
    let cmd = match &base.config {
        Some(c) => ActivateCommand {
            version: crate::store::tree_version(&base.version, c.revision),
            ..base.clone()
        },
        None => base.clone(),
    };
    let app = cmd.spec.app.clone();
    let spec = &cmd.spec;
    let op = Op {
        agent: &agent,
        op_id: cmd.op_id.clone(),
        app: app.clone(),
    };
    let mut j = match agent.store.load_journal(&app) {
        Ok(j) => j,
        Err(e) => return refuse(&agent, &cmd, format!("cannot read journal: {e}")),
    };
    if let Some(last) = j.last_op.as_ref().filter(|r| r.op_id == cmd.op_id) {
        return answer_again(&agent, last);
    }
    if let Some(bg) = spec.blue_green.clone() {
        return slots::activate_slot(&agent, &channel, (&base, &cmd), j, &bg, &op).await;
    }
    if let Err(reason) = switch::check_install_path(spec) {
        return refuse(&agent, &cmd, reason);
    }
    let dirs = match agent.store.ensure_app(&app) {
        Ok(d) => d,
        Err(e) => return refuse(&agent, &cmd, e.to_string()),
    };
    let from = j.current.clone();
    let to = cmd.version.clone();
    let meta = agent.store.release_meta(&app, &to);
    if from.as_ref() == Some(&to)
        && meta.as_ref().is_some_and(|m| m.digest == cmd.digest)
        && switch::live_version(spec).as_ref() == Some(&to)
    {
        op.event(
            Step::Commit,
            EventKind::Succeeded,
            format!("{to} is already current; nothing to do"),
        );
        return finish(
            &agent,
            &cmd,
            j,
            Outcome::Succeeded,
            String::new(),
            "already current".into(),
        );
    }

    // ── stage ──
    j.inflight = Some(Inflight {
        op_id: cmd.op_id.clone(),
        from: from.clone(),
        to: to.clone(),
        phase: Phase::Staging,
        spec: spec.clone(),
        backup: None,
        unit_snapshot: None,
        slot: None,
    });
    if let Err(e) = agent.store.save_journal(&app, &j) {
        return refuse(&agent, &cmd, e.to_string());
    }
    crash_point("stage-begin");
    op.event(
        Step::Stage,
        EventKind::Started,
        format!("{to}: {} bytes, sha256 {}", cmd.size, cmd.digest),
    );
    match configure::stage_tree(&agent, &channel, &base, &cmd, &dirs).await {
        Ok(msg) => op.event(Step::Stage, EventKind::Succeeded, msg),
        Err(reason) => {
            op.event(Step::Stage, EventKind::Failed, &reason);
            j.inflight = None;
            return finish(&agent, &cmd, j, Outcome::FailedRestored, reason, not_switched(&from));
        }
    }
    crash_point("after-stage");
    // ── before_install, backup, unit snapshot: nothing live changes yet ──
    let new_tree = dirs.release(&to);
    let prepared: Result<_, String> = async {
        run_hooks(
            &agent,
            &op,
            spec,
            HookPoint::BeforeInstall,
            &to,
            from.as_ref(),
            &new_tree,
        )
        .await?;
        let backup = take_backup(&op, spec, &dirs).await?;
        let shipped = units::shipped(&new_tree).map_err(|e| format!("unit files: {e}"))?;
        let snap = units::snapshot(&agent.unit_dir, &shipped, &j.unit_files)
            .map_err(|e| format!("reading unit files: {e}"))?;
        Ok((backup, shipped, snap))
    }
    .await;
    let (backup_path, shipped, snap) = match prepared {
        Ok(p) => p,
        Err(reason) => {
            j.inflight = None;
            return finish(&agent, &cmd, j, Outcome::FailedRestored, reason, not_switched(&from));
        }
    };
    if let Some(i) = j.inflight.as_mut() {
        i.backup = backup_path;
        i.unit_snapshot = Some(snap.clone());
    }

    // ── switch ──
    set_phase(&agent, &app, &mut j, Phase::Switched);
    crash_point("before-switch");
    let from_name = from.as_ref().map_or("nothing".into(), |v| v.to_string());
    op.event(Step::Switch, EventKind::Started, format!("{from_name} -> {to}"));
    if let Err(e) = switch::switch_to(spec, &dirs, &to) {
        let reason = format!("switching {} to {to}: {e}", spec.install_path.display());
        op.event(Step::Switch, EventKind::Failed, &reason);
        return restore(&agent, &op, &cmd, j, reason).await;
    }
    let live_tree = switch::tree_of(spec, &dirs, &to);
    op.event(
        Step::Switch,
        EventKind::Succeeded,
        format!("{} -> {to}", spec.install_path.display()),
    );
    crash_point("after-switch");

    // ── unit files, hooks, restart, check, validate ──
    let live: Result<String, String> = async {
        if units::install(&agent.unit_dir, &shipped, &snap).map_err(|e| format!("installing unit files: {e}"))? {
            agent
                .systemd
                .daemon_reload()
                .await
                .map_err(|e| format!("daemon-reload: {e}"))?;
            op.event(
                Step::Switch,
                EventKind::Info,
                format!("unit files installed: {}", join_keys(&shipped)),
            );
        }
        run_hooks(
            &agent,
            &op,
            spec,
            HookPoint::AfterInstall,
            &to,
            from.as_ref(),
            &live_tree,
        )
        .await?;
        run_hooks(
            &agent,
            &op,
            spec,
            HookPoint::BeforeActivate,
            &to,
            from.as_ref(),
            &live_tree,
        )
        .await?;
        for unit in &spec.units {
            op.event(Step::Restart, EventKind::Started, unit.clone());
            if let Err(e) = agent.systemd.restart(unit, agent.unit_timeout).await {
                let reason = format!("restart {unit}: {e}");
                op.event(Step::Restart, EventKind::Failed, &reason);
                return Err(reason);
            }
            op.event(Step::Restart, EventKind::Succeeded, unit.clone());
        }
        crash_point("after-restart");
        run_hooks(
            &agent,
            &op,
            spec,
            HookPoint::AfterActivate,
            &to,
            from.as_ref(),
            &live_tree,
        )
        .await?;
        op.event(Step::Check, EventKind::Started, describe_policy(spec));
        let msg = match check(&agent, &op, spec, &live_tree).await {
            Ok(msg) => msg,
            Err(reason) => {
                op.event(Step::Check, EventKind::Failed, &reason);
                return Err(format!("health check failed: {reason}"));
            }
        };
        op.event(Step::Check, EventKind::Succeeded, &msg);
        run_hooks(&agent, &op, spec, HookPoint::Validate, &to, from.as_ref(), &live_tree).await?;
        Ok(msg)
    }
    .await;
    if let Err(reason) = live {
        return restore(&agent, &op, &cmd, j, reason).await;
    }
    crash_point("after-check");

    // ── commit ──
    j.previous = from;
    j.current = Some(to.clone());
    j.last_known_good = Some(to.clone());
    j.health = Health::Healthy;
    j.health_reason = "passed health checks after activation".into();
    j.spec = Some(spec.clone());
    j.unit_files = shipped.keys().cloned().collect();
    j.push_history(&to);
    j.inflight = None;
    op.event(Step::Commit, EventKind::Succeeded, format!("{to} is current"));
    let report = finish(
        &agent,
        &cmd,
        j.clone(),
        Outcome::Succeeded,
        String::new(),
        String::new(),
    );
    crash_point("after-commit");
    apply_retention(&agent, &op, spec, &j, &dirs);
    report
}

/// Turns a rollback into an activation of a release this host holds, or
/// a refusal that says why it cannot be done here.
pub fn rollback_command(store: &crate::store::Store, cmd: &RollbackCommand) -> Result<ActivateCommand, Box<OpReport>> {
    let refusal =
        |version: Option<Version>, reason: String| Box::new(refusal(store, &cmd.op_id, &cmd.app, version, reason));
    let j = store.load_journal(&cmd.app).map_err(|e| refusal(None, e.to_string()))?;
    let spec = j
        .spec
        .clone()
        .ok_or_else(|| refusal(None, format!("{} is not installed on this host", cmd.app)))?;
    // A release named goes back to its newest tree that is not live (with
    // the configuration it last ran with); none named, to the previous tree.
    let to = match &cmd.to {
        Some(v) => j
            .history
            .iter()
            .rev()
            .find(|t| crate::store::release_of(t).0 == *v && Some(*t) != j.current.as_ref())
            .cloned()
            .unwrap_or_else(|| v.clone()),
        None => j
            .previous
            .clone()
            .ok_or_else(|| refusal(None, "no previous release to roll back to".into()))?,
    };
    let held = store.releases(&cmd.app).contains(&to) || switch::live_version(&spec).as_ref() == Some(&to);
    let meta = store.release_meta(&cmd.app, &to).filter(|_| held);
    let meta = meta.ok_or_else(|| refusal(Some(to.clone()), format!("this host no longer holds release {to}")))?;
    Ok(ActivateCommand {
        op_id: cmd.op_id.clone(),
        spec,
        version: to,
        digest: meta.digest,
        size: meta.size,
        signature: None,
        manifest: None,
        config: None,
    })
}

/// A command this host already carried out (a controller retrying after
/// its restart): report what happened again, without doing it again.
fn answer_again(agent: &Agent, last: &OpReport) -> OpReport {
    tracing::info!(op_id = %last.op_id, "operation already done; reporting its result again");
    // The journal keeps the result without the app's state (the journal
    // is that state): the answer says how the app is now. An answer with
    // no state would tell the controller the host holds nothing, no slot
    // included, and a blue-green switch would find no ready slot.
    let mut report = last.clone();
    report.state = state_now(&agent.store, &last.app);
    agent.reporter.result(&report);
    report
}

/// What a failure before the switch leaves running.
fn not_switched(current: &Option<Version>) -> String {
    match current {
        Some(v) => format!("nothing was switched; {v} still runs"),
        None => "nothing was switched".to_owned(),
    }
}

fn join_keys<V>(m: &std::collections::BTreeMap<String, V>) -> String {
    m.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// Keeps `keep_releases` releases and `keep_backups` backups.
fn apply_retention(agent: &Agent, op: &Op<'_>, spec: &InstallSpec, j: &Journal, dirs: &AppDirs) {
    match agent
        .store
        .prune_releases(&spec.app, j, spec.keep_releases as usize, None)
    {
        Ok(gone) if !gone.is_empty() => {
            let names: Vec<String> = gone.iter().map(|v| v.to_string()).collect();
            op.event(
                Step::Commit,
                EventKind::Info,
                format!("retention removed releases {}", names.join(", ")),
            );
        }
        Ok(_) => {}
        Err(e) => op.event(Step::Commit, EventKind::Info, format!("retention: {e}")),
    }
    if let Err(e) = backup::prune(&dirs.backups, spec.keep_backups as usize) {
        op.event(Step::Commit, EventKind::Info, format!("backup retention: {e}"));
    }
}

async fn take_backup(op: &Op<'_>, spec: &InstallSpec, dirs: &AppDirs) -> Result<Option<std::path::PathBuf>, String> {
    if spec.backup_paths.is_empty() {
        return Ok(None);
    }
    let out = dirs.backups.join(format!("{}.tar.gz", op.op_id));
    op.event(
        Step::Backup,
        EventKind::Started,
        format!("{} path(s)", spec.backup_paths.len()),
    );
    let (paths, out2) = (spec.backup_paths.clone(), out.clone());
    let size = tokio::task::spawn_blocking(move || backup::create(&paths, &out2))
        .await
        .map_err(|e| format!("backup task: {e}"))?
        .map_err(|e| {
            let reason = format!("backup of {:?} failed: {e}", spec.backup_paths);
            op.event(Step::Backup, EventKind::Failed, &reason);
            reason
        })?;
    op.event(
        Step::Backup,
        EventKind::Succeeded,
        format!("{} ({size} bytes)", out.display()),
    );
    Ok(Some(out))
}

/// Runs the hooks declared for `point`, streaming their output.
async fn run_hooks(
    agent: &Agent,
    op: &Op<'_>,
    spec: &InstallSpec,
    point: HookPoint,
    version: &Version,
    previous: Option<&Version>,
    root: &Path,
) -> Result<(), String> {
    for h in spec.hooks.iter().filter(|h| h.point == point) {
        let name = point.as_str();
        op.event(Step::Hook, EventKind::Started, format!("{name}: {}", h.argv.join(" ")));
        let previous = previous.map(|v| v.to_string()).unwrap_or_default();
        let env = hooks::HookEnv {
            app: spec.app.as_str(),
            version: version.as_str(),
            previous: &previous,
            environment: agent.labels.get("env").map(String::as_str).unwrap_or(""),
            release_dir: root,
            install_path: &spec.install_path,
            op_id: &op.op_id,
        };
        let result = hooks::run(h, &env, root, |line| {
            op.event(Step::Hook, EventKind::Info, format!("{name}: {line}"))
        })
        .await;
        match result {
            Ok(m) => op.event(Step::Hook, EventKind::Succeeded, m),
            Err(m) => {
                op.event(Step::Hook, EventKind::Failed, &m);
                return Err(m);
            }
        }
    }
    Ok(())
}

fn describe_policy(spec: &InstallSpec) -> String {
    let checks: Vec<String> = spec.health.checks.iter().map(|c| c.kind.describe()).collect();
    let checks = if checks.is_empty() {
        "no checks".to_owned()
    } else {
        checks.join(", ")
    };
    format!(
        "{checks} (healthy for {:?} within {:?})",
        spec.health.min_healthy_time, spec.health.healthy_deadline
    )
}

async fn check(agent: &Agent, op: &Op<'_>, spec: &InstallSpec, root: &Path) -> Result<String, String> {
    check_policy(agent, op, &spec.health, root).await
}

async fn check_policy(
    agent: &Agent,
    op: &Op<'_>,
    policy: &convoy_common::spec::HealthPolicy,
    root: &Path,
) -> Result<String, String> {
    let base = health::baseline(&agent.systemd, policy).await;
    health::wait_healthy(&agent.systemd, policy, &base, root, |v| {
        if let Err(m) = v {
            op.event(Step::Check, EventKind::Info, format!("not yet healthy: {m}"));
        }
    })
    .await
}

fn set_phase(agent: &Agent, app: &AppName, j: &mut Journal, phase: Phase) {
    if let Some(i) = j.inflight.as_mut() {
        i.phase = phase;
    }
    if let Err(e) = agent.store.save_journal(app, j) {
        // Carry on: the step is still the right thing to do, and the
        // operator hears about the journal in the logs.
        tracing::error!(%app, error = %e, "could not save journal");
    }
}

/// The report of an operation refused before it touched anything. Without
/// a version of its own it names the release the host runs.
pub fn refusal(
    store: &crate::store::Store,
    op_id: &str,
    app: &AppName,
    version: Option<Version>,
    reason: String,
) -> OpReport {
    let state = state_now(store, app);
    OpReport {
        op_id: op_id.to_owned(),
        app: app.clone(),
        version: version
            .map(|v| crate::store::release_of(&v).0)
            .or_else(|| state.current.clone())
            .unwrap_or_else(|| Version::new("none").expect("valid")),
        outcome: Outcome::Refused,
        reason,
        restore_detail: String::new(),
        state,
    }
}

fn refuse(agent: &Agent, cmd: &ActivateCommand, reason: String) -> OpReport {
    let report = refusal(
        &agent.store,
        &cmd.op_id,
        &cmd.spec.app,
        Some(cmd.version.clone()),
        reason,
    );
    agent.reporter.result(&report);
    report
}

/// Saves the final journal with the report and hands the report on.
fn finish(
    agent: &Agent,
    cmd: &ActivateCommand,
    mut j: Journal,
    outcome: Outcome,
    reason: String,
    detail: String,
) -> OpReport {
    let app = &cmd.spec.app;
    let mut report = OpReport {
        op_id: cmd.op_id.clone(),
        app: app.clone(),
        // The release, not the tree of its configuration revision.
        version: crate::store::release_of(&cmd.version).0,
        outcome,
        reason,
        restore_detail: detail,
        state: AppStatus::empty(app),
    };
    j.last_op = Some(report.clone());
    if let Err(e) = agent.store.save_journal(app, &j) {
        tracing::error!(%app, error = %e, "could not save journal");
    }
    // Done and journaled, not yet reported: killed here, the agent answers
    // the controller's repeated command from the journal (`answer_again`).
    crash_point("result-journaled");
    report.state = state_now(&agent.store, app);
    agent.reporter.result(&report);
    report
}

/// The app's state as it is now, for a result: every result tells the
/// controller what the host holds (empty if the journal cannot be read).
fn state_now(store: &crate::store::Store, app: &AppName) -> AppStatus {
    store.status(app).unwrap_or_else(|_| AppStatus::empty(app))
}
