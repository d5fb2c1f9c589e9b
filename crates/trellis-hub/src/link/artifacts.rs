//! Artifacts for outpost agents (BRIEF §4–5): chunks by digest
//! (`/api/v1/agent/chunks/{digest}`, with `Range` so an interrupted chunk
//! resumes) and, for clients that cannot assemble chunks, an artifact's
//! whole content (`/api/v1/agent/artifacts/{index}/content`).
//!
//! Both need the agent's client certificate, and serve only what belongs
//! to a build released to a stage on the agent's outpost: an artifact
//! index of such a build, or a chunk listed by one. Which indexes an
//! outpost may read (and every agent binary's index, for self-update) is worked out from the store and cached briefly per
//! outpost ([`ArtifactAccess`]); the chunk list of each index is cached
//! for good (an index never changes), so serving hundreds of chunks of one
//! delivery costs one store walk, not one per chunk.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use trellis_cas::{Digest, INDEX_FORMAT};
use trellis_model::Artifact;

use super::endpoint::authorize_agent;
use crate::api::chunks::parse_digest;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::tls::ConnectionInfo;

/// How long an outpost's set of readable artifacts is reused before the
/// store is asked again. A digest not in the cached set makes the hub look
/// again (at most once per [`RECHECK_INTERVAL`], waiting out the rest of
/// it), so a release pushed a moment ago is readable at once.
const ACCESS_TTL: Duration = Duration::from_secs(30);
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Chunk lists of this many indexes are kept in memory.
const MAX_CACHED_INDEXES: usize = 1024;
/// How long an agent found allowed (outpost exists, not revoked, its
/// registered key) is believed without asking the store again. A delivery
/// makes hundreds of requests in a few seconds; revoking or deleting the
/// outpost on this hub forgets it at once ([`ArtifactAccess::forget`]).
const AGENT_TTL: Duration = Duration::from_secs(2);

/// Which artifacts each outpost may read. See the module docs.
#[derive(Default)]
pub struct ArtifactAccess {
    outposts: Mutex<HashMap<String, Allowed>>,
    indexes: Mutex<HashMap<Digest, Arc<HashSet<Digest>>>>,
    /// Agents recently found allowed: outpost → (key fingerprint, when).
    agents: Mutex<HashMap<String, (String, Instant)>>,
}

struct Allowed {
    at: Instant,
    indexes: Arc<HashSet<Digest>>,
}

impl std::fmt::Debug for ArtifactAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactAccess").finish_non_exhaustive()
    }
}

/// What a request may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Index,
    IndexOrChunk,
}

