//! Getting the bits of a release onto the outpost: image archives and
//! packages, stored on the hub as content-defined chunks named by their
//! BLAKE3 digest (BRIEF §5).
//!
//! An [`ArtifactSource`] makes every chunk of an artifact present in a
//! local [`ChunkStore`], verified; the runtimes then read the artifact back
//! from that store ([`ChunkStore::open_artifact`], which verifies every
//! chunk again as it is read). A chunk that does not verify is never used.
//!
//! - [`HubArtifacts`]: a remote outpost fetches the chunks it lacks from its
//!   hub, `GET /api/v1/agent/chunks/{digest}` over mutual TLS (the agent's
//!   client certificate; the hub's CA as the only trust root), a few at a
//!   time over kept-alive connections. Chunks already in the cache are not
//!   fetched again, and a chunk cut off halfway continues where it stopped
//!   (`Range` into `<digest>.partial`), so an interrupted delivery resumes
//!   without fetching complete chunks again. A chunk that fails
//!   verification is discarded and fetched once more; if it fails again
//!   the delivery fails, naming it.
//! - [`LocalArtifacts`]: the hub's embedded local outpost reads the hub's
//!   own store.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use trellis_cas::{ArtifactIndex, CasError, ChunkRef, ChunkStore, Digest};

use super::RuntimeError;
use crate::https::{self, HubUrl, NetError};
use crate::state::AgentState;

/// Where the hub serves chunks to agents.
pub const CHUNKS_PATH: &str = "/api/v1/agent/chunks";

/// Chunks fetched at the same time, each over its own connection.
pub const PARALLEL_FETCHES: usize = 6;

/// Told how many content bytes of an artifact have arrived so far.
pub type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

/// Something that can make an artifact's chunks present in a store.
#[async_trait]
pub trait ArtifactSource: Send + Sync {
    /// Makes every chunk of artifact `index` (the digest of its index)
    /// present and verified in [`ArtifactSource::store`], calling
    /// `progress` with the content bytes present so far (of
    /// `ArtifactIndex::size`). Returns the artifact's index.
    async fn fetch(
        &self,
        index: &str,
        progress: Progress<'_>,
    ) -> Result<ArtifactIndex, RuntimeError>;

    /// The store fetched artifacts are read from.
    fn store(&self) -> &ChunkStore;

    /// Whether the store is this agent's own cache, which it may collect.
    /// The hub's store, read by the hub's local outpost, is not.
    fn is_cache(&self) -> bool;
}

pub(crate) fn parse_digest(digest: &str) -> Result<Digest, RuntimeError> {
    digest.parse().map_err(|e| {
        RuntimeError::new(
            "artifact-digest-invalid",
            format!("the plan names artifact {digest:?}, which is not a digest: {e}"),
        )
    })
}

pub(crate) fn io_error(code: &'static str, doing: &str, path: &Path, e: io::Error) -> RuntimeError {
    let error = RuntimeError::new(code, format!("could not {doing} {}: {e}", path.display()));
    match disk_full_hint(&e) {
        Some(hint) => error.with_hint(hint),
        None => error,
    }
}

fn disk_full_hint(e: &io::Error) -> Option<&'static str> {
    trellis_cas::is_disk_full(e)
        .then_some("the disk (or its quota) is full; free space on the outpost")
}

/// A store error met while delivering, as a runtime error.
pub(crate) fn cas_error(e: CasError) -> RuntimeError {
    let (code, hint) = match &e {
        CasError::Corrupt { .. }
        | CasError::ChunkDamaged { .. }
        | CasError::ChunkUnreadable { .. }
        | CasError::DigestMismatch { .. }
        | CasError::ArtifactMismatch { .. } => (
            "artifact-corrupt",
            Some("the chunk was discarded; the next apply fetches it again"),
        ),
        CasError::NotFound { .. } => ("artifact-not-found", None),
        CasError::InvalidIndex { .. } => ("artifact-invalid", None),
        CasError::Io { source, .. } => ("artifact-write-failed", disk_full_hint(source)),
        _ => ("artifact-failed", None),
    };
    let error = RuntimeError::new(code, e.to_string());
    match hint {
        Some(hint) => error.with_hint(hint),
        None => error,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<T, RuntimeError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        RuntimeError::new(
            "agent-internal",
            format!("an artifact file operation failed to finish ({e})"),
        )
    })?
}

