//! The process runtime: supervised native processes, for hosts without a
//! container engine (BRIEF §5). It runs the components whose workload is a
//! [`Workload::Package`]; every other component of a plan is ignored.
//!
//! # On disk
//!
//! Everything lives under the runtime's root directory (the agent's
//! `<data>/processes`):
//!
//! ```text
//! <root>/<project>/<stage>/                    mode 0700: one stage's world
//!   volumes/<component>/<storage>/             standard/premium storage; outlives releases
//!   components/<component>/
//!     component.json                           the plan it runs (revision, release, spec)
//!     schedule.json                            scheduled components: runs so far
//!     run/<replica>.json                       pid file: pid, start time, spec, generation
//!     logs/<replica>.stdout|.stderr            what the process writes (raw)
//!     logs/lines.jsonl, lines.1.jsonl          timestamped lines (see `logs`)
//!     <spec_hash>/root/                        the unpacked package; the cwd
//!     <spec_hash>/scratch/<storage>/           temporary/memory storage of this spec
//! ```
//!
//! Project, stage, component and storage names are checked with
//! [`trellis_model::validate_name`] before they become paths; spec hashes
//! must be hexadecimal.
//!
//! # Paths inside a component
//!
//! A manifest speaks of absolute paths (`files: [{path: /etc/app.conf}]`,
//! `storage: [{path: /data}]`). For a process they are read relative to
//! its root directory (the unpacked package, also its working directory):
//! `/etc/app.conf` is `<root>/etc/app.conf` (written read-only, 0444), and
//! `/data` is a symlink `<root>/data` → `<stage>/volumes/<component>/<storage>/`,
//! so a program opens `./data/…` (or `$TRELLIS_ROOT/data/…`). Like the
//! container runtime's named volumes, a storage belongs to its component.
//!
//! # Environment
//!
//! Exactly the plan's `env`, plus `PATH` (a minimal system path) and `HOME`
//! (the root directory) unless the plan sets them, plus `TRELLIS_ROOT` (the
//! root directory) and `TRELLIS_REPLICA` (0, 1, …). Nothing of the agent's
//! own environment reaches a component, so stages cannot see each other's.
//!
//! `component-ref` resolves to `127.0.0.1:<first port>`: processes share
//! the host's network, so a port can be bound by one replica only (unless
//! the program uses `SO_REUSEPORT`); a port that is taken shows up as a
//! crash loop whose logs say why. CPU and memory limits are not enforced
//! for processes.
//!
//! # Supervision
//!
//! Each replica runs in its own process group, with stdout and stderr
//! going straight to files (no pipes to the agent), so processes survive
//! the agent — even a SIGKILL of it. A process that exits is started again
//! after a backoff (doubling from `restart_initial` to `restart_max`, reset
//! after `reset_after` of uptime); two quick exits in a row make the
//! component `crash-looping`, with its restart count and last exit code.
//! Stopping sends SIGTERM to the whole group and SIGKILL to what is left
//! after `stop_grace`.
//!
//! A new `ProcessRuntime` over the same root (the agent restarted) adopts
//! the processes of the pid files whose start time (field 22 of
//! `/proc/<pid>/stat`) still matches, without restarting them, and watches
//! them through `/proc`; their exit code cannot be known (they are not its
//! children), only that they exited.
//!
//! Scheduled components run their command at each cron time (in their
//! time zone; a time missed while no agent ran is skipped) or once per
//! release (`@release`, recorded before it starts, so a restarted agent does
//! not run it again), retrying a failed run up to `max-retries` times.
//!
//! `user` is honoured when the agent runs as root: the component's spec
//! directory and volumes then belong to that user, and the directories
//! above them become passable (0711) but not listable; the agent's data
//! directory must be passable too.

mod acl;
mod exec;
mod layout;
mod logs;
mod prepare;
mod supervisor;
mod sys;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use trellis_link::protocol::RuntimeInfo;

use self::layout::{ComponentRecord, Layout, check_name, fs_error, read_json, remove_tree};
use self::supervisor::{Handle, Launch};
use super::artifacts::ArtifactSource;
use super::{
    Action, ActionKind, ComponentObservation, ComponentPlan, LogLine, LogQuery, Runtime,
    RuntimeError, RuntimeKind, StagePlan,
};
use crate::state::StageKey;

