//! The rollout engine, a domain module: it knows neither tonic nor prost.
//!
//! The gRPC edge (`server::operator`) turns requests into validated orders
//! ([`order`]) and the engine's [`events`] into wire events. The engine
//! reaches hosts through a [`fleet::Fleet`] (the session registry, or an
//! in-process fleet in tests), keeps everything in a
//! [`store::RolloutStore`], and calls the [`seams`] around each host's
//! activation and after each batch. Operators' pause, resume, abort,
//! approve and promote are a pure state machine ([`control`]).
//!
//! - planning (this file): targets, batches, the promotion rule, one
//!   rollout per app and environment;
//! - [`run`]: one rollout from approval to its end;
//! - [`resume`]: rollouts a previous controller left running, and results
//!   that arrive after their rollout stopped waiting.

pub mod analysis;
pub mod control;
pub mod dry_run;
pub mod events;
pub mod fleet;
pub mod freeze;
pub mod order;
pub mod preflight;
mod resume;
mod run;
pub mod seams;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_common::ops::ActivateCommand;
use convoy_common::spec::AppSpec;
use convoy_common::{AppName, HostName};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use control::{Action, Control};
use events::{Event, EventBody, Plan, PlannedBatch};
use fleet::{Fleet, FleetHost};
use order::{DeployOrder, RollbackOrder, Vanish};
use run::{Head, Kind, Rollout, SavedPlan};
use seams::{HostSteps, MetricSource, NoSteps};
use store::{NewRollout, RolloutStore, StoreError};

/// Why the engine refused a request; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    /// Another rollout holds the app and environment.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Permission(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

pub struct EngineConfig {
    /// Where app specs are (`APP.toml`).
    pub apps_dir: PathBuf,
    /// How long one host's operation may take.
    pub host_timeout: Duration,
    /// Hosts pre-staged at once.
    pub prestage_parallel: usize,
    /// How long a resumed rollout waits for its hosts to reconnect.
    pub reconnect_grace: Duration,
}

/// One rule that may hold a deploy back, and what it says.
#[derive(Debug)]
pub struct Gatekeeper {
    pub name: &'static str,
    /// What lets the deploy through, or why it is refused.
    pub verdict: Result<String, Refused>,
}

/// A deploy as planned, before anything happens.
pub struct DeployPlan {
    pub spec: AppSpec,
    pub plan: Plan,
    pub verdicts: Vec<Gatekeeper>,
    kind: Kind,
    targets: Vec<FleetHost>,
    /// What an admin's hotfix passes (a freeze, a window).
    passes: Option<Vec<String>>,
}

/// A running rollout as others reach it: to watch it or to control it.
struct Live {
    events: broadcast::Sender<Event>,
    control: watch::Sender<Control>,
    /// Ends the rollout's task where it is (its lease was lost).
    stop: CancellationToken,
    /// What it was planned to do, for those who start watching late (none
    /// for a resumed rollout).
    plan: Option<Plan>,
}

