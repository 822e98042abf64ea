//! App specs: how an app is installed, restarted and checked on a host, and
//! which environments it moves through. Written by operators as TOML on the
//! controller; the install part travels to agents with every activation.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::analysis::{AnalysisSpec, RawAnalysis};
use crate::names::{AppName, InvalidName};

/// The default ordered environments.
pub const DEFAULT_ENVIRONMENTS: [&str; 3] = ["development", "staging", "production"];

/// What the agent needs to install and check one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallSpec {
    pub app: AppName,
    /// Always resolves to one complete release.
    pub install_path: PathBuf,
    pub switch: SwitchMode,
    /// systemd units restarted on every switch, in order.
    pub units: Vec<String>,
    pub health: HealthPolicy,
    pub hooks: Vec<Hook>,
    /// Files and directories outside the install path (configuration,
    /// state) archived before every switch and restored on failure.
    pub backup_paths: Vec<PathBuf>,
    /// Releases kept on each host (the current and last-known-good ones are
    /// always kept).
    pub keep_releases: u32,
    pub keep_backups: u32,
    /// Keep setuid/setgid bits from the archive instead of refusing them.
    pub allow_setid: bool,
    /// What a release archive may expand to, checked at push and on every
    /// host while it unpacks.
    pub limits: ArchiveLimits,
    /// Two slots instead of one install (`[blue_green]`): `units` are
    /// templates, each slot lives at `<install_path>/<slot>`.
    #[serde(default)]
    pub blue_green: Option<crate::slots::BlueGreen>,
    /// The user the app runs as: rendered configuration files are owned
    /// by it. `None`: root.
    #[serde(default)]
    pub user: Option<String>,
}

/// Bounds on a release archive. The defaults suit a typical service; an
/// app with a larger tree raises them in its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveLimits {
    /// Sum of the sizes of its files, unpacked, in bytes.
    pub max_unpacked_size: u64,
    pub max_entries: u64,
    /// Unpacked size over compressed size: an archive that expands more is
    /// refused (a decompression bomb).
    pub max_ratio: u32,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            max_unpacked_size: 4 << 30,
            max_entries: 100_000,
            max_ratio: 200,
        }
    }
}

/// A size such as `512MiB`, `4GiB`, `2GB` or a number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 4GiB or a number of bytes)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// How the install path is switched to a new release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchMode {
    /// `install_path` is a symlink, replaced by renaming a new symlink over it.
    Symlink,
    /// `install_path` is a real directory, swapped with the new tree by
    /// `renameat2(RENAME_EXCHANGE)`.
    Exchange,
}

/// When a hook runs, in activation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPoint {
    /// The new tree is staged, nothing live has changed.
    BeforeInstall,
    /// The install path points at the new tree; units not yet restarted.
    AfterInstall,
    /// Right before the restart (e.g. migrations).
    BeforeActivate,
    /// Right after the restart, before the health checks.
    AfterActivate,
    /// After the health checks passed; failure restores the old release.
    Validate,
    /// Before switching back to the previous release.
    BeforeRollback,
}

