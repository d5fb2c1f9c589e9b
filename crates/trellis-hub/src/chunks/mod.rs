//! The hub's artifact store: every build's images and packages as
//! compressed chunks named by the BLAKE3 digest of their content, behind one
//! interface ([`ChunkBackend`]) with two backends:
//!
//! - `dir.rs`: a directory of the data directory (`artifacts/`, the
//!   default), [`trellis_cas::ChunkStore`] as the agents use it too;
//! - `s3.rs`: any S3-compatible object store (`--chunks
//!   s3://BUCKET?endpoint=…`), for hubs that share their artifacts.
//!
//! [`Chunks`] is what the rest of the hub uses: it checks every chunk it
//! stores (it must decompress to content named by its digest, whatever
//! backend keeps it), reads indexes and artifacts back verified, and turns
//! a backend's failures into the API's errors. Chunks read from object
//! storage are verified before the hub passes them on, since they crossed a
//! network from a store the hub does not control; the directory's files
//! were verified when the hub wrote them, and agents verify every chunk they
//! receive anyway.
//!
//! Agents fetch from the hub only (an outpost may reach nothing else); the
//! hub reads the backend for them.

pub mod dir;
pub mod s3;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use trellis_cas::{ArtifactIndex, CasError, ChunkInfo, ChunkRef, ChunkStore, Digest, StoredChunk};

use crate::error::ApiError;

/// Requests to an object store in flight at once for one operation.
const PARALLEL: usize = 16;

/// Why the artifact store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The backend does not have the chunk.
    #[error("{store} has no chunk {digest}")]
    NotFound { store: String, digest: Digest },
    /// The backend cannot be reached or does not answer (it may come back).
    #[error("{store} cannot be reached: {reason}")]
    Unavailable { store: String, reason: String },
    /// The backend refused the hub (credentials, permissions).
    #[error("{store} refused the hub: {reason}")]
    Refused { store: String, reason: String },
    /// What the backend holds does not verify.
    #[error("chunk {digest} in {store} is damaged: {reason}")]
    Damaged {
        store: String,
        digest: Digest,
        reason: String,
    },
    /// What was offered for storing does not verify (an upload).
    #[error("{0}")]
    Invalid(CasError),
    /// Anything else the backend reported (a full disk, say).
    #[error("{store} failed: {reason}")]
    Failed {
        store: String,
        reason: String,
        disk_full: bool,
    },
}

impl ChunkError {
    /// The API error for a request that met this.
    pub fn to_api(&self, doing: &str) -> ApiError {
        match self {
            ChunkError::NotFound { .. } => ApiError::new(
                StatusCode::NOT_FOUND,
                "artifact-not-found",
                format!("{doing}: {self}"),
                "push the build again",
            ),
            ChunkError::Unavailable { .. } | ChunkError::Refused { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "artifact-store-unavailable",
                format!("{doing}: {self}"),
                "the hub's artifact store is down or refuses the hub; retry once it is back (an administrator sees it in GET /api/v1/health)",
            ),
            ChunkError::Damaged { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "chunk-damaged-on-hub",
                format!("{doing}: {self}"),
                "push the build again to store a good copy",
            ),
            // The content does not verify: 422, like every content check.
            ChunkError::Invalid(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "chunk-invalid",
                format!("{doing}: {self}"),
                "the upload was damaged on the way; push again",
            ),
            ChunkError::Failed {
                disk_full: true, ..
            } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "hub-disk-full",
                format!("{doing}: {self}"),
                "free space on the hub (delete old builds, then they are collected), then push again; chunks already uploaded are kept",
            ),
            ChunkError::Failed { .. } => ApiError::internal(format!("{doing}: {self}")),
        }
    }
}

/// One way of keeping chunks. Chunks go in and come out in their stored
/// form (a zstd frame); [`Chunks`] verifies them.
#[async_trait]
pub trait ChunkBackend: Send + Sync + 'static {
    /// What and where it is, for messages (`the S3 bucket b at http://…`).
    fn describe(&self) -> String;
    /// Whether the backend can be used: reachable, the hub allowed in.
    async fn check(&self) -> Result<(), ChunkError>;
    /// A chunk's stored form, `None` if there is no such chunk.
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, ChunkError>;
    /// Stores a verified chunk (replacing one of the same name, which by
    /// construction holds the same content).
    async fn put(&self, digest: &Digest, stored: Bytes) -> Result<(), ChunkError>;
    /// Whether the chunk is stored.
    async fn contains(&self, digest: &Digest) -> Result<bool, ChunkError>;
    /// Marks the chunk as wanted now (see [`crate::gc`]); `false` if it is
    /// not stored.
    async fn touch(&self, digest: &Digest) -> Result<bool, ChunkError>;
    /// Every stored chunk with its size and when it was stored or touched.
    async fn list(&self) -> Result<Vec<StoredChunk>, ChunkError>;
    /// Removes the chunk; whether it was there.
    async fn remove(&self, digest: &Digest) -> Result<bool, ChunkError>;
    /// The local directory store, when that is the backend.
    fn local(&self) -> Option<&ChunkStore> {
        None
    }
}

