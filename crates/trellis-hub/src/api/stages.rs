//! Stages, their configs, and their releases.

use crate::extract::{Json, Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use trellis_model::{
    Config, ConfigSnapshot, LOCAL_OUTPOST, NameKind, Release, Stage, validate_name,
};
use trellis_store::{NewRelease, NewStage, StageUpdate};

use super::types::{
    AddConfigDataRequest, CreateStageRequest, DeleteQuery, PushReleaseRequest, PushReleasesRequest,
    UpdateStageRequest,
};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

#[utoipa::path(get, path = "/projects/{project}/stages", tag = "stages",
    params(crate::api::params::ProjectPath), responses((status = 200, body = Vec<Stage>)))]
pub async fn list_stages(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<Stage>>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().list_stages(&project).await?))
}

/// Creates a stage: on the outpost an Outpost URI names, or on the hub's
/// local outpost. The stage is usable at once, whether or not the outpost's
/// agent is connected.
#[utoipa::path(post, path = "/projects/{project}/stages", tag = "stages",
    params(crate::api::params::ProjectPath), request_body = CreateStageRequest,
    responses((status = 201, body = Stage)))]
pub async fn create_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Json(req): Json<CreateStageRequest>,
) -> ApiResult<(StatusCode, Json<Stage>)> {
    caller.role_in(&state, &project).await?;
    validate_name(NameKind::Stage, &req.name)?;
    // Re-validated here (the console and CLI validated before): the URI
    // may have been rotated or the outpost filled up in between.
    let outpost = match &req.outpost_uri {
        Some(uri) => {
            crate::outposts::validate(&state, &caller, uri, Some(&project))
                .await?
                .0
                .name
        }
        None => LOCAL_OUTPOST.to_owned(),
    };
    let display_name = req.display_name.unwrap_or_else(|| req.name.clone());
    let stage = state
        .store()
        .create_stage(
            &NewStage {
                project,
                name: req.name,
                stage_type: req.stage_type,
                display_name,
                outpost,
            },
            Utc::now(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(stage)))
}

#[utoipa::path(get, path = "/projects/{project}/stages/{stage}", tag = "stages",
    params(crate::api::params::StagePath), responses((status = 200, body = Stage)))]
pub async fn get_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<Stage>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().get_stage(&project, &stage).await?))
}

/// Renames a stage for display, or suspends/resumes it (which bumps its
/// desired revision).
#[utoipa::path(patch, path = "/projects/{project}/stages/{stage}", tag = "stages",
    params(crate::api::params::StagePath), request_body = UpdateStageRequest,
    responses((status = 200, body = Stage)))]
pub async fn update_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
    Json(req): Json<UpdateStageRequest>,
) -> ApiResult<Json<Stage>> {
    caller.role_in(&state, &project).await?;
    let update = StageUpdate {
        display_name: req.display_name,
        suspended: req.suspended,
    };
    let updated = state
        .store()
        .update_stage(&project, &stage, &update)
        .await?;
    state.links().poke(&updated.outpost);
    Ok(Json(updated))
}

#[utoipa::path(delete, path = "/projects/{project}/stages/{stage}", tag = "stages",
    params(crate::api::params::StagePath, ("force" = Option<bool>, Query, description = "also delete its releases and configs")),
    responses((status = 204)))]
pub async fn delete_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    caller.role_in(&state, &project).await?;
    let outpost = state.store().get_stage(&project, &stage).await?.outpost;
    state
        .store()
        .delete_stage(&project, &stage, q.force)
        .await?;
    // The outpost's agent is told to forget the stage.
    state.links().poke(&outpost);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/configs", tag = "configs",
    params(crate::api::params::StagePath), responses((status = 200, body = Vec<Config>)))]
