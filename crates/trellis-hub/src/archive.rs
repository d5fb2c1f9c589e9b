//! The end of an archive's retention: projects and stages deleted (so
//! archived) longer ago than the retention period are purged — deleted for
//! good with their releases and configs, and their outposts told to forget
//! them (which removes their volumes).
//!
//! Deleting archives (`api/projects.rs`, `api/stages.rs`); the store keeps
//! when (`archived_at`). A task looks every quarter of the period (at most
//! hourly, at least every second) for what is due.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// How long archived projects and stages are kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The purge job: looks for what is due until `cancel` fires. On a store
/// several hubs share one instance runs it at a time (`cluster::lead`).
pub async fn run(state: AppState, retention: Duration, cancel: CancellationToken) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match purge_expired(&state, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                purged = n,
                "purged archived projects and stages past their retention"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "purging archived projects and stages failed; trying again later")
            }
        }
    }
}

/// Purges what was archived more than `retention` ago; returns how many
/// projects and stages went.
pub async fn purge_expired(
    state: &AppState,
    retention: Duration,
) -> Result<usize, trellis_store::StoreError> {
    let cutoff =
        Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let store = state.store();
    let mut purged = 0;
    for project in store.list_projects().await? {
        let stages = store.list_stages(&project.name).await?;
        if project.archived_at.is_some_and(|at| at < cutoff) {
            store.delete_project(&project.name, true).await?;
            for stage in &stages {
                state.links().poke(&stage.outpost);
            }
            purged += 1;
            continue;
        }
        for stage in stages {
            if stage.archived_at.is_some_and(|at| at < cutoff) {
                store
                    .delete_stage(&stage.project, &stage.name, true)
                    .await?;
                state.links().poke(&stage.outpost);
                purged += 1;
            }
        }
    }
    Ok(purged)
}
