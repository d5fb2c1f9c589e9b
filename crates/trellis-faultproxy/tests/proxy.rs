//! End-to-end tests of the fault proxy over real loopback sockets, against a
//! small echo server, plus one test of the binary's stdin control protocol.
//!
//! Timing assertions are lower bounds only; the timeouts here exist so a
//! broken proxy fails a test instead of hanging it, and are generous.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use trellis_faultproxy::{FaultProxy, Mode, Stats};

/// How long a test waits for something that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(5);

/// An echo server on loopback; counts the connections it accepted, so tests
/// can see whether the proxy dialled the upstream.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Echo { addr, accepted }
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    TcpStream::connect(proxy.addr()).await.unwrap()
}

/// Writes `msg` and reads exactly as many bytes back.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    timeout(PATIENCE, s.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .expect("echo read failed");
    back
}

/// Asserts the peer closed the connection (EOF or reset) rather than sending
/// data or leaving it open.
async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match timeout(PATIENCE, s.read(&mut buf)).await {
        Err(_) => panic!("connection still open"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("expected close, got {n} bytes"),
    }
}

/// Asserts the peer reset the connection (RST, not FIN).
async fn assert_reset(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match timeout(PATIENCE, s.read(&mut buf)).await {
        Err(_) => panic!("connection still open"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// Asserts a new connection to `addr` is closed at once. The reset can
/// arrive before `connect` returns, which then reports it as an error.
async fn assert_refused(addr: SocketAddr) {
    if let Ok(mut s) = TcpStream::connect(addr).await {
        assert_closed(&mut s).await;
    }
}

/// Stats are counted just after each write completes, so a client can see
/// the data a moment before the counter moves; poll briefly.
async fn wait_for_stats(proxy: &FaultProxy, ok: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = proxy.stats();
        if ok(&stats) || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn pass_through_echoes() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    assert_eq!(proxy.mode(), Mode::Pass);
    let mut s = connect(&proxy).await;
    assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
    // Larger than one proxy chunk, to cover splitting and reassembly.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(&mut s, &big).await, big);
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_eof_is_forwarded() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut s = connect(&proxy).await;
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    // The echo server only closes after seeing our FIN through the proxy.
    let mut back = Vec::new();
    timeout(PATIENCE, s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"last words");
    let stats = wait_for_stats(&proxy, |s| s.active == 0).await;
    assert_eq!(stats.active, 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn drop_connections_resets_and_keeps_accepting() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    round_trip(&mut a, b"a").await;
    round_trip(&mut b, b"b").await;

    proxy.drop_connections();
    // Documented as a reset, like a crashed peer or a middlebox losing state.
    assert_reset(&mut a).await;
    assert_reset(&mut b).await;
    let stats = wait_for_stats(&proxy, |s| s.active == 0).await;
    assert_eq!(stats.active, 0);

    let mut c = connect(&proxy).await;
    assert_eq!(round_trip(&mut c, b"again").await, b"again");
    assert_eq!(proxy.stats().accepted, 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn refuse_closes_new_and_existing_connections() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut existing = connect(&proxy).await;
    round_trip(&mut existing, b"up").await;

    proxy.set(Mode::Refuse);
    assert_eq!(proxy.mode(), Mode::Refuse);
    assert_closed(&mut existing).await;
    assert_refused(proxy.addr()).await;
    // A refused client must not reach the upstream.
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);

    proxy.set(Mode::Pass);
    let mut later = connect(&proxy).await;
    assert_eq!(round_trip(&mut later, b"back").await, b"back");
    proxy.shutdown().await;
}

#[tokio::test]
async fn blackhole_holds_data_then_delivers_it_late() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut old = connect(&proxy).await;
    round_trip(&mut old, b"warm").await;

    proxy.set(Mode::Blackhole);
    // Both a connection that was open and one made during the blackhole.
    let mut new = connect(&proxy).await;
    old.write_all(b"held-old").await.unwrap();
    new.write_all(b"held-new").await.unwrap();
    let mut buf = [0u8; 8];
    let (r_old, r_new) = tokio::join!(
        timeout(Duration::from_millis(300), old.read(&mut buf)),
        async {
            let mut buf = [0u8; 8];
            timeout(Duration::from_millis(300), new.read(&mut buf)).await
        },
    );
    assert!(r_old.is_err(), "blackholed connection got {r_old:?}");
    assert!(r_new.is_err(), "blackholed connection got {r_new:?}");
    // A dead link does not carry the SYN: the upstream saw only `old`.
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(proxy.stats().bytes_up, 4);

    // Healing delivers what waited, in order (the documented choice).
    proxy.set(Mode::Pass);
    let mut back = [0u8; 8];
    timeout(PATIENCE, old.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"held-old");
    timeout(PATIENCE, new.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"held-new");
    assert_eq!(round_trip(&mut old, b"more").await, b"more");
    proxy.shutdown().await;
}

#[tokio::test]
async fn delay_adds_latency_both_ways() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut s = connect(&proxy).await;
    round_trip(&mut s, b"warm").await;

    proxy.set(Mode::Delay(Duration::from_millis(200)));
    let started = Instant::now();
    assert_eq!(round_trip(&mut s, b"slow").await, b"slow");
    // 200 ms each way; only the lower bound of one delay is asserted.
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "round trip took {:?}",
        started.elapsed()
    );

    // Back to Pass: anything queued is released, and the link works.
    proxy.set(Mode::Pass);
    assert_eq!(round_trip(&mut s, b"fast").await, b"fast");
    proxy.shutdown().await;
}

#[tokio::test]
async fn throttle_paces_each_direction() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    proxy.set(Mode::Throttle {
        bytes_per_sec: 10 * 1024,
    });
    let mut s = connect(&proxy).await;
    let data = vec![7u8; 20 * 1024];
    let started = Instant::now();
    // Measured to the last echoed byte: the proxy's bounded queue may accept
    // the write sooner than the link delivers it.
    assert_eq!(round_trip(&mut s, &data).await, data);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "20 KiB at 10 KiB/s took only {:?}",
        started.elapsed()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn stats_count_connections_and_bytes() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    assert_eq!(proxy.stats(), Stats::default());
    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    round_trip(&mut a, &[1u8; 1000]).await;
    round_trip(&mut b, &[2u8; 500]).await;
    let want = Stats {
        accepted: 2,
        active: 2,
        bytes_up: 1500,
        bytes_down: 1500,
    };
    assert_eq!(wait_for_stats(&proxy, |s| *s == want).await, want);

    drop(a);
    let stats = wait_for_stats(&proxy, |s| s.active == 1).await;
    assert_eq!(stats.active, 1);
    assert_eq!(stats.accepted, 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_listener_and_connections() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let addr = proxy.addr();
    let mut s = connect(&proxy).await;
    round_trip(&mut s, b"hi").await;
    // Also one held in a blackhole, which has no upstream yet.
    proxy.set(Mode::Blackhole);
    let mut held = connect(&proxy).await;

    proxy.shutdown().await;
    assert_closed(&mut s).await;
    assert_closed(&mut held).await;
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test]
async fn dropping_the_handle_ends_everything() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut s = connect(&proxy).await;
    round_trip(&mut s, b"hi").await;
    drop(proxy);
    assert_closed(&mut s).await;
}