impl ArtifactAccess {
    /// The outpost was revoked or deleted: its agent is asked about anew.
    pub fn forget(&self, outpost: &str) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(outpost);
        self.outposts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(outpost);
    }

    /// The agent behind a request, checked against the store at most every
    /// [`AGENT_TTL`].
    async fn agent(
        &self,
        state: &AppState,
        connection: Option<axum::Extension<ConnectionInfo>>,
    ) -> ApiResult<trellis_link::identity::PeerIdentity> {
        if let Some(peer) = connection.as_ref().and_then(|c| c.0.peer.clone()) {
            let fingerprint = peer.public_key_fingerprint.to_string();
            let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            if agents
                .get(&peer.outpost)
                .is_some_and(|(f, at)| *f == fingerprint && at.elapsed() < AGENT_TTL)
            {
                return Ok(peer);
            }
        }
        let peer = authorize_agent(state, connection).await?;
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                peer.outpost.clone(),
                (peer.public_key_fingerprint.to_string(), Instant::now()),
            );
        Ok(peer)
    }

    /// Whether `outpost` may read `digest` (as an index, or as a chunk of
    /// one when `wanted` allows).
    async fn allows(
        &self,
        state: &AppState,
        outpost: &str,
        digest: &Digest,
        wanted: Wanted,
    ) -> ApiResult<bool> {
        let cached = self.cached(outpost);
        if let Some(indexes) = &cached
            && self.permits(state, indexes, digest, wanted).await
        {
            return Ok(true);
        }
        // Not in what we knew: look again — after waiting out the rest of
        // the recheck interval if we just looked, so a release pushed a
        // moment after the last look is found, and a caller asking for
        // unknown digests costs at most one look per interval.
        if cached.is_some() {
            let wait = self.recheck_wait(outpost);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let fresh = self.refresh(state, outpost).await?;
        Ok(self.permits(state, &fresh, digest, wanted).await)
    }

    fn cached(&self, outpost: &str) -> Option<Arc<HashSet<Digest>>> {
        let outposts = self.outposts.lock().unwrap_or_else(|p| p.into_inner());
        outposts
            .get(outpost)
            .filter(|a| a.at.elapsed() < ACCESS_TTL)
            .map(|a| a.indexes.clone())
    }

    /// How long until the outpost's set may be looked up again.
    fn recheck_wait(&self, outpost: &str) -> Duration {
        let outposts = self.outposts.lock().unwrap_or_else(|p| p.into_inner());
        outposts
            .get(outpost)
            .map(|a| RECHECK_INTERVAL.saturating_sub(a.at.elapsed()))
            .unwrap_or_default()
    }

    async fn refresh(&self, state: &AppState, outpost: &str) -> ApiResult<Arc<HashSet<Digest>>> {
        let indexes = Arc::new(released_indexes(state, outpost).await?);
        let mut outposts = self.outposts.lock().unwrap_or_else(|p| p.into_inner());
        outposts.insert(
            outpost.to_owned(),
            Allowed {
                at: Instant::now(),
                indexes: indexes.clone(),
            },
        );
        Ok(indexes)
    }

    async fn permits(
        &self,
        state: &AppState,
        indexes: &HashSet<Digest>,
        digest: &Digest,
        wanted: Wanted,
    ) -> bool {
        if indexes.contains(digest) {
            return true;
        }
        if wanted == Wanted::Index {
            return false;
        }
        for index in indexes {
            if let Some(chunks) = self.chunks_of(state, index).await
                && chunks.contains(digest)
            {
                return true;
            }
        }
        false
    }

    /// The chunks listed by `index`, read once and cached. `None` when the
    /// index cannot be read (it is then not cached, and the request fails
    /// as not found).
    async fn chunks_of(&self, state: &AppState, index: &Digest) -> Option<Arc<HashSet<Digest>>> {
        if let Some(chunks) = self
            .indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
        {
            return Some(chunks.clone());
        }
        let artifact = state.chunks().artifact(index).await.ok()?;
        let chunks: Arc<HashSet<Digest>> =
            Arc::new(artifact.chunks.iter().map(|c| c.digest).collect());
        let mut indexes = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        if indexes.len() >= MAX_CACHED_INDEXES {
            indexes.clear();
        }
        indexes.insert(*index, chunks.clone());
        Some(chunks)
    }
}

/// The artifact indexes of every build released to a stage on `outpost`,
/// and of every agent binary the hub holds (what an agent updates to; no
/// secret, served to anyone at `/api/v1/agent-binaries` too).
async fn released_indexes(state: &AppState, outpost: &str) -> ApiResult<HashSet<Digest>> {
    let mut indexes = HashSet::new();
    for binary in state.store().list_agent_binaries().await? {
        if let Ok(digest) = binary.manifest.parse::<Digest>() {
            indexes.insert(digest);
        }
    }
    for stage in state.store().stages_on_outpost(outpost).await? {
        let mut seen = HashSet::new();
        for release in state
            .store()
            .list_releases(&stage.project, &stage.name)
            .await?
        {
            if !seen.insert(release.build.clone()) {
                continue;
            }
            let Ok(build) = state
                .store()
                .get_build(&stage.project, &release.build)
                .await
            else {
                continue;
            };
            for component in &build.components {
                let package = match &component.artifact {
                    Artifact::Package { digest, .. } => Some(digest.as_str()),
                    Artifact::Image { .. } => None,
                };
                let images = component.artifact.archives().map(|a| a.index.as_str());
                for index in package.into_iter().chain(images) {
                    if let Ok(digest) = index.parse::<Digest>() {
                        indexes.insert(digest);
                    }
                }
            }
        }
    }
    Ok(indexes)
}

