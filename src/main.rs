//! `trellis`: the one binary with every role — `hub`, `dev`, and the client
//! verbs a project owner uses (`create`, `push`, `list`, …).
//!
//! Exit codes: 0 success, 1 the user can fix the problem (bad input, a
//! refused request), 2 the hub or the transport failed.

mod cli;
mod client;
mod commands;
mod output;
mod settings;

use std::process::ExitCode;

use clap::Parser;

use crate::client::ClientError;

/// jemalloc, not the C library's allocator: a hub holding thousands of
/// links allocates transient buffers for every link-up (TLS handshake,
/// HTTP request) between the small allocations each link keeps, and glibc's
/// allocator leaves that freed memory stranded between them (hub RSS per
/// idle link 23.2 KiB with glibc, 20.1 KiB with jemalloc, at 15,000 links),
/// and spent a fifth of the hub's CPU in a 10,000-stage fan-out. Background
/// threads return unused pages to the system while the hub is idle.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    trellis_agent::cli::init_tracing();
    let runtime = match trellis_agent::cli::runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<ClientError>())
        .map_or(1, ClientError::exit_code)
}
