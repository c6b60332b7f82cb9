//! Authentication: Argon2id password hashes and HS256 JWTs.

pub mod password;
pub mod token;

pub use password::Passwords;
pub use token::{Claims, TokenError, Tokens};
