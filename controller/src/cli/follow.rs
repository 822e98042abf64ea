//! Commands that start or follow a rollout, and its live output.

use convoy_proto::{rollout_event, ControlRequest, DeployRequest, RollbackRequest, WatchRequest};

use super::render::{measurement_line, preflight_table};
use super::{exit, parse_label, Conn, Failure};

/// `convoy deploy` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DeployArgs {
    pub app: String,
    #[arg(value_name = "VERSION")]
    pub release: String,
    #[arg(long)]
    pub env: String,
    #[command(flatten)]
    pub pace: Pace,
    /// On halt, leave the hosts this rollout moved where they are.
    #[arg(long)]
    pub no_rollback: bool,
    /// Skip the promotion rule (the version completed in the environment before).
    #[arg(long, requires = "reason")]
    pub hotfix: bool,
    /// Why the hotfix skips promotion; kept in the audit trail.
    #[arg(long)]
    pub reason: Option<String>,
    /// These hosts first, in this order (comma-separated), e.g. a canary group.
    #[arg(long, value_delimiter = ',')]
    pub order: Vec<String>,
    /// Only hosts with these labels, e.g. --select zone=eu1 (repeatable).
    #[arg(long, value_parser = parse_label)]
    pub select: Vec<(String, String)>,
    /// Hosts with these labels go first, as a stage of their own, e.g.
    /// --canary-group role=canary (repeatable; a host must match all).
    #[arg(long, value_parser = parse_label)]
    pub canary_group: Vec<(String, String)>,
    /// Canary: after each stage but the last (and its bake), go on by
    /// itself (auto) or wait for `convoy promote ROLLOUT` (manual).
    #[arg(long, default_value = "auto", value_parser = ["auto", "manual"])]
    pub promote: String,
    /// A host that drops away mid-rollout: count it failed once it has been
    /// away for --vanish-deadline (fail), or wait for it to come back (wait).
    #[arg(long, default_value = "fail", value_parser = ["fail", "wait"])]
    pub on_vanish: String,
    /// How long a host may be away before it counts as failed (policy fail).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub vanish_deadline: Option<std::time::Duration>,
    /// Deploy with this configuration revision of the environment
    /// (default: its newest).
    #[arg(long)]
    pub config_revision: Option<u64>,
    /// Print what the deploy would decide (targets, batches, verdicts,
    /// pre-flight, the metric gates now) and change nothing. Exits 0 when
    /// it would start, 4 when it would be refused.
    #[arg(long)]
    pub dry_run: bool,
    /// text, or json: one JSON object per event, one per line (with
    /// --dry-run: the plan as one JSON object).
    #[arg(long, value_enum, default_value = "text")]
    pub output: super::Output,
}

pub async fn deploy(conn: &Conn, a: DeployArgs) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let request = DeployRequest {
        app: a.app.clone(),
        version: a.release.clone(),
        environment: a.env.clone(),
        strategy: a.pace.strategy.clone().unwrap_or_default(),
        batch_size: a.pace.batch_size.clone().unwrap_or_default(),
        stages: a.pace.stages.clone().unwrap_or_default(),
        bake_ms: a.pace.bake.map(|d| d.as_millis() as u64).unwrap_or(0),
        failure_budget: a.pace.failure_budget.clone().unwrap_or_default(),
        no_rollback: a.no_rollback,
        hotfix: a.hotfix,
        reason: a.reason.clone().unwrap_or_default(),
        order: a.order.clone(),
        select: a.select.iter().cloned().collect(),
        canary_group: a.canary_group.iter().cloned().collect(),
        manual_promote: a.promote == "manual",
        wait_for_vanished: a.on_vanish == "wait",
        vanish_deadline_ms: a.vanish_deadline.map(|d| d.as_millis() as u64).unwrap_or(0),
        config_revision: a.config_revision.unwrap_or(0),
    };
    let title = format!("{} {} to {}", a.app, a.release, a.env);
    if a.dry_run {
        let plan = client.plan_deploy(request).await?.into_inner();
        return super::dry_run::print(&title, plan, matches!(a.output, super::Output::Json));
    }
    let stream = client.deploy(request).await?.into_inner();
    follow(stream, &title, a.output).await
}

