//! The context a call runs in: one per WebSocket connection, per long-poll session, or per
//! `/rpc` request. It carries who is logged in and the call-rate budget, so every method
//! behaves the same whatever the transport.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::{AuthFailure, RpcError};
use crate::core::inventory::PoolState;
use crate::core::{EventId, Role, Timestamp, User, UserId};
use crate::fanout::{FanOut, Outbox, SubscriptionId};

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
    /// On a call another cluster server forwarded: the idempotency key that server made
    /// for it. Being fresh, it is not looked up before the call runs; its commit, which
    /// stores it, would be refused if it were taken meanwhile.
    pub fresh_key: Option<String>,
}

#[derive(Debug, Clone)]
enum Identity {
    Anonymous,
    /// A token was presented (on `/rpc`) but could not be used.
    Refused(AuthFailure),
    /// A token was presented (on `/rpc`) but the database could not be asked about it.
    Unverifiable,
    Bound(Principal),
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Most live subscriptions one connection or session may hold.
pub const MAX_SUBSCRIPTIONS: usize = 100;

/// What a transport that can push (WebSocket, long-poll) adds to a session: its outbox,
/// its subscriptions, and its place among its user's connections.
pub struct Push {
    pub outbox: Arc<Outbox>,
    fanout: Arc<FanOut>,
    /// Held only to insert, remove or take; never across `.await`.
    subscriptions: Mutex<HashMap<SubscriptionId, EventId>>,
}

impl Push {
    pub fn new(fanout: Arc<FanOut>, outbox: Arc<Outbox>) -> Self {
        Self {
            outbox,
            fanout,
            subscriptions: Mutex::new(HashMap::new()),
        }
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<SubscriptionId, EventId>> {
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to an event's pool updates; returns the subscription and the snapshot
    /// `snapshot` took. Later updates carry only versions newer than the snapshot's.
    pub fn subscribe(
        &self,
        event_id: EventId,
        snapshot: impl FnOnce() -> Option<Vec<PoolState>>,
    ) -> Result<(SubscriptionId, Vec<PoolState>), RpcError> {
        let mut subscriptions = self.subscriptions();
        if subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(RpcError::invalid_params(
                "event_id",
                format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
            ));
        }
        let (id, pools) = self
            .fanout
            .subscribe(event_id, &self.outbox, snapshot)
            .ok_or(RpcError::NotFound)?;
        subscriptions.insert(id, event_id);
        Ok((id, pools))
    }

    /// Ends a subscription of this session; an unknown one is already ended.
    pub fn unsubscribe(&self, id: SubscriptionId) {
        let removed = self.subscriptions().remove(&id);
        if let Some(event_id) = removed {
            self.fanout.unsubscribe(event_id, id);
            self.outbox.forget(id);
        }
    }
}

/// The budget of `auth.register` and `auth.login` calls of each client address, shared by
/// every connection and session: each of them costs a password hash (memory and CPU), so
/// one address must not be able to run them without bound.
pub struct AddressLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl AddressLimiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let per_second = NonZeroU32::new(per_second.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(burst.max(1)).expect("at least 1");
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// Spends one call of the address, or says how long to wait. IPv6 addresses count per
    /// /64, the block one client is usually given.
    pub fn check(&self, address: IpAddr) -> Result<(), RpcError> {
        let key = match address {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
            },
            v4 => v4,
        };
        self.limiter.check_key(&key).map_err(rate_limited)
    }

    /// Drops the budgets of addresses that are back to full, so the table stays small.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}

fn rate_limited(not_until: governor::NotUntil<governor::clock::QuantaInstant>) -> RpcError {
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    RpcError::RateLimited {
        retry_after_ms: wait.as_millis().max(1) as u64,
    }
}

/// One client's context.
pub struct Session {
    /// Unique in this process, for logs.
    pub id: u64,
    pub transport: Transport,
    /// Guards only the identity; held for a clone or an assignment, never across `.await`.
    identity: Mutex<Identity>,
    limiter: Option<DefaultDirectRateLimiter>,
    /// `None` on `/rpc`, which cannot push.
    pub push: Option<Push>,
    /// The client's address and the budget its logins are counted against; unset, they
    /// are not limited.
    address: OnceLock<(Arc<AddressLimiter>, IpAddr)>,
}

impl Drop for Session {
    /// A closed connection or expired session leaves no subscription or binding behind.
    fn drop(&mut self) {
        let Some(push) = &self.push else { return };
        let subscriptions: Vec<(SubscriptionId, EventId)> = push.subscriptions().drain().collect();
        for (id, event_id) in subscriptions {
            push.fanout.unsubscribe(event_id, id);
        }
        if let Identity::Bound(principal) = &*self.identity() {
            push.fanout.detach(principal.user.id, self.id);
        }
    }
}

impl Session {
    /// A session that cannot push (`/rpc`).
    pub fn new(transport: Transport, rate: Option<(u32, u32)>) -> Self {
        Self::with_push(transport, rate, None)
    }

