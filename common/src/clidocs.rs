//! Shell completions and man pages, generated from a binary's clap
//! definition (`convoy completions bash`, `convoy man --dir DIR`, and the
//! same for `convoy-agent`). The Debian packages ship both.

use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Writes the completion script for `shell` to stdout.
pub fn print_completions(mut cmd: clap::Command, shell: Shell) {
    use std::io::Write;
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    // A closed pipe (`| head`) is the reader's choice, not an error.
    let _ = std::io::stdout().write_all(&script);
}

/// Writes `NAME.1` and one `NAME-SUB.1` page per subcommand (nested ones
/// too) into `dir`, and returns the pages written.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let version = cmd.get_version().map(str::to_string);
    let mut written = Vec::new();
    write_page(cmd, version.as_deref(), dir, &mut written)?;
    Ok(written)
}

fn write_page(
    cmd: clap::Command,
    version: Option<&str>,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone().version(version.map(str::to_string).unwrap_or_default())).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let sub = sub.clone().name(format!("{name}-{}", sub.get_name()));
        write_page(sub, version, dir, written)?;
    }
    Ok(())
}
