//! The hub's side of a backup job, as the agent reaches it: the
//! [`BackupHub`] seam, and [`HttpBackupHub`], the real one — the hub's
//! `/api/v1/agent/backups/…` endpoints over HTTPS with the agent's client
//! certificate (the local outpost brings its own, calling the hub
//! directly).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use trellis_cas::Digest;
use trellis_link::protocol::BackupOp;

use crate::https::{self, HubUrl};
use crate::state::AgentState;

/// Which backup a job is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    pub id: u64,
    pub project: String,
    pub stage: String,
}

impl std::fmt::Display for JobRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backup {} of stage {}/{}",
            self.id, self.project, self.stage
        )
    }
}

/// How a job goes, for the hub (`POST …/report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub op: BackupOp,
    /// `running`, `failed` or (a restore) `completed`.
    pub state: String,
    pub message: String,
    /// Bytes of volume content read so far (a backup).
    pub size: u64,
}

/// What a job needs of the hub. Errors are sentences for the backup's
/// message.
#[async_trait]
pub trait BackupHub: Send + Sync + 'static {
    async fn report(&self, job: &JobRef, report: &JobReport) -> Result<(), String>;
    /// Of `digests`, those the hub lacks.
    async fn missing(&self, job: &JobRef, digests: &[Digest]) -> Result<Vec<Digest>, String>;
    /// Stores a chunk in its stored form (one zstd frame).
    async fn put_chunk(&self, job: &JobRef, digest: &Digest, stored: Bytes) -> Result<(), String>;
    /// Completes the backup with its manifest (JSON).
    async fn complete(&self, job: &JobRef, manifest: Bytes) -> Result<(), String>;
    /// The manifest (JSON) of a completed backup.
    async fn manifest(&self, job: &JobRef) -> Result<Bytes, String>;
    /// A chunk of a completed backup in its stored form, not verified.
    async fn chunk(&self, job: &JobRef, digest: &Digest) -> Result<Bytes, String>;
}

/// Bounds connecting and each exchange.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The largest response read (a manifest).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// Connections kept for reuse.
const KEPT: usize = 8;

type Sender = SendRequest<Full<Bytes>>;

/// The hub over HTTPS with the identity stored in the agent's state (read
/// for every new connection, so a renewed certificate is used).
pub struct HttpBackupHub {
    state: Arc<AgentState>,
    /// Kept-alive connections and the authority they reach.
    idle: Mutex<Vec<(Sender, String)>>,
}

impl std::fmt::Debug for HttpBackupHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpBackupHub").finish_non_exhaustive()
    }
}

impl HttpBackupHub {
    pub fn new(state: Arc<AgentState>) -> Self {
        HttpBackupHub {
            state,
            idle: Mutex::new(Vec::new()),
        }
    }

    async fn open(&self) -> Result<(Sender, String), String> {
        let identity = crate::blocking(&self.state, |s| s.identity())
            .await
            .map_err(|e| format!("the agent's state cannot be read: {e}"))?
            .ok_or("this outpost has no identity (it never joined a hub)")?;
        let hub = HubUrl::parse(&identity.hub_url)?;
        let config = trellis_link::identity::client_config(
            &identity.ca_cert_pem,
            Some((&identity.cert_pem, &identity.key_pem)),
        )
        .map_err(|e| format!("could not prepare the TLS connection to the hub: {e}"))?;
        let tls = https::connect_tls(&hub, config, TIMEOUT)
            .await
            .map_err(|e| format!("could not reach the hub: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("could not talk HTTP to the hub: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, hub.authority()))
    }

