//! Rollouts: one build pushed to a fleet of stages wave by wave, halting on
//! its own when a wave fails.
//!
//! This module holds the record the hub stores and the rules that need no
//! I/O, so they are tested exhaustively here:
//! - how the `--waves`, `--success-threshold` values read ([`WaveSize`],
//!   [`parse_waves`], [`parse_threshold`]);
//! - which stage falls into which wave ([`wave_order`], [`wave_ends`]):
//!   stages are ordered by the FNV-1a hash (64 bit) of `project/stage`,
//!   ties by name, and wave *i* takes the stages up to its cumulative size
//!   (`5%` of the selected stages rounded up, or a count) — the same
//!   selection always gives the same waves;
//! - what an agent's report means for a stage of the rollout
//!   ([`observe`]) and whether a wave passed, halts, or is still watched
//!   ([`judge`]).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The most waves a rollout may have.
pub const MAX_WAVES: usize = 100;

/// 100 % in basis points (hundredths of a percent).
pub const ALL: u32 = 10_000;

/// How long a wave may take when no timeout is given: 30 minutes.
pub const DEFAULT_WAVE_TIMEOUT_SECS: u64 = 1800;

/// How large a wave is: cumulative, counted from the first wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSize {
    /// This many stages in this and the earlier waves.
    Count(u32),
    /// This share (basis points) of the selected stages, rounded up.
    Percent(u32),
}

impl WaveSize {
    /// How many stages this and the earlier waves hold, of `total`.
    pub fn cumulative(self, total: usize) -> usize {
        match self {
            WaveSize::Count(n) => (n as usize).min(total),
            WaveSize::Percent(bp) => (total * bp as usize).div_ceil(ALL as usize),
        }
    }
}

/// Basis points as people write a percentage: `95%`, `12.5%`.
pub fn percent_text(bp: u32) -> String {
    if bp.is_multiple_of(100) {
        format!("{}%", bp / 100)
    } else {
        let text = format!("{}.{:02}", bp / 100, bp % 100);
        format!("{}%", text.trim_end_matches('0'))
    }
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSize::Count(n) => write!(f, "{n}"),
            WaveSize::Percent(bp) => f.write_str(&percent_text(*bp)),
        }
    }
}

/// Reads `95%`, `12.5%` or `95` as basis points in 0..=100 %.
fn parse_percent(text: &str) -> Option<u32> {
    let number = text.strip_suffix('%').unwrap_or(text);
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty()
        || whole.len() > 3
        || frac.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (number.contains('.') && frac.is_empty())
    {
        return None;
    }
    let whole: u32 = whole.parse().ok()?;
    let frac: u32 = format!("{frac:0<2}").parse().ok()?;
    let bp = whole * 100 + frac;
    (bp <= ALL).then_some(bp)
}

impl FromStr for WaveSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.ends_with('%') {
            match parse_percent(s) {
                Some(0) | None => Err(format!(
                    "{s:?} is not a share of the stages: give more than 0% and at most 100%, e.g. 5% or 12.5%"
                )),
                Some(bp) => Ok(WaveSize::Percent(bp)),
            }
        } else {
            match s.parse::<u32>() {
                Ok(0) | Err(_) => Err(format!(
                    "{s:?} is not a wave size: give a number of stages (1 or more) or a share like 25%"
                )),
                Ok(n) => Ok(WaveSize::Count(n)),
            }
        }
    }
}

impl From<WaveSize> for String {
    fn from(w: WaveSize) -> String {
        w.to_string()
    }
}

