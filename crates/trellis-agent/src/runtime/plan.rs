//! From the hub's desired state to a [`StagePlan`]: every component with its
//! env, files, command and args resolved, so a runtime only has to run it.
//!
//! The desired state (see `trellis_hub::link::session::desired_state`) is
//! `{revision, suspended, release, build, controls, ingress}`: the release names its
//! config snapshot, the build carries the manifest text and the artifact of
//! each component, and `controls` holds per-component requests made with
//! `trellis stop|start|restart component`, and `ingress.domain` is the
//! outpost's ingress domain its ingress hosts end in. All of it comes from the network,
//! so every lookup that can miss is a [`PlanError`] naming what is missing.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use trellis_model::ingress::{check_ingress_host, ingress_host};
use trellis_model::manifest::{
    Component, ComponentSource, DockerBuild, DockerSource, EnvSource, FileSource, Manifest,
    Schedule, StorageKind, expand, parse_recorded_manifest,
};
use trellis_model::{Artifact, Build, ConfigData, Release};

use super::RuntimeKind;
use crate::devices::DeviceOffers;

/// Everything a stage should run at one desired revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    pub revision: u64,
    /// The release number, when the stage has a release.
    pub release: Option<u64>,
    /// The build's name, e.g. `main_b3`.
    pub build: Option<String>,
    pub suspended: bool,
    pub components: Vec<ComponentPlan>,
    /// What the release asks for that this outpost runs differently (a
    /// config key it lacks, an identity it cannot provide): reported with
    /// the stage's status, never silently dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<PlanNotice>,
    /// The host names and paths the outpost's entry point routes to the
    /// stage's components. Not part of any component's spec: a new host
    /// re-routes without restarting anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingresses: Vec<PlannedIngress>,
}

/// One ingress of a component, with its host name on this outpost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedIngress {
    pub component: String,
    /// `<prefix>.<stage>.<project>.<ingress domain>`, lowercase.
    pub host: String,
    /// A path prefix starting with `/`.
    pub path: String,
    /// The component's port requests go to.
    pub port: u16,
    pub sticky: bool,
}

/// Something about a plan the stage's status should say.
pub use crate::runner::Notice as PlanNotice;

impl StagePlan {
    /// A plan that runs nothing (a stage without a release).
    pub fn empty(revision: u64) -> Self {
        StagePlan {
            revision,
            release: None,
            build: None,
            suspended: false,
            components: Vec::new(),
            notices: Vec::new(),
            ingresses: Vec::new(),
        }
    }

    /// The components one runtime runs.
    pub fn of_kind(&self, kind: RuntimeKind) -> impl Iterator<Item = &ComponentPlan> {
        self.components
            .iter()
            .filter(move |c| c.workload.kind() == kind)
    }

    pub fn component(&self, name: &str) -> Option<&ComponentPlan> {
        self.components.iter().find(|c| c.name == name)
    }
}

/// What a component runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Workload {
    /// A container image: delivered from the hub when the build stored it
    /// (`archive`), else one the outpost's engine has or can pull.
    Image {
        reference: String,
        platform: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        archive: Option<trellis_model::ImageArchive>,
    },
    /// A packed `process:` directory, delivered from the hub as chunks:
    /// `digest` names its artifact index. `argv` runs from inside the
    /// unpacked directory.
    Package {
        digest: String,
        size: u64,
        argv: Vec<String>,
    },
}

impl Workload {
    pub fn kind(&self) -> RuntimeKind {
        match self {
            Workload::Image { .. } => RuntimeKind::Container,
            Workload::Package { .. } => RuntimeKind::Process,
        }
    }
}

/// A file mounted read-only into a component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFile {
    /// Absolute path inside the component (for processes: under its
    /// directory, see the process runtime).
    pub path: String,
    pub content: String,
}

/// A named volume of the stage that outlives releases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedVolume {
    pub name: String,
    pub path: String,
    pub kind: StorageKind,
    pub size_bytes: Option<u64>,
}

/// A device of the outpost a component holds (see [`crate::devices`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedDevice {
    /// The name it is offered under.
    pub name: String,
    /// A device node: its path on the host, which is also its path inside
    /// a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A device node's access as cgroups write it (`rw`, `r`, `rwm`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access: String,
    /// GPUs: their CDI device names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdi: Vec<String>,
    /// Held by one replica at most (not part of the spec hash: the
    /// administrator changing it does not replace a workload).
    #[serde(default)]
    pub exclusive: bool,
}

