//! `spawn_app`: the real server on port 0, on SQLite or on a fresh PostgreSQL database,
//! and typed clients that speak to it over real WebSocket and HTTP.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::Connection;
use ticket_api::app::App;
use ticket_api::config::{DatabaseUrl, Settings};
use ticket_api::core::{Role, User, UserId};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::recorder;

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret!";
const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A running server and what a test needs to reach it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub http: reqwest::Client,
    server: Option<tokio::task::JoinHandle<()>>,
    _data_dir: tempfile::TempDir,
}

/// Whether tests must fail, rather than skip, when PostgreSQL or Redis is missing.
fn services_required() -> bool {
    std::env::var("TICKET_API_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// A fresh PostgreSQL database for one test, or `None` (loudly) when there is no server.
async fn create_postgres_database() -> Option<(String, String)> {
    let mut admin = match sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
        Ok(conn) => conn,
        Err(error) => {
            if services_required() {
                panic!("PostgreSQL is required (TICKET_API_REQUIRE_SERVICES=1) but unreachable: {error}");
            }
            eprintln!("\n*** SKIPPED: PostgreSQL at 127.0.0.1:5432 is unreachable ({error}) ***\n");
            return None;
        }
    };
    let name = format!(
        "ticket_api_test_{}_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create test database");
    Some((
        name.clone(),
        format!("postgres://postgres@127.0.0.1:5432/{name}"),
    ))
}

async fn drop_postgres_database(name: &str) {
    if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// Settings for a test server; `tweak` adjusts them before start.
pub fn test_settings(data_dir: &std::path::Path) -> Settings {
    let mut settings = Settings::defaults();
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.data_dir = data_dir.to_path_buf();
    settings.jwt_secret = Some(JWT_SECRET.to_owned());
    settings.database_url = None;
    settings.redis_url = None;
    settings.demo = false;
    settings
}

/// Runs `test` against a fresh server on `backend`, then shuts the server down and drops
/// its database, whether the test passed or not.
pub async fn with_app<F, Fut>(backend: Backend, tweak: impl FnOnce(&mut Settings), test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()>,
{
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(data_dir.path());
    let mut pg_name = None;
    match backend {
        Backend::Sqlite => {}
        Backend::Postgres => match create_postgres_database().await {
            Some((name, url)) => {
                settings.database_url = Some(DatabaseUrl::Postgres(url));
                pg_name = Some(name);
            }
            None => return,
        },
    }
    tweak(&mut settings);
    let mut app = spawn_app(settings, data_dir).await;
    let server = app.server.take().expect("a fresh app has its server");
    let shutdown = app.app.shutdown.clone();
    let outcome = AssertUnwindSafe(test(app)).catch_unwind().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
    if let Some(name) = pg_name {
        drop_postgres_database(&name).await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

pub async fn spawn_app(settings: Settings, data_dir: tempfile::TempDir) -> TestApp {
    let listener = ticket_api::server::bind(settings.listen).unwrap();
    let addr = listener.local_addr().unwrap();
    let app = App::start(settings).await.expect("app starts");
    let server = tokio::spawn({
        let app = Arc::clone(&app);
        async move {
            ticket_api::server::run(listener, app).await.unwrap();
        }
    });
    TestApp {
        addr,
        app,
        http: reqwest::Client::new(),
        server: Some(server),
        _data_dir: data_dir,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

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
        let text = response.text().await.unwrap();
        // Not every answer is JSON (a 413 is plain text): keep such a body as a string.
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
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

    pub async fn ws(&self) -> WsClient {
        WsClient::connect(&format!("ws://{}/ws", self.addr))
            .await
            .unwrap()
    }

    /// Creates a user directly in storage (for admins, which cannot register).
    pub async fn create_user(&self, email: &str, password: &str, role: Role) -> User {
        let user = User {
            id: UserId::new(),
            email: email.to_owned(),
            role,
        };
        let hash = self.app.passwords.hash(password.to_owned()).await.unwrap();
        self.app
            .store
            .insert_user(&user, &hash, self.app.clock.now())
            .await
            .unwrap();
        user
    }

    /// An admin's token.
    pub async fn admin_token(&self) -> String {
        let email = format!("admin-{}@example.com", UserId::new());
        self.create_user(&email, "admin-password", Role::Admin)
            .await;
        let response = self
            .rpc(
                "auth.login",
                json!({"email": email, "password": "admin-password"}),
                None,
            )
            .await;
        response["result"]["token"].as_str().unwrap().to_owned()
    }

    /// Registers a new customer and returns their token.
    pub async fn customer_token(&self) -> String {
        let email = format!("buyer-{}@example.com", UserId::new());
        let response = self
            .rpc(
                "auth.register",
                json!({"email": email, "password": "buyer-password"}),
                None,
            )
            .await;
        response["result"]["token"].as_str().unwrap().to_owned()
    }

    /// Creates an event through `admin.events.create` and returns it.
    pub async fn create_event(&self, admin_token: &str, params: Value) -> Value {
        let response = self
            .rpc("admin.events.create", params, Some(admin_token))
            .await;
        assert!(response["error"].is_null(), "{response}");
        response["result"].clone()
    }
}

/// Event params with one ticket type of the given capacity and rule.
pub fn event_params(name: &str, capacity: u32, rule: Value) -> Value {
    json!({
        "name": name,
        "starts_at": "2027-05-01T19:30:00Z",
        "venue": "Test Hall",
        "ticket_types": [{"name": "Standard", "price": {"amount": 2500, "currency": "EUR"}, "capacity": capacity, "rule": rule}]
    })
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

    /// One call that must succeed; returns its result.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let response = self.call(method, params).await;
        assert!(response["error"].is_null(), "{method} failed: {response}");
        response["result"].clone()
    }
}

/// The `data.reason` of an error response.
pub fn reason(response: &Value) -> &str {
    response["error"]["data"]["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("not an application error: {response}"))
}

/// Defines each test twice: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($( $(#[$meta:meta])* async fn $name:ident($app:ident) $body:block )*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $( $(#[$meta])* #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::harness::with_app($crate::harness::Backend::Sqlite, |_| {}, |$app| async move $body).await;
            } )*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $( $(#[$meta])* #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::harness::with_app($crate::harness::Backend::Postgres, |_| {}, |$app| async move $body).await;
            } )*
        }
    };
}

/// Like [`backend_tests!`], with the settings adjusted by `$tweak` (a closure taking
/// `&mut Settings`) before each server starts.
#[macro_export]
macro_rules! backend_tests_with {
    ($tweak:expr; $( $(#[$meta:meta])* async fn $name:ident($app:ident) $body:block )*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $( $(#[$meta])* #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::harness::with_app($crate::harness::Backend::Sqlite, $tweak, |$app| async move $body).await;
            } )*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $( $(#[$meta])* #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::harness::with_app($crate::harness::Backend::Postgres, $tweak, |$app| async move $body).await;
            } )*
        }
    };
}

