//! The agent's configuration file (TOML), validated on load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    /// Absent in the file the package installs: not configured yet.
    #[serde(default)]
    controller: Option<String>,
    #[serde(default)]
    controllers: Option<Vec<String>>,
    server_name: Option<String>,
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "default_unit_timeout")]
    unit_timeout: String,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default = "default_unit_dir")]
    unit_dir: PathBuf,
    #[serde(default)]
    trusted_keys: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    enroll_token: Option<String>,
    #[serde(default)]
    ca_fingerprint: Option<String>,
    #[serde(default)]
    metrics_listen: Option<String>,
}

fn default_unit_dir() -> PathBuf {
    PathBuf::from("/etc/systemd/system")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/convoy")
}

fn default_unit_timeout() -> String {
    "90s".into()
}

#[derive(Debug, Clone)]
pub struct Config {
    /// e.g. `https://controller.example:7443` (the first of `controllers`).
    pub controller: String,
    /// The name in the controller's certificate; defaults to the URL's host.
    pub server_name: String,
    /// Every controller the agent may use: (URL, name in its certificate).
    pub controllers: Vec<(String, String)>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub state_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub unit_timeout: Duration,
    pub log_level: Option<String>,
    /// Where unit files shipped in releases (`systemd/`) are installed.
    pub unit_dir: PathBuf,
    /// When not empty, only artifacts signed by one of these are installed.
    pub trusted_keys: Vec<convoy_common::signing::PublicKey>,
    /// The host's name, asked for at enrollment (default: the hostname).
    pub name: String,
    /// A one-time token to enroll with when `cert` does not exist yet.
    pub enroll_token: Option<String>,
    /// `sha256:HEX` of the fleet CA's certificate, to trust it at enrollment.
    pub ca_fingerprint: Option<String>,
    /// Where to serve Prometheus metrics (plain http, `GET /metrics`).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// The file sets no `controller`, as the package installs it: the
    /// agent has nothing to do until an operator configures it.
    #[error("{path}: not configured yet: set `controller` (and ca, cert and key, or an enrollment token), then run `systemctl restart convoy-agent`")]
    NotConfigured { path: String },
}

