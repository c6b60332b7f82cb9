//! The writer alone: a database in memory behind [`BatchStorage`] that the test scripts
//! (refuse a row, become unreachable, lose a COMMIT), and paused tokio time.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{BatchStorage, Entry, WriteError, Writer, QUEUE_CAPACITY};
use crate::core::reservation::Status;
use crate::core::{ReservationId, Timestamp};
use crate::metrics::Metrics;
use crate::store::{Change, Fence, StoreError};

/// What the next commit does; a commit with nothing scripted succeeds.
#[derive(Clone, Copy)]
enum Next {
    /// The database cannot be reached (and stays so until the test says otherwise).
    Unreachable,
    /// The connection is lost during COMMIT, after the batch did or did not commit.
    LoseCommit { committed: bool },
}

struct FakeStorage {
    connections: usize,
    reachable: AtomicBool,
    script: Mutex<VecDeque<Next>>,
    /// A batch holding a change of one of these is refused (a rule broken).
    refused: Mutex<HashSet<ReservationId>>,
    committed: Mutex<Vec<ReservationId>>,
    markers: Mutex<HashSet<String>>,
    calls: AtomicUsize,
    /// Commits wait while this is false.
    open: watch::Sender<bool>,
}

impl FakeStorage {
    fn new(connections: usize) -> Arc<Self> {
        Arc::new(Self {
            connections,
            reachable: AtomicBool::new(true),
            script: Mutex::default(),
            refused: Mutex::default(),
            committed: Mutex::default(),
            markers: Mutex::default(),
            calls: AtomicUsize::new(0),
            open: watch::channel(true).0,
        })
    }

    fn then(&self, next: Next) {
        self.script.lock().unwrap().push_back(next);
    }

    fn reachable(&self, yes: bool) {
        self.reachable.store(yes, Ordering::SeqCst);
    }

    fn hold_commits(&self, hold: bool) {
        self.open.send_replace(!hold);
    }

    fn committed(&self) -> Vec<ReservationId> {
        self.committed.lock().unwrap().clone()
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn unreachable() -> StoreError {
        StoreError::Database(sqlx::Error::PoolTimedOut)
    }
}

fn id_of(change: &Change) -> ReservationId {
    match change {
        Change::Reserve(r) => r.id,
        Change::Release { id, .. } => *id,
        Change::Pay(p) => p.reservation_id,
    }
}

#[async_trait]
impl BatchStorage for FakeStorage {
    async fn commit_batch(&self, changes: &[Entry<'_>], _: &[Fence]) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
        if !self.reachable.load(Ordering::SeqCst) {
            return Err(Self::unreachable());
        }
        let ids: Vec<ReservationId> = changes.iter().map(|(c, _)| id_of(c)).collect();
        let next = self.script.lock().unwrap().pop_front();
        match next {
            Some(Next::Unreachable) => {
                self.reachable(false);
                Err(Self::unreachable())
            }
            Some(Next::LoseCommit { committed }) => {
                self.reachable(false);
                let batch = uuid::Uuid::now_v7().to_string();
                if committed {
                    self.markers.lock().unwrap().insert(batch.clone());
                    self.committed.lock().unwrap().extend(ids);
                }
                Err(StoreError::OutcomeUnknown {
                    batch,
                    cause: sqlx::Error::PoolClosed,
                })
            }
            None => {
                let refused = self.refused.lock().unwrap();
                if ids.iter().any(|id| refused.contains(id)) {
                    return Err(StoreError::corrupt("reservations", "not pending"));
                }
                self.committed.lock().unwrap().extend(ids);
                Ok(())
            }
        }
    }

    async fn batch_committed(&self, batch: &str) -> Result<bool, StoreError> {
        if !self.reachable.load(Ordering::SeqCst) {
            return Err(Self::unreachable());
        }
        Ok(self.markers.lock().unwrap().contains(batch))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.reachable.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Self::unreachable())
        }
    }

    async fn forget_commit_markers(&self, _age: Duration) -> Result<u64, StoreError> {
        Ok(0)
    }

    async fn close(&self) {}

    fn connections(&self) -> usize {
        self.connections
    }
}

fn start(storage: &Arc<FakeStorage>, capacity: usize) -> Arc<Writer> {
    let storage: Arc<dyn BatchStorage> = Arc::clone(storage) as _;
    let (writer, _task) = Writer::start_with_capacity(
        storage,
        capacity,
        Arc::new(Metrics::new()),
        CancellationToken::new(),
    );
    Arc::new(writer)
}

fn release(id: ReservationId) -> Change {
    Change::Release {
        id,
        status: Status::Cancelled,
        at: Timestamp::from_millis(0),
    }
}

/// Commits a release of `id` on a task of its own.
fn submit(
    writer: &Arc<Writer>,
    id: ReservationId,
) -> tokio::task::JoinHandle<Result<(), WriteError>> {
    let writer = Arc::clone(writer);
    tokio::spawn(async move { writer.commit(release(id), None, None).await })
}

/// Changes waiting in the queue.
fn queued(writer: &Writer) -> usize {
    writer.queue.max_capacity() - writer.queue.capacity()
}