    pub fn with_push(transport: Transport, rate: Option<(u32, u32)>, push: Option<Push>) -> Self {
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
            push,
            address: OnceLock::new(),
        }
    }

    /// Counts this session's logins and registrations against its client address.
    pub fn set_address(&self, limiter: Arc<AddressLimiter>, address: IpAddr) {
        let _ = self.address.set((limiter, address));
    }

    /// Spends one login or registration of the client's address, or says how long to wait.
    pub fn take_auth_call(&self) -> Result<(), RpcError> {
        match self.address.get() {
            Some((limiter, address)) => limiter.check(*address),
            None => Ok(()),
        }
    }

    fn identity(&self) -> std::sync::MutexGuard<'_, Identity> {
        // The identity is replaced whole, so a panic elsewhere cannot leave it half-written.
        self.identity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds the session to a user: later calls act as them, and their reservation
    /// updates reach this session.
    pub fn bind(&self, principal: Principal) {
        let user = principal.user.id;
        let previous = std::mem::replace(&mut *self.identity(), Identity::Bound(principal));
        if let Some(push) = &self.push {
            if let Identity::Bound(old) = previous {
                push.fanout.detach(old.user.id, self.id);
            }
            push.fanout.attach(user, self.id, &push.outbox);
        }
    }

    /// Records that the credentials presented with a stateless request were unusable.
    pub fn refuse(&self, why: AuthFailure) {
        *self.identity() = Identity::Refused(why);
    }

    /// Records that the credentials presented with a stateless request could not be
    /// checked: calls that need a user answer `UNAVAILABLE`.
    pub fn refuse_unverifiable(&self) {
        *self.identity() = Identity::Unverifiable;
    }

    pub fn unbind(&self) {
        let previous = std::mem::replace(&mut *self.identity(), Identity::Anonymous);
        if let (Some(push), Identity::Bound(old)) = (&self.push, previous) {
            push.fanout.detach(old.user.id, self.id);
        }
    }

    /// The logged-in user, or why there is none. An expired binding counts as none.
    pub fn principal(&self, now: Timestamp) -> Result<Principal, RpcError> {
        match &*self.identity() {
            Identity::Anonymous => Err(RpcError::Unauthenticated(AuthFailure::Missing)),
            Identity::Refused(why) => Err(RpcError::Unauthenticated(*why)),
            Identity::Unverifiable => Err(RpcError::Unavailable),
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
        limiter.check().map_err(rate_limited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_are_limited_per_address_with_a_retry_hint() {
        let limiter = Arc::new(AddressLimiter::new(1, 2));
        let session = Session::new(Transport::Http, None);
        assert!(session.take_auth_call().is_ok(), "no address: no limit");
        session.set_address(Arc::clone(&limiter), "10.0.0.1".parse().unwrap());
        assert!(session.take_auth_call().is_ok());
        assert!(session.take_auth_call().is_ok());
        match session.take_auth_call() {
            Err(RpcError::RateLimited { retry_after_ms }) => assert!(retry_after_ms >= 1),
            other => panic!("expected RATE_LIMITED, got {other:?}"),
        }
        // Another address has its own budget; one /64 shares one.
        assert!(limiter.check("10.0.0.2".parse().unwrap()).is_ok());
        assert!(limiter.check("2001:db8::1".parse().unwrap()).is_ok());
        assert!(limiter.check("2001:db8::2".parse().unwrap()).is_ok());
        assert!(limiter.check("2001:db8::3".parse().unwrap()).is_err());
    }
}
