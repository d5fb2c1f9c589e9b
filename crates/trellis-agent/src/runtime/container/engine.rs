//! The connection to the engine: bollard for everything that changes
//! something (create, start, stop, remove, logs, wait, pull), and a few
//! plain `GET`s of our own for what we read back (lists and inspects).
//!
//! Why the plain reads: bollard's typed models reject states that Podman's
//! compatibility API really reports (`stopped` between a container's exit
//! and its clean-up, `configured`…; bollard#701, podman#17728), and a
//! runtime that cannot inspect a crash-looping container cannot report it.
//! Our read models take only the fields we use, each with a default.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, ClientVersion, Docker};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::runtime::RuntimeError;

/// How often a listing or inspection of containers the engine refused is
/// asked for before the refusal is reported (see `Engine::get_settled`).
const SETTLING_ATTEMPTS: u32 = 3;

/// Seconds bollard waits for an answer's headers.
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// How long one of our reads may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How large an answer to one of our reads may be.
const READ_LIMIT: usize = 64 << 20;

/// Which engine answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Podman,
    Docker,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Podman => "podman",
            EngineKind::Docker => "docker",
        }
    }
}

/// How an engine takes GPUs in a container-create request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuRequests {
    /// Device requests of the `cdi` driver naming CDI devices: Docker with
    /// CDI enabled (25 and later; `CDISpecDirs` in `GET /info`), Podman 5
    /// and later.
    Cdi,
    /// Only NVIDIA GPUs, as `docker run --gpus` asks for them (a device
    /// request with the `gpu` capability): Docker without CDI.
    NvidiaCapability,
    /// None through the API: Podman 4, whose compatibility API ignores
    /// device requests.
    Unsupported,
}

/// A connected engine; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    pub docker: Docker,
    socket: PathBuf,
    /// The API version both halves speak, e.g. `1.41`.
    api: String,
    pub kind: EngineKind,
    pub version: String,
    pub gpus: GpuRequests,
}

