//! The wire format, seen from outside: every message survives a round trip,
//! the JSON has the documented shape, and hostile frames produce errors with
//! the right code instead of panics.

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::json;
use trellis_link::frame::{
    FrameError, MAX_FRAME_BYTES, WireFrame, decode, decode_binary, encode, encode_wire,
};
use trellis_link::protocol::*;

fn t(secs: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

/// One example of every message. The match makes this fail to compile when
/// a variant is added without an example.
fn examples() -> Vec<Message> {
    let all = vec![
        Message::Hello {
            agent_version: "0.1.0".into(),
            os: "linux".into(),
            arch: "aarch64".into(),
            runtimes: vec![RuntimeInfo {
                name: "podman".into(),
                version: "5.2.1".into(),
            }],
            capacity: Capacity {
                cpus: 4,
                memory_bytes: 8 << 30,
                disk_free_bytes: u64::MAX,
            },
            devices: vec![
                DeviceOffer {
                    name: "camera".into(),
                    kind: "device".into(),
                    path: "/dev/video0".into(),
                    access: "rw".into(),
                    cdi: vec![],
                    exclusive: true,
                    projects: vec!["shop".into()],
                },
                DeviceOffer {
                    name: "gpu".into(),
                    kind: "gpu".into(),
                    path: String::new(),
                    access: String::new(),
                    cdi: vec!["nvidia.com/gpu=all".into()],
                    exclusive: false,
                    projects: vec![],
                },
            ],
            stages: vec![StageRevision {
                project: "shop".into(),
                stage: "line-3".into(),
                applied_revision: 6,
                desired_revision_held: 7,
            }],
            outbox_from: 41,
            features: vec!["streams".into()],
        },
        Message::Ack {
            desired: vec![DesiredAck {
                project: "shop".into(),
                stage: "line-3".into(),
                revision: 7,
            }],
        },
        Message::Status {
            seq: 42,
            reports: vec![StatusReport {
                project: "shop".into(),
                stage: "line-3".into(),
                applied_revision: 7,
                state: "running".into(),
                message: Some("all components up".into()),
                components: vec![ComponentStatus {
                    name: "web".into(),
                    state: "exited".into(),
                    restarts: 3,
                    exit_code: Some(-1),
                    ..Default::default()
                }],
                errors: vec![AgentError {
                    code: "image-pull-failed".into(),
                    message: "registry unreachable".into(),
                    hint: Some("check the outpost's DNS".into()),
                    first_seen: t(0),
                    last_seen: t(60),
                    count: 5,
                }],
                rolled_back_to: Some(6),
            }],
        },
        Message::RenewCertificate {
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n…".into(),
        },
        Message::Welcome {
            hub_version: "0.1.0".into(),
            heartbeat_secs: 15,
            server_time: t(1),
        },
        Message::Desired {
            project: "shop".into(),
            stage: "line-3".into(),
            revision: 8,
            state: json!({"components": [{"name": "web", "image": "sha256:ab"}], "n": 1}),
        },
        Message::Forget {
            project: "shop".into(),
            stage: "line-3".into(),
        },
        Message::StatusAck { up_to_seq: 42 },
        Message::Certificate {
            cert_pem: "-----BEGIN CERTIFICATE-----\n…".into(),
        },
        Message::RetryAfter {
            secs: 30,
            reason: "reconnect storm".into(),
        },
        Message::Revoked {
            reason: "outpost revoked by admin".into(),
        },
        Message::Error {
            code: "bad-request".into(),
            message: "nope".into(),
        },
        Message::Logs {
            id: 9,
            project: "shop".into(),
            stage: "line-3".into(),
            query: LogQuery {
                component: Some("web".into()),
                since: Some(t(5)),
                tail: Some(100),
                follow: true,
            },
        },
        Message::LogsCancel { id: 9 },
        Message::LogLines {
            id: 9,
            lines: vec![LogLine {
                time: t(6),
                component: "web".into(),
                replica: 1,
                stream: LogStream::Stderr,
                line: "listening on :8080 — ünïcode".into(),
            }],
            end: true,
            error: Some("the component has no logs yet".into()),
        },
        Message::Delivery {
            project: "shop".into(),
            stage: "line-3".into(),
            revision: 8,
            fetched: 3 << 20,
            total: 412 << 20,
            step: "fetching artifacts".into(),
        },
        Message::StreamOpen {
            id: 4,
            project: "shop".into(),
            stage: "line-3".into(),
            target: StreamTarget::Exec {
                component: "web".into(),
                replica: Some(1),
                command: vec!["sh".into(), "-c".into(), "echo hi".into()],
                tty: true,
                cols: 80,
                rows: 24,
            },
            window: 262_144,
        },
        Message::StreamOpened {
            id: 4,
            window: 262_144,
        },
        Message::StreamResize {
            id: 4,
            cols: 120,
            rows: 40,
        },
        Message::BackupJob {
            id: 9,
            project: "shop".into(),
            stage: "prod".into(),
            op: trellis_link::protocol::BackupOp::Restore,
        },
        Message::LinkProfile {
            heartbeat_secs: 300,
            delivery_open: false,
            opens_at: Some("2026-12-07T21:00:00Z".parse().unwrap()),
            opens: Some("22:00 Europe/Berlin".into()),
        },
        Message::StreamData {
            id: 4,
            channel: StreamChannel::Err,
            data: vec![0, 1, 2, 255].into(),
        },
        Message::StreamCredit {
            id: 4,
            bytes: 65_536,
            grow: Some(524_288),
        },
        Message::StreamEof { id: 4 },
        Message::AgentUpdate {
            id: 3,
            version: "0.2.0".into(),
            arch: "amd64".into(),
            artifact: "ab".repeat(32),
            digest: "cd".repeat(32),
            size: 12_000_000,
            deadline_secs: 120,
        },
        Message::AgentUpdateState {
            id: 3,
            version: "0.2.0".into(),
            state: "failed".into(),
            message: "agent 0.2.0 stopped before it linked; rolled back to agent 0.1.0".into(),
        },
        Message::AgentUpdateAck { id: 3 },
        Message::StreamClose {
            id: 4,
            exit_code: Some(1),
            error: Some(StreamError {
                code: "component-not-running".into(),
                message: "web is stopped".into(),
                hint: None,
            }),
        },
    ];
    for m in &all {
        match m {
            Message::Hello { .. }
            | Message::Ack { .. }
            | Message::Status { .. }
            | Message::RenewCertificate { .. }
            | Message::Welcome { .. }
            | Message::Desired { .. }
            | Message::Forget { .. }
            | Message::StatusAck { .. }
            | Message::Certificate { .. }
            | Message::RetryAfter { .. }
            | Message::Revoked { .. }
            | Message::Logs { .. }
            | Message::LogsCancel { .. }
            | Message::LogLines { .. }
            | Message::Delivery { .. }
            | Message::StreamOpen { .. }
            | Message::StreamOpened { .. }
            | Message::StreamResize { .. }
            | Message::BackupJob { .. }
            | Message::AgentUpdate { .. }
            | Message::AgentUpdateState { .. }
            | Message::AgentUpdateAck { .. }
            | Message::LinkProfile { .. }
            | Message::StreamData { .. }
            | Message::StreamCredit { .. }
            | Message::StreamEof { .. }
            | Message::StreamClose { .. }
            | Message::Error { .. } => {}
        }
    }
    all
}

#[test]
fn every_message_round_trips() {
    for (i, msg) in examples().into_iter().enumerate() {
        let env = Envelope::new(i as u64 + 1, msg);
        let bytes = encode(&env).unwrap();
        assert_eq!(decode(&bytes).unwrap(), env);
    }
}

#[test]
fn every_message_round_trips_as_it_goes_on_a_websocket() {
    for (i, msg) in examples().into_iter().enumerate() {
        let env = Envelope::new(i as u64 + 1, msg);
        let back = match encode_wire(&env).unwrap() {
            WireFrame::Text(text) => decode(text.as_bytes()).unwrap(),
            WireFrame::Binary(bytes) => {
                assert!(matches!(env.msg, Message::StreamData { .. }));
                decode_binary(&bytes).unwrap()
            }
        };
        assert_eq!(back, env);
    }
}

#[test]
fn hostile_binary_frames_are_errors() {
    let good = match encode_wire(&Envelope::new(
        9,
        Message::StreamData {
            id: 3,
            channel: StreamChannel::Out,
            data: b"hello".to_vec().into(),
        },
    ))
    .unwrap()
    {
        WireFrame::Binary(bytes) => bytes,
        WireFrame::Text(_) => panic!("stream data goes binary"),
    };
    assert_eq!(&good[..2], b"TS");
    for cut in 0..21 {
        assert_eq!(
            decode_binary(&good[..cut]).unwrap_err().code(),
            "frame-malformed"
        );
    }
    let mut other_version = good.clone();
    other_version[3] = 9;
    assert_eq!(
        decode_binary(&other_version).unwrap_err().code(),
        "unsupported-protocol-version"
    );
    let mut bad_channel = good.clone();
    bad_channel[20] = 7;
    assert_eq!(
        decode_binary(&bad_channel).unwrap_err().code(),
        "frame-malformed"
    );
    let huge = vec![b'T'; trellis_link::MAX_FRAME_BYTES + 1];
    assert_eq!(decode_binary(&huge).unwrap_err().code(), "frame-too-large");
    let empty_data = &good[..21];
    assert!(matches!(
        decode_binary(empty_data).unwrap().msg,
        Message::StreamData { ref data, .. } if data.is_empty()
    ));
}

#[test]
fn type_tags_are_the_documented_kebab_case_names() {
    let examples = examples();
    assert_eq!(examples.len(), MESSAGE_TYPES.len());
    for msg in examples {
        let value = serde_json::to_value(Envelope::new(1, msg.clone())).unwrap();
        assert_eq!(value["msg"]["type"], msg.kind());
        assert!(MESSAGE_TYPES.contains(&msg.kind()));
    }
}

#[test]
fn a_credit_without_growth_has_the_shape_older_peers_know_and_growth_is_a_field_they_skip() {
    let plain = Envelope::new(
        5,
        Message::StreamCredit {
            id: 4,
            bytes: 131_072,
            grow: None,
        },
    );
    let text = String::from_utf8(encode(&plain).unwrap()).unwrap();
    assert_eq!(
        text,
        r#"{"v":1,"seq":5,"msg":{"type":"stream-credit","id":4,"bytes":131072}}"#
    );
    assert_eq!(decode(text.as_bytes()).unwrap(), plain);
    // A peer that predates `grow` reads past fields it does not know, as
    // this version does: the credit still counts.
    let with_unknown =
        r#"{"v":1,"seq":5,"msg":{"type":"stream-credit","id":4,"bytes":131072,"later":7}}"#;
    assert_eq!(decode(with_unknown.as_bytes()).unwrap(), plain);
}

#[test]
fn wire_shape_is_stable() {
    let env = Envelope::new(
        3,
        Message::Welcome {
            hub_version: "0.1.0".into(),
            heartbeat_secs: 15,
            server_time: t(0),
        },
    );
    assert_eq!(
        String::from_utf8(encode(&env).unwrap()).unwrap(),
        r#"{"v":1,"seq":3,"msg":{"type":"welcome","hub_version":"0.1.0","heartbeat_secs":15,"server_time":"2023-11-14T22:13:20Z"}}"#
    );
    let ack =
        serde_json::to_string(&Envelope::new(4, Message::StatusAck { up_to_seq: 9 })).unwrap();
    assert_eq!(
        ack,
        r#"{"v":1,"seq":4,"msg":{"type":"status-ack","up_to_seq":9}}"#
    );
}

#[test]
fn unknown_fields_are_ignored_for_forward_compatibility() {
    let env = decode(
        br#"{"v":1,"seq":1,"future":true,"msg":{"type":"status-ack","up_to_seq":2,"extra":[1]}}"#,
    )
    .unwrap();
    assert_eq!(env.msg, Message::StatusAck { up_to_seq: 2 });
}

#[test]
fn optional_fields_may_be_omitted() {
    let env = decode(
        br#"{"v":1,"seq":1,"msg":{"type":"status","seq":1,"reports":[
            {"project":"p","stage":"s","applied_revision":0,"state":"linking"}]}}"#,
    )
    .unwrap();
    let Message::Status { reports, .. } = env.msg else {
        panic!("not status")
    };
    assert_eq!(reports[0].message, None);
    assert!(reports[0].components.is_empty());
}

