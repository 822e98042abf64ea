//! Hosts with a real systemd, booted with `systemd-nspawn` from a Debian
//! root filesystem, on a private bridge in 198.18.0.0/15. The test bed
//! (tests/src/testbed.rs) and `convoy sandbox` both boot their hosts here.
//!
//! Every host runs on an overlay of the shared root filesystem
//! (`--volatile=overlay`), so nothing it writes outlives it.
#![forbid(unsafe_code)]

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod postgres;

/// Runs `cmd` and returns its stdout, or an error with its output.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Calls `f` every 100 ms until it returns something or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `rootfs` holds a bootable systemd.
pub fn rootfs_ready(rootfs: &Path) -> bool {
    rootfs.join("usr/lib/systemd/systemd").exists() || rootfs.join("lib/systemd/systemd").exists()
}

/// Builds a Debian bookworm root filesystem with systemd at `rootfs` with
/// debootstrap, from the mirror this machine's apt uses. About a minute.
pub fn build_rootfs(rootfs: &Path) -> Result<()> {
    if rootfs_ready(rootfs) {
        return Ok(());
    }
    let mirror = apt_mirror().unwrap_or_else(|| "http://deb.debian.org/debian".into());
    let tmp = rootfs.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    if let Some(parent) = rootfs.parent() {
        fs::create_dir_all(parent)?;
    }
    run_ok(Command::new("debootstrap").args([
        "--variant=minbase",
        "--include=systemd,dbus,systemd-sysv,iproute2,curl",
        "bookworm",
        tmp.to_str().context("rootfs path is not UTF-8")?,
        &mirror,
    ]))
    .context("debootstrap (apt-get install debootstrap systemd-container)")?;
    fs::rename(&tmp, rootfs)?;
    Ok(())
}

fn apt_mirror() -> Option<String> {
    let sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    if let Some(uri) = sources.lines().find_map(|l| l.strip_prefix("URIs:")) {
        return uri.split_whitespace().next().map(String::from);
    }
    let list = fs::read_to_string("/etc/apt/sources.list").ok()?;
    list.lines()
        .find_map(|l| l.strip_prefix("deb "))
        .and_then(|rest| rest.split_whitespace().find(|w| w.contains("://")))
        .map(String::from)
}

/// A bridge `PREFIX<N>` with `198.<a>.<b>.1/24`, for the first `(a, b)` of
/// `subnets` whose bridge name is free. Creating the link is atomic, so
/// concurrent callers never share one.
pub fn allocate_bridge(prefix: &str, subnets: impl IntoIterator<Item = (u8, u8)>) -> Result<(String, [u8; 2])> {
    for (n, (a, b)) in subnets.into_iter().enumerate() {
        assert!(a == 18 || a == 19, "hosts live in 198.18.0.0/15");
        let name = format!("{prefix}{n}");
        let out = Command::new("ip")
            .args(["link", "add", &name, "type", "bridge"])
            .output()?;
        if !out.status.success() {
            continue;
        }
        run_ok(Command::new("ip").args(["addr", "add", &format!("198.{a}.{b}.1/24"), "dev", &name]))?;
        run_ok(Command::new("ip").args(["link", "set", &name, "up"]))?;
        return Ok((name, [a, b]));
    }
    bail!("no free {prefix}<N> bridge; remove stale ones (ip link del ...)")
}

/// Removes a bridge made by `allocate_bridge`.
pub fn remove_bridge(name: &str) {
    let _ = Command::new("ip").args(["link", "del", name]).output();
}

/// What to boot.
pub struct HostSpec<'a> {
    pub rootfs: &'a Path,
    /// The nspawn machine name (unique on this machine).
    pub machine: &'a str,
    pub bridge: &'a str,
    /// The address given to the host's `host0` link (a /24).
    pub ip: Ipv4Addr,
    /// (path here, path in the host), read-only.
    pub binds_ro: Vec<(PathBuf, String)>,
    /// (path here, path in the host), writable.
    pub binds_rw: Vec<(PathBuf, String)>,
    /// Where the host's console goes.
    pub console: PathBuf,
    /// Start nspawn in a session of its own, so that it outlives the
    /// process that started it (`convoy sandbox up`).
    pub detach: bool,
}

/// The `cgroup.procs` of a new cgroup for host `machine` in every
/// cgroup hierarchy this process is in, under `convoy-hosts/`. Without
/// them, every host booted from one process shares nspawn's `payload`
/// cgroup: one host's systemd removing `system.slice/demo.service` while
/// another host starts its own `demo.service` fails that start with exit
/// status 219/CGROUP. Cgroups of hosts that are gone are removed first.
fn own_cgroups(machine: &str) -> Result<Vec<PathBuf>> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let mine = fs::read_to_string("/proc/self/cgroup")?;
    // A name of its own per boot: a host booted again under the same
    // machine name must not join the cgroup its predecessor's systemd
    // shaped (on cgroup v2, one with controllers enabled for its children
    // takes no process itself).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let name = format!("{machine}.{}.{nanos}", std::process::id());
    let mut out = Vec::new();
    for line in mine.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let mount = mounts.lines().find_map(|m| {
            let f: Vec<&str> = m.split(' ').collect();
            let (point, kind, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
            let hit = match (*kind, ctrls) {
                ("cgroup2", "") => true,
                ("cgroup", c) if !c.is_empty() => c.split(',').all(|c| opts.split(',').any(|o| o == c)),
                _ => false,
            };
            hit.then(|| PathBuf::from(point))
        });
        let Some(mount) = mount else { continue };
        let parent = mount.join(path.trim_start_matches('/'));
        let hosts = parent.join("convoy-hosts");
        if let Ok(entries) = fs::read_dir(&hosts) {
            for e in entries.flatten() {
                // Only hosts that are gone: no process left in the tree,
                // and not one booting now (its cgroup is new).
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|a| a > Duration::from_secs(120)));
                if old && e.file_type().is_ok_and(|t| t.is_dir()) && !has_processes(&e.path()) {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
        let dir = hosts.join(&name);
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        // A new cpuset is empty until given its parent's CPUs and memory nodes.
        for (file, from) in [("cpuset.cpus", &parent), ("cpuset.mems", &parent)] {
            if let Ok(v) = fs::read_to_string(from.join(file)) {
                let _ = fs::write(hosts.join(file), &v);
                let _ = fs::write(dir.join(file), &v);
            }
        }
        out.push(dir.join("cgroup.procs"));
    }
    Ok(out)
}

