//! `protocol/openrpc.json` and the server agree: the method table names the documented
//! methods, and real responses validate against the document's schemas.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use ticket_api::app::OPENRPC;

use crate::harness::{event_params, with_app, Backend, TestApp};

pub fn document() -> Value {
    serde_json::from_str(OPENRPC).unwrap()
}

fn method<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not documented"))
}

/// Validates `instance` against `schema`, whose `$ref`s point into the document's components.
pub fn assert_valid(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let mut schema = schema.clone();
    schema["components"] = doc["components"].clone();
    let validator = jsonschema::draft202012::new(&schema)
        .unwrap_or_else(|e| panic!("bad schema for {what}: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match the document: {errors:?}\n{instance}"
    );
}

/// Checks a whole response: its result against the method's result schema, or its error
/// against one of the errors the method documents.
pub fn assert_response_documented(doc: &Value, name: &str, response: &Value) {
    let method = method(doc, name);
    if let Some(error) = response.get("error") {
        let code = &error["code"];
        let documented = method["errors"].as_array().into_iter().flatten().any(|e| {
            let key = e["$ref"].as_str().unwrap().rsplit('/').next().unwrap();
            let spec = &doc["components"]["errors"][key];
            if &spec["code"] != code {
                return false;
            }
            assert_valid(
                doc,
                &spec["x-data-schema"],
                &error["data"],
                &format!("{name} error {key}"),
            );
            true
        });
        assert!(documented, "{name} answered an undocumented error: {error}");
    } else {
        assert_valid(
            doc,
            &method["result"]["schema"],
            &response["result"],
            &format!("{name} result"),
        );
    }
}

#[tokio::test]
async fn the_method_table_and_the_document_name_the_same_methods() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let doc = document();
            let documented: BTreeSet<String> = doc["methods"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["x-notification"] != true)
                .map(|m| m["name"].as_str().unwrap().to_owned())
                .collect();
            let implemented: BTreeSet<String> = app
                .app
                .services
                .dispatcher
                .method_names()
                .map(str::to_owned)
                .collect();
            assert_eq!(implemented, documented);
            let notifications: BTreeSet<&str> = doc["methods"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["x-notification"] == true)
                .map(|m| m["name"].as_str().unwrap())
                .collect();
            assert_eq!(
                notifications,
                BTreeSet::from(["pool.update", "reservation.updated"])
            );
        },
    )
    .await;
}

#[tokio::test]
async fn rpc_discover_serves_the_document() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let response = app.rpc("rpc.discover", json!({}), None).await;
            assert_eq!(response["result"], document());
        },
    )
    .await;
}

async fn call(app: &TestApp, doc: &Value, name: &str, params: Value, token: Option<&str>) -> Value {
    let response = app.rpc(name, params, token).await;
    assert_response_documented(doc, name, &response);
    response
}