#[tokio::test]
async fn upstream_down_closes_client() {
    // Bind then drop to get a port nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = FaultProxy::start(dead).await.unwrap();
    let mut s = connect(&proxy).await;
    assert_closed(&mut s).await;
    assert_eq!(wait_for_stats(&proxy, |s| s.active == 0).await.active, 0);
    proxy.shutdown().await;
}

/// Drives the binary as a campaign script would: through stdin, one answer
/// line per command.
#[tokio::test]
async fn binary_control_protocol() {
    let echo = echo_server().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis-faultproxy"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &echo.addr.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        timeout(PATIENCE, out.next_line())
            .await
            .expect("no answer")
            .unwrap()
            .expect("stdout closed")
    };

    let first = next().await;
    let addr: SocketAddr = first
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .parse()
        .unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut s, b"via binary").await;

    let mut ask = async |line: &str| {
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
    };
    ask("delay 100").await;
    assert_eq!(next().await, "ok");
    ask("mode").await;
    assert_eq!(next().await, "delay 100");
    ask("bogus").await;
    assert!(next().await.starts_with("error: "));
    ask("throttle nope").await;
    assert!(next().await.starts_with("error: "));
    // The proxy counts a chunk after writing it on, so the echo can reach
    // the client a moment before it is counted.
    let mut stats = String::new();
    for _ in 0..100 {
        ask("stats").await;
        stats = next().await;
        if stats.ends_with("down=10") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats, "accepted=1 active=1 up=10 down=10");
    ask("pass").await;
    assert_eq!(next().await, "ok");
    ask("reset").await;
    assert_eq!(next().await, "ok");
    assert_closed(&mut s).await;
    ask("drop").await;
    assert_eq!(next().await, "ok");
    assert_refused(addr).await;
    ask("blackhole").await;
    assert_eq!(next().await, "ok");

    // Closing stdin shuts the proxy down and exits cleanly.
    drop(stdin);
    let status = timeout(PATIENCE, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit status {status}");
}
