//! The reservation engine: the lifecycle of PROTOCOL §5 over the in-memory inventory, the
//! write-behind writer and the expiry, payment and notification ports.
//!
//! Every change follows one shape: change the inventory (microseconds, under the event's
//! lock), commit through the writer, then either complete it (answer, schedule or cancel
//! expiry, notify) or undo it in memory and answer `UNAVAILABLE`. Releases keep their
//! tickets held until the commit is done, so a failed commit never hands tickets out twice.

pub mod idempotency;
pub mod payments;
pub mod ports;
pub mod recovery;
pub mod takeover;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::core::inventory::{ChangeError, Holding, Inventory, ReserveError, ReserveRequest};
use crate::core::reservation::{ReleaseKind, Reservation, Status};
use crate::core::{Clock, EventId, PaymentId, PaymentToken, ReservationId, ReserveItems, UserId};
use crate::expiry::sweeper::Releases;
use crate::expiry::Expiry;
use crate::fanout::notify::Notifier;
use crate::store::writer::WriteError;
use crate::store::{Change, Fence, IdempotencyRecord, PaymentRecord, StoreError};
use idempotency::{Answer, IdempotencyKeys, KeyedCall};
use payments::{PaymentAdapter, PaymentError};
use ports::{Commits, Records};

/// How long a payment provider may take before the payment counts as unavailable.
const PAYMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a reservation call failed. Mapped to the wire in `rpc::error`.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid reservation: {0}")]
    Invalid(ReserveError),
    #[error("not found")]
    NotFound,
    #[error("reservation expired")]
    Expired,
    #[error("reservation not pending")]
    NotPending,
    #[error("idempotency key reused with other params")]
    IdempotencyConflict,
    #[error("payment declined")]
    PaymentDeclined,
    #[error("payment provider unavailable")]
    PaymentUnavailable,
    /// Nothing was changed: the database could not commit or is overloaded.
    #[error("storage unavailable")]
    Unavailable,
    #[error("internal: {0}")]
    Internal(String),
    /// Another server owns the event (cluster mode): the call must go to it.
    #[error("event {0} is owned by another server")]
    NotOwner(EventId),
    /// The event's owner answered the forwarded call with this error, passed on as it is.
    #[error("{message}")]
    Relayed {
        code: i64,
        message: String,
        data: Option<serde_json::Value>,
    },
}

impl From<StoreError> for EngineError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Database(cause) => {
                tracing::error!(%cause, "storage failed");
                EngineError::Unavailable
            }
            other => EngineError::Internal(other.to_string()),
        }
    }
}

/// A successful payment and the reservation it paid.
#[derive(Debug, Clone)]
pub struct Paid {
    pub payment: PaymentRecord,
    pub reservation: Reservation,
}

/// What the methods ask of the reservation lifecycle. The engine of this process
/// implements it; one that forwards to another server can stand in its place.
#[async_trait]
pub trait ReservationService: Send + Sync + 'static {
    /// Holds tickets for `user`, all items or none; durable when it returns `Ok`.
    async fn reserve(
        &self,
        user: UserId,
        items: ReserveItems,
        key: Option<KeyedCall<'_, Reservation>>,
    ) -> Result<Answer<Reservation>, EngineError>;
    /// The user's reservation; another user's is `NotFound`.
    async fn get(&self, user: UserId, id: ReservationId) -> Result<Reservation, EngineError>;
    /// The user's newest reservations (at most `limit`), optionally of one status.
    async fn list(
        &self,
        user: UserId,
        status: Option<Status>,
        limit: usize,
    ) -> Result<Vec<Reservation>, EngineError>;
    async fn cancel(
        &self,
        user: UserId,
        id: ReservationId,
    ) -> Result<Answer<Reservation>, EngineError>;
    async fn pay(
        &self,
        user: UserId,
        id: ReservationId,
        payment_token: &PaymentToken,
        key: Option<KeyedCall<'_, Paid>>,
    ) -> Result<Answer<Paid>, EngineError>;
}

#[async_trait]
impl ReservationService for Engine {
    async fn reserve(
        &self,
        user: UserId,
        items: ReserveItems,
        key: Option<KeyedCall<'_, Reservation>>,
    ) -> Result<Answer<Reservation>, EngineError> {
        Engine::reserve(self, user, items, key).await
    }

    async fn get(&self, user: UserId, id: ReservationId) -> Result<Reservation, EngineError> {
        Engine::get(self, user, id).await
    }

