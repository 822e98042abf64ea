//! The on-host layout under the state directory, and each app's journal.
//!
//! ```text
//! <state_dir>/apps/<app>/releases/<version>/   complete, verified trees
//! <state_dir>/apps/<app>/releases/<version>+cfg.<revision>/
//!                                              the same with a configuration rendered in
//! <state_dir>/apps/<app>/meta/<version>.json   digest of each release
//! <state_dir>/apps/<app>/staging/              partial downloads and unpacks
//! <state_dir>/apps/<app>/journal.json          current, previous, in-flight op
//! <state_dir>/unreported.json                  results no controller has seen
//! ```
//!
//! The journal is replaced atomically and fsynced before every step of an
//! activation, so that after a crash `recover` knows exactly what to undo.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use convoy_common::fsutil;
use convoy_common::ops::{AppStatus, Health, OpReport};
use convoy_common::slots::{Slot, SlotState, SlotStatus};
use convoy_common::spec::InstallSpec;
use convoy_common::{AppName, Digest, Version};
use serde::{Deserialize, Serialize};

/// How far an in-flight activation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Fetching and unpacking; nothing live has changed.
    Staging,
    /// About to switch or switched: the install path may point at `to`.
    Switched,
    /// Putting `from` back.
    Restoring,
}

/// One blue-green slot in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub version: Version,
    pub state: SlotState,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inflight {
    pub op_id: String,
    pub from: Option<Version>,
    pub to: Version,
    pub phase: Phase,
    pub spec: InstallSpec,
    /// Backup of the declared paths taken before the switch.
    #[serde(default)]
    pub backup: Option<PathBuf>,
    /// Unit files as they were before the switch touched them.
    #[serde(default)]
    pub unit_snapshot: Option<crate::units::Snapshot>,
    /// Blue-green: the idle slot this activation starts `to` in; the live
    /// slot is never touched.
    #[serde(default)]
    pub slot: Option<Slot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub current: Option<Version>,
    pub previous: Option<Version>,
    pub last_known_good: Option<Version>,
    pub health: Health,
    pub health_reason: String,
    /// The spec the current release was activated with.
    pub spec: Option<InstallSpec>,
    pub inflight: Option<Inflight>,
    pub last_op: Option<OpReport>,
    /// Unit files the current release installed.
    #[serde(default)]
    pub unit_files: Vec<String>,
    /// Versions in the order they were last made current (newest last).
    #[serde(default)]
    pub history: Vec<Version>,
    /// Blue-green apps: what each slot holds and does.
    #[serde(default)]
    pub slots: BTreeMap<Slot, SlotRecord>,
}

impl Journal {
    /// The slot taking traffic, if any.
    pub fn live_slot(&self) -> Option<Slot> {
        self.slots
            .iter()
            .find(|(_, r)| r.state == SlotState::Live)
            .map(|(s, _)| *s)
    }

    /// Records `v` as the newest current release.
    pub fn push_history(&mut self, v: &Version) {
        self.history.retain(|h| h != v);
        self.history.push(v.clone());
    }
}

impl Default for Journal {
    fn default() -> Self {
        Self {
            current: None,
            previous: None,
            last_known_good: None,
            health: Health::Unknown,
            health_reason: String::new(),
            spec: None,
            inflight: None,
            last_op: None,
            unit_files: Vec::new(),
            history: Vec::new(),
            slots: BTreeMap::new(),
        }
    }
}

/// The tree of a release with a configuration revision rendered into it:
/// `<version>+cfg.<revision>`, a tree of its own, so that a switch moves
/// code and configuration together and the previous tree is the previous
/// pair of both.
pub fn tree_version(release: &Version, revision: u64) -> Version {
    Version::new(format!("{release}+cfg.{revision}")).unwrap_or_else(|_| release.clone())
}

