//! Reservations as the wire and the database see them: a hold on tickets of one event that
//! ends paid, cancelled or expired. The in-memory phases a reservation goes through while a
//! payment or a release is being committed are the inventory's business (`inventory.rs`).

use std::fmt;
use std::str::FromStr;

use super::ids::{EventId, ReservationId, TicketTypeId, UserId};
use super::money::Money;
use super::time::Timestamp;

/// The status of a reservation on the wire (PROTOCOL §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Holds its tickets until `expires_at`, a payment, or a cancel.
    Pending,
    /// Paid: its tickets are sold for good.
    Paid,
    /// Released by its owner; its tickets went back to the pool.
    Cancelled,
    /// Released because it was not paid in time; its tickets went back to the pool.
    Expired,
}

impl Status {
    /// The name on the wire and in the database.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Paid => "paid",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
        }
    }

    /// Paid, cancelled and expired reservations never change again.
    pub fn is_final(&self) -> bool {
        !matches!(self, Status::Pending)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is not one of `pending`, `paid`, `cancelled`, `expired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a reservation status")]
pub struct InvalidStatus;

impl FromStr for Status {
    type Err = InvalidStatus;

    /// Only the exact lower-case wire names are accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(Status::Pending),
            "paid" => Ok(Status::Paid),
            "cancelled" => Ok(Status::Cancelled),
            "expired" => Ok(Status::Expired),
            _ => Err(InvalidStatus),
        }
    }
}

/// One line of a reservation: a quantity of one ticket type at the price of the moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservationItem {
    pub ticket_type_id: TicketTypeId,
    /// From 1 to [`MAX_COUNT`](super::catalog::MAX_COUNT).
    pub quantity: u32,
    pub unit_price: Money,
}

/// A reservation of tickets of one event by one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub id: ReservationId,
    pub user_id: UserId,
    pub event_id: EventId,
    pub status: Status,
    /// Non-empty; no ticket type twice; all of `event_id`.
    pub items: Vec<ReservationItem>,
    /// Σ `unit_price × quantity` over the items.
    pub total: Money,
    pub created_at: Timestamp,
    /// `created_at` + the reservation TTL. A pending reservation is released at this instant
    /// unless a payment began before it.
    pub expires_at: Timestamp,
}

/// Why a pending reservation gives its tickets back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReleaseKind {
    /// Its owner cancelled it.
    Cancel,
    /// Its time ran out.
    Expire,
}

impl ReleaseKind {
    /// The status the reservation ends in.
    pub fn final_status(&self) -> Status {
        match self {
            ReleaseKind::Cancel => Status::Cancelled,
            ReleaseKind::Expire => Status::Expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_its_wire_name() {
        for status in [
            Status::Pending,
            Status::Paid,
            Status::Cancelled,
            Status::Expired,
        ] {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
        }
        assert_eq!(Status::Cancelled.as_str(), "cancelled");
    }

    #[test]
    fn status_refuses_names_that_are_not_exact() {
        for bad in ["", "Pending", "PAID", "canceled", "expired ", "active"] {
            assert_eq!(bad.parse::<Status>(), Err(InvalidStatus), "{bad:?}");
        }
    }

    #[test]
    fn release_kind_decides_the_final_status() {
        assert_eq!(ReleaseKind::Cancel.final_status(), Status::Cancelled);
        assert_eq!(ReleaseKind::Expire.final_status(), Status::Expired);
    }

    #[test]
    fn only_pending_is_not_final() {
        assert!(!Status::Pending.is_final());
        assert!(
            Status::Paid.is_final() && Status::Cancelled.is_final() && Status::Expired.is_final()
        );
    }
}
