//! What an operator may do to a running rollout, as a pure state machine:
//! `apply(state, action, who)` gives the next state and the reply, or the
//! reason it is refused. The engine holds the state in a watch channel and
//! acts on it between batches; nothing here touches the store or a host.

use std::fmt;
use std::str::FromStr;

/// Where a running rollout stands as far as operators are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Waiting for an operator other than this one (the requester) to approve.
    AwaitApproval(String),
    Run,
    /// Wait before the next batch; the string says who asked.
    Pause(String),
    /// Halt before the next batch and roll back what moved.
    Abort(String),
    /// A canary stage (numbered from 1) is done; waiting for `convoy promote`.
    AwaitPromote(usize),
}

/// An operator's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Abort,
    Approve,
    Promote,
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "abort" => Action::Abort,
            "approve" => Action::Approve,
            "promote" => Action::Promote,
            other => {
                return Err(format!(
                    "unknown action {other:?} (pause, resume, abort, promote or approve)"
                ))
            }
        })
    }
}

/// Why an action was refused; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The requester of an approval may not give it.
    OwnApproval(String),
    AwaitingApproval,
    NoApprovalNeeded,
    NotAwaitingPromotion,
    AwaitingPromotion(usize),
    BeingAborted(String),
}

impl Refusal {
    /// Whether the caller lacks the right (rather than asking at the wrong time).
    pub fn is_permission(&self) -> bool {
        matches!(self, Refusal::OwnApproval(_))
    }

    /// What the operator is told, for rollout `id`.
    pub fn message(&self, id: &str) -> String {
        match self {
            Refusal::OwnApproval(who) => {
                format!("{who} started rollout {id} and cannot approve it; another operator must")
            }
            Refusal::AwaitingApproval => format!("rollout {id} is awaiting approval"),
            Refusal::NoApprovalNeeded => format!("rollout {id} needs no approval"),
            Refusal::NotAwaitingPromotion => format!("rollout {id} is not waiting for promotion"),
            Refusal::AwaitingPromotion(stage) => {
                format!("rollout {id} is waiting for stage {stage} to be promoted: run `convoy promote {id}`")
            }
            Refusal::BeingAborted(by) => format!("rollout {id} is being aborted by {by}"),
        }
    }
}

/// The outcome of an accepted action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub next: Control,
    /// What the operator is told.
    pub reply: String,
    /// The action approved the rollout (kept in the audit trail).
    pub approved: bool,
}

impl fmt::Display for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Control::AwaitApproval(_) => f.write_str("awaiting approval"),
            Control::Run => f.write_str("running"),
            Control::Pause(_) => f.write_str("paused"),
            Control::Abort(_) => f.write_str("aborting"),
            Control::AwaitPromote(stage) => write!(f, "awaiting promotion of stage {stage}"),
        }
    }
}

