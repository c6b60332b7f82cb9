//! The one error type of every method, and its one mapping to a JSON-RPC error object
//! (PROTOCOL §8). Internal errors are logged with their cause and answered opaquely.

use serde_json::json;

use super::wire::{ErrorObject, INTERNAL_ERROR, INVALID_PARAMS, METHOD_NOT_FOUND};
use crate::auth::password::HashError;
use crate::auth::AccountError;
pub use crate::auth::AuthFailure;
use crate::core::{Rule, TicketTypeId};

/// Everything a method can answer instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("method not found")]
    MethodNotFound,
    #[error("invalid params: {field}: {message}")]
    InvalidParams { field: String, message: String },
    #[error("not authenticated ({})", .0.as_str())]
    Unauthenticated(AuthFailure),
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("forbidden")]
    Forbidden,
    #[error("not found")]
    NotFound,
    #[error("email already registered")]
    EmailTaken,
    #[error("not enough tickets")]
    InsufficientTickets {
        ticket_type_id: TicketTypeId,
        available: u32,
    },
    #[error("the selling rule forbids this quantity")]
    RuleViolation {
        ticket_type_id: TicketTypeId,
        rule: Rule,
    },
    #[error("reservation expired")]
    ReservationExpired,
    #[error("reservation is not pending")]
    ReservationNotPending,
    #[error("idempotency key reused with other params")]
    IdempotencyConflict,
    #[error("payment declined")]
    PaymentDeclined,
    #[error("payment provider unavailable")]
    PaymentUnavailable,
    #[error("rate limited")]
    RateLimited { retry_after_ms: u64 },
    #[error("service unavailable")]
    Unavailable,
    /// `UNAVAILABLE` with `data.not_owner: true`: on `/cluster/rpc` only, a call for an
    /// event this server does not own (any more). Nothing ran, so the forwarding server
    /// looks the owner up again and sends the call there.
    #[error("service unavailable: not the event's owner")]
    NotOwner,
    #[error("not supported on this transport")]
    TransportUnsupported,
    /// A bug or an unexpected failure; the cause is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
    /// The error another server (the event's owner) answered a forwarded call with.
    #[error("{message}")]
    Relayed {
        code: i64,
        message: String,
        data: Option<serde_json::Value>,
    },
}

impl RpcError {
    pub fn invalid_params(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParams {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::Internal(cause.to_string())
    }

    /// The stable `data.reason` (or `None` for the standard errors without one).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MethodNotFound => "METHOD_NOT_FOUND",
            Self::InvalidParams { .. } => "INVALID_PARAMS",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound => "NOT_FOUND",
            Self::EmailTaken => "EMAIL_TAKEN",
            Self::InsufficientTickets { .. } => "INSUFFICIENT_TICKETS",
            Self::RuleViolation { .. } => "RULE_VIOLATION",
            Self::ReservationExpired => "RESERVATION_EXPIRED",
            Self::ReservationNotPending => "RESERVATION_NOT_PENDING",
            Self::IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            Self::PaymentDeclined => "PAYMENT_DECLINED",
            Self::PaymentUnavailable => "PAYMENT_UNAVAILABLE",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::Unavailable | Self::NotOwner => "UNAVAILABLE",
            Self::TransportUnsupported => "TRANSPORT_UNSUPPORTED",
            Self::Internal(_) => "INTERNAL",
            Self::Relayed { data, .. } => known_reason(data.as_ref()),
        }
    }

    /// The wire form. The only place errors become JSON.
    pub fn to_error_object(&self) -> ErrorObject {
        if let Self::Relayed {
            code,
            message,
            data,
        } = self
        {
            return ErrorObject {
                code: *code,
                message: message.clone(),
                data: data.clone(),
            };
        }
        let reason = self.reason();
        let data = match self {
            Self::MethodNotFound | Self::Internal(_) => None,
            Self::InvalidParams { field, .. } => Some(json!({"reason": reason, "field": field})),
            Self::Unauthenticated(why) => {
                Some(json!({"reason": reason, "reason_detail": why.as_str()}))
            }
            Self::InsufficientTickets {
                ticket_type_id,
                available,
            } => Some(json!({
                "reason": reason,
                "ticket_type_id": ticket_type_id.to_string(),
                "available": available,
            })),
            Self::RuleViolation {
                ticket_type_id,
                rule,
            } => Some(json!({
                "reason": reason,
                "ticket_type_id": ticket_type_id.to_string(),
                "rule": crate::shapes::rule_json(rule),
            })),
            Self::RateLimited { retry_after_ms } => {
                Some(json!({"reason": reason, "retry_after_ms": retry_after_ms}))
            }
            Self::NotOwner => Some(json!({"reason": reason, "not_owner": true})),
            _ => Some(json!({"reason": reason})),
        };
        let message = match self {
            Self::MethodNotFound => "Method not found".to_owned(),
            Self::Internal(_) => "Internal error".to_owned(),
            other => other.to_string(),
        };
        ErrorObject {
            code: self.code(),
            message,
            data,
        }
    }

    fn code(&self) -> i64 {
        match self {
            Self::MethodNotFound => METHOD_NOT_FOUND,
            Self::InvalidParams { .. } => INVALID_PARAMS,
            Self::Internal(_) => INTERNAL_ERROR,
            Self::Unauthenticated(_) => 1001,
            Self::InvalidCredentials => 1002,
            Self::Forbidden => 1003,
            Self::NotFound => 1004,
            Self::EmailTaken => 1005,
            Self::InsufficientTickets { .. } => 2001,
            Self::RuleViolation { .. } => 2002,
            Self::ReservationExpired => 2003,
            Self::ReservationNotPending => 2004,
            Self::IdempotencyConflict => 2005,
            Self::PaymentDeclined => 3001,
            Self::PaymentUnavailable => 3002,
            Self::RateLimited { .. } => 4001,
            Self::Unavailable | Self::NotOwner => 4002,
            Self::TransportUnsupported => 4003,
            Self::Relayed { code, .. } => *code,
        }
    }
}

