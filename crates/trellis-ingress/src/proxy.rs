//! One request through the proxy: find the route by host and path, pick an
//! endpoint (sticky cookie, else round-robin, skipping endpoints that
//! refused a connection lately), rewrite the headers, send, and pass the
//! response — or the upgraded connection — back.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Inner;
use crate::body::{ProxyBody, RequestBody, Upstream};
use crate::endpoint::{Endpoint, InFlight};
use crate::pages::{code, page};
use crate::route::{Compiled, Lookup, request_host};

/// The sticky-session cookie's name.
pub const STICKY_COOKIE: &str = "trellis-sticky";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What a request needs to know about the client connection it came on.
pub(crate) struct ClientConn {
    pub(crate) peer: SocketAddr,
    pub(crate) https: bool,
    /// Cancelled when `serve`'s grace period is over: tunnels end then.
    pub(crate) stop: CancellationToken,
    /// Tunnels outlive their request; `serve` waits for them too.
    pub(crate) tracker: TaskTracker,
}

pub(crate) async fn handle(
    inner: Arc<Inner>,
    client: Arc<ClientConn>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let host = match original_host(&req) {
        Ok(host) => host,
        Err(why) => return bad_host(why),
    };
    let Ok(host_text) = host.to_str() else {
        return bad_host("the Host header has characters outside printable ASCII".to_owned());
    };
    let name = match request_host(host_text) {
        Ok(name) => name,
        Err(why) => {
            return bad_host(format!(
                "the host {host_text:?} is not a host name: {}",
                why.0
            ));
        }
    };
    if req.method() == Method::CONNECT {
        return page(
            StatusCode::BAD_REQUEST,
            code::CONNECT,
            format_args!(
                "outpost {} serves apps by host name and is not a forward proxy, so CONNECT is \
                 refused; send the request to the app's URL directly",
                inner.outpost
            ),
        );
    }

    let table = inner.table();
    let route = match table.lookup(&name, req.uri().path()) {
        Lookup::Found(route) => route,
        Lookup::UnknownHost => {
            return page(
                StatusCode::NOT_FOUND,
                code::UNKNOWN_HOST,
                format_args!(
                    "no app on outpost {} answers to host {name}; the hosts served here are \
                     listed by `trellis list component`",
                    inner.outpost
                ),
            );
        }
        Lookup::UnknownPath(routes) => {
            let mut served = String::new();
            for route in routes {
                if !served.is_empty() {
                    served.push_str(", ");
                }
                served.push_str(&route.prefix);
            }
            return page(
                StatusCode::NOT_FOUND,
                code::UNKNOWN_PATH,
                format_args!(
                    "no app on outpost {} answers to path {:?} on host {name}; this host serves \
                     the paths {served} (see `trellis list component`)",
                    inner.outpost,
                    req.uri().path()
                ),
            );
        }
    };
    if route.endpoints.is_empty() {
        return no_replica(route);
    }

    let sticky = route
        .sticky
        .then(|| sticky_choice(req.headers(), route))
        .flatten();
    let client_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    prepare_request(&mut parts, client_upgrade.is_some(), &client, &host);
    let replay = replayable(&parts, &body).then(|| {
        let mut copy = Request::new(());
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.headers_mut() = parts.headers.clone();
        copy
    });
    let request = Request::from_parts(parts, RequestBody::Client(body));

    let start = match sticky {
        Some(index) => index,
        None => route.next.fetch_add(1, Ordering::Relaxed),
    };
    let mut failed = Vec::new();
    let outcome = match try_endpoints(route, start, request, replay.as_ref(), &mut failed).await {
        Tried::Refused(request, last) if inner.generation() != table.generation => {
            // Every endpoint of the table this request started with refused:
            // it raced a release's swap. The new table's endpoints are the
            // ones up now.
            let newer = inner.table();
            match newer.lookup(&name, request.uri().path()) {
                Lookup::Found(route) if !route.endpoints.is_empty() => {
                    let start = route.next.fetch_add(1, Ordering::Relaxed);
                    try_endpoints(route, start, request, replay.as_ref(), &mut failed).await
                }
                _ => Tried::Refused(request, last),
            }
        }
        outcome => outcome,
    };
    let (mut response, sender, in_flight) = match outcome {
        Tried::Answered(response, sender, in_flight) => (response, sender, in_flight),
        Tried::Refused(_, last) => return refused_everywhere(route, failed.len(), last),
        Tried::Broke(err) => return backend_failed(route, &err),
    };

    let endpoint = in_flight.endpoint().clone();
    tracing::debug!(
        host = %name,
        path = %route.prefix,
        endpoint = %endpoint.addr,
        status = response.status().as_u16(),
        "proxied"
    );

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return backend_failed(
                route,
                &"it switched protocols although the request asked for no upgrade",
            );
        };
        let backend_upgrade = hyper::upgrade::on(&mut response);
        spawn_tunnel(&client, in_flight, client_upgrade, backend_upgrade);
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        return Response::from_parts(parts, ProxyBody::Page(None));
    }

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    if route.sticky && sticky.is_none_or(|index| !Arc::ptr_eq(&route.endpoints[index], &endpoint)) {
        let mut cookie = format!(
            "{STICKY_COOKIE}={}; Path={}; HttpOnly; SameSite=Lax",
            endpoint.cookie, route.prefix
        );
        if client.https {
            cookie.push_str("; Secure");
        }
        if let Ok(value) = HeaderValue::try_from(cookie) {
            parts.headers.append(header::SET_COOKIE, value);
        }
    }
    Response::from_parts(
        parts,
        ProxyBody::Upstream(Upstream::new(body, sender, in_flight)),
    )
}