/// Applies `action`, asked by `who`, to a rollout in state `now`.
pub fn apply(now: &Control, action: Action, who: &str) -> Result<Applied, Refusal> {
    let to = |next: Control, reply: &str| {
        Ok(Applied {
            next,
            reply: reply.to_owned(),
            approved: false,
        })
    };
    let stay = |reply: &str| to(now.clone(), reply);
    match (now, action) {
        (Control::AwaitApproval(requester), Action::Approve) if requester == who => {
            Err(Refusal::OwnApproval(who.to_owned()))
        }
        (Control::AwaitApproval(_), Action::Approve) => Ok(Applied {
            next: Control::Run,
            reply: "approved; running".into(),
            approved: true,
        }),
        (Control::AwaitApproval(_), Action::Abort) => to(Control::Abort(who.to_owned()), "aborted before it started"),
        (Control::AwaitApproval(_), _) => Err(Refusal::AwaitingApproval),
        (_, Action::Approve) => Err(Refusal::NoApprovalNeeded),
        (Control::AwaitPromote(stage), Action::Promote) => Ok(Applied {
            next: Control::Run,
            reply: format!("stage {stage} promoted; running"),
            approved: false,
        }),
        (_, Action::Promote) => Err(Refusal::NotAwaitingPromotion),
        (Control::AwaitPromote(_), Action::Pause) => stay("awaiting promotion"),
        (Control::AwaitPromote(stage), Action::Resume) => Err(Refusal::AwaitingPromotion(*stage)),
        (Control::Abort(by), _) => Err(Refusal::BeingAborted(by.clone())),
        (Control::Pause(_), Action::Pause) => stay("paused"),
        (_, Action::Pause) => to(Control::Pause(who.to_owned()), "pausing before its next batch"),
        (Control::Run, Action::Resume) => stay("running"),
        (_, Action::Resume) => to(Control::Run, "running"),
        (_, Action::Abort) => to(Control::Abort(who.to_owned()), "aborting before its next batch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn awaiting() -> Control {
        Control::AwaitApproval("alice".into())
    }

    /// One row per (state, action): the state after it and the reply, or
    /// the refusal.
    fn check(now: Control, action: &str, who: &str, expect: Result<(Control, &str), &str>) {
        let action: Action = action.parse().unwrap();
        let got = apply(&now, action, who);
        match (got, expect) {
            (Ok(a), Ok((next, reply))) => {
                assert_eq!((&a.next, a.reply.as_str()), (&next, reply), "{now:?} + {action:?}")
            }
            (Err(r), Err(why)) => assert_eq!(r.message("r1"), why, "{now:?} + {action:?}"),
            (got, expect) => panic!("{now:?} + {action:?}: got {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn approval() {
        check(awaiting(), "approve", "bob", Ok((Control::Run, "approved; running")));
        check(
            awaiting(),
            "approve",
            "alice",
            Err("alice started rollout r1 and cannot approve it; another operator must"),
        );
        check(
            awaiting(),
            "abort",
            "bob",
            Ok((Control::Abort("bob".into()), "aborted before it started")),
        );
        check(awaiting(), "pause", "bob", Err("rollout r1 is awaiting approval"));
        check(awaiting(), "resume", "bob", Err("rollout r1 is awaiting approval"));
        check(awaiting(), "promote", "bob", Err("rollout r1 is awaiting approval"));
        check(Control::Run, "approve", "bob", Err("rollout r1 needs no approval"));
        assert!(apply(&awaiting(), Action::Approve, "bob").unwrap().approved);
        assert!(apply(&awaiting(), Action::Approve, "alice")
            .unwrap_err()
            .is_permission());
    }

    #[test]
    fn pause_resume_abort() {
        let paused = Control::Pause("bob".into());
        let aborting = Control::Abort("carol".into());
        check(
            Control::Run,
            "pause",
            "bob",
            Ok((paused.clone(), "pausing before its next batch")),
        );
        check(paused.clone(), "pause", "dave", Ok((paused.clone(), "paused")));
        check(paused.clone(), "resume", "dave", Ok((Control::Run, "running")));
        check(Control::Run, "resume", "dave", Ok((Control::Run, "running")));
        check(
            paused.clone(),
            "abort",
            "carol",
            Ok((aborting.clone(), "aborting before its next batch")),
        );
        check(
            Control::Run,
            "abort",
            "carol",
            Ok((aborting.clone(), "aborting before its next batch")),
        );
        for action in ["pause", "resume", "abort"] {
            check(
                aborting.clone(),
                action,
                "bob",
                Err("rollout r1 is being aborted by carol"),
            );
        }
    }

    #[test]
    fn promotion() {
        let waiting = Control::AwaitPromote(2);
        check(
            waiting.clone(),
            "promote",
            "bob",
            Ok((Control::Run, "stage 2 promoted; running")),
        );
        check(
            waiting.clone(),
            "pause",
            "bob",
            Ok((waiting.clone(), "awaiting promotion")),
        );
        check(
            waiting.clone(),
            "resume",
            "bob",
            Err("rollout r1 is waiting for stage 2 to be promoted: run `convoy promote r1`"),
        );
        check(
            waiting.clone(),
            "abort",
            "bob",
            Ok((Control::Abort("bob".into()), "aborting before its next batch")),
        );
        check(
            Control::Run,
            "promote",
            "bob",
            Err("rollout r1 is not waiting for promotion"),
        );
        check(
            Control::Pause("x".into()),
            "promote",
            "bob",
            Err("rollout r1 is not waiting for promotion"),
        );
    }

    #[test]
    fn unknown_actions_are_named() {
        assert_eq!(
            "restart".parse::<Action>().unwrap_err(),
            "unknown action \"restart\" (pause, resume, abort, promote or approve)"
        );
    }
}
