//! The command line users of the platform type: plural nouns, `-o
//! table|json|yaml`, `--access-key`, `update project|stage`, `list|remove
//! config-data`, `push release --when-ready`, `info`, `completion`, and a
//! `trellis hub --help` that shows the hub's flags — each through the real
//! binary.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    AgentProcess, Cli, HubProcess, bin, describe, git_commit, git_project, join_command, wait_until,
};

/// A project `shop` whose build runs `run.sh` as a process component.
fn process_project(dir: &std::path::Path, script: &str) {
    git_project(
        dir,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: app\n    process:\n      path: ./app\n      command: [\"sh\", \"./run.sh\"]\n",
            ),
            ("app/run.sh", script),
        ],
    );
}

const RUNS: &str = "#!/bin/sh\necho up\nwhile true; do sleep 1; done\n";

#[test]
fn the_platforms_nouns_flags_and_formats_work() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let key = hub.admin_key();
    let cli = Cli::for_hub(&hub, &key, &tmp.path().join("config"));
    cli.ok(&["create", "project", "shop", "--display-name", "Web shop"]);
    cli.ok(&["create", "stage", "dev", "-p", "shop"]);

    // Plural nouns, everywhere a noun goes.
    for args in [
        &["list", "projects"][..],
        &["list", "stages", "-p", "shop"],
        &["list", "users"],
        &["list", "access-keys"],
        &["list", "members", "-p", "shop"],
        &["get", "projects", "shop"],
        &["get", "stages", "dev", "-p", "shop"],
    ] {
        cli.ok(args);
    }

    // -o table|json|yaml: the same record three ways.
    let table = cli.ok(&["get", "project", "shop"]);
    assert!(table.contains("Web shop"), "{table}");
    let json = cli.json(&["get", "project", "shop"]);
    assert_eq!(json["display_name"], "Web shop");
    let yaml = cli.ok(&["get", "project", "shop", "-o", "yaml"]);
    assert!(yaml.contains("display_name: Web shop"), "{yaml}");
    assert!(yaml.contains("name: shop"), "{yaml}");
    let listed = cli.ok(&["list", "stages", "-p", "shop", "-o", "yaml"]);
    assert!(
        listed.starts_with("- ") && listed.contains("name: dev"),
        "{listed}"
    );
    for args in [
        &["whoami"][..],
        &["info"],
        &["list", "config", "-p", "shop"],
    ] {
        let mut all = args.to_vec();
        all.extend(["-o", "yaml"]);
        let out = cli.ok(&all);
        assert!(
            !out.trim().is_empty() && !out.trim_start().starts_with('{'),
            "{out}"
        );
    }

    // --access-key as well as --key (and TRELLIS_KEY).
    for flag in ["--access-key", "--key"] {
        let out = Command::new(bin())
            .env("TRELLIS_ENDPOINT", &hub.endpoint)
            .env("TRELLIS_CA_CERT", hub.ca_cert())
            .env("TRELLIS_CONFIG_DIR", tmp.path().join("none"))
            .env_remove("TRELLIS_KEY")
            .args(["whoami", flag, &key])
            .output()
            .unwrap();
        assert!(out.status.success(), "{flag}: {}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("admin"));
    }

    // update project|stage.
    let p = cli.json(&[
        "update",
        "project",
        "shop",
        "--display-name",
        "The shop",
        "--description",
        "sells",
    ]);
    assert_eq!(
        (p["display_name"].as_str(), p["description"].as_str()),
        (Some("The shop"), Some("sells"))
    );
    let s = cli.json(&[
        "update",
        "stage",
        "dev",
        "-p",
        "shop",
        "--display-name",
        "Development",
        "--type",
        "qa",
    ]);
    assert_eq!(
        (s["display_name"].as_str(), s["type"].as_str()),
        (Some("Development"), Some("qa"))
    );
    let out = cli.run(&["update", "stage", "dev", "-p", "shop", "--type", "staging"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dev, qa, prod"));

    // add, list and remove config data.
    cli.ok(&[
        "add",
        "config-data",
        "app",
        "-p",
        "shop",
        "-s",
        "dev",
        "--env",
        "A=1",
        "--env",
        "B=2",
    ]);
    let entries = cli.json(&["list", "config-data", "-p", "shop", "-s", "dev"]);
    let keys: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["A", "B"]);
    let out = cli.ok(&[
        "remove",
        "config-data",
        "app",
        "-p",
        "shop",
        "-s",
        "dev",
        "--key",
        "A",
        "--access-key",
        &key,
    ]);
    assert!(out.contains("version 2"), "{out}");
    let table = cli.ok(&[
        "list",
        "config-data",
        "-p",
        "shop",
        "-s",
        "dev",
        "-c",
        "app",
    ]);
    assert!(table.contains("B") && !table.contains(" A "), "{table}");
    let out = cli.run(&[
        "remove",
        "config-data",
        "app",
        "-p",
        "shop",
        "-s",
        "dev",
        "--key",
        "A",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    // info, with and without a hub.
    let info = cli.json(&["info"]);
    assert_eq!(info["user"], "admin");
    assert_eq!(info["hub_version"], env!("CARGO_PKG_VERSION"));
    let out = Command::new(bin())
        .env_remove("TRELLIS_ENDPOINT")
        .env("TRELLIS_CONFIG_DIR", tmp.path().join("none"))
        .arg("info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no hub given"));
}

#[test]
fn completion_scripts_and_the_hubs_help() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef trellis"),
        ("fish", "complete -c trellis"),
    ] {
        let out = Command::new(bin())
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", describe(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains(marker),
            "{shell}: {}",
            &script[..script.len().min(300)]
        );
        for word in ["config-data", "restore", "when-ready"] {
            assert!(script.contains(word), "{shell} completes {word}");
        }
    }
    let out = Command::new(bin())
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error");

    let help = Command::new(bin())
        .args(["hub", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for hub_flag in [
        "--data",
        "--listen",
        "--public-address",
        "--archive-retention",
        "reset-admin-key",
    ] {
        assert!(help.contains(hub_flag), "{hub_flag} in:\n{help}");
    }
    for client_flag in ["--endpoint", "--access-key", "--ca-cert", "--output"] {
        assert!(!help.contains(client_flag), "{client_flag} in:\n{help}");
    }
}

/// `push release --when-ready` on the hub's local outpost: success, and a
/// release that does not come up and is rolled back.
#[test]
fn when_ready_waits_for_the_release_and_reports_a_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start_with(
        &tmp.path().join("hub"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--health-window",
            "4s",
            "--settle-time",
            "1s",
        ],
    );
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "shop"]);
    cli.ok(&["create", "stage", "dev", "-p", "shop"]);
    let repo = tmp.path().join("repo");
    process_project(&repo, RUNS);
    let out = cli.run_in(&repo, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));

    let out = cli.run(&["push", "release", "-p", "shop", "-s", "dev", "--when-ready"]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("release 1 of stage dev runs on outpost local"),
        "{stdout}"
    );
    let releases = cli.json(&["list", "releases", "-p", "shop", "-s", "dev"]);
    assert_eq!(releases[0]["state"], "applied");

    // A build whose component exits at once: it never comes up.
    std::fs::write(
        repo.join("app/run.sh"),
        "#!/bin/sh\necho broken >&2\nexit 3\n",
    )
    .unwrap();
    git_commit(&repo, "broken");
    let out = cli.run_in(&repo, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = cli.run(&["push", "release", "-p", "shop", "-s", "dev", "--when-ready"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("release 2 of stage dev failed"), "{err}");
    assert!(err.contains("rolled back to release 1"), "{err}");
    assert!(err.contains("trellis logs stage dev -p shop"), "{err}");
}

/// `--when-ready` with an outpost that is offline: it waits, says the
/// release is pending delivery, and gives up at `--timeout` (exit 2); once
/// the agent is back, the release lands.
#[test]
fn when_ready_waits_for_an_offline_outpost_until_its_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    let agent_data = tmp.path().join("agent");
    let created = cli.ok(&["create", "outpost", "edge"]);
    let agent = AgentProcess::join_with(&join_command(&created), &agent_data, &["--no-containers"]);
    let uri = cli.ok(&["get", "outpost-uri", "edge"]);
    cli.ok(&["create", "project", "shop"]);
    cli.ok(&[
        "create",
        "stage",
        "line",
        "-p",
        "shop",
        "--outpost-uri",
        uri.trim(),
    ]);
    let repo = tmp.path().join("repo");
    process_project(&repo, RUNS);
    let out = cli.run_in(&repo, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = cli.run(&[
        "push",
        "release",
        "-p",
        "shop",
        "-s",
        "line",
        "--when-ready",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("runs on outpost edge"));

    // The outpost goes offline; the next release waits for it.
    agent.kill9();
    wait_until(
        "the hub sees the outpost offline",
        Duration::from_secs(90),
        || {
            let status = cli.json(&["status", "stage", "line", "-p", "shop"]);
            status["link"]["state"] != "online"
        },
    );
    let started = std::time::Instant::now();
    let out = cli.run(&[
        "push",
        "release",
        "-p",
        "shop",
        "-s",
        "line",
        "--when-ready",
        "--timeout",
        "3s",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(started.elapsed() < Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pending-delivery"), "{err}");
    assert!(
        err.contains("timed out after 3s waiting for release 2 of stage line"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pushed release 2"));

    // The agent comes back: the release lands, and a wait sees it.
    let _agent = AgentProcess::run_with(&agent_data, &["--no-containers"]);
    let out = cli.run(&[
        "push",
        "release",
        "-p",
        "shop",
        "-s",
        "line",
        "--when-ready",
        "--timeout",
        "2m",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("release 3 of stage line runs"));
}

/// A project `night` with `stubborn`, a process component that traps
/// SIGTERM (it says so and runs on: a plain stop waits the grace period
/// for it), and `nightly`, scheduled once a year.
fn stubborn_project(dir: &std::path::Path) {
    git_project(
        dir,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: stubborn\n    process:\n      path: ./app\n      command: [\"sh\", \"./stubborn.sh\"]\n  - name: nightly\n    process:\n      path: ./app\n      command: [\"sh\", \"./nightly.sh\"]\n    scheduled: \"0 0 1 1 *\"\n",
            ),
            (
                "app/stubborn.sh",
                "#!/bin/sh\ntrap 'echo got TERM' TERM\necho \"up $$\"\nwhile true; do sleep 0.2; done\n",
            ),
            ("app/nightly.sh", "#!/bin/sh\necho nightly ran\n"),
        ],
    );
}

/// The pid `stubborn.sh` printed last (`up PID`), from its logs.
fn stubborn_pid(cli: &Cli, stage: &str) -> Option<i32> {
    let logs = cli.ok(&["logs", "component", "stubborn", "-p", "night", "-s", stage]);
    logs.lines().rev().find_map(|l| {
        l.split_once("] up ")
            .and_then(|(_, pid)| pid.trim().parse().ok())
    })
}

fn component_state(cli: &Cli, stage: &str, name: &str) -> serde_json::Value {
    let list = cli.json(&["list", "component", "-p", "night", "-s", stage]);
    list["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_default()
}

/// `stop component --kill` ends a component that ignores SIGTERM without
/// sending it one (a plain stop sends it and waits the grace period);
/// `start component --now` runs a scheduled component once outside its
/// schedule; flags on the wrong verb and unknown components are refused.
#[test]
fn stop_kill_and_start_now() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "night"]);
    cli.ok(&["create", "stage", "dev", "-p", "night"]);
    let repo = tmp.path().join("repo");
    stubborn_project(&repo);
    let out = cli.run_in(&repo, &["push", "build", "-p", "night"]);
    assert!(out.status.success(), "{}", describe(&out));
    cli.ok(&["push", "release", "-p", "night", "-s", "dev"]);
    let on_dev = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(["-p", "night", "-s", "dev"].iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: &[&str]| {
        let args = on_dev(args);
        cli.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let ok = |args: &[&str]| {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let state = |name: &str| component_state(&cli, "dev", name)["observed"]["state"].clone();
    wait_until("stubborn running", Duration::from_secs(60), || {
        state("stubborn") == "running" && stubborn_pid(&cli, "dev").is_some()
    });
    let pid = stubborn_pid(&cli, "dev").unwrap();
    let logs = || ok(&["logs", "component", "stubborn"]);

    // Bad input first: nothing changes.
    for (args, says) in [
        (
            &["stop", "component", "stubborn", "--now"][..],
            "`now` goes with start, not with stop",
        ),
        (
            &["start", "component", "stubborn", "--kill"],
            "`kill` goes with stop, not with start",
        ),
        (
            &["restart", "component", "stubborn", "--kill"],
            "`kill` goes with stop, not with restart",
        ),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(err.contains("hint:"), "{args:?}: {err}");
    }
    for verb in [
        &["stop", "component", "nope", "--kill"][..],
        &["start", "component", "nope", "--now"],
    ] {
        let out = run(verb);
        assert_eq!(out.status.code(), Some(1), "{verb:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no component \"nope\"") && err.contains("stubborn, nightly"),
            "{verb:?}: {err}"
        );
    }
    assert_eq!(
        component_state(&cli, "dev", "stubborn")["desired"]["stopped"],
        false
    );
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    // A kill: SIGKILL only, so its TERM trap never runs.
    let out = ok(&["stop", "component", "stubborn", "--kill"]);
    assert!(out.contains("kill requested"), "{out}");
    wait_until("stubborn killed", Duration::from_secs(30), || {
        state("stubborn") == "stopped"
    });
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is gone"
    );
    assert!(!logs().contains("got TERM"), "{}", logs());
    let desired = component_state(&cli, "dev", "stubborn")["desired"].clone();
    assert_eq!(desired["stopped"], true);
    assert_eq!(desired["killed"], true);
    let again = ok(&["stop", "component", "stubborn", "--kill"]);
    assert!(again.contains("already killed"), "{again}");

    // The same component stopped plainly gets its SIGTERM (which it traps,
    // so it is killed only after the grace period).
    let out = ok(&["start", "component", "stubborn"]);
    assert!(out.contains("start requested"), "{out}");
    wait_until("stubborn running again", Duration::from_secs(30), || {
        state("stubborn") == "running" && stubborn_pid(&cli, "dev").is_some_and(|p| p != pid)
    });
    assert_eq!(
        component_state(&cli, "dev", "stubborn")["desired"]["killed"],
        false
    );
    ok(&["stop", "component", "stubborn"]);
    wait_until("stubborn stopped", Duration::from_secs(60), || {
        state("stubborn") == "stopped"
    });
    assert!(logs().contains("got TERM"), "{}", logs());

    // A scheduled component runs once now, outside its schedule (next
    // January); every --now is one more run.
    let nightly = || {
        ok(&["logs", "component", "nightly"])
            .matches("nightly ran")
            .count()
    };
    assert_eq!(nightly(), 0, "it has not run yet");
    let out = ok(&["start", "component", "nightly", "--now"]);
    assert!(out.contains("a run now"), "{out}");
    wait_until("nightly ran once", Duration::from_secs(60), || {
        nightly() == 1
    });
    wait_until(
        "the outpost reports the run",
        Duration::from_secs(30),
        || component_state(&cli, "dev", "nightly")["observed"]["last_run"].is_string(),
    );
    ok(&["start", "component", "nightly", "--now"]);
    wait_until("nightly ran twice", Duration::from_secs(60), || {
        nightly() == 2
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(nightly(), 2, "each --now is one run");
}

/// A kill asked for while the outpost is offline: the component runs on
/// (components outlive their agent), and the agent that comes back kills
/// it — SIGKILL only, as if it had been online — instead of stopping it.
#[test]
fn a_kill_reaches_an_outpost_that_was_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    let agent_data = tmp.path().join("agent");
    let created = cli.ok(&["create", "outpost", "edge"]);
    let agent = AgentProcess::join_with(&join_command(&created), &agent_data, &["--no-containers"]);
    let uri = cli.ok(&["get", "outpost-uri", "edge"]);
    cli.ok(&["create", "project", "night"]);
    cli.ok(&[
        "create",
        "stage",
        "far",
        "-p",
        "night",
        "--outpost-uri",
        uri.trim(),
    ]);
    let repo = tmp.path().join("repo");
    stubborn_project(&repo);
    let out = cli.run_in(&repo, &["push", "build", "-p", "night"]);
    assert!(out.status.success(), "{}", describe(&out));
    cli.ok(&["push", "release", "-p", "night", "-s", "far"]);
    let state = || component_state(&cli, "far", "stubborn")["observed"]["state"].clone();
    wait_until("stubborn running", Duration::from_secs(60), || {
        state() == "running" && stubborn_pid(&cli, "far").is_some()
    });
    let pid = stubborn_pid(&cli, "far").unwrap();

    agent.kill9();
    wait_until(
        "the hub sees the outpost offline",
        Duration::from_secs(90),
        || {
            let status = cli.json(&["status", "stage", "far", "-p", "night"]);
            status["link"]["state"] != "online"
        },
    );
    let out = cli.ok(&[
        "stop",
        "component",
        "stubborn",
        "-p",
        "night",
        "-s",
        "far",
        "--kill",
    ]);
    assert!(out.contains("kill requested"), "{out}");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "it runs on while its outpost is offline"
    );

    let _agent = AgentProcess::run_with(&agent_data, &["--no-containers"]);
    wait_until("stubborn killed", Duration::from_secs(60), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    wait_until(
        "the outpost reports it stopped",
        Duration::from_secs(60),
        || state() == "stopped",
    );
    let logs = cli.ok(&["logs", "component", "stubborn", "-p", "night", "-s", "far"]);
    assert!(!logs.contains("got TERM"), "killed, not stopped: {logs}");
}
