//! Operator commands: clients of the controller's operator API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use convoy_common::ops::AppStatus;
use convoy_proto::operator_service_client::OperatorServiceClient;
use convoy_proto::{
    push_request, rollout_event, ControlRequest, DeployRequest, HistoryRequest, PushHeader, PushRequest,
    RollbackRequest, StatusRequest, WatchRequest,
};
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Exit codes, documented in README.md.
pub mod exit {
    pub const OK: u8 = 0;
    /// The rollout failed; the failing host was restored to its previous release.
    pub const FAILED: u8 = 1;
    /// Bad usage: unknown command, bad arguments (clap uses 2 too).
    pub const USAGE: u8 = 2;
    /// The rollout failed and restoring the failing host failed too.
    pub const RESTORE_FAILED: u8 = 3;
    /// Refused before anything changed (unknown release, no hosts, busy, bad spec).
    pub const REFUSED: u8 = 4;
    /// The controller could not be reached.
    pub const UNREACHABLE: u8 = 5;
    /// `convoy serve` stopped on an error after it started (the log says
    /// which); its config was fine (that is 2).
    pub const SERVE_FAILED: u8 = 6;
}

#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// Controller URL.
    #[arg(long, env = "CONVOY_CONTROLLER", global = true)]
    pub controller: Option<String>,
    /// The fleet CA certificate.
    #[arg(long, env = "CONVOY_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Your operator certificate.
    #[arg(long, env = "CONVOY_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Your operator key (mode 0600).
    #[arg(long, env = "CONVOY_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Name in the controller's certificate, when it differs from the URL's host.
    #[arg(long, env = "CONVOY_SERVER_NAME", global = true)]
    pub server_name: Option<String>,
}

/// A CLI failure with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        // A transport failure carries its cause (e.g. the controller's TLS
        // refusing our certificate) in the error chain, not the message.
        if std::error::Error::source(&s).is_some() {
            let chain = error_chain(&s);
            let tls_refusal = chain.contains("alert") || chain.contains("certificate");
            let code = if tls_refusal { exit::REFUSED } else { exit::UNREACHABLE };
            let what = if tls_refusal {
                "the controller refused the connection (is your certificate issued by the fleet CA?)"
            } else {
                "lost the connection to the controller (a certificate it does not trust ends this way too)"
            };
            return Failure::new(code, format!("{what}: {chain}"));
        }
        let code = match s.code() {
            Code::Unavailable => exit::UNREACHABLE,
            Code::InvalidArgument => exit::USAGE,
            Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
            | Code::Aborted
            | Code::PermissionDenied
            | Code::Unauthenticated => exit::REFUSED,
            _ => exit::FAILED,
        };
        Failure::new(code, s.message().to_owned())
    }
}

