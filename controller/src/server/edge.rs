//! The operator API's edge with the engine: requests become validated
//! orders (`TryFrom`, naming the flag at fault), engine events become
//! wire events. Nothing behind this file sees a prost type.

use std::time::Duration;

use convoy_common::rollout::{Amount, Strategy};
use convoy_common::{AppName, HostName, Version};
use convoy_proto::{
    rollout_event, Batch, DeployRequest, HostEvent, HostResult, RollbackRequest, RolloutDone, RolloutEvent,
    RolloutNote, RolloutPlan,
};

use crate::rollout::dry_run::DryRun;
use crate::rollout::events::{Done, Event, EventBody, Plan, Verdict};
use crate::rollout::order::{DeployOrder, FailureBudget, InvalidOrder, RollbackOrder, Vanish, DEFAULT_VANISH_DEADLINE};
use crate::rollout::preflight::HostPreflight;

fn name<T>(flag: &str, r: Result<T, convoy_common::names::InvalidName>) -> Result<T, InvalidOrder> {
    r.map_err(|e| InvalidOrder(format!("{flag}: {e}")))
}

fn hosts(flag: &str, names: Vec<String>) -> Result<Vec<HostName>, InvalidOrder> {
    names.into_iter().map(|h| name(flag, HostName::new(h))).collect()
}

/// `--strategy` (or `default`), `--batch-size`, `--stages` and `--bake`.
fn strategy(default: &str, strategy: &str, batch: &str, stages: &str, bake_ms: u64) -> Result<Strategy, InvalidOrder> {
    let nonempty = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
    Strategy::from_flags(
        if strategy.is_empty() { default } else { strategy },
        nonempty(batch).as_deref(),
        nonempty(stages).as_deref(),
        (bake_ms > 0).then(|| Duration::from_millis(bake_ms)),
    )
    .map_err(InvalidOrder)
}

fn failure_budget(s: &str) -> Result<FailureBudget, InvalidOrder> {
    if s.is_empty() {
        return Ok(FailureBudget(None));
    }
    let amount = Amount::parse(s).map_err(|e| InvalidOrder(format!("--failure-budget: {e}")))?;
    Ok(FailureBudget(Some(amount)))
}

impl TryFrom<DeployRequest> for DeployOrder {
    type Error = InvalidOrder;

    fn try_from(r: DeployRequest) -> Result<Self, InvalidOrder> {
        // Blue-green goes batch by batch like rolling; the hosts switch slots.
        let blue_green = r.strategy == "blue-green";
        let named = if blue_green { "rolling" } else { r.strategy.as_str() };
        let strategy = strategy("rolling", named, &r.batch_size, &r.stages, r.bake_ms)?;
        let failure_budget = failure_budget(&r.failure_budget)?;
        DeployOrder {
            blue_green,
            config_revision: Some(r.config_revision).filter(|r| *r > 0),
            app: name("app", AppName::new(r.app))?,
            version: name("version", Version::new(r.version))?,
            env: r.environment,
            strategy,
            failure_budget,
            select: r.select.into_iter().collect(),
            order: hosts("--order", r.order)?,
            canary_group: r.canary_group.into_iter().collect(),
            hotfix: r.hotfix.then_some(r.reason),
            rollback_on_halt: !r.no_rollback,
            manual_promote: r.manual_promote,
            vanish: Vanish {
                wait: r.wait_for_vanished,
                deadline: match r.vanish_deadline_ms {
                    0 => DEFAULT_VANISH_DEADLINE,
                    ms => Duration::from_millis(ms),
                },
            },
            // Set from the caller's certificate by the service.
            admin: false,
        }
        .validate()
    }
}

impl TryFrom<RollbackRequest> for RollbackOrder {
    type Error = InvalidOrder;

    fn try_from(r: RollbackRequest) -> Result<Self, InvalidOrder> {
        Ok(RollbackOrder {
            app: name("app", AppName::new(r.app))?,
            env: r.environment,
            to: Some(r.to_version)
                .filter(|v| !v.is_empty())
                .map(Version::new)
                .transpose()
                .map_err(|e| InvalidOrder(format!("--to: {e}")))?,
            hosts: hosts("--hosts", r.hosts)?,
            strategy: strategy("all-at-once", &r.strategy, &r.batch_size, &r.stages, r.bake_ms)?,
            failure_budget: failure_budget(&r.failure_budget)?,
        })
    }
}

fn strings(hosts: &[HostName]) -> Vec<String> {
    hosts.iter().map(|h| h.to_string()).collect()
}

impl From<&Plan> for RolloutPlan {
    fn from(p: &Plan) -> Self {
        RolloutPlan {
            hosts: strings(&p.hosts),
            digest: p.digest.clone(),
            skipped_hosts: strings(&p.skipped_hosts),
            batches: p
                .batches
                .iter()
                .map(|b| Batch {
                    hosts: strings(&b.hosts),
                    bake_ms: b.bake.as_millis() as u64,
                })
                .collect(),
            strategy: p.strategy.clone(),
            failure_budget: p.failure_budget as u32,
        }
    }
}

impl From<&Done> for RolloutDone {
    fn from(d: &Done) -> Self {
        RolloutDone {
            succeeded: d.verdict == Verdict::Succeeded,
            failed_host: d.failed_host.as_ref().map(|h| h.to_string()).unwrap_or_default(),
            reason: d.reason.clone(),
            untouched_hosts: strings(&d.untouched_hosts),
            failed_hosts: strings(&d.failed_hosts),
            rolled_back_hosts: strings(&d.rolled_back_hosts),
            rollback_failed: d.rollback_failed,
            nothing_changed: d.nothing_changed,
        }
    }
}

