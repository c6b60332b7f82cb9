//! Fan-out: live availability (`pool.update`) to subscribers and `reservation.updated` to
//! every connection of a reservation's owner (PROTOCOL §6).
//!
//! The engine reports committed changes through the [`Notifier`] port; reporting a pool
//! change only records it (a few map operations) and wakes the flusher. The flusher task
//! sends, at most every `window`, the latest state of each changed event to its
//! subscribers' outboxes, so a burst of reservations becomes one update per subscriber and
//! nothing is ever sent on the reserver's time.

pub mod notify;
pub mod outbox;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::inventory::PoolState;
use crate::core::reservation::Reservation;
use crate::core::{EventId, TicketTypeId, UserId};
use crate::shapes;
use notify::Notifier;
pub use outbox::{Outbox, RenderedPool};

/// Identifies one subscription of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(pub u64);

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sub-{}", self.0)
    }
}

impl std::str::FromStr for SubscriptionId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        s.strip_prefix("sub-")
            .and_then(|n| n.parse().ok())
            .map(Self)
            .ok_or(())
    }
}

/// The longest a pool change waits before it is sent (PROTOCOL §6 allows 100 ms).
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(50);

/// Subscriptions, owners' connections and changes not yet sent. See the module doc.
pub struct FanOut {
    /// Each event's subscriptions. A guard is held only to insert, remove or copy them out.
    subscribers: DashMap<EventId, HashMap<SubscriptionId, Arc<Outbox>>>,
    /// Each user's logged-in connections, by session id.
    owners: DashMap<UserId, HashMap<u64, Arc<Outbox>>>,
    /// Changed pools not yet sent: the latest state per ticket type, per event.
    dirty: Mutex<HashMap<EventId, HashMap<TicketTypeId, PoolState>>>,
    wake: Notify,
    window: Duration,
    next_subscription: AtomicU64,
}

impl FanOut {
    pub fn new(window: Duration) -> Arc<Self> {
        Arc::new(Self {
            subscribers: DashMap::new(),
            owners: DashMap::new(),
            dirty: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            window,
            next_subscription: AtomicU64::new(1),
        })
    }

    /// Adds a subscription to an event's pool updates and returns it with the snapshot
    /// `snapshot` takes (`None`: no such event, nothing subscribed). The snapshot is taken
    /// while the event's subscriber list is locked, so a flush either runs before it (and
    /// the snapshot shows its changes) or after (and finds the subscription knowing the
    /// snapshot's versions): no change falls between, and none is sent twice.
    pub fn subscribe(
        &self,
        event_id: EventId,
        outbox: &Arc<Outbox>,
        snapshot: impl FnOnce() -> Option<Vec<PoolState>>,
    ) -> Option<(SubscriptionId, Vec<PoolState>)> {
        let id = SubscriptionId(self.next_subscription.fetch_add(1, Ordering::Relaxed));
        let taken = {
            // The snapshot reads the inventory under this guard; the inventory never calls
            // into the fan-out while it holds its own locks, so the two cannot deadlock.
            let mut subscriptions = self.subscribers.entry(event_id).or_default();
            let taken = snapshot();
            if let Some(pools) = &taken {
                outbox.known_from(id, pools);
                subscriptions.insert(id, Arc::clone(outbox));
            }
            taken
        };
        match taken {
            Some(pools) => Some((id, pools)),
            None => {
                self.subscribers
                    .remove_if(&event_id, |_, subscriptions| subscriptions.is_empty());
                None
            }
        }
    }

    pub fn unsubscribe(&self, event_id: EventId, id: SubscriptionId) {
        self.subscribers
            .remove_if_mut(&event_id, |_, subscriptions| {
                subscriptions.remove(&id);
                subscriptions.is_empty()
            });
    }

    /// Registers a logged-in connection, so its user's reservation updates reach it.
    pub fn attach(&self, user: UserId, session: u64, outbox: &Arc<Outbox>) {
        self.owners
            .entry(user)
            .or_default()
            .insert(session, Arc::clone(outbox));
    }

    pub fn detach(&self, user: UserId, session: u64) {
        self.owners.remove_if_mut(&user, |_, sessions| {
            sessions.remove(&session);
            sessions.is_empty()
        });
    }

    /// Subscriptions open, for metrics and tests.
    pub fn subscription_count(&self) -> usize {
        self.subscribers.iter().map(|e| e.value().len()).sum()
    }

