//! `convoy sandbox`: a local fleet to try convoy on. `up` boots N Debian
//! hosts with their own systemd (systemd-nspawn, as the test bed does) on a
//! private bridge in 198.19.N.0/24, starts a controller, enrolls an agent on
//! every host with a one-time token, and leaves an example app ready to
//! push; `status` shows it; `down` removes every process, link and file.
//!
//! Run as root. Everything lives in one directory (default
//! /var/lib/convoy-sandbox); the hosts' root filesystem is built once with
//! debootstrap and kept apart, so the next `up` takes seconds.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use convoy_common::identity::{PeerKind, Role};
use serde::{Deserialize, Serialize};

/// Sandboxes take 198.19.N.0/24 on bridge convoysbxN, the first free N
/// below 10 (the test bed uses 198.18.x.0/24).
const NETS: u8 = 10;
const BRIDGE_PREFIX: &str = "convoysbx";
const PORT: u16 = 7443;
const METRICS_PORT: u16 = 9464;
const AGENT_UNIT: &str = include_str!("../../packaging/convoy-agent.service");
const STATE: &str = "sandbox.json";

pub struct Up {
    pub hosts: usize,
    pub dir: PathBuf,
    pub rootfs: PathBuf,
}

/// What `up` started, for `status` and `down`.
#[derive(Serialize, Deserialize)]
struct State {
    bridge: String,
    /// The sandbox's 198.19.N.0/24.
    net: u8,
    controller_pid: u32,
    hosts: Vec<HostState>,
}

#[derive(Serialize, Deserialize)]
struct HostState {
    name: String,
    machine: String,
    ip: Ipv4Addr,
    nspawn_pid: u32,
    leader: u32,
}

fn controller_ip(net: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, net, 1)
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("finding the convoy binary")
}

/// The agent binary the hosts run: beside this `convoy`, else installed.
fn agent_binary() -> Result<PathBuf> {
    let beside = exe()?.with_file_name("convoy-agent");
    for candidate in [beside, PathBuf::from("/usr/bin/convoy-agent")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "no convoy-agent beside {} or in /usr/bin: build it (cargo build --bins) or install the convoy-agent package",
        exe()?.display()
    )
}

/// The operator environment for the sandbox's controller.
fn operator_env(dir: &Path, net: u8) -> Vec<(&'static str, String)> {
    let pki = dir.join("pki");
    vec![
        ("CONVOY_CONTROLLER", format!("https://{}:{PORT}", controller_ip(net))),
        ("CONVOY_SERVER_NAME", "controller".into()),
        ("CONVOY_CA", pki.join("ca.pem").display().to_string()),
        ("CONVOY_CERT", pki.join("sandbox-admin.pem").display().to_string()),
        ("CONVOY_KEY", pki.join("sandbox-admin.key").display().to_string()),
    ]
}

/// Runs this `convoy` as the sandbox's admin; returns stdout.
fn convoy(dir: &Path, net: u8, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(exe()?);
    cmd.args(args).envs(operator_env(dir, net));
    convoy_nspawn::run_ok(&mut cmd)
}

pub fn up(args: &Up) -> Result<()> {
    if !(1..=50).contains(&args.hosts) {
        bail!("--hosts {}: between 1 and 50", args.hosts);
    }
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
    ] {
        if which(tool).is_none() {
            bail!("{tool} is missing: apt-get install {package}");
        }
    }
    if args.dir.join(STATE).exists() {
        bail!(
            "a sandbox is already up in {} (convoy sandbox status, convoy sandbox down)",
            args.dir.display()
        );
    }
    let agent = agent_binary()?;
    if !convoy_nspawn::rootfs_ready(&args.rootfs) {
        println!(
            "building the hosts' root filesystem in {} (debootstrap, about a minute; kept for next time)",
            args.rootfs.display()
        );
        convoy_nspawn::build_rootfs(&args.rootfs)?;
    }
    if args.dir.exists() && fs::read_dir(&args.dir)?.next().is_some() {
        bail!(
            "{} is not empty and holds no sandbox; choose another --dir or remove it",
            args.dir.display()
        );
    }
    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    fs::set_permissions(&args.dir, fs::Permissions::from_mode(0o700))?;
    let (bridge, [_, net]) = convoy_nspawn::allocate_bridge(BRIDGE_PREFIX, (0..NETS).map(|n| (19, n)))
        .context("bridges convoysbx0 to convoysbx9 are all taken: remove a sandbox (convoy sandbox down --dir ...)")?;
    let mut state = State {
        bridge,
        net,
        controller_pid: 0,
        hosts: Vec::new(),
    };
    match start(args, &agent, &mut state) {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("convoy sandbox up failed; removing what it started");
            stop(&state);
            let _ = fs::remove_dir_all(&args.dir);
            Err(e)
        }
    }
}

