//! Several controllers, one fleet: each host's session is held by one
//! controller, each running rollout is driven by one (its lease owner),
//! and they are often not the same. What crosses between them goes through
//! the database's `relay` table:
//!
//! - `command` and `preflight` rows, written by the controller that asks,
//!   for a host: whichever controller holds the host's session sends them
//!   down it (again on each new session, until answered: a host that moves
//!   to another controller still gets them);
//! - `result` and `event` rows, written by the session holder for the
//!   rollout's lease owner, and `preflight_answer` rows for the asker;
//! - `control` rows (an operator's pause, resume, abort, approve or
//!   promote, taken by a controller that does not drive the rollout) for
//!   the lease owner, and `control_reply` rows back to the asker.
//!
//! Each controller also publishes its hosts (`host_sessions`) and that it
//! is up (`controllers`), and reads the others' hosts, so every controller
//! sees the whole fleet. A round runs every `ROUND`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_common::ops::{AppStatus, OpId, OpReport, PreflightCheck, StepEvent};
use convoy_common::HostName;
use convoy_proto::ControllerMessage;
use prost::Message;

use crate::db::{Db, DbError};
use crate::params;

/// How often a controller looks for what other controllers left for it.
pub const ROUND: Duration = Duration::from_millis(200);

/// A controller not seen for this long is down: its hosts count as
/// disconnected.
pub const CONTROLLER_DOWN_MS: i64 = 10_000;

/// How long an operator's control action waits for the controller that
/// drives the rollout to answer it.
pub const CONTROL_WAIT: Duration = Duration::from_secs(10);

/// An operator's control action for the controller driving the rollout.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ControlAsk {
    /// The controller waiting for the answer.
    pub asker: String,
    pub rollout: String,
    pub action: String,
    /// The operator, as the asking controller verified them.
    pub who: String,
}

/// The answer to a `ControlAsk`: a gRPC status code (0: done, `message`
/// is the rollout's state) and its message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ControlAnswer {
    pub code: i32,
    pub message: String,
}

impl ControlAnswer {
    pub fn of(r: Result<String, tonic::Status>) -> Self {
        match r {
            Ok(state) => ControlAnswer {
                code: 0,
                message: state,
            },
            Err(s) => ControlAnswer {
                code: s.code() as i32,
                message: s.message().to_owned(),
            },
        }
    }

    pub fn into_result(self) -> Result<String, tonic::Status> {
        match self.code {
            0 => Ok(self.message),
            c => Err(tonic::Status::new(tonic::Code::from_i32(c), self.message)),
        }
    }
}

/// A host as another controller published it.
#[derive(Debug, Clone)]
pub struct RemoteHost {
    pub controller: String,
    pub labels: BTreeMap<String, String>,
    pub apps: Vec<AppStatus>,
    pub protocol: u32,
    pub connected: bool,
}

pub struct Relay {
    pub db: Arc<Db>,
    pub me: String,
    /// Hosts whose published state is stale.
    dirty: Mutex<HashSet<HostName>>,
    /// (session, op id) of every command sent down a session, so a round
    /// does not send it twice on the same session.
    sent: Mutex<HashSet<(u64, String)>>,
    /// Hosts other controllers hold, as published (`connected` as they
    /// said it), read incrementally.
    remote: Mutex<BTreeMap<HostName, RemoteHost>>,
    /// Controllers seen up at the last read.
    up: Mutex<HashSet<String>>,
    /// Publication time (unix ms) the next read starts from.
    read_from: Mutex<i64>,
    /// Control actions sent to other controllers, waiting for their reply.
    asked: Mutex<HashMap<String, tokio::sync::oneshot::Sender<ControlAnswer>>>,
    asks: AtomicU64,
}

/// What a controller publishes of one of its hosts: labels, apps, agent
/// protocol, connected.
pub type Published = (BTreeMap<String, String>, Vec<AppStatus>, u32, bool);

/// What the relay gives the local side to do.
pub enum Inbound {
    Result(HostName, Box<OpReport>),
    Event(HostName, StepEvent),
    PreflightAnswer(HostName, String, Vec<PreflightCheck>),
    /// A control action to apply here, with the key its reply goes under.
    Control(String, ControlAsk),
}

