//! Calls whose HTTP client gives up (hyper drops the request when the peer disconnects)
//! while the change waits for the database: the change is completed or undone all the
//! same, so memory and database never disagree. Also: answers too large for small socket
//! buffers, call order on a long-poll session, and access checked before params.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::{Connection, SqliteConnection};

use crate::harness::{with_app, Backend, TestApp};

/// Holds SQLite's write lock (so the writer's next commit waits on busy_timeout) until dropped
/// via `release`.
async fn lock_database(app: &TestApp) -> SqliteConnection {
    let url = app.app.settings.database();
    let mut locker = SqliteConnection::connect(url.as_str()).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}

async fn release(mut locker: SqliteConnection) {
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
}

/// POSTs a call to /rpc and gives up (drops the connection) after `patience`.
async fn impatient_call(
    app: &TestApp,
    token: &str,
    method: &str,
    params: Value,
    patience: Duration,
) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let client = reqwest::Client::builder()
        .timeout(patience)
        .build()
        .unwrap();
    let outcome = client
        .post(app.url("/rpc"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    assert!(
        outcome.is_err(),
        "expected the client to time out: {outcome:?}"
    );
}

/// Waits until `count` calls of `method` are running on the server (its
/// `calls_in_flight` gauge).
async fn calls_running(app: &TestApp, method: &'static str, count: i64) {
    crate::harness::poll_until(Duration::from_secs(10), method, || async {
        (app.app.metrics.calls_in_flight(method) == count).then_some(())
    })
    .await;
}

async fn setup(app: &TestApp, capacity: u32) -> (Value, Value, String) {
    let admin = app.quick_admin().await;
    let (event_id, types) = app
        .create_pools(&admin, &[(capacity, json!({"kind": "any"}))])
        .await;
    let (_, token) = app.quick_customer().await;
    (event_id, types[0].clone(), token)
}

/// A retry with the same idempotency key after the client gave up must not reserve twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_client_gave_up_replays_the_same_reservation() {
    with_app(Backend::Sqlite, |_| {}, |app| async move {
        let (event_id, tt, token) = setup(&app, 10).await;
        let params = json!({"items": [{"ticket_type_id": tt, "quantity": 3}], "idempotency_key": "order-1"});
        let locker = lock_database(&app).await;
        impatient_call(&app, &token, "tickets.reserve", params.clone(), Duration::from_millis(300)).await;
        // The client retries with the same key, as idempotency keys are meant for.
        let retry = tokio::spawn({
            let (http, url, token, params) = (app.http.clone(), app.url("/rpc"), token.clone(), params.clone());
            async move {
                let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tickets.reserve", "params": params});
                http.post(url).bearer_auth(token).header("content-type", "application/json")
                    .body(body.to_string()).send().await.unwrap().json::<Value>().await.unwrap()
            }
        });
        // The first call still commits and the retry has reached the server: both run.
        calls_running(&app, "tickets.reserve", 2).await;
        release(locker).await;
        let retried = retry.await.unwrap();
        assert!(retried["error"].is_null(), "{retried}");
        let list = app.ok_as(&token, "reservations.list", json!({})).await;
        let (available, _) = app.pool(&event_id, 0).await;
        assert_eq!(list["reservations"].as_array().unwrap().len(), 1, "one key, one reservation: {list}");
        assert_eq!(available, 7);
    })
    .await;
}

/// A payment whose client gave up while it was committing completes in memory as in the
/// database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_the_client_gave_up_on_still_completes_in_memory() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let (_event_id, tt, token) = setup(&app, 10).await;
            let reservation = app
                .ok_as(
                    &token,
                    "tickets.reserve",
                    json!({"items": [{"ticket_type_id": tt, "quantity": 2}]}),
                )
                .await;
            let id = reservation["id"].clone();
            let locker = lock_database(&app).await;
            impatient_call(
                &app,
                &token,
                "payments.create",
                json!({"reservation_id": id, "payment_token": "tok_ok"}),
                Duration::from_millis(300),
            )
            .await;
            // The client is gone and its call still waits for the database.
            calls_running(&app, "payments.create", 1).await;
            release(locker).await;
            let got = crate::harness::poll_until(
                Duration::from_secs(10),
                "the payment to complete",
                || async {
                    let got = app
                        .ok_as(&token, "reservations.get", json!({"reservation_id": id}))
                        .await;
                    (got["status"] == "paid").then_some(got)
                },
            )
            .await;
            let listed = app.ok_as(&token, "reservations.list", json!({})).await;
            let retry = app
                .rpc(
                    "payments.create",
                    json!({"reservation_id": id, "payment_token": "tok_ok"}),
                    Some(&token),
                )
                .await;
            assert_eq!(listed["reservations"][0]["status"], "paid");
            assert_eq!(got["status"], "paid", "memory and database disagree");
            assert_eq!(
                retry["error"]["data"]["reason"], "RESERVATION_NOT_PENDING",
                "{retry}"
            );
        },
    )
    .await;
}

/// A cancel whose client gave up while it was committing gives the tickets back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_client_gave_up_on_still_returns_the_tickets() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let (event_id, tt, token) = setup(&app, 10).await;
            let reservation = app
                .ok_as(
                    &token,
                    "tickets.reserve",
                    json!({"items": [{"ticket_type_id": tt, "quantity": 4}]}),
                )
                .await;
            let id = reservation["id"].clone();
            let locker = lock_database(&app).await;
            impatient_call(
                &app,
                &token,
                "reservations.cancel",
                json!({"reservation_id": id}),
                Duration::from_millis(300),
            )
            .await;
            // The client is gone and its call still waits for the database.
            calls_running(&app, "reservations.cancel", 1).await;
            release(locker).await;
            crate::harness::poll_until(
                Duration::from_secs(10),
                "the tickets to come back",
                || async { (app.pool(&event_id, 0).await.0 == 10).then_some(()) },
            )
            .await;
            let listed = app.ok_as(&token, "reservations.list", json!({})).await;
            assert_eq!(listed["reservations"][0]["status"], "cancelled");
        },
    )
    .await;
}

