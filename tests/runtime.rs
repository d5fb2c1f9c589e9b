//! Releases really running on an outpost, end to end with the real
//! binaries: a hub, an agent enrolled with `trellis agent join`, a project
//! pushed from git. Two components (one reaching the other through
//! `component-ref`) with a config value, a config file and a volume; a
//! second release keeps the volume's data; a release that does not come up
//! is rolled back; an agent killed with SIGKILL adopts the running
//! components; logs are followed over the link.
//!
//! The same scenario runs twice: with `process:` components (the process
//! runtime) and with container images (the container runtime over Podman's
//! API service). The container run needs Podman; without it, it is skipped
//! — except in CI, where it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{AgentProcess, Cli, HubProcess, git_project, join_command};

/// The `web` component serves its root (the config file and the shared
/// volume are in it) and logs every request; `client` fetches the file from
/// `web` through `component-ref`, writes it into the volume, and records
/// its mark there once per start.
const CLIENT_SH: &str = r#"#!/bin/sh
echo "client starting, web is at $WEB"
echo "$MARK" >> "$DATA/history.txt"
while true; do
  $FETCH "http://$WEB/conf/greeting.txt" > "$DATA/last.tmp" 2>/dev/null && mv "$DATA/last.tmp" "$DATA/last.txt"
  sleep 0.3
done
"#;

