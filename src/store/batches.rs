//! The writer's storage ([`BatchStorage`]) on the native sqlx drivers, one per database:
//! the group commit is the hot path of every durable change, and each database has its
//! own fastest shape for it.
//!
//! - PostgreSQL: one statement per kind of change per batch whatever its size (the marker,
//!   the reservations and their items together; the status changes; the payments; the
//!   idempotency keys), the rows passed as arrays and expanded with `UNNEST`, so the SQL
//!   text is constant and sqlx's per-connection prepared-statement cache parses and plans
//!   it once. A batch of reserves is three round trips: BEGIN, one statement, COMMIT.
//! - SQLite: one prepared single-row statement per row, executed inside the one
//!   transaction; SQLite has no round trips, and a reused statement is its cheapest
//!   insert.
//!
//! Every batch inserts its commit marker inside its own transaction, so a COMMIT whose
//! answer was lost is settled later by looking the marker up.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use super::reservations::{Change, Fence, IdempotencyRecord, PaymentRecord, IDEMPOTENCY_TTL_MS};
use super::writer::{BatchStorage, Entry, PROBE_TIMEOUT};
use super::{to_i64, StoreError};
use crate::config::DatabaseUrl;
use crate::core::reservation::{Reservation, Status};
use crate::core::{ReservationId, Timestamp};

/// The writer's storage for `url`, with up to `connections` commits in flight (SQLite has
/// one writer at a time, so it gets one connection whatever is asked).
pub async fn connect(
    url: &DatabaseUrl,
    connections: u32,
) -> Result<Arc<dyn BatchStorage>, StoreError> {
    // A commit only waits for a connection when one must be made again: a short timeout
    // lets the writer tell a database that is down (it probes again anyway).
    Ok(match url {
        DatabaseUrl::Postgres(text) => {
            // A writer's transaction is never idle for more than a round trip; one that is
            // (its server paused or cut off mid-batch) would hold its events' epoch rows
            // `FOR SHARE` and stall a takeover until TCP gave up, hours later.
            let options = PgConnectOptions::from_str(text)?
                .options([("idle_in_transaction_session_timeout", "3s")]);
            let pool = PgPoolOptions::new()
                .max_connections(connections.max(1))
                .acquire_timeout(PROBE_TIMEOUT)
                .connect_with(options)
                .await?;
            Arc::new(PostgresBatches {
                pool,
                connections: connections.max(1) as usize,
            })
        }
        DatabaseUrl::Sqlite(text) => {
            // WAL lets readers run beside the one writer; FULL syncs each commit, which the
            // group commit amortises; the busy timeout covers the short writer lock.
            let options = SqliteConnectOptions::from_str(text)?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(PROBE_TIMEOUT)
                .connect_with(options)
                .await?;
            Arc::new(SqliteBatches { pool })
        }
    })
}

/// A batch sorted by table.
#[derive(Default)]
struct Gathered<'a> {
    reserves: Vec<&'a Reservation>,
    /// Pending reservations moving to a final status (released or paid), with the time.
    finals: Vec<(ReservationId, &'static str, Timestamp)>,
    payments: Vec<&'a PaymentRecord>,
    keys: Vec<&'a IdempotencyRecord>,
}

