//! End-to-end scenarios on booted hosts with real systemd (see TESTBED.md).
//! Each test boots its own fleet on its own bridge.

use anyhow::Result;
use convoy_tests::Testbed;

fn all_serve(bed: &Testbed, version: &str) {
    for h in &bed.hosts {
        assert_eq!(
            h.serving().as_deref(),
            Some(version),
            "{} should serve {version}",
            h.name
        );
    }
}

fn assert_current(bed: &Testbed, host: &str, current: &str, previous: Option<&str>) -> Result<()> {
    let status = bed.status()?;
    let h = Testbed::host_status(&status, host)?;
    assert_eq!(h["connected"], true, "{host}: {h}");
    assert_eq!(h["app"]["current"], current, "{host}: {h}");
    if let Some(p) = previous {
        assert_eq!(h["app"]["previous"], p, "{host}: {h}");
    }
    Ok(())
}

/// (a) v1 then v2, host by host: every host serves v2 and status says so.
#[test]
fn scenario_a_rolling_v1_then_v2() -> Result<()> {
    let bed = Testbed::boot(3)?;
    bed.push_demo("1.0.0", "healthy")?;
    let out = bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    assert!(out.contains("succeeded: 3 host(s)"), "{out}");
    all_serve(&bed, "1.0.0");

    bed.push_demo("2.0.0", "healthy")?;
    let out = bed.convoy_ok(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    // Pre-staged everywhere first, then host by host: host1 commits
    // before host2 switches.
    let staged = out.find("-- pre-staged on 3 host(s)").expect("pre-staging");
    // The controller's egress: what each host lacks, once. The hosts hold
    // 1.0.0, whose binary 2.0.0 shares; only its release.toml differs.
    let size = std::fs::metadata(bed.dir.path().join("demo-2.0.0.tar.gz"))?.len() as f64 / (1 << 20) as f64;
    let line = out
        .lines()
        .find(|l| l.contains("-- pre-staged on 3 host(s); the controller sent them"))
        .unwrap_or_else(|| panic!("no egress line:\n{out}"));
    let each: f64 = line
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(" each)"))
        .and_then(|n| match n.split_once(' ') {
            Some((v, "MiB")) => v.parse().ok(),
            Some((v, "KiB")) => v.parse::<f64>().ok().map(|k| k / 1024.0),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        each < size / 10.0,
        "{each} MiB per host for a {size:.1} MiB artifact: {line}"
    );
    for h in ["host1", "host2", "host3"] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("[{h}] stage")) && l.contains("verified by delta")),
            "{h} did not stage by delta:\n{out}"
        );
    }
    let h1_commit = out.find("[host1] commit").expect("host1 commit");
    let h2_switch = out.find("[host2] switch").expect("host2 switch");
    assert!(staged < h1_commit && h1_commit < h2_switch, "not host by host:\n{out}");
    all_serve(&bed, "2.0.0");
    for h in ["host1", "host2", "host3"] {
        assert_current(&bed, h, "2.0.0", Some("1.0.0"))?;
    }
    let status = bed.status()?;
    let h = Testbed::host_status(&status, "host2")?;
    assert_eq!(h["app"]["health"], "healthy");
    assert_eq!(h["app"]["releases"], serde_json::json!(["1.0.0", "2.0.0"]));

    // Hosts and releases, as an operator lists them.
    let hosts: serde_json::Value = serde_json::from_str(&bed.convoy_ok(&["hosts", "--output", "json"])?)?;
    assert_eq!(hosts["hosts"].as_array().unwrap().len(), 3);
    assert_eq!(hosts["hosts"][0]["labels"]["env"], "staging");
    assert_eq!(hosts["hosts"][0]["apps"][0]["current"], "2.0.0");
    let releases: serde_json::Value = serde_json::from_str(&bed.convoy_ok(&["releases", "demo", "--output", "json"])?)?;
    let versions: Vec<&str> = releases["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["2.0.0", "1.0.0"], "newest first");
    assert_eq!(releases["releases"][0]["signed"], false);
    assert!(bed.convoy_ok(&["hosts"])?.contains("demo=2.0.0"));

    // The text view says the same.
    let text = bed.convoy_ok(&["status", "demo"])?;
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("2.0.0") && l.contains("healthy"))
            .count(),
        3,
        "{text}"
    );

    // A zstd-compressed release travels and unpacks like a gzip one.
    let zst = bed.pack_demo_zstd("2.1.0")?;
    bed.push_file("2.1.0", &zst)?;
    bed.convoy_ok(&[
        "deploy",
        "demo",
        "2.1.0",
        "--env",
        "staging",
        "--strategy",
        "all-at-once",
    ])?;
    all_serve(&bed, "2.1.0");
    Ok(())
}

