//! Operator commands: clients of the controller's operator API. This file
//! holds what every command shares: the connection to the controller,
//! failures and the exit codes they map to (README.md documents them).
//!
//! - `follow`: commands that start or follow a rollout (deploy, rollback,
//!   watch, pause/resume/abort/approve/promote) and its live output;
//! - `records`: commands that print what the controller knows (history,
//!   status, hosts, releases, report), as tables or JSON;
//! - `admin`: releases and keys, enrollment tokens, revocation.

mod admin;
pub mod config;
mod dry_run;
mod events;
mod follow;
mod records;
mod render;

pub use admin::{controllers, create_token, freeze, freezes, keys_generate, push, revoke_host, unfreeze};
pub use events::to_json as event_json;
pub use follow::{control, deploy, rollback, watch, DeployArgs, Pace};
pub use records::{delivery_report, history, hosts, releases, status};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use convoy_proto::operator_service_client::OperatorServiceClient;
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
        // A list (`https://a:7443,https://b:7443`) is tried from a random
        // one on, each once: the first that answers is used.
        let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err(Failure::new(exit::USAGE, "--controller: no URL in it"));
        }
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize)
            % urls.len();
        let mut failed = Vec::new();
        let mut channel = None;
        for u in urls.iter().cycle().skip(start).take(urls.len()) {
            let endpoint = Endpoint::from_shared(u.to_string())
                .map_err(|e| Failure::new(exit::USAGE, format!("--controller {u:?}: {e}")))?
                .tls_config(tls.clone())
                .map_err(|e| Failure::new(exit::USAGE, format!("TLS: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                // A controller that stops answering mid-call (paused, cut
                // off) ends the call instead of holding the CLI forever.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true);
            match convoy_proto::connect(&endpoint).await {
                Ok(c) => {
                    channel = Some(c);
                    break;
                }
                Err(e) => failed.push(format!("{u}: {}", error_chain(&e))),
            }
        }
        let channel = channel.ok_or_else(|| {
            Failure::new(
                exit::UNREACHABLE,
                match failed.len() {
                    1 => format!("cannot reach the controller at {}", failed[0]),
                    _ => format!("cannot reach any controller: {}", failed.join("; ")),
                },
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

/// Prints a command's `--output json` shape.
fn print_json(out: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(out).expect("serialises"));
}

pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// How a command prints what it reads.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}
