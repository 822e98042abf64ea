//! The activation state machine: stage → switch → restart → check → commit,
//! or restore the previous release on any failure.
//!
//! The journal is saved (fsync) before every step that changes what runs,
//! so `recover` can always bring an interrupted activation back to a whole
//! release: the old one, restarted and checked.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use convoy_common::archive::{self, Limits};
use convoy_common::fsutil;
use convoy_common::ops::{ActivateCommand, EventKind, Health, OpReport, Outcome, Step, StepEvent};
use convoy_common::spec::InstallSpec;
use convoy_common::AppName;
use tonic::transport::Channel;

use crate::agent::Agent;
use crate::crash::crash_point;
use crate::fetch;
use crate::health;
use crate::store::{AppDirs, Inflight, Journal, Phase, ReleaseMeta};

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
pub async fn activate(agent: Arc<Agent>, channel: Channel, cmd: ActivateCommand) -> OpReport {
    let app = cmd.spec.app.clone();
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
        // A retried command: answer with what already happened.
        return last.clone();
    }
    if let Err(reason) = check_install_path(&cmd.spec.install_path) {
        return refuse(&agent, &cmd, reason);
    }
    let dirs = match agent.store.ensure_app(&app) {
        Ok(d) => d,
        Err(e) => return refuse(&agent, &cmd, e.to_string()),
    };
    let from = j.current.clone();
    let to = cmd.version.clone();
    if from.as_ref() == Some(&to)
        && agent
            .store
            .release_meta(&app, &to)
            .is_some_and(|m| m.digest == cmd.digest)
        && fs::read_link(&cmd.spec.install_path).is_ok_and(|l| l == dirs.release(&to))
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
        spec: cmd.spec.clone(),
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
    match stage(&agent, &channel, &cmd, &dirs).await {
        Ok(msg) => op.event(Step::Stage, EventKind::Succeeded, msg),
        Err(reason) => {
            op.event(Step::Stage, EventKind::Failed, &reason);
            j.inflight = None;
            let detail = match &from {
                Some(v) => format!("nothing was switched; {v} still runs"),
                None => "nothing was switched".to_owned(),
            };
            return finish(&agent, &cmd, j, Outcome::FailedRestored, reason, detail);
        }
    }
    crash_point("after-stage");

    // ── switch ──
    set_phase(&agent, &app, &mut j, Phase::Switched);
    crash_point("before-switch");
    let from_name = from.as_ref().map_or("nothing".into(), |v| v.to_string());
    op.event(Step::Switch, EventKind::Started, format!("{from_name} -> {to}"));
    if let Err(e) = fsutil::replace_symlink(&dirs.release(&to), &cmd.spec.install_path) {
        let reason = format!("switching {} to {to}: {e}", cmd.spec.install_path.display());
        op.event(Step::Switch, EventKind::Failed, &reason);
        return restore(&agent, &op, cmd, j, reason).await;
    }
    let switched = format!("{} -> {}", cmd.spec.install_path.display(), dirs.release(&to).display());
    op.event(Step::Switch, EventKind::Succeeded, switched);
    crash_point("after-switch");

    // ── restart ──
    for unit in &cmd.spec.units {
        op.event(Step::Restart, EventKind::Started, unit.clone());
        if let Err(e) = agent.systemd.restart(unit, agent.unit_timeout).await {
            let reason = format!("restart {unit}: {e}");
            op.event(Step::Restart, EventKind::Failed, &reason);
            return restore(&agent, &op, cmd, j, reason).await;
        }
        op.event(Step::Restart, EventKind::Succeeded, unit.clone());
    }
    crash_point("after-restart");

    // ── check ──
    op.event(Step::Check, EventKind::Started, describe_policy(&cmd.spec));
    match check(&agent, &op, &cmd.spec).await {
        Ok(msg) => op.event(Step::Check, EventKind::Succeeded, msg),
        Err(reason) => {
            op.event(Step::Check, EventKind::Failed, &reason);
            let reason = format!("health check failed: {reason}");
            return restore(&agent, &op, cmd, j, reason).await;
        }
    }
    crash_point("after-check");

    // ── commit ──
    j.previous = from;
    j.current = Some(to.clone());
    j.last_known_good = Some(to.clone());
    j.health = Health::Healthy;
    j.health_reason = "passed health checks after activation".into();
    j.spec = Some(cmd.spec.clone());
    j.inflight = None;
    op.event(Step::Commit, EventKind::Succeeded, format!("{to} is current"));
    let report = finish(&agent, &cmd, j, Outcome::Succeeded, String::new(), String::new());
    crash_point("after-commit");
    report
}

fn describe_policy(spec: &InstallSpec) -> String {
    let checks: Vec<String> = spec.health.checks.iter().map(|c| c.kind.describe()).collect();
    format!(
        "{} (healthy for {:?} within {:?})",
        if checks.is_empty() {
            "no checks".to_owned()
        } else {
            checks.join(", ")
        },
        spec.health.min_healthy_time,
        spec.health.healthy_deadline
    )
}

