//! Kill tests: the agent is killed with SIGKILL at every step boundary of an
//! activation and of a restore (failpoints, agent built with
//! `--features failpoints`), and at random instants, over more than 50
//! activations on booted hosts. After each kill systemd restarts the agent;
//! the host must end on a complete release that passes its health check,
//! and the rollout must end with an honest result.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convoy_tests::{Host, Testbed};

/// Every step boundary of an activation (agent/src/activate/), and the
/// instant after its result is journaled and before it is reported.
const ACTIVATION_POINTS: [&str; 10] = [
    "stage-begin",
    "after-fetch",
    "after-unpack",
    "after-stage",
    "before-switch",
    "after-switch",
    "after-restart",
    "after-check",
    "after-commit",
    RESULT_JOURNALED,
];
/// Reached by every result; pre-staging's comes first, so this point is
/// armed to let one pass and kill at the activation's.
const RESULT_JOURNALED: &str = "result-journaled";
/// Step boundaries of a restore; reached by deploying an unhealthy release.
const RESTORE_POINTS: [&str; 2] = ["restore-begin", "restore-after-switch"];
const RANDOM_KILLS_PER_HOST: u64 = 6;
const HOSTS: usize = 3;

/// Every case deploys a fresh version, so every case fetches and unpacks
/// (a version staged by an earlier case would skip those steps).
const FIRST: &str = "1.0.0";
const CASES_PER_HOST: usize = ACTIVATION_POINTS.len() + RESTORE_POINTS.len() + RANDOM_KILLS_PER_HOST as usize;

fn fresh(case: usize) -> String {
    format!("2.0.{case}")
}
const BAD: &str = "9.9.9";