impl TryFrom<String> for WaveSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl Serialize for WaveSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for WaveSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Reads `--waves 1,5%,25%,100%`: each wave's cumulative size; counts and
/// shares each grow from wave to wave, and the last wave is `100%`.
pub fn parse_waves(text: &str) -> Result<Vec<WaveSize>, String> {
    let sizes = text
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<WaveSize>, String>>()
        .map_err(|e| format!("the waves {text:?} are not valid: {e}"))?;
    if sizes.len() > MAX_WAVES {
        return Err(format!(
            "the waves {text:?} are {} waves; a rollout has at most {MAX_WAVES}",
            sizes.len()
        ));
    }
    if sizes.last() != Some(&WaveSize::Percent(ALL)) {
        return Err(format!(
            "the waves {text:?} do not end with 100%: the last wave must take every selected stage (e.g. 1,5%,25%,100%)"
        ));
    }
    let (mut count, mut share) = (0, 0);
    for size in &sizes {
        let grows = match *size {
            WaveSize::Count(n) => std::mem::replace(&mut count, n) < n,
            WaveSize::Percent(bp) => std::mem::replace(&mut share, bp) < bp,
        };
        if !grows {
            return Err(format!(
                "the waves {text:?} do not grow: each size counts the stages of the waves before it too, so each number and each share must be larger than the one before (e.g. 1,5%,25%,100%)"
            ));
        }
    }
    Ok(sizes)
}

/// Reads `--success-threshold 95%` as basis points.
pub fn parse_threshold(text: &str) -> Result<u32, String> {
    parse_percent(text.trim()).ok_or_else(|| {
        format!(
            "the success threshold {text:?} is not a percentage from 0% to 100%, e.g. 95% or 99.5%"
        )
    })
}

/// FNV-1a, 64 bit: small, fixed forever, and the same on every platform,
/// so the wave order stays what the documentation says.
fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The project's stages in wave order: by the hash of `project/stage`,
/// ties by name. Spreads the first waves over the fleet instead of taking
/// the stages whose names sort first.
pub fn wave_order(project: &str, mut stages: Vec<String>) -> Vec<String> {
    stages.sort_by_cached_key(|s| (fnv1a(&format!("{project}/{s}")), s.clone()));
    stages
}

/// Where each wave ends in the ordered stages (exclusive): wave `i` holds
/// `ends[i-1]..ends[i]`. A wave whose size adds nothing is empty.
pub fn wave_ends(sizes: &[WaveSize], total: usize) -> Vec<usize> {
    let mut last = 0;
    sizes
        .iter()
        .map(|s| {
            last = s.cumulative(total).max(last);
            last
        })
        .collect()
}

/// What happens after a wave passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum WavePause {
    /// The next wave starts this many seconds later.
    After { seconds: u64 },
    /// The next wave waits for `resume rollout`.
    Manual,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// A wave is out and being watched (or the next is about to start).
    Running,
    /// The last wave passed; the next starts at `next_wave_at`, or on
    /// `resume` when the rollout is manual.
    Waiting,
    /// Paused by a user: nothing is pushed or judged until `resume`.
    Paused,
    /// A wave failed past the threshold (or timed out); the later waves
    /// never get the release. Final.
    Halted,
    /// Stopped by a user (the pushed stages optionally rolled back). Final.
    Aborted,
    /// Every wave passed. Final.
    Completed,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Waiting => "waiting",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Aborted => "aborted",
            RolloutState::Completed => "completed",
        }
    }

    /// Whether the rollout still holds its stages: no other rollout may
    /// take them.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RolloutState::Running | RolloutState::Waiting | RolloutState::Paused
        )
    }

    pub const ALL: [RolloutState; 6] = [
        RolloutState::Running,
        RolloutState::Waiting,
        RolloutState::Paused,
        RolloutState::Halted,
        RolloutState::Aborted,
        RolloutState::Completed,
    ];
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RolloutState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RolloutState::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown rollout state {s:?}"))
    }
}

/// How a wave ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WaveOutcome {
    Passed,
    Halted,
    /// The rollout was aborted while the wave was out.
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutWave {
    /// As given (`5%`): cumulative.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "5%"))]
    pub size: WaveSize,
    /// How many stages it holds.
    pub stages: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<WaveOutcome>,
    /// When the last of its stages that waited for their outposts'
    /// delivery windows saw them open: the wave timeout counts from here
    /// (a wave does not time out while its stages wait for a window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_opened_at: Option<DateTime<Utc>>,
}

