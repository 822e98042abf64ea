//! Delta staging: building a release from its manifest out of contents
//! this host already holds, fetching only the rest.
//!
//! The index is the manifests of the releases this host keeps
//! (`meta/<version>.manifest`, written when each was staged): sha256 →
//! the files that held it. A reused file is copied into the new tree,
//! never hard-linked: a release's files are writable (by root, often by
//! the app), and through a shared inode a write to the live release would
//! change a kept one, the one a rollback goes back to. The copy is a
//! reflink (FICLONE) where the file system has them (btrfs, XFS): the
//! blocks are shared until either side writes, which the file system then
//! copies. Elsewhere it is a plain copy.
//!
//! Every file of the new tree is hashed as it is written (or, after a
//! reflink, read back) and must match the manifest: a kept release whose
//! file was changed in place is simply not used for that content, which
//! is then fetched. The one exception is a kept file provably untouched
//! since it was itself verified: each release's stamps
//! (`meta/<version>.stamps`) record every file's inode, size, mtime and
//! ctime as they were when its tree was verified, and a source whose
//! `fstat` still says exactly that is copied without hashing it again
//! (any write moves ctime, which no program can set back).
//!
//! Fetched contents land in `staging/<version>.contents/` under their
//! sha256, each checked before it is named, so a cut transfer or a
//! killed agent resumes with what is there.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use convoy_common::archive::{self, Limits};
use convoy_common::digest::Hasher;
use convoy_common::manifest::Manifest;
use convoy_common::spec::InstallSpec;
use convoy_common::{Digest, Version};
use convoy_proto::agent_service_client::AgentServiceClient;
use convoy_proto::{ContentsRequest, ManifestRequest};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::crash::crash_point;
use crate::fetch::{self, ATTEMPTS};
use crate::store::AppDirs;
use crate::switch;

/// Contents asked for in one request (the controller's bound).
const BATCH: usize = 10_000;
/// The largest compressed manifest accepted.
const MAX_MANIFEST: usize = 256 << 20;

/// Where a release's manifest is kept on this host.
pub fn manifest_path(dirs: &AppDirs, v: &Version) -> PathBuf {
    dirs.meta.join(format!("{v}.manifest"))
}

/// Where fetched contents for `v` wait until its tree is built.
pub fn contents_dir(dirs: &AppDirs, v: &Version) -> PathBuf {
    dirs.staging.join(format!("{v}.contents"))
}

/// Where a release's stamps are kept on this host.
pub fn stamps_path(dirs: &AppDirs, v: &Version) -> PathBuf {
    dirs.meta.join(format!("{v}.stamps"))
}

/// What `fstat` says of a file: enough to tell that it was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A stamp taken this close to its file's last change cannot show a
/// later write in the same clock tick: such a file is hashed when used
/// (git's "racily clean" entries, the same way).
const RACY_NS: i128 = 100_000_000;

/// The stamps of a verified tree's files: a first line with the time they
/// were taken, then one line per file entry:
/// `<path hex> <ino> <size> <mtime ns> <ctime ns>`.
pub fn stamps(tree: &Path, manifest: &Manifest) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(io::Error::other)?;
    writeln!(out, "taken {}", now.as_nanos())?;
    for e in manifest.entries.iter().filter(|e| e.content().is_some()) {
        let s = Stamp::of(&fs::symlink_metadata(tree.join(e.path()))?);
        writeln!(
            out,
            "{} {} {} {} {}",
            hex::encode(&e.path),
            s.ino,
            s.size,
            s.mtime_ns,
            s.ctime_ns
        )?;
    }
    Ok(out)
}

/// The stamps that can vouch for their files: those taken well after the
/// file's last change.
fn read_stamps(path: &Path) -> HashMap<PathBuf, Stamp> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines();
    let Some(taken) = lines
        .next()
        .and_then(|l| l.strip_prefix("taken "))
        .and_then(|t| t.parse::<i128>().ok())
    else {
        return HashMap::new();
    };
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let [p, ino, size, m, c] = f[..] else { return None };
            let path = PathBuf::from(std::ffi::OsString::from_vec(hex::decode(p).ok()?));
            let stamp = Stamp {
                ino: ino.parse().ok()?,
                size: size.parse().ok()?,
                mtime_ns: m.parse().ok()?,
                ctime_ns: c.parse().ok()?,
            };
            (stamp.ctime_ns + RACY_NS < taken).then_some((path, stamp))
        })
        .collect()
}

