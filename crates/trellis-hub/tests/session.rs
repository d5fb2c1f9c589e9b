//! The hub's link session, driven by a scripted agent over an in-memory
//! link: what the hub sends, what it records, and the release history it
//! derives — the sync rules, without sockets.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{M, TestHub, start};
use reqwest::StatusCode;
use serde_json::json;
use trellis_link::mem::pair;
use trellis_link::protocol::{Capacity, DesiredAck, StatusReport};
use trellis_link::{Envelope, LinkIo, Message};

const MANIFEST: &str = "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: web:1\n";

/// Project `shop` with stage `line3` on outpost `edge` and one build.
async fn setup(hub: &TestHub) {
    common::shop_line3_on_edge(
        hub,
        MANIFEST,
        json!([{"name": "web", "artifact": {"kind": "image", "reference": "web:1"}}]),
    )
    .await;
}

async fn push(hub: &TestHub) -> u64 {
    let (s, r) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            "/projects/shop/stages/line3/releases",
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    r["revision"].as_u64().unwrap()
}

use common::{ScriptedAgent as Agent, peer};

impl Agent {
    async fn report(&mut self, seq: u64, applied: u64, state: &str) {
        self.send(Message::Status {
            seq,
            reports: vec![StatusReport {
                project: "shop".into(),
                stage: "line3".into(),
                applied_revision: applied,
                state: state.into(),
                message: None,
                components: vec![],
                errors: vec![],
                rolled_back_to: None,
            }],
        })
        .await;
        match self.next().await {
            Message::StatusAck { up_to_seq } => assert_eq!(up_to_seq, seq),
            other => panic!("expected status-ack, got {other:?}"),
        }
    }
}

