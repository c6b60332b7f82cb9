//! What a reservation asks for, checked once when it is read: a [`Quantity`] from 1 to
//! [`MAX_COUNT`], and [`ReserveItems`]: 1 to [`MAX_ITEMS`] items, no ticket type twice.
//! Whatever needs the inventory (unknown ticket types, items of two events, availability,
//! rules) is checked by the inventory.

use std::fmt;

use super::catalog::MAX_COUNT;
use super::ids::TicketTypeId;

/// Most items one reservation may have (PROTOCOL §5).
pub const MAX_ITEMS: usize = 20;

/// A number of tickets of one ticket type: from 1 to [`MAX_COUNT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(u32);

/// Why a number is not a [`Quantity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an integer from 1 to {MAX_COUNT}")]
pub struct BadQuantity;

impl Quantity {
    pub fn new(count: u32) -> Result<Self, BadQuantity> {
        if (1..=MAX_COUNT).contains(&count) {
            Ok(Self(count))
        } else {
            Err(BadQuantity)
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why the items of a request are not acceptable. `index` is the item's place in the
/// request as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ItemsError {
    #[error("1 to {MAX_ITEMS} items")]
    Count,
    #[error("items[{index}].quantity: {BadQuantity}")]
    Quantity { index: usize },
    /// Not a ticket type id at all (answered as an unknown ticket type).
    #[error("items[{index}].ticket_type_id is not an id")]
    MalformedId { index: usize },
    #[error("items[{index}].ticket_type_id: the same ticket type twice")]
    Repeated { index: usize },
}

/// The items of a reservation, in the caller's order: 1 to [`MAX_ITEMS`], each ticket type
/// at most once, each quantity a [`Quantity`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveItems(Vec<(TicketTypeId, Quantity)>);

impl ReserveItems {
    /// Checks typed items: their count, then (item by item) that no ticket type repeats.
    pub fn new(items: Vec<(TicketTypeId, Quantity)>) -> Result<Self, ItemsError> {
        if items.is_empty() || items.len() > MAX_ITEMS {
            return Err(ItemsError::Count);
        }
        for (index, &(id, _)) in items.iter().enumerate() {
            if items[..index].iter().any(|&(seen, _)| seen == id) {
                return Err(ItemsError::Repeated { index });
            }
        }
        Ok(Self(items))
    }

    /// Reads `(ticket type id, quantity)` pairs as a client sent them. The first failure
    /// wins, in this order: the count; every quantity; every id; a repeated ticket type.
    pub fn parse<'a>(raw: impl IntoIterator<Item = (&'a str, u32)>) -> Result<Self, ItemsError> {
        let raw: Vec<(&str, u32)> = raw.into_iter().collect();
        if raw.is_empty() || raw.len() > MAX_ITEMS {
            return Err(ItemsError::Count);
        }
        let quantities = raw
            .iter()
            .enumerate()
            .map(|(index, &(_, count))| {
                Quantity::new(count).map_err(|_| ItemsError::Quantity { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ids = raw
            .iter()
            .enumerate()
            .map(|(index, &(id, _))| {
                id.parse::<TicketTypeId>()
                    .map_err(|_| ItemsError::MalformedId { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(ids.into_iter().zip(quantities).collect())
    }

    pub fn as_slice(&self) -> &[(TicketTypeId, Quantity)] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always `false`: there is at least one item.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_quantity_is_from_1_to_max_count() {
        assert_eq!(Quantity::new(0), Err(BadQuantity));
        assert_eq!(Quantity::new(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::new(MAX_COUNT).map(Quantity::get), Ok(MAX_COUNT));
        assert_eq!(Quantity::new(MAX_COUNT + 1), Err(BadQuantity));
        assert_eq!(BadQuantity.to_string(), "an integer from 1 to 2147483647");
    }

    #[test]
    fn items_are_checked_count_then_quantities_then_ids_then_repeats() {
        let a = TicketTypeId::new().to_string();
        let b = TicketTypeId::new().to_string();
        let cases: [(Vec<(&str, u32)>, ItemsError); 6] = [
            (vec![], ItemsError::Count),
            (vec![(&a, 0); MAX_ITEMS + 1], ItemsError::Count),
            // A bad quantity anywhere is named before a malformed id earlier on.
            (vec![("x", 1), (&a, 0)], ItemsError::Quantity { index: 1 }),
            (
                vec![(&a, 1), (&b, MAX_COUNT + 1)],
                ItemsError::Quantity { index: 1 },
            ),
            (
                vec![(&a, 1), (&a, 1), ("x", 1)],
                ItemsError::MalformedId { index: 2 },
            ),
            (
                vec![(&a, 1), (&b, 2), (&a, 3)],
                ItemsError::Repeated { index: 2 },
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                ReserveItems::parse(raw.iter().copied()),
                Err(expected),
                "{raw:?}"
            );
        }
        let items = ReserveItems::parse([(a.as_str(), 2), (b.as_str(), MAX_COUNT)]).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items.as_slice()[0].0.to_string(), a);
        assert_eq!(items.as_slice()[1].1.get(), MAX_COUNT);
    }

    /// A raw item: one of a few ticket types (so repeats happen), or a malformed id; a
    /// quantity often out of range.
    fn raw_item() -> impl Strategy<Value = (Option<usize>, u32)> {
        (
            prop_oneof![8 => (0usize..4).prop_map(Some), 1 => Just(None)],
            prop_oneof![6 => 1u32..10, 1 => Just(0u32), 1 => Just(MAX_COUNT), 1 => MAX_COUNT..=u32::MAX],
        )
    }

    proptest! {
        /// The parse accepts exactly what the rules allow, names the first failure in the
        /// documented order, and keeps accepted items as sent.
        #[test]
        fn parse_accepts_exactly_the_valid_items(raw in prop::collection::vec(raw_item(), 0..=MAX_ITEMS + 2)) {
            let ids: Vec<String> = (0..4).map(|_| TicketTypeId::new().to_string()).collect();
            let text: Vec<(&str, u32)> = raw
                .iter()
                .map(|&(id, count)| (id.map_or("not-an-id", |i| ids[i].as_str()), count))
                .collect();
            let expected = if raw.is_empty() || raw.len() > MAX_ITEMS {
                Err(ItemsError::Count)
            } else if let Some(index) = raw.iter().position(|&(_, n)| n == 0 || n > MAX_COUNT) {
                Err(ItemsError::Quantity { index })
            } else if let Some(index) = raw.iter().position(|&(id, _)| id.is_none()) {
                Err(ItemsError::MalformedId { index })
            } else {
                let mut seen = HashSet::new();
                match raw.iter().position(|&(id, _)| !seen.insert(id)) {
                    Some(index) => Err(ItemsError::Repeated { index }),
                    None => Ok(()),
                }
            };
            let parsed = ReserveItems::parse(text.iter().copied());
            prop_assert_eq!(parsed.as_ref().map(|_| ()).map_err(|e| *e), expected);
            if let Ok(items) = parsed {
                let back: Vec<(String, u32)> = items
                    .as_slice()
                    .iter()
                    .map(|(id, q)| (id.to_string(), q.get()))
                    .collect();
                let sent: Vec<(String, u32)> =
                    text.iter().map(|&(id, n)| (id.to_owned(), n)).collect();
                prop_assert_eq!(back, sent);
            }
        }
    }
}
