//! Builds, and the check that every artifact they name is on the hub.

use crate::extract::{Json, Path};
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use trellis_cas::{ArtifactKind, Digest};

use crate::chunks::{ChunkError, Chunks};
use trellis_model::manifest::{Arch, ComponentSource, DockerBuild, DockerSource, parse_manifest};
use trellis_model::{Artifact, Build, NewBuild, PlatformImage};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Newest first.
#[utoipa::path(get, path = "/projects/{project}/builds", tag = "builds",
    params(crate::api::params::ProjectPath), responses((status = 200, body = Vec<Build>)))]
pub async fn list_builds(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<Build>>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().list_builds(&project).await?))
}

#[utoipa::path(get, path = "/projects/{project}/builds/{build}", tag = "builds",
    params(crate::api::params::BuildPath), responses((status = 200, body = Build)))]
pub async fn get_build(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, build)): Path<(String, String)>,
) -> ApiResult<Json<Build>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().get_build(&project, &build).await?))
}

/// Records a build. The manifest must be valid, and every component must
/// come with its artifact: for a container component the image reference
/// (the manifest's for `docker.image`) and, for `docker.file` always, the
/// uploaded image archive; for a `process:` one the uploaded package.
#[utoipa::path(post, path = "/projects/{project}/builds", tag = "builds",
    params(crate::api::params::ProjectPath), request_body = NewBuild,
    responses((status = 201, body = Build)))]
pub async fn create_build(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Json(req): Json<NewBuild>,
) -> ApiResult<(StatusCode, Json<Build>)> {
    caller.role_in_live(&state, &project).await?;
    let stored = check_build(&req)?;
    for artifact in &stored {
        check_stored(state.chunks(), artifact).await?;
    }
    let build = state
        .store()
        .create_build(&project, &req, &caller.user, Utc::now())
        .await?;
    Ok((StatusCode::CREATED, Json(build)))
}

#[utoipa::path(delete, path = "/projects/{project}/builds/{build}", tag = "builds",
    params(crate::api::params::BuildPath), responses((status = 204)))]
pub async fn delete_build(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, build)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.role_in(&state, &project).await?;
    state.store().delete_build(&project, &build).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A build whose content does not hold together (its manifest and
/// artifacts are checked against each other and the artifact store, which
/// no schema can say): 422.
fn invalid_build(message: impl Into<String>, hint: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-build",
        message,
        hint,
    )
}

/// An artifact a build names, which must be on the hub.
struct Wanted<'a> {
    component: String,
    kind: ArtifactKind,
    index: &'a str,
    size: u64,
}

/// Checks that artifact `index` of `component` is on the hub: its index
/// and every one of its chunks.
async fn check_stored(chunks: &Chunks, wanted: &Wanted<'_>) -> ApiResult<()> {
    let Wanted {
        ref component,
        kind,
        index,
        size,
    } = *wanted;
    let digest: Digest = index
        .parse()
        .map_err(|e| invalid_build(format!("component {component:?}: {e}"), ""))?;
    let not_uploaded = |what: String| {
        invalid_build(
            format!("component {component:?}: {what}"),
            "upload it first (`trellis push build` does this); push again if a push was interrupted",
        )
    };
    let artifact = match chunks.artifact(&digest).await {
        Ok(artifact) => artifact,
        Err(ChunkError::NotFound { .. }) => {
            return Err(not_uploaded(format!(
                "artifact {digest} has not been uploaded"
            )));
        }
        Err(e @ (ChunkError::Unavailable { .. } | ChunkError::Refused { .. })) => {
            return Err(e.to_api("checking the build's artifacts"));
        }
        Err(e) => {
            return Err(invalid_build(
                format!("component {component:?}: {e}"),
                "push the build again",
            ));
        }
    };
    if artifact.kind != kind || artifact.size != size {
        return Err(invalid_build(
            format!(
                "component {component:?}: artifact {digest} is {:?} of {} bytes, not {kind:?} of {size} bytes",
                artifact.kind, artifact.size
            ),
            "push the build again",
        ));
    }
    let missing = chunks
        .missing(&artifact)
        .await
        .map_err(|e| e.to_api("checking the build's artifacts"))?;
    if !missing.is_empty() {
        return Err(not_uploaded(format!(
            "{} of the {} chunks of artifact {digest} have not been uploaded",
            missing.len(),
            artifact.distinct_chunks().len()
        )));
    }
    Ok(())
}

