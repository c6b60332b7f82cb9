//! The inventory's specification: unit tests of each behaviour, a model-based property test
//! over random sequences of operations, and a test under contention.

use std::collections::{HashMap, HashSet};
use std::sync::Barrier;
use std::thread;

use proptest::prelude::*;

use super::*;
use crate::core::catalog::{TicketType, MAX_COUNT};
use crate::core::items::Quantity;
use crate::core::money::Currency;

const TTL: Duration = Duration::from_secs(60);
const T0: Timestamp = Timestamp::from_millis(1_000_000);

fn eur(amount: i64) -> Money {
    Money::new(amount, Currency::parse("EUR").unwrap())
}

fn at(millis_after_t0: i64) -> Timestamp {
    Timestamp::from_millis(T0.as_millis() + millis_after_t0)
}

/// An event starting at `starts_at` with one ticket type per `(capacity, rule, price)`.
fn event_starting(starts_at: Timestamp, types: &[(u32, Rule, i64)]) -> Event {
    let id = EventId::new();
    Event {
        id,
        name: "Concert".into(),
        starts_at,
        venue: None,
        ticket_types: types
            .iter()
            .enumerate()
            .map(|(i, &(capacity, rule, price))| TicketType {
                id: TicketTypeId::new(),
                event_id: id,
                name: format!("type {i}"),
                price: eur(price),
                capacity,
                rule,
            })
            .collect(),
    }
}

/// An inventory with one new event of the given ticket types, all fully available.
fn inventory_with(types: &[(u32, Rule, i64)]) -> (Inventory, Event) {
    let inventory = Inventory::new();
    let event = event_starting(at(0), types);
    let capacities: Vec<u32> = types.iter().map(|t| t.0).collect();
    assert!(inventory.insert_event(event.clone(), &capacities));
    (inventory, event)
}

/// Well-formed items (their shape is `ReserveItems`'s to check, not the inventory's).
fn items(items: &[(TicketTypeId, u32)]) -> ReserveItems {
    ReserveItems::new(
        items
            .iter()
            .map(|&(id, n)| (id, Quantity::new(n).expect("a valid quantity")))
            .collect(),
    )
    .expect("well-formed items")
}

fn request(user: UserId, ticket_types: &[(TicketTypeId, u32)], now: Timestamp) -> ReserveRequest {
    ReserveRequest {
        id: ReservationId::new(),
        user_id: user,
        items: items(ticket_types),
        now,
        ttl: TTL,
    }
}

fn ids(event: &Event) -> Vec<TicketTypeId> {
    event.ticket_types.iter().map(|t| t.id).collect()
}

fn pool(ticket_type_id: TicketTypeId, available: u32, version: u64) -> PoolState {
    PoolState {
        ticket_type_id,
        available,
        version,
    }
}

/// Reserves `items` for `user` at T0 and returns the reservation.
fn reserve(inventory: &Inventory, user: UserId, items: &[(TicketTypeId, u32)]) -> Reservation {
    inventory
        .reserve(request(user, items, T0))
        .expect("reservable")
        .reservation
}

// ---------------------------------------------------------------------------------------
// reserve
// ---------------------------------------------------------------------------------------

#[test]
fn reserve_takes_the_tickets_and_records_a_pending_reservation() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 2_500), (5, Rule::Any, 1_000)]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };
    let user = UserId::new();
    let req = request(user, &[(b, 2), (a, 3)], T0);
    let id = req.id;

    let reserved = inventory.reserve(req).unwrap();

    assert_eq!(
        reserved.reservation,
        Reservation {
            id,
            user_id: user,
            event_id: event.id,
            status: Status::Pending,
            items: vec![
                ReservationItem {
                    ticket_type_id: b,
                    quantity: 2,
                    unit_price: eur(1_000)
                },
                ReservationItem {
                    ticket_type_id: a,
                    quantity: 3,
                    unit_price: eur(2_500)
                },
            ],
            total: eur(9_500),
            created_at: T0,
            expires_at: at(60_000),
        }
    );
    assert_eq!(reserved.pools, vec![pool(b, 3, 1), pool(a, 7, 1)]);
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 7, 1), pool(b, 3, 1)])
    );
    assert_eq!(inventory.active(id), Some(reserved.reservation));
}

#[test]
fn reserve_takes_nothing_when_a_later_item_is_insufficient() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100), (2, Rule::Any, 100)]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };

    let refused = inventory.reserve(request(UserId::new(), &[(a, 4), (b, 3)], T0));

    assert_eq!(
        refused,
        Err(ReserveError::Insufficient {
            ticket_type_id: b,
            available: 2
        })
    );
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 10, 0), pool(b, 2, 0)])
    );
}

#[test]
fn reserve_takes_nothing_when_a_later_item_breaks_its_rule() {
    let rule = Rule::multiple(3).unwrap();
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100), (9, rule, 100)]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };

    let refused = inventory.reserve(request(UserId::new(), &[(a, 4), (b, 4)], T0));

    assert_eq!(
        refused,
        Err(ReserveError::RuleViolation {
            ticket_type_id: b,
            rule
        })
    );
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 10, 0), pool(b, 9, 0)])
    );
}

#[test]
fn reserve_takes_twenty_items_at_once() {
    let types = vec![(10, Rule::Any, 100); MAX_ITEMS];
    let (inventory, event) = inventory_with(&types);
    let all: Vec<_> = ids(&event).into_iter().map(|id| (id, 1)).collect();
    let reserved = inventory.reserve(request(UserId::new(), &all, T0)).unwrap();
    assert_eq!(reserved.pools.len(), MAX_ITEMS);
}

#[test]
fn reserve_takes_up_to_max_count_tickets_of_a_type() {
    let (inventory, event) = inventory_with(&[(MAX_COUNT, Rule::Any, 0)]);
    let a = event.ticket_types[0].id;
    let all = inventory.reserve(request(UserId::new(), &[(a, MAX_COUNT)], T0));
    assert_eq!(all.unwrap().pools, vec![pool(a, 0, 1)]);
}

#[test]
fn reserve_refuses_an_unknown_ticket_type() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    assert_eq!(
        inventory.reserve(request(
            UserId::new(),
            &[(a, 1), (TicketTypeId::new(), 1)],
            T0
        )),
        Err(ReserveError::UnknownTicketType { index: 1 })
    );
}

#[test]
fn reserve_refuses_items_of_two_events() {
    let (inventory, first) = inventory_with(&[(10, Rule::Any, 100), (10, Rule::Any, 100)]);
    let second = event_starting(at(0), &[(10, Rule::Any, 100)]);
    inventory.insert_event(second.clone(), &[10]);
    let [a, b] = ids(&first)[..] else {
        unreachable!()
    };
    let other = second.ticket_types[0].id;

    assert_eq!(
        inventory.reserve(request(UserId::new(), &[(a, 1), (b, 1), (other, 1)], T0)),
        Err(ReserveError::MixedEvents { index: 2 })
    );
    assert_eq!(
        inventory.pools(first.id),
        Some(vec![pool(a, 10, 0), pool(b, 10, 0)])
    );
    assert_eq!(inventory.pools(second.id), Some(vec![pool(other, 10, 0)]));
}

