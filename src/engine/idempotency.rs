//! Idempotency keys (PROTOCOL §5): per user and method, kept 24 hours, stored in the same
//! transaction as the change they record. Calls with the same key run one at a time, so a
//! retry that races its original waits for it and then replays its result.

use std::sync::Arc;

use dashmap::DashMap;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::ports::Records;
use super::EngineError;
use crate::core::{IdempotencyKey, Timestamp, UserId};
use crate::store::{IdempotencyRecord, StoredIdempotency};

/// A call made with an idempotency key.
pub struct KeyedCall<'a, T> {
    pub method: &'static str,
    pub key: &'a IdempotencyKey,
    /// Identifies the params; a reuse of the key with other params is a conflict.
    pub params_hash: String,
    /// The result as it is stored and replayed (the wire form).
    pub render: &'a (dyn Fn(&T) -> String + Send + Sync),
    /// Made for this very call (a forwarded one's, by the forwarding server): nothing can
    /// have stored it, so it is not looked up. Its commit stores it, and is refused should
    /// the key be taken meanwhile.
    pub fresh: bool,
}

impl<T> Clone for KeyedCall<'_, T> {
    fn clone(&self) -> Self {
        Self {
            method: self.method,
            key: self.key,
            params_hash: self.params_hash.clone(),
            render: self.render,
            fresh: self.fresh,
        }
    }
}

/// SHA-256 of a canonical description of the params, hex encoded.
pub fn params_hash(canonical: &str) -> String {
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// A result: computed now, or already in its wire form: the stored result of the call that
/// first used an idempotency key, or the answer of the server owning the event.
#[derive(Debug)]
pub enum Answer<T> {
    Fresh(T),
    Rendered(String),
}

type LockKey = (UserId, &'static str, String);

/// The keys in flight, each with a lock that serialises calls using it.
pub struct IdempotencyKeys {
    store: Arc<dyn Records>,
    in_flight: DashMap<LockKey, Arc<Mutex<()>>>,
}

impl IdempotencyKeys {
    pub fn new(store: Arc<dyn Records>) -> Self {
        Self {
            store,
            in_flight: DashMap::new(),
        }
    }

    /// Takes the key's lock and looks up its stored result. Without a key, a no-op guard.
    pub async fn begin<'a, T>(
        &'a self,
        user: UserId,
        call: Option<KeyedCall<'a, T>>,
        now: Timestamp,
    ) -> Result<KeyGuard<'a, T>, EngineError> {
        let Some(call) = call else {
            return Ok(KeyGuard {
                keys: self,
                user,
                call: None,
                stored: None,
                lock: None,
            });
        };
        let lock_key: LockKey = (user, call.method, call.key.as_str().to_owned());
        // Clone the Arc out and drop the map guard before awaiting the lock.
        let mutex = Arc::clone(self.in_flight.entry(lock_key).or_default().value());
        let lock = mutex.lock_owned().await;
        let mut guard = KeyGuard {
            keys: self,
            user,
            call: Some(call),
            stored: None,
            lock: Some(lock),
        };
        let call = guard.call.as_ref().expect("set above");
        if !call.fresh {
            guard.stored = self
                .store
                .idempotency(user, call.method, call.key.as_str(), now)
                .await?;
        }
        Ok(guard)
    }
}

/// Holds a key's lock for the length of one call.
pub struct KeyGuard<'a, T> {
    keys: &'a IdempotencyKeys,
    user: UserId,
    call: Option<KeyedCall<'a, T>>,
    stored: Option<StoredIdempotency>,
    lock: Option<OwnedMutexGuard<()>>,
}

impl<T> KeyGuard<'_, T> {
    /// The first call's result when the key was used before with the same params.
    pub fn replay(&self) -> Result<Option<Answer<T>>, EngineError> {
        match (&self.call, &self.stored) {
            (Some(call), Some(stored)) if stored.params_hash == call.params_hash => {
                Ok(Some(Answer::Rendered(stored.response.clone())))
            }
            (Some(_), Some(_)) => Err(EngineError::IdempotencyConflict),
            _ => Ok(None),
        }
    }

    /// The record to commit with the change that produced `result`.
    pub fn record(&self, result: &T, at: Timestamp) -> Option<IdempotencyRecord> {
        let call = self.call.as_ref()?;
        Some(IdempotencyRecord {
            user_id: self.user,
            method: call.method,
            key: call.key.as_str().to_owned(),
            params_hash: call.params_hash.clone(),
            response: (call.render)(result),
            at,
        })
    }
}

impl<T> Drop for KeyGuard<'_, T> {
    fn drop(&mut self) {
        let Some(call) = &self.call else { return };
        drop(self.lock.take());
        // Forget the lock unless another call is waiting on it (it holds a clone).
        let lock_key: LockKey = (self.user, call.method, call.key.as_str().to_owned());
        self.keys
            .in_flight
            .remove_if(&lock_key, |_, mutex| Arc::strong_count(mutex) == 1);
    }
}
