//! The WebSocket client: the one place a WebSocket message is sent ([`WsClient::send_text`])
//! and received ([`WsClient::next_text`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::TestApp;
use crate::recorder;

impl TestApp {
    pub async fn ws(&self) -> WsClient {
        WsClient::connect(&format!("ws://{}/ws", self.addr))
            .await
            .unwrap()
    }

    /// A WebSocket bound to the token's user at connect (`?token=`).
    pub async fn ws_as(&self, token: &str) -> WsClient {
        WsClient::connect(&format!("ws://{}/ws?token={token}", self.addr))
            .await
            .unwrap()
    }
}

/// A JSON-RPC client over a real WebSocket.
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Names this connection in recordings.
    conn: String,
    next_id: u64,
    /// Notifications that arrived while waiting for a response.
    pub notifications: Vec<Value>,
}

/// How a WebSocket conversation ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The connection ended without a close frame.
    Abruptly,
}

const WS_WAIT: Duration = Duration::from_secs(10);

impl WsClient {
    pub async fn connect(url: &str) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let (socket, _) = tokio_tungstenite::connect_async(url).await?;
        static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
        Ok(Self {
            socket,
            conn: format!("ws-{}", CONNECTIONS.fetch_add(1, Ordering::Relaxed)),
            next_id: 1,
            notifications: Vec::new(),
        })
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text = text.into();
        recorder::frame("WebSocket", &self.conn, true, &text);
        self.socket.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.socket.send(Message::binary(bytes)).await.unwrap();
    }

    /// The next text message, or how the connection ended.
    pub async fn next_text(&mut self) -> Result<Value, Closed> {
        loop {
            let frame = tokio::time::timeout(WS_WAIT, self.socket.next())
                .await
                .expect("no message from the server within 10 s");
            match frame {
                Some(Ok(Message::Text(text))) => {
                    recorder::frame("WebSocket", &self.conn, false, &text);
                    return Ok(serde_json::from_str(&text).unwrap());
                }
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Err(Closed::Code(u16::from(frame.code)))
                }
                Some(Ok(Message::Close(None))) => {
                    return Err(Closed::Code(u16::from(CloseCode::Status)))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(Closed::Abruptly),
            }
        }
    }

    /// Waits for the response with this id, keeping notifications aside.
    pub async fn response(&mut self, id: &Value) -> Value {
        loop {
            let message = self
                .next_text()
                .await
                .expect("connection closed while waiting for a response");
            if message.get("id") == Some(id) && message.get("method").is_none() {
                return message;
            }
            self.notifications.push(message);
        }
    }

    /// One call; returns the whole response object.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = json!(self.next_id);
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_text(request.to_string()).await;
        self.response(&id).await
    }

    /// The next server notification of `method` (kept aside earlier, or arriving now).
    pub async fn notification(&mut self, method: &str) -> Value {
        if let Some(at) = self
            .notifications
            .iter()
            .position(|n| n["method"] == method)
        {
            return self.notifications.remove(at);
        }
        loop {
            let message = self
                .next_text()
                .await
                .expect("connection closed while waiting for a notification");
            if message["method"] == method {
                return message;
            }
            self.notifications.push(message);
        }
    }

    /// Asserts that nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(Some(Ok(message))) = tokio::time::timeout(wait, self.socket.next()).await {
            panic!("expected no message, got {message:?}");
        }
    }

    /// Closes the connection (a close frame; errors ignored, the server may be gone).
    pub async fn close(&mut self) {
        let _ = self.socket.close(None).await;
    }

    /// One call that must succeed; returns its result.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let response = self.call(method, params).await;
        assert!(response["error"].is_null(), "{method} failed: {response}");
        response["result"].clone()
    }
}