pub fn report(r: Result<(), Failure>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => {
            eprintln!("convoy: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

impl Conn {
    pub async fn connect(&self) -> Result<OperatorServiceClient<Channel>, Failure> {
        let need = |v: &Option<PathBuf>, flag: &str, env: &str| {
            v.clone()
                .ok_or_else(|| Failure::new(exit::USAGE, format!("{flag} (or {env}) is required")))
        };
        let url = self
            .controller
            .clone()
            .ok_or_else(|| Failure::new(exit::USAGE, "--controller (or CONVOY_CONTROLLER) is required"))?;
        let ca = need(&self.ca, "--ca", "CONVOY_CA")?;
        let cert = need(&self.cert, "--cert", "CONVOY_CERT")?;
        let key = need(&self.key, "--key", "CONVOY_KEY")?;
        let usage = |e: convoy_common::identity::PemError| Failure::new(exit::USAGE, e.to_string());
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                convoy_common::identity::read_cert_pem(&ca).map_err(usage)?,
            ))
            .identity(Identity::from_pem(
                convoy_common::identity::read_cert_pem(&cert).map_err(usage)?,
                convoy_common::identity::read_key_pem(&key).map_err(usage)?,
            ));
        if let Some(n) = &self.server_name {
            tls = tls.domain_name(n.clone());
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Failure::new(exit::USAGE, format!("--controller {url:?}: {e}")))?
            .tls_config(tls)
            .map_err(|e| Failure::new(exit::USAGE, format!("TLS: {e}")))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| {
            Failure::new(
                exit::UNREACHABLE,
                format!("cannot reach the controller at {url}: {}", error_chain(&e)),
            )
        })?;
        Ok(OperatorServiceClient::new(channel).max_decoding_message_size(64 << 20))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub async fn push(
    conn: &Conn,
    app: String,
    version: String,
    file: PathBuf,
    sign: Option<PathBuf>,
) -> Result<(), Failure> {
    let app_name = convoy_common::AppName::new(app.clone()).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let ver = convoy_common::Version::new(version.clone()).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let key = sign
        .map(|k| convoy_common::signing::PrivateKey::load(&k))
        .transpose()
        .map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    // Streamed from the file, never held in memory whole: one pass to
    // hash it when it is signed, one to send it.
    let unreadable = |e: std::io::Error| Failure::new(exit::USAGE, format!("{}: {e}", file.display()));
    let mut f = std::fs::File::open(&file).map_err(unreadable)?;
    let size = f.metadata().map_err(unreadable)?.len();
    let mut magic = [0u8; 2];
    if std::io::Read::read_exact(&mut f, &mut magic).is_err() || magic != [0x1f, 0x8b] {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{}: not a gzip file; an artifact is a .tar.gz of the release tree",
                file.display()
            ),
        ));
    }
    std::io::Seek::rewind(&mut f).map_err(unreadable)?;
    let signature = match key {
        Some(k) => {
            let digest = convoy_common::Digest::of_reader(&mut f).map_err(unreadable)?;
            std::io::Seek::rewind(&mut f).map_err(unreadable)?;
            k.sign(&app_name, &ver, &digest)
        }
        None => Vec::new(),
    };
    let signed = !signature.is_empty();
    let mut client = conn.connect().await?;
    let header = PushRequest {
        body: Some(push_request::Body::Header(PushHeader {
            app: app.clone(),
            version: version.clone(),
            size,
            signature,
        })),
    };
    // A read error ends the stream early (the controller then refuses the
    // short upload) and is reported here.
    let read_error = std::sync::Arc::new(std::sync::Mutex::new(None::<std::io::Error>));
    let seen_error = read_error.clone();
    let data = tokio_stream::StreamExt::map_while(
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(f), convoy_proto::CHUNK_SIZE),
        move |chunk: std::io::Result<bytes::Bytes>| match chunk {
            Ok(bytes) => Some(PushRequest {
                body: Some(push_request::Body::Data(bytes.to_vec())),
            }),
            Err(e) => {
                *seen_error.lock().unwrap() = Some(e);
                None
            }
        },
    );
    let chunks = tokio_stream::StreamExt::chain(tokio_stream::iter([header]), data);
    let pushed = client.push_release(chunks).await;
    if let Some(e) = read_error.lock().unwrap().take() {
        return Err(unreadable(e));
    }
    let reply = pushed?.into_inner();
    if reply.already_present {
        println!(
            "{app} {version} was already pushed (sha256 {}, {} bytes)",
            reply.digest, reply.size
        );
    } else {
        let how = if signed { ", signed" } else { "" };
        println!(
            "pushed {app} {version}: sha256 {}, {} bytes{how}",
            reply.digest, reply.size
        );
    }
    Ok(())
}

/// `convoy deploy` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DeployArgs {
    pub app: String,
    #[arg(value_name = "VERSION")]
    pub release: String,
    #[arg(long)]
    pub env: String,
    /// rolling, canary or all-at-once.
    #[arg(long, default_value = "rolling")]
    pub strategy: String,
    /// Rolling: hosts per batch, a count or a percentage (default 1).
    #[arg(long)]
    pub batch_size: Option<String>,
    /// Canary: cumulative stages, e.g. 1,10%,50%,100%.
    #[arg(long)]
    pub stages: Option<String>,
    /// Canary: wait after each stage but the last, e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub bake: Option<std::time::Duration>,
    /// Failed hosts tolerated before the rollout halts: a count or a percentage (default 0).
    #[arg(long)]
    pub failure_budget: Option<String>,
    /// On halt, leave the hosts this rollout moved where they are.
    #[arg(long)]
    pub no_rollback: bool,
    /// Skip the promotion rule (the version completed in the environment before).
    #[arg(long, requires = "reason")]
    pub hotfix: bool,
    /// Why the hotfix skips promotion; kept in the audit trail.
    #[arg(long)]
    pub reason: Option<String>,
    /// These hosts first, in this order (comma-separated), e.g. a canary group.
    #[arg(long, value_delimiter = ',')]
    pub order: Vec<String>,
    /// Only hosts with these labels, e.g. --select zone=eu1 (repeatable).
    #[arg(long, value_parser = parse_label)]
    pub select: Vec<(String, String)>,
    /// Hosts with these labels go first, as a stage of their own, e.g.
    /// --canary-group role=canary (repeatable; a host must match all).
    #[arg(long, value_parser = parse_label)]
    pub canary_group: Vec<(String, String)>,
    /// Canary: after each stage but the last (and its bake), go on by
    /// itself (auto) or wait for `convoy promote ROLLOUT` (manual).
    #[arg(long, default_value = "auto", value_parser = ["auto", "manual"])]
    pub promote: String,
    /// A host that drops away mid-rollout: count it failed once it has been
    /// away for --vanish-deadline (fail), or wait for it to come back (wait).
    #[arg(long, default_value = "fail", value_parser = ["fail", "wait"])]
    pub on_vanish: String,
    /// How long a host may be away before it counts as failed (policy fail).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub vanish_deadline: Option<std::time::Duration>,
}

pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub async fn deploy(conn: &Conn, a: DeployArgs) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let stream = client
        .deploy(DeployRequest {
            app: a.app.clone(),
            version: a.release.clone(),
            environment: a.env.clone(),
            strategy: a.strategy.clone(),
            batch_size: a.batch_size.clone().unwrap_or_default(),
            stages: a.stages.clone().unwrap_or_default(),
            bake_ms: a.bake.map(|d| d.as_millis() as u64).unwrap_or(0),
            failure_budget: a.failure_budget.clone().unwrap_or_default(),
            no_rollback: a.no_rollback,
            hotfix: a.hotfix,
            reason: a.reason.clone().unwrap_or_default(),
            order: a.order.clone(),
            select: a.select.iter().cloned().collect(),
            canary_group: a.canary_group.iter().cloned().collect(),
            manual_promote: a.promote == "manual",
            wait_for_vanished: a.on_vanish == "wait",
            vanish_deadline_ms: a.vanish_deadline.map(|d| d.as_millis() as u64).unwrap_or(0),
        })
        .await?
        .into_inner();
    follow(stream, &format!("{} {} to {}", a.app, a.release, a.env)).await
}

pub async fn rollback(
    conn: &Conn,
    app: String,
    env: String,
    to: Option<String>,
    hosts: Vec<String>,
) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let target = to.clone().unwrap_or_else(|| "each host's previous release".into());
    let stream = client
        .rollback(RollbackRequest {
            app: app.clone(),
            environment: env.clone(),
            to_version: to.unwrap_or_default(),
            hosts,
        })
        .await?
        .into_inner();
    follow(stream, &format!("rollback of {app} in {env} to {target}")).await
}

/// `convoy pause|resume|abort ROLLOUT`.
pub async fn control(conn: &Conn, rollout: String, action: &str) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .control(ControlRequest {
            rollout_id: rollout.clone(),
            action: action.to_owned(),
        })
        .await?
        .into_inner();
    println!("rollout {rollout}: {}", reply.state);
    Ok(())
}

/// `convoy watch ROLLOUT`: follows a running rollout; exits as `deploy` would.
pub async fn watch(conn: &Conn, rollout: String) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let stream = client
        .watch(WatchRequest {
            rollout_id: rollout.clone(),
        })
        .await?
        .into_inner();
    println!("watching rollout {rollout}");
    follow(stream, &format!("rollout {rollout}")).await
}

/// Prints a rollout's events as they come and maps its end to an exit code.
async fn follow(mut stream: tonic::Streaming<convoy_proto::RolloutEvent>, title: &str) -> Result<(), Failure> {
    let mut out = crate::progress::Progress::for_stdout();
    let r = show(&mut stream, title, &mut out).await;
    out.finish();
    r
}

