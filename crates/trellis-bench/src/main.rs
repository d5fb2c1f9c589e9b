//! `trellis-bench`: benchmarks of the real hub, agent and CLI. Each command
//! sets up what it measures on this machine (a hub on loopback, an outpost
//! agent's fetcher, the `trellis` binary, the local container engine),
//! measures the compared things in the same run, and prints a table.
//!
//! Timing claims live here, not in tests: these machines are noisy, so
//! every timing is the median of several runs, alternating the order of
//! the compared operations.

mod agent;
mod artifacts;
mod console;
mod setup;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "trellis-bench",
    about = "Benchmarks of Trellis, printed as tables"
)]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Bytes moved by a second push and a second delivery of an image
    /// with 1% of one layer changed, and the time of a full first delivery
    /// against a plain HTTPS download of the same artifact from the same
    /// hub.
    Artifacts {
        /// Size of the generated image in MiB.
        #[arg(long, default_value_t = 200)]
        size_mib: u64,
        /// Timed runs of each delivery (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The `trellis` binary (default: next to this one).
        #[arg(long)]
        trellis: Option<PathBuf>,
        /// Where to put the hub, the project and the caches (default: the
        /// system's temporary directory). Needs about 8× the image size.
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// The real agent's memory and CPU while idle and while deploying a
    /// release, and the size of the binary it ships in.
    Agent {
        /// How long to measure the idle agent, in seconds.
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
        /// The `trellis` binary (default: next to this one).
        #[arg(long)]
        trellis: Option<PathBuf>,
        /// Extra environment for the agent, KEY=VALUE (repeatable).
        #[arg(long = "agent-env", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
    /// Server time of the console's pages with many stages in the store
    /// (the hub's router and SQLite store, in process).
    Console {
        /// Stages in the one project.
        #[arg(long, default_value_t = 1000)]
        stages: usize,
        /// Outposts the stages are spread over (plus the hub's own).
        #[arg(long, default_value_t = 20)]
        outposts: usize,
        /// Timed requests of each page.
        #[arg(long, default_value_t = 30)]
        runs: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.bench {
        Bench::Artifacts {
            size_mib,
            runs,
            trellis,
            work_dir,
        } => runtime.block_on(artifacts::run(artifacts::Settings {
            size: size_mib << 20,
            runs: runs.max(1),
            trellis: setup::trellis_binary(trellis)?,
            work_dir,
        })),
        Bench::Agent {
            idle_secs,
            trellis,
            env,
        } => runtime.block_on(agent::run(agent::Settings {
            idle: std::time::Duration::from_secs(idle_secs.max(1)),
            trellis: setup::trellis_binary(trellis)?,
            env,
        })),
        Bench::Console {
            stages,
            outposts,
            runs,
        } => runtime.block_on(console::run(console::Settings {
            stages,
            outposts: outposts.max(6),
            runs: runs.max(1),
        })),
    }
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}
