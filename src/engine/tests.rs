//! The engine alone: a real inventory, fakes for storage, writer, expiry, payments and
//! notifications, and a clock the test moves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::idempotency::{params_hash, Answer, KeyedCall};
use super::payments::{PaymentAdapter, PaymentError};
use super::ports::{Commits, Records, RecoverySource};
use super::takeover::TakeoverSource;
use super::{Engine, EngineError, EngineParts};
use crate::core::inventory::{first_version, Holding};
use crate::core::inventory::{Inventory, PoolState};
use crate::core::reservation::{Reservation, Status};
use crate::core::{
    Clock, Currency, Event, EventId, IdempotencyKey, Money, PaymentToken, Quantity, ReservationId,
    ReserveItems, Rule, TicketType, TicketTypeId, Timestamp, UserId,
};
use crate::expiry::Expiry;
use crate::fanout::notify::Notifier;
use crate::store::writer::WriteError;
use crate::store::{Change, Fence, IdempotencyRecord, StoreError, StoredIdempotency};

const TTL: Duration = Duration::from_secs(600);

#[derive(Default)]
struct ManualClock(AtomicI64);

impl ManualClock {
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst))
    }
}

/// What the fake writer does with the next commits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Commit,
    Fail,
    QueueFull,
}

/// A writer and database in memory: committed changes become records the reads return.
struct Database {
    outcome: Mutex<Outcome>,
    events: Mutex<Vec<Event>>,
    epochs: Mutex<HashMap<EventId, u64>>,
    committed: Mutex<Vec<Change>>,
    /// The fence each commit came with, in order.
    fences: Mutex<Vec<Option<Fence>>>,
    reservations: Mutex<HashMap<ReservationId, Reservation>>,
    keys: Mutex<HashMap<(UserId, String, String), StoredIdempotency>>,
}

impl Database {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            outcome: Mutex::new(Outcome::Commit),
            events: Mutex::default(),
            epochs: Mutex::default(),
            committed: Mutex::default(),
            fences: Mutex::default(),
            reservations: Mutex::default(),
            keys: Mutex::default(),
        })
    }

    fn then(&self, outcome: Outcome) {
        *self.outcome.lock().unwrap() = outcome;
    }

    fn commits(&self) -> usize {
        self.committed.lock().unwrap().len()
    }
}

#[async_trait]
impl Commits for Database {
    async fn commit(
        &self,
        change: Change,
        idempotency: Option<IdempotencyRecord>,
        fence: Option<Fence>,
    ) -> Result<(), WriteError> {
        self.fences.lock().unwrap().push(fence);
        if let Some(fence) = fence {
            let stored = self.epochs.lock().unwrap().get(&fence.event_id).copied();
            if stored.unwrap_or(0) != fence.epoch {
                return Err(WriteError::Fenced);
            }
        }
        match *self.outcome.lock().unwrap() {
            Outcome::Commit => {}
            Outcome::Fail => return Err(WriteError::Failed("connection reset".into())),
            Outcome::QueueFull => return Err(WriteError::QueueFull),
        }
        // As the store does: a key already stored fails the change with it.
        if let Some(record) = &idempotency {
            let key = (record.user_id, record.method.to_owned(), record.key.clone());
            if self.keys.lock().unwrap().contains_key(&key) {
                return Err(WriteError::Failed("the key is in use".into()));
            }
        }
        {
            let mut reservations = self.reservations.lock().unwrap();
            match &change {
                Change::Reserve(r) => {
                    reservations.insert(r.id, r.clone());
                }
                Change::Release { id, status, .. } => {
                    reservations.get_mut(id).unwrap().status = *status;
                }
                Change::Pay(payment) => {
                    reservations
                        .get_mut(&payment.reservation_id)
                        .unwrap()
                        .status = Status::Paid;
                }
            }
        }
        if let Some(record) = idempotency {
            self.keys.lock().unwrap().insert(
                (record.user_id, record.method.to_owned(), record.key),
                StoredIdempotency {
                    params_hash: record.params_hash,
                    response: record.response,
                },
            );
        }
        self.committed.lock().unwrap().push(change);
        Ok(())
    }
}

#[async_trait]
impl Records for Database {
    async fn reservation(&self, id: ReservationId) -> Result<Option<Reservation>, StoreError> {
        Ok(self.reservations.lock().unwrap().get(&id).cloned())
    }
    async fn reservations_of(
        &self,
        user: UserId,
        status: Option<Status>,
        _: usize,
    ) -> Result<Vec<Reservation>, StoreError> {
        let all = self.reservations.lock().unwrap();
        Ok(all
            .values()
            .filter(|r| r.user_id == user && status.is_none_or(|s| s == r.status))
            .cloned()
            .collect())
    }
    async fn idempotency(
        &self,
        user: UserId,
        method: &str,
        key: &str,
        _: Timestamp,
    ) -> Result<Option<StoredIdempotency>, StoreError> {
        let keys = self.keys.lock().unwrap();
        Ok(keys
            .get(&(user, method.to_owned(), key.to_owned()))
            .cloned())
    }
    async fn claim_idempotency_key(
        &self,
        user: UserId,
        method: &str,
        key: &str,
        _: Timestamp,
    ) -> Result<Option<StoredIdempotency>, StoreError> {
        let mut keys = self.keys.lock().unwrap();
        let entry = keys.entry((user, method.to_owned(), key.to_owned()));
        match entry {
            std::collections::hash_map::Entry::Occupied(stored) => Ok(Some(stored.get().clone())),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(StoredIdempotency {
                    params_hash: String::new(),
                    response: String::new(),
                });
                Ok(None)
            }
        }
    }
    async fn delete_old_idempotency_keys(&self, _: Timestamp) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// Recovery reads what the fake database holds, as the SQL of `store` does.
