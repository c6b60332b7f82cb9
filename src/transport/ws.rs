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

use super::{authenticate, Bearer};
use crate::app::App;
use crate::fanout::Outbox;
use crate::rpc::session::Push;
use crate::rpc::{Ctx, Principal, Session, Transport};

/// Close codes of PROTOCOL §2.
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}

const PING_EVERY: Duration = Duration::from_secs(25);
/// Answers waiting for the writer; a reader that finds it full waits, which stops it from
/// reading more calls from a client that does not read its answers.
const RESPONSE_CAPACITY: usize = 64;
/// Notifications (after merging pool updates) waiting for the writer; over it the
/// connection is closed with 1008.
const NOTIFICATION_CAPACITY: usize = 1_024;
/// How long a closing connection may take to accept its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
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
    let principal = match authenticate(&app, &headers, query.token.as_deref()).await {
        Bearer::Absent => None,
        Bearer::Valid(principal) => Some(principal),
        Bearer::Refused(why) => {
            tracing::info!(%peer, reason = ?why, "upgrade refused: bad token");
            return (StatusCode::UNAUTHORIZED, "invalid or expired token").into_response();
        }
        Bearer::Unverifiable => {
            return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response()
        }
    };
    let max = app.settings.max_message_bytes as usize;
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
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
    let outbox = Outbox::new(NOTIFICATION_CAPACITY);
    let push = Push::new(Arc::clone(&app.fanout), Arc::clone(&outbox));
    let session = Arc::new(Session::with_push(
        Transport::WebSocket,
        Some((app.settings.rate_limit, app.settings.rate_burst)),
        Some(push),
    ));
    session.set_address(Arc::clone(&app.auth_limiter), peer.ip());
    if let Some(principal) = principal {
        session.bind(principal);
    }
    let id = session.id;
    tracing::info!(session = id, %peer, "websocket open");
    app.metrics.connection_opened("ws");
    let (sink, stream) = socket.split();
    let (responses, queue) = mpsc::channel(RESPONSE_CAPACITY);
    let missed = Arc::new(AtomicU32::new(0));
    let writer_done = CancellationToken::new();
    let writer = tokio::spawn({
        let writer = Writer {
            sink,
            responses: queue,
            outbox,
            missed: Arc::clone(&missed),
            write_timeout: app.settings.write_timeout,
        };
        let done = writer_done.clone();
        async move {
            let (code, reason) = writer.run().await;
            done.cancel();
            (code, reason)
        }
    });
    let ctx = Ctx::new(Arc::clone(&app.services), session);
    let why = read_loop(&app, &ctx, stream, &responses, &missed, &writer_done).await;
    let _ = responses.send(Outgoing::Close(why.0, why.1)).await;
    drop(responses);
    let (code, reason) = writer.await.unwrap_or((why.0, why.1));
    app.metrics.connection_closed("ws");
    app.metrics.websocket_closed(code, reason);
    tracing::info!(session = id, %peer, code, reason, "websocket closed");
}

/// Reads and runs calls until the peer leaves, breaks the rules or the server stops.
/// Returns the close code and reason to send.
async fn read_loop(
    app: &App,
    ctx: &Ctx,
    mut stream: SplitStream<WebSocket>,
    responses: &mpsc::Sender<Outgoing>,
    missed: &AtomicU32,
    writer_done: &CancellationToken,
) -> (u16, &'static str) {
    let max = app.settings.max_message_bytes as usize;
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            () = app.shutdown.cancelled() => return (close::GOING_AWAY, "server shutting down"),
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
            Some(Err(error)) => {
                let (code, reason) = close_for(error);
                // A text frame that is not UTF-8 is not JSON: answered -32700 like any
                // other (PROTOCOL §1). The WebSocket library cannot read on after it, so
                // the connection then closes with 1007.
                if code == close::INVALID_PAYLOAD {
                    let _ = responses
                        .send(Outgoing::Text(super::parse_error_text()))
                        .await;
                }
                return (code, reason);
            }
        };
        if text.len() > max {
            return (close::MESSAGE_TOO_BIG, "message too big");
        }
        if let Some(response) = ctx.handle_message(text.as_str()).await {
            if responses.send(Outgoing::Text(response)).await.is_err() {
                return (1000, "writer gone");
            }
        }
    }
}

/// A read error: too big a message gets 1009, a text frame that is not UTF-8 1007,
/// anything else is a protocol error.
fn close_for(error: axum::Error) -> (u16, &'static str) {
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) if matches!(*e, tungstenite::Error::Capacity(_)) => {
            (close::MESSAGE_TOO_BIG, "message too big")
        }
        Ok(e) if matches!(*e, tungstenite::Error::Utf8(_)) => {
            (close::INVALID_PAYLOAD, "text frame is not UTF-8")
        }
        _ => (close::PROTOCOL_ERROR, "protocol error"),
    }
}

/// The writing half of a connection: answers, notifications and pings.
struct Writer {
    sink: SplitSink<WebSocket, Message>,
    responses: mpsc::Receiver<Outgoing>,
    outbox: Arc<Outbox>,
    /// Pings sent since the peer last sent anything (reset by the reader).
    missed: Arc<AtomicU32>,
    write_timeout: Duration,
}

/// Why a send did not complete.
enum SendFailed {
    /// The peer stopped reading: the write stalled past the timeout.
    Stalled,
    /// The connection is gone.
    Broken,
}

impl Writer {
    /// Runs until the reader asks for a close, the peer is gone or too slow, or misses two
    /// pings; sends the close frame and returns its code and reason.
    async fn run(mut self) -> (u16, &'static str) {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let outbox = Arc::clone(&self.outbox);
        let ended = loop {
            let sent = tokio::select! {
                // Answers first: the caller is waiting for them.
                biased;
                message = self.responses.recv() => match message {
                    Some(Outgoing::Text(text)) => self.send(Message::Text(text.into())).await,
                    Some(Outgoing::Close(code, reason)) => break (code, reason),
                    None => break (1000, ""),
                },
                () = outbox.wait() => {
                    if outbox.overflowed() {
                        break (close::POLICY_VIOLATION, "too many undelivered notifications");
                    }
                    self.send_notifications().await
                }
                _ = ping.tick() => {
                    if self.missed.fetch_add(1, Ordering::Relaxed) >= 2 {
                        break (close::POLICY_VIOLATION, "ping timeout");
                    }
                    self.send(Message::Ping(Default::default())).await
                }
            };
            match sent {
                Ok(()) => {}
                Err(SendFailed::Stalled) => break (close::POLICY_VIOLATION, "client too slow"),
                Err(SendFailed::Broken) => return (1006, "connection lost"),
            }
        };
        let frame = CloseFrame {
            code: ended.0,
            reason: Utf8Bytes::from_static(ended.1),
        };
        // A stalled peer gets a while longer to take the close frame, then is dropped.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            let _ = self.sink.send(Message::Close(Some(frame))).await;
            let _ = self.sink.close().await;
        })
        .await;
        ended
    }

    async fn send_notifications(&mut self) -> Result<(), SendFailed> {
        for text in self.outbox.drain() {
            self.send(Message::Text(text.into())).await?;
        }
        Ok(())
    }

    async fn send(&mut self, message: Message) -> Result<(), SendFailed> {
        match tokio::time::timeout(self.write_timeout, self.sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendFailed::Broken),
            Err(_) => Err(SendFailed::Stalled),
        }
    }
}
