//! Releases and keys, enrollment tokens, revocation.

use std::path::PathBuf;

use convoy_proto::{push_request, PushHeader, PushRequest};

use super::{exit, Conn, Failure};

pub async fn push(
    conn: &Conn,
    app: String,
    version: String,
    file: PathBuf,
    sign: Option<PathBuf>,
) -> Result<(), Failure> {
    let app_name = convoy_common::AppName::new(app.clone()).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let ver = convoy_common::Version::new(version.clone()).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let key = sign
        .map(|k| convoy_common::signing::PrivateKey::load(&k))
        .transpose()
        .map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    // Streamed from the file, never held in memory whole: one pass to
    // hash it and make its manifest when it is signed, one to send it.
    let unreadable = |e: std::io::Error| Failure::new(exit::USAGE, format!("{}: {e}", file.display()));
    let mut f = std::fs::File::open(&file).map_err(unreadable)?;
    let size = f.metadata().map_err(unreadable)?.len();
    let mut magic = [0u8; 4];
    let read = std::io::Read::read(&mut f, &mut magic).map_err(unreadable)?;
    if convoy_common::archive::Compression::sniff(&magic[..read]).is_none() {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{}: neither gzip nor zstd; an artifact is a .tar.gz or .tar.zst of the release tree",
                file.display()
            ),
        ));
    }
    std::io::Seek::rewind(&mut f).map_err(unreadable)?;
    let (signature, manifest_digest) = match key {
        Some(k) => {
            let (digest, manifest) = digest_and_manifest(&mut f).map_err(|e| {
                Failure::new(
                    exit::USAGE,
                    format!("{}: not a sound release archive: {e}", file.display()),
                )
            })?;
            std::io::Seek::rewind(&mut f).map_err(unreadable)?;
            (k.sign(&app_name, &ver, &digest, &manifest), manifest.to_hex())
        }
        None => (Vec::new(), String::new()),
    };
    let signed = !signature.is_empty();
    let mut client = conn.connect().await?;
    let header = PushRequest {
        body: Some(push_request::Body::Header(PushHeader {
            app: app.clone(),
            version: version.clone(),
            size,
            signature,
            manifest_digest,
        })),
    };
    // A read error ends the stream early (the controller then refuses the
    // short upload) and is reported here.
    let read_error = std::sync::Arc::new(std::sync::Mutex::new(None::<std::io::Error>));
    let seen_error = read_error.clone();
    let data = tokio_stream::StreamExt::map_while(
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(f), convoy_proto::CHUNK_SIZE),
        move |chunk: std::io::Result<bytes::Bytes>| match chunk {
            Ok(bytes) => Some(PushRequest {
                body: Some(push_request::Body::Data(bytes.to_vec())),
            }),
            Err(e) => {
                *seen_error.lock().unwrap() = Some(e);
                None
            }
        },
    );
    let chunks = tokio_stream::StreamExt::chain(tokio_stream::iter([header]), data);
    let pushed = client.push_release(chunks).await;
    if let Some(e) = read_error.lock().unwrap().take() {
        return Err(unreadable(e));
    }
    let reply = pushed?.into_inner();
    if reply.already_present {
        println!(
            "{app} {version} was already pushed (sha256 {}, {} bytes)",
            reply.digest, reply.size
        );
    } else {
        let how = if signed { ", signed" } else { "" };
        println!(
            "pushed {app} {version}: sha256 {}, {} bytes{how}",
            reply.digest, reply.size
        );
    }
    Ok(())
}

/// The artifact's sha256 and its manifest's, in one read: the bytes are
/// hashed as the manifest reader takes them.
fn digest_and_manifest(f: &mut std::fs::File) -> Result<(convoy_common::Digest, convoy_common::Digest), String> {
    struct Hashing<'a, R> {
        inner: R,
        hasher: &'a mut convoy_common::digest::Hasher,
    }
    impl<R: std::io::Read> std::io::Read for Hashing<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hasher.update(&buf[..n]);
            Ok(n)
        }
    }
    let mut hasher = convoy_common::digest::Hasher::new();
    // Every rule is checked by the controller against the app's limits;
    // here the manifest is only made.
    let limits = convoy_common::archive::Limits::unbounded();
    let reader = Hashing {
        inner: std::io::BufReader::with_capacity(1 << 20, f),
        hasher: &mut hasher,
    };
    let stats = convoy_common::archive::manifest_of(reader, &limits).map_err(|e| e.to_string())?;
    Ok((hasher.finish(), stats.manifest.digest()))
}

