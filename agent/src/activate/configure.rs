//! Writing an environment's rendered configuration into a staged release
//! tree, before the switch, so that one switch moves code and
//! configuration together and a rollback to the tree brings both back.
//! The contents may be secret: nothing here logs or reports them.

use std::fs;
use std::path::Path;

use convoy_common::ops::RenderedConfig;

use super::*;

/// Stages the release of `base` (fetch, verify, unpack) and, when `cmd`
/// carries a configuration, the tree of that release and revision: a
/// copy of the release's tree (reflinks where the file system has them,
/// plain copies elsewhere; never hard links, so a write to one tree
/// cannot change another, see `delta`) with the rendered files in it.
pub(super) async fn stage_tree(
    agent: &Agent,
    channel: &Channel,
    base: &ActivateCommand,
    cmd: &ActivateCommand,
    dirs: &AppDirs,
) -> Result<String, String> {
    let staged = super::stage::stage(agent, channel, base, dirs).await?;
    let Some(cfg) = &cmd.config else { return Ok(staged) };
    let (from, to) = (dirs.release(&base.version), dirs.release(&cmd.version));
    let scratch = dirs.staging.join(format!("{}.tree", cmd.version));
    let _ = fs::remove_dir_all(&scratch);
    clone_tree(&from, &scratch).map_err(|e| format!("copying {} for its configuration: {e}", base.version))?;
    let meta = agent
        .store
        .release_meta(&cmd.spec.app, &base.version)
        .ok_or_else(|| format!("release {} has no record on this host", base.version))?;
    let wrote = write(&cmd.spec, &scratch, cfg)?;
    let _ = fs::remove_dir_all(&to);
    agent
        .store
        .write_release_meta(
            &cmd.spec.app,
            &cmd.version,
            &crate::store::ReleaseMeta {
                config_revision: Some(cfg.revision),
                ..meta
            },
        )
        .map_err(|e| e.to_string())?;
    fs::rename(&scratch, &to).map_err(|e| format!("moving {} into place: {e}", cmd.version))?;
    fsutil::fsync_dir(&dirs.releases).map_err(|e| e.to_string())?;
    Ok(format!("{staged}; {wrote}"))
}

/// Copies a tree: directories made, files copied (reflinks where the file
/// system has them), links copied.
fn clone_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir(to)?;
    fs::set_permissions(to, fs::metadata(from)?.permissions())?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            clone_tree(&src, &dst)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else {
            reflink_copy::reflink_or_copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Writes each file under `tree` with its mode, owned by the spec's user.
/// Returns what it did, for the step event.
fn write(spec: &InstallSpec, tree: &Path, cfg: &RenderedConfig) -> Result<String, String> {
    let owner = match &spec.user {
        None => None,
        Some(u) => match nix::unistd::User::from_name(u) {
            Ok(Some(user)) => Some((user.uid, user.gid)),
            Ok(None) => return Err(format!("user {u:?} (the spec's user) does not exist on this host")),
            Err(e) => return Err(format!("looking up user {u:?}: {e}")),
        },
    };
    for f in &cfg.files {
        let path = tree.join(&f.path);
        make_parents(tree, Path::new(&f.path)).map_err(|e| format!("{}: {e}", f.path))?;
        fsutil::write_atomic(&path, &f.content, f.mode).map_err(|e| format!("writing {}: {e}", f.path))?;
        if let Some((uid, gid)) = owner {
            nix::unistd::chown(&path, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", f.path))?;
        }
    }
    let names: Vec<&str> = cfg.files.iter().map(|f| f.path.as_str()).collect();
    Ok(format!(
        "configuration revision {} written: {}{}",
        cfg.revision,
        names.join(", "),
        spec.user
            .as_ref()
            .map(|u| format!(" (owned by {u})"))
            .unwrap_or_default()
    ))
}

/// Creates the directories of `rel` inside `tree`, refusing a component
/// that is a symlink or not a directory (a release must not steer a write
/// out of its tree).
fn make_parents(tree: &Path, rel: &Path) -> std::io::Result<()> {
    let mut at = tree.to_path_buf();
    let parents: Vec<_> = rel.parent().map(|p| p.components().collect()).unwrap_or_default();
    for c in parents {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory of the release",
                    at.strip_prefix(tree).unwrap_or(&at).display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::create_dir(&at)?,
            Err(e) => return Err(e),
        }
    }
    match fs::symlink_metadata(tree.join(rel)) {
        Ok(m) if m.file_type().is_symlink() || m.is_dir() => {
            Err(std::io::Error::other("the release has a link or a directory there"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stay_inside_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        std::os::unix::fs::symlink("/tmp", tree.join("out")).unwrap();
        make_parents(&tree, Path::new("config/app.env")).unwrap();
        assert!(tree.join("config").is_dir());
        assert!(make_parents(&tree, Path::new("out/x")).is_err(), "through a symlink");
        std::os::unix::fs::symlink("/etc/passwd", tree.join("etc/link")).unwrap();
        assert!(make_parents(&tree, Path::new("etc/link")).is_err(), "onto a symlink");
    }
}
