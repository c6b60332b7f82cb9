//! Reservations, payments and idempotency keys: the group commit of the writer, the
//! recovery queries, and the reads of `reservations.get` / `reservations.list`.

use std::collections::HashMap;
use std::fmt::Write as _;

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{id_column, to_i64, to_u32, Store, StoreError};
use crate::core::reservation::{Reservation, ReservationItem, Status};
use crate::core::{Currency, Money, PaymentId, ReservationId, TicketTypeId, Timestamp, UserId};

/// One durable change of the reservation lifecycle.
#[derive(Debug, Clone)]
pub enum Change {
    /// A new pending reservation.
    Reserve(Reservation),
    /// A pending reservation released (status `cancelled` or `expired`).
    Release {
        id: ReservationId,
        status: Status,
        at: Timestamp,
    },
    /// A successful payment; the reservation becomes `paid`.
    Pay(PaymentRecord),
}

#[derive(Debug, Clone)]
pub struct PaymentRecord {
    pub id: PaymentId,
    pub reservation_id: ReservationId,
    pub amount: Money,
    pub at: Timestamp,
}

/// The first result of a call made with an idempotency key, stored in the same
/// transaction as the change it produced.
#[derive(Debug, Clone)]
pub struct IdempotencyRecord {
    pub user_id: UserId,
    pub method: &'static str,
    pub key: String,
    pub params_hash: String,
    pub response: String,
    pub at: Timestamp,
}

/// A stored idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredIdempotency {
    pub params_hash: String,
    pub response: String,
}

/// How long an idempotency key is kept.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 60 * 60 * 1000;

/// Rows per multi-row statement: well under the bind limits of both databases
/// (SQLite 32,766 parameters, PostgreSQL 65,535).
const ROWS_PER_STATEMENT: usize = 500;

/// `($1, $2, $3), ($4, $5, $6)` for `rows` rows of `columns` parameters.
fn values_placeholders(rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            let sep = if column == 0 { "" } else { ", " };
            let _ = write!(sql, "{sep}${}", row * columns + column + 1);
        }
        sql.push(')');
    }
    sql
}

