//! Conversions between wire types and `convoy-common` domain types.
//!
//! Incoming wire data is validated here, once: a bad field becomes an
//! `InvalidMessage` naming the field, which the services turn into
//! `InvalidArgument`.

use std::path::PathBuf;
use std::time::Duration;

use convoy_common::analysis::Measurement;
use convoy_common::ops::{
    ActivateCommand, AppStatus, ConfigFile, EventKind, Health, OpReport, Outcome, PreflightCheck, PreflightCommand,
    RenderedConfig, RollbackCommand, Step, StepEvent,
};
use convoy_common::slots::{PromoteCommand, Slot, SlotState, SlotStatus};
use convoy_common::spec::{
    self, ArchiveLimits, CheckKind, HealthCheck, HealthPolicy, Hook, HookPoint, InstallSpec, SwitchMode,
};
use convoy_common::{AppName, Digest, Version};

use crate::v1 as pb;

#[derive(Debug, thiserror::Error)]
#[error("invalid {message_type}.{field}: {why}")]
pub struct InvalidMessage {
    pub message_type: &'static str,
    pub field: &'static str,
    pub why: String,
}

fn bad(message_type: &'static str, field: &'static str, why: impl ToString) -> InvalidMessage {
    InvalidMessage {
        message_type,
        field,
        why: why.to_string(),
    }
}