/// The hub's artifact store. Cheap to clone.
#[derive(Clone)]
pub struct Chunks {
    backend: Arc<dyn ChunkBackend>,
}

impl std::fmt::Debug for Chunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Chunks")
            .field(&self.backend.describe())
            .finish()
    }
}

impl Chunks {
    pub fn new(backend: Arc<dyn ChunkBackend>) -> Chunks {
        Chunks { backend }
    }

    /// The store `--chunks` names: `None` for the directory `artifacts/`
    /// in the data directory, or `s3://BUCKET[/PREFIX]?endpoint=…`.
    /// Checks it can be used, so a wrong bucket or credentials stop the hub
    /// at start, naming what to fix.
    pub async fn open(url: Option<&str>, data_dir: &Path) -> anyhow::Result<Chunks> {
        let chunks = match url {
            None => {
                let root = data_dir.join("artifacts");
                Chunks::new(Arc::new(dir::DirChunks::open(&root)?))
            }
            Some(url) => {
                let location = s3::S3Location::parse(url)?;
                Chunks::new(Arc::new(s3::S3Chunks::new(location, None)?))
            }
        };
        chunks.backend.check().await.map_err(|e| {
            anyhow::anyhow!(
                "the hub cannot use its artifact store (--chunks / TRELLIS_CHUNKS): {e}"
            )
        })?;
        Ok(chunks)
    }

    /// A store on the directory `root` (tests, tools).
    pub fn dir(root: &Path) -> anyhow::Result<Chunks> {
        Ok(Chunks::new(Arc::new(dir::DirChunks::open(root)?)))
    }

    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    pub fn backend(&self) -> &dyn ChunkBackend {
        self.backend.as_ref()
    }

    /// The local directory store, when that is the backend.
    pub fn local(&self) -> Option<&ChunkStore> {
        self.backend.local()
    }

    pub async fn check(&self) -> Result<(), ChunkError> {
        self.backend.check().await
    }

    /// Stores a chunk received in its stored form, once it verifies.
    pub async fn put_stored(
        &self,
        digest: &Digest,
        stored: Bytes,
    ) -> Result<ChunkInfo, ChunkError> {
        let (d, bytes) = (*digest, stored.clone());
        let size = tokio::task::spawn_blocking(move || trellis_cas::verify_stored(&d, &bytes))
            .await
            .map_err(|e| self.failed(format!("verifying a chunk stopped: {e}")))?
            .map_err(ChunkError::Invalid)?;
        let len = stored.len() as u64;
        self.backend.put(digest, stored).await?;
        Ok(ChunkInfo {
            digest: *digest,
            size,
            stored: len,
        })
    }

