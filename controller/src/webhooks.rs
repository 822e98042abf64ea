//! Webhooks: a JSON POST to each configured URL when a rollout starts,
//! succeeds, fails or is rolled back. The payload carries a Slack-style
//! `text` field beside the structured fields. Delivery runs in its own
//! task with retries and backoff; a failing webhook is logged and never
//! blocks or fails a rollout.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

const ATTEMPTS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(5);

/// The documented webhook payload (README.md, "Webhooks").
#[derive(Debug, Clone, Serialize)]
pub struct Payload {
    /// rollout_started, rollout_succeeded, rollout_failed, rollout_rolled_back
    pub event: &'static str,
    pub rollout_id: String,
    pub app: String,
    pub version: String,
    pub environment: String,
    /// deploy or rollback
    pub kind: &'static str,
    pub operator: String,
    pub reason: String,
    pub failed_hosts: Vec<String>,
    pub rolled_back_hosts: Vec<String>,
    pub at_unix_ms: i64,
    /// One line for chat tools (Slack's incoming webhooks read `text`).
    pub text: String,
}

#[derive(Debug, Clone, Default)]
pub struct Notifier {
    urls: Vec<String>,
}

/// Checks a webhook URL: plain http to a host and port.
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("{url:?} must be an http:// URL (use a local relay for https)"));
    }
    Ok(())
}

impl Notifier {
    pub fn new(urls: Vec<String>) -> Self {
        Self { urls }
    }

    /// Sends `p` to every URL in the background.
    pub fn send(&self, p: Payload) {
        if self.urls.is_empty() {
            return;
        }
        let body = Bytes::from(serde_json::to_vec(&p).expect("payload serialises"));
        for url in &self.urls {
            let (url, body, event) = (url.clone(), body.clone(), p.event);
            tokio::spawn(async move {
                for attempt in 1..=ATTEMPTS {
                    match post(&url, body.clone()).await {
                        Ok(status) if (200..300).contains(&status) => return,
                        Ok(status) => tracing::warn!(%url, event, attempt, status, "webhook answered with an error"),
                        Err(e) => tracing::warn!(%url, event, attempt, error = %e, "webhook failed"),
                    }
                    tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(attempt - 1))).await;
                }
                tracing::error!(%url, event, "webhook gave up after {ATTEMPTS} attempts");
            });
        }
    }
}

async fn post(url: &str, body: Bytes) -> Result<u16, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let host = uri.host().ok_or("URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let work = async {
        let stream = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::post(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, concat!("convoy/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
}
