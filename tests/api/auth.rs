//! Registration, login, tokens and roles (PROTOCOL §3), on both backends.

use serde_json::json;
use ticket_api::auth::Tokens;
use ticket_api::core::{Role, Timestamp};

use crate::backend_tests;
use crate::harness::{event_params, reason, WsClient, JWT_SECRET};

backend_tests! {
    async fn register_returns_a_user_and_a_token_valid_for_a_day(app) {
        let response = app.rpc("auth.register", json!({"email": "  Ada@Example.com ", "password": "analytical"}), None).await;
        let result = &response["result"];
        assert_eq!(result["user"]["email"], "ada@example.com");
        assert_eq!(result["user"]["role"], "customer");
        assert!(result["user"]["id"].is_string());
        let expires_at = Timestamp::parse_rfc3339(result["expires_at"].as_str().unwrap()).unwrap();
        let in_a_day = app.app.clock.now().as_millis() + 86_400_000;
        assert!((expires_at.as_millis() - in_a_day).abs() < 5_000, "{result}");
        let me = app.rpc("auth.authenticate", json!({"token": result["token"]}), None).await;
        assert_eq!(me["result"]["user"], result["user"]);
    }

    async fn a_taken_email_is_refused(app) {
        let params = json!({"email": "grace@example.com", "password": "compilers"});
        app.rpc("auth.register", params.clone(), None).await;
        let again = app.rpc("auth.register", json!({"email": "GRACE@example.com", "password": "other-password"}), None).await;
        assert_eq!(reason(&again), "EMAIL_TAKEN");
        assert_eq!(again["error"]["code"], 1005);
    }

    async fn a_short_password_is_invalid_params(app) {
        let response = app.rpc("auth.register", json!({"email": "x@example.com", "password": "seven77"}), None).await;
        assert_eq!(response["error"]["code"], -32602);
        assert_eq!(response["error"]["data"]["field"], "password");
        let response = app.rpc("auth.register", json!({"email": "not-an-email", "password": "long enough"}), None).await;
        assert_eq!(response["error"]["data"]["field"], "email");
    }

    async fn login_failures_are_identical(app) {
        app.rpc("auth.register", json!({"email": "linus@example.com", "password": "penguins!"}), None).await;
        let ok = app.rpc("auth.login", json!({"email": "LINUS@example.com", "password": "penguins!"}), None).await;
        assert_eq!(ok["result"]["user"]["email"], "linus@example.com");
        let wrong_password = app.rpc("auth.login", json!({"email": "linus@example.com", "password": "walruses!"}), None).await;
        let unknown_email = app.rpc("auth.login", json!({"email": "nobody@example.com", "password": "walruses!"}), None).await;
        let malformed_email = app.rpc("auth.login", json!({"email": "nobody", "password": "walruses!"}), None).await;
        assert_eq!(reason(&wrong_password), "INVALID_CREDENTIALS");
        assert_eq!(wrong_password, unknown_email);
        assert_eq!(wrong_password, malformed_email);
    }

    async fn a_token_signed_with_another_secret_is_refused(app) {
        let user = app.create_user("eve@example.com", "password1", Role::Customer).await;
        let forged = Tokens::new(b"another-secret-another-secret-123", std::time::Duration::from_secs(3600));
        let (token, _) = forged.issue(user.id, Role::Admin, app.app.clock.now());
        assert_token_refused(&app, &token, "invalid").await;
    }

    async fn an_alg_none_token_is_refused(app) {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as b64;
        use base64::Engine as _;
        let user = app.create_user("mallory@example.com", "password1", Role::Customer).await;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64.encode(json!({"sub": user.id.to_string(), "role": "admin", "iat": 0, "exp": 4_000_000_000u64}).to_string());
        assert_token_refused(&app, &format!("{header}.{claims}."), "invalid").await;
    }

    async fn an_expired_token_is_refused(app) {
        let user = app.create_user("old@example.com", "password1", Role::Customer).await;
        let tokens = Tokens::new(JWT_SECRET.as_bytes(), std::time::Duration::from_secs(60));
        let long_ago = Timestamp::from_millis(app.app.clock.now().as_millis() - 3_600_000);
        let (token, _) = tokens.issue(user.id, Role::Customer, long_ago);
        assert_token_refused(&app, &token, "expired").await;
    }

    async fn a_token_at_connect_binds_the_connection(app) {
        let token = app.quick_customer().await.1;
        let mut ws = WsClient::connect(&format!("ws://{}/ws?token={token}", app.addr)).await.unwrap();
        // `admin.events.create` needs a user: a customer gets FORBIDDEN, not UNAUTHENTICATED.
        let response = ws.call("admin.events.create", event_params("x", 1, json!({"kind": "any"}))).await;
        assert_eq!(reason(&response), "FORBIDDEN");
        assert_eq!(ws.ok("auth.logout", json!({})).await, json!(true));
        let response = ws.call("admin.events.create", event_params("x", 1, json!({"kind": "any"}))).await;
        assert_eq!(response["error"]["data"], json!({"reason": "UNAUTHENTICATED", "reason_detail": "missing"}));
    }

    async fn a_customer_cannot_create_events(app) {
        let token = app.quick_customer().await.1;
        let response = app.rpc("admin.events.create", event_params("Gig", 10, json!({"kind": "any"})), Some(&token)).await;
        assert_eq!(reason(&response), "FORBIDDEN");
        assert_eq!(response["error"]["code"], 1003);
        let admin = app.quick_admin().await;
        let event = app.create_event(&admin, event_params("Gig", 10, json!({"kind": "any"}))).await;
        assert_eq!(event["ticket_types"][0]["available"], 10);
    }

    async fn login_over_a_websocket_binds_it(app) {
        app.rpc("auth.register", json!({"email": "ws@example.com", "password": "password1"}), None).await;
        let mut ws = app.ws().await;
        let result = ws.ok("auth.login", json!({"email": "ws@example.com", "password": "password1"})).await;
        assert_eq!(result["user"]["email"], "ws@example.com");
        let response = ws.call("admin.events.create", event_params("x", 1, json!({"kind": "any"}))).await;
        assert_eq!(reason(&response), "FORBIDDEN");
    }
}

/// The token is refused at WebSocket connect (401), by `auth.authenticate`, and on `/rpc`
/// for calls that need a user, always with the given `reason_detail`.
async fn assert_token_refused(app: &crate::harness::TestApp, token: &str, detail: &str) {
    let error = WsClient::connect(&format!("ws://{}/ws?token={token}", app.addr))
        .await
        .err()
        .expect("upgrade refused");
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 401),
        other => panic!("expected HTTP 401, got {other}"),
    }
    let response = app
        .rpc("auth.authenticate", json!({"token": token}), None)
        .await;
    assert_eq!(
        response["error"]["data"],
        json!({"reason": "UNAUTHENTICATED", "reason_detail": detail})
    );
    let response = app
        .rpc(
            "admin.events.create",
            event_params("x", 1, json!({"kind": "any"})),
            Some(token),
        )
        .await;
    assert_eq!(
        response["error"]["data"],
        json!({"reason": "UNAUTHENTICATED", "reason_detail": detail})
    );
}