struct Flavour {
    /// Manifest of release 1 and 2 (mark and greeting come from config).
    manifest: String,
    /// A manifest whose `web` exits at once.
    broken: String,
    files: Vec<(&'static str, String)>,
}

fn process_flavour(port: u16) -> Flavour {
    let manifest = |web_command: &str| {
        format!(
            r#"version: v1
components:
  - name: web
    process:
      path: ./web
      command: {web_command}
    ports: [{port}]
    files:
      - path: /conf/greeting.txt
        config-ref: greeting
    storage:
      - name: data
        path: /data
  - name: client
    process:
      path: ./client
      command: ["sh", "./client.sh"]
    env:
      - name: WEB
        component-ref: web
      - name: MARK
        config-ref: mark
      - name: FETCH
        value: "python3 fetch.py"
      - name: DATA
        value: data
    storage:
      - name: data
        path: /data
"#
        )
    };
    Flavour {
        manifest: manifest(&format!(
            r#"["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]"#
        )),
        broken: manifest(r#"["sh", "-c", "echo giving up >&2; exit 3"]"#),
        files: vec![
            ("web/README", "served by python3 -m http.server\n".into()),
            ("client/client.sh", CLIENT_SH.into()),
            (
                "client/fetch.py",
                "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')\n".into(),
            ),
        ],
    }
}

fn container_flavour(image: &str, port: u16) -> Flavour {
    let manifest = |web_command: &str| {
        format!(
            r#"version: v1
components:
  - name: web
    docker:
      image: {image}
    command: {web_command}
    ports: [{port}]
    files:
      - path: /www/conf/greeting.txt
        config-ref: greeting
    storage:
      - name: data
        path: /www/data
  - name: client
    docker:
      image: {image}
    command: ["sh", "-c"]
    args: ["$SCRIPT"]
    env:
      - name: WEB
        component-ref: web
      - name: MARK
        config-ref: mark
      - name: FETCH
        value: "wget -qO-"
      - name: DATA
        value: /data
      - name: SCRIPT
        value: {script}
    storage:
      - name: data
        path: /data
"#,
            script =
                serde_json::to_string(&CLIENT_SH.replace("$WEB", &format!("$WEB:{port}"))).unwrap()
        )
    };
    Flavour {
        manifest: manifest(&format!(
            r#"["httpd", "-f", "-vv", "-p", "{port}", "-h", "/www"]"#
        )),
        broken: manifest(r#"["sh", "-c", "echo giving up >&2; exit 3"]"#),
        files: Vec::new(),
    }
}

struct World {
    tmp: tempfile::TempDir,
    _hub: HubProcess,
    cli: Cli,
    app: std::path::PathBuf,
    uri: String,
    join: String,
}

fn world(flavour: &Flavour) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "plant"]);
    let app = tmp.path().join("app");
    let mut files: Vec<(&str, &str)> = vec![("trellis.yaml", flavour.manifest.as_str())];
    files.extend(flavour.files.iter().map(|(p, c)| (*p, c.as_str())));
    git_project(&app, &files);
    let out = cli.run_in(&app, &["push", "build", "-p", "plant"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    let out = cli.ok(&["create", "outpost", "cell-4"]);
    let uri = cli.ok(&["get", "outpost-uri", "cell-4"]).trim().to_owned();
    World {
        join: join_command(&out),
        tmp,
        _hub: hub,
        cli,
        app,
        uri,
    }
}

impl World {
    fn status(&self) -> serde_json::Value {
        self.cli.json(&["status", "stage", "line", "-p", "plant"])
    }

    fn config(&self, mark: &str, greeting: &str) {
        self.cli.ok(&[
            "add",
            "config-data",
            "-p",
            "plant",
            "-s",
            "line",
            "main",
            "--env",
            &format!("mark={mark}"),
            "--env",
            &format!("greeting={greeting}"),
        ]);
    }

    fn release(&self) {
        self.cli
            .ok(&["push", "release", "-p", "plant", "-s", "line", "-c", "main"]);
    }

    fn wait_running(&self, release: u64) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let ok = wait_for(Duration::from_secs(90), || {
            last = self.status();
            last["sync"]["state"] == "in-sync"
                && last["sync"]["applied_release"] == release
                && last["components"]
                    .as_array()
                    .is_some_and(|c| c.len() == 2 && c.iter().all(|c| c["state"] == "running"))
        });
        assert!(ok, "release {release} never ran: {last:#}");
        last
    }

    fn component_ids(&self) -> Vec<(String, Vec<String>)> {
        let s = self.status();
        let mut ids: Vec<(String, Vec<String>)> = s["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|i| i.as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect();
        ids.sort();
        ids
    }
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Reads a file the stage wrote into its volume, wherever the runtime keeps
/// it on the host, through the `web` component (which serves the volume).
fn fetch(url: &str) -> Option<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')",
            url,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The scenario of the module docs. `web_url` is where the test reaches
/// `web` from the host.
fn scenario(flavour: Flavour, agent_args: &[&str], web_url: &dyn Fn(&World) -> String) {
    let w = world(&flavour);
    let agent_data = w.tmp.path().join("agent");
    let agent = AgentProcess::join_with(&w.join, &agent_data, agent_args);
    w.cli.ok(&[
        "create",
        "stage",
        "line",
        "-p",
        "plant",
        "--type",
        "prod",
        "--outpost-uri",
        &w.uri,
    ]);

    // Release 1: both components run, the client reached web by name.
    w.config("mark-one", "hello from config");
    w.release();
    w.wait_running(1);
    let url = web_url(&w);
    let ok = wait_for(Duration::from_secs(30), || {
        fetch(&format!("{url}/data/last.txt")).as_deref() == Some("hello from config")
    });
    assert!(
        ok,
        "the client never fetched the greeting from web: {:#}",
        w.status()
    );

    // Release 2 (a config change): the volume keeps release 1's data.
    w.config("mark-two", "hello again");
    w.release();
    w.wait_running(2);
    let ok = wait_for(Duration::from_secs(30), || {
        fetch(&format!("{url}/data/history.txt"))
            .is_some_and(|h| h.contains("mark-one") && h.contains("mark-two"))
    });
    assert!(
        ok,
        "the volume lost data across releases: {:?}",
        fetch(&format!("{url}/data/history.txt"))
    );

    // Logs, followed over the link: a request the test makes is in web's
    // log within a second.
    let mut follow = w
        .cli
        .command()
        .args([
            "logs",
            "component",
            "web",
            "-p",
            "plant",
            "-s",
            "line",
            "--follow",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The follow is established once earlier lines arrive.
    assert!(
        rx.recv_timeout(Duration::from_secs(30)).is_ok(),
        "logs --follow printed nothing"
    );
    let mut delays = Vec::new();
    for n in 0..5 {
        let probe = format!("probe-{n}-{}", std::process::id());
        let asked = Instant::now();
        let _ = fetch(&format!("{url}/{probe}"));
        let seen = loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains(&probe) => break Some(asked.elapsed()),
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        delays.push(seen.unwrap_or_else(|| panic!("{probe} never showed in the followed log")));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    delays.sort();
    let median = delays[delays.len() / 2];
    eprintln!("request → line in `logs --follow`: {delays:?}, median {median:?}");
    assert!(median < Duration::from_secs(1), "median delay {median:?}");

    // The agent dies (SIGKILL) and comes back: it adopts the running
    // components instead of restarting them.
    let before = w.component_ids();
    assert!(before.iter().all(|(_, ids)| !ids.is_empty()), "{before:?}");
    agent.kill9();
    let restarted_at = chrono::Utc::now();
    let agent = AgentProcess::run_with(&agent_data, agent_args);
    let ok = wait_for(Duration::from_secs(60), || {
        let s = w.status();
        s["link"]["state"] == "online"
            && s["sync"]["updated_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t > restarted_at)
    });
    assert!(ok, "the restarted agent never reported: {:#}", w.status());
    assert_eq!(
        w.component_ids(),
        before,
        "the restarted agent restarted components"
    );

    // Release 3 exits at once: rolled back to release 2, which keeps
    // serving; the hub says so and keeps release 3 as desired.
    std::fs::write(w.app.join("trellis.yaml"), &flavour.broken).unwrap();
    git_commit(&w.app, "web gives up");
    let out = w.cli.run_in(&w.app, &["push", "build", "-p", "plant"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    w.release();
    let mut last = serde_json::Value::Null;
    let ok = wait_for(Duration::from_secs(120), || {
        last = w.status();
        last["sync"]["state"] == "failed"
    });
    assert!(ok, "release 3 was never reported failed: {last:#}");
    assert_eq!(last["sync"]["rolled_back_to"], 2, "{last:#}");
    assert_eq!(last["sync"]["desired_release"], 3, "{last:#}");
    assert_eq!(last["sync"]["applied_release"], 2, "{last:#}");
    let message = last["sync"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("release 3") && message.contains("rolled back to release 2"),
        "{message}"
    );
    assert!(message.contains("exited with code 3"), "{message}");
    let releases = w
        .cli
        .json(&["list", "release", "-p", "plant", "-s", "line"]);
    let state_of = |n: u64| {
        releases
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["number"] == n)
            .map(|r| r["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state_of(3).as_deref(), Some("failed"), "{releases:#}");
    assert_eq!(state_of(2).as_deref(), Some("applied"), "{releases:#}");
    let ok = wait_for(Duration::from_secs(30), || {
        fetch(&format!("{url}/conf/greeting.txt")).as_deref() == Some("hello again")
    });
    assert!(ok, "release 2 does not serve after the rollback");
    drop(agent);
}

fn git_commit(dir: &Path, message: &str) {
    for args in [
        vec!["add", "-A"],
        vec![
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            message,
        ],
    ] {
        let out = Command::new("git")
            .args(&args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::describe(&out));
    }
}

#[test]
fn a_process_release_runs_keeps_its_volume_rolls_back_and_is_adopted() {
    let port = common::free_port();
    scenario(
        process_flavour(port),
        &["--no-containers", "--health-window", "20s"],
        &move |_| format!("http://127.0.0.1:{port}"),
    );
}

#[test]
fn a_container_release_runs_keeps_its_volume_rolls_back_and_is_adopted() {
    let Some(engine) = trellis_testkit::podman::engine() else {
        eprintln!("skipped: Podman is not installed (CI would fail here)");
        return;
    };
    let image = engine.busybox_image();
    // Published on the host at the same port, so the test reaches it.
    let port = common::free_port();
    scenario(
        container_flavour(image, port),
        &[
            "--docker-host",
            &engine.docker_host(),
            "--health-window",
            "30s",
            "--publish-ports",
            "127.0.0.1",
        ],
        &move |_| format!("http://127.0.0.1:{port}"),
    );
}
