//! The behaviour every [`Store`] backend must show, as one async function
//! per behaviour taking `&dyn Store`.
//!
//! Backends run it through [`for_each_suite_test!`](crate::for_each_suite_test),
//! which names every function here, so each behaviour becomes its own test
//! per backend (`memory::outpost_capacity`, `sqlite::outpost_capacity`, …)
//! and a new backend or a new behaviour cannot be left out by accident.
//! Each function expects a fresh, empty store.
//!
//! This is test code that ships in the library so other crates (a future
//! PostgreSQL backend) can run it; its panics are its assertions.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;

use chrono::DateTime;
use serde_json::json;
use trellis_model::{
    Artifact, BuildComponent, ComponentAction, ComponentControl, ConfigData, ConfigSnapshot,
    NewBuild, Outpost, OutpostLink, Project, ReleaseState, Role, Stage, StageSync, StageType,
    Timestamp, User,
};

use crate::{
    AdminGuarded, DesiredAsk, JoinTokenRefusal, LinkActivity, LinkHello, NewRelease, NewStage,
    OutpostStage, OutpostUpdate, ProjectUpdate, PushedReleases, Result, StageFilter, StageKey,
    StageUpdate, Store, StoreError, StoredAccessKey, SyncUpdate,
};

/// Calls `$callback!` with the name of every behaviour in the suite.
///
/// ```text
/// macro_rules! backend_tests { ($($name:ident),*) => { /* one test each */ } }
/// trellis_store::for_each_suite_test!(backend_tests);
/// ```
#[macro_export]
macro_rules! for_each_suite_test {
    ($callback:ident) => {
        $callback! {
            users,
            access_keys,
            last_admin_key,
            projects,
            members,
            audit_log,
            backups,
            outposts,
            stage_creation,
            outpost_capacity,
            outpost_uri_rotation_and_revocation,
            outpost_updates,
            link_profiles,
            stage_updates,
            build_numbering,
            release_push,
            failed_push_changes_nothing,
            release_push_to_many_stages,
            configs,
            config_key_removal,
            delete_project_rules,
            delete_stage_rules,
            delete_build_rules,
            delete_outpost_rules,
            timestamps_keep_milliseconds,
            concurrent_writes_keep_numbering,
            join_tokens,
            outpost_links,
            link_activity,
            stage_sync_delivery,
            stage_sync_status_and_release_states,
            stage_sync_batches,
            stage_sync_batch_means_one_at_a_time,
            stage_summaries,
            deletes_remove_link_rows,
            component_controls,
            deletes_remove_component_controls,
            outpost_desired_states,
            outposts_desired_in_one_read,
            project_updates,
            archive_and_restore,
            rollouts,
            rollouts_refuse_overlap,
            rollout_releases_are_recorded_with_the_rollout,
            agent_updates,
            agent_update_waves,
            a_failure_report_promotes_no_release,
            agent_binaries,
        }
    };
}

// --- fixtures ---

/// A fixed instant with whole milliseconds, plus `ms`; both backends return
/// such timestamps unchanged.
fn at(ms: i64) -> Timestamp {
    DateTime::from_timestamp_millis(1_700_000_000_000 + ms).expect("a representable instant")
}

fn user(name: &str) -> User {
    User {
        name: name.into(),
        admin: false,
        created_at: at(0),
    }
}

fn project(name: &str) -> Project {
    Project {
        display_name: format!("Project {name}"),
        archived_at: None,
        name: name.into(),
        description: format!("the {name} project"),
        created_at: at(1),
    }
}

fn outpost(name: &str, max_stages: Option<u32>) -> Outpost {
    Outpost {
        name: name.into(),
        display_name: format!("Outpost {name}"),
        description: String::new(),
        labels: BTreeMap::new(),
        max_stages,
        uri_generation: 1,
        revoked_at: None,
        ingress_domain: None,
        created_at: at(2),
    }
}

fn new_stage(project: &str, name: &str, outpost: &str) -> NewStage {
    NewStage {
        project: project.into(),
        name: name.into(),
        stage_type: StageType::Dev,
        display_name: format!("Stage {name}"),
        outpost: outpost.into(),
    }
}

fn new_build(branch: &str) -> NewBuild {
    NewBuild {
        branch: branch.into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        manifest_file: "trellis.yaml".into(),
        manifest: "version: 1\ncomponents: {}\n".into(),
        components: vec![
            BuildComponent {
                name: "web".into(),
                artifact: Artifact::Image {
                    reference: "registry.example/web:1".into(),
                    archive: None,
                    platforms: Vec::new(),
                },
            },
            BuildComponent {
                name: "worker".into(),
                artifact: Artifact::Package {
                    digest: "ab".repeat(32),
                    size: 4096,
                },
            },
        ],
    }
}

fn new_release(project: &str, stage: &str, build: &str) -> NewRelease {
    NewRelease {
        project: project.into(),
        stage: stage.into(),
        build: build.into(),
        config: None,
        created_by: "alice".into(),
    }
}

fn config_data(env: &[(&str, &str)], files: &[(&str, &str)]) -> ConfigData {
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    ConfigData {
        env: map(env),
        files: map(files),
        ..ConfigData::default()
    }
}

/// User `alice`, outpost `local` (unlimited) and project `name` owned by
/// alice, creating whichever of them is missing.
async fn setup(store: &dyn Store, name: &str) {
    match store.create_user(&user("alice")).await {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
        Err(e) => panic!("creating alice: {e}"),
    }
    match store.create_outpost(&outpost("local", None)).await {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
        Err(e) => panic!("creating the local outpost: {e}"),
    }
    store
        .create_project(&project(name), "alice")
        .await
        .expect("creating a project");
}

async fn stage_in(store: &dyn Store, project: &str, name: &str) -> Stage {
    store
        .create_stage(&new_stage(project, name, "local"), at(10))
        .await
        .expect("creating a stage")
}

/// A project with stages `s0`, `s1`, … on the local outpost, for tests of
/// code built on a store.
pub async fn seed_stages(store: &dyn Store, project: &str, stages: usize) {
    setup(store, project).await;
    for i in 0..stages {
        stage_in(store, project, &format!("s{i}")).await;
    }
}

/// The zeros of a stage nothing was delivered to or reported for yet.
fn no_sync(project: &str, stage: &str) -> StageSync {
    StageSync {
        project: project.into(),
        stage: stage.into(),
        ..StageSync::default()
    }
}

/// A status report of a stage where nothing runs.
fn idle_report() -> serde_json::Value {
    json!({ "components": [] })
}

fn suspension(suspended: bool) -> StageUpdate {
    StageUpdate {
        display_name: None,
        suspended: Some(suspended),
        stage_type: None,
    }
}

/// The states of the stage's releases, oldest first.
async fn release_states(store: &dyn Store, project: &str, stage: &str) -> Vec<ReleaseState> {
    let mut releases = store
        .list_releases(project, stage)
        .await
        .expect("listing releases");
    releases.sort_by_key(|r| r.number);
    releases.into_iter().map(|r| r.state).collect()
}

// --- error assertions ---

#[track_caller]
fn assert_not_found<T: Debug>(result: Result<T>, kind: &str, name: &str) {
    match result {
        Err(StoreError::NotFound { kind: k, name: n }) if k == kind && n == name => {}
        other => panic!("expected NotFound {{ kind: {kind:?}, name: {name:?} }}, got {other:?}"),
    }
}

#[track_caller]
fn assert_exists<T: Debug>(result: Result<T>, kind: &str, name: &str) {
    match result {
        Err(StoreError::AlreadyExists { kind: k, name: n }) if k == kind && n == name => {}
        other => {
            panic!("expected AlreadyExists {{ kind: {kind:?}, name: {name:?} }}, got {other:?}")
        }
    }
}

/// Returns `(what, hint)` of an `InUse` refusal.
#[track_caller]
fn assert_in_use<T: Debug>(result: Result<T>) -> (String, String) {
    match result {
        Err(StoreError::InUse { what, hint }) => (what, hint),
        other => panic!("expected InUse, got {other:?}"),
    }
}

// --- the behaviours ---

/// A rollout of `stages` (on the local outpost) in two waves: the first
/// stage, then the rest.
pub fn new_rollout(
    project: &str,
    stages: &[&str],
    created: i64,
) -> trellis_model::rollout::NewRollout {
    use trellis_model::rollout::{NewRollout, WavePause, parse_waves};
    let sizes = parse_waves("1,100%").expect("valid waves");
    let (waves, planned) = NewRollout::plan(
        project,
        &sizes,
        stages
            .iter()
            .map(|s| (s.to_string(), "local".to_string()))
            .collect(),
    );
    NewRollout {
        project: project.into(),
        build: "main_b1".into(),
        config: None,
        selector: "site=munich".into(),
        waves,
        success_threshold: 9500,
        wave_timeout_seconds: 1800,
        pause: WavePause::After { seconds: 60 },
        created_at: at(created),
        created_by: "alice".into(),
        stages: planned,
    }
}

/// A rollout is numbered, read back whole, listed without its stages, and
/// saved only over the version it was read at; it goes with its project.
pub async fn rollouts(store: &dyn Store) {
    use trellis_model::rollout::{RolloutState, StageRolloutState};
    setup(store, "shop").await;
    setup(store, "mill").await;
    let first = store
        .create_rollout(&new_rollout("shop", &["a", "b", "c"], 1))
        .await
        .unwrap();
    assert_eq!(first.id, 1);
    assert_eq!(first.state, RolloutState::Running);
    assert_eq!(first.version, 1);
    assert_eq!(first.stages.len(), 3);
    assert_eq!(first.waves.len(), 2);
    assert_eq!(first.waves[0].stages, 1);
    let other = store
        .create_rollout(&new_rollout("mill", &["a"], 2))
        .await
        .unwrap();
    assert_eq!(other.id, 2, "numbered across projects");
    assert_eq!(store.get_rollout(1).await.unwrap(), first);
    assert_not_found(store.get_rollout(99).await, "rollout", "99");
    assert_not_found(
        store.get_rollout(u64::MAX).await,
        "rollout",
        &u64::MAX.to_string(),
    );
    assert_not_found(
        store.create_rollout(&new_rollout("nope", &["a"], 3)).await,
        "project",
        "nope",
    );

    // Lists: newest first, without stages.
    let all = store.list_rollouts(None).await.unwrap();
    assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), vec![2, 1]);
    assert!(all.iter().all(|r| r.stages.is_empty()));
    let shop = store.list_rollouts(Some("shop")).await.unwrap();
    assert_eq!(shop.len(), 1);
    assert_eq!(
        shop[0],
        trellis_model::rollout::Rollout {
            stages: Vec::new(),
            ..first.clone()
        }
    );
    assert_not_found(store.list_rollouts(Some("nope")).await, "project", "nope");

    // A save bumps the version; one over a stale version changes nothing.
    let mut changed = first.clone();
    changed.state = RolloutState::Waiting;
    changed.stages[0].state = StageRolloutState::Applied;
    changed.stages[0].release = Some(4);
    changed.halt_reason = Some("why".into());
    let saved = store.save_rollout(&changed).await.unwrap();
    assert_eq!(saved.version, 2);
    assert_eq!(store.get_rollout(1).await.unwrap(), saved);
    let mut stale = first.clone();
    stale.state = RolloutState::Aborted;
    let (what, _) = assert_in_use(store.save_rollout(&stale).await);
    assert!(what.contains("rollout 1 changed"), "{what}");
    assert_eq!(store.get_rollout(1).await.unwrap(), saved);
    let mut gone = saved.clone();
    gone.id = 77;
    assert_not_found(store.save_rollout(&gone).await, "rollout", "77");

    // A save that changes one wave's stages keeps the other wave's.
    let mut later = saved.clone();
    later.stages[2].state = StageRolloutState::Pushed;
    later.stages[2].message = Some("on its way".into());
    let later = store.save_rollout(&later).await.unwrap();
    assert_eq!(later.version, 3);
    assert_eq!(store.get_rollout(1).await.unwrap(), later);

    // Deleted with their project; numbers are not given again.
    store.delete_project("mill", true).await.unwrap();
    assert_not_found(store.get_rollout(2).await, "rollout", "2");
    let next = store
        .create_rollout(&new_rollout("shop", &["x"], 4))
        .await
        .unwrap();
    assert_eq!(next.id, 3);
}

/// A rollout's releases and its record of them are written together, or
/// neither is: a stale rollout, a stage it does not hold, or a release
/// that cannot be recorded leaves both the stages and the rollout as they
/// were.
pub async fn rollout_releases_are_recorded_with_the_rollout(store: &dyn Store) {
    use trellis_model::rollout::StageRolloutState;
    setup(store, "shop").await;
    for stage in ["a", "b", "c", "d"] {
        stage_in(store, "shop", stage).await;
    }
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    let first = store
        .create_rollout(&new_rollout("shop", &["a", "b", "c"], 1))
        .await
        .unwrap();
    assert_eq!(first.stages[0].wave, 0);
    let released = |stage: &str| {
        let stage = stage.to_owned();
        async move { store.list_releases("shop", &stage).await.unwrap().len() }
    };

    // The first wave starts: its start, its release and the record of it
    // in one write.
    let mut started = first.clone();
    started.waves[0].started_at = Some(at(30));
    let a = started.stages[0].stage.clone();
    let (saved, pushed) = store
        .push_rollout_releases(&started, &[new_release("shop", &a, &build.name)], at(31))
        .await
        .unwrap();
    assert_eq!(pushed.outposts, vec!["local".to_owned()]);
    assert_eq!(pushed.releases.len(), 1);
    assert_eq!(saved.version, first.version + 1);
    assert_eq!(saved.waves[0].started_at, Some(at(30)));
    assert_eq!(saved.stages[0].state, StageRolloutState::Pushed);
    assert_eq!(saved.stages[0].release, Some(pushed.releases[0].number));
    assert_eq!(saved.stages[0].revision, Some(pushed.releases[0].revision));
    assert!(
        saved.stages[1..]
            .iter()
            .all(|s| s.state == StageRolloutState::Waiting && s.release.is_none())
    );
    assert_eq!(store.get_rollout(first.id).await.unwrap(), saved);
    assert_eq!(released(&a).await, 1);

    let wave_two: Vec<NewRelease> = saved.stages[1..]
        .iter()
        .map(|s| new_release("shop", &s.stage, &build.name))
        .collect();
    // Over a stale record: refused, nothing pushed.
    let (what, _) = assert_in_use(store.push_rollout_releases(&first, &wave_two, at(32)).await);
    assert!(
        what.contains(&format!("rollout {} changed", first.id)),
        "{what}"
    );
    // To a stage the rollout does not hold, or of another project.
    let mut stranger = wave_two.clone();
    stranger.push(new_release("shop", "d", &build.name));
    assert_not_found(
        store.push_rollout_releases(&saved, &stranger, at(33)).await,
        "rollout stage",
        &format!("shop/d in rollout {}", first.id),
    );
    // A release that cannot be recorded (no such build).
    let mut unknown = wave_two.clone();
    unknown[1].build = "main_b99".into();
    assert_not_found(
        store.push_rollout_releases(&saved, &unknown, at(34)).await,
        "build",
        "shop/main_b99",
    );
    // A rollout that is gone.
    let mut gone = saved.clone();
    gone.id = 77;
    assert_not_found(
        store.push_rollout_releases(&gone, &wave_two, at(35)).await,
        "rollout",
        "77",
    );
    for stage in wave_two.iter().map(|r| r.stage.as_str()).chain(["d"]) {
        assert_eq!(released(stage).await, 0, "stage {stage} got a release");
    }
    assert_eq!(store.get_rollout(first.id).await.unwrap(), saved);

    // The second wave, both stages in one write.
    let (later, pushed) = store
        .push_rollout_releases(&saved, &wave_two, at(36))
        .await
        .unwrap();
    assert_eq!(pushed.releases.len(), 2);
    assert!(
        later
            .stages
            .iter()
            .all(|s| s.state == StageRolloutState::Pushed && s.release == Some(1))
    );
    assert_eq!(store.get_rollout(first.id).await.unwrap(), later);
}

/// Two rollouts may not hold the same stage at once: the second is
/// refused, naming the first, and recorded nowhere; once the first is no
/// longer active (or in another project) the stages are free.
pub async fn rollouts_refuse_overlap(store: &dyn Store) {
    use trellis_model::rollout::RolloutState;
    setup(store, "shop").await;
    setup(store, "mill").await;
    let first = store
        .create_rollout(&new_rollout("shop", &["a", "b", "c"], 1))
        .await
        .unwrap();
    let (what, hint) = assert_in_use(
        store
            .create_rollout(&new_rollout("shop", &["c", "d"], 2))
            .await,
    );
    assert!(what.contains("rollout 1 (running"), "{what}");
    assert!(what.contains("1 of these stages: c"), "{what}");
    assert!(hint.contains("trellis abort rollout 1"), "{hint}");
    assert_eq!(store.list_rollouts(None).await.unwrap().len(), 1);
    // Other stages, or another project's, are free.
    store
        .create_rollout(&new_rollout("shop", &["d"], 3))
        .await
        .unwrap();
    store
        .create_rollout(&new_rollout("mill", &["a"], 4))
        .await
        .unwrap();
    // A paused rollout still holds them; a halted one no longer does.
    let mut paused = first.clone();
    paused.state = RolloutState::Paused;
    let paused = store.save_rollout(&paused).await.unwrap();
    assert_in_use(store.create_rollout(&new_rollout("shop", &["a"], 5)).await);
    let mut halted = paused;
    halted.state = RolloutState::Halted;
    store.save_rollout(&halted).await.unwrap();
    let again = store
        .create_rollout(&new_rollout("shop", &["a", "b"], 6))
        .await
        .unwrap();
    assert_eq!(again.id, 4);
}

