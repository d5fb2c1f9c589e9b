//! The seam between the agent and whatever runs a stage's components.
//!
//! The reconciler hands a [`StageRunner`] the complete desired state of a stage
//! at a revision and gets back an [`ApplyOutcome`] it reports to the hub. A
//! runner never sees revisions out of order: the reconciler applies only
//! the newest held revision of a stage, and never one older than the last it
//! applied (BRIEF §4, "Sync is level-triggered").
//!
//! The production runner is the [`Deployer`](crate::deploy::Deployer),
//! which runs components through the workload runtimes
//! ([`crate::runtime`]). [`RecordOnly`] runs nothing: it records the
//! release on the outpost and says so; the link tests and the simulation
//! use it.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::mpsc;
use trellis_link::protocol::{ComponentStatus, DeviceOffer, LogLine, LogQuery, RuntimeInfo};
use trellis_model::{NameKind, validate_name};

use crate::state::StageKey;

pub use trellis_link::protocol::{StreamChannel, StreamError};

/// A command to run in a component ([`StageRunner::exec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub component: String,
    /// Which replica; the first running one when absent.
    pub replica: Option<u32>,
    pub command: Vec<String>,
    /// Under a pseudo-terminal of this size.
    pub tty: bool,
    pub cols: u16,
    pub rows: u16,
}

/// A command started by [`StageRunner::exec`].
pub struct ExecProcess {
    /// Its standard input.
    pub stdin: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// What it writes, in order, until it closed its output.
    pub output: mpsc::Receiver<(StreamChannel, Vec<u8>)>,
    /// Resizing its terminal, waiting for its exit.
    pub control: Box<dyn ExecControl>,
}

impl std::fmt::Debug for ExecProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecProcess").finish_non_exhaustive()
    }
}

/// The parts of a running exec that depend on where it runs.
#[async_trait]
pub trait ExecControl: Send {
    /// Its terminal changed size (nothing without one).
    async fn resize(&mut self, cols: u16, rows: u16);
    /// Its exit code, once its output has ended; `None` when unknown.
    async fn wait(&mut self) -> Option<i32>;
}

/// A stream refused, with a stable code and a hint.
pub fn stream_error(
    code: &str,
    message: impl Into<String>,
    hint: impl Into<String>,
) -> StreamError {
    let hint = hint.into();
    StreamError {
        code: code.into(),
        message: message.into(),
        hint: (!hint.is_empty()).then_some(hint),
    }
}

/// What applying a desired state did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Whether the stage now runs the applied revision as desired.
    pub ok: bool,
    /// The stage's state as reported to the hub, e.g. `running`, `failed`,
    /// `recorded`.
    pub state: String,
    /// A sentence for people: what happened, and on failure what to try.
    pub message: Option<String>,
    pub components: Vec<ComponentStatus>,
    /// The applied revision's release did not come up and this release was
    /// restored instead (0: nothing to restore, the stage was emptied).
    pub rolled_back_to: Option<u64>,
    /// What the stage's status should say about this release besides its
    /// state: something it asks for that the outpost runs differently.
    pub notices: Vec<Notice>,
}

/// A remark about an applied release for the stage's status (reported as
/// one of its errors), with a stable code.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Notice {
    /// e.g. `identity-unavailable`, `config-key-missing`.
    pub code: String,
    pub message: String,
    pub hint: String,
}

impl ApplyOutcome {
    /// A failed apply with a message; the state is `failed`.
    pub fn failed(message: impl Into<String>) -> Self {
        ApplyOutcome {
            ok: false,
            state: "failed".into(),
            message: Some(message.into()),
            components: Vec::new(),
            rolled_back_to: None,
            notices: Vec::new(),
        }
    }
}

/// Something that turns a stage's desired state into running components.
///
/// Implementations must be idempotent (the same revision may be applied
/// again after an agent restart) and must never panic on a desired state:
/// it comes from the network, so a malformed one is an [`ApplyOutcome`] with
/// `ok: false` and a message saying what is wrong.
#[async_trait]
pub trait StageRunner: Send + Sync {
    /// The runtimes found on this host, for the `hello` frame.
    fn describe(&self) -> Vec<RuntimeInfo>;

    /// The devices this outpost offers its components, for the `hello`
    /// frame. Default: none.
    fn devices(&self) -> Vec<DeviceOffer> {
        Vec::new()
    }

    /// Makes `stage` run `desired` at `revision`.
    async fn apply(
        &self,
        stage: &StageKey,
        revision: u64,
        desired: &serde_json::Value,
    ) -> ApplyOutcome;

    /// Removes everything of `stage` (the hub deleted it).
    async fn remove(&self, stage: &StageKey) -> Result<(), String>;

    /// How the stage stands now, looked at again (not applied): the
    /// reconciler calls it periodically and reports a change, so a
    /// component that starts crash-looping an hour after its release is
    /// seen. `None`: this runner cannot tell more than its last apply said.
    async fn observe(&self, _stage: &StageKey, _revision: u64) -> Option<ApplyOutcome> {
        None
    }

