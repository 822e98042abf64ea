//! Figures that need real hosts: booted test-bed hosts (systemd-nspawn)
//! with the agent as a systemd unit. Per-host overhead and rollback
//! latency come from the step events the agent records (agent clock, ms);
//! fan-out compares pre-staging one artifact to N hosts and to one.

use std::time::Instant;

use anyhow::Context;
use convoy_tests::Testbed;

use crate::fixture;
use crate::report::{median, Section};

/// The step events of a rollout: (host, step, kind, at_ms), in order.
fn events(bed: &Testbed, id: &str) -> anyhow::Result<Vec<(String, String, String, i64)>> {
    let v: serde_json::Value =
        serde_json::from_str(&bed.convoy_ok(&["history", "--rollout", id, "--output", "json"])?)?;
    Ok(v["events"]
        .as_array()
        .context("no events")?
        .iter()
        .map(|e| {
            (
                e["host"].as_str().unwrap_or("").to_owned(),
                e["step"].as_str().unwrap_or("").to_owned(),
                e["kind"].as_str().unwrap_or("").to_owned(),
                e["at_unix_ms"].as_i64().unwrap_or(0),
            )
        })
        .collect())
}

fn rollout_id(out: &str) -> String {
    out.split_whitespace()
        .nth(1)
        .unwrap_or("")
        .trim_end_matches(':')
        .to_owned()
}

/// When `host` last had `step` end as `kind` (or start, for "started").
fn at(ev: &[(String, String, String, i64)], host: &str, step: &str, kind: &str, last: bool) -> Option<i64> {
    let mut it = ev
        .iter()
        .filter(|e| e.0 == host && e.1 == step && e.2 == kind)
        .map(|e| e.3);
    if last {
        it.next_back()
    } else {
        it.next()
    }
}

fn pad(bed: &Testbed, version: &str, mode: &str, bytes: u64) -> anyhow::Result<()> {
    let f = bed.dir.path().join(format!("pad-{version}"));
    fixture::random(&f, bytes, version.len() as u64 * 7919 + bytes)?;
    let data = std::fs::read(&f)?;
    let tgz = bed.pack_demo_with(version, mode, &[("pad.bin", &data, 0o644)])?;
    bed.push_file(version, &tgz)
}

