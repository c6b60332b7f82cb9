//! Databases and Redis: a fresh PostgreSQL database per test, and whether the shared
//! PostgreSQL and Redis (or a `redis-server` binary) are there; a missing service skips the
//! test loudly, or fails it under `TICKET_API_REQUIRE_SERVICES=1`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::Connection;
use tokio::net::TcpStream;

const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Whether tests must fail, rather than skip, when PostgreSQL or Redis is missing.
fn services_required() -> bool {
    std::env::var("TICKET_API_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// A fresh PostgreSQL database `(name, url)` for one test, or `None` (skipped loudly, or a
/// panic under `TICKET_API_REQUIRE_SERVICES=1`) when there is no server.
pub async fn fresh_postgres_database() -> Option<(String, String)> {
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

/// Drops a database made by [`fresh_postgres_database`].
pub async fn remove_postgres_database(name: &str) {
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
