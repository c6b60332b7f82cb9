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
        let mut pending = 0;
        for reservation in source.pending_reservations().await? {
            if self.restore(reservation) {
                pending += 1;
            }
        }
        Ok(Recovered {
            events: event_count,
            pending,
        })
    }

    /// Puts a pending reservation loaded from storage back under expiry; `false` if the
    /// inventory cannot track it (unknown event or ticket type, or already active).
    pub(super) fn restore(&self, reservation: Reservation) -> bool {
        let (id, expires_at) = (reservation.id, reservation.expires_at);
        let restored = self.inventory.restore_pending(reservation);
        if restored {
            self.expiry.schedule(id, expires_at);
        } else {
            tracing::error!(reservation = %id, "pending reservation not restored: unknown event or ticket type, or no items");
        }
        restored
    }
}
