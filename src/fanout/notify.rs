//! The port through which the engine announces committed changes to subscribers. It is
//! defined here, below the engine, as the expiry and storage ports are in their layers: the
//! engine imports it, and the fan-out implements it without importing the engine.

use crate::core::inventory::PoolState;
use crate::core::reservation::Reservation;
use crate::core::EventId;

/// Receives every committed change. Implementations must return at once (queue, never
/// send on the caller's time): the engine calls them on the reserve path.
pub trait Notifier: Send + Sync + 'static {
    /// The availability of some ticket types of an event changed.
    fn pools_changed(&self, event_id: EventId, pools: &[PoolState]);
    /// A reservation became paid, cancelled or expired.
    fn reservation_updated(&self, reservation: &Reservation);
}
