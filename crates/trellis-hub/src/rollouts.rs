//! The rollout driver: pushes each rollout's release wave by wave and
//! judges every wave (see [`trellis_model::rollout`] for the rules); it
//! sends agent updates' waves too ([`crate::agent_update_waves`]).
//!
//! One hub instance at a time drives every rollout ([`run`], under the job
//! lock `rollouts`), looking at the active ones every [`TICK`], and as soon
//! as agents' status reports were committed on this instance (woken rounds
//! come 3 ms to [`WOKEN_GAP`] apart, twice what the last one took, not
//! counting a push): a wave is judged when its last report is in, not up
//! to a tick later, and the next wave starts right after. Everything
//! it knows is in the store: a hub killed at any point and started again
//! (or another instance taking the lock) carries on from the record. The
//! one step that spans two writes — recording that a wave starts, then
//! pushing its releases — is made safe to repeat: the record keeps each
//! stage's newest release from before the push, and a stage whose newest
//! release moved past it since got the push already (it is adopted, not
//! pushed again).
//!
//! An outpost counts as online when its link is up on this instance, or,
//! on a shared store, held by another live instance. For [`SETTLE`] after
//! the driver starts, no wave starts and no stage is set aside as offline:
//! agents take a moment to link again after a hub restart.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use trellis_model::rollout::{
    Rollout, RolloutStage, RolloutState, RolloutWave, StageRolloutState, Verdict, WaveOutcome,
    WavePause, judge, observe,
};
use trellis_model::{ConfigSnapshot, NewAuditEntry};
use trellis_store::{NewRelease, StoreError};

use crate::link::commit::{Committed, CommittedStages, Reports};
use crate::state::AppState;

/// How often the active rollouts are looked at.
const TICK: Duration = Duration::from_secs(1);

/// The most and the least time between two rounds woken by reports or a
/// passed wave: a wave landing on thousands of stages commits reports all
/// the time. In between, the gap is twice what the last round took (the
/// least after a round that pushed a wave or saved a rollout, none once a
/// wave has nearly landed: see [`Looked`]), so the driver takes at most a
/// third of a core from the links it waits on, and a wave is judged within
/// milliseconds of its last report. (The least was 10 ms: a 100-stage wave
/// whose last reports came in one batch waited for it, a sixth of the
/// wave's time. A round costs 0.2–3 ms now.)
const WOKEN_GAP: Duration = Duration::from_millis(100);
const WOKEN_GAP_LEAST: Duration = Duration::from_millis(3);

/// How long after the driver starts before it starts waves or sets stages
/// aside as offline.
pub const SETTLE: Duration = Duration::from_secs(8);

/// How long after a rollout ended its stages' reports are still read
/// into it (stages carried along while offline catch up later).
const FOLLOW_FINISHED: chrono::Duration = chrono::Duration::hours(1);

/// Who the driver's audit entries are recorded as made by.
pub const DRIVER: &str = "rollout-driver";

/// What `/metrics` shows of the waves this instance drove.
#[derive(Debug, Default)]
pub struct Counters {
    pub waves_started: AtomicU64,
    pub waves_passed: AtomicU64,
    pub waves_halted: AtomicU64,
    /// Told when a rollout was created or resumed, or a wave passed with
    /// no pause after it: the next round comes without waiting for a tick.
    pub wake: tokio::sync::Notify,
}

/// Drives the rollouts every [`TICK`], and when woken by committed status
/// reports or [`Counters::wake`], until `cancel`.
pub async fn run(state: AppState, cancel: CancellationToken) {
    drive(&state, &cancel).await;
    // Another instance may drive now: keep no reports for this one.
    state.links().syncs.reported_stages.stop();
}

