//! The context a call runs in: one per WebSocket connection, per long-poll session, or per
//! `/rpc` request. It carries who is logged in and the call-rate budget, so every method
//! behaves the same whatever the transport.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::error::{AuthFailure, RpcError};
use crate::core::{Role, Timestamp, User, UserId};

/// Which transport a session came in by; some methods need a push channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    LongPoll,
    Http,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WebSocket => "ws",
            Self::LongPoll => "longpoll",
            Self::Http => "http",
        }
    }

    /// Whether the server can push notifications over it.
    pub fn can_push(self) -> bool {
        !matches!(self, Self::Http)
    }
}

/// A user bound to a session by a verified token or a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: User,
    /// When the token that bound it expires; calls after that need a new login.
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone)]
enum Identity {
    Anonymous,
    /// A token was presented (on `/rpc`) but could not be used.
    Refused(AuthFailure),
    Bound(Principal),
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// One client's context.
pub struct Session {
    /// Unique in this process, for logs.
    pub id: u64,
    pub transport: Transport,
    /// Guards only the identity; held for a clone or an assignment, never across `.await`.
    identity: Mutex<Identity>,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Session {
    pub fn new(transport: Transport, rate: Option<(u32, u32)>) -> Self {
        let limiter = rate.map(|(per_second, burst)| {
            let per_second = NonZeroU32::new(per_second.max(1)).expect("at least 1");
            let burst = NonZeroU32::new(burst.max(1)).expect("at least 1");
            RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
        });
        Self {
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            transport,
            identity: Mutex::new(Identity::Anonymous),
            limiter,
        }
    }

    fn identity(&self) -> std::sync::MutexGuard<'_, Identity> {
        // The identity is replaced whole, so a panic elsewhere cannot leave it half-written.
        self.identity.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bind(&self, principal: Principal) {
        *self.identity() = Identity::Bound(principal);
    }

    /// Records that the credentials presented with a stateless request were unusable.
    pub fn refuse(&self, why: AuthFailure) {
        *self.identity() = Identity::Refused(why);
    }

    pub fn unbind(&self) {
        *self.identity() = Identity::Anonymous;
    }

    /// The logged-in user, or why there is none. An expired binding counts as none.
    pub fn principal(&self, now: Timestamp) -> Result<Principal, RpcError> {
        match &*self.identity() {
            Identity::Anonymous => Err(RpcError::Unauthenticated(AuthFailure::Missing)),
            Identity::Refused(why) => Err(RpcError::Unauthenticated(*why)),
            Identity::Bound(p) if p.expires_at <= now => {
                Err(RpcError::Unauthenticated(AuthFailure::Expired))
            }
            Identity::Bound(p) => Ok(p.clone()),
        }
    }

    pub fn user_id(&self, now: Timestamp) -> Result<UserId, RpcError> {
        self.principal(now).map(|p| p.user.id)
    }

    /// The logged-in user, who must be an admin.
    pub fn admin(&self, now: Timestamp) -> Result<Principal, RpcError> {
        let principal = self.principal(now)?;
        if principal.user.role != Role::Admin {
            return Err(RpcError::Forbidden);
        }
        Ok(principal)
    }

    /// Spends one call from the budget, or says how long to wait.
    pub fn take_call(&self) -> Result<(), RpcError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            RpcError::RateLimited {
                retry_after_ms: wait.as_millis().max(1) as u64,
            }
        })
    }
}
