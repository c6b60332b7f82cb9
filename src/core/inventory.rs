//! The inventory: the live availability of every ticket type and the *active* reservations
//! (pending ones, and those whose payment or release is being committed), in memory.
//!
//! Each event has one [`Mutex`] over its counters and its active reservations, so a
//! reservation of several ticket types takes one lock, checks every item and then takes them
//! all, or nothing. The catalog ([`Event`]) never changes once inserted and sits beside the
//! mutex in an `Arc`, readable without locking.
//!
//! Two invariants hold at every instant, for every ticket type:
//! - `available = capacity − Σ held by active reservations − Σ paid`, so nothing is ever
//!   oversold;
//! - `version` grows by exactly one at every change of `available`.
//!
//! A reservation is active from [`Inventory::reserve`] (or [`Inventory::restore_pending`])
//! until it is paid, released or unreserved; then the inventory forgets it, and its final
//! record lives in the database. While a payment is in flight (`Paying`) neither a cancel nor
//! an expiry can touch it; while a release is being committed (`Releasing`) its tickets are
//! still held, so a failed commit is undone without the tickets ever having been handed to
//! someone else. A reservation therefore never ends both paid and released.
//!
//! # Locks
//! Three kinds: the shard locks inside each `DashMap`, the `RwLock` of the event order, and
//! the mutex of each event. **No code holds two of them at once**: a value is cloned out of a
//! map (an `Arc` or an id) and its guard dropped before the next map, the order set or a
//! mutex is touched, and the global index of reservations is updated only after the event
//! mutex is released. Two `DashMap` guards at once can deadlock on one shard; with no nesting
//! there is no lock order to get wrong.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use dashmap::DashMap;

use super::catalog::Event;
use super::ids::{EventId, ReservationId, TicketTypeId, UserId};
use super::items::{ReserveItems, MAX_ITEMS};
use super::money::Money;
use super::reservation::{ReleaseKind, Reservation, ReservationItem, Status};
use super::rules::{Refusal, Rule};
use super::time::Timestamp;

mod tenure;
#[cfg(test)]
mod tests;

pub use tenure::{first_version, Holding, Rebuilt};

/// The live state of one ticket type, as `pool.subscribe` and `pool.update` carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolState {
    pub ticket_type_id: TicketTypeId,
    pub available: u32,
    /// Grows by exactly one at every change of `available`; starts at the event's first
    /// version when it is inserted or taken over ([`first_version`] of its epoch).
    pub version: u64,
}

/// A request to hold tickets: its items are well formed ([`ReserveItems`]), but not yet
/// checked against the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveRequest {
    /// A fresh id for the reservation (never one that is active).
    pub id: ReservationId,
    pub user_id: UserId,
    /// In the caller's order; error indexes refer to this order.
    pub items: ReserveItems,
    pub now: Timestamp,
    /// How long the tickets are held: `expires_at = now + ttl`.
    pub ttl: Duration,
}

/// A reservation taken, with the new state of the ticket types it touched (in item order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub reservation: Reservation,
    pub pools: Vec<PoolState>,
}

/// Why nothing was reserved. Checked in the order of the variants below, item by item; the
/// first failure wins and nothing is taken. (The shape of the items, their count, quantities
/// and repeats, is [`ReserveItems`]'s to check.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    #[error("items[{index}].ticket_type_id is not a known ticket type")]
    UnknownTicketType { index: usize },
    /// Item `index` is of another event than `items[0]`.
    #[error("items[{index}].ticket_type_id is of another event than items[0]")]
    MixedEvents { index: usize },
    #[error("only {available} tickets of {ticket_type_id} are available")]
    Insufficient {
        ticket_type_id: TicketTypeId,
        available: u32,
    },
    #[error("the {} rule of {ticket_type_id} refuses this quantity", .rule.kind())]
    RuleViolation {
        ticket_type_id: TicketTypeId,
        rule: Rule,
    },
    /// Σ price × quantity does not fit in the money type (or the event's ticket types are
    /// priced in different currencies, which the catalog should never allow).
    #[error("the total cannot be represented")]
    TotalOverflow,
    /// The event is only mirrored here: another server owns it and sells its tickets.
    #[error("event {event_id} is owned by another server")]
    NotOwned { event_id: EventId },
}

