//! What a buyer does, over both push transports (PROTOCOL §2, §3, §5, §6, §8): every
//! scenario runs twice with the same assertions, as `ws::name` (WebSocket) and
//! `long_poll::name` (the long-poll fallback), on SQLite; the core journey also on
//! PostgreSQL. Then the long-poll session rules of §2: binding at open, 401, 410, ids,
//! a second GET, idle expiry.

use std::time::Duration;

use serde_json::{json, Value};
use ticket_api::auth::Tokens;
use ticket_api::core::{Role, Timestamp};

use crate::harness::{
    assert_error, assert_invalid_params, assert_reservation_shape, poll_until, status_and_body,
    with_app, Backend, LongPollClient, TestApp, Transport, JWT_SECRET,
};

const UNKNOWN_ID: &str = "01a211e2-7aa6-7695-9737-080466ac3436";

/// The settings adjustment of a scenario, or none.
macro_rules! settings_or_default {
    () => {
        |_: &mut ticket_api::config::Settings| {}
    };
    ($tweak:expr) => {
        $tweak
    };
}

/// Defines each scenario twice, `ws::name` and `long_poll::name`, on SQLite. `$via` is the
/// [`Transport`] the scenario's clients use; an optional `; tweak` adjusts the settings.
macro_rules! over_both_transports {
    ($( $(#[$meta:meta])* async fn $name:ident($app:ident, $via:ident $(; $tweak:expr)?) $body:block )*) => {
        mod ws {
            #[allow(unused_imports)]
            use super::*;
            $( $(#[$meta])* #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                with_app(Backend::Sqlite, settings_or_default!($($tweak)?), |$app| async move {
                    let $via = Transport::WebSocket;
                    $body
                }).await;
            } )*
        }
        mod long_poll {
            #[allow(unused_imports)]
            use super::*;
            $( $(#[$meta])* #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                with_app(Backend::Sqlite, settings_or_default!($($tweak)?), |$app| async move {
                    let $via = Transport::LongPoll;
                    $body
                }).await;
            } )*
        }
    };
}

fn reserve_params(ticket_type_id: &Value, quantity: u64) -> Value {
    json!({"items": [{"ticket_type_id": ticket_type_id, "quantity": quantity}]})
}

/// A `pool.update`'s params for one ticket type.
fn pool_update(
    subscription: &Value,
    event_id: &Value,
    tt: &Value,
    available: u64,
    version: u64,
) -> Value {
    json!({
        "subscription": subscription,
        "event_id": event_id,
        "pools": [{"ticket_type_id": tt, "available": available, "version": version}],
    })
}

/// Asserts a server notification: JSON-RPC 2.0, no id, this method.
#[track_caller]
fn assert_notification(message: &Value, method: &str) {
    assert_eq!(message["jsonrpc"], "2.0", "{message}");
    assert_eq!(message["method"], method, "{message}");
    assert!(
        message.get("id").is_none(),
        "a notification has no id: {message}"
    );
}

/// The reservation with another status.
fn with_status(reservation: &Value, status: &str) -> Value {
    let mut changed = reservation.clone();
    changed["status"] = json!(status);
    changed
}