impl From<&HostPreflight> for convoy_proto::HostPreflight {
    fn from(h: &HostPreflight) -> Self {
        convoy_proto::HostPreflight {
            host: h.host.to_string(),
            checks: h.checks.iter().map(Into::into).collect(),
        }
    }
}

impl From<&DryRun> for convoy_proto::DeployPlanReply {
    fn from(d: &DryRun) -> Self {
        convoy_proto::DeployPlanReply {
            plan: Some((&d.plan).into()),
            verdicts: d
                .verdicts
                .iter()
                .map(|(name, v)| convoy_proto::PlanVerdict {
                    name: (*name).to_owned(),
                    passed: v.is_ok(),
                    detail: match v {
                        Ok(s) | Err(s) => s.clone(),
                    },
                })
                .collect(),
            preflight: d.preflight.iter().map(Into::into).collect(),
            gates: d.gates.iter().map(Into::into).collect(),
            would_start: d.would_start(),
        }
    }
}

impl From<&Event> for RolloutEvent {
    fn from(e: &Event) -> Self {
        let body = match &e.body {
            EventBody::Plan(p) => rollout_event::Body::Plan(p.into()),
            EventBody::Note(m) => rollout_event::Body::Note(RolloutNote { message: m.clone() }),
            EventBody::Host { host, event } => rollout_event::Body::HostEvent(HostEvent {
                host: host.to_string(),
                event: Some(event.into()),
            }),
            EventBody::Result { host, report } => rollout_event::Body::HostResult(HostResult {
                host: host.to_string(),
                result: Some(report.as_ref().into()),
            }),
            EventBody::Measurement(m) => rollout_event::Body::Measurement(m.into()),
            EventBody::Preflight(hosts) => rollout_event::Body::Preflight(convoy_proto::PreflightReport {
                hosts: hosts.iter().map(Into::into).collect(),
            }),
            EventBody::Done(d) => rollout_event::Body::Done(d.into()),
        };
        RolloutEvent {
            rollout_id: e.rollout_id.clone(),
            body: Some(body),
        }
    }
}

impl From<crate::db::RolloutRow> for convoy_proto::RolloutRecord {
    fn from(row: crate::db::RolloutRow) -> Self {
        convoy_proto::RolloutRecord {
            id: row.id,
            app: row.app,
            version: row.version,
            environment: row.env,
            kind: row.kind,
            strategy: row.strategy,
            operator: row.operator,
            state: row.state,
            reason: row.reason,
            hotfix_reason: row.hotfix_reason,
            started_at_unix_ms: row.started_at_ms,
            finished_at_unix_ms: row.finished_at_ms.unwrap_or(0),
            approved_by: row.approved_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy() -> DeployRequest {
        DeployRequest {
            app: "demo".into(),
            version: "1.0.0".into(),
            environment: "staging".into(),
            ..Default::default()
        }
    }

    fn refused(r: DeployRequest) -> String {
        DeployOrder::try_from(r).unwrap_err().to_string()
    }

    #[test]
    fn requests_become_orders_with_defaults() {
        let o = DeployOrder::try_from(deploy()).unwrap();
        assert_eq!(
            o.strategy.describe(),
            Strategy::from_flags("rolling", None, None, None).unwrap().describe()
        );
        assert_eq!(o.failure_budget, FailureBudget(None));
        assert!(o.rollback_on_halt);
        assert_eq!(o.vanish, Vanish::default());
        assert_eq!(o.hotfix, None);
    }

    #[test]
    fn bad_requests_name_the_flag() {
        for (r, expect) in [
            (
                DeployRequest {
                    app: "de mo".into(),
                    ..deploy()
                },
                "app: ",
            ),
            (
                DeployRequest {
                    version: "".into(),
                    ..deploy()
                },
                "version: ",
            ),
            (
                DeployRequest {
                    failure_budget: "lots".into(),
                    ..deploy()
                },
                "--failure-budget: \"lots\"",
            ),
            (
                DeployRequest {
                    failure_budget: "0%".into(),
                    ..deploy()
                },
                "--failure-budget: ",
            ),
            (
                DeployRequest {
                    order: vec!["we b".into()],
                    ..deploy()
                },
                "--order: ",
            ),
            (
                DeployRequest {
                    strategy: "canary".into(),
                    batch_size: "2".into(),
                    ..deploy()
                },
                "--batch-size",
            ),
            (
                DeployRequest {
                    hotfix: true,
                    reason: " ".into(),
                    ..deploy()
                },
                "--hotfix needs --reason",
            ),
            (
                DeployRequest {
                    manual_promote: true,
                    ..deploy()
                },
                "--promote manual needs --strategy canary",
            ),
        ] {
            let e = refused(r);
            assert!(e.contains(expect), "{e:?} should contain {expect:?}");
        }
        let rollback = || RollbackRequest {
            app: "demo".into(),
            environment: "staging".into(),
            ..Default::default()
        };
        let e = RollbackOrder::try_from(RollbackRequest {
            to_version: "1 0".into(),
            ..rollback()
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("--to: "), "{e}");
        let e = RollbackOrder::try_from(RollbackRequest {
            batch_size: "2".into(),
            ..rollback()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--batch-size, --stages or --bake does not apply to --strategy all-at-once"),
            "{e}"
        );
        let o = RollbackOrder::try_from(rollback()).unwrap();
        assert_eq!(o.strategy.describe(), "all at once");
    }
}
