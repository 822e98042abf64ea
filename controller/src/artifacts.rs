//! Content-addressed artifact storage: `<data_dir>/artifacts/<sha256>`.
//! A blob is written under a temporary name while it is hashed and renamed
//! to its digest only once complete, so a stored name always matches.
//!
//! Beside each artifact, for delta staging: its manifest
//! (`artifacts/<sha256>.manifest`; compressed as hosts fetch it,
//! `artifacts/<manifest's sha256>.manifest.zst`) and every file content it holds,
//! zstd-compressed once and served as is to every host that lacks it
//! (`contents/<ab>/<sha256>.zst`, shared by all releases). Both are made
//! from the artifact when it is pushed, and again from the artifact alone
//! when a controller lacks them (one that did not take the push).

use std::path::{Path, PathBuf};

use convoy_common::digest::Hasher;
use convoy_common::{archive, fsutil, Digest};
use tokio::io::AsyncWriteExt;

pub struct Artifacts {
    dir: PathBuf,
    contents: PathBuf,
    /// One manifest made at a time (each is a pass over a whole artifact).
    making: tokio::sync::Mutex<()>,
}

/// A blob being received.
pub struct Incoming {
    tmp: PathBuf,
    file: tokio::fs::File,
    hasher: Hasher,
    size: u64,
}

impl Artifacts {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("artifacts");
        std::fs::create_dir_all(&dir)?;
        let contents = data_dir.join("contents");
        std::fs::create_dir_all(&contents)?;
        // Leftovers of interrupted uploads and checks.
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".upload") {
                let _ = std::fs::remove_file(e.path());
            } else if name.ends_with(".check") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(Self {
            dir,
            contents,
            making: tokio::sync::Mutex::new(()),
        })
    }

    /// Where a file content is kept, zstd-compressed.
    pub fn content_path(&self, d: &Digest) -> PathBuf {
        content_file(&self.contents, d)
    }

    fn manifest_path(&self, artifact: &Digest) -> PathBuf {
        self.dir.join(format!("{}.manifest", artifact.to_hex()))
    }

    /// The manifest of a stored artifact (its bytes and sha256), made now
    /// with its contents if this controller has none yet; `None` when the
    /// artifact is not here.
    pub async fn manifest(&self, artifact: &Digest) -> std::io::Result<Option<(Vec<u8>, Digest)>> {
        let path = self.manifest_path(artifact);
        let kept = || async {
            let bytes = tokio::fs::read(&path).await.ok()?;
            let d = Digest::of_bytes(&bytes);
            Some((bytes, d))
        };
        if let Some(m) = kept().await {
            return Ok(Some(m));
        }
        let source = self.path(artifact);
        if !source.exists() {
            return Ok(None);
        }
        // Made by another caller while this one waited?
        let _one = self.making.lock().await;
        if let Some(m) = kept().await {
            return Ok(Some(m));
        }
        let (scratch, contents) = (self.scratch(), self.contents.clone());
        let limits = archive::Limits::unbounded();
        let made =
            tokio::task::spawn_blocking(move || unpack_and_store(&source, &scratch, &limits, &contents, |_, s| s))
                .await
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::other)?;
        let d = self.keep_manifest(artifact, &made.manifest)?;
        tracing::info!(%artifact, manifest = %d, "manifest and contents made from the artifact");
        Ok(Some((made.manifest.encode(), d)))
    }

    /// Writes an artifact's manifest; returns its sha256.
    pub fn keep_manifest(&self, artifact: &Digest, m: &convoy_common::manifest::Manifest) -> std::io::Result<Digest> {
        let bytes = m.encode();
        self.write_new(&self.manifest_path(artifact), &bytes)?;
        Ok(Digest::of_bytes(&bytes))
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.to_hex())
    }

    /// A scratch directory name of its own (removed again at open).
    fn scratch(&self) -> PathBuf {
        self.dir.join(format!("{}.check", uuid::Uuid::new_v4()))
    }

    /// A manifest as hosts fetch it, zstd-compressed: made once, kept
    /// under the manifest's own sha256, served as is to every host.
    pub async fn manifest_packed(&self, manifest: &Digest, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        let path = self.dir.join(format!("{}.manifest.zst", manifest.to_hex()));
        if let Ok(packed) = tokio::fs::read(&path).await {
            return Ok(packed);
        }
        let packed = zstd::bulk::compress(bytes, 3)?;
        self.write_new(&path, &packed)?;
        Ok(packed)
    }

    /// Writes `data` at `path` through a temporary file of its own, so
    /// that hosts asking at once each write whole files and one of them
    /// (all alike) stays.
    fn write_new(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.dir.join(format!("{}.upload", uuid::Uuid::new_v4()));
        let r = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r?;
        fsutil::fsync_dir(&self.dir)
    }

    pub async fn begin(&self) -> std::io::Result<Incoming> {
        let tmp = self.dir.join(format!("{}.upload", uuid::Uuid::new_v4()));
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(Incoming {
            tmp,
            file,
            hasher: Hasher::new(),
            size: 0,
        })
    }

    /// Unpacks the upload into a scratch directory, exactly as a host
    /// will (every entry checked, the gzip stream read to its verified
    /// end), then removes the scratch tree. Returns what the archive holds
    /// and the unit files in its `systemd/` folder.
    pub async fn check(&self, inc: &mut Incoming, limits: archive::Limits) -> Result<Checked, archive::ArchiveError> {
        // tokio's File hands writes to a thread of its own: until flushed,
        // the last of them may not be in the file the unpacker opens.
        inc.file.flush().await.map_err(archive::ArchiveError::Corrupt)?;
        let (scratch, file, contents) = (self.scratch(), inc.tmp.clone(), self.contents.clone());
        tokio::task::spawn_blocking(move || {
            unpack_and_store(&file, &scratch, &limits, &contents, |tree, stats| Checked {
                units: unit_files(&tree.join("systemd")),
                config: declared_config(tree),
                stats,
            })
        })
        .await
        .unwrap_or_else(|e| Err(archive::ArchiveError::Corrupt(std::io::Error::other(e))))
    }

    /// Completes an upload: fsync, then rename to the digest.
    pub async fn commit(&self, inc: Incoming) -> std::io::Result<(Digest, u64)> {
        self.commit_as(inc, None).await
    }

    /// Completes an upload that must have sha256 `expect` (when given):
    /// anything else is removed before it is named, never stored.
    async fn commit_as(&self, mut inc: Incoming, expect: Option<&Digest>) -> std::io::Result<(Digest, u64)> {
        inc.file.flush().await?;
        inc.file.sync_all().await?;
        let digest = inc.hasher.finish();
        if let Some(expect) = expect.filter(|e| **e != digest) {
            let _ = tokio::fs::remove_file(&inc.tmp).await;
            return Err(std::io::Error::other(format!(
                "the artifact shared as sha256 {expect} has sha256 {digest}; not used"
            )));
        }
        tokio::fs::rename(&inc.tmp, self.path(&digest)).await?;
        fsutil::fsync_dir(&self.dir)?;
        Ok((digest, inc.size))
    }
}

