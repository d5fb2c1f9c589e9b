//! The pure part of [`Runtime::plan`](crate::runtime::Runtime::plan) for
//! containers: from the containers found on the engine (by their labels)
//! and the components the plan wants, what to do with each component.
//!
//! The rules, per component:
//!
//! | found | plan | action |
//! |---|---|---|
//! | nothing | — | `create` (created stopped when the plan says `stopped`) |
//! | another config hash, or extra replicas | — | `replace` |
//! | some replicas missing, the rest as planned | — | `create` (the missing ones) |
//! | as planned | `stopped`, some running | `stop` |
//! | as planned | `stopped`, none running | `keep` |
//! | as planned, other restart generation | running | `restart` (new containers) |
//! | as planned, all running (or a scheduled job) | running | `keep` — adoption |
//! | as planned, some not running | running | `create` (start them) |
//! | not in the plan | | `remove` |

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::naming;
use crate::runtime::{Action, ActionKind, ComponentPlan};

/// A container of the stage as found on the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundContainer {
    pub id: String,
    pub name: String,
    pub component: String,
    pub replica: u32,
    pub spec_hash: String,
    pub config_hash: String,
    pub restart_generation: u64,
    pub running: bool,
}

impl FoundContainer {
    /// Reads a container's labels; `None` for a container without a
    /// component label (not one of ours, or damaged).
    pub fn from_labels(
        id: &str,
        name: &str,
        labels: &HashMap<String, String>,
        running: bool,
    ) -> Option<Self> {
        let component = labels.get(naming::COMPONENT)?.clone();
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        Some(FoundContainer {
            id: id.to_owned(),
            name: name.trim_start_matches('/').to_owned(),
            component,
            // A replica label that does not parse makes the container an
            // "extra" one, which a replace clears away.
            replica: get(naming::REPLICA).parse().unwrap_or(u32::MAX),
            spec_hash: get(naming::SPEC_HASH),
            config_hash: get(naming::CONFIG_HASH),
            restart_generation: get(naming::RESTART_GENERATION).parse().unwrap_or(0),
            running,
        })
    }
}

/// A component the plan wants from this runtime.
#[derive(Debug, Clone)]
pub struct Wanted<'a> {
    pub plan: &'a ComponentPlan,
    pub config_hash: String,
}