// === choosing and trying endpoints ===

enum Tried {
    Answered(Response<Incoming>, SendRequest<RequestBody>, InFlight),
    /// Every endpoint refused; nothing was sent, so the request comes back.
    Refused(Request<RequestBody>, Option<io::Error>),
    /// An endpoint took the request and then failed it.
    Broke(hyper::Error),
}

/// Tries the route's endpoints from `start` on, each at most once (`failed`
/// lists those that refused, across tables).
async fn try_endpoints(
    route: &Compiled,
    start: usize,
    mut request: Request<RequestBody>,
    replay: Option<&Request<()>>,
    failed: &mut Vec<SocketAddr>,
) -> Tried {
    let mut last = None;
    while let Some(endpoint) = pick(&route.endpoints, start, failed) {
        let in_flight = endpoint.enter();
        match send(endpoint, request, replay).await {
            Sent::Answered(response, sender) => {
                return Tried::Answered(response, sender, in_flight);
            }
            Sent::Broke(err) => return Tried::Broke(err),
            Sent::Refused(back, err) => {
                if endpoint.mark_down() {
                    tracing::warn!(
                        endpoint = %endpoint.addr,
                        "{} does not accept connections at {} ({err}); trying its other \
                         replicas, and this one only after them for a few seconds",
                        route.owner,
                        endpoint.addr
                    );
                }
                failed.push(endpoint.addr);
                last = Some(err);
                request = back;
            }
        }
    }
    Tried::Refused(request, last)
}

/// The next endpoint in rotation from `start` that has not refused this
/// request: one that is up if any, else one marked down (it may be back —
/// better than failing the request).
fn pick<'r>(
    endpoints: &'r [Arc<Endpoint>],
    start: usize,
    failed: &[SocketAddr],
) -> Option<&'r Arc<Endpoint>> {
    let n = endpoints.len();
    let mut fallback = None;
    for i in 0..n {
        let endpoint = &endpoints[(start.wrapping_add(i)) % n];
        if failed.contains(&endpoint.addr) {
            continue;
        }
        if !endpoint.is_down() {
            return Some(endpoint);
        }
        fallback.get_or_insert(endpoint);
    }
    fallback
}

enum Sent {
    Answered(Response<Incoming>, SendRequest<RequestBody>),
    Refused(Request<RequestBody>, io::Error),
    Broke(hyper::Error),
}

