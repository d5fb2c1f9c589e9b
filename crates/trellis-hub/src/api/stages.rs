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
    AddConfigDataRequest, ConfigValuesQuery, CreateStageRequest, DeleteQuery, PushReleaseRequest,
    PushReleasesRequest, StageListQuery, UpdateStageRequest,
};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The project's live stages, or with `archived` its archived ones;
/// with `selector`, only those whose outpost's labels match it.
#[utoipa::path(get, path = "/projects/{project}/stages", tag = "stages",
    params(crate::api::params::ProjectPath, StageListQuery),
    responses((status = 200, body = Vec<Stage>)))]
pub async fn list_stages(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(q): Query<StageListQuery>,
) -> ApiResult<Json<Vec<Stage>>> {
    let selector = super::rollouts::list_selector(q.selector.as_deref())?;
    caller.role_in(&state, &project).await?;
    let stages = state.store().list_stages(&project).await?;
    let chosen = match &selector {
        Some(selector) => Some(super::rollouts::outposts_matching(&state, selector).await?),
        None => None,
    };
    Ok(Json(
        stages
            .into_iter()
            .filter(|s| s.archived_at.is_some() == q.archived)
            .filter(|s| chosen.as_ref().is_none_or(|c| c.contains(&s.outpost)))
            .collect(),
    ))
}

/// The stage, for a change: refused (409 `archived`) when it or its
/// project is archived.
pub(crate) async fn live_stage(state: &AppState, project: &str, stage: &str) -> ApiResult<Stage> {
    let record = state.store().get_stage(project, stage).await?;
    let owner = state.store().get_project(project).await?;
    if let Some(at) = owner.archived_at {
        return Err(crate::error::archived("project", project, project, at));
    }
    if let Some(at) = record.archived_at {
        return Err(crate::error::archived("stage", stage, project, at));
    }
    Ok(record)
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
    caller.role_in_live(&state, &project).await?;
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

/// Renames a stage for display, changes its type, or suspends/resumes it
/// (which bumps its desired revision).
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
    live_stage(&state, &project, &stage).await?;
    let update = StageUpdate {
        display_name: req.display_name,
        suspended: req.suspended,
        stage_type: req.stage_type,
    };
    let updated = state
        .store()
        .update_stage(&project, &stage, &update)
        .await?;
    state.links().poke(&updated.outpost);
    Ok(Json(updated))
}

/// Deletes a stage: it is archived — its outpost stops running it and
/// keeps its volumes; its records, releases and configs are kept — until
/// it is restored or the hub's retention period ends. With `purge` it is
/// deleted for good at once.
#[utoipa::path(delete, path = "/projects/{project}/stages/{stage}", tag = "stages",
    params(crate::api::params::StagePath, DeleteQuery),
    responses((status = 204)))]
pub async fn delete_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    caller.role_in(&state, &project).await?;
    let outpost = state.store().get_stage(&project, &stage).await?.outpost;
    if q.purge || q.force {
        state.store().delete_stage(&project, &stage, true).await?;
    } else {
        state
            .store()
            .archive_stage(&project, &stage, Utc::now())
            .await?;
    }
    // The outpost's agent is told to stop running the stage, or to forget
    // it.
    state.links().poke(&outpost);
    Ok(StatusCode::NO_CONTENT)
}

/// Brings an archived stage back: its outpost runs its release again, with
/// the volumes it kept. Refused while its project is archived (restore the
/// project).
#[utoipa::path(post, path = "/projects/{project}/stages/{stage}/restore", tag = "stages",
    params(crate::api::params::StagePath), responses((status = 200, body = Stage)))]
pub async fn restore_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<Stage>> {
    caller.role_in_live(&state, &project).await?;
    let restored = state.store().restore_stage(&project, &stage).await?;
    state.links().poke(&restored.outpost);
    Ok(Json(restored))
}

/// The stage's configs. Values of secret keys are left out (their keys
/// are listed in `secret_env`/`secret_files`) unless an owner asks for
/// them with `with_values`.
#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/configs", tag = "configs",
    params(crate::api::params::StagePath, ConfigValuesQuery),
    responses((status = 200, body = Vec<Config>)))]
pub async fn list_configs(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
    Query(q): Query<ConfigValuesQuery>,
) -> ApiResult<Json<Vec<Config>>> {
    let show = secrets_shown(&state, &caller, &project, q.with_values).await?;
    state.store().get_stage(&project, &stage).await?;
    let configs = state.store().list_configs(&project, Some(&stage)).await?;
    Ok(Json(configs.into_iter().map(|c| shown(c, show)).collect()))
}

/// All configs of a project, across its stages; secret values as for
/// one stage's.
#[utoipa::path(get, path = "/projects/{project}/configs", tag = "configs",
    params(crate::api::params::ProjectPath, ConfigValuesQuery),
    responses((status = 200, body = Vec<Config>)))]
pub async fn list_project_configs(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(q): Query<ConfigValuesQuery>,
) -> ApiResult<Json<Vec<Config>>> {
    let show = secrets_shown(&state, &caller, &project, q.with_values).await?;
    let configs = state.store().list_configs(&project, None).await?;
    Ok(Json(configs.into_iter().map(|c| shown(c, show)).collect()))
}

/// One config; secret values as for a stage's list.
#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/configs/{config}", tag = "configs",
    params(crate::api::params::ConfigPath, ConfigValuesQuery),
    responses((status = 200, body = Config)))]
pub async fn get_config(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, config)): Path<(String, String, String)>,
    Query(q): Query<ConfigValuesQuery>,
) -> ApiResult<Json<Config>> {
    let show = secrets_shown(&state, &caller, &project, q.with_values).await?;
    let config = state.store().get_config(&project, &stage, &config).await?;
    Ok(Json(shown(config, show)))
}

