//! Strings a client chooses and the server keeps or passes on: idempotency keys and
//! payment tokens. Each is 1 to 200 characters, checked once when it is read.

/// Longest idempotency key or payment token accepted.
pub const MAX_KEY_CHARS: usize = 200;

/// Why a client-chosen string is not acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("1 to {MAX_KEY_CHARS} characters")]
pub struct BadLength;

fn checked(text: String) -> Result<String, BadLength> {
    if text.is_empty() || text.chars().count() > MAX_KEY_CHARS {
        return Err(BadLength);
    }
    Ok(text)
}

/// An idempotency key (PROTOCOL §5): scoped to its user and method.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: String) -> Result<Self, BadLength> {
        checked(text).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A payment token, handed to the payment provider as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentToken(String);

impl PaymentToken {
    pub fn parse(text: String) -> Result<Self, BadLength> {
        checked(text).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_tokens_have_1_to_200_characters() {
        assert_eq!(IdempotencyKey::parse(String::new()), Err(BadLength));
        assert!(IdempotencyKey::parse("é".repeat(200)).is_ok());
        assert_eq!(PaymentToken::parse("x".repeat(201)), Err(BadLength));
        assert_eq!(
            PaymentToken::parse("tok_ok".into()).unwrap().as_str(),
            "tok_ok"
        );
    }
}
