//! Long-poll without sticky sessions (PROTOCOL §10): in cluster mode a session's id starts
//! with the id of the server holding it (`<node>~<secret>`), and a request for a session
//! held elsewhere is passed to that server and its answer passed back. A session whose
//! server is gone (no longer advertised, or refusing connections) answers 410, as an
//! expired one: the client opens a new session and subscribes again. A server that takes
//! the request and then does not answer in time is 504 (the session may well live on), a
//! body over the message limit 413, and a request already passed on once is never passed
//! on again (410 if its session is not here): a wrong `--advertise-url` cannot loop.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::longpoll::{gone, session_holder, LongPollSessions};
use crate::app::App;

/// The headers passed on: what the session's server checks (token, origin) and reads.
const PASSED_ON: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::ORIGIN,
    header::HOST,
];

/// How much longer than the poll timeout a passed-on GET may take.
const MARGIN: Duration = Duration::from_secs(5);

/// Marks a request passed on from another server.
const FOLLOWED: HeaderName = HeaderName::from_static("x-ticket-api-followed");

/// Middleware of `/lp/{session}`: requests for sessions held here, or unknown to the
/// cluster, go on to the handlers; others go to the server holding them.
pub async fn follow_session(
    State(app): State<Arc<App>>,
    Extension(sessions): Extension<Arc<LongPollSessions>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(cluster) = &app.cluster else {
        return next.run(request).await;
    };
    let id = request
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let node = match session_holder(&id) {
        Some(node) if node != cluster.directory.node() && !sessions.holds(&id) => node,
        _ => return next.run(request).await,
    };
    if request.headers().contains_key(&FOLLOWED) {
        return gone();
    }
    let Ok(Some(address)) = cluster.directory.address(node).await else {
        return gone();
    };
    pass_on(&app, request, &address).await
}

/// Sends the request to the server at `address` and passes its answer back.
async fn pass_on(app: &App, request: Request, address: &str) -> Response {
    let (parts, body) = request.into_parts();
    let max = app.settings.max_message_bytes as usize;
    let Ok(body) = axum::body::to_bytes(body, max).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let client = follower_client();
    let mut outgoing = client
        .request(parts.method.clone(), format!("{address}{path}"))
        .timeout(app.settings.poll_timeout + MARGIN)
        .header(FOLLOWED, "1")
        .body(body);
    for name in PASSED_ON {
        if let Some(value) = parts.headers.get(&name) {
            outgoing = outgoing.header(name, value.clone());
        }
    }
    let answer = match outgoing.send().await {
        Ok(answer) => answer,
        Err(error) if error.is_connect() => {
            tracing::info!(%error, "long-poll session's server is gone: session gone");
            return gone();
        }
        Err(error) => {
            tracing::warn!(%error, "long-poll session's server did not answer in time");
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let Ok(bytes) = answer.bytes().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut response = (status, Body::from(bytes)).into_response();
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    response
}

/// One client for every passed-on request, so connections to the other servers are reused.
fn follower_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .build()
            .expect("an HTTP client without TLS builds")
    })
}
