//! Workload runtimes: what turns a stage's [`StagePlan`] into running
//! containers or processes on this host (BRIEF §5).
//!
//! A [`Runtime`] knows nothing of revisions, releases, health windows or
//! rollback — the [`Deployer`](crate::deploy::Deployer) above it does that
//! for every runtime alike. A runtime answers four questions:
//!
//! - **plan**: what would it take to make the stage look like this plan?
//!   ([`Action`]s per component: create, replace, keep, stop, remove…)
//! - **apply**: do it. Idempotent; workloads whose spec is unchanged are
//!   kept (adopted), not restarted.
//! - **observe**: what runs now ([`ComponentObservation`] per component),
//!   found again from the host itself (container labels, pid files), so a
//!   restarted agent sees what the previous one started.
//! - **logs**: lines the stage's components wrote, optionally followed.
//!
//! The container runtime ([`container`]) and the process runtime
//! ([`process`]) implement it; a Kubernetes runtime would too, without any
//! change to the deployer or the reconciler.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use std::path::PathBuf;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use trellis_link::protocol::RuntimeInfo;
pub use trellis_link::protocol::{LogLine, LogQuery, LogStream};

use crate::state::StageKey;

pub mod artifacts;
pub mod container;
pub mod plan;
pub mod process;
pub mod schedule;

pub use plan::{
    ComponentPlan, PlanError, PlannedDevice, PlannedFile, PlannedVolume, StagePlan, Workload,
};

/// Which runtime runs a component: containers for `docker:` components,
/// processes for `process:` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Container,
    Process,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Container => "container",
            RuntimeKind::Process => "process",
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A runtime's failure, for people: what happened and what to try. The
/// `code` is stable (it reaches the hub's error list).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RuntimeError {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl RuntimeError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        RuntimeError {
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The message with its hint, as one sentence for a status report.
    pub fn sentence(&self) -> String {
        match &self.hint {
            Some(hint) => format!("{}; {hint}", self.message),
            None => self.message.clone(),
        }
    }
}

/// What [`Runtime::plan`] decided for one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub component: String,
    pub kind: ActionKind,
    /// Why, for the agent's log (e.g. "the image changed").
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// Nothing of it exists yet: create and start it.
    Create,
    /// It exists with another spec (release, env, files, …): replace it.
    Replace,
    /// It runs as planned: leave it alone (this is how adoption works).
    Keep,
    /// It is stopped on request (`trellis stop component`, a suspended
    /// stage): stop it, keep what it is made of.
    Stop,
    /// The plan asks for a restart (its restart generation moved).
    Restart,
    /// It exists but is no longer in the plan: remove it.
    Remove,
}

/// The state of a component as a runtime sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentState {
    /// Every replica runs.
    Running,
    /// Created or restarting, not (yet) running.
    Starting,
    /// Stopped on request, or the stage is suspended.
    Stopped,
    /// It exited and is being restarted over and over.
    CrashLooping,
    /// It cannot be started at all (missing image, bad command, port
    /// taken…); the observation's message says why.
    Failed,
    /// A scheduled component waiting for its next run.
    Waiting,
    /// A scheduled component whose last run succeeded.
    Succeeded,
    /// The runtime holds no workload for it.
    Missing,
}

impl ComponentState {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentState::Running => "running",
            ComponentState::Starting => "starting",
            ComponentState::Stopped => "stopped",
            ComponentState::CrashLooping => "crash-looping",
            ComponentState::Failed => "failed",
            ComponentState::Waiting => "waiting",
            ComponentState::Succeeded => "succeeded",
            ComponentState::Missing => "missing",
        }
    }
}

/// One component as observed on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentObservation {
    pub name: String,
    pub state: ComponentState,
    /// The desired revision of the stage whose plan made the workload (from
    /// its label / pid file).
    pub revision: u64,
    /// The release it belongs to, when the plan had one.
    pub release: Option<u64>,
    /// The component's spec hash ([`ComponentPlan::spec_hash`]) as recorded
    /// on the workload.
    pub spec_hash: String,
    pub replicas_desired: u32,
    pub replicas_running: u32,
    /// Restarts since the workload was created (all replicas).
    pub restarts: u32,
    /// Exit code of the last exit, if it ever exited.
    pub exit_code: Option<i32>,
    /// Since when it is in `state` (or was started), when known.
    pub since: Option<DateTime<Utc>>,
    /// Where the agent itself can reach the component's first port (for
    /// the health check), when it has one and runs.
    pub endpoint: Option<SocketAddr>,
    /// Where the agent reaches each running replica's ports (a container's
    /// address on the stage network; loopback for processes, which share
    /// the host's): what the outpost's entry point routes to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// Container ids or process ids of its replicas, for people and tests.
    pub ids: Vec<String>,
    /// For scheduled components: when the last run ended, and the next.
    pub last_run: Option<DateTime<Utc>>,
    pub next_run: Option<DateTime<Utc>>,
    /// Why it is failed/crash-looping, when the runtime knows.
    pub message: Option<String>,
}

