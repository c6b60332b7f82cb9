//! `protocol/API.md`, the API reference, is written from real exchanges: a tour of every
//! method and error reason over WebSocket, long-poll and `/rpc`, recorded at the harness
//! clients' send and receive points, put together with `protocol/openrpc.json` (params,
//! results, errors). The test fails when the committed file is out of date; run
//! `UPDATE_API_REFERENCE=1 cargo test --test api -- reference` to write it.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use ticket_api::core::Role;

use crate::harness::{with_app, Backend, LongPollClient, TestApp};
use crate::openrpc::document;
use crate::recorder::{recording, Frame};

const PATH: &str = "protocol/API.md";
/// The only error reason the tour cannot provoke: it needs the storage to be down.
const NOT_RECORDED: [&str; 1] = ["UNAVAILABLE"];

fn ok(response: &Value) -> Value {
    assert!(response["error"].is_null(), "{response}");
    response["result"].clone()
}

#[track_caller]
fn failed(response: &Value, reason: &str) {
    assert_eq!(response["error"]["data"]["reason"], reason, "{response}");
}

const START: &str = "2027-06-01T18:00:00Z";

fn festival() -> Value {
    json!({
        "name": "Harbour Lights Festival",
        "starts_at": START,
        "venue": "Pier 9",
        "ticket_types": [
            {"name": "General", "price": {"amount": 4500, "currency": "EUR"}, "capacity": 100, "rule": {"kind": "any"}},
            {"name": "Pairs", "price": {"amount": 8000, "currency": "EUR"}, "capacity": 20, "rule": {"kind": "multiple", "of": 2}},
            {"name": "Whole box", "price": {"amount": 30000, "currency": "EUR"}, "capacity": 4, "rule": {"kind": "altogether"}},
            {"name": "Balcony", "price": {"amount": 3500, "currency": "EUR"}, "capacity": 10, "rule": {"kind": "avoid_one"}}
        ]
    })
}

/// An admin with a fixed email (the harness's admins have random ones), logged in over `/rpc`
/// before the recording starts.
async fn admin(app: &TestApp) -> String {
    app.create_user("admin@example.com", "an admin password", Role::Admin)
        .await;
    let response = app
        .rpc(
            "auth.login",
            json!({"email": "admin@example.com", "password": "an admin password"}),
            None,
        )
        .await;
    ok(&response)["token"].as_str().unwrap().to_owned()
}

