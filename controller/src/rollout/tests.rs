//! The engine against an in-process fleet whose hosts answer from a
//! script (succeed, fail, never answer, answer when released), with the
//! real SQLite store in a temporary directory. Booted hosts prove the
//! whole in `tests/`; these prove the rollout logic in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_common::analysis::Judgement;
use convoy_common::ops::{AppStatus, Health, OpId, OpKind, OpReport, Outcome, PreflightCheck, PreflightCommand};
use convoy_common::rollout::{Amount, Strategy};
use convoy_common::slots::{Slot, SlotState, SlotStatus};
use convoy_common::{AppName, Digest, HostName, Version};
use futures::future::BoxFuture;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::control::Action;
use super::events::{Done, Event, EventBody, Verdict};
use super::fleet::{Command, Fleet, FleetHost, OpWait};
use super::order::{DeployOrder, FailureBudget, RollbackOrder, Vanish};
use super::seams::{HostSteps, MetricSource, QueryError, RolloutRef, SlotAction};
use super::{Engine, EngineConfig};
use crate::db::{Db, Release};

const HOST_TIMEOUT: Duration = Duration::from_secs(120);

/// How a test host answers one kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Succeed,
    Fail,
    /// Never answers.
    Silent,
    /// Answers `Succeed` once the test releases it.
    Hold,
}

#[derive(Default)]
struct TestFleet {
    hosts: Mutex<Vec<FleetHost>>,
    script: Mutex<HashMap<(HostName, OpKind), Answer>>,
    /// Every operation sent, in order.
    sent: Mutex<Vec<OpId>>,
    /// Results not sent yet (silent or held hosts).
    held: Mutex<HashMap<OpId, oneshot::Sender<OpReport>>>,
    /// Pre-flight checks a host fails (all pass otherwise), and the
    /// pre-flights asked, in order.
    preflight_fails: Mutex<HashMap<HostName, PreflightCheck>>,
    preflights: Mutex<Vec<PreflightCommand>>,
    /// Blue-green hosts: blue runs 1.0.0 live; an activation readies
    /// green, a rollback finds blue warm. The promotions sent, in order.
    blue_green: bool,
    promoted: Mutex<Vec<(String, Slot)>>,
}

fn host(s: &str) -> HostName {
    HostName::new(s).unwrap()
}

fn app() -> AppName {
    AppName::new("demo").unwrap()
}

fn status(current: Option<&str>) -> AppStatus {
    AppStatus {
        current: current.map(|v| Version::new(v).unwrap()),
        health: Health::Healthy,
        ..AppStatus::empty(&app())
    }
}

fn report(op: &OpId, outcome: Outcome) -> OpReport {
    OpReport {
        op_id: op.to_string(),
        app: app(),
        version: Version::new("2.0.0").unwrap(),
        outcome,
        reason: if outcome.is_success() {
            String::new()
        } else {
            "health check failed".into()
        },
        restore_detail: String::new(),
        state: status(Some("2.0.0")),
    }
}

impl TestFleet {
    fn with_hosts(hosts: &[(&str, &[(&str, &str)])]) -> Arc<Self> {
        let fleet = TestFleet::default();
        *fleet.hosts.lock().unwrap() = hosts
            .iter()
            .map(|(name, labels)| {
                let mut l: BTreeMap<String, String> =
                    labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                l.entry("env".into()).or_insert_with(|| "staging".into());
                FleetHost {
                    name: host(name),
                    labels: l,
                    apps: [(app(), status(Some("1.0.0")))].into(),
                    connected: true,
                    protocol: convoy_common::ops::PROTOCOL,
                }
            })
            .collect();
        Arc::new(fleet)
    }

    fn answer(&self, h: &str, kind: OpKind, a: Answer) {
        self.script.lock().unwrap().insert((host(h), kind), a);
    }

    fn set_connected(&self, h: &str, connected: bool) {
        for x in self.hosts.lock().unwrap().iter_mut().filter(|x| x.name.as_str() == h) {
            x.connected = connected;
        }
    }

    /// Sends the held result of `h`'s operation of `kind`.
    fn release(&self, h: &str, kind: OpKind) {
        let mut held = self.held.lock().unwrap();
        let op = held
            .keys()
            .find(|op| op.host().as_str() == h && op.kind() == kind)
            .cloned();
        let op = op.expect("a held operation");
        let tx = held.remove(&op).unwrap();
        let _ = tx.send(report(&op, Outcome::Succeeded));
    }

    /// (kind, host) of every operation sent, in order.
    fn sent(&self) -> Vec<(OpKind, String)> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|op| (op.kind(), op.host().to_string()))
            .collect()
    }

    fn sent_of(&self, kind: OpKind) -> Vec<String> {
        self.sent()
            .into_iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, h)| h)
            .collect()
    }
}

impl Fleet for TestFleet {
    fn hosts(&self) -> Vec<FleetHost> {
        self.hosts.lock().unwrap().clone()
    }

    fn preflight<'a>(
        &'a self,
        h: &'a HostName,
        cmd: PreflightCommand,
    ) -> BoxFuture<'a, Result<Vec<PreflightCheck>, String>> {
        self.preflights.lock().unwrap().push(cmd);
        let answer = match self.preflight_fails.lock().unwrap().get(h) {
            Some(c) => vec![c.clone()],
            None => vec![PreflightCheck {
                name: "free space".into(),
                passed: true,
                detail: "plenty".into(),
            }],
        };
        Box::pin(async move { Ok(answer) })
    }

    fn connected(&self, h: &HostName) -> bool {
        self.hosts.lock().unwrap().iter().any(|x| x.name == *h && x.connected)
    }

    fn dispatch<'a>(&'a self, op: &'a OpId, command: Command) -> BoxFuture<'a, OpWait> {
        let kind = match command {
            Command::Stage(_) => OpKind::Stage,
            Command::Activate(_) => OpKind::Activate,
            Command::Rollback(_) => OpKind::Rollback,
            Command::Promote(_) if op.kind() == OpKind::SwitchBack => OpKind::SwitchBack,
            Command::Promote(_) => OpKind::Switch,
        };
        assert_eq!(kind, op.kind(), "the command matches its id");
        self.sent.lock().unwrap().push(op.clone());
        let (_events_tx, events) = tokio::sync::mpsc::channel(8);
        let (tx, result) = oneshot::channel();
        let answer = *self
            .script
            .lock()
            .unwrap()
            .get(&(op.host().clone(), kind))
            .unwrap_or(&Answer::Succeed);
        if let Command::Promote(p) = &command {
            self.promoted.lock().unwrap().push((op.host().to_string(), p.slot));
        }
        let mut done = report(op, Outcome::Succeeded);
        if self.blue_green {
            let slot = |slot, v: &str, state| SlotStatus {
                slot,
                version: Version::new(v).unwrap(),
                state,
                port: 8080,
            };
            done.state.slots = match kind {
                OpKind::Activate => vec![
                    slot(Slot::Blue, "1.0.0", SlotState::Live),
                    slot(Slot::Green, "2.0.0", SlotState::Ready),
                ],
                OpKind::Rollback => vec![
                    slot(Slot::Blue, "1.0.0", SlotState::Ready),
                    slot(Slot::Green, "2.0.0", SlotState::Live),
                ],
                _ => vec![],
            };
        }
        match answer {
            Answer::Succeed => drop(tx.send(done)),
            Answer::Fail => drop(tx.send(report(op, Outcome::FailedRestored))),
            Answer::Silent | Answer::Hold => drop(self.held.lock().unwrap().insert(op.clone(), tx)),
        }
        Box::pin(async move { OpWait { events, result } })
    }

    fn forget(&self, _: &OpId) {}
}

