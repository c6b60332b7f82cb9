//! Expiry: the port told when each pending reservation falls due, with two
//! implementations: Redis key TTLs with keyspace notifications ([`redis`]) and an
//! in-process timer ([`timer`]). Whatever the source (timer, key event, sweeper), a due
//! reservation comes out of one channel, and releasing it is idempotent, so two sources
//! never release twice.

pub mod redis;
pub mod sweeper;
pub mod timer;

use crate::core::{ReservationId, Timestamp};

/// Due reservations waiting for the engine. A full channel makes the source wait; the
/// sweeper catches anything a source had to give up on.
pub const DUE_CAPACITY: usize = 4_096;

/// Schedules and cancels expiries. Calls return at once: they run on the reserve path.
pub trait Expiry: Send + Sync + 'static {
    /// `id` falls due at `at` (now or in the past: at once).
    fn schedule(&self, id: ReservationId, at: Timestamp);
    /// Many reservations at once (recovery, a takeover): the same as [`schedule`](Self::schedule)
    /// for each, but an expiry with a bounded queue may write them some other way than
    /// through it.
    fn schedule_all(&self, due: &[(ReservationId, Timestamp)]) {
        for &(id, at) in due {
            self.schedule(id, at);
        }
    }
    /// `id` was paid or cancelled: it will not fall due.
    fn cancel(&self, id: ReservationId);
    /// For `/health`: `true` when expiries are being delivered.
    fn healthy(&self) -> bool;
}

use std::sync::Arc;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::core::Clock;

/// Where an expiry source delivers, and how it asks for an early sweep (after a Redis
/// reconnect, when notifications may have been lost).
#[derive(Clone)]
pub struct Deliveries {
    pub due: mpsc::Sender<ReservationId>,
    pub sweep_now: Arc<Notify>,
    pub stop: CancellationToken,
}

/// Why expiry could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExpiryStartError {
    #[error("redis: {0}")]
    Redis(String),
}

/// Builds the expiry the settings ask for (Redis with `--redis-url`, else the in-process
/// timer) and starts its task on `tasks`.
pub async fn start(
    settings: &Settings,
    clock: Arc<dyn Clock>,
    deliveries: Deliveries,
    tasks: &TaskTracker,
) -> Result<Arc<dyn Expiry>, ExpiryStartError> {
    match &settings.redis_url {
        Some(url) => {
            let (redis, queue) = redis::RedisExpiry::new(url, &settings.redis_prefix, clock)?;
            tasks.spawn(Arc::clone(&redis).run(queue, deliveries));
            Ok(redis)
        }
        None => {
            let timer = timer::TimerExpiry::new(clock);
            tasks.spawn(Arc::clone(&timer).run(deliveries.due, deliveries.stop));
            Ok(timer)
        }
    }
}