    async fn list(
        &self,
        user: UserId,
        status: Option<Status>,
        limit: usize,
    ) -> Result<Vec<Reservation>, EngineError> {
        Ok(self.store.reservations_of(user, status, limit).await?)
    }

    async fn cancel(
        &self,
        user: UserId,
        id: ReservationId,
    ) -> Result<Answer<Reservation>, EngineError> {
        Engine::cancel(self, user, id).await.map(Answer::Fresh)
    }

    async fn pay(
        &self,
        user: UserId,
        id: ReservationId,
        payment_token: &PaymentToken,
        key: Option<KeyedCall<'_, Paid>>,
    ) -> Result<Answer<Paid>, EngineError> {
        Engine::pay(self, user, id, payment_token, key).await
    }
}

/// Expiry releases through the engine, like every other change.
#[async_trait]
impl Releases for Engine {
    fn overdue(&self) -> Vec<ReservationId> {
        Engine::overdue(self)
    }

    async fn expire(&self, id: ReservationId) {
        Engine::expire(self, id).await
    }
}

/// The ports and state the engine works with.
pub struct Engine {
    inventory: Arc<Inventory>,
    store: Arc<dyn Records>,
    writer: Arc<dyn Commits>,
    expiry: Arc<dyn Expiry>,
    payments: Arc<dyn PaymentAdapter>,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    /// Cluster mode: every commit carries its event's fencing epoch.
    fenced: bool,
    keys: IdempotencyKeys,
}

pub struct EngineParts {
    pub inventory: Arc<Inventory>,
    pub store: Arc<dyn Records>,
    pub writer: Arc<dyn Commits>,
    pub expiry: Arc<dyn Expiry>,
    pub payments: Arc<dyn PaymentAdapter>,
    pub notifier: Arc<dyn Notifier>,
    pub clock: Arc<dyn Clock>,
    pub ttl: Duration,
    /// Whether commits carry their event's fencing epoch (cluster mode).
    pub fenced: bool,
}

impl Engine {
    pub fn new(parts: EngineParts) -> Self {
        Self {
            keys: IdempotencyKeys::new(Arc::clone(&parts.store)),
            inventory: parts.inventory,
            store: parts.store,
            writer: parts.writer,
            expiry: parts.expiry,
            payments: parts.payments,
            notifier: parts.notifier,
            clock: parts.clock,
            ttl: parts.ttl,
            fenced: parts.fenced,
        }
    }

    /// Commits a change of reservation `id` of `event_id`. In cluster mode it goes behind
    /// the fence of the epoch the event is owned in here, read under the event's lock
    /// while the reservation is active (and, when `in_flight`, still being paid or released
    /// by this very call); if the event was given up meanwhile, nothing is sent. A commit
    /// the database fences off means another server has taken the event over: it is given
    /// up here at once, so the calls after it go to the new owner.
    async fn commit(
        &self,
        change: Change,
        record: Option<IdempotencyRecord>,
        id: ReservationId,
        event_id: EventId,
        in_flight: bool,
    ) -> Result<(), WriteError> {
        let fence = if self.fenced {
            match self.inventory.epoch_for(id, in_flight) {
                Some(epoch) => Some(Fence { event_id, epoch }),
                None => return Err(WriteError::Fenced),
            }
        } else {
            None
        };
        let committed = self.writer.commit(change, record, fence).await;
        if let (Err(WriteError::Fenced), Some(fence)) = (&committed, fence) {
            tracing::warn!(event = %event_id, epoch = fence.epoch, "a commit was fenced off: another server has taken the event over");
            self.give_up_epoch(event_id, fence.epoch);
        }
        committed
    }

    pub fn expiry(&self) -> &Arc<dyn Expiry> {
        &self.expiry
    }

    fn refuse_while_down(&self) -> Result<(), EngineError> {
        if self.writer.is_down() {
            Err(EngineError::Unavailable)
        } else {
            Ok(())
        }
    }

