//! Metered links end to end with the real binaries: an outpost's link
//! profile (heartbeat, delivery cap, delivery windows) set with `trellis
//! update outpost`, applied by the hub and followed by a real agent.
//!
//! Windows are judged by the hub's clock, injected here through the file
//! `TRELLIS_HUB_CLOCK_FILE` names: the test moves time, it does not wait
//! for it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{AgentProcess, Cli, HubProcess, git_project, join_command, wait_until};

const MANIFEST: &str = "version: v1
components:
  - name: logger
    process:
      path: ./bin
      command: [\"sh\", \"./run.sh\"]
";

/// Bytes of incompressible payload in the build: what a delivery moves.
const PAYLOAD: usize = 4 * 1024 * 1024;

struct World {
    tmp: tempfile::TempDir,
    hub: HubProcess,
    cli: Cli,
}

/// Deterministic bytes no compressor shrinks (xorshift64*).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn world(hub_args: &[&str], clock: Option<&Path>) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(hub_args);
    let env: Vec<(&str, &Path)> = clock
        .map(|c| vec![("TRELLIS_HUB_CLOCK_FILE", c)])
        .unwrap_or_default();
    let hub = HubProcess::start_with_env(&tmp.path().join("hub"), &args, &env);
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "plant"]);
    let app = tmp.path().join("app");
    git_project(
        &app,
        &[
            ("trellis.yaml", MANIFEST),
            (
                "bin/run.sh",
                "#!/bin/sh\necho up\nwhile [ -e \"$PWD/run.sh\" ]; do sleep 1; done\n",
            ),
        ],
    );
    std::fs::write(app.join("bin/payload.bin"), noise(PAYLOAD)).unwrap();
    common::git_commit(&app, "payload");
    let out = cli.run_in(&app, &["push", "build", "-p", "plant"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    World { tmp, hub, cli }
}

impl World {
    /// Registers an outpost, sets its profile, joins an agent to it and
    /// places a stage there; returns the agent.
    fn outpost(&self, name: &str, profile: &[&str], stages: &[&str]) -> AgentProcess {
        let out = self.cli.ok(&["create", "outpost", name]);
        let mut update = vec!["update", "outpost", name];
        update.extend_from_slice(profile);
        if !profile.is_empty() {
            self.cli.ok(&update);
        }
        let uri = self.cli.ok(&["get", "outpost-uri", name]).trim().to_owned();
        let agent = AgentProcess::join(
            &join_command(&out),
            &self.tmp.path().join(format!("agent-{name}")),
        );
        wait_until("the agent to link", Duration::from_secs(30), || {
            self.cli.json(&["validate", "outpost-uri", &uri])["link"]["state"] == "online"
        });
        for stage in stages {
            self.cli.ok(&[
                "create",
                "stage",
                stage,
                "-p",
                "plant",
                "--outpost-uri",
                &uri,
            ]);
        }
        agent
    }

    fn status(&self, stage: &str) -> serde_json::Value {
        self.cli.json(&["status", "stage", stage, "-p", "plant"])
    }
}

#[test]
fn a_capped_delivery_takes_its_size_over_the_cap_while_the_link_keeps_talking() {
    let w = world(&[], None);
    let _agent = w.outpost(
        "cell-1",
        &["--bandwidth", "1MiB/s", "--heartbeat", "5s"],
        &["line", "spare"],
    );
    let profile = w.cli.json(&["get", "outpost", "cell-1"]);
    assert_eq!(profile["link_profile"]["bandwidth"], "1MiB/s", "{profile}");
    assert_eq!(profile["link_profile"]["heartbeat_secs"], 5, "{profile}");

    let pushed = Instant::now();
    w.cli.ok(&["push", "release", "-p", "plant", "-s", "line"]);
    let mut progress = Vec::new();
    let mut spare_acked_during_delivery = false;
    let mut spare_pushed = false;
    let mut delivered_at = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let s = w.status("line");
        let d = &s["sync"]["delivery"];
        let fetched = d["fetched"].as_u64().unwrap_or(0);
        let total = d["total"].as_u64().unwrap_or(u64::MAX);
        if progress.last() != Some(&fetched) {
            progress.push(fetched);
        }
        if fetched >= total || s["sync"]["applied_release"] == 1 {
            delivered_at = Some(pushed.elapsed());
            break;
        }
        if fetched > 0 && !spare_pushed {
            // Mid-delivery: a desired state for another stage on the same
            // link must get through (and be acknowledged) at once.
            w.cli.ok(&["push", "release", "-p", "plant", "-s", "spare"]);
            spare_pushed = true;
        }
        if spare_pushed {
            let spare = w.status("spare");
            if spare["sync"]["delivered_revision"] == spare["sync"]["desired_revision"] {
                spare_acked_during_delivery = true;
            }
            assert!(
                s["link"]["state"] == "online",
                "the link stays up during the delivery: {s}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = delivered_at.expect("the capped delivery finished within 60 s");
    eprintln!("{PAYLOAD} B at 1 MiB/s: pushed → delivered in {took:?}; progress seen {progress:?}");
    let floor = Duration::from_secs_f64(PAYLOAD as f64 / (1024.0 * 1024.0));
    assert!(
        took >= floor,
        "a delivery of {PAYLOAD} B under a 1 MiB/s cap took {took:?}, less than {floor:?}"
    );
    assert!(
        progress.iter().filter(|&&f| f > 0).count() >= 2,
        "progress frames kept arriving over the link during the delivery: {progress:?}"
    );
    assert!(
        spare_acked_during_delivery,
        "another stage's desired state was acknowledged while the delivery was under way"
    );
    wait_until("the release to run", Duration::from_secs(60), || {
        w.status("line")["sync"]["applied_release"] == 1
    });
    let _ = &w.hub;
}

#[test]
fn a_closed_window_holds_the_delivery_until_it_opens() {
    let clock_dir = tempfile::tempdir().unwrap();
    let clock = clock_dir.path().join("now");
    // Monday 13:00 in Berlin: outside weekday nights.
    std::fs::write(&clock, "2026-12-07T12:00:00Z").unwrap();
    let w = world(&[], Some(&clock));
    let _agent = w.outpost(
        "cell-2",
        &[
            "--windows",
            "mon-fri 22:00-06:00",
            "--timezone",
            "Europe/Berlin",
        ],
        &["line"],
    );
    let shown = w.cli.ok(&["get", "outpost", "cell-2"]);
    assert!(
        shown.contains("waiting for delivery window (opens 22:00 Europe/Berlin)"),
        "{shown}"
    );
    w.cli.ok(&["push", "release", "-p", "plant", "-s", "line"]);
    wait_until(
        "the desired state to arrive and the delivery to wait",
        Duration::from_secs(30),
        || {
            let s = w.status("line");
            s["sync"]["delivered_revision"] == s["sync"]["desired_revision"]
                && s["sync"]["delivery"]["step"]
                    == "waiting for delivery window (opens 22:00 Europe/Berlin)"
        },
    );
    // Held, not just slow: nothing moves while the window is closed.
    std::thread::sleep(Duration::from_secs(3));
    let s = w.status("line");
    assert_eq!(s["sync"]["delivery"]["fetched"], 0, "{s}");
    assert!(s["sync"]["applied_release"].is_null(), "{s}");
    let out = w.cli.run(&["status", "stage", "line", "-p", "plant"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("waiting for delivery window (opens 22:00 Europe/Berlin)"),
        "{text}"
    );

    // 22:00:30 in Berlin: the window is open.
    std::fs::write(&clock, "2026-12-07T21:00:30Z").unwrap();
    wait_until("the release to run", Duration::from_secs(60), || {
        w.status("line")["sync"]["applied_release"] == 1
    });
    let _ = &w.hub;
}

#[test]
fn a_300s_heartbeat_reaches_the_agent_and_offline_detection_follows_it() {
    // The hub's own heartbeat is 2 s: a silent agent is offline after 4 s.
    let w = world(&["--heartbeat-secs", "2"], None);
    let agent = w.outpost("cell-3", &["--heartbeat", "300s"], &[]);
    let profile = w.cli.json(&["get", "outpost", "cell-3"]);
    assert_eq!(profile["link_profile"]["heartbeat_secs"], 300, "{profile}");
    assert_eq!(
        profile["link_profile"]["heartbeat_default"], false,
        "{profile}"
    );
    let uri = w
        .cli
        .ok(&["get", "outpost-uri", "cell-3"])
        .trim()
        .to_owned();
    let link = || w.cli.json(&["validate", "outpost-uri", &uri])["link"]["state"].clone();

    // Freeze the agent: its connection stays open, it says nothing.
    let pid = agent.child.id().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(stop.success());
    // Under the hub's 2 s it would be offline by now; under its own 300 s
    // it is not.
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        link(),
        "online",
        "a 300 s heartbeat tolerates 10 s of silence"
    );

    // Back to a short heartbeat: silence is judged by it at once.
    w.cli
        .ok(&["update", "outpost", "cell-3", "--heartbeat", "5s"]);
    let changed = Instant::now();
    wait_until(
        "offline under a 5 s heartbeat",
        Duration::from_secs(30),
        || link() == "offline",
    );
    eprintln!(
        "offline {:?} after the heartbeat became 5 s",
        changed.elapsed()
    );
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    let _ = &w.hub;
}

#[test]
fn bad_link_profiles_are_refused_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "outpost", "cell-4"]);
    let cases: [(&[&str], &str); 5] = [
        (
            &["--windows", "mon-fry 22:00-06:00"],
            "at character 5 (\"fry\"): \"fry\" is not a day",
        ),
        (
            &["--timezone", "Europe/Berlinn"],
            "did you mean Europe/Berlin?",
        ),
        (&["--heartbeat", "2h"], "outside 5 s to 3600 s"),
        (&["--heartbeat", "1s"], "outside 5 s to 3600 s"),
        (&["--bandwidth", "fast"], "bandwidth \"fast\""),
    ];
    for (args, expected) in cases {
        let mut command = vec!["update", "outpost", "cell-4"];
        command.extend_from_slice(args);
        let out = cli.run(&command);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // Nothing was changed by the refusals.
    let profile = cli.json(&["get", "outpost", "cell-4"]);
    assert_eq!(profile["link_profile"]["windows"], "always", "{profile}");
    assert_eq!(
        profile["link_profile"]["heartbeat_default"], true,
        "{profile}"
    );
    assert_eq!(profile["link_profile"]["bandwidth"], "none", "{profile}");
}
