//! The engine alone: a real inventory, fakes for storage, writer, expiry, payments and
//! notifications, and a clock the test moves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::idempotency::{params_hash, Idempotent, KeyedCall};
use super::payments::{PaymentAdapter, PaymentError};
use super::ports::{Commits, Records, RecoverySource};
use super::recovery::first_version;
use super::{Engine, EngineError, EngineParts};
use crate::core::inventory::{Inventory, PoolState};
use crate::core::reservation::{Reservation, Status};
use crate::core::{
    Clock, Currency, Event, EventId, IdempotencyKey, Money, PaymentToken, Quantity, ReservationId,
    ReserveItems, Rule, TicketType, TicketTypeId, Timestamp, UserId,
};
use crate::expiry::Expiry;
use crate::fanout::notify::Notifier;
use crate::store::writer::WriteError;
use crate::store::{Change, IdempotencyRecord, StoreError, StoredIdempotency};

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
    ) -> Result<(), WriteError> {
        match *self.outcome.lock().unwrap() {
            Outcome::Commit => {}
            Outcome::Fail => return Err(WriteError::Failed("connection reset".into())),
            Outcome::QueueFull => return Err(WriteError::QueueFull),
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
    async fn delete_old_idempotency_keys(&self, _: Timestamp) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// Recovery reads what the fake database holds, as the SQL of `store` does.
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
            Idempotent::Fresh(reservation) => Ok(reservation),
            Idempotent::Replayed(_) => panic!("no key was given"),
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
    let Idempotent::Fresh(paid) = paying.await.unwrap().unwrap() else {
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
    };
    let Idempotent::Fresh(first) = s
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
    assert!(matches!(&again, Idempotent::Replayed(text) if *text == first.id.to_string()));
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
    assert!(matches!(stranger, Idempotent::Fresh(_)));
    assert_eq!(s.available(), 6);
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