fn agent_binary(version: &str, arch: &str, blake3: &str, at_ms: i64) -> trellis_model::AgentBinary {
    trellis_model::AgentBinary {
        version: version.into(),
        arch: arch.into(),
        size: 12_345_678,
        blake3: blake3.repeat(64 / blake3.len()),
        sha256: "5".repeat(64),
        manifest: "a".repeat(64),
        uploaded_at: at(at_ms),
        uploaded_by: "alice".into(),
    }
}

/// An agent binary is recorded once per version and architecture: read
/// back as recorded, listed newest version first (semantic order, not
/// text), recorded again idempotently when it is the same binary and
/// refused when it is another; deleting removes it alone.
pub async fn agent_binaries(store: &dyn Store) {
    assert!(store.list_agent_binaries().await.unwrap().is_empty());
    let x86 = agent_binary("0.9.0", "x86_64", "1", 1_700_000_000_123);
    assert_eq!(store.put_agent_binary(&x86).await.unwrap(), x86);
    assert_eq!(
        store.get_agent_binary("0.9.0", "x86_64").await.unwrap(),
        x86
    );
    let arm = agent_binary("0.9.0", "aarch64", "2", 1_700_000_001_000);
    store.put_agent_binary(&arm).await.unwrap();
    let newer = agent_binary("0.10.0", "x86_64", "3", 1_700_000_002_000);
    store.put_agent_binary(&newer).await.unwrap();
    let rc = agent_binary("0.10.0-rc.1", "x86_64", "4", 1_700_000_003_000);
    store.put_agent_binary(&rc).await.unwrap();
    let listed: Vec<(String, String)> = store
        .list_agent_binaries()
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.version, b.arch))
        .collect();
    let want = |v: &str, a: &str| (v.to_owned(), a.to_owned());
    assert_eq!(
        listed,
        vec![
            want("0.10.0", "x86_64"),
            want("0.10.0-rc.1", "x86_64"),
            want("0.9.0", "aarch64"),
            want("0.9.0", "x86_64"),
        ]
    );

    // The same binary again: the first record stands (its upload time).
    let again = agent_binary("0.9.0", "x86_64", "1", 1_800_000_000_000);
    assert_eq!(store.put_agent_binary(&again).await.unwrap(), x86);
    // Another binary under the same version and architecture: refused.
    let other = agent_binary("0.9.0", "x86_64", "9", 1_800_000_000_000);
    assert_exists(
        store.put_agent_binary(&other).await,
        "agent binary",
        "0.9.0/x86_64",
    );
    assert_eq!(
        store.get_agent_binary("0.9.0", "x86_64").await.unwrap(),
        x86
    );

    assert_not_found(
        store.get_agent_binary("0.9.0", "riscv64").await,
        "agent binary",
        "0.9.0/riscv64",
    );
    store.delete_agent_binary("0.9.0", "x86_64").await.unwrap();
    assert_not_found(
        store.get_agent_binary("0.9.0", "x86_64").await,
        "agent binary",
        "0.9.0/x86_64",
    );
    assert_not_found(
        store.delete_agent_binary("0.9.0", "x86_64").await,
        "agent binary",
        "0.9.0/x86_64",
    );
    assert_eq!(store.list_agent_binaries().await.unwrap().len(), 3);
}

pub async fn users(store: &dyn Store) {
    assert!(store.list_users().await.unwrap().is_empty());
    let bob = User {
        admin: true,
        ..user("bob")
    };
    store.create_user(&bob).await.unwrap();
    store.create_user(&user("alice")).await.unwrap();
    assert_eq!(store.get_user("bob").await.unwrap(), bob);
    let names: Vec<String> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_exists(store.create_user(&user("bob")).await, "user", "bob");
    // The failed duplicate must not have overwritten the original.
    assert!(store.get_user("bob").await.unwrap().admin);
    assert_not_found(store.get_user("carol").await, "user", "carol");
}

pub async fn access_keys(store: &dyn Store) {
    let key = |id: &str, user: &str| StoredAccessKey {
        info: trellis_model::AccessKeyInfo {
            id: id.into(),
            user: user.into(),
            description: format!("key {id}"),
            created_at: at(5),
        },
        secret_hash: format!("$argon2id$v=19$m=19456,t=2,p=1$salt${id}"),
    };
    assert_not_found(
        store.create_access_key(&key("tk_1", "alice")).await,
        "user",
        "alice",
    );
    store.create_user(&user("alice")).await.unwrap();
    store.create_user(&user("bob")).await.unwrap();
    store
        .create_access_key(&key("tk_2", "alice"))
        .await
        .unwrap();
    store.create_access_key(&key("tk_1", "bob")).await.unwrap();
    store
        .create_access_key(&key("tk_3", "alice"))
        .await
        .unwrap();
    assert_exists(
        store.create_access_key(&key("tk_2", "bob")).await,
        "access key",
        "tk_2",
    );

    assert_eq!(
        store.find_access_key("tk_2").await.unwrap(),
        Some(key("tk_2", "alice"))
    );
    assert_eq!(store.find_access_key("tk_404").await.unwrap(), None);

    let ids = |keys: Vec<trellis_model::AccessKeyInfo>| -> Vec<String> {
        keys.into_iter().map(|k| k.id).collect()
    };
    assert_eq!(
        ids(store.list_access_keys(None).await.unwrap()),
        ["tk_1", "tk_2", "tk_3"]
    );
    assert_eq!(
        ids(store.list_access_keys(Some("alice")).await.unwrap()),
        ["tk_2", "tk_3"]
    );
    assert_eq!(
        store.list_access_keys(Some("bob")).await.unwrap(),
        [key("tk_1", "bob").info]
    );
    assert_not_found(store.list_access_keys(Some("carol")).await, "user", "carol");

    store.delete_access_key("tk_2").await.unwrap();
    assert_eq!(store.find_access_key("tk_2").await.unwrap(), None);
    assert_not_found(store.delete_access_key("tk_2").await, "access key", "tk_2");
    assert_eq!(
        ids(store.list_access_keys(Some("alice")).await.unwrap()),
        ["tk_3"]
    );
}

/// Nobody can lock every administrator out: the last key an administrator
/// holds cannot be deleted, nor its holder demoted, while keys of other
/// users and other administrators can.
pub async fn last_admin_key(store: &dyn Store) {
    let key = |id: &str, user: &str| StoredAccessKey {
        info: trellis_model::AccessKeyInfo {
            id: id.into(),
            user: user.into(),
            description: String::new(),
            created_at: at(5),
        },
        secret_hash: format!("$argon2id$v=19$m=19456,t=2,p=1$salt${id}"),
    };
    let admin = |name: &str| User {
        admin: true,
        ..user(name)
    };
    store.create_user(&admin("root")).await.unwrap();
    store.create_user(&admin("ops")).await.unwrap();
    store.create_user(&user("alice")).await.unwrap();
    for (id, owner) in [
        ("tk_r1", "root"),
        ("tk_r2", "root"),
        ("tk_o1", "ops"),
        ("tk_a1", "alice"),
    ] {
        store.create_access_key(&key(id, owner)).await.unwrap();
    }
    assert_not_found(
        store.delete_access_key_keeping_admin("tk_none").await,
        "access key",
        "tk_none",
    );
    assert_not_found(
        store.set_user_admin("nobody", false).await,
        "user",
        "nobody",
    );
    // While another administrator holds a key, anything goes.
    for id in ["tk_r1", "tk_o1"] {
        assert_eq!(
            store.delete_access_key_keeping_admin(id).await.unwrap(),
            AdminGuarded::Done(())
        );
    }
    assert_eq!(
        store.set_user_admin("ops", false).await.unwrap(),
        AdminGuarded::Done(User {
            admin: false,
            ..user("ops")
        })
    );
    // root's tk_r2 is now the last administrator key.
    assert_eq!(
        store
            .delete_access_key_keeping_admin("tk_r2")
            .await
            .unwrap(),
        AdminGuarded::LastAdminKey
    );
    assert_eq!(
        store.set_user_admin("root", false).await.unwrap(),
        AdminGuarded::LastAdminKey
    );
    assert!(store.find_access_key("tk_r2").await.unwrap().is_some());
    assert!(store.get_user("root").await.unwrap().admin);
    // Keys of users who are not administrators are not guarded.
    assert_eq!(
        store
            .delete_access_key_keeping_admin("tk_a1")
            .await
            .unwrap(),
        AdminGuarded::Done(())
    );
    // A second administrator with a key lifts the guard; promoting is never
    // refused.
    assert!(matches!(
        store.set_user_admin("alice", true).await.unwrap(),
        AdminGuarded::Done(User { admin: true, .. })
    ));
    store
        .create_access_key(&key("tk_a2", "alice"))
        .await
        .unwrap();
    assert_eq!(
        store
            .delete_access_key_keeping_admin("tk_r2")
            .await
            .unwrap(),
        AdminGuarded::Done(())
    );
    assert_eq!(
        store.set_user_admin("alice", false).await.unwrap(),
        AdminGuarded::LastAdminKey
    );
    // An administrator without keys may be demoted: nobody loses a way in.
    assert!(matches!(
        store.set_user_admin("root", false).await.unwrap(),
        AdminGuarded::Done(User { admin: false, .. })
    ));
}

pub async fn projects(store: &dyn Store) {
    // The owner must exist, and a refused creation leaves nothing behind.
    assert_not_found(
        store.create_project(&project("shop"), "alice").await,
        "user",
        "alice",
    );
    assert_not_found(store.get_project("shop").await, "project", "shop");

    store.create_user(&user("alice")).await.unwrap();
    store
        .create_project(&project("shop"), "alice")
        .await
        .unwrap();
    store
        .create_project(&project("lab"), "alice")
        .await
        .unwrap();
    assert_eq!(store.get_project("shop").await.unwrap(), project("shop"));
    assert_eq!(
        store.list_projects().await.unwrap(),
        [project("lab"), project("shop")]
    );
    let mut changed = project("shop");
    changed.description = "another".into();
    assert_exists(
        store.create_project(&changed, "alice").await,
        "project",
        "shop",
    );
    assert_eq!(store.get_project("shop").await.unwrap(), project("shop"));
    assert_not_found(store.get_project("nope").await, "project", "nope");
}

pub async fn backups(store: &dyn Store) {
    use trellis_model::{BackupState, NewBackup, RestoreStatus};
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "prod").await;
    let new = |stage: &str, name: &str| NewBackup {
        project: "shop".into(),
        stage: stage.into(),
        display_name: name.into(),
        message: "waits for outpost local".into(),
        created_at: at(1_000),
        created_by: "alice".into(),
    };
    let first = store.create_backup(&new("dev", "one")).await.unwrap();
    let second = store.create_backup(&new("dev", "two")).await.unwrap();
    let other = store.create_backup(&new("prod", "p")).await.unwrap();
    assert!(second.id > first.id && other.id > second.id);
    assert_eq!(first.state, BackupState::Pending);
    assert_eq!(first.created_at, at(1_000));
    assert_eq!(first.message, "waits for outpost local");
    assert_eq!(
        store.list_backups("shop", "dev").await.unwrap(),
        vec![second.clone(), first.clone()],
        "newest first, per stage"
    );
    assert_eq!(
        store.get_backup("shop", "dev", first.id).await.unwrap(),
        first
    );
    assert_not_found(
        store.get_backup("shop", "dev", u64::MAX).await,
        "backup",
        &wording_backup("shop", "dev", u64::MAX),
    );
    let wrong = wording_backup("shop", "dev", other.id);
    assert_not_found(
        store.get_backup("shop", "dev", other.id).await,
        "backup",
        &wrong,
    );
    assert_not_found(
        store.create_backup(&new("nope", "x")).await,
        "stage",
        "shop/nope",
    );
    assert_not_found(
        store.list_backups("shop", "nope").await,
        "stage",
        "shop/nope",
    );

    // Work for the outpost: the open ones, oldest first.
    let work = store.outpost_backup_work("local").await.unwrap();
    assert_eq!(
        work.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![first.id, second.id, other.id]
    );
    let mut done = first.clone();
    done.state = BackupState::Completed;
    done.message = String::new();
    done.finished_at = Some(at(2_000));
    done.size = 1 << 30;
    done.uploaded = 12_345;
    done.manifest = Some("ab".repeat(32));
    done.volumes = vec!["db/data".into()];
    store.save_backup(&done).await.unwrap();
    assert_eq!(
        store.get_backup("shop", "dev", first.id).await.unwrap(),
        done
    );
    assert_eq!(
        store.backup_manifests().await.unwrap(),
        vec!["ab".repeat(32)]
    );
    let work = store.outpost_backup_work("local").await.unwrap();
    assert!(work.iter().all(|b| b.id != first.id), "completed: no work");
    done.restore = Some(RestoreStatus {
        state: BackupState::Pending,
        message: "waits".into(),
        requested_at: at(3_000),
        requested_by: "alice".into(),
        finished_at: None,
    });
    store.save_backup(&done).await.unwrap();
    assert_eq!(
        store.get_backup("shop", "dev", first.id).await.unwrap(),
        done
    );
    let work = store.outpost_backup_work("local").await.unwrap();
    assert!(work.iter().any(|b| b.id == first.id), "a restore is work");
    assert!(
        store
            .outpost_backup_work("elsewhere")
            .await
            .unwrap()
            .is_empty()
    );

    // Numbers are never given twice, even after the newest is deleted.
    store.delete_backup("shop", "prod", other.id).await.unwrap();
    assert_not_found(
        store.delete_backup("shop", "prod", other.id).await,
        "backup",
        &wording_backup("shop", "prod", other.id),
    );
    let mut gone = other.clone();
    gone.state = BackupState::Failed;
    assert_not_found(
        store.save_backup(&gone).await,
        "backup",
        &wording_backup("shop", "prod", other.id),
    );
    let third = store.create_backup(&new("prod", "again")).await.unwrap();
    assert!(third.id > other.id, "{} reused", third.id);

    // Schedules: set, read, replaced, removed; they go with the stage.
    let schedule = trellis_model::BackupSchedule {
        project: "shop".into(),
        stage: "prod".into(),
        schedule: "0 3 * * *".into(),
        keep: 7,
        last_run: at(5_000),
    };
    assert_eq!(
        store.get_backup_schedule("shop", "prod").await.unwrap(),
        None
    );
    store
        .set_backup_schedule("shop", "prod", Some(&schedule))
        .await
        .unwrap();
    assert_eq!(
        store.get_backup_schedule("shop", "prod").await.unwrap(),
        Some(schedule.clone())
    );
    let mut later = schedule.clone();
    later.last_run = at(9_000);
    store
        .set_backup_schedule("shop", "prod", Some(&later))
        .await
        .unwrap();
    assert_eq!(store.list_backup_schedules().await.unwrap(), vec![later]);
    store
        .set_backup_schedule("shop", "dev", Some(&schedule))
        .await
        .unwrap();
    store
        .set_backup_schedule("shop", "dev", None)
        .await
        .unwrap();
    assert_eq!(
        store.get_backup_schedule("shop", "dev").await.unwrap(),
        None
    );
    assert_not_found(
        store
            .set_backup_schedule("shop", "nope", Some(&schedule))
            .await,
        "stage",
        "shop/nope",
    );

    // Backups and schedules go with their stage.
    store.delete_stage("shop", "prod", true).await.unwrap();
    stage_in(store, "shop", "prod").await;
    assert!(store.list_backups("shop", "prod").await.unwrap().is_empty());
    assert!(store.list_backup_schedules().await.unwrap().is_empty());
    store.delete_project("shop", true).await.unwrap();
    assert!(store.backup_manifests().await.unwrap().is_empty());
}

fn wording_backup(project: &str, stage: &str, id: u64) -> String {
    crate::wording::backup(project, stage, id)
}

pub async fn audit_log(store: &dyn Store) {
    setup(store, "shop").await;
    setup(store, "other").await;
    let entry = |project: &str, detail: &str, ms: i64| trellis_model::NewAuditEntry {
        time: at(ms),
        user: "alice".into(),
        project: project.into(),
        stage: "dev".into(),
        component: "web".into(),
        outpost: "local".into(),
        action: "exec".into(),
        detail: detail.into(),
        result: "opened".into(),
    };
    let first = store
        .record_audit(&entry("shop", "sh -c ls", 1_000))
        .await
        .unwrap();
    let second = store
        .record_audit(&entry("shop", "8080", 2_000))
        .await
        .unwrap();
    store
        .record_audit(&entry("other", "id", 3_000))
        .await
        .unwrap();
    assert!(second.id > first.id);
    assert_eq!(first.detail, "sh -c ls");
    assert_eq!(first.time, at(1_000));

    let listed = store.list_audit("shop", 100).await.unwrap();
    assert_eq!(
        listed,
        vec![second.clone(), first.clone()],
        "newest first, per project"
    );
    assert_eq!(store.list_audit("shop", 1).await.unwrap(), vec![second]);
    assert_not_found(store.list_audit("nope", 10).await, "project", "nope");
    assert_not_found(
        store.record_audit(&entry("nope", "x", 1)).await,
        "project",
        "nope",
    );
    store.delete_project("shop", true).await.unwrap();
    setup(store, "shop").await;
    assert!(
        store.list_audit("shop", 10).await.unwrap().is_empty(),
        "the log goes with its project"
    );
    assert_eq!(store.list_audit("other", 10).await.unwrap().len(), 1);
}