/// `convoy keys generate`: an ed25519 key pair for signing releases.
pub fn keys_generate(dir: &std::path::Path, name: &str) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    convoy_common::HostName::new(name).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let key = convoy_common::signing::PrivateKey::generate().map_err(|e| Failure::new(exit::FAILED, e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", dir.display())))?;
    let (priv_path, pub_path) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    let write = |path: &std::path::Path, text: &str, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| Failure::new(exit::REFUSED, format!("{}: {e}", path.display())))
    };
    write(&priv_path, &key.to_file_text(), 0o600)?;
    write(&pub_path, &format!("{}\n", key.public()), 0o644)?;
    println!("signing key {} (keep it secret)", priv_path.display());
    println!("public key  {}: {}", pub_path.display(), key.public());
    println!(
        "trust it on hosts with, in agent.toml: trusted_keys = [\"{}\"]",
        key.public()
    );
    Ok(())
}

/// `convoy enroll create-token`: prints the token (its only appearance:
/// the controller keeps a hash) and the lines for the host's agent.toml.
pub async fn create_token(
    conn: &Conn,
    name: String,
    labels: Vec<(String, String)>,
    ttl: std::time::Duration,
    json: bool,
) -> Result<(), Failure> {
    let ca = conn
        .ca
        .clone()
        .ok_or_else(|| Failure::new(exit::USAGE, "--ca (or CONVOY_CA) is required"))?;
    let ca_pem = convoy_common::identity::read_cert_pem(&ca).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let fingerprint = convoy_common::identity::certs_der(&ca_pem)
        .first()
        .map(|d| convoy_common::identity::fingerprint(d))
        .unwrap_or_default();
    let mut client = conn.connect().await?;
    let reply = client
        .create_enroll_token(convoy_proto::CreateTokenRequest {
            name: name.clone(),
            labels: labels.iter().cloned().collect(),
            ttl_ms: ttl.as_millis() as u64,
        })
        .await?
        .into_inner();
    let labels: std::collections::BTreeMap<String, String> = labels.into_iter().collect();
    if json {
        let out = serde_json::json!({
            "token": reply.token,
            "name": if name.is_empty() { None } else { Some(&name) },
            "labels": labels,
            "expires_at_unix_ms": reply.expires_at_unix_ms,
            "ca_fingerprint": fingerprint,
        });
        super::print_json(&out);
        return Ok(());
    }
    let who = if name.is_empty() {
        "any new host name".to_owned()
    } else {
        name.clone()
    };
    println!(
        "one-time enrollment token for {who}, valid for {}:",
        humantime::format_duration(ttl)
    );
    println!("  {}", reply.token);
    println!("on the host, in /etc/convoy/agent.toml (with name, controller, ca, cert and key):");
    println!("  enroll_token = \"{}\"", reply.token);
    println!("  ca_fingerprint = \"{fingerprint}\"");
    if !labels.is_empty() {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("the host's labels will be {}", l.join(", "));
    }
    Ok(())
}

/// `convoy hosts revoke NAME`.
pub async fn revoke_host(conn: &Conn, name: String) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .revoke_host(convoy_proto::RevokeRequest { host: name.clone() })
        .await?
        .into_inner();
    let was = if reply.was_connected { "disconnected and " } else { "" };
    println!("{name} {was}revoked: its certificates are refused from now on; enroll it again to readmit it");
    Ok(())
}

fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn freeze_line(f: &convoy_proto::FreezeInfo) -> String {
    let until = match f.until_unix_ms {
        0 => "until unfrozen".to_owned(),
        u => format!("until {}", when(u)),
    };
    format!(
        "{} frozen by {} since {}, {until}: {}",
        f.environment,
        f.frozen_by,
        when(f.at_unix_ms),
        f.reason
    )
}

pub async fn freeze(
    conn: &Conn,
    env: String,
    reason: String,
    until: Option<std::time::Duration>,
) -> Result<(), Failure> {
    if reason.trim().is_empty() {
        return Err(Failure::new(
            exit::USAGE,
            "--reason: say why (it is shown to everyone refused)",
        ));
    }
    let mut client = conn.connect().await?;
    let reply = client
        .freeze(convoy_proto::FreezeRequest {
            environment: env,
            reason,
            for_ms: until.map_or(0, |d| d.as_millis() as u64),
        })
        .await?
        .into_inner();
    if let Some(f) = reply.freeze {
        println!("{}", freeze_line(&f));
        println!(
            "new deploys into {} are refused; running ones wait before their next batch",
            f.environment
        );
    }
    Ok(())
}

pub async fn unfreeze(conn: &Conn, env: String) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .unfreeze(convoy_proto::UnfreezeRequest {
            environment: env.clone(),
        })
        .await?
        .into_inner();
    let by = reply
        .freeze
        .map(|f| format!(" (frozen by {}: {})", f.frozen_by, f.reason))
        .unwrap_or_default();
    println!("{env} unfrozen{by}; waiting rollouts go on");
    Ok(())
}