/// The release a tree holds, and the configuration revision in it.
pub fn release_of(tree: &Version) -> (Version, Option<u64>) {
    if let Some((base, rev)) = tree.as_str().rsplit_once("+cfg.") {
        if let (Ok(r), Ok(v)) = (rev.parse::<u64>(), Version::new(base)) {
            return (v, Some(r));
        }
    }
    (tree.clone(), None)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseMeta {
    pub digest: Digest,
    pub size: u64,
    /// The configuration revision rendered into the tree, if any.
    #[serde(default)]
    pub config_revision: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt journal: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Paths of one app.
#[derive(Debug, Clone)]
pub struct AppDirs {
    pub backups: PathBuf,
    pub lock: PathBuf,
    pub releases: PathBuf,
    pub meta: PathBuf,
    pub staging: PathBuf,
    pub journal: PathBuf,
}

impl AppDirs {
    pub fn release(&self, v: &Version) -> PathBuf {
        self.releases.join(v.as_str())
    }
    fn meta_file(&self, v: &Version) -> PathBuf {
        self.meta.join(format!("{v}.json"))
    }
}

impl Store {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(root.join("apps")).map_err(io_at(root))?;
        Ok(Self { root: root.to_owned() })
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn app(&self, app: &AppName) -> AppDirs {
        let root = self.root.join("apps").join(app.as_str());
        AppDirs {
            backups: root.join("backups"),
            lock: root.join("lock"),
            releases: root.join("releases"),
            meta: root.join("meta"),
            staging: root.join("staging"),
            journal: root.join("journal.json"),
        }
    }

    /// Creates an app's directories; idempotent.
    pub fn ensure_app(&self, app: &AppName) -> Result<AppDirs, StoreError> {
        let d = self.app(app);
        for p in [&d.releases, &d.meta, &d.staging, &d.backups] {
            fs::create_dir_all(p).map_err(io_at(p))?;
        }
        Ok(d)
    }

    pub fn apps(&self) -> Result<Vec<AppName>, StoreError> {
        let dir = self.root.join("apps");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let e = e.map_err(io_at(&dir))?;
            if let Some(name) = e.file_name().to_str().and_then(|n| AppName::new(n).ok()) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn load_journal(&self, app: &AppName) -> Result<Journal, StoreError> {
        let path = self.app(app).journal;
        match fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Durably replaces the journal (write, fsync, rename, fsync dir).
    pub fn save_journal(&self, app: &AppName, j: &Journal) -> Result<(), StoreError> {
        let d = self.ensure_app(app)?;
        let data = serde_json::to_vec_pretty(j).expect("journal serialises");
        fsutil::write_atomic(&d.journal, &data, 0o600).map_err(io_at(&d.journal))
    }

    pub fn releases(&self, app: &AppName) -> Vec<Version> {
        let dir = self.app(app).releases;
        let mut out: Vec<Version> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| Version::new(n).ok()))
            .collect();
        out.sort();
        out
    }

    /// Removes releases beyond the newest `keep`, never the current,
    /// previous or last-known-good one, nor `also_keep`. Returns what went.
    pub fn prune_releases(
        &self,
        app: &AppName,
        j: &Journal,
        keep: usize,
        also_keep: Option<&Version>,
    ) -> Result<Vec<Version>, StoreError> {
        let dirs = self.app(app);
        let protected: Vec<&Version> = [&j.current, &j.previous, &j.last_known_good]
            .into_iter()
            .flatten()
            .chain(also_keep)
            .collect();
        // Oldest first: never-activated releases, then by history.
        let mut all = self.releases(app);
        all.sort_by_key(|v| j.history.iter().position(|h| h == v).map_or(0, |p| p + 1));
        let excess = all.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for v in all.into_iter().filter(|v| !protected.contains(&v)).take(excess) {
            let path = dirs.release(&v);
            fs::remove_dir_all(&path).map_err(io_at(&path))?;
            let _ = fs::remove_file(dirs.meta_file(&v));
            let _ = fs::remove_file(dirs.meta.join(format!("{v}.manifest")));
            let _ = fs::remove_file(dirs.meta.join(format!("{v}.stamps")));
            removed.push(v);
        }
        if !removed.is_empty() {
            fsutil::fsync_dir(&dirs.releases).map_err(io_at(&dirs.releases))?;
        }
        Ok(removed)
    }

    /// Takes the app's lock file, shared by the agent daemon and the
    /// `convoy-agent prune` command, so they never work on an app at once.
    pub fn lock_app(&self, app: &AppName) -> Result<Option<nix::fcntl::Flock<fs::File>>, StoreError> {
        let d = self.ensure_app(app)?;
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&d.lock)
            .map_err(io_at(&d.lock))?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io_at(&d.lock)(e.into())),
        }
    }

    pub fn release_meta(&self, app: &AppName, v: &Version) -> Option<ReleaseMeta> {
        let path = self.app(app).meta_file(v);
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }

    pub fn write_release_meta(&self, app: &AppName, v: &Version, m: &ReleaseMeta) -> Result<(), StoreError> {
        let path = self.app(app).meta_file(v);
        let data = serde_json::to_vec(m).expect("meta serialises");
        fsutil::write_atomic(&path, &data, 0o644).map_err(io_at(&path))
    }

    pub fn status(&self, app: &AppName) -> Result<AppStatus, StoreError> {
        let j = self.load_journal(app)?;
        let config_revision = j.current.as_ref().and_then(|v| release_of(v).1);
        let public = |v: Option<Version>| v.map(|v| release_of(&v).0);
        let mut releases: Vec<Version> = self.releases(app).iter().map(|v| release_of(v).0).collect();
        releases.sort();
        releases.dedup();
        Ok(AppStatus {
            config_revision,
            app: app.clone(),
            current: public(j.current),
            previous: public(j.previous),
            last_known_good: public(j.last_known_good),
            releases,
            health: j.health,
            health_reason: j.health_reason,
            inflight_op: j.inflight.map(|i| i.op_id),
            slots: j
                .slots
                .into_iter()
                .map(|(slot, r)| SlotStatus {
                    slot,
                    version: release_of(&r.version).0,
                    state: r.state,
                    port: r.port,
                })
                .collect(),
        })
    }

    pub fn all_status(&self) -> Vec<AppStatus> {
        self.apps()
            .unwrap_or_default()
            .iter()
            .filter_map(|a| self.status(a).ok())
            .collect()
    }

    fn unreported_path(&self) -> PathBuf {
        self.root.join("unreported.json")
    }

    /// Remembers a result no controller has acknowledged (bounded).
    pub fn push_unreported(&self, report: &OpReport) -> Result<(), StoreError> {
        let mut all = self.unreported();
        all.retain(|r| r.op_id != report.op_id);
        all.push(report.clone());
        let keep = all.len().saturating_sub(32);
        all.drain(..keep);
        let path = self.unreported_path();
        fsutil::write_atomic(&path, &serde_json::to_vec(&all).expect("serialises"), 0o600).map_err(io_at(&path))
    }

    /// The latest results, repeated in every hello so that none is lost
    /// to a dropped session; the controller ignores those it has seen.
    pub fn unreported(&self) -> Vec<OpReport> {
        fs::read(self.unreported_path())
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }
}
