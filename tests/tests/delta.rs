//! Delta staging on booted hosts: a host that holds a release builds the
//! next one from its manifest, fetching only the contents it lacks, and
//! ends with the tree a full unpack makes; kill -9 in the middle resumes;
//! a tampered manifest or content is refused; releases never share a
//! writable file; retention keeps what kept releases need.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convoy_common::Digest;
use convoy_tests::testbed::{bin_dir, DEMO_PORT};
use convoy_tests::{Host, Testbed};

const RELEASES: &str = "/var/lib/convoy/apps/demo/releases";

/// Deterministic bytes that do not compress away.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A release of the demo app: its binary, its release.toml, 30 data files
/// of 16 KiB and one of 1 MiB, a symlink and a hard link. `changed` data
/// files get new contents; `dropped` ones are left out; `executable`
/// ones are mode 0755 (the archive keeps the executable bit).
struct Release<'a> {
    version: &'a str,
    changed: &'a [usize],
    dropped: &'a [usize],
    executable: &'a [usize],
    added: bool,
}

impl Release<'_> {
    fn tree(&self, root: &Path) -> Result<PathBuf> {
        let tree = root.join(format!("tree-{}", self.version));
        fs::create_dir_all(tree.join("bin"))?;
        fs::create_dir_all(tree.join("data/deep"))?;
        fs::copy(bin_dir().join("demo-app"), tree.join("bin/demo-app"))?;
        fs::write(
            tree.join("release.toml"),
            format!(
                "version = \"{}\"\nmode = \"healthy\"\nport = {DEMO_PORT}\n",
                self.version
            ),
        )?;
        for i in 0..30 {
            if self.dropped.contains(&i) {
                continue;
            }
            let seed = if self.changed.contains(&i) {
                1000 + i as u64
            } else {
                i as u64
            };
            let p = tree.join(format!("data/f{i:02}"));
            fs::write(&p, noise(seed, 16 << 10))?;
            let mode = if self.executable.contains(&i) { 0o755 } else { 0o644 };
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        }
        fs::write(tree.join("data/deep/big"), noise(77, 1 << 20))?;
        if self.added {
            fs::write(tree.join("data/added"), noise(5000, 40 << 10))?;
        }
        std::os::unix::fs::symlink("deep/big", tree.join("data/big-link"))?;
        fs::hard_link(tree.join("data/deep/big"), tree.join("data/big-again"))?;
        Ok(tree)
    }

    /// Packs and pushes it, signed with `key`; returns its tree.
    fn push(&self, bed: &Testbed, key: &Path) -> Result<PathBuf> {
        let tree = self.tree(bed.dir.path())?;
        let file = bed.dir.path().join(format!("demo-{}.tar.gz", self.version));
        convoy_common::archive::pack_dir(&tree, fs::File::create(&file)?)?;
        let out = bed.convoy_ok(&[
            "release",
            "push",
            "demo",
            self.version,
            file.to_str().unwrap(),
            "--sign",
            key.to_str().unwrap(),
        ])?;
        anyhow::ensure!(out.contains(", signed"), "{out}");
        Ok(tree)
    }
}

/// Every file content of a local tree, by sha256, with its size.
fn contents(tree: &Path) -> Result<BTreeMap<Digest, u64>> {
    let mut out = BTreeMap::new();
    for p in convoy_common::archive::list_tree(tree)? {
        let full = tree.join(&p);
        let m = fs::symlink_metadata(&full)?;
        if m.is_file() {
            out.insert(Digest::of_bytes(&fs::read(&full)?), m.len());
        }
    }
    Ok(out)
}

/// What `new` holds that `old` does not: count and bytes.
fn missing(old: &Path, new: &Path) -> Result<(usize, u64)> {
    let (old, new) = (contents(old)?, contents(new)?);
    let lacking: Vec<u64> = new
        .iter()
        .filter(|(d, _)| !old.contains_key(d))
        .map(|(_, s)| *s)
        .collect();
    Ok((lacking.len(), lacking.iter().sum()))
}

