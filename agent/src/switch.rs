//! Making the install path resolve to a release, in one atomic step.
//!
//! Symlink mode (default): `install_path` is a symlink to
//! `releases/<version>`, replaced by renaming a new symlink over it.
//!
//! Exchange mode, for apps whose install path must be a real directory:
//! the live tree sits at `install_path` itself and `releases/` holds the
//! others. A switch swaps the new tree and the live one with
//! `renameat2(RENAME_EXCHANGE)`, then renames the old tree to its own
//! version's name. Every tree carries a `.convoy-release` marker naming its
//! version, so after a crash between those two renames `normalize` puts each
//! tree back under its own name.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use convoy_common::spec::{InstallSpec, SwitchMode};
use convoy_common::{fsutil, Version};
use nix::fcntl::{renameat2, RenameFlags};

use crate::store::AppDirs;

/// File in each release tree naming its version.
pub const MARKER: &str = ".convoy-release";

pub fn write_marker(tree: &Path, v: &Version) -> io::Result<()> {
    fsutil::write_atomic(&tree.join(MARKER), format!("{v}\n").as_bytes(), 0o644)
}

fn read_marker(tree: &Path) -> Option<Version> {
    Version::new(fs::read_to_string(tree.join(MARKER)).ok()?.trim()).ok()
}

/// The version the install path resolves to now, if any.
pub fn live_version(spec: &InstallSpec) -> Option<Version> {
    match spec.switch {
        SwitchMode::Symlink => {
            let target = fs::read_link(&spec.install_path).ok()?;
            Version::new(target.file_name()?.to_str()?).ok()
        }
        SwitchMode::Exchange => read_marker(&spec.install_path),
    }
}

/// Where the tree of `v` is now: under `releases/`, or at the install
/// path when it is live in exchange mode.
pub fn tree_of(spec: &InstallSpec, dirs: &AppDirs, v: &Version) -> PathBuf {
    if spec.switch == SwitchMode::Exchange && live_version(spec).as_ref() == Some(v) {
        spec.install_path.clone()
    } else {
        dirs.release(v)
    }
}

/// Refuses an install path convoy did not create.
pub fn check_install_path(spec: &InstallSpec) -> Result<(), String> {
    let path = &spec.install_path;
    match (fs::symlink_metadata(path), spec.switch) {
        (Ok(m), SwitchMode::Symlink) if !m.file_type().is_symlink() => Err(format!(
            "install path {} exists and is not a symlink; convoy will not replace it (move it away first)",
            path.display()
        )),
        (Ok(m), SwitchMode::Exchange) if !m.is_dir() || read_marker(path).is_none() => Err(format!(
            "install path {} exists and is not a release tree convoy installed; convoy will not replace it",
            path.display()
        )),
        (Ok(_), _) => Ok(()),
        (Err(e), _) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        (Err(e), _) => Err(format!("install path {}: {e}", path.display())),
    }
}

/// Makes the install path resolve to `to`. Idempotent: switching to the
/// live version does nothing.
pub fn switch_to(spec: &InstallSpec, dirs: &AppDirs, to: &Version) -> io::Result<()> {
    if let Some(parent) = spec.install_path.parent() {
        fs::create_dir_all(parent)?;
    }
    match spec.switch {
        SwitchMode::Symlink => fsutil::replace_symlink(&dirs.release(to), &spec.install_path),
        SwitchMode::Exchange => {
            normalize(spec, dirs)?;
            let live = live_version(spec);
            if live.as_ref() == Some(to) {
                return Ok(());
            }
            let new = dirs.release(to);
            match live {
                None => fs::rename(&new, &spec.install_path)?,
                Some(old) => {
                    renameat2(None, &new, None, &spec.install_path, RenameFlags::RENAME_EXCHANGE)
                        .map_err(io::Error::from)?;
                    crate::crash::crash_point("exchange-between-renames");
                    fs::rename(&new, dirs.release(&old))?;
                }
            }
            fsutil::fsync_dir(&dirs.releases)?;
            if let Some(parent) = spec.install_path.parent() {
                fsutil::fsync_dir(parent)?;
            }
            Ok(())
        }
    }
}

