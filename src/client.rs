//! The HTTP client of the hub's API, and the errors it can meet.
//!
//! Errors carry their class so that `main` can pick the exit code: the
//! hub refusing a request is the user's to fix (exit 1); a hub that cannot
//! be reached or fails internally is not (exit 2).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use trellis_hub::api::chunks::MAX_DIGESTS_PER_QUERY;
use trellis_hub::api::types::{ChunkInfoResponse, MissingChunksRequest, MissingChunksResponse};
use trellis_hub::error::ErrorBody;

/// Why a request to the hub failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub refused the request (4xx): the user can fix it.
    #[error("{message}\nhint: {hint}")]
    Refused {
        status: StatusCode,
        code: String,
        message: String,
        hint: String,
    },
    /// The hub failed (5xx) or answered something unreadable.
    #[error("the hub failed while {doing}: {message}\nhint: {hint}")]
    Server {
        doing: String,
        message: String,
        hint: String,
    },
    /// The hub is fine but what it needs is not available now (an outpost
    /// offline or busy, or its agent failed to answer): 502/503 with a
    /// reason.
    #[error("{message}\nhint: {hint}")]
    Unavailable {
        code: String,
        message: String,
        hint: String,
    },
    /// A stream (exec, port forward) to the hub could not be set up.
    #[error(
        "could not reach the hub at {endpoint} while {doing}: {message}\nhint: check that the hub runs and that --endpoint / TRELLIS_ENDPOINT is right"
    )]
    Stream {
        endpoint: String,
        doing: String,
        message: String,
    },
    /// The hub could not be reached.
    #[error(
        "could not reach the hub at {endpoint} while {doing}: {source}\nhint: check that the hub runs and that --endpoint / TRELLIS_ENDPOINT is right"
    )]
    Transport {
        endpoint: String,
        doing: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// Exit code for this error: 1 when the user can fix it, 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused { .. } => 1,
            ClientError::Server { .. }
            | ClientError::Unavailable { .. }
            | ClientError::Stream { .. }
            | ClientError::Transport { .. } => 2,
        }
    }
}

#[derive(Clone)]
pub struct HubClient {
    http: reqwest::Client,
    endpoint: String,
    key: Option<String>,
}

impl HubClient {
    pub fn new(
        endpoint: &str,
        key: Option<String>,
        ca_cert: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            anyhow::bail!(
                "the endpoint {endpoint:?} is not an http:// or https:// URL; use e.g. http://127.0.0.1:7440"
            );
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("trellis-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the hub's CA certificate {}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem).with_context(|| {
                format!(
                    "{} is not a PEM certificate (TRELLIS_CA_CERT)",
                    path.display()
                )
            })?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(HubClient {
            http: builder.build().context("setting up the HTTP client")?,
            endpoint,
            key,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}/api/v1{}", self.endpoint, path);
        let mut req = self.http.request(method, url);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        req
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        doing: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Transport {
            endpoint: self.endpoint.clone(),
            doing: doing.to_owned(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        let parsed: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        match (status.is_client_error(), parsed) {
            (_, Some(e)) if is_unavailable(status, &e.error.code) => {
                Err(ClientError::Unavailable {
                    code: e.error.code,
                    message: e.error.message,
                    hint: e.error.hint,
                })
            }
            (true, Some(e)) => Err(ClientError::Refused {
                status,
                code: e.error.code,
                message: e.error.message,
                hint: e.error.hint,
            }),
            (false, Some(e)) => Err(ClientError::Server {
                doing: doing.to_owned(),
                message: e.error.message,
                hint: e.error.hint,
            }),
            (_, None) => Err(ClientError::Server {
                doing: doing.to_owned(),
                message: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ),
                hint: "check that the endpoint is a Trellis hub".into(),
            }),
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        doing: &str,
    ) -> Result<T, ClientError> {
        let resp = self.send(req, doing).await?;
        resp.json().await.map_err(|e| ClientError::Server {
            doing: doing.to_owned(),
            message: format!("its answer was not understood: {e}"),
            hint: "the hub and this command line may be of different versions".into(),
        })
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        doing: &str,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::GET, path), doing).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        doing: &str,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::POST, path).json(body), doing)
            .await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        doing: &str,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::PUT, path).json(body), doing)
            .await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        doing: &str,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::PATCH, path).json(body), doing)
            .await
    }

    /// A GET whose answer is read as it arrives (`resp.chunk()`); errors
    /// before the body are classified like every other request's.
    pub async fn get_stream(
        &self,
        path: &str,
        query: &[(&str, String)],
        doing: &str,
    ) -> Result<reqwest::Response, ClientError> {
        self.send(self.request(Method::GET, path).query(query), doing)
            .await
    }

    /// A DELETE whose answer is a JSON body.
    pub async fn delete_json<T: DeserializeOwned>(
        &self,
        path: &str,
        doing: &str,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::DELETE, path), doing).await
    }

    pub async fn delete(&self, path: &str, doing: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, path), doing)
            .await
            .map(drop)
    }

    /// Which of `digests` (hex) the hub lacks, asked in batches of at most
    /// what one query may carry.
    pub async fn missing_chunks(&self, digests: &[String]) -> Result<Vec<String>, ClientError> {
        let mut missing = Vec::new();
        for batch in digests.chunks(MAX_DIGESTS_PER_QUERY) {
            let answer: MissingChunksResponse = self
                .post(
                    "/chunks/missing",
                    &MissingChunksRequest {
                        digests: batch.to_vec(),
                    },
                    "asking which chunks the hub lacks",
                )
                .await?;
            missing.extend(answer.missing);
        }
        Ok(missing)
    }

    /// PUTs raw bytes (an agent binary) and reads the JSON answer.
    pub async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        doing: &str,
    ) -> Result<T, ClientError> {
        let req = self
            .request(Method::PUT, path)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(CHUNK_UPLOAD_TIMEOUT)
            .body(body);
        self.json(req, doing).await
    }

    /// Uploads one chunk in its stored form (one zstd frame of content
    /// named `digest`).
    pub async fn put_chunk(
        &self,
        digest: &str,
        stored: Vec<u8>,
    ) -> Result<ChunkInfoResponse, ClientError> {
        let req = self
            .request(Method::PUT, &format!("/chunks/{}", seg(digest)))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(CHUNK_UPLOAD_TIMEOUT)
            .body(stored);
        self.json(req, &format!("uploading chunk {digest}")).await
    }
}

/// Whether an answer says the hub is fine but what it needs is not
/// available now: a gateway status, or an outpost that is offline or busy
/// (which the hub answers with 409 and 429, as states rather than faults).
fn is_unavailable(status: StatusCode, code: &str) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
    ) || matches!(code, "outpost-offline" | "outpost-busy")
}

/// How long one chunk upload (at most about a mebibyte, more only for the
/// index of a very large artifact) may take before it counts as a broken
/// connection and is tried again.
const CHUNK_UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// Path segments come from the user: escape anything that is not a plain
/// name character so it cannot change the URL's shape.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