/// A file that held a content when its release was verified.
pub struct Source {
    path: PathBuf,
    stamp: Option<Stamp>,
}

/// The contents this host holds in its kept releases.
#[derive(Default)]
pub struct Index {
    by_sha: HashMap<Digest, Vec<Source>>,
}

impl Index {
    /// Reads the manifest of every release this host keeps.
    pub fn of(spec: &InstallSpec, dirs: &AppDirs) -> Index {
        let mut index = Index::default();
        for e in fs::read_dir(&dirs.meta).into_iter().flatten().flatten() {
            let name = e.file_name();
            let Some(v) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".manifest"))
                .and_then(|n| Version::new(n).ok())
            else {
                continue;
            };
            let tree = switch::tree_of(spec, dirs, &v);
            let stamps = read_stamps(&stamps_path(dirs, &v));
            let Ok(bytes) = fs::read(e.path()) else { continue };
            let Ok(m) = Manifest::decode(&bytes, u64::MAX) else {
                continue;
            };
            if !tree.is_dir() {
                continue;
            }
            for entry in &m.entries {
                // Only paths inside the tree; what they hold is checked
                // when it is used.
                let rel = entry.path();
                let inside = rel
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
                if let (Some(d), true) = (entry.content(), inside) {
                    index.by_sha.entry(d).or_default().push(Source {
                        path: tree.join(rel),
                        stamp: stamps.get(rel).copied(),
                    });
                }
            }
        }
        index
    }

    pub fn is_empty(&self) -> bool {
        self.by_sha.is_empty()
    }

    fn holds(&self, d: &Digest) -> bool {
        self.by_sha.contains_key(d)
    }

    fn sources(&self, d: &Digest) -> &[Source] {
        self.by_sha.get(d).map_or(&[], Vec::as_slice)
    }
}

/// What a delta stage needs: the manifest, and which contents to fetch.
pub struct Plan {
    pub manifest: Manifest,
    pub missing: Vec<(Digest, u64)>,
    pub reused: (usize, u64),
}

impl Plan {
    pub fn new(manifest: Manifest, index: &Index) -> Plan {
        let (mut missing, mut reused) = (Vec::new(), (0, 0));
        for (d, size) in manifest.contents() {
            if index.holds(&d) {
                reused.0 += 1;
                reused.1 += size;
            } else {
                missing.push((d, size));
            }
        }
        Plan {
            manifest,
            missing,
            reused,
        }
    }

    pub fn missing_bytes(&self) -> u64 {
        self.missing.iter().map(|(_, s)| s).sum()
    }
}

