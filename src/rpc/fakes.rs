//! Services for unit tests of the method table: no database, no writer, no network. Each
//! fake answers the simplest way that lets a test reach the code it is about.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::task::TaskTracker;

use super::dispatch::{Dispatcher, Limits, Methods};
use super::session::{Session, Transport};
use super::{Ctx, Services};
use crate::auth::{AccountError, AccountService, AuthFailure, SignedIn};
use crate::catalog::{CatalogService, CreateEventError, EventDraft, EventWithPools};
use crate::core::inventory::PoolState;
use crate::core::reservation::{Reservation, Status};
use crate::core::{
    Clock, Email, Event, EventId, Password, PaymentToken, ReservationId, ReserveItems, Timestamp,
    User, UserId,
};
use crate::engine::idempotency::{Answer, KeyedCall};
use crate::engine::{EngineError, Paid, ReservationService};
use crate::fanout::{FanOut, DEFAULT_WINDOW};
use crate::metrics::Metrics;

/// Every reservation call answers `UNAVAILABLE`.
pub struct NoReservations;

#[async_trait]
impl ReservationService for NoReservations {
    async fn reserve(
        &self,
        _: UserId,
        _: ReserveItems,
        _: Option<KeyedCall<'_, Reservation>>,
    ) -> Result<Answer<Reservation>, EngineError> {
        Err(EngineError::Unavailable)
    }
    async fn get(&self, _: UserId, _: ReservationId) -> Result<Reservation, EngineError> {
        Err(EngineError::Unavailable)
    }
    async fn list(
        &self,
        _: UserId,
        _: Option<Status>,
        _: usize,
    ) -> Result<Vec<Reservation>, EngineError> {
        Ok(Vec::new())
    }
    async fn cancel(
        &self,
        _: UserId,
        _: ReservationId,
    ) -> Result<Answer<Reservation>, EngineError> {
        Err(EngineError::Unavailable)
    }
    async fn pay(
        &self,
        _: UserId,
        _: ReservationId,
        _: &PaymentToken,
        _: Option<KeyedCall<'_, Paid>>,
    ) -> Result<Answer<Paid>, EngineError> {
        Err(EngineError::Unavailable)
    }
}

/// A catalog without events, which validates drafts and creates nothing.
pub struct EmptyCatalog;

#[async_trait]
impl CatalogService for EmptyCatalog {
    fn events_after(&self, _: Option<(Timestamp, EventId)>, _: usize) -> Vec<EventWithPools> {
        Vec::new()
    }
    fn event(&self, _: EventId) -> Option<EventWithPools> {
        None
    }
    fn pools(&self, _: EventId) -> Option<Vec<PoolState>> {
        None
    }
    async fn create_event(&self, draft: &EventDraft) -> Result<Event, CreateEventError> {
        Ok(draft.validate()?)
    }
}

/// Accounts that know nobody and accept no token.
pub struct NoAccounts;

#[async_trait]
impl AccountService for NoAccounts {
    async fn register(&self, _: Email, _: Password) -> Result<SignedIn, AccountError> {
        Err(AccountError::EmailTaken)
    }
    async fn login(&self, _: Option<Email>, _: Password) -> Result<SignedIn, AccountError> {
        Err(AccountError::InvalidCredentials)
    }
    async fn verify(&self, _: &str) -> Result<(User, Timestamp), AccountError> {
        Err(AccountError::Refused(AuthFailure::Invalid))
    }
}

/// A clock that stands still.
pub struct StillClock(pub Timestamp);

impl Clock for StillClock {
    fn now(&self) -> Timestamp {
        self.0
    }
}

/// The fakes behind a method table, at a fixed time.
pub fn services(methods: Methods) -> Arc<Services> {
    Arc::new(Services {
        reservations: Arc::new(NoReservations),
        catalog: Arc::new(EmptyCatalog),
        accounts: Arc::new(NoAccounts),
        subscriptions: FanOut::new(DEFAULT_WINDOW),
        clock: Arc::new(StillClock(Timestamp::from_millis(1_800_000_000_000))),
        metrics: Arc::new(Metrics::new()),
        tasks: TaskTracker::new(),
        openrpc: serde_json::json!({"openrpc": "1.3.2"}),
        dispatcher: Dispatcher::new(methods, Limits { max_batch: 3 }),
    })
}

/// A call context over `/rpc` (no push, no rate limit), nobody logged in.
pub fn http_ctx(services: &Arc<Services>) -> Ctx {
    Ctx::new(
        Arc::clone(services),
        Arc::new(Session::new(Transport::Http, None)),
    )
}