fn not_found(what: &str, digest: &Digest, outpost: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "artifact-not-found",
        format!("this hub has no {what} {digest} for outpost {outpost:?}"),
        "it belongs to a build released to a stage on this outpost; push the build again if it was deleted",
    )
}

/// One chunk in its stored form (a zstd frame), for the outpost agents
/// whose releases use it. Supports one `Range`, so an interrupted chunk
/// resumes.
#[utoipa::path(get, path = "/agent/chunks/{digest}", tag = "outposts",
    params(crate::api::params::DigestPath,
        ("Range" = Option<String>, Header, description = "One byte range, e.g. `bytes=1000-`"),
    ),
    responses(
        (status = 200, description = "The stored chunk", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range of the stored chunk", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 503, description = "the outpost is outside its delivery window (`delivery-window-closed`; `Retry-After` says when it opens)", body = crate::error::ErrorBody),
    ))]
pub async fn chunk(
    State(state): State<AppState>,
    connection: Option<axum::Extension<ConnectionInfo>>,
    crate::extract::Path(digest): crate::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    match serve_chunk(&state, connection, &digest, &headers).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn serve_chunk(
    state: &AppState,
    connection: Option<axum::Extension<ConnectionInfo>>,
    digest: &str,
    headers: &axum::http::HeaderMap,
) -> ApiResult<Response> {
    let peer = state.artifact_access().agent(state, connection).await?;
    let digest = parse_digest(digest)?;
    if !state
        .artifact_access()
        .allows(state, &peer.outpost, &digest, Wanted::IndexOrChunk)
        .await?
    {
        return Err(not_found("chunk", &digest, &peer.outpost));
    }
    if let Some(closed) = window_closed(state, &peer.outpost) {
        return Ok(closed);
    }
    // Chunks are small (a stored chunk is at most about 1 MiB): one read
    // into memory beats streaming it in small reads.
    let bytes = match state.chunks().stored(&digest).await {
        Ok(bytes) => bytes,
        Err(crate::chunks::ChunkError::NotFound { .. }) => {
            return Err(not_found("chunk", &digest, &peer.outpost));
        }
        Err(e) => return Err(e.to_api(&format!("chunk {digest} cannot be served"))),
    };
    let len = bytes.len() as u64;
    let range = match byte_range(headers.get(header::RANGE), len) {
        Ok(range) => range,
        Err(()) => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range-not-satisfiable",
                format!("chunk {digest} has {len} bytes; the requested range lies outside"),
                "ask for a range within the chunk, or for all of it",
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(response);
        }
    };
    let (status, start, count) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, len),
    };
    let bytes = bytes.slice(start as usize..(start + count) as usize);
    let body = match state.links().profiles.pacer(&peer.outpost) {
        Some(pacer) => super::profile::paced_body(bytes, pacer),
        None => axum::body::Body::from(bytes),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

/// An artifact's whole content (an image archive, a package), put together
/// from its chunks and verified on the way: a damaged chunk ends the
/// response early with an error instead of sending wrong bytes. For
/// clients that fetch whole artifacts; agents fetch chunks.
#[utoipa::path(get, path = "/agent/artifacts/{index}/content", tag = "outposts",
    params(crate::api::params::IndexPath),
    responses(
        (status = 200, description = "The artifact's content", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 503, description = "the outpost is outside its delivery window (`delivery-window-closed`; `Retry-After` says when it opens)", body = crate::error::ErrorBody),
    ))]
