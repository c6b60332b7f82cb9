//! Wire shapes of the domain values (PROTOCOL §3–§6) and the parsing of ids from params.
//! Results are built from these structs, so each shape is written down once.

use serde::Serialize;
use serde_json::{json, Value};

use super::error::RpcError;
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

/// Reads an id from a param. A string that is not an id we could have issued names
/// nothing that exists, so it answers `NOT_FOUND` exactly as an unknown id does.
pub fn parse_id<T: std::str::FromStr>(text: &str) -> Result<T, RpcError> {
    text.parse().map_err(|_| RpcError::NotFound)
}
