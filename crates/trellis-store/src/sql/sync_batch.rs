//! The sync writes — [`Store::record_sync_batch`](crate::Store::record_sync_batch),
//! and a lone delivery or report as a batch of one — as a few set-based
//! statements, whatever the batch's size.
//!
//! Written one at a time, a batch of 1,000 status reports was 2,000
//! statements under the write lock: about 0.1 s on SQLite, during which
//! every push request waited, and on PostgreSQL a network round trip
//! each. Here the updates go to the database as one JSON array per
//! statement.
//!
//! A batch must mean exactly its updates written one at a time, in order,
//! each answered with the record as it was right after it. So the batch is
//! cut into layers in which no stage appears twice: a stage's k-th update
//! is in layer k. Within a layer every row is written by at most one
//! update, so one statement per kind does what the updates would do one by
//! one; the layers run in order, so each stage's updates keep theirs. The
//! batches links send hold one or two updates per stage: one or two layers
//! of at most three statements.

use std::collections::HashMap;

use trellis_model::{ReleaseState, StageSync, Timestamp};

use super::conn::{Conn, q};
use super::{Dialect, backend, corrupt, fetch_sync, int, json, millis, require_stage, sync_from};
use crate::{Result, StoreError, SyncUpdate, wording};

const DOING: &str = "recording stages' sync";

/// Each update's answer, in order: `NotFound` for one whose stage (or
/// project) is gone — the statements leave such stages out, and writers
/// are serial, so none can go between that check and the write.
pub(super) async fn sync_batch_in<C: Conn + ?Sized>(
    c: &mut C,
    dialect: &Dialect,
    updates: &[SyncUpdate],
    now: Timestamp,
) -> Result<Vec<Result<StageSync>>> {
    let mut answers: Vec<Option<Result<StageSync>>> = updates.iter().map(|_| None).collect();
    for layer in layers(updates) {
        let (delivered, reports): (Vec<usize>, Vec<usize>) = layer
            .into_iter()
            .partition(|&i| matches!(updates[i], SyncUpdate::Delivered { .. }));
        if !delivered.is_empty() {
            let rows = delivered_rows(updates, &delivered)?;
            let mut written = upsert(c, &delivered_upsert(dialect), &rows, now).await?;
            for &i in &delivered {
                let (project, stage) = key(&updates[i]);
                answers[i] = Some(
                    match written.remove(&(project.to_owned(), stage.to_owned())) {
                        Some(sync) => Ok(sync),
                        None => Err(gone(c, project, stage).await),
                    },
                );
            }
        }
        if !reports.is_empty() {
            let rows = report_rows(updates, &reports, true)?;
            let mut written = upsert(c, &report_upsert(dialect), &rows, now).await?;
            let mut moved = Vec::with_capacity(written.len());
            for &i in &reports {
                let (project, stage) = key(&updates[i]);
                answers[i] = Some(
                    match written.remove(&(project.to_owned(), stage.to_owned())) {
                        Some(sync) => {
                            moved.push(i);
                            Ok(sync)
                        }
                        // Older than the report already recorded (arriving
                        // late): it changed nothing, and moves no release.
                        None => match fetch_sync(&mut *c, project, stage).await? {
                            Some(sync) => Ok(sync),
                            None => Err(gone(c, project, stage).await),
                        },
                    },
                );
            }
            if !moved.is_empty() {
                move_releases(c, dialect, &report_rows(updates, &moved, false)?).await?;
            }
        }
    }
    answers
        .into_iter()
        .map(|answer| answer.ok_or_else(|| corrupt("a batched sync update got no answer".into())))
        .collect()
}

fn key(update: &SyncUpdate) -> (&str, &str) {
    match update {
        SyncUpdate::Delivered { project, stage, .. }
        | SyncUpdate::Status { project, stage, .. } => (project, stage),
    }
}

/// The updates' indices by layer: layer k holds every stage's k-th update,
/// in the batch's order.
fn layers(updates: &[SyncUpdate]) -> Vec<Vec<usize>> {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::with_capacity(updates.len());
    let mut layers: Vec<Vec<usize>> = Vec::new();
    for (i, update) in updates.iter().enumerate() {
        let k = seen.entry(key(update)).or_insert(0);
        if layers.len() == *k {
            layers.push(Vec::new());
        }
        layers[*k].push(i);
        *k += 1;
    }
    layers
}

/// Why an update of a stage that the statement did not write failed: the
/// stage (or its project) is gone.
async fn gone<C: Conn + ?Sized>(c: &mut C, project: &str, stage: &str) -> StoreError {
    match require_stage(c, project, stage).await {
        Err(e) => e,
        Ok(_) => corrupt(format!(
            "{} exists, yet a write of its sync record matched nothing",
            wording::stage(project, stage)
        )),
    }
}