/// Why an active reservation cannot move on. The inventory knows only *active*
/// reservations: a paid, cancelled or expired one is `NotFound` here, and the caller tells
/// those apart with the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// No active reservation with this id, or it belongs to another user.
    #[error("no such reservation")]
    NotFound,
    /// A payment or a release of it is in flight.
    #[error("the reservation is not pending")]
    NotPending,
    /// Pay or cancel at or after `expires_at`.
    #[error("the reservation has expired")]
    Expired,
    /// Expire before `expires_at`.
    #[error("the reservation is not due to expire yet")]
    NotDue,
}

/// Where an active reservation is in its lifecycle. None of these is a wire status: on the
/// wire an active reservation is `pending`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Holds its tickets; may be paid, cancelled or expired.
    Pending,
    /// A payment is in flight: cancel and expiry leave it alone until the outcome is known.
    Paying,
    /// A release is being committed; the tickets are still held until it is complete.
    Releasing(ReleaseKind),
}

struct Active {
    /// Always with status `Pending`.
    reservation: Reservation,
    phase: Phase,
}

impl Active {
    /// A pending reservation loaded from storage, tracked again.
    fn restored(reservation: Reservation) -> Box<Self> {
        Box::new(Self {
            reservation: Reservation {
                status: Status::Pending,
                ..reservation
            },
            phase: Phase::Pending,
        })
    }

    /// Only a pending reservation may change. One whose expiry is being committed has, for
    /// its owner, already expired.
    fn check_pending(&self) -> Result<(), ChangeError> {
        match self.phase {
            Phase::Pending => Ok(()),
            Phase::Releasing(ReleaseKind::Expire) => Err(ChangeError::Expired),
            Phase::Paying | Phase::Releasing(ReleaseKind::Cancel) => Err(ChangeError::NotPending),
        }
    }
}

/// The mutable counters of one ticket type.
#[derive(Clone, Copy)]
struct Counter {
    available: u32,
    version: u64,
}

/// Everything about an event that changes: guarded by its mutex.
struct Book {
    /// One per ticket type, in the order of `Event::ticket_types`.
    pools: Vec<Counter>,
    /// Boxed: a hash table keeps up to half its slots empty after it grows, so the slots
    /// hold a pointer rather than the whole reservation (about 100 bytes less per pending
    /// reservation at a million of them).
    active: HashMap<ReservationId, Box<Active>>,
    /// Whether this process sells the event's tickets or only mirrors its availability.
    holding: Holding,
}

/// One event: its immutable catalog and, under one mutex, its counters and active
/// reservations.
struct EventState {
    event: Arc<Event>,
    /// Ticket type → its index in `event.ticket_types` (and in `Book::pools`). Immutable.
    positions: HashMap<TicketTypeId, usize>,
    /// A `std` mutex rather than an async one: every critical section is a few comparisons
    /// and additions, never blocks, and is never held across an `.await` (the core has none).
    book: Mutex<Book>,
}

impl EventState {
    /// Whether a reservation loaded from storage can be tracked in this event: it has
    /// items, all of this event's ticket types.
    fn can_track(&self, reservation: &Reservation) -> bool {
        !reservation.items.is_empty()
            && reservation
                .items
                .iter()
                .all(|item| self.positions.contains_key(&item.ticket_type_id))
    }

    /// Every mutation checks everything before it changes anything, so a panic inside a
    /// critical section cannot leave the book half-changed: a poisoned lock is safe to reuse.
    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pool_state(&self, book: &Book, position: usize) -> PoolState {
        let counter = book.pools[position];
        PoolState {
            ticket_type_id: self.event.ticket_types[position].id,
            available: counter.available,
            version: counter.version,
        }
    }

    fn pool_states(&self, book: &Book) -> Vec<PoolState> {
        (0..book.pools.len())
            .map(|position| self.pool_state(book, position))
            .collect()
    }

    /// Puts the tickets of `items` back in their pools (one version step per item).
    fn give_back(&self, book: &mut Book, items: &[ReservationItem]) -> Vec<PoolState> {
        items
            .iter()
            .map(|item| {
                let position = self.positions[&item.ticket_type_id];
                let capacity = self.event.ticket_types[position].capacity;
                let counter = &mut book.pools[position];
                debug_assert!(
                    counter.available + item.quantity <= capacity,
                    "giving back more than was taken"
                );
                // Cannot exceed capacity while the invariant holds; the `min` keeps a bad
                // recovery (tickets restored that were not subtracted) from ever showing
                // more tickets than exist.
                counter.available = counter
                    .available
                    .saturating_add(item.quantity)
                    .min(capacity);
                counter.version += 1;
                self.pool_state(book, position)
            })
            .collect()
    }
}

