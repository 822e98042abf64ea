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
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::bufread::GzDecoder;
use tar::EntryType;

use crate::digest::{Digest, Hasher};
use crate::manifest::{kind as mkind, Manifest, ManifestEntry};

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
    /// No bounds: for making the manifest of an archive whose bounds are
    /// checked elsewhere (at push, against the app's spec).
    pub fn unbounded() -> Self {
        Limits {
            max_entries: u64::MAX,
            max_total_bytes: u64::MAX,
            allow_setid: true,
            max_ratio: None,
        }
    }

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
    #[error("entry {entry:?}: its content is not what the manifest says (expected {expected}, got {got})")]
    ContentMismatch {
        entry: String,
        expected: String,
        got: String,
    },
    #[error("destination {0:?} already exists")]
    DestinationExists(PathBuf),
}

/// What an extraction produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct UnpackStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    /// Every entry, in archive order, with the sha256 of each file.
    pub manifest: Manifest,
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
    let (stats, dir_modes) = read(reader, Some(dest), limits)?;
    set_dir_modes(dir_modes)?;
    Ok(stats)
}

/// Reads a whole archive as `unpack` does, every rule checked and the
/// compressed stream read to its verified end, writing nothing: what it
/// holds and its manifest. The CLI signs this manifest at push.
pub fn manifest_of(reader: impl Read, limits: &Limits) -> Result<UnpackStats, ArchiveError> {
    read(reader, None, limits).map(|(stats, _)| stats)
}

fn read(reader: impl Read, dest: Option<&Path>, limits: &Limits) -> Result<(UnpackStats, Vec<DirMode>), ArchiveError> {
    // Our own buffer under the decoder, so that what follows the
    // compressed stream can be read once the stream ends.
    let mut buffered = io::BufReader::with_capacity(1 << 16, reader);
    let head = io::BufRead::fill_buf(&mut buffered).map_err(ArchiveError::Corrupt)?;
    match Compression::sniff(head) {
        Some(Compression::Gzip) => {
            let mut archive = tar::Archive::new(GzDecoder::new(buffered));
            let done = entries(&mut archive, dest, limits)?;
            check_end(archive.into_inner(), Compression::Gzip, |gz| gz.into_inner())?;
            Ok(done)
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
            Ok(done)
        }
        None => Err(ArchiveError::Corrupt(io::Error::new(
            io::ErrorKind::InvalidData,
            "it starts with neither the gzip nor the zstd magic bytes",
        ))),
    }
}

/// A directory and the mode it gets once its children are written.
type DirMode = (PathBuf, u32);

