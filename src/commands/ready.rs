//! `trellis push release --when-ready`: waiting until pushed releases run
//! on their stages' outposts, as a CI/CD pipeline needs.
//!
//! The release's state on the hub says how it ended: `applied` (or
//! `replaced`: it ran, and something newer runs now) once its outpost
//! reported it up past its health window; `failed` when it did not come up
//! and the outpost rolled back; `superseded` when a newer release came
//! before it ran. Meanwhile the stage's connection status says what it
//! waits for — its outpost's link, the delivery of its artifacts — and a
//! line is printed (on stderr, so stdout stays the push's) whenever that
//! changes.

use std::time::{Duration, Instant};

use trellis_hub::link::status::{StageStatus, SyncState};
use trellis_model::{Release, ReleaseState};

use crate::client::{ClientError, HubClient, seg};

/// How often the hub is asked.
const POLL: Duration = Duration::from_millis(500);

/// Waits for every release in `releases`; fails with the first that
/// fails, or at `timeout`.
pub async fn wait(
    client: &HubClient,
    releases: &[Release],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut waiting: Vec<Watch> = releases.iter().map(Watch::new).collect();
    while !waiting.is_empty() {
        let mut still = Vec::with_capacity(waiting.len());
        for mut watch in waiting {
            if !watch.check(client).await? {
                still.push(watch);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let stuck: Vec<String> = waiting.iter().map(Watch::describe).collect();
            return Err(ClientError::Unavailable {
                code: "timeout".into(),
                message: format!(
                    "timed out after {} waiting for {}",
                    humanize(timeout),
                    stuck.join("; ")
                ),
                hint: "the releases stay pushed and their outposts apply them when they can; \
                       `trellis status stage STAGE -p PROJECT` shows how far they came, \
                       --timeout waits longer"
                    .into(),
            }
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// One pushed release being waited for.
struct Watch {
    release: Release,
    /// The last progress line printed, so each is printed once.
    shown: String,
    status: Option<StageStatus>,
}

impl Watch {
    fn new(release: &Release) -> Watch {
        Watch {
            release: release.clone(),
            shown: String::new(),
            status: None,
        }
    }

    fn path(&self) -> String {
        format!(
            "/projects/{}/stages/{}",
            seg(&self.release.project),
            seg(&self.release.stage)
        )
    }

    /// Whether the release is done (`Ok(true)`), still coming (`Ok(false)`),
    /// or failed (the error says why).
    async fn check(&mut self, client: &HubClient) -> anyhow::Result<bool> {
        let r = &self.release;
        let now: Release = client
            .get(
                &format!("{}/releases/{}", self.path(), r.number),
                "checking the release",
            )
            .await?;
        let status: StageStatus = client
            .get(
                &format!("{}/outpost-status", self.path()),
                "checking the stage's status",
            )
            .await?;
        match now.state {
            ReleaseState::Applied | ReleaseState::Replaced => {
                println!(
                    "release {} of stage {} runs on outpost {} (revision {})",
                    r.number, r.stage, status.outpost, now.revision
                );
                return Ok(true);
            }
            ReleaseState::Failed => {
                let reason = status
                    .sync
                    .message
                    .clone()
                    .unwrap_or_else(|| "its outpost reported it failed".into());
                let back = match status.sync.rolled_back_to {
                    Some(0) => "; the outpost emptied the stage, as nothing ran before".to_owned(),
                    Some(n) => format!("; the outpost rolled back to release {n}"),
                    None => String::new(),
                };
                anyhow::bail!(
                    "release {} of stage {} failed on outpost {}: {reason}{back}\nhint: \
                     `trellis logs stage {} -p {}` shows what its components wrote, `trellis \
                     status stage {} -p {}` its errors",
                    r.number,
                    r.stage,
                    status.outpost,
                    r.stage,
                    r.project,
                    r.stage,
                    r.project
                );
            }
            ReleaseState::Superseded => {
                anyhow::bail!(
                    "release {} of stage {} never ran: a newer release (desired revision {}) came \
                     before its outpost applied it\nhint: wait for the newer one (`trellis list \
                     release -p {} -s {}`)",
                    r.number,
                    r.stage,
                    status.sync.desired_revision,
                    r.project,
                    r.stage
                );
            }
            ReleaseState::Pending => {}
        }
        let line = progress(&status);
        if line != self.shown {
            eprintln!("stage {}: {line}", r.stage);
            self.shown = line;
        }
        self.status = Some(status);
        Ok(false)
    }

    /// What it waits for, for a timeout's message.
    fn describe(&self) -> String {
        let what = self
            .status
            .as_ref()
            .map(progress)
            .unwrap_or_else(|| "no status yet".into());
        format!(
            "release {} of stage {} ({what})",
            self.release.number, self.release.stage
        )
    }
}

/// The stage's progress in words: its sync state and what it waits for.
fn progress(s: &StageStatus) -> String {
    let state = s.sync.state.as_str();
    match s.sync.state {
        SyncState::PendingDelivery | SyncState::Linking => {
            let seen = s
                .link
                .last_seen
                .map(|t| format!(", last seen {}", crate::output::time(&t)))
                .unwrap_or_default();
            format!(
                "{state}: outpost {} is not connected{seen}; the release waits for its link",
                s.outpost
            )
        }
        SyncState::Syncing => match &s.sync.delivery {
            Some(d) if d.revision >= s.sync.desired_revision && d.total > 0 => {
                // Whole percents, so a line is printed per percent at most.
                let percent = d.fetched.saturating_mul(100) / d.total;
                format!(
                    "{state}: delivery {} of {} ({percent}%), {}",
                    crate::output::bytes(d.fetched),
                    crate::output::bytes(d.total),
                    d.step
                )
            }
            _ => format!(
                "{state}: outpost {} applies revision {} (its health window runs)",
                s.outpost, s.sync.desired_revision
            ),
        },
        _ => format!("{state} (revision {})", s.sync.applied_revision),
    }
}

fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}
