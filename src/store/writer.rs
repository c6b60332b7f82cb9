//! The write-behind writer: one task drains a bounded queue and commits everything that
//! has gathered in one transaction (group commit). Each caller is answered after the
//! transaction holding its change commits, so an acknowledged change is durable; a full
//! queue is refused at once rather than queued without bound.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::reservations::{Change, IdempotencyRecord};
use super::{Store, StoreError};
use crate::metrics::Metrics;

/// Changes waiting for the writer. At 10,000 the server is far behind the database, and
/// new work is refused (`UNAVAILABLE`) instead of piling up.
pub const QUEUE_CAPACITY: usize = 10_000;
/// Most changes in one transaction.
pub const MAX_BATCH: usize = 2_000;

/// Why a change was not committed. Nothing of it is in the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("the write queue is full")]
    QueueFull,
    #[error("the writer has stopped")]
    Stopped,
    #[error("commit failed: {0}")]
    Failed(String),
}

struct Job {
    change: Change,
    idempotency: Option<IdempotencyRecord>,
    done: oneshot::Sender<Result<(), WriteError>>,
}

/// The handle callers submit changes through.
pub struct Writer {
    queue: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer task. It runs until `stop` is cancelled (or every handle is
    /// dropped), and commits everything queued before it ends.
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Writer, JoinHandle<()>) {
        let (queue, jobs) = mpsc::channel(QUEUE_CAPACITY);
        let task = tokio::spawn(run(store, metrics, jobs, stop));
        (Writer { queue }, task)
    }

    /// Queues a change (with the idempotency record it produces, committed atomically with
    /// it) and waits until it is committed.
    pub async fn commit(
        &self,
        change: Change,
        idempotency: Option<IdempotencyRecord>,
    ) -> Result<(), WriteError> {
        let (done, committed) = oneshot::channel();
        let job = Job {
            change,
            idempotency,
            done,
        };
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => WriteError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => WriteError::Stopped,
        })?;
        committed.await.unwrap_or(Err(WriteError::Stopped))
    }
}

async fn run(
    store: Store,
    metrics: Arc<Metrics>,
    mut jobs: mpsc::Receiver<Job>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    loop {
        // `recv_many` takes what has gathered while the last commit ran, up to MAX_BATCH:
        // batches grow with the load, and an idle server commits each change at once.
        let received = tokio::select! {
            biased;
            received = jobs.recv_many(&mut batch, MAX_BATCH) => received,
            () = stop.cancelled(), if !stopping => {
                // Refuse new changes; what is queued is still committed below.
                jobs.close();
                stopping = true;
                continue;
            }
        };
        if received == 0 {
            break;
        }
        metrics.record_batch(batch.len());
        commit(&store, std::mem::take(&mut batch)).await;
    }
    store.close().await;
    tracing::info!("writer stopped: every queued change is committed");
}

async fn commit(store: &Store, batch: Vec<Job>) {
    let changes: Vec<_> = batch
        .iter()
        .map(|j| (&j.change, j.idempotency.as_ref()))
        .collect();
    match store.commit_batch(&changes).await {
        Ok(()) => {
            drop(changes);
            for job in batch {
                let _ = job.done.send(Ok(()));
            }
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
                let result = store
                    .commit_batch(&[(&job.change, job.idempotency.as_ref())])
                    .await
                    .map_err(|e| failed(&job.change, e));
                let _ = job.done.send(result);
            }
        }
        Err(error) => {
            drop(changes);
            let message = error.to_string();
            tracing::error!(size = batch.len(), error = %message, "commit failed");
            for job in batch {
                let _ = job.done.send(Err(WriteError::Failed(message.clone())));
            }
        }
    }
}

/// Whether the database refused a row, as opposed to not being able to commit at all.
fn refused_a_row(error: &StoreError) -> bool {
    match error {
        StoreError::Corrupt { .. } | StoreError::Duplicate(_) => true,
        StoreError::Database(sqlx::Error::Database(db)) => {
            !matches!(db.kind(), sqlx::error::ErrorKind::Other)
        }
        StoreError::Database(_) => false,
    }
}

fn failed(change: &Change, error: StoreError) -> WriteError {
    tracing::error!(?change, %error, "change refused by the database");
    WriteError::Failed(error.to_string())
}
