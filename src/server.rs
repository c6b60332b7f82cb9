//! The HTTP listener: routes, binding with a large backlog, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tower::Service as _;

use crate::app::App;
use crate::transport::admission::{self, Admission};
use crate::transport::longpoll::LongPollSessions;
use crate::transport::{follow, http, longpoll, origin, ws};

/// How long shutdown waits for open connections to finish their calls and close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the listener pauses after a failed accept (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Every route of PROTOCOL §2. The long-poll routes share one session table, made here.
pub fn router(app: Arc<App>) -> Router {
    let max_body = app.settings.max_message_bytes as usize;
    let long_polls = LongPollSessions::start(&app);
    // The routes a page of another site could drive a visitor's session through.
    // A session held by another server of the cluster is followed there.
    let session_calls = Router::new()
        .route(
            "/lp/{session}",
            post(longpoll::call)
                .get(longpoll::poll)
                .delete(longpoll::close),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            follow::follow_session,
        ));
    let sessions = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/lp", post(longpoll::open))
        .merge(session_calls)
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            origin::check,
        ));
    Router::new()
        .route("/", get(http::index))
        .route("/client.js", get(http::client_js))
        .route("/rpc", post(http::rpc))
        .route(crate::cluster::forward::ROUTE, post(http::cluster_rpc))
        .merge(sessions)
        .route("/health", get(http::health))
        .route("/metrics", get(http::metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(Extension(long_polls))
        .with_state(app)
}

/// Binds with a backlog of 4096: the default of 128 overflows when hundreds of clients
/// connect at once and costs each of them a one-second SYN retry.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves until `app.shutdown` is cancelled, then stops accepting, lets calls in flight
/// finish, closes WebSockets with 1001 and waits for their tasks (at most ten seconds).
///
/// Each connection must send a request's headers within `--header-timeout` of opening and
/// of its last response (so unfinished requests and idle keep-alive connections are
/// closed); each client address holds at most `--max-connections-per-address`; and in all
/// no more connections are taken than the open-file limit leaves room for. A connection
/// over a cap is answered 503 and closed at once, so the server never runs out of
/// descriptors.
pub async fn run(listener: TcpListener, app: Arc<App>) -> std::io::Result<()> {
    let router = router(Arc::clone(&app));
    let max_open = admission::file_limit().map_or(usize::MAX, admission::capacity_for_file_limit);
    let admission = Admission::new(app.settings.max_connections_per_address as usize, max_open);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.settings.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut refused_logged = 0usize;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors or a connection reset before it was taken: wait a
                    // moment rather than spin, then go on.
                    tracing::warn!(%error, "accept error");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = app.shutdown.cancelled() => break,
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(why) => {
                // A fresh socket's send buffer is empty: the short answer fits without
                // waiting, and the socket closes when dropped.
                let _ = stream.try_write(admission::REFUSAL);
                refused_logged += 1;
                if refused_logged.is_power_of_two() {
                    tracing::warn!(%peer, reason = ?why, refused = refused_logged, "connection refused with 503");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = {
            let router = router.clone();
            hyper::service::service_fn(move |mut request: axum::extract::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let mut router = router.clone();
                async move { router.call(request).await }
            })
        };
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let header_timeout = app.settings.header_timeout;
        tokio::spawn(async move {
            // The HTTP version is told from the first bytes, and hyper's header timer only
            // starts after them: a client that sends nothing is closed here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(1..)) => {}
                _ => return,
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(connection).await;
            drop(admitted);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still running after the drain timeout");
    }
    app.tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, app.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing anyway");
    }
    app.stop().await;
    tracing::info!("server stopped");
    Ok(())
}
