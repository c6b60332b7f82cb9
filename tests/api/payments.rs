//! Payment (PROTOCOL §5): `payments.create` through the built-in test adapter, access,
//! idempotency and expiry, on both backends.

use serde_json::{json, Value};

use crate::backend_tests;
use crate::harness::{assert_error, assert_reservation_shape, sorted_keys, TestApp};

const UNKNOWN_ID: &str = "01a211e2-7aa6-7695-9737-080466ac3436";

/// A pool of 10 (`any`), a customer and their pending reservation of 3:
/// `(event id, ticket type id, token, reservation)`.
async fn pending_reservation(app: &TestApp) -> (Value, Value, String, Value) {
    let admin = app.quick_admin().await;
    let (event_id, mut tts) = app
        .create_pools(&admin, &[(10, json!({"kind": "any"}))])
        .await;
    let tt = tts.remove(0);
    let (_, token) = app.quick_customer().await;
    let reservation = reserve(app, &token, &tt, 3).await;
    (event_id, tt, token, reservation)
}

async fn reserve(app: &TestApp, token: &str, tt: &Value, quantity: u64) -> Value {
    app.ok_as(
        token,
        "tickets.reserve",
        json!({"items": [{"ticket_type_id": tt, "quantity": quantity}]}),
    )
    .await
}

async fn pay(app: &TestApp, token: &str, reservation_id: &Value, payment_token: &str) -> Value {
    app.rpc(
        "payments.create",
        json!({"reservation_id": reservation_id, "payment_token": payment_token}),
        Some(token),
    )
    .await
}

async fn get(app: &TestApp, token: &str, reservation_id: &Value) -> Value {
    app.ok_as(
        token,
        "reservations.get",
        json!({"reservation_id": reservation_id}),
    )
    .await
}

/// Asserts a successful `payments.create` result for `reservation` and returns it.
#[track_caller]
fn assert_paid(response: &Value, reservation: &Value) -> Value {
    assert!(response["error"].is_null(), "{response}");
    let result = &response["result"];
    let keys = sorted_keys(result);
    assert_eq!(keys, ["payment", "reservation"], "{result}");
    let payment = &result["payment"];
    let keys = sorted_keys(payment);
    assert_eq!(
        keys,
        ["amount", "id", "reservation_id", "status"],
        "{payment}"
    );
    assert!(payment["id"].is_string(), "{payment}");
    assert_ne!(payment["id"], reservation["id"], "a payment has its own id");
    assert_eq!(payment["reservation_id"], reservation["id"]);
    assert_eq!(payment["amount"], reservation["total"]);
    assert_eq!(payment["status"], "succeeded");
    assert_reservation_shape(&result["reservation"]);
    let mut expected = reservation.clone();
    expected["status"] = json!("paid");
    assert_eq!(result["reservation"], expected);
    result.clone()
}

