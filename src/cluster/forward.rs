//! Calls reach the event's owner from any server. [`Routed`] stands where the engine stands
//! for the method table: a call for an event owned here runs on the local engine; one for
//! an event owned elsewhere goes, as a JSON-RPC call on behalf of the same user, to the
//! owner's `POST /cluster/rpc`, which runs it on its own engine only (never forwarding
//! again), and the owner's answer, result or error, is passed on as it is.
//!
//! Within [`DEADLINE`] a call follows the owner: no owner yet (a takeover under way), an
//! owner that does not answer the connection (it died; its lease is lapsing), a server
//! that answers it does not own the event (nothing ran there), or this server becoming
//! the owner are waited out and tried again. Sending is never repeated once the request
//! may have reached an owner that ran it.
//!
//! Who owns an event, and where it answers, is read from Redis and remembered for
//! [`OWNER_MEMORY`]: two Redis round trips saved on nearly every forward. A remembered
//! owner that no longer owns the event says so, or does not answer the connection; either
//! way it is forgotten and Redis asked again.
//!
//! A forwarded `tickets.reserve` or `payments.create` always carries an idempotency key:
//! the client's, or one made here (`fwd-<uuid>`). So when the owner's answer does not come
//! (it died or stalled after the request left), the database says whether the call
//! committed: if the key is stored, the call succeeded and its stored result is the
//! answer; if not, a reserve's key made here is marked as used (so the call, should it
//! reach its commit late, is refused) and the answer is `UNAVAILABLE`: nothing was taken.
//! A payment's key made here is only read: the owner may be waiting on the payment
//! provider, and a charge must never be refused its record, so the payment may still
//! complete after the `UNAVAILABLE`. With the client's own key the call may still commit
//! late; the client's retry with the key then answers its result. An unanswered cancel is
//! settled by the reservation's status.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::directory::Directory;
use crate::auth::Tokens;
use crate::core::reservation::{Reservation, Status};
use crate::core::{Clock, EventId, PaymentToken, ReservationId, ReserveItems, Role, UserId};
use crate::engine::idempotency::{Answer, KeyedCall};
use crate::engine::ports::Records;
use crate::engine::{Engine, EngineError, Paid, ReservationService};
use crate::metrics::Metrics;
use crate::shapes::ReservationJson;
use crate::store::StoredIdempotency;

/// How long a call may spend reaching the owner: within PROTOCOL §10's 5 s.
pub const DEADLINE: Duration = Duration::from_secs(4);
/// How long the token a forwarded call carries is valid: it only has to reach the owner.
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// The pause before looking for the owner again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long an event's owner, read from Redis, is used without reading it again.
const OWNER_MEMORY: Duration = Duration::from_secs(1);

/// The route of internal calls on the owner.
pub const ROUTE: &str = "/cluster/rpc";

/// The reservation service of a cluster server. See the module doc.
pub struct Routed {
    pub engine: Arc<Engine>,
    /// Where an unanswered forward's idempotency key is looked up.
    pub records: Arc<dyn Records>,
    pub directory: Arc<Directory>,
    /// Signs the short-lived token a forwarded call carries for its user.
    pub tokens: Tokens,
    pub clock: Arc<dyn Clock>,
    pub http: reqwest::Client,
    pub metrics: Arc<Metrics>,
    /// Owners read from Redis lately: (node, its address, until when to use them).
    owners: DashMap<EventId, (String, String, Instant)>,
}

/// Where one attempt ended.
enum Attempt {
    Answered(Result<String, EngineError>),
    /// The request may have reached the owner, and no answer came.
    Unanswered,
    /// This server owns the event now: run the call here.
    Local,
    /// No owner took the call before the deadline: nothing ran.
    Unreached,
}

/// How a forwarded call whose answer never came is settled.
enum Settlement {
    /// By its idempotency key: the client's (with the hash of its params), or one made
    /// for the forward (`params_hash: None`), which is then marked as used so that the
    /// call can no longer commit if it has not.
    Key {
        method: &'static str,
        key: String,
        params_hash: Option<String>,
    },
    /// A cancel: by the reservation's status.
    Cancel(ReservationId),
}

