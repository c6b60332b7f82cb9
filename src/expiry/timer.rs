//! The in-process timer behind the expiry port, for the embedded default (no Redis): a
//! time-ordered set and a task woken by `Notify` when the earliest deadline changes (the
//! mini-redis purge-task pattern). It sleeps on tokio's time, and [`TokioClock`] is a wall
//! clock that follows tokio's time, so `tokio::time::pause()`/`advance()` drive both.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Expiry;
use crate::core::{Clock, ReservationId, SystemClock, Timestamp};

/// A wall clock on tokio's time: the system time when it was made, moved on by tokio's
/// monotonic clock. Under `tokio::time::pause()` it stands still until `advance()`.
pub struct TokioClock {
    origin: Timestamp,
    started: Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        Self {
            origin: SystemClock.now(),
            started: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.origin.saturating_add(self.started.elapsed())
    }
}

#[derive(Default)]
struct Schedule {
    by_time: BTreeSet<(Timestamp, ReservationId)>,
    by_id: HashMap<ReservationId, Timestamp>,
}

impl Schedule {
    fn insert(&mut self, id: ReservationId, at: Timestamp) {
        if let Some(old) = self.by_id.insert(id, at) {
            self.by_time.remove(&(old, id));
        }
        self.by_time.insert((at, id));
    }

    fn remove(&mut self, id: ReservationId) {
        if let Some(at) = self.by_id.remove(&id) {
            self.by_time.remove(&(at, id));
        }
    }

    /// Takes every entry due at `now`, or says when the next one is.
    fn take_due(&mut self, now: Timestamp) -> (Vec<ReservationId>, Option<Timestamp>) {
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.by_time.first() {
            if at > now {
                return (due, Some(at));
            }
            self.by_time.pop_first();
            self.by_id.remove(&id);
            due.push(id);
        }
        (due, None)
    }
}

/// The in-process timer.
pub struct TimerExpiry {
    /// Short critical sections only (set inserts and removals), never across `.await`.
    schedule: Mutex<Schedule>,
    wake: Notify,
    clock: Arc<dyn Clock>,
}

