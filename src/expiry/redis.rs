//! Expiry through Redis: each pending reservation is a key `<prefix>reservation:<id>` with a
//! TTL, and Redis announces its end on `__keyevent@<db>__:expired`.
//!
//! Two connections, both reconnecting forever with backoff, so a Redis that is down when
//! the server starts (or later) never stops it: meanwhile the sweeper releases overdue
//! reservations, and `/health` reports expiry down.
//! - The command connection writes the keys. [`Expiry::schedule`] and [`Expiry::cancel`]
//!   run on the reserve path, so they only push onto a bounded queue; one task drains it in
//!   order and sends what has queued as one pipeline. While Redis is down the task keeps
//!   draining the queue, and when Redis is back (or after any pipeline without an answer)
//!   it first writes the key of every reservation still scheduled again: a Redis that comes
//!   back empty gets its keys back. Only a queue that fills while Redis is up but slow drops
//!   commands, with a warning: a missed `SET` is covered by the sweeper, a missed `DEL` only
//!   costs a no-op expiry.
//! - The subscriber connection listens for expired keys. After every (re)connection it
//!   makes sure the server publishes them (`notify-keyspace-events` with at least `Ex`,
//!   keeping the flags already set), subscribes again, and asks for a sweep: notifications
//!   are fire-and-forget, so those sent while it was away are lost.
//! - Redis only publishes `expired` when it actually deletes the key, and its active
//!   expiry samples keys and tolerates ~10 % of expired ones lingering: measured here, 500
//!   keys due together are announced p50 1.4 s / max 2.8 s late beside 2,000 other volatile
//!   keys, and p50 18 s (most not within 40 s) beside 20,000, which is a normal number of
//!   pending reservations. So the server also keeps the due times (the in-process
//!   [`TimerExpiry`]) and at each one *pokes* the key with `PTTL`, through the same ordered
//!   queue: reading an expired key makes Redis delete it and publish the event at once; a
//!   key not quite due yet is poked again when its `PTTL` says. Redis still decides and
//!   announces every expiry; the poke only makes it punctual.
//!
//! A notification is only a hint: the engine releases a reservation only if it is still
//! pending and due, and keys of other prefixes (other servers sharing this Redis) or that
//! do not name a reservation are ignored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{
    Builder, Client, ClientInterface, ClientLike, Config, ConfigInterface, EventInterface,
    Expiration, KeysInterface, PubsubInterface, ReconnectPolicy, ServerConfig, Value,
};
use fred::types::{ConnectHandle, KeyspaceEvent};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::timer::TimerExpiry;
use super::{Deliveries, Expiry, ExpiryStartError};
use crate::core::{Clock, ReservationId, Timestamp};

/// Key commands waiting for the command connection. Beyond this, commands are dropped
/// (see the module doc); while Redis is down the queue fills up and then drops.
const QUEUE_CAPACITY: usize = 32_768;
/// Most commands sent in one pipeline.
const PIPELINE_MAX: usize = 1_024;
/// How long one pipeline or one subscriber step may take before it counts as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff: 50 ms doubling up to 2 s, forever (0 attempts = no limit).
const RECONNECT_MIN_MS: u32 = 50;
const RECONNECT_MAX_MS: u32 = 2_000;
/// Keyspace events buffered between the connection and the listener; an overflow loses
/// some, which the listener notices and answers with a sweep.
const EVENT_BUFFER: usize = 16_384;
/// How soon a failed resubscription is tried again when no reconnection comes first.
const RESUBSCRIBE_RETRY: Duration = Duration::from_secs(1);
/// How often the key writer looks again while the command connection is down.
const RECONNECT_POLL: Duration = Duration::from_millis(50);
/// Due keys handed from the poke timer to the queue at once.
const POKE_BUFFER: usize = 1_024;
/// [`Expiry::schedule_all`] hands reservations due sooner than this to the re-arm to be
/// poked only once their `SET` has gone out; the rest go straight on the poke schedule, as
/// the re-arm writes them well before their pokes could come due (it writes a million keys
/// in seconds).
const REARM_HORIZON: Duration = Duration::from_secs(30);
/// How long quitting a client may take at shutdown.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);