/// Where a ticket type lives. Never changes once inserted.
#[derive(Clone, Copy)]
struct PoolRef {
    event_id: EventId,
    /// Index in `Event::ticket_types` and `Book::pools`.
    position: usize,
}

/// The live availability of every event and its active reservations. See the module doc.
pub struct Inventory {
    events: DashMap<EventId, Arc<EventState>>,
    /// Where each ticket type lives: its event, and its index there.
    ticket_types: DashMap<TicketTypeId, PoolRef>,
    /// Which event each active reservation belongs to. Updated after the event's mutex is
    /// released, so for an instant a new reservation may be in its book but not here yet
    /// (and a forgotten one here but not in its book): lookups then answer "not found".
    reservations: DashMap<ReservationId, EventId>,
    /// Every event by `(starts_at, id)`, for paging through the catalog.
    order: RwLock<BTreeSet<(Timestamp, EventId)>>,
}

impl Default for Inventory {
    fn default() -> Self {
        Self::new()
    }
}

impl Inventory {
    pub fn new() -> Self {
        Self {
            events: DashMap::new(),
            ticket_types: DashMap::new(),
            reservations: DashMap::new(),
            order: RwLock::new(BTreeSet::new()),
        }
    }

    /// Adds an event, at start (recovery) or after it was created. `available[i]` is the
    /// availability of `event.ticket_types[i]`: its capacity for a new event, `capacity −
    /// pending − paid` at recovery. Every version starts at 0. Returns `false`, changing
    /// nothing, if the event is already there.
    ///
    /// # Panics
    /// If `available` does not have one entry per ticket type, or one exceeds its capacity.
    pub fn insert_event(&self, event: Event, available: &[u32]) -> bool {
        self.insert_event_at(event, available, 0)
    }

    /// [`insert_event`](Self::insert_event) with every version starting at `first_version`,
    /// so that versions seen before a restart are never seen again after it; owned in the
    /// epoch that version begins ([`first_version`]).
    pub fn insert_event_at(&self, event: Event, available: &[u32], first_version: u64) -> bool {
        let holding = Holding::Owned {
            epoch: first_version >> 32,
        };
        self.insert_held(event, available, first_version, holding)
    }

    /// Adds an event held as `holding` from the first instant it can be found.
    fn insert_held(
        &self,
        event: Event,
        available: &[u32],
        first_version: u64,
        holding: Holding,
    ) -> bool {
        assert_eq!(
            available.len(),
            event.ticket_types.len(),
            "one availability per ticket type"
        );
        for (ticket_type, &count) in event.ticket_types.iter().zip(available) {
            assert!(
                count <= ticket_type.capacity,
                "available {count} exceeds the capacity {} of {}",
                ticket_type.capacity,
                ticket_type.id
            );
            debug_assert_eq!(ticket_type.event_id, event.id);
        }
        let event_id = event.id;
        let key = (event.starts_at, event.id);
        let state = Arc::new(EventState {
            positions: event
                .ticket_types
                .iter()
                .enumerate()
                .map(|(position, ticket_type)| (ticket_type.id, position))
                .collect(),
            book: Mutex::new(Book {
                pools: available
                    .iter()
                    .map(|&available| Counter {
                        available,
                        version: first_version,
                    })
                    .collect(),
                active: HashMap::new(),
                holding,
            }),
            event: Arc::new(event),
        });
        match self.events.entry(event_id) {
            dashmap::Entry::Occupied(_) => return false,
            dashmap::Entry::Vacant(slot) => {
                slot.insert(Arc::clone(&state));
            }
        }
        // The event is findable before its ticket types and its place in the order, so
        // whatever those lead to exists.
        for (position, ticket_type) in state.event.ticket_types.iter().enumerate() {
            self.ticket_types
                .insert(ticket_type.id, PoolRef { event_id, position });
        }
        self.order
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
        true
    }

    /// Tracks again a pending reservation recovered from the database. Its tickets must
    /// already be subtracted from the availability given to [`insert_event`](Self::insert_event).
    /// Returns `false`, changing nothing, if its event is unknown, one of its ticket types is
    /// not of that event, or a reservation with its id is already active.
    pub fn restore_pending(&self, reservation: Reservation) -> bool {
        debug_assert_eq!(reservation.status, Status::Pending);
        let Some(state) = self.event_state(reservation.event_id) else {
            return false;
        };
        if !state.can_track(&reservation) {
            return false;
        }
        let (id, event_id) = (reservation.id, reservation.event_id);
        {
            let mut book = state.lock();
            if book.active.contains_key(&id) {
                return false;
            }
            book.active.insert(id, Active::restored(reservation));
        }
        self.reservations.insert(id, event_id);
        true
    }