pub struct Engine {
    cfg: EngineConfig,
    fleet: Arc<dyn Fleet>,
    store: Arc<dyn RolloutStore>,
    notifier: crate::webhooks::Notifier,
    steps: Arc<dyn HostSteps>,
    /// Where metric gates are measured; none without `prometheus_url`.
    metrics: Option<Arc<dyn MetricSource>>,
    /// Configuration revisions and their rendering.
    config: Option<Arc<dyn seams::ConfigSource>>,
    /// Environment → its freeze (also expired ones, until lifted).
    freezes: watch::Sender<BTreeMap<String, store::Freeze>>,
    /// (app, environment) → the rollout running there.
    running: Mutex<HashMap<(AppName, String), String>>,
    live: Mutex<HashMap<String, Live>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Engine {
    /// An engine whose rollout tasks end when `stop` is cancelled (their
    /// state stays in the store, for the next controller to resume) and
    /// are tracked by `tasks`.
    pub fn new(
        cfg: EngineConfig,
        fleet: Arc<dyn Fleet>,
        store: Arc<dyn RolloutStore>,
        notifier: crate::webhooks::Notifier,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Engine {
            cfg,
            fleet,
            store,
            notifier,
            steps: Arc::new(NoSteps),
            metrics: None,
            config: None,
            freezes: watch::channel(BTreeMap::new()).0,
            running: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            stop,
            tasks,
        }
    }

    /// Puts `steps` around every host's activation.
    pub fn with_steps(mut self, steps: Arc<dyn HostSteps>) -> Self {
        self.steps = steps;
        self
    }

    /// Takes deploys' configuration from `source`.
    pub fn with_config(mut self, source: Arc<dyn seams::ConfigSource>) -> Self {
        self.config = Some(source);
        self
    }

    /// Parity: how the configuration differs from the one this version
    /// passed the environment before with (plan notes); with `parity =
    /// "strict"`, a key set on one side only refuses the deploy.
    async fn parity(
        &self,
        spec: &AppSpec,
        app: &AppName,
        version: &convoy_common::Version,
        env: &str,
        pos: usize,
        revision: Option<u64>,
    ) -> Result<Vec<String>, Refused> {
        let (Some(c), Some(rev), Some(before)) = (
            &self.config,
            revision,
            pos.checked_sub(1).map(|p| &spec.environments[p]),
        ) else {
            return Ok(vec![]);
        };
        let Some((passed, diff)) = c
            .against_passed(app, version, before, env, rev)
            .await
            .map_err(Refused::Precondition)?
        else {
            return Ok(vec![]);
        };
        let one_sided: Vec<&str> = diff
            .iter()
            .filter(|(_, how)| *how != "changed")
            .map(|(k, _)| k.as_str())
            .collect();
        if spec.strict_parity && !one_sided.is_empty() {
            return Err(Refused::Precondition(format!(
                "deploy refused, nothing was changed: parity = \"strict\": set in only one of {before} (revision {passed}, which {version} passed) and {env} (revision {rev}): {}",
                one_sided.join(", ")
            )));
        }
        let said: Vec<String> = diff
            .iter()
            .map(|(k, how)| match *how {
                "only-from" => format!("{k} (only in {before})"),
                "only-to" => format!("{k} (only in {env})"),
                _ => format!("{k} (differs)"),
            })
            .collect();
        Ok(vec![if said.is_empty() {
            format!("configuration: the same values as {before}'s revision {passed}, which {version} passed")
        } else {
            format!(
                "configuration differs from {before}'s revision {passed}, which {version} passed: {}",
                said.join(", ")
            )
        }])
    }

    /// Renders a revision for a host's activation.
    pub(super) async fn render_config(
        &self,
        app: &AppName,
        env: &str,
        version: &convoy_common::Version,
        revision: u64,
        host: &HostName,
    ) -> Result<convoy_common::ops::RenderedConfig, String> {
        let Some(c) = &self.config else {
            return Err("this controller keeps no configuration".into());
        };
        let labels = self.fleet.host(host).map(|h| h.labels).unwrap_or_default();
        c.render(app, env, version, revision, (host.as_str(), &labels)).await
    }

    /// Measures metric gates on `source`.
    pub fn with_metrics(mut self, source: Arc<dyn MetricSource>) -> Self {
        self.metrics = Some(source);
        self
    }

    /// The app spec of `app`, checked.
    pub fn load_spec(&self, app: &AppName) -> Result<AppSpec, Refused> {
        let path = self.cfg.apps_dir.join(format!("{app}.toml"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Refused::Precondition(format!("no app spec for {app}: {}: {e}", path.display())))?;
        let spec =
            AppSpec::parse(&path.display().to_string(), &text).map_err(|e| Refused::Precondition(e.to_string()))?;
        if spec.install.app != *app {
            return Err(Refused::Precondition(format!(
                "{}: name is {:?} but the file is named for {app}",
                path.display(),
                spec.install.app.as_str()
            )));
        }
        Ok(spec)
    }

    /// What a host last said about an app's blue-green slots.
    pub(super) fn fleet_slots(&self, host: &HostName, app: &AppName) -> Vec<convoy_common::slots::SlotStatus> {
        self.fleet
            .host(host)
            .and_then(|h| h.apps.get(app).map(|a| a.slots.clone()))
            .unwrap_or_default()
    }

    /// Hosts of `env` that match the spec's and the order's labels:
    /// (connected, not connected), sorted by name.
    fn hosts_in(
        &self,
        env: &str,
        selector: &BTreeMap<String, String>,
        select: &BTreeMap<String, String>,
    ) -> (Vec<FleetHost>, Vec<FleetHost>) {
        let mut hosts = self.fleet.hosts();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        hosts
            .into_iter()
            .filter(|h| h.labels.get("env").map(String::as_str) == Some(env))
            .filter(|h| {
                selector
                    .iter()
                    .chain(select.iter())
                    .all(|(k, v)| h.labels.get(k) == Some(v))
            })
            .partition(|h| h.connected)
    }

    /// Everything a deploy decides before it starts, with no side
    /// effect: what `start_deploy` acts on and `--dry-run` shows. Input
    /// that makes no deploy at all (an unknown environment, a release
    /// never pushed, no target) is an error; the rules that may hold a
    /// deploy back are verdicts.
    pub async fn plan_deploy(&self, who: &str, o: &DeployOrder) -> Result<DeployPlan, Refused> {
        let (app, version, env) = (&o.app, &o.version, &o.env);
        let spec = self.load_spec(app)?;
        let Some(pos) = spec.environments.iter().position(|e| e == env) else {
            return Err(Refused::Invalid(format!(
                "environment {env:?} is not one of {app}'s environments ({})",
                spec.environments.join(", ")
            )));
        };
        let release = self.store.release(app, version).await?.ok_or_else(|| {
            Refused::NotFound(format!(
                "{app} {version} has not been pushed; run `convoy release push {app} {version} FILE`"
            ))
        })?;
        let mut verdicts = Vec::new();
        let clearance = self.clearance(&spec, env, o.hotfix.as_deref(), o.admin);
        let passes = match &clearance {
            Ok(freeze::Clearance::Passes(held)) => Some(held.clone()),
            _ => None,
        };
        verdicts.push(Gatekeeper {
            name: "freeze and windows",
            verdict: match clearance {
                Ok(freeze::Clearance::Clear) => Ok(if spec.windows.is_empty() {
                    format!("{env} is not frozen")
                } else {
                    format!("{env} is not frozen; inside {app}'s deploy windows")
                }),
                Ok(freeze::Clearance::Passes(held)) => Ok(format!("hotfix by {who} passes: {}", held.join("; "))),
                Err(e) => Err(e),
            },
        });
        verdicts.push(Gatekeeper {
            name: "metric gates",
            verdict: match (&spec.analysis, &self.metrics) {
                (None, _) => Ok("none in the spec".into()),
                (Some(a), Some(_)) => Ok(format!("{} metric(s), measured every {}", a.metrics.len(), humantime::format_duration(a.interval))),
                (Some(_), None) => Err(Refused::Precondition(format!(
                    "{app}'s spec has metric gates ([analysis]) but the controller has no prometheus_url to measure them on"
                ))),
            },
        });
        // Promotion: a version enters an environment only after it
        // completed in the one before, unless this is a recorded hotfix.
        verdicts.push(Gatekeeper {
            name: "promotion",
            verdict: if !spec.promotion {
                Ok("off: environments are independent".into())
            } else if pos == 0 {
                Ok(format!("{env} is the first environment"))
            } else if let Some(reason) = &o.hotfix {
                Ok(format!("skipped by a hotfix: {}", reason.trim()))
            } else {
                let before = &spec.environments[pos - 1];
                if self.store.completed_in(app, version, before).await? {
                    Ok(format!("{app} {version} completed in {before}"))
                } else {
                    Err(Refused::Precondition(format!(
                        "{app} {version} has not completed in {before}, which comes before {env}; deploy it there first, \
                         or pass --hotfix --reason TEXT"
                    )))
                }
            },
        });
        verdicts.push(Gatekeeper {
            name: "approval",
            verdict: Ok(if spec.approval.contains(env) {
                format!("{env} needs approval: the rollout waits for an operator other than {who}")
            } else {
                "not needed".into()
            }),
        });
        let (connected, missing) = self.hosts_in(env, &spec.selector, &o.select);
        if connected.is_empty() {
            return Err(Refused::Precondition(format!(
                "no connected host has label env={env}{}",
                spec.selector
                    .iter()
                    .chain(o.select.iter())
                    .map(|(k, v)| format!(", {k}={v}"))
                    .collect::<String>()
            )));
        }
        // Explicit order first, then the rest by name.
        let mut targets: Vec<FleetHost> = Vec::new();
        let mut rest = connected;
        for name in &o.order {
            let Some(i) = rest.iter().position(|h| h.name == *name) else {
                return Err(Refused::Invalid(format!(
                    "--order names {name}, which is not a connected target of this rollout"
                )));
            };
            targets.push(rest.remove(i));
        }
        targets.extend(rest);
        // A labelled canary group goes first, in the order so far.
        let group = if o.canary_group.is_empty() {
            0
        } else {
            let in_group = |h: &FleetHost| o.canary_group.iter().all(|(k, v)| h.labels.get(k) == Some(v));
            let (mut first, rest): (Vec<FleetHost>, Vec<FleetHost>) = targets.into_iter().partition(in_group);
            if first.is_empty() {
                let labels: Vec<String> = o.canary_group.iter().map(|(k, v)| format!("{k}={v}")).collect();
                return Err(Refused::Precondition(format!(
                    "--canary-group {}: no connected target has these labels",
                    labels.join(",")
                )));
            }
            let n = first.len();
            first.extend(rest);
            targets = first;
            n
        };
        let budget = o.failure_budget.hosts(targets.len());
        let contents = self.store.release_contents(app, version).await?;
        let preflight = preflight::command(&spec, &release, contents.as_ref());
        // Each host's command gets its own operation id when it is sent.
        let cmd = ActivateCommand {
            op_id: String::new(),
            spec: spec.install.clone(),
            version: version.clone(),
            digest: release.digest,
            size: release.size,
            signature: release.signature.clone(),
            // Filled in as the command goes to a host.
            manifest: None,
            config: None,
        };
        // The configuration the release declares must fit before anything moves.
        let config_revision = match &self.config {
            Some(c) => c
                .for_deploy(
                    app,
                    env,
                    version,
                    o.config_revision,
                    &targets.iter().map(|h| (h.name.as_str(), &h.labels)).collect::<Vec<_>>(),
                )
                .await
                .map_err(|e| Refused::Precondition(format!("deploy refused, nothing was changed: {e}")))?,
            None => None,
        };
        let config_notes = self.parity(&spec, app, version, env, pos, config_revision).await?;
        if o.blue_green && spec.install.blue_green.is_none() {
            return Err(Refused::Invalid(format!(
                "--strategy blue-green: {app}'s spec has no [blue_green], so its hosts run one install; add [blue_green] (slot ports, keep_warm) to run two slots"
            )));
        }
        let mut strategy_text = describe(&o.strategy.describe(), group, o.manual_promote, o.vanish);
        if let Some(bg) = &spec.install.blue_green {
            strategy_text.push_str(&format!(
                ", blue-green slots (keep_warm {})",
                humantime::format_duration(bg.keep_warm)
            ));
        }
        if let Some(a) = &spec.analysis {
            let names: Vec<&str> = a.metrics.iter().map(|m| m.name.as_str()).collect();
            strategy_text.push_str(&format!(", metric gates {}", names.join(", ")));
        }
        let kind = Kind::Deploy {
            cmd: Box::new(cmd),
            strategy: o.strategy.clone(),
            budget,
            rollback_on_halt: o.rollback_on_halt,
            group,
            manual_promote: o.manual_promote,
            vanish: o.vanish,
            analysis: spec.analysis.clone().map(Box::new),
            passes_freeze: passes.is_some(),
            preflight: Some(Box::new(preflight)),
            traffic: spec.traffic.clone().map(Box::new),
            config_revision,
        };
        let names: Vec<HostName> = targets.iter().map(|h| h.name.clone()).collect();
        let plan = Plan {
            hosts: names.clone(),
            digest: release.digest.to_hex(),
            skipped_hosts: missing.into_iter().map(|h| h.name).collect(),
            batches: o
                .strategy
                .batches_after_group(names.len(), group)
                .into_iter()
                .map(|(range, bake)| PlannedBatch {
                    hosts: names[range].to_vec(),
                    bake,
                })
                .collect(),
            strategy: strategy_text,
            failure_budget: budget,
            notes: passes
                .iter()
                .map(|held| format!("hotfix by {who} passes: {}", held.join("; ")))
                .chain(config_revision.map(|r| match r {
                    0 => "configuration: the release's defaults (no revision set)".to_owned(),
                    r => format!("configuration revision {r}"),
                }))
                .chain(config_notes)
                .collect(),
        };
        Ok(DeployPlan {
            spec,
            plan,
            verdicts,
            kind,
            targets,
            passes,
        })
    }

    /// Plans and starts a deploy; returns its event stream.
    pub async fn start_deploy(
        self: &Arc<Self>,
        who: &str,
        o: DeployOrder,
    ) -> Result<broadcast::Receiver<Event>, Refused> {
        let (app, version, env) = (&o.app, &o.version, &o.env);
        let mut p = self.plan_deploy(who, &o).await?;
        for g in std::mem::take(&mut p.verdicts) {
            g.verdict?;
        }
        let control = if p.spec.approval.contains(env) {
            Control::AwaitApproval(who.to_owned())
        } else {
            Control::Run
        };
        let strategy_text = p.plan.strategy.clone();
        let rollout = self.claim(who, app, env, p.kind, &p.targets, control)?;
        let record = NewRollout {
            id: &rollout.id,
            app,
            version: version.as_str(),
            env,
            kind: "deploy",
            strategy: &strategy_text,
            hotfix_reason: o.hotfix.as_deref().map(str::trim).unwrap_or(""),
            operator: who,
            plan: &rollout.saved_plan(),
        };
        if let Err(e) = self.store.start_rollout(&record).await {
            self.release_slot(app, env);
            return Err(match e.is_busy() {
                true => Refused::Busy(e.to_string()),
                false => e.into(),
            });
        }
        if let Some(held) = &p.passes {
            let detail = format!(
                "rollout {} of {app} {version} passed: {} (hotfix: {})",
                rollout.id,
                held.join("; "),
                o.hotfix.as_deref().unwrap_or("").trim()
            );
            if let Err(e) = self.store.audit(who, "hotfix_pass", env, &detail).await {
                tracing::error!(error = %e, "could not audit a hotfix pass");
            }
            tracing::warn!(rollout = %rollout.id, by = %who, "{detail}");
            self.notifier
                .send(self.environment_payload("hotfix_passed", who, env, &detail));
        }
        tracing::info!(rollout = %rollout.id, %app, %version, %env, by = %who, hotfix = o.hotfix.is_some(), "deploy started");
        Ok(self.launch(rollout, false, Some(p.plan)))
    }

    /// Checks and starts a manual rollback; returns its event stream. It
    /// is refused before anything changes if a host does not hold its
    /// target.
    pub async fn start_rollback(
        self: &Arc<Self>,
        who: &str,
        o: RollbackOrder,
    ) -> Result<broadcast::Receiver<Event>, Refused> {
        let (app, env) = (&o.app, &o.env);
        let spec = self.load_spec(app)?;
        if !spec.environments.contains(env) {
            return Err(Refused::Invalid(format!(
                "environment {env:?} is not one of {app}'s environments"
            )));
        }
        if let Some(v) = &o.to {
            if self.store.release(app, v).await?.is_none() {
                return Err(Refused::NotFound(format!(
                    "rollback refused, nothing was changed: {app} {v} was never pushed"
                )));
            }
        }
        let (connected, missing) = self.hosts_in(env, &spec.selector, &BTreeMap::new());
        let mut targets = connected;
        if !o.hosts.is_empty() {
            for h in &o.hosts {
                if !targets.iter().chain(missing.iter()).any(|t| t.name == *h) {
                    return Err(Refused::Invalid(format!(
                        "--hosts names {h}, which is not a host of {app} in {env}"
                    )));
                }
            }
            targets.retain(|t| o.hosts.contains(&t.name));
        }
        // Every host must hold its target: checked for all before any is touched.
        let mut problems: Vec<String> = missing
            .iter()
            .filter(|h| o.hosts.is_empty() || o.hosts.contains(&h.name))
            .map(|h| format!("{} is not connected", h.name))
            .collect();
        for h in &targets {
            let state = h.apps.get(app);
            let want = o.to.clone().or_else(|| state.and_then(|s| s.previous.clone()));
            match (want, state) {
                (None, _) => problems.push(format!("{} has no previous release of {app}", h.name)),
                (Some(v), Some(s)) if s.releases.contains(&v) || s.current.as_ref() == Some(&v) => {}
                (Some(v), _) => problems.push(format!("{} no longer holds {app} {v}", h.name)),
            }
        }
        if targets.is_empty() && problems.is_empty() {
            problems.push(format!("no host of {app} in {env}"));
        }
        if !problems.is_empty() {
            return Err(Refused::Precondition(format!(
                "rollback refused, nothing was changed: {}",
                problems.join("; ")
            )));
        }
        let version =
            o.to.as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "previous".into());
        let names: Vec<HostName> = targets.iter().map(|h| h.name.clone()).collect();
        let budget = o.failure_budget.hosts(names.len());
        let plan = Plan {
            hosts: names.clone(),
            digest: String::new(),
            skipped_hosts: vec![],
            batches: o
                .strategy
                .batches(names.len())
                .into_iter()
                .map(|(range, bake)| PlannedBatch {
                    hosts: names[range].to_vec(),
                    bake,
                })
                .collect(),
            strategy: format!("rollback to {version}, {}", o.strategy.describe()),
            failure_budget: budget,
            notes: vec![],
        };
        let kind = Kind::Rollback {
            to: o.to.clone(),
            strategy: o.strategy.clone(),
            budget,
            traffic: spec.traffic.clone().map(Box::new),
            blue_green: spec.install.blue_green.clone(),
        };
        let rollout = self.claim(who, app, env, kind, &targets, Control::Run)?;
        let record = NewRollout {
            id: &rollout.id,
            app,
            version: &version,
            env,
            kind: "rollback",
            strategy: &o.strategy.describe(),
            hotfix_reason: "",
            operator: who,
            plan: &rollout.saved_plan(),
        };
        if let Err(e) = self.store.start_rollout(&record).await {
            self.release_slot(app, env);
            return Err(match e.is_busy() {
                true => Refused::Busy(e.to_string()),
                false => e.into(),
            });
        }
        tracing::info!(rollout = %rollout.id, %app, %env, to = %version, by = %who, "rollback started");
        Ok(self.launch(rollout, false, Some(plan)))
    }

    /// Claims the (app, environment) slot, one rollout at a time there,
    /// and makes the rollout.
    fn claim(
        &self,
        who: &str,
        app: &AppName,
        env: &str,
        kind: Kind,
        targets: &[FleetHost],
        control: Control,
    ) -> Result<Rollout, Refused> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        {
            let mut running = self.running.lock().unwrap();
            let key = (app.clone(), env.to_owned());
            if let Some(other) = running.get(&key) {
                return Err(Refused::Busy(format!(
                    "rollout {other} of {app} to {env} is still running"
                )));
            }
            running.insert(key, id.clone());
        }
        let plan = SavedPlan {
            kind,
            targets: targets.iter().map(|h| h.name.clone()).collect(),
            before: targets
                .iter()
                .map(|h| (h.name.clone(), h.apps.get(app).and_then(|s| s.current.clone())))
                .collect(),
        };
        let head = Head {
            id,
            operator: who.to_owned(),
            app: app.clone(),
            env: env.to_owned(),
        };
        Ok(Rollout::new(head, plan, HashMap::new(), control))
    }

