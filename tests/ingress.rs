//! The outpost's entry point, end to end with the real binaries, a real
//! container engine and a real process component: an app whose front has
//! a sticky ingress and two replicas, and a process component that streams
//! server-sent events and echoes WebSocket messages, released to a stage on
//! an outpost whose agent serves `--ingress-listen`.
//!
//! - requests with the ingress host reach the front through the entry
//!   point; without the sticky cookie they spread over both replicas, with
//!   it they stay on one;
//! - the process component is served too: an event stream arrives as it is
//!   written (the first event before the second is sent), and a WebSocket
//!   echo works through the upgrade;
//! - under a steady request load, a second release of the front fails no
//!   request (its new replicas start beside the old ones, the requests
//!   move over once they answer, the old ones drain), and a release whose
//!   front does not come up leaves the old one serving, failing none either;
//! - a host nobody serves gets the 404 page naming the outpost;
//! - `trellis list component` reports the URLs;
//! - the same app in a second stage on the same outpost gets its own host;
//! - a SIGKILL of the agent stops the entry point but not the components,
//!   and the restarted agent serves them again at once.
//!
//! Without Podman the test is skipped — except in CI, where it fails.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::apps::{OnEngine, World, ids_of, wait_for};
use common::{AgentProcess, git_project};
use serde_json::Value;
use trellis_testkit::engines::EngineKind;

/// The test's process component: `/` answers `live`, `/events` is an event
/// stream of two events 1.5 s apart, `/ws` echoes WebSocket messages.
/// Python's standard library only, so it runs on any outpost host.
const LIVE_SERVER: &str = r#"import base64, hashlib, http.server, struct, sys, time

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"data: one\n\n")
            self.wfile.flush()
            time.sleep(1.5)
            self.wfile.write(b"data: two\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path == "/ws":
            key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    break
                opcode, size = head[0] & 0x0F, head[1] & 0x7F
                if size == 126:
                    size = struct.unpack(">H", self.rfile.read(2))[0]
                mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(size)))
                if opcode == 8:
                    break
                self.wfile.write(bytes([0x80 | opcode, len(data)]) + data)
                self.wfile.flush()
            self.close_connection = True
            return
        body = b"live\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

fn manifest(image: &str, live_port: u16) -> String {
    with_front(
        image,
        live_port,
        "hostname > /www/id.txt; httpd -f -p 8080 -h /www & wait",
    )
}

/// The app with `front` running `script` (after `mkdir -p /www`).
fn with_front(image: &str, live_port: u16, script: &str) -> String {
    format!(
        r#"version: v1
components:
  - name: front
    docker:
      image: {image}
    ports: [8080]
    ingresses:
      - host: shop
        sticky: true
    scaling: {{min: 2, max: 2}}
    command: ["sh", "-c", "trap 'exit 0' TERM; mkdir -p /www; {script}"]
  - name: live
    process:
      path: ./live
      command: ["python3", "server.py", "{live_port}"]
    ports: [{live_port}]
    ingresses:
      - host: live
"#
    )
}

/// An HTTP/1.1 exchange with the entry point on `port` for `host`.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    /// The value of the `Set-Cookie` header, up to its first `;`.
    fn cookie(&self) -> Option<String> {
        self.head
            .lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or(l.strip_prefix("Set-Cookie: "))
            })
            .map(|c| c.split(';').next().unwrap_or_default().to_owned())
    }
}

fn get(port: u16, host: &str, path: &str, cookie: Option<&str>) -> Option<Answer> {
    try_get(port, host, path, cookie).ok()
}

