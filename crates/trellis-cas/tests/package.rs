//! Packing and unpacking directories: determinism, fidelity, and refusal of
//! anything that could escape the destination or leave a partial result.

#![cfg(unix)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use trellis_cas::{
    ArtifactKind, CasError, ChunkStore, Digest, Durability, PackSummary, pack_dir, unpack,
};

// ---------------------------------------------------------------------------
// Helpers

/// What a tree looks like, as far as a package is concerned.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File { content: Vec<u8>, exec: bool },
    Symlink(PathBuf),
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).unwrap();
            let node = if meta.file_type().is_symlink() {
                Node::Symlink(fs::read_link(&path).unwrap())
            } else if meta.is_dir() {
                pending.push(rel.clone());
                Node::Dir
            } else {
                Node::File {
                    content: fs::read(&path).unwrap(),
                    exec: meta.permissions().mode() & 0o111 != 0,
                }
            };
            out.insert(rel, node);
        }
    }
    out
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn set_mtime(path: &Path, secs: u64) {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    // Opening read-only is enough to set times on something we own, and
    // works for directories too.
    File::open(path).unwrap().set_modified(t).unwrap();
}

/// A tree with a bit of everything a package may hold.
fn build_tree(root: &Path, file_mode: u32, exec_mode: u32) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("lib/python3/site")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
    chmod(&root.join("bin/app"), exec_mode);
    fs::write(root.join("README"), b"read me\n").unwrap();
    chmod(&root.join("README"), file_mode);
    fs::write(root.join("lib/python3/site/mod.py"), vec![b'x'; 100_000]).unwrap();
    chmod(&root.join("lib/python3/site/mod.py"), file_mode);
    fs::write(root.join("lib/empty-file"), b"").unwrap();
    chmod(&root.join("lib/empty-file"), file_mode);
    // Names that sort differently by bytes than by components or locale.
    fs::write(root.join("a-b"), b"dash").unwrap();
    chmod(&root.join("a-b"), file_mode);
    fs::create_dir(root.join("a")).unwrap();
    fs::write(root.join("a/b"), b"slash").unwrap();
    chmod(&root.join("a/b"), file_mode);
    fs::write(root.join("B"), b"upper").unwrap();
    chmod(&root.join("B"), file_mode);
    // Longer than the 100 bytes a plain tar header holds.
    let long = "d".repeat(120);
    fs::create_dir(root.join(&long)).unwrap();
    fs::write(root.join(&long).join("f".repeat(150)), b"long").unwrap();
    chmod(&root.join(&long).join("f".repeat(150)), file_mode);
    // A name that is not UTF-8.
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9");
    fs::write(root.join(odd), b"latin-1").unwrap();
    chmod(&root.join(odd), file_mode);
    // Symlinks that stay inside.
    symlink("app", root.join("bin/app-link")).unwrap();
    symlink("../lib/python3/site/mod.py", root.join("bin/mod")).unwrap();
    symlink("lib", root.join("lib-dir")).unwrap();
    symlink(
        format!("{long}/{}", "f".repeat(150)),
        root.join("long-link"),
    )
    .unwrap();
    symlink("missing-but-inside", root.join("dangling")).unwrap();
}

fn pack_to_vec(dir: &Path) -> (Vec<u8>, PackSummary) {
    let mut out = Vec::new();
    let summary = pack_dir(dir, &mut out).unwrap();
    (out, summary)
}

fn entries_of(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------
// Packing

#[test]
fn pack_then_unpack_reproduces_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src, 0o644, 0o755);
    let (package, summary) = pack_to_vec(&src);
    let tree = snapshot(&src);
    let file_sizes: Vec<usize> = tree
        .values()
        .filter_map(|n| match n {
            Node::File { content, .. } => Some(content.len()),
            _ => None,
        })
        .collect();
    assert_eq!(summary.files, 9);
    assert_eq!(file_sizes.len(), 9);
    assert_eq!(summary.bytes, file_sizes.iter().sum::<usize>() as u64);
    assert_eq!(summary.dirs, 7);
    assert_eq!(summary.symlinks, 5);

    let dest = tmp.path().join("out/pkg");
    unpack(package.as_slice(), &dest).unwrap();
    assert_eq!(snapshot(&dest), tree);
}

