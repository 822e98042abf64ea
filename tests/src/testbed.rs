//! Boots and tears down a fleet of test hosts and one controller.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use convoy_nspawn::wait_for;

/// Port of the controller on the bridge.
const CONTROLLER_PORT: u16 = 7443;

thread_local! {
    /// Controllers the next boot starts (`boot_cluster`).
    static CLUSTER: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}
/// Port of the controller's Prometheus endpoint on the bridge.
const METRICS_PORT: u16 = 9464;
/// Port the demo app listens on inside each host.
pub const DEMO_PORT: u16 = 8080;

/// Directory holding the workspace's built binaries (target/debug).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CONVOY_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/debug/deps/<test> or target/debug/<bin>
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The cached Debian root filesystem the hosts boot from.
pub fn rootfs() -> PathBuf {
    std::env::var("CONVOY_TESTBED_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target/testbed/rootfs"))
}

/// GET http://<addr><path> (HTTP/1.1, one request); `None` when nothing
/// answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, &[], "").map(|r| (r.status, r.body))
}

/// The address and one-time token in the line `convoy ui` prints first
/// (`convoy ui: http://127.0.0.1:PORT/?token=T`).
pub fn dashboard_link(line: &str) -> Option<(SocketAddr, String)> {
    let url = line.split_whitespace().find(|w| w.starts_with("http://"))?;
    let (addr, token) = url.trim_start_matches("http://").split_once("/?token=")?;
    Some((addr.parse().ok()?, token.to_owned()))
}

/// What `http_request` read back.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// The status line and headers, as received.
    pub head: String,
    pub body: String,
}

impl HttpReply {
    /// The value of the first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 request to `addr` (Host: addr unless `headers` name one),
/// with extra headers and a body; `None` when nothing answers.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<HttpReply> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    // Read the head, then as many bytes as Content-Length says (a server
    // may keep the connection open), or to the end when it says none.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk).ok()? {
            0 => return None,
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut reply = HttpReply {
        status: head.split_whitespace().nth(1)?.parse().ok()?,
        head,
        body: String::new(),
    };
    let mut body = buf.split_off(head_end + 4);
    match reply.header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        Some(len) => {
            while body.len() < len {
                match s.read(&mut chunk).ok()? {
                    0 => break,
                    n => body.extend_from_slice(&chunk[..n]),
                }
            }
        }
        None => {
            s.read_to_end(&mut body).ok()?;
        }
    }
    reply.body = String::from_utf8_lossy(&body).into_owned();
    Some(reply)
}

/// The arguments of `convoy deploy demo VERSION --env staging` as a
/// canary with `stages` and `bake`.
pub fn canary_deploy<'a>(version: &'a str, stages: &'a str, bake: &'a str) -> Vec<&'a str> {
    vec![
        "deploy",
        "demo",
        version,
        "--env",
        "staging",
        "--strategy",
        "canary",
        "--stages",
        stages,
        "--bake",
        bake,
    ]
}

/// The id in a rollout's first line of output: "rollout ID: ...".
pub fn rollout_id(out: &str) -> String {
    out.split_whitespace()
        .nth(1)
        .unwrap_or("")
        .trim_end_matches(':')
        .to_owned()
}

