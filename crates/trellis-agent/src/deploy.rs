//! The deployer: the [`StageRunner`] that runs stages through the workload
//! runtimes, checks that a new release comes up, and rolls back when it
//! does not (BRIEF §5).
//!
//! For every desired revision it
//! 1. turns the desired state into a [`StagePlan`] (env, files, refs
//!    resolved; `component-ref` resolved by the runtime of the referenced
//!    component);
//! 2. has each runtime plan and apply its part — containers for `docker:`
//!    components, processes for `process:` ones;
//! 3. watches the result for the **health window**: every component that
//!    should run must run all its replicas, answer on its first port when it
//!    has one, and not restart, continuously for the **settle** time;
//! 4. on success remembers the plan as the stage's last good one; on
//!    failure of a *new release* restores the last good plan (or empties the
//!    stage when there is none) and reports `failed` with the reason and
//!    what it rolled back to. The desired revision on the hub is not changed:
//!    the failed revision counts as applied-and-failed, so it is not retried
//!    until the hub sends a newer one.
//!
//! Before step 2, every artifact the release needs (image archives,
//! packages) is **delivered** into the agent's cache, with progress on the
//! [`DeliveryBoard`] for the hub's status view. A delivery that fails
//! (a chunk that does not verify twice, a full disk, the hub gone for
//! longer than [`DELIVERY_PATIENCE`]) fails the revision before anything
//! running is touched. After every apply the cache is **collected**: it
//! keeps the artifacts of each stage's current plan, its last good plan
//! (what a failing release rolls back to) and the good plan before that
//! (`previous.json`), and frees the rest — never while an apply is in
//! flight.
//!
//! A failure that is not a new release (a restart or start of a component)
//! is reported without a rollback: there is nothing older to go back to.
//!
//! Plans are kept under `<data>/deploy/<project>/<stage>/` (`good.json`,
//! `current.json`), written atomically, so a restarted agent knows which
//! release is running and which one to roll back to. They hold the
//! release's config values (resolved env, file contents), so they are
//! sealed with the agent state's key ([`Deployer::with_seal`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;
use trellis_link::protocol::{ComponentStatus, DeviceOffer, LogLine, LogQuery, RuntimeInfo};

use crate::delivery::{Delivery, DeliveryBoard};
use crate::devices::{DeviceOffers, NodeState, node_state};
use crate::ingress::IngressRoutes;
use crate::runner::{ApplyOutcome, StageRunner, stage_dir_under, write_atomically};
use crate::runtime::artifacts::ArtifactSource;
use crate::runtime::plan::{PlanContext, plan_from_desired};
use crate::runtime::{
    ActionKind, ComponentObservation, ComponentPlan, ComponentState, Runtime, RuntimeKind,
    StagePlan,
};
use crate::state::StageKey;

/// How the deployer judges a new release.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// How long a new release has to come up before it is rolled back.
    pub health_window: Duration,
    /// How long every component must stay up, without a restart, to count
    /// as up (catches a process that starts and dies a moment later).
    pub settle: Duration,
    /// How often the components are looked at during the window.
    pub probe_interval: Duration,
    /// The outpost's CPU architecture as OCI platforms name it (`amd64`,
    /// `arm64`): which image of a multi-architecture build runs here.
    /// Default: this host's ([`crate::host::arch`]).
    pub arch: String,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            health_window: Duration::from_secs(60),
            settle: Duration::from_secs(3),
            probe_interval: Duration::from_millis(250),
            arch: crate::host::arch().to_owned(),
        }
    }
}

/// See the module docs.
pub struct Deployer {
    runtimes: Vec<Arc<dyn Runtime>>,
    root: PathBuf,
    options: DeployOptions,
    /// The plan each stage runs now (`current.json`), kept in memory so the
    /// periodic observation does not read it from disk every time.
    current: std::sync::Mutex<std::collections::HashMap<StageKey, StagePlan>>,
    artifacts: Option<Arc<dyn ArtifactSource>>,
    deliveries: Option<Arc<DeliveryBoard>>,
    /// Held (shared) by every apply, from delivery to the end of its
    /// health window, and (exclusive) by the collection of the artifact
    /// store: so the collection never frees what a release in flight needs.
    applying: tokio::sync::RwLock<()>,
    /// The outpost's entry point, when it serves one.
    ingress: Option<Arc<IngressRoutes>>,
    /// The devices the outpost offers its components.
    devices: DeviceOffers,
    /// Held from the last check of who holds the exclusive devices a plan
    /// asks for until that plan is the stage's current one, so two stages
    /// applied at once cannot both take one device.
    claims: tokio::sync::Mutex<()>,
    /// What saved plans are sealed with; without it they are plain JSON.
    seal: Option<Arc<crate::seal::SealKey>>,
}

/// What a stage's sealed plan file is bound to.
fn plan_aad(stage: &StageKey, name: &str) -> Vec<u8> {
    format!("plan:{stage}:{name}").into_bytes()
}

/// How long a delivery waits for an unreachable hub (while no byte
/// arrives) before the revision fails.
pub const DELIVERY_PATIENCE: Duration = Duration::from_secs(300);

/// How long a delivery the hub held back for its window waits before
/// asking again, when the hub has not said the window opened.
const WINDOW_RECHECK: Duration = Duration::from_secs(60);

/// What [`Deployer::collect_garbage`] freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectReport {
    pub kept: usize,
    pub freed: usize,
    pub freed_bytes: u64,
}

const GOOD_PLAN: &str = "good.json";
/// The good plan before the current good one: its artifacts are kept too.
const PREVIOUS_PLAN: &str = "previous.json";
const CURRENT_PLAN: &str = "current.json";

/// Why a release is not up (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Up,
    /// Not up yet; may still come up within the window.
    Waiting(String),
    /// Will not come up: it failed or restarted.
    Down(String),
}

