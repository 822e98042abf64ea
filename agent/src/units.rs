//! Unit files shipped in a release's `systemd/` folder: installed into the
//! unit directory on switch, and put back exactly on restore.
//!
//! Before anything is written, the current content of every unit file the
//! switch touches is snapshotted into the journal, so a restore (or crash
//! recovery) writes back what was there, or removes what was not.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use convoy_common::fsutil;
use convoy_common::spec::valid_unit_name;

/// unit name → content before the switch (`None`: the file did not exist).
pub type Snapshot = BTreeMap<String, Option<String>>;

/// The unit files a release ships, by name.
pub fn shipped(release: &Path) -> io::Result<BTreeMap<String, String>> {
    let dir = release.join("systemd");
    let mut out = BTreeMap::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.file_type()?.is_file() {
            continue;
        }
        if !valid_unit_name(&name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("systemd/{name} in the release is not a unit file name"),
            ));
        }
        out.insert(name, fs::read_to_string(e.path())?);
    }
    Ok(out)
}

/// What installing `new` over the files a previous release installed
/// (`previous`) will touch, with their current content.
pub fn snapshot(unit_dir: &Path, new: &BTreeMap<String, String>, previous: &[String]) -> io::Result<Snapshot> {
    let mut snap = Snapshot::new();
    for name in new.keys().chain(previous) {
        let content = match fs::read_to_string(unit_dir.join(name)) {
            Ok(c) => Some(c),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        snap.insert(name.clone(), content);
    }
    Ok(snap)
}

/// Writes `new` and removes the files `previous` installed that `new` does
/// not ship. Returns whether anything changed.
pub fn install(unit_dir: &Path, new: &BTreeMap<String, String>, snap: &Snapshot) -> io::Result<bool> {
    let mut changed = false;
    for (name, before) in snap {
        match new.get(name) {
            Some(content) if before.as_ref() != Some(content) => {
                fsutil::write_atomic(&unit_dir.join(name), content.as_bytes(), 0o644)?;
                changed = true;
            }
            Some(_) => {}
            None if before.is_some() => {
                fs::remove_file(unit_dir.join(name))?;
                changed = true;
            }
            None => {}
        }
    }
    Ok(changed)
}

/// Writes a snapshot back. Returns whether anything changed.
pub fn put_back(unit_dir: &Path, snap: &Snapshot) -> io::Result<bool> {
    let mut changed = false;
    for (name, before) in snap {
        let path = unit_dir.join(name);
        let now = fs::read_to_string(&path).ok();
        if now.as_ref() == before.as_ref() {
            continue;
        }
        changed = true;
        match before {
            Some(content) => fsutil::write_atomic(&path, content.as_bytes(), 0o644)?,
            None => fs::remove_file(&path)?,
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_then_put_back_is_exact() {
        let d = tempfile::tempdir().unwrap();
        let (units, release) = (d.path().join("units"), d.path().join("rel"));
        fs::create_dir_all(release.join("systemd")).unwrap();
        fs::create_dir_all(&units).unwrap();
        fs::write(units.join("app.service"), "old\n").unwrap();
        fs::write(units.join("gone.timer"), "installed by the previous release\n").unwrap();
        fs::write(units.join("other.service"), "not ours\n").unwrap();
        fs::write(release.join("systemd/app.service"), "new\n").unwrap();
        fs::write(release.join("systemd/worker.service"), "worker\n").unwrap();

        let new = shipped(&release).unwrap();
        let snap = snapshot(&units, &new, &["gone.timer".into()]).unwrap();
        assert!(install(&units, &new, &snap).unwrap());
        assert_eq!(fs::read_to_string(units.join("app.service")).unwrap(), "new\n");
        assert_eq!(fs::read_to_string(units.join("worker.service")).unwrap(), "worker\n");
        assert!(!units.join("gone.timer").exists());

        assert!(put_back(&units, &snap).unwrap());
        assert_eq!(fs::read_to_string(units.join("app.service")).unwrap(), "old\n");
        assert!(!units.join("worker.service").exists());
        assert_eq!(
            fs::read_to_string(units.join("gone.timer")).unwrap(),
            "installed by the previous release\n"
        );
        assert_eq!(fs::read_to_string(units.join("other.service")).unwrap(), "not ours\n");
        assert!(!put_back(&units, &snap).unwrap(), "putting back twice changes nothing");
    }

    #[test]
    fn bad_unit_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("systemd")).unwrap();
        fs::write(d.path().join("systemd/../../etc"), "").ok();
        fs::write(d.path().join("systemd/evil.sh"), "").unwrap();
        let err = shipped(d.path()).unwrap_err();
        assert!(err.to_string().contains("systemd/evil.sh"), "{err}");
    }
}