/// Register → login → events.list → pool.subscribe → tickets.reserve (a `pool.update` with
/// the decrease) → payments.create (a `reservation.updated` paid on both of the buyer's
/// clients). Nothing else arrives.
async fn a_buyer_journey(app: TestApp, via: Transport) {
    let admin = app.quick_admin().await;
    let (event_id, types) = app
        .create_pools(&admin, &[(10, json!({"kind": "any"}))])
        .await;
    let email = format!("journey-{}@example.com", uuid::Uuid::new_v4());
    let credentials = json!({"email": email, "password": "journey-password"});

    // Registering binds the client that registered.
    let mut phone = app.client(via, None).await;
    let registered = phone.ok("auth.register", credentials.clone()).await;
    assert_eq!(registered["user"]["email"], json!(email));
    assert_eq!(registered["user"]["role"], "customer");
    assert!(registered["token"].is_string(), "{registered}");
    assert_eq!(
        phone.ok("reservations.list", json!({})).await,
        json!({"reservations": []})
    );

    // Logging in binds another client.
    let mut laptop = app.client(via, None).await;
    let anonymous = laptop.call("reservations.list", json!({})).await;
    assert_eq!(
        anonymous["error"]["data"],
        json!({"reason": "UNAUTHENTICATED", "reason_detail": "missing"})
    );
    let logged_in = laptop.ok("auth.login", credentials).await;
    assert_eq!(logged_in["user"], registered["user"]);
    assert_eq!(
        laptop.ok("reservations.list", json!({})).await,
        json!({"reservations": []})
    );

    let listed = laptop.ok("events.list", json!({})).await;
    assert_eq!(listed["next_cursor"], Value::Null);
    let events = listed["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{listed}");
    assert_eq!(events[0]["id"], event_id);
    assert_eq!(events[0]["ticket_types"][0]["available"], 10);
    assert_eq!(events[0]["ticket_types"][0]["version"], 0);

    let subscribed = laptop
        .ok("pool.subscribe", json!({"event_id": event_id}))
        .await;
    assert_eq!(subscribed["event_id"], event_id);
    assert_eq!(
        subscribed["pools"],
        json!([{"ticket_type_id": types[0], "available": 10, "version": 0}])
    );
    let subscription = subscribed["subscription"].clone();
    assert!(subscription.is_string(), "{subscribed}");

    let reservation = laptop
        .ok("tickets.reserve", reserve_params(&types[0], 3))
        .await;
    assert_reservation_shape(&reservation);
    assert_eq!(reservation["status"], "pending");
    assert_eq!(
        reservation["total"],
        json!({"amount": 7500, "currency": "EUR"})
    );
    let update = laptop.notification("pool.update").await;
    assert_notification(&update, "pool.update");
    assert_eq!(
        update["params"],
        pool_update(&subscription, &event_id, &types[0], 7, 1)
    );

    let paid = laptop
        .ok(
            "payments.create",
            json!({"reservation_id": reservation["id"], "payment_token": "tok_ok"}),
        )
        .await;
    assert_eq!(paid["payment"]["status"], "succeeded");
    assert_eq!(paid["payment"]["amount"], reservation["total"]);
    assert_eq!(paid["reservation"], with_status(&reservation, "paid"));
    for client in [&mut laptop, &mut phone] {
        let updated = client.notification("reservation.updated").await;
        assert_notification(&updated, "reservation.updated");
        assert_eq!(
            updated["params"],
            json!({"reservation": paid["reservation"]})
        );
    }
    assert_eq!(
        phone.ok("reservations.list", json!({})).await,
        json!({"reservations": [paid["reservation"]]})
    );

    // A payment changes no pool, and the phone subscribed to nothing.
    laptop.expect_silence(Duration::from_millis(300)).await;
    phone.expect_silence(Duration::from_millis(100)).await;
    assert!(laptop.kept_aside().is_empty(), "{:?}", laptop.kept_aside());
    assert!(phone.kept_aside().is_empty(), "{:?}", phone.kept_aside());
    laptop.close().await;
    phone.close().await;
}

