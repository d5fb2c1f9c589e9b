//! Getting the bits of process components: packages (tar + zstd of a
//! `process:` directory, see [`trellis_cas::pack_dir`]) named by their
//! BLAKE3 digest (BRIEF §4–5).
//!
//! A [`PackageSource`] writes the package with a given digest to a file,
//! after checking that its bytes hash to that digest — a package that does
//! not verify never reaches the runtime. Two sources exist:
//!
//! - [`HubPackages`]: a remote outpost fetches
//!   `GET /api/v1/agent/packages/{digest}` from its hub over mutual TLS
//!   (the agent's client certificate; the hub's CA as the only trust root).
//!   Packages are kept in a local cache (`<data>/packages/<digest>`), so each
//!   is fetched once; an interrupted download continues where it stopped
//!   (`Range` into `<digest>.partial`).
//! - [`LocalPackages`]: the hub's embedded local outpost copies from the
//!   hub's own blob store.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use trellis_cas::{BlobStore, Digest};

use super::RuntimeError;
use crate::https::{self, HubUrl, NetError};
use crate::state::AgentState;

/// Where the hub serves packages to agents.
pub const PACKAGES_PATH: &str = "/api/v1/agent/packages";

/// Something that can put a package, verified, into a file.
#[async_trait]
pub trait PackageSource: Send + Sync {
    /// Writes the package `digest` (`size` bytes; 0 when unknown) to `dest`
    /// (replacing it), once its bytes are known to hash to `digest`.
    async fn fetch(&self, digest: &str, size: u64, dest: &Path) -> Result<(), RuntimeError>;
}

fn parse_digest(digest: &str) -> Result<Digest, RuntimeError> {
    digest.parse().map_err(|e| {
        RuntimeError::new(
            "package-digest-invalid",
            format!("the plan names package {digest:?}, which is not a digest: {e}"),
        )
    })
}

fn io_error(code: &'static str, doing: &str, path: &Path, e: io::Error) -> RuntimeError {
    let hint = match e.raw_os_error() {
        Some(28) => Some("the disk is full; free space on the outpost"),
        Some(122) => Some("the disk quota is exhausted; free space on the outpost"),
        _ => None,
    };
    let error = RuntimeError::new(code, format!("could not {doing} {}: {e}", path.display()));
    match hint {
        Some(hint) => error.with_hint(hint),
        None => error,
    }
}

/// What [`copy_verified`] found.
#[derive(Debug)]
enum CopyOutcome {
    Copied,
    /// The source does not hash to the digest (it was damaged on disk).
    Corrupt {
        actual: Digest,
    },
}

/// Copies `src` to `dest` (through a temporary file next to it, renamed
/// into place) while hashing it; `dest` appears only if the bytes hash to
/// `digest`. Blocking.
fn copy_verified(src: &Path, dest: &Path, digest: &Digest) -> Result<CopyOutcome, RuntimeError> {
    let mut input = File::open(src).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            RuntimeError::new(
                "package-not-found",
                format!("package {digest} is not stored at {}", src.display()),
            )
        } else {
            io_error("package-read-failed", "open", src, e)
        }
    })?;
    let temp = temp_name(dest);
    let result = (|| {
        let mut output = File::create(&temp)
            .map_err(|e| io_error("package-write-failed", "create", &temp, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error("package-read-failed", "read", src, e)),
            };
            hasher.update(&buf[..n]);
            output
                .write_all(&buf[..n])
                .map_err(|e| io_error("package-write-failed", "write", &temp, e))?;
        }
        let actual = Digest::from_bytes(*hasher.finalize().as_bytes());
        if actual != *digest {
            return Ok(CopyOutcome::Corrupt { actual });
        }
        output
            .sync_all()
            .map_err(|e| io_error("package-write-failed", "sync", &temp, e))?;
        fs::rename(&temp, dest).map_err(|e| io_error("package-write-failed", "rename", dest, e))?;
        Ok(CopyOutcome::Copied)
    })();
    if !matches!(result, Ok(CopyOutcome::Copied)) {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn temp_name(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".copying");
    dest.with_file_name(name)
}

/// Hashes a whole file. Blocking.
fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(&mut file)?;
    let len = file.metadata()?.len();
    Ok((Digest::from_bytes(*hasher.finalize().as_bytes()), len))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<T, RuntimeError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        RuntimeError::new(
            "agent-internal",
            format!("a package file operation failed to finish ({e})"),
        )
    })?
}

// === LocalPackages ===

/// Packages from the hub's own blob store, for the hub's embedded local
/// outpost: copied (and verified on the way) by digest.
#[derive(Debug, Clone)]
pub struct LocalPackages {
    blobs: BlobStore,
}

impl LocalPackages {
    /// `blobs` is the hub's artifact store (`AppState::blobs()`).
    pub fn new(blobs: BlobStore) -> Self {
        LocalPackages { blobs }
    }
}

