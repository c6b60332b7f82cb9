//! A client over either transport (tests/api/transports.rs, tests/api/longpoll.rs): the
//! same calls, responses and notifications over a WebSocket or a long-poll session
//! (PROTOCOL §2). It sends and receives only through the WebSocket and long-poll clients.

use std::time::Duration;

use serde_json::{json, Value};

use super::{LongPollClient, TestApp, WsClient};

/// How a [`Client`] reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    LongPoll,
}

/// How long a [`Client`] waits for a response or a notification before the test fails.
pub const CLIENT_WAIT: Duration = Duration::from_secs(10);

/// A client over either transport, with the same calls and the same assertions.
pub enum Client {
    Ws(Box<WsClient>),
    LongPoll(LongPollClient),
}

impl Client {
    /// One call; returns the whole response object.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        match self {
            Self::Ws(ws) => tokio::time::timeout(CLIENT_WAIT, ws.call(method, params))
                .await
                .unwrap_or_else(|_| panic!("no response to {method} within {CLIENT_WAIT:?}")),
            Self::LongPoll(lp) => lp.call(method, params).await,
        }
    }

    /// One call that must succeed; returns its result.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let response = self.call(method, params).await;
        assert!(response["error"].is_null(), "{method} failed: {response}");
        response["result"].clone()
    }

    /// The next server notification of `method`, waiting at most [`CLIENT_WAIT`];
    /// notifications of other methods that arrive meanwhile are kept aside.
    pub async fn notification(&mut self, method: &str) -> Value {
        match self {
            Self::Ws(ws) => tokio::time::timeout(CLIENT_WAIT, ws.notification(method))
                .await
                .unwrap_or_else(|_| panic!("no {method} within {CLIENT_WAIT:?}")),
            Self::LongPoll(lp) => lp.notification(method).await,
        }
    }

    /// Asserts that no notification arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        match self {
            Self::Ws(ws) => ws.expect_silence(wait).await,
            Self::LongPoll(lp) => lp.expect_silence(wait).await,
        }
    }

    /// Notifications received and kept aside, not yet taken.
    pub fn kept_aside(&self) -> &[Value] {
        match self {
            Self::Ws(ws) => &ws.notifications,
            Self::LongPoll(lp) => &lp.notifications,
        }
    }

    /// Sends one raw message (any text: a batch, broken JSON, …) and returns its answer, or
    /// `None` when nothing is owed (long-poll: 204; WebSocket: a marker call sent after it
    /// is answered first).
    pub async fn raw(&mut self, text: &str) -> Option<Value> {
        match self {
            Self::LongPoll(lp) => {
                let (status, body) = lp.post_raw(text.to_owned()).await;
                match status {
                    200 => Some(body),
                    204 => {
                        assert_eq!(body, Value::Null, "a 204 has no body");
                        None
                    }
                    other => panic!("POST {} answered {other}: {body}", lp.url()),
                }
            }
            Self::Ws(ws) => {
                let marker = json!("harness-marker");
                ws.send_text(text).await;
                ws.send_text(
                    json!({"jsonrpc": "2.0", "id": marker, "method": "harness.marker"}).to_string(),
                )
                .await;
                let mut answer = None;
                loop {
                    let message = ws.next_text().await.expect("connection closed");
                    if message.get("method").is_some() {
                        ws.notifications.push(message);
                    } else if message.get("id") == Some(&marker) {
                        assert_eq!(message["error"]["code"], -32601, "{message}");
                        return answer;
                    } else {
                        assert!(answer.is_none(), "two answers to one message: {message}");
                        answer = Some(message);
                    }
                }
            }
        }
    }

    /// Ends the conversation: closes the WebSocket, or deletes the session (204).
    pub async fn close(self) {
        match self {
            Self::Ws(mut ws) => {
                ws.close().await;
            }
            Self::LongPoll(lp) => lp.close().await,
        }
    }
}

impl TestApp {
    /// A client over `transport`, bound to the token's user at connect when one is given
    /// (WebSocket `?token=`, long-poll `POST /lp` with a Bearer token).
    pub async fn client(&self, transport: Transport, token: Option<&str>) -> Client {
        match transport {
            Transport::WebSocket => Client::Ws(Box::new(match token {
                Some(token) => self.ws_as(token).await,
                None => self.ws().await,
            })),
            Transport::LongPoll => Client::LongPoll(self.long_poll(token).await),
        }
    }
}
