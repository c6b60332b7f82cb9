//! The catalog: the validation of an event draft (from `admin.events.create`,
//! `ticket-api events import` or the demo seed), its creation in storage and inventory,
//! and the reads of events with their live availability, behind the [`CatalogService`]
//! port the methods use. Events are stored through the [`EventRecords`] port (the
//! database, wired in `app.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::core::inventory::{Inventory, PoolState};
use crate::core::{
    Clock, Currency, Event, EventId, Money, Rule, TicketType, TicketTypeId, Timestamp, MAX_COUNT,
};
use crate::store::StoreError;

/// Why an event could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateEventError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An event and the live state of its ticket types, in ticket type order.
pub type EventWithPools = (Arc<Event>, Vec<PoolState>);

/// What the methods ask of the catalog.
#[async_trait]
pub trait CatalogService: Send + Sync + 'static {
    /// Up to `limit` events in `(starts_at, id)` order, after the given sort key.
    fn events_after(
        &self,
        after: Option<(Timestamp, EventId)>,
        limit: usize,
    ) -> Vec<EventWithPools>;
    fn event(&self, id: EventId) -> Option<EventWithPools>;
    /// The live state of an event's ticket types.
    fn pools(&self, id: EventId) -> Option<Vec<PoolState>>;
    /// Validates a draft, stores the event and opens its pools.
    async fn create_event(&self, draft: &EventDraft) -> Result<Event, CreateEventError>;
}

/// Where created events are kept.
#[async_trait]
pub trait EventRecords: Send + Sync + 'static {
    /// Stores an event with its ticket types, all or nothing.
    async fn insert_event(&self, event: &Event, now: Timestamp) -> Result<(), StoreError>;
}

/// The catalog of this server: events in storage, their pools in the inventory.
pub struct Catalog {
    records: Arc<dyn EventRecords>,
    inventory: Arc<Inventory>,
    clock: Arc<dyn Clock>,
    /// Cluster mode: a created event starts as a mirror, and this wakes whoever claims
    /// events (any server may end up owning it).
    claim_new: Option<Arc<tokio::sync::Notify>>,
}

impl Catalog {
    pub fn new(
        records: Arc<dyn EventRecords>,
        inventory: Arc<Inventory>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            records,
            inventory,
            clock,
            claim_new: None,
        }
    }

    /// In cluster mode: created events are mirrors until claimed; `claim` is woken.
    pub fn claimed_by(mut self, claim: Arc<tokio::sync::Notify>) -> Self {
        self.claim_new = Some(claim);
        self
    }
}

#[async_trait]
impl CatalogService for Catalog {
    fn events_after(
        &self,
        after: Option<(Timestamp, EventId)>,
        limit: usize,
    ) -> Vec<EventWithPools> {
        self.inventory.events_after(after, limit)
    }

    fn event(&self, id: EventId) -> Option<EventWithPools> {
        self.inventory.event(id)
    }

    fn pools(&self, id: EventId) -> Option<Vec<PoolState>> {
        self.inventory.pools(id)
    }

    async fn create_event(&self, draft: &EventDraft) -> Result<Event, CreateEventError> {
        let event = draft.validate()?;
        // Stored first: pools open only for an event that will survive a restart.
        self.records.insert_event(&event, self.clock.now()).await?;
        let available: Vec<u32> = event.ticket_types.iter().map(|tt| tt.capacity).collect();
        match &self.claim_new {
            None => {
                self.inventory.insert_event(event.clone(), &available);
            }
            Some(claim) => {
                self.inventory.insert_mirror(event.clone(), &available, 0);
                claim.notify_one();
            }
        }
        tracing::info!(event_id = %event.id, name = %event.name, "event created");
        Ok(event)
    }
}

/// Limits on what one event may hold.
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_TICKET_TYPE_NAME_CHARS: usize = 100;
pub const MAX_TICKET_TYPES: usize = 50;
/// A price above ten billion in major units is a typo, not a ticket.
pub const MAX_PRICE: i64 = 1_000_000_000_000;

