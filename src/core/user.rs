//! Users and their roles.

use super::ids::UserId;

/// What a user may do: customers buy tickets; admins also create events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Customer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "customer" => Some(Role::Customer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A registered user, without the password hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    /// Trimmed and lower-cased, so one address has one account.
    pub email: String,
    pub role: Role,
}

/// The longest email address (RFC 5321).
pub const MAX_EMAIL_CHARS: usize = 254;

/// An email address in its one normal form: trimmed and lower-cased, one `@` with
/// something on each side, no spaces or control characters, at most 254 characters.
/// Whether it receives mail is not this server's business.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    /// The normal form of `text`, or `None` when it is not an email address.
    pub fn parse(text: &str) -> Option<Email> {
        let email = text.trim().to_lowercase();
        if email.chars().count() > MAX_EMAIL_CHARS
            || email.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return None;
        }
        let (local, domain) = email.split_once('@')?;
        (!local.is_empty() && !domain.is_empty() && !domain.contains('@')).then_some(Email(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Email> for String {
    fn from(email: Email) -> String {
        email.0
    }
}

/// The shortest password a new account may have.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Hashing cost grows with length; nobody needs a longer password.
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// A password of an acceptable length (never logged: `Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

/// Why a password is not acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("at least {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    #[error("at most {MAX_PASSWORD_CHARS} characters")]
    TooLong,
}

impl Password {
    /// A password for a new account: 8 to 1,024 characters.
    pub fn for_new_account(text: String) -> Result<Password, PasswordError> {
        if text.chars().count() < MIN_PASSWORD_CHARS {
            return Err(PasswordError::TooShort);
        }
        Self::presented(text)
    }

    /// A password presented at login: any length up to 1,024 characters (an older,
    /// shorter rule may have let it in, and a wrong one is simply wrong).
    pub fn presented(text: String) -> Result<Password, PasswordError> {
        if text.chars().count() > MAX_PASSWORD_CHARS {
            return Err(PasswordError::TooLong);
        }
        Ok(Password(text))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            Email::parse("  Ann@Example.COM ")
                .as_ref()
                .map(Email::as_str),
            Some("ann@example.com")
        );
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in ["", "ann", "@example.com", "ann@", "a@b@c", "a b@c.d"] {
            assert_eq!(Email::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_new_password_has_8_to_1024_characters() {
        assert_eq!(
            Password::for_new_account("short".into()),
            Err(PasswordError::TooShort)
        );
        assert!(Password::for_new_account("eight ch".into()).is_ok());
        assert_eq!(
            Password::presented("x".repeat(1025)),
            Err(PasswordError::TooLong)
        );
        assert!(Password::presented(String::new()).is_ok());
    }
}