fn delivered_rows(updates: &[SyncUpdate], indices: &[usize]) -> Result<String> {
    let mut rows = Vec::with_capacity(indices.len());
    for &i in indices {
        if let SyncUpdate::Delivered {
            project,
            stage,
            revision,
        } = &updates[i]
        {
            rows.push(serde_json::json!({
                "project": project,
                "stage": stage,
                "revision": int(*revision)?,
            }));
        }
    }
    json(&rows)
}

/// The reports' rows; `with_report`: with the report itself (what the
/// release update does not need).
fn report_rows(updates: &[SyncUpdate], indices: &[usize], with_report: bool) -> Result<String> {
    let mut rows = Vec::with_capacity(indices.len());
    for &i in indices {
        if let SyncUpdate::Status {
            project,
            stage,
            applied_revision,
            failed_revision,
            report,
        } = &updates[i]
        {
            let mut row = release_row(project, stage, *applied_revision, *failed_revision)?;
            if with_report {
                // The column holds the report's JSON text.
                row["report"] = json(report)?.into();
            }
            rows.push(row);
        }
    }
    json(&rows)
}

/// A report's row for [`move_releases`].
fn release_row(
    project: &str,
    stage: &str,
    applied: u64,
    failed: Option<u64>,
) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "project": project,
        "stage": stage,
        "applied": int(applied)?,
        "failed": failed.map(int).transpose()?,
    }))
}

/// `SELECT … FROM` the rows of the JSON array in `$1`, with `fields` read
/// as `AS` names (`CAST(… AS BIGINT)` where the name ends in `#`).
fn rows_of(dialect: &Dialect, fields: &[&str]) -> String {
    let columns: Vec<String> = fields
        .iter()
        .map(|f| match f.strip_suffix('#') {
            Some(f) => format!("CAST({} AS BIGINT) AS {f}", dialect.json_field("value", f)),
            None => format!("{} AS {f}", dialect.json_field("value", f)),
        })
        .collect();
    format!(
        "SELECT {} FROM {}",
        columns.join(", "),
        dialect.json_rows("$1")
    )
}

/// Each row's sync record: inserted, or moved to the larger delivered
/// revision (in the statement, so it holds whatever order deliveries are
/// acknowledged in). Stages that are gone are left out, so they fail only
/// their own updates.
fn delivered_upsert(dialect: &Dialect) -> String {
    format!(
        concat!(
            "INSERT INTO stage_syncs (",
            sync_columns!(),
            ") SELECT u.project, u.stage, u.revision, 0, NULL, $2 FROM ({rows}) AS u \
             WHERE EXISTS (SELECT 1 FROM stages WHERE stages.project = u.project \
             AND stages.name = u.stage) \
             ON CONFLICT (project, stage) DO UPDATE SET \
             delivered_revision = CASE \
                 WHEN excluded.delivered_revision > stage_syncs.delivered_revision \
                 THEN excluded.delivered_revision ELSE stage_syncs.delivered_revision END, \
             updated_at = excluded.updated_at \
             RETURNING ",
            sync_columns!()
        ),
        rows = rows_of(dialect, &["project", "stage", "revision#"]),
    )
}

/// Each row's report, unless the record holds a newer one (a report that
/// arrives late changes nothing): only the rows written come back.
fn report_upsert(dialect: &Dialect) -> String {
    format!(
        concat!(
            "INSERT INTO stage_syncs (",
            sync_columns!(),
            ") SELECT u.project, u.stage, 0, u.applied, u.report, $2 FROM ({rows}) AS u \
             WHERE EXISTS (SELECT 1 FROM stages WHERE stages.project = u.project \
             AND stages.name = u.stage) \
             ON CONFLICT (project, stage) DO UPDATE SET \
             applied_revision = excluded.applied_revision, report = excluded.report, \
             updated_at = excluded.updated_at \
             WHERE excluded.applied_revision >= stage_syncs.applied_revision \
             RETURNING ",
            sync_columns!()
        ),
        rows = rows_of(dialect, &["project", "stage", "applied#", "report"]),
    )
}

/// Runs an upsert of `rows` at `now`; the records it wrote, by stage.
async fn upsert<C: Conn + ?Sized>(
    c: &mut C,
    statement: &str,
    rows: &str,
    now: Timestamp,
) -> Result<HashMap<(String, String), StageSync>> {
    let written = q(statement)
        .bind(rows)
        .bind(millis(now))
        .fetch_all(&mut *c)
        .await
        .map_err(backend(DOING))?;
    let mut by_stage = HashMap::with_capacity(written.len());
    for row in &written {
        let sync = sync_from(row)?;
        by_stage.insert((sync.project.clone(), sync.stage.clone()), sync);
    }
    Ok(by_stage)
}

