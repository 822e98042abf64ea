//! Configuration per app and environment: immutable revisions in the
//! controller's store, secrets sealed with the controller's key
//! (XChaCha20-Poly1305), checked against what a release declares
//! (`schema.rs`) and rendered into its files (`render.rs`) when a host is
//! sent its activation.
//!
//! A secret's value is never logged, never in history, events, webhooks or
//! any answer of the operator API: it leaves the controller only rendered,
//! inside the mTLS session of a host that is a target of a deploy of that
//! app in that environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::params;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use convoy_common::ops::RenderedConfig;
use convoy_common::{AppName, Digest, Version};

use crate::db::{Db, DbError};
use crate::rollout::seams::Passed;

pub mod render;
pub mod schema;

use schema::{ConfigValue, Schema};

/// One key of the controller: its id (stored with every sealed value) and
/// its 32 bytes.
#[derive(Clone)]
struct Key {
    id: u32,
    cipher: XChaCha20Poly1305,
    bytes: [u8; 32],
}

impl Key {
    fn new(id: u32, bytes: [u8; 32]) -> Key {
        Key {
            id,
            cipher: XChaCha20Poly1305::new(&bytes.into()),
            bytes,
        }
    }

    fn random(id: u32) -> Key {
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).expect("the system's random source");
        Key::new(id, b)
    }

    fn text(&self) -> String {
        format!("convoy-config-key {} {}\n", self.id, hex::encode(self.bytes))
    }

    fn parse(path: &Path, text: &str) -> Result<Key, String> {
        let bad = || format!("{}: not a convoy configuration key", path.display());
        let mut w = text.split_whitespace();
        if w.next() != Some("convoy-config-key") {
            return Err(bad());
        }
        let id: u32 = w.next().and_then(|i| i.parse().ok()).ok_or_else(bad)?;
        let bytes: [u8; 32] = w
            .next()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        Ok(Key::new(id, bytes))
    }
}

/// What a sealed value is bound to: a ciphertext cannot be moved to
/// another app, environment or key.
fn aad(app: &AppName, env: &str, key: &str) -> Vec<u8> {
    format!("{app}\0{env}\0{key}").into_bytes()
}

/// The controller's configuration keys: the current one seals, any known
/// one opens (a rotation interrupted halfway leaves values under both).
pub struct Keyring {
    path: PathBuf,
    keys: RwLock<Vec<Key>>,
}

impl Keyring {
    /// Reads the key file, creating it (mode 0600, 32 random bytes) on
    /// first use; a `.new` file beside it is a rotation that did not
    /// finish, whose key is known too.
    pub fn open(path: &Path) -> Result<Keyring, String> {
        let read = |p: &Path| -> Result<Option<Key>, String> {
            match std::fs::read_to_string(p) {
                Ok(t) => Key::parse(p, &t).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", p.display())),
            }
        };
        let mut keys = Vec::new();
        match read(path)? {
            Some(k) => keys.push(k),
            None => {
                let k = Key::random(1);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                convoy_common::fsutil::write_atomic(path, k.text().as_bytes(), 0o600)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), "created the configuration key");
                keys.push(k);
            }
        }
        if let Some(k) = read(&pending(path))? {
            keys.push(k);
        }
        Ok(Keyring {
            path: path.to_owned(),
            keys: RwLock::new(keys),
        })
    }

    fn current(&self) -> Key {
        self.keys.read().unwrap()[0].clone()
    }

    fn seal_with(k: &Key, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        getrandom::getrandom(&mut nonce).expect("the system's random source");
        let ct = k
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
            .expect("sealing never fails");
        let mut out = k.id.to_be_bytes().to_vec();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    fn open_value(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < 4 + 24 + 16 {
            return Err("a sealed value is too short".into());
        }
        let id = u32::from_be_bytes(sealed[..4].try_into().expect("4 bytes"));
        let keys = self.keys.read().unwrap();
        let k = keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| format!("a secret is sealed with key {id}, which this controller does not have"))?;
        k.cipher
            .decrypt(
                XNonce::from_slice(&sealed[4..28]),
                Payload {
                    msg: &sealed[28..],
                    aad,
                },
            )
            .map_err(|_| "a sealed value does not open: wrong key, or altered".to_owned())
    }

    /// A keyed fingerprint of a value: equal values have equal ones, and
    /// without the key it says nothing about the value.
    fn fingerprint(&self, value: &str) -> String {
        let k = self.current();
        let mut data = k.bytes.to_vec();
        data.extend_from_slice(b"convoy-config-fingerprint\0");
        data.extend_from_slice(value.as_bytes());
        Digest::of_bytes(&data).to_hex()[..12].to_owned()
    }
}

