//! Health checks: each check in an app's policy must pass, and keep passing
//! for `min_healthy_time`, before `healthy_deadline` runs out.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use convoy_common::spec::{CheckKind, HealthCheck, HealthPolicy};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

use crate::systemd::Systemd;

/// A check's verdict, with the reason an operator reads.
pub type Verdict = Result<String, String>;

/// Restart counts taken right after the restart, so that a unit systemd
/// restarts on its own during the window counts as unhealthy.
pub type RestartBaseline = HashMap<String, u32>;

pub async fn baseline(systemd: &Systemd, policy: &HealthPolicy) -> RestartBaseline {
    let mut out = HashMap::new();
    for c in &policy.checks {
        if let CheckKind::Systemd { unit } = &c.kind {
            if let Ok(s) = systemd.state(unit).await {
                if let Some(n) = s.n_restarts {
                    out.insert(unit.clone(), n);
                }
            }
        }
    }
    out
}

pub async fn run_check(systemd: &Systemd, check: &HealthCheck, base: &RestartBaseline, root: &Path) -> Verdict {
    let what = check.kind.describe();
    let started = std::time::Instant::now();
    let verdict = match timeout(check.timeout, run_inner(systemd, &check.kind, base, root)).await {
        Ok(v) => v,
        Err(_) => Err(format!("{what}: no answer within {:?}", check.timeout)),
    };
    crate::metrics::get().health_check(check.kind.type_name(), verdict.is_ok(), started.elapsed());
    verdict
}

async fn run_inner(systemd: &Systemd, kind: &CheckKind, base: &RestartBaseline, root: &Path) -> Verdict {
    match kind {
        CheckKind::Http {
            url,
            expect_status,
            body_contains,
        } => http_check(url, *expect_status, body_contains.as_deref()).await,
        CheckKind::Systemd { unit } => {
            let s = systemd.state(unit).await.map_err(|e| format!("systemd {unit}: {e}"))?;
            if s.active != "active" {
                return Err(format!("systemd {unit}: ActiveState is {} ({})", s.active, s.sub));
            }
            if let (Some(now), Some(before)) = (s.n_restarts, base.get(unit)) {
                if now != *before {
                    return Err(format!(
                        "systemd {unit}: restarted by systemd {} time(s) during the check window",
                        now - before
                    ));
                }
            }
            Ok(format!("systemd {unit}: active"))
        }
        CheckKind::Tcp { address } => {
            TcpStream::connect(address.as_str())
                .await
                .map_err(|e| format!("tcp {address}: connect: {e}"))?;
            Ok(format!("tcp {address}: connected"))
        }
        CheckKind::Command { argv } => {
            let what = format!("command {}", argv.join(" "));
            let out = crate::hooks::command(argv, root)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            if out.status.success() {
                Ok(format!("{what}: exit 0"))
            } else {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let last = stderr.lines().last().unwrap_or("").trim();
                Err(format!("{what}: {} {last}", out.status).trim_end().to_owned())
            }
        }
    }
}

async fn http_check(url: &str, expect: u16, body_contains: Option<&str>) -> Verdict {
    let r = convoy_common::http::send(convoy_common::http::Request {
        method: hyper::Method::GET,
        url,
        json: None,
        tls: None,
        body_limit: if body_contains.is_some() { 64 * 1024 } else { 0 },
        timeout: None, // the check's own timeout bounds it
    })
    .await
    .map_err(|e| format!("http {url}: {e}"))?;
    if r.status != expect {
        return Err(format!("http {url}: status {}, expected {expect}", r.status));
    }
    if let Some(needle) = body_contains {
        if !String::from_utf8_lossy(&r.body).contains(needle) {
            return Err(format!("http {url}: body does not contain {needle:?}"));
        }
    }
    Ok(format!("http {url}: {}", r.status))
}

/// Waits until every check passes continuously for `min_healthy_time`;
/// fails with the last reason once `healthy_deadline` passes. `progress`
/// hears each change of verdict.
pub async fn wait_healthy(
    systemd: &Systemd,
    policy: &HealthPolicy,
    base: &RestartBaseline,
    root: &Path,
    mut progress: impl FnMut(&Verdict),
) -> Verdict {
    let start = Instant::now();
    let deadline = start + policy.healthy_deadline;
    let tick = policy
        .checks
        .iter()
        .map(|c| c.interval)
        .min()
        .unwrap_or(Duration::from_millis(500));
    let mut healthy_since: Option<Instant> = None;
    let mut last: Option<Verdict> = None;
    loop {
        let mut verdict: Verdict = Ok(String::new());
        let mut passed = Vec::new();
        for c in &policy.checks {
            match run_check(systemd, c, base, root).await {
                Ok(m) => passed.push(m),
                Err(m) => {
                    verdict = Err(m);
                    break;
                }
            }
        }
        if verdict.is_ok() {
            verdict = Ok(if passed.is_empty() {
                "no health checks declared".to_owned()
            } else {
                passed.join("; ")
            });
        }
        let now = Instant::now();
        match &verdict {
            Ok(_) => {
                let since = *healthy_since.get_or_insert(now);
                if now - since >= policy.min_healthy_time {
                    return Ok(format!(
                        "{} (healthy for {:?})",
                        verdict.unwrap_or_default(),
                        policy.min_healthy_time
                    ));
                }
            }
            Err(_) => healthy_since = None,
        }
        if last.as_ref() != Some(&verdict) {
            progress(&verdict);
            last = Some(verdict.clone());
        }
        if now >= deadline {
            return Err(match verdict {
                Err(m) => format!("{m} (deadline {:?} passed)", policy.healthy_deadline),
                Ok(_) => format!(
                    "healthy, but not for min_healthy_time {:?} before the deadline {:?}",
                    policy.min_healthy_time, policy.healthy_deadline
                ),
            });
        }
        sleep(tick.min(deadline - now)).await;
    }
}
