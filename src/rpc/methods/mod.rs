//! The methods of the contract, one module per domain area, all registered into one table.

pub mod auth;
mod catalog;
mod discover;
mod pool;
mod reservations;

use super::dispatch::Methods;
use super::RpcError;

/// The method table with every implemented method.
pub fn all() -> Methods {
    let mut methods = Methods::default();
    auth::register(&mut methods);
    catalog::register(&mut methods);
    discover::register(&mut methods);
    pool::register(&mut methods);
    reservations::register(&mut methods);
    methods
}

/// Params of methods that take none; anything given is ignored.
#[derive(Debug, serde::Deserialize)]
struct NoParams {}

/// Reads an id from a param. A string that is not an id we could have issued names
/// nothing that exists, so it answers `NOT_FOUND` exactly as an unknown id does.
fn parse_id<T: std::str::FromStr>(text: &str) -> Result<T, RpcError> {
    text.parse().map_err(|_| RpcError::NotFound)
}
