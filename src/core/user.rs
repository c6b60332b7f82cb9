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

/// Trims and lower-cases an email and checks its shape: one `@` with something on each
/// side, no spaces or control characters, at most 254 characters. Whether it receives mail
/// is not this server's business.
pub fn normalize_email(email: &str) -> Option<String> {
    let email = email.trim().to_lowercase();
    if email.chars().count() > MAX_EMAIL_CHARS
        || email.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return None;
    }
    let (local, domain) = email.split_once('@')?;
    (!local.is_empty() && !domain.is_empty() && !domain.contains('@')).then_some(email)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            normalize_email("  Ann@Example.COM ").as_deref(),
            Some("ann@example.com")
        );
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in ["", "ann", "@example.com", "ann@", "a@b@c", "a b@c.d"] {
            assert_eq!(normalize_email(bad), None, "{bad}");
        }
    }
}