#[async_trait]
impl TakeoverSource for Database {
    async fn take_over_event(&self, id: EventId) -> Result<u64, StoreError> {
        let mut epochs = self.epochs.lock().unwrap();
        let epoch = epochs.entry(id).or_default();
        *epoch += 1;
        Ok(*epoch)
    }
    async fn event_epochs(&self) -> Result<HashMap<EventId, u64>, StoreError> {
        Ok(self.epochs.lock().unwrap().clone())
    }
    async fn load_events(&self) -> Result<Vec<Event>, StoreError> {
        Ok(self.events.lock().unwrap().clone())
    }
    async fn held_of_event(&self, _: EventId) -> Result<HashMap<TicketTypeId, u64>, StoreError> {
        RecoverySource::held_per_ticket_type(self).await
    }
    async fn pending_of_event(&self, _: EventId) -> Result<Vec<Reservation>, StoreError> {
        RecoverySource::pending_reservations(self).await
    }
}

#[async_trait]
impl RecoverySource for Database {
    async fn take_over_events(&self) -> Result<HashMap<EventId, u64>, StoreError> {
        let mut epochs = self.epochs.lock().unwrap();
        for event in self.events.lock().unwrap().iter() {
            *epochs.entry(event.id).or_default() += 1;
        }
        Ok(epochs.clone())
    }
    async fn load_events(&self) -> Result<Vec<Event>, StoreError> {
        Ok(self.events.lock().unwrap().clone())
    }
    async fn held_per_ticket_type(&self) -> Result<HashMap<TicketTypeId, u64>, StoreError> {
        let mut held = HashMap::new();
        for r in self.reservations.lock().unwrap().values() {
            if matches!(r.status, Status::Pending | Status::Paid) {
                for item in &r.items {
                    *held.entry(item.ticket_type_id).or_default() += u64::from(item.quantity);
                }
            }
        }
        Ok(held)
    }
    async fn pending_reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        let mut pending: Vec<Reservation> = (self.reservations.lock().unwrap().values())
            .filter(|r| r.status == Status::Pending)
            .cloned()
            .collect();
        pending.sort_by_key(|r| r.created_at);
        Ok(pending)
    }
}

/// Remembers what is scheduled.
#[derive(Default)]
struct Schedule(Mutex<HashMap<ReservationId, Timestamp>>);

impl Expiry for Schedule {
    fn schedule(&self, id: ReservationId, at: Timestamp) {
        self.0.lock().unwrap().insert(id, at);
    }
    fn cancel(&self, id: ReservationId) {
        self.0.lock().unwrap().remove(&id);
    }
    fn healthy(&self) -> bool {
        true
    }
}

/// Records every announcement.
#[derive(Default)]
struct Announcements {
    pools: Mutex<Vec<PoolState>>,
    reservations: Mutex<Vec<Reservation>>,
}

impl Notifier for Announcements {
    fn pools_changed(&self, _: EventId, pools: &[PoolState]) {
        self.pools.lock().unwrap().extend_from_slice(pools);
    }
    fn reservation_updated(&self, reservation: &Reservation) {
        self.reservations.lock().unwrap().push(reservation.clone());
    }
}

/// A provider that answers each charge when the test says so.
struct GatedPayments {
    started: Notify,
    answer: Notify,
    result: Mutex<Result<(), PaymentError>>,
}

#[async_trait]
impl PaymentAdapter for GatedPayments {
    async fn charge(&self, _: ReservationId, _: Money, _: &str) -> Result<(), PaymentError> {
        self.started.notify_one();
        self.answer.notified().await;
        *self.result.lock().unwrap()
    }
}

struct Setup {
    engine: Arc<Engine>,
    inventory: Arc<Inventory>,
    database: Arc<Database>,
    expiry: Arc<Schedule>,
    announced: Arc<Announcements>,
    payments: Arc<GatedPayments>,
    clock: Arc<ManualClock>,
    ticket_type: TicketTypeId,
    event_id: EventId,
}

/// One event with one ticket type of `capacity` tickets.
fn setup(capacity: u32) -> Setup {
    setup_with(capacity, false)
}

/// [`setup`], with commits fenced (cluster mode) or not.
fn setup_with(capacity: u32, fenced: bool) -> Setup {
    let event_id = EventId::new();
    let ticket_type = TicketTypeId::new();
    let inventory = Arc::new(Inventory::new());
    let event = Event {
        id: event_id,
        name: "Gig".into(),
        starts_at: Timestamp::from_millis(2_000_000_000_000),
        venue: None,
        ticket_types: vec![TicketType {
            id: ticket_type,
            event_id,
            name: "Standing".into(),
            price: Money::new(2_500, Currency::parse("EUR").unwrap()),
            capacity,
            rule: Rule::Any,
        }],
    };
    inventory.insert_event(event.clone(), &[capacity]);
    let database = Database::new();
    database.events.lock().unwrap().push(event);
    let expiry = Arc::new(Schedule::default());
    let announced = Arc::new(Announcements::default());
    let payments = Arc::new(GatedPayments {
        started: Notify::new(),
        answer: Notify::new(),
        result: Mutex::new(Ok(())),
    });
    let clock = Arc::new(ManualClock::default());
    let engine = Arc::new(Engine::new(EngineParts {
        inventory: Arc::clone(&inventory),
        store: database.clone(),
        writer: database.clone(),
        expiry: expiry.clone(),
        payments: payments.clone(),
        notifier: announced.clone(),
        clock: clock.clone(),
        ttl: TTL,
        fenced,
    }));
    Setup {
        engine,
        inventory,
        database,
        expiry,
        announced,
        payments,
        clock,
        ticket_type,
        event_id,
    }
}