#[test]
fn reserve_checks_ticket_types_item_by_item_in_order() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100), (10, Rule::Any, 100)]);
    let second = event_starting(at(0), &[(10, Rule::Any, 100)]);
    inventory.insert_event(second.clone(), &[10]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };
    let other = second.ticket_types[0].id;
    let unknown = TicketTypeId::new();
    let user = UserId::new();
    let cases: [(&[(TicketTypeId, u32)], ReserveError); 3] = [
        (
            &[(unknown, 1), (other, 1)],
            ReserveError::UnknownTicketType { index: 0 },
        ),
        (
            &[(a, 1), (other, 1), (unknown, 1)],
            ReserveError::MixedEvents { index: 1 },
        ),
        (
            &[(a, 1), (b, 1), (unknown, 1), (other, 1)],
            ReserveError::UnknownTicketType { index: 2 },
        ),
    ];
    for (items, expected) in cases {
        assert_eq!(
            inventory.reserve(request(user, items, T0)),
            Err(expected),
            "{items:?}"
        );
    }
}

#[test]
fn reserve_checks_every_ticket_type_before_any_availability() {
    let (inventory, event) = inventory_with(&[(1, Rule::Any, 100), (10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    assert_eq!(
        inventory.reserve(request(
            UserId::new(),
            &[(a, 5), (TicketTypeId::new(), 1)],
            T0
        )),
        Err(ReserveError::UnknownTicketType { index: 1 })
    );
}

#[test]
fn reserve_refuses_more_than_available_whatever_the_rule() {
    for rule in [
        Rule::Any,
        Rule::multiple(2).unwrap(),
        Rule::Altogether,
        Rule::AvoidOne,
    ] {
        let (inventory, event) = inventory_with(&[(4, rule, 100)]);
        let a = event.ticket_types[0].id;
        assert_eq!(
            inventory.reserve(request(UserId::new(), &[(a, 6)], T0)),
            Err(ReserveError::Insufficient {
                ticket_type_id: a,
                available: 4
            }),
            "{rule:?}"
        );
    }
}

#[test]
fn reserve_reports_the_rule_that_refused() {
    let (inventory, event) =
        inventory_with(&[(5, Rule::Altogether, 100), (5, Rule::AvoidOne, 100)]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };
    let user = UserId::new();
    assert_eq!(
        inventory.reserve(request(user, &[(a, 4)], T0)),
        Err(ReserveError::RuleViolation {
            ticket_type_id: a,
            rule: Rule::Altogether
        })
    );
    assert_eq!(
        inventory.reserve(request(user, &[(b, 4)], T0)),
        Err(ReserveError::RuleViolation {
            ticket_type_id: b,
            rule: Rule::AvoidOne
        })
    );
}

#[test]
fn rules_are_checked_against_the_availability_of_the_moment() {
    let (inventory, event) = inventory_with(&[(10, Rule::AvoidOne, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    reserve(&inventory, user, &[(a, 3)]);

    assert_eq!(
        inventory.reserve(request(user, &[(a, 6)], T0)),
        Err(ReserveError::RuleViolation {
            ticket_type_id: a,
            rule: Rule::AvoidOne
        }),
        "6 of 10 would be fine, but 6 of the 7 left leaves one"
    );
    assert!(inventory.reserve(request(user, &[(a, 7)], T0)).is_ok());
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 0, 2)]));
}

#[test]
fn reserve_refuses_a_total_that_overflows_and_takes_nothing() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 1), (10, Rule::Any, i64::MAX / 2)]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };
    assert_eq!(
        inventory.reserve(request(UserId::new(), &[(a, 1), (b, 3)], T0)),
        Err(ReserveError::TotalOverflow)
    );
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 10, 0), pool(b, 10, 0)])
    );
}

#[test]
fn reserve_reports_insufficient_before_an_overflowing_total() {
    let (inventory, event) = inventory_with(&[(2, Rule::Any, i64::MAX / 2)]);
    let a = event.ticket_types[0].id;
    assert_eq!(
        inventory.reserve(request(UserId::new(), &[(a, 3)], T0)),
        Err(ReserveError::Insufficient {
            ticket_type_id: a,
            available: 2
        })
    );
}

// ---------------------------------------------------------------------------------------
// versions
// ---------------------------------------------------------------------------------------

#[test]
fn every_change_bumps_each_touched_pool_version_by_one() {
    let types = [
        (10, Rule::Any, 100),
        (10, Rule::Any, 100),
        (10, Rule::Any, 100),
    ];
    let (inventory, event) = inventory_with(&types);
    let [a, b, c] = ids(&event)[..] else {
        unreachable!()
    };
    let user = UserId::new();

    let first = reserve(&inventory, user, &[(a, 1), (b, 2)]);
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 9, 1), pool(b, 8, 1), pool(c, 10, 0)])
    );

    let second = reserve(&inventory, user, &[(b, 1)]);
    inventory.begin_payment(second.id, user, T0).unwrap();
    inventory.complete_payment(second.id).unwrap();
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 9, 1), pool(b, 7, 2), pool(c, 10, 0)]),
        "a payment does not change availability, so not the version either"
    );

    inventory
        .begin_release(first.id, ReleaseKind::Cancel, Some(user), T0)
        .unwrap();
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 9, 1), pool(b, 7, 2), pool(c, 10, 0)]),
        "tickets stay held while the release is committed"
    );
    let (_, pools) = inventory.complete_release(first.id).unwrap();
    assert_eq!(pools, vec![pool(a, 10, 2), pool(b, 9, 3)]);
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 10, 2), pool(b, 9, 3), pool(c, 10, 0)])
    );
}

#[test]
fn refused_reservations_leave_versions_unchanged() {
    let (inventory, event) = inventory_with(&[(3, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    for quantity in [4, MAX_COUNT] {
        assert!(inventory
            .reserve(request(UserId::new(), &[(a, quantity)], T0))
            .is_err());
    }
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 3, 0)]));
}

// ---------------------------------------------------------------------------------------
// cancel and expiry
// ---------------------------------------------------------------------------------------

#[test]
fn cancel_gives_the_tickets_back_with_status_cancelled() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(a, 4)]);

    let snapshot = inventory
        .begin_release(held.id, ReleaseKind::Cancel, Some(user), at(59_999))
        .unwrap();
    assert_eq!(snapshot, held);
    let (released, pools) = inventory.complete_release(held.id).unwrap();

    assert_eq!(
        released,
        Reservation {
            status: Status::Cancelled,
            ..held.clone()
        }
    );
    assert_eq!(pools, vec![pool(a, 10, 2)]);
    assert_eq!(inventory.active(held.id), None);
}

#[test]
fn cancel_of_a_reservation_being_paid_is_not_pending() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(event.ticket_types[0].id, 1)]);
    inventory.begin_payment(held.id, user, T0).unwrap();

    assert_eq!(
        inventory.begin_release(held.id, ReleaseKind::Cancel, Some(user), T0),
        Err(ChangeError::NotPending)
    );
}

#[test]
fn cancel_of_a_reservation_being_released_is_not_pending() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(event.ticket_types[0].id, 1)]);
    inventory
        .begin_release(held.id, ReleaseKind::Cancel, Some(user), T0)
        .unwrap();

    assert_eq!(
        inventory.begin_release(held.id, ReleaseKind::Cancel, Some(user), T0),
        Err(ChangeError::NotPending)
    );
}