/// How the process runtime supervises; the defaults are production's.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// Between SIGTERM and SIGKILL when stopping a component.
    pub stop_grace: Duration,
    /// First delay before a process that exited is started again.
    pub restart_initial: Duration,
    /// The longest delay between restarts.
    pub restart_max: Duration,
    /// Uptime after which the restart delay starts over.
    pub reset_after: Duration,
    /// How often processes are checked and output is collected.
    pub tick: Duration,
    /// Size at which output files are rotated.
    pub log_file_max: u64,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            stop_grace: Duration::from_secs(10),
            restart_initial: Duration::from_millis(500),
            restart_max: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
            tick: Duration::from_millis(100),
            log_file_max: 10 << 20,
        }
    }
}

type Key = (StageKey, String);

/// The ACL entries the agent added to device nodes (see `acl`).
const DEVICE_ACL_RECORD: &str = "device-acl.json";

/// Supervised native processes; see the module docs.
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    layout: Layout,
    artifacts: Arc<dyn ArtifactSource>,
    options: Arc<ProcessOptions>,
    components: Mutex<BTreeMap<Key, Handle>>,
    stage_locks: Mutex<HashMap<StageKey, Arc<tokio::sync::Mutex<()>>>>,
    adopted: tokio::sync::OnceCell<()>,
    /// Held while the device nodes' ACL entries are brought in line.
    acls: Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The agent stops: supervisors end, processes keep running.
        let components = self.components.get_mut().unwrap_or_else(|p| p.into_inner());
        for handle in components.values() {
            handle.detach();
        }
    }
}

