//! Hostile state files: garbage, truncation, flipped bytes, an empty file, a
//! directory. `open` must answer each with a clear error (what happened, the
//! path, what to do) and never panic or silently start over.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;
use trellis_agent::state::{AgentState, StageKey, StateError};

fn populated_file(dir: &Path) -> PathBuf {
    let path = dir.join("agent.redb");
    let state = AgentState::open(&path).unwrap();
    let stage = StageKey::new("shop", "web");
    for rev in 1..=50 {
        state
            .store_desired(&stage, rev, &json!({"rev": rev, "pad": "x".repeat(500)}))
            .unwrap();
        state
            .enqueue_status(&stage, &json!({"rev": rev, "pad": "y".repeat(500)}))
            .unwrap();
    }
    drop(state);
    path
}

/// The error names the file and tells the operator what to do.
fn assert_damaged(err: &StateError, path: &Path) {
    assert!(matches!(err, StateError::Damaged { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("damaged"), "{message}");
    assert!(message.contains("move it aside"), "{message}");
    assert!(
        message.contains("re-fetches the desired state"),
        "{message}"
    );
}

/// Deterministic filler, so a failure reproduces.
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_garbage_file_is_refused_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.redb");
    for len in [1, 7, 512, 4096, 64 * 1024] {
        fs::write(&path, garbage(len)).unwrap();
        let err = AgentState::open(&path).unwrap_err();
        assert_damaged(&err, &path);
        // The file is left alone for the operator to inspect.
        assert_eq!(fs::read(&path).unwrap(), garbage(len));
    }
}

#[test]
fn an_empty_file_is_refused_not_silently_started_over() {
    // An empty file is never one of ours (creation renames a complete file
    // into place), so it is a truncation, not a fresh start.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.redb");
    fs::write(&path, b"").unwrap();
    let err = AgentState::open(&path).unwrap_err();
    assert_damaged(&err, &path);
}

#[test]
fn a_truncated_file_is_refused_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated_file(dir.path());
    let full = fs::read(&path).unwrap();
    let len = full.len();
    for cut in [1, 100, 4096, len / 3, len / 2, len - 4096] {
        fs::write(&path, &full[..cut]).unwrap();
        match AgentState::open(&path) {
            Err(err) => assert_damaged(&err, &path),
            Ok(_) => panic!("a file cut to {cut} of {len} bytes was accepted"),
        }
    }
}

#[test]
fn flipped_bytes_are_refused_or_harmless_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated_file(dir.path());
    let full = fs::read(&path).unwrap();
    let stage = StageKey::new("shop", "web");
    let mut refused = 0;
    // Flip a byte in every 4 KiB page: in live pages the checksums catch it,
    // in free space it harms nothing.
    for offset in (0..full.len()).step_by(4096).map(|page| page + 1000) {
        let mut bytes = full.clone();
        bytes[offset] ^= 0x5A;
        fs::write(&path, &bytes).unwrap();
        match AgentState::open(&path) {
            Err(err) => {
                assert!(
                    matches!(
                        err,
                        StateError::Damaged { .. } | StateError::NewerSchema { .. }
                    ),
                    "flip at {offset}: {err:?}"
                );
                assert!(err.to_string().contains(&path.display().to_string()));
                refused += 1;
            }
            Ok(state) => {
                // Accepted: then what it holds must be intact.
                let (rev, value) = state.desired(&stage).unwrap().unwrap();
                assert_eq!(rev, 50, "flip at {offset}");
                assert_eq!(value["rev"], 50, "flip at {offset}");
                assert_eq!(state.outbox_len().unwrap(), 50, "flip at {offset}");
            }
        }
    }
    assert!(refused > 0, "no flipped byte was detected at all");
}

#[test]
fn a_directory_in_place_of_the_file_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.redb");
    fs::create_dir(&path).unwrap();
    let err = AgentState::open(&path).unwrap_err();
    assert!(matches!(err, StateError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_missing_directory_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("agent.redb");
    let err = AgentState::open(&path).unwrap_err();
    assert!(matches!(err, StateError::Io { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("directory exists"), "{message}");
}