#[test]
fn cancel_at_expires_at_is_expired() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(event.ticket_types[0].id, 1)]);

    assert_eq!(
        inventory.begin_release(held.id, ReleaseKind::Cancel, Some(user), held.expires_at),
        Err(ChangeError::Expired)
    );
    assert_eq!(inventory.active(held.id), Some(held));
}

#[test]
fn expire_before_expires_at_is_not_due() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let held = reserve(&inventory, UserId::new(), &[(event.ticket_types[0].id, 1)]);

    assert_eq!(
        inventory.begin_release(held.id, ReleaseKind::Expire, None, at(59_999)),
        Err(ChangeError::NotDue)
    );
}

#[test]
fn expire_at_expires_at_gives_the_tickets_back_with_status_expired() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let held = reserve(&inventory, UserId::new(), &[(a, 3)]);

    inventory
        .begin_release(held.id, ReleaseKind::Expire, None, held.expires_at)
        .unwrap();
    let (released, pools) = inventory.complete_release(held.id).unwrap();

    assert_eq!(released.status, Status::Expired);
    assert_eq!(pools, vec![pool(a, 10, 2)]);
}

#[test]
fn expiry_skips_reservations_being_paid_or_released() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let paying = reserve(&inventory, user, &[(a, 1)]);
    let releasing = reserve(&inventory, user, &[(a, 1)]);
    let pending = reserve(&inventory, user, &[(a, 1)]);
    inventory.begin_payment(paying.id, user, T0).unwrap();
    inventory
        .begin_release(releasing.id, ReleaseKind::Cancel, Some(user), T0)
        .unwrap();
    let late = at(60_000);

    assert_eq!(inventory.overdue(late), vec![pending.id]);
    for id in [paying.id, releasing.id] {
        assert_eq!(
            inventory.begin_release(id, ReleaseKind::Expire, None, late),
            Err(ChangeError::NotPending)
        );
    }
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 7, 3)]));
}

#[test]
fn paying_or_cancelling_while_the_expiry_commits_is_expired() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let r = reserve(&inventory, user, &[(a, 1)]);
    let late = r.expires_at;
    inventory
        .begin_release(r.id, ReleaseKind::Expire, None, late)
        .unwrap();
    // The clock of the caller may lag the expiry's: the phase decides.
    assert_eq!(
        inventory.begin_payment(r.id, user, T0),
        Err(ChangeError::Expired)
    );
    assert_eq!(
        inventory.begin_release(r.id, ReleaseKind::Cancel, Some(user), T0),
        Err(ChangeError::Expired)
    );
}

#[test]
fn overdue_lists_due_pending_reservations_soonest_first() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let take = |now: Timestamp| {
        let req = request(user, &[(a, 1)], now);
        inventory.reserve(req).unwrap().reservation.id
    };
    let later = take(at(20));
    let sooner = take(at(10));
    let not_due = take(at(30));

    assert_eq!(inventory.overdue(at(60_019)), vec![sooner]);
    assert_eq!(inventory.overdue(at(60_020)), vec![sooner, later]);
    assert_eq!(inventory.overdue(at(60_030)), vec![sooner, later, not_due]);
    assert_eq!(inventory.overdue(at(60_009)), Vec::<ReservationId>::new());
}

#[test]
fn overdue_covers_every_event() {
    let (inventory, first) = inventory_with(&[(10, Rule::Any, 100)]);
    let second = event_starting(at(0), &[(10, Rule::Any, 100)]);
    inventory.insert_event(second.clone(), &[10]);
    let user = UserId::new();
    let one = reserve(&inventory, user, &[(first.ticket_types[0].id, 1)]);
    let two = reserve(&inventory, user, &[(second.ticket_types[0].id, 1)]);

    let mut due = inventory.overdue(at(60_000));
    due.sort();
    let mut expected = vec![one.id, two.id];
    expected.sort();
    assert_eq!(due, expected);
}

#[test]
fn complete_release_twice_releases_once() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let held = reserve(&inventory, UserId::new(), &[(a, 5)]);
    inventory
        .begin_release(held.id, ReleaseKind::Expire, None, held.expires_at)
        .unwrap();

    assert!(inventory.complete_release(held.id).is_some());
    assert_eq!(inventory.complete_release(held.id), None);
    assert_eq!(
        inventory.begin_release(held.id, ReleaseKind::Expire, None, held.expires_at),
        Err(ChangeError::NotFound)
    );
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 10, 2)]));
}

#[test]
fn complete_release_without_begin_release_does_nothing() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(a, 5)]);

    assert_eq!(inventory.complete_release(held.id), None);
    inventory.begin_payment(held.id, user, T0).unwrap();
    assert_eq!(inventory.complete_release(held.id), None);
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 5, 1)]));
}

#[test]
fn abort_release_keeps_the_tickets_held_and_the_reservation_pending() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(a, 4)]);
    inventory
        .begin_release(held.id, ReleaseKind::Cancel, Some(user), T0)
        .unwrap();

    assert_eq!(inventory.abort_release(held.id), Some(held.clone()));

    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 6, 1)]));
    assert_eq!(inventory.abort_release(held.id), None);
    assert_eq!(inventory.complete_release(held.id), None);
    assert!(inventory.begin_payment(held.id, user, T0).is_ok());
}

// ---------------------------------------------------------------------------------------
// payment
// ---------------------------------------------------------------------------------------

#[test]
fn complete_payment_keeps_the_tickets_taken_and_forgets_the_reservation() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(a, 4)]);

    assert_eq!(
        inventory.begin_payment(held.id, user, at(59_999)),
        Ok(held.clone())
    );
    let paid = inventory.complete_payment(held.id).unwrap();

    assert_eq!(
        paid,
        Reservation {
            status: Status::Paid,
            ..held.clone()
        }
    );
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 6, 1)]));
    assert_eq!(inventory.active(held.id), None);
    assert_eq!(inventory.complete_payment(held.id), None);
    assert_eq!(inventory.overdue(at(120_000)), Vec::<ReservationId>::new());
}

#[test]
fn begin_payment_at_expires_at_is_expired() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(event.ticket_types[0].id, 1)]);

    assert_eq!(
        inventory.begin_payment(held.id, user, held.expires_at),
        Err(ChangeError::Expired)
    );
}

#[test]
fn begin_payment_twice_is_not_pending() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(event.ticket_types[0].id, 1)]);
    inventory.begin_payment(held.id, user, T0).unwrap();

    assert_eq!(
        inventory.begin_payment(held.id, user, T0),
        Err(ChangeError::NotPending)
    );
}

#[test]
fn a_payment_begun_before_expiry_decides_the_outcome() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(a, 2)]);
    inventory.begin_payment(held.id, user, at(59_999)).unwrap();

    assert_eq!(inventory.overdue(at(90_000)), Vec::<ReservationId>::new());
    assert_eq!(
        inventory.complete_payment(held.id).unwrap().status,
        Status::Paid
    );
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 8, 1)]));
}

#[test]
fn abort_payment_makes_the_reservation_pending_again() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(a, 2)]);
    inventory.begin_payment(held.id, user, T0).unwrap();

    assert_eq!(inventory.abort_payment(held.id), Some(held.clone()));

    assert_eq!(inventory.abort_payment(held.id), None);
    assert_eq!(inventory.complete_payment(held.id), None);
    assert_eq!(inventory.overdue(held.expires_at), vec![held.id]);
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 8, 1)]));
}

