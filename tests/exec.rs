//! Reaching into stages on an outpost, end to end with the real `trellis`
//! binary: a hub, an agent joined over mutual TLS, process components run
//! by it, and `trellis exec` / `trellis port-forward` through the hub and
//! the link.
//!
//! - exec in a process component: its env and directory, stdout, stderr,
//!   the exit code, stdin piped in;
//! - port-forward: an HTTP request and a 100 MiB transfer intact;
//! - a `cat /dev/zero` flood on one exec stream while releases to another
//!   stage on the same outpost arrive and apply and the link stays online;
//! - refusals: unknown and stopped components, a port not exposed, a
//!   non-member, a user of another project, too many streams, a revoked
//!   outpost; the audit log for owners only.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::apps::{World, wait_for};
use common::{Cli, describe, free_port, git_project};

fn manifest(port: u16) -> String {
    format!(
        r#"version: v1
components:
  - name: web
    process:
      path: ./web
      command: ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    ports: [{port}]
    env:
      - name: GREETING
        value: hello-from-env
  - name: idle
    process:
      path: ./web
      command: ["sleep", "3600"]
"#
    )
}

/// The exec command line, run to its end, with `stdin`.
fn exec(cli: &Cli, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = cli
        .command()
        .arg("exec")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run trellis exec");
    let mut input = child.stdin.take().unwrap();
    // Written beside the reading: output comes back while input goes in.
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `trellis port-forward`, and the local address it listens on.
struct Forward {
    child: Child,
    addr: String,
}

impl Forward {
    fn start(cli: &Cli, args: &[&str]) -> Forward {
        let mut child = cli
            .command()
            .arg("port-forward")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run trellis port-forward");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "forwarding 127.0.0.1:PORT to port …"
        let addr = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Forward { child, addr }
    }

    /// GET `path` through the forward: status line and body.
    fn get(&self, path: &str) -> (String, Vec<u8>) {
        let mut conn = std::net::TcpStream::connect(&self.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        write!(
            conn,
            "GET {path} HTTP/1.0\r\nHost: web\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = Vec::new();
        conn.read_to_end(&mut response).unwrap();
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response");
        let head = String::from_utf8_lossy(&response[..split]).into_owned();
        let status = head.lines().next().unwrap_or_default().to_owned();
        (status, response[split + 4..].to_vec())
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Processes whose command line is exactly `cmdline` and whose working
/// directory is under `under` (this test's own: other tests on the host
/// may run the same commands).
fn processes_running(cmdline: &str, under: &std::path::Path) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(under))
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .filter(|w| !w.is_empty())
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
                    == cmdline
            })
        })
        .count()
}

/// Kills, when dropped, the processes still working under a directory: the
/// process components of a test's agent outlive it (they are left running
/// for a restarted agent to adopt).
struct Reap(Option<std::path::PathBuf>);

impl Drop for Reap {
    fn drop(&mut self) {
        let Some(dir) = &self.0 else { return };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let under =
                std::fs::read_link(entry.path().join("cwd")).is_ok_and(|c| c.starts_with(dir));
            if under {
                let _ = Command::new("kill")
                    .arg("-9")
                    .arg(entry.file_name())
                    .status();
            }
        }
    }
}

