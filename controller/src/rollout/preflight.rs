//! Pre-flight: before a deploy moves any byte, every target is asked
//! whether it can take the release (free space for it, memory, the app's
//! units, the spec's dependency checks), and an agent too old to answer
//! fails its check. One failing target refuses the whole deploy; nothing
//! is staged or switched anywhere.

use convoy_common::ops::{PreflightCheck, PreflightCommand, PROTOCOL};
use convoy_common::spec::AppSpec;
use convoy_common::HostName;
use futures::future::join_all;
use tokio::sync::Semaphore;

use super::seams::RolloutRef;
use super::store::{Release, ReleaseContents};
use super::Engine;

/// One target's pre-flight checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPreflight {
    pub host: HostName,
    pub checks: Vec<PreflightCheck>,
}

impl HostPreflight {
    pub fn failed(&self) -> impl Iterator<Item = &PreflightCheck> {
        self.checks.iter().filter(|c| !c.passed)
    }
}

/// What each target is asked (its `op_id` is set per host).
pub fn command(spec: &AppSpec, release: &Release, contents: Option<&ReleaseContents>) -> PreflightCommand {
    // The artifact is downloaded, then unpacked beside it. A release
    // pushed before convoy recorded its unpacked size counts as its
    // artifact's size.
    let unpacked = contents.map_or(release.size, |c| c.unpacked_bytes);
    PreflightCommand {
        op_id: String::new(),
        app: spec.install.app.clone(),
        needed_bytes: release.size + unpacked + spec.preflight.free_space_margin,
        min_memory_bytes: spec.preflight.min_memory,
        units: match &spec.install.blue_green {
            // Each slot runs an instance of the template.
            Some(_) => spec
                .install
                .units
                .iter()
                .flat_map(|u| convoy_common::slots::Slot::BOTH.map(|s| convoy_common::slots::instance(u, s)))
                .collect(),
            None => spec.install.units.clone(),
        },
        units_in_release: contents.map(|c| c.units.clone()).unwrap_or_default(),
        checks: spec.preflight.checks.clone(),
        install_path: spec.install.install_path.clone(),
    }
}

fn check(name: &str, passed: bool, detail: String) -> PreflightCheck {
    PreflightCheck {
        name: name.to_owned(),
        passed,
        detail,
    }
}

impl Engine {
    /// Asks every target, at most `prestage_parallel` at once.
    pub(super) async fn preflight(
        &self,
        rollout: &RolloutRef,
        cmd: &PreflightCommand,
        targets: &[HostName],
    ) -> Vec<HostPreflight> {
        let hosts = &self.fleet.hosts();
        let permits = &Semaphore::new(self.cfg.prestage_parallel);
        join_all(targets.iter().map(|h| async move {
            let _permit = permits.acquire().await.expect("semaphore open");
            let protocol = hosts.iter().find(|f| f.name == *h).map_or(0, |f| f.protocol);
            let mut checks = vec![];
            if protocol < PROTOCOL {
                checks.push(check(
                    "agent protocol",
                    false,
                    format!(
                        "the agent speaks protocol {protocol}; this controller needs {PROTOCOL} or later: upgrade convoy-agent on {h}"
                    ),
                ));
            } else {
                checks.push(check("agent protocol", true, format!("{protocol}")));
                let mut c = cmd.clone();
                c.op_id = format!("{}:preflight:{h}", rollout.id);
                match self.fleet.preflight(h, c).await {
                    Ok(answers) => checks.extend(answers),
                    Err(e) => checks.push(check("answer", false, e)),
                }
            }
            // The load balancer answers and knows the host.
            if rollout.traffic.is_some() {
                match self.steps.check(rollout, h).await {
                    Ok(detail) => checks.push(check("traffic", true, detail)),
                    Err(e) => checks.push(check("traffic", false, e)),
                }
            }
            HostPreflight {
                host: h.clone(),
                checks,
            }
        }))
        .await
    }
}

/// Why a deploy is refused: every failed check of every target.
pub fn refusal(results: &[HostPreflight]) -> Option<String> {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| {
            let checks: Vec<String> = r.failed().map(|c| format!("{} ({})", c.name, c.detail)).collect();
            (!checks.is_empty()).then(|| format!("{}: {}", r.host, checks.join(", ")))
        })
        .collect();
    (!failed.is_empty()).then(|| {
        format!(
            "pre-flight failed on {} of {} host(s), nothing was staged or switched: {}",
            failed.len(),
            results.len(),
            failed.join("; ")
        )
    })
}
