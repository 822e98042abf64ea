//! Artifact signatures (ed25519).
//!
//! A signature covers the app, the version, the artifact's sha256 and the
//! sha256 of its manifest together, so a signed artifact cannot be
//! replayed as another app or version, and a host that builds the release
//! from its manifest (delta staging) gets no content the signer did not
//! sign. Signatures made before manifests existed cover the first three
//! only; they still verify, for the whole artifact only. The agent checks
//! signatures against keys in its own configuration; the controller only
//! carries them.

use std::io::Read;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::digest::Digest;
use crate::names::{AppName, Version};

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{0}")]
    Key(String),
    #[error("unsigned artifact refused: this host trusts only artifacts signed by one of its {0} trusted key(s)")]
    Unsigned(usize),
    #[error("signature refused: it does not verify with any of this host's {0} trusted key(s)")]
    BadSignature(usize),
}

/// The bytes a signature covers: with a manifest (v2), or without (v1,
/// signatures made before manifests existed).
pub fn message(app: &AppName, version: &Version, digest: &Digest, manifest: Option<&Digest>) -> Vec<u8> {
    match manifest {
        Some(m) => format!(
            "convoy-artifact-v2\n{app}\n{version}\n{}\n{}\n",
            digest.to_hex(),
            m.to_hex()
        ),
        None => format!("convoy-artifact-v1\n{app}\n{version}\n{}\n", digest.to_hex()),
    }
    .into_bytes()
}

/// What a verified signature vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Covers {
    /// This host trusts no keys: the sha256 the controller gave is all.
    NoKeys,
    /// The artifact only (a v1 signature): the manifest is not vouched
    /// for, so the release must be staged from the whole artifact.
    Artifact,
    /// The artifact and its manifest.
    ArtifactAndManifest,
}

/// A trusted public key, written as `ed25519:<64 hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, SigningError> {
        let bad = || SigningError::Key(format!("{s:?} is not a public key (expected ed25519:<64 hex digits>)"));
        let hex_part = s.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| bad())?;
        VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|_| bad())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ed25519:{}", hex::encode(self.0.as_bytes()))
    }
}

/// A private signing key; its file holds 64 hex digits and must be 0600.
pub struct PrivateKey(SigningKey);

impl PrivateKey {
    /// A new key from the kernel's random source.
    pub fn generate() -> std::io::Result<Self> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
        Ok(PrivateKey(SigningKey::from_bytes(&seed)))
    }

    pub fn load(path: &Path) -> Result<Self, SigningError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| SigningError::Key(format!("{}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(SigningError::Key(format!(
                "{}: signing key is readable by group or others; run chmod 600 {}",
                path.display(),
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| SigningError::Key(format!("{}: {e}", path.display())))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed)
            .map_err(|_| SigningError::Key(format!("{}: not a convoy signing key", path.display())))?;
        Ok(PrivateKey(SigningKey::from_bytes(&seed)))
    }

    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex::encode(self.0.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs an artifact and its manifest.
    pub fn sign(&self, app: &AppName, version: &Version, digest: &Digest, manifest: &Digest) -> Vec<u8> {
        self.sign_message(&message(app, version, digest, Some(manifest)))
    }

    pub fn sign_message(&self, msg: &[u8]) -> Vec<u8> {
        self.0.sign(msg).to_bytes().to_vec()
    }
}

/// Checks `signature` when `trusted` is not empty; with no trusted keys
/// every artifact is accepted (its sha256 is still checked). A signature
/// over the artifact and `manifest` covers both; one over the artifact
/// alone (v1) covers only it.
pub fn verify(
    trusted: &[PublicKey],
    app: &AppName,
    version: &Version,
    digest: &Digest,
    manifest: Option<&Digest>,
    signature: Option<&[u8]>,
) -> Result<Covers, SigningError> {
    if trusted.is_empty() {
        return Ok(Covers::NoKeys);
    }
    let sig = signature.ok_or(SigningError::Unsigned(trusted.len()))?;
    let sig = Signature::from_slice(sig).map_err(|_| SigningError::BadSignature(trusted.len()))?;
    let verifies = |msg: Vec<u8>| trusted.iter().any(|k| k.0.verify(&msg, &sig).is_ok());
    if manifest.is_some_and(|m| verifies(message(app, version, digest, Some(m)))) {
        Ok(Covers::ArtifactAndManifest)
    } else if verifies(message(app, version, digest, None)) {
        Ok(Covers::Artifact)
    } else {
        Err(SigningError::BadSignature(trusted.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_app_version_digest_and_manifest() {
        let key = PrivateKey::generate().unwrap();
        let other = PrivateKey::generate().unwrap();
        let trusted = [key.public()];
        let (app, v1, v2) = (
            AppName::new("web").unwrap(),
            Version::new("1").unwrap(),
            Version::new("2").unwrap(),
        );
        let d = Digest::of_bytes(b"artifact");
        let m = Digest::of_bytes(b"manifest");
        let sig = key.sign(&app, &v1, &d, &m);
        let check = |v: &Version, d: &Digest, m: Option<&Digest>, s: Option<&[u8]>| verify(&trusted, &app, v, d, m, s);
        assert_eq!(
            check(&v1, &d, Some(&m), Some(&sig)).unwrap(),
            Covers::ArtifactAndManifest
        );
        // Replayed under another version, over other bytes, with another
        // manifest or none, or by another key.
        assert!(check(&v2, &d, Some(&m), Some(&sig)).is_err());
        assert!(check(&v1, &Digest::of_bytes(b"evil"), Some(&m), Some(&sig)).is_err());
        assert!(check(&v1, &d, Some(&Digest::of_bytes(b"smuggled")), Some(&sig)).is_err());
        assert!(check(&v1, &d, None, Some(&sig)).is_err());
        let forged = other.sign(&app, &v1, &d, &m);
        assert!(matches!(
            check(&v1, &d, Some(&m), Some(&forged)),
            Err(SigningError::BadSignature(1))
        ));
        assert!(matches!(check(&v1, &d, Some(&m), None), Err(SigningError::Unsigned(1))));
        // A signature made before manifests (v1) vouches for the artifact only.
        let old = key.sign_message(&message(&app, &v1, &d, None));
        assert_eq!(check(&v1, &d, Some(&m), Some(&old)).unwrap(), Covers::Artifact);
        assert_eq!(check(&v1, &d, None, Some(&old)).unwrap(), Covers::Artifact);
        assert_eq!(verify(&[], &app, &v1, &d, None, None).unwrap(), Covers::NoKeys);
        // Keys round-trip through their text forms.
        assert_eq!(PublicKey::parse(&key.public().to_string()).unwrap(), key.public());
        assert!(PublicKey::parse("ed25519:zz").is_err());
    }
}
