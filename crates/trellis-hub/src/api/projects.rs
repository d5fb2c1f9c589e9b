//! Projects and their members.

use crate::extract::{Json, Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use trellis_model::{Member, NameKind, Project, Role, validate_name};

use super::types::{
    ArchivedQuery, CreateProjectRequest, DeleteQuery, SetMemberRequest, UpdateProjectRequest,
};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Projects the caller is a member of (all of them for administrators):
/// the live ones, or with `archived` the archived ones.
#[utoipa::path(get, path = "/projects", tag = "projects", params(ArchivedQuery),
    responses((status = 200, body = Vec<Project>)))]
pub async fn list_projects(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ArchivedQuery>,
) -> ApiResult<Json<Vec<Project>>> {
    let mut visible = Vec::new();
    for project in state.store().list_projects().await? {
        if project.archived_at.is_some() != q.archived {
            continue;
        }
        if caller.admin
            || state
                .store()
                .role_of(&project.name, &caller.user)
                .await?
                .is_some()
        {
            visible.push(project);
        }
    }
    Ok(Json(visible))
}

/// Any signed-in user may create a project; they become its owner.
#[utoipa::path(post, path = "/projects", tag = "projects", request_body = CreateProjectRequest,
    responses((status = 201, body = Project)))]
pub async fn create_project(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateProjectRequest>,
) -> ApiResult<(StatusCode, Json<Project>)> {
    validate_name(NameKind::Project, &req.name)?;
    let project = Project {
        display_name: req.display_name.unwrap_or_else(|| req.name.clone()),
        name: req.name,
        description: req.description,
        created_at: Utc::now(),
        archived_at: None,
    };
    state.store().create_project(&project, &caller.user).await?;
    Ok((StatusCode::CREATED, Json(project)))
}

#[utoipa::path(get, path = "/projects/{project}", tag = "projects",
    params(crate::api::params::ProjectPath), responses((status = 200, body = Project)))]
pub async fn get_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Project>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().get_project(&project).await?))
}

/// Deletes a project (owners): it is archived with its stages — their
/// outposts stop running them, keeping their volumes; records, releases
/// and configs are kept — until it is restored or the hub's retention
/// period ends. With `purge` it is deleted for good at once, with
/// everything in it.
#[utoipa::path(delete, path = "/projects/{project}", tag = "projects",
    params(crate::api::params::ProjectPath, DeleteQuery),
    responses((status = 204)))]
pub async fn delete_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    caller.require_owner(&state, &project, "delete it").await?;
    let stages = if q.purge || q.force {
        let stages = state.store().list_stages(&project).await?;
        state.store().delete_project(&project, true).await?;
        stages
    } else {
        state.store().archive_project(&project, Utc::now()).await?
    };
    for stage in stages {
        state.links().poke(&stage.outpost);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Restores an archived project (owners) and the stages archived with it:
/// their outposts run their releases again.
#[utoipa::path(post, path = "/projects/{project}/restore", tag = "projects",
    params(crate::api::params::ProjectPath), responses((status = 200, body = Project)))]
pub async fn restore_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Project>> {
    caller.require_owner(&state, &project, "restore it").await?;
    for stage in state.store().restore_project(&project).await? {
        state.links().poke(&stage.outpost);
    }
    Ok(Json(state.store().get_project(&project).await?))
}

/// Changes a project's display name or description (owners).
#[utoipa::path(patch, path = "/projects/{project}", tag = "projects",
    params(crate::api::params::ProjectPath), request_body = UpdateProjectRequest,
    responses((status = 200, body = Project)))]
pub async fn update_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Json(req): Json<UpdateProjectRequest>,
) -> ApiResult<Json<Project>> {
    caller.require_owner(&state, &project, "change it").await?;
    caller.role_in_live(&state, &project).await?;
    let update = trellis_store::ProjectUpdate {
        display_name: req.display_name,
        description: req.description,
    };
    Ok(Json(state.store().update_project(&project, &update).await?))
}

#[utoipa::path(get, path = "/projects/{project}/members", tag = "projects",
    params(crate::api::params::ProjectPath), responses((status = 200, body = Vec<Member>)))]
pub async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<Member>>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().list_members(&project).await?))
}

#[utoipa::path(put, path = "/projects/{project}/members/{user}", tag = "projects",
    params(crate::api::params::MemberPath), request_body = SetMemberRequest,
    responses((status = 200, body = Member)))]
pub async fn set_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
    Json(req): Json<SetMemberRequest>,
) -> ApiResult<Json<Member>> {
    caller
        .require_owner(&state, &project, "manage members")
        .await?;
    state.store().get_user(&user).await?;
    if req.role != Role::Owner {
        keep_an_owner(&state, &project, &user).await?;
    }
    state.store().set_member(&project, &user, req.role).await?;
    Ok(Json(Member {
        project,
        user,
        role: req.role,
    }))
}

#[utoipa::path(delete, path = "/projects/{project}/members/{user}", tag = "projects",
    params(crate::api::params::MemberPath), responses((status = 204)))]
pub async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller
        .require_owner(&state, &project, "manage members")
        .await?;
    keep_an_owner(&state, &project, &user).await?;
    state.store().remove_member(&project, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Refuses a change that would leave the project without an owner: nobody
/// but an administrator could manage it any more.
async fn keep_an_owner(state: &AppState, project: &str, user: &str) -> ApiResult<()> {
    let members = state.store().list_members(project).await?;
    let owners: Vec<&Member> = members.iter().filter(|m| m.role == Role::Owner).collect();
    if owners.len() == 1 && owners[0].user == user {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "last-owner",
            format!("{user:?} is the only owner of project {project:?}"),
            "make another member owner first (`trellis add member USER -p PROJECT --role owner`)",
        ));
    }
    Ok(())
}
