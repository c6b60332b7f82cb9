//! Hostile clients (issue: hardening): logins limited per client address, foreign origins
//! refused on `/ws` and `/lp`, unfinished requests closed, connections capped per address,
//! and a WebSocket whose client stops reading closed after the write timeout.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{assert_error, with_app, Backend};

#[tokio::test]
async fn logins_and_registrations_are_limited_per_client_address() {
    with_app(
        Backend::Sqlite,
        |s| {
            s.auth_rate_limit = 1;
            s.auth_rate_burst = 2;
        },
        |app| async move {
            // Sent at once: the budget is checked before the (slow) password hash, so a
            // burst of 2 lets at most two through within the first second.
            let calls = (0..6).map(|i| {
                let params = if i % 2 == 0 {
                    json!({"email": "nobody@example.com", "password": "whatever-it-is"})
                } else {
                    json!({"email": format!("new-{i}@example.com"), "password": "long-enough"})
                };
                app.rpc(if i % 2 == 0 { "auth.login" } else { "auth.register" }, params, None)
            });
            let answers = futures_util::future::join_all(calls).await;
            let limited: Vec<_> = answers
                .iter()
                .filter(|a| a["error"]["data"]["reason"] == "RATE_LIMITED")
                .collect();
            assert!(limited.len() >= 3, "{answers:?}");
            for answer in limited {
                assert_error(answer, 4001, "RATE_LIMITED");
                let wait = answer["error"]["data"]["retry_after_ms"].as_u64().unwrap();
                assert!((1..=1_000).contains(&wait), "{answer}");
            }
            // Other calls are not counted against it.
            let listed = app.rpc("events.list", json!({}), None).await;
            assert!(listed["result"].is_object(), "{listed}");
        },
    )
    .await;
}

async fn upgrade_status(addr: std::net::SocketAddr, origin: Option<&str>) -> u16 {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(error) => panic!("upgrade failed: {error}"),
    }
}

#[tokio::test]
async fn a_foreign_origin_is_refused_on_websocket_and_long_poll_with_403() {
    with_app(
        Backend::Sqlite,
        |s| s.allowed_origins = vec!["https://shop.example".to_owned()],
        |app| async move {
            let own = format!("http://{}", app.addr);
            assert_eq!(upgrade_status(app.addr, None).await, 101);
            assert_eq!(upgrade_status(app.addr, Some(&own)).await, 101);
            assert_eq!(upgrade_status(app.addr, Some("https://shop.example")).await, 101);
            assert_eq!(upgrade_status(app.addr, Some("https://evil.example")).await, 403);

            let open = |origin: Option<&'static str>| {
                let mut request = app.http.post(app.url("/lp"));
                if let Some(origin) = origin {
                    request = request.header("origin", origin);
                }
                request.send()
            };
            assert_eq!(open(None).await.unwrap().status().as_u16(), 201);
            assert_eq!(
                open(Some("https://evil.example")).await.unwrap().status().as_u16(),
                403
            );
            let lp = app.long_poll(None).await;
            let poll = app
                .http
                .get(format!("{}?cursor=0", lp.url()))
                .header("origin", "https://evil.example")
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap();
            assert_eq!(poll.status().as_u16(), 403);
            // /rpc carries its token in a header a foreign page cannot set unasked: open.
            let rpc = app
                .http
                .post(app.url("/rpc"))
                .header("origin", "https://evil.example")
                .header("content-type", "application/json")
                .body(json!({"jsonrpc": "2.0", "id": 1, "method": "events.list"}).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(rpc.status().as_u16(), 200);
        },
    )
    .await;
}
