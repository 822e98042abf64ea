//! The operator-facing gRPC service: push releases, deploy, status.

use std::pin::Pin;
use std::sync::Arc;

use convoy_common::identity::Role;
use convoy_common::spec::AppSpec;
use convoy_common::{AppName, Version};
use convoy_proto::operator_service_server::OperatorService;
use convoy_proto::{
    push_request, ControlReply, ControlRequest, DeployRequest, EventRecord, HistoryReply, HistoryRequest, HostInfo,
    HostRecord, HostStatus, HostsReply, HostsRequest, PushReply, PushRequest, ReleaseInfo, ReleasesReply,
    ReleasesRequest, ReportReply, ReportRequest, RollbackRequest, RolloutEvent, RolloutRecord, StatusReply,
    StatusRequest, WatchRequest,
};
use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{internal, operator, Shared};
use crate::db::{DbError, Release};
use crate::rollout::control::Action;
use crate::rollout::events::Event;
use crate::rollout::order::{DeployOrder, InvalidOrder, RollbackOrder};

pub struct OperatorApi {
    pub shared: Arc<Shared>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Largest artifact accepted by push.
const MAX_ARTIFACT: u64 = 16 << 30;

/// A rollout's events for an operator, as wire events; a slow reader skips
/// what it missed. Ends with the rollout, or when the controller stops.
fn event_stream(shared: &Shared, rx: tokio::sync::broadcast::Receiver<Event>) -> BoxStream<RolloutEvent> {
    let events = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|item| item.ok().map(|e| Ok((&e).into())));
    Box::pin(futures::StreamExt::take_until(
        events,
        shared.stop.clone().cancelled_owned(),
    ))
}

pub fn load_spec(shared: &Shared, app: &AppName) -> Result<AppSpec, Status> {
    Ok(shared.engine.load_spec(app)?)
}

fn invalid(e: InvalidOrder) -> Status {
    Status::invalid_argument(e.to_string())
}