    fn release_slot(&self, app: &AppName, env: &str) {
        self.running.lock().unwrap().remove(&(app.clone(), env.to_owned()));
    }

    /// Runs `rollout` in a task of its own, owned by the engine; callers
    /// only watch its events, so an operator going away does not stop it.
    fn launch(self: &Arc<Self>, rollout: Rollout, resumed: bool, plan: Option<Plan>) -> broadcast::Receiver<Event> {
        let rx = rollout.tx.subscribe();
        let stop = self.stop.child_token();
        self.live.lock().unwrap().insert(
            rollout.id.clone(),
            Live {
                events: rollout.tx.clone(),
                control: rollout.control.clone(),
                stop: stop.clone(),
                plan: plan.clone(),
            },
        );
        let (store, id) = (self.store.clone(), rollout.id.clone());
        let run = rollout.run(self.clone(), resumed, plan);
        self.tasks.spawn(async move {
            tokio::select! {
                () = run => {}
                // Stopped mid-way (the controller stops, or lost the lease):
                // the rollout stays in the store for whoever resumes it.
                () = stop.cancelled() => store.let_go(&id),
            }
        });
        rx
    }

    /// Runs `task` until it ends or the engine stops.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// Applies an operator's action to a running rollout; returns what the
    /// operator is told.
    pub async fn control(&self, id: &str, action: Action, who: &str) -> Result<String, Refused> {
        let (now, applied) = {
            let live = self.live.lock().unwrap();
            match live.get(id) {
                None => (None, None),
                Some(l) => {
                    let now = l.control.borrow().clone();
                    let applied = control::apply(&now, action, who).map_err(|r| {
                        let message = r.message(id);
                        if r.is_permission() {
                            Refused::Permission(message)
                        } else {
                            Refused::Precondition(message)
                        }
                    })?;
                    (Some(now), Some(applied))
                }
            }
        };
        let (Some(now), Some(applied)) = (now, applied) else {
            return Err(match self.store.rollout(id).await? {
                Some(row) => Refused::Precondition(format!("rollout {id} is not running (state: {})", row.state)),
                None => Refused::NotFound(format!("no rollout {id}")),
            });
        };
        // The approval is recorded before the rollout may go on.
        if applied.approved {
            self.store.approve(id, who).await?;
        }
        tracing::info!(rollout = %id, by = %who, ?action, "rollout control");
        if applied.next != now {
            if let Some(l) = self.live.lock().unwrap().get(id) {
                l.control.send_replace(applied.next);
            }
        }
        Ok(applied.reply)
    }

