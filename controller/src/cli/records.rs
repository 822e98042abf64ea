//! Commands that print what the controller knows, as tables or JSON.

use convoy_common::ops::AppStatus;
use convoy_proto::{HistoryRequest, StatusRequest};
use serde::Serialize;

use super::render::{print_table, MeasurementJson};
use super::{exit, Conn, Failure};

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// The `--output json` shape of `convoy history`.
#[derive(Serialize)]
struct HistoryJson {
    rollouts: Vec<RolloutJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hosts: Vec<HostRecordJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    events: Vec<EventJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    measurements: Vec<MeasurementJson>,
}

#[derive(Serialize)]
struct RolloutJson {
    id: String,
    app: String,
    version: String,
    environment: String,
    kind: String,
    strategy: String,
    operator: String,
    state: String,
    reason: String,
    hotfix_reason: Option<String>,
    approved_by: Option<String>,
    started_at_unix_ms: i64,
    finished_at_unix_ms: Option<i64>,
}

#[derive(Serialize)]
struct HostRecordJson {
    host: String,
    op_id: String,
    outcome: String,
    reason: String,
    restore_detail: String,
    finished_at_unix_ms: i64,
}

#[derive(Serialize)]
struct EventJson {
    host: String,
    step: String,
    kind: String,
    message: String,
    at_unix_ms: i64,
}

