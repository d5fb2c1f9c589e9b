//! Outposts as records (administrators). The link to an outpost's agent is
//! the link layer's business.

use crate::extract::{Json, Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use trellis_model::ingress::validate_ingress_domain;
use trellis_model::link_profile::{LinkProfile, LinkProfileError};
use trellis_model::{LOCAL_OUTPOST, NameKind, Outpost, validate_name};
use trellis_store::OutpostUpdate;

use super::types::{
    CreateOutpostRequest, CreatedOutpost, DeleteQuery, JoinTokenRequest, JoinTokenResponse,
    LinkProfileRequest, LinkProfileView, OutpostUriResponse, UpdateOutpostRequest,
    ValidateOutpostUriRequest,
};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::outposts::OutpostDescription;
use crate::state::AppState;

#[utoipa::path(get, path = "/outposts", tag = "outposts", responses((status = 200, body = Vec<Outpost>)))]
pub async fn list_outposts(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<Outpost>>> {
    caller.require_admin("list outposts")?;
    Ok(Json(state.store().list_outposts().await?))
}

#[utoipa::path(post, path = "/outposts", tag = "outposts", request_body = CreateOutpostRequest,
    responses((status = 201, body = CreatedOutpost)))]
pub async fn create_outpost(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateOutpostRequest>,
) -> ApiResult<(StatusCode, Json<CreatedOutpost>)> {
    caller.require_admin("create outposts")?;
    validate_name(NameKind::Outpost, &req.name)?;
    for (key, value) in &req.labels {
        if !is_label_part(key) || value.chars().count() > 253 || value.chars().any(char::is_control)
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid-label",
                format!("label {key:?}={value:?} is not valid"),
                "label keys use letters, digits, '-', '_', '.', '/' (at most 63 characters); values are plain text",
            ));
        }
    }
    let ingress_domain = req
        .ingress_domain
        .map(ingress_domain)
        .transpose()?
        .flatten();
    let outpost = Outpost {
        display_name: req.display_name.unwrap_or_else(|| req.name.clone()),
        name: req.name,
        description: req.description,
        labels: req.labels,
        max_stages: req.max_stages,
        uri_generation: 1,
        revoked_at: None,
        ingress_domain,
        created_at: Utc::now(),
    };
    state.store().create_outpost(&outpost).await?;
    let join = mint_join_token(&state, &outpost.name, req.token_ttl_secs).await?;
    Ok((StatusCode::CREATED, Json(CreatedOutpost { outpost, join })))
}

#[utoipa::path(get, path = "/outposts/{outpost}", tag = "outposts",
    params(crate::api::params::OutpostPath), responses((status = 200, body = Outpost)))]
pub async fn get_outpost(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
) -> ApiResult<Json<Outpost>> {
    caller.require_admin("inspect outposts")?;
    Ok(Json(state.store().get_outpost(&outpost).await?))
}

#[utoipa::path(patch, path = "/outposts/{outpost}", tag = "outposts",
    params(crate::api::params::OutpostPath), request_body = UpdateOutpostRequest,
    responses((status = 200, body = Outpost)))]
pub async fn update_outpost(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
    Json(req): Json<UpdateOutpostRequest>,
) -> ApiResult<Json<Outpost>> {
    caller.require_admin("change outposts")?;
    let update = OutpostUpdate {
        display_name: req.display_name,
        description: req.description,
        ingress_domain: req.ingress_domain.map(ingress_domain).transpose()?,
    };
    let updated = state.store().update_outpost(&outpost, &update).await?;
    // A new domain bumped its stages' revisions: send them their hosts.
    state.links().poke(&updated.name);
    Ok(Json(updated))
}

/// An ingress domain as given: `""` means the default.
fn ingress_domain(domain: String) -> ApiResult<Option<String>> {
    if domain.is_empty() {
        return Ok(None);
    }
    validate_ingress_domain(&domain).map_err(|message| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-ingress-domain",
            message,
            "point a DNS wildcard (*.plant7.example.net) at the outpost and give that domain",
        )
    })?;
    Ok(Some(domain))
}

#[utoipa::path(delete, path = "/outposts/{outpost}", tag = "outposts",
    params(crate::api::params::OutpostPath, ("force" = Option<bool>, Query, description = "also delete the stages placed on it")),
    responses((status = 204)))]
pub async fn delete_outpost(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    caller.require_admin("delete outposts")?;
    if outpost == LOCAL_OUTPOST {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in-use",
            "the local outpost is part of the hub and cannot be deleted",
            "delete the stages on it instead",
        ));
    }
    state.store().delete_outpost(&outpost, q.force).await?;
    state.artifact_access().forget(&outpost);
    Ok(StatusCode::NO_CONTENT)
}

fn is_label_part(s: &str) -> bool {
    trellis_model::selector::is_label_key(s)
}

/// The outpost's current Outpost URI, to hand to users (administrators).
#[utoipa::path(get, path = "/outposts/{outpost}/uri", tag = "outposts",
    params(crate::api::params::OutpostPath), responses((status = 200, body = OutpostUriResponse)))]
