//! A connection's (or long-poll session's) bounded queue of server notifications.
//!
//! Pool updates are state, not events: while an update for a subscription is still
//! unsent, a newer one is merged into it (the newest version of each ticket type wins), so
//! a slow reader costs one entry per subscription, however many changes happen.
//! `reservation.updated` notifications are events and are never merged or dropped: when
//! they do not fit, the outbox *overflows* and the transport ends the connection (1008) or
//! the session.
//!
//! Every entry gets a `seq` (1, 2, 3, … per outbox). A WebSocket writer [`drain`]s and
//! forgets; a long-poll GET [`poll`]s with a cursor that acknowledges everything up to it,
//! and entries handed out once are never changed again, so a re-poll sees the same thing.
//!
//! [`drain`]: Outbox::drain
//! [`poll`]: Outbox::poll

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::SubscriptionId;
use crate::core::inventory::PoolState;
use crate::core::TicketTypeId;
use crate::shapes;

/// One pool's state with its JSON, written once per flush and shared by every subscriber.
#[derive(Clone, Debug)]
pub struct RenderedPool {
    pub state: PoolState,
    pub text: Arc<str>,
}

impl RenderedPool {
    pub fn new(state: PoolState) -> Self {
        Self {
            text: shapes::pool_text(&state).into(),
            state,
        }
    }
}

enum Body {
    /// A notification already written out.
    Text(Arc<str>),
    /// The latest state of some ticket types for one subscription.
    Pools {
        subscription: SubscriptionId,
        /// The event id as text, shared by every subscriber of the event.
        event_id: Arc<str>,
        pools: Vec<RenderedPool>,
    },
}

struct Entry {
    seq: u64,
    body: Body,
}

#[derive(Default)]
struct State {
    /// The seq of the last entry queued; the first entry is 1.
    last_seq: u64,
    /// In seq order: unsent (WebSocket) or unacknowledged (long-poll).
    entries: VecDeque<Entry>,
    /// Entries up to this seq have been handed out and must not change.
    delivered_upto: u64,
    /// For each subscription, the seq of its pool entry that may still be merged into.
    open_pools: HashMap<SubscriptionId, u64>,
    /// For each subscription, the newest version of each ticket type it has been given
    /// (in its snapshot or queued since): only newer versions are queued (PROTOCOL §6).
    known: HashMap<SubscriptionId, HashMap<TicketTypeId, u64>>,
    overflowed: bool,
}

impl State {
    /// Appends an entry with the next seq, or marks the outbox overflowed when it is full.
    fn enqueue(&mut self, capacity: usize, body: Body) -> Option<u64> {
        if self.entries.len() >= capacity {
            self.overflowed = true;
            return None;
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        self.entries.push_back(Entry { seq, body });
        Some(seq)
    }
}

/// See the module doc.
pub struct Outbox {
    /// Held only to push or take entries; never across `.await`.
    state: Mutex<State>,
    ready: Notify,
    capacity: usize,
}

impl Outbox {
    /// An outbox holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every operation checks before it changes anything; a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a notification that must not be lost. When full, the outbox overflows.
    pub fn push_event(&self, text: Arc<str>) {
        self.state().enqueue(self.capacity, Body::Text(text));
        self.ready.notify_one();
    }

    /// Records what a subscription's snapshot showed: later updates carry only newer
    /// versions.
    pub fn known_from(&self, subscription: SubscriptionId, snapshot: &[PoolState]) {
        let mut state = self.state();
        let known = state.known.entry(subscription).or_default();
        for pool in snapshot {
            let version = known.entry(pool.ticket_type_id).or_default();
            *version = (*version).max(pool.version);
        }
    }