/// Reads a child's stdout lines on a thread, so a test can wait for one
/// with a timeout while the child keeps running.
pub fn line_feed(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

pub fn wait_line(rx: &std::sync::mpsc::Receiver<String>, what: &str, seen: &mut Vec<String>) -> Result<String> {
    loop {
        let line = rx.recv_timeout(std::time::Duration::from_secs(60))?;
        seen.push(line.clone());
        if line.contains(what) {
            return Ok(line);
        }
    }
}

/// One booted host.
pub struct Host {
    /// The name in its certificate: host1, host2, ...
    pub name: String,
    /// nspawn machine name (unique on this machine).
    pub machine: String,
    pub ip: Ipv4Addr,
    nspawn: Child,
    /// PID of the host's systemd (PID 1 inside).
    pub leader: u32,
}

impl Host {
    /// Runs a command inside the host (all namespaces).
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        convoy_nspawn::exec(self.leader, args)
    }

    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        convoy_nspawn::exec_ok(self.leader, args)
    }

    /// A systemd property of a unit inside the host.
    pub fn unit_property(&self, unit: &str, prop: &str) -> Result<String> {
        Ok(self
            .exec_ok(&["systemctl", "show", "-p", prop, "--value", unit])?
            .trim()
            .to_owned())
    }

    /// GET http://<host>:8080<path> over the bridge; `None` when nothing answers.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(SocketAddr::from((self.ip, DEMO_PORT)), path)
    }

    /// Restarts the agent with the failpoint `name` armed (see
    /// agent/src/crash.rs), or with none.
    pub fn set_failpoint(&self, name: Option<&str>) -> Result<()> {
        self.arm_failpoints(name.map(|n| format!("{n}=return")))
    }

    /// `set_failpoint` with the `fail` crate's action for the point, e.g.
    /// `1*off->return` to pass it once and kill the agent the second time.
    pub fn set_failpoint_action(&self, name: &str, action: &str) -> Result<()> {
        self.arm_failpoints(Some(format!("{name}={action}")))
    }

    fn arm_failpoints(&self, failpoints: Option<String>) -> Result<()> {
        let dropin = "/run/systemd/system/convoy-agent.service.d";
        let script = match failpoints {
            Some(f) => format!(
                "mkdir -p {dropin} && printf '[Service]\\nEnvironment=\"FAILPOINTS={f}\"\\n' > {dropin}/failpoint.conf"
            ),
            None => format!("rm -f {dropin}/failpoint.conf"),
        };
        self.exec_ok(&["sh", "-c", &script])?;
        self.exec_ok(&["systemctl", "daemon-reload"])?;
        self.exec_ok(&["systemctl", "restart", "convoy-agent.service"])
            .map_err(|e| {
                // Say why the start failed (the unit's result and exit
                // status, its journal), so a failure names its cause.
                let why = self
                    .exec(&[
                        "sh",
                        "-c",
                        "systemctl show -p Result -p ExecMainStatus -p ExecMainCode convoy-agent.service; \
                         journalctl --no-pager -n 20 -u convoy-agent.service",
                    ])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                anyhow!("{e}\n{why}")
            })?;
        Ok(())
    }

    /// Whether the failpoint `name` fired on this host since it booted.
    pub fn failpoint_fired(&self, name: &str) -> bool {
        self.exec(&["test", "-e", &format!("/run/convoy-failpoint.{name}")])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// SIGKILLs the agent's main process; systemd restarts it.
    pub fn kill_agent(&self) -> Result<()> {
        let pid = self.unit_property("convoy-agent.service", "MainPID")?;
        if pid != "0" {
            self.exec_ok(&["sh", "-c", &format!("kill -KILL {pid}")])?;
        }
        Ok(())
    }

    /// The version the demo app serves, if it answers.
    pub fn serving(&self) -> Option<String> {
        let (status, body) = self.http_get("/")?;
        (status == 200).then(|| body.trim().trim_start_matches("demo ").to_owned())
    }
}

pub struct Testbed {
    pub dir: tempfile::TempDir,
    pub bridge: String,
    pub subnet: u8,
    pub hosts: Vec<Host>,
    controller: Option<Child>,
    /// Extra environment for the controller process (e.g. FAILPOINTS); c1
    /// alone in a cluster.
    pub controller_env: Vec<(String, String)>,
    agent_extra: String,
    bins: PathBuf,
    /// Hosts get the agent from its Debian package (see `boot_packaged`).
    packaged: bool,
    /// The environments of the demo app's spec, in promotion order.
    envs: Vec<String>,
    /// A Prometheus scraping every host's demo app (see `boot_analysed`).
    prometheus: Option<crate::prometheus::Prometheus>,
    with_prometheus: bool,
    /// The controller's PostgreSQL (see `boot_on_postgres`); SQLite without.
    pub postgres: Option<convoy_nspawn::postgres::Postgres>,
    with_postgres: bool,
    /// Controllers 2.. (see `boot_cluster`); index 0 is `controller`.
    others: Vec<Option<Child>>,
    controllers: usize,
}

