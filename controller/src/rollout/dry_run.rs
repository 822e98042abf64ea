//! `convoy deploy --dry-run`: everything a deploy would decide, with no
//! side effect. It plans exactly as `start_deploy` does (the same
//! `plan_deploy`), asks every target's pre-flight (read-only on the host)
//! and measures the metric gates once, for the first batch against the
//! rest; it records no rollout and sends no host anything that changes it.

use convoy_common::analysis::Measurement;

use super::analysis::{Analyzer, Sides, Subject};
use super::events::Plan;
use super::order::DeployOrder;
use super::preflight::HostPreflight;
use super::run::Kind;
use super::seams::RolloutRef;
use super::{Engine, Refused};

pub struct DryRun {
    pub plan: Plan,
    /// Each rule that may hold the deploy back: what lets it through, or
    /// why it would be refused.
    pub verdicts: Vec<(&'static str, Result<String, String>)>,
    pub preflight: Vec<HostPreflight>,
    /// The gates' queries over every target now, then for the first batch
    /// against the rest (today's release on both sides).
    pub gates: Vec<Measurement>,
}

impl DryRun {
    /// Whether the real deploy would start and move its first batch.
    pub fn would_start(&self) -> bool {
        self.verdicts.iter().all(|(_, v)| v.is_ok()) && self.preflight.iter().all(|h| h.failed().next().is_none())
    }
}

impl Engine {
    pub async fn dry_run(&self, who: &str, o: &DeployOrder) -> Result<DryRun, Refused> {
        let p = self.plan_deploy(who, o).await?;
        let mut verdicts: Vec<(&'static str, Result<String, String>)> = p
            .verdicts
            .into_iter()
            .map(|g| (g.name, g.verdict.map_err(|e| e.to_string())))
            .collect();
        let Kind::Deploy {
            cmd,
            preflight,
            analysis,
            traffic,
            ..
        } = &p.kind
        else {
            unreachable!("plan_deploy plans deploys")
        };
        let rollout = RolloutRef {
            id: format!("dryrun-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            app: o.app.clone(),
            env: o.env.clone(),
            traffic: traffic.as_deref().cloned(),
            blue_green: cmd.spec.blue_green.clone(),
        };
        let targets = p.plan.hosts.clone();
        let preflight = match preflight {
            Some(cmd) => self.preflight(&rollout, cmd, &targets).await,
            None => vec![],
        };
        let mut gates = vec![];
        if let (Some(spec), Some(source)) = (analysis, &self.metrics) {
            let subject = Subject {
                app: o.app.to_string(),
                env: o.env.clone(),
                version: o.version.to_string(),
            };
            let mut analyzer = Analyzer::new((**spec).clone(), subject, source.clone());
            match analyzer.prepare(&targets).await {
                Ok(before) => {
                    gates.extend(before);
                    let first = p.plan.batches.first().map(|b| b.hosts.clone()).unwrap_or_default();
                    let baseline = targets.iter().filter(|h| !first.contains(h)).cloned().collect();
                    gates.extend(analyzer.round(&Sides { moved: first, baseline }).await);
                }
                Err(why) => verdicts.push((
                    "metric queries",
                    Err(format!("refused before any host was touched: analysis: {why}")),
                )),
            }
        }
        Ok(DryRun {
            plan: p.plan,
            verdicts,
            preflight,
            gates,
        })
    }
}
