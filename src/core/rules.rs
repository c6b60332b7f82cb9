//! Selling rules: which quantities of a ticket type may be taken, given what is available.

use std::num::NonZeroU32;

/// The selling rule of a ticket type (PROTOCOL §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Any quantity.
    Any,
    /// Quantities that are a multiple of `of` (at least 2).
    Multiple { of: NonZeroU32 },
    /// Only the whole remaining pool at once.
    Altogether,
    /// A purchase must not leave exactly one ticket behind.
    AvoidOne,
}

/// Why a quantity cannot be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// More than is available, whatever the rule.
    Insufficient { available: u32 },
    /// Enough is available, but the rule forbids this quantity.
    RuleViolation,
}

impl Rule {
    /// `multiple` of `of`, which must be at least 2.
    pub fn multiple(of: u32) -> Option<Rule> {
        (of >= 2).then(|| Rule::Multiple {
            of: NonZeroU32::new(of).expect("checked above"),
        })
    }

    /// The name of the rule on the wire (`any`, `multiple`, `altogether`, `avoid_one`).
    pub fn kind(&self) -> &'static str {
        match self {
            Rule::Any => "any",
            Rule::Multiple { .. } => "multiple",
            Rule::Altogether => "altogether",
            Rule::AvoidOne => "avoid_one",
        }
    }

    /// May `quantity` tickets be taken when `available` remain? Quantity is checked against
    /// availability first, so a too-large request is always `Insufficient`.
    pub fn check(&self, quantity: u32, available: u32) -> Result<(), Refusal> {
        if quantity > available {
            return Err(Refusal::Insufficient { available });
        }
        let allowed = match self {
            Rule::Any => true,
            Rule::Multiple { of } => quantity.is_multiple_of(of.get()),
            Rule::Altogether => quantity == available,
            Rule::AvoidOne => available - quantity != 1,
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal::RuleViolation)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Refusal::*;

    #[test]
    fn any_takes_every_quantity_up_to_available() {
        assert_eq!(Rule::Any.check(1, 1), Ok(()));
        assert_eq!(Rule::Any.check(5, 10), Ok(()));
        assert_eq!(Rule::Any.check(11, 10), Err(Insufficient { available: 10 }));
    }

    #[test]
    fn multiple_takes_only_multiples() {
        let rule = Rule::multiple(4).unwrap();
        assert_eq!(rule.check(4, 10), Ok(()));
        assert_eq!(rule.check(8, 10), Ok(()));
        assert_eq!(rule.check(6, 10), Err(RuleViolation));
        assert_eq!(rule.check(12, 10), Err(Insufficient { available: 10 }));
        assert_eq!(Rule::multiple(1), None);
        assert_eq!(Rule::multiple(0), None);
    }

    #[test]
    fn altogether_takes_exactly_the_whole_pool() {
        assert_eq!(Rule::Altogether.check(9, 10), Err(RuleViolation));
        assert_eq!(Rule::Altogether.check(10, 10), Ok(()));
        assert_eq!(
            Rule::Altogether.check(11, 10),
            Err(Insufficient { available: 10 })
        );
    }

    #[test]
    fn avoid_one_never_leaves_a_single_ticket() {
        assert_eq!(Rule::AvoidOne.check(2, 3), Err(RuleViolation));
        assert_eq!(Rule::AvoidOne.check(3, 3), Ok(()));
        assert_eq!(Rule::AvoidOne.check(1, 3), Ok(()));
        assert_eq!(Rule::AvoidOne.check(1, 1), Ok(()));
        assert_eq!(
            Rule::AvoidOne.check(4, 3),
            Err(Insufficient { available: 3 })
        );
    }
}
