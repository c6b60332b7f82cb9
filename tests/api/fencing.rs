//! The fencing epoch (cluster mode, PROTOCOL §10): once a server has taken an event over,
//! a batch committed behind the previous epoch is refused by the database itself, before
//! any of its changes, and a batch behind the current epoch goes through.

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
