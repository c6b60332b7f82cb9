//! Money: an integer amount in minor units (cents) and an ISO 4217 currency.

use std::fmt;

/// An ISO 4217 currency; only codes in the standard can exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

impl Currency {
    /// Accepts an upper-case ISO 4217 code such as `EUR`.
    pub fn parse(code: &str) -> Option<Self> {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return None;
        }
        iso_currency::Currency::from_code(code).map(Self)
    }

    pub fn code(&self) -> &'static str {
        self.0.code()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An amount of money. Prices are never negative; totals are computed with checked
/// arithmetic so an absurd quantity cannot wrap around into a small price.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Money {
    /// Minor units (cents for EUR and USD).
    pub amount: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount: i64, currency: Currency) -> Self {
        Self { amount, currency }
    }

    pub fn zero(currency: Currency) -> Self {
        Self::new(0, currency)
    }

    /// `self × quantity`, or `None` on overflow.
    pub fn times(self, quantity: u32) -> Option<Money> {
        self.amount
            .checked_mul(i64::from(quantity))
            .map(|amount| Money::new(amount, self.currency))
    }

    /// `self + other`, or `None` on overflow or when the currencies differ.
    pub fn plus(self, other: Money) -> Option<Money> {
        if self.currency != other.currency {
            return None;
        }
        self.amount
            .checked_add(other.amount)
            .map(|amount| Money::new(amount, self.currency))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_upper_case_iso_codes() {
        assert_eq!(Currency::parse("EUR").map(|c| c.code()), Some("EUR"));
        for bad in ["eur", "EURO", "XXQ", "", "E1R"] {
            assert_eq!(Currency::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn arithmetic_is_checked() {
        let eur = Currency::parse("EUR").unwrap();
        assert_eq!(Money::new(250, eur).times(4), Some(Money::new(1_000, eur)));
        assert_eq!(Money::new(i64::MAX, eur).times(2), None);
        let usd = Currency::parse("USD").unwrap();
        assert_eq!(Money::new(1, eur).plus(Money::new(1, usd)), None);
    }
}