/// [`get`], saying what went wrong when no answer came.
fn try_get(port: u16, host: &str, path: &str, cookie: Option<&str>) -> Result<Answer, String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| format!("set a read timeout: {e}"))?;
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}Connection: close\r\n\r\n"
    )
    .map_err(|e| format!("send the request: {e}"))?;
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    read.map_err(|e| {
        format!(
            "read the answer ({} bytes came: {response:?}): {e}",
            response.len()
        )
    })?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("an answer without a complete head: {response:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("an answer without a status: {head:?}"))?;
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// The replica (container host name) that answered `/id.txt`.
fn replica(port: u16, host: &str, cookie: Option<&str>) -> (String, Option<String>) {
    let answer = get(port, host, "/id.txt", cookie).expect("the entry point answers");
    assert_eq!(answer.status, 200, "{}\n{}", answer.head, answer.body);
    (answer.body.trim().to_owned(), answer.cookie())
}

/// Requests `/id.txt` of `host` one after another until stopped, counting
/// what answered 200 and what did not (with the first few failures).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl Load {
    fn start(port: u16, host: &str) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let host = host.to_owned();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sent = std::time::SystemTime::now();
                    match try_get(port, &host, "/id.txt", None) {
                        Ok(a) if a.status == 200 => ok += 1,
                        Ok(a) => failed.push(format!("{}: {}", a.status, a.body)),
                        Err(e) => failed.push(format!("sent at {sent:?}: {e}")),
                    }
                }
                (ok, failed)
            }
        });
        Load { stop, thread }
    }

    /// Stops it: (answered, failures).
    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Reads from `stream` until `want` has arrived (or `timeout` passed).
fn read_until(stream: &mut TcpStream, want: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end && !String::from_utf8_lossy(&seen).contains(want) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn events_arrive_as_they_are_written(port: u16, host: &str) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        stream,
        "GET /events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let first = read_until(&mut stream, "data: one", Duration::from_secs(10));
    assert!(first.contains("data: one"), "no first event: {first:?}");
    assert!(
        !first.contains("data: two"),
        "the stream was held back until the second event: {first:?}"
    );
    let rest = read_until(&mut stream, "data: two", Duration::from_secs(10));
    assert!(rest.contains("data: two"), "no second event: {rest:?}");
}

fn websocket_echoes(port: u16, host: &str) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let head = read_until(&mut stream, "\r\n\r\n", Duration::from_secs(10));
    assert!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head:?}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the accept key did not pass: {head:?}"
    );
    // A masked text frame, as clients send them.
    let message = b"hello through the outpost";
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | message.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(message.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame).unwrap();
    let echo = read_until(
        &mut stream,
        "hello through the outpost",
        Duration::from_secs(10),
    );
    assert!(
        echo.contains("hello through the outpost"),
        "no echo: {echo:?}"
    );
}

