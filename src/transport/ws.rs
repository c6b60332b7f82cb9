//! `GET /ws`: JSON-RPC over a WebSocket. A reader task runs the calls of one connection in
//! order; a writer task drains the bounded outbox and pings the peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::rpc::methods::auth::verify_token;
use crate::rpc::{Ctx, Principal, RpcError, Session, Transport};

/// Close codes of PROTOCOL §2.
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}

const PING_EVERY: Duration = Duration::from_secs(25);
/// Messages waiting for the writer; a reader that finds it full waits, which stops it from
/// reading more calls from a client that does not read its answers.
const OUTBOX_CAPACITY: usize = 64;
/// Small buffers keep an idle connection cheap (~6 KiB instead of ~134 KiB).
const READ_BUFFER: usize = 4 * 1024;
const WRITE_BUFFER: usize = 4 * 1024;

#[derive(Debug, Deserialize)]
pub struct ConnectQuery {
    token: Option<String>,
}

/// Refuses the upgrade with 503 over the connection cap, 401 for a bad token.
pub async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<ConnectQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Ok(permit) = Arc::clone(&app.connection_permits).try_acquire_owned() else {
        tracing::warn!(%peer, "connection refused: too many open connections");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let token = match super::bearer_token(&headers) {
        Some(Ok(token)) => Some(token.to_owned()),
        Some(Err(())) => return (StatusCode::UNAUTHORIZED, "invalid token").into_response(),
        None => query.token.filter(|t| !t.is_empty()),
    };
    let principal = match token {
        None => None,
        Some(token) => match verify_token(&app, &token).await {
            Ok(principal) => Some(principal),
            Err(RpcError::Unauthenticated(why)) => {
                tracing::info!(%peer, reason = ?why, "upgrade refused: bad token");
                return (StatusCode::UNAUTHORIZED, "invalid or expired token").into_response();
            }
            Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response(),
        },
    };
    let max = app.settings.max_message_bytes as usize;
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + max * 2)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let tasks = app.tasks.clone();
            tasks.track_future(serve(app, socket, peer, principal, permit))
        })
}

/// What the reader asks the writer to send.
enum Outgoing {
    Text(String),
    Close(u16, &'static str),
}

async fn serve(
    app: Arc<App>,
    socket: WebSocket,
    peer: SocketAddr,
    principal: Option<Principal>,
    _permit: OwnedSemaphorePermit,
) {
    let session = Arc::new(Session::new(
        Transport::WebSocket,
        Some((app.settings.rate_limit, app.settings.rate_burst)),
    ));
    if let Some(principal) = principal {
        session.bind(principal);
    }
    let id = session.id;
    tracing::info!(session = id, %peer, "websocket open");
    app.metrics.connection_opened("ws");
    let (sink, stream) = socket.split();
    let (outbox, queue) = mpsc::channel(OUTBOX_CAPACITY);
    let missed = Arc::new(AtomicU32::new(0));
    let writer_done = CancellationToken::new();
    let writer = tokio::spawn({
        let (missed, done) = (Arc::clone(&missed), writer_done.clone());
        async move {
            write_loop(sink, queue, missed).await;
            done.cancel();
        }
    });
    let ctx = Ctx {
        app: Arc::clone(&app),
        session,
    };
    let why = read_loop(&ctx, stream, &outbox, &missed, &writer_done).await;
    let _ = outbox.send(Outgoing::Close(why.0, why.1)).await;
    drop(outbox);
    let _ = writer.await;
    app.metrics.connection_closed("ws");
    tracing::info!(session = id, %peer, code = why.0, reason = why.1, "websocket closed");
}

/// Reads and runs calls until the peer leaves, breaks the rules or the server stops.
/// Returns the close code and reason to send.
async fn read_loop(
    ctx: &Ctx,
    mut stream: SplitStream<WebSocket>,
    outbox: &mpsc::Sender<Outgoing>,
    missed: &AtomicU32,
    writer_done: &CancellationToken,
) -> (u16, &'static str) {
    let max = ctx.app.settings.max_message_bytes as usize;
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            () = ctx.app.shutdown.cancelled() => return (close::GOING_AWAY, "server shutting down"),
            // The writer gave up (dead peer or failed send): nothing more can be answered.
            () = writer_done.cancelled() => return (close::POLICY_VIOLATION, "peer not responding"),
        };
        missed.store(0, Ordering::Relaxed);
        let text = match frame {
            None | Some(Ok(Message::Close(_))) => return (1000, "bye"),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                return (close::UNSUPPORTED_DATA, "binary frames are not supported")
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Err(error)) => return close_for(error),
        };
        if text.len() > max {
            return (close::MESSAGE_TOO_BIG, "message too big");
        }
        if let Some(response) = ctx.app.dispatcher.handle_message(ctx, text.as_str()).await {
            if outbox.send(Outgoing::Text(response)).await.is_err() {
                return (1000, "writer gone");
            }
        }
    }
}

/// A read error: too big a message gets 1009, anything else is a protocol error.
fn close_for(error: axum::Error) -> (u16, &'static str) {
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) if matches!(*e, tungstenite::Error::Capacity(_)) => {
            (close::MESSAGE_TOO_BIG, "message too big")
        }
        _ => (close::PROTOCOL_ERROR, "protocol error"),
    }
}

/// Sends what the reader queues, pings every 25 s, and gives up on a peer that has left
/// two pings unanswered (`missed` is reset by the reader whenever anything arrives).
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outgoing>,
    missed: Arc<AtomicU32>,
) {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let (code, reason) = loop {
        tokio::select! {
            message = queue.recv() => match message {
                Some(Outgoing::Text(text)) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Some(Outgoing::Close(code, reason)) => break (code, reason),
                None => break (1000, ""),
            },
            _ = ping.tick() => {
                if missed.fetch_add(1, Ordering::Relaxed) >= 2 {
                    break (close::POLICY_VIOLATION, "ping timeout");
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    };
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = sink.close().await;
}
