//! Artifact transfer on loopback: the agent's own fetch (mTLS gRPC from
//! the controller, written to disk, sha256 verified) beside a plain rustls
//! pair, scp and rsync over ssh, moving the same file in the same run.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::fixture::{self, Controller};
use crate::report::{mbps, median, Section};

pub fn run(size: u64, runs: usize) -> anyhow::Result<Section> {
    let ctl = Controller::start(17443)?;
    let d = ctl.dir.path().to_owned();
    eprintln!("stream: writing a {} MiB artifact", size >> 20);
    let payload = d.join("payload.bin");
    fixture::random(&payload, size.saturating_sub(4096), 7)?;
    // A release artifact is a .tar.gz; stored (level 0) blocks keep its
    // size what was asked and building it quick.
    let artifact = d.join("artifact.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(&artifact)?, flate2::Compression::none());
        let mut tar = tar::Builder::new(gz);
        tar.append_path_with_name(&payload, "payload.bin")?;
        tar.into_inner()?.finish()?;
    }
    std::fs::remove_file(&payload)?;
    let size = std::fs::metadata(&artifact)?.len();
    let digest = convoy_common::Digest::of_reader(std::fs::File::open(&artifact)?)?.to_hex();
    ctl.convoy(&["release", "push", "demo", "1.0.0", artifact.to_str().unwrap()])?;
    let out = d.join("out.bin");

    let ssh = Sshd::start(&d)?;
    let mut figures: Vec<(&str, Vec<f64>)> = vec![
        ("convoy: agent fetch over mTLS gRPC", vec![]),
        ("raw TLS (rustls pair, same certificates)", vec![]),
        ("raw TLS + sha256 of what arrives", vec![]),
        ("scp over ssh", vec![]),
        ("rsync over ssh", vec![]),
    ];
    for r in 0..runs {
        eprintln!("stream: run {}/{runs}", r + 1);
        for (i, f) in figures.iter_mut().enumerate() {
            let _ = std::fs::remove_file(&out);
            let t = Instant::now();
            match i {
                0 => {
                    fixture::run(
                        Command::new(ctl.bins.join("convoy-agent"))
                            .arg("--config")
                            .arg(d.join("agent.toml"))
                            .args(["fetch", &digest, "--size", &size.to_string(), "--out"])
                            .arg(&out),
                    )?;
                }
                1 => raw_tls(&ctl.pki(), &artifact, &out, None)?,
                2 => raw_tls(&ctl.pki(), &artifact, &out, Some(&digest))?,
                3 => {
                    fixture::run(
                        Command::new("scp")
                            .args(ssh.opts("-P"))
                            .arg(remote(&artifact))
                            .arg(&out),
                    )?;
                }
                _ => {
                    let e = format!("ssh {}", ssh.opts("-p").join(" "));
                    fixture::run(
                        Command::new("rsync")
                            .args(["--whole-file", "-e", &e])
                            .arg(remote(&artifact))
                            .arg(&out),
                    )?;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            if got != size {
                bail!("{}: wrote {got} bytes, expected {size}", f.0);
            }
            f.1.push(mbps(size, secs));
        }
    }
    let med: Vec<f64> = figures.iter().map(|(_, v)| median(v.clone())).collect();
    let rows = figures
        .iter()
        .zip(&med)
        .map(|((name, v), m)| {
            vec![
                name.to_string(),
                format!("{m:.0}"),
                format!(
                    "{:.0}–{:.0}",
                    v.iter().cloned().fold(f64::MAX, f64::min),
                    v.iter().cloned().fold(0.0, f64::max)
                ),
                format!("{:.2}x", med[0] / m),
            ]
        })
        .collect();
    Ok(Section {
        key: "stream",
        title: format!("1. Artifact stream ({} MiB on loopback)", size >> 20),
        command: format!("scripts/bench stream --size {}MiB --runs {runs}", size >> 20),
        header: vec!["transfer", "MB/s (median)", "range", "convoy ÷ this"],
        rows,
        notes: vec![
            "Every transfer moves the same incompressible file from 127.0.0.1 into a new file. convoy is the \
             agent's real download path (`convoy-agent fetch`: a new mTLS connection, the FetchArtifact stream \
             of 256 KiB protobuf chunks over HTTP/2, each chunk hashed with sha256 and written to disk, the \
             digest checked before the file is accepted). Raw TLS is a rustls server and client in one \
             process with the same certificates, copying the file through a 256 KiB buffer and writing it \
             out; the row below it also hashes every piece before writing it. scp and rsync \
             (`--whole-file`) use Debian's OpenSSH with its default cipher. Both ends of every transfer \
             share this machine's cores."
                .into(),
            format!(
                "Goals: at least 0.9x raw TLS (measured {:.2}x) and 1.5x scp (measured {:.2}x). Against raw TLS \
                 that also hashes what it receives, the least any verified download does, convoy measured {:.2}x.",
                med[0] / med[1],
                med[0] / med[3],
                med[0] / med[2]
            ),
        ],
    })
}

fn remote(p: &Path) -> String {
    format!("root@127.0.0.1:{}", p.display())
}

/// An sshd of its own on 127.0.0.1, with throwaway keys.
pub(crate) struct Sshd {
    child: Child,
    port: u16,
    key: std::path::PathBuf,
}

impl Sshd {
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = 12222;
        let s = dir.join("ssh");
        std::fs::create_dir_all(&s)?;
        std::fs::create_dir_all("/run/sshd")?;
        for (name, t) in [("host", "ed25519"), ("user", "ed25519")] {
            fixture::run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", t, "-N", "", "-f"])
                    .arg(s.join(name)),
            )?;
        }
        std::fs::copy(s.join("user.pub"), s.join("authorized_keys"))?;
        std::fs::write(
            s.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
                 Subsystem sftp internal-sftp\n",
                d = s.display()
            ),
        )?;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(s.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(s.join("sshd.log"))?)
            .spawn()
            .context("starting /usr/sbin/sshd (apt install openssh-server)")?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed().as_secs() > 10 {
                bail!("sshd did not start; see {}", s.join("sshd.log").display());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(Sshd {
            child,
            port,
            key: s.join("user"),
        })
    }

    pub(crate) fn opts(&self, port_flag: &str) -> Vec<String> {
        vec![
            "-q".into(),
            port_flag.into(),
            self.port.to_string(),
            "-i".into(),
            self.key.display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One transfer through a plain rustls server and client on loopback; with
/// `verify`, the client also hashes what it receives (as it arrives, the
/// way the agent does) and checks it against that digest.
fn raw_tls(pki: &Path, src: &Path, dst: &Path, verify: Option<&str>) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = |p: &Path| -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
        Ok(convoy_common::identity::certs_der(&std::fs::read(p)?)
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect())
    };
    let key_pem = std::fs::read(pki.join("controller.key"))?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])?.context("no key in controller.key")?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs(&pki.join("controller.pem"))?, key)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&pki.join("ca.pem"))? {
        roots.add(c)?;
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let src = src.to_owned();
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        let (tcp, _) = listener.accept()?;
        let conn = rustls::ServerConnection::new(Arc::new(server))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut f = std::fs::File::open(src)?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n])?;
        }
        tls.conn.send_close_notify();
        tls.flush()?;
        Ok(())
    });
    let tcp = std::net::TcpStream::connect(addr)?;
    let conn = rustls::ClientConnection::new(Arc::new(client), "controller".try_into()?)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut out = std::fs::File::create(dst)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut hasher = convoy_common::digest::Hasher::new();
    loop {
        let n = match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        };
        if verify.is_some() {
            hasher.update(&buf[..n]);
        }
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    if let Some(want) = verify {
        let got = hasher.finish().to_hex();
        if got != want {
            bail!("raw TLS: received sha256 {got}, expected {want}");
        }
    }
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(())
}
