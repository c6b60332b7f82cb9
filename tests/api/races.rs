//! Races (PROTOCOL §5, "checked atomically against the availability at that instant"):
//! 200 customers on 200 WebSocket connections reserve from one pool at the same moment, on
//! both backends. Exactly as many succeed as the pool and its rule allow.

use serde_json::{json, Value};

use crate::backend_tests;
use crate::harness::{assert_error, TestApp, WsClient};

const CONTENDERS: usize = 200;

/// What a race ended with.
struct Outcome {
    /// The successful reservations.
    reserved: Vec<Value>,
    /// The refusals (whole responses).
    refused: Vec<Value>,
    /// `(available, version)` before and after.
    before: (u64, u64),
    after: (u64, u64),
    /// Σ quantity over every contender's `reservations.list`, and the number of reservations.
    listed_quantity: u64,
    listed_count: usize,
}

/// 200 distinct customers, each on their own WebSocket, reserve `quantity` of a pool of
/// `capacity` under `rule` at once.
async fn race(app: &TestApp, capacity: u32, rule: Value, quantity: u64) -> Outcome {
    let admin = app.quick_admin().await;
    let (event_id, tts) = app.create_pools(&admin, &[(capacity, rule)]).await;
    let tt = tts[0].clone();
    let before = app.pool(&event_id, 0).await;

    let tokens: Vec<String> =
        futures_util::future::join_all((0..CONTENDERS).map(|_| app.quick_customer()))
            .await
            .into_iter()
            .map(|(_, token)| token)
            .collect();
    let mut clients: Vec<WsClient> = Vec::with_capacity(CONTENDERS);
    for chunk in tokens.chunks(50) {
        clients.extend(futures_util::future::join_all(chunk.iter().map(|t| app.ws_as(t))).await);
    }

    let params = json!({"items": [{"ticket_type_id": tt, "quantity": quantity}]});
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CONTENDERS));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let params = params.clone();
            let start = std::sync::Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                let response = client.call("tickets.reserve", params).await;
                (client, response)
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(CONTENDERS);
    let mut reserved = Vec::new();
    let mut refused = Vec::new();
    for joined in futures_util::future::join_all(tasks).await {
        let (client, response) = joined.unwrap();
        clients.push(client);
        if response["error"].is_null() {
            reserved.push(response["result"].clone());
        } else {
            refused.push(response);
        }
    }
    let after = app.pool(&event_id, 0).await;

    let lists = futures_util::future::join_all(
        clients
            .iter_mut()
            .map(|client| client.ok("reservations.list", json!({}))),
    )
    .await;
    let mut listed_quantity = 0;
    let mut listed_count = 0;
    for list in &lists {
        for reservation in list["reservations"].as_array().unwrap() {
            assert_eq!(reservation["status"], "pending", "{reservation}");
            listed_count += 1;
            listed_quantity += reservation["items"][0]["quantity"].as_u64().unwrap();
        }
    }
    Outcome {
        reserved,
        refused,
        before,
        after,
        listed_quantity,
        listed_count,
    }
}

/// Every refusal is INSUFFICIENT_TICKETS for this ticket type, with fewer available than asked.
fn assert_all_insufficient(outcome: &Outcome, quantity: u64) {
    for response in &outcome.refused {
        assert_error(response, 2001, "INSUFFICIENT_TICKETS");
        assert!(
            response["error"]["data"]["available"].as_u64().unwrap() < quantity,
            "{response}"
        );
    }
}

/// Distinct ids, the expected count, and the pool drained one version step per success.
fn assert_sold(outcome: &Outcome, winners: usize, quantity: u64) {
    assert_eq!(outcome.reserved.len(), winners, "successes");
    assert_eq!(outcome.refused.len(), CONTENDERS - winners, "refusals");
    let mut ids: Vec<&str> = outcome
        .reserved
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), winners, "distinct reservations");
    assert_eq!(
        outcome.after,
        (0, outcome.before.1 + winners as u64),
        "pool empty, one version per reservation"
    );
    assert_eq!(outcome.listed_count, winners);
    assert_eq!(outcome.listed_quantity, winners as u64 * quantity);
}

backend_tests! {
    async fn two_hundred_buyers_of_one_ticket_get_exactly_the_pool_of_100(app) {
        let outcome = race(&app, 100, json!({"kind": "any"}), 1).await;
        assert_all_insufficient(&outcome, 1);
        assert_sold(&outcome, 100, 1);
    }

    async fn two_hundred_buyers_of_pairs_under_avoid_one_get_exactly_50_and_never_leave_one(app) {
        let outcome = race(&app, 100, json!({"kind": "avoid_one"}), 2).await;
        // Availability only ever steps 100, 98, …, 2, 0: never 1, so never a RULE_VIOLATION.
        assert_all_insufficient(&outcome, 2);
        assert_sold(&outcome, 50, 2);
    }

    async fn two_hundred_buyers_of_triples_under_multiple_of_3_get_exactly_33(app) {
        let outcome = race(&app, 99, json!({"kind": "multiple", "of": 3}), 3).await;
        assert_all_insufficient(&outcome, 3);
        assert_sold(&outcome, 33, 3);
    }

    async fn paying_and_cancelling_one_reservation_at_once_has_exactly_one_winner(app) {
        let admin = app.quick_admin().await;
        let (event_id, tts) = app.create_pools(&admin, &[(20, json!({"kind": "any"}))]).await;
        let (_, token) = app.quick_customer().await;
        let mut reservations = Vec::new();
        for _ in 0..20 {
            let reservation = app
                .ok_as(&token, "tickets.reserve", json!({"items": [{"ticket_type_id": tts[0], "quantity": 1}]}))
                .await;
            reservations.push(reservation);
        }
        let (_, version) = app.pool(&event_id, 0).await;
        let mut tasks = Vec::new();
        for reservation in &reservations {
            let id = reservation["id"].clone();
            let mut payer = app.ws_as(&token).await;
            let mut canceller = app.ws_as(&token).await;
            let pay = json!({"reservation_id": id, "payment_token": "tok_ok"});
            let cancel = json!({"reservation_id": id});
            tasks.push(tokio::spawn(async move {
                let (paid, cancelled) = tokio::join!(
                    payer.call("payments.create", pay),
                    canceller.call("reservations.cancel", cancel)
                );
                (paid, cancelled)
            }));
        }
        let mut paid_count = 0u64;
        let mut cancelled_count = 0u64;
        for (reservation, joined) in reservations.iter().zip(futures_util::future::join_all(tasks).await) {
            let (paid, cancelled) = joined.unwrap();
            let winner = match (paid["error"].is_null(), cancelled["error"].is_null()) {
                (true, false) => {
                    assert_error(&cancelled, 2004, "RESERVATION_NOT_PENDING");
                    paid_count += 1;
                    "paid"
                }
                (false, true) => {
                    assert_error(&paid, 2004, "RESERVATION_NOT_PENDING");
                    cancelled_count += 1;
                    "cancelled"
                }
                _ => panic!("exactly one must win: pay {paid}, cancel {cancelled}"),
            };
            let got = app
                .ok_as(&token, "reservations.get", json!({"reservation_id": reservation["id"]}))
                .await;
            assert_eq!(got["status"], winner, "{got}");
        }
        assert_eq!(paid_count + cancelled_count, 20);
        assert_eq!(
            app.pool(&event_id, 0).await,
            (20 - paid_count, version + cancelled_count),
            "only cancellations give tickets back"
        );
    }
}
