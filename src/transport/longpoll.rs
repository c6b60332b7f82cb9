//! The long-poll fallback (PROTOCOL §2): the same JSON-RPC and the same sessions as a
//! WebSocket, for networks that block WebSockets. `POST /lp` opens a session; `POST
//! /lp/{id}` runs calls in it; `GET /lp/{id}?cursor=N` waits for notifications with
//! `seq > N`, acknowledging everything up to `N`; `DELETE /lp/{id}` closes it. A session
//! expires `session_timeout` after its last request, or when its outbox overflows. The
//! session table belongs here: the router holds it ([`LongPollSessions::start`]) and hands it
//! to the handlers as an extension.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use dashmap::DashMap;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{authenticate, Bearer};
use crate::app::App;
use crate::fanout::Outbox;
use crate::rpc::dispatch::handle_detached;
use crate::rpc::session::Push;
use crate::rpc::{Ctx, Session, Transport};

/// Notifications a session may hold unacknowledged; over it the session expires.
const NOTIFICATION_CAPACITY: usize = 1_024;
/// How often idle sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One long-poll session.
struct LongPoll {
    session: Arc<Session>,
    outbox: Arc<Outbox>,
    /// When the last request on it began or ended.
    last_seen: Mutex<Instant>,
    /// Bumped by every GET, so a newer GET can answer an older one at once.
    poll_generation: AtomicU64,
    preempt: Notify,
    /// GETs in progress.
    polls_waiting: AtomicU64,
    /// Calls of one session run one at a time, in order, as on a WebSocket.
    calls: Arc<tokio::sync::Mutex<()>>,
}

impl LongPoll {
    fn touch(&self) {
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_since(&self) -> Instant {
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a GET in progress until the guard drops: a session with a waiting GET is in
    /// use, however long ago it began.
    fn polling(&self) -> PollGuard<'_> {
        self.polls_waiting.fetch_add(1, Ordering::SeqCst);
        PollGuard(self)
    }

    fn is_idle_past(&self, timeout: Duration) -> bool {
        self.polls_waiting.load(Ordering::SeqCst) == 0 && self.idle_since().elapsed() > timeout
    }
}

struct PollGuard<'a>(&'a LongPoll);

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        self.0.polls_waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The open sessions, by their unguessable id.
#[derive(Default)]
pub struct LongPollSessions {
    sessions: DashMap<String, Arc<LongPoll>>,
}

impl LongPollSessions {
    /// A new table, with its sweeper of idle sessions running until the server shuts down.
    pub fn start(app: &Arc<App>) -> Arc<Self> {
        let sessions = Arc::new(Self::default());
        app.tasks.spawn(Self::expire_idle(
            Arc::clone(app),
            Arc::clone(&sessions),
            app.shutdown.clone(),
        ));
        sessions
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn get(&self, id: &str) -> Option<Arc<LongPoll>> {
        self.sessions.get(id).map(|entry| Arc::clone(entry.value()))
    }

    fn remove(&self, app: &App, id: &str, why: &'static str) -> bool {
        match self.sessions.remove(id) {
            Some((_, lp)) => {
                app.metrics.connection_closed("longpoll");
                tracing::info!(session = lp.session.id, why, "long-poll session closed");
                // A waiting GET ends now rather than at its timeout.
                lp.poll_generation.fetch_add(1, Ordering::SeqCst);
                lp.preempt.notify_waiters();
                true
            }
            None => false,
        }
    }

    /// Expires sessions idle past the timeout, until `stop`.
    async fn expire_idle(app: Arc<App>, sessions: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = stop.cancelled() => return,
            }
            let timeout = app.settings.session_timeout;
            let idle: Vec<String> = sessions
                .sessions
                .iter()
                .filter(|entry| {
                    let lp = entry.value();
                    lp.is_idle_past(timeout) || lp.outbox.overflowed()
                })
                .map(|entry| entry.key().clone())
                .collect();
            for id in idle {
                sessions.remove(&app, &id, "idle past the session timeout");
            }
        }
    }
}

fn gone() -> Response {
    (
        StatusCode::GONE,
        axum::Json(json!({"error": "SESSION_EXPIRED"})),
    )
        .into_response()
}

