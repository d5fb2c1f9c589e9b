//! `trellis-agent`: the Outpost Agent on its own, for hosts that need
//! nothing else — a fraction of the size of the `trellis` binary (no hub,
//! no client verbs). Same commands as `trellis agent …`.
//!
//! Exit codes: 0 stopped when told to, 1 the agent could not start or
//! stopped on an error (the message says which and what to do).

use std::process::ExitCode;

use clap::Parser;
use trellis_agent::cli::{AgentCommand, execute, init_tracing};

/// The Trellis Outpost Agent: runs the stages the hub places on this host
#[derive(Debug, Parser)]
#[command(name = "trellis-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: AgentCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // At most two worker threads, whatever the host's cores: enough for the
    // link, the reconciler and a delivery at once, and the agent's memory
    // does not grow with the core count (each worker is a thread with its
    // own stack and allocator arena).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(execute(cli.command, "trellis-agent")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
