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

/// The server named in a session id (`<node>~<secret>` in cluster mode), if any.
pub(super) fn session_holder(id: &str) -> Option<&str> {
    id.split_once('~').map(|(node, _)| node)
}

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

/// What a GET got.
#[derive(Debug, PartialEq, Eq)]
enum Polled {
    /// Messages after the cursor; empty at the poll timeout, when a newer GET of the
    /// session came, when the session was closed, or at shutdown.
    Messages(Vec<(u64, String)>),
    /// The outbox overflowed: the session must expire.
    Overflowed,
}

impl LongPoll {
    fn new(session: Arc<Session>, outbox: Arc<Outbox>) -> Self {
        Self {
            session,
            outbox,
            last_seen: Mutex::new(Instant::now()),
            poll_generation: AtomicU64::new(0),
            preempt: Notify::new(),
            polls_waiting: AtomicU64::new(0),
            calls: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Waits up to `timeout` for notifications after `cursor`. Counts as a GET in progress
    /// while it waits, and answers any older GET of the session at once. `counted` runs
    /// once this GET has taken its turn (so a GET seen counted is one a newer GET answers
    /// at once); what it returns is held while the GET waits.
    async fn wait<G>(
        &self,
        cursor: u64,
        timeout: Duration,
        shutdown: &CancellationToken,
        counted: impl FnOnce() -> G,
    ) -> Polled {
        self.touch();
        let _polling = self.polling();
        let generation = self.poll_generation.fetch_add(1, Ordering::SeqCst) + 1;
        // An older GET of this session answers now with what it has (nothing).
        self.preempt.notify_waiters();
        let _counted = counted();
        let deadline = Instant::now() + timeout;
        let polled = loop {
            if self.outbox.overflowed() {
                return Polled::Overflowed;
            }
            let messages = self.outbox.poll(cursor);
            if !messages.is_empty() {
                break messages;
            }
            let preempted = self.preempt.notified();
            tokio::pin!(preempted);
            preempted.as_mut().enable();
            if self.poll_generation.load(Ordering::SeqCst) != generation {
                break Vec::new();
            }
            tokio::select! {
                () = self.outbox.wait() => {}
                () = &mut preempted => break Vec::new(),
                () = tokio::time::sleep_until(deadline) => break Vec::new(),
                () = shutdown.cancelled() => break Vec::new(),
            }
        };
        self.touch();
        Polled::Messages(polled)
    }

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

    /// Whether the session is held by this server.
    pub fn holds(&self, id: &str) -> bool {
        self.sessions.contains_key(id)
    }

    fn get(&self, id: &str) -> Option<Arc<LongPoll>> {
        self.sessions.get(id).map(|entry| Arc::clone(entry.value()))
    }

    fn remove(&self, app: &App, id: &str, why: &'static str) -> bool {
        match self.take(id) {
            Some(lp) => {
                app.metrics.connection_closed("longpoll");
                tracing::info!(session = lp.session.id, why, "long-poll session closed");
                true
            }
            None => false,
        }
    }

    /// Takes a session out of the table; a GET waiting on it ends now rather than at its
    /// timeout.
    fn take(&self, id: &str) -> Option<Arc<LongPoll>> {
        let (_, lp) = self.sessions.remove(id)?;
        lp.poll_generation.fetch_add(1, Ordering::SeqCst);
        lp.preempt.notify_waiters();
        Some(lp)
    }

    /// The sessions to expire: idle past `timeout` with no GET waiting, or overflowed.
    fn expired(&self, timeout: Duration) -> Vec<String> {
        self.sessions
            .iter()
            .filter(|entry| {
                let lp = entry.value();
                lp.is_idle_past(timeout) || lp.outbox.overflowed()
            })
            .map(|entry| entry.key().clone())
            .collect()
    }

    /// Expires sessions idle past the timeout, until `stop`.
    async fn expire_idle(app: Arc<App>, sessions: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = stop.cancelled() => return,
            }
            for id in sessions.expired(app.settings.session_timeout) {
                sessions.remove(&app, &id, "idle past the session timeout");
            }
        }
    }
}