/// The `--output json` shape of `convoy freezes`.
#[derive(serde::Serialize)]
struct FreezesJson {
    freezes: Vec<FreezeJson>,
    audit: Vec<AuditJson>,
}

#[derive(serde::Serialize)]
struct FreezeJson {
    environment: String,
    reason: String,
    frozen_by: String,
    at_unix_ms: i64,
    until_unix_ms: Option<i64>,
}

#[derive(serde::Serialize)]
struct AuditJson {
    at_unix_ms: i64,
    who: String,
    action: String,
    environment: String,
    detail: String,
}

pub async fn freezes(conn: &Conn, limit: u32, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .freezes(convoy_proto::FreezesRequest { audit_limit: limit })
        .await?
        .into_inner();
    if json {
        super::print_json(&FreezesJson {
            freezes: reply
                .freezes
                .iter()
                .map(|f| FreezeJson {
                    environment: f.environment.clone(),
                    reason: f.reason.clone(),
                    frozen_by: f.frozen_by.clone(),
                    at_unix_ms: f.at_unix_ms,
                    until_unix_ms: Some(f.until_unix_ms).filter(|u| *u > 0),
                })
                .collect(),
            audit: reply
                .audit
                .into_iter()
                .map(|a| AuditJson {
                    at_unix_ms: a.at_unix_ms,
                    who: a.who,
                    action: a.action,
                    environment: a.environment,
                    detail: a.detail,
                })
                .collect(),
        });
        return Ok(());
    }
    if reply.freezes.is_empty() {
        println!("no environment is frozen");
    }
    for f in &reply.freezes {
        println!("{}", freeze_line(f));
    }
    if !reply.audit.is_empty() {
        println!();
        for a in &reply.audit {
            println!(
                "{} {:<12} {:<10} {} {}",
                when(a.at_unix_ms),
                a.action,
                a.environment,
                a.who,
                a.detail
            );
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct ControllersJson {
    answered_by: String,
    database: String,
    controllers: Vec<ControllerJson>,
}

#[derive(serde::Serialize)]
struct ControllerJson {
    name: String,
    address: String,
    up: bool,
    seen_ago_ms: i64,
    started_at_unix_ms: i64,
    sessions: i64,
    rollouts: Vec<LeaseJson>,
}

#[derive(serde::Serialize)]
struct LeaseJson {
    rollout: String,
    epoch: i64,
    renewed_ago_ms: i64,
    expires_in_ms: i64,
}

/// `convoy controllers`.
pub async fn controllers(conn: &Conn, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .controllers(convoy_proto::ControllersRequest {})
        .await?
        .into_inner();
    let out = ControllersJson {
        answered_by: reply.answered_by,
        database: reply.database,
        controllers: reply
            .controllers
            .into_iter()
            .map(|c| ControllerJson {
                rollouts: c
                    .leases
                    .into_iter()
                    .map(|l| LeaseJson {
                        rollout: l.rollout_id,
                        epoch: l.epoch,
                        renewed_ago_ms: l.renewed_ago_ms,
                        expires_in_ms: l.expires_in_ms,
                    })
                    .collect(),
                name: c.name,
                address: c.address,
                up: c.up,
                seen_ago_ms: c.seen_ago_ms,
                started_at_unix_ms: c.started_at_unix_ms,
                sessions: c.sessions,
            })
            .collect(),
    };
    if json {
        super::print_json(&out);
        return Ok(());
    }
    let secs = |ms: i64| format!("{:.1}s", ms as f64 / 1000.0);
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header([
        "CONTROLLER",
        "ADDRESS",
        "STATE",
        "SESSIONS",
        "ROLLOUTS (epoch, lease renewed)",
    ]);
    for c in &out.controllers {
        let rollouts: Vec<String> = c
            .rollouts
            .iter()
            .map(|l| match l.expires_in_ms {
                e if e < 0 => format!("{} (epoch {}, lease expired {} ago)", l.rollout, l.epoch, secs(-e)),
                _ => format!("{} (epoch {}, {} ago)", l.rollout, l.epoch, secs(l.renewed_ago_ms)),
            })
            .collect();
        let state = match c.up {
            true => "up".to_owned(),
            false => format!("down (last seen {} ago)", secs(c.seen_ago_ms)),
        };
        table.add_row([
            c.name.clone(),
            c.address.clone(),
            state,
            c.sessions.to_string(),
            match rollouts.is_empty() {
                true => "-".to_owned(),
                false => rollouts.join(", "),
            },
        ]);
    }
    println!("{table}");
    println!("answered by {} ({} database)", out.answered_by, out.database);
    Ok(())
}