#[async_trait]
impl PackageSource for LocalPackages {
    async fn fetch(&self, digest: &str, _size: u64, dest: &Path) -> Result<(), RuntimeError> {
        let digest = parse_digest(digest)?;
        let src = self.blobs.path(&digest);
        let dest = dest.to_path_buf();
        blocking(move || match copy_verified(&src, &dest, &digest)? {
            CopyOutcome::Copied => Ok(()),
            CopyOutcome::Corrupt { actual } => Err(RuntimeError::new(
                "package-corrupt",
                format!(
                    "the hub's copy of package {digest} is damaged: its content hashes to {actual}"
                ),
            )
            .with_hint("push the build again; the hub's disk may be failing")),
        })
        .await
    }
}

// === HubPackages ===

/// How long connecting (each step) and each read of a download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Packages fetched from the hub over mutual TLS, cached by digest. See
/// the module docs.
pub struct HubPackages {
    state: Arc<AgentState>,
    cache: PathBuf,
    timeout: Duration,
    /// One download per digest at a time.
    locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for HubPackages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubPackages")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Why one download attempt did not produce a complete file.
enum Attempt {
    /// The partial file is complete (as far as the hub is concerned).
    Done,
    /// Start over from byte 0 (the hub refused the range).
    Restart,
}

impl HubPackages {
    /// Fetches with the identity (hub URL, CA, client certificate) stored
    /// in `state`, read anew for every download so a renewed certificate is
    /// used; caches packages in `cache_dir` (the agent's
    /// `<data>/packages`).
    pub fn new(state: Arc<AgentState>, cache_dir: impl Into<PathBuf>) -> Self {
        HubPackages {
            state,
            cache: cache_dir.into(),
            timeout: FETCH_TIMEOUT,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Bounds connecting and each read of the body (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where a verified package is cached.
    pub fn cached_path(&self, digest: &Digest) -> PathBuf {
        self.cache.join(digest.as_hex())
    }

    /// Where a download in progress is kept (resumed from on the next try).
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.cache.join(format!("{}.partial", digest.as_hex()))
    }

    fn lock(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(*digest).or_default().clone()
    }

    /// Makes sure the verified package is in the cache.
    async fn ensure_cached(&self, digest: &Digest, size: u64) -> Result<PathBuf, RuntimeError> {
        let cached = self.cached_path(digest);
        if fs::symlink_metadata(&cached).is_ok_and(|m| m.is_file()) {
            return Ok(cached);
        }
        fs::create_dir_all(&self.cache)
            .map_err(|e| io_error("package-write-failed", "create", &self.cache, e))?;
        let partial = self.partial_path(digest);
        let mut restarted = false;
        loop {
            match self.download(digest, size, &partial).await? {
                Attempt::Restart if !restarted => {
                    restarted = true;
                    let _ = fs::remove_file(&partial);
                    continue;
                }
                Attempt::Restart => {
                    let _ = fs::remove_file(&partial);
                    return Err(RuntimeError::new(
                        "package-fetch-failed",
                        format!("the hub kept refusing the byte range of package {digest}"),
                    ));
                }
                Attempt::Done => {}
            }
            let path = partial.clone();
            let (actual, len) = blocking(move || {
                hash_file(&path).map_err(|e| io_error("package-read-failed", "read", &path, e))
            })
            .await?;
            if actual == *digest && (size == 0 || len == size) {
                fs::rename(&partial, &cached)
                    .map_err(|e| io_error("package-write-failed", "rename", &cached, e))?;
                return Ok(cached);
            }
            // A resumed download can join bytes of two different answers
            // (a hub restored from a backup, say): one fresh try.
            let _ = fs::remove_file(&partial);
            if !restarted {
                restarted = true;
                continue;
            }
            return Err(RuntimeError::new(
                "package-corrupt",
                format!(
                    "the package the hub sent for {digest} ({len} bytes) hashes to {actual}; it was discarded"
                ),
            )
            .with_hint("something between the outpost and the hub may alter downloads; the agent tries again with the next apply"));
        }
    }

    /// One `GET` into `partial`, continuing after its current length.
    async fn download(
        &self,
        digest: &Digest,
        size: u64,
        partial: &Path,
    ) -> Result<Attempt, RuntimeError> {
        let identity = crate::blocking(&self.state, |s| s.identity())
            .await
            .map_err(|e| RuntimeError::new("agent-state-failed", e.to_string()))?
            .ok_or_else(|| {
                RuntimeError::new(
                    "not-joined",
                    "this outpost has no identity, so it cannot fetch packages from the hub",
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
        let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if size > 0 && have >= size {
            return Ok(Attempt::Done);
        }

        let net = |e: NetError| {
            let error = RuntimeError::new(
                "package-fetch-failed",
                format!("could not fetch package {digest} from the hub: {e}"),
            );
            match e.hint() {
                Some(hint) => error.with_hint(hint),
                None => error,
            }
        };
        let tls = https::connect_tls(&hub, config, self.timeout)
            .await
            .map_err(net)?;
        let addr = hub.authority();
        let http = |reason: String| {
            net(NetError::Http {
                addr: addr.clone(),
                reason,
            })
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let mut request = hyper::Request::get(format!("{PACKAGES_PATH}/{digest}"))
                .header(hyper::header::HOST, hub.authority())
                .header(
                    hyper::header::USER_AGENT,
                    format!("trellis-agent/{}", crate::AGENT_VERSION),
                );
            if have > 0 {
                request = request.header(hyper::header::RANGE, format!("bytes={have}-"));
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| http(e.to_string()))?;
            let response = tokio::time::timeout(self.timeout, sender.send_request(request))
                .await
                .map_err(|_| {
                    net(NetError::Timeout {
                        addr: hub.authority(),
                        secs: self.timeout.as_secs(),
                        during: "waiting for the package",
                    })
                })?
                .map_err(|e| http(e.to_string()))?;
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
                        return Ok(Attempt::Restart);
                    }
                    true
                }
                416 => return Ok(Attempt::Restart),
                _ => {
                    let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    return Err(refusal(digest, status, &body));
                }
            };
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(partial)
                .await
                .map_err(|e| io_error("package-write-failed", "open", partial, e))?;
            let mut written = if append { have } else { 0 };
            let mut body = response.into_body();
            loop {
                let frame = tokio::time::timeout(self.timeout, body.frame())
                    .await
                    .map_err(|_| {
                        net(NetError::Timeout {
                            addr: hub.authority(),
                            secs: self.timeout.as_secs(),
                            during: "sending the package",
                        })
                    })?;
                let Some(frame) = frame else { break };
                let frame = frame.map_err(|e| http(format!("the download broke off: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    written += data.len() as u64;
                    if size > 0 && written > size {
                        return Err(RuntimeError::new(
                            "package-corrupt",
                            format!("the hub sent more than the {size} bytes of package {digest}"),
                        ));
                    }
                    file.write_all(&data)
                        .await
                        .map_err(|e| io_error("package-write-failed", "write", partial, e))?;
                }
            }
            file.sync_all()
                .await
                .map_err(|e| io_error("package-write-failed", "sync", partial, e))?;
            Ok(Attempt::Done)
        }
        .await;
        driver.abort();
        result
    }
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
        (404, _) => "package-not-found",
        (_, "revoked") => "revoked",
        (401 | 403, _) => "package-fetch-refused",
        _ => "package-fetch-failed",
    };
    let error = RuntimeError::new(
        stable,
        format!("the hub refused package {digest} (HTTP {status}): {message}"),
    );
    match hint {
        Some(hint) => error.with_hint(hint),
        None => error,
    }
}

#[async_trait]
impl PackageSource for HubPackages {
    async fn fetch(&self, digest: &str, size: u64, dest: &Path) -> Result<(), RuntimeError> {
        let digest = parse_digest(digest)?;
        let lock = self.lock(&digest);
        let _guard = lock.lock().await;
        // A cached copy damaged on disk is dropped and fetched again, once.
        for _ in 0..2 {
            let cached = self.ensure_cached(&digest, size).await?;
            let dest = dest.to_path_buf();
            let src = cached.clone();
            match blocking(move || copy_verified(&src, &dest, &digest)).await? {
                CopyOutcome::Copied => return Ok(()),
                CopyOutcome::Corrupt { actual } => {
                    tracing::warn!(%digest, %actual, path = %cached.display(),
                        "a cached package is damaged; fetching it again");
                    let _ = fs::remove_file(&cached);
                }
            }
        }
        Err(RuntimeError::new(
            "package-corrupt",
            format!("package {digest} was damaged on this host's disk twice in a row"),
        )
        .with_hint("check the outpost's disk"))
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

    #[test]
    fn copies_only_what_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, b"package bytes").unwrap();
        let dest = dir.path().join("dest");
        let good = Digest::of(b"package bytes");
        assert!(matches!(
            copy_verified(&src, &dest, &good).unwrap(),
            CopyOutcome::Copied
        ));
        assert_eq!(fs::read(&dest).unwrap(), b"package bytes");
        let other = dir.path().join("other");
        let bad = Digest::of(b"something else");
        assert!(matches!(
            copy_verified(&src, &other, &bad).unwrap(),
            CopyOutcome::Corrupt { .. }
        ));
        assert!(!other.exists());
        assert!(!temp_name(&other).exists());
        let missing = copy_verified(&dir.path().join("nope"), &other, &good).unwrap_err();
        assert_eq!(missing.code, "package-not-found");
    }
}
