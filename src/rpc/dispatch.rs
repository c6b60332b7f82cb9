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

use super::context::Ctx;
use super::error::RpcError;
use super::wire::{self, Call, Id, Response};

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
        let now = ctx.services.clock.now();
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
                ctx.services
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
                    Ok(()) => {
                        let _running = ctx.services.metrics.call_started(name);
                        AssertUnwindSafe(handler(ctx.clone(), params))
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|panic| Err(RpcError::Internal(panic_message(&panic))))
                    }
                };
                (name, outcome)
            }
        };
        let elapsed = started.elapsed();
        match &outcome {
            Ok(_) => ctx.services.metrics.record_call(label, "ok", Some(elapsed)),
            Err(error) => {
                ctx.services
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
    let tasks = ctx.services.tasks.clone();
    // Queue for the lock before spawning, so arrival order is kept.
    let turn = match in_order {
        Some(lock) => Some(lock.lock_owned().await),
        None => None,
    };
    let call = tasks.spawn(async move {
        let response = ctx.handle_message(&text).await;
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::core::{Role, User, UserId};
    use crate::rpc::fakes;
    use crate::rpc::session::Principal;

    #[derive(Debug, serde::Deserialize)]
    struct Echo {
        word: String,
    }

    /// The real methods, plus a few that show what the dispatch does with a result, a
    /// panic and typed params.
    fn table() -> Methods {
        let mut methods = crate::rpc::methods::all();
        methods.register("test.echo", Access::Public, |_, p: Echo| async move {
            Ok::<_, RpcError>(p.word)
        });
        methods.register(
            "test.panic",
            Access::Public,
            |_, _: Map<String, Value>| async {
                if true {
                    panic!("a bug");
                }
                Ok::<bool, RpcError>(true)
            },
        );
        methods.register("test.user_echo", Access::User, |_, p: Echo| async move {
            Ok::<_, RpcError>(p.word)
        });
        methods
    }

    async fn run(ctx: &Ctx, text: &str) -> Option<Value> {
        ctx.handle_message(text)
            .await
            .map(|out| serde_json::from_str(&out).unwrap())
    }

    fn anonymous() -> Ctx {
        fakes::http_ctx(&fakes::services(table()))
    }

    fn error_of(response: &Value) -> (i64, &str) {
        (
            response["error"]["code"].as_i64().unwrap(),
            response["error"]["data"]["reason"].as_str().unwrap_or(""),
        )
    }

    #[tokio::test]
    async fn text_that_is_not_json_is_a_parse_error_with_a_null_id() {
        let response = run(&anonymous(), "{\"jsonrpc\": ").await.unwrap();
        assert_eq!(response["error"]["code"], -32700);
        assert_eq!(response["id"], Value::Null);
    }

    #[tokio::test]
    async fn a_call_is_answered_with_its_id_and_result() {
        let text = r#"{"jsonrpc":"2.0","id":"a1","method":"test.echo","params":{"word":"hi"}}"#;
        let response = run(&anonymous(), text).await.unwrap();
        assert_eq!(
            response,
            json!({"jsonrpc": "2.0", "result": "hi", "id": "a1"})
        );
    }

    #[tokio::test]
    async fn a_notification_gets_no_answer() {
        let text = r#"{"jsonrpc":"2.0","method":"test.echo","params":{"word":"hi"}}"#;
        assert_eq!(run(&anonymous(), text).await, None);
        let batch = format!("[{text},{text}]");
        assert_eq!(run(&anonymous(), &batch).await, None);
    }

    #[tokio::test]
    async fn a_batch_answers_each_call_in_order_and_skips_notifications() {
        let text = r#"[
            {"jsonrpc":"2.0","id":1,"method":"test.echo","params":{"word":"one"}},
            {"jsonrpc":"2.0","method":"test.echo","params":{"word":"skipped"}},
            {"jsonrpc":"2.0","id":3,"method":"no.such.method"}
        ]"#;
        let response = run(&anonymous(), text).await.unwrap();
        let answers = response.as_array().unwrap();
        assert_eq!(answers.len(), 2);
        assert_eq!(
            (answers[0]["id"].clone(), answers[0]["result"].clone()),
            (json!(1), json!("one"))
        );
        assert_eq!(answers[1]["id"], 3);
        assert_eq!(answers[1]["error"]["code"], -32601);
    }

    #[tokio::test]
    async fn an_empty_or_too_large_batch_is_one_invalid_request() {
        let call = r#"{"jsonrpc":"2.0","id":1,"method":"test.echo","params":{"word":"x"}}"#;
        for text in ["[]".to_owned(), format!("[{call},{call},{call},{call}]")] {
            let response = run(&anonymous(), &text).await.unwrap();
            assert_eq!(response["error"]["code"], -32600, "{text}");
            assert_eq!(response["id"], Value::Null);
        }
    }

    #[tokio::test]
    async fn a_malformed_entry_of_a_batch_does_not_stop_the_others() {
        let text = r#"[1, {"jsonrpc":"2.0","id":2,"method":"test.echo","params":{"word":"ok"}}]"#;
        let response = run(&anonymous(), text).await.unwrap();
        assert_eq!(response[0]["error"]["code"], -32600);
        assert_eq!(response[1]["result"], "ok");
    }

    #[tokio::test]
    async fn params_are_read_into_their_type_naming_the_field() {
        let text = r#"{"jsonrpc":"2.0","id":1,"method":"test.echo","params":{"word":7}}"#;
        let response = run(&anonymous(), text).await.unwrap();
        assert_eq!(error_of(&response), (-32602, "INVALID_PARAMS"));
        assert_eq!(response["error"]["data"]["field"], "word");
    }

    #[tokio::test]
    async fn access_is_checked_before_params() {
        let ctx = anonymous();
        let text = r#"{"jsonrpc":"2.0","id":1,"method":"test.user_echo","params":{"nonsense":1}}"#;
        assert_eq!(
            error_of(&run(&ctx, text).await.unwrap()),
            (1001, "UNAUTHENTICATED")
        );
        // A customer learns nothing about the params of an admin method either.
        ctx.session.bind(Principal {
            user: User {
                id: UserId::new(),
                email: "ann@example.com".into(),
                role: Role::Customer,
            },
            expires_at: ctx
                .services
                .clock
                .now()
                .saturating_add(std::time::Duration::from_secs(60)),
            fresh_key: None,
        });
        let text = r#"{"jsonrpc":"2.0","id":2,"method":"admin.events.create","params":{}}"#;
        assert_eq!(
            error_of(&run(&ctx, text).await.unwrap()),
            (1003, "FORBIDDEN")
        );
        // Over /rpc, a method that needs a push channel says so before reading its params.
        let text = r#"{"jsonrpc":"2.0","id":3,"method":"pool.subscribe","params":{}}"#;
        assert_eq!(
            error_of(&run(&ctx, text).await.unwrap()),
            (4003, "TRANSPORT_UNSUPPORTED")
        );
    }

    #[tokio::test]
    async fn a_panic_in_a_method_is_an_opaque_internal_error() {
        let text = r#"{"jsonrpc":"2.0","id":9,"method":"test.panic"}"#;
        let response = run(&anonymous(), text).await.unwrap();
        assert_eq!(response["error"]["code"], -32603);
        assert_eq!(response["error"]["message"], "Internal error");
        assert_eq!(response["id"], 9);
        assert!(response["error"].get("data").is_none(), "no cause is sent");
    }

    #[tokio::test]
    async fn the_services_answer_through_the_one_error_mapping() {
        let ctx = anonymous();
        let text = r#"{"jsonrpc":"2.0","id":1,"method":"auth.login","params":{"email":"a@b.c","password":"x"}}"#;
        assert_eq!(
            error_of(&run(&ctx, text).await.unwrap()),
            (1002, "INVALID_CREDENTIALS")
        );
        let text = r#"{"jsonrpc":"2.0","id":2,"method":"rpc.discover"}"#;
        assert_eq!(run(&ctx, text).await.unwrap()["result"]["openrpc"], "1.3.2");
    }
}