/// Where one stage of a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum StageRolloutState {
    /// Its wave has not started (and never will if the rollout stopped).
    Waiting,
    /// The release is pushed; its outpost has not reported it yet.
    Pushed,
    /// Its outpost runs the release, past its health window.
    Applied,
    /// Its outpost could not run the release (and rolled back).
    Failed,
    /// Rolled back to the release it ran before, by `abort --rollback`.
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutStage {
    pub stage: String,
    pub outpost: String,
    /// Its wave, from 0.
    pub wave: u32,
    pub state: StageRolloutState,
    /// Its outpost was offline when its wave started (or went offline
    /// before applying): the release was pushed and waits for the link;
    /// the stage does not count for or against its wave.
    #[serde(default)]
    pub carried: bool,
    /// The release the rollout pushed to it, and that release's revision.
    pub release: Option<u64>,
    pub revision: Option<u64>,
    /// The stage's newest release when its wave started (to recognise,
    /// after a restart, a push that happened but was not recorded).
    pub latest_before: Option<u64>,
    /// The release it ran when its wave started: what `abort --rollback`
    /// returns it to.
    pub previous_release: Option<u64>,
    /// Why it failed, or what became of it.
    pub message: Option<String>,
}

/// A rollout as the hub stores and serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rollout {
    /// Numbered by the hub, across projects.
    pub id: u64,
    pub project: String,
    pub build: String,
    /// The config of each stage (by name) its releases take.
    pub config: Option<String>,
    /// The label selector the stages were chosen by, as given.
    pub selector: String,
    pub waves: Vec<RolloutWave>,
    /// Basis points of a wave's online stages that must apply it.
    pub success_threshold: u32,
    pub wave_timeout_seconds: u64,
    pub pause: WavePause,
    pub state: RolloutState,
    /// Why it halted, naming the failing stages.
    pub halt_reason: Option<String>,
    /// While waiting between waves: when the next starts.
    pub next_wave_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Incremented by every save, so two writers cannot overwrite each
    /// other's change unseen.
    pub version: u64,
    /// Every selected stage, in wave order. Left empty where rollouts are
    /// listed.
    #[serde(default)]
    pub stages: Vec<RolloutStage>,
}

impl Rollout {
    /// The wave being watched: started, not finished.
    pub fn current_wave(&self) -> Option<usize> {
        self.waves
            .iter()
            .position(|w| w.started_at.is_some() && w.outcome.is_none())
    }

    /// The first wave not started yet.
    pub fn next_wave(&self) -> Option<usize> {
        self.waves.iter().position(|w| w.started_at.is_none())
    }

    pub fn wave_stages(&self, wave: usize) -> impl Iterator<Item = &RolloutStage> {
        self.stages.iter().filter(move |s| s.wave as usize == wave)
    }

    /// The first of `stages` this rollout does not hold, if any.
    pub fn stranger<'a>(&self, mut stages: impl Iterator<Item = &'a str>) -> Option<&'a str> {
        let held: std::collections::HashSet<&str> =
            self.stages.iter().map(|s| s.stage.as_str()).collect();
        stages.find(|stage| !held.contains(stage))
    }

    /// Marks the stage each of `releases` went to as pushed with it
    /// ([`RolloutStage::pushed`]); releases of stages it does not hold
    /// change nothing.
    pub fn record_pushed(&mut self, releases: &[crate::Release]) {
        let by_stage: std::collections::HashMap<&str, &crate::Release> =
            releases.iter().map(|r| (r.stage.as_str(), r)).collect();
        for s in &mut self.stages {
            if let Some(release) = by_stage.get(s.stage.as_str()) {
                s.pushed(release);
            }
        }
    }
}

