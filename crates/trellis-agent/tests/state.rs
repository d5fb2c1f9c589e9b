//! The rules of the agent's durable state, one behaviour per test: desired
//! revisions never go back, applies are in order, status sequence numbers are
//! never reused, acknowledgements, forgetting, the bounded outbox, and schema
//! versioning.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use trellis_agent::state::{
    AgentState, DEFAULT_OUTBOX_CAPACITY, Identity, SCHEMA_VERSION, StageKey, StageRecord,
    StateError, StateOptions, StoreOutcome,
};

fn temp_state() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.redb");
    (dir, path)
}

fn open(path: &Path) -> AgentState {
    AgentState::open(path).expect("open state")
}

fn open_cap(path: &Path, cap: usize) -> AgentState {
    AgentState::open_with(
        path,
        StateOptions {
            outbox_capacity: cap,
        },
    )
    .expect("open state")
}

fn web() -> StageKey {
    StageKey::new("shop", "web")
}

fn identity() -> Identity {
    Identity {
        outpost: "factory-7".into(),
        hub_url: "https://hub.example:7443".into(),
        ca_cert_pem: "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".into(),
        cert_pem: "-----BEGIN CERTIFICATE-----\nME\n-----END CERTIFICATE-----\n".into(),
        key_pem: "-----BEGIN PRIVATE KEY-----\nSECRET-KEY-MATERIAL\n-----END PRIVATE KEY-----\n"
            .into(),
    }
}

fn seqs(pending: &[(u64, Value)]) -> Vec<u64> {
    pending.iter().map(|(seq, _)| *seq).collect()
}

// === opening ===

#[test]
fn open_creates_a_missing_file_and_reopens_it() {
    let (_dir, path) = temp_state();
    assert!(!path.exists());
    let state = open(&path);
    assert_eq!(state.path(), path);
    assert!(path.exists());
    assert!(state.stages().unwrap().is_empty());
    assert_eq!(state.identity().unwrap(), None);
    let stats = state.outbox_stats().unwrap();
    assert_eq!(
        (stats.len, stats.last_seq, stats.dropped, stats.oldest_seq),
        (0, 0, 0, None)
    );
    assert_eq!(stats.capacity, DEFAULT_OUTBOX_CAPACITY);
    drop(state);
    open(&path);
    // No temporary file is left behind by the create-then-rename; beside
    // the state is the key its desired states are sealed with.
    let mut names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            std::ffi::OsString::from("agent.redb"),
            std::ffi::OsString::from("state.key")
        ]
    );
}

#[cfg(unix)]
#[test]
fn a_new_state_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path) = temp_state();
    open(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the file holds the private key");
}

#[test]
fn a_second_open_of_the_same_file_is_refused_as_in_use() {
    let (_dir, path) = temp_state();
    let _first = open(&path);
    let err = AgentState::open(&path).unwrap_err();
    assert!(matches!(err, StateError::InUse { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("another agent"), "{message}");
}

#[test]
fn a_file_from_a_newer_schema_is_refused_with_a_clear_error() {
    let (_dir, path) = temp_state();
    drop(open(&path));
    {
        // Play the newer agent: bump the schema version in place.
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .unwrap();
            meta.insert("schema_version", SCHEMA_VERSION + 1).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = AgentState::open(&path).unwrap_err();
    match &err {
        StateError::NewerSchema {
            found, supported, ..
        } => assert_eq!((*found, *supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION)),
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("newer agent"), "{message}");
    assert!(message.contains("upgrade"), "{message}");
}

#[test]
fn a_database_that_is_not_an_agent_state_file_is_refused() {
    let (_dir, path) = temp_state();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<u64, u64>::new("something-else"))
            .unwrap();
        txn.commit().unwrap();
    }
    let err = AgentState::open(&path).unwrap_err();
    assert!(matches!(err, StateError::Damaged { .. }), "{err:?}");
    assert!(err.to_string().contains("no Trellis agent schema"), "{err}");
}

// === identity ===

#[test]
fn identity_round_trips_and_survives_reopen() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    state.set_identity(&identity()).unwrap();
    drop(state);
    let state = open(&path);
    assert_eq!(state.identity().unwrap(), Some(identity()));

    let mut renewed = identity();
    renewed.cert_pem = "renewed".into();
    state.set_identity(&renewed).unwrap();
    assert_eq!(state.identity().unwrap(), Some(renewed));
}

