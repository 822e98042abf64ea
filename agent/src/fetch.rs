//! Pulls an artifact from the controller into a staging file, resuming at
//! the bytes already on disk, and verifies its sha256 before anything else
//! may look at it.
//!
//! Chunks go from the gRPC stream to a thread of their own that writes and
//! hashes them, so receiving (TLS, HTTP/2) and writing overlap, and the
//! digest is ready when the last byte is on disk: no second pass over the
//! file.

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use convoy_common::digest::Hasher;
use convoy_common::Digest;
use convoy_proto::agent_service_client::AgentServiceClient;
use convoy_proto::FetchRequest;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tonic::transport::Channel;

/// Longest wait for the next chunk before the transfer counts as stalled.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries of one download before it gives up (each resumes the last).
pub const ATTEMPTS: u32 = 5;
/// Chunks received but not yet written (each up to `CHUNK_SIZE`): enough to
/// keep the writer busy while the network catches up, small enough to
/// stay a few MiB.
const QUEUE: usize = 8;
/// How much the writer hashes before writing it: small enough that the
/// write copies it from the CPU cache the hash just filled.
const PIECE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("fetch of {digest:?} failed after {attempts} attempts; last error: {last}")]
    GaveUp {
        digest: Digest,
        attempts: u32,
        last: String,
    },
    #[error("digest mismatch: expected {expected}, got {actual}; the download was discarded")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("staging file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The staging file and the sha256 of exactly the bytes in it.
struct Staged {
    file: std::fs::File,
    len: u64,
    hasher: Hasher,
}

impl Staged {
    /// Opens `part`, keeping what is there as the start of the download
    /// (hashing it once) unless it is longer than the artifact.
    fn open(part: &Path, size: u64) -> io::Result<Staged> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(part)?;
        let mut len = file.metadata()?.len();
        if len > size {
            // Not a prefix of this artifact: start over.
            file.set_len(0)?;
            len = 0;
        }
        let mut hasher = Hasher::new();
        hasher.update_from((&file).take(len))?;
        Ok(Staged { file, len, hasher })
    }

    /// Writes and hashes chunks until the sender is dropped; gives itself
    /// back for the next attempt, or the write error that ends the fetch.
    fn drain(mut self, mut chunks: mpsc::Receiver<Bytes>) -> io::Result<Staged> {
        while let Some(data) = chunks.blocking_recv() {
            // Hash a piece, then write it while it is still in the cache.
            for piece in data.chunks(PIECE) {
                self.hasher.update(piece);
                self.file.write_all(piece)?;
            }
            self.len += data.len() as u64;
        }
        Ok(self)
    }
}

fn joined<T>(r: Result<io::Result<T>, tokio::task::JoinError>) -> io::Result<T> {
    r.map_err(|e| io::Error::other(format!("staging writer: {e}")))?
}

/// How far a download is, for a reader following its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// The file may still be cut back (a kept prefix longer than the
    /// artifact starts over): not to be read yet.
    Opening,
    Writing,
    Complete,
    Failed,
}

/// Shared between a download and the reader that follows its file.
pub struct Follow {
    state: std::sync::Mutex<Progress>,
    moved: std::sync::Condvar,
}

impl Default for Follow {
    fn default() -> Self {
        Follow {
            state: std::sync::Mutex::new(Progress::Opening),
            moved: std::sync::Condvar::new(),
        }
    }
}

impl Follow {
    fn set(&self, p: Progress) {
        let mut s = self.state.lock().unwrap();
        // Complete and Failed are final.
        if !matches!(*s, Progress::Complete | Progress::Failed) {
            *s = p;
        }
        self.moved.notify_all();
    }

    /// Bytes arrived (or the download started writing).
    pub fn writing(&self) {
        self.set(Progress::Writing)
    }

    /// The whole artifact is in the file and its digest matched.
    pub fn complete(&self) {
        self.set(Progress::Complete)
    }

