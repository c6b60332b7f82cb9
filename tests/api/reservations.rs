//! Reservations (PROTOCOL §5): `tickets.reserve`, `reservations.get`, `reservations.list`,
//! `reservations.cancel`, the selling rules at their edges, access and idempotency, on both
//! backends.

use serde_json::{json, Value};

use crate::backend_tests;
use crate::harness::{
    assert_error, assert_invalid_params, assert_reservation_shape, millis, TestApp,
};

const UNKNOWN_ID: &str = "01a211e2-7aa6-7695-9737-080466ac3436";

fn reserve_params(items: &[(&Value, u64)]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(tt, quantity)| json!({"ticket_type_id": tt, "quantity": quantity}))
        .collect();
    json!({ "items": items })
}

/// `tickets.reserve` of one item as the token's user; the whole response.
async fn reserve(app: &TestApp, token: &str, tt: &Value, quantity: u64) -> Value {
    app.rpc(
        "tickets.reserve",
        reserve_params(&[(tt, quantity)]),
        Some(token),
    )
    .await
}

/// `tickets.reserve` of one item that must succeed; the reservation.
async fn reserved(app: &TestApp, token: &str, tt: &Value, quantity: u64) -> Value {
    app.ok_as(token, "tickets.reserve", reserve_params(&[(tt, quantity)]))
        .await
}

/// One ticket type of `capacity` under `rule`: the event id and the ticket type id.
async fn one_pool(app: &TestApp, capacity: u32, rule: Value) -> (Value, Value) {
    let admin = app.quick_admin().await;
    let (event_id, mut ids) = app.create_pools(&admin, &[(capacity, rule)]).await;
    (event_id, ids.remove(0))
}

fn ids_of(list: &Value) -> Vec<Value> {
    list["reservations"]
        .as_array()
        .unwrap_or_else(|| panic!("not a reservation list: {list}"))
        .iter()
        .map(|r| r["id"].clone())
        .collect()
}