#[test]
fn exec_and_port_forward_reach_process_components_and_a_flood_holds_up_no_release() {
    let port = free_port();
    let mut reap = Reap(None);
    let mut w = World::with_hub_args("shop", &["--max-streams-per-user", "3"]);
    reap.0 = Some(w.tmp.path().to_owned());
    let app = w.tmp.path().join("app");
    let page = "<h1>shop</h1>\n";
    git_project(
        &app,
        &[
            ("trellis.yaml", manifest(port).as_str()),
            ("web/index.html", page),
        ],
    );
    let out = w.cli.run_in(&app, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));
    let agent_args = ["--no-containers", "--health-window", "30s"].map(str::to_owned);
    w.stage_on("shop", "prod", "edge", &agent_args);
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "prod"]);
    w.running("shop", "prod", 1, 2);

    // --- exec: env, directory, stdout, stderr, exit code ---
    let out = exec(
        &w.cli,
        &[
            "web",
            "-p",
            "shop",
            "-s",
            "prod",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; cat index.html; echo to-stderr >&2; exit 3",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.starts_with("hello-from-env\n"), "{text}");
    assert!(text.contains("/root\n") && text.contains(page), "{text}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");

    // --- stdin piped in ---
    stdin_comes_back(&w.cli, "web", "shop", "prod", 200_000);

    // --- -it: a shell under a pseudo-terminal of its own; what is typed
    // runs in the component's directory, the exit code comes back ---
    let text = shell_in_terminal(&w.cli, "web", "shop", "prod", "cat index.html; ");
    assert!(text.contains("<h1>shop</h1>"), "{text:?}");

    // --- port-forward: an HTTP request, then 100 MiB intact ---
    let forward = Forward::start(
        &w.cli,
        &["web", &format!("0:{port}"), "-p", "shop", "-s", "prod"],
    );
    let (status, body) = forward.get("/index.html");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, page.as_bytes());
    let made = w.cli.ok(&[
        "exec",
        "web",
        "-p",
        "shop",
        "-s",
        "prod",
        "--",
        "sh",
        "-c",
        "head -c 104857600 /dev/urandom > big.bin && sha256sum big.bin",
    ]);
    let want_sum = made.split_whitespace().next().unwrap().to_owned();
    let started = Instant::now();
    let (status, body) = forward.get("/big.bin");
    let took = started.elapsed();
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.len(), 100 << 20);
    assert_eq!(sha256(&body), want_sum, "the 100 MiB arrived changed");
    eprintln!(
        "100 MiB through port-forward in {:.2} s ({:.0} MiB/s)",
        took.as_secs_f64(),
        100.0 / took.as_secs_f64()
    );

    // --- a flood on one stream while another stage's releases apply ---
    // The other stage's web listens on a port of its own (a second build).
    std::fs::write(app.join("trellis.yaml"), manifest(free_port())).unwrap();
    common::git_commit(&app, "line2's port");
    let out = w.cli.run_in(&app, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));
    let uri = w.cli.ok(&["get", "outpost-uri", "edge"]).trim().to_owned();
    w.cli.ok(&[
        "create",
        "stage",
        "line2",
        "-p",
        "shop",
        "--type",
        "prod",
        "--outpost-uri",
        &uri,
    ]);
    let mut flood = w
        .cli
        .command()
        .args([
            "exec",
            "web",
            "-p",
            "shop",
            "-s",
            "prod",
            "--",
            "cat",
            "/dev/zero",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let flooded = Arc::new(AtomicU64::new(0));
    let counter = flooded.clone();
    let mut flood_out = flood.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = flood_out.read(&mut buf) {
            if n == 0 {
                break;
            }
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    assert!(
        wait_for(Duration::from_secs(30), || flooded.load(Ordering::Relaxed)
            > 32 << 20),
        "the flood never got going"
    );
    assert_eq!(processes_running("cat /dev/zero", w.tmp.path()), 1);
    let mut applies = Vec::new();
    for release in 1..=3u64 {
        let before = flooded.load(Ordering::Relaxed);
        let pushed = Instant::now();
        w.cli.ok(&["push", "release", "-p", "shop", "-s", "line2"]);
        w.running("shop", "line2", release, 2);
        applies.push(pushed.elapsed());
        let status = w.status("shop", "line2");
        assert_eq!(status["link"]["state"], "online", "{status:#}");
        assert!(
            flooded.load(Ordering::Relaxed) > before,
            "the flood stalled while release {release} applied"
        );
    }
    let total = flooded.load(Ordering::Relaxed);
    eprintln!(
        "flood: {} MiB moved; releases to the other stage applied in {:?}",
        total >> 20,
        applies
    );
    let status = w.status("shop", "prod");
    assert_eq!(status["link"]["state"], "online", "{status:#}");
    // Ending the exec ends the command on the outpost.
    flood.kill().unwrap();
    let _ = flood.wait();
    reader.join().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || processes_running(
            "cat /dev/zero",
            w.tmp.path()
        ) == 0),
        "the flooding command outlived its stream"
    );

    // --- refusals ---
    let refused = |args: &[&str], code: &str| {
        let out = exec(&w.cli, args, b"");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        assert!(err.contains(code), "{args:?}: {err}");
        err
    };
    refused(
        &["nope", "-p", "shop", "-s", "prod", "--", "true"],
        "no component",
    );
    w.cli
        .ok(&["stop", "component", "idle", "-p", "shop", "-s", "prod"]);
    assert!(wait_for(Duration::from_secs(30), || {
        let out = exec(
            &w.cli,
            &["idle", "-p", "shop", "-s", "prod", "--", "true"],
            b"",
        );
        String::from_utf8_lossy(&out.stderr).contains("stopped")
    }));
    // The port check is the hub's: the connection is refused and closed.
    let pf = Forward::start(&w.cli, &["web", "0:9", "-p", "shop", "-s", "prod"]);
    let mut conn = std::net::TcpStream::connect(&pf.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a refused forward carries nothing");
    drop(pf);
    let audit = w.cli.json(&["list", "audit", "-p", "shop"]);
    let entries = audit.as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["action"] == "port-forward"
            && e["detail"] == "9"
            && e["result"] == "port-not-exposed"),
        "{audit:#}"
    );

    // Another user: not a member of shop; then a member; a project of
    // their own that shop's users cannot reach.
    let created = w.cli.ok(&["create", "user", "bob"]);
    let bob_key = created.lines().last().unwrap().trim().to_owned();
    let bob = Cli::for_hub(&w.hub, &bob_key, &w.tmp.path().join("bob"));
    refused_as(
        &bob,
        &["web", "-p", "shop", "-s", "prod", "--", "id"],
        "not a member",
    );
    w.cli
        .ok(&["add", "member", "bob", "-p", "shop", "--role", "member"]);
    let out = exec(
        &bob,
        &["web", "-p", "shop", "-s", "prod", "--", "echo", "member"],
        b"",
    );
    assert_eq!(stdout(&out), "member\n", "{}", describe(&out));
    let out = bob.run(&["list", "audit", "-p", "shop"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("owners"),
        "{}",
        describe(&out)
    );
    bob.ok(&["create", "project", "bobs"]);
    w.cli.ok(&["remove", "member", "bob", "-p", "shop"]);
    refused_as(
        &bob,
        &["web", "-p", "shop", "-s", "prod", "--", "id"],
        "not a member",
    );

    // Too many streams: this hub lets a user hold 3.
    let sleepers: Vec<Child> = (0..3)
        .map(|_| {
            w.cli
                .command()
                .args([
                    "exec", "web", "-p", "shop", "-s", "prod", "--", "sleep", "30",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let all_sleep = wait_for(Duration::from_secs(20), || {
        processes_running("sleep 30", w.tmp.path()) == 3
    });
    if !all_sleep {
        let mut said = String::new();
        for mut s in sleepers {
            let _ = s.kill();
            let out = s.wait_with_output().unwrap();
            said.push_str(&describe(&out));
        }
        panic!(
            "{} of 3 sleepers run: {said}",
            processes_running("sleep 30", w.tmp.path())
        );
    }
    let err = refused(
        &["web", "-p", "shop", "-s", "prod", "--", "true"],
        "3 streams open",
    );
    assert!(err.contains("3 streams"), "{err}");
    for mut s in sleepers {
        let _ = s.kill();
        let _ = s.wait();
    }
    assert!(wait_for(Duration::from_secs(10), || processes_running(
        "sleep 30",
        w.tmp.path()
    ) == 0));

    // A revoked outpost: nothing reaches it.
    w.cli.ok(&["revoke", "outpost", "edge"]);
    let out = exec(
        &w.cli,
        &["web", "-p", "shop", "-s", "prod", "--", "true"],
        b"",
    );
    // A refusal the user can act on (409 outpost-offline): exit code 1.
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revoked"),
        "{}",
        describe(&out)
    );

    let audit = w.cli.json(&["list", "audit", "-p", "shop"]);
    let entries = audit.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["user"] == "bob" && e["result"] == "opened")
    );
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "exec" && e["detail"] == "cat /dev/zero")
    );
    assert!(entries.iter().any(|e| e["result"] == "outpost-offline"));
    assert!(entries.iter().all(|e| e["project"] == "shop"));
}

