//! Agent updates: an outpost's agent replaced by another version the hub
//! holds (`trellis update outposts -l SELECTOR --agent-version V`). The hub
//! records one update per outpost asked; the outpost's agent fetches the
//! binary, swaps itself and reports how it went (see the agent's `update`
//! module for the swap and the watchdog that rolls a failed one back).

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Where an agent update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AgentUpdateState {
    /// Recorded; sent to the agent when it is linked.
    Pending,
    /// The agent is fetching and checking the new binary.
    Fetching,
    /// The agent swapped in the new binary and restarts as it.
    Restarting,
    /// The new agent linked. Final.
    Applied,
    /// Refused before anything changed, or rolled back to the agent that
    /// ran before; the message says which and why. Final.
    Failed,
}

impl AgentUpdateState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentUpdateState::Pending => "pending",
            AgentUpdateState::Fetching => "fetching",
            AgentUpdateState::Restarting => "restarting",
            AgentUpdateState::Applied => "applied",
            AgentUpdateState::Failed => "failed",
        }
    }

    /// Whether the update is still under way (another may not start).
    pub fn is_open(self) -> bool {
        !matches!(self, AgentUpdateState::Applied | AgentUpdateState::Failed)
    }

    pub const ALL: [AgentUpdateState; 5] = [
        AgentUpdateState::Pending,
        AgentUpdateState::Fetching,
        AgentUpdateState::Restarting,
        AgentUpdateState::Applied,
        AgentUpdateState::Failed,
    ];
}

impl std::fmt::Display for AgentUpdateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AgentUpdateState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        AgentUpdateState::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| format!("{text:?} is not an agent update state"))
    }
}

/// An update asked for one outpost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAgentUpdate {
    pub outpost: String,
    /// The version the agent is to run.
    pub version: String,
    /// The version it ran when the update was asked (empty: never linked).
    pub from_version: String,
    /// How long the new agent has to link before the old one is
    /// restored.
    pub deadline_secs: u32,
    /// Who asked.
    pub created_by: String,
}

/// How long a new agent has to link back unless the update says otherwise.
pub const DEFAULT_DEADLINE_SECS: u32 = 120;

/// An agent update as the hub records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentUpdate {
    pub id: u64,
    pub outpost: String,
    pub version: String,
    pub from_version: String,
    pub state: AgentUpdateState,
    /// What the agent last said (progress, or why it failed).
    pub message: String,
    /// How long the new agent has to link before the old one is restored.
    pub deadline_secs: u32,
    pub created_by: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl AgentUpdate {
    /// The record after the agent reported `state`: a final state is kept
    /// (a late progress report does not reopen it); returns whether it
    /// changed.
    pub fn advance(&mut self, state: AgentUpdateState, message: &str, at: Timestamp) -> bool {
        if !self.state.is_open() || (self.state == state && self.message == message) {
            return false;
        }
        self.state = state;
        message.clone_into(&mut self.message);
        self.updated_at = at;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> AgentUpdate {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        AgentUpdate {
            id: 1,
            outpost: "edge-1".into(),
            version: "0.2.0".into(),
            from_version: "0.1.0".into(),
            state: AgentUpdateState::Pending,
            message: String::new(),
            deadline_secs: 120,
            created_by: "admin".into(),
            created_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn a_final_state_is_kept() {
        let at = chrono::Utc::now();
        let mut u = update();
        assert!(u.advance(AgentUpdateState::Fetching, "fetching", at));
        assert!(
            !u.advance(AgentUpdateState::Fetching, "fetching", at),
            "no change"
        );
        assert!(u.advance(AgentUpdateState::Failed, "rolled back", at));
        assert!(!u.advance(AgentUpdateState::Restarting, "late", at));
        assert_eq!(u.state, AgentUpdateState::Failed);
        assert_eq!(u.message, "rolled back");
    }

    #[test]
    fn states_read_back() {
        for s in AgentUpdateState::ALL {
            assert_eq!(s.as_str().parse::<AgentUpdateState>(), Ok(s));
        }
        assert!("done".parse::<AgentUpdateState>().is_err());
    }
}
