//! A controller on loopback with its own CA, an operator and one agent
//! identity: what the stream and scale benchmarks talk to.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct Controller {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Child,
    pub bins: PathBuf,
}

impl Controller {
    pub fn start(port: u16) -> anyhow::Result<Self> {
        Self::start_with(port, "", None)
    }

    /// A controller named `name` on the PostgreSQL at `database`; with
    /// `first`, sharing its CA, identities, apps and configuration key.
    pub fn start_in_cluster(port: u16, name: &str, database: &str, first: Option<&Controller>) -> anyhow::Result<Self> {
        let key = first
            .map(|f| format!("config_key = \"{}/data/config.key\"\n", f.dir.path().display()))
            .unwrap_or_default();
        let extra = format!("name = \"{name}\"\ndatabase = \"{database}\"\n{key}");
        Self::start_with(port, &extra, first.map(|f| f.dir.path()))
    }

    fn start_with(port: u16, extra: &str, shared: Option<&Path>) -> anyhow::Result<Self> {
        let bins = convoy_tests::testbed::bin_dir();
        let dir = tempfile::Builder::new().prefix("convoy-bench-").tempdir()?;
        let d = dir.path();
        if let Some(from) = shared {
            std::os::unix::fs::symlink(from.join("pki"), d.join("pki"))?;
        }
        let pki = d.join("pki");
        let convoy = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new(bins.join("convoy")).args(args).output()?;
            if !out.status.success() {
                bail!("convoy {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let p = pki.to_str().unwrap();
        if shared.is_none() {
            convoy(&["pki", "init", "--dir", p])?;
            convoy(&[
                "pki",
                "issue",
                "controller",
                "controller",
                "--dir",
                p,
                "--san",
                "127.0.0.1",
            ])?;
            convoy(&["pki", "issue", "operator", "op", "--dir", p])?;
            convoy(&["pki", "issue", "agent", "bench", "--dir", p])?;
        }
        std::fs::create_dir_all(d.join("apps"))?;
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testbed/demo.toml"),
            d.join("apps/demo.toml"),
        )?;
        std::fs::write(
            d.join("controller.toml"),
            format!(
                "{extra}listen = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/data\"\napps_dir = \"{d}/apps\"\n\
                 ca = \"{p}/ca.pem\"\ncert = \"{p}/controller.pem\"\nkey = \"{p}/controller.key\"\n",
                d = d.display()
            ),
        )?;
        std::fs::write(
            d.join("agent.toml"),
            format!(
                "controller = \"https://127.0.0.1:{port}\"\nserver_name = \"controller\"\nca = \"{p}/ca.pem\"\n\
                 cert = \"{p}/bench.pem\"\nkey = \"{p}/bench.key\"\nstate_dir = \"{d}/agent\"\n\n[labels]\nenv = \"staging\"\n",
                d = d.display()
            ),
        )?;
        let log = std::fs::File::create(d.join("controller.log"))?;
        let child = Command::new(bins.join("convoy"))
            .args(["serve", "--config"])
            .arg(d.join("controller.toml"))
            .env("CONVOY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the controller")?;
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("the controller did not listen on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Controller { dir, port, child, bins })
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The CLI as the operator, not yet started.
    pub fn convoy_command(&self, args: &[&str]) -> Command {
        let pki = self.pki();
        let mut cmd = Command::new(self.bins.join("convoy"));
        cmd.args(args)
            .env("CONVOY_CONTROLLER", format!("https://127.0.0.1:{}", self.port))
            .env("CONVOY_SERVER_NAME", "controller")
            .env("CONVOY_CA", pki.join("ca.pem"))
            .env("CONVOY_CERT", pki.join("op.pem"))
            .env("CONVOY_KEY", pki.join("op.key"));
        cmd
    }

    /// Runs the CLI as the operator; returns stdout.
    pub fn convoy(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.convoy_command(args).output()?;
        if !out.status.success() {
            bail!("convoy {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The controller's resident memory and CPU time so far.
    pub fn usage(&self) -> (u64, Duration) {
        proc_usage(self.child.id())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's resident memory (bytes) and CPU time (user + system).
pub fn proc_usage(pid: u32) -> (u64, Duration) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    (rss_kb * 1024, Duration::from_millis(ticks * 10))
}

/// A file of `size` bytes that gzip shrinks to about half (text-like).
pub fn compressible(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    generate(path, size, seed, |x, b| {
        for c in b.iter_mut() {
            *c = b"abcdefghijklmnop"[(next(x) & 15) as usize];
        }
    })
}

/// A file of `size` bytes no compressor can shrink.
pub fn random(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    generate(path, size, seed, |x, b| {
        for c in b.chunks_mut(8) {
            c.copy_from_slice(&next(x).to_le_bytes()[..c.len()]);
        }
    })
}

/// xorshift64: quick, repeatable, good enough for test data.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn generate(path: &Path, size: u64, seed: u64, fill: impl Fn(&mut u64, &mut [u8])) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 16];
    let mut left = size;
    while left > 0 {
        fill(&mut x, &mut buf);
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Runs `cmd`, failing with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
