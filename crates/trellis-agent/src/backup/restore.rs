//! Restoring a backup: fetch and verify everything into staging
//! directories, then swap them in under a journal (see the module docs of
//! `backup`). Runs on a blocking thread.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use trellis_cas::{BackupManifest, Digest, EntryKind};
use trellis_link::protocol::BackupOp;
use trellis_model::{NameKind, validate_name};

use super::{Backups, JobRef, JobReport, SWAP_DELAY_ENV};

/// Chunks fetched at once.
const PARALLEL_FETCHES: usize = 8;

/// What a journal holds: per volume, the three directories of its swap.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    backup: u64,
    volumes: Vec<Swap>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Swap {
    /// The volume's directory.
    live: PathBuf,
    /// The restored content, complete and verified.
    staging: PathBuf,
    /// Where the live directory goes until the swap is done.
    old: PathBuf,
}

fn journal_path(journals: &Path, id: u64) -> PathBuf {
    journals.join(format!("restore-{id}.json"))
}

pub(super) fn run(
    backups: &Backups,
    handle: &Handle,
    job: &JobRef,
    volumes: Vec<(String, PathBuf)>,
) -> Result<(), String> {
    let report = JobReport {
        op: BackupOp::Restore,
        state: "running".into(),
        message: "fetching and verifying the backup".into(),
        size: 0,
    };
    handle.block_on(backups.hub.report(job, &report))?;
    let bytes = handle
        .block_on(backups.hub.manifest(job))
        .map_err(|e| format!("restore of {job} failed before anything was replaced: {e}"))?;
    let manifest = BackupManifest::parse(&bytes)
        .map_err(|e| format!("restore of {job} failed before anything was replaced: {e}"))?;
    let mut swaps = Vec::new();
    for volume in &manifest.volumes {
        let Some((component, storage)) = volume.name.split_once('/') else {
            return Err(format!(
                "{job}: volume name {:?} is not component/storage",
                volume.name
            ));
        };
        validate_name(NameKind::Component, component)
            .and_then(|()| validate_name(NameKind::Storage, storage))
            .map_err(|e| format!("{job}: volume {:?}: {e}", volume.name))?;
        let Some((_, live)) = volumes.iter().find(|(name, _)| *name == volume.name) else {
            return Err(format!(
                "restore of {job} failed before anything was replaced: the stage has no volume {} now (its component or storage is not in the release the outpost runs)",
                volume.name
            ));
        };
        let (Some(parent), Some(base)) = (live.parent(), live.file_name()) else {
            return Err(format!(
                "{job}: volume {} has no parent directory",
                volume.name
            ));
        };
        let base = base.to_string_lossy();
        swaps.push(Swap {
            live: live.clone(),
            staging: parent.join(format!(".restore-{}-{base}", job.id)),
            old: parent.join(format!(".old-{}-{base}", job.id)),
        });
    }
    // Stage everything; on any failure remove what was staged.
    let staged = stage_all(backups, handle, job, &manifest, &swaps);
    if let Err(e) = staged {
        for swap in &swaps {
            let _ = fs::remove_dir_all(&swap.staging);
        }
        return Err(format!(
            "restore of {job} failed and nothing was replaced: {e}"
        ));
    }
    // The point of no return: once the journal is durable, the swap is
    // finished even if the agent dies now (see `recover`).
    fs::create_dir_all(&backups.journals)
        .map_err(|e| format!("cannot create {}: {e}", backups.journals.display()))?;
    let journal = Journal {
        backup: job.id,
        volumes: swaps,
    };
    let path = journal_path(&backups.journals, job.id);
    write_synced(&path, &serde_json::to_vec(&journal).unwrap_or_default()).map_err(|e| {
        format!(
            "restore of {job}: cannot write its journal {}: {e}",
            path.display()
        )
    })?;
    tracing::info!(%job, volumes = journal.volumes.len(), "restore: every chunk verified; swapping the volumes in");
    let delay = std::env::var(SWAP_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    finish(&journal, delay).map_err(|e| format!("restore of {job}: {e}"))?;
    let _ = fs::remove_file(&path);
    let _ = sync_dir(&backups.journals);
    remove_olds(&journal);
    Ok(())
}

fn stage_all(
    backups: &Backups,
    handle: &Handle,
    job: &JobRef,
    manifest: &BackupManifest,
    swaps: &[Swap],
) -> Result<(), String> {
    for (volume, swap) in manifest.volumes.iter().zip(swaps) {
        for dir in [&swap.staging, &swap.old] {
            match fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot clear {}: {e}", dir.display())),
            }
        }
        let parent = swap.staging.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        fs::create_dir(&swap.staging)
            .map_err(|e| format!("cannot create {}: {e}", swap.staging.display()))?;
        // The volume's own directory keeps the owner and mode the runtime
        // gave it.
        if let Ok(meta) = fs::metadata(&swap.live) {
            let _ = fs::set_permissions(
                &swap.staging,
                fs::Permissions::from_mode(meta.mode() & 0o7777),
            );
            if is_root() {
                let _ =
                    std::os::unix::fs::lchown(&swap.staging, Some(meta.uid()), Some(meta.gid()));
            }
        }
        let mut dirs = Vec::new();
        for entry in &volume.entries {
            let path = swap.staging.join(&entry.path);
            let at = || format!("{} in volume {}", entry.path, volume.name);
            match entry.kind {
                EntryKind::Dir => {
                    fs::create_dir_all(&path)
                        .map_err(|e| format!("cannot create {}: {e}", at()))?;
                    dirs.push((path, entry));
                    continue;
                }
                EntryKind::Symlink => {
                    let target = entry.target.as_deref().unwrap_or_default();
                    std::os::unix::fs::symlink(target, &path)
                        .map_err(|e| format!("cannot create link {}: {e}", at()))?;
                }
                EntryKind::File => {
                    let mut file =
                        File::create(&path).map_err(|e| format!("cannot create {}: {e}", at()))?;
                    let written = fetch_into(backups, handle, job, &entry.chunks, &mut file)
                        .map_err(|e| format!("{e} (file {})", at()))?;
                    if written != entry.size {
                        return Err(format!(
                            "{}: its chunks hold {written} bytes, the manifest says {}",
                            at(),
                            entry.size
                        ));
                    }
                    file.sync_all()
                        .map_err(|e| format!("cannot write {}: {e}", at()))?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(entry.mode))
                        .map_err(|e| format!("cannot set the mode of {}: {e}", at()))?;
                }
            }
            if is_root() {
                std::os::unix::fs::lchown(&path, Some(entry.uid), Some(entry.gid))
                    .map_err(|e| format!("cannot set the owner of {}: {e}", at()))?;
            }
        }
        // Directories last, deepest first: a read-only one would refuse
        // its children.
        for (path, entry) in dirs.iter().rev() {
            fs::set_permissions(path, fs::Permissions::from_mode(entry.mode))
                .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
            if is_root() {
                let _ = std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid));
            }
        }
        sync_dir(&swap.staging)
            .map_err(|e| format!("cannot sync {}: {e}", swap.staging.display()))?;
    }
    Ok(())
}

