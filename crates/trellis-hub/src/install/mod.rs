//! `GET /install`: the shell script that installs an agent from this hub
//! (`install.sh`, rendered with the hub's URL and the pin of its TLS key),
//! and `GET /install/agent?machine=…`, which tells the script which binary
//! to download for what `uname -m` printed on the outpost.
//!
//! The script downloads the binary and runs its `install` subcommand, so
//! the unit file and the join live in the agent alone
//! (`trellis_agent::install`). Both endpoints need no credentials: the host
//! being installed has none but its join token, which the script hands to
//! the agent's join only.

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use trellis_model::agent_binary::arch_from_uname;

use crate::state::AppState;

const TEMPLATE: &str = include_str!("install.sh");

/// The script for the hub at `hub_url`, its downloads pinned to `pin`
/// (none: the host's trust store decides).
pub fn render(hub_url: &str, pin: Option<&str>) -> String {
    // Both values come from the hub itself (its public address, its key);
    // neither may hold a quote that would end the shell string.
    let clean = |s: &str| s.replace(['\'', '\\', '\n'], "");
    TEMPLATE
        .replace("@HUB_URL@", &clean(hub_url))
        .replace("@PIN@", &clean(pin.unwrap_or_default()))
}

/// The command that installs an agent with `token`, as `trellis create
/// outpost` prints it.
pub fn command(hub_url: &str, pin: Option<&str>, token: &str) -> String {
    match pin {
        Some(pin) => format!(
            "curl -fsSL -k --pinnedpubkey '{pin}' {hub_url}/install | sh -s -- --token {token}"
        ),
        None => format!("curl -fsSL {hub_url}/install | sh -s -- --token {token}"),
    }
}

pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/install", axum::routing::get(script))
        .route("/install/agent", axum::routing::get(agent))
        .with_state(state)
}

async fn script(State(state): State<AppState>) -> Response {
    let mut response = render(&state.public_url(), state.tls_pin()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/x-shellscript; charset=utf-8"),
    );
    response
}

#[derive(Deserialize)]
struct Machine {
    machine: Option<String>,
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// `VERSION ARCH SHA256` of the newest binary for the machine, one line of
/// plain text a shell `read`s; a refusal is a plain-text sentence.
async fn agent(State(state): State<AppState>, Query(q): Query<Machine>) -> Response {
    let machine = q.machine.unwrap_or_default();
    let shown: String = machine.chars().take(64).collect();
    let Some(arch) = arch_from_uname(&machine) else {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "this host's architecture ({shown:?}, from uname -m) is not one Trellis agents are built for (x86_64, aarch64, arm, riscv64, x86, powerpc64, s390x, loongarch64)\n"
            ),
        );
    };
    let mut newest = match crate::agent_binaries::newest(&state, arch).await {
        Ok(newest) => newest,
        Err(e) => return text(e.status, format!("{} ({})\n", e.message, e.hint)),
    };
    // A fresh hub offers the agent beside its own binary, for its own
    // architecture, without anything uploaded.
    if newest.is_none()
        && arch == std::env::consts::ARCH
        && let Some(path) = crate::agent_binaries::beside_this_executable()
    {
        match crate::agent_binaries::register_file(&state, &path).await {
            Ok(binary) => newest = Some(binary),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "the agent beside the hub's binary could not be offered");
            }
        }
    }
    match newest {
        Some(b) => text(
            StatusCode::OK,
            format!("{} {} {}\n", b.version, b.arch, b.sha256),
        ),
        None => text(
            StatusCode::NOT_FOUND,
            format!(
                "this hub holds no agent binary for {arch} (uname -m: {shown}); an administrator uploads one with `trellis upload agent-binary FILE --version VERSION --arch {arch}`\n"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_is_rendered_with_the_hub_and_its_pin() {
        let script = render("https://hub.example:7440", Some("sha256//abc="));
        assert!(script.contains("HUB='https://hub.example:7440'"));
        assert!(script.contains("PIN='sha256//abc='"));
        assert!(!script.contains("@HUB_URL@") && !script.contains("@PIN@"));
        let hostile = render("https://x'; rm -rf /; '", None);
        assert!(hostile.contains("HUB='https://x; rm -rf /; '"));
    }
}
