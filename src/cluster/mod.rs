//! Cluster mode (PROTOCOL §10): several servers on one PostgreSQL database and one Redis.
//! Each event is sold by exactly one server at a time, its owner, which holds a lease in
//! Redis ([`directory`]) and commits behind the event's fencing epoch; the others mirror
//! its availability ([`relay`]) and forward the calls that change it ([`forward`]). The
//! [`ownership`] round keeps every event owned while any server runs.

pub mod directory;
pub mod forward;
pub mod ownership;
pub mod relay;