/// A fresh PostgreSQL database `(name, url)` for a test that runs its own server process, or
/// `None` (skipped loudly, or a panic under `TICKET_API_REQUIRE_SERVICES=1`).
pub async fn fresh_postgres_database() -> Option<(String, String)> {
    create_postgres_database().await
}

/// Drops a database made by [`fresh_postgres_database`].
pub async fn remove_postgres_database(name: &str) {
    drop_postgres_database(name).await;
}

/// Polls `check` until it returns `Some`, failing with `what` after `within`.
pub async fn poll_until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestApp {
    /// A user stored directly (no password hashing) and a token minted for them: the
    /// fastest way to get many logged-in users. Returns `(user id, token)`.
    async fn quick_user(&self, role: Role) -> (String, String) {
        let user = User {
            id: UserId::new(),
            email: format!("quick-{}-{}@example.com", role.as_str(), UserId::new()),
            role,
        };
        let now = self.app.clock.now();
        self.app
            .store
            .insert_user(&user, "not-a-password-hash", now)
            .await
            .unwrap();
        let (token, _) = self.app.tokens.issue(user.id, role, now);
        (user.id.to_string(), token)
    }

    /// A customer made by [`TestApp::quick_user`]: `(user id, token)`.
    pub async fn quick_customer(&self) -> (String, String) {
        self.quick_user(Role::Customer).await
    }

    /// An admin made by [`TestApp::quick_user`]: the token.
    pub async fn quick_admin(&self) -> String {
        self.quick_user(Role::Admin).await.1
    }

    /// A WebSocket bound to the token's user at connect (`?token=`).
    pub async fn ws_as(&self, token: &str) -> WsClient {
        WsClient::connect(&format!("ws://{}/ws?token={token}", self.addr))
            .await
            .unwrap()
    }

    /// `events.get` over `/rpc`; the event.
    pub async fn event(&self, event_id: &Value) -> Value {
        let response = self
            .rpc("events.get", json!({"event_id": event_id}), None)
            .await;
        assert!(response["error"].is_null(), "{response}");
        response["result"].clone()
    }

    /// `(available, version)` of the ticket type at `index` of the event, per `events.get`.
    pub async fn pool(&self, event_id: &Value, index: usize) -> (u64, u64) {
        let event = self.event(event_id).await;
        let ticket_type = &event["ticket_types"][index];
        (
            ticket_type["available"].as_u64().unwrap(),
            ticket_type["version"].as_u64().unwrap(),
        )
    }
}

/// Event params with one ticket type per `(capacity, rule)`, named `T0`, `T1`, … and priced
/// 25.00, 26.00, … EUR.
pub fn event_with_types(name: &str, types: &[(u32, Value)]) -> Value {
    let ticket_types: Vec<Value> = types
        .iter()
        .enumerate()
        .map(|(i, (capacity, rule))| {
            json!({
                "name": format!("T{i}"),
                "price": {"amount": 2500 + 100 * i as i64, "currency": "EUR"},
                "capacity": capacity,
                "rule": rule,
            })
        })
        .collect();
    json!({
        "name": name,
        "starts_at": "2027-05-01T19:30:00Z",
        "venue": "Test Hall",
        "ticket_types": ticket_types,
    })
}