fn refused_as(cli: &Cli, args: &[&str], code: &str) {
    let out = exec(cli, args, b"");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
    assert!(err.contains(code), "{args:?}: {err}");
}

// === container components (Podman and Docker through the test kit) ===

fn container_manifest(image: &str) -> String {
    format!(
        r#"version: v1
components:
  - name: app
    docker:
      image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
    env:
      - name: GREETING
        value: hello-from-env
"#
    )
}

/// `rows` lines piped into `tr a-z A-Z` in `component` come back
/// uppercased, whole, followed by what the command said after its stdin
/// closed.
fn stdin_comes_back(cli: &Cli, component: &str, project: &str, stage: &str, rows: u32) {
    let input: Vec<u8> = (0..rows)
        .flat_map(|n| format!("line {n}\n").into_bytes())
        .collect();
    let out = exec(
        cli,
        &[
            "-i",
            component,
            "-p",
            project,
            "-s",
            stage,
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo done",
        ],
        &input,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let mut want = String::from_utf8(input).unwrap().to_uppercase();
    want.push_str("done\n");
    assert!(
        stdout(&out) == want,
        "stdin came back changed ({} bytes against {})",
        out.stdout.len(),
        want.len()
    );
}

/// A shell in `component` under `trellis exec -it`: it has a terminal,
/// runs what is typed (`tty`, a sum, then `also`) and exits with the code
/// typed last. Returns what the terminal showed.
fn shell_in_terminal(cli: &Cli, component: &str, project: &str, stage: &str, also: &str) -> String {
    let out = exec_in_terminal(
        cli,
        &["-it", component, "-p", project, "-s", stage, "--", "sh"],
        format!("tty; echo answer-$((6*7)); {also}exit 5\n").as_bytes(),
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert!(
        text.contains("/dev/pts/"),
        "no terminal for the command: {text:?}"
    );
    assert!(text.contains("answer-42"), "{text:?}");
    text
}

/// `trellis exec -it` under a pseudo-terminal (`script` gives it one):
/// `input` typed in, the terminal's output and the exit code back.
fn exec_in_terminal(cli: &Cli, args: &[&str], input: &[u8]) -> std::process::Output {
    let quoted: Vec<String> = std::iter::once(common::bin().display().to_string())
        .chain(std::iter::once("exec".to_owned()))
        .chain(args.iter().map(|a| (*a).to_owned()))
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect();
    let command = cli.command();
    let envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> = command
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
        .collect();
    let mut script = Command::new("script");
    script.args(["-q", "-e", "-c", &quoted.join(" "), "/dev/null"]);
    for (key, value) in envs {
        match value {
            Some(v) => script.env(key, v),
            None => script.env_remove(key),
        };
    }
    let mut child = script
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let typist = std::thread::spawn(move || {
        // Typed after the terminal is up, as a person would.
        std::thread::sleep(Duration::from_secs(2));
        let _ = stdin.write_all(&input);
        std::thread::sleep(Duration::from_secs(5));
    });
    let out = child.wait_with_output().unwrap();
    typist.join().unwrap();
    out
}

fn exec_reaches_a_container_component(kind: trellis_testkit::engines::EngineKind) {
    let Some(mut on) = common::apps::OnEngine::new(kind) else {
        return;
    };
    let image = on.engine.busybox_image().to_owned();
    let outpost = on.outpost("exec-edge");
    let mut w = World::new("box");
    let app = w.tmp.path().join("app");
    git_project(
        &app,
        &[("trellis.yaml", container_manifest(&image).as_str())],
    );
    let out = on.push_build(&w.cli, &app, "box");
    assert!(out.status.success(), "{}", describe(&out));
    w.stage_on("box", "c", &outpost, &on.agent_args());
    w.cli.ok(&["push", "release", "-p", "box", "-s", "c"]);
    w.running("box", "c", 1, 1);

    // Output, stderr apart, the exit code, the component's environment.
    let out = exec(
        &w.cli,
        &[
            "app",
            "-p",
            "box",
            "-s",
            "c",
            "--",
            "sh",
            "-c",
            "echo $GREETING; echo to-stderr >&2; exit 4",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert_eq!(stdout(&out), "hello-from-env\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");

    // Stdin piped in, 1.3 MB of it.
    stdin_comes_back(&w.cli, "app", "box", "c", 150_000);

    // -it: a shell under a terminal; what is typed runs, the exit code
    // comes back.
    shell_in_terminal(&w.cli, "app", "box", "c", "");

    // A component that is not there, and one the engine stopped.
    let out = exec(&w.cli, &["nope", "-p", "box", "-s", "c", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no component"),
        "{}",
        describe(&out)
    );
    let audit = w.cli.json(&["list", "audit", "-p", "box"]);
    let entries = audit.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["component"] == "app" && e["detail"] == "sh" && e["result"] == "opened"),
        "{audit:#}"
    );
}

#[test]
fn exec_reaches_a_podman_container_component() {
    exec_reaches_a_container_component(trellis_testkit::engines::EngineKind::Podman);
}

#[test]
fn exec_reaches_a_docker_container_component() {
    exec_reaches_a_container_component(trellis_testkit::engines::EngineKind::Docker);
}
