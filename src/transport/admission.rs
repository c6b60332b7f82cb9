//! Which TCP connections the listener takes (hardening: unfinished requests, one client
//! holding many sockets, running out of file descriptors): at most so many per client
//! address, and in all no more than the file limit leaves room for, so the database,
//! Redis and new clients always find a descriptor. A connection over either cap is answered
//! 503 and closed at once.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Descriptors kept free of client connections: the database pools, Redis, files, and the
/// short-lived sockets that are answered 503.
pub fn spare_descriptors(file_limit: u64) -> u64 {
    (file_limit / 10).max(64)
}

/// How many client connections the open-file limit leaves room for.
pub fn capacity_for_file_limit(file_limit: u64) -> usize {
    file_limit
        .saturating_sub(spare_descriptors(file_limit))
        .max(1)
        .min(usize::MAX as u64) as usize
}

/// The open-file limit of this process now (soft), or `None` where it cannot be read.
pub fn file_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Counts of open connections, in all and per client address.
pub struct Admission {
    per_address: DashMap<IpAddr, usize>,
    open: AtomicUsize,
    max_per_address: usize,
    max_open: usize,
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This client address already holds its share.
    PerAddress,
    /// The server is at the connections its file limit allows.
    Full,
}

/// Held by a connection's task; gives its place back when dropped.
pub struct Admitted {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Admission {
    pub fn new(max_per_address: usize, max_open: usize) -> Arc<Self> {
        Arc::new(Self {
            per_address: DashMap::new(),
            open: AtomicUsize::new(0),
            max_per_address: max_per_address.max(1),
            max_open: max_open.max(1),
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a place for a connection from `address`, or says why there is none.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Admitted, Refused> {
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.max_open {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full);
        }
        let mut held = self.per_address.entry(address).or_insert(0);
        if *held >= self.max_per_address {
            drop(held);
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::PerAddress);
        }
        *held += 1;
        Ok(Admitted {
            admission: Arc::clone(self),
            address,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission
            .per_address
            .remove_if_mut(&self.address, |_, held| {
                *held -= 1;
                *held == 0
            });
        self.admission.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a refused connection is told before it is closed.
pub const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 21\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many connections\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_per_address_and_in_all() {
        let admission = Admission::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).err(), Some(Refused::PerAddress));
        let _third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).err(), Some(Refused::Full));
        assert_eq!(admission.open(), 3);
        drop(first);
        assert_eq!(admission.open(), 2);
        let _again = admission.admit(a).unwrap();
        assert_eq!(admission.per_address.get(&a).map(|h| *h), Some(2));
    }

    #[test]
    fn the_file_limit_keeps_descriptors_spare() {
        assert_eq!(capacity_for_file_limit(1_100), 990);
        assert_eq!(capacity_for_file_limit(256), 192);
        assert_eq!(capacity_for_file_limit(10), 1);
    }
}
