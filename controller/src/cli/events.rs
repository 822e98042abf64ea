//! `--output json` for `deploy`, `rollback` and `watch`: one JSON object
//! per rollout event, one per line, for CI systems. The schema (README,
//! "Rollout events as JSON") is stable: each object has `type` and
//! `rollout_id`; fields are only ever added.

use convoy_proto::rollout_event::Body;
use serde_json::{json, Value};

fn kind_name(kind: i32) -> String {
    convoy_proto::EventKind::try_from(kind)
        .map(|k| k.as_str_name())
        .unwrap_or("EVENT_KIND_UNSPECIFIED")
        .trim_start_matches("EVENT_KIND_")
        .to_lowercase()
}

fn outcome_name(outcome: i32) -> String {
    convoy_proto::Outcome::try_from(outcome)
        .map(|o| o.as_str_name())
        .unwrap_or("OUTCOME_UNSPECIFIED")
        .trim_start_matches("OUTCOME_")
        .to_lowercase()
}

/// The exit code a rollout's end makes (as `deploy` exits).
pub fn exit_code(d: &convoy_proto::RolloutDone) -> u8 {
    use super::exit;
    match (d.succeeded, d.rollback_failed, d.nothing_changed) {
        (_, true, _) => exit::RESTORE_FAILED,
        (true, false, _) => exit::OK,
        (false, false, true) => exit::REFUSED,
        (false, false, false) => exit::FAILED,
    }
}

/// One event as its JSON line.
pub fn to_json(ev: &convoy_proto::RolloutEvent) -> Option<Value> {
    let id = &ev.rollout_id;
    Some(match ev.body.as_ref()? {
        Body::Plan(p) => json!({
            "type": "plan",
            "rollout_id": id,
            "hosts": p.hosts,
            "skipped_hosts": p.skipped_hosts,
            "batches": p.batches.iter().map(|b| json!({"hosts": b.hosts, "bake_ms": b.bake_ms})).collect::<Vec<_>>(),
            "strategy": p.strategy,
            "failure_budget": p.failure_budget,
            "digest": p.digest,
        }),
        Body::Note(n) => json!({"type": "note", "rollout_id": id, "message": n.message}),
        Body::HostEvent(h) => {
            let e = h.event.as_ref()?;
            json!({
                "type": "host_event",
                "rollout_id": id,
                "host": h.host,
                "op_id": e.op_id,
                "step": e.step,
                "kind": kind_name(e.kind),
                "message": e.message,
                "at_unix_ms": e.at_unix_ms,
            })
        }
        Body::HostResult(h) => {
            let r = h.result.as_ref()?;
            json!({
                "type": "host_result",
                "rollout_id": id,
                "host": h.host,
                "op_id": r.op_id,
                "version": r.version,
                "outcome": outcome_name(r.outcome),
                "reason": r.reason,
                "restore_detail": r.restore_detail,
            })
        }
        Body::Measurement(m) => {
            let mut v = serde_json::to_value(super::render::MeasurementJson::from(m.clone())).ok()?;
            v["type"] = json!("measurement");
            v["rollout_id"] = json!(id);
            v
        }
        Body::Preflight(p) => json!({
            "type": "preflight",
            "rollout_id": id,
            "hosts": p.hosts.iter().map(|h| json!({
                "host": h.host,
                "checks": h.checks.iter().map(|c| json!({"name": c.name, "passed": c.passed, "detail": c.detail})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
        Body::Done(d) => json!({
            "type": "done",
            "rollout_id": id,
            "succeeded": d.succeeded,
            "reason": d.reason,
            "failed_host": Some(&d.failed_host).filter(|h| !h.is_empty()),
            "failed_hosts": d.failed_hosts,
            "rolled_back_hosts": d.rolled_back_hosts,
            "untouched_hosts": d.untouched_hosts,
            "rollback_failed": d.rollback_failed,
            "nothing_changed": d.nothing_changed,
            "exit_code": exit_code(d),
        }),
    })
}
