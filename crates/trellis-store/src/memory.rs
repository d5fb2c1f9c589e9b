//! A store that keeps everything in memory, for tests and the deterministic
//! simulation.
//!
//! It enforces exactly the rules of the SQLite backend (the shared
//! [`testsuite`](crate::testsuite) checks both), so a test that passes
//! against it says something about the real hub. Records are nested the way
//! they are owned (stages inside projects, releases inside stages), which
//! makes every cascading deletion a single `remove`. What hangs off an
//! outpost (its link record and join tokens) is kept beside it and removed
//! with it.
//!
//! Each operation validates everything before it changes anything, under one
//! lock, so operations are atomic just like the SQLite transactions.
//!
//! It is also a store several hubs can share (the simulation runs several
//! over one): it announces changes as PostgreSQL's triggers do (see
//! [`crate::cluster`]), under the same lock as the change, so in commit
//! order — and a test can make it lose some ([`MemoryStore::set_change_filter`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::DateTime;
use trellis_model::{
    AccessKeyInfo, AgentBinary, AuditEntry, Backup, BackupState, Build, ComponentAction,
    ComponentControl, Config, ConfigData, Member, NewAuditEntry, NewBackup, NewBuild, Outpost,
    OutpostLink, Project, Release, ReleaseState, Role, Stage, StageSync, Timestamp, User,
    agent_update::{AgentUpdate, AgentUpdateState, NewAgentUpdate},
    build_name,
    rollout::{NewRollout, Rollout},
};

use tokio::sync::{mpsc, watch};

use crate::{
    AdminGuarded, Change, ChangeFeed, ControlOutcome, DesiredParts, Instance, JobLock,
    JoinTokenRefusal, LinkClaim, NewRelease, NewStage, OutpostStage, OutpostUpdate, ProjectUpdate,
    PushedReleases, Result, StageFilter, StageKey, StageSummary, StageUpdate, Store, StoreError,
    StoredAccessKey, wording,
};

/// The in-memory store. Cheap to create; holds nothing on disk.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    feed: Mutex<Feed>,
    /// Jobs whose lock is held, shared with the locks' guards.
    jobs: std::sync::Arc<Mutex<std::collections::HashSet<String>>>,
}

/// Decides which announced changes a subscriber gets (`true`: delivered);
/// see [`MemoryStore::set_change_filter`].
pub type ChangeFilter = Box<dyn FnMut(&Change) -> bool + Send>;

/// The subscribers of the change feed.
#[derive(Default)]
struct Feed {
    subscribers: Vec<Subscriber>,
    filter: Option<ChangeFilter>,
}

struct Subscriber {
    tx: mpsc::Sender<Change>,
    /// A change did not fit: it is told [`Change::Missed`] when one does.
    missed: bool,
}

/// Changes a subscriber may fall behind on, as with PostgreSQL's listener.
const FEED_CAPACITY: usize = 65_536;

#[derive(Default)]
struct State {
    users: BTreeMap<String, User>,
    keys: BTreeMap<String, StoredAccessKey>,
    projects: BTreeMap<String, ProjectState>,
    outposts: BTreeMap<String, Outpost>,
    /// By outpost; only outposts given a profile have one.
    link_profiles: BTreeMap<String, trellis_model::link_profile::LinkProfile>,
    /// By outpost; only outposts whose agent joined have one.
    links: BTreeMap<String, OutpostLink>,
    /// By token hash.
    join_tokens: BTreeMap<String, JoinToken>,
    /// The last audit entry's id.
    last_audit: u64,
    /// The last backup id handed out (never given twice).
    last_backup: u64,
    /// The last rollout id handed out (never given twice).
    last_rollout: u64,
    /// By id.
    agent_updates: BTreeMap<u64, AgentUpdate>,
    /// The last agent update id handed out (never given twice).
    last_agent_update: u64,
    instances: BTreeMap<String, Instance>,
    claims: BTreeMap<String, LinkClaim>,
    secrets: BTreeMap<String, String>,
    /// By (version, architecture).
    agent_binaries: BTreeMap<(String, String), AgentBinary>,
}

struct JoinToken {
    outpost: String,
    expires_at: Timestamp,
    used_at: Option<Timestamp>,
}

struct ProjectState {
    project: Project,
    /// Highest build number ever assigned; outlives deleted builds so that
    /// numbers are never reused.
    last_build: u64,
    members: BTreeMap<String, Role>,
    /// Oldest first.
    audit: Vec<AuditEntry>,
    stages: BTreeMap<String, StageState>,
    builds: BTreeMap<String, Build>,
    rollouts: BTreeMap<u64, Rollout>,
}

struct StageState {
    stage: Stage,
    configs: BTreeMap<String, Config>,
    releases: BTreeMap<u64, Release>,
    /// `None` until something was delivered to or reported for the stage.
    sync: Option<StageSync>,
    /// By component; only components ever started, stopped or restarted.
    controls: BTreeMap<String, ComponentControl>,
    /// By id.
    backups: BTreeMap<u64, Backup>,
    backup_schedule: Option<trellis_model::BackupSchedule>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, announces only the changes `filter` lets through, as
    /// if the others were lost on their way to the hubs (the simulation's
    /// lost notifications). Nobody is told they were lost.
    pub fn set_change_filter(&self, filter: ChangeFilter) {
        self.feed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .filter = Some(filter);
    }

