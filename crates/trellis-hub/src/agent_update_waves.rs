//! Agent updates in waves: the rollout driver ([`crate::rollouts::run`])
//! calls [`round`] with its own, so one hub instance at a time judges every
//! request that still has updates waiting for their wave, as soon as an
//! agent's report was recorded on this instance and at every tick.
//!
//! Everything is in the store (the requests' updates), so a hub killed at
//! any point carries on where it was. The steps are safe to repeat: a wave
//! is sent by turning its `waiting` updates `pending` (a second send finds
//! none waiting), and a halt turns only those still waiting `halted`.

use chrono::Utc;
use trellis_model::agent_update::{AgentUpdate, AgentUpdateState, judge_wave, wave_timed_out};
use trellis_model::rollout::Verdict;
use trellis_store::StoreError;

use crate::rollouts::Online;
use crate::state::AppState;

/// Judges the sent wave of every request that has updates waiting, and
/// sends the next wave or halts the rest. `settled`: the driver has run
/// long enough for agents to have linked again after a restart; until
/// then no wave is sent (its offline outposts would be carried along only
/// because they had not linked yet).
pub async fn round(state: &AppState, settled: bool) -> Result<(), StoreError> {
    let batches = state.store().waiting_agent_update_batches().await?;
    if batches.is_empty() {
        return Ok(());
    }
    let online = Online::read(state).await?;
    for batch in batches {
        let updates = state.store().agent_update_batch(batch).await?;
        if let Err(e) = advance(state, batch, &updates, &online, settled).await {
            tracing::warn!(batch, error = %e, "could not advance an agent update's waves");
        }
    }
    Ok(())
}

async fn advance(
    state: &AppState,
    batch: u64,
    updates: &[AgentUpdate],
    online: &Online<'_>,
    settled: bool,
) -> Result<(), StoreError> {
    // The next wave is the first with updates waiting; the last one sent
    // (waves are sent in order, and one may be empty) is judged.
    let Some(next) = updates
        .iter()
        .filter(|u| u.state == AgentUpdateState::Waiting)
        .map(|u| u.wave)
        .min()
    else {
        return Ok(());
    };
    let sent = updates
        .iter()
        .filter(|u| u.state != AgentUpdateState::Waiting)
        .map(|u| u.wave)
        .max();
    let threshold = updates
        .first()
        .map_or(trellis_model::rollout::ALL, |u| u.threshold_bp);
    let verdict = match sent {
        Some(sent) => {
            let wave: Vec<&AgentUpdate> = updates.iter().filter(|u| u.wave == sent).collect();
            judge_wave(sent, &wave, threshold, wave_timed_out(&wave, Utc::now()))
        }
        None => Verdict::Pass,
    };
    match verdict {
        Verdict::Watch => Ok(()),
        Verdict::Halt(why) => {
            let why = format!("not sent: {why}");
            let halted = state
                .store()
                .halt_agent_update_batch(batch, &why, Utc::now())
                .await?;
            if !halted.is_empty() {
                tracing::warn!(batch, halted = halted.len(), reason = %why, "agent update halted");
            }
            Ok(())
        }
        Verdict::Pass if !settled => Ok(()),
        Verdict::Pass => {
            let offline: Vec<String> = updates
                .iter()
                .filter(|u| u.wave == next && !online.has(&u.outpost))
                .map(|u| u.outpost.clone())
                .collect();
            let released = state
                .store()
                .release_agent_update_wave(batch, next, &offline, Utc::now())
                .await?;
            for u in &released {
                state.links().poke(&u.outpost);
            }
            if !released.is_empty() {
                tracing::info!(
                    batch,
                    wave = next + 1,
                    outposts = released.len(),
                    carried = offline.len(),
                    "agent update wave sent"
                );
            }
            Ok(())
        }
    }
}
