//! Live availability and reservation notifications (PROTOCOL §6), over WebSocket.

use std::time::Duration;

use serde_json::{json, Value};

use crate::backend_tests_with;
use crate::harness::{reason, with_app, Backend};

/// `(available, version)` of the first pool entry of a `pool.update` or snapshot.
fn first_pool(params: &Value) -> (u64, u64) {
    let pool = &params["pools"][0];
    (
        pool["available"].as_u64().unwrap(),
        pool["version"].as_u64().unwrap(),
    )
}

backend_tests_with! { |s: &mut ticket_api::config::Settings| s.reservation_ttl = Duration::from_secs(1);
    async fn a_subscriber_sees_the_reserve_and_the_expiry_and_the_owner_hears_of_it(app) {
        let admin = app.quick_admin().await;
        let (event_id, types) = app.create_pools(&admin, &[(10, json!({"kind": "any"}))]).await;
        let mut watcher = app.ws().await;
        let subscribed = watcher.ok("pool.subscribe", json!({"event_id": event_id})).await;
        assert_eq!(subscribed["event_id"], event_id);
        assert_eq!(first_pool(&subscribed), (10, 0));
        assert_eq!(subscribed["pools"][0]["ticket_type_id"], types[0]);

        let (_, token) = app.quick_customer().await;
        let mut buyer = app.ws_as(&token).await;
        let mut buyers_phone = app.ws_as(&token).await;
        let reservation = buyer.ok("tickets.reserve", json!({"items": [{"ticket_type_id": types[0], "quantity": 3}]})).await;

        let update = watcher.notification("pool.update").await;
        assert_eq!(update["params"]["subscription"], subscribed["subscription"]);
        assert_eq!(update["params"]["event_id"], event_id);
        assert_eq!(first_pool(&update["params"]), (7, 1));

        // After the TTL the tickets come back, with a newer version.
        let update = watcher.notification("pool.update").await;
        assert_eq!(first_pool(&update["params"]), (10, 2));
        for connection in [&mut buyer, &mut buyers_phone] {
            let updated = connection.notification("reservation.updated").await;
            assert_eq!(updated["params"]["reservation"]["id"], reservation["id"]);
            assert_eq!(updated["params"]["reservation"]["status"], "expired");
        }
        // Not to the watcher, who is not the owner.
        assert!(watcher.notifications.iter().all(|n| n["method"] != "reservation.updated"));
    }

    async fn the_owner_hears_of_payment_and_cancellation_on_every_connection(app) {
        let admin = app.quick_admin().await;
        let (_, types) = app.create_pools(&admin, &[(10, json!({"kind": "any"}))]).await;
        let (_, token) = app.quick_customer().await;
        let (_, stranger) = app.quick_customer().await;
        let mut buyer = app.ws_as(&token).await;
        let mut other_tab = app.ws_as(&token).await;
        let mut strangers_tab = app.ws_as(&stranger).await;
        let item = json!({"items": [{"ticket_type_id": types[0], "quantity": 1}]});
        let paid = buyer.ok("tickets.reserve", item.clone()).await;
        let cancelled = buyer.ok("tickets.reserve", item).await;
        buyer.ok("payments.create", json!({"reservation_id": paid["id"], "payment_token": "tok_ok"})).await;
        buyer.ok("reservations.cancel", json!({"reservation_id": cancelled["id"]})).await;
        for connection in [&mut buyer, &mut other_tab] {
            let first = connection.notification("reservation.updated").await;
            let second = connection.notification("reservation.updated").await;
            assert_eq!((first["params"]["reservation"]["id"].clone(), first["params"]["reservation"]["status"].clone()), (paid["id"].clone(), json!("paid")));
            assert_eq!((second["params"]["reservation"]["id"].clone(), second["params"]["reservation"]["status"].clone()), (cancelled["id"].clone(), json!("cancelled")));
        }
        strangers_tab.expect_silence(Duration::from_millis(300)).await;
        // A new pending reservation is never announced.
        assert!(buyer.notifications.is_empty() && other_tab.notifications.is_empty());
    }
}

#[tokio::test]
async fn subscriptions_need_a_push_transport_and_a_known_event() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let admin = app.quick_admin().await;
            let (event_id, _) = app
                .create_pools(&admin, &[(5, json!({"kind": "any"}))])
                .await;
            let over_http = app
                .rpc("pool.subscribe", json!({"event_id": event_id}), None)
                .await;
            assert_eq!(reason(&over_http), "TRANSPORT_UNSUPPORTED");
            assert_eq!(over_http["error"]["code"], 4003);
            let over_http = app
                .rpc("pool.unsubscribe", json!({"subscription": "sub-1"}), None)
                .await;
            assert_eq!(reason(&over_http), "TRANSPORT_UNSUPPORTED");
            let mut ws = app.ws().await;
            for unknown in ["01a211e2-7aa6-7695-9737-080466ac3436", "nope"] {
                let response = ws
                    .call("pool.subscribe", json!({"event_id": unknown}))
                    .await;
                assert_eq!(reason(&response), "NOT_FOUND");
            }
            assert_eq!(
                ws.ok("pool.unsubscribe", json!({"subscription": "sub-999999"}))
                    .await,
                json!(true)
            );
        },
    )
    .await;
}

