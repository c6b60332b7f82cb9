//! Which events this process sells (cluster mode, PROTOCOL §10): an event is either
//! *owned* here, in a fencing epoch, with its counters and active reservations as the
//! module doc describes; or only *mirrored*: its availability as its owner (another server)
//! reports it, with no active reservations, so that reads and subscriptions can be served
//! by any server while only the owner changes anything. A mirror refuses `reserve`, and has
//! nothing to pay, cancel or expire.
//!
//! Ownership moves in whole events: [`Inventory::take_over`] replaces an event's book with
//! one rebuilt from the database, and [`Inventory::mirror_event`] gives it up.

use std::collections::HashMap;

use super::{Active, Book, Counter, Inventory, Phase, PoolState};
use crate::core::catalog::Event;
use crate::core::ids::{EventId, ReservationId};
use crate::core::reservation::Reservation;
use crate::core::time::Timestamp;

/// What [`Inventory::take_over`] did with the pending reservations it was given.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Active now, each with when it falls due.
    pub restored: Vec<(ReservationId, Timestamp)>,
    /// Not of this event, of a ticket type it does not have, without items, or twice.
    pub refused: Vec<ReservationId>,
    /// Active here before, and not in the rebuilt book.
    pub forgotten: Vec<ReservationId>,
}

/// How this process holds an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    /// It sells the event's tickets; its commits carry `epoch`, and the database refuses them
    /// once another server has taken the event over with a later one.
    Owned { epoch: u64 },
    /// Another server sells them; the availability is what it last reported.
    Mirror,
}

/// The first pool version of an event in `epoch`: `epoch * 2^32`. A run then has 2^32
/// changes per ticket type before it would reach the next epoch's versions, and versions
/// stay below 2^53 (exact in JavaScript numbers) for 2^21 takeovers.
pub fn first_version(epoch: u64) -> u64 {
    epoch.saturating_mul(1 << 32)
}

impl Inventory {
    /// Adds an event that another server owns, with the availability and version the
    /// database or its owner gave. Returns `false`, changing nothing, if it is already here.
    pub fn insert_mirror(&self, event: Event, available: &[u32], version: u64) -> bool {
        // A mirror from its first instant: never, even briefly, able to sell.
        self.insert_held(event, available, version, Holding::Mirror)
    }

    /// The epoch to commit a change of reservation `id` behind: the one its event is owned
    /// in, if the reservation is active here and, when `in_flight`, still being paid or
    /// released (it began here, in this tenure). `None` when the event was given up (and
    /// perhaps taken back, which restores the reservation as merely pending) since.
    pub fn epoch_for(&self, id: ReservationId, in_flight: bool) -> Option<u64> {
        self.with_book(id, |_, book| {
            let active = book.active.get(&id)?;
            if in_flight && active.phase == Phase::Pending {
                return None;
            }
            match book.holding {
                Holding::Owned { epoch } => Some(epoch),
                Holding::Mirror => None,
            }
        })?
    }

    /// How this process holds the event, or `None` if it does not know it.
    pub fn holding(&self, event_id: EventId) -> Option<Holding> {
        let state = self.event_state(event_id)?;
        let holding = state.lock().holding;
        Some(holding)
    }

    /// The fencing epoch of an owned event; `None` for a mirror or an unknown event.
    pub fn epoch(&self, event_id: EventId) -> Option<u64> {
        match self.holding(event_id)? {
            Holding::Owned { epoch } => Some(epoch),
            Holding::Mirror => None,
        }
    }

    /// Makes this process the event's owner in `epoch`, in one step: availability as
    /// rebuilt from the database (`available[i]` for ticket type `i`, the `pending`
    /// reservations' tickets already subtracted), versions from the epoch's first, and the
    /// `pending` reservations active. The book is built aside and swapped in under the
    /// event's lock, so no call ever finds the event owned with some of its pending
    /// reservations missing; until then the event is what it was (a mirror refuses, and the
    /// call goes to whoever owns it). `None` if the event is unknown.
    ///
    /// # Panics
    /// If `available` does not have one entry per ticket type.
    pub fn take_over(
        &self,
        event_id: EventId,
        available: &[u32],
        epoch: u64,
        pending: Vec<Reservation>,
    ) -> Option<Rebuilt> {
        let state = self.event_state(event_id)?;
        assert_eq!(available.len(), state.event.ticket_types.len());
        let mut rebuilt = Rebuilt::default();
        let mut active = HashMap::with_capacity(pending.len());
        for reservation in pending {
            let known = reservation.event_id == event_id && state.can_track(&reservation);
            if !known || active.contains_key(&reservation.id) {
                rebuilt.refused.push(reservation.id);
                continue;
            }
            rebuilt
                .restored
                .push((reservation.id, reservation.expires_at));
            active.insert(reservation.id, Active::restored(reservation));
        }
        // Indexed first: while the event is still a mirror, a call that finds one of them
        // here is refused as not owned, as it would be without the entry.
        for &(id, _) in &rebuilt.restored {
            self.reservations.insert(id, event_id);
        }
        rebuilt.forgotten = {
            let mut book = state.lock();
            book.pools = available
                .iter()
                .zip(&state.event.ticket_types)
                .map(|(&available, ticket_type)| Counter {
                    available: available.min(ticket_type.capacity),
                    version: first_version(epoch),
                })
                .collect();
            book.holding = Holding::Owned { epoch };
            let before = std::mem::replace(&mut book.active, active);
            before
                .into_keys()
                .filter(|id| !book.active.contains_key(id))
                .collect()
        };
        self.forget_reservations(&rebuilt.forgotten);
        Some(rebuilt)
    }

    /// Gives an owned event up (another server took it over): it becomes a mirror, keeping
    /// its last availability until its new owner reports, and its active reservations are
    /// forgotten here (they are the new owner's now) and returned. `None` if unknown.
    pub fn mirror_event(&self, event_id: EventId) -> Option<Vec<ReservationId>> {
        let state = self.event_state(event_id)?;
        let forgotten = {
            let mut book = state.lock();
            book.holding = Holding::Mirror;
            forget_active(&mut book)
        };
        self.forget_reservations(&forgotten);
        Some(forgotten)
    }

    /// Applies the availability an event's owner reported to its mirror here: each pool whose
    /// version is newer than the one held. Returns the pools that changed (nothing for an
    /// owned or unknown event: the owner's own counters are the truth).
    pub fn mirror_pools(&self, event_id: EventId, reported: &[PoolState]) -> Vec<PoolState> {
        let Some(state) = self.event_state(event_id) else {
            return Vec::new();
        };
        let mut book = state.lock();
        if book.holding != Holding::Mirror {
            return Vec::new();
        }
        let mut changed = Vec::with_capacity(reported.len());
        for pool in reported {
            let Some(&position) = state.positions.get(&pool.ticket_type_id) else {
                continue;
            };
            let capacity = state.event.ticket_types[position].capacity;
            let counter = &mut book.pools[position];
            if pool.version > counter.version {
                counter.available = pool.available.min(capacity);
                counter.version = pool.version;
                changed.push(PoolState {
                    available: counter.available,
                    ..*pool
                });
            }
        }
        changed
    }

    /// The ids of every event known here.
    pub fn event_ids(&self) -> Vec<EventId> {
        self.events.iter().map(|entry| *entry.key()).collect()
    }

    fn forget_reservations(&self, ids: &[ReservationId]) {
        for id in ids {
            self.reservations.remove(id);
        }
    }
}

fn forget_active(book: &mut Book) -> Vec<ReservationId> {
    std::mem::take(&mut book.active).into_keys().collect()
}
