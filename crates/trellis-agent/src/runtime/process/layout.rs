//! Where everything of a stage lives on disk, and the small JSON records
//! the runtime keeps there (see the module docs of [`super`] for the tree).

use std::fs::{self, DirBuilder, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use trellis_model::{NameKind, validate_name};

use crate::runtime::{ComponentPlan, ComponentState, RuntimeError};
use crate::state::StageKey;

pub(super) const COMPONENTS: &str = "components";
pub(super) const VOLUMES: &str = "volumes";
pub(super) const RECORD: &str = "component.json";
pub(super) const SCHEDULE: &str = "schedule.json";
pub(super) const RUN: &str = "run";
pub(super) const LOGS: &str = "logs";
pub(super) const ROOT: &str = "root";
pub(super) const READY: &str = "ready";
pub(super) const SCRATCH: &str = "scratch";

/// Checks a name from the plan (it came over the network) before it
/// becomes part of a path.
pub(super) fn check_name(kind: NameKind, name: &str) -> Result<(), RuntimeError> {
    validate_name(kind, name).map_err(|e| {
        RuntimeError::new(
            "invalid-name",
            format!("the plan names a {kind} that cannot be used on this host: {e}"),
        )
    })
}

/// Spec hashes become directory names too: lowercase hex only.
pub(super) fn check_spec_hash(hash: &str) -> Result<(), RuntimeError> {
    if (8..=64).contains(&hash.len())
        && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(RuntimeError::new(
            "invalid-plan",
            format!("the plan's spec hash {hash:?} is not lowercase hexadecimal"),
        ))
    }
}

/// The directory tree of all stages under the runtime's root.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn stage_dir(&self, stage: &StageKey) -> Result<PathBuf, RuntimeError> {
        check_name(NameKind::Project, &stage.project)?;
        check_name(NameKind::Stage, &stage.stage)?;
        Ok(self.root.join(&stage.project).join(&stage.stage))
    }

    /// Creates the stage's directory (and its parents) with mode 0700.
    pub fn ensure_stage(&self, stage: &StageKey) -> Result<PathBuf, RuntimeError> {
        let dir = self.stage_dir(stage)?;
        for d in [
            &self.root,
            &self.root.join(&stage.project),
            &dir,
            &dir.join(COMPONENTS),
            &dir.join(VOLUMES),
        ] {
            private_dir(d).map_err(|e| fs_error("create", d, e))?;
        }
        Ok(dir)
    }

    pub fn component(
        &self,
        stage: &StageKey,
        component: &str,
    ) -> Result<ComponentDirs, RuntimeError> {
        check_name(NameKind::Component, component)?;
        let stage_dir = self.stage_dir(stage)?;
        Ok(ComponentDirs {
            dir: stage_dir.join(COMPONENTS).join(component),
            component: component.to_owned(),
            stage_dir,
        })
    }

    /// Every stage directory under the root (names that are not valid
    /// project or stage names are not ours and are left alone).
    pub fn stages(&self) -> io::Result<Vec<StageKey>> {
        let mut out = Vec::new();
        for project in read_dir_names(&self.root)? {
            if validate_name(NameKind::Project, &project).is_err() {
                continue;
            }
            for stage in read_dir_names(&self.root.join(&project))? {
                if validate_name(NameKind::Stage, &stage).is_ok()
                    && self.root.join(&project).join(&stage).is_dir()
                {
                    out.push(StageKey::new(project.clone(), stage));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The names of the components recorded in a stage.
    pub fn component_names(&self, stage: &StageKey) -> Result<Vec<String>, RuntimeError> {
        let dir = self.stage_dir(stage)?.join(COMPONENTS);
        let names = read_dir_names(&dir).map_err(|e| fs_error("list", &dir, e))?;
        Ok(names
            .into_iter()
            .filter(|n| validate_name(NameKind::Component, n).is_ok())
            .collect())
    }
}

/// The directories of one component.
#[derive(Debug, Clone)]
pub(super) struct ComponentDirs {
    pub stage_dir: PathBuf,
    pub component: String,
    pub dir: PathBuf,
}

impl ComponentDirs {
    pub fn record(&self) -> PathBuf {
        self.dir.join(RECORD)
    }
    pub fn schedule(&self) -> PathBuf {
        self.dir.join(SCHEDULE)
    }
    pub fn run(&self) -> PathBuf {
        self.dir.join(RUN)
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join(LOGS)
    }
    pub fn pid_file(&self, replica: u32) -> PathBuf {
        self.run().join(format!("{replica}.json"))
    }
    pub fn spec(&self, spec_hash: &str) -> PathBuf {
        self.dir.join(spec_hash)
    }
    pub fn root(&self, spec_hash: &str) -> PathBuf {
        self.spec(spec_hash).join(ROOT)
    }
    pub fn is_ready(&self, spec_hash: &str) -> bool {
        self.spec(spec_hash).join(READY).is_file()
    }
    /// The component's volumes (they outlive its releases, and its
    /// removal from the plan; the stage's removal takes them).
    pub fn volumes(&self) -> PathBuf {
        self.stage_dir.join(VOLUMES).join(&self.component)
    }
    pub fn volume(&self, name: &str) -> PathBuf {
        self.volumes().join(name)
    }
    pub fn scratch(&self, spec_hash: &str, name: &str) -> PathBuf {
        self.spec(spec_hash).join(SCRATCH).join(name)
    }

    /// Creates the component's own directories.
    pub fn ensure(&self) -> Result<(), RuntimeError> {
        for d in [self.dir.clone(), self.run(), self.logs()] {
            private_dir(&d).map_err(|e| fs_error("create", &d, e))?;
        }
        Ok(())
    }

    /// Removes spec directories other than `keep` (old releases).
    pub fn prune_specs(&self, keep: &str) {
        let Ok(names) = read_dir_names(&self.dir) else {
            return;
        };
        for name in names {
            if name != keep && check_spec_hash(&name).is_ok() {
                let path = self.dir.join(&name);
                if let Err(e) = remove_tree(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an old release's directory");
                }
            }
        }
    }
}

/// What the runtime remembers of a component: the plan it runs, from which
/// revision and release. Written by `apply`, read back after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct ComponentRecord {
    pub revision: u64,
    pub release: Option<u64>,
    pub plan: ComponentPlan,
}

/// One running replica, as its pid file has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct PidRecord {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: tells a reused pid from ours.
    pub start_ticks: u64,
    pub spec_hash: String,
    pub revision: u64,
    pub release: Option<u64>,
    pub restart_generation: u64,
    pub started_at: DateTime<Utc>,
    /// Restarts of this replica before this process, and the last exit.
    pub restarts: u32,
    pub exit_code: Option<i32>,
}

/// The history of a scheduled component.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct ScheduleRecord {
    /// The release (or revision, without one) `@release` last ran for.
    pub release_ran: Option<u64>,
    /// The restart generation last run at once (`trellis start component
    /// --now`, a restart): a higher one in the plan runs it once more.
    /// `None` in a record written before generations were run here.
    #[serde(default)]
    pub restart_ran: Option<u64>,
    pub last_run: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    /// `Succeeded` or `Failed` once a run (with its retries) ended.
    pub result: Option<ComponentState>,
    pub attempts: u32,
    pub message: Option<String>,
}

