//! Where the features that build on the engine plug in, so that each adds
//! behaviour without reshaping the batch loop:
//!
//! - [`HostSteps`] run around each host's activation, in every strategy:
//!   take the host out of the load balancer before, put it back after
//!   (or switch a blue-green pair).
//! - A [`MetricSource`] answers the metric gates' queries (Prometheus);
//!   see [`super::analysis`] for how they judge a rollout.
//!
//! The default steps do nothing; without a metric source, an app whose
//! spec has metric gates cannot be deployed.

use convoy_common::{AppName, HostName};
use futures::future::BoxFuture;

/// The rollout a seam is called for.
#[derive(Debug, Clone)]
#[cfg_attr(not(test), expect(dead_code, reason = "read by the steps and gates that plug in"))]
pub struct RolloutRef {
    pub id: String,
    pub app: AppName,
    pub env: String,
}

pub trait HostSteps: Send + Sync {
    /// Before the host is sent its activation. An error fails the host
    /// without activating it.
    fn before_activate<'a>(&'a self, rollout: &'a RolloutRef, host: &'a HostName) -> BoxFuture<'a, Result<(), String>>;

    /// After the host's activation ended, whether it succeeded or not (a
    /// failed host runs its previous release again and can take traffic).
    /// An error fails the host.
    fn after_activate<'a>(
        &'a self,
        rollout: &'a RolloutRef,
        host: &'a HostName,
        succeeded: bool,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Why a metric query gave no value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    /// The metrics server answered that the query is wrong: no rollout
    /// should start with it.
    #[error("{0}")]
    Refused(String),
    /// It could not be asked, or its answer was not one value.
    #[error("{0}")]
    Failed(String),
}

/// Where metric gates read their values (Prometheus, or a table in tests).
pub trait MetricSource: Send + Sync {
    /// The value of an instant query: `None` when it returns nothing.
    fn query<'a>(&'a self, promql: &'a str) -> BoxFuture<'a, Result<Option<f64>, QueryError>>;
}

/// No steps around activations.
pub struct NoSteps;

impl HostSteps for NoSteps {
    fn before_activate<'a>(&'a self, _: &'a RolloutRef, _: &'a HostName) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn after_activate<'a>(&'a self, _: &'a RolloutRef, _: &'a HostName, _: bool) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}
