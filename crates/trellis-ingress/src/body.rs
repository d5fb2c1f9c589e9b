//! The bodies the ingress answers with: a small page of its own, or the
//! backend's body passed through frame by frame — never buffered, so
//! server-sent events and long downloads flow as the backend writes them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::endpoint::{Endpoint, InFlight};

/// What the ingress answers a client with.
pub enum ProxyBody {
    Page(Option<Bytes>),
    Upstream(Upstream),
}

/// What the ingress sends a backend: the client's body as it arrives, or
/// nothing (a bodiless request replayed on a fresh connection).
pub enum RequestBody {
    Client(Incoming),
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Client(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(body) => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(body) => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A backend's response body. Holds the request's in-flight count until the
/// body ends or the client goes away, and gives the connection back to the
/// pool once the body was read to its end (a connection left mid-body
/// cannot carry another request and is closed instead).
pub struct Upstream {
    body: Incoming,
    connection: Option<(SendRequest<RequestBody>, Arc<Endpoint>)>,
    in_flight: Option<InFlight>,
}

impl Upstream {
    pub(crate) fn new(
        body: Incoming,
        sender: SendRequest<RequestBody>,
        in_flight: InFlight,
    ) -> Self {
        let endpoint = in_flight.endpoint().clone();
        Upstream {
            body,
            connection: Some((sender, endpoint)),
            in_flight: Some(in_flight),
        }
    }

    fn finish(&mut self, reusable: bool) {
        if let Some((sender, endpoint)) = self.connection.take()
            && reusable
        {
            endpoint.put_idle(sender);
        }
        self.in_flight = None;
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Page(page) => Poll::Ready(page.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(upstream) => {
                let polled = Pin::new(&mut upstream.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => upstream.finish(true),
                    Poll::Ready(Some(Err(_))) => upstream.finish(false),
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Page(page) => page.is_none(),
            ProxyBody::Upstream(upstream) => upstream.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Page(Some(page)) => SizeHint::with_exact(page.len() as u64),
            ProxyBody::Page(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream(upstream) => upstream.body.size_hint(),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Bodies the server never polls (HEAD, 204, 304, an empty body) end
        // here; the connection is reusable when nothing is left unread.
        let reusable = self.body.is_end_stream();
        self.finish(reusable);
    }
}