/// One component, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentPlan {
    pub name: String,
    pub workload: Workload,
    pub ports: Vec<u16>,
    /// Resolved environment (sorted by name).
    pub env: BTreeMap<String, String>,
    pub files: Vec<PlannedFile>,
    pub volumes: Vec<PlannedVolume>,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// `scaling.min` (1 when not given).
    pub replicas: u32,
    /// `command` with its variables expanded ([`expand::command_word`]):
    /// replaces the image's entrypoint (containers) or the package's
    /// command (processes).
    pub command: Option<Vec<String>>,
    /// `args`, expanded like `command`: the image's cmd (containers) or
    /// appended to the command (processes).
    pub args: Option<Vec<String>>,
    pub user: Option<String>,
    pub schedule: Option<Schedule>,
    /// IANA time zone of the cron schedule; UTC when not given.
    pub timezone: Option<String>,
    /// Retries of a failed scheduled run (0 when not given).
    pub max_retries: u32,
    /// Stopped on request, or because the stage is suspended.
    pub stopped: bool,
    /// Stopped by a kill (`trellis stop component --kill`): its workloads
    /// end at once, without the grace period. Left out when false, so
    /// records written before it read, and hash, the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub killed: bool,
    /// Bumped by every `trellis restart component`.
    pub restart_generation: u64,
    /// BLAKE3 of everything that, when changed, needs a new workload
    /// (workload, ports, env, files, volumes, resources, replicas, command,
    /// args, user, schedule, devices). Not of `stopped` or the restart
    /// generation.
    pub spec_hash: String,
    /// The outpost's devices it holds, in manifest order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<PlannedDevice>,
}

impl ComponentPlan {
    /// A component running `workload` with nothing else set (one replica,
    /// no ports, env, files or volumes), its spec hash computed. For plans
    /// made by hand: set fields, then [`ComponentPlan::update_spec_hash`].
    pub fn new(name: impl Into<String>, workload: Workload) -> Self {
        let mut plan = ComponentPlan {
            name: name.into(),
            workload,
            ports: Vec::new(),
            env: BTreeMap::new(),
            files: Vec::new(),
            volumes: Vec::new(),
            cpu_millis: None,
            memory_bytes: None,
            replicas: 1,
            command: None,
            args: None,
            user: None,
            schedule: None,
            timezone: None,
            max_retries: 0,
            stopped: false,
            killed: false,
            restart_generation: 0,
            spec_hash: String::new(),
            devices: Vec::new(),
        };
        plan.update_spec_hash();
        plan
    }

    /// Sets [`ComponentPlan::spec_hash`] from the other fields (for plans
    /// made by hand, e.g. in tests).
    pub fn update_spec_hash(&mut self) {
        self.spec_hash = spec_hash(self);
    }

    pub fn first_port(&self) -> Option<u16> {
        self.ports.first().copied()
    }

    /// The argv of a process component: `command` (or the package's) then
    /// `args`.
    pub fn process_argv(&self) -> Vec<String> {
        let base = match (&self.command, &self.workload) {
            (Some(command), _) => command.clone(),
            (None, Workload::Package { argv, .. }) => argv.clone(),
            (None, Workload::Image { .. }) => Vec::new(),
        };
        base.into_iter()
            .chain(self.args.iter().flatten().cloned())
            .collect()
    }
}

/// Per-component requests made from the hub (`trellis stop|start|restart
/// component`), part of the desired state under `controls`; the wire
/// format is the link's.
pub use trellis_link::protocol::DesiredControl as ComponentControl;

/// Why a desired state cannot be turned into a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

/// The parts of the desired state the plan is made from.
#[derive(Debug, Deserialize)]
struct DesiredState {
    #[serde(default)]
    revision: u64,
    #[serde(default)]
    suspended: bool,
    release: Option<Release>,
    build: Option<Build>,
    #[serde(default)]
    controls: HashMap<String, ComponentControl>,
    /// The outpost's ingress settings (absent from hubs before ingresses).
    #[serde(default)]
    ingress: IngressSettings,
}

#[derive(Debug, Deserialize)]
struct IngressSettings {
    domain: String,
}

