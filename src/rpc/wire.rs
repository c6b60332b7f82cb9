//! JSON-RPC 2.0 wire types: what a request is, and how responses and notifications are written.
//! Parsing is explicit rather than derived so every malformed shape maps to the exact error the
//! specification names, with the id echoed whenever it could be read.

use serde::Serialize;
use serde_json::{Map, Value};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// A request id: a string, a number or null, echoed verbatim.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Id(Value);

impl Id {
    pub const NULL: Id = Id(Value::Null);
}

/// One well-formed call. `id` is `None` for a notification (no response is owed).
#[derive(Debug)]
pub struct Call {
    pub id: Option<Id>,
    pub method: String,
    /// The params object; an absent `params` member is an empty object.
    pub params: Map<String, Value>,
}

/// Why one entry of a message is not a call we can dispatch.
#[derive(Debug)]
pub struct Malformed {
    pub id: Id,
    pub code: i64,
    pub message: &'static str,
}

/// Reads one entry of a message (a single request or one element of a batch).
pub fn parse_call(value: Value) -> Result<Call, Malformed> {
    let Value::Object(mut object) = value else {
        return Err(invalid_request(Id::NULL));
    };
    let id = match object.remove("id") {
        None => None,
        Some(value @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(Id(value)),
        Some(_) => return Err(invalid_request(Id::NULL)),
    };
    let echo = id.clone().unwrap_or(Id::NULL);
    if object.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(invalid_request(echo));
    }
    let Some(Value::String(method)) = object.remove("method") else {
        return Err(invalid_request(echo));
    };
    let params = match object.remove("params") {
        None => Map::new(),
        Some(Value::Object(params)) => params,
        // Widely used clients send `[]` for a call without params (PROTOCOL §1).
        Some(Value::Array(entries)) if entries.is_empty() => Map::new(),
        Some(Value::Array(_)) => {
            return Err(Malformed {
                id: echo,
                code: INVALID_PARAMS,
                message: "params must be given by name (an object)",
            })
        }
        Some(_) => return Err(invalid_request(echo)),
    };
    Ok(Call { id, method, params })
}

fn invalid_request(id: Id) -> Malformed {
    Malformed {
        id,
        code: INVALID_REQUEST,
        message: "Invalid Request",
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorObject {
    pub code: i64,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// A response to one call.
#[derive(Debug, Serialize)]
pub struct Response {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorObject>,
    id: Id,
}

impl Response {
    pub fn success(id: Id, result: Value) -> Self {
        Self {
            jsonrpc: "2.0",
            result: Some(result),
            error: None,
            id,
        }
    }

    pub fn failure(id: Id, error: ErrorObject) -> Self {
        Self {
            jsonrpc: "2.0",
            result: None,
            error: Some(error),
            id,
        }
    }
}

impl From<Malformed> for Response {
    fn from(m: Malformed) -> Self {
        let data = (m.code == INVALID_PARAMS)
            .then(|| serde_json::json!({"reason": "INVALID_PARAMS", "field": "params"}));
        Response::failure(
            m.id,
            ErrorObject {
                code: m.code,
                message: m.message.to_owned(),
                data,
            },
        )
    }
}

/// The one-line answer to a message that is not JSON at all.
pub fn parse_error() -> Response {
    Response::failure(
        Id::NULL,
        ErrorObject {
            code: PARSE_ERROR,
            message: "Parse error".to_owned(),
            data: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_request_without_id_is_a_notification() {
        let call = parse_call(json!({"jsonrpc": "2.0", "method": "events.list"})).unwrap();
        assert!(call.id.is_none());
        assert!(call.params.is_empty());
    }

    #[test]
    fn ids_of_every_allowed_type_are_kept_verbatim() {
        for id in [json!("abc"), json!(7), json!(1.5), json!(null)] {
            let call = parse_call(json!({"jsonrpc": "2.0", "id": id, "method": "m"})).unwrap();
            assert_eq!(call.id, Some(Id(id)));
        }
    }

    #[test]
    fn wrong_shapes_are_invalid_requests() {
        for bad in [
            json!(1),
            json!({"jsonrpc": "1.0", "id": 1, "method": "m"}),
            json!({"jsonrpc": "2.0", "id": 1}),
            json!({"jsonrpc": "2.0", "id": 1, "method": 5}),
            json!({"jsonrpc": "2.0", "id": {}, "method": "m"}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "m", "params": "x"}),
        ] {
            assert_eq!(
                parse_call(bad.clone()).unwrap_err().code,
                INVALID_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn empty_array_params_are_no_params() {
        let call =
            parse_call(json!({"jsonrpc": "2.0", "id": 3, "method": "m", "params": []})).unwrap();
        assert!(call.params.is_empty());
    }

    #[test]
    fn params_by_position_are_invalid_params() {
        let err = parse_call(json!({"jsonrpc": "2.0", "id": 3, "method": "m", "params": [1]}))
            .unwrap_err();
        assert_eq!((err.code, err.id), (INVALID_PARAMS, Id(json!(3))));
    }
}