    /// The download stopped short: the reader gets an error.
    pub fn failed(&self) {
        self.set(Progress::Failed)
    }

    fn now(&self) -> Progress {
        *self.state.lock().unwrap()
    }

    /// Waits for the download to move on (more bytes, its end). Bytes are
    /// announced as they arrive, a moment before they are on disk: the
    /// timeout bounds the wait for those.
    fn wait(&self) {
        let s = self.state.lock().unwrap();
        let _ = self.moved.wait_timeout(s, Duration::from_millis(20)).unwrap();
    }

    /// A reader of `part` that waits at its end for the download to add
    /// more, and ends (or fails) with it: the unpacker reads the artifact
    /// while it arrives.
    pub fn reader(self: std::sync::Arc<Self>, part: std::path::PathBuf) -> Following {
        Following {
            follow: self,
            part,
            file: None,
        }
    }
}

/// Ends a follow as failed when dropped before it was completed (the
/// download given up on, the stage cut short), so no reader waits on.
pub struct EndsFollow(pub std::sync::Arc<Follow>);

impl Drop for EndsFollow {
    fn drop(&mut self) {
        self.0.failed();
    }
}

pub struct Following {
    follow: std::sync::Arc<Follow>,
    part: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl Read for Following {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let file = match &mut self.file {
                Some(f) => f,
                None => match self.follow.now() {
                    Progress::Opening => {
                        self.follow.wait();
                        continue;
                    }
                    Progress::Failed => return Err(io::Error::other("the download stopped before the end")),
                    _ => self.file.insert(std::fs::File::open(&self.part)?),
                },
            };
            // The state is read before the file: once it says complete,
            // every byte is in the file and a read of 0 is the end.
            let state = self.follow.now();
            let n = file.read(buf)?;
            match (n, state) {
                (0, Progress::Complete) => return Ok(0),
                (0, Progress::Failed) => return Err(io::Error::other("the download stopped before the end")),
                (0, _) => self.follow.wait(),
                (n, _) => return Ok(n),
            }
        }
    }
}

/// The next message of a download, or why there is none: the stream
/// failed, or stalled for `IDLE_TIMEOUT`.
pub async fn next_within<T>(stream: &mut tonic::Streaming<T>) -> Result<Option<T>, String> {
    timeout(IDLE_TIMEOUT, stream.message())
        .await
        .map_err(|_| format!("no data for {IDLE_TIMEOUT:?}"))?
        .map_err(|s| status_text(&s))
}

/// A failed call, as a retry's log and a give-up's reason say it.
pub fn status_text(s: &tonic::Status) -> String {
    format!("{}: {}", s.code(), s.message())
}

/// The pause between tries of a download.
pub fn retry_backoff() -> convoy_common::backoff::Backoff {
    convoy_common::backoff::Backoff::new(Duration::from_millis(400), Duration::from_secs(10))
}