impl Default for IngressSettings {
    fn default() -> Self {
        IngressSettings {
            domain: trellis_model::ingress::DEFAULT_INGRESS_DOMAIN.to_owned(),
        }
    }
}

/// Every ingress of the manifest with its host name on an outpost whose
/// ingress domain is `domain`.
fn ingresses(
    manifest: &Manifest,
    release: &Release,
    domain: &str,
) -> Result<Vec<PlannedIngress>, PlanError> {
    let mut out = Vec::new();
    for c in &manifest.components {
        for ingress in &c.ingresses {
            let host = ingress_host(&ingress.host, &release.stage, &release.project, domain);
            check_ingress_host(&host)
                .map_err(|e| PlanError(format!("component {:?} cannot be reached: {e}", c.name)))?;
            // The manifest check makes sure a component with an ingress
            // has a port to route to.
            let Some(port) = ingress.port.or_else(|| c.ports.first().copied()) else {
                continue;
            };
            out.push(PlannedIngress {
                component: c.name.clone(),
                host,
                path: ingress.path.clone().unwrap_or_else(|| "/".to_owned()),
                port,
                sticky: ingress.sticky,
            });
        }
    }
    Ok(out)
}

/// What a plan is made for: the outpost it runs on.
pub struct PlanContext<'a> {
    /// The outpost's CPU architecture, as OCI platforms name it (`amd64`,
    /// `arm64`): which image of a multi-architecture build it runs.
    pub arch: &'a str,
    /// What a `component-ref` resolves to: `address_of(component, kind,
    /// first_port)` (the runtime of the referenced component decides).
    pub address_of: &'a dyn Fn(&str, RuntimeKind, Option<u16>) -> String,
    /// The devices the outpost offers.
    pub devices: &'a DeviceOffers,
}

/// Makes the plan of `desired` (the JSON the hub sent at `revision`).
pub fn plan_from_desired(
    revision: u64,
    desired: &serde_json::Value,
    ctx: &PlanContext<'_>,
) -> Result<StagePlan, PlanError> {
    let state: DesiredState = serde_json::from_value(desired.clone()).map_err(|e| {
        PlanError(format!(
            "the desired state of revision {revision} is not understood ({e}); \
             the hub and the agent may be of incompatible versions"
        ))
    })?;
    let revision = if state.revision == 0 {
        revision
    } else {
        state.revision
    };
    let (Some(release), Some(build)) = (state.release, state.build) else {
        return Ok(StagePlan {
            suspended: state.suspended,
            ..StagePlan::empty(revision)
        });
    };
    let manifest = parse_recorded_manifest(&build.manifest).map_err(|e| {
        PlanError(format!(
            "the manifest of build {} does not parse on the outpost: {e}",
            build.name
        ))
    })?;
    let empty = ConfigData::default();
    let config = release.config.as_ref().map(|c| &c.data).unwrap_or(&empty);
    let config_name = release
        .config
        .as_ref()
        .map(|c| c.name.as_str())
        .unwrap_or("(none)");
    let mut planner = Planner {
        project: &release.project,
        manifest: &manifest,
        build: &build,
        config,
        config_name,
        ctx,
        notices: Vec::new(),
    };
    let components = planner.components(&state.controls, state.suspended)?;
    let notices = planner.notices;
    let ingresses = ingresses(&manifest, &release, &state.ingress.domain)?;
    Ok(StagePlan {
        revision,
        release: Some(release.number),
        build: Some(build.name),
        suspended: state.suspended,
        components,
        notices,
        ingresses,
    })
}

/// Turns one release's manifest, build and config into component plans,
/// collecting the notices the stage's status should carry.
struct Planner<'a> {
    project: &'a str,
    manifest: &'a Manifest,
    build: &'a Build,
    config: &'a ConfigData,
    config_name: &'a str,
    ctx: &'a PlanContext<'a>,
    notices: Vec<PlanNotice>,
}

