//! The install engine on booted hosts: hooks, backups, unit files shipped in
//! releases, retention, resumed and tampered transfers, a full disk while
//! staging, and the per-app lock.

use anyhow::Result;
use convoy_tests::{Host, Testbed};

/// The demo spec with every hook, a backup path, retention and all four
/// kinds of health check.
const ENGINE_SPEC: &str = r#"
name = "demo"
install_path = "/opt/demo"
units = ["demo.service"]
environments = ["staging"]
backup_paths = ["/etc/demo"]
keep_releases = 3

[hooks.before_install]
command = ["bin/hook.sh"]
[hooks.after_install]
command = ["bin/hook.sh"]
[hooks.before_activate]
command = ["bin/hook.sh"]
[hooks.after_activate]
command = ["bin/hook.sh"]
[hooks.validate]
command = ["bin/hook.sh"]
timeout = "5s"
[hooks.before_rollback]
command = ["bin/hook.sh"]

[health]
min_healthy_time = "1s"
healthy_deadline = "6s"

[[health.checks]]
type = "systemd"
unit = "demo.service"
interval = "200ms"

[[health.checks]]
type = "tcp"
address = "127.0.0.1:8080"
interval = "200ms"

[[health.checks]]
type = "http"
url = "http://127.0.0.1:8080/health"
interval = "200ms"

[[health.checks]]
type = "command"
command = ["bin/check.sh"]
interval = "200ms"
"#;

/// Logs every call with its environment; `before_activate` writes
/// /etc/demo/schema and, after 1.0.0, also rewrites /etc/demo (content,
/// mode, owner, a symlink), which is backed up; a file `fail-<hook>` in the
/// release makes that hook fail.
const HOOK: &[u8] = br#"#!/bin/sh
echo "$CONVOY_HOOK $CONVOY_VERSION prev=$CONVOY_PREVIOUS_VERSION env=$CONVOY_ENVIRONMENT app=$CONVOY_APP" >> /var/log/demo-hooks.log
echo "hook $CONVOY_HOOK says hello"
if [ "$CONVOY_HOOK" = before_activate ]; then
    mkdir -p /etc/demo && echo "$CONVOY_VERSION" > /etc/demo/schema
    if [ "$CONVOY_VERSION" != 1.0.0 ]; then
        echo "migrated to $CONVOY_VERSION" >> /etc/demo/app.conf
        chmod 600 /etc/demo/app.conf && chown 0:0 /etc/demo/app.conf && rm -f /etc/demo/current.conf
    fi
fi
if [ -f "fail-$CONVOY_HOOK" ]; then
    echo "failing $CONVOY_HOOK as packed" >&2
    exit 7
fi
"#;

const CHECK: &[u8] = b"#!/bin/sh\nexec curl -sf -o /dev/null http://127.0.0.1:8080/health\n";

fn unit(desc: &str) -> Vec<u8> {
    format!("[Unit]\nDescription={desc}\n\n[Service]\nExecStart=/bin/sleep infinity\n").into_bytes()
}

/// Mode, owner, mtime, type and content hash of everything under /etc/demo.
fn snapshot(host: &Host) -> Result<String> {
    host.exec_ok(&[
        "sh",
        "-c",
        "cd /etc/demo && find . -exec stat -c '%n %a %u:%g %Y %F' {} + | sort && \
         find . -type f -exec sha256sum {} + | sort && find . -type l -exec readlink {} + | sort",
    ])
}

fn hook_log(host: &Host) -> Result<Vec<String>> {
    Ok(host
        .exec_ok(&["cat", "/var/log/demo-hooks.log"])?
        .lines()
        .map(String::from)
        .collect())
}

fn releases(host: &Host) -> Result<String> {
    Ok(host
        .exec_ok(&["ls", "/var/lib/convoy/apps/demo/releases"])?
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" "))
}

