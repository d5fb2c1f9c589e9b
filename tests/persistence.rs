//! The hub loses nothing it acknowledged when it is killed with SIGKILL.

mod common;

use common::{Cli, HubProcess, git_project};

const MANIFEST: &str = "version: v1
components:
  - name: web
    process:
      path: ./site
      command: [\"python3\", \"-m\", \"http.server\", \"8080\"]
    ports: [8080]
    env:
      - name: GREETING
        config-ref: greeting
        value: hello
  - name: cache
    process:
      path: ./cache
      command: [\"sleep\", \"1000\"]
    ports: [6379]
";

#[test]
fn everything_acknowledged_survives_sigkill_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let project_dir = tmp.path().join("app");
    git_project(
        &project_dir,
        &[
            ("trellis.yaml", MANIFEST),
            ("site/index.html", "<h1>hi</h1>\n"),
            ("cache/README", "a second process component\n"),
        ],
    );

    let hub = HubProcess::start(&data);
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "shop", "--description", "the shop"]);
    cli.ok(&["create", "stage", "dev", "-p", "shop", "--type", "dev"]);
    cli.ok(&[
        "create",
        "stage",
        "prod",
        "-p",
        "shop",
        "--type",
        "prod",
        "--display-name",
        "Production",
    ]);
    cli.ok(&[
        "create",
        "outpost",
        "factory-7",
        "--label",
        "site=plant-3",
        "--description",
        "line 3",
        "--max-stages",
        "4",
    ]);
    let settings = tmp.path().join("settings.json");
    std::fs::write(&settings, "{\"level\": 3}\n").unwrap();
    cli.ok(&[
        "add",
        "config-data",
        "app",
        "-p",
        "shop",
        "-s",
        "prod",
        "--env",
        "GREETING=moin",
        "--file",
        settings.to_str().unwrap(),
    ]);
    let out = cli.run_in(&project_dir, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    cli.ok(&["push", "release", "-p", "shop", "-s", "prod", "-c", "app"]);
    cli.ok(&["push", "release", "-p", "shop", "-s", "prod"]);
    let new_user = cli.ok(&["create", "user", "alice"]);
    let alice_key = new_user.lines().last().unwrap().trim().to_owned();

    hub.kill9();
    let hub = HubProcess::start(&data);
    let cli = Cli::for_hub(&hub, &cli.key, &tmp.path().join("config"));

    let projects = cli.json(&["list", "project"]);
    assert_eq!(projects[0]["name"], "shop");
    assert_eq!(projects[0]["description"], "the shop");
    let stages = cli.json(&["list", "stage", "-p", "shop"]);
    assert_eq!(stages.as_array().unwrap().len(), 2);
    let prod = cli.json(&["get", "stage", "prod", "-p", "shop"]);
    assert_eq!(prod["display_name"], "Production");
    assert_eq!(prod["desired_revision"], 2);
    assert_eq!(prod["latest_release"], 2);
    let outpost = cli.json(&["get", "outpost", "factory-7"]);
    assert_eq!(outpost["labels"]["site"], "plant-3");
    assert_eq!(outpost["max_stages"], 4);
    let config = cli.json(&["get", "config", "app", "-p", "shop", "-s", "prod"]);
    assert_eq!(config["data"]["env"]["GREETING"], "moin");
    assert_eq!(config["data"]["files"]["settings.json"], "{\"level\": 3}\n");
    let builds = cli.json(&["list", "build", "-p", "shop"]);
    assert_eq!(builds[0]["name"], "main_b1");
    assert_eq!(builds[0]["components"].as_array().unwrap().len(), 2);
    assert_eq!(builds[0]["components"][0]["artifact"]["kind"], "package");
    let releases = cli.json(&["list", "release", "-p", "shop", "-s", "prod"]);
    assert_eq!(releases.as_array().unwrap().len(), 2);
    assert_eq!(releases[1]["config"]["name"], "app");
    // The uploaded package is still on the hub, intact: pushing the same
    // commit again uploads nothing and records build 2.
    let out = cli.run_in(&project_dir, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("main_b2"),
        "{}",
        common::describe(&out)
    );
    // Keys survive too.
    let alice = Cli::for_hub(&hub, &alice_key, &tmp.path().join("config"));
    assert_eq!(alice.json(&["whoami"])["user"], "alice");
}
