//! How releases travel: a delta update against `rsync -a` over ssh, a
//! whole stage of a `.tar.zst` against a `.tar.gz` and `scp` + `tar xzf`,
//! and the controller's egress when ten hosts take the same update.
//!
//! The tree looks like an application: its binary and release.toml, four
//! large files (an eighth of the size each) and 64 KiB files filling the
//! other half, text-like (gzip and zstd shrink them about 2:1). An update
//! rewrites 2% of the files (by count) and the release.toml.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use convoy_common::archive::{pack_dir_as, Compression};
use convoy_tests::testbed::{bin_dir, rollout_id, DEMO_PORT};
use convoy_tests::Testbed;

use crate::fixture;
use crate::report::{median, Section};
use crate::stream::Sshd;

const SMALL: u64 = 64 << 10;
/// One small file in this many changes with each update.
const EVERY: u64 = 50;

/// A release tree of about `size` bytes.
fn base_tree(dir: &Path, size: u64) -> anyhow::Result<PathBuf> {
    let tree = dir.join("tree-0");
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::create_dir_all(tree.join("lib"))?;
    std::fs::copy(bin_dir().join("demo-app"), tree.join("bin/demo-app"))?;
    for i in 0..4 {
        fixture::compressible(&tree.join(format!("lib/large-{i}.so")), size / 8, seed(900_000 + i))?;
    }
    for i in 0..small_files(size) {
        let sub = tree.join(format!("share/d{:02}", i % 64));
        std::fs::create_dir_all(&sub)?;
        fixture::compressible(&sub.join(format!("f{i:05}")), SMALL, seed(i))?;
    }
    release_toml(&tree, 0)?;
    Ok(tree)
}

/// Distinct seeds give distinct files (the generator ignores the low bit).
fn seed(n: u64) -> u64 {
    2 * n + 11
}

fn small_files(size: u64) -> u64 {
    (size / 2) / SMALL
}

fn release_toml(tree: &Path, r: u64) -> anyhow::Result<()> {
    let p = tree.join("release.toml");
    let _ = std::fs::remove_file(&p);
    std::fs::write(
        p,
        format!("version = \"{}\"\nmode = \"healthy\"\nport = {DEMO_PORT}\n", version(r)),
    )?;
    Ok(())
}

fn version(r: u64) -> String {
    format!("1.0.{r}")
}

/// Tree `r` from tree `r - 1`: the same files (hard links, to save disk)
/// with 2% of the small ones rewritten. Returns how many files changed.
fn next_tree(dir: &Path, size: u64, r: u64) -> anyhow::Result<(PathBuf, u64)> {
    let (prev, tree) = (dir.join(format!("tree-{}", r - 1)), dir.join(format!("tree-{r}")));
    fixture::run(Command::new("cp").arg("-al").arg(&prev).arg(&tree))?;
    let mut changed = 1; // release.toml
    for i in (0..small_files(size)).filter(|i| (i + r * 7).is_multiple_of(EVERY)) {
        let p = tree.join(format!("share/d{:02}/f{i:05}", i % 64));
        std::fs::remove_file(&p)?;
        fixture::compressible(&p, SMALL, seed(1_000_000 * r + i))?;
        changed += 1;
    }
    release_toml(&tree, r)?;
    Ok((tree, changed))
}

fn pack(tree: &Path, out: &Path, how: Compression) -> anyhow::Result<u64> {
    pack_dir_as(tree, std::fs::File::create(out)?, how)?;
    Ok(std::fs::metadata(out)?.len())
}

fn files_in(tree: &Path) -> anyhow::Result<usize> {
    Ok(convoy_common::archive::list_tree(tree)?
        .iter()
        .filter(|p| tree.join(p).is_file())
        .count())
}

