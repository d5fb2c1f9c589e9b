//! Artifacts over real TLS: a client uploads only the chunks the hub lacks;
//! a joined agent fetches the chunks of a build released to a stage on its
//! outpost with its client certificate (through the agent's own
//! `HubArtifacts`), resumes an interrupted delivery without fetching
//! complete chunks again, refuses a chunk damaged in the hub's store, and
//! is refused without a certificate, for other outposts' artifacts, for
//! unknown digests and once revoked; the hub collects what no build needs.
//! Every one of these runs twice: on the directory store (`dir::…`) and on
//! S3 (`s3::…`, SeaweedFS from the test kit, a bucket per test). The entry
//! point's HTTPS certificate, the other endpoint an agent calls with its
//! certificate, is here too.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use trellis_agent::runtime::artifacts::{ArtifactSource, HubArtifacts};
use trellis_agent::{AgentState, STATE_FILE};
use trellis_cas::{ArtifactKind, ChunkStore, Digest, Durability, PutArtifact};
use trellis_hub::chunks::Chunks;
use trellis_hub::chunks::s3::{Credentials, S3Chunks, S3Location};
use trellis_hub::{Hub, HubOptions};
use trellis_link::identity::JoinToken;

struct TlsHub {
    addr: std::net::SocketAddr,
    admin: String,
    ca_pem: String,
    http: reqwest::Client,
    data: tempfile::TempDir,
    /// The hub's artifact store, as the hub sees it.
    chunks: Chunks,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Where the hub keeps its chunks.
#[derive(Debug, Clone)]
enum Backend {
    Dir,
    S3,
    /// A bucket on a SeaweedFS server of the test's own, at this endpoint.
    PrivateS3(String),
}

fn s3_chunks(endpoint: &str, bucket: &str, prefix: &str, secret: &str) -> Chunks {
    let location =
        S3Location::parse(&format!("s3://{bucket}/{prefix}?endpoint={endpoint}")).unwrap();
    let credentials = Credentials::new(trellis_testkit::seaweedfs::ACCESS_KEY, secret);
    Chunks::new(Arc::new(
        S3Chunks::new(location, Some(credentials)).unwrap(),
    ))
}

/// The artifact store of a hub with data directory `hub_dir`: its
/// `artifacts/`, or a new bucket on the test kit's SeaweedFS (`None` when
/// SeaweedFS cannot run here: the test is skipped).
fn chunk_store(backend: Backend, hub_dir: &std::path::Path) -> Option<Chunks> {
    match backend {
        Backend::Dir => Some(Chunks::dir(&hub_dir.join("artifacts")).unwrap()),
        Backend::S3 => {
            let s3 = trellis_testkit::seaweedfs::server()?;
            let (bucket, prefix) = s3.area();
            Some(s3_chunks(
                &s3.endpoint,
                &bucket,
                &prefix,
                trellis_testkit::seaweedfs::SECRET_KEY,
            ))
        }
        Backend::PrivateS3(endpoint) => {
            trellis_testkit::seaweedfs::create_bucket(&endpoint, "private");
            Some(s3_chunks(
                &endpoint,
                "private",
                "",
                trellis_testkit::seaweedfs::SECRET_KEY,
            ))
        }
    }
}

async fn start(backend: Backend) -> Option<TlsHub> {
    let data = tempfile::tempdir().unwrap();
    let chunks = chunk_store(backend, &data.path().join("hub"))?;
    let hub = Hub::open(HubOptions {
        data_dir: data.path().join("hub"),
        chunk_store: Some(chunks.clone()),
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
    Some(TlsHub {
        addr,
        admin,
        ca_pem,
        http,
        data,
        chunks,
        _stop: stop,
    })
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
    /// Returns the package's artifact as stored by the client.
    async fn release_on(&self, outpost: &str, project: &str, package: &[u8]) -> PutArtifact {
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
        let put = self.upload(package).await;
        let digest = put.index_digest.as_hex();
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
        put
    }

    /// Chunks `bytes` as a package and uploads the chunks the hub lacks,
    /// as `trellis push build` does. Returns what was stored.
    async fn upload(&self, bytes: &[u8]) -> PutArtifact {
        let staging = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(staging.path(), Durability::Cache).unwrap();
        let put = store.put_artifact(ArtifactKind::Package, bytes).unwrap();
        let mut digests: Vec<String> = put
            .index
            .distinct_chunks()
            .iter()
            .map(|c| c.digest.as_hex())
            .collect();
        digests.push(put.index_digest.as_hex());
        let missing = self.missing(&digests).await;
        for digest in &missing {
            let stored = std::fs::read(store.path(&digest.parse().unwrap())).unwrap();
            let (s, b) = self.put_chunk(digest, stored).await;
            assert_eq!(s, StatusCode::CREATED, "{b}");
        }
        put
    }

    async fn missing(&self, digests: &[String]) -> Vec<String> {
        let (s, b) = self
            .api(
                reqwest::Method::POST,
                "/chunks/missing",
                Some(json!({ "digests": digests })),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        serde_json::from_value(b["missing"].clone()).unwrap()
    }

    async fn put_chunk(&self, digest: &str, stored: Vec<u8>) -> (StatusCode, Value) {
        let resp = self
            .http
            .put(format!("https://{}/api/v1/chunks/{digest}", self.addr))
            .bearer_auth(&self.admin)
            .body(stored)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Whether the hub's store holds `digest`.
    async fn stores(&self, digest: &Digest) -> bool {
        self.chunks.backend().contains(digest).await.unwrap()
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

    fn chunk_url(&self, digest: &str) -> String {
        format!("https://{}/api/v1/agent/chunks/{digest}", self.addr)
    }

    /// Points the agent at `addr` instead of the hub (a fault proxy).
    fn route_agent_through(&self, agent: &AgentState, addr: std::net::SocketAddr) {
        let mut id = agent.identity().unwrap().unwrap();
        id.hub_url = format!("https://{addr}");
        agent.set_identity(&id).unwrap();
    }
}

/// Incompressible bytes, the same for the same seed.
fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A real package: a packed directory with some incompressible content.
fn package(model_bytes: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sensor"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(dir.path().join("model.bin"), noise("model", model_bytes)).unwrap();
    let mut out = Vec::new();
    trellis_cas::pack_dir(dir.path(), &mut out).unwrap();
    out
}

fn agent_store(dir: &std::path::Path) -> ChunkStore {
    ChunkStore::open(dir, Durability::Cache).unwrap()
}

async fn uploads_send_only_missing_chunks_and_builds_need_every_chunk(hub: TlsHub) {
    let bytes = package(2 << 20);
    let staging = tempfile::tempdir().unwrap();
    let store = agent_store(staging.path());
    let put = store
        .put_artifact(ArtifactKind::Package, &bytes[..])
        .unwrap();
    let all: Vec<String> = put
        .index
        .distinct_chunks()
        .iter()
        .map(|c| c.digest.as_hex())
        .collect();
    assert_eq!(hub.missing(&all).await, all, "a new hub lacks everything");

    // Only the first chunk goes up; the hub then lacks the rest.
    let first = &all[0];
    let stored = std::fs::read(store.path(&first.parse().unwrap())).unwrap();
    let (s, b) = hub.put_chunk(first, stored.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(hub.missing(&all).await, all[1..].to_vec());

    // A build naming the artifact is refused until every chunk is there.
    let manifest = "version: v1\ncomponents:\n  - name: sensor\n    process: {path: ./sensor, command: [./sensor]}\n";
    let build = json!({
        "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
        "manifest_file": "trellis.yaml", "manifest": manifest,
        "components": [{"name": "sensor", "artifact":
            {"kind": "package", "digest": put.index_digest.as_hex(), "size": bytes.len()}}]});
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/projects",
            Some(json!({"name": "plant"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/projects/plant/builds",
            Some(build.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["code"], "invalid-build");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not been uploaded"),
        "{b}"
    );
    let put_again = hub.upload(&bytes).await;
    assert_eq!(put_again.index_digest, put.index_digest);
    assert!(hub.missing(&all).await.is_empty());
    let (s, b) = hub
        .api(reqwest::Method::POST, "/projects/plant/builds", Some(build))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    // A chunk that does not match its name is refused and not stored.
    let other = blake3::hash(b"another chunk").to_hex().to_string();
    let (s, b) = hub.put_chunk(&other, stored).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["code"], "chunk-invalid");
    let (s, b) = hub.put_chunk(&other, b"not a zstd frame".to_vec()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["code"], "chunk-invalid");
    assert!(!hub.stores(&other.parse().unwrap()).await);
    let (s, _) = hub.put_chunk("not-a-digest", vec![1]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

async fn an_agent_fetches_its_artifacts_with_its_certificate(hub: TlsHub) {
    let agent = hub.joined_agent("edge-1").await;
    let bytes = package(3 << 20);
    let put = hub.release_on("edge-1", "plant", &bytes).await;
    let index = put.index_digest.as_hex();

    // The agent's own fetcher: mTLS, verified, into its store.
    let work = tempfile::tempdir().unwrap();
    let store = agent_store(&work.path().join("cache"));
    let fetcher = HubArtifacts::new(agent.clone(), store.clone());
    let seen = std::sync::atomic::AtomicU64::new(0);
    let fetched = fetcher
        .fetch(&index, &|n| {
            seen.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
        })
        .await
        .unwrap();
    assert_eq!(fetched, put.index);
    assert_eq!(seen.into_inner(), bytes.len() as u64);
    let mut back = Vec::new();
    std::io::Read::read_to_end(
        &mut store.open_artifact(&put.index_digest, &fetched),
        &mut back,
    )
    .unwrap();
    assert_eq!(back, bytes);
    // It unpacks.
    trellis_cas::unpack(&back[..], &work.path().join("unpacked")).unwrap();
    assert!(work.path().join("unpacked/model.bin").is_file());

    // The chunk endpoint: 200 with the stored chunk, 206 for a range, 416.
    let chunk = put.index.chunks[0].digest;
    let stored = std::fs::read(store.path(&chunk)).unwrap();
    let http = hub.agent_http(&agent).await;
    let resp = http
        .get(hub.chunk_url(&chunk.as_hex()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["accept-ranges"], "bytes");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &stored[..]);
    let resp = http
        .get(hub.chunk_url(&chunk.as_hex()))
        .header("Range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-{}/{}", stored.len() - 1, stored.len()).as_str()
    );
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &stored[1000..]);
    let resp = http
        .get(hub.chunk_url(&chunk.as_hex()))
        .header("Range", format!("bytes={}-", stored.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "range-not-satisfiable");

    // The whole artifact in one plain download.
    let resp = http
        .get(format!(
            "https://{}/api/v1/agent/artifacts/{index}/content",
            hub.addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &bytes[..]);
}

async fn an_interrupted_delivery_resumes_without_fetching_complete_chunks_again(hub: TlsHub) {
    let agent = hub.joined_agent("edge-1").await;
    let bytes = package(16 << 20);
    let put = hub.release_on("edge-1", "plant", &bytes).await;
    let index = put.index_digest.as_hex();
    let proxy = trellis_faultproxy::FaultProxy::start(hub.addr)
        .await
        .unwrap();
    hub.route_agent_through(&agent, proxy.addr());
    // Slow enough to be caught halfway: 4 connections of 2 MiB/s each.
    proxy.set(trellis_faultproxy::Mode::Throttle {
        bytes_per_sec: 2 << 20,
    });

    let work = tempfile::tempdir().unwrap();
    let store = agent_store(&work.path().join("cache"));
    let fetcher = Arc::new(HubArtifacts::new(agent.clone(), store.clone()));
    let task = {
        let fetcher = fetcher.clone();
        let index = index.clone();
        tokio::spawn(async move { fetcher.fetch(&index, &|_| {}).await })
    };
    // Wait until about half the chunks are here, then cut the link and
    // stop the delivery, as a killed agent would.
    let chunks = put.index.distinct_chunks();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let present = chunks.iter().filter(|c| store.contains(&c.digest)).count();
        if present * 2 >= chunks.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the delivery did not get halfway"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    task.abort();
    proxy.drop_connections();
    let _ = task.await;
    let present = chunks.iter().filter(|c| store.contains(&c.digest)).count();
    assert!(present < chunks.len(), "the delivery was not interrupted");

    // A new fetcher (a restarted agent) on the same cache finishes it.
    proxy.set(trellis_faultproxy::Mode::Pass);
    let fetcher = HubArtifacts::new(agent.clone(), store.clone());
    let fetched = fetcher.fetch(&index, &|_| {}).await.unwrap();
    let mut back = Vec::new();
    std::io::Read::read_to_end(
        &mut store.open_artifact(&put.index_digest, &fetched),
        &mut back,
    )
    .unwrap();
    assert_eq!(back, bytes);

    // Everything that crossed the link, TLS and HTTP included, against
    // what the artifact takes on the hub's disk.
    let moved = proxy.stats().bytes_down;
    let ratio = moved as f64 / put.stored as f64;
    println!(
        "moved {moved} bytes for {} stored: {ratio:.3}, over {} connections",
        put.stored,
        proxy.stats().accepted
    );
    assert!(
        ratio <= 1.05,
        "moved {moved} bytes for an artifact of {} stored",
        put.stored
    );
    proxy.shutdown().await;
}

async fn a_chunk_damaged_on_the_hub_is_refused_and_never_stored(hub: TlsHub) {
    let agent = hub.joined_agent("edge-1").await;
    let bytes = package(1 << 20);
    let put = hub.release_on("edge-1", "plant", &bytes).await;
    // Damage one chunk in the hub's store: still a valid zstd frame, of
    // other content (written past the hub, which would refuse it).
    let victim = put.index.chunks[1].digest;
    let damaged = zstd::bulk::compress(&noise("other", 1000), 3).unwrap();
    match hub.chunks.local() {
        Some(local) => std::fs::write(local.path(&victim), damaged).unwrap(),
        None => hub
            .chunks
            .backend()
            .put(&victim, damaged.into())
            .await
            .unwrap(),
    }

    let work = tempfile::tempdir().unwrap();
    let store = agent_store(&work.path().join("cache"));
    let fetcher = HubArtifacts::new(agent.clone(), store.clone());
    let err = fetcher
        .fetch(&put.index_digest.as_hex(), &|_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code, "artifact-corrupt", "{err:?}");
    assert!(err.message.contains(&victim.as_hex()), "{}", err.message);
    assert!(!store.contains(&victim), "a damaged chunk is never kept");
    // Other chunks cut off when the delivery stopped may stay as
    // `.partial` files to resume from; nothing else, and nothing of the
    // damaged chunk.
    for entry in std::fs::read_dir(store.tmp_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(name.ends_with(".partial"), "{name} left behind");
        assert!(!name.starts_with(&victim.as_hex()), "{name} left behind");
    }
}

async fn artifacts_are_refused_without_a_certificate_to_other_outposts_unknown_and_revoked(
    hub: TlsHub,
) {
    let agent = hub.joined_agent("edge-1").await;
    let other = hub.joined_agent("edge-2").await;
    let bytes = package(300_000);
    let put = hub.release_on("edge-1", "plant", &bytes).await;
    let index = put.index_digest.as_hex();
    let chunk = put.index.chunks[0].digest.as_hex();

    // No client certificate: 401 with a JSON error.
    let resp = hub.http.get(hub.chunk_url(&chunk)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "client-certificate-required");

    // An access key is no substitute for the agent's certificate.
    let resp = hub
        .http
        .get(hub.chunk_url(&chunk))
        .bearer_auth(&hub.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Another outpost's agent gets neither this outpost's index nor its
    // chunks.
    let other_http = hub.agent_http(&other).await;
    for digest in [&index, &chunk] {
        let resp = other_http.get(hub.chunk_url(digest)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    // An unknown digest: 404 with a stable code, also through HubArtifacts.
    let unknown = blake3::hash(b"no such artifact").to_hex().to_string();
    let http = hub.agent_http(&agent).await;
    let resp = http.get(hub.chunk_url(&unknown)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "artifact-not-found");
    let work = tempfile::tempdir().unwrap();
    let fetcher = HubArtifacts::new(agent.clone(), agent_store(&work.path().join("cache")));
    let err = fetcher.fetch(&unknown, &|_| {}).await.unwrap_err();
    assert_eq!(err.code, "artifact-not-found", "{err:?}");
    let resp = http
        .get(hub.chunk_url("not-a-digest"))
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
        .get(hub.chunk_url(&chunk))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "revoked");
    let err = fetcher.fetch(&index, &|_| {}).await.unwrap_err();
    assert_eq!(err.code, "revoked", "{err:?}");
}

async fn the_hub_collects_chunks_no_build_references_after_the_grace_period(hub: TlsHub) {
    hub.joined_agent("edge-1").await;
    // Released: a release in flight needs it, so its build cannot go.
    let released = hub.release_on("edge-1", "plant", &package(1 << 20)).await;
    // Uploaded by a push that never recorded its build.
    let orphan = hub.upload(&package(700_000)).await;
    let chunks_of = |put: &PutArtifact| {
        let mut all: Vec<trellis_cas::Digest> = put
            .index
            .distinct_chunks()
            .iter()
            .map(|c| c.digest)
            .collect();
        all.push(put.index_digest);
        all
    };
    let collect = |grace: u64| {
        hub.api(
            reqwest::Method::POST,
            "/admin/collect-garbage",
            Some(json!({ "grace_secs": grace })),
        )
    };

    // Within the grace period nothing goes: a push may still be running.
    let (s, report) = collect(3600).await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert_eq!(report["freed"], 0, "{report}");
    for d in chunks_of(&orphan) {
        assert!(hub.stores(&d).await);
    }

    // After it, the orphan goes and the released build stays whole.
    let (s, report) = collect(0).await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert_eq!(
        report["freed"].as_u64().unwrap() as usize,
        chunks_of(&orphan).len(),
        "{report}"
    );
    for d in chunks_of(&orphan) {
        assert!(!hub.stores(&d).await);
    }
    for d in chunks_of(&released) {
        assert!(hub.stores(&d).await);
    }

    // The released build cannot be deleted while its release exists.
    let builds = hub
        .api(reqwest::Method::GET, "/projects/plant/builds", None)
        .await
        .1;
    let name = builds[0]["name"].as_str().unwrap().to_owned();
    let (s, _) = hub
        .api(
            reqwest::Method::DELETE,
            &format!("/projects/plant/builds/{name}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, report) = collect(0).await;
    assert_eq!(report["freed"], 0, "{report}");
    for d in chunks_of(&released) {
        assert!(hub.stores(&d).await);
    }

    // Only administrators collect.
    let (s, b) = hub
        .api(reqwest::Method::POST, "/users", Some(json!({"name": "op"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let resp = hub
        .http
        .post(format!("https://{}/api/v1/admin/collect-garbage", hub.addr))
        .bearer_auth(b["key"].as_str().unwrap())
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

/// A backup made through the agent's endpoints (the agent's own client,
/// mutual TLS): the hub stores only what it lacks, completes the backup
/// only with every chunk stored, answers no other outpost, and keeps the
/// backup's chunks through garbage collection until it is deleted.
async fn backups_go_through_the_agent_endpoints_and_count_for_garbage_collection(hub: TlsHub) {
    use trellis_agent::backup::{BackupHub, HttpBackupHub, JobRef, JobReport};
    use trellis_cas::{BACKUP_FORMAT, BackupEntry, BackupManifest, BackupVolume, EntryKind};
    let agent = hub.joined_agent("edge-1").await;
    let other = hub.joined_agent("edge-2").await;
    hub.release_on("edge-1", "plant", &package(64 << 10)).await;

    // Asked for while the outpost is not linked: pending, and says why.
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/projects/plant/stages/line/backups",
            Some(json!({"display_name": "before the upgrade"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["state"], "pending", "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("waits for outpost \"edge-1\""),
        "{b}"
    );
    let id = b["id"].as_u64().unwrap();
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/projects/plant/stages/line/backups",
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["error"]["code"], "backup-in-progress", "{b}");

    let job = JobRef {
        id,
        project: "plant".into(),
        stage: "line".into(),
    };
    let client = HttpBackupHub::new(agent.clone());
    let data = [noise("backup-a", 200_000), noise("backup-b", 90_000)];
    let mut digests = Vec::new();
    let mut stored_bytes = 0u64;
    let mut entries = Vec::new();
    for (i, content) in data.iter().enumerate() {
        let mut chunks = Vec::new();
        trellis_cas::cut_chunks::<std::io::Error>(
            &content[..],
            trellis_cas::BACKUP_CHUNKS,
            |d, _| {
                chunks.push(d);
                Ok(())
            },
        )
        .unwrap();
        digests.extend(chunks.iter().copied());
        entries.push(BackupEntry {
            path: format!("file-{i}"),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: content.len() as u64,
            chunks,
            target: None,
        });
    }
    let manifest = BackupManifest {
        format: BACKUP_FORMAT.into(),
        volumes: vec![BackupVolume {
            name: "sensor/data".into(),
            entries,
        }],
    };
    // Nothing uploaded yet: the manifest is refused.
    let err = client
        .complete(&job, manifest.to_bytes().into())
        .await
        .unwrap_err();
    assert!(err.contains("chunks-missing"), "{err}");
    assert_eq!(client.missing(&job, &digests).await.unwrap(), digests);
    let all: Vec<u8> = data.concat();
    let mut offset = 0usize;
    let mut pieces = Vec::new();
    for content in &data {
        trellis_cas::cut_chunks::<std::io::Error>(
            &content[..],
            trellis_cas::BACKUP_CHUNKS,
            |d, chunk| {
                pieces.push((d, chunk));
                Ok(())
            },
        )
        .unwrap();
        offset += content.len();
    }
    assert_eq!(offset, all.len());
    // A chunk that does not verify is refused.
    let d0 = &pieces[0].0;
    let wrong = trellis_cas::compress(&pieces[1].1).unwrap();
    let err = client.put_chunk(&job, d0, wrong.into()).await.unwrap_err();
    assert!(err.contains("chunk-invalid"), "{err}");
    assert!(!hub.stores(d0).await);
    for (d, chunk) in &pieces {
        let stored = trellis_cas::compress(chunk).unwrap();
        stored_bytes += stored.len() as u64;
        client.put_chunk(&job, d, stored.into()).await.unwrap();
    }
    assert!(client.missing(&job, &digests).await.unwrap().is_empty());

    // Another outpost's agent reaches none of it.
    let foreign = HttpBackupHub::new(other.clone());
    let report = JobReport {
        op: trellis_link::protocol::BackupOp::Backup,
        state: "running".into(),
        message: String::new(),
        size: 0,
    };
    let err = foreign.report(&job, &report).await.unwrap_err();
    assert!(err.contains("backup-not-found"), "{err}");
    let err = foreign.missing(&job, &digests).await.unwrap_err();
    assert!(err.contains("backup-not-found"), "{err}");

    client.report(&job, &report).await.unwrap();
    client
        .complete(&job, manifest.to_bytes().into())
        .await
        .unwrap();
    let (s, b) = hub
        .api(
            reqwest::Method::GET,
            &format!("/projects/plant/stages/line/backups/{id}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["state"], "completed", "{b}");
    assert_eq!(b["size"], all.len() as u64, "{b}");
    assert_eq!(b["uploaded"], stored_bytes, "{b}");
    assert_eq!(b["volumes"], json!(["sensor/data"]), "{b}");
    let manifest_digest: Digest = b["manifest"].as_str().unwrap().parse().unwrap();

    // A restore reads them back through the same endpoints; another
    // outpost cannot.
    let back = BackupManifest::parse(&client.manifest(&job).await.unwrap()).unwrap();
    assert_eq!(back, manifest);
    let stored = client.chunk(&job, &digests[0]).await.unwrap();
    assert_eq!(
        trellis_cas::verify_stored(&digests[0], &stored).unwrap(),
        pieces[0].1.len() as u64
    );
    assert!(foreign.chunk(&job, &digests[0]).await.is_err());

    // Refusals, each with its code.
    let code = |b: &Value| b["error"]["code"].as_str().unwrap_or_default().to_owned();
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            &format!("/projects/plant/stages/line/backups/{id}/restore"),
            None,
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::CONFLICT, "stage-not-suspended".into()),
        "{b}"
    );
    assert!(
        b["error"]["hint"]
            .as_str()
            .unwrap()
            .contains("trellis suspend stage line -p plant"),
        "{b}"
    );
    let (s, b) = hub
        .api(
            reqwest::Method::GET,
            "/projects/plant/stages/line/backups/999",
            None,
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::NOT_FOUND, "not-found".into()),
        "{b}"
    );
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/projects/plant/stages/line/backups/999/restore",
            None,
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::NOT_FOUND, "not-found".into()),
        "{b}"
    );
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/projects/plant/stages/nope/backups",
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::NOT_FOUND, "not-found".into()),
        "{b}"
    );
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/users",
            Some(json!({"name": "stranger"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let stranger = b["key"].as_str().unwrap().to_owned();
    for (method, path) in [
        (
            reqwest::Method::GET,
            "/projects/plant/stages/line/backups".to_owned(),
        ),
        (
            reqwest::Method::POST,
            "/projects/plant/stages/line/backups".to_owned(),
        ),
        (
            reqwest::Method::POST,
            format!("/projects/plant/stages/line/backups/{id}/restore"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/projects/plant/stages/line/backups/{id}"),
        ),
    ] {
        let resp = hub
            .http
            .request(method.clone(), format!("https://{}/api/v1{path}", hub.addr))
            .bearer_auth(&stranger)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
        let b: Value = resp.json().await.unwrap();
        assert_eq!(code(&b), "not-found", "{b}");
    }
    // Suspended, the restore is asked for; resuming waits for it.
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/projects/plant/stages/line/suspend",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            &format!("/projects/plant/stages/line/backups/{id}/restore"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(b["restore"]["state"], "pending", "{b}");
    let (s, b) = hub
        .api(
            reqwest::Method::POST,
            "/projects/plant/stages/line/resume",
            None,
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::CONFLICT, "restore-in-progress".into()),
        "{b}"
    );
    let (s, b) = hub
        .api(
            reqwest::Method::DELETE,
            &format!("/projects/plant/stages/line/backups/{id}"),
            None,
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::CONFLICT, "restore-in-progress".into()),
        "{b}"
    );
    let restore = JobReport {
        op: trellis_link::protocol::BackupOp::Restore,
        state: "failed".into(),
        message: "the disk is full".into(),
        size: 0,
    };
    client.report(&job, &restore).await.unwrap();
    let (_, b) = hub
        .api(
            reqwest::Method::GET,
            &format!("/projects/plant/stages/line/backups/{id}"),
            None,
        )
        .await;
    assert_eq!(b["restore"]["state"], "failed", "{b}");
    assert_eq!(b["restore"]["message"], "the disk is full", "{b}");

    // Garbage collection keeps a backup's chunks and manifest…
    let collect = |grace: u64| {
        hub.api(
            reqwest::Method::POST,
            "/admin/collect-garbage",
            Some(json!({ "grace_secs": grace })),
        )
    };
    let (s, report) = collect(0).await;
    assert_eq!(s, StatusCode::OK, "{report}");
    for d in digests.iter().chain([&manifest_digest]) {
        assert!(hub.stores(d).await, "{d} was collected");
    }
    // …until the backup is deleted.
    let (s, b) = hub
        .api(
            reqwest::Method::DELETE,
            &format!("/projects/plant/stages/line/backups/{id}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (_, report) = collect(0).await;
    assert!(
        report["freed"].as_u64().unwrap() as usize >= digests.len(),
        "{report}"
    );
    for d in digests.iter().chain([&manifest_digest]) {
        assert!(!hub.stores(d).await, "{d} outlived its backup");
    }
}

/// The other endpoint an agent calls with its certificate: the entry
/// point's HTTPS certificate, for its own stages' names only.
#[tokio::test]
async fn the_entry_point_certificate_is_issued_for_the_outposts_own_stages_only() {
    let hub = start(Backend::Dir).await.unwrap();
    let agent = hub.joined_agent("edge-1").await;
    let other = hub.joined_agent("edge-2").await;
    hub.release_on("edge-1", "plant", &package(1000)).await;
    let url = format!("https://{}/api/v1/agent/ingress-certificate", hub.addr);
    let csr = trellis_link::identity::AgentKey::generate()
        .unwrap()
        .csr_pem("edge-1")
        .unwrap();
    let ask = |client: reqwest::Client, names: Vec<&'static str>, csr: String| {
        let url = url.clone();
        async move {
            let resp = client
                .post(url)
                .json(&json!({"csr_pem": csr, "names": names}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let http = hub.agent_http(&agent).await;

    let (s, b) = ask(http.clone(), vec!["*.line.plant.localhost"], csr.clone()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["names"], json!(["*.line.plant.localhost"]));
    assert_eq!(b["ca_pem"], hub.ca_pem.as_str());
    assert!(
        b["cert_pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    // Another outpost's agent, a name of no stage, the hub's own name: refused.
    let (s, b) = ask(
        hub.agent_http(&other).await,
        vec!["*.line.plant.localhost"],
        csr.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(b["error"]["code"], "ingress-names-refused");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("edge-2"),
        "{b}"
    );
    for name in ["*.qa.plant.localhost", "localhost", "*.localhost"] {
        let (s, b) = ask(http.clone(), vec![name], csr.clone()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{name}: {b}");
        assert_eq!(b["error"]["code"], "ingress-names-refused", "{name}");
    }
    // A CSR that is not one, and no client certificate at all.
    let (s, b) = ask(
        http.clone(),
        vec!["*.line.plant.localhost"],
        "garbage".into(),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["code"], "csr-invalid");
    let (s, b) = ask(
        hub.http.clone(),
        vec!["*.line.plant.localhost"],
        csr.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");

    // The names follow the outpost's ingress domain.
    let (s, b) = hub
        .api(
            reqwest::Method::PATCH,
            "/outposts/edge-1",
            Some(json!({"ingress_domain": "plant7.example.net"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _) = ask(http.clone(), vec!["*.line.plant.localhost"], csr.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = ask(http, vec!["*.line.plant.plant7.example.net"], csr).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// Runs each named test on both stores.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod dir {
            $(
                #[tokio::test]
                async fn $name() {
                    let hub = super::start(super::Backend::Dir).await.unwrap();
                    super::$name(hub).await;
                }
            )*
        }

        mod s3 {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(hub) = super::start(super::Backend::S3).await else {
                        return;
                    };
                    super::$name(hub).await;
                }
            )*
        }
    };
}

on_both_backends!(
    uploads_send_only_missing_chunks_and_builds_need_every_chunk,
    an_agent_fetches_its_artifacts_with_its_certificate,
    an_interrupted_delivery_resumes_without_fetching_complete_chunks_again,
    a_chunk_damaged_on_the_hub_is_refused_and_never_stored,
    artifacts_are_refused_without_a_certificate_to_other_outposts_unknown_and_revoked,
    the_hub_collects_chunks_no_build_references_after_the_grace_period,
    backups_go_through_the_agent_endpoints_and_count_for_garbage_collection,
);

/// What the hub does when its S3 store fails or is set up wrong.
mod s3_faults {
    use super::*;

    /// Wrong credentials and a missing bucket are found when the store is
    /// opened, each named with what to fix.
    #[tokio::test]
    async fn wrong_credentials_and_a_missing_bucket_are_named_at_start() {
        let Some(s3) = trellis_testkit::seaweedfs::server() else {
            return;
        };
        let (bucket, prefix) = s3.area();
        let wrong = s3_chunks(&s3.endpoint, &bucket, &prefix, "not-the-secret");
        let e = wrong.check().await.unwrap_err().to_string();
        assert!(e.contains("refused the hub"), "{e}");
        assert!(e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
        let missing = s3_chunks(
            &s3.endpoint,
            "no-such-bucket",
            "",
            trellis_testkit::seaweedfs::SECRET_KEY,
        );
        let e = missing.check().await.unwrap_err().to_string();
        assert!(e.contains("\"no-such-bucket\""), "{e}");
        assert!(e.contains("does not exist"), "{e}");
        let gone = trellis_testkit::free_port(None);
        let unreachable = s3_chunks(
            &format!("http://127.0.0.1:{gone}"),
            &bucket,
            "",
            trellis_testkit::seaweedfs::SECRET_KEY,
        );
        let e = unreachable.check().await.unwrap_err().to_string();
        assert!(e.contains("cannot be reached"), "{e}");

        // A hub will not start on them (this test process has no S3
        // credentials in its environment: that is named too).
        let data = tempfile::tempdir().unwrap();
        let refused = Hub::open(HubOptions {
            data_dir: data.path().to_owned(),
            chunks: Some(format!("s3://{bucket}?endpoint={}", s3.endpoint)),
            ..Default::default()
        })
        .await
        .err()
        .expect("a hub with an unusable artifact store does not start")
        .to_string();
        assert!(refused.contains("AWS_ACCESS_KEY_ID"), "{refused}");
        let refused = Hub::open(HubOptions {
            data_dir: data.path().to_owned(),
            chunks: Some("s3-is-not-a-url".into()),
            ..Default::default()
        })
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(refused.contains("s3://BUCKET?endpoint=URL"), "{refused}");
    }

    /// The store down during a push: the push fails, nothing is recorded,
    /// and the next push once it is back succeeds. Down during a delivery:
    /// the agent's fetch fails in the way the agent retries, and finishes
    /// once the store is back.
    #[tokio::test]
    async fn the_store_down_fails_a_push_cleanly_and_delays_a_delivery() {
        let Some(mut s3) = trellis_testkit::seaweedfs::PrivateSeaweed::start() else {
            return;
        };
        let hub = start(Backend::PrivateS3(s3.endpoint())).await.unwrap();
        let agent = hub.joined_agent("edge-1").await;
        let bytes = package(1 << 20);
        let put = hub.release_on("edge-1", "plant", &bytes).await;

        // A delivery while the store is down.
        s3.kill();
        let work = tempfile::tempdir().unwrap();
        let store = agent_store(&work.path().join("cache"));
        let fetcher = HubArtifacts::new(agent.clone(), store.clone());
        let err = fetcher
            .fetch(&put.index_digest.as_hex(), &|_| {})
            .await
            .unwrap_err();
        assert_eq!(
            err.code, "artifact-fetch-failed",
            "the code the agent's deployer retries: {err:?}"
        );
        assert!(err.message.contains("cannot be reached"), "{}", err.message);

        // A push while it is down: refused, and no build recorded.
        let staging = tempfile::tempdir().unwrap();
        let local = agent_store(staging.path());
        let next = package(700_000);
        let put2 = local
            .put_artifact(ArtifactKind::Package, &next[..])
            .unwrap();
        let first = put2.index.chunks[0].digest;
        let (s, b) = hub
            .put_chunk(&first.as_hex(), std::fs::read(local.path(&first)).unwrap())
            .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
        assert_eq!(b["error"]["code"], "artifact-store-unavailable");
        let (s, b) = hub
            .api(
                reqwest::Method::POST,
                "/chunks/missing",
                Some(json!({"digests": [first.as_hex()]})),
            )
            .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
        let manifest = "version: v1\ncomponents:\n  - name: sensor\n    process: {path: ./sensor, command: [./sensor]}\n";
        let build = json!({
            "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
            "manifest_file": "trellis.yaml", "manifest": manifest,
            "components": [{"name": "sensor", "artifact":
                {"kind": "package", "digest": put2.index_digest.as_hex(), "size": next.len()}}]});
        let (s, b) = hub
            .api(
                reqwest::Method::POST,
                "/projects/plant/builds",
                Some(build.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
        let (_, builds) = hub
            .api(reqwest::Method::GET, "/projects/plant/builds", None)
            .await;
        assert_eq!(
            builds.as_array().unwrap().len(),
            1,
            "nothing recorded: {builds}"
        );

        // Back: the delivery finishes — retried as the agent's deployer
        // does, since a restarted store may answer errors for a moment —
        // and the push goes through.
        s3.resume();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let fetched = loop {
            match fetcher.fetch(&put.index_digest.as_hex(), &|_| {}).await {
                Ok(fetched) => break fetched,
                Err(e)
                    if e.code == "artifact-fetch-failed"
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => panic!("the delivery did not finish once the store was back: {e:?}"),
            }
        };
        assert_eq!(fetched, put.index);
        hub.upload(&next).await;
        let (s, b) = hub
            .api(reqwest::Method::POST, "/projects/plant/builds", Some(build))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
}
