//! Params are objects all the way down (PROTOCOL §1): serde would read an array in place
//! of a struct positionally (`[["<id>", 1]]` as an item), so arrays are refused before
//! serde sees them, except as the value of the fields that are lists.

use serde_json::{Map, Value};

/// The only params that are lists; each of their entries is an object.
const LIST_FIELDS: [&str; 2] = ["items", "ticket_types"];

/// Where an array stands in place of an object or a plain value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayInPlace {
    /// As on the wire: `items[0]`, `ticket_types[1].price`.
    pub field: String,
    pub message: &'static str,
}

/// Checks an object's members (`prefix` is its own path, empty at the top).
pub fn objects_only(object: &Map<String, Value>, prefix: &str) -> Result<(), ArrayInPlace> {
    for (key, value) in object {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Array(entries) if LIST_FIELDS.contains(&key.as_str()) => {
                for (i, entry) in entries.iter().enumerate() {
                    let entry_path = format!("{path}[{i}]");
                    match entry {
                        Value::Object(inner) => objects_only(inner, &entry_path)?,
                        Value::Array(_) => {
                            return Err(ArrayInPlace {
                                field: entry_path,
                                message: "expected an object, not an array",
                            })
                        }
                        // Any other wrong type is named by serde.
                        _ => {}
                    }
                }
            }
            Value::Array(_) => {
                return Err(ArrayInPlace {
                    field: path,
                    message: "an array is not accepted here",
                })
            }
            Value::Object(inner) => objects_only(inner, &path)?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(params: Value) -> Result<(), String> {
        objects_only(params.as_object().unwrap(), "").map_err(|e| e.field)
    }

    #[test]
    fn an_array_in_place_of_an_object_is_named() {
        assert_eq!(check(json!({"items": [["tt", 1]]})), Err("items[0]".into()));
        assert_eq!(
            check(json!({"items": [{"ticket_type_id": "a", "quantity": 1}, ["b", 2]]})),
            Err("items[1]".into())
        );
        assert_eq!(
            check(json!({"ticket_types": [{"name": "a", "price": [100, "EUR"]}]})),
            Err("ticket_types[0].price".into())
        );
        assert_eq!(
            check(json!({"ticket_types": [{"rule": ["any"]}]})),
            Err("ticket_types[0].rule".into())
        );
        assert_eq!(check(json!({"email": []})), Err("email".into()));
    }

    #[test]
    fn lists_of_objects_and_plain_values_pass() {
        assert_eq!(
            check(
                json!({"items": [{"ticket_type_id": "a", "quantity": 1}], "idempotency_key": "k"})
            ),
            Ok(())
        );
        assert_eq!(
            check(
                json!({"name": "x", "ticket_types": [{"price": {"amount": 1, "currency": "EUR"}, "rule": {"kind": "any"}}]})
            ),
            Ok(())
        );
    }
}