impl Deployer {
    /// A deployer over `runtimes` (at most one per kind), keeping its plans
    /// under `<data_dir>/deploy`.
    pub fn new(data_dir: &Path, runtimes: Vec<Arc<dyn Runtime>>, options: DeployOptions) -> Self {
        Deployer {
            runtimes,
            root: data_dir.join("deploy"),
            options,
            current: Default::default(),
            artifacts: None,
            deliveries: None,
            ingress: None,
            applying: Default::default(),
            seal: None,
            devices: DeviceOffers::default(),
            claims: Default::default(),
        }
    }

    /// Offers `devices` to the components of its stages.
    pub fn with_devices(mut self, devices: DeviceOffers) -> Self {
        self.devices = devices;
        self
    }

    /// Seals the plans it saves with `key` (the agent state's): they hold
    /// config values.
    pub fn with_seal(mut self, key: Arc<crate::seal::SealKey>) -> Self {
        self.seal = Some(key);
        self
    }

    /// Delivers the artifacts of releases from `artifacts` before applying
    /// them, and collects its store after every apply.
    pub fn with_artifacts(mut self, artifacts: Arc<dyn ArtifactSource>) -> Self {
        self.artifacts = Some(artifacts);
        self
    }

    /// Puts the progress of deliveries on `board`.
    /// Routes the entry point to what runs (see [`crate::ingress`]).
    pub fn with_ingress(mut self, routes: Arc<IngressRoutes>) -> Self {
        self.ingress = Some(routes);
        self
    }

    /// Points the entry point at the replicas of `plan` in `observed`.
    fn route(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        observed: &HashMap<String, ComponentObservation>,
    ) {
        if let Some(routes) = &self.ingress {
            routes.update(stage, plan, observed);
        }
    }

    /// Routes every stage that has a current plan to what runs now: at
    /// start, so a restarted agent serves its adopted replicas at once.
    pub async fn route_all(&self) {
        if self.ingress.is_none() {
            return;
        }
        for stage in self.stages_with_plans() {
            if let Some(plan) = self.load_plan(&stage, CURRENT_PLAN).await {
                let observed = self.observe_all(&stage).await;
                self.route(&stage, &plan, &observed);
            }
        }
    }

