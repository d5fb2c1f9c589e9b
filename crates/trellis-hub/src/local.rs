//! The hub's local outpost: an agent embedded in the hub process, linked to
//! the hub through an in-memory link instead of a socket. Stages that are
//! not placed on a remote outpost run here, through exactly the same
//! session, sync and status code as remote ones.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use trellis_agent::{ConnectError, Connector};
use trellis_link::LinkIo;
use trellis_link::identity::{KeyFingerprint, PeerIdentity};
use trellis_model::LOCAL_OUTPOST;

use crate::chunks::{ChunkError, Chunks};
use crate::state::AppState;
use trellis_agent::runtime::RuntimeError;
use trellis_agent::runtime::artifacts::{ArtifactSource, Progress};
use trellis_cas::{ArtifactIndex, ChunkStore, Digest, Durability};

/// Directory of the local outpost's agent, under the hub's data directory.
pub const LOCAL_AGENT_DIR: &str = "local-outpost";

struct LocalConnector {
    state: AppState,
}

#[async_trait]
impl Connector for LocalConnector {
    async fn connect(&self) -> Result<Box<dyn LinkIo>, ConnectError> {
        let (hub_end, agent_end) = trellis_link::mem::pair();
        // The local agent is part of the hub; its identity is given, not
        // proven with a certificate.
        let peer = PeerIdentity {
            outpost: LOCAL_OUTPOST.to_owned(),
            serial_hex: "local".to_owned(),
            not_after: Utc::now() + chrono::Duration::days(36_500),
            public_key_fingerprint: KeyFingerprint([0; 32]),
        };
        tokio::spawn(crate::link::session::run(
            Box::new(hub_end),
            peer,
            self.state.clone(),
        ));
        Ok(Box::new(agent_end))
    }
}

/// Artifacts for the local outpost's agent when the hub keeps its chunks
/// in object storage: each chunk the agent needs is copied (verified) into
/// a cache in the agent's directory, as a remote agent fetches them.
struct BackendArtifacts {
    chunks: Chunks,
    cache: ChunkStore,
}

fn runtime_error(e: ChunkError) -> RuntimeError {
    let code = match e {
        ChunkError::NotFound { .. } => "artifact-not-found",
        ChunkError::Damaged { .. } => "artifact-corrupt",
        // The store may come back: the deployer retries these.
        _ => "artifact-fetch-failed",
    };
    RuntimeError::new(code, e.to_string())
}

impl BackendArtifacts {
    async fn copy(&self, digest: Digest) -> Result<(), RuntimeError> {
        let stored = self.chunks.stored(&digest).await.map_err(runtime_error)?;
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || cache.insert_stored(&digest, &stored))
            .await
            .map_err(|e| RuntimeError::new("artifact-fetch-failed", e.to_string()))?
            .map_err(|e| RuntimeError::new("artifact-corrupt", e.to_string()))?;
        Ok(())
    }
}

#[async_trait]
impl ArtifactSource for BackendArtifacts {
    async fn fetch(
        &self,
        index: &str,
        progress: Progress<'_>,
    ) -> Result<ArtifactIndex, RuntimeError> {
        let digest: Digest = index.parse().map_err(|e| {
            RuntimeError::new(
                "artifact-digest-invalid",
                format!("the plan names artifact {index:?}, which is not a digest: {e}"),
            )
        })?;
        let artifact = self.chunks.artifact(&digest).await.map_err(runtime_error)?;
        if !self.cache.contains(&digest) {
            self.copy(digest).await?;
        }
        let mut done = 0u64;
        for chunk in &artifact.chunks {
            if !self.cache.contains(&chunk.digest) {
                self.copy(chunk.digest).await?;
            }
            done += chunk.size;
            progress(done);
        }
        Ok(artifact)
    }

    fn store(&self) -> &ChunkStore {
        &self.cache
    }

    fn is_cache(&self) -> bool {
        true
    }
}

