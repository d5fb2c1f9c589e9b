//! Backups of a stage's storage, and their restore (the hub asks for both
//! with `backup-job` messages on the link).
//!
//! A stage's volumes, named `component/storage` in a backup, are what its
//! runtimes list (`StageRunner::volumes`): process components' storage
//! directories (`<data>/processes/<project>/<stage>/volumes/<component>/
//! <storage>/`) and container components' named volumes, read at their
//! mountpoint on the host (the agent runs beside the engine, as root).
//!
//! **Backup** (`snapshot.rs`): every file of every volume is cut into
//! content-defined chunks ([`trellis_cas::BACKUP_CHUNKS`]); in batches,
//! the hub is asked which it lacks and only those are compressed and
//! uploaded; then the manifest (every file's path, mode, owner, size and
//! chunks) completes the backup. A job cut short (the agent or the link
//! went down) is sent again when the link comes back and starts over,
//! uploading only what the hub still lacks.
//!
//! **Restore** (`restore.rs`): the manifest is read, every chunk fetched and
//! verified against its digest, and each volume assembled in a staging
//! directory beside it. Only when every volume is complete is a journal
//! written (`<data>/backups/restore-<id>.json`) and the volumes swapped in
//! by renames: the live directory to `.old-…`, the staging one to the
//! live name. A restart of the agent finishes a journaled swap
//! ([`Backups::recover`]) before anything else runs, so a crash at any
//! instant leaves each volume either as it was (no journal yet: the
//! staging directories are removed) or fully restored — never a mix. A
//! chunk that fails verification fails the restore before anything is
//! replaced.

pub mod hub;
mod restore;
mod snapshot;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use trellis_link::protocol::BackupOp;
use trellis_model::{NameKind, validate_name};

use crate::runner::StageRunner;
use crate::state::StageKey;

pub use hub::{BackupHub, HttpBackupHub, JobRef, JobReport};

/// The directory, under the agent's data directory, of restore journals.
pub const JOURNAL_DIR: &str = "backups";

/// Environment variable: milliseconds to wait in the middle of a volume's
/// swap (after the live directory was moved aside, before the restored one
/// takes its name). For crash tests, which kill the agent there; unset in
/// production.
pub const SWAP_DELAY_ENV: &str = "TRELLIS_AGENT_RESTORE_SWAP_DELAY_MS";

/// Runs backup and restore jobs, one at a time per backup id.
pub struct Backups {
    hub: Arc<dyn BackupHub>,
    /// The process runtime's root, `<data>/processes`.
    processes: PathBuf,
    /// Where restore journals live.
    journals: PathBuf,
    running: Mutex<HashSet<u64>>,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("processes", &self.processes)
            .finish_non_exhaustive()
    }
}

impl Backups {
    pub fn new(hub: Arc<dyn BackupHub>, data_dir: &Path) -> Self {
        Backups {
            hub,
            processes: data_dir.join("processes"),
            journals: data_dir.join(JOURNAL_DIR),
            running: Mutex::new(HashSet::new()),
        }
    }

    /// Finishes the volume swaps a restore journaled before the agent
    /// stopped, and removes what unfinished restores left. Runs before the
    /// runtimes start.
    pub fn recover(&self) {
        restore::recover(&self.journals, &self.processes);
    }

    /// Starts a job unless one of the same backup runs already; `runner`
    /// says where the stage's volumes are.
    pub fn start(
        self: &Arc<Self>,
        runner: Arc<dyn StageRunner>,
        id: u64,
        project: String,
        stage: String,
        op: BackupOp,
    ) {
        let job = JobRef { id, project, stage };
        if let Err(e) = validate_name(NameKind::Project, &job.project)
            .and_then(|()| validate_name(NameKind::Stage, &job.stage))
        {
            tracing::warn!(%job, error = %e, "refusing a backup job with a bad stage name");
            return;
        }
        if !self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
        {
            tracing::debug!(%job, "the job runs already");
            return;
        }
        let this = self.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let volumes = handle
                .block_on(runner.volumes(&StageKey::new(job.project.clone(), job.stage.clone())))
                .map_err(|e| format!("the stage's volumes cannot be listed: {e}"));
            let result = volumes.and_then(|volumes| match op {
                BackupOp::Backup => snapshot::run(&this, &handle, &job, volumes),
                BackupOp::Restore => restore::run(&this, &handle, &job, volumes),
            });
            let (state, message) = match &result {
                Ok(()) if op == BackupOp::Restore => ("completed", String::new()),
                Ok(()) => ("", String::new()),
                Err(e) => ("failed", e.clone()),
            };
            match &result {
                Ok(()) => tracing::info!(%job, ?op, "backup job done"),
                Err(e) => tracing::warn!(%job, ?op, error = %e, "backup job failed"),
            }
            if !state.is_empty() {
                let report = JobReport {
                    op,
                    state: state.into(),
                    message,
                    size: 0,
                };
                if let Err(e) = handle.block_on(this.hub.report(&job, &report)) {
                    // The hub sends the job again when the link is back.
                    tracing::warn!(%job, error = %e, "could not tell the hub how a backup job ended");
                }
            }
            this.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job.id);
        });
    }
}

/// The `component/storage` volumes under a stage's `volumes` directory,
/// sorted; names that are not a component's or storage's are skipped
/// (staging and set-aside directories start with a dot).
pub(crate) fn list_volumes(volumes: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let mut found = Vec::new();
    let components = match std::fs::read_dir(volumes) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(format!("cannot list {}: {e}", volumes.display())),
    };
    for component in components {
        let component = component.map_err(|e| format!("cannot list {}: {e}", volumes.display()))?;
        let cname = component.file_name().to_string_lossy().into_owned();
        if validate_name(NameKind::Component, &cname).is_err() || !component.path().is_dir() {
            continue;
        }
        let dir = component.path();
        let storages =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for storage in storages {
            let storage = storage.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let sname = storage.file_name().to_string_lossy().into_owned();
            let is_dir = storage.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if validate_name(NameKind::Storage, &sname).is_err() || !is_dir {
                continue;
            }
            found.push((format!("{cname}/{sname}"), storage.path()));
        }
    }
    found.sort();
    Ok(found)
}