#[test]
fn a_paid_reservation_can_no_longer_be_released() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let user = UserId::new();
    let held = reserve(&inventory, user, &[(event.ticket_types[0].id, 2)]);
    inventory.begin_payment(held.id, user, T0).unwrap();
    inventory.complete_payment(held.id).unwrap();

    assert_eq!(
        inventory.begin_release(held.id, ReleaseKind::Expire, None, held.expires_at),
        Err(ChangeError::NotFound)
    );
    assert_eq!(inventory.complete_release(held.id), None);
    assert_eq!(inventory.unreserve(held.id), None);
}

// ---------------------------------------------------------------------------------------
// access
// ---------------------------------------------------------------------------------------

#[test]
fn another_users_reservation_is_not_found() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let held = reserve(&inventory, UserId::new(), &[(event.ticket_types[0].id, 1)]);
    let stranger = UserId::new();

    assert_eq!(
        inventory.begin_payment(held.id, stranger, T0),
        Err(ChangeError::NotFound)
    );
    assert_eq!(
        inventory.begin_release(held.id, ReleaseKind::Cancel, Some(stranger), T0),
        Err(ChangeError::NotFound)
    );
    assert_eq!(inventory.active(held.id), Some(held));
}

#[test]
fn an_unknown_reservation_is_not_found() {
    let (inventory, _) = inventory_with(&[(10, Rule::Any, 100)]);
    let (id, user) = (ReservationId::new(), UserId::new());

    assert_eq!(
        inventory.begin_payment(id, user, T0),
        Err(ChangeError::NotFound)
    );
    assert_eq!(
        inventory.begin_release(id, ReleaseKind::Cancel, Some(user), T0),
        Err(ChangeError::NotFound)
    );
    assert_eq!(inventory.active(id), None);
    assert_eq!(inventory.complete_payment(id), None);
    assert_eq!(inventory.abort_payment(id), None);
    assert_eq!(inventory.complete_release(id), None);
    assert_eq!(inventory.abort_release(id), None);
    assert_eq!(inventory.unreserve(id), None);
}

// ---------------------------------------------------------------------------------------
// unreserve
// ---------------------------------------------------------------------------------------

#[test]
fn unreserve_gives_the_tickets_back_and_forgets_the_reservation() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100), (10, Rule::Any, 100)]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };
    let held = reserve(&inventory, UserId::new(), &[(b, 1), (a, 3)]);

    assert_eq!(
        inventory.unreserve(held.id),
        Some(vec![pool(b, 10, 2), pool(a, 10, 2)])
    );

    assert_eq!(inventory.active(held.id), None);
    assert_eq!(inventory.unreserve(held.id), None);
    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 10, 2), pool(b, 10, 2)])
    );
}

// ---------------------------------------------------------------------------------------
// catalog, recovery
// ---------------------------------------------------------------------------------------

#[test]
fn event_reports_the_catalog_and_live_availability_in_ticket_type_order() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100), (3, Rule::AvoidOne, 50)]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };
    reserve(&inventory, UserId::new(), &[(b, 3)]);

    let (catalog, pools) = inventory.event(event.id).unwrap();

    assert_eq!(*catalog, event);
    assert_eq!(pools, vec![pool(a, 10, 0), pool(b, 0, 1)]);
    assert_eq!(inventory.event_of_ticket_type(b), Some(event.id));
    assert_eq!(inventory.event_of_ticket_type(TicketTypeId::new()), None);
    assert!(inventory.event(EventId::new()).is_none());
    assert_eq!(inventory.pools(EventId::new()), None);
}

#[test]
fn insert_event_starts_at_the_given_availability_and_version_zero() {
    let inventory = Inventory::new();
    let event = event_starting(at(0), &[(10, Rule::Any, 100), (7, Rule::Any, 100)]);
    let [a, b] = ids(&event)[..] else {
        unreachable!()
    };

    assert!(inventory.insert_event(event.clone(), &[4, 7]));

    assert_eq!(
        inventory.pools(event.id),
        Some(vec![pool(a, 4, 0), pool(b, 7, 0)])
    );
}

#[test]
fn insert_event_twice_keeps_the_first() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    reserve(&inventory, UserId::new(), &[(a, 2)]);

    assert!(!inventory.insert_event(event.clone(), &[10]));

    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 8, 1)]));
    assert_eq!(inventory.events_after(None, 10).len(), 1);
}

#[test]
#[should_panic(expected = "exceeds the capacity")]
fn insert_event_refuses_more_available_than_capacity() {
    let event = event_starting(at(0), &[(10, Rule::Any, 100)]);
    Inventory::new().insert_event(event, &[11]);
}

#[test]
fn events_after_orders_by_start_then_id_and_resumes_strictly_after_the_cursor() {
    let inventory = Inventory::new();
    let late = event_starting(at(300), &[(1, Rule::Any, 1)]);
    let early = event_starting(at(100), &[(1, Rule::Any, 1)]);
    let mut twins = [
        event_starting(at(200), &[(1, Rule::Any, 1)]),
        event_starting(at(200), &[(1, Rule::Any, 1)]),
    ];
    twins.sort_by_key(|event| event.id);
    for event in [&late, &twins[1], &early, &twins[0]] {
        inventory.insert_event(event.clone(), &[1]);
    }
    let names = |page: Vec<(Arc<Event>, Vec<PoolState>)>| -> Vec<EventId> {
        page.into_iter().map(|(event, _)| event.id).collect()
    };

    assert_eq!(
        names(inventory.events_after(None, 10)),
        vec![early.id, twins[0].id, twins[1].id, late.id]
    );
    assert_eq!(
        names(inventory.events_after(None, 2)),
        vec![early.id, twins[0].id]
    );
    let cursor = Some((twins[0].starts_at, twins[0].id));
    assert_eq!(
        names(inventory.events_after(cursor, 2)),
        vec![twins[1].id, late.id]
    );
    let last = Some((late.starts_at, late.id));
    assert_eq!(
        names(inventory.events_after(last, 2)),
        Vec::<EventId>::new()
    );
    assert_eq!(
        names(inventory.events_after(None, 0)),
        Vec::<EventId>::new()
    );
}

#[test]
fn events_after_carries_live_availability() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    reserve(&inventory, UserId::new(), &[(a, 6)]);

    let page = inventory.events_after(None, 1);

    assert_eq!(page[0].1, vec![pool(a, 4, 1)]);
}

#[test]
fn a_restored_pending_reservation_expires_and_gives_its_tickets_back() {
    let inventory = Inventory::new();
    let event = event_starting(at(0), &[(10, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let user = UserId::new();
    let recovered = Reservation {
        id: ReservationId::new(),
        user_id: user,
        event_id: event.id,
        status: Status::Pending,
        items: vec![ReservationItem {
            ticket_type_id: a,
            quantity: 3,
            unit_price: eur(100),
        }],
        total: eur(300),
        created_at: T0,
        expires_at: at(1_000),
    };
    inventory.insert_event(event.clone(), &[7]);

    assert!(inventory.restore_pending(recovered.clone()));

    assert_eq!(inventory.active(recovered.id), Some(recovered.clone()));
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 7, 0)]));
    assert_eq!(inventory.overdue(at(1_000)), vec![recovered.id]);
    inventory
        .begin_release(recovered.id, ReleaseKind::Expire, None, at(1_000))
        .unwrap();
    let (expired, pools) = inventory.complete_release(recovered.id).unwrap();
    assert_eq!(expired.status, Status::Expired);
    assert_eq!(pools, vec![pool(a, 10, 1)]);
}

