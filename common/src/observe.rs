//! What the agent and the controller share for being run as services:
//! logging that journald keeps structured, and a Prometheus endpoint.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Sets up logging. The level comes from `CONVOY_LOG` (an `EnvFilter`
/// directive such as `debug` or `info,convoy_agent=trace`), else from the
/// config's `log_level`, else `info`.
///
/// Under systemd (stderr is the journal, as `JOURNAL_STREAM` says), events
/// go to journald natively: the message, its priority, and every field of
/// the event and of the spans around it (`APP`, `VERSION`, `ROLLOUT`,
/// `HOST`, `OP_ID`, ...) as journal fields, so
/// `journalctl -u convoy-agent APP=web ROLLOUT=5e7ca08efb36` selects them.
/// Elsewhere, one line per event on stderr.
pub fn init_tracing(level: Option<&str>, identifier: &str) -> Result<(), String> {
    let filter = match std::env::var("CONVOY_LOG") {
        Ok(v) if !v.is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&v).map_err(|e| format!("CONVOY_LOG: {v:?}: {e}"))?
        }
        _ => {
            let level = level.unwrap_or("info");
            tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("log_level: {level:?}: {e}"))?
        }
    };
    let journald = stderr_is_journal()
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| l.with_field_prefix(None).with_syslog_identifier(identifier.to_string()));
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
    Ok(())
}

/// True when stderr is the journal stream systemd connected (the device and
/// inode in `JOURNAL_STREAM` are stderr's), not merely inherited by a child.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Serves `GET /metrics` (Prometheus text format) from `registry` on
/// `listen` until the process ends. Binds before returning, so a taken or
/// bad address is an error at start.
pub async fn serve_metrics(listen: SocketAddr, registry: Arc<Mutex<Registry>>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving metrics on /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let registry = registry.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &registry)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn answer<B>(req: &hyper::Request<B>, registry: &Mutex<Registry>) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, ctype: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return reply(404, "text/plain", "only GET /metrics is served here\n".into());
    }
    let mut text = String::new();
    let registry = registry.lock().unwrap_or_else(|e| e.into_inner());
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => reply(200, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
        Err(e) => reply(500, "text/plain", format!("encoding metrics: {e}\n")),
    }
}

/// Talks to systemd's notify socket (`Type=notify` units); does nothing
/// when not run by systemd.
pub mod notify {
    use sd_notify::NotifyState;

    /// `READY=1` with a status line for `systemctl status`.
    pub fn ready(status: &str) {
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A new status line for `systemctl status`.
    pub fn status(status: &str) {
        let _ = sd_notify::notify(&[NotifyState::Status(status)]);
    }

    /// `STOPPING=1`, with what the stop waits for.
    pub fn stopping(status: &str) {
        let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// Asks for more time to stop (`EXTEND_TIMEOUT_USEC`).
    pub fn extend_timeout(by: std::time::Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        let _ = sd_notify::notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    /// When the unit sets `WatchdogSec=`, pings the watchdog at half that
    /// interval from a task on the runtime: a runtime that stops scheduling
    /// tasks (a deadlock, a blocked worker) misses it and systemd restarts
    /// the service.
    pub fn spawn_watchdog() {
        let Some(every) = sd_notify::watchdog_enabled() else {
            return;
        };
        tracing::info!(interval = ?every, "feeding the systemd watchdog");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
}