    /// Whether this controller drives rollout `id` now.
    pub fn drives(&self, id: &str) -> bool {
        self.live.lock().unwrap().contains_key(id)
    }

    /// A running rollout's plan, as it was sent when it started.
    pub fn plan_of(&self, id: &str) -> Option<Event> {
        let live = self.live.lock().unwrap();
        let plan = live.get(id)?.plan.clone()?;
        Some(Event {
            rollout_id: id.to_owned(),
            body: EventBody::Plan(plan),
        })
    }

    /// A running rollout's event stream, from now until it ends.
    pub async fn watch(&self, id: &str) -> Result<broadcast::Receiver<Event>, Refused> {
        if let Some(l) = self.live.lock().unwrap().get(id) {
            return Ok(l.events.subscribe());
        }
        Err(match self.store.rollout(id).await? {
            Some(row) => Refused::Precondition(format!(
                "rollout {id} has ended (state: {}); see `convoy history --rollout {id}`",
                row.state
            )),
            None => Refused::NotFound(format!("no rollout {id}")),
        })
    }
}

/// The strategy as history and the plan show it.
fn describe(strategy: &str, group: usize, manual_promote: bool, vanish: Vanish) -> String {
    let mut s = strategy.to_owned();
    if group > 0 {
        s = format!("canary group of {group} first, then {s}");
    }
    if manual_promote {
        s.push_str(", promoted by hand");
    }
    if vanish.wait {
        s.push_str(", waiting for vanished hosts");
    }
    s
}
