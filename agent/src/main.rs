//! `convoy-agent`: the daemon systemd runs on every fleet host.
#![forbid(unsafe_code)]

mod activate;
mod agent;
mod config;
mod crash;
mod fetch;
mod health;
mod session;
mod store;
mod systemd;

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

fn init_tracing(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVOY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

async fn run(cfg: config::Config) -> anyhow::Result<()> {
    let endpoint = session::endpoint(&cfg)?;
    let store = store::Store::open(&cfg.state_dir)?;
    let systemd = systemd::Systemd::connect()
        .await
        .context("connecting to systemd on the system bus")?;
    let agent = Arc::new(agent::Agent::new(store, systemd, cfg.labels.clone(), cfg.unit_timeout));
    let recovered = activate::recover_all(&agent).await;
    if !recovered.is_empty() {
        tracing::warn!(count = recovered.len(), "recovered interrupted operations");
    }
    tokio::select! {
        _ = session::run(agent.clone(), endpoint) => Ok(()),
        _ = shutdown_signal() => {
            tracing::info!("stopping; an interrupted activation is recovered at the next start");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
