//! Blue-green on a host: the app runs as two slots, instances of systemd
//! template units (`web@blue.service`, `web@green.service`), each with its
//! own install path (`<install_path>/blue`) and port. A deploy starts the
//! new release in the idle slot while the live one serves, checks it on
//! its own port, and the controller switches traffic to it; the old slot
//! stays warm for `keep_warm`, so a rollback is a traffic switch only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::{CheckKind, HealthCheck, HealthPolicy};
use crate::Version;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    Blue,
    Green,
}

impl Slot {
    pub const BOTH: [Slot; 2] = [Slot::Blue, Slot::Green];

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Blue => "blue",
            Slot::Green => "green",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::BOTH.into_iter().find(|x| x.as_str() == s)
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::Blue => Slot::Green,
            Slot::Green => Slot::Blue,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[blue_green]` of an app spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlueGreen {
    pub blue_port: u16,
    pub green_port: u16,
    /// How long the slot that lost traffic keeps running, ready to take it
    /// back; zero stops it at the switch.
    pub keep_warm: Duration,
}

impl BlueGreen {
    pub fn port(&self, slot: Slot) -> u16 {
        match slot {
            Slot::Blue => self.blue_port,
            Slot::Green => self.green_port,
        }
    }

    /// Where a slot's release is seen: `<install_path>/<slot>`.
    pub fn path(install_path: &Path, slot: Slot) -> PathBuf {
        install_path.join(slot.as_str())
    }

    /// The environment file the slot's units read
    /// (`EnvironmentFile=<install_path>/%i.env`).
    pub fn env_file(install_path: &Path, slot: Slot) -> PathBuf {
        install_path.join(format!("{slot}.env"))
    }

    /// The text of that file.
    pub fn env_text(&self, slot: Slot, version: &Version) -> String {
        format!(
            "CONVOY_SLOT={slot}\nCONVOY_PORT={}\nCONVOY_RELEASE={version}\n",
            self.port(slot)
        )
    }
}

/// The instance of a template unit for a slot: `web@.service` →
/// `web@green.service`.
pub fn instance(template: &str, slot: Slot) -> String {
    template.replacen("@.", &format!("@{slot}."), 1)
}

/// Whether a unit name is a template (`name@.service`).
pub fn is_template(unit: &str) -> bool {
    unit.contains("@.") && !unit.starts_with('@')
}

/// `{{slot}}` and `{{port}}` of one slot put into a text.
pub fn fill(text: &str, slot: Slot, port: u16) -> String {
    text.replace("{{slot}}", slot.as_str())
        .replace("{{port}}", &port.to_string())
}

/// Whether a text names a slot placeholder.
pub fn has_placeholder(text: &str) -> bool {
    text.contains("{{slot}}") || text.contains("{{port}}")
}

/// The health policy as one slot checks it: placeholders filled.
pub fn policy_for(policy: &HealthPolicy, slot: Slot, port: u16) -> HealthPolicy {
    let mut p = policy.clone();
    for c in &mut p.checks {
        *c = check_for(c, slot, port);
    }
    p
}

fn check_for(c: &HealthCheck, slot: Slot, port: u16) -> HealthCheck {
    let f = |s: &str| fill(s, slot, port);
    let kind = match &c.kind {
        CheckKind::Http {
            url,
            expect_status,
            body_contains,
        } => CheckKind::Http {
            url: f(url),
            expect_status: *expect_status,
            body_contains: body_contains.clone(),
        },
        CheckKind::Systemd { unit } => CheckKind::Systemd { unit: f(unit) },
        CheckKind::Tcp { address } => CheckKind::Tcp { address: f(address) },
        CheckKind::Command { argv } => CheckKind::Command {
            argv: argv.iter().map(|a| f(a)).collect(),
        },
    };
    HealthCheck { kind, ..c.clone() }
}

/// The texts of a check that may hold placeholders.
pub fn check_texts(c: &HealthCheck) -> Vec<&str> {
    match &c.kind {
        CheckKind::Http { url, .. } => vec![url.as_str()],
        CheckKind::Systemd { unit } => vec![unit.as_str()],
        CheckKind::Tcp { address } => vec![address.as_str()],
        CheckKind::Command { argv } => argv.iter().map(String::as_str).collect(),
    }
}

/// What a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SlotState {
    /// Takes the traffic.
    Live,
    /// Lost the traffic at a switch and keeps running until `until_ms`
    /// (unix ms), ready to take it back.
    Warm {
        until_ms: u64,
    },
    /// Started and checked on its own port; no traffic yet.
    Ready,
    /// Being started and checked (an activation in flight).
    Preview,
    Stopped,
}

impl SlotState {
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Live => "live",
            SlotState::Warm { .. } => "warm",
            SlotState::Ready => "ready",
            SlotState::Preview => "preview",
            SlotState::Stopped => "stopped",
        }
    }

    /// Its units run.
    pub fn running(self) -> bool {
        !matches!(self, SlotState::Stopped)
    }
}

/// One slot of an app on a host, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: Slot,
    pub version: Version,
    #[serde(flatten)]
    pub state: SlotState,
    pub port: u16,
}

impl std::fmt::Display for SlotStatus {
    /// `green 2.0.0 live`, `blue 1.0.0 warm 9m 58s`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.slot, self.version, self.state.name())?;
        if let SlotState::Warm { until_ms } = self.state {
            let now = crate::ops::now_unix_ms().max(0) as u64;
            let left = Duration::from_secs(until_ms.saturating_sub(now) / 1000);
            write!(f, " {}", humantime::format_duration(left))?;
        }
        Ok(())
    }
}

/// Makes `slot` the live slot of `app` on a host, after the controller
/// switched traffic to it. The other slot: a slot that was live stays warm
/// for `keep_warm`; one that never took traffic (a preview that is not
/// kept) stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromoteCommand {
    pub op_id: String,
    pub app: crate::AppName,
    pub slot: Slot,
    pub keep_warm: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBlueGreen {
    blue_port: u16,
    green_port: u16,
    keep_warm: Option<String>,
}

#[cfg(test)]
pub(crate) fn raw_keys() -> &'static [&'static str] {
    serde_aux::serde_introspection::serde_introspect::<RawBlueGreen>()
}

impl RawBlueGreen {
    pub(crate) fn check<E>(self, invalid: impl Fn(&str, String) -> E) -> Result<BlueGreen, E> {
        for (field, p) in [("blue_port", self.blue_port), ("green_port", self.green_port)] {
            if p == 0 {
                return Err(invalid(
                    &format!("blue_green.{field}"),
                    "must be a port, 1 to 65535".into(),
                ));
            }
        }
        if self.blue_port == self.green_port {
            return Err(invalid(
                "blue_green.green_port",
                format!("{} is blue_port too; each slot needs its own port", self.green_port),
            ));
        }
        let keep_warm = match self.keep_warm {
            None => Duration::from_secs(600),
            Some(s) => humantime::parse_duration(&s).map_err(|e| {
                invalid(
                    "blue_green.keep_warm",
                    format!("{s:?} is not a duration ({e}); try \"10m\""),
                )
            })?,
        };
        Ok(BlueGreen {
            blue_port: self.blue_port,
            green_port: self.green_port,
            keep_warm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_instances_and_placeholders() {
        assert_eq!(instance("web@.service", Slot::Green), "web@green.service");
        assert!(is_template("web@.service"));
        assert!(!is_template("web.service"));
        assert!(!is_template("web@blue.service"));
        assert_eq!(
            fill("http://127.0.0.1:{{port}}/health?s={{slot}}", Slot::Blue, 8081),
            "http://127.0.0.1:8081/health?s=blue"
        );
        assert_eq!(Slot::Blue.other(), Slot::Green);
        assert_eq!(Slot::parse("green"), Some(Slot::Green));
        assert_eq!(Slot::parse("red"), None);
    }
}
