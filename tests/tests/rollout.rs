//! Rollout strategies, failure budget, manual rollback, promotion and the
//! audit trail, on five booted hosts.

use anyhow::Result;
use convoy_tests::testbed::{canary_deploy, line_feed, rollout_id, wait_line};
use convoy_tests::webhook::webhook_receiver;
use convoy_tests::Testbed;

fn fetches(bed: &Testbed) -> usize {
    bed.controller_log()
        .lines()
        .filter(|l| l.contains("streaming artifact"))
        .count()
}

/// `n` hosts on 1.0.0, with 2.0.0 pushed and ready to roll.
fn fleet_on_v1(n: usize) -> Result<Testbed> {
    on_v1(Testbed::boot(n)?)
}

fn on_v1(bed: Testbed) -> Result<Testbed> {
    bed.push_demo("1.0.0", "healthy")?;
    bed.deploy_everywhere("1.0.0")?;
    bed.push_demo("2.0.0", "healthy")?;
    Ok(bed)
}

#[test]
fn canary_budget_halt_and_manual_rollback() -> Result<()> {
    let bed = Testbed::boot(5)?;
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        bed.push_demo(v, "healthy")?;
    }
    // All at once, pre-staged everywhere before anything switches.
    let out = bed.deploy_everywhere("1.0.0")?;
    let staged = out.find("-- pre-staged on 5 host(s)").expect(&out);
    assert!(
        out.find("switch   started").unwrap() > staged,
        "switched before pre-staging ended:\n{out}"
    );
    assert_eq!(bed.serving(), ["1.0.0"; 5]);

    // Canary: 20% (one host), bake, then the rest.
    let out = bed.convoy_ok(&canary_deploy("2.0.0", "20%,100%", "2s"))?;
    assert!(out.contains("batch 1: host1, then bake 2s"), "{out}");
    assert!(out.contains("batch 2: host2, host3, host4, host5"), "{out}");
    assert!(out.contains("-- baking for 2s"), "{out}");
    assert_eq!(bed.serving(), ["2.0.0"; 5]);
    let id = rollout_id(&out);
    let detail = bed.history(&["--rollout", &id])?;
    let at = |host: &str, step: &str| -> i64 {
        detail["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["host"] == host && e["step"] == step && e["kind"] == "started")
            .and_then(|e| e["at_unix_ms"].as_i64())
            .unwrap_or_else(|| panic!("no {step} event for {host}"))
    };
    let commit1 = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["host"] == "host1" && e["step"] == "commit");
    let commit1 = commit1.and_then(|e| e["at_unix_ms"].as_i64()).unwrap();
    assert!(
        at("host2", "switch") - commit1 >= 2000,
        "the canary stage baked 2s before the rest"
    );

    // Batches of 2 with a budget of 0: host3 fails in batch 2, so the
    // rollout halts and every host it moved goes back to 2.0.0.
    bed.hosts[2].exec_ok(&["sh", "-c", "echo 3.0.0 > /etc/demo-unhealthy"])?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging", "--batch-size", "2"])?;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("failed on host3"), "{}", out.stderr);
    assert!(
        out.stderr.contains("rolled back: host1, host2, host4"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("hosts not touched: host5"), "{}", out.stderr);
    assert_eq!(bed.serving(), ["2.0.0"; 5]);
    bed.hosts[2].exec_ok(&["rm", "/etc/demo-unhealthy"])?;
    let h = bed.history(&["demo"])?;
    assert_eq!(h["rollouts"][0]["state"], "rolled_back");
    assert_eq!(h["rollouts"][0]["strategy"], "rolling, batches of 2");

    // Manual rollback to an older release each host still holds: a local
    // switch, nothing downloaded.
    let before = fetches(&bed);
    let out = bed.convoy_ok(&["rollback", "demo", "--env", "staging", "--to", "1.0.0"])?;
    assert!(out.contains("already on this host"), "{out}");
    assert_eq!(bed.serving(), ["1.0.0"; 5]);
    assert_eq!(fetches(&bed), before, "a rollback must not download anything");

    // Refused before touching anything when the target was never pushed
    // (a host that does not hold it is refused likewise: the engine's tests).
    let out = bed.convoy(&["rollback", "demo", "--env", "staging", "--to", "0.9.0"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr
            .contains("rollback refused, nothing was changed: demo 0.9.0 was never pushed"),
        "{}",
        out.stderr
    );
    assert_eq!(bed.serving(), ["1.0.0"; 5]);

    // One host back to its own previous release.
    bed.convoy_ok(&["rollback", "demo", "--env", "staging", "--hosts", "host1"])?;
    assert_eq!(bed.serving(), ["2.0.0", "1.0.0", "1.0.0", "1.0.0", "1.0.0"]);
    let h = bed.history(&["demo"])?;
    assert_eq!(h["rollouts"][0]["kind"], "rollback");

    // The report: three deploys, one rolled back and then restored by the
    // manual rollback.
    let report: serde_json::Value = serde_json::from_str(&bed.convoy_ok(&["report", "demo", "--output", "json"])?)?;
    assert_eq!(
        (report["deploys"].as_u64(), report["failed_deploys"].as_u64()),
        (Some(3), Some(1)),
        "{report}"
    );
    assert!(
        (report["change_failure_rate"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{report}"
    );
    assert_eq!(report["restores_measured"], 1, "{report}");
    assert!(report["mean_time_to_restore_secs"].as_f64().unwrap() > 0.0, "{report}");
    assert!(bed
        .convoy_ok(&["report", "demo"])?
        .contains("change failure rate:  33%"));
    assert_eq!(h["rollouts"][0]["operator"], "operator operator (deployer)");
    Ok(())
}

#[test]
fn promotion_rule_hotfix_and_audit() -> Result<()> {
    let envs = ["development", "staging", "production"];
    let host_envs = ["development", "staging", "staging", "production", "production"];
    let bed = Testbed::boot_with(5, |i| host_envs[i - 1].to_owned())?;
    bed.push_demo("1.0.0", "healthy")?;

    let out = bed.convoy(&["deploy", "demo", "1.0.0", "--env", "production"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains("demo 1.0.0 has not completed in staging"),
        "{}",
        out.stderr
    );
    assert_eq!(bed.serving(), ["-"; 5], "nothing deployed");

    let out = bed.convoy(&["deploy", "demo", "1.0.0", "--env", "production", "--hotfix"])?;
    assert_eq!(out.code, 2, "--hotfix needs --reason: {out:?}");

    bed.convoy_ok(&[
        "deploy",
        "demo",
        "1.0.0",
        "--env",
        "production",
        "--hotfix",
        "--reason",
        "CVE-2026-1234",
    ])?;
    assert_eq!(bed.serving(), ["-", "-", "-", "1.0.0", "1.0.0"], "production only");
    let h = bed.history(&["demo"])?;
    assert_eq!(h["rollouts"][0]["hotfix_reason"], "CVE-2026-1234");
    assert_eq!(h["rollouts"][0]["environment"], "production");
    assert_eq!(h["rollouts"][0]["operator"], "operator operator (deployer)");
    let text = bed.convoy_ok(&["history", "demo"])?;
    assert!(text.contains("hotfix: CVE-2026-1234"), "{text}");

    // The regular path: development, then staging, then production.
    bed.push_demo("2.0.0", "healthy")?;
    for env in envs {
        bed.convoy_ok(&["deploy", "demo", "2.0.0", "--env", env])?;
    }
    assert_eq!(bed.serving(), ["2.0.0"; 5]);
    bed.push_demo("3.0.0", "healthy")?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4);
    assert!(
        out.stderr.contains("has not completed in development"),
        "{}",
        out.stderr
    );

    // One rollout in detail: its host results and events.
    let id = h["rollouts"][0]["id"].as_str().unwrap().to_owned();
    let detail = bed.history(&["--rollout", &id])?;
    let mut results: Vec<(String, String)> = detail["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    results.sort();
    results.dedup();
    let ok = |h: &str| (h.to_owned(), "succeeded".to_owned());
    assert_eq!(
        results,
        [ok("host4"), ok("host5")],
        "pre-staging and activation, production only"
    );
    assert!(detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["step"] == "commit"));
    Ok(())
}

/// The controller is killed mid-rollout and started again: the rollout
/// resumes from its recorded results and finishes; no host is activated
/// twice and none is skipped.
#[test]
fn controller_killed_after_the_first_activation_resumes() -> Result<()> {
    controller_killed_mid_rollout(fleet_on_v1(5)?, true)
}

/// The same with the controller's state in PostgreSQL: the plan, results
/// and history it resumes from are read back from there.
#[test]
fn controller_killed_after_the_first_activation_resumes_on_postgres() -> Result<()> {
    controller_killed_mid_rollout(on_v1(Testbed::boot_on_postgres(5)?)?, true)
}

/// The same, killed while the artifact is being pre-staged: agents answer
/// the re-sent commands they already carried out with their results.
#[test]
fn controller_killed_while_pre_staging_resumes() -> Result<()> {
    controller_killed_mid_rollout(fleet_on_v1(5)?, false)
}

fn controller_killed_mid_rollout(mut bed: Testbed, after_first_activation: bool) -> Result<()> {
    let mut child = bed.convoy_spawn(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    if after_first_activation {
        // Pre-staging results look the same; wait for the batches.
        wait_line(&lines, "-- batch 1/", &mut seen)?;
    }
    wait_line(&lines, "[host1] => succeeded", &mut seen)?;
    // host1 has committed 2.0.0 (or, in the other case, has pre-staged
    // it). The controller dies now.
    let invocation = bed.hosts[0].unit_property("demo.service", "InvocationID")?;
    bed.kill_controller();
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(5), "the CLI loses the stream");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the connection to the controller was lost during rollout {id}"
        )) && stderr.contains(&format!("`convoy watch {id}`"))
            && !stderr.contains("certificate"),
        "{stderr}"
    );

    bed.start_controller()?;
    let start = std::time::Instant::now();
    let state = loop {
        let h = bed.history(&["--rollout", &id])?;
        let state = h["rollouts"][0]["state"].as_str().unwrap_or("").to_owned();
        if state != "running" {
            break state;
        }
        assert!(
            start.elapsed().as_secs() < 120,
            "rollout {id} never finished after the restart"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(state, "succeeded");
    assert_eq!(bed.serving(), ["2.0.0"; 5], "no host skipped");
    if after_first_activation {
        let now = bed.hosts[0].unit_property("demo.service", "InvocationID")?;
        assert_eq!(now, invocation, "host1's app was not restarted a second time");
    }
    let journal = bed.hosts[0].exec_ok(&["journalctl", "--no-pager", "-u", "convoy-agent"])?;
    assert_eq!(
        journal.matches("1.0.0 -> 2.0.0").count(),
        1,
        "host1 switched exactly once:\n{journal}"
    );
    let log = bed.controller_log();
    assert!(
        log.contains("resuming a rollout interrupted by a controller restart"),
        "{log}"
    );
    if bed.postgres.is_some() {
        // The state really is in PostgreSQL: no SQLite file was made, and
        // the rollout's five activations are recorded there once each.
        assert!(!bed.dir.path().join("controller/data/convoy.db").exists());
        assert_eq!(bed.recorded_activations(&id)?, 5, "activations recorded");
    }
    Ok(())
}

/// A host is cut off from the network in the middle of its activation,
/// long enough for both sides to drop the session. The agent finishes on
/// its own; when the network heals it reconnects and its outcome is
/// reconciled into the rollout, which then goes on.
#[test]
fn host_cut_off_mid_rollout_is_reconciled() -> Result<()> {
    let bed = fleet_on_v1(5)?;
    let mut child = bed.convoy_spawn(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    wait_line(&lines, "[host2] switch   started", &mut seen)?;
    // host2's port on the bridge goes down mid-activation.
    link(&bed, 1, "down")?;
    // The controller notices within its session idle limit (45 s).
    let start = std::time::Instant::now();
    let disconnected = loop {
        if !bed.status()?["hosts"][1]["connected"].as_bool().unwrap_or(true) {
            break true;
        }
        if start.elapsed() > std::time::Duration::from_secs(90) {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    link(&bed, 1, "up")?;
    assert!(disconnected, "the controller noticed host2 was gone");

    let status = child.wait()?;
    seen.extend(lines.iter());
    let out = seen.join("\n");
    assert!(status.success(), "{out}");
    assert!(
        out.contains("[host2] => succeeded"),
        "host2's own outcome reached the rollout:\n{out}"
    );
    assert!(
        out.find("[host2] => succeeded") < out.find("[host3] switch"),
        "host3 only after host2:\n{out}"
    );
    assert_eq!(bed.serving(), ["2.0.0"; 5]);
    Ok(())
}

/// Takes host `i`'s port on the bridge down (or up).
fn link(bed: &Testbed, i: usize, state: &str) -> Result<()> {
    let port = format!("vb-{}", bed.hosts[i].machine);
    let ok = std::process::Command::new("ip")
        .args(["link", "set", &port, state])
        .status()?
        .success();
    anyhow::ensure!(ok, "ip link set {port} {state} failed");
    Ok(())
}

/// Polls `what` for up to a minute.
fn eventually(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(60) {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    anyhow::bail!("timed out waiting until {what}")
}

/// A host that vanishes mid-activation under the default policy counts as
/// failed once it has been away longer than the deadline; the rollout
/// halts and rolls back what it moved. When the host comes back, its own
/// outcome (it did activate) is recorded in the rollout and, since the
/// rollout was rolled back, it is rolled back too. Under `--on-vanish
/// wait` the rollout waits for the host instead and finishes.
#[test]
fn vanished_hosts_fail_after_the_deadline_or_are_waited_for() -> Result<()> {
    let bed = fleet_on_v1(5)?;
    let mut child = bed.convoy_spawn(&["deploy", "demo", "2.0.0", "--env", "staging", "--vanish-deadline", "3s"])?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "[host2] switch   started", &mut seen)?;
    link(&bed, 1, "down")?;
    let out = child.wait_with_output();
    link(&bed, 1, "up")?;
    let out = out?;
    seen.extend(lines.try_iter());
    let stdout = seen.join("\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("-- host2 is away; it counts as failed if not back within 3s"),
        "{stdout}"
    );
    assert!(stderr.contains("host2 vanished: away for more than 3s"), "{stderr}");
    assert!(stderr.contains("rolled back: host1"), "{stderr}");

    // host2 comes back having finished its activation on its own: that is
    // recorded in the rollout, and host2 is rolled back like host1.
    eventually("host2's late result is reconciled", || {
        let h = bed.history(&["--rollout", &id])?;
        let hosts = h["hosts"].as_array().cloned().unwrap_or_default();
        let op = |op: &str| hosts.iter().any(|r| r["op_id"] == op && r["outcome"] == "succeeded");
        Ok(op(&format!("{id}:activate:host2")) && op(&format!("{id}:rollback:host2")))
    })?;
    assert_eq!(bed.serving(), ["1.0.0"; 5], "the fleet is where the rollout says");
    assert!(bed.controller_log().contains("late result reconciled into its rollout"));

    // Wait policy: host3 is away for longer than the deadline, and the
    // rollout waits for it, then finishes.
    let mut child = bed.convoy_spawn(&[
        "deploy",
        "demo",
        "2.0.0",
        "--env",
        "staging",
        "--on-vanish",
        "wait",
        "--vanish-deadline",
        "1s",
    ])?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    wait_line(&lines, "[host3] switch   started", &mut seen)?;
    link(&bed, 2, "down")?;
    let waited = wait_line(&lines, "-- host3 is away; waiting for it to come back", &mut seen);
    std::thread::sleep(std::time::Duration::from_secs(3));
    link(&bed, 2, "up")?;
    waited?;
    let status = child.wait()?;
    seen.extend(lines.try_iter());
    let stdout = seen.join("\n");
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("-- host3 is back"), "{stdout}");
    assert_eq!(bed.serving(), ["2.0.0"; 5]);
    Ok(())
}

/// A canary group chosen by label (zone=z0: host2 and host4) goes first, as its own stage; with
/// `--promote manual` every stage but the last waits for `convoy promote`.
#[test]
fn labelled_canary_group_with_manual_promotion() -> Result<()> {
    let bed = fleet_on_v1(5)?;
    let mut child = bed.convoy_spawn(&[
        "deploy",
        "demo",
        "2.0.0",
        "--env",
        "staging",
        "--strategy",
        "canary",
        "--canary-group",
        "zone=z0",
        "--stages",
        "50%,100%",
        "--promote",
        "manual",
    ])?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "waiting for `convoy promote", &mut seen)?;
    let plan = seen.join("\n");
    assert!(plan.contains("batch 1: host2, host4"), "{plan}");
    assert!(plan.contains("batch 2: host1, host3"), "{plan}");
    assert!(plan.contains("batch 3: host5"), "{plan}");
    assert_eq!(
        bed.history(&["--rollout", &id])?["rollouts"][0]["state"],
        "awaiting_promotion"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        bed.serving(),
        ["1.0.0", "2.0.0", "1.0.0", "2.0.0", "1.0.0"],
        "only the canary group moved"
    );

    // resume is not promote.
    let out = bed.convoy(&["resume", &id])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains(&format!("run `convoy promote {id}`")),
        "{}",
        out.stderr
    );
    assert!(bed.convoy_ok(&["promote", &id])?.contains("stage 1 promoted"));
    wait_line(&lines, "stage 2 is done; waiting for `convoy promote", &mut seen)?;
    assert_eq!(bed.serving(), ["2.0.0", "2.0.0", "2.0.0", "2.0.0", "1.0.0"]);
    bed.convoy_ok(&["promote", &id])?;
    let status = child.wait()?;
    seen.extend(lines.try_iter());
    assert!(status.success(), "{}", seen.join("\n"));
    assert_eq!(bed.serving(), ["2.0.0"; 5]);
    let h = bed.history(&["--rollout", &id])?;
    assert_eq!(
        h["rollouts"][0]["strategy"],
        "canary group of 2 first, then stages 50%, 100%, promoted by hand"
    );
    // Nothing to promote any more, and bad flags are refused.
    assert_eq!(bed.convoy(&["promote", &id])?.code, 4);
    let out = bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging", "--promote", "manual"])?;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("--promote manual needs --strategy canary"),
        "{}",
        out.stderr
    );
    let out = bed.convoy(&[
        "deploy",
        "demo",
        "2.0.0",
        "--env",
        "staging",
        "--canary-group",
        "zone=nowhere",
    ])?;
    assert!(
        out.stderr.contains("--canary-group zone=nowhere: no connected target"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn pause_resume_abort_and_watch() -> Result<()> {
    let bed = fleet_on_v1(3)?;
    bed.push_demo("3.0.0", "healthy")?;
    let mut seen = Vec::new();

    // Pause during batch 1: the rollout waits before batch 2.
    let mut deploy = bed.convoy_spawn(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    let lines = line_feed(&mut deploy);
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "-- batch 1/3", &mut seen)?;
    let out = bed.convoy_ok(&["pause", &id])?;
    assert!(out.contains("pausing before its next batch"), "{out}");
    wait_line(&lines, "-- paused by operator operator (deployer)", &mut seen)?;
    let h = bed.history(&["--rollout", &id])?;
    assert_eq!(h["rollouts"][0]["state"], "paused");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(bed.serving(), ["2.0.0", "1.0.0", "1.0.0"], "nothing moves while paused");

    // Another terminal watches; resume lets both finish.
    let mut watch = bed.convoy_spawn(&["watch", &id])?;
    let watched = line_feed(&mut watch);
    let mut watch_seen = Vec::new();
    wait_line(&watched, "watching rollout", &mut watch_seen)?;
    assert!(bed.convoy_ok(&["resume", &id])?.contains("running"));
    assert!(deploy.wait()?.success(), "{}", seen.join("\n"));
    assert!(watch.wait()?.success());
    watch_seen.extend(watched.try_iter());
    let watch_out = watch_seen.join("\n");
    assert!(watch_out.contains("-- resumed"), "{watch_out}");
    assert!(watch_out.contains("[host3] => succeeded"), "{watch_out}");
    assert_eq!(bed.serving(), ["2.0.0"; 3]);

    // Abort after the first batch: halt and roll back what moved.
    let mut deploy = bed.convoy_spawn(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    let lines = line_feed(&mut deploy);
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "-- batch 1/3", &mut seen)?;
    assert!(bed.convoy_ok(&["abort", &id])?.contains("aborting"));
    let out = deploy.wait_with_output()?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("aborted by operator operator (deployer)"), "{stderr}");
    assert!(stderr.contains("rolled back: host1"), "{stderr}");
    assert!(stderr.contains("hosts not touched: host2, host3"), "{stderr}");
    assert_eq!(bed.serving(), ["2.0.0"; 3]);
    assert_eq!(bed.history(&["--rollout", &id])?["rollouts"][0]["state"], "rolled_back");

    // Controls on a finished or unknown rollout are refused.
    let out = bed.convoy(&["pause", &id])?;
    assert_eq!(out.code, 4);
    assert!(
        out.stderr.contains("is not running (state: rolled_back)"),
        "{}",
        out.stderr
    );
    assert_eq!(bed.convoy(&["watch", "nosuchrollout"])?.code, 4);
    Ok(())
}

/// An environment that needs approval: the rollout waits, before any host
/// is touched, for an operator other than the one who started it.
#[test]
fn approval_by_another_operator() -> Result<()> {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/demo.toml"))?
        .replace("units = [", "approval = [\"production\"]\nunits = [");
    let bed = Testbed::boot_spec(1, |_| "production".into(), &spec)?;
    let pki = bed.dir.path().join("pki");
    bed.convoy_ok(&["pki", "issue", "operator", "olivia", "--dir", pki.to_str().unwrap()])?;
    let olivia = |args: &[&str]| bed.convoy_as(&pki.join("olivia.pem"), &pki.join("olivia.key"), args);
    bed.push_demo("1.0.0", "healthy")?;
    let mut seen = Vec::new();
    let mut deploy = bed.convoy_spawn(&["deploy", "demo", "1.0.0", "--env", "production"])?;
    let lines = line_feed(&mut deploy);
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "production needs approval", &mut seen)?;
    assert_eq!(
        bed.history(&["--rollout", &id])?["rollouts"][0]["state"],
        "awaiting_approval"
    );
    assert_eq!(bed.hosts[0].serving(), None, "nothing before approval");

    let out = bed.convoy(&["approve", &id])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains("started rollout") && out.stderr.contains("cannot approve it"),
        "{}",
        out.stderr
    );

    let out = olivia(&["approve", &id])?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(deploy.wait()?.success(), "{}", seen.join("\n"));
    assert_eq!(bed.hosts[0].serving().as_deref(), Some("1.0.0"));
    let h = bed.history(&["--rollout", &id])?;
    assert_eq!(h["rollouts"][0]["approved_by"], "operator olivia (deployer)");
    assert_eq!(h["rollouts"][0]["state"], "succeeded");

    // Aborted while waiting: refused before it touched anything.
    bed.push_demo("2.0.0", "healthy")?;
    let mut deploy = bed.convoy_spawn(&["deploy", "demo", "2.0.0", "--env", "production"])?;
    let lines = line_feed(&mut deploy);
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "needs approval", &mut seen)?;
    assert_eq!(olivia(&["abort", &id])?.code, 0);
    let out = deploy.wait_with_output()?;
    assert_eq!(out.status.code(), Some(4), "nothing changed: exit 4");
    assert!(String::from_utf8_lossy(&out.stderr).contains("aborted by operator olivia (deployer)"));
    assert_eq!(bed.hosts[0].serving().as_deref(), Some("1.0.0"));
    let h = bed.history(&["--rollout", &id])?;
    assert_eq!(h["rollouts"][0]["state"], "cancelled", "not a failed change");
    Ok(())
}

