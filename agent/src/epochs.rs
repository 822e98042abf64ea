//! The lease epoch of each rollout this host has been sent commands for.
//! Several controllers may drive one rollout in turn; each takeover
//! raises the rollout's epoch, and a command carrying an epoch lower than
//! one already seen comes from a controller that lost the rollout (paused
//! past its lease, cut off from the database): it is refused, whatever
//! the controller believes. Kept in `<state_dir>/epochs.json`, so a
//! restart of the agent does not forget.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// Rollouts remembered at most (the oldest are forgotten first).
const KEPT: usize = 1024;

pub struct Epochs {
    path: PathBuf,
    /// rollout → (highest epoch seen, when first seen, unix ms).
    seen: Mutex<BTreeMap<String, (u64, i64)>>,
}

impl Epochs {
    pub fn open(state_dir: &std::path::Path) -> Epochs {
        let path = state_dir.join("epochs.json");
        let seen = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Epochs {
            path,
            seen: Mutex::new(seen),
        }
    }

    /// Whether a command for `rollout` at `epoch` may run; `Err` holds
    /// the higher epoch already seen. Epoch 0 (a controller without
    /// leases) is always admitted.
    pub fn admit(&self, rollout: &str, epoch: u64) -> Result<(), u64> {
        if epoch == 0 {
            return Ok(());
        }
        let mut seen = self.seen.lock().unwrap();
        let now = convoy_common::ops::now_unix_ms();
        match seen.get(rollout) {
            Some((known, _)) if *known > epoch => return Err(*known),
            Some((known, _)) if *known == epoch => return Ok(()),
            _ => {}
        }
        let first = seen.get(rollout).map_or(now, |(_, at)| *at);
        seen.insert(rollout.to_owned(), (epoch, first));
        while seen.len() > KEPT {
            let oldest = seen.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                seen.remove(&k);
            }
        }
        let text = serde_json::to_vec(&*seen).expect("epochs serialise");
        if let Err(e) = convoy_common::fsutil::write_atomic(&self.path, &text, 0o600) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not keep rollout epochs");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_epoch_is_refused_even_after_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let e = Epochs::open(d.path());
        assert_eq!(e.admit("r1", 1), Ok(()));
        assert_eq!(e.admit("r1", 2), Ok(()), "taken over");
        assert_eq!(e.admit("r1", 1), Err(2), "the old owner is refused");
        assert_eq!(e.admit("r1", 2), Ok(()), "the new owner repeats");
        assert_eq!(e.admit("r2", 1), Ok(()), "another rollout");
        assert_eq!(e.admit("r3", 0), Ok(()), "no lease: admitted");
        let again = Epochs::open(d.path());
        assert_eq!(again.admit("r1", 1), Err(2), "kept across restarts");
    }
}
