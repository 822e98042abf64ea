//! Metric gates on booted hosts, measured by a real Prometheus scraping
//! the demo app while a bounded load generator sends it real traffic.
//! Each breach has its control case: the release that passes.

use std::time::{Duration, Instant};

use anyhow::Result;
use convoy_tests::load::Load;
use convoy_tests::testbed::DEMO_PORT;
use convoy_tests::testbed::{canary_deploy, rollout_id};
use convoy_tests::Testbed;

const PLAIN: &str = include_str!("../testbed/demo.toml");

/// Gates for a typical HTTP service, with short windows for the test's pace.
const GATES: &str = r#"
[analysis]
interval = "2s"
failure_limit = 2
inconclusive_limit = 10
requests_query = 'sum(increase(http_requests_total{host=~"{{hosts}}"}[5s]))'
min_requests = 10

[[analysis.metrics]]
name = "error-rate"
query = 'sum(rate(http_requests_total{host=~"{{hosts}}",code="500"}[5s])) / sum(rate(http_requests_total{host=~"{{hosts}}"}[5s]))'
max = 0.05

[[analysis.metrics]]
name = "p95-latency"
query = 'histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{host=~"{{hosts}}"}[5s])))'
max_ratio_to_baseline = 2.0
baseline_floor = 0.005
"#;

/// The demo app's normal pace: GET / takes a little over 100 ms, so its
/// p95 falls in the histogram's 100-150 ms bucket; +10 ms stays there
/// (1 times the baseline) unless over 5% of requests take 90 ms more,
/// +300 ms lands in the 300-500 ms bucket (over 3 times).
const BASE: &str = "latency = \"100ms\"";

/// Three hosts on 1.0.0 under load, with the gates in the spec.
fn fleet_under_load(gates: &str) -> Result<(Testbed, Load)> {
    let bed = Testbed::boot_analysed(3, PLAIN)?;
    bed.push_demo_release("1.0.0", BASE)?;
    bed.deploy_everywhere("1.0.0")?;
    bed.set_spec(&format!("{PLAIN}\n{gates}"))?;
    let targets: Vec<_> = bed.hosts.iter().map(|h| (h.ip, DEMO_PORT).into()).collect();
    let load = Load::start(&targets, "/", 20, Duration::from_secs(400));
    let mut bed = bed;
    let p = bed.prometheus();
    p.wait_scraping(3)?;
    convoy_nspawn::wait_for("traffic on every host in Prometheus", Duration::from_secs(30), || {
        (p.value("count(rate(http_requests_total{code=\"200\"}[5s]) > 5)")? >= 3.0).then_some(())
    })?;
    Ok((bed, load))
}

/// A deploy's exit code and its whole output (the verdict is on stderr).
fn deploy(bed: &Testbed, args: &[&str]) -> Result<(i32, String)> {
    let out = bed.convoy(args)?;
    Ok((out.code, format!("{}{}", out.stdout, out.stderr)))
}

/// `convoy deploy` of `version` as a canary (host1, bake 12 s, the
/// rest), with `extra` flags.
fn canary_args<'a>(version: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = canary_deploy(version, "1,100%", "12s");
    args.extend_from_slice(extra);
    args
}

fn canary(bed: &Testbed, version: &str) -> Result<(i32, String)> {
    deploy(bed, &canary_args(version, &[]))
}

