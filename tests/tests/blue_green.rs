//! Blue-green on booted hosts behind a real HAProxy under steady load:
//! each host runs the demo app as two slots (`demo@blue`, `demo@green`,
//! ports 8081 and 8082, HAProxy servers `HOST-blue` and `HOST-green`).
//! A deploy starts the new release in the idle slot, checks it on its own
//! port and switches traffic to it; the old slot stays warm, and a
//! rollback is a traffic switch with no restart. A release that fails its
//! preview never gets a request, and the agent killed at random instants
//! always leaves exactly one live slot serving a whole release.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convoy_tests::haproxy::Haproxy;
use convoy_tests::load::{Answer, Load};
use convoy_tests::{Host, Testbed};

const BLUE: u16 = 8081;
const GREEN: u16 = 8082;
/// Requests per second through HAProxy, and the longest a load runs.
const RATE: u32 = 100;
const LONGEST: Duration = Duration::from_secs(180);
/// 50 ms per request, half a second to start.
const SERVICE: &str = "latency = \"50ms\"\nstart_delay = \"500ms\"";

fn spec(api: &str, keep_warm: &str) -> String {
    format!(
        r#"name = "demo"
install_path = "/opt/demo"
units = ["demo@.service"]
environments = ["development", "staging", "production"]

[health]
min_healthy_time = "1s"
healthy_deadline = "8s"

[[health.checks]]
type = "systemd"
unit = "demo@{{{{slot}}}}.service"
interval = "200ms"

[[health.checks]]
type = "http"
url = "http://127.0.0.1:{{{{port}}}}/health"
expect_status = 200
interval = "200ms"
timeout = "1s"

[blue_green]
blue_port = {BLUE}
green_port = {GREEN}
keep_warm = "{keep_warm}"

[traffic]
kind = "haproxy"
runtime_api = "{api}"
backend = "web"
server = "{{{{host}}}}-{{{{slot}}}}"
drain_timeout = "10s"
"#
    )
}

/// Each host's address (what a slot answers with) → its convoy name.
fn hostnames(bed: &Testbed) -> Result<BTreeMap<String, String>> {
    Ok(bed.hosts.iter().map(|h| (h.ip.to_string(), h.name.clone())).collect())
}

/// An answer's (host, slot, version), from `demo VERSION ADDRESS/SLOT`.
fn parse(a: &Answer, names: &BTreeMap<String, String>) -> Option<(String, String, String)> {
    let mut w = a.body.split_whitespace().skip(1);
    let version = w.next()?.to_owned();
    let (hostname, slot) = w.next()?.split_once('/')?;
    Some((names.get(hostname)?.clone(), slot.to_owned(), version))
}

/// For each host: once one answer came from `new`, no request sent after
/// it was answered by another release (no mix after the switch). Returns
/// the answers per host and release.
fn check_no_mix(answers: &[Answer], names: &BTreeMap<String, String>, new: &str) -> Result<BTreeMap<String, usize>> {
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    let mut first_new: BTreeMap<String, Instant> = BTreeMap::new();
    let parsed: Vec<_> = answers
        .iter()
        .map(|a| Ok((a, parse(a, names).with_context(|| format!("answer {:?}", a.body))?)))
        .collect::<Result<_>>()?;
    for (a, (host, _, version)) in &parsed {
        *per.entry(format!("{host} {version}")).or_default() += 1;
        if version == new {
            let e = first_new.entry(host.clone()).or_insert(a.done);
            *e = (*e).min(a.done);
        }
    }
    for (a, (host, slot, version)) in &parsed {
        if let Some(first) = first_new.get(host) {
            if version != new && a.sent > *first {
                let t0 = parsed.iter().map(|(a, _)| a.sent).min().expect("answers");
                let ms = |t: Instant| t.duration_since(t0).as_millis();
                let mut around: Vec<String> = parsed
                    .iter()
                    .filter(|(_, p)| p.0 == *host)
                    .map(|(a, p)| format!("sent {} done {} {} {}", ms(a.sent), ms(a.done), p.1, p.2))
                    .collect();
                around.sort();
                bail!(
                    "{host} answered {version} from slot {slot} (sent {}) after it had answered {new} (at {}):\n{}",
                    ms(a.sent),
                    ms(*first),
                    around.join("\n")
                );
            }
        }
    }
    Ok(per)
}