/// A change to one reservation's key, in the order the engine asked for it.
#[derive(Debug, Clone, Copy)]
enum KeyCommand {
    /// `SET key 1 PX <ms until at>`, the TTL computed when sent.
    Set { id: ReservationId, at: Timestamp },
    /// `DEL key`.
    Delete(ReservationId),
    /// `PTTL key` once the key is due: makes Redis expire it (and announce it) now.
    Poke(ReservationId),
}

/// The receiving end of the key queue, handed to [`RedisExpiry::run`].
pub struct KeyQueue(mpsc::Receiver<KeyCommand>);

/// The Redis expiry.
pub struct RedisExpiry {
    queue: mpsc::Sender<KeyCommand>,
    /// Commands dropped because the queue was full, for throttled warnings.
    dropped: AtomicU64,
    /// `<prefix>reservation:`: every key this server writes starts with it.
    key_prefix: String,
    /// `__keyevent@<db>__:expired`.
    channel: String,
    /// The subscriber connection's name in `CLIENT LIST`: `<prefix>expiry-events`.
    subscriber_name: String,
    commands: Client,
    subscriber: Client,
    /// The subscriber is subscribed on its current connection. Cleared at every
    /// reconnection until the subscription is made again.
    subscribed: AtomicBool,
    /// When each key is due, for the pokes. Kept in step with the keys: scheduled with
    /// `SET`, cancelled with `DEL`.
    pokes: Arc<TimerExpiry>,
    /// A connection error was logged and no subscription made since: logs once per outage.
    outage: AtomicBool,
    /// Many keys were scheduled at once ([`Expiry::schedule_all`]): the key writer writes
    /// every scheduled key from the poke schedule, in pipelines, rather than each through
    /// the bounded queue. Woken by `rearm_wake`.
    rearm_wanted: AtomicBool,
    rearm_wake: tokio::sync::Notify,
    /// Scheduled all at once and due within [`REARM_HORIZON`]: written by the next re-arm,
    /// and put on the poke schedule after it.
    due_soon: std::sync::Mutex<Vec<(ReservationId, Timestamp)>>,
    clock: Arc<dyn Clock>,
}

