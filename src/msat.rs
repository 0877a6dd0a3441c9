//! [`MilliSats`]: prices and allocations at millisatoshi granularity.

use core::fmt;
use core::str::FromStr;

use bitcoin::Amount;
use serde::{Deserialize, Serialize};

/// An amount of millisatoshis (1 sat = 1000 msat): the unit of prices and allocations.
///
/// Payments on chain move whole satoshis ([`Amount`]); a price of a fraction of a satoshi per
/// request is metered against the channel's allocation in millisatoshis. All arithmetic is
/// checked: there are no floats and no silent wrap-around.
///
/// # Examples
///
/// ```
/// use bitcoin::Amount;
/// use paychan::MilliSats;
///
/// let price = MilliSats::from_msat(250);
/// let paid = MilliSats::from_sat(Amount::from_sat(2)).unwrap();
/// assert_eq!(paid.checked_sub(price), Some(MilliSats::from_msat(1_750)));
/// assert_eq!(price.to_string(), "250 msat");
/// ```
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MilliSats(u64);

impl MilliSats {
    /// Zero millisatoshis.
    pub const ZERO: Self = Self(0);
    /// One satoshi.
    pub const ONE_SAT: Self = Self(1_000);
    /// The largest representable amount.
    pub const MAX: Self = Self(u64::MAX);

    /// Creates an amount of `msat` millisatoshis.
    pub const fn from_msat(msat: u64) -> Self {
        Self(msat)
    }

    /// Returns the amount in millisatoshis.
    pub const fn to_msat(self) -> u64 {
        self.0
    }

    /// Whether the amount is zero.
    ///
    /// ```
    /// use paychan::MilliSats;
    /// assert!(MilliSats::ZERO.is_zero() && !MilliSats::from_msat(1).is_zero());
    /// ```
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Converts a whole-satoshi [`Amount`]; `None` if it does not fit (above ~18.4M BTC).
    pub fn from_sat(amount: Amount) -> Option<Self> {
        amount.to_sat().checked_mul(1_000).map(Self)
    }

    /// Returns the whole satoshis in this amount, rounding down.
    pub fn to_sat_floor(self) -> Amount {
        Amount::from_sat(self.0 / 1_000)
    }

    /// Returns the satoshis needed to pay this amount, rounding up.
    pub fn to_sat_ceil(self) -> Amount {
        Amount::from_sat(self.0.div_ceil(1_000))
    }

    /// Adds, returning `None` on overflow.
    pub fn checked_add(self, rhs: Self) -> Option<Self> {
        self.0.checked_add(rhs.0).map(Self)
    }

    /// Subtracts, returning `None` if `rhs` is larger.
    pub fn checked_sub(self, rhs: Self) -> Option<Self> {
        self.0.checked_sub(rhs.0).map(Self)
    }

    /// Adds, stopping at [`MilliSats::MAX`] (for totals).
    ///
    /// ```
    /// use paychan::MilliSats;
    /// assert_eq!(MilliSats::MAX.saturating_add(MilliSats::from_msat(1)), MilliSats::MAX);
    /// ```
    pub fn saturating_add(self, rhs: Self) -> Self {
        Self(self.0.saturating_add(rhs.0))
    }

    /// Subtracts, stopping at zero.
    pub fn saturating_sub(self, rhs: Self) -> Self {
        Self(self.0.saturating_sub(rhs.0))
    }

    /// Multiplies by a count (for example a number of units), returning `None` on overflow.
    pub fn checked_mul(self, count: u64) -> Option<Self> {
        self.0.checked_mul(count).map(Self)
    }
}

impl fmt::Display for MilliSats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} msat", self.0)
    }
}

/// The error from parsing a [`MilliSats`] string.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParseMilliSatsError;

impl fmt::Display for ParseMilliSatsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected a whole number of millisatoshis, optionally followed by \" msat\"")
    }
}

impl std::error::Error for ParseMilliSatsError {}

impl FromStr for MilliSats {
    type Err = ParseMilliSatsError;

    /// Parses `"1500"` or `"1500 msat"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_suffix(" msat").unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseMilliSatsError);
        }
        digits.parse().map(Self).map_err(|_| ParseMilliSatsError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_and_rounds() {
        let m = MilliSats::from_msat(1_001);
        assert_eq!(m.to_sat_floor(), Amount::from_sat(1));
        assert_eq!(m.to_sat_ceil(), Amount::from_sat(2));
        assert_eq!(MilliSats::from_msat(2_000).to_sat_ceil(), Amount::from_sat(2));
        assert_eq!(MilliSats::from_sat(Amount::from_sat(3)), Some(MilliSats::from_msat(3_000)));
        assert_eq!(MilliSats::from_sat(Amount::MAX), None);
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(MilliSats::MAX.checked_add(MilliSats::from_msat(1)), None);
        assert_eq!(MilliSats::ZERO.checked_sub(MilliSats::from_msat(1)), None);
        assert_eq!(
            MilliSats::from_msat(5).saturating_sub(MilliSats::from_msat(9)),
            MilliSats::ZERO
        );
        assert_eq!(MilliSats::from_msat(7).checked_mul(3), Some(MilliSats::from_msat(21)));
        assert_eq!(MilliSats::MAX.checked_mul(2), None);
    }

    #[test]
    fn parses_and_displays() {
        assert_eq!("1500".parse(), Ok(MilliSats::from_msat(1_500)));
        assert_eq!("1500 msat".parse(), Ok(MilliSats::from_msat(1_500)));
        for bad in ["", "-1", "1.5", "1e3", " 1", "99999999999999999999", "msat"] {
            assert!(bad.parse::<MilliSats>().is_err(), "{bad}");
        }
        let m = MilliSats::from_msat(42);
        assert_eq!(m.to_string().parse(), Ok(m));
        assert_eq!(serde_json::to_string(&m).unwrap(), "42");
    }
}