/// The controller's egress counter.
fn egress(bed: &Testbed) -> anyhow::Result<u64> {
    let m = bed.controller_metrics()?;
    m.lines()
        .find_map(|l| l.strip_prefix("convoy_artifact_bytes_streamed_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("no convoy_artifact_bytes_streamed_total")
}

/// Deploys `v` to the hosts with `select` and returns its stage time on
/// `host` (the agent's own events: stage started → staged, seconds), the
/// controller's egress meanwhile, and the stage message.
fn deploy(bed: &Testbed, v: &str, select: &str, host: &str) -> anyhow::Result<(f64, u64, String)> {
    let before = egress(bed)?;
    let out = bed.convoy_ok(&["deploy", "demo", v, "--env", "staging", "--select", select])?;
    let sent = egress(bed)? - before;
    let ev = crate::testbed::events(bed, &rollout_id(&out))?;
    let started = crate::testbed::at(&ev, host, "stage", "started", false).context("no stage start")?;
    let staged = crate::testbed::at(&ev, host, "stage", "succeeded", false).context("no staged")?;
    let said = out
        .lines()
        .find(|l| l.contains(&format!("[{host}] stage")) && l.contains("verified"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(((staged - started) as f64 / 1000.0, sent, said))
}

/// `rsync -a` of `src` over ssh into `dest` (which holds the previous
/// tree): seconds and the bytes it sent (its `--stats`).
fn rsync(ssh: &Sshd, src: &Path, dest: &Path, extra: &[&str]) -> anyhow::Result<(f64, u64)> {
    let e = format!("ssh {}", ssh.opts("-p").join(" "));
    let t = Instant::now();
    let out = fixture::run(
        Command::new("rsync")
            .args(["-a", "--stats", "-e", &e])
            .args(extra)
            .arg(format!("{}/", src.display()))
            .arg(format!("root@127.0.0.1:{}/", dest.display())),
    )?;
    let secs = t.elapsed().as_secs_f64();
    let sent = out
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|n| n.replace(',', ""))
        .and_then(|n| n.trim().parse().ok())
        .context("no 'Total bytes sent' in rsync --stats")?;
    Ok((secs, sent))
}

/// Seconds to write and fsync 1 GiB on the disk under `dir`.
fn disk_secs(dir: &Path) -> anyhow::Result<f64> {
    let f = dir.join("dd");
    let t = Instant::now();
    fixture::run(
        Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=1024", "conv=fsync"])
            .arg(format!("of={}", f.display())),
    )?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(f)?;
    Ok(secs)
}

/// `rsync` of `tree` into `dest`, which first gets a copy of `prev`
/// (untimed, written back); `dest` is removed again.
fn rsync_over(ssh: &Sshd, prev: &Path, tree: &Path, dest: &Path, extra: &[&str]) -> anyhow::Result<(f64, u64)> {
    let _ = std::fs::remove_dir_all(dest);
    fixture::run(Command::new("cp").arg("-a").arg(prev).arg(dest))?;
    fixture::run(&mut Command::new("sync"))?;
    let r = rsync(ssh, tree, dest, extra);
    std::fs::remove_dir_all(dest)?;
    r
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn spec() -> anyhow::Result<String> {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/testbed/demo.toml"))?;
    // Two releases per host: what a delta needs, and no more disk.
    Ok(spec.replace("units = ", "keep_releases = 2\nunits = "))
}

pub fn run(size: u64, fanout_hosts: usize, fanout_size: u64, runs: usize) -> anyhow::Result<Section> {
    let work_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&work_root)?;
    let work = tempfile::tempdir_in(&work_root)?;
    let dir = work.path();
    eprintln!("delta: building a {} tree", mib(size));
    let tree0 = base_tree(dir, size)?;
    let files = files_in(&tree0)?;
    let ssh = Sshd::start(dir)?;
    // Test-bed hosts keep their files in RAM (an overlay on tmpfs), so
    // rsync and scp + tar write into tmpfs too.
    let shm = tempfile::tempdir_in("/dev/shm")?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // host1 (zone z1) takes the zstd artifact whole and then each update;
    // host2 (zone z0) takes the same tree as a tar.gz, whole.
    eprintln!("delta: booting 2 hosts");
    let bed = Testbed::boot_spec(2, |_| "staging".to_owned(), &spec()?)?;
    let zst0 = dir.join("r0.tar.zst");
    let zst_size = pack(&tree0, &zst0, Compression::Zstd)?;
    let gz0 = dir.join("r0.tar.gz");
    let gz_size = pack(&tree0, &gz0, Compression::Gzip)?;
    bed.push_file(&version(0), &zst0)?;
    let (zst_secs, _, _) = deploy(&bed, &version(0), "zone=z1", "host1")?;
    bed.push_file("1.0.0-gz", &gz0)?;
    let (gz_secs, _, _) = deploy(&bed, "1.0.0-gz", "zone=z0", "host2")?;
    // scp + tar xzf of the same tar.gz, into a new directory.
    let scp_to = shm.path().join("scp");
    std::fs::create_dir_all(&scp_to)?;
    fixture::run(&mut Command::new("sync"))?;
    let t = Instant::now();
    fixture::run(
        Command::new("scp")
            .args(ssh.opts("-P"))
            .arg(&gz0)
            .arg(format!("root@127.0.0.1:{}/r.tar.gz", scp_to.display())),
    )?;
    fixture::run(
        Command::new("ssh")
            .args(ssh.opts("-p"))
            .arg("root@127.0.0.1")
            .arg(format!(
                "mkdir {d}/tree && tar xzf {d}/r.tar.gz -C {d}/tree && sync -f {d}/tree",
                d = scp_to.display()
            )),
    )?;
    let scp_secs = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&scp_to)?;
    rows.push(vec![
        format!("full stage, {} tree, {files} files", mib(size)),
        format!("tar.zst {zst_secs:.2} s"),
        format!(
            "tar.gz {gz_secs:.2} s; scp + tar xzf (+ sync) {scp_secs:.2} s; artifacts: tar.zst {}, tar.gz {}",
            mib(zst_size),
            mib(gz_size)
        ),
        format!("tar.zst ≤ 0.5x scp + tar xzf: {:.2}x", zst_secs / scp_secs),
    ]);

    // ── updates: convoy's delta against rsync into the previous tree ──
    let (mut c_secs, mut c_bytes, mut r_secs, mut r_bytes, mut f_secs) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut art, mut changed_files, mut said) = (0, 0, String::new());
    for r in 1..=runs as u64 {
        let (tree, changed) = next_tree(dir, size, r)?;
        changed_files = changed;
        let zst = dir.join(format!("r{r}.tar.zst"));
        art = pack(&tree, &zst, Compression::Zstd)?;
        bed.push_file(&version(r), &zst)?;
        let (secs, sent, line) = deploy(&bed, &version(r), "zone=z1", "host1")?;
        anyhow::ensure!(line.contains("by delta"), "host1 did not stage by delta: {line}");
        c_secs.push(secs);
        c_bytes.push(sent as f64);
        said = line;
        // rsync into a copy of the previous tree; then the same with
        // --fsync, durable before it returns as convoy's stage is.
        let prev = dir.join(format!("tree-{}", r - 1));
        let (secs, sent) = rsync_over(&ssh, &prev, &tree, &shm.path().join("rsync-dest"), &[])?;
        r_secs.push(secs);
        r_bytes.push(sent as f64);
        let (secs, _) = rsync_over(&ssh, &prev, &tree, &shm.path().join("rsync-dest"), &["--fsync"])?;
        f_secs.push(secs);
        if r >= 2 {
            std::fs::remove_dir_all(dir.join(format!("tree-{}", r - 2)))?;
        }
    }
    let (cs, cb, rs, rb, fs) = (
        median(c_secs),
        median(c_bytes) as u64,
        median(r_secs),
        median(r_bytes) as u64,
        median(f_secs),
    );
    rows.push(vec![
        format!("update: {changed_files} of {files} files changed (2%), bytes sent"),
        format!("convoy {}", mib(cb)),
        format!("rsync -a over ssh {}; the artifact {}", mib(rb), mib(art)),
        format!(
            "≤ 1.2x rsync: {:.2}x; ≤ 3% of the artifact: {:.1}%",
            cb as f64 / rb as f64,
            100.0 * cb as f64 / art as f64
        ),
    ]);
    rows.push(vec![
        "update: stage command → staged".into(),
        format!("convoy {cs:.2} s"),
        format!("rsync -a over ssh {rs:.2} s; rsync -a --fsync {fs:.2} s"),
        format!("≤ rsync: {:.2}x rsync, {:.2}x rsync --fsync", cs / rs, cs / fs),
    ]);
    notes.push(format!("A convoy stage line from the last run: `{said}`"));
    drop(bed);

    // ── fan-out: the same kind of update to N hosts ──
    eprintln!("delta: booting {fanout_hosts} hosts for the fan-out");
    let fan = dir.join("fan");
    std::fs::create_dir_all(&fan)?;
    let t0 = base_tree(&fan, fanout_size)?;
    let (t1, _) = next_tree(&fan, fanout_size, 1)?;
    let bed = Testbed::boot_spec(fanout_hosts, |_| "staging".to_owned(), &spec()?)?;
    let (a0, a1) = (fan.join("a0.tar.zst"), fan.join("a1.tar.zst"));
    pack(&t0, &a0, Compression::Zstd)?;
    let a1_size = pack(&t1, &a1, Compression::Zstd)?;
    bed.push_file(&version(0), &a0)?;
    let before = egress(&bed)?;
    bed.deploy_everywhere(&version(0))?;
    let whole = egress(&bed)? - before;
    bed.push_file(&version(1), &a1)?;
    let before = egress(&bed)?;
    let out = bed.deploy_everywhere(&version(1))?;
    let delta = egress(&bed)? - before;
    let by_delta = out.lines().filter(|l| l.contains("verified by delta")).count();
    anyhow::ensure!(
        by_delta == fanout_hosts,
        "{by_delta} of {fanout_hosts} hosts staged by delta:\n{out}"
    );
    rows.push(vec![
        format!(
            "fan-out: {fanout_hosts} hosts take a 2% update of a {} tree",
            mib(fanout_size)
        ),
        format!("controller egress {}", mib(delta)),
        format!(
            "{} per host; the first release, whole: {} ({} per host); whole artifacts of the update would be {}",
            mib(delta / fanout_hosts as u64),
            mib(whole),
            mib(whole / fanout_hosts as u64),
            mib(a1_size * fanout_hosts as u64)
        ),
        format!(
            "{:.1}% of whole artifacts",
            100.0 * delta as f64 / (a1_size * fanout_hosts as u64) as f64
        ),
    ]);
    drop(bed);

    let disk = disk_secs(dir)?;
    notes.push(format!(
        "Each update rewrites every {EVERY}th 64 KiB file and the release.toml; the four large files and the \
         rest stay. convoy's bytes are the controller's egress counter (`convoy_artifact_bytes_streamed_total`) \
         over the deploy: the manifest and the missing contents, zstd-compressed, without TLS and HTTP/2 \
         framing; rsync's are its `Total bytes sent` (file list, checksums' answers and literal data, \
         uncompressed, without ssh framing). convoy's time is the agent's stage step (its own events): \
         manifest, contents, every file of the new tree copied from the kept release (hashed against the \
         manifest, unless its stamps show it untouched since it was verified), then one syncfs. rsync updates the previous tree in place, writing only the changed \
         files and fsyncing nothing; `--fsync` fsyncs each file it writes. convoy builds a new, independent \
         tree beside the live one (the previous release stays whole for a rollback), so on a file system \
         without reflinks it writes the whole tree again: here in RAM (test-bed hosts keep their files \
         in an overlay on tmpfs, and rsync's and scp's destinations are on tmpfs too). On a disk that \
         copy is written out before the tree is used; this machine's disk takes {disk:.1} s to write \
         and fsync 1 GiB (`dd bs=1M count=1024 conv=fsync`), a bound on what the copy would add per GiB \
         where the file system has no reflinks (with reflinks, btrfs and XFS, it writes no data)."
    ));
    notes.push(
        "Both sides share this machine: the controller and the hosts (containers, reached over veth) for \
         convoy; sshd and rsync on 127.0.0.1 for rsync. The full stage is the agent's stage step of a \
         first release (download, unpack while it arrives, verify, syncfs); scp + tar xzf is a copy to a \
         new file over ssh, then tar into a new directory and a sync of its file system."
            .to_owned(),
    );
    Ok(Section {
        key: "delta",
        title: format!(
            "8. How releases travel: delta updates, zstd, fan-out ({} tree)",
            mib(size)
        ),
        command: format!(
            "scripts/bench delta --size {}MiB --fanout-hosts {fanout_hosts} --fanout-size {}MiB --runs {runs}",
            size >> 20,
            fanout_size >> 20
        ),
        header: vec!["figure", "convoy", "side by side", "goal"],
        rows,
        notes,
    })
}
