//! Backups of an app's declared paths (configuration, state) outside the
//! install path: archived with tar and gzip before a switch, keeping mode,
//! owner, mtime and symlinks, and restored exactly on failure: paths that
//! did not exist before are removed again.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use convoy_common::fsutil;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

/// First entry of every backup: which declared paths existed.
const MANIFEST: &str = ".convoy-backup.json";

#[derive(Serialize, Deserialize)]
struct Manifest {
    present: Vec<PathBuf>,
    absent: Vec<PathBuf>,
}

fn rel(p: &Path) -> PathBuf {
    p.strip_prefix("/").unwrap_or(p).to_path_buf()
}

/// Archives `paths` into `out` (written to a temporary name, fsynced,
/// renamed). Returns the number of bytes written.
pub fn create(paths: &[PathBuf], out: &Path) -> io::Result<u64> {
    let tmp = out.with_extension("tmp");
    let file = File::create(&tmp)?;
    let mut b = tar::Builder::new(GzEncoder::new(file, flate2::Compression::fast()));
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    let (mut present, mut absent) = (Vec::new(), Vec::new());
    for p in paths {
        match fs::symlink_metadata(p) {
            Ok(_) => present.push(p.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => absent.push(p.clone()),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
        }
    }
    let manifest = serde_json::to_vec(&Manifest {
        present: present.clone(),
        absent,
    })
    .expect("serialises");
    let mut h = tar::Header::new_gnu();
    h.set_size(manifest.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, MANIFEST, &manifest[..])?;
    for p in &present {
        let meta = fs::symlink_metadata(p)?;
        if meta.is_dir() {
            b.append_dir_all(rel(p), p)?;
        } else {
            b.append_path_with_name(p, rel(p))?;
        }
    }
    let file = b.into_inner()?.finish()?;
    file.sync_all()?;
    let size = file.metadata()?.len();
    fs::rename(&tmp, out)?;
    if let Some(dir) = out.parent() {
        fsutil::fsync_dir(dir)?;
    }
    Ok(size)
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Puts the declared paths back exactly as `backup` recorded them.
pub fn restore(backup: &Path) -> io::Result<usize> {
    let mut archive = tar::Archive::new(GzDecoder::new(File::open(backup)?));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut entries = archive.entries()?;
    let mut first = entries
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty backup"))??;
    if first.path()?.as_os_str() != MANIFEST {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "backup has no manifest"));
    }
    let mut data = Vec::new();
    first.read_to_end(&mut data)?;
    let manifest: Manifest =
        serde_json::from_slice(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    for p in manifest.present.iter().chain(&manifest.absent) {
        remove_any(p)?;
    }
    let mut restored = 0;
    let mut dirs = Vec::new();
    for entry in entries {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let dest = Path::new("/").join(&path);
        if !manifest.present.iter().any(|p| dest.starts_with(p)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("backup entry {} is outside the declared paths", dest.display()),
            ));
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        if entry.header().entry_type().is_dir() {
            // Directory times are set last, after their children exist.
            fs::create_dir_all(&dest)?;
            dirs.push((dest, entry.header().clone()));
            continue;
        }
        entry.unpack(&dest)?;
        restored += 1;
    }
    for (dest, header) in dirs.into_iter().rev() {
        use std::os::unix::fs::PermissionsExt;
        let mode = header.mode()?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        let (uid, gid) = (header.uid()? as u32, header.gid()? as u32);
        std::os::unix::fs::chown(&dest, Some(uid), Some(gid))?;
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(header.mtime()?);
        File::open(&dest)?.set_modified(mtime)?;
        restored += 1;
    }
    Ok(restored)
}

/// Keeps the newest `keep` backups in `dir`; removes the rest and any
/// half-written ones.
pub fn prune(dir: &Path, keep: usize) -> io::Result<Vec<PathBuf>> {
    let mut all: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    let mut removed = Vec::new();
    for e in fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "tmp") {
            fs::remove_file(&p)?;
            removed.push(p);
        } else if p.to_string_lossy().ends_with(".tar.gz") {
            all.push((e.metadata()?.modified()?, p));
        }
    }
    all.sort();
    let excess = all.len().saturating_sub(keep);
    for (_, p) in all.into_iter().take(excess) {
        fs::remove_file(&p)?;
        removed.push(p);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// path → (mode, uid, gid, mtime, sha256 or link target)
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32, i64, String)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            let m = fs::symlink_metadata(&p).unwrap();
            let content = if m.file_type().is_symlink() {
                fs::read_link(&p).unwrap().display().to_string()
            } else if m.is_dir() {
                for e in fs::read_dir(&p).unwrap() {
                    stack.push(e.unwrap().path());
                }
                String::new()
            } else {
                convoy_common::Digest::of_bytes(&fs::read(&p).unwrap()).to_hex()
            };
            out.insert(p, (m.mode(), m.uid(), m.gid(), m.mtime(), content));
        }
        out
    }

    #[test]
    fn restores_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("etc/app");
        fs::create_dir_all(conf.join("conf.d")).unwrap();
        fs::write(conf.join("app.conf"), "port = 1\n").unwrap();
        fs::write(conf.join("conf.d/extra.conf"), "x\n").unwrap();
        fs::set_permissions(conf.join("app.conf"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(conf.join("app.conf"), Some(1234), Some(4321)).unwrap();
        std::os::unix::fs::symlink("app.conf", conf.join("current.conf")).unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
        File::open(conf.join("conf.d/extra.conf"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        File::open(conf.join("conf.d")).unwrap().set_modified(old).unwrap();
        let state = dir.path().join("var/state.db");
        let never = dir.path().join("var/created-by-new-release");
        fs::create_dir_all(state.parent().unwrap()).unwrap();
        fs::write(&state, vec![7u8; 100_000]).unwrap();
        let before = (snapshot(&conf), snapshot(&state));

        let backup = dir.path().join("b.tar.gz");
        create(&[conf.clone(), state.clone(), never.clone()], &backup).unwrap();

        // The new release rewrites everything.
        fs::write(conf.join("app.conf"), "port = 2\n").unwrap();
        fs::remove_file(conf.join("conf.d/extra.conf")).unwrap();
        fs::write(conf.join("new.conf"), "new").unwrap();
        fs::remove_file(conf.join("current.conf")).unwrap();
        fs::write(&state, b"migrated").unwrap();
        fs::write(&never, b"should vanish").unwrap();

        restore(&backup).unwrap();
        assert_eq!((snapshot(&conf), snapshot(&state)), before);
        assert!(!never.exists(), "a path absent at backup time is removed on restore");
    }

    #[test]
    fn prune_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..4 {
            let p = dir.path().join(format!("{i}.tar.gz"));
            fs::write(&p, b"x").unwrap();
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i);
            File::open(&p).unwrap().set_modified(t).unwrap();
        }
        fs::write(dir.path().join("x.tar.tmp"), b"half").unwrap();
        prune(dir.path(), 2).unwrap();
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, vec!["2.tar.gz", "3.tar.gz"]);
    }
}
