//! A small JSON-RPC 2.0 client: one-shot calls over `POST /rpc`, and closed-loop calls
//! (one call in flight at a time) over a WebSocket at `GET /ws`.
//!
//! Every target is a loopback address: [`Target::parse`] refuses anything else.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Url;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket to the server.
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Small buffers for many mostly idle connections (the library's defaults are 128 KiB
/// each way per connection).
pub fn light_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// The server under test: a base URL whose host is a loopback address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    base: Url,
}

impl Target {
    /// Accepts `http://HOST[:PORT]` (or `ws://…`) where HOST is in 127.0.0.0/8, `localhost`
    /// or `[::1]`. Any path is ignored: the routes `/rpc`, `/ws`, `/health` and `/metrics`
    /// are taken from the root.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
        let scheme = match url.scheme() {
            "http" | "ws" => "http",
            other => return Err(format!("scheme {other}:// not supported (use http://)")),
        };
        let host = url.host_str().ok_or("the URL has no host")?;
        if !is_loopback_host(host) {
            return Err(format!(
                "host {host} is not a loopback address (allowed: 127.0.0.0/8, localhost, [::1])"
            ));
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let base = Url::parse(&format!("{scheme}://{host}:{port}/"))
            .map_err(|e| format!("not a URL: {e}"))?;
        Ok(Self { base })
    }

    /// `http://host:port/<path>`.
    pub fn http(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(path);
        url
    }

    /// `ws://host:port/ws`, with `?token=…` when given.
    pub fn ws(&self, token: Option<&str>) -> Url {
        let mut url = self.base.clone();
        url.set_scheme("ws").expect("http → ws");
        url.set_path("/ws");
        if let Some(token) = token {
            url.query_pairs_mut().append_pair("token", token);
        }
        url
    }

    /// The socket address to connect to: the host as an IP address (`localhost` is
    /// 127.0.0.1) and the port.
    pub fn socket_addr(&self) -> SocketAddr {
        let host = self.base.host_str().unwrap_or("127.0.0.1");
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        SocketAddr::new(ip, self.base.port_or_known_default().unwrap_or(80))
    }

    /// `host:port`, for a raw TCP connection.
    pub fn authority(&self) -> String {
        format!(
            "{}:{}",
            self.base.host_str().unwrap_or("127.0.0.1"),
            self.base.port_or_known_default().unwrap_or(80)
        )
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.base.as_str().trim_end_matches('/'))
    }
}

fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => ip.is_loopback(),
        Err(_) => false,
    }
}

/// Most loopback source addresses connections can be spread over (127.0.0.1 …
/// 127.0.0.254).
pub const MAX_SOURCE_ADDRESSES: u32 = 254;

/// The source address of connection `slot` when connections are spread over `count`
/// loopback addresses, 127.0.0.1 … 127.0.0.`count`, round robin; `None` (the kernel
/// chooses, as for any connect) when `count` is 1. Each source address has its own range
/// of ephemeral ports (`net.ipv4.ip_local_port_range`, ~28,000 by default): a connection
/// bound before it connects takes a port of that range for good, so tens of thousands of
/// connections need several addresses.
pub fn source_address(slot: usize, count: u32) -> Option<IpAddr> {
    if count <= 1 {
        return None;
    }
    let host = 1 + (slot % count.min(MAX_SOURCE_ADDRESSES) as usize) as u8;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
}

/// Refuses `--source-addresses` the targets cannot take: more than 254, or more than one
/// with a target that is not an IPv4 address (an IPv4 source cannot reach `[::1]`).
pub fn check_source_addresses(count: u32, targets: &[&Target]) -> Result<(), String> {
    if count == 0 || count > MAX_SOURCE_ADDRESSES {
        return Err(format!(
            "--source-addresses {count}: from 1 to {MAX_SOURCE_ADDRESSES}"
        ));
    }
    if count > 1 {
        if let Some(t) = targets.iter().find(|t| !t.socket_addr().is_ipv4()) {
            return Err(format!(
                "--source-addresses {count} binds 127.0.0.x, which cannot reach {t}: use an IPv4 loopback URL"
            ));
        }
    }
    Ok(())
}

