//! The real transports against small stand-ins for the hub on loopback: the
//! join over CA-pinned TLS (success, wrong CA, refused token), renewal of an
//! expired certificate, and the link connector (mutual TLS + WebSocket,
//! `503 Retry-After`, `403 revoked`, frames both ways).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use trellis_agent::link::Connector;
use trellis_agent::ws::HubConnector;
use trellis_agent::{AgentState, Identity, JoinError, join};
use trellis_link::identity::{AgentKey, HubCa, JoinToken, server_config};
use trellis_link::{Envelope, Incoming, Message};

const NINETY_DAYS: Duration = Duration::from_secs(90 * 86_400);

/// A hub CA and a TLS acceptor for 127.0.0.1 signed by it.
fn hub_tls() -> (Arc<HubCa>, TlsAcceptor) {
    let ca = HubCa::generate("test hub CA").unwrap();
    let (cert, key) = ca
        .issue_server_cert(&[], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
        .unwrap();
    let config = server_config(&ca, &cert, &key).unwrap();
    (Arc::new(ca), TlsAcceptor::from(config))
}

/// Serves one HTTPS request per connection: `answer(path, body)` gives the
/// status and JSON body.
async fn https_hub(
    acceptor: TlsAcceptor,
    answer: impl Fn(&str, Value) -> (u16, Value) + Send + Sync + 'static,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return; // the client refused our certificate
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, length) = loop {
                    let n = tls.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "client went away mid-request");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .unwrap_or(0);
                        break (pos + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = tls.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let path = head.split_whitespace().nth(1).unwrap().to_owned();
                let body: Value = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
                let (status, reply) = answer(&path, body);
                let reply = reply.to_string();
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                tls.write_all(response.as_bytes()).await.unwrap();
                tls.shutdown().await.ok();
            });
        }
    });
    url
}

fn token(url: &str, ca: &HubCa) -> JoinToken {
    JoinToken {
        hub_url: url.into(),
        outpost: "factory-7".into(),
        secret: [9; 32],
        ca_fingerprint: ca.fingerprint(),
    }
}

fn issuing(ca: Arc<HubCa>) -> impl Fn(&str, Value) -> (u16, Value) + Send + Sync + 'static {
    move |path, body| {
        if path != "/api/v1/agent/join" && path != "/api/v1/agent/renew" {
            return (404, json!({}));
        }
        if path.ends_with("join") {
            assert_eq!(body["token_secret"], "09".repeat(32));
        }
        let issued = ca
            .issue_client_cert(
                body["csr_pem"].as_str().unwrap(),
                body["outpost"].as_str().unwrap(),
                NINETY_DAYS,
                Utc::now(),
            )
            .unwrap();
        (
            200,
            json!({
                "outpost": body["outpost"],
                "cert_pem": issued.cert_pem,
                "ca_pem": ca.cert_pem(),
                "not_after": issued.not_after,
            }),
        )
    }
}

#[tokio::test]
async fn join_stores_an_identity_issued_for_a_key_made_on_the_host() {
    let (ca, acceptor) = hub_tls();
    let url = https_hub(acceptor, issuing(ca.clone())).await;
    let dir = tempfile::tempdir().unwrap();

    let identity = join(&token(&url, &ca), dir.path()).await.unwrap();
    assert_eq!(identity.outpost, "factory-7");
    assert_eq!(identity.hub_url, url);
    assert_eq!(identity.ca_cert_pem, ca.cert_pem());
    assert!(identity.key_pem.contains("PRIVATE KEY"));

    let state = AgentState::open(&dir.path().join("agent.redb")).unwrap();
    assert_eq!(state.identity().unwrap(), Some(identity));
}

#[tokio::test]
async fn join_refuses_a_hub_whose_certificate_the_token_does_not_name() {
    let (_ca, acceptor) = hub_tls();
    let other = HubCa::generate("another CA").unwrap();
    let url = https_hub(acceptor, |_, _| panic!("nothing may be sent")).await;
    let dir = tempfile::tempdir().unwrap();

    let err = join(&token(&url, &other), dir.path()).await.unwrap_err();
    assert!(matches!(err, JoinError::WrongCa { .. }), "{err:?}");
    assert_eq!(err.code(), "hub-ca-mismatch");
    let text = err.to_string();
    assert!(
        text.contains("not signed by the CA this token names; is this the right hub?"),
        "{text}"
    );
    let state = AgentState::open(&dir.path().join("agent.redb")).unwrap();
    assert_eq!(state.identity().unwrap(), None);
}