#[test]
fn identity_debug_output_redacts_the_private_key() {
    let shown = format!("{:?}", identity());
    assert!(!shown.contains("SECRET-KEY-MATERIAL"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(shown.contains("factory-7"), "{shown}");
}

// === desired state ===

#[test]
fn store_desired_keeps_the_newest_and_refuses_older_revisions() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let stage = web();
    assert_eq!(
        state.store_desired(&stage, 5, &json!({"v": 5})).unwrap(),
        StoreOutcome::Stored
    );
    assert_eq!(
        state.store_desired(&stage, 3, &json!({"v": 3})).unwrap(),
        StoreOutcome::Stale { held: 5 }
    );
    assert_eq!(state.desired(&stage).unwrap(), Some((5, json!({"v": 5}))));
    assert_eq!(
        state.store_desired(&stage, 7, &json!({"v": 7})).unwrap(),
        StoreOutcome::Stored
    );
    assert_eq!(state.desired(&stage).unwrap(), Some((7, json!({"v": 7}))));
}

#[test]
fn store_desired_is_idempotent_on_an_equal_revision() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let stage = web();
    state.store_desired(&stage, 4, &json!({"v": 4})).unwrap();
    let again = state.store_desired(&stage, 4, &json!({"v": 4})).unwrap();
    assert_eq!(again, StoreOutcome::AlreadyHeld);
    assert!(again.is_held());
    // Even different content under the same revision never replaces it.
    state
        .store_desired(&stage, 4, &json!({"v": "other"}))
        .unwrap();
    assert_eq!(state.desired(&stage).unwrap(), Some((4, json!({"v": 4}))));
    assert!(!StoreOutcome::Stale { held: 4 }.is_held());
}

#[test]
fn revision_zero_is_refused() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let err = state.store_desired(&web(), 0, &json!({})).unwrap_err();
    assert!(matches!(err, StateError::ZeroRevision { .. }), "{err:?}");
    let err = state.record_applied(&web(), 0, true).unwrap_err();
    assert!(matches!(err, StateError::ZeroRevision { .. }), "{err:?}");
    assert_eq!(state.desired(&web()).unwrap(), None);
}

#[test]
fn desired_state_is_kept_per_stage_and_survives_reopen() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let api = StageKey::new("shop", "api");
    let other_project = StageKey::new("blog", "web");
    state
        .store_desired(&web(), 2, &json!({"s": "web"}))
        .unwrap();
    state.store_desired(&api, 9, &json!({"s": "api"})).unwrap();
    state
        .store_desired(&other_project, 1, &json!({"s": "blog"}))
        .unwrap();
    drop(state);

    let state = open(&path);
    assert_eq!(
        state.desired(&web()).unwrap(),
        Some((2, json!({"s": "web"})))
    );
    assert_eq!(state.desired(&api).unwrap(), Some((9, json!({"s": "api"}))));
    assert_eq!(
        state.desired(&other_project).unwrap(),
        Some((1, json!({"s": "blog"})))
    );
    assert_eq!(state.desired(&StageKey::new("shop", "nope")).unwrap(), None);
    // Revision 1 of another stage is not stale because of stage api's 9.
    assert_eq!(
        state
            .store_desired(&StageKey::new("shop", "new"), 1, &json!({}))
            .unwrap(),
        StoreOutcome::Stored
    );
}

#[test]
fn stages_lists_desired_and_applied_revisions() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let api = StageKey::new("shop", "api");
    state.store_desired(&web(), 3, &json!({})).unwrap();
    state.store_desired(&api, 8, &json!({})).unwrap();
    state.record_applied(&web(), 3, true).unwrap();
    assert_eq!(
        state.stages().unwrap(),
        vec![
            StageRecord {
                key: api.clone(),
                desired_revision: 8,
                applied_revision: None,
                applied_ok: false,
            },
            StageRecord {
                key: web(),
                desired_revision: 3,
                applied_revision: Some(3),
                applied_ok: true,
            },
        ]
    );
}

// === applied revision ===