/// Waits (on paused time) until `condition` holds; fails after a minute.
async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_good_batch_is_acknowledged_once_committed() {
    let storage = FakeStorage::new(1);
    let writer = start(&storage, QUEUE_CAPACITY);
    let (a, b) = (ReservationId::new(), ReservationId::new());
    assert_eq!(writer.commit(release(a), None, None).await, Ok(()));
    assert_eq!(writer.commit(release(b), None, None).await, Ok(()));
    assert_eq!(storage.committed(), vec![a, b]);
    assert!(!writer.health().is_down());
}

#[tokio::test(start_paused = true)]
async fn a_refused_row_fails_only_its_own_change() {
    let storage = FakeStorage::new(1);
    let writer = start(&storage, QUEUE_CAPACITY);
    let [first, a, bad, c] = [(); 4].map(|()| ReservationId::new());
    storage.refused.lock().unwrap().insert(bad);
    storage.hold_commits(true);
    let first = submit(&writer, first);
    until("the first commit started", || storage.calls() == 1).await;
    let others = [a, bad, c].map(|id| submit(&writer, id));
    until("three changes queued", || queued(&writer) == 3).await;
    storage.hold_commits(false);

    assert_eq!(first.await.unwrap(), Ok(()));
    let [a_done, bad_done, c_done] = others;
    assert_eq!(a_done.await.unwrap(), Ok(()));
    assert!(matches!(
        bad_done.await.unwrap(),
        Err(WriteError::Failed(_))
    ));
    assert_eq!(c_done.await.unwrap(), Ok(()));
    assert!(!storage.committed().contains(&bad));
    assert!(storage.committed().contains(&a) && storage.committed().contains(&c));
    // The batch of three, then each of them alone.
    assert_eq!(storage.calls(), 1 + 1 + 3);
    assert!(!writer.health().is_down(), "a refused row is not an outage");
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_database_fails_the_batch_and_refuses_until_a_probe_gets_through() {
    let storage = FakeStorage::new(1);
    let writer = start(&storage, QUEUE_CAPACITY);
    storage.then(Next::Unreachable);
    let result = writer
        .commit(release(ReservationId::new()), None, None)
        .await;
    assert!(matches!(result, Err(WriteError::Failed(_))), "{result:?}");
    assert!(writer.health().is_down());

    let calls = storage.calls();
    let refused = writer
        .commit(release(ReservationId::new()), None, None)
        .now_or_never();
    assert_eq!(refused, Some(Err(WriteError::Down)), "refused at once");
    assert_eq!(storage.calls(), calls, "nothing reached the database");

    // Still down while the probes fail.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(writer.health().is_down());
    storage.reachable(true);
    until("a probe got through", || !writer.health().is_down()).await;
    let later = ReservationId::new();
    assert_eq!(writer.commit(release(later), None, None).await, Ok(()));
    assert_eq!(storage.committed(), vec![later]);
}

#[tokio::test(start_paused = true)]
async fn a_commit_of_unknown_outcome_holds_its_callers_until_a_probe_settles_it() {
    for committed in [true, false] {
        let storage = FakeStorage::new(1);
        let writer = start(&storage, QUEUE_CAPACITY);
        storage.then(Next::LoseCommit { committed });
        let id = ReservationId::new();
        let held = submit(&writer, id);
        until("storage marked down", || writer.health().is_down()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !held.is_finished(),
            "neither answered nor undone while unknown"
        );
        let refused = writer
            .commit(release(ReservationId::new()), None, None)
            .now_or_never();
        assert_eq!(refused, Some(Err(WriteError::Down)));

        storage.reachable(true);
        let result = held.await.unwrap();
        if committed {
            assert_eq!(result, Ok(()));
            assert_eq!(storage.committed(), vec![id]);
        } else {
            assert!(matches!(result, Err(WriteError::Failed(_))), "{result:?}");
            assert!(storage.committed().is_empty());
        }
        until("storage up again", || !writer.health().is_down()).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_is_refused_at_once() {
    let storage = FakeStorage::new(1);
    let writer = start(&storage, 2);
    storage.hold_commits(true);
    let first = submit(&writer, ReservationId::new());
    until("the first commit started", || storage.calls() == 1).await;
    let queued_ones = [(); 2].map(|()| submit(&writer, ReservationId::new()));
    until("the queue is full", || queued(&writer) == 2).await;

    let refused = writer
        .commit(release(ReservationId::new()), None, None)
        .now_or_never();
    assert_eq!(refused, Some(Err(WriteError::QueueFull)));

    storage.hold_commits(false);
    assert_eq!(first.await.unwrap(), Ok(()));
    for done in queued_ones {
        assert_eq!(done.await.unwrap(), Ok(()));
    }
    assert_eq!(storage.committed().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn with_two_connections_two_batches_are_in_flight_at_once() {
    let storage = FakeStorage::new(2);
    let writer = start(&storage, QUEUE_CAPACITY);
    storage.hold_commits(true);
    let first = submit(&writer, ReservationId::new());
    until("the first commit started", || storage.calls() == 1).await;
    let second = submit(&writer, ReservationId::new());
    until("the second commit started beside it", || {
        storage.calls() == 2
    })
    .await;
    let third = submit(&writer, ReservationId::new());
    until("the third change queued", || queued(&writer) == 1).await;
    assert_eq!(
        storage.calls(),
        2,
        "no third commit while both connections are busy"
    );
    storage.hold_commits(false);
    for done in [first, second, third] {
        assert_eq!(done.await.unwrap(), Ok(()));
    }
}
