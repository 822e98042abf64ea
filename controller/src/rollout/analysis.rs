//! Metric gates: while a deploy moves hosts, every metric of the app
//! spec's `[analysis]` is measured each interval, on the moved hosts and
//! on a baseline, and the measurements decide whether the rollout may go
//! on.
//!
//! - A round measures every metric once. It passes when every metric
//!   passes; it is inconclusive when too few requests were served (the
//!   spec's `min_requests`) or a baseline is missing; it fails otherwise.
//! - A batch goes on only after a round that started once it ended has
//!   passed: an inconclusive round holds the rollout where it is.
//! - The rollout halts when one metric has failed `failure_limit`
//!   measurements, or after `inconclusive_limit` inconclusive rounds in a
//!   row.
//! - The baseline of a comparison is the targets not yet moved; when none
//!   is left, the same query over every target before the rollout started
//!   (measured and recorded when it starts).
//!
//! Measurements run in a task of their own so that they go on during
//! activations and bakes; the rollout reads their verdicts from a watch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use convoy_common::analysis::{regex_of, render, AnalysisSpec, Judgement, Measurement, Metric, NoData};
use convoy_common::HostName;
use tokio::sync::{broadcast, watch};
use tokio_util::task::AbortOnDropHandle;

use super::events::{Event, EventBody};
use super::seams::{MetricSource, QueryError};
use super::store::RolloutStore;

/// The name the request floor's measurements carry.
pub const REQUESTS: &str = "requests";

/// What the rollout reads.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Rounds started so far.
    pub started: u64,
    /// The last round that passed (1-based; 0: none yet).
    pub last_pass: u64,
    /// Why the rollout must halt.
    pub breach: Option<String>,
}

/// Which hosts are measured now: the moved ones (and those activating),
/// and the ones that are the baseline.
#[derive(Debug, Clone, Default)]
pub struct Sides {
    pub moved: Vec<HostName>,
    pub baseline: Vec<HostName>,
}

/// The rollout an analysis is for.
pub struct Subject {
    pub app: String,
    pub env: String,
    pub version: String,
}

/// Renders queries and judges values; no I/O of its own.
pub struct Analyzer {
    pub spec: AnalysisSpec,
    subject: Subject,
    source: Arc<dyn MetricSource>,
    /// Each metric's value over every target before the rollout.
    before: HashMap<String, Option<f64>>,
}

impl Analyzer {
    pub fn new(spec: AnalysisSpec, subject: Subject, source: Arc<dyn MetricSource>) -> Self {
        Analyzer {
            spec,
            subject,
            source,
            before: HashMap::new(),
        }
    }

    /// `template` with its placeholders filled for `hosts`.
    pub fn render(&self, template: &str, hosts: &[HostName]) -> String {
        let names: Vec<String> = hosts
            .iter()
            .map(|h| render(&self.spec.host_pattern, &[("host", h.as_str())]))
            .collect();
        let regex = regex_of(&names);
        render(
            template,
            &[
                ("hosts", regex.as_str()),
                ("app", self.subject.app.as_str()),
                ("env", self.subject.env.as_str()),
                ("version", self.subject.version.as_str()),
            ],
        )
    }

    /// Measures every metric over all `targets` before anything moves: a
    /// query Prometheus refuses, or cannot be asked, refuses the rollout.
    /// Returns the values, recorded as the baseline of last resort.
    pub async fn prepare(&mut self, targets: &[HostName]) -> Result<Vec<Measurement>, String> {
        let mut out = Vec::new();
        let queries = self
            .spec
            .requests
            .iter()
            .map(|r| (REQUESTS.to_owned(), r.query.clone()))
            .chain(self.spec.metrics.iter().map(|m| (m.name.clone(), m.query.clone())));
        for (name, template) in queries.collect::<Vec<_>>() {
            let query = self.render(&template, targets);
            let value = self.source.query(&query).await.map_err(|e| match e {
                QueryError::Refused(why) => format!("metric {name}: Prometheus refused the query: {why}"),
                QueryError::Failed(why) => format!("metric {name}: could not ask Prometheus: {why}"),
            })?;
            self.before.insert(name.clone(), value);
            out.push(Measurement {
                at_ms: convoy_common::ops::now_unix_ms(),
                metric: name,
                hosts: targets.to_vec(),
                query,
                value,
                baseline: None,
                judgement: Judgement::Before,
                reason: "every target before the rollout".into(),
                max: None,
                min: None,
            });
        }
        Ok(out)
    }

