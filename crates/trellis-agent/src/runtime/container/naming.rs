//! Names and labels of the engine objects the container runtime makes.
//!
//! Every container, network and volume carries `io.trellis.*` labels; the
//! runtime finds its objects again by label only (names are for people),
//! which is how a restarted agent adopts what the previous one started.
//!
//! Names join the project, stage and component with `_`, which no DNS
//! label contains, so two stages can never share a name (with `-`, project
//! `a-b` stage `c` and project `a` stage `b-c` would):
//!
//! | object | name |
//! |---|---|
//! | stage network | `trellis-<project>_<stage>` |
//! | container | `trellis-<project>_<stage>_<component>-<replica>` |
//! | volume | `trellis-<project>_<stage>_<component>_<storage>` |

use std::collections::HashMap;

use trellis_model::manifest::Schedule;
use trellis_model::{NameKind, validate_name};

use super::PublishPolicy;
use crate::runtime::{ComponentPlan, RuntimeError};
use crate::state::StageKey;

pub const OUTPOST: &str = "io.trellis.outpost";
pub const PROJECT: &str = "io.trellis.project";
pub const STAGE: &str = "io.trellis.stage";
pub const COMPONENT: &str = "io.trellis.component";
pub const REPLICA: &str = "io.trellis.replica";
pub const REVISION: &str = "io.trellis.revision";
pub const RELEASE: &str = "io.trellis.release";
pub const SPEC_HASH: &str = "io.trellis.spec-hash";
pub const RESTART_GENERATION: &str = "io.trellis.restart-generation";
/// The spec hash plus what the outpost adds to it (publish settings, the
/// release of an `@release` job, this runtime's container layout); a
/// difference means a new container.
pub const CONFIG_HASH: &str = "io.trellis.config-hash";
/// How many replicas the component was created with.
pub const REPLICAS: &str = "io.trellis.replicas";
/// The component's ports, comma-separated (the first one is its endpoint).
pub const PORTS: &str = "io.trellis.ports";
/// `true` on the replica whose ports are published on the host.
pub const PUBLISHED: &str = "io.trellis.published";
/// The cron expression or `@release` of a scheduled component.
pub const SCHEDULE: &str = "io.trellis.schedule";
pub const TIMEZONE: &str = "io.trellis.timezone";
pub const STORAGE: &str = "io.trellis.storage";

/// Bumped whenever the way this runtime lays out a container changes, so an
/// upgraded agent replaces containers it would now create differently.
const LAYOUT_VERSION: &str = "container-layout-1";

/// Checks that a name coming from the hub is a DNS label before it becomes
/// part of an engine object's name or a path on the host.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), RuntimeError> {
    validate_name(kind, name).map_err(|e| {
        RuntimeError::new(
            "invalid-name",
            format!("the container runtime refused a plan: {e}"),
        )
        .with_hint(
            "the hub checks names before it sends them; this plan is damaged or from an \
                 incompatible hub",
        )
    })
}

pub fn check_stage(stage: &StageKey) -> Result<(), RuntimeError> {
    check_name(NameKind::Project, &stage.project)?;
    check_name(NameKind::Stage, &stage.stage)
}

/// The stage's network (also the prefix of its other objects).
pub fn network_name(stage: &StageKey) -> String {
    format!("trellis-{}_{}", stage.project, stage.stage)
}

pub fn container_name(stage: &StageKey, component: &str, replica: u32) -> String {
    format!("{}_{component}-{replica}", network_name(stage))
}

pub fn volume_name(stage: &StageKey, component: &str, storage: &str) -> String {
    format!("{}_{component}_{storage}", network_name(stage))
}

/// The labels every object of `stage` carries.
pub fn stage_labels(outpost: &str, stage: &StageKey) -> HashMap<String, String> {
    HashMap::from([
        (OUTPOST.to_owned(), outpost.to_owned()),
        (PROJECT.to_owned(), stage.project.clone()),
        (STAGE.to_owned(), stage.stage.clone()),
    ])
}

/// Label filters (`key=value`) matching the objects of `stage`, or of every
/// stage of the outpost when `stage` is `None`.
pub fn label_filters(outpost: &str, stage: Option<&StageKey>) -> Vec<String> {
    let mut filters = vec![format!("{OUTPOST}={outpost}")];
    if let Some(stage) = stage {
        filters.push(format!("{PROJECT}={}", stage.project));
        filters.push(format!("{STAGE}={}", stage.stage));
    }
    filters
}

