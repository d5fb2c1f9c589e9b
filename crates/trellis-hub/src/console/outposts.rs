//! Outposts, for administrators: the list with link state, labels and
//! stage count; registering an outpost and its join command; an outpost's
//! page with its Outpost URI (copy, rotate), a new join command, revoke.

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;
use trellis_model::LOCAL_OUTPOST;

use super::session::Signed;
use super::stages::AgentView;
use super::view::{Badge, last_seen, rtt, when, when_ago};
use super::{ConsoleError, Form, Page, render};
use crate::api::types::{CreateOutpostRequest, JoinTokenRequest, JoinTokenResponse};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::link::status::link_view;
use crate::state::AppState;

struct OutpostRow {
    name: String,
    display_name: String,
    link: Badge,
    last_seen: String,
    labels: String,
    stages: String,
    local: bool,
    /// The hub instance holding the link, where several share the store.
    instance: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct OutpostForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    description: String,
    /// `key=value` pairs, separated by commas or lines.
    #[serde(default)]
    labels: String,
    #[serde(default)]
    max_stages: String,
    #[serde(default)]
    ingress_domain: String,
}

#[derive(Template)]
#[template(path = "outposts.html")]
struct OutpostsPage {
    page: Page,
    /// Several hub instances share the store: the list says which holds
    /// each link.
    clustered: bool,
    outposts: Vec<OutpostRow>,
    form: OutpostForm,
    error: Option<ApiError>,
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn outposts_page(
    state: &AppState,
    caller: &Caller,
    form: OutpostForm,
    error: Option<ApiError>,
) -> Result<OutpostsPage, ConsoleError> {
    caller.require_admin("manage outposts")?;
    let now = Utc::now();
    let mut rows = Vec::new();
    for outpost in state.store().list_outposts().await? {
        let link = link_view(state, &outpost.name).await?;
        let stages = state.store().stages_on_outpost(&outpost.name).await?.len();
        rows.push(OutpostRow {
            link: Badge::of(link.state.as_str()),
            last_seen: last_seen(link.last_seen, now),
            labels: labels_text(&outpost.labels),
            stages: match outpost.max_stages {
                Some(max) => format!("{stages} of {max}"),
                None => stages.to_string(),
            },
            local: outpost.name == LOCAL_OUTPOST,
            instance: match (&link.instance_address, &link.instance) {
                (Some(address), Some(id)) => format!("{address} ({id})"),
                (None, Some(id)) => id.clone(),
                _ => String::new(),
            },
            display_name: outpost.display_name,
            name: outpost.name,
        });
    }
    Ok(OutpostsPage {
        page: Page::signed("Outposts", caller, "outposts"),
        clustered: state.cluster().is_shared(),
        outposts: rows,
        form,
        error,
    })
}

pub async fn list(
    State(state): State<AppState>,
    Signed(caller): Signed,
) -> Result<Response, ConsoleError> {
    let page = outposts_page(&state, &caller, OutpostForm::default(), None).await?;
    Ok(render(&page)?.into_response())
}

/// `site=plant-3, line=2` (or one pair per line) as labels.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut labels = BTreeMap::new();
    for pair in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            ApiError::bad_request(
                format!("label {pair:?} is not of the form key=value"),
                "write labels as key=value, separated by commas, e.g. site=plant-3, line=2",
            )
        })?;
        labels.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(labels)
}

fn create_request(form: &OutpostForm) -> Result<CreateOutpostRequest, ApiError> {
    let max_stages = match form.max_stages.trim() {
        "" => None,
        text => Some(text.parse::<u32>().map_err(|_| {
            ApiError::bad_request(
                format!("the stage limit {text:?} is not a whole number"),
                "leave it empty for no limit, or give a number like 10",
            )
        })?),
    };
    Ok(CreateOutpostRequest {
        name: form.name.trim().to_owned(),
        display_name: Some(form.display_name.trim().to_owned()).filter(|d| !d.is_empty()),
        description: form.description.trim().to_owned(),
        labels: parse_labels(&form.labels)?,
        max_stages,
        ingress_domain: Some(form.ingress_domain.trim().to_owned()).filter(|d| !d.is_empty()),
        token_ttl_secs: None,
    })
}