fn slots_of(bed: &Testbed, host: &str) -> Result<Vec<(String, String, String)>> {
    let status = bed.status()?;
    let h = Testbed::host_status(&status, host)?;
    Ok(h["app"]["slots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            (
                s["slot"].as_str().unwrap_or("").to_owned(),
                s["version"].as_str().unwrap_or("").to_owned(),
                s["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect())
}

fn status_of(haproxy: &Haproxy, server: &str) -> Result<String> {
    Ok(haproxy
        .statuses()?
        .into_iter()
        .find(|(s, _)| s == server)
        .map(|(_, st)| st)
        .unwrap_or_default())
}

/// Waits until HAProxy sends each host's traffic to `live` only: that
/// slot's server UP (ready and passing its checks), the other one not.
fn wait_traffic_on(haproxy: &Haproxy, bed: &Testbed, live: &str) -> Result<()> {
    let other = if live == "blue" { "green" } else { "blue" };
    convoy_nspawn::wait_for(
        &format!("haproxy to send traffic to the {live} slots only"),
        Duration::from_secs(30),
        || {
            bed.hosts
                .iter()
                .all(|h| {
                    status_of(haproxy, &format!("{}-{live}", h.name)).is_ok_and(|s| s == "UP")
                        && status_of(haproxy, &format!("{}-{other}", h.name)).is_ok_and(|s| s != "UP")
                })
                .then_some(())
        },
    )
}

fn invocation(h: &Host, slot: &str) -> Result<String> {
    h.unit_property(&format!("demo@{slot}.service"), "InvocationID")
}

fn failed(load: &Load) -> u64 {
    load.counts.errors.load(Ordering::Relaxed) + load.counts.failed.load(Ordering::Relaxed)
}

#[test]
fn blue_green_switches_traffic_without_a_failed_request_and_rolls_back_without_a_restart() -> Result<()> {
    let bed = Testbed::boot(3)?;
    let haproxy = bed.start_haproxy_slots(BLUE, GREEN)?;
    let api = haproxy.api.to_string();
    let names = hostnames(&bed)?;
    bed.set_spec(&spec(&api, "10m"))?;
    bed.push_demo_release("1.0.0", SERVICE)?;
    let out = bed.deploy_everywhere("1.0.0")?;
    assert!(out.contains("slot blue"), "{out}");
    wait_traffic_on(&haproxy, &bed, "blue")?;
    for h in &bed.hosts {
        assert_eq!(
            slots_of(&bed, &h.name)?,
            vec![("blue".into(), "1.0.0".into(), "live".into())]
        );
    }

    // ── a blue-green deploy under load ──
    bed.push_demo_release("2.0.0", SERVICE)?;
    let started = Instant::now();
    let mut load = Load::start(&[haproxy.frontend], "/", RATE, LONGEST);
    let out = bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    load.stop();
    let text = format!("{}{}", out.stdout, out.stderr);
    let (ok, bad) = (load.counts.ok.load(Ordering::Relaxed), failed(&load));
    println!(
        "blue-green deploy: {ok} requests served, {bad} failed, {RATE}/s for {:.1}s\n{text}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(out.code, 0, "{text}");
    assert_eq!(bad, 0, "{text}\n{}", haproxy.log());
    let per = check_no_mix(&load.counts.answers.lock().unwrap(), &names, "2.0.0")?;
    println!("answers per host and release: {per:?}");
    for h in &bed.hosts {
        assert!(per.contains_key(&format!("{} 2.0.0", h.name)), "{per:?}");
        assert!(
            text.contains(&format!(
                "[{}] traffic  succeeded traffic switched in haproxy web: {}-green ready",
                h.name, h.name
            )),
            "{text}"
        );
    }
    wait_traffic_on(&haproxy, &bed, "green")?;
    // The old slot keeps running during keep_warm.
    let mut warm = Vec::new();
    for h in &bed.hosts {
        let slots = slots_of(&bed, &h.name)?;
        assert!(
            slots.contains(&("green".into(), "2.0.0".into(), "live".into())),
            "{slots:?}"
        );
        assert!(
            slots.contains(&("blue".into(), "1.0.0".into(), "warm".into())),
            "{slots:?}"
        );
        assert_eq!(h.unit_property("demo@blue.service", "ActiveState")?, "active");
        warm.push(invocation(h, "blue")?);
    }
    let table = bed.convoy_ok(&["status", "demo"])?;
    assert!(table.contains("SLOTS"), "{table}");
    assert!(
        table.contains("green 2.0.0 live, blue 1.0.0 warm") || table.contains("blue 1.0.0 warm"),
        "{table}"
    );

    // ── rollback within keep_warm: a traffic switch only ──
    let mut load = Load::start(&[haproxy.frontend], "/", RATE, LONGEST);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let watcher = {
        let hosts: Vec<String> = bed.hosts.iter().map(|h| h.name.clone()).collect();
        let api = haproxy.api;
        std::thread::spawn(move || -> Option<f64> {
            // Polls HAProxy until every host's blue slot takes the traffic.
            while started.elapsed() < Duration::from_secs(30) {
                if let Ok(rows) = convoy_tests::haproxy::statuses_at(api) {
                    let all = hosts.iter().all(|h| {
                        rows.iter().any(|(s, st)| *s == format!("{h}-blue") && st == "UP")
                            && rows.iter().any(|(s, st)| *s == format!("{h}-green") && st != "UP")
                    });
                    if all {
                        return Some(started.elapsed().as_secs_f64());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        })
    };
    let out = bed.convoy(&["rollback", "demo", "--env", "staging"])?;
    let command_secs = started.elapsed().as_secs_f64();
    let back = watcher
        .join()
        .expect("watcher")
        .context("traffic never went back to blue")?;
    std::thread::sleep(Duration::from_millis(500));
    load.stop();
    let text = format!("{}{}", out.stdout, out.stderr);
    println!(
        "rollback: traffic back on 1.0.0 everywhere {back:.3}s after the command started (command took {command_secs:.3}s); {} served, {} failed\n{text}",
        load.counts.ok.load(Ordering::Relaxed),
        failed(&load)
    );
    assert_eq!(out.code, 0, "{text}");
    assert_eq!(failed(&load), 0, "{text}");
    check_no_mix(&load.counts.answers.lock().unwrap(), &names, "1.0.0")?;
    for (h, inv) in bed.hosts.iter().zip(&warm) {
        assert_eq!(
            &invocation(h, "blue")?,
            inv,
            "{}: the warm slot was not restarted",
            h.name
        );
        let slots = slots_of(&bed, &h.name)?;
        assert!(
            slots.contains(&("blue".into(), "1.0.0".into(), "live".into())),
            "{slots:?}"
        );
        assert!(
            slots.contains(&("green".into(), "2.0.0".into(), "warm".into())),
            "{slots:?}"
        );
    }
    assert!(!text.contains("stage "), "no download on a rollback: {text}");

    // ── a release that fails its preview never takes traffic ──
    let bad_file = bed.pack_demo("3.0.0", "unhealthy")?;
    bed.push_file("3.0.0", &bad_file)?;
    let live: Vec<String> = bed.hosts.iter().map(|h| invocation(h, "blue")).collect::<Result<_>>()?;
    let mut load = Load::start(&[haproxy.frontend], "/", RATE, LONGEST);
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    load.stop();
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, 1, "{text}");
    assert!(
        text.contains("preview of slot green failed its health checks"),
        "{text}"
    );
    assert_eq!(failed(&load), 0, "{text}");
    let answers = load.counts.answers.lock().unwrap().clone();
    assert!(!answers.is_empty());
    assert!(
        answers.iter().all(|a| a.body.starts_with("demo 1.0.0 ")),
        "only the live release answered"
    );
    for (h, inv) in bed.hosts.iter().zip(&live) {
        assert_eq!(&invocation(h, "blue")?, inv, "{}: the live slot never stopped", h.name);
        assert_eq!(
            slots_of(&bed, &h.name)?[0],
            ("blue".into(), "1.0.0".into(), "live".into())
        );
    }
    wait_traffic_on(&haproxy, &bed, "blue")?;

    // ── the runtime API does not answer: nothing moves ──
    bed.set_spec(&spec("127.0.0.1:1", "10m"))?;
    bed.push_demo_release("4.0.0", SERVICE)?;
    let out = bed.convoy(&["deploy", "demo", "4.0.0", "--env", "staging"])?;
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, 4, "{text}");
    assert!(text.contains("haproxy runtime API at 127.0.0.1:1"), "{text}");
    for h in &bed.hosts {
        assert_eq!(
            slots_of(&bed, &h.name)?[0],
            ("blue".into(), "1.0.0".into(), "live".into())
        );
    }

    // ── keep_warm ends: the old slot stops ──
    bed.set_spec(&spec(&api, "2s"))?;
    let out = bed.convoy(&[
        "deploy",
        "demo",
        "4.0.0",
        "--env",
        "staging",
        "--strategy",
        "blue-green",
    ])?;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    wait_traffic_on(&haproxy, &bed, "green")?;
    for h in &bed.hosts {
        convoy_nspawn::wait_for(
            &format!("{}'s blue slot to stop after keep_warm", h.name),
            Duration::from_secs(20),
            || {
                let stopped = h.unit_property("demo@blue.service", "ActiveState").ok()? == "inactive";
                let said = slots_of(&bed, &h.name)
                    .ok()?
                    .contains(&("blue".into(), "1.0.0".into(), "stopped".into()));
                (stopped && said).then_some(())
            },
        )?;
    }
    // --strategy blue-green insists on slots.
    bed.set_spec(include_str!("../testbed/demo.toml"))?;
    let out = bed.convoy(&[
        "deploy",
        "demo",
        "4.0.0",
        "--env",
        "staging",
        "--strategy",
        "blue-green",
    ])?;
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("has no [blue_green]"), "{}", out.stderr);
    Ok(())
}

/// A small deterministic generator, so a failing run can be repeated.
fn delays(seed: u64, n: usize) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % 3000
        })
        .collect()
}

/// After the dust settles: the host says exactly one slot is live, HAProxy
/// sends its traffic to that slot only, and the slot serves the whole
/// release the host names.
fn check_one_live(bed: &Testbed, haproxy: &Haproxy, h: &Host) -> Result<String> {
    let start = Instant::now();
    loop {
        let status = bed.status()?;
        let st = Testbed::host_status(&status, &h.name)?;
        if st["connected"] == true && st["app"]["inflight_op"].is_null() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{} did not settle: {st}", h.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let slots = slots_of(bed, &h.name)?;
    let live: Vec<_> = slots.iter().filter(|s| s.2 == "live").collect();
    let [(slot, version, _)] = live.as_slice() else {
        bail!("{}: not exactly one live slot: {slots:?}", h.name);
    };
    let other = if slot == "blue" { "green" } else { "blue" };
    let port = if slot == "blue" { BLUE } else { GREEN };
    convoy_nspawn::wait_for(
        &format!("{} slot {slot} serving {version} and taking the traffic", h.name),
        Duration::from_secs(20),
        || {
            let serves = convoy_tests::testbed::http_get((h.ip, port).into(), "/")
                .is_some_and(|(s, b)| s == 200 && b.starts_with(&format!("demo {version} ")));
            let up = status_of(haproxy, &format!("{}-{slot}", h.name)).is_ok_and(|s| s == "UP");
            let idle = status_of(haproxy, &format!("{}-{other}", h.name)).is_ok_and(|s| s != "UP");
            (serves && up && idle).then_some(())
        },
    )
    .with_context(|| format!("status says {slots:?}; haproxy {:?}", haproxy.statuses()))?;
    let tree = h.exec_ok(&["cat", &format!("/opt/demo/{slot}/release.toml")])?;
    if !tree.contains(&format!("version = \"{version}\"")) {
        bail!("slot {slot} of {} is not a whole {version}: {tree}", h.name);
    }
    Ok(format!("{slot} {version}"))
}

#[test]
fn kill_agent_at_random_instants_during_blue_green_deploys() -> Result<()> {
    const ROUNDS: usize = 7;
    let bed = Testbed::boot(3)?;
    let haproxy = bed.start_haproxy_slots(BLUE, GREEN)?;
    bed.set_spec(&spec(&haproxy.api.to_string(), "10m"))?;
    bed.push_demo_release("1.0.0", SERVICE)?;
    bed.deploy_everywhere("1.0.0")?;
    let seed = std::env::var("CONVOY_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5107);
    println!("random kill seed {seed} (set CONVOY_KILL_SEED to repeat)");
    let mut injections = 0;
    let mut ends = Vec::new();
    for round in 0..ROUNDS {
        let version = format!("2.0.{round}");
        bed.push_demo_release(&version, SERVICE)?;
        let child = bed.convoy_spawn(&[
            "deploy",
            "demo",
            &version,
            "--env",
            "staging",
            "--strategy",
            "all-at-once",
        ])?;
        let waits = delays(seed + round as u64, bed.hosts.len());
        std::thread::scope(|s| -> Result<()> {
            let kills: Vec<_> = bed
                .hosts
                .iter()
                .zip(&waits)
                .map(|(h, ms)| {
                    s.spawn(move || {
                        std::thread::sleep(Duration::from_millis(*ms));
                        h.kill_agent()
                    })
                })
                .collect();
            for k in kills {
                k.join().expect("kill thread")?;
            }
            Ok(())
        })?;
        injections += bed.hosts.len();
        let out = child.wait_with_output()?;
        let code = out.status.code().unwrap_or(-1);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(code == 0 || code == 1, "round {round}: deploy exited {code}\n{text}");
        for h in &bed.hosts {
            let end = check_one_live(&bed, &haproxy, h).with_context(|| format!("round {round}\n{text}"))?;
            ends.push(format!(
                "round {round} {} killed after {} ms: exit {code}, live {end}",
                h.name,
                waits[bed.hosts.iter().position(|x| x.name == h.name).unwrap()]
            ));
        }
    }
    println!("{}", ends.join("\n"));
    println!("{injections} kills, every host ended with exactly one live slot");
    assert!(injections >= 20);
    Ok(())
}

/// The agent killed after it journaled a slot's readiness and before it
/// reported it: when the agent is back, the controller sends the command
/// again, the agent answers from its journal with the slots as they are,
/// and traffic switches to the ready slot. (An answer without the app's
/// state once failed such a host: "reports no slot ready".)
#[test]
fn an_agent_killed_between_journaling_and_reporting_a_ready_slot_still_switches() -> Result<()> {
    let bed = Testbed::boot(1)?;
    let haproxy = bed.start_haproxy_slots(BLUE, GREEN)?;
    bed.set_spec(&spec(&haproxy.api.to_string(), "10m"))?;
    bed.push_demo_release("1.0.0", SERVICE)?;
    bed.deploy_everywhere("1.0.0")?;
    bed.push_demo_release("2.0.0", SERVICE)?;
    let h = &bed.hosts[0];
    assert_eq!(check_one_live(&bed, &haproxy, h)?, "blue 1.0.0");
    // The first result journaled is pre-staging's, the second the slot's.
    h.set_failpoint_action("result-journaled", "1*off->return")?;
    bed.wait_host_connected(&h.name)?;
    let out = bed.convoy(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert!(h.failpoint_fired("result-journaled"), "{}", out.stdout);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        bed.controller_log()
            .contains("re-sending a command the host has not answered"),
        "the agent was killed before it reported: the command went again"
    );
    let again = h.exec_ok(&["journalctl", "--no-pager", "-u", "convoy-agent"])?;
    assert!(again.contains("operation already done; reporting its result again"));
    assert_eq!(check_one_live(&bed, &haproxy, h)?, "green 2.0.0");
    h.set_failpoint(None)
}