    /// One exchange; a broken kept-alive connection is replaced once.
    async fn call(
        &self,
        method: hyper::Method,
        path: String,
        body: Bytes,
        content_type: &str,
    ) -> Result<(u16, Bytes), String> {
        let mut last = String::new();
        for _ in 0..3 {
            let kept = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let (mut sender, authority) = match kept {
                Some((s, authority)) if !s.is_closed() => (s, authority),
                _ => self.open().await?,
            };
            let request = hyper::Request::builder()
                .method(method.clone())
                .uri(&path)
                .header(hyper::header::HOST, &authority)
                .header(hyper::header::CONTENT_TYPE, content_type)
                .header(
                    hyper::header::USER_AGENT,
                    concat!("trellis-agent/", env!("CARGO_PKG_VERSION")),
                )
                .body(Full::new(body.clone()))
                .map_err(|e| format!("could not build a request: {e}"))?;
            let exchange = async {
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let body = Limited::new(response.into_body(), MAX_RESPONSE)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                Ok::<_, String>((status, body))
            };
            match tokio::time::timeout(TIMEOUT, exchange).await {
                Ok(Ok(answer)) => {
                    let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.len() < KEPT {
                        idle.push((sender, authority));
                    }
                    return Ok(answer);
                }
                Ok(Err(e)) => last = format!("the exchange with the hub broke off: {e}"),
                Err(_) => last = format!("the hub did not answer within {} s", TIMEOUT.as_secs()),
            }
        }
        Err(last)
    }

    async fn expect(
        &self,
        method: hyper::Method,
        path: String,
        body: Bytes,
        content_type: &str,
    ) -> Result<Bytes, String> {
        let (status, body) = self.call(method, path.clone(), body, content_type).await?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        Err(match https::api_error(&body) {
            Some(e) => format!("the hub refused it ({}): {}", e.code, e.message),
            None => format!("the hub answered {path} with HTTP {status}"),
        })
    }
}

fn base(job: &JobRef) -> String {
    format!(
        "/api/v1/agent/backups/{}/{}/{}",
        job.project, job.stage, job.id
    )
}

const JSON: &str = "application/json";
const OCTETS: &str = "application/octet-stream";

fn json(value: &impl Serialize) -> Result<Bytes, String> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| format!("could not encode a request: {e}"))
}

#[async_trait]
impl BackupHub for HttpBackupHub {
    async fn report(&self, job: &JobRef, report: &JobReport) -> Result<(), String> {
        let path = format!("{}/report", base(job));
        self.expect(hyper::Method::POST, path, json(report)?, JSON)
            .await
            .map(|_| ())
    }

    async fn missing(&self, job: &JobRef, digests: &[Digest]) -> Result<Vec<Digest>, String> {
        #[derive(Deserialize)]
        struct Missing {
            missing: Vec<String>,
        }
        let path = format!("{}/missing", base(job));
        let body = json(&serde_json::json!({
            "digests": digests.iter().map(Digest::as_hex).collect::<Vec<_>>()
        }))?;
        let answer = self.expect(hyper::Method::POST, path, body, JSON).await?;
        let missing: Missing = serde_json::from_slice(&answer)
            .map_err(|e| format!("the hub's answer about missing chunks is not understood: {e}"))?;
        missing
            .missing
            .iter()
            .map(|d| {
                d.parse()
                    .map_err(|e| format!("the hub named a bad digest: {e}"))
            })
            .collect()
    }

    async fn put_chunk(&self, job: &JobRef, digest: &Digest, stored: Bytes) -> Result<(), String> {
        let path = format!("{}/chunks/{digest}", base(job));
        self.expect(hyper::Method::PUT, path, stored, OCTETS)
            .await
            .map(|_| ())
    }

    async fn complete(&self, job: &JobRef, manifest: Bytes) -> Result<(), String> {
        let path = format!("{}/manifest", base(job));
        self.expect(hyper::Method::PUT, path, manifest, JSON)
            .await
            .map(|_| ())
    }

    async fn manifest(&self, job: &JobRef) -> Result<Bytes, String> {
        let path = format!("{}/manifest", base(job));
        self.expect(hyper::Method::GET, path, Bytes::new(), OCTETS)
            .await
    }

    async fn chunk(&self, job: &JobRef, digest: &Digest) -> Result<Bytes, String> {
        let path = format!("{}/chunks/{digest}", base(job));
        self.expect(hyper::Method::GET, path, Bytes::new(), OCTETS)
            .await
    }
}