/// How fast a deploy or a rollback goes.
#[derive(clap::Args, Debug, Clone)]
pub struct Pace {
    /// rolling, canary or all-at-once; a deploy also takes blue-green
    /// (rolling batches; refused unless the app's spec has [blue_green]).
    /// Default: rolling for a deploy; all-at-once for a rollback (an
    /// emergency is fixed everywhere at once).
    #[arg(long)]
    pub strategy: Option<String>,
    /// Rolling: hosts per batch, a count or a percentage (default 1).
    #[arg(long)]
    pub batch_size: Option<String>,
    /// Canary: cumulative stages, e.g. 1,10%,50%,100%.
    #[arg(long)]
    pub stages: Option<String>,
    /// Canary: wait after each stage but the last, e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub bake: Option<std::time::Duration>,
    /// Failed hosts tolerated before it halts: a count or a percentage (default 0).
    #[arg(long)]
    pub failure_budget: Option<String>,
}

pub async fn rollback(
    conn: &Conn,
    app: String,
    env: String,
    to: Option<String>,
    hosts: Vec<String>,
    pace: Pace,
    output: super::Output,
) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let target = to.clone().unwrap_or_else(|| "each host's previous release".into());
    let stream = client
        .rollback(RollbackRequest {
            app: app.clone(),
            environment: env.clone(),
            to_version: to.unwrap_or_default(),
            hosts,
            strategy: pace.strategy.unwrap_or_default(),
            batch_size: pace.batch_size.unwrap_or_default(),
            stages: pace.stages.unwrap_or_default(),
            bake_ms: pace.bake.map_or(0, |b| b.as_millis() as u64),
            failure_budget: pace.failure_budget.unwrap_or_default(),
        })
        .await?
        .into_inner();
    follow(stream, &format!("rollback of {app} in {env} to {target}"), output).await
}

/// `convoy pause|resume|abort ROLLOUT`.
pub async fn control(conn: &Conn, rollout: String, action: &str) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .control(ControlRequest {
            rollout_id: rollout.clone(),
            action: action.to_owned(),
        })
        .await?
        .into_inner();
    println!("rollout {rollout}: {}", reply.state);
    Ok(())
}

/// `convoy watch ROLLOUT`: follows a running rollout; exits as `deploy` would.
pub async fn watch(conn: &Conn, rollout: String, output: super::Output) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let stream = client
        .watch(WatchRequest {
            rollout_id: rollout.clone(),
        })
        .await?
        .into_inner();
    if matches!(output, super::Output::Text) {
        println!("watching rollout {rollout}");
    }
    follow(stream, &format!("rollout {rollout}"), output).await
}

/// Prints a rollout's events as they come (lines, live bars on a
/// terminal, or one JSON object per line) and maps its end to an exit code.
async fn follow(
    mut stream: tonic::Streaming<convoy_proto::RolloutEvent>,
    title: &str,
    output: super::Output,
) -> Result<(), Failure> {
    let json = matches!(output, super::Output::Json);
    let mut out = if json {
        crate::progress::Progress::Quiet
    } else {
        crate::progress::Progress::for_stdout()
    };
    let r = show(&mut stream, title, &mut out, json).await;
    out.finish();
    r
}

