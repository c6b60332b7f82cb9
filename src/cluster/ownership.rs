//! Two loops keep every event owned while any server runs, each every [`TICK`]:
//! - *keep*: advertise this server's address, renew the leases of the events owned here
//!   and of those being taken over (giving up those another server holds now) and
//!   republish their state for the other servers' mirrors. Nothing slow runs here, and it
//!   runs as its own task, so a lease never lapses because a takeover or the database
//!   took its time: an event with hundreds of thousands of pending reservations takes
//!   longer than a lease to rebuild.
//! - *claim* (also woken when an event is created, here or elsewhere): mirror events other
//!   servers created, and claim and take over every event nobody holds.
//!
//! A dead owner's events are served again within [`LEASE`] + [`TICK`] + the rebuild.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::directory::{Directory, LEASE};
use super::relay::Relay;
use crate::core::inventory::{Holding, Inventory};
use crate::core::EventId;
use crate::engine::takeover::TakeoverSource;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// How often leases are renewed and unowned events looked for: a fifth of the lease, so
/// four renewals in a row can fail before an owner loses its events.
pub const TICK: Duration = Duration::from_secs(1);
const _: () = assert!(TICK.as_millis() * 4 < LEASE.as_millis());
/// The least time between two claim rounds, however often they are woken.
const CLAIM_PAUSE: Duration = Duration::from_millis(100);
/// The longest the database reads of one takeover may take. Past it the takeover is
/// abandoned and its lease released, so a rebuild stalled on the database never keeps an
/// event unserved by renewing the lease it claimed.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(60);

pub struct Ownership {
    pub directory: Arc<Directory>,
    pub engine: Arc<Engine>,
    pub inventory: Arc<Inventory>,
    pub source: Arc<dyn TakeoverSource>,
    pub metrics: Arc<Metrics>,
    /// Where the state of owned events is republished.
    pub relay: Arc<Relay>,
    /// Where this server answers, for calls forwarded to it.
    pub base_url: String,
    /// Woken when an event is created here.
    pub claim_now: Arc<Notify>,
    /// Redis failures in a row, to log the first and then every 30th.
    failures: AtomicU64,
    /// Events claimed here and being rebuilt: their leases are renewed with the owned ones.
    /// `true` once a renewal found the lease lost: the event is given up after the rebuild.
    taking_over: Mutex<HashMap<EventId, bool>>,
}