pub async fn list_configs(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Config>>> {
    caller.role_in(&state, &project).await?;
    state.store().get_stage(&project, &stage).await?;
    Ok(Json(
        state.store().list_configs(&project, Some(&stage)).await?,
    ))
}

/// All configs of a project, across its stages.
#[utoipa::path(get, path = "/projects/{project}/configs", tag = "configs",
    params(crate::api::params::ProjectPath), responses((status = 200, body = Vec<Config>)))]
pub async fn list_project_configs(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<Config>>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().list_configs(&project, None).await?))
}

#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/configs/{config}", tag = "configs",
    params(crate::api::params::ConfigPath), responses((status = 200, body = Config)))]
pub async fn get_config(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, config)): Path<(String, String, String)>,
) -> ApiResult<Json<Config>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(
        state.store().get_config(&project, &stage, &config).await?,
    ))
}

/// Adds env values and files to a config, creating it if needed. Keys that
/// exist are replaced.
#[utoipa::path(post, path = "/projects/{project}/stages/{stage}/configs/{config}/data", tag = "configs",
    params(crate::api::params::ConfigPath),
    request_body = AddConfigDataRequest, responses((status = 200, body = Config)))]
pub async fn add_config_data(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, config)): Path<(String, String, String)>,
    Json(req): Json<AddConfigDataRequest>,
) -> ApiResult<Json<Config>> {
    caller.role_in(&state, &project).await?;
    validate_name(NameKind::Config, &config)?;
    for key in req.data.env.keys() {
        if !is_config_key(key) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid-config-key",
                format!("{key:?} is not a valid config key"),
                "use letters, digits, '-', '_' and '.', at most 253 of them (e.g. db.user or LOG_LEVEL); manifests name the key with config-ref",
            ));
        }
    }
    for name in req.data.files.keys() {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid-file-name",
                format!("{name:?} is not a valid config file name"),
                "a config file is referenced by its plain file name, e.g. settings.json",
            ));
        }
    }
    let updated = state
        .store()
        .add_config_data(&project, &stage, &config, &req.data, Utc::now())
        .await?;
    Ok(Json(updated))
}

#[utoipa::path(delete, path = "/projects/{project}/stages/{stage}/configs/{config}", tag = "configs",
    params(crate::api::params::ConfigPath), responses((status = 204)))]
pub async fn delete_config(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, config)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    caller.role_in(&state, &project).await?;
    state
        .store()
        .delete_config(&project, &stage, &config)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/releases", tag = "releases",
    params(crate::api::params::StagePath), responses((status = 200, body = Vec<Release>)))]
pub async fn list_releases(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Release>>> {
    caller.role_in(&state, &project).await?;
    state.store().get_stage(&project, &stage).await?;
    Ok(Json(state.store().list_releases(&project, &stage).await?))
}

#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/releases/{number}", tag = "releases",
    params(crate::api::params::ReleasePath), responses((status = 200, body = Release)))]
pub async fn get_release(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, number)): Path<(String, String, u64)>,
) -> ApiResult<Json<Release>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(
        state.store().get_release(&project, &stage, number).await?,
    ))
}

/// Pushes a release: a build (the newest when not named) and optionally a
/// config of the stage, frozen as they are now. Returns at once; the
/// stage's outpost picks the new desired revision up on its own.
#[utoipa::path(post, path = "/projects/{project}/stages/{stage}/releases", tag = "releases",
    params(crate::api::params::StagePath),
    request_body = PushReleaseRequest, responses((status = 201, body = Release)))]
pub async fn push_release(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
    Json(req): Json<PushReleaseRequest>,
) -> ApiResult<(StatusCode, Json<Release>)> {
    caller.role_in(&state, &project).await?;
    let stage_record = state.store().get_stage(&project, &stage).await?;
    let build = release_build(&state, &project, req.build).await?;
    let config = match req.config {
        Some(name) => {
            let config = state.store().get_config(&project, &stage, &name).await?;
            Some(ConfigSnapshot {
                name: config.name,
                version: config.version,
                data: config.data,
            })
        }
        None => None,
    };
    let release = state
        .store()
        .push_release(
            &NewRelease {
                project,
                stage,
                build: build.name,
                config,
                created_by: caller.user,
            },
            Utc::now(),
        )
        .await?;
    // The deploy is recorded; the outpost's session picks it up on its own.
    // Nothing here waits for the outpost.
    state.links().poke(&stage_record.outpost);
    Ok((StatusCode::CREATED, Json(release)))
}

