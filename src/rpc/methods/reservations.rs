//! `tickets.reserve`, `reservations.get`, `reservations.list`, `reservations.cancel` and
//! `payments.create`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::reservation::{Reservation, Status};
use crate::core::{
    BadQuantity, IdempotencyKey, ItemsError, PaymentToken, ReservationId, ReserveItems,
};
use crate::engine::idempotency::{params_hash, Answer, KeyedCall};
use crate::engine::Paid;
use crate::rpc::dispatch::{Access, Methods};
use crate::rpc::error::item_field;
use crate::rpc::methods::parse_id;
use crate::rpc::RpcError;
use crate::rpc::{Ctx, Principal};
use crate::shapes::{MoneyJson, ReservationJson};

pub fn register(methods: &mut Methods) {
    methods.register("tickets.reserve", Access::User, reserve);
    methods.register("reservations.get", Access::User, get);
    methods.register("reservations.list", Access::User, list);
    methods.register("reservations.cancel", Access::User, cancel);
    methods.register("payments.create", Access::User, pay);
}

/// Most reservations `reservations.list` returns (the newest).
const MAX_LISTED: usize = 1_000;

#[derive(Debug, Deserialize)]
struct ReserveParams {
    items: Vec<ItemParam>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ItemParam {
    ticket_type_id: String,
    quantity: u32,
}

fn key_param(key: Option<String>) -> Result<Option<IdempotencyKey>, RpcError> {
    key.map(IdempotencyKey::parse)
        .transpose()
        .map_err(|why| RpcError::invalid_params("idempotency_key", why.to_string()))
}

/// The items of `tickets.reserve`, read once into a type that holds only valid ones.
fn items_param(items: &[ItemParam]) -> Result<ReserveItems, RpcError> {
    ReserveItems::parse(
        items
            .iter()
            .map(|i| (i.ticket_type_id.as_str(), i.quantity)),
    )
    .map_err(|why| match why {
        ItemsError::Count => RpcError::invalid_params("items", why.to_string()),
        ItemsError::Quantity { index } => {
            RpcError::invalid_params(item_field(index, "quantity"), BadQuantity.to_string())
        }
        ItemsError::MalformedId { .. } => RpcError::NotFound,
        ItemsError::Repeated { index } => RpcError::invalid_params(
            item_field(index, "ticket_type_id"),
            "the same ticket type twice",
        ),
    })
}

/// The wire form of a result: a fresh one written by `wire`; one already rendered (a
/// replay as stored, or the answer of the event's owner) as it is.
fn to_wire<T, W: Serialize>(
    result: Answer<T>,
    wire: impl FnOnce(&T) -> W,
) -> Result<Value, RpcError> {
    match result {
        Answer::Fresh(value) => serde_json::to_value(wire(&value)).map_err(RpcError::internal),
        Answer::Rendered(text) => serde_json::from_str(&text).map_err(RpcError::internal),
    }
}

fn reservation_text(reservation: &Reservation) -> String {
    serde_json::to_string(&ReservationJson::from(reservation)).expect("serializable")
}

/// Whether `key` is the one a forwarding server made for this very call (see
/// [`crate::rpc::Principal::fresh_key`]).
fn is_fresh(principal: &Principal, key: &IdempotencyKey) -> bool {
    principal.fresh_key.as_deref() == Some(key.as_str())
}

async fn reserve(ctx: Ctx, params: ReserveParams) -> Result<Value, RpcError> {
    let principal = ctx.session.principal(ctx.services.clock.now())?;
    let user = principal.user.id;
    let idempotency_key = key_param(params.idempotency_key)?;
    // Shape first (INVALID_PARAMS; a malformed id is NOT_FOUND), then, in the engine,
    // which ticket types exist (NOT_FOUND).
    let items = items_param(&params.items)?;
    let canonical: String = items
        .as_slice()
        .iter()
        .map(|(id, quantity)| format!("{id}:{quantity};"))
        .collect();
    let render = |r: &Reservation| reservation_text(r);
    let key = idempotency_key.as_ref().map(|key| KeyedCall {
        method: "tickets.reserve",
        key,
        params_hash: params_hash(&canonical),
        render: &render,
        fresh: is_fresh(&principal, key),
    });
    let reservation = ctx.services.reservations.reserve(user, items, key).await?;
    to_wire(reservation, |r| ReservationJson::from(r))
}

#[derive(Debug, Deserialize)]
struct ReservationParams {
    reservation_id: String,
}

async fn get(ctx: Ctx, params: ReservationParams) -> Result<ReservationJson, RpcError> {
    let user = ctx.session.user_id(ctx.services.clock.now())?;
    let id: ReservationId = parse_id(&params.reservation_id)?;
    Ok(ReservationJson::from(
        &ctx.services.reservations.get(user, id).await?,
    ))
}

#[derive(Debug, Deserialize)]
struct ListParams {
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Serialize)]
struct ReservationList {
    reservations: Vec<ReservationJson>,
}