async fn check(agent: &Agent, op: &Op<'_>, spec: &InstallSpec) -> Result<String, String> {
    let base = health::baseline(&agent.systemd, &spec.health).await;
    health::wait_healthy(&agent.systemd, &spec.health, &base, |v| {
        if let Err(m) = v {
            op.event(Step::Check, EventKind::Info, format!("not yet healthy: {m}"));
        }
    })
    .await
}

/// The install path must be absent or a symlink: convoy never replaces a
/// real directory or file it did not create.
fn check_install_path(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_symlink() => Err(format!(
            "install path {} exists and is not a symlink; convoy will not replace it (move it away first)",
            path.display()
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match path.parent() {
            Some(p) => fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display())),
            None => Ok(()),
        },
        Err(e) => Err(format!("install path {}: {e}", path.display())),
    }
}

/// Fetches, verifies and unpacks the release into `releases/<version>`.
async fn stage(agent: &Agent, channel: &Channel, cmd: &ActivateCommand, dirs: &AppDirs) -> Result<String, String> {
    let app = &cmd.spec.app;
    let release = dirs.release(&cmd.version);
    if release.exists() {
        return match agent.store.release_meta(app, &cmd.version) {
            Some(m) if m.digest == cmd.digest => Ok(format!("{} already on this host", cmd.version)),
            Some(m) => Err(format!(
                "version {} is already on this host with sha256 {}, not {}; versions are immutable, push a new one",
                cmd.version, m.digest, cmd.digest
            )),
            None => Err(format!(
                "{} exists without metadata; remove it by hand",
                release.display()
            )),
        };
    }
    let part = dirs.staging.join(format!("{}.part", cmd.digest));
    let fetched = fetch::fetch(channel.clone(), cmd.digest, cmd.size, &part, |_, _| {})
        .await
        .map_err(|e| e.to_string())?;
    crash_point("after-fetch");

    let unpack_dir = dirs.staging.join(format!("{}.unpack", cmd.version));
    let _ = fs::remove_dir_all(&unpack_dir);
    let (part2, dir2) = (part.clone(), unpack_dir.clone());
    let stats = tokio::task::spawn_blocking(move || -> Result<archive::UnpackStats, String> {
        let f = fs::File::open(&part2).map_err(|e| format!("{}: {e}", part2.display()))?;
        let stats = archive::unpack(io::BufReader::with_capacity(1 << 20, f), &dir2, &Limits::default())
            .map_err(|e| format!("unsafe or corrupt archive: {e}"))?;
        // One syncfs makes the whole tree durable before it becomes visible.
        let d = fs::File::open(&dir2).map_err(|e| e.to_string())?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)).map_err(|e| format!("syncfs: {e}"))?;
        Ok(stats)
    })
    .await
    .map_err(|e| format!("unpack task: {e}"))?;
    let stats = match stats {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_dir_all(&unpack_dir);
            return Err(e);
        }
    };
    crash_point("after-unpack");
    agent
        .store
        .write_release_meta(
            app,
            &cmd.version,
            &ReleaseMeta {
                digest: cmd.digest,
                size: cmd.size,
            },
        )
        .map_err(|e| e.to_string())?;
    fs::rename(&unpack_dir, &release).map_err(|e| format!("moving release into place: {e}"))?;
    fsutil::fsync_dir(&dirs.releases).map_err(|e| e.to_string())?;
    let _ = fs::remove_file(&part);
    Ok(format!(
        "{} verified ({fetched} bytes fetched), {} files / {} bytes unpacked",
        cmd.version, stats.files, stats.bytes
    ))
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

/// Puts the previous release back, restarts it and checks it. Used after a
/// failed activation and by crash recovery.
async fn restore(agent: &Agent, op: &Op<'_>, cmd: ActivateCommand, mut j: Journal, reason: String) -> OpReport {
    let (outcome, detail) = restore_inner(agent, op, &cmd.spec, &mut j).await;
    finish(agent, &cmd, j, outcome, reason, detail)
}