#[test]
fn the_entry_point_serves_every_ingress_of_the_outposts_stages() {
    let Some(mut on) = OnEngine::new(EngineKind::Podman) else {
        eprintln!("skipped: Podman is not installed (CI would fail here)");
        return;
    };
    let image = on.engine.busybox_image();
    let outpost = on.outpost("plant");
    let ingress_port = common::free_port();
    let mut w = World::new("shop");
    let app = w.tmp.path().join("app");
    let live_port = common::free_port();
    git_project(
        &app,
        &[
            ("pergola.yaml", manifest(image, live_port).as_str()),
            ("live/server.py", LIVE_SERVER),
        ],
    );
    let out = on.push_build(&w.cli, &app, "shop");
    assert!(out.status.success(), "{}", common::describe(&out));
    let agent_args: Vec<String> = [
        "--docker-host",
        &on.engine.docker_host(),
        "--ingress-listen",
        &format!("127.0.0.1:{ingress_port}"),
    ]
    .map(str::to_owned)
    .to_vec();
    w.stage_on("shop", "prod", &outpost, &agent_args);
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "prod"]);
    let status = w.running("shop", "prod", 1, 2);
    let front_ids = ids_of(&status, "front");
    assert_eq!(front_ids.len(), 2, "two replicas: {status:#}");

    // Through the entry point, by the ingress host.
    let shop = "shop.prod.shop.localhost";
    let served = wait_for(Duration::from_secs(20), || {
        get(ingress_port, shop, "/id.txt", None).is_some_and(|a| a.status == 200)
    });
    assert!(
        served,
        "{:?}",
        get(ingress_port, shop, "/id.txt", None).map(|a| a.head)
    );

    // Without the cookie requests spread over both replicas; with it they
    // stay on one.
    let mut seen = std::collections::BTreeSet::new();
    let mut cookie = None;
    for _ in 0..20 {
        let (id, set) = replica(ingress_port, shop, None);
        seen.insert(id);
        cookie = cookie.or(set);
    }
    assert_eq!(seen.len(), 2, "requests without the cookie: {seen:?}");
    let cookie = cookie.expect("a sticky ingress sets its cookie");
    let (first, _) = replica(ingress_port, shop, Some(&cookie));
    for _ in 0..20 {
        assert_eq!(
            replica(ingress_port, shop, Some(&cookie)).0,
            first,
            "{cookie}"
        );
    }

    // A second release of the front under a steady load: the new replicas
    // start beside the old ones, the requests move over, none fails.
    let load = Load::start(ingress_port, shop);
    let second = with_front(
        image,
        live_port,
        "hostname > /www/id.txt; echo 2 > /www/release.txt; httpd -f -p 8080 -h /www & wait",
    );
    std::fs::write(app.join("pergola.yaml"), &second).unwrap();
    common::git_commit(&app, "the front's second release");
    let out = on.push_build(&w.cli, &app, "shop");
    assert!(out.status.success(), "{}", common::describe(&out));
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "prod"]);
    let status = w.running("shop", "prod", 2, 2);
    let (answered, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} of {answered} requests failed during the release: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(answered > 20, "only {answered} requests were made");
    let new_ids = ids_of(&status, "front");
    assert!(
        new_ids.iter().all(|id| !front_ids.contains(id)),
        "the front was not replaced"
    );
    let release = get(ingress_port, shop, "/release.txt", None).unwrap();
    assert_eq!((release.status, release.body.as_str()), (200, "2\n"));

    // A release whose front does not come up leaves the old one serving,
    // and fails no request either.
    let load = Load::start(ingress_port, shop);
    let broken = with_front(image, live_port, "echo broken; exit 3");
    std::fs::write(app.join("pergola.yaml"), &broken).unwrap();
    common::git_commit(&app, "a front that does not come up");
    let out = on.push_build(&w.cli, &app, "shop");
    assert!(out.status.success(), "{}", common::describe(&out));
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "prod"]);
    let mut last = Value::Null;
    let failed_release = wait_for(Duration::from_secs(120), || {
        last = w.status("shop", "prod");
        last["sync"]["state"] == "failed"
    });
    assert!(failed_release, "release 3 never failed: {last:#}");
    let (answered, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} of {answered} requests failed while release 3 did not come up: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let mut now: Vec<String> = ids_of(&w.status("shop", "prod"), "front");
    let mut before = new_ids.clone();
    now.sort();
    before.sort();
    assert_eq!(now, before, "release 2's front keeps running");
    let front_ids = new_ids;
    // The sticky cookie named a replica of release 1: a new one.
    let (first, cookie) = {
        let (id, set) = replica(ingress_port, shop, None);
        (id, set.expect("a sticky ingress sets its cookie"))
    };

    // The process component is served too, streaming and upgrading.
    let live = "live.prod.shop.localhost";
    let answer = get(ingress_port, live, "/", None).unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "live\n"));
    events_arrive_as_they_are_written(ingress_port, live);
    websocket_echoes(ingress_port, live);

    // A host nobody serves: the 404 page names the outpost.
    let nobody = get(ingress_port, "nobody.prod.shop.localhost", "/", None).unwrap();
    assert_eq!(nobody.status, 404, "{}", nobody.body);
    assert!(nobody.body.contains(&outpost), "{}", nobody.body);

    // The URLs are where users look.
    let listed = w
        .cli
        .json(&["list", "component", "-p", "shop", "-s", "prod"]);
    let front = listed["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "front")
        .unwrap()
        .clone();
    let url = format!("http://{shop}:{ingress_port}/");
    let reported = wait_for(Duration::from_secs(20), || {
        let listed = w
            .cli
            .json(&["list", "component", "-p", "shop", "-s", "prod"]);
        listed["components"][0]["observed"]["urls"][0] == url.as_str()
    });
    assert!(reported, "{url} not reported: {listed:#}");
    assert_eq!(front["hosts"][0], format!("{shop}/"));

    // The same app in a second stage on the same outpost: its own host.
    let uri = w
        .cli
        .ok(&["get", "outpost-uri", &outpost])
        .trim()
        .to_owned();
    w.cli.ok(&[
        "create",
        "stage",
        "dev",
        "-p",
        "shop",
        "--type",
        "dev",
        "--outpost-uri",
        &uri,
    ]);
    // The process component's port is taken by prod's: dev runs a copy of
    // the manifest with its own.
    let dev_live = common::free_port();
    std::fs::write(app.join("pergola.yaml"), manifest(image, dev_live)).unwrap();
    common::git_commit(&app, "dev's own port for the process component");
    let out = on.push_build(&w.cli, &app, "shop");
    assert!(out.status.success(), "{}", common::describe(&out));
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "dev"]);
    let dev = w.running("shop", "dev", 1, 2);
    let dev_ids = ids_of(&dev, "front");
    let dev_host = "shop.dev.shop.localhost";
    let served = wait_for(Duration::from_secs(20), || {
        get(ingress_port, dev_host, "/id.txt", None).is_some_and(|a| a.status == 200)
    });
    assert!(served, "the dev stage's host is not served");
    let (dev_replica, _) = replica(ingress_port, dev_host, None);
    let (prod_replica, _) = replica(ingress_port, shop, Some(&cookie));
    assert_ne!(dev_replica, prod_replica, "two stages, two apps");
    assert!(
        dev_ids.iter().any(|id| id.starts_with(&dev_replica)),
        "{dev_replica} is not one of dev's {dev_ids:?}"
    );

    // SIGKILL the agent: the entry point goes, the components stay; the
    // restarted agent serves what it adopted at once.
    let agent = w.agents.pop().unwrap();
    let data = agent.data.clone();
    agent.kill9();
    assert!(
        TcpStream::connect(("127.0.0.1", ingress_port)).is_err(),
        "the entry point outlived its agent"
    );
    for id in &front_ids {
        let container = on.container(id);
        assert_eq!(container["State"]["Running"], Value::Bool(true), "{id}");
    }
    let args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    w.agents.push(AgentProcess::run_with(&data, &args));
    let back = wait_for(Duration::from_secs(20), || {
        get(ingress_port, shop, "/id.txt", Some(&cookie))
            .is_some_and(|a| a.status == 200 && a.body.trim() == first)
    });
    assert!(
        back,
        "the restarted agent does not serve the adopted replicas"
    );
}

