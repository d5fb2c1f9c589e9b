//! Backups of a stage's storage: `…/stages/{s}/backups` (create, list,
//! get, delete) and `…/backups/{id}/restore`. Members of the project may
//! do each; every create, restore and delete is recorded in the project's
//! audit log. The work itself is the outpost's (see [`crate::backups`]):
//! these handlers record what is asked and poke the outpost's link.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use trellis_model::{Backup, BackupState, NewAuditEntry, NewBackup, RestoreStatus, Stage};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path};
use crate::state::AppState;

/// The longest display name a backup may carry.
const MAX_DISPLAY_NAME: usize = 200;

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateBackupRequest {
    /// A name to tell it by (default: none; its id tells it apart): at
    /// most 200 characters, none of them a control character.
    #[serde(default)]
    #[schema(max_length = 200, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
    pub display_name: Option<String>,
}

/// What waits for an outpost that is not linked now.
fn waiting(stage: &Stage) -> String {
    format!(
        "waits for outpost {:?}: it is not linked to the hub now; the work starts when it links",
        stage.outpost
    )
}

async fn linked(state: &AppState, stage: &Stage) -> ApiResult<bool> {
    Ok(crate::link::status::link_view(state, &stage.outpost)
        .await?
        .state
        .is_connected())
}

async fn audit(
    state: &AppState,
    caller: &Caller,
    stage: &Stage,
    action: &str,
    backup: &Backup,
    result: &str,
) -> ApiResult<()> {
    let entry = NewAuditEntry {
        time: Utc::now(),
        user: caller.user.clone(),
        project: stage.project.clone(),
        stage: stage.name.clone(),
        component: String::new(),
        outpost: stage.outpost.clone(),
        action: action.to_owned(),
        detail: if backup.display_name.is_empty() {
            format!("backup {}", backup.id)
        } else {
            format!("backup {} ({})", backup.id, backup.display_name)
        },
        result: result.to_owned(),
    };
    if let Err(e) = state.store().record_audit(&entry).await {
        tracing::error!(error = %e, "could not record a backup in the audit log");
        return Err(e.into());
    }
    Ok(())
}

fn busy(stage: &Stage, other: &Backup, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "backup-in-progress",
        format!(
            "stage {}/{} has {what} in progress (backup {}), so it cannot take another now",
            stage.project, stage.name, other.id
        ),
        format!(
            "wait until it ends: `trellis list backup -p {} -s {}` shows its state",
            stage.project, stage.name
        ),
    )
}

/// Backs up the stage's storage: the content of every volume of its
/// components (process components' storage directories), as its outpost
/// reads it. Recorded `pending` at once; the outpost does the work (at
/// once when it is linked, else when it links again) and the backup is
/// `completed` only when every chunk is on the hub.
#[utoipa::path(post, path = "/projects/{project}/stages/{stage}/backups", tag = "backups",
    params(crate::api::params::StagePath), request_body = CreateBackupRequest,
    responses((status = 201, body = Backup)))]
pub async fn create_backup(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
    Json(req): Json<CreateBackupRequest>,
) -> ApiResult<(StatusCode, Json<Backup>)> {
    caller.role_in(&state, &project).await?;
    let record = super::stages::live_stage(&state, &project, &stage).await?;
    let display_name = req.display_name.unwrap_or_default();
    if display_name.chars().count() > MAX_DISPLAY_NAME || display_name.chars().any(char::is_control)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-display-name",
            format!(
                "a backup's display name is at most {MAX_DISPLAY_NAME} characters, without control characters"
            ),
            "give a shorter name, on one line",
        ));
    }
    let existing = state.store().list_backups(&project, &stage).await?;
    if let Some(other) = existing.iter().find(|b| b.state.is_open()) {
        return Err(busy(&record, other, "a backup"));
    }
    if let Some(other) = existing
        .iter()
        .find(|b| b.restore.as_ref().is_some_and(|r| r.state.is_open()))
    {
        return Err(busy(&record, other, "a restore"));
    }
    let message = if linked(&state, &record).await? {
        String::new()
    } else {
        waiting(&record)
    };
    let backup = state
        .store()
        .create_backup(&NewBackup {
            project: project.clone(),
            stage: stage.clone(),
            display_name,
            message,
            created_at: Utc::now(),
            created_by: caller.user.clone(),
        })
        .await?;
    audit(&state, &caller, &record, "backup", &backup, "created").await?;
    state.links().poke(&record.outpost);
    Ok((StatusCode::CREATED, Json(backup)))
}

