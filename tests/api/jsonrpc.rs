//! JSON-RPC 2.0 conformance (PROTOCOL §1, §8), over `/rpc` and over WebSocket.

use serde_json::{json, Value};

use crate::harness::{with_app, Backend, Closed, TestApp};

/// Sends one raw message over both transports and returns both answers (`Null` for none).
async fn both(app: &TestApp, text: &str) -> (Value, Value) {
    let (status, over_http) = app.post_rpc_raw(text.to_owned(), None).await;
    assert!(status == 200 || status == 204, "status {status}");
    assert_eq!(status == 204, over_http.is_null());
    let mut ws = app.ws().await;
    ws.send_text(text).await;
    // A marker call tells "no response" apart from "not yet".
    ws.send_text(r#"{"jsonrpc":"2.0","id":"marker","method":"auth.logout","params":{}}"#)
        .await;
    let first = ws.next_text().await.unwrap();
    let over_ws = if first["id"] == "marker" {
        Value::Null
    } else {
        let marker = ws.next_text().await.unwrap();
        assert_eq!(marker["id"], "marker");
        first
    };
    (over_http, over_ws)
}

async fn same_on_both(app: &TestApp, text: &str) -> Value {
    let (http, ws) = both(app, text).await;
    assert_eq!(http, ws, "transports disagree on {text}");
    http
}

#[tokio::test]
async fn parse_error_has_id_null() {
    with_app(Backend::Sqlite, |_| {}, |app| async move {
        let response = same_on_both(&app, r#"{"jsonrpc":"2.0","id":1,"method":"#).await;
        assert_eq!(response, json!({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null}));
    })
    .await;
}

#[tokio::test]
async fn invalid_requests_are_refused() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            for (text, id) in [
                (r#"{"jsonrpc":"2.0","id":7}"#, json!(7)),
                (
                    r#"{"jsonrpc":"1.0","id":"x","method":"events.list"}"#,
                    json!("x"),
                ),
                (r#"{"id":1,"method":"events.list"}"#, json!(1)),
                (
                    r#"{"jsonrpc":"2.0","id":[1],"method":"events.list"}"#,
                    json!(null),
                ),
                (r#""just a string""#, json!(null)),
                (
                    r#"{"jsonrpc":"2.0","id":2,"method":"events.list","params":7}"#,
                    json!(2),
                ),
            ] {
                let response = same_on_both(&app, text).await;
                assert_eq!(response["error"]["code"], -32600, "{text}");
                assert_eq!(response["id"], id, "{text}");
            }
        },
    )
    .await;
}

#[tokio::test]
async fn unknown_method_is_method_not_found() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let response = same_on_both(
                &app,
                r#"{"jsonrpc":"2.0","id":3,"method":"tickets.steal","params":{}}"#,
            )
            .await;
            assert_eq!(response["error"]["code"], -32601);
            assert_eq!(response["id"], 3);
        },
    )
    .await;
}

#[tokio::test]
async fn invalid_params_name_the_field() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            for (params, field) in [
                (json!({"limit": "ten"}), "limit"),
                (json!({"limit": 0}), "limit"),
                (json!({"limit": 201}), "limit"),
                (json!({"cursor": "garbage"}), "cursor"),
            ] {
                let text =
                    json!({"jsonrpc": "2.0", "id": 1, "method": "events.list", "params": params})
                        .to_string();
                let response = same_on_both(&app, &text).await;
                assert_eq!(response["error"]["code"], -32602, "{params}");
                assert_eq!(
                    response["error"]["data"],
                    json!({"reason": "INVALID_PARAMS", "field": field}),
                    "{params}"
                );
            }
            let response = same_on_both(
                &app,
                r#"{"jsonrpc":"2.0","id":1,"method":"auth.login","params":{"password":"x"}}"#,
            )
            .await;
            assert_eq!(response["error"]["data"]["field"], "email");
            let response = same_on_both(
                &app,
                r#"{"jsonrpc":"2.0","id":1,"method":"events.list","params":[10]}"#,
            )
            .await;
            assert_eq!(response["error"]["code"], -32602);
        },
    )
    .await;
}