pub async fn artifact_content(
    State(state): State<AppState>,
    connection: Option<axum::Extension<ConnectionInfo>>,
    crate::extract::Path(index): crate::extract::Path<String>,
) -> Response {
    match serve_content(&state, connection, &index).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn serve_content(
    state: &AppState,
    connection: Option<axum::Extension<ConnectionInfo>>,
    index: &str,
) -> ApiResult<Response> {
    let peer = state.artifact_access().agent(state, connection).await?;
    let digest = parse_digest(index)?;
    if !state
        .artifact_access()
        .allows(state, &peer.outpost, &digest, Wanted::Index)
        .await?
    {
        return Err(not_found("artifact", &digest, &peer.outpost));
    }
    if let Some(closed) = window_closed(state, &peer.outpost) {
        return Ok(closed);
    }
    let artifact = match state.chunks().artifact(&digest).await {
        Ok(artifact) => artifact,
        Err(crate::chunks::ChunkError::NotFound { .. }) => {
            return Err(not_found("artifact", &digest, &peer.outpost));
        }
        Err(e) => {
            return Err(e.to_api(&format!(
                "artifact {digest} cannot be served (this hub reads {INDEX_FORMAT})"
            )));
        }
    };
    let size = artifact.size;
    let rx = state.chunks().content(digest, artifact);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let body = match state.links().profiles.pacer(&peer.outpost) {
        Some(pacer) => {
            axum::body::Body::from_stream(futures_util::StreamExt::then(stream, move |item| {
                let pacer = pacer.clone();
                async move {
                    if let Ok(bytes) = &item {
                        pacer.take(bytes.len()).await;
                    }
                    item
                }
            }))
        }
        None => axum::body::Body::from_stream(stream),
    };
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    Ok(response)
}

/// The answer to an artifact request while the outpost's delivery window
/// is closed: 503 `delivery-window-closed`, with when it opens (also as
/// `Retry-After`). `None` while open.
fn window_closed(state: &AppState, outpost: &str) -> Option<Response> {
    let trellis_model::link_profile::WindowState::Closed { opens_at, opens } =
        state.links().profiles.window(outpost)
    else {
        return None;
    };
    let mut response = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "delivery-window-closed",
        format!("outpost {outpost:?} is outside its delivery window; artifacts move when it opens ({opens})"),
        format!("waiting for delivery window (opens {opens}); an administrator can change the windows with `trellis update outpost {outpost} --windows …`"),
    )
    .into_response();
    let wait = (opens_at - state.links().profiles.now())
        .num_seconds()
        .max(1);
    if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Some(response)
}

/// A single byte range (`bytes=A-B`, `bytes=A-`, `bytes=-N`) of a file of
/// `len` bytes, as inclusive bounds. `Ok(None)`: serve the whole file (no
/// range, or one this endpoint does not do, such as several ranges).
/// `Err(())`: the range lies outside the file.
fn byte_range(header: Option<&HeaderValue>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        let Ok(suffix) = end.parse::<u64>() else {
            return Ok(None);
        };
        if suffix == 0 || len == 0 {
            return Err(());
        }
        (len.saturating_sub(suffix), len - 1)
    } else {
        let Ok(start) = start.parse::<u64>() else {
            return Ok(None);
        };
        let end = match end {
            "" => len.saturating_sub(1),
            e => match e.parse::<u64>() {
                Ok(e) => e.min(len.saturating_sub(1)),
                Err(_) => return Ok(None),
            },
        };
        if start >= len || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
        byte_range(Some(&HeaderValue::from_str(v).unwrap()), len)
    }

    #[test]
    fn reads_byte_ranges() {
        assert_eq!(byte_range(None, 10), Ok(None));
        assert_eq!(range("bytes=0-", 10), Ok(Some((0, 9))));
        assert_eq!(range("bytes=4-", 10), Ok(Some((4, 9))));
        assert_eq!(range("bytes=2-5", 10), Ok(Some((2, 5))));
        assert_eq!(range("bytes=2-50", 10), Ok(Some((2, 9))));
        assert_eq!(range("bytes=-3", 10), Ok(Some((7, 9))));
        assert_eq!(range("bytes=-30", 10), Ok(Some((0, 9))));
        assert_eq!(range("bytes=10-", 10), Err(()));
        assert_eq!(range("bytes=5-2", 10), Err(()));
        assert_eq!(range("bytes=0-1,3-4", 10), Ok(None));
        assert_eq!(range("items=0-1", 10), Ok(None));
        assert_eq!(range("bytes=x-", 10), Ok(None));
    }
}