async fn show(
    stream: &mut tonic::Streaming<convoy_proto::RolloutEvent>,
    title: &str,
    out: &mut crate::progress::Progress,
) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let mut hosts = 0;
    while let Some(ev) = stream.message().await? {
        match ev.body {
            Some(rollout_event::Body::Plan(p)) => {
                hosts = p.hosts.len();
                out.line(&format!(
                    "rollout {}: {title}, {} host(s), {}",
                    ev.rollout_id, hosts, p.strategy
                ));
                for (i, b) in p.batches.iter().enumerate() {
                    let bake = if b.bake_ms > 0 {
                        format!(
                            ", then bake {}",
                            humantime::format_duration(std::time::Duration::from_millis(b.bake_ms))
                        )
                    } else {
                        String::new()
                    };
                    out.line(&format!("  batch {}: {}{bake}", i + 1, b.hosts.join(", ")));
                }
                if p.failure_budget > 0 {
                    out.line(&format!("  failure budget: {} host(s)", p.failure_budget));
                }
                if !p.digest.is_empty() {
                    out.line(&format!("  artifact sha256 {}", p.digest));
                }
                if !p.skipped_hosts.is_empty() {
                    out.line(&format!("  skipped (not connected): {}", p.skipped_hosts.join(", ")));
                }
            }
            Some(rollout_event::Body::Note(n)) => out.note(&n.message),
            Some(rollout_event::Body::HostEvent(h)) => {
                if let Some(e) = h.event {
                    let kind = convoy_proto::EventKind::try_from(e.kind)
                        .map(|k| k.as_str_name())
                        .unwrap_or("?");
                    let kind = kind.trim_start_matches("EVENT_KIND_").to_lowercase();
                    out.host(&h.host, &e.step, &kind, &e.message);
                }
            }
            Some(rollout_event::Body::HostResult(h)) => {
                if let Some(r) = h.result {
                    let outcome = convoy_proto::Outcome::try_from(r.outcome)
                        .map(|o| o.as_str_name())
                        .unwrap_or("?");
                    out.result(&h.host, &outcome.trim_start_matches("OUTCOME_").to_lowercase());
                }
            }
            Some(rollout_event::Body::Done(d)) => {
                let secs = started.elapsed().as_secs_f64();
                if d.succeeded {
                    let mut msg = format!("rollout {} succeeded: {hosts} host(s) in {secs:.1}s", ev.rollout_id);
                    if !d.failed_hosts.is_empty() {
                        msg.push_str(&format!(
                            "; within the failure budget, failed: {}",
                            d.failed_hosts.join(", ")
                        ));
                    }
                    out.line(&msg);
                    return if d.rollback_failed {
                        Err(Failure::new(
                            exit::RESTORE_FAILED,
                            "a host could not be restored; it needs attention",
                        ))
                    } else {
                        Ok(())
                    };
                }
                let mut msg = format!("rollout {} failed on {}: {}", ev.rollout_id, d.failed_host, d.reason);
                if d.failed_hosts.len() > 1 {
                    msg.push_str(&format!("\nfailed hosts: {}", d.failed_hosts.join(", ")));
                }
                if !d.rolled_back_hosts.is_empty() {
                    msg.push_str(&format!("\nrolled back: {}", d.rolled_back_hosts.join(", ")));
                }
                if !d.untouched_hosts.is_empty() {
                    msg.push_str(&format!("\nhosts not touched: {}", d.untouched_hosts.join(", ")));
                }
                let code = if d.rollback_failed {
                    exit::RESTORE_FAILED
                } else {
                    exit::FAILED
                };
                return Err(Failure::new(code, msg));
            }
            None => {}
        }
    }
    Err(Failure::new(
        exit::UNREACHABLE,
        "the controller closed the stream before the rollout finished; the rollout goes on, check `convoy status`",
    ))
}

/// The `--output json` shape of `convoy history`.
#[derive(Serialize)]
struct HistoryJson {
    rollouts: Vec<RolloutJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hosts: Vec<HostRecordJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    events: Vec<EventJson>,
}

#[derive(Serialize)]
struct RolloutJson {
    id: String,
    app: String,
    version: String,
    environment: String,
    kind: String,
    strategy: String,
    operator: String,
    state: String,
    reason: String,
    hotfix_reason: Option<String>,
    approved_by: Option<String>,
    started_at_unix_ms: i64,
    finished_at_unix_ms: Option<i64>,
}

#[derive(Serialize)]
struct HostRecordJson {
    host: String,
    op_id: String,
    outcome: String,
    reason: String,
    restore_detail: String,
    finished_at_unix_ms: i64,
}

