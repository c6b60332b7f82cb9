//! Ownership of events in cluster mode (PROTOCOL §10): a server starts with every event as
//! a mirror, takes events over one at a time (the epoch bump fences the previous owner off,
//! then the event is rebuilt from the database as at recovery), and gives them up when
//! another server has taken them. Which server owns what is decided above, by the lease.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::core::inventory::first_version;
use crate::core::reservation::Reservation;
use crate::core::{Event, EventId, TicketTypeId};
use crate::store::StoreError;

use super::Engine;

/// What taking events over reads and writes.
#[async_trait]
pub trait TakeoverSource: Send + Sync + 'static {
    /// Bumps the event's epoch and returns the new one.
    async fn take_over_event(&self, id: EventId) -> Result<u64, StoreError>;
    /// Every event's current epoch (without bumping any).
    async fn event_epochs(&self) -> Result<HashMap<EventId, u64>, StoreError>;
    /// Every event with its ticket types in their order.
    async fn load_events(&self) -> Result<Vec<Event>, StoreError>;
    /// Tickets held per ticket type of one event by pending and paid reservations.
    async fn held_of_event(&self, id: EventId) -> Result<HashMap<TicketTypeId, u64>, StoreError>;
    /// One event's pending reservations, oldest first.
    async fn pending_of_event(&self, id: EventId) -> Result<Vec<Reservation>, StoreError>;
}

/// `capacity − held` per ticket type, in ticket type order.
pub(super) fn availability(event: &Event, held: &HashMap<TicketTypeId, u64>) -> Vec<u32> {
    event
        .ticket_types
        .iter()
        .map(|tt| {
            let taken = held.get(&tt.id).copied().unwrap_or(0);
            if taken > u64::from(tt.capacity) {
                tracing::error!(ticket_type = %tt.id, taken, capacity = tt.capacity, "more tickets held than exist");
            }
            u64::from(tt.capacity).saturating_sub(taken) as u32
        })
        .collect()
}

impl Engine {
    /// Adds, as mirrors, the events of `source` this server does not know yet (at start,
    /// and when another server created one). Returns the ids added.
    pub async fn mirror_new_events(
        &self,
        source: &dyn TakeoverSource,
    ) -> Result<Vec<EventId>, StoreError> {
        let known: std::collections::HashSet<EventId> =
            self.inventory.event_ids().into_iter().collect();
        let epochs = source.event_epochs().await?;
        if epochs.keys().all(|id| known.contains(id)) {
            return Ok(Vec::new());
        }
        let mut added = Vec::new();
        for event in source.load_events().await? {
            if known.contains(&event.id) {
                continue;
            }
            let id = event.id;
            let held = source.held_of_event(id).await?;
            let available = availability(&event, &held);
            let version = first_version(epochs.get(&id).copied().unwrap_or(0));
            if self.inventory.insert_mirror(event, &available, version) {
                added.push(id);
            }
        }
        Ok(added)
    }

    /// Makes this server the event's owner: bumps its epoch (from then on the previous
    /// owner cannot commit to it), rebuilds its availability from what is committed, and
    /// puts its pending reservations back under expiry. Returns the new epoch.
    ///
    /// The database reads must be done `within` (else `TimedOut`, the event still a mirror
    /// here); the rebuild after them is bounded work and always completes once begun, so an
    /// abandoned takeover never leaves a half-built or late-built event behind.
    pub async fn take_over(
        &self,
        event_id: EventId,
        source: &dyn TakeoverSource,
        within: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let Some((event, _)) = self.inventory.event(event_id) else {
            return Err(StoreError::Corrupt {
                table: "events",
                detail: format!("take over of unknown event {event_id}"),
            });
        };
        let reads = async {
            let epoch = source.take_over_event(event_id).await?;
            let held = source.held_of_event(event_id).await?;
            let pending = source.pending_of_event(event_id).await?;
            Ok::<_, StoreError>((epoch, held, pending))
        };
        let (epoch, held, pending) = tokio::time::timeout(within, reads)
            .await
            .map_err(|_| StoreError::TimedOut("reading the event to take it over"))??;
        let available = availability(&event, &held);
        // Hundreds of thousands of reservations take a while to index: off the runtime.
        let inventory = Arc::clone(&self.inventory);
        let rebuilt = tokio::task::spawn_blocking(move || {
            inventory.take_over(event_id, &available, epoch, pending)
        })
        .await
        .map_err(|error| StoreError::Corrupt {
            table: "reservations",
            detail: format!("rebuild failed: {error}"),
        })?
        .ok_or_else(|| StoreError::Corrupt {
            table: "events",
            detail: format!("event {event_id} vanished"),
        })?;
        for id in &rebuilt.refused {
            tracing::error!(reservation = %id, "pending reservation not restored: unknown ticket type, or no items");
        }
        self.expiry.schedule_all(&rebuilt.restored);
        if let Some(pools) = self.inventory.pools(event_id) {
            self.notifier.pools_changed(event_id, &pools);
        }
        tracing::info!(event = %event_id, epoch, pending = rebuilt.restored.len(), "took the event over");
        Ok(epoch)
    }

    /// Another server owns the event now: keep only a mirror of it. Its pending
    /// reservations are the new owner's (their expiry keys stay in Redis for it).
    pub fn give_up(&self, event_id: EventId) {
        if let Some(forgotten) = self.inventory.mirror_event(event_id) {
            tracing::info!(event = %event_id, active = forgotten.len(), "gave the event up to another server");
        }
    }

    /// Gives the event up if it is still owned in `epoch`: a commit fenced off in an
    /// earlier epoch says nothing about a takeover made since.
    pub(super) fn give_up_epoch(&self, event_id: EventId, epoch: u64) {
        if self.inventory.epoch(event_id) == Some(epoch) {
            self.give_up(event_id);
        }
    }
}
