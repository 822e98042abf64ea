//! Restoring the previous release after a failed activation, and
//! recovering interrupted activations at start from their journal.

use super::*;

/// Puts the previous release back, restarts it and checks it. Used after a
/// failed activation and by crash recovery.
pub(super) async fn restore(
    agent: &Agent,
    op: &Op<'_>,
    cmd: &ActivateCommand,
    mut j: Journal,
    reason: String,
) -> OpReport {
    let (outcome, detail) = restore_inner(agent, op, &mut j).await;
    finish(agent, cmd, j, outcome, reason, detail)
}

pub(super) async fn restore_inner(agent: &Agent, op: &Op<'_>, j: &mut Journal) -> (Outcome, String) {
    let inflight = j.inflight.clone().expect("restore runs for an in-flight operation");
    let spec = &inflight.spec;
    let app = &spec.app;
    set_phase(agent, app, j, Phase::Restoring);
    let dirs = agent.store.app(app);
    let mut problems = Vec::new();
    if let Err(e) = switch::normalize(spec, &dirs) {
        problems.push(format!("normalise releases: {e}"));
    }
    let failing_tree = switch::tree_of(spec, &dirs, &inflight.to);
    if let Err(e) = run_hooks(
        agent,
        op,
        spec,
        HookPoint::BeforeRollback,
        &inflight.to,
        inflight.from.as_ref(),
        &failing_tree,
    )
    .await
    {
        // The restore goes on: a broken hook must not keep a broken release.
        problems.push(e);
    }
    // The previous release is restarted with the spec it ran under.
    let prev_spec = j.spec.clone().unwrap_or_else(|| spec.clone());
    let target = inflight.from.clone();
    op.event(
        Step::Restore,
        EventKind::Started,
        match &target {
            Some(prev) => format!("switching back to {prev}"),
            None => "no previous release: removing the install path".into(),
        },
    );
    crash_point("restore-begin");
    let switched = match &target {
        Some(prev) => switch::switch_to(spec, &dirs, prev),
        None => switch::remove_install_path(spec, &dirs),
    };
    if let Err(e) = switched {
        problems.push(format!("switch back: {e}"));
    }
    crash_point("restore-after-switch");
    if let Some(snap) = &inflight.unit_snapshot {
        match units::put_back(&agent.unit_dir, snap) {
            Ok(true) => {
                if let Err(e) = agent.systemd.daemon_reload().await {
                    problems.push(format!("daemon-reload: {e}"));
                }
            }
            Ok(false) => {}
            Err(e) => problems.push(format!("putting unit files back: {e}")),
        }
    }
    if let Some(b) = inflight.backup.clone() {
        match tokio::task::spawn_blocking(move || backup::restore(&b)).await {
            Ok(Ok(n)) => op.event(Step::Restore, EventKind::Info, format!("backup restored ({n} entries)")),
            Ok(Err(e)) => problems.push(format!("restoring backup: {e}")),
            Err(e) => problems.push(format!("restoring backup: {e}")),
        }
    }
    let out = match &target {
        Some(prev) => {
            let mut restarted = true;
            for unit in &prev_spec.units {
                if let Err(e) = agent.systemd.restart(unit, agent.unit_timeout).await {
                    problems.push(format!("restart {unit}: {e}"));
                    restarted = false;
                }
            }
            if restarted {
                // The moment the previous release runs again; the check
                // that follows confirms it stays healthy.
                op.event(
                    Step::Restore,
                    EventKind::Info,
                    format!("{prev} running again ({}); checking it", prev_spec.units.join(", ")),
                );
            }
            let root = switch::tree_of(spec, &dirs, prev);
            let verdict = check(agent, op, &prev_spec, &root).await;
            match verdict {
                Ok(msg) if problems.is_empty() => {
                    j.health = Health::Healthy;
                    j.health_reason = format!("restored; {msg}");
                    let d = format!("restored {prev}; healthy again ({msg})");
                    op.event(Step::Restore, EventKind::Succeeded, &d);
                    (Outcome::FailedRestored, d)
                }
                verdict => {
                    if let Err(m) = verdict {
                        problems.push(m);
                    }
                    let m = problems.join("; ");
                    j.health = Health::Unhealthy;
                    j.health_reason = m.clone();
                    let d = format!("restoring {prev} failed: {m}");
                    op.event(Step::Restore, EventKind::Failed, &d);
                    (Outcome::FailedRestoreFailed, d)
                }
            }
        }
        None => {
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
        let Ok(j) = agent.store.load_journal(&app) else {
            continue;
        };
        let Some(inflight) = j.inflight.clone() else { continue };
        let span = agent.op_span(&app, inflight.to.as_str(), &inflight.op_id);
        let report = tracing::Instrument::instrument(recover_one(agent, app, j, inflight), span).await;
        crate::metrics::get().activation(report.outcome);
        reports.push(report);
    }
    super::slots::settle_all(agent).await;
    reports
}

/// Finishes or undoes one app's interrupted activation.
async fn recover_one(agent: &Agent, app: AppName, mut j: Journal, inflight: Inflight) -> OpReport {
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
        signature: None,
        manifest: None,
        config: None,
    };
    let reason = format!(
        "agent restarted during the activation of {} ({:?} phase)",
        inflight.to, inflight.phase
    );
    op.event(Step::Recover, EventKind::Started, &reason);
    tracing::warn!(%app, op_id = %inflight.op_id, phase = ?inflight.phase, "recovering interrupted activation");
    let (outcome, detail) = if let Some(idle) = inflight.slot {
        super::slots::recover_preview(agent, &op, &mut j, idle).await
    } else if inflight.phase == Phase::Staging {
        j.inflight = None;
        (
            Outcome::FailedRestored,
            "interrupted before the switch; nothing had been switched".to_owned(),
        )
    } else {
        restore_inner(agent, &op, &mut j).await
    };
    let report = finish(agent, &cmd_like, j, outcome, reason, detail);
    op.event(Step::Recover, EventKind::Succeeded, report.outcome.to_string());
    report
}
