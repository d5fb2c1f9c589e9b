//! Behaviour of `BlobStore` seen from outside: what gets stored, what never
//! gets stored, and that the store notices damage.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use trellis_cas::{BlobStore, CasError, Digest};

fn new_store() -> (tempfile::TempDir, BlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out
}

/// Deterministic, incompressible-looking test data.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn make_writable(path: &Path) {
    let mut perms = fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(path, perms).unwrap();
}

#[test]
fn bytes_round_trip() {
    let (_dir, store) = new_store();
    let info = store.put_bytes(b"hello, trellis").unwrap();
    assert_eq!(info.digest, Digest::of(b"hello, trellis"));
    assert_eq!(info.size, 14);
    assert!(store.contains(&info.digest));
    assert_eq!(store.size(&info.digest).unwrap(), Some(14));
    let mut content = Vec::new();
    store
        .open_blob(&info.digest)
        .unwrap()
        .read_to_end(&mut content)
        .unwrap();
    assert_eq!(content, b"hello, trellis");
    assert_eq!(fs::read(store.path(&info.digest)).unwrap(), content);
    store.verify(&info.digest).unwrap();
}

#[test]
fn empty_blob_round_trip() {
    let (_dir, store) = new_store();
    let info = store.put_bytes(b"").unwrap();
    assert_eq!(info.size, 0);
    assert_eq!(info.digest, Digest::of(b""));
    store.verify(&info.digest).unwrap();
}

#[test]
fn file_round_trip_larger_than_buffers() {
    let (dir, store) = new_store();
    let data = pseudo_random(1_000_003, 7);
    let source = dir.path().join("artifact.bin");
    fs::write(&source, &data).unwrap();
    let info = store.put_file(&source).unwrap();
    assert_eq!(info.digest, Digest::of(&data));
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(fs::read(store.path(&info.digest)).unwrap(), data);
    store.verify(&info.digest).unwrap();
}

#[test]
fn writer_accepts_many_small_writes() {
    let (_dir, store) = new_store();
    let data = pseudo_random(200_000, 3);
    let mut writer = store.writer().unwrap();
    for chunk in data.chunks(1000) {
        writer.write_all(chunk).unwrap();
    }
    writer.flush().unwrap();
    let info = writer.finish(Some(&Digest::of(&data))).unwrap();
    assert_eq!(info.size, 200_000);
}

#[test]
fn reopening_the_store_keeps_blobs() {
    let (dir, store) = new_store();
    let info = store.put_bytes(b"persistent").unwrap();
    drop(store);
    let store = BlobStore::open(&dir.path().join("store")).unwrap();
    assert!(store.contains(&info.digest));
    store.verify(&info.digest).unwrap();
}

#[test]
fn digest_mismatch_stores_nothing() {
    let (_dir, store) = new_store();
    let wrong = Digest::of(b"something else");
    let mut writer = store.writer().unwrap();
    writer.write_all(b"actual content").unwrap();
    let err = writer.finish(Some(&wrong)).unwrap_err();
    match &err {
        CasError::DigestMismatch {
            expected,
            actual,
            size,
        } => {
            assert_eq!(*expected, wrong);
            assert_eq!(*actual, Digest::of(b"actual content"));
            assert_eq!(*size, 14);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&wrong.as_hex()), "{msg}");
    assert!(msg.contains("nothing was stored"), "{msg}");

    assert!(!store.contains(&wrong));
    assert!(!store.contains(&Digest::of(b"actual content")));
    assert_eq!(files_under(store.root()), Vec::<PathBuf>::new());
}

#[test]
fn dropped_writer_leaves_no_temp_file() {
    let (_dir, store) = new_store();
    let mut writer = store.writer().unwrap();
    writer.write_all(&pseudo_random(300_000, 1)).unwrap();
    assert_eq!(files_under(store.root()).len(), 1, "the temp file exists");
    drop(writer);
    assert_eq!(files_under(store.root()), Vec::<PathBuf>::new());
}

#[test]
fn corrupt_blob_is_detected_by_verify() {
    let (_dir, store) = new_store();
    let info = store.put_bytes(b"original content").unwrap();
    let path = store.path(&info.digest);
    make_writable(&path);
    fs::write(&path, b"tampered content").unwrap();

    let err = store.verify(&info.digest).unwrap_err();
    match &err {
        CasError::Corrupt {
            digest,
            actual,
            path: p,
        } => {
            assert_eq!(*digest, info.digest);
            assert_eq!(*actual, Digest::of(b"tampered content"));
            assert_eq!(*p, path);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&info.digest.as_hex()), "{msg}");
    assert!(msg.contains("is corrupt"), "{msg}");

    // The way back: remove it and store it again.
    assert!(store.remove(&info.digest).unwrap());
    store.put_bytes(b"original content").unwrap();
    store.verify(&info.digest).unwrap();
}

#[test]
fn truncated_blob_is_detected_by_verify() {
    let (_dir, store) = new_store();
    let info = store.put_bytes(&pseudo_random(100_000, 9)).unwrap();
    let path = store.path(&info.digest);
    make_writable(&path);
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(50_000)
        .unwrap();
    assert!(matches!(
        store.verify(&info.digest),
        Err(CasError::Corrupt { .. })
    ));
}

#[test]
fn missing_blob_is_reported_as_not_found() {
    let (_dir, store) = new_store();
    let d = Digest::of(b"never stored");
    assert!(!store.contains(&d));
    assert_eq!(store.size(&d).unwrap(), None);
    assert!(!store.remove(&d).unwrap());
    let err = store.open_blob(&d).unwrap_err();
    assert!(matches!(err, CasError::NotFound { digest, .. } if digest == d));
    assert!(err.to_string().contains(&d.as_hex()));
    assert!(matches!(store.verify(&d), Err(CasError::NotFound { .. })));
}

#[test]
fn put_file_reports_the_missing_source() {
    let (dir, store) = new_store();
    let missing = dir.path().join("no-such-file");
    let err = store.put_file(&missing).unwrap_err();
    assert!(matches!(&err, CasError::Io { path, .. } if *path == missing));
    assert!(err.to_string().contains("no-such-file"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(files_under(store.root()), Vec::<PathBuf>::new());
}

#[test]
fn concurrent_writers_of_the_same_content_agree() {
    let (_dir, store) = new_store();
    let data = pseudo_random(500_000, 5);
    let infos: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut w = store.writer().unwrap();
                    w.write_all(&data).unwrap();
                    w.finish(None).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(infos.iter().all(|i| *i == infos[0]));
    assert_eq!(
        files_under(store.root()),
        vec![store.path(&infos[0].digest)]
    );
    store.verify(&infos[0].digest).unwrap();
}
