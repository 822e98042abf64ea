//! Where the features that build on the engine plug in, so that each adds
//! behaviour without reshaping the batch loop:
//!
//! - [`HostSteps`] run around each host's activation, in every strategy:
//!   take the host out of the load balancer before, put it back after,
//!   or switch a blue-green host's traffic between its slots.
//! - A [`MetricSource`] answers the metric gates' queries (Prometheus);
//!   see [`super::analysis`] for how they judge a rollout.
//!
//! The default steps do nothing; without a metric source, an app whose
//! spec has metric gates cannot be deployed.

use convoy_common::ops::RenderedConfig;
use convoy_common::slots::{BlueGreen, Slot};
use convoy_common::traffic::TrafficSpec;
use convoy_common::{AppName, HostName, Version};
use futures::future::BoxFuture;

/// The rollout a seam is called for.
#[derive(Debug, Clone)]
pub struct RolloutRef {
    pub id: String,
    pub app: AppName,
    pub env: String,
    /// How requests reach its hosts, from the app spec.
    pub traffic: Option<TrafficSpec>,
    /// Blue-green hosts: the app runs as two slots, and traffic switches
    /// between them instead of draining the host.
    pub blue_green: Option<BlueGreen>,
}

/// What a blue-green host's traffic does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAction {
    /// Before a host's first slot starts: no slot takes traffic until a
    /// switch says so (drained, still health-checked by the balancer).
    Isolate,
    /// Traffic moves to `to` at once; `from` gets no new requests and its
    /// sessions drain. The slot that lost traffic stays out of the
    /// balancer until the next switch, so an idle slot's preview never
    /// receives a request.
    Switch { from: Option<Slot>, to: Slot },
}

/// Each step says what it did (empty: nothing to do), which the rollout
/// records as a `traffic` step event of the host; an error says why the
/// host fails.
pub trait HostSteps: Send + Sync {
    /// Before the host is sent its activation. An error fails the host
    /// without activating it.
    fn before_activate<'a>(
        &'a self,
        rollout: &'a RolloutRef,
        host: &'a HostName,
    ) -> BoxFuture<'a, Result<String, String>>;

    /// After the host's activation ended, whether it succeeded or not (a
    /// failed host runs its previous release again and can take traffic).
    /// An error fails the host.
    fn after_activate<'a>(
        &'a self,
        rollout: &'a RolloutRef,
        host: &'a HostName,
        succeeded: bool,
    ) -> BoxFuture<'a, Result<String, String>>;

    /// At pre-flight: whether the steps can act on this host (the
    /// balancer answers and knows it).
    fn check<'a>(&'a self, rollout: &'a RolloutRef, host: &'a HostName) -> BoxFuture<'a, Result<String, String>>;

    /// Blue-green: acts on the traffic to a host's slots. An error means
    /// traffic did not move.
    fn slots<'a>(
        &'a self,
        _rollout: &'a RolloutRef,
        _host: &'a HostName,
        _action: SlotAction,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async { Ok(String::new()) })
    }
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
    fn before_activate<'a>(&'a self, _: &'a RolloutRef, _: &'a HostName) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async { Ok(String::new()) })
    }

    fn after_activate<'a>(
        &'a self,
        _: &'a RolloutRef,
        _: &'a HostName,
        _: bool,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async { Ok(String::new()) })
    }

    fn check<'a>(&'a self, _: &'a RolloutRef, _: &'a HostName) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async { Ok(String::new()) })
    }
}

/// A host's name and labels.
pub type Labelled<'a> = (&'a str, &'a std::collections::BTreeMap<String, String>);

/// The revision a release passed the environment before with, and the
/// keys that differ from it: (key, `changed`, `only-from` or `only-to`).
pub type Passed = (u64, Vec<(String, &'static str)>);

/// Where a deploy's configuration comes from: the revision a release
/// takes, checked against what it declares, and the files rendered from it
/// when a host is sent its activation (never stored: they may hold
/// secrets).
#[async_trait::async_trait]
pub trait ConfigSource: Send + Sync {
    /// The revision a deploy of `version` takes (the newest, or the one
    /// named); `Ok(None)` when the release declares no configuration. An
    /// error lists every problem.
    /// Values may be set per host group or host: each target must fit.
    async fn for_deploy(
        &self,
        app: &AppName,
        env: &str,
        version: &Version,
        revision: Option<u64>,
        targets: &[Labelled<'_>],
    ) -> Result<Option<u64>, String>;

    /// The files for one host, its most specific values rendered.
    async fn render(
        &self,
        app: &AppName,
        env: &str,
        version: &Version,
        revision: u64,
        host: Labelled<'_>,
    ) -> Result<RenderedConfig, String>;

    /// The keys whose values differ between `revision` of `env` and the
    /// revision `version` passed `before` with (its number); `None` when
    /// it never passed there with a configuration. How a key differs:
    /// `changed`, `only-from` (only in `before`), `only-to`.
    async fn against_passed(
        &self,
        app: &AppName,
        version: &Version,
        before: &str,
        env: &str,
        revision: u64,
    ) -> Result<Option<Passed>, String>;
}
