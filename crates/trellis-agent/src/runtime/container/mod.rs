//! The container runtime: Docker Engine API — Docker, or Podman's API
//! service — over the engine's unix socket (BRIEF §5).
//!
//! Per stage it makes
//! - one **network** (`trellis-<project>_<stage>`, DNS on) on which every
//!   container of a component answers to the component's name, so a
//!   `component-ref` is the bare component name ([`Runtime::address_of`]);
//!   stages do not share networks, so they cannot reach each other by name;
//!   its bridge keeps one hardware address ([`bridge`]);
//! - **containers** `trellis-<project>_<stage>_<component>-<n>`, one per
//!   replica (`scaling.min`), with the component's env, command (entrypoint),
//!   args (cmd), user, CPU and memory limits, restart policy
//!   `unless-stopped` so they keep running while the agent is down;
//! - **named volumes** per component storage entry
//!   (`trellis-<project>_<stage>_<component>_<storage>`) that outlive releases
//!   and go only with [`Runtime::remove`]; `temporary`/`memory` storage is a
//!   tmpfs;
//! - the component's **files**, written under
//!   `<data>/container/<project>/<stage>/files/…` (see [`files`]) and
//!   bind-mounted read-only;
//! - **published ports** on the first replica when the outpost publishes
//!   ([`PublishPolicy`]), on the same host port.
//!
//! Everything carries `io.trellis.*` labels ([`naming`]); the runtime finds
//! its objects by label, which is how a restarted agent adopts running
//! containers without restarting them. Scheduled components are run by
//! [`jobs`]; why a component could not be started, and how jobs went, is
//! kept in [`state`].

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{NetworkCreateRequest, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, RemoveContainerOptions,
    RemoveVolumeOptions, StopContainerOptions,
};
use chrono::Utc;
use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trellis_link::protocol::RuntimeInfo;
use trellis_model::NameKind;
use trellis_model::manifest::StorageKind;

use self::bridge::BridgePins;
use self::diff::{FoundContainer, Wanted};
use self::engine::{Engine, Inspected, Listed, engine_error, message_of, status_of};
use self::exits::ExitLog;
use self::jobs::JobSpec;
use self::state::{Failure, StageStore};
use super::artifacts::ArtifactSource;
use super::{
    Action, ActionKind, ComponentObservation, ComponentPlan, LogLine, LogQuery, Runtime,
    RuntimeError, RuntimeKind, StagePlan, Traffic, Workload,
};
use crate::state::StageKey;

mod bridge;
pub mod diff;
mod engine;
pub(crate) mod exec;
mod exits;
pub mod files;
mod jobs;
mod logs;
pub mod naming;
mod observe;
mod spec;
pub mod state;

/// Sockets tried, in order, when neither the caller nor `DOCKER_HOST`
/// names one.
pub const DEFAULT_SOCKETS: &[&str] = &["/run/podman/podman.sock", "/var/run/docker.sock"];

/// How an outpost publishes its components' ports on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishPolicy {
    /// Publish each component's ports (first replica, same port number).
    pub publish: bool,
    /// The host address they are published on.
    pub host_ip: String,
}

impl Default for PublishPolicy {
    fn default() -> Self {
        PublishPolicy {
            publish: false,
            host_ip: "127.0.0.1".to_owned(),
        }
    }
}

impl PublishPolicy {
    /// Publishes on `host_ip` (e.g. `127.0.0.1`, or `0.0.0.0` for every
    /// address of the host).
    pub fn on(host_ip: impl Into<String>) -> Self {
        PublishPolicy {
            publish: true,
            host_ip: host_ip.into(),
        }
    }

    /// Publishes nothing.
    pub fn off() -> Self {
        PublishPolicy::default()
    }
}

/// The container runtime; see the module docs.
pub struct ContainerRuntime {
    engine: Engine,
    outpost: String,
    /// `<data>/container`.
    root: PathBuf,
    publish: PublishPolicy,
    stop_timeout: Duration,
    retry_delay: Duration,
    pull_timeout: Duration,
    stages: Mutex<HashMap<StageKey, Arc<StageCtl>>>,
    /// Where images stored on the hub come from.
    artifacts: Option<Arc<dyn ArtifactSource>>,
    /// The outpost's entry point, when it serves one: components behind it
    /// are replaced beside their old replicas, without a gap.
    traffic: Option<Arc<dyn Traffic>>,
    /// Stage network bridges whose hardware address must not change.
    bridges: BridgePins,
    /// The exit codes of containers the engine restarted, and the task
    /// that follows the engine's events into it.
    exits: ExitLog,
    exit_watch: JoinHandle<()>,
}

/// How long the new replicas of a component replaced beside its old ones
/// have to answer on their ingress port; the old ones serve meanwhile, and
/// keep serving if they do not.
const SURGE_READY: Duration = Duration::from_secs(60);

/// How long requests still open to replaced replicas may take to finish
/// before those replicas are stopped.
const SURGE_DRAIN: Duration = Duration::from_secs(10);

/// What a replacement beside the old replicas needs.
struct Surge<'a> {
    traffic: &'a dyn Traffic,
    /// The port the entry point sends the component's requests to.
    port: u16,
    config_hash: &'a str,
    mounts: &'a [(PathBuf, String)],
}

/// How a new container is made: the config hash it is labelled with, the
/// files mounted into it, and whether it starts beside a replica it
/// replaces (so it needs a name of its own).
struct Made<'a> {
    config_hash: &'a str,
    mounts: &'a [(PathBuf, String)],
    beside: bool,
}

/// A container's address on its stage's network.
fn address_on(stage: &StageKey, c: &Inspected) -> Option<IpAddr> {
    c.network
        .networks
        .get(&naming::network_name(stage))?
        .ip_address
        .parse()
        .ok()
}

/// What the runtime holds per stage.
struct StageCtl {
    /// Serialises apply and remove of the stage.
    lock: tokio::sync::Mutex<()>,
    store: Arc<StageStore>,
    /// Scheduled components' tasks, by component.
    jobs: Mutex<HashMap<String, RunningJob>>,
}