#[tokio::test]
async fn after_unsubscribing_no_update_arrives() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let admin = app.quick_admin().await;
            let (event_id, types) = app
                .create_pools(&admin, &[(5, json!({"kind": "any"}))])
                .await;
            let mut watcher = app.ws().await;
            let subscribed = watcher
                .ok("pool.subscribe", json!({"event_id": event_id}))
                .await;
            assert_eq!(
                watcher
                    .ok(
                        "pool.unsubscribe",
                        json!({"subscription": subscribed["subscription"]})
                    )
                    .await,
                json!(true)
            );
            let (_, token) = app.quick_customer().await;
            app.ok_as(
                &token,
                "tickets.reserve",
                json!({"items": [{"ticket_type_id": types[0], "quantity": 1}]}),
            )
            .await;
            watcher.expect_silence(Duration::from_millis(400)).await;
            assert_eq!(app.app.fanout.subscription_count(), 0);
        },
    )
    .await;
}

#[tokio::test]
async fn a_burst_of_changes_arrives_coalesced_with_the_latest_state() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let admin = app.quick_admin().await;
            let (event_id, types) = app
                .create_pools(
                    &admin,
                    &[(100, json!({"kind": "any"})), (100, json!({"kind": "any"}))],
                )
                .await;
            let mut watcher = app.ws().await;
            watcher
                .ok("pool.subscribe", json!({"event_id": event_id}))
                .await;
            let (_, token) = app.quick_customer().await;
            let mut buyer = app.ws_as(&token).await;
            // 40 reservations sent at once, alternating ticket types.
            for i in 0..40 {
                let request = json!({"jsonrpc": "2.0", "id": i, "method": "tickets.reserve",
                "params": {"items": [{"ticket_type_id": types[i % 2], "quantity": 1}]}});
                buyer.send_text(request.to_string()).await;
            }
            for i in 0..40 {
                let response = buyer.response(&json!(i)).await;
                assert!(response["error"].is_null(), "{response}");
            }
            let mut latest: std::collections::HashMap<String, (u64, u64)> = Default::default();
            let mut updates = 0;
            while latest.values().map(|(_, version)| *version).sum::<u64>() < 40 {
                let update = watcher.notification("pool.update").await;
                updates += 1;
                for pool in update["params"]["pools"].as_array().unwrap() {
                    let state = (
                        pool["available"].as_u64().unwrap(),
                        pool["version"].as_u64().unwrap(),
                    );
                    let known = latest
                        .entry(pool["ticket_type_id"].as_str().unwrap().to_owned())
                        .or_default();
                    assert!(state.1 > known.1, "versions only grow");
                    *known = state;
                }
            }
            assert_eq!(
                latest
                    .values()
                    .copied()
                    .collect::<std::collections::BTreeSet<_>>(),
                [(80, 20)].into()
            );
            assert!(
                updates < 40,
                "{updates} updates for 40 changes: nothing was coalesced"
            );
        },
    )
    .await;
}

/// A client that subscribes and then stops reading: the reservers are not slowed, its
/// updates are merged while it lags, and it is closed with 1008 once its writes stall.
#[tokio::test]
async fn a_subscriber_that_stops_reading_is_closed_without_slowing_anyone() {
    let tweak = |s: &mut ticket_api::config::Settings| {
        s.write_timeout = Duration::from_secs(1);
        s.rate_limit = 100_000;
        s.rate_burst = 100_000;
    };
    with_app(Backend::Sqlite, tweak, |app| async move {
        let admin = app.quick_admin().await;
        let types: Vec<(u32, Value)> = (0..50).map(|_| (1_000_000, json!({"kind": "any"}))).collect();
        let (event_id, ids) = app.create_pools(&admin, &types).await;

        // A tiny receive buffer, so the server's writes stall soon.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(app.addr).await.unwrap();
        let (mut slow, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", app.addr), stream).await.unwrap();
        use futures_util::{SinkExt, StreamExt};
        for i in 0..100 {
            let subscribe = json!({"jsonrpc": "2.0", "id": i, "method": "pool.subscribe", "params": {"event_id": event_id}});
            slow.send(tokio_tungstenite::tungstenite::Message::text(subscribe.to_string())).await.unwrap();
        }

        // Reservers across every ticket type, for a few seconds; nobody reads `slow`.
        let mut reservers = Vec::new();
        for r in 0..4 {
            let (_, token) = app.quick_customer().await;
            let mut ws = app.ws_as(&token).await;
            let ids = ids.clone();
            reservers.push(tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                let started = std::time::Instant::now();
                let mut n = 0;
                while started.elapsed() < Duration::from_secs(4) {
                    let t = std::time::Instant::now();
                    ws.ok("tickets.reserve", json!({"items": [{"ticket_type_id": ids[(n * 4 + r) % ids.len()], "quantity": 1}]})).await;
                    slowest = slowest.max(t.elapsed());
                    n += 1;
                }
                (n, slowest)
            }));
        }
        // While it lags, its updates merge: at most one waiting per subscription.
        let mut largest = 0;
        while reservers.iter().any(|r| !r.is_finished()) {
            largest = largest.max(app.app.fanout.largest_outbox());
            assert!(largest <= 100, "{largest} notifications waiting for 100 subscriptions");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for reserver in reservers {
            let (count, slowest) = reserver.await.unwrap();
            assert!(count > 20, "a reserver made only {count} reservations in 4 s");
            assert!(slowest < Duration::from_secs(1), "a reservation took {slowest:?}");
        }

        // Now read: merged updates, then the close.
        let mut updates = 0;
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(15), slow.next()).await.expect("the server closes the slow client") {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                    if text.contains("pool.update") {
                        updates += 1;
                    }
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            }
        };
        assert_eq!(closed, Some(1008));
        assert!(updates > 0);
    })
    .await;
}
