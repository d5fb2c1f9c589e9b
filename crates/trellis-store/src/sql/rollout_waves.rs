//! A rollout as stored: its record without the stages (`rollouts.record`)
//! and its stages as one row of JSON per wave (`rollout_waves`), and which
//! of those rows a save writes.
//!
//! A rollout over 10,000 stages is 1.7 MB of JSON. A save serialized every
//! wave and had the database compare each with the stored row, though a
//! round of the rollout driver changes one wave or two: 2–3 ms of a core
//! on an idle machine, spent inside the write transaction — the one
//! writer's — on every save, and on the push that starts each wave, ahead
//! of the releases' commit. Now the store keeps, for each active rollout it
//! saved, its stages by wave as of the version it saved ([`SeenWaves`]),
//! and a save from that version serializes only the waves that differ.
//! A save from any other version (another instance saved since, the hub
//! restarted) writes every wave, as before. The version check of the save
//! itself makes this exact: a save succeeds only from the version stored,
//! and whatever this store saw at that version is what is stored.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use trellis_model::rollout::{Rollout, RolloutStage};

use super::json;
use crate::Result;

/// What is written of a rollout: its record without the stages, and the
/// waves (number, stages as JSON) whose rows must be written.
pub(super) struct Parts {
    pub head: String,
    pub waves: Vec<(i64, String)>,
}

/// A rollout's stages by wave, as stored at `version`.
pub(super) struct SeenWaves {
    version: u64,
    waves: BTreeMap<u32, Vec<RolloutStage>>,
}

/// The stages this store last saved of each active rollout (by id).
#[derive(Default)]
pub(super) struct WavesSeen(Mutex<HashMap<u64, SeenWaves>>);

impl WavesSeen {
    /// What this store saved of rollout `id`, if it is what is stored at
    /// `version` as far as it knows. Taken out: a save that fails leaves
    /// nothing behind, and a save it races with writes every wave.
    pub fn take(&self, id: u64, version: u64) -> Option<SeenWaves> {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match seen.remove(&id) {
            Some(waves) if waves.version == version => Some(waves),
            Some(older) if older.version > version => {
                // A save from an older version will be refused; keep what
                // the newer one left.
                seen.insert(id, older);
                None
            }
            _ => None,
        }
    }

    /// Keeps `waves`, committed as rollout `rollout.id` at `rollout.version`,
    /// while the rollout is active (it is saved again only while it is, bar
    /// a late stage or two); forgets it once it is not.
    pub fn keep(&self, rollout: &Rollout, waves: SeenWaves) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !rollout.state.is_active() {
            seen.remove(&rollout.id);
            return;
        }
        match seen.get(&rollout.id) {
            Some(newer) if newer.version > waves.version => {}
            _ => {
                seen.insert(rollout.id, waves);
            }
        }
    }
}

/// `rollout`'s parts to write, and its stages by wave as they will be
/// stored: of its waves, only those that differ from `seen` (the stored
/// ones, if known) are serialized and written.
pub(super) fn to_write(
    rollout: &mut Rollout,
    seen: Option<SeenWaves>,
) -> Result<(Parts, SeenWaves)> {
    // The record without its stages, serialized without copying them.
    let stages = std::mem::take(&mut rollout.stages);
    let head = json(rollout);
    rollout.stages = stages;
    let head = head?;

    let mut by_wave: BTreeMap<u32, Vec<&RolloutStage>> = BTreeMap::new();
    for stage in &rollout.stages {
        by_wave.entry(stage.wave).or_default().push(stage);
    }
    let mut stored = seen.map(|s| s.waves).unwrap_or_default();
    let mut waves = Vec::new();
    for (wave, stages) in by_wave {
        let same = stored.get(&wave).is_some_and(|was| {
            was.len() == stages.len() && was.iter().zip(&stages).all(|(a, b)| a == *b)
        });
        if same {
            continue;
        }
        waves.push((i64::from(wave), json(&stages)?));
        stored.insert(wave, stages.into_iter().cloned().collect());
    }
    Ok((
        Parts { head, waves },
        SeenWaves {
            version: rollout.version,
            waves: stored,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_model::rollout::StageRolloutState;

    fn stage(name: &str, wave: u32) -> RolloutStage {
        RolloutStage::planned(name.into(), format!("edge-{name}"), wave)
    }

    /// `r` saved (its parts made without knowing what is stored), and
    /// kept by `store`.
    fn saved(store: &WavesSeen, r: &mut Rollout) {
        let (_, seen) = to_write(r, None).unwrap();
        store.keep(r, seen);
    }

    fn rollout(version: u64, stages: Vec<RolloutStage>) -> Rollout {
        let json = serde_json::json!({
            "id": 7, "project": "shop", "build": "b1", "config": null,
            "selector": "site=a", "waves": [], "success_threshold": 10000,
            "wave_timeout_seconds": 60, "pause": {"kind": "after", "seconds": 0},
            "state": "running", "halt_reason": null, "next_wave_at": null,
            "created_at": "2026-12-07T00:00:00Z", "created_by": "ada",
            "updated_at": "2026-12-07T00:00:00Z", "finished_at": null,
            "version": version,
        });
        let mut r: Rollout = serde_json::from_value(json).expect("a rollout");
        r.stages = stages;
        r
    }

    fn written(parts: &Parts) -> Vec<i64> {
        parts.waves.iter().map(|(w, _)| *w).collect()
    }

    #[test]
    fn a_save_writes_only_the_waves_that_changed_since_the_version_it_saw() {
        let stages = vec![stage("a", 0), stage("b", 1), stage("c", 1), stage("d", 2)];
        let mut first = rollout(1, stages);
        let (parts, seen) = to_write(&mut first, None).unwrap();
        assert_eq!(written(&parts), [0, 1, 2], "nothing seen: every wave");
        assert!(!parts.head.contains("\"stages\":[{"), "{}", parts.head);

        let store = WavesSeen::default();
        store.keep(&first, seen);
        let mut second = first.clone();
        second.version = 2;
        second.stages[2].state = StageRolloutState::Pushed;
        let (parts, seen) = to_write(&mut second, store.take(7, 1)).unwrap();
        assert_eq!(written(&parts), [1]);
        let stored: Vec<RolloutStage> = serde_json::from_str(&parts.waves[0].1).unwrap();
        assert_eq!(stored, second.stages[1..3]);
        assert_eq!(second.stages.len(), 4, "the stages are given back");

        // Taken: a save racing with this one finds nothing and writes all.
        assert!(store.take(7, 2).is_none());
        store.keep(&second, seen);
        let (parts, _) = to_write(&mut second.clone(), store.take(7, 2)).unwrap();
        assert!(parts.waves.is_empty(), "nothing changed");
    }

    #[test]
    fn what_was_seen_at_another_version_is_not_trusted() {
        let store = WavesSeen::default();
        let mut r = rollout(3, vec![stage("a", 0)]);
        saved(&store, &mut r);
        assert!(store.take(7, 2).is_none(), "an older save");
        assert!(store.take(7, 3).is_some(), "kept past the older one");
        saved(&store, &mut r);
        assert!(store.take(7, 4).is_none(), "another instance saved 4");
        assert!(store.take(7, 3).is_none(), "forgotten once missed");
    }

    #[test]
    fn a_rollout_that_ended_is_forgotten() {
        let store = WavesSeen::default();
        let mut r = rollout(1, vec![stage("a", 0)]);
        saved(&store, &mut r);
        r.state = trellis_model::rollout::RolloutState::Completed;
        saved(&store, &mut r);
        assert!(store.take(7, 1).is_none());
    }
}
