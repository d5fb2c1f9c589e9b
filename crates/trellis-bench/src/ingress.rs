//! The outpost's HTTP entry point (`trellis-ingress`) against nginx as the
//! same reverse proxy, both in front of the same backend and measured in
//! the same run with `wrk`.
//!
//! Three kinds of child process, so that no two of the measured things
//! share a process: the backend (`trellis-bench ingress-backend`: axum,
//! HTTP/1.1 keep-alive, `GET /` answers a fixed 64-byte body), the Trellis
//! entry point (`trellis-bench ingress-serve`: one [`Ingress`] with 100
//! routes — hosts `app<i>.bench.shop.localhost`, `app0` pointing at the
//! backend, the others at ports nothing listens on — serving HTTP and HTTPS
//! on a multi-threaded tokio runtime, as the agent embeds it), and nginx
//! (`worker_processes auto`, the same hosts, an upstream per host with
//! `keepalive 32`, the same forwarding headers, plain and `ssl` listeners
//! with the same certificate). Both children of this binary run until their
//! stdin closes, and every child is killed when its guard drops, on error
//! too.
//!
//! Each run measures, for HTTP and HTTPS with 1 and 64 connections,
//! `wrk --latency` against each proxy (the order alternating from case to
//! case and run to run), and the backend directly with plain HTTP for the
//! floor; reported are the medians over runs of requests per second, p50
//! and p99 latency, and the proxy's CPU time per request (user + system
//! time of its processes, from `/proc`), with the ratios held to the
//! issue's goals: throughput at least 0.8× nginx's, p99 at most 1.5×. The
//! entry point's RSS with its 100 routes, idle, is the cost of having it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use trellis_ingress::{Certificates, Ingress, Route};

use crate::report::Report;
use crate::setup::{cpu_seconds_in, status_field};

/// The host every measured request names; `app0` is the route that
/// reaches the backend.
const HOST: &str = "app0.bench.shop.localhost";

/// What the backend answers `GET /` with.
const BODY: &[u8; 64] = b"trellis ingress bench: a short fixed body, the same every time.\n";

/// Routes in the entry point's table (and server blocks in nginx's).
const ROUTES: usize = 100;

/// The goals, against nginx on the same machine in the same run.
const THROUGHPUT_AT_LEAST: f64 = 0.8;
const P99_AT_MOST: f64 = 1.5;

const MIB: f64 = (1 << 20) as f64;

pub struct Settings {
    /// Length of each `wrk` run.
    pub secs: u64,
    pub runs: usize,
    pub json: Option<PathBuf>,
}

// === the children ===

/// `trellis-bench ingress-backend`: answers `GET /` with [`BODY`], `GET
/// /headers` with the request's forwarding headers (so the benchmark can
/// check that both proxies send the same) and `GET /connections` with the
/// number of connections it accepted so far, until stdin closes. Prints
/// `listening PORT` once it accepts connections.
pub fn backend(port: u16) -> anyhow::Result<()> {
    use axum::serve::ListenerExt as _;
    let accepted = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let count = accepted.clone();
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { &BODY[..] }))
            .route("/headers", axum::routing::get(forwarding_headers))
            .route(
                "/connections",
                axum::routing::get(
                    move || async move { count.load(Ordering::Relaxed).to_string() },
                ),
            );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let listener = listener.tap_io(move |tcp| {
            accepted.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
        });
        exit_when_stdin_closes();
        println!("listening {port}");
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

/// The headers a proxy is configured to set, one `name: value` a line.
async fn forwarding_headers(headers: axum::http::HeaderMap) -> String {
    let mut text = String::new();
    for name in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "connection",
    ] {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        text.push_str(&format!("{name}: {}\n", values.join(", ")));
    }
    text
}

/// How `ingress-serve` runs.
pub struct ServeSettings {
    pub port: u16,
    pub tls_port: u16,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub routes: usize,
    pub backend: SocketAddr,
}