impl HookPoint {
    pub const ALL: [HookPoint; 6] = [
        HookPoint::BeforeInstall,
        HookPoint::AfterInstall,
        HookPoint::BeforeActivate,
        HookPoint::AfterActivate,
        HookPoint::Validate,
        HookPoint::BeforeRollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HookPoint::BeforeInstall => "before_install",
            HookPoint::AfterInstall => "after_install",
            HookPoint::BeforeActivate => "before_activate",
            HookPoint::AfterActivate => "after_activate",
            HookPoint::Validate => "validate",
            HookPoint::BeforeRollback => "before_rollback",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub point: HookPoint,
    /// Program and arguments; relative programs resolve against the new
    /// release's root.
    pub argv: Vec<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthPolicy {
    pub checks: Vec<HealthCheck>,
    /// Every check must stay passing this long...
    pub min_healthy_time: Duration,
    /// ...before this deadline, counted from the restart.
    pub healthy_deadline: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckKind {
    /// GET `url`; passes on `expect_status` and, if set, a body containing
    /// `body_contains`.
    Http {
        url: String,
        expect_status: u16,
        body_contains: Option<String>,
    },
    /// The unit is active and systemd did not restart it in the window.
    Systemd { unit: String },
    /// A TCP connection to `address` (host:port) succeeds.
    Tcp { address: String },
    /// The command exits 0.
    Command { argv: Vec<String> },
}

impl CheckKind {
    /// The check's `type` in the spec.
    pub fn type_name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Systemd { .. } => "systemd",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Command { .. } => "command",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            CheckKind::Http { url, .. } => format!("http {url}"),
            CheckKind::Systemd { unit } => format!("systemd {unit}"),
            CheckKind::Tcp { address } => format!("tcp {address}"),
            CheckKind::Command { argv } => format!("command {}", argv.join(" ")),
        }
    }
}

/// The full spec, as the controller keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSpec {
    pub install: InstallSpec,
    pub environments: Vec<String>,
    /// Labels a host must carry, beyond `env`, to be a target of this app.
    pub selector: BTreeMap<String, String>,
    /// A version enters an environment only after it completed in the one
    /// listed before (default); false for independent environments.
    pub promotion: bool,
    /// Environments whose rollouts wait for another operator's approval.
    pub approval: Vec<String>,
    /// Metric gates measured while a deploy moves hosts.
    pub analysis: Option<AnalysisSpec>,
    /// When rollouts may start; empty: any time.
    pub windows: Vec<crate::window::Window>,
    pub preflight: Preflight,
    /// How requests reach the hosts: drained around each activation.
    pub traffic: Option<crate::traffic::TrafficSpec>,
    /// A deploy is refused when a key of the configuration is set in the
    /// environment before and not in this one, or the other way round.
    pub strict_parity: bool,
}

/// What every target must have before a deploy moves any byte to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// Free space needed beyond the release's unpacked size.
    pub free_space_margin: u64,
    /// Memory the host must have available; 0: not checked.
    pub min_memory: u64,
    /// Dependency checks (the database answers, ...), run once on each target.
    pub checks: Vec<HealthCheck>,
}

impl Default for Preflight {
    fn default() -> Self {
        Preflight {
            free_space_margin: 256 << 20,
            min_memory: 0,
            checks: vec![],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

// The TOML shape, kept apart from the domain types so that defaults and
// validation live in one place.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    install_path: PathBuf,
    units: Vec<String>,
    #[serde(default)]
    environments: Option<Vec<String>>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    switch: Option<String>,
    #[serde(default)]
    hooks: BTreeMap<String, RawHook>,
    #[serde(default)]
    backup_paths: Vec<PathBuf>,
    #[serde(default)]
    keep_releases: Option<u32>,
    #[serde(default)]
    keep_backups: Option<u32>,
    #[serde(default)]
    allow_setid: bool,
    #[serde(default)]
    max_unpacked_size: Option<RawSize>,
    #[serde(default)]
    max_entries: Option<u64>,
    #[serde(default)]
    max_ratio: Option<u32>,
    #[serde(default)]
    promotion: Option<bool>,
    #[serde(default)]
    approval: Vec<String>,
    #[serde(default)]
    analysis: Option<RawAnalysis>,
    #[serde(default)]
    windows: Vec<String>,
    #[serde(default)]
    preflight: RawPreflight,
    #[serde(default)]
    traffic: Option<crate::traffic::RawTraffic>,
    #[serde(default)]
    blue_green: Option<crate::slots::RawBlueGreen>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    parity: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPreflight {
    free_space_margin: Option<RawSize>,
    min_memory: Option<RawSize>,
    #[serde(default)]
    checks: Vec<RawCheck>,
}

/// A size in the spec: a number of bytes, or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    command: Vec<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    min_healthy_time: Option<String>,
    healthy_deadline: Option<String>,
    #[serde(default)]
    checks: Vec<RawCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(rename = "type")]
    kind: String,
    url: Option<String>,
    expect_status: Option<u16>,
    body_contains: Option<String>,
    unit: Option<String>,
    address: Option<String>,
    command: Option<Vec<String>>,
    interval: Option<String>,
    timeout: Option<String>,
}

/// A user name as `useradd` takes it.
pub fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && !u.starts_with('-')
        && u.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

pub fn valid_unit_name(unit: &str) -> bool {
    const SUFFIXES: [&str; 4] = [".service", ".socket", ".target", ".timer"];
    SUFFIXES.iter().any(|s| unit.ends_with(s) && unit.len() > s.len())
        && unit.len() <= 255
        && unit.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@:\\".contains(c))
}

impl AppSpec {
    /// Parses and validates a spec; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, SpecError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| SpecError::Syntax {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |field: &str, message: String| SpecError::Invalid {
            file: file.to_owned(),
            field: field.to_owned(),
            message,
        };
        let from_name = |field: &str, e: InvalidName| invalid(field, e.to_string());