impl RolloutStage {
    /// Stage `stage` on `outpost`, in wave `wave` (from 0), as planned:
    /// waiting for its wave, nothing pushed.
    pub fn planned(stage: String, outpost: String, wave: u32) -> RolloutStage {
        RolloutStage {
            stage,
            outpost,
            wave,
            state: StageRolloutState::Waiting,
            carried: false,
            release: None,
            revision: None,
            latest_before: None,
            previous_release: None,
            message: None,
        }
    }

    /// The rollout's release was pushed to it as `release`.
    pub fn pushed(&mut self, release: &crate::Release) {
        self.release = Some(release.number);
        self.revision = Some(release.revision);
        self.state = StageRolloutState::Pushed;
    }
}

/// What creating a rollout takes (the store numbers it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    pub project: String,
    pub build: String,
    pub config: Option<String>,
    pub selector: String,
    pub waves: Vec<RolloutWave>,
    pub success_threshold: u32,
    pub wave_timeout_seconds: u64,
    pub pause: WavePause,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub stages: Vec<RolloutStage>,
}

impl NewRollout {
    /// The stages of a selection, in wave order, each in its wave; and the
    /// waves. `stages` are `(stage, outpost)`.
    pub fn plan(
        project: &str,
        sizes: &[WaveSize],
        stages: Vec<(String, String)>,
    ) -> (Vec<RolloutWave>, Vec<RolloutStage>) {
        let outposts: std::collections::HashMap<String, String> = stages.into_iter().collect();
        let order = wave_order(project, outposts.keys().cloned().collect());
        let ends = wave_ends(sizes, order.len());
        let mut start = 0;
        let mut waves = Vec::with_capacity(sizes.len());
        let mut planned = Vec::with_capacity(order.len());
        for (i, (&size, &end)) in sizes.iter().zip(&ends).enumerate() {
            waves.push(RolloutWave {
                size,
                stages: u32::try_from(end - start).unwrap_or(u32::MAX),
                started_at: None,
                finished_at: None,
                outcome: None,
                window_opened_at: None,
            });
            for stage in &order[start..end] {
                planned.push(RolloutStage::planned(
                    stage.clone(),
                    outposts.get(stage).cloned().unwrap_or_default(),
                    i as u32,
                ));
            }
            start = end;
        }
        (waves, planned)
    }

    /// The record it becomes, numbered `id`.
    pub fn numbered(&self, id: u64) -> Rollout {
        Rollout {
            id,
            project: self.project.clone(),
            build: self.build.clone(),
            config: self.config.clone(),
            selector: self.selector.clone(),
            waves: self.waves.clone(),
            success_threshold: self.success_threshold,
            wave_timeout_seconds: self.wave_timeout_seconds,
            pause: self.pause,
            state: RolloutState::Running,
            halt_reason: None,
            next_wave_at: None,
            created_at: self.created_at,
            created_by: self.created_by.clone(),
            updated_at: self.created_at,
            finished_at: None,
            version: 1,
            stages: self.stages.clone(),
        }
    }
}

/// What a stage's sync record says of the release the rollout pushed to
/// it: its new state and why, or `None` while it is still on its way.
/// `applied_release` is the release the hub records as running there.
pub fn observe(
    stage: &RolloutStage,
    applied_revision: u64,
    applied_release: Option<u64>,
    report_state: Option<&str>,
) -> Option<(StageRolloutState, Option<String>)> {
    let (Some(release), Some(revision)) = (stage.release, stage.revision) else {
        return None;
    };
    if applied_revision < revision {
        return None;
    }
    if applied_release.is_some_and(|a| a >= release) {
        return Some((StageRolloutState::Applied, None));
    }
    if report_state == Some("failed") {
        return Some((
            StageRolloutState::Failed,
            Some(format!(
                "release {release} did not come up on outpost {:?}; it rolled back",
                stage.outpost
            )),
        ));
    }
    Some((
        StageRolloutState::Failed,
        Some(format!(
            "release {release} never ran: a newer change of the stage replaced it"
        )),
    ))
}