async fn list(ctx: Ctx, params: ListParams) -> Result<ReservationList, RpcError> {
    let user = ctx.session.user_id(ctx.services.clock.now())?;
    let status = match params.status.as_deref() {
        None => None,
        Some(text) => Some(text.parse::<Status>().map_err(|_| {
            RpcError::invalid_params("status", "one of pending, paid, cancelled, expired")
        })?),
    };
    let reservations = ctx
        .services
        .reservations
        .list(user, status, MAX_LISTED)
        .await?;
    Ok(ReservationList {
        reservations: reservations.iter().map(ReservationJson::from).collect(),
    })
}

async fn cancel(ctx: Ctx, params: ReservationParams) -> Result<Value, RpcError> {
    let user = ctx.session.user_id(ctx.services.clock.now())?;
    let id: ReservationId = parse_id(&params.reservation_id)?;
    let cancelled = ctx.services.reservations.cancel(user, id).await?;
    to_wire(cancelled, |r| ReservationJson::from(r))
}

#[derive(Debug, Deserialize)]
struct PayParams {
    reservation_id: String,
    payment_token: String,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Serialize)]
struct PaymentJson {
    id: String,
    reservation_id: String,
    amount: MoneyJson,
    status: &'static str,
}

#[derive(Debug, Serialize)]
struct PayResult {
    payment: PaymentJson,
    reservation: ReservationJson,
}

impl From<&Paid> for PayResult {
    fn from(paid: &Paid) -> Self {
        Self {
            payment: PaymentJson {
                id: paid.payment.id.to_string(),
                reservation_id: paid.payment.reservation_id.to_string(),
                amount: paid.payment.amount.into(),
                status: "succeeded",
            },
            reservation: ReservationJson::from(&paid.reservation),
        }
    }
}

async fn pay(ctx: Ctx, params: PayParams) -> Result<Value, RpcError> {
    let user = ctx.session.user_id(ctx.services.clock.now())?;
    let idempotency_key = key_param(params.idempotency_key)?;
    let payment_token = PaymentToken::parse(params.payment_token)
        .map_err(|why| RpcError::invalid_params("payment_token", why.to_string()))?;
    let id: ReservationId = parse_id(&params.reservation_id)?;
    let canonical = format!("{id}:{}", payment_token.as_str());
    let render = |paid: &Paid| serde_json::to_string(&PayResult::from(paid)).expect("serializable");
    let key = idempotency_key.as_ref().map(|key| KeyedCall {
        method: "payments.create",
        key,
        params_hash: params_hash(&canonical),
        render: &render,
        // Always looked up: a payment charges the provider before it commits, so a late
        // forwarded payment whose key the forwarder has since marked as used must be
        // refused before the charge, not at the commit.
        fresh: false,
    });
    let paid = ctx
        .services
        .reservations
        .pay(user, id, &payment_token, key)
        .await?;
    to_wire(paid, |p| PayResult::from(p))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::core::{TicketTypeId, MAX_COUNT};

    fn error_of(items: serde_json::Value) -> serde_json::Value {
        let items: Vec<ItemParam> = serde_json::from_value(items).unwrap();
        let error = items_param(&items).unwrap_err().to_error_object();
        json!({"code": error.code, "message": error.message, "data": error.data})
    }

    fn invalid(field: &str, message: &str) -> serde_json::Value {
        json!({
            "code": -32602,
            "message": format!("invalid params: {field}: {message}"),
            "data": {"reason": "INVALID_PARAMS", "field": field},
        })
    }

    #[test]
    fn malformed_items_answer_as_the_protocol_says() {
        let a = TicketTypeId::new().to_string();
        let b = TicketTypeId::new().to_string();
        let item = |id: &str, quantity: u32| json!({"ticket_type_id": id, "quantity": quantity});
        assert_eq!(error_of(json!([])), invalid("items", "1 to 20 items"));
        let many: Vec<_> = (0..21).map(|_| item(&a, 1)).collect();
        assert_eq!(error_of(json!(many)), invalid("items", "1 to 20 items"));
        assert_eq!(
            error_of(json!([item(&a, 1), item(&b, 0)])),
            invalid("items[1].quantity", "an integer from 1 to 2147483647")
        );
        assert_eq!(
            error_of(json!([item("x", 1), item(&b, MAX_COUNT + 1)])),
            invalid("items[1].quantity", "an integer from 1 to 2147483647")
        );
        assert_eq!(
            error_of(json!([item(&a, 1), item(&b, 1), item(&a, 2)])),
            invalid("items[2].ticket_type_id", "the same ticket type twice")
        );
        assert_eq!(
            error_of(json!([item(&a, 1), item("not-an-id", 1)])),
            json!({"code": 1004, "message": "not found", "data": {"reason": "NOT_FOUND"}})
        );
        let items: Vec<ItemParam> =
            serde_json::from_value(json!([item(&a, 2), item(&b, MAX_COUNT)])).unwrap();
        assert_eq!(items_param(&items).unwrap().len(), 2);
    }
}