/// Runs the local outpost's agent until `shutdown` (the hub calls it under
/// the job lock `local-outpost`, so that of several hubs sharing a store
/// one runs it at a time).
pub async fn run(
    state: AppState,
    data_dir: PathBuf,
    mut runtime: trellis_agent::RuntimeSettings,
    shutdown: CancellationToken,
) {
    let dir = data_dir.join(LOCAL_AGENT_DIR);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(error = %e, dir = %dir.display(), "cannot create the local outpost's directory");
        return;
    }
    // The local agent reads artifacts from the hub's own store: in place
    // when it is a directory, else through a cache of its own.
    runtime.artifacts = Some(match state.chunks().local() {
        Some(store) => Arc::new(trellis_agent::runtime::artifacts::LocalArtifacts::new(
            store.clone(),
        )),
        None => {
            let root = dir.join("artifacts");
            match ChunkStore::open(&root, Durability::Cache) {
                Ok(cache) => Arc::new(BackendArtifacts {
                    chunks: state.chunks().clone(),
                    cache,
                }),
                Err(e) => {
                    tracing::error!(error = %e, dir = %root.display(), "cannot create the local outpost's artifact cache");
                    return;
                }
            }
        }
    });
    runtime.outpost = Some(LOCAL_OUTPOST.to_owned());
    runtime.backups = Some(Arc::new(LocalBackups {
        state: state.clone(),
    }));
    let options = trellis_agent::AgentOptions {
        connector: Some(Arc::new(LocalConnector { state })),
        runtime_settings: runtime,
        ..Default::default()
    };
    if let Err(e) = trellis_agent::run(&dir, options, shutdown.cancelled_owned()).await {
        tracing::error!(error = %e, "the local outpost's agent stopped");
    }
}

/// Backups of the local outpost's stages: the hub's own functions, called
/// directly (the agent is part of the hub).
struct LocalBackups {
    state: AppState,
}

fn backup_ref(job: &trellis_agent::backup::JobRef) -> crate::backups::BackupRef {
    crate::backups::BackupRef {
        project: job.project.clone(),
        stage: job.stage.clone(),
        id: job.id,
    }
}

fn said(e: crate::error::ApiError) -> String {
    format!("the hub refused it ({}): {}", e.code, e.message)
}

#[async_trait]
impl trellis_agent::backup::BackupHub for LocalBackups {
    async fn report(
        &self,
        job: &trellis_agent::backup::JobRef,
        report: &trellis_agent::backup::JobReport,
    ) -> Result<(), String> {
        let state = report
            .state
            .parse()
            .map_err(|e: String| format!("a report with a bad state: {e}"))?;
        let report = crate::backups::AgentReport {
            op: match report.op {
                trellis_link::protocol::BackupOp::Backup => "backup".into(),
                trellis_link::protocol::BackupOp::Restore => "restore".into(),
            },
            state,
            message: report.message.clone(),
            size: report.size,
        };
        crate::backups::report(&self.state, LOCAL_OUTPOST, &backup_ref(job), &report)
            .await
            .map(|_| ())
            .map_err(said)
    }

    async fn missing(
        &self,
        job: &trellis_agent::backup::JobRef,
        digests: &[Digest],
    ) -> Result<Vec<Digest>, String> {
        crate::backups::missing(
            &self.state,
            LOCAL_OUTPOST,
            &backup_ref(job),
            digests.to_vec(),
        )
        .await
        .map_err(said)
    }

    async fn put_chunk(
        &self,
        job: &trellis_agent::backup::JobRef,
        digest: &Digest,
        stored: bytes::Bytes,
    ) -> Result<(), String> {
        crate::backups::put_chunk(&self.state, LOCAL_OUTPOST, &backup_ref(job), digest, stored)
            .await
            .map(|_| ())
            .map_err(said)
    }

    async fn complete(
        &self,
        job: &trellis_agent::backup::JobRef,
        manifest: bytes::Bytes,
    ) -> Result<(), String> {
        crate::backups::complete(&self.state, LOCAL_OUTPOST, &backup_ref(job), &manifest)
            .await
            .map(|_| ())
            .map_err(said)
    }

    async fn manifest(&self, job: &trellis_agent::backup::JobRef) -> Result<bytes::Bytes, String> {
        crate::backups::manifest(&self.state, LOCAL_OUTPOST, &backup_ref(job))
            .await
            .map_err(said)
    }

    async fn chunk(
        &self,
        job: &trellis_agent::backup::JobRef,
        digest: &Digest,
    ) -> Result<bytes::Bytes, String> {
        crate::backups::chunk(&self.state, LOCAL_OUTPOST, &backup_ref(job), digest)
            .await
            .map_err(said)
    }
}
