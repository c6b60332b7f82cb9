//! Calls reach the event's owner from any server. [`Routed`] stands where the engine stands
//! for the method table: a call for an event owned here runs on the local engine; one for
//! an event owned elsewhere goes, as a JSON-RPC call on behalf of the same user, to the
//! owner's `POST /cluster/rpc`, which runs it on its own engine only (never forwarding
//! again), and the owner's answer, result or error, is passed on as it is.
//!
//! Within [`DEADLINE`] a call follows the owner: no owner yet (a takeover under way), an
//! owner that does not answer the connection (it died; its lease is lapsing), or this
//! server becoming the owner are waited out and tried again. Sending is never repeated
//! once the request may have reached the owner.
//!
//! A forwarded `tickets.reserve` or `payments.create` always carries an idempotency key:
//! the client's, or one made here (`fwd-<uuid>`). So when the owner's answer does not come
//! (it died or stalled after the request left), the database says whether the call
//! committed: if the key is stored, the call succeeded and its stored result is the
//! answer; if not, the answer is `UNAVAILABLE`. One case stays open: an owner that stalls
//! *during* its commit and is not taken over meanwhile may still commit after that
//! `UNAVAILABLE`; the reservation then holds its tickets until it expires, and nothing is
//! counted twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
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

/// How long a call may spend reaching the owner: within PROTOCOL §10's 5 s.
pub const DEADLINE: Duration = Duration::from_secs(4);
/// The pause before looking for the owner again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

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
}

/// Where one attempt ended.
enum Attempt {
    Answered(Result<String, EngineError>),
    /// The request may have reached the owner, and no answer came.
    Unanswered,
    /// This server owns the event now: run the call here.
    Local,
}

/// The idempotency key a forwarded call carries, to find its outcome when unanswered.
struct ForwardKey {
    method: &'static str,
    key: String,
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
        }
    }

    /// Runs `local` here while this server owns the event, else forwards `method` with
    /// `params` to the owner, until [`DEADLINE`].
    async fn route<T, F, Fut>(
        &self,
        user: UserId,
        method: &'static str,
        params: Value,
        key: Option<ForwardKey>,
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
                self.forward(event, user, method, &params, deadline),
            )
            .await
            .unwrap_or(Attempt::Unanswered);
            let attempt = match forwarded {
                Attempt::Unanswered => Attempt::Answered(self.settle(user, key.as_ref()).await),
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
                Attempt::Local | Attempt::Unanswered => return Err(EngineError::Unavailable),
            }
        }
    }

    /// The outcome of a forward that got no answer, from its key in the database.
    async fn settle(&self, user: UserId, key: Option<&ForwardKey>) -> Result<String, EngineError> {
        let Some(key) = key else {
            return Err(EngineError::Unavailable);
        };
        let stored = self
            .records
            .idempotency(user, key.method, &key.key, self.clock.now())
            .await;
        match stored {
            Ok(Some(stored)) => {
                tracing::info!(
                    method = key.method,
                    "cluster: unanswered forward had committed; answering its stored result"
                );
                Ok(stored.response)
            }
            Ok(None) => Err(EngineError::Unavailable),
            Err(error) => Err(error.into()),
        }
    }

    /// Sends the call to the event's owner and waits for its answer, until `deadline`.
    async fn forward(
        &self,
        event: EventId,
        user: UserId,
        method: &'static str,
        params: &Value,
        deadline: Instant,
    ) -> Attempt {
        let (token, _) = self.tokens.issue(user, Role::Customer, self.clock.now());
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        loop {
            let address = match self.directory.owner(event).await {
                Ok(Some(owner)) if owner == self.directory.node() => return Attempt::Local,
                Ok(Some(owner)) => self.directory.address(&owner).await.ok().flatten(),
                Ok(None) | Err(_) => None,
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
                    Ok(response) => {
                        return match response.json::<Value>().await {
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
                    }
                    Err(error) => {
                        tracing::warn!(%event, %error, "cluster: no answer from the event's owner");
                        return Attempt::Unanswered;
                    }
                }
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Attempt::Answered(Err(EngineError::Unavailable));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
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
fn forward_key<T>(method: &'static str, key: &Option<KeyedCall<'_, T>>) -> ForwardKey {
    ForwardKey {
        method,
        key: key.as_ref().map_or_else(
            || format!("fwd-{}", uuid::Uuid::new_v4().simple()),
            |k| k.key.as_str().to_owned(),
        ),
    }
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
        let forward = forward_key("tickets.reserve", &key);
        params["idempotency_key"] = forward.key.as_str().into();
        self.route(user, "tickets.reserve", params, Some(forward), || {
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
        self.route(user, "reservations.cancel", params, None, || async move {
            self.engine.cancel(user, id).await.map(Answer::Fresh)
        })
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
        let forward = forward_key("payments.create", &key);
        params["idempotency_key"] = forward.key.as_str().into();
        self.route(user, "payments.create", params, Some(forward), || {
            let key = key.clone();
            async move { self.engine.pay(user, id, payment_token, key).await }
        })
        .await
    }
}
