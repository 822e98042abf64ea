//! docs/guide.md, walked step by step on clean Debian hosts: the Debian
//! packages, the controller's PKI and service, an operator, a host enrolled
//! with a one-time token, an app spec and a release with its own unit, a
//! deploy, a canary, a rollback and history, each with the commands the
//! guide gives (only addresses and names filled in).

use anyhow::Result;
use convoy_tests::{Host, Testbed};

const CONTROLLER: &str = "convoy-controller_0.1.0-1";
const AGENT: &str = "convoy-agent_0.1.0-1";

/// The first ```toml block under the guide's heading `section`, as written.
fn guide_toml(section: &str) -> String {
    let guide = include_str!("../../docs/guide.md");
    let from = guide.find(&format!("## {section}\n")).expect("section in the guide");
    let rest = &guide[from..];
    let start = rest.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let len = rest[start..].find("```").expect("the block ends");
    rest[start..start + len].to_owned()
}

/// Runs `script` with bash on `host` as root, with the operator's
/// environment from the guide's "Start the controller".
fn as_operator(host: &Host, controller_ip: &str, script: &str) -> Result<String> {
    host.exec_ok(&[
        "bash",
        "-c",
        &format!(
            "set -e; export HOME=/root CONVOY_CONTROLLER=https://{controller_ip}:7443 CONVOY_SERVER_NAME=controller \
             CONVOY_CA=~/.convoy/ca.pem CONVOY_CERT=~/.convoy/root.pem CONVOY_KEY=~/.convoy/root.key; {script}"
        ),
    ])
}

#[test]
fn the_operator_guide_works_as_written() -> Result<()> {
    let bed = Testbed::boot_packaged(2)?;
    let (ctl, web) = (&bed.hosts[0], &bed.hosts[1]);
    let ip = ctl.ip.to_string();

    // Install: the controller package on the controller's machine, the
    // agent package on the host.
    ctl.exec_ok(&["dpkg", "-i", &Testbed::package(CONTROLLER)?])?;
    web.exec_ok(&["dpkg", "-i", &Testbed::package(AGENT)?])?;
    assert_eq!(
        web.unit_property("convoy-agent", "ActiveState")?,
        "inactive",
        "waits, not failed"
    );

    // Start the controller.
    ctl.exec_ok(&[
        "bash",
        "-c",
        &format!(
            "set -e
             convoy pki init --dir /etc/convoy/pki
             convoy pki issue controller controller --dir /etc/convoy/pki --san {ip} --out /etc/convoy
             chown convoy: /etc/convoy/controller.key /etc/convoy/pki/ca.key
             convoy pki issue operator root --role admin --dir /etc/convoy/pki --out ~root/.convoy
             echo 'ca_key = \"/etc/convoy/pki/ca.key\"' >> /etc/convoy/controller.toml
             systemctl start convoy-controller"
        ),
    ])?;
    assert_eq!(ctl.unit_property("convoy-controller", "ActiveState")?, "active");

    // Enroll a host.
    let token: serde_json::Value = serde_json::from_str(&as_operator(
        ctl,
        &ip,
        "convoy enroll create-token --name web7 --labels env=staging,zone=eu1 --ttl 1h --output json",
    )?)?;
    let text = as_operator(
        ctl,
        &ip,
        "convoy enroll create-token --name web7 --labels env=staging,zone=eu1 --ttl 1h",
    )?;
    assert!(text.contains("ca_fingerprint = \"sha256:"), "{text}");
    // The guide's agent.toml, with this controller's address and the token.
    let agent_toml = guide_toml("Enroll a host")
        .replace("10.0.0.5", &ip)
        .replace("cvt_...", token["token"].as_str().unwrap())
        .replace("sha256:...", token["ca_fingerprint"].as_str().unwrap());
    web.exec_ok(&[
        "bash",
        "-c",
        &format!("umask 077; cat > /etc/convoy/agent.toml <<'EOF'\n{agent_toml}EOF\nsystemctl restart convoy-agent"),
    ])?;
    convoy_nspawn::wait_for("web7 to enroll and connect", std::time::Duration::from_secs(60), || {
        let hosts = as_operator(ctl, &ip, "convoy hosts --output json").ok()?;
        let v: serde_json::Value = serde_json::from_str(&hosts).ok()?;
        v["hosts"]
            .as_array()?
            .iter()
            .any(|h| h["host"] == "web7" && h["connected"] == true)
            .then_some(())
    })?;

    // Write an app spec: the guide's web.toml, and a release carrying its
    // own unit in systemd/.
    let unit = b"[Unit]\nDescription=web\n[Service]\nExecStart=/opt/web/bin/demo-app /opt/web\n";
    for v in ["1.0.0", "2.0.0"] {
        let file = bed.pack_demo_with(v, "healthy", &[("systemd/web.service", unit, 0o644)])?;
        std::fs::copy(&file, bed.dir.path().join(format!("hosts/host1/web-{v}.tar.gz")))?;
    }
    ctl.exec_ok(&[
        "bash",
        "-c",
        &format!(
            "mkdir -p /etc/convoy/apps && cat > /etc/convoy/apps/web.toml <<'EOF'\n{}EOF",
            guide_toml("Write an app spec")
        ),
    ])?;

    // Deploy.
    as_operator(
        ctl,
        &ip,
        "cd /etc/convoy-testbed
         convoy release push web 1.0.0 web-1.0.0.tar.gz
         convoy deploy web 1.0.0 --env staging",
    )?;
    assert_eq!(web.serving().as_deref(), Some("1.0.0"));
    // Canary rollouts (one host: the canary is the whole stage) and a
    // dry run first.
    as_operator(
        ctl,
        &ip,
        "cd /etc/convoy-testbed
         convoy release push web 2.0.0 web-2.0.0.tar.gz
         convoy deploy web 2.0.0 --env staging --strategy canary --stages 5%,25%,100% --bake 10s --dry-run
         convoy deploy web 2.0.0 --env staging --strategy canary --stages 5%,25%,100% --bake 10s",
    )?;
    assert_eq!(web.serving().as_deref(), Some("2.0.0"));

    // Roll back and read history.
    as_operator(ctl, &ip, "convoy rollback web --env staging")?;
    assert_eq!(web.serving().as_deref(), Some("1.0.0"));
    let history = as_operator(
        ctl,
        &ip,
        "convoy status web; convoy history web; convoy report web --since 30d",
    )?;
    assert!(history.contains("rollback"), "{history}");

    // Freeze during an incident: refused, then lifted.
    let frozen = ctl.exec(&[
        "bash",
        "-c",
        &format!(
            "export HOME=/root CONVOY_CONTROLLER=https://{ip}:7443 CONVOY_SERVER_NAME=controller \
             CONVOY_CA=~/.convoy/ca.pem CONVOY_CERT=~/.convoy/root.pem CONVOY_KEY=~/.convoy/root.key
             convoy freeze --env staging --reason 'incident 4711: checkout errors'
             convoy deploy web 2.0.0 --env staging"
        ),
    ])?;
    assert_eq!(frozen.status.code(), Some(4), "{frozen:?}");
    as_operator(
        ctl,
        &ip,
        "convoy unfreeze --env staging; convoy deploy web 2.0.0 --env staging",
    )?;
    assert_eq!(web.serving().as_deref(), Some("2.0.0"));
    Ok(())
}
