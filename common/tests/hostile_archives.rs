//! The hostile-archive corpus: each archive is refused with a precise error
//! and nothing is written outside the extraction directory.
//!
//! `cargo test -p convoy-common --test hostile_archives -- --nocapture`
//! prints the table of cases and errors.

use std::fs;
use std::io::Write;
use std::path::Path;

use std::collections::HashMap;

use convoy_common::archive::{self, unpack, ArchiveError, Limits, UnpackStats};
use convoy_common::manifest::{kind, Manifest, ManifestEntry};
use convoy_common::Digest;
use flate2::write::GzEncoder;
use tar::{EntryType, Header};

/// One raw tar entry; names and link targets are written byte for byte, so
/// the archive can say anything a hostile one could.
struct E {
    kind: EntryType,
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    data: Vec<u8>,
}

fn file(name: &str, data: &str) -> E {
    E {
        kind: EntryType::Regular,
        name: name.into(),
        link: vec![],
        mode: 0o644,
        data: data.into(),
    }
}
fn dir(name: &str) -> E {
    E {
        kind: EntryType::Directory,
        name: name.into(),
        link: vec![],
        mode: 0o755,
        data: vec![],
    }
}
fn symlink(name: &str, target: &str) -> E {
    E {
        kind: EntryType::Symlink,
        name: name.into(),
        link: target.into(),
        mode: 0o777,
        data: vec![],
    }
}
fn hardlink(name: &str, target: &str) -> E {
    E {
        kind: EntryType::Link,
        name: name.into(),
        link: target.into(),
        mode: 0o644,
        data: vec![],
    }
}
fn special(name: &str, kind: EntryType) -> E {
    E {
        kind,
        name: name.into(),
        link: vec![],
        mode: 0o644,
        data: vec![],
    }
}
fn with_mode(mut e: E, mode: u32) -> E {
    e.mode = mode;
    e
}

fn raw_header(e: &E) -> Header {
    let mut h = Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = e.name.len().min(100);
        old.name[..n].copy_from_slice(&e.name[..n]);
        let l = e.link.len().min(100);
        old.linkname[..l].copy_from_slice(&e.link[..l]);
    }
    h.set_entry_type(e.kind);
    h.set_mode(e.mode);
    h.set_size(e.data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(raw_header(e).as_bytes());
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// A GNU long-name entry ('L') carrying `name`, followed by `e`.
fn long_name(name: &str, mut e: E) -> Vec<E> {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    e.name = b"placeholder".to_vec();
    vec![
        E {
            kind: EntryType::GNULongName,
            name: b"././@LongLink".to_vec(),
            link: vec![],
            mode: 0o644,
            data: n,
        },
        e,
    ]
}

/// A PAX extended header ('x') setting `key=value`, followed by `e`.
fn pax(key: &str, value: &str, e: E) -> Vec<E> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len();
    len += len.to_string().len();
    let rec = format!("{len}{body}");
    vec![
        E {
            kind: EntryType::XHeader,
            name: b"pax".to_vec(),
            link: vec![],
            mode: 0o644,
            data: rec.into(),
        },
        e,
    ]
}

/// Unpacks `archive` and checks the error and that nothing escaped.
fn check(case: &str, archive: Vec<u8>, limits: Limits, expect: &str) {
    let sandbox = tempfile::tempdir().unwrap();
    let dest = sandbox.path().join("staging").join("release");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    refused(
        case,
        "archive",
        unpack(&archive[..], &dest, &limits),
        sandbox.path(),
        expect,
    );
}