backend_tests! {
    async fn reserving_one_item_returns_a_pending_reservation_held_for_the_ttl(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (available, version) = app.pool(&event_id, 0).await;
        assert_eq!(available, 10);
        let (_, token) = app.quick_customer().await;
        let before = app.app.clock.now().as_millis();
        let reservation = reserved(&app, &token, &tt, 3).await;
        let after = app.app.clock.now().as_millis();
        assert_reservation_shape(&reservation);
        assert_eq!(reservation["event_id"], event_id);
        assert_eq!(reservation["status"], "pending");
        assert_eq!(
            reservation["items"],
            json!([{"ticket_type_id": tt, "quantity": 3, "unit_price": {"amount": 2500, "currency": "EUR"}}])
        );
        assert_eq!(reservation["total"], json!({"amount": 7500, "currency": "EUR"}));
        let created_at = millis(&reservation["created_at"]);
        assert!(before - 1 <= created_at && created_at <= after + 1, "{reservation}");
        assert_eq!(millis(&reservation["expires_at"]) - created_at, 15 * 60 * 1000, "{reservation}");
        assert_eq!(app.pool(&event_id, 0).await, (7, version + 1));
    }

    async fn a_reservation_of_several_ticket_types_takes_each_and_totals_their_prices(app) {
        let admin = app.quick_admin().await;
        let (event_id, tts) = app
            .create_pools(&admin, &[(10, json!({"kind": "any"})), (4, json!({"kind": "multiple", "of": 2}))])
            .await;
        let (_, v0) = app.pool(&event_id, 0).await;
        let (_, v1) = app.pool(&event_id, 1).await;
        let (_, token) = app.quick_customer().await;
        let reservation = app
            .ok_as(&token, "tickets.reserve", reserve_params(&[(&tts[0], 3), (&tts[1], 2)]))
            .await;
        assert_reservation_shape(&reservation);
        assert_eq!(
            reservation["items"],
            json!([
                {"ticket_type_id": tts[0], "quantity": 3, "unit_price": {"amount": 2500, "currency": "EUR"}},
                {"ticket_type_id": tts[1], "quantity": 2, "unit_price": {"amount": 2600, "currency": "EUR"}},
            ])
        );
        assert_eq!(reservation["total"], json!({"amount": 3 * 2500 + 2 * 2600, "currency": "EUR"}));
        assert_eq!(app.pool(&event_id, 0).await, (7, v0 + 1));
        assert_eq!(app.pool(&event_id, 1).await, (2, v1 + 1));
    }

    async fn a_multi_item_reservation_is_all_or_nothing(app) {
        let admin = app.quick_admin().await;
        let (event_id, tts) = app
            .create_pools(
                &admin,
                &[(10, json!({"kind": "any"})), (2, json!({"kind": "any"})), (6, json!({"kind": "multiple", "of": 2}))],
            )
            .await;
        let before: Vec<_> = [
            app.pool(&event_id, 0).await,
            app.pool(&event_id, 1).await,
            app.pool(&event_id, 2).await,
        ]
        .into();
        let (_, token) = app.quick_customer().await;

        // The second item is short: nothing is taken from the first.
        let response = app
            .rpc("tickets.reserve", reserve_params(&[(&tts[0], 3), (&tts[1], 3)]), Some(&token))
            .await;
        assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
        assert_eq!(response["error"]["data"]["ticket_type_id"], tts[1], "{response}");
        assert_eq!(response["error"]["data"]["available"], 2, "{response}");

        // The second item breaks its rule: nothing is taken from the first.
        let response = app
            .rpc("tickets.reserve", reserve_params(&[(&tts[0], 3), (&tts[2], 3)]), Some(&token))
            .await;
        assert_error(&response, 2002, "RULE_VIOLATION");
        assert_eq!(response["error"]["data"]["ticket_type_id"], tts[2], "{response}");

        // The second item does not exist: nothing is taken from the first.
        let unknown = json!(UNKNOWN_ID);
        let response = app
            .rpc("tickets.reserve", reserve_params(&[(&tts[0], 3), (&unknown, 1)]), Some(&token))
            .await;
        assert_error(&response, 1004, "NOT_FOUND");

        let after: Vec<_> = [
            app.pool(&event_id, 0).await,
            app.pool(&event_id, 1).await,
            app.pool(&event_id, 2).await,
        ]
        .into();
        assert_eq!(after, before, "availability and versions unchanged");
        let list = app.ok_as(&token, "reservations.list", json!({})).await;
        assert_eq!(list, json!({"reservations": []}));
    }

    async fn an_empty_missing_or_oversized_item_list_is_invalid_params(app) {
        let admin = app.quick_admin().await;
        let types: Vec<(u32, Value)> = (0..21).map(|_| (5, json!({"kind": "any"}))).collect();
        let (event_id, tts) = app.create_pools(&admin, &types).await;
        let (_, token) = app.quick_customer().await;

        let response = app.rpc("tickets.reserve", json!({"items": []}), Some(&token)).await;
        assert_invalid_params(&response, "items");
        let response = app.rpc("tickets.reserve", json!({}), Some(&token)).await;
        assert_invalid_params(&response, "items");

        let all: Vec<(&Value, u64)> = tts.iter().map(|tt| (tt, 1)).collect();
        let response = app.rpc("tickets.reserve", reserve_params(&all), Some(&token)).await;
        assert_invalid_params(&response, "items");
        for i in 0..21 {
            assert_eq!(app.pool(&event_id, i).await.0, 5, "nothing taken from T{i}");
        }

        // Twenty items is the limit, and allowed.
        let reservation = app.ok_as(&token, "tickets.reserve", reserve_params(&all[..20])).await;
        assert_reservation_shape(&reservation);
        assert_eq!(reservation["items"].as_array().unwrap().len(), 20);
        assert_eq!(app.pool(&event_id, 19).await.0, 4);
        assert_eq!(app.pool(&event_id, 20).await.0, 5);
    }

    async fn a_quantity_outside_1_to_2_pow_31_minus_1_is_invalid_params(app) {
        let admin = app.quick_admin().await;
        let (event_id, tts) = app
            .create_pools(&admin, &[(10, json!({"kind": "any"})), (10, json!({"kind": "any"}))])
            .await;
        let before = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        for quantity in [json!(0), json!(-1), json!(1.5), json!(2_147_483_648u64), json!("2"), json!(null)] {
            let params = json!({"items": [{"ticket_type_id": tts[0], "quantity": quantity}]});
            let response = app.rpc("tickets.reserve", params, Some(&token)).await;
            assert_invalid_params(&response, "items[0].quantity");
        }
        // The field names the offending item.
        let params = json!({"items": [
            {"ticket_type_id": tts[0], "quantity": 1},
            {"ticket_type_id": tts[1], "quantity": 0},
        ]});
        let response = app.rpc("tickets.reserve", params, Some(&token)).await;
        assert_invalid_params(&response, "items[1].quantity");
        // 2³¹−1 is a valid quantity, just more than there is.
        let response = reserve(&app, &token, &tts[0], 2_147_483_647).await;
        assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
        assert_eq!(response["error"]["data"]["available"], 10, "{response}");
        assert_eq!(app.pool(&event_id, 0).await, before);
        assert_eq!(app.pool(&event_id, 1).await.0, 10);
    }

    async fn the_same_ticket_type_twice_is_invalid_params(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let before = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let response = app
            .rpc("tickets.reserve", reserve_params(&[(&tt, 1), (&tt, 2)]), Some(&token))
            .await;
        assert_invalid_params(&response, "items[1].ticket_type_id");
        assert_eq!(app.pool(&event_id, 0).await, before);
    }

    /// A repeat is a fault of the params' shape: found before any ticket type is looked up,
    /// so it wins over an unknown or foreign ticket type earlier in the list.
    async fn a_repeat_is_found_before_an_unknown_ticket_type(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let before = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let unknown = json!(uuid::Uuid::new_v4().to_string());
        let response = app
            .rpc("tickets.reserve", reserve_params(&[(&tt, 1), (&unknown, 1), (&tt, 2)]), Some(&token))
            .await;
        assert_invalid_params(&response, "items[2].ticket_type_id");
        assert_eq!(app.pool(&event_id, 0).await, before);
    }

    async fn items_of_two_events_are_invalid_params(app) {
        let (first_event, first) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (second_event, second) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let before = (app.pool(&first_event, 0).await, app.pool(&second_event, 0).await);
        let (_, token) = app.quick_customer().await;
        let response = app
            .rpc("tickets.reserve", reserve_params(&[(&first, 1), (&second, 1)]), Some(&token))
            .await;
        assert_invalid_params(&response, "items[1].ticket_type_id");
        assert_eq!((app.pool(&first_event, 0).await, app.pool(&second_event, 0).await), before);
    }

    async fn an_unknown_ticket_type_is_not_found(app) {
        let (event_id, _) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (_, token) = app.quick_customer().await;
        // A well-formed id that names nothing, garbage, and the id of an event (not a ticket type).
        for id in [json!(UNKNOWN_ID), json!("not-an-id"), event_id.clone()] {
            let response = reserve(&app, &token, &id, 1).await;
            assert_error(&response, 1004, "NOT_FOUND");
        }
    }

    async fn reservation_methods_need_a_login(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let before = app.pool(&event_id, 0).await;
        let missing = json!({"reason": "UNAUTHENTICATED", "reason_detail": "missing"});
        for (method, params) in [
            ("tickets.reserve", reserve_params(&[(&tt, 1)])),
            ("reservations.get", json!({"reservation_id": UNKNOWN_ID})),
            ("reservations.list", json!({})),
            ("reservations.cancel", json!({"reservation_id": UNKNOWN_ID})),
        ] {
            let response = app.rpc(method, params.clone(), None).await;
            assert_eq!(response["error"]["code"], 1001, "{method}: {response}");
            assert_eq!(response["error"]["data"], missing, "{method}: {response}");
            let mut ws = app.ws().await;
            let response = ws.call(method, params).await;
            assert_eq!(response["error"]["data"], missing, "{method} over /ws: {response}");
        }
        assert_eq!(app.pool(&event_id, 0).await, before);
    }

    async fn multiple_rule_refuses_a_quantity_not_divisible_by_n(app) {
        let rule = json!({"kind": "multiple", "of": 2});
        let (event_id, tt) = one_pool(&app, 10, rule.clone()).await;
        let (_, version) = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let response = reserve(&app, &token, &tt, 3).await;
        assert_error(&response, 2002, "RULE_VIOLATION");
        assert_eq!(response["error"]["data"]["rule"], rule, "{response}");
        assert_eq!(response["error"]["data"]["ticket_type_id"], tt, "{response}");
        // More than available is INSUFFICIENT_TICKETS whatever the rule.
        let response = reserve(&app, &token, &tt, 11).await;
        assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
        assert_eq!(response["error"]["data"]["available"], 10, "{response}");
        assert_eq!(app.pool(&event_id, 0).await, (10, version));
        reserved(&app, &token, &tt, 4).await;
        assert_eq!(app.pool(&event_id, 0).await, (6, version + 1));
    }

    async fn altogether_rule_takes_exactly_the_whole_remaining_pool(app) {
        let rule = json!({"kind": "altogether"});
        let (event_id, tt) = one_pool(&app, 5, rule.clone()).await;
        let (_, version) = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let response = reserve(&app, &token, &tt, 4).await;
        assert_error(&response, 2002, "RULE_VIOLATION");
        assert_eq!(response["error"]["data"]["rule"], rule, "{response}");
        assert_eq!(response["error"]["data"]["ticket_type_id"], tt, "{response}");
        let response = reserve(&app, &token, &tt, 6).await;
        assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
        assert_eq!(response["error"]["data"]["ticket_type_id"], tt, "{response}");
        assert_eq!(response["error"]["data"]["available"], 5, "{response}");
        assert_eq!(app.pool(&event_id, 0).await, (5, version));
        reserved(&app, &token, &tt, 5).await;
        assert_eq!(app.pool(&event_id, 0).await, (0, version + 1));
        let response = reserve(&app, &token, &tt, 1).await;
        assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
        assert_eq!(response["error"]["data"]["available"], 0, "{response}");
    }

    async fn avoid_one_rule_refuses_to_leave_a_single_ticket(app) {
        let rule = json!({"kind": "avoid_one"});
        let (event_id, tt) = one_pool(&app, 3, rule.clone()).await;
        let (_, version) = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let response = reserve(&app, &token, &tt, 2).await;
        assert_error(&response, 2002, "RULE_VIOLATION");
        assert_eq!(response["error"]["data"]["rule"], rule, "{response}");
        assert_eq!(response["error"]["data"]["ticket_type_id"], tt, "{response}");
        let response = reserve(&app, &token, &tt, 4).await;
        assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
        assert_eq!(response["error"]["data"]["available"], 3, "{response}");
        assert_eq!(app.pool(&event_id, 0).await, (3, version));
        reserved(&app, &token, &tt, 3).await;
        assert_eq!(app.pool(&event_id, 0).await, (0, version + 1));
    }

    async fn any_rule_refuses_only_more_than_available(app) {
        let (event_id, tt) = one_pool(&app, 5, json!({"kind": "any"})).await;
        let (_, version) = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let response = reserve(&app, &token, &tt, 6).await;
        assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
        assert_eq!(response["error"]["data"]["ticket_type_id"], tt, "{response}");
        assert_eq!(response["error"]["data"]["available"], 5, "{response}");
        assert_eq!(app.pool(&event_id, 0).await, (5, version));
        reserved(&app, &token, &tt, 1).await;
        reserved(&app, &token, &tt, 4).await;
        assert_eq!(app.pool(&event_id, 0).await, (0, version + 2));
    }

    async fn get_returns_the_reservation_and_hides_other_users_ones(app) {
        let (_, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (_, owner) = app.quick_customer().await;
        let (_, other) = app.quick_customer().await;
        let reservation = reserved(&app, &owner, &tt, 2).await;
        let got = app
            .ok_as(&owner, "reservations.get", json!({"reservation_id": reservation["id"]}))
            .await;
        assert_eq!(got, reservation);

        let someone_elses = app
            .rpc("reservations.get", json!({"reservation_id": reservation["id"]}), Some(&other))
            .await;
        assert_error(&someone_elses, 1004, "NOT_FOUND");
        let unknown = app
            .rpc("reservations.get", json!({"reservation_id": UNKNOWN_ID}), Some(&other))
            .await;
        assert_eq!(someone_elses["error"], unknown["error"], "indistinguishable from an unknown id");
        let garbage = app
            .rpc("reservations.get", json!({"reservation_id": "not-an-id"}), Some(&other))
            .await;
        assert_eq!(garbage["error"], unknown["error"]);
    }

    async fn list_returns_own_reservations_newest_first_and_filters_by_status(app) {
        let (_, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (_, owner) = app.quick_customer().await;
        let (_, other) = app.quick_customer().await;
        let mut made = Vec::new();
        for _ in 0..3 {
            made.push(reserved(&app, &owner, &tt, 1).await);
        }
        let theirs = reserved(&app, &other, &tt, 1).await;

        let list = app.ok_as(&owner, "reservations.list", json!({})).await;
        let newest_first: Vec<Value> = made.iter().rev().cloned().collect();
        assert_eq!(list, json!({"reservations": newest_first}));

        let cancelled = app
            .ok_as(&owner, "reservations.cancel", json!({"reservation_id": made[1]["id"]}))
            .await;
        let pending = app.ok_as(&owner, "reservations.list", json!({"status": "pending"})).await;
        assert_eq!(ids_of(&pending), vec![made[2]["id"].clone(), made[0]["id"].clone()]);
        let only_cancelled = app.ok_as(&owner, "reservations.list", json!({"status": "cancelled"})).await;
        assert_eq!(only_cancelled, json!({"reservations": [cancelled]}));
        for status in ["paid", "expired"] {
            let list = app.ok_as(&owner, "reservations.list", json!({"status": status})).await;
            assert_eq!(list, json!({"reservations": []}), "{status}");
        }
        let list = app.ok_as(&owner, "reservations.list", json!({})).await;
        assert_eq!(ids_of(&list), newest_first.iter().map(|r| r["id"].clone()).collect::<Vec<_>>());

        let list = app.ok_as(&other, "reservations.list", json!({})).await;
        assert_eq!(list, json!({"reservations": [theirs]}));
    }

    async fn list_with_an_unknown_status_is_invalid_params(app) {
        let (_, token) = app.quick_customer().await;
        for status in [json!("bogus"), json!("PENDING"), json!(1)] {
            let response = app.rpc("reservations.list", json!({"status": status}), Some(&token)).await;
            assert_invalid_params(&response, "status");
        }
    }

    async fn cancel_releases_the_tickets_at_once_and_only_once(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (_, version) = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let reservation = reserved(&app, &token, &tt, 4).await;
        assert_eq!(app.pool(&event_id, 0).await, (6, version + 1));

        let cancelled = app
            .ok_as(&token, "reservations.cancel", json!({"reservation_id": reservation["id"]}))
            .await;
        assert_reservation_shape(&cancelled);
        let mut expected = reservation.clone();
        expected["status"] = json!("cancelled");
        assert_eq!(cancelled, expected);
        assert_eq!(app.pool(&event_id, 0).await, (10, version + 2));
        let got = app
            .ok_as(&token, "reservations.get", json!({"reservation_id": reservation["id"]}))
            .await;
        assert_eq!(got, expected);

        let again = app
            .rpc("reservations.cancel", json!({"reservation_id": reservation["id"]}), Some(&token))
            .await;
        assert_error(&again, 2004, "RESERVATION_NOT_PENDING");
        assert_eq!(app.pool(&event_id, 0).await, (10, version + 2));
    }

    async fn cancelling_another_users_reservation_is_not_found(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (_, owner) = app.quick_customer().await;
        let (_, other) = app.quick_customer().await;
        let reservation = reserved(&app, &owner, &tt, 4).await;
        let before = app.pool(&event_id, 0).await;
        let response = app
            .rpc("reservations.cancel", json!({"reservation_id": reservation["id"]}), Some(&other))
            .await;
        assert_error(&response, 1004, "NOT_FOUND");
        let unknown = app
            .rpc("reservations.cancel", json!({"reservation_id": UNKNOWN_ID}), Some(&other))
            .await;
        assert_eq!(response["error"], unknown["error"]);
        assert_eq!(app.pool(&event_id, 0).await, before);
        let got = app
            .ok_as(&owner, "reservations.get", json!({"reservation_id": reservation["id"]}))
            .await;
        assert_eq!(got, reservation, "still pending");
    }

    async fn reserve_with_a_used_idempotency_key_replays_the_first_result(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (_, version) = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let params = json!({"items": [{"ticket_type_id": tt, "quantity": 2}], "idempotency_key": "reserve-once"});
        let first = app.ok_as(&token, "tickets.reserve", params.clone()).await;
        let second = app.ok_as(&token, "tickets.reserve", params).await;
        assert_eq!(second, first);
        assert_eq!(app.pool(&event_id, 0).await, (8, version + 1), "tickets taken once");
        let list = app.ok_as(&token, "reservations.list", json!({})).await;
        assert_eq!(ids_of(&list), vec![first["id"].clone()]);
    }

    async fn reserve_with_a_used_idempotency_key_and_other_items_conflicts(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (_, token) = app.quick_customer().await;
        let params = json!({"items": [{"ticket_type_id": tt, "quantity": 2}], "idempotency_key": "k-1"});
        let first = app.ok_as(&token, "tickets.reserve", params.clone()).await;
        let before = app.pool(&event_id, 0).await;
        let other_items = json!({"items": [{"ticket_type_id": tt, "quantity": 3}], "idempotency_key": "k-1"});
        let response = app.rpc("tickets.reserve", other_items, Some(&token)).await;
        assert_error(&response, 2005, "IDEMPOTENCY_CONFLICT");
        assert_eq!(app.pool(&event_id, 0).await, before, "nothing taken");
        // The key still answers with the first result.
        assert_eq!(app.ok_as(&token, "tickets.reserve", params).await, first);
        assert_eq!(app.pool(&event_id, 0).await, before);
    }

    async fn idempotency_keys_belong_to_one_user(app) {
        let (event_id, tt) = one_pool(&app, 10, json!({"kind": "any"})).await;
        let (_, version) = app.pool(&event_id, 0).await;
        let (_, alice) = app.quick_customer().await;
        let (_, bob) = app.quick_customer().await;
        let params = json!({"items": [{"ticket_type_id": tt, "quantity": 2}], "idempotency_key": "shared-key"});
        let hers = app.ok_as(&alice, "tickets.reserve", params.clone()).await;
        let his = app.ok_as(&bob, "tickets.reserve", params).await;
        assert_ne!(his["id"], hers["id"]);
        assert_eq!(his["status"], "pending");
        assert_eq!(app.pool(&event_id, 0).await, (6, version + 2));
        let other_items = json!({"items": [{"ticket_type_id": tt, "quantity": 1}], "idempotency_key": "other-key"});
        let response = app.rpc("tickets.reserve", other_items, Some(&bob)).await;
        assert!(response["error"].is_null(), "{response}");
    }

    async fn concurrent_retries_with_one_idempotency_key_reserve_once(app) {
        let (event_id, tt) = one_pool(&app, 20, json!({"kind": "any"})).await;
        let (_, version) = app.pool(&event_id, 0).await;
        let (_, token) = app.quick_customer().await;
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(app.ws_as(&token).await);
        }
        let params = json!({"items": [{"ticket_type_id": tt, "quantity": 1}], "idempotency_key": "double-click"});
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                let params = params.clone();
                tokio::spawn(async move { client.call("tickets.reserve", params).await })
            })
            .collect();
        let responses: Vec<Value> = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        for response in &responses {
            assert!(response["error"].is_null(), "{response}");
            assert_eq!(response["result"], responses[0]["result"]);
        }
        assert_eq!(app.pool(&event_id, 0).await, (19, version + 1), "tickets taken once");
        let list = app.ok_as(&token, "reservations.list", json!({})).await;
        assert_eq!(ids_of(&list), vec![responses[0]["result"]["id"].clone()]);
    }
}