impl Planner<'_> {
    fn components(
        &mut self,
        controls: &HashMap<String, ComponentControl>,
        suspended: bool,
    ) -> Result<Vec<ComponentPlan>, PlanError> {
        let mut out = Vec::with_capacity(self.manifest.components.len());
        for c in &self.manifest.components {
            let workload = self.workload(c)?;
            let devices = self
                .ctx
                .devices
                .resolve(self.project, &c.name, &c.devices)
                .map_err(PlanError)?;
            let env = self.env(c, &DeviceOffers::env(&devices));
            let files = self.files(c)?;
            if let Some(identity) = &c.identity {
                self.notices.push(PlanNotice {
                    code: "identity-unavailable".into(),
                    message: format!(
                        "component {:?} asks for the cloud identity {identity:?}, which outposts cannot provide; it runs without it",
                        c.name
                    ),
                    hint: "give the component the credentials it needs through config (config-ref), or run the stage where the identity exists".into(),
                });
            }
            let volumes = c
                .storage
                .iter()
                .map(|s| PlannedVolume {
                    name: s.name.clone(),
                    path: s.path.clone(),
                    kind: s.kind,
                    size_bytes: s.size.as_ref().map(|q| q.bytes),
                })
                .collect();
            // `command` and `args` see every variable of the env.
            let known = |name: &str| env.get(name).map(String::as_str);
            let expand_words = |words: &Vec<String>| {
                words
                    .iter()
                    .map(|w| expand::command_word(w, known))
                    .collect::<Vec<_>>()
            };
            let command = c.command.as_ref().map(expand_words);
            let args = c.args.as_ref().map(expand_words);
            let control = controls.get(&c.name).cloned().unwrap_or_default();

            let mut plan = ComponentPlan {
                name: c.name.clone(),
                workload,
                ports: c.ports.clone(),
                env,
                files,
                volumes,
                cpu_millis: c.resources.cpu.as_ref().map(|q| q.millicores),
                memory_bytes: c.resources.memory.as_ref().map(|q| q.bytes),
                replicas: c.scaling.as_ref().map(|s| s.min).unwrap_or(1),
                command,
                args,
                user: c.user.clone(),
                schedule: c.scheduled.clone(),
                timezone: c.scheduled_timezone.clone(),
                max_retries: c.max_retries.unwrap_or(0),
                stopped: suspended || control.stopped,
                killed: control.stopped && control.killed,
                restart_generation: control.restarts,
                spec_hash: String::new(),
                devices,
            };
            plan.update_spec_hash();
            out.push(plan);
        }
        Ok(out)
    }

    /// What the component runs: the build's artifact, and of a
    /// multi-architecture build the image of this outpost's architecture.
    fn workload(&self, c: &Component) -> Result<Workload, PlanError> {
        let build = &self.build.name;
        let artifact = self
            .build
            .components
            .iter()
            .find(|b| b.name == c.name)
            .map(|b| &b.artifact);
        match (&c.source, artifact) {
            (
                ComponentSource::Docker(docker),
                Some(Artifact::Image {
                    reference,
                    archive,
                    platforms,
                }),
            ) => {
                let platform = self.platform(c, docker)?;
                if platforms.is_empty() {
                    return Ok(Workload::Image {
                        reference: reference.clone(),
                        platform,
                        archive: archive.clone(),
                    });
                }
                let arch = self.ctx.arch;
                let Some(image) = platforms.iter().find(|p| p.arch.as_str() == arch) else {
                    let carried: Vec<&str> = platforms.iter().map(|p| p.arch.as_str()).collect();
                    return Err(PlanError(format!(
                        "component {:?}: build {build} has images for {} only, and this outpost is {arch}; \
                         push a build that lists {{arch: {arch}}} in docker.platform",
                        c.name,
                        carried.join(", ")
                    )));
                };
                Ok(Workload::Image {
                    reference: image.reference.clone(),
                    platform,
                    archive: image.archive.clone(),
                })
            }
            (ComponentSource::Docker(docker), None) => match &docker.build {
                DockerBuild::Image(reference) => Ok(Workload::Image {
                    reference: reference.clone(),
                    platform: self.platform(c, docker)?,
                    archive: None,
                }),
                DockerBuild::Dockerfile { .. } => Err(PlanError(format!(
                    "build {build} has no image for component {:?} (it is built from a Dockerfile)",
                    c.name
                ))),
            },
            (ComponentSource::Process(process), Some(Artifact::Package { digest, size })) => {
                Ok(Workload::Package {
                    digest: digest.clone(),
                    size: *size,
                    argv: process.command.clone(),
                })
            }
            (ComponentSource::Process(_), _) => Err(PlanError(format!(
                "build {build} has no package for process component {:?}; push the build again",
                c.name
            ))),
            (ComponentSource::Docker(_), Some(Artifact::Package { .. })) => {
                Err(PlanError(format!(
                    "build {build} holds a package, not an image, for container component {:?}",
                    c.name
                )))
            }
        }
    }

    /// The engine platform to pull with (`linux/<arch>`), when the manifest
    /// lists architectures; an outpost of an unlisted one refuses the
    /// release before anything changes.
    fn platform(&self, c: &Component, docker: &DockerSource) -> Result<Option<String>, PlanError> {
        if docker.platforms.is_empty() {
            return Ok(None);
        }
        let arch = self.ctx.arch;
        match docker.platforms.iter().find(|a| a.as_str() == arch) {
            Some(listed) => Ok(Some(listed.platform())),
            None => {
                let listed: Vec<&str> = docker.platforms.iter().map(|a| a.as_str()).collect();
                Err(PlanError(format!(
                    "component {:?} runs on {} (docker.platform), and this outpost is {arch}; \
                     add {{arch: {arch}}} to docker.platform and push a new build, or place the stage on an outpost of a listed architecture",
                    c.name,
                    listed.join(", ")
                )))
            }
        }
    }

    /// The component's environment. Each `value` (and a config-ref's
    /// default) has its dependent variables expanded from the variables
    /// before it, as Kubernetes does; a config key the release's config
    /// lacks falls back to the default or leaves the variable empty (the
    /// platform does not fail a release for it), and the status says so.
    /// `devices` (the paths of the device nodes it holds) come first, so
    /// values may use them (`$(TRELLIS_DEVICE_CAMERA)`) and a variable of
    /// the manifest with the same name wins.
    fn env(
        &mut self,
        c: &Component,
        devices: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut defined: Vec<(&str, String)> = devices
            .iter()
            .map(|(name, path)| (name.as_str(), path.clone()))
            .collect();
        for var in &c.env {
            let earlier = |name: &str| {
                defined
                    .iter()
                    .rev()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.as_str())
            };
            let value = match &var.source {
                EnvSource::Value(v) => expand::env_value(v, earlier),
                EnvSource::ConfigRef { key, default } => {
                    match (self.config.env.get(key), default) {
                        (Some(v), _) => v.clone(),
                        (None, Some(d)) => expand::env_value(d, earlier),
                        (None, None) => {
                            self.notices.push(PlanNotice {
                            code: "config-key-missing".into(),
                            message: format!(
                                "component {:?}: env {} refers to config key {key:?}, which config {} does not have; the variable is empty",
                                c.name, var.name, self.config_name
                            ),
                            hint: format!(
                                "add it with `trellis add config-data {} --env {key}=…` and push a new release, or give the variable a default value",
                                self.config_name
                            ),
                        });
                            String::new()
                        }
                    }
                }
                EnvSource::ComponentRef(target) => self.address(target),
            };
            defined.push((var.name.as_str(), value));
        }
        defined
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect()
    }

    /// Where a component of this stage is reached (its own name, for a
    /// self reference, too).
    fn address(&self, target: &str) -> String {
        let (kind, port) = match self.manifest.component(target) {
            Some(c) => (
                match c.source {
                    ComponentSource::Docker(_) => RuntimeKind::Container,
                    ComponentSource::Process(_) => RuntimeKind::Process,
                },
                c.ports.first().copied(),
            ),
            // The parser refuses references to no component; should one
            // reach here anyway, the bare name is the best guess.
            None => return target.to_owned(),
        };
        (self.ctx.address_of)(target, kind, port)
    }

    fn files(&self, c: &Component) -> Result<Vec<PlannedFile>, PlanError> {
        let mut files = Vec::with_capacity(c.files.len());
        for f in &c.files {
            let content = match &f.source {
                FileSource::Content(text) => text.clone(),
                FileSource::ConfigRef { key, default } => self
                    .config
                    .files
                    .get(key)
                    .or_else(|| self.config.env.get(key))
                    .or(default.as_ref())
                    .cloned()
                    .ok_or_else(|| {
                        PlanError(format!(
                            "component {:?}: file {} refers to config key {key:?}, which config {} does not have; \
                             add it with `trellis add config-data {} --file …` and push a new release, or give the file a default content",
                            c.name, f.path, self.config_name, self.config_name
                        ))
                    })?,
            };
            files.push(PlannedFile {
                path: f.path.clone(),
                content,
            });
        }
        Ok(files)
    }
}

