//! `trellis-agent`: the Outpost Agent on its own, for hosts that need
//! nothing else — a fraction of the size of the `trellis` binary (no hub,
//! no client verbs). Same commands as `trellis agent …`.
//!
//! Exit codes: 0 stopped when told to, 1 the agent could not start or
//! stopped on an error (the message says which and what to do).

fn main() -> std::process::ExitCode {
    trellis_agent::cli::standalone_main(None)
}
