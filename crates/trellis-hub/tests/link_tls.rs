//! The link over real TLS and WebSockets: enrolment with a join token,
//! mutual TLS, the registered-key check, admission, and revocation closing
//! a live link within a second. The "agent" here is a minimal client built
//! from `trellis-link`'s identity pieces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message as Ws;
use trellis_hub::link::LinkSettings;
use trellis_hub::{Hub, HubOptions};
use trellis_link::identity::{AgentKey, JoinToken, client_config};
use trellis_link::protocol::Capacity;
use trellis_link::{Envelope, Message, decode, encode};

struct TlsHub {
    addr: std::net::SocketAddr,
    admin: String,
    ca_pem: String,
    http: reqwest::Client,
    _data: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(link: LinkSettings) -> TlsHub {
    let data = tempfile::tempdir().unwrap();
    let hub = Hub::open(HubOptions {
        data_dir: data.path().join("hub"),
        link,
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = hub.first_admin_key().unwrap().to_string();
    let ca_pem = std::fs::read_to_string(data.path().join("hub/ca.pem")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(hub.serve_tls(listener, async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    TlsHub {
        addr,
        admin,
        ca_pem,
        http,
        _data: data,
        _stop: stop,
    }
}

impl TlsHub {
    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (reqwest::StatusCode, Value) {
        let resp = self
            .http
            .request(method, format!("https://{}/api/v1{path}", self.addr))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Registers an outpost and returns its join token.
    async fn outpost(&self, name: &str) -> JoinToken {
        let (s, b) = self
            .api(reqwest::Method::POST, "/outposts", json!({"name": name}))
            .await;
        assert_eq!(s, 201, "{b}");
        assert!(
            b["join"]["command"]
                .as_str()
                .unwrap()
                .starts_with("trellis agent join https://127.0.0.1:")
        );
        b["join"]["token"].as_str().unwrap().parse().unwrap()
    }

    async fn join(&self, token: &JoinToken, key: &AgentKey) -> (reqwest::StatusCode, Value) {
        let body = json!({
            "outpost": token.outpost,
            "token_secret": hex::encode(token.secret),
            "csr_pem": key.csr_pem(&token.outpost).unwrap(),
        });
        let resp = self
            .http
            .post(format!("{}/api/v1/agent/join", token.hub_url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    /// Opens `/link/v1` with a client certificate; returns the socket or
    /// the HTTP status of the refusal.
    async fn link(
        &self,
        cert_pem: &str,
        key: &AgentKey,
    ) -> Result<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>, u16>
    {
        let config = client_config(&self.ca_pem, Some((cert_pem, &key.to_pem()))).unwrap();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = TlsConnector::from(Arc::clone(&config))
            .connect(name, tcp)
            .await
            .unwrap();
        match tokio_tungstenite::client_async(format!("wss://{}/link/v1", self.addr), tls).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("unexpected WebSocket error: {e}"),
        }
    }
}

fn hello() -> Ws {
    let env = Envelope::new(
        1,
        Message::Hello {
            agent_version: "test".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            runtimes: vec![],
            capacity: Capacity {
                cpus: 2,
                memory_bytes: 1 << 30,
                disk_free_bytes: 1 << 30,
            },
            devices: vec![],
            stages: vec![],
            outbox_from: 0,
            features: vec![],
        },
    );
    Ws::Text(String::from_utf8(encode(&env).unwrap()).unwrap().into())
}

async fn next_frame<S>(ws: &mut S) -> Option<Message>
where
    S: StreamExt<Item = Result<Ws, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Ws::Text(t) => return Some(decode(t.as_bytes()).unwrap().msg),
            Ws::Close(_) => return None,
            _ => continue,
        }
    }
    None
}

#[tokio::test]
async fn an_agent_joins_once_links_with_mtls_and_is_cut_off_within_a_second_of_revocation() {
    let hub = start(LinkSettings::default()).await;
    let token = hub.outpost("factory-7").await;
    let key = AgentKey::generate().unwrap();
    let (s, issued) = hub.join(&token, &key).await;
    assert_eq!(s, 200, "{issued}");
    assert_eq!(issued["outpost"], "factory-7");
    assert_eq!(issued["ca_pem"].as_str().unwrap(), hub.ca_pem);
    // The token works once.
    let (s, again) = hub.join(&token, &AgentKey::generate().unwrap()).await;
    assert_eq!(s, 401);
    assert_eq!(again["error"]["code"], "join-token-used");

    let cert = issued["cert_pem"].as_str().unwrap();
    let mut ws = hub.link(cert, &key).await.expect("the link opens");
    ws.send(hello()).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Some(Message::Welcome { .. })
    ));

    // A certificate for another key (same outpost name, other CA-issued
    // cert) is not the registered key: refused before the upgrade.
    let (s, _) = hub
        .api(
            reqwest::Method::POST,
            "/outposts/factory-7/join-tokens",
            json!({}),
        )
        .await;
    assert_eq!(s, 201);

    let started = Instant::now();
    let (s, _) = hub
        .api(
            reqwest::Method::POST,
            "/outposts/factory-7/revoke",
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let closed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match next_frame(&mut ws).await {
                None => break,
                Some(m) => eprintln!("after revocation: {m:?}"),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the link was still open a second after revocation"
    );
    eprintln!("revocation closed the link in {:?}", started.elapsed());
    // And it is refused from now on.
    assert_eq!(hub.link(cert, &key).await.err(), Some(403));
}

#[tokio::test]
async fn only_the_registered_key_may_link_and_tokens_expire() {
    let hub = start(LinkSettings::default()).await;
    let token = hub.outpost("edge").await;
    let key = AgentKey::generate().unwrap();
    let (_, issued) = hub.join(&token, &key).await;
    // Re-join with a new token and a new key: the old key is no longer registered.
    let (_, t2) = hub
        .api(
            reqwest::Method::POST,
            "/outposts/edge/join-tokens",
            json!({}),
        )
        .await;
    let token2: JoinToken = t2["token"].as_str().unwrap().parse().unwrap();
    let key2 = AgentKey::generate().unwrap();
    let (s, issued2) = hub.join(&token2, &key2).await;
    assert_eq!(s, 200);
    assert_eq!(
        hub.link(issued["cert_pem"].as_str().unwrap(), &key)
            .await
            .err(),
        Some(403)
    );
    assert!(
        hub.link(issued2["cert_pem"].as_str().unwrap(), &key2)
            .await
            .is_ok()
    );
    // Renewal after expiry: only for the registered key.
    let renew = |csr: String| {
        let http = hub.http.clone();
        let url = format!("https://{}/api/v1/agent/renew", hub.addr);
        async move {
            let r = http
                .post(url)
                .json(&json!({"outpost": "edge", "csr_pem": csr}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, b) = renew(key2.csr_pem("edge").unwrap()).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = renew(key.csr_pem("edge").unwrap()).await;
    assert_eq!((s, b["error"]["code"].as_str()), (403, Some("unknown-key")));
    // An expired token is refused with its own code.
    let (_, t3) = hub
        .api(
            reqwest::Method::POST,
            "/outposts/edge/join-tokens",
            json!({"ttl_secs": 1}),
        )
        .await;
    let token3: JoinToken = t3["token"].as_str().unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, b) = hub.join(&token3, &AgentKey::generate().unwrap()).await;
    assert_eq!(
        (s.as_u16(), b["error"]["code"].as_str()),
        (401, Some("join-token-expired"))
    );
    // A made-up token is unknown.
    let fake = JoinToken {
        secret: [9; 32],
        ..token3
    };
    let (s, b) = hub.join(&fake, &AgentKey::generate().unwrap()).await;
    assert_eq!(
        (s.as_u16(), b["error"]["code"].as_str()),
        (401, Some("join-token-unknown"))
    );
    // Without a client certificate the link endpoint says what is missing.
    let r = hub
        .http
        .get(format!("https://{}/link/v1", hub.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "client-certificate-required");
}

#[tokio::test]
async fn links_beyond_the_admission_rate_are_told_when_to_retry() {
    let hub = start(LinkSettings {
        admissions_per_sec: 2,
        ..LinkSettings::default()
    })
    .await;
    let token = hub.outpost("edge").await;
    let key = AgentKey::generate().unwrap();
    let (_, issued) = hub.join(&token, &key).await;
    let cert = issued["cert_pem"].as_str().unwrap();
    let mut refused = 0;
    let mut sockets = Vec::new();
    for _ in 0..6 {
        match hub.link(cert, &key).await {
            Ok(ws) => sockets.push(ws),
            Err(code) => {
                assert_eq!(code, 503);
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 3,
        "only {refused} of 6 rapid links were refused at 2/s"
    );
}

#[tokio::test]
async fn hostile_frames_drop_only_that_link() {
    let hub = start(LinkSettings::default()).await;
    let token = hub.outpost("edge").await;
    let key = AgentKey::generate().unwrap();
    let (_, issued) = hub.join(&token, &key).await;
    let cert = issued["cert_pem"].as_str().unwrap().to_owned();

    // An unknown protocol version is named as such, and the link dropped.
    let mut ws = hub.link(&cert, &key).await.unwrap();
    ws.send(hello()).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Some(Message::Welcome { .. })
    ));
    ws.send(Ws::Text(
        r#"{"v":99,"seq":2,"msg":{"type":"ack","desired":[]}}"#.into(),
    ))
    .await
    .unwrap();
    match next_frame(&mut ws).await {
        Some(Message::Error { code, message }) => {
            assert_eq!(code, "unsupported-protocol-version", "{message}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    assert!(
        next_frame(&mut ws).await.is_none(),
        "the link must be closed"
    );

    // Garbage: the same.
    let mut ws = hub.link(&cert, &key).await.unwrap();
    ws.send(hello()).await.unwrap();
    let _ = next_frame(&mut ws).await;
    ws.send(Ws::Text("{not json".into())).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Some(Message::Error { .. })
    ));
    assert!(next_frame(&mut ws).await.is_none());

    // Oversized: refused by the WebSocket layer before it is parsed.
    let mut ws = hub.link(&cert, &key).await.unwrap();
    ws.send(hello()).await.unwrap();
    let _ = next_frame(&mut ws).await;
    let big = "x".repeat(trellis_link::MAX_FRAME_BYTES + 1024);
    let _ = ws.send(Ws::Text(big.into())).await;
    // The hub may say why before it closes; either way the link ends.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = next_frame(&mut ws).await {
            assert!(
                matches!(frame, Message::Error { .. }),
                "unexpected {frame:?}"
            );
        }
    })
    .await;
    assert!(ended.is_ok(), "an oversized message must end the link");

    // Nothing else is affected: a new link works, and so does the API.
    let mut ws = hub.link(&cert, &key).await.unwrap();
    ws.send(hello()).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Some(Message::Welcome { .. })
    ));
    let (s, _) = hub.api(reqwest::Method::GET, "/outposts", json!({})).await;
    assert_eq!(s, 200);
}
