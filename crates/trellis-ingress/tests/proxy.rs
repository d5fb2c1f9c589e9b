//! The proxy over real sockets: routing, error pages, balancing and
//! stickiness, retries, upgrades, streaming, headers, routes and draining.

mod common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use trellis_ingress::{Route, RouteError, STICKY_COOKIE};

// === routing and error pages ===

#[tokio::test]
async fn routes_by_host_and_longest_path_prefix() {
    let root = echo("root").await;
    let api = echo("api").await;
    let api_v2 = echo("api-v2").await;
    let other = echo("other").await;
    let proxy = proxy().await;
    proxy.routes(vec![
        route("web.example.test", "/", &[root.addr]),
        route("web.example.test", "/api", &[api.addr]),
        route("web.example.test", "/api/v2/", &[api_v2.addr]),
        route("other.example.test", "/", &[other.addr]),
    ]);

    for (host, path, expected) in [
        ("web.example.test", "/", "root"),
        ("web.example.test", "/index.html", "root"),
        ("web.example.test", "/api", "api"),
        ("web.example.test", "/api/", "api"),
        ("web.example.test", "/api/users?id=1", "api"),
        ("web.example.test", "/apix", "root"),
        ("web.example.test", "/api/v2", "api-v2"),
        ("web.example.test", "/api/v2/x", "api-v2"),
        ("web.example.test", "/api/v2x", "api"),
        ("other.example.test", "/api", "other"),
        // Case, port and a trailing dot do not matter.
        ("WEB.Example.Test:8080", "/api", "api"),
        ("web.example.test.", "/", "root"),
        ("web.example.test.:80", "/api/v2", "api-v2"),
    ] {
        let reply = get(proxy.addr, host, path).await;
        assert_eq!(reply.status, StatusCode::OK, "{host}{path}: {reply:?}");
        assert_eq!(reply.backend(), expected, "{host}{path}");
    }
    // The backend gets the path and query as the client sent them.
    let reply = get(proxy.addr, "web.example.test", "/api/users?id=1").await;
    assert_eq!(reply.body.lines().nth(1), Some("GET /api/users?id=1"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn http2_requests_are_routed_by_authority() {
    let api = echo("api").await;
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/api", &[api.addr])]);

    // HTTP/2 with prior knowledge over plain TCP: the host is the
    // `:authority`, and there is no Host header.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for _ in 0..3 {
        let request = Request::get("http://Web.Example.Test:9999/api/x")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let reply = collect(sender.send_request(request).await.unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.backend(), "api");
        assert_eq!(reply.body.lines().nth(1), Some("GET /api/x"));
        assert_eq!(reply.seen("host").as_deref(), Some("Web.Example.Test:9999"));
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn unknown_hosts_and_paths_get_a_404_naming_the_outpost() {
    let api = echo("api").await;
    let proxy = proxy().await;
    proxy.routes(vec![
        route("web.example.test", "/api", &[api.addr]),
        route("web.example.test", "/admin", &[api.addr]),
    ]);

    let reply = get(proxy.addr, "nobody.example.test", "/").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(
        reply.body.contains(
            "no app on outpost plant7 answers to host nobody.example.test; the hosts served \
             here are listed by `trellis list component`"
        ),
        "{}",
        reply.body
    );
    assert_eq!(reply.code(), Some("unknown-host"));
    assert_eq!(reply.header("x-trellis-error"), Some("unknown-host"));
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );

    let reply = get(proxy.addr, "web.example.test", "/other").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.code(), Some("unknown-path"));
    assert!(
        reply.body.contains("plant7")
            && reply.body.contains("/api")
            && reply.body.contains("/admin"),
        "{}",
        reply.body
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_missing_or_malformed_host_gets_a_400() {
    let api = echo("api").await;
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/", &[api.addr])]);

    for request in [
        "GET / HTTP/1.1\r\nHost: exa mple\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.example.test:http\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a..b\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.example.test\r\nHost: other.example.test\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw(proxy.addr, request).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{request:?} → {answer}"
        );
        assert!(answer.contains("code: bad-host"), "{answer}");
    }
    assert_eq!(api.hits(), 0);
    // The same connection style with a good host goes through.
    let answer = raw(
        proxy.addr,
        "GET / HTTP/1.1\r\nHost: web.example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    proxy.shutdown().await;
}

// === balancing and stickiness ===

#[tokio::test]
async fn round_robin_spreads_over_the_endpoints() {
    let a = echo("a").await;
    let b = echo("b").await;
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/", &[a.addr, b.addr])]);
    for _ in 0..10 {
        let reply = get(proxy.addr, "web.example.test", "/").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            reply.header("set-cookie").is_none(),
            "no cookie on a route that is not sticky"
        );
    }
    assert_eq!((a.hits(), b.hits()), (5, 5));
    proxy.shutdown().await;
}

fn sticky_cookie(reply: &Reply) -> String {
    let set = reply.header("set-cookie").expect("a sticky cookie is set");
    assert!(set.starts_with(&format!("{STICKY_COOKIE}=")), "{set}");
    assert!(
        set.contains("; Path=/app") && set.contains("; HttpOnly") && set.contains("; SameSite=Lax"),
        "{set}"
    );
    set.split(';').next().unwrap().to_owned()
}

async fn get_with_cookie(proxy: std::net::SocketAddr, cookie: &str) -> Reply {
    let mut request = get_request("sticky.example.test", "/app/page");
    request
        .headers_mut()
        .insert("cookie", format!("theme=dark; {cookie}").parse().unwrap());
    send(proxy, request).await
}

#[tokio::test]
async fn a_sticky_cookie_keeps_a_client_on_one_endpoint() {
    let a = echo("a").await;
    let b = echo("b").await;
    let proxy = proxy().await;
    let sticky = |endpoints: &[std::net::SocketAddr]| Route {
        sticky: true,
        ..route("sticky.example.test", "/app", endpoints)
    };
    proxy.routes(vec![sticky(&[a.addr, b.addr])]);

    let first = get(proxy.addr, "sticky.example.test", "/app").await;
    let cookie = sticky_cookie(&first);
    let chosen = first.backend().to_owned();
    for _ in 0..20 {
        let reply = get_with_cookie(proxy.addr, &cookie).await;
        assert_eq!(reply.backend(), chosen);
        assert!(
            reply.header("set-cookie").is_none(),
            "the cookie is set again only when it changes"
        );
    }
    assert_eq!(a.hits() + b.hits(), 21);
    assert!(
        a.hits() == 21 || b.hits() == 21,
        "one backend got them all: {} / {}",
        a.hits(),
        b.hits()
    );

    // Without the cookie, requests spread (and each gets a cookie).
    let mut seen = HashSet::new();
    for _ in 0..10 {
        let reply = get(proxy.addr, "sticky.example.test", "/app/x").await;
        sticky_cookie(&reply);
        seen.insert(reply.backend().to_owned());
    }
    assert_eq!(
        seen.len(),
        2,
        "both backends served clients without a cookie"
    );

    // The chosen endpoint leaves the route: another one serves, with a new
    // cookie that then sticks.
    let remaining = if chosen == "a" { &b } else { &a };
    proxy.routes(vec![sticky(&[remaining.addr])]);
    let moved = get_with_cookie(proxy.addr, &cookie).await;
    assert_ne!(moved.backend(), chosen);
    let new_cookie = sticky_cookie(&moved);
    assert_ne!(new_cookie, cookie);
    let again = get_with_cookie(proxy.addr, &new_cookie).await;
    assert_eq!(again.backend(), moved.backend());
    assert!(again.header("set-cookie").is_none());
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_sticky_endpoint_that_is_down_is_replaced() {
    let live = echo("live").await;
    let dying = echo("dying").await;
    let proxy = proxy().await;
    proxy.routes(vec![Route {
        sticky: true,
        ..route("sticky.example.test", "/app", &[dying.addr, live.addr])
    }]);
    let mut cookie = None;
    for _ in 0..2 {
        let reply = get(proxy.addr, "sticky.example.test", "/app").await;
        if reply.backend() == "dying" {
            cookie = Some(sticky_cookie(&reply));
        }
    }
    let cookie = cookie.expect("round-robin chose each endpoint once");
    // The replica stops while the route still lists it (the agent has not
    // swapped yet): its connect fails, the other endpoint answers, and the
    // cookie moves there.
    dying.stop();
    for _ in 0..3 {
        let reply = get_with_cookie(proxy.addr, &cookie).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.backend(), "live");
        assert_ne!(sticky_cookie(&reply), cookie);
    }
    proxy.shutdown().await;
}

// === connect failures ===

#[tokio::test]
async fn a_refused_connect_is_retried_on_the_next_endpoint() {
    let live = echo("live").await;
    let proxy = proxy().await;
    proxy.routes(vec![route(
        "web.example.test",
        "/",
        &[dead_addr(), live.addr],
    )]);
    for i in 0..50 {
        // POST too: nothing was sent to the dead endpoint, so any method
        // may be retried.
        let request = Request::post("/form")
            .header("host", "web.example.test")
            .body(text(format!("request {i}")))
            .unwrap();
        let reply = send(proxy.addr, request).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {reply:?}");
        assert_eq!(reply.backend(), "live");
    }
    assert_eq!(live.hits(), 50);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_request_that_raced_a_swap_is_sent_to_the_new_endpoints() {
    // An endpoint whose accept queue is full: the kernel drops further
    // SYNs, so a connect hangs until the proxy's connect timeout — long
    // enough for the agent to swap the table meanwhile.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(0).unwrap();
    let stalled = full.local_addr().unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(stream)) =
        tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(stalled)).await
    {
        queued.push(stream);
        assert!(queued.len() < 16, "the accept queue does not fill up");
    }
    let new = echo("new").await;
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/", &[stalled])]);
    let addr = proxy.addr;
    let request = tokio::spawn(async move { get(addr, "web.example.test", "/").await });
    let ingress = proxy.ingress.clone();
    eventually("the request to be connecting", || {
        ingress.in_flight(stalled) == 1
    })
    .await;
    // The release swaps the replica while the request still tries the old one.
    proxy.routes(vec![route("web.example.test", "/", &[new.addr])]);
    let reply = request.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.backend(), "new");
    drop((full, queued));
    proxy.shutdown().await;
}

#[tokio::test]
async fn all_endpoints_dead_is_a_502_and_none_is_a_503() {
    let proxy = proxy().await;
    proxy.routes(vec![
        route("dead.example.test", "/", &[dead_addr(), dead_addr()]),
        route("empty.example.test", "/", &[]),
    ]);

    let reply = get(proxy.addr, "dead.example.test", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.code(), Some("backend-unreachable"));
    assert!(
        reply.body.contains(
            "component for dead.example.test/ of stage dev (project shop) could not be reached"
        ),
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("none of its 2 replica(s)"),
        "{}",
        reply.body
    );

    let reply = get(proxy.addr, "empty.example.test", "/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.code(), Some("no-replica"));
    assert!(
        reply.body.contains(
            "component for empty.example.test/ of stage dev (project shop) has no replica up"
        ),
        "{}",
        reply.body
    );
    assert_eq!(reply.header("retry-after"), Some("5"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_backend_that_breaks_before_answering_is_a_502() {
    // Accepts, reads the request, and closes without a response.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
        }
    });
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/", &[addr])]);
    let reply = get(proxy.addr, "web.example.test", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.code(), Some("backend-failed"));
    assert!(
        reply.body.contains(
            "component for web.example.test/ of stage dev (project shop) failed the request"
        ),
        "{}",
        reply.body
    );
    assert_eq!(proxy.ingress.in_flight(addr), 0);
    proxy.shutdown().await;
}

// === upgrades and streaming ===

#[tokio::test]
async fn websocket_echo_passes_through() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            ws.send(message).await.unwrap();
        }
    });
    let proxy = proxy().await;
    proxy.routes(vec![route("ws.example.test", "/socket", &[backend])]);

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, response) =
        tokio_tungstenite::client_async("ws://ws.example.test/socket/chat", stream)
            .await
            .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        proxy.ingress.in_flight(backend),
        1,
        "the tunnel counts as in flight"
    );
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echoed = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(format!("hello {i}")));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.unwrap();
    drop(ws);
    let ingress = proxy.ingress.clone();
    eventually("the tunnel to close", || ingress.in_flight(backend) == 0).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn server_sent_events_are_not_buffered() {
    let (events_tx, events_rx) = mpsc::channel::<Bytes>(4);
    let events_rx = Arc::new(tokio::sync::Mutex::new(Some(events_rx)));
    // The test plays the backend's event source: the second event is sent
    // only after the client got the first.
    let backend = {
        serve_backend(move |_req: Request<Incoming>| {
            let events_rx = events_rx.clone();
            async move {
                let rx = events_rx.lock().await.take().expect("one stream");
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap()
            }
        })
        .await
    };
    let proxy = proxy().await;
    proxy.routes(vec![route("events.example.test", "/", &[backend])]);

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(get_request("events.example.test", "/events"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();

    // The backend sends one event and keeps the stream open: the client
    // must get it now, not when the stream ends.
    events_tx
        .send(Bytes::from_static(b"data: one\n\n"))
        .await
        .unwrap();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("the first event arrives while the stream is open")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: one\n\n")
    );
    assert_eq!(proxy.ingress.in_flight(backend), 1);

    events_tx
        .send(Bytes::from_static(b"data: two\n\n"))
        .await
        .unwrap();
    drop(events_tx);
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, Bytes::from_static(b"data: two\n\n"));
    let ingress = proxy.ingress.clone();
    eventually("the stream to end", || ingress.in_flight(backend) == 0).await;
    proxy.shutdown().await;
}