    /// Sends `changes` to every subscriber. Called with the state locked,
    /// so changes go out in the order they were made.
    fn announce(&self, changes: impl IntoIterator<Item = Change>) {
        let mut feed = self.feed.lock().unwrap_or_else(PoisonError::into_inner);
        let Feed {
            subscribers,
            filter,
        } = &mut *feed;
        subscribers.retain(|s| !s.tx.is_closed());
        for change in changes {
            for subscriber in subscribers.iter_mut() {
                if let Some(filter) = filter.as_mut()
                    && !filter(&change)
                {
                    continue;
                }
                if subscriber.missed && subscriber.tx.try_send(Change::Missed).is_ok() {
                    subscriber.missed = false;
                }
                if subscriber.tx.try_send(change.clone()).is_err() {
                    subscriber.missed = true;
                }
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every operation validates before it mutates and nothing in a
        // mutation panics, so a poisoned lock (a panic elsewhere while it
        // was held) still guards consistent state and can be used.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The SQLite backend keeps milliseconds; truncating here too means both
/// backends hand back identical records.
/// The outpost's update still under way, if any.
fn open_update<'a>(state: &'a State, outpost: &str) -> Option<&'a AgentUpdate> {
    state
        .agent_updates
        .values()
        .rev()
        .find(|u| u.outpost == outpost && u.state.is_open())
}

/// Applies `change` to every update of request `batch`; returns those it
/// changed (it says whether it did).
fn change_batch(
    state: &mut State,
    batch: u64,
    mut change: impl FnMut(&mut AgentUpdate) -> bool,
) -> Vec<AgentUpdate> {
    state
        .agent_updates
        .values_mut()
        .filter(|u| u.batch == batch)
        .filter_map(|u| change(u).then(|| u.clone()))
        .collect()
}

fn millis(t: Timestamp) -> Timestamp {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

fn not_found(kind: &'static str, name: String) -> StoreError {
    StoreError::NotFound { kind, name }
}

impl StageState {
    /// The stage's sync record, or the zeros of one never written.
    fn current_sync(&self) -> StageSync {
        self.sync.clone().unwrap_or_else(|| StageSync {
            project: self.stage.project.clone(),
            stage: self.stage.name.clone(),
            ..StageSync::default()
        })
    }
}

/// Where a release stands after its stage's outpost reported (see
/// [`Store::record_status`]): `running` is the revision of the release in
/// place at the applied revision, if any; `applied_failed` says the report
/// is a failure, which promotes and replaces nothing (see the SQL store's
/// `status_in`).
fn reported_state(
    release: &Release,
    running: Option<u64>,
    applied_failed: bool,
    failed: Option<u64>,
) -> ReleaseState {
    let revision = release.revision;
    if failed == Some(revision) {
        return ReleaseState::Failed;
    }
    let Some(running) = running else {
        return release.state;
    };
    if revision == running && !applied_failed {
        ReleaseState::Applied
    } else if revision < running {
        match release.state {
            // The applied revision itself failed: the agent restored what
            // ran before, which therefore stays applied.
            ReleaseState::Applied if applied_failed => ReleaseState::Applied,
            ReleaseState::Applied => ReleaseState::Replaced,
            ReleaseState::Pending => ReleaseState::Superseded,
            other => other,
        }
    } else {
        release.state
    }
}

impl State {
    /// The release's stage and build exist (see [`Store::push_release`]).
    fn check_release(&self, release: &NewRelease) -> Result<()> {
        self.stage(&release.project, &release.stage)?;
        if !self
            .project(&release.project)?
            .builds
            .contains_key(&release.build)
        {
            return Err(not_found(
                "build",
                wording::build(&release.project, &release.build),
            ));
        }
        Ok(())
    }

    /// Records a release that passed [`State::check_release`]: the stage's
    /// next number and revision.
    fn record_release(&mut self, release: &NewRelease, now: Timestamp) -> Result<Release> {
        let stage_state = self.stage_mut(&release.project, &release.stage)?;
        let stage = &mut stage_state.stage;
        let number = stage.latest_release.unwrap_or(0) + 1;
        stage.desired_revision += 1;
        stage.latest_release = Some(number);
        let created = release.pending(number, stage.desired_revision, millis(now));
        stage_state.releases.insert(number, created.clone());
        Ok(created)
    }

    /// Records `releases` all or none (see [`Store::push_releases`]):
    /// every entry is checked before anything changes.
    fn push_releases(&mut self, releases: &[NewRelease], now: Timestamp) -> Result<PushedReleases> {
        let mut outposts = Vec::with_capacity(releases.len());
        for release in releases {
            self.check_release(release)?;
            outposts.push(
                self.stage(&release.project, &release.stage)?
                    .stage
                    .outpost
                    .clone(),
            );
        }
        let created = releases
            .iter()
            .map(|release| self.record_release(release, now))
            .collect::<Result<_>>()?;
        Ok(PushedReleases::new(created, outposts))
    }

    /// The stored record of `rollout`, if it is still at the version
    /// `rollout` was read at (see [`Store::save_rollout`]).
    fn stored_rollout(&mut self, rollout: &Rollout) -> Result<&mut Rollout> {
        let stored = self
            .projects
            .get_mut(&rollout.project)
            .and_then(|p| p.rollouts.get_mut(&rollout.id))
            .ok_or_else(|| not_found("rollout", wording::rollout(rollout.id)))?;
        if stored.version != rollout.version {
            return Err(wording::rollout_changed(rollout.id));
        }
        Ok(stored)
    }

    fn project(&self, name: &str) -> Result<&ProjectState> {
        self.projects
            .get(name)
            .ok_or_else(|| not_found("project", name.to_owned()))
    }

    fn project_mut(&mut self, name: &str) -> Result<&mut ProjectState> {
        self.projects
            .get_mut(name)
            .ok_or_else(|| not_found("project", name.to_owned()))
    }

    fn is_admin(&self, name: &str) -> bool {
        self.users.get(name).is_some_and(|u| u.admin)
    }

    /// Keys of administrators that `keep` selects.
    fn admin_keys(&self, keep: impl Fn(&StoredAccessKey) -> bool) -> usize {
        self.keys
            .values()
            .filter(|k| self.is_admin(&k.info.user) && keep(k))
            .count()
    }

    fn user_exists(&self, name: &str) -> Result<()> {
        if self.users.contains_key(name) {
            Ok(())
        } else {
            Err(not_found("user", name.to_owned()))
        }
    }

    fn stage(&self, project: &str, stage: &str) -> Result<&StageState> {
        self.project(project)?
            .stages
            .get(stage)
            .ok_or_else(|| not_found("stage", wording::stage(project, stage)))
    }

    fn stage_mut(&mut self, project: &str, stage: &str) -> Result<&mut StageState> {
        self.project_mut(project)?
            .stages
            .get_mut(stage)
            .ok_or_else(|| not_found("stage", wording::stage(project, stage)))
    }

    fn outpost_exists(&self, name: &str) -> Result<()> {
        if self.outposts.contains_key(name) {
            Ok(())
        } else {
            Err(not_found("outpost", name.to_owned()))
        }
    }

    fn stage_count_on(&self, outpost: &str) -> usize {
        self.projects
            .values()
            .flat_map(|p| p.stages.values())
            .filter(|s| s.stage.outpost == outpost)
            .count()
    }
}

#[async_trait]
impl Store for MemoryStore {
    // Nothing here is faster in a batch than one at a time.
    async fn outposts_desired(
        &self,
        asks: &[crate::DesiredAsk],
    ) -> Result<Vec<Result<Vec<crate::OutpostStage>>>> {
        crate::one_by_one::outposts_desired(self, asks).await
    }

    async fn list_archived_stages(&self, project: &str) -> Result<Vec<Stage>> {
        crate::one_by_one::list_archived_stages(self, project).await
    }

    async fn stage_summaries_named(
        &self,
        project: &str,
        names: &[String],
    ) -> Result<Vec<crate::StageSummary>> {
        crate::one_by_one::stage_summaries_named(self, project, names).await
    }

    async fn record_link_activity(&self, activity: &[crate::LinkActivity]) -> Result<()> {
        crate::one_by_one::record_link_activity(self, activity).await
    }

    async fn record_sync_batch(
        &self,
        updates: &[crate::SyncUpdate],
        now: Timestamp,
    ) -> Result<Vec<Result<crate::StageSync>>> {
        crate::one_by_one::record_sync_batch(self, updates, now).await
    }

    async fn create_user(&self, user: &User) -> Result<()> {
        let mut state = self.state();
        if state.users.contains_key(&user.name) {
            return Err(StoreError::AlreadyExists {
                kind: "user",
                name: user.name.clone(),
            });
        }
        let user = User {
            created_at: millis(user.created_at),
            ..user.clone()
        };
        state.users.insert(user.name.clone(), user);
        Ok(())
    }

    async fn get_user(&self, name: &str) -> Result<User> {
        self.state()
            .users
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("user", name.to_owned()))
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        Ok(self.state().users.values().cloned().collect())
    }

    async fn create_access_key(&self, key: &StoredAccessKey) -> Result<()> {
        let mut state = self.state();
        state.user_exists(&key.info.user)?;
        if state.keys.contains_key(&key.info.id) {
            return Err(StoreError::AlreadyExists {
                kind: "access key",
                name: key.info.id.clone(),
            });
        }
        let mut key = key.clone();
        key.info.created_at = millis(key.info.created_at);
        state.keys.insert(key.info.id.clone(), key);
        Ok(())
    }

    async fn find_access_key(&self, id: &str) -> Result<Option<StoredAccessKey>> {
        Ok(self.state().keys.get(id).cloned())
    }

    async fn list_access_keys(&self, user: Option<&str>) -> Result<Vec<AccessKeyInfo>> {
        let state = self.state();
        if let Some(user) = user {
            state.user_exists(user)?;
        }
        Ok(state
            .keys
            .values()
            .filter(|k| user.is_none_or(|u| k.info.user == u))
            .map(|k| k.info.clone())
            .collect())
    }

    async fn delete_access_key(&self, id: &str) -> Result<()> {
        self.state()
            .keys
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| not_found("access key", id.to_owned()))
    }

    async fn delete_access_key_keeping_admin(&self, id: &str) -> Result<AdminGuarded<()>> {
        let mut state = self.state();
        let key = state
            .keys
            .get(id)
            .ok_or_else(|| not_found("access key", id.to_owned()))?;
        if state.is_admin(&key.info.user) && state.admin_keys(|k| k.info.id != id) == 0 {
            return Ok(AdminGuarded::LastAdminKey);
        }
        state.keys.remove(id);
        Ok(AdminGuarded::Done(()))
    }

    async fn set_user_admin(&self, name: &str, admin: bool) -> Result<AdminGuarded<User>> {
        let mut state = self.state();
        let user = state
            .users
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("user", name.to_owned()))?;
        if user.admin && !admin {
            let own = state.keys.values().filter(|k| k.info.user == name).count();
            if own > 0 && state.admin_keys(|k| k.info.user != name) == 0 {
                return Ok(AdminGuarded::LastAdminKey);
            }
        }
        let user = User { admin, ..user };
        state.users.insert(name.to_owned(), user.clone());
        Ok(AdminGuarded::Done(user))
    }