    /// Sends the log lines of `stage` matching `query` to `sink`; with
    /// `query.follow`, keeps going until `sink` is closed.
    async fn logs(
        &self,
        stage: &StageKey,
        _query: &LogQuery,
        _sink: mpsc::Sender<LogLine>,
    ) -> Result<(), String> {
        Err(format!(
            "the outpost of stage {stage} runs no components, so there are no logs"
        ))
    }

    /// The stage's volumes (`component/storage` and their directories),
    /// which backups read and restores replace. Default: none.
    async fn volumes(
        &self,
        _stage: &StageKey,
    ) -> Result<Vec<(String, std::path::PathBuf)>, String> {
        Ok(Vec::new())
    }

    /// Runs a command in a component of `stage` (`trellis exec`).
    async fn exec(
        &self,
        stage: &StageKey,
        _request: ExecRequest,
    ) -> Result<ExecProcess, StreamError> {
        Err(no_components(stage))
    }

    /// Opens a TCP connection to `port` of a component of `stage`
    /// (`trellis port-forward`).
    async fn connect(
        &self,
        stage: &StageKey,
        _component: &str,
        _replica: Option<u32>,
        _port: u16,
    ) -> Result<tokio::net::TcpStream, StreamError> {
        Err(no_components(stage))
    }
}

fn no_components(stage: &StageKey) -> StreamError {
    stream_error(
        "no-runtime",
        format!("the outpost of stage {stage} runs no components"),
        "",
    )
}

/// The message [`RecordOnly`] reports with every apply.
pub const RECORD_ONLY_MESSAGE: &str =
    "this agent has no runtime that runs components yet; the release is recorded on the outpost";

/// A runtime that runs nothing: it writes each stage's desired state to
/// `<data>/stages/<project>/<stage>/desired.json` (atomically: temporary
/// file, fsync, rename, fsync of the directory) and reports `recorded`.
#[derive(Debug, Clone)]
pub struct RecordOnly {
    root: PathBuf,
}

impl RecordOnly {
    /// A runtime recording under `<data_dir>/stages`.
    pub fn new(data_dir: &Path) -> Self {
        RecordOnly {
            root: data_dir.join("stages"),
        }
    }

    /// The directory of `stage`. Refuses names that are not valid project
    /// and stage names, because they come from the network and become path
    /// components (`..` or `/` must never reach the file system).
    pub fn stage_dir(&self, stage: &StageKey) -> Result<PathBuf, String> {
        stage_dir_under(&self.root, stage)
    }
}

#[async_trait]
impl StageRunner for RecordOnly {
    fn describe(&self) -> Vec<RuntimeInfo> {
        Vec::new()
    }

    async fn apply(
        &self,
        stage: &StageKey,
        revision: u64,
        desired: &serde_json::Value,
    ) -> ApplyOutcome {
        let dir = match self.stage_dir(stage) {
            Ok(dir) => dir,
            Err(message) => return ApplyOutcome::failed(message),
        };
        let bytes = match serde_json::to_vec_pretty(desired) {
            Ok(bytes) => bytes,
            Err(e) => {
                return ApplyOutcome::failed(format!(
                    "could not encode revision {revision} of stage {stage} as JSON: {e}"
                ));
            }
        };
        let written =
            tokio::task::spawn_blocking(move || write_atomically(&dir, "desired.json", &bytes))
                .await;
        match written {
            Ok(Ok(())) => ApplyOutcome {
                ok: true,
                state: "recorded".into(),
                message: Some(RECORD_ONLY_MESSAGE.into()),
                components: Vec::new(),
                rolled_back_to: None,
                notices: Vec::new(),
            },
            Ok(Err(e)) => ApplyOutcome::failed(format!(
                "could not record revision {revision} of stage {stage} on the outpost: {e}; \
                 check that the agent's data directory is writable and the disk is not full"
            )),
            Err(e) => ApplyOutcome::failed(format!(
                "recording revision {revision} of stage {stage} failed unexpectedly ({e}); \
                 this is a bug in the agent"
            )),
        }
    }

    async fn remove(&self, stage: &StageKey) -> Result<(), String> {
        let dir = self.stage_dir(stage)?;
        let stage_name = stage.to_string();
        tokio::task::spawn_blocking(move || {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("could not remove {}: {e}", dir.display())),
            }
            // The project directory goes when its last stage does; failing
            // (not empty, already gone) is expected and harmless.
            if let Some(project_dir) = dir.parent() {
                let _ = std::fs::remove_dir(project_dir);
            }
            Ok(())
        })
        .await
        .map_err(|e| format!("removing stage {stage_name} failed unexpectedly ({e})"))?
    }
}

/// `<root>/<project>/<stage>`, after checking that the names are valid
/// project and stage names: they come from the network and become path
/// components (`..` or `/` must never reach the file system).
pub(crate) fn stage_dir_under(root: &Path, stage: &StageKey) -> Result<PathBuf, String> {
    validate_name(NameKind::Project, &stage.project)
        .map_err(|e| format!("the hub sent an invalid project name: {e}"))?;
    validate_name(NameKind::Stage, &stage.stage)
        .map_err(|e| format!("the hub sent an invalid stage name: {e}"))?;
    Ok(root.join(&stage.project).join(&stage.stage))
}

/// Writes `name` in `dir` so that it holds either the old or the new content
/// whenever the process dies: temporary file, fsync, rename, fsync of the
/// directory (a rename is durable only once its directory is).
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
