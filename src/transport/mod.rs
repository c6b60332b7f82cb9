//! Transports: they frame messages and nothing more. Each hands text to the one dispatch
//! and writes back what it returns.

pub mod http;
pub mod longpoll;
pub mod ws;

use axum::http::HeaderMap;

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