/// `trellis-bench ingress-serve`: one [`Ingress`] with `routes` routes
/// serving HTTP on `port` and, with a certificate, HTTPS on `tls_port`
/// (0: any free port), until stdin closes. Prints `listening HTTP HTTPS`
/// (HTTPS 0 without a certificate).
pub fn serve_ingress(settings: ServeSettings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let ingress = Ingress::new("bench");
        ingress
            .set_routes(bench_routes(settings.routes, settings.backend))
            .context("the bench's routes")?;
        let plain = tokio::net::TcpListener::bind(("127.0.0.1", settings.port)).await?;
        let plain_port = plain.local_addr()?.port();
        let mut tasks = tokio::task::JoinSet::new();
        let mut tls_port = 0;
        if let Some((cert, key)) = &settings.tls {
            let read =
                |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let certificates = Certificates::from_pem(&read(cert)?, &read(key)?)?;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", settings.tls_port)).await?;
            tls_port = listener.local_addr()?.port();
            let ingress = ingress.clone();
            tasks.spawn(async move {
                ingress
                    .serve(listener, Some(certificates), std::future::pending())
                    .await
            });
        }
        tasks.spawn(async move { ingress.serve(plain, None, std::future::pending()).await });
        exit_when_stdin_closes();
        println!("listening {plain_port} {tls_port}");
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        anyhow::Ok(())
    })
}

/// `app0` → the backend; `app<i>` → 127.0.0.1:i, where nothing listens
/// (they are never asked for: they make the table the size of a busy
/// outpost's).
fn bench_routes(n: usize, backend: SocketAddr) -> Vec<Route> {
    (0..n.max(1))
        .map(|i| Route {
            host: format!("app{i}.bench.shop.localhost"),
            endpoints: vec![upstream(i, backend)],
            owner: format!("component web of stage app{i} (project shop)"),
            ..Route::default()
        })
        .collect()
}

fn upstream(i: usize, backend: SocketAddr) -> SocketAddr {
    if i == 0 {
        backend
    } else {
        SocketAddr::from(([127, 0, 0, 1], i as u16))
    }
}

/// The parent holds our stdin; when it closes (the parent is done, or died
/// without killing us), we leave.
fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
        std::process::exit(0);
    });
}

// === child processes, killed on drop ===

/// A child of this binary (backend or entry point), killed when dropped.
struct Worker {
    child: Child,
    _stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Starts `trellis-bench ARGS` and returns it with the words after
    /// `listening` on its first line.
    fn start(args: &[String]) -> anyhow::Result<(Worker, Vec<u16>)> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(&exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("piped stdout")?;
        // Guarded from here on: an error below kills it.
        let mut worker = Worker {
            child,
            _stdin: stdin,
            stdout: BufReader::new(stdout),
        };
        let mut line = String::new();
        worker.stdout.read_line(&mut line)?;
        let ports = line
            .strip_prefix("listening ")
            .map(|rest| rest.split_whitespace().map(str::parse).collect())
            .transpose()?
            .with_context(|| format!("`{}` did not start (it said {line:?})", args[0]))?;
        Ok((worker, ports))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx's master process; stopped (and its workers with it) when dropped.
struct Nginx {
    master: Child,
    dir: PathBuf,
    plain: u16,
    tls: u16,
}

impl Nginx {
    fn start(binary: &Path, dir: &Path, backend: SocketAddr) -> anyhow::Result<Nginx> {
        let plain = free_port()?;
        let tls = free_port()?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir, plain, tls, backend))?;
        let master = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Nginx {
            master,
            dir: dir.to_path_buf(),
            plain,
            tls,
        })
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.master.id()];
        pids.extend(children_of(self.master.id()));
        pids
    }

    /// Fails with nginx's own words when it is not running.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.master.try_wait()? {
            let log = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            bail!(
                "nginx exited ({status}): {}{}",
                log("stderr.log").trim(),
                log("error.log").trim()
            );
        }
        Ok(())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        use rustix::process::{Pid, Signal, kill_process};
        let pids = self.pids();
        // Fast shutdown: the master stops its workers, then exits.
        if let Some(master) = Pid::from_raw(self.master.id() as i32) {
            let _ = kill_process(master, Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let stopped = loop {
            match self.master.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break false,
            }
        };
        // A master that exited waited for its workers; one that did not is
        // killed with them.
        if !stopped {
            for pid in pids.into_iter().filter_map(|p| Pid::from_raw(p as i32)) {
                let _ = kill_process(pid, Signal::KILL);
            }
            let _ = self.master.wait();
        }
    }
}

