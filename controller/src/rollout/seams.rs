//! Where the features that build on the engine plug in, so that each adds
//! behaviour without reshaping the batch loop:
//!
//! - [`HostSteps`] run around each host's activation, in every strategy:
//!   take the host out of the load balancer before, put it back after
//!   (or switch a blue-green pair).
//! - [`Gate`]s are measured after each batch and at the end of each bake
//!   (metric analysis, freezes); a failing gate halts the rollout and rolls
//!   back what moved, like a host over the failure budget.
//!
//! The defaults do nothing and always pass.

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

/// When a gate is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatePoint {
    /// Batch `n` (from 1) has finished.
    AfterBatch(usize),
    /// The bake after batch `n` has ended.
    AfterBake(usize),
}

pub trait Gate: Send + Sync {
    /// `moved`: the hosts this rollout has moved so far. `Err` names why
    /// the rollout must halt.
    fn check<'a>(
        &'a self,
        rollout: &'a RolloutRef,
        point: GatePoint,
        moved: &'a [HostName],
    ) -> BoxFuture<'a, Result<(), String>>;
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

/// A gate that always passes.
pub struct NoGate;

impl Gate for NoGate {
    fn check<'a>(&'a self, _: &'a RolloutRef, _: GatePoint, _: &'a [HostName]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}
