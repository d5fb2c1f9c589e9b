//! Agent updates: an outpost's agent replaced by another version the hub
//! holds (`trellis update outposts -l SELECTOR --agent-version V`). The hub
//! records one update per outpost asked; the outpost's agent fetches the
//! binary, swaps itself and reports how it went (see the agent's `update`
//! module for the swap and the watchdog that rolls a failed one back).
//!
//! An update of many outposts goes in waves, like a rollout
//! (`--waves 1,10%,100%`, `--success-threshold 95%`): the outposts are
//! ordered by [`outpost_order`] and cut by [`crate::rollout::wave_ends`];
//! the first wave is sent at once, each later one waits (`waiting`) until
//! the wave before it passes [`judge_wave`]. A wave whose failures make
//! the threshold unreachable halts the rest (`halted`, never sent). An
//! outpost offline when its wave was sent is carried along: it updates
//! when it links, and its wave is judged without it.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::rollout::{Tally, Verdict, Words};

/// Where an agent update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AgentUpdateState {
    /// Recorded in a later wave: sent once the waves before it passed.
    Waiting,
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
    /// Never sent: an earlier wave failed past the threshold; the message
    /// says which outposts failed. Final.
    Halted,
}

impl AgentUpdateState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentUpdateState::Waiting => "waiting",
            AgentUpdateState::Pending => "pending",
            AgentUpdateState::Fetching => "fetching",
            AgentUpdateState::Restarting => "restarting",
            AgentUpdateState::Applied => "applied",
            AgentUpdateState::Failed => "failed",
            AgentUpdateState::Halted => "halted",
        }
    }

    /// Whether the update is still under way (another may not start).
    pub fn is_open(self) -> bool {
        !matches!(
            self,
            AgentUpdateState::Applied | AgentUpdateState::Failed | AgentUpdateState::Halted
        )
    }

    pub const ALL: [AgentUpdateState; 7] = [
        AgentUpdateState::Waiting,
        AgentUpdateState::Pending,
        AgentUpdateState::Fetching,
        AgentUpdateState::Restarting,
        AgentUpdateState::Applied,
        AgentUpdateState::Failed,
        AgentUpdateState::Halted,
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
    /// Its wave (from 0): the first is sent at once, a later one waits.
    pub wave: u32,
    /// Offline when its wave was sent: judged without it.
    pub carried: bool,
    /// The share of a wave's online outposts that must apply it for the
    /// next wave to be sent, in basis points (10,000: all).
    pub threshold_bp: u32,
    /// How long its wave may take once sent before the outposts still
    /// under way count as not updated.
    pub wave_timeout_seconds: u64,
}