impl Settlement {
    /// The idempotency key made for a forwarded reserve, which the owner need not look up.
    /// A payment's is looked up all the same (see `payments.create`).
    fn fresh_key(&self) -> Option<&str> {
        match self {
            Settlement::Key {
                method: "tickets.reserve",
                key,
                params_hash: None,
            } => Some(key),
            _ => None,
        }
    }
}

impl Routed {
    pub fn new(
        engine: Arc<Engine>,
        records: Arc<dyn Records>,
        directory: Arc<Directory>,
        tokens: Tokens,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client without TLS builds");
        Self {
            engine,
            records,
            directory,
            tokens,
            clock,
            http,
            metrics,
            owners: DashMap::new(),
        }
    }

    /// The event's owner and its address: remembered, else read from Redis. `None` while
    /// no server holds the event or its address is unknown.
    async fn owner_of(&self, event: EventId) -> Option<(String, String)> {
        if let Some(entry) = self.owners.get(&event) {
            let (node, address, until) = entry.value();
            if Instant::now() < *until {
                return Some((node.clone(), address.clone()));
            }
        }
        let node = self.directory.owner(event).await.ok().flatten()?;
        let address = if node == self.directory.node() {
            String::new()
        } else {
            self.directory.address(&node).await.ok().flatten()?
        };
        let until = Instant::now() + OWNER_MEMORY;
        self.owners
            .insert(event, (node.clone(), address.clone(), until));
        Some((node, address))
    }

