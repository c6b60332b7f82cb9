//! Transports: they frame messages and nothing more. Each hands text to the one dispatch
//! and writes back what it returns.

pub mod http;
pub mod longpoll;
pub mod ws;

use axum::http::HeaderMap;

use crate::app::App;
use crate::auth::AccountError;
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
        Ok((user, expires_at)) => Bearer::Valid(Principal { user, expires_at }),
        Err(AccountError::Refused(why)) => Bearer::Refused(why),
        Err(_) => Bearer::Unverifiable,
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
