//! The accept loop: one task per client connection (TLS first when
//! configured), HTTP/1.1 and HTTP/2 on the same port, and the shutdown —
//! stop accepting, let open requests and tunnels finish for a grace
//! period, then cut what is left.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Inner;
use crate::proxy::{self, ClientConn};
use crate::tls::Certificates;

/// After `shutdown` resolves, how long open requests and tunnels may go
/// on before they are cut.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A client that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client connection that has not sent a whole request head by then is
/// closed (slow-loris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How often idle backend connections past their time are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

pub(crate) async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    tls: Option<Certificates>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let acceptor = match &tls {
        Some(certificates) => Some(TlsAcceptor::from(Arc::new(certificates.server_config()?))),
        None => None,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);

    // `draining`: connections finish the request they are in and close;
    // `stop`: whatever is left is cut. Dropping `serve`'s future cuts too
    // (the guards cancel both).
    let draining = CancellationToken::new();
    let stop = CancellationToken::new();
    let _cut_on_drop = (draining.clone().drop_guard(), stop.clone().drop_guard());
    let tracker = TaskTracker::new();

    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = sweep.tick() => inner.registry.sweep_idle(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let client = Arc::new(ClientConn {
                        peer,
                        https: acceptor.is_some(),
                        stop: stop.clone(),
                        tracker: tracker.clone(),
                    });
                    tracker.spawn(connection(
                        inner.clone(),
                        builder.clone(),
                        acceptor.clone(),
                        stream,
                        client,
                        draining.clone(),
                    ));
                }
                Err(err) if is_transient(&err) => {
                    // Out of file descriptors or a client that gave up
                    // mid-handshake: keep serving the others.
                    tracing::warn!("accepting a connection on {local} failed ({err}); going on");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => {
                    return Err(io::Error::new(
                        err.kind(),
                        format!("accepting connections on {local}: {err}"),
                    ));
                }
            },
        }
    }
    drop(listener);
    tracker.close();
    draining.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::info!(
            "ingress on {local}: requests still open {} s after shutdown are cut",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    stop.cancel();
    // Told to stop, tasks end at their next poll.
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    Ok(())
}

fn is_transient(err: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) || matches!(err.raw_os_error(), Some(23 | 24 | 105)) // ENFILE, EMFILE, ENOBUFS
}

async fn connection(
    inner: Arc<Inner>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    acceptor: Option<TlsAcceptor>,
    stream: TcpStream,
    client: Arc<ClientConn>,
    draining: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let peer = client.peer;
    match acceptor {
        None => http(inner, &builder, stream, client, draining).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let tls = tokio::select! {
                done = handshake => done,
                () = draining.cancelled() => return,
            };
            match tls {
                Ok(Ok(tls)) => http(inner, &builder, tls, client, draining).await,
                Ok(Err(err)) => tracing::debug!(%peer, "TLS handshake failed: {err}"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn http<I>(
    inner: Arc<Inner>,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    client: Arc<ClientConn>,
    draining: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = client.peer;
    let stop = client.stop.clone();
    let service = service_fn(move |request| {
        let inner = inner.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(proxy::handle(inner, client, request).await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut graceful = false;
    loop {
        tokio::select! {
            done = connection.as_mut() => {
                if let Err(err) = done {
                    tracing::debug!(%peer, "client connection ended: {err}");
                }
                return;
            }
            () = draining.cancelled(), if !graceful => {
                graceful = true;
                connection.as_mut().graceful_shutdown();
            }
            () = stop.cancelled() => return,
        }
    }
}
