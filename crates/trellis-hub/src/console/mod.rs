//! The browser console: server-rendered pages over the same handlers the
//! API uses, with a little JavaScript where it helps (validating an Outpost
//! URI in place, the live connection-status popup, following logs). Every
//! page works without the script; the assets are embedded in the binary, so
//! the console works air-gapped.
//!
//! # Layout
//! - `session.rs`: signing in with an access key, the session cookie, the
//!   same-origin check on changes.
//! - `projects.rs`: the project list and a project's stages.
//! - `stages.rs`: creating a stage (with Outpost URI validation) and the
//!   stage page with its actions.
//! - `status.rs`: the connection status of an outpost stage, as a page, a
//!   fragment and a live event stream.
//! - `terminal.rs`: a shell in a component (xterm.js over a stream).
//! - `outposts.rs`: outposts, for administrators.
//! - `rollouts.rs`: a rollout's waves and stages, and its actions.
//! - `view.rs`: formatting helpers.
//!
//! Templates are in `templates/` (compile-checked by askama), assets in
//! `assets/`.

mod outposts;
mod projects;
mod rollouts;
mod session;
mod stages;
mod status;
mod terminal;
pub mod view;

use std::sync::LazyLock;

use askama::Template;
use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

pub use session::{COOKIE as SESSION_COOKIE, LIFETIME_SECS as SESSION_LIFETIME_SECS};

/// Scripts set this header when they ask for a fragment of a page rather
/// than a whole page.
pub const FRAGMENT_HEADER: &str = "x-trellis-fragment";

/// The console's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/projects") }))
        .route("/login", get(session::login_form).post(session::login))
        .route("/logout", post(session::logout))
        .route("/assets/{name}", get(asset))
        .route("/projects", get(projects::list).post(projects::create))
        .route("/projects/{project}", get(projects::show))
        .route("/projects/{project}/stages/new", get(stages::new_form))
        .route("/projects/{project}/stages", post(stages::create))
        .route(
            "/projects/{project}/stages/validate",
            post(stages::validate),
        )
        .route("/projects/{project}/stages/{stage}", get(stages::show))
        .route(
            "/projects/{project}/stages/{stage}/releases",
            post(stages::push_release),
        )
        .route(
            "/projects/{project}/stages/{stage}/components/{component}/{action}",
            post(stages::control_component),
        )
        .route(
            "/projects/{project}/stages/{stage}/suspend",
            post(stages::suspend),
        )
        .route(
            "/projects/{project}/stages/{stage}/resume",
            post(stages::resume),
        )
        .route("/projects/{project}/stages/{stage}/logs", get(stages::logs))
        .route(
            "/projects/{project}/stages/{stage}/components/{component}/terminal",
            get(terminal::page),
        )
        .route(
            "/projects/{project}/stages/{stage}/components/{component}/terminal/socket",
            get(terminal::socket),
        )
        .route(
            "/projects/{project}/stages/{stage}/status",
            get(status::page),
        )
        .route(
            "/projects/{project}/stages/{stage}/status/events",
            get(status::events),
        )
        .route("/rollouts/{id}", get(rollouts::show))
        .route("/rollouts/{id}/{action}", post(rollouts::act))
        .route("/outposts", get(outposts::list).post(outposts::create))
        .route("/outposts/{outpost}", get(outposts::show))
        .route("/outposts/{outpost}/rotate", post(outposts::rotate))
        .route("/outposts/{outpost}/revoke", post(outposts::revoke))
        .route("/outposts/{outpost}/join-token", post(outposts::join_token))
        .route(
            "/outposts/{outpost}/link-profile",
            post(outposts::link_profile),
        )
        .layer(axum::middleware::from_fn(session::same_origin))
        .with_state(state)
}

/// The frame every page shares: title, who is signed in, the navigation.
pub struct Page {
    pub title: String,
    pub user: Option<String>,
    pub admin: bool,
    /// `projects` or `outposts`: which navigation entry is current.
    pub section: &'static str,
    pub css: &'static str,
    pub js: &'static str,
    pub version: &'static str,
}