/// Records the host steps' calls; draining the hosts named fails.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    unreachable: Vec<String>,
}

impl HostSteps for Recorder {
    fn before_activate<'a>(&'a self, r: &'a RolloutRef, h: &'a HostName) -> BoxFuture<'a, Result<String, String>> {
        assert_eq!((r.app.as_str(), r.env.as_str()), ("demo", "staging"));
        assert_eq!(r.id.len(), 12);
        self.calls.lock().unwrap().push(format!("drain {h}"));
        let fail = self.unreachable.contains(&h.to_string());
        let said = format!("drained {h}");
        Box::pin(async move {
            match fail {
                true => Err("haproxy runtime API at 127.0.0.1:9999: Connection refused".into()),
                false => Ok(said),
            }
        })
    }

    fn after_activate<'a>(
        &'a self,
        _: &'a RolloutRef,
        h: &'a HostName,
        ok: bool,
    ) -> BoxFuture<'a, Result<String, String>> {
        self.calls.lock().unwrap().push(format!("ready {h} {ok}"));
        Box::pin(async { Ok(String::new()) })
    }

    fn check<'a>(&'a self, _: &'a RolloutRef, h: &'a HostName) -> BoxFuture<'a, Result<String, String>> {
        self.calls.lock().unwrap().push(format!("check {h}"));
        Box::pin(async { Ok("known".into()) })
    }

    fn slots<'a>(&'a self, _: &'a RolloutRef, h: &'a HostName, a: SlotAction) -> BoxFuture<'a, Result<String, String>> {
        let said = match a {
            SlotAction::Isolate => format!("isolate {h}"),
            SlotAction::Switch { from, to } => format!("switch {h} {from:?} -> {to}"),
        };
        self.calls.lock().unwrap().push(said.clone());
        let fail = self.unreachable.contains(&h.to_string()) && matches!(a, SlotAction::Switch { to: Slot::Green, .. });
        Box::pin(async move {
            match fail {
                true => Err("haproxy does not see web/web2-green up after 30s (status DOWN)".into()),
                false => Ok(said),
            }
        })
    }
}

type Answerer = dyn Fn(&str) -> Result<Option<f64>, QueryError> + Send + Sync;

/// Metric values computed from the query text (which names the hosts).
struct Gauge {
    answer: Box<Answerer>,
    asked: Mutex<Vec<String>>,
}

impl Gauge {
    fn new(answer: impl Fn(&str) -> Result<Option<f64>, QueryError> + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Gauge {
            answer: Box::new(answer),
            asked: Mutex::new(vec![]),
        })
    }
}

impl MetricSource for Gauge {
    fn query<'a>(&'a self, q: &'a str) -> BoxFuture<'a, Result<Option<f64>, QueryError>> {
        self.asked.lock().unwrap().push(q.to_owned());
        let r = (self.answer)(q);
        Box::pin(async move { r })
    }
}

struct Bed {
    engine: Arc<Engine>,
    fleet: Arc<TestFleet>,
    db: Arc<Db>,
    stop: CancellationToken,
    dir: tempfile::TempDir,
}

const SPEC: &str = r#"
name = "demo"
install_path = "/opt/demo"
units = ["demo.service"]
environments = ["staging", "production"]
"#;

async fn bed(hosts: &[(&str, &[(&str, &str)])], spec_extra: &str) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    std::fs::write(dir.path().join("apps/demo.toml"), format!("{SPEC}\n{spec_extra}")).unwrap();
    let db = Arc::new(Db::open(&dir.path().join("convoy.db")).unwrap());
    let release = Release {
        digest: Digest::of_bytes(b"artifact"),
        size: 8,
        signature: None,
    };
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        db.add_release(&app(), &Version::new(v).unwrap(), &release, "operator:alice")
            .await
            .unwrap();
    }
    let fleet = TestFleet::with_hosts(hosts);
    let stop = CancellationToken::new();
    let engine = engine_on(&dir, fleet.clone(), db.clone(), stop.clone(), None);
    Bed {
        engine,
        fleet,
        db,
        stop,
        dir,
    }
}

fn engine_on(
    dir: &tempfile::TempDir,
    fleet: Arc<TestFleet>,
    db: Arc<Db>,
    stop: CancellationToken,
    steps: Option<Arc<Recorder>>,
) -> Arc<Engine> {
    let tasks = TaskTracker::new();
    let mut engine = Engine::new(
        EngineConfig {
            apps_dir: dir.path().join("apps"),
            host_timeout: HOST_TIMEOUT,
            prestage_parallel: 4,
            reconnect_grace: Duration::from_secs(5),
        },
        fleet,
        db,
        crate::webhooks::Notifier::new(vec![], None, tasks.clone()),
        stop,
        tasks,
    );
    if let Some(r) = steps {
        engine = engine.with_steps(r);
    }
    Arc::new(engine)
}

const WEB4: &[(&str, &[(&str, &str)])] = &[("web1", &[]), ("web2", &[]), ("web3", &[]), ("web4", &[])];