/// Every method and every error reason but UNAVAILABLE, each at least once.
async fn tour(app: &TestApp, admin: &str) {
    let mut staff = app.ws().await;
    ok(&staff
        .call("auth.authenticate", json!({"token": admin}))
        .await);
    let event = ok(&staff.call("admin.events.create", festival()).await);
    let event_id = event["id"].clone();
    let general = event["ticket_types"][0]["id"].clone();
    let pairs = event["ticket_types"][1]["id"].clone();

    let mut ws = app.ws().await;
    let ada = json!({"email": "ada@example.com", "password": "correct horse battery"});
    let token = ok(&ws.call("auth.register", ada.clone()).await)["token"].clone();
    failed(&ws.call("auth.register", ada.clone()).await, "EMAIL_TAKEN");
    failed(
        &ws.call(
            "auth.register",
            json!({"email": "bob@example.com", "password": "short"}),
        )
        .await,
        "INVALID_PARAMS",
    );
    failed(
        &ws.call(
            "auth.login",
            json!({"email": "ada@example.com", "password": "wrong password"}),
        )
        .await,
        "INVALID_CREDENTIALS",
    );
    ok(&ws.call("auth.login", ada.clone()).await);
    ok(&ws.call("events.list", json!({"limit": 10})).await);
    ok(&ws.call("events.get", json!({"event_id": event_id})).await);
    failed(
        &ws.call(
            "events.get",
            json!({"event_id": "00000000-0000-4000-8000-000000000000"}),
        )
        .await,
        "NOT_FOUND",
    );
    failed(
        &ws.call("admin.events.create", festival()).await,
        "FORBIDDEN",
    );
    let subscription = ok(&ws
        .call("pool.subscribe", json!({"event_id": event_id}))
        .await)["subscription"]
        .clone();
    let held = ok(&ws
        .call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": general, "quantity": 2}], "idempotency_key": "order-1"}),
        )
        .await);
    ws.notification("pool.update").await;
    failed(
        &ws.call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": general, "quantity": 3}], "idempotency_key": "order-1"}),
        )
        .await,
        "IDEMPOTENCY_CONFLICT",
    );
    failed(
        &ws.call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": pairs, "quantity": 3}]}),
        )
        .await,
        "RULE_VIOLATION",
    );
    failed(
        &ws.call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": general, "quantity": 1000}]}),
        )
        .await,
        "INSUFFICIENT_TICKETS",
    );
    let reservation_id = held["id"].clone();
    ok(&ws
        .call(
            "reservations.get",
            json!({"reservation_id": reservation_id}),
        )
        .await);
    for (card, reason) in [
        ("tok_declined", "PAYMENT_DECLINED"),
        ("tok_error", "PAYMENT_UNAVAILABLE"),
    ] {
        failed(
            &ws.call(
                "payments.create",
                json!({"reservation_id": reservation_id, "payment_token": card}),
            )
            .await,
            reason,
        );
    }
    ok(&ws
        .call(
            "payments.create",
            json!({"reservation_id": reservation_id, "payment_token": "tok_ok", "idempotency_key": "payment-1"}),
        )
        .await);
    ws.notification("reservation.updated").await;
    failed(
        &ws.call(
            "reservations.cancel",
            json!({"reservation_id": reservation_id}),
        )
        .await,
        "RESERVATION_NOT_PENDING",
    );
    let second = ok(&ws
        .call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": pairs, "quantity": 2}]}),
        )
        .await);
    ok(&ws
        .call(
            "reservations.cancel",
            json!({"reservation_id": second["id"]}),
        )
        .await);
    // Until that change has been fanned out, a new subscription could see it twice (in its
    // snapshot and in the update in flight), which would make the recording vary.
    loop {
        let update = ws.notification("pool.update").await;
        let pools = update["params"]["pools"].as_array().unwrap().clone();
        if pools
            .iter()
            .any(|p| p["ticket_type_id"] == pairs && p["available"] == 20)
        {
            break;
        }
    }
    ok(&ws.call("reservations.list", json!({})).await);
    ok(&ws
        .call("pool.unsubscribe", json!({"subscription": subscription}))
        .await);
    ok(&ws.call("rpc.discover", json!({})).await);
    let unknown = ws.call("tickets.refund", json!({})).await;
    assert_eq!(unknown["error"]["code"], -32601, "{unknown}");
    ok(&ws.call("auth.logout", json!({})).await);
    failed(
        &ws.call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": general, "quantity": 1}]}),
        )
        .await,
        "UNAUTHENTICATED",
    );

    failed(
        &app.rpc("pool.subscribe", json!({"event_id": event_id}), None)
            .await,
        "TRANSPORT_UNSUPPORTED",
    );

    // The same over long-poll: calls by POST, notifications by GET.
    let mut lp: LongPollClient = app.long_poll(None).await;
    ok(&lp.call("auth.authenticate", json!({"token": token})).await);
    ok(&lp
        .call("pool.subscribe", json!({"event_id": event_id}))
        .await);
    let third = ok(&lp
        .call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": general, "quantity": 1}]}),
        )
        .await);
    lp.notification("pool.update").await;
    ok(&lp
        .call(
            "reservations.cancel",
            json!({"reservation_id": third["id"]}),
        )
        .await);
    lp.notification("reservation.updated").await;
    failed(
        &lp.call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": pairs, "quantity": 1}]}),
        )
        .await,
        "RULE_VIOLATION",
    );
    lp.close().await;

    // A connection that spends its burst (this server allows 1 call/s, a burst of 60).
    let mut eager = app.ws().await;
    let mut limited = false;
    for _ in 0..100 {
        let response = eager.call("events.list", json!({"limit": 1})).await;
        if response["error"]["data"]["reason"] == "RATE_LIMITED" {
            limited = true;
            break;
        }
    }
    assert!(limited, "the burst ran out");
}

