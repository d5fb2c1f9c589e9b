//! What the container runtime remembers of a stage beyond what the engine
//! holds: why a component could not be started, that it is stopped on
//! request, and how its scheduled runs went. Kept in memory and in
//! `<data>/container/<project>/<stage>/state.json` (replaced atomically),
//! so a restarted agent still reports a failure and does not run an
//! `@release` job a second time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::runtime::RuntimeError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageState {
    #[serde(default)]
    pub components: BTreeMap<String, ComponentRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRecord {
    /// Why the last apply of it failed (cleared by the next that works).
    #[serde(default)]
    pub failure: Option<Failure>,
    /// Stopped on request (the plan said `stopped`).
    #[serde(default)]
    pub stopped: bool,
    /// The runs of a scheduled component's current container.
    #[serde(default)]
    pub job: Option<JobRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
    pub since: DateTime<Utc>,
    pub spec_hash: String,
    pub revision: u64,
    #[serde(default)]
    pub release: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobOutcome {
    /// Not run yet.
    Waiting,
    /// A run (or a retry) is under way.
    Running,
    Succeeded,
    /// The last run failed and its retries are used up.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The container the record is about; a new container starts afresh.
    pub container_id: String,
    pub outcome: JobOutcome,
    #[serde(default)]
    pub last_run: Option<DateTime<Utc>>,
    #[serde(default)]
    pub next_run: Option<DateTime<Utc>>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Retries used by the current (or last) run.
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub message: Option<String>,
}

impl JobRecord {
    pub fn new(container_id: &str) -> Self {
        JobRecord {
            container_id: container_id.to_owned(),
            outcome: JobOutcome::Waiting,
            last_run: None,
            next_run: None,
            exit_code: None,
            retries: 0,
            message: None,
        }
    }
}

/// One stage's [`StageState`], in memory and on disk.
#[derive(Debug)]
pub struct StageStore {
    path: PathBuf,
    state: Mutex<StageState>,
}

impl StageStore {
    /// Loads `path`; a missing or unreadable file is an empty state (a
    /// damaged file is set aside, not fatal: the engine holds the truth
    /// about what runs).
    pub fn load(path: PathBuf) -> StageStore {
        let state = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "the container runtime's stage state is damaged; starting afresh");
                    let _ = std::fs::rename(&path, path.with_extension("json.damaged"));
                    StageState::default()
                }
            },
            Err(_) => StageState::default(),
        };
        StageStore {
            path,
            state: Mutex::new(state),
        }
    }

    pub fn snapshot(&self) -> StageState {
        self.lock().clone()
    }

    pub fn component(&self, name: &str) -> Option<ComponentRecord> {
        self.lock().components.get(name).cloned()
    }

    /// Changes the state and writes it (when it changed). A failed write
    /// is logged: the state in memory still serves this agent.
    pub fn update<T>(&self, change: impl FnOnce(&mut StageState) -> T) -> T {
        let mut state = self.lock();
        let before = state.clone();
        let out = change(&mut state);
        state
            .components
            .retain(|_, r| *r != ComponentRecord::default());
        if *state != before
            && let Err(e) = write_atomically(&self.path, &state)
        {
            tracing::warn!(error = %e.sentence(), "the container runtime could not save its stage state");
        }
        out
    }

    pub fn component_mut<T>(
        &self,
        name: &str,
        change: impl FnOnce(&mut ComponentRecord) -> T,
    ) -> T {
        self.update(|s| change(s.components.entry(name.to_owned()).or_default()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StageState> {
        // A panic while holding the lock leaves a consistent value behind
        // (every change is a plain field update).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn write_atomically(path: &Path, state: &StageState) -> Result<(), RuntimeError> {
    let fail = |e: std::io::Error| {
        RuntimeError::new(
            "state-write-failed",
            format!("could not write {}: {e}", path.display()),
        )
        .with_hint("check that the agent's data directory is writable and not full")
    };
    if let Some(dir) = path.parent() {
        super::files::create_private_dir(dir).map_err(fail)?;
    }
    let bytes = serde_json::to_vec_pretty(state).unwrap_or_default();
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_and_drops_empty_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p/s/state.json");
        let store = StageStore::load(path.clone());
        store.component_mut("web", |r| r.stopped = true);
        store.component_mut("job", |r| r.job = Some(JobRecord::new("abc")));
        let again = StageStore::load(path.clone());
        assert!(again.component("web").unwrap().stopped);
        assert_eq!(
            again.component("job").unwrap().job.unwrap().container_id,
            "abc"
        );
        again.component_mut("web", |r| r.stopped = false);
        let reloaded = StageStore::load(path).snapshot();
        assert!(!reloaded.components.contains_key("web"));
    }

    #[test]
    fn a_damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{not json").unwrap();
        let store = StageStore::load(path.clone());
        assert!(store.snapshot().components.is_empty());
        assert!(path.with_extension("json.damaged").exists());
    }
}
