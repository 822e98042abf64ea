//! convoy's benchmarks. Each one runs convoy and the tool an operator would
//! use instead in the same run, prints the figures, and rewrites its own
//! section of BENCHMARKS.md (median of several runs, with the ratio).
//!
//! Run with `scripts/bench` (release build, raised file limit, openssh and
//! rsync for the comparison); `scripts/bench stream --size 256MiB` runs one.

mod dashboard;
mod delta;
mod fixture;
mod report;
mod scale;
mod stream;
mod testbed;
mod unpack;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3, global = true)]
    runs: usize,
}

#[derive(Subcommand, Clone)]
enum Cmd {
    /// Artifact transfer: convoy (mTLS gRPC) vs raw TLS, scp and rsync over ssh.
    Stream {
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
    },
    /// Unpacking a tar.gz: convoy's extractor vs GNU tar.
    Unpack {
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Which archives: small (many small files), large (a few large ones).
        #[arg(long, value_delimiter = ',', default_values_t = ["small".to_owned(), "large".to_owned()])]
        cases: Vec<String>,
    },
    /// Idle agent sessions held by one controller; with `--controllers
    /// N`, by N controllers on one PostgreSQL (one run of the largest
    /// `--sessions`, e.g. `--controllers 3 --sessions 30000`).
    Scale {
        #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000])]
        sessions: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        controllers: usize,
    },
    /// `convoy ui` answering its pages with this many hosts registered.
    Dashboard {
        #[arg(long, default_value_t = 10000)]
        hosts: usize,
    },
    /// On booted test hosts: per-host overhead, rollback latency, fan-out.
    Hosts {
        /// Artifact size for the fan-out figure.
        #[arg(long, default_value = "200MiB", value_parser = parse_size)]
        fanout_size: u64,
        #[arg(long, default_value_t = 10)]
        fanout_hosts: usize,
    },
    /// How releases travel: a delta update vs rsync, a whole stage of
    /// tar.zst vs tar.gz vs scp + tar, and the controller's egress at
    /// fan-out.
    Delta {
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 10)]
        fanout_hosts: usize,
        /// Tree size for the fan-out (each host keeps two releases).
        #[arg(long, default_value = "128MiB", value_parser = parse_size)]
        fanout_size: u64,
    },
    /// Everything above with its defaults.
    All,
    /// (Used by `scale --controllers`: one process of agents.)
    #[command(hide = true)]
    Agents {
        #[arg(long)]
        pki: std::path::PathBuf,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
    },
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (s, 1)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1GiB, 200MiB, 4096)"))?;
    Ok(n * mult)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    if let Cmd::Agents {
        pki,
        port,
        first,
        count,
    } = &args.cmd
    {
        return scale::agents(pki, *port, *first, *count);
    }
    let cmds = match args.cmd {
        Cmd::All => vec![
            Cmd::Stream { size: 1 << 30 },
            Cmd::Unpack {
                size: 1 << 30,
                cases: vec!["small".into(), "large".into()],
            },
            Cmd::Hosts {
                fanout_size: 200 << 20,
                fanout_hosts: 10,
            },
            Cmd::Scale {
                sessions: vec![1000, 10000],
                controllers: 1,
            },
            Cmd::Scale {
                sessions: vec![30000],
                controllers: 3,
            },
            Cmd::Dashboard { hosts: 10000 },
            Cmd::Delta {
                size: 1 << 30,
                fanout_hosts: 10,
                fanout_size: 128 << 20,
            },
        ],
        c => vec![c],
    };
    for c in cmds {
        let section = match c {
            Cmd::Stream { size } => stream::run(size, args.runs)?,
            Cmd::Dashboard { hosts } => dashboard::run(hosts, args.runs)?,
            Cmd::Unpack { size, cases } => unpack::run(size, &cases, args.runs)?,
            Cmd::Scale {
                sessions,
                controllers: 1,
            } => scale::run(&sessions, args.runs)?,
            Cmd::Scale { sessions, controllers } => {
                let n = sessions.iter().copied().max().unwrap_or(30000);
                scale::run_cluster(n, controllers, args.runs)?
            }
            Cmd::Hosts {
                fanout_size,
                fanout_hosts,
            } => testbed::run(fanout_size, fanout_hosts, args.runs)?,
            Cmd::Delta {
                size,
                fanout_hosts,
                fanout_size,
            } => delta::run(size, fanout_hosts, fanout_size, args.runs)?,
            Cmd::All | Cmd::Agents { .. } => unreachable!(),
        };
        println!("{}", section.markdown());
        report::write(&section)?;
    }
    Ok(())
}