/// A TCP socket of `addr`'s family, bound to `source` (any port), not yet connected.
fn bound_socket(addr: SocketAddr, source: IpAddr) -> Result<TcpSocket, String> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    Ok(socket)
}

/// Opens a WebSocket at `url` (a [`Target::ws`] URL of `target`), bound first to `source`
/// when given (see [`source_address`]), Nagle off.
pub async fn connect_ws_from(
    target: &Target,
    url: &Url,
    source: Option<IpAddr>,
    config: Option<WebSocketConfig>,
) -> Result<WsStream, String> {
    let Some(source) = source else {
        return WsRpc::connect_with(url, config)
            .await
            .map(WsRpc::into_stream);
    };
    let addr = target.socket_addr();
    let stream = bound_socket(addr, source)?
        .connect(addr)
        .await
        .map_err(|e| format!("connect {addr} from {source}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url.as_str(),
        MaybeTlsStream::Plain(stream),
        config,
    )
    .await
    .map_err(|e| format!("connect {} from {source}: {e}", redact(url)))?;
    Ok(ws)
}

/// A JSON-RPC error object as answered by the server.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    fn from_value(value: &Value) -> Self {
        Self {
            code: value.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: value
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            data: value.get("data").cloned(),
        }
    }

    /// `data.reason` when the server gave one, else a name for the standard code.
    pub fn reason(&self) -> String {
        if let Some(reason) = self
            .data
            .as_ref()
            .and_then(|d| d.get("reason"))
            .and_then(Value::as_str)
        {
            return reason.to_owned();
        }
        match self.code {
            -32700 => "PARSE_ERROR(-32700)".to_owned(),
            -32600 => "INVALID_REQUEST(-32600)".to_owned(),
            -32601 => "METHOD_NOT_FOUND(-32601)".to_owned(),
            -32602 => "INVALID_PARAMS(-32602)".to_owned(),
            -32603 => "INTERNAL_ERROR(-32603)".to_owned(),
            code => format!("CODE({code})"),
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason(), self.message)
    }
}

/// Why a call has no result.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The server answered with an error object.
    Rpc(RpcError),
    /// No usable answer: connection refused or lost, timeout, malformed response.
    /// The call may or may not have taken effect.
    Transport(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rpc(e) => write!(f, "{e}"),
            Self::Transport(e) => write!(f, "transport: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Turns one response object into a result, checking it answers `id`.
fn parse_response(response: &Value, id: u64) -> Result<Value, CallError> {
    if response.get("id").and_then(Value::as_u64) != Some(id) {
        return Err(CallError::Transport(format!(
            "response for another id: {response}"
        )));
    }
    if let Some(error) = response.get("error") {
        return Err(CallError::Rpc(RpcError::from_value(error)));
    }
    response
        .get("result")
        .cloned()
        .ok_or_else(|| CallError::Transport(format!("neither result nor error: {response}")))
}

fn request(id: u64, method: &str, params: &Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// One-shot JSON-RPC over `POST /rpc`.
#[derive(Debug, Clone)]
pub struct HttpRpc {
    client: reqwest::Client,
    target: Target,
}

impl HttpRpc {
    pub fn new(target: Target, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()
            .expect("HTTP client");
        Self { client, target }
    }

    /// The server this client talks to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    pub async fn call(
        &self,
        method: &str,
        params: Value,
        token: Option<&str>,
    ) -> Result<Value, CallError> {
        let mut builder = self
            .client
            .post(self.target.http("/rpc"))
            .json(&request(1, method, &params));
        if let Some(token) = token {
            builder = builder.bearer_auth(token);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| CallError::Transport(format!("POST /rpc {method}: {e}")))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(CallError::Transport(format!(
                "POST /rpc {method}: HTTP {status}"
            )));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|e| CallError::Transport(format!("POST /rpc {method}: {e}")))?;
        parse_response(&body, 1)
    }

    /// `GET <path>` as text (for `/health` and `/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String, String> {
        let response = self
            .client
            .get(self.target.http(path))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if !status.is_success() {
            return Err(format!("GET {path}: HTTP {status}: {text}"));
        }
        Ok(text)
    }

    /// `POST /lp`: opens a long-poll session (no login) and returns its id.
    pub async fn open_long_poll(&self) -> Result<String, String> {
        let response = self
            .client
            .post(self.target.http("/lp"))
            .send()
            .await
            .map_err(|e| format!("POST /lp: {e}"))?;
        let status = response.status();
        if status != reqwest::StatusCode::CREATED {
            let text = response.text().await.unwrap_or_default();
            return Err(format!("POST /lp: HTTP {status}: {text}"));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("POST /lp: {e}"))?;
        body.get("session")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("POST /lp: no session in {body}"))
    }

    /// `DELETE /lp/{session}`; an already expired session (410) counts as closed.
    pub async fn close_long_poll(&self, session: &str) -> Result<(), String> {
        let response = self
            .client
            .delete(self.target.http(&format!("/lp/{session}")))
            .send()
            .await
            .map_err(|e| format!("DELETE /lp/…: {e}"))?;
        match response.status() {
            reqwest::StatusCode::NO_CONTENT | reqwest::StatusCode::GONE => Ok(()),
            status => Err(format!("DELETE /lp/…: HTTP {status}")),
        }
    }
}

