//! The dashboard's pages. Each is plain HTML a screen reader and a
//! keyboard can use: tables with captions and header cells, states said in
//! words (a symbol beside the word, never a colour alone), and links and
//! buttons for everything. The live rollout page adds one small script.

use axum::http::StatusCode;
use convoy_proto::{FleetCell, FleetReply, HistoryReply, HostsReply, ReportReply, RolloutRecord};
use maud::{html, Markup, DOCTYPE};

use super::{chart, Ui, ACTIONS, HOSTS_PER_PAGE};
use crate::rollout::events::{LIVE_STATES, STATES};

/// Environments in promotion order first, the others after by name.
const ENV_ORDER: [&str; 3] = ["development", "staging", "production"];

fn layout(ui: Option<&Ui>, title: &str, here: &str, body: Markup) -> Markup {
    let nav = [
        ("/", "Fleet"),
        ("/hosts", "Hosts"),
        ("/history", "History"),
        ("/report", "Report"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(ui) = ui { meta name="csrf" content=(ui.csrf); }
                title { (title) " · convoy" }
                link rel="stylesheet" href="/assets/style.css";
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "convoy" }
                    nav aria-label="Pages" {
                        ul {
                            @for (href, name) in nav {
                                li { a href=(href) aria-current=[(href == here).then_some("page")] { (name) } }
                            }
                        }
                    }
                    @if let Some(ui) = ui {
                        span.who { "as " (ui.operator) " (" (ui.role.as_str()) ")" }
                    }
                }
                main #main { h1 { (title) } (body) }
            }
        }
    }
}