pub fn run(fanout_size: u64, fanout_hosts: usize, runs: usize) -> anyhow::Result<Section> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // ── 3 and 4: one host ──
    eprintln!("hosts: booting 1 host");
    let bed = Testbed::boot(1)?;
    let (mut overhead, mut window, mut total) = (vec![], vec![], vec![]);
    for r in 0..runs {
        let v = format!("1.0.{r}");
        pad(&bed, &v, "healthy", 10 << 20)?;
        let out = bed.convoy_ok(&["deploy", "demo", &v, "--env", "staging"])?;
        let ev = events(&bed, &rollout_id(&out))?;
        // The activation's own events follow pre-staging's: its stage
        // step ("already on this host") is the second one.
        let begin = ev
            .iter()
            .filter(|e| e.0 == "host1" && e.1 == "stage" && e.2 == "started")
            .map(|e| e.3)
            .nth(1)
            .context("no activation stage event")?;
        let commit = at(&ev, "host1", "commit", "succeeded", true).context("no commit")?;
        let restart = at(&ev, "host1", "restart", "started", true).context("no restart")?;
        let healthy = at(&ev, "host1", "check", "succeeded", true).context("no check")?;
        total.push((commit - begin) as f64);
        window.push((healthy - restart) as f64);
        overhead.push(((commit - begin) - (healthy - restart)) as f64);
    }
    let (o, w, t) = (median(overhead), median(window), median(total));
    rows.push(vec![
        "3. per-host overhead, 10 MiB artifact (activate → committed, minus restart and health window)".into(),
        format!("{o:.0} ms"),
        format!("activation {t:.0} ms, of which restart + health window {w:.0} ms"),
        "under 50 ms".into(),
    ]);

    let (mut lat, mut start_t) = (vec![], vec![]);
    for r in 0..runs {
        let v = format!("9.0.{r}");
        pad(&bed, &v, "unhealthy", 1 << 20)?;
        let out = bed.convoy(&["deploy", "demo", &v, "--env", "staging"])?;
        anyhow::ensure!(out.code == 1, "the unhealthy release should fail: {out:?}");
        let ev = events(&bed, &rollout_id(&out.stdout))?;
        let failed = at(&ev, "host1", "check", "failed", true).context("no failed check")?;
        let restored = at(&ev, "host1", "restore", "succeeded", true).context("no restore")?;
        lat.push((restored - failed) as f64);
        // The unit's start time, as the successful deploys saw it.
        let rs = at(&ev, "host1", "restart", "started", false).unwrap_or(0);
        let re = at(&ev, "host1", "restart", "succeeded", false).unwrap_or(0);
        start_t.push((re - rs) as f64);
        anyhow::ensure!(bed.hosts[0].serving().as_deref() == Some(&*format!("1.0.{}", runs - 1)));
    }
    let (l, s) = (median(lat), median(start_t));
    rows.push(vec![
        "4. rollback latency (failed health check → old release restored and answering)".into(),
        format!("{l:.0} ms"),
        format!("unit start {s:.0} ms; the restore re-checks the old release for the spec's min_healthy_time (1 s)"),
        "under 1 s + unit start".into(),
    ]);
    drop(bed);

    // ── 5: fan-out ──
    eprintln!("hosts: booting {} hosts", fanout_hosts + 1);
    let bed = Testbed::boot_with(fanout_hosts + 1, |i| {
        if i == 1 { "development" } else { "staging" }.to_owned()
    })?;
    let pid = bed.controller_pid().context("controller pid")?;
    let (mut one, mut many, mut cpu) = (vec![], vec![], vec![]);
    let mut peak = 0u64;
    for r in 0..runs {
        let v = format!("2.0.{r}");
        pad(&bed, &v, "healthy", fanout_size)?;
        let stage_time = |env: &str, hosts: &[String]| -> anyhow::Result<(f64, f64)> {
            let (_, c0) = fixture::proc_usage(pid);
            let t = Instant::now();
            let out = bed.convoy_ok(&["deploy", "demo", &v, "--env", env, "--strategy", "all-at-once"])?;
            let wall = t.elapsed().as_secs_f64();
            let (_, c1) = fixture::proc_usage(pid);
            let ev = events(&bed, &rollout_id(&out))?;
            let first = hosts.iter().filter_map(|h| at(&ev, h, "stage", "started", false)).min();
            let last = hosts
                .iter()
                .filter_map(|h| at(&ev, h, "stage", "succeeded", false))
                .max();
            let (Some(a), Some(b)) = (first, last) else {
                anyhow::bail!("no pre-staging events");
            };
            Ok(((b - a) as f64 / 1000.0, (c1 - c0).as_secs_f64() / wall * 100.0))
        };
        let all: Vec<String> = (2..=fanout_hosts + 1).map(|i| format!("host{i}")).collect();
        one.push(stage_time("development", &["host1".to_owned()])?.0);
        let (secs, c) = stage_time("staging", &all)?;
        many.push(secs);
        cpu.push(c);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        peak = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    }
    let (a, b) = (median(one), median(many));
    rows.push(vec![
        format!(
            "5. fan-out: pre-stage {} MiB to {fanout_hosts} hosts vs 1",
            fanout_size >> 20
        ),
        format!("{:.2}x", b / a),
        format!(
            "1 host {a:.2} s, {fanout_hosts} hosts {b:.2} s; controller CPU {:.0}% of a core during the {fanout_hosts}-host deploy, peak RSS {} MiB",
            median(cpu),
            peak >> 10
        ),
        "at most 1.5x".into(),
    ]);
    notes.push(format!(
        "All hosts are containers on this one machine ({} cores): in the fan-out, the controller's TLS, \
         and every host's download, sha256 and unpack share those cores, so {fanout_hosts} hosts do \
         {fanout_hosts}x the work of one on the same CPUs. Pre-staging runs 8 hosts at a time.",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));
    Ok(Section {
        key: "hosts",
        title: "3–5. On booted hosts: per-host overhead, rollback latency, fan-out".into(),
        command: format!(
            "scripts/bench hosts --fanout-size {}MiB --fanout-hosts {fanout_hosts} --runs {runs}",
            fanout_size >> 20
        ),
        header: vec!["figure", "median", "detail", "goal"],
        rows,
        notes: [
            vec![
                "Times 3 and 4 come from the agent's own step events (one clock, milliseconds) of real \
                  deploys to a booted host running the demo app as a systemd unit."
                    .to_owned(),
            ],
            notes,
        ]
        .concat(),
    })
}