/// Whether any cgroup in the tree at `dir` holds a process.
fn has_processes(dir: &Path) -> bool {
    if fs::read_to_string(dir.join("cgroup.procs")).map_or(true, |p| !p.trim().is_empty()) {
        return true;
    }
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()) && has_processes(&e.path()))
}

/// Removes a cgroup and the ones below it, deepest first; a cgroup with
/// processes in it stays.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// A booted host.
pub struct Booted {
    pub nspawn: Child,
    /// PID of the host's systemd (its PID 1).
    pub leader: u32,
}

/// Boots a host and waits until its systemd is up and its address set.
pub fn boot(spec: &HostSpec) -> Result<Booted> {
    use std::os::unix::process::CommandExt;
    let console = fs::File::create(&spec.console)?;
    // The host starts in cgroups of its own (see `own_cgroups`): a shell
    // moves itself there, then becomes systemd-nspawn.
    let procs: Vec<String> = own_cgroups(spec.machine)?
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "IFS='|'; for f in $CONVOY_CGROUP_PROCS; do echo $$ > \"$f\" || exit 1; done; \
         unset CONVOY_CGROUP_PROCS; exec systemd-nspawn \"$@\"",
        "sh",
    ])
    .env("CONVOY_CGROUP_PROCS", procs.join("|"));
    cmd.arg("-D")
        .arg(spec.rootfs)
        .args([
            "-M",
            spec.machine,
            "--boot",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "-q",
            "--console=read-only",
        ])
        .arg(format!("--network-bridge={}", spec.bridge));
    for (from, to) in &spec.binds_ro {
        cmd.arg(format!("--bind-ro={}:{to}", from.display()));
    }
    for (from, to) in &spec.binds_rw {
        cmd.arg(format!("--bind={}:{to}", from.display()));
    }
    cmd.stdin(Stdio::null()).stdout(console.try_clone()?).stderr(console);
    if spec.detach {
        cmd.process_group(0);
    }
    let mut nspawn = cmd.spawn().context("starting systemd-nspawn")?;
    let pid = nspawn.id();
    let leader = match wait_for("the host's systemd to start", Duration::from_secs(120), || {
        if let Ok(Some(status)) = nspawn.try_wait() {
            return Some(Err(anyhow::anyhow!(
                "systemd-nspawn exited ({status}); see {}",
                spec.console.display()
            )));
        }
        find_child_systemd(pid).map(Ok)
    }) {
        Ok(Ok(l)) => l,
        Ok(Err(e)) | Err(e) => {
            let _ = nspawn.kill();
            let _ = nspawn.wait();
            return Err(e);
        }
    };
    let booted = Booted { nspawn, leader };
    wait_for("the host to finish booting", Duration::from_secs(120), || {
        let out = exec(leader, &["systemctl", "is-system-running"]).ok()?;
        let s = String::from_utf8_lossy(&out.stdout);
        (s.trim() == "running" || s.trim() == "degraded").then_some(())
    })?;
    exec_ok(
        leader,
        &["ip", "addr", "add", &format!("{}/24", spec.ip), "dev", "host0"],
    )?;
    exec_ok(leader, &["ip", "link", "set", "host0", "up"])?;
    Ok(booted)
}

/// Runs a command inside the host whose PID 1 is `leader` (all namespaces).
pub fn exec(leader: u32, args: &[&str]) -> Result<Output> {
    Command::new("nsenter")
        .arg("-t")
        .arg(leader.to_string())
        .arg("-a")
        .args(args)
        .output()
        .context("running nsenter")
}

/// Like `exec`, failing unless the command succeeds; returns its stdout.
pub fn exec_ok(leader: u32, args: &[&str]) -> Result<String> {
    run_ok(
        Command::new("nsenter")
            .arg("-t")
            .arg(leader.to_string())
            .arg("-a")
            .args(args),
    )
}

/// Sends `sig` (e.g. "TERM") to `pid`.
pub fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .output();
}

/// Whether a process `pid` exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Shuts a host down: SIGTERM to nspawn (a clean shutdown), and after
/// `grace`, SIGKILL to the host's init (which ends every process in it)
/// and to nspawn. `done` says whether nspawn has exited.
pub fn shut_down(nspawn_pid: u32, leader: u32, grace: Duration, mut done: impl FnMut() -> bool) {
    kill(nspawn_pid, "TERM");
    let deadline = Instant::now() + grace;
    while !done() {
        if Instant::now() > deadline {
            // Killing nspawn alone would leave the host's systemd (its pid
            // namespace's init) running.
            kill(leader, "KILL");
            kill(nspawn_pid, "KILL");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Finds the `systemd` process nspawn started (the host's PID 1).
pub fn find_child_systemd(root: u32) -> Option<u32> {
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                let comm = fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return Some(c);
                }
                stack.push(c);
            }
        }
    }
    None
}
