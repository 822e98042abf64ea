//! Unpacking a release: the agent's extractor (every entry checked, see
//! `convoy_common::archive`) on a tar.gz and on a tar.zst of the same
//! tree, beside GNU `tar xzf` on the tar.gz, in the same run: one tree of
//! many small files, one of a few large ones.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::fixture;
use crate::report::{mbps, median, Section};

/// Builds (once, cached under target/bench) a tar.gz and a tar.zst of
/// the same tree of about `size` bytes of files of `file_size` bytes each.
fn archive(size: u64, file_size: u64) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("unpack-v2-{size}-{file_size}.tar.gz"));
    let zst = dir.join(format!("unpack-v2-{size}-{file_size}.tar.zst"));
    if out.exists() && zst.exists() {
        return Ok((out, zst));
    }
    eprintln!("unpack: building {}", out.display());
    let tree = tempfile::tempdir_in(&dir)?;
    let n = size.div_ceil(file_size);
    // Every file different, text-like: gzip shrinks it about 2:1.
    for i in 0..n {
        let sub = tree.path().join(format!("d{:03}", i % 256));
        std::fs::create_dir_all(&sub)?;
        fixture::compressible(&sub.join(format!("f{i:07}")), file_size, 11 + i)?;
    }
    for (file, how) in [
        (&out, convoy_common::archive::Compression::Gzip),
        (&zst, convoy_common::archive::Compression::Zstd),
    ] {
        let tmp = file.with_extension("tmp");
        convoy_common::archive::pack_dir_as(tree.path(), std::fs::File::create(&tmp)?, how)?;
        std::fs::rename(&tmp, file)?;
    }
    Ok((out, zst))
}

/// Writes back every dirty page, so a timed run does not pay for the
/// previous one's writes.
fn settle() -> anyhow::Result<()> {
    fixture::run(&mut Command::new("sync")).map(drop)
}

fn time_convoy(tgz: &Path, dest: &Path) -> anyhow::Result<f64> {
    let limits = convoy_common::archive::Limits {
        max_entries: 10_000_000,
        max_total_bytes: 1 << 40,
        allow_setid: false,
        max_ratio: None,
    };
    let t = Instant::now();
    // Read as the agent reads it (agent/src/activate.rs).
    let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(tgz)?);
    convoy_common::archive::unpack(reader, dest, &limits)?;
    Ok(t.elapsed().as_secs_f64())
}

fn time_tar(tgz: &Path, dest: &Path) -> anyhow::Result<f64> {
    std::fs::create_dir(dest)?;
    let t = Instant::now();
    fixture::run(Command::new("tar").arg("xzf").arg(tgz).arg("-C").arg(dest))?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn run(size: u64, which: &[String], runs: usize) -> anyhow::Result<Section> {
    let cases = [
        ("small", "many small files (16 KiB each)", 16u64 << 10),
        ("large", "few large files (256 MiB each)", 256 << 20),
    ];
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (key, name, file_size) in cases {
        if !which.iter().any(|w| w == key) {
            continue;
        }
        let (tgz, tzst) = archive(size, file_size.min(size))?;
        let work = tempfile::tempdir_in(tgz.parent().unwrap())?;
        let (mut c, mut z, mut t) = (vec![], vec![], vec![]);
        for r in 0..runs {
            eprintln!("unpack: {name}, run {}/{runs}", r + 1);
            // Each side starts with nothing left to write back from the
            // other (the tree it wrote, then its removal), and they take
            // turns going first.
            // 0: convoy on the tar.gz, 1: convoy on the tar.zst, 2: tar xzf.
            let mut sides = [0usize, 1, 2];
            sides.rotate_left(r % 3);
            for side in sides {
                settle()?;
                let d = work.path().join(format!("side{side}-{r}"));
                match side {
                    0 => c.push(time_convoy(&tgz, &d)?),
                    1 => z.push(time_convoy(&tzst, &d)?),
                    _ => t.push(time_tar(&tgz, &d)?),
                }
                std::fs::remove_dir_all(&d)?;
            }
        }
        let (c, z, t) = (median(c), median(z), median(t));
        let gz = std::fs::metadata(&tgz)?.len();
        let zs = std::fs::metadata(&tzst)?.len();
        rows.push(vec![
            name.to_owned(),
            format!("{} MiB / {} MiB → {} MiB", gz >> 20, zs >> 20, size >> 20),
            format!("{c:.2} s ({:.0} MB/s)", mbps(size, c)),
            format!("{z:.2} s ({:.0} MB/s)", mbps(size, z)),
            format!("{t:.2} s ({:.0} MB/s)", mbps(size, t)),
            format!("{:.2}x / {:.2}x", t / c, t / z),
        ]);
        notes.push(format!(
            "{name}: convoy {c:.2} s (gzip), {z:.2} s (zstd), tar {t:.2} s."
        ));
    }
    Ok(Section {
        key: "unpack",
        title: format!("2. Unpack a {} MiB tar.gz or tar.zst", size >> 20),
        command: format!(
            "scripts/bench unpack --size {}MiB --cases {} --runs {runs}",
            size >> 20,
            which.join(",")
        ),
        header: vec![
            "archive",
            "gzip / zstd → tree",
            "convoy, tar.gz",
            "convoy, tar.zst",
            "GNU tar xzf",
            "speed vs tar (gz / zst)",
        ],
        rows,
        notes: vec![
            "Each unpacks the same tree (gzip level 6, zstd level 3 with a content checksum) into a new directory on the same file system, warm page cache. \
             Before each timed unpack, `sync` writes back what the previous one left dirty, and the three take \
             turns going first; no side syncs what it writes, so all are timed to the page cache. convoy's extractor checks every entry (paths, links, types, modes, limits) and is the code the \
             agent runs; `tar xzf` checks nothing. \"speed vs tar\" above 1 means convoy is faster."
                .into(),
            notes.join(" "),
        ],
    })
}
