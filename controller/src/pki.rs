//! `convoy pki`: a small certificate authority for a convoy fleet.
//!
//! Certificates name their holder in the CommonName and their kind
//! (agent, operator, controller) in the OrganizationalUnit, which is what
//! the controller authorises on.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use convoy_common::identity::{PeerKind, Role};
use convoy_common::HostName;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

fn write_new(path: &Path, data: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, data.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::Duration::from_secs(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_secs(),
        );
    params.not_before = now - std::time::Duration::from_secs(3600);
    params.not_after = now + std::time::Duration::from_secs(days as u64 * 86400);
}

/// Creates `dir/ca.pem` and `dir/ca.key`; refuses to overwrite a CA.
pub fn init(dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if dir.join(CA_KEY).exists() || dir.join(CA_CERT).exists() {
        bail!("{} already holds a CA; refusing to overwrite it", dir.display());
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "convoy fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, 3650);
    let cert = params.self_signed(&key)?;
    write_new(&dir.join(CA_KEY), &key.serialize_pem(), 0o600)?;
    write_new(&dir.join(CA_CERT), &cert.pem(), 0o644)?;
    Ok(dir.join(CA_CERT))
}

/// Issues a certificate for `name` of `kind`, signed by the CA in `dir`.
/// Writes `out_dir/NAME.pem` and `out_dir/NAME.key` (0600).
pub fn issue(
    dir: &Path,
    kind: PeerKind,
    name: &str,
    role: Option<Role>,
    sans: &[String],
    out_dir: &Path,
    days: i64,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if role.is_some() && kind != PeerKind::Operator {
        bail!("--role applies to operator certificates only");
    }
    let name = HostName::new(name)?;
    let ca_pem =
        fs::read_to_string(dir.join(CA_CERT)).with_context(|| format!("reading {}", dir.join(CA_CERT).display()))?;
    let ca_key_pem = convoy_common::identity::read_key_pem(&dir.join(CA_KEY))?;
    let ca_key = KeyPair::from_pem(std::str::from_utf8(&ca_key_pem)?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name.as_str());
    dn.push(DnType::OrganizationalUnitName, kind.as_str());
    if kind == PeerKind::Operator {
        dn.push(DnType::OrganizationName, role.unwrap_or(Role::Deployer).as_str());
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match kind {
        PeerKind::Controller => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let mut alt = vec![name.to_string()];
    alt.extend(sans.iter().cloned());
    for s in alt {
        params.subject_alt_names.push(match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(s.clone().try_into().with_context(|| format!("bad SAN {s:?}"))?),
        });
    }
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    fs::create_dir_all(out_dir)?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_identity() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(init(dir.path()).is_err(), "a second init must not overwrite the CA");
        let (cert, _key) = issue(dir.path(), PeerKind::Agent, "host1", None, &[], dir.path(), 30).unwrap();
        let pem = fs::read(cert).unwrap();
        let der = rustls_pemfile_first(&pem);
        let id = convoy_common::identity::identity_from_der(&der).unwrap();
        assert_eq!(id.kind, PeerKind::Agent);
        assert_eq!(id.name.as_str(), "host1");
        assert_eq!(id.role, None);
        let (cert, _) = issue(
            dir.path(),
            PeerKind::Operator,
            "alice",
            Some(Role::Viewer),
            &[],
            dir.path(),
            30,
        )
        .unwrap();
        let id = convoy_common::identity::identity_from_der(&rustls_pemfile_first(&fs::read(cert).unwrap())).unwrap();
        assert_eq!((id.kind, id.role), (PeerKind::Operator, Some(Role::Viewer)));
        assert!(issue(
            dir.path(),
            PeerKind::Agent,
            "h2",
            Some(Role::Admin),
            &[],
            dir.path(),
            30
        )
        .is_err());
    }

    fn rustls_pemfile_first(pem: &[u8]) -> Vec<u8> {
        rustls_pemfile::certs(&mut &pem[..]).next().unwrap().unwrap().to_vec()
    }
}
