//! `events.list`, `events.get` and `admin.events.create`.

use serde::{Deserialize, Serialize};

use crate::catalog::{CreateEventError, EventDraft};
use crate::core::{EventId, Timestamp};
use crate::rpc::dispatch::{Access, Methods};
use crate::rpc::methods::parse_id;
use crate::rpc::Ctx;
use crate::rpc::RpcError;
use crate::shapes::EventJson;

pub fn register(methods: &mut Methods) {
    methods.register("events.list", Access::Public, list);
    methods.register("events.get", Access::Public, get);
    methods.register("admin.events.create", Access::Admin, create);
}

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 200;

#[derive(Debug, Deserialize)]
struct ListParams {
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
struct EventPage {
    events: Vec<EventJson>,
    next_cursor: Option<String>,
}

/// A cursor names the last event of the previous page by its sort key, so pages stay
/// stable while events are added.
fn encode_cursor(starts_at: Timestamp, id: EventId) -> String {
    format!("{}_{id}", starts_at.as_millis())
}

fn decode_cursor(cursor: &str) -> Option<(Timestamp, EventId)> {
    let (millis, id) = cursor.split_once('_')?;
    Some((
        Timestamp::from_millis(millis.parse().ok()?),
        id.parse().ok()?,
    ))
}

async fn list(ctx: Ctx, params: ListParams) -> Result<EventPage, RpcError> {
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(RpcError::invalid_params(
            "limit",
            format!("an integer from 1 to {MAX_LIMIT}"),
        ));
    }
    let after = match params.cursor.as_deref() {
        None => None,
        Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| {
            RpcError::invalid_params("cursor", "not a cursor this server issued")
        })?),
    };
    // One more than asked tells whether another page follows.
    let mut page = ctx.services.catalog.events_after(after, limit as usize + 1);
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let next_cursor = more
        .then(|| {
            page.last()
                .map(|(event, _)| encode_cursor(event.starts_at, event.id))
        })
        .flatten();
    Ok(EventPage {
        events: page
            .iter()
            .map(|(event, pools)| EventJson::new(event, pools))
            .collect(),
        next_cursor,
    })
}

#[derive(Debug, Deserialize)]
struct GetParams {
    event_id: String,
}

async fn get(ctx: Ctx, params: GetParams) -> Result<EventJson, RpcError> {
    let id: EventId = parse_id(&params.event_id)?;
    let (event, pools) = ctx.services.catalog.event(id).ok_or(RpcError::NotFound)?;
    Ok(EventJson::new(&event, &pools))
}

async fn create(ctx: Ctx, draft: EventDraft) -> Result<EventJson, RpcError> {
    let event = ctx
        .services
        .catalog
        .create_event(&draft)
        .await
        .map_err(|e| match e {
            CreateEventError::Invalid(field) => {
                RpcError::invalid_params(field.field, field.message)
            }
            CreateEventError::Store(e) => RpcError::from(e),
        })?;
    let (event, pools) = ctx
        .services
        .catalog
        .event(event.id)
        .ok_or_else(|| RpcError::internal("created event missing from inventory"))?;
    Ok(EventJson::new(&event, &pools))
}