impl RedisExpiry {
    /// Parses the URL and builds both clients; nothing connects before [`run`](Self::run).
    /// Only a URL that cannot work is an error, never an unreachable server.
    pub fn new(
        url: &str,
        prefix: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<(Arc<Self>, KeyQueue), ExpiryStartError> {
        let config = parse_url(url).map_err(ExpiryStartError::Redis)?;
        let db = config.database.unwrap_or(0);
        let commands = build_client(&config, 32)?;
        let subscriber = build_client(&config, EVENT_BUFFER)?;
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let expiry = Arc::new(Self {
            queue,
            dropped: AtomicU64::new(0),
            key_prefix: format!("{prefix}reservation:"),
            channel: format!("__keyevent@{db}__:expired"),
            // Redis refuses spaces and control characters in a connection name.
            subscriber_name: format!("{prefix}expiry-events")
                .chars()
                .map(|c| if c.is_ascii_graphic() { c } else { '_' })
                .collect(),
            commands,
            subscriber,
            subscribed: AtomicBool::new(false),
            outage: AtomicBool::new(false),
            rearm_wanted: AtomicBool::new(false),
            rearm_wake: tokio::sync::Notify::new(),
            due_soon: std::sync::Mutex::new(Vec::new()),
            pokes: TimerExpiry::new(Arc::clone(&clock)),
            clock,
        });
        Ok((expiry, KeyQueue(receiver)))
    }

    /// Connects both clients, writes keys and delivers expired ones until
    /// `deliveries.stop` is cancelled, then quits both clients.
    pub async fn run(self: Arc<Self>, queue: KeyQueue, deliveries: Deliveries) {
        // Listen before connecting: the first connection is announced as a reconnection.
        let reconnects = self.subscriber.reconnect_rx();
        let events = self.subscriber.keyspace_event_rx();
        let errors = self.subscriber.error_rx();
        let subscriber_task = self.subscriber.connect();
        let commands_task = self.commands.connect();
        let (due_keys, due_keys_rx) = mpsc::channel(POKE_BUFFER);
        tokio::join!(
            Arc::clone(&self.pokes).run(due_keys, deliveries.stop.clone()),
            self.poke_due_keys(due_keys_rx, &deliveries.stop),
            self.write_keys(queue.0, &deliveries.stop),
            self.listen(reconnects, events, errors, &deliveries),
        );
        tokio::join!(
            quit(&self.subscriber, subscriber_task),
            quit(&self.commands, commands_task),
        );
    }

    fn lock_due_soon(&self) -> std::sync::MutexGuard<'_, Vec<(ReservationId, Timestamp)>> {
        self.due_soon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn key(&self, id: ReservationId) -> String {
        format!("{}{id}", self.key_prefix)
    }

    fn enqueue(&self, command: KeyCommand) {
        match self.queue.try_send(command) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Warn at the 1st, 2nd, 4th, 8th… drop: visible, but not one line each.
                if dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped,
                        "Redis expiry queue full (is Redis slow or down?): key command dropped; \
                         the sweeper releases reservations Redis misses"
                    );
                }
            }
            // Shutting down.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Queues a poke for each key as it falls due, behind the commands already queued for
    /// it (so never before its `SET`). Waits when the queue is full: the timer keeps the
    /// rest, and the sweeper covers any lateness.
    async fn poke_due_keys(
        &self,
        mut due: mpsc::Receiver<ReservationId>,
        stop: &CancellationToken,
    ) {
        loop {
            let id = tokio::select! {
                id = due.recv() => match id { Some(id) => id, None => return },
                () = stop.cancelled() => return,
            };
            tokio::select! {
                sent = self.queue.send(KeyCommand::Poke(id)) => if sent.is_err() { return },
                () = stop.cancelled() => return,
            }
        }
    }

    /// Drains the queue in order, a pipeline at a time, while the command connection is up.
    ///
    /// Whenever commands may not have reached Redis (it was down, it reconnected, or a
    /// pipeline got no answer), every scheduled key is written again from the schedule
    /// before anything else: a Redis that comes back empty gets its keys back. While Redis
    /// is down the queue is drained rather than left to fill: `SET`s and `DEL`s are dropped
    /// (the re-arm rewrites every key still scheduled; a missed `DEL` only costs a no-op
    /// expiry), and the reservations whose pokes came due meanwhile are re-armed as due now.
    async fn write_keys(&self, mut queue: mpsc::Receiver<KeyCommand>, stop: &CancellationToken) {
        let mut reconnects = self.commands.reconnect_rx();
        let mut batch = Vec::with_capacity(PIPELINE_MAX);
        let mut rearm = false;
        let mut due_meanwhile = Vec::new();
        loop {
            tokio::select! {
                received = queue.recv_many(&mut batch, PIPELINE_MAX) => if received == 0 { return },
                () = self.rearm_wake.notified() => {}
                () = stop.cancelled() => return,
            }
            if self.rearm_wanted.swap(false, Ordering::SeqCst) {
                rearm = true;
            }
            if !self.commands.is_connected() {
                rearm = true;
                keep_pokes(&mut batch, &mut due_meanwhile);
                while !self.commands.is_connected() {
                    tokio::select! {
                        () = tokio::time::sleep(RECONNECT_POLL) => {}
                        received = queue.recv_many(&mut batch, PIPELINE_MAX) => {
                            if received == 0 { return }
                            keep_pokes(&mut batch, &mut due_meanwhile);
                        }
                        () = stop.cancelled() => return,
                    }
                }
            }
            while reconnects.try_recv().is_ok() {
                rearm = true;
            }
            if rearm {
                tokio::select! {
                    done = self.rearm(&mut due_meanwhile) => rearm = !done,
                    () = stop.cancelled() => return,
                }
            }
            if !batch.is_empty() {
                tokio::select! {
                    answered = self.send(&batch) => if !answered { rearm = true },
                    () = stop.cancelled() => return,
                }
                batch.clear();
            }
        }
    }

    /// Writes the key of every scheduled reservation again (and of those that fell due
    /// while Redis was away, as due now, poked again after). `false` if Redis failed
    /// meanwhile: tried again before the next commands.
    async fn rearm(&self, due_meanwhile: &mut Vec<ReservationId>) -> bool {
        let now = self.clock.now();
        let due_soon = std::mem::take(&mut *self.lock_due_soon());
        let mut commands: Vec<KeyCommand> = self
            .pokes
            .scheduled()
            .into_iter()
            .chain(due_soon.iter().copied())
            .map(|(id, at)| KeyCommand::Set { id, at })
            .collect();
        commands.extend(
            due_meanwhile
                .iter()
                .map(|&id| KeyCommand::Set { id, at: now }),
        );
        tracing::info!(
            keys = commands.len(),
            "re-arming the Redis key of every pending reservation"
        );
        for chunk in commands.chunks(PIPELINE_MAX) {
            if !self.send(chunk).await {
                // Written again by the next re-arm.
                self.lock_due_soon().extend(due_soon);
                return false;
            }
        }
        for (id, at) in due_soon {
            self.pokes.schedule(id, at);
        }
        // Poked through the queue, so after the SETs just sent.
        for id in due_meanwhile.drain(..) {
            self.pokes.schedule(id, now);
        }
        true
    }

    /// Sends one pipeline; `false` when Redis did not answer it (or refused commands).
    async fn send(&self, batch: &[KeyCommand]) -> bool {
        let pipeline = self.commands.pipeline();
        let now = self.clock.now();
        // What went into the pipeline, in order, to read the answers against.
        let mut sent = Vec::with_capacity(batch.len());
        for command in batch {
            // Queuing in the pipeline is local: it fails only for a malformed command.
            let queued: Result<(), fred::error::Error> = match *command {
                KeyCommand::Set { id, at } => {
                    let ttl_ms = i64::try_from(now.until(at).as_millis())
                        .unwrap_or(i64::MAX)
                        .max(1);
                    pipeline
                        .set(self.key(id), 1, Some(Expiration::PX(ttl_ms)), None, false)
                        .await
                }
                KeyCommand::Delete(id) => pipeline.del(self.key(id)).await,
                KeyCommand::Poke(id) => pipeline.pttl(self.key(id)).await,
            };
            match queued {
                Ok(()) => sent.push(*command),
                Err(error) => tracing::warn!(%error, "could not queue a Redis key command"),
            }
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, pipeline.try_all::<Value>()).await {
            Ok(results) => {
                let mut failed = 0;
                let mut first_error = None;
                for (command, result) in sent.iter().zip(results) {
                    match (command, result) {
                        // Not quite due by Redis's clock (the SET went out a little after
                        // its TTL was computed): poke again when it is. 0 means under a
                        // millisecond left, still there; -2 means gone: expired now, and
                        // announced, or deleted.
                        (KeyCommand::Poke(id), Ok(Value::Integer(left_ms))) if left_ms >= 0 => {
                            let again = self
                                .clock
                                .now()
                                .saturating_add(Duration::from_millis(left_ms as u64 + 1));
                            self.pokes.schedule(*id, again);
                        }
                        (_, Ok(_)) => {}
                        (_, Err(error)) => {
                            failed += 1;
                            first_error.get_or_insert(error);
                        }
                    }
                }
                if let Some(error) = first_error {
                    tracing::warn!(failed, %error, "Redis refused expiry key commands; re-arming");
                    return false;
                }
                true
            }
            Err(_) => {
                tracing::warn!(
                    commands = batch.len(),
                    "Redis did not answer expiry key commands in time; re-arming"
                );
                false
            }
        }
    }

    /// Resubscribes after every (re)connection and turns expired keys into due reservations.
    async fn listen(
        &self,
        mut reconnects: broadcast::Receiver<fred::types::config::Server>,
        mut events: broadcast::Receiver<KeyspaceEvent>,
        mut errors: broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>,
        deliveries: &Deliveries,
    ) {
        let mut retry_at: Option<Instant> = None;
        loop {
            tokio::select! {
                () = deliveries.stop.cancelled() => return,
                error = errors.recv() => match error {
                    // Said once per outage; fred retries on its own.
                    Ok((error, _)) => if !self.outage.swap(true, Ordering::SeqCst) {
                        tracing::warn!(%error, "Redis unreachable: expiry is down until it is back (the sweeper releases overdue reservations meanwhile)");
                    },
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        retry_at = self.on_connected(deliveries).await;
                    }
                    Err(RecvError::Closed) => return,
                },
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    retry_at = self.on_connected(deliveries).await;
                }
                event = events.recv() => match event {
                    Ok(event) => {
                        let Some(id) = self.reservation_of(&event) else { continue };
                        tokio::select! {
                            sent = deliveries.due.send(id) => if sent.is_err() { return },
                            () = deliveries.stop.cancelled() => return,
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "fell behind on Redis expiry notifications; sweeping");
                        deliveries.sweep_now.notify_one();
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    /// Makes the fresh subscriber connection useful: key events on, subscribed, then a
    /// sweep for what was missed meanwhile. On failure, says when to try again.
    async fn on_connected(&self, deliveries: &Deliveries) -> Option<Instant> {
        self.subscribed.store(false, Ordering::SeqCst);
        let subscribed = tokio::select! {
            subscribed = async {
                self.name_connection().await;
                self.enable_expired_events().await;
                tokio::time::timeout(COMMAND_TIMEOUT, self.subscriber.subscribe(self.channel.as_str())).await
            } => subscribed,
            () = deliveries.stop.cancelled() => return None,
        };
        match subscribed {
            Ok(Ok(())) => {
                self.subscribed.store(true, Ordering::SeqCst);
                if self.outage.swap(false, Ordering::SeqCst) {
                    tracing::info!("Redis reachable again");
                }
                tracing::info!(channel = %self.channel, "Redis expiry subscribed; sweeping for what was missed");
                deliveries.sweep_now.notify_one();
                None
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, channel = %self.channel, "could not subscribe to Redis expiry events; retrying");
                Some(Instant::now() + RESUBSCRIBE_RETRY)
            }
            Err(_) => {
                tracing::warn!(channel = %self.channel, "Redis did not answer SUBSCRIBE in time; retrying");
                Some(Instant::now() + RESUBSCRIBE_RETRY)
            }
        }
    }

    /// `CLIENT SETNAME <prefix>expiry-events`, so an operator (or a test) can tell this
    /// server's subscriber apart in `CLIENT LIST`. Best effort.
    async fn name_connection(&self) {
        let named = tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.subscriber
                .client_setname(self.subscriber_name.as_str()),
        )
        .await;
        if let Ok(Err(error)) = named {
            tracing::debug!(%error, "could not name the Redis expiry subscriber");
        }
    }

    /// `CONFIG GET` / merge / `CONFIG SET` of `notify-keyspace-events`, on the subscriber
    /// connection before it subscribes. A refusal (managed Redis) is one warning: the
    /// server may be configured already, and the sweeper releases regardless.
    async fn enable_expired_events(&self) {
        const PARAMETER: &str = "notify-keyspace-events";
        let current = tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.subscriber
                .config_get::<std::collections::HashMap<String, String>, _>(PARAMETER),
        )
        .await;
        let current = match current {
            Ok(Ok(values)) => values.get(PARAMETER).cloned().unwrap_or_default(),
            Ok(Err(error)) => {
                tracing::warn!(%error, "Redis refused CONFIG GET {PARAMETER}: make sure it includes 'Ex', or expiries only happen through the sweeper (up to 5 s late)");
                return;
            }
            Err(_) => {
                tracing::warn!("Redis did not answer CONFIG GET {PARAMETER} in time");
                return;
            }
        };
        let Some(flags) = with_expired_events(&current) else {
            return;
        };
        let set = tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.subscriber.config_set(PARAMETER, flags.as_str()),
        )
        .await;
        match set {
            Ok(Ok(())) => {
                tracing::info!(was = %current, now = %flags, "enabled Redis expired-key events ({PARAMETER})")
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, current = %current, "Redis refused CONFIG SET {PARAMETER} {flags}: set it to include 'Ex' on the server, or expiries only happen through the sweeper (up to 5 s late)")
            }
            Err(_) => tracing::warn!("Redis did not answer CONFIG SET {PARAMETER} in time"),
        }
    }

    /// The reservation an expired key names, if the key is one of ours.
    fn reservation_of(&self, event: &KeyspaceEvent) -> Option<ReservationId> {
        if event.operation != "expired" {
            return None;
        }
        let key = event.key.as_str()?;
        let id = key.strip_prefix(self.key_prefix.as_str())?;
        match id.parse() {
            Ok(id) => Some(id),
            Err(_) => {
                tracing::debug!(
                    key,
                    "ignored an expired key under our prefix that names no reservation"
                );
                None
            }
        }
    }
}