/// The stage's backups, newest first.
#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/backups", tag = "backups",
    params(crate::api::params::StagePath),
    responses((status = 200, body = Vec<Backup>)))]
pub async fn list_backups(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Backup>>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().list_backups(&project, &stage).await?))
}

#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/backups/{id}", tag = "backups",
    params(crate::api::params::BackupPath),
    responses((status = 200, body = Backup)))]
pub async fn get_backup(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, id)): Path<(String, String, u64)>,
) -> ApiResult<Json<Backup>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().get_backup(&project, &stage, id).await?))
}

/// Deletes a backup's record; its chunks no other backup or build uses
/// are freed by the next garbage collection. Refused while it is being
/// restored.
#[utoipa::path(delete, path = "/projects/{project}/stages/{stage}/backups/{id}", tag = "backups",
    params(crate::api::params::BackupPath),
    responses((status = 204, description = "Deleted")))]
pub async fn delete_backup(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, id)): Path<(String, String, u64)>,
) -> ApiResult<StatusCode> {
    caller.role_in(&state, &project).await?;
    let record = state.store().get_stage(&project, &stage).await?;
    let backup = state.store().get_backup(&project, &stage, id).await?;
    if backup.restore.as_ref().is_some_and(|r| r.state.is_open()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "restore-in-progress",
            format!("backup {id} of stage {project}/{stage} is being restored"),
            "wait until the restore ends, then delete it",
        ));
    }
    state.store().delete_backup(&project, &stage, id).await?;
    audit(
        &state,
        &caller,
        &record,
        "backup-delete",
        &backup,
        "deleted",
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Restores a completed backup into the stage's volumes. The stage must
/// be suspended (`trellis suspend stage`), so nothing writes the volumes
/// while they are replaced. The outpost fetches and verifies every chunk
/// before it replaces anything; a restore that fails leaves the volumes
/// as they were. Returns at once with the restore `pending`; its outcome
/// shows in the backup's `restore`.
#[utoipa::path(post, path = "/projects/{project}/stages/{stage}/backups/{id}/restore", tag = "backups",
    params(crate::api::params::BackupPath),
    responses((status = 202, body = Backup)))]
pub async fn restore_backup(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, id)): Path<(String, String, u64)>,
) -> ApiResult<(StatusCode, Json<Backup>)> {
    caller.role_in(&state, &project).await?;
    let record = super::stages::live_stage(&state, &project, &stage).await?;
    let mut backup = state.store().get_backup(&project, &stage, id).await?;
    if backup.state != BackupState::Completed {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "backup-not-completed",
            format!(
                "backup {id} of stage {project}/{stage} is {}, so it has nothing to restore",
                backup.state
            ),
            format!(
                "restore a completed backup: `trellis list backup -p {project} -s {stage}` shows them"
            ),
        ));
    }
    if !record.suspended {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stage-not-suspended",
            format!(
                "stage {project}/{stage} is running; a restore replaces its volumes, so the stage must be suspended first"
            ),
            format!(
                "suspend it with `trellis suspend stage {stage} -p {project}`, restore, then `trellis resume stage {stage} -p {project}`"
            ),
        ));
    }
    let existing = state.store().list_backups(&project, &stage).await?;
    if let Some(other) = existing
        .iter()
        .find(|b| b.state.is_open() || b.restore.as_ref().is_some_and(|r| r.state.is_open()))
    {
        let what = if other.state.is_open() {
            "a backup"
        } else {
            "a restore"
        };
        return Err(busy(&record, other, what));
    }
    let message = if linked(&state, &record).await? {
        String::new()
    } else {
        waiting(&record)
    };
    backup.restore = Some(RestoreStatus {
        state: BackupState::Pending,
        message,
        requested_at: Utc::now(),
        requested_by: caller.user.clone(),
        finished_at: None,
    });
    state.store().save_backup(&backup).await?;
    audit(&state, &caller, &record, "restore", &backup, "requested").await?;
    state.links().poke(&record.outpost);
    let backup = state.store().get_backup(&project, &stage, id).await?;
    Ok((StatusCode::ACCEPTED, Json(backup)))
}