        let app = AppName::new(raw.name).map_err(|e| from_name("name", e))?;
        check_install_path(&raw.install_path).map_err(|m| invalid("install_path", m))?;
        if raw.units.is_empty() {
            return Err(invalid("units", "at least one systemd unit is required".into()));
        }
        for (i, u) in raw.units.iter().enumerate() {
            if !valid_unit_name(u) {
                return Err(invalid(
                    &format!("units[{i}]"),
                    format!("{u:?} is not a systemd unit name (e.g. \"{app}.service\")"),
                ));
            }
        }
        let environments: Vec<String> = raw
            .environments
            .unwrap_or_else(|| DEFAULT_ENVIRONMENTS.iter().map(|s| s.to_string()).collect());
        if environments.is_empty() {
            return Err(invalid("environments", "must list at least one".into()));
        }
        for (i, e) in environments.iter().enumerate() {
            crate::names::AppName::new(e.clone())
                .map_err(|err| invalid(&format!("environments[{i}]"), err.why.to_string()))?;
            if environments[..i].contains(e) {
                return Err(invalid(&format!("environments[{i}]"), format!("{e:?} is listed twice")));
            }
        }
        for (i, e) in raw.approval.iter().enumerate() {
            if !environments.contains(e) {
                return Err(invalid(
                    &format!("approval[{i}]"),
                    format!("{e:?} is not one of the environments ({})", environments.join(", ")),
                ));
            }
        }
        if raw.selector.contains_key("env") {
            return Err(invalid(
                "selector.env",
                "the environment is chosen with --env at deploy time, not in the selector".into(),
            ));
        }