    /// The catalog entry of an event and the live state of its ticket types, in ticket type
    /// order.
    pub fn event(&self, id: EventId) -> Option<(Arc<Event>, Vec<PoolState>)> {
        let state = self.event_state(id)?;
        let pools = state.pool_states(&state.lock());
        Some((Arc::clone(&state.event), pools))
    }

    /// At most `limit` events ordered by `(starts_at, id)`, strictly after `after` (from the
    /// first when `None`), each with the live state of its ticket types.
    pub fn events_after(
        &self,
        after: Option<(Timestamp, EventId)>,
        limit: usize,
    ) -> Vec<(Arc<Event>, Vec<PoolState>)> {
        let ids: Vec<EventId> = {
            let order = self.order.read().unwrap_or_else(PoisonError::into_inner);
            let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
            order
                .range((lower, Bound::Unbounded))
                .take(limit)
                .map(|&(_, id)| id)
                .collect()
        };
        ids.into_iter().filter_map(|id| self.event(id)).collect()
    }

    /// The live state of an event's ticket types, in ticket type order.
    pub fn pools(&self, event_id: EventId) -> Option<Vec<PoolState>> {
        let state = self.event_state(event_id)?;
        let pools = state.pool_states(&state.lock());
        Some(pools)
    }

    pub fn event_of_ticket_type(&self, id: TicketTypeId) -> Option<EventId> {
        self.pool_ref(id).map(|pool| pool.event_id)
    }

    fn pool_ref(&self, id: TicketTypeId) -> Option<PoolRef> {
        self.ticket_types.get(&id).map(|entry| *entry.value())
    }

    /// Holds tickets, all or nothing. Checks, in this order: per item in order, that its
    /// ticket type is known and of the event of `items[0]`; then, under the event's lock, per
    /// item in order, availability and the selling rule ([`Rule::check`]); then that the
    /// total is representable. Only then takes every item, bumps each touched pool's version
    /// by one and records the reservation as pending until `now + ttl`, at the ticket types'
    /// current prices.
    ///
    /// If the caller then fails to commit it, [`unreserve`](Self::unreserve) undoes it.
    ///
    /// # Panics
    /// If a reservation with `req.id` is already active (ids are fresh, so this is a bug of
    /// the caller); nothing has been changed then.
    pub fn reserve(&self, req: ReserveRequest) -> Result<Reserved, ReserveError> {
        let ReserveRequest {
            id,
            user_id,
            items,
            now,
            ttl,
        } = req;
        let mut positions = [0usize; MAX_ITEMS];
        let event_id = self.check_items(&items, &mut positions)?;
        let positions = &positions[..items.len()];
        let state = self
            .event_state(event_id)
            .ok_or(ReserveError::UnknownTicketType { index: 0 })?;

        // The catalog is immutable: read the prices before taking the lock.
        let mut lines = Vec::with_capacity(items.len());
        for (&(ticket_type_id, quantity), &position) in items.as_slice().iter().zip(positions) {
            lines.push(ReservationItem {
                ticket_type_id,
                quantity: quantity.get(),
                unit_price: state.event.ticket_types[position].price,
            });
        }
        let total = total_of(&lines);

        let mut pools = Vec::with_capacity(lines.len());
        let reservation = {
            let mut guard = state.lock();
            let book = &mut *guard;
            if book.holding == Holding::Mirror {
                return Err(ReserveError::NotOwned { event_id });
            }
            for (line, &position) in lines.iter().zip(positions) {
                let rule = state.event.ticket_types[position].rule;
                rule.check(line.quantity, book.pools[position].available)
                    .map_err(|refusal| match refusal {
                        Refusal::Insufficient { available } => ReserveError::Insufficient {
                            ticket_type_id: line.ticket_type_id,
                            available,
                        },
                        Refusal::RuleViolation => ReserveError::RuleViolation {
                            ticket_type_id: line.ticket_type_id,
                            rule,
                        },
                    })?;
            }
            let total = total.ok_or(ReserveError::TotalOverflow)?;
            let slot = match book.active.entry(id) {
                Entry::Occupied(_) => panic!("reservation {id} is already active"),
                Entry::Vacant(slot) => slot,
            };

            for (line, &position) in lines.iter().zip(positions) {
                let counter = &mut book.pools[position];
                counter.available -= line.quantity;
                counter.version += 1;
                pools.push(PoolState {
                    ticket_type_id: line.ticket_type_id,
                    available: counter.available,
                    version: counter.version,
                });
            }
            let reservation = Reservation {
                id,
                user_id,
                event_id,
                status: Status::Pending,
                items: lines,
                total,
                created_at: now,
                expires_at: now.saturating_add(ttl),
            };
            slot.insert(Box::new(Active {
                reservation: reservation.clone(),
                phase: Phase::Pending,
            }));
            reservation
        };
        self.reservations.insert(id, event_id);
        Ok(Reserved { reservation, pools })
    }