async fn drive(state: &AppState, cancel: &CancellationToken) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reported = &state.links().syncs.reported;
    let reported_stages = &state.links().syncs.reported_stages;
    let wake = &state.rollout_counters().wake;
    let mut held = Held::default();
    loop {
        // Rollouts that ended are still followed (their late stages), but
        // only at the tick: reports from any push wake the driver. Stages'
        // reports say nothing of agent updates (their agents' reports wake
        // the driver themselves).
        let (finished_too, agent_updates) = tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => (true, true),
            () = reported.notified() => (false, false),
            () = wake.notified() => (false, true),
        };
        let settled = started.elapsed() >= SETTLE;
        let began = Instant::now();
        // A tick reads every stage still on its way (reports committed by
        // other instances, stages gone); a round woken by reports, those
        // that reported.
        let reports = reported_stages.take();
        let reports = if finished_too { Reports::Any } else { reports };
        let looked = match round(state, settled, finished_too, &mut held, &reports).await {
            Ok(looked) => looked,
            Err(e) => {
                tracing::warn!(error = %e, "could not look at the rollouts");
                Looked::default()
            }
        };
        if agent_updates && let Err(e) = crate::agent_update_waves::round(state, settled).await {
            tracing::warn!(error = %e, "could not look at the agent updates in waves");
        }
        tracing::trace!(
            round_ms = began.elapsed().as_secs_f64() * 1e3,
            tick = finished_too,
            deciding = looked.deciding,
            "round"
        );
        // Once a wave has almost landed, the next report may decide it,
        // and reading the few left is cheap: the next round waits for no
        // more than that report. A round that pushed a wave took the push's
        // time, one that saved a rollout the save's, and a tick read every
        // stage on its way: none says what the next woken round will cost.
        // Spaced by their cost, a wave's verdict came up to 100 ms after
        // its last report (BENCHMARKS.md, rollout).
        let gap = if looked.deciding {
            Duration::ZERO
        } else if looked.pushed || looked.saved || finished_too {
            WOKEN_GAP_LEAST
        } else {
            (began.elapsed() * 2).clamp(WOKEN_GAP_LEAST, WOKEN_GAP)
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(gap) => {}
        }
    }
}

/// The rollouts the driver follows, as it left them, by id. The record of
/// a large rollout holds 10,000 stages: one whose stored version has not
/// moved since the driver's last round is not read again, and what a round
/// only observed (more stages applied) is saved at most once a [`TICK`]
/// (lost with the hub, it is observed again from the stages' records).
/// A rollout that ended is followed for [`FOLLOW_FINISHED`] while stages
/// of it are still on their way; once none is, only its version is kept,
/// and it is not read again unless that moves (before, every tick of that
/// hour read every such rollout whole).
#[derive(Default)]
struct Held {
    rollouts: HashMap<u64, HeldRollout>,
    /// Ended, no stage on its way: id → version.
    done: HashMap<u64, u64>,
}

struct HeldRollout {
    /// As stored, plus what rounds observed since if `unsaved`.
    rollout: Rollout,
    unsaved: bool,
    /// When this driver last saved it (`None`: read, never saved).
    saved_at: Option<Instant>,
}

impl HeldRollout {
    fn read(rollout: Rollout) -> HeldRollout {
        HeldRollout {
            rollout,
            unsaved: false,
            saved_at: None,
        }
    }

    fn saved(rollout: Rollout) -> HeldRollout {
        HeldRollout {
            rollout,
            unsaved: false,
            saved_at: Some(Instant::now()),
        }
    }
}

/// What a round of the driver did, as far as the wait for the next one
/// goes.
#[derive(Default)]
struct Looked {
    /// It pushed releases (started or went on with a wave).
    pushed: bool,
    /// It saved a rollout.
    saved: bool,
    /// A wave being watched has at most [`DECIDING_SHARE`] of its stages
    /// (or [`DECIDING_LEAST`]) still on their way.
    deciding: bool,
}

/// The share of a wave's stages (in hundredths) still on their way below
/// which the driver looks again as soon as more reports come, and the
/// number of stages below which it does whatever the wave's size: a wave
/// of 100 stages lands in 60–90 ms on the benchmark's fleet, and waiting
/// the least gap for each of its last reports was a sixth of that.
const DECIDING_SHARE: usize = 2;
const DECIDING_LEAST: usize = 10;

/// Whether the wave `r` watches has at most [`DECIDING_SHARE`] of its
/// stages, or [`DECIDING_LEAST`], still on their way (not counting those
/// carried along).
fn deciding(r: &Rollout) -> bool {
    let Some(w) = r.current_wave() else {
        return false;
    };
    let (mut size, mut left) = (0, 0);
    for s in r.wave_stages(w) {
        size += 1;
        left += usize::from(s.state == StageRolloutState::Pushed && !s.carried);
    }
    left > 0 && left <= (size * DECIDING_SHARE / 100).max(DECIDING_LEAST)
}

