//! The domain core: catalog, selling rules, inventory and the reservation lifecycle.
//!
//! Nothing here knows about axum, sqlx, Redis, WebSockets or JSON. Inputs are validated
//! domain values, time is handed in as `now`, and every operation is synchronous and
//! short, so the same core runs behind every transport and storage backend and is
//! tested without any of them.

pub mod catalog;
pub mod ids;
pub mod inventory;
pub mod items;
pub mod money;
pub mod reservation;
pub mod rules;
pub mod time;
pub mod tokens;
pub mod user;

pub use catalog::{Event, TicketType, MAX_COUNT};
pub use ids::{EventId, InvalidId, PaymentId, ReservationId, TicketTypeId, UserId};
pub use inventory::{ChangeError, Inventory, PoolState, ReserveError, ReserveRequest, Reserved};
pub use items::{BadQuantity, ItemsError, Quantity, ReserveItems, MAX_ITEMS};
pub use money::{Currency, Money};
pub use reservation::{InvalidStatus, ReleaseKind, Reservation, ReservationItem, Status};
pub use rules::{Refusal, Rule};
pub use time::{Clock, SystemClock, Timestamp};
pub use tokens::{BadLength, IdempotencyKey, PaymentToken};
pub use user::{
    Email, Password, PasswordError, Role, User, MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS,
};