/// See [`ComponentPlan::spec_hash`].
fn spec_hash(plan: &ComponentPlan) -> String {
    let mut spec = plan.clone();
    spec.stopped = false;
    spec.killed = false;
    spec.restart_generation = 0;
    spec.spec_hash = String::new();
    for device in &mut spec.devices {
        device.exclusive = false;
    }
    // Serializing our own plain struct cannot fail.
    let bytes = serde_json::to_vec(&spec).unwrap_or_default();
    blake3::hash(&bytes).to_hex()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx<'a>(
        arch: &'a str,
        address_of: &'a dyn Fn(&str, RuntimeKind, Option<u16>) -> String,
    ) -> PlanContext<'a> {
        PlanContext {
            arch,
            address_of,
            devices: &NO_DEVICES,
        }
    }

    static NO_DEVICES: std::sync::LazyLock<DeviceOffers> =
        std::sync::LazyLock::new(DeviceOffers::default);

    fn by_name(name: &str, _: RuntimeKind, _: Option<u16>) -> String {
        name.to_owned()
    }

    fn desired(
        manifest: &str,
        components: serde_json::Value,
        config: serde_json::Value,
    ) -> serde_json::Value {
        json!({
            "revision": 4,
            "suspended": false,
            "release": {
                "project": "p", "stage": "s", "number": 2, "build": "main_b1",
                "config": config, "revision": 4, "state": "pending",
                "created_at": "2026-01-01T00:00:00Z", "created_by": "admin"
            },
            "build": {
                "project": "p", "name": "main_b1", "number": 1, "branch": "main",
                "commit": "abc", "manifest_file": "trellis.yaml", "manifest": manifest,
                "components": components,
                "created_at": "2026-01-01T00:00:00Z", "created_by": "admin"
            },
            "controls": {"api": {"stopped": true, "restarts": 3}}
        })
    }

    const MANIFEST: &str = r#"version: v1