pub async fn create(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Form(form): Form<OutpostForm>,
) -> Result<Response, ConsoleError> {
    let created = match create_request(&form) {
        Ok(request) => {
            crate::api::outposts::create_outpost(
                State(state.clone()),
                caller.clone(),
                Json(request),
            )
            .await
        }
        Err(e) => Err(e),
    };
    match created {
        Ok((_, Json(created))) => {
            let page =
                outpost_page(&state, &caller, &created.outpost.name, Some(created.join)).await?;
            Ok((StatusCode::CREATED, render(&page)?).into_response())
        }
        Err(e) => {
            let status = e.status;
            let page = outposts_page(&state, &caller, form, Some(e)).await?;
            Ok((status, render(&page)?).into_response())
        }
    }
}

struct JoinView {
    command: String,
    expires: String,
}

#[derive(Template)]
#[template(path = "outpost.html")]
struct OutpostPage {
    page: Page,
    name: String,
    display_name: String,
    description: String,
    labels: String,
    local: bool,
    revoked: Option<String>,
    link: Badge,
    link_since: String,
    last_seen: String,
    rtt: String,
    last_disconnect: Option<String>,
    agent: Option<AgentView>,
    uri: Option<String>,
    stages: Vec<(String, String)>,
    limit: String,
    /// `<host>.<stage>.<project>.<domain>`.
    ingresses: String,
    join: Option<JoinView>,
}

async fn outpost_page(
    state: &AppState,
    caller: &Caller,
    name: &str,
    join: Option<JoinTokenResponse>,
) -> Result<OutpostPage, ConsoleError> {
    caller.require_admin("manage outposts")?;
    let store = state.store();
    let outpost = store.get_outpost(name).await?;
    let link = link_view(state, name).await?;
    let stored = store.get_outpost_link(name).await?;
    let local = name == LOCAL_OUTPOST;
    let uri = if local || outpost.revoked_at.is_some() {
        None
    } else {
        Some(crate::outposts::uri_of(state, &outpost)?.to_string())
    };
    let now = Utc::now();
    Ok(OutpostPage {
        page: Page::signed(format!("Outpost {name}"), caller, "outposts"),
        name: outpost.name.clone(),
        display_name: outpost.display_name.clone(),
        description: outpost.description.clone(),
        labels: labels_text(&outpost.labels),
        local,
        revoked: outpost.revoked_at.map(when),
        link: Badge::of(link.state.as_str()),
        link_since: when_ago(link.since, now),
        last_seen: last_seen(link.last_seen, now),
        rtt: rtt(link.rtt_ms),
        last_disconnect: link.last_disconnect,
        agent: stored
            .agent
            .as_ref()
            .and_then(crate::outposts::agent_facts)
            .map(AgentView::of),
        uri,
        stages: store
            .stages_on_outpost(name)
            .await?
            .into_iter()
            .map(|s| (s.project, s.name))
            .collect(),
        ingresses: format!("<host>.<stage>.<project>.{}", outpost.ingress_domain()),
        limit: outpost
            .max_stages
            .map_or_else(|| "no limit".to_owned(), |m| m.to_string()),
        join: join.map(|j| JoinView {
            command: j.command,
            expires: when_ago(j.expires_at, now),
        }),
    })
}

pub async fn show(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    let page = outpost_page(&state, &caller, &name, None).await?;
    Ok(render(&page)?.into_response())
}

pub async fn rotate(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    crate::api::outposts::rotate_outpost_uri(State(state), caller, Path(name.clone())).await?;
    Ok(Redirect::to(&format!("/outposts/{name}#uri")).into_response())
}

pub async fn revoke(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    crate::api::outposts::revoke_outpost(State(state), caller, Path(name.clone())).await?;
    Ok(Redirect::to(&format!("/outposts/{name}")).into_response())
}

pub async fn join_token(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    let (_, Json(join)) = crate::api::outposts::create_join_token(
        State(state.clone()),
        caller.clone(),
        Path(name.clone()),
        Json(JoinTokenRequest::default()),
    )
    .await?;
    let page = outpost_page(&state, &caller, &name, Some(join)).await?;
    Ok((StatusCode::CREATED, render(&page)?).into_response())
}

#[cfg(test)]
mod tests {
    use super::parse_labels;

    #[test]
    fn labels_are_read_from_commas_or_lines() {
        let labels = parse_labels("site=plant-3, line = 2\nzone=b").unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(labels["line"], "2");
        assert!(parse_labels("").unwrap().is_empty());
        let e = parse_labels("site").unwrap_err();
        assert!(e.message.contains("\"site\""), "{}", e.message);
    }
}