    async fn create_project(&self, project: &Project, owner: &str) -> Result<()> {
        let mut state = self.state();
        state.user_exists(owner)?;
        if state.projects.contains_key(&project.name) {
            return Err(StoreError::AlreadyExists {
                kind: "project",
                name: project.name.clone(),
            });
        }
        let project = Project {
            created_at: millis(project.created_at),
            ..project.clone()
        };
        state.projects.insert(
            project.name.clone(),
            ProjectState {
                project,
                last_build: 0,
                members: BTreeMap::from([(owner.to_owned(), Role::Owner)]),
                audit: Vec::new(),
                stages: BTreeMap::new(),
                builds: BTreeMap::new(),
                rollouts: BTreeMap::new(),
            },
        );
        Ok(())
    }

    async fn get_project(&self, name: &str) -> Result<Project> {
        Ok(self.state().project(name)?.project.clone())
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        Ok(self
            .state()
            .projects
            .values()
            .map(|p| p.project.clone())
            .collect())
    }

    async fn delete_project(&self, name: &str, force: bool) -> Result<()> {
        let mut state = self.state();
        let project = state.project(name)?;
        if !force && (!project.stages.is_empty() || !project.builds.is_empty()) {
            return Err(wording::project_in_use(
                name,
                project.stages.len() as u64,
                project.builds.len() as u64,
            ));
        }
        if let Some(removed) = state.projects.remove(name) {
            let mut outposts: Vec<String> = removed
                .stages
                .values()
                .map(|s| s.stage.outpost.clone())
                .collect();
            outposts.sort_unstable();
            outposts.dedup();
            self.announce(outposts.into_iter().map(Change::Outpost));
        }
        Ok(())
    }

    async fn update_project(&self, name: &str, update: &ProjectUpdate) -> Result<Project> {
        let mut state = self.state();
        let project = &mut state.project_mut(name)?.project;
        if let Some(display_name) = &update.display_name {
            project.display_name = display_name.clone();
        }
        if let Some(description) = &update.description {
            project.description = description.clone();
        }
        Ok(project.clone())
    }

    async fn archive_project(&self, name: &str, now: Timestamp) -> Result<Vec<Stage>> {
        let mut state = self.state();
        let p = state.project_mut(name)?;
        if p.project.archived_at.is_some() {
            return Ok(Vec::new());
        }
        let now = millis(now);
        p.project.archived_at = Some(now);
        let mut archived = Vec::new();
        for s in p.stages.values_mut() {
            if s.stage.archived_at.is_none() {
                s.stage.archived_at = Some(now);
                s.stage.desired_revision += 1;
                archived.push(s.stage.clone());
            }
        }
        self.announce(archived.iter().map(|s| Change::Outpost(s.outpost.clone())));
        Ok(archived)
    }

    async fn restore_project(&self, name: &str) -> Result<Vec<Stage>> {
        let mut state = self.state();
        let p = state.project_mut(name)?;
        let Some(at) = p.project.archived_at.take() else {
            return Ok(Vec::new());
        };
        let mut restored = Vec::new();
        for s in p.stages.values_mut() {
            if s.stage.archived_at == Some(at) {
                s.stage.archived_at = None;
                s.stage.desired_revision += 1;
                restored.push(s.stage.clone());
            }
        }
        self.announce(restored.iter().map(|s| Change::Outpost(s.outpost.clone())));
        Ok(restored)
    }

    async fn set_member(&self, project: &str, user: &str, role: Role) -> Result<()> {
        let mut state = self.state();
        state.project(project)?;
        state.user_exists(user)?;
        state
            .project_mut(project)?
            .members
            .insert(user.to_owned(), role);
        Ok(())
    }

    async fn remove_member(&self, project: &str, user: &str) -> Result<()> {
        self.state()
            .project_mut(project)?
            .members
            .remove(user)
            .map(|_| ())
            .ok_or_else(|| not_found("member", wording::member(project, user)))
    }

    async fn list_members(&self, project: &str) -> Result<Vec<Member>> {
        Ok(self
            .state()
            .project(project)?
            .members
            .iter()
            .map(|(user, role)| Member {
                project: project.to_owned(),
                user: user.clone(),
                role: *role,
            })
            .collect())
    }

    async fn record_audit(&self, entry: &NewAuditEntry) -> Result<AuditEntry> {
        let mut state = self.state();
        state.last_audit += 1;
        let id = state.last_audit;
        let project = state.project_mut(&entry.project)?;
        let stored = AuditEntry {
            id,
            time: entry.time,
            user: entry.user.clone(),
            project: entry.project.clone(),
            stage: entry.stage.clone(),
            component: entry.component.clone(),
            outpost: entry.outpost.clone(),
            action: entry.action.clone(),
            detail: entry.detail.clone(),
            result: entry.result.clone(),
        };
        project.audit.push(stored.clone());
        Ok(stored)
    }

