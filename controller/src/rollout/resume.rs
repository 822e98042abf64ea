//! Rollouts a previous controller left running, and results that arrive
//! after their rollout stopped waiting for them.

use std::collections::HashMap;
use std::sync::Arc;

use convoy_common::ops::{OpId, OpKind, OpReport};
use convoy_common::{AppName, HostName};

use super::control::Control;
use super::run::{Head, HostOutcome, Kind, Rollout, SavedPlan};
use super::store::RolloutRow;

fn head(row: &RolloutRow, app: AppName) -> Head {
    Head {
        id: row.id.clone(),
        operator: row.operator.clone(),
        app,
        env: row.env.clone(),
    }
}
use super::Engine;

impl Engine {
    /// One round of lease keeping. It picks up the rollouts a previous
    /// controller left unfinished (at start, and whenever the controller
    /// that drove one stopped renewing its lease): each goes on from its
    /// recorded host results, in the state it was in (paused, awaiting
    /// approval or promotion). Operations without a recorded result are
    /// sent again under the same id, and an agent answers a repeated id
    /// with what it already did, so no host is activated twice.
    ///
    /// It also renews the leases of the rollouts this
    /// controller drives, stops driving those another controller took
    /// over, and takes over the rollouts whose controller stopped renewing.
    pub async fn keep_leases(self: &Arc<Self>) {
        match self.store.renew_leases().await {
            Ok(lost) => {
                for id in lost {
                    self.lost(&id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew rollout leases (retrying)"),
        }
        let takeable = match self.store.takeable().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read running rollouts (retrying)");
                return;
            }
        };
        for (id, seen) in takeable {
            match self.store.take_over(&id, seen).await {
                Ok(Some(epoch)) => self.resume(&id, epoch).await,
                Ok(None) => {} // another controller got there first
                Err(e) => tracing::warn!(rollout = %id, error = %e, "could not take a rollout over (retrying)"),
            }
        }
    }

    /// Stops driving a rollout another controller took over: its task
    /// ends where it is, recording nothing more.
    pub(super) fn lost(&self, id: &str) {
        let live = self.live.lock().unwrap().remove(id);
        self.running.lock().unwrap().retain(|_, r| r != id);
        if let Some(l) = live {
            l.stop.cancel();
            tracing::warn!(rollout = %id, "another controller took this rollout over; this controller stopped driving it");
        }
    }

    /// Goes on with rollout `id`, whose lease this controller just took at
    /// `epoch`.
    async fn resume(self: &Arc<Self>, id: &str, epoch: i64) {
        let fail = |why: String| {
            let (store, id) = (self.store.clone(), id.to_owned());
            async move {
                tracing::error!(rollout = %id, "{why}");
                if let Err(e) = store.finish_rollout(&id, "failed", &why).await {
                    tracing::error!(rollout = %id, error = %e, "could not record rollout end");
                }
            }
        };
        let (row, plan) = match self.store.rollout_with_plan(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                self.store.let_go(id);
                tracing::warn!(rollout = %id, error = %e, "cannot read a rollout to resume (retrying)");
                return;
            }
        };
        let (Ok(plan), Ok(app)) = (serde_json::from_str::<SavedPlan>(&plan), AppName::new(row.app.clone())) else {
            fail("the controller restarted and this rollout's plan could not be read".into()).await;
            return;
        };
        let hosts = match self.store.rollout_hosts(&row.id).await {
            Ok(hosts) => hosts,
            Err(e) => {
                fail(format!("cannot read recorded results: {e}")).await;
                return;
            }
        };
        let mut recorded: HashMap<OpId, HostOutcome> = HashMap::new();
        let mut unreadable = None;
        for h in hosts {
            let Some(outcome) = crate::db::outcome_from_name(&h.outcome) else {
                continue;
            };
            match OpId::parse(&h.op_id) {
                Ok(op) => {
                    recorded.insert(
                        op,
                        HostOutcome {
                            outcome,
                            reason: h.reason,
                            restore_detail: h.restore_detail,
                            slots: vec![],
                        },
                    );
                }
                Err(e) => unreadable = Some(e),
            }
        }
        // A result the controller cannot match to its operation would
        // have the operation sent again: halt instead, touching nothing.
        if let Some(e) = unreadable {
            fail(format!(
                "the controller restarted and cannot match a recorded host result to its operation ({e}); \
                 nothing more was sent: check the hosts with `convoy status` and deploy again"
            ))
            .await;
            return;
        }
        let control = match row.state.as_str() {
            "paused" => Control::Pause("an operator, before the controller restarted".into()),
            "awaiting_approval" => Control::AwaitApproval(row.operator.clone()),
            _ => Control::Run,
        };
        self.running
            .lock()
            .unwrap()
            .insert((app.clone(), row.env.clone()), row.id.clone());
        let rollout = Rollout::new(head(&row, app), plan, recorded, control);
        tracing::warn!(
            rollout = %rollout.id,
            recorded = rollout.recorded.len(),
            state = %row.state,
            epoch,
            "resuming a rollout interrupted by a controller restart"
        );
        self.launch(rollout, true, None);
    }