over_both_transports! {
    async fn a_buyer_registers_logs_in_reserves_and_pays_and_hears_of_each_change(app, via) {
        a_buyer_journey(app, via).await;
    }

    async fn a_cancelled_reservation_is_announced_to_its_owner_and_its_tickets_return(app, via) {
        let admin = app.quick_admin().await;
        let (event_id, types) = app.create_pools(&admin, &[(10, json!({"kind": "any"}))]).await;
        let (_, token) = app.quick_customer().await;
        let (_, stranger_token) = app.quick_customer().await;
        let mut buyer = app.client(via, Some(&token)).await;
        let mut stranger = app.client(via, Some(&stranger_token)).await;
        let mine = buyer.ok("pool.subscribe", json!({"event_id": event_id})).await;
        let theirs = stranger.ok("pool.subscribe", json!({"event_id": event_id})).await;
        assert_ne!(mine["subscription"], theirs["subscription"]);

        let reservation = buyer.ok("tickets.reserve", reserve_params(&types[0], 2)).await;
        for (client, subscribed) in [(&mut buyer, &mine), (&mut stranger, &theirs)] {
            let update = client.notification("pool.update").await;
            assert_eq!(update["params"], pool_update(&subscribed["subscription"], &event_id, &types[0], 8, 1));
        }
        let cancelled = buyer.ok("reservations.cancel", json!({"reservation_id": reservation["id"]})).await;
        assert_eq!(cancelled, with_status(&reservation, "cancelled"));
        let updated = buyer.notification("reservation.updated").await;
        assert_notification(&updated, "reservation.updated");
        assert_eq!(updated["params"], json!({"reservation": cancelled}));
        for (client, subscribed) in [(&mut buyer, &mine), (&mut stranger, &theirs)] {
            let update = client.notification("pool.update").await;
            assert_eq!(update["params"], pool_update(&subscribed["subscription"], &event_id, &types[0], 10, 2));
        }
        // The stranger hears of the pool, not of someone else's reservation.
        stranger.expect_silence(Duration::from_millis(300)).await;
        assert!(stranger.kept_aside().is_empty(), "{:?}", stranger.kept_aside());
        buyer.expect_silence(Duration::from_millis(100)).await;
        assert!(buyer.kept_aside().is_empty(), "{:?}", buyer.kept_aside());
    }

    async fn an_unpaid_reservation_expires_and_its_owner_and_subscribers_hear_of_it(
        // 1 s: the long-poll client collects the reserve's update before the expiry's, or
        // the two would be merged into one.
        app, via; |s| s.reservation_ttl = Duration::from_secs(1)
    ) {
        let admin = app.quick_admin().await;
        let (event_id, types) = app.create_pools(&admin, &[(10, json!({"kind": "any"}))]).await;
        let (_, token) = app.quick_customer().await;
        let mut buyer = app.client(via, Some(&token)).await;
        let subscribed = buyer.ok("pool.subscribe", json!({"event_id": event_id})).await;
        let subscription = subscribed["subscription"].clone();
        let reservation = buyer.ok("tickets.reserve", reserve_params(&types[0], 4)).await;
        let update = buyer.notification("pool.update").await;
        assert_eq!(update["params"], pool_update(&subscription, &event_id, &types[0], 6, 1));

        let updated = buyer.notification("reservation.updated").await;
        assert_notification(&updated, "reservation.updated");
        let expired = with_status(&reservation, "expired");
        assert_eq!(updated["params"], json!({"reservation": expired}));
        let update = buyer.notification("pool.update").await;
        assert_eq!(update["params"], pool_update(&subscription, &event_id, &types[0], 10, 2));

        let paying = buyer
            .call("payments.create", json!({"reservation_id": reservation["id"], "payment_token": "tok_ok"}))
            .await;
        assert_error(&paying, 2003, "RESERVATION_EXPIRED");
        let cancelling = buyer.call("reservations.cancel", json!({"reservation_id": reservation["id"]})).await;
        assert_error(&cancelling, 2003, "RESERVATION_EXPIRED");
        assert_eq!(buyer.ok("reservations.get", json!({"reservation_id": reservation["id"]})).await, expired);
        buyer.expect_silence(Duration::from_millis(300)).await;
        assert!(buyer.kept_aside().is_empty(), "{:?}", buyer.kept_aside());
    }

    async fn authentication_errors_carry_their_reasons(app, via) {
        let mut anonymous = app.client(via, None).await;
        for (method, params) in [
            ("reservations.list", json!({})),
            ("tickets.reserve", reserve_params(&json!(UNKNOWN_ID), 1)),
            ("payments.create", json!({"reservation_id": UNKNOWN_ID, "payment_token": "tok_ok"})),
        ] {
            let response = anonymous.call(method, params).await;
            assert_eq!(response["error"]["code"], 1001, "{response}");
            assert_eq!(
                response["error"]["data"],
                json!({"reason": "UNAUTHENTICATED", "reason_detail": "missing"}),
                "{method}"
            );
        }
        let response = anonymous.call("auth.authenticate", json!({"token": "not-a-token"})).await;
        assert_eq!(response["error"]["data"], json!({"reason": "UNAUTHENTICATED", "reason_detail": "invalid"}));
        let user = app.create_user("ada@example.com", "analytical", Role::Customer).await;
        let short_lived = Tokens::new(JWT_SECRET.as_bytes(), Duration::from_secs(60));
        let long_ago = Timestamp::from_millis(app.app.clock.now().as_millis() - 3_600_000);
        let (expired, _) = short_lived.issue(user.id, Role::Customer, long_ago);
        let response = anonymous.call("auth.authenticate", json!({"token": expired})).await;
        assert_eq!(response["error"]["data"], json!({"reason": "UNAUTHENTICATED", "reason_detail": "expired"}));

        let wrong_password = anonymous
            .call("auth.login", json!({"email": "ada@example.com", "password": "difference"}))
            .await;
        assert_error(&wrong_password, 1002, "INVALID_CREDENTIALS");
        let unknown_email = anonymous
            .call("auth.login", json!({"email": "nobody@example.com", "password": "difference"}))
            .await;
        assert_eq!(unknown_email["error"], wrong_password["error"], "the same answer for both");

        let taken = anonymous
            .call("auth.register", json!({"email": "ADA@example.com", "password": "another-one"}))
            .await;
        assert_error(&taken, 1005, "EMAIL_TAKEN");
        let short = anonymous
            .call("auth.register", json!({"email": "bob@example.com", "password": "short"}))
            .await;
        assert_invalid_params(&short, "password");
        // None of that bound the client.
        let response = anonymous.call("reservations.list", json!({})).await;
        assert_error(&response, 1001, "UNAUTHENTICATED");
    }

    async fn reservation_errors_carry_their_reasons_and_take_nothing(app, via) {
        let admin = app.quick_admin().await;
        let (event_id, types) = app
            .create_pools(&admin, &[(10, json!({"kind": "any"})), (10, json!({"kind": "multiple", "of": 2}))])
            .await;
        let (_, token) = app.quick_customer().await;
        let (_, stranger_token) = app.quick_customer().await;
        let mut buyer = app.client(via, Some(&token)).await;

        // NOT_FOUND: unknown ids, and someone else's reservation exactly like one.
        let unknown = buyer.call("reservations.get", json!({"reservation_id": UNKNOWN_ID})).await;
        assert_error(&unknown, 1004, "NOT_FOUND");
        let theirs = app.ok_as(&stranger_token, "tickets.reserve", reserve_params(&types[0], 1)).await;
        let response = buyer.call("reservations.get", json!({"reservation_id": theirs["id"]})).await;
        assert_eq!(response["error"], unknown["error"]);
        let response = buyer.call("reservations.cancel", json!({"reservation_id": theirs["id"]})).await;
        assert_eq!(response["error"], unknown["error"]);
        assert_error(&buyer.call("events.get", json!({"event_id": UNKNOWN_ID})).await, 1004, "NOT_FOUND");
        assert_error(&buyer.call("pool.subscribe", json!({"event_id": UNKNOWN_ID})).await, 1004, "NOT_FOUND");
        assert_error(&buyer.call("tickets.reserve", reserve_params(&json!(UNKNOWN_ID), 1)).await, 1004, "NOT_FOUND");

        let response = buyer.call("tickets.reserve", reserve_params(&types[0], 10)).await;
        assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
        assert_eq!(
            response["error"]["data"],
            json!({"reason": "INSUFFICIENT_TICKETS", "ticket_type_id": types[0], "available": 9})
        );
        let response = buyer.call("tickets.reserve", reserve_params(&types[1], 3)).await;
        assert_error(&response, 2002, "RULE_VIOLATION");
        assert_eq!(
            response["error"]["data"],
            json!({"reason": "RULE_VIOLATION", "ticket_type_id": types[1], "rule": {"kind": "multiple", "of": 2}})
        );
        assert_invalid_params(&buyer.call("tickets.reserve", reserve_params(&types[0], 0)).await, "items[0].quantity");
        assert_invalid_params(&buyer.call("tickets.reserve", json!({"items": []})).await, "items");

        // IDEMPOTENCY_CONFLICT: the same key, other params.
        let keyed = json!({"items": [{"ticket_type_id": types[0], "quantity": 1}], "idempotency_key": "k-1"});
        let first = buyer.ok("tickets.reserve", keyed.clone()).await;
        assert_eq!(buyer.ok("tickets.reserve", keyed).await, first, "a retry replays the first result");
        let other = json!({"items": [{"ticket_type_id": types[0], "quantity": 2}], "idempotency_key": "k-1"});
        assert_error(&buyer.call("tickets.reserve", other).await, 2005, "IDEMPOTENCY_CONFLICT");

        // RESERVATION_NOT_PENDING: a cancelled reservation is neither cancelled again nor paid.
        let cancelled = buyer.ok("reservations.cancel", json!({"reservation_id": first["id"]})).await;
        assert_eq!(cancelled["status"], "cancelled");
        let again = buyer.call("reservations.cancel", json!({"reservation_id": first["id"]})).await;
        assert_error(&again, 2004, "RESERVATION_NOT_PENDING");
        let paying = buyer
            .call("payments.create", json!({"reservation_id": first["id"], "payment_token": "tok_ok"}))
            .await;
        assert_error(&paying, 2004, "RESERVATION_NOT_PENDING");

        // Only the stranger's ticket is taken.
        assert_eq!(app.pool(&event_id, 0).await, (9, 3));
        assert_eq!(app.pool(&event_id, 1).await, (10, 0));
        let updated = buyer.notification("reservation.updated").await;
        assert_eq!(updated["params"], json!({"reservation": cancelled}));
        buyer.expect_silence(Duration::from_millis(300)).await;
        assert!(buyer.kept_aside().is_empty(), "{:?}", buyer.kept_aside());
    }

    async fn payment_errors_carry_their_reasons_and_leave_the_reservation_pending(app, via) {
        let admin = app.quick_admin().await;
        let (event_id, types) = app.create_pools(&admin, &[(10, json!({"kind": "any"}))]).await;
        let (_, token) = app.quick_customer().await;
        let mut buyer = app.client(via, Some(&token)).await;
        let reservation = buyer.ok("tickets.reserve", reserve_params(&types[0], 2)).await;
        let pay = |payment_token: &str| json!({"reservation_id": reservation["id"], "payment_token": payment_token});

        assert_error(&buyer.call("payments.create", pay("tok_declined")).await, 3001, "PAYMENT_DECLINED");
        assert_error(&buyer.call("payments.create", pay("tok_error")).await, 3002, "PAYMENT_UNAVAILABLE");
        assert_eq!(buyer.ok("reservations.get", json!({"reservation_id": reservation["id"]})).await, reservation);
        assert_eq!(app.pool(&event_id, 0).await, (8, 1));

        let paid = buyer.ok("payments.create", pay("tok_ok")).await;
        assert_eq!(paid["reservation"], with_status(&reservation, "paid"));
        assert_error(&buyer.call("payments.create", pay("tok_ok")).await, 2004, "RESERVATION_NOT_PENDING");
        // The failed attempts announced nothing; the payment did, once.
        let updated = buyer.notification("reservation.updated").await;
        assert_eq!(updated["params"], json!({"reservation": paid["reservation"]}));
        buyer.expect_silence(Duration::from_millis(300)).await;
        assert!(buyer.kept_aside().is_empty(), "{:?}", buyer.kept_aside());
    }

    async fn calls_over_the_rate_limit_are_refused_with_a_retry_hint(app, via; |s| {
        s.rate_limit = 1;
        s.rate_burst = 5;
    }) {
        let mut client = app.client(via, None).await;
        for _ in 0..5 {
            client.ok("events.list", json!({})).await;
        }
        let limited = client.call("events.list", json!({})).await;
        assert_error(&limited, 4001, "RATE_LIMITED");
        let retry_after = limited["error"]["data"]["retry_after_ms"].as_u64().unwrap();
        assert!((1..=1_000).contains(&retry_after), "{limited}");
        // Another client has its own budget.
        app.client(via, None).await.ok("events.list", json!({})).await;
        // The hint is the wait the budget needs.
        tokio::time::sleep(Duration::from_millis(retry_after + 20)).await;
        client.ok("events.list", json!({})).await;
    }

    async fn parse_errors_and_batches_are_answered_as_json_rpc_says(app, via) {
        let mut client = app.client(via, None).await;
        let parse_error = json!({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null});
        assert_eq!(client.raw(r#"{"jsonrpc":"2.0","id":1,"method":"#).await, Some(parse_error.clone()));
        assert_eq!(client.raw(r#"[{"jsonrpc":"2.0","id":1,"method":"events.list"},"#).await, Some(parse_error));

        let batch = json!([
            {"jsonrpc": "2.0", "id": "a", "method": "events.list", "params": {}},
            {"jsonrpc": "2.0", "method": "events.list", "params": {}},
            {"jsonrpc": "2.0", "id": 7, "method": "no.such.method", "params": {}},
            {"jsonrpc": "2.0", "id": 8, "method": "events.get", "params": [UNKNOWN_ID]},
            {"jsonrpc": "2.0", "id": 9, "method": "events.get", "params": {"event_id": UNKNOWN_ID}},
        ]);
        let answers = client.raw(&batch.to_string()).await.expect("a batch with calls is answered");
        let answers = answers.as_array().unwrap_or_else(|| panic!("not an array: {answers}"));
        assert_eq!(answers.len(), 4, "one answer per call, none for the notification: {answers:?}");
        let by_id = |id: Value| answers.iter().find(|a| a["id"] == id).unwrap_or_else(|| panic!("no answer for {id}"));
        let (a, seven, eight, nine) = (by_id(json!("a")), by_id(json!(7)), by_id(json!(8)), by_id(json!(9)));
        assert_eq!(a["id"], "a");
        assert_eq!(a["result"], json!({"events": [], "next_cursor": null}));
        assert_eq!(seven["id"], 7);
        assert_eq!(seven["error"]["code"], -32601, "{seven}");
        assert_eq!(eight["id"], 8);
        assert_eq!(eight["error"]["code"], -32602, "{eight}");
        assert_eq!(nine["id"], 9);
        assert_error(nine, 1004, "NOT_FOUND");

        // Nothing is owed for notifications, alone or in a batch.
        assert_eq!(client.raw(r#"{"jsonrpc":"2.0","method":"events.list","params":{}}"#).await, None);
        assert_eq!(
            client.raw(r#"[{"jsonrpc":"2.0","method":"events.list"},{"jsonrpc":"2.0","method":"no.such"}]"#).await,
            None
        );
        let empty = client.raw("[]").await.expect("an empty batch is answered");
        assert_eq!(empty["error"]["code"], -32600, "{empty}");
        assert_eq!(empty["id"], Value::Null, "{empty}");
        // The client still works.
        client.ok("events.list", json!({})).await;
    }
}

/// The core journey on PostgreSQL too.
mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_buyer_journey_over_a_websocket() {
        with_app(
            Backend::Postgres,
            |_| {},
            |app| a_buyer_journey(app, Transport::WebSocket),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_buyer_journey_over_long_poll() {
        with_app(
            Backend::Postgres,
            |_| {},
            |app| a_buyer_journey(app, Transport::LongPoll),
        )
        .await;
    }
}

/// Long-poll session rules (PROTOCOL §2).
mod sessions {
    use super::*;

    /// `POST`, `GET` and `DELETE` on a session id, each answered 410 `SESSION_EXPIRED`.
    async fn assert_gone(app: &TestApp, session: &str) {
        let url = app.url(&format!("/lp/{session}"));
        let answers = [
            app.http
                .post(&url)
                .header("content-type", "application/json")
                .body(r#"{"jsonrpc":"2.0","id":1,"method":"events.list"}"#)
                .send()
                .await
                .unwrap(),
            app.http
                .get(format!("{url}?cursor=0"))
                .send()
                .await
                .unwrap(),
            app.http.delete(&url).send().await.unwrap(),
        ];
        for (answer, method) in answers.into_iter().zip(["POST", "GET", "DELETE"]) {
            let (status, body) = status_and_body(answer).await;
            assert_eq!(status, 410, "{method} /lp/{session}: {body}");
            assert_eq!(
                body,
                json!({"error": "SESSION_EXPIRED"}),
                "{method} /lp/{session}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bearer_token_at_open_binds_the_session() {
        with_app(
            Backend::Sqlite,
            |_| {},
            |app| async move {
                let admin = app.quick_admin().await;
                let (_, types) = app
                    .create_pools(&admin, &[(10, json!({"kind": "any"}))])
                    .await;
                let (user_id, token) = app.quick_customer().await;
                let mut session = app.long_poll(Some(&token)).await;
                // A call that needs a user works at once, as that user.
                let reservation = session
                    .ok("tickets.reserve", reserve_params(&types[0], 1))
                    .await;
                let mine = app
                    .ok_as(
                        &token,
                        "reservations.get",
                        json!({"reservation_id": reservation["id"]}),
                    )
                    .await;
                assert_eq!(mine, reservation);
                let me = session
                    .ok("auth.authenticate", json!({"token": token}))
                    .await;
                assert_eq!(me["user"]["id"], json!(user_id));
                // And the user's reservation updates reach it, whoever made the change.
                let cancelled = app
                    .ok_as(
                        &token,
                        "reservations.cancel",
                        json!({"reservation_id": reservation["id"]}),
                    )
                    .await;
                let updated = session.notification("reservation.updated").await;
                assert_eq!(updated["params"], json!({"reservation": cancelled}));
                assert_eq!(session.cursor, 1);
                // Logging out unbinds it.
                assert_eq!(session.ok("auth.logout", json!({})).await, json!(true));
                let response = session.call("reservations.list", json!({})).await;
                assert_eq!(
                    response["error"]["data"],
                    json!({"reason": "UNAUTHENTICATED", "reason_detail": "missing"})
                );
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_token_at_open_is_refused_with_401() {
        with_app(
            Backend::Sqlite,
            |_| {},
            |app| async move {
                let user = app
                    .create_user("old@example.com", "password1", Role::Customer)
                    .await;
                let forged = Tokens::new(
                    b"another-secret-another-secret-123",
                    Duration::from_secs(3600),
                );
                let (forged, _) = forged.issue(user.id, Role::Admin, app.app.clock.now());
                let short_lived = Tokens::new(JWT_SECRET.as_bytes(), Duration::from_secs(60));
                let long_ago = Timestamp::from_millis(app.app.clock.now().as_millis() - 3_600_000);
                let (expired, _) = short_lived.issue(user.id, Role::Customer, long_ago);
                for token in ["not-a-token", forged.as_str(), expired.as_str()] {
                    let (status, body) = app.open_long_poll_raw(Some(token)).await;
                    assert_eq!(status, 401, "{token}: {body}");
                }
                let not_bearer = app
                    .http
                    .post(app.url("/lp"))
                    .header("authorization", "Basic dXNlcjpwYXNz")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(not_bearer.status(), 401);
                assert_eq!(app.long_poll_sessions(), 0, "no session was opened");
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_session_is_gone_for_every_method() {
        with_app(
            Backend::Sqlite,
            |_| {},
            |app| async move {
                let real = app.long_poll(None).await;
                // Another id of the same shape, one differing in case, and garbage.
                let mut other = real.session.clone();
                let last = if other.ends_with('0') { '1' } else { '0' };
                other.pop();
                other.push(last);
                for session in [
                    other,
                    real.session.to_uppercase(),
                    "nope".to_owned(),
                    "0".repeat(32),
                ] {
                    if session != real.session {
                        assert_gone(&app, &session).await;
                    }
                }
                // The real one is untouched.
                let mut real = real;
                real.ok("events.list", json!({})).await;
                real.close().await;
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_session_is_gone_and_frees_its_subscriptions() {
        with_app(
            Backend::Sqlite,
            |_| {},
            |app| async move {
                let admin = app.quick_admin().await;
                let (event_id, _) = app
                    .create_pools(&admin, &[(10, json!({"kind": "any"}))])
                    .await;
                let mut session = app.long_poll(None).await;
                session
                    .ok("pool.subscribe", json!({"event_id": event_id}))
                    .await;
                assert_eq!(app.app.fanout.subscription_count(), 1);
                let (status, body) = session.delete_raw().await;
                assert_eq!((status, body), (204, Value::Null));
                assert_gone(&app, &session.session).await;
                assert_eq!(app.long_poll_sessions(), 0);
                poll_until(
                    Duration::from_secs(5),
                    "the subscription to be freed",
                    || async { (app.app.fanout.subscription_count() == 0).then_some(()) },
                )
                .await;
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_ids_are_128_random_bits_and_the_timeouts_are_announced() {
        with_app(
            Backend::Sqlite,
            |_| {},
            |app| async move {
                let mut seen = std::collections::HashSet::new();
                for _ in 0..64 {
                    let session = app.long_poll(None).await;
                    assert_eq!(session.session.len(), 32, "{}", session.session);
                    assert!(
                        session
                            .session
                            .chars()
                            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
                        "{}",
                        session.session
                    );
                    assert_eq!(
                        (session.poll_timeout_ms, session.session_timeout_ms),
                        (25_000, 60_000)
                    );
                    assert!(
                        seen.insert(session.session.clone()),
                        "a session id came twice"
                    );
                }
                // Every bit position varies across the ids: none is fixed.
                let bits: Vec<u128> = seen
                    .iter()
                    .map(|id| u128::from_str_radix(id, 16).unwrap())
                    .collect();
                let (all_and, all_or) = bits
                    .iter()
                    .fold((u128::MAX, 0u128), |(and, or), b| (and & b, or | b));
                assert!(
                    all_and.count_ones() < 8 && all_or.count_ones() > 120,
                    "{all_and:x} {all_or:x}"
                );
                assert_eq!(app.long_poll_sessions(), 64);
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_get_answers_the_first_at_once_with_nothing() {
        with_app(
            Backend::Sqlite,
            |_| {},
            |app| async move {
                let admin = app.quick_admin().await;
                let (event_id, types) = app
                    .create_pools(&admin, &[(10, json!({"kind": "any"}))])
                    .await;
                let (_, token) = app.quick_customer().await;
                let mut session = app.long_poll(None).await;
                assert_eq!(session.poll_timeout_ms, 25_000);
                let subscribed = session
                    .ok("pool.subscribe", json!({"event_id": event_id}))
                    .await;
                app.ok_as(&token, "tickets.reserve", reserve_params(&types[0], 1))
                    .await;
                session.notification("pool.update").await;
                assert_eq!(session.cursor, 1);

                let first = tokio::spawn({
                    let session = LongPollClient::clone_handle(&session);
                    async move {
                        let started = std::time::Instant::now();
                        let answer = session.get_raw(1).await;
                        (answer, started.elapsed())
                    }
                });
                // Two requests on two connections: the second is sent once the server has
                // the first waiting.
                poll_until(Duration::from_secs(10), "the first GET to wait", || async {
                    (app.app.metrics.gets_waiting() == 1).then_some(())
                })
                .await;
                assert!(!first.is_finished(), "the first GET waits: nothing is new");
                let second = tokio::spawn({
                    let session = LongPollClient::clone_handle(&session);
                    async move { session.get_raw(1).await }
                });
                let ((status, body), waited) = first.await.unwrap();
                assert_eq!((status, body), (200, json!({"cursor": 1, "messages": []})));
                assert!(
                    waited < Duration::from_secs(5),
                    "the first GET waited {waited:?} of 25 s"
                );

                // The second one is the live poll: it gets what comes next.
                app.ok_as(&token, "tickets.reserve", reserve_params(&types[0], 1))
                    .await;
                let (status, body) = second.await.unwrap();
                assert_eq!(status, 200, "{body}");
                let (cursor, messages) = LongPollClient::check_poll(1, &body);
                assert_eq!(cursor, 2);
                assert_eq!(
                    messages[0]["params"],
                    pool_update(&subscribed["subscription"], &event_id, &types[0], 8, 2)
                );
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_session_expires_and_frees_its_subscriptions() {
        let tweak =
            |s: &mut ticket_api::config::Settings| s.session_timeout = Duration::from_secs(1);
        with_app(Backend::Sqlite, tweak, |app| async move {
            let admin = app.quick_admin().await;
            let (event_id, _) = app
                .create_pools(&admin, &[(10, json!({"kind": "any"}))])
                .await;
            let mut idle = app.long_poll(None).await;
            let mut busy = app.long_poll(None).await;
            assert_eq!(idle.session_timeout_ms, 1_000);
            idle.ok("pool.subscribe", json!({"event_id": event_id}))
                .await;
            busy.ok("pool.subscribe", json!({"event_id": event_id}))
                .await;
            assert_eq!(app.app.fanout.subscription_count(), 2);
            // The busy one keeps making calls, and lives on.
            let started = tokio::time::Instant::now();
            let busy = tokio::sync::Mutex::new(busy);
            poll_until(
                Duration::from_secs(10),
                "the idle session to expire",
                || async {
                    busy.lock().await.ok("events.list", json!({})).await;
                    (app.long_poll_sessions() == 1).then_some(())
                },
            )
            .await;
            let mut busy = busy.into_inner();
            assert!(
                started.elapsed() >= Duration::from_secs(1),
                "expired after {:?}",
                started.elapsed()
            );
            assert_gone(&app, &idle.session).await;
            assert_eq!(app.long_poll_sessions(), 1);
            poll_until(
                Duration::from_secs(5),
                "the idle session's subscription to be freed",
                || async { (app.app.fanout.subscription_count() == 1).then_some(()) },
            )
            .await;
            busy.ok("events.list", json!({})).await;
            // Once the busy one stops too, everything is freed.
            poll_until(
                Duration::from_secs(10),
                "every session to expire",
                || async {
                    ((app.long_poll_sessions() == 0) && app.app.fanout.subscription_count() == 0)
                        .then_some(())
                },
            )
            .await;
            assert_gone(&app, &busy.session).await;
        })
        .await;
    }
}