    /// The checks of [`reserve`](Self::reserve) that need no lock; returns the event, and
    /// fills `positions[i]` with the index of item `i`'s ticket type in it.
    fn check_items(
        &self,
        items: &ReserveItems,
        positions: &mut [usize; MAX_ITEMS],
    ) -> Result<EventId, ReserveError> {
        let mut event_id = None;
        for (index, &(ticket_type_id, _)) in items.as_slice().iter().enumerate() {
            let pool = self
                .pool_ref(ticket_type_id)
                .ok_or(ReserveError::UnknownTicketType { index })?;
            if *event_id.get_or_insert(pool.event_id) != pool.event_id {
                return Err(ReserveError::MixedEvents { index });
            }
            positions[index] = pool.position;
        }
        Ok(event_id.expect("ReserveItems is never empty"))
    }

    /// Undoes a [`reserve`](Self::reserve) whose commit failed: forgets the reservation, in
    /// whatever phase, and gives its tickets back. Returns the new state of its ticket types,
    /// or `None` if it is not active.
    pub fn unreserve(&self, id: ReservationId) -> Option<Vec<PoolState>> {
        let pools = self.with_book(id, |state, book| {
            let active = book.active.remove(&id)?;
            Some(state.give_back(book, &active.reservation.items))
        })??;
        self.reservations.remove(&id);
        Some(pools)
    }

    /// Starts releasing a pending reservation: it moves to an internal releasing phase and
    /// keeps its tickets until [`complete_release`](Self::complete_release) (or goes back to
    /// pending by [`abort_release`](Self::abort_release)). `user` is the user asking, who must
    /// own it (else `NotFound`); `None` is the server itself (the expiry).
    ///
    /// A cancel at or after `expires_at` is `Expired`; an expiry before it is `NotDue`. A
    /// reservation being paid or already being released is `NotPending`. Returns a snapshot,
    /// still with status `Pending`.
    pub fn begin_release(
        &self,
        id: ReservationId,
        kind: ReleaseKind,
        user: Option<UserId>,
        now: Timestamp,
    ) -> Result<Reservation, ChangeError> {
        self.with_book(id, |_, book| {
            let active = owned_by(book, id, user)?;
            active.check_pending()?;
            let due = now >= active.reservation.expires_at;
            match kind {
                ReleaseKind::Cancel if due => return Err(ChangeError::Expired),
                ReleaseKind::Expire if !due => return Err(ChangeError::NotDue),
                _ => {}
            }
            active.phase = Phase::Releasing(kind);
            Ok(active.reservation.clone())
        })
        .unwrap_or(Err(ChangeError::NotFound))
    }

    /// The release is committed: the tickets go back (one version step per item) and the
    /// reservation is forgotten. Returns it with its final status (`Cancelled` or `Expired`)
    /// and the new state of its ticket types. `None` if it is not being released, so a
    /// release completes once however many times it is called.
    pub fn complete_release(&self, id: ReservationId) -> Option<(Reservation, Vec<PoolState>)> {
        let released = self.with_book(id, |state, book| {
            let Phase::Releasing(kind) = book.active.get(&id)?.phase else {
                return None;
            };
            let mut active = book.active.remove(&id)?;
            let pools = state.give_back(book, &active.reservation.items);
            active.reservation.status = kind.final_status();
            Some((active.reservation, pools))
        })??;
        self.reservations.remove(&id);
        Some(released)
    }

    /// The release could not be committed: the reservation is pending again (its tickets were
    /// never given back). Returns it, so the caller can see whether it is already due; `None`
    /// if it was not being released.
    pub fn abort_release(&self, id: ReservationId) -> Option<Reservation> {
        self.with_book(id, |_, book| {
            let active = book.active.get_mut(&id)?;
            if !matches!(active.phase, Phase::Releasing(_)) {
                return None;
            }
            active.phase = Phase::Pending;
            Some(active.reservation.clone())
        })?
    }

