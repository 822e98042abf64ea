//! Many agents on one controller: lightweight agent clients in this
//! process, each with its own certificate and real mutual TLS, open a
//! session, say hello and heartbeat as agents do. Measured: the
//! controller's memory per idle session, its CPU while they heartbeat,
//! and how long `convoy hosts` takes over all of them.

use std::time::{Duration, Instant};

use anyhow::Context;
use convoy_proto::agent_service_client::AgentServiceClient;
use convoy_proto::{agent_message, AgentMessage, Heartbeat, Hello};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::fixture::Controller;
use crate::report::{median, Section};

/// Agent identities signed by the controller's CA, made in memory.
pub fn identities(ctl: &Controller, n: usize) -> anyhow::Result<Vec<(String, String, String)>> {
    identities_from(&ctl.pki(), 0, n)
}

/// Agent identities `first..first + n`, signed by the CA in `pki`.
fn identities_from(pki: &std::path::Path, first: usize, n: usize) -> anyhow::Result<Vec<(String, String, String)>> {
    let ca_pem = std::fs::read_to_string(pki.join("ca.pem"))?;
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    (first..first + n)
        .map(|i| {
            let name = format!("agent{i:05}");
            let mut p = rcgen::CertificateParams::new(vec![name.clone()])?;
            p.distinguished_name.push(rcgen::DnType::CommonName, name.as_str());
            p.distinguished_name
                .push(rcgen::DnType::OrganizationalUnitName, "agent");
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let key = rcgen::KeyPair::generate()?;
            let cert = p.signed_by(&key, &issuer)?;
            Ok((name, cert.pem(), key.serialize_pem()))
        })
        .collect()
}

/// What a bench agent says it runs: nothing, or (for the dashboard's
/// figures) three apps, in one of three environments by its number.
#[derive(Clone, Copy)]
pub enum Holding {
    Nothing,
    Apps,
}

fn hello(i: usize, holding: Holding) -> Hello {
    let envs = ["development", "staging", "production"];
    let (env, apps) = match holding {
        Holding::Nothing => ("staging", vec![]),
        Holding::Apps => (
            envs[i % 3],
            ["web", "api", "worker"]
                .iter()
                .map(|app| convoy_proto::AppState {
                    app: (*app).into(),
                    // One host in 50 is still on the previous release.
                    current: if i.is_multiple_of(50) { "1.4.0" } else { "1.5.0" }.into(),
                    previous: "1.4.0".into(),
                    releases: vec!["1.4.0".into(), "1.5.0".into()],
                    health: if i.is_multiple_of(97) {
                        convoy_proto::Health::Unhealthy
                    } else {
                        convoy_proto::Health::Healthy
                    } as i32,
                    ..Default::default()
                })
                .collect(),
        ),
    };
    Hello {
        labels: [("env".to_owned(), env.to_owned())].into(),
        apps,
        agent_version: "bench".into(),
        recent_results: vec![],
        protocol: convoy_common::ops::PROTOCOL,
    }
}

/// One agent: connect, hello, heartbeat every 10 s (as agents do) until
/// the process ends.
async fn agent(port: u16, ca: String, cert: String, key: String, hello: Hello) -> anyhow::Result<()> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("controller");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let msg = |body| AgentMessage { body: Some(body) };
    let apps = hello.apps.clone();
    tx.send(msg(agent_message::Body::Hello(hello))).await?;
    let mut inbound = AgentServiceClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if tx
                .send(msg(agent_message::Body::Heartbeat(Heartbeat { apps: apps.clone() })))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    Ok(())
}

/// Connects `ids` as agents, agent i to `ports[i % ports.len()]`, 64 at a
/// time; returns how many failed to connect.
pub fn connect_all(
    rt: &tokio::runtime::Runtime,
    ports: &[u16],
    ca: &str,
    ids: Vec<(String, String, String)>,
    holding: Holding,
) -> usize {
    rt.block_on(async {
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for (i, (_, cert, key)) in ids.into_iter().enumerate() {
            let (ca, gate, port) = (ca.to_owned(), gate.clone(), ports[i % ports.len()]);
            tasks.push(tokio::spawn(async move {
                let _p = gate.acquire().await;
                agent(port, ca, cert, key, hello(i, holding)).await
            }));
        }
        let mut failures = 0;
        for t in tasks {
            if !matches!(t.await, Ok(Ok(()))) {
                failures += 1;
            }
        }
        failures
    })
}