async fn round(
    state: &AppState,
    settled: bool,
    finished_too: bool,
    held: &mut Held,
    reports: &Reports,
) -> Result<Looked, StoreError> {
    // The records without their stages: each with its version.
    let listed = state.store().list_rollouts(None).await?;
    let followed = |r: &Rollout| {
        r.state.is_active()
            || r.finished_at
                .is_some_and(|at| Utc::now() - at < FOLLOW_FINISHED)
    };
    let kept: HashMap<u64, u64> = listed
        .iter()
        .filter(|r| followed(r))
        .map(|r| (r.id, r.version))
        .collect();
    held.rollouts.retain(|id, _| kept.contains_key(id));
    held.done
        .retain(|id, version| kept.get(id) == Some(version));
    let active: Vec<(u64, u64)> = listed
        .into_iter()
        .filter(|r| {
            (r.state.is_active() || (finished_too && followed(r))) && !held.done.contains_key(&r.id)
        })
        .map(|r| (r.id, r.version))
        .collect();
    if active.is_empty() {
        state.links().syncs.reported_stages.stop();
        return Ok(Looked::default());
    }
    let online = Online::read(state).await?;
    let mut looked = Looked::default();
    for (id, version) in active {
        let rollout = match held.rollouts.remove(&id) {
            Some(kept) if kept.rollout.version == version => kept,
            // New to this driver, or changed by someone else (a user's
            // pause or abort, another instance).
            _ => match state.store().get_rollout(id).await {
                Ok(r) => HeldRollout::read(r),
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            },
        };
        let had = released(&rollout.rollout);
        let saved_at = rollout.saved_at;
        match advance(state, rollout, &online, settled, reports).await {
            Ok(kept) => {
                looked.pushed |= had != released(&kept.rollout);
                looked.saved |= kept.saved_at != saved_at;
                looked.deciding |= kept.rollout.state.is_active() && deciding(&kept.rollout);
                let on_its_way = kept
                    .rollout
                    .stages
                    .iter()
                    .any(|s| s.state == StageRolloutState::Pushed);
                if kept.rollout.state.is_active() || on_its_way || kept.unsaved {
                    held.rollouts.insert(id, kept);
                } else {
                    held.done.insert(id, kept.rollout.version);
                }
            }
            // A user paused or aborted it meanwhile: read again next
            // time, as it is now.
            Err(StoreError::InUse { what, .. }) => {
                tracing::debug!(rollout = id, %what, "rollout changed meanwhile");
            }
            Err(e) => tracing::warn!(rollout = id, error = %e, "could not advance a rollout"),
        }
    }
    Ok(looked)
}

/// How many of the rollout's stages have their release.
fn released(r: &Rollout) -> usize {
    r.stages.iter().filter(|s| s.release.is_some()).count()
}

/// Which outposts are linked now (to any instance): this instance's
/// sessions as they are when asked, one outpost at a time (a round used
/// to copy the name of every session, 10,000 on a large hub, however few
/// stages it looked at), and other instances' claims as read.
pub struct Online<'a> {
    links: &'a crate::link::Links,
    elsewhere: HashSet<String>,
}