    /// Stages that have a saved plan (`<root>/<project>/<stage>/current.json`).
    fn stages_with_plans(&self) -> Vec<StageKey> {
        let mut out = Vec::new();
        for project in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            for stage in std::fs::read_dir(project.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if stage.path().join(CURRENT_PLAN).is_file() {
                    out.push(StageKey::new(
                        project.file_name().to_string_lossy().into_owned(),
                        stage.file_name().to_string_lossy().into_owned(),
                    ));
                }
            }
        }
        out
    }

    /// The components' statuses, with their URLs when the entry point
    /// serves them.
    fn statuses(
        &self,
        plan: &StagePlan,
        observed: &HashMap<String, ComponentObservation>,
    ) -> Vec<ComponentStatus> {
        let mut statuses = component_statuses(plan, observed);
        for status in &mut statuses {
            if let Some(c) = plan.component(&status.name)
                && holds_devices(plan, c)
            {
                status.devices = c.devices.iter().map(|d| d.name.clone()).collect();
            }
        }
        if let Some(routes) = &self.ingress {
            for status in &mut statuses {
                status.urls = routes.urls(plan, &status.name);
            }
        }
        statuses
    }

    pub fn with_deliveries(mut self, board: Arc<DeliveryBoard>) -> Self {
        self.deliveries = Some(board);
        self
    }

    /// Waits while the hub says the outpost's delivery window is closed,
    /// showing what it waits for. With `recheck`, the hub refused although
    /// it said the window was open: wait for word or `recheck`, whichever
    /// comes first.
    async fn wait_for_window(
        &self,
        stage: &StageKey,
        revision: u64,
        fetched: u64,
        total: u64,
        recheck: Option<Duration>,
    ) {
        let Some(board) = &self.deliveries else {
            if let Some(recheck) = recheck {
                tokio::time::sleep(recheck).await;
            }
            return;
        };
        let mut window = board.window();
        let current = window.borrow_and_update().clone();
        if current.open && recheck.is_none() {
            return;
        }
        let step = if current.open {
            "waiting for delivery window".to_owned()
        } else {
            current.waiting_step()
        };
        self.report_delivery(
            stage,
            Delivery {
                revision,
                fetched,
                total,
                step,
            },
            true,
        );
        match recheck {
            Some(recheck) => {
                let _ = tokio::time::timeout(recheck, window.changed()).await;
            }
            None => {
                // Keeps showing when it opens if the hub moves that.
                loop {
                    if window.changed().await.is_err() {
                        return;
                    }
                    let w = window.borrow_and_update().clone();
                    if w.open {
                        return;
                    }
                    self.report_delivery(
                        stage,
                        Delivery {
                            revision,
                            fetched,
                            total,
                            step: w.waiting_step(),
                        },
                        true,
                    );
                }
            }
        }
    }

    fn report_delivery(&self, stage: &StageKey, delivery: Delivery, last: bool) {
        if let Some(board) = &self.deliveries {
            board.update(stage, delivery, last);
        }
    }

    /// Fetches every artifact of `plan` that this host lacks into the
    /// artifact store. Retries while the hub cannot be reached, for up to
    /// [`DELIVERY_PATIENCE`] without progress.
    async fn deliver(&self, stage: &StageKey, plan: &StagePlan) -> Result<(), String> {
        let Some(artifacts) = &self.artifacts else {
            return Ok(());
        };
        let mut wanted: Vec<(String, u64)> = Vec::new();
        for component in &plan.components {
            let artifact = match &component.workload {
                crate::runtime::Workload::Image {
                    archive: Some(archive),
                    ..
                } => (archive.index.clone(), archive.size),
                crate::runtime::Workload::Package { digest, size, .. } => (digest.clone(), *size),
                crate::runtime::Workload::Image { archive: None, .. } => continue,
            };
            if wanted.iter().any(|(index, _)| *index == artifact.0) {
                continue;
            }
            if let Some(runtime) = self.runtime(component.workload.kind())
                && runtime.has_workload(component).await
            {
                continue;
            }
            wanted.push(artifact);
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let total: u64 = wanted.iter().map(|(_, size)| size).sum();
        let revision = plan.revision;
        let mut before = 0u64;
        for (index, size) in &wanted {
            let mut last_progress = Instant::now();
            let mut backoff = Duration::from_secs(1);
            // The most bytes ever present, across attempts: an attempt made
            // progress only if it got beyond that (each attempt first counts
            // what earlier ones left in the cache).
            let seen = std::sync::atomic::AtomicU64::new(0);
            loop {
                self.wait_for_window(
                    stage,
                    revision,
                    before + seen.load(std::sync::atomic::Ordering::Relaxed),
                    total,
                    None,
                )
                .await;
                let progress = |fetched: u64| {
                    seen.fetch_max(fetched, std::sync::atomic::Ordering::Relaxed);
                    self.report_delivery(
                        stage,
                        Delivery {
                            revision,
                            fetched: before + fetched,
                            total,
                            step: "fetching artifacts".into(),
                        },
                        false,
                    );
                };
                let started_at = seen.load(std::sync::atomic::Ordering::Relaxed);
                match artifacts.fetch(index, &progress).await {
                    Ok(_) => break,
                    Err(e) if e.code == "delivery-window-closed" => {
                        // The hub refused: its window closed before it told
                        // us, or mid-delivery. Wait for word of it opening
                        // (or ask again a while later), without counting
                        // the wait against the delivery's patience.
                        tracing::info!(%stage, reason = %e.message, "the hub holds the delivery back until the outpost's delivery window opens");
                        let fetched = before + seen.load(std::sync::atomic::Ordering::Relaxed);
                        self.wait_for_window(stage, revision, fetched, total, Some(WINDOW_RECHECK))
                            .await;
                        last_progress = Instant::now();
                    }
                    Err(e) if e.code == "artifact-fetch-failed" => {
                        if seen.load(std::sync::atomic::Ordering::Relaxed) > started_at {
                            last_progress = Instant::now();
                            backoff = Duration::from_secs(1);
                        }
                        if last_progress.elapsed() >= DELIVERY_PATIENCE {
                            return Err(format!(
                                "{} (no progress for {} s)",
                                e.sentence(),
                                DELIVERY_PATIENCE.as_secs()
                            ));
                        }
                        tracing::warn!(%stage, error = %e.sentence(), retry_in = ?backoff, "delivery interrupted; trying again");
                        self.report_delivery(
                            stage,
                            Delivery {
                                revision,
                                fetched: before + seen.load(std::sync::atomic::Ordering::Relaxed),
                                total,
                                step: format!("waiting for the hub: {}", e.message),
                            },
                            true,
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => return Err(e.sentence()),
                }
            }
            before += size;
        }
        self.report_delivery(
            stage,
            Delivery {
                revision,
                fetched: total,
                total,
                step: "delivered; starting the release".into(),
            },
            true,
        );
        Ok(())
    }

    /// Frees every artifact in the store that no stage's current or last
    /// good plan needs. Waits for applies in flight to finish first.
    pub async fn collect_garbage(&self) -> Result<CollectReport, String> {
        let guard = self.applying.write().await;
        self.collect_locked(guard).await
    }

    async fn collect_locked(
        &self,
        _guard: tokio::sync::RwLockWriteGuard<'_, ()>,
    ) -> Result<CollectReport, String> {
        let Some(artifacts) = self.artifacts.as_ref().filter(|a| a.is_cache()) else {
            return Ok(CollectReport::default());
        };
        let store = artifacts.store().clone();
        let root = self.root.clone();
        let keep: Vec<String> = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .flat_map(plan_artifacts)
            .collect();
        let seal = self.seal.clone();
        tokio::task::spawn_blocking(move || collect(&store, &root, keep, seal.as_deref()))
            .await
            .map_err(|e| format!("collecting the artifact cache stopped: {e}"))?
    }

    /// The runtime and plan of `component` in the plan `stage` runs now,
    /// for exec and port forwarding; refused when it is not there or is
    /// stopped.
    async fn stream_component(
        &self,
        stage: &StageKey,
        component: &str,
    ) -> Result<(Arc<dyn Runtime>, ComponentPlan), crate::runner::StreamError> {
        let plan = match self.cached_current(stage) {
            Some(plan) => Some(plan),
            None => self.load_plan(stage, CURRENT_PLAN).await,
        };
        let Some(plan) = plan else {
            return Err(crate::runner::stream_error(
                "no-release",
                format!("stage {stage} runs no release on this outpost yet"),
                "push a release to the stage first",
            ));
        };
        let Some(found) = plan.components.iter().find(|c| c.name == component) else {
            let names: Vec<&str> = plan.components.iter().map(|c| c.name.as_str()).collect();
            return Err(crate::runner::stream_error(
                "no-such-component",
                format!(
                    "stage {stage} runs no component {component:?} (it runs {})",
                    names.join(", ")
                ),
                "`trellis list component` shows the stage's components",
            ));
        };
        if found.stopped || plan.suspended {
            return Err(crate::runner::stream_error(
                "component-not-running",
                format!("component {component} of stage {stage} is stopped"),
                "start it with `trellis start component` (or resume the stage) first",
            ));
        }
        let runtime = self
            .runtime(found.workload.kind())
            .cloned()
            .ok_or_else(|| {
                crate::runner::stream_error(
                    "no-runtime",
                    format!(
                        "this outpost has no {} runtime for {component}",
                        found.workload.kind()
                    ),
                    "",
                )
            })?;
        Ok((runtime, found.clone()))
    }

    fn runtime(&self, kind: RuntimeKind) -> Option<&Arc<dyn Runtime>> {
        self.runtimes.iter().find(|r| r.kind() == kind)
    }

    fn stage_dir(&self, stage: &StageKey) -> Result<PathBuf, String> {
        stage_dir_under(&self.root, stage)
    }

    async fn load_plan(&self, stage: &StageKey, name: &'static str) -> Option<StagePlan> {
        if name == CURRENT_PLAN
            && let Some(plan) = self.cached_current(stage)
        {
            return Some(plan);
        }
        let path = self.stage_dir(stage).ok()?.join(name);
        let bytes = tokio::fs::read(&path).await.ok()?;
        let bytes = match &self.seal {
            Some(key) => match crate::seal::open_marked(key, &bytes, &plan_aad(stage, name)) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring a saved plan that does not open");
                    return None;
                }
            },
            None => bytes,
        };
        match serde_json::from_slice(&bytes) {
            Ok(plan) => {
                if name == CURRENT_PLAN {
                    self.cache_current(stage, Some(&plan));
                }
                Some(plan)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable saved plan");
                None
            }
        }
    }

    fn cached_current(&self, stage: &StageKey) -> Option<StagePlan> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(stage)
            .cloned()
    }

    fn cache_current(&self, stage: &StageKey, plan: Option<&StagePlan>) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match plan {
            Some(plan) => current.insert(stage.clone(), plan.clone()),
            None => current.remove(stage),
        };
    }

    async fn save_plan(&self, stage: &StageKey, name: &'static str, plan: &StagePlan) {
        let Ok(dir) = self.stage_dir(stage) else {
            return;
        };
        if name == CURRENT_PLAN {
            self.cache_current(stage, Some(plan));
        }
        let Ok(bytes) = serde_json::to_vec_pretty(plan) else {
            return;
        };
        let bytes = match &self.seal {
            Some(key) => crate::seal::seal_marked(key, &bytes, &plan_aad(stage, name)),
            None => bytes,
        };
        let written =
            tokio::task::spawn_blocking(move || write_atomically(&dir, name, &bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(%stage, file = name, "could not save the stage's plan; a restarted agent may not know what to roll back to");
        }
    }

    /// Why the devices `plan` asks for cannot be had now: a device node
    /// that is not on the host, a runtime that cannot hand a device over,
    /// an exclusive device asked for twice in the plan or held by another
    /// stage (named, so its users know whom to ask).
    async fn device_conflicts(&self, stage: &StageKey, plan: &StagePlan) -> Option<String> {
        let outpost = self.devices.outpost_words();
        for c in plan.components.iter().filter(|c| holds_devices(plan, c)) {
            for device in &c.devices {
                let Some(path) = &device.path else { continue };
                match node_state(Path::new(path)) {
                    NodeState::Present => {}
                    state => {
                        return Some(format!(
                            "component {:?} asks for device {:?}, and {path} {} on the host of {outpost}; \
                             connect the device (or fix the offer: trellis agent run --device {}=PATH) and push the release again",
                            c.name,
                            device.name,
                            if state == NodeState::Missing {
                                "is not there now"
                            } else {
                                "is not a device node"
                            },
                            device.name,
                        ));
                    }
                }
            }
            if let Some(runtime) = self.runtime(c.workload.kind())
                && let Some(why) = runtime.cannot_hold(c)
            {
                return Some(why);
            }
        }
        // Exclusive devices: one replica of one component on the outpost.
        let mut wanted: Vec<(&str, &ComponentPlan)> = Vec::new();
        for c in plan.components.iter().filter(|c| holds_devices(plan, c)) {
            for device in c.devices.iter().filter(|d| d.exclusive) {
                if let Some((_, first)) = wanted.iter().find(|(n, _)| *n == device.name) {
                    return Some(format!(
                        "device {:?} of {outpost} is exclusive, and components {:?} and {:?} both ask for it; \
                         one replica of one component may hold it",
                        device.name, first.name, c.name
                    ));
                }
                if c.replicas > 1 {
                    return Some(format!(
                        "device {:?} of {outpost} is exclusive, and component {:?} asks for it with {} replicas; \
                         one replica may hold it: set scaling.min to 1",
                        device.name, c.name, c.replicas
                    ));
                }
                wanted.push((&device.name, c));
            }
        }
        if wanted.is_empty() {
            return None;
        }
        for other in self.stages_with_plans() {
            if &other == stage {
                continue;
            }
            let Some(held) = self.load_plan(&other, CURRENT_PLAN).await else {
                continue;
            };
            for c in held.components.iter().filter(|c| holds_devices(&held, c)) {
                if let Some((name, asking)) = wanted
                    .iter()
                    .find(|(name, _)| c.devices.iter().any(|d| d.name == *name))
                {
                    return Some(format!(
                        "device {name:?} of {outpost} is exclusive and held by stage {other} \
                         (component {:?}), so component {:?} cannot have it; stop that component \
                         (trellis stop component {} -p {} -s {}) or suspend that stage, then push the release again",
                        c.name, asking.name, c.name, other.project, other.stage
                    ));
                }
            }
        }
        None
    }

    /// The device nodes held by components of `plan` that are no longer on
    /// the host (an unplugged camera), as notices for the stage's errors.
    fn devices_gone(&self, plan: &StagePlan) -> Vec<crate::runner::Notice> {
        let outpost = self.devices.outpost_words();
        let mut out = Vec::new();
        for c in plan.components.iter().filter(|c| holds_devices(plan, c)) {
            for device in &c.devices {
                let Some(path) = &device.path else { continue };
                let state = node_state(Path::new(path));
                if state == NodeState::Present {
                    continue;
                }
                out.push(crate::runner::Notice {
                    code: "device-missing".into(),
                    message: format!(
                        "device {:?} ({path}) held by component {:?} {} on the host of {outpost}",
                        device.name,
                        c.name,
                        if state == NodeState::Missing {
                            "is gone"
                        } else {
                            "is no longer a device node"
                        }
                    ),
                    hint: "reconnect the device; then restart the component \
                           (trellis restart component) if it does not recover by itself"
                        .into(),
                });
            }
        }
        out
    }

    /// Components the runtimes of this host cannot run.
    fn unrunnable(&self, plan: &StagePlan) -> Option<String> {
        let missing: Vec<&str> = plan
            .components
            .iter()
            .filter(|c| self.runtime(c.workload.kind()).is_none())
            .map(|c| c.name.as_str())
            .collect();
        if missing.is_empty() {
            return None;
        }
        Some(format!(
            "component{} {} run{} container images, but this outpost has no container engine \
             (the agent looked at DOCKER_HOST, /run/podman/podman.sock and /var/run/docker.sock); \
             install Podman or Docker on the outpost and restart the agent, or use `process:` components",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            if missing.len() == 1 { "s" } else { "" },
        ))
    }

    /// Plans and applies `plan` on every runtime. Returns the action each
    /// component got.
    async fn run_plan(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
    ) -> Result<HashMap<String, ActionKind>, String> {
        let mut actions = HashMap::new();
        for runtime in &self.runtimes {
            let planned = runtime.plan(stage, plan).await.map_err(|e| {
                format!(
                    "planning {} of stage {stage} failed: {}",
                    runtime.kind(),
                    e.sentence()
                )
            })?;
            for action in &planned {
                tracing::info!(%stage, component = %action.component, action = ?action.kind, reason = %action.reason, "planned");
                actions.insert(action.component.clone(), action.kind);
            }
            runtime.apply(stage, plan, &planned).await.map_err(|e| {
                format!(
                    "applying {} of stage {stage} failed: {}",
                    runtime.kind(),
                    e.sentence()
                )
            })?;
        }
        Ok(actions)
    }

    /// Every component of `stage` as the runtimes see it, by name.
    async fn observe_all(&self, stage: &StageKey) -> HashMap<String, ComponentObservation> {
        let mut all = HashMap::new();
        for runtime in &self.runtimes {
            match runtime.observe(stage).await {
                Ok(list) => {
                    for o in list {
                        all.insert(o.name.clone(), o);
                    }
                }
                Err(e) => {
                    tracing::warn!(%stage, runtime = %runtime.kind(), error = %e.sentence(), "could not observe the stage's components");
                }
            }
        }
        all
    }

    /// Watches `plan` come up; see the module docs.
    async fn wait_until_up(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        baseline: &HashMap<String, u32>,
    ) -> (Verdict, HashMap<String, ComponentObservation>) {
        let deadline = Instant::now() + self.options.health_window;
        let mut up_since: Option<Instant> = None;
        loop {
            let observed = self.observe_all(stage).await;
            self.route(stage, plan, &observed);
            let verdict = judge(plan, &observed, baseline).await;
            let now = Instant::now();
            match &verdict {
                Verdict::Down(_) => return (verdict, observed),
                Verdict::Up => {
                    let since = *up_since.get_or_insert(now);
                    if now.duration_since(since) >= self.options.settle {
                        return (verdict, observed);
                    }
                }
                Verdict::Waiting(_) => up_since = None,
            }
            if now >= deadline {
                let why = match verdict {
                    Verdict::Waiting(why) => why,
                    // Up, but not for the whole settle time before the
                    // window closed: it counts.
                    Verdict::Up => return (Verdict::Up, observed),
                    Verdict::Down(why) => why,
                };
                return (
                    Verdict::Down(format!(
                        "{why} after {} s (the health window)",
                        self.options.health_window.as_secs()
                    )),
                    observed,
                );
            }
            tokio::time::sleep(self.options.probe_interval).await;
        }
    }

    fn outcome(
        &self,
        plan: &StagePlan,
        observed: &HashMap<String, ComponentObservation>,
        ok: bool,
        message: Option<String>,
    ) -> ApplyOutcome {
        let state = if !ok {
            "failed"
        } else if plan.suspended {
            "suspended"
        } else {
            "running"
        };
        ApplyOutcome {
            ok,
            state: state.into(),
            message,
            components: self.statuses(plan, observed),
            rolled_back_to: None,
            notices: Vec::new(),
        }
    }

    async fn apply_plan(&self, stage: &StageKey, plan: StagePlan) -> ApplyOutcome {
        let release = describe_release(&plan);
        let previous_good = self.load_plan(stage, GOOD_PLAN).await;
        let is_new_release = previous_good.as_ref().map(|p| (p.release, &p.build))
            != Some((plan.release, &plan.build));

        let taken = self
            .ingress
            .as_ref()
            .and_then(|routes| routes.host_taken(stage, &plan));
        let refused = match taken.or_else(|| self.unrunnable(&plan)) {
            Some(why) => Some(why),
            None => self.device_conflicts(stage, &plan).await,
        };
        if let Some(why) = refused {
            return ApplyOutcome {
                rolled_back_to: previous_good.as_ref().and_then(|p| p.release),
                ..ApplyOutcome::failed(format!("{release} cannot run here: {why}"))
            };
        }
        if let Err(why) = self.deliver(stage, &plan).await {
            // Nothing was touched: what ran before still runs.
            tracing::warn!(%stage, %why, "{release} was not delivered");
            return ApplyOutcome {
                rolled_back_to: previous_good.as_ref().and_then(|p| p.release),
                ..ApplyOutcome::failed(format!(
                    "{release} was not delivered, so nothing changed on the stage: {why}"
                ))
            };
        }

        // Restart counts of workloads that are kept: a kept component that
        // restarts during the window is as down as a new one.
        let before = self.observe_all(stage).await;
        {
            // Another stage may have taken an exclusive device while this
            // one was delivered: look again, and make this plan the
            // current one before anyone else looks.
            let _claims = self.claims.lock().await;
            if let Some(why) = self.device_conflicts(stage, &plan).await {
                return ApplyOutcome {
                    rolled_back_to: previous_good.as_ref().and_then(|p| p.release),
                    ..ApplyOutcome::failed(format!("{release} cannot run here: {why}"))
                };
            }
            self.save_plan(stage, CURRENT_PLAN, &plan).await;
        }
        let applied = self.run_plan(stage, &plan).await;
        let (verdict, observed) = match applied {
            Ok(actions) => {
                let baseline = actions
                    .iter()
                    .filter(|(_, kind)| **kind == ActionKind::Keep)
                    .filter_map(|(name, _)| before.get(name).map(|o| (name.clone(), o.restarts)))
                    .collect();
                self.wait_until_up(stage, &plan, &baseline).await
            }
            Err(why) => (Verdict::Down(why), self.observe_all(stage).await),
        };

        let why = match verdict {
            Verdict::Up => {
                if let Some(old) = previous_good.as_ref().filter(|_| is_new_release) {
                    self.save_plan(stage, PREVIOUS_PLAN, old).await;
                }
                self.save_plan(stage, GOOD_PLAN, &plan).await;
                let stopped: Vec<&str> = plan
                    .components
                    .iter()
                    .filter(|c| c.stopped)
                    .map(|c| c.name.as_str())
                    .collect();
                let message = if plan.suspended {
                    format!("the stage is suspended: the components of {release} are stopped")
                } else if stopped.is_empty() {
                    format!("{release} is up")
                } else {
                    format!(
                        "{release} is up; stopped on request: {}",
                        stopped.join(", ")
                    )
                };
                return self.outcome(&plan, &observed, true, Some(message));
            }
            Verdict::Down(why) | Verdict::Waiting(why) => why,
        };
        if !is_new_release {
            let mut outcome =
                self.outcome(&plan, &observed, false, Some(format!("{release}: {why}")));
            outcome.rolled_back_to = None;
            return outcome;
        }

        // Roll back: the last good plan, or nothing at all.
        let (restore, back_to) = match previous_good {
            Some(good) => {
                let back = good.release.unwrap_or(0);
                (good, back)
            }
            None => (StagePlan::empty(plan.revision), 0),
        };
        tracing::warn!(%stage, %why, rolled_back_to = back_to, "{release} did not come up; rolling back");
        self.save_plan(stage, CURRENT_PLAN, &restore).await;
        let restored = self.run_plan(stage, &restore).await;
        let now_running = self.observe_all(stage).await;
        self.route(stage, &restore, &now_running);
        let restored = match restored {
            Ok(_) => {
                if back_to == 0 {
                    "nothing ran before it, so the stage now runs nothing".to_owned()
                } else {
                    format!("rolled back to release {back_to}")
                }
            }
            Err(e) => format!("rolling back to release {back_to} failed too: {e}"),
        };
        let mut outcome = self.outcome(
            &plan,
            &observed,
            false,
            Some(format!("{release} did not come up: {why}; {restored}")),
        );
        outcome.rolled_back_to = Some(back_to);
        outcome
    }
}

