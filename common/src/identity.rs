//! Peer identities carried in certificates, and PEM loading.
//!
//! A convoy certificate names its holder in the subject CommonName and its
//! kind (agent, operator, controller) in the OrganizationalUnit. The
//! controller reads both from the verified client certificate; nothing a
//! peer sends in a message can claim another identity.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::{HostName, InvalidName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    Agent,
    Operator,
    Controller,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Agent => "agent",
            PeerKind::Operator => "operator",
            PeerKind::Controller => "controller",
        }
    }
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PeerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "agent" => Ok(PeerKind::Agent),
            "operator" => Ok(PeerKind::Operator),
            "controller" => Ok(PeerKind::Controller),
            other => Err(format!(
                "unknown certificate kind {other:?} (expected agent, operator or controller)"
            )),
        }
    }
}

/// What an operator may do, written in the certificate's Organization.
/// Each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: status, history.
    Viewer,
    /// Also pushes releases, deploys and rolls back.
    Deployer,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "deployer" => Ok(Role::Deployer),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (expected viewer, deployer or admin)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerIdentity {
    pub kind: PeerKind,
    pub name: HostName,
    /// Operators only; a certificate without one is a viewer.
    pub role: Option<Role>,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Some(r) => write!(f, "{} {} ({})", self.kind, self.name, r.as_str()),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("client certificate could not be parsed: {0}")]
    Parse(String),
    #[error("client certificate has no CommonName")]
    NoCommonName,
    #[error("client certificate has no OrganizationalUnit naming its kind")]
    NoKind,
    #[error("client certificate: {0}")]
    BadKind(String),
    #[error("client certificate: {0}")]
    BadName(#[from] InvalidName),
}

/// Reads the identity from a DER certificate the TLS layer already verified.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(IdentityError::NoCommonName)?;
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(IdentityError::NoKind)?;
    let kind: PeerKind = ou.parse().map_err(IdentityError::BadKind)?;
    let role = match kind {
        PeerKind::Operator => Some(
            subject
                .iter_organization()
                .next()
                .and_then(|a| a.as_str().ok())
                .and_then(|r| r.parse().ok())
                .unwrap_or(Role::Viewer),
        ),
        _ => None,
    };
    Ok(PeerIdentity {
        kind,
        name: HostName::new(cn)?,
        role,
    })
}

/// A certificate's validity window, in unix seconds (not before, not after).
pub fn validity_secs(der: &[u8]) -> Result<(i64, i64), IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// How a CA certificate is pinned: `sha256:` and the hex digest of its DER.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}

/// The DER of each certificate in a PEM text.
pub fn certs_der(pem: &[u8]) -> Vec<Vec<u8>> {
    rustls_pemfile::certs(&mut &pem[..])
        .filter_map(|c| c.ok())
        .map(|c| c.to_vec())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: private key is readable by group or others (mode {mode:o}); run chmod 600 {path}")]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: no PEM {what} found")]
    Empty { path: PathBuf, what: &'static str },
}

/// Reads a PEM file holding certificates, checking it holds at least one.
pub fn read_cert_pem(path: &Path) -> Result<Vec<u8>, PemError> {
    let data = std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })?;
    let count = rustls_pemfile::certs(&mut &data[..]).filter(|c| c.is_ok()).count();
    if count == 0 {
        return Err(PemError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(data)
}

/// Reads a PEM private key, refusing one that group or others can read.
pub fn read_key_pem(path: &Path) -> Result<Vec<u8>, PemError> {
    let meta = std::fs::metadata(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PemError::KeyTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let data = std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })?;
    match rustls_pemfile::private_key(&mut &data[..]) {
        Ok(Some(_)) => Ok(data),
        _ => Err(PemError::Empty {
            path: path.to_owned(),
            what: "private key",
        }),
    }
}