fn order() -> DeployOrder {
    DeployOrder {
        app: app(),
        version: Version::new("2.0.0").unwrap(),
        env: "staging".into(),
        strategy: Strategy::from_flags("rolling", None, None, None).unwrap(),
        failure_budget: FailureBudget(None),
        select: BTreeMap::new(),
        order: vec![],
        canary_group: BTreeMap::new(),
        hotfix: None,
        rollback_on_halt: true,
        manual_promote: false,
        vanish: Vanish::default(),
        admin: false,
        blue_green: false,
        config_revision: None,
    }
}

fn budget(s: &str) -> FailureBudget {
    FailureBudget(Some(Amount::parse(s).unwrap()))
}

/// The rollout's events until it is done.
async fn finish(mut rx: broadcast::Receiver<Event>) -> (Vec<Event>, Done) {
    let mut seen = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(3600), rx.recv())
            .await
            .expect("the rollout ends")
            .expect("events");
        if let EventBody::Done(d) = &e.body {
            let d = d.clone();
            seen.push(e);
            return (seen, d);
        }
        seen.push(e);
    }
}

fn names(hosts: &[HostName]) -> Vec<&str> {
    hosts.iter().map(|h| h.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn a_rolling_deploy_halts_at_the_first_failure_and_rolls_back_what_moved() {
    let b = bed(WEB4, "").await;
    b.fleet.answer("web3", OpKind::Activate, Answer::Fail);
    let (_, done) = finish(b.engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::RolledBack);
    assert_eq!(done.failed_host.as_ref().map(|h| h.as_str()), Some("web3"));
    assert_eq!(names(&done.rolled_back_hosts), ["web1", "web2"]);
    assert_eq!(names(&done.untouched_hosts), ["web4"]);
    assert_eq!(b.fleet.sent_of(OpKind::Stage), ["web1", "web2", "web3", "web4"]);
    assert_eq!(
        b.fleet.sent_of(OpKind::Activate),
        ["web1", "web2", "web3"],
        "host by host, none after the failure"
    );
    let mut rolled = b.fleet.sent_of(OpKind::Rollback);
    rolled.sort();
    assert_eq!(rolled, ["web1", "web2"]);
}

#[tokio::test(start_paused = true)]
async fn the_failure_budget_is_a_count_or_a_percentage_of_the_targets() {
    // (budget, failing hosts, verdict, hosts activated)
    let cases: &[(Option<&str>, &[&str], Verdict, usize)] = &[
        (None, &["web2"], Verdict::RolledBack, 2),
        (Some("1"), &["web2"], Verdict::Succeeded, 4),
        (Some("1"), &["web2", "web3"], Verdict::RolledBack, 3),
        (Some("25%"), &["web1"], Verdict::Succeeded, 4),
        (Some("25%"), &["web1", "web4"], Verdict::RolledBack, 4),
        (Some("50%"), &["web1", "web4"], Verdict::Succeeded, 4),
    ];
    for (limit, failing, verdict, activated) in cases {
        let b = bed(WEB4, "").await;
        for h in *failing {
            b.fleet.answer(h, OpKind::Activate, Answer::Fail);
        }
        let o = DeployOrder {
            failure_budget: limit.map(budget).unwrap_or_default(),
            ..order()
        };
        let (_, done) = finish(b.engine.start_deploy("operator:alice", o).await.unwrap()).await;
        let case = format!("budget {limit:?}, failing {failing:?}: {done:?}");
        assert_eq!(done.verdict, *verdict, "{case}");
        assert_eq!(b.fleet.sent_of(OpKind::Activate).len(), *activated, "{case}");
        if *verdict == Verdict::Succeeded {
            assert_eq!(names(&done.failed_hosts), *failing, "{case}");
            assert!(done.reason.contains("within the failure budget"), "{case}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn no_rollback_leaves_the_moved_hosts_where_they_are() {
    let b = bed(WEB4, "").await;
    b.fleet.answer("web2", OpKind::Activate, Answer::Fail);
    let o = DeployOrder {
        rollback_on_halt: false,
        ..order()
    };
    let (_, done) = finish(b.engine.start_deploy("operator:alice", o).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Failed);
    assert!(done.rolled_back_hosts.is_empty());
    assert!(b.fleet.sent_of(OpKind::Rollback).is_empty());
}

#[tokio::test(start_paused = true)]
async fn select_and_order_choose_and_sequence_the_targets() {
    let hosts: &[(&str, &[(&str, &str)])] = &[
        ("web1", &[("role", "web")]),
        ("web2", &[("role", "web")]),
        ("db1", &[("role", "db")]),
        ("web3", &[("role", "web")]),
    ];
    let b = bed(hosts, "").await;
    let o = DeployOrder {
        select: [("role".to_owned(), "web".to_owned())].into(),
        order: vec![host("web3")],
        ..order()
    };
    let (events, done) = finish(b.engine.start_deploy("operator:alice", o).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded);
    assert_eq!(b.fleet.sent_of(OpKind::Activate), ["web3", "web1", "web2"]);
    let EventBody::Plan(plan) = &events[0].body else {
        panic!("the plan comes first")
    };
    assert_eq!(names(&plan.hosts), ["web3", "web1", "web2"]);
    // An --order naming a host outside the selection is refused.
    let o = DeployOrder {
        select: [("role".to_owned(), "web".to_owned())].into(),
        order: vec![host("db1")],
        ..order()
    };
    let e = b.engine.start_deploy("operator:alice", o).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("--order names db1, which is not a connected target"),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_host_that_never_answers_fails_after_the_host_timeout() {
    let b = bed(&WEB4[..2], "").await;
    b.fleet.answer("web2", OpKind::Activate, Answer::Silent);
    let started = tokio::time::Instant::now();
    let (_, done) = finish(b.engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::RolledBack);
    assert!(done.reason.contains("web2 did not finish within 2m"), "{}", done.reason);
    assert!(started.elapsed() >= HOST_TIMEOUT);
    assert_eq!(names(&done.rolled_back_hosts), ["web1"]);
}

#[tokio::test(start_paused = true)]
async fn aborting_a_rollout_awaiting_approval_cancels_it_and_is_no_failed_change() {
    let b = bed(WEB4, "approval = [\"staging\"]").await;
    let rx = b.engine.start_deploy("operator:alice", order()).await.unwrap();
    let id = rx_id(&b, &rx).await;
    wait_state(&b.db, &id, "awaiting_approval").await;
    let e = b
        .engine
        .control(&id, Action::Approve, "operator:alice")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot approve it"), "{e}");
    assert_eq!(
        b.engine.control(&id, Action::Abort, "operator:bob").await.unwrap(),
        "aborted before it started"
    );
    let (_, done) = finish(rx).await;
    assert_eq!(done.verdict, Verdict::Cancelled);
    assert!(b.fleet.sent().is_empty(), "no host was sent anything");
    assert_eq!(b.db.rollout(&id).await.unwrap().unwrap().state, "cancelled");
    let report = b.db.report(&app(), 0, convoy_common::ops::now_unix_ms()).await.unwrap();
    assert_eq!(
        (report.deploys, report.failed_deploys),
        (0, 0),
        "not counted as a change"
    );
}

/// The controller of `b` stops and a new one starts on the same store
/// with `hosts`, reading the freezes and then the leases as a starting
/// controller does: it resumes rollout `id`. Its fleet, engine, and the
/// resumed rollout's events.
async fn restarted(
    b: &Bed,
    rx: broadcast::Receiver<Event>,
    hosts: &[(&str, &[(&str, &str)])],
    id: &str,
) -> (Arc<TestFleet>, Arc<Engine>, broadcast::Receiver<Event>) {
    b.stop.cancel();
    drop(rx);
    // Its rollout tasks end and let their leases' fences go.
    while !b.db.held().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fleet = TestFleet::with_hosts(hosts);
    let engine = engine_on(&b.dir, fleet.clone(), b.db.clone(), CancellationToken::new(), None);
    engine.load_freezes().await.unwrap();
    engine.keep_leases().await;
    let rx = engine.watch(id).await.expect("resumed");
    (fleet, engine, rx)
}

/// A deploy on two hosts whose first activation is under way when
/// staging freezes: it waits, frozen, before its second batch.
async fn frozen_mid_deploy(b: &Bed) -> (broadcast::Receiver<Event>, String) {
    b.fleet.answer("web1", OpKind::Activate, Answer::Hold);
    let rx = b.engine.start_deploy("operator:alice", order()).await.unwrap();
    let id = rx_id(b, &rx).await;
    while b.fleet.sent_of(OpKind::Activate).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.engine
        .freeze("operator:root", "staging", "incident 4711", None)
        .await
        .unwrap();
    b.fleet.release("web1", OpKind::Activate);
    wait_state(&b.db, &id, "frozen").await;
    (rx, id)
}

async fn rx_id(b: &Bed, _rx: &broadcast::Receiver<Event>) -> String {
    b.db.running_rollouts()
        .await
        .unwrap()
        .last()
        .expect("a running rollout")
        .0
        .id
        .clone()
}

async fn wait_state(db: &Db, id: &str, state: &str) {
    for _ in 0..1000 {
        if db.rollout(id).await.unwrap().is_some_and(|r| r.state == state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("rollout {id} never reached {state}");
}

const ANALYSIS: &str = r#"
[analysis]
interval = "10s"
failure_limit = 2

[[analysis.metrics]]
name = "error-rate"
query = 'errors{host=~"{{hosts}}"}'
max = 0.05
"#;

/// An engine that measures metric gates on `gauge`.
fn with_gauge(b: &Bed, gauge: Arc<Gauge>) -> Arc<Engine> {
    let tasks = TaskTracker::new();
    let engine = Engine::new(
        EngineConfig {
            apps_dir: b.dir.path().join("apps"),
            host_timeout: HOST_TIMEOUT,
            prestage_parallel: 4,
            reconnect_grace: Duration::from_secs(5),
        },
        b.fleet.clone(),
        b.db.clone(),
        crate::webhooks::Notifier::new(vec![], None, tasks.clone()),
        b.stop.clone(),
        tasks,
    )
    .with_metrics(gauge);
    Arc::new(engine)
}

#[tokio::test(start_paused = true)]
async fn a_breaching_metric_halts_the_rollout_and_rolls_back_what_moved() {
    let b = bed(WEB4, ANALYSIS).await;
    // web2's release fails a fifth of its requests.
    let gauge = Gauge::new(|q| Ok(Some(if q.contains("web2") { 0.2 } else { 0.0 })));
    let engine = with_gauge(&b, gauge.clone());
    let (events, done) = finish(engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::RolledBack);
    assert_eq!(
        done.reason,
        "metric gates after batch 2: metric error-rate failed 2 measurement(s) (failure_limit 2): 0.2 is above the maximum 0.05"
    );
    assert_eq!(names(&done.rolled_back_hosts), ["web1", "web2"]);
    assert_eq!(names(&done.untouched_hosts), ["web3", "web4"]);
    // Every measurement is streamed and kept.
    let streamed: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Measurement(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    let id = &events[0].rollout_id;
    let kept = b.db.measurements(id).await.unwrap();
    assert_eq!(streamed, kept);
    assert_eq!(kept[0].judgement, Judgement::Before, "{kept:?}");
    assert_eq!(kept[0].query, r#"errors{host=~"web1|web2|web3|web4"}"#);
    let failed: Vec<_> = kept.iter().filter(|m| m.judgement == Judgement::Fail).collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(names(&failed[0].hosts), ["web1", "web2"]);
    assert_eq!(failed[0].value, Some(0.2));

    // Control case: the same rollout with a release that serves well completes.
    let b2 = bed(WEB4, ANALYSIS).await;
    let engine = with_gauge(&b2, Gauge::new(|_| Ok(Some(0.0))));
    let (_, done) = finish(engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded, "{}", done.reason);
}

#[tokio::test(start_paused = true)]
async fn a_query_prometheus_refuses_stops_the_rollout_before_any_host_is_touched() {
    let b = bed(WEB4, ANALYSIS).await;
    let engine = with_gauge(
        &b,
        Gauge::new(|_| {
            Err(QueryError::Refused(
                "bad_data: 1:8: parse error: unexpected \"}\"".into(),
            ))
        }),
    );
    let (_, done) = finish(engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Failed);
    assert!(done.nothing_changed);
    assert!(
        done.reason.starts_with(
            "refused before any host was touched: analysis: metric error-rate: Prometheus refused the query"
        ),
        "{}",
        done.reason
    );
    assert!(b.fleet.sent().is_empty(), "{:?}", b.fleet.sent());
}

#[tokio::test(start_paused = true)]
async fn too_few_requests_hold_the_rollout_then_halt_it() {
    let spec = ANALYSIS.replace(
        "failure_limit = 2",
        "failure_limit = 2\ninconclusive_limit = 3\nrequests_query = 'requests{host=~\"{{hosts}}\"}'\nmin_requests = 100",
    );
    let b = bed(&WEB4[..2], &spec).await;
    let engine = with_gauge(
        &b,
        Gauge::new(|q| Ok(Some(if q.starts_with("requests") { 4.0 } else { 0.0 }))),
    );
    let (events, done) = finish(engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::RolledBack);
    assert!(
        done.reason
            .starts_with("metric gates after batch 1: 3 inconclusive round(s) in a row"),
        "{}",
        done.reason
    );
    // Held at batch 1: web2 was never sent its activation.
    assert_eq!(names(&done.untouched_hosts), ["web2"]);
    assert!(!events
        .iter()
        .any(|e| matches!(&e.body, EventBody::Note(n) if n.starts_with("batch 2/2"))));
}

#[tokio::test(start_paused = true)]
async fn a_breach_while_watching_after_the_last_batch_rolls_every_host_back() {
    let spec = ANALYSIS.replace("failure_limit = 2", "failure_limit = 1\nwatch_after = \"5m\"");
    let b = bed(&WEB4[..3], &spec).await;
    // The new release degrades two minutes after its last host moved.
    let start = tokio::time::Instant::now();
    let degraded_after = Arc::new(Mutex::new(None::<tokio::time::Instant>));
    let d = degraded_after.clone();
    let gauge = Gauge::new(move |q| {
        let all = q.contains("web1|web2|web3");
        let mut d = d.lock().unwrap();
        if all && d.is_none() && start.elapsed() > Duration::ZERO {
            *d = Some(tokio::time::Instant::now() + Duration::from_secs(120));
        }
        let bad = d.is_some_and(|t| tokio::time::Instant::now() >= t);
        Ok(Some(if bad { 0.3 } else { 0.0 }))
    });
    let engine = with_gauge(&b, gauge);
    let (events, done) = finish(engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::RolledBack, "{}", done.reason);
    assert!(
        done.reason
            .starts_with("metric gates while watching after the last batch: metric error-rate failed 1"),
        "{}",
        done.reason
    );
    assert_eq!(names(&done.rolled_back_hosts), ["web1", "web2", "web3"]);
    assert!(events.iter().any(
        |e| matches!(&e.body, EventBody::Note(n) if n == "every batch is done; watching the metric gates for 5m")
    ));
}

#[tokio::test(start_paused = true)]
async fn a_spec_with_metric_gates_needs_a_metric_source() {
    let b = bed(WEB4, ANALYSIS).await;
    let err = b
        .engine
        .start_deploy("operator:alice", order())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no prometheus_url"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn host_steps_run_around_every_activation() {
    let b = bed(&WEB4[..3], "").await;
    b.fleet.answer("web2", OpKind::Activate, Answer::Fail);
    let recorder = Arc::new(Recorder::default());
    let engine = engine_on(
        &b.dir,
        b.fleet.clone(),
        b.db.clone(),
        b.stop.clone(),
        Some(recorder.clone()),
    );
    let o = DeployOrder {
        failure_budget: budget("1"),
        ..order()
    };
    let (_, done) = finish(engine.start_deploy("operator:alice", o).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded);
    assert_eq!(
        *recorder.calls.lock().unwrap(),
        [
            "drain web1",
            "ready web1 true",
            "drain web2",
            "ready web2 false",
            "drain web3",
            "ready web3 true",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn abort_ends_the_wait_for_a_vanished_host() {
    let b = bed(&WEB4[..2], "").await;
    b.fleet.answer("web1", OpKind::Activate, Answer::Silent);
    let o = DeployOrder {
        vanish: Vanish {
            wait: true,
            deadline: Duration::from_secs(60),
        },
        ..order()
    };
    let mut rx = b.engine.start_deploy("operator:alice", o).await.unwrap();
    let id = rx_id(&b, &rx).await;
    // The host drops away during its activation.
    loop {
        if let EventBody::Note(n) = rx.recv().await.unwrap().body {
            if n.starts_with("batch 1/2") {
                break;
            }
        }
    }
    b.fleet.set_connected("web1", false);
    // Long past the host timeout: a vanished host is waited for.
    tokio::time::sleep(HOST_TIMEOUT * 3).await;
    assert_eq!(b.db.rollout(&id).await.unwrap().unwrap().state, "running");
    b.engine.control(&id, Action::Abort, "operator:bob").await.unwrap();
    let (_, done) = finish(rx).await;
    assert_eq!(done.verdict, Verdict::Failed);
    assert_eq!(
        done.reason,
        "aborted by operator:bob while waiting for web1 to come back"
    );
    assert_eq!(b.fleet.sent_of(OpKind::Activate), ["web1"]);
}

#[tokio::test(start_paused = true)]
async fn paused_and_awaiting_approval_rollouts_survive_a_controller_restart() {
    // Paused: web1's activation is under way when an operator pauses.
    let b = bed(&WEB4[..2], "").await;
    b.fleet.answer("web1", OpKind::Activate, Answer::Hold);
    let rx = b.engine.start_deploy("operator:alice", order()).await.unwrap();
    let id = rx_id(&b, &rx).await;
    while b.fleet.sent_of(OpKind::Activate).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        b.engine.control(&id, Action::Pause, "operator:bob").await.unwrap(),
        "pausing before its next batch"
    );
    b.fleet.release("web1", OpKind::Activate);
    wait_state(&b.db, &id, "paused").await;
    // The controller stops; a new one on the same store resumes.
    let (fleet, engine, rx) = restarted(&b, rx, &WEB4[..2], &id).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        b.db.rollout(&id).await.unwrap().unwrap().state,
        "paused",
        "still paused after the restart"
    );
    assert!(fleet.sent_of(OpKind::Activate).is_empty(), "nothing moves while paused");
    engine.control(&id, Action::Resume, "operator:bob").await.unwrap();
    let (_, done) = finish(rx).await;
    assert_eq!(done.verdict, Verdict::Succeeded);
    assert_eq!(
        fleet.sent_of(OpKind::Activate),
        ["web2"],
        "web1's recorded activation is not sent again"
    );

    // Awaiting approval.
    let b = bed(&WEB4[..1], "approval = [\"staging\"]").await;
    let rx = b.engine.start_deploy("operator:alice", order()).await.unwrap();
    let id = rx_id(&b, &rx).await;
    wait_state(&b.db, &id, "awaiting_approval").await;
    let (fleet, engine, rx) = restarted(&b, rx, &WEB4[..1], &id).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(b.db.rollout(&id).await.unwrap().unwrap().state, "awaiting_approval");
    assert!(fleet.sent().is_empty());
    let e = engine
        .control(&id, Action::Approve, "operator:alice")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("cannot approve it"),
        "the requester is remembered: {e}"
    );
    engine.control(&id, Action::Approve, "operator:carol").await.unwrap();
    let (_, done) = finish(rx).await;
    assert_eq!(done.verdict, Verdict::Succeeded);
    assert_eq!(b.db.rollout(&id).await.unwrap().unwrap().approved_by, "operator:carol");
}

/// A rollout held by a freeze is as alive as a paused one: a controller
/// that starts (or takes its lease over) drives it on once the freeze
/// lifts. It used to be left "frozen" for ever.
#[tokio::test(start_paused = true)]
async fn a_rollout_held_by_a_freeze_survives_a_controller_restart() {
    let b = bed(&WEB4[..2], "").await;
    let (rx, id) = frozen_mid_deploy(&b).await;
    let (fleet, engine, rx) = restarted(&b, rx, &WEB4[..2], &id).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(b.db.rollout(&id).await.unwrap().unwrap().state, "frozen");
    assert!(fleet.sent().is_empty(), "nothing moves while frozen");
    engine.unfreeze("operator:root", "staging").await.unwrap();
    let (_, done) = finish(rx).await;
    assert_eq!(done.verdict, Verdict::Succeeded);
    assert_eq!(
        fleet.sent_of(OpKind::Activate),
        ["web2"],
        "web1's activation is not sent again"
    );
}

#[tokio::test(start_paused = true)]
async fn one_rollout_at_a_time_per_app_and_environment() {
    let b = bed(&WEB4[..1], "").await;
    b.fleet.answer("web1", OpKind::Activate, Answer::Hold);
    let rx = b.engine.start_deploy("operator:alice", order()).await.unwrap();
    let e = b.engine.start_deploy("operator:bob", order()).await.unwrap_err();
    assert!(matches!(e, super::Refused::Busy(_)), "{e}");
    while b.fleet.sent_of(OpKind::Activate).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.fleet.release("web1", OpKind::Activate);
    finish(rx).await;
    // Once it ended, the slot is free again: a rollback may start, and is
    // refused before anything changes when a host lacks its target.
    let rollback = |to: &str| RollbackOrder {
        app: app(),
        env: "staging".into(),
        to: Some(Version::new(to).unwrap()),
        hosts: vec![],
        strategy: Strategy::AllAtOnce,
        failure_budget: FailureBudget(None),
    };
    let e = b
        .engine
        .start_rollback("operator:bob", rollback("0.9.0"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "rollback refused, nothing was changed: demo 0.9.0 was never pushed"
    );
    let e = b
        .engine
        .start_rollback("operator:bob", rollback("3.0.0"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "rollback refused, nothing was changed: web1 no longer holds demo 3.0.0"
    );
    let (_, done) = finish(
        b.engine
            .start_rollback("operator:bob", rollback("1.0.0"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(done.verdict, Verdict::Succeeded);
    assert_eq!(b.fleet.sent_of(OpKind::Rollback), ["web1"], "the rollback's switch");
}

fn rollback_to(to: &str, strategy: Strategy) -> RollbackOrder {
    RollbackOrder {
        app: app(),
        env: "staging".into(),
        to: Some(Version::new(to).unwrap()),
        hosts: vec![],
        strategy,
        failure_budget: FailureBudget(None),
    }
}

#[tokio::test(start_paused = true)]
async fn a_rollback_host_by_host_halts_at_the_first_host_that_fails() {
    let b = bed(WEB4, "").await;
    for h in ["web1", "web2", "web3", "web4"] {
        b.fleet.answer(h, OpKind::Rollback, Answer::Fail);
    }
    let rolling = Strategy::from_flags("rolling", Some("1"), None, None).unwrap();
    let (events, done) = finish(
        b.engine
            .start_rollback("operator:alice", rollback_to("1.0.0", rolling))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(done.verdict, Verdict::Failed);
    assert_eq!(done.failed_host.as_ref().map(|h| h.as_str()), Some("web1"));
    assert_eq!(names(&done.untouched_hosts), ["web2", "web3", "web4"]);
    assert_eq!(
        b.fleet.sent_of(OpKind::Rollback),
        ["web1"],
        "halted after the first host"
    );
    let EventBody::Plan(plan) = &events[0].body else {
        panic!("the plan comes first")
    };
    assert_eq!(plan.batches.len(), 4);
    // Control case: the default, all at once, takes every host down together.
    let b = bed(WEB4, "").await;
    for h in ["web1", "web2", "web3", "web4"] {
        b.fleet.answer(h, OpKind::Rollback, Answer::Fail);
    }
    let (_, done) = finish(
        b.engine
            .start_rollback("operator:alice", rollback_to("1.0.0", Strategy::AllAtOnce))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(done.verdict, Verdict::Failed);
    assert_eq!(b.fleet.sent_of(OpKind::Rollback).len(), 4);
    assert_eq!(done.failed_hosts.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_rollout_refused_at_pre_staging_changed_nothing() {
    let b = bed(WEB4, "").await;
    b.fleet.answer("web3", OpKind::Stage, Answer::Fail);
    let (_, done) = finish(b.engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Failed);
    assert!(done.nothing_changed);
    assert!(b.fleet.sent_of(OpKind::Activate).is_empty());
    assert!(done.reason.starts_with("pre-staging: "), "{}", done.reason);
    // Once a host was sent its activation, something changed.
    let b = bed(WEB4, "").await;
    b.fleet.answer("web1", OpKind::Activate, Answer::Fail);
    let (_, done) = finish(b.engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert!(!done.nothing_changed);
}

#[tokio::test(start_paused = true)]
async fn a_freeze_refuses_new_deploys_and_holds_running_ones_before_their_next_batch() {
    let b = bed(&[("web1", &[]), ("web2", &[]), ("web3", &[("env", "production")])], "").await;
    // A running rollout: web1's activation is under way when staging freezes.
    let (rx, _) = frozen_mid_deploy(&b).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        b.fleet.sent_of(OpKind::Activate),
        ["web1"],
        "nothing moves while frozen"
    );

    // New deploys are refused, naming who froze it and why.
    let mut o = order();
    o.env = "production".into();
    b.engine
        .freeze("operator:root", "production", "incident 4711", None)
        .await
        .unwrap();
    let e = b.engine.start_deploy("operator:bob", o.clone()).await.unwrap_err();
    assert!(matches!(e, super::Refused::Precondition(_)), "{e}");
    assert!(
        e.to_string()
            .starts_with("production is frozen by operator:root since "),
        "{e}"
    );
    assert!(e.to_string().contains(": incident 4711; nothing was changed"), "{e}");
    // A deployer's hotfix does not pass; an admin's does, and is audited.
    o.hotfix = Some("fix for 4711".into());
    let e = b.engine.start_deploy("operator:bob", o.clone()).await.unwrap_err();
    assert!(matches!(e, super::Refused::Permission(_)), "{e}");
    o.admin = true;
    let (events, done) = finish(b.engine.start_deploy("operator:root", o).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded, "{}", done.reason);
    assert!(events
        .iter()
        .any(|e| matches!(&e.body, EventBody::Note(n) if n.starts_with("hotfix by operator:root passes: production is frozen"))));
    let audit = b.db.audit_log(10).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(actions, ["hotfix_pass", "freeze", "freeze"]);
    assert!(
        audit[0].detail.contains("(hotfix: fix for 4711)"),
        "{}",
        audit[0].detail
    );

    // Unfreezing lets the held rollout go on.
    b.engine.unfreeze("operator:root", "staging").await.unwrap();
    let (events, done) = finish(rx).await;
    assert_eq!(done.verdict, Verdict::Succeeded);
    assert!(events
        .iter()
        .any(|e| matches!(&e.body, EventBody::Note(n) if n == "staging is no longer frozen; going on")));
    assert!(
        b.engine.unfreeze("operator:root", "staging").await.is_err(),
        "not frozen any more"
    );
}

#[tokio::test(start_paused = true)]
async fn a_freeze_with_an_end_lifts_itself_and_rollbacks_are_never_held() {
    let b = bed(&WEB4[..1], "").await;
    finish(b.engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    b.engine
        .freeze(
            "operator:root",
            "staging",
            "maintenance",
            Some(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    // The end is wall-clock time; it comes within a few milliseconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !b.engine.freezes().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the freeze never expired");
        std::thread::yield_now();
    }
    b.engine
        .freeze("operator:root", "staging", "incident", None)
        .await
        .unwrap();
    let o = RollbackOrder {
        app: app(),
        env: "staging".into(),
        to: Some(Version::new("1.0.0").unwrap()),
        hosts: vec![],
        strategy: Strategy::AllAtOnce,
        failure_budget: FailureBudget(None),
    };
    let (_, done) = finish(b.engine.start_rollback("operator:alice", o).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded, "{}", done.reason);
}

#[tokio::test(start_paused = true)]
async fn deploys_start_only_inside_the_spec_windows() {
    let now = jiff::Timestamp::now().to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let today = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][now.weekday().to_monday_zero_offset() as usize];
    let other = ["Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "Mon"][now.weekday().to_monday_zero_offset() as usize];
    let b = bed(&WEB4[..1], &format!("windows = [\"{other} 00:00-24:00 UTC\"]")).await;
    let e = b
        .engine
        .start_deploy("operator:alice", order())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("outside demo's deploy windows ({other} 00:00-24:00 UTC)")),
        "{e}"
    );
    // Control case: a window that holds now.
    let b = bed(
        &WEB4[..1],
        &format!("windows = [\"{other} 00:00-24:00 UTC\", \"{today} 00:00-24:00 UTC\"]"),
    )
    .await;
    let (_, done) = finish(b.engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_failing_pre_flight_on_one_host_refuses_the_deploy_before_anything_moves() {
    let b = bed(&WEB4[..3], "[preflight]\nfree_space_margin = \"1MiB\"\n").await;
    b.fleet.preflight_fails.lock().unwrap().insert(
        host("web2"),
        PreflightCheck {
            name: "free space".into(),
            passed: false,
            detail: "2.0 MiB free on /var/lib/convoy, 9.0 MiB needed".into(),
        },
    );
    // web3 runs an agent from before pre-flight checks.
    b.fleet.hosts.lock().unwrap()[2].protocol = 0;
    let (events, done) = finish(b.engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Failed);
    assert!(done.nothing_changed);
    assert!(
        done.reason.starts_with(
            "pre-flight failed on 2 of 3 host(s), nothing was staged or switched: web2: free space (2.0 MiB free"
        ),
        "{}",
        done.reason
    );
    assert!(
        done.reason
            .contains("web3: agent protocol (the agent speaks protocol 0"),
        "{}",
        done.reason
    );
    assert!(b.fleet.sent().is_empty(), "nothing staged: {:?}", b.fleet.sent());
    let table = events.iter().find_map(|e| match &e.body {
        EventBody::Preflight(p) => Some(p.clone()),
        _ => None,
    });
    let table = table.expect("the checks are sent");
    assert_eq!(table.len(), 3);
    // The hosts are asked for the release's size plus the margin.
    let asked = b.fleet.preflights.lock().unwrap().clone();
    assert_eq!(asked.len(), 2, "web3 is not asked");
    assert_eq!(asked[0].needed_bytes, 8 + 8 + (1 << 20));
    assert_eq!(asked[0].units, ["demo.service"]);

    // Control case: with web2's space back and web3's agent upgraded, it goes.
    b.fleet.preflight_fails.lock().unwrap().clear();
    b.fleet.hosts.lock().unwrap()[2].protocol = convoy_common::ops::PROTOCOL;
    let (_, done) = finish(b.engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded, "{}", done.reason);
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_decides_what_the_deploy_then_does_and_changes_nothing() {
    let b = bed(WEB4, "approval = [\"production\"]").await;
    let o = DeployOrder {
        strategy: Strategy::from_flags("canary", None, Some("1,50%,100%"), Some(Duration::from_secs(60))).unwrap(),
        ..order()
    };
    let dry = b.engine.dry_run("operator:alice", &o).await.unwrap();
    assert!(dry.would_start());
    let names: Vec<&str> = dry.verdicts.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["freeze and windows", "metric gates", "promotion", "approval"]);
    assert_eq!(dry.preflight.len(), 4);
    assert!(b.fleet.sent().is_empty(), "no host was sent anything");
    assert!(
        b.db.history(&app(), &Default::default(), 10).await.unwrap().is_empty(),
        "no rollout recorded"
    );
    // The real deploy plans the same batches.
    let (events, done) = finish(b.engine.start_deploy("operator:alice", o.clone()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded);
    let EventBody::Plan(real) = &events[0].body else {
        panic!("the plan comes first")
    };
    let batches = |p: &super::events::Plan| -> Vec<Vec<String>> {
        p.batches
            .iter()
            .map(|b| b.hosts.iter().map(|h| h.to_string()).collect())
            .collect()
    };
    assert_eq!(batches(&dry.plan), batches(real));
    assert_eq!(batches(real), [vec!["web1"], vec!["web2"], vec!["web3", "web4"]]);

    // A deploy that would be refused says why, and still changes nothing.
    let mut p = o.clone();
    p.env = "production".into();
    let err = b.engine.dry_run("operator:alice", &p).await;
    // No production host: no deploy at all.
    assert!(err.is_err());
    b.engine
        .freeze("operator:root", "staging", "incident", None)
        .await
        .unwrap();
    let dry = b.engine.dry_run("operator:alice", &o).await.unwrap();
    assert!(!dry.would_start());
    assert!(matches!(&dry.verdicts[0], ("freeze and windows", Err(e)) if e.contains("incident")));
    assert_eq!(b.db.history(&app(), &Default::default(), 10).await.unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_host_the_balancer_cannot_drain_is_not_switched() {
    let b = bed(&WEB4[..2], "").await;
    let recorder = Arc::new(Recorder {
        unreachable: vec!["web1".into()],
        ..Default::default()
    });
    let engine = engine_on(
        &b.dir,
        b.fleet.clone(),
        b.db.clone(),
        b.stop.clone(),
        Some(recorder.clone()),
    );
    let (events, done) = finish(engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Failed);
    assert!(
        done.reason
            .starts_with("before activating web1: haproxy runtime API at 127.0.0.1:9999"),
        "{}",
        done.reason
    );
    assert!(b.fleet.sent_of(OpKind::Activate).is_empty(), "nothing switched");
    // The failed step is in the output and the history.
    assert!(events.iter().any(|e| matches!(&e.body,
        EventBody::Host { event, .. } if event.step == convoy_common::ops::Step::Traffic
            && event.kind == convoy_common::ops::EventKind::Failed)));
}

const BLUE_GREEN: &str = r#"
[blue_green]
blue_port = 8081
green_port = 8082
keep_warm = "10m"

[traffic]
kind = "command"
command = ["true"]
"#;

#[tokio::test(start_paused = true)]
async fn blue_green_switches_traffic_before_promoting_and_keeps_it_on_the_live_slot_when_it_cannot() {
    let mut b = bed(&WEB4[..2], "").await;
    std::fs::write(
        b.dir.path().join("apps/demo.toml"),
        format!("{}\n{BLUE_GREEN}", SPEC.replace("demo.service", "demo@.service")),
    )
    .unwrap();
    let mut fleet = TestFleet::with_hosts(&WEB4[..2]);
    Arc::get_mut(&mut fleet).unwrap().blue_green = true;
    b.fleet = fleet;
    let recorder = Arc::new(Recorder::default());
    let engine = engine_on(
        &b.dir,
        b.fleet.clone(),
        b.db.clone(),
        b.stop.clone(),
        Some(recorder.clone()),
    );
    let (_, done) = finish(engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::Succeeded, "{}", done.reason);
    // Each host: ready a slot, switch its traffic, then make it live; no drain.
    assert_eq!(
        b.fleet
            .sent()
            .into_iter()
            .filter(|(k, _)| *k != OpKind::Stage)
            .collect::<Vec<_>>(),
        [
            (OpKind::Activate, "web1".into()),
            (OpKind::Switch, "web1".into()),
            (OpKind::Activate, "web2".into()),
            (OpKind::Switch, "web2".into()),
        ]
    );
    let calls = recorder.calls.lock().unwrap().clone();
    assert!(
        calls.contains(&"switch web1 Some(Blue) -> green".to_owned()),
        "{calls:?}"
    );
    assert!(!calls.iter().any(|c| c.starts_with("drain")), "{calls:?}");
    assert_eq!(
        *b.fleet.promoted.lock().unwrap(),
        [("web1".into(), Slot::Green), ("web2".into(), Slot::Green)]
    );

    // Control case: web2's switch fails. Its traffic stays on blue, which
    // it is told is still live (green stops); the rollout halts and web1,
    // which moved, switches back to its warm slot.
    b.fleet.sent.lock().unwrap().clear();
    b.fleet.promoted.lock().unwrap().clear();
    let recorder = Arc::new(Recorder {
        unreachable: vec!["web2".into()],
        ..Default::default()
    });
    let engine = engine_on(
        &b.dir,
        b.fleet.clone(),
        b.db.clone(),
        b.stop.clone(),
        Some(recorder.clone()),
    );
    let (_, done) = finish(engine.start_deploy("operator:alice", order()).await.unwrap()).await;
    assert_eq!(done.verdict, Verdict::RolledBack, "{}", done.reason);
    assert!(
        done.reason
            .starts_with("switching web2 to slot green: haproxy does not see web/web2-green up"),
        "{}",
        done.reason
    );
    assert!(
        done.reason.ends_with("traffic stays on slot blue; slot green stopped"),
        "{}",
        done.reason
    );
    assert_eq!(
        *b.fleet.promoted.lock().unwrap(),
        [
            ("web1".into(), Slot::Green),
            ("web2".into(), Slot::Blue),
            ("web1".into(), Slot::Blue)
        ]
    );
    // web2 keeps blue, web1 switches back.
    assert_eq!(b.fleet.sent_of(OpKind::SwitchBack), ["web2", "web1"]);
    let calls = recorder.calls.lock().unwrap().clone();
    assert!(
        calls.contains(&"switch web1 Some(Green) -> blue".to_owned()),
        "{calls:?}"
    );
}