/// What an entry claims to be, as far as the rules care.
enum Claim<'a> {
    Dir,
    /// A regular file of this many bytes.
    File(u64),
    Symlink(&'a Path),
    HardLink(&'a Path),
    Special(&'static str),
}

/// An entry that passed the rules: its clean path, the ancestors to
/// create before it (in order), and for a hard link the file it links to.
struct Admitted {
    pub rel: PathBuf,
    pub new_dirs: Vec<PathBuf>,
    pub link_to: Option<PathBuf>,
}

/// The rules every entry of a release tree must pass, whether it comes
/// from an archive or from a manifest: relative clean paths, no
/// duplicates, every ancestor a directory of the tree (never a symlink
/// or a file), links inside the root, no device or FIFO nodes, no
/// setuid/setgid unless allowed, bounded counts, sizes and ratio. Checks
/// only; the caller makes what it admits.
struct Checker<'l> {
    limits: &'l Limits,
    kinds: HashMap<PathBuf, Kind>,
    pub stats: UnpackStats,
}

impl<'l> Checker<'l> {
    pub fn new(limits: &'l Limits) -> Self {
        Checker {
            limits,
            kinds: HashMap::new(),
            stats: UnpackStats::default(),
        }
    }

    /// Checks one entry; `Ok(None)` for the root directory itself.
    pub fn admit(&mut self, raw: &Path, claim: Claim<'_>, mode: u32) -> Result<Option<Admitted>, ArchiveError> {
        let name = raw.display().to_string();
        let rel = clean_path(raw)?;
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        if rel.as_os_str().is_empty() {
            // "./" itself: the root, which the caller created.
            if matches!(claim, Claim::Dir) {
                return Ok(None);
            }
            return Err(ArchiveError::EmptyPath { entry: name });
        }
        if self.kinds.contains_key(&rel) {
            return Err(ArchiveError::Duplicate { entry: name });
        }
        // Every ancestor must be a directory of this tree (or be created
        // now); never a symlink, never a file.
        let mut new_dirs = Vec::new();
        let ancestors: Vec<&Path> = rel.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()).collect();
        for a in ancestors.iter().rev() {
            match self.kinds.get(*a) {
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
                    self.kinds.insert(a.to_path_buf(), Kind::Dir);
                    new_dirs.push(a.to_path_buf());
                }
            }
        }
        if mode & 0o6000 != 0 && !self.limits.allow_setid && !matches!(claim, Claim::Symlink(_)) {
            return Err(ArchiveError::SetId { entry: name, mode });
        }
        let mut link_to = None;
        let kind = match claim {
            Claim::Dir => Kind::Dir,
            Claim::File(declared) => {
                let total = self.stats.bytes.saturating_add(declared);
                if total > self.limits.max_total_bytes {
                    return Err(ArchiveError::TooLarge {
                        limit: self.limits.max_total_bytes,
                        entry: name,
                    });
                }
                if let Some(r) = self.limits.max_ratio {
                    if total > r.compressed.max(1).saturating_mul(u64::from(r.max)) {
                        return Err(ArchiveError::TooHighRatio {
                            ratio: r.max,
                            compressed: r.compressed,
                            entry: name,
                        });
                    }
                }
                self.stats.bytes = total;
                self.stats.files += 1;
                Kind::File
            }
            Claim::Symlink(target) => {
                if resolve_inside(&rel, target).is_none() {
                    return Err(ArchiveError::LinkEscapes {
                        entry: name,
                        target: target.display().to_string(),
                    });
                }
                Kind::Symlink
            }
            Claim::HardLink(target) => {
                let bad = || ArchiveError::BadHardLink {
                    entry: name.clone(),
                    target: target.display().to_string(),
                };
                let target_rel = clean_path(target).map_err(|_| bad())?;
                if self.kinds.get(&target_rel) != Some(&Kind::File) {
                    return Err(bad());
                }
                link_to = Some(target_rel);
                self.stats.files += 1;
                Kind::File
            }
            Claim::Special(kind) => return Err(ArchiveError::SpecialFile { entry: name, kind }),
        };
        self.kinds.insert(rel.clone(), kind);
        Ok(Some(Admitted { rel, new_dirs, link_to }))
    }
}

