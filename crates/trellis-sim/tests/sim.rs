//! The deterministic simulation in the normal test suite: three hubs over
//! one store and 50 agents under partitions, link cuts, half-open links,
//! agent and hub crashes, lost change notifications and delays, over 100
//! seeds (`TRELLIS_SIM_SEEDS` sets another count; the campaign command runs
//! 10,000, see RELIABILITY.md). A failing seed
//! is printed; `cargo run -p trellis-sim --release -- --first SEED --seeds 1`
//! replays it.

use trellis_sim::{SimConfig, run_seed};

#[test]
fn every_agent_converges_in_order_and_no_acknowledged_status_is_lost() {
    let seeds: u64 = std::env::var("TRELLIS_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let config = SimConfig::default();
    // Seeds are independent: spread them over the machine's cores.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let results: Vec<(u64, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut faults = 0;
                    let mut failures = Vec::new();
                    for seed in (t..seeds).step_by(threads as usize) {
                        match run_seed(seed, config) {
                            Ok(stats) => {
                                faults += stats.partitions
                                    + stats.agent_crashes
                                    + stats.hub_crashes
                                    + stats.link_cuts
                                    + stats.half_open
                            }
                            Err(violation) => failures.push(format!("seed {seed}: {violation}")),
                        }
                    }
                    (faults, failures)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    let faults: u64 = results.iter().map(|(f, _)| f).sum();
    let failures: Vec<String> = results.into_iter().flat_map(|(_, f)| f).collect();
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        faults > seeds * 10,
        "the simulation injected too few faults ({faults})"
    );
}
