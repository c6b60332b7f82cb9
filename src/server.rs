//! The HTTP listener: routes, binding with a large backlog, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tokio::net::{TcpListener, TcpSocket};

use crate::app::App;
use crate::transport::longpoll::LongPollSessions;
use crate::transport::{http, longpoll, ws};

/// How long shutdown waits for open connections to finish their calls and close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Every route of PROTOCOL §2. The long-poll routes share one session table, made here.
pub fn router(app: Arc<App>) -> Router {
    let max_body = app.settings.max_message_bytes as usize;
    let long_polls = LongPollSessions::start(&app);
    Router::new()
        .route("/", get(http::index))
        .route("/ws", get(ws::upgrade))
        .route("/rpc", post(http::rpc))
        .route("/lp", post(longpoll::open))
        .route(
            "/lp/{session}",
            post(longpoll::call)
                .get(longpoll::poll)
                .delete(longpoll::close),
        )
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
pub async fn run(listener: TcpListener, app: Arc<App>) -> std::io::Result<()> {
    let shutdown = app.shutdown.clone();
    let service = router(Arc::clone(&app)).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
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
