//! Carrying out expiry: due reservations from every source are released, many at once,
//! and the sweeper catches what no source delivered (a lost key event, a failed commit):
//! periodically, and at once when a source asks (after a Redis reconnect).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::ReservationId;

/// Expiries committed at once; they share the writer's batches.
const CONCURRENT_EXPIRIES: usize = 256;

/// What expiry asks of the reservation lifecycle.
#[async_trait]
pub trait Releases: Send + Sync + 'static {
    /// Pending reservations past their time.
    fn overdue(&self) -> Vec<ReservationId>;
    /// Releases a reservation that has fallen due; idempotent.
    async fn expire(&self, id: ReservationId);
}

/// Releases reservations as they fall due, many at once so their commits share batches.
pub async fn expire_due(
    releases: Arc<dyn Releases>,
    mut due: mpsc::Receiver<ReservationId>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_EXPIRIES));
    loop {
        let id = tokio::select! {
            id = due.recv() => match id { Some(id) => id, None => return },
            () = stop.cancelled() => return,
        };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let releases = Arc::clone(&releases);
        tasks.spawn(async move {
            releases.expire(id).await;
            drop(permit);
        });
    }
}

/// Sends every overdue reservation to `due`, every `every` and whenever `sweep_now` is
/// notified, until `stop`.
pub async fn sweep(
    releases: Arc<dyn Releases>,
    due: mpsc::Sender<ReservationId>,
    sweep_now: Arc<Notify>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = sweep_now.notified() => {}
            () = stop.cancelled() => return,
        }
        for id in releases.overdue() {
            if due.send(id).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Overdue {
        waiting: Mutex<Vec<ReservationId>>,
        released: Mutex<Vec<ReservationId>>,
        done: Notify,
    }

    #[async_trait]
    impl Releases for Overdue {
        fn overdue(&self) -> Vec<ReservationId> {
            self.waiting.lock().unwrap().clone()
        }
        async fn expire(&self, id: ReservationId) {
            self.waiting.lock().unwrap().retain(|w| *w != id);
            self.released.lock().unwrap().push(id);
            self.done.notify_one();
        }
    }

    #[tokio::test]
    async fn the_sweeper_releases_what_no_source_delivered_on_its_next_round() {
        let overdue = Arc::new(Overdue::default());
        let lost = ReservationId::new();
        overdue.waiting.lock().unwrap().push(lost);
        let (due_tx, due_rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(expire_due(
            overdue.clone(),
            due_rx,
            tasks.clone(),
            stop.clone(),
        ));
        tasks.spawn(sweep(
            overdue.clone(),
            due_tx,
            Arc::new(Notify::new()),
            Duration::from_secs(5),
            stop.clone(),
        ));
        // The first round is at once: nothing waits five seconds.
        overdue.done.notified().await;
        assert_eq!(*overdue.released.lock().unwrap(), vec![lost]);
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