#[derive(Serialize)]
struct EventJson {
    host: String,
    step: String,
    kind: String,
    message: String,
    at_unix_ms: i64,
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub async fn history(
    conn: &Conn,
    app: Option<String>,
    rollout: Option<String>,
    limit: u32,
    json: bool,
) -> Result<(), Failure> {
    if app.is_none() && rollout.is_none() {
        return Err(Failure::new(exit::USAGE, "name an APP, or a rollout with --rollout ID"));
    }
    let mut client = conn.connect().await?;
    let reply = client
        .history(HistoryRequest {
            app: app.unwrap_or_default(),
            rollout_id: rollout.unwrap_or_default(),
            limit,
        })
        .await?
        .into_inner();
    let out = HistoryJson {
        rollouts: reply
            .rollouts
            .into_iter()
            .map(|r| RolloutJson {
                id: r.id,
                app: r.app,
                version: r.version,
                environment: r.environment,
                kind: r.kind,
                strategy: r.strategy,
                operator: r.operator,
                state: r.state,
                reason: r.reason,
                hotfix_reason: Some(r.hotfix_reason).filter(|h| !h.is_empty()),
                approved_by: Some(r.approved_by).filter(|a| !a.is_empty()),
                started_at_unix_ms: r.started_at_unix_ms,
                finished_at_unix_ms: Some(r.finished_at_unix_ms).filter(|t| *t > 0),
            })
            .collect(),
        hosts: reply
            .hosts
            .into_iter()
            .map(|h| HostRecordJson {
                host: h.host,
                op_id: h.op_id,
                outcome: h.outcome,
                reason: h.reason,
                restore_detail: h.restore_detail,
                finished_at_unix_ms: h.finished_at_unix_ms,
            })
            .collect(),
        events: reply
            .events
            .into_iter()
            .map(|e| EventJson {
                host: e.host,
                step: e.step,
                kind: e.kind,
                message: e.message,
                at_unix_ms: e.at_unix_ms,
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        return Ok(());
    }
    println!(
        "{:<13} {:<21} {:<9} {:<10} {:<12} {:<12} {:<20} REASON",
        "ROLLOUT", "STARTED", "KIND", "VERSION", "ENV", "STATE", "OPERATOR"
    );
    for r in &out.rollouts {
        let mut reason = r.reason.clone();
        if let Some(a) = &r.approved_by {
            reason = format!(
                "approved by {a}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!("; {reason}")
                }
            );
        }
        if let Some(h) = &r.hotfix_reason {
            reason = format!(
                "hotfix: {h}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!("; {reason}")
                }
            );
        }
        println!(
            "{:<13} {:<21} {:<9} {:<10} {:<12} {:<12} {:<20} {}",
            r.id,
            when(r.started_at_unix_ms),
            r.kind,
            r.version,
            r.environment,
            r.state,
            r.operator,
            reason
        );
    }
    if !out.hosts.is_empty() {
        println!("\n{:<16} {:<24} REASON", "HOST", "OUTCOME");
        for h in &out.hosts {
            println!("{:<16} {:<24} {} {}", h.host, h.outcome, h.reason, h.restore_detail);
        }
    }
    if !out.events.is_empty() {
        println!();
        for e in &out.events {
            println!(
                "{} [{}] {:<8} {:<9} {}",
                when(e.at_unix_ms),
                e.host,
                e.step,
                e.kind,
                e.message
            );
        }
    }
    Ok(())
}

/// The `--output json` shape of `convoy status`: stable, documented in README.md.
#[derive(Serialize)]
struct StatusJson {
    app: String,
    hosts: Vec<HostJson>,
}

#[derive(Serialize)]
struct HostJson {
    host: String,
    connected: bool,
    labels: std::collections::BTreeMap<String, String>,
    last_seen_unix_ms: i64,
    /// null when the app was never installed on this host.
    app: Option<AppStatus>,
}

pub async fn status(conn: &Conn, app: String, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client.status(StatusRequest { app: app.clone() }).await?.into_inner();
    let hosts: Vec<HostJson> = reply
        .hosts
        .into_iter()
        .map(|h| HostJson {
            host: h.host,
            connected: h.connected,
            labels: h.labels.into_iter().collect(),
            last_seen_unix_ms: h.last_seen_unix_ms,
            app: h.app.and_then(|a| AppStatus::try_from(a).ok()),
        })
        .collect();
    if json {
        let out = StatusJson { app, hosts };
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:<12} {:<12} {:<12} {:<10} REASON",
        "HOST", "CONNECTED", "ENV", "CURRENT", "PREVIOUS", "HEALTH"
    );
    for h in hosts {
        let v = |v: Option<&convoy_common::Version>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let (cur, prev, health, reason) = match &h.app {
            Some(a) => (
                v(a.current.as_ref()),
                v(a.previous.as_ref()),
                format!("{:?}", a.health).to_lowercase(),
                a.health_reason.clone(),
            ),
            None => ("-".into(), "-".into(), "-".into(), String::new()),
        };
        println!(
            "{:<16} {:<12} {:<12} {:<12} {:<12} {:<10} {}",
            h.host,
            if h.connected { "yes" } else { "no" },
            h.labels.get("env").map(String::as_str).unwrap_or("-"),
            cur,
            prev,
            health,
            reason
        );
    }
    Ok(())
}

