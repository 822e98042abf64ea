//! Blue-green activations. The app runs as two slots, instances of its
//! template units; an activation starts the new release in the idle slot
//! and checks it on the slot's own port while the live slot keeps
//! serving, and never touches the live slot. The controller then switches
//! traffic and sends `promote`, which makes the slot live and keeps the old
//! one warm for `keep_warm`; a rollback inside that time only readies the
//! warm slot again, with no restart.
//!
//! Journal order: a slot's new state is saved before any unit of it
//! starts or stops, so a kill at any instant leaves the live slot as it
//! was, and recovery stops a preview that did not finish.

use std::time::Duration;

use convoy_common::ops::now_unix_ms;
use convoy_common::slots::{self as bg, BlueGreen, PromoteCommand, Slot, SlotState};

use super::*;
use crate::store::SlotRecord;

fn units(spec: &InstallSpec, slot: Slot) -> Vec<String> {
    spec.units.iter().map(|u| bg::instance(u, slot)).collect()
}

async fn all_active(agent: &Agent, spec: &InstallSpec, slot: Slot) -> bool {
    for u in units(spec, slot) {
        match agent.systemd.state(&u).await {
            Ok(s) if s.active == "active" => {}
            _ => return false,
        }
    }
    true
}

/// Stops a slot's units; the problems, if any.
async fn stop_slot(agent: &Agent, spec: &InstallSpec, slot: Slot) -> Vec<String> {
    let mut problems = Vec::new();
    for u in units(spec, slot) {
        if let Err(e) = agent.systemd.stop(&u, agent.unit_timeout).await {
            problems.push(format!("stop {u}: {e}"));
        }
    }
    problems
}