/// Sends on an idle connection of the endpoint, else on a new one.
async fn send(
    endpoint: &Endpoint,
    mut request: Request<RequestBody>,
    replay: Option<&Request<()>>,
) -> Sent {
    while let Some(mut sender) = endpoint.take_idle() {
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Sent::Answered(response, sender),
            Err(mut err) => match err.take_message() {
                // The connection closed before anything was written.
                Some(back) => request = back,
                None => {
                    let err = err.into_error();
                    // The backend closed an idle connection just as the
                    // request went out (its keep-alive timeout): a bodiless
                    // idempotent request is safe to send again.
                    match replay {
                        Some(replay) if err.is_incomplete_message() || err.is_canceled() => {
                            request = rebuild(replay);
                        }
                        _ => return Sent::Broke(err),
                    }
                }
            },
        }
    }
    let mut sender = match endpoint.connect().await {
        Ok(sender) => sender,
        Err(err) => return Sent::Refused(request, err),
    };
    match sender.try_send_request(request).await {
        Ok(response) => Sent::Answered(response, sender),
        Err(mut err) => match err.take_message() {
            // Accepted and closed at once, before we wrote: as good as refused.
            Some(back) => Sent::Refused(back, io::Error::other(err.into_error())),
            None => Sent::Broke(err.into_error()),
        },
    }
}

fn rebuild(replay: &Request<()>) -> Request<RequestBody> {
    let mut request = Request::new(RequestBody::Empty);
    *request.method_mut() = replay.method().clone();
    *request.uri_mut() = replay.uri().clone();
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = replay.headers().clone();
    request
}

/// A request that can be sent twice without harm: idempotent and without a
/// body (a body has been streamed away by the first try).
fn replayable(parts: &Parts, body: &Incoming) -> bool {
    use hyper::body::Body as _;
    matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
        && body.is_end_stream()
        && !parts.headers.contains_key(header::UPGRADE)
}

/// The index of the endpoint the client's sticky cookie names, if it is
/// still one of the route's and is up. With nested sticky routes a browser
/// sends several cookies of that name; the one naming an endpoint of this
/// route counts.
fn sticky_choice(headers: &HeaderMap, route: &Compiled) -> Option<usize> {
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            let Some((name, cookie)) = pair.trim().split_once('=') else {
                continue;
            };
            if name != STICKY_COOKIE {
                continue;
            }
            if let Some(index) = route.endpoints.iter().position(|e| *e.cookie == *cookie)
                && !route.endpoints[index].is_down()
            {
                return Some(index);
            }
        }
    }
    None
}

// === headers ===

/// The host the client asked for, as it sent it (forwarded unchanged as
/// `Host`): HTTP/2's `:authority` or an absolute request target, else the
/// `Host` header.
fn original_host(req: &Request<Incoming>) -> Result<HeaderValue, String> {
    if let Some(authority) = req.uri().authority() {
        if authority.as_str().contains('@') {
            return Err(
                "the request's authority has user information, which is not allowed".to_owned(),
            );
        }
        return HeaderValue::from_str(authority.as_str())
            .map_err(|_| "the request's authority is not a valid header value".to_owned());
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => Err("the request names no host: it has no Host header".to_owned()),
        (Some(_), Some(_)) => Err("the request has more than one Host header".to_owned()),
        (Some(host), None) => Ok(host.clone()),
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Rewrites the client's request for the backend: origin-form target,
/// HTTP/1.1, hop-by-hop headers out, the original Host kept and the
/// X-Forwarded-* headers set.
fn prepare_request(parts: &mut Parts, upgrade: bool, client: &ClientConn, host: &HeaderValue) {
    let from_h2 = parts.version == Version::HTTP_2;
    let target = parts.uri.path_and_query().cloned();
    parts.uri = match target {
        Some(target) => Uri::from(target),
        None => Uri::from_static("/"),
    };
    parts.version = Version::HTTP_11;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    // Expect: 100-continue was answered to the client by our server side
    // when the body was first read; it does not go further.
    headers.remove(header::EXPECT);
    if from_h2 {
        join_cookies(headers);
    }

    let ip = client.peer.ip().to_canonical();
    let mut forwarded_for = String::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(earlier) = earlier.to_str() {
            forwarded_for.push_str(earlier.trim());
            forwarded_for.push_str(", ");
        }
    }
    let _ = write!(forwarded_for, "{ip}");
    if let Ok(value) = HeaderValue::try_from(forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if client.https { "https" } else { "http" }),
    );
    headers.insert(X_FORWARDED_HOST, host.clone());
    headers.insert(header::HOST, host.clone());
}