components:
  - name: api
    docker: {image: "localhost/api:1"}
    ports: [8080]
    env:
      - {name: DB, component-ref: db}
      - {name: MODE, config-ref: mode}
      - {name: LEVEL, config-ref: level, value: info}
    files:
      - {path: /etc/api.conf, config-ref: api.conf}
    args: ["--db", "$DB", "--mode=${MODE}"]
    scaling: {min: 2, max: 3}
  - name: db
    process: {path: ./db, command: ["./db"]}
    ports: [5432]
"#;

    #[test]
    fn resolves_env_files_refs_and_controls() {
        let d = desired(
            MANIFEST,
            json!([
                {"name": "api", "artifact": {"kind": "image", "reference": "localhost/api:1"}},
                {"name": "db", "artifact": {"kind": "package", "digest": "ab", "size": 10}}
            ]),
            json!({"name": "prod", "version": 1, "data": {
                "env": {"mode": "fast"}, "files": {"api.conf": "x=1"}}}),
        );
        let address = |name: &str, kind: RuntimeKind, port: Option<u16>| {
            format!("{name}/{kind}/{}", port.unwrap_or(0))
        };
        let plan = plan_from_desired(4, &d, &ctx("amd64", &address)).unwrap();
        assert_eq!(plan.release, Some(2));
        let api = plan.component("api").unwrap();
        assert_eq!(api.env["DB"], "db/process/5432");
        assert_eq!(api.env["MODE"], "fast");
        assert_eq!(api.env["LEVEL"], "info");
        assert_eq!(api.files[0].content, "x=1");
        assert_eq!(
            api.args.as_deref().unwrap(),
            ["--db", "db/process/5432", "--mode=fast"]
        );
        assert_eq!(api.replicas, 2);
        assert!(api.stopped);
        assert_eq!(api.restart_generation, 3);
        let db = plan.component("db").unwrap();
        assert_eq!(db.process_argv(), ["./db"]);
        assert!(!db.stopped);
    }

    #[test]
    fn spec_hash_ignores_controls_but_not_env() {
        let components = json!([
            {"name": "api", "artifact": {"kind": "image", "reference": "localhost/api:1"}},
            {"name": "db", "artifact": {"kind": "package", "digest": "ab", "size": 10}}
        ]);
        let config = |mode: &str| {
            json!({"name": "prod", "version": 1, "data": {
                "env": {"mode": mode}, "files": {"api.conf": "x=1"}}})
        };
        let addr = ctx("amd64", &by_name);
        let a = plan_from_desired(
            4,
            &desired(MANIFEST, components.clone(), config("fast")),
            &addr,
        )
        .unwrap();
        let mut d = desired(MANIFEST, components.clone(), config("fast"));
        d["controls"] = json!({});
        let b = plan_from_desired(4, &d, &addr).unwrap();
        let c =
            plan_from_desired(4, &desired(MANIFEST, components, config("slow")), &addr).unwrap();
        assert_eq!(a.components[0].spec_hash, b.components[0].spec_hash);
        assert_ne!(a.components[0].spec_hash, c.components[0].spec_hash);
        assert_eq!(a.components[1].spec_hash, c.components[1].spec_hash);
    }

    #[test]
    fn a_missing_config_key_leaves_the_variable_empty_and_says_so() {
        let manifest = r#"version: v1
components:
  - name: api
    docker: {image: "localhost/api:1"}
    env:
      - {name: MODE, config-ref: mode}
      - {name: LEVEL, config-ref: level, value: info}
"#;
        let d = desired(
            manifest,
            json!([{"name": "api", "artifact": {"kind": "image", "reference": "localhost/api:1"}}]),
            json!(null),
        );
        let plan = plan_from_desired(4, &d, &ctx("amd64", &by_name)).unwrap();
        let api = plan.component("api").unwrap();
        assert_eq!(api.env["MODE"], "");
        assert_eq!(api.env["LEVEL"], "info");
        assert_eq!(plan.notices.len(), 1, "{:?}", plan.notices);
        assert_eq!(plan.notices[0].code, "config-key-missing");
        assert!(
            plan.notices[0].message.contains("config key \"mode\""),
            "{:?}",
            plan.notices
        );
    }

    #[test]
    fn a_missing_config_file_without_default_is_a_clear_error() {
        let d = desired(
            MANIFEST,
            json!([
                {"name": "api", "artifact": {"kind": "image", "reference": "localhost/api:1"}},
                {"name": "db", "artifact": {"kind": "package", "digest": "ab", "size": 10}}
            ]),
            json!(null),
        );
        let err = plan_from_desired(4, &d, &ctx("amd64", &by_name)).unwrap_err();
        assert!(err.0.contains("config key \"api.conf\""), "{err}");
        assert!(err.0.contains("default content"), "{err}");
    }

    const DEPENDENT: &str = r#"version: v1