fn opt_version(message_type: &'static str, field: &'static str, s: String) -> Result<Option<Version>, InvalidMessage> {
    if s.is_empty() {
        Ok(None)
    } else {
        Version::new(s).map(Some).map_err(|e| bad(message_type, field, e))
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

// ── install spec ──────────────────────────────────────────────────────

impl From<&InstallSpec> for pb::InstallSpec {
    fn from(s: &InstallSpec) -> Self {
        pb::InstallSpec {
            app: s.app.to_string(),
            install_path: s.install_path.display().to_string(),
            units: s.units.clone(),
            checks: s.health.checks.iter().map(health_check_to_pb).collect(),
            min_healthy_ms: ms(s.health.min_healthy_time),
            healthy_deadline_ms: ms(s.health.healthy_deadline),
            hooks: s
                .hooks
                .iter()
                .map(|h| pb::Hook {
                    point: h.point.as_str().to_owned(),
                    argv: h.argv.clone(),
                    timeout_ms: ms(h.timeout),
                })
                .collect(),
            backup_paths: s.backup_paths.iter().map(|p| p.display().to_string()).collect(),
            keep_releases: s.keep_releases,
            keep_backups: s.keep_backups,
            allow_setid: s.allow_setid,
            max_unpacked_size: s.limits.max_unpacked_size,
            max_entries: s.limits.max_entries,
            max_ratio: s.limits.max_ratio,
            switch_mode: match s.switch {
                SwitchMode::Symlink => pb::SwitchMode::Symlink,
                SwitchMode::Exchange => pb::SwitchMode::Exchange,
            } as i32,
            user: s.user.clone().unwrap_or_default(),
            blue_green: s.blue_green.as_ref().map(|b| pb::BlueGreen {
                blue_port: b.blue_port.into(),
                green_port: b.green_port.into(),
                keep_warm_ms: ms(b.keep_warm),
            }),
        }
    }
}

impl TryFrom<pb::InstallSpec> for InstallSpec {
    type Error = InvalidMessage;
    fn try_from(s: pb::InstallSpec) -> Result<Self, InvalidMessage> {
        const T: &str = "InstallSpec";
        let app = AppName::new(s.app).map_err(|e| bad(T, "app", e))?;
        let install_path = PathBuf::from(s.install_path);
        spec::check_install_path(&install_path).map_err(|e| bad(T, "install_path", e))?;
        if s.units.is_empty() {
            return Err(bad(T, "units", "empty"));
        }
        if let Some(u) = s.units.iter().find(|u| !spec::valid_unit_name(u)) {
            return Err(bad(T, "units", format!("{u:?} is not a unit name")));
        }
        let checks = s
            .checks
            .into_iter()
            .map(health_check_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        if s.healthy_deadline_ms <= s.min_healthy_ms {
            return Err(bad(T, "healthy_deadline_ms", "must exceed min_healthy_ms"));
        }
        let mut hooks = Vec::with_capacity(s.hooks.len());
        for h in s.hooks {
            let point =
                HookPoint::parse(&h.point).ok_or_else(|| bad("Hook", "point", format!("unknown {:?}", h.point)))?;
            if h.argv.first().is_none_or(|p| p.is_empty()) || h.timeout_ms == 0 {
                return Err(bad("Hook", "argv", "must name a program and have a timeout"));
            }
            hooks.push(Hook {
                point,
                argv: h.argv,
                timeout: Duration::from_millis(h.timeout_ms),
            });
        }
        let mut backup_paths = Vec::with_capacity(s.backup_paths.len());
        for p in s.backup_paths {
            let p = PathBuf::from(p);
            if !p.is_absolute() || p == std::path::Path::new("/") || p.starts_with("/var/lib/convoy") {
                return Err(bad(T, "backup_paths", format!("{} cannot be backed up", p.display())));
            }
            backup_paths.push(p);
        }
        if s.keep_releases < 2 {
            return Err(bad(T, "keep_releases", "must be at least 2"));
        }
        let blue_green = match s.blue_green {
            None => None,
            Some(b) => {
                let port = |field: &'static str, p: u32| {
                    u16::try_from(p)
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| bad("BlueGreen", field, format!("{p} is not a port")))
                };
                let (blue_port, green_port) = (port("blue_port", b.blue_port)?, port("green_port", b.green_port)?);
                if blue_port == green_port {
                    return Err(bad("BlueGreen", "green_port", "equals blue_port"));
                }
                if let Some(u) = s.units.iter().find(|u| !convoy_common::slots::is_template(u)) {
                    return Err(bad(T, "units", format!("{u:?} is not a template unit")));
                }
                Some(convoy_common::slots::BlueGreen {
                    blue_port,
                    green_port,
                    keep_warm: Duration::from_millis(b.keep_warm_ms),
                })
            }
        };
        let user = Some(s.user).filter(|u| !u.is_empty());
        if let Some(u) = user.as_deref().filter(|u| !spec::valid_user(u)) {
            return Err(bad(T, "user", format!("{u:?} is not a user name")));
        }
        Ok(InstallSpec {
            user,
            blue_green,
            app,
            install_path,
            switch: match pb::SwitchMode::try_from(s.switch_mode) {
                Ok(pb::SwitchMode::Symlink) => SwitchMode::Symlink,
                Ok(pb::SwitchMode::Exchange) => SwitchMode::Exchange,
                Err(_) => return Err(bad(T, "switch_mode", format!("unknown value {}", s.switch_mode))),
            },
            units: s.units,
            health: HealthPolicy {
                checks,
                min_healthy_time: Duration::from_millis(s.min_healthy_ms),
                healthy_deadline: Duration::from_millis(s.healthy_deadline_ms),
            },
            hooks,
            backup_paths,
            keep_releases: s.keep_releases,
            keep_backups: s.keep_backups.max(1),
            allow_setid: s.allow_setid,
            limits: {
                let d = ArchiveLimits::default();
                let or = |v: u64, d: u64| if v == 0 { d } else { v };
                ArchiveLimits {
                    max_unpacked_size: or(s.max_unpacked_size, d.max_unpacked_size),
                    max_entries: or(s.max_entries, d.max_entries),
                    max_ratio: if s.max_ratio == 0 { d.max_ratio } else { s.max_ratio },
                }
            },
        })
    }
}

// ── activate ──────────────────────────────────────────────────────────

impl From<&ActivateCommand> for pb::Activate {
    fn from(c: &ActivateCommand) -> Self {
        pb::Activate {
            op_id: c.op_id.clone(),
            spec: Some((&c.spec).into()),
            version: c.version.to_string(),
            digest: c.digest.to_hex(),
            size: c.size,
            signature: c.signature.clone().unwrap_or_default(),
            manifest_digest: c.manifest.map(|m| m.to_hex()).unwrap_or_default(),
            config: c.config.as_ref().map(|r| pb::Config {
                revision: r.revision,
                files: r
                    .files
                    .iter()
                    .map(|f| pb::ConfigFile {
                        path: f.path.clone(),
                        mode: f.mode,
                        content: f.content.clone(),
                    })
                    .collect(),
            }),
        }
    }
}

impl TryFrom<pb::Activate> for ActivateCommand {
    type Error = InvalidMessage;
    fn try_from(a: pb::Activate) -> Result<Self, InvalidMessage> {
        const T: &str = "Activate";
        if a.op_id.is_empty() || a.op_id.len() > 128 {
            return Err(bad(T, "op_id", "must be 1 to 128 characters"));
        }
        Ok(ActivateCommand {
            op_id: a.op_id,
            spec: a.spec.ok_or_else(|| bad(T, "spec", "missing"))?.try_into()?,
            version: Version::new(a.version).map_err(|e| bad(T, "version", e))?,
            digest: Digest::parse(&a.digest).map_err(|e| bad(T, "digest", e))?,
            size: a.size,
            signature: Some(a.signature).filter(|s| !s.is_empty()),
            manifest: match a.manifest_digest.as_str() {
                "" => None,
                m => Some(Digest::parse(m).map_err(|e| bad(T, "manifest_digest", e))?),
            },
            config: match a.config {
                None => None,
                Some(c) => {
                    let mut files = Vec::with_capacity(c.files.len());
                    for f in c.files {
                        let inside = !f.path.is_empty()
                            && !f.path.starts_with('/')
                            && f.path.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
                        if !inside || f.mode > 0o777 {
                            return Err(bad(
                                "ConfigFile",
                                "path",
                                format!("{:?} is not a file of the release tree", f.path),
                            ));
                        }
                        files.push(ConfigFile {
                            path: f.path,
                            mode: f.mode,
                            content: f.content,
                        });
                    }
                    Some(RenderedConfig {
                        revision: c.revision,
                        files,
                    })
                }
            },
        })
    }
}

impl From<&RollbackCommand> for pb::Rollback {
    fn from(c: &RollbackCommand) -> Self {
        pb::Rollback {
            op_id: c.op_id.clone(),
            app: c.app.to_string(),
            to_version: c.to.as_ref().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::Rollback> for RollbackCommand {
    type Error = InvalidMessage;
    fn try_from(r: pb::Rollback) -> Result<Self, InvalidMessage> {
        const T: &str = "Rollback";
        if r.op_id.is_empty() || r.op_id.len() > 128 {
            return Err(bad(T, "op_id", "must be 1 to 128 characters"));
        }
        Ok(RollbackCommand {
            op_id: r.op_id,
            app: AppName::new(r.app).map_err(|e| bad(T, "app", e))?,
            to: opt_version(T, "to_version", r.to_version)?,
        })
    }
}

// ── pre-flight ────────────────────────────────────────────────────────

impl From<&PreflightCommand> for pb::Preflight {
    fn from(c: &PreflightCommand) -> Self {
        pb::Preflight {
            op_id: c.op_id.clone(),
            app: c.app.to_string(),
            needed_bytes: c.needed_bytes,
            min_memory_bytes: c.min_memory_bytes,
            units: c.units.clone(),
            units_in_release: c.units_in_release.clone(),
            checks: c.checks.iter().map(health_check_to_pb).collect(),
            install_path: c.install_path.display().to_string(),
        }
    }
}

impl TryFrom<pb::Preflight> for PreflightCommand {
    type Error = InvalidMessage;
    fn try_from(p: pb::Preflight) -> Result<Self, InvalidMessage> {
        const T: &str = "Preflight";
        if p.op_id.is_empty() || p.op_id.len() > 128 {
            return Err(bad(T, "op_id", "must be 1 to 128 characters"));
        }
        if let Some(u) = p
            .units
            .iter()
            .chain(&p.units_in_release)
            .find(|u| !spec::valid_unit_name(u))
        {
            return Err(bad(T, "units", format!("{u:?} is not a unit name")));
        }
        let install_path = PathBuf::from(p.install_path);
        spec::check_install_path(&install_path).map_err(|e| bad(T, "install_path", e))?;
        Ok(PreflightCommand {
            op_id: p.op_id,
            app: AppName::new(p.app).map_err(|e| bad(T, "app", e))?,
            needed_bytes: p.needed_bytes,
            min_memory_bytes: p.min_memory_bytes,
            units: p.units,
            units_in_release: p.units_in_release,
            checks: p
                .checks
                .into_iter()
                .map(health_check_from_pb)
                .collect::<Result<_, _>>()?,
            install_path,
        })
    }
}

impl From<&PreflightCheck> for pb::PreflightCheck {
    fn from(c: &PreflightCheck) -> Self {
        pb::PreflightCheck {
            name: c.name.clone(),
            passed: c.passed,
            detail: c.detail.clone(),
        }
    }
}

impl From<pb::PreflightCheck> for PreflightCheck {
    fn from(c: pb::PreflightCheck) -> Self {
        PreflightCheck {
            name: c.name,
            passed: c.passed,
            detail: c.detail,
        }
    }
}

// ── app status ────────────────────────────────────────────────────────

impl From<Health> for pb::Health {
    fn from(h: Health) -> Self {
        match h {
            Health::Unknown => pb::Health::Unknown,
            Health::Healthy => pb::Health::Healthy,
            Health::Unhealthy => pb::Health::Unhealthy,
        }
    }
}

impl From<pb::Health> for Health {
    fn from(h: pb::Health) -> Self {
        match h {
            pb::Health::Unknown => Health::Unknown,
            pb::Health::Healthy => Health::Healthy,
            pb::Health::Unhealthy => Health::Unhealthy,
        }
    }
}

impl From<&AppStatus> for pb::AppState {
    fn from(s: &AppStatus) -> Self {
        let v = |v: &Option<Version>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        pb::AppState {
            app: s.app.to_string(),
            current: v(&s.current),
            previous: v(&s.previous),
            last_known_good: v(&s.last_known_good),
            releases: s.releases.iter().map(|r| r.to_string()).collect(),
            health: pb::Health::from(s.health) as i32,
            health_reason: s.health_reason.clone(),
            inflight_op: s.inflight_op.clone().unwrap_or_default(),
            config_revision: s.config_revision.unwrap_or(0),
            slots: s
                .slots
                .iter()
                .map(|x| pb::SlotState {
                    slot: x.slot.to_string(),
                    version: x.version.to_string(),
                    state: x.state.name().to_owned(),
                    warm_until_ms: match x.state {
                        SlotState::Warm { until_ms } => until_ms,
                        _ => 0,
                    },
                    port: x.port.into(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::SlotState> for SlotStatus {
    type Error = InvalidMessage;
    fn try_from(x: pb::SlotState) -> Result<Self, InvalidMessage> {
        const T: &str = "SlotState";
        Ok(SlotStatus {
            slot: Slot::parse(&x.slot).ok_or_else(|| bad(T, "slot", format!("unknown slot {:?}", x.slot)))?,
            version: Version::new(x.version).map_err(|e| bad(T, "version", e))?,
            state: match x.state.as_str() {
                "live" => SlotState::Live,
                "warm" => SlotState::Warm {
                    until_ms: x.warm_until_ms,
                },
                "ready" => SlotState::Ready,
                "preview" => SlotState::Preview,
                "stopped" => SlotState::Stopped,
                other => return Err(bad(T, "state", format!("unknown state {other:?}"))),
            },
            port: u16::try_from(x.port).map_err(|_| bad(T, "port", format!("{} is not a port", x.port)))?,
        })
    }
}

// ── promote ───────────────────────────────────────────────────────────

impl From<&PromoteCommand> for pb::Promote {
    fn from(c: &PromoteCommand) -> Self {
        pb::Promote {
            op_id: c.op_id.clone(),
            app: c.app.to_string(),
            slot: c.slot.to_string(),
            keep_warm_ms: ms(c.keep_warm),
        }
    }
}

impl TryFrom<pb::Promote> for PromoteCommand {
    type Error = InvalidMessage;
    fn try_from(p: pb::Promote) -> Result<Self, InvalidMessage> {
        const T: &str = "Promote";
        if p.op_id.is_empty() || p.op_id.len() > 128 {
            return Err(bad(T, "op_id", "must be 1 to 128 characters"));
        }
        Ok(PromoteCommand {
            op_id: p.op_id,
            app: AppName::new(p.app).map_err(|e| bad(T, "app", e))?,
            slot: Slot::parse(&p.slot).ok_or_else(|| bad(T, "slot", format!("unknown slot {:?}", p.slot)))?,
            keep_warm: Duration::from_millis(p.keep_warm_ms),
        })
    }
}

impl TryFrom<pb::AppState> for AppStatus {
    type Error = InvalidMessage;
    fn try_from(s: pb::AppState) -> Result<Self, InvalidMessage> {
        const T: &str = "AppState";
        Ok(AppStatus {
            app: AppName::new(s.app).map_err(|e| bad(T, "app", e))?,
            current: opt_version(T, "current", s.current)?,
            previous: opt_version(T, "previous", s.previous)?,
            last_known_good: opt_version(T, "last_known_good", s.last_known_good)?,
            releases: s
                .releases
                .into_iter()
                .map(|r| Version::new(r).map_err(|e| bad(T, "releases", e)))
                .collect::<Result<_, _>>()?,
            health: pb::Health::try_from(s.health).unwrap_or(pb::Health::Unknown).into(),
            health_reason: s.health_reason,
            inflight_op: Some(s.inflight_op).filter(|o| !o.is_empty()),
            config_revision: Some(s.config_revision).filter(|r| *r > 0),
            slots: s
                .slots
                .into_iter()
                .map(SlotStatus::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

// ── events and reports ────────────────────────────────────────────────

impl From<EventKind> for pb::EventKind {
    fn from(k: EventKind) -> Self {
        match k {
            EventKind::Started => pb::EventKind::Started,
            EventKind::Succeeded => pb::EventKind::Succeeded,
            EventKind::Failed => pb::EventKind::Failed,
            EventKind::Info => pb::EventKind::Info,
        }
    }
}

impl From<&StepEvent> for pb::OpEvent {
    fn from(e: &StepEvent) -> Self {
        pb::OpEvent {
            op_id: e.op_id.clone(),
            app: e.app.to_string(),
            step: e.step.as_str().to_owned(),
            kind: pb::EventKind::from(e.kind) as i32,
            message: e.message.clone(),
            at_unix_ms: e.at_unix_ms,
        }
    }
}

impl TryFrom<pb::OpEvent> for StepEvent {
    type Error = InvalidMessage;
    fn try_from(e: pb::OpEvent) -> Result<Self, InvalidMessage> {
        const T: &str = "OpEvent";
        Ok(StepEvent {
            op_id: e.op_id,
            app: AppName::new(e.app).map_err(|err| bad(T, "app", err))?,
            step: e.step.parse::<Step>().map_err(|err| bad(T, "step", err))?,
            kind: match pb::EventKind::try_from(e.kind) {
                Ok(pb::EventKind::Started) => EventKind::Started,
                Ok(pb::EventKind::Succeeded) => EventKind::Succeeded,
                Ok(pb::EventKind::Failed) => EventKind::Failed,
                Ok(pb::EventKind::Info) => EventKind::Info,
                _ => return Err(bad(T, "kind", format!("unknown value {}", e.kind))),
            },
            message: e.message,
            at_unix_ms: e.at_unix_ms,
        })
    }
}

impl From<Outcome> for pb::Outcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Succeeded => pb::Outcome::Succeeded,
            Outcome::FailedRestored => pb::Outcome::FailedRestored,
            Outcome::FailedRestoreFailed => pb::Outcome::FailedRestoreFailed,
            Outcome::Refused => pb::Outcome::Refused,
        }
    }
}

impl From<&OpReport> for pb::OpResult {
    fn from(r: &OpReport) -> Self {
        pb::OpResult {
            op_id: r.op_id.clone(),
            app: r.app.to_string(),
            version: r.version.to_string(),
            outcome: pb::Outcome::from(r.outcome) as i32,
            reason: r.reason.clone(),
            restore_detail: r.restore_detail.clone(),
            state: Some((&r.state).into()),
        }
    }
}

impl TryFrom<pb::OpResult> for OpReport {
    type Error = InvalidMessage;
    fn try_from(r: pb::OpResult) -> Result<Self, InvalidMessage> {
        const T: &str = "OpResult";
        Ok(OpReport {
            op_id: r.op_id,
            app: AppName::new(r.app).map_err(|e| bad(T, "app", e))?,
            version: Version::new(r.version).map_err(|e| bad(T, "version", e))?,
            outcome: match pb::Outcome::try_from(r.outcome) {
                Ok(pb::Outcome::Succeeded) => Outcome::Succeeded,
                Ok(pb::Outcome::FailedRestored) => Outcome::FailedRestored,
                Ok(pb::Outcome::FailedRestoreFailed) => Outcome::FailedRestoreFailed,
                Ok(pb::Outcome::Refused) => Outcome::Refused,
                _ => return Err(bad(T, "outcome", format!("unknown value {}", r.outcome))),
            },
            reason: r.reason,
            restore_detail: r.restore_detail,
            state: r.state.ok_or_else(|| bad(T, "state", "missing"))?.try_into()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstallSpec {
        convoy_common::spec::AppSpec::parse(
            "t.toml",
            r#"
name = "demo"
install_path = "/opt/demo"
units = ["demo.service"]
[[health.checks]]
type = "http"
url = "http://127.0.0.1:8080/health"
[[health.checks]]
type = "systemd"
unit = "demo.service"
[[health.checks]]
type = "tcp"
address = "127.0.0.1:8080"
[[health.checks]]
type = "command"
command = ["/bin/true"]
[hooks.validate]
command = ["bin/check"]
"#,
        )
        .unwrap()
        .install
    }

    #[test]
    fn activate_round_trips() {
        let cmd = ActivateCommand {
            op_id: "op-1".into(),
            spec: spec(),
            version: Version::new("2.0.0").unwrap(),
            digest: Digest::of_bytes(b"x"),
            size: 42,
            signature: Some(vec![7; 64]),
            manifest: Some(Digest::of_bytes(b"m")),
            config: None,
        };
        let wire = pb::Activate::from(&cmd);
        assert_eq!(ActivateCommand::try_from(wire).unwrap(), cmd);
        let mut wire = pb::Activate::from(&cmd);
        wire.manifest_digest = "not hex".into();
        assert_eq!(ActivateCommand::try_from(wire).unwrap_err().field, "manifest_digest");
    }

    #[test]
    fn hostile_activate_is_refused_at_the_edge() {
        let cmd = ActivateCommand {
            op_id: "op-1".into(),
            spec: spec(),
            version: Version::new("2.0.0").unwrap(),
            digest: Digest::of_bytes(b"x"),
            size: 42,
            signature: None,
            manifest: None,
            config: None,
        };
        let mut wire = pb::Activate::from(&cmd);
        wire.version = "../../etc".into();
        let err = ActivateCommand::try_from(wire).unwrap_err();
        assert_eq!(err.field, "version");

        let mut wire = pb::Activate::from(&cmd);
        wire.spec.as_mut().unwrap().install_path = "/etc".into();
        let err = ActivateCommand::try_from(wire).unwrap_err();
        assert_eq!(err.field, "install_path");
    }
}

impl From<&Measurement> for pb::Measurement {
    fn from(m: &Measurement) -> Self {
        pb::Measurement {
            metric: m.metric.clone(),
            hosts: m.hosts.iter().map(|h| h.to_string()).collect(),
            query: m.query.clone(),
            value: m.value,
            baseline: m.baseline,
            verdict: m.judgement.as_str().into(),
            reason: m.reason.clone(),
            at_unix_ms: m.at_ms,
            max: m.max,
            min: m.min,
        }
    }
}

/// A health or dependency check on the wire.
pub fn health_check_to_pb(c: &HealthCheck) -> pb::HealthCheck {
    pb::HealthCheck {
        kind: Some(match &c.kind {
            CheckKind::Http {
                url,
                expect_status,
                body_contains,
            } => pb::health_check::Kind::Http(pb::HttpCheck {
                url: url.clone(),
                expect_status: u32::from(*expect_status),
                body_contains: body_contains.clone().unwrap_or_default(),
            }),
            CheckKind::Systemd { unit } => pb::health_check::Kind::Systemd(pb::SystemdCheck { unit: unit.clone() }),
            CheckKind::Tcp { address } => pb::health_check::Kind::Tcp(pb::TcpCheck {
                address: address.clone(),
            }),
            CheckKind::Command { argv } => pb::health_check::Kind::Command(pb::CommandCheck { argv: argv.clone() }),
        }),
        interval_ms: ms(c.interval),
        timeout_ms: ms(c.timeout),
    }
}

/// A health or dependency check from the wire, checked.
pub fn health_check_from_pb(c: pb::HealthCheck) -> Result<HealthCheck, InvalidMessage> {
    if c.interval_ms == 0 || c.timeout_ms == 0 {
        return Err(bad(
            "HealthCheck",
            "interval_ms",
            "interval and timeout must be above zero",
        ));
    }
    let kind = match c.kind {
        Some(pb::health_check::Kind::Http(h)) => {
            if !h.url.starts_with("http://") {
                return Err(bad("HttpCheck", "url", "must be an http:// URL"));
            }
            CheckKind::Http {
                url: h.url,
                expect_status: u16::try_from(h.expect_status)
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| bad("HttpCheck", "expect_status", "not an HTTP status"))?,
                body_contains: Some(h.body_contains).filter(|b| !b.is_empty()),
            }
        }
        Some(pb::health_check::Kind::Systemd(sd)) => {
            // A blue-green check names its slot's unit with {{slot}}.
            let unit = convoy_common::slots::fill(&sd.unit, convoy_common::slots::Slot::Blue, 1);
            if !spec::valid_unit_name(&unit) {
                return Err(bad("SystemdCheck", "unit", "not a unit name"));
            }
            CheckKind::Systemd { unit: sd.unit }
        }
        Some(pb::health_check::Kind::Tcp(t)) => {
            if !t.address.contains(':') {
                return Err(bad("TcpCheck", "address", "must be host:port"));
            }
            CheckKind::Tcp { address: t.address }
        }
        Some(pb::health_check::Kind::Command(c)) => {
            if c.argv.first().is_none_or(|p| p.is_empty()) {
                return Err(bad("CommandCheck", "argv", "must name a program"));
            }
            CheckKind::Command { argv: c.argv }
        }
        None => return Err(bad("HealthCheck", "kind", "missing")),
    };
    Ok(HealthCheck {
        kind,
        interval: Duration::from_millis(c.interval_ms),
        timeout: Duration::from_millis(c.timeout_ms),
    })
}