#[test]
fn restore_pending_refuses_what_the_inventory_cannot_track() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 100)]);
    let held = reserve(&inventory, UserId::new(), &[(event.ticket_types[0].id, 1)]);
    let unknown_event = Reservation {
        id: ReservationId::new(),
        event_id: EventId::new(),
        ..held.clone()
    };
    let foreign_type = Reservation {
        id: ReservationId::new(),
        items: vec![ReservationItem {
            ticket_type_id: TicketTypeId::new(),
            ..held.items[0]
        }],
        ..held.clone()
    };

    assert!(!inventory.restore_pending(unknown_event));
    assert!(!inventory.restore_pending(foreign_type));
    assert!(!inventory.restore_pending(held.clone()), "already active");
    assert_eq!(inventory.active(held.id), Some(held));
}

// ---------------------------------------------------------------------------------------
// contention
// ---------------------------------------------------------------------------------------

#[test]
fn concurrent_reservations_never_oversell() {
    const THREADS: usize = 8;
    const ATTEMPTS: usize = 250;
    let (inventory, event) = inventory_with(&[(1_000, Rule::Any, 100)]);
    let a = event.ticket_types[0].id;
    let start = Barrier::new(THREADS);

    let outcomes: Vec<(usize, usize)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    let user = UserId::new();
                    start.wait();
                    let (mut taken, mut refused) = (0, 0);
                    for _ in 0..ATTEMPTS {
                        match inventory.reserve(request(user, &[(a, 1)], T0)) {
                            Ok(_) => taken += 1,
                            Err(error) => {
                                assert_eq!(
                                    error,
                                    ReserveError::Insufficient {
                                        ticket_type_id: a,
                                        available: 0
                                    }
                                );
                                refused += 1;
                            }
                        }
                    }
                    (taken, refused)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });

    let taken: usize = outcomes.iter().map(|o| o.0).sum();
    let refused: usize = outcomes.iter().map(|o| o.1).sum();
    assert_eq!(taken, 1_000);
    assert_eq!(refused, THREADS * ATTEMPTS - 1_000);
    assert_eq!(inventory.pools(event.id), Some(vec![pool(a, 0, 1_000)]));
    assert_eq!(inventory.overdue(at(60_000)).len(), 1_000);
}

// ---------------------------------------------------------------------------------------
// model-based property test
// ---------------------------------------------------------------------------------------

/// One step of a random history. `pick` selects among the reservation ids issued so far
/// (forgotten ones included), `user` between two users, `event` a ticket type's event (or,
/// when out of range, an unknown ticket type).
#[derive(Clone, Debug)]
enum Op {
    Reserve {
        user: usize,
        items: Vec<(usize, usize, u32)>,
    },
    BeginPayment {
        pick: usize,
        user: usize,
    },
    CompletePayment {
        pick: usize,
    },
    AbortPayment {
        pick: usize,
    },
    /// begin_payment then, at once, complete or abort.
    Pay {
        pick: usize,
        succeeds: bool,
    },
    BeginCancel {
        pick: usize,
        user: usize,
    },
    BeginExpire {
        pick: usize,
    },
    CompleteRelease {
        pick: usize,
    },
    AbortRelease {
        pick: usize,
    },
    Unreserve {
        pick: usize,
    },
    /// Time passes.
    Advance {
        millis: i64,
    },
    /// The sweeper expires whatever is overdue.
    Sweep,
}

/// The model's idea of a reservation's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Pending,
    Paying,
    Releasing(ReleaseKind),
    Paid,
    Released,
    Unreserved,
}

impl Life {
    fn holds_tickets(self) -> bool {
        matches!(self, Life::Pending | Life::Paying | Life::Releasing(_))
    }
}

struct ModelPool {
    id: TicketTypeId,
    capacity: u32,
    rule: Rule,
    price: Money,
    paid: u32,
    version: u64,
}

struct ModelReservation {
    user: UserId,
    event: usize,
    items: Vec<(usize, u32)>,
    expires_at: Timestamp,
    life: Life,
}

const MODEL_TTL: Duration = Duration::from_millis(1_000);

struct Model {
    inventory: Inventory,
    events: Vec<EventId>,
    pools: Vec<Vec<ModelPool>>,
    users: [UserId; 2],
    unknown_type: TicketTypeId,
    issued: Vec<ReservationId>,
    reservations: HashMap<ReservationId, ModelReservation>,
    paid: HashSet<ReservationId>,
    released: HashSet<ReservationId>,
    now: Timestamp,
}

impl Model {
    fn new(shapes: &[Vec<(u32, Rule, i64)>]) -> Self {
        let inventory = Inventory::new();
        let mut events = Vec::new();
        let mut pools = Vec::new();
        for (i, types) in shapes.iter().enumerate() {
            let event = event_starting(at(i as i64), types);
            let capacities: Vec<u32> = types.iter().map(|t| t.0).collect();
            assert!(inventory.insert_event(event.clone(), &capacities));
            events.push(event.id);
            pools.push(
                event
                    .ticket_types
                    .iter()
                    .map(|t| ModelPool {
                        id: t.id,
                        capacity: t.capacity,
                        rule: t.rule,
                        price: t.price,
                        paid: 0,
                        version: 0,
                    })
                    .collect(),
            );
        }
        Self {
            inventory,
            events,
            pools,
            users: [UserId::new(), UserId::new()],
            unknown_type: TicketTypeId::new(),
            issued: Vec::new(),
            reservations: HashMap::new(),
            paid: HashSet::new(),
            released: HashSet::new(),
            now: T0,
        }
    }

    fn held(&self, event: usize, position: usize) -> u32 {
        self.reservations
            .values()
            .filter(|r| r.event == event && r.life.holds_tickets())
            .flat_map(|r| r.items.iter())
            .filter(|&&(p, _)| p == position)
            .map(|&(_, quantity)| quantity)
            .sum()
    }

    fn available(&self, event: usize, position: usize) -> u32 {
        let pool = &self.pools[event][position];
        pool.capacity - pool.paid - self.held(event, position)
    }

    /// An even `pick` prefers a reservation that still holds tickets, an odd one any issued
    /// id (forgotten ones included); with none issued, an id never seen.
    fn pick(&self, pick: usize) -> ReservationId {
        let holding: Vec<ReservationId> = self
            .issued
            .iter()
            .copied()
            .filter(|id| self.reservations[id].life.holds_tickets())
            .collect();
        let from = if pick.is_multiple_of(2) && !holding.is_empty() {
            &holding
        } else {
            &self.issued
        };
        if from.is_empty() {
            ReservationId::new()
        } else {
            from[(pick / 2) % from.len()]
        }
    }

    /// Where a wire ticket type lives in the model: `(event, position)`.
    fn locate(&self, id: TicketTypeId) -> Option<(usize, usize)> {
        self.pools.iter().enumerate().find_map(|(event, pools)| {
            pools
                .iter()
                .position(|pool| pool.id == id)
                .map(|position| (event, position))
        })
    }