backend_tests! {
    async fn paying_with_tok_ok_marks_the_reservation_paid_for_good(app) {
        let (event_id, _, token, reservation) = pending_reservation(&app).await;
        let before = app.pool(&event_id, 0).await;
        assert_eq!(before.0, 7);
        let response = pay(&app, &token, &reservation["id"], "tok_ok").await;
        let paid = assert_paid(&response, &reservation);
        assert_eq!(app.pool(&event_id, 0).await, before, "paid tickets stay taken");
        assert_eq!(get(&app, &token, &reservation["id"]).await, paid["reservation"]);
        let list = app.ok_as(&token, "reservations.list", json!({"status": "paid"})).await;
        assert_eq!(list, json!({"reservations": [paid["reservation"]]}));

        let again = pay(&app, &token, &reservation["id"], "tok_ok").await;
        assert_error(&again, 2004, "RESERVATION_NOT_PENDING");
        let cancel = app
            .rpc("reservations.cancel", json!({"reservation_id": reservation["id"]}), Some(&token))
            .await;
        assert_error(&cancel, 2004, "RESERVATION_NOT_PENDING");
        assert_eq!(app.pool(&event_id, 0).await, before);
        assert_eq!(get(&app, &token, &reservation["id"]).await, paid["reservation"]);
    }

    async fn a_declined_payment_leaves_the_reservation_pending(app) {
        let (event_id, _, token, reservation) = pending_reservation(&app).await;
        let before = app.pool(&event_id, 0).await;
        let response = pay(&app, &token, &reservation["id"], "tok_declined").await;
        assert_error(&response, 3001, "PAYMENT_DECLINED");
        assert_eq!(get(&app, &token, &reservation["id"]).await, reservation);
        assert_eq!(app.pool(&event_id, 0).await, before);
        let response = pay(&app, &token, &reservation["id"], "tok_ok").await;
        assert_paid(&response, &reservation);
    }

    async fn a_failing_payment_adapter_leaves_the_reservation_pending(app) {
        let (event_id, _, token, reservation) = pending_reservation(&app).await;
        let before = app.pool(&event_id, 0).await;
        let response = pay(&app, &token, &reservation["id"], "tok_error").await;
        assert_error(&response, 3002, "PAYMENT_UNAVAILABLE");
        assert_eq!(get(&app, &token, &reservation["id"]).await, reservation);
        assert_eq!(app.pool(&event_id, 0).await, before);
        let response = pay(&app, &token, &reservation["id"], "tok_ok").await;
        assert_paid(&response, &reservation);
    }

    async fn paying_another_users_reservation_is_not_found(app) {
        let (event_id, _, owner, reservation) = pending_reservation(&app).await;
        let before = app.pool(&event_id, 0).await;
        let (_, other) = app.quick_customer().await;
        let response = pay(&app, &other, &reservation["id"], "tok_ok").await;
        assert_error(&response, 1004, "NOT_FOUND");
        let unknown = pay(&app, &other, &json!(UNKNOWN_ID), "tok_ok").await;
        assert_eq!(response["error"], unknown["error"], "indistinguishable from an unknown id");
        let garbage = pay(&app, &other, &json!("not-an-id"), "tok_ok").await;
        assert_eq!(garbage["error"], unknown["error"]);
        assert_eq!(get(&app, &owner, &reservation["id"]).await, reservation, "still pending");
        assert_eq!(app.pool(&event_id, 0).await, before);
    }

    async fn paying_needs_a_login(app) {
        let (_, _, _, reservation) = pending_reservation(&app).await;
        let response = app
            .rpc("payments.create", json!({"reservation_id": reservation["id"], "payment_token": "tok_ok"}), None)
            .await;
        assert_eq!(response["error"]["code"], 1001, "{response}");
        assert_eq!(
            response["error"]["data"],
            json!({"reason": "UNAUTHENTICATED", "reason_detail": "missing"})
        );
    }

    async fn pay_with_a_used_idempotency_key_replays_the_first_result(app) {
        let (event_id, _, token, reservation) = pending_reservation(&app).await;
        let before = app.pool(&event_id, 0).await;
        let params = json!({"reservation_id": reservation["id"], "payment_token": "tok_ok", "idempotency_key": "pay-once"});
        let first = app.rpc("payments.create", params.clone(), Some(&token)).await;
        let paid = assert_paid(&first, &reservation);
        let second = app.rpc("payments.create", params, Some(&token)).await;
        assert!(second["error"].is_null(), "a retry is not RESERVATION_NOT_PENDING: {second}");
        assert_eq!(second["result"], paid, "the same payment, not a second one");
        assert_eq!(app.pool(&event_id, 0).await, before);
    }

    async fn pay_with_a_used_idempotency_key_and_other_params_conflicts(app) {
        let (_, tt, token, reservation) = pending_reservation(&app).await;
        let other_reservation = reserve(&app, &token, &tt, 1).await;
        let params = json!({"reservation_id": reservation["id"], "payment_token": "tok_ok", "idempotency_key": "pay-key"});
        let first = app.rpc("payments.create", params.clone(), Some(&token)).await;
        let paid = assert_paid(&first, &reservation);

        let other_id = json!({"reservation_id": other_reservation["id"], "payment_token": "tok_ok", "idempotency_key": "pay-key"});
        let response = app.rpc("payments.create", other_id, Some(&token)).await;
        assert_error(&response, 2005, "IDEMPOTENCY_CONFLICT");
        assert_eq!(get(&app, &token, &other_reservation["id"]).await, other_reservation, "not paid");

        let other_token = json!({"reservation_id": reservation["id"], "payment_token": "tok_declined", "idempotency_key": "pay-key"});
        let response = app.rpc("payments.create", other_token, Some(&token)).await;
        assert_error(&response, 2005, "IDEMPOTENCY_CONFLICT");

        assert_eq!(app.rpc("payments.create", params, Some(&token)).await["result"], paid);
        let response = pay(&app, &token, &other_reservation["id"], "tok_ok").await;
        assert_paid(&response, &other_reservation);
    }

    async fn concurrent_pay_retries_with_one_idempotency_key_pay_once(app) {
        let (event_id, _, token, reservation) = pending_reservation(&app).await;
        let before = app.pool(&event_id, 0).await;
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(app.ws_as(&token).await);
        }
        let params = json!({"reservation_id": reservation["id"], "payment_token": "tok_ok", "idempotency_key": "pay-click"});
        let responses = concurrently(clients, "payments.create", &params).await;
        let paid = assert_paid(&responses[0], &reservation);
        for response in &responses {
            assert!(response["error"].is_null(), "{response}");
            assert_eq!(response["result"], paid, "one payment");
        }
        assert_eq!(app.pool(&event_id, 0).await, before);
    }

    async fn concurrent_payments_of_one_reservation_without_a_key_succeed_once(app) {
        let (event_id, _, token, reservation) = pending_reservation(&app).await;
        let before = app.pool(&event_id, 0).await;
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(app.ws_as(&token).await);
        }
        let params = json!({"reservation_id": reservation["id"], "payment_token": "tok_ok"});
        let responses = concurrently(clients, "payments.create", &params).await;
        let (paid, refused): (Vec<&Value>, Vec<&Value>) =
            responses.iter().partition(|r| r["error"].is_null());
        assert_eq!(paid.len(), 1, "{responses:?}");
        assert_paid(paid[0], &reservation);
        for response in refused {
            assert_error(response, 2004, "RESERVATION_NOT_PENDING");
        }
        assert_eq!(app.pool(&event_id, 0).await, before);
    }
}