/// A CA and a certificate it signs for `*.{stage}.{project}.localhost`
/// (and a second key that does not match it), made with openssl.
fn certificates(dir: &std::path::Path, stage_and_project: &str) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "{}", common::describe(&out));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test ingress CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ingress.key",
        "-out",
        "ingress.csr",
        "-subj",
        "/CN=ingress",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        format!("subjectAltName=DNS:*.{stage_and_project}.localhost\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "ingress.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "ingress.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "other.key",
    ]);
}

/// `curl` through the entry point on `port`, resolving `host` to
/// loopback; `(http version, body)`.
fn curl(port: u16, host: &str, path: &str, extra: &[&str]) -> Option<(String, String)> {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n')?;
    let (version, code) = tail.split_once(' ')?;
    (code == "200").then(|| (version.to_owned(), body.to_owned()))
}

/// Pushes a build of project `shop` with one process component, `live`
/// (`LIVE_SERVER` on a free port), behind ingress host `live`.
fn push_live_app(w: &World) {
    let app = w.tmp.path().join("app");
    let live_port = common::free_port();
    git_project(
        &app,
        &[
            (
                "pergola.yaml",
                &format!(
                    "version: v1\ncomponents:\n  - name: live\n    process:\n      path: ./live\n      command: [\"python3\", \"server.py\", \"{live_port}\"]\n    ports: [{live_port}]\n    ingresses:\n      - host: live\n"
                ),
            ),
            ("live/server.py", LIVE_SERVER),
        ],
    );
    w.cli.ok_in(&app, &["push", "build", "-p", "shop"]);
}

