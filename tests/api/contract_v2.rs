//! Contract version 2 (PROTOCOL §1, §8): invalid UTF-8 is a parse error on every
//! transport, an array where an object is expected is refused by name, `params: []` is no
//! params, and messages are plain words.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{assert_invalid_params, event_with_types, with_app, Backend};

/// A body that is JSON-shaped but not UTF-8 (a lone 0xFF inside a string).
fn not_utf8() -> Vec<u8> {
    let mut body =
        br#"{"jsonrpc":"2.0","id":1,"method":"events.list","params":{"cursor":""#.to_vec();
    body.push(0xff);
    body.extend_from_slice(br#""}}"#);
    body
}

fn assert_parse_error(response: &Value) {
    assert_eq!(response["error"]["code"], json!(-32700), "{response}");
    assert_eq!(response["id"], Value::Null, "{response}");
}

#[tokio::test]
async fn a_body_that_is_not_utf8_is_a_parse_error_over_rpc_and_long_poll() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let (status, body) = app.post_rpc_raw(not_utf8(), None).await;
            assert_eq!(status, 200);
            assert_parse_error(&body);

            let lp = app.long_poll(None).await;
            let response = app
                .http
                .post(lp.url())
                .header("content-type", "application/json")
                .body(not_utf8())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
            assert_parse_error(&response.json().await.unwrap());
        },
    )
    .await;
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_is_answered_with_a_parse_error() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr))
                .await
                .unwrap();
            let frame = Frame::message(not_utf8(), OpCode::Data(Data::Text), true);
            socket.send(Message::Frame(frame)).await.unwrap();
            let answer = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                loop {
                    match socket.next().await {
                        Some(Ok(Message::Text(text))) => {
                            return Some(serde_json::from_str::<Value>(&text).unwrap())
                        }
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                        Some(Ok(_)) => {}
                    }
                }
            })
            .await
            .expect("an answer within 10 s");
            assert_parse_error(&answer.expect("a -32700 answer before the close"));
        },
    )
    .await;
}

#[tokio::test]
async fn an_array_in_place_of_an_object_is_refused_by_name_and_never_read_positionally() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let admin = app.quick_admin().await;
            let (_, customer) = app.quick_customer().await;
            let event = app
                .create_event(
                    &admin,
                    event_with_types("Arrays", &[(10, json!({"kind": "any"}))]),
                )
                .await;
            let tt = event["ticket_types"][0]["id"].clone();

            let reserve = app
                .rpc(
                    "tickets.reserve",
                    json!({"items": [[tt, 1]]}),
                    Some(&customer),
                )
                .await;
            assert_invalid_params(&reserve, "items[0]");
            let (available, _) = app.pool(&event["id"], 0).await;
            assert_eq!(available, 10, "nothing was reserved");

            let mut bad_price = event_with_types("Arrays", &[(10, json!({"kind": "any"}))]);
            bad_price["ticket_types"][0]["price"] = json!([2500, "EUR"]);
            let created = app
                .rpc("admin.events.create", bad_price, Some(&admin))
                .await;
            assert_invalid_params(&created, "ticket_types[0].price");

            let mut bad_rule = event_with_types("Arrays", &[(10, json!({"kind": "any"}))]);
            bad_rule["ticket_types"][0]["rule"] = json!(["multiple", 2]);
            let created = app.rpc("admin.events.create", bad_rule, Some(&admin)).await;
            assert_invalid_params(&created, "ticket_types[0].rule");
        },
    )
    .await;
}

#[tokio::test]
async fn empty_array_params_are_no_params_and_a_non_empty_array_is_invalid() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "events.list", "params": []});
            let (_, listed) = app.post_rpc_raw(body.to_string(), None).await;
            assert!(listed["result"]["events"].is_array(), "{listed}");

            let body = json!({"jsonrpc": "2.0", "id": 2, "method": "events.list", "params": [10]});
            let (_, refused) = app.post_rpc_raw(body.to_string(), None).await;
            assert_invalid_params(&refused, "params");
        },
    )
    .await;
}

#[tokio::test]
async fn error_messages_are_plain_words() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let response = app.rpc("reservations.list", json!({}), None).await;
            assert_eq!(
                response["error"]["message"],
                json!("not authenticated (missing)"),
                "{response}"
            );
        },
    )
    .await;
}