/// Sends `GET /lp/{session}?cursor=0` on a connection of its own and returns that
/// connection without reading the answer: the poll stays pending on the server (up to its
/// poll timeout) for as long as the connection is held.
pub async fn pending_long_poll(
    target: &Target,
    session: &str,
    source: Option<IpAddr>,
) -> Result<TcpStream, String> {
    let authority = target.authority();
    let mut stream = match source {
        None => TcpStream::connect(&authority).await,
        Some(source) => {
            let addr = target.socket_addr();
            bound_socket(addr, source)?.connect(addr).await
        }
    }
    .map_err(|e| format!("connect {authority}: {e}"))?;
    let request =
        format!("GET /lp/{session}?cursor=0 HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("GET /lp/…: {e}"))?;
    Ok(stream)
}

/// JSON-RPC over one WebSocket, one call at a time. Server notifications arriving while a
/// call waits are skipped.
pub struct WsRpc {
    stream: WsStream,
    next_id: u64,
}

impl WsRpc {
    /// Opens `ws://…/ws?token=…`. The caller bounds the time with a timeout.
    pub async fn connect(url: &Url) -> Result<Self, String> {
        Self::connect_with(url, None).await
    }

    /// As [`WsRpc::connect_with`], bound first to `source` (see [`connect_ws_from`]).
    pub async fn connect_from(
        target: &Target,
        url: &Url,
        source: Option<IpAddr>,
        config: Option<WebSocketConfig>,
    ) -> Result<Self, String> {
        let stream = connect_ws_from(target, url, source, config).await?;
        Ok(Self { stream, next_id: 1 })
    }

    /// As [`WsRpc::connect`], with a WebSocket configuration (e.g. [`light_ws_config`]).
    pub async fn connect_with(url: &Url, config: Option<WebSocketConfig>) -> Result<Self, String> {
        // Nagle off: one small frame at a time, closed-loop.
        let (stream, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), config, true)
            .await
            .map_err(|e| format!("connect {}: {e}", redact(url)))?;
        Ok(Self { stream, next_id: 1 })
    }

    /// The WebSocket itself, e.g. to read notifications after a `pool.subscribe`.
    pub fn into_stream(self) -> WsStream {
        self.stream
    }

    /// Sends one request and waits for its response. The caller bounds the time with a
    /// timeout; after a transport error (or a timeout) the connection is not to be reused.
    pub async fn call(&mut self, method: &str, params: &Value) -> Result<Value, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let text = request(id, method, params).to_string();
        self.stream
            .send(Message::text(text))
            .await
            .map_err(|e| CallError::Transport(format!("send: {e}")))?;
        loop {
            let message = match self.stream.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(CallError::Transport(format!("receive: {e}"))),
                None => return Err(CallError::Transport("connection closed".to_owned())),
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(frame) => {
                    return Err(CallError::Transport(match frame {
                        Some(frame) => format!("closed by server: {} {}", frame.code, frame.reason),
                        None => "closed by server".to_owned(),
                    }))
                }
                // Pings are answered by the library; nothing else is expected.
                _ => continue,
            };
            let value: Value = serde_json::from_str(text.as_str())
                .map_err(|e| CallError::Transport(format!("malformed frame: {e}")))?;
            if value.get("id").is_none() && value.get("method").is_some() {
                continue; // a notification
            }
            return parse_response(&value, id);
        }
    }

    /// Sends the frame [`WsRpc::call`] would send and waits for the same text to come
    /// back (an echo server): the transport's cost for the same message size.
    pub async fn echo(&mut self, method: &str, params: &Value) -> Result<(), CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let text = request(id, method, params).to_string();
        self.stream
            .send(Message::text(text.clone()))
            .await
            .map_err(|e| CallError::Transport(format!("send: {e}")))?;
        loop {
            match self.stream.next().await {
                Some(Ok(Message::Text(echoed))) if echoed.as_str() == text => return Ok(()),
                Some(Ok(Message::Text(other))) => {
                    return Err(CallError::Transport(format!(
                        "echo differs: sent {} bytes, got {}",
                        text.len(),
                        other.len()
                    )))
                }
                Some(Ok(Message::Close(_))) | None => {
                    return Err(CallError::Transport("connection closed".to_owned()))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(CallError::Transport(format!("receive: {e}"))),
            }
        }
    }

    /// Closes politely; errors are irrelevant at this point.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.close(None)).await;
    }
}

