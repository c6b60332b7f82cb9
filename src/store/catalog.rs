//! Events and ticket types.

use std::collections::HashMap;

use sqlx::Row;

use super::{id_column, to_i64, to_u32, unique_as, Store, StoreError};
use crate::core::{Currency, Event, EventId, Money, Rule, TicketType, Timestamp};

impl Store {
    /// Inserts an event with its ticket types in one transaction.
    pub async fn insert_event(&self, event: &Event, now: Timestamp) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("INSERT INTO events (id, name, starts_at, venue, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(event.id.to_string())
            .bind(&event.name)
            .bind(event.starts_at.as_millis())
            .bind(event.venue.clone())
            .bind(now.as_millis())
            .execute(&mut *tx)
            .await?;
        for (position, tt) in event.ticket_types.iter().enumerate() {
            let rule_of = match tt.rule {
                Rule::Multiple { of } => Some(i64::from(of.get())),
                _ => None,
            };
            sqlx::query(
                "INSERT INTO ticket_types (id, event_id, position, name, price_amount, currency, capacity, rule_kind, rule_of) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(tt.id.to_string())
            .bind(event.id.to_string())
            .bind(position as i64)
            .bind(&tt.name)
            .bind(tt.price.amount)
            .bind(tt.price.currency.code())
            .bind(to_i64(tt.capacity))
            .bind(tt.rule.kind())
            .bind(rule_of)
            .execute(&mut *tx)
            .await
            .map_err(unique_as("ticket type name"))?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Bumps the epoch of every event (this server takes them all over) and returns the
    /// new epochs, from which pool versions start (see `protocol/README.md`).
    pub async fn take_over_events(&self) -> Result<HashMap<EventId, u64>, StoreError> {
        let rows = sqlx::query("UPDATE events SET epoch = epoch + 1 RETURNING id, epoch")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|row| {
                let epoch: i64 = row.try_get("epoch")?;
                let epoch = u64::try_from(epoch)
                    .map_err(|_| StoreError::corrupt("events", format!("epoch {epoch}")))?;
                Ok((id_column(row, "events", "id")?, epoch))
            })
            .collect()
    }

    pub async fn event_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM events")
            .fetch_one(self.pool())
            .await?
            .try_get("n")?)
    }

    /// Every event with its ticket types in their order, ordered by start time.
    pub async fn load_events(&self) -> Result<Vec<Event>, StoreError> {
        let rows =
            sqlx::query("SELECT id, name, starts_at, venue FROM events ORDER BY starts_at, id")
                .fetch_all(self.pool())
                .await?;
        let mut events = Vec::with_capacity(rows.len());
        let mut index = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: EventId = id_column(&row, "events", "id")?;
            index.insert(id, events.len());
            events.push(Event {
                id,
                name: row.try_get("name")?,
                starts_at: Timestamp::from_millis(row.try_get("starts_at")?),
                venue: row.try_get("venue")?,
                ticket_types: Vec::new(),
            });
        }
        let rows = sqlx::query(
            "SELECT id, event_id, name, price_amount, currency, capacity, rule_kind, rule_of \
             FROM ticket_types ORDER BY event_id, position",
        )
        .fetch_all(self.pool())
        .await?;
        for row in rows {
            let event_id: EventId = id_column(&row, "ticket_types", "event_id")?;
            let Some(&at) = index.get(&event_id) else {
                return Err(StoreError::corrupt(
                    "ticket_types",
                    "ticket type of an unknown event",
                ));
            };
            events[at].ticket_types.push(TicketType {
                id: id_column(&row, "ticket_types", "id")?,
                event_id,
                name: row.try_get("name")?,
                price: Money::new(
                    row.try_get("price_amount")?,
                    Currency::parse(&row.try_get::<String, _>("currency")?)
                        .ok_or_else(|| StoreError::corrupt("ticket_types", "unknown currency"))?,
                ),
                capacity: to_u32("ticket_types", row.try_get("capacity")?)?,
                rule: rule_from_row(
                    &row.try_get::<String, _>("rule_kind")?,
                    row.try_get("rule_of")?,
                )?,
            });
        }
        Ok(events)
    }
}

fn rule_from_row(kind: &str, of: Option<i64>) -> Result<Rule, StoreError> {
    let rule = match (kind, of) {
        ("any", _) => Some(Rule::Any),
        ("altogether", _) => Some(Rule::Altogether),
        ("avoid_one", _) => Some(Rule::AvoidOne),
        ("multiple", Some(of)) => u32::try_from(of).ok().and_then(Rule::multiple),
        _ => None,
    };
    rule.ok_or_else(|| StoreError::corrupt("ticket_types", format!("bad rule {kind}")))
}