fn pending(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

/// One revision's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub revision: u64,
    pub author: String,
    pub at_ms: i64,
    /// What changed, by key name (never a value).
    pub change: String,
}

/// One key as an operator sees it: a secret's value is never shown, only
/// its keyed fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub key: String,
    pub secret: bool,
    /// The value; empty for a secret.
    pub value: String,
    pub fingerprint: String,
}

/// One key of two revisions compared (`AppConfig::diff`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compared {
    pub key: String,
    pub secret: bool,
    /// The values as shown: empty for a secret or a missing key.
    pub from: String,
    pub to: String,
    pub how: &'static str,
}

/// A change an operator asks for.
#[derive(Default)]
pub struct Change {
    pub set: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, String>,
    pub unset: Vec<String>,
    /// Whom the values are for: the whole environment (default), a host
    /// group or one host.
    pub scope: Scope,
}

/// Whom a value is for; the most specific that matches a host wins: its
/// own value, then a group's (more labels first), then the environment's.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    #[default]
    Environment,
    /// Hosts with all these labels.
    Group(BTreeMap<String, String>),
    Host(String),
}

impl Scope {
    /// The suffix a scoped key is stored under: `KEY@host:web1`,
    /// `KEY@group:role=db,zone=eu`; nothing for the environment.
    fn suffix(&self) -> String {
        match self {
            Scope::Environment => String::new(),
            Scope::Host(h) => format!("@host:{h}"),
            Scope::Group(l) => {
                let l: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("@group:{}", l.join(","))
            }
        }
    }

    /// A stored key as (key, scope).
    pub fn split(stored: &str) -> (&str, Scope) {
        let Some((key, scope)) = stored.split_once('@') else {
            return (stored, Scope::Environment);
        };
        let scope = if let Some(h) = scope.strip_prefix("host:") {
            Scope::Host(h.to_owned())
        } else if let Some(g) = scope.strip_prefix("group:") {
            Scope::Group(
                g.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            )
        } else {
            Scope::Environment
        };
        (key, scope)
    }

    /// Whether it applies to a host; how specific it is when it does.
    fn rank(&self, host: &str, labels: &BTreeMap<String, String>) -> Option<usize> {
        match self {
            Scope::Environment => Some(0),
            Scope::Group(l) => l.iter().all(|(k, v)| labels.get(k) == Some(v)).then_some(l.len()),
            Scope::Host(h) => (h == host).then_some(usize::MAX),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Environment => f.write_str("the environment"),
            Scope::Host(h) => write!(f, "host {h}"),
            Scope::Group(l) => {
                let l: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "group {}", l.join(","))
            }
        }
    }
}

/// A host as configuration sees it.
pub struct Target<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// The candidates for each key a host may get, the winner first.
pub fn candidates<'v>(
    values: &'v BTreeMap<String, ConfigValue>,
    host: &Target<'_>,
) -> BTreeMap<String, Vec<(Scope, &'v ConfigValue)>> {
    let mut out: BTreeMap<String, Vec<(usize, Scope, &ConfigValue)>> = BTreeMap::new();
    for (stored, v) in values {
        let (key, scope) = Scope::split(stored);
        if let Some(rank) = scope.rank(host.name, host.labels) {
            out.entry(key.to_owned()).or_default().push((rank, scope, v));
        }
    }
    out.into_iter()
        .map(|(k, mut c)| {
            c.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            (k, c.into_iter().map(|(_, s, v)| (s, v)).collect())
        })
        .collect()
}

