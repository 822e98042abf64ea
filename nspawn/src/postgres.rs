//! A throwaway PostgreSQL server on loopback, from Debian's `postgresql`
//! package, for tests and the scale benchmark: a fresh cluster in a
//! temporary directory, trust authentication for the user `convoy`.
//!
//! The server runs under a small shell that holds the read end of a pipe
//! from this process: when this process ends, however it ends, the shell
//! stops the server and removes its directory, so nothing outlives the
//! tests that made it.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::{run_ok, wait_for};

pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// (uid, gid) of the `postgres` user when running as root.
    user: Option<(u32, u32)>,
    server: Option<Child>,
    /// Serves TLS with this certificate and key (files in `dir`).
    tls: bool,
}

/// The newest installed PostgreSQL's programs.
fn bin_dir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql: install Debian's postgresql package")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .context("no PostgreSQL server under /usr/lib/postgresql/*/bin")
}

fn postgres_user() -> Result<Option<(u32, u32)>> {
    // Only root must change user: PostgreSQL refuses to run as root.
    if run_ok(Command::new("id").arg("-u"))?.trim() != "0" {
        return Ok(None);
    }
    let uid = run_ok(Command::new("id").args(["-u", "postgres"]))?;
    let gid = run_ok(Command::new("id").args(["-g", "postgres"]))?;
    Ok(Some((uid.trim().parse()?, gid.trim().parse()?)))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Postgres {
    /// Initialises a cluster and starts its server; returns once it
    /// accepts connections.
    pub fn start() -> Result<Postgres> {
        Self::start_with(None)
    }

    /// Like `start`, serving TLS (as well as plain connections) with a
    /// server certificate and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Postgres> {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Result<Postgres> {
        let bin = bin_dir()?;
        let user = postgres_user()?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let dir = std::env::temp_dir().join(format!("convoy-pg-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let mut pg = Postgres {
            bin,
            dir,
            port: free_port()?,
            user,
            server: None,
            tls: tls.is_some(),
        };
        if let Some((cert, key)) = tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = pg.dir.join(name);
                std::fs::write(&path, pem)?;
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                if let Some((uid, gid)) = user {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                }
            }
        }
        run_ok(
            pg.as_user(Command::new(pg.bin.join("initdb")))
                .args(["-U", "convoy", "--auth=trust", "--no-sync", "-E", "UTF8", "-D"])
                .arg(pg.data()),
        )?;
        pg.start_server()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn as_user(&self, mut cmd: Command) -> Command {
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    fn start_server(&mut self) -> Result<()> {
        let postgres = self.bin.join("postgres");
        let tls = match self.tls {
            true => format!(
                "-c ssl=on -c ssl_cert_file='{d}/server.crt' -c ssl_key_file='{d}/server.key'",
                d = self.dir.display()
            ),
            false => String::new(),
        };
        // The shell waits on its stdin, which only this process holds: at
        // `stop` it reads "keep" and stops the server; at our exit it reads
        // nothing, stops the server and removes the cluster.
        let script = format!(
            "'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 \
             -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off {tls} \
             >>'{dir}/server.log' 2>&1 & pid=$!; read x; kill -INT $pid; wait $pid; \
             [ \"$x\" = keep ] || rm -rf '{dir}'",
            postgres = postgres.display(),
            data = self.data().display(),
            port = self.port,
            dir = self.dir.display(),
        );
        let child = self
            .as_user(Command::new("sh"))
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting postgres")?;
        self.server = Some(child);
        let isready = self.bin.join("pg_isready");
        let port = self.port.to_string();
        wait_for("PostgreSQL to accept connections", Duration::from_secs(60), || {
            Command::new(&isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &port, "-U", "convoy", "-d", "postgres"])
                .status()
                .ok()
                .filter(|s| s.success())
        })
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", self.log()))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` as the user `convoy`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://convoy@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    /// Runs SQL in `db` with psql; returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        run_ok(
            Command::new(self.bin.join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "convoy",
                ])
                .args(["-p", &self.port.to_string(), "-d", db, "-c", sql]),
        )
    }

    /// Creates an empty database.
    pub fn create_database(&self, name: &str) -> Result<()> {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("{name:?}: a database name of letters, digits and _ only");
        }
        self.psql("postgres", &format!("CREATE DATABASE {name}")).map(|_| ())
    }

    /// Stops the server (a fast shutdown: sessions are cut, everything
    /// committed stays); `start_again` brings it back on the same port.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.server.take() {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"keep\n");
            }
            child.wait()?;
        }
        Ok(())
    }

    /// Starts a stopped server again, on the same port and data.
    pub fn start_again(&mut self) -> Result<()> {
        self.start_server()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