#[tokio::test]
async fn join_says_which_refusal_and_what_to_do() {
    let (ca, acceptor) = hub_tls();
    let url = https_hub(acceptor, |_, _| {
        (
            401,
            json!({"error": {"code": "join-token-used", "message": "the join token was used", "hint": null}}),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let err = join(&token(&url, &ca), dir.path()).await.unwrap_err();
    assert_eq!(err.code(), "join-token-used");
    let text = err.to_string();
    assert!(
        text.contains("already used") && text.contains("new one"),
        "{text}"
    );
}

#[tokio::test]
async fn join_reports_an_unreachable_hub_with_a_hint() {
    let (ca, _) = hub_tls();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    drop(listener); // nothing listens there now
    let dir = tempfile::tempdir().unwrap();
    let err = join(&token(&url, &ca), dir.path()).await.unwrap_err();
    assert_eq!(err.code(), "hub-refused", "{err}");
    assert!(
        err.to_string().contains("check that the hub is running"),
        "{err}"
    );
}

/// How a [`link_hub`] refuses the upgrade: status, headers, body.
type Refusal = (u16, Vec<(&'static str, String)>, String);

/// A link endpoint: mutual TLS, then either a refusal (status, headers,
/// body) or a WebSocket that answers `hello` with `welcome` and echoes the
/// outpost name the client certificate carries.
async fn link_hub(acceptor: TlsAcceptor, refusal: Option<Refusal>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let outpost = trellis_link::identity::peer_identity(&peer)
            .unwrap()
            .outpost;
        // The callback's signature is tungstenite's; its large error type is
        // not ours to box.
        #[allow(clippy::result_large_err)]
        let callback = |request: &Request, response: Response| {
            assert_eq!(request.uri().path(), "/link/v1");
            match refusal {
                None => Ok(response),
                Some((status, headers, body)) => {
                    let mut refused = ErrorResponse::new(Some(body));
                    *refused.status_mut() = StatusCode::from_u16(status).unwrap();
                    for (name, value) in headers {
                        refused.headers_mut().insert(name, value.parse().unwrap());
                    }
                    Err(refused)
                }
            }
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
            return;
        };
        while let Some(Ok(message)) = ws.next().await {
            if let WsMessage::Text(text) = message {
                let envelope = trellis_link::decode(text.as_bytes()).unwrap();
                assert_eq!(envelope.msg.kind(), "hello");
                let reply = Envelope::new(
                    1,
                    Message::Error {
                        code: "hello-from".into(),
                        message: outpost.clone(),
                    },
                );
                let bytes = trellis_link::encode(&reply).unwrap();
                ws.send(WsMessage::text(String::from_utf8(bytes).unwrap()))
                    .await
                    .unwrap();
            }
        }
    });
    url
}

fn joined_identity(url: &str, ca: &HubCa, valid_from: chrono::DateTime<Utc>) -> Identity {
    let key = AgentKey::generate().unwrap();
    let cert = ca
        .issue_client_cert(
            &key.csr_pem("factory-7").unwrap(),
            "factory-7",
            NINETY_DAYS,
            valid_from,
        )
        .unwrap();
    Identity {
        outpost: "factory-7".into(),
        hub_url: url.into(),
        ca_cert_pem: ca.cert_pem().into(),
        cert_pem: cert.cert_pem,
        key_pem: key.to_pem(),
    }
}

fn connector_for(identity: &Identity) -> (tempfile::TempDir, Arc<AgentState>, HubConnector) {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(AgentState::open(&dir.path().join("agent.redb")).unwrap());
    state.set_identity(identity).unwrap();
    let connector = HubConnector::new(state.clone()).with_timeout(Duration::from_secs(10));
    (dir, state, connector)
}

#[tokio::test]
async fn the_link_carries_frames_and_pings_both_ways() {
    let (ca, acceptor) = hub_tls();
    let url = link_hub(acceptor, None).await;
    let identity = joined_identity(&url, &ca, Utc::now());
    let (_dir, _state, connector) = connector_for(&identity);
    let mut io = connector.connect().await.unwrap();

    let hello = Message::Hello {
        agent_version: "0".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        runtimes: Vec::new(),
        capacity: trellis_link::protocol::Capacity {
            cpus: 1,
            memory_bytes: 1,
            disk_free_bytes: 1,
        },
        devices: vec![],
        stages: Vec::new(),
        outbox_from: 1,
        features: vec![],
    };
    io.send(&Envelope::new(1, hello)).await.unwrap();
    let reply = io.recv().await.unwrap().unwrap();
    let Incoming::Frame(Envelope {
        msg: Message::Error { code, message },
        ..
    }) = reply
    else {
        panic!("{reply:?}");
    };
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("hello-from", "factory-7")
    );

    io.ping(b"hb".to_vec()).await.unwrap();
    assert_eq!(
        io.recv().await.unwrap(),
        Some(Incoming::Pong(b"hb".to_vec()))
    );
    io.close("test over").await;
}

#[tokio::test]
async fn the_connector_honours_an_admission_limit() {
    let (ca, acceptor) = hub_tls();
    let url = link_hub(
        acceptor,
        Some((503, vec![("retry-after", "7".into())], String::new())),
    )
    .await;
    let (_dir, _state, connector) = connector_for(&joined_identity(&url, &ca, Utc::now()));
    let err = connector.connect().await.err().unwrap();
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)), "{err:?}");
    assert!(!err.revoked);
}

