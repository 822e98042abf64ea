//! `convoy-agent`: the daemon systemd runs on every fleet host.
#![forbid(unsafe_code)]

mod activate;
mod agent;
mod backup;
mod config;
mod crash;
mod enroll;
mod fetch;
mod health;
mod hooks;
mod session;
mod store;
mod switch;
mod systemd;
mod units;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

/// convoy's host agent: dials the controller and installs, switches,
/// restarts, checks and restores releases on this host.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the agent's configuration file.
    #[arg(long, default_value = "/etc/convoy/agent.toml", env = "CONVOY_AGENT_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Remove old releases and backups now, keeping the newest KEEP
    /// releases (never the current, previous or last-known-good one).
    Prune {
        /// The app to prune.
        app: String,
        /// Releases to keep (default: the app's keep_releases, or 5).
        #[arg(long)]
        keep: Option<usize>,
    },
    /// Download an artifact from the controller into a new file exactly as
    /// an activation does (resumable, sha256 verified) and print the rate.
    /// For diagnosing transfers, and for benchmarks.
    Fetch {
        /// The artifact's sha256 (as `convoy releases APP` shows it).
        digest: String,
        /// Its size in bytes.
        #[arg(long)]
        size: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = match config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("convoy-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(cfg.log_level.as_deref());
    let (what, done) = match args.cmd {
        Some(Cmd::Prune { app, keep }) => ("prune", prune(&cfg, &app, keep)),
        Some(Cmd::Fetch { digest, size, out }) => ("fetch", fetch_to(&cfg, &digest, size, &out).await),
        None => ("", Ok(())),
    };
    if !what.is_empty() {
        return match done {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("convoy-agent {what}: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // Reads FAILPOINTS; does nothing unless built with `--features failpoints`.
    let _failpoints = fail::FailScenario::setup();
    match run(cfg).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("convoy-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn fetch_to(cfg: &config::Config, digest: &str, size: u64, out: &std::path::Path) -> anyhow::Result<()> {
    let digest = convoy_common::Digest::parse(digest)?;
    if out.exists() {
        anyhow::bail!("{} exists; fetch writes a new file", out.display());
    }
    let started = std::time::Instant::now();
    let channel = session::endpoint(cfg)?.connect().await?;
    let fetched = fetch::fetch(channel, digest, size, out, |_, _| {}).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{fetched} bytes in {secs:.3}s: {:.1} MB/s, sha256 verified",
        fetched as f64 / secs / 1e6
    );
    Ok(())
}

fn init_tracing(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVOY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run(cfg: config::Config) -> anyhow::Result<()> {
    enroll::enroll_if_needed(&cfg).await?;
    session::endpoint(&cfg)?; // checks the certificate and key before anything else
    let store = store::Store::open(&cfg.state_dir)?;
    let systemd = systemd::Systemd::connect()
        .await
        .context("connecting to systemd on the system bus")?;
    let agent = Arc::new(agent::Agent::new(
        store,
        systemd,
        cfg.labels.clone(),
        cfg.unit_timeout,
        cfg.unit_dir.clone(),
        cfg.trusted_keys.clone(),
    ));
    let recovered = activate::recover_all(&agent).await;
    if !recovered.is_empty() {
        tracing::warn!(count = recovered.len(), "recovered interrupted operations");
    }
    // Each dial reads the certificate afresh, so a renewed one is used.
    let dial = {
        let cfg = cfg.clone();
        move || session::endpoint(&cfg)
    };
    tokio::spawn(enroll::renew_forever(cfg.clone(), dial.clone()));
    tokio::select! {
        _ = session::run(agent.clone(), dial) => Ok(()),
        _ = shutdown_signal() => {
            tracing::info!("stopping; an interrupted activation is recovered at the next start");
            Ok(())
        }
    }
}

/// `convoy-agent prune`: retention by hand, under the app's lock so it
/// never races an activation.
fn prune(cfg: &config::Config, app: &str, keep: Option<usize>) -> anyhow::Result<()> {
    let app = convoy_common::AppName::new(app)?;
    let store = store::Store::open(&cfg.state_dir)?;
    if !store.apps()?.contains(&app) {
        anyhow::bail!("no app {app} on this host (state in {})", cfg.state_dir.display());
    }
    let _lock = store
        .lock_app(&app)?
        .ok_or_else(|| anyhow::anyhow!("{app} is busy: an operation is running; try again when it ends"))?;
    let j = store.load_journal(&app)?;
    let spec = j.spec.as_ref();
    let keep = keep.or(spec.map(|s| s.keep_releases as usize)).unwrap_or(5);
    let gone = store.prune_releases(&app, &j, keep, j.inflight.as_ref().map(|i| &i.to))?;
    let backups = backup::prune(&store.app(&app).backups, spec.map_or(5, |s| s.keep_backups as usize))?;
    let names: Vec<String> = gone.iter().map(|v| v.to_string()).collect();
    println!(
        "{app}: removed {} release(s) [{}] and {} backup(s); kept {}",
        gone.len(),
        names.join(", "),
        backups.len(),
        store
            .releases(&app)
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