impl TimerExpiry {
    pub fn new(clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            schedule: Mutex::new(Schedule::default()),
            wake: Notify::new(),
            clock,
        })
    }

    fn schedule_lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        // Each operation leaves both indexes consistent before it can panic.
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers due reservations into `due` until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, due: mpsc::Sender<ReservationId>, stop: CancellationToken) {
        loop {
            let (ready, next) = self.schedule_lock().take_due(self.clock.now());
            for id in ready {
                if due.send(id).await.is_err() {
                    return;
                }
            }
            let wake_at = Instant::now()
                + match next {
                    Some(at) => self.clock.now().until(at),
                    None => std::time::Duration::from_secs(3600),
                };
            tokio::select! {
                () = tokio::time::sleep_until(wake_at) => {}
                () = self.wake.notified() => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Every scheduled reservation and when it falls due (for re-arming Redis keys).
    pub fn scheduled(&self) -> Vec<(ReservationId, Timestamp)> {
        let schedule = self.schedule_lock();
        schedule.by_id.iter().map(|(&id, &at)| (id, at)).collect()
    }

    pub fn len(&self) -> usize {
        self.schedule_lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Expiry for TimerExpiry {
    fn schedule(&self, id: ReservationId, at: Timestamp) {
        let earliest = {
            let mut schedule = self.schedule_lock();
            schedule.insert(id, at);
            schedule
                .by_time
                .first()
                .is_some_and(|&(first, _)| first == at)
        };
        // Only a new earliest deadline needs the task to recompute its sleep.
        if earliest {
            self.wake.notify_one();
        }
    }

    fn cancel(&self, id: ReservationId) {
        self.schedule_lock().remove(id);
    }

    fn healthy(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn takes_what_is_due_in_time_order() {
        let (a, b, c) = (
            ReservationId::new(),
            ReservationId::new(),
            ReservationId::new(),
        );
        let mut schedule = Schedule::default();
        schedule.insert(a, at(30));
        schedule.insert(b, at(10));
        schedule.insert(c, at(50));
        assert_eq!(schedule.take_due(at(30)), (vec![b, a], Some(at(50))));
        assert_eq!(schedule.take_due(at(60)), (vec![c], None));
    }

    #[test]
    fn rescheduling_replaces_and_cancelling_removes() {
        let (a, b) = (ReservationId::new(), ReservationId::new());
        let mut schedule = Schedule::default();
        schedule.insert(a, at(10));
        schedule.insert(a, at(40));
        schedule.insert(b, at(20));
        schedule.remove(b);
        assert_eq!(schedule.take_due(at(30)), (vec![], Some(at(40))));
        assert_eq!(schedule.by_time.len(), 1);
    }

    struct FixedClock(std::sync::atomic::AtomicI64);
    impl Clock for FixedClock {
        fn now(&self) -> Timestamp {
            at(self.0.load(std::sync::atomic::Ordering::SeqCst))
        }
    }

    /// A timer on `clock`, running in a task of its own: the timer, what falls due, and
    /// the token that stops it.
    fn running(
        clock: Arc<dyn Clock>,
    ) -> (
        Arc<TimerExpiry>,
        mpsc::Receiver<ReservationId>,
        CancellationToken,
    ) {
        let timer = TimerExpiry::new(clock);
        let (due_tx, due) = mpsc::channel(8);
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&timer).run(due_tx, stop.clone()));
        (timer, due, stop)
    }

    #[tokio::test]
    async fn the_timer_delivers_a_past_deadline_at_once_and_skips_cancelled_ones() {
        let clock = Arc::new(FixedClock(1_000.into()));
        let (timer, mut due, stop) = running(clock.clone());
        let (a, b) = (ReservationId::new(), ReservationId::new());
        timer.schedule(b, at(500));
        timer.cancel(b);
        timer.schedule(a, at(900));
        assert_eq!(due.recv().await, Some(a));
        assert!(timer.is_empty());
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn on_tokio_time_a_deadline_falls_due_when_time_reaches_it_not_before() {
        let clock = Arc::new(TokioClock::new());
        let (timer, mut due, stop) = running(clock.clone());
        let started = Instant::now();
        let (soon, later) = (ReservationId::new(), ReservationId::new());
        timer.schedule(
            later,
            clock.now().saturating_add(Duration::from_millis(2_000)),
        );
        timer.schedule(soon, clock.now().saturating_add(Duration::from_millis(500)));
        assert_eq!(due.recv().await, Some(soon));
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        let early = tokio::time::timeout(Duration::from_millis(1_499), due.recv()).await;
        assert!(early.is_err(), "nothing is due before 2 s: {early:?}");
        assert_eq!(due.recv().await, Some(later));
        assert_eq!(started.elapsed(), Duration::from_millis(2_000));
        assert!(timer.is_empty());
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn on_tokio_time_rescheduling_moves_the_deadline_and_an_earlier_one_wakes_the_timer() {
        let clock = Arc::new(TokioClock::new());
        let (timer, mut due, stop) = running(clock.clone());
        let started = Instant::now();
        let after = |ms: u64| clock.now().saturating_add(Duration::from_millis(ms));
        let (moved, earlier, cancelled) = (
            ReservationId::new(),
            ReservationId::new(),
            ReservationId::new(),
        );
        timer.schedule(moved, after(1_000));
        timer.schedule(cancelled, after(200));
        // Let the task go to sleep until the first deadline.
        tokio::task::yield_now().await;
        timer.schedule(moved, after(3_000));
        timer.cancel(cancelled);
        // Earlier than anything the task sleeps towards: it wakes for it.
        timer.schedule(earlier, after(500));
        assert_eq!(due.recv().await, Some(earlier));
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert_eq!(due.recv().await, Some(moved));
        assert_eq!(started.elapsed(), Duration::from_millis(3_000));
        let nothing = tokio::time::timeout(Duration::from_secs(60), due.recv()).await;
        assert!(
            nothing.is_err(),
            "the cancelled one never falls due: {nothing:?}"
        );
        assert!(timer.is_empty());
        stop.cancel();
    }
}