pub async fn get_outpost_uri(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
) -> ApiResult<Json<OutpostUriResponse>> {
    caller.require_admin("see Outpost URIs")?;
    let record = remote_outpost(&state, &outpost).await?;
    let uri = crate::outposts::uri_of(&state, &record)?;
    Ok(Json(OutpostUriResponse {
        outpost,
        uri: uri.to_string(),
    }))
}

/// Replaces the outpost's URI with a new one; copies of the old one stop
/// validating. Stages already on the outpost are not affected.
#[utoipa::path(post, path = "/outposts/{outpost}/uri/rotate", tag = "outposts",
    params(crate::api::params::OutpostPath), responses((status = 200, body = OutpostUriResponse)))]
pub async fn rotate_outpost_uri(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
) -> ApiResult<Json<OutpostUriResponse>> {
    caller.require_admin("rotate Outpost URIs")?;
    remote_outpost(&state, &outpost).await?;
    let record = state.store().rotate_outpost_uri(&outpost).await?;
    let uri = crate::outposts::uri_of(&state, &record)?;
    Ok(Json(OutpostUriResponse {
        outpost,
        uri: uri.to_string(),
    }))
}

/// Revokes the outpost: its URI stops validating and no new stages can be
/// placed on it.
#[utoipa::path(post, path = "/outposts/{outpost}/revoke", tag = "outposts",
    params(crate::api::params::OutpostPath), responses((status = 200, body = Outpost)))]
pub async fn revoke_outpost(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
) -> ApiResult<Json<Outpost>> {
    caller.require_admin("revoke outposts")?;
    remote_outpost(&state, &outpost).await?;
    let revoked = state.store().revoke_outpost(&outpost, Utc::now()).await?;
    // After the store knows, so a reconnect in between is refused too.
    state.links().revoke(&outpost);
    state.artifact_access().forget(&outpost);
    Ok(Json(revoked))
}

/// Validates an Outpost URI: the outpost's description, or one error with a
/// stable code (`malformed-uri`, `other-hub`, `unknown-outpost`,
/// `wrong-key`, `revoked`, `not-allowed`, `outpost-full`) and a hint.
#[utoipa::path(post, path = "/outposts/validate", tag = "outposts", request_body = ValidateOutpostUriRequest,
    responses((status = 200, body = OutpostDescription)))]
pub async fn validate_outpost_uri(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<ValidateOutpostUriRequest>,
) -> ApiResult<Json<OutpostDescription>> {
    let (_, description) =
        crate::outposts::validate(&state, &caller, &req.uri, req.project.as_deref()).await?;
    Ok(Json(description))
}

/// The local outpost is part of the hub: it has no URI and cannot be revoked.
async fn remote_outpost(state: &AppState, name: &str) -> ApiResult<Outpost> {
    if name == LOCAL_OUTPOST {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "local-outpost",
            "the local outpost is part of the hub; it has no Outpost URI, no agent to join and \
             cannot be revoked",
            "stages created without an Outpost URI run on it",
        ));
    }
    Ok(state.store().get_outpost(name).await?)
}

/// A new one-time join token for the outpost's agent (to join a host for
/// the first time, or again after its state was lost).
#[utoipa::path(post, path = "/outposts/{outpost}/join-tokens", tag = "outposts",
    params(crate::api::params::OutpostPath), request_body = JoinTokenRequest,
    responses((status = 201, body = JoinTokenResponse)))]
pub async fn create_join_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
    Json(req): Json<JoinTokenRequest>,
) -> ApiResult<(StatusCode, Json<JoinTokenResponse>)> {
    caller.require_admin("create join tokens")?;
    let record = remote_outpost(&state, &outpost).await?;
    if record.revoked_at.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "revoked",
            format!("outpost {outpost:?} is revoked; it takes no agents"),
            "register a new outpost for this host",
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(mint_join_token(&state, &outpost, req.ttl_secs).await?),
    ))
}

/// The longest a join token may live: a week.
const MAX_TOKEN_TTL_SECS: u64 = 7 * 24 * 3600;

async fn mint_join_token(
    state: &AppState,
    outpost: &str,
    ttl_secs: Option<u64>,
) -> ApiResult<JoinTokenResponse> {
    let ttl = ttl_secs.unwrap_or(24 * 3600);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-token-ttl",
            format!("a join token cannot live {ttl} s"),
            "give between 1 second and 7 days",
        ));
    }
    let secret: [u8; 32] = rand::random();
    let expires_at = Utc::now() + chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX));
    state
        .store()
        .create_join_token(
            &crate::link::endpoint::token_hash(&secret),
            outpost,
            expires_at,
        )
        .await?;
    let (host, port) = state.public_address();
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let hub_url = format!("https://{host}:{port}");
    let token = trellis_link::identity::JoinToken {
        hub_url: hub_url.clone(),
        outpost: outpost.to_owned(),
        secret,
        ca_fingerprint: state.ca().fingerprint(),
    };
    Ok(JoinTokenResponse {
        outpost: outpost.to_owned(),
        command: format!("trellis agent join {hub_url} --token {token}"),
        install_command: crate::install::command(&hub_url, state.tls_pin(), &token.to_string()),
        token: token.to_string(),
        expires_at,
    })
}

