//! The controller's configuration file (TOML), validated on load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    data_dir: PathBuf,
    apps_dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_host_timeout")]
    host_timeout: String,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    webhooks: Vec<String>,
    #[serde(default)]
    webhook_ca: Option<PathBuf>,
    #[serde(default)]
    ca_key: Option<PathBuf>,
    #[serde(default = "default_agent_cert_validity")]
    agent_cert_validity: String,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default = "default_prestage_parallel")]
    prestage_parallel: usize,
    #[serde(default)]
    prometheus_url: Option<String>,
    #[serde(default)]
    prometheus_ca: Option<PathBuf>,
    #[serde(default)]
    config_key: Option<PathBuf>,
    #[serde(default)]
    database: Option<String>,
    #[serde(default)]
    database_ca: Option<PathBuf>,
    #[serde(default)]
    database_cert: Option<PathBuf>,
    #[serde(default)]
    database_key: Option<PathBuf>,
    #[serde(default = "default_database_pool")]
    database_pool: usize,
    #[serde(default)]
    name: Option<String>,
}

fn default_database_pool() -> usize {
    16
}

fn default_prestage_parallel() -> usize {
    16
}

fn default_agent_cert_validity() -> String {
    "30d".into()
}

fn default_host_timeout() -> String {
    "10m".into()
}

/// Where the controller keeps its state.
#[derive(Debug, Clone)]
pub enum Database {
    /// `<data_dir>/convoy.db` (the default): one controller.
    Sqlite(PathBuf),
    /// A PostgreSQL database several controllers share.
    Postgres(crate::db::PostgresOptions),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// This controller's name among several (default: host name and
    /// listen port).
    pub name: String,
    pub database: Database,
    /// The key that seals configuration secrets (created on first start).
    pub config_key: PathBuf,
    /// SQLite database and artifacts.
    pub data_dir: PathBuf,
    /// One `<app>.toml` spec per app.
    pub apps_dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Longest a single host's activation may take before it counts as failed.
    pub host_timeout: Duration,
    pub log_level: Option<String>,
    /// URLs POSTed to on rollout start, success, failure and rollback.
    pub webhooks: Vec<String>,
    /// A CA (PEM) trusted for https webhooks besides the system's roots.
    pub webhook_ca: Option<PathBuf>,
    /// The CA's private key: enables enrollment and certificate renewal.
    pub ca_key: Option<PathBuf>,
    /// How long certificates signed by enrollment and renewal are valid.
    pub agent_cert_validity: Duration,
    /// Where to serve Prometheus metrics (plain http, `GET /metrics`).
    pub metrics_listen: Option<SocketAddr>,
    /// Hosts a deploy pre-stages at once.
    pub prestage_parallel: usize,
    /// Where metric gates are measured (`http(s)://host:9090`).
    pub prometheus_url: Option<String>,
    /// A CA (PEM) trusted for an https Prometheus, besides the system's roots.
    pub prometheus_ca: Option<PathBuf>,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        Self::parse(&file, &text)
    }

    pub fn parse(file: &str, text: &str) -> anyhow::Result<Self> {
        let raw: Raw = toml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: {}", e.to_string().trim_end()))?;
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|e| anyhow::anyhow!("{file}: listen: {:?} is not an address:port ({e})", raw.listen))?;
        let host_timeout = humantime::parse_duration(&raw.host_timeout)
            .map_err(|e| anyhow::anyhow!("{file}: host_timeout: {:?}: {e}", raw.host_timeout))?;
        for (i, url) in raw.webhooks.iter().enumerate() {
            convoy_common::http::check_url(url).map_err(|e| anyhow::anyhow!("{file}: webhooks[{i}]: {e}"))?;
        }
        let agent_cert_validity = humantime::parse_duration(&raw.agent_cert_validity)
            .map_err(|e| anyhow::anyhow!("{file}: agent_cert_validity: {:?}: {e}", raw.agent_cert_validity))?;
        if agent_cert_validity < Duration::from_secs(10) {
            anyhow::bail!("{file}: agent_cert_validity: must be at least 10s");
        }
        let metrics_listen = raw
            .metrics_listen
            .as_deref()
            .map(|a| {
                a.parse()
                    .map_err(|e| anyhow::anyhow!("{file}: metrics_listen: {a:?} is not an address:port ({e})"))
            })
            .transpose()?;
        if !(1..=1024).contains(&raw.prestage_parallel) {
            anyhow::bail!(
                "{file}: prestage_parallel: {} is out of range (1 to 1024 hosts at once)",
                raw.prestage_parallel
            );
        }
        if let Some(url) = &raw.prometheus_url {
            convoy_common::http::check_url(url).map_err(|e| anyhow::anyhow!("{file}: prometheus_url: {e}"))?;
        }
        if raw.prometheus_ca.is_some() && raw.prometheus_url.is_none() {
            anyhow::bail!("{file}: prometheus_ca: set prometheus_url too (the CA is for it)");
        }
        let database = match raw.database.as_deref() {
            None => {
                for (key, set) in [
                    ("database_ca", raw.database_ca.is_some()),
                    ("database_cert", raw.database_cert.is_some()),
                    ("database_key", raw.database_key.is_some()),
                ] {
                    if set {
                        anyhow::bail!("{file}: {key}: set database = \"postgres://...\" too (it is for PostgreSQL)");
                    }
                }
                Database::Sqlite(raw.data_dir.join("convoy.db"))
            }
            Some(url) => {
                check_postgres_url(url).map_err(|e| anyhow::anyhow!("{file}: database: {e}"))?;
                if raw.database_cert.is_some() != raw.database_key.is_some() {
                    anyhow::bail!(
                        "{file}: database_cert and database_key go together (a client certificate and its key)"
                    );
                }
                if !(1..=1000).contains(&raw.database_pool) {
                    anyhow::bail!(
                        "{file}: database_pool: {} is out of range (1 to 1000 connections)",
                        raw.database_pool
                    );
                }
                Database::Postgres(crate::db::PostgresOptions {
                    url: url.to_owned(),
                    ca: raw.database_ca.clone(),
                    cert: raw.database_cert.clone(),
                    key: raw.database_key.clone(),
                    pool: raw.database_pool,
                })
            }
        };
        let name = match raw.name {
            Some(n) => {
                convoy_common::HostName::new(n.clone()).map_err(|e| anyhow::anyhow!("{file}: name: {e}"))?;
                n
            }
            None => format!(
                "{}-{}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "controller".into()),
                listen.port()
            ),
        };
        Ok(Config {
            name,
            database,
            config_key: raw.config_key.unwrap_or_else(|| raw.data_dir.join("config.key")),
            prometheus_url: raw.prometheus_url,
            prometheus_ca: raw.prometheus_ca,
            prestage_parallel: raw.prestage_parallel,
            metrics_listen,
            ca_key: raw.ca_key,
            agent_cert_validity,
            webhooks: raw.webhooks,
            webhook_ca: raw.webhook_ca,
            listen,
            data_dir: raw.data_dir,
            apps_dir: raw.apps_dir,
            ca: raw.ca,
            cert: raw.cert,
            key: raw.key,
            host_timeout,
            log_level: raw.log_level,
        })
    }
}

