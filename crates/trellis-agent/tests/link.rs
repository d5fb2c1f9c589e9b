//! The agent's side of the link against a scripted hub over an in-memory
//! `LinkIo` pair: hello, persist-before-ack, the status outbox across
//! reconnects, retry-after, backoff, errors met while disconnected,
//! heartbeats, revocation, and certificate renewal over the link.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{Harness, HubEnd, TestRuntime, eventually, web};
use serde_json::json;
use trellis_agent::link::{ConnectError, LinkConfig};
use trellis_agent::{AgentError, Identity, StoreOutcome};
use trellis_link::Message;
use trellis_link::identity::{AgentKey, HubCa};
use trellis_link::protocol::{DesiredAck, RuntimeInfo, StageRevision, StatusReport};

fn desired(revision: u64) -> Message {
    Message::Desired {
        project: "shop".into(),
        stage: "web".into(),
        revision,
        state: json!({ "rev": revision }),
    }
}

/// Reads until a status report arrives; returns its seq and report.
async fn next_status(hub: &mut HubEnd) -> (u64, StatusReport) {
    let mut skipped = Vec::new();
    hub.until(&mut skipped, |m| match m {
        Message::Status { seq, reports } => Some((*seq, reports[0].clone())),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn hello_says_what_the_outpost_holds_and_offers() {
    let mut h = Harness::new(TestRuntime::default());
    h.state.store_desired(&web(), 2, &json!({})).unwrap();
    h.state.record_applied(&web(), 2, true).unwrap();
    h.state.store_desired(&web(), 3, &json!({})).unwrap();
    h.state.enqueue_status(&web(), &json!({})).unwrap();
    h.state.enqueue_status(&web(), &json!({})).unwrap();
    h.state.ack_status(1).unwrap();
    h.start_link(LinkConfig::default()); // no reconciler: revision 3 stays unapplied

    let mut hub = h.next_hub().await;
    let Message::Hello {
        agent_version,
        os,
        arch,
        runtimes,
        capacity,
        devices,
        stages,
        outbox_from,
        features,
    } = hub.next().await
    else {
        panic!("the first frame is not hello");
    };
    assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        features,
        [
            trellis_link::protocol::FEATURE_STREAMS,
            trellis_link::protocol::FEATURE_LINK_PROFILE
        ],
        "an agent inside another program does not offer to update itself"
    );
    assert_eq!(os, std::env::consts::OS);
    // The harness's runner says amd64; architectures are named as OCI
    // platforms (and manifests) name them, not as Rust does.
    assert_eq!(arch, "amd64");
    assert_eq!(
        runtimes,
        vec![RuntimeInfo {
            name: "test".into(),
            version: "1.0".into()
        }]
    );
    assert!(capacity.cpus >= 1);
    assert!(devices.is_empty(), "the test runner offers no devices");
    if cfg!(target_os = "linux") {
        assert!(capacity.memory_bytes > 0);
        assert!(capacity.disk_free_bytes > 0);
    }
    assert_eq!(
        stages,
        vec![StageRevision {
            project: "shop".into(),
            stage: "web".into(),
            applied_revision: 2,
            desired_revision_held: 3,
        }]
    );
    assert_eq!(outbox_from, 2, "report 1 was acknowledged, 2 is pending");
    h.stop().await.unwrap();
}

#[tokio::test]
async fn an_empty_outbox_starts_after_the_last_number_used() {
    let mut h = Harness::new(TestRuntime::default());
    h.state.enqueue_status(&web(), &json!({})).unwrap();
    h.state.ack_status(1).unwrap();
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    let Message::Hello { outbox_from, .. } = hub.next().await else {
        panic!("not hello");
    };
    assert_eq!(outbox_from, 2);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn a_desired_state_is_persisted_before_it_is_acknowledged() {
    let mut h = Harness::new(TestRuntime::default());
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;

    hub.send(desired(4));
    let ack = hub.next().await;
    // The ack is observed: the state must hold the revision already.
    let held = h.state.desired(&web()).unwrap();
    assert_eq!(held, Some((4, json!({ "rev": 4 }))));
    assert_eq!(
        ack,
        Message::Ack {
            desired: vec![DesiredAck {
                project: "shop".into(),
                stage: "web".into(),
                revision: 4
            }]
        }
    );

    // Re-sent (lost ack): acknowledged again.
    hub.send(desired(4));
    assert_eq!(hub.next().await, ack);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn a_stale_desired_state_is_not_acknowledged_but_the_current_status_is_reported() {
    let mut h = Harness::new(TestRuntime::default());
    h.state.store_desired(&web(), 5, &json!({})).unwrap();
    h.state.record_applied(&web(), 5, true).unwrap();
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;

    hub.send(desired(3));
    let (_, report) = next_status(&mut hub).await;
    assert_eq!(report.applied_revision, 5);
    assert_eq!(
        h.state.store_desired(&web(), 3, &json!({})).unwrap(),
        StoreOutcome::Stale { held: 5 }
    );
    h.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_desired_states_are_refused_with_an_error_not_acknowledged() {
    let mut h = Harness::new(TestRuntime::default());
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;

    hub.send(Message::Desired {
        project: "..".into(),
        stage: "web".into(),
        revision: 1,
        state: json!({}),
    });
    assert!(
        matches!(hub.next().await, Message::Error { code, .. } if code == "invalid-stage-name")
    );
    hub.send(desired(0));
    assert!(
        matches!(hub.next().await, Message::Error { code, .. } if code == "desired-revision-zero")
    );
    assert!(h.state.stages().unwrap().is_empty());
    h.stop().await.unwrap();
}

#[tokio::test]
async fn status_is_sent_and_dropped_from_the_outbox_once_acknowledged() {
    let mut h = Harness::new(TestRuntime::default());
    h.start_reconciler();
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;

    hub.send(desired(1));
    let (seq, report) = next_status(&mut hub).await;
    assert_eq!(
        (report.project.as_str(), report.stage.as_str()),
        ("shop", "web")
    );
    assert_eq!(report.applied_revision, 1);
    assert_eq!(report.state, "running");
    assert_eq!(h.state.outbox_len().unwrap(), 1);

    hub.send(Message::StatusAck { up_to_seq: seq });
    let state = h.state.clone();
    eventually("the outbox is empty", || state.outbox_len().unwrap() == 0).await;
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn unacknowledged_status_is_resent_after_a_reconnect() {
    let mut h = Harness::new(TestRuntime::default());
    h.start_reconciler();
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;
    hub.send(desired(1));
    let (seq, first) = next_status(&mut hub).await;
    drop(hub); // the link breaks before the hub acknowledges

    let mut hub = h.next_hub().await;
    let Message::Hello {
        outbox_from,
        stages,
        ..
    } = hub.handshake(10).await
    else {
        unreachable!()
    };
    assert_eq!(outbox_from, seq);
    assert_eq!(stages[0].applied_revision, 1);
    let (again, report) = next_status(&mut hub).await;
    assert_eq!((again, report), (seq, first));

    hub.send(Message::StatusAck { up_to_seq: seq });
    let state = h.state.clone();
    eventually("the outbox is empty", || state.outbox_len().unwrap() == 0).await;

    // Acknowledged reports are not sent again on the next connection.
    drop(hub);
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;
    hub.send(desired(2));
    let (seq2, report) = next_status(&mut hub).await;
    assert!(seq2 > seq);
    assert_eq!(report.applied_revision, 2);
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retry_after_from_the_hub_is_honoured() {
    let mut h = Harness::new(TestRuntime::default());
    let config = LinkConfig::default();
    h.start_link(config);
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;
    hub.send(Message::RetryAfter {
        secs: 60,
        reason: "hub is busy".into(),
    });
    assert_eq!(hub.recv().await, None, "the agent closes the link");
    assert_eq!(hub.closed.lock().unwrap().as_deref(), Some("retry after"));

    let _hub = h.next_hub().await;
    let attempts = h.connector.attempts();
    let waited = attempts[1] - attempts[0];
    assert!(waited >= Duration::from_secs(60), "{waited:?}");
    assert!(waited <= Duration::from_secs(75), "{waited:?}");
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retry_after_from_a_refused_connection_is_honoured() {
    let mut h = Harness::new(TestRuntime::default());
    h.connector.fail_next(ConnectError {
        retry_after: Some(Duration::from_secs(20)),
        ..ConnectError::new("hub-busy", "admission limit")
    });
    h.start_link(LinkConfig::default());
    let _hub = h.next_hub().await;
    let attempts = h.connector.attempts();
    let waited = attempts[1] - attempts[0];
    assert!(
        waited >= Duration::from_secs(20) && waited <= Duration::from_secs(25),
        "{waited:?}"
    );
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn reconnect_delays_stay_under_the_cap_and_grow() {
    let mut h = Harness::new(TestRuntime::default());
    for _ in 0..12 {
        h.connector
            .fail_next(ConnectError::new("hub-refused", "connection refused"));
    }
    let mut config = LinkConfig::default();
    config.backoff.base = Duration::from_millis(500);
    config.backoff.cap = Duration::from_secs(8);
    h.start_link(config);
    let _hub = h.next_hub().await;

    let attempts = h.connector.attempts();
    assert_eq!(attempts.len(), 13);
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    for (n, gap) in gaps.iter().enumerate() {
        let ceiling = (Duration::from_millis(500) * (1 << n)).min(Duration::from_secs(8));
        // Each gap is the jittered sleep (tokio's timer adds at most 1 ms).
        assert!(
            *gap <= ceiling + Duration::from_millis(1),
            "gap {n}: {gap:?} > {ceiling:?}"
        );
    }
    let early: Duration = gaps[..3].iter().sum();
    let late: Duration = gaps[gaps.len() - 3..].iter().sum();
    assert!(late > early, "delays grow: {gaps:?}");
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn errors_met_while_disconnected_are_reported_once_the_link_is_back() {
    let mut h = Harness::new(TestRuntime::default());
    h.state.store_desired(&web(), 1, &json!({})).unwrap();
    h.state.record_applied(&web(), 1, true).unwrap();
    for _ in 0..3 {
        h.connector.fail_next(
            ConnectError::new("hub-dns-failed", "could not resolve hub.example")
                .with_hint("check DNS"),
        );
    }
    h.connector.fail_next(ConnectError::new(
        "hub-refused",
        "the hub refused the connection",
    ));
    let before = Utc::now();
    h.start_link(LinkConfig::default());

    let mut hub = h.next_hub().await;
    hub.handshake(10).await;
    let (_, report) = next_status(&mut hub).await;
    assert_eq!(report.applied_revision, 1);
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    let dns = report
        .errors
        .iter()
        .find(|e| e.code == "hub-dns-failed")
        .unwrap();
    assert_eq!(dns.count, 3);
    assert_eq!(dns.hint.as_deref(), Some("check DNS"));
    assert!(dns.first_seen >= before && dns.last_seen >= dns.first_seen);
    let refused = report
        .errors
        .iter()
        .find(|e| e.code == "hub-refused")
        .unwrap();
    assert_eq!(refused.count, 1);
    assert!(h.reporter.errors().is_empty(), "the log is cleared");

    // The next report of the stage carries no old errors.
    hub.send(desired(2));
    h.start_reconciler();
    let (_, report) = next_status(&mut hub).await;
    assert_eq!(report.applied_revision, 2);
    assert!(report.errors.is_empty());
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_link_is_dropped_after_three_heartbeats_and_reported() {
    let mut h = Harness::new(TestRuntime::default());
    h.state.store_desired(&web(), 1, &json!({})).unwrap();
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.mute.store(true, std::sync::atomic::Ordering::SeqCst);
    hub.handshake(5).await;
    let up = tokio::time::Instant::now();
    // Everything the agent sends until it gives up; then the link closes.
    while hub.recv().await.is_some() {}
    let silent_for = up.elapsed();
    assert!(
        silent_for >= Duration::from_secs(15) && silent_for < Duration::from_secs(16),
        "{silent_for:?}"
    );
    assert_eq!(hub.closed.lock().unwrap().as_deref(), Some("link silent"));

    // A live link (pongs answered) is kept far longer.
    let mut hub = h.next_hub().await;
    hub.handshake(5).await;
    let (_, report) = next_status(&mut hub).await;
    assert!(report.errors.iter().any(|e| e.code == "link-silent"));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(hub.closed.lock().unwrap().is_none());
    h.stop().await.unwrap();
}

#[tokio::test]
async fn revocation_stops_the_agent() {
    let mut h = Harness::new(TestRuntime::default());
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;
    hub.send(Message::Revoked {
        reason: "decommissioned".into(),
    });
    let result = h.link.take().unwrap().await.unwrap();
    let Err(AgentError::Revoked { reason }) = result else {
        panic!("{result:?}");
    };
    assert_eq!(reason, "decommissioned");
    let err = AgentError::Revoked { reason }.to_string();
    assert!(
        err.contains("revoked") && err.contains("trellis agent join"),
        "{err}"
    );
}

#[tokio::test]
async fn a_revoked_refusal_at_connect_stops_the_agent() {
    let mut h = Harness::new(TestRuntime::default());
    h.connector.fail_next(ConnectError {
        revoked: true,
        ..ConnectError::new("revoked", "outpost factory-7 was revoked")
    });
    h.start_link(LinkConfig::default());
    let result = h.link.take().unwrap().await.unwrap();
    assert!(
        matches!(result, Err(AgentError::Revoked { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn forget_removes_the_stage_so_its_revisions_may_start_over() {
    let mut h = Harness::new(TestRuntime::default());
    h.start_reconciler();
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;
    hub.send(desired(5));
    next_status(&mut hub).await;
    hub.send(Message::Forget {
        project: "shop".into(),
        stage: "web".into(),
    });
    hub.send(desired(1));
    let (_, report) = next_status(&mut hub).await;
    assert_eq!(report.applied_revision, 1);
    assert_eq!(*h.runtime.removed.lock().unwrap(), vec![web()]);
    assert_eq!(h.runtime.applied(), vec![5, 1]);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn a_certificate_near_expiry_is_renewed_over_the_link() {
    let ca = HubCa::generate("test hub CA").unwrap();
    let key = AgentKey::generate().unwrap();
    let csr = key.csr_pem("factory-7").unwrap();
    // Issued 80 days ago for 90 days: less than a third is left.
    let old = ca
        .issue_client_cert(
            &csr,
            "factory-7",
            Duration::from_secs(90 * 86_400),
            Utc::now() - chrono::Duration::days(80),
        )
        .unwrap();
    let identity = Identity {
        outpost: "factory-7".into(),
        hub_url: "https://hub.example:7443".into(),
        ca_cert_pem: ca.cert_pem().into(),
        cert_pem: old.cert_pem.clone(),
        key_pem: key.to_pem(),
    };
    let mut h = Harness::new(TestRuntime::default());
    h.state.set_identity(&identity).unwrap();
    h.start_link(LinkConfig::default());
    let mut hub = h.next_hub().await;
    hub.handshake(10).await;

    let Message::RenewCertificate { csr_pem } = hub.next().await else {
        panic!("expected renew-certificate");
    };
    // A certificate for someone else's key is refused.
    let stranger = AgentKey::generate().unwrap();
    let wrong = ca
        .issue_client_cert(
            &stranger.csr_pem("factory-7").unwrap(),
            "factory-7",
            Duration::from_secs(90 * 86_400),
            Utc::now(),
        )
        .unwrap();
    hub.send(Message::Certificate {
        cert_pem: wrong.cert_pem,
    });
    assert!(
        matches!(hub.next().await, Message::Error { code, .. } if code == "certificate-refused")
    );
    assert_eq!(h.state.identity().unwrap().unwrap().cert_pem, old.cert_pem);

    // The CSR is made with the agent's existing key.
    let new = ca
        .issue_client_cert(
            &csr_pem,
            "factory-7",
            Duration::from_secs(90 * 86_400),
            Utc::now(),
        )
        .unwrap();
    assert_eq!(new.public_key_fingerprint, old.public_key_fingerprint);
    hub.send(Message::Certificate {
        cert_pem: new.cert_pem.clone(),
    });
    let state = h.state.clone();
    let expected = new.cert_pem.clone();
    eventually("the renewed certificate is stored", || {
        state.identity().unwrap().unwrap().cert_pem == expected
    })
    .await;
    let stored = h.state.identity().unwrap().unwrap();
    assert_eq!(stored.key_pem, identity.key_pem, "the key is kept");
    h.stop().await.unwrap();
}