async fn status(hub: &TestHub) -> serde_json::Value {
    let (s, b) = hub
        .call(
            Some(&hub.admin),
            M::GET,
            "/projects/shop/stages/line3/outpost-status",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

async fn release_states(hub: &TestHub) -> Vec<String> {
    let (_, list) = hub
        .call(
            Some(&hub.admin),
            M::GET,
            "/projects/shop/stages/line3/releases",
            None,
        )
        .await;
    let mut states: Vec<(u64, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["number"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    states.sort();
    states.into_iter().map(|(_, s)| s).collect()
}

#[tokio::test]
async fn releases_pushed_while_offline_arrive_as_the_newest_only() {
    let hub = start().await;
    setup(&hub).await;
    assert_eq!(status(&hub).await["sync"]["state"], "linking");
    assert_eq!(status(&hub).await["link"]["state"], "awaiting-agent");
    let r1 = push(&hub).await;
    push(&hub).await;
    let r3 = push(&hub).await;
    assert_eq!(status(&hub).await["sync"]["state"], "linking");

    let mut agent = Agent::connect(&hub, &[]).await;
    match agent.next().await {
        Message::Desired {
            revision, state, ..
        } => {
            assert_eq!(revision, r3, "only the newest desired state is sent");
            assert_eq!(state["release"]["number"], 3);
            assert_eq!(state["build"]["name"], "main_b1");
        }
        other => panic!("expected desired, got {other:?}"),
    }
    agent.quiet().await;
    assert_eq!(status(&hub).await["link"]["state"], "online");
    assert_eq!(status(&hub).await["sync"]["state"], "syncing");
    agent
        .send(Message::Ack {
            desired: vec![DesiredAck {
                project: "shop".into(),
                stage: "line3".into(),
                revision: r3,
            }],
        })
        .await;
    agent.report(1, r3, "running").await;
    let s = status(&hub).await;
    assert_eq!(s["sync"]["state"], "in-sync", "{s}");
    assert_eq!(s["sync"]["applied_release"], 3);
    assert_eq!(
        release_states(&hub).await,
        ["superseded", "superseded", "applied"]
    );
    assert!(r1 < r3);

    // A push while online is delivered at once; the older release is replaced once the newer runs.
    let r4 = push(&hub).await;
    match agent.next().await {
        Message::Desired { revision, .. } => assert_eq!(revision, r4),
        other => panic!("expected desired, got {other:?}"),
    }
    agent.report(2, r4, "running").await;
    assert_eq!(
        release_states(&hub).await,
        ["superseded", "superseded", "replaced", "applied"]
    );
    // A late report of an older revision changes nothing.
    agent.report(3, r3, "running").await;
    assert_eq!(status(&hub).await["sync"]["applied_revision"], r4);
}

#[tokio::test]
async fn a_reconnecting_agent_gets_only_what_it_lacks_and_deleted_stages_are_forgotten() {
    let hub = start().await;
    setup(&hub).await;
    let r1 = push(&hub).await;
    // The agent already holds r1: nothing to send.
    let mut agent = Agent::connect(&hub, &[(r1, r1)]).await;
    agent.quiet().await;
    drop(agent);
    // Offline now; a new release waits for delivery.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r2 = push(&hub).await;
    let s = status(&hub).await;
    assert_eq!(s["link"]["state"], "offline", "{s}");
    let mut agent = Agent::connect(&hub, &[(r1, r1)]).await;
    match agent.next().await {
        Message::Desired { revision, .. } => assert_eq!(revision, r2),
        other => panic!("expected desired, got {other:?}"),
    }
    let (s, _) = hub
        .call(
            Some(&hub.admin),
            M::DELETE,
            "/projects/shop/stages/line3?force=true",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    match agent.next().await {
        Message::Forget { project, stage } => {
            assert_eq!((project.as_str(), stage.as_str()), ("shop", "line3"))
        }
        other => panic!("expected forget, got {other:?}"),
    }
}

#[tokio::test]
async fn errors_and_failures_reach_the_status_view() {
    let hub = start().await;
    setup(&hub).await;
    let r1 = push(&hub).await;
    let mut agent = Agent::connect(&hub, &[]).await;
    let _ = agent.next().await;
    agent
        .send(Message::Ack {
            desired: vec![DesiredAck {
                project: "shop".into(),
                stage: "line3".into(),
                revision: r1,
            }],
        })
        .await;
    let now = Utc::now();
    agent
        .send(Message::Status {
            seq: 1,
            reports: vec![StatusReport {
                project: "shop".into(),
                stage: "line3".into(),
                applied_revision: 0,
                state: "failed".into(),
                message: Some("component web exited with code 1".into()),
                components: vec![],
                errors: vec![trellis_link::protocol::AgentError {
                    code: "hub-unreachable".into(),
                    message: "connection refused".into(),
                    hint: Some("check the hub's address".into()),
                    first_seen: now,
                    last_seen: now,
                    count: 4,
                }],
                rolled_back_to: None,
            }],
        })
        .await;
    let _ack = agent.next().await;
    let s = status(&hub).await;
    assert_eq!(s["sync"]["state"], "failed", "{s}");
    assert_eq!(s["sync"]["message"], "component web exited with code 1");
    let errors = s["errors"].as_array().unwrap();
    assert_eq!(errors[0]["code"], "hub-unreachable");
    assert_eq!(errors[0]["count"], 4);
    assert_eq!(errors[0]["source"], "agent");
    assert_eq!(release_states(&hub).await, ["failed"]);
}

#[tokio::test]
async fn a_hostile_frame_ends_only_that_link() {
    let hub = start().await;
    setup(&hub).await;
    let mut agent = Agent::connect(&hub, &[]).await;
    // Agents never send welcome; the hub drops the link with an error.
    agent
        .send(Message::Welcome {
            hub_version: "x".into(),
            heartbeat_secs: 1,
            server_time: Utc::now(),
        })
        .await;
    match agent.next().await {
        Message::Error { code, .. } => assert_eq!(code, "unexpected-message"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), agent.link.recv())
            .await
            .unwrap()
            .unwrap(),
        None
    );
    // The hub still works, and a new connection is accepted.
    let mut again = Agent::connect(&hub, &[]).await;
    again.quiet().await;
    let s = status(&hub).await;
    assert_eq!(s["link"]["state"], "online");
    assert!(
        s["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["code"] == "link-protocol-error"),
        "{s}"
    );
}

/// A hub in process (memory store) with a heartbeat of `heartbeat`, and
/// the agent end of a session of outpost `edge` that has said hello.
async fn session_of_edge(
    heartbeat: Duration,
) -> (
    trellis_hub::state::AppState,
    trellis_link::mem::MemLink,
    tokio::task::JoinHandle<()>,
    tempfile::TempDir,
) {
    let data = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(trellis_store::memory::MemoryStore::new());
    let hub = trellis_hub::Hub::open_with_store(
        trellis_hub::HubOptions {
            data_dir: data.path().join("hub"),
            link: trellis_hub::link::LinkSettings {
                heartbeat,
                ..Default::default()
            },
            ..Default::default()
        },
        store.clone(),
    )
    .await
    .unwrap();
    let state = hub.state().clone();
    trellis_store::Store::create_outpost(
        store.as_ref(),
        &trellis_model::Outpost {
            name: "edge".into(),
            display_name: "edge".into(),
            description: String::new(),
            labels: Default::default(),
            max_stages: None,
            uri_generation: 1,
            revoked_at: None,
            ingress_domain: None,
            created_at: Utc::now(),
        },
    )
    .await
    .unwrap();
    let (hub_end, mut agent) = pair();
    let session = tokio::spawn(trellis_hub::link::session::run(
        Box::new(hub_end),
        peer(),
        state.clone(),
    ));
    agent
        .send(&Envelope::new(
            1,
            Message::Hello {
                agent_version: "test".into(),
                os: "linux".into(),
                arch: "x86_64".into(),
                runtimes: vec![],
                capacity: Capacity {
                    cpus: 1,
                    memory_bytes: 1,
                    disk_free_bytes: 1,
                },
                devices: vec![],
                stages: vec![],
                outbox_from: 0,
                features: vec![],
            },
        ))
        .await
        .unwrap();
    (state, agent, session, data)
}

#[tokio::test(start_paused = true)]
async fn a_silent_outpost_is_offline_after_two_heartbeats() {
    // A hub whose heartbeat is 10 s, and an agent that stops answering.
    let (state, mut agent, session, _data) = session_of_edge(Duration::from_secs(10)).await;
    // Read the welcome, then go silent (pings are answered only while reading).
    let _welcome = agent.recv().await.unwrap();
    let silent_from = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(19)).await;
    assert!(
        state.links().is_connected("edge"),
        "still within two heartbeats"
    );
    session.await.unwrap();
    let took = silent_from.elapsed();
    assert!(
        took >= Duration::from_secs(20) && took <= Duration::from_secs(21),
        "offline after {took:?}"
    );
    assert!(!state.links().is_connected("edge"));
    let view = state.links().view("edge").unwrap();
    assert_eq!(view.state, trellis_hub::link::LinkState::Offline);
    assert!(view.last_disconnect.unwrap().contains("silent"));
}

#[tokio::test(start_paused = true)]
async fn the_hub_does_not_ping_an_agent_it_hears_except_to_measure_the_round_trip() {
    // The agent pings every heartbeat, as the real one does; the hub then
    // pings only on its first tick and every fourth, for the round trip.
    let heartbeat = Duration::from_secs(10);
    let (state, mut agent, _session, _data) = session_of_edge(heartbeat).await;
    let _welcome = agent.recv().await.unwrap();
    let mut hub_pings = 0;
    let mut pongs = 0;
    let until = tokio::time::Instant::now() + heartbeat * 12;
    let mut next_ping = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        tokio::select! {
            got = agent.recv() => match got.unwrap() {
                Some(trellis_link::Incoming::Ping) => hub_pings += 1,
                Some(trellis_link::Incoming::Pong(_)) => pongs += 1,
                Some(trellis_link::Incoming::Frame(_)) => {}
                None => panic!("the hub closed a link it hears"),
            },
            () = tokio::time::sleep_until(next_ping) => {
                agent.ping(vec![1]).await.unwrap();
                next_ping += heartbeat;
            }
        }
    }
    assert!(state.links().is_connected("edge"), "heard, so still online");
    assert_eq!(pongs, 12, "the hub answers every ping");
    assert!(
        (2..=3).contains(&hub_pings),
        "{hub_pings} hub pings in 12 heartbeats (ticks 1, 5, 9 measure the round trip)"
    );
    assert!(
        state.links().view("edge").unwrap().rtt_ms.is_some(),
        "the round trip is still measured"
    );

    // Once the agent goes quiet, the hub probes it every heartbeat.
    let quiet_from = hub_pings;
    let until = tokio::time::Instant::now() + heartbeat * 5 / 2;
    while tokio::time::Instant::now() < until {
        tokio::select! {
            got = agent.recv() => if let Some(trellis_link::Incoming::Ping) = got.unwrap() {
                hub_pings += 1;
            },
            () = tokio::time::sleep_until(until) => {}
        }
    }
    assert!(
        hub_pings >= quiet_from + 2,
        "a quiet agent is probed every heartbeat ({} pings)",
        hub_pings - quiet_from
    );
}