        let dur = |field: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| invalid(field, format!("{s:?} is not a duration ({e}); try \"5s\""))),
        };
        let min_healthy_time = dur(
            "health.min_healthy_time",
            raw.health.min_healthy_time,
            Duration::from_secs(1),
        )?;
        let healthy_deadline = dur(
            "health.healthy_deadline",
            raw.health.healthy_deadline,
            Duration::from_secs(30),
        )?;
        if healthy_deadline <= min_healthy_time {
            return Err(invalid(
                "health.healthy_deadline",
                format!(
                    "must be longer than min_healthy_time ({})",
                    humantime::format_duration(min_healthy_time)
                ),
            ));
        }
        let checks = parse_checks("health.checks", raw.health.checks, &invalid)?;
        let switch = match raw.switch.as_deref() {
            None | Some("symlink") => SwitchMode::Symlink,
            Some("exchange") => SwitchMode::Exchange,
            Some(other) => {
                return Err(invalid(
                    "switch",
                    format!("unknown switch mode {other:?} (expected \"symlink\" or \"exchange\")"),
                ))
            }
        };
        let mut hooks = Vec::new();
        for (name, h) in raw.hooks {
            let field = format!("hooks.{name}");
            let point = HookPoint::parse(&name).ok_or_else(|| {
                let all: Vec<&str> = HookPoint::ALL.iter().map(|h| h.as_str()).collect();
                invalid(&field, format!("unknown hook (expected one of {})", all.join(", ")))
            })?;
            if h.command.is_empty() || h.command[0].is_empty() {
                return Err(invalid(&format!("{field}.command"), "must name a program".into()));
            }
            let timeout = dur(&format!("{field}.timeout"), h.timeout, Duration::from_secs(60))?;
            if timeout.is_zero() {
                return Err(invalid(&format!("{field}.timeout"), "must be above zero".into()));
            }
            hooks.push(Hook {
                point,
                argv: h.command,
                timeout,
            });
        }
        hooks.sort_by_key(|h| h.point);
        for (i, p) in raw.backup_paths.iter().enumerate() {
            let field = format!("backup_paths[{i}]");
            if !p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            {
                return Err(invalid(
                    &field,
                    format!("{} must be an absolute, normalised path", p.display()),
                ));
            }
            if p.starts_with(&raw.install_path) || raw.install_path.starts_with(p) {
                return Err(invalid(
                    &field,
                    format!("{} overlaps the install path; releases are kept already", p.display()),
                ));
            }
            if p == Path::new("/")
                || p.starts_with("/var/lib/convoy")
                || p.starts_with("/proc")
                || p.starts_with("/sys")
            {
                return Err(invalid(&field, format!("{} cannot be backed up", p.display())));
            }
        }
        let keep_releases = raw.keep_releases.unwrap_or(5);
        if keep_releases < 2 {
            return Err(invalid(
                "keep_releases",
                "must be at least 2 (the current release and one to roll back to)".into(),
            ));
        }
        let defaults = ArchiveLimits::default();
        let size = |field: &str, v: Option<RawSize>, default: u64| match v {
            None => Ok(default),
            Some(RawSize::Bytes(n)) => Ok(n),
            Some(RawSize::Text(t)) => parse_size(&t).map_err(|e| invalid(field, e)),
        };
        let max_unpacked_size = size("max_unpacked_size", raw.max_unpacked_size, defaults.max_unpacked_size)?;
        let preflight = Preflight {
            free_space_margin: size(
                "preflight.free_space_margin",
                raw.preflight.free_space_margin,
                Preflight::default().free_space_margin,
            )?,
            min_memory: size("preflight.min_memory", raw.preflight.min_memory, 0)?,
            checks: parse_checks("preflight.checks", raw.preflight.checks, &invalid)?,
        };
        let limits = ArchiveLimits {
            max_unpacked_size,
            max_entries: raw.max_entries.unwrap_or(defaults.max_entries),
            max_ratio: raw.max_ratio.unwrap_or(defaults.max_ratio),
        };
        for (field, zero) in [
            ("max_unpacked_size", limits.max_unpacked_size == 0),
            ("max_entries", limits.max_entries == 0),
            ("max_ratio", limits.max_ratio == 0),
        ] {
            if zero {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        let analysis = raw.analysis.map(|a| a.check(invalid)).transpose()?;
        let windows = raw
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| crate::window::Window::parse(w).map_err(|e| invalid(&format!("windows[{i}]"), e)))
            .collect::<Result<_, _>>()?;
        let traffic = raw.traffic.map(|t| t.check(invalid)).transpose()?;
        let blue_green = raw.blue_green.map(|b| b.check(invalid)).transpose()?;
        if let Some(u) = &raw.user {
            if !valid_user(u) {
                return Err(invalid("user", format!("{u:?} is not a user name")));
            }
        }
        check_slots(
            blue_green.as_ref(),
            traffic.as_ref(),
            &raw.units,
            switch,
            &raw.backup_paths,
            &checks,
            &invalid,
        )?;
        let strict_parity = match raw.parity.as_deref() {
            None | Some("off") => false,
            Some("strict") => true,
            Some(other) => return Err(invalid("parity", format!("{other:?} is not \"strict\" or \"off\""))),
        };
        Ok(AppSpec {
            strict_parity,
            traffic,
            preflight,
            windows,
            analysis,
            install: InstallSpec {
                app,
                install_path: raw.install_path,
                switch,
                units: raw.units,
                health: HealthPolicy {
                    checks,
                    min_healthy_time,
                    healthy_deadline,
                },
                hooks,
                backup_paths: raw.backup_paths,
                keep_releases,
                keep_backups: raw.keep_backups.unwrap_or(5).max(1),
                allow_setid: raw.allow_setid,
                limits,
                blue_green,
                user: raw.user,
            },
            environments,
            selector: raw.selector,
            promotion: raw.promotion.unwrap_or(true),
            approval: raw.approval,
        })
    }
}