impl<'a> Online<'a> {
    pub async fn read(state: &'a AppState) -> Result<Online<'a>, StoreError> {
        let mut elsewhere = HashSet::new();
        let cluster = state.cluster();
        if cluster.is_shared() {
            let instances = cluster.instances(state.store()).await?;
            let alive: HashSet<&str> = instances
                .iter()
                .filter(|i| cluster.alive(i))
                .map(|i| i.id.as_str())
                .collect();
            for claim in state.store().link_claims(None).await? {
                if claim.released_at.is_none() && alive.contains(claim.instance.as_str()) {
                    elsewhere.insert(claim.outpost);
                }
            }
        }
        Ok(Online {
            links: state.links(),
            elsewhere,
        })
    }

    pub fn has(&self, outpost: &str) -> bool {
        self.here(outpost) || self.elsewhere.contains(outpost)
    }

    /// Linked to this instance, whose reports it sees committed.
    fn here(&self, outpost: &str) -> bool {
        self.links.has_local_session(outpost)
    }
}

/// One step of one rollout: what its stages' reports say, then the wave's
/// verdict or the next wave's start. Saves only what changed; returns the
/// rollout as it left it.
async fn advance(
    state: &AppState,
    held: HeldRollout,
    online: &Online<'_>,
    settled: bool,
    reports: &Reports,
) -> Result<HeldRollout, StoreError> {
    let HeldRollout {
        rollout: mut r,
        unsaved,
        saved_at,
    } = held;
    let before = Before::of(&r);
    let now = Utc::now();
    observe_stages(state, &mut r, online, settled, reports).await?;
    match r.state {
        RolloutState::Waiting if settled && r.next_wave_at.is_some_and(|at| at <= now) => {
            r.state = RolloutState::Running;
            r.next_wave_at = None;
            if let Some(next) = r.next_wave() {
                let r = start_wave(state, r, next, online).await?;
                return Ok(HeldRollout::saved(r));
            }
        }
        RolloutState::Running => match r.current_wave() {
            Some(w)
                if r.wave_stages(w)
                    .any(|s| s.state == StageRolloutState::Waiting) =>
            {
                // Recorded as started, not (all) pushed: recorded by a hub
                // that saved a wave's start before pushing it, and
                // restarted in between.
                let r = push_wave(state, r, w, None).await?;
                return Ok(HeldRollout::saved(r));
            }
            Some(w) => {
                let waiting = window_waits(state, &mut r, w, now);
                let started = r.waves[w].started_at.unwrap_or(now);
                let origin = r.waves[w]
                    .window_opened_at
                    .map_or(started, |opened| opened.max(started));
                let timeout = chrono::Duration::seconds(
                    i64::try_from(r.wave_timeout_seconds).unwrap_or(i64::MAX / 1000),
                );
                let timed_out = !waiting && now - origin >= timeout;
                let stages: Vec<_> = r.wave_stages(w).collect();
                match judge(w, &stages, r.success_threshold, timed_out) {
                    Verdict::Watch => {}
                    Verdict::Pass => passed(state, &mut r, w, now).await,
                    Verdict::Halt(reason) => halted(state, &mut r, w, reason, now).await,
                }
            }
            None => match r.next_wave() {
                Some(next) if settled => {
                    let r = start_wave(state, r, next, online).await?;
                    return Ok(HeldRollout::saved(r));
                }
                Some(_) => {}
                None => {
                    r.state = RolloutState::Completed;
                    r.finished_at = Some(now);
                }
            },
        },
        _ => {}
    }
    let unsaved = unsaved || before.changed(&r);
    let due = saved_at.is_none_or(|at| at.elapsed() >= TICK);
    if !before.observed_only(&r) || (unsaved && due) {
        r.updated_at = Utc::now();
        return Ok(HeldRollout::saved(state.store().save_rollout(&r).await?));
    }
    Ok(HeldRollout {
        rollout: r,
        unsaved,
        saved_at,
    })
}

/// What a round may change of a rollout, as it was before the round: what
/// says whether a wave passed, halted or started (compared by
/// [`Before::observed_only`]), and the stages on their way — the only ones
/// a round that does not push changes ([`observe_stages`],
/// [`window_waits`]; a round that pushes saves what it did). A copy of the
/// whole rollout, 10,000 stages on a large one, cost a millisecond of every
/// round, the one that takes a wave's verdict too.
struct Before {
    state: RolloutState,
    waves: Vec<RolloutWave>,
    halt_reason: Option<String>,
    next_wave_at: Option<chrono::DateTime<Utc>>,
    finished_at: Option<chrono::DateTime<Utc>>,
    on_their_way: Vec<(usize, RolloutStage)>,
}

impl Before {
    fn of(r: &Rollout) -> Before {
        Before {
            state: r.state,
            waves: r.waves.clone(),
            halt_reason: r.halt_reason.clone(),
            next_wave_at: r.next_wave_at,
            finished_at: r.finished_at,
            on_their_way: r
                .stages
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state == StageRolloutState::Pushed)
                .map(|(i, s)| (i, s.clone()))
                .collect(),
        }
    }

    /// Whether `after` differs at most in what its stages' reports said
    /// (no verdict, no wave started, no state changed).
    fn observed_only(&self, after: &Rollout) -> bool {
        self.state == after.state
            && self.waves == after.waves
            && self.halt_reason == after.halt_reason
            && self.next_wave_at == after.next_wave_at
            && self.finished_at == after.finished_at
    }

    /// Whether the round changed anything of `after`.
    fn changed(&self, after: &Rollout) -> bool {
        !self.observed_only(after)
            || self
                .on_their_way
                .iter()
                .any(|(i, s)| after.stages.get(*i) != Some(s))
    }
}

/// The words a stage of a rollout shows while its outpost's delivery
/// window is closed.
const WINDOW_WAIT: &str = "waiting for delivery window";

