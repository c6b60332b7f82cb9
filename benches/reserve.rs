//! The in-memory reserve path of the core, without I/O: how long one `Inventory::reserve` of
//! one ticket takes alone, and what throughput one hot ticket type sustains when every core
//! reserves from it at once.
//!
//! Reported time per iteration is wall time ÷ total operations, across all threads, so the
//! contended figures are throughput (aggregate ns per op), not per-call latency.
//! Reservation ids are generated, and the pool refilled (`unreserve`), outside the timed
//! part, in batches, so the number of active reservations stays realistic (≤ a batch per
//! thread) and the pool never empties.
//!
//! Run: `cargo bench --bench reserve -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Barrier;
use std::thread;
use std::time::Duration;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use ticket_api::core::{
    Currency, Event, EventId, Inventory, Money, Quantity, ReservationId, ReserveItems,
    ReserveRequest, Rule, TicketType, TicketTypeId, Timestamp, UserId, MAX_COUNT,
};

/// Reservations each thread takes between two refills.
const BATCH: u64 = 10_000;

/// An inventory with one event of one ticket type as large as the protocol allows.
fn huge_pool() -> (Inventory, TicketTypeId) {
    let event_id = EventId::new();
    let ticket_type = TicketType {
        id: TicketTypeId::new(),
        event_id,
        name: "General admission".into(),
        price: Money::new(4_500, Currency::parse("EUR").expect("EUR is ISO 4217")),
        capacity: MAX_COUNT,
        rule: Rule::Any,
    };
    let id = ticket_type.id;
    let event = Event {
        id: event_id,
        name: "Benchmark".into(),
        starts_at: Timestamp::from_millis(1_800_000_000_000),
        venue: None,
        ticket_types: vec![ticket_type],
    };
    let inventory = Inventory::new();
    inventory.insert_event(event, &[MAX_COUNT]);
    (inventory, id)
}

#[derive(Clone, Copy)]
enum Work {
    /// Only `reserve` is timed; the pool is refilled between batches.
    Reserve,
    /// `reserve` then `unreserve` of the same reservation, both timed.
    ReserveUnreserve,
}

/// Runs `iters` operations on each of `threads` threads, all on `ticket_type`, and returns
/// the wall time of the timed parts divided by `threads` (so that criterion's division by
/// `iters` yields wall time per operation).
fn run(
    inventory: &Inventory,
    ticket_type: TicketTypeId,
    threads: usize,
    iters: u64,
    work: Work,
) -> Duration {
    let now = Timestamp::from_millis(1_700_000_000_000);
    let ttl = Duration::from_secs(15 * 60);
    let one = ReserveItems::new(vec![(ticket_type, Quantity::new(1).unwrap())]).unwrap();
    let batches = iters.div_ceil(BATCH);
    // Workers and this thread meet before and after every timed batch.
    let barrier = Barrier::new(threads + 1);
    let elapsed = thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let user = UserId::new();
                let mut left = iters;
                while left > 0 {
                    let size = left.min(BATCH);
                    let ids: Vec<ReservationId> = (0..size).map(|_| ReservationId::new()).collect();
                    barrier.wait();
                    for &id in &ids {
                        let reserved = inventory.reserve(ReserveRequest {
                            id,
                            user_id: user,
                            items: one.clone(),
                            now,
                            ttl,
                        });
                        black_box(reserved.expect("the pool never empties"));
                        if let Work::ReserveUnreserve = work {
                            black_box(inventory.unreserve(id));
                        }
                    }
                    barrier.wait();
                    if let Work::Reserve = work {
                        for &id in &ids {
                            inventory.unreserve(id);
                        }
                    }
                    left -= size;
                }
            });
        }
        let mut elapsed = Duration::ZERO;
        for _ in 0..batches {
            barrier.wait();
            let start = Instant::now();
            barrier.wait();
            elapsed += start.elapsed();
        }
        elapsed
    });
    elapsed / u32::try_from(threads).expect("a sane number of threads")
}

fn reserve(c: &mut Criterion) {
    let (inventory, ticket_type) = huge_pool();
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    for (name, work) in [
        ("reserve", Work::Reserve),
        ("reserve_unreserve", Work::ReserveUnreserve),
    ] {
        let mut group = c.benchmark_group(name);
        group.bench_function("uncontended_1_thread", |b| {
            b.iter_custom(|iters| run(&inventory, ticket_type, 1, iters, work))
        });
        group.bench_function(format!("contended_{cores}_threads"), |b| {
            b.iter_custom(|iters| run(&inventory, ticket_type, cores, iters, work))
        });
        group.finish();
    }
    let pools = inventory.pools(inventory.event_of_ticket_type(ticket_type).unwrap());
    assert_eq!(
        pools.unwrap()[0].available,
        MAX_COUNT,
        "every ticket came back"
    );
}

criterion_group!(benches, reserve);
criterion_main!(benches);
