//! `convoy serve`: the controller daemon. One TLS port serves both the
//! agent API and the operator API; every caller is identified by its
//! client certificate.

mod agents;
mod edge;
mod enroll;
mod fleet_view;
mod operator;
mod registry;
mod relay;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use convoy_common::identity::{identity_from_der, PeerIdentity, PeerKind, Role};
use convoy_proto::agent_service_server::AgentServiceServer;
use convoy_proto::enroll_service_server::EnrollServiceServer;
use convoy_proto::operator_service_server::OperatorServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::artifacts::Artifacts;
use crate::config::Config;
use crate::db::Db;
use crate::rollout::{Engine, EngineConfig, Refused};

/// State shared by both services.
pub struct Shared {
    pub cfg: Config,
    pub db: Arc<Db>,
    pub artifacts: Arc<Artifacts>,
    pub registry: Arc<registry::Registry>,
    pub engine: Arc<Engine>,
    /// Configuration revisions and secrets.
    pub appconfig: Arc<crate::appconfig::AppConfig>,
    /// Cancelled when the controller stops: agent sessions, operator
    /// streams and rollout tasks end at once.
    pub stop: CancellationToken,
    /// Every task the controller spawns, so that stopping waits for them.
    pub tasks: TaskTracker,
}

impl Shared {
    /// Runs `task` as one of the controller's own: it ends when the
    /// controller stops (dropped at its next await), and stopping waits
    /// for it. A rollout cut off this way stays recorded as running and is
    /// resumed by the next controller.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Works with the other controllers on the database: publishes this
/// one's hosts and that it is up, sends what others left for its hosts,
/// and takes what they left for it.
async fn relay_rounds(shared: Arc<Shared>, relay: Arc<relay::Relay>) {
    let mut round: u64 = 0;
    loop {
        let registry = &shared.registry;
        // Hourly: what lay in the relay for a day was for a host or a
        // controller that is gone (a rollout waits far less: host_timeout).
        if round.is_multiple_of(18_000) {
            match relay.sweep(24 * 3600 * 1000).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "relay rows nobody took in a day removed"),
                Err(e) => tracing::warn!(error = %e, "could not sweep the relay"),
            }
        }
        if round.is_multiple_of(5) {
            if let Err(e) = relay.refresh_remote(|h| registry.session_of(h).is_some()).await {
                tracing::warn!(error = %e, "could not read other controllers' hosts (retrying)");
            }
        }
        round += 1;
        if let Err(e) = relay.publish(|h| registry.published(h)).await {
            tracing::warn!(error = %e, "could not publish this controller's hosts (retrying)");
        }
        match relay.outbound(|h| registry.session_of(h)).await {
            Ok(out) => {
                for (session, op_id, host, msg) in out {
                    tracing::info!(%host, %op_id, "sending a command another controller left");
                    registry.send_on(&host, session, msg).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read commands left for this controller's hosts"),
        }
        match relay.inbound().await {
            Ok(items) => {
                for item in items {
                    match item {
                        relay::Inbound::Result(host, r) => agents::result_here(&shared, &host, *r).await,
                        relay::Inbound::Event(host, e) => {
                            registry.deliver_event(&host, e);
                        }
                        relay::Inbound::PreflightAnswer(host, op_id, checks) => {
                            registry.deliver_preflight(&host, &op_id, checks);
                        }
                        relay::Inbound::Control(key, ask) => {
                            let (shared, relay) = (shared.clone(), relay.clone());
                            tokio::spawn(async move { answer_control(&shared, &relay, &key, ask).await });
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read what other controllers left for this one"),
        }
        tokio::time::sleep(relay::ROUND).await;
    }
}

/// Applies an operator's control action another controller took for a
/// rollout this one drives (the asker checked the operator's role), and
/// sends the answer back.
async fn answer_control(shared: &Shared, relay: &relay::Relay, key: &str, ask: relay::ControlAsk) {
    let answer = match ask.action.parse::<crate::rollout::control::Action>() {
        Ok(action) => shared
            .engine
            .control(&ask.rollout, action, &ask.who)
            .await
            .map_err(Status::from),
        Err(e) => Err(Status::invalid_argument(e)),
    };
    tracing::info!(rollout = %ask.rollout, by = %ask.who, action = %ask.action, asker = %ask.asker, "control action relayed from another controller");
    if let Err(e) = relay
        .answer_control(&ask.asker, key, &relay::ControlAnswer::of(answer))
        .await
    {
        tracing::warn!(rollout = %ask.rollout, error = %e, "could not answer a relayed control action");
    }
}

/// How often leases are renewed and expired ones looked for. A rollout
/// whose controller died is taken over within `db::LEASE_TTL_MS` plus this.
pub const LEASE_ROUND: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a restarted controller waits for a resumed rollout's hosts to
/// reconnect before it carries on (hosts still away then count as failed).
const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a stopping controller waits for its tasks and connections to
/// end before it exits anyway.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

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

/// The one place the engine's refusals become gRPC statuses.
impl From<Refused> for Status {
    fn from(r: Refused) -> Status {
        match r {
            Refused::Invalid(m) => Status::invalid_argument(m),
            Refused::NotFound(m) => Status::not_found(m),
            Refused::Precondition(m) => Status::failed_precondition(m),
            Refused::Busy(m) => Status::aborted(m),
            Refused::Permission(m) => Status::permission_denied(m),
            Refused::Store(e) => internal(e),
        }
    }
}

pub fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal(e.to_string())
}

/// Runs the controller until `shutdown` resolves.
pub async fn serve(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let db = match &cfg.database {
        crate::config::Database::Sqlite(path) => Db::open(path)?.owned_by(&cfg.name),
        crate::config::Database::Postgres(o) => Db::connect(o, &cfg.name).await?.0,
    };
    tracing::info!(controller = %cfg.name, database = db.engine_name(), "store open");
    let artifacts = Arc::new(Artifacts::open(&cfg.data_dir)?);
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
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let db = Arc::new(db);
    let registry = Arc::new(registry::Registry::default());
    registry.set_db(db.clone());
    registry.set_artifacts(artifacts.clone());
    if matches!(cfg.database, crate::config::Database::Postgres(_)) {
        registry.set_relay(Arc::new(relay::Relay::new(db.clone())));
    }
    let mut engine = Engine::new(
        EngineConfig {
            apps_dir: cfg.apps_dir.clone(),
            host_timeout: cfg.host_timeout,
            prestage_parallel: cfg.prestage_parallel,
            reconnect_grace: RECONNECT_GRACE,
        },
        registry.clone(),
        db.clone(),
        crate::webhooks::Notifier::new(cfg_webhooks, webhook_tls, tasks.clone()),
        stop.clone(),
        tasks.clone(),
    );
    if let Some(url) = &cfg.prometheus_url {
        let tls = if url.starts_with("https:") {
            Some(
                convoy_common::http::tls_roots(cfg.prometheus_ca.as_deref())
                    .map_err(|e| anyhow::anyhow!("prometheus_ca: {e}"))?,
            )
        } else {
            None
        };
        engine = engine.with_metrics(Arc::new(crate::prometheus::Prometheus::new(url, tls)));
    }
    let keys = crate::appconfig::Keyring::open(&cfg.config_key).map_err(|e| anyhow::anyhow!("config_key: {e}"))?;
    let appconfig = Arc::new(crate::appconfig::AppConfig::new(db.clone(), keys));
    let engine = engine
        .with_steps(Arc::new(crate::traffic::Traffic))
        .with_config(appconfig.clone());
    engine
        .load_freezes()
        .await
        .map_err(|e| anyhow::anyhow!("reading the freezes: {e}"))?;
    let shared = Arc::new(Shared {
        cfg,
        db,
        artifacts,
        registry,
        engine: Arc::new(engine),
        appconfig,
        stop,
        tasks,
    });
    if let Some(listen) = shared.cfg.metrics_listen {
        convoy_common::observe::serve_metrics(listen, crate::metrics::get().registry.clone())
            .await
            .with_context(|| format!("metrics_listen: binding {listen}"))?;
    }
    tracing::info!(%addr, "controller listening");
    convoy_common::observe::notify::ready(&format!("listening on {addr}"));
    convoy_common::observe::notify::spawn_watchdog();
    // Rollout leases: renewed, lost ones let go, and rollouts whose
    // controller stopped renewing (or this one, before it restarted)
    // taken over and resumed; the first round right away.
    let (engine, me) = (shared.engine.clone(), shared.clone());
    let started = convoy_common::ops::now_unix_ms();
    let address = addr.to_string();
    shared.spawn(async move {
        loop {
            engine.keep_leases().await;
            // Revocations through another controller end sessions here too.
            match me.db.revocations().await {
                Ok(revoked) => me.registry.kick_revoked(&revoked),
                Err(e) => tracing::warn!(error = %e, "could not read revocations (retrying)"),
            }
            // Freezes set through another controller hold here too.
            if let Err(e) = engine.load_freezes().await {
                tracing::warn!(error = %e, "could not read the freezes (retrying)");
            }
            let sessions = me.registry.session_count() as i64;
            if let Err(e) = me.db.controller_alive(&me.cfg.name, &address, started, sessions).await {
                tracing::warn!(error = %e, "could not say this controller is up (retrying)");
            }
            tokio::time::sleep(LEASE_ROUND).await;
        }
    });
    if let Some(relay) = shared.registry.relay().cloned() {
        shared.spawn(relay_rounds(shared.clone(), relay));
    }
    // One way down: the signal cancels `stop`; the server stops accepting,
    // agent sessions and operator streams end (their streams end on
    // `stop`), rollout tasks are dropped at their next await (their state
    // stays in the store and the next controller resumes them), and then
    // the store is closed. All of it within STOP_GRACE.
    let stop = shared.stop.clone();
    let server = Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(AgentServiceServer::new(agents::AgentApi { shared: shared.clone() }))
        .add_service(EnrollServiceServer::new(enroll::EnrollApi { shared: shared.clone() }))
        .add_service(OperatorServiceServer::new(operator::OperatorApi {
            shared: shared.clone(),
        }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.clone().cancelled_owned());
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => {
            // The server ended by itself: an error.
            stop.cancel();
            r?;
            return Ok(());
        }
        () = shutdown => {}
    }
    tracing::info!("stopping: ending agent sessions, operator streams and rollout tasks");
    convoy_common::observe::notify::stopping("ending sessions and rollout tasks");
    stop.cancel();
    shared.tasks.close();
    let drained = tokio::time::timeout(STOP_GRACE, async {
        let served = (&mut server).await;
        shared.tasks.wait().await;
        served
    })
    .await;
    match drained {
        Ok(r) => r?,
        Err(_) => tracing::warn!("not every connection or task ended within {STOP_GRACE:?}; stopping anyway"),
    }
    shared.db.close().await;
    tracing::info!("stopped");
    Ok(())
}
