//! `/metrics` in the Prometheus text format: the figures an operator (and
//! the storm benchmark) watch. Aggregates only, so it needs no key.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::state::AppState;

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let links = state.links();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: usize| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        ));
    };
    gauge(
        "trellis_links_connected",
        "Outposts with a live link.",
        links.connected_count(),
    );
    gauge(
        "trellis_link_handshakes_in_flight",
        "TLS handshakes in progress.",
        links.handshakes.in_flight(),
    );
    gauge(
        "trellis_link_handshakes_peak",
        "Most TLS handshakes in progress at once since the hub started.",
        links.handshakes.peak(),
    );
    gauge(
        "trellis_link_handshake_limit",
        "TLS handshakes allowed in progress at once.",
        links.settings().max_handshakes,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