/// Every `data.reason` this server answers with.
const REASONS: [&str; 18] = [
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "UNAUTHENTICATED",
    "INVALID_CREDENTIALS",
    "FORBIDDEN",
    "NOT_FOUND",
    "EMAIL_TAKEN",
    "INSUFFICIENT_TICKETS",
    "RULE_VIOLATION",
    "RESERVATION_EXPIRED",
    "RESERVATION_NOT_PENDING",
    "IDEMPOTENCY_CONFLICT",
    "PAYMENT_DECLINED",
    "PAYMENT_UNAVAILABLE",
    "RATE_LIMITED",
    "UNAVAILABLE",
    "TRANSPORT_UNSUPPORTED",
    "INTERNAL",
];

/// The reason of a relayed error, as one of ours (for metrics and logs); `INTERNAL` if the
/// other server sent one this server does not know.
fn known_reason(data: Option<&serde_json::Value>) -> &'static str {
    let reason = data
        .and_then(|d| d["reason"].as_str())
        .unwrap_or("INTERNAL");
    REASONS
        .iter()
        .find(|known| **known == reason)
        .copied()
        .unwrap_or("INTERNAL")
}

/// Storage failures are mapped as the engine maps them: a database that cannot serve is
/// `UNAVAILABLE` (nothing changed), anything else is a bug (internal).
impl From<crate::store::StoreError> for RpcError {
    fn from(error: crate::store::StoreError) -> Self {
        crate::engine::EngineError::from(error).into()
    }
}

/// The `data.field` of one reservation item's field: `items[2].quantity`.
pub(crate) fn item_field(index: usize, field: &str) -> String {
    format!("items[{index}].{field}")
}

/// The engine's refusals on the wire.
impl From<crate::engine::EngineError> for RpcError {
    fn from(error: crate::engine::EngineError) -> Self {
        use crate::core::inventory::ReserveError as R;
        use crate::engine::EngineError as E;
        match error {
            E::Invalid(invalid) => match invalid {
                R::TotalOverflow => RpcError::invalid_params("items", invalid.to_string()),
                R::MixedEvents { index } => RpcError::invalid_params(
                    item_field(index, "ticket_type_id"),
                    "all items must be of one event",
                ),
                R::UnknownTicketType { .. } => RpcError::NotFound,
                R::Insufficient {
                    ticket_type_id,
                    available,
                } => RpcError::InsufficientTickets {
                    ticket_type_id,
                    available,
                },
                R::RuleViolation {
                    ticket_type_id,
                    rule,
                } => RpcError::RuleViolation {
                    ticket_type_id,
                    rule,
                },
                // The engine answers this as `NotOwner` (forwarded to the event's owner);
                // should one ever reach the wire, nothing was taken.
                R::NotOwned { .. } => RpcError::NotOwner,
            },
            E::NotFound => RpcError::NotFound,
            E::Expired => RpcError::ReservationExpired,
            E::NotPending => RpcError::ReservationNotPending,
            E::IdempotencyConflict => RpcError::IdempotencyConflict,
            E::PaymentDeclined => RpcError::PaymentDeclined,
            E::PaymentUnavailable => RpcError::PaymentUnavailable,
            E::Unavailable => RpcError::Unavailable,
            E::Internal(cause) => RpcError::Internal(cause),
            E::NotOwner(_) => RpcError::NotOwner,
            E::Relayed {
                code,
                message,
                data,
            } => RpcError::Relayed {
                code,
                message,
                data,
            },
        }
    }
}

/// Account refusals on the wire; a database that cannot answer is `UNAVAILABLE`.
impl From<AccountError> for RpcError {
    fn from(error: AccountError) -> Self {
        match error {
            AccountError::InvalidCredentials => RpcError::InvalidCredentials,
            AccountError::EmailTaken => RpcError::EmailTaken,
            AccountError::Refused(why) => RpcError::Unauthenticated(why),
            AccountError::Store(e) => e.into(),
            // Every hashing thread busy and the queue full: overload, like a full write queue.
            AccountError::Hash(HashError::Busy) => RpcError::Unavailable,
            AccountError::Hash(e) => RpcError::internal(e),
        }
    }
}

#[cfg(test)]
mod plain_words {
    use super::*;

    #[test]
    fn messages_are_plain_words_without_debug_formatting() {
        for why in [
            AuthFailure::Missing,
            AuthFailure::Invalid,
            AuthFailure::Expired,
        ] {
            let message = RpcError::Unauthenticated(why).to_error_object().message;
            assert_eq!(message, format!("not authenticated ({})", why.as_str()));
            assert!(
                !message.chars().any(|c| c.is_ascii_uppercase()),
                "{message}"
            );
        }
    }
}
