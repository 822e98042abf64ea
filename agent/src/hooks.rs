//! Hooks: operator commands run at fixed points of an activation, with a
//! timeout, in their own process group, with their output streamed.

use std::path::Path;
use std::process::Stdio;

use convoy_common::spec::Hook;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Output lines forwarded per hook; the rest are counted, not sent.
const MAX_LINES: usize = 200;

/// What a hook learns about the activation, as environment variables.
pub struct HookEnv<'a> {
    pub app: &'a str,
    pub version: &'a str,
    pub previous: &'a str,
    pub environment: &'a str,
    pub release_dir: &'a Path,
    pub install_path: &'a Path,
    pub op_id: &'a str,
}

/// A command whose relative program resolves against `root`, run in `root`.
pub fn command(argv: &[String], root: &Path) -> Command {
    let program = Path::new(&argv[0]);
    let program = if program.is_relative() && argv[0].contains('/') {
        root.join(program)
    } else {
        program.to_path_buf()
    };
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..]).current_dir(root);
    cmd
}

/// Runs `hook`; `line` hears each output line. Ok carries a summary; Err
/// says why the hook failed, with its last output lines.
pub async fn run(hook: &Hook, env: &HookEnv<'_>, root: &Path, mut line: impl FnMut(&str)) -> Result<String, String> {
    let name = hook.point.as_str();
    let mut cmd = command(&hook.argv, root);
    cmd.env("CONVOY_HOOK", name)
        .env("CONVOY_APP", env.app)
        .env("CONVOY_VERSION", env.version)
        .env("CONVOY_PREVIOUS_VERSION", env.previous)
        .env("CONVOY_ENVIRONMENT", env.environment)
        .env("CONVOY_RELEASE_DIR", env.release_dir)
        .env("CONVOY_INSTALL_PATH", env.install_path)
        .env("CONVOY_OP_ID", env.op_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("hook {name}: cannot run {:?}: {e}", hook.argv[0]))?;
    let pgid = child.id();
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut tail: Vec<String> = Vec::new();
    let mut seen = 0usize;
    let mut record = |l: String| {
        seen += 1;
        if seen <= MAX_LINES {
            line(&l);
        }
        tail.push(l);
        if tail.len() > 5 {
            tail.remove(0);
        }
    };
    let run = async {
        let (mut out_done, mut err_done) = (false, false);
        while !(out_done && err_done) {
            tokio::select! {
                l = out.next_line(), if !out_done => match l {
                    Ok(Some(l)) => record(l),
                    _ => out_done = true,
                },
                l = err.next_line(), if !err_done => match l {
                    Ok(Some(l)) => record(l),
                    _ => err_done = true,
                },
            }
        }
        child.wait().await
    };
    let status = match tokio::time::timeout(hook.timeout, run).await {
        Ok(status) => status.map_err(|e| format!("hook {name}: {e}"))?,
        Err(_) => {
            // The whole group: a hook's children must not outlive it.
            if let Some(pid) = pgid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(format!("hook {name} timed out after {:?} and was killed", hook.timeout));
        }
    };
    if status.success() {
        Ok(format!("hook {name} succeeded ({seen} output lines)"))
    } else {
        Err(format!(
            "hook {name} failed ({status}); last output: {}",
            tail.join(" | ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_common::spec::HookPoint;
    use std::time::Duration;

    fn env(dir: &Path) -> HookEnv<'_> {
        HookEnv {
            app: "demo",
            version: "2.0.0",
            previous: "1.0.0",
            environment: "staging",
            release_dir: dir,
            install_path: dir,
            op_id: "op-1",
        }
    }

    fn hook(script: &str, timeout: Duration) -> Hook {
        Hook {
            point: HookPoint::Validate,
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout,
        }
    }

    #[tokio::test]
    async fn output_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        let h = hook(
            "echo \"$CONVOY_HOOK $CONVOY_VERSION $CONVOY_PREVIOUS_VERSION $(pwd)\"; echo oops >&2; exit 3",
            Duration::from_secs(5),
        );
        let err = run(&h, &env(dir.path()), dir.path(), |l| lines.push(l.to_owned()))
            .await
            .unwrap_err();
        assert!(err.starts_with("hook validate failed (exit status: 3)"), "{err}");
        assert!(err.contains("oops"), "{err}");
        let expect = format!("validate 2.0.0 1.0.0 {}", dir.path().canonicalize().unwrap().display());
        assert!(lines.contains(&expect), "{lines:?}");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let err = run(
            &hook(&script, Duration::from_millis(300)),
            &env(dir.path()),
            dir.path(),
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.contains("timed out after 300ms and was killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The grandchild got SIGKILL too: gone, or a zombie awaiting its reaper.
        std::thread::sleep(Duration::from_millis(100));
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = state
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("gone")
            .to_owned();
        assert!(
            state == "gone" || state == "Z",
            "the hook's child still runs (state {state})"
        );
    }
}
