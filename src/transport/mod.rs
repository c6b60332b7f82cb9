//! Transports: they frame messages and nothing more. Each hands text to the one dispatch
//! and writes back what it returns.

pub mod admission;
pub mod follow;
pub mod http;
pub mod longpoll;
pub mod origin;
pub mod ws;

use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};

use crate::app::App;
use crate::auth::{AccountError, TokenError};
use crate::core::User;
use crate::rpc::{AuthFailure, Principal};

/// What the credentials presented with a request come to.
pub enum Bearer {
    /// No token was presented.
    Absent,
    Valid(Principal),
    /// A token was presented and is not usable.
    Refused(AuthFailure),
    /// The token could not be checked (the database did not answer).
    Unverifiable,
}

/// Checks the `Authorization: Bearer …` header, or else `fallback` (the `?token=` of a
/// WebSocket upgrade).
pub async fn authenticate(app: &App, headers: &HeaderMap, fallback: Option<&str>) -> Bearer {
    let token = match bearer_token(headers) {
        Some(Ok(token)) => token,
        Some(Err(())) => return Bearer::Refused(AuthFailure::Invalid),
        None => match fallback.filter(|t| !t.is_empty()) {
            Some(token) => token,
            None => return Bearer::Absent,
        },
    };
    match app.services.accounts.verify(token).await {
        Ok((user, expires_at)) => Bearer::Valid(Principal {
            user,
            expires_at,
            fresh_key: None,
        }),
        Err(AccountError::Refused(why)) => Bearer::Refused(why),
        Err(_) => Bearer::Unverifiable,
    }
}

/// Checks the `Authorization: Bearer …` header of a call another cluster server forwarded
/// (`/cluster/rpc`): only a forwarded call's token is accepted, and the user is not read
/// from the database, which the forwarding server has just done.
pub fn authenticate_forwarded(app: &App, headers: &HeaderMap) -> Bearer {
    let token = match bearer_token(headers) {
        Some(Ok(token)) => token,
        Some(Err(())) => return Bearer::Refused(AuthFailure::Invalid),
        None => return Bearer::Absent,
    };
    match app.tokens.verify_forwarded(token, app.clock.now()) {
        Ok(verified) => Bearer::Valid(Principal {
            user: User {
                id: verified.user_id,
                // Not carried: no forwarded method needs it.
                email: String::new(),
                role: verified.role,
            },
            expires_at: verified.expires_at,
            fresh_key: verified.fresh_key,
        }),
        Err(TokenError::Expired) => Bearer::Refused(AuthFailure::Expired),
        Err(TokenError::Invalid) => Bearer::Refused(AuthFailure::Invalid),
    }
}

/// The token of an `Authorization: Bearer …` header. `Some(Err(()))` when the header is
/// there but is not a bearer token.
pub fn bearer_token(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    Some(token.ok_or(()))
}

/// A body's text, or `None` when it is not UTF-8: such a body is not JSON (PROTOCOL §1),
/// never decoded lossily into something else.
pub fn utf8_or_parse_error(body: &[u8]) -> Option<String> {
    std::str::from_utf8(body).ok().map(str::to_owned)
}

/// 200 with the `-32700` answer, as for any body that is not JSON.
pub fn parse_error_response() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        parse_error_text(),
    )
        .into_response()
}

pub fn parse_error_text() -> String {
    serde_json::to_string(&crate::rpc::wire::parse_error()).expect("responses always serialize")
}