    /// The outcome the protocol prescribes for `items`, given the model's availability.
    fn expected_reserve(&self, items: &[(TicketTypeId, u32)]) -> Result<Money, ReserveError> {
        let mut event = None;
        let mut located = Vec::new();
        for (index, &(id, quantity)) in items.iter().enumerate() {
            let (e, position) = self
                .locate(id)
                .ok_or(ReserveError::UnknownTicketType { index })?;
            if *event.get_or_insert(e) != e {
                return Err(ReserveError::MixedEvents { index });
            }
            located.push((e, position, quantity));
        }
        let mut total = 0;
        for &(e, position, quantity) in &located {
            let pool = &self.pools[e][position];
            let available = self.available(e, position);
            if quantity > available {
                return Err(ReserveError::Insufficient {
                    ticket_type_id: pool.id,
                    available,
                });
            }
            let allowed = match pool.rule {
                Rule::Any => true,
                Rule::Multiple { of } => quantity % of.get() == 0,
                Rule::Altogether => quantity == available,
                Rule::AvoidOne => available - quantity != 1,
            };
            if !allowed {
                return Err(ReserveError::RuleViolation {
                    ticket_type_id: pool.id,
                    rule: pool.rule,
                });
            }
            total += pool.price.amount * i64::from(quantity);
        }
        Ok(eur(total))
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Reserve { user, ref items } => self.reserve(user, items),
            Op::BeginPayment { pick, user } => self.begin_payment(pick, user),
            Op::CompletePayment { pick } => self.complete_payment(self.pick(pick)),
            Op::AbortPayment { pick } => self.abort_payment(self.pick(pick)),
            Op::Pay { pick, succeeds } => {
                let id = self.pick(pick);
                let owner = self
                    .reservations
                    .get(&id)
                    .map_or(0, |r| usize::from(r.user == self.users[1]));
                let paying = self.reservations.get(&id).map(|r| r.life) == Some(Life::Pending)
                    && self.now < self.reservations[&id].expires_at;
                self.begin_payment(pick, owner);
                if paying {
                    if succeeds {
                        self.complete_payment(id);
                    } else {
                        self.abort_payment(id);
                    }
                }
            }
            Op::BeginCancel { pick, user } => {
                let user = self.users[user];
                self.begin_release(self.pick(pick), ReleaseKind::Cancel, Some(user));
            }
            Op::BeginExpire { pick } => {
                self.begin_release(self.pick(pick), ReleaseKind::Expire, None);
            }
            Op::CompleteRelease { pick } => self.complete_release(self.pick(pick)),
            Op::AbortRelease { pick } => self.abort_release(self.pick(pick)),
            Op::Unreserve { pick } => self.unreserve(self.pick(pick)),
            Op::Advance { millis } => {
                self.now = Timestamp::from_millis(self.now.as_millis() + millis);
            }
            Op::Sweep => self.sweep(),
        }
    }

    fn reserve(&mut self, user: usize, items: &[(usize, usize, u32)]) {
        let items: Vec<(TicketTypeId, u32)> = items
            .iter()
            .map(|&(event, kind, quantity)| {
                let id = match self.pools.get(event) {
                    Some(pools) => pools[kind % pools.len()].id,
                    None => self.unknown_type,
                };
                (id, quantity)
            })
            .collect();
        // Malformed items (none, a zero quantity, a repeated ticket type) never reach the
        // inventory: `ReserveItems` refuses them first.
        let well_formed = items
            .iter()
            .map(|&(id, n)| Quantity::new(n).map(|q| (id, q)).ok())
            .collect::<Option<Vec<_>>>()
            .and_then(|typed| ReserveItems::new(typed).ok());
        let Some(well_formed) = well_formed else {
            return;
        };
        let expected = self.expected_reserve(&items);
        let req = ReserveRequest {
            id: ReservationId::new(),
            user_id: self.users[user],
            items: well_formed,
            now: self.now,
            ttl: MODEL_TTL,
        };
        let id = req.id;
        let outcome = self.inventory.reserve(req);
        match (expected, outcome) {
            (Ok(total), Ok(reserved)) => {
                assert_eq!(reserved.reservation.total, total);
                assert_eq!(reserved.reservation.status, Status::Pending);
                assert_eq!(
                    reserved.reservation.expires_at,
                    self.now.saturating_add(MODEL_TTL)
                );
                let mut located = Vec::new();
                let mut event_index = 0;
                for (k, &(ticket_type_id, quantity)) in items.iter().enumerate() {
                    let (event, position) = self.locate(ticket_type_id).unwrap();
                    event_index = event;
                    self.pools[event][position].version += 1;
                    located.push((position, quantity));
                    assert_eq!(reserved.reservation.items[k].quantity, quantity);
                    assert_eq!(reserved.pools[k].ticket_type_id, ticket_type_id);
                    assert_eq!(
                        reserved.pools[k].version,
                        self.pools[event][position].version
                    );
                }
                self.issued.push(id);
                self.reservations.insert(
                    id,
                    ModelReservation {
                        user: self.users[user],
                        event: event_index,
                        items: located,
                        expires_at: reserved.reservation.expires_at,
                        life: Life::Pending,
                    },
                );
                for (k, &(ticket_type_id, _)) in items.iter().enumerate() {
                    let (event, position) = self.locate(ticket_type_id).unwrap();
                    assert_eq!(reserved.pools[k].available, self.available(event, position));
                }
            }
            (expected, outcome) => {
                assert_eq!(outcome.map(|r| r.reservation.total), expected, "{items:?}")
            }
        }
    }

    /// The error the inventory must give for a change of `id` asked by `user`, if any.
    fn refusal(&self, id: ReservationId, user: Option<UserId>) -> Option<ChangeError> {
        match self.reservations.get(&id) {
            Some(r) if r.life.holds_tickets() && user.is_none_or(|u| u == r.user) => match r.life {
                Life::Pending => None,
                // Its expiry is being committed: to its owner it has already expired.
                Life::Releasing(ReleaseKind::Expire) => Some(ChangeError::Expired),
                _ => Some(ChangeError::NotPending),
            },
            _ => Some(ChangeError::NotFound),
        }
    }

    fn begin_payment(&mut self, pick: usize, user: usize) {
        let id = self.pick(pick);
        let user = self.users[user];
        let expected = match self.refusal(id, Some(user)) {
            Some(error) => Err(error),
            None if self.now >= self.reservations[&id].expires_at => Err(ChangeError::Expired),
            None => Ok(()),
        };
        let outcome = self.inventory.begin_payment(id, user, self.now);
        assert_eq!(
            outcome.as_ref().map(|r| r.id).map_err(|e| *e),
            expected.map(|()| id)
        );
        if expected.is_ok() {
            self.reservations.get_mut(&id).unwrap().life = Life::Paying;
        }
    }

    fn complete_payment(&mut self, id: ReservationId) {
        let outcome = self.inventory.complete_payment(id);
        let life = self.reservations.get(&id).map(|r| r.life);
        if life == Some(Life::Paying) {
            let paid = outcome.expect("a payment in flight completes");
            assert_eq!(paid.status, Status::Paid);
            assert!(!self.released.contains(&id), "paid after being released");
            self.paid.insert(id);
            let r = self.reservations.get_mut(&id).unwrap();
            r.life = Life::Paid;
            let (event, items) = (r.event, r.items.clone());
            for (position, quantity) in items {
                self.pools[event][position].paid += quantity;
            }
        } else {
            assert_eq!(outcome, None, "{life:?}");
        }
    }

    fn abort_payment(&mut self, id: ReservationId) {
        let outcome = self.inventory.abort_payment(id);
        let r = self.reservations.get_mut(&id);
        match r {
            Some(r) if r.life == Life::Paying => {
                assert_eq!(outcome.map(|r| r.status), Some(Status::Pending));
                r.life = Life::Pending;
            }
            _ => assert_eq!(outcome, None),
        }
    }

    fn begin_release(&mut self, id: ReservationId, kind: ReleaseKind, user: Option<UserId>) {
        let expected = match self.refusal(id, user) {
            Some(error) => Err(error),
            None => {
                let due = self.now >= self.reservations[&id].expires_at;
                match kind {
                    ReleaseKind::Cancel if due => Err(ChangeError::Expired),
                    ReleaseKind::Expire if !due => Err(ChangeError::NotDue),
                    _ => Ok(()),
                }
            }
        };
        let outcome = self.inventory.begin_release(id, kind, user, self.now);
        assert_eq!(
            outcome.as_ref().map(|r| r.id).map_err(|e| *e),
            expected.map(|()| id)
        );
        if expected.is_ok() {
            self.reservations.get_mut(&id).unwrap().life = Life::Releasing(kind);
        }
    }

    fn complete_release(&mut self, id: ReservationId) {
        let outcome = self.inventory.complete_release(id);
        let life = self.reservations.get(&id).map(|r| r.life);
        if let Some(Life::Releasing(kind)) = life {
            let (released, pools) = outcome.expect("a release in flight completes");
            assert_eq!(released.status, kind.final_status());
            assert!(!self.paid.contains(&id), "released after being paid");
            assert!(self.released.insert(id), "released twice");
            let r = self.reservations.get_mut(&id).unwrap();
            r.life = Life::Released;
            let (event, items) = (r.event, r.items.clone());
            self.bump(event, &items, &pools);
        } else {
            assert_eq!(outcome, None, "{life:?}");
        }
    }

    fn abort_release(&mut self, id: ReservationId) {
        let outcome = self.inventory.abort_release(id);
        match self.reservations.get_mut(&id) {
            Some(r) if matches!(r.life, Life::Releasing(_)) => {
                assert_eq!(outcome.map(|r| r.id), Some(id));
                r.life = Life::Pending;
            }
            _ => assert_eq!(outcome, None),
        }
    }

    fn unreserve(&mut self, id: ReservationId) {
        let outcome = self.inventory.unreserve(id);
        match self.reservations.get_mut(&id) {
            Some(r) if r.life.holds_tickets() => {
                r.life = Life::Unreserved;
                let (event, items) = (r.event, r.items.clone());
                self.bump(
                    event,
                    &items,
                    &outcome.expect("an active reservation unreserves"),
                );
            }
            _ => assert_eq!(outcome, None),
        }
    }

    /// Tickets of `items` went back: one version step each, and `pools` must say so.
    fn bump(&mut self, event: usize, items: &[(usize, u32)], pools: &[PoolState]) {
        assert_eq!(pools.len(), items.len());
        for (&(position, _), state) in items.iter().zip(pools) {
            self.pools[event][position].version += 1;
            let pool = &self.pools[event][position];
            assert_eq!(state.ticket_type_id, pool.id);
            assert_eq!(state.version, pool.version);
        }
        for (&(position, _), state) in items.iter().zip(pools) {
            assert_eq!(state.available, self.available(event, position));
        }
    }

    fn sweep(&mut self) {
        let mut expected: Vec<(Timestamp, ReservationId)> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.life == Life::Pending && r.expires_at <= self.now)
            .map(|(&id, r)| (r.expires_at, id))
            .collect();
        expected.sort();
        let expected: Vec<ReservationId> = expected.into_iter().map(|(_, id)| id).collect();
        let overdue = self.inventory.overdue(self.now);
        assert_eq!(overdue, expected);
        for id in overdue {
            self.begin_release(id, ReleaseKind::Expire, None);
            self.complete_release(id);
        }
    }

    /// The invariants that hold after every step.
    fn check(&self, last_versions: &mut HashMap<TicketTypeId, u64>) {
        for (event, &event_id) in self.events.iter().enumerate() {
            let pools = self.inventory.pools(event_id).unwrap();
            for (position, state) in pools.iter().enumerate() {
                let model = &self.pools[event][position];
                assert_eq!(state.ticket_type_id, model.id);
                assert!(state.available <= model.capacity);
                assert_eq!(
                    state.available,
                    model.capacity - self.held(event, position) - model.paid,
                    "available = capacity − held − paid"
                );
                assert_eq!(state.version, model.version);
                let last = last_versions.insert(state.ticket_type_id, state.version);
                assert!(last.unwrap_or(0) <= state.version, "version went back");
            }
        }
        for (id, r) in &self.reservations {
            assert_eq!(self.inventory.active(*id).is_some(), r.life.holds_tickets());
        }
        assert!(self.paid.is_disjoint(&self.released));
    }
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    prop_oneof![
        2 => Just(Rule::Any),
        1 => (2u32..5).prop_map(|of| Rule::multiple(of).unwrap()),
        1 => Just(Rule::Altogether),
        1 => Just(Rule::AvoidOne),
    ]
}

