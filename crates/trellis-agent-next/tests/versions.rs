//! The two builds say the versions the update tests expect of them.

use std::process::Command;

#[test]
fn the_next_agent_reports_the_next_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis-agent-next"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("trellis-agent {}", trellis_agent_next::next_version())
    );
}

#[test]
fn the_broken_agent_claims_a_version_and_fails_to_run() {
    let bin = env!("CARGO_BIN_EXE_trellis-agent-broken");
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&trellis_agent_next::broken_version()));
    let run = Command::new(bin)
        .args(["run", "--data", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!run.status.success());
}