impl std::fmt::Debug for ProcessRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRuntime")
            .field("root", &self.inner.layout.root)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl ProcessRuntime {
    /// A runtime over `root` (e.g. `<agent data>/processes`) that gets
    /// packages from `artifacts`. The processes recorded under `root` are
    /// adopted on the first call of any [`Runtime`] method (or right away
    /// when called inside a Tokio runtime).
    pub fn new(root: impl Into<PathBuf>, artifacts: Arc<dyn ArtifactSource>) -> Self {
        Self::with_options(root, artifacts, ProcessOptions::default())
    }

    pub fn with_options(
        root: impl Into<PathBuf>,
        artifacts: Arc<dyn ArtifactSource>,
        options: ProcessOptions,
    ) -> Self {
        let runtime = ProcessRuntime {
            inner: Arc::new(Inner {
                layout: Layout { root: root.into() },
                artifacts,
                options: Arc::new(options),
                components: Mutex::new(BTreeMap::new()),
                stage_locks: Mutex::new(HashMap::new()),
                adopted: tokio::sync::OnceCell::new(),
                acls: Mutex::new(()),
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            let inner = Arc::downgrade(&runtime.inner);
            tokio::spawn(async move {
                if let Some(inner) = inner.upgrade() {
                    inner.adopt().await;
                }
            });
        }
        runtime
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.layout.root
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Handle>> {
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stage_lock(&self, stage: &StageKey) -> Arc<tokio::sync::Mutex<()>> {
        self.stage_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(stage.clone())
            .or_default()
            .clone()
    }

    /// Starts a supervisor for every component recorded on disk (once).
    async fn adopt(&self) {
        self.adopted
            .get_or_init(|| async {
                let stages = match self.layout.stages() {
                    Ok(stages) => stages,
                    Err(e) => {
                        tracing::error!(root = %self.layout.root.display(), error = %e,
                            "cannot list the process runtime's stages");
                        return;
                    }
                };
                for stage in stages {
                    let lock = self.stage_lock(&stage);
                    let _guard = lock.lock().await;
                    for name in self.layout.component_names(&stage).unwrap_or_default() {
                        let Ok(dirs) = self.layout.component(&stage, &name) else {
                            continue;
                        };
                        let Some(record) = read_json::<ComponentRecord>(&dirs.record()) else {
                            continue;
                        };
                        if record.plan.name != name {
                            continue;
                        }
                        let key = (stage.clone(), name);
                        if self.lock().contains_key(&key) {
                            continue;
                        }
                        let handle = self.launch(&stage, record).await;
                        self.lock().insert(key, handle);
                    }
                }
            })
            .await;
    }

    /// Prepares (when needed) and starts the supervisor of a component.
    async fn launch(&self, stage: &StageKey, record: ComponentRecord) -> Handle {
        let dirs = match self.layout.component(stage, &record.plan.name) {
            Ok(dirs) => dirs,
            Err(e) => {
                // Names were checked before; keep the component visible.
                let dirs = layout::ComponentDirs {
                    stage_dir: PathBuf::new(),
                    component: record.plan.name.clone(),
                    dir: PathBuf::new(),
                };
                return Handle::start(Launch {
                    dirs,
                    record,
                    root: Err(e),
                    options: self.options.clone(),
                })
                .await;
            }
        };
        let root = prepare::prepare(&dirs, &record.plan, self.artifacts.as_ref()).await;
        if let Err(e) = &root {
            tracing::warn!(stage = %stage, component = %record.plan.name, code = e.code,
                error = %e.sentence(), "a process component cannot be prepared");
        } else {
            dirs.prune_specs(&record.plan.spec_hash);
        }
        if let Err(e) = layout::write_json(&dirs.record(), &record) {
            tracing::warn!(stage = %stage, component = %record.plan.name, error = %e,
                "cannot record a process component; a restarted agent will not know it");
        }
        if !record.plan.devices.is_empty() {
            // Before it starts: it may open its devices at once.
            self.sync_device_acls();
        }
        Handle::start(Launch {
            dirs,
            record,
            root,
            options: self.options.clone(),
        })
        .await
    }

    fn take(&self, key: &Key) -> Option<Handle> {
        self.lock().remove(key)
    }

    /// Gives every process component recorded on disk that runs as a user
    /// of its own an ACL entry on each device node it holds, with the
    /// access offered, and takes the entries it added before off the nodes
    /// no component needs them on any more (see `acl`). A component that
    /// runs as the agent's own user needs none.
    fn sync_device_acls(&self) {
        let _guard = self.acls.lock().unwrap_or_else(|p| p.into_inner());
        let mut wanted = acl::Wanted::new();
        for stage in self.layout.stages().unwrap_or_default() {
            for record in self.records(&stage).unwrap_or_default().into_values() {
                let plan = &record.plan;
                if plan.stopped || plan.devices.is_empty() {
                    continue;
                }
                let Ok(Some((uid, _))) = prepare::owner(plan) else {
                    continue;
                };
                for device in &plan.devices {
                    if let Some(path) = &device.path {
                        *wanted
                            .entry(path.clone())
                            .or_default()
                            .entry(uid)
                            .or_default() |= acl::perm_of(&device.access);
                    }
                }
            }
        }
        acl::sync(&self.layout.root.join(DEVICE_ACL_RECORD), &wanted);
    }

    fn records(&self, stage: &StageKey) -> Result<BTreeMap<String, ComponentRecord>, RuntimeError> {
        let mut out = BTreeMap::new();
        for name in self.layout.component_names(stage)? {
            let dirs = self.layout.component(stage, &name)?;
            if let Some(record) = read_json::<ComponentRecord>(&dirs.record()) {
                out.insert(name, record);
            }
        }
        Ok(out)
    }
}

fn check_plan(stage: &StageKey, plan: &StagePlan) -> Result<(), RuntimeError> {
    check_name(trellis_model::NameKind::Project, &stage.project)?;
    check_name(trellis_model::NameKind::Stage, &stage.stage)?;
    for c in plan.of_kind(RuntimeKind::Process) {
        check_name(trellis_model::NameKind::Component, &c.name)?;
        layout::check_spec_hash(&c.spec_hash)?;
    }
    Ok(())
}

fn decide(
    plan: &ComponentPlan,
    release: Option<u64>,
    record: Option<&ComponentRecord>,
    prepare_failed: bool,
) -> (ActionKind, String) {
    let Some(record) = record else {
        return (ActionKind::Create, "it is not on this host yet".into());
    };
    let had = &record.plan;
    if had.spec_hash != plan.spec_hash {
        let what = if had.workload != plan.workload {
            "its package or command changed"
        } else if had.env != plan.env {
            "its environment changed"
        } else if had.files != plan.files {
            "its files changed"
        } else {
            "its spec changed"
        };
        return (ActionKind::Replace, what.into());
    }
    if prepare_failed {
        return (
            ActionKind::Replace,
            "its last start failed before it ran; trying again".into(),
        );
    }
    if plan.schedule == Some(trellis_model::manifest::Schedule::OnRelease)
        && !plan.stopped
        && record.release != release
    {
        return (ActionKind::Restart, "a new release runs it again".into());
    }
    match (had.stopped, plan.stopped) {
        (false, true) if plan.killed => (ActionKind::Stop, "it is killed on request".into()),
        (false, true) => (ActionKind::Stop, "it is stopped on request".into()),
        (true, true) => (ActionKind::Keep, "it stays stopped".into()),
        (true, false) => (ActionKind::Restart, "it is started again".into()),
        (false, false) if had.restart_generation != plan.restart_generation => {
            (ActionKind::Restart, "a restart was requested".into())
        }
        (false, false) => (ActionKind::Keep, "it runs as planned".into()),
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    async fn volumes(
        &self,
        stage: &StageKey,
    ) -> Result<Vec<(String, std::path::PathBuf)>, RuntimeError> {
        let dir = self.inner.layout.stage_dir(stage)?.join(layout::VOLUMES);
        crate::backup::list_volumes(&dir).map_err(|e| RuntimeError::new("volumes-unreadable", e))
    }

    async fn exec(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        request: crate::runner::ExecRequest,
    ) -> Result<crate::runner::ExecProcess, crate::runner::StreamError> {
        self.exec_in(stage, component, request).await
    }

    async fn connect(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        replica: Option<u32>,
        port: u16,
    ) -> Result<tokio::net::TcpStream, crate::runner::StreamError> {
        self.connect_to(stage, component, replica, port).await
    }

    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn describe(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: "process".into(),
            version: crate::update::version().into(),
        }
    }

    fn address_of(&self, _component: &str, _first_port: Option<u16>) -> String {
        // Processes share the host's network; like the platform's
        // component-ref, the address is a host name only, so an app that
        // writes `$(DB_HOST):5432` works whichever runtime runs the db.
        "127.0.0.1".into()
    }

    async fn plan(&self, stage: &StageKey, plan: &StagePlan) -> Result<Vec<Action>, RuntimeError> {
        self.inner.adopt().await;
        check_plan(stage, plan)?;
        let records = self.inner.records(stage)?;
        let mut actions = Vec::new();
        for component in plan.of_kind(RuntimeKind::Process) {
            let key = (stage.clone(), component.name.clone());
            let prepare_failed = self
                .inner
                .lock()
                .get(&key)
                .is_some_and(|h| h.prepare_failed());
            let (kind, reason) = decide(
                component,
                plan.release,
                records.get(&component.name),
                prepare_failed,
            );
            actions.push(Action {
                component: component.name.clone(),
                kind,
                reason,
            });
        }
        for name in records.keys() {
            if !plan.of_kind(RuntimeKind::Process).any(|c| &c.name == name) {
                actions.push(Action {
                    component: name.clone(),
                    kind: ActionKind::Remove,
                    reason: "it is no longer in the plan".into(),
                });
            }
        }
        Ok(actions)
    }

    async fn apply(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        actions: &[Action],
    ) -> Result<(), RuntimeError> {
        self.inner.adopt().await;
        check_plan(stage, plan)?;
        let lock = self.inner.stage_lock(stage);
        let _guard = lock.lock().await;
        self.inner.layout.ensure_stage(stage)?;

        // Removals and stops first: they free ports and disk.
        let mut ordered: Vec<&Action> = actions.iter().collect();
        ordered.sort_by_key(|a| !matches!(a.kind, ActionKind::Remove | ActionKind::Stop));
        for action in ordered {
            let key = (stage.clone(), action.component.clone());
            if action.kind == ActionKind::Remove {
                let dirs = self.inner.layout.component(stage, &action.component)?;
                if let Some(handle) = self.inner.take(&key) {
                    handle.stop().await;
                } else {
                    supervisor::kill_recorded(&dirs, self.inner.options.stop_grace).await;
                }
                remove_tree(&dirs.dir).map_err(|e| fs_error("remove", &dirs.dir, e))?;
                tracing::info!(stage = %stage, component = %action.component, "removed a process component");
                continue;
            }
            let Some(component) = plan
                .of_kind(RuntimeKind::Process)
                .find(|c| c.name == action.component)
            else {
                continue;
            };
            let record = ComponentRecord {
                revision: plan.revision,
                release: plan.release,
                plan: component.clone(),
            };
            match action.kind {
                ActionKind::Keep => {
                    let missing = !self.inner.lock().contains_key(&key);
                    if missing {
                        // Known on disk but not supervised (yet): adopt.
                        let dirs = self.inner.layout.component(stage, &component.name)?;
                        let record = read_json::<ComponentRecord>(&dirs.record())
                            .filter(|r| r.plan.spec_hash == component.spec_hash)
                            .unwrap_or(record);
                        let handle = self.inner.launch(stage, record).await;
                        self.inner.lock().insert(key, handle);
                    }
                }
                ActionKind::Remove => {}
                ActionKind::Create
                | ActionKind::Replace
                | ActionKind::Restart
                | ActionKind::Stop => {
                    // The new spec is made ready while the old one runs.
                    let dirs = self.inner.layout.component(stage, &component.name)?;
                    let ready = prepare::prepare(&dirs, component, self.inner.artifacts.as_ref())
                        .await
                        .map(|_| ());
                    if let Err(e) = &ready {
                        tracing::warn!(stage = %stage, component = %component.name, code = e.code,
                            error = %e.sentence(), "a process component cannot be prepared");
                    }
                    // A kill ends the processes without the grace period.
                    let grace = if action.kind == ActionKind::Stop && component.killed {
                        Duration::ZERO
                    } else {
                        self.inner.options.stop_grace
                    };
                    if let Some(old) = self.inner.take(&key) {
                        old.stop_within(grace).await;
                    } else {
                        supervisor::kill_recorded(&dirs, grace).await;
                    }
                    let handle = self.inner.launch(stage, record).await;
                    tracing::info!(stage = %stage, component = %component.name,
                        action = ?action.kind, reason = %action.reason, "applied");
                    self.inner.lock().insert(key, handle);
                }
            }
        }
        // Components removed, stopped or given other devices let go of
        // their nodes.
        self.inner.sync_device_acls();
        Ok(())
    }

    async fn observe(&self, stage: &StageKey) -> Result<Vec<ComponentObservation>, RuntimeError> {
        self.inner.adopt().await;
        self.inner.layout.stage_dir(stage)?;
        let components = self.inner.lock();
        Ok(components
            .iter()
            .filter(|((s, _), _)| s == stage)
            .map(|(_, handle)| handle.observation())
            .collect())
    }

    async fn logs(
        &self,
        stage: &StageKey,
        query: &LogQuery,
        sink: mpsc::Sender<LogLine>,
    ) -> Result<(), RuntimeError> {
        self.inner.adopt().await;
        let stage_dir = self.inner.layout.stage_dir(stage)?;
        if let Some(name) = &query.component {
            check_name(trellis_model::NameKind::Component, name)?;
        }
        let layout = self.inner.layout.clone();
        let stage_key = stage.clone();
        let component = query.component.clone();
        let list = move || -> Vec<(String, PathBuf)> {
            let names = match &component {
                Some(name) => vec![name.clone()],
                None => layout.component_names(&stage_key).unwrap_or_default(),
            };
            names
                .into_iter()
                .filter_map(|n| {
                    let dirs = layout.component(&stage_key, &n).ok()?;
                    Some((n, dirs.logs()))
                })
                .collect()
        };
        // A stage without process components has no lines here (its
        // containers may have some); a named component must exist.
        if let Some(name) = &query.component
            && !stage_dir.join(layout::COMPONENTS).join(name).is_dir()
        {
            return Err(RuntimeError::new(
                "component-unknown",
                format!("stage {stage} has no process component {name:?} on this host"),
            ));
        }

        let mut positions: HashMap<String, logs::Position> = HashMap::new();
        let mut lines = Vec::new();
        for (name, dir) in list() {
            let (mut all, position) =
                logs::read_all(&dir).map_err(|e| fs_error("read", &dir, e))?;
            positions.insert(name, position);
            if let Some(since) = query.since {
                all.retain(|l| l.time >= since);
            }
            lines.extend(all);
        }
        lines.sort_by_key(|l| l.time);
        if let Some(tail) = query.tail {
            let skip = lines.len().saturating_sub(tail);
            lines.drain(..skip);
        }
        for line in lines {
            if sink.send(line).await.is_err() {
                return Ok(());
            }
        }
        if !query.follow {
            return Ok(());
        }
        let poll = self.inner.options.tick.min(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = sink.closed() => return Ok(()),
                _ = tokio::time::sleep(poll) => {}
            }
            let mut new = Vec::new();
            for (name, dir) in list() {
                let position = positions.entry(name).or_default();
                match logs::read_new(&dir, position) {
                    Ok(lines) => new.extend(lines),
                    Err(e) => {
                        tracing::debug!(dir = %dir.display(), error = %e, "cannot follow a log")
                    }
                }
            }
            new.sort_by_key(|l| l.time);
            for line in new {
                if sink.send(line).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    async fn remove(&self, stage: &StageKey) -> Result<(), RuntimeError> {
        self.inner.adopt().await;
        let stage_dir = self.inner.layout.stage_dir(stage)?;
        let lock = self.inner.stage_lock(stage);
        let _guard = lock.lock().await;
        let handles: Vec<Handle> = {
            let mut components = self.inner.lock();
            let keys: Vec<Key> = components
                .keys()
                .filter(|(s, _)| s == stage)
                .cloned()
                .collect();
            keys.iter().filter_map(|k| components.remove(k)).collect()
        };
        futures_util::future::join_all(handles.into_iter().map(Handle::stop)).await;
        // Anything recorded that had no supervisor.
        for name in self.inner.layout.component_names(stage).unwrap_or_default() {
            if let Ok(dirs) = self.inner.layout.component(stage, &name) {
                supervisor::kill_recorded(&dirs, self.inner.options.stop_grace).await;
            }
        }
        remove_tree(&stage_dir).map_err(|e| fs_error("remove", &stage_dir, e))?;
        if let Some(project) = stage_dir.parent() {
            // Only if empty; another stage of the project may live there.
            let _ = std::fs::remove_dir(project);
        }
        self.inner
            .stage_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stage);
        self.inner.sync_device_acls();
        tracing::info!(stage = %stage, "removed the stage's processes and files");
        Ok(())
    }

    async fn stages(&self) -> Result<Vec<StageKey>, RuntimeError> {
        self.inner.adopt().await;
        self.inner
            .layout
            .stages()
            .map_err(|e| fs_error("list", &self.inner.layout.root, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Workload;

    fn plan(spec: &str, stopped: bool, generation: u64) -> ComponentPlan {
        ComponentPlan {
            ports: vec![8080],
            stopped,
            killed: false,
            restart_generation: generation,
            spec_hash: spec.into(),
            ..ComponentPlan::new(
                "web",
                Workload::Package {
                    digest: "d".into(),
                    size: 1,
                    argv: vec!["./web".into()],
                },
            )
        }
    }

    fn record(plan: ComponentPlan) -> ComponentRecord {
        ComponentRecord {
            revision: 1,
            release: Some(1),
            plan,
        }
    }

    #[test]
    fn decides_per_component() {
        let a = plan("aaaaaaaaaaaaaaaa", false, 0);
        assert_eq!(decide(&a, Some(1), None, false).0, ActionKind::Create);
        let had = record(a.clone());
        assert_eq!(decide(&a, Some(1), Some(&had), false).0, ActionKind::Keep);
        assert_eq!(decide(&a, Some(1), Some(&had), true).0, ActionKind::Replace);
        let b = plan("bbbbbbbbbbbbbbbb", false, 0);
        assert_eq!(
            decide(&b, Some(1), Some(&had), false).0,
            ActionKind::Replace
        );
        assert_eq!(
            decide(
                &plan("aaaaaaaaaaaaaaaa", true, 0),
                Some(1),
                Some(&had),
                false
            )
            .0,
            ActionKind::Stop
        );
        assert_eq!(
            decide(
                &plan("aaaaaaaaaaaaaaaa", false, 1),
                Some(1),
                Some(&had),
                false
            )
            .0,
            ActionKind::Restart
        );
        let stopped = record(plan("aaaaaaaaaaaaaaaa", true, 0));
        assert_eq!(
            decide(&a, Some(1), Some(&stopped), false).0,
            ActionKind::Restart
        );
        assert_eq!(
            decide(
                &plan("aaaaaaaaaaaaaaaa", true, 0),
                Some(1),
                Some(&stopped),
                false
            )
            .0,
            ActionKind::Keep
        );
    }
}
