//! `convoy sandbox up | status | env | down`, as the README's demo runs it:
//! hosts boot, agents enroll with tokens, the example app deploys (and its
//! broken release is restored), and `down` leaves nothing behind.

use std::process::Command;

use anyhow::{bail, Result};
use convoy_tests::testbed::{bin_dir, rootfs};

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn convoy(&self, args: &[&str], env: &[(String, String)]) -> Result<(i32, String, String)> {
        let out = Command::new(bin_dir().join("convoy"))
            .args(args)
            .env("CONVOY_SANDBOX_DIR", self.dir.path().join("sandbox"))
            .env("CONVOY_SANDBOX_ROOTFS", rootfs())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn ok(&self, args: &[&str], env: &[(String, String)]) -> Result<String> {
        let (code, out, err) = self.convoy(args, env)?;
        if code != 0 {
            bail!("convoy {args:?} exited {code}: {out}{err}");
        }
        Ok(out)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.convoy(&["sandbox", "down"], &[]);
    }
}

#[test]
fn sandbox_up_deploy_and_down_leave_nothing_behind() -> Result<()> {
    let sb = Sandbox {
        dir: tempfile::Builder::new().prefix("convoy-sandbox-test-").tempdir()?,
    };
    let up = sb.ok(&["sandbox", "up", "--hosts", "2"], &[])?;
    assert!(up.contains("2 host(s) enrolled and connected"), "{up}");
    assert!(up.contains("convoy deploy hello 1.0.0 --env staging"), "{up}");
    // A second `up` refuses and changes nothing.
    let (code, _, err) = sb.convoy(&["sandbox", "up"], &[])?;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already up"), "{err}");

    let env: Vec<(String, String)> = sb
        .ok(&["sandbox", "env"], &[])?
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(env.len(), 5, "{env:?}");
    let examples = sb.dir.path().join("sandbox/examples");
    for v in ["1.0.0", "3.0.0"] {
        let file = examples.join(format!("hello-{v}.tar.gz"));
        sb.ok(&["release", "push", "hello", v, file.to_str().unwrap()], &env)?;
    }
    let deployed = sb.ok(&["deploy", "hello", "1.0.0", "--env", "staging"], &env)?;
    assert!(deployed.contains("succeeded: 2 host(s)"), "{deployed}");
    let (code, _, err) = sb.convoy(&["deploy", "hello", "3.0.0", "--env", "staging"], &env)?;
    assert_eq!(code, 1, "the broken release must fail and be restored: {err}");
    assert!(err.contains("self-test failed"), "{err}");
    let status: serde_json::Value = serde_json::from_str(&sb.ok(&["status", "hello", "--output", "json"], &env)?)?;
    for h in status["hosts"].as_array().unwrap() {
        assert_eq!(h["app"]["current"], "1.0.0", "{h}");
        assert_eq!(h["app"]["health"], "healthy", "{h}");
    }
    // Enrolled, not issued by hand: the hosts' certificates were written by their agents.
    let hosts = sb.dir.path().join("sandbox/hosts");
    for h in ["host1", "host2"] {
        assert!(
            hosts.join(h).join("tls/agent.pem").exists(),
            "{h} has no enrolled certificate"
        );
    }
    let status = sb.ok(&["sandbox", "status"], &[])?;
    assert_eq!(
        status.matches("running").count(),
        3,
        "controller and two hosts: {status}"
    );
    let bridge = status
        .split_whitespace()
        .find(|w| w.starts_with("convoysbx"))
        .expect("status names the bridge")
        .trim_end_matches(',')
        .to_owned();

    let down = sb.ok(&["sandbox", "down"], &[])?;
    assert!(down.contains("sandbox removed: 2 host(s)"), "{down}");
    assert!(!sb.dir.path().join("sandbox").exists());
    let links = String::from_utf8_lossy(&Command::new("ip").args(["-o", "link", "show"]).output()?.stdout).into_owned();
    assert!(!links.contains(&format!("{bridge}:")), "{links}");
    let procs = String::from_utf8_lossy(&Command::new("ps").args(["-eo", "args"]).output()?.stdout).into_owned();
    assert!(!procs.lines().any(|l| l.contains("convoy-sandbox-test-")), "{procs}");
    // Down again is a no-op.
    assert!(sb.ok(&["sandbox", "down"], &[])?.contains("no sandbox is up"));
    Ok(())
}