impl Setup {
    fn items(&self, quantity: u32) -> ReserveItems {
        ReserveItems::new(vec![(self.ticket_type, Quantity::new(quantity).unwrap())]).unwrap()
    }

    fn available(&self) -> u32 {
        self.inventory.pools(self.event_id).unwrap()[0].available
    }

    async fn reserve(&self, user: UserId, quantity: u32) -> Result<Reservation, EngineError> {
        match self
            .engine
            .reserve(user, self.items(quantity), None)
            .await?
        {
            Answer::Fresh(reservation) => Ok(reservation),
            Answer::Rendered(_) => panic!("no key was given"),
        }
    }
}

fn token(text: &str) -> PaymentToken {
    PaymentToken::parse(text.into()).unwrap()
}

fn render(reservation: &Reservation) -> String {
    reservation.id.to_string()
}

#[tokio::test]
async fn a_reserve_whose_commit_fails_gives_its_tickets_back_and_says_so() {
    let s = setup(10);
    s.database.then(Outcome::Fail);
    let refused = s.reserve(UserId::new(), 3).await;
    assert!(
        matches!(refused, Err(EngineError::Unavailable)),
        "{refused:?}"
    );
    assert_eq!(s.available(), 10);
    assert!(s.expiry.0.lock().unwrap().is_empty(), "nothing to expire");
    // Subscribers saw the tickets come back: the last announced state is the full pool.
    let pools = s.announced.pools.lock().unwrap();
    assert_eq!(pools.last().map(|p| p.available), Some(10));
    assert_eq!(s.database.commits(), 0);
}

#[tokio::test]
async fn a_full_write_queue_refuses_at_once_and_changes_nothing() {
    let s = setup(10);
    s.database.then(Outcome::QueueFull);
    let refused = s.reserve(UserId::new(), 1).await;
    assert!(
        matches!(refused, Err(EngineError::Unavailable)),
        "{refused:?}"
    );
    assert_eq!(s.available(), 10);
}

#[tokio::test]
async fn a_cancel_whose_commit_fails_stays_pending_with_its_tickets() {
    let s = setup(10);
    let user = UserId::new();
    let reservation = s.reserve(user, 4).await.unwrap();
    s.database.then(Outcome::Fail);
    let refused = s.engine.cancel(user, reservation.id).await;
    assert!(
        matches!(refused, Err(EngineError::Unavailable)),
        "{refused:?}"
    );
    assert_eq!(s.available(), 6);
    assert_eq!(
        s.inventory.active(reservation.id).map(|r| r.status),
        Some(Status::Pending)
    );
    s.database.then(Outcome::Commit);
    let cancelled = s.engine.cancel(user, reservation.id).await.unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    assert_eq!(s.available(), 10);
}

#[tokio::test]
async fn a_committed_reserve_is_scheduled_to_expire_and_announced() {
    let s = setup(10);
    let reservation = s.reserve(UserId::new(), 2).await.unwrap();
    assert_eq!(
        reservation.expires_at,
        Timestamp::from_millis(0).saturating_add(TTL)
    );
    assert_eq!(
        s.expiry.0.lock().unwrap().get(&reservation.id),
        Some(&reservation.expires_at)
    );
    assert_eq!(
        s.announced
            .pools
            .lock()
            .unwrap()
            .last()
            .map(|p| (p.available, p.version)),
        Some((8, 1))
    );
}

#[tokio::test]
async fn a_payment_begun_before_expiry_wins_over_the_expiry() {
    let s = setup(10);
    let user = UserId::new();
    let reservation = s.reserve(user, 2).await.unwrap();
    let paying = tokio::spawn({
        let engine = Arc::clone(&s.engine);
        async move {
            engine
                .pay(user, reservation.id, &token("tok_ok"), None)
                .await
        }
    });
    s.payments.started.notified().await;
    // The provider takes its time; the reservation falls due meanwhile.
    s.clock.advance(TTL + Duration::from_secs(1));
    s.engine.expire(reservation.id).await;
    assert_eq!(s.available(), 8, "expiry left the paying reservation alone");
    s.payments.answer.notify_one();
    let Answer::Fresh(paid) = paying.await.unwrap().unwrap() else {
        panic!("no key was given")
    };
    assert_eq!(paid.reservation.status, Status::Paid);
    assert_eq!(s.available(), 8);
    assert!(s.expiry.0.lock().unwrap().is_empty(), "expiry cancelled");
}

#[tokio::test]
async fn a_payment_declined_after_the_time_ran_out_releases_the_reservation() {
    let s = setup(10);
    let user = UserId::new();
    let reservation = s.reserve(user, 2).await.unwrap();
    *s.payments.result.lock().unwrap() = Err(PaymentError::Declined);
    let paying = tokio::spawn({
        let engine = Arc::clone(&s.engine);
        async move {
            engine
                .pay(user, reservation.id, &token("tok_declined"), None)
                .await
        }
    });
    s.payments.started.notified().await;
    s.clock.advance(TTL + Duration::from_secs(1));
    s.payments.answer.notify_one();
    let refused = paying.await.unwrap();
    assert!(
        matches!(refused, Err(EngineError::PaymentDeclined)),
        "{refused:?}"
    );
    assert_eq!(s.available(), 10);
    let stored = s.database.reservations.lock().unwrap()[&reservation.id].clone();
    assert_eq!(stored.status, Status::Expired);
}

