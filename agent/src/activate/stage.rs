//! Staging: fetch, verify (digest, signature) and unpack a release into
//! `releases/<version>`, alone (pre-staging) or as an activation's first
//! step; and clearing what an interrupted staging left behind.

use super::*;

/// Pre-staging: fetch, verify and unpack only. Nothing live changes, so
/// the rolling phase that follows only switches and checks.
pub async fn stage_only(agent: Arc<Agent>, channel: Channel, cmd: ActivateCommand) -> OpReport {
    let app = cmd.spec.app.clone();
    let op = Op {
        agent: &agent,
        op_id: cmd.op_id.clone(),
        app: app.clone(),
    };
    let j = match agent.store.load_journal(&app) {
        Ok(j) => j,
        Err(e) => return refuse(&agent, &cmd, format!("cannot read journal: {e}")),
    };
    if let Some(last) = j.last_op.as_ref().filter(|r| r.op_id == cmd.op_id) {
        return answer_again(&agent, last);
    }
    let dirs = match agent.store.ensure_app(&app) {
        Ok(d) => d,
        Err(e) => return refuse(&agent, &cmd, e.to_string()),
    };
    op.event(
        Step::Stage,
        EventKind::Started,
        format!("pre-staging {}: {} bytes", cmd.version, cmd.size),
    );
    match stage(&agent, &channel, &cmd, &dirs).await {
        Ok(msg) => {
            op.event(Step::Stage, EventKind::Succeeded, &msg);
            finish(
                &agent,
                &cmd,
                j,
                Outcome::Succeeded,
                String::new(),
                "staged; nothing switched".into(),
            )
        }
        Err(reason) => {
            op.event(Step::Stage, EventKind::Failed, &reason);
            let detail = not_switched(&j.current);
            finish(&agent, &cmd, j, Outcome::FailedRestored, reason, detail)
        }
    }
}

/// Fetches, verifies and unpacks the release into `releases/<version>`.
pub(super) async fn stage(
    agent: &Agent,
    channel: &Channel,
    cmd: &ActivateCommand,
    dirs: &AppDirs,
) -> Result<String, String> {
    let app = &cmd.spec.app;
    let release = dirs.release(&cmd.version);
    let held = release.exists() || switch::live_version(&cmd.spec).as_ref() == Some(&cmd.version);
    if held {
        return match agent.store.release_meta(app, &cmd.version) {
            Some(m) if m.digest == cmd.digest => Ok(format!("{} already on this host", cmd.version)),
            Some(m) => Err(format!(
                "version {} is already on this host with sha256 {}, not {}; versions are immutable, push a new one",
                cmd.version, m.digest, cmd.digest
            )),
            None => Err(format!(
                "{} exists without metadata; remove it by hand",
                release.display()
            )),
        };
    }
    if let Some(manifest) = cmd.manifest {
        if let Some(done) = stage_delta(agent, channel, cmd, dirs, manifest).await? {
            return Ok(done);
        }
    }
    let part = dirs.staging.join(format!("{}.part", cmd.digest));
    // The archive is unpacked on its own thread while its bytes arrive,
    // into staging: nothing is renamed into `releases/` before the digest
    // and the signature verify.
    let unpack_dir = dirs.staging.join(format!("{}.unpack", cmd.version));
    let _ = fs::remove_dir_all(&unpack_dir);
    let follow = Arc::new(fetch::Follow::default());
    let _ends = fetch::EndsFollow(follow.clone());
    let unpacking = {
        let (reader, dir, version) = (
            follow.clone().reader(part.clone()),
            unpack_dir.clone(),
            cmd.version.clone(),
        );
        let limits = Limits::of(&cmd.spec, cmd.size);
        tokio::task::spawn_blocking(move || -> Result<archive::UnpackStats, String> {
            let stats = archive::unpack(io::BufReader::with_capacity(1 << 20, reader), &dir, &limits)
                .map_err(|e| format!("unsafe or corrupt archive: {e}"))?;
            seal(&dir, &version)?;
            Ok(stats)
        })
    };
    let fetched = fetch::fetch(channel.clone(), cmd.digest, cmd.size, &part, |_, _| follow.writing()).await;
    match &fetched {
        Ok(_) => follow.complete(),
        Err(_) => follow.failed(),
    }
    let unpacked = unpacking.await.map_err(|e| format!("unpack task: {e}"));
    let fetched = match fetched {
        Ok(n) => n,
        // A network failure keeps the partial file so the next try resumes;
        // anything else (disk full, bad digest) leaves staging clean.
        Err(e) => {
            let _ = fs::remove_dir_all(&unpack_dir);
            if !matches!(e, FetchError::GaveUp { .. }) {
                let _ = fs::remove_file(&part);
            }
            return Err(e.to_string());
        }
    };
    crash_point("after-fetch");
    // The digest matched what the controller announced; the signature says
    // whether someone this host trusts made the artifact. Checked before
    // anything unpacked is used, whatever the controller claims.
    let sig = cmd.signature.as_deref();
    let manifest = cmd.manifest.as_ref();
    if let Err(e) = convoy_common::signing::verify(&agent.trusted_keys, app, &cmd.version, &cmd.digest, manifest, sig) {
        let _ = fs::remove_dir_all(&unpack_dir);
        let _ = fs::remove_file(&part);
        return Err(e.to_string());
    }
    let stats = match unpacked.and_then(|r| r) {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_dir_all(&unpack_dir);
            let _ = fs::remove_file(&part);
            return Err(e);
        }
    };
    crash_point("after-unpack");
    commit_staged(agent, cmd, dirs, &unpack_dir, &stats.manifest)?;
    let _ = fs::remove_file(&part);
    Ok(format!(
        "{} verified ({fetched} bytes fetched), {} files / {} bytes unpacked",
        cmd.version, stats.files, stats.bytes
    ))
}