/// The artifact indexes a plan's components use.
fn plan_artifacts(plan: &StagePlan) -> Vec<String> {
    plan.components
        .iter()
        .filter_map(|c| match &c.workload {
            crate::runtime::Workload::Image {
                archive: Some(archive),
                ..
            } => Some(archive.index.clone()),
            crate::runtime::Workload::Package { digest, .. } => Some(digest.clone()),
            crate::runtime::Workload::Image { archive: None, .. } => None,
        })
        .collect()
}

/// The garbage collection of the artifact store: keeps `keep` and the
/// artifacts of every saved plan under `root`, frees every other chunk.
/// Blocking; runs while no apply is in flight.
fn collect(
    store: &trellis_cas::ChunkStore,
    root: &Path,
    mut keep: Vec<String>,
    seal: Option<&crate::seal::SealKey>,
) -> Result<CollectReport, String> {
    // <root>/<project>/<stage>/{current,good}.json
    for project in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for stage in std::fs::read_dir(project.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for name in [CURRENT_PLAN, GOOD_PLAN, PREVIOUS_PLAN] {
                let Ok(bytes) = std::fs::read(stage.path().join(name)) else {
                    continue;
                };
                let key = StageKey::new(
                    project.file_name().to_string_lossy(),
                    stage.file_name().to_string_lossy(),
                );
                let bytes = match seal {
                    Some(seal) => crate::seal::open_marked(seal, &bytes, &plan_aad(&key, name))
                        .map_err(|e| format!("{}: {e}", stage.path().join(name).display()))?,
                    None => bytes,
                };
                match serde_json::from_slice::<StagePlan>(&bytes) {
                    Ok(plan) => keep.extend(plan_artifacts(&plan)),
                    // A plan we cannot read may still name what runs: keep
                    // everything rather than guess.
                    Err(e) => {
                        return Err(format!(
                            "{} cannot be read ({e}); nothing was collected",
                            stage.path().join(name).display()
                        ));
                    }
                }
            }
        }
    }
    let mut live = std::collections::HashSet::new();
    for index in keep {
        let Ok(digest) = index.parse::<trellis_cas::Digest>() else {
            continue;
        };
        live.insert(digest);
        if let Ok(artifact) = store.artifact(&digest) {
            live.extend(artifact.chunks.iter().map(|c| c.digest));
        }
    }
    // Chunks cut off by a delivery that stopped wait in `tmp/` to be
    // resumed; after a day nobody will.
    let day = Duration::from_secs(24 * 3600);
    for entry in std::fs::read_dir(store.tmp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > day);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let chunks = store.list().map_err(|e| e.to_string())?;
    let mut report = CollectReport::default();
    for chunk in chunks {
        if live.contains(&chunk.digest) {
            report.kept += 1;
            continue;
        }
        if store.remove(&chunk.digest).unwrap_or(false) {
            report.freed += 1;
            report.freed_bytes += chunk.stored;
        }
    }
    Ok(report)
}