#[test]
fn hooks_backups_unit_files_and_retention() -> Result<()> {
    let bed = Testbed::boot_spec(1, |_| "staging".into(), ENGINE_SPEC)?;
    let host = &bed.hosts[0];
    host.exec_ok(&[
        "sh",
        "-c",
        "mkdir -p /etc/demo && printf 'port = 1\\n' > /etc/demo/app.conf && chmod 640 /etc/demo/app.conf && \
         chown 1234:4321 /etc/demo/app.conf && ln -s app.conf /etc/demo/current.conf && \
         touch -d @1600000000 /etc/demo/app.conf",
    ])?;
    let base: Vec<(&str, &[u8], u32)> = vec![("bin/hook.sh", HOOK, 0o755), ("bin/check.sh", CHECK, 0o755)];

    // v1: every hook runs in order with its environment; the unit file it
    // ships is installed and loaded.
    let u1 = unit("extra v1");
    let mut files = base.clone();
    files.push(("systemd/demo-extra.service", &u1, 0o644));
    bed.push_file("1.0.0", &bed.pack_demo_with("1.0.0", "healthy", &files)?)?;
    let out = bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    assert!(
        out.contains("hook     info      before_install: hook before_install says hello"),
        "{out}"
    );
    assert!(out.contains("backup   succeeded"), "{out}");
    let expected: Vec<String> = [
        "before_install",
        "after_install",
        "before_activate",
        "after_activate",
        "validate",
    ]
    .iter()
    .map(|h| format!("{h} 1.0.0 prev= env=staging app=demo"))
    .collect();
    assert_eq!(hook_log(host)?, expected);
    assert_eq!(host.unit_property("demo-extra.service", "Description")?, "extra v1");
    assert_eq!(host.exec_ok(&["cat", "/etc/demo/schema"])?.trim(), "1.0.0");
    let after_v1 = snapshot(host)?;
    assert!(
        after_v1.contains("./app.conf 640 1234:4321 1600000000 regular file"),
        "{after_v1}"
    );
    assert!(after_v1.contains("./current.conf 777 0:0"), "{after_v1}");

    // v2 fails its health check: before_rollback runs, /etc/demo is put
    // back exactly (mode, owner, mtime, links, content) although
    // before_activate migrated it, and the unit files are put back.
    let (u2, unew) = (unit("extra v2"), unit("new in v2"));
    let mut files = base.clone();
    files.push(("systemd/demo-extra.service", &u2, 0o644));
    files.push(("systemd/demo-new.service", &unew, 0o644));
    bed.push_file("2.0.0", &bed.pack_demo_with("2.0.0", "unhealthy", &files)?)?;
    let out = bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("health check failed"), "{}", out.stderr);
    assert!(out.stderr.contains("restored 1.0.0"), "{}", out.stderr);
    let log = hook_log(host)?;
    assert_eq!(
        log.last().unwrap(),
        "before_rollback 2.0.0 prev=1.0.0 env=staging app=demo"
    );
    assert!(log.contains(&"before_activate 2.0.0 prev=1.0.0 env=staging app=demo".to_string()));
    assert_eq!(snapshot(host)?, after_v1, "backup restored exactly");
    assert_eq!(host.unit_property("demo-extra.service", "Description")?, "extra v1");
    assert!(
        host.exec(&["test", "-e", "/etc/systemd/system/demo-new.service"])?
            .status
            .code()
            == Some(1)
    );
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));

    // v3 is healthy but its validate hook fails: restored, with the hook's
    // exit status and last output in the reason.
    let mut files = base.clone();
    files.push(("fail-validate", b"", 0o644));
    bed.push_file("3.0.0", &bed.pack_demo_with("3.0.0", "healthy", &files)?)?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 1, "{out:?}");
    // stdout and stderr are separate pipes: their lines may come in either order.
    assert!(
        out.stderr
            .contains("hook validate failed (exit status: 7); last output: "),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("failing validate as packed"), "{}", out.stderr);
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));
    assert_eq!(snapshot(host)?, after_v1);

    // Retention: keep_releases = 3. 2.0.0 and 3.0.0 never became current,
    // so they go first.
    for v in ["4.0.0", "5.0.0"] {
        bed.push_file(v, &bed.pack_demo_with(v, "healthy", &base)?)?;
        bed.convoy_ok(&["deploy", "demo", v, "--env", "staging"])?;
    }
    assert_eq!(releases(host)?, "1.0.0 4.0.0 5.0.0");
    assert_eq!(
        host.exec_ok(&["ls", "/var/lib/convoy/apps/demo/backups"])?
            .lines()
            .count(),
        5
    );
    // The prune command, by hand: never the current or previous release.
    let out = host.exec_ok(&["convoy-agent", "prune", "demo", "--keep", "1"])?;
    assert!(out.contains("removed 1 release(s) [1.0.0]"), "{out}");
    assert_eq!(releases(host)?, "4.0.0 5.0.0");
    let bad = host.exec(&["convoy-agent", "prune", "nosuchapp"])?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no app nosuchapp on this host"));
    Ok(())
}

