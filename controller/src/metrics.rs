//! The controller's Prometheus metrics, served on `metrics_listen` when the
//! config sets it. Names and labels are documented in docs/metrics.md.

use std::sync::{Arc, LazyLock, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    rollouts: Family<Labels, Counter>,
    host_results: Family<Labels, Counter>,
    steps: Family<Labels, Histogram>,
    pub connected_hosts: Gauge,
    pub bytes_streamed: Counter,
    /// What staging one release cost the controller, per host.
    pub stage_egress: Histogram,
    pub registry: Arc<Mutex<Registry>>,
}

fn step_buckets() -> Histogram {
    // 5 ms to about 11 minutes.
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let rollouts = Family::<Labels, Counter>::default();
    let host_results = Family::<Labels, Counter>::default();
    let steps = Family::<Labels, Histogram>::new_with_constructor(step_buckets as fn() -> Histogram);
    let connected_hosts = Gauge::default();
    let bytes_streamed = Counter::default();
    // 1 KiB to 16 GiB.
    let stage_egress = Histogram::new(exponential_buckets(1024.0, 4.0, 13));
    let mut registry = Registry::default();
    registry.register(
        "convoy_rollouts",
        "Rollouts that ended, by kind (deploy, rollback) and outcome (succeeded, failed, rolled_back, cancelled)",
        rollouts.clone(),
    );
    registry.register(
        "convoy_host_results",
        "Host operations of rollouts that ended, by outcome (succeeded, failed_restored, failed_restore_failed, refused)",
        host_results.clone(),
    );
    registry.register(
        "convoy_step_duration_seconds",
        "Time one activation step took on a host, from the agent's step events, by step and result (succeeded, failed)",
        steps.clone(),
    );
    registry.register(
        "convoy_connected_hosts",
        "Agents with a session open now",
        connected_hosts.clone(),
    );
    registry.register(
        "convoy_artifact_bytes_streamed",
        "Artifact bytes sent to agents",
        bytes_streamed.clone(),
    );
    registry.register(
        "convoy_stage_egress_bytes",
        "Bytes the controller sent one host to pre-stage one release: the whole artifact, or a delta's manifest and missing contents",
        stage_egress.clone(),
    );
    Metrics {
        rollouts,
        host_results,
        steps,
        connected_hosts,
        bytes_streamed,
        stage_egress,
        registry: Arc::new(Mutex::new(registry)),
    }
});

pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    pub fn rollout(&self, kind: &'static str, outcome: &'static str) {
        self.rollouts
            .get_or_create(&vec![("kind", kind.to_string()), ("outcome", outcome.to_string())])
            .inc();
    }

    pub fn host_result(&self, outcome: convoy_common::ops::Outcome) {
        self.host_results
            .get_or_create(&vec![("outcome", outcome.label().to_string())])
            .inc();
    }

    pub fn step(&self, step: convoy_common::ops::Step, succeeded: bool, took: std::time::Duration) {
        let result = if succeeded { "succeeded" } else { "failed" };
        self.steps
            .get_or_create(&vec![
                ("step", step.as_str().to_string()),
                ("result", result.to_string()),
            ])
            .observe(took.as_secs_f64());
    }
}