/// A reserve whose client gave up, and whose commit then failed: the tickets go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_the_client_gave_up_on_is_undone_when_its_commit_fails() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let (event_id, tt, token) = setup(&app, 10).await;
            let locker = lock_database(&app).await;
            impatient_call(
                &app,
                &token,
                "tickets.reserve",
                json!({"items": [{"ticket_type_id": tt, "quantity": 5}]}),
                Duration::from_millis(300),
            )
            .await;
            assert_eq!(
                app.pool(&event_id, 0).await.0,
                5,
                "held while the commit waits"
            );
            // The lock outlasts the busy timeout (5 s): the commit fails and the reserve is undone.
            crate::harness::poll_until(
                Duration::from_secs(15),
                "the failed reserve to be undone",
                || async { (app.pool(&event_id, 0).await.0 == 10).then_some(()) },
            )
            .await;
            release(locker).await;
            let listed = app.ok_as(&token, "reservations.list", json!({})).await;
            assert_eq!(listed["reservations"].as_array().unwrap().len(), 0);
        },
    )
    .await;
}

/// PROTOCOL decision 13: a login is checked before the shape of the params.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_needing_a_login_checks_the_login_before_the_params() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let response = app.rpc("tickets.reserve", json!({}), None).await;
            assert_eq!(
                response["error"]["data"]["reason"], "UNAUTHENTICATED",
                "{response}"
            );
        },
    )
    .await;
}

/// PROTOCOL decision 2: an id that this server could not have issued (upper case) is NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upper_case_id_is_not_found() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let (_event_id, tt, token) = setup(&app, 10).await;
            let reservation = app
                .ok_as(
                    &token,
                    "tickets.reserve",
                    json!({"items": [{"ticket_type_id": tt, "quantity": 1}]}),
                )
                .await;
            let upper = reservation["id"].as_str().unwrap().to_uppercase();
            let response = app
                .rpc(
                    "reservations.get",
                    json!({"reservation_id": upper}),
                    Some(&token),
                )
                .await;
            assert_eq!(
                response["error"]["data"]["reason"], "NOT_FOUND",
                "{response}"
            );
        },
    )
    .await;
}

/// A WebSocket answer larger than `max_write_buffer_size` (4 KiB + 2 × 64 KiB) cannot be
/// sent: the connection is dropped without an answer or a close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_over_a_websocket_is_delivered() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let mut ws = app.ws().await;
            let one = json!({"jsonrpc": "2.0", "id": 1, "method": "rpc.discover"});
            ws.send_text(json!(vec![one; 8]).to_string()).await;
            let answer = ws.next_text().await;
            assert!(answer.is_ok(), "{answer:?}");
        },
    )
    .await;
}

/// The same with an ordinary call: `reservations.list` of a user with 400 reservations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reservation_list_over_a_websocket_is_delivered() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let (_event_id, tt, token) = setup(&app, 1000).await;
            for _ in 0..400 {
                app.ok_as(
                    &token,
                    "tickets.reserve",
                    json!({"items": [{"ticket_type_id": tt, "quantity": 1}]}),
                )
                .await;
            }
            let over_http = app.ok_as(&token, "reservations.list", json!({})).await;
            let mut ws = app.ws_as(&token).await;
            ws.send_text(
                json!({"jsonrpc": "2.0", "id": 1, "method": "reservations.list", "params": {}})
                    .to_string(),
            )
            .await;
            let answer = ws.next_text().await.expect("the answer arrives");
            assert_eq!(answer["result"], over_http);
        },
    )
    .await;
}

/// PROTOCOL decision 12: calls on one long-poll session run one at a time, in arrival order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_calls_of_one_session_run_in_order() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let (_event_id, tt, _) = setup(&app, 10).await;
            let opened: Value = app
                .http
                .post(app.url("/lp"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let url = app.url(&format!("/lp/{}", opened["session"].as_str().unwrap()));
            let post = |body: Value| {
                let (http, url) = (app.http.clone(), url.clone());
                tokio::spawn(async move {
                    http.post(url)
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await
                        .unwrap()
                        .json::<Value>()
                        .await
                        .unwrap()
                })
            };
            let email = format!("lp-{}@example.com", ticket_api::core::UserId::new());
            let register = post(json!({"jsonrpc": "2.0", "id": 1, "method": "auth.register",
            "params": {"email": email, "password": "long-enough"}}));
            // The reserve is sent once the register has arrived: running, or already done.
            crate::harness::poll_until(
                Duration::from_secs(10),
                "the register to arrive",
                || async {
                    (app.app.metrics.calls_in_flight("auth.register") == 1
                        || register.is_finished())
                    .then_some(())
                },
            )
            .await;
            let reserve = post(
                json!({"jsonrpc": "2.0", "id": 2, "method": "tickets.reserve",
            "params": {"items": [{"ticket_type_id": tt, "quantity": 1}]}}),
            );
            let (register, reserve) = (register.await.unwrap(), reserve.await.unwrap());
            assert!(register["error"].is_null(), "{register}");
            assert!(
                reserve["error"].is_null(),
                "the reserve ran before the login it followed: {reserve}"
            );
        },
    )
    .await;
}