/// (b) v3's health check fails: host1 is restored to v2 and serves it
/// again, the rollout halts, hosts 2 and 3 are never switched (they hold
/// v3 pre-staged), and the CLI exits non-zero naming the host and the
/// failed check.
#[test]
fn scenario_b_failed_health_check_restores_and_halts() -> Result<()> {
    let bed = Testbed::boot(3)?;
    bed.push_demo("2.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    all_serve(&bed, "2.0.0");

    bed.push_demo("3.0.0", "unhealthy")?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 1, "exit code: {out:?}");
    assert!(out.stderr.contains("failed on host1"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("health check failed: http http://127.0.0.1:8080/health: status 500, expected 200"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("restored 2.0.0"), "{}", out.stderr);
    assert!(out.stderr.contains("hosts not touched: host2, host3"), "{}", out.stderr);
    for h in ["host2", "host3"] {
        let switched = format!("[{h}] switch");
        assert!(
            !out.stdout.contains(&switched),
            "{h} must never be switched:\n{}",
            out.stdout
        );
    }

    all_serve(&bed, "2.0.0");
    assert_current(&bed, "host1", "2.0.0", None)?;
    let status = bed.status()?;
    for h in ["host2", "host3"] {
        let s = Testbed::host_status(&status, h)?;
        assert_eq!(s["app"]["current"], "2.0.0");
        // Pre-staged, never switched.
        assert_eq!(s["app"]["releases"], serde_json::json!(["2.0.0", "3.0.0"]), "{h}");
        assert!(s["app"]["previous"].is_null(), "{h} was never switched: {s}");
    }
    let h1 = Testbed::host_status(&status, "host1")?;
    assert_eq!(h1["app"]["health"], "healthy", "{h1}");
    // The install path on host1 points at 2.0.0 again.
    let link = bed.hosts[0].exec_ok(&["readlink", "/opt/demo"])?;
    assert!(link.trim().ends_with("/releases/2.0.0"), "{link}");

    // A build whose gzip stream fails its checksum is refused at push,
    // before any host sees it; the same bytes whole are accepted.
    let good = std::fs::read(bed.pack_demo("4.0.0", "healthy")?)?;
    let mut corrupt = good.clone();
    let crc = corrupt.len() - 8;
    corrupt[crc] ^= 0xff;
    let file = bed.dir.path().join("corrupt.tar.gz");
    std::fs::write(&file, &corrupt)?;
    let out = bed.convoy(&["release", "push", "demo", "4.0.0", file.to_str().unwrap()])?;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("demo 4.0.0 refused, nothing was stored")
            && out.stderr.contains("checksum or length trailer fails"),
        "{}",
        out.stderr
    );
    let releases = bed.convoy_ok(&["releases", "demo", "--output", "json"])?;
    assert!(!releases.contains("4.0.0"), "{releases}");
    std::fs::write(&file, &good)?;
    bed.convoy_ok(&["release", "push", "demo", "4.0.0", file.to_str().unwrap()])?;
    let releases: serde_json::Value = serde_json::from_str(&bed.convoy_ok(&["releases", "demo", "--output", "json"])?)?;
    let pushed = &releases["releases"][0];
    assert_eq!(pushed["version"], "4.0.0", "{releases}");
    assert!(
        pushed["unpacked_size"].as_u64() > pushed["size"].as_u64() && pushed["entries"].as_u64() >= Some(2),
        "what it unpacks to is recorded at push: {pushed}"
    );

    // The app spec bounds how far a release may expand: with max_ratio 2,
    // the demo (about 3.7 times) is refused at push, nothing stored.
    let spec_path = bed.dir.path().join("controller/apps/demo.toml");
    let spec = std::fs::read_to_string(&spec_path)?;
    std::fs::write(&spec_path, format!("max_ratio = 2\n{spec}"))?;
    let tight = bed.pack_demo("4.1.0", "healthy")?;
    let out = bed.convoy(&["release", "push", "demo", "4.1.0", tight.to_str().unwrap()])?;
    std::fs::write(&spec_path, &spec)?;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("the app spec's max_ratio allows that much"),
        "{}",
        out.stderr
    );
    let releases = bed.convoy_ok(&["releases", "demo", "--output", "json"])?;
    assert!(!releases.contains("4.1.0"), "{releases}");

    // The hosts hold a release to the spec's limits too, while they
    // unpack it: a release pushed under a looser spec is refused on every
    // host at pre-staging once the spec is tightened, and leaves no
    // partial tree behind.
    bed.push_demo("4.2.0", "healthy")?;
    std::fs::write(&spec_path, format!("max_ratio = 2\n{spec}"))?;
    let out = bed.convoy(&[
        "deploy",
        "demo",
        "4.2.0",
        "--env",
        "staging",
        "--strategy",
        "all-at-once",
    ])?;
    std::fs::write(&spec_path, &spec)?;
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, 4, "{text}");
    assert!(text.contains("max_ratio"), "{text}");
    for h in &bed.hosts {
        let left = h.exec_ok(&[
            "sh",
            "-c",
            "ls -A /var/lib/convoy/apps/demo/staging /var/lib/convoy/apps/demo/releases",
        ])?;
        assert!(!left.contains("4.2.0"), "{}: {left}", h.name);
        let staging = h.exec_ok(&[
            "sh",
            "-c",
            "ls -A /var/lib/convoy/apps/demo/staging | grep -v '\\.part$' || true",
        ])?;
        assert_eq!(staging.trim(), "", "{}: no partial tree", h.name);
    }

    // Every host still holds the broken 3.0.0. A rollback to it host by
    // host halts at the first host, which restores itself; the others are
    // never switched.
    let out = bed.convoy(&[
        "rollback",
        "demo",
        "--env",
        "staging",
        "--to",
        "3.0.0",
        "--strategy",
        "rolling",
        "--batch-size",
        "1",
    ])?;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("[host1] switch"), "{}", out.stdout);
    for h in ["host2", "host3"] {
        assert!(
            !out.stdout.contains(&format!("[{h}] switch")),
            "{h} switched:\n{}",
            out.stdout
        );
    }
    assert!(out.stderr.contains("hosts not touched: host2, host3"), "{}", out.stderr);
    all_serve(&bed, "2.0.0");
    Ok(())
}