    /// Takes back the values recorded before the rollout (when resuming).
    pub fn restore_before(&mut self, recorded: &[Measurement]) {
        for m in recorded.iter().filter(|m| m.judgement == Judgement::Before) {
            self.before.insert(m.metric.clone(), m.value);
        }
    }

    /// One round: every metric once. Nothing is measured while no host has moved.
    pub async fn round(&self, sides: &Sides) -> Vec<Measurement> {
        let mut out = Vec::new();
        if sides.moved.is_empty() {
            return out;
        }
        if let Some(floor) = &self.spec.requests {
            let query = self.render(&floor.query, &sides.moved);
            let (value, judgement, reason) = match self.source.query(&query).await {
                Ok(Some(v)) if v >= floor.min => (Some(v), Judgement::Pass, format!("at least {}", floor.min)),
                Ok(v) => (
                    v,
                    Judgement::Inconclusive,
                    format!("fewer than {} requests in the window", floor.min),
                ),
                Err(e) => (None, Judgement::Fail, e.to_string()),
            };
            out.push(self.measurement(REQUESTS, &sides.moved, query, value, None, judgement, reason));
            if judgement != Judgement::Pass {
                return out;
            }
        }
        for m in &self.spec.metrics {
            out.push(self.measure(m, sides).await);
        }
        out
    }

    async fn measure(&self, m: &Metric, sides: &Sides) -> Measurement {
        let query = self.render(&m.query, &sides.moved);
        let value = match self.source.query(&query).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                let (j, why) = match self.spec.no_data {
                    NoData::Pass => (Judgement::Pass, "no data (counts as a pass: no_data = \"pass\")"),
                    NoData::Fail => (Judgement::Fail, "no data (counts as a failure: no_data = \"fail\")"),
                };
                return self.measurement(&m.name, &sides.moved, query, None, None, j, why.into());
            }
            Err(e) => {
                return self.measurement(&m.name, &sides.moved, query, None, None, Judgement::Fail, e.to_string())
            }
        };
        let bound = |j: Judgement, why: String| (j, why);
        let (mut judgement, mut reason) = bound(Judgement::Pass, String::new());
        if let Some(max) = m.max.filter(|max| value > *max) {
            (judgement, reason) = bound(Judgement::Fail, format!("{} is above the maximum {max}", fmt(value)));
        } else if let Some(min) = m.min.filter(|min| value < *min) {
            (judgement, reason) = bound(Judgement::Fail, format!("{} is below the minimum {min}", fmt(value)));
        }
        let mut baseline = None;
        if let (Judgement::Pass, Some(limit)) = (judgement, m.max_ratio_to_baseline) {
            let (base, from) = if sides.baseline.is_empty() {
                (
                    self.before.get(&m.name).copied().flatten(),
                    "the targets before the rollout",
                )
            } else {
                let q = self.render(&m.query, &sides.baseline);
                match self.source.query(&q).await {
                    Ok(v) => (v, "the hosts not yet moved"),
                    Err(e) => {
                        let why = format!("baseline: {e}");
                        return self.measurement(&m.name, &sides.moved, query, Some(value), None, Judgement::Fail, why);
                    }
                }
            };
            baseline = base;
            (judgement, reason) = match base {
                None => (Judgement::Inconclusive, format!("no baseline value from {from}")),
                Some(b) => {
                    let b_eff = b.max(m.baseline_floor);
                    let over = if b_eff == 0.0 {
                        value > 0.0
                    } else {
                        value / b_eff > limit
                    };
                    if over {
                        let ratio = if b_eff == 0.0 {
                            "above a baseline of 0".to_owned()
                        } else {
                            format!("{:.2}× the baseline", value / b_eff)
                        };
                        (
                            Judgement::Fail,
                            format!("{} is {ratio} {} of {from} (at most {limit}×)", fmt(value), fmt(b)),
                        )
                    } else {
                        (Judgement::Pass, format!("baseline {} from {from}", fmt(b)))
                    }
                }
            };
        }
        let mut out = self.measurement(&m.name, &sides.moved, query, Some(value), baseline, judgement, reason);
        out.max = upper_bound(m, baseline);
        out.min = m.min;
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn measurement(
        &self,
        metric: &str,
        hosts: &[HostName],
        query: String,
        value: Option<f64>,
        baseline: Option<f64>,
        judgement: Judgement,
        reason: String,
    ) -> Measurement {
        Measurement {
            at_ms: convoy_common::ops::now_unix_ms(),
            metric: metric.to_owned(),
            hosts: hosts.to_vec(),
            query,
            value,
            baseline,
            judgement,
            reason,
            max: None,
            min: None,
        }
    }
}

