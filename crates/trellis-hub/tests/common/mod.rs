//! A hub started in-process on 127.0.0.1:0 with a fresh data directory,
//! driven through its real HTTP API.

#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

use chrono::Utc;
use trellis_hub::{Hub, HubOptions};
use trellis_link::identity::{KeyFingerprint, PeerIdentity};
use trellis_link::mem::{MemLink, pair};
use trellis_link::protocol::{Capacity, StageRevision};
use trellis_link::{Envelope, Incoming, LinkIo, Message};

pub use reqwest::Method as M;

pub struct TestHub {
    pub base: String,
    pub admin: String,
    /// The hub's shared state, for tests that attach link sessions directly.
    pub state: trellis_hub::state::AppState,
    http: reqwest::Client,
    _data: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn start() -> TestHub {
    let data = tempfile::tempdir().unwrap();
    let hub = Hub::open(HubOptions {
        data_dir: data.path().join("hub"),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = hub.first_admin_key().unwrap().to_string();
    let state = hub.state().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(hub.serve(listener, async {
        let _ = stopped.await;
    }));
    TestHub {
        base,
        admin,
        state,
        http: reqwest::Client::new(),
        _data: data,
        _stop: stop,
    }
}

impl TestHub {
    pub async fn call(
        &self,
        key: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Uploads agent `version` for x86-64: an ELF header for that
    /// machine, which is what the hub checks of a binary.
    pub async fn put_agent_binary(&self, version: &str) {
        let mut elf = vec![0u8; 64];
        elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        elf[16] = 2; // an executable
        elf[18] = 62; // for x86-64
        let put = self
            .http
            .put(format!("{}/agent-binaries/{version}/x86_64", self.base))
            .bearer_auth(&self.admin)
            .body(elf)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::CREATED);
    }

    pub async fn user(&self, name: &str) -> String {
        let (status, body) = self
            .call(
                Some(&self.admin),
                reqwest::Method::POST,
                "/users",
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["key"].as_str().unwrap().to_owned()
    }
}

/// Project `shop` with stage `line3` on outpost `edge`, and one build of
/// `manifest` whose components are `components` (`[{name, artifact}]`).
pub async fn shop_line3_on_edge(hub: &TestHub, manifest: &str, components: Value) {
    let admin = Some(hub.admin.as_str());
    hub.call(admin, M::POST, "/outposts", Some(json!({"name": "edge"})))
        .await;
    hub.call(admin, M::POST, "/projects", Some(json!({"name": "shop"})))
        .await;
    let (_, uri) = hub.call(admin, M::GET, "/outposts/edge/uri", None).await;
    let (s, b) = hub
        .call(
            admin,
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "line3", "type": "prod", "outpost_uri": uri["uri"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = hub
        .call(
            admin,
            M::POST,
            "/projects/shop/builds",
            Some(json!({
                "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
                "manifest_file": "trellis.yaml", "manifest": manifest,
                "components": components})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

/// The identity of outpost `edge` as a session sees it.
pub fn peer() -> PeerIdentity {
    peer_of("edge")
}

/// The identity of `outpost` as a session sees it.
pub fn peer_of(outpost: &str) -> PeerIdentity {
    PeerIdentity {
        outpost: outpost.into(),
        serial_hex: "01".into(),
        not_after: Utc::now() + chrono::Duration::days(30),
        public_key_fingerprint: KeyFingerprint([7; 32]),
    }
}

/// A scripted agent of outpost `edge` over an in-memory link, holding
/// revisions of stage `shop/line3`.
pub struct ScriptedAgent {
    pub link: MemLink,
    pub seq: u64,
}

impl ScriptedAgent {
    pub async fn connect(hub: &TestHub, held: &[(u64, u64)]) -> ScriptedAgent {
        ScriptedAgent::connect_as(hub, held, "test", &[]).await
    }

    /// Connects announcing agent `version` and `features` in its hello.
    pub async fn connect_as(
        hub: &TestHub,
        held: &[(u64, u64)],
        version: &str,
        features: &[&str],
    ) -> ScriptedAgent {
        ScriptedAgent::connect_outpost(hub, "edge", held, version, features).await
    }

    /// [`ScriptedAgent::connect_as`] for the agent of `outpost`.
    pub async fn connect_outpost(
        hub: &TestHub,
        outpost: &str,
        held: &[(u64, u64)],
        version: &str,
        features: &[&str],
    ) -> ScriptedAgent {
        let (hub_end, agent_end) = pair();
        tokio::spawn(trellis_hub::link::session::run(
            Box::new(hub_end),
            peer_of(outpost),
            hub.state.clone(),
        ));
        let mut agent = ScriptedAgent {
            link: agent_end,
            seq: 0,
        };
        let stages = held
            .iter()
            .map(|&(applied, desired)| StageRevision {
                project: "shop".into(),
                stage: "line3".into(),
                applied_revision: applied,
                desired_revision_held: desired,
            })
            .collect();
        agent
            .send(Message::Hello {
                agent_version: version.into(),
                os: "linux".into(),
                arch: "x86_64".into(),
                runtimes: vec![],
                capacity: Capacity {
                    cpus: 2,
                    memory_bytes: 1 << 30,
                    disk_free_bytes: 1 << 30,
                },
                devices: vec![],
                stages,
                outbox_from: 0,
                features: features.iter().map(|f| (*f).to_owned()).collect(),
            })
            .await;
        match agent.next().await {
            Message::Welcome { heartbeat_secs, .. } => assert!(heartbeat_secs > 0),
            other => panic!("expected welcome, got {other:?}"),
        }
        agent
    }

    pub async fn send(&mut self, msg: Message) {
        self.seq += 1;
        self.link.send(&Envelope::new(self.seq, msg)).await.unwrap();
    }

    /// The next frame from the hub (pongs skipped), within 5 s.
    pub async fn next(&mut self) -> Message {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.link.recv()).await {
                Ok(Ok(Some(Incoming::Frame(env)))) => return env.msg,
                Ok(Ok(Some(Incoming::Pong(_) | Incoming::Ping))) => continue,
                other => panic!("expected a frame from the hub, got {other:?}"),
            }
        }
    }

    /// Reports agent update `id` (to version 0.2.0) in `state`.
    pub async fn report_update(&mut self, id: u64, state: &str, message: &str) {
        self.send(Message::AgentUpdateState {
            id,
            version: "0.2.0".into(),
            state: state.into(),
            message: message.into(),
        })
        .await;
    }

    /// The next frame from the hub that `pick` takes, others skipped.
    pub async fn next_such<T>(&mut self, mut pick: impl FnMut(Message) -> Option<T>) -> T {
        for _ in 0..20 {
            if let Some(found) = pick(self.next().await) {
                return found;
            }
        }
        panic!("the hub did not send the frame looked for");
    }

    /// Nothing arrives for a while.
    pub async fn quiet(&mut self) {
        if let Ok(Ok(Some(Incoming::Frame(env)))) =
            tokio::time::timeout(Duration::from_millis(300), self.link.recv()).await
        {
            panic!("expected nothing from the hub, got {:?}", env.msg);
        }
    }
}