/// The processes whose parent is `pid` (nginx's workers).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// nginx as the same reverse proxy: the same hosts, each to its upstream
/// with pooled HTTP/1.1 connections; the same forwarding headers as the
/// ingress (the original Host kept, X-Forwarded-For appended,
/// X-Forwarded-Proto and -Host set); no access log; the same certificate.
/// Client and upstream connections are not closed after a number of
/// requests (nginx's default is 1,000), as the ingress does not close them.
fn nginx_conf(dir: &Path, plain: u16, tls: u16, backend: SocketAddr) -> String {
    let dir = dir.display();
    let mut conf = format!(
        "daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server_names_hash_bucket_size 128;
    keepalive_requests 1000000;
    ssl_certificate {dir}/cert.pem;
    ssl_certificate_key {dir}/key.pem;
    proxy_http_version 1.1;
    proxy_set_header Connection \"\";
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $http_host;
"
    );
    for i in 0..ROUTES {
        conf.push_str(&format!(
            "    upstream app{i} {{
        server {};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{plain};
        listen 127.0.0.1:{tls} ssl;
        server_name app{i}.bench.shop.localhost;
        location / {{
            proxy_pass http://app{i};
        }}
    }}
",
            upstream(i, backend)
        ));
    }
    conf.push_str("}\n");
    conf
}

/// `name` on the PATH or in `/usr/sbin` (nginx is there, and root's PATH
/// may be all that has it).
fn program(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} is not installed; the ingress benchmark needs nginx and wrk \
                 (`apt-get install nginx-light wrk`, as .ci/install-test-deps does)"
            )
        })
}

// === measuring ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Proxy {
    Trellis,
    Nginx,
    /// The backend itself, without a proxy: the floor.
    Direct,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Trellis => "trellis",
            Proxy::Nginx => "nginx",
            Proxy::Direct => "backend direct",
        }
    }
}

#[derive(Clone, Copy)]
struct Case {
    tls: bool,
    connections: u32,
}

impl Case {
    fn name(self) -> String {
        format!(
            "{}, {} conn{}",
            if self.tls { "HTTPS" } else { "HTTP" },
            self.connections,
            if self.connections == 1 { "" } else { "s" }
        )
    }
}

const CASES: [Case; 4] = [
    Case {
        tls: false,
        connections: 1,
    },
    Case {
        tls: false,
        connections: 64,
    },
    Case {
        tls: true,
        connections: 1,
    },
    Case {
        tls: true,
        connections: 64,
    },
];

/// One `wrk` run, with the proxy's CPU time over it.
#[derive(Clone, Copy, Debug)]
struct Sample {
    requests_per_sec: f64,
    /// Seconds.
    p50: f64,
    p99: f64,
    /// Seconds of the proxy's CPU per request.
    cpu_per_request: f64,
    /// Connections the backend accepted during the run.
    backend_connections: f64,
}

/// What `wrk --latency` printed.
#[derive(Debug, PartialEq)]
struct WrkOutput {
    requests: u64,
    requests_per_sec: f64,
    /// Seconds.
    p50: f64,
    p99: f64,
    non_2xx: u64,
    /// connect, read, write, timeout.
    socket_errors: [u64; 4],
}

/// A target of the measurement: where to send, and which processes to
/// charge the CPU time to.
struct Target {
    proxy: Proxy,
    plain: u16,
    tls: u16,
    pids: Vec<u32>,
}

impl Target {
    fn url(&self, tls: bool) -> String {
        if tls {
            format!("https://127.0.0.1:{}/", self.tls)
        } else {
            format!("http://127.0.0.1:{}/", self.plain)
        }
    }
}

struct Wrk {
    binary: PathBuf,
    secs: u64,
    /// Asks the backend how many connections it accepted (its own
    /// connection to it is kept alive between runs, so it is counted once).
    http: reqwest::Client,
    backend: SocketAddr,
}

