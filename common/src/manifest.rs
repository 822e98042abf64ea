//! A release's manifest: every entry of its archive, in archive order,
//! with the sha256 of each file's contents. The controller makes it at
//! push, the CLI signs it with the artifact, and an agent that holds some
//! of the contents already builds the release from the manifest: it
//! reuses what it has and fetches the rest by sha256 (delta staging).
//!
//! A manifest obeys the same rules as an archive: `apply` admits each
//! entry through the archive's checker (paths, links, modes, counts,
//! sizes, ratio) and checks each file's bytes against its sha256 and
//! size before the tree may be used.
//!
//! The encoding is protobuf, written by this module only, so the same
//! archive always gives the same bytes and the same digest.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::archive::{self, ArchiveError, Claim, Limits, UnpackStats};
use crate::digest::Digest;

/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;

/// Entry kinds.
pub mod kind {
    pub const DIR: u32 = 1;
    pub const FILE: u32 = 2;
    pub const SYMLINK: u32 = 3;
    /// A second name for a file earlier in the same release.
    pub const HARDLINK: u32 = 4;
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Manifest {
    #[prost(uint32, tag = "1")]
    pub format: u32,
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<ManifestEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ManifestEntry {
    /// The entry's path in the tree, as the archive spells it.
    #[prost(bytes = "vec", tag = "1")]
    pub path: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    /// Files: the content's length.
    #[prost(uint64, tag = "4")]
    pub size: u64,
    /// Files: the content's sha256.
    #[prost(bytes = "vec", tag = "5")]
    pub sha256: Vec<u8>,
    /// Symlinks: the target; hard links: the file they name.
    #[prost(bytes = "vec", tag = "6")]
    pub link: Vec<u8>,
}

impl ManifestEntry {
    pub fn dir(path: &Path, mode: u32) -> Self {
        ManifestEntry {
            path: path.as_os_str().as_bytes().to_vec(),
            kind: kind::DIR,
            mode,
            ..Default::default()
        }
    }

    pub fn file(path: &Path, mode: u32, size: u64, sha256: Digest) -> Self {
        ManifestEntry {
            path: path.as_os_str().as_bytes().to_vec(),
            kind: kind::FILE,
            mode,
            size,
            sha256: sha256.as_bytes().to_vec(),
            link: Vec::new(),
        }
    }

    pub fn symlink(path: &Path, target: &Path) -> Self {
        ManifestEntry {
            path: path.as_os_str().as_bytes().to_vec(),
            kind: kind::SYMLINK,
            mode: 0o777,
            link: target.as_os_str().as_bytes().to_vec(),
            ..Default::default()
        }
    }

    pub fn hardlink(path: &Path, to: &Path) -> Self {
        ManifestEntry {
            path: path.as_os_str().as_bytes().to_vec(),
            kind: kind::HARDLINK,
            link: to.as_os_str().as_bytes().to_vec(),
            ..Default::default()
        }
    }

    pub fn path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.path))
    }

    /// A file's content digest (`None` for other kinds, or a malformed one).
    pub fn content(&self) -> Option<Digest> {
        (self.kind == kind::FILE)
            .then(|| <[u8; 32]>::try_from(&self.sha256[..]).ok().map(Digest::from_bytes))
            .flatten()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is corrupt: {0}")]
    Corrupt(String),
    #[error("manifest format {0} is not one this host reads (it reads format {FORMAT})")]
    Format(u32),
    #[error("manifest has more than {0} entries")]
    TooManyEntries(u64),
}

impl Manifest {
    /// The canonical bytes, which the digest (and a signature) covers.
    pub fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }

    /// Decodes `bytes` as read from a controller; bounded by `max_entries`
    /// before any entry is used.
    pub fn decode(bytes: &[u8], max_entries: u64) -> Result<Manifest, ManifestError> {
        let m: Manifest = prost::Message::decode(bytes).map_err(|e| ManifestError::Corrupt(e.to_string()))?;
        if m.format != FORMAT {
            return Err(ManifestError::Format(m.format));
        }
        if m.entries.len() as u64 > max_entries {
            return Err(ManifestError::TooManyEntries(max_entries));
        }
        Ok(m)
    }

    pub fn digest(&self) -> Digest {
        Digest::of_bytes(&self.encode())
    }

    /// Every file's content, with its size, once each, in manifest order.
    pub fn contents(&self) -> Vec<(Digest, u64)> {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .filter_map(|e| e.content().map(|d| (d, e.size)))
            .filter(|(d, _)| seen.insert(*d))
            .collect()
    }

    /// Total bytes of file contents.
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == kind::FILE)
            .map(|e| e.size)
            .sum()
    }
}