/// Marks a staged tree with its version, then makes the whole tree
/// durable with one syncfs before it may become visible.
fn seal(tree: &Path, v: &Version) -> Result<(), String> {
    switch::write_marker(tree, v).map_err(|e| format!("writing release marker: {e}"))?;
    fsutil::sync_filesystem(tree).map_err(|e| format!("syncfs: {e}"))
}

/// Moves a verified tree into `releases/`, with its record and its
/// manifest (the index of what this host holds).
fn commit_staged(
    agent: &Agent,
    cmd: &ActivateCommand,
    dirs: &AppDirs,
    tree: &Path,
    manifest: &convoy_common::manifest::Manifest,
) -> Result<(), String> {
    let meta = ReleaseMeta {
        digest: cmd.digest,
        size: cmd.size,
        config_revision: None,
    };
    agent
        .store
        .write_release_meta(&cmd.spec.app, &cmd.version, &meta)
        .map_err(|e| e.to_string())?;
    let path = delta::manifest_path(dirs, &cmd.version);
    fsutil::write_atomic(&path, &manifest.encode(), 0o600).map_err(|e| format!("{}: {e}", path.display()))?;
    let release = dirs.release(&cmd.version);
    fs::rename(tree, &release).map_err(|e| format!("moving release into place: {e}"))?;
    fsutil::fsync_dir(&dirs.releases).map_err(|e| e.to_string())?;
    // What its files look like now, verified: the next delta copies
    // those still alike without hashing them again. Only a shortcut, so
    // a failure here fails nothing.
    let stamped = delta::stamps(&release, manifest)
        .and_then(|s| fsutil::write_atomic(&delta::stamps_path(dirs, &cmd.version), &s, 0o600));
    if let Err(e) = stamped {
        tracing::warn!(version = %cmd.version, error = %e, "no stamps for this release; the next delta hashes its files");
    }
    Ok(())
}