/// The highest value of `m` that passes, given the baseline it was
/// compared with: `max`, or `max_ratio_to_baseline` times the baseline
/// (never below its floor), whichever is lower.
fn upper_bound(m: &Metric, baseline: Option<f64>) -> Option<f64> {
    let ratio = m
        .max_ratio_to_baseline
        .zip(baseline)
        .map(|(limit, b)| limit * b.max(m.baseline_floor));
    match (m.max, ratio) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A value as people read it: at most four significant decimals.
pub fn fmt(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_owned()
    }
}

/// Counts failures and inconclusive rounds; says when to halt.
#[derive(Default)]
pub struct Tally {
    failures: HashMap<String, u32>,
    inconclusive_streak: u32,
}

/// A round's overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundVerdict {
    Pass,
    Fail,
    Inconclusive,
    /// Nothing was measured (no host moved yet).
    Idle,
}

impl Tally {
    /// Adds a round; returns its verdict and, past a limit, why to halt.
    pub fn add(&mut self, spec: &AnalysisSpec, round: &[Measurement]) -> (RoundVerdict, Option<String>) {
        if round.is_empty() {
            return (RoundVerdict::Idle, None);
        }
        let mut breach = None;
        for m in round.iter().filter(|m| m.judgement == Judgement::Fail) {
            let n = self.failures.entry(m.metric.clone()).or_default();
            *n += 1;
            if *n >= spec.failure_limit && breach.is_none() {
                breach = Some(format!(
                    "metric {} failed {n} measurement(s) (failure_limit {}): {}",
                    m.metric, spec.failure_limit, m.reason
                ));
            }
        }
        let verdict = if round.iter().any(|m| m.judgement == Judgement::Fail) {
            RoundVerdict::Fail
        } else if round.iter().any(|m| m.judgement == Judgement::Inconclusive) {
            RoundVerdict::Inconclusive
        } else {
            RoundVerdict::Pass
        };
        if verdict == RoundVerdict::Inconclusive {
            self.inconclusive_streak += 1;
            if self.inconclusive_streak >= spec.inconclusive_limit && breach.is_none() {
                let why = round
                    .iter()
                    .find(|m| m.judgement == Judgement::Inconclusive)
                    .map(|m| format!("{}: {}", m.metric, m.reason))
                    .unwrap_or_default();
                breach = Some(format!(
                    "{} inconclusive round(s) in a row (inconclusive_limit {}): {why}",
                    self.inconclusive_streak, spec.inconclusive_limit
                ));
            }
        } else {
            self.inconclusive_streak = 0;
        }
        (verdict, breach)
    }
}

/// Where measurements go as they are taken.
pub struct Sink {
    pub store: Arc<dyn RolloutStore>,
    pub events: broadcast::Sender<Event>,
    pub rollout_id: String,
}

impl Sink {
    pub async fn record(&self, m: &Measurement) {
        if let Err(e) = self.store.record_measurement(&self.rollout_id, m).await {
            tracing::error!(rollout = %self.rollout_id, error = %e, "could not record a measurement");
        }
        tracing::info!(
            rollout = %self.rollout_id,
            metric = %m.metric,
            value = ?m.value,
            baseline = ?m.baseline,
            verdict = m.judgement.as_str(),
            "{}",
            m.reason
        );
        let _ = self.events.send(Event {
            rollout_id: self.rollout_id.clone(),
            body: EventBody::Measurement(m.clone()),
        });
    }
}

/// A running analysis: measures until dropped.
pub struct Running {
    pub sides: Arc<Mutex<Sides>>,
    pub status: watch::Receiver<Status>,
    pub interval: std::time::Duration,
    pub watch_after: std::time::Duration,
    _task: AbortOnDropHandle<()>,
}