async fn restore_inner(agent: &Agent, op: &Op<'_>, spec: &InstallSpec, j: &mut Journal) -> (Outcome, String) {
    let app = &spec.app;
    let from = j.inflight.as_ref().and_then(|i| i.from.clone());
    set_phase(agent, app, j, Phase::Restoring);
    // The previous release is restarted with the spec it ran under.
    let prev_spec = j.spec.clone().unwrap_or_else(|| spec.clone());
    let dirs = agent.store.app(app);
    let out = match from {
        Some(prev) => {
            op.event(Step::Restore, EventKind::Started, format!("switching back to {prev}"));
            crash_point("restore-begin");
            let mut problems = Vec::new();
            if let Err(e) = fsutil::replace_symlink(&dirs.release(&prev), &spec.install_path) {
                problems.push(format!("switch back: {e}"));
            }
            crash_point("restore-after-switch");
            for unit in &prev_spec.units {
                if let Err(e) = agent.systemd.restart(unit, agent.unit_timeout).await {
                    problems.push(format!("restart {unit}: {e}"));
                }
            }
            let verdict = if problems.is_empty() {
                check(agent, op, &prev_spec).await
            } else {
                Err(problems.join("; "))
            };
            match verdict {
                Ok(msg) => {
                    j.health = Health::Healthy;
                    j.health_reason = format!("restored; {msg}");
                    let d = format!("restored {prev}; healthy again ({msg})");
                    op.event(Step::Restore, EventKind::Succeeded, &d);
                    (Outcome::FailedRestored, d)
                }
                Err(m) => {
                    j.health = Health::Unhealthy;
                    j.health_reason = m.clone();
                    let d = format!("restoring {prev} failed: {m}");
                    op.event(Step::Restore, EventKind::Failed, &d);
                    (Outcome::FailedRestoreFailed, d)
                }
            }
        }
        None => {
            op.event(
                Step::Restore,
                EventKind::Started,
                "no previous release: removing the install path",
            );
            let mut problems = Vec::new();
            match fs::remove_file(&spec.install_path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("remove {}: {e}", spec.install_path.display())),
            }
            for unit in &spec.units {
                if let Err(e) = agent.systemd.stop(unit, agent.unit_timeout).await {
                    problems.push(format!("stop {unit}: {e}"));
                }
            }
            j.health = Health::Unknown;
            j.health_reason = "nothing installed".into();
            if problems.is_empty() {
                let d = "no previous release; install path removed and units stopped".to_owned();
                op.event(Step::Restore, EventKind::Succeeded, &d);
                (Outcome::FailedRestored, d)
            } else {
                let d = problems.join("; ");
                op.event(Step::Restore, EventKind::Failed, &d);
                (Outcome::FailedRestoreFailed, d)
            }
        }
    };
    j.inflight = None;
    out
}

/// Brings every app with an interrupted operation back to a whole release.
/// Runs at start, before the agent says hello.
pub async fn recover_all(agent: &Agent) -> Vec<OpReport> {
    let mut reports = Vec::new();
    for app in agent.store.apps().unwrap_or_default() {
        let dirs = agent.store.app(&app);
        clean_staging(&dirs);
        let Ok(mut j) = agent.store.load_journal(&app) else {
            continue;
        };
        let Some(inflight) = j.inflight.clone() else {
            continue;
        };
        let op = Op {
            agent,
            op_id: inflight.op_id.clone(),
            app: app.clone(),
        };
        let cmd_like = ActivateCommand {
            op_id: inflight.op_id.clone(),
            spec: inflight.spec.clone(),
            version: inflight.to.clone(),
            digest: convoy_common::Digest::of_bytes(b""),
            size: 0,
        };
        let reason = format!(
            "agent restarted during the activation of {} ({:?} phase)",
            inflight.to, inflight.phase
        );
        op.event(Step::Recover, EventKind::Started, &reason);
        tracing::warn!(%app, op_id = %inflight.op_id, phase = ?inflight.phase, "recovering interrupted activation");
        let (outcome, detail) = if inflight.phase == Phase::Staging {
            j.inflight = None;
            (
                Outcome::FailedRestored,
                "interrupted while staging; nothing had been switched".to_owned(),
            )
        } else {
            restore_inner(agent, &op, &inflight.spec, &mut j).await
        };
        let report = finish(agent, &cmd_like, j, outcome, reason, detail);
        op.event(Step::Recover, EventKind::Succeeded, report.outcome.to_string());
        reports.push(report);
    }
    reports
}

/// Removes half-unpacked trees; keeps partial downloads so they resume.
fn clean_staging(dirs: &AppDirs) {
    for e in fs::read_dir(&dirs.staging).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "part") {
            continue;
        }
        let _ = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
}

fn refuse(agent: &Agent, cmd: &ActivateCommand, reason: String) -> OpReport {
    let state = agent
        .store
        .status(&cmd.spec.app)
        .unwrap_or_else(|_| crate::agent::empty_status(&cmd.spec.app));
    let report = OpReport {
        op_id: cmd.op_id.clone(),
        app: cmd.spec.app.clone(),
        version: cmd.version.clone(),
        outcome: Outcome::Refused,
        reason,
        restore_detail: String::new(),
        state,
    };
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
        version: cmd.version.clone(),
        outcome,
        reason,
        restore_detail: detail,
        state: crate::agent::empty_status(app),
    };
    j.last_op = Some(report.clone());
    if let Err(e) = agent.store.save_journal(app, &j) {
        tracing::error!(%app, error = %e, "could not save journal");
    }
    report.state = agent
        .store
        .status(app)
        .unwrap_or_else(|_| crate::agent::empty_status(app));
    agent.reporter.result(&report);
    report
}