pub async fn members(store: &dyn Store) {
    setup(store, "shop").await;
    store.create_user(&user("bob")).await.unwrap();
    store.create_user(&user("carol")).await.unwrap();

    let members = store.list_members("shop").await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(
        (
            members[0].project.as_str(),
            members[0].user.as_str(),
            members[0].role
        ),
        ("shop", "alice", Role::Owner)
    );
    assert_eq!(
        store.role_of("shop", "alice").await.unwrap(),
        Some(Role::Owner)
    );
    assert_eq!(store.role_of("shop", "bob").await.unwrap(), None);

    store
        .set_member("shop", "carol", Role::Member)
        .await
        .unwrap();
    store.set_member("shop", "bob", Role::Member).await.unwrap();
    assert_eq!(
        store.role_of("shop", "bob").await.unwrap(),
        Some(Role::Member)
    );
    store.set_member("shop", "bob", Role::Owner).await.unwrap();
    assert_eq!(
        store.role_of("shop", "bob").await.unwrap(),
        Some(Role::Owner)
    );
    let listed: Vec<(String, Role)> = store
        .list_members("shop")
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user, m.role))
        .collect();
    assert_eq!(
        listed,
        [
            ("alice".to_owned(), Role::Owner),
            ("bob".to_owned(), Role::Owner),
            ("carol".to_owned(), Role::Member),
        ]
    );

    store.remove_member("shop", "bob").await.unwrap();
    assert_eq!(store.role_of("shop", "bob").await.unwrap(), None);
    assert_not_found(
        store.remove_member("shop", "bob").await,
        "member",
        "shop/bob",
    );

    assert_not_found(
        store.set_member("shop", "dave", Role::Member).await,
        "user",
        "dave",
    );
    assert_not_found(
        store.set_member("nope", "bob", Role::Member).await,
        "project",
        "nope",
    );
    assert_not_found(store.list_members("nope").await, "project", "nope");
    // Nobody is a member of a project that does not exist; callers that
    // list projects and ask for roles must not fail on one just deleted.
    assert_eq!(store.role_of("nope", "alice").await.unwrap(), None);
    assert_not_found(
        store.remove_member("nope", "alice").await,
        "project",
        "nope",
    );
}

pub async fn outposts(store: &dyn Store) {
    let mut factory = outpost("factory-7", Some(5));
    factory.description = "line 7 edge box".into();
    factory.labels = BTreeMap::from([
        ("site".to_owned(), "hamburg".to_owned()),
        ("arch".to_owned(), "arm64".to_owned()),
    ]);
    store.create_outpost(&factory).await.unwrap();
    store.create_outpost(&outpost("local", None)).await.unwrap();
    assert_eq!(store.get_outpost("factory-7").await.unwrap(), factory);
    assert_eq!(
        store.list_outposts().await.unwrap(),
        [factory.clone(), outpost("local", None)]
    );
    assert_exists(
        store.create_outpost(&outpost("factory-7", None)).await,
        "outpost",
        "factory-7",
    );
    assert_eq!(store.get_outpost("factory-7").await.unwrap(), factory);
    assert_not_found(store.get_outpost("nope").await, "outpost", "nope");

    assert!(
        store
            .stages_on_outpost("factory-7")
            .await
            .unwrap()
            .is_empty()
    );
    store.delete_outpost("factory-7", false).await.unwrap();
    assert_not_found(store.get_outpost("factory-7").await, "outpost", "factory-7");
    assert_not_found(
        store.delete_outpost("factory-7", false).await,
        "outpost",
        "factory-7",
    );
    assert_not_found(
        store.stages_on_outpost("factory-7").await,
        "outpost",
        "factory-7",
    );
}

pub async fn link_profiles(store: &dyn Store) {
    use trellis_model::link_profile::LinkProfile;
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    store.create_outpost(&outpost("other", None)).await.unwrap();
    assert_eq!(
        store.get_link_profile("edge").await.unwrap(),
        LinkProfile::default(),
        "an outpost starts with the hub's defaults"
    );
    let metered = LinkProfile {
        heartbeat_secs: Some(300),
        bandwidth_bytes_per_sec: Some(1 << 20),
        windows: Some("mon-fri 22:00-06:00,sat,sun".into()),
        timezone: Some("Europe/Berlin".into()),
    };
    assert_eq!(
        store.set_link_profile("edge", &metered).await.unwrap(),
        metered
    );
    assert_eq!(store.get_link_profile("edge").await.unwrap(), metered);
    assert_eq!(
        store.list_link_profiles().await.unwrap(),
        vec![("edge".to_owned(), metered.clone())],
        "only outposts with a profile are listed"
    );
    assert_eq!(
        store.get_link_profile("other").await.unwrap(),
        LinkProfile::default(),
        "profiles are per outpost"
    );
    let heartbeat_only = LinkProfile {
        heartbeat_secs: Some(60),
        ..LinkProfile::default()
    };
    store
        .set_link_profile("edge", &heartbeat_only)
        .await
        .unwrap();
    assert_eq!(
        store.get_link_profile("edge").await.unwrap(),
        heartbeat_only,
        "a profile is replaced whole"
    );
    store
        .set_link_profile("edge", &LinkProfile::default())
        .await
        .unwrap();
    assert_eq!(
        store.get_link_profile("edge").await.unwrap(),
        LinkProfile::default()
    );
    assert!(store.list_link_profiles().await.unwrap().is_empty());
    assert_not_found(
        store.get_link_profile("nowhere").await,
        "outpost",
        "nowhere",
    );
    assert_not_found(
        store.set_link_profile("nowhere", &metered).await,
        "outpost",
        "nowhere",
    );

    // A deleted outpost's profile goes with it.
    store.set_link_profile("other", &metered).await.unwrap();
    store.delete_outpost("other", false).await.unwrap();
    store.create_outpost(&outpost("other", None)).await.unwrap();
    assert_eq!(
        store.get_link_profile("other").await.unwrap(),
        LinkProfile::default()
    );
}

pub async fn stage_creation(store: &dyn Store) {
    setup(store, "shop").await;
    setup(store, "lab").await;
    store.create_outpost(&outpost("edge", None)).await.unwrap();

    let spec = NewStage {
        stage_type: StageType::Prod,
        ..new_stage("shop", "prod", "edge")
    };
    let prod = store.create_stage(&spec, at(10)).await.unwrap();
    assert_eq!(
        prod,
        Stage {
            project: "shop".into(),
            name: "prod".into(),
            stage_type: StageType::Prod,
            display_name: "Stage prod".into(),
            suspended: false,
            outpost: "edge".into(),
            desired_revision: 0,
            latest_release: None,
            created_at: at(10),
            archived_at: None,
        }
    );
    assert_eq!(store.get_stage("shop", "prod").await.unwrap(), prod);

    let dev = stage_in(store, "shop", "dev").await;
    // Stage names are unique per project only.
    let lab_dev = stage_in(store, "lab", "dev").await;
    assert_exists(
        store
            .create_stage(&new_stage("shop", "dev", "edge"), at(11))
            .await,
        "stage",
        "shop/dev",
    );
    assert_eq!(store.get_stage("shop", "dev").await.unwrap(), dev);
    assert_eq!(
        store.list_stages("shop").await.unwrap(),
        [dev.clone(), prod.clone()]
    );
    assert_eq!(
        store.stages_on_outpost("local").await.unwrap(),
        [lab_dev, dev]
    );
    assert_eq!(store.stages_on_outpost("edge").await.unwrap(), [prod]);

    assert_not_found(
        store
            .create_stage(&new_stage("nope", "dev", "local"), at(12))
            .await,
        "project",
        "nope",
    );
    assert_not_found(
        store
            .create_stage(&new_stage("shop", "qa", "nowhere"), at(12))
            .await,
        "outpost",
        "nowhere",
    );
    assert_not_found(store.get_stage("shop", "qa").await, "stage", "shop/qa");
    assert_not_found(store.get_stage("nope", "dev").await, "project", "nope");
    assert_not_found(store.list_stages("nope").await, "project", "nope");
}

pub async fn outpost_capacity(store: &dyn Store) {
    setup(store, "shop").await;
    setup(store, "lab").await;
    store.create_outpost(&outpost("x", Some(3))).await.unwrap();
    for (project, stage) in [("shop", "dev"), ("shop", "qa"), ("lab", "dev")] {
        store
            .create_stage(&new_stage(project, stage, "x"), at(10))
            .await
            .unwrap();
    }
    let (what, hint) = assert_in_use(
        store
            .create_stage(&new_stage("lab", "qa", "x"), at(11))
            .await,
    );
    assert_eq!(what, "outpost \"x\" is full: it holds 3 of 3 stages");
    assert_eq!(
        hint,
        "ask an administrator to raise its limit or choose another outpost"
    );
    assert_not_found(store.get_stage("lab", "qa").await, "stage", "lab/qa");

    // Other outposts are unaffected, and deleting a stage frees its place.
    store
        .create_stage(&new_stage("lab", "qa", "local"), at(11))
        .await
        .unwrap();
    store.delete_stage("shop", "qa", false).await.unwrap();
    store
        .create_stage(&new_stage("lab", "prod", "x"), at(12))
        .await
        .unwrap();
    assert_eq!(store.stages_on_outpost("x").await.unwrap().len(), 3);

    store
        .create_outpost(&outpost("closed", Some(0)))
        .await
        .unwrap();
    let (what, _) = assert_in_use(
        store
            .create_stage(&new_stage("shop", "qa", "closed"), at(13))
            .await,
    );
    assert_eq!(what, "outpost \"closed\" is full: it holds 0 of 0 stages");
}

