//! The batched and narrowed reads and writes of [`Store`] in terms of its
//! one-at-a-time methods: what they mean, and what a store with nothing
//! faster (the in-memory one) answers them with.
//!
//! The trait has no defaults for these on purpose. A default would let a
//! store that wraps another (the hub's sealing layer) forget to pass a batch
//! on, and quietly turn one read of 10,000 outposts into 10,000 reads; each
//! implementation says what it does instead.

use std::collections::HashSet;

use crate::{
    DesiredAsk, LinkActivity, OutpostStage, Result, Stage, StageFilter, StageSummary, StageSync,
    Store, StoreError, SyncUpdate, Timestamp,
};

/// [`Store::outposts_desired`]: one read per outpost.
pub async fn outposts_desired(
    store: &dyn Store,
    asks: &[DesiredAsk],
) -> Result<Vec<Result<Vec<OutpostStage>>>> {
    let mut answers = Vec::with_capacity(asks.len());
    for ask in asks {
        answers.push(store.outpost_desired(&ask.outpost, &ask.held).await);
    }
    Ok(answers)
}

/// [`Store::list_archived_stages`]: every stage read, the archived kept.
pub async fn list_archived_stages(store: &dyn Store, project: &str) -> Result<Vec<Stage>> {
    Ok(store
        .list_stages(project)
        .await?
        .into_iter()
        .filter(|s| s.archived_at.is_some())
        .collect())
}

/// [`Store::stage_summaries_named`]: every summary read, the named kept.
pub async fn stage_summaries_named(
    store: &dyn Store,
    project: &str,
    names: &[String],
) -> Result<Vec<StageSummary>> {
    let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
    Ok(store
        .list_stage_summaries(project, StageFilter::All)
        .await?
        .into_iter()
        .filter(|s| wanted.contains(s.stage.name.as_str()))
        .collect())
}

/// [`Store::record_link_activity`]: each link record read and written back.
pub async fn record_link_activity(store: &dyn Store, activity: &[LinkActivity]) -> Result<()> {
    for a in activity {
        let mut link = match store.get_outpost_link(&a.outpost).await {
            Ok(link) => link,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        a.apply_to(&mut link);
        match store.put_outpost_link(&link).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`Store::record_sync_batch`]: one write per update.
pub async fn record_sync_batch(
    store: &dyn Store,
    updates: &[SyncUpdate],
    now: Timestamp,
) -> Result<Vec<Result<StageSync>>> {
    let mut results = Vec::with_capacity(updates.len());
    for update in updates {
        let result = match update {
            SyncUpdate::Delivered {
                project,
                stage,
                revision,
            } => store.record_delivered(project, stage, *revision, now).await,
            SyncUpdate::Status {
                project,
                stage,
                applied_revision,
                failed_revision,
                report,
            } => {
                store
                    .record_status(
                        project,
                        stage,
                        *applied_revision,
                        *failed_revision,
                        report,
                        now,
                    )
                    .await
            }
        };
        match result {
            Err(e @ StoreError::NotFound { .. }) => results.push(Err(e)),
            Err(e) => return Err(e),
            Ok(sync) => results.push(Ok(sync)),
        }
    }
    Ok(results)
}