/// (c) The agent is killed and restarted by systemd while connected: it
/// reconnects and reports the same versions, and the fleet still deploys.
#[test]
fn scenario_c_agent_restarted_by_systemd_reconnects() -> Result<()> {
    let bed = Testbed::boot(3)?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;

    let host = &bed.hosts[1];
    let pid_before = host.unit_property("convoy-agent.service", "MainPID")?;
    let restarts_before: u32 = host.unit_property("convoy-agent.service", "NRestarts")?.parse()?;
    // SIGKILL the agent's main process; systemd sees it die.
    host.kill_agent()?;

    // systemd restarts it (Restart=always) ...
    let start = std::time::Instant::now();
    loop {
        let restarts: u32 = host.unit_property("convoy-agent.service", "NRestarts")?.parse()?;
        let pid = host.unit_property("convoy-agent.service", "MainPID")?;
        if restarts == restarts_before + 1 && pid != pid_before && pid != "0" {
            break;
        }
        assert!(start.elapsed().as_secs() < 20, "systemd did not restart the agent");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // ... and it reconnects, reporting the same versions.
    bed.wait_connected(3)?;
    assert_current(&bed, "host2", "1.0.0", None)?;
    assert_eq!(host.serving().as_deref(), Some("1.0.0"), "the app kept running");

    bed.push_demo("2.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    all_serve(&bed, "2.0.0");
    Ok(())
}
