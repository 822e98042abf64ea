//! The agent's shared state: store, systemd connection, the per-app
//! operation lock and the reporter that streams events to the controller.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_common::ops::{EventKind, OpReport, Step, StepEvent};
use convoy_common::AppName;
use convoy_proto::{agent_message, AgentMessage};
use tokio::sync::mpsc;

use crate::store::Store;
use crate::systemd::Systemd;

pub struct Agent {
    pub store: Store,
    pub systemd: Systemd,
    pub reporter: Reporter,
    pub labels: BTreeMap<String, String>,
    pub unit_timeout: Duration,
    /// Where unit files shipped in releases are installed.
    pub unit_dir: PathBuf,
    /// When not empty, only artifacts signed by one of these are installed.
    pub trusted_keys: Vec<convoy_common::signing::PublicKey>,
    pub ops: Arc<OpLocks>,
    /// The name the controller knows this host by (from its welcome; the
    /// config's `name` until then), for logs.
    pub host: Mutex<String>,
    /// The lease epoch of each rollout, to refuse a controller that lost one.
    pub epochs: crate::epochs::Epochs,
}

impl Agent {
    pub fn new(
        host: String,
        store: Store,
        systemd: Systemd,
        labels: BTreeMap<String, String>,
        unit_timeout: Duration,
        unit_dir: PathBuf,
        trusted_keys: Vec<convoy_common::signing::PublicKey>,
    ) -> Self {
        Self {
            epochs: crate::epochs::Epochs::open(store.root()),
            reporter: Reporter::new(store.clone()),
            ops: Arc::new(OpLocks::new(store.clone())),
            host: Mutex::new(host),
            store,
            systemd,
            labels,
            unit_timeout,
            unit_dir,
            trusted_keys,
        }
    }

    /// The span an operation's log lines are in: journald gets `APP`,
    /// `VERSION`, `ROLLOUT`, `OP_ID` and `HOST` fields from it.
    pub fn op_span(&self, app: &AppName, version: &str, op_id: &str) -> tracing::Span {
        tracing::info_span!(
            "op",
            app = %app,
            version,
            rollout = convoy_common::ops::rollout_of(op_id),
            op_id,
            host = %self.host.lock().unwrap(),
        )
    }
}

/// One operation per app: an in-process claim naming the running operation,
/// plus the app's lock file, which keeps `convoy-agent prune` out too.
pub struct OpLocks {
    store: Store,
    /// app → id of the operation running for it.
    running: Mutex<HashMap<AppName, String>>,
    /// Set when the agent stops: no operation starts any more.
    stopping: std::sync::atomic::AtomicBool,
}

/// Held while an operation runs for an app; dropping it frees the app.
pub struct OpGuard {
    locks: Arc<OpLocks>,
    app: AppName,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Why an app cannot take another operation now.
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// This agent runs the operation with this id for the app.
    Running(String),
    /// Another process (`convoy-agent prune`) holds the app's lock.
    Locked,
    /// The lock could not be taken at all.
    Error(String),
    /// The agent is stopping and starts nothing new.
    Stopping,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Busy::Running(op) => write!(f, "busy: operation {op} is running for this app"),
            Busy::Locked => write!(f, "busy: another convoy-agent process (prune) holds this app's lock"),
            Busy::Error(e) => write!(f, "cannot lock the app: {e}"),
            Busy::Stopping => write!(f, "busy: the agent is stopping; send the command again once it is back"),
        }
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.locks.running.lock().unwrap().remove(&self.app);
    }
}

impl OpLocks {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            running: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// From now on every operation is refused as `busy`.
    pub fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The id of the operation holding `app`, if any.
    pub fn holder(&self, app: &AppName) -> Option<String> {
        self.running.lock().unwrap().get(app).cloned()
    }

    /// The ids of the operations running now.
    pub fn running(&self) -> Vec<String> {
        self.running.lock().unwrap().values().cloned().collect()
    }

    /// Claims the app for one operation, or says who holds it.
    pub fn try_begin(self: &Arc<Self>, app: &AppName, op_id: &str) -> Result<OpGuard, Busy> {
        let mut running = self.running.lock().unwrap();
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Busy::Stopping);
        }
        if let Some(other) = running.get(app) {
            return Err(Busy::Running(other.clone()));
        }
        let lock = match self.store.lock_app(app) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(Busy::Locked),
            Err(e) => return Err(Busy::Error(e.to_string())),
        };
        running.insert(app.clone(), op_id.to_owned());
        Ok(OpGuard {
            locks: self.clone(),
            app: app.clone(),
            _lock: lock,
        })
    }
}

/// Sends events and results to the controller session, when there is one.
/// Events are best effort: a full session queue drops them. A result is
/// never lost: it is journaled on disk first and repeated in every hello,
/// and when it cannot be queued on a live session the reporter asks that
/// session to end (`resync`), so the next hello carries it at once instead
/// of the controller waiting out its host timeout.
pub struct Reporter {
    tx: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    store: Store,
    resync: tokio::sync::Notify,
}

