//! What operators ask the engine for, validated once at the edge (the
//! gRPC service converts requests with `TryFrom`) so the engine only ever
//! sees orders that make sense on their own. What needs the fleet or the
//! app spec (hosts, environments, releases) is checked when the rollout
//! is planned.

use std::collections::BTreeMap;
use std::time::Duration;

use convoy_common::rollout::{Amount, Strategy};
use convoy_common::{AppName, HostName, Version};
use serde::{Deserialize, Serialize};

/// A deploy of one release to one environment.
#[derive(Debug, Clone)]
pub struct DeployOrder {
    pub app: AppName,
    pub version: Version,
    pub env: String,
    pub strategy: Strategy,
    pub failure_budget: FailureBudget,
    /// Only hosts with these labels (beside the spec's selector).
    pub select: BTreeMap<String, String>,
    /// These hosts first, in this order; the rest by name.
    pub order: Vec<HostName>,
    /// Hosts with these labels go first, as a stage of their own.
    pub canary_group: BTreeMap<String, String>,
    /// Skips the promotion rule, for this recorded reason.
    pub hotfix: Option<String>,
    /// On a halt, roll the moved hosts back (the default).
    pub rollback_on_halt: bool,
    /// Canary: wait for `convoy promote` after each stage but the last.
    pub manual_promote: bool,
    pub vanish: Vanish,
    /// Asked by an admin: a hotfix passes freezes and deploy windows.
    pub admin: bool,
    /// `--strategy blue-green`: the app must run as slots (`[blue_green]`).
    pub blue_green: bool,
    /// `--config-revision`: this revision, not the environment's newest.
    pub config_revision: Option<u64>,
}

/// A manual rollback of an environment's hosts to a release they hold.
#[derive(Debug, Clone)]
pub struct RollbackOrder {
    pub app: AppName,
    pub env: String,
    /// `None`: each host's previous release.
    pub to: Option<Version>,
    /// Only these hosts (all of the environment when empty).
    pub hosts: Vec<HostName>,
    pub strategy: Strategy,
    pub failure_budget: FailureBudget,
}

/// Failed hosts a rollout tolerates before it halts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureBudget(pub Option<Amount>);

impl FailureBudget {
    /// Hosts tolerated out of `n` targets; a percentage rounds down, so a
    /// budget never tolerates more than it says.
    pub fn hosts(self, n: usize) -> usize {
        match self.0 {
            None => 0,
            Some(Amount::Count(c)) => c,
            Some(Amount::Percent(p)) => n * p as usize / 100,
        }
    }
}

/// What a rollout does about a host that drops away mid-operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vanish {
    /// Wait for the host to come back, however long it takes (an operator
    /// can still abort).
    pub wait: bool,
    /// Otherwise: how long it may be away before it counts as failed.
    pub deadline: Duration,
}

pub const DEFAULT_VANISH_DEADLINE: Duration = Duration::from_secs(60);

impl Default for Vanish {
    fn default() -> Self {
        Vanish {
            wait: false,
            deadline: DEFAULT_VANISH_DEADLINE,
        }
    }
}

/// A request the edge could not turn into an order; names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOrder(pub String);

/// The checks an order needs whatever its source.
impl DeployOrder {
    pub fn validate(self) -> Result<Self, InvalidOrder> {
        if self.hotfix.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(InvalidOrder(
                "--hotfix needs --reason TEXT, which is kept in the audit trail".into(),
            ));
        }
        if self.manual_promote && !matches!(self.strategy, Strategy::Stages { .. }) {
            return Err(InvalidOrder("--promote manual needs --strategy canary".into()));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_round_down() {
        let b = |s: &str| FailureBudget(Some(Amount::parse(s).unwrap()));
        assert_eq!(FailureBudget::default().hosts(10), 0);
        assert_eq!(b("2").hosts(10), 2);
        assert_eq!(b("25%").hosts(10), 2);
        assert_eq!(b("25%").hosts(3), 0);
        assert_eq!(b("100%").hosts(3), 3);
    }
}