components:
  - name: api
    docker: {image: "localhost/api:1"}
    ports: [8080]
    env:
      - {name: POSTGRES_USER, config-ref: db-user, value: app}
      - {name: POSTGRES_PASSWORD, config-ref: db-password}
      - {name: DB_HOST, component-ref: store}
      - name: DATABASE_URL
        value: postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@$(DB_HOST):5432/app
      - {name: EARLY, value: "$(LATE)-$$(DB_HOST)"}
      - {name: LATE, value: late}
      - {name: SELF, component-ref: api}
      - {name: JSON, value: '{"url": "$(DATABASE_URL)", "me": "$(SELF)"}'}
      - {name: DEFAULTED, config-ref: absent, value: "at $(DB_HOST)"}
    command: ["sh", "-c"]
    args: ["echo started at $(date) for $(DATABASE_URL) by $POSTGRES_USER, $(LATE) $$(LATE)"]
    identity: reports-writer
  - name: store
    process: {path: ./store, command: ["./store", "--port", "$(PORT)"]}
    ports: [5432]
    env: [{name: PORT, value: "5432"}]
    args: ["--data", "$(DATA)"]
"#;

    #[test]
    fn dependent_variables_expand_from_earlier_env_and_components() {
        let d = desired(
            DEPENDENT,
            json!([
                {"name": "api", "artifact": {"kind": "image", "reference": "localhost/api:1"}},
                {"name": "store", "artifact": {"kind": "package", "digest": "ab", "size": 10}}
            ]),
            json!({"name": "prod", "version": 1, "data": {
                "env": {"db-password": "s3cr3t$(X)"}, "files": {}}}),
        );
        // As the runtimes answer: containers by name, processes on the host.
        let address = |name: &str, kind: RuntimeKind, _: Option<u16>| match kind {
            RuntimeKind::Container => name.to_owned(),
            RuntimeKind::Process => "127.0.0.1".to_owned(),
        };
        let plan = plan_from_desired(4, &d, &ctx("amd64", &address)).unwrap();
        let api = plan.component("api").unwrap();
        assert_eq!(
            api.env["DATABASE_URL"], "postgresql://app:s3cr3t$(X)@127.0.0.1:5432/app",
            "a config value is used as it is, never expanded again"
        );
        assert_eq!(
            api.env["EARLY"], "$(LATE)-$(DB_HOST)",
            "only earlier variables"
        );
        assert_eq!(api.env["SELF"], "api");
        assert_eq!(
            api.env["JSON"],
            r#"{"url": "postgresql://app:s3cr3t$(X)@127.0.0.1:5432/app", "me": "api"}"#
        );
        assert_eq!(api.env["DEFAULTED"], "at 127.0.0.1");
        assert_eq!(
            api.args.as_deref().unwrap(),
            [
                "echo started at $(date) for postgresql://app:s3cr3t$(X)@127.0.0.1:5432/app by app, late $(LATE)"
            ],
            "command and args see every variable; a shell's $(date) stays"
        );
        let store = plan.component("store").unwrap();
        assert_eq!(
            store.process_argv(),
            ["./store", "--port", "$(PORT)", "--data", "$(DATA)"],
            "the process command is the package's, as written; args expand"
        );
        let codes: Vec<&str> = plan.notices.iter().map(|n| n.code.as_str()).collect();
        assert_eq!(codes, ["identity-unavailable"]);
        assert!(plan.notices[0].message.contains("reports-writer"));
    }

    const MULTI_ARCH: &str = r#"version: v1
