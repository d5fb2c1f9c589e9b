//! From the hub's desired state to a [`StagePlan`]: every component with its
//! env, files, command and args resolved, so a runtime only has to run it.
//!
//! The desired state (see `trellis_hub::link::session::desired_state`) is
//! `{revision, suspended, release, build, controls}`: the release names its
//! config snapshot, the build carries the manifest text and the artifact of
//! each component, and `controls` holds per-component requests made with
//! `trellis stop|start|restart component`. All of it comes from the network,
//! so every lookup that can miss is a [`PlanError`] naming what is missing.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use trellis_model::manifest::{
    ComponentSource, DockerBuild, EnvSource, FileSource, Manifest, Schedule, StorageKind,
    parse_manifest,
};
use trellis_model::{Artifact, Build, ConfigData, Release};

use super::RuntimeKind;

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
}

impl StagePlan {
    /// A plan that runs nothing (a stage without a release).
    pub fn empty(revision: u64) -> Self {
        StagePlan {
            revision,
            release: None,
            build: None,
            suspended: false,
            components: Vec::new(),
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
    /// `command` with `$VAR`s expanded: replaces the image's entrypoint
    /// (containers) or the package's command (processes).
    pub command: Option<Vec<String>>,
    /// `args` with `$VAR`s expanded: the image's cmd (containers) or
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
    /// Bumped by every `trellis restart component`.
    pub restart_generation: u64,
    /// BLAKE3 of everything that, when changed, needs a new workload
    /// (workload, ports, env, files, volumes, resources, replicas, command,
    /// args, user, schedule). Not of `stopped` or the restart generation.
    pub spec_hash: String,
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
            restart_generation: 0,
            spec_hash: String::new(),
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
/// component`), part of the desired state under `controls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentControl {
    #[serde(default)]
    pub stopped: bool,
    /// How many restarts were requested; a change restarts the component.
    #[serde(default)]
    pub restarts: u64,
}

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
}

/// Makes the plan of `desired` (the JSON the hub sent at `revision`).
/// `address_of(component, kind, first_port)` is what a `component-ref`
/// resolves to (the runtime of the referenced component decides).
pub fn plan_from_desired(
    revision: u64,
    desired: &serde_json::Value,
    address_of: &dyn Fn(&str, RuntimeKind, Option<u16>) -> String,
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
    let manifest = parse_manifest(&build.manifest).map_err(|e| {
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
    let components = plan_components(
        &manifest,
        &build,
        config,
        config_name,
        &state.controls,
        state.suspended,
        address_of,
    )?;
    Ok(StagePlan {
        revision,
        release: Some(release.number),
        build: Some(build.name),
        suspended: state.suspended,
        components,
    })
}

fn plan_components(
    manifest: &Manifest,
    build: &Build,
    config: &ConfigData,
    config_name: &str,
    controls: &HashMap<String, ComponentControl>,
    suspended: bool,
    address_of: &dyn Fn(&str, RuntimeKind, Option<u16>) -> String,
) -> Result<Vec<ComponentPlan>, PlanError> {
    // Kinds first: a component-ref needs the kind of the referenced one.
    let mut kinds = HashMap::new();
    for c in &manifest.components {
        let kind = match c.source {
            ComponentSource::Docker(_) => RuntimeKind::Container,
            ComponentSource::Process(_) => RuntimeKind::Process,
        };
        kinds.insert(c.name.as_str(), (kind, c.ports.first().copied()));
    }

    let mut out = Vec::with_capacity(manifest.components.len());
    for c in &manifest.components {
        let artifact = build
            .components
            .iter()
            .find(|b| b.name == c.name)
            .map(|b| &b.artifact);
        let workload = match (&c.source, artifact) {
            (ComponentSource::Docker(docker), Some(Artifact::Image { reference, archive })) => {
                Workload::Image {
                    reference: reference.clone(),
                    platform: docker.platform.clone(),
                    archive: archive.clone(),
                }
            }
            (ComponentSource::Docker(docker), None) => match &docker.build {
                DockerBuild::Image(reference) => Workload::Image {
                    reference: reference.clone(),
                    platform: docker.platform.clone(),
                    archive: None,
                },
                DockerBuild::Dockerfile { .. } => {
                    return Err(PlanError(format!(
                        "build {} has no image for component {:?} (it is built from a Dockerfile)",
                        build.name, c.name
                    )));
                }
            },
            (ComponentSource::Process(process), Some(Artifact::Package { digest, size })) => {
                Workload::Package {
                    digest: digest.clone(),
                    size: *size,
                    argv: process.command.clone(),
                }
            }
            (ComponentSource::Process(_), _) => {
                return Err(PlanError(format!(
                    "build {} has no package for process component {:?}; push the build again",
                    build.name, c.name
                )));
            }
            (ComponentSource::Docker(_), Some(Artifact::Package { .. })) => {
                return Err(PlanError(format!(
                    "build {} holds a package, not an image, for container component {:?}",
                    build.name, c.name
                )));
            }
        };

        let mut env = BTreeMap::new();
        for var in &c.env {
            let value = match &var.source {
                EnvSource::Value(v) => v.clone(),
                EnvSource::ConfigRef { key, default } => match (config.env.get(key), default) {
                    (Some(v), _) => v.clone(),
                    (None, Some(d)) => d.clone(),
                    (None, None) => {
                        return Err(PlanError(format!(
                            "component {:?}: env {} refers to config key {key:?}, which config {config_name} does not have; \
                                 add it with `trellis add config-data` and push a new release",
                            c.name, var.name
                        )));
                    }
                },
                EnvSource::ComponentRef(target) => {
                    let Some((kind, port)) = kinds.get(target.as_str()) else {
                        return Err(PlanError(format!(
                            "component {:?}: env {} refers to component {target:?}, which the manifest does not have",
                            c.name, var.name
                        )));
                    };
                    address_of(target, *kind, *port)
                }
            };
            env.insert(var.name.clone(), value);
        }

        let mut files = Vec::with_capacity(c.files.len());
        for f in &c.files {
            let content = match &f.source {
                FileSource::Content(text) => text.clone(),
                FileSource::ConfigRef(key) => config
                    .files
                    .get(key)
                    .or_else(|| config.env.get(key))
                    .cloned()
                    .ok_or_else(|| {
                        PlanError(format!(
                            "component {:?}: file {} refers to config key {key:?}, which config {config_name} does not have",
                            c.name, f.path
                        ))
                    })?,
            };
            files.push(PlannedFile {
                path: f.path.clone(),
                content,
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

        let command = c
            .command
            .as_ref()
            .map(|words| words.iter().map(|w| expand_vars(w, &env)).collect());
        let args = c
            .args
            .as_ref()
            .map(|words| words.iter().map(|w| expand_vars(w, &env)).collect());
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
            restart_generation: control.restarts,
            spec_hash: String::new(),
        };
        plan.update_spec_hash();
        out.push(plan);
    }
    Ok(out)
}

/// See [`ComponentPlan::spec_hash`].
fn spec_hash(plan: &ComponentPlan) -> String {
    let mut spec = plan.clone();
    spec.stopped = false;
    spec.restart_generation = 0;
    spec.spec_hash = String::new();
    // Serializing our own plain struct cannot fail.
    let bytes = serde_json::to_vec(&spec).unwrap_or_default();
    blake3::hash(&bytes).to_hex()[..16].to_owned()
}

/// Expands `$VAR` and `${VAR}` from `env`; `$$` is a literal `$`. A
/// variable the component's env lacks is left as written, so a `$` meant
/// for a shell inside the command survives.
pub fn expand_vars(word: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        if let Some(inner) = after.strip_prefix('{')
            && let Some(end) = inner.find('}')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(v) if is_var_name(name) => out.push_str(v),
                _ => out.push_str(&rest[at..at + 1 + 1 + end + 1]),
            }
            rest = &inner[end + 1..];
            continue;
        }
        let len = after
            .char_indices()
            .find(|&(i, ch)| {
                !(ch == '_' || ch.is_ascii_alphanumeric()) || (i == 0 && ch.is_ascii_digit())
            })
            .map(|(i, _)| i)
            .unwrap_or(after.len());
        let name = &after[..len];
        match env.get(name) {
            Some(v) if !name.is_empty() => out.push_str(v),
            _ => {
                out.push('$');
                out.push_str(name);
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_dollar_forms() {
        let e = env(&[("PORT", "7000"), ("HOST", "db")]);
        assert_eq!(expand_vars("--port=$PORT", &e), "--port=7000");
        assert_eq!(expand_vars("${HOST}:${PORT}", &e), "db:7000");
        assert_eq!(expand_vars("$$PORT", &e), "$PORT");
        assert_eq!(expand_vars("$MISSING x", &e), "$MISSING x");
        assert_eq!(expand_vars("${MISSING}", &e), "${MISSING}");
        assert_eq!(expand_vars("cost: $5", &e), "cost: $5");
        assert_eq!(expand_vars("end$", &e), "end$");
        assert_eq!(expand_vars("${unclosed", &e), "${unclosed");
        assert_eq!(expand_vars("é$HOST€", &e), "édb€");
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
        let plan = plan_from_desired(4, &d, &|name, kind, port| {
            format!("{name}/{kind}/{}", port.unwrap_or(0))
        })
        .unwrap();
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
        let addr = |n: &str, _: RuntimeKind, _: Option<u16>| n.to_owned();
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
    fn missing_config_key_is_a_clear_error() {
        let d = desired(
            MANIFEST,
            json!([
                {"name": "api", "artifact": {"kind": "image", "reference": "localhost/api:1"}},
                {"name": "db", "artifact": {"kind": "package", "digest": "ab", "size": 10}}
            ]),
            json!(null),
        );
        let err = plan_from_desired(4, &d, &|n, _, _| n.to_owned()).unwrap_err();
        assert!(err.0.contains("config key \"mode\""), "{err}");
    }

    #[test]
    fn a_stage_without_release_plans_nothing() {
        let plan = plan_from_desired(
            1,
            &json!({"revision": 1, "suspended": false, "release": null, "build": null}),
            &|n, _, _| n.to_owned(),
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
            let _ = plan_from_desired(1, &value, &|n, _, _| n.to_owned());
        }
    }
}