#[test]
fn applied_revision_never_decreases() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let stage = web();
    state.store_desired(&stage, 6, &json!({})).unwrap();
    state.record_applied(&stage, 5, true).unwrap();
    state.record_applied(&stage, 6, false).unwrap();

    let err = state.record_applied(&stage, 5, true).unwrap_err();
    match &err {
        StateError::OutOfOrderApply {
            revision, applied, ..
        } => assert_eq!((*revision, *applied), (5, 6)),
        other => panic!("expected OutOfOrderApply, got {other:?}"),
    }
    assert!(err.to_string().contains("backwards"), "{err}");
    drop(state);

    let state = open(&path);
    let record = &state.stages().unwrap()[0];
    assert_eq!(
        (record.applied_revision, record.applied_ok),
        (Some(6), false)
    );
    // Recording the same revision again (a retry that now worked) is fine.
    state.record_applied(&stage, 6, true).unwrap();
    let record = &state.stages().unwrap()[0];
    assert_eq!(
        (record.applied_revision, record.applied_ok),
        (Some(6), true)
    );
}

#[test]
fn applying_a_revision_that_was_never_stored_is_refused() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let err = state.record_applied(&web(), 1, true).unwrap_err();
    assert!(matches!(err, StateError::UnknownStage { .. }), "{err:?}");

    state.store_desired(&web(), 2, &json!({})).unwrap();
    let err = state.record_applied(&web(), 3, true).unwrap_err();
    match err {
        StateError::AppliedAheadOfDesired {
            revision, desired, ..
        } => assert_eq!((revision, desired), (3, 2)),
        other => panic!("expected AppliedAheadOfDesired, got {other:?}"),
    }
    // An older desired revision than the held one may still be the one that
    // finished applying while a newer one arrived.
    state.record_applied(&web(), 1, true).unwrap();
    assert_eq!(state.stages().unwrap()[0].applied_revision, Some(1));
}

#[test]
fn an_apply_and_its_report_are_kept_together_or_not_at_all() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let stage = web();
    state.store_desired(&stage, 2, &json!({})).unwrap();
    let report = json!({"applied_revision": 2, "state": "running"});

    let seq = state
        .record_applied_and_report(&stage, 2, true, &report)
        .unwrap();
    drop(state);
    let state = open(&path);
    let record = &state.stages().unwrap()[0];
    assert_eq!(
        (record.applied_revision, record.applied_ok),
        (Some(2), true)
    );
    assert_eq!(state.pending_status(0, 10).unwrap(), [(seq, report)]);

    // A refused apply (older than the applied one, or of a stage not held)
    // queues no report either.
    let stale = json!({"applied_revision": 1});
    let err = state
        .record_applied_and_report(&stage, 1, true, &stale)
        .unwrap_err();
    assert!(matches!(err, StateError::OutOfOrderApply { .. }), "{err:?}");
    let err = state
        .record_applied_and_report(&StageKey::new("shop", "gone"), 1, true, &stale)
        .unwrap_err();
    assert!(matches!(err, StateError::UnknownStage { .. }), "{err:?}");
    assert_eq!(seqs(&state.pending_status(0, 10).unwrap()), [seq]);
    assert_eq!(state.stages().unwrap()[0].applied_revision, Some(2));
}

// === forget ===

#[test]
fn forget_stage_drops_its_state_and_lets_revisions_start_over() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    let api = StageKey::new("shop", "api");
    state.store_desired(&web(), 9, &json!({"v": 9})).unwrap();
    state.record_applied(&web(), 9, true).unwrap();
    state.store_desired(&api, 2, &json!({})).unwrap();
    let seq = state
        .enqueue_status(&web(), &json!({"state": "removed"}))
        .unwrap();

    assert!(state.forget_stage(&web()).unwrap());
    assert!(
        !state.forget_stage(&web()).unwrap(),
        "second forget finds nothing"
    );
    assert_eq!(state.desired(&web()).unwrap(), None);
    assert_eq!(
        state
            .stages()
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect::<Vec<_>>(),
        vec![api]
    );
    // The stage's last report still goes to the hub.
    assert_eq!(seqs(&state.pending_status(0, 10).unwrap()), vec![seq]);
    drop(state);

    let state = open(&path);
    assert_eq!(state.desired(&web()).unwrap(), None);
    // A re-created stage of the same name starts again at revision 1.
    assert_eq!(
        state.store_desired(&web(), 1, &json!({"v": 1})).unwrap(),
        StoreOutcome::Stored
    );
    assert_eq!(state.stages().unwrap()[1].applied_revision, None);
}

// === outbox: sequence numbers and acknowledgements ===

