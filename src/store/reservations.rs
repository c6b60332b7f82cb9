//! Reservations, payments and idempotency keys: the recovery queries and the reads of
//! `reservations.get` / `reservations.list` (the writer's commits are in `batches`).

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{id_column, to_u32, Store, StoreError};
use crate::core::reservation::{Reservation, ReservationItem, Status};
use crate::core::{
    Currency, EventId, Money, PaymentId, ReservationId, TicketTypeId, Timestamp, UserId,
};

/// `(ticket_type_id, held)` rows as a map.
pub(super) fn held_per_type(rows: &[AnyRow]) -> Result<HashMap<TicketTypeId, u64>, StoreError> {
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

/// The event a change is about and the fencing epoch in which this server owns it (cluster
/// mode): the batch holding the change commits only if the event's epoch in the database is
/// still this one, so a server that lost the event to another can no longer commit to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    pub event_id: EventId,
    pub epoch: u64,
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

/// `$first, $first+1, …` for an `IN (…)` list of `count` parameters.
fn list_placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Tickets held per ticket type by pending and paid reservations, for recovery.
    pub async fn held_per_ticket_type(&self) -> Result<HashMap<TicketTypeId, u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.ticket_type_id AS ticket_type_id, CAST(SUM(i.quantity) AS BIGINT) AS held \
             FROM reservation_items i JOIN reservations r ON r.id = i.reservation_id \
             WHERE r.status IN ('pending', 'paid') GROUP BY i.ticket_type_id",
        )
        .fetch_all(self.pool())
        .await?;
        held_per_type(&rows)
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

    /// Marks a key as used, with an empty result, unless it is stored already: `None` if
    /// this call marked it (from now on a change committed with it is refused as
    /// `key_in_use`), else the stored record. How a server settles a forwarded call whose
    /// answer never came: either the call committed, or it never will.
    pub async fn claim_idempotency_key(
        &self,
        user: UserId,
        method: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<StoredIdempotency>, StoreError> {
        let done = sqlx::query(
            "INSERT INTO idempotency_keys (user_id, method, key, params_hash, response, created_at) \
             VALUES ($1, $2, $3, '', '', $4) ON CONFLICT (user_id, method, key) DO NOTHING",
        )
        .bind(user.to_string())
        .bind(method)
        .bind(key)
        .bind(now.as_millis())
        .execute(self.pool())
        .await?;
        if done.rows_affected() == 1 {
            return Ok(None);
        }
        self.idempotency(user, method, key, now).await
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
    pub(super) async fn with_items(
        &self,
        rows: Vec<AnyRow>,
    ) -> Result<Vec<Reservation>, StoreError> {
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

pub(super) const SELECT_RESERVATIONS: &str =
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_placeholders_number_every_parameter_once() {
        assert_eq!(list_placeholders(3, 2), "$3, $4");
    }
}