/// Stages the release from its manifest when this host holds some of its
/// contents and the manifest is vouched for (signed with the artifact,
/// or no keys trusted); `Ok(None)`: stage from the whole artifact.
async fn stage_delta(
    agent: &Agent,
    channel: &Channel,
    cmd: &ActivateCommand,
    dirs: &AppDirs,
    manifest: convoy_common::Digest,
) -> Result<Option<String>, String> {
    use convoy_common::signing::{verify, Covers};
    let app = &cmd.spec.app;
    let sig = cmd.signature.as_deref();
    let covers = verify(
        &agent.trusted_keys,
        app,
        &cmd.version,
        &cmd.digest,
        Some(&manifest),
        sig,
    )
    .map_err(|e| e.to_string())?;
    if covers == Covers::Artifact {
        tracing::info!(%app, version = %cmd.version, "signed before manifests: staging the whole artifact");
        return Ok(None);
    }
    let index = {
        let (spec, dirs) = (cmd.spec.clone(), dirs.clone());
        tokio::task::spawn_blocking(move || delta::Index::of(&spec, &dirs))
            .await
            .map_err(|e| format!("index task: {e}"))?
    };
    if index.is_empty() {
        return Ok(None);
    }
    let limits = Limits::of(&cmd.spec, cmd.size);
    let (m, manifest_bytes) = delta::fetch_manifest(channel.clone(), cmd.digest, manifest, limits.max_entries).await?;
    let plan = delta::Plan::new(m, &index);
    if plan.reused.0 == 0 {
        tracing::info!(%app, version = %cmd.version, "nothing in common with the releases here: staging the whole artifact");
        return Ok(None);
    }
    let contents = delta::contents_dir(dirs, &cmd.version);
    let fetched = match delta::fetch_contents(channel.clone(), cmd.digest, &plan.missing, &contents).await {
        Ok(f) => f,
        // A broken transfer keeps what landed, so the next try resumes;
        // anything else (a full disk, refused content) leaves staging clean.
        Err(e) => {
            if matches!(e, delta::ContentsError::Refused(_)) {
                let _ = fs::remove_dir_all(&contents);
            }
            return Err(e.to_string());
        }
    };
    crash_point("after-fetch");
    let unpack_dir = dirs.staging.join(format!("{}.unpack", cmd.version));
    let _ = fs::remove_dir_all(&unpack_dir);
    // Contents a kept file held when it was indexed, changed since.
    let refetched = Arc::new(std::sync::Mutex::new((0usize, 0u64)));
    let built = {
        let (dir, version, contents, counter) = (
            unpack_dir.clone(),
            cmd.version.clone(),
            contents.clone(),
            refetched.clone(),
        );
        let (channel, artifact, runtime) = (channel.clone(), cmd.digest, tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || -> Result<(archive::UnpackStats, delta::Plan), String> {
            let refetch = |d, size| {
                let f = runtime
                    .block_on(delta::fetch_contents(
                        channel.clone(),
                        artifact,
                        &[(d, size)],
                        &contents,
                    ))
                    .map_err(|e| e.to_string())?;
                let mut c = counter.lock().unwrap();
                c.0 += 1;
                c.1 += f.wire;
                Ok(())
            };
            let stats = delta::build(&plan, &dir, &limits, &index, &contents, refetch)?;
            seal(&dir, &version)?;
            Ok((stats, plan))
        })
        .await
        .map_err(|e| format!("delta build task: {e}"))
        .and_then(|r| r)
    };
    let (stats, plan) = match built {
        Ok(b) => b,
        Err(e) => {
            let _ = fs::remove_dir_all(&unpack_dir);
            let _ = fs::remove_dir_all(&contents);
            return Err(e);
        }
    };
    let (refetched, refetched_wire) = *refetched.lock().unwrap();
    crash_point("after-unpack");
    commit_staged(agent, cmd, dirs, &unpack_dir, &plan.manifest)?;
    let _ = fs::remove_dir_all(&contents);
    let (already, already_bytes) = fetched.already;
    let mut notes = String::new();
    if already > 0 {
        notes.push_str(&format!(", {already} already here from an interrupted try"));
    }
    if refetched > 0 {
        notes.push_str(&format!(", {refetched} fetched again (changed here since)"));
    }
    Ok(Some(format!(
        "{} verified by delta: {} of {} contents reused ({} bytes); {} fetched ({} bytes of file data, {} bytes over the wire with the manifest){notes}; {} files / {} bytes built",
        cmd.version,
        plan.reused.0,
        plan.reused.0 + plan.missing.len(),
        plan.reused.1,
        plan.missing.len() - already,
        plan.missing_bytes() - already_bytes,
        fetched.wire + refetched_wire + manifest_bytes,
        stats.files,
        stats.bytes
    )))
}

/// Removes half-unpacked trees and half-written backups; keeps partial
/// downloads and fetched contents of releases not staged yet, so they
/// resume.
pub(super) fn clean_staging(dirs: &AppDirs) {
    for e in fs::read_dir(&dirs.staging).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "part") {
            continue;
        }
        let staged = |v: &str| Version::new(v).is_ok_and(|v| dirs.release(&v).exists());
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_suffix(".contents").is_some_and(|v| !staged(v)) {
            // Half-written contents are not named by their sha256 yet.
            for c in fs::read_dir(&p).into_iter().flatten().flatten() {
                if c.path().extension().is_some_and(|x| x == "tmp") {
                    let _ = fs::remove_file(c.path());
                }
            }
            continue;
        }
        let _ = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
    for e in fs::read_dir(&dirs.backups).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}