/// Marks the pending stages of wave `w` whose outposts are outside their
/// delivery windows (`waiting for delivery window (opens …)`), and clears
/// the mark of those whose window opened. Returns whether any waits: the
/// wave then waits for them instead of timing out, since their releases
/// cannot arrive before the window opens. The timeout counts again from
/// when the last of them opened. (Unlike offline outposts they are not
/// carried along: an outpost outside its window is reachable and will run
/// the release soon, so it should count for the wave.)
fn window_waits(state: &AppState, r: &mut Rollout, w: usize, now: chrono::DateTime<Utc>) -> bool {
    let profiles = &state.links().profiles;
    let mut waiting = false;
    let mut opened = false;
    for s in r
        .stages
        .iter_mut()
        .filter(|s| s.wave as usize == w && s.state == StageRolloutState::Pushed && !s.carried)
    {
        match profiles.window(&s.outpost) {
            trellis_model::link_profile::WindowState::Closed { opens, .. } => {
                let message = format!("{WINDOW_WAIT} (opens {opens})");
                if s.message.as_deref() != Some(message.as_str()) {
                    s.message = Some(message);
                }
                waiting = true;
            }
            trellis_model::link_profile::WindowState::Open => {
                if s.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with(WINDOW_WAIT))
                {
                    s.message = None;
                    opened = true;
                }
            }
        }
    }
    if opened && !waiting {
        r.waves[w].window_opened_at = Some(now);
    }
    waiting
}

/// Takes in what the agents reported of the stages the release was pushed
/// to and that are not settled — of those `reports` names, and those whose
/// outposts are not linked here (their reports are committed elsewhere) —
/// and sets aside as offline the pending stages of the current wave whose
/// outpost is not linked. A report committed here as sent says what it
/// means itself ([`from_committed`]); the others are read from the store.
async fn observe_stages(
    state: &AppState,
    r: &mut Rollout,
    online: &Online<'_>,
    settled: bool,
    reports: &Reports,
) -> Result<(), StoreError> {
    // `None`: every stage on its way may have reported.
    let reported = match reports {
        Reports::Any => None,
        Reports::Stages(by_project) => Some(by_project.get(&r.project)),
    };
    // Each stage's way is chosen once, before the read: whether an
    // outpost is linked here can change while the read waits, and a stage
    // chosen on one answer and judged on the other would be taken for
    // deleted (failed).
    let looks = looks(r, reported, |outpost| online.here(outpost));
    // Only the stages still on their way are read: a round of a rollout
    // over 10,000 stages whose wave has 100 reads at most 100.
    if looks.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = looks
        .iter()
        .filter(|(_, look)| matches!(look, Look::Read))
        .map(|&(i, _)| r.stages[i].stage.clone())
        .collect();
    let by_name = summaries_named(state, &r.project, &names).await?;
    let current = r.current_wave();
    for (i, look) in looks {
        let s = &mut r.stages[i];
        let observed = if let Look::Committed(revision) = look {
            from_committed(s, revision)
        } else {
            let Some(summary) = by_name.get(s.stage.as_str()) else {
                s.state = StageRolloutState::Failed;
                s.message = Some("the stage was deleted".into());
                continue;
            };
            observe(
                s,
                summary.applied_revision,
                summary.applied_release,
                summary.report_state.as_deref(),
            )
        };
        if let Some((new, message)) = observed {
            s.state = new;
            s.message = message;
        } else if settled
            && !s.carried
            && current == Some(s.wave as usize)
            && !online.has(&s.outpost)
        {
            s.carried = true;
            s.message = Some(format!(
                "outpost {:?} went offline before applying; the release waits for its link",
                s.outpost
            ));
        }
    }
    Ok(())
}

/// How a round takes in a stage on its way.
#[derive(Debug, PartialEq)]
enum Look {
    /// Its report, committed here as sent, says it runs this revision.
    Committed(u64),
    /// From its record in the store.
    Read,
}

