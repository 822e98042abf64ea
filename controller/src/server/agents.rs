//! The agent-facing gRPC service: sessions and artifact downloads.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use convoy_common::ops::{AppStatus, EventKind, OpReport, Step, StepEvent};
use convoy_common::{Digest, HostName};
use convoy_proto::agent_service_server::AgentService;
use convoy_proto::{
    agent_message, controller_message, AgentMessage, Chunk, ContentPiece, ContentsRequest, ControllerMessage,
    FetchRequest, ManifestRequest, Welcome,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::registry::Delivery;
use super::Shared;

/// A session with no message for this long is considered dead.
const SESSION_IDLE: Duration = Duration::from_secs(45);
const HEARTBEAT_SECS: u32 = 10;

pub struct AgentApi {
    pub shared: Arc<Shared>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn apps_from_wire(host: &HostName, apps: Vec<convoy_proto::AppState>) -> Vec<AppStatus> {
    apps.into_iter()
        .filter_map(|a| match AppStatus::try_from(a) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(%host, error = %e, "ignoring malformed app state");
                None
            }
        })
        .collect()
}

/// A result from `host`: to the rollout waiting for it, or reconciled
/// into its rollout's record when none waits any more.
async fn result_arrived(shared: &Arc<Shared>, host: &HostName, report: OpReport) {
    if let Some(relay) = shared.registry.relay() {
        if let Err(e) = relay.answered(&report.op_id).await {
            tracing::warn!(%host, op = %report.op_id, error = %e, "could not mark a relayed command answered");
        }
        // Nobody here waits for it: the controller driving its rollout may.
        if shared.registry.awaits(host, &report.op_id) == Delivery::NotAwaited {
            match relay.forward_result(host, &report).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%host, error = %e, "could not pass a result to the controller driving its rollout")
                }
            }
        }
    }
    result_here(shared, host, report).await
}

/// Hands a result to the rollout here waiting for it, or reconciles it.
pub(super) async fn result_here(shared: &Arc<Shared>, host: &HostName, report: OpReport) {
    let state = report.state.clone();
    match shared.registry.deliver_result(host, report.clone()) {
        // A result someone waits for is the host's newest word on the
        // app (repeated old ones are not): the next step reads it.
        Delivery::Delivered => shared.registry.update_apps(host, vec![state]),
        Delivery::Refused => {}
        Delivery::NotAwaited => shared.engine.late_result(host, &report).await,
    }
}

