//! `trellis-faultproxy`: runs a [`FaultProxy`] driven by the line protocol of
//! [`trellis_faultproxy::control`] on stdin, so a chaos campaign or benchmark
//! script in another process can inject faults.
//!
//! ```text
//! trellis-faultproxy --listen 127.0.0.1:0 --upstream 127.0.0.1:7443
//! ```
//!
//! On start it prints `listening ADDR` (the real address, useful with port
//! 0) on stdout; then it answers every command line with one line: `ok`, the
//! requested data, or `error: ...`. When stdin closes it shuts the proxy down
//! and exits, so a proxy never outlives the script that drives it. Logs go to
//! stderr (`RUST_LOG` filters them).

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::{AsyncBufReadExt, BufReader};
use trellis_faultproxy::FaultProxy;
use trellis_faultproxy::control::{Command, parse_line};

const USAGE: &str = "usage: trellis-faultproxy --listen ADDR --upstream ADDR";

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen = None;
    let mut upstream = None;
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--listen" => &mut listen,
            "--upstream" => &mut upstream,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        };
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs an address\n{USAGE}"))?;
        let addr = value
            .parse::<SocketAddr>()
            .map_err(|e| format!("{flag} {value:?}: {e}"))?;
        *slot = Some(addr);
    }
    match (listen, upstream) {
        (Some(listen), Some(upstream)) => Ok(Args { listen, upstream }),
        _ => Err(USAGE.to_string()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let proxy = match FaultProxy::start_on(args.listen, args.upstream).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("trellis-faultproxy: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    // Rust's stdout is line-buffered, so each answer reaches a pipe at once.
    println!("listening {}", proxy.addr());

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                eprintln!("trellis-faultproxy: reading stdin: {e}");
                break;
            }
        };
        match parse_line(&line) {
            Ok(None) => {}
            Ok(Some(Command::Set(mode))) => {
                proxy.set(mode);
                println!("ok");
            }
            Ok(Some(Command::Reset)) => {
                proxy.drop_connections();
                println!("ok");
            }
            Ok(Some(Command::Stats)) => {
                let s = proxy.stats();
                println!(
                    "accepted={} active={} up={} down={}",
                    s.accepted, s.active, s.bytes_up, s.bytes_down
                );
            }
            Ok(Some(Command::Mode)) => println!("{}", proxy.mode()),
            Err(e) => println!("error: {e}"),
        }
    }
    proxy.shutdown().await;
    ExitCode::SUCCESS
}
