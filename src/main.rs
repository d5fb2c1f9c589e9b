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

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    trellis_agent::cli::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
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
