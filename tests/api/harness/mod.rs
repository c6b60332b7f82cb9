//! The test harness: a real server per test and clients that speak to it over real
//! WebSocket and HTTP.
//!
//! - [`server`]: start and stop a server ([`with_app`], [`spawn_app`], the test macros);
//! - [`services`]: PostgreSQL databases and Redis, skipped loudly when absent;
//! - [`http`], [`ws`], [`longpoll`]: one client per transport, each with one place where a
//!   request is sent and its answer received; [`client`]: either transport behind one type;
//! - [`calls`]: typed calls; [`fixtures`]: users and event params; [`assertions`].

pub mod assertions;
pub mod calls;
pub mod client;
pub mod fixtures;
pub mod http;
pub mod longpoll;
pub mod server;
pub mod services;
pub mod ws;

pub use assertions::*;
pub use client::*;
pub use fixtures::*;
pub use http::status_and_body;
pub use longpoll::*;
pub use server::*;
pub use services::*;
pub use ws::*;

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
