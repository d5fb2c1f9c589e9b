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