    /// Holds tickets for `user`, all items or none; durable when it returns `Ok`.
    /// With a key, a repeat returns the first result (`Answer::Rendered`).
    pub async fn reserve(
        &self,
        user: UserId,
        items: ReserveItems,
        key: Option<KeyedCall<'_, Reservation>>,
    ) -> Result<Answer<Reservation>, EngineError> {
        self.refuse_while_down()?;
        // An event owned by another server: said before the key is looked up, which the
        // owner does (cluster mode).
        let event = items
            .as_slice()
            .first()
            .and_then(|(ticket_type, _)| self.inventory.event_of_ticket_type(*ticket_type));
        if let Some(event_id) = event {
            if self.inventory.holding(event_id) == Some(Holding::Mirror) {
                return Err(EngineError::NotOwner(event_id));
            }
        }
        let key = self.keys.begin(user, key, self.clock.now()).await?;
        if let Some(stored) = key.replay()? {
            return Ok(stored);
        }
        let request = ReserveRequest {
            id: ReservationId::new(),
            user_id: user,
            items,
            now: self.clock.now(),
            ttl: self.ttl,
        };
        let reserved = self.inventory.reserve(request).map_err(|e| match e {
            ReserveError::UnknownTicketType { .. } => EngineError::NotFound,
            ReserveError::NotOwned { event_id } => EngineError::NotOwner(event_id),
            other => EngineError::Invalid(other),
        })?;
        let reservation = reserved.reservation;
        let record = key.record(&reservation, self.clock.now());
        let change = Change::Reserve(reservation.clone());
        let committed = self
            .commit(change, record, reservation.id, reservation.event_id, false)
            .await;
        if let Err(error) = committed {
            tracing::warn!(reservation = %reservation.id, %error, "reserve not committed; tickets returned");
            if let Some(pools) = self.inventory.unreserve(reservation.id) {
                self.notifier.pools_changed(reservation.event_id, &pools);
            }
            return Err(EngineError::Unavailable);
        }
        self.expiry.schedule(reservation.id, reservation.expires_at);
        self.notifier
            .pools_changed(reservation.event_id, &reserved.pools);
        Ok(Answer::Fresh(reservation))
    }

    /// The user's reservation, active or stored; another user's is `NotFound`.
    pub async fn get(&self, user: UserId, id: ReservationId) -> Result<Reservation, EngineError> {
        if let Some(active) = self.inventory.active(id) {
            return if active.user_id == user {
                Ok(active)
            } else {
                Err(EngineError::NotFound)
            };
        }
        match self.store.reservation(id).await? {
            Some(stored) if stored.user_id == user => Ok(stored),
            _ => Err(EngineError::NotFound),
        }
    }

    /// Cancels a pending reservation: tickets back in the pool once the release commits.
    pub async fn cancel(
        &self,
        user: UserId,
        id: ReservationId,
    ) -> Result<Reservation, EngineError> {
        self.refuse_while_down()?;
        match self
            .inventory
            .begin_release(id, ReleaseKind::Cancel, Some(user), self.clock.now())
        {
            Ok(snapshot) => self.finish_release(snapshot, Status::Cancelled).await,
            Err(error) => Err(self.refusal(user, id, error).await),
        }
    }

    /// Releases a reservation that has fallen due. Idempotent: anything not pending and due
    /// (paid, cancelled, already released, a payment in flight) is left alone.
    pub async fn expire(&self, id: ReservationId) {
        match self
            .inventory
            .begin_release(id, ReleaseKind::Expire, None, self.clock.now())
        {
            Ok(snapshot) => {
                let released = self.finish_release(snapshot, Status::Expired).await;
                if let Err(error) = released {
                    tracing::warn!(reservation = %id, %error, "expiry not committed; the sweeper retries");
                }
            }
            Err(ChangeError::NotDue) => {
                // Delivered early (clock skew between sources): put it back.
                if let Some(active) = self.inventory.active(id) {
                    self.expiry.schedule(id, active.expires_at);
                }
            }
            Err(_) => {}
        }
    }

    /// Pending reservations past their time, for the sweeper.
    pub fn overdue(&self) -> Vec<ReservationId> {
        self.inventory.overdue(self.clock.now())
    }

    /// Commits a release begun in the inventory (`snapshot` is the reservation as it began)
    /// and completes or undoes it.
    async fn finish_release(
        &self,
        snapshot: Reservation,
        status: Status,
    ) -> Result<Reservation, EngineError> {
        let id = snapshot.id;
        let change = Change::Release {
            id,
            status,
            at: self.clock.now(),
        };
        let committed = self.commit(change, None, id, snapshot.event_id, true).await;
        if let Err(error) = committed {
            tracing::warn!(reservation = %id, %error, "release not committed; still pending");
            self.inventory.abort_release(id);
            return Err(EngineError::Unavailable);
        }
        let reservation = match self.inventory.complete_release(id) {
            Some((reservation, pools)) => {
                self.notifier.pools_changed(reservation.event_id, &pools);
                reservation
            }
            // Committed, and the event given up meanwhile (cluster mode): its new owner
            // rebuilt it from the database, this release included.
            None => {
                tracing::warn!(reservation = %id, "release committed after the event was given up");
                Reservation { status, ..snapshot }
            }
        };
        self.expiry.cancel(id);
        self.notifier.reservation_updated(&reservation);
        tracing::info!(reservation = %id, status = status.as_str(), "reservation released");
        Ok(reservation)
    }