// === headers ===

#[tokio::test]
async fn forwarded_headers_are_set_and_hop_by_hop_headers_stripped() {
    let backend = serve_backend(|req: Request<Incoming>| async move {
        let mut seen = String::from("headers\nGET /\n");
        for (header, value) in req.headers() {
            seen.push_str(&format!("{header}: {}\n", value.to_str().unwrap()));
        }
        Response::builder()
            .header("connection", "x-hop")
            .header("x-hop", "for the proxy only")
            .header("keep-alive", "timeout=99")
            .header("proxy-authenticate", "Basic")
            .header("x-end", "for the client")
            .body(text(seen))
            .unwrap()
    })
    .await;
    let proxy = proxy().await;
    proxy.routes(vec![route("hdr.example.test", "/", &[backend])]);

    let answer = raw(
        proxy.addr,
        "GET /h HTTP/1.1\r\n\
         Host: hdr.example.test:8080\r\n\
         X-Forwarded-For: 203.0.113.9\r\n\
         X-Forwarded-Proto: gopher\r\n\
         Connection: close, X-Secret\r\n\
         X-Secret: not for the backend\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic eA==\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Upgrade: h2c\r\n\
         X-Kept: yes\r\n\r\n",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{answer}");
    let reply = Reply {
        status: StatusCode::OK,
        headers: Default::default(),
        body: body.to_owned(),
    };
    assert_eq!(reply.seen("host").as_deref(), Some("hdr.example.test:8080"));
    assert_eq!(
        reply.seen("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(reply.seen("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        reply.seen("x-forwarded-host").as_deref(),
        Some("hdr.example.test:8080")
    );
    assert_eq!(reply.seen("x-kept").as_deref(), Some("yes"));
    for stripped in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
        "connection",
    ] {
        assert_eq!(
            reply.seen(stripped),
            None,
            "{stripped} reached the backend: {body}"
        );
    }
    // And on the way back.
    assert!(head.contains("\r\nx-end: for the client"), "{head}");
    for stripped in ["x-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            !head.contains(&format!("\r\n{stripped}:")),
            "{stripped} reached the client: {head}"
        );
    }
    proxy.shutdown().await;
}

