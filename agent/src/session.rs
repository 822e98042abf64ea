//! The agent's one long-lived session with the controller: dial out with
//! mTLS, say hello, heartbeat, run commands; redial with backoff when the
//! session ends, forever.

use std::sync::Arc;
use std::time::Duration;

use convoy_common::ops::{ActivateCommand, OpReport, Outcome};
use convoy_proto::agent_service_client::AgentServiceClient;
use convoy_proto::{agent_message, controller_message, AgentMessage, Heartbeat, Hello};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::activate;
use crate::agent::{Agent, Busy};
use crate::config::Config;

const HEARTBEAT: Duration = Duration::from_secs(10);

pub fn endpoint(cfg: &Config) -> anyhow::Result<Endpoint> {
    let ca = convoy_common::identity::read_cert_pem(&cfg.ca)?;
    let cert = convoy_common::identity::read_cert_pem(&cfg.cert)?;
    let key = convoy_common::identity::read_key_pem(&cfg.key)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(cfg.server_name.clone());
    Ok(Endpoint::from_shared(cfg.controller.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Runs sessions until the process ends.
pub async fn run(agent: Arc<Agent>, endpoint: Endpoint) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = tokio::time::Instant::now();
        match session(&agent, &endpoint).await {
            Ok(()) => tracing::warn!("controller closed the session"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "session with the controller failed")
            }
        }
        agent.reporter.detach();
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        // Jitter spreads a fleet's reconnects after a controller restart.
        let jitter = Duration::from_millis(u64::from(std::process::id() % 250));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}

fn msg(body: agent_message::Body) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

async fn session(agent: &Arc<Agent>, endpoint: &Endpoint) -> anyhow::Result<()> {
    let channel = endpoint.connect().await?;
    let mut client = AgentServiceClient::new(channel.clone());
    let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
    let hello = Hello {
        labels: agent.labels.clone().into_iter().collect(),
        apps: agent.store.all_status().iter().map(Into::into).collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        recent_results: agent.store.unreported().iter().map(Into::into).collect(),
    };
    tx.send(msg(agent_message::Body::Hello(hello))).await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    agent.reporter.attach(tx.clone());

    let hb_agent = agent.clone();
    let hb_tx = tx.clone();
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.tick().await;
        loop {
            tick.tick().await;
            let apps = hb_agent.store.all_status().iter().map(Into::into).collect();
            if hb_tx
                .send(msg(agent_message::Body::Heartbeat(Heartbeat { apps })))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let _stop_heartbeat = AbortOnDrop(heartbeat);

    while let Some(m) = inbound.message().await? {
        match m.body {
            Some(controller_message::Body::Welcome(w)) => {
                tracing::info!(host = %w.host, "connected to controller");
            }
            Some(controller_message::Body::Activate(a)) => {
                let op_id = a.op_id.clone();
                match ActivateCommand::try_from(a) {
                    Ok(cmd) => start_activation(agent, channel.clone(), cmd),
                    Err(e) => {
                        tracing::error!(%op_id, error = %e, "refusing malformed activate command")
                    }
                }
            }
            None => tracing::warn!("empty message from controller"),
        }
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn start_activation(agent: &Arc<Agent>, channel: Channel, cmd: ActivateCommand) {
    match agent.ops.try_begin(&cmd.spec.app, &cmd.op_id) {
        Ok(guard) => {
            let agent = agent.clone();
            // The activation runs on its own: a lost session does not stop it.
            tokio::spawn(async move {
                let _guard = guard;
                activate::activate(agent, channel, cmd).await;
            });
        }
        Err(Busy::Running(running)) if running == cmd.op_id => {
            tracing::info!(op_id = %cmd.op_id, "operation already running; its result will follow");
        }
        Err(busy) => {
            let state = agent
                .store
                .status(&cmd.spec.app)
                .unwrap_or_else(|_| crate::agent::empty_status(&cmd.spec.app));
            let report = OpReport {
                op_id: cmd.op_id.clone(),
                app: cmd.spec.app.clone(),
                version: cmd.version.clone(),
                outcome: Outcome::Refused,
                reason: busy.to_string(),
                restore_detail: String::new(),
                state,
            };
            agent.reporter.result(&report);
        }
    }
}
