//! Joining a fleet and staying in it: enrollment with a one-time token,
//! and certificate renewal before expiry.
//!
//! The key is generated here and never leaves the host; the controller
//! sees only a certificate request. Before the token is sent, the
//! controller is authenticated by the CA fingerprint from the config: the
//! TLS chain it presents must contain that exact CA and its certificate
//! must verify under it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use convoy_common::fsutil::write_atomic;
use convoy_common::identity::{certs_der, fingerprint, validity_secs};
use convoy_proto::agent_service_client::AgentServiceClient;
use convoy_proto::enroll_service_client::EnrollServiceClient;
use convoy_proto::{CsrRequest, EnrollRequest};
use rcgen::PublicKeyData;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tonic::transport::Endpoint;

use crate::config::Config;

/// Enrolls when the certificate does not exist yet; finishes a renewal a
/// crash interrupted.
pub async fn enroll_if_needed(cfg: &Config) -> anyhow::Result<()> {
    finish_renewal(cfg)?;
    if cfg.cert.exists() {
        return Ok(());
    }
    let (Some(token), Some(pin)) = (&cfg.enroll_token, &cfg.ca_fingerprint) else {
        bail!(
            "{} does not exist; set enroll_token and ca_fingerprint in the config to enroll (see `convoy enroll create-token`)",
            cfg.cert.display()
        );
    };
    tracing::info!(name = %cfg.name, controller = %cfg.controller, "enrolling");
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let channel = pinned_channel(cfg, pin).await?;
    let reply = EnrollServiceClient::new(channel)
        .enroll(EnrollRequest {
            token: token.clone(),
            name: cfg.name.clone(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| anyhow!("enrollment refused: {}", s.message()))?
        .into_inner();
    let ca = certs_der(reply.ca_pem.as_bytes());
    if ca.first().map(|d| fingerprint(d)).as_deref() != Some(pin.as_str()) {
        bail!("the controller sent a CA that does not match ca_fingerprint");
    }
    if let Some(dir) = cfg.cert.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_atomic(&cfg.ca, reply.ca_pem.as_bytes(), 0o644).with_context(|| cfg.ca.display().to_string())?;
    write_atomic(&cfg.key, key.serialize_pem().as_bytes(), 0o600).with_context(|| cfg.key.display().to_string())?;
    write_atomic(&cfg.cert, reply.cert_pem.as_bytes(), 0o644).with_context(|| cfg.cert.display().to_string())?;
    let labels: Vec<String> = reply.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    tracing::info!(name = %cfg.name, labels = %labels.join(","), "enrolled; certificate stored");
    Ok(())
}

fn pending(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

/// A renewal writes `cert.new` and `key.new`, then renames the key, then
/// the certificate. After a crash: a `key.new` means both are complete;
/// a lone `cert.new` is used only if it belongs to the current key.
fn finish_renewal(cfg: &Config) -> anyhow::Result<()> {
    let (cert_new, key_new) = (pending(&cfg.cert), pending(&cfg.key));
    if key_new.exists() && cert_new.exists() {
        std::fs::rename(&key_new, &cfg.key)?;
    } else if key_new.exists() {
        std::fs::remove_file(&key_new)?;
    }
    if cert_new.exists() {
        let key = std::fs::read_to_string(&cfg.key)?;
        let cert = std::fs::read(&cert_new)?;
        if belongs(&cert, &key) {
            std::fs::rename(&cert_new, &cfg.cert)?;
            tracing::warn!("finished a certificate renewal interrupted by a crash");
        } else {
            std::fs::remove_file(&cert_new)?;
        }
    }
    Ok(())
}

fn belongs(cert_pem: &[u8], key_pem: &str) -> bool {
    let Ok(key) = rcgen::KeyPair::from_pem(key_pem) else {
        return false;
    };
    certs_der(cert_pem).first().is_some_and(|der| {
        x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| c.public_key().raw == key.subject_public_key_info().as_slice())
            .unwrap_or(false)
    })
}

/// Renews the certificate when less than a third of its life is left,
/// checking as often as a tenth of its life (1 s to 1 h). The session in
/// progress keeps its connection; the next one uses the new certificate.
pub async fn renew_forever(cfg: Config, endpoint: impl Fn() -> anyhow::Result<Endpoint>) {
    loop {
        let wait = match due(&cfg) {
            Ok((true, life)) => {
                match renew(&cfg, &endpoint).await {
                    Ok(()) => tracing::info!("certificate renewed"),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed; will retry"),
                }
                life / 10
            }
            Ok((false, life)) => life / 10,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the certificate's validity");
                Duration::from_secs(3600)
            }
        };
        tokio::time::sleep(wait.clamp(Duration::from_secs(1), Duration::from_secs(3600))).await;
    }
}

/// Whether the certificate is due for renewal, and its whole life.
fn due(cfg: &Config) -> anyhow::Result<(bool, Duration)> {
    let pem = std::fs::read(&cfg.cert)?;
    let der = certs_der(&pem).into_iter().next().context("no certificate")?;
    let (from, to) = validity_secs(&der)?;
    let now = convoy_common::ops::now_unix_ms() / 1000;
    let life = Duration::from_secs((to - from).max(1) as u64);
    Ok(((to - now) * 3 < to - from, life))
}

async fn renew(cfg: &Config, endpoint: &impl Fn() -> anyhow::Result<Endpoint>) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let channel = convoy_proto::connect(&endpoint()?).await?;
    let reply = AgentServiceClient::new(channel)
        .renew(CsrRequest { csr_pem: csr })
        .await
        .map_err(|s| anyhow!("the controller refused: {}", s.message()))?
        .into_inner();
    if !belongs(reply.cert_pem.as_bytes(), &key.serialize_pem()) {
        bail!("the controller's certificate is not for the key this host sent");
    }
    let (cert_new, key_new) = (pending(&cfg.cert), pending(&cfg.key));
    write_atomic(&cert_new, reply.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&key_new, key.serialize_pem().as_bytes(), 0o600)?;
    std::fs::rename(&key_new, &cfg.key)?;
    std::fs::rename(&cert_new, &cfg.cert)?;
    Ok(())
}

/// A gRPC channel to the controller over TLS that trusts exactly the CA
/// with fingerprint `pin`.
async fn pinned_channel(cfg: &Config, pin: &str) -> anyhow::Result<tonic::transport::Channel> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin: pin.to_owned(),
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let authority = cfg
        .controller
        .strip_prefix("https://")
        .context("controller must start with https://")?
        .trim_end_matches('/')
        .to_owned();
    let name = ServerName::try_from(cfg.server_name.clone())?;
    let channel = Endpoint::from_shared(format!("http://{authority}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, authority) = (connector.clone(), name.clone(), authority.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("connecting to {} to enroll", cfg.controller))?;
    Ok(channel)
}

#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.pin)
            .ok_or_else(|| rustls::Error::General("the controller's CA does not match ca_fingerprint".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