/// Downloads `digest` into `part` (appending to what is there) and verifies
/// it. Returns the number of bytes fetched in this call.
pub async fn fetch(
    channel: Channel,
    digest: Digest,
    size: u64,
    part: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, FetchError> {
    let io_err = |source| FetchError::Io {
        path: part.display().to_string(),
        source,
    };
    let mut client = AgentServiceClient::new(channel);
    let mut fetched = 0u64;
    let owned = part.to_owned();
    let mut staged = joined(tokio::task::spawn_blocking(move || Staged::open(&owned, size)).await).map_err(io_err)?;
    let mut backoff = retry_backoff();
    for attempt in 1..=ATTEMPTS {
        if staged.len == size {
            break;
        }
        let mut offset = staged.len;
        let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
        let writer = tokio::task::spawn_blocking(move || staged.drain(rx));
        // Err(msg): the transfer broke (or the writer stopped, which its
        // own error explains); try again from where the file ends.
        let result: Result<(), String> = async {
            let mut stream = client
                .fetch_artifact(FetchRequest {
                    digest: digest.to_hex(),
                    offset,
                })
                .await
                .map_err(|s| status_text(&s))?
                .into_inner();
            loop {
                let Some(chunk) = next_within(&mut stream).await? else {
                    break;
                };
                if chunk.total_size != size {
                    return Err(format!("size changed: {} != {size}", chunk.total_size));
                }
                if chunk.offset != offset {
                    return Err(format!("chunk at offset {} where {offset} was expected", chunk.offset));
                }
                if chunk.data.len() as u64 > size - offset {
                    return Err(format!(
                        "chunk of {} bytes at offset {offset} runs past the end ({size} bytes)",
                        chunk.data.len()
                    ));
                }
                let n = chunk.data.len() as u64;
                tx.send(chunk.data)
                    .await
                    .map_err(|_| "the staging writer stopped".to_owned())?;
                offset += n;
                fetched += n;
                progress(offset, size);
            }
            if offset != size {
                return Err(format!("stream ended at {offset} of {size} bytes"));
            }
            Ok(())
        }
        .await;
        drop(tx);
        // A write error ends the fetch: retrying cannot help.
        staged = joined(writer.await).map_err(io_err)?;
        match result {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(attempt, error = %e, "artifact fetch interrupted; will resume");
                if attempt == ATTEMPTS {
                    return Err(FetchError::GaveUp {
                        digest,
                        attempts: ATTEMPTS,
                        last: e,
                    });
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }

    let actual = staged.hasher.finish();
    if actual != digest {
        drop(staged.file);
        let _ = tokio::fs::remove_file(part).await;
        return Err(FetchError::DigestMismatch {
            expected: digest,
            actual,
        });
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(staged: Staged, parts: &[&[u8]]) -> Staged {
        let (tx, rx) = mpsc::channel(parts.len().max(1));
        for p in parts {
            tx.try_send(Bytes::copy_from_slice(p)).unwrap();
        }
        drop(tx);
        staged.drain(rx).unwrap()
    }

    #[test]
    fn a_kept_prefix_is_hashed_with_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("a.part");
        let whole: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&part, &whole[..100_000]).unwrap();

        let staged = Staged::open(&part, whole.len() as u64).unwrap();
        assert_eq!(staged.len, 100_000);
        let staged = drained(staged, &[&whole[100_000..250_000], &whole[250_000..]]);
        assert_eq!(staged.len, whole.len() as u64);
        assert_eq!(staged.hasher.finish(), Digest::of_bytes(&whole));
        assert_eq!(std::fs::read(&part).unwrap(), whole);
    }

    #[test]
    fn a_follower_reads_what_arrives_and_ends_with_the_download() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("c.part");
        let whole: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let follow = Arc::new(Follow::default());
        let mut reader = follow.clone().reader(part.clone());
        let writer = {
            let (follow, part, whole) = (follow.clone(), part.clone(), whole.clone());
            std::thread::spawn(move || {
                let mut f = std::fs::File::create(&part).unwrap();
                for chunk in whole.chunks(7_000) {
                    f.write_all(chunk).unwrap();
                    follow.writing();
                }
                follow.complete();
            })
        };
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got, whole, "every byte, in order, and the end only at the end");

        // A download that stops short is an error for the reader, also
        // when it stops before writing anything.
        let follow = Arc::new(Follow::default());
        let mut reader = follow.clone().reader(dir.path().join("d.part"));
        drop(EndsFollow(follow));
        assert!(reader.read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn a_file_longer_than_the_artifact_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("b.part");
        std::fs::write(&part, vec![1u8; 5000]).unwrap();
        let staged = Staged::open(&part, 10).unwrap();
        assert_eq!(staged.len, 0);
        let staged = drained(staged, &[b"0123456789"]);
        assert_eq!(staged.hasher.finish(), Digest::of_bytes(b"0123456789"));
        assert_eq!(std::fs::read(&part).unwrap(), b"0123456789");
    }
}
