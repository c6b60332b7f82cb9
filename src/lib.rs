//! ticket-api: a realtime ticket-reservation server.
//!
//! A reservation travels `transport → rpc → engine → core`; storage, expiry and fan-out sit
//! below the engine, behind ports (small traits held as `Arc<dyn …>`). Each layer imports
//! only the layers under it:
//!
//! ```text
//! app, server, cli        wiring: the only place that knows the concrete implementations
//!   transport             ws | longpoll | http: framing only
//!     rpc                 wire types, dispatch, one method table over rpc::Services
//!       cluster           cluster mode: leases in Redis, forwarding to an event's owner
//!                         (a ReservationService), fan-out between servers
//!       auth, catalog     services behind ports (AccountService, CatalogService);
//!                         the catalog stores events through EventRecords
//!       engine            the reservation lifecycle (ReservationService) and recovery;
//!                         its ports: Commits, Records, RecoverySource, Expiry,
//!                         PaymentAdapter, Notifier, Clock
//!         fanout          subscriptions, coalesced pool.update, per-connection outboxes;
//!                         the Notifier port the engine announces changes through
//!         expiry          Redis TTLs | in-process timer, the sweeper
//!         store           PostgreSQL | SQLite, the group-commit writer
//!         shapes          the wire JSON of domain values and notifications
//!           core          the domain, free of I/O; imports no other module
//! ```
//!
//! - [`transport`]: `GET /ws` (WebSocket), `POST /rpc` (one-shot HTTP), and the long-poll
//!   fallback at `/lp`.
//! - [`rpc`]: JSON-RPC 2.0 wire types, the one error mapping, the call context
//!   ([`rpc::Ctx`]: [`rpc::Services`] and the caller's [`rpc::Session`]) and one method
//!   table that every domain module registers into.
//! - [`cluster`]: several servers on one database (`--cluster`): event ownership by
//!   leases and fencing epochs, calls forwarded to the owner, changes relayed to every
//!   server's subscribers.
//! - [`auth`]: Argon2id password hashes, HS256 JWTs and the accounts service.
//! - [`catalog`]: event drafts, their validation and creation, and event reads.
//! - [`engine`]: the reservation lifecycle over the core, with the writer, storage, expiry,
//!   payment and notification ports, and the recovery of the inventory at start.
//! - [`fanout`]: subscriptions, coalesced `pool.update`s and per-connection outboxes.
//! - [`expiry`]: when pending reservations fall due (Redis key TTLs or an in-process timer)
//!   and the sweeper that releases them.
//! - [`store`]: PostgreSQL or SQLite through sqlx, and the group-commit writer.
//! - [`shapes`]: the JSON of the domain values and notifications, written down once.
//! - [`core`]: the domain, free of I/O: catalog, selling rules, inventory, the
//!   reservation lifecycle, and the client's inputs as types that hold only valid values
//!   (email, password, quantity, reservation items, idempotency key, payment token).
//! - [`app`]: the wiring; [`server`]: routes, binding and graceful shutdown
//!   ([`server::run`] takes a bound listener so tests can bind port 0).

pub mod app;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod cluster;
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
