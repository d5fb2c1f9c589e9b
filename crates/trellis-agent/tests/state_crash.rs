//! Crash safety with a real SIGKILL.
//!
//! The test binary re-executes itself as a child (`child_writer`, switched on
//! by an environment variable) that writes desired states and status reports
//! as fast as it can and prints a line after each call returns, i.e. after the
//! point where the real agent would acknowledge it to the hub. The parent kills
//! the child with SIGKILL at random moments, reopens the file each time and
//! checks that nothing acknowledged was lost and nothing went backwards.
//!
//! A failing run prints its seed; `TRELLIS_CRASH_SEED=<seed>` replays the same
//! kill delays (the child's timing still varies).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use trellis_agent::state::{AgentState, StageKey, StateOptions, StoreOutcome};

const CHILD_ENV: &str = "TRELLIS_AGENT_STATE_CRASH_CHILD";
const ROUNDS: usize = 20;
/// Large enough that the child never fills it, so every acknowledged report
/// must still be there (coalescing has its own tests).
const CAPACITY: usize = 1_000_000;

fn stages() -> [StageKey; 3] {
    [
        StageKey::new("crash", "a"),
        StageKey::new("crash", "b"),
        StageKey::new("crash", "c"),
    ]
}

fn open(path: &Path) -> AgentState {
    AgentState::open_with(
        path,
        StateOptions {
            outbox_capacity: CAPACITY,
        },
    )
    .unwrap_or_else(|err| panic!("the state file must always open after a kill: {err}"))
}

/// Child mode: runs only when the parent test starts this binary with
/// `CHILD_ENV` set; in a normal test run it returns at once.
#[test]
fn child_writer() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let state = match AgentState::open_with(
        Path::new(&path),
        StateOptions {
            outbox_capacity: CAPACITY,
        },
    ) {
        Ok(state) => state,
        Err(err) => {
            println!("open-failed {err}");
            return;
        }
    };
    let stages = stages();
    // Revisions continue from the newest held, so each store is newer.
    let mut n = 1 + stages
        .iter()
        .filter_map(|stage| state.desired(stage).unwrap().map(|(rev, _)| rev))
        .max()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30); // if the parent died
    while Instant::now() < deadline {
        let i = (n % 3) as usize;
        let outcome = state
            .store_desired(&stages[i], n, &json!({"rev": n, "pad": "d".repeat(300)}))
            .unwrap();
        assert_eq!(outcome, StoreOutcome::Stored);
        println!("desired {i} {n}");
        let seq = state
            .enqueue_status(&stages[i], &json!({"n": n, "pad": "s".repeat(300)}))
            .unwrap();
        println!("status {seq} {n}");
        n += 1;
    }
}

/// Kills the child if the parent's assertions fail mid-round.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn sigkill_at_any_moment_loses_nothing_acknowledged() {
    let seed = std::env::var("TRELLIS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut rng = seed;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.redb");
    let stages = stages();

    let mut acked_desired = [0u64; 3]; // newest revision acknowledged per stage
    let mut acked_reports: BTreeMap<u64, u64> = BTreeMap::new(); // seq -> n, not yet hub-acked
    let mut seq_floor = 0u64; // every later seq must be above this
    let mut hub_acked = 0u64;
    let mut total_lines = 0usize;
    let mut kills_mid_write = 0usize;

    for round in 0..ROUNDS {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let mut stdout = child.0.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        });

        // Round 0 dies early, likely while creating the file; later rounds at
        // any point of the write loop.
        let delay = if round == 0 {
            xorshift(&mut rng) % 15
        } else {
            20 + xorshift(&mut rng) % 250
        };
        std::thread::sleep(Duration::from_millis(delay));
        child.0.kill().unwrap(); // SIGKILL on Unix
        child.0.wait().unwrap();
        let out = reader.join().unwrap();

        // Only complete lines: a line cut by the kill acknowledges nothing.
        let complete = &out[..out.rfind('\n').map_or(0, |end| end + 1)];
        let mut lines_this_round = 0;
        for line in complete.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["desired", i, n] => {
                    let (i, n): (usize, u64) = (i.parse().unwrap(), n.parse().unwrap());
                    acked_desired[i] = acked_desired[i].max(n);
                    lines_this_round += 1;
                }
                ["status", seq, n] => {
                    let (seq, n): (u64, u64) = (seq.parse().unwrap(), n.parse().unwrap());
                    assert!(
                        seq > seq_floor,
                        "seed {seed} round {round}: seq {seq} reused or went back (floor {seq_floor})"
                    );
                    seq_floor = seq;
                    acked_reports.insert(seq, n);
                    lines_this_round += 1;
                }
                ["open-failed", ..] => panic!("seed {seed} round {round}: child: {line}"),
                _ => {} // the test harness's own output
            }
        }
        total_lines += lines_this_round;
        if lines_this_round > 0 {
            kills_mid_write += 1;
        }

        let state = open(&path);
        for (i, stage) in stages.iter().enumerate() {
            let held = state.desired(stage).unwrap();
            let held_rev = held.as_ref().map_or(0, |(rev, _)| *rev);
            assert!(
                held_rev >= acked_desired[i],
                "seed {seed} round {round}: stage {stage} holds revision {held_rev}, \
                 but {} was acknowledged",
                acked_desired[i]
            );
            if let Some((rev, value)) = held {
                assert_eq!(
                    value["rev"], rev,
                    "seed {seed}: state and revision disagree"
                );
                // What is held may be newer than the last printed line (killed
                // between commit and print): it becomes the floor.
                acked_desired[i] = rev;
            }
        }

        let pending: BTreeMap<u64, u64> = state
            .pending_status(hub_acked, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(seq, report)| (seq, report["n"].as_u64().unwrap()))
            .collect();
        for (seq, n) in &acked_reports {
            assert_eq!(
                pending.get(seq),
                Some(n),
                "seed {seed} round {round}: acknowledged report {seq} lost"
            );
        }
        let stats = state.outbox_stats().unwrap();
        assert!(
            stats.last_seq >= seq_floor,
            "seed {seed} round {round}: last seq {} went below {seq_floor}",
            stats.last_seq
        );
        assert_eq!(stats.dropped, 0);
        // Seqs committed but not printed count too: they must never be reused.
        seq_floor = stats.last_seq;

        // Play the hub: acknowledge about half of what is queued.
        if round % 2 == 1 && stats.last_seq > hub_acked {
            let up_to = hub_acked + (stats.last_seq - hub_acked) / 2;
            state.ack_status(up_to).unwrap();
            hub_acked = up_to;
            acked_reports.retain(|seq, _| *seq > up_to);
        }
        drop(state); // releases the file lock for the next child
    }

    eprintln!(
        "seed {seed}: {kills_mid_write} of {ROUNDS} kills hit a writing child; \
         {total_lines} acknowledgements, last seq {seq_floor}"
    );
    assert!(
        kills_mid_write >= ROUNDS / 2,
        "seed {seed}: only {kills_mid_write} of {ROUNDS} kills hit a writing child \
         ({total_lines} acknowledgements); the test proves little"
    );
}
