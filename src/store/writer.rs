//! The write-behind writer: one task drains a bounded queue and commits everything that
//! has gathered in one transaction (group commit), with a few transactions in flight at
//! once, one per connection of its storage. Each caller is answered after the transaction
//! holding its change commits, so an acknowledged change is durable; a full queue is
//! refused at once rather than queued without bound. The database is behind the
//! [`BatchStorage`] port (`store::batches` for PostgreSQL and SQLite; fakes in the tests).
//!
//! Failures are of three kinds. A row the database refuses fails that change alone. A
//! database that cannot be reached fails the batch, marks storage down, and from then on
//! every new change is refused at once (no waiting for a connection) while the writer
//! probes the database every [`PROBE_EVERY`]. A connection lost during COMMIT leaves the
//! batch's outcome unknown: its callers are held, neither answered nor undone, until a
//! probe gets through and the batch's commit marker tells whether it committed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::reservations::{Change, Fence, IdempotencyRecord};
use super::StoreError;
use crate::metrics::Metrics;

/// Changes waiting for the writer. At 10,000 the server is far behind the database, and
/// new work is refused (`UNAVAILABLE`) instead of piling up.
pub const QUEUE_CAPACITY: usize = 10_000;
/// Most changes in one transaction.
pub const MAX_BATCH: usize = 2_000;
/// How often the writer tries the database while storage is down.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How long one probe (a connection and a round trip) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Commit markers are only read while settling, minutes at most after their batch.
const MARKER_AGE: Duration = Duration::from_secs(600);
const FORGET_MARKERS_EVERY: Duration = Duration::from_secs(60);
/// How long a stopping writer keeps trying to settle batches of unknown outcome.
const SETTLE_AT_EXIT: Duration = Duration::from_secs(10);

/// One change and the idempotency record committed atomically with it.
pub type Entry<'a> = (&'a Change, Option<&'a IdempotencyRecord>);

/// What the writer needs of the database, and nothing more.
#[async_trait]
pub trait BatchStorage: Send + Sync + 'static {
    /// Commits the changes in one transaction together with a marker naming the batch, if
    /// every fence holds (each event's epoch is still the one given; else
    /// [`StoreError::Fenced`]). A failure before COMMIT means nothing was committed; a
    /// failure of COMMIT itself is [`StoreError::OutcomeUnknown`] with the batch's id.
    async fn commit_batch(&self, changes: &[Entry<'_>], fences: &[Fence])
        -> Result<(), StoreError>;
    /// Whether the batch of that id committed (its marker is there).
    async fn batch_committed(&self, batch: &str) -> Result<bool, StoreError>;
    /// A round trip to the database.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Deletes the markers of batches committed before `age` ago; returns how many.
    async fn forget_commit_markers(&self, age: Duration) -> Result<u64, StoreError>;
    /// Closes the connections; commits fail from then on.
    async fn close(&self);
    /// How many commits may be in flight at once (its connections).
    fn connections(&self) -> usize {
        1
    }
}

/// Why a change was not committed. Nothing of it is in the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("the write queue is full")]
    QueueFull,
    #[error("the writer has stopped")]
    Stopped,
    #[error("the database is unreachable")]
    Down,
    #[error("commit failed: {0}")]
    Failed(String),
    /// This server no longer owns the change's event (cluster mode): nothing was sent.
    #[error("the event is owned by another server now")]
    Fenced,
}

/// Whether the database is known to be unreachable: set when a commit (or a health
/// check) cannot reach it, cleared by the writer when a probe gets an answer and every
/// batch of unknown outcome is settled.
#[derive(Debug, Default)]
pub struct StorageHealth {
    down: AtomicBool,
    /// Wakes an idle writer to start probing when someone else found the database down.
    went_down: tokio::sync::Notify,
}

impl StorageHealth {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// The database did not answer; the writer probes until it does.
    pub fn mark_down(&self) {
        if !self.down.swap(true, Ordering::SeqCst) {
            tracing::error!("database unreachable: changes are refused until it answers again");
            self.went_down.notify_one();
        }
    }

    fn mark_up(&self) {
        if self.down.swap(false, Ordering::SeqCst) {
            tracing::info!("database reachable again");
        }
    }
}

struct Job {
    change: Change,
    idempotency: Option<IdempotencyRecord>,
    fence: Option<Fence>,
    done: oneshot::Sender<Result<(), WriteError>>,
}