/// `$first, $first+1, …` for an `IN (…)` list of `count` parameters.
fn list_placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Commits a batch of changes and their idempotency records in one transaction, with a
    /// marker naming the batch. A failure before COMMIT means nothing was committed; a
    /// failure of COMMIT itself is [`StoreError::OutcomeUnknown`].
    pub async fn commit_batch(
        &self,
        changes: &[(&Change, Option<&IdempotencyRecord>)],
    ) -> Result<(), StoreError> {
        let mut reserves = Vec::new();
        let mut releases: HashMap<&'static str, Vec<(ReservationId, Timestamp)>> = HashMap::new();
        let mut payments = Vec::new();
        for (change, _) in changes {
            match change {
                Change::Reserve(reservation) => reserves.push(reservation),
                Change::Release { id, status, at } => releases
                    .entry(status.as_str())
                    .or_default()
                    .push((*id, *at)),
                Change::Pay(payment) => payments.push(payment),
            }
        }
        let keys: Vec<&IdempotencyRecord> = changes.iter().filter_map(|(_, key)| *key).collect();
        let batch = uuid::Uuid::now_v7().to_string();
        let mut tx = self.pool().begin().await?;
        sqlx::query("INSERT INTO commit_markers (batch_id, created_at) VALUES ($1, $2)")
            .bind(batch.clone())
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        insert_reservations(&mut tx, &reserves).await?;
        for (status, released) in &releases {
            set_status(&mut tx, status, released).await?;
        }
        insert_payments(&mut tx, &payments).await?;
        insert_idempotency(&mut tx, &keys).await?;
        // Even an error answer can come from a server that committed and then died, so
        // every failure here is settled by looking the marker up.
        tx.commit()
            .await
            .map_err(|cause| StoreError::OutcomeUnknown { batch, cause })
    }

    /// Whether the batch of that id committed (its marker is there).
    pub async fn batch_committed(&self, batch: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 AS found FROM commit_markers WHERE batch_id = $1")
            .bind(batch.to_owned())
            .fetch_optional(self.pool())
            .await?;
        Ok(row.is_some())
    }

    /// Deletes the markers of batches committed before `age` ago; returns how many.
    pub async fn forget_commit_markers(&self, age: std::time::Duration) -> Result<u64, StoreError> {
        let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let done = sqlx::query("DELETE FROM commit_markers WHERE created_at < $1")
            .bind(now_millis().saturating_sub(age))
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// Tickets held per ticket type by pending and paid reservations, for recovery.
    pub async fn held_per_ticket_type(&self) -> Result<HashMap<TicketTypeId, u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.ticket_type_id AS ticket_type_id, CAST(SUM(i.quantity) AS BIGINT) AS held \
             FROM reservation_items i JOIN reservations r ON r.id = i.reservation_id \
             WHERE r.status IN ('pending', 'paid') GROUP BY i.ticket_type_id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let held: i64 = row.try_get("held")?;
                Ok((
                    id_column(row, "reservation_items", "ticket_type_id")?,
                    held.max(0) as u64,
                ))
            })
            .collect()
    }

    /// Every pending reservation, for recovery.
    pub async fn pending_reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        let rows = sqlx::query(&format!(
            "{SELECT_RESERVATIONS} WHERE status = 'pending' ORDER BY created_at"
        ))
        .fetch_all(self.pool())
        .await?;
        self.with_items(rows).await
    }

    /// One reservation, whoever owns it.
    pub async fn reservation(&self, id: ReservationId) -> Result<Option<Reservation>, StoreError> {
        let rows = sqlx::query(&format!("{SELECT_RESERVATIONS} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_all(self.pool())
            .await?;
        Ok(self.with_items(rows).await?.pop())
    }

    /// A user's reservations, newest first, at most `limit`.
    pub async fn reservations_of(
        &self,
        user: UserId,
        status: Option<Status>,
        limit: usize,
    ) -> Result<Vec<Reservation>, StoreError> {
        let limit = limit as i64;
        let rows = match status {
            None => {
                sqlx::query(&format!(
                    "{SELECT_RESERVATIONS} WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(user.to_string())
                .bind(limit)
                .fetch_all(self.pool())
                .await?
            }
            Some(status) => {
                sqlx::query(&format!(
                    "{SELECT_RESERVATIONS} WHERE user_id = $1 AND status = $2 ORDER BY created_at DESC, id DESC LIMIT $3"
                ))
                .bind(user.to_string())
                .bind(status.as_str())
                .bind(limit)
                .fetch_all(self.pool())
                .await?
            }
        };
        self.with_items(rows).await
    }

    /// The stored result of an idempotency key younger than 24 hours.
    pub async fn idempotency(
        &self,
        user: UserId,
        method: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<StoredIdempotency>, StoreError> {
        let row = sqlx::query(
            "SELECT params_hash, response FROM idempotency_keys \
             WHERE user_id = $1 AND method = $2 AND key = $3 AND created_at > $4",
        )
        .bind(user.to_string())
        .bind(method)
        .bind(key)
        .bind(now.as_millis() - IDEMPOTENCY_TTL_MS)
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            Ok(StoredIdempotency {
                params_hash: row.try_get("params_hash")?,
                response: row.try_get("response")?,
            })
        })
        .transpose()
    }

    /// Deletes idempotency keys older than 24 hours; returns how many.
    pub async fn delete_old_idempotency_keys(&self, now: Timestamp) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at <= $1")
            .bind(now.as_millis() - IDEMPOTENCY_TTL_MS)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// Attaches their items to reservation rows (one query for all of them).
    async fn with_items(&self, rows: Vec<AnyRow>) -> Result<Vec<Reservation>, StoreError> {
        let mut reservations = rows
            .iter()
            .map(reservation_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut position: HashMap<ReservationId, usize> = HashMap::new();
        for (i, r) in reservations.iter().enumerate() {
            position.insert(r.id, i);
        }
        for chunk in reservations
            .iter()
            .map(|r| r.id.to_string())
            .collect::<Vec<_>>()
            .chunks(ROWS_PER_STATEMENT)
        {
            let sql = format!(
                "SELECT reservation_id, ticket_type_id, quantity, unit_price FROM reservation_items \
                 WHERE reservation_id IN ({}) ORDER BY reservation_id, position",
                list_placeholders(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.clone());
            }
            for row in query.fetch_all(self.pool()).await? {
                let reservation_id: ReservationId =
                    id_column(&row, "reservation_items", "reservation_id")?;
                let Some(&at) = position.get(&reservation_id) else {
                    continue;
                };
                let currency = reservations[at].total.currency;
                reservations[at].items.push(ReservationItem {
                    ticket_type_id: id_column(&row, "reservation_items", "ticket_type_id")?,
                    quantity: to_u32("reservation_items", row.try_get("quantity")?)?,
                    unit_price: Money::new(row.try_get("unit_price")?, currency),
                });
            }
        }
        Ok(reservations)
    }
}

/// The wall clock in milliseconds, for the age of commit markers.
fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

const SELECT_RESERVATIONS: &str =
    "SELECT id, user_id, event_id, status, total_amount, currency, created_at, expires_at FROM reservations";

fn reservation_from_row(row: &AnyRow) -> Result<Reservation, StoreError> {
    let currency = Currency::parse(&row.try_get::<String, _>("currency")?)
        .ok_or_else(|| StoreError::corrupt("reservations", "unknown currency"))?;
    Ok(Reservation {
        id: id_column(row, "reservations", "id")?,
        user_id: id_column(row, "reservations", "user_id")?,
        event_id: id_column(row, "reservations", "event_id")?,
        status: row
            .try_get::<String, _>("status")?
            .parse()
            .map_err(|_| StoreError::corrupt("reservations", "unknown status"))?,
        items: Vec::new(),
        total: Money::new(row.try_get("total_amount")?, currency),
        created_at: Timestamp::from_millis(row.try_get("created_at")?),
        expires_at: Timestamp::from_millis(row.try_get("expires_at")?),
    })
}

async fn insert_reservations(
    tx: &mut Transaction<'_, Any>,
    reservations: &[&Reservation],
) -> Result<(), StoreError> {
    for chunk in reservations.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO reservations (id, user_id, event_id, status, total_amount, currency, created_at, expires_at, updated_at) VALUES {}",
            values_placeholders(chunk.len(), 9)
        );
        let mut query = sqlx::query(&sql);
        for r in chunk {
            query = query
                .bind(r.id.to_string())
                .bind(r.user_id.to_string())
                .bind(r.event_id.to_string())
                .bind(r.status.as_str())
                .bind(r.total.amount)
                .bind(r.total.currency.code())
                .bind(r.created_at.as_millis())
                .bind(r.expires_at.as_millis())
                .bind(r.created_at.as_millis());
        }
        query.execute(&mut **tx).await?;
    }
    let items: Vec<(ReservationId, usize, &ReservationItem)> = reservations
        .iter()
        .flat_map(|r| r.items.iter().enumerate().map(|(i, item)| (r.id, i, item)))
        .collect();
    for chunk in items.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO reservation_items (reservation_id, ticket_type_id, position, quantity, unit_price) VALUES {}",
            values_placeholders(chunk.len(), 5)
        );
        let mut query = sqlx::query(&sql);
        for (id, position, item) in chunk {
            query = query
                .bind(id.to_string())
                .bind(item.ticket_type_id.to_string())
                .bind(*position as i64)
                .bind(to_i64(item.quantity))
                .bind(item.unit_price.amount);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Moves pending reservations to a final status. Only pending rows change, so a status
/// can never be overwritten (a paid reservation is never released).
async fn set_status(
    tx: &mut Transaction<'_, Any>,
    status: &str,
    rows: &[(ReservationId, Timestamp)],
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let at = chunk
            .iter()
            .map(|(_, at)| at.as_millis())
            .max()
            .unwrap_or_default();
        let sql = format!(
            "UPDATE reservations SET status = $1, updated_at = $2 WHERE status = 'pending' AND id IN ({})",
            list_placeholders(3, chunk.len())
        );
        let mut query = sqlx::query(&sql).bind(status.to_owned()).bind(at);
        for (id, _) in chunk {
            query = query.bind(id.to_string());
        }
        let done = query.execute(&mut **tx).await?;
        if done.rows_affected() != chunk.len() as u64 {
            return Err(StoreError::corrupt(
                "reservations",
                format!("{status}: a reservation was not pending"),
            ));
        }
    }
    Ok(())
}

async fn insert_payments(
    tx: &mut Transaction<'_, Any>,
    payments: &[&PaymentRecord],
) -> Result<(), StoreError> {
    for chunk in payments.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO payments (id, reservation_id, amount, currency, status, created_at) VALUES {}",
            values_placeholders(chunk.len(), 6)
        );
        let mut query = sqlx::query(&sql);
        for p in chunk {
            query = query
                .bind(p.id.to_string())
                .bind(p.reservation_id.to_string())
                .bind(p.amount.amount)
                .bind(p.amount.currency.code())
                .bind("succeeded")
                .bind(p.at.as_millis());
        }
        query.execute(&mut **tx).await?;
    }
    let paid: Vec<(ReservationId, Timestamp)> =
        payments.iter().map(|p| (p.reservation_id, p.at)).collect();
    set_status(tx, Status::Paid.as_str(), &paid).await
}

async fn insert_idempotency(
    tx: &mut Transaction<'_, Any>,
    keys: &[&IdempotencyRecord],
) -> Result<(), StoreError> {
    for key in keys {
        // A key older than 24 hours may be reused: the old row is replaced.
        let done = sqlx::query(
            "INSERT INTO idempotency_keys (user_id, method, key, params_hash, response, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (user_id, method, key) DO UPDATE SET params_hash = excluded.params_hash, \
             response = excluded.response, created_at = excluded.created_at \
             WHERE idempotency_keys.created_at <= $7",
        )
        .bind(key.user_id.to_string())
        .bind(key.method)
        .bind(key.key.clone())
        .bind(key.params_hash.clone())
        .bind(key.response.clone())
        .bind(key.at.as_millis())
        .bind(key.at.as_millis() - IDEMPOTENCY_TTL_MS)
        .execute(&mut **tx)
        .await?;
        // A fresh key of the same name means two calls raced past the key's lock: fail this
        // change (and its transaction) rather than commit it without its key.
        if done.rows_affected() != 1 {
            return Err(StoreError::corrupt("idempotency_keys", "the key is in use"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_every_parameter_once() {
        assert_eq!(values_placeholders(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(list_placeholders(3, 2), "$3, $4");
    }
}