    async fn list_audit(&self, project: &str, limit: usize) -> Result<Vec<AuditEntry>> {
        Ok(self
            .state()
            .project(project)?
            .audit
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn create_backup(&self, backup: &NewBackup) -> Result<Backup> {
        let mut state = self.state();
        state.stage(&backup.project, &backup.stage)?;
        state.last_backup += 1;
        let id = state.last_backup;
        let record = Backup {
            id,
            project: backup.project.clone(),
            stage: backup.stage.clone(),
            display_name: backup.display_name.clone(),
            state: BackupState::Pending,
            message: backup.message.clone(),
            created_at: millis(backup.created_at),
            created_by: backup.created_by.clone(),
            finished_at: None,
            size: 0,
            uploaded: 0,
            manifest: None,
            volumes: Vec::new(),
            restore: None,
        };
        state
            .stage_mut(&backup.project, &backup.stage)?
            .backups
            .insert(id, record.clone());
        Ok(record)
    }

    async fn get_backup(&self, project: &str, stage: &str, id: u64) -> Result<Backup> {
        self.state()
            .stage(project, stage)?
            .backups
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found("backup", wording::backup(project, stage, id)))
    }

    async fn list_backups(&self, project: &str, stage: &str) -> Result<Vec<Backup>> {
        Ok(self
            .state()
            .stage(project, stage)?
            .backups
            .values()
            .rev()
            .cloned()
            .collect())
    }

    async fn save_backup(&self, backup: &Backup) -> Result<()> {
        let mut state = self.state();
        let gone = || {
            not_found(
                "backup",
                wording::backup(&backup.project, &backup.stage, backup.id),
            )
        };
        let stored = state
            .stage_mut(&backup.project, &backup.stage)
            .map_err(|_| gone())?
            .backups
            .get_mut(&backup.id)
            .ok_or_else(gone)?;
        let mut saved = backup.clone();
        // As the SQL backends keep them: milliseconds.
        saved.finished_at = saved.finished_at.map(millis);
        if let Some(r) = &mut saved.restore {
            r.requested_at = millis(r.requested_at);
            r.finished_at = r.finished_at.map(millis);
        }
        saved.created_at = stored.created_at;
        saved.created_by = stored.created_by.clone();
        *stored = saved;
        Ok(())
    }

    async fn create_agent_updates(
        &self,
        updates: &[NewAgentUpdate],
        at: Timestamp,
    ) -> Result<Vec<AgentUpdate>> {
        let at = millis(at);
        let mut state = self.state();
        for (i, new) in updates.iter().enumerate() {
            if !state.outposts.contains_key(&new.outpost) {
                return Err(not_found("outpost", new.outpost.clone()));
            }
            if let Some(open) = open_update(&state, &new.outpost) {
                return Err(wording::agent_update_open(open));
            }
            // An outpost named twice: the second finds the first open.
            if let Some(first) = updates[..i].iter().find(|u| u.outpost == new.outpost) {
                let open = first.record(state.last_agent_update + 1, 0, at);
                return Err(wording::agent_update_open(&open));
            }
        }
        let mut made = Vec::with_capacity(updates.len());
        let batch = state.last_agent_update + 1;
        for new in updates {
            state.last_agent_update += 1;
            let record = new.record(state.last_agent_update, batch, at);
            state.agent_updates.insert(record.id, record.clone());
            made.push(record);
        }
        self.announce(
            made.iter()
                .filter(|u| u.state == AgentUpdateState::Pending)
                .map(|u| Change::Outpost(u.outpost.clone()))
                .collect::<Vec<_>>(),
        );
        Ok(made)
    }

    async fn open_agent_update(&self, outpost: &str) -> Result<Option<AgentUpdate>> {
        Ok(open_update(&self.state(), outpost).cloned())
    }

    async fn report_agent_update(
        &self,
        outpost: &str,
        id: u64,
        state: AgentUpdateState,
        message: &str,
        at: Timestamp,
    ) -> Result<AgentUpdate> {
        let mut all = self.state();
        let record = all
            .agent_updates
            .get_mut(&id)
            .filter(|u| u.outpost == outpost)
            .ok_or_else(|| not_found("agent update", wording::agent_update(id)))?;
        record.advance(state, message, millis(at));
        Ok(record.clone())
    }

    async fn latest_agent_updates(&self) -> Result<Vec<AgentUpdate>> {
        let state = self.state();
        let mut latest: BTreeMap<&str, &AgentUpdate> = BTreeMap::new();
        for u in state.agent_updates.values() {
            latest.insert(&u.outpost, u);
        }
        Ok(latest.into_values().cloned().collect())
    }

    async fn waiting_agent_update_batches(&self) -> Result<Vec<u64>> {
        let state = self.state();
        let batches: BTreeSet<u64> = state
            .agent_updates
            .values()
            .filter(|u| u.state == AgentUpdateState::Waiting)
            .map(|u| u.batch)
            .collect();
        Ok(batches.into_iter().collect())
    }

    async fn agent_update_batch(&self, batch: u64) -> Result<Vec<AgentUpdate>> {
        let state = self.state();
        Ok(state
            .agent_updates
            .values()
            .filter(|u| u.batch == batch)
            .cloned()
            .collect())
    }

    async fn release_agent_update_wave(
        &self,
        batch: u64,
        wave: u32,
        offline: &[String],
        at: Timestamp,
    ) -> Result<Vec<AgentUpdate>> {
        let at = millis(at);
        let released = change_batch(&mut self.state(), batch, |u| {
            u.wave == wave && u.release(offline.contains(&u.outpost), at)
        });
        self.announce(
            released
                .iter()
                .map(|u| Change::Outpost(u.outpost.clone()))
                .collect::<Vec<_>>(),
        );
        Ok(released)
    }

    async fn halt_agent_update_batch(
        &self,
        batch: u64,
        why: &str,
        at: Timestamp,
    ) -> Result<Vec<AgentUpdate>> {
        let at = millis(at);
        Ok(change_batch(&mut self.state(), batch, |u| u.halt(why, at)))
    }

    async fn create_rollout(&self, rollout: &NewRollout) -> Result<Rollout> {
        let mut state = self.state();
        let project = state.project(&rollout.project)?;
        let active: Vec<Rollout> = project.rollouts.values().cloned().collect();
        wording::rollout_overlap(rollout, &active)?;
        state.last_rollout += 1;
        let record = rollout.numbered(state.last_rollout);
        state
            .project_mut(&rollout.project)?
            .rollouts
            .insert(record.id, record.clone());
        Ok(record)
    }

    async fn get_rollout(&self, id: u64) -> Result<Rollout> {
        let state = self.state();
        state
            .projects
            .values()
            .find_map(|p| p.rollouts.get(&id))
            .cloned()
            .ok_or_else(|| not_found("rollout", wording::rollout(id)))
    }

    async fn list_rollouts(&self, project: Option<&str>) -> Result<Vec<Rollout>> {
        let state = self.state();
        let mut listed: Vec<Rollout> = match project {
            Some(name) => state.project(name)?.rollouts.values().cloned().collect(),
            None => state
                .projects
                .values()
                .flat_map(|p| p.rollouts.values().cloned())
                .collect(),
        };
        listed.sort_by_key(|r| std::cmp::Reverse(r.id));
        for r in &mut listed {
            r.stages.clear();
        }
        Ok(listed)
    }

    async fn save_rollout(&self, rollout: &Rollout) -> Result<Rollout> {
        let mut state = self.state();
        let stored = state.stored_rollout(rollout)?;
        let mut saved = rollout.clone();
        saved.version += 1;
        *stored = saved.clone();
        Ok(saved)
    }

    async fn push_rollout_releases(
        &self,
        rollout: &Rollout,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<(Rollout, PushedReleases)> {
        wording::not_in_rollout(rollout, releases)?;
        let mut state = self.state();
        // Checked before anything changes, under the same lock.
        state.stored_rollout(rollout)?;
        let pushed = state.push_releases(releases, now)?;
        let mut saved = rollout.clone();
        saved.record_pushed(&pushed.releases);
        saved.version += 1;
        *state.stored_rollout(rollout)? = saved.clone();
        drop(state);
        self.announce(pushed.outposts.iter().cloned().map(Change::Outpost));
        Ok((saved, pushed))
    }

    async fn put_agent_binary(&self, binary: &AgentBinary) -> Result<AgentBinary> {
        let mut state = self.state();
        let key = (binary.version.clone(), binary.arch.clone());
        if let Some(stored) = state.agent_binaries.get(&key) {
            return wording::agent_binary_again(stored.clone(), binary);
        }
        state.agent_binaries.insert(key, binary.clone());
        Ok(binary.clone())
    }

    async fn get_agent_binary(&self, version: &str, arch: &str) -> Result<AgentBinary> {
        self.state()
            .agent_binaries
            .get(&(version.to_owned(), arch.to_owned()))
            .cloned()
            .ok_or_else(|| not_found("agent binary", wording::agent_binary(version, arch)))
    }

    async fn list_agent_binaries(&self) -> Result<Vec<AgentBinary>> {
        let mut listed: Vec<AgentBinary> = self.state().agent_binaries.values().cloned().collect();
        wording::sort_agent_binaries(&mut listed);
        Ok(listed)
    }

    async fn delete_agent_binary(&self, version: &str, arch: &str) -> Result<()> {
        self.state()
            .agent_binaries
            .remove(&(version.to_owned(), arch.to_owned()))
            .map(|_| ())
            .ok_or_else(|| not_found("agent binary", wording::agent_binary(version, arch)))
    }

    async fn delete_backup(&self, project: &str, stage: &str, id: u64) -> Result<()> {
        self.state()
            .stage_mut(project, stage)?
            .backups
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| not_found("backup", wording::backup(project, stage, id)))
    }

    async fn outpost_backup_work(&self, outpost: &str) -> Result<Vec<Backup>> {
        let state = self.state();
        let mut work: Vec<Backup> = state
            .projects
            .values()
            .flat_map(|p| p.stages.values())
            .filter(|s| s.stage.outpost == outpost)
            .flat_map(|s| s.backups.values())
            .filter(|b| b.state.is_open() || b.restore.as_ref().is_some_and(|r| r.state.is_open()))
            .cloned()
            .collect();
        work.sort_by_key(|b| b.id);
        Ok(work)
    }

    async fn backup_manifests(&self) -> Result<Vec<String>> {
        Ok(self
            .state()
            .projects
            .values()
            .flat_map(|p| p.stages.values())
            .flat_map(|s| s.backups.values())
            .filter_map(|b| b.manifest.clone())
            .collect())
    }

    async fn set_backup_schedule(
        &self,
        project: &str,
        stage: &str,
        schedule: Option<&trellis_model::BackupSchedule>,
    ) -> Result<()> {
        let mut state = self.state();
        let stage_state = state.stage_mut(project, stage)?;
        stage_state.backup_schedule = schedule.map(|s| {
            let mut s = s.clone();
            s.project = project.to_owned();
            s.stage = stage.to_owned();
            s.last_run = millis(s.last_run);
            s
        });
        Ok(())
    }

    async fn get_backup_schedule(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Option<trellis_model::BackupSchedule>> {
        Ok(self.state().stage(project, stage)?.backup_schedule.clone())
    }

    async fn list_backup_schedules(&self) -> Result<Vec<trellis_model::BackupSchedule>> {
        Ok(self
            .state()
            .projects
            .values()
            .flat_map(|p| p.stages.values())
            .filter_map(|s| s.backup_schedule.clone())
            .collect())
    }

    async fn role_of(&self, project: &str, user: &str) -> Result<Option<Role>> {
        Ok(self
            .state()
            .projects
            .get(project)
            .and_then(|p| p.members.get(user))
            .copied())
    }

    async fn create_outpost(&self, outpost: &Outpost) -> Result<()> {
        let mut state = self.state();
        if state.outposts.contains_key(&outpost.name) {
            return Err(StoreError::AlreadyExists {
                kind: "outpost",
                name: outpost.name.clone(),
            });
        }
        let outpost = Outpost {
            created_at: millis(outpost.created_at),
            revoked_at: outpost.revoked_at.map(millis),
            ..outpost.clone()
        };
        state.outposts.insert(outpost.name.clone(), outpost);
        Ok(())
    }

    async fn get_outpost(&self, name: &str) -> Result<Outpost> {
        self.state()
            .outposts
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("outpost", name.to_owned()))
    }

    async fn list_outposts(&self) -> Result<Vec<Outpost>> {
        Ok(self.state().outposts.values().cloned().collect())
    }

    async fn delete_outpost(&self, name: &str, force: bool) -> Result<()> {
        let mut state = self.state();
        if !state.outposts.contains_key(name) {
            return Err(not_found("outpost", name.to_owned()));
        }
        let on_it: Vec<String> = state
            .projects
            .values()
            .flat_map(|p| p.stages.values())
            .filter(|s| s.stage.outpost == name)
            .map(|s| wording::stage(&s.stage.project, &s.stage.name))
            .collect();
        if !force && !on_it.is_empty() {
            return Err(wording::outpost_in_use(name, &on_it));
        }
        for project in state.projects.values_mut() {
            project.stages.retain(|_, s| s.stage.outpost != name);
        }
        state.links.remove(name);
        state.join_tokens.retain(|_, t| t.outpost != name);
        state.agent_updates.retain(|_, u| u.outpost != name);
        state.claims.remove(name);
        state.outposts.remove(name);
        state.link_profiles.remove(name);
        self.announce([
            Change::Outpost(name.to_owned()),
            Change::Revoked(name.to_owned()),
        ]);
        Ok(())
    }

    async fn rotate_outpost_uri(&self, name: &str) -> Result<Outpost> {
        let mut state = self.state();
        let outpost = state
            .outposts
            .get_mut(name)
            .ok_or_else(|| not_found("outpost", name.to_owned()))?;
        outpost.uri_generation += 1;
        Ok(outpost.clone())
    }

    async fn update_outpost(&self, name: &str, update: &OutpostUpdate) -> Result<Outpost> {
        let mut state = self.state();
        let outpost = state
            .outposts
            .get_mut(name)
            .ok_or_else(|| not_found("outpost", name.to_owned()))?;
        if let Some(display_name) = &update.display_name {
            outpost.display_name = display_name.clone();
        }
        if let Some(description) = &update.description {
            outpost.description = description.clone();
        }
        let changed = match &update.ingress_domain {
            Some(domain) if *domain != outpost.ingress_domain => {
                outpost.ingress_domain = domain.clone();
                true
            }
            _ => false,
        };
        let outpost = outpost.clone();
        if changed {
            for stage in state
                .projects
                .values_mut()
                .flat_map(|p| p.stages.values_mut())
                .filter(|s| s.stage.outpost == name)
            {
                stage.stage.desired_revision += 1;
            }
            self.announce([Change::Outpost(name.to_owned())]);
        }
        Ok(outpost)
    }

    async fn get_link_profile(
        &self,
        outpost: &str,
    ) -> Result<trellis_model::link_profile::LinkProfile> {
        let state = self.state();
        if !state.outposts.contains_key(outpost) {
            return Err(not_found("outpost", outpost.to_owned()));
        }
        Ok(state
            .link_profiles
            .get(outpost)
            .cloned()
            .unwrap_or_default())
    }

    async fn set_link_profile(
        &self,
        outpost: &str,
        profile: &trellis_model::link_profile::LinkProfile,
    ) -> Result<trellis_model::link_profile::LinkProfile> {
        let mut state = self.state();
        if !state.outposts.contains_key(outpost) {
            return Err(not_found("outpost", outpost.to_owned()));
        }
        let before = if profile.is_default() {
            state.link_profiles.remove(outpost)
        } else {
            state
                .link_profiles
                .insert(outpost.to_owned(), profile.clone())
        };
        if before.unwrap_or_default() != *profile {
            self.announce([Change::Profile(outpost.to_owned())]);
        }
        Ok(profile.clone())
    }

    async fn list_link_profiles(
        &self,
    ) -> Result<Vec<(String, trellis_model::link_profile::LinkProfile)>> {
        Ok(self
            .state()
            .link_profiles
            .iter()
            .map(|(o, p)| (o.clone(), p.clone()))
            .collect())
    }

    async fn revoke_outpost(&self, name: &str, now: Timestamp) -> Result<Outpost> {
        let mut state = self.state();
        let outpost = state
            .outposts
            .get_mut(name)
            .ok_or_else(|| not_found("outpost", name.to_owned()))?;
        let first = outpost.revoked_at.is_none();
        outpost.revoked_at.get_or_insert(millis(now));
        let outpost = outpost.clone();
        if first {
            self.announce([Change::Revoked(name.to_owned())]);
        }
        Ok(outpost)
    }

    async fn stages_on_outpost(&self, outpost: &str) -> Result<Vec<Stage>> {
        let state = self.state();
        if !state.outposts.contains_key(outpost) {
            return Err(not_found("outpost", outpost.to_owned()));
        }
        Ok(state
            .projects
            .values()
            .flat_map(|p| p.stages.values())
            .filter(|s| s.stage.outpost == outpost)
            .map(|s| s.stage.clone())
            .collect())
    }

    async fn outpost_desired(
        &self,
        outpost: &str,
        held: &HashMap<StageKey, u64>,
    ) -> Result<Vec<OutpostStage>> {
        let state = self.state();
        if !state.outposts.contains_key(outpost) {
            return Err(not_found("outpost", outpost.to_owned()));
        }
        let mut listed = Vec::new();
        for (project, p) in &state.projects {
            for s in p.stages.values().filter(|s| s.stage.outpost == outpost) {
                let key = (project.clone(), s.stage.name.clone());
                let wanted = s.stage.desired_revision > held.get(&key).copied().unwrap_or(0);
                let desired = if wanted {
                    // An archived stage runs nothing on its outpost.
                    let running = s
                        .stage
                        .latest_release
                        .filter(|_| s.stage.archived_at.is_none());
                    let release = match running {
                        Some(n) => Some(s.releases.get(&n).cloned().ok_or_else(|| {
                            not_found("release", wording::release(project, &s.stage.name, n))
                        })?),
                        None => None,
                    };
                    let build = match &release {
                        Some(r) => Some(p.builds.get(&r.build).cloned().ok_or_else(|| {
                            not_found("build", wording::build(project, &r.build))
                        })?),
                        None => None,
                    };
                    Some(DesiredParts {
                        controls: s.controls.values().cloned().collect(),
                        release,
                        build,
                    })
                } else {
                    None
                };
                listed.push(OutpostStage {
                    stage: s.stage.clone(),
                    desired,
                });
            }
        }
        Ok(listed)
    }

    async fn create_stage(&self, stage: &NewStage, now: Timestamp) -> Result<Stage> {
        let mut state = self.state();
        if state
            .project(&stage.project)?
            .stages
            .contains_key(&stage.name)
        {
            return Err(StoreError::AlreadyExists {
                kind: "stage",
                name: wording::stage(&stage.project, &stage.name),
            });
        }
        let outpost = state
            .outposts
            .get(&stage.outpost)
            .ok_or_else(|| not_found("outpost", stage.outpost.clone()))?;
        if let Some(max) = outpost.max_stages {
            let held = state.stage_count_on(&stage.outpost) as u64;
            if held >= u64::from(max) {
                return Err(wording::outpost_full(&stage.outpost, held, max));
            }
        }
        let created = Stage {
            project: stage.project.clone(),
            name: stage.name.clone(),
            stage_type: stage.stage_type,
            display_name: stage.display_name.clone(),
            suspended: false,
            outpost: stage.outpost.clone(),
            desired_revision: 0,
            latest_release: None,
            created_at: millis(now),
            archived_at: None,
        };
        state.project_mut(&stage.project)?.stages.insert(
            stage.name.clone(),
            StageState {
                stage: created.clone(),
                configs: BTreeMap::new(),
                releases: BTreeMap::new(),
                sync: None,
                controls: BTreeMap::new(),
                backups: BTreeMap::new(),
                backup_schedule: None,
            },
        );
        Ok(created)
    }

    async fn get_stage(&self, project: &str, name: &str) -> Result<Stage> {
        Ok(self.state().stage(project, name)?.stage.clone())
    }

    async fn list_stages(&self, project: &str) -> Result<Vec<Stage>> {
        Ok(self
            .state()
            .project(project)?
            .stages
            .values()
            .map(|s| s.stage.clone())
            .collect())
    }

    async fn list_stage_summaries(
        &self,
        project: &str,
        which: StageFilter,
    ) -> Result<Vec<StageSummary>> {
        Ok(self
            .state()
            .project(project)?
            .stages
            .values()
            .filter(|s| {
                which == StageFilter::All
                    || s.current_sync().applied_revision < s.stage.desired_revision
            })
            .map(|s| {
                let sync = s.current_sync();
                StageSummary {
                    stage: s.stage.clone(),
                    delivered_revision: sync.delivered_revision,
                    applied_revision: sync.applied_revision,
                    report_state: sync
                        .report
                        .as_ref()
                        .and_then(|r| r.get("state"))
                        .and_then(|v| v.as_str())
                        .map(str::to_owned),
                    applied_release: s
                        .releases
                        .values()
                        .rev()
                        .find(|r| r.state == ReleaseState::Applied)
                        .map(|r| r.number),
                    sync_updated_at: sync.updated_at,
                }
            })
            .collect())
    }

    async fn update_stage(&self, project: &str, name: &str, update: &StageUpdate) -> Result<Stage> {
        let mut state = self.state();
        let stage = &mut state.stage_mut(project, name)?.stage;
        let revision = stage.desired_revision;
        update.apply(stage);
        if stage.desired_revision != revision {
            self.announce([Change::Outpost(stage.outpost.clone())]);
        }
        Ok(stage.clone())
    }

    async fn archive_stage(&self, project: &str, name: &str, now: Timestamp) -> Result<Stage> {
        let mut state = self.state();
        let stage = &mut state.stage_mut(project, name)?.stage;
        if stage.archived_at.is_none() {
            stage.archived_at = Some(millis(now));
            stage.desired_revision += 1;
            self.announce([Change::Outpost(stage.outpost.clone())]);
        }
        Ok(stage.clone())
    }

    async fn restore_stage(&self, project: &str, name: &str) -> Result<Stage> {
        let mut state = self.state();
        let project_archived = state.project(project)?.project.archived_at.is_some();
        let stage = &mut state.stage_mut(project, name)?.stage;
        if stage.archived_at.is_some() {
            if project_archived {
                return Err(wording::project_archived(project));
            }
            stage.archived_at = None;
            stage.desired_revision += 1;
            let (stage, outpost) = (stage.clone(), stage.outpost.clone());
            self.announce([Change::Outpost(outpost)]);
            return Ok(stage);
        }
        Ok(stage.clone())
    }

    async fn delete_stage(&self, project: &str, name: &str, force: bool) -> Result<()> {
        let mut state = self.state();
        let stage = state.stage(project, name)?;
        if !force && (!stage.releases.is_empty() || !stage.configs.is_empty()) {
            return Err(wording::stage_in_use(
                project,
                name,
                stage.releases.len() as u64,
                stage.configs.len() as u64,
            ));
        }
        if let Some(removed) = state.project_mut(project)?.stages.remove(name) {
            self.announce([Change::Outpost(removed.stage.outpost)]);
        }
        Ok(())
    }

    async fn list_component_controls(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Vec<ComponentControl>> {
        Ok(self
            .state()
            .stage(project, stage)?
            .controls
            .values()
            .cloned()
            .collect())
    }

    async fn control_component(
        &self,
        project: &str,
        stage: &str,
        component: &str,
        action: ComponentAction,
    ) -> Result<ControlOutcome> {
        let mut state = self.state();
        let record = state.stage_mut(project, stage)?;
        let current = record
            .controls
            .get(component)
            .cloned()
            .unwrap_or_else(|| ComponentControl {
                component: component.to_owned(),
                ..ComponentControl::default()
            });
        let (control, changed) = action.apply(&current);
        if changed {
            record
                .controls
                .insert(component.to_owned(), control.clone());
            record.stage.desired_revision += 1;
        }
        let outcome = ControlOutcome {
            stage: record.stage.clone(),
            control,
            changed,
        };
        if changed {
            self.announce([Change::Outpost(outcome.stage.outpost.clone())]);
        }
        Ok(outcome)
    }

    async fn create_build(
        &self,
        project: &str,
        build: &NewBuild,
        created_by: &str,
        now: Timestamp,
    ) -> Result<Build> {
        let mut state = self.state();
        let project_state = state.project_mut(project)?;
        let number = project_state.last_build + 1;
        let created = Build {
            project: project.to_owned(),
            name: build_name(&build.branch, number),
            number,
            branch: build.branch.clone(),
            commit: build.commit.clone(),
            manifest_file: build.manifest_file.clone(),
            manifest: build.manifest.clone(),
            components: build.components.clone(),
            created_at: millis(now),
            created_by: created_by.to_owned(),
        };
        project_state.last_build = number;
        project_state
            .builds
            .insert(created.name.clone(), created.clone());
        Ok(created)
    }

    async fn get_build(&self, project: &str, name: &str) -> Result<Build> {
        self.state()
            .project(project)?
            .builds
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("build", wording::build(project, name)))
    }

    async fn list_builds(&self, project: &str) -> Result<Vec<Build>> {
        let mut builds: Vec<Build> = self
            .state()
            .project(project)?
            .builds
            .values()
            .cloned()
            .collect();
        builds.sort_by_key(|b| std::cmp::Reverse(b.number));
        Ok(builds)
    }

    async fn delete_build(&self, project: &str, name: &str) -> Result<()> {
        let mut state = self.state();
        let project_state = state.project(project)?;
        if !project_state.builds.contains_key(name) {
            return Err(not_found("build", wording::build(project, name)));
        }
        let mut users = 0;
        let mut stages = Vec::new();
        for stage in project_state.stages.values() {
            let n = stage.releases.values().filter(|r| r.build == name).count() as u64;
            if n > 0 {
                users += n;
                stages.push(stage.stage.name.clone());
            }
        }
        if users > 0 {
            return Err(wording::build_in_use(project, name, users, &stages));
        }
        state.project_mut(project)?.builds.remove(name);
        Ok(())
    }

    async fn add_config_data(
        &self,
        project: &str,
        stage: &str,
        name: &str,
        data: &ConfigData,
        now: Timestamp,
    ) -> Result<Config> {
        let mut state = self.state();
        let stage_state = state.stage_mut(project, stage)?;
        let config = match stage_state.configs.get(name) {
            Some(existing) => {
                let mut merged = existing.data.clone();
                merged.env.extend(data.env.clone());
                merged.files.extend(data.files.clone());
                Config {
                    version: existing.version + 1,
                    data: merged,
                    updated_at: millis(now),
                    ..existing.clone()
                }
            }
            None => Config {
                project: project.to_owned(),
                stage: stage.to_owned(),
                name: name.to_owned(),
                version: 1,
                data: data.clone(),
                updated_at: millis(now),
            },
        };
        stage_state.configs.insert(name.to_owned(), config.clone());
        Ok(config)
    }

    async fn remove_config_keys(
        &self,
        project: &str,
        stage: &str,
        name: &str,
        keys: &[String],
        now: Timestamp,
    ) -> Result<Config> {
        let mut state = self.state();
        let stage_state = state.stage_mut(project, stage)?;
        let existing = stage_state
            .configs
            .get(name)
            .ok_or_else(|| not_found("config", wording::config(project, stage, name)))?;
        let mut config = existing.clone();
        wording::remove_keys(&mut config.data, keys, project, stage, name)?;
        config.version += 1;
        config.updated_at = millis(now);
        stage_state.configs.insert(name.to_owned(), config.clone());
        Ok(config)
    }

    async fn get_config(&self, project: &str, stage: &str, name: &str) -> Result<Config> {
        self.state()
            .stage(project, stage)?
            .configs
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("config", wording::config(project, stage, name)))
    }