/// Fetches the manifest of `artifact` and checks it is `expected`.
/// Returns it and the bytes that travelled.
pub async fn fetch_manifest(
    channel: Channel,
    artifact: Digest,
    expected: Digest,
    max_entries: u64,
) -> Result<(Manifest, u64), String> {
    let mut client = AgentServiceClient::new(channel);
    let mut backoff = fetch::retry_backoff();
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let got: Result<Vec<u8>, String> = async {
            let mut stream = client
                .fetch_manifest(ManifestRequest {
                    artifact: artifact.to_hex(),
                })
                .await
                .map_err(|s| fetch::status_text(&s))?
                .into_inner();
            let (mut data, mut total) = (Vec::new(), None);
            loop {
                let Some(chunk) = fetch::next_within(&mut stream).await? else {
                    break;
                };
                if chunk.total_size as usize > MAX_MANIFEST
                    || chunk.offset != data.len() as u64
                    || total.is_some_and(|t| t != chunk.total_size)
                {
                    return Err(format!(
                        "manifest chunk at {} of {} bytes is out of order or over {MAX_MANIFEST} bytes",
                        chunk.offset, chunk.total_size
                    ));
                }
                total = Some(chunk.total_size);
                data.extend_from_slice(&chunk.data);
            }
            // A stream cut short can end without an error: only a whole
            // manifest is judged.
            match total {
                Some(t) if t == data.len() as u64 => Ok(data),
                _ => Err(format!(
                    "manifest stream ended at {} of {} bytes",
                    data.len(),
                    total.map_or("?".into(), |t| t.to_string())
                )),
            }
        }
        .await;
        match got {
            Ok(compressed) => {
                let n = compressed.len() as u64;
                let bound = max_entries.saturating_mul(4096).min(1 << 30);
                let mut bytes = Vec::new();
                zstd::stream::read::Decoder::new(&compressed[..])
                    .and_then(|d| d.take(bound + 1).read_to_end(&mut bytes))
                    .map_err(|e| format!("manifest is corrupt: {e}"))?;
                if bytes.len() as u64 > bound {
                    return Err(format!("manifest expands past {bound} bytes"));
                }
                let actual = Digest::of_bytes(&bytes);
                if actual != expected {
                    return Err(format!(
                        "manifest refused: its sha256 is {actual}, the release's is {expected}"
                    ));
                }
                let m = Manifest::decode(&bytes, max_entries).map_err(|e| e.to_string())?;
                return Ok((m, n));
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, "manifest fetch interrupted; will retry");
                last = e;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    Err(format!(
        "fetch of the manifest failed after {ATTEMPTS} attempts; last error: {last}"
    ))
}

/// One content being written: decompressed, hashed, bounded by its size.
struct Landing {
    dir: PathBuf,
    current: Option<(usize, zstd::stream::write::Decoder<'static, Bounded>)>,
    wanted: Vec<(Digest, u64)>,
    landed: usize,
}

/// A file that takes at most `left` bytes, hashing them.
struct Bounded {
    file: fs::File,
    hasher: Hasher,
    left: u64,
    written: u64,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "content is longer than the manifest says",
            ));
        }
        self.file.write_all(buf)?;
        self.hasher.update(buf);
        self.left -= buf.len() as u64;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a content transfer stopped: worth another try, or not.
enum Stop {
    Retry(String),
    Refused(String),
}

impl Landing {
    fn piece(&mut self, index: usize, data: &[u8], end: bool) -> Result<(), Stop> {
        let (digest, size) = *self
            .wanted
            .get(index)
            .ok_or_else(|| Stop::Refused(format!("content #{index} was not asked for")))?;
        let tmp = self.dir.join(format!("{}.tmp", digest.to_hex()));
        if self.current.as_ref().is_none_or(|(i, _)| *i != index) {
            let file = fs::File::create(&tmp).map_err(|e| Stop::Refused(format!("{}: {e}", tmp.display())))?;
            let sink = Bounded {
                file,
                hasher: Hasher::new(),
                left: size,
                written: 0,
            };
            let dec = zstd::stream::write::Decoder::new(sink).map_err(|e| Stop::Refused(e.to_string()))?;
            self.current = Some((index, dec));
        }
        let (_, dec) = self.current.as_mut().expect("set above");
        dec.write_all(data)
            .map_err(|e| Stop::Refused(format!("content sha256 {digest}: {e}")))?;
        if end {
            let (_, mut dec) = self.current.take().expect("set above");
            dec.flush()
                .map_err(|e| Stop::Refused(format!("content sha256 {digest}: {e}")))?;
            let sink = dec.into_inner();
            let actual = sink.hasher.finish();
            if actual != digest || sink.written != size {
                let _ = fs::remove_file(&tmp);
                return Err(Stop::Refused(format!(
                    "content refused: the controller sent {} bytes with sha256 {actual} for sha256 {digest} ({size} bytes)",
                    sink.written
                )));
            }
            fs::rename(&tmp, self.dir.join(digest.to_hex()))
                .map_err(|e| Stop::Refused(format!("{}: {e}", tmp.display())))?;
            self.landed += 1;
            crash_point("delta-content-landed");
        }
        Ok(())
    }
}