/// The handle callers submit changes through.
pub struct Writer {
    queue: mpsc::Sender<Job>,
    health: Arc<StorageHealth>,
}

/// A batch whose COMMIT lost its connection, with its callers waiting.
struct Unsettled {
    batch: String,
    jobs: Vec<Job>,
}

/// What the writer's task and its commits in flight share.
struct Shared {
    storage: Arc<dyn BatchStorage>,
    health: Arc<StorageHealth>,
    metrics: Arc<Metrics>,
    /// One permit per commit that may be in flight (per connection of the storage).
    lanes: Arc<Semaphore>,
    lane_count: u32,
    /// Only touched by commits in flight (to add) and by probes that hold every lane.
    unsettled: Mutex<Vec<Unsettled>>,
}

impl Writer {
    /// Starts the writer task with one commit in flight per connection of `storage`
    /// ([`BatchStorage::connections`]). It runs until
    /// `stop` is cancelled (or every handle is dropped), and commits everything queued
    /// before it ends.
    ///
    /// Several commits in flight cannot commit a release or payment before the reservation
    /// it changes:
    /// - A reservation's id leaves the server only in the answer to its reserve, sent after
    ///   the commit; an idempotent replay waits on the key's lock for the first call and
    ///   then reads the stored (committed) answer; recovery loads only committed rows. So a
    ///   client cannot cancel or pay a reservation that is not committed.
    /// - Expiry is scheduled only after the commit. The one path that can reach an
    ///   uncommitted reservation is the sweeper, if a commit takes longer than the whole
    ///   TTL: its release then finds no pending row (`status = 'pending'` is checked and
    ///   counted per row), is refused alone, and is retried by a later sweep.
    /// - The inventory lets one change of a reservation be under way at a time (releasing
    ///   or paying), and the engine begins the next only after the first has its answer.
    pub fn start(
        storage: Arc<dyn BatchStorage>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Writer, JoinHandle<()>) {
        Self::start_with_capacity(storage, QUEUE_CAPACITY, metrics, stop)
    }

    fn start_with_capacity(
        storage: Arc<dyn BatchStorage>,
        capacity: usize,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Writer, JoinHandle<()>) {
        let (queue, jobs) = mpsc::channel(capacity);
        let health = Arc::new(StorageHealth::default());
        let lane_count = u32::try_from(storage.connections().clamp(1, 64)).unwrap_or(1);
        let shared = Arc::new(Shared {
            storage,
            health: Arc::clone(&health),
            metrics,
            lanes: Arc::new(Semaphore::new(lane_count as usize)),
            lane_count,
            unsettled: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(run(shared, jobs, stop));
        (Writer { queue, health }, task)
    }

    /// Whether the database is known to be down (for `/health`, and to refuse early).
    pub fn health(&self) -> &Arc<StorageHealth> {
        &self.health
    }

    /// Queues a change (with the idempotency record it produces, committed atomically with
    /// it, and the fence it must pass in cluster mode) and waits until it is committed.
    pub async fn commit(
        &self,
        change: Change,
        idempotency: Option<IdempotencyRecord>,
        fence: Option<Fence>,
    ) -> Result<(), WriteError> {
        if self.health.is_down() {
            return Err(WriteError::Down);
        }
        let (done, committed) = oneshot::channel();
        let job = Job {
            change,
            idempotency,
            fence,
            done,
        };
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => WriteError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => WriteError::Stopped,
        })?;
        committed.await.unwrap_or(Err(WriteError::Stopped))
    }
}

