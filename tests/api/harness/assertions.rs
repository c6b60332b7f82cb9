//! Assertions on answers: errors, invalid params, times and the reservation shape.

use serde_json::{json, Value};

/// The `data.reason` of an error response.
pub fn reason(response: &Value) -> &str {
    response["error"]["data"]["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("not an application error: {response}"))
}

#[track_caller]
pub fn assert_error(response: &Value, code: i64, reason: &str) {
    assert_eq!(response["error"]["code"], json!(code), "{response}");
    assert_eq!(
        response["error"]["data"]["reason"],
        json!(reason),
        "{response}"
    );
    assert!(response.get("result").is_none(), "{response}");
}

/// Asserts `-32602 Invalid params` naming `field`.
#[track_caller]
pub fn assert_invalid_params(response: &Value, field: &str) {
    assert_eq!(response["error"]["code"], json!(-32602), "{response}");
    assert_eq!(
        response["error"]["data"],
        json!({"reason": "INVALID_PARAMS", "field": field}),
        "{response}"
    );
}

/// Milliseconds since the epoch of an RFC 3339 time in a response.
#[track_caller]
pub fn millis(time: &Value) -> i64 {
    let text = time
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {time}"));
    ticket_api::core::Timestamp::parse_rfc3339(text)
        .unwrap_or_else(|| panic!("not RFC 3339: {text}"))
        .as_millis()
}

/// The keys of a JSON object, sorted, for asserting that it has exactly the fields expected.
#[track_caller]
pub fn sorted_keys(value: &Value) -> Vec<&str> {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// Asserts the shape of a `Reservation` (PROTOCOL §5): exactly its fields, money objects,
/// items with positive quantities, `total` = Σ `unit_price` × `quantity`.
#[track_caller]
pub fn assert_reservation_shape(reservation: &Value) {
    let keys = sorted_keys(reservation);
    assert_eq!(
        keys,
        [
            "created_at",
            "event_id",
            "expires_at",
            "id",
            "items",
            "status",
            "total"
        ],
        "{reservation}"
    );
    assert!(reservation["id"].is_string(), "{reservation}");
    assert!(reservation["event_id"].is_string(), "{reservation}");
    assert!(
        ["pending", "paid", "cancelled", "expired"]
            .contains(&reservation["status"].as_str().unwrap_or("")),
        "{reservation}"
    );
    let currency = reservation["total"]["currency"].clone();
    let mut sum = 0i64;
    for item in reservation["items"].as_array().expect("items") {
        let keys = sorted_keys(item);
        assert_eq!(
            keys,
            ["quantity", "ticket_type_id", "unit_price"],
            "{reservation}"
        );
        assert_eq!(item["unit_price"]["currency"], currency, "{reservation}");
        let quantity = item["quantity"].as_i64().expect("integer quantity");
        assert!(quantity >= 1, "{reservation}");
        sum += quantity
            * item["unit_price"]["amount"]
                .as_i64()
                .expect("integer amount");
    }
    assert_eq!(reservation["total"]["amount"], json!(sum), "{reservation}");
    millis(&reservation["created_at"]);
    millis(&reservation["expires_at"]);
}
