//! The long-poll routes through the real router: the first byte picks the request, the
//! rest is the session id, cursor or body. Every request gets an HTTP answer of the
//! contract's statuses, never a panic.
#![no_main]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

fuzz_target!(|data: &[u8]| {
    let Some((&op, rest)) = data.split_first() else {
        return;
    };
    let shared = common::shared();
    let router = router(shared);
    let text = String::from_utf8_lossy(rest).into_owned();
    let path_part: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    shared.runtime.block_on(async move {
        // A real session, so calls and polls on it are exercised, not only 410s.
        let opened = router
            .clone()
            .oneshot(request("POST", "/lp", Body::empty()))
            .await
            .unwrap();
        let body = axum::body::to_bytes(opened.into_body(), 1 << 20)
            .await
            .unwrap();
        let opened: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let session = opened["session"].as_str().unwrap().to_owned();
        let target = if op & 0x80 == 0 {
            session.clone()
        } else {
            path_part.clone()
        };
        let call = match op % 4 {
            0 => request("POST", &format!("/lp/{target}"), Body::from(rest.to_vec())),
            1 => request(
                "GET",
                &format!("/lp/{target}?cursor={}", path_part),
                Body::empty(),
            ),
            2 => request("DELETE", &format!("/lp/{target}"), Body::empty()),
            _ => request("POST", "/lp", Body::from(rest.to_vec())),
        };
        let answer = tokio::time::timeout(Duration::from_secs(60), router.clone().oneshot(call))
            .await
            .expect("an answer before the poll timeout ends")
            .unwrap();
        let status = answer.status().as_u16();
        assert!(
            [200, 201, 204, 400, 403, 404, 405, 410, 413, 503].contains(&status),
            "status {status}"
        );
        let _ = router
            .oneshot(request("DELETE", &format!("/lp/{session}"), Body::empty()))
            .await;
    });
});

/// One router for every run: building it starts the session-expiry task, which needs the
/// runtime and must not be started again for each input.
fn router(shared: &'static common::Shared) -> axum::Router {
    static ROUTER: std::sync::OnceLock<axum::Router> = std::sync::OnceLock::new();
    ROUTER
        .get_or_init(|| {
            let _runtime = shared.runtime.enter();
            ticket_api::server::router(std::sync::Arc::clone(&shared.app))
        })
        .clone()
}

fn request(method: &str, uri: &str, body: Body) -> Request<Body> {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "127.0.0.1:4000")
        .header("content-type", "application/json")
        .body(body)
        .unwrap_or_else(|_| Request::new(Body::empty()));
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 4000))));
    request
}