pub async fn stage_updates(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;

    let renamed = store
        .update_stage(
            "shop",
            "dev",
            &StageUpdate {
                display_name: Some("Development".into()),
                stage_type: Some(StageType::Qa),
                ..StageUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(renamed.display_name, "Development");
    assert_eq!(renamed.stage_type, StageType::Qa);
    assert_eq!(store.get_stage("shop", "dev").await.unwrap(), renamed);
    assert_eq!(
        renamed.desired_revision, 0,
        "a new display name runs nothing new"
    );

    let suspend = StageUpdate {
        suspended: Some(true),
        ..StageUpdate::default()
    };
    let suspended = store.update_stage("shop", "dev", &suspend).await.unwrap();
    assert!(suspended.suspended);
    assert_eq!(suspended.desired_revision, 1);
    let again = store.update_stage("shop", "dev", &suspend).await.unwrap();
    assert_eq!(again.desired_revision, 1, "suspending a suspended stage");

    let resumed = store
        .update_stage(
            "shop",
            "dev",
            &StageUpdate {
                display_name: Some("Dev".into()),
                suspended: Some(false),
                stage_type: None,
            },
        )
        .await
        .unwrap();
    assert!(!resumed.suspended);
    assert_eq!(resumed.display_name, "Dev");
    assert_eq!(resumed.desired_revision, 2);
    assert_eq!(store.get_stage("shop", "dev").await.unwrap(), resumed);

    let unchanged = store
        .update_stage("shop", "dev", &StageUpdate::default())
        .await
        .unwrap();
    assert_eq!(unchanged, resumed);

    assert_not_found(
        store.update_stage("shop", "qa", &suspend).await,
        "stage",
        "shop/qa",
    );
    assert_not_found(
        store.update_stage("nope", "dev", &suspend).await,
        "project",
        "nope",
    );
}

pub async fn build_numbering(store: &dyn Store) {
    setup(store, "shop").await;
    setup(store, "lab").await;

    let b1 = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    assert_eq!((b1.number, b1.name.as_str()), (1, "main_b1"));
    let spec = new_build("feature/x");
    assert_eq!(
        (b1.project.as_str(), &b1.commit, &b1.components),
        ("shop", &spec.commit, &spec.components)
    );
    assert_eq!((b1.created_at, b1.created_by.as_str()), (at(20), "alice"));
    let b2 = store
        .create_build("shop", &spec, "bob", at(21))
        .await
        .unwrap();
    assert_eq!((b2.number, b2.name.as_str()), (2, "feature-x_b2"));
    assert_eq!(b2.branch, "feature/x");
    assert_eq!(b2.manifest_file, spec.manifest_file);
    assert_eq!(b2.manifest, spec.manifest);
    let b3 = store
        .create_build("shop", &new_build("main"), "alice", at(22))
        .await
        .unwrap();
    assert_eq!(b3.name, "main_b3");

    assert_eq!(store.get_build("shop", "feature-x_b2").await.unwrap(), b2);
    assert_eq!(
        store.list_builds("shop").await.unwrap(),
        [b3.clone(), b2.clone(), b1.clone()]
    );

    // Numbers of deleted builds are never handed out again.
    store.delete_build("shop", "main_b3").await.unwrap();
    let b4 = store
        .create_build("shop", &new_build("main"), "alice", at(23))
        .await
        .unwrap();
    assert_eq!(b4.name, "main_b4");
    for name in ["main_b1", "feature-x_b2", "main_b4"] {
        store.delete_build("shop", name).await.unwrap();
    }
    assert!(store.list_builds("shop").await.unwrap().is_empty());
    let b5 = store
        .create_build("shop", &new_build("main"), "alice", at(24))
        .await
        .unwrap();
    assert_eq!(b5.number, 5);

    // Each project counts on its own.
    let lab1 = store
        .create_build("lab", &new_build("main"), "alice", at(25))
        .await
        .unwrap();
    assert_eq!(lab1.name, "main_b1");
    assert_eq!(store.list_builds("lab").await.unwrap(), [lab1]);

    assert_not_found(
        store.get_build("shop", "main_b3").await,
        "build",
        "shop/main_b3",
    );
    assert_not_found(store.get_build("nope", "main_b1").await, "project", "nope");
    assert_not_found(store.list_builds("nope").await, "project", "nope");
    assert_not_found(
        store
            .create_build("nope", &new_build("main"), "alice", at(26))
            .await,
        "project",
        "nope",
    );
}

pub async fn release_push(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "prod").await;
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();

    let r1 = store
        .push_release(&new_release("shop", "dev", &build.name), at(30))
        .await
        .unwrap();
    assert_eq!(
        (r1.number, r1.revision, r1.state),
        (1, 1, ReleaseState::Pending)
    );
    assert_eq!(
        (r1.project.as_str(), r1.stage.as_str(), r1.build.as_str()),
        ("shop", "dev", "main_b1")
    );
    assert_eq!((r1.created_at, r1.created_by.as_str()), (at(30), "alice"));
    assert_eq!(r1.config, None);
    let dev = store.get_stage("shop", "dev").await.unwrap();
    assert_eq!((dev.desired_revision, dev.latest_release), (1, Some(1)));

    let snapshot = ConfigSnapshot {
        name: "db".into(),
        version: 3,
        data: config_data(&[("DB_HOST", "db.internal")], &[("ca.pem", "-----BEGIN")]),
    };
    let r2 = store
        .push_release(
            &NewRelease {
                config: Some(snapshot.clone()),
                ..new_release("shop", "dev", &build.name)
            },
            at(31),
        )
        .await
        .unwrap();
    assert_eq!((r2.number, r2.revision), (2, 2));
    assert_eq!(r2.config, Some(snapshot));

    // A suspension takes a revision; the next release builds on it.
    store
        .update_stage(
            "shop",
            "dev",
            &StageUpdate {
                display_name: None,
                suspended: Some(true),
                stage_type: None,
            },
        )
        .await
        .unwrap();
    let r3 = store
        .push_release(&new_release("shop", "dev", &build.name), at(32))
        .await
        .unwrap();
    assert_eq!((r3.number, r3.revision), (3, 4));
    let dev = store.get_stage("shop", "dev").await.unwrap();
    assert_eq!((dev.desired_revision, dev.latest_release), (4, Some(3)));

    assert_eq!(store.get_release("shop", "dev", 2).await.unwrap(), r2);
    assert_eq!(
        store.list_releases("shop", "dev").await.unwrap(),
        [r3, r2, r1]
    );

    // Release numbers and revisions are per stage.
    let p1 = store
        .push_release(&new_release("shop", "prod", &build.name), at(33))
        .await
        .unwrap();
    assert_eq!((p1.number, p1.revision), (1, 1));
    assert_eq!(store.list_releases("shop", "prod").await.unwrap(), [p1]);

    assert_not_found(
        store.get_release("shop", "dev", 9).await,
        "release",
        "shop/dev#9",
    );
    assert_not_found(store.get_release("shop", "qa", 1).await, "stage", "shop/qa");
    assert_not_found(store.list_releases("shop", "qa").await, "stage", "shop/qa");
    assert_not_found(store.list_releases("nope", "dev").await, "project", "nope");
    // A number beyond any the database can hold names no release.
    assert_not_found(
        store.get_release("shop", "dev", u64::MAX).await,
        "release",
        &format!("shop/dev#{}", u64::MAX),
    );
}

pub async fn failed_push_changes_nothing(store: &dyn Store) {
    setup(store, "shop").await;
    setup(store, "lab").await;
    stage_in(store, "shop", "dev").await;
    // A build of the same name, but in another project.
    store
        .create_build("lab", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    let before = store.get_stage("shop", "dev").await.unwrap();

    assert_not_found(
        store
            .push_release(&new_release("shop", "dev", "main_b1"), at(30))
            .await,
        "build",
        "shop/main_b1",
    );
    assert_eq!(store.get_stage("shop", "dev").await.unwrap(), before);
    assert!(store.list_releases("shop", "dev").await.unwrap().is_empty());

    store
        .create_build("shop", &new_build("main"), "alice", at(21))
        .await
        .unwrap();
    assert_not_found(
        store
            .push_release(&new_release("shop", "qa", "main_b1"), at(30))
            .await,
        "stage",
        "shop/qa",
    );
    assert_not_found(
        store
            .push_release(&new_release("nope", "dev", "main_b1"), at(30))
            .await,
        "project",
        "nope",
    );
    assert_eq!(store.get_stage("shop", "dev").await.unwrap(), before);

    // The first successful push is still number 1.
    let r = store
        .push_release(&new_release("shop", "dev", "main_b1"), at(31))
        .await
        .unwrap();
    assert_eq!((r.number, r.revision), (1, 1));
}

/// One push to several stages: each gets its next number and revision, in
/// one go; a stage or build that does not exist leaves every stage as it was.
pub async fn release_push_to_many_stages(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    store
        .create_stage(&new_stage("shop", "prod", "edge"), at(10))
        .await
        .unwrap();
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    store
        .push_release(&new_release("shop", "dev", &build.name), at(30))
        .await
        .unwrap();

    let created = store
        .push_releases(
            &[
                new_release("shop", "dev", &build.name),
                new_release("shop", "prod", &build.name),
            ],
            at(31),
        )
        .await
        .unwrap();
    assert_eq!(created.outposts, ["edge", "local"], "each outpost once");
    let created = created.releases;
    let numbers: Vec<_> = created
        .iter()
        .map(|r| (r.stage.as_str(), r.number, r.revision, r.created_at))
        .collect();
    assert_eq!(numbers, [("dev", 2, 2, at(31)), ("prod", 1, 1, at(31))]);
    assert_eq!(
        store.get_release("shop", "prod", 1).await.unwrap(),
        created[1]
    );

    let before = (
        store.get_stage("shop", "dev").await.unwrap(),
        store.get_stage("shop", "prod").await.unwrap(),
    );
    assert_not_found(
        store
            .push_releases(
                &[
                    new_release("shop", "dev", &build.name),
                    new_release("shop", "qa", &build.name),
                ],
                at(32),
            )
            .await,
        "stage",
        "shop/qa",
    );
    assert_not_found(
        store
            .push_releases(
                &[
                    new_release("shop", "dev", &build.name),
                    new_release("shop", "prod", "main_b9"),
                ],
                at(32),
            )
            .await,
        "build",
        "shop/main_b9",
    );
    let after = (
        store.get_stage("shop", "dev").await.unwrap(),
        store.get_stage("shop", "prod").await.unwrap(),
    );
    assert_eq!(after, before, "a refused push changes no stage");
    assert_eq!(store.list_releases("shop", "dev").await.unwrap().len(), 2);
    assert_eq!(
        store.push_releases(&[], at(33)).await.unwrap(),
        PushedReleases::default()
    );

    // A stage named twice gets two releases, one after the other.
    let twice = store
        .push_releases(
            &[
                new_release("shop", "dev", &build.name),
                new_release("shop", "dev", &build.name),
            ],
            at(34),
        )
        .await
        .unwrap();
    assert_eq!(twice.outposts, ["local"]);
    let numbers: Vec<_> = twice
        .releases
        .iter()
        .map(|r| (r.number, r.revision))
        .collect();
    assert_eq!(numbers, [(3, 3), (4, 4)]);
    assert_eq!(
        store
            .get_stage("shop", "dev")
            .await
            .unwrap()
            .desired_revision,
        4
    );
}

pub async fn configs(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "prod").await;

    let first = store
        .add_config_data(
            "shop",
            "dev",
            "db",
            &config_data(&[("HOST", "a"), ("PORT", "5432")], &[("ca.pem", "one")]),
            at(40),
        )
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(
        (
            first.project.as_str(),
            first.stage.as_str(),
            first.name.as_str()
        ),
        ("shop", "dev", "db")
    );
    assert_eq!(first.updated_at, at(40));
    assert_eq!(store.get_config("shop", "dev", "db").await.unwrap(), first);

    let merged = store
        .add_config_data(
            "shop",
            "dev",
            "db",
            &config_data(&[("HOST", "b"), ("USER", "app")], &[("key.pem", "two")]),
            at(41),
        )
        .await
        .unwrap();
    assert_eq!(merged.version, 2);
    assert_eq!(
        merged.data,
        config_data(
            &[("HOST", "b"), ("PORT", "5432"), ("USER", "app")],
            &[("ca.pem", "one"), ("key.pem", "two")]
        )
    );
    assert_eq!(merged.updated_at, at(41));
    assert_eq!(store.get_config("shop", "dev", "db").await.unwrap(), merged);

    // Configs belong to one stage: the same name elsewhere starts afresh.
    let prod_db = store
        .add_config_data(
            "shop",
            "prod",
            "db",
            &config_data(&[("HOST", "p")], &[]),
            at(42),
        )
        .await
        .unwrap();
    assert_eq!(prod_db.version, 1);
    let cache = store
        .add_config_data("shop", "dev", "cache", &ConfigData::default(), at(43))
        .await
        .unwrap();
    assert_eq!(
        store.list_configs("shop", Some("dev")).await.unwrap(),
        [cache.clone(), merged.clone()]
    );
    assert_eq!(
        store.list_configs("shop", None).await.unwrap(),
        [cache, merged, prod_db]
    );

    store.delete_config("shop", "dev", "db").await.unwrap();
    assert_not_found(
        store.get_config("shop", "dev", "db").await,
        "config",
        "shop/dev/db",
    );
    assert_not_found(
        store.delete_config("shop", "dev", "db").await,
        "config",
        "shop/dev/db",
    );
    let fresh = store
        .add_config_data(
            "shop",
            "dev",
            "db",
            &config_data(&[("HOST", "c")], &[]),
            at(44),
        )
        .await
        .unwrap();
    assert_eq!(fresh.version, 1);
    assert_eq!(fresh.data, config_data(&[("HOST", "c")], &[]));

    assert_not_found(
        store
            .add_config_data("shop", "qa", "db", &ConfigData::default(), at(45))
            .await,
        "stage",
        "shop/qa",
    );
    assert_not_found(
        store.get_config("shop", "qa", "db").await,
        "stage",
        "shop/qa",
    );
    assert_not_found(
        store.list_configs("shop", Some("qa")).await,
        "stage",
        "shop/qa",
    );
    assert_not_found(store.list_configs("nope", None).await, "project", "nope");
    assert_not_found(
        store.delete_config("shop", "qa", "db").await,
        "stage",
        "shop/qa",
    );
}

/// Keys leave a config one by one, each from its env values or files;
/// every removal is a new version, and a key the config lacks changes
/// nothing.
pub async fn config_key_removal(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    let keys = |k: &[&str]| k.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_not_found(
        store
            .remove_config_keys("shop", "dev", "app", &keys(&["A"]), at(20))
            .await,
        "config",
        "shop/dev/app",
    );
    store
        .add_config_data(
            "shop",
            "dev",
            "app",
            &config_data(&[("A", "1"), ("B", "2")], &[("app.json", "{}")]),
            at(21),
        )
        .await
        .unwrap();
    let removed = store
        .remove_config_keys("shop", "dev", "app", &keys(&["A", "app.json"]), at(22))
        .await
        .unwrap();
    assert_eq!(removed.version, 2);
    assert_eq!(removed.data, config_data(&[("B", "2")], &[]));
    assert_eq!(removed.updated_at, at(22));
    assert_eq!(
        store.get_config("shop", "dev", "app").await.unwrap(),
        removed
    );
    // One missing key refuses the whole removal.
    assert_not_found(
        store
            .remove_config_keys("shop", "dev", "app", &keys(&["B", "A"]), at(23))
            .await,
        "config key",
        "shop/dev/app:A",
    );
    assert_eq!(
        store.get_config("shop", "dev", "app").await.unwrap(),
        removed
    );
    assert_not_found(
        store
            .remove_config_keys("shop", "qa", "app", &keys(&["B"]), at(23))
            .await,
        "stage",
        "shop/qa",
    );
}

pub async fn delete_project_rules(store: &dyn Store) {
    setup(store, "empty").await;
    store.delete_project("empty", false).await.unwrap();
    assert_not_found(store.get_project("empty").await, "project", "empty");
    assert_not_found(
        store.delete_project("empty", false).await,
        "project",
        "empty",
    );

    // Stages alone, or builds alone, hold a project.
    setup(store, "staged").await;
    stage_in(store, "staged", "dev").await;
    let (what, hint) = assert_in_use(store.delete_project("staged", false).await);
    assert!(what.contains("\"staged\""), "{what}");
    assert!(hint.contains("force"), "{hint}");
    setup(store, "built").await;
    store
        .create_build("built", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    assert_in_use(store.delete_project("built", false).await);
    assert!(store.get_project("built").await.is_ok());

    // Forced, everything in the project goes, and nothing outside it.
    setup(store, "shop").await;
    store.create_user(&user("bob")).await.unwrap();
    store.set_member("shop", "bob", Role::Member).await.unwrap();
    stage_in(store, "shop", "dev").await;
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    store
        .push_release(&new_release("shop", "dev", &build.name), at(30))
        .await
        .unwrap();
    store
        .add_config_data("shop", "dev", "db", &ConfigData::default(), at(40))
        .await
        .unwrap();
    store.delete_project("shop", true).await.unwrap();
    assert_not_found(store.get_project("shop").await, "project", "shop");
    let left: Vec<(String, String)> = store
        .stages_on_outpost("local")
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.project, s.name))
        .collect();
    assert_eq!(left, [("staged".to_owned(), "dev".to_owned())]);
    assert!(store.get_stage("staged", "dev").await.is_ok());
    assert!(
        store.get_user("bob").await.is_ok(),
        "users outlive projects"
    );

    // A project of the same name starts empty.
    store.create_project(&project("shop"), "bob").await.unwrap();
    assert!(store.list_stages("shop").await.unwrap().is_empty());
    assert!(store.list_builds("shop").await.unwrap().is_empty());
    assert!(store.list_configs("shop", None).await.unwrap().is_empty());
    assert_eq!(store.role_of("shop", "alice").await.unwrap(), None);
    assert_eq!(
        store.role_of("shop", "bob").await.unwrap(),
        Some(Role::Owner)
    );
    let dev = stage_in(store, "shop", "dev").await;
    assert_eq!((dev.desired_revision, dev.latest_release), (0, None));
    assert!(store.list_releases("shop", "dev").await.unwrap().is_empty());
}

pub async fn delete_stage_rules(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "empty").await;
    store.delete_stage("shop", "empty", false).await.unwrap();
    assert_not_found(
        store.get_stage("shop", "empty").await,
        "stage",
        "shop/empty",
    );
    assert_not_found(
        store.delete_stage("shop", "empty", false).await,
        "stage",
        "shop/empty",
    );
    assert_not_found(
        store.delete_stage("nope", "dev", false).await,
        "project",
        "nope",
    );

    stage_in(store, "shop", "configured").await;
    store
        .add_config_data("shop", "configured", "db", &ConfigData::default(), at(40))
        .await
        .unwrap();
    let (what, hint) = assert_in_use(store.delete_stage("shop", "configured", false).await);
    assert!(what.contains("shop/configured"), "{what}");
    assert!(hint.contains("force"), "{hint}");

    stage_in(store, "shop", "dev").await;
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    for i in 0..2 {
        store
            .push_release(&new_release("shop", "dev", &build.name), at(30 + i))
            .await
            .unwrap();
    }
    assert_in_use(store.delete_stage("shop", "dev", false).await);
    assert_eq!(store.list_releases("shop", "dev").await.unwrap().len(), 2);

    store.delete_stage("shop", "dev", true).await.unwrap();
    store
        .delete_stage("shop", "configured", true)
        .await
        .unwrap();
    assert_not_found(
        store.list_releases("shop", "dev").await,
        "stage",
        "shop/dev",
    );
    assert!(store.list_configs("shop", None).await.unwrap().is_empty());
    assert!(store.list_stages("shop").await.unwrap().is_empty());

    // Recreated, the stage starts a new history.
    let dev = stage_in(store, "shop", "dev").await;
    assert_eq!((dev.desired_revision, dev.latest_release), (0, None));
    let r = store
        .push_release(&new_release("shop", "dev", &build.name), at(33))
        .await
        .unwrap();
    assert_eq!((r.number, r.revision), (1, 1));
    assert_not_found(
        store.get_config("shop", "configured", "db").await,
        "stage",
        "shop/configured",
    );
}

pub async fn delete_build_rules(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "prod").await;
    let used = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    let unused = store
        .create_build("shop", &new_build("main"), "alice", at(21))
        .await
        .unwrap();
    for stage in ["prod", "dev", "dev"] {
        store
            .push_release(&new_release("shop", stage, &used.name), at(30))
            .await
            .unwrap();
    }

    let (what, hint) = assert_in_use(store.delete_build("shop", &used.name).await);
    assert_eq!(
        what,
        "build \"shop/main_b1\" is used by 3 release(s) on stage(s) dev, prod"
    );
    assert!(hint.contains("history"), "{hint}");
    assert_eq!(store.get_build("shop", &used.name).await.unwrap(), used);

    store.delete_build("shop", &unused.name).await.unwrap();
    assert_not_found(
        store.get_build("shop", &unused.name).await,
        "build",
        "shop/main_b2",
    );
    assert_not_found(
        store.delete_build("shop", &unused.name).await,
        "build",
        "shop/main_b2",
    );
    assert_not_found(
        store.delete_build("nope", "main_b1").await,
        "project",
        "nope",
    );

    // Once the stages holding its releases are gone, so can the build go.
    store.delete_stage("shop", "dev", true).await.unwrap();
    assert_in_use(store.delete_build("shop", &used.name).await);
    store.delete_stage("shop", "prod", true).await.unwrap();
    store.delete_build("shop", &used.name).await.unwrap();
    assert!(store.list_builds("shop").await.unwrap().is_empty());
}

pub async fn delete_outpost_rules(store: &dyn Store) {
    setup(store, "shop").await;
    setup(store, "lab").await;
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    for (project, stage) in [("shop", "dev"), ("lab", "dev")] {
        store
            .create_stage(&new_stage(project, stage, "edge"), at(10))
            .await
            .unwrap();
    }
    let kept = stage_in(store, "shop", "prod").await;
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    for stage in ["dev", "prod"] {
        store
            .push_release(&new_release("shop", stage, &build.name), at(30))
            .await
            .unwrap();
        store
            .add_config_data("shop", stage, "db", &ConfigData::default(), at(40))
            .await
            .unwrap();
    }

    let (what, hint) = assert_in_use(store.delete_outpost("edge", false).await);
    assert_eq!(
        what,
        "outpost \"edge\" still holds 2 stage(s): lab/dev, shop/dev"
    );
    assert!(hint.contains("force"), "{hint}");
    assert_eq!(store.stages_on_outpost("edge").await.unwrap().len(), 2);

    store.delete_outpost("edge", true).await.unwrap();
    assert_not_found(store.get_outpost("edge").await, "outpost", "edge");
    assert_not_found(store.get_stage("shop", "dev").await, "stage", "shop/dev");
    assert_not_found(store.get_stage("lab", "dev").await, "stage", "lab/dev");
    assert_not_found(
        store.list_releases("shop", "dev").await,
        "stage",
        "shop/dev",
    );

    // Stages elsewhere keep everything; builds belong to the project.
    let prod = store.get_stage("shop", "prod").await.unwrap();
    assert_eq!(prod.latest_release, Some(1));
    assert_eq!(prod.created_at, kept.created_at);
    assert_eq!(store.list_releases("shop", "prod").await.unwrap().len(), 1);
    assert_eq!(store.list_configs("shop", None).await.unwrap().len(), 1);
    assert_eq!(store.list_builds("shop").await.unwrap(), [build]);

    // The name is free again, and the new outpost starts empty.
    store
        .create_outpost(&outpost("edge", Some(1)))
        .await
        .unwrap();
    assert!(store.stages_on_outpost("edge").await.unwrap().is_empty());
}

pub async fn timestamps_keep_milliseconds(store: &dyn Store) {
    // 1.234567891 s past the fixture instant: sub-millisecond digits are
    // dropped by every backend, so all of them read back the same value.
    let precise = at(1234) + chrono::Duration::nanoseconds(567_891);
    let expected = at(1234);
    store
        .create_user(&User {
            created_at: precise,
            ..user("alice")
        })
        .await
        .unwrap();
    assert_eq!(store.get_user("alice").await.unwrap().created_at, expected);
    store.create_outpost(&outpost("local", None)).await.unwrap();
    store
        .create_project(&project("shop"), "alice")
        .await
        .unwrap();
    let stage = store
        .create_stage(&new_stage("shop", "dev", "local"), precise)
        .await
        .unwrap();
    assert_eq!(stage.created_at, expected);
    assert_eq!(store.get_stage("shop", "dev").await.unwrap(), stage);
    let build = store
        .create_build("shop", &new_build("main"), "alice", precise)
        .await
        .unwrap();
    assert_eq!(build.created_at, expected);
    assert_eq!(store.get_build("shop", &build.name).await.unwrap(), build);
    let release = store
        .push_release(&new_release("shop", "dev", &build.name), precise)
        .await
        .unwrap();
    assert_eq!(release.created_at, expected);
    assert_eq!(store.get_release("shop", "dev", 1).await.unwrap(), release);
    let config = store
        .add_config_data("shop", "dev", "db", &ConfigData::default(), precise)
        .await
        .unwrap();
    assert_eq!(config.updated_at, expected);
    assert_eq!(store.get_config("shop", "dev", "db").await.unwrap(), config);
}

