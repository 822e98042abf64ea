//! Domain types and logic shared by the agent and the controller: names,
//! digests, app specs, the artifact format and its safe extraction, peer
//! identities, and the shape of operations and their reports.
//!
//! Architecture invariant: this crate knows nothing about gRPC. It depends
//! on neither tonic nor prost; wire types are converted at the edge.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod archive;
pub mod backoff;
pub mod clidocs;
pub mod configdoc;
pub mod digest;
pub mod fsutil;
pub mod http;
pub mod identity;
pub mod manifest;
pub mod names;
pub mod observe;
pub mod ops;
pub mod rollout;
pub mod signing;
pub mod slots;
pub mod spec;
pub mod traffic;
pub mod window;

pub use digest::Digest;
pub use names::{AppName, HostName, Version};
