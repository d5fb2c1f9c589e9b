//! The project list, and a project's stages at a glance.

use std::collections::HashMap;

use askama::Template;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use trellis_model::LOCAL_OUTPOST;

use super::session::Signed;
use super::view::{Badge, sync_badge, when};
use super::{ConsoleError, Form, Page, render};
use crate::api::types::CreateProjectRequest;
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::link::LinkState;
use crate::link::status::{link_view, stage_sync_state};
use crate::state::AppState;

struct ProjectRow {
    name: String,
    description: String,
    created: String,
}

#[derive(Template)]
#[template(path = "projects.html")]
struct ProjectsPage {
    page: Page,
    projects: Vec<ProjectRow>,
    form: ProjectForm,
    error: Option<ApiError>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ProjectForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
}

async fn projects_page(
    state: AppState,
    caller: crate::auth::Caller,
    form: ProjectForm,
    error: Option<ApiError>,
) -> Result<ProjectsPage, ConsoleError> {
    let Json(projects) = crate::api::projects::list_projects(
        State(state),
        caller.clone(),
        crate::extract::Query(Default::default()),
    )
    .await?;
    Ok(ProjectsPage {
        page: Page::signed("Projects", &caller, "projects"),
        projects: projects
            .into_iter()
            .map(|p| ProjectRow {
                created: when(p.created_at),
                name: p.name,
                description: p.description,
            })
            .collect(),
        form,
        error,
    })
}

pub async fn list(
    State(state): State<AppState>,
    Signed(caller): Signed,
) -> Result<Response, ConsoleError> {
    let page = projects_page(state, caller, ProjectForm::default(), None).await?;
    Ok(render(&page)?.into_response())
}

pub async fn create(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Form(form): Form<ProjectForm>,
) -> Result<Response, ConsoleError> {
    let request = CreateProjectRequest {
        name: form.name.trim().to_owned(),
        description: form.description.trim().to_owned(),
        display_name: None,
    };
    match crate::api::projects::create_project(State(state.clone()), caller.clone(), Json(request))
        .await
    {
        Ok((_, Json(project))) => {
            Ok(Redirect::to(&format!("/projects/{}", project.name)).into_response())
        }
        Err(e) => {
            let status = e.status;
            let page = projects_page(state, caller, form, Some(e)).await?;
            Ok((status, render(&page)?).into_response())
        }
    }
}

pub struct StageRow {
    pub name: String,
    pub display_name: String,
    pub stage_type: String,
    /// The outpost's name; `None` for the hub's local outpost.
    pub outpost: Option<String>,
    pub link: Option<Badge>,
    pub sync: Badge,
    /// e.g. `#3`, `#3 (#4 on its way)`, `none`.
    pub release: String,
    pub suspended: bool,
}

#[derive(Template)]
#[template(path = "project.html")]
struct ProjectPage {
    page: Page,
    project: String,
    description: String,
    stages: Vec<StageRow>,
    /// The filter box's label selector, as typed.
    selector: String,
    /// Why the selector was not used.
    selector_error: Option<String>,
    rollouts: Vec<super::rollouts::RolloutRow>,
}

/// The stage list's filter: a label selector over the stages' outposts.
#[derive(Debug, Default, Deserialize)]
pub struct StageFilterQuery {
    #[serde(default)]
    selector: Option<String>,
}

pub async fn show(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(project): Path<String>,
    crate::extract::Query(filter): crate::extract::Query<StageFilterQuery>,
) -> Result<Response, ConsoleError> {
    caller.role_in(&state, &project).await?;
    let record = state.store().get_project(&project).await?;
    let selector_text = filter.selector.unwrap_or_default().trim().to_owned();
    let (chosen, selector_error) = if selector_text.is_empty() {
        (None, None)
    } else {
        match trellis_model::Selector::parse(&selector_text) {
            Ok(selector) => (
                Some(crate::api::rollouts::outposts_matching(&state, &selector).await?),
                None,
            ),
            Err(e) => (None, Some(e.to_string())),
        }
    };
    let rollouts = state
        .store()
        .list_rollouts(Some(&project))
        .await?
        .iter()
        .take(20)
        .map(super::rollouts::RolloutRow::of)
        .collect();
    let summaries = state
        .store()
        .list_stage_summaries(&project, trellis_store::StageFilter::All)
        .await?;
    let mut links: HashMap<String, LinkState> = HashMap::new();
    let mut stages = Vec::with_capacity(summaries.len());
    for summary in summaries
        .into_iter()
        .filter(|s| s.stage.archived_at.is_none())
        .filter(|s| chosen.as_ref().is_none_or(|c| c.contains(&s.stage.outpost)))
    {
        let stage = &summary.stage;
        let link = match links.get(&stage.outpost) {
            Some(link) => *link,
            None => {
                let link = link_view(&state, &stage.outpost).await?.state;
                links.insert(stage.outpost.clone(), link);
                link
            }
        };
        let sync = stage_sync_state(
            stage,
            summary.delivered_revision,
            summary.applied_revision,
            summary.report_state.as_deref(),
            link.is_connected(),
        );
        let on_outpost = stage.outpost != LOCAL_OUTPOST;
        stages.push(StageRow {
            name: stage.name.clone(),
            display_name: stage.display_name.clone(),
            stage_type: stage.stage_type.to_string(),
            outpost: on_outpost.then(|| stage.outpost.clone()),
            link: on_outpost.then(|| Badge::of(link.as_str())),
            sync: sync_badge(sync.as_str(), link.is_connected()),
            release: release_text(summary.applied_release, stage.latest_release),
            suspended: stage.suspended,
        });
    }
    let page = ProjectPage {
        page: Page::signed(format!("{project} · stages"), &caller, "projects"),
        description: record.description,
        project,
        stages,
        selector: selector_text,
        selector_error,
        rollouts,
    };
    Ok(render(&page)?.into_response())
}

/// The release a stage runs, and the newer one on its way if any.
pub fn release_text(applied: Option<u64>, latest: Option<u64>) -> String {
    match (applied, latest) {
        (_, None) => "none".to_owned(),
        (Some(a), Some(l)) if a >= l => format!("#{a}"),
        (Some(a), Some(l)) => format!("#{a} (#{l} on its way)"),
        (None, Some(l)) => format!("none yet (#{l} on its way)"),
    }
}

#[cfg(test)]
mod tests {
    use super::release_text;

    #[test]
    fn release_text_says_what_runs_and_what_comes() {
        assert_eq!(release_text(None, None), "none");
        assert_eq!(release_text(Some(3), Some(3)), "#3");
        assert_eq!(release_text(Some(3), Some(4)), "#3 (#4 on its way)");
        assert_eq!(release_text(None, Some(1)), "none yet (#1 on its way)");
    }
}
