//! Three hub instances on one PostgreSQL database (the test kit's, a
//! database per test), each serving real TLS on loopback: a change made
//! through one reaches an agent linked to another; status read through any
//! is live and names the instance holding the link; a newer link-up fences
//! the older one wherever it is; revocation closes a link held by another
//! instance within a second; logs are read through any instance; a link
//! held by a dead instance is shown offline; an instance with another CA or
//! cluster key is refused at start. Skipped without PostgreSQL (except
//! under `CI`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message as Ws;
use trellis_hub::chunks::Chunks;
use trellis_hub::cluster::secrets::ClusterKey;
use trellis_hub::link::LinkSettings;
use trellis_hub::{Hub, HubOptions};
use trellis_link::identity::{AgentKey, JoinToken, client_config};
use trellis_link::protocol::{Capacity, LogLine, LogStream};
use trellis_link::{Envelope, Message, decode, encode};

const HEARTBEAT: Duration = Duration::from_secs(2);

struct Instance {
    addr: std::net::SocketAddr,
    id: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Cluster {
    hubs: Vec<Instance>,
    admin: String,
    ca_pem: String,
    http: reqwest::Client,
    db: trellis_testkit::postgres::TestDatabase,
    data: tempfile::TempDir,
    key: ClusterKey,
}

fn settings() -> LinkSettings {
    LinkSettings {
        heartbeat: HEARTBEAT,
        ..LinkSettings::default()
    }
}

async fn open_instance(
    db: &str,
    dir: &std::path::Path,
    chunks: &Chunks,
    key: &ClusterKey,
) -> anyhow::Result<Hub> {
    Hub::open(HubOptions {
        data_dir: dir.to_owned(),
        store: Some(db.to_owned()),
        chunk_store: Some(chunks.clone()),
        cluster_key: Some(key.clone()),
        no_local_outpost: true,
        link: settings(),
        ..Default::default()
    })
    .await
}

/// `n` instances on a fresh database, sharing one artifact directory (as
/// instances on several hosts would share an S3 bucket).
async fn cluster(n: usize) -> Option<Cluster> {
    let server = trellis_testkit::postgres::server()?;
    let db = server.database();
    let data = tempfile::tempdir().unwrap();
    let chunks = Chunks::dir(&data.path().join("artifacts")).unwrap();
    let key = ClusterKey::parse(&hex::encode(rand::random::<[u8; 32]>())).unwrap();
    let mut hubs = Vec::new();
    let mut admin = None;
    for i in 0..n {
        let hub = open_instance(
            &db.url,
            &data.path().join(format!("hub-{i}")),
            &chunks,
            &key,
        )
        .await
        .unwrap();
        if let Some(key) = hub.first_admin_key() {
            admin = Some(key.to_string());
        }
        let id = hub.state().cluster().id().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(hub.serve_tls(listener, async {
            let _ = stopped.await;
        }));
        hubs.push(Instance {
            addr,
            id,
            stop: Some(stop),
        });
    }
    let ca_pem = std::fs::read_to_string(data.path().join("hub-0/ca.pem")).unwrap();
    for i in 1..n {
        assert_eq!(
            std::fs::read_to_string(data.path().join(format!("hub-{i}/ca.pem"))).unwrap(),
            ca_pem,
            "every instance uses the cluster's CA"
        );
    }
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    Some(Cluster {
        hubs,
        admin: admin.expect("the first instance made the administrator key"),
        ca_pem,
        http,
        db,
        data,
        key,
    })
}

impl Cluster {
    async fn api(
        &self,
        hub: usize,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        let resp = self
            .http
            .request(
                method,
                format!("https://{}/api/v1{path}", self.hubs[hub].addr),
            )
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn metric(&self, hub: usize, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("https://{}/metrics", self.hubs[hub].addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    /// Registers an outpost through hub `via` and joins a key to it, also
    /// through `via`. Returns the certificate and key.
    async fn joined(&self, via: usize, name: &str) -> (String, AgentKey) {
        let (s, b) = self
            .api(
                via,
                reqwest::Method::POST,
                "/outposts",
                json!({"name": name}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let token: JoinToken = b["join"]["token"].as_str().unwrap().parse().unwrap();
        let key = AgentKey::generate().unwrap();
        let resp = self
            .http
            .post(format!("https://{}/api/v1/agent/join", self.hubs[via].addr))
            .json(&json!({
                "outpost": token.outpost,
                "token_secret": hex::encode(token.secret),
                "csr_pem": key.csr_pem(&token.outpost).unwrap(),
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let issued: Value = resp.json().await.unwrap();
        (issued["cert_pem"].as_str().unwrap().to_owned(), key)
    }

    /// A link of that identity to hub `to`, after hello and welcome.
    async fn link(&self, to: usize, cert_pem: &str, key: &AgentKey) -> Link {
        let addr = self.hubs[to].addr;
        let config = client_config(&self.ca_pem, Some((cert_pem, &key.to_pem()))).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = TlsConnector::from(Arc::clone(&config))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/link/v1"), tls)
            .await
            .unwrap();
        ws.send(hello()).await.unwrap();
        let mut link = Link { ws, seq: 1 };
        assert!(matches!(link.next().await, Some(Message::Welcome { .. })));
        link
    }

    /// An exec of component web of plant/line through hub `via`: its
    /// stdout and exit code, or the refusal's status and body.
    async fn exec(&self, via: usize, query: &str) -> Result<(String, Option<i32>), (u16, String)> {
        let addr = self.hubs[via].addr;
        let config = client_config(&self.ca_pem, None).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = TlsConnector::from(Arc::clone(&config))
            .connect(name, tcp)
            .await
            .unwrap();
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request =
            format!("wss://{addr}/api/v1/projects/plant/stages/line/components/web/exec?{query}")
                .into_client_request()
                .unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.admin).parse().unwrap(),
        );
        let mut ws = match tokio_tungstenite::client_async(request, tls).await {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => {
                let body = String::from_utf8_lossy(answer.body().as_deref().unwrap_or_default())
                    .into_owned();
                return Err((answer.status().as_u16(), body));
            }
            Err(e) => panic!("the exec's WebSocket failed: {e}"),
        };
        let mut output = Vec::new();
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Ws::Binary(bytes) if bytes.first() == Some(&1) => {
                    output.extend_from_slice(&bytes[1..]);
                }
                Ws::Text(text) => {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    if v["type"] == "exit" {
                        return Ok((
                            String::from_utf8(output).unwrap(),
                            v["code"].as_i64().map(|c| c as i32),
                        ));
                    }
                    assert_ne!(v["type"], "error", "{v}");
                }
                Ws::Close(_) => break,
                _ => {}
            }
        }
        panic!("the exec ended without an exit code");
    }

    async fn status(&self, via: usize, project: &str, stage: &str) -> Value {
        let (s, b) = self
            .api(
                via,
                reqwest::Method::GET,
                &format!("/projects/{project}/stages/{stage}/outpost-status"),
                Value::Null,
            )
            .await;
        assert_eq!(s, 200, "{b}");
        b
    }

    /// A project with a stage on `outpost` and a build of one image
    /// component, through hub `via`.
    async fn stage_on(&self, via: usize, outpost: &str) {
        let (_, b) = self
            .api(
                via,
                reqwest::Method::GET,
                &format!("/outposts/{outpost}/uri"),
                Value::Null,
            )
            .await;
        let uri = b["uri"].as_str().unwrap().to_owned();
        let (s, b) = self
            .api(
                via,
                reqwest::Method::POST,
                "/projects",
                json!({"name": "plant"}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = self
            .api(
                via,
                reqwest::Method::POST,
                "/projects/plant/stages",
                json!({"name": "line", "type": "prod", "outpost_uri": uri}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = self
            .api(
                via,
                reqwest::Method::POST,
                "/projects/plant/builds",
                json!({
                    "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
                    "manifest_file": "trellis.yaml",
                    "manifest": "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: web:1\n",
                    "components": [{"name": "web", "artifact": {"kind": "image", "reference": "web:1"}}]}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
}

struct Link {
    ws: tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
    seq: u64,
}

impl Link {
    /// The next frame; `None` once the hub closed the link.
    async fn next(&mut self) -> Option<Message> {
        while let Some(Ok(msg)) = self.ws.next().await {
            match msg {
                Ws::Text(t) => return Some(decode(t.as_bytes()).unwrap().msg),
                Ws::Close(_) => return None,
                _ => continue,
            }
        }
        None
    }

    async fn send(&mut self, msg: Message) {
        self.seq += 1;
        let env = Envelope::new(self.seq, msg);
        let frame = match trellis_link::frame::encode_wire(&env).unwrap() {
            trellis_link::frame::WireFrame::Text(text) => Ws::Text(text.into()),
            trellis_link::frame::WireFrame::Binary(bytes) => Ws::Binary(bytes.into()),
        };
        self.ws.send(frame).await.unwrap();
    }

    /// Waits at most `within` for the hub to close the link.
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async { while self.next().await.is_some() {} })
            .await
            .is_ok()
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
            features: vec![trellis_link::protocol::FEATURE_STREAMS.into()],
        },
    );
    Ws::Text(String::from_utf8(encode(&env).unwrap()).unwrap().into())
}

/// Polls `f` until it is true, for at most `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A release pushed through A reaches a real agent linked to B, and its
/// status read through C is live: in sync, online, held by B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_through_one_hub_reaches_an_agent_on_another() {
    let Some(c) = cluster(3).await else { return };
    // The agent joins through B, so B's address is the one it dials.
    let (s, b) = c
        .api(
            1,
            reqwest::Method::POST,
            "/outposts",
            json!({"name": "edge-1"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let token: JoinToken = b["join"]["token"].as_str().unwrap().parse().unwrap();
    let dir = c.data.path().join("agent");
    trellis_agent::join(&token, &dir).await.unwrap();
    let runner = Arc::new(trellis_agent::runner::RecordOnly::new(&dir));
    let (stop_agent, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn({
        let dir = dir.clone();
        async move {
            trellis_agent::run(
                &dir,
                trellis_agent::AgentOptions {
                    runtime: Some(runner),
                    ..Default::default()
                },
                async {
                    let _ = stopped.await;
                },
            )
            .await
        }
    });
    c.stage_on(0, "edge-1").await;
    eventually(
        Duration::from_secs(20),
        "the agent linking to B",
        || async { c.status(2, "plant", "line").await["link"]["state"] == "online" },
    )
    .await;
    let status = c.status(2, "plant", "line").await;
    assert_eq!(
        status["link"]["instance"],
        c.hubs[1].id.as_str(),
        "{status}"
    );

    let pushed = Instant::now();
    let (s, b) = c
        .api(
            0,
            reqwest::Method::POST,
            "/projects/plant/stages/line/releases",
            json!({}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let revision = b["revision"].as_u64().unwrap();
    eventually(
        Duration::from_secs(10),
        "the release applied on B's agent",
        || async {
            let status = c.status(2, "plant", "line").await;
            status["sync"]["state"] == "in-sync" && status["sync"]["applied_revision"] == revision
        },
    )
    .await;
    eprintln!(
        "pushed through A, applied via B, seen through C in {:?}",
        pushed.elapsed()
    );
    assert!(c.metric(1, "trellis_cluster_notifications_total").await >= 1.0);
    let _ = stop_agent.send(());
    let _ = agent.await;
}

/// A newer link-up of an outpost, on another instance, ends the older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_link_up_fences_the_older_one_on_another_hub() {
    let Some(c) = cluster(3).await else { return };
    let (cert, key) = c.joined(0, "edge-1").await;
    c.stage_on(0, "edge-1").await;
    let mut on_b = c.link(1, &cert, &key).await;
    // "Newer" is the order of the claims in the store: wait until B's is
    // there before C's link-up (an agent's next connection comes after its
    // last one broke, so it always is in practice).
    let holder = |hub: usize| {
        let c = &c;
        async move {
            let b = c.status(0, "plant", "line").await;
            b["link"]["instance"] == c.hubs[hub].id.as_str() && b["link"]["state"] == "online"
        }
    };
    eventually(Duration::from_secs(5), "B shown as the holder", || {
        holder(1)
    })
    .await;
    let fenced_before = c.metric(1, "trellis_link_sessions_fenced_total").await;
    let _on_c = c.link(2, &cert, &key).await;
    assert!(
        on_b.closed_within(Duration::from_secs(3)).await,
        "B's session was not ended by the newer one on C"
    );
    assert!(c.metric(1, "trellis_link_sessions_fenced_total").await > fenced_before);
    eventually(Duration::from_secs(5), "C shown as the holder", || {
        holder(2)
    })
    .await;
}

/// Revoking through A closes the link B holds within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_a_link_held_by_another_hub_within_a_second() {
    let Some(c) = cluster(2).await else { return };
    let (cert, key) = c.joined(0, "edge-1").await;
    let mut on_b = c.link(1, &cert, &key).await;
    let started = Instant::now();
    let (s, _) = c
        .api(
            0,
            reqwest::Method::POST,
            "/outposts/edge-1/revoke",
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        on_b.closed_within(Duration::from_secs(1)).await,
        "B's link was still open a second after revocation through A"
    );
    eprintln!(
        "revocation through A closed B's link in {:?}",
        started.elapsed()
    );
}

/// Logs read through C come from the agent linked to B: C forwards the
/// request to B, which asks the agent over its link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_read_through_any_hub() {
    let Some(c) = cluster(3).await else { return };
    let (cert, key) = c.joined(0, "edge-1").await;
    c.stage_on(0, "edge-1").await;
    let (s, _) = c
        .api(
            0,
            reqwest::Method::POST,
            "/projects/plant/stages/line/releases",
            json!({}),
        )
        .await;
    assert_eq!(s, 201);
    let mut on_b = c.link(1, &cert, &key).await;
    // The agent's side: answer the log request B sends.
    let agent = tokio::spawn(async move {
        while let Some(msg) = on_b.next().await {
            if let Message::Logs { id, .. } = msg {
                let lines = (0..3)
                    .map(|n| LogLine {
                        time: chrono::Utc::now(),
                        component: "web".into(),
                        replica: 0,
                        stream: LogStream::Stdout,
                        line: format!("line {n} from the agent on B"),
                    })
                    .collect();
                on_b.send(Message::LogLines {
                    id,
                    lines,
                    end: true,
                    error: None,
                })
                .await;
            }
        }
    });
    eventually(Duration::from_secs(5), "C seeing the link on B", || async {
        c.status(2, "plant", "line").await["link"]["state"] == "online"
    })
    .await;
    let resp = c
        .http
        .get(format!(
            "https://{}/api/v1/projects/plant/stages/line/logs?tail=10",
            c.hubs[2].addr
        ))
        .bearer_auth(&c.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("line 2 from the agent on B"), "{text}");
    assert_eq!(
        c.metric(2, "trellis_cluster_forwarded_requests_total")
            .await,
        1.0
    );
    // A forwarded request's signature is checked: a forged one is refused.
    let forged = c
        .http
        .get(format!(
            "https://{}/api/v1/projects/plant/stages/line/logs",
            c.hubs[1].addr
        ))
        .header(
            "x-trellis-forwarded",
            format!("i-x admin {} 00", chrono::Utc::now().timestamp()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    agent.abort();
}

/// An exec asked of C runs on the agent linked to B: C relays the
/// WebSocket to B, which checks, limits, records and opens the stream over
/// its link; a refusal by the agent comes back through C as B's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_open_through_any_hub() {
    let Some(c) = cluster(3).await else { return };
    let (cert, key) = c.joined(0, "edge-1").await;
    c.stage_on(0, "edge-1").await;
    let (s, _) = c
        .api(
            0,
            reqwest::Method::POST,
            "/projects/plant/stages/line/releases",
            json!({}),
        )
        .await;
    assert_eq!(s, 201);
    let mut on_b = c.link(1, &cert, &key).await;
    // The agent's side: run "echo" by answering it, refuse the rest.
    let agent = tokio::spawn(async move {
        while let Some(msg) = on_b.next().await {
            let Message::StreamOpen { id, target, .. } = msg else {
                continue;
            };
            let trellis_link::protocol::StreamTarget::Exec { command, .. } = target else {
                continue;
            };
            if command[0] != "echo" {
                on_b.send(Message::StreamClose {
                    id,
                    exit_code: None,
                    error: Some(trellis_link::protocol::StreamError {
                        code: "component-not-running".into(),
                        message: "component \"web\" is stopped".into(),
                        hint: None,
                    }),
                })
                .await;
                continue;
            }
            on_b.send(Message::StreamOpened {
                id,
                window: trellis_link::stream::WINDOW_BYTES,
            })
            .await;
            on_b.send(Message::StreamData {
                id,
                channel: trellis_link::protocol::StreamChannel::Out,
                data: format!("{} (from the agent on B)\n", command[1..].join(" "))
                    .into_bytes()
                    .into(),
            })
            .await;
            on_b.send(Message::StreamClose {
                id,
                exit_code: Some(7),
                error: None,
            })
            .await;
        }
    });
    eventually(Duration::from_secs(5), "C seeing the link on B", || async {
        c.status(2, "plant", "line").await["link"]["state"] == "online"
    })
    .await;

    let (output, code) = c.exec(2, "command=echo&command=hi").await.unwrap();
    assert_eq!(output, "hi (from the agent on B)\n");
    assert_eq!(code, Some(7));
    assert_eq!(
        c.metric(2, "trellis_cluster_forwarded_requests_total")
            .await,
        1.0
    );
    // The agent's refusal, through C, is B's answer.
    let (status, body) = c.exec(2, "command=false").await.unwrap_err();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("component-not-running"), "{body}");
    // B recorded both, once each; any instance reads it.
    let (s, audit) = c
        .api(
            0,
            reqwest::Method::GET,
            "/projects/plant/audit",
            Value::Null,
        )
        .await;
    assert_eq!(s, 200, "{audit}");
    let entries = audit.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{audit:#}");
    assert_eq!(entries[1]["detail"], "echo hi");
    assert_eq!(entries[1]["result"], "opened");
    assert_eq!(entries[0]["result"], "component-not-running");
    agent.abort();
}

/// A link held by an instance that stopped beating is shown offline, never
/// online from a stale claim; and an instance's health says what it reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_held_by_a_dead_hub_is_shown_offline() {
    let Some(mut c) = cluster(2).await else {
        return;
    };
    let (cert, key) = c.joined(0, "edge-1").await;
    c.stage_on(0, "edge-1").await;
    let _on_b = c.link(1, &cert, &key).await;
    eventually(Duration::from_secs(5), "A seeing the link on B", || async {
        c.status(0, "plant", "line").await["link"]["state"] == "online"
    })
    .await;
    // B dies without a word: its beats stop and its claim stays (the store
    // is written here as a killed process would have left it).
    let store = trellis_store::postgres::PgStore::open(
        &c.db.url,
        &trellis_store::postgres::PgOptions::default(),
    )
    .await
    .unwrap();
    let stopped_at = Instant::now();
    drop(c.hubs[1].stop.take());
    // A graceful stop releases B's claims; put the claim back as a SIGKILL
    // would have left it, with B's last beat.
    eventually(Duration::from_secs(5), "B's claim released", || async {
        trellis_store::Store::link_claim(&store, "edge-1")
            .await
            .unwrap()
            .is_some_and(|c| c.released_at.is_some())
    })
    .await;
    trellis_store::Store::claim_links(
        &store,
        &c.hubs[1].id,
        &["edge-1".to_owned()],
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    eventually(HEARTBEAT * 2, "A showing the outpost offline", || async {
        let status = c.status(0, "plant", "line").await;
        status["link"]["state"] == "offline"
            && status["link"]["last_disconnect"]
                .as_str()
                .is_some_and(|d| d.contains("stopped answering"))
    })
    .await;
    eprintln!("shown offline {:?} after B stopped", stopped_at.elapsed());

    let health: Value = c
        .http
        .get(format!("https://{}/api/v1/health", c.hubs[0].addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["store"]["ok"], true);
    assert_eq!(health["chunks"]["ok"], true);
    assert_eq!(health["instance"], c.hubs[0].id.as_str());
    store.close().await;
}

/// An instance whose data directory holds another CA, or that has another
/// cluster key, does not start, and says what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_another_ca_or_key_is_refused() {
    let Some(c) = cluster(1).await else { return };
    let chunks = Chunks::dir(&c.data.path().join("artifacts")).unwrap();
    // A hub that ran on its own before: its own CA.
    let own = c.data.path().join("standalone");
    Hub::open(HubOptions {
        data_dir: own.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let refused = open_instance(&c.db.url, &own, &chunks, &c.key)
        .await
        .err()
        .expect("an instance with another CA must not start")
        .to_string();
    assert!(
        refused.contains("is not the CA of the hubs sharing this database"),
        "{refused}"
    );
    assert!(refused.contains("Remove ca.pem and ca.key"), "{refused}");

    let other_key = ClusterKey::parse(&hex::encode([7u8; 32])).unwrap();
    let fresh = c.data.path().join("fresh");
    let refused = open_instance(&c.db.url, &fresh, &chunks, &other_key)
        .await
        .err()
        .expect("an instance with another cluster key must not start")
        .to_string();
    assert!(refused.contains("another cluster key"), "{refused}");
    assert!(refused.contains("TRELLIS_CLUSTER_KEY"), "{refused}");
    // A new instance writes the cluster's CA and secrets once it has them,
    // never ones of its own first: the refused one left none behind.
    for file in ["ca.pem", "ca.key", "link.secret", "config.key"] {
        assert!(
            !fresh.join(file).exists(),
            "a refused new instance left {file} of its own"
        );
    }
}

/// The console signed in on one instance works on another (they share the
/// session key), and its outposts page says which instance holds a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_across_hubs_and_shows_the_holder() {
    let Some(c) = cluster(3).await else { return };
    let (cert, key) = c.joined(0, "edge-1").await;
    c.stage_on(0, "edge-1").await;
    let _on_b = c.link(1, &cert, &key).await;
    eventually(Duration::from_secs(5), "the link on B recorded", || async {
        c.status(0, "plant", "line").await["link"]["instance"] == c.hubs[1].id.as_str()
    })
    .await;
    let browser = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(c.ca_pem.as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let a = format!("https://{}", c.hubs[0].addr);
    let signed_in = browser
        .post(format!("{a}/login"))
        .header("Origin", &a)
        .form(&[("key", c.admin.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = browser
        .get(format!("https://{}/outposts", c.hubs[2].addr))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "a session signed by A is good on C");
    let html = page.text().await.unwrap();
    assert!(html.contains("Hub instance"), "{html}");
    assert!(
        html.contains(c.hubs[1].id.as_str()),
        "the holder B is named: {html}"
    );
}

/// Config values are sealed with the config key, which every instance
/// shares through the store: a secret written through one instance is read
/// through another, the database holds it only sealed, and an instance
/// whose data directory brings another config key is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_values_sealed_by_one_hub_open_on_another() {
    let Some(c) = cluster(2).await else { return };
    c.joined(0, "edge-1").await;
    c.stage_on(0, "edge-1").await;
    let secret = "s3cr3t-across-hubs";
    let (s, b) = c
        .api(
            0,
            reqwest::Method::POST,
            "/projects/plant/stages/line/configs/app/data",
            json!({"env": {"USER": "shop", "PASSWORD": secret}, "files": {},
                   "secret_env": ["PASSWORD"]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = c
        .api(
            1,
            reqwest::Method::GET,
            "/projects/plant/stages/line/configs/app?with_values=true",
            Value::Null,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["env"]["PASSWORD"], secret, "{b}");
    assert_eq!(b["data"]["env"]["USER"], "shop", "{b}");
    let key = |i: usize| {
        std::fs::read_to_string(c.data.path().join(format!("hub-{i}/config.key"))).unwrap()
    };
    assert_eq!(key(0).trim(), key(1).trim(), "one config key for all");

    // In the database only sealed: the store itself, without the hub's
    // seal, hands out what it holds.
    let raw = trellis_store::postgres::PgStore::open(
        &c.db.url,
        &trellis_store::postgres::PgOptions::default(),
    )
    .await
    .unwrap();
    let text = serde_json::to_string(
        &trellis_store::Store::get_config(&raw, "plant", "line", "app")
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(!text.contains(secret), "{text}");
    assert!(!text.contains("\"shop\""), "{text}");
    raw.close().await;

    // A data directory with a config key of its own does not join.
    let chunks = Chunks::dir(&c.data.path().join("artifacts")).unwrap();
    let own = c.data.path().join("own-config-key");
    std::fs::create_dir_all(&own).unwrap();
    for file in ["ca.pem", "ca.key", "link.secret"] {
        std::fs::copy(c.data.path().join("hub-0").join(file), own.join(file)).unwrap();
    }
    std::fs::write(own.join("config.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let refused = open_instance(&c.db.url, &own, &chunks, &c.key)
        .await
        .err()
        .expect("an instance with another config key must not start")
        .to_string();
    assert!(refused.contains("config key"), "{refused}");
}
