//! Fixtures: users (by role, with or without a password) and event params.

use serde_json::{json, Value};
use ticket_api::core::{Role, User, UserId};

use super::TestApp;

impl TestApp {
    /// Creates a user directly in storage (for admins, which cannot register).
    pub async fn create_user(&self, email: &str, password: &str, role: Role) -> User {
        let user = User {
            id: UserId::new(),
            email: email.to_owned(),
            role,
        };
        let hash = self.app.passwords.hash(password.to_owned()).await.unwrap();
        self.app
            .store
            .insert_user(&user, &hash, self.app.clock.now())
            .await
            .unwrap();
        user
    }

    /// A user stored directly (no password hashing) and a token minted for them: the
    /// fastest way to get many logged-in users. Returns `(user id, token)`.
    async fn quick_user(&self, role: Role) -> (String, String) {
        let user = User {
            id: UserId::new(),
            email: format!("quick-{}-{}@example.com", role.as_str(), UserId::new()),
            role,
        };
        let now = self.app.clock.now();
        self.app
            .store
            .insert_user(&user, "not-a-password-hash", now)
            .await
            .unwrap();
        let (token, _) = self.app.tokens.issue(user.id, role, now);
        (user.id.to_string(), token)
    }

    /// A customer made by [`TestApp::quick_user`]: `(user id, token)`.
    pub async fn quick_customer(&self) -> (String, String) {
        self.quick_user(Role::Customer).await
    }

    /// An admin made by [`TestApp::quick_user`]: the token.
    pub async fn quick_admin(&self) -> String {
        self.quick_user(Role::Admin).await.1
    }
}

/// Event params with one ticket type of the given capacity and rule.
pub fn event_params(name: &str, capacity: u32, rule: Value) -> Value {
    json!({
        "name": name,
        "starts_at": "2027-05-01T19:30:00Z",
        "venue": "Test Hall",
        "ticket_types": [{"name": "Standard", "price": {"amount": 2500, "currency": "EUR"}, "capacity": capacity, "rule": rule}]
    })
}

/// 25.00, 26.00, … EUR.
pub fn event_with_types(name: &str, types: &[(u32, Value)]) -> Value {
    let ticket_types: Vec<Value> = types
        .iter()
        .enumerate()
        .map(|(i, (capacity, rule))| {
            json!({
                "name": format!("T{i}"),
                "price": {"amount": 2500 + 100 * i as i64, "currency": "EUR"},
                "capacity": capacity,
                "rule": rule,
            })
        })
        .collect();
    json!({
        "name": name,
        "starts_at": "2027-05-01T19:30:00Z",
        "venue": "Test Hall",
        "ticket_types": ticket_types,
    })
}