/// Reads and parses an index that is in `store`.
async fn read_index(store: &ChunkStore, index: Digest) -> Result<ArtifactIndex, RuntimeError> {
    let store = store.clone();
    blocking(move || store.artifact(&index).map_err(cas_error)).await
}

/// Reads an artifact's content (verified as it is read) on a blocking
/// thread, in pieces of up to 1 MiB, into a channel that holds four: a slow
/// consumer keeps only a few pieces in memory. A read error is the stream's
/// last item, and what the handle returns; a consumer that goes away stops
/// the reading.
pub fn stream_artifact(
    reader: trellis_cas::ArtifactReader,
) -> (
    tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reading = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut reader = reader;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    let _ = tx.blocking_send(Err(e));
                    return Err(message);
                }
            }
        }
    });
    (rx, reading)
}

// === LocalArtifacts ===

/// Artifacts in the hub's own store, for the hub's embedded local outpost:
/// nothing to fetch, only to check.
#[derive(Debug, Clone)]
pub struct LocalArtifacts {
    store: ChunkStore,
}

impl LocalArtifacts {
    /// `store` is the hub's artifact store.
    pub fn new(store: ChunkStore) -> Self {
        LocalArtifacts { store }
    }
}

#[async_trait]
impl ArtifactSource for LocalArtifacts {
    async fn fetch(
        &self,
        index: &str,
        progress: Progress<'_>,
    ) -> Result<ArtifactIndex, RuntimeError> {
        let digest = parse_digest(index)?;
        let artifact = read_index(&self.store, digest).await?;
        let missing = self.store.missing(&artifact);
        if let Some(first) = missing.first() {
            return Err(RuntimeError::new(
                "artifact-not-found",
                format!(
                    "{} chunks of artifact {digest} are missing from the hub's store (the first is {})",
                    missing.len(),
                    first.digest
                ),
            )
            .with_hint("push the build again"));
        }
        progress(artifact.size);
        Ok(artifact)
    }

    fn store(&self) -> &ChunkStore {
        &self.store
    }

    fn is_cache(&self) -> bool {
        false
    }
}

// === HubArtifacts ===

/// How long connecting (each step) and each read of a download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Artifacts fetched from the hub over mutual TLS into a local cache. See
/// the module docs.
pub struct HubArtifacts {
    state: Arc<AgentState>,
    store: ChunkStore,
    timeout: Duration,
    parallel: usize,
    /// One delivery per artifact at a time.
    locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for HubArtifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubArtifacts")
            .field("store", &self.store.root())
            .finish_non_exhaustive()
    }
}

impl HubArtifacts {
    /// Fetches with the identity (hub URL, CA, client certificate) stored
    /// in `state`, read anew for every delivery so a renewed certificate is
    /// used, into `store` (the agent's `<data>/chunks`).
    pub fn new(state: Arc<AgentState>, store: ChunkStore) -> Self {
        HubArtifacts {
            state,
            store,
            timeout: FETCH_TIMEOUT,
            parallel: PARALLEL_FETCHES,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Bounds connecting and each read of a body (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where a chunk cut off halfway is kept until it is resumed.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.store
            .tmp_dir()
            .join(format!("{}.partial", digest.as_hex()))
    }

    fn lock(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(*digest).or_default().clone()
    }

    async fn connector(&self) -> Result<Connector, RuntimeError> {
        let identity = crate::blocking(&self.state, |s| s.identity())
            .await
            .map_err(|e| RuntimeError::new("agent-state-failed", e.to_string()))?
            .ok_or_else(|| {
                RuntimeError::new(
                    "not-joined",
                    "this outpost has no identity, so it cannot fetch artifacts from the hub",
                )
                .with_hint("join the outpost with `trellis agent join`")
            })?;
        let hub = HubUrl::parse(&identity.hub_url)
            .map_err(|e| RuntimeError::new("agent-config-invalid", e))?;
        let config = trellis_link::identity::client_config(
            &identity.ca_cert_pem,
            Some((&identity.cert_pem, &identity.key_pem)),
        )
        .map_err(|e| {
            RuntimeError::new(
                e.code(),
                format!("could not prepare the TLS connection to the hub: {e}"),
            )
        })?;
        Ok(Connector {
            hub,
            config,
            timeout: self.timeout,
        })
    }

    /// Fetches the chunks in `queue` with up to `self.parallel` workers.
    async fn fetch_all(
        &self,
        connector: Arc<Connector>,
        queue: Vec<ChunkRef>,
        done: Arc<AtomicU64>,
        progress: Progress<'_>,
    ) -> Result<(), RuntimeError> {
        let workers = self.parallel.min(queue.len()).max(1);
        let queue = Arc::new(Mutex::new(VecDeque::from(queue)));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let queue = queue.clone();
            let connector = connector.clone();
            let store = self.store.clone();
            let tx = tx.clone();
            tasks.spawn(async move {
                let mut conn: Option<SendRequest<Empty<Bytes>>> = None;
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some(chunk) = next else { return Ok(()) };
                    fetch_chunk(&connector, &store, &mut conn, &chunk).await?;
                    let _ = tx.send(chunk.size);
                }
            });
        }
        drop(tx);
        let mut result = Ok(());
        loop {
            tokio::select! {
                Some(bytes) = rx.recv() => {
                    progress(done.fetch_add(bytes, Ordering::Relaxed) + bytes);
                }
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        // The first failure ends the delivery; chunks
                        // already complete stay in the cache.
                        result = Err(e);
                        tasks.abort_all();
                    }
                    Some(Err(e)) if e.is_cancelled() => {}
                    Some(Err(e)) => {
                        result = Err(RuntimeError::new(
                            "agent-internal",
                            format!("a chunk download stopped: {e}"),
                        ));
                        tasks.abort_all();
                    }
                },
            }
        }
        while let Ok(bytes) = rx.try_recv() {
            progress(done.fetch_add(bytes, Ordering::Relaxed) + bytes);
        }
        result
    }
}

