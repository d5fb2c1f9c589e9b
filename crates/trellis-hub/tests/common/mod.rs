//! A hub started in-process on 127.0.0.1:0 with a fresh data directory,
//! driven through its real HTTP API.

#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use trellis_hub::{Hub, HubOptions};

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