// === schedule ===

/// The most scheduled backups a stage may keep.
pub const MAX_KEEP: u32 = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"schedule": "0 3 * * *", "keep": 7}))]
pub struct SetBackupScheduleRequest {
    /// Cron, in UTC: five fields (minute hour day month weekday), or six
    /// with seconds first.
    pub schedule: String,
    /// How many completed scheduled backups to keep (1 to 1000); older
    /// ones are deleted as new ones are made.
    #[schema(minimum = 1, maximum = 1000)]
    pub keep: u32,
}

fn no_schedule(project: &str, stage: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no-backup-schedule",
        format!("stage {project}/{stage} has no backup schedule"),
        format!(
            "set one with `trellis update stage {stage} -p {project} --backup-schedule \"0 3 * * *\" --backup-keep 7`"
        ),
    )
}

/// Backs the stage up on a schedule (cron, UTC) and keeps the newest
/// `keep` completed scheduled backups; backups made by hand are kept until
/// deleted. Replaces the stage's schedule, if it had one.
#[utoipa::path(put, path = "/projects/{project}/stages/{stage}/backup-schedule", tag = "backups",
    params(crate::api::params::StagePath), request_body = SetBackupScheduleRequest,
    responses((status = 200, body = trellis_model::BackupSchedule)))]
pub async fn set_backup_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
    Json(req): Json<SetBackupScheduleRequest>,
) -> ApiResult<Json<trellis_model::BackupSchedule>> {
    caller.role_in(&state, &project).await?;
    super::stages::live_stage(&state, &project, &stage).await?;
    let now = Utc::now();
    crate::backup_schedule::next_time(&req.schedule, now).map_err(|message| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-schedule",
            message,
            "e.g. \"0 3 * * *\" for 03:00 UTC every day",
        )
    })?;
    if !(1..=MAX_KEEP).contains(&req.keep) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-keep",
            format!("keep {} is not between 1 and {MAX_KEEP}", req.keep),
            "keep at least the newest scheduled backup",
        ));
    }
    let schedule = trellis_model::BackupSchedule {
        project: project.clone(),
        stage: stage.clone(),
        schedule: req.schedule,
        keep: req.keep,
        last_run: now,
    };
    state
        .store()
        .set_backup_schedule(&project, &stage, Some(&schedule))
        .await?;
    state
        .store()
        .get_backup_schedule(&project, &stage)
        .await?
        .map(Json)
        .ok_or_else(|| no_schedule(&project, &stage))
}

#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/backup-schedule", tag = "backups",
    params(crate::api::params::StagePath),
    responses((status = 200, body = trellis_model::BackupSchedule)))]
pub async fn get_backup_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<trellis_model::BackupSchedule>> {
    caller.role_in(&state, &project).await?;
    state
        .store()
        .get_backup_schedule(&project, &stage)
        .await?
        .map(Json)
        .ok_or_else(|| no_schedule(&project, &stage))
}

/// Stops backing the stage up on a schedule; its backups are kept.
#[utoipa::path(delete, path = "/projects/{project}/stages/{stage}/backup-schedule", tag = "backups",
    params(crate::api::params::StagePath),
    responses((status = 204, description = "Removed")))]
pub async fn delete_backup_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.role_in(&state, &project).await?;
    if state
        .store()
        .get_backup_schedule(&project, &stage)
        .await?
        .is_none()
    {
        return Err(no_schedule(&project, &stage));
    }
    state
        .store()
        .set_backup_schedule(&project, &stage, None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