/// Moves the release states of the stages whose reports `rows` were
/// written ([`release_row`]s in a JSON array).
///
/// The release a stage runs at the applied revision (`running`) is the
/// newest one at or below it: revisions that carry no release (suspend,
/// resume, component start/stop/restart) keep it running; nothing running
/// (revision 0) moves no release. It becomes `applied`, older `applied`
/// ones `replaced`, older `pending` ones `superseded` (they never ran) —
/// unless the report is a failure: the agent runs what it restored or kept,
/// which a report before made `applied`, so a failure promotes and
/// replaces nothing. (A failure about an older revision can arrive after a
/// newer one was delivered, naming the newer as failed: its applied
/// revision is then the one rolled back from, and taking it for running
/// marked a refused release applied.) The failed revision's release is
/// `failed` whatever else holds.
///
/// Every step finds its rows without reading the stage's history: a
/// stage's releases take revisions in the order of their numbers, so the
/// running and the failed release are found walking back from the newest
/// by number (a step or two); the older `applied` and `pending` ones are
/// in their partial indexes (migration 0016), which only a state written
/// into the statement selects. One statement comparing every release of
/// the stage cost a batch of 1,000 reports 26 ms at 40 releases a stage
/// and 200 ms at 365. The steps go in an order in which none undoes
/// another: the two that move older releases select by the old state,
/// and set states the last two, selecting by number, overwrite only on
/// the release that failed.
async fn move_releases<C: Conn + ?Sized>(c: &mut C, dialect: &Dialect, rows: &str) -> Result<()> {
    use ReleaseState::{Applied, Failed, Pending, Replaced, Superseded};
    // `running` and `failed` are worked out once per report
    // (materialised): left to the planner, SQLite inlined them into every
    // condition that names them, once per release row.
    let reports = format!(
        "WITH u AS MATERIALIZED ( \
             SELECT a.project, a.stage, \
                 (SELECT r.number FROM releases AS r WHERE r.project = a.project \
                  AND r.stage = a.stage AND r.revision <= a.applied \
                  ORDER BY r.number DESC LIMIT 1) AS running, \
                 CASE WHEN a.failed IS NULL THEN NULL ELSE \
                 (SELECT r.number FROM releases AS r WHERE r.project = a.project \
                  AND r.stage = a.stage AND r.revision = a.failed \
                  ORDER BY r.number DESC LIMIT 1) END AS failed, \
                 a.failed IS NULL AS clean \
             FROM ({rows}) AS a)",
        rows = rows_of(dialect, &["project", "stage", "applied#", "failed#"]),
    );
    let of_stage = "releases.project = u.project AND releases.stage = u.stage";
    let not_failed = "(u.failed IS NULL OR releases.number <> u.failed)";
    let steps = [
        // Older pending ones never ran.
        format!(
            "UPDATE releases SET state = '{}' FROM u WHERE {of_stage} \
             AND releases.state = '{}' AND releases.number < u.running AND {not_failed}",
            Superseded.as_str(),
            Pending.as_str(),
        ),
        // Older applied ones are replaced, unless this is a failure.
        format!(
            "UPDATE releases SET state = '{}' FROM u WHERE {of_stage} \
             AND releases.state = '{}' AND releases.number < u.running AND u.clean",
            Replaced.as_str(),
            Applied.as_str(),
        ),
        format!(
            "UPDATE releases SET state = '{}' FROM u WHERE {of_stage} \
             AND releases.number = u.running AND u.clean",
            Applied.as_str(),
        ),
        format!(
            "UPDATE releases SET state = '{}' FROM u WHERE {of_stage} \
             AND releases.number = u.failed",
            Failed.as_str(),
        ),
    ];
    for step in steps {
        q(&format!("{reports} {step}"))
            .bind(rows)
            .execute(&mut *c)
            .await
            .map_err(backend(DOING))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(stage: &str) -> SyncUpdate {
        SyncUpdate::Delivered {
            project: "shop".into(),
            stage: stage.into(),
            revision: 1,
        }
    }

    #[test]
    fn layers_keep_each_stages_order_and_never_hold_a_stage_twice() {
        let updates = [
            delivered("a"),
            delivered("b"),
            delivered("a"),
            delivered("a"),
            delivered("c"),
            delivered("b"),
        ];
        assert_eq!(layers(&updates), vec![vec![0, 1, 4], vec![2, 5], vec![3]]);
        assert!(layers(&[]).is_empty());
    }
}
