//! Streams into a stage on an outpost: `trellis port-forward` throughput
//! against one plain TLS stream over the same loopback, and the round trip
//! of `trellis exec -i` (a keystroke typed, its echo back).
//!
//! The setup is the agent benchmark's: a hub in this process (SQLite),
//! the standalone `trellis-agent` linked to it on loopback, a stage on that
//! outpost running one process component, `source`, which makes a file of
//! `--size-mib` random bytes and serves it with Python's `http.server`.
//!
//! - **Forwarded**: `trellis port-forward source 0:PORT` runs as its own
//!   process; this one downloads the file through it (CLI → WebSocket over
//!   TLS → hub → the link's TLS → agent → the component's port and back).
//! - **Plain TLS**: the same number of bytes sent over one TLS connection on
//!   loopback, with the hub's CA and a server certificate it issued (the
//!   rustls configuration the hub serves with, and the client configuration
//!   agents use: the same provider, so the same cipher suite as every hop
//!   of the forwarded path), both ends in this process; tokio-rustls on the
//!   bare sockets, as any rustls user gets it.
//! - **Plain TLS with read-ahead**: the same, with the sockets read in
//!   large pieces under TLS as Trellis's own connections are
//!   ([`trellis_link::readahead`]): the stricter baseline.
//! - **Direct**: the same download from the component's port, no Trellis in
//!   between: what the source itself can give.
//!
//! - **Bare relay chain**: the same download through the forwarded path's
//!   hops (TCP, TLS, TLS, TCP) joined by relays that only copy, in this
//!   process: a floor for what the forwarded path costs on this machine,
//!   so that its share of plain TLS can be read against what the hops
//!   alone allow.
//!
//! All of them alternate, `--runs` times each; medians are compared. The exec
//! round trip: `trellis exec -i source -- sed -u s/x/y/`, a line `x`
//! written to its stdin and `y` read back from its stdout (so it went
//! through the command), `--echoes` times after a warm-up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::{Report, percentile};
use crate::setup::{self, BenchHub, Client};
use trellis_link::readahead::ReadAhead;

pub struct Settings {
    pub size_mib: u64,
    pub runs: usize,
    pub echoes: usize,
    pub trellis: PathBuf,
    pub agent: PathBuf,
    pub json: Option<PathBuf>,
}

/// The issue's goal: port-forward at least this share of a plain TLS
/// stream's throughput.
const FORWARD_AT_LEAST: f64 = 0.6;

const MIB: f64 = (1 << 20) as f64;

