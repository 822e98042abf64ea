//! `convoy-agent`: the daemon systemd runs on every fleet host.
#![forbid(unsafe_code)]

mod activate;
mod agent;
mod backup;
mod config;
mod crash;
mod delta;
mod enroll;
mod epochs;
mod fetch;
mod health;
mod hooks;
mod metrics;
mod preflight;
mod session;
mod store;
mod switch;
mod systemd;
mod units;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

/// The release and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CONVOY_COMMIT"), ")");

/// How long a stop waits for running operations to end (the unit's
/// TimeoutStopSec is longer).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// convoy's host agent: dials the controller and installs, switches,
/// restarts, checks and restores releases on this host.
#[derive(Parser)]
#[command(version = VERSION)]
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: convoy_common::clidocs::Shell },
    /// Write man pages for convoy-agent and each subcommand into DIR.
    Man {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// The exit status of an agent whose config names no controller yet.
const NOT_CONFIGURED: u8 = 3;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // These need no config.
    match &args.cmd {
        Some(Cmd::Completions { shell }) => {
            convoy_common::clidocs::print_completions(<Args as clap::CommandFactory>::command(), *shell);
            return std::process::ExitCode::SUCCESS;
        }
        Some(Cmd::Man { dir }) => {
            return match convoy_common::clidocs::write_man_pages(<Args as clap::CommandFactory>::command(), dir) {
                Ok(pages) => {
                    println!("wrote {} man page(s) into {}", pages.len(), dir.display());
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("convoy-agent man: {}: {e}", dir.display());
                    std::process::ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let cfg = match config::Config::load(&args.config) {
        Ok(c) => c,
        // The daemon, installed but not configured: nothing to do, and
        // nothing wrong. systemd counts this exit as success and does not
        // restart it (packaging/convoy-agent.service).
        Err(e @ config::ConfigError::NotConfigured { .. }) if args.cmd.is_none() => {
            eprintln!("convoy-agent: {e}");
            convoy_common::observe::notify::ready("not configured: agent.toml sets no controller");
            return std::process::ExitCode::from(NOT_CONFIGURED);
        }
        Err(e) => {
            eprintln!("convoy-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = convoy_common::observe::init_tracing(cfg.log_level.as_deref(), "convoy-agent") {
        eprintln!("convoy-agent: {}: {e}", args.config.display());
        return std::process::ExitCode::from(2);
    }
    let (what, done) = match args.cmd {
        Some(Cmd::Prune { app, keep }) => ("prune", prune(&cfg, &app, keep)),
        Some(Cmd::Fetch { digest, size, out }) => ("fetch", fetch_to(&cfg, &digest, size, &out).await),
        Some(Cmd::Completions { .. } | Cmd::Man { .. }) | None => ("", Ok(())),
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
    let channel = convoy_proto::connect(&session::endpoint(cfg)?).await?;
    let fetched = fetch::fetch(channel, digest, size, out, |_, _| {}).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{fetched} bytes in {secs:.3}s: {:.1} MB/s, sha256 verified",
        fetched as f64 / secs / 1e6
    );
    Ok(())
}

async fn run(cfg: config::Config) -> anyhow::Result<()> {
    enroll::enroll_if_needed(&cfg).await?;
    session::endpoint(&cfg)?; // checks the certificate and key before anything else
    let store = store::Store::open(&cfg.state_dir)?;
    let systemd = systemd::Systemd::connect()
        .await
        .context("connecting to systemd on the system bus")?;
    let agent = Arc::new(agent::Agent::new(
        cfg.name.clone(),
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
    // Spread by what tells hosts apart: the name, or the certificate when
    // the host has no name of its own.
    let seed = match cfg.name.is_empty() {
        false => cfg.name.clone(),
        true => std::fs::read_to_string(&cfg.cert).unwrap_or_default(),
    };
    let current = Arc::new(session::Current::starting_for(&seed, cfg.controllers.len()));
    let dial = {
        let cfg = cfg.clone();
        move |i: usize| session::endpoint_for(&cfg, i)
    };
    // Renewal asks the controller the session uses.
    let renew_dial = {
        let (dial, current) = (dial.clone(), current.clone());
        move || dial(current.get())
    };
    tokio::spawn(enroll::renew_forever(cfg.clone(), renew_dial));
    tokio::spawn(activate::keep_warm(agent.clone()));
    if let Some(listen) = cfg.metrics_listen {
        convoy_common::observe::serve_metrics(listen, metrics::get().registry.clone())
            .await
            .with_context(|| format!("metrics_listen: binding {listen}"))?;
    }
    convoy_common::observe::notify::spawn_watchdog();
    let session = tokio::spawn(session::run(agent.clone(), current, dial));
    shutdown_signal().await;
    stop(&agent).await;
    session.abort();
    Ok(())
}

/// Stops without cutting an operation short where it can: nothing new
/// starts, and running operations get `STOP_GRACE` to end (their results
/// reach the controller meanwhile). One still running after that is left to
/// its journal: the next start finishes it or restores the previous
/// release, and reports the outcome.
async fn stop(agent: &agent::Agent) {
    use convoy_common::observe::notify;
    agent.ops.stop();
    let running = agent.ops.running();
    if running.is_empty() {
        notify::stopping("stopping");
        tracing::info!("stopping");
        return;
    }
    notify::stopping(&format!("stopping once {} running operation(s) end", running.len()));
    tracing::info!(operations = %running.join(", "), grace = ?STOP_GRACE, "stopping: waiting for running operations to end");
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while !agent.ops.running().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let left = agent.ops.running();
    if left.is_empty() {
        // Let the last result go out on the session; it is on disk anyway.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        tracing::info!("running operations ended; stopping");
    } else {
        tracing::warn!(
            operations = %left.join(", "),
            "stopping with operations still running; the next start finishes or undoes them from the journal"
        );
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
