//! Wire shapes (PROTOCOL §3–§6): the JSON of the domain values and of the server's
//! notifications, written down once. Both `rpc` (results) and `fanout` (notifications) use
//! them; this module knows only the core.

use serde::Serialize;
use serde_json::{json, Value};

use crate::core::inventory::PoolState;
use crate::core::reservation::Reservation;
use crate::core::{Event, Money, Rule, TicketType, Timestamp, User};

#[derive(Debug, Serialize)]
pub struct MoneyJson {
    pub amount: i64,
    pub currency: &'static str,
}

impl From<Money> for MoneyJson {
    fn from(money: Money) -> Self {
        Self {
            amount: money.amount,
            currency: money.currency.code(),
        }
    }
}

pub fn rule_json(rule: &Rule) -> Value {
    match rule {
        Rule::Multiple { of } => json!({"kind": "multiple", "of": of.get()}),
        other => json!({"kind": other.kind()}),
    }
}

#[derive(Debug, Serialize)]
pub struct UserJson {
    pub id: String,
    pub email: String,
    pub role: &'static str,
}

impl From<&User> for UserJson {
    fn from(user: &User) -> Self {
        Self {
            id: user.id.to_string(),
            email: user.email.clone(),
            role: user.role.as_str(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TicketTypeJson {
    pub id: String,
    pub event_id: String,
    pub name: String,
    pub price: MoneyJson,
    pub capacity: u32,
    pub available: u32,
    pub rule: Value,
    pub version: u64,
}

#[derive(Debug, Serialize)]
pub struct EventJson {
    pub id: String,
    pub name: String,
    pub starts_at: String,
    pub venue: Option<String>,
    pub ticket_types: Vec<TicketTypeJson>,
}

impl EventJson {
    /// An event with the live availability of each ticket type (`pools` in ticket type order).
    pub fn new(event: &Event, pools: &[PoolState]) -> Self {
        let ticket_types = event
            .ticket_types
            .iter()
            .zip(pools)
            .map(|(tt, pool): (&TicketType, &PoolState)| TicketTypeJson {
                id: tt.id.to_string(),
                event_id: tt.event_id.to_string(),
                name: tt.name.clone(),
                price: tt.price.into(),
                capacity: tt.capacity,
                available: pool.available,
                rule: rule_json(&tt.rule),
                version: pool.version,
            })
            .collect();
        Self {
            id: event.id.to_string(),
            name: event.name.clone(),
            starts_at: event.starts_at.to_rfc3339(),
            venue: event.venue.clone(),
            ticket_types,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PoolJson {
    pub ticket_type_id: String,
    pub available: u32,
    pub version: u64,
}

impl From<&PoolState> for PoolJson {
    fn from(pool: &PoolState) -> Self {
        Self {
            ticket_type_id: pool.ticket_type_id.to_string(),
            available: pool.available,
            version: pool.version,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ReservationItemJson {
    pub ticket_type_id: String,
    pub quantity: u32,
    pub unit_price: MoneyJson,
}

#[derive(Debug, Serialize)]
pub struct ReservationJson {
    pub id: String,
    pub event_id: String,
    pub status: &'static str,
    pub items: Vec<ReservationItemJson>,
    pub total: MoneyJson,
    pub created_at: String,
    pub expires_at: String,
}

impl From<&Reservation> for ReservationJson {
    fn from(r: &Reservation) -> Self {
        Self {
            id: r.id.to_string(),
            event_id: r.event_id.to_string(),
            status: r.status.as_str(),
            items: r
                .items
                .iter()
                .map(|item| ReservationItemJson {
                    ticket_type_id: item.ticket_type_id.to_string(),
                    quantity: item.quantity,
                    unit_price: item.unit_price.into(),
                })
                .collect(),
            total: r.total.into(),
            created_at: r.created_at.to_rfc3339(),
            expires_at: r.expires_at.to_rfc3339(),
        }
    }
}

pub fn time_json(at: Timestamp) -> String {
    at.to_rfc3339()
}

/// A server-to-client notification (`pool.update`, `reservation.updated`).
#[derive(Debug, Serialize)]
pub struct Notification<P: Serialize> {
    jsonrpc: &'static str,
    method: &'static str,
    params: P,
}

impl<P: Serialize> Notification<P> {
    pub fn new(method: &'static str, params: P) -> Self {
        Self {
            jsonrpc: "2.0",
            method,
            params,
        }
    }
}

#[derive(Serialize)]
struct ReservationUpdated {
    reservation: ReservationJson,
}

/// The text of a `reservation.updated` notification.
pub fn reservation_updated(reservation: &Reservation) -> String {
    let params = ReservationUpdated {
        reservation: ReservationJson::from(reservation),
    };
    serde_json::to_string(&Notification::new("reservation.updated", params)).expect("serializable")
}

/// The JSON of one pool, as a `pool.update` carries it.
pub fn pool_text(pool: &PoolState) -> String {
    serde_json::to_string(&PoolJson::from(pool)).expect("serializable")
}

/// The text of a `pool.update`, from pools already written out by [`pool_text`]: the
/// fan-out writes each changed pool once and only the subscription differs per subscriber.
/// The same text as serializing the notification would give.
pub fn pool_update_text<'a>(
    subscription: &str,
    event_id: &str,
    pools: impl IntoIterator<Item = &'a str>,
) -> String {
    let mut text = format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":\"pool.update\",\"params\":{{\"subscription\":{},\"event_id\":{},\"pools\":[",
        Value::from(subscription),
        Value::from(event_id)
    );
    for (i, pool) in pools.into_iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(pool);
    }
    text.push_str("]}}");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::TicketTypeId;

    #[derive(Serialize)]
    struct PoolUpdate {
        subscription: String,
        event_id: String,
        pools: Vec<PoolJson>,
    }

    #[test]
    fn a_pool_update_written_from_parts_is_the_serialized_notification() {
        let pools = [
            PoolState {
                ticket_type_id: TicketTypeId::new(),
                available: 3,
                version: 7,
            },
            PoolState {
                ticket_type_id: TicketTypeId::new(),
                available: 0,
                version: 1,
            },
        ];
        let texts: Vec<String> = pools.iter().map(pool_text).collect();
        let spliced = pool_update_text("sub-4", "ev", texts.iter().map(String::as_str));
        let serialized = serde_json::to_string(&Notification::new(
            "pool.update",
            PoolUpdate {
                subscription: "sub-4".into(),
                event_id: "ev".into(),
                pools: pools.iter().map(PoolJson::from).collect(),
            },
        ))
        .unwrap();
        assert_eq!(spliced, serialized);
    }
}