#[tokio::test]
async fn a_notification_gets_nothing() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            for text in [
                r#"{"jsonrpc":"2.0","method":"events.list","params":{}}"#,
                r#"{"jsonrpc":"2.0","method":"no.such.method"}"#,
                r#"{"jsonrpc":"2.0","method":"events.list","params":{"limit":-1}}"#,
                r#"[{"jsonrpc":"2.0","method":"events.list"},{"jsonrpc":"2.0","method":"nope"}]"#,
            ] {
                assert_eq!(same_on_both(&app, text).await, Value::Null, "{text}");
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_mixed_batch_gets_exactly_the_owed_responses() {
    with_app(Backend::Sqlite, |_| {}, |app| async move {
        let batch = json!([
            {"jsonrpc": "2.0", "id": "list", "method": "events.list", "params": {}},
            {"jsonrpc": "2.0", "method": "events.list", "params": {}},
            {"jsonrpc": "2.0", "id": 2, "method": "no.such.method"},
            {"foo": "bar"},
            {"jsonrpc": "2.0", "id": null, "method": "events.get", "params": {"event_id": "nope"}},
            7
        ]);
        let response = same_on_both(&app, &batch.to_string()).await;
        let responses = response.as_array().expect("an array of responses");
        assert_eq!(responses.len(), 5);
        assert_eq!(responses[0]["id"], "list");
        assert!(responses[0]["result"]["events"].is_array());
        assert_eq!((responses[1]["id"].clone(), responses[1]["error"]["code"].clone()), (json!(2), json!(-32601)));
        assert_eq!((responses[2]["id"].clone(), responses[2]["error"]["code"].clone()), (json!(null), json!(-32600)));
        assert_eq!(responses[3]["error"]["data"]["reason"], "NOT_FOUND");
        assert!(responses[3].as_object().unwrap().contains_key("id") && responses[3]["id"].is_null());
        assert_eq!(responses[4]["error"]["code"], -32600);
    })
    .await;
}

#[tokio::test]
async fn an_empty_batch_is_one_invalid_request() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let response = same_on_both(&app, "[]").await;
            assert_eq!(response["error"]["code"], -32600);
            assert!(response["id"].is_null());
        },
    )
    .await;
}

#[tokio::test]
async fn ids_are_echoed_verbatim() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            for id in [
                json!("a-string"),
                json!(42),
                json!(-7),
                json!(3.25),
                json!(null),
                json!(""),
                json!(9007199254740993u64),
            ] {
                let text = json!({"jsonrpc": "2.0", "id": id, "method": "events.list"}).to_string();
                let response = same_on_both(&app, &text).await;
                assert_eq!(response["id"], id);
                assert!(response["result"].is_object());
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_batch_over_fifty_entries_is_one_invalid_request() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let call = json!({"jsonrpc": "2.0", "id": 1, "method": "events.list"});
            let fifty: Vec<Value> = vec![call.clone(); 50];
            let response = same_on_both(&app, &Value::Array(fifty).to_string()).await;
            assert_eq!(response.as_array().map(Vec::len), Some(50));
            let fifty_one: Vec<Value> = vec![call; 51];
            let response = same_on_both(&app, &Value::Array(fifty_one).to_string()).await;
            assert_eq!(response["error"]["code"], -32600);
            assert!(response["id"].is_null());
        },
    )
    .await;
}

#[tokio::test]
async fn a_message_over_64_kib_is_refused() {
    with_app(Backend::Sqlite, |_| {}, |app| async move {
        let padding = "x".repeat(65 * 1024);
        let text = json!({"jsonrpc": "2.0", "id": 1, "method": "events.list", "params": {"pad": padding}}).to_string();
        let (status, _) = app.post_rpc_raw(text.clone(), None).await;
        assert_eq!(status, 413);
        let mut ws = app.ws().await;
        ws.send_text(text).await;
        assert_eq!(ws.next_text().await, Err(Closed::Code(1009)));
        // Just under the limit is fine.
        let padding = "x".repeat(63 * 1024);
        let text = json!({"jsonrpc": "2.0", "id": 1, "method": "events.list", "params": {"pad": padding}}).to_string();
        let (status, body) = app.post_rpc_raw(text.clone(), None).await;
        assert_eq!((status, body["id"].clone()), (200, json!(1)));
        let mut ws = app.ws().await;
        ws.send_text(text).await;
        assert_eq!(ws.next_text().await.unwrap()["id"], 1);
    })
    .await;
}

#[tokio::test]
async fn a_binary_frame_closes_with_1003() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let mut ws = app.ws().await;
            ws.send_binary(b"{\"jsonrpc\":\"2.0\"}".to_vec()).await;
            assert_eq!(ws.next_text().await, Err(Closed::Code(1003)));
        },
    )
    .await;
}

#[tokio::test]
async fn internal_errors_leak_nothing() {
    // No method fails internally on purpose; the mapping itself is checked instead.
    let error = ticket_api::rpc::RpcError::internal("connection to 10.1.2.3 refused; table users")
        .to_error_object();
    assert_eq!(error.code, -32603);
    assert_eq!(error.message, "Internal error");
    assert!(error.data.is_none());
}