/// Creates the directories an admitted entry needs above it.
fn make_dirs(dest: &Path, a: &Admitted, name: &str) -> Result<(), ArchiveError> {
    for d in &a.new_dirs {
        fs::create_dir(dest.join(d)).map_err(|source| ArchiveError::Io {
            entry: name.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// Sets directory modes, deepest last-made first, so a read-only directory
/// does not stop the writing of its children.
fn set_dir_modes(dir_modes: Vec<DirMode>) -> Result<(), ArchiveError> {
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(|source| ArchiveError::Io {
            entry: dir.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Checks every entry of `archive` and, with a `dest`, extracts it there;
/// either way hashes every file into the manifest.
fn entries<R: Read>(
    archive: &mut tar::Archive<R>,
    dest: Option<&Path>,
    limits: &Limits,
) -> Result<(UnpackStats, Vec<DirMode>), ArchiveError> {
    let mut check = Checker::new(limits);
    let mut dir_modes: Vec<DirMode> = Vec::new();
    let mut manifest = Manifest {
        format: crate::manifest::FORMAT,
        entries: Vec::new(),
    };

    for entry in archive.entries().map_err(ArchiveError::Corrupt)? {
        let mut entry = entry.map_err(ArchiveError::Corrupt)?;
        let raw = entry.path().map_err(ArchiveError::Corrupt)?.into_owned();
        let name = raw.display().to_string();
        let etype = entry.header().entry_type();
        let mode = entry.header().mode().map_err(ArchiveError::Corrupt)? & 0o7777;
        let link = match etype {
            EntryType::Symlink | EntryType::Link => Some(
                entry
                    .link_name()
                    .map_err(ArchiveError::Corrupt)?
                    .ok_or_else(|| ArchiveError::EmptyPath { entry: name.clone() })?
                    .into_owned(),
            ),
            _ => None,
        };
        let claim = match etype {
            EntryType::Directory => Claim::Dir,
            EntryType::Regular | EntryType::Continuous => {
                Claim::File(entry.header().size().map_err(ArchiveError::Corrupt)?)
            }
            EntryType::Symlink => Claim::Symlink(link.as_deref().expect("read above")),
            EntryType::Link => Claim::HardLink(link.as_deref().expect("read above")),
            EntryType::Char => Claim::Special("character device"),
            EntryType::Block => Claim::Special("block device"),
            EntryType::Fifo => Claim::Special("FIFO"),
            _ => Claim::Special("unsupported"),
        };
        let Some(admitted) = check.admit(&raw, claim, mode)? else {
            continue;
        };
        let io_err = |source| ArchiveError::Io {
            entry: name.clone(),
            source,
        };
        if let Some(dest) = dest {
            make_dirs(dest, &admitted, &name)?;
        }
        let target = dest.map(|d| d.join(&admitted.rel));
        match etype {
            EntryType::Directory => {
                if let Some(target) = target {
                    fs::create_dir(&target).map_err(io_err)?;
                    dir_modes.push((target, mode));
                }
                manifest.entries.push(ManifestEntry::dir(&admitted.rel, mode));
            }
            EntryType::Regular | EntryType::Continuous => {
                let mut hasher = Hasher::new();
                let written = match target {
                    Some(target) => {
                        let mut f = create_file(&target).map_err(io_err)?;
                        let n = copy_hashing(&mut entry, &mut f, &mut hasher).map_err(io_err)?;
                        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err)?;
                        n
                    }
                    None => copy_hashing(&mut entry, &mut io::sink(), &mut hasher).map_err(io_err)?,
                };
                manifest
                    .entries
                    .push(ManifestEntry::file(&admitted.rel, mode, written, hasher.finish()));
            }
            EntryType::Symlink => {
                let link = link.expect("a symlink has a target");
                if let Some(target) = target {
                    std::os::unix::fs::symlink(&link, &target).map_err(io_err)?;
                }
                manifest.entries.push(ManifestEntry::symlink(&admitted.rel, &link));
            }
            EntryType::Link => {
                let to = admitted.link_to.as_ref().expect("admitted hard links name their file");
                if let Some(target) = target {
                    fs::hard_link(dest.expect("with a target").join(to), &target).map_err(io_err)?;
                }
                manifest.entries.push(ManifestEntry::hardlink(&admitted.rel, to));
            }
            _ => unreachable!("special entries are refused by the checker"),
        }
    }
    let mut stats = check.stats;
    stats.manifest = manifest;
    Ok((stats, dir_modes))
}

/// A new file that was not there, never through a link, private until its
/// mode is set.
pub fn create_file(target: &Path) -> io::Result<fs::File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(target)
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

/// Copies `from` to `to`, hashing what passes; returns the byte count.
pub fn copy_hashing(from: &mut impl Read, to: &mut impl Write, hasher: &mut Hasher) -> io::Result<u64> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
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

/// Builds the tree `manifest` describes in `dest`, which must not exist
/// yet. Every entry passes the archive's rules first, as an archive's
/// entries do. For each file,
/// `fill` creates it at the path given (with `create_file`: new,
/// never through a link) holding the entry's content, and returns the
/// length and sha256 of what it wrote; a file whose bytes differ from the
/// manifest fails the build. On error the caller removes `dest`.
pub fn apply_manifest(
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
    let mut check = Checker::new(limits);
    let mut dir_modes = Vec::new();
    for e in &manifest.entries {
        let raw = e.path();
        let name = raw.display().to_string();
        let mode = e.mode & 0o7777;
        let link = Path::new(OsStr::from_bytes(&e.link));
        let claim = match e.kind {
            mkind::DIR => Claim::Dir,
            mkind::FILE => {
                if e.content().is_none() {
                    return Err(ArchiveError::Io {
                        entry: name,
                        source: io::Error::new(io::ErrorKind::InvalidData, "a file entry without a sha256"),
                    });
                }
                Claim::File(e.size)
            }
            mkind::SYMLINK if !e.link.is_empty() => Claim::Symlink(link),
            mkind::HARDLINK => Claim::HardLink(link),
            mkind::SYMLINK => return Err(ArchiveError::EmptyPath { entry: name }),
            _ => Claim::Special("unknown"),
        };
        let Some(admitted) = check.admit(raw, claim, mode)? else {
            continue;
        };
        make_dirs(dest, &admitted, &name)?;
        let target = dest.join(&admitted.rel);
        match e.kind {
            mkind::DIR => {
                fs::create_dir(&target).map_err(io_at(raw))?;
                dir_modes.push((target, mode));
            }
            mkind::FILE => {
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
            mkind::SYMLINK => std::os::unix::fs::symlink(link, &target).map_err(io_at(raw))?,
            mkind::HARDLINK => {
                let to = admitted.link_to.as_ref().expect("admitted hard links name their file");
                fs::hard_link(dest.join(to), &target).map_err(io_at(raw))?;
            }
            _ => unreachable!("other kinds are refused by the checker"),
        }
    }
    set_dir_modes(dir_modes)?;
    let mut stats = check.stats;
    stats.manifest = manifest.clone();
    Ok(stats)
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