    async fn list_configs(&self, project: &str, stage: Option<&str>) -> Result<Vec<Config>> {
        let state = self.state();
        let configs = match stage {
            Some(stage) => state
                .stage(project, stage)?
                .configs
                .values()
                .cloned()
                .collect(),
            None => state
                .project(project)?
                .stages
                .values()
                .flat_map(|s| s.configs.values().cloned())
                .collect(),
        };
        Ok(configs)
    }

    async fn delete_config(&self, project: &str, stage: &str, name: &str) -> Result<()> {
        self.state()
            .stage_mut(project, stage)?
            .configs
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| not_found("config", wording::config(project, stage, name)))
    }

    async fn push_release(&self, release: &NewRelease, now: Timestamp) -> Result<Release> {
        let mut state = self.state();
        state.check_release(release)?;
        let created = state.record_release(release, now)?;
        let outpost = state
            .stage(&release.project, &release.stage)?
            .stage
            .outpost
            .clone();
        self.announce([Change::Outpost(outpost)]);
        Ok(created)
    }

    async fn push_releases(
        &self,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<PushedReleases> {
        let pushed = self.state().push_releases(releases, now)?;
        self.announce(pushed.outposts.iter().cloned().map(Change::Outpost));
        Ok(pushed)
    }

    async fn get_release(&self, project: &str, stage: &str, number: u64) -> Result<Release> {
        self.state()
            .stage(project, stage)?
            .releases
            .get(&number)
            .cloned()
            .ok_or_else(|| not_found("release", wording::release(project, stage, number)))
    }

    async fn list_releases(&self, project: &str, stage: &str) -> Result<Vec<Release>> {
        Ok(self
            .state()
            .stage(project, stage)?
            .releases
            .values()
            .rev()
            .cloned()
            .collect())
    }

    async fn create_join_token(
        &self,
        token_hash: &str,
        outpost: &str,
        expires_at: Timestamp,
    ) -> Result<()> {
        let mut state = self.state();
        state.outpost_exists(outpost)?;
        if state.join_tokens.contains_key(token_hash) {
            return Err(StoreError::AlreadyExists {
                kind: "join token",
                name: token_hash.to_owned(),
            });
        }
        state.join_tokens.insert(
            token_hash.to_owned(),
            JoinToken {
                outpost: outpost.to_owned(),
                expires_at: millis(expires_at),
                used_at: None,
            },
        );
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<Result<String, JoinTokenRefusal>> {
        let mut state = self.state();
        let Some(token) = state.join_tokens.get_mut(token_hash) else {
            return Ok(Err(JoinTokenRefusal::Unknown));
        };
        let now = millis(now);
        if token.used_at.is_some() {
            return Ok(Err(JoinTokenRefusal::AlreadyUsed));
        }
        if now >= token.expires_at {
            return Ok(Err(JoinTokenRefusal::Expired));
        }
        token.used_at = Some(now);
        Ok(Ok(token.outpost.clone()))
    }

    async fn list_outpost_links(&self) -> Result<Vec<OutpostLink>> {
        Ok(self.state().links.values().cloned().collect())
    }

    async fn get_outpost_link(&self, outpost: &str) -> Result<OutpostLink> {
        let state = self.state();
        state.outpost_exists(outpost)?;
        Ok(state
            .links
            .get(outpost)
            .cloned()
            .unwrap_or_else(|| OutpostLink {
                outpost: outpost.to_owned(),
                ..OutpostLink::default()
            }))
    }

    async fn get_outpost_and_link(&self, name: &str) -> Result<(Outpost, OutpostLink)> {
        let state = self.state();
        let outpost = state
            .outposts
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("outpost", name.to_owned()))?;
        let link = state
            .links
            .get(name)
            .cloned()
            .unwrap_or_else(|| OutpostLink {
                outpost: name.to_owned(),
                ..OutpostLink::default()
            });
        Ok((outpost, link))
    }

    async fn put_outpost_link(&self, link: &OutpostLink) -> Result<()> {
        let mut state = self.state();
        state.outpost_exists(&link.outpost)?;
        let link = OutpostLink {
            cert_not_after: link.cert_not_after.map(millis),
            last_seen: link.last_seen.map(millis),
            ..link.clone()
        };
        state.links.insert(link.outpost.clone(), link);
        Ok(())
    }

    async fn get_stage_sync(&self, project: &str, stage: &str) -> Result<StageSync> {
        Ok(self.state().stage(project, stage)?.current_sync())
    }

    async fn record_delivered(
        &self,
        project: &str,
        stage: &str,
        revision: u64,
        now: Timestamp,
    ) -> Result<StageSync> {
        let mut state = self.state();
        let stage_state = state.stage_mut(project, stage)?;
        let mut sync = stage_state.current_sync();
        sync.delivered_revision = sync.delivered_revision.max(revision);
        sync.updated_at = Some(millis(now));
        stage_state.sync = Some(sync.clone());
        Ok(sync)
    }

    async fn record_status(
        &self,
        project: &str,
        stage: &str,
        applied_revision: u64,
        failed_revision: Option<u64>,
        report: &serde_json::Value,
        now: Timestamp,
    ) -> Result<StageSync> {
        let mut state = self.state();
        let stage_state = state.stage_mut(project, stage)?;
        let mut sync = stage_state.current_sync();
        if applied_revision < sync.applied_revision {
            // A report older than the one already recorded, arriving late.
            return Ok(sync);
        }
        sync.applied_revision = applied_revision;
        sync.report = Some(report.clone());
        sync.updated_at = Some(millis(now));
        // The release the stage runs is the newest one at or below the
        // applied revision (suspend, resume and component controls carry
        // none).
        let running = stage_state
            .releases
            .values()
            .map(|r| r.revision)
            .filter(|r| *r <= applied_revision && applied_revision > 0)
            .max();
        let applied_failed = failed_revision.is_some();
        for release in stage_state.releases.values_mut() {
            release.state = reported_state(release, running, applied_failed, failed_revision);
        }
        stage_state.sync = Some(sync.clone());
        Ok(sync)
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn changes(&self) -> Option<ChangeFeed> {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        self.feed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .subscribers
            .push(Subscriber { tx, missed: false });
        Some(ChangeFeed(rx))
    }

    async fn beat_instance(&self, instance: &Instance) -> Result<()> {
        let mut state = self.state();
        let record = Instance {
            started_at: millis(instance.started_at),
            beat_at: millis(instance.beat_at),
            ..instance.clone()
        };
        match state.instances.get_mut(&instance.id) {
            Some(existing) => {
                existing.address = record.address;
                existing.version = record.version;
                existing.beat_at = record.beat_at;
            }
            None => {
                state.instances.insert(instance.id.clone(), record);
            }
        }
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<Instance>> {
        Ok(self.state().instances.values().cloned().collect())
    }

    async fn forget_instance(&self, id: &str) -> Result<()> {
        let mut state = self.state();
        let Some(gone) = state.instances.remove(id) else {
            return Ok(());
        };
        for claim in state.claims.values_mut().filter(|c| c.instance == id) {
            claim.released_at.get_or_insert(gone.beat_at);
        }
        Ok(())
    }

    async fn claim_links(
        &self,
        instance: &str,
        outposts: &[String],
        now: Timestamp,
    ) -> Result<Vec<u64>> {
        let mut state = self.state();
        let mut epochs = Vec::with_capacity(outposts.len());
        let mut changes = Vec::new();
        for outpost in outposts {
            if !state.outposts.contains_key(outpost) {
                epochs.push(0);
                continue;
            }
            let epoch = state.claims.get(outpost).map_or(1, |c| c.epoch + 1);
            state.claims.insert(
                outpost.clone(),
                LinkClaim {
                    outpost: outpost.clone(),
                    instance: instance.to_owned(),
                    epoch,
                    since: millis(now),
                    released_at: None,
                },
            );
            epochs.push(epoch);
            changes.push(Change::Claimed {
                outpost: outpost.clone(),
                instance: instance.to_owned(),
                epoch,
            });
        }
        self.announce(changes);
        Ok(epochs)
    }

    async fn release_link(
        &self,
        instance: &str,
        outpost: &str,
        epoch: u64,
        now: Timestamp,
    ) -> Result<()> {
        let mut state = self.state();
        if let Some(claim) = state.claims.get_mut(outpost)
            && claim.instance == instance
            && claim.epoch == epoch
            && claim.released_at.is_none()
        {
            claim.released_at = Some(millis(now));
        }
        Ok(())
    }

    async fn link_claims(&self, instance: Option<&str>) -> Result<Vec<LinkClaim>> {
        Ok(self
            .state()
            .claims
            .values()
            .filter(|c| instance.is_none_or(|i| c.instance == i))
            .cloned()
            .collect())
    }

    async fn link_claim(&self, outpost: &str) -> Result<Option<LinkClaim>> {
        Ok(self.state().claims.get(outpost).cloned())
    }

    async fn lock_job(&self, job: &str) -> Result<Option<JobLock>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if !jobs.insert(job.to_owned()) {
            return Ok(None);
        }
        // The lock lives in this process, so it is only ever given up.
        let (held_tx, held) = watch::channel(true);
        let guard = JobGuard {
            jobs: self.jobs.clone(),
            job: job.to_owned(),
            _held: held_tx,
        };
        Ok(Some(JobLock::new(held, Box::new(guard))))
    }

    async fn cluster_secret(&self, name: &str, offer: &str) -> Result<String> {
        Ok(self
            .state()
            .secrets
            .entry(name.to_owned())
            .or_insert_with(|| offer.to_owned())
            .clone())
    }
}

/// Gives a job's lock back when the [`JobLock`] is dropped.
struct JobGuard {
    jobs: std::sync::Arc<Mutex<std::collections::HashSet<String>>>,
    job: String,
    _held: watch::Sender<bool>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.job);
    }
}