/// A rollout's measurements of `metric` with `verdict`.
fn measured<'a>(h: &'a serde_json::Value, metric: &str, verdict: &str) -> Vec<&'a serde_json::Value> {
    h["measurements"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["metric"] == metric && m["verdict"] == verdict)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_error_rate_gate_stops_a_canary_that_fails_real_traffic() -> Result<()> {
    let (bed, _load) = fleet_under_load(GATES)?;
    // Answers /health with 200, fails a fifth of real requests.
    bed.push_demo_release("2.0.0", &format!("{BASE}\nerror_rate = 0.2"))?;

    // A dry run decides what the deploy will do and changes nothing.
    let rollouts = |bed: &Testbed| -> Result<usize> {
        let v = bed.history(&["demo"])?;
        Ok(v["rollouts"].as_array().map_or(0, |a| a.len()))
    };
    let before = rollouts(&bed)?;
    let dry = bed.convoy(&canary_args("2.0.0", &["--dry-run", "--output", "json"]))?;
    assert_eq!(dry.code, 0, "{dry:?}");
    let plan: serde_json::Value = serde_json::from_str(&dry.stdout)?;
    assert_eq!(plan["would_start"], true);
    assert_eq!(plan["batches"][0]["hosts"], serde_json::json!(["host1"]));
    assert_eq!(plan["batches"][1]["hosts"], serde_json::json!(["host2", "host3"]));
    let gate = plan["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["metric"] == "error-rate" && g["verdict"] != "before")
        .expect("the error-rate gate measured for the first batch");
    assert!(gate["query"].as_str().unwrap().contains(r#"host=~"host1""#), "{gate}");
    assert_eq!(gate["value"], 0.0, "today's release serves well: {gate}");
    assert!(plan["preflight"].as_array().unwrap().len() == 3, "{plan}");
    assert_eq!(rollouts(&bed)?, before, "no rollout recorded");
    assert_eq!(bed.serving(), ["1.0.0"; 3], "no host touched");
    let text = bed.convoy_ok(&canary_args("2.0.0", &["--dry-run"]))?;
    assert!(text.contains("the deploy would start"), "{text}");

    let (code, out) = canary(&bed, "2.0.0")?;
    let ended = Instant::now();
    let now_ms = convoy_common::ops::now_unix_ms();
    println!("──── deploy of a release failing 20% of requests ────\n{out}");
    assert_eq!(code, 1, "{out}");
    // The real deploy planned what the dry run said.
    assert!(
        out.contains("  batch 1: host1, then bake 12s\n  batch 2: host2, host3\n"),
        "{out}"
    );
    assert!(out.contains("[gate] error-rate fail"), "{out}");
    // Caught in the canary's stage: right after it moved, or in its bake.
    assert!(
        out.contains("metric gates after batch 1: metric error-rate failed 2 measurement(s)")
            || out.contains("metric gates during the bake of batch 1: metric error-rate failed 2 measurement(s)"),
        "{out}"
    );
    assert_eq!(bed.serving(), ["1.0.0"; 3], "the canary is back on 1.0.0");
    let back = ended.elapsed();

    let id = rollout_id(&out);
    let h = bed.history(&["--rollout", &id])?;
    assert_eq!(h["rollouts"][0]["state"], "rolled_back");
    let failed = measured(&h, "error-rate", "fail");
    assert!(failed.len() >= 2, "{h}");
    assert_eq!(failed[0]["hosts"], serde_json::json!(["host1"]));
    assert!(failed[0]["value"].as_f64().unwrap() > 0.05, "{h}");
    // Only the canary was activated (every host pre-staged).
    let activated: Vec<&str> = h["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["op_id"].as_str().unwrap().contains(":activate:"))
        .map(|x| x["host"].as_str().unwrap())
        .collect();
    assert_eq!(activated, ["host1"], "{h}");
    let text = bed.convoy_ok(&["history", "--rollout", &id])?;
    assert!(text.contains("[gate] error-rate fail"), "{text}");
    let first_breach = failed[0]["at_unix_ms"].as_i64().unwrap();
    println!(
        "first breaching measurement to every moved host on 1.0.0 again: {:.1}s (checked {:.1}s after the deploy ended)",
        (now_ms - first_breach) as f64 / 1000.0,
        back.as_secs_f64()
    );

    // Control case: without the gate the same release goes everywhere
    // (it answers a fifth of GET / with 500, so the controller's status
    // says what each host runs).
    bed.set_spec(PLAIN)?;
    let (code, out) = canary(&bed, "2.0.0")?;
    assert_eq!(code, 0, "{out}");
    let status = bed.status()?;
    for h in ["host1", "host2", "host3"] {
        assert_eq!(Testbed::host_status(&status, h)?["app"]["current"], "2.0.0", "{status}");
    }
    Ok(())
}

#[test]
fn latency_is_judged_against_the_baseline_and_a_lost_prometheus_fails_closed() -> Result<()> {
    let (mut bed, _load) = fleet_under_load(GATES)?;
    bed.push_demo_release("2.0.0", &format!("{BASE}\nextra_latency = \"300ms\""))?;
    let (code, out) = canary(&bed, "2.0.0")?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("metric p95-latency failed 2 measurement(s)"), "{out}");
    assert!(out.contains("the baseline"), "{out}");
    assert_eq!(bed.serving(), ["1.0.0"; 3]);
    let h = bed.history(&["--rollout", &rollout_id(&out)])?;
    let failed = measured(&h, "p95-latency", "fail");
    let (value, baseline) = (
        failed[0]["value"].as_f64().unwrap(),
        failed[0]["baseline"].as_f64().unwrap(),
    );
    assert!(value > 2.0 * baseline, "{value} vs {baseline}");
    // The bound it failed: twice the baseline (never below the floor's).
    let max = failed[0]["max"].as_f64().unwrap();
    assert!((max - 2.0 * baseline.max(0.005)).abs() < 1e-9, "{max} vs {baseline}");
    assert!(value > max, "{value} vs {max}");

    // Control case: +10 ms stays within twice the baseline.
    bed.push_demo_release("2.1.0", &format!("{BASE}\nextra_latency = \"10ms\""))?;
    let (code, out) = canary(&bed, "2.1.0")?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(bed.serving(), ["2.1.0"; 3]);
    let h = bed.history(&["--rollout", &rollout_id(&out)])?;
    assert!(!measured(&h, "p95-latency", "pass").is_empty(), "{h}");

    // Prometheus goes away during the canary's bake: measurements fail
    // with the reason, and the rollout halts after failure_limit.
    bed.push_demo_release("2.2.0", BASE)?;
    let child = bed.convoy_spawn(&canary_deploy("2.2.0", "1,100%", "60s"))?;
    convoy_nspawn::wait_for("the canary's first passing round", Duration::from_secs(60), || {
        let list = bed.history(&["demo"]).ok()?;
        let id = list["rollouts"][0]["id"].as_str()?.to_owned();
        let h = bed.history(&["--rollout", &id]).ok()?;
        (list["rollouts"][0]["version"] == "2.2.0" && !measured(&h, "error-rate", "pass").is_empty()).then_some(())
    })?;
    bed.prometheus().kill();
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("failed 2 measurement(s)"), "{text}");
    assert!(text.contains("connect"), "the reason names the lost connection: {text}");
    assert_eq!(bed.serving(), ["2.1.0"; 3]);
    Ok(())
}

#[test]
fn a_breach_while_watching_after_the_last_batch_rolls_every_host_back() -> Result<()> {
    let gates = GATES.replace("failure_limit = 2", "failure_limit = 2\nwatch_after = \"60s\"");
    let (bed, _load) = fleet_under_load(&gates)?;
    // Starts failing half of its requests 30 s after it starts.
    bed.push_demo_release("2.0.0", &format!("{BASE}\nerror_rate = 0.5\nerrors_after = \"30s\""))?;
    let (code, out) = deploy(
        &bed,
        &[
            "deploy",
            "demo",
            "2.0.0",
            "--env",
            "staging",
            "--strategy",
            "all-at-once",
        ],
    )?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("watching the metric gates for 1m"), "{out}");
    assert!(
        out.contains("metric gates while watching after the last batch: metric error-rate failed"),
        "{out}"
    );
    assert_eq!(bed.serving(), ["1.0.0"; 3]);
    let h = bed.history(&["--rollout", &rollout_id(&out)])?;
    assert_eq!(h["rollouts"][0]["state"], "rolled_back");
    // Control case: the first rounds after every host moved passed.
    assert!(!measured(&h, "error-rate", "pass").is_empty(), "{h}");
    Ok(())
}