impl TestApp {
    /// Creates an event with one ticket type per `(capacity, rule)` (see [`event_with_types`]);
    /// returns the event id and the ticket type ids in order.
    pub async fn create_pools(
        &self,
        admin_token: &str,
        types: &[(u32, Value)],
    ) -> (Value, Vec<Value>) {
        let event = self
            .create_event(admin_token, event_with_types("Pools", types))
            .await;
        let ids = event["ticket_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tt| tt["id"].clone())
            .collect();
        (event["id"].clone(), ids)
    }

    /// One call over `/rpc` as the token's user; the whole response.
    pub async fn call_as(&self, token: &str, method: &str, params: Value) -> Value {
        self.rpc(method, params, Some(token)).await
    }

    /// One call over `/rpc` as the token's user that must succeed; its result.
    pub async fn ok_as(&self, token: &str, method: &str, params: Value) -> Value {
        let response = self.call_as(token, method, params).await;
        assert!(response["error"].is_null(), "{method} failed: {response}");
        response["result"].clone()
    }
}

/// Asserts an application error with this code and `data.reason`.
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

/// Asserts the shape of a `Reservation` (PROTOCOL §5): exactly its fields, money objects,
/// items with positive quantities, `total` = Σ `unit_price` × `quantity`.
#[track_caller]
pub fn assert_reservation_shape(reservation: &Value) {
    let object = reservation
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {reservation}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
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
        let mut keys: Vec<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
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

// =========================================================================================
// Transport-agnostic clients (tests/api/transports.rs, tests/api/longpoll.rs): the same
// calls, responses and notifications over a WebSocket or a long-poll session (PROTOCOL §2).
// =========================================================================================

/// How a [`Client`] reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    LongPoll,
}

/// How long a [`Client`] waits for a response or a notification before the test fails.
pub const CLIENT_WAIT: Duration = Duration::from_secs(10);

/// The status and body of an HTTP answer: JSON parsed, any other text kept as a string,
/// an empty body as `Null`.
pub async fn status_and_body(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, parse_body(response.text().await.unwrap()))
}

/// A body as JSON; any other text as a string; an empty body as `Null`.
fn parse_body(text: String) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
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
                let _ = ws.socket.close(None).await;
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

    /// A long-poll session (`POST /lp`, 201), bound to the token's user when one is given.
    pub async fn long_poll(&self, token: Option<&str>) -> LongPollClient {
        LongPollClient::open(&self.http, &self.url(""), token).await
    }

    /// `POST /lp` with an optional Bearer token: the status and body, unchecked.
    pub async fn open_long_poll_raw(&self, token: Option<&str>) -> (u16, Value) {
        open_long_poll_raw(&self.http, &self.url(""), token).await
    }
}

// ============================ end of the transport-agnostic clients ======================

/// The shared Redis the expiry tests use.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Whether Redis answers `PING` at `addr` (`host:port`) within a second.
pub async fn redis_answers(addr: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ping = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream
            .write_all(b"PING\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = [0u8; 7];
        stream
            .read_exact(&mut reply)
            .await
            .map_err(|e| e.to_string())?;
        if &reply == b"+PONG\r\n" {
            Ok(())
        } else {
            Err(format!(
                "unexpected reply {:?}",
                String::from_utf8_lossy(&reply)
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(1), ping)
        .await
        .unwrap_or_else(|_| Err("no answer within 1 s".to_owned()))
}

/// Whether the shared Redis at 127.0.0.1:6379 is there; when it is not, the test is
/// skipped loudly, or fails under `TICKET_API_REQUIRE_SERVICES=1`.
pub async fn redis_available() -> bool {
    match redis_answers("127.0.0.1:6379").await {
        Ok(()) => true,
        Err(error) => {
            if services_required() {
                panic!(
                    "Redis is required (TICKET_API_REQUIRE_SERVICES=1) but unreachable: {error}"
                );
            }
            eprintln!("\n*** SKIPPED: Redis at 127.0.0.1:6379 is unreachable ({error}) ***\n");
            false
        }
    }
}

/// Whether a `redis-server` binary is on the PATH (for tests that run their own); when it
/// is not, the test is skipped loudly, or fails under `TICKET_API_REQUIRE_SERVICES=1`.
pub fn redis_server_binary_available() -> bool {
    match std::process::Command::new("redis-server")
        .arg("--version")
        .output()
    {
        Ok(output) if output.status.success() => true,
        outcome => {
            if services_required() {
                panic!("redis-server is required (TICKET_API_REQUIRE_SERVICES=1) but cannot run: {outcome:?}");
            }
            eprintln!("\n*** SKIPPED: no runnable redis-server on the PATH ({outcome:?}) ***\n");
            false
        }
    }
}