#[tokio::test]
async fn a_key_replays_the_first_result_and_refuses_other_params() {
    let s = setup(10);
    let user = UserId::new();
    let key = IdempotencyKey::parse("k-1".into()).unwrap();
    let call = |quantity: u32| KeyedCall {
        method: "tickets.reserve",
        key: &key,
        params_hash: params_hash(&format!("{quantity}")),
        render: &render,
        fresh: false,
    };
    let Answer::Fresh(first) = s
        .engine
        .reserve(user, s.items(2), Some(call(2)))
        .await
        .unwrap()
    else {
        panic!("the first call runs")
    };
    let again = s
        .engine
        .reserve(user, s.items(2), Some(call(2)))
        .await
        .unwrap();
    assert!(matches!(&again, Answer::Rendered(text) if *text == first.id.to_string()));
    assert_eq!(s.available(), 8, "the replay took nothing");
    let other = s.engine.reserve(user, s.items(3), Some(call(3))).await;
    assert!(
        matches!(other, Err(EngineError::IdempotencyConflict)),
        "{other:?}"
    );
    // Keys are per user: another user's same key is a call of its own.
    let stranger = s
        .engine
        .reserve(UserId::new(), s.items(2), Some(call(2)))
        .await
        .unwrap();
    assert!(matches!(stranger, Answer::Fresh(_)));
    assert_eq!(s.available(), 6);
}

/// A key made for a forwarded call is not looked up; should a settlement have taken it
/// meanwhile, the commit that would store it is refused and takes nothing.
#[tokio::test]
async fn a_fresh_key_is_not_looked_up_and_a_taken_one_refuses_its_commit() {
    let s = setup(10);
    let user = UserId::new();
    let key = IdempotencyKey::parse("fwd-1".into()).unwrap();
    let call = KeyedCall {
        method: "tickets.reserve",
        key: &key,
        params_hash: params_hash("2"),
        render: &render,
        fresh: true,
    };
    let claimed = s
        .database
        .claim_idempotency_key(user, "tickets.reserve", "fwd-1", Timestamp::from_millis(0))
        .await
        .unwrap();
    assert!(claimed.is_none());
    let refused = s.engine.reserve(user, s.items(2), Some(call.clone())).await;
    assert!(
        matches!(refused, Err(EngineError::Unavailable)),
        "{refused:?}"
    );
    assert_eq!(s.available(), 10, "nothing taken");
    // A fresh key nobody took commits with its call.
    let other = IdempotencyKey::parse("fwd-2".into()).unwrap();
    let fresh = s
        .engine
        .reserve(
            user,
            s.items(2),
            Some(KeyedCall {
                key: &other,
                ..call
            }),
        )
        .await
        .unwrap();
    assert!(matches!(fresh, Answer::Fresh(_)));
    assert_eq!(s.available(), 8);
}

// ---------------------------------------------------------------------------------------
// recovery
// ---------------------------------------------------------------------------------------

/// A new engine over the same database and clock, with an empty inventory: a restart.
/// Returns it once it has recovered.
async fn restart(s: &Setup, expiry: Arc<dyn Expiry>) -> (Arc<Engine>, Arc<Inventory>) {
    let inventory = Arc::new(Inventory::new());
    let engine = Arc::new(Engine::new(EngineParts {
        inventory: Arc::clone(&inventory),
        store: s.database.clone(),
        writer: s.database.clone(),
        expiry,
        payments: s.payments.clone(),
        notifier: s.announced.clone(),
        clock: s.clock.clone(),
        ttl: TTL,
        fenced: false,
    }));
    engine.recover(s.database.as_ref()).await.unwrap();
    (engine, inventory)
}

fn pools_of(inventory: &Inventory, event: EventId) -> Vec<(u32, u64)> {
    inventory
        .pools(event)
        .unwrap()
        .iter()
        .map(|p| (p.available, p.version))
        .collect()
}

#[tokio::test]
async fn recovery_makes_availability_capacity_minus_pending_and_paid() {
    let s = setup(10);
    let user = UserId::new();
    s.reserve(user, 3).await.unwrap();
    let paid = s.reserve(user, 2).await.unwrap();
    s.payments.answer.notify_one();
    s.engine
        .pay(user, paid.id, &token("tok_ok"), None)
        .await
        .unwrap();
    let cancelled = s.reserve(user, 4).await.unwrap();
    s.engine.cancel(user, cancelled.id).await.unwrap();
    assert_eq!(s.available(), 5);

    let (_, inventory) = restart(&s, Arc::new(Schedule::default())).await;
    // Versions start at the first epoch's, above any version of the run before.
    assert_eq!(
        pools_of(&inventory, s.event_id),
        vec![(5, first_version(1))]
    );
    let (_, inventory) = restart(&s, Arc::new(Schedule::default())).await;
    assert_eq!(
        pools_of(&inventory, s.event_id),
        vec![(5, first_version(2))]
    );
}

#[tokio::test]
async fn recovery_never_shows_more_tickets_than_exist() {
    let s = setup(10);
    let user = UserId::new();
    let reservation = s.reserve(user, 3).await.unwrap();
    // A stored reservation holding more than the capacity (a bad row): nothing available,
    // never a wrapped-around count.
    s.database
        .reservations
        .lock()
        .unwrap()
        .get_mut(&reservation.id)
        .unwrap()
        .items[0]
        .quantity = 15;
    let (_, inventory) = restart(&s, Arc::new(Schedule::default())).await;
    assert_eq!(pools_of(&inventory, s.event_id)[0].0, 0);
}

