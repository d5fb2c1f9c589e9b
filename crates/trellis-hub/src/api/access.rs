//! Who the caller is, users, and access keys.

use crate::extract::{Json, Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use trellis_model::{AccessKeyInfo, NameKind, User, validate_name};

use super::types::{
    CreateKeyRequest, CreateUserRequest, CreatedKey, KeysQuery, UpdateUserRequest, WhoAmI,
};
use crate::auth::{Caller, mint_key};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use trellis_store::AdminGuarded;

#[utoipa::path(get, path = "/whoami", tag = "access", responses((status = 200, body = WhoAmI)))]
pub async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        user: caller.user,
        admin: caller.admin,
    })
}

/// Creates a user and their first access key (admins only).
#[utoipa::path(post, path = "/users", tag = "access", request_body = CreateUserRequest,
    responses((status = 201, body = CreatedKey)))]
pub async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateUserRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    caller.require_admin("create users")?;
    validate_name(NameKind::User, &req.name)?;
    state
        .store()
        .create_user(&User {
            name: req.name.clone(),
            admin: req.admin,
            created_at: Utc::now(),
        })
        .await?;
    let created = issue_key(&state, &req.name, "first key").await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/users", tag = "access", responses((status = 200, body = Vec<User>)))]
pub async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<User>>> {
    caller.require_admin("list users")?;
    Ok(Json(state.store().list_users().await?))
}

/// Creates another key for a user. Users may create keys for themselves;
/// admins for anyone.
#[utoipa::path(post, path = "/users/{user}/keys", tag = "access",
    params(crate::api::params::UserPath), request_body = CreateKeyRequest,
    responses((status = 201, body = CreatedKey)))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Json(req): Json<CreateKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    if user != caller.user {
        caller.require_admin("create keys for other users")?;
    }
    state.store().get_user(&user).await?;
    let created = issue_key(&state, &user, &req.description).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/keys", tag = "access", params(("user" = Option<String>, Query, description = "only this user's keys")),
    responses((status = 200, body = Vec<AccessKeyInfo>)))]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<KeysQuery>,
) -> ApiResult<Json<Vec<AccessKeyInfo>>> {
    let user = match (caller.admin, q.user) {
        (true, user) => user,
        (false, Some(user)) if user != caller.user => {
            return Err(ApiError::forbidden(
                "only administrators may list other users' keys",
                "leave out --user to list your own keys",
            ));
        }
        (false, _) => Some(caller.user.clone()),
    };
    Ok(Json(state.store().list_access_keys(user.as_deref()).await?))
}

#[utoipa::path(delete, path = "/keys/{id}", tag = "access",
    params(crate::api::params::KeyPath), responses((status = 204)))]
pub async fn delete_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let key = state
        .store()
        .find_access_key(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("key", &id))?;
    if key.info.user != caller.user {
        caller.require_admin("delete other users' keys")?;
    }
    if id == caller.key_id {
        // The last administrator key says why it stays, whoever asks.
        if caller.admin && is_last_admin_key(&state, &id).await? {
            return Err(last_admin_key(format!(
                "key {id:?} is the last access key any administrator holds; without it nobody \
                 could administer this hub"
            )));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "key-in-use",
            format!("this request is signed with key {id:?}, the one it would delete"),
            "sign in with another of your keys to delete this one (`trellis create key` makes one)",
        ));
    }
    match state.store().delete_access_key_keeping_admin(&id).await? {
        AdminGuarded::Done(()) => {}
        AdminGuarded::LastAdminKey => {
            return Err(last_admin_key(format!(
                "key {id:?} is the last access key any administrator holds; without it nobody \
                 could administer this hub"
            )));
        }
    }
    state.keys().forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// Makes a user an administrator or takes that away (administrators only).
/// Demoting the holder of the last administrator key is refused.
#[utoipa::path(patch, path = "/users/{user}", tag = "access",
    params(crate::api::params::UserPath), request_body = UpdateUserRequest,
    responses((status = 200, body = User)))]
pub async fn update_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Json(req): Json<UpdateUserRequest>,
) -> ApiResult<Json<User>> {
    caller.require_admin("change users")?;
    if req.admin == Some(false) && user == caller.user {
        if holds_last_admin_keys(&state, &user).await? {
            return Err(last_admin_key(format!(
                "{user:?} holds the last access keys of any administrator; without them \
                 nobody could administer this hub"
            )));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "self-demotion",
            format!("{user:?} cannot take their own administrator role away"),
            "ask another administrator to do it",
        ));
    }
    let updated = match req.admin {
        Some(admin) => match state.store().set_user_admin(&user, admin).await? {
            AdminGuarded::Done(user) => user,
            AdminGuarded::LastAdminKey => {
                return Err(last_admin_key(format!(
                    "{user:?} holds the last access keys of any administrator; without them \
                     nobody could administer this hub"
                )));
            }
        },
        None => state.store().get_user(&user).await?,
    };
    Ok(Json(updated))
}

/// Whether `id` is the only key any administrator holds (a read; the
/// deletion itself is guarded in the store).
async fn is_last_admin_key(state: &AppState, id: &str) -> ApiResult<bool> {
    let admins: Vec<String> = state
        .store()
        .list_users()
        .await?
        .into_iter()
        .filter(|u| u.admin)
        .map(|u| u.name)
        .collect();
    let keys = state.store().list_access_keys(None).await?;
    Ok(!keys.iter().any(|k| k.id != id && admins.contains(&k.user)))
}

/// Whether `user` holds keys and no other administrator does (a read; the
/// change itself is guarded in the store).
async fn holds_last_admin_keys(state: &AppState, user: &str) -> ApiResult<bool> {
    let admins: Vec<String> = state
        .store()
        .list_users()
        .await?
        .into_iter()
        .filter(|u| u.admin && u.name != user)
        .map(|u| u.name)
        .collect();
    let keys = state.store().list_access_keys(None).await?;
    Ok(keys.iter().any(|k| k.user == user) && !keys.iter().any(|k| admins.contains(&k.user)))
}

/// The refusal of a change that would leave no administrator able to sign
/// in.
fn last_admin_key(message: String) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "last-admin-key",
        message,
        "give another user an administrator key first (`trellis create user NAME --admin`, or \
         `trellis create key --user ADMIN`); if every administrator key is lost, run \
         `trellis hub reset-admin-key --data DIR` on the hub's host",
    )
}

async fn issue_key(state: &AppState, user: &str, description: &str) -> ApiResult<CreatedKey> {
    let minted = mint_key(user, description).map_err(|e| ApiError::internal(e.to_string()))?;
    state.store().create_access_key(&minted.stored).await?;
    Ok(CreatedKey {
        user: user.to_owned(),
        key_id: minted.key.id.clone(),
        key: minted.key.to_string(),
    })
}
