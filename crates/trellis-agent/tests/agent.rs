//! `trellis_agent::run` as a whole: wired with an in-memory connector, the
//! default `RecordOnly` runtime records what the hub sends, status flows
//! back, and the agent stops on shutdown; without an identity it refuses to
//! start and says how to join.

mod common;

use std::sync::Arc;

use common::TestConnector;
use serde_json::json;
use trellis_agent::runner::RECORD_ONLY_MESSAGE;
use trellis_agent::{AgentError, AgentOptions, run};
use trellis_link::Message;

#[tokio::test]
async fn run_records_desired_state_reports_it_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (connector, mut hubs) = TestConnector::new();
    let options = AgentOptions {
        connector: Some(connector.clone()),
        runtime: Some(Arc::new(trellis_agent::RecordOnly::new(dir.path()))),
        rng_seed: Some(1),
        ..AgentOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let data_dir = dir.path().to_path_buf();
    let agent = tokio::spawn(async move {
        run(&data_dir, options, async {
            let _ = stopped.await;
        })
        .await
    });

    let mut hub = hubs.recv().await.unwrap();
    let Message::Hello { runtimes, .. } = hub.handshake(10).await else {
        unreachable!()
    };
    assert!(runtimes.is_empty(), "RecordOnly runs nothing");
    let desired = json!({ "components": { "web": { "image": "nginx:1" } } });
    hub.send(Message::Desired {
        project: "shop".into(),
        stage: "web".into(),
        revision: 1,
        state: desired.clone(),
    });
    assert_eq!(hub.next().await.kind(), "ack");
    let Message::Status { seq, reports } = hub.next().await else {
        panic!("expected status");
    };
    assert_eq!(reports[0].state, "recorded");
    assert_eq!(reports[0].message.as_deref(), Some(RECORD_ONLY_MESSAGE));
    hub.send(Message::StatusAck { up_to_seq: seq });

    let written = std::fs::read(dir.path().join("stages/shop/web/desired.json")).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&written).unwrap(),
        desired
    );

    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    assert_eq!(
        hub.closed.lock().unwrap().as_deref(),
        Some("agent shutting down")
    );
    // The state file is free again and holds what was applied.
    let state = trellis_agent::AgentState::open(&dir.path().join("agent.redb")).unwrap();
    assert_eq!(state.stages().unwrap()[0].applied_revision, Some(1));
}

#[tokio::test]
async fn run_without_an_identity_says_how_to_join() {
    let dir = tempfile::tempdir().unwrap();
    let result = run(dir.path(), AgentOptions::default(), std::future::pending()).await;
    let Err(err @ AgentError::NotJoined { .. }) = result else {
        panic!("{result:?}");
    };
    assert_eq!(err.code(), "not-joined");
    assert!(err.to_string().contains("trellis agent join"), "{err}");
}

#[tokio::test]
async fn run_refuses_a_data_directory_another_agent_uses() {
    let dir = tempfile::tempdir().unwrap();
    let _held = trellis_agent::AgentState::open(&dir.path().join("agent.redb")).unwrap();
    let (connector, _hubs) = TestConnector::new();
    let options = AgentOptions {
        connector: Some(connector as Arc<_>),
        ..AgentOptions::default()
    };
    let result = run(dir.path(), options, std::future::pending()).await;
    assert!(
        matches!(
            result,
            Err(AgentError::State(trellis_agent::StateError::InUse { .. }))
        ),
        "{result:?}"
    );
}