pub async fn concurrent_writes_keep_numbering(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    let spec = new_build("main");
    let builds = tokio::join!(
        store.create_build("shop", &spec, "alice", at(20)),
        store.create_build("shop", &spec, "alice", at(20)),
        store.create_build("shop", &spec, "alice", at(20)),
        store.create_build("shop", &spec, "alice", at(20)),
    );
    let mut numbers: Vec<u64> = [builds.0, builds.1, builds.2, builds.3]
        .into_iter()
        .map(|b| b.unwrap().number)
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2, 3, 4]);

    let release = new_release("shop", "dev", "main_b1");
    let pushed = tokio::join!(
        store.push_release(&release, at(30)),
        store.push_release(&release, at(30)),
        store.push_release(&release, at(30)),
        store.push_release(&release, at(30)),
    );
    let mut pairs: Vec<(u64, u64)> = [pushed.0, pushed.1, pushed.2, pushed.3]
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            (r.number, r.revision)
        })
        .collect();
    pairs.sort_unstable();
    assert_eq!(pairs, [(1, 1), (2, 2), (3, 3), (4, 4)]);
    let dev = store.get_stage("shop", "dev").await.unwrap();
    assert_eq!((dev.desired_revision, dev.latest_release), (4, Some(4)));
}

/// Rotating an outpost's URI moves its generation on and touches nothing
/// else; revoking keeps the first revocation time.
pub async fn outpost_uri_rotation_and_revocation(store: &dyn Store) {
    store
        .create_outpost(&outpost("edge", Some(2)))
        .await
        .unwrap();
    let rotated = store.rotate_outpost_uri("edge").await.unwrap();
    assert_eq!(rotated.uri_generation, 2);
    assert_eq!(
        store
            .rotate_outpost_uri("edge")
            .await
            .unwrap()
            .uri_generation,
        3
    );
    assert_eq!(store.get_outpost("edge").await.unwrap().uri_generation, 3);
    assert_not_found(store.rotate_outpost_uri("nope").await, "outpost", "nope");

    let revoked = store.revoke_outpost("edge", at(5_000)).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(at(5_000)));
    let again = store.revoke_outpost("edge", at(9_000)).await.unwrap();
    assert_eq!(
        again.revoked_at,
        Some(at(5_000)),
        "the first revocation time is kept"
    );
    assert_eq!(store.get_outpost("edge").await.unwrap(), again);
    assert_not_found(store.revoke_outpost("nope", at(1)).await, "outpost", "nope");
}

/// An outpost's description and ingress domain change; a new domain bumps
/// the desired revision of every stage on it (their hosts changed), the
/// same domain again and other changes bump nothing.
pub async fn outpost_updates(store: &dyn Store) {
    setup(store, "shop").await;
    store.create_outpost(&outpost("plant", None)).await.unwrap();
    let on_plant = store
        .create_stage(&new_stage("shop", "line", "plant"), at(10))
        .await
        .unwrap();
    let elsewhere = stage_in(store, "shop", "dev").await;
    let revision = |name: &'static str| async move {
        store
            .get_stage("shop", name)
            .await
            .unwrap()
            .desired_revision
    };

    let described = store
        .update_outpost(
            "plant",
            &OutpostUpdate {
                description: Some("line 7".into()),
                ..OutpostUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(described.description, "line 7");
    assert_eq!(described.ingress_domain, None);
    assert_eq!(revision("line").await, on_plant.desired_revision);

    let domain = OutpostUpdate {
        ingress_domain: Some(Some("plant7.example.net".into())),
        ..OutpostUpdate::default()
    };
    let moved = store.update_outpost("plant", &domain).await.unwrap();
    assert_eq!(moved.ingress_domain(), "plant7.example.net");
    assert_eq!(moved.description, "line 7", "other fields are kept");
    assert_eq!(store.get_outpost("plant").await.unwrap(), moved);
    assert_eq!(revision("line").await, on_plant.desired_revision + 1);
    assert_eq!(revision("dev").await, elsewhere.desired_revision);

    store.update_outpost("plant", &domain).await.unwrap();
    assert_eq!(
        revision("line").await,
        on_plant.desired_revision + 1,
        "the same domain again changes nothing"
    );
    let reset = OutpostUpdate {
        ingress_domain: Some(None),
        ..OutpostUpdate::default()
    };
    assert_eq!(
        store
            .update_outpost("plant", &reset)
            .await
            .unwrap()
            .ingress_domain(),
        "localhost"
    );
    assert_eq!(revision("line").await, on_plant.desired_revision + 2);
    assert_not_found(
        store.update_outpost("nope", &reset).await,
        "outpost",
        "nope",
    );
}

/// A join token works once, before it expires, and only for an outpost that
/// exists.
pub async fn join_tokens(store: &dyn Store) {
    use JoinTokenRefusal::{AlreadyUsed, Expired, Unknown};

    assert_not_found(
        store.create_join_token("hash-1", "edge", at(1_000)).await,
        "outpost",
        "edge",
    );
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    store.create_outpost(&outpost("yard", None)).await.unwrap();
    store
        .create_join_token("hash-1", "edge", at(1_000))
        .await
        .unwrap();
    store
        .create_join_token("hash-2", "yard", at(1_000))
        .await
        .unwrap();
    assert_exists(
        store.create_join_token("hash-1", "yard", at(9_000)).await,
        "join token",
        "hash-1",
    );

    // Expiry is exclusive, and the refused duplicate changed nothing (it
    // would have moved the expiry and the outpost). Being late does not use
    // the token up.
    assert_eq!(
        store.consume_join_token("hash-1", at(1_000)).await.unwrap(),
        Err(Expired)
    );
    assert_eq!(
        store.consume_join_token("hash-1", at(999)).await.unwrap(),
        Ok("edge".to_owned())
    );
    assert_eq!(
        store.consume_join_token("hash-1", at(999)).await.unwrap(),
        Err(AlreadyUsed)
    );
    // Used and since expired: saying it was used is the more useful answer.
    assert_eq!(
        store.consume_join_token("hash-1", at(5_000)).await.unwrap(),
        Err(AlreadyUsed)
    );
    assert_eq!(
        store.consume_join_token("nope", at(0)).await.unwrap(),
        Err(Unknown)
    );

    // Sub-millisecond digits are dropped on both sides of the comparison.
    let just_before = at(999) + chrono::Duration::nanoseconds(999_999);
    assert_eq!(
        store
            .consume_join_token("hash-2", just_before)
            .await
            .unwrap(),
        Ok("yard".to_owned())
    );

    // Of concurrent uses of one token, exactly one wins.
    store
        .create_join_token("hash-3", "edge", at(1_000))
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        store.consume_join_token("hash-3", at(10)),
        store.consume_join_token("hash-3", at(10)),
    );
    let mut outcomes = [a.unwrap(), b.unwrap()];
    outcomes.sort_by_key(|o| o.is_err());
    assert_eq!(outcomes, [Ok("edge".to_owned()), Err(AlreadyUsed)]);
}

/// The link record of an outpost: a default one until its agent joined,
/// then exactly what was put, replaced as a whole by the next put.
pub async fn link_activity(store: &dyn Store) {
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    store.create_outpost(&outpost("yard", None)).await.unwrap();
    // Joined: the registered key is not something activity touches.
    let joined = OutpostLink {
        outpost: "edge".into(),
        key_fingerprint: Some(format!("sha256:{}", "cd".repeat(32))),
        cert_serial: Some("01".into()),
        cert_not_after: Some(at(1_000)),
        ..OutpostLink::default()
    };
    store.put_outpost_link(&joined).await.unwrap();
    let hello = LinkHello {
        agent: json!({"version": "0.3.0", "os": "linux"}),
        cert_serial: "02".into(),
        cert_not_after: at(2_000),
    };
    store
        .record_link_activity(&[
            LinkActivity {
                outpost: "edge".into(),
                seen: at(100),
                hello: Some(hello.clone()),
                disconnect: None,
            },
            // A yard that never joined gets a record; a deleted outpost is skipped.
            LinkActivity {
                outpost: "yard".into(),
                seen: at(90),
                hello: None,
                disconnect: Some("the connection was reset".into()),
            },
            LinkActivity {
                outpost: "gone".into(),
                seen: at(90),
                hello: None,
                disconnect: None,
            },
        ])
        .await
        .unwrap();
    let edge = store.get_outpost_link("edge").await.unwrap();
    assert_eq!(
        edge,
        OutpostLink {
            cert_serial: Some("02".into()),
            cert_not_after: Some(at(2_000)),
            agent: Some(hello.agent.clone()),
            last_seen: Some(at(100)),
            ..joined.clone()
        }
    );
    let yard = store.get_outpost_link("yard").await.unwrap();
    assert_eq!(yard.last_seen, Some(at(90)));
    assert_eq!(
        yard.last_disconnect.as_deref(),
        Some("the connection was reset")
    );
    assert_eq!(yard.key_fingerprint, None);

    // A disconnect keeps what the hello said; last seen never goes back.
    store
        .record_link_activity(&[LinkActivity {
            outpost: "edge".into(),
            seen: at(80),
            hello: None,
            disconnect: Some("closed".into()),
        }])
        .await
        .unwrap();
    let edge = store.get_outpost_link("edge").await.unwrap();
    assert_eq!(edge.last_seen, Some(at(100)));
    assert_eq!(edge.last_disconnect.as_deref(), Some("closed"));
    assert_eq!(edge.agent, Some(hello.agent));
    assert_eq!(edge.key_fingerprint, joined.key_fingerprint);
    store.record_link_activity(&[]).await.unwrap();

    // One outpost twice in a batch (it linked, then the session ended):
    // as if recorded one after the other.
    let again = LinkHello {
        agent: json!({"version": "0.4.0", "os": "linux"}),
        cert_serial: "03".into(),
        cert_not_after: at(3_000),
    };
    store
        .record_link_activity(&[
            LinkActivity {
                outpost: "yard".into(),
                seen: at(300),
                hello: Some(again.clone()),
                disconnect: None,
            },
            LinkActivity {
                outpost: "yard".into(),
                seen: at(250),
                hello: None,
                disconnect: Some("the agent closed the link".into()),
            },
        ])
        .await
        .unwrap();
    let yard = store.get_outpost_link("yard").await.unwrap();
    assert_eq!(yard.last_seen, Some(at(300)));
    assert_eq!(yard.agent, Some(again.agent));
    assert_eq!(yard.cert_serial.as_deref(), Some("03"));
    assert_eq!(yard.cert_not_after, Some(at(3_000)));
    assert_eq!(
        yard.last_disconnect.as_deref(),
        Some("the agent closed the link")
    );
}

pub async fn outpost_links(store: &dyn Store) {
    let unjoined = OutpostLink {
        outpost: "edge".into(),
        ..OutpostLink::default()
    };
    assert_not_found(store.get_outpost_link("edge").await, "outpost", "edge");
    assert_not_found(store.put_outpost_link(&unjoined).await, "outpost", "edge");
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    store.create_outpost(&outpost("yard", None)).await.unwrap();
    assert_eq!(store.get_outpost_link("edge").await.unwrap(), unjoined);
    assert_eq!(
        store.get_outpost_and_link("edge").await.unwrap(),
        (outpost("edge", None), unjoined.clone()),
        "an outpost whose agent never joined has an empty link"
    );

    let joined = OutpostLink {
        outpost: "edge".into(),
        key_fingerprint: Some(format!("sha256:{}", "ab".repeat(32))),
        cert_serial: Some("5f0e9a11c3".into()),
        // Sub-millisecond digits are dropped, as for every timestamp.
        cert_not_after: Some(at(86_400_000) + chrono::Duration::nanoseconds(123_456)),
        agent: Some(json!({
            "version": "0.3.0",
            "os": "linux",
            "arch": "aarch64",
            "runtimes": ["docker", "process"],
            "capacity": { "cpus": 4, "memory_mb": 8192, "disk": null },
            "hostname": "edge-01 \"line 7\" ✓",
        })),
        last_seen: Some(at(50)),
        last_disconnect: None,
    };
    store.put_outpost_link(&joined).await.unwrap();
    let stored = OutpostLink {
        cert_not_after: Some(at(86_400_000)),
        ..joined.clone()
    };
    assert_eq!(store.get_outpost_link("edge").await.unwrap(), stored);

    // A put replaces the record: fields left out are cleared.
    let gone = OutpostLink {
        agent: None,
        last_seen: Some(at(60)),
        last_disconnect: Some("the connection was reset by the peer".into()),
        ..stored.clone()
    };
    store.put_outpost_link(&gone).await.unwrap();
    assert_eq!(store.get_outpost_link("edge").await.unwrap(), gone);
    assert_eq!(
        store.get_outpost_and_link("edge").await.unwrap(),
        (outpost("edge", None), gone.clone())
    );
    assert_not_found(store.get_outpost_and_link("nope").await, "outpost", "nope");

    // Other outposts keep their own record.
    assert_eq!(
        store.get_outpost_link("yard").await.unwrap(),
        OutpostLink {
            outpost: "yard".into(),
            ..OutpostLink::default()
        }
    );
    assert_not_found(store.get_outpost_link("nope").await, "outpost", "nope");
}

/// The delivered revision only moves forwards, and a delivery leaves the
/// reported status alone.
pub async fn stage_sync_delivery(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "prod").await;
    assert_eq!(
        store.get_stage_sync("shop", "dev").await.unwrap(),
        no_sync("shop", "dev")
    );

    let first = store
        .record_delivered("shop", "dev", 2, at(100))
        .await
        .unwrap();
    assert_eq!(
        first,
        StageSync {
            delivered_revision: 2,
            updated_at: Some(at(100)),
            ..no_sync("shop", "dev")
        }
    );
    assert_eq!(store.get_stage_sync("shop", "dev").await.unwrap(), first);

    // An acknowledgement overtaken by a newer one does not move it back.
    let late = store
        .record_delivered("shop", "dev", 1, at(101))
        .await
        .unwrap();
    assert_eq!(late.delivered_revision, 2);
    assert_eq!(store.get_stage_sync("shop", "dev").await.unwrap(), late);

    let report = json!({ "components": [{ "name": "web", "state": "running" }] });
    store
        .record_status("shop", "dev", 2, None, &report, at(102))
        .await
        .unwrap();
    let next = store
        .record_delivered(
            "shop",
            "dev",
            3,
            at(103) + chrono::Duration::nanoseconds(999_999),
        )
        .await
        .unwrap();
    assert_eq!(
        next,
        StageSync {
            project: "shop".into(),
            stage: "dev".into(),
            delivered_revision: 3,
            applied_revision: 2,
            report: Some(report),
            updated_at: Some(at(103)),
        }
    );
    assert_eq!(store.get_stage_sync("shop", "dev").await.unwrap(), next);
    assert_eq!(
        store.get_stage_sync("shop", "prod").await.unwrap(),
        no_sync("shop", "prod"),
        "other stages keep their own record"
    );

    assert_not_found(store.get_stage_sync("shop", "qa").await, "stage", "shop/qa");
    assert_not_found(store.get_stage_sync("nope", "dev").await, "project", "nope");
    assert_not_found(
        store.record_delivered("shop", "qa", 1, at(104)).await,
        "stage",
        "shop/qa",
    );
    assert_not_found(
        store.record_delivered("nope", "dev", 1, at(104)).await,
        "project",
        "nope",
    );
}

