//! Authentication: Argon2id password hashes, HS256 JWTs, and the accounts service over them.

pub mod accounts;
pub mod password;
pub mod token;

pub use accounts::{AccountError, AccountService, Accounts, SignedIn};
pub use password::Passwords;
pub use token::{Claims, TokenError, Tokens};

/// Why the credentials of a call are not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
    Expired,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::Expired => "expired",
        }
    }
}
