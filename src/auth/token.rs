//! JWTs (HS256 only): `sub` = user id, `role`, `iat`, `exp`; and, only on the tokens a
//! cluster server signs for a call it forwards to another, `aud` = [`FORWARD_AUDIENCE`].

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// A forwarded call's only: the idempotency key the forwarding server made for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Claims {
    /// A client's token: for `user_id` as `role`, from `now` for `ttl`.
    fn new(user_id: UserId, role: Role, now: Timestamp, ttl: Duration) -> Self {
        Self {
            sub: user_id.to_string(),
            role: role.as_str().to_owned(),
            iat: now.as_millis() / 1000,
            exp: now.saturating_add(ttl).as_millis() / 1000,
            aud: None,
            key: None,
        }
    }
}

/// The audience of a forwarded call's token. Such a token is accepted by `/cluster/rpc`
/// alone, and there without reading the user from the database: the forwarding server
/// has just checked the client's own token. A client's token (no audience) is refused
/// there, and a forwarded one everywhere else.
pub const FORWARD_AUDIENCE: &str = "ticket-api-forward";

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
    /// A forwarded call's only: the idempotency key the forwarding server made for it, so
    /// fresh that no earlier call can have stored it.
    pub fresh_key: Option<String>,
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
        self.sign(&Claims::new(user_id, role, now, ttl))
    }

    /// The token of a call forwarded to another cluster server, valid from `now` for `ttl`;
    /// `fresh_key` is the idempotency key the forwarding server made for the call, if it
    /// made one.
    pub fn issue_forwarded(
        &self,
        user_id: UserId,
        role: Role,
        now: Timestamp,
        ttl: Duration,
        fresh_key: Option<&str>,
    ) -> String {
        let claims = Claims {
            aud: Some(FORWARD_AUDIENCE.to_owned()),
            key: fresh_key.map(str::to_owned),
            ..Claims::new(user_id, role, now, ttl)
        };
        self.sign(&claims).0
    }

    fn sign(&self, claims: &Claims) -> (String, Timestamp) {
        let token = encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing cannot fail");
        (token, Timestamp::from_millis(claims.exp * 1000))
    }

    /// Checks signature, algorithm and expiry (against `now`, not the system clock). A
    /// token with an audience (a forwarded call's) is refused.
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<Verified, TokenError> {
        self.check(token, now, self.validation.clone())
    }

    /// Checks a forwarded call's token: as [`verify`](Self::verify), and its audience must
    /// be [`FORWARD_AUDIENCE`].
    pub fn verify_forwarded(&self, token: &str, now: Timestamp) -> Result<Verified, TokenError> {
        let mut validation = self.validation.clone();
        validation.set_audience(&[FORWARD_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        self.check(token, now, validation)
    }

    fn check(
        &self,
        token: &str,
        now: Timestamp,
        mut validation: Validation,
    ) -> Result<Verified, TokenError> {
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
            fresh_key: claims.key,
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
    fn a_forwarded_calls_token_is_accepted_only_where_forwarded_calls_are() {
        let t = tokens("s3cret-s3cret-s3cret-s3cret-s3cret");
        let user = UserId::new();
        let ttl = Duration::from_secs(60);
        let forwarded = t.issue_forwarded(user, Role::Customer, NOW, ttl, Some("fwd-1"));
        let verified = t.verify_forwarded(&forwarded, NOW).unwrap();
        assert_eq!((verified.user_id, verified.role), (user, Role::Customer));
        assert_eq!(verified.fresh_key.as_deref(), Some("fwd-1"));
        assert_eq!(t.verify(&forwarded, NOW), Err(TokenError::Invalid));
        let (client, _) = t.issue(user, Role::Customer, NOW);
        assert_eq!(t.verify_forwarded(&client, NOW), Err(TokenError::Invalid));
        assert_eq!(
            t.verify_forwarded(&forwarded, NOW.saturating_add(ttl)),
            Err(TokenError::Expired)
        );
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