    /// The most notifications any subscribed connection has waiting, for tests and metrics:
    /// pool updates merge per subscription, so a lagging subscriber holds at most one entry
    /// per subscription (plus its own reservation updates).
    pub fn largest_outbox(&self) -> usize {
        let outboxes: Vec<Arc<Outbox>> = self
            .subscribers
            .iter()
            .flat_map(|event| event.value().values().cloned().collect::<Vec<_>>())
            .collect();
        outboxes
            .iter()
            .map(|outbox| outbox.len())
            .max()
            .unwrap_or(0)
    }

    /// Sends pending pool changes, at most once per window, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut last = Instant::now() - self.window;
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = stop.cancelled() => return,
            }
            // Changes arriving within the window ride along with this one.
            tokio::time::sleep_until(last + self.window).await;
            last = Instant::now();
            self.flush();
        }
    }

    /// Hands every pending change to the subscribers' outboxes. Each changed pool is
    /// written out once; only the subscription id differs per subscriber.
    pub fn flush(&self) {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner));
        for (event_id, changed) in dirty {
            // Copy the subscriptions out so no map guard is held while pushing.
            let subscriptions: Vec<(SubscriptionId, Arc<Outbox>)> =
                match self.subscribers.get(&event_id) {
                    Some(subs) => subs
                        .iter()
                        .map(|(id, outbox)| (*id, Arc::clone(outbox)))
                        .collect(),
                    None => continue,
                };
            let mut pools: Vec<PoolState> = changed.into_values().collect();
            pools.sort_by_key(|p| p.ticket_type_id);
            let pools: Vec<RenderedPool> = pools.into_iter().map(RenderedPool::new).collect();
            let event_text: Arc<str> = event_id.to_string().into();
            for (id, outbox) in subscriptions {
                outbox.push_pools(id, &event_text, &pools);
            }
        }
    }
}

impl Notifier for FanOut {
    fn pools_changed(&self, event_id: EventId, pools: &[PoolState]) {
        {
            let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
            let event = dirty.entry(event_id).or_default();
            for pool in pools {
                let newer = event
                    .get(&pool.ticket_type_id)
                    .is_none_or(|known| known.version < pool.version);
                if newer {
                    event.insert(pool.ticket_type_id, *pool);
                }
            }
        }
        self.wake.notify_one();
    }

    fn reservation_updated(&self, reservation: &Reservation) {
        if self.owners.contains_key(&reservation.user_id) {
            let text = shapes::reservation_updated(reservation).into();
            self.to_user(reservation.user_id, text);
        }
    }
}

impl FanOut {
    /// Pushes a notification already rendered (by this server, or by the server where the
    /// change happened) to every connection of `user` here.
    pub fn to_user(&self, user: UserId, text: Arc<str>) {
        let outboxes: Vec<Arc<Outbox>> = match self.owners.get(&user) {
            Some(sessions) => sessions.values().cloned().collect(),
            None => return,
        };
        for outbox in outboxes {
            outbox.push_event(Arc::clone(&text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ticket_type_id: TicketTypeId, available: u32, version: u64) -> PoolState {
        PoolState {
            ticket_type_id,
            available,
            version,
        }
    }

    #[test]
    fn the_first_update_after_subscribing_is_newer_than_the_snapshot() {
        let fanout = FanOut::new(DEFAULT_WINDOW);
        let (event, tt) = (EventId::new(), TicketTypeId::new());
        // Committed and reported, not yet flushed: the snapshot already shows it.
        fanout.pools_changed(event, &[pool(tt, 9, 1)]);
        let outbox = Outbox::new(8);
        let (_, snapshot) = fanout
            .subscribe(event, &outbox, || Some(vec![pool(tt, 9, 1)]))
            .unwrap();
        fanout.flush();
        assert_eq!(
            outbox.drain(),
            Vec::<String>::new(),
            "{snapshot:?} is known"
        );
        fanout.pools_changed(event, &[pool(tt, 8, 2)]);
        fanout.flush();
        let sent = outbox.drain();
        assert_eq!(sent.len(), 1);
        let update: serde_json::Value = serde_json::from_str(&sent[0]).unwrap();
        assert_eq!(update["params"]["pools"][0]["version"], 2);
    }
}
