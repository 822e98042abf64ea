//! The agent's one long-lived session with the controller: dial out with
//! mTLS, say hello, heartbeat, run commands; redial with backoff when the
//! session ends, forever.

use std::sync::Arc;
use std::time::Duration;

use convoy_common::ops::{ActivateCommand, PreflightCommand, RollbackCommand};
use convoy_common::slots::PromoteCommand;
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
    endpoint_for(cfg, 0)
}

/// The endpoint of the `i`th of the configured controllers.
pub fn endpoint_for(cfg: &Config, i: usize) -> anyhow::Result<Endpoint> {
    let (url, server_name) = &cfg.controllers[i % cfg.controllers.len()];
    let ca = convoy_common::identity::read_cert_pem(&cfg.ca)?;
    let cert = convoy_common::identity::read_cert_pem(&cfg.cert)?;
    let key = convoy_common::identity::read_key_pem(&cfg.key)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(server_name.clone());
    Ok(Endpoint::from_shared(url.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        // Room for an artifact stream to run ahead of the writer: HTTP/2's
        // default 64 KiB window stops the controller every 64 KiB until
        // the agent acknowledges, a wake-up on each side every few chunks.
        .initial_stream_window_size(FETCH_WINDOW)
        .initial_connection_window_size(2 * FETCH_WINDOW))
}

/// Receive window of a stream (the connection's is twice that), in bytes.
const FETCH_WINDOW: u32 = 4 << 20;

/// Which of the configured controllers the agent uses now; a host's
/// first is picked from its name, so a fleet spreads over them.
#[derive(Default)]
pub struct Current(std::sync::atomic::AtomicUsize);

impl Current {
    pub fn starting_for(name: &str, controllers: usize) -> Current {
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Current(std::sync::atomic::AtomicUsize::new(
            (h % controllers.max(1) as u64) as usize,
        ))
    }

    pub fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn next(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs sessions until the process ends, with the controller `current`
/// names; when a session cannot start or ends, with the next one.
pub async fn run(agent: Arc<Agent>, current: Arc<Current>, endpoint: impl Fn(usize) -> anyhow::Result<Endpoint>) {
    let mut backoff = convoy_common::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(15));
    loop {
        let started = tokio::time::Instant::now();
        let result = match endpoint(current.get()) {
            Ok(e) => session(&agent, &e).await,
            Err(e) => Err(e),
        };
        current.next();
        let why = match result {
            Ok(()) => "the controller closed the session".to_string(),
            Err(e) => format!("{e:#}"),
        };
        tracing::warn!(error = %why, "no session with the controller; retrying");
        // Ready either way: the agent runs, and retries on its own.
        convoy_common::observe::notify::ready(&format!("retrying the controller: {why}"));
        agent.reporter.detach();
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        // Jitter spreads a fleet's reconnects after a controller restart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = Duration::from_millis(u64::from((std::process::id() ^ nanos) % 500));
        tokio::time::sleep(backoff.next_delay() + jitter).await;
    }
}

/// The operation a command is for (not pre-flights: they change nothing).
fn command_op(m: &convoy_proto::ControllerMessage) -> Option<&str> {
    match &m.body {
        Some(controller_message::Body::Activate(a)) | Some(controller_message::Body::Stage(a)) => Some(&a.op_id),
        Some(controller_message::Body::Rollback(r)) => Some(&r.op_id),
        Some(controller_message::Body::Promote(p)) => Some(&p.op_id),
        _ => None,
    }
}

fn msg(body: agent_message::Body) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

async fn session(agent: &Arc<Agent>, endpoint: &Endpoint) -> anyhow::Result<()> {
    let channel = convoy_proto::connect(endpoint).await?;
    let mut client = AgentServiceClient::new(channel.clone());
    let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
    let hello = Hello {
        labels: agent.labels.clone().into_iter().collect(),
        apps: agent.store.all_status().iter().map(Into::into).collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        recent_results: agent.store.unreported().iter().map(Into::into).collect(),
        protocol: convoy_common::ops::PROTOCOL,
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

    loop {
        let m = tokio::select! {
            m = inbound.message() => match m? {
                Some(m) => m,
                None => break,
            },
            () = agent.reporter.resync_needed() => {
                anyhow::bail!("a result could not be sent on this session; reconnecting to repeat it in the hello")
            }
        };
        // A command from a controller that lost its rollout to another.
        if let Some(op_id) = command_op(&m) {
            let rollout = convoy_common::ops::rollout_of(op_id);
            if let Err(newer) = agent.epochs.admit(rollout, m.epoch) {
                tracing::warn!(
                    %op_id,
                    epoch = m.epoch,
                    newer,
                    "refused a command from a controller that no longer drives its rollout"
                );
                continue;
            }
        }
        match m.body {
            Some(controller_message::Body::Welcome(w)) => {
                tracing::info!(host = %w.host, "connected to controller");
                convoy_common::observe::notify::ready(&format!("connected to the controller as {}", w.host));
                *agent.host.lock().unwrap() = w.host;
            }
            Some(controller_message::Body::Activate(a)) => match ActivateCommand::try_from(a) {
                Ok(cmd) => start(agent, Work::Activate(channel.clone(), cmd)),
                Err(e) => tracing::error!(error = %e, "refusing malformed activate command"),
            },
            Some(controller_message::Body::Stage(a)) => match ActivateCommand::try_from(a) {
                Ok(cmd) => start(agent, Work::Stage(channel.clone(), cmd)),
                Err(e) => tracing::error!(error = %e, "refusing malformed stage command"),
            },
            Some(controller_message::Body::Rollback(r)) => match RollbackCommand::try_from(r) {
                Ok(cmd) => start(agent, Work::Rollback(channel.clone(), cmd)),
                Err(e) => tracing::error!(error = %e, "refusing malformed rollback command"),
            },
            Some(controller_message::Body::Promote(p)) => match PromoteCommand::try_from(p) {
                Ok(cmd) => start(agent, Work::Promote(cmd)),
                Err(e) => tracing::error!(error = %e, "refusing malformed promote command"),
            },
            Some(controller_message::Body::Preflight(p)) => match PreflightCommand::try_from(p) {
                Ok(cmd) => {
                    let (agent, tx) = (agent.clone(), tx.clone());
                    // Read-only and quick: it runs beside any operation.
                    tokio::spawn(async move {
                        let checks = crate::preflight::run(&agent, &cmd).await;
                        let failed = checks.iter().filter(|c| !c.passed).count();
                        tracing::info!(op_id = %cmd.op_id, app = %cmd.app, failed, "pre-flight checked");
                        let result = convoy_proto::PreflightResult {
                            op_id: cmd.op_id,
                            checks: checks.iter().map(Into::into).collect(),
                        };
                        let _ = tx.send(msg(agent_message::Body::Preflight(result))).await;
                    });
                }
                Err(e) => tracing::error!(error = %e, "refusing malformed pre-flight command"),
            },
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

/// A command from the controller, run under the app's operation lock.
enum Work {
    Activate(Channel, ActivateCommand),
    Stage(Channel, ActivateCommand),
    Rollback(Channel, RollbackCommand),
    Promote(PromoteCommand),
}

impl Work {
    fn ids(&self) -> (&convoy_common::AppName, &str) {
        match self {
            Work::Activate(_, c) | Work::Stage(_, c) => (&c.spec.app, &c.op_id),
            Work::Rollback(_, c) => (&c.app, &c.op_id),
            Work::Promote(c) => (&c.app, &c.op_id),
        }
    }

    /// The release it goes to, for logs.
    fn version(&self) -> String {
        match self {
            Work::Activate(_, c) | Work::Stage(_, c) => c.version.to_string(),
            Work::Rollback(_, c) => c.to.as_ref().map_or("previous".into(), |v| v.to_string()),
            Work::Promote(c) => format!("slot {}", c.slot),
        }
    }
}

fn start(agent: &Arc<Agent>, work: Work) {
    let (app, op_id) = work.ids();
    let (app, op_id) = (app.clone(), op_id.to_owned());
    let span = agent.op_span(&app, &work.version(), &op_id);
    let _in_span = span.enter();
    match agent.ops.try_begin(&app, &op_id) {
        Ok(guard) => {
            let agent = agent.clone();
            // The operation runs on its own: a lost session does not stop it.
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let _guard = guard;
                    let activated = match work {
                        Work::Activate(ch, cmd) => activate::activate(agent, ch, cmd).await,
                        Work::Stage(ch, cmd) => return drop(activate::stage_only(agent, ch, cmd).await),
                        Work::Promote(cmd) => return drop(activate::promote(agent, cmd).await),
                        Work::Rollback(ch, cmd) => match activate::rollback_command(&agent.store, &cmd) {
                            Ok(act) => activate::activate(agent, ch, act).await,
                            Err(report) => {
                                agent.reporter.result(&report);
                                *report
                            }
                        },
                    };
                    crate::metrics::get().activation(activated.outcome);
                },
                span.clone(),
            ));
        }
        Err(Busy::Running(running)) if running == op_id => {
            tracing::info!(%op_id, "operation already running; its result will follow");
        }
        Err(Busy::Running(running)) if running == activate::HOUSEKEEPING => {
            // Stopping a slot whose keep_warm ended is short: the command
            // waits for it rather than being refused.
            let agent = agent.clone();
            tokio::spawn(async move {
                while agent.ops.holder(&app).as_deref() == Some(activate::HOUSEKEEPING) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                start(&agent, work);
            });
        }
        Err(busy) => {
            let version = match &work {
                Work::Activate(_, c) | Work::Stage(_, c) => Some(c.version.clone()),
                // A rollback without a target goes to the previous release.
                Work::Rollback(_, c) => {
                    c.to.clone()
                        .or_else(|| agent.store.status(&app).ok().and_then(|s| s.previous))
                }
                Work::Promote(_) => None,
            };
            let report = activate::refusal(&agent.store, &op_id, &app, version, busy.to_string());
            if !matches!(work, Work::Stage(..) | Work::Promote(..)) {
                crate::metrics::get().activation(report.outcome);
            }
            agent.reporter.result(&report);
        }
    }
}
