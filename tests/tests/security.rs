//! Security on booted hosts: signed artifacts checked by the agent against
//! its own trusted keys, also when the controller itself is compromised.

use anyhow::Result;
use convoy_tests::Testbed;

fn releases(bed: &Testbed) -> Result<String> {
    let out = bed.hosts[0].exec_ok(&["ls", "/var/lib/convoy/apps/demo/releases"])?;
    Ok(out.split_whitespace().collect::<Vec<_>>().join(" "))
}

#[test]
fn agents_install_only_artifacts_signed_by_keys_they_trust() -> Result<()> {
    // Keys made with the CLI before the fleet exists: the hosts trust one.
    let keys = tempfile::tempdir()?;
    let convoy = convoy_tests::testbed::bin_dir().join("convoy");
    let gen = |name: &str| -> Result<String> {
        let out = std::process::Command::new(&convoy)
            .args(["keys", "generate", name, "--dir"])
            .arg(keys.path())
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(std::fs::read_to_string(keys.path().join(format!("{name}.pub")))?
            .trim()
            .to_owned())
    };
    let trusted = gen("release")?;
    gen("intruder")?;
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/demo.toml"))?;
    let bed = Testbed::boot_full(
        1,
        |_| "staging".into(),
        &spec,
        &format!("trusted_keys = [\"{trusted}\"]"),
    )?;
    let key = |name: &str| keys.path().join(format!("{name}.key")).display().to_string();
    let push = |v: &str, sign: Option<&str>| -> Result<String> {
        let file = bed.pack_demo(v, "healthy")?;
        let mut args = vec!["release", "push", "demo", v, file.to_str().unwrap()];
        let k;
        if let Some(name) = sign {
            k = key(name);
            args.extend(["--sign", &k]);
        }
        bed.convoy_ok(&args)
    };

    // Signed by the trusted key: installed.
    let out = push("1.0.0", Some("release"))?;
    assert!(out.contains(", signed"), "{out}");
    bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    assert_eq!(bed.hosts[0].serving().as_deref(), Some("1.0.0"));

    // Unsigned, or signed by a key the host does not trust: refused.
    push("2.0.0", None)?;
    let out = bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("unsigned artifact refused"), "{}", out.stderr);
    push("3.0.0", Some("intruder"))?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr
            .contains("signature refused: it does not verify with any of this host's 1 trusted key(s)"),
        "{}",
        out.stderr
    );

    // A compromised controller: it keeps 4.0.0's valid signature but serves
    // other bytes, announcing their true digest, so the sha256 matches.
    let out = push("4.0.0", Some("release"))?;
    assert!(out.contains(", signed"));
    let evil = std::fs::read(bed.pack_demo("6.6.6", "healthy")?)?;
    let evil_digest = convoy_common::Digest::of_bytes(&evil);
    std::fs::write(bed.artifact_path(&evil_digest.to_hex()), &evil)?;
    let db = rusqlite::Connection::open(bed.dir.path().join("controller/data/convoy.db"))?;
    let changed = db.execute(
        "UPDATE releases SET digest = ?1, size = ?2 WHERE app = 'demo' AND version = '4.0.0'",
        rusqlite::params![evil_digest.to_hex(), evil.len() as i64],
    )?;
    assert_eq!(changed, 1);
    let out = bed.convoy(&["deploy", "demo", "4.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("signature refused"), "{}", out.stderr);

    // Nothing refused was unpacked; the host still runs 1.0.0.
    assert_eq!(releases(&bed)?, "1.0.0");
    assert_eq!(
        bed.hosts[0]
            .exec_ok(&["ls", "-A", "/var/lib/convoy/apps/demo/staging"])?
            .trim(),
        ""
    );
    assert_eq!(bed.hosts[0].serving().as_deref(), Some("1.0.0"));

    // A signing key others can read is refused at push.
    let k = key("release");
    std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let file = bed.pack_demo("5.0.0", "healthy")?;
    let out = bed.convoy(&["release", "push", "demo", "5.0.0", file.to_str().unwrap(), "--sign", &k])?;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("signing key is readable by group or others"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// Every identity may do what its certificate allows and nothing else: a
/// test for each refusal, over real mutual TLS.
#[test]
fn certificates_are_authorised_by_kind_and_role() -> Result<()> {
    let bed = Testbed::boot(1)?;
    let pki = bed.dir.path().join("pki");
    let pki_s = pki.to_str().unwrap().to_owned();
    let as_cert = |cert: &std::path::Path, key: &std::path::Path, args: &[&str]| bed.convoy_as(cert, key, args);
    bed.push_demo("1.0.0", "healthy")?;

    // The agent runs sandboxed as its unit says (packaging/convoy-agent.service).
    let host = &bed.hosts[0];
    let pid = host.unit_property("convoy-agent.service", "MainPID")?;
    let status = host.exec_ok(&["cat", &format!("/proc/{pid}/status")])?;
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let bounding = status.lines().find(|l| l.starts_with("CapBnd:")).unwrap_or("");
    assert_ne!(bounding, "CapBnd:\t000001ffffffffff", "capabilities are bounded");
    let mounts = host.exec_ok(&["cat", &format!("/proc/{pid}/mountinfo")])?;
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/usr") && l.contains(" ro")),
        "/usr is read-only for the agent:\n{mounts}"
    );

    // A viewer reads but changes nothing.
    bed.convoy_ok(&["pki", "issue", "operator", "vera", "--role", "viewer", "--dir", &pki_s])?;
    let (vc, vk) = (pki.join("vera.pem"), pki.join("vera.key"));
    assert_eq!(as_cert(&vc, &vk, &["status", "demo"])?.code, 0);
    assert_eq!(as_cert(&vc, &vk, &["history", "demo"])?.code, 0);
    for args in [
        vec!["deploy", "demo", "1.0.0", "--env", "staging"],
        vec!["rollback", "demo", "--env", "staging"],
        vec![
            "release",
            "push",
            "demo",
            "9.0.0",
            bed.pack_demo("9.0.0", "healthy")?.to_str().unwrap(),
        ],
    ] {
        let out = as_cert(&vc, &vk, &args.iter().map(|s| &**s).collect::<Vec<_>>())?;
        assert_eq!(out.code, 4, "{args:?}: {out:?}");
        assert!(out.stderr.contains("operator vera (viewer) may not"), "{}", out.stderr);
        assert!(
            out.stderr.contains("that takes the deployer role or above"),
            "{}",
            out.stderr
        );
    }
    assert_eq!(bed.hosts[0].serving(), None, "the viewer deployed nothing");

    // An agent certificate cannot call the operator API.
    let host_dir = bed.dir.path().join("hosts/host1");
    let out = as_cert(
        &host_dir.join("host1.pem"),
        &host_dir.join("host1.key"),
        &["status", "demo"],
    )?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr
            .contains("agent host1 may not call this API; it takes a certificate of kind operator"),
        "{}",
        out.stderr
    );

    // A certificate from another CA does not get through TLS.
    let other = tempfile::tempdir()?;
    let other_s = other.path().to_str().unwrap();
    bed.convoy_ok(&["pki", "init", "--dir", other_s])?;
    bed.convoy_ok(&[
        "pki", "issue", "operator", "mallory", "--role", "admin", "--dir", other_s,
    ])?;
    let out = as_cert(
        &other.path().join("mallory.pem"),
        &other.path().join("mallory.key"),
        &["status", "demo"],
    )?;
    // The server ends the handshake. Whether the client reads the TLS alert
    // (refused, 4) or only sees the connection close (5) is a race; both
    // say why.
    let refused = out.code == 4 && out.stderr.contains("the controller refused the connection");
    let closed = out.code == 5 && out.stderr.contains("a certificate it does not trust ends this way too");
    assert!(refused || closed, "{out:?}");
    assert!(out.stdout.is_empty(), "nothing was served: {}", out.stdout);

    // An operator certificate cannot open an agent session: give host1's
    // agent the operator's certificate and it is turned away.
    for ext in ["pem", "key"] {
        std::fs::copy(
            host_dir.join(format!("host1.{ext}")),
            host_dir.join(format!("host1.{ext}.real")),
        )?;
        std::fs::copy(
            pki.join(format!("operator.{ext}")),
            host_dir.join(format!("host1.{ext}")),
        )?;
    }
    host.exec_ok(&["systemctl", "restart", "convoy-agent.service"])?;
    let start = std::time::Instant::now();
    loop {
        let log = host.exec_ok(&["journalctl", "--no-pager", "-u", "convoy-agent", "-n", "50"])?;
        if log.contains("operator operator (deployer) may not call this API; it takes a certificate of kind agent") {
            break;
        }
        assert!(start.elapsed().as_secs() < 30, "no refusal in the agent's log:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let status = bed.status()?;
    assert_eq!(Testbed::host_status(&status, "host1")?["connected"], false);

    // Its own certificate back: connected again.
    for ext in ["pem", "key"] {
        std::fs::rename(
            host_dir.join(format!("host1.{ext}.real")),
            host_dir.join(format!("host1.{ext}")),
        )?;
    }
    host.exec_ok(&["systemctl", "restart", "convoy-agent.service"])?;
    bed.wait_connected(1)?;
    Ok(())
}

fn token_of(out: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(out).unwrap_or_default();
    v["token"].as_str().unwrap_or_default().to_owned()
}

/// A host joins with a one-time token: its key is made on the host, only a
/// CSR travels, the controller is checked against the CA fingerprint and
/// the token's labels win over the host's config. The certificate is
/// renewed before it expires without dropping the session; revoking the
/// host disconnects it and refuses it until it enrolls again.
#[test]
fn enrollment_rotation_and_revocation() -> Result<()> {
    enrollment(Testbed::boot(2)?)
}

/// The same with the controller's state in PostgreSQL (tokens, labels,
/// revocations).
#[test]
fn enrollment_rotation_and_revocation_on_postgres() -> Result<()> {
    enrollment(Testbed::boot_on_postgres(2)?)
}

fn enrollment(mut bed: Testbed) -> Result<()> {
    let pki = bed.dir.path().join("pki");
    let pki_s = pki.to_str().unwrap().to_owned();
    // Certificates signed by this controller live 30s, so renewal is seen.
    bed.reconfigure_controller(&format!("ca_key = \"{pki_s}/ca.key\"\nagent_cert_validity = \"30s\""))?;
    bed.convoy_ok(&["pki", "issue", "operator", "root", "--role", "admin", "--dir", &pki_s])?;
    let (ac, ak) = (pki.join("root.pem"), pki.join("root.key"));

    // Only admins create tokens and revoke hosts.
    let out = bed.convoy(&["enroll", "create-token", "--labels", "env=staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains("may not create enrollment tokens"),
        "{}",
        out.stderr
    );
    assert_eq!(bed.convoy(&["hosts", "revoke", "host1"])?.code, 4);

    let create = |extra: &[&str]| -> Result<(String, String)> {
        let mut args = vec![
            "enroll",
            "create-token",
            "--labels",
            "env=staging,role=enrolled",
            "--ttl",
            "10m",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", "json"]);
        let out = bed.convoy_as(&ac, &ak, &args)?;
        assert_eq!(out.code, 0, "{out:?}");
        let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
        Ok((
            token_of(&out.stdout),
            v["ca_fingerprint"].as_str().unwrap_or("").to_owned(),
        ))
    };
    let (token, fingerprint) = create(&[])?;
    assert!(
        token.starts_with("cvt_") && fingerprint.starts_with("sha256:"),
        "{token} {fingerprint}"
    );

    // A wrong fingerprint: the agent refuses the controller before it
    // sends the token.
    let wrong = format!("sha256:{}", "0".repeat(64));
    bed.enroll_config(1, "web9", &token, &wrong, 0)?;
    let refused = || {
        bed.hosts[1]
            .exec_ok(&["journalctl", "--no-pager", "-u", "convoy-agent"])
            .is_ok_and(|j| j.contains("does not match ca_fingerprint"))
    };
    let start = std::time::Instant::now();
    while !refused() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the agent never refused the controller"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The token is valid: had the agent sent it, the controller would have
    // enrolled web9 (or refused it), and said so.
    let log = bed.controller_log();
    assert!(
        !log.contains("host enrolled") && !log.contains("enrollment refused"),
        "the token reached the controller:\n{log}"
    );

    // The right one: enrolled as web9 with the token's labels.
    bed.enroll_config(1, "web9", &token, &fingerprint, 0)?;
    bed.wait_host_connected("web9")?;
    assert_eq!(
        bed.controller_log().matches("host enrolled").count(),
        1,
        "the token was spent once, by this enrollment"
    );
    let host = &bed.hosts[1];
    assert_eq!(
        host.exec_ok(&["stat", "-c", "%a", "/var/lib/convoy-tls/agent.key"])?
            .trim(),
        "600"
    );
    let hosts: serde_json::Value = serde_json::from_str(&bed.convoy_ok(&["hosts", "--output", "json"])?)?;
    let web9 = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "web9")
        .cloned()
        .unwrap();
    assert_eq!(
        web9["labels"]["env"], "staging",
        "the token's labels, not the config's: {web9}"
    );
    assert_eq!(web9["labels"]["role"], "enrolled");
    let first_cert = host.exec_ok(&["cat", "/var/lib/convoy-tls/agent.pem"])?;
    let enrolled_at = std::time::Instant::now();

    // The token works once.
    let again = host.exec(&[
        "sh",
        "-c",
        "sed -e 's/web9/web10/' -e 's#/agent\\.#/again.#' /var/lib/convoy-tls/agent.toml > /var/lib/convoy-tls/again.toml && \
         chmod 600 /var/lib/convoy-tls/again.toml && timeout 20 convoy-agent --config /var/lib/convoy-tls/again.toml",
    ])?;
    let again_err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(
        again_err.contains("enrollment refused: this enrollment token was already used"),
        "{again_err}"
    );
    // A fresh token cannot take the name of a host that is connected.
    let (other, _) = create(&[])?;
    let taken = host.exec(&[
        "sh",
        "-c",
        &format!(
            "sed -e 's/web9/host1/' -e 's#/agent\\.#/again.#' -e 's/cvt_[0-9a-f]*/{other}/' /var/lib/convoy-tls/agent.toml \
             > /var/lib/convoy-tls/again.toml && timeout 20 convoy-agent --config /var/lib/convoy-tls/again.toml"
        ),
    ])?;
    let taken_err = String::from_utf8_lossy(&taken.stderr);
    assert!(taken_err.contains("host host1 is connected"), "{taken_err}");

    // Rotation: renewed before the 30s certificate expires; the session
    // carries on and, past the first certificate's expiry, deploys work.
    let start = std::time::Instant::now();
    loop {
        if host.exec_ok(&["cat", "/var/lib/convoy-tls/agent.pem"])? != first_cert {
            break;
        }
        assert!(start.elapsed().as_secs() < 40, "the certificate was never renewed");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(bed.controller_log().contains("certificate renewed"));
    std::thread::sleep(std::time::Duration::from_secs(35).saturating_sub(enrolled_at.elapsed()));
    bed.push_demo("1.0.0", "healthy")?;
    let out = bed.deploy_everywhere("1.0.0")?;
    assert!(out.contains("[web9] => succeeded"), "{out}");
    host.exec_ok(&["systemctl", "restart", "convoy-agent"])?;
    bed.wait_host_connected("web9")?;

    // Revocation: disconnected now and refused from then on.
    let out = bed.convoy_as(&ac, &ak, &["hosts", "revoke", "web9"])?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("web9 disconnected and revoked"), "{}", out.stdout);
    std::thread::sleep(std::time::Duration::from_secs(5));
    let status = bed.status()?;
    assert_eq!(Testbed::host_status(&status, "web9")?["connected"], false, "{status}");
    assert!(bed.controller_log().contains("refused a revoked certificate"));
    let journal = host.exec_ok(&["journalctl", "--no-pager", "-u", "convoy-agent"])?;
    assert!(journal.contains("was revoked"), "{journal}");
    assert_eq!(bed.convoy_as(&ac, &ak, &["hosts", "revoke", "nosuchhost"])?.code, 4);

    // Enrolling again (a token for that name) readmits it.
    let (token, _) = create(&["--name", "web9"])?;
    bed.enroll_config(1, "web9", &token, &fingerprint, 0)?;
    bed.wait_host_connected("web9")?;

    // No secret in logs or in JSON: no token, no private key.
    let mut seen = bed.controller_log();
    seen.push_str(&host.exec_ok(&["journalctl", "--no-pager", "-u", "convoy-agent"])?);
    seen.push_str(&bed.convoy_ok(&["hosts", "--output", "json"])?);
    seen.push_str(&bed.convoy_ok(&["history", "demo", "--output", "json"])?);
    seen.push_str(&bed.convoy_ok(&["status", "demo", "--output", "json"])?);
    assert!(!seen.contains("cvt_"), "a token leaked");
    assert!(!seen.contains("PRIVATE KEY"), "a key leaked");
    Ok(())
}
