//! Config data sealed at rest: the store every hub runs on, around the
//! backend it was given.
//!
//! Config values — env values and files, passwords and tokens among them —
//! are sealed one by one ([`trellis_agent::seal`]) before they reach the
//! backend, in configs and in the config snapshots releases keep, and
//! opened again on the way out; so the database (or a copy or backup of
//! it) holds no config value in the clear, whatever the backend. The key
//! lives in `<data>/config.key`, outside the database: back it up with it,
//! as `link.secret`. Each sealed value is bound to its project, stage,
//! config and key, and carries whether it is secret, so the backends store
//! plain strings and need no column for it. Values written before sealing
//! are read as they are (not secret) until they are written again.
//!
//! Everything else is passed through unchanged, including the backends'
//! batched writes (`record_link_activity`, `record_sync_batch`).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use trellis_agent::seal::SealKey;
use trellis_model::{
    AccessKeyInfo, Build, ComponentAction, ComponentControl, Config, ConfigData, ConfigSnapshot,
    Member, NewBuild, Outpost, OutpostLink, Project, Release, Role, Stage, StageSync, Timestamp,
    User,
};
use trellis_store::{
    AdminGuarded, ControlOutcome, JoinTokenRefusal, LinkActivity, NewRelease, NewStage,
    OutpostStage, OutpostUpdate, ProjectUpdate, PushedReleases, Result, StageFilter, StageKey,
    StageSummary, StageUpdate, Store, StoreError, StoredAccessKey, SyncUpdate,
};

/// The file in the data directory holding the key config data is sealed
/// with.
pub const CONFIG_KEY_FILE: &str = "config.key";

/// How a sealed value starts: then `s:` (secret) or `p:` (plain), then the
/// sealed bytes in hexadecimal.
const PREFIX: &str = "tsv1:";

/// The store the hub uses: `inner` with config data sealed.
pub struct SealedStore {
    inner: Arc<dyn Store>,
    key: SealKey,
}

impl SealedStore {
    pub fn new(inner: Arc<dyn Store>, key: SealKey) -> SealedStore {
        SealedStore { inner, key }
    }

    fn seal_data(&self, project: &str, stage: &str, config: &str, data: &ConfigData) -> ConfigData {
        let seal = |kind: &str, key: &str, value: &str, secret: bool| {
            let aad = aad(project, stage, config, kind, key);
            let sealed = self.key.seal(value.as_bytes(), &aad);
            format!(
                "{PREFIX}{}:{}",
                if secret { "s" } else { "p" },
                hex::encode(sealed)
            )
        };
        ConfigData {
            env: data
                .env
                .iter()
                .map(|(k, v)| (k.clone(), seal("env", k, v, data.secret_env.contains(k))))
                .collect(),
            files: data
                .files
                .iter()
                .map(|(k, v)| (k.clone(), seal("file", k, v, data.secret_files.contains(k))))
                .collect(),
            ..ConfigData::default()
        }
    }

    fn open_data(
        &self,
        project: &str,
        stage: &str,
        config: &str,
        data: &ConfigData,
    ) -> Result<ConfigData> {
        let mut out = ConfigData::default();
        for (k, v) in &data.env {
            let (value, secret) = self.open_value(&aad(project, stage, config, "env", k), v)?;
            if secret {
                out.secret_env.insert(k.clone());
            }
            out.env.insert(k.clone(), value);
        }
        for (k, v) in &data.files {
            let (value, secret) = self.open_value(&aad(project, stage, config, "file", k), v)?;
            if secret {
                out.secret_files.insert(k.clone());
            }
            out.files.insert(k.clone(), value);
        }
        Ok(out)
    }