#[async_trait]
impl ArtifactSource for HubArtifacts {
    async fn fetch(
        &self,
        index: &str,
        progress: Progress<'_>,
    ) -> Result<ArtifactIndex, RuntimeError> {
        let digest = parse_digest(index)?;
        let lock = self.lock(&digest);
        let _guard = lock.lock().await;
        let connector = Arc::new(self.connector().await?);
        if !self.store.contains(&digest) {
            let mut conn = None;
            let chunk = ChunkRef { digest, size: 0 };
            fetch_chunk(&connector, &self.store, &mut conn, &chunk).await?;
        }
        let artifact = match read_index(&self.store, digest).await {
            Ok(artifact) => artifact,
            Err(e) if e.code == "artifact-corrupt" => {
                // Damaged in the cache: drop it and fetch it once more.
                let _ = self.store.remove(&digest);
                let mut conn = None;
                let chunk = ChunkRef { digest, size: 0 };
                fetch_chunk(&connector, &self.store, &mut conn, &chunk).await?;
                read_index(&self.store, digest).await?
            }
            Err(e) => return Err(e),
        };
        let store = self.store.clone();
        let wanted = artifact.clone();
        let missing = blocking(move || Ok(store.missing(&wanted))).await?;
        let missing_bytes: u64 = missing.iter().map(|c| c.size).sum();
        // Chunks already here count as delivered (they may appear more than
        // once in the artifact, hence the saturation).
        let done = Arc::new(AtomicU64::new(artifact.size.saturating_sub(missing_bytes)));
        progress(done.load(Ordering::Relaxed));
        if !missing.is_empty() {
            tracing::info!(artifact = %digest, chunks = missing.len(), bytes = missing_bytes,
                "fetching the chunks this outpost lacks");
            self.fetch_all(connector, missing, done, progress).await?;
        }
        Ok(artifact)
    }

    fn store(&self) -> &ChunkStore {
        &self.store
    }

    fn is_cache(&self) -> bool {
        true
    }
}

/// How to open a connection to the hub.
struct Connector {
    hub: HubUrl,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
    timeout: Duration,
}

impl Connector {
    fn net(&self, digest: &Digest, e: NetError) -> RuntimeError {
        let error = RuntimeError::new(
            "artifact-fetch-failed",
            format!("could not fetch chunk {digest} from the hub: {e}"),
        );
        match e.hint() {
            Some(hint) => error.with_hint(hint),
            None => error,
        }
    }

    fn http(&self, digest: &Digest, reason: String) -> RuntimeError {
        self.net(
            digest,
            NetError::Http {
                addr: self.hub.authority(),
                reason,
            },
        )
    }

