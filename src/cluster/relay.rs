//! Fan-out across servers through Redis pub/sub. Every change the owner of an event
//! reports goes to its local fan-out at once and, coalesced per event, to the channel
//! `<prefix>pools`; `reservation.updated`, already rendered, goes to `<prefix>users`. Every
//! server applies the pools it hears to its mirror of the event (only versions newer than
//! it holds, so they never go back) and passes what changed to its own subscribers, with its
//! own coalescing; a user's notifications reach that user's connections here.
//!
//! Pub/sub is fire-and-forget: a message lost while a server's subscriber reconnects
//! leaves its mirror behind until the owner republishes the event's state, which it does
//! every second (see `ownership`). The owner's own subscribers never depend on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Client, ClientLike, EventInterface, PubsubInterface};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::core::inventory::{Inventory, PoolState};
use crate::core::reservation::Reservation;
use crate::core::{EventId, TicketTypeId, UserId};
use crate::fanout::notify::Notifier;
use crate::fanout::FanOut;
use crate::shapes;

/// Changes waiting to be published; beyond it they are dropped (with a warning), and the
/// other servers' mirrors catch up at the event's next change.
const QUEUE: usize = 65_536;
/// Most changes gathered into one round of messages.
const GATHER: usize = 4_096;
/// How long one round of messages may take to publish.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one attempt to subscribe may take, and the pause before the next.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

enum Outgoing {
    Pools(EventId, Vec<PoolState>),
    User(UserId, Arc<str>),
}

/// A pool message: the event's changed ticket types as `(id, available, version)`.
#[derive(Serialize, Deserialize)]
struct PoolsMessage {
    node: String,
    event: String,
    pools: Vec<(String, u32, u64)>,
}

#[derive(Serialize, Deserialize)]
struct UserMessage {
    node: String,
    user: String,
    /// The `reservation.updated` notification, as sent to a client.
    text: String,
}

/// The notifier of a cluster server: the local fan-out, and the other servers.
pub struct Relay {
    local: Arc<FanOut>,
    outgoing: mpsc::Sender<Outgoing>,
    dropped: AtomicU64,
}

/// Where the relay's tasks publish from and deliver to.
pub struct RelayTasks {
    outgoing: mpsc::Receiver<Outgoing>,
    node: String,
    pools_channel: String,
    users_channel: String,
}

impl Relay {
    pub fn new(local: Arc<FanOut>, prefix: &str, node: &str) -> (Arc<Self>, RelayTasks) {
        let (outgoing, receiver) = mpsc::channel(QUEUE);
        let relay = Arc::new(Self {
            local,
            outgoing,
            dropped: AtomicU64::new(0),
        });
        let tasks = RelayTasks {
            outgoing: receiver,
            node: node.to_owned(),
            pools_channel: format!("{prefix}pools"),
            users_channel: format!("{prefix}users"),
        };
        (relay, tasks)
    }

    /// Publishes the state of an event this server owns without a change: other servers'
    /// mirrors catch up on anything they missed (a message lost while they reconnected, or
    /// a snapshot sent while they still owned the event).
    pub fn republish(&self, event_id: EventId, pools: Vec<PoolState>) {
        self.send(Outgoing::Pools(event_id, pools));
    }

    fn send(&self, message: Outgoing) {
        // Closed: the publisher has stopped (shutting down); nothing more goes out.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.outgoing.try_send(message) {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "cluster: change not published (queue full); other servers catch up at the next change"
                );
            }
        }
    }
}

impl Notifier for Relay {
    fn pools_changed(&self, event_id: EventId, pools: &[PoolState]) {
        self.local.pools_changed(event_id, pools);
        self.send(Outgoing::Pools(event_id, pools.to_vec()));
    }

    fn reservation_updated(&self, reservation: &Reservation) {
        let text: Arc<str> = shapes::reservation_updated(reservation).into();
        self.local.to_user(reservation.user_id, Arc::clone(&text));
        self.send(Outgoing::User(reservation.user_id, text));
    }
}

