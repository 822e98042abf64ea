//! The Debian packages on booted hosts: install, configure, deploy,
//! upgrade, remove and purge with dpkg; the service's systemd integration
//! (notify, watchdog), its journald fields and both metrics endpoints.
//!
//! Needs the packages `scripts/package --no-build --profile dev` builds
//! (and the same at `--deb-version 0.1.0-2`); `scripts/test` builds them.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use convoy_tests::testbed::{Host, Testbed};

const AGENT: &str = "convoy-agent_0.1.0-1";
const AGENT_NEXT: &str = "convoy-agent_0.1.0-2";
const CONTROLLER: &str = "convoy-controller_0.1.0-1";

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Puts the test bed's certificate, key, CA and agent.toml where the
/// package's template says they go, and restarts the agent, as an
/// operator would. The callers wait for the agent to connect.
fn configure_agent(host: &Host) -> Result<()> {
    host.exec_ok(&[
        "sh",
        "-c",
        "cp /etc/convoy-testbed/ca.pem /etc/convoy-testbed/host1.pem /etc/convoy-testbed/host1.key /etc/convoy/tls/ && \
         chmod 600 /etc/convoy/tls/host1.key && \
         { echo '# edited by the operator'; echo 'metrics_listen = \"127.0.0.1:9465\"'; \
           cat /etc/convoy-testbed/agent.toml; } > /etc/convoy/agent.toml && \
         systemctl restart convoy-agent",
    ])
    .map_err(|e| {
        let journal = host.exec(&["journalctl", "--no-pager", "-n", "30", "-u", "convoy-agent"]);
        let journal = journal.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        e.context(journal)
    })?;
    Ok(())
}

/// Issues the controller's certificate into host1's test-bed folder
/// (`/etc/convoy-testbed` on the host), beside the CA.
fn issue_controller_cert(bed: &Testbed) -> Result<()> {
    let pki = bed.dir.path().join("pki");
    let out = bed.dir.path().join("hosts/host1");
    bed.convoy_ok(&[
        "pki",
        "issue",
        "controller",
        "controller",
        "--dir",
        pki.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])?;
    Ok(())
}

fn agent_metrics(host: &Host) -> Result<String> {
    host.exec_ok(&["curl", "-sf", "http://127.0.0.1:9465/metrics"])
}