impl Engine {
    /// Connects to the engine at `host` (`unix:///path` or a path), checks
    /// that it answers and learns its name, version and API version.
    pub async fn connect(host: &str) -> Result<Engine, RuntimeError> {
        let socket = socket_path(host)?;
        let unreachable = |what: String| {
            RuntimeError::new(
                "engine-unreachable",
                format!(
                    "the container engine at {} does not answer ({what})",
                    socket.display()
                ),
            )
            .with_hint(
                "start the Podman API service (`systemctl enable --now podman.socket`) or the \
                 Docker daemon, or point the agent at the right socket (DOCKER_HOST)",
            )
        };
        let ping = raw_get(&socket, "/_ping")
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if ping.0 != 200 {
            return Err(unreachable(format!("GET /_ping answered {}", ping.0)));
        }
        let (status, body) = raw_get(&socket, "/version")
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let version: serde_json::Value = serde_json::from_slice(&body)
            .ok()
            .filter(|_| status == 200)
            .ok_or_else(|| unreachable(format!("GET /version answered {status}")))?;
        let kind = if version["Components"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| is_podman(&c["Name"])))
        {
            EngineKind::Podman
        } else {
            EngineKind::Docker
        };
        let engine_version = version["Version"].as_str().unwrap_or("unknown").to_owned();
        let client = match version["ApiVersion"].as_str().and_then(parse_api_version) {
            Some(server) if server < *API_DEFAULT_VERSION => server,
            _ => *API_DEFAULT_VERSION,
        };
        let path = socket.to_string_lossy().into_owned();
        let docker = Docker::connect_with_unix(&path, REQUEST_TIMEOUT_SECS, &client)
            .map_err(|e| unreachable(e.to_string()))?;
        let gpus = match kind {
            EngineKind::Podman => podman_gpus(&engine_version),
            EngineKind::Docker => {
                let info = raw_get(&socket, "/info")
                    .await
                    .ok()
                    .and_then(|(status, body)| {
                        serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .filter(|_| status == 200)
                    });
                docker_gpus(info.as_ref())
            }
        };
        Ok(Engine {
            docker,
            socket,
            api: client.to_string(),
            kind,
            version: engine_version,
            gpus,
        })
    }

    /// `GET /v<api><path>`: `None` on 404, the decoded body on 2xx.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        doing: &str,
    ) -> Result<Option<T>, RuntimeError> {
        let (status, body) = raw_get(&self.socket, &format!("/v{}{path}", self.api))
            .await
            .map_err(|e| unreachable_while(doing, &e.to_string()))?;
        match status {
            404 => Ok(None),
            200..=299 => serde_json::from_slice(&body).map(Some).map_err(|e| {
                RuntimeError::new(
                    "engine-answer-not-understood",
                    format!("the container engine's answer while {doing} is not understood: {e}"),
                )
                .with_hint("the engine may be of an unsupported version (Docker ≥ 20.10 and Podman ≥ 4 are)")
            }),
            _ => Err(RuntimeError::new(
                "engine-error",
                format!(
                    "the container engine refused {doing}: {} ({status})",
                    server_message(&body)
                ),
            )),
        }
    }

    /// `GET /v<api><path>` of a stream of JSON lines (the engine's events),
    /// giving each line to `on_line` until the engine ends the stream.
    pub async fn follow(&self, path: &str, mut on_line: impl FnMut(&[u8])) -> Result<(), String> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.socket.display()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let connection = AbortOnDrop(tokio::spawn(connection));
        let request = hyper::Request::get(format!("/v{}{path}", self.api))
            .header(hyper::header::HOST, "engine")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("the engine answered {}", response.status()));
        }
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                on_line(&pending[..end]);
                pending.drain(..=end);
            }
            // One event is far smaller than this; a stream that never
            // ends a line is not one of events.
            if pending.len() > READ_LIMIT {
                return Err("the engine sent a line too long to be an event".to_owned());
            }
        }
        drop(connection);
        Ok(())
    }

    /// Containers carrying every label of `labels` (`key=value`), running
    /// or not.
    pub async fn containers(&self, labels: &[String]) -> Result<Vec<Listed>, RuntimeError> {
        let path = format!("/containers/json?all=true&filters={}", label_filter(labels));
        let mut found = self
            .get_settled::<Vec<Listed>>(&path, "listing containers")
            .await?
            .unwrap_or_default();
        found.retain(|c| has_labels(&c.labels, labels));
        Ok(found)
    }

    pub async fn inspect(&self, id: &str) -> Result<Option<Inspected>, RuntimeError> {
        self.get_settled(
            &format!("/containers/{}/json", encode(id)),
            "inspecting a container",
        )
        .await
    }

    /// [`Engine::get`] of what describes containers. Podman answers 500
    /// ("read /proc/<pid>/cgroup: no such process") when a container exits
    /// while it is being listed or inspected; the next answer sees the
    /// settled state, so a refused request is tried again a few times
    /// before it is reported.
    async fn get_settled<T: DeserializeOwned>(
        &self,
        path: &str,
        doing: &str,
    ) -> Result<Option<T>, RuntimeError> {
        let mut attempt = 1;
        loop {
            match self.get::<T>(path, doing).await {
                Err(e) if e.code == "engine-error" && attempt < SETTLING_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    pub async fn networks(&self, labels: &[String]) -> Result<Vec<NamedObject>, RuntimeError> {
        let path = format!("/networks?filters={}", label_filter(labels));
        let mut found = self
            .get::<Vec<NamedObject>>(&path, "listing networks")
            .await?
            .unwrap_or_default();
        found.retain(|n| has_labels(&n.labels, labels));
        Ok(found)
    }

    pub async fn network(&self, name: &str) -> Result<Option<NamedObject>, RuntimeError> {
        self.get(
            &format!("/networks/{}", encode(name)),
            "inspecting a network",
        )
        .await
    }

    pub async fn volumes(&self, labels: &[String]) -> Result<Vec<NamedObject>, RuntimeError> {
        #[derive(Deserialize, Default)]
        struct List {
            #[serde(rename = "Volumes", default, deserialize_with = "null_default")]
            volumes: Vec<NamedObject>,
        }
        let path = format!("/volumes?filters={}", label_filter(labels));
        let mut found = self
            .get::<List>(&path, "listing volumes")
            .await?
            .map(|l| l.volumes)
            .unwrap_or_default();
        found.retain(|v| has_labels(&v.labels, labels));
        Ok(found)
    }

    pub async fn volume(&self, name: &str) -> Result<Option<NamedObject>, RuntimeError> {
        self.get(&format!("/volumes/{}", encode(name)), "inspecting a volume")
            .await
    }

    pub async fn image_exists(&self, reference: &str) -> Result<bool, RuntimeError> {
        let found: Option<serde_json::Value> = self
            .get(
                &format!("/images/{}/json", encode_reference(reference)),
                "looking for an image",
            )
            .await?;
        Ok(found.is_some())
    }
}

/// Podman's compatibility API turns `cdi` device requests into CDI devices
/// from version 5 on.
fn podman_gpus(version: &str) -> GpuRequests {
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if major >= 5 {
        GpuRequests::Cdi
    } else {
        GpuRequests::Unsupported
    }
}

/// Docker lists its CDI specification directories in `GET /info` when CDI
/// is enabled.
fn docker_gpus(info: Option<&serde_json::Value>) -> GpuRequests {
    let cdi = info
        .and_then(|i| i.get("CDISpecDirs"))
        .and_then(serde_json::Value::as_array)
        .is_some_and(|dirs| !dirs.is_empty());
    if cdi {
        GpuRequests::Cdi
    } else {
        GpuRequests::NvidiaCapability
    }
}

fn is_podman(name: &serde_json::Value) -> bool {
    name.as_str()
        .is_some_and(|n| n.to_ascii_lowercase().contains("podman"))
}

fn parse_api_version(text: &str) -> Option<ClientVersion> {
    let (major, minor) = text.split_once('.')?;
    Some(ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

/// The socket path of `host`; only unix sockets are supported.
pub fn socket_path(host: &str) -> Result<PathBuf, RuntimeError> {
    let path = host.strip_prefix("unix://").unwrap_or(host);
    if path.starts_with('/') {
        return Ok(PathBuf::from(path));
    }
    Err(RuntimeError::new(
        "engine-unsupported",
        format!("the container engine address {host:?} is not a unix socket"),
    )
    .with_hint(
        "the agent talks to the engine on this host over its unix socket, e.g. \
         unix:///run/podman/podman.sock or unix:///var/run/docker.sock",
    ))
}

/// An error meaning the engine could not be reached while `doing`.
pub fn unreachable_while(doing: &str, what: &str) -> RuntimeError {
    RuntimeError::new(
        "engine-unreachable",
        format!("the container engine did not answer while {doing} ({what})"),
    )
    .with_hint(
        "check that the Podman API service (podman.socket) or the Docker daemon runs; the \
         agent retries on its next pass",
    )
}

/// A bollard error as a [`RuntimeError`] with `code`, unless it means the
/// engine is unreachable.
pub fn engine_error(code: &'static str, doing: &str, e: &bollard::errors::Error) -> RuntimeError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError { message, .. } => {
            RuntimeError::new(code, format!("{doing} failed: {message}"))
        }
        E::DockerStreamError { error } => {
            RuntimeError::new(code, format!("{doing} failed: {error}"))
        }
        E::JsonDataError { .. } | E::JsonSerdeError { .. } => RuntimeError::new(
            "engine-answer-not-understood",
            format!("the container engine's answer while {doing} is not understood: {e}"),
        ),
        _ => unreachable_while(doing, &e.to_string()),
    }
}

/// The HTTP status of a bollard error the engine answered with.
pub fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The message of a bollard error the engine answered with.
pub fn message_of(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// A container as listed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Listed {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Names", deserialize_with = "null_default")]
    pub names: Vec<String>,
    #[serde(rename = "Labels", deserialize_with = "null_default")]
    pub labels: HashMap<String, String>,
    #[serde(rename = "State", deserialize_with = "null_default")]
    pub state: String,
}

impl Listed {
    pub fn name(&self) -> &str {
        self.names
            .first()
            .map(|n| n.trim_start_matches('/'))
            .unwrap_or(&self.id)
    }
}

/// A network or a volume as listed or inspected (both have `Name` and
/// `Labels`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NamedObject {
    #[serde(rename = "Name", deserialize_with = "null_default")]
    pub name: String,
    #[serde(rename = "Labels", deserialize_with = "null_default")]
    pub labels: HashMap<String, String>,
}

/// The parts of a container's inspection the runtime uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Inspected {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "RestartCount")]
    pub restart_count: i64,
    #[serde(rename = "State")]
    pub state: InspectedState,
    #[serde(rename = "Config")]
    pub config: InspectedConfig,
    #[serde(rename = "NetworkSettings")]
    pub network: InspectedNetwork,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct InspectedState {
    #[serde(rename = "Status", deserialize_with = "null_default")]
    pub status: String,
    #[serde(rename = "Running")]
    pub running: bool,
    #[serde(rename = "ExitCode")]
    pub exit_code: i64,
    #[serde(rename = "Error", deserialize_with = "null_default")]
    pub error: String,
    #[serde(rename = "StartedAt", deserialize_with = "null_default")]
    pub started_at: String,
    #[serde(rename = "FinishedAt", deserialize_with = "null_default")]
    pub finished_at: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct InspectedConfig {
    #[serde(rename = "Labels", deserialize_with = "null_default")]
    pub labels: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct InspectedNetwork {
    #[serde(rename = "Networks", deserialize_with = "null_default")]
    pub networks: HashMap<String, InspectedEndpoint>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct InspectedEndpoint {
    #[serde(rename = "IPAddress", deserialize_with = "null_default")]
    pub ip_address: String,
    /// The network's gateway: the host's address on its bridge.
    #[serde(rename = "Gateway", deserialize_with = "null_default")]
    pub gateway: String,
}

/// `null` as the type's default (engines send `"Labels": null`).
fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Whether `labels` hold every `key=value` of `wanted`. The engine's own
/// filter is only a first cut: Podman 4.3 matches a volume carrying *any*
/// of several label filters, and deleting another stage's volume because
/// of that is not an option.
fn has_labels(labels: &HashMap<String, String>, wanted: &[String]) -> bool {
    wanted.iter().all(|filter| match filter.split_once('=') {
        Some((key, value)) => labels.get(key).map(String::as_str) == Some(value),
        None => labels.contains_key(filter.as_str()),
    })
}

/// `{"label": [...]}`, URL-encoded, for a `filters` parameter.
fn label_filter(labels: &[String]) -> String {
    encode(&serde_json::json!({ "label": labels }).to_string())
}

/// Percent-encodes everything but unreserved characters.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An image reference in a path: `/` and `:` stay (engines route on them),
/// the rest is encoded.
fn encode_reference(reference: &str) -> String {
    reference
        .split('/')
        .map(|part| encode(part).replace("%3A", ":").replace("%40", "@"))
        .collect::<Vec<_>>()
        .join("/")
}

/// The message of an engine's JSON error body, or the body.
fn server_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

/// Aborts the connection task it holds when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One `GET` over the engine's socket: status and body.
async fn raw_get(socket: &Path, path: &str) -> Result<(u16, Bytes), String> {
    let request = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let connection = tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "engine")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), READ_LIMIT)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        connection.abort();
        result
    };
    tokio::time::timeout(READ_TIMEOUT, request)
        .await
        .map_err(|_| format!("no answer within {READ_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_podman_states_bollard_rejects() {
        let text = r#"{"Id":"abc","Name":"/x","RestartCount":3,
            "State":{"Status":"stopped","Running":false,"ExitCode":3,"StartedAt":"2026-01-01T00:00:00Z"},
            "Config":{"Labels":null},"NetworkSettings":{"Networks":{"n":{"IPAddress":"10.0.0.2"}}}}"#;
        let i: Inspected = serde_json::from_str(text).unwrap();
        assert_eq!(i.state.status, "stopped");
        assert_eq!(i.restart_count, 3);
        assert_eq!(i.network.networks["n"].ip_address, "10.0.0.2");
        assert!(i.config.labels.is_empty());
        let l: Vec<Listed> = serde_json::from_str(
            r#"[{"Id":"a","Names":["/n"],"Labels":null,"State":"configured"}]"#,
        )
        .unwrap();
        assert_eq!(l[0].name(), "n");
    }

    #[test]
    fn every_label_filter_must_hold() {
        let labels = HashMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        assert!(has_labels(
            &labels,
            &["a=1".into(), "b=2".into(), "b".into()]
        ));
        assert!(!has_labels(&labels, &["a=1".into(), "b=3".into()]));
        assert!(!has_labels(&labels, &["c".into()]));
    }

    #[test]
    fn encodes_filters_and_references() {
        assert_eq!(encode("a=b c"), "a%3Db%20c");
        assert_eq!(
            encode_reference("localhost/x:1"),
            "localhost/x:1".to_owned()
        );
        assert_eq!(encode_reference("a b/c"), "a%20b/c");
        assert!(label_filter(&["k=v".to_owned()]).starts_with("%7B%22label%22"));
    }

    #[test]
    fn gpu_requests_follow_the_engine() {
        assert_eq!(podman_gpus("4.3.1"), GpuRequests::Unsupported);
        assert_eq!(podman_gpus("5.2.0"), GpuRequests::Cdi);
        assert_eq!(podman_gpus("unknown"), GpuRequests::Unsupported);
        let info = serde_json::json!({"CDISpecDirs": ["/etc/cdi", "/var/run/cdi"]});
        assert_eq!(docker_gpus(Some(&info)), GpuRequests::Cdi);
        let off = serde_json::json!({"CDISpecDirs": []});
        assert_eq!(docker_gpus(Some(&off)), GpuRequests::NvidiaCapability);
        let old = serde_json::json!({"ServerVersion": "20.10.24"});
        assert_eq!(docker_gpus(Some(&old)), GpuRequests::NvidiaCapability);
    }

    #[test]
    fn only_unix_sockets() {
        assert_eq!(
            socket_path("unix:///run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        assert_eq!(
            socket_path("/run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        assert_eq!(
            socket_path("tcp://1.2.3.4:2375").unwrap_err().code,
            "engine-unsupported"
        );
    }
}