/// `convoy keys generate`: an ed25519 key pair for signing releases.
pub fn keys_generate(dir: &std::path::Path, name: &str) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    convoy_common::HostName::new(name).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let key = convoy_common::signing::PrivateKey::generate().map_err(|e| Failure::new(exit::FAILED, e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", dir.display())))?;
    let (priv_path, pub_path) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    let write = |path: &std::path::Path, text: &str, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| Failure::new(exit::REFUSED, format!("{}: {e}", path.display())))
    };
    write(&priv_path, &key.to_file_text(), 0o600)?;
    write(&pub_path, &format!("{}\n", key.public()), 0o644)?;
    println!("signing key {} (keep it secret)", priv_path.display());
    println!("public key  {}: {}", pub_path.display(), key.public());
    println!(
        "trust it on hosts with, in agent.toml: trusted_keys = [\"{}\"]",
        key.public()
    );
    Ok(())
}

/// The `--output json` shape of `convoy hosts`.
#[derive(Serialize)]
struct HostsJson {
    hosts: Vec<HostEntryJson>,
}

#[derive(Serialize)]
struct HostEntryJson {
    host: String,
    connected: bool,
    labels: std::collections::BTreeMap<String, String>,
    last_seen_unix_ms: i64,
    apps: Vec<AppStatus>,
}