/// The most stages one push may name.
pub const MAX_STAGES_PER_PUSH: usize = 100_000;

/// Pushes one build (the newest when not named) to several stages of the
/// project at once: each stage gets its next release, or — if any stage or
/// the build does not exist — none does. For rolling a build out to a
/// fleet of outposts in one request and one transaction. Returns at once;
/// each outpost picks its release up on its own.
#[utoipa::path(post, path = "/projects/{project}/releases", tag = "releases",
    params(crate::api::params::ProjectPath),
    request_body = PushReleasesRequest, responses((status = 201, body = Vec<Release>)))]
pub async fn push_releases(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Json(req): Json<PushReleasesRequest>,
) -> ApiResult<(StatusCode, Json<Vec<Release>>)> {
    caller.role_in(&state, &project).await?;
    if req.stages.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "no-stages",
            "the push names no stage",
            "list the stages to release to, e.g. {\"stages\": [\"line-1\", \"line-2\"]}",
        ));
    }
    if req.stages.len() > MAX_STAGES_PER_PUSH {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too-many-stages",
            format!(
                "the push names {} stages; one push takes at most {MAX_STAGES_PER_PUSH}",
                req.stages.len()
            ),
            "split the stages over several pushes",
        ));
    }
    let mut named = std::collections::HashSet::new();
    if let Some(twice) = req.stages.iter().find(|s| !named.insert(s.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "duplicate-stage",
            format!("the push names stage {twice:?} more than once"),
            "name each stage once",
        ));
    }
    let build = release_build(&state, &project, req.build).await?;
    let new: Vec<NewRelease> = req
        .stages
        .into_iter()
        .map(|stage| NewRelease {
            project: project.clone(),
            stage,
            build: build.name.clone(),
            config: None,
            created_by: caller.user.clone(),
        })
        .collect();
    // An unknown stage is refused here, with nothing pushed.
    let pushed = state.store().push_releases(&new, Utc::now()).await?;
    for outpost in &pushed.outposts {
        state.links().poke(outpost);
    }
    Ok((StatusCode::CREATED, Json(pushed.releases)))
}

/// The build a release takes: the one named, or the project's newest.
async fn release_build(
    state: &AppState,
    project: &str,
    name: Option<String>,
) -> ApiResult<trellis_model::Build> {
    match name {
        Some(name) => Ok(state.store().get_build(project, &name).await?),
        None => state
            .store()
            .list_builds(project)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "no-build",
                    format!("project {project:?} has no build to release"),
                    "push one first with `trellis push build -p PROJECT` in the project's directory",
                )
            }),
    }
}

/// A key of a config's env values: what a manifest's `config-ref` names.
/// The platform's keys are Kubernetes ConfigMap keys (`db.user`,
/// `public_hostname`, `postgres-initial-pwd`), not variable names: the
/// variable's name is the manifest's `env[].name`.
fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && key != "."
        && key != ".."
}

#[cfg(test)]
mod tests {
    use super::is_config_key;

    #[test]
    fn config_keys_are_the_platforms_not_variable_names() {
        for key in [
            "db.user",
            "public_hostname",
            "postgres-initial-pwd",
            "LOG_LEVEL",
            "1st",
        ] {
            assert!(is_config_key(key), "{key}");
        }
        for key in ["", ".", "..", "a b", "a/b", "é", "a=b", &"k".repeat(254)] {
            assert!(!is_config_key(key), "{key}");
        }
    }
}