/// The same call on every client at once; the responses in client order.
async fn concurrently(
    clients: Vec<crate::harness::WsClient>,
    method: &'static str,
    params: &Value,
) -> Vec<Value> {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let params = params.clone();
            tokio::spawn(async move { client.call(method, params).await })
        })
        .collect();
    futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|joined| joined.unwrap())
        .collect()
}

/// With a short reservation TTL.
mod short_ttl {
    use std::time::Duration;

    use serde_json::json;

    use super::{get, pay, reserve};
    use crate::backend_tests_with;
    use crate::harness::{assert_error, millis, poll_until};

    backend_tests_with! {
        // Payment racing expiry to the millisecond is pinned down on paused time in
        // `engine::tests::on_tokio_time`; this is the end-to-end check, on each database.
        |s| s.reservation_ttl = Duration::from_secs(1);

        async fn an_expired_reservation_is_released_and_can_be_neither_paid_nor_cancelled(app) {
            let admin = app.quick_admin().await;
            let (event_id, tts) = app.create_pools(&admin, &[(10, json!({"kind": "any"}))]).await;
            let tt = &tts[0];
            let (_, version) = app.pool(&event_id, 0).await;
            let (_, token) = app.quick_customer().await;
            // Paid at once, this one never expires.
            let kept = reserve(&app, &token, tt, 2).await;
            let response = pay(&app, &token, &kept["id"], "tok_ok").await;
            assert!(response["error"].is_null(), "{response}");
            let doomed = reserve(&app, &token, tt, 3).await;
            assert_eq!(millis(&doomed["expires_at"]) - millis(&doomed["created_at"]), 1_000);
            assert_eq!(app.pool(&event_id, 0).await, (5, version + 2));

            let expired = poll_until(Duration::from_secs(15), "the reservation to expire", || async {
                let got = get(&app, &token, &doomed["id"]).await;
                (got["status"] == "expired").then_some(got)
            })
            .await;
            let mut expected = doomed.clone();
            expected["status"] = json!("expired");
            assert_eq!(expired, expected);
            assert_eq!(app.pool(&event_id, 0).await, (8, version + 3), "the 3 tickets are back");
            let list = app.ok_as(&token, "reservations.list", json!({"status": "expired"})).await;
            assert_eq!(list, json!({"reservations": [expected]}));

            let response = pay(&app, &token, &doomed["id"], "tok_ok").await;
            assert_error(&response, 2003, "RESERVATION_EXPIRED");
            let response = app
                .rpc("reservations.cancel", json!({"reservation_id": doomed["id"]}), Some(&token))
                .await;
            assert_error(&response, 2003, "RESERVATION_EXPIRED");
            assert_eq!(get(&app, &token, &doomed["id"]).await, expected);

            // Past its own expiry time, the paid reservation is still paid and holds its tickets.
            let kept_expiry = millis(&kept["expires_at"]);
            poll_until(Duration::from_secs(15), "the paid reservation's expiry time to pass", || async {
                (app.app.clock.now().as_millis() > kept_expiry + 500).then_some(())
            })
            .await;
            assert_eq!(get(&app, &token, &kept["id"]).await["status"], "paid");
            assert_eq!(app.pool(&event_id, 0).await, (8, version + 3));
        }
    }
}