/// Many links' sync writes in one batch: each as if written alone, in
/// order; one for a stage that is gone is refused and the rest kept.
pub async fn stage_sync_batches(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "prod").await;
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    store
        .push_releases(
            &[
                new_release("shop", "dev", &build.name),
                new_release("shop", "prod", &build.name),
            ],
            at(30),
        )
        .await
        .unwrap();
    let report = json!({ "components": [{ "name": "web", "state": "running" }] });
    let delivered = |stage: &str, revision| SyncUpdate::Delivered {
        project: "shop".into(),
        stage: stage.into(),
        revision,
    };
    let status = |stage: &str, applied_revision| SyncUpdate::Status {
        project: "shop".into(),
        stage: stage.into(),
        applied_revision,
        failed_revision: None,
        report: report.clone(),
    };
    let mut results = store
        .record_sync_batch(
            &[
                delivered("dev", 1),
                delivered("qa", 1),
                status("dev", 1),
                delivered("prod", 1),
                // Late and older: changes nothing, like a lone write.
                delivered("dev", 0),
            ],
            at(40),
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    let late = results.remove(4);
    assert_not_found(results.remove(1), "stage", "shop/qa");
    let dev = store.get_stage_sync("shop", "dev").await.unwrap();
    assert_eq!(
        dev,
        StageSync {
            project: "shop".into(),
            stage: "dev".into(),
            delivered_revision: 1,
            applied_revision: 1,
            report: Some(report.clone()),
            updated_at: Some(at(40)),
        }
    );
    assert_eq!(late.unwrap(), dev);
    assert_eq!(
        store.get_release("shop", "dev", 1).await.unwrap().state,
        ReleaseState::Applied,
        "a batched status moves the release like a lone one"
    );
    let prod = store.get_stage_sync("shop", "prod").await.unwrap();
    assert_eq!((prod.delivered_revision, prod.applied_revision), (1, 0));
    assert!(
        store
            .record_sync_batch(&[], at(41))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A batch means exactly its updates written one at a time, in order,
/// whatever it mixes: several updates of one stage, late and repeated
/// revisions, failures, revisions without a release, a stage that is gone.
/// Two projects with the same stages and releases get the same updates,
/// one in batches and the other one at a time; every answer, every sync
/// record and every release's state must agree.
pub async fn stage_sync_batch_means_one_at_a_time(store: &dyn Store) {
    const STAGES: u64 = 5;
    const PROJECTS: [&str; 2] = ["batched", "alone"];
    for project in PROJECTS {
        setup(store, project).await;
        for i in 0..STAGES {
            stage_in(store, project, &format!("s{i}")).await;
        }
        let build = store
            .create_build(project, &new_build("main"), "alice", at(20))
            .await
            .unwrap();
        // Revisions 1-12 of every stage carry a release; 13-15 do not.
        for _ in 0..12 {
            let releases: Vec<_> = (0..STAGES)
                .map(|i| new_release(project, &format!("s{i}"), &build.name))
                .collect();
            store.push_releases(&releases, at(30)).await.unwrap();
        }
    }
    // A fixed sequence from a xorshift generator, the same on every run:
    // (stage, revision, report, failed revision); no report is a delivery.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut steps = Vec::new();
    for k in 0..120 {
        let stage = match next(STAGES + 1) {
            STAGES => "gone".to_owned(),
            i => format!("s{i}"),
        };
        // Mostly forwards, as a stage's revisions go, with stragglers.
        let revision = k / 10 + next(4);
        let step = match next(3) {
            0 => (stage, revision, None, None),
            // One report in two names a failed revision near it.
            _ => {
                let failed = (next(2) == 0).then(|| (revision + next(3)).max(1) - 1);
                (stage, revision, Some(json!({ "report": k })), failed)
            }
        };
        steps.push(step);
    }
    let update = |project: &str, (stage, revision, report, failed): &Step| match report {
        None => SyncUpdate::Delivered {
            project: project.into(),
            stage: stage.clone(),
            revision: *revision,
        },
        Some(report) => SyncUpdate::Status {
            project: project.into(),
            stage: stage.clone(),
            applied_revision: *revision,
            failed_revision: *failed,
            report: report.clone(),
        },
    };
    type Step = (String, u64, Option<serde_json::Value>, Option<u64>);
    // An answer with the project's name taken out.
    let answer =
        |project: &str, result: Result<StageSync>| format!("{result:?}").replace(project, "P");
    let (mut batched, mut alone) = (Vec::new(), Vec::new());
    let mut start = 0;
    for (n, size) in [1, 7, 20, 32, 60].into_iter().enumerate() {
        let chunk = &steps[start..start + size];
        start += size;
        let now = at(40 + n as i64);
        let updates: Vec<_> = chunk.iter().map(|s| update("batched", s)).collect();
        let results = store.record_sync_batch(&updates, now).await.unwrap();
        assert_eq!(results.len(), updates.len());
        batched.extend(results.into_iter().map(|r| answer("batched", r)));
        for step in chunk {
            let one = [update("alone", step)];
            let mut result = crate::one_by_one::record_sync_batch(store, &one, now)
                .await
                .unwrap();
            let result = result.remove(0);
            alone.push(answer("alone", result));
        }
        for i in 0..STAGES {
            let stage = format!("s{i}");
            let mut states = Vec::new();
            let mut syncs = Vec::new();
            for project in PROJECTS {
                states.push(release_states(store, project, &stage).await);
                let sync = store.get_stage_sync(project, &stage).await;
                syncs.push(answer(project, sync));
            }
            assert_eq!(
                states[0], states[1],
                "the releases of {stage} after batch {n}"
            );
            assert_eq!(
                syncs[0], syncs[1],
                "the sync record of {stage} after batch {n}"
            );
        }
    }
    assert_eq!(start, steps.len(), "every step was written");
    assert!(
        batched.iter().any(|a| a.contains("NotFound"))
            && batched.iter().any(|a| a.starts_with("Ok")),
        "the sequence has both outcomes: {batched:?}"
    );
    for (k, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(
            b, a,
            "update {k} {:?} answered differently in a batch",
            steps[k]
        );
    }
}

/// A status report moves the applied revision forwards and the stage's
/// releases along with it; a late, older report changes nothing.
pub async fn stage_sync_status_and_release_states(store: &dyn Store) {
    use ReleaseState::{Applied, Failed, Pending, Replaced, Superseded};

    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "prod").await;
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    let release = new_release("shop", "dev", &build.name);
    for i in 0..3 {
        let r = store.push_release(&release, at(30 + i)).await.unwrap();
        assert_eq!(r.revision, r.number);
    }
    store
        .push_release(&new_release("shop", "prod", &build.name), at(33))
        .await
        .unwrap();
    store
        .record_delivered("shop", "dev", 3, at(40))
        .await
        .unwrap();

    // Nothing running yet: the report is kept, no release moves.
    let idle = idle_report();
    let nothing = store
        .record_status("shop", "dev", 0, None, &idle, at(100))
        .await
        .unwrap();
    assert_eq!(
        nothing,
        StageSync {
            delivered_revision: 3,
            report: Some(idle),
            updated_at: Some(at(100)),
            ..no_sync("shop", "dev")
        }
    );
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [Pending, Pending, Pending]
    );

    // The outpost went straight to revision 3: releases 1 and 2 never ran.
    let running3 = json!({ "revision": 3, "components": [{ "name": "web", "state": "running" }] });
    let at3 = store
        .record_status("shop", "dev", 3, None, &running3, at(110))
        .await
        .unwrap();
    assert_eq!(
        at3,
        StageSync {
            delivered_revision: 3,
            applied_revision: 3,
            report: Some(running3.clone()),
            updated_at: Some(at(110)),
            ..no_sync("shop", "dev")
        }
    );
    assert_eq!(store.get_stage_sync("shop", "dev").await.unwrap(), at3);
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [Superseded, Superseded, Applied]
    );
    assert_eq!(
        release_states(store, "shop", "prod").await,
        [Pending],
        "other stages are not touched"
    );

    // Release 4 replaces release 3, which did run.
    let r4 = store.push_release(&release, at(34)).await.unwrap();
    assert_eq!(r4.revision, 4);
    let running4 = json!({ "revision": 4 });
    let at4 = store
        .record_status("shop", "dev", 4, None, &running4, at(120))
        .await
        .unwrap();
    assert_eq!(
        (at4.applied_revision, at4.report.as_ref()),
        (4, Some(&running4))
    );
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [Superseded, Superseded, Replaced, Applied]
    );

    // A report of revision 3 arriving late changes nothing, not even with a
    // failure in it.
    let late = store
        .record_status("shop", "dev", 3, Some(4), &running3, at(130))
        .await
        .unwrap();
    assert_eq!(late, at4);
    assert_eq!(store.get_stage_sync("shop", "dev").await.unwrap(), at4);
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [Superseded, Superseded, Replaced, Applied]
    );

    // A suspension (like a component's stop, start or restart) takes a
    // revision without a release; once it is applied, release 4 is still
    // the one in place — its components are just stopped.
    store
        .update_stage("shop", "dev", &suspension(true))
        .await
        .unwrap();
    store
        .record_status("shop", "dev", 5, None, &idle_report(), at(140))
        .await
        .unwrap();
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [Superseded, Superseded, Replaced, Applied]
    );

    // Resumed (revision 6), then release 5 (revision 7) fails to apply and
    // the outpost stays at 6. Newer releases that did not fail are left as
    // they are.
    store
        .update_stage("shop", "dev", &suspension(false))
        .await
        .unwrap();
    let r5 = store.push_release(&release, at(35)).await.unwrap();
    let r6 = store.push_release(&release, at(36)).await.unwrap();
    assert_eq!((r5.revision, r6.revision), (7, 8));
    let failing = json!({ "revision": 6, "error": "image pull failed" });
    let at6 = store
        .record_status("shop", "dev", 6, Some(7), &failing, at(150))
        .await
        .unwrap();
    assert_eq!(at6.applied_revision, 6);
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [Superseded, Superseded, Replaced, Applied, Failed, Pending]
    );

    // The same revision reported again is not older: its report replaces
    // the previous one. (A failure named for the applied revision marks
    // that revision's release failed; revision 6 has none.)
    let again = json!({ "revision": 6, "components": [] });
    let at6b = store
        .record_status("shop", "dev", 6, Some(6), &again, at(155))
        .await
        .unwrap();
    assert_eq!(
        (at6b.applied_revision, at6b.report, at6b.updated_at),
        (6, Some(again), Some(at(155)))
    );

    // Release 6 runs: a failed release stays failed.
    store
        .record_status("shop", "dev", 8, None, &json!({ "revision": 8 }), at(160))
        .await
        .unwrap();
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [Superseded, Superseded, Replaced, Replaced, Failed, Applied]
    );

    // Release 7 (revision 9) is applied, does not come up and is rolled
    // back: it is failed, and release 6 — running again — stays applied.
    let r7 = store.push_release(&release, at(37)).await.unwrap();
    assert_eq!(r7.revision, 9);
    store
        .record_status(
            "shop",
            "dev",
            9,
            Some(9),
            &json!({ "revision": 9, "rolled_back_to": 6 }),
            at(162),
        )
        .await
        .unwrap();
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [
            Superseded, Superseded, Replaced, Replaced, Failed, Applied, Failed
        ]
    );
    let dev = store.get_stage_sync("shop", "dev").await.unwrap();
    assert_eq!(
        (dev.delivered_revision, dev.applied_revision),
        (3, 9),
        "a status report leaves the delivered revision alone"
    );

    // With nothing running, a failure still marks its release.
    store
        .record_status("shop", "prod", 0, Some(1), &idle_report(), at(170))
        .await
        .unwrap();
    assert_eq!(release_states(store, "shop", "prod").await, [Failed]);

    assert_not_found(
        store
            .record_status("shop", "qa", 1, None, &idle_report(), at(180))
            .await,
        "stage",
        "shop/qa",
    );
    assert_not_found(
        store
            .record_status("nope", "dev", 1, None, &idle_report(), at(180))
            .await,
        "project",
        "nope",
    );
}

/// Forced deletions take the link rows of what they delete with them: the
/// parent's records are gone, and a parent created again under the same
/// name starts without them.
/// One read gives every stage of a project with its sync record and the
/// release running on it, and matches what the single-stage reads say.
pub async fn stage_summaries(store: &dyn Store) {
    setup(store, "shop").await;
    setup(store, "other").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "prod").await;
    stage_in(store, "other", "dev").await;
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    for i in 0..2 {
        store
            .push_release(&new_release("shop", "dev", &build.name), at(30 + i))
            .await
            .unwrap();
    }
    store
        .record_delivered("shop", "dev", 2, at(40))
        .await
        .unwrap();
    let report = json!({ "state": "running", "components": [] });
    store
        .record_status("shop", "dev", 1, None, &report, at(50))
        .await
        .unwrap();

    let summaries = store
        .list_stage_summaries("shop", StageFilter::All)
        .await
        .unwrap();
    let names: Vec<&str> = summaries.iter().map(|s| s.stage.name.as_str()).collect();
    assert_eq!(names, ["dev", "prod"]);
    let dev = &summaries[0];
    assert_eq!(dev.stage, store.get_stage("shop", "dev").await.unwrap());
    let sync = store.get_stage_sync("shop", "dev").await.unwrap();
    assert_eq!(
        (dev.delivered_revision, dev.applied_revision),
        (sync.delivered_revision, sync.applied_revision)
    );
    assert_eq!((dev.delivered_revision, dev.applied_revision), (2, 1));
    assert_eq!(dev.report_state.as_deref(), Some("running"));
    assert_eq!(dev.applied_release, Some(1));
    // When the hub recorded the last thing the agent said: the report.
    assert_eq!(dev.sync_updated_at, Some(at(50)));
    assert_eq!(dev.sync_updated_at, sync.updated_at);
    let prod = &summaries[1];
    assert_eq!((prod.delivered_revision, prod.applied_revision), (0, 0));
    assert_eq!(prod.report_state, None);
    assert_eq!(prod.applied_release, None);
    assert_eq!(prod.sync_updated_at, None);

    // Named: only those, by name, the same records; other names skipped.
    let named = store
        .stage_summaries_named("shop", &["prod".to_owned(), "nope".to_owned()])
        .await
        .unwrap();
    assert_eq!(named, summaries[1..]);
    let named = store
        .stage_summaries_named("shop", &["prod".to_owned(), "dev".to_owned()])
        .await
        .unwrap();
    assert_eq!(named, summaries);
    assert!(
        store
            .stage_summaries_named("shop", &[])
            .await
            .unwrap()
            .is_empty()
    );
    assert_not_found(
        store
            .stage_summaries_named("nope", &["dev".to_owned()])
            .await,
        "project",
        "nope",
    );

    // Pending: only what still waits for its outpost (dev has revision 2,
    // its agent applied 1; prod has nothing to apply).
    let pending = store
        .list_stage_summaries("shop", StageFilter::Pending)
        .await
        .unwrap();
    assert_eq!(pending, summaries[..1]);
    store
        .record_status("shop", "dev", 2, None, &report, at(60))
        .await
        .unwrap();
    let pending = store
        .list_stage_summaries("shop", StageFilter::Pending)
        .await
        .unwrap();
    assert!(pending.is_empty(), "{pending:?}");

    for which in [StageFilter::All, StageFilter::Pending] {
        assert_not_found(
            store.list_stage_summaries("nope", which).await,
            "project",
            "nope",
        );
    }
}

pub async fn deletes_remove_link_rows(store: &dyn Store) {
    setup(store, "shop").await;
    setup(store, "lab").await;
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    store.create_outpost(&outpost("yard", None)).await.unwrap();
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    for (project, stage, on) in [
        ("shop", "dev", "local"),
        ("shop", "qa", "local"),
        ("lab", "dev", "edge"),
    ] {
        store
            .create_stage(&new_stage(project, stage, on), at(10))
            .await
            .unwrap();
        store
            .record_delivered(project, stage, 1, at(40))
            .await
            .unwrap();
        store
            .record_status(project, stage, 1, None, &idle_report(), at(41))
            .await
            .unwrap();
    }
    store
        .push_release(&new_release("shop", "dev", &build.name), at(30))
        .await
        .unwrap();
    for on in ["edge", "yard", "local"] {
        store
            .put_outpost_link(&OutpostLink {
                outpost: on.into(),
                key_fingerprint: Some(format!("sha256:{on}")),
                last_seen: Some(at(50)),
                ..OutpostLink::default()
            })
            .await
            .unwrap();
        store
            .create_join_token(&format!("{on}-used"), on, at(1_000))
            .await
            .unwrap();
        store
            .create_join_token(&format!("{on}-fresh"), on, at(1_000))
            .await
            .unwrap();
        assert_eq!(
            store
                .consume_join_token(&format!("{on}-used"), at(60))
                .await
                .unwrap(),
            Ok(on.to_owned())
        );
    }

    // A stage.
    store.delete_stage("shop", "dev", true).await.unwrap();
    assert_not_found(
        store.get_stage_sync("shop", "dev").await,
        "stage",
        "shop/dev",
    );
    stage_in(store, "shop", "dev").await;
    assert_eq!(
        store.get_stage_sync("shop", "dev").await.unwrap(),
        no_sync("shop", "dev")
    );

    // A project, with its stages.
    store
        .record_delivered("shop", "dev", 1, at(70))
        .await
        .unwrap();
    store.delete_project("shop", true).await.unwrap();
    assert_not_found(store.get_stage_sync("shop", "qa").await, "project", "shop");
    setup(store, "shop").await;
    for stage in ["dev", "qa"] {
        stage_in(store, "shop", stage).await;
        assert_eq!(
            store.get_stage_sync("shop", stage).await.unwrap(),
            no_sync("shop", stage)
        );
    }

    // An outpost, with its stages, link and join tokens.
    store.delete_outpost("edge", true).await.unwrap();
    assert_not_found(store.get_outpost_link("edge").await, "outpost", "edge");
    assert_not_found(store.get_stage_sync("lab", "dev").await, "stage", "lab/dev");
    assert_eq!(
        store
            .consume_join_token("edge-fresh", at(60))
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Unknown)
    );
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    assert_eq!(
        store.get_outpost_link("edge").await.unwrap(),
        OutpostLink {
            outpost: "edge".into(),
            ..OutpostLink::default()
        }
    );
    assert_eq!(
        store
            .consume_join_token("edge-fresh", at(60))
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Unknown)
    );
    // The used token's hash is free again too.
    store
        .create_join_token("edge-used", "edge", at(1_000))
        .await
        .unwrap();
    store
        .create_stage(&new_stage("lab", "dev", "edge"), at(10))
        .await
        .unwrap();
    assert_eq!(
        store.get_stage_sync("lab", "dev").await.unwrap(),
        no_sync("lab", "dev")
    );

    // A link and join tokens do not hold an outpost without stages.
    store.delete_outpost("yard", false).await.unwrap();
    assert_not_found(store.get_outpost_link("yard").await, "outpost", "yard");
    assert_eq!(
        store
            .consume_join_token("yard-fresh", at(60))
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Unknown)
    );

    // What belongs to other outposts stays.
    assert_eq!(
        store
            .get_outpost_link("local")
            .await
            .unwrap()
            .key_fingerprint
            .as_deref(),
        Some("sha256:local")
    );
    assert_eq!(
        store
            .consume_join_token("local-fresh", at(60))
            .await
            .unwrap(),
        Ok("local".to_owned())
    );
}

fn control(component: &str, stopped: bool, restarts: u64) -> ComponentControl {
    ComponentControl {
        component: component.into(),
        stopped,
        restarts,
        killed: false,
    }
}

