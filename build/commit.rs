//! Build script shared by the `convoy` and `convoy-agent` binaries: puts the
//! commit they were built from into `CONVOY_COMMIT`, shown by `--version`.
//! A build outside a git checkout (a source tarball) uses `CONVOY_COMMIT`
//! from the environment, or "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CONVOY_COMMIT");
    let commit = std::env::var("CONVOY_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit);
    println!(
        "cargo:rustc-env=CONVOY_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}

fn git_commit() -> Option<String> {
    let out = Command::new("git").args(["rev-parse", "--git-dir"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let git_dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let git_dir = Path::new(&git_dir);
    // Rebuild when HEAD moves: HEAD itself, the branch it names, packed refs.
    println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD")) {
        if let Some(branch) = head.trim().strip_prefix("ref: ") {
            let file = git_dir.join(branch);
            if file.exists() {
                println!("cargo:rerun-if-changed={}", file.display());
            }
        }
    }
    if git_dir.join("packed-refs").exists() {
        println!("cargo:rerun-if-changed={}", git_dir.join("packed-refs").display());
    }
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
}