/// "release 3 (build main_b2)" for messages.
fn describe_release(plan: &StagePlan) -> String {
    match (plan.release, &plan.build) {
        (Some(n), Some(b)) => format!("release {n} (build {b})"),
        (Some(n), None) => format!("release {n}"),
        _ => format!("revision {}", plan.revision),
    }
}

/// Whether a component counts for health: it should be running all the
/// time (not stopped, not a scheduled job, not scaled to zero).
fn runs_continuously(c: &ComponentPlan) -> bool {
    !c.stopped && c.schedule.is_none() && c.replicas > 0
}

/// Whether `c` holds its devices under `plan`: it may run (not stopped,
/// the stage not suspended, scaled above zero or scheduled).
fn holds_devices(plan: &StagePlan, c: &ComponentPlan) -> bool {
    !c.devices.is_empty()
        && !plan.suspended
        && !c.stopped
        && (c.replicas > 0 || c.schedule.is_some())
}

/// The health verdict of `plan` given what runs.
async fn judge(
    plan: &StagePlan,
    observed: &HashMap<String, ComponentObservation>,
    baseline: &HashMap<String, u32>,
) -> Verdict {
    let mut waiting = None;
    for c in plan.components.iter() {
        let Some(o) = observed.get(&c.name) else {
            if runs_continuously(c) {
                waiting.get_or_insert_with(|| format!("component {} has not been created", c.name));
            }
            continue;
        };
        if !runs_continuously(c) {
            continue;
        }
        if o.state == ComponentState::Failed {
            return Verdict::Down(format!(
                "component {} failed: {}",
                c.name,
                o.message.as_deref().unwrap_or("no reason given")
            ));
        }
        let before = baseline.get(&c.name).copied().unwrap_or(0);
        let restarted = o.restarts > before;
        if restarted && o.exit_code.is_none() && o.restarts == before + 1 {
            // An engine restarts a container at once and reports the code
            // of its exit only in an event, which can arrive a moment after
            // the restart is seen: the next look has it. (A process always
            // has one: a signal counts as 128 + its number.) Should the
            // event be lost, the next restart or the health window decides.
            waiting.get_or_insert_with(|| {
                format!(
                    "component {} restarted (waiting for its exit code or another restart)",
                    c.name
                )
            });
            continue;
        }
        if o.state == ComponentState::CrashLooping || restarted {
            return Verdict::Down(format!(
                "component {} {} (restarted {} time{})",
                c.name,
                match o.exit_code {
                    Some(code) => format!("exited with code {code}"),
                    None => "exited".to_owned(),
                },
                o.restarts,
                if o.restarts == 1 { "" } else { "s" }
            ));
        }
        if o.state != ComponentState::Running || o.replicas_running < c.replicas {
            waiting.get_or_insert_with(|| {
                format!(
                    "component {} is {} ({} of {} replicas running)",
                    c.name,
                    o.state.as_str(),
                    o.replicas_running,
                    c.replicas
                )
            });
            continue;
        }
        if let (Some(port), Some(endpoint)) = (c.first_port(), o.endpoint)
            && !answers(endpoint).await
        {
            waiting.get_or_insert_with(|| {
                format!("component {} does not answer on port {port}", c.name)
            });
        }
    }
    match waiting {
        Some(why) => Verdict::Waiting(why),
        None => Verdict::Up,
    }
}

