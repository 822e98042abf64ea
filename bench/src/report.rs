//! BENCHMARKS.md: one section per benchmark, each rewritten in place by
//! its own run, under a header that describes the machine.

use std::path::PathBuf;

pub struct Section {
    /// Marker name, e.g. `stream`.
    pub key: &'static str,
    pub title: String,
    /// The command that reproduces it.
    pub command: String,
    /// Table header and rows.
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// What was measured, how, and what the figures mean.
    pub notes: Vec<String>,
}

impl Section {
    pub fn markdown(&self) -> String {
        let mut s = format!("## {}\n\n`{}`\n\n", self.title, self.command);
        s.push_str(&format!("| {} |\n", self.header.join(" | ")));
        s.push_str(&format!("|{}\n", " --- |".repeat(self.header.len())));
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        for n in &self.notes {
            s.push_str(&format!("\n{n}\n"));
        }
        s
    }
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md")
}

/// The machine the figures come from.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {:.0} GiB RAM, Linux {}",
        mem_kb as f64 / 1048576.0,
        kernel.trim()
    )
}

/// Replaces (or appends) the section between its markers.
pub fn write(section: &Section) -> anyhow::Result<()> {
    let path = path();
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nWritten by `scripts/bench` (the `convoy-bench` crate); every figure is the median of \
         several runs, and each comparison runs both sides in the same run, on the same machine.\n"
            .to_owned()
    });
    let (begin, end) = (
        format!("<!-- bench:{} -->", section.key),
        format!("<!-- /bench:{} -->", section.key),
    );
    let body = format!(
        "{begin}\n{}\nMachine: {}. Measured {}.\n{end}",
        section.markdown(),
        machine(),
        today()
    );
    match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(b)) if b > a => text.replace_range(a..b + end.len(), &body),
        _ => {
            text.push('\n');
            text.push_str(&body);
            text.push('\n');
        }
    }
    std::fs::write(&path, text)?;
    Ok(())
}

fn today() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    out
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}
