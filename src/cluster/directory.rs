//! Who owns what, kept in Redis: each event's owner as a lease
//! (`<prefix>owner:<event>` = node id, set with `NX` and a TTL, renewed by its holder), and
//! each live server's address (`<prefix>node:<node>` = base URL, with the same TTL), so a
//! server that dies disappears from both within [`LEASE`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::prelude::{
    Client, ClientLike, Expiration, KeysInterface, LuaInterface, SetOptions, Value,
};

use crate::core::EventId;
use crate::expiry::redis::{build_client, parse_url};

/// How long an owner keeps an event without renewing; a dead owner's events are taken over
/// after at most this long (plus one [`super::ownership::TICK`]).
pub const LEASE: Duration = Duration::from_secs(5);
/// How long one Redis command may take: fred waits forever by default (and queues
/// commands while it reconnects), and a lease is only worth its renewal in time.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Renews every lease in `KEYS` held by `ARGV[1]` for `ARGV[2]` ms; 1 per key renewed, 0 per
/// key another server holds or that has lapsed (then it is not this server's any more).
const RENEW: &str = "local out = {} \
    for i, key in ipairs(KEYS) do \
      if redis.call('GET', key) == ARGV[1] then \
        redis.call('PEXPIRE', key, ARGV[2]) out[i] = 1 \
      else out[i] = 0 end \
    end \
    return out";

/// Deletes every lease in `KEYS` still held by `ARGV[1]` (a server stopping hands its events
/// over at once instead of after the lease).
const RESIGN: &str = "local n = 0 \
    for _, key in ipairs(KEYS) do \
      if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) n = n + 1 end \
    end \
    return n";

/// A client for the relay's subscriptions (a subscribed connection takes no other
/// commands).
pub fn subscriber_for(url: &str) -> Result<Client, String> {
    let config = parse_url(url)?;
    build_client(&config, 65_536).map_err(|e| e.to_string())
}

/// The Redis side of cluster mode.
pub struct Directory {
    node: String,
    prefix: String,
    client: Client,
    /// Whether the last round trip worked, for `/health`.
    up: AtomicBool,
}

pub type RedisError = fred::error::Error;

impl Directory {
    /// Builds the client; it connects (and reconnects) in the background.
    pub fn new(url: &str, prefix: &str, node: &str) -> Result<Self, String> {
        let config = parse_url(url)?;
        let client = build_client(&config, 16).map_err(|e| e.to_string())?;
        Ok(Self {
            node: node.to_owned(),
            prefix: prefix.to_owned(),
            client,
            up: AtomicBool::new(false),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Starts connecting; waits up to `within` for the first connection.
    pub async fn connect(&self, within: Duration) -> bool {
        let _task = self.client.connect();
        tokio::time::timeout(within, self.client.wait_for_connect())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn healthy(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Runs one command within [`COMMAND_TIMEOUT`] and notes whether Redis answered.
    async fn timed<T>(
        &self,
        command: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let result = tokio::time::timeout(COMMAND_TIMEOUT, command)
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::new(
                    fred::error::ErrorKind::Timeout,
                    "Redis did not answer in time",
                ))
            });
        self.up.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    fn owner_key(&self, event: EventId) -> String {
        format!("{}owner:{event}", self.prefix)
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}node:{node}", self.prefix)
    }

    fn lease_ms() -> i64 {
        LEASE.as_millis() as i64
    }

    /// Says where this server answers, for [`LEASE`].
    pub async fn advertise(&self, base_url: &str) -> Result<(), RedisError> {
        let set = self.client.set::<Value, _, _>(
            self.node_key(&self.node),
            base_url,
            Some(Expiration::PX(Self::lease_ms())),
            None,
            false,
        );
        self.timed(set).await.map(drop)
    }

    /// Takes this server's node id for its lifetime: `false` if a live server at another
    /// address advertises it (two servers with one id would renew each other's leases).
    pub async fn take_node_id(&self, base_url: &str) -> Result<bool, RedisError> {
        let set = self.client.set::<Option<String>, _, _>(
            self.node_key(&self.node),
            base_url,
            Some(Expiration::PX(Self::lease_ms())),
            Some(SetOptions::NX),
            false,
        );
        if self.timed(set).await?.is_some() {
            return Ok(true);
        }
        let held: Option<String> = self
            .timed(self.client.get(self.node_key(&self.node)))
            .await?;
        Ok(held.as_deref() == Some(base_url))
    }

    /// Takes the lease of an event nobody holds; `false` if somebody does.
    pub async fn claim(&self, event: EventId) -> Result<bool, RedisError> {
        let set = self.client.set::<Option<String>, _, _>(
            self.owner_key(event),
            self.node.as_str(),
            Some(Expiration::PX(Self::lease_ms())),
            Some(SetOptions::NX),
            false,
        );
        self.timed(set).await.map(|answer| answer.is_some())
    }

    /// Renews the leases of `events`; per event, whether it is still this server's.
    pub async fn renew(&self, events: &[EventId]) -> Result<Vec<bool>, RedisError> {
        if events.is_empty() {
            return self
                .timed(self.client.ping::<Value>(None))
                .await
                .map(|_| Vec::new());
        }
        let keys: Vec<String> = events.iter().map(|e| self.owner_key(*e)).collect();
        let args = vec![self.node.clone(), Self::lease_ms().to_string()];
        let renewed: Vec<i64> = self.timed(self.client.eval(RENEW, keys, args)).await?;
        Ok(renewed.into_iter().map(|n| n == 1).collect())
    }

    /// The owner of each event (`None` where nobody holds it).
    pub async fn owners(&self, events: &[EventId]) -> Result<Vec<Option<String>>, RedisError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = events.iter().map(|e| self.owner_key(*e)).collect();
        self.timed(self.client.mget(keys)).await
    }

    pub async fn owner(&self, event: EventId) -> Result<Option<String>, RedisError> {
        self.timed(self.client.get(self.owner_key(event))).await
    }

    /// Where a live server answers; `None` if it is not (or no longer) advertised.
    pub async fn address(&self, node: &str) -> Result<Option<String>, RedisError> {
        self.timed(self.client.get(self.node_key(node))).await
    }

    /// Gives up the leases of `events` still held, and this server's address.
    /// Deletes the leases of `events` this server holds, so another server may claim them
    /// at once (a takeover abandoned), keeping this server's address advertised.
    pub async fn release(&self, events: &[EventId]) -> Result<(), RedisError> {
        let keys: Vec<String> = events.iter().map(|e| self.owner_key(*e)).collect();
        if !keys.is_empty() {
            let _: i64 = self
                .timed(self.client.eval(RESIGN, keys, vec![self.node.clone()]))
                .await?;
        }
        Ok(())
    }

    pub async fn resign(&self, events: &[EventId]) -> Result<(), RedisError> {
        let keys: Vec<String> = events.iter().map(|e| self.owner_key(*e)).collect();
        if !keys.is_empty() {
            let _: i64 = self
                .client
                .eval(RESIGN, keys, vec![self.node.clone()])
                .await?;
        }
        let _: i64 = self.client.del(self.node_key(&self.node)).await?;
        Ok(())
    }

    pub async fn quit(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.quit()).await;
    }
}
