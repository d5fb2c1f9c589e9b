//! A store that keeps everything in memory, for tests and the deterministic
//! simulation.
//!
//! It enforces exactly the rules of the SQLite backend (the shared
//! [`testsuite`](crate::testsuite) checks both), so a test that passes
//! against it says something about the real hub. Records are nested the way
//! they are owned (stages inside projects, releases inside stages), which
//! makes every cascading deletion a single `remove`.
//!
//! Each operation validates everything before it changes anything, under one
//! lock, so operations are atomic just like the SQLite transactions.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::DateTime;
use trellis_model::{
    AccessKeyInfo, Build, Config, ConfigData, Member, NewBuild, Outpost, Project, Release,
    ReleaseState, Role, Stage, Timestamp, User, build_name,
};

use crate::{
    NewRelease, NewStage, Result, StageUpdate, Store, StoreError, StoredAccessKey, wording,
};

/// The in-memory store. Cheap to create; holds nothing on disk.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    users: BTreeMap<String, User>,
    keys: BTreeMap<String, StoredAccessKey>,
    projects: BTreeMap<String, ProjectState>,
    outposts: BTreeMap<String, Outpost>,
}

struct ProjectState {
    project: Project,
    /// Highest build number ever assigned; outlives deleted builds so that
    /// numbers are never reused.
    last_build: u64,
    members: BTreeMap<String, Role>,
    stages: BTreeMap<String, StageState>,
    builds: BTreeMap<String, Build>,
}

struct StageState {
    stage: Stage,
    configs: BTreeMap<String, Config>,
    releases: BTreeMap<u64, Release>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
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
fn millis(t: Timestamp) -> Timestamp {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

fn not_found(kind: &'static str, name: String) -> StoreError {
    StoreError::NotFound { kind, name }
}

impl State {
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
                stages: BTreeMap::new(),
                builds: BTreeMap::new(),
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
        state.projects.remove(name);
        Ok(())
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
        state.outposts.remove(name);
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

    async fn revoke_outpost(&self, name: &str, now: Timestamp) -> Result<Outpost> {
        let mut state = self.state();
        let outpost = state
            .outposts
            .get_mut(name)
            .ok_or_else(|| not_found("outpost", name.to_owned()))?;
        outpost.revoked_at.get_or_insert(millis(now));
        Ok(outpost.clone())
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
        };
        state.project_mut(&stage.project)?.stages.insert(
            stage.name.clone(),
            StageState {
                stage: created.clone(),
                configs: BTreeMap::new(),
                releases: BTreeMap::new(),
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

    async fn update_stage(&self, project: &str, name: &str, update: &StageUpdate) -> Result<Stage> {
        let mut state = self.state();
        let stage = &mut state.stage_mut(project, name)?.stage;
        if let Some(display_name) = &update.display_name {
            stage.display_name = display_name.clone();
        }
        if let Some(suspended) = update.suspended
            && suspended != stage.suspended
        {
            stage.suspended = suspended;
            stage.desired_revision += 1;
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
        state.project_mut(project)?.stages.remove(name);
        Ok(())
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
        state.stage(&release.project, &release.stage)?;
        if !state
            .project(&release.project)?
            .builds
            .contains_key(&release.build)
        {
            return Err(not_found(
                "build",
                wording::build(&release.project, &release.build),
            ));
        }
        let stage_state = state.stage_mut(&release.project, &release.stage)?;
        let stage = &mut stage_state.stage;
        let number = stage.latest_release.unwrap_or(0) + 1;
        stage.desired_revision += 1;
        stage.latest_release = Some(number);
        let created = Release {
            project: release.project.clone(),
            stage: release.stage.clone(),
            number,
            build: release.build.clone(),
            config: release.config.clone(),
            revision: stage.desired_revision,
            state: ReleaseState::Pending,
            created_at: millis(now),
            created_by: release.created_by.clone(),
        };
        stage_state.releases.insert(number, created.clone());
        Ok(created)
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
}