/// Several controllers on one PostgreSQL holding `n` idle sessions
/// between them: their memory per session, `convoy hosts` over all
/// through one of them, and the database's load while the agents
/// heartbeat.
pub fn run_cluster(n: usize, controllers: usize, runs: usize) -> anyhow::Result<Section> {
    let pg = convoy_nspawn::postgres::Postgres::start()?;
    pg.create_database("convoy")?;
    let url = pg.url("convoy");
    let first = Controller::start_in_cluster(19443, "c1", &url, None)?;
    let mut ctls = vec![];
    for i in 1..controllers {
        ctls.push(Controller::start_in_cluster(
            19443 + i as u16,
            &format!("c{}", i + 1),
            &url,
            Some(&first),
        )?);
    }
    ctls.insert(0, first);
    std::thread::sleep(Duration::from_secs(2));
    let rss0: u64 = ctls.iter().map(|c| c.usage().0).sum();
    // One client process per controller: a process may hold fewer sockets
    // than the whole fleet needs.
    eprintln!("scale: {n} sessions over {controllers} controllers: making certificates and connecting");
    let t = Instant::now();
    let per = n / controllers;
    let mut clients = Vec::new();
    for (i, c) in ctls.iter().enumerate() {
        let count = if i + 1 == controllers { n - per * i } else { per };
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["agents", "--pki"])
            .arg(ctls[0].pki())
            .args(["--port", &c.port.to_string(), "--first", &(per * i).to_string()])
            .args(["--count", &count.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().expect("piped");
        clients.push((child, std::io::BufRead::lines(std::io::BufReader::new(out))));
    }
    let mut failures = 0;
    for (_, lines) in &mut clients {
        let line = lines.next().context("an agents process ended early")??;
        failures += line
            .strip_prefix("failed ")
            .and_then(|f| f.trim().parse::<usize>().ok())
            .context("an agents process said something else")?;
    }
    let connect_secs = t.elapsed().as_secs_f64();
    // Every controller sees every host (its own and the others').
    let start = Instant::now();
    let mut held = connected(&ctls[0])?;
    while held < n && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_secs(1));
        held = connected(&ctls[0])?;
    }
    std::thread::sleep(Duration::from_secs(5));
    let rss1: u64 = ctls.iter().map(|c| c.usage().0).sum();
    let cpu0: Duration = ctls.iter().map(|c| c.usage().1).sum();
    let stats = |pg: &convoy_nspawn::postgres::Postgres| -> anyhow::Result<(f64, f64)> {
        let row = pg.psql(
            "convoy",
            "SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = 'convoy'",
        )?;
        let (a, b) = row.trim().split_once('|').context("pg_stat_database")?;
        Ok((a.parse()?, b.parse()?))
    };
    let (x0, w0) = stats(&pg)?;
    let window = Duration::from_secs(30);
    std::thread::sleep(window);
    let (x1, w1) = stats(&pg)?;
    let cpu1: Duration = ctls.iter().map(|c| c.usage().1).sum();
    let cpu = (cpu1 - cpu0).as_secs_f64() / window.as_secs_f64() * 100.0;
    let mut lat = Vec::new();
    for _ in 0..runs.max(3) {
        let t = Instant::now();
        ctls[0].convoy(&["hosts", "--output", "json"]).context("convoy hosts")?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let per = (rss1.saturating_sub(rss0)) as f64 / n as f64 / 1024.0;
    let (xps, wps) = ((x1 - x0) / window.as_secs_f64(), (w1 - w0) / window.as_secs_f64());
    eprintln!(
        "scale: {n} over {controllers}: held {held}, {per:.1} KiB/session, {cpu:.1}% CPU, hosts {:.0} ms, db {xps:.0} tx/s, {wps:.0} rows/s",
        median(lat.clone())
    );
    let mut row = vec![format!("{n} over {controllers}")];
    row.extend(cells(held, failures, connect_secs, (rss0, rss1), per, cpu, lat));
    row.push(format!("{xps:.1} transactions/s, {wps:.1} rows written/s"));
    for (mut child, _) in clients {
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(ctls);
    Ok(Section {
        key: "scale-cluster",
        title: "6b. Several controllers: idle agent sessions on one PostgreSQL".into(),
        command: format!("scripts/bench scale --controllers {controllers} --sessions {n} --runs {runs}"),
        header: vec![
            "sessions",
            "seen by one controller",
            "connect all",
            "controllers' RSS (sum)",
            "per idle session",
            "controllers' CPU with heartbeats (10 s)",
            "`convoy hosts` over all, through one",
            "database load while idle",
        ],
        rows: vec![row],
        notes: vec![
            "Each session is a real agent session as in section 6; a third of them on each controller, \
             each third from a client process of its own (a process here may hold 20,000 files); the \
             controllers share a PostgreSQL 15 cluster on loopback (Debian's package, fsync off as the \
             throwaway test cluster runs). RSS and CPU are summed over the controllers; the database's load \
             is from `pg_stat_database` over the 30 s idle window: the controllers' rounds (leases and \
             liveness every 2 s, the relay every 200 ms, other controllers' hosts every second), and nothing \
             per heartbeat: a heartbeat that changes nothing writes nothing."
                .into(),
            "Per idle session is the controllers' growth over all sessions: each controller holds its own \
             sessions and a view of every other controller's hosts (labels, apps), which one controller \
             alone does not need (46 KiB per session in section 6)."
                .into(),
        ],
    })
}

/// The cells both scale tables share: held, connect time, RSS before and
/// after, per session, CPU, `convoy hosts` latency (median).
fn cells(
    held: usize,
    failures: usize,
    connect_secs: f64,
    (rss0, rss1): (u64, u64),
    per_kib: f64,
    cpu: f64,
    hosts_ms: Vec<f64>,
) -> Vec<String> {
    let failed = match failures {
        0 => String::new(),
        f => format!(" ({f} failed to connect)"),
    };
    vec![
        format!("{held}{failed}"),
        format!("{connect_secs:.1} s"),
        format!(
            "{:.0} MiB → {:.0} MiB",
            rss0 as f64 / 1048576.0,
            rss1 as f64 / 1048576.0
        ),
        format!("{per_kib:.1} KiB"),
        format!("{cpu:.1}% of a core"),
        format!("{:.0} ms", median(hosts_ms)),
    ]
}

pub fn connected(ctl: &Controller) -> anyhow::Result<usize> {
    let v: serde_json::Value = serde_json::from_str(&ctl.convoy(&["hosts", "--output", "json"])?)?;
    Ok(v["hosts"]
        .as_array()
        .map(|h| h.iter().filter(|h| h["connected"] == true).count())
        .unwrap_or(0))
}

pub fn run(sessions: &[usize], runs: usize) -> anyhow::Result<Section> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut rows = Vec::new();
    let mut held_all = true;
    for (k, &n) in sessions.iter().enumerate() {
        let ctl = Controller::start(18443 + k as u16)?;
        eprintln!("scale: {n} sessions: making certificates");
        let ids = identities(&ctl, n)?;
        let ca = std::fs::read_to_string(ctl.pki().join("ca.pem"))?;
        std::thread::sleep(Duration::from_secs(1));
        let (rss0, _) = ctl.usage();
        eprintln!("scale: {n} sessions: connecting");
        let t = Instant::now();
        let failures = connect_all(&rt, &[ctl.port], &ca, ids, Holding::Nothing);
        let connect_secs = t.elapsed().as_secs_f64();
        // Let every hello land, then measure idle.
        let start = Instant::now();
        let mut held = connected(&ctl)?;
        while held < n && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_secs(1));
            held = connected(&ctl)?;
        }
        held_all &= held == n;
        std::thread::sleep(Duration::from_secs(5));
        let (rss1, cpu0) = ctl.usage();
        let window = Duration::from_secs(30);
        std::thread::sleep(window);
        let (_, cpu1) = ctl.usage();
        let cpu = (cpu1 - cpu0).as_secs_f64() / window.as_secs_f64() * 100.0;
        let mut lat = Vec::new();
        for _ in 0..runs.max(3) {
            let t = Instant::now();
            ctl.convoy(&["hosts", "--output", "json"]).context("convoy hosts")?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let per = (rss1.saturating_sub(rss0)) as f64 / n as f64 / 1024.0;
        eprintln!(
            "scale: {n}: held {held}, {per:.1} KiB/session, {cpu:.1}% CPU, hosts {:.0} ms",
            median(lat.clone())
        );
        let mut row = vec![n.to_string()];
        row.extend(cells(held, failures, connect_secs, (rss0, rss1), per, cpu, lat));
        rows.push(row);
        drop(ctl);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(Section {
        key: "scale",
        title: "6. Controller scale: idle agent sessions".into(),
        command: format!(
            "scripts/bench scale --sessions {} --runs {runs}",
            sessions.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
        ),
        header: vec![
            "sessions",
            "held",
            "connect all",
            "controller RSS",
            "per idle session",
            "CPU with heartbeats (10 s)",
            "`convoy hosts` over all",
        ],
        rows,
        notes: vec![
            "Each session is a real agent session: its own certificate (made in memory, signed by the \
             controller's CA), mutual TLS on 127.0.0.1, Hello, then a heartbeat every 10 s; the clients run \
             in the benchmark process, 64 connecting at a time. RSS is the controller's before the first \
             session and 5 s after the last; CPU is the controller's over the next 30 s; `convoy hosts \
             --output json` is the CLI listing every host (median)."
                .into(),
            format!(
                "Goals: under 50 KB per idle session, 10,000 sessions held ({}).",
                if held_all { "all held" } else { "not all held" }
            ),
        ],
    })
}

/// The client side of the cluster run, in a process of its own: agents
/// `first..first + count` connect to `port`, the line `failed N` is
/// printed, and they stay until stdin closes.
pub fn agents(pki: &std::path::Path, port: u16, first: usize, count: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let ids = identities_from(pki, first, count)?;
    let ca = std::fs::read_to_string(pki.join("ca.pem"))?;
    let failures = connect_all(&rt, &[port], &ca, ids, Holding::Nothing);
    println!("failed {failures}");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