/// Fetches `chunks` (several at once), verifies each, and writes them in
/// order; returns the bytes written.
fn fetch_into(
    backups: &Backups,
    handle: &Handle,
    job: &JobRef,
    chunks: &[Digest],
    file: &mut File,
) -> Result<u64, String> {
    let hub = &backups.hub;
    handle.block_on(async {
        let mut fetched = futures_util::stream::iter(chunks.iter().copied())
            .map(|digest| async move {
                let stored = hub
                    .chunk(job, &digest)
                    .await
                    .map_err(|e| format!("chunk {digest}: {e}"))?;
                let data = trellis_cas::decompress(&stored)
                    .map_err(|e| format!("chunk {digest} from the hub is damaged: {e}"))?;
                let actual = Digest::of(&data);
                if actual != digest {
                    return Err(format!(
                        "chunk {digest} from the hub is damaged: its content hashes to {actual}"
                    ));
                }
                Ok::<_, String>(data)
            })
            .buffered(PARALLEL_FETCHES);
        let mut written = 0u64;
        while let Some(data) = fetched.next().await {
            let data = data?;
            file.write_all(&data)
                .map_err(|e| format!("cannot write the restored content: {e}"))?;
            written += data.len() as u64;
        }
        Ok(written)
    })
}

/// Does the swaps a journal lists; safe to run again after a crash at any
/// point (each step checks what is already done).
fn finish(journal: &Journal, delay: Option<Duration>) -> Result<(), String> {
    for swap in &journal.volumes {
        if !swap.staging.exists() {
            continue; // swapped already
        }
        if swap.live.exists() {
            if swap.old.exists() {
                fs::remove_dir_all(&swap.old)
                    .map_err(|e| format!("cannot remove {}: {e}", swap.old.display()))?;
            }
            fs::rename(&swap.live, &swap.old)
                .map_err(|e| format!("cannot move {} aside: {e}", swap.live.display()))?;
        }
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        fs::rename(&swap.staging, &swap.live).map_err(|e| {
            format!(
                "cannot move the restored volume into {}: {e}",
                swap.live.display()
            )
        })?;
        if let Some(parent) = swap.live.parent() {
            let _ = sync_dir(parent);
        }
    }
    Ok(())
}

