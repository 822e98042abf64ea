//! The dashboard with a large fleet: `convoy ui` answering its pages with
//! N hosts registered (lightweight agent sessions, as in `scale`, each
//! running three apps in one of three environments), beside the CLI
//! listing the same fleet, and what `convoy ui` costs in memory.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use convoy_tests::testbed::{dashboard_link, http_request};

use crate::fixture::{proc_usage, Controller};
use crate::report::{median, Section};
use crate::scale::{connect_all, connected, identities, Holding};

pub fn run(n: usize, runs: usize) -> anyhow::Result<Section> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let ctl = Controller::start(18600)?;
    eprintln!("dashboard: {n} hosts: making certificates");
    let ids = identities(&ctl, n)?;
    let ca = std::fs::read_to_string(ctl.pki().join("ca.pem"))?;
    eprintln!("dashboard: {n} hosts: connecting");
    let failures = connect_all(&rt, &[ctl.port], &ca, ids, Holding::Apps);
    let start = Instant::now();
    let mut held = connected(&ctl)?;
    while held < n && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(1));
        held = connected(&ctl)?;
    }
    if held < n {
        bail!("{held} of {n} hosts connected ({failures} failed to)");
    }

    let mut ui = ctl
        .convoy_command(&["ui", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(ui.stdout.take().context("stdout")?).read_line(&mut line)?;
    let (addr, token) = dashboard_link(&line).context("convoy ui's link")?;
    let (rss_idle, _) = proc_usage(ui.id());
    let first = http_request(addr, "GET", &format!("/?token={token}"), &[], "").context("convoy ui answers")?;
    let cookie = first
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .context("a session cookie")?
        .to_owned();

    let mut rows = Vec::new();
    let pages = [
        ("fleet matrix (`/`)", "/".to_owned()),
        ("hosts, first page of 100 (`/hosts`)", "/hosts".to_owned()),
        ("hosts, page 51 (`/hosts?page=50`)", "/hosts?page=50".to_owned()),
        (
            "hosts filtered to one (`/hosts?q=agent09999`)",
            format!("/hosts?q=agent{:05}", n - 1),
        ),
    ];
    for (what, path) in &pages {
        let mut ms = Vec::new();
        let mut bytes = 0;
        for _ in 0..runs.max(5) {
            let t = Instant::now();
            let r = http_request(addr, "GET", path, &[("Cookie", &cookie)], "").context("answer")?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            if r.status != 200 {
                bail!("{path}: {} {}", r.status, r.body);
            }
            bytes = r.body.len();
        }
        rows.push(vec![
            (*what).to_owned(),
            format!("{:.0} ms", median(ms)),
            format!("{:.1} KiB", bytes as f64 / 1024.0),
        ]);
    }
    let mut ms = Vec::new();
    let mut bytes = 0;
    for _ in 0..runs.max(5) {
        let t = Instant::now();
        bytes = ctl.convoy(&["hosts", "--output", "json"])?.len();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    rows.push(vec![
        "the CLI instead: `convoy hosts --output json` (every host)".into(),
        format!("{:.0} ms", median(ms)),
        format!("{:.1} KiB", bytes as f64 / 1024.0),
    ]);
    let (rss_after, _) = proc_usage(ui.id());
    let _ = ui.kill();
    let _ = ui.wait();
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(Section {
        key: "dashboard",
        title: format!("7. The dashboard with {n} hosts"),
        command: format!("scripts/bench dashboard --hosts {n} --runs {runs}"),
        header: vec!["page", "answer (median)", "size"],
        rows,
        notes: vec![
            format!(
                "{n} agent sessions on one controller (SQLite), each host running three apps in one of three \
                 environments; `convoy ui` on loopback, asked over HTTP/1.1 with its session cookie, {} times \
                 each (median). The time is the whole page: `convoy ui` calling the controller over mutual TLS \
                 and rendering the HTML.",
                runs.max(5)
            ),
            format!(
                "`convoy ui`'s memory: {:.1} MiB resident before the first page, {:.1} MiB after all of them.",
                rss_idle as f64 / (1 << 20) as f64,
                rss_after as f64 / (1 << 20) as f64
            ),
        ],
    })
}
