//! `convoy deploy --dry-run`: what the deploy would decide, as text or JSON.

use serde::Serialize;

use super::render::MeasurementJson;
use super::{exit, Failure};

#[derive(Serialize)]
struct PlanJson {
    would_start: bool,
    hosts: Vec<String>,
    skipped_hosts: Vec<String>,
    strategy: String,
    failure_budget: u32,
    digest: String,
    batches: Vec<BatchJson>,
    verdicts: Vec<VerdictJson>,
    preflight: Vec<HostPreflightJson>,
    gates: Vec<MeasurementJson>,
}

#[derive(Serialize)]
struct BatchJson {
    hosts: Vec<String>,
    bake_ms: u64,
}

#[derive(Serialize)]
struct VerdictJson {
    name: String,
    passed: bool,
    detail: String,
}

#[derive(Serialize)]
struct HostPreflightJson {
    host: String,
    checks: Vec<VerdictJson>,
}

pub fn print(title: &str, reply: convoy_proto::DeployPlanReply, json: bool) -> Result<(), Failure> {
    let plan = reply.plan.unwrap_or_default();
    let gate_lines: Vec<String> = reply.gates.iter().map(super::render::measurement_line).collect();
    let table = super::render::preflight_table(&convoy_proto::PreflightReport {
        hosts: reply.preflight.clone(),
    });
    let out = PlanJson {
        would_start: reply.would_start,
        hosts: plan.hosts,
        skipped_hosts: plan.skipped_hosts,
        strategy: plan.strategy,
        failure_budget: plan.failure_budget,
        digest: plan.digest,
        batches: plan
            .batches
            .into_iter()
            .map(|b| BatchJson {
                hosts: b.hosts,
                bake_ms: b.bake_ms,
            })
            .collect(),
        verdicts: reply
            .verdicts
            .into_iter()
            .map(|v| VerdictJson {
                name: v.name,
                passed: v.passed,
                detail: v.detail,
            })
            .collect(),
        preflight: reply
            .preflight
            .into_iter()
            .map(|h| HostPreflightJson {
                host: h.host,
                checks: h
                    .checks
                    .into_iter()
                    .map(|c| VerdictJson {
                        name: c.name,
                        passed: c.passed,
                        detail: c.detail,
                    })
                    .collect(),
            })
            .collect(),
        gates: reply.gates.into_iter().map(Into::into).collect(),
    };
    if json {
        super::print_json(&out);
    } else {
        println!("dry run of {title}: nothing was changed");
        println!("  {} host(s), {}", out.hosts.len(), out.strategy);
        for (i, b) in out.batches.iter().enumerate() {
            let bake = match b.bake_ms {
                0 => String::new(),
                ms => format!(
                    ", then bake {}",
                    humantime::format_duration(std::time::Duration::from_millis(ms))
                ),
            };
            println!("  batch {}: {}{bake}", i + 1, b.hosts.join(", "));
        }
        if out.failure_budget > 0 {
            println!("  failure budget: {} host(s)", out.failure_budget);
        }
        if !out.skipped_hosts.is_empty() {
            println!("  skipped (not connected): {}", out.skipped_hosts.join(", "));
        }
        println!("rules:");
        for v in &out.verdicts {
            println!(
                "  {:<4}  {:<18}  {}",
                if v.passed { "ok" } else { "FAIL" },
                v.name,
                v.detail
            );
        }
        let failed = out.preflight.iter().any(|h| h.checks.iter().any(|c| !c.passed));
        if failed {
            println!("{table}");
        } else if !out.preflight.is_empty() {
            let hosts: Vec<&str> = out.preflight.iter().map(|h| h.host.as_str()).collect();
            println!("pre-flight passed on {}", hosts.join(", "));
        }
        if !gate_lines.is_empty() {
            println!("metric gates now (before: every target; then the first batch against the rest):");
            for l in &gate_lines {
                println!("{l}");
            }
        }
        println!(
            "the deploy {}",
            if out.would_start {
                "would start"
            } else {
                "would be refused"
            }
        );
    }
    if out.would_start {
        Ok(())
    } else {
        Err(Failure::new(
            exit::REFUSED,
            format!("{title} would be refused (dry run: nothing was changed)"),
        ))
    }
}