/// The params of `admin.events.create`, as a client sends them.
#[derive(Debug, Clone, Deserialize)]
pub struct EventDraft {
    pub name: String,
    pub starts_at: String,
    #[serde(default)]
    pub venue: Option<String>,
    pub ticket_types: Vec<TicketTypeDraft>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TicketTypeDraft {
    pub name: String,
    pub price: MoneyDraft,
    pub capacity: u32,
    pub rule: RuleDraft,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MoneyDraft {
    pub amount: i64,
    pub currency: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleDraft {
    Any,
    Multiple { of: u32 },
    Altogether,
    AvoidOne,
}

/// A draft field that is not acceptable, named as on the wire (`ticket_types[1].capacity`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn refuse<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

/// A name: trimmed, not blank, at most `max` characters.
fn name(field: &str, text: &str, max: usize) -> Result<String, FieldError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return refuse(field, "must not be blank");
    }
    if trimmed.chars().count() > max {
        return refuse(field, format!("at most {max} characters"));
    }
    if trimmed.chars().any(char::is_control) {
        return refuse(field, "must not contain control characters");
    }
    Ok(trimmed.to_owned())
}

impl EventDraft {
    /// Checks every field and gives the event and its ticket types fresh ids.
    pub fn validate(&self) -> Result<Event, FieldError> {
        let id = EventId::new();
        let event_name = name("name", &self.name, MAX_NAME_CHARS)?;
        let Some(starts_at) = Timestamp::parse_rfc3339(&self.starts_at) else {
            return refuse(
                "starts_at",
                "must be an RFC 3339 time such as 2027-05-01T19:30:00Z",
            );
        };
        let venue = match &self.venue {
            None => None,
            Some(venue) => Some(name("venue", venue, MAX_NAME_CHARS)?),
        };
        if self.ticket_types.is_empty() {
            return refuse("ticket_types", "at least one ticket type");
        }
        if self.ticket_types.len() > MAX_TICKET_TYPES {
            return refuse(
                "ticket_types",
                format!("at most {MAX_TICKET_TYPES} ticket types"),
            );
        }
        let mut names = HashSet::new();
        let mut currency: Option<Currency> = None;
        let mut ticket_types = Vec::with_capacity(self.ticket_types.len());
        for (i, draft) in self.ticket_types.iter().enumerate() {
            let at = |field: &str| format!("ticket_types[{i}].{field}");
            let tt_name = name(&at("name"), &draft.name, MAX_TICKET_TYPE_NAME_CHARS)?;
            if !names.insert(tt_name.to_lowercase()) {
                return refuse(
                    at("name"),
                    "ticket type names must be unique within the event",
                );
            }
            let Some(this_currency) = Currency::parse(&draft.price.currency) else {
                return refuse(at("price.currency"), "must be an ISO 4217 code such as EUR");
            };
            if currency.is_some_and(|c| c != this_currency) {
                return refuse(
                    at("price.currency"),
                    "all ticket types of an event share one currency",
                );
            }
            currency = Some(this_currency);
            if !(0..=MAX_PRICE).contains(&draft.price.amount) {
                return refuse(
                    at("price.amount"),
                    format!("an integer from 0 to {MAX_PRICE} (minor units)"),
                );
            }
            if !(1..=MAX_COUNT).contains(&draft.capacity) {
                return refuse(at("capacity"), format!("an integer from 1 to {MAX_COUNT}"));
            }
            let rule = match draft.rule {
                RuleDraft::Any => Rule::Any,
                RuleDraft::Altogether => Rule::Altogether,
                RuleDraft::AvoidOne => Rule::AvoidOne,
                RuleDraft::Multiple { of } => {
                    match Rule::multiple(of).filter(|_| of <= MAX_COUNT) {
                        Some(rule) => rule,
                        None => return refuse(at("rule.of"), "an integer of at least 2"),
                    }
                }
            };
            ticket_types.push(TicketType {
                id: TicketTypeId::new(),
                event_id: id,
                name: tt_name,
                price: Money::new(draft.price.amount, this_currency),
                capacity: draft.capacity,
                rule,
            });
        }
        Ok(Event {
            id,
            name: event_name,
            starts_at,
            venue,
            ticket_types,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::core::SystemClock;
    use serde_json::json;

    /// Keeps the events it is given, or refuses every one.
    #[derive(Default)]
    struct Kept {
        refuse: bool,
        events: Mutex<Vec<Event>>,
    }

    #[async_trait]
    impl EventRecords for Kept {
        async fn insert_event(&self, event: &Event, _: Timestamp) -> Result<(), StoreError> {
            if self.refuse {
                return Err(StoreError::Database(sqlx::Error::PoolTimedOut));
            }
            self.events.lock().unwrap().push(event.clone());
            Ok(())
        }
    }

    fn catalog_over(kept: Arc<Kept>) -> (Catalog, Arc<Inventory>) {
        let inventory = Arc::new(Inventory::new());
        let catalog = Catalog::new(kept, Arc::clone(&inventory), Arc::new(SystemClock));
        (catalog, inventory)
    }

    fn one_type() -> serde_json::Value {
        json!([{"name": "A", "price": {"amount": 100, "currency": "EUR"}, "capacity": 7, "rule": {"kind": "any"}}])
    }

    #[tokio::test]
    async fn a_created_event_is_stored_and_its_pools_open_full() {
        let kept = Arc::new(Kept::default());
        let (catalog, _) = catalog_over(Arc::clone(&kept));
        let event = catalog.create_event(&draft(one_type())).await.unwrap();
        assert_eq!(kept.events.lock().unwrap().clone(), vec![event.clone()]);
        let pools = catalog.pools(event.id).unwrap();
        assert_eq!(
            pools
                .iter()
                .map(|p| (p.available, p.version))
                .collect::<Vec<_>>(),
            vec![(7, 0)]
        );
        assert_eq!(catalog.events_after(None, 10).len(), 1);
    }

    #[tokio::test]
    async fn an_event_the_store_refuses_opens_no_pools() {
        let kept = Arc::new(Kept {
            refuse: true,
            ..Kept::default()
        });
        let (catalog, inventory) = catalog_over(kept);
        let refused = catalog.create_event(&draft(one_type())).await;
        assert!(
            matches!(refused, Err(CreateEventError::Store(_))),
            "{refused:?}"
        );
        assert!(inventory.events_after(None, 10).is_empty());
    }

    #[tokio::test]
    async fn an_invalid_draft_stores_nothing() {
        let kept = Arc::new(Kept::default());
        let (catalog, inventory) = catalog_over(Arc::clone(&kept));
        let refused = catalog.create_event(&draft(json!([]))).await;
        assert!(
            matches!(refused, Err(CreateEventError::Invalid(_))),
            "{refused:?}"
        );
        assert!(kept.events.lock().unwrap().is_empty());
        assert!(inventory.events_after(None, 10).is_empty());
    }

    fn draft(ticket_types: serde_json::Value) -> EventDraft {
        serde_json::from_value(json!({
            "name": "  Concert ", "starts_at": "2027-05-01T19:30:00+02:00", "ticket_types": ticket_types
        }))
        .unwrap()
    }

    fn field_of(ticket_types: serde_json::Value) -> String {
        draft(ticket_types).validate().unwrap_err().field
    }

    #[test]
    fn a_valid_draft_becomes_an_event() {
        let event = draft(json!([
            {"name": "Pair", "price": {"amount": 5000, "currency": "EUR"}, "capacity": 10, "rule": {"kind": "multiple", "of": 2}}
        ]))
        .validate()
        .unwrap();
        assert_eq!(event.name, "Concert");
        assert_eq!(event.starts_at.to_rfc3339(), "2027-05-01T17:30:00.000Z");
        assert_eq!(event.ticket_types[0].rule, Rule::multiple(2).unwrap());
        assert_eq!(event.ticket_types[0].event_id, event.id);
    }

    #[test]
    fn every_bad_field_is_named() {
        let tt = |price: serde_json::Value, capacity: u32, rule: serde_json::Value| json!([{"name": "A", "price": price, "capacity": capacity, "rule": rule}]);
        let eur = json!({"amount": 100, "currency": "EUR"});
        assert_eq!(field_of(json!([])), "ticket_types");
        assert_eq!(
            field_of(tt(eur.clone(), 0, json!({"kind": "any"}))),
            "ticket_types[0].capacity"
        );
        assert_eq!(
            field_of(tt(
                json!({"amount": -1, "currency": "EUR"}),
                1,
                json!({"kind": "any"})
            )),
            "ticket_types[0].price.amount"
        );
        assert_eq!(
            field_of(tt(
                json!({"amount": 1, "currency": "eur"}),
                1,
                json!({"kind": "any"})
            )),
            "ticket_types[0].price.currency"
        );
        assert_eq!(
            field_of(tt(eur.clone(), 1, json!({"kind": "multiple", "of": 1}))),
            "ticket_types[0].rule.of"
        );
        let two = json!([
            {"name": "A", "price": eur, "capacity": 1, "rule": {"kind": "any"}},
            {"name": "a", "price": {"amount": 1, "currency": "USD"}, "capacity": 1, "rule": {"kind": "any"}}
        ]);
        assert_eq!(field_of(two), "ticket_types[1].name");
    }

    #[test]
    fn one_event_has_one_currency() {
        let mixed = json!([
            {"name": "A", "price": {"amount": 1, "currency": "EUR"}, "capacity": 1, "rule": {"kind": "any"}},
            {"name": "B", "price": {"amount": 1, "currency": "USD"}, "capacity": 1, "rule": {"kind": "any"}}
        ]);
        assert_eq!(field_of(mixed), "ticket_types[1].price.currency");
    }
}