fn arg<T>(field: &str, r: Result<T, convoy_common::names::InvalidName>) -> Result<T, Status> {
    r.map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    type DeployStream = BoxStream<RolloutEvent>;
    type RollbackStream = BoxStream<RolloutEvent>;
    type WatchStream = BoxStream<RolloutEvent>;

    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        operator(&req, Role::Viewer, "read reports")?;
        let r = req.into_inner();
        let app = arg("app", AppName::new(r.app))?;
        let now = convoy_common::ops::now_unix_ms();
        let since = now - (r.since_secs.min(10 * 365 * 86_400) as i64) * 1000;
        // Buckets start at a multiple of their length (a day's at 00:00
        // UTC), so the first may begin before the window.
        let bucket_ms = match r.bucket_secs {
            0 => None,
            b => Some((b.clamp(3600, 366 * 86_400) as i64) * 1000),
        };
        if let Some(b) = bucket_ms.filter(|b| (now - since) / b > 1000) {
            return Err(Status::invalid_argument(format!(
                "bucket_secs: {} buckets of {} s in the window; at most 1000",
                (now - since) / b,
                b / 1000
            )));
        }
        let first = bucket_ms.map_or(since, |b| since - since.rem_euclid(b));
        let rows = self.shared.db.report_rows(&app, first).await.map_err(internal)?;
        let in_window: Vec<_> = rows.iter().filter(|r| r.3 >= since).cloned().collect();
        let rep = crate::db::Report::from_rows(&in_window, since, now);
        let buckets = bucket_ms.map_or_else(Vec::new, |b| {
            crate::db::Report::buckets(&rows, first, now, b)
                .into_iter()
                .map(|(start, rep)| convoy_proto::ReportBucket {
                    start_unix_ms: start,
                    deploys: rep.deploys,
                    failed_deploys: rep.failed_deploys,
                    mean_time_to_restore_secs: rep.mean_time_to_restore_secs,
                })
                .collect()
        });
        Ok(Response::new(ReportReply {
            buckets,
            deploys: rep.deploys,
            failed_deploys: rep.failed_deploys,
            deploys_per_day: rep.deploys_per_day,
            change_failure_rate: rep.change_failure_rate,
            mean_time_to_restore_secs: rep.mean_time_to_restore_secs,
            restores_measured: rep.restores_measured,
            since_unix_ms: since,
        }))
    }

    async fn hosts(&self, req: Request<HostsRequest>) -> Result<Response<HostsReply>, Status> {
        operator(&req, Role::Viewer, "list hosts")?;
        let r = req.into_inner();
        let mut matching: Vec<_> = self
            .shared
            .registry
            .hosts()
            .into_iter()
            .filter(|h| {
                r.filter.is_empty()
                    || h.name.as_str().contains(&r.filter)
                    || h.labels.values().any(|v| v.contains(&r.filter))
            })
            .collect();
        matching.sort_by(|a, b| a.name.cmp(&b.name));
        let total = matching.len() as u32;
        let limit = match r.limit {
            0 => usize::MAX,
            n => n as usize,
        };
        let hosts = matching
            .into_iter()
            .skip(r.offset as usize)
            .take(limit)
            .map(|h| {
                let mut apps: Vec<_> = h.apps.values().map(Into::into).collect();
                apps.sort_by(|a: &convoy_proto::AppState, b| a.app.cmp(&b.app));
                HostInfo {
                    host: h.name.to_string(),
                    connected: h.connected(),
                    labels: h.labels.into_iter().collect(),
                    last_seen_unix_ms: h.last_seen_ms,
                    apps,
                }
            })
            .collect();
        Ok(Response::new(HostsReply { hosts, total }))
    }

    async fn create_enroll_token(
        &self,
        req: Request<convoy_proto::CreateTokenRequest>,
    ) -> Result<Response<convoy_proto::CreateTokenReply>, Status> {
        let who = operator(&req, Role::Admin, "create enrollment tokens")?;
        let r = req.into_inner();
        let labels = r.labels.into_iter().collect();
        let ttl = std::time::Duration::from_millis(r.ttl_ms);
        let (token, expires_at_unix_ms) =
            super::enroll::create_token(&self.shared, &who, &r.name, &labels, ttl).await?;
        Ok(Response::new(convoy_proto::CreateTokenReply {
            token,
            expires_at_unix_ms,
        }))
    }

    async fn revoke_host(
        &self,
        req: Request<convoy_proto::RevokeRequest>,
    ) -> Result<Response<convoy_proto::RevokeReply>, Status> {
        let who = operator(&req, Role::Admin, "revoke hosts")?;
        let was_connected = super::enroll::revoke(&self.shared, &who, &req.get_ref().host).await?;
        Ok(Response::new(convoy_proto::RevokeReply { was_connected }))
    }

    async fn freeze(
        &self,
        req: Request<convoy_proto::FreezeRequest>,
    ) -> Result<Response<convoy_proto::FreezeReply>, Status> {
        let who = operator(&req, Role::Admin, "freeze environments")?;
        let r = req.into_inner();
        let span = (r.for_ms > 0).then(|| std::time::Duration::from_millis(r.for_ms));
        let f = self
            .shared
            .engine
            .freeze(&who.to_string(), &r.environment, &r.reason, span)
            .await?;
        Ok(Response::new(convoy_proto::FreezeReply {
            freeze: Some(freeze_info(f)),
        }))
    }

    async fn unfreeze(
        &self,
        req: Request<convoy_proto::UnfreezeRequest>,
    ) -> Result<Response<convoy_proto::FreezeReply>, Status> {
        let who = operator(&req, Role::Admin, "unfreeze environments")?;
        let f = self
            .shared
            .engine
            .unfreeze(&who.to_string(), &req.get_ref().environment)
            .await?;
        Ok(Response::new(convoy_proto::FreezeReply {
            freeze: Some(freeze_info(f)),
        }))
    }

    async fn config_set(
        &self,
        req: Request<convoy_proto::ConfigSetRequest>,
    ) -> Result<Response<convoy_proto::ConfigSetReply>, Status> {
        let who = operator(&req, Role::Deployer, "change configuration")?;
        let r = req.into_inner();
        let app = self.config_env(&r.app, &r.environment)?;
        let (revision, change) = self
            .shared
            .appconfig
            .change(
                &app,
                &r.environment,
                &who.to_string(),
                crate::appconfig::Change {
                    set: r.set.into_iter().collect(),
                    secrets: r.secrets.into_iter().collect(),
                    unset: r.unset,
                    scope: match (r.host.is_empty(), r.group.is_empty()) {
                        (true, true) => crate::appconfig::Scope::Environment,
                        (false, true) => crate::appconfig::Scope::Host(r.host),
                        (true, false) => crate::appconfig::Scope::Group(r.group.into_iter().collect()),
                        (false, false) => {
                            return Err(Status::invalid_argument("--host and --group exclude each other"))
                        }
                    },
                },
            )
            .await
            .map_err(config_status)?;
        // The audit trail names the keys, never a value.
        self.shared
            .db
            .audit(
                &who.to_string(),
                "config",
                &r.environment,
                &format!("{app} revision {revision}: {change}"),
            )
            .await
            .map_err(internal)?;
        Ok(Response::new(convoy_proto::ConfigSetReply { revision }))
    }

    async fn config_show(
        &self,
        req: Request<convoy_proto::ConfigShowRequest>,
    ) -> Result<Response<convoy_proto::ConfigShowReply>, Status> {
        operator(&req, Role::Viewer, "read configuration")?;
        let r = req.into_inner();
        let app = self.config_env(&r.app, &r.environment)?;
        let revision = Some(r.revision).filter(|r| *r > 0);
        let (head, shown) = self
            .shared
            .appconfig
            .show(&app, &r.environment, revision)
            .await
            .map_err(config_status)?;
        Ok(Response::new(convoy_proto::ConfigShowReply {
            revision: Some(revision_info(head)),
            entries: shown
                .into_iter()
                .map(|s| convoy_proto::ConfigEntry {
                    key: s.key,
                    secret: s.secret,
                    value: s.value,
                    fingerprint: s.fingerprint,
                })
                .collect(),
        }))
    }

    async fn config_history(
        &self,
        req: Request<convoy_proto::ConfigHistoryRequest>,
    ) -> Result<Response<convoy_proto::ConfigHistoryReply>, Status> {
        operator(&req, Role::Viewer, "read configuration")?;
        let r = req.into_inner();
        let app = self.config_env(&r.app, &r.environment)?;
        let revisions = self
            .shared
            .appconfig
            .history(&app, &r.environment)
            .await
            .map_err(config_status)?;
        Ok(Response::new(convoy_proto::ConfigHistoryReply {
            revisions: revisions.into_iter().map(revision_info).collect(),
        }))
    }

    async fn config_diff(
        &self,
        req: Request<convoy_proto::ConfigDiffRequest>,
    ) -> Result<Response<convoy_proto::ConfigDiffReply>, Status> {
        operator(&req, Role::Viewer, "read configuration")?;
        let r = req.into_inner();
        let app = self.config_env(&r.app, &r.from_environment)?;
        self.config_env(&r.app, &r.to_environment)?;
        let c = &self.shared.appconfig;
        let from_revision = c.latest(&app, &r.from_environment).await.map_err(config_status)?;
        let to_revision = c.latest(&app, &r.to_environment).await.map_err(config_status)?;
        let entries = c
            .diff(
                &app,
                (&r.from_environment, from_revision),
                (&r.to_environment, to_revision),
            )
            .await
            .map_err(config_status)?
            .into_iter()
            .map(|e| convoy_proto::ConfigDiffEntry {
                key: e.key,
                secret: e.secret,
                from_value: e.from,
                to_value: e.to,
                state: e.how.into(),
            })
            .collect();
        Ok(Response::new(convoy_proto::ConfigDiffReply {
            from_revision,
            to_revision,
            entries,
        }))
    }

    async fn config_explain(
        &self,
        req: Request<convoy_proto::ConfigExplainRequest>,
    ) -> Result<Response<convoy_proto::ConfigExplainReply>, Status> {
        operator(&req, Role::Viewer, "read configuration")?;
        let r = req.into_inner();
        let app = self.config_env(&r.app, &r.environment)?;
        let labels = convoy_common::HostName::new(r.host.clone())
            .ok()
            .and_then(|h| crate::rollout::fleet::Fleet::host(&*self.shared.registry, &h))
            .map(|h| h.labels)
            .ok_or_else(|| Status::not_found(format!("no host {} has connected to this controller", r.host)))?;
        if labels.get("env") != Some(&r.environment) {
            return Err(Status::invalid_argument(format!(
                "{} is not a host of {}",
                r.host, r.environment
            )));
        }
        let (revision, candidates) = self
            .shared
            .appconfig
            .explain(&app, &r.environment, &r.host, &labels, &r.key)
            .await
            .map_err(config_status)?;
        Ok(Response::new(convoy_proto::ConfigExplainReply {
            revision,
            labels: labels.into_iter().collect(),
            candidates: candidates
                .into_iter()
                .map(|s| convoy_proto::ConfigExplainEntry {
                    scope: s.key,
                    secret: s.secret,
                    value: s.value,
                    fingerprint: s.fingerprint,
                })
                .collect(),
        }))
    }

    async fn config_rotate_key(
        &self,
        req: Request<convoy_proto::ConfigRotateKeyRequest>,
    ) -> Result<Response<convoy_proto::ConfigRotateKeyReply>, Status> {
        let who = operator(&req, Role::Admin, "rotate the configuration key")?;
        let (key_id, resealed) = self.shared.appconfig.rotate_key().await.map_err(config_status)?;
        self.shared
            .db
            .audit(
                &who.to_string(),
                "config key rotated",
                "",
                &format!("key {key_id}, {resealed} secret(s) resealed"),
            )
            .await
            .map_err(internal)?;
        tracing::info!(by = %who, key = key_id, resealed, "configuration key rotated");
        Ok(Response::new(convoy_proto::ConfigRotateKeyReply {
            key_id,
            resealed: resealed as u64,
        }))
    }

    async fn freezes(
        &self,
        req: Request<convoy_proto::FreezesRequest>,
    ) -> Result<Response<convoy_proto::FreezesReply>, Status> {
        operator(&req, Role::Viewer, "list freezes")?;
        let limit = match req.get_ref().audit_limit {
            0 => 50,
            n => n.min(1000),
        };
        let audit = self.shared.db.audit_log(limit).await.map_err(internal)?;
        Ok(Response::new(convoy_proto::FreezesReply {
            freezes: self.shared.engine.freezes().into_iter().map(freeze_info).collect(),
            audit: audit
                .into_iter()
                .map(|a| convoy_proto::AuditRecord {
                    at_unix_ms: a.at_ms,
                    who: a.who,
                    action: a.action,
                    environment: a.env,
                    detail: a.detail,
                })
                .collect(),
        }))
    }

    async fn controllers(
        &self,
        req: Request<convoy_proto::ControllersRequest>,
    ) -> Result<Response<convoy_proto::ControllersReply>, Status> {
        operator(&req, Role::Viewer, "list controllers")?;
        let db = &self.shared.db;
        let leases = db.leases().await.map_err(internal)?;
        let controllers = db
            .controllers()
            .await
            .map_err(internal)?
            .into_iter()
            .map(|c| convoy_proto::ControllerInfo {
                leases: leases
                    .iter()
                    .filter(|l| l.owner == c.name)
                    .map(|l| convoy_proto::LeaseInfo {
                        rollout_id: l.rollout.clone(),
                        epoch: l.epoch,
                        renewed_ago_ms: crate::db::LEASE_TTL_MS - l.expires_in_ms,
                        expires_in_ms: l.expires_in_ms,
                    })
                    .collect(),
                up: c.seen_ago_ms < super::relay::CONTROLLER_DOWN_MS,
                name: c.name,
                address: c.address,
                started_at_unix_ms: c.started_at_ms,
                seen_ago_ms: c.seen_ago_ms,
                sessions: c.sessions,
            })
            .collect();
        Ok(Response::new(convoy_proto::ControllersReply {
            controllers,
            answered_by: self.shared.cfg.name.clone(),
            database: db.engine_name().into(),
        }))
    }

    async fn releases(&self, req: Request<ReleasesRequest>) -> Result<Response<ReleasesReply>, Status> {
        operator(&req, Role::Viewer, "list releases")?;
        let app = arg("app", AppName::new(req.into_inner().app))?;
        let releases = self
            .shared
            .db
            .releases(&app)
            .await
            .map_err(internal)?
            .into_iter()
            .map(|r| ReleaseInfo {
                version: r.version,
                digest: r.digest,
                size: r.size,
                signed: r.signed,
                pushed_by: r.pushed_by,
                pushed_at_unix_ms: r.pushed_at_ms,
                unpacked_size: r.unpacked_bytes,
                entries: r.entries,
            })
            .collect();
        Ok(Response::new(ReleasesReply { releases }))
    }

    async fn control(&self, req: Request<ControlRequest>) -> Result<Response<ControlReply>, Status> {
        let id = operator(
            &req,
            Role::Deployer,
            "pause, resume, abort, promote or approve rollouts",
        )?;
        let r = req.into_inner();
        let action: Action = r.action.parse().map_err(Status::invalid_argument)?;
        // A rollout another controller drives: the action goes to it.
        if let Some((relay, owner)) = self.driven_elsewhere(&r.rollout_id).await? {
            let answer = relay
                .ask_control(&owner, &r.rollout_id, &r.action, &id.to_string())
                .await
                .map_err(internal)?;
            return Ok(Response::new(ControlReply {
                state: answer.into_result()?,
            }));
        }
        let state = self
            .shared
            .engine
            .control(&r.rollout_id, action, &id.to_string())
            .await?;
        Ok(Response::new(ControlReply { state }))
    }

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        operator(&req, Role::Viewer, "watch rollouts")?;
        let id = req.into_inner().rollout_id;
        // Events reach only the controller that drives the rollout.
        if let Some((relay, owner)) = self.driven_elsewhere(&id).await? {
            let address = relay
                .db
                .controllers()
                .await
                .map_err(internal)?
                .into_iter()
                .find(|c| c.name == owner)
                .map_or_else(|| "address unknown".to_owned(), |c| c.address);
            return Err(Status::failed_precondition(format!(
                "rollout {id} is driven by controller {owner} ({address}); watch it through that controller"
            )));
        }
        let rx = self.shared.engine.watch(&id).await?;
        // The plan first, as `deploy` sees it, then what happens from now.
        let plan = self.shared.engine.plan_of(&id).map(|e| Ok((&e).into()));
        Ok(Response::new(Box::pin(
            tokio_stream::iter(plan).chain(event_stream(&self.shared, rx)),
        )))
    }

    async fn push_release(&self, req: Request<Streaming<PushRequest>>) -> Result<Response<PushReply>, Status> {
        let id = operator(&req, Role::Deployer, "push releases")?;
        let mut inbound = req.into_inner();
        let header = match inbound.message().await? {
            Some(PushRequest {
                body: Some(push_request::Body::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first push message must be the header")),
        };
        let app = arg("app", AppName::new(header.app))?;
        let version = arg("version", Version::new(header.version))?;
        let spec = load_spec(&self.shared, &app)?;
        if header.size > MAX_ARTIFACT {
            return Err(Status::invalid_argument(format!(
                "artifact of {} bytes is over the {MAX_ARTIFACT} byte limit",
                header.size
            )));
        }
        if let Some(existing) = self.shared.db.release(&app, &version).await.map_err(internal)? {
            // Fail fast, before the bytes travel, unless it is a retry.
            if existing.size != header.size {
                return Err(Status::already_exists(format!(
                    "version {version} of {app} was already pushed with sha256 {}; versions are immutable, push a new version",
                    existing.digest
                )));
            }
        }
        let mut inc = self.shared.artifacts.begin().await.map_err(internal)?;
        let result: Result<(), Status> = async {
            while let Some(msg) = inbound.message().await? {
                match msg.body {
                    Some(push_request::Body::Data(d)) => {
                        if inc.size() + d.len() as u64 > header.size {
                            return Err(Status::invalid_argument(format!(
                                "more bytes than the {} the header announced",
                                header.size
                            )));
                        }
                        inc.write(&d).await.map_err(internal)?;
                    }
                    _ => return Err(Status::invalid_argument("only data may follow the header")),
                }
            }
            if inc.size() != header.size {
                return Err(Status::invalid_argument(format!(
                    "upload ended at {} of {} bytes",
                    inc.size(),
                    header.size
                )));
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            inc.abort().await;
            return Err(e);
        }
        // A corrupt or unsafe build is refused here, before any host sees it.
        let limits = convoy_common::archive::Limits::of(&spec.install, inc.size());
        let checked = match self.shared.artifacts.check(&mut inc, limits).await {
            Ok(c) => c,
            Err(e) => {
                inc.abort().await;
                tracing::warn!(%app, %version, by = %id, error = %e, "release refused at push");
                return Err(Status::invalid_argument(format!(
                    "{app} {version} refused, nothing was stored: not a sound release archive: {e}"
                )));
            }
        };
        // A signature covers the manifest the signer made: it must be the
        // one hosts will be given.
        let manifest = checked.stats.manifest.digest();
        if !header.manifest_digest.is_empty() && header.manifest_digest != manifest.to_hex() {
            inc.abort().await;
            return Err(Status::invalid_argument(format!(
                "{app} {version} refused, nothing was stored: the signature covers manifest sha256 {}, but this controller makes sha256 {manifest} from the archive (are the CLI and the controller the same convoy version?)",
                header.manifest_digest
            )));
        }
        let (contents, units) = (checked.stats, checked.units);
        let config = match checked.config {
            Ok(c) => c,
            Err(e) => {
                inc.abort().await;
                tracing::warn!(%app, %version, by = %id, error = %e, "release refused at push");
                return Err(Status::invalid_argument(format!(
                    "{app} {version} refused, nothing was stored: its configuration: {e}"
                )));
            }
        };
        let (digest, size) = self.shared.artifacts.commit(inc).await.map_err(internal)?;
        self.shared
            .artifacts
            .keep_manifest(&digest, &contents.manifest)
            .map_err(internal)?;
        // Every controller can serve it before anyone can deploy it.
        self.shared
            .db
            .share_artifact(&digest, &self.shared.artifacts.path(&digest))
            .await
            .map_err(internal)?;
        let added = self
            .shared
            .db
            .add_release(
                &app,
                &version,
                &Release {
                    digest,
                    size,
                    signature: Some(header.signature).filter(|s| !s.is_empty()),
                },
                &id.to_string(),
            )
            .await
            .map_err(|e| match e {
                DbError::VersionTaken { .. } => Status::already_exists(e.to_string()),
                other => internal(other),
            })?;
        if added {
            self.shared
                .db
                .set_release_contents(&app, &version, contents.bytes, contents.entries, &units)
                .await
                .map_err(internal)?;
            if let Some(schema) = &config {
                self.shared
                    .appconfig
                    .set_schema(&app, &version, schema)
                    .await
                    .map_err(internal)?;
            }
        }
        tracing::info!(%app, %version, %digest, size, by = %id, new = added, unpacked = contents.bytes, entries = contents.entries, "release pushed");
        Ok(Response::new(PushReply {
            digest: digest.to_hex(),
            size,
            already_present: !added,
        }))
    }

    async fn deploy(&self, req: Request<DeployRequest>) -> Result<Response<Self::DeployStream>, Status> {
        let id = operator(&req, Role::Deployer, "deploy")?;
        let mut order = DeployOrder::try_from(req.into_inner()).map_err(invalid)?;
        order.admin = id.role == Some(Role::Admin);
        let rx = self.shared.engine.start_deploy(&id.to_string(), order).await?;
        Ok(Response::new(event_stream(&self.shared, rx)))
    }

    async fn plan_deploy(
        &self,
        req: Request<DeployRequest>,
    ) -> Result<Response<convoy_proto::DeployPlanReply>, Status> {
        let id = operator(&req, Role::Deployer, "plan deploys")?;
        let mut order = DeployOrder::try_from(req.into_inner()).map_err(invalid)?;
        order.admin = id.role == Some(Role::Admin);
        let plan = self.shared.engine.dry_run(&id.to_string(), &order).await?;
        Ok(Response::new((&plan).into()))
    }

    async fn rollback(&self, req: Request<RollbackRequest>) -> Result<Response<Self::RollbackStream>, Status> {
        let id = operator(&req, Role::Deployer, "roll back")?;
        let order = RollbackOrder::try_from(req.into_inner()).map_err(invalid)?;
        let rx = self.shared.engine.start_rollback(&id.to_string(), order).await?;
        Ok(Response::new(event_stream(&self.shared, rx)))
    }

    async fn history(&self, req: Request<HistoryRequest>) -> Result<Response<HistoryReply>, Status> {
        operator(&req, Role::Viewer, "read history")?;
        let r = req.into_inner();
        let db = &self.shared.db;
        let record = RolloutRecord::from;
        if !r.rollout_id.is_empty() {
            let row = db
                .rollout(&r.rollout_id)
                .await
                .map_err(internal)?
                .ok_or_else(|| Status::not_found(format!("no rollout {}", r.rollout_id)))?;
            let hosts = db.rollout_hosts(&r.rollout_id).await.map_err(internal)?;
            let events = db.rollout_events(&r.rollout_id).await.map_err(internal)?;
            let measurements = db.measurements(&r.rollout_id).await.map_err(internal)?;
            return Ok(Response::new(HistoryReply {
                measurements: measurements.iter().map(Into::into).collect(),
                rollouts: vec![record(row)],
                hosts: hosts
                    .into_iter()
                    .map(|h| HostRecord {
                        host: h.host,
                        op_id: h.op_id,
                        outcome: h.outcome,
                        reason: h.reason,
                        restore_detail: h.restore_detail,
                        finished_at_unix_ms: h.finished_at_ms,
                    })
                    .collect(),
                events: events
                    .into_iter()
                    .map(|e| EventRecord {
                        host: e.host,
                        step: e.step,
                        kind: e.kind,
                        message: e.message,
                        at_unix_ms: e.at_ms,
                    })
                    .collect(),
            }));
        }
        let app = arg("app", AppName::new(r.app))?;
        let limit = if r.limit == 0 { 50 } else { r.limit.min(1000) };
        use crate::rollout::events::STATES;
        if !r.state.is_empty() && !STATES.contains(&r.state.as_str()) {
            return Err(Status::invalid_argument(format!(
                "state: no rollout state {:?} (one of {})",
                r.state,
                STATES.join(", ")
            )));
        }
        let filter = crate::db::HistoryFilter {
            environment: Some(r.environment).filter(|e| !e.is_empty()),
            state: Some(r.state).filter(|s| !s.is_empty()),
        };
        let rollouts = db
            .history(&app, &filter, limit)
            .await
            .map_err(internal)?
            .into_iter()
            .map(record)
            .collect();
        Ok(Response::new(HistoryReply {
            rollouts,
            hosts: vec![],
            events: vec![],
            measurements: vec![],
        }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        operator(&req, Role::Viewer, "read status")?;
        let app = arg("app", AppName::new(req.into_inner().app))?;
        let hosts = self
            .shared
            .registry
            .hosts()
            .into_iter()
            .map(|h| HostStatus {
                host: h.name.to_string(),
                connected: h.connected(),
                labels: h.labels.clone().into_iter().collect(),
                app: h.apps.get(&app).map(Into::into),
                last_seen_unix_ms: h.last_seen_ms,
            })
            .collect();
        Ok(Response::new(StatusReply { hosts }))
    }

    async fn fleet(
        &self,
        req: Request<convoy_proto::FleetRequest>,
    ) -> Result<Response<convoy_proto::FleetReply>, Status> {
        operator(&req, Role::Viewer, "read the fleet")?;
        let hosts = self.shared.registry.hosts();
        let last = self.shared.db.last_rollouts().await.map_err(internal)?;
        Ok(Response::new(super::fleet_view::fleet(&hosts, last)))
    }
}

fn freeze_info(f: crate::db::Freeze) -> convoy_proto::FreezeInfo {
    convoy_proto::FreezeInfo {
        environment: f.env,
        reason: f.reason,
        frozen_by: f.by,
        at_unix_ms: f.at_ms,
        until_unix_ms: f.until_ms.unwrap_or(0),
    }
}

fn revision_info(r: crate::appconfig::Revision) -> convoy_proto::ConfigRevision {
    convoy_proto::ConfigRevision {
        revision: r.revision,
        author: r.author,
        at_unix_ms: r.at_ms,
        change: r.change,
    }
}

fn config_status(e: crate::appconfig::ConfigError) -> Status {
    use crate::appconfig::ConfigError;
    match e {
        ConfigError::Invalid(m) => Status::invalid_argument(m),
        ConfigError::NotFound(m) => Status::not_found(m),
        ConfigError::Sealed(m) => Status::internal(m),
        ConfigError::Db(e) => internal(e),
    }
}

impl OperatorApi {
    /// The relay and the controller that drives rollout `id`, when it is
    /// running and driven by another controller than this one.
    async fn driven_elsewhere(&self, id: &str) -> Result<Option<(&Arc<super::relay::Relay>, String)>, Status> {
        if self.shared.engine.drives(id) {
            return Ok(None);
        }
        let Some(relay) = self.shared.registry.relay() else {
            return Ok(None);
        };
        Ok(relay
            .owner_elsewhere(id)
            .await
            .map_err(internal)?
            .map(|owner| (relay, owner)))
    }

    /// An app with a spec, and one of its environments.
    fn config_env(&self, app: &str, env: &str) -> Result<convoy_common::AppName, Status> {
        let app = convoy_common::AppName::new(app.to_owned()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let spec = self.shared.engine.load_spec(&app)?;
        if !spec.environments.iter().any(|e| e == env) {
            return Err(Status::invalid_argument(format!(
                "environment {env:?} is not one of {app}'s environments ({})",
                spec.environments.join(", ")
            )));
        }
        Ok(app)
    }
}
