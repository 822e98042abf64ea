//! Figures that need real hosts: booted test-bed hosts (systemd-nspawn)
//! with the agent as a systemd unit. Per-host overhead and rollback
//! latency come from the step events the agent records (agent clock, ms);
//! fan-out compares pre-staging one artifact to N hosts and to one.

use std::time::Instant;

use anyhow::Context;
use convoy_tests::testbed::rollout_id;
use convoy_tests::Testbed;

use crate::fixture;
use crate::report::{median, Section};

/// The step events of a rollout: (host, step, kind, at_ms), in order.
pub(crate) fn events(bed: &Testbed, id: &str) -> anyhow::Result<Vec<(String, String, String, i64)>> {
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

/// When `host` last had `step` end as `kind` (or start, for "started").
pub(crate) fn at(ev: &[(String, String, String, i64)], host: &str, step: &str, kind: &str, last: bool) -> Option<i64> {
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

    let (mut lat, mut back, mut start_t) = (vec![], vec![], vec![]);
    for r in 0..runs {
        let v = format!("9.0.{r}");
        pad(&bed, &v, "unhealthy", 1 << 20)?;
        let out = bed.convoy(&["deploy", "demo", &v, "--env", "staging"])?;
        anyhow::ensure!(out.code == 1, "the unhealthy release should fail: {out:?}");
        let ev = events(&bed, &rollout_id(&out.stdout))?;
        let failed = at(&ev, "host1", "check", "failed", true).context("no failed check")?;
        let restored = at(&ev, "host1", "restore", "succeeded", true).context("no restore")?;
        lat.push((restored - failed) as f64);
        // "<prev> running again": the units of the old release restarted.
        let running = at(&ev, "host1", "restore", "info", true).context("no running-again event")?;
        back.push((running - failed) as f64);
        // The unit's start time, as the successful deploys saw it.
        let rs = at(&ev, "host1", "restart", "started", false).unwrap_or(0);
        let re = at(&ev, "host1", "restart", "succeeded", false).unwrap_or(0);
        start_t.push((re - rs) as f64);
        anyhow::ensure!(bed.hosts[0].serving().as_deref() == Some(&*format!("1.0.{}", runs - 1)));
    }
    let (l, b, s) = (median(lat), median(back), median(start_t));
    rows.push(vec![
        "4. rollback latency (failed health check → old release running again)".into(),
        format!("{b:.0} ms"),
        format!(
            "unit start {s:.0} ms; restore confirmed {l:.0} ms after the failed check, once the old release \
             passed its checks again for the spec's min_healthy_time (1 s)"
        ),
        "under 1 s + unit start".into(),
    ]);
    drop(bed);

    // ── 5: fan-out ──
    eprintln!("hosts: booting {} hosts", fanout_hosts + 1);
    let bed = Testbed::boot_with(fanout_hosts + 1, |i| {
        if i == 1 { "development" } else { "staging" }.to_owned()
    })?;
    let pid = bed.controller_pid().context("controller pid")?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let shared = fanout(&bed, pid, "2", fanout_size, fanout_hosts, runs)?;
    rows.push(vec![
        format!(
            "5. fan-out: pre-stage {} MiB to {fanout_hosts} hosts vs 1, hosts sharing the machine's links and cores",
            fanout_size >> 20
        ),
        format!("{:.2}x", shared.ratio()),
        shared.detail(fanout_hosts),
        "at most 1.5x".into(),
    ]);
    shape_links(&bed, Some(LINK_RATE))?;
    let linked = fanout(&bed, pid, "3", fanout_size, fanout_hosts, runs);
    shape_links(&bed, None)?;
    let linked = linked?;
    rows.push(vec![
        format!("5. fan-out: the same, each host behind its own {LINK_RATE} link",),
        format!("{:.2}x", linked.ratio()),
        linked.detail(fanout_hosts),
        "at most 1.5x".into(),
    ]);
    notes.push(format!(
        "All hosts are containers on this one machine ({cores} cores). In the first fan-out row nothing \
         but those cores limits a transfer, so the controller's TLS and every host's download, sha256 and \
         unpack share them: {fanout_hosts} hosts do {fanout_hosts}x the work of one on the same CPUs, and \
         the ratio measures the machine ({:.0} MB/s in total with 1 host, {:.0} MB/s with {fanout_hosts}). \
         The second row gives each host a link of its own, as separate machines have (a tbf qdisc of \
         {LINK_RATE} on each host's veth, toward the host), so one host is bound by its link and the ratio \
         shows whether the controller serves all hosts at once. Pre-staging runs `prestage_parallel` \
         hosts at a time (default 16).",
        shared.total_mbps(fanout_size, 1, false),
        shared.total_mbps(fanout_size, fanout_hosts, true),
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

/// Rate of each host's own link in the second fan-out (tc syntax).
const LINK_RATE: &str = "80mbit";

struct Fanout {
    one: f64,
    many: f64,
    cpu: f64,
    peak_kib: u64,
}

impl Fanout {
    fn ratio(&self) -> f64 {
        self.many / self.one
    }
    fn detail(&self, hosts: usize) -> String {
        format!(
            "1 host {:.2} s, {hosts} hosts {:.2} s; controller CPU {:.0}% of a core during the {hosts}-host deploy, peak RSS {} MiB",
            self.one,
            self.many,
            self.cpu,
            self.peak_kib >> 10
        )
    }
    fn total_mbps(&self, size: u64, hosts: usize, many: bool) -> f64 {
        let secs = if many { self.many } else { self.one };
        (size * hosts as u64) as f64 / secs / 1e6
    }
}

/// Pre-stages a fresh `<major>.0.<run>` release to host1 (environment
/// development) and then to all the others (staging), timed from the
/// agents' first stage start to their last stage end.
fn fanout(bed: &Testbed, pid: u32, major: &str, size: u64, hosts: usize, runs: usize) -> anyhow::Result<Fanout> {
    let (mut one, mut many, mut cpu) = (vec![], vec![], vec![]);
    let mut peak = 0u64;
    for r in 0..runs {
        let v = format!("{major}.0.{r}");
        pad(bed, &v, "healthy", size)?;
        let stage_time = |env: &str, hosts: &[String]| -> anyhow::Result<(f64, f64)> {
            let (_, c0) = fixture::proc_usage(pid);
            let t = Instant::now();
            let out = bed.convoy_ok(&["deploy", "demo", &v, "--env", env, "--strategy", "all-at-once"])?;
            let wall = t.elapsed().as_secs_f64();
            let (_, c1) = fixture::proc_usage(pid);
            let ev = events(bed, &rollout_id(&out))?;
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
        let all: Vec<String> = (2..=hosts + 1).map(|i| format!("host{i}")).collect();
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
    Ok(Fanout {
        one: median(one),
        many: median(many),
        cpu: median(cpu),
        peak_kib: peak,
    })
}

/// Puts every host's veth (the bridge side, so traffic toward the host)
/// behind a token bucket of `rate`, or takes it away.
fn shape_links(bed: &Testbed, rate: Option<&str>) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", &bed.bridge])
        .output()?;
    let links: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    anyhow::ensure!(!links.is_empty(), "no links on bridge {}", bed.bridge);
    for link in links {
        let mut tc = std::process::Command::new("tc");
        match rate {
            Some(r) => tc.args([
                "qdisc", "replace", "dev", &link, "root", "tbf", "rate", r, "burst", "256kb", "latency", "100ms",
            ]),
            None => tc.args(["qdisc", "del", "dev", &link, "root"]),
        };
        fixture::run(&mut tc)?;
    }
    Ok(())
}
