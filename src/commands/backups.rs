//! `trellis create|list|get|delete|restore backup`: backups of a stage's
//! storage.

use std::time::Duration;

use anyhow::bail;
use trellis_hub::api::backups::CreateBackupRequest;
use trellis_model::{Backup, BackupState};

use crate::cli::OutputFormat;
use crate::client::{HubClient, seg};
use crate::output::{self, bytes, time};

/// How often a waiting command looks again.
const POLL: Duration = Duration::from_millis(500);

fn base(project: &str, stage: &str) -> String {
    format!("/projects/{}/stages/{}/backups", seg(project), seg(stage))
}

fn state_line(b: &Backup) -> String {
    if b.message.is_empty() {
        b.state.to_string()
    } else {
        format!("{}: {}", b.state, b.message)
    }
}

fn restore_line(b: &Backup) -> String {
    match &b.restore {
        None => String::new(),
        Some(r) if r.message.is_empty() => format!("{} ({})", r.state, time(&r.requested_at)),
        Some(r) => format!("{} ({}): {}", r.state, time(&r.requested_at), r.message),
    }
}

async fn get(client: &HubClient, project: &str, stage: &str, id: u64) -> anyhow::Result<Backup> {
    Ok(client
        .get(
            &format!("{}/{id}", base(project, stage)),
            "getting the backup",
        )
        .await?)
}

pub async fn create(
    client: &HubClient,
    project: &str,
    stage: &str,
    display_name: Option<String>,
    wait: bool,
) -> anyhow::Result<()> {
    let b: Backup = client
        .post(
            &base(project, stage),
            &CreateBackupRequest { display_name },
            "asking for a backup",
        )
        .await?;
    println!(
        "backup {} of stage {project}/{stage}: {}",
        b.id,
        state_line(&b)
    );
    if !wait {
        return Ok(());
    }
    let mut last = state_line(&b);
    loop {
        tokio::time::sleep(POLL).await;
        let b = get(client, project, stage, b.id).await?;
        let line = state_line(&b);
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        match b.state {
            BackupState::Completed => {
                println!(
                    "backup {} completed: {} in {} volume(s), {} uploaded",
                    b.id,
                    bytes(b.size),
                    b.volumes.len(),
                    bytes(b.uploaded)
                );
                return Ok(());
            }
            BackupState::Failed => bail!("backup {} failed: {}", b.id, b.message),
            BackupState::Pending | BackupState::Running => {}
        }
    }
}

pub async fn list(
    client: &HubClient,
    project: &str,
    stage: &str,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let items: Vec<Backup> = client.get(&base(project, stage), "listing backups").await?;
    output::list(
        format,
        &items,
        &[
            "id", "name", "state", "created", "size", "uploaded", "volumes", "restore",
        ],
        |b| {
            vec![
                b.id.to_string(),
                b.display_name.clone(),
                state_line(b),
                time(&b.created_at),
                bytes(b.size),
                bytes(b.uploaded),
                b.volumes.join(", "),
                restore_line(b),
            ]
        },
    )
}

pub async fn show(
    client: &HubClient,
    project: &str,
    stage: &str,
    id: &str,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let Ok(id) = id.parse::<u64>() else {
        bail!(
            "{id:?} is not a backup id; `trellis list backup -p {project} -s {stage}` shows them"
        );
    };
    let b = get(client, project, stage, id).await?;
    output::one(
        format,
        &b,
        &[
            ("id", b.id.to_string()),
            ("name", b.display_name.clone()),
            ("state", state_line(&b)),
            (
                "created",
                format!("{} by {}", time(&b.created_at), b.created_by),
            ),
            (
                "finished",
                b.finished_at.as_ref().map(time).unwrap_or_default(),
            ),
            ("size", bytes(b.size)),
            ("uploaded", bytes(b.uploaded)),
            ("volumes", b.volumes.join(", ")),
            ("restore", restore_line(&b)),
        ],
    )
}

pub async fn delete(
    client: &HubClient,
    project: &str,
    stage: &str,
    id: &str,
) -> anyhow::Result<()> {
    let Ok(id) = id.parse::<u64>() else {
        bail!(
            "{id:?} is not a backup id; `trellis list backup -p {project} -s {stage}` shows them"
        );
    };
    client
        .delete(
            &format!("{}/{id}", base(project, stage)),
            "deleting the backup",
        )
        .await?;
    println!("deleted backup {id} of stage {project}/{stage}");
    Ok(())
}

pub async fn restore(
    client: &HubClient,
    project: &str,
    stage: &str,
    id: u64,
    wait: bool,
) -> anyhow::Result<()> {
    let b: Backup = client
        .post(
            &format!("{}/{id}/restore", base(project, stage)),
            &serde_json::json!({}),
            "asking for a restore",
        )
        .await?;
    println!(
        "restore of backup {id} into stage {project}/{stage}: {}",
        restore_line(&b)
    );
    if !wait {
        return Ok(());
    }
    let mut last = restore_line(&b);
    loop {
        tokio::time::sleep(POLL).await;
        let b = get(client, project, stage, id).await?;
        let line = restore_line(&b);
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        let Some(r) = &b.restore else {
            bail!("the restore of backup {id} is no longer recorded");
        };
        match r.state {
            BackupState::Completed => {
                println!(
                    "restored backup {id} into stage {project}/{stage}; `trellis resume stage {stage} -p {project}` runs it again"
                );
                return Ok(());
            }
            BackupState::Failed => bail!("{}", r.message),
            BackupState::Pending | BackupState::Running => {}
        }
    }
}

/// `update stage --backup-schedule S --backup-keep N` (or, with `None`,
/// `--no-backup-schedule`).
pub async fn schedule(
    client: &HubClient,
    project: &str,
    stage: &str,
    schedule: Option<(String, u32)>,
) -> anyhow::Result<()> {
    let path = format!(
        "/projects/{}/stages/{}/backup-schedule",
        seg(project),
        seg(stage)
    );
    match schedule {
        Some((schedule, keep)) => {
            let set: trellis_model::BackupSchedule = client
                .put(
                    &path,
                    &serde_json::json!({"schedule": schedule, "keep": keep}),
                    "setting the backup schedule",
                )
                .await?;
            println!(
                "stage {project}/{stage} is backed up at {:?} (UTC), keeping the newest {} scheduled backups",
                set.schedule, set.keep
            );
        }
        None => {
            client.delete(&path, "removing the backup schedule").await?;
            println!("stage {project}/{stage} is no longer backed up on a schedule");
        }
    }
    Ok(())
}
