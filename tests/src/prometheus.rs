//! A real Prometheus (Debian's `prometheus` package) on the test bed,
//! scraping the demo app on every host once a second. Each host's samples
//! carry a `host` label with its convoy name, which is how the metric
//! gates' `{{hosts}}` finds them.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use convoy_nspawn::wait_for;

use crate::testbed::http_get;

pub struct Prometheus {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// The Prometheus binary: `CONVOY_PROMETHEUS`, or Debian's.
fn binary() -> Result<PathBuf> {
    let bin = std::env::var("CONVOY_PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into());
    let bin = PathBuf::from(bin);
    if !bin.exists() {
        bail!(
            "{} is missing: install Debian's prometheus package (scripts/testbed-setup does)",
            bin.display()
        );
    }
    Ok(bin)
}

impl Prometheus {
    /// Starts Prometheus in `dir`, on a free loopback port, scraping
    /// `targets` (host name, address of its /metrics).
    pub fn start(dir: &Path, targets: &[(String, SocketAddr)]) -> Result<Prometheus> {
        let bin = binary()?;
        fs::create_dir_all(dir)?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: demo\n    static_configs:\n",
        );
        for (host, addr) in targets {
            config.push_str(&format!(
                "      - targets: ['{addr}']\n        labels:\n          host: {host}\n"
            ));
        }
        fs::write(dir.join("prometheus.yml"), config)?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
        let mut p = Prometheus {
            child: None,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            dir: dir.to_path_buf(),
        };
        p.spawn(&bin)?;
        Ok(p)
    }

    fn spawn(&mut self, bin: &Path) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("prometheus.log"))?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", self.dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", self.dir.join("data").display()))
            .arg(format!("--web.listen-address={}", self.addr))
            .arg("--storage.tsdb.retention.time=2h")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        let addr = self.addr;
        wait_for("Prometheus to be ready", Duration::from_secs(30), || {
            matches!(http_get(addr, "/-/ready"), Some((200, _))).then_some(())
        })
        .inspect_err(|_| eprintln!("──── prometheus log ────\n{}", self.log()))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The value of an instant query, if it has one.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let q = percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={q}"))?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until every target has been scraped and is up.
    pub fn wait_scraping(&self, n: usize) -> Result<()> {
        wait_for(
            &format!("Prometheus to scrape {n} hosts"),
            Duration::from_secs(30),
            || (self.value("sum(up{job=\"demo\"})")? >= n as f64).then_some(()),
        )
    }

    /// Stops it (SIGKILL), as a crash or a lost machine would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.kill();
    }
}