impl Ownership {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        directory: Arc<Directory>,
        engine: Arc<Engine>,
        inventory: Arc<Inventory>,
        source: Arc<dyn TakeoverSource>,
        metrics: Arc<Metrics>,
        relay: Arc<Relay>,
        base_url: String,
        claim_now: Arc<Notify>,
    ) -> Self {
        Self {
            directory,
            engine,
            inventory,
            source,
            metrics,
            relay,
            base_url,
            claim_now,
            failures: AtomicU64::new(0),
            taking_over: Mutex::new(HashMap::new()),
        }
    }

    /// Runs both loops until `stop`, each as its own task: a claim round busy rebuilding
    /// an event never delays a renewal. A loop that fails (a bug) is started again.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let keeper = Arc::clone(&self);
        let claimer = Arc::clone(&self);
        tokio::join!(
            supervise("lease", &stop, move |stop| {
                let this = Arc::clone(&keeper);
                async move { this.keep_loop(&stop).await }
            }),
            supervise("claim", &stop, move |stop| {
                let this = Arc::clone(&claimer);
                async move { this.claim_loop(&stop).await }
            }),
        );
    }

    async fn keep_loop(&self, stop: &CancellationToken) {
        loop {
            tokio::select! {
                () = self.keep() => {}
                () = stop.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn claim_loop(&self, stop: &CancellationToken) {
        loop {
            tokio::select! {
                () = self.claim() => {}
                () = stop.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(CLAIM_PAUSE) => {}
                () = stop.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(TICK - CLAIM_PAUSE) => {}
                () = self.claim_now.notified() => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One keep and one claim round, in that order (at start, before any call). Leases
    /// are renewed meanwhile, as in [`run`](Self::run): the events claimed may take longer
    /// than a lease to rebuild.
    pub async fn round(&self) {
        self.keep().await;
        let claimed = CancellationToken::new();
        tokio::join!(
            async {
                self.claim().await;
                claimed.cancel();
            },
            async {
                tokio::select! {
                    () = tokio::time::sleep(TICK) => self.keep_loop(&claimed).await,
                    () = claimed.cancelled() => {}
                }
            },
        );
    }

    /// The events owned here.
    pub fn owned(&self) -> Vec<EventId> {
        self.split().0
    }

    /// The known events: (owned here, mirrored).
    fn split(&self) -> (Vec<EventId>, Vec<EventId>) {
        let mut owned = Vec::new();
        let mut mirrors = Vec::new();
        for id in self.inventory.event_ids() {
            match self.inventory.holding(id) {
                Some(Holding::Owned { .. }) => owned.push(id),
                Some(Holding::Mirror) => mirrors.push(id),
                None => {}
            }
        }
        (owned, mirrors)
    }

    fn redis_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(30) {
            tracing::warn!(%error, failures = n + 1, "cluster: {what} failed (Redis); owned events are kept, fenced by their epoch");
        }
    }

    /// Advertises, renews, gives up what another server holds now, republishes the rest.
    async fn keep(&self) {
        let mut redis_ok = true;
        if let Err(error) = self.directory.advertise(&self.base_url).await {
            self.redis_failed("advertising this server", &error);
            redis_ok = false;
        }
        let owned = self.owned();
        let mut leased = owned.clone();
        let rebuilding: Vec<EventId> = self.lock_taking_over().keys().copied().collect();
        leased.extend(rebuilding.iter().filter(|event| !owned.contains(event)));
        match self.directory.renew(&leased).await {
            Ok(held) => {
                for (&event, still) in leased.iter().zip(held) {
                    if !owned.contains(&event) {
                        // Being taken over. A lease lost meanwhile (Redis lost it, or it
                        // lapsed before this renewal) gives the event up once the rebuild
                        // is done; if it is done already, the next renewal does.
                        if !still {
                            tracing::warn!(%event, "cluster: lost the lease of an event being taken over");
                            if let Some(lost) = self.lock_taking_over().get_mut(&event) {
                                *lost = true;
                            }
                        }
                        continue;
                    }
                    if still {
                        if let Some(pools) = self.inventory.pools(event) {
                            self.relay.republish(event, pools);
                        }
                    } else {
                        self.engine.give_up(event);
                    }
                }
            }
            // Keep serving: if another server takes an event over meanwhile, its epoch
            // fences this one's commits off, and the first fenced commit gives it up.
            Err(error) => {
                self.redis_failed("renewing leases", &error);
                redis_ok = false;
            }
        }
        if redis_ok {
            self.failures.store(0, Ordering::Relaxed);
        }
        self.metrics.set_owned_events(self.owned().len());
    }

    /// Mirrors new events, then claims and takes over every event nobody holds.
    async fn claim(&self) {
        match self.engine.mirror_new_events(self.source.as_ref()).await {
            Ok(added) if !added.is_empty() => {
                tracing::info!(events = added.len(), "mirrored events created elsewhere");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cluster: could not read the catalog"),
        }
        let (_, mirrors) = self.split();
        let owners = match self.directory.owners(&mirrors).await {
            Ok(owners) => owners,
            Err(error) => {
                self.redis_failed("reading owners", &error);
                return;
            }
        };
        for (&event, owner) in mirrors.iter().zip(owners) {
            let ours = match owner {
                None => match self.directory.claim(event).await {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        self.redis_failed("claiming an event", &error);
                        false
                    }
                },
                // Claimed earlier, and the takeover failed or the event was given up
                // after a fenced commit: take it over (again).
                Some(node) => node == self.directory.node(),
            };
            if ours {
                self.take_over(event).await;
            }
        }
        self.metrics.set_owned_events(self.owned().len());
    }

    fn lock_taking_over(&self) -> std::sync::MutexGuard<'_, HashMap<EventId, bool>> {
        self.taking_over
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a claimed event over, its lease renewed meanwhile, its reads within
    /// [`TAKEOVER_LIMIT`].
    async fn take_over(&self, event: EventId) {
        let rebuilding = Rebuilding::start(self, event);
        let outcome = self
            .engine
            .take_over(event, self.source.as_ref(), TAKEOVER_LIMIT)
            .await;
        let lost = rebuilding.finish();
        match outcome {
            Ok(_) if lost => {
                tracing::warn!(%event, "cluster: took the event over after its lease was lost; giving it up");
                self.engine.give_up(event);
            }
            Ok(_) => self.metrics.record_takeover(),
            // Stalled on the database: the event is still a mirror here; its lease goes now,
            // for any server to claim.
            Err(StoreError::TimedOut(what)) => {
                tracing::error!(%event, limit = ?TAKEOVER_LIMIT, "cluster: takeover abandoned: {what} took too long");
                if let Err(error) = self.directory.release(&[event]).await {
                    self.redis_failed("releasing a lease", &error);
                }
            }
            // The lease stays ours until it lapses; the next round tries again.
            Err(error) => tracing::error!(%event, %error, "cluster: takeover failed"),
        }
    }

    /// At shutdown, after the writer has committed everything: hands the events over now
    /// rather than after the lease.
    pub async fn resign(&self) {
        let owned = self.owned();
        for &event in &owned {
            self.engine.give_up(event);
        }
        match self.directory.resign(&owned).await {
            Ok(()) => tracing::info!(
                events = owned.len(),
                "cluster: gave up this server's events"
            ),
            Err(error) => {
                tracing::warn!(%error, "cluster: could not give the events up; they pass on when the leases lapse")
            }
        }
    }
}

/// Runs the loop `start` makes as a task until `stop`, starting it again (after a pause)
/// if it panics.
async fn supervise<F, Fut>(name: &str, stop: &CancellationToken, start: F)
where
    F: Fn(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while !stop.is_cancelled() {
        if let Err(error) = tokio::spawn(start(stop.clone())).await {
            tracing::error!(%error, "cluster: the {name} loop failed; starting it again");
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = stop.cancelled() => {}
            }
        }
    }
}

/// An event in [`Ownership::taking_over`] for as long as this lives, even if the takeover
/// panics or is dropped.
struct Rebuilding<'a> {
    ownership: &'a Ownership,
    event: EventId,
}

impl<'a> Rebuilding<'a> {
    fn start(ownership: &'a Ownership, event: EventId) -> Self {
        ownership.lock_taking_over().insert(event, false);
        Self { ownership, event }
    }

    /// Ends it; whether the lease was found lost meanwhile.
    fn finish(self) -> bool {
        self.ownership
            .lock_taking_over()
            .get(&self.event)
            .copied()
            .unwrap_or(false)
    }
}

impl Drop for Rebuilding<'_> {
    fn drop(&mut self) {
        self.ownership.lock_taking_over().remove(&self.event);
    }
}