    /// Queues the new state of some pools, merged into the subscription's unsent update if
    /// there is one; pools the subscription already knows at this version or a newer one
    /// are left out. When a new entry is needed and the outbox is full, it overflows.
    pub fn push_pools(
        &self,
        subscription: SubscriptionId,
        event_id: &Arc<str>,
        pools: &[RenderedPool],
    ) {
        let mut state = self.state();
        let known = state.known.entry(subscription).or_default();
        let pools: Vec<RenderedPool> = pools
            .iter()
            .filter(|pool| {
                let version = known.entry(pool.state.ticket_type_id).or_default();
                let newer = pool.state.version > *version;
                *version = (*version).max(pool.state.version);
                newer
            })
            .cloned()
            .collect();
        if pools.is_empty() {
            return;
        }
        let delivered_upto = state.delivered_upto;
        if let Some(&seq) = state.open_pools.get(&subscription) {
            if seq > delivered_upto {
                if let Some(entry) = state.entries.iter_mut().rev().find(|e| e.seq == seq) {
                    if let Body::Pools { pools: pending, .. } = &mut entry.body {
                        merge(pending, pools);
                        return;
                    }
                }
            }
        }
        let body = Body::Pools {
            subscription,
            event_id: Arc::clone(event_id),
            pools,
        };
        if let Some(seq) = state.enqueue(self.capacity, body) {
            state.open_pools.insert(subscription, seq);
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Forgets a subscription's unsent update (after `pool.unsubscribe`).
    pub fn forget(&self, subscription: SubscriptionId) {
        let mut state = self.state();
        state.known.remove(&subscription);
        if let Some(seq) = state.open_pools.remove(&subscription) {
            if seq > state.delivered_upto {
                state.entries.retain(|e| e.seq != seq);
            }
        }
    }

    /// Takes every queued notification, written out, in order (WebSocket).
    pub fn drain(&self) -> Vec<String> {
        let mut state = self.state();
        state.open_pools.clear();
        state.delivered_upto = state.last_seq;
        let entries: Vec<Entry> = state.entries.drain(..).collect();
        drop(state);
        entries.iter().map(render).collect()
    }

    /// Acknowledges (drops) everything up to `cursor` and returns everything after it,
    /// which is from now on frozen (long-poll).
    pub fn poll(&self, cursor: u64) -> Vec<(u64, String)> {
        let mut state = self.state();
        while state.entries.front().is_some_and(|e| e.seq <= cursor) {
            state.entries.pop_front();
        }
        state.delivered_upto = state.delivered_upto.max(state.last_seq);
        state.open_pools.clear();
        state.entries.iter().map(|e| (e.seq, render(e))).collect()
    }

    /// Whether a notification did not fit: the connection must be closed.
    pub fn overflowed(&self) -> bool {
        self.state().overflowed
    }

    /// Entries held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when something was pushed since the last wait (one waiter).
    pub async fn wait(&self) {
        self.ready.notified().await;
    }
}

/// Newer state wins per ticket type; versions only grow.
fn merge(pending: &mut Vec<RenderedPool>, newer: Vec<RenderedPool>) {
    for pool in newer {
        match pending
            .iter_mut()
            .find(|p| p.state.ticket_type_id == pool.state.ticket_type_id)
        {
            Some(existing) if existing.state.version < pool.state.version => *existing = pool,
            Some(_) => {}
            None => pending.push(pool),
        }
    }
}

fn render(entry: &Entry) -> String {
    match &entry.body {
        Body::Text(text) => text.to_string(),
        Body::Pools {
            subscription,
            event_id,
            pools,
        } => shapes::pool_update_text(
            &subscription.to_string(),
            event_id,
            pools.iter().map(|pool| &*pool.text),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::EventId;

    fn pool(id: TicketTypeId, available: u32, version: u64) -> RenderedPool {
        RenderedPool::new(PoolState {
            ticket_type_id: id,
            available,
            version,
        })
    }

    fn event() -> Arc<str> {
        EventId::new().to_string().into()
    }

    #[test]
    fn unsent_pool_updates_merge_keeping_the_newest_version() {
        let outbox = Outbox::new(10);
        let (a, b) = (TicketTypeId::new(), TicketTypeId::new());
        let sub = SubscriptionId(1);
        let event = event();
        outbox.push_pools(sub, &event, &[pool(a, 9, 1)]);
        outbox.push_pools(sub, &event, &[pool(a, 8, 2), pool(b, 5, 1)]);
        outbox.push_pools(sub, &event, &[pool(a, 9, 1)]);
        let sent = outbox.drain();
        assert_eq!(sent.len(), 1);
        let update: serde_json::Value = serde_json::from_str(&sent[0]).unwrap();
        assert_eq!(update["method"], "pool.update");
        assert_eq!(update["params"]["pools"][0]["available"], 8);
        assert_eq!(update["params"]["pools"][0]["version"], 2);
        assert_eq!(update["params"]["pools"][1]["available"], 5);
    }

    #[test]
    fn events_are_never_merged_and_overflow_when_full() {
        let outbox = Outbox::new(2);
        outbox.push_event("one".into());
        outbox.push_event("two".into());
        assert!(!outbox.overflowed());
        outbox.push_event("three".into());
        assert!(outbox.overflowed());
        assert_eq!(outbox.drain(), vec!["one".to_owned(), "two".to_owned()]);
    }

    #[test]
    fn a_poll_acknowledges_up_to_its_cursor_and_redelivers_the_rest() {
        let outbox = Outbox::new(10);
        for text in ["a", "b", "c"] {
            outbox.push_event(text.into());
        }
        let first = outbox.poll(0);
        assert_eq!(
            first.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        // The response was lost: the same cursor gets the same messages.
        assert_eq!(outbox.poll(0), first);
        assert_eq!(outbox.poll(2), vec![(3, "c".to_owned())]);
        assert_eq!(outbox.poll(3), vec![]);
        assert_eq!(outbox.len(), 0);
    }

    #[test]
    fn a_delivered_pool_update_is_frozen() {
        let outbox = Outbox::new(10);
        let a = TicketTypeId::new();
        let sub = SubscriptionId(7);
        let event = event();
        outbox.push_pools(sub, &event, &[pool(a, 9, 1)]);
        let first = outbox.poll(0);
        outbox.push_pools(sub, &event, &[pool(a, 8, 2)]);
        let again = outbox.poll(0);
        assert_eq!(again[0], first[0]);
        assert_eq!(again.len(), 2);
        assert_eq!(again[1].0, 2);
    }

    #[test]
    fn versions_a_subscription_already_knows_are_not_queued_again() {
        let outbox = Outbox::new(10);
        let (a, b) = (TicketTypeId::new(), TicketTypeId::new());
        let sub = SubscriptionId(3);
        let event = event();
        outbox.known_from(sub, &[pool(a, 9, 4).state, pool(b, 2, 1).state]);
        outbox.push_pools(sub, &event, &[pool(a, 9, 4), pool(b, 2, 1)]);
        assert!(outbox.is_empty());
        outbox.push_pools(sub, &event, &[pool(a, 9, 4), pool(b, 1, 2)]);
        let sent: serde_json::Value = serde_json::from_str(&outbox.drain()[0]).unwrap();
        assert_eq!(sent["params"]["pools"].as_array().unwrap().len(), 1);
        assert_eq!(sent["params"]["pools"][0]["version"], 2);
    }
}