fn valid_label_part(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let cfg = Self::parse(&path.display().to_string(), &text)?;
        // A config holding a secret must be as private as a key.
        if cfg.enroll_token.is_some() {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            if mode & 0o077 != 0 {
                return Err(ConfigError::Invalid {
                    path: path.display().to_string(),
                    message: format!(
                        "holds enroll_token but is readable by group or others (mode {mode:o}); run chmod 600 {}",
                        path.display()
                    ),
                });
            }
        }
        Ok(cfg)
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: file.to_owned(),
            message,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_owned()))?;
        let urls = match (raw.controller, raw.controllers) {
            (None, None) => return Err(ConfigError::NotConfigured { path: file.to_owned() }),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "controller and controllers: set one (controllers lists several)".into(),
                ))
            }
            (Some(c), None) => vec![c],
            (None, Some(list)) if list.is_empty() => {
                return Err(invalid("controllers: empty; list at least one https:// URL".into()))
            }
            (None, Some(list)) => list,
        };
        let mut controllers = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let key = if urls.len() == 1 && i == 0 {
                "controller".to_owned()
            } else {
                format!("controllers[{i}]")
            };
            let rest = url
                .strip_prefix("https://")
                .ok_or_else(|| invalid(format!("{key}: {url:?} must start with https://")))?;
            let host = rest.rsplit_once(':').map(|(h, _)| h).unwrap_or(rest);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(invalid(format!("{key}: URL has no host")));
            }
            controllers.push((url.clone(), raw.server_name.clone().unwrap_or_else(|| host.to_owned())));
        }
        let controller = urls[0].clone();
        let required = |value: Option<PathBuf>, key: &str, what: &str| {
            value.ok_or_else(|| invalid(format!("{key}: missing; it is the path of {what}")))
        };
        let ca = required(raw.ca, "ca", "the fleet CA certificate (PEM)")?;
        let cert = required(raw.cert, "cert", "this host's certificate (PEM)")?;
        let key = required(raw.key, "key", "this host's private key (PEM)")?;
        for (k, v) in &raw.labels {
            if !valid_label_part(k) || !valid_label_part(v) {
                return Err(invalid(format!(
                    "labels.{k}: keys and values must be 1-63 letters, digits, '-', '_' or '.' (got {v:?})"
                )));
            }
        }
        let trusted_keys = raw
            .trusted_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                convoy_common::signing::PublicKey::parse(k).map_err(|e| invalid(format!("trusted_keys[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(f) = &raw.ca_fingerprint {
            let hex = f.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(format!(
                    "ca_fingerprint: {f:?} is not sha256: and 64 hex digits (see `convoy enroll create-token`)"
                )));
            }
        }
        if raw.enroll_token.is_some() != raw.ca_fingerprint.is_some() {
            return Err(invalid("enroll_token and ca_fingerprint go together".into()));
        }
        let name = match raw.name {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
        };
        if raw.enroll_token.is_some() {
            convoy_common::HostName::new(name.as_str()).map_err(|e| invalid(format!("name: {e}")))?;
        }
        let unit_timeout = humantime::parse_duration(&raw.unit_timeout)
            .map_err(|e| invalid(format!("unit_timeout: {:?}: {e}", raw.unit_timeout)))?;
        let metrics_listen = raw
            .metrics_listen
            .as_deref()
            .map(|a| {
                a.parse()
                    .map_err(|e| invalid(format!("metrics_listen: {a:?} is not an address:port ({e})")))
            })
            .transpose()?;
        Ok(Config {
            metrics_listen,
            server_name: controllers[0].1.clone(),
            controller: controller.clone(),
            controllers,
            ca,
            cert,
            key,
            state_dir: raw.state_dir,
            labels: raw.labels,
            unit_timeout,
            log_level: raw.log_level,
            unit_dir: raw.unit_dir,
            trusted_keys,
            name,
            enroll_token: raw.enroll_token,
            ca_fingerprint: raw.ca_fingerprint.map(|f| f.to_ascii_lowercase()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_keys_match_the_code() {
        use convoy_common::configdoc::{documented_keys, prefixed};
        let documented = documented_keys(include_str!("../../docs/config.md"), "## `agent.toml`");
        let mut code = prefixed("", serde_aux::serde_introspection::serde_introspect::<Raw>());
        code.insert("labels.<name>".into());
        assert_eq!(documented, code, "docs/config.md, agent.toml section");
    }

    const GOOD: &str = r#"
controller = "https://198.18.0.1:7443"
ca = "/etc/convoy/ca.pem"
cert = "/etc/convoy/agent.pem"
key = "/etc/convoy/agent.key"
[labels]
env = "staging"
"#;

    #[test]
    fn good_config() {
        let c = Config::parse("agent.toml", GOOD).unwrap();
        assert_eq!(c.server_name, "198.18.0.1");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/convoy"));
        assert_eq!(c.unit_timeout, Duration::from_secs(90));
    }

    fn check_err(from: &str, to: &str, expect: &str) {
        let err = Config::parse("agent.toml", &GOOD.replace(from, to))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{err:?} should contain {expect:?}");
    }

    #[test]
    fn bad_configs() {
        check_err("https://198", "http://198", "must start with https://");
        check_err("env = \"staging\"", "env = \"stag ing\"", "labels.env");
        check_err("ca =", "cax =", "unknown field `cax`");
        check_err("[labels]", "unit_timeout = \"soon\"\n[labels]", "unit_timeout");
        check_err(
            "[labels]",
            "trusted_keys = [\"ed25519:00\"]\n[labels]",
            "trusted_keys[0]",
        );
        check_err(
            "key = \"/etc/convoy/agent.key\"",
            "",
            "key: missing; it is the path of this host's private key",
        );
    }

    #[test]
    fn the_packaged_config_is_not_configured_yet() {
        let packaged = include_str!("../../packaging/agent.toml");
        let e = Config::parse("/etc/convoy/agent.toml", packaged).unwrap_err();
        assert!(matches!(e, ConfigError::NotConfigured { .. }), "{e}");
        assert!(e.to_string().contains("set `controller`"), "{e}");
        // Once `controller` is set, the rest is checked as usual.
        let e = Config::parse("a.toml", &format!("controller = \"https://c:7443\"\n{packaged}")).unwrap_err();
        assert!(e.to_string().contains("ca: missing"), "{e}");
    }
}
