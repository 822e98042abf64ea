//! Several controllers on one PostgreSQL, one fleet: a rollout driven by
//! one controller while the hosts' sessions are held by others, and taken
//! over when its controller dies.

use std::time::{Duration, Instant};

use anyhow::Result;
use convoy_tests::testbed::{canary_deploy, line_feed, rollout_id, wait_line};
use convoy_tests::Testbed;

/// host_sessions as (controller, connected hosts).
fn spread(bed: &Testbed) -> Result<Vec<(String, usize)>> {
    let pg = bed.postgres.as_ref().expect("on PostgreSQL");
    let out = pg.psql(
        "convoy",
        "SELECT controller, count(*) FROM host_sessions WHERE connected = 1 GROUP BY controller ORDER BY controller",
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(c, n)| (c.to_owned(), n.trim().parse().unwrap_or(0)))
        .collect())
}

fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !f()? {
        anyhow::ensure!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Waits, asking through the CLI's list of controllers, until rollout
/// `id` is no longer running; its state then.
fn end_state(bed: &Testbed, id: &str) -> Result<String> {
    let mut state = String::new();
    eventually("the rollout finishes", Duration::from_secs(180), || {
        let h = bed.history(&["--rollout", id])?;
        state = h["rollouts"][0]["state"].as_str().unwrap_or("").to_owned();
        Ok(state != "running")
    })?;
    Ok(state)
}

/// Every host's agent switched 1.0.0 to 2.0.0 exactly once.
fn activated_once(bed: &Testbed) -> Result<()> {
    for h in &bed.hosts {
        let journal = h.exec_ok(&["journalctl", "--no-pager", "-u", "convoy-agent"])?;
        assert_eq!(journal.matches("1.0.0 -> 2.0.0").count(), 1, "{}:\n{journal}", h.name);
    }
    Ok(())
}

#[test]
fn the_controller_driving_a_rollout_is_killed_and_another_finishes_it() -> Result<()> {
    let mut bed = Testbed::boot_cluster(6, 3)?;
    // The agents spread over the three controllers.
    let spread_ok = eventually("six sessions over three controllers", Duration::from_secs(30), || {
        let s = spread(&bed)?;
        Ok(s.len() == 3 && s.iter().map(|(_, n)| n).sum::<usize>() == 6)
    });
    if let Err(e) = spread_ok {
        for c in 0..3 {
            eprintln!(
                "── c{} ──\n{}",
                c + 1,
                bed.controller_log_at(c)
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        anyhow::bail!("{e}: {:?}", spread(&bed)?);
    }
    bed.push_demo("1.0.0", "healthy")?;
    // A rolling deploy started on c1 alone, one host at a time, while
    // c2 and c3 hold sessions of the hosts too (spread above), succeeds.
    let c1 = bed.controller_urls()[0].clone();
    let out = bed
        .convoy_spawn_at(&c1, &["deploy", "demo", "1.0.0", "--env", "staging"])?
        .wait_with_output()?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(bed.serving(), ["1.0.0"; 6]);
    bed.push_demo("2.0.0", "healthy")?;

    // 2.0.0 the same way; c1 is killed after its first batch.
    let mut child = bed.convoy_spawn_at(&c1, &["deploy", "demo", "2.0.0", "--env", "staging"])?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "-- batch 1/", &mut seen)?;
    let first = wait_line(&lines, "=> succeeded", &mut seen)?;
    let first_host = first.split(['[', ']']).nth(1).expect("a host in the line").to_owned();
    let i = bed
        .hosts
        .iter()
        .position(|h| h.name == first_host)
        .expect("a host of the bed");
    let invocation = bed.hosts[i].unit_property("demo.service", "InvocationID")?;

    // c1 dies (SIGKILL) after its first batch.
    bed.kill_controller_at(0);
    let killed = Instant::now();
    let _ = child.wait();
    eventually(
        "another controller takes the rollout over",
        Duration::from_secs(30),
        || Ok((1..3).any(|c| bed.controller_log_at(c).contains("resuming a rollout"))),
    )?;
    let takeover = killed.elapsed();
    let taker = (1..3)
        .find(|c| bed.controller_log_at(*c).contains("resuming a rollout"))
        .expect("a controller took it");
    let line = bed
        .controller_log_at(taker)
        .lines()
        .find(|l| l.contains("resuming a rollout"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("epoch=2"),
        "the takeover raised the lease's epoch: {line}"
    );
    // The bound is the lease (10 s) and one lease round (2 s); measured
    // here and reported, not asserted (a loaded machine stretches rounds).
    eprintln!("takeover {:.1}s after the owner was killed", takeover.as_secs_f64());

    // The CLI, with every controller in its list, keeps working.
    assert_eq!(end_state(&bed, &id)?, "succeeded");
    assert_eq!(bed.serving(), ["2.0.0"; 6], "no host skipped");
    activated_once(&bed)?;
    assert_eq!(
        bed.hosts[i].unit_property("demo.service", "InvocationID")?,
        invocation,
        "{first_host} was not restarted again"
    );
    // c1's agents reconnected elsewhere.
    eventually("every host connected to c2 or c3", Duration::from_secs(30), || {
        let s = spread(&bed)?;
        Ok(s.iter().all(|(c, _)| c != "c1") && s.iter().map(|(_, n)| n).sum::<usize>() == 6)
    })?;
    // `convoy controllers` tells it: c1 down, the sessions on c2 and c3.
    eventually("convoy controllers shows c1 down", Duration::from_secs(30), || {
        let out = bed.convoy(&["controllers", "--output", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
        let cs = v["controllers"].as_array().cloned().unwrap_or_default();
        let c1_down = cs.iter().any(|c| c["name"] == "c1" && c["up"] == false);
        let sessions: i64 = cs
            .iter()
            .filter(|c| c["up"] == true)
            .filter_map(|c| c["sessions"].as_i64())
            .sum();
        Ok(c1_down && sessions == 6 && v["database"] == "postgres")
    })?;
    // The history is complete: one activation result per host.
    assert_eq!(bed.recorded_activations(&id)?, 6);
    let pg = bed.postgres.as_ref().unwrap();

    // A revocation through one controller ends the host's session on the
    // controller that holds it.
    let pki = bed.dir.path().join("pki");
    bed.convoy_ok(&[
        "pki",
        "issue",
        "operator",
        "root",
        "--role",
        "admin",
        "--dir",
        pki.to_str().unwrap(),
    ])?;
    let held = pg.psql(
        "convoy",
        "SELECT host, controller FROM host_sessions WHERE connected = 1 ORDER BY host LIMIT 1",
    )?;
    let (host, holder) = held.trim().split_once('|').expect("a connected host");
    let other = if holder == "c2" { 2 } else { 1 };
    let url = bed.controller_urls()[other].clone();
    let out = bed.convoy_at_as(
        &url,
        &pki.join("root.pem"),
        &pki.join("root.key"),
        &["hosts", "revoke", host],
    )?;
    assert_eq!(out.code, 0, "{out:?}");
    let revoked = Instant::now();
    let holder_at = if holder == "c2" { 1 } else { 2 };
    eventually("the holder ends the revoked session", Duration::from_secs(10), || {
        Ok(bed
            .controller_log_at(holder_at)
            .contains("session of a revoked certificate ended"))
    })?;
    eprintln!(
        "revocation took effect on the holder {:.1}s after",
        revoked.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What rollout `id` has recorded: (events, host results).
fn recorded_rows(bed: &Testbed, id: &str) -> Result<String> {
    bed.postgres.as_ref().expect("on PostgreSQL").psql(
        "convoy",
        &format!(
            "SELECT (SELECT count(*) FROM events WHERE rollout_id = '{id}'), \
             (SELECT count(*) FROM rollout_hosts WHERE rollout_id = '{id}')"
        ),
    )
}

/// c1, stopped, runs again and learns that another controller took its
/// rollout over.
fn c1_runs_again_and_lets_go(bed: &mut Testbed) -> Result<()> {
    bed.signal_controller_at(0, "CONT")?;
    eventually("c1 learns it lost the rollout", Duration::from_secs(30), || {
        Ok(bed
            .controller_log_at(0)
            .contains("another controller took this rollout over"))
    })
}

/// A controller stopped in the middle of a write for its rollout holds
/// the lease row's lock (`FOR SHARE`). The database ends that transaction
/// after 5 s, so another controller takes the rollout over within the
/// lease bound all the same; when the stopped one runs again, its write is
/// refused and it drives the rollout no more. (Without the bound the
/// takeover waited for as long as the controller was stopped.)
#[test]
fn a_controller_stopped_inside_a_write_does_not_hold_up_the_takeover() -> Result<()> {
    let mut bed = Testbed::boot_cluster(3, 2)?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.deploy_everywhere("1.0.0")?;
    bed.push_demo("2.0.0", "healthy")?;
    // c1 again, now stopping itself in its first write for a rollout.
    bed.controller_env
        .push(("FAILPOINTS".into(), "stop-in-write=1*return".into()));
    bed.reconfigure_controller_at(0, "")?;
    let c1 = bed.controller_urls()[0].clone();
    let mut child = bed.convoy_spawn_at(&c1, &["deploy", "demo", "2.0.0", "--env", "staging"])?;
    eventually("c1 stops inside a write", Duration::from_secs(60), || {
        Ok(bed.controller_is_stopped(0))
    })?;
    let stopped = Instant::now();
    let pg = bed.postgres.as_ref().expect("on PostgreSQL");
    let id = pg.psql("convoy", "SELECT id FROM rollouts WHERE version = '2.0.0'")?;
    let id = id.trim().to_owned();
    let open = pg.psql(
        "convoy",
        "SELECT count(DISTINCT pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE a.state = 'idle in transaction' AND l.relation = 'leases'::regclass",
    )?;
    // Its other writes in flight stopped with it: one transaction or more.
    assert!(open.trim().parse::<u32>()? >= 1, "c1's transaction holds the lease row");

    eventually("c2 takes the rollout over", Duration::from_secs(30), || {
        Ok(bed.controller_log_at(1).contains("resuming a rollout"))
    })?;
    eprintln!(
        "taken over {:.1}s after c1 stopped inside a write",
        stopped.elapsed().as_secs_f64()
    );
    assert_eq!(end_state(&bed, &id)?, "succeeded", "c2 finished it");
    assert_eq!(bed.serving(), ["2.0.0"; 3]);
    let rows_before = recorded_rows(&bed, &id)?;

    c1_runs_again_and_lets_go(&mut bed)?;
    activated_once(&bed)?;
    assert_eq!(recorded_rows(&bed, &id)?, rows_before, "c1 recorded nothing more");
    let h = bed.history(&["--rollout", &id])?;
    assert_eq!(h["rollouts"][0]["state"], "succeeded");
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

/// A controller paused past its lease (a frozen VM, a long GC pause)
/// loses its rollout to another, which finishes it. When it runs again it
/// acts on the rollout no more: it sends no command and records nothing,
/// however far its own timers ran while it was stopped.
#[test]
fn a_controller_paused_past_its_lease_acts_on_the_rollout_no_more() -> Result<()> {
    let mut bed = Testbed::boot_cluster(4, 2)?;
    eventually("four sessions over two controllers", Duration::from_secs(30), || {
        let s = spread(&bed)?;
        Ok(s.len() == 2 && s.iter().map(|(_, n)| n).sum::<usize>() == 4)
    })?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.deploy_everywhere("1.0.0")?;
    bed.push_demo("2.0.0", "healthy")?;

    // A canary on c1: one host, then a bake that c1 is stopped in.
    let c1 = bed.controller_urls()[0].clone();
    let mut child = bed.convoy_spawn_at(&c1, &canary_deploy("2.0.0", "1,100%", "20s"))?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    // The canary's host, not a pre-staging result, which reads alike.
    wait_line(&lines, "-- batch 1/", &mut seen)?;
    wait_line(&lines, "=> succeeded", &mut seen)?;
    bed.signal_controller_at(0, "STOP")?;
    let stopped = Instant::now();

    eventually("c2 takes the rollout over", Duration::from_secs(30), || {
        Ok(bed.controller_log_at(1).contains("resuming a rollout"))
    })
    .inspect_err(|_| {
        for c in 0..2 {
            eprintln!("── c{} ──\n{}", c + 1, bed.controller_log_at(c));
        }
        eprintln!("── deploy ──\n{}", seen.join("\n"));
    })?;
    eprintln!("taken over {:.1}s after c1 stopped", stopped.elapsed().as_secs_f64());
    // c1's kernel still completes TCP: the CLI gives up on its silence
    // within the handshake bound and names it (with the list, it goes on
    // to c2: every `history` below may try c1 first).
    let asked = Instant::now();
    let out = bed.convoy_spawn_at(&c1, &["hosts"])?.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "unreachable: {stderr}");
    assert!(stderr.contains("no answer within 10s"), "{stderr}");
    eprintln!(
        "the CLI gave up on the stopped c1 after {:.1}s",
        asked.elapsed().as_secs_f64()
    );
    assert_eq!(end_state(&bed, &id)?, "succeeded", "c2 finished it");
    assert_eq!(bed.serving(), ["2.0.0"; 4]);
    let invocations = |bed: &Testbed| -> Result<Vec<String>> {
        bed.hosts
            .iter()
            .map(|h| h.unit_property("demo.service", "InvocationID"))
            .collect()
    };
    let before = invocations(&bed)?;
    // c1's bake ended while it was stopped: running again, its rollout
    // would go on to the next stage at once, were it not fenced.
    assert!(stopped.elapsed() > Duration::from_secs(20), "c1's bake is over");
    let rows_before = recorded_rows(&bed, &id)?;

    c1_runs_again_and_lets_go(&mut bed)?;
    // The deploy's CLI, following c1, saw its connection go silent and
    // said so (exit 5) instead of waiting forever.
    let mut ended = None;
    let waited = eventually("the deploy's CLI ends", Duration::from_secs(30), || {
        ended = child.try_wait()?;
        Ok(ended.is_some())
    });
    if waited.is_err() {
        let _ = child.kill();
    }
    waited?;
    assert_eq!(ended.and_then(|s| s.code()), Some(5), "{}", seen.join("\n"));
    // Every host was activated once, by whichever controller drove it.
    activated_once(&bed)?;
    assert_eq!(invocations(&bed)?, before, "no host restarted after c1 came back");
    assert_eq!(bed.recorded_activations(&id)?, 4);
    let h = bed.history(&["--rollout", &id])?;
    assert_eq!(h["rollouts"][0]["state"], "succeeded", "c1 recorded no end of its own");
    assert_eq!(
        recorded_rows(&bed, &id)?,
        rows_before,
        "c1 recorded no event and no result"
    );
    let log = bed.controller_log_at(0);
    assert!(
        !log.contains(&format!("rollout finished rollout={id}")),
        "c1 never ended the rollout:\n{log}"
    );
    // The hosts c1 held before it stopped are all connected again.
    eventually("every host connected", Duration::from_secs(40), || {
        Ok(spread(&bed)?.iter().map(|(_, n)| n).sum::<usize>() == 4)
    })?;
    Ok(())
}

/// The database restarts in the middle of a rollout: the controller keeps
/// its sessions, the rollout waits at its next write and goes on when the
/// database is back, and nothing it did goes unrecorded.
#[test]
fn postgres_restarted_mid_rollout_the_rollout_waits_and_goes_on() -> Result<()> {
    let mut bed = Testbed::boot_on_postgres(3)?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.deploy_everywhere("1.0.0")?;
    bed.push_demo("2.0.0", "healthy")?;
    let mut child = bed.convoy_spawn(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "-- batch 1/", &mut seen)?;
    wait_line(&lines, "=> succeeded", &mut seen)?;
    // Down for five seconds (less than a lease), then back.
    bed.postgres.as_mut().unwrap().stop()?;
    std::thread::sleep(Duration::from_secs(5));
    bed.postgres.as_mut().unwrap().start_again()?;
    let status = child.wait()?;
    assert_eq!(status.code(), Some(0), "{seen:?}");
    let h = bed.history(&["--rollout", &id])?;
    assert_eq!(h["rollouts"][0]["state"], "succeeded");
    assert_eq!(bed.serving(), ["2.0.0"; 3]);
    assert_eq!(bed.recorded_activations(&id)?, 3, "every host's result recorded");
    let log = bed.controller_log();
    assert!(
        log.contains("the rollout waits for the database"),
        "the outage was met:\n{log}"
    );
    assert!(log.contains("database reachable again"), "{log}");
    Ok(())
}

/// Enrollment and renewal through any controller: a token made through
/// c1 enrolls a host at c2, and c2 renews its certificate (every
/// controller has the same CA key); c1 sees the host, and refuses the
/// spent token.
#[test]
fn a_token_made_through_one_controller_enrolls_a_host_through_another() -> Result<()> {
    let mut bed = Testbed::boot_cluster(2, 2)?;
    let pki = bed.dir.path().join("pki");
    // Certificates signed by a controller live 30 s, so renewal is seen.
    let lines = format!("ca_key = \"{}/ca.key\"\nagent_cert_validity = \"30s\"", pki.display());
    bed.reconfigure_controller(&lines)?;
    bed.reconfigure_controller_at(1, &lines)?;
    let pki_s = pki.to_str().unwrap();
    bed.convoy_ok(&["pki", "issue", "operator", "root", "--role", "admin", "--dir", pki_s])?;
    let (c1, c2) = (bed.controller_urls()[0].clone(), bed.controller_urls()[1].clone());
    let as_root = |url: &str, args: &[&str]| bed.convoy_at_as(url, &pki.join("root.pem"), &pki.join("root.key"), args);
    let out = as_root(
        &c1,
        &[
            "enroll",
            "create-token",
            "--labels",
            "env=staging",
            "--ttl",
            "10m",
            "--output",
            "json",
        ],
    )?;
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
    let (token, fingerprint) = (
        v["token"].as_str().unwrap_or(""),
        v["ca_fingerprint"].as_str().unwrap_or(""),
    );

    bed.enroll_config(1, "web9", token, fingerprint, 1)?;
    let connected_at = |url: &str| -> Result<bool> {
        let out = bed
            .convoy_spawn_at(url, &["hosts", "--output", "json"])?
            .wait_with_output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok(v["hosts"]
            .as_array()
            .is_some_and(|hs| hs.iter().any(|h| h["host"] == "web9" && h["connected"] == true)))
    };
    eventually("web9 enrolled at c2 and seen by c1", Duration::from_secs(60), || {
        Ok(connected_at(&c2)? && connected_at(&c1)?)
    })?;
    assert!(bed.controller_log_at(1).contains("host enrolled"), "c2 enrolled it");
    assert!(!bed.controller_log_at(0).contains("host enrolled"), "c1 did not");

    // c2 renews the 30 s certificate before it expires.
    let host = &bed.hosts[1];
    let first = host.exec_ok(&["cat", "/var/lib/convoy-tls/agent.pem"])?;
    eventually("the certificate renewed", Duration::from_secs(40), || {
        Ok(host.exec_ok(&["cat", "/var/lib/convoy-tls/agent.pem"])? != first)
    })?;
    assert!(bed.controller_log_at(1).contains("certificate renewed"));
    assert!(connected_at(&c1)?, "still connected after its renewal");

    // The token was spent through c2: c1 refuses it.
    bed.enroll_config(0, "web10", token, fingerprint, 0)?;
    eventually("c1 refuses the spent token", Duration::from_secs(60), || {
        Ok(bed
            .controller_log_at(0)
            .lines()
            .any(|l| l.contains("enrollment refused") && l.contains("already used (by web9")))
    })?;
    assert!(
        !bed.controller_log_at(0).contains("host enrolled"),
        "web10 was not enrolled"
    );
    Ok(())
}

/// Operators may use any controller: a canary driven by c1 waits for
/// promotion, and c2 passes on a refused approval (with its exit code) and
/// the promotion, after which c1 finishes the rollout; `watch` through c2
/// names the controller to watch it through.
#[test]
fn an_operator_controls_a_rollout_through_a_controller_that_does_not_drive_it() -> Result<()> {
    let bed = Testbed::boot_cluster(2, 2)?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.deploy_everywhere("1.0.0")?;
    bed.push_demo("2.0.0", "healthy")?;
    let (c1, c2) = (bed.controller_urls()[0].clone(), bed.controller_urls()[1].clone());
    let mut args = canary_deploy("2.0.0", "1,100%", "0s");
    args.extend(["--promote", "manual"]);
    let mut child = bed.convoy_spawn_at(&c1, &args)?;
    let lines = line_feed(&mut child);
    let mut seen = Vec::new();
    let id = rollout_id(&wait_line(&lines, "rollout ", &mut seen)?);
    wait_line(&lines, "waiting for `convoy promote", &mut seen)?;
    let at_c2 = |args: &[&str]| -> Result<(Option<i32>, String, String)> {
        let out = bed.convoy_spawn_at(&c2, args)?.wait_with_output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    // Refused by c1's rollout, as c1 would refuse it: exit 4, its words.
    let (code, _, stderr) = at_c2(&["approve", &id])?;
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("approval"), "{stderr}");
    let (code, _, stderr) = at_c2(&["watch", &id])?;
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!("rollout {id} is driven by controller c1")),
        "{stderr}"
    );
    // Control: before promotion only the canary moved.
    assert_eq!(bed.serving().iter().filter(|v| *v == "2.0.0").count(), 1);
    let (code, stdout, stderr) = at_c2(&["promote", &id])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("stage 1 promoted"), "{stdout}");
    let status = child.wait()?;
    seen.extend(lines.try_iter());
    assert!(status.success(), "{}", seen.join("\n"));
    assert_eq!(bed.serving(), ["2.0.0"; 2]);
    assert!(bed
        .controller_log_at(0)
        .contains("control action relayed from another controller"));
    Ok(())
}
