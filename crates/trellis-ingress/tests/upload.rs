//! A 1 GiB upload streams through the proxy without being held in memory.
//! A test binary of its own: the memory bound is read from this process's
//! RSS, which other tests running alongside would disturb.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const CHUNK: usize = 64 * 1024;
const TOTAL: u64 = 1 << 30;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// `TOTAL` bytes of zeros, made as they are sent (no allocation per chunk).
struct Zeros {
    left: u64,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_upload_is_streamed_not_buffered() {
    let backend = serve_backend(|req: Request<Incoming>| async move {
        // Counts and discards.
        let mut body = req.into_body();
        let mut count = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                count += data.len() as u64;
            }
        }
        Response::new(text(count.to_string()))
    })
    .await;
    let proxy = proxy().await;
    proxy.routes(vec![route("upload.example.test", "/", &[backend])]);

    // Warm up (first connections, buffers), then take the baseline.
    assert_eq!(get(proxy.addr, "upload.example.test", "/").await.body, "0");
    let baseline = rss_kib();
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let started = Instant::now();
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::put("/blob")
        .header("host", "upload.example.test")
        .body(Zeros { left: TOTAL })
        .unwrap();
    let reply = collect(sender.send_request(request).await.unwrap()).await;
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, TOTAL.to_string(), "the backend got every byte");
    let grew_mib = (peak.load(Ordering::Relaxed).saturating_sub(baseline)) / 1024;
    eprintln!(
        "1 GiB through the proxy in {:.1} s ({:.0} MiB/s); RSS grew by {grew_mib} MiB (baseline {} MiB)",
        took.as_secs_f64(),
        1024.0 / took.as_secs_f64(),
        baseline / 1024
    );
    assert!(
        grew_mib < 64,
        "RSS grew by {grew_mib} MiB during the upload"
    );
    proxy.shutdown().await;
}
