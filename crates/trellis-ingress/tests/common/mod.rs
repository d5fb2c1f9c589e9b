//! Shared by the test binaries: an ingress on port 0, real hyper backends,
//! and small clients (hyper over a fresh connection, or raw bytes).
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use trellis_ingress::{Certificates, Ingress, Route};

pub const OUTPOST: &str = "plant7";

/// A test must never hang: every wait is bounded by this.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct Proxy {
    pub ingress: Ingress,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

pub async fn proxy() -> Proxy {
    proxy_with(None).await
}

pub async fn proxy_with(tls: Option<Certificates>) -> Proxy {
    let ingress = Ingress::new(OUTPOST);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = ingress.clone();
    let task = tokio::spawn(async move {
        serving
            .serve(listener, tls, async {
                let _ = stopped.await;
            })
            .await
    });
    Proxy {
        ingress,
        addr,
        stop: Some(stop),
        task,
    }
}

impl Proxy {
    pub fn routes(&self, routes: Vec<Route>) {
        self.ingress.set_routes(routes).unwrap();
    }

    /// Stops `serve` and waits for it to return.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

pub fn route(host: &str, path: &str, endpoints: &[SocketAddr]) -> Route {
    Route {
        host: host.to_owned(),
        path: path.to_owned(),
        endpoints: endpoints.to_vec(),
        owner: format!("component for {host}{path} of stage dev (project shop)"),
        ..Route::default()
    }
}

pub type TestBody = BoxBody<Bytes, Infallible>;

pub fn text(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).boxed()
}

/// Serves `handler` over HTTP/1.1 on a port of its own.
pub async fn serve_backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    serve_stoppable(handler).await.0
}

/// Like `serve_backend`; aborting the handle closes the port and every
/// connection, as a replica that stops.
pub async fn serve_stoppable<F, Fut>(handler: F) -> (SocketAddr, AbortHandle)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        // Connections live in the set, so aborting this task ends them.
        let mut connections = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            connections.spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    });
    (addr, task.abort_handle())
}

pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: AbortHandle,
}

impl Backend {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Closes the port and the open connections.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// A backend answering with its name, the request line and the headers it
/// saw, one per line.
pub async fn echo(name: &'static str) -> Backend {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let (addr, task) = serve_stoppable(move |req: Request<Incoming>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut out = format!("{name}\n{} {}\n", req.method(), req.uri());
            for (header, value) in req.headers() {
                out.push_str(&format!(
                    "{header}: {}\n",
                    value.to_str().unwrap_or("<binary>")
                ));
            }
            Response::builder()
                .header("x-backend", name)
                .body(text(out))
                .unwrap()
        }
    })
    .await;
    Backend { addr, hits, task }
}

/// An address nothing listens on (bound, then closed).
pub fn dead_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The echo backend's name.
    pub fn backend(&self) -> &str {
        self.body.lines().next().unwrap_or("")
    }

    /// A header the echo backend saw (all values, joined by " | ").
    pub fn seen(&self, header: &str) -> Option<String> {
        let prefix = format!("{header}: ");
        let values: Vec<&str> = self
            .body
            .lines()
            .skip(2)
            .filter_map(|line| line.strip_prefix(&prefix))
            .collect();
        (!values.is_empty()).then(|| values.join(" | "))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn code(&self) -> Option<&str> {
        self.body
            .lines()
            .find_map(|line| line.strip_prefix("code: "))
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn send(proxy: SocketAddr, req: Request<TestBody>) -> Reply {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("the proxy answers")
        .unwrap();
    collect(response).await
}

pub async fn collect(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("the body ends")
        .unwrap()
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(proxy: SocketAddr, host: &str, path: &str) -> Reply {
    send(proxy, get_request(host, path)).await
}

pub fn get_request(host: &str, path: &str) -> Request<TestBody> {
    Request::get(path)
        .header("host", host)
        .body(Empty::new().boxed())
        .unwrap()
}

/// Writes `request` as is and reads until the proxy closes.
pub async fn raw(proxy: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the proxy closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `condition` every 10 ms until it holds, at most `PATIENCE`.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
