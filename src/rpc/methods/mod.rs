//! The methods of the contract, one module per domain area, all registered into one table.

pub mod auth;
mod catalog;
mod discover;
mod pool;
mod reservations;

use super::dispatch::Methods;

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