impl NewAgentUpdate {
    /// The record the store keeps for it, numbered `id` in the request
    /// whose first update is `batch`: pending (waiting in a later wave),
    /// nothing said yet.
    pub fn record(&self, id: u64, batch: u64, at: Timestamp) -> AgentUpdate {
        AgentUpdate {
            id,
            outpost: self.outpost.clone(),
            version: self.version.clone(),
            from_version: self.from_version.clone(),
            state: if self.wave == 0 {
                AgentUpdateState::Pending
            } else {
                AgentUpdateState::Waiting
            },
            message: String::new(),
            deadline_secs: self.deadline_secs,
            created_by: self.created_by.clone(),
            created_at: at,
            updated_at: at,
            batch,
            wave: self.wave,
            carried: self.carried,
            threshold_bp: self.threshold_bp,
            wave_timeout_seconds: self.wave_timeout_seconds,
            sent_at: (self.wave == 0).then_some(at),
        }
    }
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
    /// The id of the first update asked in the same request: the updates
    /// of one request go in waves together. (0 in records from before
    /// waves: each is its own request.)
    #[serde(default)]
    pub batch: u64,
    /// Its wave in the request, from 0.
    #[serde(default)]
    pub wave: u32,
    /// The outpost was offline when its wave was sent: it updates when it
    /// links, and the wave is judged without it.
    #[serde(default)]
    pub carried: bool,
    /// The share of a wave's online outposts that must apply it for the
    /// next wave to be sent, in basis points.
    #[serde(default = "all_bp")]
    pub threshold_bp: u32,
    /// How long its wave may take once sent: then those of it still under
    /// way count as not updated.
    #[serde(default = "default_wave_timeout")]
    pub wave_timeout_seconds: u64,
    /// When its wave was sent (`None`: still waiting, or recorded before
    /// waves had timeouts).
    #[serde(default)]
    pub sent_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn all_bp() -> u32 {
    crate::rollout::ALL
}

fn default_wave_timeout() -> u64 {
    crate::rollout::DEFAULT_WAVE_TIMEOUT_SECS
}

/// The outposts of a request in wave order: by a fixed hash of the name,
/// ties by name — the same order every time, spread over the fleet
/// rather than the names that sort first.
pub fn outpost_order(outposts: Vec<String>) -> Vec<String> {
    crate::rollout::wave_order("agent-update", outposts)
}

/// Judges wave `wave` (from 0) of a request's updates, `updates` being that
/// wave's: `threshold` (basis points) of those not carried along must
/// apply. It halts as soon as so many failed that the threshold cannot be
/// met; it passes once none not carried along is under way with the
/// threshold met, or at the wave timeout ([`wave_timed_out`]) if the
/// threshold is met by then — an outpost that went silent mid-update does
/// not hold the request for ever. A wave with nothing to judge passes. The
/// reason of a halt names the outposts that failed or did not finish.
pub fn judge_wave(wave: u32, updates: &[&AgentUpdate], threshold: u32, timed_out: bool) -> Verdict {
    let judged: Vec<&AgentUpdate> = updates.iter().copied().filter(|u| !u.carried).collect();
    let named = |keep: fn(AgentUpdateState) -> bool| -> Vec<&str> {
        judged
            .iter()
            .filter(|u| keep(u.state))
            .map(|u| u.outpost.as_str())
            .collect()
    };
    let tally = Tally {
        total: judged.len(),
        applied: named(|s| s == AgentUpdateState::Applied).len(),
        failed: named(|s| !s.is_open() && s != AgentUpdateState::Applied),
        under_way: named(AgentUpdateState::is_open),
    };
    tally.verdict(wave as usize, threshold, timed_out, &AGENT_WORDS)
}

const AGENT_WORDS: Words = Words {
    member: "outpost",
    can: "update",
    did: "updated",
    not: "updated",
};

/// Whether a sent wave's timeout has passed at `now`: counted from when
/// the wave was sent. Updates recorded before waves had timeouts carry no
/// send time and never time out.
pub fn wave_timed_out(updates: &[&AgentUpdate], now: Timestamp) -> bool {
    updates
        .iter()
        .filter_map(|u| {
            let secs = i64::try_from(u.wave_timeout_seconds).unwrap_or(i64::MAX / 1000);
            u.sent_at
                .and_then(|at| at.checked_add_signed(chrono::Duration::try_seconds(secs)?))
        })
        .min()
        .is_some_and(|end| now >= end)
}

impl AgentUpdate {
    /// One line for lists: `0.2.0 fetching`, `0.2.0 failed: <why>`.
    pub fn summary(&self) -> String {
        match self.state {
            AgentUpdateState::Failed | AgentUpdateState::Halted if !self.message.is_empty() => {
                format!("{} {}: {}", self.version, self.state, self.message)
            }
            state => format!("{} {state}", self.version),
        }
    }

    /// Sends it: a waiting update becomes pending, `carried` along when its
    /// outpost is offline now. Returns whether it changed.
    pub fn release(&mut self, carried: bool, at: Timestamp) -> bool {
        if self.state != AgentUpdateState::Waiting {
            return false;
        }
        self.state = AgentUpdateState::Pending;
        self.carried = carried;
        self.updated_at = at;
        self.sent_at = Some(at);
        true
    }