    /// Of `digests`, the ones not stored; the others are marked as wanted
    /// now (a push in progress keeps what it found).
    pub async fn missing_of(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, ChunkError> {
        let touched: Vec<Result<(Digest, bool), ChunkError>> = stream::iter(digests)
            .map(|d| async move { self.backend.touch(&d).await.map(|stored| (d, stored)) })
            .buffered(PARALLEL)
            .collect()
            .await;
        let mut missing = Vec::new();
        for result in touched {
            let (digest, stored) = result?;
            if !stored {
                missing.push(digest);
            }
        }
        Ok(missing)
    }

    /// A chunk's stored form, as it is sent to agents: verified first when
    /// it came from object storage (see the module docs).
    pub async fn stored(&self, digest: &Digest) -> Result<Bytes, ChunkError> {
        let bytes = self
            .backend
            .get(digest)
            .await?
            .ok_or_else(|| self.not_found(digest))?;
        if self.backend.local().is_none() {
            self.verify(digest, bytes.clone()).await?;
        }
        Ok(bytes)
    }

    /// A chunk's content, decompressed and verified.
    pub async fn read(&self, digest: &Digest) -> Result<Vec<u8>, ChunkError> {
        let bytes = self
            .backend
            .get(digest)
            .await?
            .ok_or_else(|| self.not_found(digest))?;
        let d = *digest;
        let store = self.describe();
        tokio::task::spawn_blocking(move || {
            let data = trellis_cas::decompress(&bytes).map_err(|e| ChunkError::Damaged {
                store: store.clone(),
                digest: d,
                reason: e.to_string(),
            })?;
            let actual = Digest::of(&data);
            if actual != d {
                return Err(ChunkError::Damaged {
                    store,
                    digest: d,
                    reason: format!("its content hashes to {actual}"),
                });
            }
            Ok(data)
        })
        .await
        .map_err(|e| self.failed(format!("reading a chunk stopped: {e}")))?
    }

    async fn verify(&self, digest: &Digest, bytes: Bytes) -> Result<u64, ChunkError> {
        let d = *digest;
        let store = self.describe();
        tokio::task::spawn_blocking(move || {
            trellis_cas::verify_stored(&d, &bytes).map_err(|e| ChunkError::Damaged {
                store,
                digest: d,
                reason: e.to_string(),
            })
        })
        .await
        .map_err(|e| self.failed(format!("verifying a chunk stopped: {e}")))?
    }

    /// Reads and parses the index of artifact `digest`.
    pub async fn artifact(&self, digest: &Digest) -> Result<ArtifactIndex, ChunkError> {
        let bytes = self.read(digest).await?;
        ArtifactIndex::parse(digest, &bytes).map_err(|e| ChunkError::Damaged {
            store: self.describe(),
            digest: *digest,
            reason: e.to_string(),
        })
    }

    /// The distinct chunks of `index` that are not stored.
    pub async fn missing(&self, index: &ArtifactIndex) -> Result<Vec<ChunkRef>, ChunkError> {
        let checked: Vec<Result<(ChunkRef, bool), ChunkError>> =
            stream::iter(index.distinct_chunks())
                .map(|c| async move { self.backend.contains(&c.digest).await.map(|has| (c, has)) })
                .buffered(PARALLEL)
                .collect()
                .await;
        let mut missing = Vec::new();
        for result in checked {
            let (chunk, stored) = result?;
            if !stored {
                missing.push(chunk);
            }
        }
        Ok(missing)
    }

    /// The artifact's content, chunk by chunk, each verified, and the whole
    /// checked against the index at the end: a damaged or missing chunk (or
    /// a store that stops answering) ends the stream with an error, never
    /// with wrong bytes. A consumer that goes away stops the reading.
    pub fn content(
        &self,
        index_digest: Digest,
        index: ArtifactIndex,
    ) -> tokio::sync::mpsc::Receiver<std::io::Result<Bytes>> {
        if let Some(local) = self.backend.local() {
            let reader = local.open_artifact(&index_digest, &index);
            let (rx, reading) = trellis_agent::runtime::artifacts::stream_artifact(reader);
            tokio::spawn(async move {
                if let Ok(Err(e)) = reading.await {
                    tracing::error!(%index_digest, error = %e, "an artifact could not be served");
                }
            });
            return rx;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let chunks = self.clone();
        tokio::spawn(async move {
            let mut hasher = blake3::Hasher::new();
            let digests: Vec<Digest> = index.chunks.iter().map(|c| c.digest).collect();
            let mut reads = stream::iter(digests)
                .map(|d| {
                    let chunks = chunks.clone();
                    async move { chunks.read(&d).await }
                })
                .buffered(4);
            while let Some(read) = reads.next().await {
                match read {
                    Ok(data) => {
                        hasher.update(&data);
                        if tx.send(Ok(Bytes::from(data))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(%index_digest, error = %e, "an artifact could not be served");
                        let _ = tx
                            .send(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
                            .await;
                        return;
                    }
                }
            }
            let actual = Digest::from_hash(hasher.finalize());
            if actual != index.digest {
                let e = CasError::ArtifactMismatch {
                    index: index_digest,
                    expected: index.digest,
                    actual,
                };
                let _ = tx
                    .send(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
                    .await;
            }
        });
        rx
    }

    pub async fn list(&self) -> Result<Vec<StoredChunk>, ChunkError> {
        self.backend.list().await
    }

    pub async fn remove(&self, digest: &Digest) -> Result<bool, ChunkError> {
        self.backend.remove(digest).await
    }

    fn not_found(&self, digest: &Digest) -> ChunkError {
        ChunkError::NotFound {
            store: self.describe(),
            digest: *digest,
        }
    }

    fn failed(&self, reason: String) -> ChunkError {
        ChunkError::Failed {
            store: self.describe(),
            reason,
            disk_full: false,
        }
    }
}