/// The values a host gets: for each key, the most specific.
pub fn resolve(values: &BTreeMap<String, ConfigValue>, host: &Target<'_>) -> BTreeMap<String, ConfigValue> {
    candidates(values, host)
        .into_iter()
        .filter_map(|(k, c)| c.first().map(|(_, v)| (k, (*v).clone())))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Sealed(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Revisions, values and schemas in the controller's store.
pub struct AppConfig {
    db: Arc<Db>,
    keys: Keyring,
}

impl AppConfig {
    pub fn new(db: Arc<Db>, keys: Keyring) -> Self {
        AppConfig { db, keys }
    }

    /// The newest revision of an app's environment (0: none yet).
    pub async fn latest(&self, app: &AppName, env: &str) -> Result<u64, ConfigError> {
        Ok(self
            .db
            .query_opt(
                "SELECT COALESCE(MAX(revision), 0) FROM config_revisions WHERE app = ?1 AND environment = ?2",
                params![app.as_str(), env],
            )
            .await?
            .map(|r| r.get::<i64>(0))
            .transpose()?
            .unwrap_or(0) as u64)
    }

    /// Makes a new revision from the newest one and the change; returns it
    /// with what changed (key names only).
    pub async fn change(&self, app: &AppName, env: &str, who: &str, c: Change) -> Result<(u64, String), ConfigError> {
        let scope = c.scope.suffix();
        if let Scope::Host(h) = &c.scope {
            convoy_common::HostName::new(h.clone()).map_err(|e| ConfigError::Invalid(format!("--host: {e}")))?;
        }
        if let Scope::Group(l) = &c.scope {
            if l.is_empty()
                || l.iter().any(|(k, v)| {
                    !schema::valid_key(&k.replace('-', "_")) || v.is_empty() || v.contains([',', '@', '='])
                })
            {
                return Err(ConfigError::Invalid(
                    "--group takes labels, e.g. role=db,zone=eu".into(),
                ));
            }
        }
        for k in c.set.keys().chain(c.secrets.keys()).chain(c.unset.iter()) {
            if !schema::valid_key(k) {
                return Err(ConfigError::Invalid(format!(
                    "{k:?} is not a key name (letters, digits and _, not starting with a digit)"
                )));
            }
        }
        if let Some(k) = c.set.keys().find(|k| c.secrets.contains_key(*k)) {
            return Err(ConfigError::Invalid(format!(
                "{k} is set both as a value and as a secret"
            )));
        }
        if c.set.is_empty() && c.secrets.is_empty() && c.unset.is_empty() {
            return Err(ConfigError::Invalid("nothing to change".into()));
        }
        let current = self.latest(app, env).await?;
        let mut rows = self.rows(app, env, current).await?;
        let mut said = Vec::new();
        let whom = match &c.scope {
            Scope::Environment => String::new(),
            s => format!(" for {s}"),
        };
        for k in &c.unset {
            if rows.remove(&format!("{k}{scope}")).is_none() {
                return Err(ConfigError::Invalid(format!("{k} is not set{whom} in {app} {env}")));
            }
            said.push(format!("unset {k}{whom}"));
        }
        for (k, v) in &c.set {
            rows.insert(format!("{k}{scope}"), (false, v.clone().into_bytes()));
            said.push(format!("set {k}{whom}"));
        }
        let key = self.keys.current();
        for (k, v) in &c.secrets {
            let stored = format!("{k}{scope}");
            let sealed = Keyring::seal_with(&key, &aad(app, env, &stored), v.as_bytes());
            rows.insert(stored, (true, sealed));
            said.push(format!("set secret {k}{whom}"));
        }
        let next = current + 1;
        let change = said.join(", ");
        let mut tx = self.db.begin().await?;
        let made = tx
            .execute(
                "INSERT INTO config_revisions (app, environment, revision, author, at_ms, change) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![app.as_str(), env, next, who, convoy_common::ops::now_unix_ms(), &change],
            )
            .await;
        match made {
            Err(e) if e.is_conflict() => {
                return Err(ConfigError::Invalid(format!(
                    "revision {next} of {app} {env} was made by someone else meanwhile; look at it (config show) and change again"
                )))
            }
            r => r?,
        };
        for (k, (secret, v)) in &rows {
            tx.execute(
                "INSERT INTO config_values (app, environment, revision, key, secret, value) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![app.as_str(), env, next, k, secret, v],
            )
            .await?;
        }
        tx.commit().await?;
        tracing::info!(%app, env, revision = next, by = who, change = %change, "configuration changed");
        Ok((next, change))
    }

    /// Stored rows of a revision: key → (secret, stored bytes).
    async fn rows(
        &self,
        app: &AppName,
        env: &str,
        revision: u64,
    ) -> Result<BTreeMap<String, (bool, Vec<u8>)>, ConfigError> {
        Ok(self
            .db
            .query(
                "SELECT key, secret, value FROM config_values WHERE app = ?1 AND environment = ?2 AND revision = ?3",
                params![app.as_str(), env, revision],
            )
            .await?
            .iter()
            .map(|r| Ok((r.get::<String>(0)?, (r.get::<bool>(1)?, r.get::<Vec<u8>>(2)?))))
            .collect::<Result<BTreeMap<_, _>, DbError>>()?)
    }

    async fn check_revision(&self, app: &AppName, env: &str, revision: u64) -> Result<(), ConfigError> {
        let latest = self.latest(app, env).await?;
        if revision == 0 || revision > latest {
            return Err(ConfigError::NotFound(match latest {
                0 => format!("{app} has no configuration in {env}"),
                n => format!("{app} in {env} has configuration revisions 1 to {n}, not {revision}"),
            }));
        }
        Ok(())
    }

    /// A revision's values, secrets opened (for rendering only).
    pub async fn values(
        &self,
        app: &AppName,
        env: &str,
        revision: u64,
    ) -> Result<BTreeMap<String, ConfigValue>, ConfigError> {
        let mut out = BTreeMap::new();
        for (k, (secret, v)) in self.rows(app, env, revision).await? {
            let value = if secret {
                let plain = self
                    .keys
                    .open_value(&aad(app, env, &k), &v)
                    .map_err(ConfigError::Sealed)?;
                String::from_utf8(plain).map_err(|_| ConfigError::Sealed(format!("{k} does not open to text")))?
            } else {
                String::from_utf8(v).map_err(|_| ConfigError::Sealed(format!("{k} is not text")))?
            };
            out.insert(k, ConfigValue { value, secret });
        }
        Ok(out)
    }

    /// A revision as an operator sees it (the newest with `None`).
    pub async fn show(
        &self,
        app: &AppName,
        env: &str,
        revision: Option<u64>,
    ) -> Result<(Revision, Vec<Shown>), ConfigError> {
        let revision = match revision {
            Some(r) => r,
            None => self.latest(app, env).await?,
        };
        self.check_revision(app, env, revision).await?;
        let head = self
            .history(app, env)
            .await?
            .into_iter()
            .find(|r| r.revision == revision)
            .ok_or_else(|| ConfigError::NotFound(format!("no revision {revision}")))?;
        let shown = self
            .values(app, env, revision)
            .await?
            .into_iter()
            .map(|(key, v)| Shown {
                fingerprint: self.keys.fingerprint(&v.value),
                value: if v.secret { String::new() } else { v.value },
                secret: v.secret,
                key,
            })
            .collect();
        Ok((head, shown))
    }

    /// The values of `key` a host may get in the newest revision, the one
    /// it gets first; each as (scope, secret, shown value, fingerprint) in
    /// a `Shown` whose `key` is the scope.
    pub async fn explain(
        &self,
        app: &AppName,
        env: &str,
        host: &str,
        labels: &BTreeMap<String, String>,
        key: &str,
    ) -> Result<(u64, Vec<Shown>), ConfigError> {
        let revision = self.latest(app, env).await?;
        self.check_revision(app, env, revision).await?;
        let values = self.values(app, env, revision).await?;
        let all = candidates(&values, &Target { name: host, labels });
        let found = all.get(key).ok_or_else(|| {
            ConfigError::NotFound(format!(
                "{key} has no value for {host} in {app} {env} (revision {revision})"
            ))
        })?;
        Ok((
            revision,
            found
                .iter()
                .map(|(scope, v)| Shown {
                    key: scope.to_string(),
                    secret: v.secret,
                    value: if v.secret { String::new() } else { v.value.clone() },
                    fingerprint: self.keys.fingerprint(&v.value),
                })
                .collect(),
        ))
    }

    /// Every revision, newest first.
    pub async fn history(&self, app: &AppName, env: &str) -> Result<Vec<Revision>, ConfigError> {
        Ok(self
            .db
            .query(
                "SELECT revision, author, at_ms, change FROM config_revisions
                 WHERE app = ?1 AND environment = ?2 ORDER BY revision DESC",
                params![app.as_str(), env],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(Revision {
                    revision: r.get::<i64>(0)? as u64,
                    author: r.get(1)?,
                    at_ms: r.get(2)?,
                    change: r.get(3)?,
                })
            })
            .collect::<Result<Vec<_>, DbError>>()?)
    }

    /// Seals every secret with a new key. The new key is written beside
    /// the old one first, the values are resealed in one transaction, then
    /// the new key replaces the old: an interruption at any point leaves
    /// every value openable. Returns (the new key's id, values resealed).
    pub async fn rotate_key(&self) -> Result<(u32, usize), ConfigError> {
        let old = self.keys.current();
        let new = Key::random(old.id + 1);
        let pending = pending(&self.keys.path);
        convoy_common::fsutil::write_atomic(&pending, new.text().as_bytes(), 0o600)
            .map_err(|e| ConfigError::Sealed(format!("{}: {e}", pending.display())))?;
        self.keys.keys.write().unwrap().push(new.clone());
        let sealed: Vec<(String, String, i64, String, Vec<u8>)> = self
            .db
            .query(
                "SELECT app, environment, revision, key, value FROM config_values WHERE secret = 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .collect::<Result<_, DbError>>()?;
        let mut resealed = Vec::with_capacity(sealed.len());
        for (app, env, rev, key, value) in &sealed {
            let name = AppName::new(app.clone()).map_err(|e| ConfigError::Sealed(e.to_string()))?;
            let a = aad(&name, env, key);
            let plain = self.keys.open_value(&a, value).map_err(ConfigError::Sealed)?;
            resealed.push((app, env, rev, key, Keyring::seal_with(&new, &a, &plain)));
        }
        let mut tx = self.db.begin().await?;
        for (app, env, rev, key, value) in &resealed {
            tx.execute(
                "UPDATE config_values SET value = ?5 WHERE app = ?1 AND environment = ?2 AND revision = ?3 AND key = ?4",
                params![*app, *env, *rev, *key, value],
            )
            .await?;
        }
        tx.commit().await?;
        std::fs::rename(&pending, &self.keys.path)
            .map_err(|e| ConfigError::Sealed(format!("{}: {e}", self.keys.path.display())))?;
        let _ = convoy_common::fsutil::fsync_dir(self.keys.path.parent().unwrap_or(Path::new("/")));
        *self.keys.keys.write().unwrap() = vec![new.clone()];
        tracing::info!(key = new.id, resealed = resealed.len(), "configuration key rotated");
        Ok((new.id, resealed.len()))
    }

    /// A fingerprint per key of a revision, for comparing environments:
    /// key → (secret, shown value, fingerprint).
    async fn fingerprints(
        &self,
        app: &AppName,
        env: &str,
        revision: u64,
    ) -> Result<BTreeMap<String, (bool, String, String)>, ConfigError> {
        Ok(self
            .values(app, env, revision)
            .await?
            .into_iter()
            .map(|(k, v)| {
                let fp = self.keys.fingerprint(&v.value);
                let shown = if v.secret { String::new() } else { v.value };
                (k, (v.secret, shown, fp))
            })
            .collect())
    }

    /// The schema a release declared at push, if any.
    pub async fn schema(&self, app: &AppName, version: &Version) -> Result<Option<Schema>, ConfigError> {
        let text: Option<String> = match self
            .db
            .query_opt(
                "SELECT config_schema FROM releases WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version.as_str()],
            )
            .await?
        {
            Some(r) => r.get(0)?,
            None => None,
        };
        text.map(|t| serde_json::from_str(&t).map_err(|e| ConfigError::Sealed(format!("stored schema: {e}"))))
            .transpose()
    }

    pub async fn set_schema(&self, app: &AppName, version: &Version, schema: &Schema) -> Result<(), ConfigError> {
        let text = serde_json::to_string(schema).expect("a schema serialises");
        self.db
            .execute(
                "UPDATE releases SET config_schema = ?3 WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version.as_str(), text],
            )
            .await?;
        Ok(())
    }

    /// Which revision a deploy of `version` takes (the newest, or the one
    /// named), checked against what the release declares. `Ok(None)`: the
    /// release declares nothing, and there is nothing to render.
    pub async fn for_deploy(
        &self,
        app: &AppName,
        env: &str,
        version: &Version,
        revision: Option<u64>,
        targets: &[Target<'_>],
    ) -> Result<Option<u64>, ConfigError> {
        let Some(schema) = self.schema(app, version).await? else {
            return match revision {
                Some(_) => Err(ConfigError::Invalid(format!(
                    "--config-revision: {app} {version} declares no configuration (no convoy/config.toml)"
                ))),
                None => Ok(None),
            };
        };
        let revision = match revision {
            Some(r) => {
                self.check_revision(app, env, r).await?;
                r
            }
            None => self.latest(app, env).await?,
        };
        let values = match revision {
            0 => BTreeMap::new(),
            r => self.values(app, env, r).await?,
        };
        // Each target gets its own values: every one must fit. A problem
        // that not every target has names the hosts that have it.
        let mut found: Vec<(String, Vec<&str>)> = Vec::new();
        let everyone = [Target {
            name: "",
            labels: &BTreeMap::new(),
        }];
        let hosts = if targets.is_empty() { &everyone[..] } else { targets };
        for t in hosts {
            let mine = resolve(&values, t);
            let problems = schema.problems(&mine);
            if problems.is_empty() {
                render::render(&schema, &mine).map_err(ConfigError::Invalid)?;
            }
            for p in problems {
                match found.iter_mut().find(|(q, _)| *q == p) {
                    Some((_, on)) => on.push(t.name),
                    None => found.push((p, vec![t.name])),
                }
            }
        }
        let problems: Vec<String> = found
            .into_iter()
            .map(|(p, on)| {
                if on.len() == hosts.len() {
                    p
                } else {
                    format!("{p} (on {})", on.join(", "))
                }
            })
            .collect();
        if !problems.is_empty() {
            let which = match revision {
                0 => "(no revision yet)".to_owned(),
                r => format!("(revision {r})"),
            };
            return Err(ConfigError::Invalid(format!(
                "{app} {version} does not fit {env}'s configuration {which}: {}",
                problems.join("; ")
            )));
        }
        Ok(Some(revision))
    }

    /// The revision a deploy of `version` into `env` used the last time
    /// it succeeded there, if any.
    pub async fn passed_revision(
        &self,
        app: &AppName,
        version: &Version,
        env: &str,
    ) -> Result<Option<u64>, ConfigError> {
        let plan: Option<String> = self
            .db
            .query_opt(
                "SELECT plan FROM rollouts WHERE app = ?1 AND version = ?2 AND environment = ?3
                 AND kind = 'deploy' AND state = 'succeeded' ORDER BY finished_at_ms DESC LIMIT 1",
                params![app.as_str(), version.as_str(), env],
            )
            .await?
            .map(|r| r.get(0))
            .transpose()?;
        Ok(plan
            .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
            .and_then(|v| v["kind"]["Deploy"]["config_revision"].as_u64()))
    }

    /// Every key of two revisions (0: none) side by side: its values as
    /// shown (empty for a secret) and how they compare: `same`, `changed`,
    /// `only-from`, `only-to`.
    pub async fn diff(
        &self,
        app: &AppName,
        (from_env, from_rev): (&str, u64),
        (to_env, to_rev): (&str, u64),
    ) -> Result<Vec<Compared>, ConfigError> {
        let side = |env: &str, rev: u64| {
            let env = env.to_owned();
            async move {
                match rev {
                    0 => Ok(BTreeMap::new()),
                    r => self.fingerprints(app, &env, r).await,
                }
            }
        };
        let (from, to) = (side(from_env, from_rev).await?, side(to_env, to_rev).await?);
        let keys: std::collections::BTreeSet<&String> = from.keys().chain(to.keys()).collect();
        Ok(keys
            .into_iter()
            .map(|k| {
                let (f, t) = (from.get(k), to.get(k));
                let how = match (f, t) {
                    (Some(a), Some(b)) if a.0 == b.0 && a.2 == b.2 => "same",
                    (Some(_), Some(_)) => "changed",
                    (Some(_), None) => "only-from",
                    (None, _) => "only-to",
                };
                Compared {
                    key: k.clone(),
                    secret: f.or(t).is_some_and(|v| v.0),
                    from: f.map(|v| v.1.clone()).unwrap_or_default(),
                    to: t.map(|v| v.1.clone()).unwrap_or_default(),
                    how,
                }
            })
            .collect())
    }

    /// The files of `version` rendered with a revision.
    pub async fn render(
        &self,
        app: &AppName,
        env: &str,
        version: &Version,
        revision: u64,
        host: &Target<'_>,
    ) -> Result<RenderedConfig, String> {
        let schema = self
            .schema(app, version)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{app} {version} declares no configuration"))?;
        let values = match revision {
            0 => BTreeMap::new(),
            r => self.values(app, env, r).await.map_err(|e| e.to_string())?,
        };
        Ok(RenderedConfig {
            revision,
            files: render::render(&schema, &resolve(&values, host))?,
        })
    }
}

#[async_trait::async_trait]
impl crate::rollout::seams::ConfigSource for AppConfig {
    async fn for_deploy(
        &self,
        app: &AppName,
        env: &str,
        version: &Version,
        revision: Option<u64>,
        targets: &[crate::rollout::seams::Labelled<'_>],
    ) -> Result<Option<u64>, String> {
        let targets: Vec<Target<'_>> = targets.iter().map(|(name, labels)| Target { name, labels }).collect();
        AppConfig::for_deploy(self, app, env, version, revision, &targets)
            .await
            .map_err(|e| e.to_string())
    }

    async fn render(
        &self,
        app: &AppName,
        env: &str,
        version: &Version,
        revision: u64,
        (name, labels): crate::rollout::seams::Labelled<'_>,
    ) -> Result<RenderedConfig, String> {
        AppConfig::render(self, app, env, version, revision, &Target { name, labels }).await
    }

    async fn against_passed(
        &self,
        app: &AppName,
        version: &Version,
        before: &str,
        env: &str,
        revision: u64,
    ) -> Result<Option<Passed>, String> {
        let Some(passed) = self
            .passed_revision(app, version, before)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let diff = self
            .diff(app, (before, passed), (env, revision))
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|c| c.how != "same")
            .map(|c| (c.key, c.how))
            .collect();
        Ok(Some((passed, diff)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_value_wins() {
        let v = |s: &str| ConfigValue {
            value: s.into(),
            secret: false,
        };
        let values: BTreeMap<String, ConfigValue> = [
            ("URL".to_owned(), v("env")),
            ("URL@group:role=db".to_owned(), v("db")),
            ("URL@group:role=db,zone=eu".to_owned(), v("db-eu")),
            ("URL@host:web2".to_owned(), v("web2")),
            ("PORT".to_owned(), v("80")),
        ]
        .into();
        let labels = |l: &[(&str, &str)]| -> BTreeMap<String, String> {
            l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let get = |name: &str, l: BTreeMap<String, String>| {
            resolve(&values, &Target { name, labels: &l })["URL"].value.clone()
        };
        assert_eq!(get("web1", labels(&[])), "env");
        assert_eq!(get("web1", labels(&[("role", "db")])), "db");
        assert_eq!(get("web1", labels(&[("role", "db"), ("zone", "eu")])), "db-eu");
        assert_eq!(get("web2", labels(&[("role", "db"), ("zone", "eu")])), "web2");
        let l = labels(&[("role", "db")]);
        let c = candidates(
            &values,
            &Target {
                name: "web1",
                labels: &l,
            },
        );
        let order: Vec<String> = c["URL"].iter().map(|(s, _)| s.to_string()).collect();
        assert_eq!(order, ["group role=db", "the environment"]);
        assert_eq!(c["PORT"].len(), 1);
    }

    #[tokio::test]
    async fn revisions_are_immutable_and_secrets_are_sealed_at_rest_and_survive_rotation() {
        for (what, db, keep) in crate::db::testing::both("config").await {
            let d = tempfile::tempdir().unwrap();
            let db = Arc::new(db);
            let c = AppConfig::new(db.clone(), Keyring::open(&d.path().join("config.key")).unwrap());
            sealed_values(what, &c, db, keep, d.path()).await;
        }
    }

    async fn sealed_values(what: &str, c: &AppConfig, db: Arc<Db>, sqlite: Option<tempfile::TempDir>, d: &Path) {
        let app = AppName::new("web").unwrap();
        let secret = "hunter2-very-secret-value";
        let r1 = c
            .change(
                &app,
                "staging",
                "operator:alice",
                Change {
                    set: [("DATABASE_URL".into(), "postgres://db/web".into())].into(),
                    secrets: [("API_KEY".into(), secret.into())].into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(r1, (1, "set DATABASE_URL, set secret API_KEY".to_owned()));
        let r2 = c
            .change(
                &app,
                "staging",
                "operator:bob",
                Change {
                    unset: vec!["DATABASE_URL".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(r2.0, 2);
        assert_eq!(
            c.values(&app, "staging", 1).await.unwrap().len(),
            2,
            "revision 1 is unchanged"
        );
        assert_eq!(c.values(&app, "staging", 2).await.unwrap()["API_KEY"].value, secret);
        let (head, shown) = c.show(&app, "staging", None).await.unwrap();
        assert_eq!((head.revision, head.author.as_str()), (2, "operator:bob"));
        assert_eq!(head.change, "unset DATABASE_URL");
        assert_eq!(shown[0].value, "", "a secret is never shown");
        let stored = db.query("SELECT value FROM config_values", &[]).await.unwrap();
        assert_eq!(stored.len(), 3, "{what}");
        for r in stored {
            let v: Vec<u8> = r.get(0).unwrap();
            assert!(
                !v.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{what}: sealed at rest"
            );
        }
        if let Some(dir) = &sqlite {
            let file = std::fs::read(dir.path().join("config.db")).unwrap();
            assert!(
                !file.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "sealed in the file"
            );
        }
        let key_mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(d.join("config.key")).unwrap().permissions());
        assert_eq!(key_mode & 0o777, 0o600);
        // Rotation: a new key, every secret resealed, still openable after a restart.
        let before = std::fs::read_to_string(d.join("config.key")).unwrap();
        assert_eq!(c.rotate_key().await.unwrap(), (2, 2));
        assert_ne!(std::fs::read_to_string(d.join("config.key")).unwrap(), before);
        let again = AppConfig::new(db.clone(), Keyring::open(&d.join("config.key")).unwrap());
        assert_eq!(again.values(&app, "staging", 1).await.unwrap()["API_KEY"].value, secret);
        // A sealed value moved to another key does not open.
        let e = c
            .change(
                &app,
                "staging",
                "x",
                Change {
                    unset: vec!["NOPE".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "NOPE is not set in web staging");
        assert!(matches!(
            c.show(&app, "staging", Some(9)).await,
            Err(ConfigError::NotFound(_))
        ));
    }
}