    /// Never sends it: a waiting update is halted with `why`. Returns
    /// whether it changed.
    pub fn halt(&mut self, why: &str, at: Timestamp) -> bool {
        if self.state != AgentUpdateState::Waiting {
            return false;
        }
        self.state = AgentUpdateState::Halted;
        why.clone_into(&mut self.message);
        self.updated_at = at;
        true
    }

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
            batch: 1,
            wave: 0,
            carried: false,
            threshold_bp: crate::rollout::ALL,
            wave_timeout_seconds: 600,
            sent_at: Some(at),
        }
    }

    fn in_state(outpost: &str, state: AgentUpdateState, carried: bool) -> AgentUpdate {
        AgentUpdate {
            outpost: outpost.into(),
            state,
            carried,
            ..update()
        }
    }

    #[test]
    fn a_wave_passes_on_its_online_outposts_and_halts_once_the_threshold_is_out_of_reach() {
        use AgentUpdateState::*;
        let judge = |updates: &[AgentUpdate], threshold| {
            judge_wave(1, &updates.iter().collect::<Vec<_>>(), threshold, false)
        };
        // Under way: watched.
        let wave = [
            in_state("a", Applied, false),
            in_state("b", Fetching, false),
        ];
        assert_eq!(judge(&wave, 10_000), Verdict::Watch);
        // An offline one carried along does not hold the wave.
        let wave = [in_state("a", Applied, false), in_state("b", Pending, true)];
        assert_eq!(judge(&wave, 10_000), Verdict::Pass);
        // One failure of four with 75% needed: passes once the rest applied.
        let mut wave = vec![
            in_state("a", Applied, false),
            in_state("b", Failed, false),
            in_state("c", Restarting, false),
            in_state("d", Applied, false),
        ];
        assert_eq!(judge(&wave, 7_500), Verdict::Watch);
        wave[2].state = Applied;
        assert_eq!(judge(&wave, 7_500), Verdict::Pass);
        // Two failures of four with 75% needed: halted at once, named.
        wave[2].state = Restarting;
        wave[3].state = Failed;
        let Verdict::Halt(why) = judge(&wave, 7_500) else {
            panic!("expected a halt");
        };
        assert!(
            why.starts_with("wave 2: 2 of its 4 online outpost(s) failed"),
            "{why}"
        );
        assert!(why.contains("failed: b, d"), "{why}");
        // All offline, or empty: nothing to judge.
        assert_eq!(
            judge(&[in_state("a", Pending, true)], 10_000),
            Verdict::Pass
        );
        assert_eq!(judge(&[], 10_000), Verdict::Pass);
    }

    #[test]
    fn at_the_wave_timeout_those_under_way_count_as_not_updated() {
        use AgentUpdateState::*;
        let sent = update().sent_at.unwrap();
        let wave = [
            in_state("a", Applied, false),
            in_state("b", Fetching, false),
            in_state("c", Pending, false),
            in_state("d", Applied, false),
        ];
        let wave: Vec<&AgentUpdate> = wave.iter().collect();
        // Not yet: 600 s from the send.
        let secs = chrono::Duration::seconds;
        assert!(!wave_timed_out(&wave, sent + secs(599)));
        assert!(wave_timed_out(&wave, sent + secs(600)));
        assert_eq!(judge_wave(0, &wave, 5_000, false), Verdict::Watch);
        // Half needed, half applied: passes at the timeout.
        assert_eq!(judge_wave(0, &wave, 5_000, true), Verdict::Pass);
        // Three quarters needed: halts, naming those not updated.
        let Verdict::Halt(why) = judge_wave(0, &wave, 7_500, true) else {
            panic!("expected a halt");
        };
        assert!(
            why.starts_with("wave 1: only 2 of its 4 online outpost(s) updated within the wave timeout (75% needed)"),
            "{why}"
        );
        assert!(why.ends_with("not updated: b, c"), "{why}");
        // Recorded before waves had timeouts: no send time, never times out.
        let old = AgentUpdate {
            sent_at: None,
            ..update()
        };
        assert!(!wave_timed_out(&[&old], sent + secs(1_000_000)));
    }

    #[test]
    fn only_a_waiting_update_is_released_or_halted() {
        let at = chrono::Utc::now();
        let mut u = AgentUpdate {
            state: AgentUpdateState::Waiting,
            ..update()
        };
        assert!(u.release(true, at));
        assert_eq!(u.state, AgentUpdateState::Pending);
        assert!(u.carried);
        assert_eq!(u.sent_at, Some(at));
        assert!(!u.release(false, at), "already sent");
        assert!(!u.halt("late", at), "already sent");
        let mut u = AgentUpdate {
            state: AgentUpdateState::Waiting,
            ..update()
        };
        assert!(u.halt("wave 1 failed", at));
        assert_eq!(u.summary(), "0.2.0 halted: wave 1 failed");
        assert!(!u.state.is_open());
    }

    #[test]
    fn the_wave_order_is_fixed() {
        let order = outpost_order(vec!["b".into(), "a".into(), "c".into()]);
        assert_eq!(
            order,
            outpost_order(vec!["c".into(), "a".into(), "b".into()])
        );
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