impl Relay {
    pub fn new(db: Arc<Db>) -> Relay {
        let me = db.owner().to_owned();
        Relay {
            db,
            me,
            dirty: Mutex::default(),
            sent: Mutex::default(),
            remote: Mutex::default(),
            up: Mutex::default(),
            read_from: Mutex::new(0),
            asked: Mutex::default(),
            asks: AtomicU64::new(0),
        }
    }

    pub fn mark_dirty(&self, host: &HostName) {
        self.dirty.lock().unwrap().insert(host.clone());
    }

    pub fn mark_sent(&self, session: u64, op_id: &str) {
        self.sent.lock().unwrap().insert((session, op_id.to_owned()));
    }

    /// Hosts other controllers hold; connected when their controller is up.
    pub fn remote(&self) -> BTreeMap<HostName, RemoteHost> {
        let up = self.up.lock().unwrap();
        self.remote
            .lock()
            .unwrap()
            .iter()
            .map(|(k, h)| (k.clone(), self.as_seen(h, &up)))
            .collect()
    }

    pub fn remote_host(&self, host: &HostName) -> Option<RemoteHost> {
        let up = self.up.lock().unwrap();
        self.remote.lock().unwrap().get(host).map(|h| self.as_seen(h, &up))
    }

    fn as_seen(&self, h: &RemoteHost, up: &HashSet<String>) -> RemoteHost {
        let mut h = h.clone();
        h.connected &= up.contains(&h.controller);
        h
    }

    /// Leaves a command (or pre-flight) for `host`, for whichever
    /// controller holds its session.
    pub async fn leave(
        &self,
        kind: &str,
        op_id: &str,
        host: &HostName,
        msg: &ControllerMessage,
    ) -> Result<(), DbError> {
        self.send_to(&self.me, kind, op_id, host.as_str(), msg.encode_to_vec())
            .await
    }

    /// Forgets what was left and never taken: commands for hosts that never
    /// came back, answers for a controller that is gone. Returns the rows
    /// removed.
    pub async fn sweep(&self, older_than_ms: i64) -> Result<u64, DbError> {
        self.db
            .execute(
                "DELETE FROM relay WHERE at_ms < ?1",
                params![convoy_common::ops::now_unix_ms() - older_than_ms],
            )
            .await
    }

    /// A host answered `op_id`: its command is no longer pending anywhere.
    pub async fn answered(&self, op_id: &str) -> Result<(), DbError> {
        self.db
            .execute(
                "DELETE FROM relay WHERE kind = 'command' AND op_id = ?1",
                params![op_id],
            )
            .await?;
        Ok(())
    }

    /// The controller driving `rollout`, when it is another one.
    pub async fn owner_elsewhere(&self, rollout: &str) -> Result<Option<String>, DbError> {
        let owner: Option<String> = self
            .db
            .query_opt("SELECT owner FROM leases WHERE rollout_id = ?1", params![rollout])
            .await?
            .map(|r| r.get(0))
            .transpose()?;
        Ok(owner.filter(|o| *o != self.me))
    }

    /// Sends a result nobody here waits for to the controller driving its
    /// rollout; `false` when no other controller drives it.
    pub async fn forward_result(&self, host: &HostName, r: &OpReport) -> Result<bool, DbError> {
        let Ok(op) = OpId::parse(&r.op_id) else {
            return Ok(false);
        };
        let Some(owner) = self.owner_elsewhere(op.rollout()).await? else {
            return Ok(false);
        };
        self.send_to(
            &owner,
            "result",
            &r.op_id,
            host.as_str(),
            serde_json::to_vec(r).expect("a report serialises"),
        )
        .await?;
        Ok(true)
    }

    /// Sends a progress event to the controller driving its rollout.
    pub async fn forward_event(&self, host: &HostName, e: &StepEvent) -> Result<(), DbError> {
        let Ok(op) = OpId::parse(&e.op_id) else { return Ok(()) };
        if let Some(owner) = self.owner_elsewhere(op.rollout()).await? {
            self.send_to(
                &owner,
                "event",
                &e.op_id,
                host.as_str(),
                serde_json::to_vec(e).expect("an event serialises"),
            )
            .await?;
        }
        Ok(())
    }