/// Whether secret values go out: only when asked, and only to owners (and
/// administrators, who act as owners). Also checks the caller may see the
/// project at all.
async fn secrets_shown(
    state: &AppState,
    caller: &Caller,
    project: &str,
    asked: bool,
) -> ApiResult<bool> {
    if asked {
        caller
            .require_owner(state, project, "see the values of secret config keys")
            .await?;
    } else {
        caller.role_in(state, project).await?;
    }
    Ok(asked)
}

/// `config` as it goes out: secret values left out unless `show`.
fn shown(mut config: Config, show: bool) -> Config {
    if !show {
        config.data = config.data.without_secret_values();
    }
    config
}

/// A release as it goes out: its config snapshot's secret values are never
/// shown (the config they came from shows them to owners).
pub(crate) fn release_shown(mut release: Release) -> Release {
    if let Some(snapshot) = &mut release.config {
        snapshot.data = snapshot.data.without_secret_values();
    }
    release
}

/// Adds env values and files to a config, creating it if needed. Keys that
/// exist are replaced. Keys listed in `secret_env`/`secret_files` are
/// secret: given in this request, or already in the config (then only
/// marked). The answer leaves secret values out.
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
    live_stage(&state, &project, &stage).await?;
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
    let mut data = req.data;
    // Secret marks of keys the request does not carry mark the config's
    // own: their values are written again, marked.
    let unmarked_env: Vec<String> = data
        .secret_env
        .iter()
        .filter(|k| !data.env.contains_key(*k))
        .cloned()
        .collect();
    let unmarked_files: Vec<String> = data
        .secret_files
        .iter()
        .filter(|k| !data.files.contains_key(*k))
        .cloned()
        .collect();
    if !unmarked_env.is_empty() || !unmarked_files.is_empty() {
        let existing = match state.store().get_config(&project, &stage, &config).await {
            Ok(existing) => existing.data,
            Err(trellis_store::StoreError::NotFound { kind: "config", .. }) => Default::default(),
            Err(e) => return Err(e.into()),
        };
        for (wanted, have, into, kind) in [
            (&unmarked_env, &existing.env, &mut data.env, "env value"),
            (&unmarked_files, &existing.files, &mut data.files, "file"),
        ] {
            for key in wanted {
                let value = have.get(key).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "unknown-config-key",
                        format!("config {config:?} of stage {stage:?} has no {kind} {key:?} to mark secret"),
                        "give its value too (`--secret-env KEY=VALUE`, `--secret-file PATH`)",
                    )
                })?;
                into.insert(key.clone(), value.clone());
            }
        }
    }
    let updated = state
        .store()
        .add_config_data(&project, &stage, &config, &data, Utc::now())
        .await?;
    Ok(Json(shown(updated, false)))
}

/// Removes one key — an env value or a file — from a config, as a new
/// version of it. The answer leaves secret values out.
#[utoipa::path(delete, path = "/projects/{project}/stages/{stage}/configs/{config}/keys/{key}", tag = "configs",
    params(crate::api::params::ConfigKeyPath), responses((status = 200, body = Config)))]
pub async fn remove_config_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, config, key)): Path<(String, String, String, String)>,
) -> ApiResult<Json<Config>> {
    caller.role_in(&state, &project).await?;
    live_stage(&state, &project, &stage).await?;
    let updated = state
        .store()
        .remove_config_keys(&project, &stage, &config, &[key], Utc::now())
        .await?;
    Ok(Json(shown(updated, false)))
}

#[utoipa::path(delete, path = "/projects/{project}/stages/{stage}/configs/{config}", tag = "configs",
    params(crate::api::params::ConfigPath), responses((status = 204)))]
pub async fn delete_config(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, config)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    caller.role_in(&state, &project).await?;
    live_stage(&state, &project, &stage).await?;
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
    let releases = state.store().list_releases(&project, &stage).await?;
    Ok(Json(releases.into_iter().map(release_shown).collect()))
}

#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/releases/{number}", tag = "releases",
    params(crate::api::params::ReleasePath), responses((status = 200, body = Release)))]
pub async fn get_release(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, number)): Path<(String, String, u64)>,
) -> ApiResult<Json<Release>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(release_shown(
        state.store().get_release(&project, &stage, number).await?,
    )))
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
    let stage_record = live_stage(&state, &project, &stage).await?;
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
    Ok((StatusCode::CREATED, Json(release_shown(release))))
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
    caller.role_in_live(&state, &project).await?;
    let mut req = req;
    match (&req.selector, req.stages.is_empty()) {
        (Some(_), false) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "no-stages",
                "the push names stages and a selector",
                "give either the stages or a selector that chooses them",
            ));
        }
        (Some(text), true) => {
            let selector = super::rollouts::parse_selector(text)?;
            let chosen = super::rollouts::select_stages(&state, &project, &selector).await?;
            if chosen.is_empty() {
                return Err(super::rollouts::no_match(&project, &selector));
            }
            req.stages = chosen.into_iter().map(|s| s.name).collect();
        }
        (None, true) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "no-stages",
                "the push names no stage",
                "list the stages to release to, e.g. {\"stages\": [\"line-1\", \"line-2\"]}, or give a selector",
            ));
        }
        (None, false) => {}
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
    // Only the archived stages are read: a fleet project holds thousands.
    for stage in state.store().list_archived_stages(&project).await? {
        if let (Some(at), true) = (stage.archived_at, named.contains(stage.name.as_str())) {
            return Err(crate::error::archived("stage", &stage.name, &project, at));
        }
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
    Ok((
        StatusCode::CREATED,
        Json(pushed.releases.into_iter().map(release_shown).collect()),
    ))
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