impl RelayTasks {
    /// Publishes until `stop`: whatever has queued, the latest state per ticket type in
    /// one message per event.
    pub async fn publish(mut self, client: Client, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(GATHER);
        loop {
            tokio::select! {
                n = self.outgoing.recv_many(&mut batch, GATHER) => if n == 0 { return },
                () = stop.cancelled() => return,
            }
            let mut pools: HashMap<EventId, HashMap<TicketTypeId, PoolState>> = HashMap::new();
            let mut messages = Vec::new();
            for change in batch.drain(..) {
                match change {
                    Outgoing::Pools(event, changed) => {
                        let latest = pools.entry(event).or_default();
                        for pool in changed {
                            let newer = latest
                                .get(&pool.ticket_type_id)
                                .is_none_or(|known| known.version < pool.version);
                            if newer {
                                latest.insert(pool.ticket_type_id, pool);
                            }
                        }
                    }
                    Outgoing::User(user, text) => messages.push((
                        &self.users_channel,
                        serde_json::to_string(&UserMessage {
                            node: self.node.clone(),
                            user: user.to_string(),
                            text: text.to_string(),
                        }),
                    )),
                }
            }
            for (event, latest) in pools {
                let message = PoolsMessage {
                    node: self.node.clone(),
                    event: event.to_string(),
                    pools: latest
                        .into_values()
                        .map(|p| (p.ticket_type_id.to_string(), p.available, p.version))
                        .collect(),
                };
                messages.push((&self.pools_channel, serde_json::to_string(&message)));
            }
            // One pipeline per round, within a deadline: a Redis that hangs costs this
            // round's messages (the mirrors catch up at the owners' next republish), never
            // the publisher itself.
            let pipeline = client.pipeline();
            for (channel, text) in messages {
                let Ok(text) = text else { continue };
                let _ = pipeline.publish::<(), _, _>(channel.as_str(), text).await;
            }
            tokio::select! {
                sent = tokio::time::timeout(PUBLISH_TIMEOUT, pipeline.all::<Vec<fred::prelude::Value>>()) => {
                    if !matches!(sent, Ok(Ok(_))) {
                        tracing::warn!("cluster: could not publish changes to the other servers");
                    }
                }
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Listens to the other servers' changes until `stop`, subscribing again after every
/// reconnection. A change of an event not known here (created on another server a moment
/// ago) wakes `unknown_event`, the ownership round, which reads the new events.
pub async fn listen(
    subscriber: Client,
    prefix: String,
    node: String,
    inventory: Arc<Inventory>,
    fanout: Arc<FanOut>,
    unknown_event: Arc<Notify>,
    stop: CancellationToken,
) {
    let pools_channel = format!("{prefix}pools");
    let users_channel = format!("{prefix}users");
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    let _task = subscriber.connect();
    let subscribe = || async {
        loop {
            let channels = vec![pools_channel.clone(), users_channel.clone()];
            match tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscriber.subscribe(channels)).await {
                Ok(Ok(())) => return,
                _ => {
                    tracing::warn!(
                        "cluster: could not subscribe to other servers' changes; retrying"
                    );
                    tokio::time::sleep(SUBSCRIBE_TIMEOUT).await;
                }
            }
        }
    };
    tokio::select! {
        () = async { let _ = subscriber.wait_for_connect().await; subscribe().await } => {}
        () = stop.cancelled() => return,
    }
    loop {
        tokio::select! {
            message = messages.recv() => match message {
                Ok(message) => {
                    let Some(text) = message.value.as_str() else { continue };
                    if *message.channel == *pools_channel {
                        if !apply_pools(&text, &node, &inventory, &fanout) {
                            unknown_event.notify_one();
                        }
                    } else if *message.channel == *users_channel {
                        deliver_user(&text, &node, &fanout);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "cluster: fell behind other servers' changes");
                }
                Err(_) => return,
            },
            Ok(_) = reconnects.recv() => tokio::select! {
                () = subscribe() => {}
                () = stop.cancelled() => break,
            },
            () = stop.cancelled() => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), subscriber.quit()).await;
}

/// Applies another server's pool message to the mirror; `false` if its event is unknown here.
fn apply_pools(text: &str, node: &str, inventory: &Inventory, fanout: &FanOut) -> bool {
    let Ok(message) = serde_json::from_str::<PoolsMessage>(text) else {
        tracing::warn!("cluster: malformed pool message ignored");
        return true;
    };
    let Ok(event) = message.event.parse::<EventId>() else {
        return true;
    };
    if message.node == node {
        return true;
    }
    if inventory.holding(event).is_none() {
        return false;
    }
    let reported: Vec<PoolState> = message
        .pools
        .into_iter()
        .filter_map(|(id, available, version)| {
            Some(PoolState {
                ticket_type_id: id.parse().ok()?,
                available,
                version,
            })
        })
        .collect();
    let changed = inventory.mirror_pools(event, &reported);
    if !changed.is_empty() {
        fanout.pools_changed(event, &changed);
    }
    true
}

fn deliver_user(text: &str, node: &str, fanout: &FanOut) {
    let Ok(message) = serde_json::from_str::<UserMessage>(text) else {
        tracing::warn!("cluster: malformed user message ignored");
        return;
    };
    if message.node == node {
        return;
    }
    if let Ok(user) = message.user.parse::<UserId>() {
        fanout.to_user(user, message.text.into());
    }
}