    /// Runs `local` here while this server owns the event, else forwards `method` with
    /// `params` to the owner, until [`DEADLINE`].
    async fn route<T, F, Fut>(
        &self,
        user: UserId,
        method: &'static str,
        params: Value,
        settlement: Settlement,
        mut local: F,
    ) -> Result<Answer<T>, EngineError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Answer<T>, EngineError>>,
    {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let event = match local().await {
                Err(EngineError::NotOwner(event)) => event,
                other => return other,
            };
            let started = Instant::now();
            // Redis or the owner may hang rather than fail: the deadline holds regardless.
            let forwarded = tokio::time::timeout_at(
                deadline,
                self.forward(
                    event,
                    user,
                    method,
                    &params,
                    settlement.fresh_key(),
                    deadline,
                ),
            )
            .await
            .unwrap_or(Attempt::Unanswered);
            let attempt = match forwarded {
                Attempt::Unanswered => Attempt::Answered(self.settle(user, &settlement).await),
                Attempt::Unreached => Attempt::Answered(self.replay(user, &settlement).await),
                other => other,
            };
            match attempt {
                Attempt::Answered(answer) => {
                    let outcome = match &answer {
                        Ok(_) => "ok",
                        Err(EngineError::Relayed { .. }) => "error",
                        Err(_) => "unavailable",
                    };
                    self.metrics
                        .record_forward(method, outcome, started.elapsed());
                    return answer.map(Answer::Rendered);
                }
                Attempt::Local if Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                // Still taking the event over here at the deadline: nothing ran, as when no
                // owner took the call.
                Attempt::Local | Attempt::Unanswered | Attempt::Unreached => {
                    return self.replay(user, &settlement).await.map(Answer::Rendered);
                }
            }
        }
    }

    /// The answer to a call no owner took (a takeover under way): with the client's key,
    /// the result that key stored, if any, as the owner would have replayed it; else
    /// `UNAVAILABLE` (nothing ran).
    async fn replay(&self, user: UserId, settlement: &Settlement) -> Result<String, EngineError> {
        let Settlement::Key {
            method,
            key,
            params_hash: Some(hash),
        } = settlement
        else {
            return Err(EngineError::Unavailable);
        };
        let stored = self
            .records
            .idempotency(user, method, key, self.clock.now())
            .await?;
        stored_answer(stored, Some(hash))
    }

    /// The outcome of a forward that got no answer, from the database.
    async fn settle(&self, user: UserId, settlement: &Settlement) -> Result<String, EngineError> {
        let now = self.clock.now();
        let (stored, hash) = match settlement {
            Settlement::Cancel(id) => {
                return match self.engine.get(user, *id).await {
                    Ok(reservation) if reservation.status == Status::Cancelled => {
                        Ok(render(&ReservationJson::from(&reservation)))
                    }
                    _ => Err(EngineError::Unavailable),
                };
            }
            // A payment's own key is only read, never marked: the owner may be waiting on the
            // payment provider, and a charge made must be recorded. An unanswered payment
            // may so still complete after this `UNAVAILABLE` (the reservation then shows
            // paid, and its owner hears `reservation.updated`).
            Settlement::Key {
                method: method @ "payments.create",
                key,
                params_hash: None,
            } => (
                self.records.idempotency(user, method, key, now).await?,
                None,
            ),
            // A reserve's own: marked as used now unless the call committed it, so either way
            // the answer below stays true.
            Settlement::Key {
                method,
                key,
                params_hash: None,
            } => (
                self.records
                    .claim_idempotency_key(user, method, key, now)
                    .await?,
                None,
            ),
            // The client's: a call still in flight may commit it later, and the client's
            // retry with it then gets that result.
            Settlement::Key {
                method,
                key,
                params_hash: Some(hash),
            } => (
                self.records.idempotency(user, method, key, now).await?,
                Some(hash),
            ),
        };
        let answer = stored_answer(stored, hash);
        if answer.is_ok() {
            tracing::info!(
                "cluster: an unanswered forward had committed; answering its stored result"
            );
        }
        answer
    }

    /// Sends the call to the event's owner and waits for its answer, until `deadline`.
    async fn forward(
        &self,
        event: EventId,
        user: UserId,
        method: &'static str,
        params: &Value,
        fresh_key: Option<&str>,
        deadline: Instant,
    ) -> Attempt {
        // A key made here is named in the token: the owner then does not look it up.
        let token = self.tokens.issue_forwarded(
            user,
            Role::Customer,
            self.clock.now(),
            TOKEN_TTL,
            fresh_key,
        );
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        loop {
            let address = match self.owner_of(event).await {
                Some((owner, _)) if owner == self.directory.node() => {
                    self.owners.remove(&event);
                    return Attempt::Local;
                }
                Some((_, address)) => Some(address),
                None => None,
            };
            if let Some(address) = address {
                let left = deadline.saturating_duration_since(Instant::now());
                let sent = self
                    .http
                    .post(format!("{address}{ROUTE}"))
                    .bearer_auth(&token)
                    .json(&body)
                    .timeout(left)
                    .send()
                    .await;
                match sent {
                    // Refused before anything ran (the token, or the call's shape).
                    Ok(response)
                        if matches!(
                            response.status(),
                            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::NOT_FOUND
                        ) =>
                    {
                        tracing::error!(%event, status = %response.status(), "cluster: the owner refused a forwarded call (are the servers' secrets or clocks apart?)");
                        return Attempt::Unreached;
                    }
                    Ok(response) => {
                        return match response.json::<Value>().await {
                            // Nothing ran there: look the owner up again.
                            Ok(answer) if answer["error"]["data"]["not_owner"] == true => {
                                tracing::debug!(%event, "cluster: not the owner any more; looking again");
                                self.owners.remove(&event);
                                if Instant::now() + RETRY_PAUSE >= deadline {
                                    return Attempt::Unreached;
                                }
                                tokio::time::sleep(RETRY_PAUSE).await;
                                continue;
                            }
                            Ok(answer) => Attempt::Answered(read_answer(answer)),
                            Err(error) => {
                                tracing::warn!(%event, %error, "cluster: the owner's answer was lost");
                                Attempt::Unanswered
                            }
                        };
                    }
                    // Nothing was sent: the owner is gone or not listening yet.
                    Err(error) if error.is_connect() => {
                        tracing::debug!(%event, %error, "cluster: owner unreachable; retrying");
                        self.owners.remove(&event);
                    }
                    Err(error) => {
                        tracing::warn!(%event, %error, "cluster: no answer from the event's owner");
                        return Attempt::Unanswered;
                    }
                }
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Attempt::Unreached;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// What a stored idempotency key answers for a call that carries it: its stored result; a
/// conflict if it is the client's key (`params_hash`) stored with other params;
/// `UNAVAILABLE` if nothing was stored, or only a settlement's mark (no result).
fn stored_answer(
    stored: Option<StoredIdempotency>,
    params_hash: Option<&String>,
) -> Result<String, EngineError> {
    match stored {
        Some(stored) if params_hash.is_some_and(|hash| stored.params_hash != *hash) => {
            Err(EngineError::IdempotencyConflict)
        }
        Some(stored) if !stored.response.is_empty() => Ok(stored.response),
        _ => Err(EngineError::Unavailable),
    }
}

/// A JSON-RPC response: its result, as text, or its error, passed on.
fn read_answer(mut answer: Value) -> Result<String, EngineError> {
    if let Some(result) = answer.get("result") {
        return Ok(result.to_string());
    }
    let error = answer["error"].take();
    match error["code"].as_i64() {
        Some(code) => Err(EngineError::Relayed {
            code,
            message: error["message"].as_str().unwrap_or("error").to_owned(),
            data: error.get("data").cloned(),
        }),
        None => Err(EngineError::Unavailable),
    }
}

/// The client's idempotency key, or a fresh one for the forward.
fn forward_key<T>(method: &'static str, key: &Option<KeyedCall<'_, T>>) -> Settlement {
    match key {
        Some(call) => Settlement::Key {
            method,
            key: call.key.as_str().to_owned(),
            params_hash: Some(call.params_hash.clone()),
        },
        None => Settlement::Key {
            method,
            key: format!("fwd-{}", uuid::Uuid::new_v4().simple()),
            params_hash: None,
        },
    }
}

fn render(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("serializable")
}

#[async_trait]
impl ReservationService for Routed {
    async fn reserve(
        &self,
        user: UserId,
        items: ReserveItems,
        key: Option<KeyedCall<'_, Reservation>>,
    ) -> Result<Answer<Reservation>, EngineError> {
        let mut params = json!({
            "items": items.as_slice().iter().map(|(id, quantity)| json!({
                "ticket_type_id": id.to_string(),
                "quantity": quantity.get(),
            })).collect::<Vec<_>>(),
        });
        let settlement = forward_key("tickets.reserve", &key);
        if let Settlement::Key { key, .. } = &settlement {
            params["idempotency_key"] = key.as_str().into();
        }
        self.route(user, "tickets.reserve", params, settlement, || {
            let key = key.clone();
            let items = items.clone();
            async move { self.engine.reserve(user, items, key).await }
        })
        .await
    }

    async fn get(&self, user: UserId, id: ReservationId) -> Result<Reservation, EngineError> {
        self.engine.get(user, id).await
    }

    async fn list(
        &self,
        user: UserId,
        status: Option<Status>,
        limit: usize,
    ) -> Result<Vec<Reservation>, EngineError> {
        ReservationService::list(self.engine.as_ref(), user, status, limit).await
    }

    async fn cancel(
        &self,
        user: UserId,
        id: ReservationId,
    ) -> Result<Answer<Reservation>, EngineError> {
        let params = json!({"reservation_id": id.to_string()});
        let settlement = Settlement::Cancel(id);
        self.route(
            user,
            "reservations.cancel",
            params,
            settlement,
            || async move { self.engine.cancel(user, id).await.map(Answer::Fresh) },
        )
        .await
    }

    async fn pay(
        &self,
        user: UserId,
        id: ReservationId,
        payment_token: &PaymentToken,
        key: Option<KeyedCall<'_, Paid>>,
    ) -> Result<Answer<Paid>, EngineError> {
        let mut params = json!({
            "reservation_id": id.to_string(),
            "payment_token": payment_token.as_str(),
        });
        let settlement = forward_key("payments.create", &key);
        if let Settlement::Key { key, .. } = &settlement {
            params["idempotency_key"] = key.as_str().into();
        }
        self.route(user, "payments.create", params, settlement, || {
            let key = key.clone();
            async move { self.engine.pay(user, id, payment_token, key).await }
        })
        .await
    }
}
