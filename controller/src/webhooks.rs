//! Webhooks: a JSON POST to each configured URL when a rollout starts,
//! succeeds, fails or is rolled back. The payload carries a Slack-style
//! `text` field beside the structured fields. Delivery runs in its own
//! task with retries and backoff; a failing webhook is logged and never
//! blocks or fails a rollout.

use std::time::Duration;

use std::sync::Arc;

use hyper::body::Bytes;
use serde::Serialize;

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
    /// Roots for https webhooks: the system's plus `webhook_ca`.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The controller's tasks: a stopping controller gives deliveries
    /// under way its grace period to finish.
    tasks: tokio_util::task::TaskTracker,
}

impl Notifier {
    pub fn new(
        urls: Vec<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        Self { urls, tls, tasks }
    }

    /// Sends `p` to every URL in the background.
    pub fn send(&self, p: Payload) {
        if self.urls.is_empty() {
            return;
        }
        let body = Bytes::from(serde_json::to_vec(&p).expect("payload serialises"));
        for url in &self.urls {
            let (url, body, event, tls) = (url.clone(), body.clone(), p.event, self.tls.clone());
            self.tasks.spawn(async move {
                let mut backoff =
                    convoy_common::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
                for attempt in 1..=ATTEMPTS {
                    let sent = convoy_common::http::send(convoy_common::http::Request {
                        method: hyper::Method::POST,
                        url: &url,
                        json: Some(body.clone()),
                        tls: tls.clone(),
                        body_limit: 0,
                        timeout: Some(TIMEOUT),
                    })
                    .await;
                    match sent.map(|r| r.status) {
                        Ok(status) if (200..300).contains(&status) => return,
                        Ok(status) => tracing::warn!(%url, event, attempt, status, "webhook answered with an error"),
                        Err(e) => tracing::warn!(%url, event, attempt, error = %e, "webhook failed"),
                    }
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
                tracing::error!(%url, event, "webhook gave up after {ATTEMPTS} attempts");
            });
        }
    }
}