impl Page {
    pub fn anonymous(title: impl Into<String>) -> Page {
        Page {
            title: title.into(),
            user: None,
            admin: false,
            section: "",
            css: &ASSETS.css_url,
            js: &ASSETS.js_url,
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    pub fn signed(title: impl Into<String>, caller: &Caller, section: &'static str) -> Page {
        Page {
            user: Some(caller.user.clone()),
            admin: caller.admin,
            section,
            ..Page::anonymous(title)
        }
    }
}

/// Renders a template into an HTML response.
pub fn render(template: &impl Template) -> Result<Html<String>, ConsoleError> {
    template.render().map(Html).map_err(|e| {
        ConsoleError::from(ApiError::internal(format!(
            "rendering a console page failed: {e}"
        )))
    })
}

/// An error as a page: what happened, the stable code, what to try. The
/// console's errors are the API's, shown to a person.
#[derive(Debug)]
pub struct ConsoleError(pub ApiError);

impl From<ApiError> for ConsoleError {
    fn from(e: ApiError) -> Self {
        ConsoleError(e)
    }
}

impl From<trellis_store::StoreError> for ConsoleError {
    fn from(e: trellis_store::StoreError) -> Self {
        ConsoleError(e.into())
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    page: Page,
    error: &'a ApiError,
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let error = &self.0;
        if error.status.is_server_error() {
            tracing::warn!(code = error.code, message = %error.message, "console request failed");
        }
        let page = ErrorPage {
            page: Page::anonymous(format!("Error: {}", error.code)),
            error,
        };
        match page.render() {
            Ok(html) => (error.status, Html(html)).into_response(),
            Err(_) => (error.status, format!("{}: {}", error.message, error.hint)).into_response(),
        }
    }
}

/// A submitted form; one that cannot be read gets the error page, not
/// axum's plain-text rejection.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Form), rejection(ConsoleError))]
pub struct Form<T>(pub T);

impl From<axum::extract::rejection::FormRejection> for ConsoleError {
    fn from(rejection: axum::extract::rejection::FormRejection) -> Self {
        let mut error = ApiError::bad_request(
            format!("the form was not understood: {}", rejection.body_text()),
            "submit the form from the console's own page",
        );
        error.status = rejection.status();
        ConsoleError(error)
    }
}

/// The embedded assets and their cache-busting URLs.
struct Assets {
    css_url: String,
    js_url: String,
    xterm_js_url: String,
    xterm_css_url: String,
}

const CSS: &str = include_str!("../../assets/console.css");
const JS: &str = include_str!("../../assets/console.js");
/// The terminal emulator, vendored from npm (see `assets/vendor/README.md`).
const XTERM_JS: &str = include_str!("../../assets/vendor/xterm.js");
const XTERM_CSS: &str = include_str!("../../assets/vendor/xterm.css");

static ASSETS: LazyLock<Assets> = LazyLock::new(|| {
    let tag = |text: &str| blake3::hash(text.as_bytes()).to_hex()[..12].to_owned();
    Assets {
        css_url: format!("/assets/console.css?v={}", tag(CSS)),
        js_url: format!("/assets/console.js?v={}", tag(JS)),
        xterm_js_url: format!("/assets/xterm.js?v={}", tag(XTERM_JS)),
        xterm_css_url: format!("/assets/xterm.css?v={}", tag(XTERM_CSS)),
    }
});

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        "xterm.js" => (XTERM_JS, "text/javascript; charset=utf-8"),
        "xterm.css" => (XTERM_CSS, "text/css; charset=utf-8"),
        _ => {
            return ConsoleError(ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("the console has no asset {name:?}"),
                "reload the page; it names the assets this hub serves",
            ))
            .into_response();
        }
    };
    // URLs carry the content's hash, so a cached copy is never stale.
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

/// Whether a script asked for a fragment rather than a page.
pub fn wants_fragment(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(FRAGMENT_HEADER)
}