    /// Reconciles a result no one was waiting for: a host that vanished
    /// mid-rollout (and was counted as failed) reports how its operation
    /// really ended when it comes back. The result goes into the rollout's
    /// history; and when that rollout has since halted and rolled back the
    /// hosts it moved, a host that did activate is rolled back too, so the
    /// fleet ends where the rollout says it is. Only the host an operation
    /// was sent to may answer for it.
    pub async fn late_result(self: &Arc<Self>, host: &HostName, r: &OpReport) {
        let Ok(op) = OpId::parse(&r.op_id) else { return };
        if op.host() != host {
            return;
        }
        let id = op.rollout();
        let Ok(Some((row, plan))) = self.store.rollout_with_plan(id).await else {
            return;
        };
        let (Ok(plan), Ok(app)) = (serde_json::from_str::<SavedPlan>(&plan), AppName::new(row.app.clone())) else {
            return;
        };
        if !plan.targets.contains(host) {
            tracing::warn!(rollout = %id, %host, %op, "result for a rollout the host is not a target of ignored");
            return;
        }
        if !matches!(self.store.host_outcome(id, &r.op_id).await, Ok(None)) {
            return; // already recorded: every hello repeats recent results
        }
        crate::metrics::get().host_result(r.outcome);
        if let Err(e) = self.store.record_host_result(id, host, r).await {
            tracing::error!(rollout = %id, %host, error = %e, "could not record a late result");
            return;
        }
        tracing::warn!(rollout = %id, %host, %op, outcome = %r.outcome, "late result reconciled into its rollout");
        let halted = matches!(row.state.as_str(), "failed" | "rolled_back");
        let undo = matches!(
            plan.kind,
            Kind::Deploy {
                rollback_on_halt: true,
                ..
            }
        ) && halted
            && r.outcome.is_success()
            && op.kind() == OpKind::Activate;
        let to = plan.before.iter().find(|(h, _)| h == host).and_then(|(_, v)| v.clone());
        let (true, Some(to)) = (undo, to) else {
            return;
        };
        let rollback_op = OpId::new(id, OpKind::Rollback, host);
        if !matches!(self.store.host_outcome(id, &rollback_op.to_string()).await, Ok(None)) {
            return;
        }
        let rollout = Rollout::new(head(&row, app), plan, HashMap::new(), Control::Run);
        let engine = self.clone();
        let host = host.clone();
        self.spawn(async move {
            tracing::warn!(rollout = %rollout.id, %host, %to, "rolling back a host that activated after its rollout halted");
            match rollout.rollback_host(&engine, &rollback_op, Some(to)).await {
                Ok(o) if o.outcome.is_success() => tracing::info!(rollout = %rollout.id, %host, "late host rolled back"),
                Ok(o) => tracing::error!(rollout = %rollout.id, %host, outcome = %o.outcome, reason = %o.reason, "late host could not be rolled back"),
                Err(e) => tracing::error!(rollout = %rollout.id, %host, error = %e, "late host could not be rolled back"),
            }
        });
    }
}
