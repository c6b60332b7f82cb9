//! What a method runs with: the services of the server (each a port, so the method table
//! does not care whether they are local, forwarding, or fakes in a test) and the caller's
//! session. Only `app.rs` knows which implementations stand behind them.

use std::sync::Arc;

use serde_json::Value;
use tokio_util::task::TaskTracker;

use super::dispatch::Dispatcher;
use super::session::Session;
use crate::auth::AccountService;
use crate::catalog::CatalogService;
use crate::core::Clock;
use crate::engine::ReservationService;
use crate::fanout::FanOut;
use crate::metrics::Metrics;

/// The services every call may use. Shared by every connection behind an `Arc`.
pub struct Services {
    /// The reservation lifecycle.
    pub reservations: Arc<dyn ReservationService>,
    /// Events and their live availability.
    pub catalog: Arc<dyn CatalogService>,
    /// Registration, login and tokens.
    pub accounts: Arc<dyn AccountService>,
    /// Pool subscriptions and owners' connections.
    pub subscriptions: Arc<FanOut>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// Calls detached from their HTTP client, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The OpenRPC document `rpc.discover` answers with.
    pub openrpc: Value,
    /// The method table these services run behind.
    pub dispatcher: Dispatcher,
}

/// One call's context: the services and the caller's session.
#[derive(Clone)]
pub struct Ctx {
    pub services: Arc<Services>,
    pub session: Arc<Session>,
}

impl Ctx {
    pub fn new(services: Arc<Services>, session: Arc<Session>) -> Self {
        Self { services, session }
    }

    /// Runs one message (a call or a batch) in this context.
    pub async fn handle_message(&self, text: &str) -> Option<String> {
        self.services.dispatcher.handle_message(self, text).await
    }
}
