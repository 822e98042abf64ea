//! Pre-flight checks: before a rollout moves any byte, each target says
//! whether it can take the release: free space for it, memory, the app's
//! units, and the spec's dependency checks. Nothing changes on the host.

use std::path::Path;

use convoy_common::ops::{PreflightCheck, PreflightCommand};

use crate::agent::Agent;
use crate::health;

fn check(name: impl Into<String>, passed: bool, detail: String) -> PreflightCheck {
    PreflightCheck {
        name: name.into(),
        passed,
        detail,
    }
}

/// A byte count as people read it.
fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Bytes an unprivileged writer may still use on `dir`'s file system.
fn free_bytes(dir: &Path) -> Result<u64, String> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
    Ok(st.blocks_available() * st.fragment_size())
}

/// `MemAvailable` from /proc/meminfo.
fn available_memory() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "/proc/meminfo has no MemAvailable".to_owned())
}

pub async fn run(agent: &Agent, cmd: &PreflightCommand) -> Vec<PreflightCheck> {
    let mut out = Vec::new();
    let root = agent.store.root();
    out.push(match free_bytes(root) {
        Ok(free) => check(
            "free space",
            free >= cmd.needed_bytes,
            format!(
                "{} free on {}, {} needed",
                size(free),
                root.display(),
                size(cmd.needed_bytes)
            ),
        ),
        Err(e) => check("free space", false, e),
    });
    if cmd.min_memory_bytes > 0 {
        out.push(match available_memory() {
            Ok(m) => check(
                "memory",
                m >= cmd.min_memory_bytes,
                format!("{} available, {} needed", size(m), size(cmd.min_memory_bytes)),
            ),
            Err(e) => check("memory", false, e),
        });
    }
    for unit in &cmd.units {
        let name = format!("unit {unit}");
        if cmd.units_in_release.contains(unit) {
            out.push(check(name, true, "ships in the release".into()));
            continue;
        }
        out.push(match agent.systemd.unit_load_state(unit).await {
            Ok(state) if state == "loaded" => check(name, true, "loaded".into()),
            Ok(state) => check(
                name,
                false,
                format!("LoadState is {state}: no such unit on this host, and the release does not ship it"),
            ),
            Err(e) => check(name, false, format!("systemd: {e}")),
        });
    }
    let base = health::RestartBaseline::new();
    let dir = if cmd.install_path.exists() {
        cmd.install_path.as_path()
    } else {
        Path::new("/")
    };
    for c in &cmd.checks {
        let name = c.kind.describe();
        out.push(match health::run_check(&agent.systemd, c, &base, dir).await {
            Ok(detail) => check(name, true, detail),
            Err(detail) => check(name, false, detail),
        });
    }
    out
}
