//! Agent binaries the hub holds, one per (version, architecture): what
//! `GET /install` installs on an outpost and what agents update to.
//!
//! The record (version, architecture, size, BLAKE3 and SHA-256 of the
//! whole binary, the artifact's index digest) lives in the store; the bytes
//! live in the chunk store as an artifact of kind `binary`, cut and indexed
//! as release artifacts are. So every hub instance sharing the store and
//! the chunk store serves the same binaries, an agent can fetch one chunk
//! by chunk over its link identity like any release artifact, and garbage
//! collection keeps a binary's chunks while its record exists.
//!
//! A binary is refused before anything is stored when its ELF header names
//! another machine than the architecture it is uploaded under.

use std::path::Path;

use axum::http::StatusCode;
use chrono::Utc;
use trellis_cas::{ARTIFACT_CHUNKS, ArtifactIndex, ArtifactKind, ChunkRef, Digest, INDEX_FORMAT};
use trellis_model::AgentBinary;
use trellis_model::agent_binary::{check_arch, check_version, elf_arch};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The largest agent binary the hub takes. Today's is about 12 MB.
pub const MAX_BINARY_BYTES: usize = 256 * 1024 * 1024;

/// The file name of the agent binary next to the `trellis` binary, which
/// a hub offers by itself when nothing was uploaded.
pub const AGENT_FILE_NAME: &str = "trellis-agent";

/// Who a binary the hub registered by itself was uploaded by.
pub const HUB_UPLOADER: &str = "hub";

/// A version that [`check_version`] refuses: 400.
pub fn invalid_version(version: &str) -> ApiError {
    let e = check_version(version).err();
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid-version",
        e.map(|e| e.to_string())
            .unwrap_or_else(|| format!("{version:?} is not an agent version")),
        "give the version the binary reports with `--version`, e.g. 0.4.1",
    )
}

/// Checks a version and an architecture from a request path.
pub fn check_path(version: &str, arch: &str) -> ApiResult<()> {
    if check_version(version).is_err() {
        return Err(invalid_version(version));
    }
    check_arch(arch).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown-arch",
            e.to_string(),
            "`uname -m` on the outpost says which; x86_64 and aarch64 are the usual ones",
        )
    })
}

/// Whether [`store_binary`] recorded a new binary or found the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    New,
    Again,
}

