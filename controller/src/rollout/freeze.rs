//! Freezes and deploy windows: when deploys may start and go on.
//!
//! - An admin freezes an environment (`convoy freeze`), for a while or
//!   until it is unfrozen: new deploys into it are refused, and running
//!   ones wait before their next batch (state `frozen`).
//! - An app spec's `windows` say when its deploys may start.
//! - An admin's hotfix (`--hotfix --reason`) passes both, audited.
//! - Rollbacks are never held: they are how an incident ends.
//!
//! Freezes, unfreezes and passes are in the audit and sent to webhooks.

use std::collections::BTreeMap;
use std::time::Duration;

use convoy_common::spec::AppSpec;

use super::store::Freeze;
use super::{Engine, Refused};

/// How a freeze reads in refusals and notes.
pub fn describe(f: &Freeze) -> String {
    let mut s = format!("{} is frozen by {} since {}", f.env, f.by, when(f.at_ms));
    if let Some(u) = f.until_ms {
        s.push_str(&format!(" until {}", when(u)));
    }
    s.push_str(&format!(": {}", f.reason));
    s
}

fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn active(f: &Freeze, now_ms: i64) -> bool {
    f.until_ms.is_none_or(|u| now_ms < u)
}

/// Whether a deploy may start, and what its start must audit.
pub(super) enum Clearance {
    Clear,
    /// An admin's hotfix passes a freeze or a window: audited when the
    /// rollout starts.
    Passes(Vec<String>),
}

impl Engine {
    /// Takes the freezes from the store (at start).
    pub async fn load_freezes(&self) -> Result<(), Refused> {
        let all: BTreeMap<String, Freeze> = self
            .store
            .freezes()
            .await?
            .into_iter()
            .map(|f| (f.env.clone(), f))
            .collect();
        // Watchers wake only when something changed.
        self.freezes.send_if_modified(|now| {
            let changed = *now != all;
            if changed {
                *now = all;
            }
            changed
        });
        Ok(())
    }

    /// Freezes `env` (replacing a freeze it has) for `span`, or until
    /// unfrozen.
    pub async fn freeze(&self, who: &str, env: &str, reason: &str, span: Option<Duration>) -> Result<Freeze, Refused> {
        convoy_common::AppName::new(env.to_owned()).map_err(|e| Refused::Invalid(format!("--env: {e}")))?;
        if reason.trim().is_empty() {
            return Err(Refused::Invalid(
                "--reason: say why (it is shown to everyone refused)".into(),
            ));
        }
        let now = convoy_common::ops::now_unix_ms();
        let f = Freeze {
            env: env.to_owned(),
            reason: reason.trim().to_owned(),
            by: who.to_owned(),
            at_ms: now,
            until_ms: span.map(|d| now + d.as_millis() as i64),
        };
        self.store.set_freeze(&f).await?;
        self.freezes.send_modify(|m| {
            m.insert(env.to_owned(), f.clone());
        });
        tracing::warn!(env, by = who, reason = %f.reason, until = ?f.until_ms, "environment frozen");
        self.notifier
            .send(self.environment_payload("environment_frozen", who, env, &describe(&f)));
        Ok(f)
    }

    /// Lifts `env`'s freeze; refused when it has none.
    pub async fn unfreeze(&self, who: &str, env: &str) -> Result<Freeze, Refused> {
        let f = self
            .store
            .clear_freeze(env, who)
            .await?
            .ok_or_else(|| Refused::NotFound(format!("{env} is not frozen")))?;
        self.freezes.send_modify(|m| {
            m.remove(env);
        });
        tracing::warn!(env, by = who, "environment unfrozen");
        let text = format!("{env} unfrozen by {who} (frozen by {}: {})", f.by, f.reason);
        self.notifier
            .send(self.environment_payload("environment_unfrozen", who, env, &text));
        Ok(f)
    }

    /// The freezes in force now.
    pub fn freezes(&self) -> Vec<Freeze> {
        let now = convoy_common::ops::now_unix_ms();
        self.freezes
            .borrow()
            .values()
            .filter(|f| active(f, now))
            .cloned()
            .collect()
    }

    /// `env`'s freeze, if one is in force now.
    pub(super) fn frozen(&self, env: &str) -> Option<Freeze> {
        let now = convoy_common::ops::now_unix_ms();
        self.freezes.borrow().get(env).filter(|f| active(f, now)).cloned()
    }

    /// Changes of freezes, for rollouts waiting on one.
    pub(super) fn freeze_changes(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, Freeze>> {
        self.freezes.subscribe()
    }

    /// Whether a deploy of `spec`'s app into `env` may start now.
    pub(super) fn clearance(
        &self,
        spec: &AppSpec,
        env: &str,
        hotfix: Option<&str>,
        admin: bool,
    ) -> Result<Clearance, Refused> {
        let mut held = Vec::new();
        if let Some(f) = self.frozen(env) {
            held.push(describe(&f));
        }
        let now = jiff::Timestamp::now();
        if !spec.windows.is_empty() && !spec.windows.iter().any(|w| w.contains(now)) {
            let list: Vec<&str> = spec.windows.iter().map(|w| w.text.as_str()).collect();
            held.push(format!(
                "it is {}, outside {}'s deploy windows ({})",
                spec.windows[0].local(now),
                spec.install.app,
                list.join("; ")
            ));
        }
        if held.is_empty() {
            return Ok(Clearance::Clear);
        }
        match (hotfix, admin) {
            (Some(_), true) => Ok(Clearance::Passes(held)),
            (Some(_), false) => Err(Refused::Permission(format!(
                "{}; only an admin's --hotfix passes it",
                held.join("; ")
            ))),
            (None, _) => Err(Refused::Precondition(format!(
                "{}; nothing was changed (an admin may pass with --hotfix --reason TEXT)",
                held.join("; ")
            ))),
        }
    }

    /// A webhook payload about an environment rather than a rollout.
    pub(super) fn environment_payload(
        &self,
        event: &'static str,
        who: &str,
        env: &str,
        text: &str,
    ) -> crate::webhooks::Payload {
        crate::webhooks::Payload {
            event,
            rollout_id: String::new(),
            app: String::new(),
            version: String::new(),
            environment: env.to_owned(),
            kind: "environment",
            operator: who.to_owned(),
            reason: text.to_owned(),
            failed_hosts: vec![],
            rolled_back_hosts: vec![],
            at_unix_ms: convoy_common::ops::now_unix_ms(),
            text: format!("convoy: {text}"),
        }
    }
}