/// A reservation that runs out (on a server whose reservations last one second).
async fn expiry_tour(app: &TestApp, admin: &str) {
    let event = app.create_event(admin, festival()).await;
    let mut ws = app.ws().await;
    ok(&ws
        .call(
            "auth.register",
            json!({"email": "grace@example.com", "password": "correct horse battery"}),
        )
        .await);
    let held = ok(&ws
        .call(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": event["ticket_types"][0]["id"], "quantity": 1}]}),
        )
        .await);
    let update = ws.notification("reservation.updated").await;
    assert_eq!(update["params"]["reservation"]["status"], "expired");
    failed(
        &ws.call(
            "payments.create",
            json!({"reservation_id": held["id"], "payment_token": "tok_ok"}),
        )
        .await,
        "RESERVATION_EXPIRED",
    );
}

#[tokio::test]
async fn the_api_reference_is_recorded_from_real_exchanges() {
    let started = OffsetDateTime::now_utc();
    let mut frames = Vec::new();
    let log = &mut frames;
    with_app(
        Backend::Sqlite,
        |settings| {
            settings.rate_limit = 1;
            settings.rate_burst = 60;
        },
        |app| async move {
            let admin = admin(&app).await;
            let ((), recorded) = recording(tour(&app, &admin)).await;
            log.extend(recorded);
        },
    )
    .await;
    let log = &mut frames;
    with_app(
        Backend::Sqlite,
        |settings| settings.reservation_ttl = Duration::from_secs(1),
        |app| async move {
            let admin = admin(&app).await;
            let ((), recorded) = recording(expiry_tour(&app, &admin)).await;
            log.extend(recorded);
        },
    )
    .await;

    let written = write_reference(&document(), &frames, started);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PATH);
    if std::env::var_os("UPDATE_API_REFERENCE").is_some() {
        std::fs::write(&path, &written).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != written {
        let line = committed
            .lines()
            .zip(written.lines())
            .position(|(a, b)| a != b)
            .map_or(
                committed.lines().count().min(written.lines().count()),
                |n| n,
            );
        panic!(
            "{PATH} is out of date (first difference at line {}); write it with \
             `UPDATE_API_REFERENCE=1 cargo test --test api -- reference`",
            line + 1
        );
    }
}

// ---------- from frames to exchanges ----------

struct Exchange {
    transport: &'static str,
    request: Value,
    response: Value,
}

struct Notification {
    transport: &'static str,
    message: Value,
}