/// Removes the install path (first install failed, nothing to go back to).
/// In exchange mode the tree goes back to `releases/` instead.
pub fn remove_install_path(spec: &InstallSpec, dirs: &AppDirs) -> io::Result<()> {
    let r = match spec.switch {
        SwitchMode::Symlink => fs::remove_file(&spec.install_path),
        SwitchMode::Exchange => match live_version(spec) {
            Some(v) => fs::rename(&spec.install_path, dirs.release(&v)),
            None => Ok(()),
        },
    };
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Exchange mode: renames every tree under `releases/` to the version its
/// marker names (finishing a switch a crash interrupted).
pub fn normalize(spec: &InstallSpec, dirs: &AppDirs) -> io::Result<()> {
    if spec.switch != SwitchMode::Exchange {
        return Ok(());
    }
    for e in fs::read_dir(&dirs.releases)?.flatten() {
        let Some(name) = e.file_name().to_str().and_then(|n| Version::new(n).ok()) else {
            continue;
        };
        if let Some(marked) = read_marker(&e.path()).filter(|m| *m != name) {
            let dest = dirs.release(&marked);
            if !dest.exists() {
                tracing::warn!(from = %name, to = %marked, "finishing an interrupted exchange");
                fs::rename(e.path(), dest)?;
            }
        }
    }
    fsutil::fsync_dir(&dirs.releases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use convoy_common::spec::AppSpec;

    fn spec(root: &Path, mode: &str) -> InstallSpec {
        let text = format!(
            "name = \"app\"\ninstall_path = \"{}/srv/app\"\nunits = [\"app.service\"]\nswitch = \"{mode}\"\n",
            root.display()
        );
        AppSpec::parse("app.toml", &text).unwrap().install
    }

    fn release(dirs: &AppDirs, v: &str) -> Version {
        let v = Version::new(v).unwrap();
        fs::create_dir_all(dirs.release(&v)).unwrap();
        fs::write(dirs.release(&v).join("content"), v.as_str()).unwrap();
        write_marker(&dirs.release(&v), &v).unwrap();
        v
    }

    #[test]
    fn exchange_keeps_a_real_directory_and_every_tree() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("state")).unwrap();
        let s = spec(d.path(), "exchange");
        let dirs = store.ensure_app(&s.app).unwrap();
        let (v1, v2) = (release(&dirs, "1"), release(&dirs, "2"));
        check_install_path(&s).unwrap();
        switch_to(&s, &dirs, &v1).unwrap();
        assert!(fs::symlink_metadata(&s.install_path).unwrap().is_dir());
        assert_eq!(live_version(&s), Some(v1.clone()));
        switch_to(&s, &dirs, &v2).unwrap();
        assert_eq!(fs::read_to_string(s.install_path.join("content")).unwrap(), "2");
        assert_eq!(fs::read_to_string(dirs.release(&v1).join("content")).unwrap(), "1");
        assert!(!dirs.release(&v2).exists(), "the live tree is at the install path");
        assert_eq!(tree_of(&s, &dirs, &v2), s.install_path);
        switch_to(&s, &dirs, &v2).unwrap(); // idempotent
        switch_to(&s, &dirs, &v1).unwrap();
        assert_eq!(fs::read_to_string(s.install_path.join("content")).unwrap(), "1");
        assert_eq!(fs::read_to_string(dirs.release(&v2).join("content")).unwrap(), "2");
    }

    #[test]
    fn normalize_finishes_an_interrupted_exchange() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("state")).unwrap();
        let s = spec(d.path(), "exchange");
        let dirs = store.ensure_app(&s.app).unwrap();
        let (v1, v2) = (release(&dirs, "1"), release(&dirs, "2"));
        switch_to(&s, &dirs, &v1).unwrap();
        // A crash right after the exchange: releases/2 holds the tree of 1.
        renameat2(
            None,
            &dirs.release(&v2),
            None,
            &s.install_path,
            RenameFlags::RENAME_EXCHANGE,
        )
        .unwrap();
        normalize(&s, &dirs).unwrap();
        assert_eq!(live_version(&s), Some(v2));
        assert_eq!(fs::read_to_string(dirs.release(&v1).join("content")).unwrap(), "1");
    }

    #[test]
    fn symlink_mode_refuses_a_real_directory() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(d.path(), "symlink");
        fs::create_dir_all(&s.install_path).unwrap();
        let err = check_install_path(&s).unwrap_err();
        assert!(err.contains("is not a symlink"), "{err}");
    }
}
