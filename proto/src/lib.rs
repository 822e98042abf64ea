//! Generated protobuf and tonic types for convoy's two gRPC services.
//!
//! Nothing outside the gRPC edge of `agent/` and `controller/` uses these
//! types: they are converted to `convoy-common` domain types at the edge.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("convoy.v1");
}

pub use v1::*;

/// Largest chunk the controller puts in one `Chunk` message; far below
/// tonic's 4 MiB default message limit.
pub const CHUNK_SIZE: usize = 256 * 1024;

pub mod convert;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// How long a connection may take to be ready: the TCP, TLS and HTTP/2
/// handshakes together. `Endpoint::connect_timeout` bounds the TCP
/// connect only, and a controller that is paused (a frozen VM, a stopped
/// process) still completes TCP in its kernel: without this bound a
/// client would wait for the TLS answer forever instead of trying the
/// next controller. Once connected, HTTP/2 keepalive finds a controller
/// that stops answering.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error(
        "no answer within {}s (TCP, TLS and HTTP/2 handshakes): the controller may be paused or overloaded",
        HANDSHAKE_TIMEOUT.as_secs()
    )]
    NoAnswer,
}

/// Connects to `endpoint`, handshakes included, within `HANDSHAKE_TIMEOUT`.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, ConnectError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, endpoint.connect()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ConnectError::NoAnswer),
    }
}
