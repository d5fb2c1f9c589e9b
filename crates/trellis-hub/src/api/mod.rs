//! The HTTP API under `/api/v1`, and its OpenAPI document.
//!
//! Handlers are grouped by resource. Every route is registered through
//! `utoipa-axum`, so the OpenAPI document served at `/api/v1/openapi.json`
//! is generated from the same list the router is built from and cannot
//! miss a route.
//!
//! JSON bodies keep axum's default 2 MiB limit; chunk uploads read the raw
//! body with their own bound (`chunks::MAX_STORED_CHUNK_BYTES`).

pub mod access;
pub mod agent_binaries;
pub mod agent_updates;
pub mod backups;
pub mod builds;
pub mod chunks;
pub mod components;
pub mod contract;
pub mod outposts;
pub mod params;
pub mod projects;
pub mod rollouts;
pub mod stages;
pub mod streams;
pub mod types;

use axum::Json;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Trellis hub API",
        description = "Projects, stages, builds, configs, releases and outposts. \
        Authenticate with `Authorization: Bearer <key-id>:<secret>`."
    ),
    components(schemas(crate::error::ErrorBody))
)]
struct ApiDoc;

/// Every route of the API, with the OpenAPI description of each.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(crate::health::health))
        .routes(routes!(access::whoami))
        .routes(routes!(access::create_user, access::list_users))
        .routes(routes!(access::update_user))
        .routes(routes!(access::create_key))
        .routes(routes!(access::list_keys))
        .routes(routes!(access::delete_key))
        .routes(routes!(projects::list_projects, projects::create_project))
        .routes(routes!(
            projects::get_project,
            projects::update_project,
            projects::delete_project
        ))
        .routes(routes!(projects::restore_project))
        .routes(routes!(projects::list_members))
        .routes(routes!(projects::set_member, projects::remove_member))
        .routes(routes!(stages::list_stages, stages::create_stage))
        .routes(routes!(
            stages::get_stage,
            stages::update_stage,
            stages::delete_stage
        ))
        .routes(routes!(stages::restore_stage))
        .routes(routes!(stages::list_project_configs))
        .routes(routes!(stages::list_configs))
        .routes(routes!(stages::get_config, stages::delete_config))
        .routes(routes!(stages::add_config_data))
        .routes(routes!(stages::remove_config_key))
        .routes(routes!(stages::list_releases, stages::push_release))
        .routes(routes!(stages::push_releases))
        .routes(routes!(stages::get_release))
        .routes(routes!(rollouts::list_rollouts, rollouts::create_rollout))
        .routes(routes!(rollouts::get_rollout))
        .routes(routes!(rollouts::pause_rollout))
        .routes(routes!(rollouts::resume_rollout))
        .routes(routes!(rollouts::abort_rollout))
        .routes(routes!(components::list_components))
        .routes(routes!(components::control_component))
        .routes(routes!(components::suspend_stage))
        .routes(routes!(components::resume_stage))
        .routes(routes!(components::stage_logs))
        .routes(routes!(streams::exec))
        .routes(routes!(streams::port_forward))
        .routes(routes!(streams::list_audit))
        .routes(routes!(backups::list_backups, backups::create_backup))
        .routes(routes!(backups::get_backup, backups::delete_backup))
        .routes(routes!(backups::restore_backup))
        .routes(routes!(
            backups::get_backup_schedule,
            backups::set_backup_schedule,
            backups::delete_backup_schedule
        ))
        .routes(routes!(outposts::list_outposts, outposts::create_outpost))
        .routes(routes!(
            agent_updates::list_agent_updates,
            agent_updates::create_agent_updates
        ))
        .routes(routes!(
            outposts::get_outpost,
            outposts::update_outpost,
            outposts::delete_outpost
        ))
        .routes(routes!(outposts::validate_outpost_uri))
        .routes(routes!(outposts::get_outpost_uri))
        .routes(routes!(outposts::rotate_outpost_uri))
        .routes(routes!(outposts::revoke_outpost))
        .routes(routes!(
            outposts::get_link_profile,
            outposts::update_link_profile
        ))
        .routes(routes!(outposts::create_join_token))
        .routes(routes!(crate::link::endpoint::join))
        .routes(routes!(crate::link::endpoint::renew))
        .routes(routes!(crate::link::ingress_cert::ingress_certificate))
        .routes(routes!(crate::link::artifacts::chunk))
        .routes(routes!(crate::link::artifacts::artifact_content))
        .routes(routes!(crate::link::backups::backup_report))
        .routes(routes!(crate::link::backups::backup_missing))
        .routes(routes!(
            crate::link::backups::put_backup_chunk,
            crate::link::backups::get_backup_chunk
        ))
        .routes(routes!(
            crate::link::backups::put_backup_manifest,
            crate::link::backups::get_backup_manifest
        ))
        .routes(routes!(crate::link::status::stage_status))
        .routes(routes!(crate::link::status::project_status))
        .routes(routes!(builds::list_builds, builds::create_build))
        .routes(routes!(builds::get_build, builds::delete_build))
        .routes(routes!(chunks::missing_chunks))
        .routes(routes!(chunks::put_chunk))
        .routes(routes!(crate::gc::collect_garbage))
        .routes(routes!(agent_binaries::list_agent_binaries))
        .routes(routes!(
            agent_binaries::get_agent_binary,
            agent_binaries::put_agent_binary,
            agent_binaries::delete_agent_binary
        ))
}

/// The OpenAPI document served at `/api/v1/openapi.json` (see
/// [`contract`]).
pub fn document() -> serde_json::Value {
    let (_, mut doc) = routes().split_for_parts();
    doc.servers = Some(vec![utoipa::openapi::Server::new("/api/v1")]);
    contract::complete(&doc)
}

/// The `/api/v1` router and the OpenAPI document describing it.
pub fn router(state: AppState) -> axum::Router {
    let (router, _) = routes().split_for_parts();
    let doc = std::sync::Arc::new(document());
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "no-such-endpoint",
                "there is no such API endpoint",
                "see /api/v1/openapi.json for the endpoints this hub serves",
            )
        })
        .with_state(state)
}