impl Expiry for RedisExpiry {
    fn schedule(&self, id: ReservationId, at: Timestamp) {
        self.enqueue(KeyCommand::Set { id, at });
        self.pokes.schedule(id, at);
    }

    /// All of them are written by a re-arm, which rewrites the key of every scheduled
    /// reservation in pipelines of [`PIPELINE_MAX`]: a takeover of an event with hundreds
    /// of thousands pending (or a start after downtime, with many overdue) neither overflows
    /// the queue nor crowds live reserves out of it. Those due within [`REARM_HORIZON`]
    /// (overdue ones included) are put on the poke schedule only after the re-arm has
    /// written their keys, so no poke finds a key not yet written; the rest go on it now. A
    /// `DEL` queued before the re-arm has already taken a scheduled reservation off the
    /// schedule; one queued after goes out after it (a reservation paid before its re-arm
    /// costs at most a no-op expiry).
    fn schedule_all(&self, due: &[(ReservationId, Timestamp)]) {
        if due.is_empty() {
            return;
        }
        let soon = self.clock.now().saturating_add(REARM_HORIZON);
        {
            let mut due_soon = self.lock_due_soon();
            for &(id, at) in due {
                if at <= soon {
                    due_soon.push((id, at));
                } else {
                    self.pokes.schedule(id, at);
                }
            }
        }
        self.rearm_wanted.store(true, Ordering::SeqCst);
        self.rearm_wake.notify_one();
    }