#[tokio::test]
async fn the_connector_stops_on_revocation() {
    let (ca, acceptor) = hub_tls();
    let body = json!({"error": {"code": "revoked", "message": "outpost factory-7 was revoked"}});
    let url = link_hub(acceptor, Some((403, Vec::new(), body.to_string()))).await;
    let (_dir, _state, connector) = connector_for(&joined_identity(&url, &ca, Utc::now()));
    let err = connector.connect().await.err().unwrap();
    assert!(err.revoked, "{err:?}");
    assert_eq!(err.code, "revoked");
}

#[tokio::test]
async fn an_expired_certificate_is_renewed_over_https_before_connecting() {
    let (ca, acceptor) = hub_tls();
    // One port serves the renewal, then (a new connection) nothing else is
    // needed: the test only checks that the stored certificate was renewed.
    let url = https_hub(acceptor, issuing(ca.clone())).await;
    let expired = joined_identity(&url, &ca, Utc::now() - chrono::Duration::days(100));
    let (_dir, state, connector) = connector_for(&expired);

    // The HTTPS stand-in cannot upgrade to a WebSocket, so the connect
    // itself fails after the renewal.
    let _ = connector.connect().await;
    let stored = state.identity().unwrap().unwrap();
    assert_ne!(stored.cert_pem, expired.cert_pem, "renewed");
    assert_eq!(stored.key_pem, expired.key_pem, "same key");
}

#[tokio::test]
async fn the_link_leaves_from_the_source_address_given() {
    let (ca, acceptor) = hub_tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (_dir, _state, connector) = connector_for(&joined_identity(&url, &ca, Utc::now()));
    let source: IpAddr = Ipv4Addr::new(127, 0, 3, 7).into();
    let connector = connector.with_source(Some(source));
    let accepted = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        // Complete the TLS handshake so the connector gets as far as the
        // upgrade, which this stand-in then refuses by hanging up.
        let _ = acceptor.accept(tcp).await;
        peer
    });
    let _ = connector.connect().await;
    assert_eq!(accepted.await.unwrap().ip(), source);
}

#[tokio::test]
async fn a_source_address_not_of_this_host_is_named_in_the_error() {
    let (ca, _acceptor) = hub_tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (_dir, _state, connector) = connector_for(&joined_identity(&url, &ca, Utc::now()));
    // TEST-NET-1: no host has it.
    let connector = connector.with_source(Some(Ipv4Addr::new(192, 0, 2, 1).into()));
    let err = connector.connect().await.err().unwrap();
    assert!(err.message.contains("192.0.2.1 as the source"), "{err:?}");
}