/// What a content fetch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fetched {
    /// Bytes that travelled (compressed).
    pub wire: u64,
    /// Contents already here from an interrupted try, and their size.
    pub already: (usize, u64),
}

/// Why contents could not be fetched.
#[derive(Debug)]
pub enum ContentsError {
    /// The transfer kept breaking: what landed is kept for the next try.
    GaveUp(String),
    /// Refused content, or this host could not write it (a full disk):
    /// another try would not help.
    Refused(String),
}

impl std::fmt::Display for ContentsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentsError::GaveUp(e) | ContentsError::Refused(e) => f.write_str(e),
        }
    }
}

/// Fetches `wanted` contents of `artifact` into `dir`, skipping those
/// already there; a cut transfer is asked again for what is still
/// missing.
pub async fn fetch_contents(
    channel: Channel,
    artifact: Digest,
    wanted: &[(Digest, u64)],
    dir: &Path,
) -> Result<Fetched, ContentsError> {
    fs::create_dir_all(dir).map_err(|e| ContentsError::Refused(format!("{}: {e}", dir.display())))?;
    let present = |d: &Digest| dir.join(d.to_hex()).exists();
    let here: Vec<u64> = wanted.iter().filter(|(d, _)| present(d)).map(|(_, s)| *s).collect();
    let already = (here.len(), here.iter().sum());
    let mut client = AgentServiceClient::new(channel);
    let mut backoff = fetch::retry_backoff();
    let mut fetched = 0u64;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let missing: Vec<(Digest, u64)> = wanted.iter().filter(|(d, _)| !present(d)).copied().collect();
        if missing.is_empty() {
            return Ok(Fetched { wire: fetched, already });
        }
        let mut result = Ok(());
        for batch in missing.chunks(BATCH) {
            result = fetch_batch(&mut client, artifact, batch, dir, &mut fetched).await;
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {}
            Err(Stop::Refused(e)) => return Err(ContentsError::Refused(e)),
            Err(Stop::Retry(e)) => {
                tracing::warn!(attempt, error = %e, "content fetch interrupted; will resume");
                last = e;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    if wanted.iter().all(|(d, _)| present(d)) {
        return Ok(Fetched { wire: fetched, already });
    }
    Err(ContentsError::GaveUp(format!(
        "fetch of contents failed after {ATTEMPTS} attempts; last error: {last}"
    )))
}

async fn fetch_batch(
    client: &mut AgentServiceClient<Channel>,
    artifact: Digest,
    batch: &[(Digest, u64)],
    dir: &Path,
    fetched: &mut u64,
) -> Result<(), Stop> {
    let mut stream = client
        .fetch_contents(ContentsRequest {
            artifact: artifact.to_hex(),
            sha256: batch.iter().map(|(d, _)| d.as_bytes().to_vec()).collect(),
        })
        .await
        .map_err(|s| Stop::Retry(fetch::status_text(&s)))?
        .into_inner();
    // Pieces go to a thread of their own that decompresses, hashes and
    // writes them while the next ones arrive.
    let (tx, mut rx) = mpsc::channel::<(usize, Bytes, bool)>(16);
    let mut landing = Landing {
        dir: dir.to_owned(),
        current: None,
        wanted: batch.to_vec(),
        landed: 0,
    };
    let writer = tokio::task::spawn_blocking(move || -> Result<usize, Stop> {
        while let Some((i, data, end)) = rx.blocking_recv() {
            landing.piece(i, &data, end)?;
        }
        Ok(landing.landed)
    });
    let received: Result<(), Stop> = async {
        loop {
            let Some(piece) = fetch::next_within(&mut stream).await.map_err(Stop::Retry)? else {
                return Ok(());
            };
            *fetched += piece.data.len() as u64;
            if tx.send((piece.index as usize, piece.data, piece.end)).await.is_err() {
                return Ok(()); // the writer stopped; its error says why
            }
        }
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| Stop::Refused(format!("content writer: {e}")))?;
    received?;
    match written? {
        n if n == batch.len() => Ok(()),
        n => Err(Stop::Retry(format!(
            "stream ended after {n} of {} contents",
            batch.len()
        ))),
    }
}

/// How to copy files into a new tree. Reflinks are tried until the file
/// system refuses one (then never again in this build: a refused reflink
/// costs a file made and removed).
pub struct Copier {
    reflinks: std::cell::Cell<bool>,
}

impl Default for Copier {
    fn default() -> Self {
        Copier {
            reflinks: std::cell::Cell::new(true),
        }
    }
}

impl Copier {
    /// Copies `src` to a new file at `dst` (a reflink where the file
    /// system can), returning what `dst` holds: its length and sha256.
    /// `None` when `src` is not a regular file of `size` bytes (the caller
    /// tries another source). When `src` still has the `stamp` it had when
    /// it was verified to hold `content`, it is copied without hashing.
    pub fn copy(
        &self,
        src: &Path,
        dst: &Path,
        size: u64,
        verified: Option<(Stamp, Digest)>,
    ) -> io::Result<Option<(u64, Digest)>> {
        let mut from = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(src)
        {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
        let meta = from.metadata()?;
        if !meta.is_file() || meta.len() != size {
            return Ok(None);
        }
        let untouched = verified.filter(|(stamp, _)| *stamp == Stamp::of(&meta)).map(|(_, d)| d);
        // A reflink makes `dst` itself (new, never through a link) or nothing.
        let reflinked = self.reflinks.get() && {
            let done = reflink_copy::reflink_file_to_path(&from, dst).is_ok();
            self.reflinks.set(done);
            done
        };
        if let Some(content) = untouched {
            if !reflinked {
                // copy_file_range: the kernel copies, nothing passes through here.
                io::copy(&mut from, &mut archive::create_file(dst)?)?;
            }
            return Ok(Some((size, content)));
        }
        let mut hasher = Hasher::new();
        let n = if reflinked {
            hasher.update_from(fs::File::open(dst)?)?
        } else {
            let mut to = archive::create_file(dst)?;
            archive::copy_hashing(&mut from, &mut to, &mut hasher)?
        };
        Ok(Some((n, hasher.finish())))
    }
}

/// Builds the tree of `plan` in `dest`: every file from the fetched
/// contents in `fetched` or from the index, verified; a content no source
/// holds any more (a kept file changed since) is fetched with `refetch`.
pub fn build(
    plan: &Plan,
    dest: &Path,
    limits: &Limits,
    index: &Index,
    fetched: &Path,
    mut refetch: impl FnMut(Digest, u64) -> Result<(), String>,
) -> Result<convoy_common::archive::UnpackStats, String> {
    let fetched_set: HashSet<Digest> = plan.missing.iter().map(|(d, _)| *d).collect();
    let copier = Copier::default();
    convoy_common::archive::apply_manifest(&plan.manifest, dest, limits, |e, at| {
        let d = e.content().expect("files have a sha256");
        let here = fetched.join(d.to_hex());
        if fetched_set.contains(&d) {
            // Checked against its sha256 as it landed; checked again here.
            if let Some(got) = copier.copy(&here, at, e.size, None)? {
                return Ok(got);
            }
        }
        for src in index.sources(&d) {
            match copier.copy(&src.path, at, e.size, src.stamp.map(|s| (s, d)))? {
                Some((n, got)) if n == e.size && got == d => return Ok((n, got)),
                Some(_) => fs::remove_file(at)?,
                None => {}
            }
        }
        // Changed in place since it was indexed: fetch it after all.
        refetch(d, e.size).map_err(io::Error::other)?;
        copier
            .copy(&here, at, e.size, None)?
            .ok_or_else(|| io::Error::other("a fetched content vanished"))
    })
    .map_err(|e| format!("the release does not build from its manifest: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A kept release whose file changed in place since it was indexed:
    /// that copy is not used, the content is fetched; the other file is
    /// copied, never linked.
    #[test]
    fn a_kept_file_changed_in_place_is_fetched_not_reused() {
        let d = tempfile::tempdir().unwrap();
        let (old, fetched) = (d.path().join("old"), d.path().join("fetched"));
        fs::create_dir_all(&old).unwrap();
        fs::create_dir_all(&fetched).unwrap();
        fs::write(old.join("same"), b"unchanged").unwrap();
        fs::write(old.join("edited"), b"original").unwrap();
        let mut src = Vec::new();
        let tree = d.path().join("src");
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join("same"), b"unchanged").unwrap();
        fs::write(tree.join("edited"), b"original").unwrap();
        archive::pack_dir(&tree, &mut src).unwrap();
        let manifest = archive::manifest_of(&src[..], &Limits::default()).unwrap().manifest;
        // Stamped now: each file was written moments ago, so no stamp may
        // vouch for it (a write in the same clock tick would not show).
        let stamps_file = d.path().join("stamps");
        fs::write(&stamps_file, stamps(&old, &manifest).unwrap()).unwrap();
        let vouched = read_stamps(&stamps_file);
        assert!(vouched.is_empty(), "racy stamps vouch for nothing: {vouched:?}");
        let mut index = Index::default();
        for e in &manifest.entries {
            if let Some(c) = e.content() {
                let path = old.join(e.path());
                let stamp = vouched.get(e.path()).copied();
                index.by_sha.entry(c).or_default().push(Source { path, stamp });
            }
        }
        // Written to after it was indexed, keeping its size.
        fs::write(old.join("edited"), b"tampered").unwrap();
        let plan = Plan::new(manifest, &index);
        assert!(plan.missing.is_empty(), "everything looked held");
        let mut asked = Vec::new();
        let dest = d.path().join("new");
        build(&plan, &dest, &Limits::default(), &index, &fetched, |sha, _| {
            asked.push(sha);
            fs::write(fetched.join(sha.to_hex()), b"original").map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(asked, vec![Digest::of_bytes(b"original")]);
        assert_eq!(fs::read(dest.join("edited")).unwrap(), b"original");
        assert_eq!(fs::read(dest.join("same")).unwrap(), b"unchanged");
        let (a, b) = (
            fs::metadata(old.join("same")).unwrap(),
            fs::metadata(dest.join("same")).unwrap(),
        );
        assert_ne!(a.ino(), b.ino(), "a copy, not a link");
        assert_eq!(b.nlink(), 1);
    }

    /// A stamp taken well after its file's last change vouches for it
    /// while `fstat` agrees; any write since makes it vouch for nothing.
    #[test]
    fn a_stamp_vouches_only_for_an_unwritten_file() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join("f"), b"content").unwrap();
        let sha = Digest::of_bytes(b"content");
        let manifest = Manifest {
            format: convoy_common::manifest::FORMAT,
            entries: vec![convoy_common::manifest::ManifestEntry::file(
                Path::new("f"),
                0o644,
                7,
                sha,
            )],
        };
        // As if taken a second later than it was.
        let text = String::from_utf8(stamps(&tree, &manifest).unwrap()).unwrap();
        let (first, rest) = text.split_once('\n').unwrap();
        let taken: i128 = first.strip_prefix("taken ").unwrap().parse().unwrap();
        let file = d.path().join("stamps");
        fs::write(&file, format!("taken {}\n{rest}", taken + 1_000_000_000)).unwrap();
        let stamp = read_stamps(&file)[Path::new("f")];
        let copier = Copier::default();
        let got = copier
            .copy(&tree.join("f"), &d.path().join("a"), 7, Some((stamp, sha)))
            .unwrap();
        assert_eq!(got, Some((7, sha)));
        assert_eq!(fs::read(d.path().join("a")).unwrap(), b"content");
        // Written since (same size), once the file system's clock has
        // moved past the stamp: its ctime moved, so it is hashed.
        let probe = d.path().join("probe");
        while fs::write(&probe, b"").is_ok() && Stamp::of(&fs::metadata(&probe).unwrap()).ctime_ns <= stamp.ctime_ns {
            std::thread::yield_now();
        }
        fs::write(tree.join("f"), b"CONTENT").unwrap();
        let got = copier
            .copy(&tree.join("f"), &d.path().join("b"), 7, Some((stamp, sha)))
            .unwrap();
        assert_eq!(got, Some((7, Digest::of_bytes(b"CONTENT"))));
    }
}