struct RunningJob {
    container_id: String,
    task: JoinHandle<()>,
}

impl StageCtl {
    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningJob>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop_job(&self, component: &str) {
        if let Some(job) = self.jobs().remove(component) {
            job.task.abort();
        }
    }

    fn stop_jobs(&self) {
        for (_, job) in self.jobs().drain() {
            job.task.abort();
        }
    }
}

impl std::fmt::Debug for ContainerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerRuntime")
            .field("engine", &self.engine.kind)
            .field("version", &self.engine.version)
            .field("outpost", &self.outpost)
            .field("root", &self.root)
            .field("publish", &self.publish)
            .finish()
    }
}

impl Drop for ContainerRuntime {
    fn drop(&mut self) {
        self.exit_watch.abort();
        // Jobs belong to this instance; containers keep running.
        for ctl in self.stages_map().values() {
            ctl.stop_jobs();
        }
    }
}

impl ContainerRuntime {
    /// Connects to the engine at `docker_host` (`unix:///path`), else at
    /// `DOCKER_HOST`, else at the first of [`DEFAULT_SOCKETS`] that exists;
    /// checks that it answers. `outpost` names this outpost on the labels;
    /// the runtime keeps its files under `<data_dir>/container`.
    pub async fn connect(
        docker_host: Option<&str>,
        outpost: &str,
        data_dir: &Path,
        publish: PublishPolicy,
    ) -> Result<ContainerRuntime, RuntimeError> {
        naming::check_name(NameKind::Outpost, outpost)?;
        let host = match docker_host {
            Some(host) => host.to_owned(),
            None => default_host()?,
        };
        let engine = Engine::connect(&host).await?;
        let exits = ExitLog::default();
        let exit_watch = tokio::spawn(exits::watch(engine.clone(), exits.clone()));
        Ok(ContainerRuntime {
            engine,
            exits,
            exit_watch,
            outpost: outpost.to_owned(),
            root: data_dir.join("container"),
            publish,
            stop_timeout: Duration::from_secs(10),
            retry_delay: Duration::from_secs(10),
            pull_timeout: Duration::from_secs(600),
            stages: Mutex::new(HashMap::new()),
            artifacts: None,
            traffic: None,
            bridges: BridgePins::default(),
        })
    }

    /// Loads images that builds carry (stored on the hub) from `artifacts`.
    /// Without a source, such images must already be on the engine.
    pub fn with_artifacts(mut self, artifacts: Arc<dyn ArtifactSource>) -> Self {
        self.artifacts = Some(artifacts);
        self
    }

    /// Replaces components behind the outpost's entry point beside their
    /// old replicas, moving their requests over once the new ones answer.
    pub fn with_traffic(mut self, traffic: Arc<dyn Traffic>) -> Self {
        self.traffic = Some(traffic);
        self
    }

    /// [`ContainerRuntime::connect`] to the default engine, or `None` when
    /// no engine answers (this outpost then has no container runtime).
    pub async fn detect(
        outpost: &str,
        data_dir: &Path,
        publish: PublishPolicy,
    ) -> Option<ContainerRuntime> {
        match ContainerRuntime::connect(None, outpost, data_dir, publish).await {
            Ok(runtime) => Some(runtime),
            Err(e) => {
                tracing::info!(error = %e.sentence(), "no container engine found");
                None
            }
        }
    }

    /// How long a container gets between the stop signal and the kill
    /// (default 10 s).
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// The pause before the first retry of a failed scheduled run (the
    /// n-th waits n times as long, at most five minutes; default 10 s).
    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// How long pulling an image may take (default 10 min).
    pub fn with_pull_timeout(mut self, timeout: Duration) -> Self {
        self.pull_timeout = timeout;
        self
    }

