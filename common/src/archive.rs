//! The artifact format (a tar of one release tree, compressed with gzip
//! or zstd, told apart by their magic bytes) and its safe extraction.
//!
//! Extraction trusts nothing in the archive: every entry path must be
//! relative and stay inside the destination, links must resolve inside it,
//! no entry may be written through a symlink, device and FIFO nodes are
//! refused, and entry count and sizes are bounded. Files are created with
//! `O_CREAT|O_EXCL` in a directory convoy created itself, so an existing
//! file or link is never opened or followed.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::bufread::GzDecoder;
use tar::EntryType;

/// Bounds on what one archive may contain.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_entries: u64,
    /// Sum of all file sizes, uncompressed.
    pub max_total_bytes: u64,
    /// Whether setuid and setgid bits are kept (otherwise they are refused).
    pub allow_setid: bool,
    /// At most this many unpacked bytes per compressed byte.
    pub max_ratio: Option<Ratio>,
}

/// A bound on how far an archive of `compressed` bytes may expand.
#[derive(Debug, Clone, Copy)]
pub struct Ratio {
    pub max: u32,
    pub compressed: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_total_bytes: 8 << 30,
            allow_setid: false,
            max_ratio: None,
        }
    }
}

impl Limits {
    /// The limits an app's spec sets, for an artifact of `compressed` bytes.
    pub fn of(spec: &crate::spec::InstallSpec, compressed: u64) -> Self {
        Limits {
            max_entries: spec.limits.max_entries,
            max_total_bytes: spec.limits.max_unpacked_size,
            allow_setid: spec.allow_setid,
            max_ratio: Some(Ratio {
                max: spec.limits.max_ratio,
                compressed,
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("entry {entry:?}: absolute paths are not allowed")]
    AbsolutePath { entry: String },
    #[error("entry {entry:?}: '..' components are not allowed")]
    ParentDir { entry: String },
    #[error("entry {entry:?}: empty path")]
    EmptyPath { entry: String },
    #[error("entry {entry:?}: link target {target:?} escapes the release root")]
    LinkEscapes { entry: String, target: String },
    #[error("entry {entry:?}: hard link target {target:?} is not a regular file extracted earlier")]
    BadHardLink { entry: String, target: String },
    #[error("entry {entry:?}: {kind} entries are not allowed")]
    SpecialFile { entry: String, kind: &'static str },
    #[error("entry {entry:?}: setuid/setgid bits (mode {mode:o}) are not allowed by this app's spec")]
    SetId { entry: String, mode: u32 },
    #[error("entry {entry:?}: appears twice in the archive")]
    Duplicate { entry: String },
    #[error("entry {entry:?}: would be written through the symlink {link:?}")]
    ThroughSymlink { entry: String, link: String },
    #[error("entry {entry:?}: parent {parent:?} is not a directory in the archive")]
    ParentNotDir { entry: String, parent: String },
    #[error("archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("archive expands to more than {limit} bytes (at entry {entry:?}); the app spec's max_unpacked_size allows that much")]
    TooLarge { limit: u64, entry: String },
    #[error("archive expands to more than {ratio} times its {compressed} compressed bytes (at entry {entry:?}); the app spec's max_ratio allows that much")]
    TooHighRatio { ratio: u32, compressed: u64, entry: String },
    #[error("entry {entry:?}: {source}")]
    Io {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("archive is corrupt or not a gzip- or zstd-compressed tar: {0}")]
    Corrupt(#[source] io::Error),
    #[error("archive is corrupt: the compressed stream does not end whole after the tar end-of-archive marker (its checksum or length trailer fails or is missing): {0}")]
    BadTrailer(#[source] io::Error),
    #[error("archive has data after the tar end-of-archive marker ({0}); a release archive ends there")]
    TrailingData(&'static str),
    #[error("destination {0:?} already exists")]
    DestinationExists(PathBuf),
}

/// What an extraction produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Turns an archive path into a clean relative path, or says why not.
fn clean_path(raw: &Path) -> Result<PathBuf, ArchiveError> {
    let entry = || raw.display().to_string();
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(ArchiveError::ParentDir { entry: entry() }),
            Component::RootDir | Component::Prefix(_) => return Err(ArchiveError::AbsolutePath { entry: entry() }),
        }
    }
    Ok(out)
}

/// Resolves a symlink target lexically against the link's directory; `None`
/// when it leaves the root.
fn resolve_inside(link_rel: &Path, target: &Path) -> Option<PathBuf> {
    if target.is_absolute() {
        return None;
    }
    let mut stack: Vec<&std::ffi::OsStr> = link_rel
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(s) => Some(s),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(s) => stack.push(s),
            Component::CurDir => {}
            Component::ParentDir => {
                stack.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(stack.iter().collect())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

/// How an artifact is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression whose magic bytes `head` starts with.
    pub fn sniff(head: &[u8]) -> Option<Self> {
        match head {
            [0x1f, 0x8b, ..] => Some(Compression::Gzip),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// Unpacks a gzip- or zstd-compressed tar from `reader` into `dest`, which
/// must not exist yet. On error, whatever was written stays inside `dest`
/// and the caller removes `dest`.
pub fn unpack(reader: impl Read, dest: &Path, limits: &Limits) -> Result<UnpackStats, ArchiveError> {
    match fs::create_dir(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(ArchiveError::DestinationExists(dest.to_owned()))
        }
        Err(e) => {
            return Err(ArchiveError::Io {
                entry: dest.display().to_string(),
                source: e,
            })
        }
    }
    // Our own buffer under the decoder, so that what follows the
    // compressed stream can be read once the stream ends.
    let mut buffered = io::BufReader::with_capacity(1 << 16, reader);
    let head = io::BufRead::fill_buf(&mut buffered).map_err(ArchiveError::Corrupt)?;
    let (stats, dir_modes) = match Compression::sniff(head) {
        Some(Compression::Gzip) => {
            let mut archive = tar::Archive::new(GzDecoder::new(buffered));
            let done = entries(&mut archive, dest, limits)?;
            check_end(archive.into_inner(), Compression::Gzip, |gz| gz.into_inner())?;
            done
        }
        Some(Compression::Zstd) => {
            // One frame: whatever follows it is trailing data, not a
            // second frame to decode.
            let zst = zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(ArchiveError::Corrupt)?
                .single_frame();
            let mut archive = tar::Archive::new(zst);
            let done = entries(&mut archive, dest, limits)?;
            check_end(archive.into_inner(), Compression::Zstd, |z| z.finish())?;
            done
        }
        None => {
            return Err(ArchiveError::Corrupt(io::Error::new(
                io::ErrorKind::InvalidData,
                "it starts with neither the gzip nor the zstd magic bytes",
            )))
        }
    };
    // Directory modes last, so a read-only directory does not stop us
    // writing its children.
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(|source| ArchiveError::Io {
            entry: dir.display().to_string(),
            source,
        })?;
    }
    Ok(stats)
}

/// A directory and the mode it gets once its children are written.
type DirMode = (PathBuf, u32);

/// Extracts every entry of `archive` into `dest`, checking each.
fn entries<R: Read>(
    archive: &mut tar::Archive<R>,
    dest: &Path,
    limits: &Limits,
) -> Result<(UnpackStats, Vec<DirMode>), ArchiveError> {
    let mut kinds: HashMap<PathBuf, Kind> = HashMap::new();
    let mut dir_modes: Vec<DirMode> = Vec::new();
    let mut stats = UnpackStats::default();

    for entry in archive.entries().map_err(ArchiveError::Corrupt)? {
        let mut entry = entry.map_err(ArchiveError::Corrupt)?;
        let raw = entry.path().map_err(ArchiveError::Corrupt)?.into_owned();
        let name = raw.display().to_string();
        let rel = clean_path(&raw)?;
        let etype = entry.header().entry_type();

        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        if rel.as_os_str().is_empty() {
            // "./" itself: the root, which we created.
            if etype == EntryType::Directory {
                continue;
            }
            return Err(ArchiveError::EmptyPath { entry: name });
        }
        if kinds.contains_key(&rel) {
            return Err(ArchiveError::Duplicate { entry: name });
        }
        // Every ancestor must be a directory this archive created (or be
        // created now); never a symlink, never a file.
        let ancestors: Vec<&Path> = rel.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()).collect();
        for a in ancestors.iter().rev() {
            match kinds.get(*a) {
                Some(Kind::Dir) => {}
                Some(Kind::Symlink) => {
                    return Err(ArchiveError::ThroughSymlink {
                        entry: name,
                        link: a.display().to_string(),
                    })
                }
                Some(Kind::File) => {
                    return Err(ArchiveError::ParentNotDir {
                        entry: name,
                        parent: a.display().to_string(),
                    })
                }
                None => {
                    let p = dest.join(a);
                    fs::create_dir(&p).map_err(|source| ArchiveError::Io {
                        entry: name.clone(),
                        source,
                    })?;
                    kinds.insert(a.to_path_buf(), Kind::Dir);
                }
            }
        }

        let mode = entry.header().mode().map_err(ArchiveError::Corrupt)? & 0o7777;
        if mode & 0o6000 != 0 && !limits.allow_setid && etype != EntryType::Symlink {
            return Err(ArchiveError::SetId { entry: name, mode });
        }
        let target = dest.join(&rel);
        let io_err = |source| ArchiveError::Io {
            entry: name.clone(),
            source,
        };

        match etype {
            EntryType::Directory => {
                fs::create_dir(&target).map_err(io_err)?;
                dir_modes.push((target, mode));
                kinds.insert(rel, Kind::Dir);
            }
            EntryType::Regular | EntryType::Continuous => {
                let declared = entry.header().size().map_err(ArchiveError::Corrupt)?;
                let total = stats.bytes.saturating_add(declared);
                if total > limits.max_total_bytes {
                    return Err(ArchiveError::TooLarge {
                        limit: limits.max_total_bytes,
                        entry: name,
                    });
                }
                if let Some(r) = limits.max_ratio {
                    if total > r.compressed.max(1).saturating_mul(u64::from(r.max)) {
                        return Err(ArchiveError::TooHighRatio {
                            ratio: r.max,
                            compressed: r.compressed,
                            entry: name,
                        });
                    }
                }
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(io_err)?;
                let written = copy_bounded(&mut entry, &mut f).map_err(io_err)?;
                stats.bytes += written;
                f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err)?;
                stats.files += 1;
                kinds.insert(rel, Kind::File);
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(ArchiveError::Corrupt)?
                    .ok_or_else(|| ArchiveError::EmptyPath { entry: name.clone() })?
                    .into_owned();
                if resolve_inside(&rel, &link).is_none() {
                    return Err(ArchiveError::LinkEscapes {
                        entry: name,
                        target: link.display().to_string(),
                    });
                }
                std::os::unix::fs::symlink(&link, &target).map_err(io_err)?;
                kinds.insert(rel, Kind::Symlink);
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(ArchiveError::Corrupt)?
                    .ok_or_else(|| ArchiveError::EmptyPath { entry: name.clone() })?
                    .into_owned();
                let bad = || ArchiveError::BadHardLink {
                    entry: name.clone(),
                    target: link.display().to_string(),
                };
                let link_rel = clean_path(&link).map_err(|_| bad())?;
                if kinds.get(&link_rel) != Some(&Kind::File) {
                    return Err(bad());
                }
                fs::hard_link(dest.join(&link_rel), &target).map_err(io_err)?;
                stats.files += 1;
                kinds.insert(rel, Kind::File);
            }
            other => {
                let kind = match other {
                    EntryType::Char => "character device",
                    EntryType::Block => "block device",
                    EntryType::Fifo => "FIFO",
                    _ => "unsupported",
                };
                return Err(ArchiveError::SpecialFile { entry: name, kind });
            }
        }
    }
    Ok((stats, dir_modes))
}

/// After the tar end-of-archive marker: reads the compressed stream to its
/// end, which verifies its checksum and length trailer (gzip) or its frame
/// and content checksum (zstd), and checks that nothing but the zero
/// padding of the last tar record is left, inside the stream or after it
/// (`inner` gives back what the decoder read from). Extraction stops at
/// the marker; without this, a stream that fails its checksum, or carries
/// more behind the marker, would pass.
fn check_end<D: Read, B: io::BufRead>(
    mut decoder: D,
    format: Compression,
    inner: impl FnOnce(D) -> B,
) -> Result<(), ArchiveError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = decoder.read(&mut buf).map_err(ArchiveError::BadTrailer)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Err(ArchiveError::TrailingData(match format {
                Compression::Gzip => "non-zero bytes inside the gzip stream",
                Compression::Zstd => "non-zero bytes inside the zstd stream",
            }));
        }
    }
    let mut rest = inner(decoder);
    match rest.fill_buf() {
        Ok([]) => Ok(()),
        Ok(_) => Err(ArchiveError::TrailingData(match format {
            Compression::Gzip => "bytes after the end of the gzip stream",
            Compression::Zstd => "bytes after the end of the zstd frame",
        })),
        Err(e) => Err(ArchiveError::Corrupt(e)),
    }
}

fn copy_bounded(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Packs the directory `src` into a gzip-compressed tar at `out`, the
/// format `unpack` reads. Used by the CLI and the test bed.
pub fn pack_dir(src: &Path, out: impl Write) -> io::Result<()> {
    pack_dir_as(src, out, Compression::Gzip)
}

/// Packs `src` as a tar compressed with `how` (zstd with a content
/// checksum, as the `zstd` program writes by default).
pub fn pack_dir_as(src: &Path, out: impl Write, how: Compression) -> io::Result<()> {
    fn tar_into<W: Write>(src: &Path, w: W) -> io::Result<W> {
        let mut builder = tar::Builder::new(w);
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Deterministic);
        builder.append_dir_all(".", src)?;
        builder.into_inner()
    }
    match how {
        Compression::Gzip => {
            let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            tar_into(src, gz)?.finish()?.flush()
        }
        Compression::Zstd => {
            let mut zst = zstd::stream::write::Encoder::new(out, 3)?;
            zst.include_checksum(true)?;
            tar_into(src, zst)?.finish()?.flush()
        }
    }
}

/// Names of the entries in an unpacked tree, for tests and diagnostics.
pub fn list_tree(root: &Path) -> io::Result<HashSet<PathBuf>> {
    let mut out = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
            if e.file_type()?.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_inside_cases() {
        let check = |link: &str, target: &str, inside: bool| {
            assert_eq!(
                resolve_inside(Path::new(link), Path::new(target)).is_some(),
                inside,
                "{link} -> {target}"
            );
        };
        check("a/b", "c", true);
        check("a/b", "../c", true);
        check("a/b", "../../c", false);
        check("b", "../c", false);
        check("b", "/etc/passwd", false);
        check("a/b/c", "../../x/./y", true);
    }

    #[test]
    fn pack_then_unpack_round_trips() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("bin")).unwrap();
        fs::write(src.path().join("bin/app"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.path().join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("bin/app", src.path().join("run")).unwrap();
        let mut buf = Vec::new();
        pack_dir(src.path(), &mut buf).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("r");
        let stats = unpack(&buf[..], &dest, &Limits::default()).unwrap();
        assert_eq!(stats.files, 1);
        assert_eq!(fs::read(dest.join("bin/app")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(
            fs::metadata(dest.join("bin/app")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(fs::read_link(dest.join("run")).unwrap(), Path::new("bin/app"));
    }
}