/// HTTP/2 may split cookies over several fields; HTTP/1.1 servers expect
/// one `Cookie` header (RFC 9113, 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Removes the headers that describe one hop (RFC 9110, 7.6.1), including
/// those the `Connection` header names. For an upgrade the `Upgrade` header
/// stays, with `Connection: upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            if token.is_empty() || token.eq_ignore_ascii_case("upgrade") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                && name != header::CONNECTION
            {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if headers
        .keys()
        .any(|name| name.as_str().starts_with("proxy-"))
    {
        let proxy: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

// === upgrades ===

/// Splices the client's and the backend's upgraded connections until either
/// side closes (or `serve` stops). The tunnel counts as in flight to the
/// endpoint, so draining waits for WebSocket sessions too.
fn spawn_tunnel(
    client: &ClientConn,
    in_flight: InFlight,
    client_side: OnUpgrade,
    backend_side: OnUpgrade,
) {
    let stop = client.stop.clone();
    client.tracker.spawn(async move {
        let addr = in_flight.endpoint().addr;
        let tunnel = async {
            let (client_side, backend_side) = match tokio::try_join!(client_side, backend_side) {
                Ok(both) => both,
                Err(err) => {
                    tracing::debug!(endpoint = %addr, "upgrade did not complete: {err}");
                    return;
                }
            };
            let mut client_side = TokioIo::new(client_side);
            let mut backend_side = TokioIo::new(backend_side);
            match tokio::io::copy_bidirectional(&mut client_side, &mut backend_side).await {
                Ok((up, down)) => {
                    tracing::debug!(endpoint = %addr, up, down, "tunnel closed");
                }
                Err(err) => tracing::debug!(endpoint = %addr, "tunnel broke: {err}"),
            }
        };
        tokio::select! {
            () = tunnel => {}
            () = stop.cancelled() => {}
        }
        drop(in_flight);
    });
}

// === error pages ===

fn bad_host(why: String) -> Response<ProxyBody> {
    page(
        StatusCode::BAD_REQUEST,
        code::BAD_HOST,
        format_args!(
            "{why}; the ingress routes by host name, so send the app's host, e.g. \
             `curl -H 'Host: web.dev.shop.example.net' …`"
        ),
    )
}

fn no_replica(route: &Compiled) -> Response<ProxyBody> {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        code::NO_REPLICA,
        format_args!(
            "{} has no replica up right now, so nothing can answer; it answers again once one \
             is up — `trellis status stage` shows why it is not",
            route.owner
        ),
    )
}

fn refused_everywhere(
    route: &Compiled,
    tried: usize,
    last: Option<io::Error>,
) -> Response<ProxyBody> {
    let last = last
        .map(|err| format!(" (last: {err})"))
        .unwrap_or_default();
    page(
        StatusCode::BAD_GATEWAY,
        code::UNREACHABLE,
        format_args!(
            "{} could not be reached: none of its {tried} replica(s) accepted a connection{last}; \
             `trellis logs component` shows whether it is starting or crashing",
            route.owner
        ),
    )
}

fn backend_failed(route: &Compiled, err: &dyn std::fmt::Display) -> Response<ProxyBody> {
    page(
        StatusCode::BAD_GATEWAY,
        code::BACKEND_FAILED,
        format_args!(
            "{} failed the request before answering: {err}; `trellis logs component` shows what \
             it did",
            route.owner
        ),
    )
}
