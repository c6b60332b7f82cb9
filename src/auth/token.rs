//! JWTs (HS256 only): `sub` = user id, `role`, `iat`, `exp`.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::core::{Role, Timestamp, UserId};

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub iat: i64,
    pub exp: i64,
}

/// Why a token is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token invalid")]
    Invalid,
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user_id: UserId,
    pub role: Role,
    pub expires_at: Timestamp,
}

/// Issues and verifies tokens with one secret.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        // Only HS256 is accepted: `alg: none` or any other algorithm is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// A token for the user, valid from `now` for the configured time.
    pub fn issue(&self, user_id: UserId, role: Role, now: Timestamp) -> (String, Timestamp) {
        self.issue_for(user_id, role, now, self.ttl)
    }

    /// A token for the user, valid from `now` for `ttl`.
    pub fn issue_for(
        &self,
        user_id: UserId,
        role: Role,
        now: Timestamp,
        ttl: Duration,
    ) -> (String, Timestamp) {
        let expires_at = now.saturating_add(ttl);
        let claims = Claims {
            sub: user_id.to_string(),
            role: role.as_str().to_owned(),
            iat: now.as_millis() / 1000,
            exp: expires_at.as_millis() / 1000,
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail");
        (token, Timestamp::from_millis(claims.exp * 1000))
    }

    /// Checks signature, algorithm and expiry (against `now`, not the system clock).
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<Verified, TokenError> {
        let mut validation = self.validation.clone();
        // Expiry is checked below against the injected clock.
        validation.validate_exp = false;
        let data =
            decode::<Claims>(token, &self.decoding, &validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        let claims = data.claims;
        let expires_at = Timestamp::from_millis(claims.exp.saturating_mul(1000));
        if expires_at <= now {
            return Err(TokenError::Expired);
        }
        let user_id = claims.sub.parse().map_err(|_| TokenError::Invalid)?;
        let role = Role::parse(&claims.role).ok_or(TokenError::Invalid)?;
        Ok(Verified {
            user_id,
            role,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    fn tokens(secret: &str) -> Tokens {
        Tokens::new(secret.as_bytes(), Duration::from_secs(86_400))
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let t = tokens("s3cret-s3cret-s3cret-s3cret-s3cret");
        let user = UserId::new();
        let (token, expires_at) = t.issue(user, Role::Admin, NOW);
        let verified = t.verify(&token, NOW).unwrap();
        assert_eq!((verified.user_id, verified.role), (user, Role::Admin));
        assert_eq!(t.verify(&token, expires_at), Err(TokenError::Expired));
    }

    #[test]
    fn another_secret_is_refused() {
        let (token, _) =
            tokens("one-secret-one-secret-one-secret!").issue(UserId::new(), Role::Customer, NOW);
        assert_eq!(
            tokens("another-secret-another-secret-xx").verify(&token, NOW),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn alg_none_is_refused() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as b64;
        use base64::Engine as _;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(
            format!(
                r#"{{"sub":"{}","role":"admin","iat":0,"exp":9999999999}}"#,
                UserId::new()
            )
            .as_bytes(),
        );
        let token = format!("{header}.{body}.");
        assert_eq!(
            tokens("x".repeat(32).as_str()).verify(&token, NOW),
            Err(TokenError::Invalid)
        );
    }
}