    /// Pays a pending reservation. The payment that began before `expires_at` decides:
    /// expiry leaves the reservation alone while the provider is asked.
    pub async fn pay(
        &self,
        user: UserId,
        id: ReservationId,
        payment_token: &PaymentToken,
        key: Option<KeyedCall<'_, Paid>>,
    ) -> Result<Answer<Paid>, EngineError> {
        self.refuse_while_down()?;
        let key = self.keys.begin(user, key, self.clock.now()).await?;
        if let Some(stored) = key.replay()? {
            return Ok(stored);
        }
        let reservation = match self.inventory.begin_payment(id, user, self.clock.now()) {
            Ok(reservation) => reservation,
            Err(error) => return Err(self.refusal(user, id, error).await),
        };
        let charged = tokio::time::timeout(
            PAYMENT_TIMEOUT,
            self.payments
                .charge(id, reservation.total, payment_token.as_str()),
        )
        .await
        .unwrap_or(Err(PaymentError::Unavailable));
        if let Err(refused) = charged {
            self.payment_failed(id).await;
            return Err(match refused {
                PaymentError::Declined => EngineError::PaymentDeclined,
                PaymentError::Unavailable => EngineError::PaymentUnavailable,
            });
        }
        let reservation_event = reservation.event_id;
        let payment = PaymentRecord {
            id: PaymentId::new(),
            reservation_id: id,
            amount: reservation.total,
            at: self.clock.now(),
        };
        let paid = Paid {
            payment: payment.clone(),
            reservation: Reservation {
                status: Status::Paid,
                ..reservation
            },
        };
        let record = key.record(&paid, self.clock.now());
        let committed = self
            .commit(Change::Pay(payment), record, id, reservation_event, true)
            .await;
        if let Err(error) = committed {
            // The provider took the money but it is not recorded: an operator must refund.
            tracing::error!(reservation = %id, %error, "payment succeeded but was not committed: refund needed");
            self.payment_failed(id).await;
            return Err(EngineError::Unavailable);
        }
        if self.inventory.complete_payment(id).is_none() {
            tracing::warn!(reservation = %id, "payment committed after the event was given up");
        }
        self.expiry.cancel(id);
        self.notifier.reservation_updated(&paid.reservation);
        tracing::info!(reservation = %id, "reservation paid");
        Ok(Answer::Fresh(paid))
    }

    /// Back to pending after a failed payment; released at once if its time ran out meanwhile.
    async fn payment_failed(&self, id: ReservationId) {
        if let Some(reservation) = self.inventory.abort_payment(id) {
            if reservation.expires_at <= self.clock.now() {
                self.expire(id).await;
            }
        }
    }

    /// The answer to a pay or cancel the inventory refused.
    async fn refusal(&self, user: UserId, id: ReservationId, error: ChangeError) -> EngineError {
        match error {
            ChangeError::Expired => {
                self.expire(id).await;
                EngineError::Expired
            }
            ChangeError::NotPending | ChangeError::NotDue => EngineError::NotPending,
            // Not active: paid, cancelled, expired, another user's, or unknown.
            ChangeError::NotFound => match self.store.reservation(id).await {
                Ok(Some(stored)) if stored.user_id == user => match stored.status {
                    Status::Expired => EngineError::Expired,
                    Status::Paid | Status::Cancelled => EngineError::NotPending,
                    Status::Pending if self.inventory.epoch(stored.event_id).is_none() => {
                        EngineError::NotOwner(stored.event_id)
                    }
                    Status::Pending => {
                        tracing::warn!(reservation = %id, "pending in storage but not in memory");
                        EngineError::NotPending
                    }
                },
                Ok(_) => EngineError::NotFound,
                Err(error) => error.into(),
            },
        }
    }

    /// Deletes idempotency keys past their 24 hours.
    pub async fn forget_old_keys(&self) -> Result<u64, StoreError> {
        self.store
            .delete_old_idempotency_keys(self.clock.now())
            .await
    }
}