#[test]
fn oversize_frames_are_refused_before_parsing() {
    let huge = vec![b' '; MAX_FRAME_BYTES + 1];
    let err = decode(&huge).unwrap_err();
    assert_eq!(err.code(), "frame-too-large");
    assert!(
        matches!(err, FrameError::TooLarge { len, max } if len == MAX_FRAME_BYTES + 1 && max == MAX_FRAME_BYTES)
    );

    let env = Envelope::new(
        1,
        Message::Desired {
            project: "p".into(),
            stage: "s".into(),
            revision: 1,
            state: json!("x".repeat(MAX_FRAME_BYTES)),
        },
    );
    assert_eq!(encode(&env).unwrap_err().code(), "frame-too-large");
}

#[test]
fn other_protocol_versions_are_reported_as_such() {
    for (frame, got) in [
        (r#"{"v":2,"seq":1,"msg":{"type":"hello"}}"#, 2),
        (r#"{"v":70000,"whatever":"changed"}"#, 70000),
        (r#"{"msg":{"type":"teleport"},"v":0}"#, 0),
    ] {
        let err = decode(frame.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            FrameError::UnsupportedVersion {
                got,
                supported: PROTOCOL_VERSION
            }
        );
        assert_eq!(err.code(), "unsupported-protocol-version");
        assert!(err.to_string().contains("upgrade"), "{err}");
    }
}

#[test]
fn unknown_message_types_are_reported_as_such() {
    let err = decode(br#"{"v":1,"seq":1,"msg":{"type":"teleport","to":"mars"}}"#).unwrap_err();
    assert_eq!(
        err,
        FrameError::UnknownMessageType {
            type_name: "teleport".into()
        }
    );
    assert_eq!(err.code(), "unknown-message-type");
}

/// Found by the `link_frame` fuzz target (the frame is in
/// `fuzz/seeds/link_frame/`): the unknown type name was cut to 300 bytes,
/// but the message shows it with `{:?}`, which writes each DEL (0x7f) as the
/// six bytes `\u{7f}`. This 237-byte frame made a message of over 1 KB, and
/// a 300-byte name one of about 2 KB.
#[test]
fn unknown_type_names_are_cut_after_escaping() {
    let del = |n: usize| "\u{7f}".repeat(n);
    let found = format!(
        r#"{{"v":1,"seq":3,"msg":{{"type":"sta{}a{}type{}tus","ports":[{{"project":"shop","lied_reback_to":6}}]}}}}"#,
        del(81),
        del(30),
        del(34)
    );
    assert_eq!(found.len(), 237);
    let frame = |name: &str| format!(r#"{{"v":1,"seq":1,"msg":{{"type":"{name}"}}}}"#);
    let cases = [
        found,
        frame(&del(1000)),
        // JSON escapes that decode to characters `Debug` escapes again.
        frame(&"\\u0001".repeat(1000)),
        frame(&"\\\"".repeat(1000)),
        frame(&"\u{200b}".repeat(1000)),
        frame(&"\u{e0001}".repeat(1000)),
        frame(&"x".repeat(10_000)),
    ];
    for frame in cases {
        let err = decode(frame.as_bytes()).unwrap_err();
        assert_eq!(err.code(), "unknown-message-type");
        let FrameError::UnknownMessageType { type_name } = &err else {
            unreachable!()
        };
        assert!(type_name.ends_with('…'), "{type_name:?}");
        let message = err.to_string();
        assert!(message.len() < 1000, "{} bytes: {message}", message.len());
    }
}

#[test]
fn hostile_frames_are_errors_not_panics() {
    let deep_array = "[".repeat(100_000);
    let deep_state = format!(
        r#"{{"v":1,"seq":1,"msg":{{"type":"desired","project":"p","stage":"s","revision":1,"state":{}}}}}"#,
        "[".repeat(10_000) + &"]".repeat(10_000)
    );
    let long_type = format!(
        r#"{{"v":1,"seq":1,"msg":{{"type":"{}"}}}}"#,
        "x".repeat(10_000)
    );
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        b"   ".to_vec(),
        vec![0xff, 0xfe, 0x00],
        b"{\"v\":1,\"seq\":1,\"msg\":{\"type\":\"error\",\"code\":\"\xff\",\"message\":\"\"}}".to_vec(),
        b"null".to_vec(),
        b"[1,2,3]".to_vec(),
        b"\"hello\"".to_vec(),
        b"{}".to_vec(),
        br#"{"v":"1","seq":1,"msg":{"type":"status-ack","up_to_seq":1}}"#.to_vec(),
        br#"{"v":-1,"seq":1}"#.to_vec(),
        br#"{"v":1.5,"seq":1}"#.to_vec(),
        br#"{"v":1e400,"seq":1}"#.to_vec(),
        br#"{"v":1,"seq":1e400,"msg":{"type":"status-ack","up_to_seq":1}}"#.to_vec(),
        br#"{"v":1,"seq":18446744073709551616,"msg":{"type":"status-ack","up_to_seq":1}}"#.to_vec(),
        br#"{"v":1,"seq":-1,"msg":{"type":"status-ack","up_to_seq":1}}"#.to_vec(),
        br#"{"v":1,"seq":1,"msg":{"type":"status-ack","up_to_seq":"1"}}"#.to_vec(),
        br#"{"v":1,"seq":1,"msg":{"type":"status-ack"}}"#.to_vec(),
        br#"{"v":1,"seq":1,"msg":{"type":7}}"#.to_vec(),
        br#"{"v":1,"seq":1,"msg":"hello"}"#.to_vec(),
        br#"{"v":1,"seq":1}"#.to_vec(),
        br#"{"v":1,"seq":1,"msg":{"type":"welcome","hub_version":"x","heartbeat_secs":15,"server_time":"yesterday"}}"#.to_vec(),
        br#"{"v":1,"seq":1,"msg":{"type":"retry-after","secs":4294967296,"reason":""}}"#.to_vec(),
        br#"{"v":1,"seq":1,"msg":{"type":"status-ack","up_to_seq":1}} trailing"#.to_vec(),
        br#"{"v":1,"v":1,"seq":1,"msg":{"type":"status-ack","up_to_seq":1}}"#.to_vec(),
        deep_array.into_bytes(),
        deep_state.into_bytes(),
    ];
    for frame in cases {
        let err = decode(&frame).unwrap_err();
        assert_eq!(
            err.code(),
            "frame-malformed",
            "{:?}: {err}",
            String::from_utf8_lossy(&frame[..frame.len().min(80)])
        );
        assert!(err.to_string().len() < 1000, "error too long: {err}");
    }
    let err = decode(long_type.as_bytes()).unwrap_err();
    assert_eq!(err.code(), "unknown-message-type");
    assert!(err.to_string().len() < 1000);
}

#[test]
fn every_truncation_of_a_valid_frame_is_an_error() {
    for msg in examples() {
        let bytes = encode(&Envelope::new(1, msg)).unwrap();
        for end in 0..bytes.len() {
            assert!(
                decode(&bytes[..end]).is_err(),
                "prefix of {end} bytes decoded"
            );
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn json_like_text_never_panics(s in r#"[{}\[\]":,0-9a-z.eE+\- ]{0,300}"#) {
        let _ = decode(s.as_bytes());
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        which in 0usize..12,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let msg = examples().swap_remove(which);
        let mut bytes = encode(&Envelope::new(1, msg)).unwrap();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(env) = decode(&bytes) {
            // Whatever decodes must encode and decode to itself.
            prop_assert_eq!(decode(&encode(&env).unwrap()).unwrap(), env);
        }
    }
}
