//! Enrollment, certificate renewal and revocation.
//!
//! A host joins with a one-time token an admin created: it generates its
//! key itself and sends only a certificate request, which the controller
//! signs with a subject of its own making (the token's name, kind agent).
//! The token's labels are the host's from then on, whatever its config
//! says. Agents renew their certificate over their authenticated session
//! before it expires. Revoking a host disconnects it and refuses every
//! certificate issued to it up to that moment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use convoy_common::identity::{validity_secs, PeerIdentity, PeerKind};
use convoy_common::HostName;
use convoy_proto::enroll_service_server::EnrollService;
use convoy_proto::{CertReply, EnrollRequest};
use tonic::{Request, Response, Status};

use super::{internal, peer, Shared};

/// The calling agent, unless its certificate was revoked.
pub async fn agent_peer<T>(shared: &Shared, req: &Request<T>) -> Result<PeerIdentity, Status> {
    let id = peer(req, &[PeerKind::Agent])?;
    if let Some(revoked_at) = shared.db.revoked_at(id.name.as_str()).await.map_err(internal)? {
        let der = req
            .peer_certs()
            .and_then(|c| c.first().map(|d| d.to_vec()))
            .unwrap_or_default();
        let (not_before, _) = validity_secs(&der).map_err(|e| Status::unauthenticated(e.to_string()))?;
        if not_before * 1000 <= revoked_at {
            tracing::warn!(host = %id.name, "refused a revoked certificate");
            return Err(Status::permission_denied(format!(
                "{id} was revoked; this certificate is no longer accepted (enroll the host again)"
            )));
        }
    }
    Ok(id)
}

/// Signs `csr_pem` for `name`, valid from now, or from just after the
/// host's last revocation when that is later (certificates are compared
/// with it at second resolution).
async fn sign(shared: &Shared, name: &HostName, csr_pem: &str) -> Result<CertReply, Status> {
    let Some(ca_key) = &shared.cfg.ca_key else {
        return Err(Status::failed_precondition(
            "this controller does not sign certificates: set ca_key in controller.toml",
        ));
    };
    let ca_pem = std::fs::read_to_string(&shared.cfg.ca).map_err(internal)?;
    let key = convoy_common::identity::read_key_pem(ca_key).map_err(internal)?;
    let key = String::from_utf8(key).map_err(internal)?;
    let mut now = SystemTime::now();
    if let Some(revoked_at) = shared.db.revoked_at(name.as_str()).await.map_err(internal)? {
        let after = UNIX_EPOCH + Duration::from_millis(revoked_at as u64 / 1000 * 1000 + 1000);
        if let Ok(wait) = after.duration_since(now) {
            tokio::time::sleep(wait).await;
            now = SystemTime::now();
        }
    }
    let cert_pem = crate::pki::sign_agent_csr(&ca_pem, &key, name, csr_pem, now, shared.cfg.agent_cert_validity)
        .map_err(|e| Status::invalid_argument(format!("csr_pem: {e:#}")))?;
    Ok(CertReply {
        cert_pem,
        ca_pem,
        labels: Default::default(),
    })
}

/// `Renew`: a fresh certificate for the calling agent's own name.
pub async fn renew(shared: &Shared, req: Request<convoy_proto::CsrRequest>) -> Result<Response<CertReply>, Status> {
    let id = agent_peer(shared, &req).await?;
    let reply = sign(shared, &id.name, &req.get_ref().csr_pem).await?;
    tracing::info!(host = %id.name, "certificate renewed");
    Ok(Response::new(reply))
}

/// The token as stored: its sha256, so the database never holds a usable token.
pub fn token_hash(token: &str) -> String {
    convoy_common::Digest::of_bytes(token.as_bytes()).to_hex()
}

/// A new one-time token (256 random bits).
pub fn new_token() -> String {
    format!("cvt_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Creates a token for `name` (or any new name) with `labels`.
pub async fn create_token(
    shared: &Shared,
    who: &PeerIdentity,
    name: &str,
    labels: &BTreeMap<String, String>,
    ttl: Duration,
) -> Result<(String, i64), Status> {
    if !name.is_empty() {
        HostName::new(name).map_err(|e| Status::invalid_argument(format!("--name: {e}")))?;
    }
    if ttl.is_zero() || ttl > Duration::from_secs(7 * 86400) {
        return Err(Status::invalid_argument("--ttl must be more than 0 and at most 7 days"));
    }
    if shared.cfg.ca_key.is_none() {
        return Err(Status::failed_precondition(
            "this controller does not sign certificates: set ca_key in controller.toml",
        ));
    }
    let token = new_token();
    let expires = convoy_common::ops::now_unix_ms() + ttl.as_millis() as i64;
    shared
        .db
        .add_token(&token_hash(&token), name, labels, expires, &who.to_string())
        .await
        .map_err(internal)?;
    tracing::info!(by = %who, name, ?labels, expires_at_ms = expires, "enrollment token created");
    Ok((token, expires))
}

/// Revokes `host`: from now on its certificates are refused, and its
/// session (if any) is closed.
pub async fn revoke(shared: &Shared, who: &PeerIdentity, host: &str) -> Result<bool, Status> {
    let name = HostName::new(host).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let known = shared.registry.hosts().iter().any(|h| h.name == name)
        || !shared.db.host_labels(host).await.map_err(internal)?.is_empty();
    if !known {
        return Err(Status::not_found(format!("no host {host} is known to this controller")));
    }
    shared
        .db
        .revoke_host(host, convoy_common::ops::now_unix_ms(), &who.to_string())
        .await
        .map_err(internal)?;
    let was_connected = shared.registry.kick(&name, "this host's certificate was revoked");
    tracing::warn!(%host, by = %who, was_connected, "host revoked");
    Ok(was_connected)
}

pub struct EnrollApi {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl EnrollService for EnrollApi {
    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<CertReply>, Status> {
        let remote = req.remote_addr();
        let r = req.into_inner();
        let name = HostName::new(r.name.as_str()).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let known = self
            .shared
            .registry
            .hosts()
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.connected());
        if known == Some(true) {
            return Err(Status::failed_precondition(format!(
                "host {name} is connected; a host cannot be enrolled twice at once"
            )));
        }
        // Check the request before spending the token on it.
        rcgen::CertificateSigningRequestParams::from_pem(&r.csr_pem)
            .map_err(|e| Status::invalid_argument(format!("csr_pem: not a valid PEM CSR: {e}")))?;
        let labels = self
            .shared
            .db
            .spend_token(
                &token_hash(&r.token),
                name.as_str(),
                known.is_some(),
                convoy_common::ops::now_unix_ms(),
            )
            .await
            .map_err(|e| {
                tracing::warn!(%name, ?remote, error = %e, "enrollment refused");
                match e {
                    crate::db::TokenError::Db(e) => internal(e),
                    e => Status::permission_denied(e.to_string()),
                }
            })?;
        let mut reply = sign(&self.shared, &name, &r.csr_pem).await?;
        reply.labels = labels.into_iter().collect();
        tracing::info!(host = %name, ?remote, "host enrolled");
        Ok(Response::new(reply))
    }
}
