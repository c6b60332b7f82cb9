//! The long-poll client: the one place a session's call is sent and answered
//! ([`LongPollClient::post_raw`]) and its notifications received ([`LongPollClient::get_within`]).

use std::time::Duration;

use serde_json::{json, Value};

use super::http::{parse_body, status_and_body};
use super::{TestApp, CLIENT_WAIT};
use crate::recorder;

impl TestApp {
    /// Long-poll sessions open on the server (its `open_connections{transport="longpoll"}`).
    pub fn long_poll_sessions(&self) -> usize {
        self.app.metrics.open_connections("longpoll") as usize
    }

    /// A long-poll session (`POST /lp`, 201), bound to the token's user when one is given.
    pub async fn long_poll(&self, token: Option<&str>) -> LongPollClient {
        LongPollClient::open(&self.http, &self.url(""), token).await
    }

    /// `POST /lp` with an optional Bearer token: the status and body, unchecked.
    pub async fn open_long_poll_raw(&self, token: Option<&str>) -> (u16, Value) {
        open_long_poll_raw(&self.http, &self.url(""), token).await
    }
}

/// `POST /lp` with an optional Bearer token: the status and body, unchecked.
pub async fn open_long_poll_raw(
    http: &reqwest::Client,
    base: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = http.post(format!("{base}/lp"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    status_and_body(request.send().await.unwrap()).await
}

/// A JSON-RPC client over a long-poll session: calls by `POST /lp/{session}`,
/// notifications by `GET /lp/{session}?cursor=N`, remembering the cursor and buffering
/// what arrives.
pub struct LongPollClient {
    http: reqwest::Client,
    /// `http://host:port`.
    base: String,
    pub session: String,
    pub poll_timeout_ms: u64,
    pub session_timeout_ms: u64,
    /// The cursor of the next poll: the `seq` of the last message taken.
    pub cursor: u64,
    next_id: u64,
    /// Notifications received and not yet taken by [`LongPollClient::notification`], in
    /// `seq` order.
    pub notifications: Vec<Value>,
}

impl LongPollClient {
    /// Opens a session (`POST /lp`, 201) on the server at `base` (`http://host:port`).
    pub async fn open(http: &reqwest::Client, base: &str, token: Option<&str>) -> Self {
        let (status, body) = open_long_poll_raw(http, base, token).await;
        assert_eq!(status, 201, "POST /lp: {body}");
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap_or_else(|| panic!("POST /lp answered {body}"))
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["poll_timeout_ms", "session", "session_timeout_ms"],
            "{body}"
        );
        Self {
            http: http.clone(),
            base: base.to_owned(),
            session: body["session"].as_str().expect("a session id").to_owned(),
            poll_timeout_ms: body["poll_timeout_ms"].as_u64().expect("poll_timeout_ms"),
            session_timeout_ms: body["session_timeout_ms"]
                .as_u64()
                .expect("session_timeout_ms"),
            cursor: 0,
            next_id: 1,
            notifications: Vec::new(),
        }
    }

    /// Another handle on the same session (for concurrent requests): the same cursor, no
    /// notifications kept aside.
    pub fn clone_handle(&self) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            session: self.session.clone(),
            poll_timeout_ms: self.poll_timeout_ms,
            session_timeout_ms: self.session_timeout_ms,
            cursor: self.cursor,
            next_id: self.next_id + 1_000_000,
            notifications: Vec::new(),
        }
    }

    /// `http://host:port/lp/{session}`.
    pub fn url(&self) -> String {
        format!("{}/lp/{}", self.base, self.session)
    }

    /// The longest a GET may take: the poll timeout and a margin.
    fn poll_deadline(&self) -> Duration {
        Duration::from_millis(self.poll_timeout_ms) + CLIENT_WAIT
    }

    /// `POST /lp/{session}` with a raw body: the status and body, unchecked.
    pub async fn post_raw(&self, body: impl Into<String>) -> (u16, Value) {
        let body = body.into();
        recorder::frame("long-poll", &self.session, true, &body);
        let response = self
            .http
            .post(self.url())
            .header("content-type", "application/json")
            .body(body)
            .timeout(CLIENT_WAIT)
            .send()
            .await
            .unwrap();
        let (status, answer) = status_and_body(response).await;
        if status == 200 {
            recorder::frame("long-poll", &self.session, false, &answer.to_string());
        }
        (status, answer)
    }

    /// `GET /lp/{session}?cursor=N`: the status and body, unchecked; the cursor is not moved.
    pub async fn get_raw(&self, cursor: u64) -> (u16, Value) {
        self.get_within(cursor, self.poll_deadline())
            .await
            .expect("the GET answers within the poll timeout")
    }

    /// Like [`LongPollClient::get_raw`], but gives up (and drops the request, as a client
    /// whose connection broke would) after `within`: `None` then.
    pub async fn get_within(&self, cursor: u64, within: Duration) -> Option<(u16, Value)> {
        let request = self
            .http
            .get(format!("{}?cursor={cursor}", self.url()))
            .timeout(within)
            .send();
        let response = match request.await {
            Ok(response) => response,
            Err(error) if error.is_timeout() => return None,
            Err(error) => panic!("GET {}: {error}", self.url()),
        };
        let status = response.status().as_u16();
        match response.text().await {
            Ok(text) => {
                recorder::frame("long-poll GET", &self.session, false, &text);
                Some((status, parse_body(text)))
            }
            Err(error) if error.is_timeout() => None,
            Err(error) => panic!("GET {}: {error}", self.url()),
        }
    }

    /// `DELETE /lp/{session}`: the status and body.
    pub async fn delete_raw(&self) -> (u16, Value) {
        let response = self
            .http
            .delete(self.url())
            .timeout(CLIENT_WAIT)
            .send()
            .await
            .unwrap();
        status_and_body(response).await
    }

    /// Closes the session (`DELETE`, 204).
    pub async fn close(&self) {
        let (status, body) = self.delete_raw().await;
        assert_eq!(status, 204, "DELETE {}: {body}", self.url());
    }

    /// One call; returns the whole response object.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = json!(self.next_id);
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let (status, response) = self.post_raw(request.to_string()).await;
        assert_eq!(status, 200, "{method}: {response}");
        assert_eq!(response["id"], id, "{response}");
        response
    }

    /// One call that must succeed; returns its result.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let response = self.call(method, params).await;
        assert!(response["error"].is_null(), "{method} failed: {response}");
        response["result"].clone()
    }

    /// Checks a poll answer against the cursor it was asked with: `{cursor, messages}`,
    /// seqs from `cursor + 1` up by one, the new cursor the last seq (or the old one).
    /// Returns the new cursor and the messages.
    #[track_caller]
    pub fn check_poll(cursor: u64, body: &Value) -> (u64, Vec<Value>) {
        let object = body
            .as_object()
            .unwrap_or_else(|| panic!("a poll answered {body}"));
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["cursor", "messages"], "{body}");
        let messages = body["messages"].as_array().expect("messages");
        let mut expected = cursor;
        let mut taken = Vec::with_capacity(messages.len());
        for entry in messages {
            expected += 1;
            assert_eq!(entry["seq"], json!(expected), "seqs go up by one: {body}");
            assert_eq!(entry["message"]["jsonrpc"], "2.0", "{body}");
            taken.push(entry["message"].clone());
        }
        assert_eq!(body["cursor"], json!(expected), "{body}");
        (expected, taken)
    }

    /// One GET with the current cursor, waiting at most `within`; buffers what it gets and
    /// moves the cursor. `None` when it gave up, else how many messages came.
    pub async fn poll_for(&mut self, within: Duration) -> Option<usize> {
        let (status, body) = self.get_within(self.cursor, within).await?;
        assert_eq!(status, 200, "GET {}: {body}", self.url());
        let (cursor, messages) = Self::check_poll(self.cursor, &body);
        self.cursor = cursor;
        let count = messages.len();
        self.notifications.extend(messages);
        Some(count)
    }

    /// The next notification of `method` (buffered earlier, or polled for now).
    pub async fn notification(&mut self, method: &str) -> Value {
        let deadline = tokio::time::Instant::now() + CLIENT_WAIT;
        loop {
            if let Some(at) = self
                .notifications
                .iter()
                .position(|n| n["method"] == method)
            {
                return self.notifications.remove(at);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "no {method} within {CLIENT_WAIT:?}; got {:?}",
                self.notifications
            );
            self.poll_for(left).await;
        }
    }

    /// Asserts that no notification arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        let before = self.notifications.len();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.poll_for(left).await {
                None | Some(0) => {}
                Some(_) => panic!(
                    "expected no notification, got {:?}",
                    &self.notifications[before..]
                ),
            }
        }
    }
}