// === routes and draining ===

#[tokio::test]
async fn set_routes_refuses_duplicates_and_invalid_routes() {
    let proxy = proxy().await;
    let addr = dead_addr();
    let good = vec![
        route("web.example.test", "/", &[addr]),
        route("web.example.test", "/api", &[addr]),
    ];
    proxy.routes(good.clone());

    let duplicate = proxy
        .ingress
        .set_routes(vec![
            route("web.example.test", "/api", &[addr]),
            route("other.example.test", "/", &[addr]),
            route("web.example.test", "/api/", &[addr]),
        ])
        .unwrap_err();
    assert!(
        matches!(
            &duplicate,
            RouteError::Duplicate {
                first: 0,
                second: 2,
                ..
            }
        ),
        "{duplicate:?}"
    );
    let message = duplicate.to_string();
    assert!(
        message.contains("web.example.test") && message.contains("/api"),
        "{message}"
    );

    for (host, why) in [
        ("Web.example.test", "upper-case"),
        ("web.example.test.", "ends with a dot"),
        ("web_1.example.test", "'_'"),
        ("", "empty"),
        ("a..b", "empty label"),
    ] {
        let err = proxy
            .ingress
            .set_routes(vec![route(host, "/", &[addr])])
            .unwrap_err();
        assert!(
            matches!(err, RouteError::InvalidHost { index: 0, .. }),
            "{host:?}: {err:?}"
        );
        assert!(err.to_string().contains(why), "{host:?}: {err}");
    }
    let err = proxy
        .ingress
        .set_routes(vec![route("web.example.test", "api", &[addr])])
        .unwrap_err();
    assert!(matches!(err, RouteError::InvalidPath { .. }), "{err:?}");
    assert!(err.to_string().contains("does not start with '/'"), "{err}");

    // Nothing changed.
    assert_eq!(&*proxy.ingress.routes(), &good[..]);
    proxy.ingress.set_routes(Vec::new()).unwrap();
    assert!(proxy.ingress.routes().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn drain_waits_for_open_requests() {
    let release = Arc::new(Notify::new());
    let backend = {
        let release = release.clone();
        serve_backend(move |req: Request<Incoming>| {
            let release = release.clone();
            async move {
                if req.uri().path() == "/slow" {
                    release.notified().await;
                }
                Response::new(text("done"))
            }
        })
        .await
    };
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/", &[backend])]);
    let ingress = proxy.ingress.clone();
    assert_eq!(ingress.in_flight(backend), 0);
    assert!(
        ingress.drain(&[backend], Duration::from_millis(10)).await,
        "nothing open drains at once"
    );

    let addr = proxy.addr;
    let slow = tokio::spawn(async move { get(addr, "web.example.test", "/slow").await });
    eventually("the slow request to reach the backend", || {
        ingress.in_flight(backend) == 1
    })
    .await;
    // Other requests come and go meanwhile.
    assert_eq!(get(addr, "web.example.test", "/fast").await.body, "done");
    assert_eq!(ingress.in_flight(backend), 1);

    let started = tokio::time::Instant::now();
    assert!(
        !ingress
            .drain(&[backend, dead_addr()], Duration::from_millis(200))
            .await
    );
    assert!(started.elapsed() >= Duration::from_millis(200));

    // Released while a drain waits: the drain ends when the request does.
    let waiting = {
        let ingress = ingress.clone();
        tokio::spawn(async move { ingress.drain(&[backend], PATIENCE).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.notify_one();
    assert!(waiting.await.unwrap());
    assert_eq!(slow.await.unwrap().body, "done");
    assert_eq!(ingress.in_flight(backend), 0);

    // An endpoint dropped from the routes keeps its count until its
    // requests end.
    let slow = tokio::spawn(async move { get(addr, "web.example.test", "/slow").await });
    eventually("the second slow request", || {
        ingress.in_flight(backend) == 1
    })
    .await;
    ingress.set_routes(Vec::new()).unwrap();
    assert_eq!(ingress.in_flight(backend), 1);
    release.notify_one();
    assert!(ingress.drain(&[backend], PATIENCE).await);
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn keep_alive_connections_to_backends_are_reused() {
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    {
        let connections = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(text("pooled")))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/", &[backend])]);
    for _ in 0..20 {
        assert_eq!(
            get(proxy.addr, "web.example.test", "/").await.body,
            "pooled"
        );
    }
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one backend connection for 20 sequential requests"
    );
    proxy.shutdown().await;
}

/// Reads one request head (no body) from `stream`; false at end of stream.
async fn read_head(stream: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn a_bodiless_get_is_sent_again_when_a_pooled_connection_closes_under_it() {
    // Answers the first request of each connection, then reads the next
    // one and closes without answering — what a backend whose keep-alive
    // timeout fires just as a request arrives looks like.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let connections = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    if read_head(&mut stream).await {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
                            .await;
                    }
                    read_head(&mut stream).await;
                });
            }
        });
    }
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/", &[backend])]);
    for i in 0..3 {
        let reply = get(proxy.addr, "web.example.test", "/").await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {reply:?}");
        assert_eq!(reply.body, "first");
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 3);

    // A request with a body was streamed into the closed connection and is
    // not sent twice.
    let request = Request::post("/")
        .header("host", "web.example.test")
        .body(text("payload"))
        .unwrap();
    let reply = send(proxy.addr, request).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_eq!(reply.code(), Some("backend-failed"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_returns_while_idle_clients_are_connected() {
    let backend = echo("a").await;
    let proxy = proxy().await;
    proxy.routes(vec![route("web.example.test", "/", &[backend.addr])]);
    // A keep-alive client that stays connected after its request.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let reply = collect(
        sender
            .send_request(get_request("web.example.test", "/"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let started = tokio::time::Instant::now();
    proxy.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}