    fn cancel(&self, id: ReservationId) {
        self.pokes.cancel(id);
        self.enqueue(KeyCommand::Delete(id));
    }

    fn healthy(&self) -> bool {
        self.commands.is_connected()
            && self.subscriber.is_connected()
            && self.subscribed.load(Ordering::SeqCst)
    }
}

/// Empties `batch` while Redis is down, keeping only the reservations whose pokes came due
/// (see [`RedisExpiry::write_keys`]).
fn keep_pokes(batch: &mut Vec<KeyCommand>, due: &mut Vec<ReservationId>) {
    for command in batch.drain(..) {
        if let KeyCommand::Poke(id) = command {
            due.push(id);
        }
    }
}

/// Whether `url` can work as `REDIS_URL`: a single server over plain TCP, with a valid
/// host, port and database number. For validating the setting before anything starts.
pub fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(|_| ())
}

pub(crate) fn parse_url(url: &str) -> Result<Config, String> {
    if url.starts_with("rediss://") {
        return Err("rediss:// (TLS) is not supported by this build; use redis://".into());
    }
    let config =
        Config::from_url(url).map_err(|e| format!("invalid REDIS_URL: {}", e.details()))?;
    if !matches!(config.server, ServerConfig::Centralized { .. }) {
        return Err("only a single Redis server is supported, not a cluster or sentinels".into());
    }
    Ok(config)
}