pub(super) fn gone() -> Response {
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
    // 128 random bits: the id is the only credential of the session. In cluster mode it
    // also names the server holding it, so any other server can send its requests here.
    let secret = hex::encode(rand::random::<[u8; 16]>());
    let id = match &app.cluster {
        Some(cluster) => format!("{}~{secret}", cluster.directory.node()),
        None => secret,
    };
    tracing::info!(session = session.id, "long-poll session opened");
    app.metrics.connection_opened("longpoll");
    sessions
        .sessions
        .insert(id.clone(), Arc::new(LongPoll::new(session, outbox)));
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
    let polled = lp
        .wait(
            query.cursor,
            app.settings.poll_timeout,
            &app.shutdown,
            || app.metrics.get_waiting(),
        )
        .await;
    let messages = match polled {
        Polled::Messages(messages) => messages,
        Polled::Overflowed => {
            sessions.remove(&app, &id, "too many undelivered notifications");
            return gone();
        }
    };
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
    fn a_cluster_session_id_names_its_server() {
        assert_eq!(session_holder("node-a.1~00ff"), Some("node-a.1"));
        assert_eq!(session_holder("00ff"), None);
    }

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

    /// Long-poll timing on tokio's paused time: the GET timeout and the idle timeout, to
    /// the millisecond, in no real time.
    mod on_tokio_time {
        use super::*;

        const POLL_TIMEOUT: Duration = Duration::from_millis(1_000);
        const SESSION_TIMEOUT: Duration = Duration::from_millis(5_000);
        const MS: Duration = Duration::from_millis(1);

        fn session(capacity: usize) -> Arc<LongPoll> {
            Arc::new(LongPoll::new(
                Arc::new(Session::new(Transport::LongPoll, None)),
                Outbox::new(capacity),
            ))
        }

        fn table(lp: &Arc<LongPoll>) -> LongPollSessions {
            let sessions = LongPollSessions::default();
            sessions.sessions.insert("s".into(), Arc::clone(lp));
            sessions
        }

        fn empty() -> Polled {
            Polled::Messages(Vec::new())
        }

        /// A GET of `lp` in a task of its own, with when it ended.
        fn spawn_get(
            lp: &Arc<LongPoll>,
            cursor: u64,
        ) -> tokio::task::JoinHandle<(Polled, Instant)> {
            let lp = Arc::clone(lp);
            tokio::spawn(async move {
                let polled = lp
                    .wait(cursor, POLL_TIMEOUT, &CancellationToken::new(), || ())
                    .await;
                (polled, Instant::now())
            })
        }

        #[tokio::test(start_paused = true)]
        async fn a_get_with_nothing_to_deliver_is_answered_empty_at_its_poll_timeout() {
            let lp = session(8);
            let started = Instant::now();
            let (polled, ended) = spawn_get(&lp, 0).await.unwrap();
            assert_eq!(polled, empty());
            assert_eq!(ended - started, POLL_TIMEOUT);

            // With a cursor past a delivered message, the same: nothing, at the timeout.
            lp.outbox.push_event("{\"n\":1}".into());
            let (polled, _) = spawn_get(&lp, 0).await.unwrap();
            assert_eq!(polled, Polled::Messages(vec![(1, "{\"n\":1}".into())]));
            let started = Instant::now();
            let (polled, ended) = spawn_get(&lp, 1).await.unwrap();
            assert_eq!(polled, empty());
            assert_eq!(ended - started, POLL_TIMEOUT);
        }

        #[tokio::test(start_paused = true)]
        async fn a_waiting_get_answers_when_a_notification_arrives_not_at_its_timeout() {
            let lp = session(8);
            let started = Instant::now();
            let waiting = spawn_get(&lp, 0);
            tokio::task::yield_now().await; // the GET starts waiting before time moves
            tokio::time::advance(Duration::from_millis(300)).await;
            lp.outbox.push_event("{\"n\":1}".into());
            let (polled, ended) = waiting.await.unwrap();
            assert_eq!(polled, Polled::Messages(vec![(1, "{\"n\":1}".into())]));
            assert_eq!(ended - started, Duration::from_millis(300));
        }

        #[tokio::test(start_paused = true)]
        async fn a_newer_get_answers_the_older_one_at_once_with_nothing() {
            let lp = session(8);
            let older = spawn_get(&lp, 0);
            tokio::task::yield_now().await; // the GET starts waiting before time moves
            tokio::time::advance(Duration::from_millis(100)).await;
            let started = Instant::now();
            let newer = spawn_get(&lp, 0);
            let (polled, ended) = older.await.unwrap();
            assert_eq!((polled, ended), (empty(), started));
            let (polled, ended) = newer.await.unwrap();
            assert_eq!((polled, ended - started), (empty(), POLL_TIMEOUT));
        }

        #[tokio::test(start_paused = true)]
        async fn a_session_expires_after_its_idle_timeout_and_not_while_a_get_waits() {
            let lp = session(8);
            let sessions = table(&lp);
            tokio::time::advance(SESSION_TIMEOUT).await;
            assert!(
                sessions.expired(SESSION_TIMEOUT).is_empty(),
                "idle 5 s: not past"
            );
            tokio::time::advance(MS).await;
            assert_eq!(sessions.expired(SESSION_TIMEOUT), vec!["s".to_owned()]);

            // A GET waiting longer than the idle timeout keeps it in use; idle counts from
            // the GET's end.
            let lp = session(8);
            let sessions = table(&lp);
            let long = Arc::clone(&lp);
            let waiting = tokio::spawn(async move {
                long.wait(0, SESSION_TIMEOUT * 2, &CancellationToken::new(), || ())
                    .await
            });
            // `advance` moves the clock before it yields: let the GET start waiting at 0.
            tokio::task::yield_now().await;
            tokio::time::advance(SESSION_TIMEOUT + MS).await;
            assert!(
                sessions.expired(SESSION_TIMEOUT).is_empty(),
                "a GET is waiting"
            );
            tokio::time::advance(SESSION_TIMEOUT).await;
            assert_eq!(waiting.await.unwrap(), empty());
            tokio::time::advance(SESSION_TIMEOUT).await;
            assert!(sessions.expired(SESSION_TIMEOUT).is_empty());
            tokio::time::advance(MS).await;
            assert_eq!(sessions.expired(SESSION_TIMEOUT), vec!["s".to_owned()]);
        }

        #[tokio::test(start_paused = true)]
        async fn an_expired_session_is_forgotten_and_its_waiting_get_ends_at_once() {
            let lp = session(8);
            let sessions = table(&lp);
            let waiting = spawn_get(&lp, 0);
            tokio::task::yield_now().await; // the GET starts waiting before time moves
            tokio::time::advance(Duration::from_millis(200)).await;
            let taken_at = Instant::now();
            assert!(sessions.take("s").is_some());
            let (polled, ended) = waiting.await.unwrap();
            assert_eq!((polled, ended), (empty(), taken_at));
            // The handlers answer 410 to what is no longer in the table.
            assert!(sessions.get("s").is_none());
            assert!(sessions.take("s").is_none());
        }

        #[tokio::test(start_paused = true)]
        async fn an_overflowed_session_is_expired_by_a_get_and_by_the_sweep() {
            let lp = session(1);
            let sessions = table(&lp);
            lp.outbox.push_event("{}".into());
            assert!(
                sessions.expired(SESSION_TIMEOUT).is_empty(),
                "full is not over"
            );
            lp.outbox.push_event("{}".into());
            assert_eq!(sessions.expired(SESSION_TIMEOUT), vec!["s".to_owned()]);
            let (polled, _) = spawn_get(&lp, 0).await.unwrap();
            assert_eq!(polled, Polled::Overflowed);
        }
    }
}