impl Reporter {
    fn new(store: Store) -> Self {
        Self {
            tx: Mutex::new(None),
            store,
            resync: tokio::sync::Notify::new(),
        }
    }

    pub fn attach(&self, tx: mpsc::Sender<AgentMessage>) {
        *self.tx.lock().unwrap() = Some(tx);
    }

    pub fn detach(&self) {
        *self.tx.lock().unwrap() = None;
    }

    /// Resolves when a result could not be queued on the session: the
    /// session should end so that the next hello repeats it.
    pub async fn resync_needed(&self) {
        self.resync.notified().await
    }

    /// Queues a message; `None` without a session.
    fn send(&self, body: agent_message::Body) -> Option<bool> {
        self.tx
            .lock()
            .unwrap()
            .as_ref()
            .map(|tx| tx.try_send(AgentMessage { body: Some(body) }).is_ok())
    }

    pub fn event(&self, e: StepEvent) {
        tracing::info!(step = %e.step, kind = ?e.kind, "{}", e.message);
        if e.step == Step::Restore && matches!(e.kind, EventKind::Succeeded | EventKind::Failed) {
            crate::metrics::get().restore(e.kind == EventKind::Succeeded);
        }
        if self.send(agent_message::Body::Event((&e).into())) != Some(true) {
            tracing::debug!("event not sent: no controller session, or its queue is full");
        }
    }

    pub fn result(&self, r: &OpReport) {
        tracing::info!(outcome = %r.outcome, reason = %r.reason, "operation finished");
        if let Err(e) = self.store.push_unreported(r) {
            tracing::error!(error = %e, "could not record result on disk");
        }
        if self.send(agent_message::Body::Result(r.into())) == Some(false) {
            tracing::warn!(op_id = %r.op_id, "result could not be queued; reconnecting to repeat it in the hello");
            // notify_one keeps the permit if the session is not waiting yet.
            self.resync.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_common::ops::AppStatus;

    fn report(op_id: &str) -> OpReport {
        let app = AppName::new("demo").unwrap();
        OpReport {
            op_id: op_id.into(),
            app: app.clone(),
            version: convoy_common::Version::new("1.0.0").unwrap(),
            outcome: convoy_common::ops::Outcome::Succeeded,
            reason: String::new(),
            restore_detail: String::new(),
            state: AppStatus::empty(&app),
        }
    }

    #[tokio::test]
    async fn a_result_that_cannot_be_queued_ends_the_session_and_is_kept_for_the_hello() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let reporter = Reporter::new(store.clone());
        let (tx, mut rx) = mpsc::channel(1);
        reporter.attach(tx);
        // A queue filled by events (dropped) and then a result.
        for _ in 0..3 {
            reporter.event(StepEvent {
                op_id: "r:activate:web1".into(),
                app: AppName::new("demo").unwrap(),
                step: Step::Stage,
                kind: EventKind::Info,
                message: "fetching".into(),
                at_unix_ms: 0,
            });
        }
        reporter.result(&report("r:activate:web1"));
        tokio::time::timeout(Duration::from_secs(5), reporter.resync_needed())
            .await
            .expect("the session is asked to end");
        assert_eq!(
            store.unreported(),
            vec![report("r:activate:web1")],
            "kept for the next hello"
        );
        // With room, a result goes out and no resync is asked for.
        while rx.try_recv().is_ok() {}
        reporter.result(&report("r:activate:web2"));
        let sent = rx.try_recv().expect("queued");
        assert!(matches!(sent.body, Some(agent_message::Body::Result(r)) if r.op_id == "r:activate:web2"));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), reporter.resync_needed())
                .await
                .is_err()
        );
    }

    #[test]
    fn one_operation_per_app() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let locks = Arc::new(OpLocks::new(store.clone()));
        let (demo, other) = (AppName::new("demo").unwrap(), AppName::new("other").unwrap());
        let guard = locks.try_begin(&demo, "op-1").unwrap();
        assert_eq!(locks.try_begin(&demo, "op-2").err(), Some(Busy::Running("op-1".into())));
        assert_eq!(
            locks.try_begin(&demo, "op-2").err().unwrap().to_string(),
            "busy: operation op-1 is running for this app"
        );
        let _other = locks.try_begin(&other, "op-3").expect("another app is independent");
        drop(guard);
        let guard = locks.try_begin(&demo, "op-2").expect("free again once the first ends");
        // Another process holding the lock file (as `convoy-agent prune` does).
        drop(guard);
        let held = store.lock_app(&demo).unwrap().unwrap();
        assert_eq!(locks.try_begin(&demo, "op-4").err(), Some(Busy::Locked));
        drop(held);
        assert!(locks.try_begin(&demo, "op-4").is_ok());
    }
}
