//! The agent's configuration file (TOML), validated on load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    controller: String,
    server_name: Option<String>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
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
    /// e.g. `https://controller.example:7443`
    pub controller: String,
    /// The name in the controller's certificate; defaults to the URL's host.
    pub server_name: String,
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
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: file.to_owned(),
            message,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_owned()))?;
        let rest = raw
            .controller
            .strip_prefix("https://")
            .ok_or_else(|| invalid(format!("controller: {:?} must start with https://", raw.controller)))?;
        let host = rest.rsplit_once(':').map(|(h, _)| h).unwrap_or(rest);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid("controller: URL has no host".into()));
        }
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
        let unit_timeout = humantime::parse_duration(&raw.unit_timeout)
            .map_err(|e| invalid(format!("unit_timeout: {:?}: {e}", raw.unit_timeout)))?;
        Ok(Config {
            server_name: raw.server_name.unwrap_or_else(|| host.to_owned()),
            controller: raw.controller,
            ca: raw.ca,
            cert: raw.cert,
            key: raw.key,
            state_dir: raw.state_dir,
            labels: raw.labels,
            unit_timeout,
            log_level: raw.log_level,
            unit_dir: raw.unit_dir,
            trusted_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