pub(super) fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub async fn history(
    conn: &Conn,
    app: Option<String>,
    rollout: Option<String>,
    limit: u32,
    env: Option<String>,
    state: Option<String>,
    json: bool,
) -> Result<(), Failure> {
    if app.is_none() && rollout.is_none() {
        return Err(Failure::new(exit::USAGE, "name an APP, or a rollout with --rollout ID"));
    }
    let mut client = conn.connect().await?;
    let reply = client
        .history(HistoryRequest {
            app: app.unwrap_or_default(),
            rollout_id: rollout.unwrap_or_default(),
            limit,
            environment: env.unwrap_or_default(),
            state: state.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let measurement_lines: Vec<String> = reply.measurements.iter().map(super::render::measurement_line).collect();
    let out = HistoryJson {
        measurements: reply.measurements.into_iter().map(Into::into).collect(),
        rollouts: reply
            .rollouts
            .into_iter()
            .map(|r| RolloutJson {
                id: r.id,
                app: r.app,
                version: r.version,
                environment: r.environment,
                kind: r.kind,
                strategy: r.strategy,
                operator: r.operator,
                state: r.state,
                reason: r.reason,
                hotfix_reason: Some(r.hotfix_reason).filter(|h| !h.is_empty()),
                approved_by: Some(r.approved_by).filter(|a| !a.is_empty()),
                started_at_unix_ms: r.started_at_unix_ms,
                finished_at_unix_ms: Some(r.finished_at_unix_ms).filter(|t| *t > 0),
            })
            .collect(),
        hosts: reply
            .hosts
            .into_iter()
            .map(|h| HostRecordJson {
                host: h.host,
                op_id: h.op_id,
                outcome: h.outcome,
                reason: h.reason,
                restore_detail: h.restore_detail,
                finished_at_unix_ms: h.finished_at_unix_ms,
            })
            .collect(),
        events: reply
            .events
            .into_iter()
            .map(|e| EventJson {
                host: e.host,
                step: e.step,
                kind: e.kind,
                message: e.message,
                at_unix_ms: e.at_unix_ms,
            })
            .collect(),
    };
    if json {
        super::print_json(&out);
        return Ok(());
    }
    let rows = out.rollouts.iter().map(|r| {
        let mut reason = r.reason.clone();
        for (label, value) in [("approved by ", &r.approved_by), ("hotfix: ", &r.hotfix_reason)] {
            if let Some(v) = value {
                reason = if reason.is_empty() {
                    format!("{label}{v}")
                } else {
                    format!("{label}{v}; {reason}")
                };
            }
        }
        vec![
            r.id.clone(),
            when(r.started_at_unix_ms),
            r.kind.clone(),
            r.version.clone(),
            r.environment.clone(),
            r.state.clone(),
            r.operator.clone(),
            reason,
        ]
    });
    print_table(
        &[
            "ROLLOUT", "STARTED", "KIND", "VERSION", "ENV", "STATE", "OPERATOR", "REASON",
        ],
        rows,
    );
    if !out.hosts.is_empty() {
        println!();
        print_table(
            &["HOST", "OUTCOME", "REASON"],
            out.hosts.iter().map(|h| {
                vec![
                    h.host.clone(),
                    h.outcome.clone(),
                    format!("{} {}", h.reason, h.restore_detail).trim().to_owned(),
                ]
            }),
        );
    }
    if !out.events.is_empty() {
        println!();
        for e in &out.events {
            println!(
                "{} [{}] {:<8} {:<9} {}",
                when(e.at_unix_ms),
                e.host,
                e.step,
                e.kind,
                e.message
            );
        }
    }
    if !out.measurements.is_empty() {
        println!();
        for (m, line) in out.measurements.iter().zip(&measurement_lines) {
            println!("{}{line}", when(m.at_unix_ms));
        }
    }
    Ok(())
}

/// The `--output json` shape of `convoy status`: stable, documented in README.md.
#[derive(Serialize)]
struct StatusJson {
    app: String,
    hosts: Vec<HostJson>,
}

#[derive(Serialize)]
struct HostJson {
    host: String,
    connected: bool,
    labels: std::collections::BTreeMap<String, String>,
    last_seen_unix_ms: i64,
    /// null when the app was never installed on this host.
    app: Option<AppStatus>,
}

pub async fn status(conn: &Conn, app: String, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client.status(StatusRequest { app: app.clone() }).await?.into_inner();
    let hosts: Vec<HostJson> = reply
        .hosts
        .into_iter()
        .map(|h| HostJson {
            host: h.host,
            connected: h.connected,
            labels: h.labels.into_iter().collect(),
            last_seen_unix_ms: h.last_seen_unix_ms,
            app: h.app.and_then(|a| AppStatus::try_from(a).ok()),
        })
        .collect();
    if json {
        let out = StatusJson { app, hosts };
        super::print_json(&out);
        return Ok(());
    }
    // Blue-green apps show both slots: release, state, which one is live;
    // apps with configuration the revision each host runs with.
    let slotted = hosts
        .iter()
        .any(|h| h.app.as_ref().is_some_and(|a| !a.slots.is_empty()));
    let configured = hosts
        .iter()
        .any(|h| h.app.as_ref().is_some_and(|a| a.config_revision.is_some()));
    let rows = hosts.into_iter().map(|h| {
        let v = |v: Option<&convoy_common::Version>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let config = h
            .app
            .as_ref()
            .and_then(|a| a.config_revision)
            .map_or("-".to_owned(), |r| r.to_string());
        let (cur, prev, health, reason, slots) = match &h.app {
            Some(a) => (
                v(a.current.as_ref()),
                v(a.previous.as_ref()),
                format!("{:?}", a.health).to_lowercase(),
                a.health_reason.clone(),
                a.slots.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
            ),
            None => ("-".into(), "-".into(), "-".into(), String::new(), String::new()),
        };
        let mut row = vec![
            h.host,
            yes_no(h.connected),
            h.labels.get("env").cloned().unwrap_or_else(|| "-".into()),
            cur,
        ];
        if configured {
            row.push(config);
        }
        row.push(prev);
        if slotted {
            row.push(if slots.is_empty() { "-".into() } else { slots });
        }
        row.extend([health, reason]);
        row
    });
    let mut header = vec!["HOST", "CONNECTED", "ENV", "CURRENT"];
    if configured {
        header.push("CONFIG");
    }
    header.push("PREVIOUS");
    if slotted {
        header.push("SLOTS");
    }
    header.extend(["HEALTH", "REASON"]);
    print_table(&header, rows);
    Ok(())
}

/// The `--output json` shape of `convoy hosts`.
#[derive(Serialize)]
struct HostsJson {
    hosts: Vec<HostEntryJson>,
}

#[derive(Serialize)]
struct HostEntryJson {
    host: String,
    connected: bool,
    labels: std::collections::BTreeMap<String, String>,
    last_seen_unix_ms: i64,
    apps: Vec<AppStatus>,
}

pub async fn hosts(conn: &Conn, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client.hosts(convoy_proto::HostsRequest::default()).await?.into_inner();
    let out = HostsJson {
        hosts: reply
            .hosts
            .into_iter()
            .map(|h| HostEntryJson {
                host: h.host,
                connected: h.connected,
                labels: h.labels.into_iter().collect(),
                last_seen_unix_ms: h.last_seen_unix_ms,
                apps: h.apps.into_iter().filter_map(|a| AppStatus::try_from(a).ok()).collect(),
            })
            .collect(),
    };
    if json {
        super::print_json(&out);
        return Ok(());
    }
    let rows = out.hosts.iter().map(|h| {
        let labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let apps: Vec<String> = h
            .apps
            .iter()
            .map(|a| {
                format!(
                    "{}={}",
                    a.app,
                    a.current.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "-".into())
                )
            })
            .collect();
        vec![
            h.host.clone(),
            yes_no(h.connected),
            when(h.last_seen_unix_ms),
            labels.join(","),
            apps.join(" "),
        ]
    });
    print_table(&["HOST", "CONNECTED", "LAST SEEN", "LABELS", "APPS"], rows);
    Ok(())
}

/// The `--output json` shape of `convoy releases`.
#[derive(Serialize)]
struct ReleasesJson {
    app: String,
    releases: Vec<ReleaseJson>,
}

#[derive(Serialize)]
struct ReleaseJson {
    version: String,
    digest: String,
    size: u64,
    signed: bool,
    pushed_by: String,
    pushed_at_unix_ms: i64,
    /// What it unpacks to, measured at push; null for older releases.
    unpacked_size: Option<u64>,
    entries: Option<u64>,
}

pub async fn releases(conn: &Conn, app: String, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .releases(convoy_proto::ReleasesRequest { app: app.clone() })
        .await?
        .into_inner();
    let out = ReleasesJson {
        app,
        releases: reply
            .releases
            .into_iter()
            .map(|r| ReleaseJson {
                version: r.version,
                digest: r.digest,
                size: r.size,
                signed: r.signed,
                pushed_by: r.pushed_by,
                pushed_at_unix_ms: r.pushed_at_unix_ms,
                unpacked_size: r.unpacked_size,
                entries: r.entries,
            })
            .collect(),
    };
    if json {
        super::print_json(&out);
        return Ok(());
    }
    let rows = out.releases.iter().map(|r| {
        vec![
            r.version.clone(),
            when(r.pushed_at_unix_ms),
            r.size.to_string(),
            r.unpacked_size.map_or_else(|| "-".into(), |n| n.to_string()),
            yes_no(r.signed),
            r.pushed_by.clone(),
            r.digest.clone(),
        ]
    });
    print_table(
        &["VERSION", "PUSHED", "BYTES", "UNPACKED", "SIGNED", "BY", "SHA256"],
        rows,
    );
    Ok(())
}

/// The `--output json` shape of `convoy report`.
#[derive(Serialize)]
struct ReportJson {
    app: String,
    since_unix_ms: i64,
    deploys: u32,
    failed_deploys: u32,
    deploys_per_day: f64,
    change_failure_rate: Option<f64>,
    mean_time_to_restore_secs: Option<f64>,
    restores_measured: u32,
}

pub async fn delivery_report(conn: &Conn, app: String, since: std::time::Duration, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let r = client
        .report(convoy_proto::ReportRequest {
            app: app.clone(),
            since_secs: since.as_secs(),
            bucket_secs: 0,
        })
        .await?
        .into_inner();
    let out = ReportJson {
        app,
        since_unix_ms: r.since_unix_ms,
        deploys: r.deploys,
        failed_deploys: r.failed_deploys,
        deploys_per_day: r.deploys_per_day,
        change_failure_rate: r.change_failure_rate,
        mean_time_to_restore_secs: r.mean_time_to_restore_secs,
        restores_measured: r.restores_measured,
    };
    if json {
        super::print_json(&out);
        return Ok(());
    }
    println!("{} since {}", out.app, when(out.since_unix_ms));
    println!(
        "  deploys:              {} ({} failed)",
        out.deploys, out.failed_deploys
    );
    println!("  deploy frequency:     {:.2} per day", out.deploys_per_day);
    match out.change_failure_rate {
        Some(r) => println!("  change failure rate:  {:.0}%", r * 100.0),
        None => println!("  change failure rate:  - (no finished deploys)"),
    }
    match out.mean_time_to_restore_secs {
        Some(s) => println!(
            "  mean time to restore: {} (over {} failure(s))",
            humantime::format_duration(std::time::Duration::from_secs(s.round() as u64)),
            out.restores_measured
        ),
        None => println!("  mean time to restore: - (no restored failure)"),
    }
    Ok(())
}