components:
  - name: web
    docker:
      file: Dockerfile
      platform: [{arch: amd64}, {arch: arm64}]
"#;

    fn multi_arch_build() -> serde_json::Value {
        let image = |arch: &str, id: &str| {
            json!({"arch": arch, "reference": format!("trellis.local/p/web:abc-{arch}"),
                   "archive": {"index": id, "size": 10, "image_id": format!("sha256:{id}")}})
        };
        json!([{"name": "web", "artifact": {"kind": "image", "reference": "trellis.local/p/web:abc",
            "platforms": [image("amd64", "aa"), image("arm64", "bb")]}}])
    }

    #[test]
    fn an_outpost_runs_the_image_of_its_architecture() {
        let d = desired(MULTI_ARCH, multi_arch_build(), json!(null));
        for (arch, reference, index) in [
            ("amd64", "trellis.local/p/web:abc-amd64", "aa"),
            ("arm64", "trellis.local/p/web:abc-arm64", "bb"),
        ] {
            let plan = plan_from_desired(4, &d, &ctx(arch, &by_name)).unwrap();
            let Workload::Image {
                reference: got,
                platform,
                archive,
            } = &plan.components[0].workload
            else {
                panic!("an image")
            };
            assert_eq!(got, reference);
            assert_eq!(platform.as_deref(), Some(&*format!("linux/{arch}")));
            assert_eq!(archive.as_ref().unwrap().index, index);
        }
    }

    #[test]
    fn an_outpost_of_an_architecture_the_build_lacks_refuses_the_release() {
        let d = desired(MULTI_ARCH, multi_arch_build(), json!(null));
        let err = plan_from_desired(4, &d, &ctx("riscv64", &by_name)).unwrap_err();
        assert!(err.0.contains("runs on amd64, arm64"), "{err}");
        assert!(err.0.contains("this outpost is riscv64"), "{err}");
        // A build that lacks one of the listed architectures.
        let mut build = multi_arch_build();
        build[0]["artifact"]["platforms"]
            .as_array_mut()
            .unwrap()
            .remove(1);
        let d = desired(MULTI_ARCH, build, json!(null));
        let err = plan_from_desired(4, &d, &ctx("arm64", &by_name)).unwrap_err();
        assert!(err.0.contains("has images for amd64 only"), "{err}");
    }

    #[test]
    fn a_stage_without_release_plans_nothing() {
        let plan = plan_from_desired(
            1,
            &json!({"revision": 1, "suspended": false, "release": null, "build": null}),
            &ctx("amd64", &by_name),
        )
        .unwrap();
        assert!(plan.components.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for value in [
            json!(7),
            json!({"release": 3}),
            json!({"build": {"manifest": 1}}),
        ] {
            let _ = plan_from_desired(1, &value, &ctx("amd64", &by_name));
        }
    }
}