fn exchanges(frames: &[Frame]) -> (Vec<Exchange>, Vec<Notification>, Vec<Value>) {
    let mut pending: HashMap<(String, String), Value> = HashMap::new();
    let mut calls = Vec::new();
    let mut notes = Vec::new();
    let mut polls = Vec::new();
    for frame in frames {
        let messages: Vec<&Value> = match &frame.message {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        if frame.transport == "long-poll GET" {
            if frame.message["messages"]
                .as_array()
                .is_some_and(|m| !m.is_empty())
            {
                polls.push(frame.message.clone());
            }
            for entry in frame.message["messages"].as_array().into_iter().flatten() {
                notes.push(Notification {
                    transport: "long-poll",
                    message: entry["message"].clone(),
                });
            }
            continue;
        }
        for message in messages {
            let key = (frame.conn.clone(), message["id"].to_string());
            if frame.outgoing {
                if message.get("method").is_some() && message.get("id").is_some() {
                    pending.insert(key, message.clone());
                }
            } else if message.get("method").is_some() {
                notes.push(Notification {
                    transport: frame.transport,
                    message: message.clone(),
                });
            } else if let Some(request) = pending.remove(&key) {
                calls.push(Exchange {
                    transport: frame.transport,
                    request,
                    response: message.clone(),
                });
            }
        }
    }
    (calls, notes, polls)
}

fn reason_of(response: &Value) -> Option<String> {
    let error = response.get("error")?;
    Some(match error["data"]["reason"].as_str() {
        Some(reason) => reason.to_owned(),
        None => match error["code"].as_i64() {
            Some(-32601) => "METHOD_NOT_FOUND".to_owned(),
            Some(code) => code.to_string(),
            None => "ERROR".to_owned(),
        },
    })
}

// ---------- stable placeholders ----------

/// Replaces what differs from run to run (ids, tokens, times, waits) by stable stand-ins, in
/// order of first appearance in the document.
struct Placeholders {
    ids: HashMap<String, String>,
    started: OffsetDateTime,
}

const BASE_TIME: OffsetDateTime = time::macros::datetime!(2026-12-01 10:00 UTC);

impl Placeholders {
    fn apply(&mut self, value: &Value) -> Value {
        match value {
            Value::String(s) => Value::String(self.string(s)),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.apply(v)).collect()),
            Value::Object(map) => {
                let time = |key: &str| {
                    map.get(key)
                        .and_then(Value::as_str)
                        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
                };
                let created = time("created_at");
                let mut out = serde_json::Map::new();
                for (key, v) in map {
                    let v = match (key.as_str(), v.as_u64()) {
                        // Depends on when the bucket refilled: shown rounded up to the second.
                        ("retry_after_ms", Some(ms)) => json!(ms.div_ceil(1000) * 1000),
                        ("created_at", _) if created.is_some() => json!(stamp(BASE_TIME)),
                        // A reservation's expiry shows its TTL exactly; a token's, its
                        // lifetime to the hour.
                        ("expires_at", _) => match (time("expires_at"), created) {
                            (Some(at), Some(created)) => json!(stamp(BASE_TIME + (at - created))),
                            (Some(at), None) => {
                                let hours = ((at - self.started).whole_minutes() + 30) / 60;
                                json!(stamp(BASE_TIME + time::Duration::hours(hours)))
                            }
                            _ => self.apply(v),
                        },
                        _ => self.apply(v),
                    };
                    out.insert(key.clone(), v);
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }

    fn string(&mut self, s: &str) -> String {
        if uuid::Uuid::parse_str(s).is_ok() && s.len() == 36 {
            let next = self.ids.len() + 1;
            return self
                .ids
                .entry(s.to_owned())
                .or_insert_with(|| format!("00000000-0000-4000-8000-{next:012}"))
                .clone();
        }
        if s.starts_with("eyJ") && s.matches('.').count() == 2 {
            return "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiLigKYifQ.c2lnbmF0dXJl"
                .to_owned();
        }
        s.to_owned()
    }
}

/// RFC 3339 with milliseconds, as the server writes times.
fn stamp(at: OffsetDateTime) -> String {
    format!(
        "{}.{:03}Z",
        at.replace_nanosecond(0)
            .unwrap()
            .format(&Rfc3339)
            .unwrap()
            .trim_end_matches('Z'),
        at.millisecond()
    )
}

// ---------- the document ----------

fn schema_type(schema: &Value) -> String {
    if let Some(reference) = schema["$ref"].as_str() {
        return reference.rsplit('/').next().unwrap().to_owned();
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema[key].as_array() {
            return options
                .iter()
                .map(schema_type)
                .collect::<Vec<_>>()
                .join(" \\| ");
        }
    }
    if let Some(value) = schema.get("const") {
        return value.to_string();
    }
    if let Some(values) = schema["enum"].as_array() {
        return values
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" \\| ");
    }
    match &schema["type"] {
        Value::String(t) if t == "array" => format!("[{}]", schema_type(&schema["items"])),
        Value::String(t) => t.clone(),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" \\| "),
        _ => "any".to_owned(),
    }
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn block(out: &mut String, lines: &[(&str, Value)]) {
    out.push_str("```json\n");
    for (arrow, value) in lines {
        let _ = writeln!(out, "{arrow} {value}");
    }
    out.push_str("```\n\n");
}

fn write_reference(doc: &Value, frames: &[Frame], started: OffsetDateTime) -> String {
    let (calls, notes, polls) = exchanges(frames);
    let mut ph = Placeholders {
        ids: HashMap::new(),
        started,
    };
    let errors = doc["components"]["errors"].as_object().unwrap();
    let mut out = String::new();
    out.push_str(
        "# API reference\n\n\
         Every method of [`openrpc.json`](openrpc.json) with its params, result and errors, and \
         one real exchange each, recorded from the server by the integration test \
         `reference::the_api_reference_is_recorded_from_real_exchanges` (`tests/api/reference.rs`) \
         over WebSocket, long-poll and `/rpc`. Generated: do not edit. The test fails when this \
         file is out of date; `UPDATE_API_REFERENCE=1 cargo test --test api -- reference` \
         writes it. The contract itself is `PROTOCOL.md`; the decisions where it is silent are \
         in [`README.md`](README.md); the JavaScript client is described in \
         [`client.md`](client.md).\n\n\
         In the examples, `→` is what the client sent and `←` what the server answered. Ids, \
         tokens and times differ at every run and are replaced by stable stand-ins: ids by \
         `00000000-0000-4000-8000-…` numbered in order of appearance, tokens by one fixed JWT, \
         `created_at` by 2026-12-01T10:00:00.000Z and `expires_at` by the same plus the \
         reservation TTL (or the token lifetime); `retry_after_ms` is rounded up to the second. Everything else is verbatim (keys shown in alphabetical order).\n\n",
    );
    out.push_str("## Methods\n\n");
    let methods = doc["methods"].as_array().unwrap();
    for m in methods {
        let name = m["name"].as_str().unwrap();
        let anchor = name.replace('.', "");
        let _ = writeln!(
            out,
            "- [`{name}`](#{anchor}) — {}",
            m["summary"].as_str().unwrap_or("")
        );
    }
    out.push('\n');

    for m in methods {
        let name = m["name"].as_str().unwrap();
        let notification = m["x-notification"] == true;
        let _ = writeln!(out, "### `{name}`\n");
        if let Some(summary) = m["summary"].as_str() {
            let _ = writeln!(out, "{summary}\n");
        }
        if let Some(description) = m["description"].as_str() {
            let _ = writeln!(out, "{description}\n");
        }
        let params = m["params"].as_array().cloned().unwrap_or_default();
        if params.is_empty() {
            out.push_str("Params: none (`{}`).\n\n");
        } else {
            out.push_str("| param | type | required | description |\n|---|---|---|---|\n");
            for p in &params {
                let description = p["description"]
                    .as_str()
                    .or(p["schema"]["description"].as_str())
                    .unwrap_or("");
                let _ = writeln!(
                    out,
                    "| `{}` | `{}` | {} | {} |",
                    p["name"].as_str().unwrap(),
                    schema_type(&p["schema"]),
                    if p["required"] == true { "yes" } else { "no" },
                    cell(description)
                );
            }
            out.push('\n');
        }
        if !notification {
            let result = &m["result"];
            let _ = writeln!(out, "Result: `{}`\n", schema_type(&result["schema"]));
            let reasons: Vec<String> = m["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let key = e["$ref"].as_str().unwrap().rsplit('/').next().unwrap();
                    format!(
                        "[`{key}`](#{}) ({})",
                        key.to_lowercase(),
                        errors[key]["code"]
                    )
                })
                .collect();
            if !reasons.is_empty() {
                let _ = writeln!(out, "Errors: {}\n", reasons.join(", "));
            }
            for (transport, label) in [
                ("WebSocket", "over WebSocket (`GET /ws`)"),
                ("long-poll", "over long-poll (`POST /lp/{session}`)"),
            ] {
                let example = calls.iter().find(|c| {
                    c.transport == transport
                        && c.request["method"] == name
                        && c.response.get("result").is_some()
                });
                if let Some(c) = example {
                    let mut response = c.response.clone();
                    if name == "rpc.discover" {
                        let count = response["result"]["methods"].as_array().map_or(0, Vec::len);
                        response["result"] = json!({
                            "openrpc": response["result"]["openrpc"],
                            "info": {"title": response["result"]["info"]["title"], "version": response["result"]["info"]["version"], "description": "…"},
                            "methods": [format!("… {count} methods: the whole of openrpc.json")],
                        });
                    }
                    let _ = writeln!(out, "Example {label}:\n");
                    block(
                        &mut out,
                        &[("→", ph.apply(&c.request)), ("←", ph.apply(&response))],
                    );
                } else {
                    assert!(
                        transport != "WebSocket",
                        "{name}: no successful exchange recorded"
                    );
                }
            }
        } else {
            for transport in ["WebSocket", "long-poll"] {
                if let Some(n) = notes
                    .iter()
                    .find(|n| n.transport == transport && n.message["method"] == name)
                {
                    let _ = writeln!(out, "Example over {transport}:\n");
                    block(&mut out, &[("←", ph.apply(&n.message))]);
                } else {
                    panic!("{name}: no notification recorded over {transport}");
                }
            }
        }
    }

    out.push_str("## Long-poll: a poll's answer\n\n`GET /lp/{session}?cursor=N` answers the notifications with `seq > N`; the next poll sends the returned `cursor`.\n\n");
    let poll = polls.first().expect("a poll answered a notification");
    block(&mut out, &[("←", ph.apply(poll))]);

    out.push_str("## Errors\n\nApplication errors carry a stable `data.reason`; clients match on it. Each was provoked from a real server.\n\n");
    out.push_str("| code | reason | message |\n|---|---|---|\n");
    for (key, e) in errors {
        let _ = writeln!(
            out,
            "| {} | [`{key}`](#{}) | {} |",
            e["code"],
            key.to_lowercase(),
            e["message"].as_str().unwrap_or("")
        );
    }
    out.push_str("| -32601 | [`METHOD_NOT_FOUND`](#method_not_found) | Method not found |\n\n");
    let mut recorded = BTreeSet::new();
    let mut keys: Vec<String> = errors.keys().cloned().collect();
    keys.push("METHOD_NOT_FOUND".to_owned());
    for key in keys {
        let _ = writeln!(out, "### {key}\n");
        if let Some(description) = errors
            .get(&key)
            .and_then(|e| e["x-data-schema"]["description"].as_str())
        {
            let _ = writeln!(out, "{description}\n");
        }
        let example = ["WebSocket", "long-poll", "/rpc"].iter().find_map(|t| {
            calls.iter().find(|c| {
                c.transport == *t && reason_of(&c.response).as_deref() == Some(key.as_str())
            })
        });
        match example {
            Some(c) => {
                recorded.insert(key.clone());
                let _ = writeln!(
                    out,
                    "Recorded over {} (`{}`):\n",
                    c.transport,
                    c.request["method"].as_str().unwrap_or("")
                );
                block(
                    &mut out,
                    &[("→", ph.apply(&c.request)), ("←", ph.apply(&c.response))],
                );
            }
            None => {
                assert!(
                    NOT_RECORDED.contains(&key.as_str()),
                    "no {key} was recorded"
                );
                out.push_str("Not recorded: it needs the storage to be down (the outage tests in `tests/api/` provoke it). Its `data` is `{\"reason\": \"UNAVAILABLE\"}`; nothing was changed.\n\n");
            }
        }
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}