/// Result of a CLI call.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Testbed {
    /// Boots `n` hosts labelled env=staging, a controller, and waits until
    /// every agent is connected.
    pub fn boot(n: usize) -> Result<Testbed> {
        Self::boot_with(n, |_| "staging".to_owned())
    }

    pub fn boot_with(n: usize, env_of: impl Fn(usize) -> String) -> Result<Testbed> {
        let spec = fs::read_to_string(workspace_root().join("tests/testbed/demo.toml"))?;
        Self::boot_spec(n, env_of, &spec)
    }

    /// Boots with `spec` as the demo app's spec (its `environments` line is
    /// replaced by the defaults and the labels in use).
    pub fn boot_spec(n: usize, env_of: impl Fn(usize) -> String, spec: &str) -> Result<Testbed> {
        Self::boot_full(n, env_of, spec, "")
    }

    /// Like `boot_spec`, with extra top-level settings in every agent's
    /// agent.toml (e.g. `trusted_keys = [...]`).
    pub fn boot_full(n: usize, env_of: impl Fn(usize) -> String, spec: &str, agent_extra: &str) -> Result<Testbed> {
        Self::boot_inner(n, &env_of, spec, agent_extra, false, false, false)
    }

    /// Boots `n` hosts (env=staging) and `controllers` controllers named
    /// c1, c2… on one PostgreSQL, on the controller address at ports
    /// 7443, 7444…; every agent and the operator's CLI know them all.
    pub fn boot_cluster(n: usize, controllers: usize) -> Result<Testbed> {
        let spec = fs::read_to_string(workspace_root().join("tests/testbed/demo.toml"))?;
        CLUSTER.with(|c| c.set(controllers));
        let bed = Self::boot_inner(n, &|_| "staging".to_owned(), &spec, "", false, false, true);
        CLUSTER.with(|c| c.set(1));
        bed
    }

    /// Like `boot`, with the controller keeping its state in a real
    /// PostgreSQL (`database = "postgres://..."`) instead of SQLite.
    pub fn boot_on_postgres(n: usize) -> Result<Testbed> {
        let spec = fs::read_to_string(workspace_root().join("tests/testbed/demo.toml"))?;
        Self::boot_inner(n, &|_| "staging".to_owned(), &spec, "", false, false, true)
    }

    /// Boots `n` hosts (env=staging) and a real Prometheus scraping each
    /// host's demo app every second (label `host` = the host's name); the
    /// controller measures metric gates on it (`prometheus_url`).
    pub fn boot_analysed(n: usize, spec: &str) -> Result<Testbed> {
        Self::boot_inner(n, &|_| "staging".to_owned(), spec, "", false, true, false)
    }

    /// The test bed's Prometheus (`boot_analysed`).
    pub fn prometheus(&mut self) -> &mut crate::prometheus::Prometheus {
        self.prometheus.as_mut().expect("booted with boot_analysed")
    }

    /// Boots `n` hosts (env=staging) without an agent: target/packages (the
    /// packages `scripts/package` built) is at /packages, and the host's
    /// certificate, key, CA and an agent.toml that expects them in
    /// /etc/convoy/tls are at /etc/convoy-testbed. The controller runs.
    pub fn boot_packaged(n: usize) -> Result<Testbed> {
        let spec = fs::read_to_string(workspace_root().join("tests/testbed/demo.toml"))?;
        Self::boot_inner(n, &|_| "staging".to_owned(), &spec, "", true, false, false)
    }

    /// The Debian package `name` (e.g. `convoy-agent_0.1.0-1`) that
    /// `scripts/package` built, as the packaged hosts see it.
    pub fn package(name: &str) -> Result<String> {
        let file = format!("{name}_amd64.deb");
        if !workspace_root().join("target/packages").join(&file).exists() {
            bail!(
                "target/packages/{file} is missing: run scripts/package --no-build --profile dev (scripts/test does)"
            );
        }
        Ok(format!("/packages/{file}"))
    }

    fn boot_inner(
        n: usize,
        env_of: &dyn Fn(usize) -> String,
        spec: &str,
        agent_extra: &str,
        packaged: bool,
        with_prometheus: bool,
        with_postgres: bool,
    ) -> Result<Testbed> {
        let bins = bin_dir();
        for b in ["convoy", "convoy-agent", "demo-app"] {
            if !bins.join(b).exists() {
                bail!(
                    "{} is missing: run `cargo build --workspace --bins` first",
                    bins.join(b).display()
                );
            }
        }
        if !convoy_nspawn::rootfs_ready(&rootfs()) {
            bail!(
                "no test-bed rootfs at {}: run scripts/testbed-setup",
                rootfs().display()
            );
        }
        let (bridge, [_, subnet]) = convoy_nspawn::allocate_bridge("convoybr", (0..=200).map(|n| (18, n)))?;
        let mut bed = Testbed {
            dir: tempfile::Builder::new().prefix("convoy-testbed-").tempdir()?,
            bridge,
            subnet,
            hosts: Vec::new(),
            controller: None,
            controller_env: Vec::new(),
            agent_extra: agent_extra.to_owned(),
            bins,
            packaged,
            envs: vec![],
            prometheus: None,
            with_prometheus,
            postgres: None,
            with_postgres,
            others: Vec::new(),
            controllers: 1,
        };
        bed.controllers = CLUSTER.with(|c| c.get());
        bed.others = (1..bed.controllers).map(|_| None).collect();
        bed.setup(n, env_of, spec)?;
        Ok(bed)
    }

    pub fn controller_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 1)
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn setup(&mut self, n: usize, env_of: &dyn Fn(usize) -> String, spec: &str) -> Result<()> {
        let pki = self.pki();
        let ip = self.controller_ip().to_string();
        self.convoy_ok(&["pki", "init", "--dir", pki.to_str().unwrap()])?;
        self.convoy_ok(&[
            "pki",
            "issue",
            "controller",
            "controller",
            "--dir",
            pki.to_str().unwrap(),
            "--san",
            &ip,
        ])?;
        self.convoy_ok(&["pki", "issue", "operator", "operator", "--dir", pki.to_str().unwrap()])?;

        // Controller
        let cdir = self.controller_dir(0);
        fs::create_dir_all(cdir.join("apps"))?;
        // The environments in use come first, so the first needs no promotion.
        for e in (1..=n)
            .map(env_of)
            .chain(["development", "staging", "production"].map(String::from))
        {
            if !self.envs.contains(&e) {
                self.envs.push(e);
            }
        }
        self.set_spec(spec)?;
        let mut prometheus = String::new();
        if self.with_prometheus {
            let targets: Vec<(String, SocketAddr)> = (1..=n)
                .map(|i| (format!("host{i}"), SocketAddr::from((self.host_ip(i), DEMO_PORT))))
                .collect();
            let p = crate::prometheus::Prometheus::start(&self.dir.path().join("prometheus"), &targets)?;
            prometheus = format!("prometheus_url = \"{}\"\n", p.url());
            self.prometheus = Some(p);
        }
        let mut database = String::new();
        if self.with_postgres {
            let pg = convoy_nspawn::postgres::Postgres::start()?;
            pg.create_database("convoy")?;
            database = format!("database = \"{}\"\n", pg.url("convoy"));
            self.postgres = Some(pg);
        }
        if self.controllers > 1 {
            database.push_str(&format!(
                "name = \"c1\"\nconfig_key = \"{}/config.key\"\n",
                cdir.display()
            ));
            for i in 1..self.controllers {
                let other = self.controller_dir(i);
                fs::create_dir_all(&other)?;
                fs::write(
                    other.join("controller.toml"),
                    format!(
                        "database = \"{db}\"\nname = \"c{n}\"\nconfig_key = \"{d}/config.key\"\nlisten = \"{ip}:{port}\"\ndata_dir = \"{o}/data\"\napps_dir = \"{d}/apps\"\nca = \"{p}/ca.pem\"\ncert = \"{p}/controller.pem\"\nkey = \"{p}/controller.key\"\nhost_timeout = \"2m\"\n",
                        db = self.postgres.as_ref().expect("a cluster runs on PostgreSQL").url("convoy"),
                        n = i + 1,
                        d = cdir.display(),
                        o = other.display(),
                        p = pki.display(),
                        port = CONTROLLER_PORT + i as u16,
                    ),
                )?;
            }
        }
        fs::write(
            cdir.join("controller.toml"),
            format!(
                "{database}listen = \"{ip}:{CONTROLLER_PORT}\"\ndata_dir = \"{d}/data\"\napps_dir = \"{d}/apps\"\nca = \"{p}/ca.pem\"\ncert = \"{p}/controller.pem\"\nkey = \"{p}/controller.key\"\nhost_timeout = \"2m\"\nmetrics_listen = \"{ip}:{METRICS_PORT}\"\n{prometheus}",
                d = cdir.display(),
                p = pki.display()
            ),
        )?;
        for i in 0..self.controllers {
            self.start_controller_at(i)?;
        }

        for i in 1..=n {
            let host = self.boot_host(i, &env_of(i))?;
            self.hosts.push(host);
        }
        if self.packaged {
            return Ok(());
        }
        for h in &self.hosts {
            h.exec_ok(&["systemctl", "start", "convoy-agent.service"])?;
        }
        if let Err(e) = self.wait_connected(n) {
            self.dump_diagnostics();
            return Err(e);
        }
        Ok(())
    }

    /// Writes the demo app's spec on the controller (read at each deploy);
    /// its `environments` line is replaced by the test bed's.
    pub fn set_spec(&self, spec: &str) -> Result<()> {
        let envs = &self.envs;
        let spec: String = spec
            .lines()
            .map(|l| match l.starts_with("environments") {
                true => format!("environments = {envs:?}\n"),
                false => format!("{l}\n"),
            })
            .collect();
        fs::write(self.controller_dir(0).join("apps/demo.toml"), spec)?;
        Ok(())
    }

    /// Starts a real HAProxy in front of every host's demo app (backend
    /// `web`, one server per host named as the host).
    pub fn start_haproxy(&self) -> Result<crate::haproxy::Haproxy> {
        let servers: Vec<(String, SocketAddr)> = self
            .hosts
            .iter()
            .map(|h| (h.name.clone(), SocketAddr::from((h.ip, DEMO_PORT))))
            .collect();
        crate::haproxy::Haproxy::start(&self.dir.path().join("haproxy"), &servers)
    }

    /// Starts a real HAProxy in front of every host's two blue-green
    /// slots (backend `web`, servers `HOST-blue` on `port_of(blue)` and
    /// `HOST-green`), both drained until convoy switches traffic.
    pub fn start_haproxy_slots(&self, blue_port: u16, green_port: u16) -> Result<crate::haproxy::Haproxy> {
        let servers: Vec<(String, SocketAddr)> = self
            .hosts
            .iter()
            .flat_map(|h| {
                [
                    (format!("{}-blue", h.name), SocketAddr::from((h.ip, blue_port))),
                    (format!("{}-green", h.name), SocketAddr::from((h.ip, green_port))),
                ]
            })
            .collect();
        crate::haproxy::Haproxy::start(&self.dir.path().join("haproxy"), &servers)
    }

    fn host_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 10 + i as u8)
    }

    /// Starts (or restarts) the controller process.
    pub fn start_controller(&mut self) -> Result<()> {
        self.start_controller_at(0)
    }

    /// Activation results recorded for rollout `id` in the controllers'
    /// PostgreSQL (`boot_on_postgres`, `boot_cluster`).
    pub fn recorded_activations(&self, id: &str) -> Result<usize> {
        let pg = self.postgres.as_ref().context("booted without PostgreSQL")?;
        let n = pg.psql(
            "convoy",
            &format!("SELECT count(*) FROM rollout_hosts WHERE rollout_id = '{id}' AND op_id LIKE '%:activate:%'"),
        )?;
        Ok(n.trim().parse()?)
    }

    /// Starts (or restarts) controller `i + 1` of a cluster (0: c1, the
    /// controller of a bed with one) and waits until it listens.
    pub fn start_controller_at(&mut self, i: usize) -> Result<()> {
        let dir = self.controller_dir(i);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("controller.log"))?;
        let env = if i == 0 { &self.controller_env[..] } else { &[] };
        let child = Command::new(self.bins.join("convoy"))
            .args(["serve", "--config"])
            .arg(dir.join("controller.toml"))
            .env("CONVOY_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        *self.controller_child(i) = Some(child);
        let addr = SocketAddr::from((self.controller_ip(), CONTROLLER_PORT + i as u16));
        wait_for(
            &format!("controller c{} to listen", i + 1),
            Duration::from_secs(20),
            || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok(),
        )?;
        Ok(())
    }

    /// Kills controller `i + 1` of a cluster with SIGKILL (0: c1).
    pub fn kill_controller_at(&mut self, i: usize) {
        if let Some(mut c) = self.controller_child(i).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Controller `i + 1`'s process (0: c1), while it runs.
    fn controller_child(&mut self, i: usize) -> &mut Option<Child> {
        match i {
            0 => &mut self.controller,
            i => &mut self.others[i - 1],
        }
    }

    /// Sends controller `i + 1` (0: c1) a signal by name (`STOP`, `CONT`):
    /// a paused process, as a frozen VM or a long GC pause would leave it.
    pub fn signal_controller_at(&mut self, i: usize, signal: &str) -> Result<()> {
        let pid = self
            .controller_child(i)
            .as_ref()
            .context("that controller is not running")?
            .id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid}: {status}");
        Ok(())
    }

    /// Whether controller `i + 1` (0: c1) is stopped (SIGSTOP).
    pub fn controller_is_stopped(&mut self, i: usize) -> bool {
        let Some(pid) = self.controller_child(i).as_ref().map(Child::id) else {
            return false;
        };
        // /proc/PID/stat: "PID (comm) STATE ..."; T is stopped.
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')))
    }

    /// Controller `i + 1`'s log (0: c1).
    pub fn controller_log_at(&self, i: usize) -> String {
        fs::read_to_string(self.controller_dir(i).join("controller.log")).unwrap_or_default()
    }

    /// Controller `i + 1`'s directory (0: c1): its config, log and data.
    fn controller_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(match i {
            0 => "controller".to_owned(),
            i => format!("controller{}", i + 1),
        })
    }

    /// Every controller's URL, in order.
    pub fn controller_urls(&self) -> Vec<String> {
        (0..self.controllers)
            .map(|i| format!("https://{}:{}", self.controller_ip(), CONTROLLER_PORT + i as u16))
            .collect()
    }

    fn boot_host(&self, i: usize, env: &str) -> Result<Host> {
        let name = format!("host{i}");
        let machine = format!("cv{}h{i}", self.subnet);
        let ip = self.host_ip(i);
        let pki = self.pki();
        let etc = self.dir.path().join("hosts").join(&name);
        fs::create_dir_all(&etc)?;
        self.convoy_ok(&[
            "pki",
            "issue",
            "agent",
            &name,
            "--dir",
            pki.to_str().unwrap(),
            "--out",
            etc.to_str().unwrap(),
        ])?;
        fs::copy(pki.join("ca.pem"), etc.join("ca.pem"))?;
        // Packaged hosts keep them where the package's template says.
        let tls = if self.packaged {
            "/etc/convoy/tls"
        } else {
            "/etc/convoy"
        };
        let controllers = match self.controllers {
            1 => format!("controller = \"https://{}:{CONTROLLER_PORT}\"", self.controller_ip()),
            _ => format!("controllers = {:?}\nname = \"{name}\"", self.controller_urls()),
        };
        fs::write(
            etc.join("agent.toml"),
            format!(
                "{controllers}\nserver_name = \"controller\"\nca = \"{tls}/ca.pem\"\ncert = \"{tls}/{name}.pem\"\nkey = \"{tls}/{name}.key\"\nunit_timeout = \"30s\"\n{}\n\n[labels]\nenv = \"{env}\"\nzone = \"z{}\"\n",
                self.agent_extra,
                i % 2
            ),
        )?;
        let bind = |from: &Path, to: &str| (from.to_path_buf(), to.to_owned());
        let mut binds_ro: Vec<(PathBuf, String)> = if self.packaged {
            vec![
                bind(&etc, "/etc/convoy-testbed"),
                bind(&workspace_root().join("target/packages"), "/packages"),
            ]
        } else {
            vec![
                bind(&self.bins.join("convoy-agent"), "/usr/bin/convoy-agent"),
                bind(&self.bins.join("convoy"), "/usr/bin/convoy"),
                bind(&etc, "/etc/convoy"),
                bind(
                    &workspace_root().join("packaging/convoy-agent.service"),
                    "/etc/systemd/system/convoy-agent.service",
                ),
            ]
        };
        binds_ro.push(bind(
            &workspace_root().join("tests/testbed/demo.service"),
            "/etc/systemd/system/demo.service",
        ));
        binds_ro.push(bind(
            &workspace_root().join("tests/testbed/demo@.service"),
            "/etc/systemd/system/demo@.service",
        ));
        let booted = convoy_nspawn::boot(&convoy_nspawn::HostSpec {
            rootfs: &rootfs(),
            machine: &machine,
            bridge: &self.bridge,
            ip,
            binds_ro,
            binds_rw: vec![],
            console: self.dir.path().join(format!("{name}.console.log")),
            detach: false,
        })?;
        let host = Host {
            name,
            machine,
            ip,
            nspawn: booted.nspawn,
            leader: booted.leader,
        };
        Ok(host)
    }

    /// Waits until the controller reports `n` connected hosts.
    /// On a timeout the controller's log and the hosts' journals are printed.
    /// An agent whose first attempts failed retries at most every 15 s
    /// (plus jitter), so the wait spans several of its attempts.
    pub fn wait_connected(&self, n: usize) -> Result<()> {
        // Through each controller: with several, every one of them must
        // see every host (its own sessions and those the others published)
        // before a test deploys through any.
        let urls = self.controller_urls();
        wait_for("all agents to connect", Duration::from_secs(60), || {
            urls.iter()
                .all(|url| {
                    let seen = || -> Option<usize> {
                        let out = self
                            .convoy_spawn_at(url, &["status", "demo", "--output", "json"])
                            .ok()?
                            .wait_with_output()
                            .ok()?;
                        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                        Some(v["hosts"].as_array()?.iter().filter(|h| h["connected"] == true).count())
                    };
                    seen() == Some(n)
                })
                .then_some(())
        })
        .inspect_err(|_| self.dump_diagnostics())
    }

    /// Waits until the controller reports `host` connected.
    pub fn wait_host_connected(&self, host: &str) -> Result<()> {
        wait_for(&format!("{host} to connect"), Duration::from_secs(30), || {
            let status = self.status().ok()?;
            (Self::host_status(&status, host).ok()?["connected"] == true).then_some(())
        })
    }

    /// Runs the `convoy` CLI as the operator.
    pub fn convoy(&self, args: &[&str]) -> Result<CliOutput> {
        let out = self.convoy_spawn(args)?.wait_with_output()?;
        Ok(CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs the `convoy` CLI with another certificate and key than the
    /// operator's (another operator, a viewer, an agent, a foreign CA).
    pub fn convoy_as(&self, cert: &Path, key: &Path, args: &[&str]) -> Result<CliOutput> {
        let mut all = vec!["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()];
        all.extend_from_slice(args);
        self.convoy(&all)
    }

    /// Runs the `convoy` CLI as the operator on a pseudo-terminal (through
    /// util-linux's `script`), as on an operator's terminal: its output is
    /// what the terminal received, control sequences included.
    pub fn convoy_on_tty(&self, args: &[&str]) -> Result<CliOutput> {
        let quote = |a: &str| format!("'{}'", a.replace('\'', "'\\''"));
        let line: Vec<String> = std::iter::once(self.bins.join("convoy").display().to_string())
            .chain(args.iter().map(|a| a.to_string()))
            .map(|a| quote(&a))
            .collect();
        let mut cmd = Command::new("script");
        cmd.args(["-q", "-e", "-c", &line.join(" "), "/dev/null"])
            .env("COLUMNS", "120");
        let out = self.operator_env(&mut cmd).output()?;
        Ok(CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The operator's environment for a `convoy` command.
    fn operator_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let pki = self.pki();
        cmd.env("CONVOY_CONTROLLER", self.controller_urls().join(","))
            .env("CONVOY_SERVER_NAME", "controller")
            .env("CONVOY_CA", pki.join("ca.pem"))
            .env("CONVOY_CERT", pki.join("operator.pem"))
            .env("CONVOY_KEY", pki.join("operator.key"))
            .stdin(Stdio::null())
    }

    /// Starts the `convoy` CLI as the operator, talking to the controller
    /// at `url` only, without waiting for it.
    pub fn convoy_spawn_at(&self, url: &str, args: &[&str]) -> Result<Child> {
        let mut cmd = Command::new(self.bins.join("convoy"));
        cmd.args(args);
        Ok(self
            .operator_env(&mut cmd)
            .env("CONVOY_CONTROLLER", url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Runs the `convoy` CLI against the controller at `url` only, as
    /// another identity than the operator's.
    pub fn convoy_at_as(&self, url: &str, cert: &Path, key: &Path, args: &[&str]) -> Result<CliOutput> {
        let mut all = vec!["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.convoy_spawn_at(url, &all)?.wait_with_output()?;
        Ok(CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Starts the `convoy` CLI as the operator without waiting for it.
    pub fn convoy_spawn(&self, args: &[&str]) -> Result<Child> {
        let mut cmd = Command::new(self.bins.join("convoy"));
        cmd.args(args);
        Ok(self
            .operator_env(&mut cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    pub fn convoy_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.convoy(args)?;
        if out.code != 0 {
            // The hosts' journals say why, e.g. why an app restarted.
            self.dump_diagnostics();
            bail!("convoy {args:?} exited {}: {}{}", out.code, out.stdout, out.stderr);
        }
        Ok(out.stdout)
    }

    /// Packs the demo app as `version` with `mode` (healthy, unhealthy,
    /// crash) and returns the artifact's path.
    pub fn pack_demo(&self, version: &str, mode: &str) -> Result<PathBuf> {
        self.pack_demo_with(version, mode, &[])
    }

    /// Packs and pushes the demo app with extra lines in its release.toml
    /// (e.g. `error_rate = 0.2`, `extra_latency = "300ms"`: see demo-app.rs).
    pub fn push_demo_release(&self, version: &str, release_toml: &str) -> Result<()> {
        let file = self.pack_demo_full(version, "healthy", release_toml, &[])?;
        self.push_file(version, &file)
    }

    /// Packs the demo app as `version` into a zstd-compressed tar.
    pub fn pack_demo_zstd(&self, version: &str) -> Result<PathBuf> {
        self.pack_demo(version, "healthy")?;
        let out = self.dir.path().join(format!("demo-{version}.tar.zst"));
        convoy_common::archive::pack_dir_as(
            &self.dir.path().join(format!("pack-{version}")),
            fs::File::create(&out)?,
            convoy_common::archive::Compression::Zstd,
        )?;
        Ok(out)
    }

    /// Like `pack_demo`, with extra files: (path in the release, content, mode).
    pub fn pack_demo_with(&self, version: &str, mode: &str, extra: &[(&str, &[u8], u32)]) -> Result<PathBuf> {
        self.pack_demo_full(version, mode, "", extra)
    }

    fn pack_demo_full(
        &self,
        version: &str,
        mode: &str,
        release_toml: &str,
        extra: &[(&str, &[u8], u32)],
    ) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let tree = self.dir.path().join(format!("pack-{version}"));
        fs::create_dir_all(tree.join("bin"))?;
        for (path, content, mode) in extra {
            let p = tree.join(path);
            fs::create_dir_all(p.parent().expect("relative path"))?;
            fs::write(&p, content)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
        }
        fs::copy(self.bins.join("demo-app"), tree.join("bin/demo-app"))?;
        fs::write(
            tree.join("release.toml"),
            format!("version = \"{version}\"\nmode = \"{mode}\"\nport = {DEMO_PORT}\n{release_toml}\n"),
        )?;
        let out = self.dir.path().join(format!("demo-{version}.tar.gz"));
        convoy_common::archive::pack_dir(&tree, fs::File::create(&out)?)?;
        Ok(out)
    }

    /// The controller's Prometheus metrics (text format).
    pub fn controller_metrics(&self) -> Result<String> {
        match http_get(SocketAddr::from((self.controller_ip(), METRICS_PORT)), "/metrics") {
            Some((200, body)) => Ok(body),
            other => bail!("GET /metrics on the controller: {other:?}"),
        }
    }

    /// The controller process, while it runs.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(|c| c.id())
    }

    /// Pushes an artifact file as a version of the demo app.
    pub fn push_file(&self, version: &str, file: &Path) -> Result<()> {
        self.convoy_ok(&["release", "push", "demo", version, file.to_str().unwrap()])?;
        Ok(())
    }

    /// The controller's artifact store.
    pub fn artifact_path(&self, digest: &str) -> PathBuf {
        self.controller_dir(0).join("data/artifacts").join(digest)
    }

    /// `convoy history ARGS --output json`, parsed.
    pub fn history(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["history"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--output", "json"]);
        Ok(serde_json::from_str(&self.convoy_ok(&all)?)?)
    }

    /// What each host's demo app serves, in host order ("-" when it does
    /// not answer 200).
    pub fn serving(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h.serving().unwrap_or_else(|| "-".into()))
            .collect()
    }

    /// Deploys `version` of the demo app to every staging host at once.
    pub fn deploy_everywhere(&self, version: &str) -> Result<String> {
        self.convoy_ok(&[
            "deploy",
            "demo",
            version,
            "--env",
            "staging",
            "--strategy",
            "all-at-once",
        ])
    }

    /// Packs and pushes the demo app.
    pub fn push_demo(&self, version: &str, mode: &str) -> Result<()> {
        let file = self.pack_demo(version, mode)?;
        self.convoy_ok(&["release", "push", "demo", version, file.to_str().unwrap()])?;
        Ok(())
    }

    /// `convoy status demo --output json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = self.convoy_ok(&["status", "demo", "--output", "json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    pub fn host_status<'a>(status: &'a serde_json::Value, host: &str) -> Result<&'a serde_json::Value> {
        status["hosts"]
            .as_array()
            .and_then(|a| a.iter().find(|h| h["host"] == host))
            .ok_or_else(|| anyhow!("{host} not in status: {status}"))
    }

    pub fn controller_log(&self) -> String {
        self.controller_log_at(0)
    }

    /// Points host `h`'s agent (0-based) at a config under
    /// /var/lib/convoy-tls (the test bed's /etc/convoy is read-only) that
    /// enrolls as `name` with `token` through controller `c + 1` (0: c1),
    /// and restarts it without waiting for it (some enrollments are meant
    /// to fail).
    pub fn enroll_config(&self, h: usize, name: &str, token: &str, fingerprint: &str, c: usize) -> Result<()> {
        let config = format!(
            "name = \"{name}\"\ncontroller = \"{url}\"\nserver_name = \"controller\"\n\
             ca = \"/var/lib/convoy-tls/ca.pem\"\ncert = \"/var/lib/convoy-tls/agent.pem\"\nkey = \"/var/lib/convoy-tls/agent.key\"\n\
             enroll_token = \"{token}\"\nca_fingerprint = \"{fingerprint}\"\nunit_timeout = \"30s\"\n\n[labels]\nenv = \"production\"\n",
            url = self.controller_urls()[c]
        );
        let host = &self.hosts[h];
        host.exec_ok(&["systemctl", "stop", "convoy-agent"])?;
        host.exec_ok(&[
            "sh",
            "-c",
            &format!(
                "rm -rf /var/lib/convoy-tls && mkdir -p /var/lib/convoy-tls /etc/systemd/system/convoy-agent.service.d && \
                 umask 077 && printf '%s' '{config}' > /var/lib/convoy-tls/agent.toml && \
                 printf '[Service]\\nExecStart=\\nExecStart=/usr/bin/convoy-agent --config /var/lib/convoy-tls/agent.toml\\n' \
                   > /etc/systemd/system/convoy-agent.service.d/enroll.conf && systemctl daemon-reload"
            ),
        ])?;
        host.exec_ok(&["systemctl", "start", "--no-block", "convoy-agent"])?;
        Ok(())
    }

    /// Puts `lines` at the top of controller.toml, restarts the controller
    /// and waits until every host is connected again.
    pub fn reconfigure_controller(&mut self, lines: &str) -> Result<()> {
        self.reconfigure_controller_at(0, lines)
    }

    /// The same for controller `i + 1` of a cluster (0: c1).
    pub fn reconfigure_controller_at(&mut self, i: usize, lines: &str) -> Result<()> {
        let conf = self.controller_dir(i).join("controller.toml");
        let text = fs::read_to_string(&conf)?;
        fs::write(&conf, format!("{lines}\n{text}"))?;
        self.kill_controller_at(i);
        self.start_controller_at(i)?;
        self.wait_connected(self.hosts.len())
    }

    /// Kills the controller (SIGKILL) and waits for it.
    pub fn kill_controller(&mut self) {
        self.kill_controller_at(0)
    }

    fn dump_diagnostics(&self) {
        eprintln!("──── controller log ────\n{}", tail(&self.controller_log(), 200));
        if let Some(p) = &self.prometheus {
            eprintln!("──── prometheus log ────\n{}", tail(&p.log(), 20));
        }
        for h in &self.hosts {
            if let Ok(o) = h.exec(&[
                "journalctl",
                "--no-pager",
                "-n",
                "150",
                "-u",
                "convoy-agent",
                "-u",
                "demo",
            ]) {
                eprintln!("──── {} journal ────\n{}", h.name, String::from_utf8_lossy(&o.stdout));
            }
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("CONVOY_TESTBED_VERBOSE").is_some() {
            self.dump_diagnostics();
        }
        for h in &mut self.hosts {
            // SIGTERM asks nspawn to shut the host down cleanly.
            convoy_nspawn::kill(h.nspawn.id(), "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for h in &mut self.hosts {
            loop {
                match h.nspawn.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        // Killing nspawn alone would leave the host's
                        // systemd (its pid namespace's init) running;
                        // killing that ends every process in the host.
                        convoy_nspawn::kill(h.leader, "KILL");
                        let _ = h.nspawn.kill();
                        let _ = h.nspawn.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        self.kill_controller();
        for i in 1..self.controllers {
            self.kill_controller_at(i);
        }
        convoy_nspawn::remove_bridge(&self.bridge);
    }
}