/// What to do with every component (see the module docs): the plan's
/// components in plan order, then removals by name.
pub fn diff(wanted: &[Wanted<'_>], found: &[FoundContainer]) -> Vec<Action> {
    let mut by_component: BTreeMap<&str, Vec<&FoundContainer>> = BTreeMap::new();
    for container in found {
        by_component
            .entry(container.component.as_str())
            .or_default()
            .push(container);
    }
    let mut actions = Vec::with_capacity(wanted.len());
    for want in wanted {
        let mine = by_component
            .remove(want.plan.name.as_str())
            .unwrap_or_default();
        let (kind, reason) = decide(want, &mine);
        actions.push(Action {
            component: want.plan.name.clone(),
            kind,
            reason,
        });
    }
    for (component, _) in by_component {
        actions.push(Action {
            component: component.to_owned(),
            kind: ActionKind::Remove,
            reason: "it is no longer in the plan".to_owned(),
        });
    }
    actions
}

fn decide(want: &Wanted<'_>, mine: &[&FoundContainer]) -> (ActionKind, String) {
    let plan = want.plan;
    let replicas = naming::replicas_of(plan);
    if mine.is_empty() {
        let reason = if plan.stopped {
            "nothing of it exists yet; it is created stopped, as planned"
        } else {
            "nothing of it exists yet"
        };
        return (ActionKind::Create, reason.to_owned());
    }
    if let Some(other) = mine.iter().find(|c| c.config_hash != want.config_hash) {
        let reason = if other.spec_hash != plan.spec_hash {
            format!(
                "its spec changed ({} → {})",
                display_hash(&other.spec_hash),
                plan.spec_hash
            )
        } else {
            "the outpost's settings for it changed (publishing, release or container layout)"
                .to_owned()
        };
        return (ActionKind::Replace, reason);
    }
    let present: BTreeSet<u32> = mine.iter().map(|c| c.replica).collect();
    if present.len() != mine.len() || present.iter().any(|&r| r >= replicas) {
        return (
            ActionKind::Replace,
            format!("it has containers other than its {replicas} replica(s)"),
        );
    }
    if present.len() < replicas as usize {
        let missing: Vec<String> = (0..replicas)
            .filter(|r| !present.contains(r))
            .map(|r| r.to_string())
            .collect();
        return (
            ActionKind::Create,
            format!("replica {} is missing", missing.join(", ")),
        );
    }
    let running = mine.iter().filter(|c| c.running).count();
    if plan.stopped {
        return if running > 0 {
            (ActionKind::Stop, "it is stopped on request".to_owned())
        } else {
            (ActionKind::Keep, "it is stopped, as planned".to_owned())
        };
    }
    if let Some(c) = mine
        .iter()
        .find(|c| c.restart_generation != plan.restart_generation)
    {
        return (
            ActionKind::Restart,
            format!(
                "a restart was requested (generation {} → {})",
                c.restart_generation, plan.restart_generation
            ),
        );
    }
    if plan.schedule.is_some() {
        return (
            ActionKind::Keep,
            "its job is as planned; it runs on its schedule".to_owned(),
        );
    }
    if running == mine.len() {
        (ActionKind::Keep, "it runs as planned".to_owned())
    } else {
        (
            ActionKind::Create,
            format!(
                "{} of {} replica(s) are not running; start them",
                mine.len() - running,
                mine.len()
            ),
        )
    }
}

fn display_hash(hash: &str) -> &str {
    if hash.is_empty() { "none" } else { hash }
}

#[cfg(test)]
mod tests {

    use trellis_model::manifest::Schedule;

    use super::*;
    use crate::runtime::Workload;

    fn plan(name: &str, spec: &str) -> ComponentPlan {
        ComponentPlan {
            spec_hash: spec.to_owned(),
            ..ComponentPlan::new(
                name,
                Workload::Image {
                    reference: "localhost/x:1".to_owned(),
                    platform: None,
                    archive: None,
                },
            )
        }
    }

    fn found(component: &str, replica: u32, hash: &str, running: bool) -> FoundContainer {
        FoundContainer {
            id: format!("id-{component}-{replica}"),
            name: format!("trellis-p_s_{component}-{replica}"),
            component: component.to_owned(),
            replica,
            spec_hash: hash.to_owned(),
            config_hash: format!("c{hash}"),
            restart_generation: 0,
            running,
        }
    }

    fn want(plan: &ComponentPlan) -> Wanted<'_> {
        Wanted {
            plan,
            config_hash: format!("c{}", plan.spec_hash),
        }
    }

    fn kinds(actions: &[Action]) -> Vec<(String, ActionKind)> {
        actions
            .iter()
            .map(|a| (a.component.clone(), a.kind))
            .collect()
    }

    #[test]
    fn nothing_found_creates_everything() {
        let a = plan("a", "h1");
        let b = plan("b", "h2");
        let actions = diff(&[want(&a), want(&b)], &[]);
        assert_eq!(
            kinds(&actions),
            [
                ("a".into(), ActionKind::Create),
                ("b".into(), ActionKind::Create)
            ]
        );
    }

    #[test]
    fn same_spec_and_running_is_kept() {
        let a = plan("a", "h1");
        let actions = diff(&[want(&a)], &[found("a", 0, "h1", true)]);
        assert_eq!(kinds(&actions), [("a".into(), ActionKind::Keep)]);
    }

    #[test]
    fn another_spec_is_replaced_with_the_reason() {
        let a = plan("a", "h2");
        let actions = diff(&[want(&a)], &[found("a", 0, "h1", true)]);
        assert_eq!(actions[0].kind, ActionKind::Replace);
        assert!(
            actions[0].reason.contains("h1 → h2"),
            "{}",
            actions[0].reason
        );
    }

    #[test]
    fn outpost_settings_change_replaces_too() {
        let a = plan("a", "h1");
        let w = Wanted {
            plan: &a,
            config_hash: "other".to_owned(),
        };
        let actions = diff(&[w], &[found("a", 0, "h1", true)]);
        assert_eq!(actions[0].kind, ActionKind::Replace);
        assert!(
            actions[0].reason.contains("settings"),
            "{}",
            actions[0].reason
        );
    }

    #[test]
    fn stopped_on_request() {
        let mut a = plan("a", "h1");
        a.stopped = true;
        assert_eq!(
            diff(&[want(&a)], &[found("a", 0, "h1", true)])[0].kind,
            ActionKind::Stop
        );
        assert_eq!(
            diff(&[want(&a)], &[found("a", 0, "h1", false)])[0].kind,
            ActionKind::Keep
        );
        // Nothing yet: created (stopped).
        assert_eq!(diff(&[want(&a)], &[])[0].kind, ActionKind::Create);
    }

    #[test]
    fn restart_generation_restarts() {
        let mut a = plan("a", "h1");
        a.restart_generation = 2;
        let actions = diff(&[want(&a)], &[found("a", 0, "h1", true)]);
        assert_eq!(actions[0].kind, ActionKind::Restart);
        // …but not while stopped.
        a.stopped = true;
        let actions = diff(&[want(&a)], &[found("a", 0, "h1", false)]);
        assert_eq!(actions[0].kind, ActionKind::Keep);
    }

    #[test]
    fn not_running_replicas_are_started_and_missing_ones_created() {
        let mut a = plan("a", "h1");
        a.replicas = 2;
        let actions = diff(
            &[want(&a)],
            &[found("a", 0, "h1", true), found("a", 1, "h1", false)],
        );
        assert_eq!(actions[0].kind, ActionKind::Create);
        assert!(actions[0].reason.contains("not running"));
        let actions = diff(&[want(&a)], &[found("a", 0, "h1", true)]);
        assert_eq!(actions[0].kind, ActionKind::Create);
        assert!(actions[0].reason.contains("replica 1 is missing"));
    }

    #[test]
    fn extra_or_duplicate_replicas_are_replaced() {
        let a = plan("a", "h1");
        let actions = diff(
            &[want(&a)],
            &[found("a", 0, "h1", true), found("a", 1, "h1", true)],
        );
        assert_eq!(actions[0].kind, ActionKind::Replace);
        let actions = diff(
            &[want(&a)],
            &[found("a", 0, "h1", true), found("a", 0, "h1", true)],
        );
        assert_eq!(actions[0].kind, ActionKind::Replace);
    }

    #[test]
    fn scheduled_jobs_are_kept_while_not_running() {
        let mut job = plan("job", "h1");
        job.schedule = Some(Schedule::OnRelease);
        job.replicas = 3; // ignored: a job runs one container
        let actions = diff(&[want(&job)], &[found("job", 0, "h1", false)]);
        assert_eq!(actions[0].kind, ActionKind::Keep);
    }

    #[test]
    fn components_not_in_the_plan_are_removed_in_name_order() {
        let a = plan("a", "h1");
        let actions = diff(
            &[want(&a)],
            &[
                found("zeta", 0, "x", true),
                found("a", 0, "h1", true),
                found("beta", 0, "x", false),
                found("beta", 1, "x", false),
            ],
        );
        assert_eq!(
            kinds(&actions),
            [
                ("a".into(), ActionKind::Keep),
                ("beta".into(), ActionKind::Remove),
                ("zeta".into(), ActionKind::Remove),
            ]
        );
    }

    #[test]
    fn labels_are_read_leniently() {
        let labels = HashMap::from([
            (naming::COMPONENT.to_owned(), "web".to_owned()),
            (naming::REPLICA.to_owned(), "zero".to_owned()),
        ]);
        let c = FoundContainer::from_labels("id", "/n", &labels, true).unwrap();
        assert_eq!(c.replica, u32::MAX);
        assert_eq!(c.name, "n");
        assert!(FoundContainer::from_labels("id", "n", &HashMap::new(), true).is_none());
    }
}