/// Checks `bytes` as the agent binary `version` for `arch`, stores its
/// chunks and index, and records it. Nothing is recorded when a check
/// fails; chunks stored before a later failure are garbage after the grace
/// period (see [`crate::gc`]).
pub async fn store_binary(
    state: &AppState,
    version: &str,
    arch: &str,
    bytes: bytes::Bytes,
    uploaded_by: &str,
) -> ApiResult<(AgentBinary, Stored)> {
    check_path(version, arch)?;
    let built_for = elf_arch(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code(),
            format!("the upload is not an agent binary: {e}"),
            "upload the trellis-agent executable built for the outpost's architecture",
        )
    })?;
    if built_for != arch {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "arch-mismatch",
            format!(
                "the binary is built for {built_for}, not {arch}: its ELF header names the machine"
            ),
            format!(
                "upload it as /agent-binaries/{version}/{built_for} (`trellis upload agent-binary` reads the architecture from the file), or upload the {arch} build"
            ),
        ));
    }
    let cut = tokio::task::spawn_blocking(move || cut(&bytes))
        .await
        .map_err(|e| ApiError::internal(format!("cutting the agent binary stopped: {e}")))?
        .map_err(|e| ApiError::internal(format!("cutting the agent binary failed: {e}")))?;
    let doing = format!("storing agent binary {version}/{arch}");
    for (digest, stored) in cut.chunks {
        state
            .chunks()
            .put_stored(&digest, stored)
            .await
            .map_err(|e| e.to_api(&doing))?;
    }
    state
        .chunks()
        .put_stored(&cut.index_digest, cut.index_stored)
        .await
        .map_err(|e| e.to_api(&doing))?;
    let record = AgentBinary {
        version: version.to_owned(),
        arch: arch.to_owned(),
        size: cut.index.size,
        blake3: cut.index.digest.as_hex(),
        sha256: cut.sha256,
        manifest: cut.index_digest.as_hex(),
        uploaded_at: Utc::now(),
        uploaded_by: uploaded_by.to_owned(),
    };
    match state.store().put_agent_binary(&record).await {
        Ok(stored) if stored == record => Ok((stored, Stored::New)),
        Ok(stored) => Ok((stored, Stored::Again)),
        Err(trellis_store::StoreError::AlreadyExists { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "agent-binary-exists",
            format!(
                "the hub already holds another binary as agent {version} for {arch}; a version names one binary for good"
            ),
            format!(
                "give the new build a new version, or delete the old one first (DELETE /api/v1/agent-binaries/{version}/{arch}) if no agent runs it"
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

/// A binary cut into stored chunks, with its index.
struct Cut {
    chunks: Vec<(Digest, bytes::Bytes)>,
    index: ArtifactIndex,
    index_digest: Digest,
    index_stored: bytes::Bytes,
    sha256: String,
}

fn cut(bytes: &[u8]) -> std::io::Result<Cut> {
    let mut chunks = Vec::new();
    let mut refs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    trellis_cas::cut_chunks(bytes, ARTIFACT_CHUNKS, |digest, data| {
        refs.push(ChunkRef {
            digest,
            size: data.len() as u64,
        });
        if seen.insert(digest) {
            chunks.push((digest, bytes::Bytes::from(trellis_cas::compress(&data)?)));
        }
        Ok::<(), std::io::Error>(())
    })?;
    let index = ArtifactIndex {
        format: INDEX_FORMAT.to_owned(),
        kind: ArtifactKind::Binary,
        size: bytes.len() as u64,
        digest: Digest::of(bytes),
        chunks: refs,
    };
    let index_bytes = index.to_bytes();
    let index_digest = Digest::of(&index_bytes);
    let index_stored = bytes::Bytes::from(trellis_cas::compress(&index_bytes)?);
    let sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes));
    Ok(Cut {
        chunks,
        index,
        index_digest,
        index_stored,
        sha256,
    })
}

/// The newest binary held for `arch`, if any.
pub async fn newest(state: &AppState, arch: &str) -> ApiResult<Option<AgentBinary>> {
    Ok(state
        .store()
        .list_agent_binaries()
        .await?
        .into_iter()
        .find(|b| b.arch == arch))
}

/// Registers the agent binary at `path` (at start: `--agent-binary`, or
/// the `trellis-agent` next to the `trellis` binary). Its version is what
/// it prints with `--version`, so only a binary this host can run is
/// registered this way; its architecture is read from its ELF header.
pub async fn register_file(state: &AppState, path: &Path) -> anyhow::Result<AgentBinary> {
    use anyhow::Context;
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading the agent binary {}", path.display()))?;
    let arch = elf_arch(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not an agent binary: {e}", path.display()))?;
    let output = tokio::process::Command::new(path)
        .arg("--version")
        .output()
        .await
        .with_context(|| {
            format!(
                "running {} --version to learn its version (a binary for another architecture is uploaded with `trellis upload agent-binary`)",
                path.display()
            )
        })?;
    let printed = String::from_utf8_lossy(&output.stdout);
    // `trellis-agent 0.4.1`: the version is the last word.
    let version = printed
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned();
    check_version(&version).map_err(|e| {
        anyhow::anyhow!(
            "{} --version printed {:?}: {e}",
            path.display(),
            printed.trim()
        )
    })?;
    let (binary, _) = store_binary(state, &version, arch, bytes.into(), HUB_UPLOADER)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", e.message, e.hint))
        .with_context(|| format!("registering the agent binary {}", path.display()))?;
    Ok(binary)
}

/// The `trellis-agent` next to the running executable, if there is one.
pub fn beside_this_executable() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join(AGENT_FILE_NAME);
    (candidate.is_file() && candidate != exe).then_some(candidate)
}