/// Starts `to` in the idle slot and checks it there; the live slot keeps
/// serving throughout. Success means the slot is ready for traffic.
pub(super) async fn activate_slot(
    agent: &Arc<Agent>,
    channel: &Channel,
    (base, cmd): (&ActivateCommand, &ActivateCommand),
    mut j: Journal,
    bgs: &BlueGreen,
    op: &Op<'_>,
) -> OpReport {
    let spec = &cmd.spec;
    let to = &cmd.version;
    if let Err(reason) = check_slot_root(spec) {
        return refuse(agent, cmd, reason);
    }
    let dirs = match agent.store.ensure_app(&spec.app) {
        Ok(d) => d,
        Err(e) => return refuse(agent, cmd, e.to_string()),
    };
    let live = j.live_slot();
    let live_version = live.and_then(|s| j.slots.get(&s)).map(|r| r.version.clone());
    if let (Some(slot), Some(v)) = (live, &live_version) {
        if v == to {
            let m = format!("{to} is already live in slot {slot}; nothing to do");
            op.event(Step::Commit, EventKind::Succeeded, &m);
            return finish(agent, cmd, j, Outcome::Succeeded, String::new(), m);
        }
    }
    let idle = live.map_or(Slot::Blue, Slot::other);

    // A slot still running `to` (warm after a switch): ready at once. It
    // leaves its warm time so that it cannot stop before the switch.
    if let Some(rec) = j.slots.get(&idle).cloned() {
        if &rec.version == to
            && matches!(rec.state, SlotState::Warm { .. } | SlotState::Ready)
            && all_active(agent, spec, idle).await
        {
            j.slots.insert(
                idle,
                SlotRecord {
                    state: SlotState::Ready,
                    ..rec
                },
            );
            j.spec = Some(spec.clone());
            let m = format!(
                "{to} still runs in slot {idle} (port {}); ready for traffic without a restart",
                bgs.port(idle)
            );
            op.event(Step::Check, EventKind::Succeeded, &m);
            return finish(agent, cmd, j, Outcome::Succeeded, String::new(), m);
        }
    }
    let untouched = match (live, &live_version) {
        (Some(s), Some(v)) => format!("{v} stays live in slot {s}, untouched"),
        _ => "no slot was live".to_owned(),
    };

    // ── stage ──
    j.inflight = Some(Inflight {
        op_id: cmd.op_id.clone(),
        from: live_version.clone(),
        to: to.clone(),
        phase: Phase::Staging,
        spec: spec.clone(),
        backup: None,
        unit_snapshot: None,
        slot: Some(idle),
    });
    if let Err(e) = agent.store.save_journal(&spec.app, &j) {
        return refuse(agent, cmd, e.to_string());
    }
    crash_point("stage-begin");
    op.event(
        Step::Stage,
        EventKind::Started,
        format!("{to} for slot {idle}: {} bytes, sha256 {}", cmd.size, cmd.digest),
    );
    match super::configure::stage_tree(agent, channel, base, cmd, &dirs).await {
        Ok(msg) => op.event(Step::Stage, EventKind::Succeeded, msg),
        Err(reason) => {
            op.event(Step::Stage, EventKind::Failed, &reason);
            j.inflight = None;
            return finish(agent, cmd, j, Outcome::FailedRestored, reason, untouched);
        }
    }
    crash_point("after-stage");
    let new_tree = dirs.release(to);
    let prepared: Result<(), String> = async {
        let shipped = units::shipped(&new_tree).map_err(|e| format!("unit files: {e}"))?;
        if !shipped.is_empty() {
            return Err(format!(
                "the release ships unit files ({}); a blue-green app's template units are shared by both slots, so they are installed on the host, not with a release",
                join_keys(&shipped)
            ));
        }
        run_hooks(agent, op, spec, HookPoint::BeforeInstall, to, live_version.as_ref(), &new_tree).await
    }
    .await;
    if let Err(reason) = prepared {
        j.inflight = None;
        return finish(agent, cmd, j, Outcome::FailedRestored, reason, untouched);
    }

    // ── preview: the idle slot gets `to`, starts, and is checked ──
    j.slots.insert(
        idle,
        SlotRecord {
            version: to.clone(),
            state: SlotState::Preview,
            port: bgs.port(idle),
        },
    );
    set_phase(agent, &spec.app, &mut j, Phase::Switched);
    crash_point("before-switch");
    let slot_path = BlueGreen::path(&spec.install_path, idle);
    let previewed: Result<String, String> = async {
        // What the slot ran before (a warm release) stops first.
        let stopped = stop_slot(agent, spec, idle).await;
        if !stopped.is_empty() {
            return Err(stopped.join("; "));
        }
        op.event(
            Step::Switch,
            EventKind::Started,
            format!("slot {idle} -> {to} (port {})", bgs.port(idle)),
        );
        std::fs::create_dir_all(&spec.install_path)
            .and_then(|()| {
                fsutil::write_atomic(
                    &BlueGreen::env_file(&spec.install_path, idle),
                    bgs.env_text(idle, to).as_bytes(),
                    0o644,
                )
            })
            .and_then(|()| fsutil::replace_symlink(&new_tree, &slot_path))
            .map_err(|e| format!("pointing {} at {to}: {e}", slot_path.display()))?;
        op.event(
            Step::Switch,
            EventKind::Succeeded,
            format!("{} -> {to}", slot_path.display()),
        );
        crash_point("after-switch");
        let prev = live_version.as_ref();
        run_hooks(agent, op, spec, HookPoint::AfterInstall, to, prev, &slot_path).await?;
        run_hooks(agent, op, spec, HookPoint::BeforeActivate, to, prev, &slot_path).await?;
        for unit in units(spec, idle) {
            op.event(Step::Restart, EventKind::Started, unit.clone());
            if let Err(e) = agent.systemd.restart(&unit, agent.unit_timeout).await {
                let reason = format!("start {unit}: {e}");
                op.event(Step::Restart, EventKind::Failed, &reason);
                return Err(reason);
            }
            op.event(Step::Restart, EventKind::Succeeded, unit);
        }
        crash_point("after-restart");
        run_hooks(agent, op, spec, HookPoint::AfterActivate, to, prev, &slot_path).await?;
        let policy = bg::policy_for(&spec.health, idle, bgs.port(idle));
        op.event(
            Step::Check,
            EventKind::Started,
            format!("preview of slot {idle}: {}", describe_policy(spec)),
        );
        let msg = match check_policy(agent, op, &policy, &slot_path).await {
            Ok(msg) => msg,
            Err(reason) => {
                op.event(Step::Check, EventKind::Failed, &reason);
                return Err(format!("preview of slot {idle} failed its health checks: {reason}"));
            }
        };
        op.event(Step::Check, EventKind::Succeeded, &msg);
        run_hooks(agent, op, spec, HookPoint::Validate, to, prev, &slot_path).await?;
        Ok(msg)
    }
    .await;
    match previewed {
        Ok(msg) => {
            crash_point("after-check");
            if let Some(r) = j.slots.get_mut(&idle) {
                r.state = SlotState::Ready;
            }
            j.spec = Some(spec.clone());
            j.inflight = None;
            let m = format!(
                "{to} ready in slot {idle} (port {}; {msg}); {untouched} until traffic switches",
                bgs.port(idle)
            );
            op.event(Step::Commit, EventKind::Succeeded, &m);
            finish(agent, cmd, j, Outcome::Succeeded, String::new(), m)
        }
        Err(reason) => {
            let (outcome, detail) = discard_preview(agent, op, &mut j, spec, idle, &untouched).await;
            finish(agent, cmd, j, outcome, reason, detail)
        }
    }
}

