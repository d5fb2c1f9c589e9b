//! The reconciler without a network: it applies the newest held revision of
//! each stage, never an older one after a newer one, skips revisions that
//! were superseded while it was busy, reports failures, and queues one
//! status report per apply. Also the `RecordOnly` runtime.

mod common;

use std::sync::Arc;

use common::{TestRuntime, eventually, temp_state, web};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use trellis_agent::reconciler::Reconciler;
use trellis_agent::report::Reporter;
use trellis_agent::runner::{RECORD_ONLY_MESSAGE, RecordOnly, StageRunner};
use trellis_agent::{AgentState, Shutdown, StageKey};
use trellis_link::protocol::StatusReport;

fn outbox(state: &AgentState) -> Vec<StatusReport> {
    state
        .pending_status(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, v)| serde_json::from_value(v).unwrap())
        .collect()
}

fn store(state: &AgentState, stage: &StageKey, revision: u64) {
    assert!(
        state
            .store_desired(stage, revision, &json!({ "rev": revision }))
            .unwrap()
            .is_held()
    );
}

#[tokio::test]
async fn applies_the_newest_revision_and_skips_those_superseded_while_busy() {
    let (_dir, state) = temp_state();
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let runtime = Arc::new(TestRuntime {
        gate: Some(gate.clone()),
        started: Some(started_tx),
        ..TestRuntime::default()
    });
    let reporter = Arc::new(Reporter::new(state.clone(), 32));
    let reconciler = Reconciler::new(runtime.clone(), reporter);
    let handle = reconciler.handle();
    let (trigger, shutdown) = Shutdown::channel();
    let task = tokio::spawn(reconciler.run(shutdown));

    store(&state, &web(), 1);
    handle.desired_changed();
    assert_eq!(started.recv().await.unwrap(), (web(), 1));

    // While revision 1 is being applied, three more arrive.
    for revision in 2..=4 {
        store(&state, &web(), revision);
        handle.desired_changed();
    }
    gate.add_permits(1); // finish 1
    assert_eq!(started.recv().await.unwrap(), (web(), 4));
    gate.add_permits(1); // finish 4

    // The report is queued after the applied revision is recorded.
    eventually("both applies are reported", || {
        state.outbox_len().unwrap() == 2
    })
    .await;
    assert_eq!(state.stages().unwrap()[0].applied_revision, Some(4));
    assert_eq!(runtime.applied(), vec![1, 4], "2 and 3 are skipped");

    // One report per apply, in order.
    let reports = outbox(&state);
    let revisions: Vec<u64> = reports.iter().map(|r| r.applied_revision).collect();
    assert_eq!(revisions, vec![1, 4]);
    assert!(reports.iter().all(|r| r.state == "running"));
    assert_eq!(reports[1].components.len(), 1);

    trigger.trigger();
    task.await.unwrap();
    assert_eq!(runtime.applied(), vec![1, 4], "nothing else was applied");
}

#[tokio::test]
async fn never_applies_an_older_revision_after_a_newer_one() {
    let (_dir, state) = temp_state();
    let runtime = Arc::new(TestRuntime::default());
    let reporter = Arc::new(Reporter::new(state.clone(), 32));
    let mut reconciler = Reconciler::new(runtime.clone(), reporter);

    store(&state, &web(), 5);
    reconciler.pass().await.unwrap();
    // An older revision is refused by the state and never reaches the runtime.
    assert!(
        !state
            .store_desired(&web(), 3, &json!({}))
            .unwrap()
            .is_held()
    );
    reconciler.pass().await.unwrap();
    store(&state, &web(), 6);
    reconciler.pass().await.unwrap();
    reconciler.pass().await.unwrap();

    assert_eq!(runtime.applied(), vec![5, 6]);
}

