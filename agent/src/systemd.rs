//! systemd's D-Bus API: restart and stop units and wait for their jobs,
//! read unit state and restart counts.

use std::time::Duration;

use futures::StreamExt;
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: OwnedObjectPath, unit: String, result: String) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("unit {unit}: {verb} job ended with result {result:?}")]
    JobFailed {
        unit: String,
        verb: &'static str,
        result: String,
    },
    #[error("unit {unit}: {verb} job did not finish within {timeout:?}")]
    JobTimeout {
        unit: String,
        verb: &'static str,
        timeout: Duration,
    },
    #[error("unit {unit} is not loaded (LoadState {state}); is the unit file installed?")]
    NotLoaded { unit: String, state: String },
}

/// A unit's state as systemd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub active: String,
    pub sub: String,
    /// Restarts systemd made on its own (services only).
    pub n_restarts: Option<u32>,
}

#[derive(Clone)]
pub struct Systemd {
    conn: Connection,
}

impl Systemd {
    pub async fn connect() -> Result<Self, SystemdError> {
        let conn = Connection::system().await?;
        ManagerProxy::new(&conn).await?.subscribe().await?;
        Ok(Self { conn })
    }

    async fn manager(&self) -> Result<ManagerProxy<'static>, SystemdError> {
        Ok(ManagerProxy::new(&self.conn).await?)
    }

    async fn run_job(&self, unit: &str, verb: &'static str, timeout: Duration) -> Result<(), SystemdError> {
        let mgr = self.manager().await?;
        // Listen before asking, so the job's end cannot be missed.
        let mut removed = mgr.receive_job_removed().await?;
        let job = match verb {
            "restart" => {
                // A unit that failed earlier must not stay failed because of
                // its old start-limit counter.
                let _ = mgr.reset_failed_unit(unit).await;
                mgr.restart_unit(unit, "replace").await?
            }
            _ => mgr.stop_unit(unit, "replace").await?,
        };
        let wait = async {
            while let Some(sig) = removed.next().await {
                let args = sig.args()?;
                if args.job == job {
                    return Ok::<String, zbus::Error>(args.result);
                }
            }
            Err(zbus::Error::Failure("JobRemoved stream ended".into()))
        };
        let result = tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| SystemdError::JobTimeout {
                unit: unit.to_owned(),
                verb,
                timeout,
            })??;
        if result == "done" {
            Ok(())
        } else {
            Err(SystemdError::JobFailed {
                unit: unit.to_owned(),
                verb,
                result,
            })
        }
    }

    /// Restarts (or starts) a unit and waits for the job to finish.
    pub async fn restart(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
        let state = self.unit_load_state(unit).await?;
        if state != "loaded" {
            return Err(SystemdError::NotLoaded {
                unit: unit.to_owned(),
                state,
            });
        }
        self.run_job(unit, "restart", timeout).await
    }

    pub async fn stop(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
        self.run_job(unit, "stop", timeout).await
    }

    /// `systemctl daemon-reload`: returns once systemd has re-read its units.
    pub async fn daemon_reload(&self) -> Result<(), SystemdError> {
        Ok(self.manager().await?.reload().await?)
    }

    async fn unit_path(&self, unit: &str) -> Result<OwnedObjectPath, SystemdError> {
        Ok(self.manager().await?.load_unit(unit).await?)
    }

    pub async fn unit_load_state(&self, unit: &str) -> Result<String, SystemdError> {
        let path = self.unit_path(unit).await?;
        let u = UnitProxy::builder(&self.conn)
            .path(path)?
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        Ok(u.load_state().await?)
    }

    pub async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let path = self.unit_path(unit).await?;
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())?
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let n_restarts = if unit.ends_with(".service") {
            let s = ServiceProxy::builder(&self.conn)
                .path(path)?
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            s.n_restarts().await.ok()
        } else {
            None
        };
        Ok(UnitState {
            active: u.active_state().await?,
            sub: u.sub_state().await?,
            n_restarts,
        })
    }
}