fn remove_olds(journal: &Journal) {
    for swap in &journal.volumes {
        if let Err(e) = fs::remove_dir_all(&swap.old)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %swap.old.display(), error = %e, "could not remove a replaced volume");
        }
    }
}

/// Finishes journaled swaps, then removes staging and set-aside
/// directories no journal needs (a restore that stopped before its
/// journal replaced nothing).
pub(super) fn recover(journals: &Path, processes: &Path) {
    if let Ok(rd) = fs::read_dir(journals) {
        for entry in rd.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                // A journal cut before it was renamed into place.
                let _ = fs::remove_file(&path);
                continue;
            }
            let journal: Journal = match fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(j) => j,
                None => {
                    // Written with sync before the first rename, so an
                    // unreadable journal was cut before it counted.
                    tracing::warn!(journal = %path.display(), "removing an unreadable restore journal; its restore had not begun swapping");
                    let _ = fs::remove_file(&path);
                    continue;
                }
            };
            match finish(&journal, None) {
                Ok(()) => {
                    tracing::info!(
                        backup = journal.backup,
                        "finished the swap of a restore the agent was stopped in"
                    );
                    let _ = fs::remove_file(&path);
                    let _ = sync_dir(journals);
                    remove_olds(&journal);
                }
                Err(e) => {
                    tracing::error!(backup = journal.backup, error = %e, "could not finish the swap of an interrupted restore; it is tried again at the next start");
                }
            }
        }
    }
    // Leftovers: <processes>/<p>/<s>/volumes/<component>/.restore-* | .old-*
    let pending: bool = fs::read_dir(journals)
        .map(|rd| rd.flatten().next().is_some())
        .unwrap_or(false);
    if pending {
        return; // a journal could not be finished: keep everything
    }
    for project in read_dirs(processes) {
        for stage in read_dirs(&project) {
            for component in read_dirs(&stage.join("volumes")) {
                for leftover in read_dirs(&component) {
                    let name = leftover
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if name.starts_with(".restore-") || name.starts_with(".old-") {
                        tracing::info!(dir = %leftover.display(), "removing what an interrupted restore left");
                        let _ = fs::remove_dir_all(&leftover);
                    }
                }
            }
        }
    }
}

fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
