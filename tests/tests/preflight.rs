//! Pre-flight on booted hosts: a host whose state file system is nearly
//! full and a dependency that does not answer refuse the deploy before any
//! byte moves; once the space is there and the dependency answers, the
//! same deploy goes through.

use std::time::Duration;

use anyhow::Result;
use convoy_tests::Testbed;

const PLAIN: &str = include_str!("../testbed/demo.toml");

const DEPENDENCY: &str = r#"
[preflight]
free_space_margin = "16MiB"

[[preflight.checks]]
type = "tcp"
address = "127.0.0.1:5432"
timeout = "1s"
"#;

/// Names of the releases a host holds.
fn releases(bed: &Testbed, i: usize) -> Result<String> {
    let out = bed.hosts[i].exec(&["sh", "-c", "ls /var/lib/convoy/apps/demo/releases 2>/dev/null; true"])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn a_full_disk_and_a_silent_dependency_refuse_the_deploy_before_anything_moves() -> Result<()> {
    let bed = Testbed::boot(3)?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.set_spec(&format!("{PLAIN}\n{DEPENDENCY}"))?;
    // host2's state directory is a 2 MiB file system; the release unpacks
    // to more than that.
    let host2 = &bed.hosts[1];
    host2.exec_ok(&["systemctl", "stop", "convoy-agent.service"])?;
    host2.exec_ok(&["mkdir", "-p", "/var/lib/convoy"])?;
    host2.exec_ok(&["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", "/var/lib/convoy"])?;
    host2.exec_ok(&["systemctl", "start", "convoy-agent.service"])?;
    bed.wait_connected(3)?;

    let out = bed.convoy(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    let text = format!("{}{}", out.stdout, out.stderr);
    println!("──── deploy refused by pre-flight ────\n{text}");
    assert_eq!(out.code, 4, "{text}");
    assert!(text.contains("pre-flight failed:"), "{text}");
    let row = |host: &str, check: &str| {
        text.lines()
            .any(|l| l.split_whitespace().next() == Some(host) && l.contains(check))
    };
    assert!(row("host2", "free space"), "{text}");
    assert!(!row("host1", "free space") && !row("host3", "free space"), "{text}");
    for h in ["host1", "host2", "host3"] {
        assert!(row(h, "tcp 127.0.0.1:5432"), "{h}: {text}");
    }
    assert!(text.contains("nothing was staged or switched"), "{text}");
    for i in 0..3 {
        assert_eq!(releases(&bed, i)?, "", "host{} holds nothing", i + 1);
        assert_eq!(bed.hosts[i].serving(), None, "host{} runs nothing", i + 1);
    }

    // Control case: the space is there and the dependency answers.
    host2.exec_ok(&["mount", "-o", "remount,size=1G", "/var/lib/convoy"])?;
    for h in &bed.hosts {
        h.exec_ok(&[
            "systemd-run",
            "--unit=fake-db",
            "/usr/bin/systemd-socket-activate",
            "--accept",
            "-l",
            "127.0.0.1:5432",
            "/bin/cat",
        ])?;
        convoy_nspawn::wait_for("the dependency to listen", Duration::from_secs(10), || {
            h.exec(&["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/5432"])
                .ok()
                .filter(|o| o.status.success())
        })?;
    }
    let out = bed.convoy(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("pre-flight passed on 3 host(s)"), "{}", out.stdout);
    for h in &bed.hosts {
        assert_eq!(h.serving().as_deref(), Some("1.0.0"));
    }
    Ok(())
}