    /// Sends a pre-flight answer to the controller that asked for it.
    pub async fn forward_preflight(
        &self,
        host: &HostName,
        op_id: &str,
        checks: &[PreflightCheck],
    ) -> Result<(), DbError> {
        let asker: Option<String> = self
            .db
            .query_opt(
                "SELECT target FROM relay WHERE kind = 'preflight' AND op_id = ?1 AND host = ?2",
                params![op_id, host.as_str()],
            )
            .await?
            .map(|r| r.get(0))
            .transpose()?;
        self.db
            .execute(
                "DELETE FROM relay WHERE kind = 'preflight' AND op_id = ?1 AND host = ?2",
                params![op_id, host.as_str()],
            )
            .await?;
        if let Some(asker) = asker.filter(|a| *a != self.me) {
            let body = serde_json::to_vec(checks).expect("checks serialise");
            self.send_to(&asker, "preflight_answer", op_id, host.as_str(), body)
                .await?;
        }
        Ok(())
    }

    /// Leaves a row of `kind` for controller `target`; `host` is empty for
    /// rows about no host (control actions).
    async fn send_to(
        &self,
        target: &str,
        kind: &str,
        op_id: &str,
        host: &str,
        payload: Vec<u8>,
    ) -> Result<(), DbError> {
        self.db
            .execute(
                "INSERT INTO relay (kind, op_id, host, target, payload, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![kind, op_id, host, target, payload, convoy_common::ops::now_unix_ms()],
            )
            .await?;
        Ok(())
    }

    /// Asks controller `owner`, which drives `rollout`, to apply an
    /// operator's control action, and waits up to `CONTROL_WAIT` for its
    /// answer.
    pub async fn ask_control(
        &self,
        owner: &str,
        rollout: &str,
        action: &str,
        who: &str,
    ) -> Result<ControlAnswer, DbError> {
        let key = format!(
            "{}-{}-{}",
            self.me,
            std::process::id(),
            self.asks.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.asked.lock().unwrap().insert(key.clone(), tx);
        let ask = ControlAsk {
            asker: self.me.clone(),
            rollout: rollout.to_owned(),
            action: action.to_owned(),
            who: who.to_owned(),
        };
        let body = serde_json::to_vec(&ask).expect("an ask serialises");
        let sent = self.send_to(owner, "control", &key, "", body).await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(CONTROL_WAIT, rx).await.ok().and_then(Result::ok),
            Err(_) => None,
        };
        self.asked.lock().unwrap().remove(&key);
        sent?;
        Ok(answer.unwrap_or_else(|| ControlAnswer {
            code: tonic::Code::Unavailable as i32,
            message: format!(
                "rollout {rollout} is driven by controller {owner}, which did not answer within {}s; \
                 try again, or through that controller",
                CONTROL_WAIT.as_secs()
            ),
        }))
    }

    /// Sends the answer to a control action back to the controller that
    /// asked under `key`.
    pub async fn answer_control(&self, asker: &str, key: &str, answer: &ControlAnswer) -> Result<(), DbError> {
        let body = serde_json::to_vec(answer).expect("an answer serialises");
        self.send_to(asker, "control_reply", key, "", body).await
    }