#[test]
fn status_seqs_strictly_increase_across_acks_and_reopens() {
    let (_dir, path) = temp_state();
    let mut last = 0;
    for round in 0..3 {
        let state = open(&path);
        for i in 0..4 {
            let seq = state
                .enqueue_status(&web(), &json!({"round": round, "i": i}))
                .unwrap();
            assert!(seq > last, "seq {seq} after {last}");
            last = seq;
        }
        // Acknowledge everything: the numbers must still not be reused.
        assert_eq!(state.ack_status(last).unwrap(), 4);
        assert_eq!(state.outbox_len().unwrap(), 0);
        assert_eq!(state.outbox_stats().unwrap().last_seq, last);
    }
    assert_eq!(last, 12);
}

#[test]
fn pending_status_pages_oldest_first() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    for i in 1..=5 {
        assert_eq!(state.enqueue_status(&web(), &json!({"i": i})).unwrap(), i);
    }
    let first = state.pending_status(0, 2).unwrap();
    assert_eq!(first, vec![(1, json!({"i": 1})), (2, json!({"i": 2}))]);
    assert_eq!(seqs(&state.pending_status(2, 10).unwrap()), vec![3, 4, 5]);
    assert!(state.pending_status(5, 10).unwrap().is_empty());
    assert!(state.pending_status(0, 0).unwrap().is_empty());
    assert!(state.pending_status(u64::MAX, 10).unwrap().is_empty());
    assert_eq!(state.outbox_stats().unwrap().oldest_seq, Some(1));
}

#[test]
fn ack_removes_up_to_and_including_the_acknowledged_seq() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    for i in 1..=5 {
        state.enqueue_status(&web(), &json!({"i": i})).unwrap();
    }
    assert_eq!(state.ack_status(2).unwrap(), 2);
    assert_eq!(seqs(&state.pending_status(0, 10).unwrap()), vec![3, 4, 5]);
    assert_eq!(state.outbox_stats().unwrap().oldest_seq, Some(3));
    // An older or repeated acknowledgement is a no-op.
    assert_eq!(state.ack_status(1).unwrap(), 0);
    assert_eq!(state.ack_status(2).unwrap(), 0);
    assert_eq!(state.ack_status(0).unwrap(), 0);
    assert_eq!(state.outbox_len().unwrap(), 3);
    drop(state);

    let state = open(&path);
    assert_eq!(seqs(&state.pending_status(0, 10).unwrap()), vec![3, 4, 5]);
}

#[test]
fn an_ack_beyond_the_last_seq_is_clamped_and_does_not_swallow_later_reports() {
    let (_dir, path) = temp_state();
    let state = open(&path);
    state.enqueue_status(&web(), &json!({"i": 1})).unwrap();
    state.enqueue_status(&web(), &json!({"i": 2})).unwrap();
    assert_eq!(state.ack_status(1_000).unwrap(), 2);
    assert_eq!(state.outbox_len().unwrap(), 0);
    // Reports written after the over-reaching ack are still delivered.
    let seq = state.enqueue_status(&web(), &json!({"i": 3})).unwrap();
    assert_eq!(seq, 3);
    assert_eq!(
        state.pending_status(0, 10).unwrap(),
        vec![(3, json!({"i": 3}))]
    );
    assert_eq!(state.ack_status(u64::MAX).unwrap(), 1);
}

// === outbox: bounded, coalescing ===

#[test]
fn a_full_outbox_drops_the_oldest_superseded_reports_first() {
    let (_dir, path) = temp_state();
    let state = open_cap(&path, 5);
    let quiet = StageKey::new("shop", "quiet");
    let quiet_seq = state.enqueue_status(&quiet, &json!({"quiet": 1})).unwrap();
    let mut web_seqs = Vec::new();
    for i in 1..=10 {
        web_seqs.push(state.enqueue_status(&web(), &json!({"web": i})).unwrap());
    }
    let stats = state.outbox_stats().unwrap();
    assert_eq!(stats.len, 5);
    assert_eq!(stats.capacity, 5);
    assert_eq!(stats.dropped, 6);
    // The quiet stage's only (oldest) report survives; web keeps its newest.
    let pending = state.pending_status(0, 100).unwrap();
    assert_eq!(
        seqs(&pending),
        [vec![quiet_seq], web_seqs[6..].to_vec()].concat()
    );
    assert_eq!(pending.last().unwrap().1, json!({"web": 10}));
    // Seqs keep increasing after coalescing, gaps and all.
    assert_eq!(
        state.enqueue_status(&quiet, &json!({"quiet": 2})).unwrap(),
        12
    );
}