/// `POST /lp`: opens a session, bound to the Bearer token's user if one is given.
pub async fn open(
    State(app): State<Arc<App>>,
    Extension(sessions): Extension<Arc<LongPollSessions>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let principal = match authenticate(&app, &headers, None).await {
        Bearer::Absent => None,
        Bearer::Valid(principal) => Some(principal),
        Bearer::Refused(_) => {
            return (StatusCode::UNAUTHORIZED, "invalid or expired token").into_response()
        }
        Bearer::Unverifiable => {
            return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response()
        }
    };
    if sessions.len() >= app.settings.max_connections as usize {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many sessions").into_response();
    }
    let outbox = Outbox::new(NOTIFICATION_CAPACITY);
    let push = Push::new(Arc::clone(&app.fanout), Arc::clone(&outbox));
    let session = Arc::new(Session::with_push(
        Transport::LongPoll,
        Some((app.settings.rate_limit, app.settings.rate_burst)),
        Some(push),
    ));
    session.set_address(Arc::clone(&app.auth_limiter), peer.ip());
    if let Some(principal) = principal {
        session.bind(principal);
    }
    // 128 random bits: the id is the only credential of the session.
    let id = hex::encode(rand::random::<[u8; 16]>());
    tracing::info!(session = session.id, "long-poll session opened");
    app.metrics.connection_opened("longpoll");
    sessions.sessions.insert(
        id.clone(),
        Arc::new(LongPoll {
            session,
            outbox,
            last_seen: Mutex::new(Instant::now()),
            poll_generation: AtomicU64::new(0),
            preempt: Notify::new(),
            polls_waiting: AtomicU64::new(0),
            calls: Arc::new(tokio::sync::Mutex::new(())),
        }),
    );
    let body = json!({
        "session": id,
        "poll_timeout_ms": app.settings.poll_timeout.as_millis() as u64,
        "session_timeout_ms": app.settings.session_timeout.as_millis() as u64,
    });
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

/// `POST /lp/{session}`: a message or batch, run in the session's context.
pub async fn call(
    State(app): State<Arc<App>>,
    Extension(sessions): Extension<Arc<LongPollSessions>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Some(lp) = sessions.get(&id) else {
        return gone();
    };
    if lp.outbox.overflowed() {
        sessions.remove(&app, &id, "too many undelivered notifications");
        return gone();
    }
    lp.touch();
    let Some(text) = super::utf8_or_parse_error(&body) else {
        return super::parse_error_response();
    };
    let ctx = Ctx::new(Arc::clone(&app.services), Arc::clone(&lp.session));
    let response = handle_detached(ctx, text, Some(Arc::clone(&lp.calls))).await;
    lp.touch();
    match response {
        Some(response) => ([(header::CONTENT_TYPE, "application/json")], response).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct PollQuery {
    #[serde(default)]
    cursor: u64,
}

/// `GET /lp/{session}?cursor=N`: notifications after `N`, waiting up to the poll timeout.
pub async fn poll(
    State(app): State<Arc<App>>,
    Extension(sessions): Extension<Arc<LongPollSessions>>,
    Path(id): Path<String>,
    Query(query): Query<PollQuery>,
) -> Response {
    let Some(lp) = sessions.get(&id) else {
        return gone();
    };
    lp.touch();
    let _polling = lp.polling();
    let generation = lp.poll_generation.fetch_add(1, Ordering::SeqCst) + 1;
    // An older GET of this session answers now with what it has (nothing).
    lp.preempt.notify_waiters();
    // Counted after the generation is taken: a GET counted here is the one a newer GET
    // answers at once.
    let _waiting = app.metrics.get_waiting();
    let deadline = Instant::now() + app.settings.poll_timeout;
    let messages = loop {
        if lp.outbox.overflowed() {
            sessions.remove(&app, &id, "too many undelivered notifications");
            return gone();
        }
        let messages = lp.outbox.poll(query.cursor);
        if !messages.is_empty() {
            break messages;
        }
        let preempted = lp.preempt.notified();
        tokio::pin!(preempted);
        preempted.as_mut().enable();
        if lp.poll_generation.load(Ordering::SeqCst) != generation {
            break Vec::new();
        }
        tokio::select! {
            () = lp.outbox.wait() => {}
            () = &mut preempted => break Vec::new(),
            () = tokio::time::sleep_until(deadline) => break Vec::new(),
            () = app.shutdown.cancelled() => break Vec::new(),
        }
    };
    lp.touch();
    // Closed or expired while this GET waited: say so now rather than at the next poll.
    if messages.is_empty() && sessions.get(&id).is_none() {
        return gone();
    }
    let cursor = messages.last().map_or(query.cursor, |(seq, _)| *seq);
    (
        [(header::CONTENT_TYPE, "application/json")],
        poll_body(cursor, &messages),
    )
        .into_response()
}

/// `{"cursor": M, "messages": [{"seq": S, "message": …}]}`, with each message spliced in as
/// the JSON it already is.
fn poll_body(cursor: u64, messages: &[(u64, String)]) -> String {
    let mut body = format!("{{\"cursor\":{cursor},\"messages\":[");
    for (i, (seq, message)) in messages.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!("{{\"seq\":{seq},\"message\":{message}}}"));
    }
    body.push_str("]}");
    body
}

/// `DELETE /lp/{session}`.
pub async fn close(
    State(app): State<Arc<App>>,
    Extension(sessions): Extension<Arc<LongPollSessions>>,
    Path(id): Path<String>,
) -> Response {
    if sessions.remove(&app, &id, "closed by the client") {
        StatusCode::NO_CONTENT.into_response()
    } else {
        gone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_body_splices_messages_in_as_json() {
        let body = poll_body(7, &[(6, "{\"a\":1}".into()), (7, "{\"b\":2}".into())]);
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            parsed,
            json!({"cursor": 7, "messages": [{"seq": 6, "message": {"a": 1}}, {"seq": 7, "message": {"b": 2}}]})
        );
        assert_eq!(poll_body(3, &[]), "{\"cursor\":3,\"messages\":[]}");
    }
}
