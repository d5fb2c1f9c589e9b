//! Agent self-update, end to end with the real binaries: a hub, one outpost
//! whose agent is the standalone `trellis-agent` (copied to a directory of
//! its own, as an install puts it), and a stage with a process component.
//!
//! - Updated from version A (the `trellis-agent` build) to B
//!   (`trellis-agent-next`, the same agent reporting `<version>-next`): the
//!   agent fetches B as chunks, swaps its binary and restarts as it under
//!   the same pid; the component keeps its pid, and B links and applies the
//!   next release.
//! - Updated to a binary that says it is an agent but exits at start
//!   (`trellis-agent-broken`): the watchdog puts B back by itself, B links
//!   again, the update is reported failed with the reason, and the
//!   component still keeps its pid.
//! - A version held only for another architecture, an unknown version, a
//!   selector that matches nothing, an outpost being updated already: each
//!   refused with nothing changed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Cli, HubProcess, git_project, join_command, wait_until};
use serde_json::Value;

const MANIFEST: &str = r#"version: v1
components:
  - name: app
    process:
      path: ./app
      command: ["sh", "./run.sh"]
"#;

const RUN_SH: &str = "#!/bin/sh\nexec sleep 100000\n";

/// A binary built beside `trellis` in the same target directory.
fn sibling(name: &str) -> PathBuf {
    let path = common::bin().with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p trellis-agent -p trellis-agent-next` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// The version a binary reports.
fn version_of(bin: &Path) -> String {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("trellis-agent ")
        .unwrap_or_else(|| panic!("{} --version said {text:?}", bin.display()))
        .to_owned()
}

/// The outpost's row of `GET /agent-updates`, through `list outposts`.
fn agent_row(cli: &Cli) -> String {
    cli.ok(&["list", "outposts"])
        .lines()
        .find(|l| l.contains("edge-1"))
        .unwrap_or_default()
        .to_owned()
}

fn component_ids(cli: &Cli) -> Vec<Value> {
    let status = cli.json(&["status", "stage", "line", "-p", "plant"]);
    status["components"][0]["ids"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `trellis update outposts -l SELECTOR --agent-version VERSION`, which
/// must fail; returns the error as printed.
fn update_refused(cli: &Cli, selector: &str, version: &str) -> String {
    cli.err(&[
        "update",
        "outposts",
        "-l",
        selector,
        "--agent-version",
        version,
    ])
}

/// Kills every process whose command line names `dir` (the agent, after
/// the watchdog restarted it, is no longer the test's child).
fn kill_under(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        kill_under(&self.0);
        // The components: their working directories are under it.
        trellis_testkit::procs::kill_processes_under(&self.0);
    }
}

#[test]
fn an_agent_updates_itself_keeps_its_components_and_rolls_back_one_that_does_not_start() {
    let agent_a = sibling("trellis-agent");
    let agent_b = sibling("trellis-agent-next");
    let broken = sibling("trellis-agent-broken");
    let (version_a, version_b, version_broken) = (
        version_of(&agent_a),
        version_of(&agent_b),
        version_of(&broken),
    );
    assert_ne!(version_a, version_b);

    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));

    // The hub holds the three builds.
    for (bin, version) in [
        (&agent_a, &version_a),
        (&agent_b, &version_b),
        (&broken, &version_broken),
    ] {
        cli.ok(&[
            "upload",
            "agent-binary",
            bin.to_str().unwrap(),
            "--version",
            version,
        ]);
    }

    // The agent runs from its own copy of A, under its own directory.
    let home = tmp.path().join("edge");
    let _cleanup = Cleanup(home.clone());
    std::fs::create_dir_all(home.join("bin")).unwrap();
    let exe = home.join("bin/trellis-agent");
    std::fs::copy(&agent_a, &exe).unwrap();
    let created = cli.ok(&["create", "outpost", "edge-1", "--label", "site=plant7"]);
    let join = join_command(&created);
    let words: Vec<&str> = join.split_whitespace().collect();
    let mut agent = std::process::Command::new(&exe)
        .args(&words[2..])
        .args([
            "--no-containers",
            "--health-window",
            "6s",
            "--settle-time",
            "1s",
        ])
        .arg("--data")
        .arg(home.join("data"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent_pid = agent.id();

    cli.ok(&["create", "project", "plant"]);
    let uri = cli.ok(&["get", "outpost-uri", "edge-1"]).trim().to_owned();
    cli.ok(&[
        "create",
        "stage",
        "line",
        "-p",
        "plant",
        "--outpost-uri",
        &uri,
    ]);
    let app = tmp.path().join("app");
    git_project(&app, &[("trellis.yaml", MANIFEST), ("app/run.sh", RUN_SH)]);
    cli.ok_in(&app, &["push", "build", "-p", "plant"]);
    cli.ok(&["push", "release", "-p", "plant", "-s", "line"]);
    let running = |release: u64| {
        move |cli: &Cli| {
            let s = cli.json(&["status", "stage", "line", "-p", "plant"]);
            let ok = s["sync"]["state"] == "in-sync"
                && s["sync"]["applied_release"] == release
                && s["components"][0]["state"] == "running";
            if !ok {
                eprintln!("waiting for release {release}: {s}");
            }
            ok
        }
    };
    wait_until("release 1 runs", Duration::from_secs(60), || {
        running(1)(&cli)
    });
    let ids = component_ids(&cli);
    assert!(!ids.is_empty(), "the component has a pid");
    assert!(agent_row(&cli).contains(&version_a), "{}", agent_row(&cli));

    // --- A → B ---
    let out = cli.ok(&[
        "update",
        "outposts",
        "-l",
        "site=plant7",
        "--agent-version",
        &version_b,
        "--deadline",
        "60s",
    ]);
    assert!(out.contains("edge-1"), "{out}");
    // One update at a time.
    let err = update_refused(&cli, "site=plant7", &version_broken);
    assert!(err.contains("already being updated"), "{err}");
    wait_until("the agent runs B", Duration::from_secs(90), || {
        let row = agent_row(&cli);
        row.contains(&format!("{version_b} applied"))
    });
    let row = agent_row(&cli);
    assert!(row.contains(&format!(" {version_b} ")), "{row}");
    // Same process (it exec'd B), B's bytes in place, the component untouched.
    assert_eq!(
        std::fs::read_link(format!("/proc/{agent_pid}/exe")).unwrap(),
        exe
    );
    assert_eq!(
        std::fs::read(&exe).unwrap(),
        std::fs::read(&agent_b).unwrap()
    );
    assert_eq!(component_ids(&cli), ids, "the component kept its pid");
    // B works: a new release arrives and runs.
    cli.ok(&["push", "release", "-p", "plant", "-s", "line"]);
    wait_until("release 2 runs under B", Duration::from_secs(60), || {
        running(2)(&cli)
    });
    let ids = component_ids(&cli);

    // --- B → a binary that exits at start: rolled back to B ---
    cli.ok(&[
        "update",
        "outpost",
        "edge-1",
        "--agent-version",
        &version_broken,
        "--deadline",
        "30s",
    ]);
    wait_until(
        "the broken update is rolled back",
        Duration::from_secs(120),
        || agent_row(&cli).contains(&format!("{version_broken} failed")),
    );
    let row = agent_row(&cli);
    assert!(row.contains("rolled back"), "{row}");
    assert!(row.contains(&format!(" {version_b} ")), "{row}");
    assert_eq!(
        std::fs::read(&exe).unwrap(),
        std::fs::read(&agent_b).unwrap()
    );
    // The first agent process exited (as the broken binary); the watchdog
    // became the restored agent.
    let _ = agent.wait();
    wait_until("B is linked again", Duration::from_secs(60), || {
        running(2)(&cli)
    });
    assert_eq!(component_ids(&cli), ids, "the component kept its pid");

    // --- refusals, nothing changed ---
    // An ELF for another machine (A with its e_machine set to aarch64).
    let mut foreign = std::fs::read(&agent_a).unwrap();
    foreign[18..20].copy_from_slice(&0xb7u16.to_le_bytes());
    let foreign_path = tmp.path().join("trellis-agent-arm64");
    std::fs::write(&foreign_path, &foreign).unwrap();
    cli.ok(&[
        "upload",
        "agent-binary",
        foreign_path.to_str().unwrap(),
        "--version",
        "9.9.9",
        "--arch",
        "aarch64",
    ]);
    let err = update_refused(&cli, "site=plant7", "9.9.9");
    assert!(
        err.contains("edge-1 runs on amd64") || err.contains("edge-1 runs on"),
        "{err}"
    );
    assert!(err.contains("nothing was done"), "{err}");
    let err = update_refused(&cli, "site=plant7", "7.7.7");
    assert!(err.contains("holds no agent 7.7.7"), "{err}");
    let err = update_refused(&cli, "site=nowhere", &version_a);
    assert!(err.contains("no outpost matches"), "{err}");
    let err = update_refused(&cli, "site=plant7", "not a version");
    assert!(err.contains("not an agent version"), "{err}");
    let row = agent_row(&cli);
    assert!(row.contains(&format!("{version_broken} failed")), "{row}");
}
