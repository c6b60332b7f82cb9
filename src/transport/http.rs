//! `POST /rpc` (one-shot JSON-RPC), `GET /health`, `GET /metrics`, `GET /` (the web client) and
//! `GET /client.js` (the JavaScript client library the page is built on).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

use super::{authenticate, Bearer};
use crate::app::App;
use crate::rpc::dispatch::handle_detached;
use crate::rpc::{Ctx, Session, Transport};

/// How long `/health` waits for the database before it counts as down.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The bundled web client.
const INDEX_HTML: &str = include_str!("../../web/index.html");
/// The JavaScript client library (an ES module), documented in `protocol/client.md`.
const CLIENT_JS: &str = include_str!("../../web/client.js");

/// One message in, its response out: 200 with JSON, or 204 when nothing is owed. A body
/// over the size limit never gets here: the body limit layer answers 413.
pub async fn rpc(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let services = Arc::clone(&app.services);
    let bearer = authenticate(&app, &headers, None).await;
    one_shot(&app, services, bearer, peer, &body).await
}

/// The methods one cluster server forwards to another; nothing else runs on
/// `/cluster/rpc`.
const FORWARDED_METHODS: [&str; 3] = ["tickets.reserve", "reservations.cancel", "payments.create"];

/// `POST /cluster/rpc`: a call another server of the cluster forwarded, on behalf of the
/// user its token (a forwarded call's, see [`crate::auth::token::FORWARD_AUDIENCE`])
/// names, for an event it believes this server owns. One call, of a forwarded method, with
/// such a token, else 401 or 404 without running anything. It runs on this server's engine
/// only: if the event is not owned here (any more), it answers `UNAVAILABLE` with
/// `data.not_owner: true` rather than forward again.
pub async fn cluster_rpc(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bearer = super::authenticate_forwarded(&app, &headers);
    if !matches!(bearer, Bearer::Valid(_)) {
        return (
            StatusCode::UNAUTHORIZED,
            "a forwarded call's token is needed",
        )
            .into_response();
    }
    #[derive(serde::Deserialize)]
    struct Call {
        method: String,
    }
    let forwarded = serde_json::from_slice::<Call>(&body)
        .is_ok_and(|call| FORWARDED_METHODS.contains(&call.method.as_str()));
    if !forwarded {
        return (StatusCode::NOT_FOUND, "not a forwarded call").into_response();
    }
    let services = Arc::clone(&app.owner_services);
    one_shot(&app, services, bearer, peer, &body).await
}

async fn one_shot(
    app: &Arc<App>,
    services: Arc<crate::rpc::Services>,
    bearer: Bearer,
    peer: SocketAddr,
    body: &[u8],
) -> Response {
    let session = Arc::new(Session::new(Transport::Http, None));
    session.set_address(Arc::clone(&app.auth_limiter), peer.ip());
    match bearer {
        Bearer::Absent => {}
        Bearer::Valid(principal) => session.bind(principal),
        Bearer::Refused(why) => session.refuse(why),
        // Calls needing a user answer UNAVAILABLE; public calls proceed.
        Bearer::Unverifiable => session.refuse_unverifiable(),
    }
    let Some(text) = super::utf8_or_parse_error(body) else {
        return super::parse_error_response();
    };
    let ctx = Ctx::new(services, session);
    match handle_detached(ctx, text, None).await {
        Some(response) => ([(header::CONTENT_TYPE, "application/json")], response).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// 200 when storage answers, 503 naming the failing part otherwise. A database known to be
/// down is reported at once, without waiting for a connection.
pub async fn health(State(app): State<Arc<App>>) -> Response {
    let storage_health = &app.storage_health;
    let storage = !storage_health.is_down()
        && matches!(
            tokio::time::timeout(PING_TIMEOUT, app.store.ping()).await,
            Ok(Ok(()))
        );
    if !storage {
        // The writer probes from now on, and clears it when the database answers.
        storage_health.mark_down();
    }
    let expiry = app.engine.expiry().healthy();
    // A cluster server takes part while its leases and addresses reach Redis.
    let cluster = app.cluster.as_ref().map(|c| c.directory.healthy());
    let healthy = storage && expiry && cluster != Some(false);
    let status = if healthy { "ok" } else { "degraded" };
    let part = |ok: bool| if ok { "ok" } else { "down" };
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": status,
        "storage": part(storage),
        "expiry": part(expiry),
        "node": app.settings.node_id,
    });
    if let Some(cluster) = cluster {
        body["cluster"] = part(cluster).into();
    }
    (code, axum::Json(body)).into_response()
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

pub async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

pub async fn client_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_JS,
    )
        .into_response()
}