pub(super) fn fs_error(doing: &str, path: &Path, e: io::Error) -> RuntimeError {
    let error = RuntimeError::new(
        "process-runtime-io",
        format!("could not {doing} {}: {e}", path.display()),
    );
    if trellis_cas::is_disk_full(&e) {
        error.with_hint("the disk is full; free space on the outpost")
    } else {
        error
    }
}

/// Creates `dir` (and missing parents) with mode 0700, and makes an
/// existing one that others may list or write 0700 (a stage with a
/// component running as another user has 0711: others may pass, not look).
pub(super) fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o066 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

pub(super) fn read_dir_names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Writes `value` as JSON to `path` atomically (temporary file, fsync,
/// rename).
pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a JSON record; `None` when it is missing or unreadable (a
/// damaged record is treated as absent, and logged).
pub(super) fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read a process runtime record");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "a process runtime record is damaged; ignoring it");
            None
        }
    }
}

/// Removes a directory tree, making read-only parts writable first is not
/// needed (removal is a write to the parent), but read-only *directories*
/// are: their entries could not be unlinked.
pub(super) fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path);
            fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

fn make_dirs_writable(path: &Path) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                make_dirs_writable(&entry.path());
            }
        }
    }
}

/// Turns a path of the manifest (`/etc/app.conf`, absolute inside the
/// component) into one relative to the component's root directory;
/// refuses `..` and empty paths.
pub(super) fn relative_in_root(path: &str) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for part in path.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(format!("{path:?} leaves the component's directory (..)")),
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("{path:?} names no file"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_stay_inside_the_root() {
        assert_eq!(
            relative_in_root("/etc/app.conf").unwrap(),
            PathBuf::from("etc/app.conf")
        );
        assert_eq!(
            relative_in_root("data//x/").unwrap(),
            PathBuf::from("data/x")
        );
        assert!(relative_in_root("/../etc/passwd").is_err());
        assert!(relative_in_root("/").is_err());
    }

    #[test]
    fn names_and_hashes_are_checked() {
        let layout = Layout {
            root: PathBuf::from("/x"),
        };
        assert!(layout.stage_dir(&StageKey::new("p", "s")).is_ok());
        assert!(layout.stage_dir(&StageKey::new("..", "s")).is_err());
        assert!(layout.stage_dir(&StageKey::new("p", "a/b")).is_err());
        assert!(check_spec_hash("0123456789abcdef").is_ok());
        assert!(check_spec_hash("../../etc").is_err());
        assert!(check_spec_hash("ABCDEF0123").is_err());
    }
}