#[test]
fn the_entry_point_serves_https_with_the_administrators_certificate() {
    let mut w = World::new("shop");
    let tls = w.tmp.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    certificates(&tls, "prod.shop");
    let path = |name: &str| tls.join(name).display().to_string();

    // A certificate that is not PEM, or a key that is not its own, keeps
    // the agent from starting, saying which.
    std::fs::write(tls.join("garbage.pem"), "not a certificate\n").unwrap();
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    for (cert, key, says) in [
        ("garbage.pem", "ingress.key", "is not PEM"),
        (
            "ingress.pem",
            "other.key",
            "does not belong to the certificate",
        ),
    ] {
        let out = common::AgentProcess::run_output(
            &w.tmp.path().join("never-joined"),
            &[
                "--no-containers",
                "--ingress-listen",
                &listen,
                "--ingress-cert",
                &path(cert),
                "--ingress-key",
                &path(key),
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cert}/{key} started: {stderr}");
        assert!(stderr.contains(says), "{cert}/{key}: {stderr}");
    }

    push_live_app(&w);
    let args: Vec<String> = [
        "--no-containers",
        "--ingress-listen",
        &listen,
        "--ingress-cert",
        &path("ingress.pem"),
        "--ingress-key",
        &path("ingress.key"),
    ]
    .map(str::to_owned)
    .to_vec();
    w.stage_on("shop", "prod", "plant-tls", &args);
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "prod"]);
    w.running("shop", "prod", 1, 1);

    // A client that trusts only the administrator's CA verifies the
    // entry point, over HTTP/2 and HTTP/1.1.
    let host = "live.prod.shop.localhost";
    let ca = path("ca.pem");
    let mut answer = None;
    let served = wait_for(Duration::from_secs(20), || {
        answer = curl(port, host, "/", &["--cacert", &ca, "--http2"]);
        answer.is_some()
    });
    assert!(served, "HTTPS through the entry point failed");
    assert_eq!(answer, Some(("2".to_owned(), "live\n".to_owned())));
    assert_eq!(
        curl(port, host, "/", &["--cacert", &ca, "--http1.1"]),
        Some(("1.1".to_owned(), "live\n".to_owned()))
    );
    // Without the CA, the certificate is not trusted.
    assert_eq!(curl(port, host, "/", &[]), None);
    let listed = w
        .cli
        .json(&["list", "component", "-p", "shop", "-s", "prod"]);
    let url = format!("https://{host}:{port}/");
    let reported = wait_for(Duration::from_secs(20), || {
        let listed = w
            .cli
            .json(&["list", "component", "-p", "shop", "-s", "prod"]);
        listed["components"][0]["observed"]["urls"][0] == url.as_str()
    });
    assert!(reported, "{url} not reported: {listed:#}");
}

/// The serial number of the certificate the entry point on `port` serves
/// for `host`, read with openssl (no verification).
fn served_serial(port: u16, host: &str) -> Option<String> {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {host} </dev/null 2>/dev/null \
         | openssl x509 -noout -serial"
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("serial=")
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
}

#[test]
fn the_entry_point_serves_https_with_a_certificate_from_the_hubs_ca() {
    // Certificates live 40 s here, so the test sees the agent renew the
    // entry point's one (and its own) in their last third of life.
    let mut w = World::with_hub_args("shop", &["--cert-validity-secs", "40"]);
    push_live_app(&w);
    let port = common::free_port();
    let args: Vec<String> = [
        "--no-containers",
        "--ingress-listen",
        &format!("127.0.0.1:{port}"),
        "--ingress-hub-cert",
    ]
    .map(str::to_owned)
    .to_vec();
    w.stage_on("shop", "prod", "plant-hubtls", &args);
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "prod"]);
    w.running("shop", "prod", 1, 1);

    // A client that trusts only the hub's CA verifies the entry point.
    let host = "live.prod.shop.localhost";
    let ca = w.hub.ca_cert().display().to_string();
    let mut answer = None;
    let served = wait_for(Duration::from_secs(30), || {
        answer = curl(port, host, "/", &["--cacert", &ca]);
        answer.is_some()
    });
    assert!(served, "HTTPS with the hub's certificate failed");
    assert_eq!(answer.map(|(_, body)| body), Some("live\n".to_owned()));
    // Without the hub's CA it is not trusted, and the certificate covers
    // only this outpost's stages.
    assert_eq!(curl(port, host, "/", &[]), None);
    let kept = w.tmp.path().join("agent-plant-hubtls/ingress-tls");
    assert!(kept.join("cert.pem").exists() && kept.join("key.pem").exists());

    // Renewed in its last third of life: another certificate, still
    // trusted, with no request failing in between.
    let first = served_serial(port, host).expect("a served certificate");
    let mut failures = 0;
    let renewed = wait_for(Duration::from_secs(60), || {
        if curl(port, host, "/", &["--cacert", &ca]).is_none() {
            failures += 1;
        }
        served_serial(port, host).is_some_and(|serial| serial != first)
    });
    assert!(
        renewed,
        "the entry point's certificate {first} was not renewed"
    );
    assert_eq!(
        failures, 0,
        "requests failed while the certificate was renewed"
    );
    assert_eq!(
        curl(port, host, "/", &["--cacert", &ca]).map(|(_, body)| body),
        Some("live\n".to_owned())
    );
}
