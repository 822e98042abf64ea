//! A release's manifest: every entry of its archive, in archive order,
//! with the sha256 of each file's contents. The controller makes it at
//! push, the CLI signs it with the artifact, and an agent that holds some
//! of the contents already builds the release from the manifest: it
//! reuses what it has and fetches the rest by sha256 (delta staging).
//!
//! A manifest obeys the same rules as an archive: `archive::apply_manifest` admits each
//! entry through the archive's checker (paths, links, modes, counts,
//! sizes, ratio) and checks each file's bytes against its sha256 and
//! size before the tree may be used.
//!
//! The encoding is this module's own, one way to write each manifest, so
//! the same archive always gives the same bytes and the same digest:
//! `convoy-manifest\0`, the format (u32), the entry count (u64), then per
//! entry its kind and mode (u32 each), size (u64), and sha256, path and
//! link as length-prefixed (u32) bytes; integers little-endian.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub format: u32,
    pub entries: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ManifestEntry {
    /// The entry's path in the tree, as the archive spells it.
    pub path: Vec<u8>,
    pub kind: u32,
    pub mode: u32,
    /// Files: the content's length.
    pub size: u64,
    /// Files: the content's sha256.
    pub sha256: Vec<u8>,
    /// Symlinks: the target; hard links: the file they name.
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

const MAGIC: &[u8] = b"convoy-manifest\0";

/// The longest path or link target a manifest may name.
const MAX_NAME: usize = 64 << 10;

impl Manifest {
    /// The canonical bytes, which the digest (and a signature) covers.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + 12 + self.entries.len() * 96);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.format.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.kind.to_le_bytes());
            out.extend_from_slice(&e.mode.to_le_bytes());
            out.extend_from_slice(&e.size.to_le_bytes());
            for bytes in [&e.sha256, &e.path, &e.link] {
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
        out
    }

    /// Decodes `bytes` as read from a controller; bounded by `max_entries`
    /// before any entry is read.
    pub fn decode(bytes: &[u8], max_entries: u64) -> Result<Manifest, ManifestError> {
        let mut r = Reader { rest: bytes, at: 0 };
        if r.take(MAGIC.len())? != MAGIC {
            return Err(ManifestError::Corrupt("it does not start as a convoy manifest".into()));
        }
        let format = r.u32()?;
        if format != FORMAT {
            return Err(ManifestError::Format(format));
        }
        let count = r.u64()?;
        if count > max_entries {
            return Err(ManifestError::TooManyEntries(max_entries));
        }
        let mut entries = Vec::with_capacity(count.min(1 << 16) as usize);
        for _ in 0..count {
            let (kind, mode, size) = (r.u32()?, r.u32()?, r.u64()?);
            let sha256 = r.bytes()?;
            if !(sha256.is_empty() || sha256.len() == 32) {
                return Err(ManifestError::Corrupt(format!(
                    "a sha256 of {} bytes at byte {}",
                    sha256.len(),
                    r.at
                )));
            }
            entries.push(ManifestEntry {
                kind,
                mode,
                size,
                sha256,
                path: r.bytes()?,
                link: r.bytes()?,
            });
        }
        if !r.rest.is_empty() {
            return Err(ManifestError::Corrupt(format!(
                "{} bytes after the last entry",
                r.rest.len()
            )));
        }
        Ok(Manifest { format, entries })
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

/// Reads a manifest's bytes, failing (with the offset) where they end early.
struct Reader<'a> {
    rest: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        if self.rest.len() < n {
            return Err(ManifestError::Corrupt(format!(
                "it ends at byte {} where {n} more were expected",
                self.at + self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        self.at += n;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, ManifestError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ManifestError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, ManifestError> {
        let n = self.u32()? as usize;
        if n > MAX_NAME {
            return Err(ManifestError::Corrupt(format!(
                "a name of {n} bytes at byte {} (at most {MAX_NAME})",
                self.at
            )));
        }
        Ok(self.take(n)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{self, Limits};
    use std::fs;

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