/// Stops a preview that failed or was interrupted; the live slot is not
/// touched.
async fn discard_preview(
    agent: &Agent,
    op: &Op<'_>,
    j: &mut Journal,
    spec: &InstallSpec,
    idle: Slot,
    untouched: &str,
) -> (Outcome, String) {
    op.event(Step::Restore, EventKind::Started, format!("stopping slot {idle}"));
    let problems = stop_slot(agent, spec, idle).await;
    if let Some(r) = j.slots.get_mut(&idle) {
        r.state = SlotState::Stopped;
    }
    j.inflight = None;
    if problems.is_empty() {
        let d = format!("slot {idle} stopped; {untouched}");
        op.event(Step::Restore, EventKind::Succeeded, &d);
        (Outcome::FailedRestored, d)
    } else {
        let d = format!("stopping slot {idle} failed: {}; {untouched}", problems.join("; "));
        op.event(Step::Restore, EventKind::Failed, &d);
        (Outcome::FailedRestoreFailed, d)
    }
}

/// Recovery of an interrupted slot activation: a preview never took
/// traffic (the controller switches only after its success was reported,
/// which comes after the journal says `ready`), so it is stopped.
pub(super) async fn recover_preview(agent: &Agent, op: &Op<'_>, j: &mut Journal, idle: Slot) -> (Outcome, String) {
    let inflight = j.inflight.clone().expect("an interrupted slot activation");
    let untouched = match (j.live_slot(), &inflight.from) {
        (Some(s), Some(v)) => format!("{v} stays live in slot {s}, untouched"),
        _ => "no slot was live".to_owned(),
    };
    if inflight.phase == Phase::Staging {
        j.inflight = None;
        return (
            Outcome::FailedRestored,
            format!("interrupted while staging; {untouched}"),
        );
    }
    discard_preview(agent, op, j, &inflight.spec, idle, &untouched).await
}

/// Refuses an install path that is not the directory of slots convoy
/// made (or absent).
fn check_slot_root(spec: &InstallSpec) -> Result<(), String> {
    let path = &spec.install_path;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "install path {} exists and is not a directory; a blue-green app keeps its slots in it (move it away first)",
            path.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("install path {}: {e}", path.display())),
    }
}

/// Makes a slot live once the controller switched traffic to it.
pub async fn promote(agent: Arc<Agent>, cmd: PromoteCommand) -> OpReport {
    let op = Op {
        agent: &agent,
        op_id: cmd.op_id.clone(),
        app: cmd.app.clone(),
    };
    let mut j = match agent.store.load_journal(&cmd.app) {
        Ok(j) => j,
        Err(e) => return refusal_of(&agent, &cmd, None, format!("cannot read journal: {e}")),
    };
    if let Some(last) = j.last_op.as_ref().filter(|r| r.op_id == cmd.op_id) {
        return answer_again(&agent, last);
    }
    let (Some(spec), Some(rec)) = (j.spec.clone(), j.slots.get(&cmd.slot).cloned()) else {
        let reason = format!("{} has no slot {} on this host", cmd.app, cmd.slot);
        return refusal_of(&agent, &cmd, None, reason);
    };
    if !matches!(rec.state, SlotState::Live | SlotState::Ready | SlotState::Warm { .. }) {
        let reason = format!(
            "slot {} is {} ({}); only a running slot can take traffic",
            cmd.slot,
            rec.state.name(),
            rec.version
        );
        return refusal_of(&agent, &cmd, Some(rec.version), reason);
    }
    let other = cmd.slot.other();
    let mut stop = false;
    let mut said = format!("slot {} ({}) is live", cmd.slot, rec.version);
    if let Some(o) = j.slots.get_mut(&other) {
        match o.state {
            SlotState::Live if !cmd.keep_warm.is_zero() => {
                let until_ms = now_unix_ms().max(0) as u64 + cmd.keep_warm.as_millis() as u64;
                o.state = SlotState::Warm { until_ms };
                said.push_str(&format!(
                    "; slot {other} ({}) stays warm for {}",
                    o.version,
                    humantime::format_duration(cmd.keep_warm)
                ));
            }
            SlotState::Live | SlotState::Ready | SlotState::Preview => {
                o.state = SlotState::Stopped;
                stop = true;
                said.push_str(&format!("; slot {other} ({}) stops", o.version));
            }
            SlotState::Warm { .. } | SlotState::Stopped => {}
        }
    }
    if let Some(r) = j.slots.get_mut(&cmd.slot) {
        r.state = SlotState::Live;
    }
    j.previous = j.slots.get(&other).map(|o| o.version.clone());
    if j.current.as_ref() != Some(&rec.version) {
        j.current = Some(rec.version.clone());
        j.push_history(&rec.version);
    }
    j.last_known_good = Some(rec.version.clone());
    j.health = Health::Healthy;
    j.health_reason = format!("live in slot {}", cmd.slot);
    // The new states are saved before any unit stops.
    if let Err(e) = agent.store.save_journal(&cmd.app, &j) {
        return refusal_of(&agent, &cmd, Some(rec.version), e.to_string());
    }
    crash_point("after-promote");
    let problems = if stop {
        stop_slot(&agent, &spec, other).await
    } else {
        vec![]
    };
    for p in &problems {
        op.event(Step::Commit, EventKind::Info, p.clone());
    }
    op.event(Step::Commit, EventKind::Succeeded, &said);
    let like = ActivateCommand {
        op_id: cmd.op_id.clone(),
        spec: spec.clone(),
        version: rec.version.clone(),
        digest: convoy_common::Digest::of_bytes(b""),
        size: 0,
        signature: None,
        manifest: None,
        config: None,
    };
    let report = finish(&agent, &like, j.clone(), Outcome::Succeeded, String::new(), said);
    if let Ok(dirs) = agent.store.ensure_app(&cmd.app) {
        apply_retention(&agent, &op, &spec, &j, &dirs);
    }
    report
}