fn shapes_strategy() -> impl Strategy<Value = Vec<Vec<(u32, Rule, i64)>>> {
    let ticket_type = (1u32..50, rule_strategy(), 0i64..10_000);
    prop::collection::vec(prop::collection::vec(ticket_type, 1..=4), 1..=3)
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let pick = any::<usize>();
    // Event selectors 0..=2 name an event (modulo the count), 3 an unknown ticket type.
    let item = (
        prop_oneof![6 => 0usize..3, 1 => Just(usize::MAX)],
        0usize..4,
        prop_oneof![1 => Just(0u32), 6 => 1u32..8, 2 => 0u32..60],
    );
    prop_oneof![
        6 => (0usize..2, prop::collection::vec(item, 0..=3))
            .prop_map(|(user, items)| Op::Reserve { user, items }),
        2 => (pick, 0usize..2).prop_map(|(pick, user)| Op::BeginPayment { pick, user }),
        1 => pick.prop_map(|pick| Op::CompletePayment { pick }),
        1 => pick.prop_map(|pick| Op::AbortPayment { pick }),
        2 => (pick, any::<bool>()).prop_map(|(pick, succeeds)| Op::Pay { pick, succeeds }),
        2 => (pick, 0usize..2).prop_map(|(pick, user)| Op::BeginCancel { pick, user }),
        1 => pick.prop_map(|pick| Op::BeginExpire { pick }),
        2 => pick.prop_map(|pick| Op::CompleteRelease { pick }),
        1 => pick.prop_map(|pick| Op::AbortRelease { pick }),
        1 => pick.prop_map(|pick| Op::Unreserve { pick }),
        // Mostly steps of a quarter TTL, so reservations often fall due exactly at `now`.
        2 => prop_oneof![6 => (0i64..4).prop_map(|k| k * 250), 1 => 0i64..800]
            .prop_map(|millis| Op::Advance { millis }),
        2 => Just(Op::Sweep),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_never_oversell_and_never_both_pay_and_release(
        shapes in shapes_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..100),
    ) {
        let mut model = Model::new(&shapes);
        // Map event selectors onto the events that exist.
        let events = shapes.len();
        let mut versions = HashMap::new();
        for op in &ops {
            let op = match op {
                Op::Reserve { user, items } => Op::Reserve {
                    user: *user,
                    items: items
                        .iter()
                        .map(|&(event, kind, quantity)| {
                            (if event == usize::MAX { usize::MAX } else { event % events }, kind, quantity)
                        })
                        .collect(),
                },
                other => other.clone(),
            };
            model.apply(&op);
            model.check(&mut versions);
        }
    }
}

