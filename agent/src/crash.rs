//! Crash points for the kill tests.
//!
//! Built with `--features failpoints` and started with
//! `FAILPOINTS=<name>=return`, the agent kills itself with SIGKILL the first
//! time it reaches the point `<name>`: no destructor, no flush, exactly like
//! `kill -9` or a power cut. A marker in /run makes each point fire once per
//! boot, so the restarted agent can recover without dying again. Without the
//! feature, `crash_point` compiles to nothing.

#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub fn crash_point(name: &str) {
    fail::fail_point!(name, |_| {
        let marker = std::path::PathBuf::from(format!("/run/convoy-failpoint.{name}"));
        if !marker.exists() && std::fs::write(&marker, b"fired\n").is_ok() {
            tracing::warn!(name, "failpoint: killing the agent");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    });
}
