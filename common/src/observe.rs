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
/// go to journald natively (see [`journal::Journald`]): a message that
/// reads on its own in `journalctl` (the text and the event's fields), its
/// priority, and every field of the event and of the spans around it
/// (`APP`, `VERSION`, `ROLLOUT`, `HOST`, `OP_ID`, `STEP`, ...) as journal
/// fields, so `journalctl -u convoy-agent APP=web ROLLOUT=5e7ca08efb36`
/// selects them. Elsewhere, one line per event on stderr.
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
        .then(|| journal::Journald::connect(identifier).ok())
        .flatten();
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
                // Out of file descriptors, say: do not spin on it.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
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

/// journald's native protocol, for `init_tracing`.
///
/// tracing-journald sends only the event's message text as `MESSAGE`, so a
/// plain `journalctl` would lose every field, errors included. This layer
/// sends `MESSAGE` as "text key=value ..." with the event's own fields,
/// and every event and span field again as a journal field of its own.
pub mod journal {
    use std::fmt::Write as _;
    use std::os::unix::net::UnixDatagram;

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::registry::LookupSpan;

    const SOCKET: &str = "/run/systemd/journal/socket";

    pub struct Journald {
        socket: UnixDatagram,
        identifier: String,
    }

    impl Journald {
        pub fn connect(identifier: &str) -> std::io::Result<Self> {
            let socket = UnixDatagram::unbound()?;
            socket.connect(SOCKET)?;
            Ok(Self {
                socket,
                identifier: identifier.to_owned(),
            })
        }
    }

    /// A span's or an event's fields, in order.
    #[derive(Default)]
    struct Fields(Vec<(&'static str, String)>);

    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push((field.name(), value.to_owned()));
        }

        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push((field.name(), format!("{value:?}")));
        }
    }

    /// A field name as journald accepts it: A-Z, 0-9 and _, not leading _.
    fn journal_name(name: &str) -> String {
        let n: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        n.trim_start_matches('_').to_owned()
    }

    /// Appends one field in the native protocol's framing.
    fn put(buf: &mut Vec<u8>, name: &str, value: &str) {
        buf.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            buf.push(b'\n');
            buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            buf.push(b'=');
        }
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'\n');
    }

    fn priority(level: &Level) -> &'static str {
        match *level {
            Level::ERROR => "3",
            Level::WARN => "4",
            Level::INFO => "5",
            Level::DEBUG => "6",
            Level::TRACE => "7",
        }
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Journald {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            let mut fields = Fields::default();
            attrs.record(&mut fields);
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(fields);
            }
        }

        fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
            if let Some(span) = ctx.span(id) {
                if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                    values.record(fields);
                }
            }
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            let mut fields = Fields::default();
            event.record(&mut fields);
            let mut text = String::new();
            for (_, value) in fields.0.iter().filter(|(n, _)| *n == "message") {
                text.push_str(value);
            }
            for (name, value) in fields.0.iter().filter(|(n, _)| *n != "message") {
                let _ = write!(text, " {name}={value}");
            }
            let mut buf = Vec::with_capacity(256);
            put(&mut buf, "MESSAGE", text.trim_start());
            put(&mut buf, "PRIORITY", priority(event.metadata().level()));
            put(&mut buf, "SYSLOG_IDENTIFIER", &self.identifier);
            put(&mut buf, "TARGET", event.metadata().target());
            if let Some(scope) = ctx.event_scope(event) {
                for span in scope.from_root() {
                    if let Some(span_fields) = span.extensions().get::<Fields>() {
                        for (name, value) in &span_fields.0 {
                            put(&mut buf, &journal_name(name), value);
                        }
                    }
                }
            }
            for (name, value) in fields.0.iter().filter(|(n, _)| *n != "message") {
                put(&mut buf, &journal_name(name), value);
            }
            if self.socket.send(&buf).is_err() {
                // journald gone or the entry too large: keep it on stderr.
                eprintln!("{text}");
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn fields_are_framed_as_journald_reads_them() {
            let mut buf = Vec::new();
            put(&mut buf, &journal_name("op_id"), "abc-host1");
            put(&mut buf, "MESSAGE", "two\nlines");
            let mut want = b"OP_ID=abc-host1\nMESSAGE\n".to_vec();
            want.extend_from_slice(&9u64.to_le_bytes());
            want.extend_from_slice(b"two\nlines\n");
            assert_eq!(buf, want);
            assert_eq!(journal_name("_weird.name-1"), "WEIRD_NAME_1");
        }
    }
}