/// Kills a child process (and waits for it) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn manifest(port: u16, bytes: u64) -> String {
    format!(
        r#"version: v1
components:
  - name: source
    process:
      path: ./src
      command: ["sh", "-c", "head -c {bytes} /dev/urandom > blob.bin && exec python3 -m http.server {port} --bind 127.0.0.1"]
    ports: [{port}]
"#
    )
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let bytes = settings.size_mib << 20;
    let hub = BenchHub::start(&work.path().join("hub")).await?;
    let agent = Killed(
        hub.edge_agent(&settings.agent, &work.path().join("agent"), &[])
            .await?,
    );

    let port = crate::fleet::free_port()?;
    let project = work.path().join("project");
    std::fs::create_dir_all(project.join("src"))?;
    std::fs::write(project.join("trellis.yaml"), manifest(port, bytes))?;
    std::fs::write(
        project.join("src/README"),
        "served by the streams benchmark\n",
    )?;
    setup::run(&project, "git", &["init", "-q", "-b", "main"])?;
    setup::commit(&project, "source")?;
    let client = Client {
        endpoint: format!("https://{}", hub.addr),
        key: hub.admin.clone(),
        ca: hub.ca_path(),
        config: work.path().join("config"),
    };
    client.run(
        &settings.trellis,
        &project,
        &["push", "build", "-p", "bench"],
    )?;
    client.run(
        &settings.trellis,
        &project,
        &["push", "release", "-p", "bench", "-s", "line"],
    )?;
    let direct: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    eprintln!(
        "waiting for the component to serve {} MiB",
        settings.size_mib
    );
    let started = Instant::now();
    while download(direct).map(|n| n as u64) != Ok(bytes) {
        if started.elapsed() > Duration::from_secs(180) {
            bail!("the component did not serve its file within 180 s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    let forward = port_forward(&settings.trellis, &client, port)?;
    let tls = TlsSource::start(&hub.data, bytes).await?;
    eprintln!("plain TLS cipher suite: {:?}", tls.suite().await?);
    let chain = BareChain::start(&hub.data, direct).await?;
    let (mut forwarded, mut plain, mut direct_rates, mut plain_ahead, mut chained) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // CPU seconds of each process while forwarded downloads run: the
    // agent, the port-forward CLI, and this process (the hub and the
    // downloading client).
    let pids = [agent.0.id(), forward.0.0.id(), std::process::id()];
    let mut forward_cpu = [0.0f64; 3];
    // CPU seconds of this process (both ends, the hub idle meanwhile)
    // while plain TLS streams run: what the forwarded path is held to.
    let mut plain_cpu = 0.0f64;
    // CPU seconds of this process (the bare chain's relays and the
    // downloading client) while downloads through the bare chain run.
    let mut chain_cpu = 0.0f64;
    for run in 0..settings.runs {
        // Alternating, so that drift on a shared machine hits them all.
        let order: [u8; 5] = if run % 2 == 0 {
            [0, 1, 2, 3, 4]
        } else {
            [4, 3, 2, 1, 0]
        };
        for which in order {
            let rate = match which {
                0 => {
                    let before = pids.map(cpu_of);
                    let rate = timed(bytes, || download(forward.1))?;
                    for (i, pid) in pids.iter().enumerate() {
                        forward_cpu[i] += cpu_of(*pid) - before[i];
                    }
                    rate
                }
                1 | 3 => {
                    let before = cpu_of(std::process::id());
                    let started = Instant::now();
                    let n = tls.read_all(which == 3).await?;
                    check_size(n as u64, bytes)?;
                    if which == 1 {
                        plain_cpu += cpu_of(std::process::id()) - before;
                    }
                    n as f64 / MIB / started.elapsed().as_secs_f64()
                }
                2 => timed(bytes, || download(direct))?,
                _ => {
                    let before = cpu_of(std::process::id());
                    let rate = timed(bytes, || download(chain.addr))?;
                    chain_cpu += cpu_of(std::process::id()) - before;
                    rate
                }
            };
            [
                &mut forwarded,
                &mut plain,
                &mut direct_rates,
                &mut plain_ahead,
                &mut chained,
            ][which as usize]
                .push(rate);
        }
        eprintln!(
            "  run {}: forwarded {:.0}, plain TLS {:.0} (with read-ahead {:.0}), direct {:.0}, bare chain {:.0} MiB/s",
            run + 1,
            forwarded[run],
            plain[run],
            plain_ahead[run],
            direct_rates[run],
            chained[run]
        );
    }
    drop(forward);
    drop(chain);

    let echoes = exec_echoes(&settings.trellis, &client, settings.echoes);
    // The agent leaves its components running when it is killed (a
    // restarted agent adopts them); this run's must not outlive it.
    drop(agent);
    kill_processes_in(work.path());
    let echoes = echoes?;

    let median = |v: &[f64]| percentile(v, 50.0);
    let mut report = Report::new(
        "streams",
        json!({
            "size_mib": settings.size_mib,
            "runs": settings.runs,
            "echoes": settings.echoes,
        }),
    );
    report.add("port-forward download, median", median(&forwarded), "MiB/s");
    report.add("plain TLS stream, median", median(&plain), "MiB/s");
    report.add(
        "plain TLS stream with read-ahead, median",
        median(&plain_ahead),
        "MiB/s",
    );
    report.add(
        "the component's port directly, median",
        median(&direct_rates),
        "MiB/s",
    );
    report.add(
        "bare relay chain (the same hops, copies only), median",
        median(&chained),
        "MiB/s",
    );
    report.at_least(
        "port-forward ÷ plain TLS",
        median(&forwarded) / median(&plain),
        "×",
        FORWARD_AT_LEAST,
    );
    report.add(
        "port-forward ÷ plain TLS with read-ahead",
        median(&forwarded) / median(&plain_ahead),
        "×",
    );
    report.add(
        "bare relay chain ÷ plain TLS",
        median(&chained) / median(&plain),
        "×",
    );
    report.add(
        "port-forward ÷ bare relay chain",
        median(&forwarded) / median(&chained),
        "×",
    );
    report.add(
        "port-forward ÷ the component directly",
        median(&forwarded) / median(&direct_rates),
        "×",
    );
    let gib_per_path = (bytes * settings.runs as u64) as f64 / (1u64 << 30) as f64;
    for (name, cpu) in ["agent", "port-forward CLI", "hub (and the client)"]
        .iter()
        .zip(forward_cpu)
    {
        report.add(
            format!("  CPU per GiB forwarded: {name}"),
            cpu / gib_per_path,
            "s",
        );
    }
    report.add(
        "  CPU per GiB: plain TLS stream, both ends",
        plain_cpu / gib_per_path,
        "s",
    );
    report.add(
        "  CPU per GiB: bare relay chain (and the client)",
        chain_cpu / gib_per_path,
        "s",
    );
    report.add(
        "exec -i round trip (line → echo), p50",
        percentile(&echoes, 50.0) * 1e3,
        "ms",
    );
    report.add(
        "exec -i round trip (line → echo), p99",
        percentile(&echoes, 99.0) * 1e3,
        "ms",
    );
    report.finish(settings.json.as_deref())?;
    Ok(())
}

/// Kills (SIGKILL) every process whose working directory is under `dir`.
fn kill_processes_in(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_of(pid: u32) -> f64 {
    setup::cpu_seconds_in(&format!("/proc/{pid}/stat"))
}

fn check_size(got: u64, want: u64) -> anyhow::Result<()> {
    if got != want {
        bail!("{got} bytes arrived instead of {want}");
    }
    Ok(())
}

/// MiB/s of `fetch`, which must return `bytes`.
fn timed(bytes: u64, fetch: impl FnOnce() -> Result<usize, String>) -> anyhow::Result<f64> {
    let started = Instant::now();
    let n = fetch().map_err(anyhow::Error::msg)?;
    check_size(n as u64, bytes)?;
    Ok(n as f64 / MIB / started.elapsed().as_secs_f64())
}

/// `GET /blob.bin` from `addr`: the body's length.
fn download(addr: SocketAddr) -> Result<usize, String> {
    let mut conn = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    write!(
        conn,
        "GET /blob.bin HTTP/1.0\r\nHost: source\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reader = BufReader::with_capacity(1 << 20, conn);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err(format!("the answer ended in its head: {head:?}"));
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("answered {head:?}"));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `trellis port-forward source 0:PORT`, running: the process and the local
/// address it listens on.
fn port_forward(
    trellis: &Path,
    client: &Client,
    port: u16,
) -> anyhow::Result<(Killed, SocketAddr)> {
    let mut child = Killed(
        client
            .command(trellis)
            .args([
                "port-forward",
                "source",
                &format!("0:{port}"),
                "-p",
                "bench",
                "-s",
                "line",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting trellis port-forward")?,
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().context("its stdout")?).read_line(&mut line)?;
    // "forwarding 127.0.0.1:PORT to port …"
    let addr = line
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in {line:?}"))?;
    Ok((child, addr))
}

/// Seconds of each round trip through `trellis exec -i source -- sed -u
/// s/x/y/` (unbuffered: each line is answered as it arrives).
fn exec_echoes(trellis: &Path, client: &Client, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut child = Killed(
        client
            .command(trellis)
            .args([
                "exec", "-i", "source", "-p", "bench", "-s", "line", "--", "sed", "-u", "s/x/y/",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting trellis exec")?,
    );
    let mut stdin = child.0.stdin.take().context("its stdin")?;
    let mut stdout = child.0.stdout.take().context("its stdout")?;
    let mut times = Vec::with_capacity(n);
    let mut echo = [0u8; 2];
    const WARM_UP: usize = 20;
    for i in 0..n + WARM_UP {
        let started = Instant::now();
        stdin.write_all(b"x\n")?;
        stdin.flush()?;
        stdout
            .read_exact(&mut echo)
            .context("trellis exec ended before echoing")?;
        if &echo != b"y\n" {
            bail!("the echo came back as {echo:?}");
        }
        if i >= WARM_UP {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// A TLS server on loopback that sends `bytes` on each connection, with
/// the hub's CA and a certificate it issued; and its client.
struct TlsSource {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    _server: tokio::task::JoinHandle<()>,
}

impl TlsSource {
    async fn start(hub_data: &Path, bytes: u64) -> anyhow::Result<TlsSource> {
        let (acceptor, connector) = (
            setup::loopback_acceptor(hub_data)?,
            setup::hub_connector(hub_data)?,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let chunk = vec![7u8; 256 << 10];
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let chunk = chunk.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        if tls.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        Ok(TlsSource {
            addr,
            connector,
            _server: server,
        })
    }

    /// The cipher suite a connection settles on.
    async fn suite(&self) -> anyhow::Result<tokio_rustls::rustls::CipherSuite> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let tls = self.connector.connect(setup::loopback_name(), tcp).await?;
        tls.get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite())
            .context("no cipher suite after the handshake")
    }

    /// One connection read to its end: the bytes received. `read_ahead`:
    /// the socket under TLS is read as Trellis's connections read theirs.
    async fn read_all(&self, read_ahead: bool) -> anyhow::Result<usize> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        if read_ahead {
            let tls = self
                .connector
                .connect(setup::loopback_name(), ReadAhead::new(tcp))
                .await?;
            return read_to_end(tls).await;
        }
        let tls = self.connector.connect(setup::loopback_name(), tcp).await?;
        read_to_end(tls).await
    }
}

/// The forwarded path's hops with nothing but copies between them: what
/// any relay built of these pieces could reach on this machine.
///
/// The client's TCP connection → a relay in the CLI's place → TLS → a
/// relay in the hub's place → TLS → a relay in the agent's place → TCP to
/// the component; the same hub certificate and client configuration as
/// the plain stream, so the same cipher suite on both TLS hops, and the
/// sockets under TLS read ahead as Trellis's are (which made the chain
/// about a tenth faster: the floor should be the best such relay). Each relay
/// copies both ways through 256 KiB buffers, in this process: no framing,
/// no flow control, no authorisation, no separate processes to switch
/// between, so it is a floor for the forwarded path's CPU, not a model of
/// it.
struct BareChain {
    addr: SocketAddr,
    relays: [tokio::task::JoinHandle<()>; 3],
}

impl BareChain {
    async fn start(hub_data: &Path, component: SocketAddr) -> anyhow::Result<BareChain> {
        let (server, client) = (
            setup::loopback_acceptor(hub_data)?,
            setup::hub_connector(hub_data)?,
        );

        // In the agent's place: TLS in, TCP to the component.
        let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let agent_addr = agent.local_addr()?;
        let agent_server = server.clone();
        let agent = tokio::spawn(relay_each(agent, move |tcp| {
            let server = agent_server.clone();
            async move {
                let tls = server.accept(ReadAhead::new(tcp)).await?;
                let component = tokio::net::TcpStream::connect(component).await?;
                Ok((tls, component))
            }
        }));
        // In the hub's place: TLS in, TLS to the agent's place.
        let hub = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let hub_addr = hub.local_addr()?;
        let (hub_server, hub_client) = (server, client.clone());
        let hub = tokio::spawn(relay_each(hub, move |tcp| {
            let (server, client) = (hub_server.clone(), hub_client.clone());
            async move {
                let inbound = server.accept(ReadAhead::new(tcp)).await?;
                let upstream = tokio::net::TcpStream::connect(agent_addr).await?;
                Ok((
                    inbound,
                    client
                        .connect(setup::loopback_name(), ReadAhead::new(upstream))
                        .await?,
                ))
            }
        }));
        // In the CLI's place: the client's TCP in, TLS to the hub's place.
        let cli = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = cli.local_addr()?;
        let cli = tokio::spawn(relay_each(cli, move |tcp| {
            let client = client.clone();
            async move {
                let upstream = tokio::net::TcpStream::connect(hub_addr).await?;
                Ok((
                    tcp,
                    client
                        .connect(setup::loopback_name(), ReadAhead::new(upstream))
                        .await?,
                ))
            }
        }));
        Ok(BareChain {
            addr,
            relays: [agent, hub, cli],
        })
    }
}

impl Drop for BareChain {
    fn drop(&mut self) {
        for relay in &self.relays {
            relay.abort();
        }
    }
}

/// Accepts connections on `listener`; for each, `connect` makes the pair
/// of streams to copy between, both ways, until both ends close.
async fn relay_each<A, B, F, Fut>(listener: tokio::net::TcpListener, connect: F)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(A, B)>> + Send + 'static,
{
    const BUFFER: usize = 256 << 10;
    while let Ok((tcp, _)) = listener.accept().await {
        let pair = connect(tcp);
        tokio::spawn(async move {
            if let Ok((mut a, mut b)) = pair.await {
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER, BUFFER).await;
            }
        });
    }
}

/// Reads a TLS connection to its end: the bytes received.
async fn read_to_end(mut tls: impl tokio::io::AsyncRead + Unpin) -> anyhow::Result<usize> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            // The server closes without waiting for our close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(e) => return Err(e.into()),
        }
    }
}