/// Test builds only: `FAILPOINTS=fetch-cut=1*return` ends one artifact
/// stream after its first chunk, to prove that agents resume at the offset.
fn cut_stream() -> bool {
    fail::fail_point!("fetch-cut", |_| true);
    false
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = BoxStream<ControllerMessage>;
    type FetchArtifactStream = BoxStream<Chunk>;
    type FetchManifestStream = BoxStream<Chunk>;
    type FetchContentsStream = BoxStream<ContentPiece>;

    async fn fetch_manifest(
        &self,
        req: Request<ManifestRequest>,
    ) -> Result<Response<Self::FetchManifestStream>, Status> {
        let id = super::enroll::agent_peer(&self.shared, &req).await?;
        let artifact =
            Digest::parse(&req.into_inner().artifact).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (bytes, digest) = self.manifest_of(&artifact).await?;
        let packed = self
            .shared
            .artifacts
            .manifest_packed(&digest, &bytes)
            .await
            .map_err(super::internal)?;
        let total = packed.len() as u64;
        self.shared.registry.count_sent(&id.name, total);
        let chunks: Vec<Result<Chunk, Status>> = packed
            .chunks(convoy_proto::CHUNK_SIZE)
            .enumerate()
            .map(|(i, c)| {
                Ok(Chunk {
                    offset: (i * convoy_proto::CHUNK_SIZE) as u64,
                    data: c.to_vec().into(),
                    total_size: total,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn fetch_contents(
        &self,
        req: Request<ContentsRequest>,
    ) -> Result<Response<Self::FetchContentsStream>, Status> {
        let id = super::enroll::agent_peer(&self.shared, &req).await?;
        let r = req.into_inner();
        let artifact = Digest::parse(&r.artifact).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.sha256.len() > MAX_CONTENTS {
            return Err(Status::invalid_argument(format!(
                "{} contents asked for at once; at most {MAX_CONTENTS}",
                r.sha256.len()
            )));
        }
        let (bytes, _) = self.manifest_of(&artifact).await?;
        let manifest = convoy_common::manifest::Manifest::decode(&bytes, u64::MAX).map_err(super::internal)?;
        let held: std::collections::HashSet<Digest> = manifest.contents().into_iter().map(|(d, _)| d).collect();
        let mut wanted = Vec::with_capacity(r.sha256.len());
        for (i, raw) in r.sha256.iter().enumerate() {
            let d = <[u8; 32]>::try_from(&raw[..])
                .map(Digest::from_bytes)
                .ok()
                .filter(|d| held.contains(d))
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "sha256[{i}] ({}) is not a content of artifact {artifact}",
                        hex::encode(raw)
                    ))
                })?;
            wanted.push(self.shared.artifacts.content_path(&d));
        }
        tracing::info!(host = %id.name, %artifact, contents = wanted.len(), "streaming contents");
        // Read on a thread of its own, a piece at a time: the client's
        // flow control paces the reads.
        let (tx, rx) = mpsc::channel::<Result<ContentPiece, Status>>(4);
        let (shared, host) = (self.shared.clone(), id.name.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = stream_contents(&wanted, &tx, |n| shared.registry.count_sent(&host, n)) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn session(&self, req: Request<Streaming<AgentMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let id = super::enroll::agent_peer(&self.shared, &req).await?;
        let host = id.name;
        // When the certificate became valid: a revocation through any
        // controller ends sessions of certificates from before it.
        let not_before_ms = req
            .peer_certs()
            .and_then(|c| c.first().map(|d| d.to_vec()))
            .and_then(|der| convoy_common::identity::validity_secs(&der).ok())
            .map_or(0, |(nb, _)| nb * 1000);
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??
            .ok_or_else(|| Status::invalid_argument("session ended before Hello"))?;
        let Some(agent_message::Body::Hello(hello)) = first.body else {
            return Err(Status::invalid_argument("the first message of a session must be Hello"));
        };
        let mut labels: BTreeMap<String, String> = hello.labels.into_iter().collect();
        // Labels a host enrolled with are the controller's, not the host's.
        for (k, v) in self
            .shared
            .db
            .host_labels(host.as_str())
            .await
            .map_err(super::internal)?
        {
            if labels.get(&k).is_some_and(|own| *own != v) {
                tracing::warn!(%host, label = %k, claimed = %labels[&k], enrolled = %v, "ignoring a label the host's config changes");
            }
            labels.insert(k, v);
        }
        let apps = apps_from_wire(&host, hello.apps);
        let (tx, rx) = mpsc::channel(64);
        let registry = self.shared.registry.clone();
        let session = registry.connect(&host, labels.clone(), apps, hello.protocol, tx.clone());
        registry.set_not_before(&host, session, not_before_ms);
        tracing::info!(%host, ?labels, agent_version = %hello.agent_version, protocol = hello.protocol, "agent connected");
        let welcome = ControllerMessage {
            body: Some(controller_message::Body::Welcome(Welcome {
                host: host.to_string(),
                heartbeat_secs: HEARTBEAT_SECS,
            })),
            epoch: 0,
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::unavailable("session closed"))?;
        let mut answered = Vec::new();
        for r in hello.recent_results {
            if let Ok(report) = OpReport::try_from(r) {
                answered.push(report.op_id.clone());
                result_arrived(&self.shared, &host, report).await;
            }
        }
        for cmd in registry.pending_for(&host, &answered) {
            tracing::info!(%host, "re-sending a command the host has not answered");
            tx.send(Ok(cmd))
                .await
                .map_err(|_| Status::unavailable("session closed"))?;
        }

        let shared = self.shared.clone();
        let stop = self.shared.stop.clone();
        self.shared.tasks.spawn(async move {
            let mut steps = StepTimer::default();
            loop {
                let next = tokio::select! {
                    m = tokio::time::timeout(SESSION_IDLE, inbound.message()) => m,
                    () = stop.cancelled() => break,
                };
                let msg = match next {
                    Err(_) => {
                        tracing::warn!(%host, "no heartbeat for {SESSION_IDLE:?}; dropping session");
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%host, error = %e, "session ended");
                        break;
                    }
                    Ok(Ok(None)) => break,
                    Ok(Ok(Some(m))) => m,
                };
                match msg.body {
                    Some(agent_message::Body::Heartbeat(hb)) => {
                        registry.update_apps(&host, apps_from_wire(&host, hb.apps))
                    }
                    Some(agent_message::Body::Event(e)) => match StepEvent::try_from(e) {
                        Ok(ev) => {
                            steps.observe(&ev);
                            if !registry.deliver_event(&host, ev.clone()) {
                                if let Some(relay) = registry.relay() {
                                    if let Err(e) = relay.forward_event(&host, &ev).await {
                                        tracing::debug!(%host, error = %e, "event not relayed");
                                    }
                                }
                            }
                        }
                        Err(err) => tracing::warn!(%host, error = %err, "malformed event"),
                    },
                    Some(agent_message::Body::Result(r)) => match OpReport::try_from(r) {
                        Ok(rep) => {
                            // A live result is the newest state of its app.
                            registry.update_apps(&host, vec![rep.state.clone()]);
                            result_arrived(&shared, &host, rep).await
                        }
                        Err(err) => tracing::warn!(%host, error = %err, "malformed result"),
                    },
                    Some(agent_message::Body::Preflight(p)) => {
                        let checks: Vec<_> = p.checks.into_iter().map(Into::into).collect();
                        if !registry.deliver_preflight(&host, &p.op_id, checks.clone()) {
                            match registry.relay() {
                                Some(relay) => {
                                    if let Err(e) = relay.forward_preflight(&host, &p.op_id, &checks).await {
                                        tracing::warn!(%host, error = %e, "pre-flight answer not relayed");
                                    }
                                }
                                None => tracing::info!(%host, op = %p.op_id, "pre-flight answer nobody waits for"),
                            }
                        }
                    }
                    Some(agent_message::Body::Hello(_)) => {
                        tracing::warn!(%host, "second Hello ignored")
                    }
                    None => {}
                }
            }
            registry.disconnect(&host, session);
            tracing::info!(%host, "agent disconnected");
        });
        // The command stream ends when the controller stops, though the
        // registry still holds its sender.
        let commands = ReceiverStream::new(rx).take_until(self.shared.stop.clone().cancelled_owned());
        Ok(Response::new(Box::pin(commands)))
    }

    async fn renew(&self, req: Request<convoy_proto::CsrRequest>) -> Result<Response<convoy_proto::CertReply>, Status> {
        super::enroll::renew(&self.shared, req).await
    }

    async fn fetch_artifact(&self, req: Request<FetchRequest>) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let id = super::enroll::agent_peer(&self.shared, &req).await?;
        let r = req.into_inner();
        let digest = Digest::parse(&r.digest).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let path = self.local_artifact(&digest).await?;
        let file = std::fs::File::open(&path).map_err(|e| Status::not_found(format!("artifact {digest}: {e}")))?;
        let total = file.metadata().map_err(super::internal)?.len();
        if r.offset > total {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end ({total} bytes)",
                r.offset
            )));
        }
        tracing::info!(host = %id.name, %digest, offset = r.offset, total, "streaming artifact");
        // Pulled lazily: the client's flow-control window paces disk reads.
        // Each chunk is one positioned read on the blocking pool, straight
        // into the buffer the message carries.
        let file = std::sync::Arc::new(file);
        let start = r.offset;
        let (shared, host) = (self.shared.clone(), id.name.clone());
        let stream = futures::stream::unfold((file, r.offset), move |(file, offset)| {
            let (shared, host) = (shared.clone(), host.clone());
            async move {
                if offset >= total {
                    return None;
                }
                if offset > start && cut_stream() {
                    return Some((
                        Err(Status::unavailable("stream cut by the fetch-cut failpoint")),
                        (file, total),
                    ));
                }
                let want = (total - offset).min(convoy_proto::CHUNK_SIZE as u64) as usize;
                let reader = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; want];
                    reader.read_exact_at(&mut buf, offset).map(|()| buf)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match read {
                    Ok(buf) => {
                        // Counted as read for the stream; HTTP/2 flow control
                        // keeps at most a window of it unsent.
                        shared.registry.count_sent(&host, want as u64);
                        Some((
                            Ok(Chunk {
                                offset,
                                data: buf.into(),
                                total_size: total,
                            }),
                            (file, offset + want as u64),
                        ))
                    }
                    Err(e) => Some((Err(Status::internal(format!("reading artifact: {e}"))), (file, total))),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Contents one request may ask for.
const MAX_CONTENTS: usize = 10_000;

/// Sends each content file as pieces of its index, a piece read ahead so
/// the last one says it ends; counts each piece sent. Stops quietly when
/// the host hangs up; a read error is returned for the caller to send.
fn stream_contents(
    paths: &[std::path::PathBuf],
    tx: &mpsc::Sender<Result<ContentPiece, Status>>,
    sent: impl Fn(u64),
) -> Result<(), Status> {
    use std::io::Read;
    for (index, path) in paths.iter().enumerate() {
        if index > 0 && cut_stream() {
            return Err(Status::unavailable("stream cut by the fetch-cut failpoint"));
        }
        let failed = |e: std::io::Error| Status::internal(format!("content {}: {e}", path.display()));
        let mut f = std::fs::File::open(path).map_err(failed)?;
        let mut buf = vec![0u8; convoy_proto::CHUNK_SIZE];
        let n = f.read(&mut buf).map_err(failed)?;
        let mut next = buf[..n].to_vec();
        loop {
            let n = f.read(&mut buf).map_err(failed)?;
            let data = std::mem::replace(&mut next, buf[..n].to_vec());
            let len = data.len() as u64;
            let piece = ContentPiece {
                index: index as u32,
                data: data.into(),
                end: n == 0,
            };
            if tx.blocking_send(Ok(piece)).is_err() {
                return Ok(());
            }
            sent(len);
            if n == 0 {
                break;
            }
        }
    }
    Ok(())
}

impl AgentApi {
    /// The path of a known artifact on this controller, copied from the
    /// shared store first when it was pushed through another controller.
    async fn local_artifact(&self, digest: &Digest) -> Result<std::path::PathBuf, Status> {
        if !self.shared.db.digest_known(digest).await.map_err(super::internal)? {
            return Err(Status::not_found(format!("no artifact with sha256 {digest}")));
        }
        let path = self.shared.artifacts.path(digest);
        if !path.exists() && self.shared.registry.relay().is_some() {
            self.shared
                .artifacts
                .fetch_shared(&self.shared.db, digest)
                .await
                .map_err(super::internal)?;
        }
        Ok(path)
    }

    /// A known artifact's manifest (bytes, sha256).
    async fn manifest_of(&self, artifact: &Digest) -> Result<(Vec<u8>, Digest), Status> {
        self.local_artifact(artifact).await?;
        self.shared
            .artifacts
            .manifest(artifact)
            .await
            .map_err(super::internal)?
            .ok_or_else(|| Status::not_found(format!("no artifact with sha256 {artifact} on this controller")))
    }
}

/// Times a host's activation steps from its started and ended events, for
/// the `convoy_step_duration_seconds` histogram.
#[derive(Default)]
struct StepTimer {
    /// (operation, step) → when the agent said it started.
    started: HashMap<(String, Step), i64>,
}

impl StepTimer {
    fn observe(&mut self, ev: &StepEvent) {
        let key = (ev.op_id.clone(), ev.step);
        match ev.kind {
            EventKind::Started => {
                // A step started and never ended (an agent killed mid-step)
                // must not pile up.
                if self.started.len() > 1024 {
                    self.started.clear();
                }
                self.started.insert(key, ev.at_unix_ms);
            }
            EventKind::Succeeded | EventKind::Failed => {
                if let Some(at) = self.started.remove(&key) {
                    let ms = u64::try_from(ev.at_unix_ms - at).unwrap_or(0);
                    crate::metrics::get().step(
                        ev.step,
                        ev.kind == EventKind::Succeeded,
                        std::time::Duration::from_millis(ms),
                    );
                }
            }
            EventKind::Info => {}
        }
    }
}
