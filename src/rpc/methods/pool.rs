//! `pool.subscribe` and `pool.unsubscribe` (WebSocket and long-poll only).

use serde::{Deserialize, Serialize};

use crate::core::EventId;
use crate::fanout::SubscriptionId;
use crate::rpc::dispatch::{Access, Methods};
use crate::rpc::methods::parse_id;
use crate::rpc::session::Push;
use crate::rpc::Ctx;
use crate::rpc::RpcError;
use crate::shapes::PoolJson;

pub fn register(methods: &mut Methods) {
    methods.register("pool.subscribe", Access::Push, subscribe);
    methods.register("pool.unsubscribe", Access::Push, unsubscribe);
}

fn push(ctx: &Ctx) -> Result<&Push, RpcError> {
    ctx.session
        .push
        .as_ref()
        .ok_or(RpcError::TransportUnsupported)
}

#[derive(Debug, Deserialize)]
struct SubscribeParams {
    event_id: String,
}

#[derive(Debug, Serialize)]
struct Subscribed {
    subscription: String,
    event_id: String,
    pools: Vec<PoolJson>,
}

async fn subscribe(ctx: Ctx, params: SubscribeParams) -> Result<Subscribed, RpcError> {
    let push = push(&ctx)?;
    let event_id: EventId = parse_id(&params.event_id)?;
    let catalog = &ctx.services.catalog;
    // An unknown event is NOT_FOUND even at the subscription limit.
    if catalog.pools(event_id).is_none() {
        return Err(RpcError::NotFound);
    }
    let (subscription, pools) = push.subscribe(event_id, || catalog.pools(event_id))?;
    Ok(Subscribed {
        subscription: subscription.to_string(),
        event_id: event_id.to_string(),
        pools: pools.iter().map(PoolJson::from).collect(),
    })
}

#[derive(Debug, Deserialize)]
struct UnsubscribeParams {
    subscription: String,
}

/// Ending a subscription that is not (or no longer) open succeeds: the client's intent holds.
async fn unsubscribe(ctx: Ctx, params: UnsubscribeParams) -> Result<bool, RpcError> {
    let push = push(&ctx)?;
    if let Ok(id) = params.subscription.parse::<SubscriptionId>() {
        push.unsubscribe(id);
    }
    Ok(true)
}