/// Which of `r`'s stages on their way a round takes in, and how, given
/// the reports committed here since the last round (`None`: any stage
/// may have reported, all are read; `Some(None)`: none of this project's)
/// and which outposts are linked here: a stage that reported is taken
/// from its report if that says what it runs and its outpost is here,
/// else read; one that did not is read only if its outpost is elsewhere
/// (its reports are committed there).
fn looks(
    r: &Rollout,
    reported: Option<Option<&CommittedStages>>,
    here: impl Fn(&str) -> bool,
) -> Vec<(usize, Look)> {
    r.stages
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state == StageRolloutState::Pushed)
        .filter_map(|(i, s)| {
            let Some(stages) = reported else {
                return Some((i, Look::Read));
            };
            let here = here(&s.outpost);
            let look = match stages.and_then(|stages| stages.get(&s.stage)) {
                Some(Committed::Runs(revision)) if here => Look::Committed(*revision),
                Some(_) => Look::Read,
                None if !here => Look::Read,
                None => return None,
            };
            Some((i, look))
        })
        .collect()
}

/// What a report committed as sent, with no failure, at `runs` says of
/// the stage: the store holds its newest release at or below `runs` as
/// applied, and a stage's releases take revisions in the order of their
/// numbers, so once `runs` reaches the revision of the rollout's release,
/// that release or a newer one is applied — what reading the store would
/// have told [`observe`].
fn from_committed(s: &RolloutStage, runs: u64) -> Option<(StageRolloutState, Option<String>)> {
    observe(s, runs, s.release, None)
}

/// The store's summaries of the rollout's stages that `which` picks, by
/// stage name: only those are read, not the project's every stage.
async fn summaries_of(
    state: &AppState,
    r: &Rollout,
    which: impl Fn(&RolloutStage) -> bool,
) -> Result<HashMap<String, trellis_store::StageSummary>, StoreError> {
    let names: Vec<String> = r
        .stages
        .iter()
        .filter(|s| which(s))
        .map(|s| s.stage.clone())
        .collect();
    summaries_named(state, &r.project, &names).await
}

/// The store's summaries of the project's stages `names`, by name (none
/// read if there are none).
async fn summaries_named(
    state: &AppState,
    project: &str,
    names: &[String],
) -> Result<HashMap<String, trellis_store::StageSummary>, StoreError> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(state
        .store()
        .stage_summaries_named(project, names)
        .await?
        .into_iter()
        .map(|s| (s.stage.name.clone(), s))
        .collect())
}

async fn passed(state: &AppState, r: &mut Rollout, w: usize, now: chrono::DateTime<Utc>) {
    state
        .rollout_counters()
        .waves_passed
        .fetch_add(1, Ordering::Relaxed);
    r.waves[w].outcome = Some(WaveOutcome::Passed);
    r.waves[w].finished_at = Some(now);
    tracing::info!(rollout = r.id, wave = w + 1, "wave passed");
    if r.next_wave().is_none() {
        r.state = RolloutState::Completed;
        r.finished_at = Some(now);
        audit(state, r, "rollout-completed", "every wave passed".into()).await;
        return;
    }
    match r.pause {
        // The next wave starts in the next round, which need not wait.
        WavePause::After { seconds: 0 } => state.rollout_counters().wake.notify_one(),
        WavePause::After { seconds } => {
            r.state = RolloutState::Waiting;
            r.next_wave_at = Some(
                now + chrono::Duration::seconds(i64::try_from(seconds).unwrap_or(i64::MAX / 1000)),
            );
        }
        WavePause::Manual => {
            r.state = RolloutState::Waiting;
            r.next_wave_at = None;
        }
    }
}

async fn halted(
    state: &AppState,
    r: &mut Rollout,
    w: usize,
    reason: String,
    now: chrono::DateTime<Utc>,
) {
    state
        .rollout_counters()
        .waves_halted
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(rollout = r.id, wave = w + 1, %reason, "rollout halted");
    r.waves[w].outcome = Some(WaveOutcome::Halted);
    r.waves[w].finished_at = Some(now);
    r.state = RolloutState::Halted;
    r.finished_at = Some(now);
    r.halt_reason = Some(reason.clone());
    audit(state, r, "rollout-halted", reason).await;
}