/// A client that retries forever with backoff, also for its first connection.
pub(crate) fn build_client(config: &Config, events: usize) -> Result<Client, ExpiryStartError> {
    let mut config = config.clone();
    config.fail_fast = false;
    Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            RECONNECT_MIN_MS,
            RECONNECT_MAX_MS,
            2,
        ))
        .with_connection_config(|connection| {
            connection.connection_timeout = COMMAND_TIMEOUT;
            connection.internal_command_timeout = COMMAND_TIMEOUT;
        })
        .with_performance_config(|performance| {
            performance.broadcast_channel_capacity = events;
        })
        .build()
        .map_err(|e| ExpiryStartError::Redis(format!("invalid REDIS_URL: {}", e.details())))
}

/// Quits a client, and stops its connection task if quitting does not end it in time.
/// A client waiting to reconnect has nobody to say goodbye to: its task is just stopped.
async fn quit(client: &Client, mut task: ConnectHandle) {
    if client.is_connected() {
        let _ = tokio::time::timeout(QUIT_TIMEOUT, client.quit()).await;
        if tokio::time::timeout(QUIT_TIMEOUT, &mut task).await.is_ok() {
            return;
        }
    }
    task.abort();
}

/// The `notify-keyspace-events` flags that publish expired-key events on the keyevent
/// channel (`E` + `x`), keeping those already set; `None` when they already do.
fn with_expired_events(current: &str) -> Option<String> {
    let keyevent = current.contains('E');
    // `A` is the alias for every event class, `x` included.
    let expired = current.contains('x') || current.contains('A');
    if keyevent && expired {
        return None;
    }
    let mut flags = current.to_owned();
    if !keyevent {
        flags.push('E');
    }
    if !expired {
        flags.push('x');
    }
    Some(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::SystemClock;

    #[test]
    fn expired_events_are_added_to_the_flags_already_set() {
        assert_eq!(with_expired_events(""), Some("Ex".to_owned()));
        assert_eq!(with_expired_events("Kg"), Some("KgEx".to_owned()));
        assert_eq!(with_expired_events("xK"), Some("xKE".to_owned()));
        assert_eq!(with_expired_events("E$"), Some("E$x".to_owned()));
        assert_eq!(with_expired_events("xE"), None);
        assert_eq!(with_expired_events("AKE"), None);
    }

    fn expiry(url: &str, prefix: &str) -> Arc<RedisExpiry> {
        RedisExpiry::new(url, prefix, Arc::new(SystemClock))
            .expect("valid URL")
            .0
    }

    fn expired(key: &str) -> KeyspaceEvent {
        KeyspaceEvent {
            db: 0,
            operation: "expired".into(),
            key: key.into(),
        }
    }

    #[test]
    fn only_expired_keys_of_our_prefix_naming_a_reservation_are_ours() {
        let expiry = expiry("redis://127.0.0.1:6379", "ours:");
        let id = ReservationId::new();
        assert_eq!(
            expiry.reservation_of(&expired(&format!("ours:reservation:{id}"))),
            Some(id)
        );
        for key in [
            format!("theirs:reservation:{id}"),
            format!("ours:reservation:{id}x"),
            "ours:reservation:not-an-id".to_owned(),
            format!("ours:other:{id}"),
            format!("{id}"),
        ] {
            assert_eq!(expiry.reservation_of(&expired(&key)), None, "{key}");
        }
        let mut evicted = expired(&format!("ours:reservation:{id}"));
        evicted.operation = "evicted".into();
        assert_eq!(expiry.reservation_of(&evicted), None);
    }

    #[test]
    fn the_database_of_the_url_names_the_channel() {
        assert_eq!(
            expiry("redis://127.0.0.1:6379", "p:").channel,
            "__keyevent@0__:expired"
        );
        assert_eq!(
            expiry("redis://127.0.0.1:6379/3", "p:").channel,
            "__keyevent@3__:expired"
        );
    }

    #[test]
    fn a_url_that_cannot_work_is_refused() {
        for url in [
            "redis://127.0.0.1:notaport",
            "redis://127.0.0.1:6379/notadb",
            "redis://",
            "rediss://127.0.0.1:6379",
        ] {
            assert!(
                RedisExpiry::new(url, "p:", Arc::new(SystemClock)).is_err(),
                "{url}"
            );
        }
    }
}
