//! ticket-api: a realtime ticket-reservation server.
//!
//! A reservation travels `transport → rpc → core`, with storage and expiry behind ports:
//!
//! - [`transport`]: framing only. `GET /ws` (WebSocket), `POST /rpc` (one-shot HTTP), and
//!   the long-poll fallback at `/lp`.
//! - [`rpc`]: JSON-RPC 2.0 wire types, the one error mapping, the call context
//!   ([`rpc::Session`]) and one method table that every domain module registers into.
//! - [`core`]: the domain, free of I/O: catalog, selling rules, inventory and the
//!   reservation lifecycle.
//! - [`engine`]: the reservation lifecycle over the core, with the write-behind writer and
//!   the expiry, payment and notification ports.
//! - [`expiry`]: when pending reservations fall due: Redis key TTLs or an in-process timer.
//! - [`fanout`]: subscriptions, coalesced `pool.update`s and per-connection outboxes.
//! - [`store`]: PostgreSQL or SQLite through sqlx, and the group-commit writer.
//! - [`auth`]: Argon2id password hashes and HS256 JWTs.
//! - [`app`]: the wiring, the only place that knows the concrete implementations.
//! - [`server`]: routes, binding and graceful shutdown; [`server::run`] takes a bound
//!   listener so tests can bind port 0.

pub mod app;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod core;
pub mod demo;
pub mod engine;
pub mod exclusive;
pub mod expiry;
pub mod fanout;
pub mod metrics;
pub mod rpc;
pub mod server;
pub mod shapes;
pub mod store;
pub mod transport;