impl Wrk {
    async fn run(
        &self,
        target: &Target,
        case: Case,
        secs: u64,
        errors: &mut Vec<String>,
    ) -> anyhow::Result<Sample> {
        let threads = if case.connections == 1 { 1 } else { 2 };
        let cpu = |pids: &[u32]| -> f64 {
            pids.iter()
                .map(|p| cpu_seconds_in(&format!("/proc/{p}/stat")))
                .sum()
        };
        let connections_before = self.backend_connections().await?;
        let cpu_before = cpu(&target.pids);
        let output = tokio::process::Command::new(&self.binary)
            .arg("--latency")
            .arg(format!("-t{threads}"))
            .arg(format!("-c{}", case.connections))
            .arg(format!("-d{secs}s"))
            .arg("-H")
            .arg(format!("Host: {HOST}"))
            .arg(target.url(case.tls))
            .stdin(Stdio::null())
            .output()
            .await
            .context("running wrk")?;
        let cpu_used = cpu(&target.pids) - cpu_before;
        let backend_connections = self.backend_connections().await? - connections_before;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "wrk against {} ({}) failed: {}{}",
                target.proxy.name(),
                case.name(),
                text,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let parsed = parse_wrk(&text).with_context(|| {
            format!(
                "reading wrk's output against {} ({}):\n{text}",
                target.proxy.name(),
                case.name()
            )
        })?;
        if parsed.non_2xx > 0 || parsed.requests == 0 {
            bail!(
                "{} answered {} of {} requests with an error status ({}); its setup is \
                 broken:\n{text}",
                target.proxy.name(),
                parsed.non_2xx,
                parsed.requests,
                case.name()
            );
        }
        if parsed.socket_errors.iter().any(|&n| n > 0) {
            let [connect, read, write, timeout] = parsed.socket_errors;
            errors.push(format!(
                "{} {}: socket errors connect {connect}, read {read}, write {write}, timeout \
                 {timeout}",
                target.proxy.name(),
                case.name()
            ));
        }
        Ok(Sample {
            requests_per_sec: parsed.requests_per_sec,
            p50: parsed.p50,
            p99: parsed.p99,
            cpu_per_request: cpu_used / parsed.requests as f64,
            backend_connections: backend_connections as f64,
        })
    }

    async fn backend_connections(&self) -> anyhow::Result<u64> {
        let url = format!("http://{}/connections", self.backend);
        let text = self
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        text.trim()
            .parse()
            .with_context(|| format!("{url} answered {text:?}"))
    }
}

fn parse_wrk(text: &str) -> anyhow::Result<WrkOutput> {
    let mut requests = None;
    let mut requests_per_sec = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut non_2xx = 0;
    let mut socket_errors = [0; 4];
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            requests_per_sec = Some(rest.trim().parse::<f64>()?);
        } else if let Some(rest) = line.strip_prefix("50%") {
            p50 = Some(parse_duration(rest.trim())?);
        } else if let Some(rest) = line.strip_prefix("99%") {
            p99 = Some(parse_duration(rest.trim())?);
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = rest.trim().parse()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for (slot, part) in socket_errors.iter_mut().zip(rest.split(',')) {
                *slot = part
                    .split_whitespace()
                    .nth(1)
                    .context("a socket error count")?
                    .parse()?;
            }
        } else if let Some((count, _)) = line.split_once(" requests in ") {
            requests = Some(count.trim().parse::<u64>()?);
        }
    }
    Ok(WrkOutput {
        requests: requests.context("no \"N requests in\" line")?,
        requests_per_sec: requests_per_sec.context("no Requests/sec line")?,
        p50: p50.context("no 50% line (was --latency given?)")?,
        p99: p99.context("no 99% line")?,
        non_2xx,
        socket_errors,
    })
}

/// wrk's durations: `49.00us`, `1.23ms`, `2.00s`, `1.00m`, `1.00h`; in
/// seconds.
fn parse_duration(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .with_context(|| format!("{text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration"))?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => bail!("{text:?} has an unknown unit"),
    };
    Ok(number * scale)
}

