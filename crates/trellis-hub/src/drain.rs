//! Request bodies a handler did not read are read to their end before the
//! response goes out.
//!
//! A handler may answer without reading the whole body: a JSON body over
//! its limit (413), a request refused before its body mattered (401). Over
//! HTTP/1 the connection then cannot carry another request, and closing it
//! while the client is still sending makes the client fail on its write
//! (a reset, or with TLS an unexpected EOF) instead of reading the answer
//! that says what was wrong. So the rest is read and dropped — up to
//! [`DRAIN_LIMIT`] bytes and [`DRAIN_TIME`]; beyond that the connection
//! closes as before. A client that asked `Expect: 100-continue` has sent
//! nothing yet and is not asked for the body at all.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{Version, header};
use axum::middleware::Next;
use axum::response::Response;

/// The most unread body read and dropped for one request.
pub const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;
/// The longest the reading may take.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The middleware (`axum::middleware::from_fn(drain::unread_body)`).
pub async fn unread_body(request: Request, next: Next) -> Response {
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    // HTTP/2 resets one stream without touching the others; a request
    // without a body has nothing to read.
    if request.version() >= Version::HTTP_2 || expects_continue || request.body().is_end_stream() {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let shared = Arc::new(Mutex::new(body));
    let response = next
        .run(Request::from_parts(
            parts,
            Body::new(Shared(shared.clone())),
        ))
        .await;
    let _ = tokio::time::timeout(DRAIN_TIME, drain(&shared)).await;
    response
}

async fn drain(body: &Arc<Mutex<Body>>) {
    let mut read: u64 = 0;
    while read <= DRAIN_LIMIT {
        let frame = std::future::poll_fn(|cx| {
            let mut body = lock(body);
            if body.is_end_stream() {
                return Poll::Ready(None);
            }
            Pin::new(&mut *body).poll_frame(cx)
        })
        .await;
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len() as u64;
                }
            }
            Some(Err(_)) | None => return,
        }
    }
}

fn lock(body: &Mutex<Body>) -> MutexGuard<'_, Body> {
    // Polling a body does not panic half-way through a change of the
    // mutex's content; a poisoned lock still guards a usable body.
    body.lock().unwrap_or_else(|p| p.into_inner())
}

/// The body as the handler sees it; what it leaves unread stays behind
/// for [`drain`].
struct Shared(Arc<Mutex<Body>>);

impl HttpBody for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut *lock(&self.0)).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.0).is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        lock(&self.0).size_hint()
    }
}
