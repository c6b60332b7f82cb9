//! What a server reads and writes to take one event over in cluster mode (PROTOCOL §10):
//! the epoch bump that fences the previous owner off, and the event's held tickets and
//! pending reservations to rebuild it from. Also the JWT secret cluster servers share.

use std::collections::HashMap;

use sqlx::Row;

use super::reservations::{held_per_type, SELECT_RESERVATIONS};
use super::{id_column, Backend, Store, StoreError};
use crate::core::reservation::Reservation;
use crate::core::{EventId, TicketTypeId};

/// How long a takeover waits for the previous owner's batches in flight.
const TAKEOVER_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

fn epoch_of(row: &sqlx::any::AnyRow) -> Result<u64, StoreError> {
    let epoch: i64 = row.try_get("epoch")?;
    u64::try_from(epoch).map_err(|_| StoreError::corrupt("events", format!("epoch {epoch}")))
}

impl Store {
    /// Bumps one event's epoch and returns the new one. The row lock of the `UPDATE` waits
    /// for every batch of the previous owner in flight (they hold the row `FOR SHARE`), and
    /// every later batch of it sees the new epoch and is refused.
    ///
    /// It waits at most 2 s for them ([`TAKEOVER_LOCK_TIMEOUT`]) (a failure is tried again at the
    /// next claim round), so one stalled batch never stalls a server's claims for long.
    pub async fn take_over_event(&self, id: EventId) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query(TAKEOVER_LOCK_TIMEOUT).execute(&mut *tx).await?;
        }
        let row = sqlx::query("UPDATE events SET epoch = epoch + 1 WHERE id = $1 RETURNING epoch")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::corrupt("events", format!("no event {id}")))?;
        tx.commit().await?;
        epoch_of(&row)
    }

    /// Every event's current epoch.
    pub async fn event_epochs(&self) -> Result<HashMap<EventId, u64>, StoreError> {
        let rows = sqlx::query("SELECT id, epoch FROM events")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|row| Ok((id_column(row, "events", "id")?, epoch_of(row)?)))
            .collect()
    }

    /// Tickets held per ticket type of one event by its pending and paid reservations.
    pub async fn held_of_event(
        &self,
        id: EventId,
    ) -> Result<HashMap<TicketTypeId, u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.ticket_type_id AS ticket_type_id, CAST(SUM(i.quantity) AS BIGINT) AS held \
             FROM reservation_items i JOIN reservations r ON r.id = i.reservation_id \
             WHERE r.event_id = $1 AND r.status IN ('pending', 'paid') GROUP BY i.ticket_type_id",
        )
        .bind(id.to_string())
        .fetch_all(self.pool())
        .await?;
        held_per_type(&rows)
    }

    /// One event's pending reservations, oldest first.
    pub async fn pending_of_event(&self, id: EventId) -> Result<Vec<Reservation>, StoreError> {
        let rows = sqlx::query(&format!(
            "{SELECT_RESERVATIONS} WHERE event_id = $1 AND status = 'pending' ORDER BY created_at"
        ))
        .bind(id.to_string())
        .fetch_all(self.pool())
        .await?;
        self.with_items(rows).await
    }

    /// The JWT secret of the servers sharing this database: `candidate` if none is stored
    /// yet (it is stored then), else the stored one. PostgreSQL only (cluster mode).
    pub async fn shared_jwt_secret(&self, candidate: &str) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO cluster_settings (name, value) VALUES ('jwt_secret', $1) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(candidate)
        .execute(self.pool())
        .await?;
        Ok(
            sqlx::query("SELECT value FROM cluster_settings WHERE name = 'jwt_secret'")
                .fetch_one(self.pool())
                .await?
                .try_get("value")?,
        )
    }
}