/// A `postgres://` URL the driver accepts, without saying what is in it
/// (it may hold a password).
fn check_postgres_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// URL (leave it out for the embedded SQLite)".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("not a usable postgres:// URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_keys_match_the_code() {
        use convoy_common::configdoc::{documented_keys, prefixed};
        let documented = documented_keys(include_str!("../../docs/config.md"), "## `controller.toml`");
        let code = prefixed("", serde_aux::serde_introspection::serde_introspect::<Raw>());
        assert_eq!(documented, code, "docs/config.md, controller.toml section");
    }

    #[test]
    fn bad_listen_is_named() {
        let text = r#"
listen = "localhost"
data_dir = "/d"
apps_dir = "/a"
ca = "/c"
cert = "/c"
key = "/k"
"#;
        let err = Config::parse("controller.toml", text).unwrap_err().to_string();
        assert!(err.contains("controller.toml: listen"), "{err}");
    }

    #[test]
    fn database_settings_are_checked_and_named() {
        let base = "listen = \"127.0.0.1:1\"\ndata_dir = \"/d\"\napps_dir = \"/a\"\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n";
        let ok = Config::parse("c.toml", base).unwrap();
        assert!(matches!(&ok.database, Database::Sqlite(p) if p == std::path::Path::new("/d/convoy.db")));
        assert!(ok.name.ends_with("-1"), "host name and port: {}", ok.name);
        let pg = Config::parse(
            "c.toml",
            &format!("{base}name = \"ctl-a\"\ndatabase = \"postgres://convoy:pw@db:5432/convoy?sslmode=require\"\ndatabase_pool = 4\n"),
        )
        .unwrap();
        assert!(matches!(&pg.database, Database::Postgres(o) if o.pool == 4));
        assert_eq!(pg.name, "ctl-a");
        for (extra, named) in [
            (
                "database = \"mysql://db/convoy\"",
                "c.toml: database: must be a postgres:// URL",
            ),
            (
                "database = \"postgres://db/convoy?sslmode=sometimes\"",
                "c.toml: database: not a usable postgres:// URL",
            ),
            ("database_ca = \"/ca.pem\"", "c.toml: database_ca: set database"),
            (
                "database = \"postgres://db/c\"\ndatabase_cert = \"/c.pem\"",
                "c.toml: database_cert and database_key go together",
            ),
            (
                "database = \"postgres://db/c\"\ndatabase_pool = 0",
                "c.toml: database_pool: 0 is out of range",
            ),
            ("name = \"a b\"", "c.toml: name:"),
        ] {
            let e = Config::parse("c.toml", &format!("{base}{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(named), "{extra}: {e}");
            assert!(!e.contains("pw"), "no password in errors: {e}");
        }
    }

    #[test]
    fn prestage_parallel_is_bounded() {
        let base = "listen = \"127.0.0.1:1\"\ndata_dir = \"/d\"\napps_dir = \"/a\"\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n";
        assert_eq!(Config::parse("c.toml", base).unwrap().prestage_parallel, 16);
        let ok = Config::parse("c.toml", &format!("{base}prestage_parallel = 3\n")).unwrap();
        assert_eq!(ok.prestage_parallel, 3);
        let err = Config::parse("c.toml", &format!("{base}prestage_parallel = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml: prestage_parallel: 0 is out of range"), "{err}");
    }
}