async fn show(
    stream: &mut tonic::Streaming<convoy_proto::RolloutEvent>,
    title: &str,
    out: &mut crate::progress::Progress,
    json: bool,
) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let mut hosts = 0;
    let mut rollout = String::new();
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            // The controller went away (stopped, restarted, or the network)
            // after the rollout started: it is in the controller's store and
            // goes on when the controller is back.
            Err(e) if !rollout.is_empty() && e.code() != tonic::Code::PermissionDenied => {
                return Err(Failure::new(
                    exit::UNREACHABLE,
                    format!(
                        "the connection to the controller was lost during rollout {rollout} ({}); \
                         the rollout is recorded and goes on when the controller is back: follow it with \
                         `convoy watch {rollout}`, or read it with `convoy history --rollout {rollout}`",
                        e.message()
                    ),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        rollout.clone_from(&ev.rollout_id);
        if json {
            if let Some(v) = super::events::to_json(&ev) {
                println!("{v}");
            }
        }
        match ev.body {
            Some(rollout_event::Body::Plan(p)) => {
                hosts = p.hosts.len();
                out.line(&format!(
                    "rollout {}: {title}, {} host(s), {}",
                    ev.rollout_id, hosts, p.strategy
                ));
                for (i, b) in p.batches.iter().enumerate() {
                    let bake = if b.bake_ms > 0 {
                        format!(
                            ", then bake {}",
                            humantime::format_duration(std::time::Duration::from_millis(b.bake_ms))
                        )
                    } else {
                        String::new()
                    };
                    out.line(&format!("  batch {}: {}{bake}", i + 1, b.hosts.join(", ")));
                }
                out.plan(&p.batches.iter().map(|b| b.hosts.clone()).collect::<Vec<_>>());
                if p.failure_budget > 0 {
                    out.line(&format!("  failure budget: {} host(s)", p.failure_budget));
                }
                if !p.digest.is_empty() {
                    out.line(&format!("  artifact sha256 {}", p.digest));
                }
                if !p.skipped_hosts.is_empty() {
                    out.line(&format!("  skipped (not connected): {}", p.skipped_hosts.join(", ")));
                }
            }
            Some(rollout_event::Body::Note(n)) => out.note(&n.message),
            Some(rollout_event::Body::Measurement(m)) => out.line(&measurement_line(&m)),
            Some(rollout_event::Body::Preflight(p)) => out.line(&preflight_table(&p)),
            Some(rollout_event::Body::HostEvent(h)) => {
                if let Some(e) = h.event {
                    let kind = convoy_proto::EventKind::try_from(e.kind)
                        .map(|k| k.as_str_name())
                        .unwrap_or("?");
                    let kind = kind.trim_start_matches("EVENT_KIND_").to_lowercase();
                    out.host(&h.host, &e.step, &kind, &e.message);
                }
            }
            Some(rollout_event::Body::HostResult(h)) => {
                if let Some(r) = h.result {
                    let outcome = convoy_proto::Outcome::try_from(r.outcome)
                        .map(|o| o.as_str_name())
                        .unwrap_or("?");
                    let switch = !r.op_id.contains(":stage:");
                    out.result(&h.host, &outcome.trim_start_matches("OUTCOME_").to_lowercase(), switch);
                }
            }
            Some(rollout_event::Body::Done(d)) => {
                let secs = started.elapsed().as_secs_f64();
                if d.succeeded {
                    let mut msg = format!("rollout {} succeeded: {hosts} host(s) in {secs:.1}s", ev.rollout_id);
                    if !d.failed_hosts.is_empty() {
                        msg.push_str(&format!(
                            "; within the failure budget, failed: {}",
                            d.failed_hosts.join(", ")
                        ));
                    }
                    out.line(&msg);
                    return if d.rollback_failed {
                        Err(Failure::new(
                            exit::RESTORE_FAILED,
                            "a host could not be restored; it needs attention",
                        ))
                    } else {
                        Ok(())
                    };
                }
                let mut msg = if d.failed_host.is_empty() {
                    format!("rollout {} stopped: {}", ev.rollout_id, d.reason)
                } else {
                    format!("rollout {} failed on {}: {}", ev.rollout_id, d.failed_host, d.reason)
                };
                if d.failed_hosts.len() > 1 {
                    msg.push_str(&format!("\nfailed hosts: {}", d.failed_hosts.join(", ")));
                }
                if !d.rolled_back_hosts.is_empty() {
                    msg.push_str(&format!("\nrolled back: {}", d.rolled_back_hosts.join(", ")));
                }
                if !d.untouched_hosts.is_empty() {
                    msg.push_str(&format!("\nhosts not touched: {}", d.untouched_hosts.join(", ")));
                }
                return Err(Failure::new(super::events::exit_code(&d), msg));
            }
            None => {}
        }
    }
    Err(Failure::new(
        exit::UNREACHABLE,
        match rollout.is_empty() {
            true => "the controller closed the stream before the rollout started; check `convoy history`".to_owned(),
            false => format!(
                "the controller closed the stream before rollout {rollout} finished (it is stopping, or another \
                 controller took the rollout over: see `convoy controllers`); the rollout goes on: read it with \
                 `convoy history --rollout {rollout}`"
            ),
        },
    ))
}