/// A refusal or an error, as a page.
pub fn message(code: StatusCode, why: &str) -> Markup {
    layout(
        None,
        code.canonical_reason().unwrap_or("Error"),
        "",
        html! { p.message role="alert" { (why) } },
    )
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// A rollout's state as a word with a symbol, never colour alone.
fn state(s: &str) -> Markup {
    let symbol = match s {
        "succeeded" => "✓",
        "rolled_back" | "refused" => "✗",
        s if s.starts_with("failed") => "✗",
        "running" => "▶",
        "paused" | "awaiting_approval" | "awaiting_promotion" => "⏸",
        _ => "•",
    };
    html! { span class=(format!("state state-{s}")) { span aria-hidden="true" { (symbol) " " } (s.replace('_', " ")) } }
}

fn rollout_link(r: &RolloutRecord) -> Markup {
    html! { a href=(format!("/rollouts/{}", r.id)) { (r.id) } }
}

fn env_rank(env: &str) -> (usize, String) {
    (
        ENV_ORDER.iter().position(|e| *e == env).unwrap_or(ENV_ORDER.len()),
        env.to_owned(),
    )
}

pub fn fleet(ui: &Ui, reply: &FleetReply) -> Markup {
    let running: Vec<&RolloutRecord> = reply
        .cells
        .iter()
        .filter_map(|c| c.last_rollout.as_ref())
        .filter(|r| r.finished_at_unix_ms == 0)
        .collect();
    let body = html! {
        section aria-labelledby="running" {
            h2 #running { "Running rollouts" }
            @if running.is_empty() {
                p { "None." }
            } @else {
                ul.running {
                    @for r in &running {
                        li { (rollout_link(r)) ": " (r.app) " " (r.version) " to " (r.environment) " — " (state(&r.state)) }
                    }
                }
            }
        }
        section aria-labelledby="matrix-title" {
            h2 #matrix-title { "Apps by environment" }
            p { (reply.connected) " of " (reply.hosts) " hosts connected. This table refreshes every 5 seconds." }
            div #matrix { (fleet_matrix(reply)) }
        }
        script src="/assets/live.js" {}
    };
    layout(Some(ui), "Fleet", "/", body)
}

/// The apps × environments table (also fetched alone to refresh it).
pub fn fleet_matrix(reply: &FleetReply) -> Markup {
    let mut envs: Vec<&str> = reply.cells.iter().map(|c| c.environment.as_str()).collect();
    envs.sort_by_key(|e| env_rank(e));
    envs.dedup();
    let mut apps: Vec<&str> = reply.cells.iter().map(|c| c.app.as_str()).collect();
    apps.dedup();
    let cell = |app: &str, env: &str| reply.cells.iter().find(|c| c.app == app && c.environment == env);
    html! {
        @if apps.is_empty() {
            p { "No app is installed on any host yet, and none was deployed." }
        } @else {
            table.matrix data-refresh="/fleet/matrix" {
                caption { "Release, health and last rollout of each app in each environment" }
                thead { tr {
                    th scope="col" { "App" }
                    @for env in &envs { th scope="col" { @if env.is_empty() { "(no env label)" } @else { (env) } } }
                } }
                tbody {
                    @for app in &apps {
                        tr {
                            th scope="row" { (app) }
                            @for env in &envs {
                                td { @if let Some(c) = cell(app, env) { (matrix_cell(c)) } @else { span.none { "—" } } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn matrix_cell(c: &FleetCell) -> Markup {
    let mut versions: Vec<(&String, &u32)> = c.versions.iter().collect();
    versions.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    html! {
        div.release {
            @for (v, n) in &versions {
                span.version { @if v.is_empty() { "nothing installed" } @else { (v) } " ×" (n) } " "
            }
        }
        div.health {
            span.healthy { span aria-hidden="true" { "✓ " } (c.healthy) " healthy" }
            @if c.unhealthy > 0 { ", " span.unhealthy { span aria-hidden="true" { "✗ " } (c.unhealthy) " unhealthy" } }
            @if c.unknown > 0 { ", " span.unknown { (c.unknown) " health unknown" } }
            @if c.disconnected > 0 { ", " span.disconnected { span aria-hidden="true" { "○ " } (c.disconnected) " disconnected" } }
        }
        @if let Some(r) = &c.last_rollout {
            div.last { "Last: " (rollout_link(r)) " " (r.kind) " " (r.version) " " (state(&r.state)) }
        }
    }
}

pub fn hosts(ui: &Ui, q: &str, page: u32, reply: &HostsReply) -> Markup {
    let first = page * HOSTS_PER_PAGE;
    let shown = reply.hosts.len() as u32;
    let link = |p: u32| {
        format!(
            "/hosts?q={}&page={p}",
            percent_encoding::utf8_percent_encode(q, percent_encoding::NON_ALPHANUMERIC)
        )
    };
    let body = html! {
        form.filters method="get" action="/hosts" role="search" {
            label for="q" { "Name or label value contains" }
            input #q name="q" type="search" value=(q);
            button type="submit" { "Filter" }
        }
        p #count { @if shown == 0 { "No host matches." } @else { "Hosts " (first + 1) "–" (first + shown) " of " (reply.total) "." } }
        table {
            caption { "Hosts, by name" }
            thead { tr { th scope="col" { "Host" } th scope="col" { "Connection" } th scope="col" { "Labels" } th scope="col" { "Apps" } } }
            tbody {
                @for h in &reply.hosts {
                    tr {
                        th scope="row" { (h.host) }
                        td { @if h.connected { "connected" } @else { "disconnected, last seen " (when(h.last_seen_unix_ms)) } }
                        td { @for (k, v) in &h.labels { code { (k) "=" (v) } " " } }
                        td { @for a in &h.apps {
                            div { (a.app) " " (if a.current.is_empty() { "—" } else { &a.current }) " (" (health_name(a.health)) ")" }
                        } }
                    }
                }
            }
        }
        nav.pager aria-label="Pages of hosts" {
            @if page > 0 { a href=(link(page - 1)) rel="prev" { "← Previous" } " " }
            @if first + shown < reply.total { a href=(link(page + 1)) rel="next" { "Next →" } }
        }
    };
    layout(Some(ui), "Hosts", "/hosts", body)
}

fn health_name(h: i32) -> &'static str {
    match convoy_proto::Health::try_from(h) {
        Ok(convoy_proto::Health::Healthy) => "healthy",
        Ok(convoy_proto::Health::Unhealthy) => "unhealthy",
        _ => "health unknown",
    }
}

fn app_picker(apps: &[String], app: &str) -> Markup {
    html! {
        label for="app" { "App" }
        select #app name="app" {
            @for a in apps { option value=(a) selected[a == app] { (a) } }
        }
    }
}

pub fn history(ui: &Ui, apps: &[String], app: &str, env: &str, st: &str, rollouts: &[RolloutRecord]) -> Markup {
    let states = std::iter::once("").chain(STATES);
    let body = html! {
        form.filters method="get" action="/history" {
            (app_picker(apps, app))
            label for="env" { "Environment" }
            input #env name="env" value=(env) placeholder="any";
            label for="state" { "State" }
            select #state name="state" {
                @for s in states { option value=(s) selected[s == st] { @if s.is_empty() { "any" } @else { (s) } } }
            }
            button type="submit" { "Show" }
        }
        @if rollouts.is_empty() { p { "No rollout matches." } } @else {
            table {
                caption { "Rollouts of " (app) ", newest first" }
                thead { tr {
                    th scope="col" { "Rollout" } th scope="col" { "Kind" } th scope="col" { "Version" }
                    th scope="col" { "Environment" } th scope="col" { "State" } th scope="col" { "By" }
                    th scope="col" { "Started" } th scope="col" { "Reason" }
                } }
                tbody { @for r in rollouts { tr {
                    th scope="row" { (rollout_link(r)) } td { (r.kind) } td { (r.version) } td { (r.environment) }
                    td { (state(&r.state)) } td { (r.operator) } td { (when(r.started_at_unix_ms)) } td { (r.reason) }
                } } }
            }
        }
    };
    layout(Some(ui), "History", "/history", body)
}

pub fn report(ui: &Ui, apps: &[String], app: &str, days: u32, r: Option<&ReportReply>) -> Markup {
    let pct = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{:.1}%", v * 100.0));
    let secs = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.0} s"));
    let body = html! {
        form.filters method="get" action="/report" {
            (app_picker(apps, app))
            label for="days" { "Days" }
            input #days name="days" type="number" min="1" max="365" value=(days);
            button type="submit" { "Show" }
        }
        @if let Some(r) = r {
            dl.figures {
                dt { "Deploys" } dd { (r.deploys) " (" (format!("{:.2}", r.deploys_per_day)) " a day succeeded)" }
                dt { "Change failure rate" } dd { (pct(r.change_failure_rate)) " (" (r.failed_deploys) " failed)" }
                dt { "Mean time to restore" } dd { (secs(r.mean_time_to_restore_secs)) " (" (r.restores_measured) " restores)" }
            }
            (chart::bars(
                "Deploys a day (failed ones in the darker part)",
                &r.buckets.iter().map(|b| (b.start_unix_ms, f64::from(b.deploys), f64::from(b.failed_deploys))).collect::<Vec<_>>(),
            ))
            (chart::bars(
                "Mean time to restore a day, in seconds",
                &r.buckets.iter().map(|b| (b.start_unix_ms, b.mean_time_to_restore_secs.unwrap_or(0.0), 0.0)).collect::<Vec<_>>(),
            ))
        } @else { p { "No app yet." } }
    };
    layout(Some(ui), &format!("Delivery report, last {days} days"), "/report", body)
}

fn record(reply: &HistoryReply) -> Option<&RolloutRecord> {
    reply.rollouts.first()
}

pub fn rollout(ui: &Ui, reply: &HistoryReply) -> Markup {
    let Some(r) = record(reply) else {
        return message(StatusCode::NOT_FOUND, "no such rollout");
    };
    let live = LIVE_STATES.contains(&r.state.as_str());
    let body = html! {
        dl.figures {
            dt { "App" } dd { (r.app) }
            dt { "Version" } dd { (r.version) }
            dt { "Environment" } dd { (r.environment) }
            dt { "Strategy" } dd { (r.strategy) }
            dt { "Started by" } dd { (r.operator) " at " (when(r.started_at_unix_ms)) }
            dt { "State" } dd #state aria-live="polite" { (state(&r.state)) }
            @if !r.reason.is_empty() { dt { "Reason" } dd { (r.reason) } }
        }
        @if live && ui.role >= convoy_common::identity::Role::Deployer {
            section aria-labelledby="actions" {
                h2 #actions { "Actions" }
                p { "Each asks you to confirm first." }
                ul.actions { @for a in ACTIONS {
                    li { a.button href=(format!("/rollouts/{}/confirm/{a}", r.id)) { (a) } }
                } }
            }
        }
        section aria-labelledby="plan-title" {
            h2 #plan-title { "Plan" }
            div #plan { @if live { p { "Waiting for the plan…" } } @else { p { "This rollout has ended; its hosts are below." } } }
        }
        section aria-labelledby="hosts-title" {
            h2 #hosts-title { "Hosts" }
            div #hosts { (rollout_hosts(reply)) }
        }
        section aria-labelledby="gates-title" {
            h2 #gates-title { "Gates" }
            div #gates { (gates(&reply.measurements)) }
        }
        section aria-labelledby="timeline-title" {
            h2 #timeline-title { "Timeline" }
            ol #timeline aria-live="polite" {
                @for e in &reply.events {
                    li { time { (when(e.at_unix_ms)) } " " (e.host) " " (e.step) " " (e.kind) @if !e.message.is_empty() { ": " (e.message) } }
                }
            }
        }
        @if live {
            div #verdict role="status" aria-live="assertive" {}
            script src="/assets/live.js" data-rollout=(r.id) {}
        } @else {
            div #verdict role="status" { "Final verdict: " (state(&r.state)) }
        }
    };
    layout(Some(ui), &format!("Rollout {}", r.id), "", body)
}

/// Each host's latest step and outcome (also fetched alone when the live
/// view reconnects).
pub fn rollout_hosts(reply: &HistoryReply) -> Markup {
    // A host has a record per operation (pre-staging, then its switch):
    // one row each, in the order they first appear.
    let mut hosts: Vec<&str> = Vec::new();
    let named = reply.hosts.iter().map(|h| h.host.as_str());
    for h in named.chain(reply.events.iter().map(|e| e.host.as_str())) {
        if !h.is_empty() && !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    html! {
        table #host-table {
            caption { "Each host's current step and outcome" }
            thead { tr { th scope="col" { "Host" } th scope="col" { "Step" } th scope="col" { "Outcome" } th scope="col" { "Detail" } } }
            tbody {
                @for h in hosts {
                    @let last = reply.events.iter().rev().find(|e| e.host == h);
                    @let done = reply.hosts.iter().find(|r| r.host == h && !r.outcome.is_empty() && switches(&r.op_id));
                    tr data-host=(h) {
                        th scope="row" { (h) }
                        td.step { @if let Some(e) = last { (e.step) " " (e.kind) } }
                        td.outcome { @if let Some(d) = done { (state(&d.outcome)) } @else { "in progress" } }
                        td.detail { @if let Some(d) = done { (d.reason) } @else if let Some(e) = last { (e.message) } }
                    }
                }
            }
        }
    }
}

/// Whether an operation changed what the host serves: pre-flight checks
/// and pre-staging did not, so their results are not the host's outcome.
fn switches(op_id: &str) -> bool {
    !op_id.contains(":stage:") && !op_id.contains(":preflight:")
}

/// The metric gates' measurements, one small chart per metric.
pub fn gates(ms: &[convoy_proto::Measurement]) -> Markup {
    let mut metrics: Vec<&str> = ms.iter().map(|m| m.metric.as_str()).collect();
    metrics.sort();
    metrics.dedup();
    html! {
        @if metrics.is_empty() { p { "No metric gate was measured." } }
        @for metric in metrics {
            @let points: Vec<&convoy_proto::Measurement> = ms.iter().filter(|m| m.metric == metric).collect();
            figure.gate {
                (chart::gate(metric, &points))
                figcaption {
                    (metric) ": "
                    @if let Some(last) = points.last() {
                        (last.verdict)
                        @if let Some(v) = last.value { ", " (v) }
                        @if let Some(b) = last.max { " (at most " (b) ")" }
                        @if let Some(b) = last.min { " (at least " (b) ")" }
                        @if !last.reason.is_empty() { " — " (last.reason) }
                    }
                }
            }
        }
    }
}

pub fn confirm(ui: &Ui, reply: &HistoryReply, action: &str) -> Markup {
    let Some(r) = record(reply) else {
        return message(StatusCode::NOT_FOUND, "no such rollout");
    };
    let what = match action {
        "pause" => "stops it before its next batch; the hosts already moved stay moved",
        "resume" => "lets it go on with its next batch",
        "abort" => "stops it before its next batch and rolls back the hosts it moved",
        "approve" => "lets it start (you must not be the operator who started it)",
        _ => "lets the canary go on to its next stage",
    };
    let body = html! {
        p { "Rollout " (rollout_link(r)) " of " (r.app) " " (r.version) " to " (r.environment) " is " (state(&r.state)) "." }
        p { strong { (action) } " " (what) "." }
        form method="post" action=(format!("/rollouts/{}/control", r.id)) {
            input type="hidden" name="action" value=(action);
            input type="hidden" name="csrf" value=(ui.csrf);
            button type="submit" autofocus { "Yes, " (action) " rollout " (r.id) }
            " "
            a href=(format!("/rollouts/{}", r.id)) { "No, go back" }
        }
    };
    layout(Some(ui), &format!("Confirm: {action}"), "", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_with_several_operations_has_one_row() {
        let record = |host: &str, op: &str| convoy_proto::HostRecord {
            host: host.into(),
            op_id: format!("r1:{op}:{host}"),
            outcome: "succeeded".into(),
            ..Default::default()
        };
        let reply = HistoryReply {
            hosts: vec![
                record("web1", "stage"),
                record("web2", "stage"),
                record("web1", "activate"),
            ],
            events: vec![convoy_proto::EventRecord {
                host: "web2".into(),
                step: "switch".into(),
                kind: "started".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let html = rollout_hosts(&reply).into_string();
        assert_eq!(html.matches("data-host=\"web1\"").count(), 1, "{html}");
        assert_eq!(html.matches("data-host=\"web2\"").count(), 1, "{html}");
        // web2 was only pre-staged: its outcome is not yet known.
        let web2 = html.split("data-host=\"web2\"").nth(1).unwrap();
        assert!(
            web2.contains("in progress") && web2.contains("switch started"),
            "{html}"
        );
    }

    #[test]
    fn states_are_words_with_a_symbol_not_colour_alone() {
        for (s, symbol, word) in [
            ("succeeded", "✓", "succeeded"),
            ("failed_restored", "✗", "failed restored"),
            ("rolled_back", "✗", "rolled back"),
            ("refused", "✗", "refused"),
            ("paused", "⏸", "paused"),
        ] {
            let html = state(s).into_string();
            assert!(html.contains(symbol) && html.contains(word), "{s}: {html}");
            assert!(
                html.contains("aria-hidden=\"true\""),
                "the symbol is not read out twice: {html}"
            );
        }
    }
}
