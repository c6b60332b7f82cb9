//! Identifiers of the domain. On the wire every id is an opaque string; inside, each kind of id
//! is its own type so a reservation id can never be passed where an event id is expected.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh id. Version 7 UUIDs sort by creation time, which keeps database
            /// indexes append-mostly and gives a stable, meaningful order.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.as_hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            /// Only the canonical form (lower-case, hyphenated) is accepted, so one id has
            /// one spelling.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let canonical = s.len() == 36
                    && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-');
                if !canonical {
                    return Err(InvalidId);
                }
                Uuid::try_parse(s).map(Self).map_err(|_| InvalidId)
            }
        }
    };
}

/// The string given is not an id this server could have issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a valid id")]
pub struct InvalidId;

id_type!(
    /// A registered user.
    UserId
);
id_type!(
    /// An event with one or more ticket types.
    EventId
);
id_type!(
    /// One ticket type (one pool of tickets) of an event.
    TicketTypeId
);
id_type!(
    /// A reservation: a hold on tickets of one event, later paid, cancelled or expired.
    ReservationId
);
id_type!(
    /// A successful payment of a reservation.
    PaymentId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_string_form() {
        let id = EventId::new();
        assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
    }

    #[test]
    fn refuses_strings_that_are_not_canonical_uuids() {
        let upper = EventId::new().to_string().to_uppercase();
        for bad in [
            "",
            "abc",
            "{8c2b0d4e-0000-7000-8000-000000000000}",
            "8c2b0d4e000070008000000000000000",
            upper.as_str(),
        ] {
            assert_eq!(bad.parse::<EventId>(), Err(InvalidId), "{bad}");
        }
    }
}