#[tokio::test]
async fn reports_a_failed_apply_and_moves_on_with_the_next_revision() {
    let (_dir, state) = temp_state();
    let runtime = Arc::new(TestRuntime::default());
    runtime.fail.lock().unwrap().insert(2);
    let reporter = Arc::new(Reporter::new(state.clone(), 32));
    let mut reconciler = Reconciler::new(runtime.clone(), reporter);

    store(&state, &web(), 1);
    reconciler.pass().await.unwrap();
    store(&state, &web(), 2);
    reconciler.pass().await.unwrap();

    let record = &state.stages().unwrap()[0];
    assert_eq!(record.applied_revision, Some(2));
    assert!(!record.applied_ok);
    let failed = outbox(&state).pop().unwrap();
    assert_eq!(
        (failed.applied_revision, failed.state.as_str()),
        (2, "failed")
    );
    assert!(
        failed
            .message
            .unwrap()
            .contains("revision 2 does not start")
    );

    // A failed revision is not retried in a loop…
    reconciler.pass().await.unwrap();
    assert_eq!(runtime.applied(), vec![1, 2]);
    // …the next one is applied.
    store(&state, &web(), 3);
    reconciler.pass().await.unwrap();
    assert_eq!(runtime.applied(), vec![1, 2, 3]);
    assert!(state.stages().unwrap()[0].applied_ok);
    assert_eq!(state.outbox_len().unwrap(), 3);
}

#[tokio::test]
async fn each_stage_is_applied_independently() {
    let (_dir, state) = temp_state();
    let runtime = Arc::new(TestRuntime::default());
    let reporter = Arc::new(Reporter::new(state.clone(), 32));
    let mut reconciler = Reconciler::new(runtime.clone(), reporter);
    let api = StageKey::new("shop", "api");
    store(&state, &web(), 2);
    store(&state, &api, 7);
    reconciler.pass().await.unwrap();

    let mut applied = runtime.applied.lock().unwrap().clone();
    applied.sort();
    assert_eq!(applied, vec![(api.clone(), 7), (web(), 2)]);
    assert_eq!(state.outbox_len().unwrap(), 2);
}

#[tokio::test]
async fn a_forgotten_stage_is_removed_from_the_runtime() {
    let (_dir, state) = temp_state();
    let runtime = Arc::new(TestRuntime::default());
    let reporter = Arc::new(Reporter::new(state.clone(), 32));
    let mut reconciler = Reconciler::new(runtime.clone(), reporter);
    store(&state, &web(), 1);
    reconciler.pass().await.unwrap();

    state.forget_stage(&web()).unwrap();
    reconciler.handle().forget(web());
    // Re-created with revisions starting over.
    store(&state, &web(), 1);
    reconciler.pass().await.unwrap();

    assert_eq!(*runtime.removed.lock().unwrap(), vec![web()]);
    assert_eq!(runtime.applied(), vec![1, 1]);
}

#[tokio::test]
async fn record_only_writes_the_desired_state_atomically_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = RecordOnly::new(dir.path());
    assert!(runtime.describe().is_empty());

    let desired = json!({ "components": { "web": { "image": "nginx" } } });
    let outcome = runtime.apply(&web(), 3, &desired).await;
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(outcome.state, "recorded");
    assert_eq!(outcome.message.as_deref(), Some(RECORD_ONLY_MESSAGE));
    assert!(outcome.components.is_empty());

    let file = dir.path().join("stages/shop/web/desired.json");
    let written: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(written, desired);
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["desired.json"]);

    runtime.remove(&web()).await.unwrap();
    assert!(!dir.path().join("stages/shop").exists());
    runtime.remove(&web()).await.unwrap(); // idempotent
}

#[tokio::test]
async fn record_only_refuses_names_that_would_escape_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = RecordOnly::new(dir.path());
    for stage in [
        StageKey::new("..", "web"),
        StageKey::new("shop", "../../etc"),
        StageKey::new("shop", "a/b"),
        StageKey::new("", "web"),
    ] {
        let outcome = runtime.apply(&stage, 1, &json!({})).await;
        assert!(!outcome.ok, "{stage}");
        assert_eq!(outcome.state, "failed");
        assert!(runtime.remove(&stage).await.is_err(), "{stage}");
    }
    assert!(!dir.path().join("stages").exists());
}