impl<'a> Gathered<'a> {
    fn from(changes: &[Entry<'a>]) -> Result<Self, StoreError> {
        let mut gathered = Self::default();
        for (change, key) in changes {
            match change {
                Change::Reserve(reservation) => gathered.reserves.push(reservation),
                Change::Release { id, status, at } => {
                    gathered.finals.push((*id, status.as_str(), *at));
                }
                Change::Pay(payment) => {
                    gathered.payments.push(payment);
                    let paid = (payment.reservation_id, Status::Paid.as_str(), payment.at);
                    gathered.finals.push(paid);
                }
            }
            gathered.keys.extend(key);
        }
        // Two records of one key in one statement would be a database error rather than
        // a refused row; the engine's key lock never lets it happen, and if it did, this
        // refusal sends the batch one by one like any other refused row.
        let mut seen = HashSet::with_capacity(gathered.keys.len());
        if !gathered
            .keys
            .iter()
            .all(|k| seen.insert((k.user_id, k.method, k.key.as_str())))
        {
            return Err(StoreError::corrupt(
                "idempotency_keys",
                "one key twice in a batch",
            ));
        }
        Ok(gathered)
    }
}

fn not_pending(status: &str) -> StoreError {
    StoreError::corrupt(
        "reservations",
        format!("{status}: a reservation was not pending"),
    )
}

fn key_in_use() -> StoreError {
    // A fresh key of the same name means two calls raced past the key's lock: fail this
    // change (and its transaction) rather than commit it without its key.
    StoreError::corrupt("idempotency_keys", "the key is in use")
}

/// The wall clock in milliseconds, for the age of commit markers.
fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn marker_cutoff(age: Duration) -> i64 {
    now_millis().saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
}

const INSERT_MARKER: &str = "INSERT INTO commit_markers (batch_id, created_at) VALUES ($1, $2)";
const SELECT_MARKER: &str = "SELECT 1 FROM commit_markers WHERE batch_id = $1";
const DELETE_MARKERS: &str = "DELETE FROM commit_markers WHERE created_at < $1";

/// Reads the epochs of the batch's events and holds them (`FOR SHARE`) until COMMIT: a
/// takeover's `UPDATE events SET epoch = …` waits for this batch, and a batch that starts
/// after it reads the new epoch. So a batch commits entirely before a takeover or not at all.
const PG_LOCK_EPOCHS: &str = "SELECT id, epoch FROM events WHERE id = ANY($1::text[]) FOR SHARE";

/// Every fence's event must be at the fence's epoch in `rows` (`(id, epoch)` as stored).
fn check_fences(fences: &[Fence], rows: Vec<(String, i64)>) -> Result<(), StoreError> {
    let stored: HashMap<String, i64> = rows.into_iter().collect();
    for fence in fences {
        let epoch = stored.get(&fence.event_id.to_string()).copied();
        if epoch.and_then(|e| u64::try_from(e).ok()) != Some(fence.epoch) {
            tracing::warn!(event = %fence.event_id, ours = fence.epoch, stored = ?epoch, "batch fenced off: another server took the event over");
            return Err(StoreError::Fenced(fence.event_id));
        }
    }
    Ok(())
}

/// PostgreSQL: arrays and `UNNEST`, one constant statement per table.
struct PostgresBatches {
    pool: PgPool,
    connections: usize,
}

/// The marker, the reservations and their items in one statement (one round trip); the
/// items' foreign key is checked at the end of the statement, when the reservations are in.
const PG_INSERT_RESERVE_BATCH: &str = "WITH marker AS ( \
     INSERT INTO commit_markers (batch_id, created_at) VALUES ($1, $2)), \
     reserved AS (INSERT INTO reservations \
     (id, user_id, event_id, status, total_amount, currency, created_at, expires_at, updated_at) \
     SELECT id, user_id, event_id, status, total_amount, currency, created_at, expires_at, created_at \
     FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[], \
     $9::bigint[], $10::bigint[]) \
     AS r(id, user_id, event_id, status, total_amount, currency, created_at, expires_at)) \
     INSERT INTO reservation_items (reservation_id, ticket_type_id, position, quantity, unit_price) \
     SELECT * FROM UNNEST($11::text[], $12::text[], $13::bigint[], $14::bigint[], $15::bigint[])";
/// Only pending rows change, so a status is never overwritten (a paid reservation is
/// never released); the caller counts the rows changed.
const PG_FINAL_STATUS: &str = "UPDATE reservations SET status = u.status, updated_at = u.at \
     FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(id, status, at) \
     WHERE reservations.id = u.id AND reservations.status = 'pending'";
const PG_INSERT_PAYMENTS: &str = "INSERT INTO payments \
     (id, reservation_id, amount, currency, status, created_at) \
     SELECT id, reservation_id, amount, currency, 'succeeded', created_at \
     FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[]) \
     AS p(id, reservation_id, amount, currency, created_at)";
/// A key older than 24 hours ($7 ms) may be reused: the old row is replaced.
const PG_INSERT_KEYS: &str = "INSERT INTO idempotency_keys \
     (user_id, method, key, params_hash, response, created_at) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[]) \
     ON CONFLICT (user_id, method, key) DO UPDATE SET params_hash = excluded.params_hash, \
     response = excluded.response, created_at = excluded.created_at \
     WHERE idempotency_keys.created_at <= excluded.created_at - $7";

#[async_trait]
impl BatchStorage for PostgresBatches {
    async fn commit_batch(
        &self,
        changes: &[Entry<'_>],
        fences: &[Fence],
    ) -> Result<(), StoreError> {
        let gathered = Gathered::from(changes)?;
        let batch = uuid::Uuid::now_v7().to_string();
        let mut tx = self.pool.begin().await?;
        if !fences.is_empty() {
            let ids: Vec<String> = fences.iter().map(|f| f.event_id.to_string()).collect();
            let rows: Vec<(String, i64)> = sqlx::query_as(PG_LOCK_EPOCHS)
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
            check_fences(fences, rows)?;
        }
        let reserves = &gathered.reserves;
        if reserves.is_empty() {
            sqlx::query(INSERT_MARKER)
                .bind(&batch)
                .bind(now_millis())
                .execute(&mut *tx)
                .await?;
        } else {
            let text = |f: fn(&Reservation) -> String| reserves.iter().map(|r| f(r)).collect();
            let number = |f: fn(&Reservation) -> i64| -> Vec<i64> {
                reserves.iter().map(|r| f(r)).collect()
            };
            let ids: Vec<String> = text(|r| r.id.to_string());
            let users: Vec<String> = text(|r| r.user_id.to_string());
            let events: Vec<String> = text(|r| r.event_id.to_string());
            let statuses: Vec<&str> = reserves.iter().map(|r| r.status.as_str()).collect();
            let currencies: Vec<&str> = reserves.iter().map(|r| r.total.currency.code()).collect();
            let count = reserves.iter().map(|r| r.items.len()).sum();
            let mut item_reservations = Vec::with_capacity(count);
            let mut ticket_types = Vec::with_capacity(count);
            let mut positions = Vec::with_capacity(count);
            let mut quantities = Vec::with_capacity(count);
            let mut prices = Vec::with_capacity(count);
            for (reservation, id) in reserves.iter().zip(&ids) {
                for (position, item) in reservation.items.iter().enumerate() {
                    item_reservations.push(id.as_str());
                    ticket_types.push(item.ticket_type_id.to_string());
                    positions.push(position as i64);
                    quantities.push(to_i64(item.quantity));
                    prices.push(item.unit_price.amount);
                }
            }
            sqlx::query(PG_INSERT_RESERVE_BATCH)
                .bind(&batch)
                .bind(now_millis())
                .bind(&ids)
                .bind(&users)
                .bind(&events)
                .bind(&statuses)
                .bind(number(|r| r.total.amount))
                .bind(&currencies)
                .bind(number(|r| r.created_at.as_millis()))
                .bind(number(|r| r.expires_at.as_millis()))
                .bind(&item_reservations)
                .bind(&ticket_types)
                .bind(&positions)
                .bind(&quantities)
                .bind(&prices)
                .execute(&mut *tx)
                .await?;
        }
        if !gathered.finals.is_empty() {
            let finals = &gathered.finals;
            let ids: Vec<String> = finals.iter().map(|(id, _, _)| id.to_string()).collect();
            let statuses: Vec<&str> = finals.iter().map(|(_, status, _)| *status).collect();
            let at: Vec<i64> = finals.iter().map(|(_, _, at)| at.as_millis()).collect();
            let done = sqlx::query(PG_FINAL_STATUS)
                .bind(&ids)
                .bind(&statuses)
                .bind(&at)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != finals.len() as u64 {
                return Err(not_pending("release or payment"));
            }
        }
        let payments = &gathered.payments;
        if !payments.is_empty() {
            let ids: Vec<String> = payments.iter().map(|p| p.id.to_string()).collect();
            let reservations: Vec<String> = payments
                .iter()
                .map(|p| p.reservation_id.to_string())
                .collect();
            let amounts: Vec<i64> = payments.iter().map(|p| p.amount.amount).collect();
            let currencies: Vec<&str> = payments.iter().map(|p| p.amount.currency.code()).collect();
            let at: Vec<i64> = payments.iter().map(|p| p.at.as_millis()).collect();
            sqlx::query(PG_INSERT_PAYMENTS)
                .bind(&ids)
                .bind(&reservations)
                .bind(&amounts)
                .bind(&currencies)
                .bind(&at)
                .execute(&mut *tx)
                .await?;
        }
        let keys = &gathered.keys;
        if !keys.is_empty() {
            let users: Vec<String> = keys.iter().map(|k| k.user_id.to_string()).collect();
            let methods: Vec<&str> = keys.iter().map(|k| k.method).collect();
            let names: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
            let hashes: Vec<&str> = keys.iter().map(|k| k.params_hash.as_str()).collect();
            let responses: Vec<&str> = keys.iter().map(|k| k.response.as_str()).collect();
            let at: Vec<i64> = keys.iter().map(|k| k.at.as_millis()).collect();
            let done = sqlx::query(PG_INSERT_KEYS)
                .bind(&users)
                .bind(&methods)
                .bind(&names)
                .bind(&hashes)
                .bind(&responses)
                .bind(&at)
                .bind(IDEMPOTENCY_TTL_MS)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != keys.len() as u64 {
                return Err(key_in_use());
            }
        }
        // Even an error answer can come from a server that committed and then died, so
        // every failure here is settled by looking the marker up.
        tx.commit()
            .await
            .map_err(|cause| StoreError::OutcomeUnknown { batch, cause })
    }

    async fn batch_committed(&self, batch: &str) -> Result<bool, StoreError> {
        let row = sqlx::query(SELECT_MARKER)
            .bind(batch)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn forget_commit_markers(&self, age: Duration) -> Result<u64, StoreError> {
        let done = sqlx::query(DELETE_MARKERS)
            .bind(marker_cutoff(age))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    fn connections(&self) -> usize {
        self.connections
    }
}

/// SQLite: one prepared single-row statement per row, inside the batch's transaction.
struct SqliteBatches {
    pool: SqlitePool,
}

const SQLITE_INSERT_RESERVATION: &str = "INSERT INTO reservations \
     (id, user_id, event_id, status, total_amount, currency, created_at, expires_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7)";
const SQLITE_INSERT_ITEM: &str = "INSERT INTO reservation_items \
     (reservation_id, ticket_type_id, position, quantity, unit_price) VALUES ($1, $2, $3, $4, $5)";
const SQLITE_FINAL_STATUS: &str =
    "UPDATE reservations SET status = $1, updated_at = $2 WHERE id = $3 AND status = 'pending'";
const SQLITE_INSERT_PAYMENT: &str = "INSERT INTO payments \
     (id, reservation_id, amount, currency, status, created_at) \
     VALUES ($1, $2, $3, $4, 'succeeded', $5)";
const SQLITE_INSERT_KEY: &str = "INSERT INTO idempotency_keys \
     (user_id, method, key, params_hash, response, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (user_id, method, key) DO UPDATE SET params_hash = excluded.params_hash, \
     response = excluded.response, created_at = excluded.created_at \
     WHERE idempotency_keys.created_at <= $7";

#[async_trait]
impl BatchStorage for SqliteBatches {
    async fn commit_batch(
        &self,
        changes: &[Entry<'_>],
        fences: &[Fence],
    ) -> Result<(), StoreError> {
        let gathered = Gathered::from(changes)?;
        let batch = uuid::Uuid::now_v7().to_string();
        let mut tx = self.pool.begin().await?;
        // One writer at a time: the epochs read here cannot change before COMMIT.
        for fence in fences {
            let row: Option<(String, i64)> =
                sqlx::query_as("SELECT id, epoch FROM events WHERE id = $1")
                    .bind(fence.event_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
            check_fences(std::slice::from_ref(fence), row.into_iter().collect())?;
        }
        sqlx::query(INSERT_MARKER)
            .bind(&batch)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        for r in &gathered.reserves {
            let id = r.id.to_string();
            sqlx::query(SQLITE_INSERT_RESERVATION)
                .bind(&id)
                .bind(r.user_id.to_string())
                .bind(r.event_id.to_string())
                .bind(r.status.as_str())
                .bind(r.total.amount)
                .bind(r.total.currency.code())
                .bind(r.created_at.as_millis())
                .bind(r.expires_at.as_millis())
                .execute(&mut *tx)
                .await?;
            for (position, item) in r.items.iter().enumerate() {
                sqlx::query(SQLITE_INSERT_ITEM)
                    .bind(&id)
                    .bind(item.ticket_type_id.to_string())
                    .bind(position as i64)
                    .bind(to_i64(item.quantity))
                    .bind(item.unit_price.amount)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for (id, status, at) in &gathered.finals {
            let done = sqlx::query(SQLITE_FINAL_STATUS)
                .bind(*status)
                .bind(at.as_millis())
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(not_pending(status));
            }
        }
        for p in &gathered.payments {
            sqlx::query(SQLITE_INSERT_PAYMENT)
                .bind(p.id.to_string())
                .bind(p.reservation_id.to_string())
                .bind(p.amount.amount)
                .bind(p.amount.currency.code())
                .bind(p.at.as_millis())
                .execute(&mut *tx)
                .await?;
        }
        for key in &gathered.keys {
            let done = sqlx::query(SQLITE_INSERT_KEY)
                .bind(key.user_id.to_string())
                .bind(key.method)
                .bind(key.key.as_str())
                .bind(key.params_hash.as_str())
                .bind(key.response.as_str())
                .bind(key.at.as_millis())
                .bind(key.at.as_millis() - IDEMPOTENCY_TTL_MS)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(key_in_use());
            }
        }
        tx.commit()
            .await
            .map_err(|cause| StoreError::OutcomeUnknown { batch, cause })
    }

    async fn batch_committed(&self, batch: &str) -> Result<bool, StoreError> {
        let row = sqlx::query(SELECT_MARKER)
            .bind(batch)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn forget_commit_markers(&self, age: Duration) -> Result<u64, StoreError> {
        let done = sqlx::query(DELETE_MARKERS)
            .bind(marker_cutoff(age))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
