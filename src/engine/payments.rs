//! The payment port and the built-in test adapter.

use async_trait::async_trait;

use crate::core::{Money, ReservationId};

/// Why a charge did not succeed. Either way no money moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The provider refused the payment method.
    #[error("declined")]
    Declined,
    /// The provider could not be reached or failed.
    #[error("provider unavailable")]
    Unavailable,
}

/// Charges money for a reservation.
#[async_trait]
pub trait PaymentAdapter: Send + Sync + 'static {
    async fn charge(
        &self,
        reservation: ReservationId,
        amount: Money,
        payment_token: &str,
    ) -> Result<(), PaymentError>;
}

/// The test adapter of PROTOCOL §5: `tok_ok` succeeds, `tok_declined` is declined,
/// `tok_error` fails as if the provider were down; any other token is declined.
#[derive(Debug, Default, Clone, Copy)]
pub struct TestPayments;

#[async_trait]
impl PaymentAdapter for TestPayments {
    async fn charge(
        &self,
        _: ReservationId,
        _: Money,
        payment_token: &str,
    ) -> Result<(), PaymentError> {
        match payment_token {
            "tok_ok" => Ok(()),
            "tok_error" => Err(PaymentError::Unavailable),
            _ => Err(PaymentError::Declined),
        }
    }
}