    /// A stored value, opened, and whether it is secret.
    fn open_value(&self, aad: &[u8], stored: &str) -> Result<(String, bool)> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok((stored.to_owned(), false));
        };
        let unreadable = || StoreError::Backend {
            doing: "opening sealed config data",
            source: format!(
                "a config value does not open with the key in {CONFIG_KEY_FILE}: the file is \
                 not the one it was sealed with, or the database was changed; restore \
                 {CONFIG_KEY_FILE} from the backup of the data directory"
            )
            .into(),
        };
        let (secret, hex_text) = match rest.split_once(':') {
            Some(("s", h)) => (true, h),
            Some(("p", h)) => (false, h),
            _ => return Err(unreadable()),
        };
        let sealed = hex::decode(hex_text).map_err(|_| unreadable())?;
        let plain = self.key.open(&sealed, aad).map_err(|_| unreadable())?;
        let value = String::from_utf8(plain).map_err(|_| unreadable())?;
        Ok((value, secret))
    }

    fn open_config(&self, mut config: Config) -> Result<Config> {
        config.data = self.open_data(&config.project, &config.stage, &config.name, &config.data)?;
        Ok(config)
    }

    fn seal_release(&self, release: &NewRelease) -> NewRelease {
        let mut release = release.clone();
        if let Some(snapshot) = &mut release.config {
            snapshot.data = self.seal_data(
                &release.project,
                &release.stage,
                &snapshot.name,
                &snapshot.data,
            );
        }
        release
    }

    /// The stages of a desired-state read with their releases' config
    /// values opened.
    fn open_stages(&self, mut stages: Vec<OutpostStage>) -> Result<Vec<OutpostStage>> {
        for stage in &mut stages {
            if let Some(parts) = &mut stage.desired
                && let Some(release) = parts.release.take()
            {
                parts.release = Some(self.open_release(release)?);
            }
        }
        Ok(stages)
    }

    fn open_pushed(&self, mut pushed: PushedReleases) -> Result<PushedReleases> {
        pushed.releases = pushed
            .releases
            .into_iter()
            .map(|r| self.open_release(r))
            .collect::<Result<_>>()?;
        Ok(pushed)
    }

    fn open_release(&self, mut release: Release) -> Result<Release> {
        if let Some(snapshot) = release.config.take() {
            release.config = Some(ConfigSnapshot {
                data: self.open_data(
                    &release.project,
                    &release.stage,
                    &snapshot.name,
                    &snapshot.data,
                )?,
                ..snapshot
            });
        }
        Ok(release)
    }
}

/// What a sealed value is bound to.
fn aad(project: &str, stage: &str, config: &str, kind: &str, key: &str) -> Vec<u8> {
    format!("config:{project}/{stage}/{config}/{kind}/{key}").into_bytes()
}

#[async_trait]
impl Store for SealedStore {
    // --- configs and releases: sealed on the way in, opened on the way out ---

    async fn add_config_data(
        &self,
        project: &str,
        stage: &str,
        name: &str,
        data: &ConfigData,
        now: Timestamp,
    ) -> Result<Config> {
        let sealed = self.seal_data(project, stage, name, data);
        let config = self
            .inner
            .add_config_data(project, stage, name, &sealed, now)
            .await?;
        self.open_config(config)
    }

    async fn remove_config_keys(
        &self,
        project: &str,
        stage: &str,
        name: &str,
        keys: &[String],
        now: Timestamp,
    ) -> Result<Config> {
        let config = self
            .inner
            .remove_config_keys(project, stage, name, keys, now)
            .await?;
        self.open_config(config)
    }

    async fn get_config(&self, project: &str, stage: &str, name: &str) -> Result<Config> {
        self.open_config(self.inner.get_config(project, stage, name).await?)
    }

    async fn list_configs(&self, project: &str, stage: Option<&str>) -> Result<Vec<Config>> {
        self.inner
            .list_configs(project, stage)
            .await?
            .into_iter()
            .map(|c| self.open_config(c))
            .collect()
    }

    async fn push_release(&self, release: &NewRelease, now: Timestamp) -> Result<Release> {
        let release = self
            .inner
            .push_release(&self.seal_release(release), now)
            .await?;
        self.open_release(release)
    }