#[tokio::test]
async fn recovery_puts_pending_reservations_back_under_expiry_at_their_own_time() {
    let s = setup(10);
    let user = UserId::new();
    let first = s.reserve(user, 3).await.unwrap();
    s.clock.advance(Duration::from_secs(60));
    let second = s.reserve(user, 2).await.unwrap();

    let schedule = Arc::new(Schedule::default());
    let (engine, inventory) = restart(&s, schedule.clone()).await;
    assert_eq!(
        *schedule.0.lock().unwrap(),
        HashMap::from([(first.id, first.expires_at), (second.id, second.expires_at)])
    );
    assert!(engine.overdue().is_empty(), "nothing is due yet");
    // They are pending again: their owner can cancel them, and the tickets come back.
    let cancelled = engine.cancel(user, first.id).await.unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    assert_eq!(pools_of(&inventory, s.event_id)[0].0, 8);
    assert_eq!(
        engine.get(user, second.id).await.unwrap().status,
        Status::Pending
    );
}

#[tokio::test]
async fn a_pending_reservation_overdue_at_recovery_is_released_at_once() {
    use crate::expiry::{sweeper, timer::TimerExpiry};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    let s = setup(10);
    let user = UserId::new();
    let overdue = s.reserve(user, 3).await.unwrap();
    let later = {
        s.clock.advance(TTL - Duration::from_secs(1));
        s.reserve(user, 2).await.unwrap()
    };
    // The server was down past the first one's time.
    s.clock.advance(Duration::from_secs(2));

    // The real in-process timer and release loop, on the test's clock.
    let timer = TimerExpiry::new(s.clock.clone());
    let (due_tx, due_rx) = tokio::sync::mpsc::channel(16);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(Arc::clone(&timer).run(due_tx, stop.clone()));
    let (engine, inventory) = restart(&s, timer).await;
    tasks.spawn(sweeper::expire_due(
        engine.clone(),
        due_rx,
        tasks.clone(),
        stop.clone(),
    ));

    tokio::time::timeout(Duration::from_secs(10), async {
        while pools_of(&inventory, s.event_id)[0].0 != 8 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the overdue reservation is released");
    let stored = s.database.reservations.lock().unwrap()[&overdue.id].clone();
    assert_eq!(stored.status, Status::Expired);
    assert_eq!(
        engine.get(user, later.id).await.unwrap().status,
        Status::Pending,
        "the one not yet due stays"
    );
    stop.cancel();
    tasks.close();
    tasks.wait().await;
}

/// The engine wired as `app.rs` wires it, on tokio's paused time: an expiry source (the
/// in-process timer, or one that loses every delivery), `expire_due` releasing what falls
/// due, and the sweeper behind both. Time moves only by `tokio::time::advance`, so each
/// test asserts the exact millisecond things happen at, and takes no real time.
mod on_tokio_time {
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::expiry::sweeper::{expire_due, sweep, Releases};
    use crate::expiry::timer::{TimerExpiry, TokioClock};
    use crate::expiry::DUE_CAPACITY;

    /// The reservation TTL here; paused time makes its length free.
    const TTL: Duration = Duration::from_millis(2_000);
    /// The sweeper's period (`app::SWEEP_EVERY`).
    const SWEEP_EVERY: Duration = Duration::from_secs(5);
    const MS: Duration = Duration::from_millis(1);

    /// Where due reservations come from.
    enum Source {
        /// The in-process timer.
        Timer,
        /// A source that never delivers (Redis down, key events lost): only the sweeper.
        Lost,
    }

    struct Timed {
        engine: Arc<Engine>,
        inventory: Arc<Inventory>,
        database: Arc<Database>,
        announced: Arc<Announcements>,
        payments: Arc<GatedPayments>,
        timer: Option<Arc<TimerExpiry>>,
        clock: Arc<TokioClock>,
        ticket_type: TicketTypeId,
        event_id: EventId,
        stop: CancellationToken,
        tasks: TaskTracker,
    }

    fn timed(capacity: u32, source: Source) -> Timed {
        let Setup {
            inventory,
            database,
            announced,
            payments,
            ticket_type,
            event_id,
            ..
        } = setup(capacity);
        let clock = Arc::new(TokioClock::new());
        let (timer, expiry): (_, Arc<dyn Expiry>) = match source {
            Source::Timer => {
                let timer = TimerExpiry::new(clock.clone());
                (Some(Arc::clone(&timer)), timer)
            }
            Source::Lost => (None, Arc::new(Schedule::default())),
        };
        let engine = Arc::new(Engine::new(EngineParts {
            inventory: Arc::clone(&inventory),
            store: database.clone(),
            writer: database.clone(),
            expiry,
            payments: payments.clone(),
            notifier: announced.clone(),
            clock: clock.clone(),
            ttl: TTL,
            fenced: false,
        }));
        let (due_tx, due_rx) = mpsc::channel(DUE_CAPACITY);
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        if let Some(timer) = &timer {
            tasks.spawn(Arc::clone(timer).run(due_tx.clone(), stop.clone()));
        }
        let releases: Arc<dyn Releases> = engine.clone();
        tasks.spawn(expire_due(
            Arc::clone(&releases),
            due_rx,
            tasks.clone(),
            stop.clone(),
        ));
        tasks.spawn(sweep(
            releases,
            due_tx,
            Arc::new(Notify::new()),
            SWEEP_EVERY,
            stop.clone(),
        ));
        Timed {
            engine,
            inventory,
            database,
            announced,
            payments,
            timer,
            clock,
            ticket_type,
            event_id,
            stop,
            tasks,
        }
    }

    impl Timed {
        fn available(&self) -> u32 {
            self.inventory.pools(self.event_id).unwrap()[0].available
        }

        async fn reserve(&self, quantity: u32) -> Reservation {
            match self
                .engine
                .reserve(
                    UserId::new(),
                    ReserveItems::new(vec![(self.ticket_type, Quantity::new(quantity).unwrap())])
                        .unwrap(),
                    None,
                )
                .await
                .unwrap()
            {
                Answer::Fresh(reservation) => reservation,
                Answer::Rendered(_) => panic!("no key was given"),
            }
        }

        async fn pay(&self, reservation: &Reservation) -> Result<Status, EngineError> {
            // The provider answers at once (a stored permit).
            self.payments.answer.notify_one();
            let paid = self
                .engine
                .pay(reservation.user_id, reservation.id, &token("tok_ok"), None)
                .await?;
            let Answer::Fresh(paid) = paid else {
                panic!("no key was given")
            };
            Ok(paid.reservation.status)
        }

        fn stored(&self, id: ReservationId) -> Status {
            self.database.reservations.lock().unwrap()[&id].status
        }

        /// Every committed release: (reservation, status, when).
        fn releases(&self) -> Vec<(ReservationId, Status, Timestamp)> {
            self.database
                .committed
                .lock()
                .unwrap()
                .iter()
                .filter_map(|change| match change {
                    Change::Release { id, status, at } => Some((*id, *status, *at)),
                    _ => None,
                })
                .collect()
        }

        async fn stop(self) {
            self.stop.cancel();
            self.tasks.close();
            self.tasks.wait().await;
        }
    }

    /// Lets the spawned tasks run until `done` holds, without moving time (yielding never
    /// parks the runtime, so paused time stands still); fails after 10,000 turns.
    async fn settle(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }

    /// Lets the spawned tasks run their course for a while without moving time.
    async fn idle() {
        for _ in 0..1_000 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn left_alone_a_reservation_is_released_at_its_expires_at_and_not_a_millisecond_before() {
        let t = timed(10, Source::Timer);
        let reservation = t.reserve(3).await;
        assert_eq!(
            reservation.expires_at,
            reservation.created_at.saturating_add(TTL)
        );
        tokio::time::advance(TTL - MS).await;
        idle().await;
        assert_eq!(t.available(), 7, "still held 1 ms before expires_at");
        assert_eq!(t.stored(reservation.id), Status::Pending);

        tokio::time::advance(MS).await;
        settle("the release", || {
            t.stored(reservation.id) == Status::Expired
        })
        .await;
        assert_eq!(
            t.releases(),
            vec![(reservation.id, Status::Expired, reservation.expires_at)]
        );
        assert_eq!(t.available(), 10);
        let last = t.announced.reservations.lock().unwrap().last().cloned();
        assert_eq!(
            last.map(|r| (r.id, r.status)),
            Some((reservation.id, Status::Expired))
        );
        let pools = t
            .announced
            .pools
            .lock()
            .unwrap()
            .last()
            .map(|p| p.available);
        assert_eq!(pools, Some(10), "subscribers hear the tickets came back");
        assert!(t.timer.as_ref().unwrap().is_empty());
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_reservations_made_a_millisecond_apart_are_each_released_at_their_own_expires_at(
    ) {
        const MANY: u32 = 1_000;
        let t = timed(MANY, Source::Timer);
        let mut due = Vec::new();
        for _ in 0..MANY {
            let reservation = t.reserve(1).await;
            due.push(reservation.expires_at);
            tokio::time::advance(MS).await;
        }
        assert_eq!(t.available(), 0);
        let last_due = *due.last().unwrap();
        while t.clock.now() <= last_due {
            let now = t.clock.now();
            let expected = due.iter().filter(|at| **at <= now).count();
            settle("the releases due by now", || t.releases().len() == expected).await;
            tokio::time::advance(MS).await;
        }
        let releases = t.releases();
        assert_eq!(releases.len(), MANY as usize);
        for (id, status, at) in &releases {
            let reservation = t.database.reservations.lock().unwrap()[id].clone();
            assert_eq!(*status, Status::Expired);
            assert_eq!(
                *at, reservation.expires_at,
                "{id} released at its expires_at"
            );
        }
        assert_eq!(t.available(), MANY, "every ticket back in the pool");
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn payments_spread_around_expires_at_end_paid_before_it_and_expired_from_it() {
        // Racers 0..50 pay at expires_at + ε, ε from −200 ms to +200 ms in order.
        const RACERS: i64 = 50;
        let quantities: Vec<u32> = (0..RACERS).map(|i| 1 + (i % 3) as u32).collect();
        let capacity: u32 = quantities.iter().sum();
        let t = timed(capacity, Source::Timer);
        let mut reservations = Vec::new();
        for quantity in &quantities {
            reservations.push(t.reserve(*quantity).await);
        }
        let expires_at = reservations[0].expires_at;
        assert!(reservations.iter().all(|r| r.expires_at == expires_at));
        let mut paid_quantity = 0;
        for (i, reservation) in reservations.iter().enumerate() {
            let epsilon = -200 + (400 * i as i64) / (RACERS - 1);
            let pay_at = Timestamp::from_millis(expires_at.as_millis() + epsilon);
            let wait = t.clock.now().until(pay_at);
            tokio::time::advance(wait).await;
            let outcome = t.pay(reservation).await;
            if epsilon < 0 {
                assert!(
                    matches!(outcome, Ok(Status::Paid)),
                    "ε {epsilon}: {outcome:?}"
                );
                paid_quantity += quantities[i];
            } else {
                assert!(
                    matches!(outcome, Err(EngineError::Expired)),
                    "ε {epsilon}: {outcome:?}"
                );
            }
        }
        idle().await;
        for (i, reservation) in reservations.iter().enumerate() {
            let epsilon = -200 + (400 * i as i64) / (RACERS - 1);
            let expected = if epsilon < 0 {
                Status::Paid
            } else {
                Status::Expired
            };
            assert_eq!(t.stored(reservation.id), expected, "ε {epsilon}");
        }
        // Each expired one released once, never a paid one.
        let released: Vec<ReservationId> = t.releases().iter().map(|r| r.0).collect();
        let unique: std::collections::HashSet<_> = released.iter().collect();
        assert_eq!(unique.len(), released.len(), "released twice: {released:?}");
        assert_eq!(t.available(), capacity - paid_quantity);
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_payment_a_millisecond_before_expires_at_wins_and_the_timer_never_fires() {
        let t = timed(10, Source::Timer);
        let reservation = t.reserve(3).await;
        tokio::time::advance(TTL - MS).await;
        assert!(matches!(t.pay(&reservation).await, Ok(Status::Paid)));
        assert!(t.timer.as_ref().unwrap().is_empty(), "expiry cancelled");
        tokio::time::advance(SWEEP_EVERY * 2).await;
        idle().await;
        assert_eq!(t.stored(reservation.id), Status::Paid);
        assert_eq!(t.releases(), vec![]);
        assert_eq!(t.available(), 7);
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_payment_at_expires_at_before_any_source_delivered_is_expired_and_releases() {
        let t = timed(10, Source::Lost);
        let reservation = t.reserve(3).await;
        tokio::time::advance(TTL).await;
        let refused = t.pay(&reservation).await;
        assert!(matches!(refused, Err(EngineError::Expired)), "{refused:?}");
        assert_eq!(
            t.releases(),
            vec![(reservation.id, Status::Expired, reservation.expires_at)]
        );
        assert_eq!(t.available(), 10);
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_payment_after_the_timer_released_is_expired_and_changes_nothing() {
        let t = timed(10, Source::Timer);
        let reservation = t.reserve(3).await;
        tokio::time::advance(TTL).await;
        settle("the release", || {
            t.stored(reservation.id) == Status::Expired
        })
        .await;
        let refused = t.pay(&reservation).await;
        assert!(matches!(refused, Err(EngineError::Expired)), "{refused:?}");
        let cancelled = t.engine.cancel(reservation.user_id, reservation.id).await;
        assert!(
            matches!(cancelled, Err(EngineError::Expired)),
            "{cancelled:?}"
        );
        assert_eq!(t.releases().len(), 1);
        assert_eq!(t.available(), 10);
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_a_millisecond_before_expires_at_wins_and_the_timer_never_fires() {
        let t = timed(10, Source::Timer);
        let reservation = t.reserve(3).await;
        tokio::time::advance(TTL - MS).await;
        let cancelled = t
            .engine
            .cancel(reservation.user_id, reservation.id)
            .await
            .unwrap();
        assert_eq!(cancelled.status, Status::Cancelled);
        tokio::time::advance(SWEEP_EVERY * 2).await;
        idle().await;
        let cancelled_at = Timestamp::from_millis(reservation.expires_at.as_millis() - 1);
        assert_eq!(
            t.releases(),
            vec![(reservation.id, Status::Cancelled, cancelled_at)]
        );
        assert_eq!(t.stored(reservation.id), Status::Cancelled);
        assert_eq!(t.available(), 10);
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_at_expires_at_before_any_source_delivered_is_expired() {
        let t = timed(10, Source::Lost);
        let reservation = t.reserve(3).await;
        tokio::time::advance(TTL).await;
        let refused = t.engine.cancel(reservation.user_id, reservation.id).await;
        assert!(matches!(refused, Err(EngineError::Expired)), "{refused:?}");
        assert_eq!(t.stored(reservation.id), Status::Expired);
        assert_eq!(t.available(), 10);
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_source_delivering_the_sweeper_releases_on_its_next_round() {
        let t = timed(10, Source::Lost);
        idle().await; // the sweeper's first round, at 0
        let reservation = t.reserve(5).await;
        tokio::time::advance(SWEEP_EVERY - MS).await;
        idle().await;
        assert_eq!(
            t.stored(reservation.id),
            Status::Pending,
            "due, not yet swept"
        );
        tokio::time::advance(MS).await;
        settle("the sweep", || t.stored(reservation.id) == Status::Expired).await;
        let at = reservation.created_at.saturating_add(SWEEP_EVERY);
        assert_eq!(t.releases(), vec![(reservation.id, Status::Expired, at)]);
        assert_eq!(t.available(), 10);
        t.stop().await;
    }
}

/// Cluster mode: the engine sells an event only while it owns it, and every commit carries
/// the epoch it took the event over in.
mod in_a_cluster {
    use super::*;

    fn fences(s: &Setup) -> Vec<Option<u64>> {
        let fences = s.database.fences.lock().unwrap();
        fences.iter().map(|f| f.map(|f| f.epoch)).collect()
    }

    #[tokio::test]
    async fn a_taken_over_event_sells_behind_its_epoch_until_another_server_takes_it() {
        let s = setup_with(10, true);
        s.engine.give_up(s.event_id);
        let user = UserId::new();
        assert!(
            matches!(s.reserve(user, 1).await, Err(EngineError::NotOwner(e)) if e == s.event_id)
        );

        assert_eq!(
            s.engine
                .take_over(s.event_id, s.database.as_ref(), TTL)
                .await
                .unwrap(),
            1
        );
        let kept = s.reserve(user, 3).await.unwrap();
        assert_eq!(fences(&s), vec![Some(1)]);
        assert_eq!(s.available(), 7);

        // Another server takes the event over: this one's next commit is refused and the
        // event is given up at once (its availability is the new owner's to report).
        s.database.epochs.lock().unwrap().insert(s.event_id, 2);
        assert!(matches!(
            s.reserve(user, 2).await,
            Err(EngineError::Unavailable)
        ));
        assert_eq!(fences(&s), vec![Some(1), Some(1)]);
        assert_eq!(s.inventory.holding(s.event_id), Some(Holding::Mirror));

        // The pending reservation is the new owner's; calls on it go there.
        assert!(matches!(
            s.engine.cancel(user, kept.id).await,
            Err(EngineError::NotOwner(e)) if e == s.event_id
        ));
    }

    /// A reserve of an event owned elsewhere is the owner's to run, key and all: it is
    /// not looked up here first (a stored key would answer a conflict here).
    #[tokio::test]
    async fn a_reserve_of_a_mirrored_event_goes_to_its_owner_before_its_key_is_read() {
        let s = setup_with(10, true);
        s.engine.give_up(s.event_id);
        let user = UserId::new();
        let key = IdempotencyKey::parse("k-1".into()).unwrap();
        s.database
            .claim_idempotency_key(user, "tickets.reserve", "k-1", Timestamp::from_millis(0))
            .await
            .unwrap();
        let call = KeyedCall {
            method: "tickets.reserve",
            key: &key,
            params_hash: params_hash("1"),
            render: &render,
            fresh: false,
        };
        let answer = s.engine.reserve(user, s.items(1), Some(call)).await;
        assert!(
            matches!(answer, Err(EngineError::NotOwner(e)) if e == s.event_id),
            "{answer:?}"
        );
    }

    /// A commit fenced off in an epoch the event has since left (this server took it over
    /// again meanwhile) does not give the newer takeover up.
    #[tokio::test]
    async fn a_fenced_commit_gives_up_only_the_epoch_it_was_fenced_in() {
        let s = setup_with(10, true);
        s.engine
            .take_over(s.event_id, s.database.as_ref(), TTL)
            .await
            .unwrap();
        s.engine
            .take_over(s.event_id, s.database.as_ref(), TTL)
            .await
            .unwrap();
        assert_eq!(s.inventory.epoch(s.event_id), Some(2));
        s.engine.give_up_epoch(s.event_id, 1);
        assert_eq!(s.inventory.epoch(s.event_id), Some(2));
        s.engine.give_up_epoch(s.event_id, 2);
        assert_eq!(s.inventory.holding(s.event_id), Some(Holding::Mirror));
    }

    #[tokio::test]
    async fn a_takeover_rebuilds_availability_and_puts_pending_reservations_under_expiry() {
        let s = setup_with(10, true);
        s.engine
            .take_over(s.event_id, s.database.as_ref(), TTL)
            .await
            .unwrap();
        let user = UserId::new();
        let kept = s.reserve(user, 4).await.unwrap();
        s.engine.give_up(s.event_id);
        s.expiry.0.lock().unwrap().clear();

        assert_eq!(
            s.engine
                .take_over(s.event_id, s.database.as_ref(), TTL)
                .await
                .unwrap(),
            2
        );
        assert_eq!(s.available(), 6);
        assert_eq!(
            s.expiry.0.lock().unwrap().get(&kept.id),
            Some(&kept.expires_at)
        );
        let pools = s.inventory.pools(s.event_id).unwrap();
        assert_eq!(pools[0].version, first_version(2));
        let cancelled = s.engine.cancel(user, kept.id).await.unwrap();
        assert_eq!(cancelled.status, Status::Cancelled);
        assert_eq!(s.available(), 10);
        assert_eq!(fences(&s), vec![Some(1), Some(2)]);
    }

    #[tokio::test]
    async fn a_payment_begun_before_the_event_was_given_up_and_taken_back_is_not_committed() {
        let s = setup_with(10, true);
        s.engine
            .take_over(s.event_id, s.database.as_ref(), TTL)
            .await
            .unwrap();
        let user = UserId::new();
        let kept = s.reserve(user, 2).await.unwrap();
        *s.payments.result.lock().unwrap() = Ok(());
        let engine = Arc::clone(&s.engine);
        let token = PaymentToken::parse("tok_ok".into()).unwrap();
        let paying = tokio::spawn(async move { engine.pay(user, kept.id, &token, None).await });
        s.payments.started.notified().await;
        // While the provider is asked, the lease lapses and the event is taken back.
        s.engine.give_up(s.event_id);
        s.engine
            .take_over(s.event_id, s.database.as_ref(), TTL)
            .await
            .unwrap();
        s.payments.answer.notify_one();
        assert!(matches!(
            paying.await.unwrap(),
            Err(EngineError::Unavailable)
        ));
        // Nothing was committed behind the new epoch; the reservation is pending, as
        // memory and storage agree.
        assert_eq!(fences(&s), vec![Some(1)]);
        assert_eq!(s.inventory.active(kept.id).unwrap().status, Status::Pending);
        let stored = s.database.reservations.lock().unwrap()[&kept.id].status;
        assert_eq!(stored, Status::Pending);
    }

    #[tokio::test]
    async fn outside_a_cluster_commits_carry_no_fence() {
        let s = setup(10);
        s.reserve(UserId::new(), 1).await.unwrap();
        assert_eq!(fences(&s), vec![None]);
    }
}
