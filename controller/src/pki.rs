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
/// Writes `out_dir/NAME.pem`, `out_dir/NAME.key` (0600) and, unless it is
/// already there, the CA certificate as `out_dir/ca.pem`: the three files a
/// host or an operator needs.
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
    // Checked before anything is written.
    let ca_copy = out_dir.join(CA_CERT);
    let copy_ca = match fs::read_to_string(&ca_copy) {
        Ok(existing) if existing == ca_pem => false,
        Ok(_) => bail!(
            "{} holds another CA's certificate; nothing was issued (use another --out)",
            ca_copy.display()
        ),
        Err(_) => true,
    };
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    fs::create_dir_all(out_dir)?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    if copy_ca {
        write_new(&ca_copy, &ca_pem, 0o644)?;
    }
    Ok((cert_path, key_path))
}

/// Signs an agent certificate for `name` over the public key in `csr_pem`.
/// Nothing else is taken from the request: the subject, usages and
/// validity are the controller's. Valid from `not_before` (whole seconds)
/// for `validity`.
pub fn sign_agent_csr(
    ca_pem: &str,
    ca_key_pem: &str,
    name: &HostName,
    csr_pem: &str,
    not_before: std::time::SystemTime,
    validity: std::time::Duration,
) -> anyhow::Result<String> {
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).context("not a valid PEM CSR")?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key_pem)?)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name.as_str());
    dn.push(DnType::OrganizationalUnitName, PeerKind::Agent.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![SanType::DnsName(name.as_str().try_into()?)];
    let from = not_before
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(from);
    params.not_after = params.not_before + validity;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(uuid::Uuid::new_v4().as_bytes()));
    csr.params = params;
    Ok(csr.signed_by(&issuer)?.pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuing_into_a_directory_puts_the_ca_certificate_beside() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let out = dir.path().join("alice");
        issue(
            dir.path(),
            PeerKind::Operator,
            "alice",
            Some(Role::Deployer),
            &[],
            &out,
            30,
        )
        .unwrap();
        assert_eq!(
            fs::read(out.join("ca.pem")).unwrap(),
            fs::read(dir.path().join("ca.pem")).unwrap()
        );
        // A second certificate into the same place keeps it.
        issue(dir.path(), PeerKind::Agent, "web1", None, &[], &out, 30).unwrap();
        // Another CA's ca.pem there is left alone, and nothing is issued.
        let other = tempfile::tempdir().unwrap();
        init(other.path()).unwrap();
        let e = issue(other.path(), PeerKind::Agent, "web2", None, &[], &out, 30).unwrap_err();
        assert!(
            e.to_string()
                .contains("holds another CA's certificate; nothing was issued"),
            "{e}"
        );
        assert!(!out.join("web2.pem").exists() && !out.join("web2.key").exists());
    }

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

    #[test]
    fn csrs_are_signed_with_the_controllers_subject() {
        use rcgen::PublicKeyData;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let ca = fs::read_to_string(dir.path().join(CA_CERT)).unwrap();
        let ca_key = fs::read_to_string(dir.path().join(CA_KEY)).unwrap();
        // The request asks to be an operator admin; it gets an agent certificate.
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil".to_owned()]).unwrap();
        asked
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "operator");
        asked.distinguished_name.push(DnType::OrganizationName, "admin");
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let name = HostName::new("web7").unwrap();
        let validity = std::time::Duration::from_secs(600);
        let pem = sign_agent_csr(&ca, &ca_key, &name, &csr, std::time::SystemTime::now(), validity).unwrap();
        let der = rustls_pemfile_first(pem.as_bytes());
        let id = convoy_common::identity::identity_from_der(&der).unwrap();
        assert_eq!((id.kind, id.name.as_str(), id.role), (PeerKind::Agent, "web7", None));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.validity().time_to_expiration().map(|d| d.whole_seconds() <= 600),
            Some(true)
        );
        assert_eq!(cert.public_key().raw, key.subject_public_key_info().as_slice());
        assert!(
            sign_agent_csr(&ca, &ca_key, &name, "garbage", std::time::SystemTime::now(), validity)
                .unwrap_err()
                .to_string()
                .contains("not a valid PEM CSR")
        );
    }

    fn rustls_pemfile_first(pem: &[u8]) -> Vec<u8> {
        rustls_pemfile::certs(&mut &pem[..]).next().unwrap().unwrap().to_vec()
    }
}