impl Artifacts {
    /// Copies an artifact another controller shared (`Db::share_artifact`)
    /// into this one's store, checking its sha256 on the way; `false` when
    /// the database holds no such artifact.
    pub async fn fetch_shared(&self, db: &crate::db::Db, digest: &Digest) -> std::io::Result<bool> {
        let mut inc = self.begin().await?;
        let mut n = 0;
        loop {
            match db.artifact_chunk(digest, n).await {
                Ok(Some(chunk)) => inc.write(&chunk).await?,
                Ok(None) => break,
                Err(e) => {
                    inc.abort().await;
                    return Err(std::io::Error::other(e));
                }
            }
            n += 1;
        }
        if n == 0 {
            inc.abort().await;
            return Ok(false);
        }
        self.commit_as(inc, Some(digest)).await?;
        tracing::info!(%digest, "artifact copied from the shared store");
        Ok(true)
    }
}

impl Incoming {
    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.file.write_all(data).await
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub async fn abort(self) {
        let _ = tokio::fs::remove_file(&self.tmp).await;
    }
}

/// Unpacks `archive` into `scratch/tree` exactly as a host will, keeps
/// each file content `contents` lacks, and reads what `then` wants from
/// the tree before the scratch directory goes.
fn unpack_and_store<T>(
    archive: &Path,
    scratch: &Path,
    limits: &archive::Limits,
    contents: &Path,
    then: impl FnOnce(&Path, archive::UnpackStats) -> T,
) -> Result<T, archive::ArchiveError> {
    let tree = scratch.join("tree");
    let r = std::fs::create_dir(scratch)
        .and_then(|()| std::fs::File::open(archive))
        .map_err(archive::ArchiveError::Corrupt)
        .and_then(|f| archive::unpack(std::io::BufReader::with_capacity(1 << 20, f), &tree, limits))
        .and_then(|stats| {
            store_contents(contents, &tree, &stats.manifest).map_err(archive::ArchiveError::Corrupt)?;
            Ok(then(&tree, stats))
        });
    let _ = std::fs::remove_dir_all(scratch);
    r
}

/// Where the content `d` is kept under `root`.
fn content_file(root: &Path, d: &Digest) -> PathBuf {
    let hex = d.to_hex();
    root.join(&hex[..2]).join(format!("{hex}.zst"))
}

