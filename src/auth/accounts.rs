//! Accounts: registering, logging in and checking tokens, over the user table, the
//! password hasher and the token issuer. The methods of `auth.*` and the transports'
//! bearer-token check go through the [`AccountService`] port, so they never see storage.

use std::sync::Arc;

use async_trait::async_trait;

use super::password::HashError;
use super::{AuthFailure, Passwords, TokenError, Tokens};
use crate::core::{Clock, Email, Password, Role, Timestamp, User, UserId};
use crate::store::writer::{unreachable, StorageHealth};
use crate::store::{Store, StoreError};

/// Why an account call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Unknown email or wrong password: the same answer for both.
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("email already registered")]
    EmailTaken,
    /// A token that is expired, forged, or names a user who no longer exists.
    #[error("token not accepted")]
    Refused(AuthFailure),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hash(#[from] HashError),
}

/// A user signed in by a token, and when that token expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    pub user: User,
    pub token: String,
    pub expires_at: Timestamp,
}

/// What the methods and transports ask of accounts.
#[async_trait]
pub trait AccountService: Send + Sync + 'static {
    /// Creates a customer and signs them in.
    async fn register(&self, email: Email, password: Password) -> Result<SignedIn, AccountError>;
    /// Signs in the user with this email and password. A malformed email (`None`) belongs
    /// to no one and is answered as any unknown email is, after as long.
    async fn login(
        &self,
        email: Option<Email>,
        password: Password,
    ) -> Result<SignedIn, AccountError>;
    /// The user a token names (who must still exist) and when the token expires.
    async fn verify(&self, token: &str) -> Result<(User, Timestamp), AccountError>;
}

/// The accounts of this server's database.
pub struct Accounts {
    store: Store,
    /// Whether the database is known to be down: tokens are then not checked against it.
    storage: Arc<StorageHealth>,
    tokens: Tokens,
    passwords: Passwords,
    clock: Arc<dyn Clock>,
}

impl Accounts {
    pub fn new(store: Store, tokens: Tokens, passwords: Passwords, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            storage: Arc::default(),
            tokens,
            passwords,
            clock,
        }
    }

    /// Shares the writer's knowledge of whether the database is down.
    pub fn watching(mut self, storage: Arc<StorageHealth>) -> Self {
        self.storage = storage;
        self
    }

    fn sign_in(&self, user: User) -> SignedIn {
        let (token, expires_at) = self.tokens.issue(user.id, user.role, self.clock.now());
        SignedIn {
            user,
            token,
            expires_at,
        }
    }
}

#[async_trait]
impl AccountService for Accounts {
    async fn register(&self, email: Email, password: Password) -> Result<SignedIn, AccountError> {
        let hash = self.passwords.hash(password.into_inner()).await?;
        let user = User {
            id: UserId::new(),
            email: email.into(),
            role: Role::Customer,
        };
        match self.store.insert_user(&user, &hash, self.clock.now()).await {
            Ok(()) => {}
            Err(StoreError::Duplicate(_)) => return Err(AccountError::EmailTaken),
            Err(other) => return Err(other.into()),
        }
        tracing::info!(user_id = %user.id, "user registered");
        Ok(self.sign_in(user))
    }

    async fn login(
        &self,
        email: Option<Email>,
        password: Password,
    ) -> Result<SignedIn, AccountError> {
        let found = match &email {
            Some(email) => self.store.user_by_email(email.as_str()).await?,
            None => None,
        };
        let (user, hash) = match found {
            Some((user, hash)) => (Some(user), Some(hash)),
            None => (None, None),
        };
        // Verified against a dummy hash when the email is unknown, so both failures take as long.
        let matches = self.passwords.verify(password.into_inner(), hash).await?;
        match user {
            Some(user) if matches => Ok(self.sign_in(user)),
            _ => Err(AccountError::InvalidCredentials),
        }
    }

    async fn verify(&self, token: &str) -> Result<(User, Timestamp), AccountError> {
        let verified = self.tokens.verify(token, self.clock.now()).map_err(|e| {
            AccountError::Refused(match e {
                TokenError::Expired => AuthFailure::Expired,
                TokenError::Invalid => AuthFailure::Invalid,
            })
        })?;
        // While the database is known to be down the user cannot be read: answered at once
        // rather than after a connection timeout (calls needing a user are UNAVAILABLE).
        if self.storage.is_down() {
            return Err(StoreError::Database(sqlx::Error::PoolTimedOut).into());
        }
        let user = self
            .store
            .user_by_id(verified.user_id)
            .await
            .inspect_err(|error| {
                if unreachable(error) {
                    self.storage.mark_down();
                }
            })?
            .ok_or(AccountError::Refused(AuthFailure::Invalid))?;
        Ok((user, verified.expires_at))
    }
}
