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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{AgentProcess, Cli, HubProcess, git_commit, git_project, join_command};

/// `web` records its mark (a config value) in its volume at every start,
/// then serves its root — the config file and the volume are in it — and
/// logs every request. `client` fetches the config file from `web` through
/// `component-ref` into its own volume, which it serves on a second port:
/// what the test reads there went through both components.
struct Flavour {
    /// Manifest of releases 1 and 2 (mark and greeting come from config).
    manifest: String,
    /// The same, but `web` exits at once.
    broken: String,
    files: Vec<(&'static str, String)>,
}

const WEB_SH: &str = r#"#!/bin/sh
echo "$MARK" >> data/history.txt
exec python3 -m http.server "$PORT" --bind 127.0.0.1
"#;

const CLIENT_SH: &str = r#"#!/bin/sh
echo "client starting, web is at $WEB"
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory data &
while true; do
  python3 fetch.py "http://$WEB:$WEB_PORT/conf/greeting.txt" > data/last.tmp 2>/dev/null && mv data/last.tmp data/last.txt
  sleep 0.3
done
"#;

const FETCH_PY: &str = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')\n";

fn process_flavour(web_port: u16, client_port: u16) -> Flavour {
    let manifest = |web_command: &str| {
        format!(
            r#"version: v1
components:
  - name: web
    process:
      path: ./web
      command: {web_command}
    ports: [{web_port}]
    env:
      - name: PORT
        value: "{web_port}"
      - name: MARK
        config-ref: mark
    files:
      - path: /conf/greeting.txt
        config-ref: greeting
    storage:
      - name: data
        path: /data
        size: 1Gi
  - name: client
    process:
      path: ./client
      command: ["sh", "./client.sh"]
    ports: [{client_port}]
    env:
      - name: WEB
        component-ref: web
      - name: WEB_PORT
        value: "{web_port}"
      - name: PORT
        value: "{client_port}"
    storage:
      - name: data
        path: /data
        size: 1Gi
"#
        )
    };
    Flavour {
        manifest: manifest(r#"["sh", "./web.sh"]"#),
        broken: manifest(r#"["sh", "-c", "echo giving up >&2; exit 3"]"#),
        files: vec![
            ("web/web.sh", WEB_SH.into()),
            ("client/client.sh", CLIENT_SH.into()),
            ("client/fetch.py", FETCH_PY.into()),
        ],
    }
}

fn container_flavour(image: &str, web_port: u16, client_port: u16) -> Flavour {
    let web = format!(
        r#"trap 'exit 0' TERM; echo "$MARK" >> /www/data/history.txt; httpd -f -vv -p {web_port} -h /www & wait"#
    );
    let client = format!(
        r#"trap 'exit 0' TERM; echo "client starting, web is at $WEB"; httpd -p {client_port} -h /data; while true; do wget -qO- "http://$WEB:{web_port}/conf/greeting.txt" > /data/last.tmp 2>/dev/null && mv /data/last.tmp /data/last.txt; sleep 0.3; done"#
    );
    let manifest = |web_script: &str| {
        format!(
            r#"version: v1
components:
  - name: web
    docker:
      image: {image}
    command: ["sh", "-c"]
    args: [{web_script}]
    ports: [{web_port}]
    env:
      - name: MARK
        config-ref: mark
    files:
      - path: /www/conf/greeting.txt
        config-ref: greeting
    storage:
      - name: data
        path: /www/data
        size: 1Gi
  - name: client
    docker:
      image: {image}
    command: ["sh", "-c"]
    args: [{client}]
    ports: [{client_port}]
    env:
      - name: WEB
        component-ref: web
    storage:
      - name: data
        path: /data
        size: 1Gi
"#,
            web_script = serde_json::to_string(web_script).unwrap(),
            client = serde_json::to_string(&client).unwrap(),
        )
    };
    Flavour {
        manifest: manifest(&web),
        broken: manifest("echo giving up >&2; exit 3"),
        // (`trap`: a shell as PID 1 ignores SIGTERM, and every replaced
        // container would wait out the engine's stop timeout.)
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

/// The scenario of the module docs; the test reaches `web` and `client` on
/// loopback at their ports.
fn scenario(flavour: Flavour, agent_args: &[&str], web_port: u16, client_port: u16) {
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
    let url = format!("http://127.0.0.1:{web_port}");
    let client_url = format!("http://127.0.0.1:{client_port}");
    let ok = wait_for(Duration::from_secs(30), || {
        fetch(&format!("{client_url}/last.txt")).as_deref() == Some("hello from config")
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
        probe_request(web_port, &probe);
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

/// A plain HTTP request for `path` (the answer, a 404, does not matter),
/// made in-process so that the measured delay is the system's.
fn probe_request(port: u16, path: &str) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(stream, "GET /{path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let _ = stream.read_to_end(&mut Vec::new());
}

#[test]
fn a_process_release_runs_keeps_its_volume_rolls_back_and_is_adopted() {
    let (web, client) = (common::free_port(), common::free_port());
    scenario(
        process_flavour(web, client),
        &["--no-containers", "--health-window", "20s"],
        web,
        client,
    );
}

#[test]
fn a_container_release_runs_keeps_its_volume_rolls_back_and_is_adopted() {
    let Some(engine) = trellis_testkit::podman::engine() else {
        eprintln!("skipped: Podman is not installed (CI would fail here)");
        return;
    };
    let image = engine.busybox_image();
    // Whatever happens, the stage's containers, network and volumes go.
    struct Cleanup(trellis_testkit::podman::PodmanEngine);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            self.0.remove_labelled("io.trellis.outpost=cell-4");
        }
    }
    let _cleanup = Cleanup(engine.clone());
    // Published on loopback at the same ports, so the test reaches them.
    let (web, client) = (common::free_port(), common::free_port());
    scenario(
        container_flavour(image, web, client),
        &[
            "--docker-host",
            &engine.docker_host(),
            "--health-window",
            "30s",
            "--publish-ports",
            "127.0.0.1",
        ],
        web,
        client,
    );
}

/// An image built from a Dockerfile `FROM scratch` reaches an outpost that
/// has no registry to pull from: the engine on the outpost does not have
/// it (it is removed after the push), so the component can only run from
/// the archive the agent fetched from the hub as chunks and loaded.
#[test]
fn an_image_built_from_a_dockerfile_runs_on_an_outpost_without_a_registry() {
    let Some(engine) = trellis_testkit::podman::engine() else {
        eprintln!("skipped: Podman is not installed (CI would fail here)");
        return;
    };
    struct Cleanup(trellis_testkit::podman::PodmanEngine, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            self.0.remove_labelled("io.trellis.outpost=kiosk-2");
            if !self.1.is_empty() {
                let _ = self.0.podman(&["rmi", "--force", &self.1]);
            }
        }
    }
    let port = common::free_port();
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "kiosk"]);
    let app = tmp.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::copy("/bin/busybox", app.join("busybox")).expect("busybox-static is installed");
    let manifest = format!(
        r#"version: v1
components:
  - name: web
    docker:
      file: Dockerfile
    command: ["/bin/busybox", "httpd", "-f", "-p", "{port}", "-h", "/www"]
    ports: [{port}]
"#
    );
    git_project(
        &app,
        &[
            (
                "Dockerfile",
                "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n",
            ),
            ("www/index.html", "delivered without a registry\n"),
            ("trellis.yaml", &manifest),
        ],
    );
    let out = cli
        .command()
        .current_dir(&app)
        .args(["push", "build", "-p", "kiosk"])
        .env("CONTAINERS_CONF", engine.containers_conf())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    let builds = cli.json(&["list", "build", "-p", "kiosk"]);
    let artifact = &builds[0]["components"][0]["artifact"];
    let reference = artifact["reference"].as_str().unwrap().to_owned();
    let image_id = artifact["archive"]["image_id"].as_str().unwrap().to_owned();
    let _cleanup = Cleanup(engine.clone(), reference.clone());
    // The outpost's engine does not have the image, and cannot pull it.
    engine.podman_ok(&["rmi", "--force", &reference]);
    assert!(
        engine
            .inspect(trellis_testkit::podman::Object::Image, &image_id)
            .is_none()
    );

    let created = cli.ok(&["create", "outpost", "kiosk-2"]);
    let uri = cli.ok(&["get", "outpost-uri", "kiosk-2"]).trim().to_owned();
    let _agent = AgentProcess::join_with(
        &join_command(&created),
        &tmp.path().join("agent"),
        &[
            "--docker-host",
            &engine.docker_host(),
            "--health-window",
            "30s",
            "--publish-ports",
            "127.0.0.1",
        ],
    );
    cli.ok(&[
        "create",
        "stage",
        "shop",
        "-p",
        "kiosk",
        "--type",
        "prod",
        "--outpost-uri",
        &uri,
    ]);
    cli.ok(&["push", "release", "-p", "kiosk", "-s", "shop"]);
    let mut last = serde_json::Value::Null;
    let ok = wait_for(Duration::from_secs(120), || {
        last = cli.json(&["status", "stage", "shop", "-p", "kiosk"]);
        last["sync"]["state"] == "in-sync" && last["components"][0]["state"] == "running"
    });
    assert!(ok, "the release never ran: {last:#}");
    let page = wait_for(Duration::from_secs(20), || {
        fetch(&format!("http://127.0.0.1:{port}/index.html")).as_deref()
            == Some("delivered without a registry\n")
    });
    assert!(page, "the delivered image does not serve its page");
    // The engine has the image now: loaded from what the agent fetched.
    assert!(
        engine
            .inspect(trellis_testkit::podman::Object::Image, &image_id)
            .is_some()
    );
    let cache = tmp.path().join("agent/artifacts/chunks");
    assert!(
        std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0) > 0,
        "the agent's cache holds the image's chunks"
    );
}

/// A chunk damaged on the hub's disk: the agent refuses it, the stage's
/// status says so, and the stage keeps running the release it had.
#[test]
fn a_chunk_damaged_on_the_hub_never_reaches_a_running_stage() {
    let (web, client) = (common::free_port(), common::free_port());
    let flavour = process_flavour(web, client);
    let w = world(&flavour);
    let _agent = AgentProcess::join_with(
        &w.join,
        &w.tmp.path().join("agent"),
        &["--no-containers", "--health-window", "20s"],
    );
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
    w.config("mark-one", "hello");
    w.release();
    w.wait_running(1);

    // Build 2 has new content in `web`'s package; damage a chunk only it has.
    let builds = w.cli.json(&["list", "build", "-p", "plant"]);
    let old_index: String = builds[0]["components"][0]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(
        w.app.join("web/new-data.bin"),
        (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    git_commit(&w.app, "more data");
    let out = w.cli.run_in(&w.app, &["push", "build", "-p", "plant"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    let builds = w.cli.json(&["list", "build", "-p", "plant"]);
    let new_index: String = builds[0]["components"][0]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(old_index, new_index);
    let store = trellis_cas::ChunkStore::open(
        &w.tmp.path().join("hub/artifacts"),
        trellis_cas::Durability::Cache,
    )
    .unwrap();
    let old = store.artifact(&old_index.parse().unwrap()).unwrap();
    let new = store.artifact(&new_index.parse().unwrap()).unwrap();
    let victim = new
        .chunks
        .iter()
        .find(|c| !old.chunks.contains(c))
        .expect("build 2 has a chunk build 1 lacks")
        .digest;
    std::fs::write(
        store.path(&victim),
        zstd::bulk::compress(b"not what this chunk held", 3).unwrap(),
    )
    .unwrap();
    w.release();

    let mut last = serde_json::Value::Null;
    let failed = wait_for(Duration::from_secs(90), || {
        last = w.status();
        last["sync"]["state"] == "failed"
    });
    assert!(failed, "the damaged release was not refused: {last:#}");
    let message = last["sync"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&victim.as_hex()), "{last:#}");
    assert!(message.contains("nothing changed"), "{last:#}");
    assert_eq!(last["sync"]["applied_release"], 1, "{last:#}");
    assert!(
        last["components"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] == "running"),
        "{last:#}"
    );
    assert_eq!(
        fetch(&format!("http://127.0.0.1:{client}/last.txt")).as_deref(),
        Some("hello")
    );
}
