//! `GET /api/v1/agent/packages/{digest}` over real TLS: a joined agent
//! fetches the package of a build released to a stage on its outpost with
//! its client certificate (through the agent's own `HubPackages`), resumes
//! with `Range`, and is refused without a certificate, for packages of
//! other outposts, for unknown digests and once revoked.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use trellis_agent::runtime::packages::{HubPackages, PackageSource};
use trellis_agent::{AgentState, STATE_FILE};
use trellis_hub::{Hub, HubOptions};
use trellis_link::identity::JoinToken;

struct TlsHub {
    addr: std::net::SocketAddr,
    admin: String,
    ca_pem: String,
    http: reqwest::Client,
    data: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> TlsHub {
    let data = tempfile::tempdir().unwrap();
    let hub = Hub::open(HubOptions {
        data_dir: data.path().join("hub"),
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
        data,
        _stop: stop,
    }
}

impl TlsHub {
    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("https://{}/api/v1{path}", self.addr))
            .bearer_auth(&self.admin);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Registers an outpost, joins an agent to it (the real `trellis agent
    /// join`) and returns the agent's state.
    async fn joined_agent(&self, name: &str) -> Arc<AgentState> {
        let (s, b) = self
            .api(
                reqwest::Method::POST,
                "/outposts",
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let token: JoinToken = b["join"]["token"].as_str().unwrap().parse().unwrap();
        let dir = self.data.path().join(format!("agent-{name}"));
        trellis_agent::join(&token, &dir).await.unwrap();
        Arc::new(AgentState::open(&dir.join(STATE_FILE)).unwrap())
    }

    /// A project with a stage on `outpost`, and a build with one process
    /// component whose package is `package`, released to that stage.
    async fn release_on(&self, outpost: &str, project: &str, package: &[u8]) -> String {
        let (s, b) = self
            .api(
                reqwest::Method::GET,
                &format!("/outposts/{outpost}/uri"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let uri = b["uri"].as_str().unwrap().to_owned();
        let (s, b) = self
            .api(
                reqwest::Method::POST,
                "/projects",
                Some(json!({"name": project})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (s, b) = self
            .api(
                reqwest::Method::POST,
                &format!("/projects/{project}/stages"),
                Some(json!({"name": "line", "type": "prod", "outpost_uri": uri})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let digest = self.upload(package).await;
        let manifest = "version: v1\ncomponents:\n  - name: sensor\n    process: {path: ./sensor, command: [./sensor]}\n";
        let (s, b) = self
            .api(
                reqwest::Method::POST,
                &format!("/projects/{project}/builds"),
                Some(json!({
                    "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
                    "manifest_file": "trellis.yaml", "manifest": manifest,
                    "components": [{"name": "sensor", "artifact":
                        {"kind": "package", "digest": digest, "size": package.len()}}]})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (s, b) = self
            .api(
                reqwest::Method::POST,
                &format!("/projects/{project}/stages/line/releases"),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        digest
    }

    async fn upload(&self, bytes: &[u8]) -> String {
        let digest = blake3::hash(bytes).to_hex().to_string();
        let resp = self
            .http
            .put(format!("https://{}/api/v1/blobs/{digest}", self.addr))
            .bearer_auth(&self.admin)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        digest
    }

    /// A client that presents the agent's certificate.
    async fn agent_http(&self, state: &AgentState) -> reqwest::Client {
        let id = state.identity().unwrap().unwrap();
        let pem = format!("{}\n{}", id.cert_pem, id.key_pem);
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    fn package_url(&self, digest: &str) -> String {
        format!("https://{}/api/v1/agent/packages/{digest}", self.addr)
    }
}

/// A real package: a packed directory with some incompressible content.
fn package() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut noise = vec![0u8; 300_000];
    blake3::Hasher::new()
        .update(b"noise")
        .finalize_xof()
        .fill(&mut noise);
    std::fs::write(dir.path().join("sensor"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(dir.path().join("model.bin"), &noise).unwrap();
    let mut out = Vec::new();
    trellis_cas::pack_dir(dir.path(), &mut out).unwrap();
    out
}

#[tokio::test]
async fn an_agent_fetches_its_packages_with_its_certificate_and_resumes_with_range() {
    let hub = start().await;
    let agent = hub.joined_agent("edge-1").await;
    let bytes = package();
    let digest = hub.release_on("edge-1", "plant", &bytes).await;

    // The agent's own fetcher: mTLS, verified, cached.
    let work = tempfile::tempdir().unwrap();
    let packages = HubPackages::new(agent.clone(), work.path().join("cache"));
    let dest = work.path().join("package.tar.zst");
    packages
        .fetch(&digest, bytes.len() as u64, &dest)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert_eq!(
        std::fs::read(work.path().join("cache").join(&digest)).unwrap(),
        bytes
    );
    // It unpacks.
    trellis_cas::unpack(
        std::fs::File::open(&dest).unwrap(),
        &work.path().join("unpacked"),
    )
    .unwrap();
    assert!(work.path().join("unpacked/model.bin").is_file());

    // A download broken off halfway resumes from the partial file.
    let cache = work.path().join("cache2");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(
        cache.join(format!("{digest}.partial")),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let resumed = HubPackages::new(agent.clone(), &cache);
    let dest2 = work.path().join("again.tar.zst");
    resumed
        .fetch(&digest, bytes.len() as u64, &dest2)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest2).unwrap(), bytes);
    assert!(!cache.join(format!("{digest}.partial")).exists());

    // The endpoint itself: 200 with the whole package, 206 for a range.
    let http = hub.agent_http(&agent).await;
    let resp = http.get(hub.package_url(&digest)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["accept-ranges"], "bytes");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &bytes[..]);
    let resp = http
        .get(hub.package_url(&digest))
        .header("Range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-{}/{}", bytes.len() - 1, bytes.len()).as_str()
    );
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &bytes[1000..]);
    let resp = http
        .get(hub.package_url(&digest))
        .header("Range", format!("bytes={}-", bytes.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "range-not-satisfiable");
}

#[tokio::test]
async fn packages_are_refused_without_a_certificate_to_other_outposts_unknown_and_revoked() {
    let hub = start().await;
    let agent = hub.joined_agent("edge-1").await;
    let other = hub.joined_agent("edge-2").await;
    let bytes = package();
    let digest = hub.release_on("edge-1", "plant", &bytes).await;

    // No client certificate: 401 with a JSON error.
    let resp = hub.http.get(hub.package_url(&digest)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "client-certificate-required");

    // An access key is no substitute for the agent's certificate.
    let resp = hub
        .http
        .get(hub.package_url(&digest))
        .bearer_auth(&hub.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Another outpost's agent does not get this outpost's package.
    let resp = hub
        .agent_http(&other)
        .await
        .get(hub.package_url(&digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // An unknown digest: 404 with a stable code, also through HubPackages.
    let unknown = blake3::hash(b"no such package").to_hex().to_string();
    let http = hub.agent_http(&agent).await;
    let resp = http.get(hub.package_url(&unknown)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "package-not-found");
    let work = tempfile::tempdir().unwrap();
    let packages = HubPackages::new(agent.clone(), work.path().join("cache"));
    let err = packages
        .fetch(&unknown, 10, &work.path().join("x"))
        .await
        .unwrap_err();
    assert_eq!(err.code, "package-not-found", "{err:?}");
    let resp = http
        .get(hub.package_url("not-a-digest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Revoked: refused, even though the certificate is still valid.
    let (s, _) = hub
        .api(reqwest::Method::POST, "/outposts/edge-1/revoke", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let resp = hub
        .agent_http(&agent)
        .await
        .get(hub.package_url(&digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "revoked");
    let err = packages
        .fetch(&digest, bytes.len() as u64, &work.path().join("y"))
        .await
        .unwrap_err();
    assert_eq!(err.code, "revoked", "{err:?}");
}
