//! Processes the tests and benchmarks leave behind.

use std::path::Path;
use std::process::{Command, Stdio};

/// Kills (SIGKILL) every process whose working directory is under `dir`:
/// the stage processes an agent started there, which outlive the agent by
/// design. Tests call it (through the process guards) so nothing leaks.
pub fn kill_processes_under(dir: &Path) {
    // A directory already deleted cannot be canonicalised, but the
    // processes that had their working directory in it still run (their
    // `cwd` reads `… (deleted)`, under the same path): match the path as
    // given then.
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(cwd) = std::fs::read_link(entry.path().join("cwd"))
            && cwd.starts_with(&dir)
        {
            let _ = Command::new("kill")
                .args(["-9", pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
