//! One method table and one dispatch: every transport hands a message's text here and
//! writes back what comes out. Batches, notifications, limits, panics and metrics are
//! handled once, in this file.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::RpcError;
use super::session::Session;
use super::wire::{self, Call, Id, Response};
use crate::app::App;

/// What a method runs with: the application and the caller's session.
#[derive(Clone)]
pub struct Ctx {
    pub app: Arc<App>,
    pub session: Arc<Session>,
}

type MethodFuture = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send>>;
type Handler = Box<dyn Fn(Ctx, Map<String, Value>) -> MethodFuture + Send + Sync>;

/// Who may call a method. Checked before the params are read, so a caller who may not
/// call it learns nothing from validation errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// A logged-in user.
    User,
    /// A logged-in admin.
    Admin,
    /// A connection the server can push to (WebSocket or long-poll).
    Push,
}

impl Access {
    fn check(self, ctx: &Ctx) -> Result<(), RpcError> {
        let now = ctx.app.clock.now();
        match self {
            Access::Public => Ok(()),
            Access::User => ctx.session.principal(now).map(drop),
            Access::Admin => ctx.session.admin(now).map(drop),
            Access::Push if ctx.session.transport.can_push() => Ok(()),
            Access::Push => Err(RpcError::TransportUnsupported),
        }
    }
}

/// The method table. Each domain module registers its methods into it.
#[derive(Default)]
pub struct Methods {
    table: HashMap<&'static str, Handler>,
}

impl Methods {
    /// Registers `name`, callable as `access` allows; its params are deserialized into `P`
    /// (errors name the field), and its result serialized from `R`.
    pub fn register<P, R, F, Fut>(&mut self, name: &'static str, access: Access, method: F)
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
    {
        let method = Arc::new(method);
        let handler: Handler = Box::new(move |ctx, params| {
            let method = Arc::clone(&method);
            Box::pin(async move {
                access.check(&ctx)?;
                let params = parse_params::<P>(params)?;
                let result = method(ctx, params).await?;
                serde_json::to_value(result).map_err(RpcError::internal)
            })
        });
        let previous = self.table.insert(name, handler);
        assert!(previous.is_none(), "method {name} registered twice");
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.table.keys().copied()
    }

    fn get(&self, name: &str) -> Option<(&'static str, &Handler)> {
        self.table.get_key_value(name).map(|(k, v)| (*k, v))
    }
}

/// Deserializes params, naming the offending field (`items[0].quantity`) on failure.
fn parse_params<P: DeserializeOwned>(params: Map<String, Value>) -> Result<P, RpcError> {
    super::shape::objects_only(&params, "")
        .map_err(|e| RpcError::invalid_params(e.field, e.message))?;
    serde_path_to_error::deserialize(Value::Object(params)).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        let field = match missing_field(&message) {
            Some(name) if path == "." => name.to_owned(),
            Some(name) => format!("{path}.{name}"),
            None if path == "." => "params".to_owned(),
            None => path,
        };
        RpcError::InvalidParams { field, message }
    })
}

/// serde reports a missing field at its parent's path, with the name only in the message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Limits on what one message may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch: usize,
}

/// Runs messages against the method table.
pub struct Dispatcher {
    methods: Methods,
    limits: Limits,
}

impl Dispatcher {
    pub fn new(methods: Methods, limits: Limits) -> Self {
        Self { methods, limits }
    }

    pub fn method_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.methods.names()
    }

    /// Handles one message (a call or a batch) and returns the text owed to the client,
    /// or `None` when nothing is owed (notifications only).
    pub async fn handle_message(&self, ctx: &Ctx, text: &str) -> Option<String> {
        let message: Value = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(_) => return Some(encode(&wire::parse_error())),
        };
        match message {
            Value::Array(entries)
                if entries.is_empty() || entries.len() > self.limits.max_batch =>
            {
                Some(encode(&Response::from(wire::Malformed {
                    id: Id::NULL,
                    code: wire::INVALID_REQUEST,
                    message: if entries.is_empty() {
                        "Invalid Request: empty batch"
                    } else {
                        "Invalid Request: batch too large"
                    },
                })))
            }
            Value::Array(entries) => {
                let mut responses = Vec::new();
                for entry in entries {
                    if let Some(response) = self.handle_entry(ctx, entry).await {
                        responses.push(response);
                    }
                }
                (!responses.is_empty()).then(|| encode(&responses))
            }
            single => self
                .handle_entry(ctx, single)
                .await
                .map(|response| encode(&response)),
        }
    }

    async fn handle_entry(&self, ctx: &Ctx, entry: Value) -> Option<Response> {
        let call = match wire::parse_call(entry) {
            Ok(call) => call,
            Err(malformed) => {
                ctx.app
                    .metrics
                    .record_call("invalid", "invalid_request", None);
                return Some(malformed.into());
            }
        };
        let Call { id, method, params } = call;
        let started = Instant::now();
        let (label, outcome) = match self.methods.get(&method) {
            None => ("unknown", Err(RpcError::MethodNotFound)),
            Some((name, handler)) => {
                let outcome = match ctx.session.take_call() {
                    Err(limited) => Err(limited),
                    Ok(()) => AssertUnwindSafe(handler(ctx.clone(), params))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|panic| Err(RpcError::Internal(panic_message(&panic)))),
                };
                (name, outcome)
            }
        };
        let elapsed = started.elapsed();
        match &outcome {
            Ok(_) => ctx.app.metrics.record_call(label, "ok", Some(elapsed)),
            Err(error) => {
                ctx.app
                    .metrics
                    .record_call(label, error.reason(), Some(elapsed));
                log_failure(ctx, &method, error);
            }
        }
        let id = id?;
        Some(match outcome {
            Ok(result) => Response::success(id, result),
            Err(error) => Response::failure(id, error.to_error_object()),
        })
    }
}

/// Runs a message in a task of its own and waits for it. Transports whose caller may go
/// away mid-call (an HTTP client that disconnects) use this: dropping the wait does not
/// cancel the call, so a change that has begun is always completed or undone. The task is
/// tracked, so shutdown waits for it. With `in_order`, the task runs only while holding
/// that lock, so the calls of one session run one at a time, in arrival order, even when
/// their callers give up.
pub async fn handle_detached(
    ctx: Ctx,
    text: String,
    in_order: Option<Arc<tokio::sync::Mutex<()>>>,
) -> Option<String> {
    let tasks = ctx.app.tasks.clone();
    // Queue for the lock before spawning, so arrival order is kept.
    let turn = match in_order {
        Some(lock) => Some(lock.lock_owned().await),
        None => None,
    };
    let call = tasks.spawn(async move {
        let response = ctx.app.dispatcher.handle_message(&ctx, &text).await;
        drop(turn);
        response
    });
    call.await.unwrap_or_else(|error| {
        tracing::error!(%error, "a detached call did not finish");
        let internal = RpcError::Internal(error.to_string()).to_error_object();
        Some(encode(&Response::failure(Id::NULL, internal)))
    })
}

fn log_failure(ctx: &Ctx, method: &str, error: &RpcError) {
    let session = ctx.session.id;
    let transport = ctx.session.transport.as_str();
    // The method name is client input: cut it so a log line stays a line.
    let method: String = method.chars().take(64).collect();
    match error {
        RpcError::Internal(cause) => {
            tracing::error!(
                session,
                transport,
                method,
                cause,
                "call failed with an internal error"
            )
        }
        other => tracing::info!(
            session,
            transport,
            method,
            reason = other.reason(),
            "call failed"
        ),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    format!("panic: {text}")
}

fn encode<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("responses always serialize")
}
