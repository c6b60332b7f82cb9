//! `tickets.reserve`, `reservations.get`, `reservations.list`, `reservations.cancel` and
//! `payments.create`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::inventory::MAX_ITEMS;
use crate::core::reservation::{Reservation, Status};
use crate::core::{IdempotencyKey, PaymentToken, ReservationId, TicketTypeId, MAX_COUNT};
use crate::engine::idempotency::{params_hash, Idempotent, KeyedCall};
use crate::engine::Paid;
use crate::rpc::dispatch::{Access, Methods};
use crate::rpc::methods::parse_id;
use crate::rpc::Ctx;
use crate::rpc::RpcError;
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

/// A result replayed from an idempotency key is the stored wire form.
/// The wire form of a result: a fresh one written by `wire`, a replayed one as stored.
fn to_wire<T, W: Serialize>(
    result: Idempotent<T>,
    wire: impl FnOnce(&T) -> W,
) -> Result<Value, RpcError> {
    match result {
        Idempotent::Fresh(value) => serde_json::to_value(wire(&value)).map_err(RpcError::internal),
        Idempotent::Replayed(text) => serde_json::from_str(&text).map_err(RpcError::internal),
    }
}

fn reservation_text(reservation: &Reservation) -> String {
    serde_json::to_string(&ReservationJson::from(reservation)).expect("serializable")
}

async fn reserve(ctx: Ctx, params: ReserveParams) -> Result<Value, RpcError> {
    let user = ctx.session.user_id(ctx.services.clock.now())?;
    let idempotency_key = key_param(params.idempotency_key)?;
    // Shape first (INVALID_PARAMS), then which ticket types exist (NOT_FOUND).
    if params.items.is_empty() || params.items.len() > MAX_ITEMS {
        return Err(RpcError::invalid_params(
            "items",
            format!("1 to {MAX_ITEMS} items"),
        ));
    }
    for (i, item) in params.items.iter().enumerate() {
        if !(1..=MAX_COUNT).contains(&item.quantity) {
            return Err(RpcError::invalid_params(
                format!("items[{i}].quantity"),
                "an integer from 1 to 2147483647",
            ));
        }
    }
    let items = params
        .items
        .iter()
        .map(|item| {
            Ok((
                parse_id::<TicketTypeId>(&item.ticket_type_id)?,
                item.quantity,
            ))
        })
        .collect::<Result<Vec<_>, RpcError>>()?;
    let canonical: String = items
        .iter()
        .map(|(id, quantity)| format!("{id}:{quantity};"))
        .collect();
    let render = |r: &Reservation| reservation_text(r);
    let key = idempotency_key.as_ref().map(|key| KeyedCall {
        method: "tickets.reserve",
        key,
        params_hash: params_hash(&canonical),
        render: &render,
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

async fn cancel(ctx: Ctx, params: ReservationParams) -> Result<ReservationJson, RpcError> {
    let user = ctx.session.user_id(ctx.services.clock.now())?;
    let id: ReservationId = parse_id(&params.reservation_id)?;
    Ok(ReservationJson::from(
        &ctx.services.reservations.cancel(user, id).await?,
    ))
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
    });
    let paid = ctx
        .services
        .reservations
        .pay(user, id, &payment_token, key)
        .await?;
    to_wire(paid, |p| PayResult::from(p))
}
