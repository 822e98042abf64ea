//! Pulls an artifact from the controller into a staging file, resuming at
//! the bytes already on disk, and verifies its sha256 before anything else
//! may look at it.

use std::path::Path;
use std::time::Duration;

use convoy_common::digest::Hasher;
use convoy_common::Digest;
use convoy_proto::agent_service_client::AgentServiceClient;
use convoy_proto::FetchRequest;
use tokio::fs::OpenOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tonic::transport::Channel;

/// Longest wait for the next chunk before the transfer counts as stalled.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const ATTEMPTS: u32 = 5;

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
    for attempt in 1..=ATTEMPTS {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .await
            .map_err(io_err)?;
        let mut offset = file.metadata().await.map_err(io_err)?.len();
        if offset > size {
            // Not a prefix of this artifact: start over.
            file.set_len(0).await.map_err(io_err)?;
            offset = 0;
        }
        if offset == size {
            break;
        }
        // Err(Ok(msg)): the transfer broke, try again from the offset.
        // Err(Err(io)): the disk failed; retrying cannot help.
        let result: Result<(), Result<String, std::io::Error>> = async {
            let mut stream = client
                .fetch_artifact(FetchRequest {
                    digest: digest.to_hex(),
                    offset,
                })
                .await
                .map_err(|s| Ok(format!("{}: {}", s.code(), s.message())))?
                .into_inner();
            loop {
                let next = timeout(IDLE_TIMEOUT, stream.message())
                    .await
                    .map_err(|_| Ok(format!("no data for {IDLE_TIMEOUT:?}")))?
                    .map_err(|s| Ok(format!("{}: {}", s.code(), s.message())))?;
                let Some(chunk) = next else { break };
                if chunk.total_size != size {
                    return Err(Ok(format!("size changed: {} != {size}", chunk.total_size)));
                }
                if chunk.offset != offset {
                    return Err(Ok(format!(
                        "chunk at offset {} where {offset} was expected",
                        chunk.offset
                    )));
                }
                file.write_all(&chunk.data).await.map_err(Err)?;
                offset += chunk.data.len() as u64;
                fetched += chunk.data.len() as u64;
                progress(offset, size);
            }
            file.flush().await.map_err(Err)?;
            if offset != size {
                return Err(Ok(format!("stream ended at {offset} of {size} bytes")));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => break,
            Err(Err(e)) => return Err(io_err(e)),
            Err(Ok(e)) => {
                tracing::warn!(attempt, error = %e, "artifact fetch interrupted; will resume");
                if attempt == ATTEMPTS {
                    return Err(FetchError::GaveUp {
                        digest,
                        attempts: ATTEMPTS,
                        last: e,
                    });
                }
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
            }
        }
    }

    let actual = hash_file(part).await.map_err(io_err)?;
    if actual != digest {
        let _ = tokio::fs::remove_file(part).await;
        return Err(FetchError::DigestMismatch {
            expected: digest,
            actual,
        });
    }
    Ok(fetched)
}

async fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}