/// Whether `labels` say the object belongs to `stage` of `outpost`.
pub fn belongs_to(labels: &HashMap<String, String>, outpost: &str, stage: &StageKey) -> bool {
    labels.get(OUTPOST).map(String::as_str) == Some(outpost)
        && labels.get(PROJECT) == Some(&stage.project)
        && labels.get(STAGE) == Some(&stage.stage)
}

/// How many containers a component runs: scheduled components run one.
pub fn replicas_of(plan: &ComponentPlan) -> u32 {
    if plan.schedule.is_some() {
        1
    } else {
        plan.replicas.max(1)
    }
}

/// See [`CONFIG_HASH`].
pub fn config_hash(plan: &ComponentPlan, release: Option<u64>, publish: &PublishPolicy) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(LAYOUT_VERSION.as_bytes());
    hasher.update(b"\0");
    hasher.update(plan.spec_hash.as_bytes());
    if publish.publish && !plan.ports.is_empty() && plan.schedule.is_none() {
        hasher.update(b"\0publish\0");
        hasher.update(publish.host_ip.as_bytes());
    }
    if matches!(plan.schedule, Some(Schedule::OnRelease)) {
        // One container per release: it runs once, and its exit is the
        // record that it ran.
        hasher.update(b"\0release\0");
        hasher.update(release.unwrap_or(0).to_string().as_bytes());
    }
    hasher.finalize().to_hex()[..16].to_owned()
}

/// What a plan stamps on the containers it makes.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub revision: u64,
    pub release: Option<u64>,
    pub config_hash: &'a str,
}

/// The labels of one container.
pub fn container_labels(
    outpost: &str,
    stage: &StageKey,
    plan: &ComponentPlan,
    replica: u32,
    stamp: Stamp<'_>,
    published: bool,
) -> HashMap<String, String> {
    let Stamp {
        revision,
        release,
        config_hash,
    } = stamp;
    let mut labels = stage_labels(outpost, stage);
    let mut put = |k: &str, v: String| {
        labels.insert(k.to_owned(), v);
    };
    put(COMPONENT, plan.name.clone());
    put(REPLICA, replica.to_string());
    put(REVISION, revision.to_string());
    put(RELEASE, release.map(|r| r.to_string()).unwrap_or_default());
    put(SPEC_HASH, plan.spec_hash.clone());
    put(RESTART_GENERATION, plan.restart_generation.to_string());
    put(CONFIG_HASH, config_hash.to_owned());
    put(REPLICAS, replicas_of(plan).to_string());
    put(
        PORTS,
        plan.ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    put(PUBLISHED, published.to_string());
    if let Some(schedule) = &plan.schedule {
        put(SCHEDULE, schedule.to_string());
        if let Some(tz) = &plan.timezone {
            put(TIMEZONE, tz.clone());
        }
    }
    labels
}

/// The labels of a volume of `component`.
pub fn volume_labels(
    outpost: &str,
    stage: &StageKey,
    component: &str,
    storage: &str,
) -> HashMap<String, String> {
    let mut labels = stage_labels(outpost, stage);
    labels.insert(COMPONENT.to_owned(), component.to_owned());
    labels.insert(STORAGE.to_owned(), storage.to_owned());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_different_stages_never_collide() {
        let a = StageKey::new("a-b", "c");
        let b = StageKey::new("a", "b-c");
        assert_ne!(network_name(&a), network_name(&b));
        assert_ne!(container_name(&a, "web", 0), container_name(&b, "web", 0));
        assert_ne!(volume_name(&a, "db", "data"), volume_name(&b, "db", "data"));
        // Components and storage names cannot be confused either.
        let s = StageKey::new("p", "s");
        assert_ne!(volume_name(&s, "a-b", "c"), volume_name(&s, "a", "b-c"));
        assert_eq!(container_name(&s, "web", 1), "trellis-p_s_web-1");
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in ["../etc", "a/b", "A", "", "x_y"] {
            assert!(check_stage(&StageKey::new(bad, "s")).is_err(), "{bad}");
            assert!(check_stage(&StageKey::new("p", bad)).is_err(), "{bad}");
        }
        assert!(check_stage(&StageKey::new("shop", "prod")).is_ok());
    }
}
