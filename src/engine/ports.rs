//! The engine's storage ports: the writer it commits changes through, the reads it makes
//! of what is committed, and what recovery reads at start. The database behind them is
//! wired in `app.rs`; unit tests put fakes here.

use std::collections::HashMap;

use async_trait::async_trait;

use crate::core::reservation::{Reservation, Status};
use crate::core::{Event, EventId, ReservationId, TicketTypeId, Timestamp, UserId};
use crate::store::writer::WriteError;
use crate::store::{Change, Fence, IdempotencyRecord, StoreError, StoredIdempotency};

/// Commits one change (with the idempotency record it produced, atomically with it, if its
/// fence holds). Returns once it is durable; on `Err`, none of it is stored.
#[async_trait]
pub trait Commits: Send + Sync + 'static {
    async fn commit(
        &self,
        change: Change,
        idempotency: Option<IdempotencyRecord>,
        fence: Option<Fence>,
    ) -> Result<(), WriteError>;

    /// Whether the database is known to be down: changes are then refused before anything
    /// is read or taken.
    fn is_down(&self) -> bool {
        false
    }
}

/// What the engine reads back from storage.
#[async_trait]
pub trait Records: Send + Sync + 'static {
    /// A reservation as stored (paid, cancelled and expired ones included).
    async fn reservation(&self, id: ReservationId) -> Result<Option<Reservation>, StoreError>;
    /// A user's reservations, newest first, at most `limit`.
    async fn reservations_of(
        &self,
        user: UserId,
        status: Option<Status>,
        limit: usize,
    ) -> Result<Vec<Reservation>, StoreError>;
    /// The stored result of an idempotency key younger than 24 hours.
    async fn idempotency(
        &self,
        user: UserId,
        method: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<StoredIdempotency>, StoreError>;
    /// Marks a key as used with an empty result unless it is stored: `None` if this call
    /// marked it (a change later committed with it is refused), else the stored record.
    async fn claim_idempotency_key(
        &self,
        user: UserId,
        method: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<StoredIdempotency>, StoreError>;
    /// Deletes idempotency keys older than 24 hours; returns how many.
    async fn delete_old_idempotency_keys(&self, now: Timestamp) -> Result<u64, StoreError>;
}

/// What recovery reads at start to rebuild the inventory and the pending reservations.
#[async_trait]
pub trait RecoverySource: Send + Sync + 'static {
    /// Bumps the epoch of every event (this server takes them all over) and returns the
    /// new epochs, from which pool versions start.
    async fn take_over_events(&self) -> Result<HashMap<EventId, u64>, StoreError>;
    /// Every event with its ticket types in their order.
    async fn load_events(&self) -> Result<Vec<Event>, StoreError>;
    /// Tickets held per ticket type by pending and paid reservations.
    async fn held_per_ticket_type(&self) -> Result<HashMap<TicketTypeId, u64>, StoreError>;
    /// Every pending reservation, oldest first.
    async fn pending_reservations(&self) -> Result<Vec<Reservation>, StoreError>;
}