/// An interrupted fetch resumes at its offset; an artifact whose bytes do
/// not match its digest is refused before anything is unpacked (the whole
/// artifact: a host stages by delta only from a manifest).
#[test]
fn transfers_resume_and_tampered_artifacts_are_refused() -> Result<()> {
    let mut bed = Testbed::boot(1)?;
    // The controller cuts the first artifact stream after its first
    // chunk; the host holds nothing yet, so it fetches the whole artifact.
    bed.kill_controller();
    bed.controller_env = vec![("FAILPOINTS".into(), "fetch-cut=1*return".into())];
    bed.start_controller()?;
    bed.wait_connected(1)?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    assert_eq!(bed.hosts[0].serving().as_deref(), Some("1.0.0"));
    bed.push_demo("2.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert_eq!(bed.hosts[0].serving().as_deref(), Some("2.0.0"));
    let log = bed.controller_log();
    let fetches: Vec<&str> = log.lines().filter(|l| l.contains("streaming artifact")).collect();
    assert!(
        fetches.iter().any(|l| l.contains("offset=262144")),
        "no resumed fetch:\n{}",
        fetches.join("\n")
    );

    // Tampered bytes in the controller's store, same size.
    let out = bed.convoy_ok(&[
        "release",
        "push",
        "demo",
        "3.0.0",
        bed.pack_demo("3.0.0", "healthy")?.to_str().unwrap(),
    ])?;
    let digest = out
        .split("sha256 ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned();
    let path = bed.artifact_path(&digest);
    let mut bytes = std::fs::read(&path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes)?;
    // Its manifest lost too: the controller makes it again from the stored
    // bytes, which fail their own check, so the host is sent the whole
    // artifact and refuses it by its digest.
    std::fs::remove_file(bed.artifact_path(&format!("{digest}.manifest")))?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains(&format!("digest mismatch: expected {digest}")),
        "{}",
        out.stderr
    );
    let host = &bed.hosts[0];
    assert_eq!(releases(host)?, "1.0.0 2.0.0", "nothing unpacked");
    assert_eq!(
        host.exec_ok(&["ls", "-A", "/var/lib/convoy/apps/demo/staging"])?.trim(),
        "",
        "staging cleaned"
    );
    assert_eq!(host.serving().as_deref(), Some("2.0.0"));

    // An artifact whose gzip trailer is wrong reaches the host anyway (as
    // one stored by a controller that did not check pushes would): its
    // digest is right, so only the host's own check of the stream's end
    // stands between it and the install path.
    bed.push_demo("5.0.0", "healthy")?;
    let mut corrupt = std::fs::read(bed.pack_demo("5.0.0", "healthy")?)?;
    let crc = corrupt.len() - 8;
    corrupt[crc] ^= 0xff;
    let digest = convoy_common::Digest::of_bytes(&corrupt);
    std::fs::write(bed.artifact_path(&digest.to_hex()), &corrupt)?;
    let db = rusqlite::Connection::open(bed.dir.path().join("controller/data/convoy.db"))?;
    let changed = db.execute(
        "UPDATE releases SET digest = ?1, size = ?2 WHERE app = 'demo' AND version = '5.0.0'",
        rusqlite::params![digest.to_hex(), corrupt.len() as i64],
    )?;
    assert_eq!(changed, 1);
    let out = bed.convoy(&["deploy", "demo", "5.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "refused before anything changed: {out:?}");
    assert!(
        out.stderr.contains("checksum or length trailer fails"),
        "{}",
        out.stderr
    );
    assert_eq!(releases(host)?, "1.0.0 2.0.0", "nothing of 5.0.0 kept");
    assert_eq!(
        host.exec_ok(&["ls", "-A", "/var/lib/convoy/apps/demo/staging"])?.trim(),
        "",
        "staging cleaned"
    );
    assert_eq!(host.serving().as_deref(), Some("2.0.0"));
    Ok(())
}

/// Incompressible bytes, so the artifact stays large.
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9E3779B97F4A7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A full disk while staging fails cleanly and leaves the current release
/// alone; an app locked by another process is refused as busy.
#[test]
fn disk_full_while_staging_and_busy_lock() -> Result<()> {
    let bed = Testbed::boot(1)?;
    let host = &bed.hosts[0];
    // The app's state on a small tmpfs inside the host.
    host.exec_ok(&[
        "sh",
        "-c",
        "mkdir -p /var/lib/convoy/apps/demo && mount -t tmpfs -o size=9m tmpfs /var/lib/convoy/apps/demo",
    ])?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    let pad = noise(7 << 20);
    bed.push_file(
        "2.0.0",
        &bed.pack_demo_with("2.0.0", "healthy", &[("pad.bin", &pad, 0o644)])?,
    )?;
    let out = bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("No space left on device"), "{}", out.stderr);
    assert!(
        out.stderr.contains("nothing was switched; 1.0.0 still runs"),
        "{}",
        out.stderr
    );
    assert_eq!(
        host.exec_ok(&["ls", "-A", "/var/lib/convoy/apps/demo/staging"])?.trim(),
        "",
        "staging cleaned"
    );
    assert_eq!(releases(host)?, "1.0.0");
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));
    let status = bed.status()?;
    let h = Testbed::host_status(&status, "host1")?;
    assert_eq!(h["app"]["current"], "1.0.0");
    assert!(h["app"]["inflight_op"].is_null());

    // Another process holds the app's lock (as `convoy-agent prune` would).
    host.exec_ok(&[
        "sh",
        "-c",
        "flock /var/lib/convoy/apps/demo/lock sleep 30 </dev/null >/dev/null 2>&1 & echo started",
    ])?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    bed.push_demo("3.0.0", "healthy")?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr
            .contains("refused: busy: another convoy-agent process (prune) holds this app's lock"),
        "{}",
        out.stderr
    );
    assert_eq!(host.serving().as_deref(), Some("1.0.0"));
    host.exec_ok(&["sh", "-c", "pkill -f 'sleep 30' || kill $(pidof sleep)"])
        .ok();
    Ok(())
}