#[test]
fn packing_twice_gives_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src, 0o644, 0o755);
    let (first, _) = pack_to_vec(&src);
    let (second, _) = pack_to_vec(&src);
    assert!(first == second, "two packs of the same tree differ");
}

#[test]
fn times_permissions_and_creation_order_do_not_change_the_package() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    build_tree(&a, 0o644, 0o755);
    let (package_a, _) = pack_to_vec(&a);

    // Same content built later, with other mtimes, a stricter umask's modes
    // and other exec bits, in a different order.
    let b = tmp.path().join("b");
    fs::create_dir(&b).unwrap();
    fs::write(b.join("zzz-created-first"), b"temp").unwrap();
    build_tree(&b, 0o600, 0o700);
    fs::remove_file(b.join("zzz-created-first")).unwrap();
    for (i, rel) in ["README", "bin/app", "bin", "lib", "", "a/b", "empty"]
        .iter()
        .enumerate()
    {
        set_mtime(&b.join(rel), 1_000_000 + i as u64 * 7_777);
    }
    let (package_b, _) = pack_to_vec(&b);
    assert!(package_a == package_b, "equal trees packed differently");

    // Changing only times on the first tree changes nothing either.
    set_mtime(&a.join("README"), 42);
    set_mtime(&a.join("lib"), 43);
    assert!(pack_to_vec(&a).0 == package_a);

    // But content does.
    fs::write(a.join("README"), b"read me!\n").unwrap();
    assert!(pack_to_vec(&a).0 != package_a);
}

/// The tar layout is the package format: if this digest changes, every
/// existing package gets a new digest. Change it only on purpose. (The
/// compressed bytes also depend on the zstd version, so the check is on the
/// decompressed stream.)
#[test]
fn tar_layout_is_stable() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/run"), b"#!/bin/sh\n").unwrap();
    chmod(&src.join("bin/run"), 0o755);
    fs::write(src.join("config"), b"x=1\n").unwrap();
    chmod(&src.join("config"), 0o644);
    symlink("bin/run", src.join("start")).unwrap();
    let (package, _) = pack_to_vec(&src);

    // A plain tar stream: artifacts are compressed chunk by chunk.
    let tar_bytes = package.clone();
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let listing: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            format!(
                "{:?} {} {:o} {} {} {} {:?} {:?}",
                h.entry_type(),
                String::from_utf8_lossy(&e.path_bytes()),
                h.mode().unwrap(),
                h.mtime().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.username().unwrap(),
                e.link_name().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listing,
        [
            "Directory bin/ 755 0 0 0 Some(\"\") None",
            "Regular bin/run 755 0 0 0 Some(\"\") None",
            "Regular config 644 0 0 0 Some(\"\") None",
            "Symlink start 777 0 0 0 Some(\"\") Some(\"bin/run\")",
        ]
    );
    assert_eq!(
        Digest::of(&tar_bytes).as_hex(),
        "a25d750ad225c13321fb539abfa37efb1d9231b679bc44ea93a22a9db69c70be"
    );
}

#[test]
fn exec_bit_survives_pack_and_unpack() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("tool"), b"bin").unwrap();
    chmod(&src.join("tool"), 0o700);
    fs::write(src.join("group-exec"), b"bin").unwrap();
    chmod(&src.join("group-exec"), 0o610);
    fs::write(src.join("data"), b"data").unwrap();
    chmod(&src.join("data"), 0o600);
    fs::write(src.join("setuid"), b"bin").unwrap();
    chmod(&src.join("setuid"), 0o4777);
    chmod(&src.join("dir"), 0o700);

    let (package, _) = pack_to_vec(&src);
    let dest = tmp.path().join("dest");
    unpack(package.as_slice(), &dest).unwrap();
    assert_eq!(mode_of(&dest), 0o755);
    assert_eq!(mode_of(&dest.join("tool")), 0o755);
    assert_eq!(mode_of(&dest.join("group-exec")), 0o755);
    assert_eq!(mode_of(&dest.join("data")), 0o644);
    assert_eq!(mode_of(&dest.join("setuid")), 0o755);
    assert_eq!(mode_of(&dest.join("dir")), 0o755);
}

#[test]
fn packing_a_socket_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("ok"), b"ok").unwrap();
    let sock = src.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();

    let err = pack_dir(&src, Vec::new()).unwrap_err();
    assert!(
        matches!(&err, CasError::UnsupportedFile { path, kind: "socket", .. } if *path == sock),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{} is a socket", sock.display())),
        "{msg}"
    );
    assert!(
        msg.contains("only files, directories and symlinks"),
        "{msg}"
    );
}

