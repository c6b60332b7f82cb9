//! The demo catalog seeded by `--demo`: a few events covering every selling rule. The same
//! file is an example of the input of `ticket-api events import`.

use crate::catalog::EventDraft;

const DEMO_EVENTS: &str = include_str!("demo_events.json");

pub fn events() -> Vec<EventDraft> {
    serde_json::from_str(DEMO_EVENTS).expect("src/demo_events.json holds valid event drafts")
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_demo_event_is_valid_and_every_rule_is_shown() {
        let events: Vec<_> = super::events()
            .iter()
            .map(|d| d.validate().unwrap())
            .collect();
        let kinds: std::collections::HashSet<_> = events
            .iter()
            .flat_map(|e| e.ticket_types.iter().map(|tt| tt.rule.kind()))
            .collect();
        assert_eq!(kinds.len(), 4);
    }
}