/// The verdict on a wave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still being applied.
    Watch,
    Pass,
    /// The rollout halts; the reason names the failing stages.
    Halt(String),
}

/// How many names a halt reason lists before it says how many more.
const NAMED: usize = 20;

/// The first [`NAMED`] of `names`, and how many more there are.
fn name_some(names: &[&str]) -> String {
    let mut text = names
        .iter()
        .take(NAMED)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMED {
        text.push_str(&format!(" and {} more", names.len() - NAMED));
    }
    text
}

/// Judges wave `wave` (from 0) of its stages: `threshold` (basis points)
/// of the stages not carried along must apply. It halts as soon as so
/// many failed that the threshold cannot be met; it passes once every
/// stage not carried along applied or failed with the threshold met, or at
/// the timeout if the threshold is met by then. A wave with no stage to
/// judge (all offline, or empty) passes.
pub fn judge(wave: usize, stages: &[&RolloutStage], threshold: u32, timed_out: bool) -> Verdict {
    let judged: Vec<&RolloutStage> = stages.iter().copied().filter(|s| !s.carried).collect();
    let named = |state: StageRolloutState| -> Vec<&str> {
        judged
            .iter()
            .filter(|s| s.state == state)
            .map(|s| s.stage.as_str())
            .collect()
    };
    let tally = Tally {
        total: judged.len(),
        applied: named(StageRolloutState::Applied).len(),
        failed: named(StageRolloutState::Failed),
        under_way: named(StageRolloutState::Pushed),
    };
    tally.verdict(wave, threshold, timed_out, &RELEASE_WORDS)
}

/// A sent wave as its judge counts it, whatever it sends (a release to
/// stages, an agent version to outposts): the online members, how many
/// applied it, and the names of those that failed or are still under way.
pub(crate) struct Tally<'a> {
    pub total: usize,
    pub applied: usize,
    pub failed: Vec<&'a str>,
    pub under_way: Vec<&'a str>,
}

/// How a verdict's reason names the members and what they do.
pub(crate) struct Words {
    /// `stage`, `outpost`.
    pub member: &'static str,
    /// What fewer than the threshold can do: `apply the release`.
    pub can: &'static str,
    /// What those counted did: `applied the release`.
    pub did: &'static str,
    /// What those still under way at the timeout did not: `applied`.
    pub not: &'static str,
}

const RELEASE_WORDS: Words = Words {
    member: "stage",
    can: "apply the release",
    did: "applied the release",
    not: "applied",
};

