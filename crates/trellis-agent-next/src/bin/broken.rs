//! Says it is an agent, then fails at start (see the crate docs).

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("trellis-agent {}", trellis_agent_next::broken_version());
        return std::process::ExitCode::SUCCESS;
    }
    eprintln!("error: this agent build exits at start (it tests update rollback)");
    std::process::ExitCode::FAILURE
}