impl ComponentObservation {
    /// An observation of a component the runtime knows nothing of.
    pub fn missing(name: &str) -> Self {
        ComponentObservation {
            name: name.to_owned(),
            state: ComponentState::Missing,
            revision: 0,
            release: None,
            spec_hash: String::new(),
            replicas_desired: 0,
            replicas_running: 0,
            restarts: 0,
            exit_code: None,
            since: None,
            endpoint: None,
            addresses: Vec::new(),
            ids: Vec::new(),
            last_run: None,
            next_run: None,
            message: None,
        }
    }
}

/// Where a runtime moves a component's requests when it replaces the
/// component's replicas beside the old ones (the outpost's entry point).
#[async_trait]
pub trait Traffic: Send + Sync {
    /// Whether requests reach `component` of `stage` through here at all
    /// (it has an ingress the entry point serves): only then is a
    /// replacement worth starting beside the old replicas.
    fn serves(&self, stage: &StageKey, component: &str) -> bool;
    /// Sends `component`'s requests to the replicas at `to` instead of
    /// those at `from`, then waits — at most `drain` — until the requests
    /// open to `from` have finished. `from` gets no new requests until
    /// [`Traffic::retired`] says it is gone.
    async fn switch(
        &self,
        stage: &StageKey,
        component: &str,
        from: &[IpAddr],
        to: &[IpAddr],
        drain: Duration,
    );
    /// The replicas at `addresses` are gone; their addresses may be given
    /// to new ones.
    fn retired(&self, addresses: &[IpAddr]);
}

/// Something that runs the components of stages on this host; see the
/// module docs. Implementations must never panic on a plan (it comes from
/// the network) and must keep one failing component from affecting others.
#[async_trait]
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// This runtime as the `hello` frame and the outpost description show
    /// it (name and version of the engine).
    fn describe(&self) -> RuntimeInfo;

    /// What a `component-ref` to `component` resolves to inside a stage: a
    /// host name without scheme or port, as on the platform — a network
    /// alias for containers, `127.0.0.1` for processes. `first_port` is the
    /// component's first port, for runtimes whose addresses depend on it.
    fn address_of(&self, component: &str, first_port: Option<u16>) -> String;

    /// What [`Runtime::apply`] would do to make `stage` run `plan`'s
    /// components of this runtime's kind. Components of `plan` that are of
    /// another kind are ignored; workloads of the stage that are not in the
    /// plan are removed.
    async fn plan(&self, stage: &StageKey, plan: &StagePlan) -> Result<Vec<Action>, RuntimeError>;

    /// Carries out `actions` (from [`Runtime::plan`] of the same `plan`).
    /// Returns once workloads are created and started, not once they are
    /// healthy. A component that cannot be started is not an error of the
    /// whole apply: it shows as `failed` in [`Runtime::observe`].
    async fn apply(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        actions: &[Action],
    ) -> Result<(), RuntimeError>;

    /// Every component of `stage` this runtime holds workloads for.
    async fn observe(&self, stage: &StageKey) -> Result<Vec<ComponentObservation>, RuntimeError>;

    /// Sends the lines matching `query` to `sink`; with `follow`, keeps
    /// going until `sink` is closed.
    async fn logs(
        &self,
        stage: &StageKey,
        query: &LogQuery,
        sink: mpsc::Sender<LogLine>,
    ) -> Result<(), RuntimeError>;

    /// Removes every workload of `stage`, its volumes and files included
    /// (the hub deleted the stage).
    async fn remove(&self, stage: &StageKey) -> Result<(), RuntimeError>;

    /// Every stage this runtime holds workloads for (to clean up stages the
    /// agent no longer knows).
    async fn stages(&self) -> Result<Vec<StageKey>, RuntimeError>;

    /// Why this runtime cannot hand `component` the devices it holds (an
    /// engine that takes no CDI requests for a GPU); checked before a
    /// release changes anything. Default: it can.
    fn cannot_hold(&self, _component: &ComponentPlan) -> Option<String> {
        None
    }

    /// Whether the component's workload is on this host already, so its
    /// artifact need not be delivered (a container runtime that has the
    /// image). Default: no.
    async fn has_workload(&self, _component: &ComponentPlan) -> bool {
        false
    }

    /// The stage's volumes on this host (`component/storage`, and the
    /// directory holding its content), for backups. Default: none.
    async fn volumes(&self, _stage: &StageKey) -> Result<Vec<(String, PathBuf)>, RuntimeError> {
        Ok(Vec::new())
    }

    /// Runs a command in `component` of `stage` (`trellis exec`).
    async fn exec(
        &self,
        _stage: &StageKey,
        component: &ComponentPlan,
        _request: crate::runner::ExecRequest,
    ) -> Result<crate::runner::ExecProcess, crate::runner::StreamError> {
        Err(crate::runner::stream_error(
            "exec-unsupported",
            format!("this runtime cannot run commands in {}", component.name),
            "",
        ))
    }

    /// Connects to `port` of `component` of `stage` (`trellis
    /// port-forward`).
    async fn connect(
        &self,
        _stage: &StageKey,
        component: &ComponentPlan,
        _replica: Option<u32>,
        _port: u16,
    ) -> Result<tokio::net::TcpStream, crate::runner::StreamError> {
        Err(crate::runner::stream_error(
            "forward-unsupported",
            format!("this runtime cannot connect to {}", component.name),
            "",
        ))
    }
}
