//! The fault campaign: runs the simulation over many seeds and prints every
//! violation with the seed that reproduces it.
//!
//! `trellis-sim [--seeds N] [--first SEED] [--agents N] [--hubs N]`

use std::time::Instant;

use trellis_sim::{SimConfig, run_seed};

fn main() -> std::process::ExitCode {
    let mut seeds: u64 = 10_000;
    let mut first: u64 = 0;
    let mut config = SimConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--seeds", Some(v)) => seeds = v,
            ("--first", Some(v)) => first = v,
            ("--agents", Some(v)) => config.agents = usize::try_from(v).unwrap_or(50).max(1),
            ("--hubs", Some(v)) => config.hubs = usize::try_from(v).unwrap_or(3).max(1),
            _ => {
                eprintln!("usage: trellis-sim [--seeds N] [--first SEED] [--agents N] [--hubs N]");
                return std::process::ExitCode::from(1);
            }
        }
    }
    let started = Instant::now();
    let mut violations = 0u64;
    let mut totals = trellis_sim::SimStats::default();
    for seed in first..first + seeds {
        match run_seed(seed, config) {
            Ok(s) => totals.add(&s),
            Err(violation) => {
                violations += 1;
                println!("seed {seed}: VIOLATION: {violation}");
            }
        }
        if (seed - first + 1).is_multiple_of(100) {
            eprintln!(
                "{} seeds, {violations} violations, {:.0?}",
                seed - first + 1,
                started.elapsed()
            );
        }
    }
    println!(
        "{seeds} seeds × {} agents × {} hubs: {violations} violations; {} releases, {} partitions, \
         {} link cuts, {} half-open links, {} agent crashes, {} hub crashes, {} notifications \
         lost, {} sessions fenced, {} applies; {:.1?}",
        config.agents,
        config.hubs,
        totals.releases,
        totals.partitions,
        totals.link_cuts,
        totals.half_open,
        totals.agent_crashes,
        totals.hub_crashes,
        totals.notifications_lost,
        totals.fenced,
        totals.applies,
        started.elapsed()
    );
    if violations == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}