/// Starts wave `w` — notes each stage's release before it, and whether its
/// outpost is online — and pushes it, saving the start with the releases.
async fn start_wave(
    state: &AppState,
    mut r: Rollout,
    w: usize,
    online: &Online<'_>,
) -> Result<Rollout, StoreError> {
    let now = Utc::now();
    let read = Instant::now();
    let by_name = summaries_of(state, &r, |s| s.wave as usize == w).await?;
    let read = read.elapsed();
    r.waves[w].started_at = Some(now);
    for s in r.stages.iter_mut().filter(|s| s.wave as usize == w) {
        if let Some(summary) = by_name.get(s.stage.as_str()) {
            s.latest_before = summary.stage.latest_release;
            s.previous_release = summary.applied_release;
            s.outpost = summary.stage.outpost.clone();
        }
        s.carried = !online.has(&s.outpost);
        if s.carried {
            s.message = Some(format!(
                "outpost {:?} was offline when the wave started; the release waits for its link",
                s.outpost
            ));
        }
    }
    state
        .rollout_counters()
        .waves_started
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        rollout = r.id,
        wave = w + 1,
        stages = r.waves[w].stages,
        read_ms = read.as_secs_f64() * 1e3,
        "wave starts"
    );
    push_wave(state, r, w, Some(by_name)).await
}