/// Directory mode: the install path stays a real directory, swapped with
/// renameat2(RENAME_EXCHANGE); a failed release and an agent killed between
/// the exchange and the rename that follows both end on a whole release.
#[test]
fn exchange_mode_switches_a_real_directory() -> Result<()> {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/demo.toml"))?
        .replace("units = [", "switch = \"exchange\"\nunits = [");
    let bed = Testbed::boot_spec(1, |_| "staging".into(), &spec)?;
    let host = &bed.hosts[0];
    let kind = |h: &Host| {
        h.exec_ok(&["stat", "-c", "%F", "/opt/demo"])
            .map(|s| s.trim().to_owned())
    };
    for v in ["1.0.0", "2.0.0"] {
        bed.push_demo(v, "healthy")?;
        bed.convoy_ok(&["deploy", "demo", v, "--env", "staging"])?;
        assert_eq!(host.serving().as_deref(), Some(v));
        assert_eq!(kind(host)?, "directory");
        assert_eq!(host.exec_ok(&["cat", "/opt/demo/.convoy-release"])?.trim(), v);
    }
    // The live tree is at the install path; the others under releases/.
    assert_eq!(releases(host)?, "1.0.0");

    bed.push_demo("3.0.0", "unhealthy")?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("restored 2.0.0"), "{}", out.stderr);
    assert_eq!(kind(host)?, "directory");
    assert_eq!(host.serving().as_deref(), Some("2.0.0"));
    assert_eq!(releases(host)?, "1.0.0 3.0.0");

    // Killed right after the exchange: releases/4.0.0 briefly holds 2.0.0's
    // tree; recovery renames it back and restores 2.0.0.
    host.set_failpoint(Some("exchange-between-renames"))?;
    bed.wait_host_connected("host1")?;
    bed.push_demo("4.0.0", "healthy")?;
    let out = bed.convoy(&["deploy", "demo", "4.0.0", "--env", "staging"])?;
    assert!(host.failpoint_fired("exchange-between-renames"));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("agent restarted during the activation of 4.0.0"),
        "{}",
        out.stderr
    );
    assert_eq!(host.serving().as_deref(), Some("2.0.0"));
    assert_eq!(host.exec_ok(&["cat", "/opt/demo/.convoy-release"])?.trim(), "2.0.0");
    assert_eq!(releases(host)?, "1.0.0 3.0.0 4.0.0");
    for v in ["1.0.0", "3.0.0", "4.0.0"] {
        let marker = host.exec_ok(&[
            "cat",
            &format!("/var/lib/convoy/apps/demo/releases/{v}/.convoy-release"),
        ])?;
        assert_eq!(marker.trim(), v, "every tree under its own name");
    }
    // And the next deploy of 4.0.0 goes through.
    bed.convoy_ok(&["deploy", "demo", "4.0.0", "--env", "staging"])?;
    assert_eq!(host.serving().as_deref(), Some("4.0.0"));
    Ok(())
}