fn refusal_of(agent: &Agent, cmd: &PromoteCommand, version: Option<Version>, reason: String) -> OpReport {
    let report = refusal(&agent.store, &cmd.op_id, &cmd.app, version, reason);
    agent.reporter.result(&report);
    report
}

/// How often warm slots are looked at.
const WARM_TICK: Duration = Duration::from_secs(1);

/// The operation id housekeeping holds an app's lock under; a command
/// that finds it waits instead of being refused (see `session::start`).
pub const HOUSEKEEPING: &str = "keep-warm";

/// Stops each warm slot once its `keep_warm` is over. Runs for the
/// agent's life; the app's lock is taken only when a slot is due.
pub async fn keep_warm(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(WARM_TICK).await;
        for app in agent.store.apps().unwrap_or_default() {
            let due = agent.store.load_journal(&app).is_ok_and(|j| !expired(&j).is_empty());
            if !due {
                continue;
            }
            // Under the app's lock, so never beside an operation.
            let Ok(_guard) = agent.ops.try_begin(&app, HOUSEKEEPING) else {
                continue;
            };
            settle(&agent, &app, false).await;
        }
    }
}

/// At start, before the agent says hello: every slot's units in the state
/// its journal says (a slot whose stop was interrupted stops, a running
/// one runs), and warm slots past their time stopped.
pub async fn settle_all(agent: &Agent) {
    for app in agent.store.apps().unwrap_or_default() {
        settle(agent, &app, true).await;
    }
}

fn expired(j: &Journal) -> Vec<Slot> {
    let now = now_unix_ms().max(0) as u64;
    j.slots
        .iter()
        .filter(|(_, r)| matches!(r.state, SlotState::Warm { until_ms } if until_ms <= now))
        .map(|(s, _)| *s)
        .collect()
}

async fn settle(agent: &Agent, app: &AppName, all: bool) {
    let Ok(mut j) = agent.store.load_journal(app) else {
        return;
    };
    let Some(spec) = j.spec.clone().filter(|s| s.blue_green.is_some()) else {
        return;
    };
    if j.inflight.is_some() {
        return;
    }
    let expired = expired(&j);
    for s in &expired {
        if let Some(r) = j.slots.get_mut(s) {
            r.state = SlotState::Stopped;
        }
    }
    // The new states are saved before any unit stops.
    if !expired.is_empty() {
        if let Err(e) = agent.store.save_journal(app, &j) {
            tracing::error!(%app, error = %e, "could not save journal");
            return;
        }
    }
    for (slot, r) in j.slots.clone() {
        if expired.contains(&slot) || (all && r.state == SlotState::Stopped) {
            for p in stop_slot(agent, &spec, slot).await {
                tracing::warn!(%app, %slot, "{p}");
            }
            if expired.contains(&slot) {
                tracing::info!(%app, %slot, version = %r.version, "keep_warm is over; slot stopped");
            }
        } else if all && r.state.running() && !all_active(agent, &spec, slot).await {
            for u in units(&spec, slot) {
                match agent.systemd.restart(&u, agent.unit_timeout).await {
                    Ok(()) => tracing::info!(%app, %slot, unit = %u, "slot was not running; started"),
                    Err(e) => tracing::error!(%app, %slot, unit = %u, error = %e, "cannot start slot"),
                }
            }
        }
    }
}