#[test]
fn agent_package_installs_runs_under_systemd_and_deploys() -> Result<()> {
    let bed = Testbed::boot_packaged(1)?;
    let host = &bed.hosts[0];
    host.exec_ok(&["dpkg", "-i", &Testbed::package(AGENT)?])?;

    // Installed, enabled, and inactive (not failed) until configured: the
    // agent said why and exited 3, which the unit counts as success.
    assert_eq!(
        host.exec_ok(&["systemctl", "is-enabled", "convoy-agent"])?.trim(),
        "enabled"
    );
    // READY comes just before the exit: wait for the exit.
    wait_until("the unconfigured agent to exit", Duration::from_secs(30), || {
        host.unit_property("convoy-agent", "ActiveState")
            .is_ok_and(|s| s == "inactive")
    })?;
    assert_eq!(host.unit_property("convoy-agent", "Result")?, "success");
    assert_eq!(host.unit_property("convoy-agent", "ExecMainStatus")?, "3");
    let journal = host.exec_ok(&["journalctl", "--no-pager", "-u", "convoy-agent"])?;
    assert!(journal.contains("not configured yet: set `controller`"), "{journal}");
    assert_eq!(
        host.exec_ok(&["stat", "-c", "%a", "/etc/convoy/agent.toml"])?.trim(),
        "600"
    );
    let version = host.exec_ok(&["convoy-agent", "--version"])?;
    assert!(version.starts_with("convoy-agent 0.1.0 (commit "), "{version}");
    assert!(!version.contains("unknown"), "{version}");
    host.exec_ok(&["test", "-s", "/usr/share/man/man1/convoy-agent.1.gz"])?;
    host.exec_ok(&["test", "-s", "/usr/share/bash-completion/completions/convoy-agent"])?;

    configure_agent(host)?;
    bed.wait_connected(1)?;
    // Type=notify: active means READY came, with a status line.
    assert_eq!(host.unit_property("convoy-agent", "Type")?, "notify");
    assert_eq!(host.unit_property("convoy-agent", "WatchdogUSec")?, "30s");
    assert_eq!(host.unit_property("convoy-agent", "ActiveState")?, "active");
    assert_eq!(
        host.unit_property("convoy-agent", "StatusText")?,
        "connected to the controller as host1"
    );

    bed.push_demo("1.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));
    bed.push_demo("2.0.0", "unhealthy")?;
    let failed = bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert_eq!(failed.code, 1, "{failed:?}");
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));

    // journald keeps the operation's fields: select by them.
    let rollouts = bed.convoy_ok(&["history", "demo", "--output", "json"])?;
    let rollouts: serde_json::Value = serde_json::from_str(&rollouts)?;
    let failed_id = rollouts["rollouts"][0]["id"].as_str().unwrap().to_owned();
    let journal = host.exec_ok(&[
        "journalctl",
        "--no-pager",
        "-o",
        "json",
        "-u",
        "convoy-agent",
        "APP=demo",
        &format!("ROLLOUT={failed_id}"),
    ])?;
    let entries: Vec<serde_json::Value> = journal.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        !entries.is_empty(),
        "no journal entries with APP=demo ROLLOUT={failed_id}"
    );
    for e in &entries {
        assert_eq!(e["VERSION"], "2.0.0", "{e}");
        assert_eq!(e["HOST"], "host1", "{e}");
        assert_eq!(e["SYSLOG_IDENTIFIER"], "convoy-agent", "{e}");
    }
    assert!(
        entries.iter().any(|e| e["STEP"] == "restore" && e["PRIORITY"] == "5"),
        "a restore step event at notice priority: {journal}"
    );

    // Both metrics endpoints.
    let agent = agent_metrics(host)?;
    assert_eq!(
        sample(&agent, r#"convoy_agent_activations_total{outcome="succeeded"}"#),
        Some(1.0),
        "{agent}"
    );
    assert_eq!(
        sample(&agent, r#"convoy_agent_activations_total{outcome="failed_restored"}"#),
        Some(1.0),
        "{agent}"
    );
    assert_eq!(
        sample(&agent, r#"convoy_agent_restores_total{outcome="succeeded"}"#),
        Some(1.0),
        "{agent}"
    );
    assert!(
        sample(
            &agent,
            r#"convoy_agent_health_check_duration_seconds_count{type="http",result="passed"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{agent}"
    );
    assert!(
        sample(
            &agent,
            r#"convoy_agent_health_check_duration_seconds_count{type="http",result="failed"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{agent}"
    );
    let ctl = bed.controller_metrics()?;
    assert_eq!(sample(&ctl, "convoy_connected_hosts"), Some(1.0), "{ctl}");
    assert_eq!(
        sample(&ctl, r#"convoy_rollouts_total{kind="deploy",outcome="succeeded"}"#),
        Some(1.0),
        "{ctl}"
    );
    assert_eq!(
        sample(&ctl, r#"convoy_rollouts_total{kind="deploy",outcome="failed"}"#),
        Some(1.0),
        "{ctl}"
    );
    assert_eq!(
        sample(&ctl, r#"convoy_host_results_total{outcome="failed_restored"}"#),
        Some(1.0),
        "{ctl}"
    );
    // 1.0.0 whole; 2.0.0 by delta: its manifest and its one new content
    // (release.toml), a small part of its artifact.
    let size = |v: &str| -> std::io::Result<f64> {
        Ok(std::fs::metadata(bed.dir.path().join(format!("demo-{v}.tar.gz")))?.len() as f64)
    };
    let streamed = sample(&ctl, "convoy_artifact_bytes_streamed_total").unwrap_or(0.0);
    assert!(
        streamed > size("1.0.0")? && streamed < size("1.0.0")? + size("2.0.0")? / 10.0,
        "{streamed} bytes streamed: {ctl}"
    );
    assert_eq!(sample(&ctl, "convoy_stage_egress_bytes_count"), Some(2.0), "{ctl}");
    for step in ["stage", "switch", "restart", "check"] {
        assert!(
            sample(
                &ctl,
                &format!(r#"convoy_step_duration_seconds_count{{step="{step}",result="succeeded"}}"#)
            )
            .is_some_and(|n| n >= 1.0),
            "{step}: {ctl}"
        );
    }
    assert!(
        sample(
            &ctl,
            r#"convoy_step_duration_seconds_count{step="check",result="failed"}"#
        ) == Some(1.0),
        "{ctl}"
    );
    Ok(())
}

#[test]
fn agent_package_upgrade_and_removal_keep_state() -> Result<()> {
    let bed = Testbed::boot_packaged(1)?;
    let host = &bed.hosts[0];
    host.exec_ok(&["dpkg", "-i", &Testbed::package(AGENT)?])?;
    configure_agent(host)?;
    bed.wait_connected(1)?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    bed.push_demo("2.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    let before = Testbed::host_status(&bed.status()?, "host1")?["app"].clone();
    assert_eq!(before["current"], "2.0.0");
    assert_eq!(before["releases"], serde_json::json!(["1.0.0", "2.0.0"]));
    let journal_before = host.exec_ok(&["cat", "/var/lib/convoy/apps/demo/journal.json"])?;
    let pid_before = host.unit_property("convoy-agent", "MainPID")?;

    // Upgrade: the agent restarts on the new package, state untouched.
    host.exec_ok(&["dpkg", "-i", &Testbed::package(AGENT_NEXT)?])?;
    assert!(host.exec_ok(&["dpkg-query", "-W", "convoy-agent"])?.contains("0.1.0-2"));
    wait_until("the upgraded agent to run", Duration::from_secs(30), || {
        host.unit_property("convoy-agent", "MainPID")
            .is_ok_and(|p| p != "0" && p != pid_before)
            && host
                .unit_property("convoy-agent", "ActiveState")
                .is_ok_and(|s| s == "active")
    })?;
    let config = host.exec_ok(&["cat", "/etc/convoy/agent.toml"])?;
    assert!(
        config.contains("# edited by the operator"),
        "the operator's config was replaced:\n{config}"
    );
    assert_eq!(
        host.exec_ok(&["cat", "/var/lib/convoy/apps/demo/journal.json"])?,
        journal_before
    );
    bed.wait_host_connected("host1")?;
    let after = Testbed::host_status(&bed.status()?, "host1")?["app"].clone();
    assert_eq!(after, before);
    assert_eq!(host.serving().as_deref(), Some("2.0.0"));
    // The releases are really there: rolling back is a local switch.
    bed.convoy_ok(&["rollback", "demo", "--env", "staging", "--to", "1.0.0"])?;
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));

    // Removal without purge: the app keeps running from its release, and
    // the config, the host's identity and every release stay.
    host.exec_ok(&["dpkg", "-r", "convoy-agent"])?;
    host.exec_ok(&["test", "!", "-e", "/usr/bin/convoy-agent"])?;
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));
    host.exec_ok(&["test", "-f", "/etc/convoy/agent.toml"])?;
    host.exec_ok(&["test", "-f", "/etc/convoy/tls/host1.key"])?;
    host.exec_ok(&["test", "-d", "/var/lib/convoy/apps/demo/releases/2.0.0"])?;
    // Installed again, it picks up where it was.
    host.exec_ok(&["dpkg", "-i", &Testbed::package(AGENT_NEXT)?])?;
    bed.wait_host_connected("host1")?;
    let again = Testbed::host_status(&bed.status()?, "host1")?["app"].clone();
    assert_eq!(again["current"], "1.0.0");
    assert_eq!(again["releases"], serde_json::json!(["1.0.0", "2.0.0"]));

    // Purge removes the configuration, never the releases apps run from.
    host.exec_ok(&["dpkg", "--purge", "convoy-agent"])?;
    host.exec_ok(&["test", "!", "-e", "/etc/convoy/agent.toml"])?;
    host.exec_ok(&["test", "-d", "/var/lib/convoy/apps/demo/releases/1.0.0"])?;
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));
    Ok(())
}

#[test]
fn controller_package_runs_unprivileged() -> Result<()> {
    let bed = Testbed::boot_packaged(1)?;
    let host = &bed.hosts[0];
    host.exec_ok(&["dpkg", "-i", &Testbed::package(CONTROLLER)?])?;
    // The system user exists; the unit is skipped until a certificate is there.
    host.exec_ok(&["id", "convoy"])?;
    assert_eq!(host.unit_property("convoy-controller", "ConditionResult")?, "no");
    let version = host.exec_ok(&["convoy", "--version"])?;
    assert!(version.starts_with("convoy 0.1.0 (commit "), "{version}");
    host.exec_ok(&["test", "-s", "/usr/share/man/man1/convoy-deploy.1.gz"])?;

    issue_controller_cert(&bed)?;
    host.exec_ok(&[
        "sh",
        "-c",
        "cp /etc/convoy-testbed/ca.pem /etc/convoy-testbed/controller.pem /etc/convoy/ && \
         install -m 600 -o convoy -g convoy /etc/convoy-testbed/controller.key /etc/convoy/controller.key && \
         systemctl start convoy-controller",
    ])?;
    assert_eq!(host.unit_property("convoy-controller", "ActiveState")?, "active");
    assert_eq!(
        host.unit_property("convoy-controller", "StatusText")?,
        "listening on 0.0.0.0:7443"
    );
    let pid = host.unit_property("convoy-controller", "MainPID")?;
    let status = host.exec_ok(&["cat", &format!("/proc/{pid}/status")])?;
    let uid = host.exec_ok(&["id", "-u", "convoy"])?;
    let field = |name: &str| status.lines().find(|l| l.starts_with(name)).unwrap_or("").to_owned();
    assert!(
        field("Uid:").contains(uid.trim()) && !field("Uid:").contains("\t0\t"),
        "{status}"
    );
    assert_eq!(field("CapEff:"), "CapEff:\t0000000000000000", "{status}");
    assert_eq!(field("CapBnd:"), "CapBnd:\t0000000000000000", "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let owner = host.exec_ok(&["stat", "-c", "%U", "/var/lib/convoy-controller/convoy.db"])?;
    assert_eq!(owner.trim(), "convoy");
    let metrics = host.exec_ok(&["curl", "-sf", "http://127.0.0.1:9464/metrics"])?;
    assert_eq!(sample(&metrics, "convoy_connected_hosts"), Some(0.0), "{metrics}");

    // Removal keeps the database; purge removes it.
    host.exec_ok(&["dpkg", "-r", "convoy-controller"])?;
    host.exec_ok(&["test", "-f", "/var/lib/convoy-controller/convoy.db"])?;
    host.exec_ok(&["dpkg", "--purge", "convoy-controller"])?;
    host.exec_ok(&["test", "!", "-e", "/var/lib/convoy-controller"])?;
    host.exec_ok(&["test", "!", "-e", "/etc/convoy/controller.toml"])?;
    Ok(())
}

/// `systemctl stop` of a controller with an agent connected: the session,
/// which would otherwise hold graceful shutdown open, ends; the controller
/// exits on its own within its grace period (the unit's stop timeout is
/// cut to 20 s here, so a controller that hangs is killed, and the unit's
/// Result says "timeout"), and the agent reconnects when it is back.
#[test]
fn controller_under_systemd_stops_promptly_with_agents_connected() -> Result<()> {
    let bed = Testbed::boot_packaged(1)?;
    let host = &bed.hosts[0];
    host.exec_ok(&["dpkg", "-i", &Testbed::package(CONTROLLER)?, &Testbed::package(AGENT)?])?;
    issue_controller_cert(&bed)?;
    // The host's agent dials the controller on the same host.
    host.exec_ok(&[
        "sh",
        "-c",
        "cp /etc/convoy-testbed/ca.pem /etc/convoy-testbed/controller.pem /etc/convoy/ && \
         install -m 600 -o convoy -g convoy /etc/convoy-testbed/controller.key /etc/convoy/controller.key && \
         mkdir -p /run/systemd/system/convoy-controller.service.d && \
         printf '[Service]\\nTimeoutStopSec=20\\n' > /run/systemd/system/convoy-controller.service.d/stop.conf && \
         systemctl daemon-reload && systemctl start convoy-controller && \
         cp /etc/convoy-testbed/ca.pem /etc/convoy-testbed/host1.pem /etc/convoy-testbed/host1.key /etc/convoy/tls/ && \
         chmod 600 /etc/convoy/tls/host1.key && \
         printf 'controller = \"https://127.0.0.1:7443\"\\nserver_name = \"controller\"\\nca = \"/etc/convoy/tls/ca.pem\"\\ncert = \"/etc/convoy/tls/host1.pem\"\\nkey = \"/etc/convoy/tls/host1.key\"\\n[labels]\\nenv = \"staging\"\\n' > /etc/convoy/agent.toml && \
         systemctl restart convoy-agent",
    ])?;
    let connected = || {
        host.exec_ok(&["curl", "-sf", "http://127.0.0.1:9464/metrics"])
            .ok()
            .and_then(|m| sample(&m, "convoy_connected_hosts"))
            == Some(1.0)
    };
    wait_until(
        "the agent to connect to the controller",
        Duration::from_secs(60),
        connected,
    )?;

    host.exec_ok(&["systemctl", "stop", "convoy-controller"])?;
    assert_eq!(host.unit_property("convoy-controller", "ActiveState")?, "inactive");
    assert_eq!(
        host.unit_property("convoy-controller", "Result")?,
        "success",
        "the controller did not stop by itself"
    );
    let journal = host.exec_ok(&["journalctl", "--no-pager", "-o", "cat", "-u", "convoy-controller"])?;
    assert!(journal.contains("stopping: ending agent sessions"), "{journal}");
    assert!(journal.lines().any(|l| l.ends_with("stopped")), "{journal}");
    assert!(
        !journal.contains("stopping anyway"),
        "everything ended within the grace period:\n{journal}"
    );

    host.exec_ok(&["systemctl", "start", "convoy-controller"])?;
    wait_until(
        "the agent to reconnect to the restarted controller",
        Duration::from_secs(60),
        connected,
    )?;
    Ok(())
}

/// `systemctl stop` during an activation: the agent starts nothing new,
/// lets the activation finish and report, then stops.
#[test]
fn stopping_the_agent_mid_activation_lets_it_finish() -> Result<()> {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/demo.toml"))?
        .replace("min_healthy_time = \"1s\"", "min_healthy_time = \"4s\"")
        .replace("healthy_deadline = \"8s\"", "healthy_deadline = \"12s\"");
    let bed = Testbed::boot_spec(1, |_| "staging".to_owned(), &spec)?;
    let host = &bed.hosts[0];
    bed.push_demo("1.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    bed.push_demo("2.0.0", "healthy")?;
    let deploy = bed.convoy_spawn(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    let journal = || {
        host.exec_ok(&["journalctl", "--no-pager", "-o", "cat", "-u", "convoy-agent"])
            .unwrap_or_default()
    };
    wait_until(
        "host1 to be in its health-check window",
        Duration::from_secs(30),
        || {
            // The first check window was 1.0.0's.
            journal().matches("step=check kind=Started").count() >= 2
        },
    )?;
    host.exec_ok(&["systemctl", "stop", "--no-block", "convoy-agent"])?;
    wait_until("the agent to stop", Duration::from_secs(40), || {
        host.unit_property("convoy-agent", "ActiveState")
            .is_ok_and(|s| s == "inactive")
    })?;
    let log = journal();
    assert!(log.contains("stopping: waiting for running operations to end"), "{log}");
    assert!(log.contains("running operations ended; stopping"), "{log}");
    let out = deploy.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.serving().as_deref(), Some("2.0.0"));

    host.exec_ok(&["systemctl", "start", "convoy-agent"])?;
    bed.wait_host_connected("host1")?;
    let app = Testbed::host_status(&bed.status()?, "host1")?["app"].clone();
    assert_eq!(app["current"], "2.0.0", "{app}");
    assert_eq!(app["health"], "healthy", "{app}");
    assert!(app["inflight_op"].is_null(), "{app}");
    Ok(())
}