impl Running {
    /// Starts measuring every interval.
    pub fn start(analyzer: Analyzer, sink: Sink) -> Self {
        let sides = Arc::new(Mutex::new(Sides::default()));
        let (tx, status) = watch::channel(Status::default());
        let interval = analyzer.spec.interval;
        let watch_after = analyzer.spec.watch_after;
        let task = tokio::spawn(measure_loop(analyzer, sink, sides.clone(), tx));
        Running {
            sides,
            status,
            interval,
            watch_after,
            _task: AbortOnDropHandle::new(task),
        }
    }

    pub fn set_sides(&self, sides: Sides) {
        *self.sides.lock().unwrap() = sides;
    }

    /// Waits for a round that starts from now on to pass; `Err` says why
    /// the rollout must halt.
    pub async fn passed(&mut self) -> Result<(), String> {
        let from = self.status.borrow().started;
        loop {
            {
                let s = self.status.borrow_and_update();
                if let Some(b) = &s.breach {
                    return Err(b.clone());
                }
                if s.last_pass > from {
                    return Ok(());
                }
            }
            if self.status.changed().await.is_err() {
                return Err("the analysis stopped".into());
            }
        }
    }

    /// Resolves when the analysis breaches (never otherwise).
    pub async fn breached(&mut self) -> String {
        loop {
            if let Some(b) = &self.status.borrow_and_update().breach {
                return b.clone();
            }
            if self.status.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

async fn measure_loop(analyzer: Analyzer, sink: Sink, sides: Arc<Mutex<Sides>>, tx: watch::Sender<Status>) {
    let mut tally = Tally::default();
    let mut ticks = tokio::time::interval(analyzer.spec.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = sides.lock().unwrap().clone();
        if now.moved.is_empty() {
            continue;
        }
        let n = tx.borrow().started + 1;
        tx.send_modify(|s| s.started = n);
        let round = analyzer.round(&now).await;
        for m in &round {
            sink.record(m).await;
        }
        let (verdict, breach) = tally.add(&analyzer.spec, &round);
        tx.send_modify(|s| {
            if verdict == RoundVerdict::Pass {
                s.last_pass = n;
            }
            if s.breach.is_none() {
                s.breach = breach;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_common::analysis::RequestFloor;

    fn spec(metrics: Vec<Metric>) -> AnalysisSpec {
        AnalysisSpec {
            interval: std::time::Duration::from_secs(1),
            failure_limit: 2,
            inconclusive_limit: 2,
            no_data: NoData::Fail,
            watch_after: std::time::Duration::ZERO,
            host_pattern: "{{host}}:8080".into(),
            requests: None,
            metrics,
        }
    }

    fn metric(name: &str, max: Option<f64>, ratio: Option<f64>) -> Metric {
        Metric {
            name: name.into(),
            query: format!("{name}{{instance=~\"{{{{hosts}}}}\"}}"),
            max,
            min: None,
            max_ratio_to_baseline: ratio,
            baseline_floor: 0.0,
        }
    }

    /// Answers by query text.
    struct Table(HashMap<String, Result<Option<f64>, String>>);

    impl MetricSource for Table {
        fn query<'a>(&'a self, q: &'a str) -> futures::future::BoxFuture<'a, Result<Option<f64>, QueryError>> {
            let r = match self.0.get(q) {
                Some(Ok(v)) => Ok(*v),
                Some(Err(e)) => Err(QueryError::Failed(e.clone())),
                None => Err(QueryError::Refused(format!("no answer for {q}"))),
            };
            Box::pin(async move { r })
        }
    }

    fn h(n: &str) -> HostName {
        HostName::new(n.to_owned()).unwrap()
    }

    fn analyzer(spec: AnalysisSpec, answers: &[(&str, Result<Option<f64>, String>)]) -> Analyzer {
        let subject = Subject {
            app: "web".into(),
            env: "production".into(),
            version: "2.0".into(),
        };
        let table = Table(answers.iter().map(|(q, v)| (q.to_string(), v.clone())).collect());
        Analyzer::new(spec, subject, Arc::new(table))
    }

    #[tokio::test]
    async fn absolute_and_baseline_bounds_judge_the_moved_hosts() {
        let s = spec(vec![metric("err", Some(0.05), None), metric("p95", None, Some(2.0))]);
        let a = analyzer(
            s,
            &[
                ("err{instance=~\"w1:8080\"}", Ok(Some(0.2))),
                ("p95{instance=~\"w1:8080\"}", Ok(Some(0.3))),
                ("p95{instance=~\"w2:8080|w3:8080\"}", Ok(Some(0.1))),
            ],
        );
        let sides = Sides {
            moved: vec![h("w1")],
            baseline: vec![h("w2"), h("w3")],
        };
        let round = a.round(&sides).await;
        assert_eq!(round[0].judgement, Judgement::Fail);
        assert_eq!(round[0].reason, "0.2 is above the maximum 0.05");
        assert_eq!(round[1].judgement, Judgement::Fail, "{:?}", round[1]);
        assert!(
            round[1].reason.contains("3.00× the baseline 0.1"),
            "{}",
            round[1].reason
        );
        assert_eq!(round[1].baseline, Some(0.1));
    }

    #[tokio::test]
    async fn without_baseline_hosts_the_values_before_the_rollout_are_the_baseline() {
        let s = spec(vec![metric("p95", None, Some(2.0))]);
        let mut a = analyzer(s, &[("p95{instance=~\"w1:8080|w2:8080\"}", Ok(Some(0.1)))]);
        let before = a.prepare(&[h("w1"), h("w2")]).await.unwrap();
        assert_eq!(before[0].judgement, Judgement::Before);
        // Now both moved, and the same query answers 0.15: within 2×.
        let round = a
            .round(&Sides {
                moved: vec![h("w1"), h("w2")],
                baseline: vec![],
            })
            .await;
        assert_eq!(round[0].judgement, Judgement::Pass, "{:?}", round[0]);
        assert!(round[0].reason.contains("before the rollout"), "{}", round[0].reason);
    }

    #[tokio::test]
    async fn a_refused_query_refuses_the_rollout_and_a_failed_one_fails_the_measurement() {
        let s = spec(vec![metric("err", Some(0.05), None)]);
        let mut a = analyzer(s.clone(), &[]);
        let e = a.prepare(&[h("w1")]).await.unwrap_err();
        assert!(e.starts_with("metric err: Prometheus refused the query"), "{e}");
        let a = analyzer(s, &[("err{instance=~\"w1:8080\"}", Err("connection refused".into()))]);
        let round = a
            .round(&Sides {
                moved: vec![h("w1")],
                baseline: vec![],
            })
            .await;
        assert_eq!(round[0].judgement, Judgement::Fail);
        assert!(round[0].reason.contains("connection refused"), "{}", round[0].reason);
    }

    #[tokio::test]
    async fn too_few_requests_is_inconclusive_and_the_limits_halt() {
        let mut s = spec(vec![metric("err", Some(0.05), None)]);
        s.requests = Some(RequestFloor {
            query: "reqs{instance=~\"{{hosts}}\"}".into(),
            min: 50.0,
        });
        let a = analyzer(
            s.clone(),
            &[
                ("reqs{instance=~\"w1:8080\"}", Ok(Some(3.0))),
                ("err{instance=~\"w1:8080\"}", Ok(Some(0.0))),
            ],
        );
        let sides = Sides {
            moved: vec![h("w1")],
            baseline: vec![],
        };
        let round = a.round(&sides).await;
        assert_eq!(round.len(), 1, "metrics are not judged on too few requests");
        assert_eq!(round[0].judgement, Judgement::Inconclusive);
        let mut t = Tally::default();
        assert_eq!(t.add(&s, &round), (RoundVerdict::Inconclusive, None));
        let (v, breach) = t.add(&s, &round);
        assert_eq!(v, RoundVerdict::Inconclusive);
        assert!(breach.unwrap().starts_with("2 inconclusive round(s) in a row"));

        // Failures of one metric count up to failure_limit, passes between them or not.
        let fail = vec![Measurement {
            at_ms: 0,
            metric: "err".into(),
            hosts: vec![],
            query: String::new(),
            value: Some(1.0),
            baseline: None,
            judgement: Judgement::Fail,
            reason: "1 is above the maximum 0.05".into(),
            max: Some(0.05),
            min: None,
        }];
        let mut t = Tally::default();
        assert_eq!(t.add(&s, &fail), (RoundVerdict::Fail, None));
        let (_, breach) = t.add(&s, &fail);
        assert_eq!(
            breach.unwrap(),
            "metric err failed 2 measurement(s) (failure_limit 2): 1 is above the maximum 0.05"
        );
    }

    #[test]
    fn values_read_well() {
        assert_eq!(fmt(0.2), "0.2");
        assert_eq!(fmt(0.04875), "0.0488");
        assert_eq!(fmt(3.0), "3");
        assert_eq!(fmt(0.0), "0");
    }
}