    /// `podman` or `docker`.
    pub fn engine_name(&self) -> &'static str {
        self.engine.kind.as_str()
    }

    fn stages_map(&self) -> std::sync::MutexGuard<'_, HashMap<StageKey, Arc<StageCtl>>> {
        self.stages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stage_dir(&self, stage: &StageKey) -> PathBuf {
        self.root.join(&stage.project).join(&stage.stage)
    }

    fn ctl(&self, stage: &StageKey) -> Arc<StageCtl> {
        let mut stages = self.stages_map();
        stages
            .entry(stage.clone())
            .or_insert_with(|| {
                Arc::new(StageCtl {
                    lock: tokio::sync::Mutex::new(()),
                    store: Arc::new(StageStore::load(self.stage_dir(stage).join("state.json"))),
                    jobs: Mutex::new(HashMap::new()),
                })
            })
            .clone()
    }

    fn stage_filters(&self, stage: &StageKey) -> Vec<String> {
        naming::label_filters(&self.outpost, Some(stage))
    }

    fn component_filters(&self, stage: &StageKey, component: &str) -> Vec<String> {
        let mut filters = self.stage_filters(stage);
        filters.push(format!("{}={component}", naming::COMPONENT));
        filters
    }

    /// The stage's containers as the planner sees them.
    async fn found(&self, stage: &StageKey) -> Result<Vec<FoundContainer>, RuntimeError> {
        let listed = self.engine.containers(&self.stage_filters(stage)).await?;
        Ok(listed
            .iter()
            .filter_map(|c| {
                // A container the engine is restarting counts as running:
                // the engine takes care of it.
                let running = matches!(c.state.as_str(), "running" | "restarting");
                FoundContainer::from_labels(&c.id, c.name(), &c.labels, running)
            })
            .collect())
    }

    fn wanted<'a>(&self, plan: &'a StagePlan) -> Vec<Wanted<'a>> {
        plan.of_kind(RuntimeKind::Container)
            .map(|c| Wanted {
                plan: c,
                config_hash: naming::config_hash(c, plan.release, &self.publish),
            })
            .collect()
    }

    async fn ensure_network(&self, stage: &StageKey) -> Result<(), RuntimeError> {
        let name = naming::network_name(stage);
        if let Some(found) = self.engine.network(&name).await? {
            if naming::belongs_to(&found.labels, &self.outpost, stage) {
                return Ok(());
            }
            return Err(RuntimeError::new(
                "network-conflict",
                format!(
                    "a network named {name} exists on this host but is not stage {stage}'s of outpost {}",
                    self.outpost
                ),
            )
            .with_hint(format!(
                "remove it (`{} network rm {name}`) if nothing uses it, then deploy again",
                self.engine_name()
            )));
        }
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".to_owned()),
            internal: Some(false),
            labels: Some(naming::stage_labels(&self.outpost, stage)),
            ..Default::default()
        };
        match self.engine.docker.create_network(request).await {
            Ok(_) => Ok(()),
            // Made in the meantime (another apply): check it is ours.
            Err(e) if status_of(&e) == Some(409) => match self.engine.network(&name).await? {
                Some(n) if naming::belongs_to(&n.labels, &self.outpost, stage) => Ok(()),
                _ => Err(engine_error(
                    "network-create-failed",
                    &format!("creating network {name} for stage {stage}"),
                    &e,
                )),
            },
            Err(e) => Err(engine_error(
                "network-create-failed",
                &format!("creating network {name} for stage {stage}"),
                &e,
            )
            .with_hint("check the engine's network configuration (netavark/CNI for Podman)")),
        }
    }

    async fn ensure_volumes(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
    ) -> Result<(), RuntimeError> {
        for volume in &component.volumes {
            if !matches!(volume.kind, StorageKind::Standard | StorageKind::Premium) {
                continue;
            }
            naming::check_name(NameKind::Storage, &volume.name)?;
            let name = naming::volume_name(stage, &component.name, &volume.name);
            if let Some(found) = self.engine.volume(&name).await? {
                if naming::belongs_to(&found.labels, &self.outpost, stage)
                    && found.labels.get(naming::COMPONENT) == Some(&component.name)
                {
                    continue;
                }
                return Err(RuntimeError::new(
                    "volume-conflict",
                    format!(
                        "a volume named {name} exists on this host but is not component {:?}'s of stage {stage}",
                        component.name
                    ),
                )
                .with_hint(format!(
                    "move its data away and remove it (`{} volume rm {name}`), then deploy again",
                    self.engine_name()
                )));
            }
            let request = VolumeCreateRequest {
                name: Some(name.clone()),
                driver: Some("local".to_owned()),
                labels: Some(naming::volume_labels(
                    &self.outpost,
                    stage,
                    &component.name,
                    &volume.name,
                )),
                ..Default::default()
            };
            if let Err(e) = self.engine.docker.create_volume(request).await {
                return Err(engine_error(
                    "volume-create-failed",
                    &format!(
                        "creating volume {name} for storage {:?} of component {:?}",
                        volume.name, component.name
                    ),
                    &e,
                )
                .with_hint("check the free space and the engine's storage configuration"));
            }
        }
        Ok(())
    }

    /// Makes sure the component's image is on this host, pulling it if
    /// needed.
    async fn ensure_image(&self, component: &ComponentPlan) -> Result<(), RuntimeError> {
        let Workload::Image {
            reference,
            platform,
            archive,
        } = &component.workload
        else {
            return Err(RuntimeError::new(
                "wrong-runtime",
                format!(
                    "component {:?} is not a container component",
                    component.name
                ),
            ));
        };
        if reference.is_empty()
            || !reference
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
        {
            return Err(RuntimeError::new(
                "image-invalid",
                format!(
                    "component {:?} names the image {reference:?}, which is not an image reference",
                    component.name
                ),
            ));
        }
        if let Some(archive) = archive {
            return self.load_archive(component, archive).await;
        }
        if self.engine.image_exists(reference).await? {
            return Ok(());
        }
        let why =
            match tokio::time::timeout(self.pull_timeout, self.pull(reference, platform)).await {
                Ok(Ok(())) if self.engine.image_exists(reference).await? => return Ok(()),
                Ok(Ok(())) => "the pull ended without the image".to_owned(),
                Ok(Err(why)) => why,
                Err(_) => format!("the pull took longer than {:?}", self.pull_timeout),
            };
        Err(RuntimeError::new(
            "image-missing",
            format!(
                "image {reference:?} of component {:?} is not on this outpost and could not be pulled: {why}",
                component.name
            ),
        )
        .with_hint(format!(
            "load it with `{0} load` (e.g. `{0} save {reference} | ssh outpost {0} load`), or let the outpost reach its registry",
            self.engine_name()
        )))
    }

    /// Makes sure the image a build stored on the hub is on the engine:
    /// fetches its archive's chunks (usually delivered already, before the
    /// apply started) and loads it, streaming the verified archive into the
    /// engine. Nothing is loaded from a chunk that does not verify.
    async fn load_archive(
        &self,
        component: &ComponentPlan,
        archive: &trellis_model::ImageArchive,
    ) -> Result<(), RuntimeError> {
        if self.engine.image_exists(&archive.image_id).await? {
            return Ok(());
        }
        let Some(artifacts) = &self.artifacts else {
            return Err(RuntimeError::new(
                "image-missing",
                format!(
                    "image {} of component {:?} is not on this outpost's engine, and this agent has no artifact source to load it from",
                    archive.image_id, component.name
                ),
            ));
        };
        let index_digest = super::artifacts::parse_digest(&archive.index)?;
        let index = artifacts.fetch(&archive.index, &|_| {}).await?;
        let reader = artifacts.store().open_artifact(&index_digest, &index);
        let (rx, feeder) = super::artifacts::stream_artifact(reader);
        let options = bollard::query_parameters::ImportImageOptions {
            quiet: true,
            platform: None,
        };
        let mut progress = self.engine.docker.import_image_stream(
            options,
            futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            }),
            None,
        );
        let mut engine_error = None;
        while let Some(step) = progress.next().await {
            if let Err(e) = step {
                engine_error = Some(message_of(&e));
                break;
            }
        }
        drop(progress);
        let fed = feeder.await.unwrap_or_else(|e| Err(e.to_string()));
        if let Err(why) = fed {
            return Err(RuntimeError::new(
                "artifact-corrupt",
                format!(
                    "the image of component {:?} was not loaded: its archive failed verification ({why})",
                    component.name
                ),
            )
            .with_hint("the damaged chunk was reported; the next apply fetches it again"));
        }
        if let Some(why) = engine_error {
            return Err(RuntimeError::new(
                "image-load-failed",
                format!(
                    "the engine refused the image of component {:?}: {why}",
                    component.name
                ),
            ));
        }
        if !self.engine.image_exists(&archive.image_id).await? {
            return Err(RuntimeError::new(
                "image-load-failed",
                format!(
                    "the engine loaded the archive of component {:?} but has no image {} afterwards",
                    component.name, archive.image_id
                ),
            )
            .with_hint("the build's image id does not match its archive; push the build again"));
        }
        Ok(())
    }

    async fn pull(&self, reference: &str, platform: &Option<String>) -> Result<(), String> {
        let (repository, tag) = split_reference(reference);
        let options = CreateImageOptions {
            from_image: Some(repository.to_owned()),
            tag: Some(tag.to_owned()),
            platform: platform.clone().unwrap_or_default(),
            ..Default::default()
        };
        let mut progress = self.engine.docker.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            match step {
                Ok(info) => {
                    if let Some(error) = info.error_detail.and_then(|d| d.message) {
                        return Err(error);
                    }
                }
                Err(e) => return Err(message_of(&e)),
            }
        }
        Ok(())
    }

    async fn stop_container(&self, id: &str) -> Result<(), RuntimeError> {
        let options = StopContainerOptions {
            t: Some(i32::try_from(self.stop_timeout.as_secs()).unwrap_or(i32::MAX)),
            signal: None,
        };
        match self.engine.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: not running; 404: gone.
            Err(e) if matches!(status_of(&e), Some(304 | 404)) => Ok(()),
            Err(e) => Err(engine_error(
                "container-stop-failed",
                "stopping a container",
                &e,
            )),
        }
    }

    /// Ends a container at once: the engine's kill (SIGKILL), no grace
    /// period (`trellis stop component --kill`).
    async fn kill_container(&self, id: &str) -> Result<(), RuntimeError> {
        let options = KillContainerOptions {
            signal: "SIGKILL".into(),
        };
        match self.engine.docker.kill_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 404: gone; 409: not running.
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(engine_error(
                "container-kill-failed",
                "killing a container",
                &e,
            )),
        }
    }

    async fn stop_and_remove(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        if let Err(e) = self.stop_container(id).await {
            tracing::warn!(container = name, error = %e.sentence(), "could not stop; removing by force");
        }
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match self.engine.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(engine_error(
                "container-remove-failed",
                &format!("removing container {name}"),
                &e,
            )),
        }
    }

    /// Stops (all at once: each may take the whole stop timeout) and
    /// removes `containers`.
    async fn stop_and_remove_all(&self, containers: &[&Listed]) -> Result<(), RuntimeError> {
        let removals = containers
            .iter()
            .map(|c| self.stop_and_remove(&c.id, c.name()));
        join_all(removals).await.into_iter().collect()
    }

    /// Creates and starts what `kind` asks for one component.
    async fn apply_component(
        &self,
        stage: &StageKey,
        ctl: &StageCtl,
        plan: &StagePlan,
        component: &ComponentPlan,
        kind: ActionKind,
    ) -> Result<(), RuntimeError> {
        naming::check_name(NameKind::Component, &component.name)?;
        let listed = self
            .engine
            .containers(&self.component_filters(stage, &component.name))
            .await?;
        match kind {
            ActionKind::Keep => return Ok(()),
            ActionKind::Stop => {
                ctl.stop_job(&component.name);
                // Every replica, running or not: a crash-looping one may be
                // between two restarts.
                let stops = listed.iter().map(|c| async {
                    if component.killed {
                        self.kill_container(&c.id).await
                    } else {
                        self.stop_container(&c.id).await
                    }
                });
                return join_all(stops).await.into_iter().collect();
            }
            ActionKind::Remove => return Ok(()),
            ActionKind::Create | ActionKind::Replace | ActionKind::Restart => {}
        }

        // Everything the new containers need, before the old ones go: a
        // missing image leaves the running release alone.
        self.ensure_image(component).await?;
        self.ensure_volumes(stage, component).await?;
        let component_dir = self.stage_dir(stage).join("files").join(&component.name);
        let files_dir = component_dir.join(&component.spec_hash);
        let mounts = files::write_files(&component.name, &files_dir, &component.files)?;

        let replicas = naming::replicas_of(component);
        let config_hash = naming::config_hash(component, plan.release, &self.publish);
        let recreate = matches!(kind, ActionKind::Replace | ActionKind::Restart);
        let mut kept: HashMap<u32, &Listed> = HashMap::new();
        let mut retired: Vec<&Listed> = Vec::new();
        for c in &listed {
            let replica = c
                .labels
                .get(naming::REPLICA)
                .and_then(|r| r.parse::<u32>().ok());
            let fits = !recreate
                && c.labels.get(naming::CONFIG_HASH) == Some(&config_hash)
                && replica.is_some_and(|r| r < replicas && !kept.contains_key(&r));
            match replica {
                Some(r) if fits => {
                    kept.insert(r, c);
                }
                _ => retired.push(c),
            }
        }
        if !retired.is_empty() && component.schedule.is_some() {
            ctl.stop_job(&component.name);
        }
        let ingress_port = plan
            .ingresses
            .iter()
            .find(|i| i.component == component.name)
            .map(|i| i.port);
        // A component behind the entry point is replaced beside its old
        // replicas (not when ports are published on the host: two replicas
        // cannot publish one port; nor when it holds an exclusive device,
        // which one replica at a time may hold).
        if let (Some(traffic), Some(port)) = (&self.traffic, ingress_port)
            && kept.is_empty()
            && !retired.is_empty()
            && !component.stopped
            && component.schedule.is_none()
            && !self.publish.publish
            && !component.devices.iter().any(|d| d.exclusive)
            && traffic.serves(stage, &component.name)
        {
            let surge = Surge {
                traffic: traffic.as_ref(),
                port,
                config_hash: &config_hash,
                mounts: &mounts,
            };
            let replaced = self
                .replace_beside(stage, plan, component, &retired, surge)
                .await;
            files::prune(&component_dir, &component.spec_hash);
            return replaced;
        }
        self.stop_and_remove_all(&retired).await?;

        let mut errors = Vec::new();
        for replica in 0..replicas {
            let (id, running) = match kept.get(&replica) {
                Some(c) => (c.id.clone(), c.state == "running"),
                None => match self
                    .create_container(
                        stage,
                        plan,
                        component,
                        replica,
                        Made {
                            config_hash: &config_hash,
                            mounts: &mounts,
                            beside: false,
                        },
                    )
                    .await
                {
                    Ok(id) => (id, false),
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                },
            };
            if component.stopped || component.schedule.is_some() || running {
                continue;
            }
            if let Err(e) = self.start(component, replica, &id).await {
                errors.push(e);
            }
        }
        files::prune(&component_dir, &component.spec_hash);
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            n => {
                let first = errors.remove(0);
                Err(RuntimeError {
                    message: format!("{} (and {} more replica(s) failed)", first.message, n - 1),
                    ..first
                })
            }
        }
    }

    /// Replaces `retired` (every replica of `component`) with new replicas
    /// started beside them: once every new one answers on the ingress
    /// port, the component's requests move over, the old ones drain and are
    /// removed. New replicas that do not come up are removed again and the
    /// old ones never stop serving.
    async fn replace_beside(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        component: &ComponentPlan,
        retired: &[&Listed],
        surge: Surge<'_>,
    ) -> Result<(), RuntimeError> {
        // The bridge of a network made by an earlier agent may not be
        // pinned yet; it must be before new replicas join it.
        if let Some(old) = retired.first() {
            self.pin_bridges(&old.id).await;
        }
        let mut created = Vec::new();
        let started = self
            .start_beside(stage, plan, component, &surge, &mut created)
            .await;
        let new_addresses = match started {
            Ok(addresses) => addresses,
            Err(e) => {
                for id in &created {
                    if let Err(e) = self.stop_and_remove(id, id).await {
                        tracing::warn!(%stage, component = %component.name, error = %e.sentence(),
                            "could not remove a new replica that did not come up");
                    }
                }
                return Err(e);
            }
        };
        let mut old_addresses = Vec::new();
        for c in retired {
            if let Ok(Some(inspected)) = self.engine.inspect(&c.id).await
                && let Some(ip) = address_on(stage, &inspected)
            {
                old_addresses.push(ip);
            }
        }
        tracing::info!(%stage, component = %component.name, "the new replicas answer; moving requests over");
        surge
            .traffic
            .switch(
                stage,
                &component.name,
                &old_addresses,
                &new_addresses,
                SURGE_DRAIN,
            )
            .await;
        let removed = self.stop_and_remove_all(retired).await;
        surge.traffic.retired(&old_addresses);
        removed
    }

    /// Creates and starts every replica of `component` beside the running
    /// ones (their ids pushed to `created` as they are made) and waits
    /// until each answers on the ingress port; their addresses.
    async fn start_beside(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        component: &ComponentPlan,
        surge: &Surge<'_>,
        created: &mut Vec<String>,
    ) -> Result<Vec<IpAddr>, RuntimeError> {
        for replica in 0..naming::replicas_of(component) {
            let id = self
                .create_container(
                    stage,
                    plan,
                    component,
                    replica,
                    Made {
                        config_hash: surge.config_hash,
                        mounts: surge.mounts,
                        beside: true,
                    },
                )
                .await?;
            created.push(id.clone());
            self.start(component, replica, &id).await?;
        }
        let deadline = tokio::time::Instant::now() + SURGE_READY;
        let mut addresses = Vec::with_capacity(created.len());
        for id in created.iter() {
            addresses.push(
                self.answering(stage, component, id, surge.port, deadline)
                    .await?,
            );
        }
        Ok(addresses)
    }

    /// Waits until container `id` answers on `port` at its address on the
    /// stage network; fails when it stops or `deadline` passes.
    async fn answering(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        id: &str,
        port: u16,
        deadline: tokio::time::Instant,
    ) -> Result<IpAddr, RuntimeError> {
        loop {
            let inspected = self.engine.inspect(id).await?;
            let Some(inspected) = inspected.filter(|c| c.state.running) else {
                return Err(RuntimeError::new(
                    "replica-not-up",
                    format!(
                        "a new replica of component {:?} stopped before it answered on port {port}; the replicas of the release before keep serving",
                        component.name
                    ),
                )
                .with_hint("its logs (`trellis logs`) tell why it stopped"));
            };
            if let Some(ip) = address_on(stage, &inspected) {
                let addr = SocketAddr::new(ip, port);
                let connect = tokio::net::TcpStream::connect(addr);
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                    return Ok(ip);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::new(
                    "replica-not-up",
                    format!(
                        "a new replica of component {:?} did not answer on port {port} within {} s; the replicas of the release before keep serving",
                        component.name,
                        SURGE_READY.as_secs()
                    ),
                )
                .with_hint("check that the component listens on that port, on every address (0.0.0.0)"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn create_container(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        component: &ComponentPlan,
        replica: u32,
        made: Made<'_>,
    ) -> Result<String, RuntimeError> {
        let Made {
            config_hash,
            mounts,
            beside,
        } = made;
        let mut name = naming::container_name(stage, &component.name, replica);
        if beside {
            // Started next to the replica it replaces, which has the
            // plain name until it is removed.
            name.push_str(&format!("-r{}", plan.revision));
        }
        let publish_on = (self.publish.publish
            && replica == 0
            && component.schedule.is_none()
            && !component.ports.is_empty())
        .then_some(self.publish.host_ip.as_str());
        let stamp = naming::Stamp {
            revision: plan.revision,
            release: plan.release,
            config_hash,
        };
        let labels = naming::container_labels(
            &self.outpost,
            stage,
            component,
            replica,
            stamp,
            publish_on.is_some(),
        );
        let body = spec::create_body(&spec::ContainerSpec {
            stage,
            plan: component,
            labels,
            files: mounts,
            publish_on,
            stop_timeout: i64::try_from(self.stop_timeout.as_secs()).unwrap_or(i64::MAX),
            gpus: self.engine.gpus,
        });
        let platform = match &component.workload {
            Workload::Image { platform, .. } => platform.clone().unwrap_or_default(),
            Workload::Package { .. } => String::new(),
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            platform,
        };
        match self.engine.docker.create_container(Some(options), body).await {
            Ok(created) => Ok(created.id),
            Err(e) if status_of(&e) == Some(409) => Err(RuntimeError::new(
                "container-name-taken",
                format!(
                    "component {:?} could not be created: a container named {name} already exists and is not one this agent manages",
                    component.name
                ),
            )
            .with_hint(format!(
                "remove it (`{} rm -f {name}`), then deploy again",
                self.engine_name()
            ))),
            Err(e) => Err(engine_error(
                "container-create-failed",
                &format!("creating container {name} of component {:?}", component.name),
                &e,
            )
            .with_hint("check the component's settings (user, resources, storage) against what this outpost offers")),
        }
    }

    async fn start(
        &self,
        component: &ComponentPlan,
        replica: u32,
        id: &str,
    ) -> Result<(), RuntimeError> {
        let Err(e) = self.engine.docker.start_container(id, None).await else {
            self.pin_bridges(id).await;
            return Ok(());
        };
        if status_of(&e) == Some(304) {
            return Ok(());
        }
        let message = message_of(&e);
        let lower = message.to_ascii_lowercase();
        if replica == 0
            && self.publish.publish
            && (lower.contains("address already in use")
                || lower.contains("port is already allocated"))
        {
            let ports: Vec<String> = component.ports.iter().map(u16::to_string).collect();
            return Err(RuntimeError::new(
                "port-taken",
                format!(
                    "component {:?} could not publish its port(s) {} on {}: a port is already in use on this host ({message})",
                    component.name,
                    ports.join(", "),
                    self.publish.host_ip
                ),
            )
            .with_hint(
                "stop what listens on that port, give the component another port, or turn \
                 off publishing for this outpost",
            ));
        }
        if status_of(&e).is_none() {
            return Err(engine_error(
                "container-start-failed",
                &format!("starting component {:?}", component.name),
                &e,
            ));
        }
        Err(RuntimeError::new(
            "container-start-failed",
            format!(
                "component {:?} (replica {replica}) could not be started: {message}",
                component.name
            ),
        )
        .with_hint("check the component's command, args and user against its image"))
    }

    /// Pins the hardware address of the bridges of the networks container
    /// `id` is on (see [`bridge`]).
    async fn pin_bridges(&self, id: &str) {
        let Ok(Some(inspected)) = self.engine.inspect(id).await else {
            return;
        };
        for endpoint in inspected.network.networks.values() {
            if let Ok(gateway) = endpoint.gateway.parse::<IpAddr>() {
                self.bridges.pin(gateway).await;
            }
        }
    }

    async fn remove_component(
        &self,
        stage: &StageKey,
        ctl: &StageCtl,
        component: &str,
    ) -> Result<(), RuntimeError> {
        ctl.stop_job(component);
        let listed = self
            .engine
            .containers(&self.component_filters(stage, component))
            .await?;
        let listed: Vec<&Listed> = listed.iter().collect();
        self.stop_and_remove_all(&listed).await?;
        if naming::check_name(NameKind::Component, component).is_ok() {
            let _ = std::fs::remove_dir_all(self.stage_dir(stage).join("files").join(component));
        }
        Ok(())
    }

    /// Starts (or keeps) the task of every scheduled component of `plan`,
    /// and ends the others.
    async fn sync_jobs(
        &self,
        stage: &StageKey,
        ctl: &StageCtl,
        plan: &StagePlan,
    ) -> Result<(), RuntimeError> {
        let scheduled: Vec<&ComponentPlan> = plan
            .of_kind(RuntimeKind::Container)
            .filter(|c| c.schedule.is_some() && !c.stopped)
            .collect();
        let wanted: BTreeSet<&str> = scheduled.iter().map(|c| c.name.as_str()).collect();
        ctl.jobs().retain(|name, job| {
            let keep = wanted.contains(name.as_str());
            if !keep {
                job.task.abort();
            }
            keep
        });
        if scheduled.is_empty() {
            return Ok(());
        }
        let listed = self.engine.containers(&self.stage_filters(stage)).await?;
        for component in scheduled {
            let Some(schedule) = component.schedule.clone() else {
                continue;
            };
            let container = listed.iter().find(|c| {
                c.labels.get(naming::COMPONENT) == Some(&component.name)
                    && c.labels.get(naming::REPLICA).map(String::as_str) == Some("0")
            });
            let Some(container) = container else {
                ctl.stop_job(&component.name);
                continue;
            };
            let mut jobs = ctl.jobs();
            if jobs
                .get(&component.name)
                .is_some_and(|j| j.container_id == container.id)
            {
                continue;
            }
            let spec = JobSpec {
                component: component.name.clone(),
                container_id: container.id.clone(),
                schedule,
                timezone: component.timezone.clone(),
                max_retries: component.max_retries,
                retry_delay: self.retry_delay,
            };
            let task = tokio::spawn(jobs::run(self.engine.clone(), ctl.store.clone(), spec));
            if let Some(old) = jobs.insert(
                component.name.clone(),
                RunningJob {
                    container_id: container.id.clone(),
                    task,
                },
            ) {
                old.task.abort();
            }
        }
        Ok(())
    }
}

/// `DOCKER_HOST`, else the first default socket that exists.
fn default_host() -> Result<String, RuntimeError> {
    if let Ok(host) = std::env::var("DOCKER_HOST")
        && !host.trim().is_empty()
    {
        return Ok(host);
    }
    DEFAULT_SOCKETS
        .iter()
        .find(|s| Path::new(s).exists())
        .map(|s| format!("unix://{s}"))
        .ok_or_else(|| {
            RuntimeError::new(
                "engine-unreachable",
                format!(
                    "no container engine found: DOCKER_HOST is not set and none of {} exists",
                    DEFAULT_SOCKETS.join(", ")
                ),
            )
            .with_hint(
                "start the Podman API service (`systemctl enable --now podman.socket`) or \
                 Docker, or set DOCKER_HOST to the engine's socket",
            )
        })
}

/// `(repository, tag or digest)` of an image reference; `latest` when it
/// names neither.
fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((repository, digest)) = reference.split_once('@') {
        return (repository, digest);
    }
    let last_slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
    match reference[last_slash..].rfind(':') {
        Some(colon) => (
            &reference[..last_slash + colon],
            &reference[last_slash + colon + 1..],
        ),
        None => (reference, "latest"),
    }
}

#[async_trait]
impl Runtime for ContainerRuntime {
    /// Each labelled volume of the stage, at its mountpoint on the host
    /// (the agent runs beside the engine, as root).
    async fn volumes(
        &self,
        stage: &StageKey,
    ) -> Result<Vec<(String, std::path::PathBuf)>, RuntimeError> {
        naming::check_stage(stage)?;
        let mut found = Vec::new();
        for volume in self.engine.volumes(&self.stage_filters(stage)).await? {
            let (Some(component), Some(storage)) = (
                volume.labels.get(naming::COMPONENT),
                volume.labels.get(naming::STORAGE),
            ) else {
                continue;
            };
            let inspected: Option<serde_json::Value> = self
                .engine
                .get(
                    &format!("/volumes/{}", engine::encode(&volume.name)),
                    "inspecting a volume",
                )
                .await?;
            let Some(mountpoint) = inspected
                .as_ref()
                .and_then(|v| v.get("Mountpoint"))
                .and_then(|m| m.as_str())
                .filter(|m| !m.is_empty())
            else {
                continue;
            };
            found.push((
                format!("{component}/{storage}"),
                std::path::PathBuf::from(mountpoint),
            ));
        }
        found.sort();
        Ok(found)
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

    fn cannot_hold(&self, component: &ComponentPlan) -> Option<String> {
        spec::gpu_requests(&component.devices, self.engine.gpus)
            .err()
            .map(|why| format!("component {:?} asks for GPUs, and {why}", component.name))
    }

    async fn has_workload(&self, component: &ComponentPlan) -> bool {
        match &component.workload {
            Workload::Image {
                archive: Some(archive),
                ..
            } => matches!(self.engine.image_exists(&archive.image_id).await, Ok(true)),
            _ => false,
        }
    }

    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Container
    }

    fn describe(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: self.engine.kind.as_str().to_owned(),
            version: self.engine.version.clone(),
        }
    }

    fn address_of(&self, component: &str, _first_port: Option<u16>) -> String {
        component.to_owned()
    }

    async fn plan(&self, stage: &StageKey, plan: &StagePlan) -> Result<Vec<Action>, RuntimeError> {
        naming::check_stage(stage)?;
        let found = self.found(stage).await?;
        Ok(diff::diff(&self.wanted(plan), &found))
    }

    async fn apply(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        actions: &[Action],
    ) -> Result<(), RuntimeError> {
        naming::check_stage(stage)?;
        let ctl = self.ctl(stage);
        let _guard = ctl.lock.lock().await;
        let wanted: HashMap<&str, &ComponentPlan> = plan
            .of_kind(RuntimeKind::Container)
            .map(|c| (c.name.as_str(), c))
            .collect();
        let builds = actions.iter().any(|a| {
            matches!(
                a.kind,
                ActionKind::Create | ActionKind::Replace | ActionKind::Restart
            )
        });
        if builds {
            self.ensure_network(stage).await?;
        }
        for action in actions {
            if action.kind == ActionKind::Remove {
                match self.remove_component(stage, &ctl, &action.component).await {
                    Ok(()) => ctl.store.update(|s| {
                        s.components.remove(&action.component);
                    }),
                    Err(e) => {
                        tracing::warn!(stage = %stage, component = %action.component,
                            error = %e.sentence(), "could not remove a component");
                    }
                }
                continue;
            }
            let Some(component) = wanted.get(action.component.as_str()) else {
                continue;
            };
            let result = self
                .apply_component(stage, &ctl, plan, component, action.kind)
                .await;
            match result {
                Ok(()) => ctl.store.component_mut(&component.name, |r| {
                    r.failure = None;
                    r.stopped = component.stopped;
                }),
                Err(e) => {
                    tracing::warn!(stage = %stage, component = %component.name,
                        action = ?action.kind, code = e.code, error = %e.sentence(),
                        "a component could not be applied");
                    ctl.store.component_mut(&component.name, |r| {
                        r.failure = Some(Failure {
                            code: e.code.to_owned(),
                            message: e.sentence(),
                            since: Utc::now(),
                            spec_hash: component.spec_hash.clone(),
                            revision: plan.revision,
                            release: plan.release,
                        });
                        r.stopped = component.stopped;
                    });
                }
            }
        }
        // Forget what no longer belongs to the plan (removed components).
        ctl.store.update(|s| {
            s.components
                .retain(|name, _| wanted.contains_key(name.as_str()))
        });
        self.sync_jobs(stage, &ctl, plan).await
    }

    async fn observe(&self, stage: &StageKey) -> Result<Vec<ComponentObservation>, RuntimeError> {
        naming::check_stage(stage)?;
        let ctl = self.ctl(stage);
        let listed = self.engine.containers(&self.stage_filters(stage)).await?;
        let mut by_component: HashMap<String, Vec<Inspected>> = HashMap::new();
        for c in &listed {
            let Some(component) = c.labels.get(naming::COMPONENT) else {
                continue;
            };
            if let Some(inspected) = self.engine.inspect(&c.id).await? {
                by_component
                    .entry(component.clone())
                    .or_default()
                    .push(inspected);
            }
        }
        let records = ctl.store.snapshot().components;
        for (name, record) in &records {
            if record.failure.is_some() {
                by_component.entry(name.clone()).or_default();
            }
        }
        let mut observations: Vec<ComponentObservation> = by_component
            .into_iter()
            .map(|(name, replicas)| {
                let seen = observe::Seen {
                    stage,
                    publish: &self.publish,
                    exits: &self.exits,
                    now: Utc::now(),
                };
                observe::observe_component(seen, &name, replicas, records.get(&name))
            })
            .collect();
        observations.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(observations)
    }

    async fn logs(
        &self,
        stage: &StageKey,
        query: &LogQuery,
        sink: mpsc::Sender<LogLine>,
    ) -> Result<(), RuntimeError> {
        naming::check_stage(stage)?;
        let filters = match &query.component {
            Some(component) => {
                naming::check_name(NameKind::Component, component)?;
                self.component_filters(stage, component)
            }
            None => self.stage_filters(stage),
        };
        let sources: Vec<logs::Source> = self
            .engine
            .containers(&filters)
            .await?
            .iter()
            .filter_map(logs::Source::from_listed)
            .collect();
        if sources.is_empty()
            && let Some(component) = &query.component
        {
            return Err(RuntimeError::new(
                "component-not-found",
                format!(
                    "component {component:?} of stage {stage} has no containers on this outpost"
                ),
            )
            .with_hint(
                "check the component's name; a component that failed to start has no logs",
            ));
        }
        let discover = || async {
            Ok(self
                .engine
                .containers(&filters)
                .await?
                .iter()
                .filter_map(logs::Source::from_listed)
                .collect())
        };
        logs::send_logs(&self.engine, sources, query, sink, discover).await
    }

    async fn remove(&self, stage: &StageKey) -> Result<(), RuntimeError> {
        naming::check_stage(stage)?;
        let ctl = self.ctl(stage);
        let _guard = ctl.lock.lock().await;
        ctl.stop_jobs();
        let filters = self.stage_filters(stage);
        let mut errors: Vec<RuntimeError> = Vec::new();
        let containers = self.engine.containers(&filters).await?;
        let removals = containers
            .iter()
            .map(|c| self.stop_and_remove(&c.id, c.name()));
        errors.extend(join_all(removals).await.into_iter().filter_map(Result::err));
        for network in self.engine.networks(&filters).await? {
            if let Err(e) = self.engine.docker.remove_network(&network.name).await
                && status_of(&e) != Some(404)
            {
                errors.push(engine_error(
                    "network-remove-failed",
                    &format!("removing network {}", network.name),
                    &e,
                ));
            }
        }
        for volume in self.engine.volumes(&filters).await? {
            let options = RemoveVolumeOptions { force: true };
            if let Err(e) = self
                .engine
                .docker
                .remove_volume(&volume.name, Some(options))
                .await
                && status_of(&e) != Some(404)
            {
                errors.push(engine_error(
                    "volume-remove-failed",
                    &format!("removing volume {}", volume.name),
                    &e,
                ));
            }
        }
        let dir = self.stage_dir(stage);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(RuntimeError::new(
                "files-remove-failed",
                format!("removing {}: {e}", dir.display()),
            ));
        }
        self.stages_map().remove(stage);
        match errors.len() {
            0 => Ok(()),
            n => {
                let first = errors.remove(0);
                Err(RuntimeError {
                    message: format!(
                        "stage {stage} was not removed completely: {}{}",
                        first.message,
                        if n > 1 {
                            format!(" (and {} more)", n - 1)
                        } else {
                            String::new()
                        }
                    ),
                    hint: Some(
                        "the agent tries again; check the engine's log if it keeps failing"
                            .to_owned(),
                    ),
                    ..first
                })
            }
        }
    }

    async fn stages(&self) -> Result<Vec<StageKey>, RuntimeError> {
        let filters = naming::label_filters(&self.outpost, None);
        let mut stages = BTreeSet::new();
        let mut add = |labels: &HashMap<String, String>| {
            if let (Some(project), Some(stage)) =
                (labels.get(naming::PROJECT), labels.get(naming::STAGE))
            {
                stages.insert((project.clone(), stage.clone()));
            }
        };
        for c in self.engine.containers(&filters).await? {
            add(&c.labels);
        }
        for n in self.engine.networks(&filters).await? {
            add(&n.labels);
        }
        for v in self.engine.volumes(&filters).await? {
            add(&v.labels);
        }
        Ok(stages
            .into_iter()
            .map(|(project, stage)| StageKey::new(project, stage))
            .collect())
    }
}

impl ContainerRuntime {
    /// Whether a scheduled component's job task is alive (for tests and
    /// diagnostics).
    pub fn job_running(&self, stage: &StageKey, component: &str) -> bool {
        self.stages_map().get(stage).is_some_and(|ctl| {
            ctl.jobs()
                .get(component)
                .is_some_and(|j| !j.task.is_finished())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_references() {
        assert_eq!(split_reference("localhost/x:1"), ("localhost/x", "1"));
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        assert_eq!(
            split_reference("registry:5000/team/app"),
            ("registry:5000/team/app", "latest")
        );
        assert_eq!(
            split_reference("registry:5000/app:2"),
            ("registry:5000/app", "2")
        );
        assert_eq!(split_reference("app@sha256:abc"), ("app", "sha256:abc"));
    }

    #[test]
    fn publishing_defaults_to_off_on_loopback() {
        let p = PublishPolicy::default();
        assert!(!p.publish);
        assert_eq!(p.host_ip, "127.0.0.1");
        assert!(PublishPolicy::on("0.0.0.0").publish);
    }
}
