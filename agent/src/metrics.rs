//! The agent's Prometheus metrics, served on `metrics_listen` when the
//! config sets it. Names and labels are documented in docs/metrics.md.

use std::sync::{Arc, LazyLock, Mutex};

use convoy_common::ops::Outcome;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    activations: Family<Labels, Counter>,
    restores: Family<Labels, Counter>,
    health_checks: Family<Labels, Histogram>,
    pub registry: Arc<Mutex<Registry>>,
}

fn check_buckets() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let activations = Family::<Labels, Counter>::default();
    let restores = Family::<Labels, Counter>::default();
    let health_checks = Family::<Labels, Histogram>::new_with_constructor(check_buckets as fn() -> Histogram);
    let mut registry = Registry::default();
    registry.register(
        "convoy_agent_activations",
        "Activations this agent finished, by outcome (succeeded, failed_restored, failed_restore_failed, refused)",
        activations.clone(),
    );
    registry.register(
        "convoy_agent_restores",
        "Restores of the previous release after a failed activation, by outcome (succeeded, failed)",
        restores.clone(),
    );
    registry.register(
        "convoy_agent_health_check_duration_seconds",
        "Time one health check took to answer, by check type and result (passed, failed)",
        health_checks.clone(),
    );
    Metrics {
        activations,
        restores,
        health_checks,
        registry: Arc::new(Mutex::new(registry)),
    }
});

pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    pub fn activation(&self, outcome: Outcome) {
        self.activations
            .get_or_create(&vec![("outcome", outcome.label().to_string())])
            .inc();
    }

    pub fn restore(&self, succeeded: bool) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.restores
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }

    pub fn health_check(&self, kind: &'static str, passed: bool, took: std::time::Duration) {
        let result = if passed { "passed" } else { "failed" };
        self.health_checks
            .get_or_create(&vec![("type", kind.to_string()), ("result", result.to_string())])
            .observe(took.as_secs_f64());
    }
}