/// Starting, stopping and restarting components: each change of what should
/// run bumps the stage's desired revision, in step with releases and
/// suspension; a request that changes nothing bumps nothing.
pub async fn component_controls(store: &dyn Store) {
    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    stage_in(store, "shop", "qa").await;
    assert_eq!(
        store.list_component_controls("shop", "dev").await.unwrap(),
        vec![]
    );

    let stop = store
        .control_component("shop", "dev", "web", ComponentAction::Stop)
        .await
        .unwrap();
    assert!(stop.changed);
    assert_eq!(stop.control, control("web", true, 0));
    assert_eq!(stop.stage.desired_revision, 1);
    assert_eq!(store.get_stage("shop", "dev").await.unwrap(), stop.stage);

    let again = store
        .control_component("shop", "dev", "web", ComponentAction::Stop)
        .await
        .unwrap();
    assert!(!again.changed, "stopping a stopped component");
    assert_eq!(again.stage.desired_revision, 1);
    assert_eq!(again.control, control("web", true, 0));

    let restart = store
        .control_component("shop", "dev", "web", ComponentAction::Restart)
        .await
        .unwrap();
    assert!(restart.changed);
    assert_eq!(
        restart.control,
        control("web", false, 1),
        "a restart starts it"
    );
    assert_eq!(restart.stage.desired_revision, 2);

    let start = store
        .control_component("shop", "dev", "web", ComponentAction::Start)
        .await
        .unwrap();
    assert!(!start.changed, "starting a running component");
    assert_eq!(start.stage.desired_revision, 2);

    let start_untouched = store
        .control_component("shop", "dev", "api", ComponentAction::Start)
        .await
        .unwrap();
    assert!(!start_untouched.changed);
    assert_eq!(start_untouched.control, control("api", false, 0));

    store
        .control_component("shop", "dev", "worker", ComponentAction::Stop)
        .await
        .unwrap();
    assert_eq!(
        store.list_component_controls("shop", "dev").await.unwrap(),
        vec![control("web", false, 1), control("worker", true, 0)],
        "only components ever changed, by name"
    );
    assert_eq!(
        store.list_component_controls("shop", "qa").await.unwrap(),
        vec![],
        "controls belong to one stage"
    );

    // Releases and suspension share the one revision counter, and leave
    // the controls standing.
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    let release = store
        .push_release(&new_release("shop", "dev", &build.name), at(30))
        .await
        .unwrap();
    assert_eq!(release.revision, 4);
    let suspended = store
        .update_stage("shop", "dev", &suspension(true))
        .await
        .unwrap();
    assert_eq!(suspended.desired_revision, 5);
    let restart = store
        .control_component("shop", "dev", "web", ComponentAction::Restart)
        .await
        .unwrap();
    assert_eq!(restart.stage.desired_revision, 6);
    assert!(
        restart.stage.suspended,
        "a restart does not resume the stage"
    );
    assert_eq!(restart.stage.latest_release, Some(1));
    assert_eq!(
        store.list_component_controls("shop", "dev").await.unwrap(),
        vec![control("web", false, 2), control("worker", true, 0)]
    );

    // A kill is a standing state, kept until a start, and escalates a stop.
    let kill = store
        .control_component("shop", "dev", "worker", ComponentAction::Kill)
        .await
        .unwrap();
    assert!(kill.changed, "a kill after a stop escalates it");
    assert_eq!(kill.stage.desired_revision, 7);
    let killed = ComponentControl {
        killed: true,
        ..control("worker", true, 0)
    };
    assert_eq!(kill.control, killed);
    assert_eq!(
        store.list_component_controls("shop", "dev").await.unwrap(),
        vec![control("web", false, 2), killed]
    );
    let start = store
        .control_component("shop", "dev", "worker", ComponentAction::Start)
        .await
        .unwrap();
    assert_eq!(start.control, control("worker", false, 0));

    assert_not_found(
        store
            .control_component("shop", "prod", "web", ComponentAction::Stop)
            .await,
        "stage",
        "shop/prod",
    );
    assert_not_found(
        store
            .control_component("nope", "dev", "web", ComponentAction::Stop)
            .await,
        "project",
        "nope",
    );
    assert_not_found(
        store.list_component_controls("shop", "prod").await,
        "stage",
        "shop/prod",
    );
    assert_eq!(
        store
            .get_stage("shop", "qa")
            .await
            .unwrap()
            .desired_revision,
        0,
        "other stages keep their revision"
    );
}

/// Controls go with their stage, whichever way it is deleted, and a new
/// stage of the same name starts without them.
pub async fn deletes_remove_component_controls(store: &dyn Store) {
    setup(store, "shop").await;
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    for (stage, on) in [("dev", "local"), ("qa", "local"), ("edge", "edge")] {
        store
            .create_stage(&new_stage("shop", stage, on), at(10))
            .await
            .unwrap();
        store
            .control_component("shop", stage, "web", ComponentAction::Stop)
            .await
            .unwrap();
    }

    store.delete_stage("shop", "dev", true).await.unwrap();
    stage_in(store, "shop", "dev").await;
    assert_eq!(
        store.list_component_controls("shop", "dev").await.unwrap(),
        vec![]
    );

    store.delete_outpost("edge", true).await.unwrap();
    store.create_outpost(&outpost("edge", None)).await.unwrap();
    store
        .create_stage(&new_stage("shop", "edge", "edge"), at(10))
        .await
        .unwrap();
    assert_eq!(
        store.list_component_controls("shop", "edge").await.unwrap(),
        vec![]
    );

    store.delete_project("shop", true).await.unwrap();
    setup(store, "shop").await;
    stage_in(store, "shop", "qa").await;
    assert_eq!(
        store.list_component_controls("shop", "qa").await.unwrap(),
        vec![]
    );
}

/// What a link session reads for an outpost: its stages, and the desired
/// state of those newer than the agent holds, agreeing with each other.
pub async fn outpost_desired_states(store: &dyn Store) {
    setup(store, "shop").await;
    store
        .create_outpost(&outpost("edge", None))
        .await
        .expect("creating outpost edge");
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(5))
        .await
        .unwrap();
    for (name, on) in [("a", "edge"), ("b", "edge"), ("elsewhere", "local")] {
        store
            .create_stage(&new_stage("shop", name, on), at(10))
            .await
            .unwrap();
    }
    store
        .push_release(&new_release("shop", "a", &build.name), at(20))
        .await
        .unwrap();
    store
        .control_component("shop", "a", "web", ComponentAction::Stop)
        .await
        .unwrap();
    store
        .control_component("shop", "b", "web", ComponentAction::Restart)
        .await
        .unwrap();
    let key = |stage: &str| ("shop".to_owned(), stage.to_owned());

    let all = store
        .outpost_desired("edge", &HashMap::new())
        .await
        .unwrap();
    let names: Vec<&str> = all.iter().map(|s| s.stage.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "the outpost's stages only, by name");
    let a = all[0].desired.as_ref().expect("a is newer than nothing");
    assert_eq!(all[0].stage.desired_revision, 2);
    assert_eq!(
        a.release,
        Some(store.get_release("shop", "a", 1).await.unwrap())
    );
    assert_eq!(a.build, Some(build.clone()));
    assert_eq!(a.controls, vec![control("web", true, 0)]);
    let b = all[1].desired.as_ref().expect("b is newer than nothing");
    assert_eq!((b.release.as_ref(), b.build.as_ref()), (None, None));
    assert_eq!(b.controls, vec![control("web", false, 1)]);

    // What the agent holds already is listed without its parts.
    let held = HashMap::from([(key("a"), 2), (key("b"), 0)]);
    let some = store.outpost_desired("edge", &held).await.unwrap();
    assert_eq!(some.len(), 2, "every stage is listed, held or not");
    assert_eq!(some[0].desired, None, "a is held at its desired revision");
    assert!(some[1].desired.is_some());
    assert_eq!(
        store
            .outpost_desired("edge", &HashMap::from([(key("a"), 1)]))
            .await
            .unwrap()[0]
            .desired
            .as_ref()
            .and_then(|d| d.release.as_ref())
            .map(|r| r.number),
        Some(1),
        "a stage held at an older revision gets its parts"
    );

    assert!(matches!(
        store.outpost_desired("nowhere", &HashMap::new()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(
        store
            .outpost_desired("local", &HashMap::new())
            .await
            .unwrap()
            .iter()
            .all(|s| s.stage.outpost == "local")
    );
}

/// Several outposts' desired states in one read give what one read per
/// outpost gives, each in the order asked, errors included.
pub async fn outposts_desired_in_one_read(store: &dyn Store) {
    setup(store, "shop").await;
    for name in ["edge", "quiet", "empty"] {
        store
            .create_outpost(&outpost(name, None))
            .await
            .expect("creating an outpost");
    }
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(5))
        .await
        .unwrap();
    for (name, on) in [
        ("a", "edge"),
        ("b", "edge"),
        ("gone", "edge"),
        ("q", "quiet"),
        ("l", "local"),
    ] {
        store
            .create_stage(&new_stage("shop", name, on), at(10))
            .await
            .unwrap();
    }
    for stage in ["a", "gone", "q", "l", "a"] {
        store
            .push_release(&new_release("shop", stage, &build.name), at(20))
            .await
            .unwrap();
    }
    store
        .control_component("shop", "a", "web", ComponentAction::Stop)
        .await
        .unwrap();
    store
        .control_component("shop", "a", "api", ComponentAction::Restart)
        .await
        .unwrap();
    store.archive_stage("shop", "gone", at(30)).await.unwrap();
    let key = |stage: &str| ("shop".to_owned(), stage.to_owned());
    let quiet_held: HashMap<StageKey, u64> = HashMap::from([(
        key("q"),
        store.get_stage("shop", "q").await.unwrap().desired_revision,
    )]);
    let asks = vec![
        DesiredAsk {
            outpost: "edge".into(),
            held: HashMap::from([(key("b"), 1)]),
        },
        DesiredAsk {
            outpost: "nowhere".into(),
            held: HashMap::new(),
        },
        DesiredAsk {
            outpost: "quiet".into(),
            held: quiet_held,
        },
        DesiredAsk {
            outpost: "empty".into(),
            held: HashMap::new(),
        },
        DesiredAsk {
            outpost: "local".into(),
            held: HashMap::from([(key("l"), 1)]),
        },
    ];
    let batched = store.outposts_desired(&asks).await.unwrap();
    assert_eq!(batched.len(), asks.len());
    for (ask, answer) in asks.iter().zip(&batched) {
        let alone = store.outpost_desired(&ask.outpost, &ask.held).await;
        match (answer, alone) {
            (Ok(answer), Ok(alone)) => assert_eq!(answer, &alone, "{}", ask.outpost),
            (Err(StoreError::NotFound { .. }), Err(StoreError::NotFound { .. })) => {}
            (answer, alone) => panic!("{}: {answer:?} against {alone:?}", ask.outpost),
        }
    }
    // What the answers hold, beyond agreeing: edge's three stages, a with
    // its second release and both controls, the archived one without a
    // release; nothing for quiet (held), an error for the unknown outpost.
    let edge = batched[0].as_ref().unwrap();
    let names: Vec<&str> = edge.iter().map(|s| s.stage.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "gone"]);
    let a = edge[0].desired.as_ref().unwrap();
    assert_eq!(a.release.as_ref().map(|r| r.number), Some(2));
    assert_eq!(a.build, Some(build.clone()));
    assert_eq!(a.controls.len(), 2);
    let gone = edge[2].desired.as_ref().unwrap();
    assert_eq!((gone.release.as_ref(), gone.build.as_ref()), (None, None));
    assert!(matches!(&batched[1], Err(StoreError::NotFound { .. })));
    let quiet = batched[2].as_ref().unwrap();
    assert_eq!(quiet.len(), 1);
    assert_eq!(quiet[0].desired, None);
    assert!(batched[3].as_ref().unwrap().is_empty());
    assert!(store.outposts_desired(&[]).await.unwrap().is_empty());
}

pub async fn project_updates(store: &dyn Store) {
    setup(store, "shop").await;
    assert_eq!(
        store.get_project("shop").await.unwrap().display_name,
        "Project shop"
    );
    let updated = store
        .update_project(
            "shop",
            &ProjectUpdate {
                display_name: Some("Web shop".into()),
                description: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.display_name, "Web shop");
    assert_eq!(updated.description, "the shop project");
    assert_eq!(store.get_project("shop").await.unwrap(), updated);
    assert_not_found(
        store
            .update_project("nope", &ProjectUpdate::default())
            .await,
        "project",
        "nope",
    );
}

/// Deleting archives: the stage (or the project with its stages) keeps its
/// records and releases, bumps its revision, and sends its outpost no
/// release; restoring brings back exactly what was archived with it.
pub async fn archive_and_restore(store: &dyn Store) {
    setup(store, "shop").await;
    for name in ["dev", "prod", "old"] {
        stage_in(store, "shop", name).await;
    }
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    for name in ["dev", "prod"] {
        store
            .push_release(&new_release("shop", name, &build.name), at(21))
            .await
            .unwrap();
    }
    let desired = |stages: Vec<OutpostStage>, name: &str| {
        stages
            .into_iter()
            .find(|s| s.stage.name == name)
            .and_then(|s| s.desired)
            .expect("desired parts")
    };
    let held = HashMap::new();

    // A stage alone.
    let old = store.archive_stage("shop", "old", at(30)).await.unwrap();
    assert_eq!(old.archived_at, Some(at(30)));
    assert_eq!(old.desired_revision, 1);
    let again = store.archive_stage("shop", "old", at(31)).await.unwrap();
    assert_eq!(again, old, "archiving an archived stage changes nothing");
    assert_eq!(store.get_stage("shop", "old").await.unwrap(), old);
    assert_eq!(
        store.list_archived_stages("shop").await.unwrap(),
        vec![old.clone()],
        "the archived stage, and only it, is listed as archived"
    );

    let dev = store.archive_stage("shop", "dev", at(32)).await.unwrap();
    assert_eq!(dev.desired_revision, 2);
    assert_eq!(dev.latest_release, Some(1), "its releases stay");
    assert_eq!(store.list_releases("shop", "dev").await.unwrap().len(), 1);
    let parts = desired(store.outpost_desired("local", &held).await.unwrap(), "dev");
    assert!(
        parts.release.is_none() && parts.build.is_none(),
        "nothing runs"
    );
    let dev = store.restore_stage("shop", "dev").await.unwrap();
    assert_eq!((dev.archived_at, dev.desired_revision), (None, 3));
    let parts = desired(store.outpost_desired("local", &held).await.unwrap(), "dev");
    assert_eq!(
        parts.release.unwrap().number,
        1,
        "it runs its release again"
    );
    let same = store.restore_stage("shop", "dev").await.unwrap();
    assert_eq!(same, dev, "restoring a live stage changes nothing");

    // The project, with the stages not archived yet.
    let archived = store.archive_project("shop", at(40)).await.unwrap();
    let names: Vec<&str> = archived.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["dev", "prod"]);
    assert!(archived.iter().all(|s| s.archived_at == Some(at(40))));
    assert_eq!(
        store.get_project("shop").await.unwrap().archived_at,
        Some(at(40))
    );
    assert!(
        store
            .archive_project("shop", at(41))
            .await
            .unwrap()
            .is_empty()
    );
    match store.restore_stage("shop", "prod").await {
        Err(StoreError::InUse { what, .. }) => assert!(what.contains("archived"), "{what}"),
        other => panic!("restoring a stage of an archived project: {other:?}"),
    }
    let restored = store.restore_project("shop").await.unwrap();
    let names: Vec<&str> = restored.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["dev", "prod"],
        "old was archived before, on its own"
    );
    assert_eq!(store.get_project("shop").await.unwrap().archived_at, None);
    assert!(
        store
            .get_stage("shop", "old")
            .await
            .unwrap()
            .archived_at
            .is_some()
    );
    assert!(store.restore_project("shop").await.unwrap().is_empty());
    assert_not_found(
        store.archive_stage("shop", "nope", at(50)).await,
        "stage",
        "shop/nope",
    );
    assert_not_found(
        store.archive_project("nope", at(50)).await,
        "project",
        "nope",
    );
    // Purging is deleting, as before.
    store.delete_stage("shop", "old", true).await.unwrap();
    assert_not_found(store.get_stage("shop", "old").await, "stage", "shop/old");
}

// --- several hubs on one store ---

/// Calls `$callback!` with the name of every behaviour a store that several
/// hubs share must show. Each takes two handles on one fresh store, as two
/// hubs would have (`(a, b)`).
#[macro_export]
macro_rules! for_each_shared_suite_test {
    ($callback:ident) => {
        $callback! {
            shared_change_feed,
            shared_link_claims,
            shared_instances,
            shared_job_locks,
            shared_secrets,
            shared_writers_keep_the_rules,
        }
    };
}

/// The next change on `feed`, waiting at most 5 s.
async fn next_change(feed: &mut crate::ChangeFeed) -> crate::Change {
    match tokio::time::timeout(std::time::Duration::from_secs(5), feed.recv()).await {
        Ok(Some(change)) => change,
        Ok(None) => panic!("the change feed ended"),
        Err(_) => panic!("no change announced within 5 s"),
    }
}

/// Changes on `feed` until one matches, skipping others (a store may
/// announce a change more than once).
async fn expect_change(feed: &mut crate::ChangeFeed, want: &crate::Change) {
    loop {
        let got = next_change(feed).await;
        if &got == want {
            return;
        }
        assert!(
            matches!(
                got,
                crate::Change::Outpost(_) | crate::Change::Claimed { .. }
            ),
            "unexpected change {got:?} while waiting for {want:?}"
        );
    }
}