/// A TLS server config for "localhost" under a throwaway CA; returns it
/// with the CA certificate (PEM) a client must trust.
fn localhost_tls() -> Result<(std::sync::Arc<rustls::ServerConfig>, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &issuer)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    Ok((std::sync::Arc::new(config), ca_cert.pem()))
}

/// Webhooks hear a rollout start, succeed and fail, with a chat-ready
/// `text`, over http and over https (verified against `webhook_ca`); a
/// webhook that is down delays and fails nothing.
#[test]
fn webhooks_notify_and_never_block() -> Result<()> {
    let (port, hooks) = webhook_receiver(None)?;
    let (tls, ca_pem) = localhost_tls()?;
    let (tls_port, tls_hooks) = webhook_receiver(Some(tls))?;
    let mut bed = Testbed::boot(1)?;
    let ca = bed.dir.path().join("webhook-ca.pem");
    std::fs::write(&ca, ca_pem)?;
    // Nothing listens on port 1: that webhook fails on every attempt.
    bed.reconfigure_controller(&format!(
        "webhooks = [\"http://127.0.0.1:{port}/hook\", \"https://localhost:{tls_port}/hook\", \"http://127.0.0.1:1/down\"]\nwebhook_ca = {:?}",
        ca.display()
    ))?;

    bed.push_demo("1.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    let next = || hooks.recv_timeout(std::time::Duration::from_secs(15));
    let started = next()?;
    assert_eq!(started["event"], "rollout_started");
    assert_eq!(started["app"], "demo");
    assert_eq!(started["version"], "1.0.0");
    assert_eq!(started["environment"], "staging");
    assert_eq!(started["operator"], "operator operator (deployer)");
    let done = next()?;
    assert_eq!(done["event"], "rollout_succeeded");
    assert_eq!(done["rollout_id"], started["rollout_id"]);
    assert!(
        done["text"]
            .as_str()
            .unwrap()
            .contains("deploy of demo 1.0.0 to staging"),
        "{done}"
    );

    bed.push_demo("2.0.0", "unhealthy")?;
    assert_eq!(bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging"])?.code, 1);
    assert_eq!(next()?["event"], "rollout_started");
    let failed = next()?;
    assert_eq!(failed["event"], "rollout_failed");
    assert_eq!(failed["failed_hosts"], serde_json::json!(["host1"]));
    assert!(
        failed["text"].as_str().unwrap().contains("health check failed"),
        "{failed}"
    );

    // The https webhook heard the same four events.
    let over_tls: Vec<String> = (0..4)
        .map(|_| tls_hooks.recv_timeout(std::time::Duration::from_secs(15)))
        .map(|v| v.map(|v| v["event"].as_str().unwrap_or("").to_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        over_tls,
        [
            "rollout_started",
            "rollout_succeeded",
            "rollout_started",
            "rollout_failed"
        ]
    );

    // The dead webhook was retried and given up on, in the background.
    let start = std::time::Instant::now();
    while !bed.controller_log().contains("webhook gave up after 4 attempts") {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{}",
            bed.controller_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(bed.hosts[0].serving().as_deref(), Some("1.0.0"));

    // Freezes and unfreezes of an environment are heard too.
    let pki = bed.dir.path().join("pki");
    let pki_s = pki.to_str().unwrap().to_owned();
    bed.convoy_ok(&["pki", "issue", "operator", "root", "--role", "admin", "--dir", &pki_s])?;
    let (cert, key) = (pki.join("root.pem"), pki.join("root.key"));
    let out = bed.convoy_as(
        &cert,
        &key,
        &["freeze", "--env", "staging", "--reason", "incident 4711"],
    )?;
    assert_eq!(out.code, 0, "{out:?}");
    let frozen = next()?;
    assert_eq!(frozen["event"], "environment_frozen");
    assert_eq!(
        (frozen["kind"].as_str(), frozen["environment"].as_str()),
        (Some("environment"), Some("staging"))
    );
    assert_eq!(frozen["operator"], "operator root (admin)");
    assert!(frozen["text"].as_str().unwrap().contains("incident 4711"), "{frozen}");
    bed.convoy_as(&cert, &key, &["unfreeze", "--env", "staging"])?;
    assert_eq!(next()?["event"], "environment_unfrozen");
    Ok(())
}

/// `--output json` gives CI one JSON object per event, ending with the
/// result; its host events are the ones history keeps.
#[test]
fn deploy_events_as_json_lines_match_history() -> Result<()> {
    let bed = fleet_on_v1(2)?;
    bed.hosts[1].exec_ok(&["sh", "-c", "echo 2.0.0 > /etc/demo-unhealthy"])?;
    let out = bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging", "--output", "json"])?;
    assert_eq!(out.code, 1, "{out:?}");
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("not a JSON line: {l}: {e}")))
        .collect::<Result<_>>()?;
    assert_eq!(events[0]["type"], "plan", "{}", out.stdout);
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["exit_code"], 1);
    assert_eq!(done["failed_hosts"], serde_json::json!(["host2"]));
    assert_eq!(done["rolled_back_hosts"], serde_json::json!(["host1"]));
    let id = done["rollout_id"].as_str().unwrap();
    assert!(events.iter().all(|e| e["rollout_id"] == id));
    let results: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["type"] == "host_result")
        .map(|e| (e["host"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert!(results.contains(&("host2", "failed_restored")), "{results:?}");

    // The same host events as history, event for event.
    let key =
        |e: &serde_json::Value| format!("{} {} {} {}", e["host"], e["step"], e["kind"], e["message"]).replace('"', "");
    let mut streamed: Vec<String> = events.iter().filter(|e| e["type"] == "host_event").map(key).collect();
    let h = bed.history(&["--rollout", id])?;
    let mut kept: Vec<String> = h["events"].as_array().unwrap().iter().map(key).collect();
    streamed.sort();
    kept.sort();
    assert!(!kept.is_empty());
    assert_eq!(streamed, kept);
    Ok(())
}

/// On a terminal `deploy` draws a live view (a bar per batch, the hosts in
/// flight) and ends with the same result line as without one.
#[test]
fn deploy_on_a_terminal_draws_live_bars_and_ends_with_the_result_line() -> Result<()> {
    let bed = fleet_on_v1(2)?;
    let out = bed.convoy_on_tty(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 0, "{out:?}");
    let screen = &out.stdout;
    assert!(screen.contains('\u{1b}'), "drawn with control sequences: {screen:?}");
    assert!(
        screen.contains("batch 1/2") && screen.contains("batch 2/2"),
        "{screen:?}"
    );
    assert!(
        screen.contains("] 1/1 host1") && screen.contains("] 1/1 host2"),
        "both batches filled: {screen:?}"
    );
    assert!(
        screen.contains("rollout ") && screen.contains("succeeded: 2 host(s) in"),
        "{screen:?}"
    );
    assert_eq!(bed.hosts[1].serving().as_deref(), Some("2.0.0"));
    Ok(())
}
