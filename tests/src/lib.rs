//! convoy's test bed: real hosts (systemd-nspawn containers booting Debian's
//! systemd), each with a convoy agent running as a systemd unit, on a
//! private bridge in 198.18.0.0/15, and a real controller on the bridge.
//!
//! Everything a `Testbed` starts is stopped when it is dropped, also when a
//! test panics. See `tests/README.md` and TESTBED.md.

pub mod browser;
pub mod haproxy;
pub mod load;
pub mod prometheus;
pub mod testbed;
pub mod webhook;

pub use testbed::{Host, Testbed};