/// The outpost's link profile (heartbeat, delivery cap and windows) and
/// whether its delivery window is open now.
#[utoipa::path(get, path = "/outposts/{outpost}/link-profile", tag = "outposts",
    params(crate::api::params::OutpostPath),
    responses(
        (status = 200, body = LinkProfileView),
        (status = 401, description = "no or a wrong access key", body = crate::error::ErrorBody),
        (status = 403, description = "not an administrator", body = crate::error::ErrorBody),
        (status = 404, description = "no such outpost (`not-found`)", body = crate::error::ErrorBody),
    ))]
pub async fn get_link_profile(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
) -> ApiResult<Json<LinkProfileView>> {
    caller.require_admin("see link profiles")?;
    let profile = state.store().get_link_profile(&outpost).await?;
    Ok(Json(link_profile_view(&state, outpost, &profile)))
}

/// Changes the outpost's link profile; absent fields stay. The outpost's
/// link takes the new heartbeat and windows at once (an agent too old to
/// be told links again).
#[utoipa::path(patch, path = "/outposts/{outpost}/link-profile", tag = "outposts",
    params(crate::api::params::OutpostPath), request_body = LinkProfileRequest,
    responses(
        (status = 200, body = LinkProfileView),
        (status = 400, description = "a part that does not parse or is out of bounds (`invalid-heartbeat`, `invalid-bandwidth`, `invalid-window`, `invalid-timezone`), the message naming the problem (for windows, the character)", body = crate::error::ErrorBody),
        (status = 401, description = "no or a wrong access key", body = crate::error::ErrorBody),
        (status = 403, description = "not an administrator", body = crate::error::ErrorBody),
        (status = 404, description = "no such outpost (`not-found`)", body = crate::error::ErrorBody),
    ))]
pub async fn update_link_profile(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
    Json(req): Json<LinkProfileRequest>,
) -> ApiResult<Json<LinkProfileView>> {
    caller.require_admin("change link profiles")?;
    let mut profile = state.store().get_link_profile(&outpost).await?;
    apply_link_profile(&mut profile, &req)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string(), e.hint()))?;
    let profile = state.store().set_link_profile(&outpost, &profile).await?;
    // On a shared store the feed tells the instance holding the link
    // (`p:`); this instance applies it either way.
    state.links().profile_changed(&outpost, profile.clone());
    Ok(Json(link_profile_view(&state, outpost, &profile)))
}

/// Applies the parts `req` gives to `profile`, each parsed by the model's
/// one parser.
fn apply_link_profile(
    profile: &mut LinkProfile,
    req: &LinkProfileRequest,
) -> Result<(), LinkProfileError> {
    use trellis_model::link_profile as lp;
    if let Some(text) = &req.heartbeat {
        profile.heartbeat_secs = if text.trim().eq_ignore_ascii_case("default") {
            None
        } else {
            Some(lp::parse_heartbeat(text)?)
        };
    }
    if let Some(text) = &req.bandwidth {
        profile.bandwidth_bytes_per_sec = lp::parse_bandwidth(text)?;
    }
    if let Some(text) = &req.timezone {
        let zone = lp::parse_timezone(text)?;
        profile.timezone = (zone.name() != "UTC").then(|| zone.name().to_owned());
    }
    if let Some(text) = &req.windows {
        let windows: lp::Windows = text.parse()?;
        profile.windows = (!windows.is_always()).then(|| windows.to_string());
    }
    Ok(())
}

fn link_profile_view(state: &AppState, outpost: String, profile: &LinkProfile) -> LinkProfileView {
    use trellis_model::link_profile::{WindowState, format_bandwidth};
    let default = state.links().settings().heartbeat;
    let window = match profile.schedule() {
        Ok(Some(schedule)) => schedule.state_at(state.links().profiles.now()),
        _ => WindowState::Open,
    };
    let (delivery, opens_at, opens) = match window {
        WindowState::Open => ("open", None, None),
        WindowState::Closed { opens_at, opens } => ("closed", Some(opens_at), Some(opens)),
    };
    LinkProfileView {
        outpost,
        heartbeat_secs: profile
            .heartbeat_secs
            .unwrap_or_else(|| u32::try_from(default.as_secs()).unwrap_or(u32::MAX)),
        heartbeat_default: profile.heartbeat_secs.is_none(),
        bandwidth_bytes_per_sec: profile.bandwidth_bytes_per_sec,
        bandwidth: profile
            .bandwidth_bytes_per_sec
            .map_or_else(|| "none".to_owned(), format_bandwidth),
        windows: profile.windows.clone().unwrap_or_else(|| "always".into()),
        timezone: profile.timezone.clone().unwrap_or_else(|| "UTC".into()),
        delivery: delivery.into(),
        opens_at,
        opens,
    }
}