/// What `[blue_green]` asks of the rest of the spec, and the slot
/// placeholders that only it allows.
fn check_slots(
    blue_green: Option<&crate::slots::BlueGreen>,
    traffic: Option<&crate::traffic::TrafficSpec>,
    units: &[String],
    switch: SwitchMode,
    backup_paths: &[PathBuf],
    checks: &[HealthCheck],
    invalid: &dyn Fn(&str, String) -> SpecError,
) -> Result<(), SpecError> {
    use crate::slots::{check_texts, has_placeholder, is_template};
    let Some(_) = blue_green else {
        for (i, c) in checks.iter().enumerate() {
            if check_texts(c).iter().any(|t| has_placeholder(t)) {
                return Err(invalid(
                    &format!("health.checks[{i}]"),
                    "{{slot}} and {{port}} need [blue_green]".into(),
                ));
            }
        }
        if let Some(crate::traffic::Provider::Haproxy { server, .. }) = traffic.map(|t| &t.provider) {
            if server.contains("{{slot}}") {
                return Err(invalid("traffic.server", "{{slot}} needs [blue_green]".into()));
            }
        }
        return Ok(());
    };
    for (i, u) in units.iter().enumerate() {
        if !is_template(u) {
            return Err(invalid(
                &format!("units[{i}]"),
                format!("{u:?}: with [blue_green] every unit is a template that each slot runs an instance of, e.g. \"web@.service\""),
            ));
        }
    }
    if switch != SwitchMode::Symlink {
        return Err(invalid(
            "switch",
            "[blue_green] switches slots, not the install path: leave switch out (or \"symlink\")".into(),
        ));
    }
    if !backup_paths.is_empty() {
        return Err(invalid(
            "backup_paths",
            "does not apply with [blue_green]: the live slot is never touched, so there is nothing to restore".into(),
        ));
    }
    match traffic.map(|t| &t.provider) {
        None => {
            return Err(invalid(
                "blue_green",
                "needs [traffic]: the switch between slots is a traffic switch".into(),
            ))
        }
        Some(crate::traffic::Provider::Haproxy { server, .. }) if !server.contains("{{slot}}") => {
            return Err(invalid(
                "traffic.server",
                format!("{server:?}: with [blue_green] each slot is its own HAProxy server; name it with {{{{slot}}}}, e.g. \"{{{{host}}}}-{{{{slot}}}}\""),
            ))
        }
        Some(_) => {}
    }
    Ok(())
}

