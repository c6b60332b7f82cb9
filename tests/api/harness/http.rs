//! The HTTP client of `/rpc`: the one place a `/rpc` call is sent and its answer received.

use serde_json::{json, Value};

use super::TestApp;
use crate::recorder;

impl TestApp {
    /// POSTs a raw body to `/rpc`; returns the status and the parsed body (Null when empty).
    pub async fn post_rpc_raw(
        &self,
        body: impl Into<reqwest::Body>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(self.url("/rpc"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        // Not every answer is JSON (a 413 is plain text): such a body is kept as a string.
        (status, parse_body(response.text().await.unwrap()))
    }

    /// One call over `/rpc`; returns the whole response object.
    pub async fn rpc(&self, method: &str, params: Value, token: Option<&str>) -> Value {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        recorder::frame("/rpc", "rpc", true, &body.to_string());
        let (status, response) = self.post_rpc_raw(body.to_string(), token).await;
        assert_eq!(status, 200, "{response}");
        recorder::frame("/rpc", "rpc", false, &response.to_string());
        response
    }

    /// One call over `/rpc` as the token's user that must succeed; its result.
    pub async fn ok_as(&self, token: &str, method: &str, params: Value) -> Value {
        let response = self.rpc(method, params, Some(token)).await;
        assert!(response["error"].is_null(), "{method} failed: {response}");
        response["result"].clone()
    }
}

/// The status and body of an HTTP answer: JSON parsed, any other text kept as a string,
/// an empty body as `Null`.
pub async fn status_and_body(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, parse_body(response.text().await.unwrap()))
}

/// A body as JSON; any other text as a string; an empty body as `Null`.
pub(super) fn parse_body(text: String) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }
}
