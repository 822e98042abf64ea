//! Fuzzes safe extraction: any tar (gzipped here, so the fuzzer works on
//! tar structure rather than on gzip checksums) either unpacks or is
//! refused, and never leaves anything outside the destination: no entry
//! beside it, no symlink inside it that resolves outside it.
#![no_main]

use std::fs;
use std::io::Write;
use std::path::{Component, Path};

use convoy_common::archive::{unpack, Limits};
use libfuzzer_sys::fuzz_target;

fn link_stays_inside(root: &Path, link: &Path) -> bool {
    let target = fs::read_link(link).unwrap();
    if target.is_absolute() {
        return false;
    }
    let mut depth = link.parent().unwrap().strip_prefix(root).unwrap().components().count() as i64;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

fn check_tree(root: &Path, dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        assert!(t.is_dir() || t.is_file() || t.is_symlink(), "special file {:?}", e.path());
        if t.is_symlink() {
            assert!(link_stays_inside(root, &e.path()), "escaping link {:?}", e.path());
        } else if t.is_dir() {
            check_tree(root, &e.path());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(data).unwrap();
    let archive = gz.finish().unwrap();
    let sandbox = tempfile::tempdir().unwrap();
    let dest = sandbox.path().join("release");
    let limits = Limits { max_entries: 256, max_total_bytes: 1 << 20, allow_setid: false };
    let result = unpack(&archive[..], &dest, &limits);
    let beside: Vec<_> = fs::read_dir(sandbox.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(beside.iter().all(|n| n == "release"), "wrote beside the destination: {beside:?}");
    if dest.exists() {
        check_tree(&dest, &dest);
    }
    let _ = result;
});