/// Health or dependency checks as the spec lists them under `prefix`.
fn parse_checks(
    prefix: &str,
    raw: Vec<RawCheck>,
    invalid: &dyn Fn(&str, String) -> SpecError,
) -> Result<Vec<HealthCheck>, SpecError> {
    let dur = |field: &str, v: Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(&s)
            .map_err(|e| invalid(field, format!("{s:?} is not a duration ({e}); try \"5s\""))),
    };
    let mut checks = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let field = |f: &str| format!("{prefix}[{i}].{f}");
        let interval = dur(&field("interval"), c.interval, Duration::from_millis(500))?;
        let timeout = dur(&field("timeout"), c.timeout, Duration::from_secs(2))?;
        if interval.is_zero() || timeout.is_zero() {
            return Err(invalid(
                &field("interval"),
                "interval and timeout must be above zero".into(),
            ));
        }
        let kind = match c.kind.as_str() {
            "http" => {
                let url = c
                    .url
                    .ok_or_else(|| invalid(&field("url"), "required for an http check".into()))?;
                if !url.starts_with("http://") || url.len() <= "http://".len() {
                    return Err(invalid(
                        &field("url"),
                        format!("{url:?} must be an http:// URL (the agent checks the app on its own host)"),
                    ));
                }
                let expect_status = c.expect_status.unwrap_or(200);
                if !(100..=599).contains(&expect_status) {
                    return Err(invalid(
                        &field("expect_status"),
                        format!("{expect_status} is not an HTTP status"),
                    ));
                }
                CheckKind::Http {
                    url,
                    expect_status,
                    body_contains: c.body_contains,
                }
            }
            "systemd" => {
                let unit = c
                    .unit
                    .ok_or_else(|| invalid(&field("unit"), "required for a systemd check".into()))?;
                // A slot's placeholders are checked as a slot fills them.
                if !valid_unit_name(&crate::slots::fill(&unit, crate::slots::Slot::Blue, 1)) {
                    return Err(invalid(&field("unit"), format!("{unit:?} is not a systemd unit name")));
                }
                CheckKind::Systemd { unit }
            }
            "tcp" => {
                let address = c
                    .address
                    .ok_or_else(|| invalid(&field("address"), "required for a tcp check".into()))?;
                match crate::slots::fill(&address, crate::slots::Slot::Blue, 1).rsplit_once(':') {
                    Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {}
                    _ => {
                        return Err(invalid(
                            &field("address"),
                            format!("{address:?} must be host:port, e.g. \"127.0.0.1:5432\""),
                        ))
                    }
                }
                CheckKind::Tcp { address }
            }
            "command" => {
                let argv = c
                    .command
                    .ok_or_else(|| invalid(&field("command"), "required for a command check".into()))?;
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(invalid(&field("command"), "must name a program".into()));
                }
                CheckKind::Command { argv }
            }
            other => {
                return Err(invalid(
                    &field("type"),
                    format!("unknown check type {other:?} (expected \"http\", \"tcp\", \"systemd\" or \"command\")"),
                ))
            }
        };
        checks.push(HealthCheck {
            kind,
            interval,
            timeout,
        });
    }
    Ok(checks)
}

