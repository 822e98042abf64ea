//! `convoy serve`: the controller daemon. One TLS port serves both the
//! agent API and the operator API; every caller is identified by its
//! client certificate.

mod agents;
mod enroll;
mod operator;
mod registry;
mod rollout;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use convoy_common::identity::{identity_from_der, PeerIdentity, PeerKind, Role};
use convoy_proto::agent_service_server::AgentServiceServer;
use convoy_proto::enroll_service_server::EnrollServiceServer;
use convoy_proto::operator_service_server::OperatorServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::artifacts::Artifacts;
use crate::config::Config;
use crate::db::Db;

/// State shared by both services.
pub struct Shared {
    pub cfg: Config,
    pub db: Db,
    pub artifacts: Artifacts,
    pub registry: Arc<registry::Registry>,
    /// (app, environment) → running rollout id.
    pub running: Mutex<HashMap<(String, String), String>>,
    /// Running rollouts by id: their event stream and their control.
    pub live: Mutex<HashMap<String, rollout::Live>>,
    pub notifier: crate::webhooks::Notifier,
}

/// The verified identity of the caller, if its kind is allowed here.
pub fn peer<T>(req: &Request<T>, allowed: &[PeerKind]) -> Result<PeerIdentity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let der = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let id = identity_from_der(der).map_err(|e| Status::unauthenticated(e.to_string()))?;
    if !allowed.contains(&id.kind) {
        return Err(Status::permission_denied(format!(
            "{id} may not call this API; it takes a certificate of kind {}",
            allowed.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" or ")
        )));
    }
    Ok(id)
}

/// The calling operator, if their role allows `action`.
pub fn operator<T>(req: &Request<T>, need: Role, action: &str) -> Result<PeerIdentity, Status> {
    let id = peer(req, &[PeerKind::Operator])?;
    if id.role.unwrap_or(Role::Viewer) < need {
        return Err(Status::permission_denied(format!(
            "{id} may not {action}; that takes the {} role or above",
            need.as_str()
        )));
    }
    Ok(id)
}

pub fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal(e.to_string())
}

/// Runs the controller until `shutdown` resolves.
pub async fn serve(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let db = Db::open(&cfg.data_dir.join("convoy.db"))?;
    let artifacts = Artifacts::open(&cfg.data_dir)?;
    let ca = convoy_common::identity::read_cert_pem(&cfg.ca)?;
    let cert = convoy_common::identity::read_cert_pem(&cfg.cert)?;
    let key = convoy_common::identity::read_key_pem(&cfg.key)?;
    // The chain includes the CA, so an enrolling agent can check it
    // against the fingerprint it was given. Client certificates are
    // optional at the TLS layer only so that enrollment can be reached
    // without one; every other call requires one (see `peer`).
    let mut chain = cert;
    chain.push(b'\n');
    chain.extend_from_slice(&ca);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(chain, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(true);
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let cfg_webhooks = cfg.webhooks.clone();
    // Roots for https webhooks, loaded once (only when one is configured).
    let webhook_tls = if cfg.webhooks.iter().any(|u| u.starts_with("https:")) {
        Some(
            convoy_common::http::tls_roots(cfg.webhook_ca.as_deref())
                .map_err(|e| anyhow::anyhow!("webhook_ca: {e}"))?,
        )
    } else {
        None
    };
    let shared = Arc::new(Shared {
        cfg,
        db,
        artifacts,
        registry: Arc::new(registry::Registry::default()),
        running: Mutex::new(HashMap::new()),
        live: Mutex::new(HashMap::new()),
        notifier: crate::webhooks::Notifier::new(cfg_webhooks, webhook_tls),
    });
    if let Some(listen) = shared.cfg.metrics_listen {
        convoy_common::observe::serve_metrics(listen, crate::metrics::get().registry.clone())
            .await
            .with_context(|| format!("metrics_listen: binding {listen}"))?;
    }
    tracing::info!(%addr, "controller listening");
    convoy_common::observe::notify::ready(&format!("listening on {addr}"));
    convoy_common::observe::notify::spawn_watchdog();
    tokio::spawn(rollout::resume_all(shared.clone()));
    Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(AgentServiceServer::new(agents::AgentApi { shared: shared.clone() }))
        .add_service(EnrollServiceServer::new(enroll::EnrollApi { shared: shared.clone() }))
        .add_service(OperatorServiceServer::new(operator::OperatorApi { shared }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
