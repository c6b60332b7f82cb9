//! What keeps cluster mode (PROTOCOL §10) from counting anything twice, at the database:
//! - the fencing epoch: once a server has taken an event over, a batch committed behind the
//!   previous epoch is refused before any of its changes, and one behind the current epoch
//!   goes through;
//! - the settlement of a forwarded call whose answer never came, by claiming its key.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use sqlx::Connection;
use ticket_api::config::DatabaseUrl;
use ticket_api::core::reservation::Status;
use ticket_api::core::{EventId, ReservationId, Timestamp};
use ticket_api::store::{Change, Fence, Store, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_behind_an_old_epoch_is_refused_after_a_takeover() {
    let Some((name, url)) = crate::harness::fresh_postgres_database().await else {
        return;
    };
    let outcome = AssertUnwindSafe(old_epoch_refused(DatabaseUrl::Postgres(url)))
        .catch_unwind()
        .await;
    crate::harness::remove_postgres_database(&name).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn old_epoch_refused(url: DatabaseUrl) {
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let event = EventId::new();
    let mut admin = sqlx::PgConnection::connect(url.as_str()).await.unwrap();
    sqlx::query("INSERT INTO events (id, name, starts_at, created_at) VALUES ($1, 'Fenced', 0, 0)")
        .bind(event.to_string())
        .execute(&mut admin)
        .await
        .unwrap();
    let storage = ticket_api::store::batches::connect(&url, 1).await.unwrap();
    // A release of a reservation that is not there: refused by the database for that
    // reason, unless the fence refuses the batch first.
    let release = Change::Release {
        id: ReservationId::new(),
        status: Status::Cancelled,
        at: Timestamp::from_millis(1),
    };
    let commit = |epoch| {
        let storage = storage.clone();
        let release = release.clone();
        async move {
            storage
                .commit_batch(
                    &[(&release, None)],
                    &[Fence {
                        event_id: event,
                        epoch,
                    }],
                )
                .await
        }
    };

    let passed_the_fence = |result: Result<(), StoreError>| match result {
        Err(StoreError::Fenced(id)) => {
            assert_eq!(id, event);
            false
        }
        Err(StoreError::Corrupt { .. }) => true,
        other => panic!("unexpected: {other:?}"),
    };
    assert!(passed_the_fence(commit(0).await), "epoch 0 is current");
    assert_eq!(store.take_over_event(event).await.unwrap(), 1);
    assert!(
        !passed_the_fence(commit(0).await),
        "epoch 0 after the takeover"
    );
    assert!(passed_the_fence(commit(1).await), "epoch 1 is current");
    assert!(
        !passed_the_fence(commit(2).await),
        "an epoch from the future"
    );
    storage.close().await;
    store.close().await;
}

/// How a server settles a forwarded call whose answer never came (cluster mode): it marks
/// the forward's own idempotency key as used. Either the call had committed (the stored
/// result is there) or it can no longer commit: a late commit with the key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_idempotency_key_refuses_a_late_commit_and_reveals_an_early_one() {
    let Some((name, url)) = crate::harness::fresh_postgres_database().await else {
        return;
    };
    let outcome = AssertUnwindSafe(claimed_keys(DatabaseUrl::Postgres(url)))
        .catch_unwind()
        .await;
    crate::harness::remove_postgres_database(&name).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn claimed_keys(url: DatabaseUrl) {
    use ticket_api::core::reservation::{Reservation, ReservationItem};
    use ticket_api::core::{Currency, Money, TicketTypeId, UserId};
    use ticket_api::store::IdempotencyRecord;

    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let (user, event, tt) = (UserId::new(), EventId::new(), TicketTypeId::new());
    let mut admin = sqlx::PgConnection::connect(url.as_str()).await.unwrap();
    for (sql, id) in [
        ("INSERT INTO users (id, email, password_hash, role, created_at) VALUES ($1, 'k@example.com', 'x', 'customer', 0)", user.to_string()),
        ("INSERT INTO events (id, name, starts_at, created_at) VALUES ($1, 'Keys', 0, 0)", event.to_string()),
    ] {
        sqlx::query(sql).bind(id).execute(&mut admin).await.unwrap();
    }
    sqlx::query("INSERT INTO ticket_types (id, event_id, position, name, price_amount, currency, capacity, rule_kind) VALUES ($1, $2, 0, 'T', 100, 'EUR', 10, 'any')")
        .bind(tt.to_string())
        .bind(event.to_string())
        .execute(&mut admin)
        .await
        .unwrap();
    let price = Money::new(100, Currency::parse("EUR").unwrap());
    let reservation = || Reservation {
        id: ReservationId::new(),
        user_id: user,
        event_id: event,
        status: Status::Pending,
        items: vec![ReservationItem {
            ticket_type_id: tt,
            quantity: 1,
            unit_price: price,
        }],
        total: price,
        created_at: Timestamp::from_millis(1),
        expires_at: Timestamp::from_millis(60_000),
    };
    let now = Timestamp::from_millis(1);
    let record = |key: &str| IdempotencyRecord {
        user_id: user,
        method: "tickets.reserve",
        key: key.to_owned(),
        params_hash: "h".to_owned(),
        response: "{\"id\":\"r\"}".to_owned(),
        at: now,
    };
    let storage = ticket_api::store::batches::connect(&url, 1).await.unwrap();

    // Claimed first: the call's late commit is refused, and nothing of it is stored.
    let late = Change::Reserve(reservation());
    assert_eq!(
        store
            .claim_idempotency_key(user, "tickets.reserve", "fwd-late", now)
            .await
            .unwrap(),
        None
    );
    let refused = storage
        .commit_batch(&[(&late, Some(&record("fwd-late")))], &[])
        .await;
    assert!(
        matches!(refused, Err(StoreError::Corrupt { .. })),
        "{refused:?}"
    );
    let Change::Reserve(late) = late else {
        unreachable!()
    };
    assert_eq!(store.reservation(late.id).await.unwrap(), None);
    let again = store
        .claim_idempotency_key(user, "tickets.reserve", "fwd-late", now)
        .await
        .unwrap();
    assert_eq!(again.map(|s| s.response), Some(String::new()));

    // Committed first: the claim finds its stored result.
    let early = Change::Reserve(reservation());
    storage
        .commit_batch(&[(&early, Some(&record("fwd-early")))], &[])
        .await
        .unwrap();
    let found = store
        .claim_idempotency_key(user, "tickets.reserve", "fwd-early", now)
        .await
        .unwrap();
    assert_eq!(found.map(|s| s.response), Some("{\"id\":\"r\"}".to_owned()));
    storage.close().await;
    store.close().await;
}