fn start(args: &Up, agent: &Path, state: &mut State) -> Result<()> {
    let dir = &args.dir;
    let pki = dir.join("pki");
    crate::pki::init(&pki)?;
    let net = state.net;
    let ip = controller_ip(net).to_string();
    crate::pki::issue(
        &pki,
        PeerKind::Controller,
        "controller",
        None,
        std::slice::from_ref(&ip),
        &pki,
        30,
    )?;
    crate::pki::issue(
        &pki,
        PeerKind::Operator,
        "sandbox-admin",
        Some(Role::Admin),
        &[],
        &pki,
        30,
    )?;

    let cdir = dir.join("controller");
    fs::create_dir_all(cdir.join("apps"))?;
    fs::write(cdir.join("apps/hello.toml"), HELLO_SPEC)?;
    fs::write(
        cdir.join("controller.toml"),
        format!(
            "listen = \"{ip}:{PORT}\"\ndata_dir = \"{d}/data\"\napps_dir = \"{d}/apps\"\n\
             ca = \"{p}/ca.pem\"\ncert = \"{p}/controller.pem\"\nkey = \"{p}/controller.key\"\n\
             ca_key = \"{p}/ca.key\"\nhost_timeout = \"2m\"\nmetrics_listen = \"{ip}:{METRICS_PORT}\"\n",
            d = cdir.display(),
            p = pki.display()
        ),
    )?;
    let log = fs::File::create(cdir.join("controller.log"))?;
    let controller = Command::new(exe()?)
        .args(["serve", "--config"])
        .arg(cdir.join("controller.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the controller")?;
    state.controller_pid = controller.id();
    let addr = SocketAddr::from((controller_ip(net), PORT));
    convoy_nspawn::wait_for("the controller to listen", Duration::from_secs(20), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
    })
    .with_context(|| format!("see {}", cdir.join("controller.log").display()))?;
    println!(
        "controller listening on {addr} (log: {})",
        cdir.join("controller.log").display()
    );

    // Enrollment: one token per host, made through the operator API.
    let mut prepared = Vec::new();
    for i in 1..=args.hosts {
        let name = format!("host{i}");
        let labels = format!("env=staging,zone=z{}", i % 2);
        let out = convoy(
            dir,
            net,
            &[
                "enroll",
                "create-token",
                "--name",
                &name,
                "--labels",
                &labels,
                "--ttl",
                "10m",
                "--output",
                "json",
            ],
        )?;
        let token: serde_json::Value = serde_json::from_str(&out).context("reading create-token's output")?;
        let etc = dir.join("hosts").join(&name);
        fs::create_dir_all(&etc)?;
        fs::set_permissions(&etc, fs::Permissions::from_mode(0o700))?;
        let config = etc.join("agent.toml");
        fs::write(
            &config,
            format!(
                "name = \"{name}\"\ncontroller = \"https://{ip}:{PORT}\"\nserver_name = \"controller\"\n\
                 ca = \"/etc/convoy/tls/ca.pem\"\ncert = \"/etc/convoy/tls/agent.pem\"\nkey = \"/etc/convoy/tls/agent.key\"\n\
                 enroll_token = \"{}\"\nca_fingerprint = \"{}\"\nmetrics_listen = \"127.0.0.1:9465\"\n",
                token["token"].as_str().context("no token in create-token's output")?,
                token["ca_fingerprint"].as_str().context("no ca_fingerprint in create-token's output")?,
            ),
        )?;
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600))?;
        fs::write(etc.join("convoy-agent.service"), AGENT_UNIT)?;
        prepared.push((i, name, etc));
    }

    // Boot the hosts side by side.
    let bridge = state.bridge.clone();
    let bridge = bridge.as_str();
    let booted: Vec<Result<HostState>> = std::thread::scope(|s| {
        let handles: Vec<_> = prepared
            .iter()
            .map(|(i, name, etc)| s.spawn(move || boot_host(args, agent, bridge, net, *i, name, etc)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("booting a host panicked")))
            })
            .collect()
    });
    let mut failed = None;
    for b in booted {
        match b {
            Ok(h) => state.hosts.push(h),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    // Recorded before anything can fail again, so `down` finds everything.
    fs::write(dir.join(STATE), serde_json::to_vec_pretty(state)?)?;
    if let Some(e) = failed {
        return Err(e);
    }
    convoy_nspawn::wait_for("every agent to enroll and connect", Duration::from_secs(60), || {
        let out = convoy(dir, net, &["hosts", "--output", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let connected = v["hosts"].as_array()?.iter().filter(|h| h["connected"] == true).count();
        (connected == args.hosts).then_some(())
    })?;

    write_examples(dir)?;
    let env: String = operator_env(dir, net)
        .iter()
        .map(|(k, v)| format!("export {k}={v}\n"))
        .collect();
    fs::write(dir.join("env.sh"), &env)?;
    println!("{} host(s) enrolled and connected:\n", args.hosts);
    print!("{}", convoy(dir, net, &["hosts"])?);
    let ex = dir.join("examples");
    println!(
        "\nDeploy to it:\n\n  eval \"$(convoy sandbox env)\"      # or: . {env}\n  \
         convoy release push hello 1.0.0 {ex}/hello-1.0.0.tar.gz\n  \
         convoy deploy hello 1.0.0 --env staging\n  \
         convoy release push hello 2.0.0 {ex}/hello-2.0.0.tar.gz\n  \
         convoy deploy hello 2.0.0 --env staging --strategy canary --stages 1,100%\n  \
         convoy release push hello 3.0.0 {ex}/hello-3.0.0.tar.gz   # fails its health check\n  \
         convoy deploy hello 3.0.0 --env staging                  # halts, and host1 restores 2.0.0\n  \
         convoy status hello; convoy history hello\n\n\
         Metrics: curl http://{ip}:{METRICS_PORT}/metrics\n\
         A shell on a host: nsenter -t <leader> -a bash (convoy sandbox status lists them)\n\
         Remove it all: convoy sandbox down",
        env = dir.join("env.sh").display(),
        ex = ex.display(),
    );
    Ok(())
}

fn boot_host(args: &Up, agent: &Path, bridge: &str, net: u8, i: usize, name: &str, etc: &Path) -> Result<HostState> {
    let machine = format!("sbx{net}h{i}");
    let ip = Ipv4Addr::new(198, 19, net, 10 + i as u8);
    let booted = convoy_nspawn::boot(&convoy_nspawn::HostSpec {
        rootfs: &args.rootfs,
        machine: &machine,
        bridge,
        ip,
        binds_ro: vec![
            (agent.to_path_buf(), "/usr/bin/convoy-agent".into()),
            (
                etc.join("convoy-agent.service"),
                "/etc/systemd/system/convoy-agent.service".into(),
            ),
        ],
        binds_rw: vec![(etc.to_path_buf(), "/etc/convoy".into())],
        console: args.dir.join(format!("{name}.console.log")),
        detach: true,
    })
    .with_context(|| format!("booting {name}"))?;
    let host = HostState {
        name: name.to_owned(),
        machine,
        ip,
        nspawn_pid: booted.nspawn.id(),
        leader: booted.leader,
    };
    convoy_nspawn::exec_ok(host.leader, &["systemctl", "start", "convoy-agent.service"])
        .with_context(|| format!("starting the agent on {name}"))?;
    Ok(host)
}

pub fn status(dir: &Path) -> Result<()> {
    let Some(state) = load(dir)? else {
        println!("no sandbox is up in {}", dir.display());
        return Ok(());
    };
    let up = |pid: u32| if convoy_nspawn::alive(pid) { "running" } else { "gone" };
    println!(
        "sandbox in {}: bridge {}, controller https://{}:{PORT} (pid {}, {})",
        dir.display(),
        state.bridge,
        controller_ip(state.net),
        state.controller_pid,
        up(state.controller_pid)
    );
    for h in &state.hosts {
        println!(
            "  {:<8} {:<16} leader pid {:<8} {}",
            h.name,
            h.ip,
            h.leader,
            up(h.leader)
        );
    }
    println!();
    match convoy(dir, state.net, &["hosts"]) {
        Ok(hosts) => print!("{hosts}"),
        Err(e) => println!("the controller does not answer: {e:#}"),
    }
    println!("\nOperator environment: eval \"$(convoy sandbox env)\"");
    Ok(())
}

pub fn env(dir: &Path) -> Result<()> {
    let Some(state) = load(dir)? else {
        bail!("no sandbox is up in {} (convoy sandbox up)", dir.display());
    };
    for (k, v) in operator_env(dir, state.net) {
        println!("export {k}={v}");
    }
    Ok(())
}

pub fn down(dir: &Path) -> Result<()> {
    let Some(state) = load(dir)? else {
        println!("no sandbox is up in {}", dir.display());
        return Ok(());
    };
    stop(&state);
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    println!(
        "sandbox removed: {} host(s), the controller, bridge {} and {}",
        state.hosts.len(),
        state.bridge,
        dir.display()
    );
    Ok(())
}

fn load(dir: &Path) -> Result<Option<State>> {
    let path = dir.join(STATE);
    match fs::read(&path) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("{}: not a sandbox state file", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Stops every host (cleanly, then by force), the controller and the bridge.
fn stop(state: &State) {
    std::thread::scope(|s| {
        for h in &state.hosts {
            s.spawn(|| {
                convoy_nspawn::shut_down(h.nspawn_pid, h.leader, Duration::from_secs(30), || {
                    !convoy_nspawn::alive(h.nspawn_pid) || is_zombie(h.nspawn_pid)
                })
            });
        }
    });
    if state.controller_pid != 0 {
        convoy_nspawn::shut_down(
            state.controller_pid,
            state.controller_pid,
            Duration::from_secs(10),
            || !convoy_nspawn::alive(state.controller_pid) || is_zombie(state.controller_pid),
        );
    }
    convoy_nspawn::remove_bridge(&state.bridge);
}

/// A process that exited but whose parent (a `convoy sandbox up` still
/// running) has not reaped it.
fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

const HELLO_SPEC: &str = r#"# The sandbox's example app: a shell loop under systemd, checked by
# systemd and by a command.
name = "hello"
install_path = "/opt/hello"
units = ["hello.service"]
environments = ["staging", "production"]

[health]
min_healthy_time = "2s"
healthy_deadline = "15s"

[[health.checks]]
type = "systemd"
unit = "hello.service"

[[health.checks]]
type = "command"
command = ["bin/check"]
interval = "500ms"
"#;

/// Releases of the example app: 1.0.0 and 2.0.0 healthy, 3.0.0 failing
/// its check.
fn write_examples(dir: &Path) -> Result<()> {
    let ex = dir.join("examples");
    for (version, healthy) in [("1.0.0", true), ("2.0.0", true), ("3.0.0", false)] {
        let tree = ex.join(format!("hello-{version}"));
        let file = |path: &str, text: &str, mode: u32| -> Result<()> {
            let p = tree.join(path);
            fs::create_dir_all(p.parent().expect("relative path"))?;
            fs::write(&p, text)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
            Ok(())
        };
        file("VERSION", &format!("{version}\n"), 0o644)?;
        file(
            "bin/hello",
            "#!/bin/sh\n# Writes its version and the time to /run/hello/status every second.\n\
             root=$(dirname \"$0\")/..\nversion=$(cat \"$root/VERSION\")\nmkdir -p /run/hello\n\
             while true; do echo \"hello $version $(date +%s)\" > /run/hello/status; sleep 1; done\n",
            0o755,
        )?;
        let check = if healthy {
            "#!/bin/sh\n# Healthy when the running loop is this release's.\n\
             grep -q \"^hello $(cat \"$(dirname \"$0\")/../VERSION\") \" /run/hello/status\n"
        } else {
            "#!/bin/sh\necho \"self-test failed: this release is broken on purpose\" >&2\nexit 1\n"
        };
        file("bin/check", check, 0o755)?;
        file(
            "systemd/hello.service",
            "[Unit]\nDescription=convoy sandbox example app\n\n[Service]\nExecStart=/opt/hello/bin/hello\n\n\
             [Install]\nWantedBy=multi-user.target\n",
            0o644,
        )?;
        let out = ex.join(format!("hello-{version}.tar.gz"));
        convoy_common::archive::pack_dir(&tree, fs::File::create(&out)?)?;
        fs::remove_dir_all(&tree)?;
    }
    Ok(())
}
