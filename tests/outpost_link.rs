//! Outposts end to end with the real binaries: a hub, `trellis agent join`,
//! stages placed with an Outpost URI, releases caught up after an outage,
//! the connection status.

mod common;

use std::time::{Duration, Instant};

use common::{AgentProcess, Cli, HubProcess, git_project, join_command, wait_until};

const MANIFEST: &str = "version: v1
components:
  - name: bridge
    process:
      path: ./bin
      command: [\"sh\", \"./bridge.sh\"]
";

struct World {
    tmp: tempfile::TempDir,
    hub: HubProcess,
    cli: Cli,
}

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "plant"]);
    let app = tmp.path().join("app");
    git_project(
        &app,
        &[
            ("trellis.yaml", MANIFEST),
            (
                "bin/bridge.sh",
                "#!/bin/sh\necho bridge up\n# Runs until its directory goes away (the test cleans up), so nothing leaks.\nwhile [ -e \"$PWD/bridge.sh\" ]; do sleep 1; done\n",
            ),
        ],
    );
    let out = cli.run_in(&app, &["push", "build", "-p", "plant"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    World { tmp, hub, cli }
}

impl World {
    /// Registers an outpost; returns its join command and URI.
    fn outpost(&self, name: &str) -> (String, String) {
        let out = self
            .cli
            .ok(&["create", "outpost", name, "--label", "site=plant-3"]);
        let uri = self.cli.ok(&["get", "outpost-uri", name]).trim().to_owned();
        (join_command(&out), uri)
    }

    fn status(&self, stage: &str) -> serde_json::Value {
        self.cli.json(&["status", "stage", stage, "-p", "plant"])
    }

    fn release_states(&self, stage: &str) -> Vec<String> {
        let list = self
            .cli
            .json(&["list", "release", "-p", "plant", "-s", stage]);
        let mut v: Vec<(u64, String)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["number"].as_u64().unwrap(),
                    r["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, s)| s).collect()
    }
}

#[test]
fn an_online_outpost_stage_runs_its_release() {
    let w = world();
    let (join, uri) = w.outpost("factory-7");
    let agent = AgentProcess::join(&join, &w.tmp.path().join("agent"));
    wait_until("the agent to link", Duration::from_secs(30), || {
        let d = w.cli.json(&["validate", "outpost-uri", &uri]);
        d["link"]["state"] == "online"
    });
    // Validation now describes the agent's host.
    let d = w
        .cli
        .json(&["validate", "outpost-uri", &uri, "-p", "plant"]);
    assert_eq!(d["agent"]["os"], std::env::consts::OS, "{d}");
    assert!(d["agent"]["cpus"].as_u64().unwrap() >= 1, "{d}");

    let started = Instant::now();
    w.cli.ok(&[
        "create",
        "stage",
        "line3",
        "-p",
        "plant",
        "--type",
        "prod",
        "--outpost-uri",
        &uri,
    ]);
    w.cli.ok(&["push", "release", "-p", "plant", "-s", "line3"]);
    wait_until("in-sync", Duration::from_secs(40), || {
        let s = w.status("line3");
        s["sync"]["state"] == "in-sync" && s["sync"]["applied_release"] == 1
    });
    // In-sync means running and healthy: the health check's settle time
    // (3 s by default) is part of it. The link's own latency is measured
    // by the benchmark harness, not here.
    let took = started.elapsed();
    eprintln!("create stage + push release → in-sync (running, settled) took {took:?}");
    let s = w.status("line3");
    assert_eq!(s["link"]["state"], "online");
    assert!(s["link"]["agent_version"].is_string());
    // The release runs on the outpost.
    let bridge = &s["components"][0];
    assert_eq!(bridge["name"], "bridge", "{s:#}");
    assert_eq!(bridge["state"], "running", "{s:#}");
    assert_eq!(bridge["release"], 1, "{s:#}");
    drop(agent);
}

#[test]
fn releases_pushed_while_the_outpost_is_offline_are_caught_up_newest_only() {
    let w = world();
    let (join, uri) = w.outpost("factory-8");
    // Stage created while no agent has ever connected.
    w.cli.ok(&[
        "create",
        "stage",
        "line4",
        "-p",
        "plant",
        "--type",
        "prod",
        "--outpost-uri",
        &uri,
    ]);
    assert_eq!(w.status("line4")["sync"]["state"], "linking");
    for _ in 0..3 {
        w.cli.ok(&["push", "release", "-p", "plant", "-s", "line4"]);
    }
    let s = w.status("line4");
    assert_eq!(s["sync"]["state"], "linking");
    assert_eq!(s["link"]["state"], "awaiting-agent");
    assert_eq!(s["sync"]["desired_revision"], 3);

    let agent = AgentProcess::join(&join, &w.tmp.path().join("agent"));
    let mut seen = vec!["linking".to_owned()];
    wait_until("catch-up", Duration::from_secs(30), || {
        let state = w.status("line4")["sync"]["state"]
            .as_str()
            .unwrap()
            .to_owned();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        state == "in-sync"
    });
    eprintln!("states seen: {seen:?}");
    let order = ["linking", "pending-delivery", "syncing", "in-sync"];
    let positions: Vec<usize> = seen
        .iter()
        .map(|s| order.iter().position(|o| o == s).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "status went {seen:?}"
    );
    assert_eq!(
        w.release_states("line4"),
        ["superseded", "superseded", "applied"]
    );
    assert_eq!(w.status("line4")["sync"]["applied_release"], 3);

    // Offline again: a release waits as pending-delivery, then arrives.
    agent.kill9();
    wait_until("offline", Duration::from_secs(10), || {
        w.status("line4")["link"]["state"] == "offline"
    });
    w.cli.ok(&["push", "release", "-p", "plant", "-s", "line4"]);
    assert_eq!(w.status("line4")["sync"]["state"], "pending-delivery");
    let _agent = AgentProcess::run(&w.tmp.path().join("agent"));
    wait_until("caught up", Duration::from_secs(30), || {
        w.status("line4")["sync"]["applied_release"] == 4
    });
    assert_eq!(
        w.release_states("line4"),
        ["superseded", "superseded", "replaced", "applied"]
    );
    let _ = &w.hub;
}

#[test]
fn a_join_token_works_once_and_a_wrong_hub_is_refused() {
    let w = world();
    let (join, _) = w.outpost("edge");
    let first = std::process::Command::new(common::bin())
        .args(join.split_whitespace().skip(1))
        .arg("--data")
        .arg(w.tmp.path().join("a1"))
        .arg("--no-run")
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", common::describe(&first));
    let again = std::process::Command::new(common::bin())
        .args(join.split_whitespace().skip(1))
        .arg("--data")
        .arg(w.tmp.path().join("a2"))
        .arg("--no-run")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "{}", common::describe(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("used"),
        "{}",
        common::describe(&again)
    );

    // A second hub on another port with its own CA: a token of the first
    // hub pointed at it is refused by the agent before anything is sent.
    let other = HubProcess::start(&w.tmp.path().join("hub2"));
    let token = join.split_whitespace().last().unwrap();
    let mut parsed: trellis_link::identity::JoinToken = token.parse().unwrap();
    parsed.hub_url = other.endpoint.clone();
    let out = std::process::Command::new(common::bin())
        .args([
            "agent",
            "join",
            &other.endpoint,
            "--token",
            &parsed.to_string(),
            "--no-run",
            "--data",
        ])
        .arg(w.tmp.path().join("a3"))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("right hub"),
        "{}",
        common::describe(&out)
    );
}