async fn run(shared: Arc<Shared>, mut jobs: mpsc::Receiver<Job>, stop: CancellationToken) {
    let health = Arc::clone(&shared.health);
    let mut batch = Vec::new();
    let mut stopping = false;
    let mut next_probe = Instant::now();
    let mut forget_markers_at = Instant::now() + FORGET_MARKERS_EVERY;
    loop {
        // A free connection first: while every one is committing, changes gather in the
        // queue and go out together in the next batch.
        let lane = tokio::select! {
            biased;
            () = stop.cancelled(), if !stopping => {
                // Refuse new changes; what is queued is still committed below.
                jobs.close();
                stopping = true;
                continue;
            }
            lane = Arc::clone(&shared.lanes).acquire_owned() => {
                lane.expect("the lanes are never closed")
            }
        };
        // `recv_many` takes what has gathered while the last commits ran, up to MAX_BATCH:
        // batches grow with the load, and an idle server commits each change at once.
        let received = tokio::select! {
            biased;
            received = jobs.recv_many(&mut batch, MAX_BATCH) => received,
            () = stop.cancelled(), if !stopping => {
                jobs.close();
                stopping = true;
                continue;
            }
            () = health.went_down.notified() => continue,
            () = tokio::time::sleep_until(next_probe), if health.is_down() => {
                drop(lane);
                probe_when_idle(&shared).await;
                next_probe = Instant::now() + PROBE_EVERY;
                continue;
            }
        };
        if received == 0 {
            break;
        }
        let mut lane = Some(lane);
        if health.is_down() && Instant::now() >= next_probe {
            lane = None;
            probe_when_idle(&shared).await;
            next_probe = Instant::now() + PROBE_EVERY;
        }
        if health.is_down() {
            // Queued just before the outage was known: refused now, not held for its length.
            for job in batch.drain(..) {
                let _ = job.done.send(Err(WriteError::Down));
            }
            continue;
        }
        let lane = match lane {
            Some(lane) => lane,
            None => acquire(&shared.lanes, 1).await,
        };
        shared.metrics.record_batch(batch.len());
        let jobs_now = std::mem::take(&mut batch);
        let on_lane = Arc::clone(&shared);
        tokio::spawn(async move {
            commit(&on_lane, jobs_now).await;
            drop(lane);
        });
        if Instant::now() >= forget_markers_at && !health.is_down() {
            forget_markers_at = Instant::now() + FORGET_MARKERS_EVERY;
            let _lane = acquire(&shared.lanes, 1).await;
            match shared.storage.forget_commit_markers(MARKER_AGE).await {
                Ok(n) => tracing::debug!(deleted = n, "forgot old commit markers"),
                Err(error) => tracing::warn!(%error, "could not delete old commit markers"),
            }
        }
    }
    // Every commit in flight finishes before the writer settles and closes.
    let _all = acquire(&shared.lanes, shared.lane_count).await;
    let deadline = Instant::now() + SETTLE_AT_EXIT;
    while has_unsettled(&shared) && Instant::now() < deadline {
        tokio::time::sleep(PROBE_EVERY).await;
        probe(&shared).await;
    }
    let unsettled = std::mem::take(&mut *lock(&shared.unsettled));
    for batch in &unsettled {
        tracing::error!(
            batch = %batch.batch,
            size = batch.jobs.len(),
            "stopping with a batch of unknown outcome: its callers get no answer; the next start recovers from the database"
        );
    }
    // Their callers must not be told the batch failed: it may have committed.
    for batch in unsettled {
        std::mem::forget(batch.jobs);
    }
    shared.storage.close().await;
    tracing::info!("writer stopped: every queued change is committed");
}

