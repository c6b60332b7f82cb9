//! Typed calls over `/rpc` that tests make again and again: events created and read.

use serde_json::{json, Value};

use super::fixtures::event_with_types;
use super::TestApp;

impl TestApp {
    /// Creates an event through `admin.events.create` and returns it.
    pub async fn create_event(&self, admin_token: &str, params: Value) -> Value {
        let response = self
            .rpc("admin.events.create", params, Some(admin_token))
            .await;
        assert!(response["error"].is_null(), "{response}");
        response["result"].clone()
    }

    /// `events.get` over `/rpc`; the event.
    pub async fn event(&self, event_id: &Value) -> Value {
        let response = self
            .rpc("events.get", json!({"event_id": event_id}), None)
            .await;
        assert!(response["error"].is_null(), "{response}");
        response["result"].clone()
    }

    /// `(available, version)` of the ticket type at `index` of the event, per `events.get`.
    pub async fn pool(&self, event_id: &Value, index: usize) -> (u64, u64) {
        let event = self.event(event_id).await;
        let ticket_type = &event["ticket_types"][index];
        (
            ticket_type["available"].as_u64().unwrap(),
            ticket_type["version"].as_u64().unwrap(),
        )
    }

    /// Creates an event with one ticket type per `(capacity, rule)` (see [`event_with_types`]);
    /// returns the event id and the ticket type ids in order.
    pub async fn create_pools(
        &self,
        admin_token: &str,
        types: &[(u32, Value)],
    ) -> (Value, Vec<Value>) {
        let event = self
            .create_event(admin_token, event_with_types("Pools", types))
            .await;
        let ids = event["ticket_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tt| tt["id"].clone())
            .collect();
        (event["id"].clone(), ids)
    }
}