/// Pushes the release to the stages of wave `w` that do not have it yet
/// (adopting pushes made before a restart), and saves the rollout with
/// the releases, in the push's own transaction: a restart finds both or
/// neither. `known`: the wave's stages as just read, if they were.
async fn push_wave(
    state: &AppState,
    mut r: Rollout,
    w: usize,
    known: Option<HashMap<String, trellis_store::StageSummary>>,
) -> Result<Rollout, StoreError> {
    let by_name = match known {
        Some(by_name) => by_name,
        None => {
            summaries_of(state, &r, |s| {
                s.wave as usize == w && s.state == StageRolloutState::Waiting
            })
            .await?
        }
    };
    let mut new = Vec::new();
    for s in r.stages.iter_mut() {
        if s.wave as usize != w || s.state != StageRolloutState::Waiting {
            continue;
        }
        let Some(stage) = by_name.get(s.stage.as_str()).map(|summary| &summary.stage) else {
            s.state = StageRolloutState::Failed;
            s.message = Some("the stage was deleted".into());
            continue;
        };
        if stage.archived_at.is_some() {
            s.state = StageRolloutState::Failed;
            s.message = Some("the stage is archived".into());
            continue;
        }
        if let Some(latest) = stage.latest_release
            && stage.latest_release != s.latest_before
        {
            // Pushed before a restart, not recorded.
            let release = state
                .store()
                .get_release(&r.project, &s.stage, latest)
                .await?;
            if release.build == r.build {
                s.pushed(&release);
                continue;
            }
        }
        let config = match &r.config {
            Some(name) => match state.store().get_config(&r.project, &s.stage, name).await {
                Ok(c) => Some(ConfigSnapshot {
                    name: c.name,
                    version: c.version,
                    data: c.data,
                }),
                Err(StoreError::NotFound { .. }) => {
                    s.state = StageRolloutState::Failed;
                    s.message = Some(format!("the stage has no config {name:?}"));
                    continue;
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        new.push(NewRelease {
            project: r.project.clone(),
            stage: s.stage.clone(),
            build: r.build.clone(),
            config,
            created_by: r.created_by.clone(),
        });
    }
    let now = Utc::now();
    r.updated_at = now;
    if new.is_empty() {
        return state.store().save_rollout(&r).await;
    }
    let push = Instant::now();
    let (r, pushed) = state.store().push_rollout_releases(&r, &new, now).await?;
    for outpost in &pushed.outposts {
        state.links().poke(outpost);
    }
    tracing::debug!(
        rollout = r.id,
        wave = w + 1,
        releases = new.len(),
        push_ms = push.elapsed().as_secs_f64() * 1e3,
        "wave pushed"
    );
    Ok(r)
}

/// Records what happened to the rollout in its project's audit log.
pub async fn audit(state: &AppState, r: &Rollout, action: &str, detail: String) {
    audit_as(state, r, DRIVER, action, detail).await;
}

pub async fn audit_as(state: &AppState, r: &Rollout, user: &str, action: &str, detail: String) {
    let entry = NewAuditEntry {
        time: Utc::now(),
        user: user.to_owned(),
        project: r.project.clone(),
        stage: String::new(),
        component: String::new(),
        outpost: String::new(),
        action: action.to_owned(),
        detail: format!("rollout {} of build {}: {detail}", r.id, r.build),
        result: "ok".into(),
    };
    if let Err(e) = state.store().record_audit(&entry).await {
        tracing::warn!(rollout = r.id, error = %e, "could not record a rollout in the audit log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_model::rollout::{NewRollout, WavePause, parse_waves};

    /// A running rollout of 200 stages in waves of 100, the first started,
    /// its stages in `states` (carried along where `true`), the rest
    /// applied.
    fn watching(states: &[(StageRolloutState, bool)]) -> Rollout {
        let stages = (0..200)
            .map(|i| (format!("s{i}"), format!("o{i}")))
            .collect();
        let (mut waves, mut stages) =
            NewRollout::plan("p", &parse_waves("50%,100%").unwrap(), stages);
        waves[0].started_at = Some(Utc::now());
        let mut given = states.iter();
        for s in stages.iter_mut().filter(|s| s.wave == 0) {
            (s.state, s.carried) = given
                .next()
                .copied()
                .unwrap_or((StageRolloutState::Applied, false));
        }
        Rollout {
            id: 1,
            project: "p".into(),
            build: "b".into(),
            config: None,
            selector: String::new(),
            waves,
            success_threshold: 9500,
            wave_timeout_seconds: 600,
            pause: WavePause::Manual,
            state: RolloutState::Running,
            halt_reason: None,
            next_wave_at: None,
            created_at: Utc::now(),
            created_by: "alice".into(),
            updated_at: Utc::now(),
            finished_at: None,
            version: 1,
            stages,
        }
    }

    #[test]
    fn a_wave_is_deciding_once_two_percent_or_ten_stages_are_left() {
        use StageRolloutState::{Applied, Failed, Pushed};
        // A wave of 100: ten left is deciding, eleven is not.
        assert!(deciding(&watching(&[(Pushed, false); 10])));
        assert!(!deciding(&watching(&[(Pushed, false); 11])));
        // Carried stages do not count as left; settled ones neither.
        assert!(deciding(&watching(&[
            (Pushed, false),
            (Pushed, true),
            (Pushed, true),
            (Failed, false),
        ])));
        // Nothing left: judged already, nothing to wait for.
        assert!(!deciding(&watching(&[(Applied, false)])));
        assert!(!deciding(&watching(&[(Pushed, true); 5])));
        // No wave watched.
        let mut between = watching(&[(Pushed, false)]);
        between.waves[0].outcome = Some(WaveOutcome::Passed);
        assert!(!deciding(&between));
    }

    /// A report committed as sent settles a stage once it runs the
    /// revision of the rollout's release or a later one, and only then.
    #[test]
    fn a_committed_report_applies_the_release_once_it_runs_its_revision() {
        let mut r = watching(&[(StageRolloutState::Pushed, false)]);
        let s = &mut r.stages[0];
        assert_eq!(from_committed(s, 10), None, "nothing pushed yet");
        (s.release, s.revision) = (Some(4), Some(10));
        assert_eq!(from_committed(s, 9), None);
        assert_eq!(
            from_committed(s, 10),
            Some((StageRolloutState::Applied, None))
        );
        assert_eq!(
            from_committed(s, 12),
            Some((StageRolloutState::Applied, None))
        );
    }

    /// A round takes a stage from its committed report only if the report
    /// says what it runs and the outpost is linked here; it reads stages
    /// whose reports do not, and those linked elsewhere; it leaves out the
    /// others, and every settled stage.
    #[test]
    fn a_round_takes_each_stage_from_its_report_or_the_store_once() {
        use StageRolloutState::{Applied, Pushed};
        let mut r = watching(&[(Pushed, false); 6]);
        r.stages[5].state = Applied;
        let name = |i: usize| r.stages[i].stage.clone();
        let mut stages = CommittedStages::new();
        stages.insert(name(0), Committed::Runs(7));
        stages.insert(name(1), Committed::Unclear);
        stages.insert(name(2), Committed::Runs(7));
        stages.insert(name(5), Committed::Runs(7));
        let elsewhere = [r.stages[2].outpost.clone(), r.stages[3].outpost.clone()];
        let here = |o: &str| !elsewhere.iter().any(|e| e == o);
        assert_eq!(
            looks(&r, Some(Some(&stages)), here),
            vec![
                (0, Look::Committed(7)),
                (1, Look::Read),
                (2, Look::Read),
                (3, Look::Read),
            ],
            "4 reported nothing and is here; 5 is settled"
        );
        assert_eq!(
            looks(&r, Some(None), here),
            vec![(2, Look::Read), (3, Look::Read)],
            "no report of the project: only those linked elsewhere"
        );
        let all = looks(&r, None, here);
        assert_eq!(all.len(), 5, "any may have reported: every one on its way");
        assert!(all.iter().all(|(_, look)| *look == Look::Read));
    }
}