/// Every hub hears what any of them changed: the desired state of an
/// outpost's stages, revocation, deletion, link claims.
pub async fn shared_change_feed(a: &dyn Store, b: &dyn Store) {
    use crate::Change;
    let mut feed_a = a.changes().expect("a shared store has a change feed");
    let mut feed_b = b.changes().expect("a shared store has a change feed");
    setup(a, "shop").await;
    a.create_outpost(&outpost("edge", None)).await.unwrap();
    a.create_stage(&new_stage("shop", "line", "edge"), at(0))
        .await
        .unwrap();
    a.push_release(&new_release("shop", "line", &b_build(a).await), at(1))
        .await
        .unwrap();
    let edge = Change::Outpost("edge".into());
    expect_change(&mut feed_a, &edge).await;
    expect_change(&mut feed_b, &edge).await;
    b.update_stage("shop", "line", &suspension(true))
        .await
        .unwrap();
    expect_change(&mut feed_a, &edge).await;
    b.control_component("shop", "line", "web", ComponentAction::Stop)
        .await
        .unwrap();
    expect_change(&mut feed_a, &edge).await;

    let epochs = b
        .claim_links("hub-b", &["edge".to_owned()], at(2))
        .await
        .unwrap();
    let claimed = Change::Claimed {
        outpost: "edge".into(),
        instance: "hub-b".into(),
        epoch: epochs[0],
    };
    expect_change(&mut feed_a, &claimed).await;
    expect_change(&mut feed_b, &claimed).await;

    b.revoke_outpost("edge", at(3)).await.unwrap();
    expect_change(&mut feed_a, &Change::Revoked("edge".into())).await;
    expect_change(&mut feed_b, &Change::Revoked("edge".into())).await;
    a.delete_stage("shop", "line", true).await.unwrap();
    expect_change(&mut feed_b, &edge).await;
    a.create_outpost(&outpost("gone", None)).await.unwrap();
    a.delete_outpost("gone", false).await.unwrap();
    expect_change(&mut feed_b, &Change::Revoked("gone".into())).await;
}

/// The build every shared test releases.
async fn b_build(store: &dyn Store) -> String {
    store
        .create_build("shop", &new_build("main"), "alice", at(0))
        .await
        .unwrap()
        .name
}

/// A newer claim takes a higher epoch wherever it is made; a release ends
/// only the claim it names; claims of a forgotten instance are released.
pub async fn shared_link_claims(a: &dyn Store, b: &dyn Store) {
    setup(a, "shop").await;
    for name in ["edge-1", "edge-2"] {
        a.create_outpost(&outpost(name, None)).await.unwrap();
    }
    let first = a
        .claim_links("hub-a", &["edge-1".into(), "edge-2".into()], at(10))
        .await
        .unwrap();
    assert!(first.iter().all(|e| *e >= 1), "{first:?}");
    let second = b
        .claim_links("hub-b", &["edge-1".into(), "nowhere".into()], at(20))
        .await
        .unwrap();
    assert!(second[0] > first[0], "{second:?} after {first:?}");
    assert_eq!(second[1], 0, "an outpost that does not exist has no claim");

    // hub-a's session of edge-1 ends late: the newer claim stays.
    a.release_link("hub-a", "edge-1", first[0], at(30))
        .await
        .unwrap();
    let claims = b.link_claims(None).await.unwrap();
    let edge1 = claims.iter().find(|c| c.outpost == "edge-1").unwrap();
    assert_eq!(
        (edge1.instance.as_str(), edge1.epoch, edge1.released_at),
        ("hub-b", second[0], None)
    );
    assert_eq!(edge1.since, at(20));
    assert_eq!(a.link_claim("edge-1").await.unwrap().as_ref(), Some(edge1));
    assert_eq!(a.link_claim("edge-9").await.unwrap(), None);
    // Its own release ends it.
    b.release_link("hub-b", "edge-1", second[0], at(40))
        .await
        .unwrap();
    let edge1 = b
        .link_claims(Some("hub-b"))
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.outpost == "edge-1")
        .unwrap();
    assert_eq!(edge1.released_at, Some(at(40)));
    assert_eq!(
        a.link_claims(Some("hub-a"))
            .await
            .unwrap()
            .iter()
            .map(|c| c.outpost.as_str())
            .collect::<Vec<_>>(),
        ["edge-2"]
    );

    // hub-a dies and is forgotten: what it held is released at its last beat.
    a.beat_instance(&instance("hub-a", 50)).await.unwrap();
    b.forget_instance("hub-a").await.unwrap();
    let edge2 = b
        .link_claims(None)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.outpost == "edge-2")
        .unwrap();
    assert_eq!(edge2.released_at, Some(at(50)));
    // Deleting an outpost takes its claim along.
    a.delete_outpost("edge-2", false).await.unwrap();
    assert!(
        b.link_claims(None)
            .await
            .unwrap()
            .iter()
            .all(|c| c.outpost != "edge-2")
    );
}

fn instance(id: &str, beat: i64) -> crate::Instance {
    crate::Instance {
        id: id.into(),
        address: format!("{id}.example:7440"),
        version: "1.0".into(),
        started_at: at(0),
        beat_at: at(beat),
    }
}

/// Instances beat their record; every hub sees every other.
pub async fn shared_instances(a: &dyn Store, b: &dyn Store) {
    a.beat_instance(&instance("hub-a", 1)).await.unwrap();
    b.beat_instance(&instance("hub-b", 2)).await.unwrap();
    a.beat_instance(&instance("hub-a", 3)).await.unwrap();
    let seen = b.instances().await.unwrap();
    assert_eq!(seen, vec![instance("hub-a", 3), instance("hub-b", 2)]);
    a.forget_instance("hub-b").await.unwrap();
    assert_eq!(b.instances().await.unwrap(), vec![instance("hub-a", 3)]);
}

/// A job's lock is held by one hub at a time and free again once dropped.
pub async fn shared_job_locks(a: &dyn Store, b: &dyn Store) {
    let held = a.lock_job("collect-garbage").await.unwrap();
    let held = held.expect("the first hub takes the lock");
    assert!(held.is_held());
    assert!(b.lock_job("collect-garbage").await.unwrap().is_none());
    assert!(
        b.lock_job("other-job").await.unwrap().is_some(),
        "locks are per job"
    );
    drop(held);
    // Released asynchronously where a connection holds it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if b.lock_job("collect-garbage").await.unwrap().is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lock was not given back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The first value offered for a secret is the one every hub gets.
pub async fn shared_secrets(a: &dyn Store, b: &dyn Store) {
    assert_eq!(a.cluster_secret("ca", "first").await.unwrap(), "first");
    assert_eq!(b.cluster_secret("ca", "second").await.unwrap(), "first");
    assert_eq!(b.cluster_secret("other", "x").await.unwrap(), "x");
}

/// Two hubs writing at once keep the store's rules: an outpost's last
/// place is taken once, build numbers are given once.
pub async fn shared_writers_keep_the_rules(a: &dyn Store, b: &dyn Store) {
    setup(a, "shop").await;
    a.create_outpost(&outpost("tiny", Some(1))).await.unwrap();
    let (one, two) = (
        new_stage("shop", "one", "tiny"),
        new_stage("shop", "two", "tiny"),
    );
    let (ra, rb) = tokio::join!(a.create_stage(&one, at(0)), b.create_stage(&two, at(0)));
    assert_eq!(
        [ra.is_ok(), rb.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "exactly one takes the last place: {ra:?} {rb:?}"
    );
    let mut numbers = Vec::new();
    let build = new_build("main");
    for _ in 0..5 {
        let (x, y) = tokio::join!(
            a.create_build("shop", &build, "alice", at(0)),
            b.create_build("shop", &build, "alice", at(0)),
        );
        numbers.push(x.unwrap().number);
        numbers.push(y.unwrap().number);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=10).collect::<Vec<u64>>());
}

/// Agent updates are numbered, one at a time per outpost; a final state
/// sticks; the newest per outpost is listed; they go with their outpost.
pub async fn agent_updates(store: &dyn Store) {
    use trellis_model::agent_update::{AgentUpdateState, NewAgentUpdate};
    for name in ["edge-1", "edge-2"] {
        store.create_outpost(&outpost(name, None)).await.unwrap();
    }
    let new = |outpost: &str, version: &str| NewAgentUpdate {
        outpost: outpost.into(),
        version: version.into(),
        from_version: "0.1.0".into(),
        deadline_secs: 60,
        created_by: "admin".into(),
        wave: 0,
        carried: false,
        threshold_bp: 10_000,
        wave_timeout_seconds: 1800,
    };
    let made = store
        .create_agent_updates(&[new("edge-1", "0.2.0"), new("edge-2", "0.2.0")], at(10))
        .await
        .unwrap();
    assert_eq!(made.iter().map(|u| u.id).collect::<Vec<_>>(), [1, 2]);
    assert!(made.iter().all(|u| u.batch == 1), "one request, one batch");
    assert!(made.iter().all(|u| u.state == AgentUpdateState::Pending));
    assert_eq!(made[0].created_at, at(10));
    assert_eq!(
        store.open_agent_update("edge-1").await.unwrap(),
        Some(made[0].clone())
    );

    // One update at a time per outpost: refused, naming the open one, and
    // nothing of the request is recorded.
    store
        .create_outpost(&outpost("edge-3", None))
        .await
        .unwrap();
    match store
        .create_agent_updates(&[new("edge-3", "0.3.0"), new("edge-1", "0.3.0")], at(11))
        .await
    {
        Err(StoreError::InUse { what, .. }) => {
            assert!(what.contains("edge-1") && what.contains("0.2.0"), "{what}");
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    assert_eq!(store.open_agent_update("edge-3").await.unwrap(), None);
    assert_not_found(
        store
            .create_agent_updates(&[new("nope", "0.2.0")], at(11))
            .await,
        "outpost",
        "nope",
    );

    // Progress, then a final state that a late report does not reopen.
    let u = store
        .report_agent_update("edge-1", 1, AgentUpdateState::Fetching, "fetching", at(12))
        .await
        .unwrap();
    assert_eq!(
        (u.state, u.updated_at),
        (AgentUpdateState::Fetching, at(12))
    );
    store
        .report_agent_update("edge-1", 1, AgentUpdateState::Failed, "rolled back", at(13))
        .await
        .unwrap();
    let late = store
        .report_agent_update("edge-1", 1, AgentUpdateState::Restarting, "late", at(14))
        .await
        .unwrap();
    assert_eq!(
        (late.state, late.message.as_str()),
        (AgentUpdateState::Failed, "rolled back")
    );
    assert_eq!(store.open_agent_update("edge-1").await.unwrap(), None);
    assert_not_found(
        store
            .report_agent_update("edge-2", 1, AgentUpdateState::Applied, "", at(15))
            .await,
        "agent update",
        "agent update 1",
    );
    assert_not_found(
        store
            .report_agent_update("edge-1", 99, AgentUpdateState::Applied, "", at(15))
            .await,
        "agent update",
        "agent update 99",
    );

    // A new update once the last one is over; the newest is listed.
    let again = store
        .create_agent_updates(&[new("edge-1", "0.2.1")], at(16))
        .await
        .unwrap();
    assert_eq!(again[0].id, 3);
    let latest = store.latest_agent_updates().await.unwrap();
    assert_eq!(
        latest
            .iter()
            .map(|u| (u.outpost.as_str(), u.id))
            .collect::<Vec<_>>(),
        [("edge-1", 3), ("edge-2", 2)]
    );

    // The links of outposts whose agent linked, by outpost.
    store
        .put_outpost_link(&OutpostLink {
            outpost: "edge-2".into(),
            agent: Some(json!({"version": "0.1.0", "arch": "amd64"})),
            ..OutpostLink::default()
        })
        .await
        .unwrap();
    let links = store.list_outpost_links().await.unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].agent.as_ref().unwrap()["version"], "0.1.0");

    // Deleting an outpost deletes its updates; numbers are not given again.
    store.delete_outpost("edge-1", false).await.unwrap();
    let latest = store.latest_agent_updates().await.unwrap();
    assert_eq!(latest.len(), 1);
    store
        .create_outpost(&outpost("edge-1", None))
        .await
        .unwrap();
    let next = store
        .create_agent_updates(&[new("edge-1", "0.2.1")], at(17))
        .await
        .unwrap();
    assert_eq!(next[0].id, 4);
}

/// The updates of one request share a batch; a later wave waits (and
/// counts as under way) until it is sent, offline outposts carried along;
/// sending it twice changes nothing; a halt stops only what waits.
pub async fn agent_update_waves(store: &dyn Store) {
    use trellis_model::agent_update::{AgentUpdateState, NewAgentUpdate};
    for name in ["a", "b", "c", "d", "e"] {
        store.create_outpost(&outpost(name, None)).await.unwrap();
    }
    let new = |outpost: &str, wave: u32| NewAgentUpdate {
        outpost: outpost.into(),
        version: "0.2.0".into(),
        from_version: "0.1.0".into(),
        deadline_secs: 60,
        created_by: "admin".into(),
        wave,
        carried: false,
        threshold_bp: 9_000,
        wave_timeout_seconds: 600,
    };
    let first = store
        .create_agent_updates(&[new("e", 0)], at(1))
        .await
        .unwrap();
    let made = store
        .create_agent_updates(&[new("a", 0), new("b", 1), new("c", 1), new("d", 2)], at(2))
        .await
        .unwrap();
    let batch = made[0].id;
    assert_eq!(first[0].batch, first[0].id);
    assert!(made.iter().all(|u| u.batch == batch), "{made:?}");
    assert_eq!(
        made.iter().map(|u| u.state).collect::<Vec<_>>(),
        [
            AgentUpdateState::Pending,
            AgentUpdateState::Waiting,
            AgentUpdateState::Waiting,
            AgentUpdateState::Waiting
        ]
    );
    assert_eq!(made[3].threshold_bp, 9_000);
    assert_eq!(made[3].wave_timeout_seconds, 600);
    // The first wave is sent as it is recorded; the others when released.
    assert_eq!(
        made.iter().map(|u| u.sent_at).collect::<Vec<_>>(),
        [Some(at(2)), None, None, None]
    );
    assert_eq!(store.waiting_agent_update_batches().await.unwrap(), [batch]);
    // A waiting update is under way: another is refused for its outpost.
    assert!(matches!(
        store.create_agent_updates(&[new("d", 0)], at(3)).await,
        Err(StoreError::InUse { .. })
    ));
    assert_eq!(
        store.open_agent_update("b").await.unwrap().map(|u| u.state),
        Some(AgentUpdateState::Waiting)
    );

    // Wave 1 sent: c offline, carried along; sent again, nothing changes.
    let sent = store
        .release_agent_update_wave(batch, 1, &["c".to_owned()], at(4))
        .await
        .unwrap();
    assert_eq!(
        sent.iter()
            .map(|u| (
                u.outpost.as_str(),
                u.state,
                u.carried,
                u.updated_at,
                u.sent_at
            ))
            .collect::<Vec<_>>(),
        [
            ("b", AgentUpdateState::Pending, false, at(4), Some(at(4))),
            ("c", AgentUpdateState::Pending, true, at(4), Some(at(4))),
        ]
    );
    assert!(
        store
            .release_agent_update_wave(batch, 1, &[], at(5))
            .await
            .unwrap()
            .is_empty()
    );

    // Halted: only d, still waiting, is; the reason is kept.
    let halted = store
        .halt_agent_update_batch(batch, "wave 2: b failed", at(6))
        .await
        .unwrap();
    assert_eq!(halted.len(), 1);
    assert_eq!(
        (
            halted[0].outpost.as_str(),
            halted[0].state,
            halted[0].message.as_str()
        ),
        ("d", AgentUpdateState::Halted, "wave 2: b failed")
    );
    let all = store.agent_update_batch(batch).await.unwrap();
    assert_eq!(
        all.iter().map(|u| u.state).collect::<Vec<_>>(),
        [
            AgentUpdateState::Pending,
            AgentUpdateState::Pending,
            AgentUpdateState::Pending,
            AgentUpdateState::Halted
        ]
    );
    assert!(
        store
            .waiting_agent_update_batches()
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.open_agent_update("d").await.unwrap(), None);
    assert!(store.agent_update_batch(999).await.unwrap().is_empty());
}

/// A status report that names a failure promotes no release to applied
/// and replaces none. The sequence it guards: release 2 was refused and
/// rolled back (release 1 runs), release 3 was delivered, and then a late
/// report still about release 2 named revision 2 running and 3 failed —
/// which once marked the refused release 2 applied and release 1 replaced.
pub async fn a_failure_report_promotes_no_release(store: &dyn Store) {
    use ReleaseState::{Applied, Failed};

    setup(store, "shop").await;
    stage_in(store, "shop", "dev").await;
    let build = store
        .create_build("shop", &new_build("main"), "alice", at(20))
        .await
        .unwrap();
    let release = new_release("shop", "dev", &build.name);
    store.push_release(&release, at(30)).await.unwrap();
    store.push_release(&release, at(31)).await.unwrap();
    store
        .record_status("shop", "dev", 1, None, &json!({ "revision": 1 }), at(100))
        .await
        .unwrap();
    store
        .record_status(
            "shop",
            "dev",
            1,
            Some(2),
            &json!({ "revision": 2, "rolled_back_to": 1 }),
            at(110),
        )
        .await
        .unwrap();
    assert_eq!(
        release_states(store, "shop", "dev").await,
        [Applied, Failed]
    );
    let r3 = store.push_release(&release, at(32)).await.unwrap();
    store
        .record_delivered("shop", "dev", r3.revision, at(120))
        .await
        .unwrap();
    store
        .record_status(
            "shop",
            "dev",
            2,
            Some(3),
            &json!({ "revision": 2, "rolled_back_to": 1 }),
            at(130),
        )
        .await
        .unwrap();
    let states = release_states(store, "shop", "dev").await;
    assert_eq!(states[0], Applied, "release 1 still runs: {states:?}");
    assert_eq!(
        states[1], Failed,
        "the refused release stays failed: {states:?}"
    );
}
