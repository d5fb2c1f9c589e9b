//! Agent updates over the link: the hub sends an outpost's open update
//! ([`Message::AgentUpdate`]) to its agent and records what the agent
//! reports ([`Message::AgentUpdateState`]), acknowledging the final state.
//! The binary travels as chunks of an artifact, fetched by the agent like a
//! release's (`/api/v1/agent/chunks/…`, mutual TLS).

use std::collections::HashSet;

use chrono::Utc;
use trellis_link::Message;
use trellis_model::agent_update::{AgentUpdate, AgentUpdateState};

use crate::state::AppState;

/// What a session knows of the outpost's updates.
pub(super) struct Updates {
    /// The updates sent this session (`None`: the agent cannot update
    /// itself). The store says what is open; an update is sent once per
    /// session, so a reconnect sends it again.
    sent: Option<HashSet<u64>>,
}

impl Updates {
    pub(super) fn new(agent_updates_itself: bool) -> Self {
        Updates {
            sent: agent_updates_itself.then(HashSet::new),
        }
    }

    /// The frame to send for the outpost's open update, if there is one
    /// this session has not sent. Nothing is read for an agent that cannot
    /// update itself (updates are refused for it when asked).
    pub(super) async fn due(
        &mut self,
        state: &AppState,
        outpost: &str,
    ) -> Result<Option<Message>, String> {
        let Some(sent) = &mut self.sent else {
            return Ok(None);
        };
        let Some(update) = state
            .store()
            .open_agent_update(outpost)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        // Its wave has not been sent yet.
        if update.state == AgentUpdateState::Waiting {
            return Ok(None);
        }
        if !sent.insert(update.id) {
            return Ok(None);
        }
        match frame(state, &update).await {
            Ok(frame) => Ok(Some(frame)),
            Err(why) => {
                fail(state, &update, &why).await;
                Ok(None)
            }
        }
    }

    /// Records what the agent reported; returns the acknowledgement to send
    /// once the state is final and stored.
    pub(super) async fn reported(
        state: &AppState,
        outpost: &str,
        id: u64,
        reported: &str,
        message: &str,
    ) -> Option<Message> {
        let Ok(parsed) = reported.parse::<AgentUpdateState>() else {
            tracing::warn!(%outpost, id, state = reported, "the agent reported an agent update state the hub does not know; ignored");
            return None;
        };
        match state
            .store()
            .report_agent_update(outpost, id, parsed, message, Utc::now())
            .await
        {
            Ok(record) => {
                tracing::info!(%outpost, id, state = %record.state, message = %record.message, "agent update");
                if record.state.is_open() {
                    return None;
                }
                // A wave may be decided now: the driver looks without
                // waiting for its tick.
                state.rollout_counters().wake.notify_one();
                Some(Message::AgentUpdateAck { id })
            }
            // Not this outpost's (or deleted): nothing to keep, and the
            // agent may stop sending it.
            Err(trellis_store::StoreError::NotFound { .. }) => Some(Message::AgentUpdateAck { id }),
            Err(e) => {
                tracing::warn!(%outpost, id, error = %e, "could not record an agent update's state; the agent sends it again on its next link");
                None
            }
        }
    }
}

/// The update as the agent needs it: the binary for the outpost's
/// architecture.
async fn frame(state: &AppState, update: &AgentUpdate) -> Result<Message, String> {
    let link = state
        .store()
        .get_outpost_link(&update.outpost)
        .await
        .map_err(|e| e.to_string())?;
    let arch = link
        .agent
        .as_ref()
        .and_then(|a| a["arch"].as_str())
        .unwrap_or_default()
        .to_owned();
    let binary = state
        .store()
        .get_agent_binary(
            &update.version,
            trellis_model::agent_binary::arch_from_oci(&arch),
        )
        .await
        .map_err(|_| {
            format!(
                "the hub holds no agent {} for {arch}, the outpost's architecture; nothing was changed (upload one with `trellis upload agent-binary`)",
                update.version
            )
        })?;
    Ok(Message::AgentUpdate {
        id: update.id,
        version: update.version.clone(),
        arch,
        artifact: binary.manifest,
        digest: binary.blake3,
        size: binary.size,
        deadline_secs: update.deadline_secs,
    })
}

async fn fail(state: &AppState, update: &AgentUpdate, why: &str) {
    if let Err(e) = state
        .store()
        .report_agent_update(
            &update.outpost,
            update.id,
            AgentUpdateState::Failed,
            why,
            Utc::now(),
        )
        .await
    {
        tracing::warn!(outpost = %update.outpost, id = update.id, error = %e, "could not record a failed agent update");
    }
}
