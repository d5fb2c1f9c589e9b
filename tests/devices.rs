//! Devices of an outpost's host, end to end with the real binaries and a
//! real container engine (Podman and Docker Engine, each test once per
//! engine): an agent offers device nodes made for the test (copies of
//! `/dev/zero`, 1:5, readable by root only) with `--device`, one of them
//! exclusive and one granted to another project only.
//!
//! - A container component that holds `camera` reads it at its path; a
//!   container component of the same stage that does not hold it does not
//!   see it; a process component running as a user of its own reads the
//!   node it holds, another one (another user) is refused it.
//! - The outpost's description lists what it offers, `list component` what
//!   each component holds.
//! - Releases asking for a device the outpost does not offer, one not
//!   granted to the project, or the exclusive one another stage holds fail
//!   with the names, and the running release is untouched.
//! - Removing the node while its holder runs is an agent error in the
//!   stage's connection status at the next observation.
//!
//! Without the engine these tests are skipped — except in CI, where they
//! fail. They need root (to make device nodes and switch users), which the
//! container tests need anyway.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::apps::{OnEngine, World, ids_of, wait_for};
use common::{AgentProcess, Cli, git_commit, git_project};
use serde_json::Value;
use trellis_testkit::engines::EngineKind;

/// A copy of `/dev/zero` (1:5) that only root may open.
fn make_zero_node(path: &Path) {
    let made = std::process::Command::new("mknod")
        .arg(path)
        .args(["c", "1", "5"])
        .status()
        .expect("mknod runs");
    assert!(made.success(), "mknod {} (needs root)", path.display());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Reads four bytes of `$TARGET` every 200 ms into `data/result`.
const READ_SH: &str = r#"#!/bin/sh
while true; do
  if head -c 4 "$TARGET" > data/bytes 2> data/err; then
    echo "read $(wc -c < data/bytes) bytes" > data/result
  else
    echo "refused: $(cat data/err)" > data/result
  fi
  sleep 0.2
done
"#;

/// The line's manifest: `extra` is appended to the `cam` component's
/// device list (the releases that must be refused ask for more).
fn manifest(image: &str, node_dir: &Path, extra: &str) -> String {
    let plc = node_dir.join("plc");
    let plc = plc.display();
    format!(
        r#"version: v1
components:
  - name: cam
    docker:
      image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
    devices:
      - name: camera{extra}
  - name: plain
    docker:
      image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
  - name: bridge
    process:
      path: ./bin
      command: ["sh", "./read.sh"]
    user: "65534:65534"
    devices: [{{name: plc}}]
    env:
      - name: TARGET
        value: $(TRELLIS_DEVICE_PLC)
    storage: [{{name: data, path: /data, size: 1Mi}}]
  - name: peek
    process:
      path: ./bin
      command: ["sh", "./read.sh"]
    user: "65533:65533"
    env:
      - name: TARGET
        value: {plc}
    storage: [{{name: data, path: /data, size: 1Mi}}]
"#
    )
}

/// A second stage's app: one container asking for the exclusive camera.
fn rival_manifest(image: &str) -> String {
    format!(
        r#"version: v1
components:
  - name: grab
    docker:
      image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
    devices: [{{name: camera}}]
"#
    )
}

fn push_build(on: &mut OnEngine, cli: &Cli, dir: &Path, project: &str) -> String {
    let out = on.push_build(cli, dir, project);
    assert!(out.status.success(), "{}", common::describe(&out));
    let builds = cli.json(&["list", "build", "-p", project]);
    builds[0]["name"].as_str().unwrap().to_owned()
}

/// Waits until the stage's status says release `release` failed with a
/// message holding every one of `says`, and returns the status.
fn failed(w: &World, project: &str, stage: &str, release: u64, says: &[String]) -> Value {
    let mut last = Value::Null;
    let ok = wait_for(Duration::from_secs(60), || {
        last = w.status(project, stage);
        let message = last["sync"]["message"].as_str().unwrap_or_default();
        last["sync"]["state"] == "failed"
            && last["sync"]["desired_release"] == release
            && says.iter().all(|s| message.contains(s.as_str()))
    });
    assert!(
        ok,
        "release {release} of {stage} never failed saying {says:?}: {last:#}"
    );
    last
}

fn read_result(agent_data: &Path, component: &str) -> String {
    let path = agent_data.join(format!("processes/line/a/volumes/{component}/data/result"));
    std::fs::read_to_string(path).unwrap_or_default()
}

fn devices_reach_their_holders_and_refusals_change_nothing(kind: EngineKind) {
    let Some(mut on) = OnEngine::new(kind) else {
        return;
    };
    let image = on.engine.busybox_image();
    let outpost = on.outpost("line-edge");
    let mut w = World::new("line");
    // Process components run as users of their own: the way down to the
    // agent's data directory must be passable.
    std::fs::set_permissions(w.tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let nodes = w.tmp.path().join("dev");
    std::fs::create_dir(&nodes).unwrap();
    for name in ["camera", "plc", "secret"] {
        make_zero_node(&nodes.join(name));
    }
    let camera = nodes.join("camera").display().to_string();
    let plc = nodes.join("plc").display().to_string();
    let secret = nodes.join("secret").display().to_string();
    w.cli.ok(&["create", "project", "yard"]);

    let app = w.tmp.path().join("app");
    git_project(
        &app,
        &[
            ("trellis.yaml", manifest(image, &nodes, "").as_str()),
            ("bin/read.sh", READ_SH),
        ],
    );
    push_build(&mut on, &w.cli, &app, "line");
    let mut args = on.agent_args();
    args.extend(
        [
            "--device",
            &format!("camera={camera}:r"),
            "--device-exclusive",
            "camera",
            "--device",
            &format!("plc={plc}"),
            "--device",
            &format!("secret={secret}"),
            "--device-grant",
            "secret=yard",
        ]
        .map(str::to_owned),
    );
    w.stage_on("line", "a", &outpost, &args);
    let agent_data = w.tmp.path().join(format!("agent-{outpost}"));

    // The outpost says what it offers, and what of it project line may use.
    let uri = w
        .cli
        .ok(&["get", "outpost-uri", &outpost])
        .trim()
        .to_owned();
    let described = wait_for(Duration::from_secs(30), || {
        let d = w.cli.json(&["validate", "outpost-uri", &uri, "-p", "line"]);
        d["agent"]["devices"]
            .as_array()
            .is_some_and(|d| d.len() == 3)
    });
    assert!(described, "the description never listed the devices");
    let d = w.cli.json(&["validate", "outpost-uri", &uri, "-p", "line"]);
    let devices = d["agent"]["devices"].as_array().unwrap();
    let by_name = |name: &str| devices.iter().find(|d| d["name"] == name).unwrap().clone();
    assert_eq!(by_name("camera")["exclusive"], true);
    assert_eq!(by_name("camera")["access"], "r");
    assert_eq!(by_name("camera")["path"], camera.as_str());
    assert_eq!(by_name("plc")["granted"], true);
    assert_eq!(by_name("secret")["granted"], false);
    assert_eq!(by_name("secret")["restricted"], true);
    assert!(
        !d.to_string().contains("yard"),
        "the description names another project: {d}"
    );
    let table = w.cli.ok(&["validate", "outpost-uri", &uri, "-p", "line"]);
    assert!(
        table.contains(&format!("camera: {camera} (r, exclusive)"))
            && table.contains("secret: ")
            && table.contains("not granted to this project"),
        "{table}"
    );

    w.cli.ok(&["push", "release", "-p", "line", "-s", "a"]);
    let status = w.running("line", "a", 1, 4);

    // The holder reads its node; its neighbour does not see it.
    let cam = ids_of(&status, "cam")[0].clone();
    let plain = ids_of(&status, "plain")[0].clone();
    let read = on.engine.exec(
        &cam,
        &["sh", "-c", "head -c 16 \"$TRELLIS_DEVICE_CAMERA\" | wc -c"],
    );
    assert!(read.status.success(), "{read:?}");
    assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "16");
    let env = on.container(&cam)["Config"]["Env"].to_string();
    assert!(
        env.contains(&format!("TRELLIS_DEVICE_CAMERA={camera}")),
        "{env}"
    );
    let seen = on.engine.exec(&plain, &["test", "-e", &camera]);
    assert!(!seen.status.success(), "{camera} is visible in plain");

    // The process holding plc reads it as its own user; the other process,
    // another user, is refused it.
    let reads = wait_for(Duration::from_secs(20), || {
        read_result(&agent_data, "bridge") == "read 4 bytes\n"
    });
    assert!(reads, "bridge: {:?}", read_result(&agent_data, "bridge"));
    let refused = wait_for(Duration::from_secs(20), || {
        read_result(&agent_data, "peek").contains("Permission denied")
    });
    assert!(refused, "peek: {:?}", read_result(&agent_data, "peek"));

    // Who holds what: the listing (and its table).
    let listed = w.cli.json(&["list", "component", "-p", "line", "-s", "a"]);
    let held = |name: &str| {
        listed["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["observed"]["devices"]
            .clone()
    };
    assert_eq!(held("cam"), serde_json::json!(["camera"]));
    assert_eq!(held("bridge"), serde_json::json!(["plc"]));
    assert_eq!(held("plain"), serde_json::json!([]));
    let table = w.cli.ok(&["list", "component", "-p", "line", "-s", "a"]);
    let cam_row = table
        .lines()
        .find(|l| l.contains(" cam "))
        .unwrap_or_default();
    assert!(
        table.contains("DEVICES") && cam_row.contains("camera"),
        "{table}"
    );

    // Refusals. Each is a release of line/a asking for more; each fails
    // with the names and leaves release 1 running as it was.
    let before = (ids_of(&status, "cam"), ids_of(&status, "bridge"));
    let refusals = [
        (
            "\n      - name: scanner",
            vec![
                "\"scanner\"".to_owned(),
                format!("outpost {outpost} does not offer"),
            ],
        ),
        (
            "\n      - name: secret",
            vec![
                "\"secret\"".to_owned(),
                format!("outpost {outpost} does not grant to project line"),
            ],
        ),
    ];
    for (n, (extra, says)) in refusals.iter().enumerate() {
        std::fs::write(app.join("trellis.yaml"), manifest(image, &nodes, extra)).unwrap();
        git_commit(&app, "ask for more");
        push_build(&mut on, &w.cli, &app, "line");
        w.cli.ok(&["push", "release", "-p", "line", "-s", "a"]);
        let release = 2 + n as u64;
        let status = failed(&w, "line", "a", release, says);
        assert_eq!(status["sync"]["applied_release"], 1, "{status:#}");
        assert_eq!(
            (ids_of(&status, "cam"), ids_of(&status, "bridge")),
            before,
            "release 1 was touched: {status:#}"
        );
    }

    // The exclusive camera, which line/a holds, for another stage.
    let rival = w.tmp.path().join("rival");
    git_project(&rival, &[("trellis.yaml", rival_manifest(image).as_str())]);
    push_build(&mut on, &w.cli, &rival, "line");
    w.cli.ok(&[
        "create",
        "stage",
        "b",
        "-p",
        "line",
        "--type",
        "prod",
        "--outpost-uri",
        &uri,
    ]);
    w.cli.ok(&["push", "release", "-p", "line", "-s", "b"]);
    let says = [
        "\"camera\"",
        "exclusive",
        "held by stage line/a",
        "component \"cam\"",
        "\"grab\"",
    ]
    .map(str::to_owned);
    failed(&w, "line", "b", 1, &says);
    let a = w.status("line", "a");
    assert_eq!(ids_of(&a, "cam"), before.0, "line/a was touched: {a:#}");

    // The camera is unplugged while cam runs: the next observation (every
    // 3 s) reports it as the agent's error in line/a's connection status.
    std::fs::remove_file(&camera).unwrap();
    let unplugged = Instant::now();
    let mut last = Value::Null;
    let reported = wait_for(Duration::from_secs(30), || {
        last = w.status("line", "a");
        last["errors"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["code"] == "device-missing"))
    });
    assert!(reported, "no device-missing error: {last:#}");
    eprintln!(
        "the unplugged camera was in the connection status after {} ms",
        unplugged.elapsed().as_millis()
    );
    let error = last["errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["code"] == "device-missing")
        .unwrap();
    assert_eq!(error["source"], "agent");
    let text = error["message"].as_str().unwrap();
    assert!(
        text.contains("\"camera\"") && text.contains(&camera) && text.contains("\"cam\""),
        "{text}"
    );
}

#[test]
fn devices_reach_their_holders_and_refusals_change_nothing_on_podman() {
    devices_reach_their_holders_and_refusals_change_nothing(EngineKind::Podman);
}

#[test]
fn devices_reach_their_holders_and_refusals_change_nothing_on_docker() {
    devices_reach_their_holders_and_refusals_change_nothing(EngineKind::Docker);
}

#[test]
fn an_agent_refuses_to_start_on_an_offer_that_does_not_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("agent");
    let file = tmp.path().join("not-a-device");
    std::fs::write(&file, "x").unwrap();
    let file = file.display().to_string();
    for (args, says) in [
        (
            vec!["--device".to_owned(), format!("camera={file}")],
            "is not a device node",
        ),
        (
            vec!["--device".to_owned(), "camera=dev/video0".to_owned()],
            "not an absolute path",
        ),
        (
            vec!["--device".to_owned(), "camera=/dev/null:rx".to_owned()],
            "not an access mode",
        ),
        (
            vec![
                "--device".to_owned(),
                "camera=/dev/null".to_owned(),
                "--device-exclusive".to_owned(),
                "scanner".to_owned(),
            ],
            "--device-exclusive scanner",
        ),
        (
            vec!["--gpu".to_owned(), "all,0".to_owned()],
            "`all` stands alone",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = AgentProcess::run_output(&data, &args);
        assert!(
            !out.status.success(),
            "{args:?}: {}",
            common::describe(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {says} not in {stderr}");
    }
}