    async fn open(&self, digest: &Digest) -> Result<SendRequest<Empty<Bytes>>, RuntimeError> {
        let tls = https::connect_tls(&self.hub, self.config.clone(), self.timeout)
            .await
            .map_err(|e| self.net(digest, e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.http(digest, e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

/// Why one download attempt did not produce a complete file.
enum Attempt {
    /// The chunk's stored form, complete as far as the hub is concerned
    /// (not verified yet).
    Done(Vec<u8>),
    /// Start over from byte 0 (the hub refused the range).
    Restart,
}

/// Fetches one chunk into `store`: resumes its partial file, verifies it,
/// and retries once from scratch if it does not verify. `conn` is reused
/// across chunks and replaced when it breaks.
async fn fetch_chunk(
    connector: &Connector,
    store: &ChunkStore,
    conn: &mut Option<SendRequest<Empty<Bytes>>>,
    chunk: &ChunkRef,
) -> Result<(), RuntimeError> {
    let digest = chunk.digest;
    let partial = store.tmp_dir().join(format!("{}.partial", digest.as_hex()));
    let mut fresh_tries = 0;
    let mut broken_connections = 0;
    loop {
        let attempt = match download(connector, conn, &digest, &partial).await {
            Ok(attempt) => attempt,
            Err(e) if e.code == "artifact-fetch-failed" && broken_connections < 2 => {
                // A kept-alive connection may have been closed by the hub
                // between two chunks: reconnect and continue the chunk.
                *conn = None;
                broken_connections += 1;
                continue;
            }
            Err(e) => {
                *conn = None;
                return Err(e);
            }
        };
        let stored = match attempt {
            Attempt::Done(stored) => stored,
            Attempt::Restart => {
                let _ = fs::remove_file(&partial);
                fresh_tries += 1;
                if fresh_tries > 1 {
                    return Err(RuntimeError::new(
                        "artifact-fetch-failed",
                        format!("the hub kept refusing the byte range of chunk {digest}"),
                    ));
                }
                continue;
            }
        };
        let (s, file) = (store.clone(), partial.clone());
        // The partial file holds exactly `stored`: verified, it becomes the
        // chunk; not verified, it is removed.
        let kept =
            blocking(move || s.adopt_written(&digest, &file, &stored).map_err(cas_error)).await;
        match kept {
            Ok(_) => return Ok(()),
            Err(e) if e.code == "artifact-corrupt" && fresh_tries == 0 => {
                // A resumed download can join bytes of two different answers
                // (a hub restored from a backup, say), or the bytes were
                // altered on the way: one fresh try.
                tracing::warn!(chunk = %digest, error = %e.message, "a fetched chunk did not verify; fetching it again");
                fresh_tries += 1;
                continue;
            }
            Err(e) => {
                return Err(RuntimeError::new(
                    "artifact-corrupt",
                    format!(
                        "the hub sent chunk {digest} twice in a form that does not verify ({}); it was discarded and nothing was applied",
                        e.message
                    ),
                )
                .with_hint("the hub's copy may be damaged (push the build again), or something between the outpost and the hub alters downloads"));
            }
        }
    }
}

/// One `GET` of a chunk into `partial`, continuing after its current
/// length.
async fn download(
    connector: &Connector,
    conn: &mut Option<SendRequest<Empty<Bytes>>>,
    digest: &Digest,
    partial: &Path,
) -> Result<Attempt, RuntimeError> {
    let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let sender = match conn {
        Some(sender) if !sender.is_closed() => sender,
        _ => conn.insert(connector.open(digest).await?),
    };
    sender
        .ready()
        .await
        .map_err(|e| connector.http(digest, e.to_string()))?;
    let mut request = hyper::Request::get(format!("{CHUNKS_PATH}/{digest}"))
        .header(hyper::header::HOST, connector.hub.authority())
        .header(
            hyper::header::USER_AGENT,
            format!("trellis-agent/{}", crate::update::version()),
        );
    if have > 0 {
        request = request.header(hyper::header::RANGE, format!("bytes={have}-"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| connector.http(digest, e.to_string()))?;
    let timeout = connector.timeout;
    let response = tokio::time::timeout(timeout, sender.send_request(request))
        .await
        .map_err(|_| {
            connector.net(
                digest,
                NetError::Timeout {
                    addr: connector.hub.authority(),
                    secs: timeout.as_secs(),
                    during: "waiting for a chunk",
                },
            )
        })?
        .map_err(|e| connector.http(digest, e.to_string()))?;
    let status = response.status().as_u16();
    let append = match status {
        200 => false,
        206 => {
            let start = response
                .headers()
                .get(hyper::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_start);
            if start != Some(have) {
                drain(response.into_body()).await;
                return Ok(Attempt::Restart);
            }
            true
        }
        416 => {
            drain(response.into_body()).await;
            return Ok(Attempt::Restart);
        }
        _ => {
            let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(refusal(digest, status, &body));
        }
    };
    // The chunk is kept in memory (chunks are small) and also appended to
    // the partial file as it arrives, so a delivery cut off — even by a
    // SIGKILL — resumes after the last byte written. The file writes go to
    // the page cache in microseconds; they are not worth a thread hop each.
    let announced = response
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(2 << 20);
    let mut stored = if append {
        fs::read(partial).map_err(|e| io_error("artifact-write-failed", "read", partial, e))?
    } else {
        Vec::new()
    };
    stored.reserve(announced);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(partial)
        .map_err(|e| io_error("artifact-write-failed", "open", partial, e))?;
    let limit = (trellis_cas::MAX_CHUNK_BYTES + 64 * 1024) as usize;
    let mut body = response.into_body();
    loop {
        let frame = tokio::time::timeout(timeout, body.frame())
            .await
            .map_err(|_| {
                connector.net(
                    digest,
                    NetError::Timeout {
                        addr: connector.hub.authority(),
                        secs: timeout.as_secs(),
                        during: "sending a chunk",
                    },
                )
            })?;
        let Some(frame) = frame else { break };
        let frame =
            frame.map_err(|e| connector.http(digest, format!("the download broke off: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if stored.len() + data.len() > limit {
                let _ = fs::remove_file(partial);
                return Err(RuntimeError::new(
                    "artifact-corrupt",
                    format!("the hub sent more than {limit} bytes for chunk {digest}"),
                ));
            }
            std::io::Write::write_all(&mut file, &data)
                .map_err(|e| io_error("artifact-write-failed", "write", partial, e))?;
            stored.extend_from_slice(&data);
        }
    }
    Ok(Attempt::Done(stored))
}

async fn drain(body: hyper::body::Incoming) {
    let _ = http_body_util::Limited::new(body, 64 * 1024)
        .collect()
        .await;
}

/// The first byte of `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes ")?;
    let (start, _) = range.split_once('-')?;
    start.trim().parse().ok()
}

fn refusal(digest: &Digest, status: u16, body: &[u8]) -> RuntimeError {
    let (code, message, hint) = match https::api_error(body) {
        Some(e) => (e.code, e.message, e.hint),
        None => (
            String::new(),
            format!("HTTP {status}"),
            Some("check that the hub is a Trellis hub of a compatible version".to_owned()),
        ),
    };
    let stable: &'static str = match (status, code.as_str()) {
        (404, _) => "artifact-not-found",
        (_, "revoked") => "revoked",
        // The hub read it from its object store and it did not verify: no
        // retry will bring a good copy.
        (_, "chunk-damaged-on-hub") => "artifact-corrupt",
        // Outside the outpost's delivery window: wait, do not fail.
        (503, "delivery-window-closed") => "delivery-window-closed",
        (401 | 403, _) => "artifact-fetch-refused",
        _ => "artifact-fetch-failed",
    };
    let error = RuntimeError::new(
        stable,
        format!("the hub refused chunk {digest} (HTTP {status}): {message}"),
    );
    match hint {
        Some(hint) => error.with_hint(hint),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_content_range() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[tokio::test]
    async fn local_artifacts_need_every_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), trellis_cas::Durability::Cache).unwrap();
        let content: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let put = store
            .put_artifact(trellis_cas::ArtifactKind::Package, &content[..])
            .unwrap();
        let local = LocalArtifacts::new(store.clone());
        let seen = AtomicU64::new(0);
        let index = local
            .fetch(&put.index_digest.as_hex(), &|n| {
                seen.store(n, Ordering::Relaxed)
            })
            .await
            .unwrap();
        assert_eq!(index, put.index);
        assert_eq!(seen.load(Ordering::Relaxed), content.len() as u64);
        store.remove(&put.index.chunks[0].digest).unwrap();
        let err = local
            .fetch(&put.index_digest.as_hex(), &|_| {})
            .await
            .unwrap_err();
        assert_eq!(err.code, "artifact-not-found");
    }
}