/// A release tree on a host, entry by entry: path, type, mode, size, link
/// target and sha256 of each file (the release marker aside).
fn listing(host: &Host, version: &str) -> Result<String> {
    let dir = format!("{RELEASES}/{version}");
    let entries = host.exec_ok(&[
        "sh",
        "-c",
        &format!(
            "cd {dir} && find . -printf '%p %y %m %s %l\\n' | sort && find . -type f -exec sha256sum {{}} + | sort -k2"
        ),
    ])?;
    Ok(entries)
}

/// The stage line a deploy printed for a host.
fn stage_line<'a>(out: &'a str, host: &str) -> Result<&'a str> {
    out.lines()
        .find(|l| l.contains(&format!("[{host}]")) && l.contains("stage") && l.contains("verified"))
        .with_context(|| format!("no stage line for {host} in:\n{out}"))
}

fn deploy(bed: &Testbed, version: &str, env: &str) -> Result<String> {
    bed.convoy_ok(&["deploy", "demo", version, "--env", env])
}

fn wait_serving(host: &Host, version: &str) -> Result<()> {
    let start = Instant::now();
    while host.serving().as_deref() != Some(version) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{} never served {version}", host.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn delta_staging_fetches_only_what_a_host_lacks_and_builds_the_same_tree() -> Result<()> {
    let keys = tempfile::tempdir()?;
    let out = std::process::Command::new(bin_dir().join("convoy"))
        .args(["keys", "generate", "release", "--dir"])
        .arg(keys.path())
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trusted = fs::read_to_string(keys.path().join("release.pub"))?.trim().to_owned();
    let key = keys.path().join("release.key");
    let spec = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/demo.toml"))?;
    let spec = spec.replace("units = ", "keep_releases = 2\nunits = ");
    // host0 in staging holds each release before the next; host1 in
    // production holds nothing, so it unpacks the whole artifact.
    let bed = Testbed::boot_full(
        2,
        |i| if i == 1 { "staging" } else { "production" }.into(),
        &spec,
        &format!("trusted_keys = [\"{trusted}\"]"),
    )?;
    let (h0, h1) = (&bed.hosts[0], &bed.hosts[1]);

    let v1 = Release {
        version: "1.0.0",
        changed: &[],
        dropped: &[],
        executable: &[],
        added: false,
    }
    .push(&bed, &key)?;
    let out = deploy(&bed, "1.0.0", "staging")?;
    assert!(
        stage_line(&out, &h0.name)?.contains("bytes fetched"),
        "first release: whole\n{out}"
    );

    // 2.0.0: two files changed, one added, one dropped, one made executable.
    let v2 = Release {
        version: "2.0.0",
        changed: &[3, 7],
        dropped: &[9],
        executable: &[5],
        added: true,
    }
    .push(&bed, &key)?;
    let (lacking, lacking_bytes) = missing(&v1, &v2)?;
    assert_eq!(lacking, 4, "release.toml, two changed files, one added");
    let out = deploy(&bed, "2.0.0", "staging")?;
    let line = stage_line(&out, &h0.name)?;
    assert!(line.contains("verified by delta"), "{line}");
    // Exactly what the manifest says is missing travelled as file data.
    assert!(
        line.contains(&format!("; {lacking} fetched ({lacking_bytes} bytes of file data")),
        "expected {lacking} contents / {lacking_bytes} bytes: {line}"
    );
    wait_serving(h0, "2.0.0")?;

    // The control: host1 has nothing in common and unpacks the whole
    // artifact. Both trees are the same, entry by entry and byte by byte.
    let out = deploy(&bed, "2.0.0", "production")?;
    let line = stage_line(&out, &h1.name)?;
    assert!(!line.contains("by delta"), "{line}");
    assert_eq!(listing(h0, "2.0.0")?, listing(h1, "2.0.0")?);
    let modes = h0.exec_ok(&["stat", "-c", "%a", &format!("{RELEASES}/2.0.0/data/f05")])?;
    assert_eq!(modes.trim(), "755");

    // No two releases share a file: a write through the live release
    // (/opt/demo) changes nothing in the kept 1.0.0.
    let shared = h0.exec_ok(&[
        "find",
        RELEASES,
        "-type",
        "f",
        "-links",
        "+1",
        "!",
        "-path",
        "*/data/big*",
        "!",
        "-path",
        "*/deep/big",
    ])?;
    assert_eq!(
        shared.trim(),
        "",
        "files with more than one name outside the release's own hard link"
    );
    let before = h0.exec_ok(&["sha256sum", &format!("{RELEASES}/1.0.0/data/f00")])?;
    h0.exec_ok(&["sh", "-c", "echo changed-in-place >> /opt/demo/data/f00"])?;
    let after = h0.exec_ok(&["sha256sum", &format!("{RELEASES}/1.0.0/data/f00")])?;
    assert_eq!(before, after, "a write to the live release reached a kept one");
    let inodes = h0.exec_ok(&[
        "stat",
        "-c",
        "%i",
        &format!("{RELEASES}/1.0.0/data/deep/big"),
        &format!("{RELEASES}/2.0.0/data/deep/big"),
    ])?;
    let inodes: Vec<&str> = inodes.split_whitespace().collect();
    assert_ne!(inodes[0], inodes[1], "a reused file is a copy, not a link");

    // 3.0.0 keeps f00, which was changed in place on host0 since: that
    // copy no longer matches and is not used; the content is fetched.
    let v3 = Release {
        version: "3.0.0",
        changed: &[3, 7, 11],
        dropped: &[9],
        executable: &[5],
        added: true,
    }
    .push(&bed, &key)?;
    let out = deploy(&bed, "3.0.0", "staging")?;
    let line = stage_line(&out, &h0.name)?;
    assert!(line.contains("verified by delta"), "{line}");
    let f00 = h0.exec_ok(&["sha256sum", &format!("{RELEASES}/3.0.0/data/f00")])?;
    assert_eq!(
        f00.split_whitespace().next(),
        Some(Digest::of_bytes(&fs::read(v3.join("data/f00"))?).to_hex().as_str()),
        "the changed-in-place copy was not reused"
    );
    wait_serving(h0, "3.0.0")?;

    // kill -9 in the middle of fetching contents: systemd restarts the
    // agent, and the next try resumes with what had landed.
    let v4 = Release {
        version: "4.0.0",
        changed: &[1, 2, 3, 4, 7, 11, 12, 13],
        dropped: &[9],
        executable: &[5],
        added: true,
    }
    .push(&bed, &key)?;
    let (lacking, _) = missing(&v3, &v4)?;
    h0.set_failpoint(Some("delta-content-landed"))?;
    let first = bed.convoy(&["deploy", "demo", "4.0.0", "--env", "staging"])?;
    assert!(
        h0.failpoint_fired("delta-content-landed"),
        "the agent was not killed: {first:?}"
    );
    h0.set_failpoint(None)?;
    let line = if first.code == 0 {
        first.stdout.clone()
    } else {
        // The rollout saw the host go; the next deploy finishes it.
        bed.wait_host_connected(&h0.name)?;
        deploy(&bed, "4.0.0", "staging")?
    };
    let line = stage_line(&line, &h0.name)?;
    assert!(line.contains("verified by delta"), "{line}");
    assert!(line.contains("already here from an interrupted try"), "{line}");
    let number_before = |marker: &str| -> Result<usize> {
        let head = &line[..line.find(marker).with_context(|| format!("{marker:?} in {line}"))?];
        Ok(head.rsplit(' ').next().unwrap_or_default().parse()?)
    };
    let fetched_now = number_before(" fetched (")?;
    let already = number_before(" already here from an interrupted try")?;
    assert!(already >= 1, "{line}");
    assert_eq!(
        fetched_now + already,
        lacking,
        "each missing content fetched once: {line}"
    );
    wait_serving(h0, "4.0.0")?;
    let want = contents(&v4)?;
    let got = h0.exec_ok(&[
        "sh",
        "-c",
        &format!("cd {RELEASES}/4.0.0 && find . -type f ! -name .convoy-release -exec sha256sum {{}} +"),
    ])?;
    for l in got.lines() {
        let sha = Digest::parse(l.split_whitespace().next().unwrap())?;
        assert!(want.contains_key(&sha), "unexpected content in 4.0.0: {l}");
    }

    // Retention (keep_releases = 2) removed 1.0.0 and 2.0.0; the kept
    // releases are whole, although each was built from the ones removed.
    let kept = h0.exec_ok(&["ls", RELEASES])?;
    assert_eq!(kept.split_whitespace().collect::<Vec<_>>(), ["3.0.0", "4.0.0"]);
    for (v, tree) in [("3.0.0", &v3), ("4.0.0", &v4)] {
        let sums = h0.exec_ok(&[
            "sh",
            "-c",
            &format!("cd {RELEASES}/{v} && sha256sum data/deep/big data/f00 data/f03 release.toml"),
        ])?;
        for l in sums.lines() {
            let (sha, path) = l.split_once("  ").context("sha256sum line")?;
            assert_eq!(
                sha,
                Digest::of_bytes(&fs::read(tree.join(path))?).to_hex(),
                "{v} {path}"
            );
        }
    }

    // A tampered manifest: the controller serves another one for 5.0.0.
    // The signature covers the manifest, so the host refuses it.
    let v5 = Release {
        version: "5.0.0",
        changed: &[20],
        dropped: &[],
        executable: &[],
        added: false,
    }
    .push(&bed, &key)?;
    let digest = {
        let bytes = fs::read(bed.dir.path().join("demo-5.0.0.tar.gz"))?;
        Digest::of_bytes(&bytes).to_hex()
    };
    let manifest_file = bed
        .dir
        .path()
        .join(format!("controller/data/artifacts/{digest}.manifest"));
    let honest = fs::read(&manifest_file)?;
    let mut m = convoy_common::manifest::Manifest::decode(&honest, u64::MAX)?;
    let evil = noise(6666, 16 << 10);
    let f20 = m
        .entries
        .iter_mut()
        .find(|e| e.path().ends_with("data/f20"))
        .context("f20 in the manifest")?;
    f20.sha256 = Digest::of_bytes(&evil).as_bytes().to_vec();
    fs::write(&manifest_file, m.encode())?;
    let out = bed.convoy(&["deploy", "demo", "5.0.0", "--env", "staging"])?;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("signature refused") || out.stdout.contains("signature refused"),
        "{out:?}"
    );
    fs::write(&manifest_file, &honest)?;

    // A tampered content: the controller serves other bytes for f20.
    let sha = Digest::of_bytes(&fs::read(v5.join("data/f20"))?).to_hex();
    let content = bed
        .dir
        .path()
        .join(format!("controller/data/contents/{}/{sha}.zst", &sha[..2]));
    let honest_content = fs::read(&content)?;
    fs::write(&content, zstd::bulk::compress(&evil, 3)?)?;
    let out = bed.convoy(&["deploy", "demo", "5.0.0", "--env", "staging"])?;
    assert_ne!(out.code, 0, "{out:?}");
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(said.contains("content refused"), "{said}");
    // Nothing was moved into releases/, and the host still serves 4.0.0.
    assert!(!h0.exec_ok(&["ls", RELEASES])?.contains("5.0.0"));
    assert_eq!(h0.serving().as_deref(), Some("4.0.0"));
    fs::write(&content, honest_content)?;
    let out = deploy(&bed, "5.0.0", "staging")?;
    assert!(stage_line(&out, &h0.name)?.contains("verified by delta"), "{out}");
    wait_serving(h0, "5.0.0")?;
    Ok(())
}
