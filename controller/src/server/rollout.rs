//! The rollout engine: plan the targets of (app, version, environment),
//! then activate them host by host, halting at the first failure.
//!
//! A rollout runs as its own task; callers only watch its event stream, so
//! an operator's CLI going away does not stop or corrupt it.

use std::sync::Arc;

use convoy_common::identity::PeerIdentity;
use convoy_common::ops::{ActivateCommand, OpReport};
use convoy_common::{AppName, HostName, Version};
use convoy_proto::{
    controller_message, rollout_event, ControllerMessage, HostEvent, HostResult, RolloutDone, RolloutEvent, RolloutPlan,
};
use tokio::sync::broadcast;
use tonic::Status;

use super::operator::load_spec;
use super::registry::Update;
use super::{internal, Shared};

struct Rollout {
    id: String,
    app: AppName,
    version: Version,
    env: String,
    targets: Vec<HostName>,
    cmd: ActivateCommand,
    tx: broadcast::Sender<RolloutEvent>,
}

/// Validates and starts a rollout; returns its event stream.
pub fn start(
    shared: &Arc<Shared>,
    who: PeerIdentity,
    app: AppName,
    version: Version,
    env: String,
) -> Result<broadcast::Receiver<RolloutEvent>, Status> {
    let spec = load_spec(shared, &app)?;
    if !spec.environments.contains(&env) {
        return Err(Status::invalid_argument(format!(
            "environment {env:?} is not one of {app}'s environments ({})",
            spec.environments.join(", ")
        )));
    }
    let release = shared.db.release(&app, &version).map_err(internal)?.ok_or_else(|| {
        Status::not_found(format!(
            "{app} {version} has not been pushed; run `convoy release push {app} {version} FILE`"
        ))
    })?;

    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for h in shared.registry.hosts() {
        let in_env = h.labels.get("env") == Some(&env);
        let selected = spec.selector.iter().all(|(k, v)| h.labels.get(k) == Some(v));
        if in_env && selected {
            if h.session.is_some() {
                targets.push(h.name);
            } else {
                skipped.push(h.name.to_string());
            }
        }
    }
    if targets.is_empty() {
        return Err(Status::failed_precondition(format!(
            "no connected host has label env={env}{}",
            spec.selector
                .iter()
                .map(|(k, v)| format!(", {k}={v}"))
                .collect::<String>()
        )));
    }

    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    {
        let mut running = shared.running.lock().unwrap();
        let key = (app.to_string(), env.clone());
        if let Some(other) = running.get(&key) {
            return Err(Status::aborted(format!(
                "rollout {other} of {app} to {env} is still running"
            )));
        }
        running.insert(key, id.clone());
    }
    if let Err(e) = shared.db.start_rollout(&id, &app, &version, &env, &who.to_string()) {
        shared.running.lock().unwrap().remove(&(app.to_string(), env.clone()));
        return Err(internal(e));
    }
    let (tx, rx) = broadcast::channel(4096);
    let r = Rollout {
        cmd: ActivateCommand {
            op_id: String::new(),
            spec: spec.install.clone(),
            version: version.clone(),
            digest: release.digest,
            size: release.size,
        },
        id,
        app,
        version,
        env,
        targets,
        tx,
    };
    tracing::info!(rollout = %r.id, app = %r.app, version = %r.version, env = %r.env, by = %who, hosts = r.targets.len(), "rollout started");
    r.emit(rollout_event::Body::Plan(RolloutPlan {
        hosts: r.targets.iter().map(|h| h.to_string()).collect(),
        digest: release.digest.to_hex(),
        skipped_hosts: skipped,
    }));
    let shared = shared.clone();
    tokio::spawn(async move {
        let done = r.run(&shared).await;
        let state = if done.succeeded { "succeeded" } else { "failed" };
        if let Err(e) = shared.db.finish_rollout(&r.id, state, &done.reason) {
            tracing::error!(rollout = %r.id, error = %e, "could not record rollout end");
        }
        shared
            .running
            .lock()
            .unwrap()
            .remove(&(r.app.to_string(), r.env.clone()));
        tracing::info!(rollout = %r.id, state, reason = %done.reason, "rollout finished");
        r.emit(rollout_event::Body::Done(done));
    });
    Ok(rx)
}

impl Rollout {
    fn emit(&self, body: rollout_event::Body) {
        // No receiver is fine: nobody is watching.
        let _ = self.tx.send(RolloutEvent {
            rollout_id: self.id.clone(),
            body: Some(body),
        });
    }

    async fn run(&self, shared: &Shared) -> RolloutDone {
        for (i, host) in self.targets.iter().enumerate() {
            let report = self.activate(shared, host).await;
            let ok = report.as_ref().is_ok_and(|r| r.outcome.is_success());
            if !ok {
                let reason = match report {
                    Ok(r) => {
                        let mut s = format!("{}: {}", r.outcome, r.reason);
                        if !r.restore_detail.is_empty() {
                            s.push_str(&format!("; {}", r.restore_detail));
                        }
                        s
                    }
                    Err(e) => e,
                };
                return RolloutDone {
                    succeeded: false,
                    failed_host: host.to_string(),
                    reason,
                    untouched_hosts: self.targets[i + 1..].iter().map(|h| h.to_string()).collect(),
                };
            }
        }
        RolloutDone {
            succeeded: true,
            ..Default::default()
        }
    }

    /// Activates one host and waits for its report.
    async fn activate(&self, shared: &Shared, host: &HostName) -> Result<OpReport, String> {
        let op_id = format!("{}-{host}", self.id);
        let mut cmd = self.cmd.clone();
        cmd.op_id = op_id.clone();
        let msg = ControllerMessage {
            body: Some(controller_message::Body::Activate((&cmd).into())),
        };
        let mut updates = shared.registry.wait_for(&op_id, host, msg.clone());
        let _forget = Forget(&shared.registry, op_id.clone());
        let disconnected = || format!("{host} disconnected before it could be activated");
        let tx = shared.registry.command_tx(host).ok_or_else(disconnected)?;
        tx.send(Ok(msg)).await.map_err(|_| disconnected())?;

        let deadline = tokio::time::Instant::now() + shared.cfg.host_timeout;
        loop {
            let update = tokio::time::timeout_at(deadline, updates.recv())
                .await
                .map_err(|_| format!("{host} did not finish within {:?}", shared.cfg.host_timeout))?
                .ok_or_else(|| "update channel closed".to_owned())?;
            match update {
                Update::Event(ev) => {
                    if let Err(e) = shared.db.record_event(&self.id, host, &ev) {
                        tracing::error!(error = %e, "could not record event");
                    }
                    self.emit(rollout_event::Body::HostEvent(HostEvent {
                        host: host.to_string(),
                        event: Some((&ev).into()),
                    }));
                }
                Update::Result(r) => {
                    if let Err(e) = shared.db.record_host_result(&self.id, host, &r) {
                        tracing::error!(error = %e, "could not record host result");
                    }
                    self.emit(rollout_event::Body::HostResult(HostResult {
                        host: host.to_string(),
                        result: Some(r.as_ref().into()),
                    }));
                    return Ok(*r);
                }
            }
        }
    }
}

struct Forget<'a>(&'a super::registry::Registry, String);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(&self.1);
    }
}
