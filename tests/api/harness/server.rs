//! Server start: a real server on port 0 per test, on SQLite or on a fresh PostgreSQL
//! database, shut down and cleaned up whether the test passed or not.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use ticket_api::app::App;
use ticket_api::config::{DatabaseUrl, Settings};
use ticket_api::expiry::timer::TokioClock;

use super::services::{fresh_postgres_database, remove_postgres_database};

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret!";

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
        Backend::Postgres => match fresh_postgres_database().await {
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
        remove_postgres_database(&name).await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

pub async fn spawn_app(settings: Settings, data_dir: tempfile::TempDir) -> TestApp {
    let listener = ticket_api::server::bind(settings.listen).unwrap();
    let addr = listener.local_addr().unwrap();
    let app = App::start_with_clock(settings, Arc::new(TokioClock::new()))
        .await
        .expect("app starts");
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