#[test]
fn the_newest_report_of_every_stage_is_kept_even_past_the_cap() {
    let (_dir, path) = temp_state();
    let state = open_cap(&path, 2);
    for name in ["a", "b", "c"] {
        state
            .enqueue_status(&StageKey::new("p", name), &json!({ "stage": name }))
            .unwrap();
    }
    let stats = state.outbox_stats().unwrap();
    assert_eq!((stats.len, stats.dropped), (3, 0));
    // One newer report of "a" supersedes its first one, which goes; the
    // outbox is back within reach of its cap.
    state
        .enqueue_status(&StageKey::new("p", "a"), &json!({"stage": "a", "n": 2}))
        .unwrap();
    let stats = state.outbox_stats().unwrap();
    assert_eq!((stats.len, stats.dropped), (3, 1));
    assert_eq!(seqs(&state.pending_status(0, 10).unwrap()), vec![2, 3, 4]);
}

#[test]
fn coalescing_stays_correct_after_acks_and_reopens() {
    let (_dir, path) = temp_state();
    let state = open_cap(&path, 3);
    let a = StageKey::new("p", "a");
    let b = StageKey::new("p", "b");
    state.enqueue_status(&a, &json!({"a": 1})).unwrap(); // 1
    state.enqueue_status(&b, &json!({"b": 1})).unwrap(); // 2
    // The hub stored a's newest report: a has nothing queued any more.
    assert_eq!(state.ack_status(1).unwrap(), 1);
    drop(state);

    // A smaller cap on reopen takes effect at the next enqueue.
    let state = open_cap(&path, 2);
    state.enqueue_status(&b, &json!({"b": 2})).unwrap(); // 3
    state.enqueue_status(&a, &json!({"a": 2})).unwrap(); // 4, drops 2 (b superseded)
    assert_eq!(seqs(&state.pending_status(0, 10).unwrap()), vec![3, 4]);
    state.enqueue_status(&b, &json!({"b": 3})).unwrap(); // 5, drops 3
    assert_eq!(seqs(&state.pending_status(0, 10).unwrap()), vec![4, 5]);
    assert_eq!(state.outbox_stats().unwrap().dropped, 2);
    drop(state);

    let state = open_cap(&path, 2);
    assert_eq!(state.outbox_stats().unwrap().dropped, 2);
    assert_eq!(
        state.pending_status(0, 10).unwrap(),
        vec![(4, json!({"a": 2})), (5, json!({"b": 3}))]
    );
}

#[test]
fn a_capacity_of_zero_is_treated_as_one() {
    let (_dir, path) = temp_state();
    let state = open_cap(&path, 0);
    state.enqueue_status(&web(), &json!(1)).unwrap();
    state.enqueue_status(&web(), &json!(2)).unwrap();
    assert_eq!(state.pending_status(0, 10).unwrap(), vec![(2, json!(2))]);
    assert_eq!(state.outbox_stats().unwrap().capacity, 1);
}

#[test]
fn the_state_can_be_shared_between_threads() {
    // The agent shares one handle between its link task and its appliers
    // (through `spawn_blocking`).
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<AgentState>();
    assert_send_sync::<StateError>();

    let (_dir, path) = temp_state();
    let state = std::sync::Arc::new(open(&path));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let state = state.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| {
                        state
                            .enqueue_status(&StageKey::new("p", format!("s{t}")), &json!(i))
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=40).collect::<Vec<_>>(), "no seq assigned twice");
}

/// Desired states carry config values (passwords among them): the file
/// holds them sealed with the key beside it, and they read back whole —
/// also after a reopen, and a re-sent copy of a held revision is still
/// recognised as the same.
#[test]
fn desired_states_are_sealed_in_the_file() {
    let (dir, path) = temp_state();
    let secret = "pa55word-that-must-not-be-on-disk";
    let desired = serde_json::json!({"release": {"config": {"data": {"env": {"DB": secret}}}}});
    let stage = StageKey::new("shop", "dev");
    {
        let state = open(&path);
        assert!(state.store_desired(&stage, 1, &desired).unwrap().is_held());
        assert_eq!(
            state.store_desired(&stage, 1, &desired).unwrap(),
            StoreOutcome::AlreadyHeld
        );
    }
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    let state = open(&path);
    assert_eq!(state.desired(&stage).unwrap(), Some((1, desired)));
    // Without its key, the state is not readable.
    drop(state);
    std::fs::write(dir.path().join("state.key"), "00".repeat(32)).unwrap();
    let state = open(&path);
    assert!(state.desired(&stage).is_err());
}
