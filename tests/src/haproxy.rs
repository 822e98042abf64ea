//! A real HAProxy (Debian's package) on the test bed, in front of the
//! demo app on every host, with its runtime API on loopback: the load
//! generator sends requests through it and convoy drains hosts in it.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use convoy_nspawn::wait_for;

pub struct Haproxy {
    child: Option<Child>,
    /// Where clients connect.
    pub frontend: SocketAddr,
    /// The runtime API (`stats socket ipv4@...`).
    pub api: SocketAddr,
    dir: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

impl Haproxy {
    /// Starts HAProxy with backend `web` holding `servers` (name, address),
    /// each health-checked with GET /health every 500 ms.
    pub fn start(dir: &Path, servers: &[(String, SocketAddr)]) -> Result<Haproxy> {
        let bin = PathBuf::from(std::env::var("CONVOY_HAPROXY").unwrap_or_else(|_| "/usr/sbin/haproxy".into()));
        if !bin.exists() {
            bail!(
                "{} is missing: install Debian's haproxy package (scripts/testbed-setup does)",
                bin.display()
            );
        }
        fs::create_dir_all(dir)?;
        let frontend = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cfg = format!(
            "global\n    stats socket ipv4@{api} level admin\n    maxconn 4096\n\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\n\
             frontend fe\n    bind {frontend}\n    default_backend web\n\n\
             backend web\n    balance roundrobin\n    option httpchk GET /health\n    default-server inter 500ms fall 1 rise 1\n"
        );
        for (name, addr) in servers {
            cfg.push_str(&format!("    server {name} {addr} check\n"));
        }
        let file = dir.join("haproxy.cfg");
        fs::write(&file, cfg)?;
        let check = Command::new(&bin).arg("-c").arg("-f").arg(&file).output()?;
        if !check.status.success() {
            bail!("haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
        }
        let log = fs::File::create(dir.join("haproxy.log"))?;
        let child = Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let h = Haproxy {
            child: Some(child),
            frontend,
            api,
            dir: dir.to_path_buf(),
        };
        wait_for("haproxy's runtime API", Duration::from_secs(10), || {
            h.command("show info").ok()
        })?;
        Ok(h)
    }

    /// One runtime API command and its answer.
    pub fn command(&self, cmd: &str) -> Result<String> {
        command_at(self.api, cmd)
    }

    /// Each server's status as `show stat` says (UP, DOWN, DRAIN, ...).
    pub fn statuses(&self) -> Result<Vec<(String, String)>> {
        statuses_at(self.api)
    }

    /// Waits until every server is UP.
    pub fn wait_all_up(&self) -> Result<()> {
        wait_for("haproxy to see every server UP", Duration::from_secs(30), || {
            let s = self.statuses().ok()?;
            (!s.is_empty() && s.iter().all(|(_, st)| st == "UP")).then_some(())
        })
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

/// One command to the runtime API at `api` and its answer.
pub fn command_at(api: SocketAddr, cmd: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&api, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Each server of backend `web` and its status, from the runtime API at `api`.
pub fn statuses_at(api: SocketAddr) -> Result<Vec<(String, String)>> {
    let csv = command_at(api, "show stat")?;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .unwrap_or("")
        .split(',')
        .collect();
    let col = |n: &str| header.iter().position(|c| *c == n);
    let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
        bail!("show stat: {csv}");
    };
    Ok(lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.get(px) == Some(&"web") && !matches!(f.get(sv), Some(&"BACKEND") | Some(&"FRONTEND")))
        .map(|f| (f[sv].to_owned(), f[st].to_owned()))
        .collect())
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