#[test]
fn packing_refuses_symlinks_leaving_the_directory() {
    for (target, why) in [
        ("/etc/passwd", "absolute"),
        ("../outside", "out of the package"),
        ("sub/../../outside", "after a name"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        let link = src.join("link");
        symlink(target, &link).unwrap();
        let err = pack_dir(&src, Vec::new()).unwrap_err();
        assert!(
            matches!(&err, CasError::SymlinkEscapes { path, .. } if *path == link),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(why), "{msg}");
        assert!(msg.contains(&link.display().to_string()), "{msg}");
    }
}

#[test]
fn packing_something_that_is_not_a_directory_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        pack_dir(&file, Vec::new()),
        Err(CasError::NotADirectory { .. })
    ));
    assert!(matches!(
        pack_dir(&tmp.path().join("missing"), Vec::new()),
        Err(CasError::Io { .. })
    ));
}

#[test]
fn packing_an_empty_directory_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let (package, summary) = pack_to_vec(&src);
    assert_eq!(summary, PackSummary::default());
    let dest = tmp.path().join("dest");
    unpack(package.as_slice(), &dest).unwrap();
    assert!(snapshot(&dest).is_empty());
}

#[test]
fn packages_go_into_the_chunk_store_under_one_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src, 0o644, 0o755);
    let store = ChunkStore::open(&tmp.path().join("store"), Durability::Synced).unwrap();

    let (first, _) = pack_to_vec(&src);
    let (second, _) = pack_to_vec(&src);
    let first = store
        .put_artifact(ArtifactKind::Package, &first[..])
        .unwrap();
    let second = store
        .put_artifact(ArtifactKind::Package, &second[..])
        .unwrap();
    assert_eq!(first.index_digest, second.index_digest);

    let dest = tmp.path().join("run");
    unpack(
        store.open_artifact(&first.index_digest, &first.index),
        &dest,
    )
    .unwrap();
    assert_eq!(snapshot(&dest), snapshot(&src));
}

// ---------------------------------------------------------------------------
// Unpacking hostile or broken input

/// One raw tar entry, written byte by byte so that it can hold what the
/// `tar` crate's builder refuses to write (`..`, absolute paths).
fn raw_entry(path: &[u8], kind: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..path.len()].copy_from_slice(path);
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    header.set_entry_type(tar::EntryType::new(kind));
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn file(path: &str, data: &[u8]) -> Vec<u8> {
    raw_entry(path.as_bytes(), b'0', b"", data)
}

fn dir(path: &str) -> Vec<u8> {
    raw_entry(path.as_bytes(), b'5', b"", b"")
}

fn link(path: &str, target: &str) -> Vec<u8> {
    raw_entry(path.as_bytes(), b'2', target.as_bytes(), b"")
}

/// A complete, compressed package made of `entries`.
fn package(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut tar_bytes: Vec<u8> = entries.concat();
    tar_bytes.extend_from_slice(&[0u8; 1024]);
    zstd::encode_all(tar_bytes.as_slice(), 3).unwrap()
}

/// Unpacks `package` into `<tmp>/area/dest` and checks that it failed
/// without leaving anything in `<tmp>/area` or elsewhere in `<tmp>`.
fn assert_refused(entries: &[Vec<u8>], expect_in_message: &str) -> CasError {
    let tmp = tempfile::tempdir().unwrap();
    let area = tmp.path().join("area");
    fs::create_dir(&area).unwrap();
    let dest = area.join("dest");
    let err = unpack(package(entries).as_slice(), &dest).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(expect_in_message), "{msg}");
    assert!(!dest.exists(), "dest exists after: {msg}");
    assert_eq!(entries_of(&area), Vec::<std::ffi::OsString>::new(), "{msg}");
    assert_eq!(entries_of(tmp.path()), vec!["area"], "{msg}");
    err
}

#[test]
fn unpack_refuses_parent_dir_components() {
    let err = assert_refused(&[file("ok", b"1"), file("../evil", b"x")], "`..`");
    assert!(matches!(err, CasError::UnsafeEntry { .. }));
    assert_refused(&[file("a/../../evil", b"x")], "`..`");
}