async fn acquire(lanes: &Arc<Semaphore>, n: u32) -> OwnedSemaphorePermit {
    Arc::clone(lanes)
        .acquire_many_owned(n)
        .await
        .expect("the lanes are never closed")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn has_unsettled(shared: &Shared) -> bool {
    !lock(&shared.unsettled).is_empty()
}

/// Waits until no commit is in flight (so none can add a batch of unknown outcome while
/// the others are settled), then probes.
async fn probe_when_idle(shared: &Shared) {
    let _all = acquire(&shared.lanes, shared.lane_count).await;
    probe(shared).await;
}

/// Tries the database; once it answers, settles every batch of unknown outcome by its
/// marker (answering its callers) and marks storage up. The caller holds every lane.
async fn probe(shared: &Shared) {
    let storage = &shared.storage;
    if !matches!(
        tokio::time::timeout(PROBE_TIMEOUT, storage.ping()).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let mut unsettled = std::mem::take(&mut *lock(&shared.unsettled));
    while let Some(next) = unsettled.last() {
        let committed =
            match tokio::time::timeout(PROBE_TIMEOUT, storage.batch_committed(&next.batch)).await {
                Ok(Ok(committed)) => committed,
                _ => {
                    lock(&shared.unsettled).extend(unsettled);
                    return;
                }
            };
        let Unsettled { batch, jobs } = unsettled.pop().expect("looked at just above");
        tracing::warn!(%batch, size = jobs.len(), committed, "settled a batch of unknown outcome");
        for job in jobs {
            let _ = job.done.send(if committed {
                Ok(())
            } else {
                Err(WriteError::Failed(
                    "the connection was lost before COMMIT completed".into(),
                ))
            });
        }
    }
    shared.health.mark_up();
}

async fn commit(shared: &Shared, batch: Vec<Job>) {
    let (storage, health) = (&shared.storage, &shared.health);
    let changes: Vec<Entry<'_>> = batch
        .iter()
        .map(|j| (&j.change, j.idempotency.as_ref()))
        .collect();
    let mut fences: Vec<Fence> = batch.iter().filter_map(|j| j.fence).collect();
    fences.sort_unstable_by_key(|f| (f.event_id, f.epoch));
    fences.dedup();
    match storage.commit_batch(&changes, &fences).await {
        Ok(()) => {
            drop(changes);
            for job in batch {
                let _ = job.done.send(Ok(()));
            }
        }
        Err(StoreError::OutcomeUnknown { batch: id, cause }) => {
            drop(changes);
            hold(shared, id, &cause, batch);
        }
        // One bad change must not fail the others: when a row broke a rule (a constraint, or
        // a status that was not pending), commit each change alone. A database that is
        // down, locked or slow fails the whole batch instead: retrying one by one would
        // only make each caller wait longer for the same answer.
        Err(error) if batch.len() > 1 && refused_a_row(&error) => {
            drop(changes);
            tracing::warn!(
                size = batch.len(),
                "batch refused; committing its changes one by one"
            );
            for job in batch {
                if health.is_down() {
                    let _ = job.done.send(Err(WriteError::Down));
                    continue;
                }
                let fence: Vec<Fence> = job.fence.into_iter().collect();
                match storage
                    .commit_batch(&[(&job.change, job.idempotency.as_ref())], &fence)
                    .await
                {
                    Ok(()) => {
                        let _ = job.done.send(Ok(()));
                    }
                    Err(StoreError::OutcomeUnknown { batch: id, cause }) => {
                        hold(shared, id, &cause, vec![job]);
                    }
                    Err(error) => {
                        if !refused_a_row(&error) {
                            health.mark_down();
                        }
                        let result = Err(failed(&job.change, error));
                        let _ = job.done.send(result);
                    }
                }
            }
        }
        Err(error) => {
            drop(changes);
            if !refused_a_row(&error) {
                health.mark_down();
            }
            let failure = failed_batch(batch.len(), error);
            for job in batch {
                let _ = job.done.send(Err(failure.clone()));
            }
        }
    }
}

/// Keeps the callers of a batch of unknown outcome waiting until a probe settles it.
fn hold(shared: &Shared, batch: String, cause: &sqlx::Error, jobs: Vec<Job>) {
    tracing::warn!(%batch, size = jobs.len(), %cause, "COMMIT lost its connection: answers held until the database says whether it committed");
    // Held before storage is marked down, so the probe that follows sees it.
    lock(&shared.unsettled).push(Unsettled { batch, jobs });
    shared.health.mark_down();
}

/// Whether an error means the database could not be reached (rather than that it refused).
pub fn unreachable(error: &StoreError) -> bool {
    !refused_a_row(error)
}

/// Whether the database refused a row, as opposed to not being able to commit at all.
fn refused_a_row(error: &StoreError) -> bool {
    match error {
        StoreError::Corrupt { .. } | StoreError::Duplicate(_) | StoreError::Fenced(_) => true,
        StoreError::Database(sqlx::Error::Database(db)) => {
            !matches!(db.kind(), sqlx::error::ErrorKind::Other)
        }
        StoreError::Database(_) | StoreError::OutcomeUnknown { .. } | StoreError::TimedOut(_) => {
            false
        }
    }
}

fn failed(change: &Change, error: StoreError) -> WriteError {
    if let StoreError::Fenced(_) = error {
        tracing::warn!(?change, "change fenced off: its event has another owner");
        return WriteError::Fenced;
    }
    tracing::error!(?change, %error, "change refused by the database");
    WriteError::Failed(error.to_string())
}

fn failed_batch(size: usize, error: StoreError) -> WriteError {
    if let StoreError::Fenced(_) = error {
        return WriteError::Fenced;
    }
    let message = error.to_string();
    tracing::error!(size, error = %message, "commit failed");
    WriteError::Failed(message)
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