/// `convoy enroll create-token`: prints the token (its only appearance:
/// the controller keeps a hash) and the lines for the host's agent.toml.
pub async fn create_token(
    conn: &Conn,
    name: String,
    labels: Vec<(String, String)>,
    ttl: std::time::Duration,
    json: bool,
) -> Result<(), Failure> {
    let ca = conn
        .ca
        .clone()
        .ok_or_else(|| Failure::new(exit::USAGE, "--ca (or CONVOY_CA) is required"))?;
    let ca_pem = convoy_common::identity::read_cert_pem(&ca).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let fingerprint = convoy_common::identity::certs_der(&ca_pem)
        .first()
        .map(|d| convoy_common::identity::fingerprint(d))
        .unwrap_or_default();
    let mut client = conn.connect().await?;
    let reply = client
        .create_enroll_token(convoy_proto::CreateTokenRequest {
            name: name.clone(),
            labels: labels.iter().cloned().collect(),
            ttl_ms: ttl.as_millis() as u64,
        })
        .await?
        .into_inner();
    let labels: std::collections::BTreeMap<String, String> = labels.into_iter().collect();
    if json {
        let out = serde_json::json!({
            "token": reply.token,
            "name": if name.is_empty() { None } else { Some(&name) },
            "labels": labels,
            "expires_at_unix_ms": reply.expires_at_unix_ms,
            "ca_fingerprint": fingerprint,
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        return Ok(());
    }
    let who = if name.is_empty() {
        "any new host name".to_owned()
    } else {
        name.clone()
    };
    println!(
        "one-time enrollment token for {who}, valid for {}:",
        humantime::format_duration(ttl)
    );
    println!("  {}", reply.token);
    println!("on the host, in /etc/convoy/agent.toml (with name, controller, ca, cert and key):");
    println!("  enroll_token = \"{}\"", reply.token);
    println!("  ca_fingerprint = \"{fingerprint}\"");
    if !labels.is_empty() {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("the host's labels will be {}", l.join(", "));
    }
    Ok(())
}

/// `convoy hosts revoke NAME`.
pub async fn revoke_host(conn: &Conn, name: String) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .revoke_host(convoy_proto::RevokeRequest { host: name.clone() })
        .await?
        .into_inner();
    let was = if reply.was_connected { "disconnected and " } else { "" };
    println!("{name} {was}revoked: its certificates are refused from now on; enroll it again to readmit it");
    Ok(())
}

pub async fn hosts(conn: &Conn, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client.hosts(convoy_proto::HostsRequest {}).await?.into_inner();
    let out = HostsJson {
        hosts: reply
            .hosts
            .into_iter()
            .map(|h| HostEntryJson {
                host: h.host,
                connected: h.connected,
                labels: h.labels.into_iter().collect(),
                last_seen_unix_ms: h.last_seen_unix_ms,
                apps: h.apps.into_iter().filter_map(|a| AppStatus::try_from(a).ok()).collect(),
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        return Ok(());
    }
    println!(
        "{:<16} {:<10} {:<21} {:<28} APPS",
        "HOST", "CONNECTED", "LAST SEEN", "LABELS"
    );
    for h in &out.hosts {
        let labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let apps: Vec<String> = h
            .apps
            .iter()
            .map(|a| {
                format!(
                    "{}={}",
                    a.app,
                    a.current.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "-".into())
                )
            })
            .collect();
        println!(
            "{:<16} {:<10} {:<21} {:<28} {}",
            h.host,
            if h.connected { "yes" } else { "no" },
            when(h.last_seen_unix_ms),
            labels.join(","),
            apps.join(" ")
        );
    }
    Ok(())
}

/// The `--output json` shape of `convoy releases`.
#[derive(Serialize)]
struct ReleasesJson {
    app: String,
    releases: Vec<ReleaseJson>,
}

#[derive(Serialize)]
struct ReleaseJson {
    version: String,
    digest: String,
    size: u64,
    signed: bool,
    pushed_by: String,
    pushed_at_unix_ms: i64,
}

pub async fn releases(conn: &Conn, app: String, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .releases(convoy_proto::ReleasesRequest { app: app.clone() })
        .await?
        .into_inner();
    let out = ReleasesJson {
        app,
        releases: reply
            .releases
            .into_iter()
            .map(|r| ReleaseJson {
                version: r.version,
                digest: r.digest,
                size: r.size,
                signed: r.signed,
                pushed_by: r.pushed_by,
                pushed_at_unix_ms: r.pushed_at_unix_ms,
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        return Ok(());
    }
    println!(
        "{:<14} {:<21} {:>12} {:<7} {:<30} SHA256",
        "VERSION", "PUSHED", "BYTES", "SIGNED", "BY"
    );
    for r in &out.releases {
        println!(
            "{:<14} {:<21} {:>12} {:<7} {:<30} {}",
            r.version,
            when(r.pushed_at_unix_ms),
            r.size,
            if r.signed { "yes" } else { "no" },
            r.pushed_by,
            r.digest
        );
    }
    Ok(())
}

/// The `--output json` shape of `convoy report`.
#[derive(Serialize)]
struct ReportJson {
    app: String,
    since_unix_ms: i64,
    deploys: u32,
    failed_deploys: u32,
    deploys_per_day: f64,
    change_failure_rate: Option<f64>,
    mean_time_to_restore_secs: Option<f64>,
    restores_measured: u32,
}

pub async fn delivery_report(conn: &Conn, app: String, since: std::time::Duration, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let r = client
        .report(convoy_proto::ReportRequest {
            app: app.clone(),
            since_secs: since.as_secs(),
        })
        .await?
        .into_inner();
    let out = ReportJson {
        app,
        since_unix_ms: r.since_unix_ms,
        deploys: r.deploys,
        failed_deploys: r.failed_deploys,
        deploys_per_day: r.deploys_per_day,
        change_failure_rate: r.change_failure_rate,
        mean_time_to_restore_secs: r.mean_time_to_restore_secs,
        restores_measured: r.restores_measured,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        return Ok(());
    }
    println!("{} since {}", out.app, when(out.since_unix_ms));
    println!(
        "  deploys:              {} ({} failed)",
        out.deploys, out.failed_deploys
    );
    println!("  deploy frequency:     {:.2} per day", out.deploys_per_day);
    match out.change_failure_rate {
        Some(r) => println!("  change failure rate:  {:.0}%", r * 100.0),
        None => println!("  change failure rate:  - (no finished deploys)"),
    }
    match out.mean_time_to_restore_secs {
        Some(s) => println!(
            "  mean time to restore: {} (over {} failure(s))",
            humantime::format_duration(std::time::Duration::from_secs(s.round() as u64)),
            out.restores_measured
        ),
        None => println!("  mean time to restore: - (no restored failure)"),
    }
    Ok(())
}