#[test]
fn unpack_refuses_absolute_paths() {
    let err = assert_refused(&[file("/tmp/evil", b"x")], "absolute");
    assert!(err.to_string().contains("/tmp/evil"));
}

#[test]
fn unpack_refuses_symlinks_pointing_outside() {
    assert_refused(&[link("etc", "/etc")], "absolute");
    assert_refused(&[link("up", "../outside")], "out of the package");
    assert_refused(
        &[dir("a/"), link("a/up", "../../outside")],
        "out of the package",
    );
    // Looks inside as text, but `s/..` is the parent of wherever `s` is.
    assert_refused(&[link("s", "."), link("t", "s/..")], "after a name");
}

#[test]
fn unpack_refuses_writing_through_a_symlink() {
    // `s` is a harmless link to an inner directory, but a later entry
    // beneath it would be written wherever `s` points.
    assert_refused(
        &[dir("sub/"), link("s", "sub"), file("s/x", b"x")],
        "beneath the symlink",
    );
    // Link to the root, then a path that climbs out of it.
    assert_refused(
        &[dir("a/"), link("a/root", ".."), link("a/root/esc", "../x")],
        "beneath the symlink",
    );
}

#[test]
fn unpack_refuses_hard_links_and_special_files() {
    assert_refused(
        &[file("f", b"x"), raw_entry(b"h", b'1', b"f", b"")],
        "hard link",
    );
    assert_refused(&[raw_entry(b"h", b'1', b"/etc/passwd", b"")], "hard link");
    assert_refused(&[raw_entry(b"fifo", b'6', b"", b"")], "fifo");
    assert_refused(&[raw_entry(b"dev", b'3', b"", b"")], "character device");
}

#[test]
fn unpack_refuses_duplicates() {
    assert_refused(&[file("f", b"1"), file("f", b"2")], "twice");
    assert_refused(&[dir("d/"), link("d", "x")], "twice");
}

#[test]
fn unpack_of_truncated_or_garbage_input_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src, 0o644, 0o755);
    let (package, _) = pack_to_vec(&src);
    let area = tmp.path().join("area");
    fs::create_dir(&area).unwrap();

    for broken in [
        &package[..package.len() / 2],
        &package[..package.len() - 1],
        b"not a package at all".as_slice(),
        b"".as_slice(),
    ] {
        let dest = area.join("dest");
        let err = unpack(broken, &dest).unwrap_err();
        assert!(matches!(err, CasError::InvalidPackage { .. }), "{err:?}");
        assert!(err.to_string().contains("fetch it again"), "{err}");
        assert!(!dest.exists());
        assert_eq!(entries_of(&area), Vec::<std::ffi::OsString>::new());
    }
}

#[test]
fn failing_late_leaves_no_partial_destination() {
    // Plenty of good content is written before the bad entry shows up.
    let mut entries: Vec<Vec<u8>> = (0..50)
        .map(|i| file(&format!("d{}/f{i}", i % 5), &[b'x'; 3000]))
        .collect();
    entries.push(link("bad", "/etc/shadow"));
    assert_refused(&entries, "absolute");
}

#[test]
fn unpack_refuses_an_existing_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), b"mine").unwrap();
    let err = unpack(package(&[file("f", b"x")]).as_slice(), &dest).unwrap_err();
    assert!(matches!(err, CasError::DestinationExists { .. }), "{err:?}");
    assert_eq!(entries_of(&dest), vec!["keep"]);
    assert_eq!(entries_of(tmp.path()), vec!["dest"]);

    // An empty directory is not silently replaced either.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(matches!(
        unpack(package(&[file("f", b"x")]).as_slice(), &empty),
        Err(CasError::DestinationExists { .. })
    ));
}

#[test]
fn unpack_accepts_foreign_conventions_that_are_safe() {
    // Other tar tools start with `./` and may omit directory entries.
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let pkg = package(&[
        dir("./"),
        file("./deep/er/file", b"content"),
        link("./deep/link", "er/file"),
    ]);
    unpack(pkg.as_slice(), &dest).unwrap();
    assert_eq!(fs::read(dest.join("deep/link")).unwrap(), b"content");
    assert_eq!(mode_of(&dest.join("deep/er")), 0o755);
    assert_eq!(mode_of(&dest.join("deep/er/file")), 0o644);
}
