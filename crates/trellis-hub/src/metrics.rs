//! `/metrics` in the Prometheus text format: the figures an operator (and
//! the fleet benchmarks) watch, per hub instance. Aggregates only, so it
//! needs no key.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::sync::atomic::Ordering;

use crate::state::AppState;

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let links = state.links();
    let cluster = state.cluster();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    let gauge = "gauge";
    let counter = "counter";
    metric(
        "trellis_links_connected",
        gauge,
        "Outposts with a live link to this hub instance (the links it holds).",
        links.connected_count().to_string(),
    );
    metric(
        "trellis_link_handshakes_in_flight",
        gauge,
        "TLS handshakes in progress.",
        links.handshakes.in_flight().to_string(),
    );
    metric(
        "trellis_link_handshakes_peak",
        gauge,
        "Most TLS handshakes in progress at once since the hub started.",
        links.handshakes.peak().to_string(),
    );
    metric(
        "trellis_link_handshake_limit",
        gauge,
        "TLS handshakes allowed in progress at once.",
        links.settings().max_handshakes.to_string(),
    );
    metric(
        "trellis_link_sessions_fenced_total",
        counter,
        "Sessions ended because a newer connection of their outpost replaced them, on this or another hub instance.",
        links.fenced.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "trellis_cluster_notifications_total",
        counter,
        "Changes this instance heard from the store shared with other hub instances.",
        cluster.notifications.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "trellis_cluster_notifications_missed_total",
        counter,
        "Times the store's change feed was interrupted and everything was checked again.",
        cluster.missed.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "trellis_cluster_forwarded_requests_total",
        counter,
        "Requests this instance forwarded to the instance holding an outpost's link.",
        cluster.forwarded.load(Ordering::Relaxed).to_string(),
    );
    if let Some(pool) = state.store().pool_stats() {
        metric(
            "trellis_store_pool_waits_total",
            counter,
            "Database calls that found no idle connection and waited for one.",
            pool.waits.to_string(),
        );
        metric(
            "trellis_store_pool_wait_seconds_total",
            counter,
            "Time database calls spent waiting for a connection.",
            format!("{:.6}", pool.wait_seconds),
        );
        metric(
            "trellis_store_pool_connections",
            gauge,
            "Database connections open in the pool.",
            pool.size.to_string(),
        );
        metric(
            "trellis_store_pool_idle",
            gauge,
            "Database connections open and idle.",
            pool.idle.to_string(),
        );
        metric(
            "trellis_store_pool_discarded_total",
            counter,
            "Database connections closed because they did not answer when handed back.",
            pool.discarded.to_string(),
        );
    }
    // Rollouts by state, from the store (every instance shows the same);
    // waves counted by the instance that drove them.
    if let Ok(rollouts) = state.store().list_rollouts(None).await {
        out.push_str("# HELP trellis_rollouts Rollouts by state.\n# TYPE trellis_rollouts gauge\n");
        for st in trellis_model::rollout::RolloutState::ALL {
            let n = rollouts.iter().filter(|r| r.state == st).count();
            out.push_str(&format!("trellis_rollouts{{state=\"{st}\"}} {n}\n"));
        }
    }
    // Where each outpost's latest agent update stands.
    if let Ok(updates) = state.store().latest_agent_updates().await {
        out.push_str("# HELP trellis_agent_updates Outposts by the state of their latest agent update.\n# TYPE trellis_agent_updates gauge\n");
        for st in trellis_model::agent_update::AgentUpdateState::ALL {
            let n = updates.iter().filter(|u| u.state == st).count();
            out.push_str(&format!("trellis_agent_updates{{state=\"{st}\"}} {n}\n"));
        }
    }
    let waves = state.rollout_counters();
    out.push_str("# HELP trellis_rollout_waves_total Rollout waves this instance started, and how they ended.\n# TYPE trellis_rollout_waves_total counter\n");
    for (what, n) in [
        ("started", &waves.waves_started),
        ("passed", &waves.waves_passed),
        ("halted", &waves.waves_halted),
    ] {
        out.push_str(&format!(
            "trellis_rollout_waves_total{{event=\"{what}\"}} {}\n",
            n.load(Ordering::Relaxed)
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