/// Whether something accepts TCP connections at `addr`.
async fn answers(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// The status of each planned component (and of workloads the plan no
/// longer has, while they exist), in plan order.
fn component_statuses(
    plan: &StagePlan,
    observed: &HashMap<String, ComponentObservation>,
) -> Vec<ComponentStatus> {
    let mut out: Vec<ComponentStatus> = plan
        .components
        .iter()
        .map(|c| match observed.get(&c.name) {
            Some(o) => to_status(o, c.replicas),
            None => ComponentStatus {
                name: c.name.clone(),
                state: if c.stopped { "stopped" } else { "missing" }.into(),
                replicas: c.replicas,
                ..Default::default()
            },
        })
        .collect();
    let mut extra: Vec<&ComponentObservation> = observed
        .values()
        .filter(|o| plan.component(&o.name).is_none())
        .collect();
    extra.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(extra.into_iter().map(|o| to_status(o, o.replicas_desired)));
    out
}

fn to_status(o: &ComponentObservation, replicas: u32) -> ComponentStatus {
    ComponentStatus {
        name: o.name.clone(),
        state: o.state.as_str().into(),
        restarts: o.restarts,
        exit_code: o.exit_code,
        replicas,
        running: o.replicas_running,
        since: o.since,
        release: o.release,
        ids: o.ids.clone(),
        last_run: o.last_run,
        next_run: o.next_run,
        message: o.message.clone(),
        // The deployer adds them: it knows the plan's ingresses and
        // devices.
        urls: Vec::new(),
        devices: Vec::new(),
    }
}

#[async_trait]
impl StageRunner for Deployer {
    async fn volumes(&self, stage: &StageKey) -> Result<Vec<(String, std::path::PathBuf)>, String> {
        let mut all = Vec::new();
        for runtime in &self.runtimes {
            all.extend(runtime.volumes(stage).await.map_err(|e| e.to_string())?);
        }
        all.sort();
        Ok(all)
    }

    async fn exec(
        &self,
        stage: &StageKey,
        request: crate::runner::ExecRequest,
    ) -> Result<crate::runner::ExecProcess, crate::runner::StreamError> {
        let (runtime, component) = self.stream_component(stage, &request.component).await?;
        runtime.exec(stage, &component, request).await
    }

    async fn connect(
        &self,
        stage: &StageKey,
        component: &str,
        replica: Option<u32>,
        port: u16,
    ) -> Result<tokio::net::TcpStream, crate::runner::StreamError> {
        let (runtime, component) = self.stream_component(stage, component).await?;
        if !component.ports.contains(&port) {
            let ports: Vec<String> = component.ports.iter().map(u16::to_string).collect();
            return Err(crate::runner::stream_error(
                "port-not-exposed",
                format!(
                    "component {} does not expose port {port}{}",
                    component.name,
                    if ports.is_empty() {
                        " (its manifest lists no ports)".to_owned()
                    } else {
                        format!(" (its ports: {})", ports.join(", "))
                    }
                ),
                "forward one of the ports the manifest lists for it",
            ));
        }
        runtime.connect(stage, &component, replica, port).await
    }

    fn describe(&self) -> Vec<RuntimeInfo> {
        self.runtimes.iter().map(|r| r.describe()).collect()
    }

    fn devices(&self) -> Vec<DeviceOffer> {
        self.devices.wire()
    }

    async fn apply(
        &self,
        stage: &StageKey,
        revision: u64,
        desired: &serde_json::Value,
    ) -> ApplyOutcome {
        if let Err(why) = self.stage_dir(stage) {
            return ApplyOutcome::failed(why);
        }
        // Planned before anything is awaited: the context is not `Send`.
        let planned = {
            let address_of =
                |name: &str, kind: RuntimeKind, port: Option<u16>| match self.runtime(kind) {
                    Some(runtime) => runtime.address_of(name, port),
                    None => name.to_owned(),
                };
            let ctx = PlanContext {
                arch: &self.options.arch,
                address_of: &address_of,
                devices: &self.devices,
            };
            plan_from_desired(revision, desired, &ctx)
        };
        match planned {
            Ok(mut plan) => {
                let notices = std::mem::take(&mut plan.notices);
                let applying = self.applying.read().await;
                let mut outcome = self.apply_plan(stage, plan).await;
                outcome.notices = notices;
                drop(applying);
                if let Some(board) = &self.deliveries {
                    board.finish(stage);
                }
                // Another stage's apply in flight collects when it ends.
                let Ok(guard) = self.applying.try_write() else {
                    return outcome;
                };
                match self.collect_locked(guard).await {
                    Ok(report) if report.freed > 0 => tracing::info!(
                        freed = report.freed,
                        bytes = report.freed_bytes,
                        "freed artifacts no release here needs"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not collect the artifact cache"),
                }
                outcome
            }
            Err(e) => {
                // Nothing was touched: what ran before still runs, and the
                // report says so (its components, not an empty stage).
                let good = self.load_plan(stage, GOOD_PLAN).await;
                let components = match self.load_plan(stage, CURRENT_PLAN).await {
                    Some(current) => component_statuses(&current, &self.observe_all(stage).await),
                    None => Vec::new(),
                };
                ApplyOutcome {
                    rolled_back_to: good.and_then(|p| p.release),
                    components,
                    ..ApplyOutcome::failed(format!("revision {revision} cannot be run: {e}"))
                }
            }
        }
    }

    async fn remove(&self, stage: &StageKey) -> Result<(), String> {
        let dir = self.stage_dir(stage)?;
        self.cache_current(stage, None);
        if let Some(routes) = &self.ingress {
            routes.forget(stage);
        }
        let mut failures = Vec::new();
        for runtime in &self.runtimes {
            if let Err(e) = runtime.remove(stage).await {
                failures.push(format!("{}: {}", runtime.kind(), e.sentence()));
            }
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => failures.push(format!("could not remove {}: {e}", dir.display())),
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "removing stage {stage} left things behind: {}",
                failures.join("; ")
            ))
        }
    }

    async fn observe(&self, stage: &StageKey, _revision: u64) -> Option<ApplyOutcome> {
        let plan = self.load_plan(stage, CURRENT_PLAN).await?;
        let observed = self.observe_all(stage).await;
        self.route(stage, &plan, &observed);
        let components = self.statuses(&plan, &observed);
        let troubled: Vec<&ComponentStatus> = components
            .iter()
            .filter(|c| matches!(c.state.as_str(), "crash-looping" | "failed" | "missing"))
            .filter(|c| plan.component(&c.name).is_some_and(runs_continuously))
            .collect();
        let mut problems: Vec<String> = troubled
            .iter()
            .map(|c| match (&c.message, c.exit_code) {
                (Some(m), _) => format!("component {} is {}: {m}", c.name, c.state),
                (None, Some(code)) => format!(
                    "component {} is {} (last exit code {code}, {} restarts)",
                    c.name, c.state, c.restarts
                ),
                (None, None) => format!("component {} is {}", c.name, c.state),
            })
            .collect();
        let notices = self.devices_gone(&plan);
        problems.extend(notices.iter().map(|n| n.message.clone()));
        let (state, message) = if plan.suspended {
            ("suspended", None)
        } else if problems.is_empty() {
            ("running", None)
        } else {
            ("degraded", Some(problems.join("; ")))
        };
        Some(ApplyOutcome {
            ok: true,
            state: state.into(),
            message,
            components,
            rolled_back_to: None,
            notices,
        })
    }

    async fn logs(
        &self,
        stage: &StageKey,
        query: &LogQuery,
        sink: mpsc::Sender<LogLine>,
    ) -> Result<(), String> {
        self.stage_dir(stage)?;
        let plan = self.load_plan(stage, CURRENT_PLAN).await;
        let runtimes: Vec<&Arc<dyn Runtime>> = match (&query.component, &plan) {
            (Some(name), Some(plan)) => match plan.component(name) {
                Some(c) => self.runtime(c.workload.kind()).into_iter().collect(),
                None => {
                    return Err(format!(
                        "stage {stage} has no component {name:?}; it has {}",
                        plan.components
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            },
            _ => self.runtimes.iter().collect(),
        };
        let runs = runtimes.into_iter().map(|runtime| {
            let sink = sink.clone();
            async move { runtime.logs(stage, query, sink).await }
        });
        let results = futures_util::future::join_all(runs).await;
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.sentence()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}