#[tokio::test]
async fn real_responses_match_the_documented_schemas() {
    with_app(Backend::Sqlite, |_| {}, |app| async move {
        let doc = document();
        let registered = call(&app, &doc, "auth.register", json!({"email": "schema@example.com", "password": "password1"}), None).await;
        let token = registered["result"]["token"].as_str().unwrap().to_owned();
        call(&app, &doc, "auth.register", json!({"email": "schema@example.com", "password": "password1"}), None).await;
        call(&app, &doc, "auth.register", json!({"email": "schema@example.com", "password": "short"}), None).await;
        call(&app, &doc, "auth.login", json!({"email": "schema@example.com", "password": "password1"}), None).await;
        call(&app, &doc, "auth.login", json!({"email": "schema@example.com", "password": "wrong-one"}), None).await;
        call(&app, &doc, "auth.authenticate", json!({"token": token}), None).await;
        call(&app, &doc, "auth.authenticate", json!({"token": "nonsense"}), None).await;
        call(&app, &doc, "auth.logout", json!({}), None).await;
        let admin = app.quick_admin().await;
        let mut params = event_params("Schema fest", 10, json!({"kind": "multiple", "of": 2}));
        params["ticket_types"].as_array_mut().unwrap().push(json!({"name": "Solo", "price": {"amount": 0, "currency": "EUR"}, "capacity": 3, "rule": {"kind": "avoid_one"}}));
        let created = call(&app, &doc, "admin.events.create", params.clone(), Some(&admin)).await;
        call(&app, &doc, "admin.events.create", params.clone(), Some(&token)).await;
        call(&app, &doc, "admin.events.create", params, None).await;
        call(&app, &doc, "events.list", json!({"limit": 1}), None).await;
        call(&app, &doc, "events.list", json!({"limit": 0}), None).await;
        call(&app, &doc, "events.get", json!({"event_id": created["result"]["id"]}), None).await;
        call(&app, &doc, "events.get", json!({"event_id": "nope"}), None).await;
        call(&app, &doc, "rpc.discover", json!({}), None).await;

        let event = &created["result"];
        let pair = event["ticket_types"][0]["id"].clone();
        let solo = event["ticket_types"][1]["id"].clone();
        let reserve = |items: Value| json!({"items": items, "idempotency_key": "k-1"});
        let reserved = call(&app, &doc, "tickets.reserve", reserve(json!([{"ticket_type_id": pair, "quantity": 2}])), Some(&token)).await;
        call(&app, &doc, "tickets.reserve", reserve(json!([{"ticket_type_id": pair, "quantity": 2}])), Some(&token)).await;
        call(&app, &doc, "tickets.reserve", reserve(json!([{"ticket_type_id": pair, "quantity": 4}])), Some(&token)).await;
        call(&app, &doc, "tickets.reserve", json!({"items": [{"ticket_type_id": pair, "quantity": 3}]}), Some(&token)).await;
        call(&app, &doc, "tickets.reserve", json!({"items": [{"ticket_type_id": pair, "quantity": 20}]}), Some(&token)).await;
        call(&app, &doc, "tickets.reserve", json!({"items": [{"ticket_type_id": solo, "quantity": 2}]}), Some(&token)).await;
        call(&app, &doc, "tickets.reserve", json!({"items": []}), Some(&token)).await;
        call(&app, &doc, "tickets.reserve", json!({"items": [{"ticket_type_id": "nope", "quantity": 1}]}), Some(&token)).await;
        call(&app, &doc, "tickets.reserve", json!({"items": [{"ticket_type_id": solo, "quantity": 1}]}), None).await;
        let id = reserved["result"]["id"].clone();
        call(&app, &doc, "reservations.get", json!({"reservation_id": id}), Some(&token)).await;
        call(&app, &doc, "reservations.get", json!({"reservation_id": "nope"}), Some(&token)).await;
        call(&app, &doc, "reservations.list", json!({}), Some(&token)).await;
        call(&app, &doc, "reservations.list", json!({"status": "nope"}), Some(&token)).await;
        call(&app, &doc, "payments.create", json!({"reservation_id": id, "payment_token": "tok_declined"}), Some(&token)).await;
        call(&app, &doc, "payments.create", json!({"reservation_id": id, "payment_token": "tok_error"}), Some(&token)).await;
        call(&app, &doc, "payments.create", json!({"reservation_id": id, "payment_token": "tok_ok"}), Some(&token)).await;
        call(&app, &doc, "payments.create", json!({"reservation_id": id, "payment_token": "tok_ok"}), Some(&token)).await;
        call(&app, &doc, "reservations.cancel", json!({"reservation_id": id}), Some(&token)).await;
        let other = call(&app, &doc, "tickets.reserve", json!({"items": [{"ticket_type_id": solo, "quantity": 1}]}), Some(&token)).await;
        call(&app, &doc, "reservations.cancel", json!({"reservation_id": other["result"]["id"]}), Some(&token)).await;
        call(&app, &doc, "reservations.list", json!({"status": "cancelled"}), Some(&token)).await;
    })
    .await;
}

/// OpenRPC wants an error's `data` to be a value: each error gives an example, and its schema
/// lives in the extension field `x-data-schema`, which the example must match.
#[test]
fn each_error_gives_a_data_value_that_matches_its_schema() {
    let doc = document();
    for (key, error) in doc["components"]["errors"].as_object().unwrap() {
        let data = &error["data"];
        assert_eq!(data["reason"], key.as_str(), "{key}: data is a value");
        assert_valid(&doc, &error["x-data-schema"], data, &format!("{key} data"));
    }
}

/// The document and decision 8 of `protocol/README.md` agree: `/rpc` is not rate limited.
#[test]
fn the_document_says_rpc_is_not_rate_limited() {
    let description = document()["info"]["description"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        description.contains("POST /rpc is not counted per client"),
        "{description}"
    );
    assert!(!description.contains("session or HTTP client"));
}