/// Checks that a hostile archive or manifest was refused with `expect`
/// and wrote nothing outside `staging/release` in `sandbox`.
fn refused(case: &str, what: &str, built: Result<UnpackStats, ArchiveError>, sandbox: &Path, expect: &str) {
    let err = match built {
        Ok(stats) => panic!("{case}: hostile {what} was accepted ({stats:?})"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(expect), "{case}: error {err:?} should contain {expect:?}");
    // Nothing beside the destination, in the sandbox.
    let names = |dir: &Path| -> Vec<_> { fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect() };
    assert_eq!(names(sandbox), vec!["staging"], "{case}: wrote outside staging");
    let staging = names(&sandbox.join("staging"));
    assert!(
        staging.iter().all(|n| n == "release"),
        "{case}: wrote beside the release dir: {staging:?}"
    );
    println!("| {case} | `{err}` |");
}

fn zstd(data: &[u8]) -> Vec<u8> {
    let mut z = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    z.include_checksum(true).unwrap();
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

/// Each hostile tree is refused the same way, gzip- or zstd-compressed,
/// and as a manifest (its twin: the same entries, each file by sha256).
fn check_entries(case: &str, entries: Vec<E>, expect: &str) {
    let tar = tar_bytes(&entries);
    check(case, gzip(&tar), Limits::default(), expect);
    check(&format!("{case} (zstd)"), zstd(&tar), Limits::default(), expect);
    // A manifest has no kind for devices or FIFOs: its twin of one is an
    // entry of a kind this host does not know.
    let special = entries
        .iter()
        .any(|e| matches!(e.kind, EntryType::Char | EntryType::Block | EntryType::Fifo));
    let expect = if special {
        "unknown entries are not allowed"
    } else {
        expect
    };
    check_manifest(
        &format!("{case} (manifest)"),
        &twin(&entries),
        Limits::default(),
        expect,
    );
}

/// The manifest twin of a raw entry list: GNU long names and PAX headers
/// apply to the entry after them, as a tar reader applies them.
fn twin(entries: &[E]) -> Twin {
    let mut out = Vec::new();
    let mut contents = HashMap::new();
    let (mut name, mut link): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    for e in entries {
        match e.kind {
            EntryType::GNULongName => {
                name = Some(e.data.iter().copied().take_while(|b| *b != 0).collect());
                continue;
            }
            EntryType::XHeader => {
                let rec = String::from_utf8(e.data.clone()).unwrap();
                let (_, kv) = rec.trim_end().split_once(' ').unwrap();
                let (k, v) = kv.split_once('=').unwrap();
                match k {
                    "path" => name = Some(v.into()),
                    "linkpath" => link = Some(v.into()),
                    _ => {}
                }
                continue;
            }
            _ => {}
        }
        let kind = match e.kind {
            EntryType::Directory => kind::DIR,
            EntryType::Regular => kind::FILE,
            EntryType::Symlink => kind::SYMLINK,
            EntryType::Link => kind::HARDLINK,
            _ => 99,
        };
        out.push(ManifestEntry {
            path: name.take().unwrap_or_else(|| e.name.clone()),
            kind,
            mode: e.mode,
            size: e.data.len() as u64,
            sha256: if kind == kind::FILE {
                let sha = Digest::of_bytes(&e.data).as_bytes().to_vec();
                contents.insert(sha.clone(), e.data.clone());
                sha
            } else {
                vec![]
            },
            link: link.take().unwrap_or_else(|| e.link.clone()),
        });
    }
    Twin {
        manifest: Manifest {
            format: convoy_common::manifest::FORMAT,
            entries: out,
        },
        contents,
    }
}

/// A manifest and the contents its files name.
struct Twin {
    manifest: Manifest,
    contents: HashMap<Vec<u8>, Vec<u8>>,
}

/// Builds `m` as delta staging does, each file's bytes coming from
/// `content` (by sha256), and checks the error and that nothing escaped.
fn check_manifest_with(
    case: &str,
    m: &Manifest,
    limits: Limits,
    content: &dyn Fn(&ManifestEntry) -> Vec<u8>,
    expect: &str,
) {
    let sandbox = tempfile::tempdir().unwrap();
    let dest = sandbox.path().join("staging").join("release");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let built = archive::apply_manifest(m, &dest, &limits, |e, at| {
        let data = content(e);
        let mut f = convoy_common::archive::create_file(at)?;
        f.write_all(&data)?;
        Ok((data.len() as u64, Digest::of_bytes(&data)))
    });
    refused(case, "manifest", built, sandbox.path(), expect);
}

/// Each file's content is what its entry's sha256 was made from.
fn check_manifest(case: &str, t: &Twin, limits: Limits, expect: &str) {
    let honest = |e: &ManifestEntry| t.contents.get(&e.sha256).cloned().unwrap_or_default();
    check_manifest_with(case, &t.manifest, limits, &honest, expect);
}

#[test]
fn hostile_corpus_is_refused() {
    use EntryType::*;
    println!("| case | error |\n| --- | --- |");
    check_entries(
        "absolute path",
        vec![file("/etc/cron.d/evil", "x")],
        "absolute paths are not allowed",
    );
    check_entries(
        "parent dir",
        vec![file("../evil", "x")],
        "'..' components are not allowed",
    );
    check_entries(
        "nested parent dir",
        vec![dir("a/"), file("a/../../evil", "x")],
        "'..' components are not allowed",
    );
    check_entries(
        "symlink escaping with ..",
        vec![symlink("link", "../../etc")],
        "escapes the release root",
    );
    check_entries(
        "symlink to absolute path",
        vec![symlink("link", "/etc/passwd")],
        "escapes the release root",
    );
    check_entries(
        "deep symlink escaping",
        vec![dir("a/"), dir("a/b/"), symlink("a/b/l", "../../../x")],
        "escapes the release root",
    );
    check_entries(
        "write through inner symlink",
        vec![dir("sub/"), symlink("link", "sub"), file("link/evil", "x")],
        "would be written through the symlink",
    );
    check_entries(
        "write through a symlink to the root",
        vec![symlink("l", "."), file("l/x", "x")],
        "would be written through the symlink",
    );
    check_entries(
        "hard link to absolute path",
        vec![hardlink("h", "/etc/shadow")],
        "hard link target",
    );
    check_entries(
        "hard link with ..",
        vec![hardlink("h", "../outside")],
        "hard link target",
    );
    check_entries(
        "hard link to a later entry",
        vec![hardlink("h", "later"), file("later", "x")],
        "hard link target",
    );
    check_entries(
        "hard link to a symlink",
        vec![symlink("s", "f"), hardlink("h", "s")],
        "hard link target",
    );
    check_entries(
        "character device",
        vec![special("dev", Char)],
        "character device entries are not allowed",
    );
    check_entries(
        "block device",
        vec![special("sda", Block)],
        "block device entries are not allowed",
    );
    check_entries("fifo", vec![special("pipe", Fifo)], "FIFO entries are not allowed");
    check_entries(
        "setuid file",
        vec![with_mode(file("su", "x"), 0o4755)],
        "setuid/setgid bits",
    );
    check_entries(
        "setgid directory",
        vec![with_mode(dir("d/"), 0o2755)],
        "setuid/setgid bits",
    );
    check_entries("duplicate entry", vec![file("a", "1"), file("a", "2")], "appears twice");
    check_entries(
        "duplicate via ./",
        vec![file("a", "1"), file("./a", "2")],
        "appears twice",
    );
    check_entries(
        "file used as a directory",
        vec![file("a", "1"), file("a/b", "2")],
        "is not a directory in the archive",
    );
    check_entries("empty name", vec![file("", "x")], "empty path");
    let long = format!("{}/../../../../etc/evil", "a".repeat(120));
    check_entries(
        "GNU long name with ..",
        long_name(&long, file("x", "x")),
        "'..' components are not allowed",
    );
    check_entries(
        "PAX path that is absolute",
        pax("path", "/etc/evil", file("x", "x")),
        "absolute paths are not allowed",
    );
    check_entries(
        "PAX linkpath escaping",
        pax("linkpath", "../../../etc", symlink("l", "ok")),
        "escapes the release root",
    );

    let many: Vec<E> = (0..11).map(|i| file(&format!("f{i}"), "x")).collect();
    let ten = || Limits {
        max_entries: 10,
        ..Limits::default()
    };
    check(
        "too many entries",
        gzip(&tar_bytes(&many)),
        ten(),
        "more than 10 entries",
    );
    check_manifest(
        "too many entries (manifest)",
        &twin(&many),
        ten(),
        "more than 10 entries",
    );
    let big = [file("big", &"x".repeat(5000))];
    let small = || Limits {
        max_total_bytes: 4096,
        ..Limits::default()
    };
    check("too large", gzip(&tar_bytes(&big)), small(), "more than 4096 bytes");
    check_manifest("too large (manifest)", &twin(&big), small(), "more than 4096 bytes");
    check(
        "neither gzip nor zstd (a zip)",
        b"PK\x03\x04 this is a zip".to_vec(),
        Limits::default(),
        "starts with neither the gzip nor the zstd magic bytes",
    );
    let good = gzip(&tar_bytes(&[file("a", &"y".repeat(100_000))]));
    check(
        "truncated",
        good[..good.len() / 2].to_vec(),
        Limits::default(),
        "entry \"a\"",
    );
}

/// An archive that expands a thousandfold is refused by its ratio, and
/// one over the spec's size by its size, before the bytes are written.
#[test]
fn bombs_are_refused_by_ratio_and_size() {
    use convoy_common::archive::Ratio;
    println!("| case | error |\n| --- | --- |");
    let zeros = "\0".repeat(4 << 20);
    let bomb = gzip(&tar_bytes(&[file("zeros", &zeros)]));
    let compressed = bomb.len() as u64;
    assert!(4u64 << 20 > 200 * compressed, "the test archive expands more than 200x");
    let ratio = |max| Limits {
        max_ratio: Some(Ratio { max, compressed }),
        ..Limits::default()
    };
    check("expands over 200x", bomb.clone(), ratio(200), "more than 200 times its");
    // Control case: allowed a high enough ratio, the same archive unpacks.
    let dir = tempfile::tempdir().unwrap();
    unpack(&bomb[..], &dir.path().join("r"), &ratio(u32::MAX)).expect("within the ratio");
    check(
        "over max_unpacked_size",
        bomb,
        Limits {
            max_total_bytes: 1 << 20,
            ..Limits::default()
        },
        "more than 1048576 bytes",
    );
}

/// What both compressions refuse alike: bytes after the compressed stream
/// (`end` names it) and data hidden after the tar end marker inside it.
/// Returns the tar and the control archive, which unpacks.
fn extended_streams(format: &str, end: &str, compress: fn(&[u8]) -> Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let tar = tar_bytes(&[file("a", &"z".repeat(20_000)), file("b", "bee")]);
    let good = compress(&tar);
    unpack(
        &good[..],
        &tempfile::tempdir().unwrap().path().join("r"),
        &Limits::default(),
    )
    .expect("the control archive unpacks");
    let mut garbage_after = good.clone();
    garbage_after.extend_from_slice(b"#!/bin/sh\nrm -rf /\n");
    check(
        &format!("garbage after the {end}"),
        garbage_after,
        Limits::default(),
        &format!("bytes after the end of the {end}"),
    );
    let mut hidden = tar.clone();
    hidden.extend_from_slice(b"a second payload the extractor never looks at");
    check(
        &format!("data after the tar end marker ({format})"),
        compress(&hidden),
        Limits::default(),
        &format!("non-zero bytes inside the {format} stream"),
    );
    (tar, good)
}

/// The gzip layer: what follows the tar end-of-archive marker must be
/// the stream's own trailer, whole and right, and nothing else.
#[test]
fn corrupt_or_extended_streams_are_refused() {
    println!("| case | error |\n| --- | --- |");
    let (_, good) = extended_streams("gzip", "gzip stream", gzip);
    let n = good.len();
    // gzip ends with CRC32 (4 bytes) and the length mod 2^32 (4 bytes).
    let mut bad_crc = good.clone();
    bad_crc[n - 8] ^= 0xff;
    check(
        "CRC does not match",
        bad_crc,
        Limits::default(),
        "checksum or length trailer fails",
    );
    let mut bad_len = good.clone();
    bad_len[n - 2] ^= 0x01;
    check(
        "length does not match",
        bad_len,
        Limits::default(),
        "checksum or length trailer fails",
    );
    check(
        "trailer cut off",
        good[..n - 8].to_vec(),
        Limits::default(),
        "checksum or length trailer fails or is missing",
    );
    check(
        "trailer half there",
        good[..n - 3].to_vec(),
        Limits::default(),
        "checksum or length trailer fails or is missing",
    );
    // Truncated anywhere in the compressed data: in an entry, between
    // entries, in the end marker, in the deflate stream's last block.
    for cut in [10, n / 4, n / 2, n - 40, n - 12, n - 9] {
        check(
            &format!("truncated at byte {cut} of {n}"),
            good[..cut].to_vec(),
            Limits::default(),
            "incomplete deflate stream",
        );
    }
}

#[test]
fn corrupt_or_extended_zstd_streams_are_refused() {
    println!("| case | error |\n| --- | --- |");
    let (tar, good) = extended_streams("zstd", "zstd frame", zstd);
    let n = good.len();
    // A frame with a content checksum ends with its 4 bytes.
    let mut bad_sum = good.clone();
    bad_sum[n - 2] ^= 0xff;
    check(
        "content checksum does not match (zstd)",
        bad_sum,
        Limits::default(),
        "does not end whole",
    );
    let mut second = good.clone();
    second.extend_from_slice(&zstd(b"a second frame"));
    check(
        "a second frame after the first",
        second,
        Limits::default(),
        "bytes after the end of the zstd frame",
    );
    for cut in [10, n / 2, n - 5, n - 1] {
        check(
            &format!("zstd truncated at byte {cut} of {n}"),
            good[..cut].to_vec(),
            Limits::default(),
            "archive is corrupt",
        );
    }
    check(
        "neither gzip nor zstd",
        tar.clone(),
        Limits::default(),
        "starts with neither the gzip nor the zstd magic bytes",
    );
}

#[test]
fn setuid_is_kept_when_the_spec_allows_it() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = tempfile::tempdir().unwrap();
    let dest = sandbox.path().join("r");
    let archive = gzip(&tar_bytes(&[with_mode(file("su", "x"), 0o4755)]));
    unpack(
        &archive[..],
        &dest,
        &Limits {
            allow_setid: true,
            ..Limits::default()
        },
    )
    .unwrap();
    assert_eq!(
        fs::metadata(dest.join("su")).unwrap().permissions().mode() & 0o7777,
        0o4755
    );
}

#[test]
fn links_inside_the_release_are_fine() {
    let sandbox = tempfile::tempdir().unwrap();
    let dest = sandbox.path().join("r");
    let archive = gzip(&tar_bytes(&[
        dir("a/"),
        file("a/f", "data"),
        symlink("cur", "a/f"),
        hardlink("h", "a/f"),
        symlink("a/up", "../cur"),
    ]));
    let stats = unpack(&archive[..], &dest, &Limits::default()).unwrap();
    assert_eq!(stats.files, 2);
    assert_eq!(fs::read(dest.join("h")).unwrap(), b"data");
    assert_eq!(fs::read(dest.join("cur")).unwrap(), b"data");
}

/// What only a manifest can lie about: a file's bytes (tampered content,
/// a wrong size), its own encoding, its format, its length; and the
/// ratio bound, which holds for a manifest against its artifact's size.
#[test]
fn manifests_that_lie_are_refused() {
    use convoy_common::archive::Ratio;
    println!("| case | error |\n| --- | --- |");
    let t = twin(&[dir("bin/"), file("bin/app", "#!/bin/sh\necho ok\n")]);
    check_manifest_with(
        "tampered content",
        &t.manifest,
        Limits::default(),
        &|_| b"#!/bin/sh\nrm -rf /\n".to_vec(),
        "its content is not what the manifest says",
    );
    let mut short = t.manifest.clone();
    short.entries[1].size -= 1;
    check_manifest(
        "size that does not match the content",
        &Twin {
            manifest: short,
            contents: t.contents.clone(),
        },
        Limits::default(),
        "its content is not what the manifest says",
    );
    let mut no_sha = t.manifest.clone();
    no_sha.entries[1].sha256.clear();
    check_manifest(
        "file without a sha256",
        &Twin {
            manifest: no_sha,
            contents: t.contents.clone(),
        },
        Limits::default(),
        "a file entry without a sha256",
    );
    let zeros = twin(&[file("zeros", &"\0".repeat(1 << 20))]);
    let ratio = Limits {
        max_ratio: Some(Ratio {
            max: 100,
            compressed: 1000,
        }),
        ..Limits::default()
    };
    check_manifest(
        "expands over 100x its artifact",
        &zeros,
        ratio,
        "more than 100 times its",
    );

    let bytes = t.manifest.encode();
    let err = Manifest::decode(&bytes[..bytes.len() - 3], 100)
        .unwrap_err()
        .to_string();
    assert!(err.contains("manifest is corrupt"), "{err}");
    println!("| truncated manifest | `{err}` |");
    let mut future = t.manifest.clone();
    future.format = 2;
    let err = Manifest::decode(&future.encode(), 100).unwrap_err().to_string();
    assert!(err.contains("format 2 is not one this host reads"), "{err}");
    println!("| unknown format | `{err}` |");
    let err = Manifest::decode(&bytes, 1).unwrap_err().to_string();
    assert!(err.contains("more than 1 entries"), "{err}");
    println!("| more entries than the host allows | `{err}` |");

    // Control case: the honest manifest builds the tree a full unpack makes.
    let entries = || {
        vec![
            dir("a/"),
            file("a/f", "data"),
            symlink("cur", "a/f"),
            hardlink("h", "a/f"),
            symlink("a/up", "../cur"),
        ]
    };
    let sandbox = tempfile::tempdir().unwrap();
    let (full, delta) = (sandbox.path().join("full"), sandbox.path().join("delta"));
    let unpacked = unpack(&gzip(&tar_bytes(&entries()))[..], &full, &Limits::default()).unwrap();
    let t = twin(&entries());
    assert_eq!(unpacked.manifest.digest(), {
        let mut m = t.manifest.clone();
        // The archive's manifest names clean paths.
        m.entries[0].path = b"a".to_vec();
        // A hard link has the mode of the file it names.
        m.entries[3].mode = 0;
        m.digest()
    });
    archive::apply_manifest(&t.manifest, &delta, &Limits::default(), |e, at| {
        let data = &t.contents[&e.sha256];
        convoy_common::archive::create_file(at)?.write_all(data)?;
        Ok((data.len() as u64, Digest::of_bytes(data)))
    })
    .unwrap();
    for p in ["a/f", "h", "cur"] {
        assert_eq!(fs::read(full.join(p)).unwrap(), fs::read(delta.join(p)).unwrap(), "{p}");
    }
    assert_eq!(fs::read_link(delta.join("a/up")).unwrap(), Path::new("../cur"));
}