// Tenure (cluster mode): owned events sell, mirrors only follow their owner's reports.

/// A mirror of a one-type event of `capacity` at `version`.
fn mirror_with(capacity: u32, version: u64) -> (Inventory, Event) {
    let inventory = Inventory::new();
    let event = event_starting(at(0), &[(capacity, Rule::Any, 10)]);
    assert!(inventory.insert_mirror(event.clone(), &[capacity], version));
    (inventory, event)
}

#[test]
fn a_mirror_refuses_to_sell_and_has_no_epoch() {
    let (inventory, event) = mirror_with(10, 0);
    let tt = ids(&event)[0];
    assert_eq!(inventory.holding(event.id), Some(Holding::Mirror));
    assert_eq!(inventory.epoch(event.id), None);
    assert_eq!(
        inventory.reserve(request(UserId::new(), &[(tt, 1)], at(0))),
        Err(ReserveError::NotOwned { event_id: event.id })
    );
    assert_eq!(inventory.pools(event.id).unwrap(), vec![pool(tt, 10, 0)]);
}

#[test]
fn an_event_inserted_at_an_epoch_is_owned_in_it() {
    let inventory = Inventory::new();
    let event = event_starting(at(0), &[(10, Rule::Any, 10)]);
    assert!(inventory.insert_event_at(event.clone(), &[10], first_version(3)));
    assert_eq!(
        inventory.holding(event.id),
        Some(Holding::Owned { epoch: 3 })
    );
    assert_eq!(inventory.epoch(event.id), Some(3));
}

#[test]
fn a_mirror_applies_only_newer_versions_of_its_owners_reports() {
    let (inventory, event) = mirror_with(10, first_version(1));
    let tt = ids(&event)[0];
    let v = first_version(1);
    assert_eq!(
        inventory.mirror_pools(event.id, &[pool(tt, 7, v + 3)]),
        vec![pool(tt, 7, v + 3)]
    );
    // Older and equal versions arrive late (pub/sub, coalescing): ignored.
    assert!(inventory
        .mirror_pools(event.id, &[pool(tt, 9, v + 1)])
        .is_empty());
    assert!(inventory
        .mirror_pools(event.id, &[pool(tt, 9, v + 3)])
        .is_empty());
    // A report never shows more than the capacity, and unknown ticket types are skipped.
    assert_eq!(
        inventory.mirror_pools(
            event.id,
            &[pool(tt, 99, v + 4), pool(TicketTypeId::new(), 1, v + 9)]
        ),
        vec![pool(tt, 10, v + 4)]
    );
    assert_eq!(
        inventory.pools(event.id).unwrap(),
        vec![pool(tt, 10, v + 4)]
    );
}

#[test]
fn an_owned_event_ignores_reports_of_other_servers() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 10)]);
    let tt = ids(&event)[0];
    assert!(inventory
        .mirror_pools(event.id, &[pool(tt, 1, 100)])
        .is_empty());
    assert_eq!(inventory.pools(event.id).unwrap(), vec![pool(tt, 10, 0)]);
}

#[test]
fn taking_over_rebuilds_the_book_with_versions_from_the_new_epoch() {
    let (inventory, event) = mirror_with(10, first_version(1) + 5);
    let tt = ids(&event)[0];
    let rebuilt = inventory.take_over(event.id, &[6], 2, Vec::new()).unwrap();
    assert_eq!(rebuilt, Rebuilt::default());
    assert_eq!(inventory.epoch(event.id), Some(2));
    assert_eq!(
        inventory.pools(event.id).unwrap(),
        vec![pool(tt, 6, first_version(2))]
    );
    // It sells now, from the rebuilt availability.
    let taken = reserve(&inventory, UserId::new(), &[(tt, 6)]);
    assert_eq!(taken.items[0].quantity, 6);
    assert_eq!(
        inventory.pools(event.id).unwrap(),
        vec![pool(tt, 0, first_version(2) + 1)]
    );
}

#[test]
fn giving_an_event_up_forgets_its_active_reservations_and_stops_selling() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 10)]);
    let tt = ids(&event)[0];
    let held = reserve(&inventory, UserId::new(), &[(tt, 4)]);
    assert_eq!(inventory.mirror_event(event.id), Some(vec![held.id]));
    assert_eq!(inventory.active(held.id), None);
    assert!(inventory.overdue(at(i64::MAX / 2)).is_empty());
    assert!(matches!(
        inventory.reserve(request(UserId::new(), &[(tt, 1)], at(0))),
        Err(ReserveError::NotOwned { .. })
    ));
    // Taken over again later: what was active before is not resurrected.
    assert_eq!(
        inventory.take_over(event.id, &[6], 7, Vec::new()),
        Some(Rebuilt::default())
    );
    assert_eq!(inventory.active(held.id), None);
}

#[test]
fn versions_never_go_back_across_mirroring_and_takeovers() {
    let (inventory, event) = mirror_with(10, first_version(1));
    let tt = ids(&event)[0];
    let mut seen = vec![inventory.pools(event.id).unwrap()[0].version];
    inventory.mirror_pools(event.id, &[pool(tt, 9, first_version(1) + 1)]);
    seen.push(inventory.pools(event.id).unwrap()[0].version);
    inventory.take_over(event.id, &[9], 2, Vec::new());
    seen.push(inventory.pools(event.id).unwrap()[0].version);
    reserve(&inventory, UserId::new(), &[(tt, 1)]);
    seen.push(inventory.pools(event.id).unwrap()[0].version);
    inventory.mirror_event(event.id);
    inventory.mirror_pools(event.id, &[pool(tt, 5, first_version(3) + 2)]);
    seen.push(inventory.pools(event.id).unwrap()[0].version);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
}

#[test]
fn taking_over_swaps_the_pending_reservations_in_at_once() {
    let (inventory, event) = inventory_with(&[(10, Rule::Any, 10)]);
    let tt = ids(&event)[0];
    let kept = reserve(&inventory, UserId::new(), &[(tt, 2)]);
    let dropped = reserve(&inventory, UserId::new(), &[(tt, 3)]);
    let stranger = Reservation {
        id: ReservationId::new(),
        event_id: EventId::new(),
        ..kept.clone()
    };
    let rebuilt = inventory
        .take_over(event.id, &[8], 2, vec![kept.clone(), stranger.clone()])
        .unwrap();
    assert_eq!(rebuilt.restored, vec![(kept.id, kept.expires_at)]);
    assert_eq!(rebuilt.refused, vec![stranger.id]);
    assert_eq!(rebuilt.forgotten, vec![dropped.id]);
    assert_eq!(inventory.active(kept.id).map(|r| r.id), Some(kept.id));
    assert_eq!(inventory.active(dropped.id), None);
    assert_eq!(inventory.epoch(event.id), Some(2));
    assert_eq!(inventory.pools(event.id).unwrap()[0].available, 8);
}
