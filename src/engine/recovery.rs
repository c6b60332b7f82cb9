//! Recovery at start: the inventory rebuilt from what storage holds. Availability is
//! `capacity − pending − paid`, pool versions start at the event's new epoch, and every
//! pending reservation goes back under expiry with its own `expires_at` (an overdue one
//! falls due at once).

use crate::core::inventory::first_version;
use crate::core::reservation::Reservation;
use crate::store::StoreError;

use super::ports::RecoverySource;
use super::Engine;

/// What recovery found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovered {
    pub events: usize,
    /// Pending reservations back under expiry.
    pub pending: usize,
}

impl Engine {
    /// Rebuilds the inventory from `source`: call once, at start, before any change.
    pub async fn recover(&self, source: &dyn RecoverySource) -> Result<Recovered, StoreError> {
        let epochs = source.take_over_events().await?;
        let held = source.held_per_ticket_type().await?;
        let events = source.load_events().await?;
        let event_count = events.len();
        for event in events {
            let epoch = epochs.get(&event.id).copied().unwrap_or(0);
            let available = super::takeover::availability(&event, &held);
            self.inventory
                .insert_event_at(event, &available, first_version(epoch));
        }
        let pending = self.restore_all(source.pending_reservations().await?).await;
        Ok(Recovered {
            events: event_count,
            pending,
        })
    }

    /// Puts pending reservations loaded from storage back under expiry, handing the expiry
    /// every due time at once (a big event taken over has hundreds of thousands). Yields now
    /// and then, so a long rebuild never holds a runtime thread. Returns how many were
    /// restored; one the inventory cannot track (unknown event or ticket type, no items, or
    /// already active) is logged and left out.
    pub(super) async fn restore_all(&self, reservations: Vec<Reservation>) -> usize {
        const BETWEEN_YIELDS: usize = 4_096;
        let mut due = Vec::with_capacity(reservations.len());
        for (n, reservation) in reservations.into_iter().enumerate() {
            let (id, expires_at) = (reservation.id, reservation.expires_at);
            if self.inventory.restore_pending(reservation) {
                due.push((id, expires_at));
            } else {
                tracing::error!(reservation = %id, "pending reservation not restored: unknown event or ticket type, or no items");
            }
            if n % BETWEEN_YIELDS == BETWEEN_YIELDS - 1 {
                tokio::task::yield_now().await;
            }
        }
        self.expiry.schedule_all(&due);
        due.len()
    }
}