impl Tally<'_> {
    /// The rule of every wave: halt once the failures put `threshold` out
    /// of reach; pass once none is under way with the threshold met, or at
    /// the timeout if it is met by then; halt at the timeout otherwise.
    pub(crate) fn verdict(
        &self,
        wave: usize,
        threshold: u32,
        timed_out: bool,
        words: &Words,
    ) -> Verdict {
        let Tally {
            total,
            applied,
            failed,
            under_way,
        } = self;
        let need = (total * threshold as usize).div_ceil(ALL as usize);
        let number = wave + 1;
        let pct = percent_text(threshold);
        let member = words.member;
        if total - failed.len() < need {
            return Verdict::Halt(format!(
                "wave {number}: {} of its {total} online {member}(s) failed, so fewer than {pct} can {} — failed: {}",
                failed.len(),
                words.can,
                name_some(failed)
            ));
        }
        if *applied >= need && (under_way.is_empty() || timed_out) {
            return Verdict::Pass;
        }
        if timed_out {
            let mut reason = format!(
                "wave {number}: only {applied} of its {total} online {member}(s) {} within the wave timeout ({pct} needed) — not {}: {}",
                words.did,
                words.not,
                name_some(under_way)
            );
            if !failed.is_empty() {
                reason.push_str(&format!("; failed: {}", name_some(failed)));
            }
            return Verdict::Halt(reason);
        }
        Verdict::Watch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn waves_read_as_given_and_refuse_what_cannot_work() {
        assert_eq!(
            parse_waves("1,5%,25%,100%").unwrap(),
            vec![
                WaveSize::Count(1),
                WaveSize::Percent(500),
                WaveSize::Percent(2500),
                WaveSize::Percent(ALL)
            ]
        );
        assert_eq!(
            parse_waves("12.5%,100%").unwrap()[0],
            WaveSize::Percent(1250)
        );
        for (bad, words) in [
            ("", "not a wave size"),
            ("1,,100%", "not a wave size"),
            ("0,100%", "not a wave size"),
            ("-1,100%", "not a wave size"),
            ("1,5%", "do not end with 100%"),
            ("50%,25%,100%", "do not grow"),
            ("5,5,100%", "do not grow"),
            ("0%,100%", "more than 0%"),
            ("101%", "at most 100%"),
            ("1.5,100%", "not a wave size"),
            ("abc", "not a wave size"),
        ] {
            let e = parse_waves(bad).unwrap_err();
            assert!(e.contains(words), "{bad}: {e}");
        }
        let many = vec!["1"; MAX_WAVES + 1].join(",");
        assert!(parse_waves(&many).is_err());
    }

    #[test]
    fn thresholds_are_percentages() {
        assert_eq!(parse_threshold("95%"), Ok(9500));
        assert_eq!(parse_threshold("99.5%"), Ok(9950));
        assert_eq!(parse_threshold("100"), Ok(ALL));
        assert_eq!(parse_threshold("0%"), Ok(0));
        for bad in ["", "%", "101%", "95.%", "9.555%", "-5%", "x"] {
            assert!(parse_threshold(bad).is_err(), "{bad}");
        }
        assert_eq!(percent_text(9950), "99.5%");
        assert_eq!(percent_text(9500), "95%");
        assert_eq!(percent_text(1), "0.01%");
    }

    #[test]
    fn thirty_stages_in_four_waves() {
        let sizes = parse_waves("1,5%,25%,100%").unwrap();
        // 5% of 30 is 1.5, rounded up 2; 25% is 7.5, rounded up 8.
        assert_eq!(wave_ends(&sizes, 30), vec![1, 2, 8, 30]);
        // Fewer stages than a count: the later waves are empty.
        assert_eq!(wave_ends(&parse_waves("3,100%").unwrap(), 2), vec![2, 2]);
        assert_eq!(wave_ends(&sizes, 0), vec![0, 0, 0, 0]);
    }

    #[test]
    fn the_order_is_the_documented_hash() {
        // FNV-1a of "a" is af63dc4c8601ec8c (the published test vector).
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        let stages: Vec<String> = (0..10).map(|i| format!("line-{i}")).collect();
        let order = wave_order("shop", stages.clone());
        let mut by_hand = stages.clone();
        by_hand.sort_by_key(|s| fnv1a(&format!("shop/{s}")));
        assert_eq!(order, by_hand);
        assert_ne!(order, stages, "the order spreads over the names");
    }

    fn stage(name: &str, state: StageRolloutState, carried: bool) -> RolloutStage {
        RolloutStage {
            stage: name.into(),
            outpost: format!("o-{name}"),
            wave: 1,
            state,
            carried,
            release: Some(2),
            revision: Some(5),
            latest_before: Some(1),
            previous_release: Some(1),
            message: None,
        }
    }

    use StageRolloutState::{Applied, Failed, Pushed};

    #[test]
    fn a_wave_halts_once_the_threshold_is_out_of_reach() {
        let s = [
            stage("a", Failed, false),
            stage("b", Pushed, false),
            stage("c", Applied, false),
        ];
        let refs: Vec<_> = s.iter().collect();
        // 3 stages at 95%: all 3 must apply; one failed.
        let Verdict::Halt(reason) = judge(1, &refs, 9500, false) else {
            panic!("not halted")
        };
        assert!(reason.starts_with("wave 2:"), "{reason}");
        assert!(reason.contains("failed: a"), "{reason}");
        // At 60%, two of three suffice: still watched.
        assert_eq!(judge(1, &refs, 6000, false), Verdict::Watch);
    }

    #[test]
    fn offline_stages_neither_block_nor_fail_a_wave() {
        let s = [
            stage("a", Applied, false),
            stage("b", Pushed, true),
            stage("c", Failed, true),
        ];
        let refs: Vec<_> = s.iter().collect();
        assert_eq!(judge(0, &refs, ALL, false), Verdict::Pass);
        let all_offline = [stage("x", Pushed, true)];
        assert_eq!(
            judge(0, &all_offline.iter().collect::<Vec<_>>(), ALL, false),
            Verdict::Pass
        );
    }

    #[test]
    fn at_the_timeout_pending_stages_count_as_not_applied() {
        let s = [stage("a", Applied, false), stage("b", Pushed, false)];
        let refs: Vec<_> = s.iter().collect();
        assert_eq!(judge(0, &refs, 5000, false), Verdict::Watch);
        assert_eq!(judge(0, &refs, 5000, true), Verdict::Pass);
        let Verdict::Halt(reason) = judge(0, &refs, ALL, true) else {
            panic!("not halted")
        };
        assert!(reason.contains("not applied: b"), "{reason}");
    }

    #[test]
    fn reports_become_stage_states() {
        let s = stage("a", Pushed, false);
        assert_eq!(observe(&s, 4, Some(1), Some("running")), None);
        assert_eq!(
            observe(&s, 5, Some(2), Some("running")).map(|o| o.0),
            Some(Applied)
        );
        let (state, why) = observe(&s, 5, Some(1), Some("failed")).unwrap();
        assert_eq!(state, Failed);
        assert!(why.unwrap().contains("rolled back"));
        assert_eq!(
            observe(&s, 6, Some(1), Some("running")).map(|o| o.0),
            Some(Failed)
        );
        // A newer release applied after it: it ran.
        assert_eq!(observe(&s, 7, Some(3), None).map(|o| o.0), Some(Applied));
    }

    proptest! {
        #[test]
        fn membership_is_stable_and_each_stage_in_one_wave(
            names in prop::collection::btree_set("[a-z][a-z0-9-]{0,12}", 0..200),
            cuts in prop::collection::btree_set(1u32..ALL, 0..5),
        ) {
            let mut sizes: Vec<WaveSize> = cuts.into_iter().map(WaveSize::Percent).collect();
            sizes.push(WaveSize::Percent(ALL));
            let stages: Vec<(String, String)> =
                names.iter().map(|n| (n.clone(), format!("o-{n}"))).collect();
            let mut reversed = stages.clone();
            reversed.reverse();
            let (waves, planned) = NewRollout::plan("p", &sizes, stages);
            let (waves2, planned2) = NewRollout::plan("p", &sizes, reversed);
            prop_assert_eq!(&planned, &planned2);
            prop_assert_eq!(&waves, &waves2);
            prop_assert_eq!(planned.len(), names.len());
            prop_assert_eq!(waves.iter().map(|w| w.stages as usize).sum::<usize>(), names.len());
            // Waves come in order, and each holds at least its share.
            let mut seen = 0usize;
            for (i, w) in waves.iter().enumerate() {
                seen += w.stages as usize;
                prop_assert!(seen >= sizes[i].cumulative(names.len()));
            }
            prop_assert!(planned.windows(2).all(|p| p[0].wave <= p[1].wave));
        }

        #[test]
        fn growing_the_fleet_keeps_relative_order(
            names in prop::collection::btree_set("[a-z][a-z0-9-]{0,12}", 2..50),
        ) {
            let all: Vec<String> = names.iter().cloned().collect();
            let fewer: Vec<String> = all[1..].to_vec();
            let order_all: Vec<String> = wave_order("p", all.clone())
                .into_iter().filter(|s| s != &all[0]).collect();
            prop_assert_eq!(order_all, wave_order("p", fewer));
        }
    }
}