    /// Publishes the hosts whose state changed: `local` gives a host's
    /// state here (labels, apps, protocol, connected).
    pub async fn publish(&self, local: impl Fn(&HostName) -> Option<Published>) -> Result<(), DbError> {
        let dirty: Vec<HostName> = self.dirty.lock().unwrap().drain().collect();
        for (i, host) in dirty.iter().enumerate() {
            let Some((labels, apps, protocol, connected)) = local(host) else {
                continue;
            };
            let written = self
                .db
                .execute(
                    "INSERT INTO host_sessions (host, controller, labels, apps, protocol, connected, seen_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (host) DO UPDATE SET controller = ?2, labels = ?3, apps = ?4, protocol = ?5,
                         connected = ?6, seen_at_ms = ?7
                     WHERE host_sessions.controller = ?2 OR ?6 = 1",
                    params![
                        host.as_str(),
                        &self.me,
                        serde_json::to_string(&labels).expect("labels serialise"),
                        serde_json::to_string(&apps).expect("apps serialise"),
                        protocol,
                        connected,
                        convoy_common::ops::now_unix_ms()
                    ],
                )
                .await;
            if let Err(e) = written {
                // Published at the next round.
                let mut d = self.dirty.lock().unwrap();
                d.extend(dirty[i..].iter().cloned());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads which controllers are up, and the hosts other controllers
    /// published since the last read. A host `held_here` (its session is
    /// live on this controller) that another controller published is
    /// published again at the next round: a controller that was paused
    /// publishes, when it runs again, sessions its hosts have since left
    /// for another; the live session's controller takes the row back, so
    /// the last word is the live session's.
    pub async fn refresh_remote(&self, held_here: impl Fn(&HostName) -> bool) -> Result<(), DbError> {
        let up: HashSet<String> = self
            .db
            .controllers()
            .await?
            .into_iter()
            .filter(|c| c.seen_ago_ms < CONTROLLER_DOWN_MS)
            .map(|c| c.name)
            .collect();
        *self.up.lock().unwrap() = up;
        // Publications overlap reads by a margin: a row written just as
        // the last read ran is read again, never missed.
        let from = *self.read_from.lock().unwrap();
        let now = convoy_common::ops::now_unix_ms();
        let rows = self
            .db
            .query(
                "SELECT host, controller, labels, apps, protocol, connected FROM host_sessions
                 WHERE seen_at_ms >= ?1",
                params![from - 5_000],
            )
            .await?;
        let mut remote = self.remote.lock().unwrap();
        for r in rows {
            let Ok(host) = HostName::new(r.get::<String>(0)?) else {
                continue;
            };
            let controller: String = r.get(1)?;
            if controller == self.me {
                remote.remove(&host);
                continue;
            }
            if held_here(&host) {
                remote.remove(&host);
                self.mark_dirty(&host);
                continue;
            }
            remote.insert(
                host,
                RemoteHost {
                    controller,
                    labels: serde_json::from_str(&r.get::<String>(2)?).unwrap_or_default(),
                    apps: serde_json::from_str(&r.get::<String>(3)?).unwrap_or_default(),
                    protocol: r.get::<i64>(4)? as u32,
                    connected: r.get::<bool>(5)?,
                },
            );
        }
        *self.read_from.lock().unwrap() = now;
        Ok(())
    }

    /// Commands and pre-flights left for hosts this controller holds, not
    /// yet sent on their current session: (session, op id, host, message).
    pub async fn outbound(
        &self,
        session_of: impl Fn(&HostName) -> Option<u64>,
    ) -> Result<Vec<(u64, String, HostName, ControllerMessage)>, DbError> {
        let rows = self
            .db
            .query(
                "SELECT r.op_id, r.host, r.payload FROM relay r
                 JOIN host_sessions s ON s.host = r.host AND s.controller = ?1 AND s.connected = 1
                 WHERE r.kind IN ('command', 'preflight') ORDER BY r.id",
                params![&self.me],
            )
            .await?;
        let mut out = Vec::new();
        let mut sent = self.sent.lock().unwrap();
        for r in rows {
            let (op_id, host): (String, String) = (r.get(0)?, r.get(1)?);
            let Ok(host) = HostName::new(host) else { continue };
            let Some(session) = session_of(&host) else { continue };
            if !sent.insert((session, op_id.clone())) {
                continue;
            }
            let payload: Vec<u8> = r.get(2)?;
            match ControllerMessage::decode(payload.as_slice()) {
                Ok(msg) => out.push((session, op_id, host, msg)),
                Err(e) => tracing::warn!(%op_id, error = %e, "unreadable relayed command dropped"),
            }
        }
        Ok(out)
    }

    /// Results, events, pre-flight answers and control actions other
    /// controllers left for this one, taken (each once); replies to this
    /// one's control actions go straight to their waiters.
    pub async fn inbound(&self) -> Result<Vec<Inbound>, DbError> {
        let mut tx = self.db.begin().await?;
        let rows = tx
            .query(
                "SELECT id, kind, op_id, host, payload FROM relay
                 WHERE target = ?1 AND kind IN ('result', 'event', 'preflight_answer', 'control', 'control_reply')
                 ORDER BY id",
                params![&self.me],
            )
            .await?;
        let mut out = Vec::new();
        for r in &rows {
            let (id, kind, op_id, host, payload): (i64, String, String, String, Vec<u8>) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
            tx.execute("DELETE FROM relay WHERE id = ?1", params![id]).await?;
            match kind.as_str() {
                "control" => {
                    out.extend(
                        serde_json::from_slice(&payload)
                            .ok()
                            .map(|a| Inbound::Control(op_id, a)),
                    );
                    continue;
                }
                "control_reply" => {
                    let waiter = self.asked.lock().unwrap().remove(&op_id);
                    if let (Some(w), Ok(answer)) = (waiter, serde_json::from_slice(&payload)) {
                        let _ = w.send(answer);
                    }
                    continue;
                }
                _ => {}
            }
            let Ok(host) = HostName::new(host) else { continue };
            let item = match kind.as_str() {
                "result" => serde_json::from_slice(&payload)
                    .ok()
                    .map(|r| Inbound::Result(host, Box::new(r))),
                "event" => serde_json::from_slice(&payload).ok().map(|e| Inbound::Event(host, e)),
                _ => serde_json::from_slice(&payload)
                    .ok()
                    .map(|c| Inbound::PreflightAnswer(host, op_id, c)),
            };
            out.extend(item);
        }
        tx.commit().await?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_common::ops::{AppStatus, EventKind, OpKind, Outcome, Step};
    use convoy_common::{AppName, Version};

    fn host(s: &str) -> HostName {
        HostName::new(s).unwrap()
    }

    /// An operator's action taken by controller a, which does not drive the rollout
    /// reaches b, which does, and b's answer (here a refusal, with its
    /// code) comes back to the waiting a.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_control_action_goes_to_the_rollouts_driver_and_its_answer_comes_back() {
        let pg = crate::db::testing::postgres();
        pg.create_database("control").unwrap();
        let o = crate::db::testing::options(&pg.url("control"));
        let a = Arc::new(Relay::new(Arc::new(Db::connect(&o, "a").await.unwrap().0)));
        let b = Relay::new(Arc::new(Db::connect(&o, "b").await.unwrap().0));
        let asking = a.clone();
        let ask = tokio::spawn(async move { asking.ask_control("b", "r1", "approve", "operator alice").await });
        let (key, got) = loop {
            let items = b.inbound().await.unwrap();
            if let Some(Inbound::Control(key, got)) = items.into_iter().next() {
                break (key, got);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            (&*got.asker, &*got.rollout, &*got.action, &*got.who),
            ("a", "r1", "approve", "operator alice")
        );
        let refusal = tonic::Status::failed_precondition("rollout r1 needs no approval");
        b.answer_control(&got.asker, &key, &ControlAnswer::of(Err(refusal)))
            .await
            .unwrap();
        while !ask.is_finished() {
            assert!(a.inbound().await.unwrap().is_empty(), "the reply goes to its waiter");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let e = ask.await.unwrap().unwrap().into_result().unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(e.message(), "rollout r1 needs no approval");
        assert!(a.asked.lock().unwrap().is_empty());
    }

    /// A controller paused while it held web1 publishes web1 again when
    /// it runs, after web1 moved to b: b, whose session is live, takes the
    /// row back at its next round; without its session there it would not.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_live_sessions_controller_has_the_last_word_on_a_host() {
        let pg = crate::db::testing::postgres();
        pg.create_database("reclaim").unwrap();
        let o = crate::db::testing::options(&pg.url("reclaim"));
        let a = Relay::new(Arc::new(Db::connect(&o, "a").await.unwrap().0));
        let b = Relay::new(Arc::new(Db::connect(&o, "b").await.unwrap().0));
        let app = AppName::new("demo").unwrap();
        let state = |connected| Some((BTreeMap::new(), vec![AppStatus::empty(&app)], 1, connected));
        let owner = || async {
            pg.psql(
                "reclaim",
                "SELECT controller, connected FROM host_sessions WHERE host = 'web1'",
            )
            .unwrap()
            .trim()
            .to_owned()
        };
        b.mark_dirty(&host("web1"));
        b.publish(|_| state(true)).await.unwrap();
        // a runs again: first its stale session's publication, then its end.
        a.mark_dirty(&host("web1"));
        a.publish(|_| state(true)).await.unwrap();
        a.mark_dirty(&host("web1"));
        a.publish(|_| state(false)).await.unwrap();
        assert_eq!(owner().await, "a|0", "web1 looks gone, though its session on b lives");
        // Control: a controller without web1's session leaves the row be.
        b.refresh_remote(|_| false).await.unwrap();
        b.publish(|_| state(true)).await.unwrap();
        assert_eq!(owner().await, "a|0");
        // b holds web1's session: it publishes web1 again.
        b.refresh_remote(|h| h == &host("web1")).await.unwrap();
        assert!(
            b.remote_host(&host("web1")).is_none(),
            "b's own host is not remote to it"
        );
        b.publish(|_| state(true)).await.unwrap();
        assert_eq!(owner().await, "b|1");
    }

    /// Two controllers on one database: a (driving rollout r1) and b
    /// (holding web1's session).
    #[tokio::test(flavor = "multi_thread")]
    async fn commands_go_to_the_session_holder_and_results_to_the_lease_owner() {
        let pg = crate::db::testing::postgres();
        pg.create_database("relay").unwrap();
        let o = crate::db::testing::options(&pg.url("relay"));
        let a = Relay::new(Arc::new(Db::connect(&o, "a").await.unwrap().0));
        let b = Relay::new(Arc::new(Db::connect(&o, "b").await.unwrap().0));
        let app = AppName::new("demo").unwrap();
        a.db.start_rollout(&crate::db::testing::deploy("r1", &app, "staging"))
            .await
            .unwrap();
        for r in [&a, &b] {
            r.db.controller_alive(&r.me, "127.0.0.1:1", 0, 1).await.unwrap();
        }
        // b publishes web1 as connected; a sees it.
        b.mark_dirty(&host("web1"));
        b.publish(|_| Some((BTreeMap::new(), vec![AppStatus::empty(&app)], 1, true)))
            .await
            .unwrap();
        a.refresh_remote(|_| false).await.unwrap();
        let seen = a.remote_host(&host("web1")).expect("a sees web1");
        assert!(seen.connected && seen.controller == "b");
        // a leaves a command; b sends it once per session.
        let op = OpId::new("r1", OpKind::Activate, &host("web1"));
        let msg = ControllerMessage { body: None, epoch: 1 };
        a.leave("command", &op.to_string(), &host("web1"), &msg).await.unwrap();
        let out = b.outbound(|_| Some(7)).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].0, out[0].1.as_str(), out[0].3.epoch),
            (7, op.to_string().as_str(), 1)
        );
        assert!(
            b.outbound(|_| Some(7)).await.unwrap().is_empty(),
            "sent once on this session"
        );
        assert_eq!(
            b.outbound(|_| Some(8)).await.unwrap().len(),
            1,
            "again on a new session"
        );
        // The host answers on b: the result goes to a, the lease owner.
        let event = StepEvent {
            op_id: op.to_string(),
            app: app.clone(),
            step: Step::Stage,
            kind: EventKind::Info,
            message: "fetching".into(),
            at_unix_ms: 1,
        };
        b.forward_event(&host("web1"), &event).await.unwrap();
        let report = OpReport {
            op_id: op.to_string(),
            app: app.clone(),
            version: Version::new("1.0.0").unwrap(),
            outcome: Outcome::Succeeded,
            reason: String::new(),
            restore_detail: String::new(),
            state: AppStatus::empty(&app),
        };
        assert!(b.forward_result(&host("web1"), &report).await.unwrap());
        b.answered(&op.to_string()).await.unwrap();
        assert!(
            b.outbound(|_| Some(9)).await.unwrap().is_empty(),
            "answered: no longer pending"
        );
        assert!(b.inbound().await.unwrap().is_empty(), "nothing for b");
        let got = a.inbound().await.unwrap();
        assert!(
            matches!(&got[..], [Inbound::Event(_, e), Inbound::Result(_, r)] if e.message == "fetching" && r.op_id == op.to_string())
        );
        assert!(a.inbound().await.unwrap().is_empty(), "taken once");
        // a's own rollout: nothing to forward.
        assert!(!a.forward_result(&host("web1"), &report).await.unwrap());
        // Left and never taken: swept after the given age.
        a.leave("command", "r2:activate:web9", &host("web9"), &msg)
            .await
            .unwrap();
        assert_eq!(a.sweep(3_600_000).await.unwrap(), 0);
        assert_eq!(a.sweep(-1_000).await.unwrap(), 1);
    }
}
