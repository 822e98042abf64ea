//! Zero-downtime rolling deploys through a real HAProxy under steady
//! load: with `[traffic]` each host is drained before it restarts and no
//! request fails; without it (the control case) requests fail on every
//! restart. A runtime API that does not answer stops the deploy before
//! anything moves.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use convoy_tests::load::Load;
use convoy_tests::Testbed;

const PLAIN: &str = include_str!("../testbed/demo.toml");

/// The demo app as a real service: 200 ms per request (so that about 20
/// requests are under way at any time, 5 per host), half a second to start.
const SERVICE: &str = "latency = \"200ms\"\nstart_delay = \"500ms\"";

/// Requests per second through HAProxy, and the longest a load runs.
const RATE: u32 = 100;
const LONGEST: Duration = Duration::from_secs(180);

fn traffic(api: &str) -> String {
    format!(
        "{PLAIN}\n[traffic]\nkind = \"haproxy\"\nruntime_api = \"{api}\"\nbackend = \"web\"\ndrain_timeout = \"10s\"\n"
    )
}

/// Runs a rolling deploy of `version` under load; returns (exit code,
/// output, ok, failed requests, seconds under load).
fn deploy_under_load(
    bed: &Testbed,
    front: std::net::SocketAddr,
    version: &str,
) -> Result<(i32, String, u64, u64, f64)> {
    let started = std::time::Instant::now();
    let mut load = Load::start(&[front], "/", RATE, LONGEST);
    let out = bed.convoy(&["deploy", "demo", version, "--env", "staging"])?;
    load.stop();
    let ok = load.counts.ok.load(Ordering::Relaxed);
    let failed = load.counts.errors.load(Ordering::Relaxed) + load.counts.failed.load(Ordering::Relaxed);
    Ok((
        out.code,
        format!("{}{}", out.stdout, out.stderr),
        ok,
        failed,
        started.elapsed().as_secs_f64(),
    ))
}

#[test]
fn a_rolling_deploy_behind_haproxy_with_drain_fails_no_request() -> Result<()> {
    let bed = Testbed::boot(4)?;
    let haproxy = bed.start_haproxy()?;
    bed.push_demo_release("1.0.0", SERVICE)?;
    bed.deploy_everywhere("1.0.0")?;
    haproxy.wait_all_up()?;
    let api = haproxy.api.to_string();

    // With drain: no request fails.
    bed.set_spec(&traffic(&api))?;
    bed.push_demo_release("2.0.0", SERVICE)?;
    let (code, out, ok, failed, secs) = deploy_under_load(&bed, haproxy.frontend, "2.0.0")?;
    println!("with drain: {ok} requests served, {failed} failed, {RATE}/s for {secs:.1}s\n{out}");
    assert_eq!(code, 0, "{out}");
    assert_eq!(failed, 0, "{out}\n{}", haproxy.log());
    assert!(ok > u64::from(RATE), "the load ran: {ok}");
    for h in ["host1", "host2", "host3", "host4"] {
        assert!(
            out.contains(&format!("[{h}] traffic  succeeded drained from haproxy web/{h}")),
            "{out}"
        );
        assert!(
            out.contains(&format!("[{h}] traffic  succeeded back in haproxy web/{h}: UP")),
            "{out}"
        );
    }
    haproxy.wait_all_up()?;

    // Control case: the same deploy without [traffic] drops requests on
    // every restart.
    bed.set_spec(PLAIN)?;
    bed.push_demo_release("3.0.0", SERVICE)?;
    let (code, out, ok, failed, secs) = deploy_under_load(&bed, haproxy.frontend, "3.0.0")?;
    println!("without drain: {ok} requests served, {failed} failed, {RATE}/s for {secs:.1}s");
    assert_eq!(code, 0, "{out}");
    assert!(failed > 0, "without drain restarts drop requests: {ok} ok");
    haproxy.wait_all_up()?;

    // The runtime API does not answer: pre-flight refuses, nothing moves.
    bed.set_spec(&traffic("127.0.0.1:1"))?;
    bed.push_demo_release("4.0.0", SERVICE)?;
    let out = bed.convoy(&["deploy", "demo", "4.0.0", "--env", "staging"])?;
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, 4, "{text}");
    assert!(text.contains("haproxy runtime API at 127.0.0.1:1"), "{text}");
    for h in &bed.hosts {
        assert_eq!(h.serving().as_deref(), Some("3.0.0"), "nothing moved");
    }
    Ok(())
}