    /// Starts a payment: the reservation moves to an internal paying phase that cancel and
    /// expiry leave alone. Only for its owner (else `NotFound`), only while pending (else
    /// `NotPending`) and only before `expires_at` (else `Expired`). Returns a snapshot, still
    /// with status `Pending`.
    pub fn begin_payment(
        &self,
        id: ReservationId,
        user: UserId,
        now: Timestamp,
    ) -> Result<Reservation, ChangeError> {
        self.with_book(id, |_, book| {
            let active = owned_by(book, id, Some(user))?;
            active.check_pending()?;
            if now >= active.reservation.expires_at {
                return Err(ChangeError::Expired);
            }
            active.phase = Phase::Paying;
            Ok(active.reservation.clone())
        })
        .unwrap_or(Err(ChangeError::NotFound))
    }

    /// The payment is committed: the reservation is forgotten and its tickets stay taken for
    /// good (availability and versions do not change). Returns it with status `Paid`; `None`
    /// if no payment of it was in flight.
    pub fn complete_payment(&self, id: ReservationId) -> Option<Reservation> {
        let paid = self.with_book(id, |_, book| {
            if book.active.get(&id)?.phase != Phase::Paying {
                return None;
            }
            let mut active = book.active.remove(&id)?;
            active.reservation.status = Status::Paid;
            Some(active.reservation)
        })??;
        self.reservations.remove(&id);
        Some(paid)
    }

    /// The payment failed: the reservation is pending again. Returns it, so the caller can see
    /// whether it is already past `expires_at` and start its expiry; `None` if no payment of
    /// it was in flight.
    pub fn abort_payment(&self, id: ReservationId) -> Option<Reservation> {
        self.with_book(id, |_, book| {
            let active = book.active.get_mut(&id)?;
            if active.phase != Phase::Paying {
                return None;
            }
            active.phase = Phase::Pending;
            Some(active.reservation.clone())
        })?
    }

    /// An active reservation in any phase, for reads; its status is `Pending`.
    pub fn active(&self, id: ReservationId) -> Option<Reservation> {
        self.with_book(id, |_, book| {
            book.active
                .get(&id)
                .map(|active| active.reservation.clone())
        })?
    }

    /// The pending reservations (not being paid or released) with `expires_at <= now`, across
    /// every event, soonest due first: the expiry sweeper's work list.
    pub fn overdue(&self, now: Timestamp) -> Vec<ReservationId> {
        let states: Vec<Arc<EventState>> = self
            .events
            .iter()
            .map(|entry| Arc::clone(entry.value()))
            .collect();
        let mut due = Vec::new();
        for state in states {
            let book = state.lock();
            due.extend(
                book.active
                    .values()
                    .filter(|active| {
                        active.phase == Phase::Pending && active.reservation.expires_at <= now
                    })
                    .map(|active| (active.reservation.expires_at, active.reservation.id)),
            );
        }
        due.sort_unstable();
        due.into_iter().map(|(_, id)| id).collect()
    }

    fn event_state(&self, id: EventId) -> Option<Arc<EventState>> {
        self.events.get(&id).map(|entry| Arc::clone(entry.value()))
    }

    /// Runs `change` under the lock of the event of reservation `id`; `None` if `id` is not
    /// an active reservation. No map guard is held while it runs.
    fn with_book<T>(
        &self,
        id: ReservationId,
        change: impl FnOnce(&EventState, &mut Book) -> T,
    ) -> Option<T> {
        let event_id = self.reservations.get(&id).map(|entry| *entry.value())?;
        let state = self.event_state(event_id)?;
        let mut book = state.lock();
        Some(change(&state, &mut book))
    }
}

/// The active reservation `id`, if `user` (when given) owns it; another user's reservation
/// is indistinguishable from an unknown one.
fn owned_by(
    book: &mut Book,
    id: ReservationId,
    user: Option<UserId>,
) -> Result<&mut Active, ChangeError> {
    match book.active.get_mut(&id) {
        Some(active) if user.is_none_or(|user| user == active.reservation.user_id) => Ok(active),
        _ => Err(ChangeError::NotFound),
    }
}

/// Σ `unit_price × quantity`, or `None` on overflow or mixed currencies.
fn total_of(items: &[ReservationItem]) -> Option<Money> {
    let (first, rest) = items.split_first()?;
    rest.iter()
        .try_fold(first.unit_price.times(first.quantity)?, |sum, item| {
            sum.plus(item.unit_price.times(item.quantity)?)
        })
}
