//! Making a backup: volumes → chunks → only what the hub lacks → manifest.
//! Runs on a blocking thread; the hub is called through the runtime handle.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::runtime::Handle;
use trellis_cas::{
    BACKUP_CHUNKS, BACKUP_FORMAT, BackupEntry, BackupManifest, BackupVolume, Digest, EntryKind,
};
use trellis_link::protocol::BackupOp;

use super::{Backups, JobRef, JobReport};

/// Chunks gathered before the hub is asked which it lacks.
const BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Uploads in flight at once.
const PARALLEL_UPLOADS: usize = 4;
/// How often the hub hears how far a backup has come.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

struct Uploader<'a> {
    backups: &'a Backups,
    handle: &'a Handle,
    job: &'a JobRef,
    batch: Vec<(Digest, Vec<u8>)>,
    batch_bytes: usize,
    /// Chunks this job has settled (on the hub, or uploaded).
    settled: HashSet<Digest>,
    read: u64,
    last_report: Instant,
}

impl Uploader<'_> {
    fn add(&mut self, digest: Digest, data: Vec<u8>) -> Result<(), String> {
        self.read += data.len() as u64;
        if self.settled.contains(&digest) || self.batch.iter().any(|(d, _)| *d == digest) {
            return Ok(());
        }
        self.batch_bytes += data.len();
        self.batch.push((digest, data));
        if self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Asks which of the batch the hub lacks, compresses and uploads those.
    fn flush(&mut self) -> Result<(), String> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
        let missing: HashSet<Digest> = self
            .handle
            .block_on(self.backups.hub.missing(self.job, &digests))?
            .into_iter()
            .collect();
        let mut stored = Vec::new();
        for (digest, data) in batch {
            if missing.contains(&digest) {
                let compressed = trellis_cas::compress(&data)
                    .map_err(|e| format!("compressing a chunk failed: {e}"))?;
                stored.push((digest, Bytes::from(compressed)));
            }
            self.settled.insert(digest);
        }
        let hub = &self.backups.hub;
        let job = self.job;
        self.handle.block_on(async {
            let mut uploads = futures_util::stream::iter(stored)
                .map(|(digest, bytes)| async move { hub.put_chunk(job, &digest, bytes).await })
                .buffer_unordered(PARALLEL_UPLOADS);
            while let Some(result) = uploads.next().await {
                result?;
            }
            Ok::<(), String>(())
        })?;
        if self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            self.progress("")?;
        }
        Ok(())
    }

    fn progress(&self, message: &str) -> Result<(), String> {
        let report = JobReport {
            op: BackupOp::Backup,
            state: "running".into(),
            message: message.into(),
            size: self.read,
        };
        self.handle
            .block_on(self.backups.hub.report(self.job, &report))
    }
}

pub(super) fn run(
    backups: &Backups,
    handle: &Handle,
    job: &JobRef,
    volumes: Vec<(String, std::path::PathBuf)>,
) -> Result<(), String> {
    let mut up = Uploader {
        backups,
        handle,
        job,
        batch: Vec::new(),
        batch_bytes: 0,
        settled: HashSet::new(),
        read: 0,
        last_report: Instant::now(),
    };
    up.progress("reading the stage's volumes")?;
    let mut manifest = BackupManifest {
        format: BACKUP_FORMAT.into(),
        volumes: Vec::new(),
    };
    for (name, root) in volumes {
        let mut entries = Vec::new();
        walk(&root, &root, &mut entries, &mut up)
            .map_err(|e| format!("backing up volume {name}: {e}"))?;
        manifest.volumes.push(BackupVolume { name, entries });
    }
    up.flush()?;
    tracing::info!(%job, volumes = manifest.volumes.len(), bytes = up.read, "backup read; sending its manifest");
    handle.block_on(backups.hub.complete(job, Bytes::from(manifest.to_bytes())))
}

/// Adds `dir`'s entries (sorted, parents before children) below `root`.
fn walk(
    root: &Path,
    dir: &Path,
    entries: &mut Vec<BackupEntry>,
    up: &mut Uploader<'_>,
) -> Result<(), String> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    children.sort();
    for path in children {
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| format!("cannot look at {}: {e}", path.display()))?;
        let Ok(relative) = path.strip_prefix(root) else {
            continue;
        };
        let Some(relative) = relative.to_str().map(str::to_owned) else {
            tracing::warn!(path = %path.display(), "skipping a file whose name is not UTF-8");
            continue;
        };
        let mut entry = BackupEntry {
            path: relative,
            kind: EntryKind::File,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: 0,
            chunks: Vec::new(),
            target: None,
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            entry.kind = EntryKind::Dir;
            entries.push(entry);
            walk(root, &path, entries, up)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&path)
                .map_err(|e| format!("cannot read link {}: {e}", path.display()))?;
            entry.kind = EntryKind::Symlink;
            entry.target = Some(target.to_string_lossy().into_owned());
            entries.push(entry);
        } else if kind.is_file() {
            let file =
                File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let mut chunks = Vec::new();
            let size = trellis_cas::cut_chunks::<io::Error>(
                io::BufReader::with_capacity(1 << 20, file),
                BACKUP_CHUNKS,
                |digest, data| {
                    chunks.push(digest);
                    up.add(digest, data).map_err(io::Error::other)
                },
            )
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
            entry.size = size;
            entry.chunks = chunks;
            entries.push(entry);
        } else {
            // Sockets, FIFOs, device nodes: no content to keep.
            tracing::warn!(path = %path.display(), "skipping a special file in a volume");
        }
    }
    Ok(())
}