/// Builds the tree `manifest` describes in `dest`, which must not exist
/// yet. Every entry passes the archive's rules first. For each file,
/// `fill` creates it at the path given (with `archive::create_file`: new,
/// never through a link) holding the entry's content, and returns the
/// length and sha256 of what it wrote; a file whose bytes differ from the
/// manifest fails the build. On error the caller removes `dest`.
pub fn apply(
    manifest: &Manifest,
    dest: &Path,
    limits: &Limits,
    mut fill: impl FnMut(&ManifestEntry, &Path) -> io::Result<(u64, Digest)>,
) -> Result<UnpackStats, ArchiveError> {
    let io_at = |entry: &Path| {
        let entry = entry.display().to_string();
        move |source| ArchiveError::Io { entry, source }
    };
    fs::create_dir(dest).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => ArchiveError::DestinationExists(dest.to_owned()),
        _ => io_at(dest)(e),
    })?;
    if manifest.entries.len() as u64 > limits.max_entries {
        return Err(ArchiveError::TooManyEntries {
            limit: limits.max_entries,
        });
    }
    let mut check = archive::Checker::new(limits);
    let mut dir_modes = Vec::new();
    for e in &manifest.entries {
        let raw = e.path();
        let name = raw.display().to_string();
        let mode = e.mode & 0o7777;
        let link = Path::new(OsStr::from_bytes(&e.link));
        let claim = match e.kind {
            kind::DIR => Claim::Dir,
            kind::FILE => {
                if e.content().is_none() {
                    return Err(ArchiveError::Io {
                        entry: name,
                        source: io::Error::new(io::ErrorKind::InvalidData, "a file entry without a sha256"),
                    });
                }
                Claim::File(e.size)
            }
            kind::SYMLINK if !e.link.is_empty() => Claim::Symlink(link),
            kind::HARDLINK => Claim::HardLink(link),
            kind::SYMLINK => return Err(ArchiveError::EmptyPath { entry: name }),
            _ => Claim::Special("unknown"),
        };
        let Some(admitted) = check.admit(raw, claim, mode)? else {
            continue;
        };
        archive::make_dirs(dest, &admitted, &name)?;
        let target = dest.join(&admitted.rel);
        match e.kind {
            kind::DIR => {
                fs::create_dir(&target).map_err(io_at(raw))?;
                dir_modes.push((target, mode));
            }
            kind::FILE => {
                let (size, sha) = fill(e, &target).map_err(io_at(raw))?;
                let expected = e.content().expect("checked above");
                if size != e.size || sha != expected {
                    return Err(ArchiveError::ContentMismatch {
                        entry: name,
                        expected: format!("{} bytes, sha256 {expected}", e.size),
                        got: format!("{size} bytes, sha256 {sha}"),
                    });
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(io_at(raw))?;
            }
            kind::SYMLINK => std::os::unix::fs::symlink(link, &target).map_err(io_at(raw))?,
            kind::HARDLINK => {
                let to = admitted.link_to.as_ref().expect("admitted hard links name their file");
                fs::hard_link(dest.join(to), &target).map_err(io_at(raw))?;
            }
            _ => unreachable!("other kinds are refused by the checker"),
        }
    }
    archive::set_dir_modes(dir_modes)?;
    let mut stats = check.stats;
    stats.manifest = manifest.clone();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_archive_gives_the_same_manifest_bytes() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("bin")).unwrap();
        fs::write(src.path().join("bin/app"), b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("bin/app", src.path().join("run")).unwrap();
        let mut gz = Vec::new();
        archive::pack_dir(src.path(), &mut gz).unwrap();
        let mut zst = Vec::new();
        archive::pack_dir_as(src.path(), &mut zst, archive::Compression::Zstd).unwrap();
        let a = archive::manifest_of(&gz[..], &Limits::default()).unwrap().manifest;
        let b = archive::manifest_of(&zst[..], &Limits::default()).unwrap().manifest;
        assert_eq!(a.encode(), b.encode(), "the compression does not change the manifest");
        let out = tempfile::tempdir().unwrap();
        let unpacked = archive::unpack(&gz[..], &out.path().join("r"), &Limits::default()).unwrap();
        assert_eq!(unpacked.manifest.digest(), a.digest());
        let back = Manifest::decode(&a.encode(), 10).unwrap();
        assert_eq!(back, a);
        assert_eq!(a.contents(), vec![(Digest::of_bytes(b"#!/bin/sh\n"), 10)]);
    }
}