#[derive(Debug)]
enum Kill {
    At(&'static str),
    AfterMs(u64),
}

struct CaseResult {
    host: String,
    kill: String,
    from: String,
    target: String,
    exit: i32,
    end: String,
    problem: Option<String>,
}

fn host_app(bed: &Testbed, host: &str) -> Result<serde_json::Value> {
    let status = bed.status()?;
    Ok(Testbed::host_status(&status, host)?.clone())
}

fn wait_deploy(mut child: Child, timeout: Duration) -> Result<(i32, String)> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let out = child.wait_with_output()?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return Ok((status.code().unwrap_or(-1), text));
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            bail!("deploy did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The end state every kill must leave: connected, no operation in flight,
/// the install path on the journal's current release, the unit active, the
/// app serving that version and healthy.
fn check_end_state(bed: &Testbed, host: &Host, allowed: &[&str]) -> Result<String> {
    let start = Instant::now();
    let app = loop {
        let h = host_app(bed, &host.name)?;
        if h["connected"] == true && h["app"]["inflight_op"].is_null() {
            break h["app"].clone();
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("host did not settle: {h}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let current = app["current"].as_str().context("no current release")?.to_owned();
    if !allowed.contains(&current.as_str()) {
        bail!("ended on {current}, expected one of {allowed:?}");
    }
    let link = host.exec_ok(&["readlink", "/opt/demo"])?;
    if link.trim() != format!("/var/lib/convoy/apps/demo/releases/{current}") {
        bail!("/opt/demo -> {} but the journal says {current}", link.trim());
    }
    let tree = host.exec_ok(&[
        "cat",
        &format!("/var/lib/convoy/apps/demo/releases/{current}/release.toml"),
    ])?;
    if !tree.contains(&format!("version = \"{current}\"")) {
        bail!("release tree of {current} is incomplete: {tree}");
    }
    // The unit may still be settling after a restore; give it the app's deadline.
    let start = Instant::now();
    loop {
        let active = host.unit_property("demo.service", "ActiveState")?;
        let serving = host.serving();
        let health = host.http_get("/health").map(|(s, _)| s);
        if active == "active" && serving.as_deref() == Some(current.as_str()) && health == Some(200) {
            return Ok(current);
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("unit {active}, serving {serving:?}, /health {health:?}; expected {current} healthy");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_case(bed: &Testbed, host: &Host, env: &str, case: usize, kill: Kill) -> Result<CaseResult> {
    let from = host_app(bed, &host.name)?["app"]["current"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let restore_case = matches!(kill, Kill::At(p) if RESTORE_POINTS.contains(&p));
    let target = if restore_case { BAD.to_owned() } else { fresh(case) };
    match kill {
        Kill::At(RESULT_JOURNALED) => host.set_failpoint_action(RESULT_JOURNALED, "1*off->return")?,
        Kill::At(point) => host.set_failpoint(Some(point))?,
        Kill::AfterMs(_) => host.set_failpoint(None)?,
    }
    bed.wait_host_connected(&host.name)?;
    let child = bed.convoy_spawn(&["deploy", "demo", &target, "--env", env])?;
    if let Kill::AfterMs(ms) = kill {
        std::thread::sleep(Duration::from_millis(ms));
        host.kill_agent()?;
    }
    let (exit, output) = wait_deploy(child, Duration::from_secs(120))?;
    let mut problem = None;
    if let Kill::At(point) = kill {
        if !host.failpoint_fired(point) {
            problem = Some(format!("failpoint {point} never fired"));
        }
    }
    if exit != 0 && exit != 1 {
        problem = Some(format!("deploy exited {exit}: {output}"));
    }
    let allowed: Vec<&str> = if restore_case {
        vec![&from]
    } else {
        vec![&from, &target]
    };
    let end = match check_end_state(bed, host, &allowed) {
        Ok(v) => v,
        Err(e) => {
            problem.get_or_insert(format!("bad end state: {e:#}\n{output}"));
            "?".into()
        }
    };
    // The deploy's exit code must match where the host ended.
    if problem.is_none() && (exit == 0) != (end == target) {
        problem = Some(format!("deploy exited {exit} but the host ended on {end}:\n{output}"));
    }
    Ok(CaseResult {
        host: host.name.clone(),
        kill: match kill {
            Kill::At(p) => format!("failpoint {p}"),
            Kill::AfterMs(ms) => format!("kill -9 after {ms} ms"),
        },
        from,
        target,
        exit,
        end,
        problem,
    })
}

/// A small deterministic generator, so a failing run can be repeated.
fn delays(seed: u64, n: u64) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % 4000
        })
        .collect()
}

#[test]
fn kill_agent_at_every_step_and_at_random_instants() -> Result<()> {
    // One environment per host, so the hosts are killed independently.
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/demo.toml"))?
        .replace("units = [", "promotion = false\nunits = [");
    let bed = Testbed::boot_spec(HOSTS, |i| format!("kill{i}"), &spec)?;
    bed.push_demo(FIRST, "healthy")?;
    for case in 0..CASES_PER_HOST {
        bed.push_demo(&fresh(case), "healthy")?;
    }
    bed.push_demo(BAD, "unhealthy")?;
    for i in 1..=HOSTS {
        bed.convoy_ok(&["deploy", "demo", FIRST, "--env", &format!("kill{i}")])?;
    }
    let seed = std::env::var("CONVOY_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261122);
    println!("random kill seed {seed} (set CONVOY_KILL_SEED to repeat)");

    let results: Vec<CaseResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = bed
            .hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let bed = &bed;
                scope.spawn(move || -> Result<Vec<CaseResult>> {
                    let env = format!("kill{}", i + 1);
                    let mut cases: Vec<Kill> = ACTIVATION_POINTS
                        .iter()
                        .chain(&RESTORE_POINTS)
                        .map(|p| Kill::At(p))
                        .collect();
                    cases.extend(
                        delays(seed + i as u64, RANDOM_KILLS_PER_HOST)
                            .into_iter()
                            .map(Kill::AfterMs),
                    );
                    cases
                        .into_iter()
                        .enumerate()
                        .map(|(c, k)| run_case(bed, host, &env, c, k))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("host thread"))
            .collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();

    println!("| host | injection | from | to | deploy exit | ended on | verdict |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &results {
        let verdict = r
            .problem
            .as_deref()
            .map(|p| p.lines().next().unwrap_or("").to_owned())
            .unwrap_or("ok".into());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.host, r.kill, r.from, r.target, r.exit, r.end, verdict
        );
    }
    let bad: Vec<&CaseResult> = results.iter().filter(|r| r.problem.is_some()).collect();
    println!("injections: {}, bad end states: {}", results.len(), bad.len());
    assert!(results.len() >= 50, "at least 50 activations");
    for b in &bad {
        eprintln!("{} / {}: {}", b.host, b.kill, b.problem.as_deref().unwrap_or(""));
    }
    // The panic message names each bad case first, so it survives when
    // only the tail of the output is kept.
    let summary: Vec<String> = bad
        .iter()
        .map(|b| {
            let first = b.problem.as_deref().unwrap_or("").lines().next().unwrap_or("");
            format!("{} / {}: {}", b.host, b.kill, first)
        })
        .collect();
    assert!(bad.is_empty(), "{} bad end states:\n{}", bad.len(), summary.join("\n"));
    Ok(())
}

/// Operators restart agents, crashes come in bursts, and a kill test makes
/// both happen: whatever the count in a short time, systemd must keep
/// bringing the agent back (a host whose agent gave up would keep a broken
/// activation unrepaired until someone noticed).
#[test]
fn agent_comes_back_after_a_burst_of_restarts() -> Result<()> {
    let bed = Testbed::boot(1)?;
    let host = &bed.hosts[0];
    // More starts within 10 s than systemd's default start limit (5).
    for _ in 0..4 {
        host.exec_ok(&["systemctl", "restart", "convoy-agent.service"])?;
    }
    for _ in 0..4 {
        let before = host.unit_property("convoy-agent.service", "MainPID")?;
        host.kill_agent()?;
        let start = Instant::now();
        loop {
            let pid = host.unit_property("convoy-agent.service", "MainPID")?;
            let state = host.unit_property("convoy-agent.service", "ActiveState")?;
            if pid != "0" && pid != before && state == "active" {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("agent not back 10 s after a kill: ActiveState={state} MainPID={pid}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    bed.wait_host_connected(&host.name)?;
    Ok(())
}
