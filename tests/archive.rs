//! Deleting is recoverable: a deleted project or stage is archived — its
//! outpost stops running it and keeps its volumes, the hub keeps its
//! releases and configs — until it is restored, purged, or its retention
//! ends.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{AgentProcess, Cli, HubProcess, describe, git_project, join_command, wait_until};

/// Processes running from under `dir` (a stage's components on an
/// outpost whose data directory it is).
fn processes_under(dir: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd"))
            && cwd.starts_with(dir)
        {
            found.push(pid);
        }
    }
    found
}

fn component_state(cli: &Cli, stage: &str) -> String {
    let list = cli.json(&["list", "component", "-p", "shop", "-s", stage]);
    list["components"][0]["observed"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The lines the component wrote to its volume.
fn volume_lines(volume: &Path) -> Vec<String> {
    std::fs::read_to_string(volume.join("starts"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_deleted_stage_is_archived_and_comes_back_with_its_data() {
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
    cli.ok(&[
        "add",
        "config-data",
        "app",
        "-p",
        "shop",
        "-s",
        "line",
        "--env",
        "GREETING=moin",
    ]);
    // Each start of the component appends its greeting to its volume.
    let repo = tmp.path().join("repo");
    git_project(
        &repo,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: app\n    process:\n      path: ./app\n      command: [\"sh\", \"./run.sh\"]\n    env:\n      - name: GREETING\n        config-ref: GREETING\n    storage:\n      - name: data\n        path: /data\n        size: 1Gi\n",
            ),
            (
                "app/run.sh",
                "#!/bin/sh\necho \"$GREETING\" >> ./data/starts\nwhile true; do sleep 1; done\n",
            ),
        ],
    );
    let out = cli.run_in(&repo, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));
    cli.ok(&["push", "release", "-p", "shop", "-s", "line", "-c", "app"]);
    wait_until("the component runs", Duration::from_secs(90), || {
        component_state(&cli, "line") == "running"
    });
    let stage_dir: PathBuf = agent_data.join("processes/shop/line");
    let volume = stage_dir.join("volumes/app/data");
    wait_until(
        "its first start is on its volume",
        Duration::from_secs(10),
        || volume_lines(&volume) == ["moin"],
    );

    // Deleted: archived. The outpost removes its workloads, keeps its volume.
    let out = cli.ok(&["delete", "stage", "line", "-p", "shop"]);
    assert!(
        out.contains("archived") && out.contains("trellis restore stage line -p shop"),
        "{out}"
    );
    wait_until(
        "its component is gone from the outpost",
        Duration::from_secs(60),
        || processes_under(&agent_data).is_empty() && !stage_dir.join("components/app").exists(),
    );
    assert_eq!(volume_lines(&volume), ["moin"], "the volume stays");
    let live = cli.ok(&["list", "stages", "-p", "shop"]);
    assert!(!live.contains("line"), "{live}");
    let archived = cli.json(&["list", "stages", "-p", "shop", "--archived"]);
    assert_eq!(archived[0]["name"], "line", "{archived}");
    assert!(archived[0]["archived_at"].is_string());
    // It takes no changes while archived.
    let out = cli.run(&["push", "release", "-p", "shop", "-s", "line"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("trellis restore stage line"),
        "{}",
        describe(&out)
    );

    // Restored: its release runs again, with its config and its data.
    cli.ok(&["restore", "stage", "line", "-p", "shop"]);
    wait_until("the component runs again", Duration::from_secs(90), || {
        component_state(&cli, "line") == "running" && !processes_under(&agent_data).is_empty()
    });
    wait_until(
        "its second start is on its volume",
        Duration::from_secs(10),
        || volume_lines(&volume) == ["moin", "moin"],
    );
    let releases = cli.json(&["list", "releases", "-p", "shop", "-s", "line"]);
    assert_eq!(releases.as_array().unwrap().len(), 1, "{releases}");
    assert_eq!(releases[0]["config"]["name"], "app");
    let config = cli.json(&["get", "config", "app", "-p", "shop", "-s", "line"]);
    assert_eq!(config["data"]["env"]["GREETING"], "moin");

    // The project: deleted with its stage, restored with it.
    cli.ok(&["delete", "project", "shop"]);
    wait_until(
        "the stage's component is gone again",
        Duration::from_secs(60),
        || processes_under(&agent_data).is_empty(),
    );
    let projects = cli.ok(&["list", "projects"]);
    assert!(!projects.contains("shop"), "{projects}");
    let archived = cli.ok(&["list", "projects", "--archived"]);
    assert!(archived.contains("shop"), "{archived}");
    let out = cli.run(&["restore", "stage", "line", "-p", "shop"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trellis restore project shop"));
    cli.ok(&["restore", "project", "shop"]);
    wait_until(
        "the component runs a third time",
        Duration::from_secs(90),
        || component_state(&cli, "line") == "running" && !processes_under(&agent_data).is_empty(),
    );
    wait_until(
        "its third start is on its volume",
        Duration::from_secs(10),
        || volume_lines(&volume).len() == 3,
    );

    // Purged: deleted for good, volume and all.
    cli.ok(&["delete", "stage", "line", "-p", "shop", "--purge"]);
    wait_until(
        "the outpost forgets the stage",
        Duration::from_secs(60),
        || !stage_dir.exists(),
    );
    let out = cli.run(&["get", "stage", "line", "-p", "shop"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    drop(agent);
}

/// Archived projects and stages are purged once the hub's retention period
/// (`--archive-retention`) has passed.
#[test]
fn the_retention_period_ends_an_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start_with(
        &tmp.path().join("hub"),
        &["--listen", "127.0.0.1:0", "--archive-retention", "2s"],
    );
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "shop"]);
    cli.ok(&["create", "project", "blog"]);
    cli.ok(&["create", "stage", "dev", "-p", "shop"]);
    cli.ok(&["delete", "stage", "dev", "-p", "shop"]);
    cli.ok(&["delete", "project", "blog"]);
    let archived = cli.json(&["list", "stages", "-p", "shop", "--archived"]);
    assert_eq!(archived.as_array().unwrap().len(), 1);
    wait_until(
        "the archive's retention ends",
        Duration::from_secs(30),
        || {
            cli.json(&["list", "stages", "-p", "shop", "--archived"])
                .as_array()
                .unwrap()
                .is_empty()
                && cli
                    .json(&["list", "projects", "--archived"])
                    .as_array()
                    .unwrap()
                    .is_empty()
        },
    );
    let out = cli.run(&["restore", "stage", "dev", "-p", "shop"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        cli.ok(&["list", "projects"]).contains("shop"),
        "live projects stay"
    );
}