    async fn push_releases(
        &self,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<PushedReleases> {
        let sealed: Vec<NewRelease> = releases.iter().map(|r| self.seal_release(r)).collect();
        let pushed = self.inner.push_releases(&sealed, now).await?;
        self.open_pushed(pushed)
    }

    async fn get_release(&self, project: &str, stage: &str, number: u64) -> Result<Release> {
        self.open_release(self.inner.get_release(project, stage, number).await?)
    }

    async fn list_releases(&self, project: &str, stage: &str) -> Result<Vec<Release>> {
        self.inner
            .list_releases(project, stage)
            .await?
            .into_iter()
            .map(|r| self.open_release(r))
            .collect()
    }

    async fn outpost_desired(
        &self,
        outpost: &str,
        held: &HashMap<StageKey, u64>,
    ) -> Result<Vec<OutpostStage>> {
        self.open_stages(self.inner.outpost_desired(outpost, held).await?)
    }

    async fn outposts_desired(
        &self,
        asks: &[trellis_store::DesiredAsk],
    ) -> Result<Vec<Result<Vec<OutpostStage>>>> {
        // The backend's own batched read: one read for every outpost asked.
        Ok(self
            .inner
            .outposts_desired(asks)
            .await?
            .into_iter()
            .map(|answer| answer.and_then(|stages| self.open_stages(stages)))
            .collect())
    }

    // --- everything else, as the backend does it ---

    async fn create_user(&self, user: &User) -> Result<()> {
        self.inner.create_user(user).await
    }
    async fn get_user(&self, name: &str) -> Result<User> {
        self.inner.get_user(name).await
    }
    async fn list_users(&self) -> Result<Vec<User>> {
        self.inner.list_users().await
    }
    async fn create_access_key(&self, key: &StoredAccessKey) -> Result<()> {
        self.inner.create_access_key(key).await
    }
    async fn find_access_key(&self, id: &str) -> Result<Option<StoredAccessKey>> {
        self.inner.find_access_key(id).await
    }
    async fn list_access_keys(&self, user: Option<&str>) -> Result<Vec<AccessKeyInfo>> {
        self.inner.list_access_keys(user).await
    }
    async fn delete_access_key(&self, id: &str) -> Result<()> {
        self.inner.delete_access_key(id).await
    }
    async fn delete_access_key_keeping_admin(&self, id: &str) -> Result<AdminGuarded<()>> {
        self.inner.delete_access_key_keeping_admin(id).await
    }
    async fn set_user_admin(&self, name: &str, admin: bool) -> Result<AdminGuarded<User>> {
        self.inner.set_user_admin(name, admin).await
    }
    async fn create_project(&self, project: &Project, owner: &str) -> Result<()> {
        self.inner.create_project(project, owner).await
    }
    async fn get_project(&self, name: &str) -> Result<Project> {
        self.inner.get_project(name).await
    }
    async fn list_projects(&self) -> Result<Vec<Project>> {
        self.inner.list_projects().await
    }
    async fn delete_project(&self, name: &str, force: bool) -> Result<()> {
        self.inner.delete_project(name, force).await
    }
    async fn update_project(&self, name: &str, update: &ProjectUpdate) -> Result<Project> {
        self.inner.update_project(name, update).await
    }
    async fn archive_project(&self, name: &str, now: Timestamp) -> Result<Vec<Stage>> {
        self.inner.archive_project(name, now).await
    }
    async fn restore_project(&self, name: &str) -> Result<Vec<Stage>> {
        self.inner.restore_project(name).await
    }
    async fn archive_stage(&self, project: &str, name: &str, now: Timestamp) -> Result<Stage> {
        self.inner.archive_stage(project, name, now).await
    }
    async fn restore_stage(&self, project: &str, name: &str) -> Result<Stage> {
        self.inner.restore_stage(project, name).await
    }
    async fn set_member(&self, project: &str, user: &str, role: Role) -> Result<()> {
        self.inner.set_member(project, user, role).await
    }
    async fn remove_member(&self, project: &str, user: &str) -> Result<()> {
        self.inner.remove_member(project, user).await
    }
    async fn list_members(&self, project: &str) -> Result<Vec<Member>> {
        self.inner.list_members(project).await
    }
    async fn role_of(&self, project: &str, user: &str) -> Result<Option<Role>> {
        self.inner.role_of(project, user).await
    }
    async fn record_audit(
        &self,
        entry: &trellis_model::NewAuditEntry,
    ) -> Result<trellis_model::AuditEntry> {
        self.inner.record_audit(entry).await
    }
    async fn create_backup(
        &self,
        backup: &trellis_model::NewBackup,
    ) -> Result<trellis_model::Backup> {
        self.inner.create_backup(backup).await
    }

    async fn get_backup(
        &self,
        project: &str,
        stage: &str,
        id: u64,
    ) -> Result<trellis_model::Backup> {
        self.inner.get_backup(project, stage, id).await
    }

    async fn list_backups(&self, project: &str, stage: &str) -> Result<Vec<trellis_model::Backup>> {
        self.inner.list_backups(project, stage).await
    }

    async fn save_backup(&self, backup: &trellis_model::Backup) -> Result<()> {
        self.inner.save_backup(backup).await
    }

    async fn create_agent_updates(
        &self,
        updates: &[trellis_model::agent_update::NewAgentUpdate],
        at: trellis_model::Timestamp,
    ) -> Result<Vec<trellis_model::agent_update::AgentUpdate>> {
        self.inner.create_agent_updates(updates, at).await
    }
    async fn open_agent_update(
        &self,
        outpost: &str,
    ) -> Result<Option<trellis_model::agent_update::AgentUpdate>> {
        self.inner.open_agent_update(outpost).await
    }
    async fn report_agent_update(
        &self,
        outpost: &str,
        id: u64,
        state: trellis_model::agent_update::AgentUpdateState,
        message: &str,
        at: trellis_model::Timestamp,
    ) -> Result<trellis_model::agent_update::AgentUpdate> {
        self.inner
            .report_agent_update(outpost, id, state, message, at)
            .await
    }
    async fn latest_agent_updates(&self) -> Result<Vec<trellis_model::agent_update::AgentUpdate>> {
        self.inner.latest_agent_updates().await
    }
    async fn waiting_agent_update_batches(&self) -> Result<Vec<u64>> {
        self.inner.waiting_agent_update_batches().await
    }
    async fn agent_update_batch(
        &self,
        batch: u64,
    ) -> Result<Vec<trellis_model::agent_update::AgentUpdate>> {
        self.inner.agent_update_batch(batch).await
    }
    async fn release_agent_update_wave(
        &self,
        batch: u64,
        wave: u32,
        offline: &[String],
        at: trellis_model::Timestamp,
    ) -> Result<Vec<trellis_model::agent_update::AgentUpdate>> {
        self.inner
            .release_agent_update_wave(batch, wave, offline, at)
            .await
    }
    async fn halt_agent_update_batch(
        &self,
        batch: u64,
        why: &str,
        at: trellis_model::Timestamp,
    ) -> Result<Vec<trellis_model::agent_update::AgentUpdate>> {
        self.inner.halt_agent_update_batch(batch, why, at).await
    }

    async fn create_rollout(
        &self,
        rollout: &trellis_model::rollout::NewRollout,
    ) -> Result<trellis_model::rollout::Rollout> {
        self.inner.create_rollout(rollout).await
    }

    async fn get_rollout(&self, id: u64) -> Result<trellis_model::rollout::Rollout> {
        self.inner.get_rollout(id).await
    }

    async fn list_rollouts(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<trellis_model::rollout::Rollout>> {
        self.inner.list_rollouts(project).await
    }

    async fn save_rollout(
        &self,
        rollout: &trellis_model::rollout::Rollout,
    ) -> Result<trellis_model::rollout::Rollout> {
        self.inner.save_rollout(rollout).await
    }

    async fn push_rollout_releases(
        &self,
        rollout: &trellis_model::rollout::Rollout,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<(trellis_model::rollout::Rollout, PushedReleases)> {
        let sealed: Vec<NewRelease> = releases.iter().map(|r| self.seal_release(r)).collect();
        let (rollout, pushed) = self
            .inner
            .push_rollout_releases(rollout, &sealed, now)
            .await?;
        Ok((rollout, self.open_pushed(pushed)?))
    }

    async fn put_agent_binary(
        &self,
        binary: &trellis_model::AgentBinary,
    ) -> Result<trellis_model::AgentBinary> {
        self.inner.put_agent_binary(binary).await
    }

    async fn get_agent_binary(
        &self,
        version: &str,
        arch: &str,
    ) -> Result<trellis_model::AgentBinary> {
        self.inner.get_agent_binary(version, arch).await
    }

    async fn list_agent_binaries(&self) -> Result<Vec<trellis_model::AgentBinary>> {
        self.inner.list_agent_binaries().await
    }

    async fn delete_agent_binary(&self, version: &str, arch: &str) -> Result<()> {
        self.inner.delete_agent_binary(version, arch).await
    }

    async fn delete_backup(&self, project: &str, stage: &str, id: u64) -> Result<()> {
        self.inner.delete_backup(project, stage, id).await
    }

    async fn outpost_backup_work(&self, outpost: &str) -> Result<Vec<trellis_model::Backup>> {
        self.inner.outpost_backup_work(outpost).await
    }

    async fn backup_manifests(&self) -> Result<Vec<String>> {
        self.inner.backup_manifests().await
    }

    async fn set_backup_schedule(
        &self,
        project: &str,
        stage: &str,
        schedule: Option<&trellis_model::BackupSchedule>,
    ) -> Result<()> {
        self.inner
            .set_backup_schedule(project, stage, schedule)
            .await
    }

    async fn get_backup_schedule(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Option<trellis_model::BackupSchedule>> {
        self.inner.get_backup_schedule(project, stage).await
    }

    async fn list_backup_schedules(&self) -> Result<Vec<trellis_model::BackupSchedule>> {
        self.inner.list_backup_schedules().await
    }

    async fn list_audit(
        &self,
        project: &str,
        limit: usize,
    ) -> Result<Vec<trellis_model::AuditEntry>> {
        self.inner.list_audit(project, limit).await
    }
    async fn create_outpost(&self, outpost: &Outpost) -> Result<()> {
        self.inner.create_outpost(outpost).await
    }
    async fn get_outpost(&self, name: &str) -> Result<Outpost> {
        self.inner.get_outpost(name).await
    }
    async fn list_outposts(&self) -> Result<Vec<Outpost>> {
        self.inner.list_outposts().await
    }
    async fn delete_outpost(&self, name: &str, force: bool) -> Result<()> {
        self.inner.delete_outpost(name, force).await
    }
    async fn stages_on_outpost(&self, outpost: &str) -> Result<Vec<Stage>> {
        self.inner.stages_on_outpost(outpost).await
    }
    async fn rotate_outpost_uri(&self, name: &str) -> Result<Outpost> {
        self.inner.rotate_outpost_uri(name).await
    }
    async fn update_outpost(&self, name: &str, update: &OutpostUpdate) -> Result<Outpost> {
        self.inner.update_outpost(name, update).await
    }
    async fn get_link_profile(
        &self,
        outpost: &str,
    ) -> Result<trellis_model::link_profile::LinkProfile> {
        self.inner.get_link_profile(outpost).await
    }
    async fn set_link_profile(
        &self,
        outpost: &str,
        profile: &trellis_model::link_profile::LinkProfile,
    ) -> Result<trellis_model::link_profile::LinkProfile> {
        self.inner.set_link_profile(outpost, profile).await
    }
    async fn list_link_profiles(
        &self,
    ) -> Result<Vec<(String, trellis_model::link_profile::LinkProfile)>> {
        self.inner.list_link_profiles().await
    }
    async fn revoke_outpost(&self, name: &str, now: Timestamp) -> Result<Outpost> {
        self.inner.revoke_outpost(name, now).await
    }
    async fn create_stage(&self, stage: &NewStage, now: Timestamp) -> Result<Stage> {
        self.inner.create_stage(stage, now).await
    }
    async fn get_stage(&self, project: &str, name: &str) -> Result<Stage> {
        self.inner.get_stage(project, name).await
    }
    async fn list_stages(&self, project: &str) -> Result<Vec<Stage>> {
        self.inner.list_stages(project).await
    }
    async fn list_archived_stages(&self, project: &str) -> Result<Vec<Stage>> {
        self.inner.list_archived_stages(project).await
    }
    async fn list_stage_summaries(
        &self,
        project: &str,
        which: StageFilter,
    ) -> Result<Vec<StageSummary>> {
        self.inner.list_stage_summaries(project, which).await
    }
    async fn stage_summaries_named(
        &self,
        project: &str,
        names: &[String],
    ) -> Result<Vec<StageSummary>> {
        self.inner.stage_summaries_named(project, names).await
    }
    async fn update_stage(&self, project: &str, name: &str, update: &StageUpdate) -> Result<Stage> {
        self.inner.update_stage(project, name, update).await
    }
    async fn delete_stage(&self, project: &str, name: &str, force: bool) -> Result<()> {
        self.inner.delete_stage(project, name, force).await
    }
    async fn list_component_controls(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Vec<ComponentControl>> {
        self.inner.list_component_controls(project, stage).await
    }
    async fn control_component(
        &self,
        project: &str,
        stage: &str,
        component: &str,
        action: ComponentAction,
    ) -> Result<ControlOutcome> {
        self.inner
            .control_component(project, stage, component, action)
            .await
    }
    async fn create_build(
        &self,
        project: &str,
        build: &NewBuild,
        created_by: &str,
        now: Timestamp,
    ) -> Result<Build> {
        self.inner
            .create_build(project, build, created_by, now)
            .await
    }
    async fn get_build(&self, project: &str, name: &str) -> Result<Build> {
        self.inner.get_build(project, name).await
    }
    async fn list_builds(&self, project: &str) -> Result<Vec<Build>> {
        self.inner.list_builds(project).await
    }
    async fn delete_build(&self, project: &str, name: &str) -> Result<()> {
        self.inner.delete_build(project, name).await
    }
    async fn delete_config(&self, project: &str, stage: &str, name: &str) -> Result<()> {
        self.inner.delete_config(project, stage, name).await
    }
    async fn create_join_token(
        &self,
        token_hash: &str,
        outpost: &str,
        expires_at: Timestamp,
    ) -> Result<()> {
        self.inner
            .create_join_token(token_hash, outpost, expires_at)
            .await
    }
    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<std::result::Result<String, JoinTokenRefusal>> {
        self.inner.consume_join_token(token_hash, now).await
    }
    async fn get_outpost_link(&self, outpost: &str) -> Result<OutpostLink> {
        self.inner.get_outpost_link(outpost).await
    }
    async fn list_outpost_links(&self) -> Result<Vec<OutpostLink>> {
        self.inner.list_outpost_links().await
    }
    async fn get_outpost_and_link(&self, name: &str) -> Result<(Outpost, OutpostLink)> {
        self.inner.get_outpost_and_link(name).await
    }
    async fn put_outpost_link(&self, link: &OutpostLink) -> Result<()> {
        self.inner.put_outpost_link(link).await
    }
    async fn record_link_activity(&self, activity: &[LinkActivity]) -> Result<()> {
        self.inner.record_link_activity(activity).await
    }
    async fn record_sync_batch(
        &self,
        updates: &[SyncUpdate],
        now: Timestamp,
    ) -> Result<Vec<Result<StageSync>>> {
        self.inner.record_sync_batch(updates, now).await
    }
    async fn get_stage_sync(&self, project: &str, stage: &str) -> Result<StageSync> {
        self.inner.get_stage_sync(project, stage).await
    }
    async fn record_delivered(
        &self,
        project: &str,
        stage: &str,
        revision: u64,
        now: Timestamp,
    ) -> Result<StageSync> {
        self.inner
            .record_delivered(project, stage, revision, now)
            .await
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
        self.inner
            .record_status(
                project,
                stage,
                applied_revision,
                failed_revision,
                report,
                now,
            )
            .await
    }

    // --- several hubs on one store: nothing sealed, all the inner store's ---

    fn changes(&self) -> Option<trellis_store::ChangeFeed> {
        self.inner.changes()
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    fn pool_stats(&self) -> Option<trellis_store::PoolStats> {
        self.inner.pool_stats()
    }

    async fn beat_instance(&self, instance: &trellis_store::Instance) -> Result<()> {
        self.inner.beat_instance(instance).await
    }

    async fn instances(&self) -> Result<Vec<trellis_store::Instance>> {
        self.inner.instances().await
    }

    async fn forget_instance(&self, id: &str) -> Result<()> {
        self.inner.forget_instance(id).await
    }

    async fn claim_links(
        &self,
        instance: &str,
        outposts: &[String],
        now: Timestamp,
    ) -> Result<Vec<u64>> {
        self.inner.claim_links(instance, outposts, now).await
    }

    async fn release_link(
        &self,
        instance: &str,
        outpost: &str,
        epoch: u64,
        now: Timestamp,
    ) -> Result<()> {
        self.inner.release_link(instance, outpost, epoch, now).await
    }

    async fn link_claims(&self, instance: Option<&str>) -> Result<Vec<trellis_store::LinkClaim>> {
        self.inner.link_claims(instance).await
    }

    async fn link_claim(&self, outpost: &str) -> Result<Option<trellis_store::LinkClaim>> {
        self.inner.link_claim(outpost).await
    }

    async fn lock_job(&self, job: &str) -> Result<Option<trellis_store::JobLock>> {
        self.inner.lock_job(job).await
    }

    async fn cluster_secret(&self, name: &str, offer: &str) -> Result<String> {
        self.inner.cluster_secret(name, offer).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_store::memory::MemoryStore;

    /// A store several hubs share stays one through the seal: its change
    /// feed, its job locks and its shared secrets are the inner store's.
    #[tokio::test]
    async fn the_cluster_side_of_the_store_passes_through() {
        let backend = Arc::new(MemoryStore::new());
        let store = SealedStore::new(backend.clone(), SealKey::from_bytes(&[9; 32]));
        assert!(store.is_shared() && store.changes().is_some());
        assert_eq!(store.cluster_secret("x", "first").await.unwrap(), "first");
        assert_eq!(
            backend.cluster_secret("x", "second").await.unwrap(),
            "first"
        );
        assert!(store.lock_job("job").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn values_are_sealed_in_the_backend_and_open_with_their_marks() {
        let backend = Arc::new(MemoryStore::new());
        trellis_store::testsuite::seed_stages(backend.as_ref(), "shop", 1).await;
        let store = SealedStore::new(backend.clone(), SealKey::from_bytes(&[9; 32]));
        let mut data = ConfigData::default();
        data.env.insert("user".into(), "shopkeeper".into());
        data.env.insert("password".into(), "hunter2".into());
        data.files.insert("token.txt".into(), "t0k3n".into());
        data.secret_env.insert("password".into());
        data.secret_files.insert("token.txt".into());
        let now = chrono::Utc::now();
        let config = store
            .add_config_data("shop", "s0", "app", &data, now)
            .await
            .unwrap();
        assert_eq!(config.data, data);
        // The backend holds no value in the clear, and no mark.
        let raw = backend.get_config("shop", "s0", "app").await.unwrap();
        let text = serde_json::to_string(&raw).unwrap();
        for plain in ["shopkeeper", "hunter2", "t0k3n"] {
            assert!(!text.contains(plain), "{plain} in {text}");
        }
        assert!(raw.data.secret_env.is_empty() && raw.data.secret_files.is_empty());
        assert_eq!(
            store.get_config("shop", "s0", "app").await.unwrap().data,
            data
        );
        // A value moved to another key does not open.
        let mut moved = raw.data.clone();
        let password = moved.env["password"].clone();
        moved.env.insert("user".into(), password);
        backend
            .add_config_data("shop", "s0", "app", &moved, now)
            .await
            .unwrap();
        assert!(matches!(
            store.get_config("shop", "s0", "app").await,
            Err(StoreError::Backend { .. })
        ));
        // Values written before sealing read as they are.
        let mut legacy = ConfigData::default();
        legacy.env.insert("old".into(), "plain".into());
        backend
            .add_config_data("shop", "s0", "legacy", &legacy, now)
            .await
            .unwrap();
        assert_eq!(
            store.get_config("shop", "s0", "legacy").await.unwrap().data,
            legacy
        );
    }
}
