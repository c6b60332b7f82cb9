//! The catalog (PROTOCOL §4), on both backends.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::backend_tests;
use crate::harness::{event_params, reason};

backend_tests! {
    async fn pagination_visits_every_event_exactly_once(app) {
        let admin = app.quick_admin().await;
        let mut created = HashSet::new();
        for i in 0..23 {
            // Several events share a start time, so the order must break ties by id.
            let mut params = event_params(&format!("Event {i}"), 5, json!({"kind": "any"}));
            params["starts_at"] = json!(format!("2027-0{}-01T20:00:00Z", 1 + i % 3));
            created.insert(app.create_event(&admin, params).await["id"].as_str().unwrap().to_owned());
        }
        let mut seen = Vec::new();
        let mut cursor = Value::Null;
        let mut pages = 0;
        loop {
            let mut params = json!({"limit": 5});
            if !cursor.is_null() {
                params["cursor"] = cursor.clone();
            }
            let page = app.rpc("events.list", params, None).await["result"].clone();
            pages += 1;
            let events = page["events"].as_array().unwrap();
            assert!(events.len() <= 5);
            seen.extend(events.iter().map(|e| (e["starts_at"].as_str().unwrap().to_owned(), e["id"].as_str().unwrap().to_owned())));
            cursor = page["next_cursor"].clone();
            if cursor.is_null() {
                break;
            }
        }
        assert_eq!(pages, 5);
        assert_eq!(seen.len(), 23);
        let ids: HashSet<_> = seen.iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(ids, created);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted, "ordered by start time, then id");
    }

    async fn an_unknown_event_is_not_found(app) {
        for id in ["01a211e2-7aa6-7695-9737-080466ac3436", "not-an-id", ""] {
            let response = app.rpc("events.get", json!({"event_id": id}), None).await;
            assert_eq!(reason(&response), "NOT_FOUND", "{id}");
            assert_eq!(response["error"]["code"], 1004);
        }
    }

    async fn a_created_event_is_listed_with_its_ticket_types(app) {
        let admin = app.quick_admin().await;
        let params = json!({
            "name": "Opera night",
            "starts_at": "2027-02-03T19:00:00+01:00",
            "ticket_types": [
                {"name": "Stalls", "price": {"amount": 8000, "currency": "EUR"}, "capacity": 100, "rule": {"kind": "avoid_one"}},
                {"name": "Box", "price": {"amount": 40000, "currency": "EUR"}, "capacity": 4, "rule": {"kind": "altogether"}},
                {"name": "Pairs", "price": {"amount": 9000, "currency": "EUR"}, "capacity": 10, "rule": {"kind": "multiple", "of": 2}}
            ]
        });
        let event = app.create_event(&admin, params).await;
        assert_eq!(event["venue"], Value::Null);
        assert_eq!(event["starts_at"], "2027-02-03T18:00:00.000Z");
        let fetched = app.rpc("events.get", json!({"event_id": event["id"]}), None).await["result"].clone();
        assert_eq!(fetched, event);
        let tt = &fetched["ticket_types"];
        assert_eq!(tt[0]["rule"], json!({"kind": "avoid_one"}));
        assert_eq!(tt[2]["rule"], json!({"kind": "multiple", "of": 2}));
        assert_eq!(tt[1]["price"], json!({"amount": 40000, "currency": "EUR"}));
        assert_eq!((tt[1]["capacity"].clone(), tt[1]["available"].clone(), tt[1]["version"].clone()), (json!(4), json!(4), json!(0)));
        assert_eq!(tt[1]["event_id"], event["id"]);
    }

    async fn an_event_survives_a_restart(app) {
        let admin = app.quick_admin().await;
        let event = app.create_event(&admin, event_params("Kept", 7, json!({"kind": "any"}))).await;
        let stored = app.app.store.load_events().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].id.to_string(), event["id"]);
        assert_eq!(stored[0].ticket_types[0].capacity, 7);
    }

    async fn invalid_events_name_the_field(app) {
        let admin = app.quick_admin().await;
        let cases = [
            (json!({"name": "", "starts_at": "2027-01-01T00:00:00Z", "ticket_types": []}), "name"),
            (json!({"name": "A", "starts_at": "next week", "ticket_types": []}), "starts_at"),
            (json!({"name": "A", "starts_at": "2027-01-01T00:00:00Z", "ticket_types": []}), "ticket_types"),
            (event_params("A", 0, json!({"kind": "any"})), "ticket_types[0].capacity"),
            (event_params("A", 5, json!({"kind": "multiple", "of": 1})), "ticket_types[0].rule.of"),
            (event_params("A", 5, json!({"kind": "lottery"})), "ticket_types[0].rule.kind"),
            (json!({"name": "A", "starts_at": "2027-01-01T00:00:00Z", "ticket_types": [{"name": "T", "price": {"amount": 1.5, "currency": "EUR"}, "capacity": 1, "rule": {"kind": "any"}}]}), "ticket_types[0].price.amount"),
            (json!({"name": "A", "starts_at": "2027-01-01T00:00:00Z", "ticket_types": [{"name": "T", "price": {"amount": 100, "currency": "XYZ"}, "capacity": 1, "rule": {"kind": "any"}}]}), "ticket_types[0].price.currency"),
            (json!({"name": "A", "starts_at": "2027-01-01T00:00:00Z", "ticket_types": [{"name": "T", "price": {"amount": 100, "currency": "EUR"}, "rule": {"kind": "any"}}]}), "ticket_types[0].capacity"),
        ];
        for (params, field) in cases {
            let response = app.rpc("admin.events.create", params.clone(), Some(&admin)).await;
            assert_eq!(response["error"]["code"], -32602, "{params}");
            assert_eq!(response["error"]["data"]["field"], field, "{params}: {response}");
        }
    }
}
