//! Hostile input: a thousand malformed frames each get a JSON-RPC error or a clean close,
//! and the server still answers afterwards.

use serde_json::json;

use crate::harness::{with_app, Backend, Closed};

/// Frames that are not valid calls, of many kinds.
fn malformed_frames() -> Vec<String> {
    let mut frames = vec![
        String::new(),
        " ".into(),
        "{".into(),
        "}".into(),
        "null".into(),
        "true".into(),
        "[".into(),
        "[1,2,3]".into(),
        "\u{0}".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.list\u{0}\"}".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.get\",\"params\":{\"event_id\":\"\u{0}\"}}".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":{\"a\":1},\"method\":\"x\"}".into(),
        "{\"jsonrpc\":2.0,\"id\":1,\"method\":\"events.list\"}".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":[\"events.list\"]}".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.list\",\"params\":{\"limit\":1e999}}".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.list\",\"params\":{\"limit\":18446744073709551616}}".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"auth.login\",\"params\":{\"email\":[],\"password\":{}}}".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"auth.register\",\"params\":{\"email\":\"\\ud800@x.io\",\"password\":\"12345678\"}}".into(),
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.list\",\"params\":{}{}}}", "{\"a\":".repeat(10_000), "}".repeat(10_000)),
        format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"{}\"}}", "m".repeat(60_000)),
        format!("{{\"jsonrpc\":\"2.0\",\"id\":\"{}\",\"method\":\"events.get\",\"params\":{{\"event_id\":\"{}\"}}}}", "i".repeat(20_000), "e".repeat(40_000)),
        "\"\\u0000\"".into(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.list\",\"params\":{\"cursor\":\"\\u0000_\\u0000\"}}".into(),
        "\u{feff}{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.list\"}".into(),
    ];
    // Truncations of a valid call at every length.
    let valid = json!({"jsonrpc": "2.0", "id": 99, "method": "admin.events.create", "params": {"name": "x", "starts_at": "2027-01-01T00:00:00Z", "ticket_types": [{"name": "a", "price": {"amount": 1, "currency": "EUR"}, "capacity": 1, "rule": {"kind": "multiple", "of": 2}}]}}).to_string();
    for cut in 1..valid.len() {
        if valid.is_char_boundary(cut) {
            frames.push(valid[..cut].to_owned());
        }
    }
    // Wrong types in every position of a reserve call.
    for value in [
        "null",
        "true",
        "-1",
        "1.5",
        "\"x\"",
        "[]",
        "{}",
        "99999999999999999999",
    ] {
        if value != "null" {
            // A null limit is an absent one: valid.
            frames.push(format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.list\",\"params\":{{\"limit\":{value}}}}}"));
        }
        frames.push(format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.get\",\"params\":{{\"event_id\":{value}}}}}"));
        frames.push(format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":{value}}}"
        ));
        frames.push(format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"auth.authenticate\",\"params\":{{\"token\":{value}}}}}"));
    }
    let mut i = 0;
    while frames.len() < 1_000 {
        frames.push(format!("{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"events.list\",\"params\":{{\"limit\":{}}}}}", -(i as i64)));
        i += 1;
    }
    frames.truncate(1_000);
    frames
}

#[tokio::test]
async fn a_thousand_malformed_frames_never_break_the_server() {
    // A generous rate limit, so every frame reaches the parser rather than the limiter.
    let tweak = |s: &mut ticket_api::config::Settings| {
        s.rate_limit = 100_000;
        s.rate_burst = 100_000;
    };
    with_app(Backend::Sqlite, tweak, |app| async move {
        let frames = malformed_frames();
        assert_eq!(frames.len(), 1_000);
        let (mut errors, mut closes) = (0, 0);
        let mut ws = app.ws().await;
        for frame in &frames {
            ws.send_text(frame.clone()).await;
            match ws.next_text().await {
                Ok(response) => {
                    let entries = response
                        .as_array()
                        .cloned()
                        .unwrap_or_else(|| vec![response.clone()]);
                    for entry in entries {
                        assert!(
                            entry["error"]["code"].is_i64(),
                            "frame {frame:.80} got {entry}"
                        );
                    }
                    errors += 1;
                }
                Err(Closed::Code(code)) => {
                    assert!(
                        [1003, 1009, 1002].contains(&code),
                        "frame {frame:.80} closed with {code}"
                    );
                    closes += 1;
                    ws = app.ws().await;
                }
                Err(Closed::Abruptly) => panic!("frame {frame:.80} broke the connection"),
            }
            // The same over HTTP: an error response (or 413), never a 5xx.
            let (status, body) = app.post_rpc_raw(frame.clone(), None).await;
            assert!(
                status == 200 || status == 413,
                "frame {frame:.80} got HTTP {status}"
            );
            if status == 200 {
                let entries = body
                    .as_array()
                    .cloned()
                    .unwrap_or_else(|| vec![body.clone()]);
                assert!(
                    entries.iter().all(|e| e["error"]["code"].is_i64()),
                    "frame {frame:.80} got {body}"
                );
            }
        }
        assert_eq!(errors + closes, 1_000);
        let after = ws.ok("events.list", json!({})).await;
        assert!(after["events"].is_array());
        let (status, _) = app
            .post_rpc_raw(
                json!({"jsonrpc": "2.0", "id": 1, "method": "events.list"}).to_string(),
                None,
            )
            .await;
        assert_eq!(status, 200);
        let health = app.http.get(app.url("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    })
    .await;
}
