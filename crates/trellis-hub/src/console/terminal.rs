//! A terminal in the browser: a shell in a component, from the stage page.
//!
//! The page (`…/components/{c}/terminal`) holds a terminal emulator
//! (xterm.js, vendored in `assets/vendor/`, embedded like the console's
//! other assets); its script opens the WebSocket `…/terminal/socket`, which
//! is an exec of `sh` under a terminal (`tty`) going the same way as
//! `trellis exec -it`: authorised (members only), counted against the
//! stream limits, recorded in the audit log as action `terminal`, carried
//! as a stream over the outpost's link; the socket's messages are the
//! API's exec messages (see [`crate::api::streams`]).
//!
//! The session cookie is `SameSite=Lax`, which browsers do not send with a
//! WebSocket another site opens, and the socket also refuses an `Origin`
//! other than the console's own.

use askama::Template;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use trellis_link::protocol::StreamTarget;
use trellis_model::{NameKind, validate_name};

use super::session::Signed;
use super::{ConsoleError, Page, render};
use crate::error::ApiError;
use crate::state::AppState;

/// The shell the terminal runs: present in nearly every image and host.
const SHELL: &str = "sh";

#[derive(Template)]
#[template(path = "terminal.html")]
struct TerminalPage {
    page: Page,
    project: String,
    stage: String,
    component: String,
    socket: String,
    xterm_js: &'static str,
    xterm_css: &'static str,
}

pub async fn page(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage, component)): Path<(String, String, String)>,
) -> Result<Response, ConsoleError> {
    caller.role_in(&state, &project).await?;
    state.store().get_stage(&project, &stage).await?;
    validate_name(NameKind::Component, &component).map_err(ApiError::from)?;
    let base = format!("/projects/{project}/stages/{stage}/components/{component}");
    let page = TerminalPage {
        page: Page::signed(
            format!("{component} · {project} · {stage}"),
            &caller,
            "projects",
        ),
        socket: format!("{base}/terminal/socket"),
        project,
        stage,
        component,
        xterm_js: &super::ASSETS.xterm_js_url,
        xterm_css: &super::ASSETS.xterm_css_url,
    };
    Ok(render(&page)?.into_response())
}

#[derive(Debug, Deserialize)]
pub struct SizeQuery {
    cols: Option<u16>,
    rows: Option<u16>,
}

pub async fn socket(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage, component)): Path<(String, String, String)>,
    Query(size): Query<SizeQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ConsoleError> {
    same_origin(&headers)?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(
            format!(
                "the terminal's socket takes a WebSocket upgrade: {}",
                e.body_text()
            ),
            "open the terminal from the stage page",
        )
    })?;
    let (cols, rows) = (size.cols.unwrap_or(80), size.rows.unwrap_or(24));
    let target = StreamTarget::Exec {
        component: component.clone(),
        replica: None,
        command: vec![SHELL.to_owned()],
        tty: true,
        cols,
        rows,
    };
    let route = crate::api::streams::open(
        &state, &caller, &project, &stage, &component, target, "terminal", SHELL,
    )
    .await?;
    // Relayed to another instance, it goes as the API's exec of the same
    // shell (the console's session is this instance's).
    let uri: axum::http::Uri = format!(
        "/projects/{project}/stages/{stage}/components/{component}/exec?command={SHELL}&tty=true&cols={cols}&rows={rows}"
    )
    .parse()
    .map_err(|e| ApiError::internal(format!("building the relayed request: {e}")))?;
    Ok(route.answer(&state, &caller, &uri, upgrade).await?)
}

/// Refuses a socket opened by a page of another origin.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or_default();
    if host.is_empty() || origin_host != host {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-origin",
            format!(
                "a terminal may be opened only from the console's own pages, not from {origin:?}"
            ),
            "open the terminal from the stage page",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_consoles_own_pages_open_a_terminal() {
        assert!(same_origin(&headers("hub:8443", Some("https://hub:8443"))).is_ok());
        assert!(same_origin(&headers("127.0.0.1:80", Some("http://127.0.0.1:80"))).is_ok());
        for (host, origin) in [
            ("hub:8443", Some("https://evil.example")),
            ("hub:8443", Some("https://hub:8443.evil.example")),
            ("hub:8443", Some("null")),
            ("hub:8443", None),
        ] {
            let e = same_origin(&headers(host, origin)).unwrap_err();
            assert_eq!((e.status, e.code), (StatusCode::FORBIDDEN, "cross-origin"));
        }
    }
}