/// Compresses each file content of `tree` that `contents` lacks, once.
fn store_contents(contents: &Path, tree: &Path, m: &convoy_common::manifest::Manifest) -> std::io::Result<()> {
    let mut done = std::collections::HashSet::new();
    for e in &m.entries {
        let Some(d) = e.content() else { continue };
        let path = content_file(contents, &d);
        if !done.insert(d) || path.exists() {
            continue;
        }
        let dir = path.parent().expect("a content file is in a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("{}.{}.tmp", d.to_hex(), uuid::Uuid::new_v4()));
        let r = (|| {
            let mut from = std::fs::File::open(tree.join(e.path()))?;
            let mut z = zstd::stream::write::Encoder::new(std::fs::File::create(&tmp)?, 3)?;
            z.include_checksum(true)?;
            std::io::copy(&mut from, &mut z)?;
            z.finish()?;
            std::fs::rename(&tmp, &path)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r?;
    }
    // One syncfs makes them all durable before the release is recorded.
    fsutil::sync_filesystem(contents)
}

/// What a pushed archive holds, read while it is checked.
pub struct Checked {
    pub stats: archive::UnpackStats,
    pub units: Vec<String>,
    /// Its `convoy/config.toml` and templates, checked (`Ok(None)`: none).
    pub config: Result<Option<crate::appconfig::schema::Schema>, String>,
}

/// Reads and checks the configuration a release tree declares.
fn declared_config(tree: &std::path::Path) -> Result<Option<crate::appconfig::schema::Schema>, String> {
    use crate::appconfig::schema::{Schema, SCHEMA_FILE, TEMPLATE_DIR};
    let regular = |p: &std::path::Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20);
    let schema_file = tree.join(SCHEMA_FILE);
    if std::fs::symlink_metadata(&schema_file).is_err() {
        return Ok(None);
    }
    if !regular(&schema_file) {
        return Err(format!("{SCHEMA_FILE} must be a regular file of at most 1 MiB"));
    }
    let text = std::fs::read_to_string(&schema_file).map_err(|e| format!("{SCHEMA_FILE}: {e}"))?;
    let schema = Schema::parse(&text, |name| {
        let p = tree.join(TEMPLATE_DIR).join(name);
        regular(&p).then(|| std::fs::read_to_string(p).ok()).flatten()
    })?;
    crate::appconfig::render::check(&schema)?;
    Ok(Some(schema))
}

/// The unit file names in a release's `systemd/` folder (none without one).
fn unit_files(dir: &std::path::Path) -> Vec<String> {
    let mut units: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| convoy_common::spec::valid_unit_name(n))
        .collect();
    units.sort();
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload is checked right after its last write: the check must see
    /// every byte (tokio's File writes on a thread of its own).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_check_right_after_the_last_write_sees_the_whole_upload() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/app"), b"#!/bin/sh\n").unwrap();
        let mut archive = Vec::new();
        archive::pack_dir(&tree, &mut archive).unwrap();
        let store = Artifacts::open(&d.path().join("data")).unwrap();
        for _ in 0..200 {
            let mut inc = store.begin().await.unwrap();
            inc.write(&archive).await.unwrap();
            let checked = store.check(&mut inc, archive::Limits::default()).await;
            assert!(checked.is_ok(), "{:?}", checked.err().map(|e| e.to_string()));
            inc.abort().await;
        }
    }

    /// A controller copies an artifact another shared through PostgreSQL,
    /// checking its sha256: a tampered chunk is refused and nothing of it
    /// is kept under any name.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_artifact_shared_through_the_database_is_copied_only_when_its_digest_matches() {
        let pg = crate::db::testing::postgres();
        pg.create_database("shared").unwrap();
        let o = crate::db::testing::options(&pg.url("shared"));
        let db = crate::db::Db::connect(&o, "a").await.unwrap().0;
        let d = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..9u32 << 20).map(|i| (i % 251) as u8).collect();
        let file = d.path().join("a.tar.gz");
        std::fs::write(&file, &bytes).unwrap();
        let digest = Digest::of_bytes(&bytes);
        db.share_artifact(&digest, &file).await.unwrap();
        let files = |p: &Path| std::fs::read_dir(p).unwrap().count();

        let b = Artifacts::open(&d.path().join("b")).unwrap();
        assert!(b.fetch_shared(&db, &digest).await.unwrap(), "copied");
        assert_eq!(std::fs::read(b.path(&digest)).unwrap(), bytes);
        // Control: an artifact the database does not hold.
        let c = Artifacts::open(&d.path().join("c")).unwrap();
        let before = files(&d.path().join("c"));
        assert!(!c.fetch_shared(&db, &Digest::of_bytes(b"other")).await.unwrap());
        // One byte changed in the second chunk.
        pg.psql(
            "shared",
            "UPDATE artifact_chunks SET data = overlay(data placing '\\x00'::bytea from 7 for 1) WHERE n = 1",
        )
        .unwrap();
        let e = c.fetch_shared(&db, &digest).await.unwrap_err().to_string();
        assert!(e.contains(&format!("shared as sha256 {digest} has sha256")), "{e}");
        assert!(!c.path(&digest).exists());
        assert_eq!(files(&d.path().join("c")), before, "nothing kept: {e}");
    }
}
