//! `convoy`: the controller daemon (`convoy serve`) and the operator CLI.
#![forbid(unsafe_code)]

mod appconfig;
mod artifacts;
mod cli;
use cli::Output;
mod config;
mod db;
mod metrics;
mod pki;
mod progress;
mod prometheus;
mod rollout;
mod sandbox;
mod server;
mod traffic;
mod ui;
mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use convoy_common::identity::{PeerKind, Role};

/// The release and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CONVOY_COMMIT"), ")");

/// convoy: roll releases out to a fleet of hosts, safely.
#[derive(Parser)]
#[command(name = "convoy", version = VERSION, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    conn: cli::Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller daemon.
    Serve {
        #[arg(long, default_value = "/etc/convoy/controller.toml")]
        config: PathBuf,
    },
    /// Manage the fleet's certificate authority.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Manage releases.
    #[command(subcommand)]
    Release(ReleaseCmd),
    /// An app's configuration per environment: values and secrets, in
    /// immutable revisions that deploys render into the release.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage release signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Roll a pushed release out to an environment (pre-stage everywhere,
    /// then batch by batch; halt and roll back past the failure budget).
    Deploy(Box<cli::DeployArgs>),
    /// Switch hosts back to a release they still hold (no download).
    Rollback {
        app: String,
        #[arg(long)]
        env: String,
        /// The release to go to (default: each host's previous release).
        #[arg(long)]
        to: Option<String>,
        /// Only these hosts (comma-separated).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        #[command(flatten)]
        pace: cli::Pace,
        /// text, or json: one JSON object per event, one per line.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Deploy frequency, change failure rate and mean time to restore.
    Report {
        app: String,
        /// The window, counted back from now.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Every host the controller knows, with its labels and apps.
    Hosts {
        #[command(subcommand)]
        cmd: Option<HostsCmd>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Enroll hosts with one-time tokens.
    #[command(subcommand)]
    Enroll(EnrollCmd),
    /// The releases pushed for an app, newest first.
    Releases {
        app: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Follow a running rollout's progress until it ends.
    Watch {
        rollout: String,
        /// text, or json: one JSON object per event, one per line.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Pause a running rollout before its next batch.
    Pause { rollout: String },
    /// Resume a paused rollout.
    Resume { rollout: String },
    /// Stop a rollout before its next batch and roll back the hosts it moved.
    Abort { rollout: String },
    /// Approve a rollout waiting for approval (another operator started it).
    Approve { rollout: String },
    /// Let a canary rollout started with --promote manual go on to its next stage.
    Promote { rollout: String },
    /// Freeze an environment (admin): new deploys into it are refused and
    /// running ones wait before their next batch. Rollbacks still run.
    Freeze {
        #[arg(long)]
        env: String,
        /// Why; shown to everyone refused and kept in the audit.
        #[arg(long)]
        reason: String,
        /// Lift it by itself after this long (e.g. 2h); default: until unfrozen.
        #[arg(long, value_parser = humantime::parse_duration)]
        until: Option<std::time::Duration>,
    },
    /// Lift an environment's freeze (admin).
    Unfreeze {
        #[arg(long)]
        env: String,
    },
    /// The freezes in force, and the audit of freezes, unfreezes and
    /// hotfixes that passed a freeze or a deploy window.
    Freezes {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The controllers sharing this controller's database: which are up,
    /// their agent sessions, the rollouts each drives and how fresh their
    /// leases are.
    Controllers {
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Rollouts of an app, newest first; or one rollout in detail.
    History {
        app: Option<String>,
        #[arg(long)]
        rollout: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only rollouts into this environment.
        #[arg(long)]
        env: Option<String>,
        /// Only rollouts in this state (running, paused, awaiting_approval,
        /// awaiting_promotion, frozen, succeeded, failed, rolled_back,
        /// cancelled).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Serve the dashboard on loopback, speaking to the controller with
    /// your certificate; prints a link that works once.
    Ui {
        /// Address to listen on (loopback only); port 0 picks one.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Show each host's version and health for an app.
    Status {
        app: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// A local fleet to try convoy on: hosts with their own systemd, a
    /// controller, enrolled agents and an example app (run as root).
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: convoy_common::clidocs::Shell },
    /// Write man pages for convoy and each subcommand into DIR.
    Man {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum SandboxCmd {
    /// Boot the hosts, start a controller, enroll an agent on every host,
    /// and print how to deploy to them.
    Up {
        /// How many hosts (1 to 50).
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        #[command(flatten)]
        dir: SandboxDir,
        /// The hosts' Debian root filesystem; built with debootstrap when missing.
        #[arg(
            long,
            env = "CONVOY_SANDBOX_ROOTFS",
            default_value = "/var/cache/convoy-sandbox/rootfs"
        )]
        rootfs: PathBuf,
    },
    /// Show the hosts, the controller and what it sees.
    Status {
        #[command(flatten)]
        dir: SandboxDir,
    },
    /// Print the operator environment (`eval "$(convoy sandbox env)"`).
    Env {
        #[command(flatten)]
        dir: SandboxDir,
    },
    /// Stop every host and the controller and remove all the sandbox's files.
    Down {
        #[command(flatten)]
        dir: SandboxDir,
    },
}

#[derive(clap::Args)]
struct SandboxDir {
    /// Where the sandbox keeps its state.
    #[arg(long = "dir", env = "CONVOY_SANDBOX_DIR", default_value = "/var/lib/convoy-sandbox")]
    path: PathBuf,
}

#[derive(Subcommand)]
enum HostsCmd {
    /// Disconnect a host and refuse its certificates from now on (admin).
    Revoke { name: String },
}

#[derive(Subcommand)]
enum EnrollCmd {
    /// Print a one-time token a new host enrolls with (admin).
    CreateToken {
        /// The host's name; without it, any name not yet known is accepted.
        #[arg(long)]
        name: Option<String>,
        /// The host's labels, e.g. env=staging,zone=eu1; the controller holds the host to them.
        #[arg(long, value_delimiter = ',', value_parser = cli::parse_label)]
        labels: Vec<(String, String)>,
        /// How long the token may be used (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA in DIR (ca.pem, ca.key).
    Init {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Issue a certificate for NAME signed by the CA in DIR.
    Issue {
        #[arg(value_parser = parse_kind)]
        kind: PeerKind,
        name: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Where to write NAME.pem and NAME.key (default: DIR).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Operators: viewer, deployer (default) or admin.
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        /// Extra DNS names or IP addresses (controller certificates).
        #[arg(long)]
        san: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

fn parse_kind(s: &str) -> Result<PeerKind, String> {
    s.parse()
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create an ed25519 key pair: DIR/NAME.key (0600) and DIR/NAME.pub.
    Generate {
        name: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Set values (KEY=VALUE) and secrets (--secret KEY reads the value
    /// from stdin, --secret KEY=FILE from a file): a new revision.
    Set {
        app: String,
        #[arg(long)]
        env: String,
        #[command(flatten)]
        whom: cli::config::Whom,
        #[arg(value_parser = cli::config::parse_pair, value_name = "KEY=VALUE")]
        pairs: Vec<(String, String)>,
        /// A secret: its value from stdin (KEY) or a file (KEY=FILE), never argv.
        #[arg(long = "secret", value_name = "KEY[=FILE]")]
        secrets: Vec<String>,
    },
    /// Remove keys: a new revision.
    Unset {
        app: String,
        #[arg(long)]
        env: String,
        #[command(flatten)]
        whom: cli::config::Whom,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Which value of KEY a host gets, from where, and what it overrides.
    Explain {
        app: String,
        #[arg(long)]
        env: String,
        #[arg(long)]
        host: String,
        /// The key.
        #[arg(value_name = "KEY")]
        name: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// A revision's keys and values (the newest by default); secrets show
    /// only a fingerprint.
    Show {
        app: String,
        #[arg(long)]
        env: String,
        #[arg(long)]
        revision: Option<u64>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Every revision: who changed which keys, when.
    History {
        app: String,
        #[arg(long)]
        env: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Keys that differ between two environments' newest revisions
    /// (secrets compared by fingerprint): --env staging --env production.
    Diff {
        app: String,
        #[arg(long = "env", num_args = 1)]
        envs: Vec<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Admin: reseal every secret with a new controller key.
    RotateKey,
    /// Roll the release the environment runs out again with a
    /// configuration revision (its newest by default), like a deploy:
    /// strategies, health checks, gates and restore.
    Apply {
        app: String,
        #[arg(long)]
        env: String,
        #[arg(long)]
        revision: Option<u64>,
        #[command(flatten)]
        pace: cli::Pace,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Upload FILE (a .tar.gz of the release tree) as VERSION of APP.
    Push {
        app: String,
        #[arg(value_name = "VERSION")]
        release: String,
        file: PathBuf,
        /// Sign with this ed25519 key (from `convoy keys generate`).
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.cmd {
        Cmd::Completions { shell } => {
            convoy_common::clidocs::print_completions(<Cli as clap::CommandFactory>::command(), shell);
            ExitCode::SUCCESS
        }
        Cmd::Sandbox(cmd) => {
            let done = match cmd {
                SandboxCmd::Up { hosts, dir, rootfs } => sandbox::up(&sandbox::Up {
                    hosts,
                    dir: dir.path,
                    rootfs,
                }),
                SandboxCmd::Status { dir } => sandbox::status(&dir.path),
                SandboxCmd::Env { dir } => sandbox::env(&dir.path),
                SandboxCmd::Down { dir } => sandbox::down(&dir.path),
            };
            cli::report(done.map_err(|e| cli::Failure::new(cli::exit::REFUSED, format!("sandbox: {e:#}"))))
        }
        Cmd::Man { dir } => cli::report(
            convoy_common::clidocs::write_man_pages(<Cli as clap::CommandFactory>::command(), &dir)
                .map(|pages| println!("wrote {} man page(s) into {}", pages.len(), dir.display()))
                .map_err(|e| cli::Failure::new(cli::exit::REFUSED, format!("{}: {e}", dir.display()))),
        ),
        Cmd::Serve { config } => rt.block_on(serve(config)),
        Cmd::Pki(PkiCmd::Init { dir }) => cli::report(
            pki::init(&dir)
                .map(|p| println!("created CA {}", p.display()))
                .map_err(|e| cli::Failure::new(cli::exit::REFUSED, format!("{e:#}"))),
        ),
        Cmd::Pki(PkiCmd::Issue {
            kind,
            name,
            dir,
            out,
            role,
            san,
            days,
        }) => cli::report(
            pki::issue(&dir, kind, &name, role, &san, out.as_deref().unwrap_or(&dir), days)
                .map(|(c, k)| println!("issued {kind} certificate {} (key {})", c.display(), k.display()))
                .map_err(|e| cli::Failure::new(cli::exit::REFUSED, format!("{e:#}"))),
        ),
        Cmd::Release(ReleaseCmd::Push {
            app,
            release,
            file,
            sign,
        }) => cli::report(rt.block_on(cli::push(&cli.conn, app, release, file, sign))),
        Cmd::Config(c) => cli::report(rt.block_on(async {
            use cli::config;
            match c {
                ConfigCmd::Set {
                    app,
                    env,
                    whom,
                    pairs,
                    secrets,
                } => config::set(&cli.conn, app, env, whom, pairs, secrets, vec![]).await,
                ConfigCmd::Unset { app, env, whom, keys } => {
                    config::set(&cli.conn, app, env, whom, vec![], vec![], keys).await
                }
                ConfigCmd::Explain {
                    app,
                    env,
                    host,
                    name,
                    output,
                } => config::explain(&cli.conn, app, env, host, name, matches!(output, Output::Json)).await,
                ConfigCmd::Show {
                    app,
                    env,
                    revision,
                    output,
                } => config::show(&cli.conn, app, env, revision, matches!(output, Output::Json)).await,
                ConfigCmd::History { app, env, output } => {
                    config::history(&cli.conn, app, env, matches!(output, Output::Json)).await
                }
                ConfigCmd::Diff { app, envs, output } => {
                    config::diff(&cli.conn, app, envs, matches!(output, Output::Json)).await
                }
                ConfigCmd::RotateKey => config::rotate_key(&cli.conn).await,
                ConfigCmd::Apply {
                    app,
                    env,
                    revision,
                    pace,
                    output,
                } => config::apply(&cli.conn, app, env, revision, pace, output).await,
            }
        })),
        Cmd::Keys(KeysCmd::Generate { name, dir }) => cli::report(cli::keys_generate(&dir, &name)),
        Cmd::Report { app, since, output } => cli::report(rt.block_on(cli::delivery_report(
            &cli.conn,
            app,
            since,
            matches!(output, Output::Json),
        ))),
        Cmd::Freeze { env, reason, until } => cli::report(rt.block_on(cli::freeze(&cli.conn, env, reason, until))),
        Cmd::Unfreeze { env } => cli::report(rt.block_on(cli::unfreeze(&cli.conn, env))),
        Cmd::Controllers { output } => {
            cli::report(rt.block_on(cli::controllers(&cli.conn, matches!(output, Output::Json))))
        }
        Cmd::Freezes { limit, output } => {
            cli::report(rt.block_on(cli::freezes(&cli.conn, limit, matches!(output, Output::Json))))
        }
        Cmd::Hosts {
            cmd: Some(HostsCmd::Revoke { name }),
            ..
        } => cli::report(rt.block_on(cli::revoke_host(&cli.conn, name))),
        Cmd::Hosts { cmd: None, output } => {
            cli::report(rt.block_on(cli::hosts(&cli.conn, matches!(output, Output::Json))))
        }
        Cmd::Enroll(EnrollCmd::CreateToken {
            name,
            labels,
            ttl,
            output,
        }) => cli::report(rt.block_on(cli::create_token(
            &cli.conn,
            name.unwrap_or_default(),
            labels,
            ttl,
            matches!(output, Output::Json),
        ))),
        Cmd::Releases { app, output } => {
            cli::report(rt.block_on(cli::releases(&cli.conn, app, matches!(output, Output::Json))))
        }
        Cmd::Watch { rollout, output } => cli::report(rt.block_on(cli::watch(&cli.conn, rollout, output))),
        Cmd::Pause { rollout } => cli::report(rt.block_on(cli::control(&cli.conn, rollout, "pause"))),
        Cmd::Resume { rollout } => cli::report(rt.block_on(cli::control(&cli.conn, rollout, "resume"))),
        Cmd::Abort { rollout } => cli::report(rt.block_on(cli::control(&cli.conn, rollout, "abort"))),
        Cmd::Approve { rollout } => cli::report(rt.block_on(cli::control(&cli.conn, rollout, "approve"))),
        Cmd::Promote { rollout } => cli::report(rt.block_on(cli::control(&cli.conn, rollout, "promote"))),
        Cmd::Deploy(args) => cli::report(rt.block_on(cli::deploy(&cli.conn, *args))),
        Cmd::Rollback {
            app,
            env,
            to,
            hosts,
            pace,
            output,
        } => cli::report(rt.block_on(cli::rollback(&cli.conn, app, env, to, hosts, pace, output))),
        Cmd::Ui { listen } => cli::report(rt.block_on(ui::serve(&cli.conn, listen))),
        Cmd::History {
            app,
            rollout,
            limit,
            env,
            state,
            output,
        } => cli::report(rt.block_on(cli::history(
            &cli.conn,
            app,
            rollout,
            limit,
            env,
            state,
            matches!(output, Output::Json),
        ))),
        Cmd::Status { app, output } => {
            cli::report(rt.block_on(cli::status(&cli.conn, app, matches!(output, Output::Json))))
        }
    }
}

async fn serve(path: PathBuf) -> ExitCode {
    // Reads FAILPOINTS; does nothing unless built with `--features failpoints`.
    let _failpoints = fail::FailScenario::setup();
    let cfg = match config::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("convoy serve: {e:#}");
            return ExitCode::from(cli::exit::USAGE);
        }
    };
    if let Err(e) = convoy_common::observe::init_tracing(cfg.log_level.as_deref(), "convoy") {
        eprintln!("convoy serve: {}: {e}", path.display());
        return ExitCode::from(cli::exit::USAGE);
    }
    match server::serve(cfg, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("convoy serve: {e:#}");
            ExitCode::from(cli::exit::SERVE_FAILED)
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
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