/// The URL without its query (which carries a token).
fn redact(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_are_accepted() {
        for ok in [
            "http://127.0.0.1:4000",
            "http://127.1.2.3:80/",
            "http://localhost:4000",
            "http://LOCALHOST",
            "http://[::1]:4000",
            "ws://127.0.0.1:4000/ws",
        ] {
            assert!(Target::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn other_targets_are_refused() {
        for bad in [
            "http://10.0.0.1:4000",
            "http://example.com",
            "http://128.0.0.1",
            "http://[::2]:4000",
            "http://[::ffff:8.8.8.8]:4000",
            "http://localhost.example.com",
            "https://127.0.0.1",
            "127.0.0.1:4000",
            "not a url",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_are_built_from_the_root() {
        let target = Target::parse("http://127.0.0.1:4000/ignored").unwrap();
        assert_eq!(target.http("/rpc").as_str(), "http://127.0.0.1:4000/rpc");
        assert_eq!(
            target.ws(Some("a.b.c")).as_str(),
            "ws://127.0.0.1:4000/ws?token=a.b.c"
        );
        assert_eq!(target.to_string(), "http://127.0.0.1:4000");
    }

    #[test]
    fn source_addresses_go_round_robin_over_127_0_0_x() {
        assert_eq!(source_address(0, 1), None);
        assert_eq!(source_address(5, 1), None);
        let ip = |d| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, d)));
        assert_eq!(source_address(0, 4), ip(1));
        assert_eq!(source_address(3, 4), ip(4));
        assert_eq!(source_address(4, 4), ip(1));
        assert_eq!(source_address(253, 254), ip(254));
        assert_eq!(source_address(254, 254), ip(1));
    }

    #[test]
    fn source_addresses_need_ipv4_targets_and_at_most_254() {
        let v4 = Target::parse("http://127.0.0.1:4000").unwrap();
        let named = Target::parse("http://localhost:4000").unwrap();
        let v6 = Target::parse("http://[::1]:4000").unwrap();
        assert!(check_source_addresses(8, &[&v4, &named]).is_ok());
        assert!(check_source_addresses(1, &[&v6]).is_ok());
        let e = check_source_addresses(2, &[&v4, &v6]).unwrap_err();
        assert!(e.contains("[::1]"), "{e}");
        assert!(check_source_addresses(0, &[&v4]).is_err());
        assert!(check_source_addresses(255, &[&v4]).is_err());
        assert_eq!(
            named.socket_addr(),
            "127.0.0.1:4000".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn reasons_fall_back_to_the_standard_codes() {
        let e = RpcError::from_value(&json!({"code": -32601, "message": "Method not found"}));
        assert_eq!(e.reason(), "METHOD_NOT_FOUND(-32601)");
        let e = RpcError::from_value(
            &json!({"code": 2001, "message": "x", "data": {"reason": "INSUFFICIENT_TICKETS"}}),
        );
        assert_eq!(e.reason(), "INSUFFICIENT_TICKETS");
    }
}
