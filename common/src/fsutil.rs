//! Durable file-system primitives: write-then-rename with fsync of the file
//! and of its directory, so a crash leaves either the old or the new file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// fsyncs a directory, making renames and creations inside it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes everything written on the file system holding `path` durable in
/// one call (syncfs): cheaper than an fsync per file of a whole tree.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)).map_err(io::Error::from)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Atomically replaces `path` with `data` (mode `mode`), durably.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("convoy-tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(parent(path))
}

/// Atomically points the symlink `link` at `target`: a temporary symlink is
/// renamed over `link`, so `link` always resolves to the old or the new
/// target, never to nothing.
pub fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    let name = link
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "link has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".convoy-new");
    let tmp = parent(link).join(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link)?;
    fsync_dir(parent(link))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_replacement_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let link = dir.path().join("current");
        replace_symlink(&a, &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), a);
        replace_symlink(&b, &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), b);
        // no temporary left behind
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
    }
}
