//! The floor the link is compared with: a bare TLS server (same rustls
//! configuration as the hub: its CA, a server certificate it issues, client
//! certificates verified) holding idle connections from the same outposts,
//! with the same client certificates, and nothing on top — no WebSocket,
//! no session, no state. Runs as its own process (`trellis-bench
//! tls-baseline --hub-data DIR`) so its memory is measured alone.
//!
//! It speaks a line protocol on stdin/stdout: it prints `listening PORT`,
//! then answers `count` with `count N` (connections held) and `fanout` with
//! `fanout N P50 P99 MAX` (seconds until each connection echoed a 16-byte
//! message sent to all at once).

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use trellis_agent::state::Identity;

const MESSAGE: &[u8; 16] = b"trellis-baseline";

/// The server process: runs until stdin closes.
pub fn serve(hub_data: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let acceptor = crate::setup::loopback_acceptor(hub_data)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", listener.local_addr()?.port());

        let held = Arc::new(AtomicUsize::new(0));
        let (fanout, _) = broadcast::channel::<()>(4);
        let (echoed, mut echoes) = mpsc::unbounded_channel::<f64>();
        {
            let held = held.clone();
            let fanout = fanout.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let held = held.clone();
                    let mut go = fanout.subscribe();
                    let echoed = echoed.clone();
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        held.fetch_add(1, Ordering::Relaxed);
                        let mut buf = [0u8; 16];
                        while go.recv().await.is_ok() {
                            let sent = Instant::now();
                            if tls.write_all(MESSAGE).await.is_err()
                                || tls.flush().await.is_err()
                                || tls.read_exact(&mut buf).await.is_err()
                            {
                                break;
                            }
                            let _ = echoed.send(sent.elapsed().as_secs_f64());
                        }
                        held.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            });
        }

        let (commands_tx, mut commands) = mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if commands_tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(command) = commands.recv().await {
            match command.trim() {
                "count" => println!("count {}", held.load(Ordering::Relaxed)),
                "fanout" => {
                    let n = held.load(Ordering::Relaxed);
                    let started = Instant::now();
                    let _ = fanout.send(());
                    let mut times = Vec::with_capacity(n);
                    while times.len() < n {
                        match tokio::time::timeout(
                            std::time::Duration::from_secs(60),
                            echoes.recv(),
                        )
                        .await
                        {
                            Ok(Some(t)) => times.push(t),
                            _ => break,
                        }
                    }
                    let total = started.elapsed().as_secs_f64();
                    println!(
                        "fanout {} {} {} {}",
                        times.len(),
                        crate::report::percentile(&times, 50.0),
                        crate::report::percentile(&times, 99.0),
                        total
                    );
                }
                other => println!("unknown {other}"),
            }
        }
        anyhow::Ok(())
    })
}

/// One client connection: TLS with the outpost's certificate, then echo
/// whatever the server sends, until it closes.
pub async fn hold_connection(
    port: u16,
    source: std::net::IpAddr,
    identity: &Identity,
) -> anyhow::Result<()> {
    let config = trellis_link::identity::client_config(
        &identity.ca_cert_pem,
        Some((&identity.cert_pem, &identity.key_pem)),
    )?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = crate::setup::loopback_name();
    // Thousands connect at once and overflow the listen backlog; retry
    // with jittered backoff, as agents do.
    let mut attempt = 0u32;
    let mut tls = loop {
        // A connection the server's full backlog dropped looks open to
        // the client until something is sent; give each attempt 10 s.
        let connected = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let tcp = trellis_agent::connect_from(Some(source), (Ipv4Addr::LOCALHOST, port).into())
                .await?;
            anyhow::Ok(connector.connect(name.clone(), tcp).await?)
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s")));
        match connected {
            Ok(tls) => break tls,
            Err(e) if attempt >= 20 => {
                return Err(e.context("TLS handshake with the baseline server"));
            }
            Err(_) => {
                attempt += 1;
                let ceiling = 50u64 << attempt.min(6);
                let wait = rand::random::<u64>() % ceiling;
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
        }
    };
    let mut buf = [0u8; 16];
    loop {
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
    }
}
