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
