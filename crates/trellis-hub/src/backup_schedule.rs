//! Scheduled backups: per stage a cron schedule (UTC) and how many
//! scheduled backups to keep (`PUT …/stages/{s}/backup-schedule`,
//! `trellis update stage --backup-schedule --backup-keep`). One hub
//! instance at a time ([`run`], under the job lock `backup-schedule`)
//! looks every few seconds for schedules whose next time after their last
//! run has come, asks for a backup of the stage as a user would (skipped,
//! and tried at the next time, while another backup or restore of the
//! stage is open), and deletes the oldest completed scheduled backups
//! beyond the count. Backups made by hand are never deleted by it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use trellis_model::{BackupSchedule, BackupState, NewBackup};

use crate::state::AppState;

/// How often schedules are looked at.
const TICK: Duration = Duration::from_secs(1);

/// Who scheduled backups are recorded as made by, and their display name.
pub const SCHEDULER: &str = "schedule";

/// The first time of `expr` after `after`; the error says what is wrong.
pub fn next_time(expr: &str, after: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| {
            format!(
                "{expr:?} is not a cron schedule ({e}); give five fields, minute hour day month weekday (e.g. \"0 3 * * *\"), or six with seconds first"
            )
        })?;
    cron.find_next_occurrence(&after, false)
        .map_err(|e| format!("{expr:?} never comes after {after} ({e})"))
}

/// Looks at the schedules every [`TICK`] until `cancel`.
pub async fn run(state: AppState, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = round(&state).await {
            tracing::warn!(error = %e, "could not look at the backup schedules");
        }
    }
}

async fn round(state: &AppState) -> Result<(), trellis_store::StoreError> {
    let now = Utc::now();
    for schedule in state.store().list_backup_schedules().await? {
        let Ok(next) = next_time(&schedule.schedule, schedule.last_run) else {
            continue;
        };
        if next > now {
            continue;
        }
        let mut ran = schedule.clone();
        ran.last_run = now;
        state
            .store()
            .set_backup_schedule(&schedule.project, &schedule.stage, Some(&ran))
            .await?;
        due(state, &schedule, now).await?;
    }
    Ok(())
}

async fn due(
    state: &AppState,
    schedule: &BackupSchedule,
    now: DateTime<Utc>,
) -> Result<(), trellis_store::StoreError> {
    let (project, stage) = (&schedule.project, &schedule.stage);
    let record = state.store().get_stage(project, stage).await?;
    let backups = state.store().list_backups(project, stage).await?;
    // Retention first: the newest `keep` completed scheduled ones stay.
    let scheduled: Vec<_> = backups
        .iter()
        .filter(|b| b.created_by == SCHEDULER && b.state == BackupState::Completed)
        .filter(|b| !b.restore.as_ref().is_some_and(|r| r.state.is_open()))
        .collect();
    // The backup about to be made counts as one of them.
    let keep = usize::try_from(schedule.keep.saturating_sub(1)).unwrap_or(usize::MAX);
    for old in scheduled.iter().skip(keep) {
        state.store().delete_backup(project, stage, old.id).await?;
        tracing::info!(%project, %stage, id = old.id, "deleted a scheduled backup beyond the count kept");
    }
    let busy = backups
        .iter()
        .any(|b| b.state.is_open() || b.restore.as_ref().is_some_and(|r| r.state.is_open()));
    if busy || record.archived_at.is_some() {
        tracing::info!(%project, %stage, "a scheduled backup is skipped: the stage is busy or archived");
        return Ok(());
    }
    let linked = crate::link::status::link_view(state, &record.outpost)
        .await
        .map(|v| v.state.is_connected())
        .unwrap_or(false);
    let backup = state
        .store()
        .create_backup(&NewBackup {
            project: project.clone(),
            stage: stage.clone(),
            display_name: format!("scheduled {}", now.format("%Y-%m-%d %H:%M:%S")),
            message: if linked {
                String::new()
            } else {
                format!(
                    "waits for outpost {:?}: it is not linked to the hub now; the work starts when it links",
                    record.outpost
                )
            },
            created_at: now,
            created_by: SCHEDULER.to_owned(),
        })
        .await?;
    tracing::info!(%project, %stage, id = backup.id, "scheduled backup asked for");
    state.links().poke(&record.outpost);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_or_six_fields() {
        assert_eq!(
            next_time("0 3 * * *", at("2026-03-01T10:00:00Z")).unwrap(),
            at("2026-03-02T03:00:00Z")
        );
        assert_eq!(
            next_time("*/5 * * * * *", at("2026-03-01T10:00:01Z")).unwrap(),
            at("2026-03-01T10:00:05Z")
        );
        assert!(next_time("every night", at("2026-03-01T10:00:00Z")).is_err());
    }
}
