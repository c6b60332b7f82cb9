//! When the database cannot commit, a call fails with `UNAVAILABLE` and nothing is taken
//! (PROTOCOL §5, Durability); a full write queue refuses at once.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use ticket_api::core::reservation::Status;
use ticket_api::core::{ReservationId, Timestamp};
use ticket_api::metrics::Metrics;
use ticket_api::store::writer::{WriteError, Writer, QUEUE_CAPACITY};
use ticket_api::store::{Change, Store};
use tokio_util::sync::CancellationToken;

use crate::backend_tests;
use crate::harness::reason;

backend_tests! {
    async fn a_reserve_that_cannot_commit_is_unavailable_and_takes_nothing(app) {
        let admin = app.quick_admin().await;
        let (event_id, types) = app.create_pools(&admin, &[(10, json!({"kind": "any"}))]).await;
        let (_, token) = app.quick_customer().await;
        let mut ws = app.ws_as(&token).await;
        let kept = ws.ok("tickets.reserve", json!({"items": [{"ticket_type_id": types[0], "quantity": 2}]})).await;
        assert_eq!(app.pool(&event_id, 0).await.0, 8);

        // The database goes away.
        app.app.close_storage().await;
        let refused = ws.call("tickets.reserve", json!({"items": [{"ticket_type_id": types[0], "quantity": 3}]})).await;
        assert_eq!(reason(&refused), "UNAVAILABLE");
        assert_eq!(refused["error"]["code"], 4002);
        let cancel = ws.call("reservations.cancel", json!({"reservation_id": kept["id"]})).await;
        assert_eq!(reason(&cancel), "UNAVAILABLE");
        let pay = ws.call("payments.create", json!({"reservation_id": kept["id"], "payment_token": "tok_ok"})).await;
        assert_eq!(reason(&pay), "UNAVAILABLE");

        // Nothing changed in memory: the refused reserve gave its tickets back, the
        // reservation is still pending and still holds its two tickets.
        let (available, _) = app.pool(&event_id, 0).await;
        assert_eq!(available, 8);
        let active = app.app.inventory.active(kept["id"].as_str().unwrap().parse().unwrap()).expect("still active");
        assert_eq!(active.status, Status::Pending);
    }
}

/// A writer whose commit cannot finish (another transaction holds a lock on the table it
/// writes) lets its queue fill, and the next change is refused at once instead of waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_refuses_at_once() {
    let Some((name, url)) = crate::harness::fresh_postgres_database().await else {
        return;
    };
    let outcome = AssertUnwindSafe(queue_fills_and_refuses(url))
        .catch_unwind()
        .await;
    crate::harness::remove_postgres_database(&name).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn queue_fills_and_refuses(url: String) {
    let url = ticket_api::config::DatabaseUrl::Postgres(url);
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    // PostgreSQL waits for a lock without a timeout, so the writer's first commit blocks
    // for exactly as long as the test holds it.
    let mut locker = sqlx::PgConnection::connect(url.as_str()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE reservations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let storage = ticket_api::store::batches::connect(&url, 4).await.unwrap();
    let (writer, task) = Writer::start(storage, Arc::new(Metrics::new()), stop.clone());
    let writer = Arc::new(writer);
    let release = |id| Change::Release {
        id,
        status: Status::Expired,
        at: Timestamp::from_millis(0),
    };
    let mut waiting = Vec::new();
    for _ in 0..=QUEUE_CAPACITY {
        let writer = Arc::clone(&writer);
        let change = release(ReservationId::new());
        waiting.push(tokio::spawn(async move {
            writer.commit(change, None, None).await
        }));
    }
    // Once the spawned commits are queued behind the blocked one, the next is refused.
    crate::harness::poll_until(Duration::from_secs(60), "a full queue", || {
        let writer = Arc::clone(&writer);
        async move {
            match tokio::time::timeout(
                Duration::from_millis(50),
                writer.commit(release(ReservationId::new()), None, None),
            )
            .await
            {
                Ok(Err(WriteError::QueueFull)) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
    for commit in waiting {
        // Each was answered (these releases name no reservation, so they fail).
        let _ = commit.await.unwrap();
    }
    stop.cancel();
    task.await.unwrap();
    store.close().await;
}