/// An install path must be absolute, normalised, and not a system directory.
pub fn check_install_path(p: &Path) -> Result<(), String> {
    if !p.is_absolute() {
        return Err(format!("{} must be an absolute path", p.display()));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("{} must not contain '.' or '..'", p.display()));
    }
    const PROTECTED: [&str; 12] = [
        "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/proc", "/run", "/sbin", "/sys", "/usr", "/var",
    ];
    if PROTECTED.iter().any(|s| p == Path::new(s)) || p.starts_with("/var/lib/convoy") {
        return Err(format!("{} is a system or convoy directory", p.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_keys_match_the_code() {
        use crate::configdoc::{documented_keys, prefixed};
        use serde_aux::serde_introspection::serde_introspect;
        let documented = documented_keys(
            include_str!("../../docs/config.md"),
            "## App spec (`apps_dir/<app>.toml`)",
        );
        let mut code = prefixed("", serde_introspect::<RawSpec>());
        code.extend(prefixed("health.", serde_introspect::<RawHealth>()));
        code.extend(prefixed("health.checks[].", serde_introspect::<RawCheck>()));
        code.extend(prefixed("hooks.<point>.", serde_introspect::<RawHook>()));
        code.extend(prefixed("analysis.", crate::analysis::raw_keys()));
        code.extend(prefixed("preflight.", serde_introspect::<RawPreflight>()));
        code.extend(prefixed("traffic.", crate::traffic::raw_keys()));
        code.extend(prefixed("blue_green.", crate::slots::raw_keys()));
        code.extend(prefixed("preflight.checks[].", serde_introspect::<RawCheck>()));
        code.extend(prefixed("analysis.metrics[].", crate::analysis::raw_metric_keys()));
        code.insert("selector.<label>".into());
        assert_eq!(documented, code, "docs/config.md, app spec section");
    }

    const GOOD: &str = r#"
name = "demo"
install_path = "/opt/demo"
units = ["demo.service"]

[health]
min_healthy_time = "1s"
healthy_deadline = "15s"

[[health.checks]]
type = "http"
url = "http://127.0.0.1:8080/health"
interval = "200ms"
"#;

    #[test]
    fn parses_good_spec_with_defaults() {
        let s = AppSpec::parse("demo.toml", GOOD).unwrap();
        assert_eq!(s.install.app.as_str(), "demo");
        assert_eq!(s.environments, DEFAULT_ENVIRONMENTS);
        assert_eq!(s.install.health.checks.len(), 1);
        assert_eq!(s.install.health.checks[0].interval, Duration::from_millis(200));
        assert_eq!(s.install.health.checks[0].timeout, Duration::from_secs(2));
    }

    #[test]
    fn archive_limits_default_and_parse() {
        let s = AppSpec::parse("demo.toml", GOOD).unwrap();
        assert_eq!(s.install.limits, ArchiveLimits::default());
        let with = |extra: &str| AppSpec::parse("demo.toml", &format!("{extra}\n{GOOD}"));
        let l = with("max_unpacked_size = \"512MiB\"\nmax_entries = 10\nmax_ratio = 50")
            .unwrap()
            .install
            .limits;
        assert_eq!((l.max_unpacked_size, l.max_entries, l.max_ratio), (512 << 20, 10, 50));
        assert_eq!(
            with("max_unpacked_size = 1000")
                .unwrap()
                .install
                .limits
                .max_unpacked_size,
            1000
        );
        assert_eq!(
            with("max_unpacked_size = \"2GB\"")
                .unwrap()
                .install
                .limits
                .max_unpacked_size,
            2_000_000_000
        );
        for (extra, expect) in [
            (
                "max_unpacked_size = \"lots\"",
                "max_unpacked_size: \"lots\" is not a size",
            ),
            ("max_unpacked_size = \"4 parsecs\"", "unknown unit \"parsecs\""),
            ("max_ratio = 0", "max_ratio: must be at least 1"),
            ("max_entries = 0", "max_entries: must be at least 1"),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains(expect), "{extra}: {e}");
        }
    }

    /// Each bad spec must fail with an error naming the field.
    fn check_err(replace: (&str, &str), expect: &str) {
        let text = GOOD.replace(replace.0, replace.1);
        let err = AppSpec::parse("demo.toml", &text).unwrap_err().to_string();
        assert!(err.contains(expect), "error {err:?} should contain {expect:?}");
        assert!(err.starts_with("demo.toml: "), "{err}");
    }

    const BLUE_GREEN: &str = r#"
name = "web"
install_path = "/opt/web"
units = ["web@.service"]

[[health.checks]]
type = "http"
url = "http://127.0.0.1:{{port}}/health"

[[health.checks]]
type = "systemd"
unit = "web@{{slot}}.service"

[blue_green]
blue_port = 8081
green_port = 8082
keep_warm = "5m"

[traffic]
kind = "haproxy"
runtime_api = "127.0.0.1:9999"
backend = "web"
server = "{{host}}-{{slot}}"
"#;

    #[test]
    fn a_blue_green_spec_and_its_mistakes() {
        let spec = AppSpec::parse("web.toml", BLUE_GREEN).unwrap();
        let bg = spec.install.blue_green.clone().unwrap();
        assert_eq!(
            (bg.blue_port, bg.green_port, bg.keep_warm),
            (8081, 8082, Duration::from_secs(300))
        );
        let green = crate::slots::policy_for(&spec.install.health, crate::slots::Slot::Green, 8082);
        assert_eq!(green.checks[0].kind.describe(), "http http://127.0.0.1:8082/health");
        assert_eq!(green.checks[1].kind.describe(), "systemd web@green.service");
        let err = |from: &str, to: &str, expect: &str| {
            let e = AppSpec::parse("web.toml", &BLUE_GREEN.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{e:?} should contain {expect:?}");
        };
        err(
            "[\"web@.service\"]",
            "[\"web.service\"]",
            "units[0]: \"web.service\": with [blue_green] every unit is a template",
        );
        err(
            "green_port = 8082",
            "green_port = 8081",
            "blue_green.green_port: 8081 is blue_port too",
        );
        err(
            "keep_warm = \"5m\"",
            "keep_warm = \"soon\"",
            "blue_green.keep_warm: \"soon\" is not a duration",
        );
        err(
            "server = \"{{host}}-{{slot}}\"",
            "server = \"{{host}}\"",
            "traffic.server: \"{{host}}\": with [blue_green] each slot is its own HAProxy server",
        );
        err(
            "units = [",
            "backup_paths = [\"/etc/web\"]\nunits = [",
            "backup_paths: does not apply with [blue_green]",
        );
        err(
            "units = [",
            "switch = \"exchange\"\nunits = [",
            "switch: [blue_green] switches slots",
        );
        let no_traffic = BLUE_GREEN.split("[traffic]").next().unwrap();
        let e = AppSpec::parse("web.toml", no_traffic).unwrap_err().to_string();
        assert!(e.contains("blue_green: needs [traffic]"), "{e}");
        // Slot placeholders mean nothing without slots.
        let e = AppSpec::parse("demo.toml", &GOOD.replace("127.0.0.1:8080", "127.0.0.1:{{port}}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("{{slot}} and {{port}} need [blue_green]"), "{e}");
    }

    #[test]
    fn bad_specs_name_the_problem() {
        check_err(
            ("/opt/demo", "opt/demo"),
            "install_path: opt/demo must be an absolute path",
        );
        check_err(("/opt/demo", "/etc"), "install_path: /etc is a system");
        check_err(("/opt/demo", "/opt/../etc"), "install_path");
        check_err(("demo.service", "demo"), "units[0]");
        check_err(("\"demo\"", "\"de mo\""), "name: invalid app name");
        check_err(("\"15s\"", "\"fifteen\""), "health.healthy_deadline");
        check_err(("\"15s\"", "\"500ms\""), "must be longer than min_healthy_time");
        check_err(("type = \"http\"", "type = \"smtp\""), "health.checks[0].type");
        check_err(("http://127", "https://127"), "health.checks[0].url");
        check_err(("units =", "unitz ="), "unknown field `unitz`");
        check_err(
            ("[health]", "switch = \"copy\"\n[health]"),
            "switch: unknown switch mode",
        );
        check_err(
            ("[health]", "keep_releases = 1\n[health]"),
            "keep_releases: must be at least 2",
        );
        check_err(
            ("[health]", "backup_paths = [\"etc/demo\"]\n[health]"),
            "backup_paths[0]",
        );
        check_err(
            ("[health]", "backup_paths = [\"/opt/demo/conf\"]\n[health]"),
            "overlaps the install path",
        );
        check_err(
            ("[health]", "[hooks.before_deploy]\ncommand = [\"x\"]\n[health]"),
            "hooks.before_deploy: unknown hook",
        );
        check_err(
            ("[health]", "[hooks.validate]\ncommand = []\n[health]"),
            "hooks.validate.command",
        );
        check_err(
            ("type = \"http\"", "type = \"tcp\"\naddress = \"nope\""),
            "health.checks[0].address",
        );
    }

    #[test]
    fn approval_names_an_environment() {
        check_err(
            ("[health]", "approval = [\"prod\"]\n[health]"),
            "approval[0]: \"prod\" is not one of",
        );
        let text = GOOD.replace("[health]", "approval = [\"production\"]\n[health]");
        assert_eq!(AppSpec::parse("demo.toml", &text).unwrap().approval, ["production"]);
    }

    #[test]
    fn hooks_and_backups_parse() {
        let text = GOOD.replace(
            "[health]",
            "backup_paths = [\"/etc/demo\"]\nkeep_releases = 3\n\n[hooks.validate]\ncommand = [\"bin/check\", \"--quick\"]\ntimeout = \"5s\"\n\n[hooks.before_install]\ncommand = [\"true\"]\n\n[health]",
        );
        let s = AppSpec::parse("demo.toml", &text).unwrap().install;
        assert_eq!(s.hooks.len(), 2);
        assert_eq!(
            s.hooks[0].point,
            HookPoint::BeforeInstall,
            "hooks are sorted in activation order"
        );
        assert_eq!(s.hooks[1].timeout, Duration::from_secs(5));
        assert_eq!(s.backup_paths, vec![PathBuf::from("/etc/demo")]);
        assert_eq!(s.keep_releases, 3);
        assert_eq!(s.switch, SwitchMode::Symlink);
    }
}
