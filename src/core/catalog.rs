//! The catalog: events and their ticket types, as validated domain values.

use super::ids::{EventId, TicketTypeId};
use super::money::Money;
use super::rules::Rule;
use super::time::Timestamp;

/// Largest capacity or quantity: the wire allows integers up to 2³¹−1.
pub const MAX_COUNT: u32 = i32::MAX as u32;

/// An event as created; its availability lives in the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub id: EventId,
    pub name: String,
    pub starts_at: Timestamp,
    pub venue: Option<String>,
    pub ticket_types: Vec<TicketType>,
}

/// One pool of tickets of an event, sold at one price under one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketType {
    pub id: TicketTypeId,
    pub event_id: EventId,
    pub name: String,
    pub price: Money,
    /// At least 1, at most [`MAX_COUNT`].
    pub capacity: u32,
    pub rule: Rule,
}