/// Checks the build without the artifact store; returns the artifacts that
/// must be stored.
fn check_build(build: &NewBuild) -> ApiResult<Vec<Wanted<'_>>> {
    let mut stored = Vec::new();
    let commit_ok = matches!(build.commit.len(), 40 | 64)
        && build.commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !commit_ok {
        return Err(invalid_build(
            format!("{:?} is not a git commit id", build.commit),
            "send the full hexadecimal commit id (`git rev-parse HEAD`)",
        ));
    }
    if build.branch.is_empty() || build.branch.chars().count() > 255 {
        return Err(invalid_build(
            "the branch name is empty or longer than 255 characters",
            "push builds from a checked-out branch",
        ));
    }
    let manifest = parse_manifest(&build.manifest).map_err(|errors| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-manifest",
            format!("{} is not a valid manifest:\n{errors}", build.manifest_file),
            "fix it and check with `trellis validate manifest PATH` before pushing",
        )
    })?;
    for component in &manifest.components {
        let artifact = build
            .components
            .iter()
            .find(|c| c.name == component.name)
            .map(|c| &c.artifact)
            .ok_or_else(|| {
                invalid_build(
                    format!(
                        "the build has no artifact for component {:?}",
                        component.name
                    ),
                    "push builds with `trellis push build`, which packs every component",
                )
            })?;
        match (&component.source, artifact) {
            (
                ComponentSource::Docker(docker),
                artifact @ Artifact::Image {
                    reference,
                    archive,
                    platforms,
                },
            ) => {
                check_platforms(&component.name, docker, archive.is_some(), platforms)?;
                let carries_images = archive.is_some() || !platforms.is_empty();
                match &docker.build {
                    DockerBuild::Image(image) if image != reference => {
                        return Err(invalid_build(
                            format!(
                                "component {:?}: image {reference:?} is not the manifest's image {image:?}",
                                component.name
                            ),
                            "the build must use the image the manifest names",
                        ));
                    }
                    DockerBuild::Dockerfile { .. } if !carries_images => {
                        return Err(invalid_build(
                            format!(
                                "component {:?} is built from a Dockerfile, but the build does not carry its image",
                                component.name
                            ),
                            "push builds with `trellis push build`, which builds and uploads the image",
                        ));
                    }
                    _ => {}
                }
                for archive in artifact.archives() {
                    stored.push(Wanted {
                        component: component.name.clone(),
                        kind: ArtifactKind::Image,
                        index: &archive.index,
                        size: archive.size,
                    });
                }
            }
            (ComponentSource::Process(_), Artifact::Package { digest, size }) => {
                stored.push(Wanted {
                    component: component.name.clone(),
                    kind: ArtifactKind::Package,
                    index: digest,
                    size: *size,
                });
            }
            _ => {
                return Err(invalid_build(
                    format!(
                        "component {:?}: the artifact's kind does not match the manifest",
                        component.name
                    ),
                    "docker components take an image, process components a package",
                ));
            }
        }
    }
    if let Some(extra) = build
        .components
        .iter()
        .find(|c| manifest.component(&c.name).is_none())
    {
        return Err(invalid_build(
            format!(
                "the build has an artifact for {:?}, which the manifest does not name",
                extra.name
            ),
            "send artifacts only for the manifest's components",
        ));
    }
    Ok(stored)
}

/// A component whose manifest lists `docker.platform` carries one image per
/// listed architecture, and no other; one without it carries a single image.
fn check_platforms(
    component: &str,
    docker: &DockerSource,
    single: bool,
    platforms: &[PlatformImage],
) -> ApiResult<()> {
    let listed: Vec<String> = docker.platforms.iter().map(|a| a.to_string()).collect();
    if docker.platforms.is_empty() {
        if !platforms.is_empty() {
            return Err(invalid_build(
                format!(
                    "component {component:?} carries images per architecture, but its manifest lists no docker.platform"
                ),
                "push builds with `trellis push build`, which builds what the manifest lists",
            ));
        }
        return Ok(());
    }
    let mut carried: Vec<Arch> = platforms.iter().map(|p| p.arch).collect();
    carried.sort();
    let mut wanted = docker.platforms.clone();
    wanted.sort();
    let missing_archive = matches!(docker.build, DockerBuild::Dockerfile { .. })
        && platforms.iter().any(|p| p.archive.is_none());
    if single || carried != wanted || missing_archive {
        let carried: Vec<String> = platforms.iter().map(|p| p.arch.to_string()).collect();
        return Err(invalid_build(
            format!(
                "component {component:?} lists docker.platform {}, but the build carries images for {}",
                listed.join(", "),
                if carried.is_empty() {
                    "no architecture".to_owned()
                } else {
                    carried.join(", ")
                }
            ),
            "push builds with `trellis push build`, which builds one image per listed architecture",
        ));
    }
    Ok(())
}
