//! The agent, reporting the next version (see the crate docs).

fn main() -> std::process::ExitCode {
    trellis_agent::cli::standalone_main(Some(trellis_agent_next::next_version()))
}
