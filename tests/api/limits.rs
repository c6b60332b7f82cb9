//! Limits and operations: rate limit, connection cap, graceful shutdown, health, metrics.

use std::time::Duration;

use serde_json::json;

use crate::harness::{reason, with_app, Backend, Closed, WsClient};

#[tokio::test]
async fn calls_over_the_rate_limit_are_refused_with_a_retry_hint() {
    let tweak = |s: &mut ticket_api::config::Settings| {
        s.rate_limit = 1;
        s.rate_burst = 5;
    };
    with_app(Backend::Sqlite, tweak, |app| async move {
        let mut ws = app.ws().await;
        for _ in 0..5 {
            ws.ok("events.list", json!({})).await;
        }
        let limited = ws.call("events.list", json!({})).await;
        assert_eq!(reason(&limited), "RATE_LIMITED");
        assert_eq!(limited["error"]["code"], 4001);
        let retry_after = limited["error"]["data"]["retry_after_ms"].as_u64().unwrap();
        assert!((1..=1_000).contains(&retry_after), "{retry_after}");
        // Another connection has its own budget.
        let mut other = app.ws().await;
        other.ok("events.list", json!({})).await;
        tokio::time::sleep(Duration::from_millis(retry_after + 20)).await;
        ws.ok("events.list", json!({})).await;
    })
    .await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_with_503() {
    with_app(
        Backend::Sqlite,
        |s| s.max_connections = 2,
        |app| async move {
            let _a = app.ws().await;
            let mut b = app.ws().await;
            let refused = WsClient::connect(&format!("ws://{}/ws", app.addr))
                .await
                .err()
                .expect("third refused");
            match refused {
                tokio_tungstenite::tungstenite::Error::Http(response) => {
                    assert_eq!(response.status(), 503)
                }
                other => panic!("expected 503, got {other}"),
            }
            b.ok("auth.logout", json!({})).await;
            drop(b);
            // The slot frees once the server has seen the close.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                if WsClient::connect(&format!("ws://{}/ws", app.addr))
                    .await
                    .is_ok()
                {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let mut ws = app.ws().await;
            ws.ok("events.list", json!({})).await;
            app.app.shutdown.cancel();
            assert_eq!(ws.next_text().await, Err(Closed::Code(1001)));
        },
    )
    .await;
}

#[tokio::test]
async fn health_reports_storage_and_expiry() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let response = app.http.get(app.url("/health")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let body: serde_json::Value = response.json().await.unwrap();
            let node = app.app.settings.node_id.clone().expect("a node id");
            assert_eq!(
                body,
                json!({"status": "ok", "storage": "ok", "expiry": "ok", "node": node})
            );
            app.app.close_storage().await;
            let response = app.http.get(app.url("/health")).send().await.unwrap();
            assert_eq!(response.status(), 503);
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["storage"], "down");
        },
    )
    .await;
}

#[tokio::test]
async fn metrics_count_connections_and_calls() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let mut ws = app.ws().await;
            ws.ok("events.list", json!({})).await;
            ws.call("no.such", json!({})).await;
            let response = app.http.get(app.url("/metrics")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            assert!(response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain"));
            let text = response.text().await.unwrap();
            assert!(
                text.contains(r#"ticket_api_open_connections{transport="ws"} 1"#),
                "{text}"
            );
            assert!(
                text.contains(r#"ticket_api_calls_total{method="events.list",outcome="ok"} 1"#),
                "{text}"
            );
            assert!(
                text.contains(
                    r#"ticket_api_calls_total{method="unknown",outcome="METHOD_NOT_FOUND"} 1"#
                ),
                "{text}"
            );
            assert!(
                text.contains("ticket_api_call_duration_seconds_bucket"),
                "{text}"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn the_web_client_is_served_at_the_root() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let response = app.http.get(app.url("/")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            assert!(response.text().await.unwrap().contains("<html"));
        },
    )
    .await;
}