/// One request through `target` (with `Host: app0…`, as wrk sends), to
/// `path`; the body, once it answers 200, waiting for it to start.
async fn ask(
    http: &reqwest::Client,
    target: &Target,
    tls: bool,
    path: &str,
) -> anyhow::Result<String> {
    let url = format!("{}{}", target.url(tls), path.trim_start_matches('/'));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = http
            .get(&url)
            .header(reqwest::header::HOST, HOST)
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => return Ok(response.text().await?),
            Ok(response) if Instant::now() > deadline => {
                bail!(
                    "{} answered {url} with {}: {}",
                    target.proxy.name(),
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
            Err(err) if Instant::now() > deadline => {
                bail!("{} did not answer {url}: {err}", target.proxy.name());
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Checks that `target` answers with the backend's body and forwards the
/// headers the ingress is meant to set.
async fn check(http: &reqwest::Client, target: &Target) -> anyhow::Result<()> {
    for tls in [false, true] {
        let body = ask(http, target, tls, "/").await?;
        if body.as_bytes() != BODY {
            bail!(
                "{} answered {} with {body:?}, not the backend's body",
                target.proxy.name(),
                target.url(tls)
            );
        }
        let headers = ask(http, target, tls, "/headers").await?;
        let scheme = if tls { "https" } else { "http" };
        let expected = format!(
            "host: {HOST}\nx-forwarded-for: 127.0.0.1\nx-forwarded-proto: {scheme}\n\
             x-forwarded-host: {HOST}\nconnection: \n"
        );
        if headers != expected {
            bail!(
                "{} forwarded other headers than expected over {scheme}:\n{headers}expected:\n\
                 {expected}",
                target.proxy.name()
            );
        }
    }
    Ok(())
}

/// VmRSS and RssAnon of the processes, summed, in bytes.
fn memory(pids: &[u32], field: &str) -> anyhow::Result<u64> {
    pids.iter().map(|&pid| status_field(pid, field)).sum()
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let nginx_binary = program("nginx")?;
    let wrk_binary = program("wrk")?;
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(5))
        .build()?;
    let nginx_version = Command::new(&nginx_binary)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();

    // The certificate both proxies serve.
    let work = tempfile::tempdir()?;
    let dir = work.path();
    let certified =
        rcgen::generate_simple_self_signed(vec![HOST.to_owned(), "localhost".to_owned()])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem())?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;

    let (backend, ports) = Worker::start(&["ingress-backend".to_owned()])?;
    let backend_port = ports
        .first()
        .copied()
        .context("ingress-backend named no port")?;
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], backend_port));
    let (entry, ports) = Worker::start(&[
        "ingress-serve".to_owned(),
        "--backend".to_owned(),
        backend_addr.to_string(),
        "--routes".to_owned(),
        ROUTES.to_string(),
        "--tls-cert".to_owned(),
        cert.display().to_string(),
        "--tls-key".to_owned(),
        key.display().to_string(),
    ])?;
    let [plain, tls] = ports[..] else {
        bail!("ingress-serve said {ports:?}, not two ports");
    };
    let mut nginx = Nginx::start(&nginx_binary, dir, backend_addr)?;

    let wrk = Wrk {
        binary: wrk_binary,
        secs: settings.secs,
        http: http.clone(),
        backend: backend_addr,
    };
    let trellis = Target {
        proxy: Proxy::Trellis,
        plain,
        tls,
        pids: vec![entry.pid()],
    };
    check(&http, &trellis).await?;
    // Idle: started, its routes set, the checks answered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = status_field(entry.pid(), "VmRSS:")?;
    let idle_anon = status_field(entry.pid(), "RssAnon:")?;

    let mut started = Instant::now();
    let nginx_target = loop {
        nginx.check_running()?;
        let target = Target {
            proxy: Proxy::Nginx,
            plain: nginx.plain,
            tls: nginx.tls,
            pids: nginx.pids(),
        };
        // Its workers are up once it answers.
        match check(&http, &target).await {
            Ok(()) => {
                break Target {
                    pids: nginx.pids(),
                    ..target
                };
            }
            Err(err) if started.elapsed() > Duration::from_secs(20) => {
                nginx.check_running()?;
                return Err(err.context("nginx never answered as the ingress does"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let nginx_idle_rss = memory(&nginx_target.pids, "VmRSS:")?;
    let nginx_idle_anon = memory(&nginx_target.pids, "RssAnon:")?;
    let direct = Target {
        proxy: Proxy::Direct,
        plain: backend_addr.port(),
        tls: 0,
        pids: vec![backend.pid()],
    };

    // Warm up: connections pooled, code paged in, TLS set up.
    let mut errors = Vec::new();
    for target in [&trellis, &nginx_target] {
        for tls in [false, true] {
            let case = Case {
                tls,
                connections: 64,
            };
            wrk.run(target, case, 1, &mut Vec::new()).await?;
        }
    }

    started = Instant::now();
    let mut samples: BTreeMap<(usize, Proxy), Vec<Sample>> = BTreeMap::new();
    for run in 0..settings.runs {
        for (index, case) in CASES.into_iter().enumerate() {
            let pair = if (run + index) % 2 == 0 {
                [&trellis, &nginx_target]
            } else {
                [&nginx_target, &trellis]
            };
            for target in pair {
                let sample = wrk.run(target, case, wrk.secs, &mut errors).await?;
                samples
                    .entry((index, target.proxy))
                    .or_default()
                    .push(sample);
            }
            if !case.tls {
                let sample = wrk.run(&direct, case, wrk.secs, &mut errors).await?;
                samples
                    .entry((index, Proxy::Direct))
                    .or_default()
                    .push(sample);
            }
        }
        println!(
            "run {}/{} done ({:.0} s)",
            run + 1,
            settings.runs,
            started.elapsed().as_secs_f64()
        );
    }
    let trellis_peak = status_field(entry.pid(), "VmHWM:")?;
    let nginx_peak = memory(&nginx_target.pids, "VmHWM:")?;
    let nginx_workers = nginx_target.pids.len() - 1;
    drop(nginx);
    drop(entry);
    drop(backend);

    let median = |index: usize, proxy: Proxy, field: fn(&Sample) -> f64| -> f64 {
        let values: Vec<f64> = samples
            .get(&(index, proxy))
            .map(|s| s.iter().map(field).collect())
            .unwrap_or_default();
        if values.is_empty() {
            0.0
        } else {
            crate::setup::median(values)
        }
    };

    let mut report = Report::new(
        "ingress",
        json!({
            "wrk_secs": settings.secs,
            "runs": settings.runs,
            "routes": ROUTES,
            "body_bytes": BODY.len(),
            "wrk_threads": "1 for 1 connection, 2 for 64",
            "nginx": nginx_version,
            "nginx_workers": nginx_workers,
        }),
    );
    report.add(
        "trellis entry point RSS, 100 routes, idle",
        idle_rss as f64 / MIB,
        "MiB",
    );
    report.add("  of it private (RssAnon)", idle_anon as f64 / MIB, "MiB");
    report.add(
        format!("nginx RSS idle (master + {nginx_workers} workers, summed)"),
        nginx_idle_rss as f64 / MIB,
        "MiB",
    );
    report.add(
        "  of it private (RssAnon)",
        nginx_idle_anon as f64 / MIB,
        "MiB",
    );
    report.add(
        "trellis entry point peak RSS under load",
        trellis_peak as f64 / MIB,
        "MiB",
    );
    report.add(
        "nginx peak RSS under load (summed)",
        nginx_peak as f64 / MIB,
        "MiB",
    );
    const MS: f64 = 1e3;
    const US: f64 = 1e6;
    for (index, case) in CASES.into_iter().enumerate() {
        let name = case.name();
        let rps = |p| median(index, p, |s| s.requests_per_sec);
        let p50 = |p| median(index, p, |s| s.p50);
        let p99 = |p| median(index, p, |s| s.p99);
        let cpu = |p| median(index, p, |s| s.cpu_per_request);
        let opened = |p| median(index, p, |s| s.backend_connections);
        let (t, n) = (Proxy::Trellis, Proxy::Nginx);
        report.add(format!("{name}: requests/s, trellis"), rps(t), "/s");
        report.add(format!("{name}: requests/s, nginx"), rps(n), "/s");
        report.at_least(
            format!("{name}: throughput trellis ÷ nginx"),
            rps(t) / rps(n).max(f64::MIN_POSITIVE),
            "×",
            THROUGHPUT_AT_LEAST,
        );
        report.add(format!("{name}: p50, trellis"), p50(t) * MS, "ms");
        report.add(format!("{name}: p50, nginx"), p50(n) * MS, "ms");
        report.add(format!("{name}: p99, trellis"), p99(t) * MS, "ms");
        report.add(format!("{name}: p99, nginx"), p99(n) * MS, "ms");
        report.at_most(
            format!("{name}: p99 trellis ÷ nginx"),
            p99(t) / p99(n).max(f64::MIN_POSITIVE),
            "×",
            P99_AT_MOST,
        );
        report.add(
            format!("{name}: proxy CPU per request, trellis"),
            cpu(t) * US,
            "µs",
        );
        report.add(
            format!("{name}: proxy CPU per request, nginx"),
            cpu(n) * US,
            "µs",
        );
        report.add(
            format!("{name}: backend connections opened, trellis"),
            opened(t),
            "",
        );
        report.add(
            format!("{name}: backend connections opened, nginx"),
            opened(n),
            "",
        );
        if !case.tls {
            let d = Proxy::Direct;
            report.add(format!("{name}: requests/s, backend direct"), rps(d), "/s");
            report.add(format!("{name}: p50, backend direct"), p50(d) * MS, "ms");
            report.add(format!("{name}: p99, backend direct"), p99(d) * MS, "ms");
        }
    }
    report.note(format!(
        "medians of {} runs of {} s each per case, trellis and nginx alternating which goes \
         first; goals: throughput ≥ {THROUGHPUT_AT_LEAST}× nginx's, p99 ≤ {P99_AT_MOST}× nginx's",
        settings.runs, settings.secs
    ));
    report.note(
        "wrk, the proxy and the backend share this machine's cores: every figure includes \
         their contention, and \"backend direct\" is the floor without a proxy",
    );
    if cfg!(debug_assertions) {
        report.note(
            "debug build: the workspace's own crates (the ingress among them) are unoptimised; \
             measure with --release",
        );
    }
    for error in errors {
        report.note(error);
    }
    report.finish(settings.json.as_deref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 2s test @ http://127.0.0.1:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  540.12us  12.00ms   90.00%
    Req/Sec    15.12k     1.01k   17.00k    70.00%
  Latency Distribution
     50%    1.98ms
     75%    2.20ms
     90%    2.60ms
     99%    4.01ms
  60210 requests in 2.00s, 12.34MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:  30105.00
Transfer/sec:      6.17MB
";

    #[test]
    fn reads_wrks_output() {
        let parsed = parse_wrk(WRK).unwrap();
        assert_eq!(
            parsed,
            WrkOutput {
                requests: 60210,
                requests_per_sec: 30105.0,
                p50: 1.98e-3,
                p99: 4.01e-3,
                non_2xx: 3,
                socket_errors: [0, 2, 0, 1],
            }
        );
        assert!(parse_wrk("Requests/sec: 1").is_err());
    }

    #[test]
    fn reads_wrks_durations() {
        assert_eq!(parse_duration("49.00us").unwrap(), 49e-6);
        assert_eq!(parse_duration("1.50ms").unwrap(), 1.5e-3);
        assert_eq!(parse_duration("2.00s").unwrap(), 2.0);
        assert_eq!(parse_duration("1.00m").unwrap(), 60.0);
        assert!(parse_duration("12").is_err());
        assert!(parse_duration("1.0xs").is_err());
    }

    #[test]
    fn nginx_serves_the_same_hosts_as_the_ingress() {
        let backend = SocketAddr::from(([127, 0, 0, 1], 4000));
        let conf = nginx_conf(Path::new("/tmp/x"), 81, 444, backend);
        for route in bench_routes(ROUTES, backend) {
            assert!(conf.contains(&format!("server_name {};", route.host)));
            assert!(conf.contains(&format!("server {};", route.endpoints[0])));
        }
        assert_eq!(conf.matches("server {").count(), ROUTES);
        assert!(conf.contains("listen 127.0.0.1:444 ssl;"));
    }
}
